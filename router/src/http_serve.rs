//! One bounded HTTP/1.1 accept loop for the small servers a node exposes: the router's and the
//! controller's `/metrics` endpoints and the controller's admin API.
//!
//! Their listeners are open to the network, and every connection costs a descriptor and a task
//! before any request is looked at, so [`serve`] bounds what one client can hold:
//! - at most [`Limits::max_connections`] connections at once; more wait in the listen backlog;
//! - a request's headers must arrive within [`Limits::header_read_timeout`], which also bounds how
//!   long a kept-alive connection may idle between requests (hyper restarts the timer for the next
//!   request's headers);
//! - a request's body must arrive within [`Limits::body_read_timeout`] of its headers, or the
//!   request is answered `408 Request Timeout` and the connection closed;
//! - a failed accept (descriptors exhausted, say) is retried after a pause, not in a loop that
//!   would burn a core while the data path waits for descriptors.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body_util::{Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::service::{Service, service_fn};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

/// How long a client may take to send a request's headers, and may stay silent between requests
/// on a kept-alive connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's body once its headers are in. A topology
/// document of a few MiB arrives well within it on a slow link; the admin API's largest body
/// (32 MiB) needs about 9 Mbit/s.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
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
    /// A request's whole body must arrive within this after its headers; a handler that is still
    /// waiting for it then fails, and the client gets 408 and a closed connection.
    pub body_read_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog until one ends.
    pub max_connections: usize,
}

/// A request body that fails once [`Limits::body_read_timeout`] has passed since the headers
/// arrived: what [`serve`] hands its service instead of hyper's `Incoming`.
pub struct RequestBody {
    inner: Incoming,
    deadline: Instant,
    timeout: Duration,
    /// Started on the first read that has to wait: a request read at once needs no timer.
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

/// Why a [`RequestBody`] could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Read(#[from] hyper::Error),
    #[error("request body not received within {0:?}")]
    TimedOut(Duration),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(BodyError::from)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(sleep.as_mut().poll(cx));
        this.timed_out.store(true, Relaxed);
        Poll::Ready(Some(Err(BodyError::TimedOut(this.timeout))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves HTTP/1.1 on `listener` with `service` within `limits`, until the future is dropped
/// (its connections with it). `name` tells the server apart in logs.
///
/// A request whose body timed out is answered 408 with `connection: close`, whatever the service
/// made of the failed read (axum's extractors answer 400; a service error would drop the
/// connection without an answer).
pub async fn serve<S, B>(listener: TcpListener, name: &'static str, limits: Limits, service: S)
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
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
        let per_request = service_fn(move |req: Request<Incoming>| {
            let timed_out = Arc::new(AtomicBool::new(false));
            let (parts, inner) = req.into_parts();
            let body = RequestBody {
                inner,
                deadline: Instant::now() + limits.body_read_timeout,
                timeout: limits.body_read_timeout,
                sleep: None,
                timed_out: timed_out.clone(),
            };
            let response = service.call(Request::from_parts(parts, body));
            async move {
                let response = response.await;
                if timed_out.load(Relaxed) {
                    return Ok(body_timed_out(limits.body_read_timeout));
                }
                response.map(|r| r.map(Either::Left))
            }
        });
        let http = http.clone();
        conns.spawn(async move {
            let _slot = slot;
            if let Err(e) = http.serve_connection(TokioIo::new(tcp), per_request).await {
                tracing::debug!(server = name, %remote, "connection: {e}");
            }
        });
    }
}

fn body_timed_out<B>(timeout: Duration) -> Response<Either<B, Full<Bytes>>> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "request body not received within {timeout:?}\n"
    )))));
    *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    // The rest of the body may still come; the connection cannot serve another request.
    headers.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    response
}

/// Failures of the connection being accepted, not of the listener (as axum and hyper class them).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// `POST /echo` reads the whole body and answers its length; any other path ignores it.
    async fn start(limits: Limits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = service_fn(|req: Request<RequestBody>| async move {
            let text = if req.uri().path() == "/echo" {
                let body = req.into_body().collect().await?.to_bytes();
                format!("{} bytes\n", body.len())
            } else {
                "not read\n".to_string()
            };
            Ok::<_, BodyError>(Response::new(Full::new(Bytes::from(text))))
        });
        tokio::spawn(serve(listener, "test", limits, svc));
        addr
    }

    /// Everything the server sends until it closes the connection; fails if it is still open
    /// after `within`.
    async fn until_closed(c: &mut TcpStream, within: Duration) -> String {
        let mut got = Vec::new();
        tokio::time::timeout(within, c.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("connection still open after {within:?}"))
            .unwrap();
        String::from_utf8_lossy(&got).into_owned()
    }

    /// A request that asks for no keep-alive, so the server closes after answering.
    fn post(path: &str, content_length: usize, body: &str) -> String {
        format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {content_length}\r\n\r\n{body}"
        )
    }

    #[tokio::test]
    async fn a_body_that_stops_arriving_is_answered_408_and_its_slot_freed() {
        let timeout = Duration::from_millis(300);
        let addr = start(Limits {
            header_read_timeout: Duration::from_secs(60),
            body_read_timeout: timeout,
            max_connections: 1,
        })
        .await;
        let started = std::time::Instant::now();
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(post("/echo", 100, "only ten..").as_bytes())
            .await
            .unwrap();
        let back = until_closed(&mut stalled, Duration::from_secs(10)).await;
        assert!(back.starts_with("HTTP/1.1 408"), "{back}");
        assert!(back.contains("connection: close"), "{back}");
        assert!(started.elapsed() >= timeout);
        // The only slot is free again: a whole body is read and answered.
        let mut next = TcpStream::connect(addr).await.unwrap();
        next.write_all(post("/echo", 5, "hello").as_bytes())
            .await
            .unwrap();
        let back = until_closed(&mut next, Duration::from_secs(10)).await;
        assert!(back.starts_with("HTTP/1.1 200"), "{back}");
        assert!(back.ends_with("5 bytes\n"), "{back}");
    }

    /// The timeout bounds the whole body, not the silence between its bytes.
    #[tokio::test]
    async fn a_body_that_trickles_in_is_cut_off_at_the_timeout() {
        let timeout = Duration::from_millis(300);
        let addr = start(Limits {
            header_read_timeout: Duration::from_secs(60),
            body_read_timeout: timeout,
            max_connections: 1,
        })
        .await;
        let (mut rx, mut tx) = TcpStream::connect(addr).await.unwrap().into_split();
        tx.write_all(post("/echo", 1000, "").as_bytes())
            .await
            .unwrap();
        // One byte every 20 ms: the body would take 20 s.
        let trickle = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(20));
            loop {
                every.tick().await;
                if tx.write_all(b"x").await.is_err() {
                    return;
                }
            }
        });
        let mut got = Vec::new();
        // The read may end in a reset rather than EOF (bytes trickled in after the server
        // stopped reading); what came before it is in `got`.
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.read_to_end(&mut got))
            .await
            .expect("a trickling body held its connection past the timeout");
        let back = String::from_utf8_lossy(&got);
        assert!(back.starts_with("HTTP/1.1 408"), "{back}");
        trickle.abort();
    }

    /// hyper closes a connection whose request body the service left unread, so a stalled body
    /// holds no slot there either, and needs no timeout.
    #[tokio::test]
    async fn a_body_left_unread_does_not_keep_the_connection() {
        let addr = start(Limits {
            header_read_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 1,
        })
        .await;
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(post("/ignore", 100, "").as_bytes())
            .await
            .unwrap();
        let back = until_closed(&mut stalled, Duration::from_secs(10)).await;
        assert!(back.starts_with("HTTP/1.1 200"), "{back}");
        assert!(back.ends_with("not read\n"), "{back}");
    }
}
