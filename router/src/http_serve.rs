//! One bounded HTTP/1.1 accept loop for the small servers a node exposes: the router's
//! `/metrics` endpoint and the controller's admin API.
//!
//! Their listeners are open to the network, and every connection costs a descriptor and a task
//! before any request is looked at, so [`serve`] bounds what one client can hold:
//! - at most [`Limits::max_connections`] connections at once; more wait in the listen backlog;
//! - a request's headers must arrive within [`Limits::header_read_timeout`], which also bounds how
//!   long a kept-alive connection may idle between requests (hyper restarts the timer for the next
//!   request's headers);
//! - a failed accept (descriptors exhausted, say) is retried after a pause, not in a loop that
//!   would burn a core while the data path waits for descriptors.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Bytes, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// How long a client may take to send a request's headers, and may stay silent between requests
/// on a kept-alive connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// First pause after a failed accept, doubled on each failure in a row up to
/// [`ACCEPT_BACKOFF_MAX`]: a passing failure costs a client little, a lasting one (descriptors
/// exhausted) is retried, and logged, about once a second.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What one server lets its clients hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A request's headers must arrive within this; it is also the longest a kept-alive
    /// connection may idle between requests.
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog until one ends.
    pub max_connections: usize,
}

/// Serves HTTP/1.1 on `listener` with `service` within `limits`, until the future is dropped
/// (its connections with it). `name` tells the server apart in logs.
pub async fn serve<S, B>(listener: TcpListener, name: &'static str, limits: Limits, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper applies the header read timeout only with a timer.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut conns = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // A slot first: at the cap, new connections wait in the kernel's backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return; // never: the semaphore is not closed
        };
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            // That connection's own failure (reset before it was accepted): the next one is fine.
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(server = name, error = %e, "accept failed");
                continue;
            }
            Err(e) => {
                tracing::warn!(server = name, error = %e, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let service = service.clone();
        let http = http.clone();
        conns.spawn(async move {
            let _slot = slot;
            if let Err(e) = http.serve_connection(TokioIo::new(tcp), service).await {
                tracing::debug!(server = name, %remote, "connection: {e}");
            }
        });
    }
}

/// Failures of the connection being accepted, not of the listener (as axum and hyper class them).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}
