//! Tasman's control plane (controller, store, admin API) and the `tasman` command line.

pub mod admin;
pub mod circuits;
pub mod cli;
pub mod controller;
pub mod demo;
pub mod plan;
pub mod store;
pub mod topology_file;
