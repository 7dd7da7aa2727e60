//! One bounded HTTP/1.1 accept loop for the small servers a node exposes: the router's and the
//! controller's `/metrics` endpoints and the controller's admin API.
//!
//! Their listeners are open to the network, and every connection costs a descriptor and a task
//! before any request is looked at, so [`serve`] bounds what one client can hold:
//! - at most [`Limits::max_connections`] connections at once; more wait in the listen backlog;
//! - at most [`Limits::max_per_source`] of them from one source (an IPv4 address, an IPv6 /64,
//!   as an edge counts its clients); more from it are answered 503 and closed at once (one
//!   client cannot hold every slot and keep the others waiting);
//! - a request's headers must arrive within [`Limits::header_read_timeout`], which also bounds how
//!   long a kept-alive connection may idle between requests (hyper restarts the timer for the next
//!   request's headers);
//! - a request's body must arrive within [`Limits::body_read_timeout`] of its headers, or the
//!   request is answered `408 Request Timeout` (worded by the server's [`Refusal`]: plain text
//!   for the metrics endpoints, the admin API's JSON error) and the connection closed;
//! - a write to the client that makes no progress for [`Limits::write_timeout`] fails and the
//!   connection is dropped, so a client that stops reading a response larger than the socket
//!   buffers cannot keep its slot; one that reads slowly but steadily gets the whole response;
//! - a failed accept (descriptors exhausted, say) is retried after a pause, not in a loop that
//!   would burn a core while the data path waits for descriptors.

use std::io;
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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
/// How long a write to a client may make no progress (the client reading none of the response)
/// before the connection is dropped. As nginx's `send_timeout` (60 s by default), it restarts
/// whenever a write goes through, so it bounds a stalled reader, not a slow one. These responses
/// are small (a scrape, a topology document of a few MiB) and a live client reads them as they
/// come; 30 s without a byte taken, as long as a body may take to arrive, is ample for a
/// congested link and frees a slot held by a client that stopped reading within half a minute.
/// Progress is as the kernel reports it: a full socket takes writes again once about a third of
/// its send buffer has drained, so a client must read that much within the timeout; with Linux's
/// default 4 MiB ceiling on the buffer, at worst about 1.3 MiB, some 45 KiB/s.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// First pause after a failed accept, doubled on each failure in a row up to
/// [`ACCEPT_BACKOFF_MAX`]: a passing failure costs a client little, a lasting one (descriptors
/// exhausted) is retried, and logged, about once a second.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The pause after failed accepts of one listener ([`ACCEPT_BACKOFF_MIN`] doubled on each
/// failure in a row, up to [`ACCEPT_BACKOFF_MAX`]); shared by every accept loop of a node.
pub(crate) struct AcceptBackoff(Duration);

impl AcceptBackoff {
    pub fn new() -> Self {
        AcceptBackoff(ACCEPT_BACKOFF_MIN)
    }

    /// An accept succeeded: the next failure pauses briefly again.
    pub fn accepted(&mut self) {
        self.0 = ACCEPT_BACKOFF_MIN;
    }

    /// After a failed accept: nothing for the failure of the connection being accepted (reset
    /// before it was accepted: the next one is fine), else a pause, logged, that doubles while
    /// failures go on.
    pub async fn failed(&mut self, server: &str, e: &std::io::Error) {
        if is_connection_error(e) {
            tracing::debug!(server, error = %e, "accept failed");
            return;
        }
        tracing::warn!(server, error = %e, retry_in = ?self.0, "accept failed");
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(ACCEPT_BACKOFF_MAX);
    }

    #[cfg(test)]
    fn pause(&self) -> Duration {
        self.0
    }
}

/// How a server words an answer [`serve`] gives on its own, without its service (a request body
/// that did not arrive in time): the content type and body for a status and a reason. A server
/// whose service answers errors in a shape of its own (the admin API's JSON) words these the
/// same, so that its clients read every error one way.
pub type Refusal = fn(StatusCode, &str) -> (&'static str, Bytes);

/// The reason as a line of plain text: the metrics endpoints', whose pages are no JSON API.
pub fn plain_text(_status: StatusCode, reason: &str) -> (&'static str, Bytes) {
    ("text/plain", Bytes::from(format!("{reason}\n")))
}

/// What one server lets its clients hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A request's headers must arrive within this; it is also the longest a kept-alive
    /// connection may idle between requests.
    pub header_read_timeout: Duration,
    /// A request's whole body must arrive within this after its headers; a handler that is still
    /// waiting for it then fails, and the client gets 408 and a closed connection.
    pub body_read_timeout: Duration,
    /// A write to the client that can make no progress for this fails, and hyper drops the
    /// connection: the time a client may go without reading once the socket buffers are full.
    pub write_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog until one ends.
    pub max_connections: usize,
    /// Connections served at once from one source ([`crate::edge::source_key`]); one more from
    /// it is answered 503 and closed as soon as it is accepted.
    pub max_per_source: usize,
}

/// One connection counted against its source ([`crate::edge::SourceCounts`], as an edge counts
/// its clients); given back when dropped.
struct SourceShare {
    sources: Arc<crate::edge::SourceCounts>,
    source: Option<std::net::IpAddr>,
}

impl Drop for SourceShare {
    fn drop(&mut self) {
        if let Some(source) = self.source {
            self.sources.give_back(source);
        }
    }
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

/// A connection whose writes fail with [`io::ErrorKind::TimedOut`] once they have made no
/// progress for `timeout`: what [`serve`] hands hyper instead of the bare `TcpStream`, since
/// hyper would wait forever for a client that never reads its response.
///
/// Reads pass through untouched (hyper's header timeout and [`RequestBody`] bound them).
struct WriteTimeout<T> {
    inner: T,
    timeout: Duration,
    /// Started on the first write that has to wait and reused after: writes that go through at
    /// once, the usual case, need no timer.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether `sleep` is counting down the current stall: set by a write that has to wait,
    /// cleared by one that completes, so the next stall starts a fresh `timeout`. (A cleared
    /// timer that was already registered may still fire once, a spurious wake-up hyper ignores.)
    stalled: bool,
}

impl<T> WriteTimeout<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        WriteTimeout {
            inner,
            timeout,
            sleep: None,
            stalled: false,
        }
    }

    /// Runs one write operation on `inner`, failing it if it has been waiting for `timeout`
    /// without any write completing.
    fn poll_write_op<R>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>>
    where
        T: Unpin,
    {
        if let Poll::Ready(done) = op(Pin::new(&mut self.inner), cx) {
            self.stalled = false;
            return Poll::Ready(done);
        }
        let timeout = self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if !self.stalled {
            // A new stall: `timeout` from now, whatever an earlier one left in the timer.
            self.stalled = true;
            sleep.as_mut().reset(Instant::now() + timeout);
        }
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client read nothing for {timeout:?}"),
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_op(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_op(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    /// Forwarded, so hyper still writes a response's headers and body in one vectored write.
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_op(cx, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_op(cx, |io, cx| io.poll_shutdown(cx))
    }
}

/// Serves HTTP/1.1 on `listener` with `service` within `limits`, until the future is dropped
/// (its connections with it). `name` tells the server apart in logs. The answers it gives on its
/// own are [`plain_text`]: [`serve_with_refusal`] words them otherwise.
pub async fn serve<S, B>(listener: TcpListener, name: &'static str, limits: Limits, service: S)
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_with_refusal(listener, name, limits, plain_text, service).await
}

/// [`serve`], with the answers it gives on its own worded by `refusal`.
///
/// A request whose body timed out is answered 408 with `connection: close`, whatever the service
/// made of the failed read (axum's extractors answer 400; a service error would drop the
/// connection without an answer).
pub async fn serve_with_refusal<S, B>(
    listener: TcpListener,
    name: &'static str,
    limits: Limits,
    refusal: Refusal,
    service: S,
) where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let sources = Arc::new(crate::edge::SourceCounts::new(Some(limits.max_per_source)));
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper applies the header read timeout only with a timer.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut conns = JoinSet::new();
    let mut backoff = AcceptBackoff::new();
    loop {
        // A slot first: at the cap, new connections wait in the kernel's backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return; // never: the semaphore is not closed
        };
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => {
                backoff.accepted();
                accepted
            }
            Err(e) => {
                backoff.failed(name, &e).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let Ok(source) = sources.take(remote.ip()) else {
            // Told why in one non-blocking write (a client sees a refusal, not a connection
            // that ended after its request went out), closed at once, its slot free again.
            tracing::debug!(server = name, %remote, max = limits.max_per_source, "connection refused: its address holds its share already");
            let _ = tcp.try_write(&over_share(limits.max_per_source, refusal));
            continue;
        };
        let share = SourceShare {
            sources: sources.clone(),
            source,
        };
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
                    return Ok(body_timed_out(limits.body_read_timeout, refusal));
                }
                response.map(|r| r.map(Either::Left))
            }
        });
        let http = http.clone();
        conns.spawn(async move {
            let (_slot, _share) = (slot, share);
            let io = TokioIo::new(WriteTimeout::new(tcp, limits.write_timeout));
            if let Err(e) = http.serve_connection(io, per_request).await {
                tracing::debug!(server = name, %remote, "connection: {e}");
            }
        });
    }
}

/// The whole answer to a connection beyond its address's share: 503 (try again in a second),
/// and the connection closed.
fn over_share(max: usize, refusal: Refusal) -> Vec<u8> {
    let status = StatusCode::SERVICE_UNAVAILABLE;
    let (content_type, body) = refusal(
        status,
        &format!("too many connections from this address (at most {max} at once)"),
    );
    let mut answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    answer
}

fn body_timed_out<B>(timeout: Duration, refusal: Refusal) -> Response<Either<B, Full<Bytes>>> {
    let status = StatusCode::REQUEST_TIMEOUT;
    let (content_type, body) = refusal(
        status,
        &format!("request body not received within {timeout:?}"),
    );
    let mut response = Response::new(Either::Right(Full::new(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
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

    /// The body `/big` answers: far more than loopback's socket buffers hold (a sender's grows to
    /// 4 MiB by default), so writing it waits on the client reading.
    const BIG: usize = 16 << 20;

    /// `POST /echo` reads the whole body and answers its length; `/big` answers [`BIG`] bytes;
    /// any other path ignores the body.
    async fn start(limits: Limits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = service_fn(|req: Request<RequestBody>| async move {
            let text = match req.uri().path() {
                "/echo" => {
                    let body = req.into_body().collect().await?.to_bytes();
                    format!("{} bytes\n", body.len())
                }
                "/big" => return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; BIG])))),
                _ => "not read\n".to_string(),
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

    /// A connection whose receive buffer is fixed at `bytes` (the kernel doubles it), rather than
    /// left to grow: it bounds how much of a response the kernel takes for a client that does
    /// not read.
    async fn connect_with_receive_buffer(addr: std::net::SocketAddr, bytes: u32) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// `GET /big`, with no keep-alive.
    const GET_BIG: &[u8] = b"GET /big HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

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
            write_timeout: Duration::from_secs(60),
            max_connections: 1,
            max_per_source: 1,
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
    /// A connection beyond its address's share is told when to try again, as every other 503
    /// of the admin API is (`Retry-After: 1`); it said nothing.
    #[tokio::test]
    async fn a_connection_over_its_share_is_told_when_to_try_again() {
        let addr = start(Limits {
            max_per_source: 1,
            ..crate::metrics::LIMITS
        })
        .await;
        let mut held = TcpStream::connect(addr).await.unwrap();
        held.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        let back = until_closed(&mut second, Duration::from_secs(10)).await;
        assert!(back.starts_with("HTTP/1.1 503"), "{back}");
        assert!(back.contains("\r\nretry-after: 1\r\n"), "{back}");
    }

    #[tokio::test]
    async fn a_body_that_trickles_in_is_cut_off_at_the_timeout() {
        let timeout = Duration::from_millis(300);
        let addr = start(Limits {
            header_read_timeout: Duration::from_secs(60),
            body_read_timeout: timeout,
            write_timeout: Duration::from_secs(60),
            max_connections: 1,
            max_per_source: 1,
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
            write_timeout: Duration::from_secs(60),
            max_connections: 1,
            max_per_source: 1,
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

    /// A client that asks for a response and then reads none of it holds its slot only until the
    /// server's writes have made no progress for the write timeout; then the connection is
    /// dropped, the response cut short, and the slot serves the next client.
    #[tokio::test]
    async fn a_client_that_stops_reading_its_response_loses_its_slot() {
        let addr = start(Limits {
            header_read_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_millis(300),
            max_connections: 1,
            max_per_source: 1,
        })
        .await;
        let mut stalled = connect_with_receive_buffer(addr, 4 << 10).await;
        stalled.write_all(GET_BIG).await.unwrap();
        // Waits in the backlog until the only slot is free.
        let mut next = TcpStream::connect(addr).await.unwrap();
        next.write_all(post("/ignore", 0, "").as_bytes())
            .await
            .unwrap();
        let back = until_closed(&mut next, Duration::from_secs(10)).await;
        assert!(back.starts_with("HTTP/1.1 200"), "{back}");
        assert!(back.ends_with("not read\n"), "{back}");
        // What the kernel still held for the stalled client comes, then the end (or a reset).
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut got))
            .await
            .expect("the stalled connection is still open");
        assert!(got.starts_with(b"HTTP/1.1 200"));
        assert!(
            got.len() < BIG,
            "the whole response arrived: {} bytes",
            got.len()
        );
    }

    /// The write timeout bounds a stall, not the whole response: a client that reads slowly but
    /// steadily gets all of a response that takes it many timeouts to read.
    #[tokio::test]
    async fn a_client_that_reads_slowly_but_steadily_gets_the_whole_response() {
        let timeout = Duration::from_secs(1);
        let addr = start(Limits {
            header_read_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            write_timeout: timeout,
            max_connections: 1,
            max_per_source: 1,
        })
        .await;
        let mut slow = connect_with_receive_buffer(addr, 256 << 10).await;
        slow.write_all(GET_BIG).await.unwrap();
        let started = std::time::Instant::now();
        // At most 64 KiB every 10 ms, about 6 MiB/s: the 16 MiB take over 2.5 s to read, nearly
        // all of it with the server's writes waiting on this reader. The kernel wakes a waiting
        // writer only once about a third of its send buffer has drained, so each wait lasts
        // about 250 ms here (buffers up to Linux's default 4 MiB), well within the timeout.
        let mut every = tokio::time::interval(Duration::from_millis(10));
        let mut chunk = vec![0; 64 << 10];
        let mut got = Vec::new();
        loop {
            every.tick().await;
            let n = slow.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        let took = started.elapsed();
        let head_len = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a whole response head")
            + 4;
        assert!(got.starts_with(b"HTTP/1.1 200"));
        assert_eq!(got.len() - head_len, BIG, "the body was cut short");
        assert!(
            took > 2 * timeout,
            "read in {took:?}: too fast to tell a stall timeout from a deadline"
        );
    }

    /// Failed accepts pause 10 ms, doubling to 1 s while they go on, and not at all for a
    /// connection reset before it was accepted; an accept starts again from 10 ms.
    #[tokio::test(start_paused = true)]
    async fn failed_accepts_back_off_up_to_a_second() {
        let mut b = AcceptBackoff::new();
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        let t0 = tokio::time::Instant::now();
        b.failed("t", &reset).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        let mut pauses = Vec::new();
        for _ in 0..9 {
            let t = tokio::time::Instant::now();
            b.failed("t", &emfile).await;
            pauses.push(t.elapsed().as_millis());
        }
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.accepted();
        assert_eq!(b.pause(), ACCEPT_BACKOFF_MIN);
    }
}
