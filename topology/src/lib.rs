//! Tasman's pure topology core: the model, YAML loading and validation, the graph, route
//! selection and diff. This crate never does I/O and never awaits: callers hand it text and
//! state, it hands back values. That keeps everything here testable in microseconds.

pub mod builder;
pub mod circuit;
pub mod graph;
pub mod model;
pub mod route;
pub mod units;

pub use graph::Graph;
pub use model::*;
pub use route::{Candidate, Hysteresis, LiveState, RouteError, RoutingTable, SiteLoad, route};
pub use units::{Bandwidth, Latency, UnitError};
