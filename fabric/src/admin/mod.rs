//! The admin API: HTTP/JSON for the `tasman` CLI, every route behind a bearer token.
//!
//! Routes are grouped per module (`topology`, `status`; circuits add theirs) and merged in
//! [`router()`]; authentication and the body limit wrap the whole set, so a module cannot add an
//! unauthenticated route by accident. The controller's Prometheus `/metrics`, which needs no
//! token, is therefore not here: it has a listener of its own ([`crate::controller::metrics`]).
//!
//! | method | path | |
//! |---|---|---|
//! | GET | /v1/topology | the topology in force, text as applied |
//! | GET | /v1/topology/versions/{v} | one version |
//! | GET | /v1/topology/history?limit=N | newest first |
//! | POST | /v1/topology | apply (or dry-run) `{text, dry_run, message, author, base_version}` |
//! | POST | /v1/topology/rollback | `{version, message, author, dry_run}` |
//! | GET | /v1/status | routers, per-service choices, RTT matrix |

pub mod status;
pub mod topology;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
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
        }
    }
}

/// Every admin route; a module with its own routes adds a `.merge(...)` line here.
pub fn router(state: AdminState) -> axum::Router {
    axum::Router::new()
        .merge(topology::routes())
        .merge(status::routes())
        .merge(crate::circuits::api::routes())
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Bounds on the admin API's connections. Each is open to the network before authentication
/// (the token is checked per request), so a client must not hold them forever, or any number.
pub use router::http_serve::Limits as ServeLimits;

/// The admin API's [`ServeLimits`]: the shared timeouts, and 256 connections at once.
pub const DEFAULT_LIMITS: ServeLimits = ServeLimits {
    header_read_timeout: http_serve::HEADER_READ_TIMEOUT,
    body_read_timeout: http_serve::BODY_READ_TIMEOUT,
    write_timeout: http_serve::WRITE_TIMEOUT,
    max_connections: 256,
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
    http_serve::serve(listener, "admin", limits, service).await
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Constant-time comparison: the token must not leak through timing.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

async fn auth(State(st): State<AdminState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t)
            if !st.token.is_empty() && token_matches(t.trim().as_bytes(), st.token.as_bytes()) =>
        {
            next.run(req).await
        }
        _ => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (see --token / TASMAN_TOKEN)",
        )
        .into_response(),
    }
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
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> Self {
        let status = match &e {
            ControllerError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
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
    /// `FILE:LINE:COL: severity: message`, as the loader prints it.
    pub fn display(&self, file: &str) -> String {
        format!(
            "{file}:{}:{}: {}: {}",
            self.line, self.column, self.severity, self.message
        )
    }
}
