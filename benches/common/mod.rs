//! Inputs shared by the benchmarks that store runs through a worker (e2e, http).

use serde_json::json;

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
