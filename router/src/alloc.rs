//! Allocator tuning for the data path, applied by each binary's `main` before any thread starts.
//!
//! The splice reads TCP into 16-256 KiB blocks that quinn frees once the peer acknowledges them.
//! With glibc's defaults, blocks of 128 KiB and more were `mmap`ed and unmapped one by one, and
//! the heap's free top was trimmed back to the kernel: page faults and page clearing took ~11 % of
//! an edge's CPU in a bulk transfer. Serving every block up to 1 MiB from the heap and trimming
//! only beyond 128 MiB of free top keeps those pages mapped: one TCP stream edge -> site went from
//! ~5.7 to ~7 Gbit/s on the benchmark machine, and the memory held per idle connection did not
//! change. mimalloc gave the same speed but twice the memory per
//! idle connection, so the binaries keep glibc. See docs/benchmarks.md.

/// Largest allocation served from the heap rather than its own `mmap`.
pub const MMAP_THRESHOLD: i32 = 1 << 20;
/// Free memory at the top of the heap kept before it is returned to the kernel.
pub const TRIM_THRESHOLD: i32 = 128 << 20;

/// Sets glibc's malloc thresholds (a no-op with other C libraries). Call first in `main`.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads
    // exist, and its return value (0 on a refused parameter) leaves the defaults in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
