//! Tasman's data plane: one router daemon whose role (edge, transit, site) comes from its node's
//! kind in the topology.
pub mod backend;
pub mod netem;
