//! Tasman's control plane (controller, store, admin API) and the `tasman` command line.

pub mod cli;
pub mod demo;
