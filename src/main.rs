//! The `tasman` binary: a thin shim over [`fabric::cli`], so that the end-to-end tests in
//! `tests/` can run the real binary through `CARGO_BIN_EXE_tasman`.

fn main() -> std::process::ExitCode {
    router::alloc::tune();
    fabric::cli::main()
}
