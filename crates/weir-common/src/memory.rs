//! Giving freed memory back to the operating system at chosen points.
//!
//! The binary picks the allocator; long-running loops (a stream between commits) call
//! [`release`] where their working set has just been dropped. With mimalloc, `weir stream
//! run` turns the allocator's own timed purging off and relies on these calls: memory is
//! returned once per commit instead of on every free, which cost a third of a stream's
//! CPU time in page faults.

use std::sync::OnceLock;

static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Sets what [`release`] does (once; later calls are ignored).
pub fn set_release(f: fn()) {
    let _ = RELEASE.set(f);
}

/// Returns freed memory to the operating system, if the allocator can.
pub fn release() {
    if let Some(f) = RELEASE.get() {
        f();
    }
}

/// A byte count for people: `512 B`, `1.5 MiB`.
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}
