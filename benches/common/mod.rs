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

/// The median of `x` (the mean of the middle two for an even count; NaN for none).
#[allow(dead_code)]
pub fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    let n = x.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => x[n / 2],
        _ => (x[n / 2 - 1] + x[n / 2]) / 2.0,
    }
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

/// Notes to print with the figures about the file system under `dir`:
///
/// - on ext4 without a journal, an inode freed in the last minutes is skipped by every
///   allocation in its group, each skip a read of its inode-table block, so deleting many
///   files (an old benchmark store, say) taxes every file created for minutes after (see
///   docs/benchmarks.md, "A fourth machine");
/// - with under a fifth of its inodes free, ext4 walks more block groups to place each new
///   directory (every create makes one, its run's history directory), and a create costs
///   more than on a roomier file system; the benchmarks never delete their stores, so a day
///   of runs can get there (docs/benchmarks.md, "A fifth machine");
/// - with little disk space left: the same day of runs can fill the disk, and then the test
///   suite's brokers fail too.
#[allow(dead_code)]
pub fn fs_notes(dir: &std::path::Path) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some((device, kind)) = mount_of(dir) {
        let name = device.strip_prefix("/dev/").unwrap_or(&device);
        // A journaled ext4 file system has its journal's statistics here.
        let journaled = std::path::Path::new("/proc/fs/jbd2")
            .join(format!("{name}-8"))
            .exists();
        if kind == "ext4" && !journaled {
            notes.push(format!(
                "# note: {} is on ext4 without a journal ({device}): files deleted in the last \
                 minutes slow every file created; leave the machine five minutes without large \
                 deletions before measuring",
                dir.display()
            ));
        }
    }
    if let Some(room) = room(dir) {
        if room.total_inodes > 0 && room.free_inodes * 5 < room.total_inodes {
            notes.push(format!(
                "# note: only {:.0} % of the inodes of the file system under {} are free: \
                 creates cost more than on a roomier one (old stores under target/bench-tmp: \
                 remove them, then wait five minutes)",
                room.free_inodes as f64 * 100.0 / room.total_inodes as f64,
                dir.display()
            ));
        }
        if room.free_bytes < 20 << 30 {
            notes.push(format!(
                "# note: only {:.1} GB free under {}: a store of 10^6 runs takes some 15 GB \
                 (3-5 blocks of 4 KB a run), and a full disk fails the test suite's brokers \
                 too (old stores under target/bench-tmp: remove them)",
                room.free_bytes as f64 / 1e9,
                dir.display()
            ));
        }
    }
    notes
}

/// Free room of a file system, as an unprivileged process may use it.
struct Room {
    free_inodes: u64,
    total_inodes: u64,
    free_bytes: u64,
}

/// The free room of the file system under `dir`.
fn room(dir: &std::path::Path) -> Option<Room> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) fills a properly sized out-parameter from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| Room {
        free_inodes: st.f_favail as u64,
        total_inodes: st.f_files as u64,
        free_bytes: st.f_bavail as u64 * st.f_frsize as u64,
    })
}

/// The device and file system type of the mount holding `dir` (the longest mount point it
/// lies under).
fn mount_of(dir: &std::path::Path) -> Option<(String, String)> {
    let dir = dir.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (device, point, kind) = (f.next()?, f.next()?, f.next()?);
            dir.starts_with(point)
                .then(|| (device.to_owned(), kind.to_owned(), point.len()))
        })
        .max_by_key(|(_, _, len)| *len)
        .map(|(device, kind, _)| (device, kind))
}

/// Write requests and 512-byte sectors the block device under `dir` has completed since boot
/// (`/proc/diskstats`), or `None` where `dir` is not on a block device. Differences around a
/// cell give what the cell wrote: a cost that, unlike a rate, barely moves with the load
/// others put on a shared machine's CPUs.
#[allow(dead_code)]
pub fn disk_writes(dir: &std::path::Path) -> Option<(u64, u64)> {
    let (device, _) = mount_of(dir)?;
    let name = device.strip_prefix("/dev/")?;
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    stats.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // major minor name reads merged sectors ms writes merged sectors ...
        (f.get(2) == Some(&name))
            .then(|| Some((f.get(7)?.parse().ok()?, f.get(9)?.parse().ok()?)))?
    })
}
