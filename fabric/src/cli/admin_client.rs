//! The CLI's client for the controller's admin API (HTTP/1.1 + JSON, bearer token), and the
//! flags every admin command shares.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::admin::Diag;

/// Largest response the CLI reads (a topology text plus JSON overhead, or a big status).
const MAX_RESPONSE: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// Where the controller's admin API is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// Admin API address (host:port or http://host:port).
    #[arg(long, env = "TASMAN_CONTROLLER", default_value = "127.0.0.1:7401")]
    pub controller: String,
    /// Bearer token for the admin API.
    #[arg(long, env = "TASMAN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the bearer token from this file (e.g. the controller's `<state>/admin-token`).
    #[arg(long, env = "TASMAN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Give up on a controller that has not answered a request within this long (connect,
    /// request and the whole answer), e.g. 30s, 2m.
    #[arg(long, env = "TASMAN_REQUEST_TIMEOUT", default_value = "60s",
          value_parser = parse_request_timeout, value_name = "DURATION")]
    pub request_timeout: Duration,
}

/// `--request-timeout`'s default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// `--request-timeout`: a duration above zero.
pub(crate) fn parse_request_timeout(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("{s:?} must be greater than zero")),
        Err(e) => Err(format!("{s:?}: {e} (expected e.g. 30s, 2m or 500ms)")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the controller at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    /// No complete answer in time. A change may still be made: the request may have reached
    /// the controller.
    #[error(
        "the controller at {addr} did not answer within {} (--request-timeout); a change \
         requested may still have been made: check before retrying",
        humantime::format_duration(*.after)
    )]
    TimedOut { addr: String, after: Duration },
    #[error("{path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The controller refused the request (status, its message and diagnostics).
    #[error("{error}")]
    Refused {
        status: u16,
        error: String,
        diagnostics: Vec<Diag>,
    },
    #[error("unexpected answer from the controller: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Exit code: 1 refused/invalid (a domain failure), 2 unreachable or unusable input.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Refused { .. } => 1,
            _ => 2,
        }
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    diagnostics: Vec<Diag>,
}

/// Not `Debug`: it holds the token.
#[derive(Clone)]
pub struct AdminClient {
    authority: String,
    token: String,
    timeout: Duration,
}

impl AdminClient {
    pub fn new(args: &AdminArgs) -> Result<Self, ClientError> {
        let token = match (&args.token, &args.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(p)) => std::fs::read_to_string(p)
                .map_err(|source| ClientError::TokenFile {
                    path: p.clone(),
                    source,
                })?
                .trim()
                .to_string(),
            (None, None) => String::new(),
        };
        let authority = args
            .controller
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        Ok(AdminClient {
            authority,
            token,
            timeout: args.request_timeout,
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call("POST", path, Some(bytes)).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(self.timeout, self.exchange(method, path, body))
            .await
            .unwrap_or(Err(ClientError::TimedOut {
                addr: self.authority.clone(),
                after: self.timeout,
            }))
    }

    async fn exchange<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            addr: self.authority.clone(),
            reason,
        };
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.authority)
            .header(CONTENT_TYPE, "application/json");
        if !self.token.is_empty() {
            req = req.header(AUTHORIZATION, format!("Bearer {}", self.token));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let (error, diagnostics) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => (b.error, b.diagnostics),
                Err(_) => (
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
                    Vec::new(),
                ),
            };
            return Err(ClientError::Refused {
                status: status.as_u16(),
                error,
                diagnostics,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

/// Runs `f` on a small runtime (the CLI is one request at a time).
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    Ok(rt.block_on(f))
}

/// Prints a client error to stderr the way operators read it; returns the exit code.
pub fn report(e: &ClientError, file: &str) -> std::process::ExitCode {
    eprintln!("error: {e}");
    if let ClientError::Refused { diagnostics, .. } = e {
        for d in diagnostics {
            eprintln!("{}", d.display(file));
        }
    }
    std::process::ExitCode::from(e.exit_code())
}
