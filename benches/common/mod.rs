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

/// A warning to print with the figures when `dir` lies on ext4 without a journal: there, an
/// inode freed in the last minutes is skipped by every allocation in its group, each skip a
/// read of its inode-table block, so deleting many files (an old benchmark store, say) taxes
/// every file created for minutes after (see docs/benchmarks.md, "A fourth machine").
#[allow(dead_code)]
pub fn fs_warning(dir: &std::path::Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    // The mount holding `dir`: the longest mount point it lies under.
    let (device, _) = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (device, point, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "ext4" && dir.starts_with(point)).then_some((device, point.len()))
        })
        .max_by_key(|(_, len)| *len)?;
    let name = device.strip_prefix("/dev/")?;
    // A journaled ext4 file system has its journal's statistics here.
    let journaled = std::path::Path::new("/proc/fs/jbd2")
        .join(format!("{name}-8"))
        .exists();
    (!journaled).then(|| {
        format!(
            "# note: {} is on ext4 without a journal ({device}): files deleted in the last \
             minutes slow every file created; leave the machine five minutes without large \
             deletions before measuring",
            dir.display()
        )
    })
}
