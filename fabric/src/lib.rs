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
/// logged at error here, for the operator, and never reaches a client's 500 body. Without the
/// `internal: ` that every answer of it begins with ([`internal`], and the `Internal` variants
/// of the errors that carry it, which add it: it was said twice).
pub(crate) fn task_failed(e: tokio::task::JoinError) -> String {
    tracing::error!("a task of the controller failed: {e}");
    if e.is_panic() {
        "the operation failed unexpectedly (the controller's log says why)".to_string()
    } else {
        "the operation was cancelled (the controller is stopping)".to_string()
    }
}

/// [`task_failed`] as an answer says it.
pub(crate) fn internal(e: tokio::task::JoinError) -> String {
    format!("internal: {}", task_failed(e))
}

#[cfg(test)]
mod task_failed_tests {
    /// A panicked task is told once as internal, whichever error carries it (it read
    /// "internal: internal: ..." through the controller's and the circuits' errors).
    #[tokio::test]
    async fn a_failed_task_is_told_internal_once() {
        let failed = || async {
            tokio::task::spawn_blocking(|| panic!("secret"))
                .await
                .unwrap_err()
        };
        let said = "internal: the operation failed unexpectedly (the controller's log says why)";
        assert_eq!(super::internal(failed().await), said);
        let e = crate::controller::ControllerError::from(failed().await);
        assert_eq!(e.to_string(), said);
        let e = crate::circuits::service::ServiceError::from(failed().await);
        assert_eq!(e.to_string(), said);
    }
}
