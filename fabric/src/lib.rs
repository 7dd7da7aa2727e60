//! Tasman's control plane (controller, store, admin API) and the `tasman` command line.

pub mod admin;
pub mod circuits;
pub mod cli;
pub mod controller;
pub mod demo;
pub mod plan;
pub mod store;
pub mod topology_file;

/// What an error answer says of a task that failed (a panic, or cancelled at shutdown): that it
/// failed, not why. The panic's message (which can carry paths, names or a record's bytes) is
/// logged at error here, for the operator, and never reaches a client's 500 body.
pub(crate) fn task_failed(e: tokio::task::JoinError) -> String {
    tracing::error!("a task of the controller failed: {e}");
    if e.is_panic() {
        "internal: the operation failed unexpectedly (the controller's log says why)".to_string()
    } else {
        "internal: the operation was cancelled (the controller is stopping)".to_string()
    }
}
