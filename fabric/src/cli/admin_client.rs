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
    #[arg(long, env = "TASMAN_CONTROLLER", default_value = "127.0.0.1:7401",
          value_parser = parse_controller, value_name = "HOST:PORT")]
    pub controller: String,
    /// Bearer token for the admin API. Wins over --token-file when both are set (on the command
    /// line or in the environment); an empty one counts as unset.
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

/// `--controller`: `HOST:PORT` or `http://HOST:PORT` (a trailing `/` allowed), as the
/// `HOST:PORT` the client connects to. The admin API is plain HTTP at its root: a scheme other
/// than `http://`, a path, or a missing port are refused here, naming the flag, rather than
/// failing later as an address that cannot be resolved.
pub(crate) fn parse_controller(s: &str) -> Result<String, String> {
    let t = s.trim();
    let rest = match t.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "{s:?}: the admin API is plain HTTP, not {scheme}: write HOST:PORT or \
                 http://HOST:PORT"
            ));
        }
        None => t,
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') {
        return Err(format!(
            "{s:?}: a path is not allowed (the admin API is at the root): write HOST:PORT or \
             http://HOST:PORT"
        ));
    }
    let port = match authority.rsplit_once(':') {
        // An IPv6 address without brackets ("::1") has colons but no port.
        Some((host, port)) if !host.is_empty() && (!host.contains(':') || host.ends_with(']')) => {
            port
        }
        _ => {
            return Err(format!(
                "{s:?} has no port: write HOST:PORT, e.g. 127.0.0.1:7401 or [::1]:7401"
            ));
        }
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(authority.to_string()),
        _ => Err(format!(
            "{s:?}: port {port:?} is not a port number (1 to 65535)"
        )),
    }
}

/// `--request-timeout`'s default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// `--request-timeout`'s greatest value.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// `--request-timeout`: a duration above zero, at most a day. (Any humantime duration was
/// taken, and one past the monotonic clock's range panicked every command at its deadline's
/// sum.)
pub(crate) fn parse_request_timeout(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if d.is_zero() => Err(format!("{s:?} must be greater than zero")),
        Ok(d) if d > MAX_REQUEST_TIMEOUT => Err(format!("{s:?} must be at most 1day")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{s:?}: {e} (expected e.g. 30s, 2m or 500ms)")),
    }
}

/// What [`ClientError::Lost`] and [`ClientError::TimedOut`] add for a request that changes
/// something.
fn maybe_made(changes: bool) -> &'static str {
    if changes {
        "; a change requested may still have been made: check before retrying"
    } else {
        ""
    }
}

/// Whether a request may change something: anything but a read, a dry run (whatever its
/// method) or a circuit's validation.
fn changes(method: &str, path: &str, body: &[u8]) -> bool {
    let dry_run = path.ends_with("/validate")
        || serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("dry_run")?.as_bool())
            == Some(true);
    method != "GET" && method != "HEAD" && !dry_run
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the controller at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    /// The connection ended after the request went out, before the whole answer came (the
    /// controller restarting, a proxy cutting it): like [`ClientError::TimedOut`], the change
    /// may have been made. (It was reported as unreachable, which reads as "nothing happened":
    /// a create retried without an idempotency key then met its own circuit's name.)
    /// `changes`: the request was one that changes something (not a read, a dry run or a
    /// validation), the only kind the message warns of.
    #[error(
        "the connection to the controller at {addr} ended before its answer ({reason}){}",
        maybe_made(*.changes)
    )]
    Lost {
        addr: String,
        reason: String,
        changes: bool,
    },
    /// No complete answer in time. A change may still be made: the request may have reached
    /// the controller.
    #[error(
        "the controller at {addr} did not answer within {} (--request-timeout){}",
        humantime::format_duration(*.after),
        maybe_made(*.changes)
    )]
    TimedOut {
        addr: String,
        after: Duration,
        changes: bool,
    },
    #[error("{path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A token file with nothing in it: sending no token would only be refused as a wrong one.
    #[error("{}: the token file is empty (--token-file / TASMAN_TOKEN_FILE)", .0.display())]
    EmptyTokenFile(PathBuf),
    /// The controller refused the request (status, its message and diagnostics).
    #[error("{error}")]
    Refused {
        status: u16,
        error: String,
        diagnostics: Vec<Diag>,
    },
    #[error("unexpected answer from the controller: {0}")]
    Protocol(String),
    /// A success answer (2xx) to a request that may change something, in the admin API's JSON
    /// but not one this CLI can read (a newer controller's fields, an answer past the size
    /// limit): the controller accepted it, so a change it asked for was made.
    #[error(
        "the controller at {addr} accepted the request (HTTP {status}), so a change it asked for \
         was made, but its answer could not be read ({reason}); see it with the matching `get`, \
         `show` or `history`"
    )]
    UnreadableSuccess {
        addr: String,
        status: u16,
        reason: String,
    },
    /// The controller answered 503 (its changes all running, a transaction to retry, or it is
    /// stopping) to every try until `--request-timeout`: nothing was changed, so trying again is
    /// safe (exit 3). Each 503 is tried again after its `Retry-After`.
    #[error(
        "{error} (the controller at {addr} was busy for {tries} tries over {}: nothing was \
         changed; try again)",
        humantime::format_duration(*.over)
    )]
    Busy {
        addr: String,
        error: String,
        tries: u32,
        over: Duration,
    },
    /// A token a request header cannot carry (a line break, a control character or a
    /// character outside ASCII inside it).
    #[error(
        "the admin token has a character a request header cannot carry (a line break, a \
         control character or one outside ASCII inside it): check --token / TASMAN_TOKEN or \
         --token-file"
    )]
    BadToken,
}

impl ClientError {
    /// Exit code: 1 refused/invalid (a domain failure), 2 unreachable or unusable input (or an
    /// answer lost: a change may have been made), 3 busy (nothing was changed: safe to retry).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Refused { .. } => 1,
            ClientError::Busy { .. } => 3,
            _ => 2,
        }
    }
}

/// The longest wait between two tries of a request answered 503, whatever its `Retry-After`.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(5);
/// The shortest (a `Retry-After: 0` is not a loop).
const MIN_BUSY_WAIT: Duration = Duration::from_millis(100);

/// A 503 answer as [`AdminClient::exchange`] reads it: its error, and when to try again.
struct Unavailable {
    error: String,
    retry_after: Duration,
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    diagnostics: Vec<Diag>,
}

/// Said after a `401` to a request that went out with no token: where the controller keeps it.
const NO_TOKEN_HINT: &str = "no token was given: the controller's is in <state>/admin-token (its \
     --state directory) unless it runs with --admin-token-file; pass --token-file FILE or set \
     TASMAN_TOKEN_FILE (or --token / TASMAN_TOKEN)";

/// Not `Debug`: it holds the token.
#[derive(Clone)]
pub struct AdminClient {
    authority: String,
    token: String,
    timeout: Duration,
}

impl AdminClient {
    pub fn new(args: &AdminArgs) -> Result<Self, ClientError> {
        // An empty token (`TASMAN_TOKEN=`, a CI secret that is unset) is no token: the file,
        // if given, is read. It won, and the request went out without one (401).
        let given = args.token.as_ref().filter(|t| !t.trim().is_empty());
        let token = match (given, &args.token_file) {
            // Spaces around it ignored, as in a token file and by the controller (a secret
            // mounted with its line break was refused as a token with one inside).
            (Some(t), _) => t.trim().to_string(),
            (None, Some(p)) => {
                let t = crate::admin::read_token_file(p)
                    .map_err(|source| ClientError::TokenFile {
                        path: p.clone(),
                        source,
                    })?
                    .trim()
                    .to_string();
                if t.is_empty() {
                    return Err(ClientError::EmptyTokenFile(p.clone()));
                }
                t
            }
            (None, None) => String::new(),
        };
        // What the controller takes as a token ([`crate::admin::sendable_token`], its own
        // check of its token files): a header may also hold a tab or bytes past ASCII (a token
        // file saved with a byte-order mark), which the controller reads as no token at all: a
        // 401 that sent the operator looking for a wrong token, not at the file. (A header
        // carries every such token.)
        if !crate::admin::sendable_token(&token) {
            return Err(ClientError::BadToken);
        }
        // Normally normalised by clap already ([`parse_controller`]); a value built in code
        // that does not parse is kept as given, and fails to connect naming it.
        let authority =
            parse_controller(&args.controller).unwrap_or_else(|_| args.controller.clone());
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

    /// Sends the request, and sends it again after each 503 (nothing was changed: the
    /// controller answers 503 only before a change starts) at its `Retry-After` (0.1 to 5 s),
    /// while `--request-timeout` from the first try leaves time for the answer: as long as the
    /// last try took, and at least a quarter of the timeout (at most 1 s). The last 503 is then [`ClientError::Busy`]; a try that has not answered
    /// by the deadline is [`ClientError::TimedOut`].
    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.timeout.min(MAX_REQUEST_TIMEOUT);
        let body = Bytes::from(body.unwrap_or_default());
        let changes = changes(method, path, &body);
        let mut tries = 0u32;
        loop {
            tries += 1;
            let began = tokio::time::Instant::now();
            // Whether this try got a connection to send its request on: a deadline that comes
            // first (a controller address that drops packets) sent nothing, and no change can
            // have been made.
            let connected = std::sync::atomic::AtomicBool::new(false);
            let answer = tokio::time::timeout_at(
                deadline,
                self.exchange(method, path, body.clone(), changes, &connected),
            )
            .await
            .unwrap_or_else(|_| {
                Err(match connected.load(std::sync::atomic::Ordering::Relaxed) {
                    true => ClientError::TimedOut {
                        addr: self.authority.clone(),
                        after: self.timeout,
                        changes,
                    },
                    false => ClientError::Unreachable {
                        addr: self.authority.clone(),
                        reason: format!(
                            "no connection within {} (--request-timeout)",
                            humantime::format_duration(self.timeout)
                        ),
                    },
                })
            });
            let busy = match answer? {
                Ok(v) => return Ok(v),
                Err(busy) => busy,
            };
            // A try is started only with time left for its answer, as long as the last one
            // took (the controller's own 503s come after it waited 5 or 10 s for its turn): one
            // cut off by the deadline may have made its change (timed out, not busy).
            let wait = busy.retry_after.clamp(MIN_BUSY_WAIT, MAX_BUSY_WAIT);
            let answer_time = began
                .elapsed()
                .max((self.timeout / 4).min(Duration::from_secs(1)));
            if tokio::time::Instant::now() + wait + answer_time >= deadline {
                return Err(ClientError::Busy {
                    addr: self.authority.clone(),
                    error: busy.error,
                    tries,
                    over: started.elapsed(),
                });
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// One try: the answer (`Ok(Ok(_))`), or the admin API's 503 (`Ok(Err(_))`). `change`: the
    /// request may change something ([`changes`]). Sets `connected` once it has a connection
    /// to send the request on.
    async fn exchange<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
        change: bool,
        connected: &std::sync::atomic::AtomicBool,
    ) -> Result<Result<T, Unavailable>, ClientError> {
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
        connected.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.authority)
            .header(CONTENT_TYPE, "application/json");
        if !self.token.is_empty() {
            req = req.header(AUTHORIZATION, format!("Bearer {}", self.token));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let lost = |reason: String| ClientError::Lost {
            addr: self.authority.clone(),
            reason,
            changes: change,
        };
        // Canceled: the connection ended before the request was sent (nothing reached the
        // controller); any other failure from here on may follow a request it took.
        let resp = sender.send_request(req).await.map_err(|e| {
            if e.is_canceled() {
                unreachable(e.to_string())
            } else {
                lost(e.to_string())
            }
        })?;
        let status = resp.status();
        // Seconds only (the admin API's form); an HTTP date is taken as the default.
        let retry_after = resp
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // A success answer to a change (anything but a read) that this CLI cannot read: the
        // controller accepted it, as said (as `Lost` says of one whose answer never came: a
        // retry would meet its own change).
        let unreadable = |reason: String| ClientError::UnreadableSuccess {
            addr: self.authority.clone(),
            status: status.as_u16(),
            reason,
        };
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => lost(e.to_string()),
                // Past the size limit: a change's success is still a success.
                Err(e) if status.is_success() && change => unreadable(e.to_string()),
                Err(e) => ClientError::Protocol(e.to_string()),
            })?
            .to_bytes();
        if !status.is_success() {
            // Every refusal of the controller is a JSON error body. Anything else came from
            // something that is not its admin API (another service on that port, a proxy): not
            // a refusal of the request (exit 1) but an unusable controller address (exit 2).
            return match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) if status == hyper::StatusCode::SERVICE_UNAVAILABLE => Ok(Err(Unavailable {
                    error: b.error,
                    retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
                })),
                Ok(b) => Err(ClientError::Refused {
                    status: status.as_u16(),
                    error: if status == hyper::StatusCode::UNAUTHORIZED && self.token.is_empty() {
                        format!("{}: {NO_TOKEN_HINT}", b.error)
                    } else {
                        b.error
                    },
                    diagnostics: b.diagnostics,
                }),
                Err(_) => Err(ClientError::Protocol(format!(
                    "HTTP {status} from {} without the admin API's error body ({}): is \
                     --controller the controller's admin address?",
                    self.authority,
                    excerpt(&bytes)
                ))),
            };
        }
        serde_json::from_slice(&bytes).map(Ok).map_err(|e| {
            // Only for an answer in JSON, as the admin API's are: another server's page is no
            // acceptance.
            let json = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok();
            if change && json {
                unreadable(e.to_string())
            } else {
                ClientError::Protocol(e.to_string())
            }
        })
    }
}

/// An answer of the admin API as this CLI reads it (through `Deref`, as `T`) and as the
/// controller wrote it: it serializes as the latter, so `-o json` and `-o yaml` print every
/// field the controller sent, those a newer controller added that this CLI does not know
/// included (as `kubectl -o json` prints the server's object), while the table output reads `T`.
#[derive(Debug, Clone)]
pub struct Answer<T> {
    raw: serde_json::Value,
    typed: T,
}

impl<T: DeserializeOwned> Answer<T> {
    /// The answer `raw` (a whole body, or a part of one), read as `T`.
    pub fn from_value(raw: serde_json::Value) -> Result<Self, serde_json::Error> {
        let typed = T::deserialize(&raw)?;
        Ok(Answer { raw, typed })
    }
}

impl<T> Answer<T> {
    /// Its field `name` (a circuit in a create's or a history's answer), read as `U`.
    pub fn field<U: DeserializeOwned>(&self, name: &str) -> Result<Answer<U>, ClientError> {
        Answer::from_value(self.raw[name].clone()).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

impl<T> std::ops::Deref for Answer<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.typed
    }
}

impl<'de, T: DeserializeOwned> serde::Deserialize<'de> for Answer<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = serde_json::Value::deserialize(d)?;
        Answer::from_value(raw).map_err(serde::de::Error::custom)
    }
}

impl<T> Serialize for Answer<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

/// The start of a body that is not ours, on one line, for an error message.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return "empty body".to_string();
    }
    match one_line.char_indices().nth(120) {
        Some((i, _)) => format!("body starts {:?}...", &one_line[..i]),
        None => format!("body {one_line:?}"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An empty `--token` or `TASMAN_TOKEN` (a CI secret that is unset) counts as unset: the
    /// token file is read. It won over the file, and the request went out with no token (401).
    #[test]
    fn an_empty_token_leaves_the_token_file_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin-token");
        std::fs::write(&file, "tok\n").unwrap();
        for empty in ["", "  "] {
            let c = AdminClient::new(&AdminArgs {
                token: Some(empty.into()),
                token_file: Some(file.clone()),
                ..args("127.0.0.1:1")
            })
            .unwrap();
            assert_eq!(c.token, "tok", "{empty:?}");
        }
    }

    fn args(controller: &str) -> AdminArgs {
        AdminArgs {
            controller: controller.into(),
            token: Some("tok".into()),
            token_file: None,
            output: Output::Text,
            request_timeout: Duration::from_secs(10),
        }
    }

    /// `-o json` prints what the controller sent: a field this CLI does not know (one a newer
    /// controller added) survives, in place, while the CLI reads the fields it knows; a body
    /// without one it needs is refused. (Answers were read into the CLI's types and printed
    /// again, dropping such fields.)
    #[test]
    fn an_answer_prints_the_fields_this_cli_does_not_know() {
        use crate::admin::topology::HistoryEntry;
        let entry = HistoryEntry {
            version: 3,
            author: "ops".into(),
            time_unix_ms: 1_796_000_000_000,
            message: "m".into(),
            origin: crate::controller::records::Origin::Apply,
            current: true,
            bytes: 10,
            sha256: "ab".into(),
        };
        let mut body = serde_json::json!([entry]);
        body[0]["added_by_a_newer_controller"] = serde_json::json!({"x": [1, 2]});
        let rows: Vec<Answer<HistoryEntry>> = serde_json::from_value(body.clone()).unwrap();
        assert_eq!((rows[0].version, rows[0].author.as_str()), (3, "ops"));
        assert_eq!(serde_json::to_value(&rows).unwrap(), body);
        let yaml = serde_saphyr::to_string(&rows).unwrap();
        assert!(yaml.contains("added_by_a_newer_controller"), "{yaml}");
        let mut short = body;
        short[0].as_object_mut().unwrap().remove("version");
        let err = serde_json::from_value::<Vec<Answer<HistoryEntry>>>(short).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
    }

    /// A server on `127.0.0.1:0` answering every request with a 404 of this type and body.
    async fn answering(content_type: &str, body: &str) -> std::net::SocketAddr {
        answering_with("404 Not Found", content_type, body).await
    }

    /// A server on `127.0.0.1:0` answering every request with `status`, this type and body.
    async fn answering_with(status: &str, content_type: &str, body: &str) -> std::net::SocketAddr {
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        addr
    }

    /// A change's success answer this CLI cannot read (a newer controller's) says the change
    /// was made; a read's is still an unexpected answer. (Both were "unexpected answer", which
    /// reads as a failure: a create retried without a key then met its own circuit's name.)
    #[tokio::test]
    async fn an_unreadable_success_of_a_change_says_the_change_was_made() {
        #[derive(serde::Deserialize, Debug)]
        struct Needs {
            #[allow(dead_code)]
            diff: String,
        }
        let addr = answering_with("200 OK", "application/json", r#"{"version":8}"#).await;
        let c = AdminClient::new(&args(&addr.to_string())).unwrap();
        let err = c.post::<_, Needs>("/v1/topology", &()).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::UnreadableSuccess { status: 200, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("a change it asked for was made"),
            "{err}"
        );
        let err = c.get::<Needs>("/v1/topology").await.unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
        // A dry run's answer it cannot read (a newer controller's plan) changed nothing, and
        // says nothing of a change. (It said "a change it asked for was made".)
        let dry = serde_json::json!({"dry_run": true});
        let err = c.post::<_, Needs>("/v1/topology", &dry).await.unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
        assert!(!err.to_string().contains("was made"), "{err}");
        let err = c
            .post::<_, Needs>("/v1/circuits/validate", &())
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
    }

    /// A controller address whose connect never completes (its SYNs dropped: here a listener
    /// whose accept queue is full) is unreachable when the timeout comes, not "a change may
    /// have been made": nothing was sent.
    #[tokio::test]
    async fn a_connect_the_timeout_cuts_off_is_unreachable_not_a_possible_change() {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = sock.listen(0).unwrap();
        let addr = l.local_addr().unwrap();
        // Fill the accept queue (never accepted): later SYNs are dropped.
        let mut held = Vec::new();
        for _ in 0..2 {
            if let Ok(Ok(s)) = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                held.push(s);
            }
        }
        let mut a = args(&addr.to_string());
        a.request_timeout = Duration::from_millis(300);
        let c = AdminClient::new(&a).unwrap();
        let apply = serde_json::json!({"yaml": "x", "dry_run": false});
        let err = c
            .post::<_, serde_json::Value>("/v1/topology", &apply)
            .await
            .unwrap_err();
        assert!(matches!(&err, ClientError::Unreachable { .. }), "{err:?}");
        assert!(!err.to_string().contains("may still"), "{err}");
        drop(held);
    }

    /// A token a header cannot carry (a two-line token file) is refused before any request,
    /// naming where tokens come from. (Every request failed to be built, reported as an
    /// unexpected answer from the controller.)
    #[test]
    fn a_token_a_header_cannot_carry_is_refused_naming_its_flags() {
        let mut a = args("127.0.0.1:1");
        a.token = Some("abc\ndef".into());
        let err = AdminClient::new(&a).err().expect("refused");
        assert!(matches!(err, ClientError::BadToken), "{err:?}");
        assert!(err.to_string().contains("--token-file"), "{err}");
        // Its line break at the end (a mounted secret) is no part of it, as in a token file.
        a.token = Some(" abc\n".into());
        let c = AdminClient::new(&a).expect("a token with spaces around it");
        assert_eq!(c.token, "abc");
        // What a header carries but the controller reads as no token (a byte-order mark, a
        // letter past ASCII, a tab inside) is refused here too, not met with a 401.
        for bad in ["\u{feff}tok", "s\u{e9}cret", "a\tb"] {
            a.token = Some(bad.into());
            let err = AdminClient::new(&a).err().expect("refused");
            assert!(matches!(err, ClientError::BadToken), "{bad:?}: {err:?}");
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    /// Something other than the admin API on --controller's port (a web server's HTML 404)
    /// is an unusable address, exit 2, with the start of its body on one line; it was
    /// reported as the controller refusing the request (exit 1) with the whole page.
    #[tokio::test]
    async fn a_non_controller_answer_is_not_a_refusal() {
        let page = "<html>\n<body>\n<h1>File not found</h1>\n</body></html>";
        let addr = answering("text/html", page).await;
        let c = AdminClient::new(&args(&addr.to_string())).unwrap();
        let err = c.get::<serde_json::Value>("/v1/status").await.unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(
            msg.contains("HTTP 404 Not Found")
                && msg.contains("<html> <body> <h1>File not found</h1>")
                && msg.contains("is --controller the controller's admin address?")
                && !msg.contains('\n'),
            "{msg}"
        );

        // The controller's own refusals (a JSON error body) stay refusals.
        let refusal = r#"{"error":"no circuit \"x\""}"#;
        let addr = answering("application/json", refusal).await;
        let c = AdminClient::new(&args(&addr.to_string())).unwrap();
        let err = c
            .get::<serde_json::Value>("/v1/circuits/x")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Refused { status: 404, error, .. }
                if error == "no circuit \"x\""),
            "{err:?}"
        );
        assert_eq!(err.exit_code(), 1);
    }

    /// A `401` to a request sent with no token says where the controller keeps its token; one
    /// to a request with a token (a wrong one) is the controller's word alone. (The README's
    /// tour, run as written, met a bare "missing or wrong bearer token".)
    #[tokio::test]
    async fn a_refusal_of_no_token_says_where_the_token_is() {
        let refusal = r#"{"error":"missing or wrong bearer token (see --token / TASMAN_TOKEN)"}"#;
        let addr = answering_with("401 Unauthorized", "application/json", refusal).await;
        let mut a = args(&addr.to_string());
        a.token = None;
        let c = AdminClient::new(&a).unwrap();
        let err = c.get::<serde_json::Value>("/v1/status").await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("missing or wrong bearer token")
                && msg.contains("<state>/admin-token")
                && msg.contains("--token-file"),
            "{msg}"
        );
        assert_eq!(err.exit_code(), 1);
        let c = AdminClient::new(&args(&addr.to_string())).unwrap();
        let err = c.get::<serde_json::Value>("/v1/status").await.unwrap_err();
        assert!(!err.to_string().contains("admin-token"), "{err}");
    }

    /// Reads a request whose body is `{}` (the tests' POSTs) to its end, or to the connection's.
    async fn read_request(s: &mut tokio::net::TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.ends_with(b"{}") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// A connection that ends after the request went out, before any answer (the controller
    /// restarting after its commit), says the change may have been made (exit 2); it said it
    /// could not reach the controller.
    #[tokio::test]
    async fn a_connection_lost_after_the_request_says_the_change_may_have_been_made() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                // The whole request read, then closed without a word.
                read_request(&mut s).await;
                drop(s);
            }
        });
        let c = AdminClient::new(&args(&addr.to_string())).unwrap();
        let err = c
            .post::<_, serde_json::Value>("/v1/circuits", &serde_json::json!({}))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Lost { .. }), "{err:?}");
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string()
                .contains("a change requested may still have been made"),
            "{err}"
        );
    }

    /// A request that changes nothing (a read, a dry run) and loses its connection says so
    /// without the "may have been made" warning of a change (it was said of every request).
    #[tokio::test]
    async fn a_lost_read_or_dry_run_does_not_say_a_change_may_have_been_made() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                // The head and the body its Content-Length gives, then closed without a word.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let text = String::from_utf8_lossy(&buf).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                drop(s);
            }
        });
        let c = AdminClient::new(&args(&addr.to_string())).unwrap();
        let dry = c
            .post::<_, serde_json::Value>(
                "/v1/topology",
                &serde_json::json!({"text": "x", "dry_run": true}),
            )
            .await
            .unwrap_err();
        let read = c.get::<serde_json::Value>("/v1/status").await.unwrap_err();
        for err in [dry, read] {
            assert!(matches!(err, ClientError::Lost { .. }), "{err:?}");
            assert_eq!(err.exit_code(), 2);
            assert!(
                !err.to_string().contains("may still have been made"),
                "{err}"
            );
        }
    }

    /// A request timeout is at most a day: a longer one panicked every command (its deadline
    /// past the monotonic clock's range).
    #[test]
    fn a_request_timeout_past_a_day_is_refused() {
        assert_eq!(
            parse_request_timeout("1day"),
            Ok(Duration::from_secs(24 * 3600))
        );
        let err = parse_request_timeout("10000000000000000000s").unwrap_err();
        assert!(err.contains("must be at most 1day"), "{err}");
    }

    /// A server that answers `busy` 503s (the admin API's error body) with `Retry-After:
    /// retry_after`, each `after` its request, then 200: how many requests it took.
    async fn busy_then_ok(
        busy: usize,
        retry_after: u64,
        after: Duration,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                read_request(&mut s).await;
                let n = count.fetch_add(1, Ordering::SeqCst);
                let (status, body) = if n < busy {
                    tokio::time::sleep(after).await;
                    (
                        "503 Service Unavailable",
                        r#"{"error":"8 changes are running"}"#,
                    )
                } else {
                    ("200 OK", r#"{"ok":true}"#)
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                     retry-after: {retry_after}\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        (addr, seen)
    }

    /// A 503 (nothing was changed) is tried again after its `Retry-After`, until the request
    /// timeout; busy to the end, the CLI says nothing was changed and exits 3, apart from a
    /// refusal (1) and an answer lost (2). (A 503 was reported as a refusal, exit 1, at once.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_controller_is_asked_again_then_reported_busy_with_exit_3() {
        let (addr, seen) = busy_then_ok(2, 0, Duration::ZERO).await;
        let c = AdminClient::new(&args(&addr.to_string())).unwrap();
        let v: serde_json::Value = c
            .post("/v1/circuits", &serde_json::json!({}))
            .await
            .unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(seen.load(Ordering::SeqCst), 3);

        // Tries at 0, 1 and 2 s; a fourth would leave less than a quarter of the timeout.
        let (addr, seen) = busy_then_ok(usize::MAX, 1, Duration::ZERO).await;
        let mut a = args(&addr.to_string());
        a.request_timeout = Duration::from_secs(3);
        let c = AdminClient::new(&a).unwrap();
        let err = c
            .post::<_, serde_json::Value>("/v1/circuits", &serde_json::json!({}))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Busy { .. }), "{err:?}");
        assert_eq!(err.exit_code(), 3);
        let tries = seen.load(Ordering::SeqCst);
        assert!((2..=3).contains(&tries), "{tries} tries");
        assert!(
            err.to_string()
                .starts_with("8 changes are running (the controller at")
                && err.to_string().contains("nothing was changed; try again"),
            "{err}"
        );
    }

    /// A 503 that comes late (the controller's own come after it waited 5 or 10 s for its
    /// turn) leaves that long for the next try's answer: the last try is not cut off by the
    /// request timeout (which would say a change may have been made). (A quarter of the timeout
    /// was kept, and a try started that could not be answered in time.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_503_is_tried_again_only_with_time_for_another_as_late() {
        // 503s 3 s late, a 9 s timeout: the second ends at ~6.1 s, and a third as late would
        // end past the timeout, so none is started. (A quarter of the timeout kept, 2.25 s,
        // started it at ~6.2 s, and the timeout cut it: 0.55 s of slack for a loaded machine.)
        let (addr, seen) = busy_then_ok(usize::MAX, 0, Duration::from_secs(3)).await;
        let mut a = args(&addr.to_string());
        a.request_timeout = Duration::from_secs(9);
        let c = AdminClient::new(&a).unwrap();
        let err = c
            .post::<_, serde_json::Value>("/v1/circuits", &serde_json::json!({}))
            .await
            .unwrap_err();
        let tries = seen.load(Ordering::SeqCst);
        assert!(
            matches!(err, ClientError::Busy { .. }),
            "{err:?} after {tries} tries"
        );
        assert_eq!(tries, 2, "tried again once");
    }

    /// An empty token file is refused before any request (exit 2, naming the file); it sent no
    /// token, and the controller's answer pointed at --token instead.
    #[test]
    fn an_empty_token_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        std::fs::write(&path, " \n").unwrap();
        let mut a = args("127.0.0.1:7401");
        a.token = None;
        a.token_file = Some(path.clone());
        let err = AdminClient::new(&a).err().expect("refused");
        assert_eq!(err.exit_code(), 2);
        assert_eq!(
            err.to_string(),
            format!(
                "{}: the token file is empty (--token-file / TASMAN_TOKEN_FILE)",
                path.display()
            )
        );
        std::fs::write(&path, "tok\n").unwrap();
        assert_eq!(AdminClient::new(&a).unwrap().token, "tok");
        // Read no further than a token file's bound: not `/dev/zero` whole (the client grew
        // until it was killed), and no megabyte taken as a token.
        for big in [std::path::PathBuf::from("/dev/zero"), path.clone()] {
            std::fs::write(&path, "a".repeat(1 << 20)).unwrap();
            a.token_file = Some(big.clone());
            let err = AdminClient::new(&a).err().expect("refused");
            assert_eq!(err.exit_code(), 2);
            assert!(
                err.to_string().contains(&format!("{}: ", big.display()))
                    && err
                        .to_string()
                        .contains("over 4096 bytes: not a token file"),
                "{err}"
            );
        }
    }

    /// `--controller` takes HOST:PORT or http://HOST:PORT; https, a path or no port are refused
    /// naming what is wrong (they failed as "failed to lookup address information", "invalid
    /// port value" or "invalid socket address").
    #[test]
    fn controller_address_is_checked() {
        for (given, want) in [
            ("127.0.0.1:7401", "127.0.0.1:7401"),
            ("http://127.0.0.1:7401", "127.0.0.1:7401"),
            ("HTTP://ctl.example:7401/", "ctl.example:7401"),
            ("[::1]:7401", "[::1]:7401"),
            (" localhost:7401 ", "localhost:7401"),
        ] {
            assert_eq!(parse_controller(given).as_deref(), Ok(want), "{given}");
        }
        for (given, why) in [
            ("https://127.0.0.1:7401", "plain HTTP, not https"),
            ("http://127.0.0.1:7401/api", "a path is not allowed"),
            ("ctl.example", "has no port"),
            ("::1", "has no port"),
            ("127.0.0.1:", "is not a port number"),
            ("127.0.0.1:99999", "is not a port number"),
            ("127.0.0.1:0", "is not a port number"),
            (":7401", "has no port"),
        ] {
            let e = parse_controller(given).unwrap_err();
            assert!(e.contains(why), "{given}: {e}");
        }
    }
}
