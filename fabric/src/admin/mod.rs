//! The admin API: HTTP/JSON for the `tasman` CLI, every route behind a bearer token (the
//! admin token; the read-only one is served GET and HEAD only).
//!
//! Routes are grouped per module (`topology`, `status`; circuits add theirs) and merged in
//! [`router()`]; authentication and the body limit wrap the whole set, so a module cannot add an
//! unauthenticated route by accident. Every refusal is an [`ApiError`] JSON body, whoever makes
//! it: a handler, axum before any handler ([`json_errors`]) or the accept loop
//! ([`json_refusal`]). The controller's Prometheus `/metrics`, which needs no token, is
//! therefore not here: it has a listener of its own ([`crate::controller::metrics`]).
//!
//! | method | path | |
//! |---|---|---|
//! | GET | /v1/topology | the topology in force, text as applied |
//! | GET | /v1/topology/versions/{v} | one version |
//! | GET | /v1/topology/history?limit=N | newest first (N from 1, at most 10,000), metadata only: size and SHA-256 of each text, not the text |
//! | POST | /v1/topology | apply (or dry-run) `{text, dry_run, message, author, base_version}` |
//! | POST | /v1/topology/rollback | `{version, message, author, dry_run, base_version}` |
//! | GET | /v1/status | routers, per-service choices, RTT matrix |
//! | GET | /v1/rtt | the RTT matrix alone (per link: smoothed RTT, declared latency, weight, up, sample age) |
//!
//! A query parameter a route does not take (only `history` takes `limit` and `before`, and the
//! circuit lists `limit` and `after`) is refused with 400 naming it ([`NoQuery`]), as an unknown
//! field of a request body is refused with 422.

pub mod status;
pub mod topology;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper_util::service::TowerToHyperService;
use router::http_serve;
use serde::Serialize;

use crate::controller::{Controller, ControllerError};

/// Largest request body: a topology document (the loader's own bound) plus JSON overhead.
pub const MAX_BODY: usize = ::topology::MAX_DOCUMENT_BYTES * 2 + 64 * 1024;

/// Shared by every handler.
#[derive(Clone)]
pub struct AdminState {
    pub ctl: Arc<Controller>,
    pub circuits: Arc<crate::circuits::service::CircuitService>,
    token: Arc<str>,
    /// A token that serves GET and HEAD requests only (empty: none).
    read_token: Arc<str>,
    /// The `GET /v1/status` build that calls share.
    pub status_builds: Arc<status::StatusBuilds>,
    /// Permits for changes running to completion ([`to_completion`]).
    changes: Changes,
    #[cfg(test)]
    status_gate: Arc<Gate>,
}

impl AdminState {
    pub fn new(
        ctl: Arc<Controller>,
        token: &str,
        circuits: Arc<crate::circuits::service::CircuitService>,
    ) -> Self {
        AdminState {
            ctl,
            circuits,
            token: Arc::from(token.trim()),
            read_token: Arc::from(""),
            status_builds: Arc::default(),
            changes: Changes::new(MAX_CHANGE_WAIT),
            #[cfg(test)]
            status_gate: Arc::default(),
        }
    }

    /// Also serves GET and HEAD requests (reads) to a client with `token`; any other method
    /// with it is refused with 403.
    pub fn with_read_token(mut self, token: &str) -> Self {
        self.read_token = Arc::from(token.trim());
        self
    }
}

/// Test-only: once armed by [`hold`](Gate::hold), the next [`pass`](Gate::pass) waits until
/// released, for at most [`Gate::HOLD`] (a step that holds a test runtime's only thread must
/// not hang the test), and a hold that ran out is recorded in `expired`. Holds a status build
/// ([`status::build`]) or a test store's read or write.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Gate {
    armed: std::sync::Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
    pub(crate) expired: std::sync::atomic::AtomicBool,
}

#[cfg(test)]
impl Gate {
    pub(crate) const HOLD: std::time::Duration = std::time::Duration::from_secs(10);

    /// Holds the next pass; returns (entered, release).
    pub(crate) fn hold(&self) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel();
        *self.armed.lock().unwrap() = Some((entered_tx, release_rx));
        (entered_rx, release_tx)
    }

    pub(crate) fn pass(&self) {
        let armed = self.armed.lock().unwrap().take();
        if let Some((entered, release)) = armed {
            let _ = entered.send(());
            if release.recv_timeout(Self::HOLD).is_err() {
                self.expired
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
}

/// Every admin route; a module with its own routes adds a `.merge(...)` line here.
pub fn router(state: AdminState) -> axum::Router {
    axum::Router::new()
        .merge(topology::routes())
        .merge(status::routes())
        .merge(crate::circuits::api::routes())
        .layer(middleware::from_fn_with_state(
            state.changes.clone(),
            to_completion,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

/// Bounds on the admin API's connections. Each is open to the network before authentication
/// (the token is checked per request), so a client must not hold them forever, or any number.
pub use router::http_serve::Limits as ServeLimits;

/// The admin API's [`ServeLimits`]: the shared timeouts, 256 connections at once, 32 of them
/// from one address (operators on one bastion host share its address).
pub const DEFAULT_LIMITS: ServeLimits = ServeLimits {
    header_read_timeout: http_serve::HEADER_READ_TIMEOUT,
    body_read_timeout: http_serve::BODY_READ_TIMEOUT,
    write_timeout: http_serve::WRITE_TIMEOUT,
    max_connections: 256,
    max_per_source: 32,
};

/// Serves the admin API on `listener` with [`DEFAULT_LIMITS`] until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: AdminState) {
    serve_with(listener, state, DEFAULT_LIMITS).await
}

/// Serves the admin API on `listener` within `limits` until the task is dropped (its connections
/// with it). HTTP/1.1 through [`http_serve::serve`]: `axum::serve` sets no header-read timeout
/// and takes any number of connections.
pub async fn serve_with(listener: tokio::net::TcpListener, state: AdminState, limits: ServeLimits) {
    let service = TowerToHyperService::new(router(state));
    http_serve::serve_with_refusal(listener, "admin", limits, json_refusal, service).await
}

/// The answers the accept loop gives on its own (408: a body not received within
/// [`ServeLimits::body_read_timeout`]) as an [`ApiError`], like every other refusal.
fn json_refusal(status: StatusCode, reason: &str) -> (&'static str, Bytes) {
    (
        "application/json",
        Bytes::from(ApiError::new(status, reason).json()),
    )
}

/// The longest body of a non-JSON refusal [`json_errors`] rewords (axum's are one line);
/// beyond it the status's name stands for it.
const MAX_REFUSAL_TEXT: usize = 64 * 1024;

/// Rewords a refusal that is not JSON as an [`ApiError`] with its text as the `error`: axum's
/// extractors and router refuse in plain text, or with no body, before any handler runs (413: a
/// body over [`MAX_BODY`]; 400: malformed JSON; 415: not declared JSON; 422: JSON of the wrong
/// shape; 404, 405). The status and the other headers stay.
pub(crate) async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, MAX_REFUSAL_TEXT).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let error = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("refused")
            .to_lowercase()
    } else {
        text
    };
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, ApiError::new(status, error).json().into())
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Constant-time comparison: the token must not leak through timing, its length included
/// (an operator's `--admin-token-file` may hold any length up to its 4 KiB). The SHA-256 digests of both are
/// compared, all 32 bytes whatever the inputs.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    use sha2::Digest;
    let (g, e) = (sha2::Sha256::digest(given), sha2::Sha256::digest(expected));
    g.iter()
        .zip(e.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// The token of an `Authorization: Bearer <token>` value. The scheme's name is
/// case-insensitive and may be followed by more than one space (RFC 9110 11.1, RFC 6750 2.1):
/// `bearer tok` from a client library is the token `tok`, not a refusal.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn auth(State(st): State<AdminState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    let is = |expected: &str, t: &str| {
        !expected.is_empty() && token_matches(t.trim().as_bytes(), expected.as_bytes())
    };
    match given {
        Some(t) if is(&st.token, t) => next.run(req).await,
        Some(t) if is(&st.read_token, t) => {
            if matches!(*req.method(), Method::GET | Method::HEAD) {
                next.run(req).await
            } else {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "this token is read-only (the controller's admin-read-token): a change needs \
                     the admin token",
                )
                .into_response()
            }
        }
        _ => {
            let mut refused = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (see --token / TASMAN_TOKEN)",
            )
            .into_response();
            // No keep-alive for a client without the token: it would hold its slot with a
            // request every few seconds, each restarting the header timeout.
            refused.headers_mut().insert(
                header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            refused
        }
    }
}

/// Runs every request that may change the controller's state (any method but GET and HEAD) as a
/// task of its own, so that its handler runs to its end whatever the client does. hyper drops a
/// request's handler when the client closes its connection, and a change dropped between its
/// store commit and what follows (the controller taking up the new topology and distributing it,
/// circuits published and tracked) would leave the store ahead of what the controller serves
/// until it restarts: routers would not get the committed version, and circuit operations, which
/// check that the two agree, would fail until then.
///
/// At most [`MAX_CHANGES_RUNNING`] such tasks run at once; a request beyond waits for a permit
/// while its client waits (its body unread), and one whose client goes away meanwhile is dropped
/// having started nothing. Without the bound, a client that sent a large apply and hung up,
/// again and again, left a detached task per request, each holding its body and a copy of its
/// text while queued for the apply lock: memory without limit, the connection bounds no help.
async fn to_completion(State(changes): State<Changes>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let queued = Queued::enter(&changes.waiting);
    let permit = match tokio::time::timeout(changes.wait, changes.permits.acquire_owned()).await {
        Ok(Ok(permit)) => {
            drop(queued);
            permit
        }
        // Waited long enough (the request's body, unread meanwhile, has a deadline of its
        // own), or closed.
        _ => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{MAX_CHANGES_RUNNING} changes are running and none ended within {:?}: try \
                     again",
                    changes.wait
                ),
            )
            .into_response();
        }
    };
    tokio::spawn(async move {
        let r = next.run(req).await;
        drop(permit);
        r
    })
    .await
    .unwrap_or_else(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, crate::internal(e)).into_response()
    })
}

/// Most changes (requests other than GET and HEAD) running at once: applies are serialised by
/// the controller anyway, and a circuit operation takes a write transaction; more would only
/// queue, each holding its request.
pub const MAX_CHANGES_RUNNING: usize = 8;

/// How long a change waits for one of the [`MAX_CHANGES_RUNNING`] to end before it is answered
/// 503 (`Retry-After: 1`): within the 30 s its body has to arrive, which starts with its headers
/// and is not read while it waits.
pub const MAX_CHANGE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The permits of [`to_completion`] and how long a change waits for one.
#[derive(Clone)]
struct Changes {
    permits: Arc<tokio::sync::Semaphore>,
    wait: std::time::Duration,
    /// Changes waiting for a permit now (their requests dropped when their clients go).
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

impl Changes {
    fn new(wait: std::time::Duration) -> Changes {
        Changes {
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_CHANGES_RUNNING)),
            wait,
            waiting: Arc::default(),
        }
    }
}

/// One change counted in [`Changes::waiting`] until dropped.
struct Queued<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Queued<'a> {
    fn enter(n: &'a std::sync::atomic::AtomicUsize) -> Queued<'a> {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Queued(n)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Most [`off_workers`] tasks running at once.
pub const MAX_READS_RUNNING: usize = 16;

/// The permits of [`off_workers`].
static READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_READS_RUNNING);

/// Runs `f`, a handler's store reads or heavy computation, on tokio's blocking pool. A read that
/// waits on a slow disk, or a computation that takes seconds, then holds a blocking thread
/// instead of one of the runtime's workers, which also serve the routers' control sessions and
/// every other request. The GET handlers that read the store, circuits' validate and the status
/// (a routing table per edge) run through here; the controller's and circuits' write
/// transactions run in `spawn_blocking` themselves.
///
/// At most [`MAX_READS_RUNNING`] run at once; a call waits for a permit before its task starts,
/// and the task holds it to its end. A blocking task cannot be cancelled: a client that hangs
/// up after its request (hyper then drops the handler) left its read running, so a client
/// asking for a 16 MiB version and hanging up in a loop, never holding more than one
/// connection, piled up reads without bound (each holding its decoded record, 512 blocking
/// threads and a queue behind them), and the store's writes, which share that pool, behind
/// them. One dropped while it waits never starts.
pub(crate) async fn off_workers<R, E>(
    f: impl FnOnce() -> Result<R, E> + Send + 'static,
) -> Result<R, ApiError>
where
    R: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    // Never closed.
    let Ok(permit) = READS.acquire().await else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping".to_string(),
        ));
    };
    let task = move || {
        let r = f();
        drop(permit);
        r
    };
    match tokio::task::spawn_blocking(task).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            crate::internal(e),
        )),
    }
}

/// Most bytes of large answers (a topology version's text, a page of history) waiting to be
/// sent at once, over every connection. An answer holds its share until hyper has sent its last
/// byte (its body dropped), not only while it was read ([`off_workers`]'s permit ends there): a
/// client reading at a few KiB/s held each 32 MiB answer for minutes, and 256 connections with
/// the read-only token could pin 8 GiB.
pub const MAX_ANSWER_BYTES_HELD: usize = 256 << 20;

/// What a permit of [`ANSWERS`] stands for.
const ANSWER_UNIT: usize = 1024;

/// The budget of [`MAX_ANSWER_BYTES_HELD`], in [`ANSWER_UNIT`]s.
static ANSWERS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_ANSWER_BYTES_HELD / ANSWER_UNIT);

/// `v` as a JSON answer holding its size of [`MAX_ANSWER_BYTES_HELD`] until it has been sent;
/// a 503 (`Retry-After: 1`, nothing was changed) when the budget is spent.
pub(crate) fn held_json<T: Serialize>(v: &T) -> Result<Response, ApiError> {
    held_json_in(&ANSWERS, MAX_ANSWER_BYTES_HELD / ANSWER_UNIT, v)
}

/// A JSON answer already encoded, held as [`held_json`]'s.
pub(crate) fn held_body(body: impl Into<Bytes>) -> Result<Response, ApiError> {
    Ok(SharedAnswer::new(body.into())?.response())
}

/// [`held_json`] against `budget`, of `units` [`ANSWER_UNIT`]s.
fn held_json_in<T: Serialize>(
    budget: &'static tokio::sync::Semaphore,
    units: usize,
    v: &T,
) -> Result<Response, ApiError> {
    let body = serde_json::to_vec(v).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal: encoding the answer: {e}"),
        )
    })?;
    Ok(shared_in(budget, units, body.into())?.response())
}

/// An answer built once for several calls (`/v1/status`'s calls that share a build), holding
/// its size of [`MAX_ANSWER_BYTES_HELD`] once, until the last of its bodies is dropped.
#[derive(Clone)]
pub(crate) struct SharedAnswer {
    body: Bytes,
    held: Arc<tokio::sync::SemaphorePermit<'static>>,
}

impl SharedAnswer {
    /// `body` with its share of the budget; a 503 when the budget is spent.
    pub(crate) fn new(body: Bytes) -> Result<SharedAnswer, ApiError> {
        shared_in(&ANSWERS, MAX_ANSWER_BYTES_HELD / ANSWER_UNIT, body)
    }

    /// The answer to one call: the bytes, not copied, handed out as [`Held`] does.
    pub(crate) fn response(&self) -> Response {
        let body = Held {
            rest: self.body.clone(),
            _held: self.held.clone(),
        };
        (
            [(header::CONTENT_TYPE, "application/json")],
            axum::body::Body::new(body),
        )
            .into_response()
    }
}

/// [`SharedAnswer::new`] against `budget`, of `units` [`ANSWER_UNIT`]s.
fn shared_in(
    budget: &'static tokio::sync::Semaphore,
    units: usize,
    body: Bytes,
) -> Result<SharedAnswer, ApiError> {
    // An answer larger than the whole budget takes all of it.
    let need = body.len().div_ceil(ANSWER_UNIT).clamp(1, units);
    let held = u32::try_from(need)
        .ok()
        .and_then(|n| budget.try_acquire_many(n).ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "too many large answers are being sent ({} MiB at most at once): try again",
                    (units * ANSWER_UNIT) >> 20
                ),
            )
        })?;
    Ok(SharedAnswer {
        body,
        held: Arc::new(held),
    })
}

/// An answer's body with its share of [`MAX_ANSWER_BYTES_HELD`], given back when hyper drops
/// it: handed to hyper [`HELD_CHUNK`] bytes at a time, as its write buffer drains, so that it is
/// dropped once the last chunk is taken, near the end of the sending (or when the connection is
/// gone). (In one frame, hyper took it all into its own buffer and dropped the body at once:
/// the share went back before a slow client had read a byte.)
struct Held {
    rest: Bytes,
    _held: Arc<tokio::sync::SemaphorePermit<'static>>,
}

/// The most bytes of a [`Held`] answer handed to hyper at a time (a slice, not a copy).
const HELD_CHUNK: usize = 64 * 1024;

impl hyper::body::Body for Held {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let n = self.rest.len().min(HELD_CHUNK);
        std::task::Poll::Ready((n > 0).then(|| Ok(hyper::body::Frame::data(self.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// The query of a route that takes none (every route but `GET /v1/topology/history`): a
/// parameter is refused (400, naming it) rather than ignored, as an unknown field of a request
/// body is. A client that believes it asked for something (`?dry_run=true` on an apply) must not
/// get something else. Each handler extracts it first, so that it is what refuses such a request.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoQuery {}

/// A query parameter counting `what`: a decimal number; one too large for a `usize` is as
/// large as one can be (a limit over its maximum counts as the maximum, as documented).
pub(crate) fn capped_count<'de, D: serde::Deserializer<'de>>(
    d: D,
    what: &str,
) -> Result<Option<usize>, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(serde::de::Error::custom(format!(
            "{s:?} is not a number of {what}"
        )));
    }
    Ok(Some(s.parse().unwrap_or(usize::MAX)))
}

/// A page's `limit` as a route takes it: at most `max` of `what` (a larger one counts as
/// `max`, as documented); 0 is refused (400), as the CLI's `--limit` refuses it: no caller means
/// to list nothing. `None` when not given.
pub(crate) fn page_limit(
    limit: Option<usize>,
    what: &str,
    max: usize,
) -> Result<Option<usize>, ApiError> {
    match limit {
        Some(0) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("query parameter `limit` is 0: expected a number of {what} from 1 to {max}"),
        )),
        l => Ok(l.map(|n| n.min(max))),
    }
}

/// Whether `token` (trimmed) can be a bearer token: printable ASCII and spaces. The controller
/// reads any other header value as no token at all; the controller's token files and the
/// CLI's tokens are both held to it.
pub fn sendable_token(token: &str) -> bool {
    token.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}

/// The most bytes a token file may hold (a token is tens of characters; with its line breaks
/// and spaces, far less than this).
pub const MAX_TOKEN_FILE: u64 = 4096;

/// The text of the token file at `path`, refused when over [`MAX_TOKEN_FILE`] bytes: `/dev/zero`
/// or a log file named by mistake is read no further (read whole, it grew the process until
/// it was killed, before any timeout ran), and no megabyte is taken as a token.
pub fn read_token_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_TOKEN_FILE + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("over {MAX_TOKEN_FILE} bytes: not a token file"),
        ));
    }
    Ok(text)
}

/// The JSON error body of every refused request.
#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub error: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<Diag>,
}

impl ApiError {
    pub fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        ApiError {
            status,
            error: msg.into(),
            diagnostics: Vec::new(),
        }
    }

    /// The JSON body, for answers built outside axum's `Json`.
    fn json(&self) -> Vec<u8> {
        // Strings and numbers only: encoding cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    /// A 503 says when to try again (`Retry-After: 1`): nothing was changed.
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(&self)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        r
    }
}

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> Self {
        let status = match &e {
            ControllerError::Invalid(_) | ControllerError::TooLarge { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ControllerError::Conflict { .. } => StatusCode::CONFLICT,
            ControllerError::NoSuchVersion(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let msg = e.to_string();
        let diagnostics = match e {
            ControllerError::Invalid(d) => d.iter().map(Diag::from).collect(),
            _ => Vec::new(),
        };
        ApiError {
            status,
            error: msg,
            diagnostics,
        }
    }
}

/// A loader diagnostic as JSON: 1-based line and column (0 when about the whole document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Diag {
    pub line: usize,
    pub column: usize,
    pub severity: String,
    pub message: String,
}

impl From<&::topology::Diagnostic> for Diag {
    fn from(d: &::topology::Diagnostic) -> Self {
        Diag {
            line: d.line,
            column: d.column,
            severity: d.severity.to_string(),
            message: d.message.clone(),
        }
    }
}

impl Diag {
    /// `FILE:LINE:COL: severity: message`, as the loader prints it; a problem with the whole
    /// document (line 0) as `FILE: severity: message`.
    pub fn display(&self, file: &str) -> String {
        if self.line == 0 {
            format!("{file}: {}: {}", self.severity, self.message)
        } else {
            format!(
                "{file}:{}:{}: {}: {}",
                self.line, self.column, self.severity, self.message
            )
        }
    }
}

#[cfg(test)]
mod tests {
    /// The circuit service of `ctl`, as the controller's daemon makes it.
    fn circuits_of(ctl: &Arc<Controller>) -> Arc<crate::circuits::service::CircuitService> {
        crate::circuits::service::CircuitService::new(
            ctl.clone(),
            crate::circuits::service::DEFAULT_PROVISION_TIMEOUT,
        )
        .unwrap()
    }

    /// Serves `state` on a loopback port: its address, and the server's task.
    async fn serve_on_loopback(state: AdminState) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, tokio::spawn(serve(listener, state)))
    }
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// An answer holds its size of the budget until its body is dropped (sent, or the client
    /// gone), not only while it was built: past the budget, a 503 that says to try again.
    #[tokio::test]
    async fn a_large_answer_holds_its_bytes_until_it_has_been_sent() {
        static BUDGET: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(100);
        let big = "x".repeat(60 * ANSWER_UNIT);
        let first = held_json_in(&BUDGET, 100, &big).unwrap();
        assert_eq!(
            BUDGET.available_permits(),
            100 - 61,
            "60 KiB and its quotes"
        );
        let err = held_json_in(&BUDGET, 100, &big).unwrap_err();
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE, "{}", err.error);
        // Sent: the body read to its end, then dropped, as hyper does.
        let body = axum::body::to_bytes(first.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(body.len(), big.len() + 2);
        assert_eq!(BUDGET.available_permits(), 100);
        let second = held_json_in(&BUDGET, 100, &big).unwrap();
        // One larger than the whole budget takes all of it (and is not refused for good).
        drop(second);
        let huge = "x".repeat(200 * ANSWER_UNIT);
        let all = held_json_in(&BUDGET, 100, &huge).unwrap();
        assert_eq!(BUDGET.available_permits(), 0);
        drop(all);
        assert_eq!(BUDGET.available_permits(), 100);
    }

    /// An answer shared by several calls holds its size once, until the last of its bodies
    /// is dropped.
    #[tokio::test]
    async fn a_shared_answer_holds_its_size_once_until_its_last_body_goes() {
        static BUDGET: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(100);
        let shared = shared_in(&BUDGET, 100, Bytes::from(vec![b'x'; 60 * ANSWER_UNIT])).unwrap();
        let (a, b) = (shared.response(), shared.response());
        assert_eq!(BUDGET.available_permits(), 40, "held once for both");
        drop(shared);
        drop(a);
        assert_eq!(BUDGET.available_permits(), 40, "one body still to send");
        let body = axum::body::to_bytes(b.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(body.len(), 60 * ANSWER_UNIT);
        assert_eq!(BUDGET.available_permits(), 100);
    }

    /// Served by hyper to a client that does not read, an answer keeps its share until the
    /// client has taken it: hyper asks for the body a chunk at a time as its buffer drains. (A
    /// body of one frame was dropped as hyper took it, the share given back at once.)
    #[tokio::test]
    async fn a_slow_client_holds_its_answers_share_until_it_read_it() {
        const UNITS: usize = 64 * 1024; // 64 MiB
        static BUDGET: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(UNITS);
        let big = std::sync::Arc::new("x".repeat(32 << 20));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let svc = hyper::service::service_fn(move |_req| {
                let big = big.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(held_json_in(&BUDGET, UNITS, &*big).unwrap())
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 1024];
        let mut got = c.read(&mut head).await.unwrap();
        assert!(head.starts_with(b"HTTP/1.1 200"), "{:?}", &head[..got]);
        let held = UNITS - BUDGET.available_permits();
        assert!(held >= 32 * 1024, "the answer's share: {held} KiB");
        // The client reads nothing more for a while: the share stays taken (the kernel's
        // buffers and hyper's hold a few MiB of the 32).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            UNITS - BUDGET.available_permits(),
            held,
            "given back unread"
        );
        // Read to the end: given back.
        let mut buf = vec![0u8; 1 << 20];
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < (32 << 20) && Instant::now() < deadline {
            got += c.read(&mut buf).await.unwrap();
        }
        while BUDGET.available_permits() < UNITS && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(BUDGET.available_permits(), UNITS, "given back once read");
        server.abort();
    }
    use crate::store::redb::RedbStore;
    use crate::store::{self, Store, StoreError};

    /// At most `MAX_READS_RUNNING` reads run off the workers at once, however many requests
    /// ask; a read whose request was dropped while it waited for its turn never runs. (Each
    /// ran at once on the blocking pool, to its end: a client that asked and hung up in a loop
    /// piled up reads without bound.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_off_the_workers_are_bounded_and_a_dropped_one_never_starts() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let mut reads = Vec::new();
        for _ in 0..4 * MAX_READS_RUNNING {
            let (running, most, release_rx) = (running.clone(), most.clone(), release_rx.clone());
            reads.push(tokio::spawn(off_workers(move || {
                let now = running.fetch_add(1, SeqCst) + 1;
                most.fetch_max(now, SeqCst);
                let _ = release_rx.lock().unwrap().recv();
                running.fetch_sub(1, SeqCst);
                Ok::<_, ApiError>(())
            })));
        }
        // As many as may run are running (other tests' reads may hold permits for a moment).
        let deadline = Instant::now() + Duration::from_secs(20);
        while running.load(SeqCst) < MAX_READS_RUNNING {
            assert!(
                Instant::now() < deadline,
                "{} running",
                running.load(SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // One more, dropped while it waits for its turn: polled once (every permit is taken, so
        // it waits), then dropped.
        let ran = Arc::new(AtomicBool::new(false));
        {
            let ran = ran.clone();
            let mut dropped = std::pin::pin!(off_workers(move || {
                ran.store(true, SeqCst);
                Ok::<_, ApiError>(())
            }));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(
                dropped.as_mut().poll(&mut cx).is_pending(),
                "no permit was free"
            );
        }
        for _ in 0..4 * MAX_READS_RUNNING {
            release_tx.send(()).unwrap();
        }
        for r in reads {
            r.await.unwrap().unwrap();
        }
        assert_eq!(most.load(SeqCst), MAX_READS_RUNNING, "most running at once");
        // Anything it started would have run by now.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            assert!(!ran.load(SeqCst), "a read dropped while it waited ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// An edge and a site `latency` apart.
    fn yaml(latency: &str) -> String {
        format!(
            "version: 1\nnodes:\n  \
             - {{id: e, kind: edge, region: r, country: AU, location: {{lat: 0, lon: 0}}, \
             address: \"127.0.0.1:7000\", client_address: \"127.0.0.1\"}}\n  \
             - {{id: s, kind: site, region: r, country: AU, location: {{lat: 0, lon: 0}}, \
             address: \"127.0.0.2:7000\", serves: [{{service: chat, backend: \"127.0.0.9:9000\", capacity: 10}}]}}\n\
             links:\n  - {{a: e, b: s, latency: {latency}, capacity: 1Gbps}}\n\
             services:\n  - {{name: chat, port: 8080}}\n"
        )
    }

    /// A store whose next write or read, once its gate is held, waits until released (for at
    /// most [`Gate::HOLD`]).
    struct GatedStore {
        inner: RedbStore,
        /// Holds the next write once armed (what a slow fsync looks like from the controller).
        write_gate: Gate,
        /// Holds the next read once armed (a slow disk); `read_gate.expired` says a held read
        /// went on by itself.
        read_gate: Gate,
    }

    fn gated(dir: &std::path::Path) -> GatedStore {
        GatedStore {
            inner: RedbStore::open(dir).unwrap(),
            write_gate: Gate::default(),
            read_gate: Gate::default(),
        }
    }

    impl Store for GatedStore {
        fn read(
            &self,
            f: &mut dyn FnMut(&dyn store::ReadTxn) -> Result<(), StoreError>,
        ) -> Result<(), StoreError> {
            self.read_gate.pass();
            self.inner.read(f)
        }
        fn write(
            &self,
            f: &mut dyn FnMut(&mut dyn store::WriteTxn) -> Result<(), StoreError>,
        ) -> Result<(), StoreError> {
            self.write_gate.pass();
            self.inner.write(f)
        }
    }

    /// Sends `req` with `gate` held and waits until the request reaches it (`what` names it);
    /// meanwhile a request that needs nothing held (`GET /v1/topology`) must be answered.
    /// Then releases the gate and returns `req`'s response.
    async fn answered_around(addr: SocketAddr, req: String, gate: &Gate, what: &str) -> String {
        let (entered, release) = gate.hold();
        let slow = tokio::spawn(async move { exchange(addr, &req).await });
        let entered =
            tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(20)))
                .await
                .unwrap();
        assert!(entered.is_ok(), "{what} did not reach the held step");
        let other = exchange(addr, &get("/v1/topology", "tok")).await;
        assert!(other.starts_with("HTTP/1.1 200"), "{other}");
        let _ = release.send(());
        slow.await.unwrap()
    }

    /// Sends `req` and returns the whole response (the request asks for `connection: close`).
    async fn exchange(addr: SocketAddr, req: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut got))
            .await
            .expect("no response within 20 s")
            .unwrap();
        String::from_utf8_lossy(&got).into_owned()
    }

    fn get(path: &str, token: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
        )
    }

    fn post(path: &str, token: &str, body: &str) -> String {
        format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// A request whose handler panics, on a blocking thread or in a write's task, is answered
    /// 500 saying it failed, not why: the panic's message (paths, names, a record's bytes) is
    /// for the log. (It was the body: "internal: task 12 panicked with message ...".)
    /// A diagnostic about the whole document prints without a position, as the loader prints
    /// it (it printed `FILE:0:0:`); one with a position keeps `FILE:LINE:COL:`.
    #[test]
    fn a_whole_document_diagnostic_prints_without_a_position() {
        let diags =
            ::topology::load("version: 1\nnodes: [\n").expect_err("an unclosed list is refused");
        let mut shown: Vec<String> = diags
            .iter()
            .map(|d| Diag::from(d).display("t.yaml"))
            .collect();
        let whole = Diag {
            line: 0,
            column: 0,
            severity: "error".into(),
            message: "too many problems".into(),
        };
        shown.push(whole.display("t.yaml"));
        let loader = ::topology::Diagnostic::error(0, 0, "too many problems").display("t.yaml");
        assert_eq!(shown.last().unwrap(), &loader);
        assert_eq!(loader, "t.yaml: error: too many problems");
        assert!(
            shown[0].starts_with("t.yaml:") && !shown[0].starts_with("t.yaml:0:"),
            "{shown:?}"
        );
        assert_eq!(shown[0], diags[0].display("t.yaml"));
    }

    #[tokio::test]
    async fn a_panic_is_answered_500_without_its_message() {
        let e = off_workers(|| -> Result<(), ApiError> { panic!("secret-41 at /var/lib/x") })
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.error.contains("secret-41"), "{}", e.error);
        assert!(e.error.contains("log"), "{}", e.error);

        async fn panics() -> &'static str {
            panic!("secret-42 at /var/lib/x")
        }
        let app = axum::Router::new()
            .route("/p", axum::routing::post(panics))
            .layer(axum::middleware::from_fn_with_state(
                Changes::new(MAX_CHANGE_WAIT),
                to_completion,
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let back = exchange(addr, &post("/p", "tok", "{}")).await;
        assert!(back.starts_with("HTTP/1.1 500"), "{back}");
        assert!(!back.contains("secret-42"), "{back}");
        let body = back.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let e: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(e["error"].as_str().unwrap().contains("log"), "{back}");
        server.abort();
    }

    /// A client that goes away while its apply is being committed must not leave the change
    /// half done: the store has the new version as current, so the controller must serve and
    /// distribute it too (and circuits, which check that the two agree, must keep working).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_apply_whose_client_goes_away_during_the_commit_is_still_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(gated(dir.path()));
        let ctl = Controller::open(store.clone(), Some((&yaml("1ms"), "t.yaml"))).unwrap();
        let circuits = circuits_of(&ctl);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServeLimits {
            max_connections: 1,
            max_per_source: 1,
            ..DEFAULT_LIMITS
        };
        let server = tokio::spawn(serve_with(
            listener,
            AdminState::new(ctl.clone(), "tok", circuits),
            limits,
        ));

        let (entered, release) = store.write_gate.hold();
        let body = serde_json::json!({ "text": yaml("2ms"), "message": "raise" }).to_string();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(post("/v1/topology", "tok", &body).as_bytes())
            .await
            .unwrap();
        tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(20)))
            .await
            .unwrap()
            .expect("the apply did not reach the store");
        // The client goes away while the commit is in flight. The only connection slot serves
        // the next request once the server is done with this connection.
        drop(client);
        let back = exchange(
            addr,
            "GET /v1/topology HTTP/1.1\r\nhost: x\r\nauthorization: Bearer tok\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(back.starts_with("HTTP/1.1 200"), "{back}");
        release.send(()).unwrap();

        let stored = || {
            store::read(&*ctl.store().clone(), |tx| {
                crate::controller::records::current(tx)
            })
            .unwrap()
            .map(|r| r.version)
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while stored() != Some(2) {
            assert!(Instant::now() < deadline, "the commit did not finish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while ctl.current().record.version != 2 || ctl.published().topology_version != 2 {
            assert!(
                Instant::now() < deadline,
                "version 2 is committed (the store's current) but the controller serves \
                 version {} and distributes version {}",
                ctl.current().record.version,
                ctl.published().topology_version
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.abort();
    }

    /// Changes (`POST /p`) that start, count themselves and wait for a release.
    #[derive(Clone)]
    struct Held {
        started: Arc<std::sync::atomic::AtomicUsize>,
        release: Arc<tokio::sync::Semaphore>,
    }

    impl Held {
        /// Waits (20 s at most) until `n` changes have started.
        async fn started(&self, n: usize) {
            let started = || self.started.load(std::sync::atomic::Ordering::SeqCst);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while started() != n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} started, waiting for {n}",
                    started()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    /// Sends a change to `addr` from a task of its own; its whole response when it ends.
    fn send_change(addr: SocketAddr) -> tokio::task::JoinHandle<String> {
        let req = post("/p", "tok", "{}");
        tokio::spawn(async move { exchange(addr, &req).await })
    }

    /// Serves [`Held`] changes behind [`to_completion`] with `wait`.
    async fn serve_held(
        wait: Duration,
    ) -> (
        SocketAddr,
        Held,
        tokio::task::JoinHandle<std::io::Result<()>>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        async fn held(axum::extract::State(h): axum::extract::State<Held>) -> &'static str {
            h.started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            h.release.acquire().await.unwrap().forget();
            "done"
        }
        let h = Held {
            started: Arc::default(),
            release: Arc::new(tokio::sync::Semaphore::new(0)),
        };
        let changes = Changes::new(wait);
        let waiting = changes.waiting.clone();
        let app = axum::Router::new()
            .route("/p", axum::routing::post(held))
            .with_state(h.clone())
            .layer(axum::middleware::from_fn_with_state(changes, to_completion));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, h, server, waiting)
    }

    /// Waits (20 s at most) until `waiting` changes wait for a permit.
    async fn queued(waiting: &std::sync::atomic::AtomicUsize, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while waiting.load(std::sync::atomic::Ordering::Relaxed) != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} changes waiting, not {n}",
                waiting.load(std::sync::atomic::Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A change that waits longer than its bound for one of `MAX_CHANGES_RUNNING` to end is
    /// answered 503 with `Retry-After`, before its unread body's own deadline would answer 408.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_that_waits_too_long_is_answered_503() {
        use std::sync::atomic::Ordering::SeqCst;
        let (addr, h, server, _) = serve_held(Duration::from_millis(300)).await;
        let clients: Vec<_> = (0..MAX_CHANGES_RUNNING)
            .map(|_| send_change(addr))
            .collect();
        h.started(MAX_CHANGES_RUNNING).await;
        let back = exchange(addr, &post("/p", "tok", "{}")).await;
        assert!(back.starts_with("HTTP/1.1 503"), "{back}");
        assert!(
            back.to_ascii_lowercase().contains("retry-after: 1"),
            "{back}"
        );
        h.release.add_permits(MAX_CHANGES_RUNNING);
        for c in clients {
            assert!(c.await.unwrap().starts_with("HTTP/1.1 200"));
        }
        assert_eq!(h.started.load(SeqCst), MAX_CHANGES_RUNNING);
        server.abort();
    }

    /// At most `MAX_CHANGES_RUNNING` changes run at once: the next waits, with its client, and
    /// runs once one ends; a waiting request whose client goes away never runs. (Every change
    /// ran at once, each a detached task holding its request, whether its client stayed or not.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_past_the_bound_wait_and_a_gone_client_s_change_never_runs() {
        use std::sync::atomic::Ordering::SeqCst;
        let (addr, h, server, waiting) = serve_held(MAX_CHANGE_WAIT).await;
        let clients: Vec<_> = (0..MAX_CHANGES_RUNNING)
            .map(|_| send_change(addr))
            .collect();
        h.started(MAX_CHANGES_RUNNING).await;
        // One more, whose client goes away while it waits.
        let mut gone = TcpStream::connect(addr).await.unwrap();
        gone.write_all(post("/p", "tok", "{}").as_bytes())
            .await
            .unwrap();
        // And one that stays.
        let stays = send_change(addr);
        queued(&waiting, 2).await;
        assert_eq!(h.started.load(SeqCst), MAX_CHANGES_RUNNING);
        // The gone client's change leaves the queue before any permit is free: it never runs.
        drop(gone);
        queued(&waiting, 1).await;
        // One held change ends: the client that stayed is next.
        h.release.add_permits(1);
        h.started(MAX_CHANGES_RUNNING + 1).await;
        h.release.add_permits(MAX_CHANGES_RUNNING + 8);
        let back = tokio::time::timeout(Duration::from_secs(20), stays)
            .await
            .unwrap()
            .unwrap();
        assert!(back.starts_with("HTTP/1.1 200"), "{back}");
        for c in clients {
            let back = tokio::time::timeout(Duration::from_secs(20), c)
                .await
                .unwrap()
                .unwrap();
            assert!(back.starts_with("HTTP/1.1 200"), "{back}");
        }
        assert_eq!(waiting.load(SeqCst), 0);
        assert_eq!(h.started.load(SeqCst), MAX_CHANGES_RUNNING + 1);
        server.abort();
    }

    /// Tokens match only whole: another length, one byte off, or empty are refused (compared
    /// by digest, so that the length does not show in the time taken either).
    #[test]
    fn tokens_match_only_whole() {
        let t = b"0123456789abcdef0123456789abcdef0123456789abcdef";
        assert!(token_matches(t, t));
        assert!(!token_matches(&t[..47], t));
        assert!(!token_matches(b"", t));
        let mut off = *t;
        off[47] = b'0';
        assert!(!token_matches(&off, t));
    }

    /// A router last heard from an hour before the controller started shows as last seen an
    /// hour ago, from its stored record. (Its age was counted from the controller's start: a
    /// router silent for a week showed as seen seconds ago.)
    #[test]
    fn a_stored_routers_last_seen_counts_from_its_record() {
        use crate::controller::records::{self, RouterRecord};
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path()).unwrap());
        let hour_ago = records::now_unix_ms() - 3_600_000;
        {
            let ctl = Controller::open(store.clone(), Some((&yaml("1ms"), "t.yaml"))).unwrap();
            drop(ctl);
            crate::store::transaction(&*store, |tx| {
                records::ROUTERS.put(
                    tx,
                    "e",
                    &RouterRecord {
                        node: "e".into(),
                        applied_version: 1,
                        applied_topology: 1,
                        last_seen_unix_ms: hour_ago,
                        last_nack: None,
                    },
                )
            })
            .unwrap();
        }
        let ctl = Controller::open(store, None).unwrap();
        let circuits = circuits_of(&ctl);
        let status = status::build(&AdminState::new(ctl, "tok", circuits));
        let e = status.routers.iter().find(|r| r.node == "e").unwrap();
        assert!(!e.connected);
        let ago = e.last_seen_ms_ago.unwrap();
        assert!(
            (3_600_000..3_700_000).contains(&ago),
            "last seen {ago} ms ago"
        );
    }

    /// A router's last report is what a restart shows as when it was last seen, not its last
    /// answer to a snapshot: its session's end stores it. (Only answers to snapshots were
    /// stored: a fabric that published nothing for days showed a router gone two minutes before
    /// the restart as last seen days ago.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_routers_last_report_is_when_a_restart_shows_it_last_seen() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path()).unwrap());
        {
            let ctl = Controller::open(store.clone(), Some((&yaml("1ms"), "t.yaml"))).unwrap();
            let (s, _) = ctl.router_session_start("e");
            let p = ctl.published();
            assert!(ctl.router_ack(&s, p.version, p.topology_version));
            ctl.flush_routers().await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            ctl.router_seen(&s);
            assert!(ctl.router_session_end(&s));
            ctl.flush_routers().await.unwrap();
        }
        let ctl = Controller::open(store, None).unwrap();
        let circuits = circuits_of(&ctl);
        let status = status::build(&AdminState::new(ctl, "tok", circuits));
        let e = status.routers.iter().find(|r| r.node == "e").unwrap();
        let ago = e.last_seen_ms_ago.unwrap();
        assert!(
            ago < 1000,
            "last seen {ago} ms ago: its last answer, not its last report"
        );
    }

    /// The bearer scheme's name is case-insensitive: a client that writes `bearer` or `BEARER`
    /// (some libraries do) with the right token is let in; another scheme or a wrong token is
    /// not. (Only `Bearer ` exactly was taken: `bearer tok` got 401.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer tok"), Some("tok"));
        assert_eq!(bearer("bearer  tok "), Some("tok"));
        assert_eq!(bearer("Basic tok"), None);
        assert_eq!(bearer("Bearertok"), None);
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("1ms"), "t.yaml"))).unwrap();
        let circuits = circuits_of(&ctl);
        let (addr, server) = serve_on_loopback(AdminState::new(ctl, "tok", circuits)).await;
        for (auth, status) in [
            ("bearer tok", "200"),
            ("BEARER tok", "200"),
            ("Bearer  tok", "200"),
            ("Basic tok", "401"),
            ("bearer nope", "401"),
        ] {
            let req = format!(
                "GET /v1/topology HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\nconnection: close\r\n\r\n"
            );
            let back = exchange(addr, &req).await;
            assert!(
                back.starts_with(&format!("HTTP/1.1 {status}")),
                "{auth}: {}",
                back.lines().next().unwrap_or("")
            );
        }
        server.abort();
    }

    /// The operator's free text reaches the audit log at most `MAX_META_FIELD` bytes long (and
    /// the cut mark), from every writer: an apply's author and message (the version keeps the
    /// message whole, the author clipped: it was logged whole at every apply and returned by
    /// every read of the version) and a circuit's author, which the circuit's record and
    /// history keep clipped too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_authors_and_messages_are_clipped_in_the_audit_log_and_circuit_records() {
        use crate::circuits::{CIRCUIT_HISTORY, CIRCUITS};
        use crate::controller::records::{AUDIT, MAX_META_FIELD};
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path()).unwrap());
        let pool = "pools:\n  - {name: vips, prefix: 127.79.0.0/28}\n";
        let (v1, v2) = (yaml("1ms") + pool, yaml("2ms") + pool);
        let ctl = Controller::open(store.clone(), Some((&v1, "t.yaml"))).unwrap();
        let circuits = circuits_of(&ctl);
        let (addr, server) = serve_on_loopback(AdminState::new(ctl.clone(), "tok", circuits)).await;
        let long = "x".repeat(4 << 20);
        let head = |r: &str| r.chars().take(300).collect::<String>();

        let apply = serde_json::json!({ "text": v2, "message": long, "author": long });
        let back = exchange(addr, &post("/v1/topology", "tok", &apply.to_string())).await;
        assert!(back.starts_with("HTTP/1.1 200"), "{}", head(&back));
        let create = serde_json::json!({
            "spec": {
                "name": "c1",
                "a_end": { "edge": "e", "prefix": "10.1.0.0/24" },
                "b_end": { "service": "chat" },
                "rate": "10Mbps",
            },
            "author": long,
        });
        let back = exchange(addr, &post("/v1/circuits", "tok", &create.to_string())).await;
        assert!(back.starts_with("HTTP/1.1 200"), "{}", head(&back));

        let bound = MAX_META_FIELD + '…'.len_utf8();
        let audit = store::read(&*store, |tx| AUDIT.all(tx)).unwrap();
        let actions: Vec<&str> = audit.iter().map(|(_, e)| e.action.as_str()).collect();
        assert_eq!(
            actions,
            [
                "topology.import",
                "topology.apply",
                "circuit.create",
                "circuit.place"
            ]
        );
        for (_, e) in &audit {
            assert!(
                e.actor.len() <= bound,
                "{}: actor of {} bytes",
                e.action,
                e.actor.len()
            );
            assert!(
                e.detail.len() <= bound,
                "{}: detail of {} bytes",
                e.action,
                e.detail.len()
            );
        }
        let version = ctl.version(2).unwrap().unwrap();
        assert!(version.author.len() <= bound, "{}", version.author.len());
        assert!(version.author.starts_with("xxx"));
        assert_eq!(version.message.len(), long.len());
        let circuit = store::read(&*store, |tx| CIRCUITS.all(tx)).unwrap();
        assert!(circuit[0].1.created_by.len() <= bound);
        let history = store::read(&*store, |tx| CIRCUIT_HISTORY.all(tx)).unwrap();
        assert!(!history.is_empty());
        for (_, h) in &history {
            assert!(
                h.actor.len() <= bound,
                "history actor of {} bytes",
                h.actor.len()
            );
        }
        server.abort();
    }

    /// `GET /v1/topology/history` flags as current the version its rows were read with: an
    /// apply that commits while the history's read waits is listed, and flagged. (The current
    /// version was read from memory before the rows: the new row came unflagged, the one
    /// before it flagged current.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn history_flags_the_version_current_in_the_read_of_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(gated(dir.path()));
        let ctl = Controller::open(store.clone(), Some((&yaml("1ms"), "t.yaml"))).unwrap();
        let circuits = circuits_of(&ctl);
        let (addr, server) = serve_on_loopback(AdminState::new(ctl.clone(), "tok", circuits)).await;
        let (entered, release) = store.read_gate.hold();
        let history =
            tokio::spawn(async move { exchange(addr, &get("/v1/topology/history", "tok")).await });
        tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(20)))
            .await
            .unwrap()
            .expect("the history's read did not reach the store");
        let out = ctl
            .apply(
                &yaml("2ms"),
                "me",
                "",
                crate::controller::records::Origin::Apply,
                false,
                None,
            )
            .await
            .unwrap();
        assert_eq!(out.version, Some(2));
        let _ = release.send(());
        let back = history.await.unwrap();
        let body = &back[back.find("\r\n\r\n").unwrap() + 4..];
        let rows: Vec<serde_json::Value> = serde_json::from_str(body).unwrap();
        let current: Vec<u64> = rows
            .iter()
            .filter(|r| r["current"] == true)
            .map(|r| r["version"].as_u64().unwrap())
            .collect();
        assert_eq!(rows.len(), 2, "{body}");
        assert_eq!(current, [2], "{body}");
        server.abort();
    }

    /// Every admin GET that reads the store, and an apply's and a rollback's own reads, read it
    /// off the runtime's workers: while the read waits on the disk, the same runtime (here its
    /// only thread, which would stall outright) keeps answering other requests, and the
    /// controller's sessions with it.
    #[tokio::test]
    async fn admin_reads_of_the_store_wait_off_the_runtimes_workers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(gated(dir.path()));
        let ctl = Controller::open(store.clone(), Some((&yaml("1ms"), "t.yaml"))).unwrap();
        let circuits = circuits_of(&ctl);
        let (addr, server) = serve_on_loopback(AdminState::new(ctl, "tok", circuits)).await;
        let dry_run = serde_json::json!({ "text": yaml("2ms"), "dry_run": true }).to_string();
        let requests = [
            (
                "/v1/topology/history",
                get("/v1/topology/history", "tok"),
                "200",
            ),
            (
                "/v1/topology/versions/1",
                get("/v1/topology/versions/1", "tok"),
                "200",
            ),
            ("/v1/circuits", get("/v1/circuits", "tok"), "200"),
            (
                "/v1/circuits/headroom",
                get("/v1/circuits/headroom", "tok"),
                "200",
            ),
            ("/v1/circuits/nope", get("/v1/circuits/nope", "tok"), "404"),
            (
                "/v1/circuits/nope/history",
                get("/v1/circuits/nope/history", "tok"),
                "404",
            ),
            // The controller's own reads: the circuits an apply plans with, a rollback's text.
            ("apply", post("/v1/topology", "tok", &dry_run), "200"),
            (
                "rollback",
                post(
                    "/v1/topology/rollback",
                    "tok",
                    r#"{"version": 1, "dry_run": true}"#,
                ),
                "200",
            ),
        ];
        for (path, req, status) in requests {
            let back = answered_around(addr, req, &store.read_gate, path).await;
            assert!(
                !store
                    .read_gate
                    .expired
                    .swap(false, std::sync::atomic::Ordering::SeqCst),
                "{path}: its store read held the runtime's thread (nothing else was answered \
                 until the held read gave up)"
            );
            assert!(
                back.starts_with(&format!("HTTP/1.1 {status}")),
                "{path}: {back}"
            );
        }
        server.abort();
    }

    /// An admin API served on a controller of `yaml("1ms")` in a directory of its own, with
    /// its status gate and builds.
    struct StatusServer {
        _dir: tempfile::TempDir,
        ctl: Arc<Controller>,
        gate: Arc<Gate>,
        builds: Arc<status::StatusBuilds>,
        addr: SocketAddr,
        server: tokio::task::JoinHandle<()>,
    }

    async fn status_server() -> StatusServer {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("1ms"), "t.yaml"))).unwrap();
        let circuits = circuits_of(&ctl);
        let state = AdminState::new(ctl.clone(), "tok", circuits);
        let (gate, builds) = (state.status_gate.clone(), state.status_builds.clone());
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, state));
        StatusServer {
            _dir: dir,
            ctl,
            gate,
            builds,
            addr,
            server,
        }
    }

    /// `GET /v1/rtt` answers the RTT matrix as JSON, a row per link of the topology (built off
    /// the runtime's workers).
    #[tokio::test]
    async fn the_rtt_matrix_is_a_row_per_link() {
        let StatusServer { addr, server, .. } = status_server().await;
        let back = exchange(addr, &get("/v1/rtt", "tok")).await;
        assert!(back.starts_with("HTTP/1.1 200"), "{back}");
        assert!(back.contains("content-type: application/json"), "{back}");
        let body = back.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let rows: Vec<serde_json::Value> = serde_json::from_str(body).expect(body);
        // `yaml`'s fabric: e--s.
        assert_eq!(rows.len(), 1, "{body}");
        assert_eq!(rows[0]["link"], "e--s", "{body}");
        server.abort();
    }

    /// `GET /v1/topology/history?limit=0` is refused (400, naming `limit`), as the CLI's
    /// `--limit` refuses 0 (it listed one version). A query parameter a route does not take is
    /// refused (400, naming it) rather than ignored, as an unknown field of a request body is:
    /// `?limt=5` listed the default 50 versions, and a parameter on any other route (say a
    /// `dry_run=true` on an apply, or `all` on the circuits' list) passed unseen.
    #[tokio::test]
    async fn history_limit_zero_and_unknown_query_parameters_are_refused_naming_them() {
        let StatusServer {
            ctl, addr, server, ..
        } = status_server().await;
        let apply = serde_json::json!({ "text": yaml("5ms") }).to_string();
        let refused = [
            (get("/v1/topology/history?limit=0", "tok"), "limit"),
            (get("/v1/topology/history?limt=5", "tok"), "limt"),
            (get("/v1/topology/history?limit=5&x=1", "tok"), "x"),
            (get("/v1/topology?version=1", "tok"), "version"),
            (get("/v1/topology/versions/1?text=no", "tok"), "text"),
            (post("/v1/topology?dry_run=true", "tok", &apply), "dry_run"),
            (
                post(
                    "/v1/topology/rollback?dry_run=true",
                    "tok",
                    r#"{"version": 1}"#,
                ),
                "dry_run",
            ),
            (get("/v1/status?verbose=1", "tok"), "verbose"),
            (get("/v1/rtt?link=a", "tok"), "link"),
            (get("/v1/circuits?all=true", "tok"), "all"),
            (get("/v1/archived-circuits?limit=5&page=2", "tok"), "page"),
            (get("/v1/circuits/headroom?link=a", "tok"), "link"),
            (get("/v1/circuits/c-000001?x=1", "tok"), "x"),
            (get("/v1/circuits/c-000001/history?limit=5", "tok"), "limit"),
            (post("/v1/circuits/validate?pool=p", "tok", "{}"), "pool"),
            (
                post("/v1/circuits?idempotency_key=k", "tok", "{}"),
                "idempotency_key",
            ),
            (
                post("/v1/circuits/c-000001/resize?rate=1Mbps", "tok", "{}"),
                "rate",
            ),
            (
                post("/v1/circuits/c-000001/delete?wait=1", "tok", "{}"),
                "wait",
            ),
            // A path parameter that is not a number, named too. (It was "Invalid URL: Cannot
            // parse `x` to a `u64`".)
            (get("/v1/topology/versions/x", "tok"), "version"),
            (get("/v1/topology/versions/-1", "tok"), "version"),
        ];
        for (req, name) in refused {
            let line = req.lines().next().unwrap_or_default().to_string();
            let back = exchange(addr, &req).await;
            assert!(back.starts_with("HTTP/1.1 400"), "{line}: {back}");
            assert!(
                back.contains("content-type: application/json"),
                "{line}: {back}"
            );
            let body = back.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            let error = v["error"].as_str().unwrap_or_default();
            assert!(error.contains(&format!("`{name}`")), "{line}: {error}");
        }
        // Nothing was applied on the way.
        assert_eq!(ctl.current().record.version, 1);
        for (path, rows) in [
            ("/v1/topology/history", 1),
            ("/v1/topology/history?limit=1", 1),
            ("/v1/topology/history?limit=99999", 1),
            // Past a `usize`: capped as well (it was refused 400).
            ("/v1/topology/history?limit=99999999999999999999999", 1),
        ] {
            let back = exchange(addr, &get(path, "tok")).await;
            assert!(back.starts_with("HTTP/1.1 200"), "{path}: {back}");
            let body = back.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let got: Vec<self::topology::HistoryEntry> = serde_json::from_str(body).unwrap();
            assert_eq!(got.len(), rows, "{path}");
        }
        server.abort();
    }

    /// `GET /v1/status` builds its answer (a routing table per edge: seconds for thousands of
    /// nodes) off the runtime's workers: while it is being built, the same runtime (here its
    /// only thread, which would stall outright) keeps answering other requests, and the
    /// controller's sessions with it.
    #[tokio::test]
    async fn status_is_built_off_the_runtimes_workers() {
        let StatusServer {
            gate, addr, server, ..
        } = status_server().await;

        let back = answered_around(addr, get("/v1/status", "tok"), &gate, "/v1/status").await;
        assert!(
            !gate.expired.load(std::sync::atomic::Ordering::SeqCst),
            "the status build held the runtime's thread (nothing else was answered until the \
             held build gave up)"
        );
        assert!(back.starts_with("HTTP/1.1 200"), "{back}");
        let body = back.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let st: status::Status = serde_json::from_str(body).unwrap();
        let nodes: Vec<&str> = st.routers.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(nodes, ["e", "s"]);
        assert_eq!(st.services[0].edges[0].site.as_deref(), Some("s"));
        server.abort();
    }

    /// Calls of `GET /v1/status` that arrive while a build runs share it: four calls, one
    /// build, one answer. (Each call ran a build of its own on a blocking thread: as many
    /// routing tables per edge as calls, seconds each on a large fabric.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_status_calls_share_one_build() {
        use std::sync::atomic::Ordering::SeqCst;
        let StatusServer {
            gate,
            builds,
            addr,
            server,
            ..
        } = status_server().await;

        let (entered, release) = gate.hold();
        let call = || tokio::spawn(async move { exchange(addr, &get("/v1/status", "tok")).await });
        let mut calls = vec![call()];
        let entered =
            tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(20)))
                .await
                .unwrap();
        assert!(entered.is_ok(), "the first build did not start");
        calls.extend((0..3).map(|_| call()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while builds.calls.load(SeqCst) < 4 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of 4 calls reached the handler",
                builds.calls.load(SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = release.send(());
        let mut bodies = Vec::new();
        for c in calls {
            let back = c.await.unwrap();
            assert!(back.starts_with("HTTP/1.1 200"), "{back}");
            assert!(back.contains("content-type: application/json"), "{back}");
            let body = back
                .split_once("\r\n\r\n")
                .map_or("", |(_, b)| b)
                .to_string();
            let st: status::Status = serde_json::from_str(&body).unwrap();
            assert_eq!(st.services[0].edges[0].site.as_deref(), Some("s"));
            bodies.push(body);
        }
        assert!(!gate.expired.load(SeqCst), "the held build gave up");
        assert_eq!(builds.started(), 1, "each call ran a build of its own");
        assert!(bodies.iter().all(|b| *b == bodies[0]), "{bodies:?}");

        // The next call, after the shared build ended, gets a build of its own.
        let back = exchange(addr, &get("/v1/status", "tok")).await;
        assert!(back.starts_with("HTTP/1.1 200"), "{back}");
        assert_eq!(builds.started(), 2);
        server.abort();
    }

    /// A status call made after an apply does not join a build started before it: it gets a
    /// build of its own and shows the applied version. (It joined, and showed the version
    /// before the apply.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_status_call_after_an_apply_does_not_join_an_older_build() {
        let StatusServer {
            ctl,
            gate,
            builds,
            addr,
            server,
            ..
        } = status_server().await;
        let version = |back: &str| {
            let body = back.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            serde_json::from_str::<status::Status>(body)
                .unwrap()
                .topology_version
        };

        let (entered, release) = gate.hold();
        let before = tokio::spawn(async move { exchange(addr, &get("/v1/status", "tok")).await });
        let entered =
            tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(20)))
                .await
                .unwrap();
        assert!(entered.is_ok(), "the first build did not start");
        ctl.apply(
            &yaml("2ms"),
            "test",
            "m",
            crate::controller::records::Origin::Apply,
            false,
            None,
        )
        .await
        .unwrap();
        let after = tokio::spawn(async move { exchange(addr, &get("/v1/status", "tok")).await });
        let after = tokio::time::timeout(Duration::from_secs(10), after).await;
        let _ = release.send(());
        let after = after.expect("the call after the apply waited for the older build");
        assert_eq!(version(&after.unwrap()), 2);
        assert!(before.await.unwrap().starts_with("HTTP/1.1 200"));
        assert_eq!(builds.started(), 2);
        server.abort();
    }
}
