//! The router's side of the control plane: the controller client ([`client`]), the wire
//! messages ([`proto`]) and the on-disk last good snapshot ([`disk`]).
//!
//! The data path never waits on anything here: the client only publishes new
//! [`Snapshot`](crate::snapshot::Snapshot)s into the router's `watch` channel.

pub mod client;
pub mod disk;
pub mod proto;

pub use client::{ClientConfig, ControlClient, ControlError};
