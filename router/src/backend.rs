//! A small inference-like HTTP/1.1 backend for the demo, tests and benchmarks.
//!
//! - `GET|POST /v1/completions[?tokens=N&delay_ms=D]` streams N tokens (default 16, at most 4096) as
//!   server-sent events in a chunked response, one every D milliseconds (default 2, at most 1000),
//!   ending with `data: [DONE]`. A POST body is read (at most 64 KiB) and ignored.
//! - `GET /healthz` answers `ok`.
//!
//! A client may shut down its write side once its request is sent (Tasman passes a client's FIN
//! on to the backend): the stream still runs to its end.
//!
//! Every response names the site and service that served it in `x-tasman-site` and
//! `x-tasman-service`, so a client can see where the fabric sent it.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Most tokens one request may ask for.
pub const MAX_TOKENS: usize = 4096;
/// Largest per-token delay a request may ask for.
pub const MAX_TOKEN_DELAY: Duration = Duration::from_secs(1);
/// Largest request body read.
const MAX_BODY: usize = 64 * 1024;

/// What a demo backend says about itself and how it streams by default.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// The site that runs it (`x-tasman-site`).
    pub site: String,
    /// The service it implements (`x-tasman-service`).
    pub service: String,
    /// Tokens per completion unless the request says otherwise.
    pub tokens: usize,
    /// Delay between tokens unless the request says otherwise.
    pub token_delay: Duration,
    /// How long a connection may take to send a request's headers (and may sit idle between
    /// requests) before it is closed.
    pub header_timeout: Duration,
}

impl BackendConfig {
    pub fn new(site: impl Into<String>, service: impl Into<String>) -> Self {
        BackendConfig {
            site: site.into(),
            service: service.into(),
            tokens: 16,
            token_delay: Duration::from_millis(2),
            header_timeout: Duration::from_secs(30),
        }
    }
}

struct Shared {
    cfg: BackendConfig,
    site: HeaderValue,
    service: HeaderValue,
    requests: AtomicU64,
}

/// A running demo backend. Dropping the handle stops it and closes its connections.
pub struct BackendHandle {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl BackendHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Completion requests served so far (health checks excluded).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    pub fn site(&self) -> &str {
        &self.shared.cfg.site
    }

    /// Stops accepting and closes every open connection.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Why a backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("site or service name {0:?} is not a valid header value")]
    BadName(String),
}

/// The demo backend.
pub struct DemoBackend;

impl DemoBackend {
    /// Listens on `listen` (port 0 for an ephemeral port) and serves until shut down.
    pub async fn spawn(
        listen: SocketAddr,
        cfg: BackendConfig,
    ) -> Result<BackendHandle, BackendError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| BackendError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| BackendError::Bind {
            addr: listen,
            source,
        })?;
        let site = HeaderValue::from_str(&cfg.site)
            .map_err(|_| BackendError::BadName(cfg.site.clone()))?;
        let service = HeaderValue::from_str(&cfg.service)
            .map_err(|_| BackendError::BadName(cfg.service.clone()))?;
        let shared = Arc::new(Shared {
            cfg,
            site,
            service,
            requests: AtomicU64::new(0),
        });
        let (shutdown, stop) = watch::channel(false);
        tokio::spawn(accept_loop(listener, shared.clone(), stop));
        Ok(BackendHandle {
            local_addr,
            shared,
            shutdown,
        })
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    // Connections live in the set: when the loop ends, dropping it aborts them all.
    let mut conns = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = stop.changed() => return,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => { tokio::time::sleep(Duration::from_millis(10)).await; continue; }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let header_timeout = shared.cfg.header_timeout;
        conns.spawn(async move {
            let svc = service_fn(move |req| handle(shared.clone(), req));
            // Half-closes allowed: a client's FIN (Tasman passes it on) arriving while a
            // completion streams would otherwise make hyper drop the connection mid-response.
            // hyper's header timeout needs a timer: without one it is off, and a client that
            // never finished its headers held its connection for good.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .half_close(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type RespBody = BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, shared: &Shared, body: &'static str) -> Response<RespBody> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert("x-tasman-site", shared.site.clone());
    h.insert("x-tasman-service", shared.service.clone());
    resp
}

/// Reads `key=value` from a query string.
fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let path = req.uri().path();
    let method = req.method().clone();
    if path == "/healthz" {
        return Ok(text(StatusCode::OK, &shared, "ok\n"));
    }
    if path != "/v1/completions" {
        return Ok(text(
            StatusCode::NOT_FOUND,
            &shared,
            "not found: try /v1/completions or /healthz\n",
        ));
    }
    if method != Method::GET && method != Method::POST {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            &shared,
            "use GET or POST\n",
        ));
    }
    let query = req.uri().query().unwrap_or("");
    let tokens = match query_param(query, "tokens").map(str::parse::<usize>) {
        None => shared.cfg.tokens,
        Some(Ok(n)) if n <= MAX_TOKENS => n,
        Some(_) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                &shared,
                "tokens must be an integer 0..=4096\n",
            ));
        }
    };
    let delay = match query_param(query, "delay_ms").map(str::parse::<u64>) {
        None => shared.cfg.token_delay,
        Some(Ok(ms)) if Duration::from_millis(ms) <= MAX_TOKEN_DELAY => Duration::from_millis(ms),
        Some(_) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                &shared,
                "delay_ms must be an integer 0..=1000\n",
            ));
        }
    };
    // The prompt is not used; read it (bounded in size, and in time as the headers are: a body
    // that stops short of its length held the connection for good) so that the connection
    // stays reusable.
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(shared.cfg.header_timeout, body).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Ok(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &shared,
                "request body over 64 KiB\n",
            ));
        }
        // The body ended short of its length (the client's end came first), or its connection
        // failed: no size to blame.
        Ok(Err(_)) => {
            let mut resp = text(
                StatusCode::BAD_REQUEST,
                &shared,
                "request body ended before its length\n",
            );
            resp.headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(resp);
        }
        Err(_) => {
            let mut resp = text(
                StatusCode::REQUEST_TIMEOUT,
                &shared,
                "request body not received in time\n",
            );
            resp.headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(resp);
        }
    }
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let mut resp = Response::new(TokenBody::new(tokens, delay).boxed());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert("x-tasman-site", shared.site.clone());
    h.insert("x-tasman-service", shared.service.clone());
    Ok(resp)
}

/// Words the demo "model" emits, in turn.
const WORDS: &[&str] = &[
    "The",
    " nearest",
    " healthy",
    " site",
    " answered",
    " this",
    " request",
    " over",
    " QUIC",
    ",",
    " hop",
    " by",
    " hop",
    ",",
    " from",
    " the",
    " edge",
    ".",
];

/// A chunked body that yields one SSE token frame per `delay`, then `[DONE]`.
struct TokenBody {
    next: usize,
    total: usize,
    delay: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    done: bool,
}

impl TokenBody {
    fn new(total: usize, delay: Duration) -> Self {
        TokenBody {
            next: 0,
            total,
            delay,
            sleep: None,
            done: false,
        }
    }
}

impl Body for TokenBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.next >= self.total {
            self.done = true;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b"data: [DONE]\n\n",
            )))));
        }
        // The first token goes out at once (time to first byte is the network's), later ones
        // after the per-token delay.
        if self.next > 0 && !self.delay.is_zero() {
            let delay = self.delay;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        let i = self.next;
        self.next += 1;
        let word = WORDS[i % WORDS.len()];
        let frame = format!("data: {{\"index\":{i},\"token\":\"{word}\"}}\n\n");
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(frame)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start() -> BackendHandle {
        let cfg = BackendConfig {
            tokens: 5,
            token_delay: Duration::from_millis(1),
            ..BackendConfig::new("syd-site", "llm")
        };
        DemoBackend::spawn("127.0.0.1:0".parse().expect("literal"), cfg)
            .await
            .expect("spawn backend")
    }

    /// Sends `request` (unfinished) to a backend whose header timeout is 300 ms and reads until
    /// the backend closes, within 10 s: what came back, or `None` while the connection is open.
    async fn unfinished_request(request: &[u8]) -> Option<String> {
        let cfg = BackendConfig {
            header_timeout: Duration::from_millis(300),
            ..BackendConfig::new("syd-site", "llm")
        };
        let b = DemoBackend::spawn("127.0.0.1:0".parse().expect("literal"), cfg)
            .await
            .expect("spawn backend");
        let mut s = TcpStream::connect(b.local_addr()).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut out = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        closed
            .is_ok()
            .then(|| String::from_utf8_lossy(&out).into_owned())
    }

    /// A connection that never finishes its request's headers is closed after the header
    /// timeout (hyper's was off without a timer: it was held for good).
    #[tokio::test]
    async fn a_request_whose_headers_never_end_is_closed() {
        let closed = unfinished_request(b"GET /v1/completions HTTP/1.1\r\nhost: x\r\n").await;
        assert!(closed.is_some(), "the connection is still open");
    }

    /// A request whose body stops short of its length is answered 408 and its connection
    /// closed after the header timeout. (The body was read without a time limit: the
    /// connection, and through a fabric a site's slot, was held for good.)
    #[tokio::test]
    async fn a_request_whose_body_never_ends_is_answered_and_closed() {
        let out = unfinished_request(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nhi",
        )
        .await
        .expect("the connection is still open");
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    }

    /// A body cut short by the client's end (it half-closes after 2 of 100 bytes) is answered
    /// 400, not 413: nothing was too large. A body over the limit is still 413.
    #[tokio::test]
    async fn a_body_cut_short_is_a_bad_request_and_one_too_large_413() {
        let b = start().await;
        let out = half_closed(
            b.local_addr(),
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nhi",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");

        let mut s = TcpStream::connect(b.local_addr()).await.expect("connect");
        let big = 65 * 1024;
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {big}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("write");
        // The answer may come (and the connection close) before the whole body is sent.
        let _ = s.write_all(&vec![b'x'; big]).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    }

    /// Sends `request` as it is, shuts down the write side (as Tasman passes a client's FIN
    /// on), and returns all that comes back until the backend closes, within 10 s.
    async fn half_closed(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("answered and closed within 10 s")
            .expect("read");
        String::from_utf8(out).expect("utf-8 response")
    }

    /// Sends one raw HTTP/1.1 request with `Connection: close` and returns the whole response.
    async fn fetch(addr: SocketAddr, request_line: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "{request_line} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("in time")
            .expect("read");
        String::from_utf8(out).expect("utf-8 response")
    }

    #[tokio::test]
    async fn completions_stream_the_requested_tokens_and_name_the_site() {
        let b = start().await;
        let resp = fetch(b.local_addr(), "POST /v1/completions?tokens=3").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.contains("x-tasman-site: syd-site"), "{resp}");
        assert!(resp.contains("transfer-encoding: chunked"), "{resp}");
        assert_eq!(resp.matches("\"token\"").count(), 3, "{resp}");
        assert!(resp.contains("data: [DONE]"), "{resp}");
        assert_eq!(b.requests(), 1);
        let resp = fetch(b.local_addr(), "GET /v1/completions").await;
        assert_eq!(
            resp.matches("\"token\"").count(),
            5,
            "default token count: {resp}"
        );
    }

    /// A client that sends its request and then shuts down its write side (as Tasman passes a
    /// client's FIN on to the backend) still gets the whole stream: hyper's server drops a
    /// connection that reads EOF in the middle of a response unless half-closes are allowed.
    #[tokio::test]
    async fn a_client_that_half_closes_after_its_request_gets_the_whole_stream() {
        let b = start().await;
        let resp = half_closed(
            b.local_addr(),
            b"GET /v1/completions?tokens=20&delay_ms=10 HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert_eq!(resp.matches("\"token\"").count(), 20, "{resp}");
        assert!(resp.contains("data: [DONE]"), "{resp}");
    }

    #[tokio::test]
    async fn healthz_answers_and_bad_requests_are_refused() {
        let b = start().await;
        let resp = fetch(b.local_addr(), "GET /healthz").await;
        assert!(
            resp.starts_with("HTTP/1.1 200") && resp.ends_with("ok\n"),
            "{resp}"
        );
        let resp = fetch(b.local_addr(), "GET /v1/completions?tokens=99999").await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        let resp = fetch(b.local_addr(), "GET /nope").await;
        assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
        assert_eq!(b.requests(), 0);
    }

    #[tokio::test]
    async fn shutdown_closes_the_listener() {
        let b = start().await;
        let addr = b.local_addr();
        b.shutdown();
        let mut refused = false;
        for _ in 0..200 {
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "backend still accepting after shutdown");
    }
}
