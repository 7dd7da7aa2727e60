//! The `tasman` binary: a thin shim over [`fabric::cli`], so that the end-to-end tests in
//! `tests/` can run the real binary through `CARGO_BIN_EXE_tasman`.

/// mimalloc instead of glibc malloc: the data path allocates and frees 16-256 KiB read blocks
/// at line rate, and glibc returned them to the kernel and faulted them back in (page faults and
/// page clearing were ~11 % of an edge's CPU in a bulk transfer). See docs/benchmarks.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    fabric::cli::main()
}
