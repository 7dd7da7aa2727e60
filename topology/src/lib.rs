//! Tasman's pure topology core: the model, YAML loading and validation, the graph, route
//! selection and diff. This crate never does I/O and never awaits: callers hand it text and
//! state, it hands back values. That keeps everything here testable in microseconds.

pub mod builder;
pub mod circuit;
pub mod diag;
pub mod diff;
pub mod graph;
pub mod model;
mod overlap;
pub mod route;
#[doc(hidden)]
pub mod synth;
mod tree;
pub mod units;
mod validate;
pub mod yaml;

pub use diag::{Diagnostic, Severity, tally};
pub use graph::Graph;
pub use model::*;
pub use route::{
    Candidate, Hysteresis, LiveState, MAX_PATH_NODES, RouteError, RoutingTable, SiteLoad, Spread,
    route,
};
pub use units::{Bandwidth, Latency, UnitError};
pub use validate::{MAX_LINKS, MAX_NODES, MAX_SERVICES};
pub use yaml::{Loaded, MAX_DIAGNOSTICS, MAX_DOCUMENT_BYTES, load, load_stored, to_yaml};
