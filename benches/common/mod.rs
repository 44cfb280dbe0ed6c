//! What the benchmarks share: the run record of those that store runs through a worker (e2e,
//! http), the CPU clock of those that count CPU per operation (store, index). Each benchmark
//! uses some of it, hence the `allow(dead_code)`s.

use serde_json::json;

#[allow(dead_code)]
/// A 2-5 KB run record: a feasibility report and a short G-code program.
pub fn record(i: usize) -> Vec<u8> {
    let lines = 40 + (i % 100);
    let gcode: String = (0..lines)
        .map(|n| {
            format!(
                "N{n} G1 X{:.3} Y{:.3} F1200\n",
                n as f64 * 1.5,
                (i % 97) as f64
            )
        })
        .collect();
    json!({"mode": "cam", "tool_id": format!("T{}", i % 20), "status": "OK",
           "feasibility": {"max_depth_mm": 3.5, "passes": i % 7, "material": "maple"},
           "decision": {"risk_level": "GREEN", "score": 87.5, "warnings": []},
           "request": {"geometry": {"w": 120, "h": 80}, "bench_index": i},
           "outputs": {"gcode_text": gcode}})
    .to_string()
    .into_bytes()
}

/// CPU seconds (user + system) this process has used.
#[allow(dead_code)]
pub fn cpu_secs() -> f64 {
    // SAFETY: getrusage(2) fills a properly sized out-parameter.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}
