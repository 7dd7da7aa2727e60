//! The controller client: keeps one mutual-TLS QUIC connection to the controller, applies the
//! snapshots it sends (acknowledging or rejecting each), reports telemetry, keeps the last good
//! snapshot on disk, and reconnects with exponential backoff and jitter.
//!
//! A snapshot is applied and acknowledged first and stored after, by a task of its own that
//! writes the latest one it was given (a `Writer`): an ACK says the router runs on that version,
//! not that the version is on disk. Once the router it feeds drains ([`ControlClient::attach`]),
//! a snapshot is neither applied (its control task applies no more) nor acknowledged nor stored:
//! the session stays up (the controller sees the router draining) and keeps the snapshots it
//! gets as the base of the next delta, and the controller sees the router behind. Revocation lists and renewed certificates from the controller
//! are installed (checked, adopted, written to the TLS directory) by tasks of their own too. A
//! disk that stalls (a hung NFS mount, a failing disk) delays only those, never applying,
//! acknowledging, telemetry or the session's timers; a write slower than [`SLOW_WRITE`] is logged.
//!
//! It also renews the node certificate through the controller: once the presented certificate
//! is due ([`pki::renew_at`]: at 70 % of its lifetime, but 10 s to 24 h after it became valid) it makes a new
//! key, sends `Renew` with its public key and a proof that it holds the key (a signature over
//! the session's TLS binding, [`pki::prove_possession`]), and installs the certificate that comes back (checked
//! by the [`tls::CertResolver`] first, then written to the node's files, then reloaded: the
//! session does not wait for it). A refusal or no answer is retried after [`RENEW_BACKOFF_MIN`],
//! doubling to [`RENEW_BACKOFF_MAX`]; the certificate in use keeps working until it expires.
//!
//! A controller whose session stops reading or stops talking while its connection stays up
//! (QUIC keep-alives hold a connection whose session task is stuck) would hold the client for
//! good: a write waits for flow-control credit that never comes, and a read for a frame that
//! never comes. So every write fails the session once the stream takes no byte of it for
//! [`WRITE_STALL_TIMEOUT`] ([`close::WRITE_STALLED`]), and [`SILENCE_TIMEOUT`] without any byte
//! from the controller ends it too ([`close::CONTROLLER_SILENT`]); the client then reconnects
//! with its back-off, running on its last good snapshot meanwhile.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use topology::NodeId;

use super::disk::{self, StoredSnapshot};
use super::proto::{self, FromRouter, MAX_FROM_ROUTER, MAX_TO_ROUTER, ProtoError, ToRouter, clip};
use crate::codes::close;
use crate::pki;
use crate::snapshot::Snapshot;
use crate::telemetry::TelemetryReport;
use crate::tls::{self, PeerNames, Renewal, TlsIdentity};

/// The first retry of a refused or unanswered renewal comes this long after the request (and no
/// two requests come closer together: the controller allows one per 10 s).
pub const RENEW_BACKOFF_MIN: Duration = Duration::from_secs(30);
/// Retries of renewals back off to at most this.
pub const RENEW_BACKOFF_MAX: Duration = Duration::from_secs(600);

/// The certificate name of the controller.
pub const CONTROLLER_NAME: &str = "controller";

/// How long a write to the control stream may go without the controller taking a byte of it
/// before the session ends ([`close::WRITE_STALLED`]): the controller stopped reading. A slow
/// controller takes bytes as its acknowledgements free flow-control credit and is never cut; a
/// router's writes are small (a report a second), so only a controller whose session stopped
/// reading stalls this long. The controller's bound on its writes to a router is the same.
/// [`ClientConfig::write_stall_timeout`] overrides it (tests).
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the client waits for any byte from the controller before it ends the session
/// ([`close::CONTROLLER_SILENT`]) and reconnects. The controller writes at least a heartbeat
/// every 2 s (`distribute::HEARTBEAT`), so this is ten heartbeats: a controller busy with a
/// large apply or short of CPU delays a few, not ten. Bytes count, not whole frames: a large
/// snapshot over a slow link keeps its session alive as long as it keeps arriving. It is above
/// the QUIC idle timeout (10 s), which ends a connection whose peer is gone first: this catches a
/// connection that is up but whose session stopped talking. [`ClientConfig::silence_timeout`]
/// overrides it (tests).
pub const SILENCE_TIMEOUT: Duration = Duration::from_secs(20);
/// A disk write of the client (the stored snapshot, an installed revocation list or renewed
/// certificate) running longer than this is logged at warn (and again when it ends): the disk
/// may be stuck. The session does not wait for it either way.
pub const SLOW_WRITE: Duration = Duration::from_secs(10);

pub struct ClientConfig {
    pub controller: SocketAddr,
    pub node: NodeId,
    pub identity: TlsIdentity,
    /// What the control connection presents (share the router's so a reloaded certificate is
    /// used here too); `None`: one made from `identity`.
    pub cert: Option<Arc<tls::CertResolver>>,
    /// Where the last good snapshot is kept; `None`: memory only.
    pub state_dir: Option<PathBuf>,
    /// After this long without hearing from the controller, the router says so loudly (and
    /// keeps forwarding on what it has).
    pub max_stale: Duration,
    pub telemetry_interval: Duration,
    /// How long a renewal request holds the next one back at first ([`RENEW_BACKOFF_MIN`]);
    /// the wait doubles with each request up to `renew_backoff_max` ([`RENEW_BACKOFF_MAX`]) and
    /// starts again from here once a certificate is installed. No flag sets these: tests
    /// shorten them.
    pub renew_backoff_min: Duration,
    pub renew_backoff_max: Duration,
    /// A write the controller takes no byte of for this long ends the session
    /// ([`WRITE_STALL_TIMEOUT`]). No flag sets it: tests shorten it.
    pub write_stall_timeout: Duration,
    /// No byte from the controller for this long ends the session ([`SILENCE_TIMEOUT`]). No flag
    /// sets it: tests shorten it. Keep it well above the controller's 2 s heartbeat.
    pub silence_timeout: Duration,
}

impl ClientConfig {
    pub fn new(controller: SocketAddr, node: NodeId, identity: TlsIdentity) -> Self {
        ClientConfig {
            controller,
            node,
            identity,
            cert: None,
            state_dir: None,
            max_stale: Duration::from_secs(24 * 3600),
            telemetry_interval: Duration::from_secs(1),
            renew_backoff_min: RENEW_BACKOFF_MIN,
            renew_backoff_max: RENEW_BACKOFF_MAX,
            write_stall_timeout: WRITE_STALL_TIMEOUT,
            silence_timeout: SILENCE_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("control stream: {0}")]
    Proto(#[from] ProtoError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("controller refused this router: {0}")]
    Refused(String),
    #[error("state directory: {0}")]
    StateDir(disk::DiskError),
    #[error("timed out connecting to the controller")]
    Timeout,
    #[error(
        "the controller closed this control session for a newer one of this node (close code \
         superseded)"
    )]
    Superseded,
    #[error("the controller took no byte of the control stream for {0:?}: it stopped reading")]
    WriteStalled(Duration),
    #[error("no byte from the controller for {0:?}: its session stopped talking")]
    Silent(Duration),
    /// The node certificate was renewed (or taken up from its files) during the session: the
    /// controller must see the new one (it renews only what a session presented, and refuses
    /// an expired one).
    #[error("the node certificate changed: reconnecting to present the new one")]
    Renewed,
    /// The client's tasks ended before a snapshot came (a bug: they run until the client is
    /// dropped); starting would hand the data plane the empty placeholder.
    #[error("the control client stopped before a snapshot came")]
    Stopped,
}

impl ControlError {
    /// The controller refused this router for `reason`, its word (up to a whole frame of it),
    /// kept to [`proto::MAX_REASON`] bytes: it is logged at each reconnect.
    fn refused(reason: String) -> Self {
        ControlError::Refused(clip(reason))
    }

    /// The code to close the control connection with, for ends that are the controller's doing
    /// and that it would not know of otherwise (a refusal is the controller's own close; the
    /// others are a connection already gone).
    fn close_code(&self) -> Option<u32> {
        match self {
            ControlError::WriteStalled(_) => Some(close::WRITE_STALLED),
            ControlError::Silent(_) => Some(close::CONTROLLER_SILENT),
            ControlError::Proto(ProtoError::TooLarge { .. } | ProtoError::Malformed(_)) => {
                Some(close::PROTOCOL)
            }
            // The controller finished its stream inside a frame: its doing, not a lost link.
            ControlError::Proto(ProtoError::Io(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                Some(close::PROTOCOL)
            }
            ControlError::Proto(ProtoError::Io(_))
            | ControlError::Tls(_)
            | ControlError::Endpoint(_)
            | ControlError::Connect(_)
            | ControlError::Connection(_)
            | ControlError::Write(_)
            | ControlError::Refused(_)
            | ControlError::Timeout
            | ControlError::Superseded
            | ControlError::StateDir(_)
            | ControlError::Stopped => None,
            ControlError::Renewed => Some(close::NORMAL),
        }
    }
}

/// Where reports come from; `None` when the router is gone.
pub type TelemetrySource = Arc<dyn Fn() -> Option<TelemetryReport> + Send + Sync>;

struct Shared {
    cfg: ClientConfig,
    telemetry: Mutex<Option<TelemetrySource>>,
    /// The drain flag of the router this client feeds ([`ControlClient::attach`]); `None`: no
    /// router attached (every snapshot is handed over).
    drain: Mutex<Option<watch::Receiver<bool>>>,
    /// The QUIC endpoint of the router this client feeds ([`ControlClient::attach`]): a version
    /// that moves the node is checked against where it is bound.
    endpoint: Mutex<Option<quinn::Endpoint>>,
    /// Whether a snapshot was held back for the drain yet (said once at info).
    held_back: AtomicBool,
    connected: AtomicBool,
    /// Control connections established so far (1 = never reconnected).
    connects: AtomicU64,
    stale: AtomicBool,
    /// Unix ms of the last message from the controller (or of the snapshot loaded from disk).
    last_contact: LastContact,
    /// The topology version of the snapshot in force.
    topology_version: AtomicU64,
    /// Telemetry reports sent cut to the controller's frame limit ([`telemetry_frame`]).
    telemetry_trimmed: AtomicU64,
    /// Snapshots taken with a version below the one held ([`handle`]).
    version_regressions: AtomicU64,
    /// The snapshot version the controller last named (a heartbeat's, or a snapshot's it
    /// sent): above the router's while it runs on an older one (one it refused, or held back
    /// in a drain). 0: none heard yet.
    controller_version: AtomicU64,
    /// What the control connection presents (the router's, when shared), and what renewals
    /// replace.
    cert: Arc<tls::CertResolver>,
    renew: Arc<Mutex<RenewSchedule>>,
    /// Stores applied snapshots in `cfg.state_dir` (`None`: no state dir).
    store: Option<Writer<StoredSnapshot>>,
    /// Records the last word from the controller in `cfg.state_dir` ([`disk::save_contact`]),
    /// at most every [`contact_every`].
    contact: Option<Writer<u64>>,
    /// Unix ms of the last contact sent to `contact`.
    contact_sent_ms: AtomicU64,
    /// Installs the revocation lists the controller sends ([`tls::install_crl`]).
    crls: Writer<String>,
    /// Installs renewed certificates ([`tls::install`]).
    certs: Writer<Arc<Renewed>>,
    /// Notified when `certs` installed one: the session reconnects to present it.
    installed: Arc<tokio::sync::Notify>,
}

/// A certificate the controller sent for a renewal request, with that request's key.
struct Renewed {
    key: rcgen::KeyPair,
    chain_pem: String,
}

/// Disk writes the control session hands off instead of waiting for them: the latest value
/// [`Writer::send`] was given is written by a task of its own, one write at a time, off the async
/// workers. Values sent while a write runs replace each other (the latest is written next), so a
/// disk that stalls holds one blocking thread and delays only these writes, never the session.
/// A write running longer than [`SLOW_WRITE`] is logged at warn, and again when it ends. A write
/// that fails (`write` returns false: a full disk) is tried again after [`RETRY_MIN`], doubling
/// to [`RETRY_MAX`], until it succeeds or a newer value replaces it; until then it does not
/// count as written ([`Writer::flush`] waits for it). (A failed write counted as written and was
/// not tried again: a router whose controller then went away, restarted after space was freed,
/// came back on an older snapshot, or none, and `close` said all was written.)
struct Writer<T> {
    /// The latest value, numbered.
    tx: watch::Sender<Option<(u64, T)>>,
    /// The number of the last value written (0: none yet).
    written: watch::Receiver<u64>,
}

/// The first wait before a failed write is tried again ([`Writer`]).
const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between tries of a write that keeps failing.
const RETRY_MAX: Duration = Duration::from_secs(30);

impl<T: Clone + Send + Sync + 'static> Writer<T> {
    /// The writer, and its task (abort it to stop the writer; a write already running on its
    /// blocking thread still ends). `what` names a write in the logs; `write` does one and says
    /// whether it succeeded.
    fn spawn(
        what: &'static str,
        write: impl Fn(T) -> bool + Send + Sync + 'static,
    ) -> (Self, JoinHandle<()>) {
        let (tx, mut rx) = watch::channel(None::<(u64, T)>);
        let (written_tx, written) = watch::channel(0u64);
        let write = Arc::new(write);
        let task = tokio::spawn(async move {
            // The last write failed: the latest value is tried again after `retry`, unless a
            // newer one comes first.
            let (mut failed, mut retry) = (false, RETRY_MIN);
            loop {
                if failed {
                    tokio::select! {
                        r = rx.changed() => {
                            if r.is_err() {
                                return;
                            }
                            retry = RETRY_MIN;
                        }
                        () = tokio::time::sleep(retry) => retry = (retry * 2).min(RETRY_MAX),
                    }
                } else if rx.changed().await.is_err() {
                    return;
                }
                let Some((n, value)) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let w = write.clone();
                let started = tokio::time::Instant::now();
                let mut job = tokio::task::spawn_blocking(move || w(value));
                let ok = match tokio::time::timeout(SLOW_WRITE, &mut job).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(
                            "{what} has taken over {}s so far (is the disk stuck?); the \
                             control session goes on without it, and a newer one waits for it",
                            SLOW_WRITE.as_secs()
                        );
                        let r = job.await;
                        tracing::warn!("{what} ended after {}s", started.elapsed().as_secs());
                        r
                    }
                };
                failed = !matches!(ok, Ok(true));
                if failed {
                    tracing::warn!("{what} failed; trying again in {}s", retry.as_secs());
                } else {
                    retry = RETRY_MIN;
                    written_tx.send_replace(n);
                }
            }
        });
        (Writer { tx, written }, task)
    }

    /// Has `value` written, after the write running now (if any), in place of any value still
    /// waiting. Returns at once.
    fn send(&self, value: T) {
        self.tx.send_modify(|v| {
            let n = v.as_ref().map_or(0, |(n, _)| *n) + 1;
            *v = Some((n, value));
        });
    }

    /// Whether the latest value sent is written (or none was sent).
    fn caught_up(&self) -> bool {
        let last = self.tx.borrow().as_ref().map_or(0, |(n, _)| *n);
        *self.written.borrow() >= last
    }

    /// Waits until the latest value sent is written, for at most `within`. False when it was
    /// not written by then (a stuck disk, or the writer's task is gone).
    async fn flush(&self, within: Duration) -> bool {
        let Some(last) = self.tx.borrow().as_ref().map(|(n, _)| *n) else {
            return true;
        };
        let mut written = self.written.clone();
        matches!(
            tokio::time::timeout(within, written.wait_for(|w| *w >= last)).await,
            Ok(Ok(_))
        )
    }
}

/// When the next renewal request may go, across sessions: each request (answered or not) holds
/// the next one back by the back-off, which starts at `min` and doubles with each request up to
/// `max`; an installed certificate starts it again from `min`. Pure: the caller passes the time.
#[derive(Debug, Clone)]
struct RenewSchedule {
    min: Duration,
    max: Duration,
    /// How long the next request holds the one after it back.
    backoff: Duration,
    /// No request before this.
    not_before: Option<tokio::time::Instant>,
}

impl RenewSchedule {
    fn new(min: Duration, max: Duration) -> Self {
        RenewSchedule {
            min,
            max,
            backoff: min,
            not_before: None,
        }
    }

    /// When the next request may go, the certificate being due at `due`.
    fn next(&self, due: tokio::time::Instant) -> tokio::time::Instant {
        self.not_before.map_or(due, |nb| due.max(nb))
    }

    /// How long after `now` the back-off allows the next request.
    fn retry_in(&self, now: tokio::time::Instant) -> Duration {
        self.not_before
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    }

    /// A request goes at `now`: the next may go after the back-off, which doubles.
    fn attempted(&mut self, now: tokio::time::Instant) {
        self.not_before = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(self.max);
    }

    /// A renewed certificate was installed at `now`: the back-off starts again from `min` (and
    /// holds a request back by `min` at most).
    fn succeeded(&mut self, now: tokio::time::Instant) {
        self.backoff = self.min;
        let soonest = now + self.min;
        self.not_before = Some(self.not_before.map_or(soonest, |t| t.min(soonest)));
    }
}

/// A running controller client. Dropping it stops the client.
pub struct ControlClient {
    shared: Arc<Shared>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    _tasks: Tasks,
    /// This router's hold on its state directory ([`disk::lock`]), let go with the client.
    _state_lock: Option<disk::StateLock>,
}

impl ControlClient {
    /// Stops the client once what it was given to write is on disk: the latest snapshot (a
    /// router restarted while the controller is away starts from it), revocation lists and a
    /// renewed certificate; waits at most `within` for them (a stuck disk). False when
    /// something was left unwritten. Dropping the client stops it at once.
    pub async fn close(self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut all = true;
        if let Some(store) = &self.shared.store {
            all &= store.flush(left()).await;
        }
        if let Some(contact) = &self.shared.contact {
            all &= contact.flush(left()).await;
        }
        all &= self.shared.crls.flush(left()).await;
        all &= self.shared.certs.flush(left()).await;
        if !all {
            tracing::warn!("stopping with writes to disk left unfinished (is the disk stuck?)");
        }
        all
    }
}

/// The client's tasks, aborted when dropped: with the client, or with [`ControlClient::start`]'s
/// future when a caller cancels it (a timeout) before it returned, which would otherwise leave
/// them running detached (dialling the controller for good, writing into a state directory whose
/// lock went with the future). Declared after the lock, so dropped before it.
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    fn push(&mut self, t: JoinHandle<()>) {
        self.0.push(t);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long [`ControlClient::start`] waits for the stored snapshot before it goes on without
/// it (and waits for the controller's): a stuck state directory must not hold the start.
pub const STORED_READ_LIMIT: Duration = Duration::from_secs(5);

/// [`disk::lock`] on `dir`, on a blocking thread bounded like the stored snapshot's read. Only a
/// directory that another router holds fails the start; a lock that cannot be taken (a
/// read-only or stuck disk) is logged and the router goes on without it, and without storing
/// anything there, as it does with a snapshot it cannot store: a disk must not stop routing.
async fn lock_state_dir(dir: PathBuf) -> Result<Option<disk::StateLock>, ControlError> {
    let shown = dir.display().to_string();
    let lock = tokio::task::spawn_blocking(move || disk::lock(&dir));
    match tokio::time::timeout(STORED_READ_LIMIT, lock).await {
        Ok(Ok(Ok(held))) => Ok(Some(held)),
        Ok(Ok(Err(e @ disk::DiskError::InUse { .. }))) => Err(ControlError::StateDir(e)),
        Ok(Ok(Err(e))) => {
            tracing::warn!(
                "going on without a lock on the state directory, and without storing snapshots \
                 there: {e}"
            );
            Ok(None)
        }
        Ok(Err(e)) => {
            tracing::warn!(
                "going on without a lock on the state directory {shown}, and without storing \
                 snapshots there: {e}"
            );
            Ok(None)
        }
        Err(_) => {
            tracing::warn!(
                limit = ?STORED_READ_LIMIT,
                "going on without a lock on the state directory {shown}, and without storing \
                 snapshots there: not taken in time (a stuck state directory?)"
            );
            Ok(None)
        }
    }
}

/// How often a start whose stored snapshot gives this node an address that is not on this host
/// yet ([`FromDisk::Late`]) tries to bind it again.
pub const LATE_ADDRESS_EVERY: Duration = Duration::from_secs(1);

/// The snapshot stored on disk, as a start can use it ([`stored_snapshot`]).
#[derive(Debug)]
enum FromDisk {
    /// Its address for this node can be bound here (or is in use: most often by this router's
    /// previous process, still going away).
    Ready(StoredSnapshot),
    /// Its address for this node is not one of this host's (`EADDRNOTAVAIL`): not yet, at boot
    /// before the network is configured, or never. The start runs on it once the address can
    /// be bound, unless the controller's snapshot comes first ([`wait_bindable`]).
    Late(StoredSnapshot, SocketAddr),
}

#[cfg(test)]
impl FromDisk {
    fn snapshot(&self) -> &StoredSnapshot {
        match self {
            FromDisk::Ready(s) | FromDisk::Late(s, _) => s,
        }
    }
}

/// Waits until `addr` can be bound (`bindable`, tried at once and then every `every`) while
/// `wanted()` holds; true when it can.
async fn wait_bindable(
    addr: SocketAddr,
    every: Duration,
    bindable: impl Fn(SocketAddr) -> Result<(), std::io::ErrorKind>,
    wanted: impl Fn() -> bool,
) -> bool {
    loop {
        if !wanted() {
            return false;
        }
        if bindable(addr).is_ok() {
            return true;
        }
        tokio::time::sleep(every).await;
    }
}

/// Hands the stored snapshot `s` to the data plane unless a snapshot is there already (the
/// controller's, which is newer), running `first` before any receiver can see it; true when
/// handed over.
fn hand_stored(
    tx: &watch::Sender<Arc<Snapshot>>,
    s: &StoredSnapshot,
    first: impl FnOnce(),
) -> bool {
    tx.send_if_modified(|cur| {
        if cur.version != 0 {
            return false;
        }
        first();
        *cur = Arc::new(Snapshot {
            version: s.version,
            topology: s.topology.clone(),
            live: s.live.clone(),
            circuits: s.circuits.clone(),
        });
        true
    })
}

/// The snapshot stored in `dir`, when it can be read within [`STORED_READ_LIMIT`] and holds
/// `node`. Read on a blocking thread: a read that never returns (a hung mount, a failing disk)
/// holds that thread only, and the start goes on without it.
async fn stored_snapshot(dir: PathBuf, node: &NodeId) -> Option<FromDisk> {
    // With the last word from the controller recorded since that version came, if later.
    let read = tokio::task::spawn_blocking(move || {
        let contact = disk::load_contact(&dir);
        disk::load(&dir).map(|stored| {
            stored.map(|mut s| {
                s.received_unix_ms = s.received_unix_ms.max(contact.unwrap_or(0));
                s
            })
        })
    });
    let loaded = match tokio::time::timeout(STORED_READ_LIMIT, read).await {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(e)) => {
            tracing::warn!("ignoring the stored snapshot: its read failed: {e}");
            return None;
        }
        Err(_) => {
            tracing::warn!(
                limit = ?STORED_READ_LIMIT,
                "the stored snapshot was not read in time (a stuck state directory?): waiting \
                 for the controller's instead"
            );
            return None;
        }
    };
    match loaded {
        // Version 0 is no snapshot (the placeholder), as the controller's is refused: only a
        // damaged or hand-made file holds one.
        Ok(Some(s)) if s.version == 0 => {
            tracing::warn!(
                "ignoring the stored snapshot (waiting for the controller's): version 0"
            );
            None
        }
        // Checked as the controller's snapshots are (limits, names, what the node serves): a
        // damaged file, or one stored by a release before a check, is not run.
        Ok(Some(s)) => match check_topology(node, &s.topology).map(|()| {
            s.topology
                .node(node.as_str())
                .map(|n| (n.address, try_bind(n.address)))
        }) {
            Err(refusal) => {
                tracing::warn!(
                    "ignoring the stored snapshot (waiting for the controller's): {}",
                    refusal.reason
                );
                None
            }
            Ok(Some((_, Ok(())))) => Some(FromDisk::Ready(s)),
            Ok(Some((addr, Err(std::io::ErrorKind::AddrNotAvailable)))) => {
                tracing::warn!(
                    "node {node}'s QUIC address {addr} in the stored snapshot is not on this host \
                     (yet): running on that snapshot once it is, unless the controller's comes first"
                );
                Some(FromDisk::Late(s, addr))
            }
            // The router would exit at every start, before the controller could send it another.
            Ok(Some((_, Err(kind)))) => {
                tracing::warn!(
                    "ignoring the stored snapshot (waiting for the controller's): node {node}'s QUIC address in it cannot be bound on this host: {kind}"
                );
                None
            }
            Ok(None) => {
                tracing::warn!(node = %node, "stored snapshot does not contain this node; ignoring it");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("ignoring the stored snapshot: {e}");
            None
        }
    }
}

impl ControlClient {
    /// Starts the client and returns once the router has a snapshot to run on: the one on disk
    /// (at once), else the controller's first one (waits, reconnecting, as long as it takes).
    pub async fn start(cfg: ClientConfig) -> Result<ControlClient, ControlError> {
        let state_lock = match &cfg.state_dir {
            Some(dir) => lock_state_dir(dir.clone()).await?,
            None => None,
        };
        let from_disk = match &cfg.state_dir {
            Some(dir) => stored_snapshot(dir.clone(), &cfg.node).await,
            None => None,
        };
        // Version 0, the placeholder: no snapshot yet.
        let (tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
        let cert = match &cfg.cert {
            Some(c) => c.clone(),
            None => tls::CertResolver::new(&cfg.identity)?,
        };
        let schedule = Arc::new(Mutex::new(RenewSchedule::new(
            cfg.renew_backoff_min,
            cfg.renew_backoff_max,
        )));
        let mut tasks = Tasks::default();
        // Written only under the directory's lock: without it (one that could not be taken for
        // another reason than a router holding it: a lock file that cannot be opened, a file
        // system without locks), two routers on one directory would rename over each other's
        // files, each to start from the other's. The stored snapshot is still read.
        let writable = cfg.state_dir.clone().filter(|_| state_lock.is_some());
        let store = writable.clone().map(|dir| {
            let (writer, task) = Writer::spawn("storing the snapshot", move |s: StoredSnapshot| {
                match disk::save(&dir, &s) {
                    Ok(()) => {
                        tracing::debug!(version = s.version, "stored the snapshot");
                        true
                    }
                    // Over the stored form's bound: writing it again would only encode it
                    // again (up to the bound) every 30 s. The stored snapshot stays.
                    Err(e @ disk::DiskError::TooLarge { .. }) => {
                        tracing::error!(version = s.version, "could not store the snapshot: {e}");
                        true
                    }
                    // A full disk must not stop routing: the snapshot applied, the error is
                    // logged, and the write tried again.
                    Err(e) => {
                        tracing::error!(version = s.version, "could not store the snapshot: {e}");
                        false
                    }
                }
            });
            tasks.push(task);
            writer
        });
        let contact = writable.map(|dir| {
            let (writer, task) = Writer::spawn("recording the controller's last word", move |ms| {
                disk::save_contact(&dir, ms)
                    .inspect_err(|e| tracing::warn!("could not record the last contact: {e}"))
                    .is_ok()
            });
            tasks.push(task);
            writer
        });
        // File writes and signature checks, each a Writer: a stuck TLS directory holds neither
        // the session nor more than one blocking thread each.
        let c = cert.clone();
        let (crls, task) = Writer::spawn("installing the revocation lists", move |pem: String| {
            tls::install_crl(&c, &pem);
            // A refusal is logged and counted (a newer list is sent in full); lists put in
            // force but not written are tried again (the same push writes them), so that a
            // restart does not go back to an older file.
            !c.crls_unsaved()
        });
        tasks.push(task);
        let installed = Arc::new(tokio::sync::Notify::new());
        let (c, s, i) = (cert.clone(), schedule.clone(), installed.clone());
        let (certs, task) = Writer::spawn(
            "installing the renewed certificate",
            move |r: Arc<Renewed>| {
                if install_renewed(&c, &s, &r) {
                    i.notify_one();
                }
                // A failure is logged and counted; the schedule, told of no success, asks again.
                true
            },
        );
        tasks.push(task);
        let shared = Arc::new(Shared {
            cfg,
            telemetry: Mutex::new(None),
            drain: Mutex::new(None),
            endpoint: Mutex::new(None),
            held_back: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            stale: AtomicBool::new(false),
            last_contact: LastContact::new(now_ms()),
            topology_version: AtomicU64::new(0),
            telemetry_trimmed: AtomicU64::new(0),
            version_regressions: AtomicU64::new(0),
            controller_version: AtomicU64::new(0),
            cert,
            renew: schedule,
            store,
            contact,
            contact_sent_ms: AtomicU64::new(0),
            crls,
            certs,
            installed,
        });
        let adopt = |shared: &Shared, tx: &watch::Sender<Arc<Snapshot>>, s: &StoredSnapshot| {
            let adopted = hand_stored(tx, s, || {
                // The last word from the controller (not later than now: a clock set back
                // since).
                shared.last_contact.stored(s.received_unix_ms.min(now_ms()));
                shared
                    .topology_version
                    .store(s.topology_version, Ordering::Relaxed);
            });
            if adopted {
                tracing::info!(
                    version = s.version,
                    topology_version = s.topology_version,
                    "running on the snapshot stored on disk until the controller answers"
                );
            }
        };
        match from_disk {
            Some(FromDisk::Ready(s)) => adopt(&shared, &tx, &s),
            Some(FromDisk::Late(s, addr)) => {
                let (shared, tx) = (shared.clone(), tx.clone());
                tasks.push(tokio::spawn(async move {
                    let waiting = || tx.borrow().version == 0;
                    if wait_bindable(addr, LATE_ADDRESS_EVERY, try_bind, waiting).await {
                        adopt(&shared, &tx, &s);
                    }
                }));
            }
            None => {}
        }
        let endpoint = client_endpoint(&shared.cfg, &shared.cert)?;
        let session = tasks.0.len();
        tasks.push(tokio::spawn(run(shared.clone(), endpoint, tx)));
        tasks.push(tokio::spawn(staleness_watch(shared.clone(), rx.clone())));
        // The placeholder (version 0) is never handed out. The session task ending first (it
        // runs until the client is dropped) fails the start, also while the task waiting for a
        // stored snapshot's address still holds a sender. (Watched through `tasks`, which
        // aborts every task if this start is cancelled.)
        let first = tokio::select! {
            r = rx.wait_for(|s| s.version != 0) => r.is_ok(),
            _ = &mut tasks.0[session] => false,
        };
        if !first {
            return Err(ControlError::Stopped);
        }
        Ok(ControlClient {
            shared,
            snapshots: rx,
            _tasks: tasks,
            _state_lock: state_lock,
        })
    }

    /// The router's snapshot channel (feed it to the data plane).
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// Where telemetry reports come from (the running router); until set, none are sent.
    pub fn set_telemetry(&self, source: TelemetrySource) {
        if let Ok(mut t) = self.shared.telemetry.lock() {
            *t = Some(source);
        }
    }

    /// Feeds `router`, the data plane given [`ControlClient::snapshots`]: its telemetry is what
    /// the client reports ([`ControlClient::set_telemetry`]), and once it drains the client
    /// hands it no more snapshots and acknowledges none (a draining router's control task
    /// applies no more, and an ACK says the router applied the version).
    pub fn attach(&self, router: &crate::RouterHandle) {
        self.set_telemetry(router.telemetry_source());
        if let Ok(mut d) = self.shared.drain.lock() {
            *d = Some(router.shared.shutdown.clone());
        }
        if let Ok(mut e) = self.shared.endpoint.lock() {
            *e = Some(router.shared.endpoint.clone());
        }
        let status = ControlStatus(Arc::downgrade(&self.shared));
        router.shared.control.store(Some(Arc::new(status)));
    }

    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// How many control connections were established (more than 1: it reconnected).
    pub fn connects(&self) -> u64 {
        self.shared.connects.load(Ordering::Relaxed)
    }

    /// Unix ms of the last word from the controller: of this process, or the one recorded on
    /// disk before a restart (or the stored snapshot's arrival), what staleness counts from.
    pub fn last_contact_unix_ms(&self) -> u64 {
        self.shared.last_contact.get()
    }

    /// True once the router has gone `max_stale` without hearing from the controller.
    pub fn is_stale(&self) -> bool {
        self.shared.stale.load(Ordering::Relaxed)
    }

    pub fn topology_version(&self) -> u64 {
        self.shared.topology_version.load(Ordering::Relaxed)
    }

    /// How many telemetry reports went out cut to the controller's frame limit (a router with
    /// more neighbours than one report holds: about 10,000).
    pub fn telemetry_trimmed(&self) -> u64 {
        self.shared.telemetry_trimmed.load(Ordering::Relaxed)
    }

    /// How many snapshots the controller sent with a version below the one the router held
    /// (taken, and logged at warn): a controller whose state directory was restored from an
    /// older backup numbers its versions from the backup's.
    pub fn version_regressions(&self) -> u64 {
        self.shared.version_regressions.load(Ordering::Relaxed)
    }

    /// The snapshot version the controller last named ([`ToRouter::Heartbeat`] or a snapshot
    /// it sent); 0 before it named one.
    pub fn controller_version(&self) -> u64 {
        self.shared.controller_version.load(Ordering::Relaxed)
    }
}

/// The control session's state on the router's `/metrics` page (set by
/// [`ControlClient::attach`]); once the client is gone, only `tasman_control_connected 0`.
pub struct ControlStatus(std::sync::Weak<Shared>);

impl ControlStatus {
    const CONNECTED_HELP: &str = "1 while the control connection to the controller is up.";

    /// Appends the session's series to a scrape of `node`.
    pub fn render_metrics(&self, node: &str, s: &mut String) {
        let Some(c) = self.0.upgrade() else {
            // Stopped (a router whose control client ended): not connected, rather than a
            // series that vanishes (an alert on `control_connected == 0` would not fire).
            let (name, help) = ("tasman_control_connected", Self::CONNECTED_HELP);
            crate::metrics::series(s, node, name, "gauge", help, 0u64);
            return;
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let series: [(&str, &str, &str, u64); 7] = [
            (
                "control_connected",
                "gauge",
                Self::CONNECTED_HELP,
                u64::from(c.connected.load(Ordering::Relaxed)),
            ),
            (
                "control_connects_total",
                "counter",
                "Control connections established (more than 1: it reconnected).",
                load(&c.connects),
            ),
            (
                "control_last_contact_timestamp_seconds",
                "gauge",
                "Unix time of the last word from the controller (or of the stored snapshot's arrival, until one came); staleness counts from it.",
                c.last_contact.get() / 1000,
            ),
            (
                "snapshot_stale",
                "gauge",
                "1 once nothing was heard from the controller for --max-stale: the router runs on its last snapshot.",
                u64::from(c.stale.load(Ordering::Relaxed)),
            ),
            (
                "control_controller_version",
                "gauge",
                "The snapshot version the controller last named (its heartbeats name the one it publishes); above tasman_snapshot_version while the router runs on an older one (one it refused: tasman status says why).",
                load(&c.controller_version),
            ),
            (
                "control_version_regressions_total",
                "counter",
                "Snapshots the controller sent with a version below the one held, taken (its state restored from an older backup?).",
                load(&c.version_regressions),
            ),
            (
                "control_telemetry_trimmed_total",
                "counter",
                "Telemetry reports sent cut to the controller's frame limit.",
                load(&c.telemetry_trimmed),
            ),
        ];
        for (name, kind, help, value) in series {
            crate::metrics::series(s, node, &format!("tasman_{name}"), kind, help, value);
        }
    }
}

fn client_endpoint(
    cfg: &ClientConfig,
    cert: &Arc<tls::CertResolver>,
) -> Result<quinn::Endpoint, ControlError> {
    let peers = PeerNames::new([CONTROLLER_NAME.to_string()]);
    let mut transport = quinn::TransportConfig::default();
    // The router opens the one stream of the connection (its control stream) and reads no
    // stream the controller would open: a stream granted and never read holds what the peer
    // sends into it (up to a stream window) until the connection ends. So it grants none.
    transport.max_concurrent_bidi_streams(0u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(
        Duration::from_secs(10)
            .try_into()
            .map_err(|_| ControlError::Timeout)?,
    ));
    let client_cfg = tls::client_config_with(cert, &peers, Arc::new(transport))?;
    let bind: SocketAddr = if cfg.controller.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .map_err(|_| ControlError::Timeout)?;
    let mut ep = quinn::Endpoint::client(bind).map_err(ControlError::Endpoint)?;
    ep.set_default_client_config(client_cfg);
    Ok(ep)
}

/// Exponential backoff 100 ms .. 10 s with full jitter on the upper half.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
    fn delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let half = base / 2;
        half + up_to(half)
    }
}

/// A time drawn uniformly from zero to `d`.
fn up_to(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random::<f64>())
}

async fn run(shared: Arc<Shared>, endpoint: quinn::Endpoint, tx: watch::Sender<Arc<Snapshot>>) {
    let mut backoff = Backoff { next: Backoff::MIN };
    // The key of the renewal asked for and not answered yet.
    let mut pending: Option<rcgen::KeyPair> = None;
    // Sessions in a row the controller closed for a newer one of this node.
    let mut superseded = 0u32;
    loop {
        let started = tokio::time::Instant::now();
        let heard = shared.last_contact.get();
        let res = session(&shared, &endpoint, &tx, &mut pending).await;
        let spoke = shared.last_contact.get() != heard;
        shared.connected.store(false, Ordering::Relaxed);
        // The answer would have come on that session: the request is lost with it.
        if pending.take().is_some() {
            shared.cert.count_renewal(Renewal::NoAnswer);
            tracing::warn!(
                retry_in_s = renew_retry_in(&shared).as_secs(),
                "the control connection ended before the controller answered the certificate renewal request"
            );
        }
        superseded = match res {
            // A router that reconnected is on its new connection by the time the controller
            // closes the old one, so it seldom sees this. Seen again and again, another process
            // runs with this node's certificate and the two take turns, each after its back-off
            // (which such a session does not reset): said once, not at every turn.
            Err(e @ ControlError::Superseded) => {
                match superseded {
                    0 => tracing::info!("{e}; reconnecting"),
                    1 => tracing::warn!(
                        "{e} again: another router may be running with this node's certificate \
                         (further ones logged at debug level)"
                    ),
                    _ => tracing::debug!("{e}"),
                }
                superseded.saturating_add(1)
            }
            Err(e @ ControlError::Renewed) => {
                tracing::info!("{e}");
                // At once: the controller holds the routers' state, the session nothing of
                // its own to wait out.
                continue;
            }
            res => {
                match res {
                    Ok(()) => tracing::info!("controller closed the control connection"),
                    Err(ControlError::Refused(r)) => {
                        tracing::error!("controller refused this router: {r}")
                    }
                    Err(e) => tracing::warn!("control connection: {e}"),
                }
                0
            }
        };
        let long = was_long(superseded, spoke, started.elapsed());
        tokio::time::sleep(next_delay(&mut backoff, long)).await;
    }
}

/// Whether a session that ended after `elapsed` counts as long ([`next_delay`]): not taken over
/// by another process of this node (`superseded` 0), the controller heard on it (`spoke`), more
/// than 10 s. A session the controller never answered (its hello timeout, 10 s after its accept;
/// this router's silence timeout) is a failed connect: the back-off grows. (Counted long, such
/// sessions after a controller restart brought every router back within a second, in step,
/// again and again, while the controller was too busy to read their hellos.)
fn was_long(superseded: u32, spoke: bool, elapsed: Duration) -> bool {
    superseded == 0 && spoke && elapsed > Duration::from_secs(10)
}

/// The wait before the next control connection. After a session of more than 10 s (not taken
/// over by another process of this node) the back-off starts over, and the wait is drawn up to
/// [`RECONNECT_SPREAD`]: such an end is most likely the controller's (a restart, an upgrade, a
/// crash), met by every router of the fabric at once, and spread out they do not come back in
/// one burst, each taking a full snapshot. Else the back-off's.
fn next_delay(backoff: &mut Backoff, long: bool) -> Duration {
    if long {
        backoff.reset();
        up_to(RECONNECT_SPREAD)
    } else {
        backoff.delay()
    }
}

/// How long after the end of a long session a router may wait to reconnect ([`next_delay`]).
/// The data plane runs on meanwhile (the snapshot held stays in force), so a second at most is
/// of no cost to traffic.
const RECONNECT_SPREAD: Duration = Duration::from_secs(1);

/// How long a control connection's handshake may take: 5 s, plus up to 1 s drawn at each try,
/// so that routers whose tries began together (the controller away) do not stay in step.
fn connect_timeout() -> Duration {
    Duration::from_secs(5) + up_to(Duration::from_secs(1))
}

/// One control connection: connects, then serves it ([`converse`]) until it ends. An end that
/// is the controller's doing closes the connection with a [`close`] code and the reason, so the
/// controller sees why.
async fn session(
    shared: &Shared,
    endpoint: &quinn::Endpoint,
    tx: &watch::Sender<Arc<Snapshot>>,
    pending: &mut Option<rcgen::KeyPair>,
) -> Result<(), ControlError> {
    let cfg = &shared.cfg;
    // The certificate this session presents: the resolver's at the handshake. Read before it,
    // so that one installed meanwhile makes a needless reconnect at worst, never a missed one.
    let presented = (shared.cert.not_before(), shared.cert.not_after());
    let connecting = endpoint.connect(cfg.controller, CONTROLLER_NAME)?;
    let conn = tokio::time::timeout(connect_timeout(), connecting)
        .await
        .map_err(|_| ControlError::Timeout)??;
    let _trust_watch = tls::watch_trust(shared.cert.clone(), conn.clone());
    let res = converse(shared, &conn, tx, pending, presented).await;
    // The read or write that failed says less than the controller's close code.
    if is_superseded(conn.close_reason().as_ref()) {
        return Err(ControlError::Superseded);
    }
    if let Err(e) = &res
        && let Some(code) = e.close_code()
    {
        conn.close(code.into(), clip(e.to_string()).as_bytes());
    }
    res
}

/// Whether the connection ended because the controller took a newer session of this node.
fn is_superseded(why: Option<&quinn::ConnectionError>) -> bool {
    matches!(why, Some(quinn::ConnectionError::ApplicationClosed(c))
        if c.error_code.into_inner() == u64::from(close::SUPERSEDED))
}

/// Writes `msg` whole to the control stream; fails with [`ControlError::WriteStalled`] as soon
/// as the stream takes no byte of it for `stall` (a write makes progress whenever flow control
/// lets any part of it in, so a slow controller is never cut, only one that stopped reading).
async fn write(
    send: &mut quinn::SendStream,
    msg: &FromRouter,
    stall: Duration,
) -> Result<(), ControlError> {
    write_frame(send, proto::encode(msg)?, stall).await
}

/// [`write`] of a frame already encoded.
async fn write_frame(
    send: &mut quinn::SendStream,
    frame: bytes::Bytes,
    stall: Duration,
) -> Result<(), ControlError> {
    let mut rest = [frame];
    while !rest[0].is_empty() {
        tokio::time::timeout(stall, send.write_chunks(&mut rest))
            .await
            .map_err(|_| ControlError::WriteStalled(stall))??;
    }
    Ok(())
}

/// The control stream of connection `conn`: hello, then snapshots in and answers, telemetry and
/// renewals out, until the stream or the connection ends, the controller stops reading (a write
/// stalls) or stops talking (no byte for `silence_timeout`).
async fn converse(
    shared: &Shared,
    conn: &quinn::Connection,
    tx: &watch::Sender<Arc<Snapshot>>,
    pending: &mut Option<rcgen::KeyPair>,
    presented: (i64, i64),
) -> Result<(), ControlError> {
    let cfg = &shared.cfg;
    let (stall, silence) = (cfg.write_stall_timeout, cfg.silence_timeout);
    let opened = tokio::time::Instant::now();
    // A controller that grants no stream would hold the open for as long as it keeps the
    // connection alive: it has said nothing either.
    let (mut send, mut recv) = tokio::time::timeout(silence, conn.open_bi())
        .await
        .map_err(|_| ControlError::Silent(silence))??;
    let have = tx.borrow().version;
    let hello = FromRouter::Hello {
        node: cfg.node.to_string(),
        have_version: (have != 0).then_some(have),
        crl: true,
    };
    write(&mut send, &hello, stall).await?;
    shared.connected.store(true, Ordering::Relaxed);
    shared.connects.fetch_add(1, Ordering::Relaxed);
    tracing::info!(controller = %cfg.controller, "connected to the controller");

    // What the controller's next delta builds on: the last snapshot it sent that this router
    // took, applied or (draining) not.
    let mut base = tx.borrow().clone();
    let mut frames = proto::FrameReader::new(MAX_TO_ROUTER);
    let mut tick = tokio::time::interval(cfg.telemetry_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Renewal requests sent on this session and not answered yet.
    let mut asked = 0u32;
    // The address the controller's last snapshot was refused for, not on this host then
    // ([`Refusal::late`]): tried every [`LATE_ADDRESS_EVERY`], and once it can be bound the
    // controller is asked for its snapshot again, which it sends at once. (The controller alone
    // offered it again, after a back-off doubling to 5 minutes: a router started before its
    // address was configured, with no stored snapshot to wait on, stayed down that long.)
    let mut awaited: Option<SocketAddr> = None;
    let mut late = tokio::time::interval(LATE_ADDRESS_EVERY);
    late.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last progress of a frame told to the staleness watch.
    let mut told = None;
    loop {
        // Bytes of a frame still arriving are word from the controller for the staleness watch
        // too, as for the silence bound (looked at whenever the loop turns: at each telemetry
        // tick at least). Counted only once whole, a snapshot arriving for longer than
        // `--max-stale` made the router stale while its bytes kept coming.
        if let Some(p) = frames.last_progress()
            && told != Some(p)
        {
            told = Some(p);
            let ago = u64::try_from(p.elapsed().as_millis()).unwrap_or(u64::MAX);
            let at = now_ms().saturating_sub(ago);
            // Not before a whole frame already told (it would set the contact back).
            if at > shared.last_contact.get() {
                contacted(shared, at);
            }
        }
        let renew = renew_due(shared);
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let silent_at = frames.last_progress().unwrap_or(opened) + silence;
        tokio::select! {
            // The session's own timers first (they fire seldom), then the stream, then the
            // silence timer: after a long write (or a snapshot applied), bytes that arrived
            // meanwhile are taken (and counted as progress) before silence is looked at. (The
            // stream came first of all: frames arriving faster than they were handled, a flood
            // from a faulty controller, kept telemetry and renewal from ever running.)
            biased;
            _ = tokio::time::sleep_until(renew.unwrap_or(far)), if renew.is_some() => {
                // A renewed certificate installed since `renew` was computed is not due (the
                // install is not waited for).
                if renew_due(shared).is_none_or(|due| due > tokio::time::Instant::now()) {
                    continue;
                }
                // A certificate taken up from its files since the handshake (re-issued by
                // hand): the controller judges the one this session presented, so the new one
                // is presented first, on a new session. (Asked here, it was refused for as long
                // as this session lived.)
                if (shared.cert.not_before(), shared.cert.not_after()) != presented {
                    return Err(ControlError::Renewed);
                }
                if pending.take().is_some() {
                    shared.cert.count_renewal(Renewal::NoAnswer);
                    tracing::warn!("no answer to the last certificate renewal request; asking again");
                }
                // A new key, and the proof that this router holds it, for this session only.
                let made = (|| {
                    let k = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
                    let binding = pki::session_binding(conn)
                        .ok_or("the session's TLS exports no binding to prove the key on")?;
                    let proof = pki::prove_possession(&k, &binding).map_err(|e| e.to_string())?;
                    Ok::<_, String>((k, proof))
                })();
                let (key, proof) = match made {
                    Ok(made) => made,
                    Err(e) => {
                        tracing::error!("cannot make a key to renew the node certificate: {e}");
                        renew_attempted(shared);
                        continue;
                    }
                };
                tracing::info!(
                    expires = %fmt_unix(shared.cert.not_after()),
                    "the node certificate is due for renewal: asking the controller"
                );
                let req = FromRouter::Renew { public_key: key.public_key_raw().to_vec(), proof };
                renew_attempted(shared);
                *pending = Some(key);
                asked += 1;
                write(&mut send, &req, stall).await?;
            }
            // A renewed certificate installed: this session still presents the one before,
            // which the controller's renewals judge, and which expires. (A notice left from a
            // session before, whose certificate this one already presents, changes nothing.)
            _ = shared.installed.notified() => {
                if (shared.cert.not_before(), shared.cert.not_after()) != presented {
                    return Err(ControlError::Renewed);
                }
            }
            _ = late.tick(), if awaited.is_some() => {
                if let Some(addr) = awaited.filter(|a| try_bind(*a).is_ok()) {
                    awaited = None;
                    tracing::info!(
                        %addr,
                        "node {}'s QUIC address is on this host now: asking the controller for its snapshot again",
                        cfg.node
                    );
                    let have = base.version;
                    let again = FromRouter::Resync { have_version: (have != 0).then_some(have) };
                    write(&mut send, &again, stall).await?;
                }
            }
            _ = tick.tick() => {
                let source = shared.telemetry.lock().ok().and_then(|t| t.clone());
                if let Some(report) = source.and_then(|s| s())
                    && let Some(frame) = telemetry_frame(shared, report)?
                {
                    write_frame(&mut send, frame, stall).await?;
                }
            }
            // Cancel-safe: the telemetry tick often fires while a large snapshot is arriving.
            frame = frames.next(&mut recv) => {
                let Some(payload) = frame? else { return Ok(()) };
                let msg: ToRouter = proto::decode(&payload)?;
                // A refusal is no word on the snapshot: a router refused at every reconnect (a
                // node removed, a certificate for another name) grows stale, and says so.
                if !matches!(msg, ToRouter::Refused { .. }) {
                    contacted(shared, now_ms());
                }
                // Renewal answers come in the order of the requests: with more than one waiting,
                // this one is for an earlier request, not `pending`'s.
                let earlier = asked > 1;
                if matches!(msg, ToRouter::Certificate { .. } | ToRouter::RenewRefused { .. }) {
                    asked = asked.saturating_sub(1);
                }
                let reply = match msg {
                    // An answer to an earlier request (that timed out and was asked again
                    // with a new key) must not use up the key of the request still waiting.
                    ToRouter::Certificate { chain_pem }
                        if pending
                            .as_ref()
                            .and_then(|k| tls::certifies(&chain_pem, k))
                            == Some(false) =>
                    {
                        tracing::info!("ignoring a certificate for an earlier renewal request");
                        None
                    }
                    ToRouter::Certificate { chain_pem } => {
                        match pending.take() {
                            Some(key) => shared.certs.send(Arc::new(Renewed { key, chain_pem })),
                            None => tracing::debug!("ignoring a certificate no renewal asked for"),
                        }
                        None
                    }
                    ToRouter::Crl { pem } => {
                        shared.crls.send(pem);
                        None
                    }
                    // A refusal of an earlier request (counted unanswered when the next went)
                    // leaves the one waiting alone.
                    ToRouter::RenewRefused { .. } if earlier => {
                        tracing::info!("ignoring a refusal of an earlier renewal request");
                        None
                    }
                    ToRouter::RenewRefused { reason } => {
                        if pending.take().is_some() {
                            let reason = clip(reason);
                            shared.cert.count_renewal(Renewal::Refused);
                            tracing::warn!(
                                retry_in_s = renew_retry_in(shared).as_secs(),
                                "the controller refused to renew the node certificate (the current one is kept until it expires): {reason}"
                            );
                        }
                        None
                    }
                    msg => handle(shared, tx, &mut base, &mut awaited, msg)?,
                };
                if let Some(reply) = reply {
                    write(&mut send, &reply, stall).await?;
                }
            }
            _ = tokio::time::sleep_until(silent_at) => {
                // Bytes of a frame still arriving move the deadline (the loop sets it again).
                let heard = frames.last_progress().unwrap_or(opened);
                if heard.elapsed() >= silence {
                    return Err(ControlError::Silent(silence));
                }
            }
        }
    }
}

/// The frame of telemetry `report`, cut to what the controller takes: it refuses a frame over
/// [`MAX_FROM_ROUTER`] and ends the session, so a router whose report outgrew it (about 100
/// bytes a neighbour: a transit hub of about 10,000, which a topology may have) was cut off
/// right after each hello, its renewal requests never answered. A report over the limit loses
/// what [`TelemetryReport::trim_to`] leaves out (preferred sites first, site entries last),
/// counted in [`ControlClient::telemetry_trimmed`] and logged at warn the first time. `None`:
/// a report that does not fit even so (it cannot happen), not sent.
fn telemetry_frame(
    shared: &Shared,
    report: TelemetryReport,
) -> Result<Option<bytes::Bytes>, ControlError> {
    let msg = FromRouter::Telemetry(report);
    let frame = proto::encode(&msg)?;
    let size = frame.len() - 4;
    let mut report = match msg {
        FromRouter::Telemetry(r) if size > MAX_FROM_ROUTER => r,
        _ => return Ok(Some(frame)),
    };
    // What the message adds around the report (its type tag).
    let envelope = size.saturating_sub(report.json_len());
    let t = report.trim_to(MAX_FROM_ROUTER.saturating_sub(envelope));
    let frame = proto::encode(&FromRouter::Telemetry(report))?;
    if frame.len() - 4 > MAX_FROM_ROUTER {
        tracing::error!(
            size = frame.len() - 4,
            "a telemetry report is over the controller's limit of {MAX_FROM_ROUTER} bytes even \
             cut: not sent"
        );
        return Ok(None);
    }
    if shared.telemetry_trimmed.fetch_add(1, Ordering::Relaxed) == 0 {
        tracing::warn!(
            size,
            limit = MAX_FROM_ROUTER,
            preferred = t.preferred,
            neighbours_up = t.neighbours_up,
            neighbours_down = t.neighbours_down,
            sites = t.sites,
            "the telemetry report is over the controller's frame limit: sending it without {} \
             preferred sites, {} neighbours up, {} neighbours down and {} site entries (later \
             cuts are logged at debug level)",
            t.preferred,
            t.neighbours_up,
            t.neighbours_down,
            t.sites
        );
    } else {
        tracing::debug!(
            size,
            ?t,
            "telemetry report cut to the controller's frame limit"
        );
    }
    Ok(Some(frame))
}

/// Checks that a snapshot can run on this router. The data plane builds its routing table from
/// it; anything that cannot work here is refused with a reason instead. `bound`: where the
/// router's endpoint is bound (`None` before a router is attached): a version that moves the
/// node must give an address this host can bind (the data plane moves the endpoint there).
/// `running`: the node's address in the snapshot in force (`None` before the first): before a
/// router is attached, a snapshot giving the node an address it did not have is one the router
/// about to start binds, so this host must be able to (acknowledged and stored, an unbindable
/// one made the router exit at its start, and again at every restart from the stored copy).
/// The topology's own checks ([`check_topology`]: sizes, names, what this node serves) are
/// left out when `topology_checked`: the snapshot shares the topology of one that passed them
/// (a live update, or a delta that changed no topology), and they cost a pass over every node
/// and link.
fn check_with(
    node: &NodeId,
    snap: &Snapshot,
    bound: Option<SocketAddr>,
    running: Option<SocketAddr>,
    topology_checked: bool,
) -> Result<(), Refusal> {
    let t = &snap.topology;
    if !topology_checked {
        check_topology(node, t)?;
    }
    let Some(me) = t.node(node.as_str()) else {
        return Err(Refusal::new(format!("node {node} is not in topology")));
    };
    match bound {
        // A move to an address the version in force names already (the data plane's move is
        // being retried, its address held meanwhile) is no new move: checked again, every
        // later version, a live update included, was refused while the address was held.
        Some(bound)
            if !crate::transport::bound_at(bound, me.address) && running != Some(me.address) =>
        {
            if let Err(e) = std::net::UdpSocket::bind(me.address) {
                return Err(Refusal::binding(
                    me.address,
                    e.kind(),
                    format!(
                        "cannot move node {node}'s QUIC address from {bound} to {}: {e}",
                        me.address
                    ),
                ));
            }
        }
        Some(_) => {}
        None if running != Some(me.address) => bindable(node, me.address)?,
        None => {}
    }
    Ok(())
}

/// The checks of a snapshot's topology alone, for [`check_with`].
fn check_topology(node: &NodeId, t: &topology::Topology) -> Result<(), Refusal> {
    // A controller's document never holds more (it validates what it is given); a snapshot
    // that does, whole or grown by deltas (the frame bound is per frame, not on what deltas
    // build up), would take memory and table rebuilds without bound.
    for (what, n, max) in [
        ("nodes", t.nodes.len(), topology::MAX_NODES),
        ("links", t.links.len(), topology::MAX_LINKS),
        ("services", t.services.len(), topology::MAX_SERVICES),
    ] {
        if n > max {
            return Err(Refusal::new(format!(
                "the topology has {n} {what}, over the limit of {max}"
            )));
        }
    }
    names(t)?;
    // Not here: `check_with` refuses it, whether the topology was checked or not.
    let Some(me) = t.node(node.as_str()) else {
        return Ok(());
    };
    // What this node serves must be a service of the topology: one that is not has no port,
    // no residency and no table entry, and its health checks and load reports would be for
    // nothing any edge asks for.
    let services: HashSet<&str> = t.services.iter().map(|s| s.name.as_str()).collect();
    if let Some(s) = me
        .serves
        .iter()
        .find(|s| !services.contains(s.service.as_str()))
    {
        return Err(Refusal::new(format!(
            "node {node} serves \"{}\", which is not a service of the topology",
            s.service
        )));
    }
    Ok(())
}

/// Every name a snapshot gives is an id a document could hold (`topology::is_valid_id`), and no
/// two nodes share one: the controller only publishes validated documents, so anything else
/// is a corrupt or hostile snapshot. Names reach a stream's header (63 bytes at most), peer
/// certificate names, metrics labels and logs; two nodes of one id would be one node here and
/// two at the controller (`Topology::node` takes the first, a map of ids the last).
fn names(t: &topology::Topology) -> Result<(), Refusal> {
    // The name shown in a refusal: escaped and cut (it is the sender's text).
    let shown = |s: &str| super::proto::clip_to(s.to_string(), 80);
    let invalid = |what: &str, s: &str| {
        Refusal::new(format!(
            "{what} \"{}\" is not a valid id (1 to 63 lowercase letters, digits and single hyphens)",
            shown(s)
        ))
    };
    let mut ids: HashSet<&str> = HashSet::with_capacity(t.nodes.len());
    for n in &t.nodes {
        if !topology::is_valid_id(n.id.as_str()) {
            return Err(invalid("node", n.id.as_str()));
        }
        if !ids.insert(n.id.as_str()) {
            return Err(Refusal::new(format!("two nodes have the id \"{}\"", n.id)));
        }
        if let Some(s) = n
            .serves
            .iter()
            .find(|s| !topology::is_valid_id(s.service.as_str()))
        {
            return Err(invalid(
                &format!("the service served by node {}", shown(n.id.as_str())),
                s.service.as_str(),
            ));
        }
        // Written into a health check's request line as it is.
        if let Some(p) = n
            .serves
            .iter()
            .filter_map(|s| s.health_check.as_deref())
            .find(|p| !topology::is_valid_health_path(p))
        {
            return Err(Refusal::new(format!(
                "node {} has the health_check \"{}\", which is not an HTTP path",
                n.id,
                shown(p)
            )));
        }
        // A zero interval would spin a checker; thresholds of zero would never mark anything.
        if let Some((svc, why)) = n
            .serves
            .iter()
            .find_map(|s| s.health.problem().map(|why| (&s.service, why)))
        {
            return Err(Refusal::new(format!(
                "node {} serves {svc} with {why}",
                n.id
            )));
        }
    }
    // One link per pair of ends, none from a node to itself: the graph keeps every copy, but
    // a link's live state (down, measured latency) reaches only the first, so a copy of a link
    // reported down stayed usable at its declared latency.
    let mut pairs: HashSet<topology::LinkId> = HashSet::with_capacity(t.links.len());
    for l in &t.links {
        for end in [&l.a, &l.b] {
            if !topology::is_valid_id(end.as_str()) {
                return Err(invalid("link end", end.as_str()));
            }
        }
        if l.a == l.b {
            return Err(Refusal::new(format!("a link joins node {} to itself", l.a)));
        }
        if !pairs.insert(l.id()) {
            return Err(Refusal::new(format!("two links join {} and {}", l.a, l.b)));
        }
    }
    if let Some(s) = t
        .services
        .iter()
        .find(|s| !topology::is_valid_id(s.name.as_str()))
    {
        return Err(invalid("service", s.name.as_str()));
    }
    Ok(())
}

/// Why [`check_with`] refused a snapshot.
#[derive(Debug, PartialEq)]
struct Refusal {
    /// What the NACK says.
    reason: String,
    /// The node's address, when it was refused as not on this host (`EADDRNOTAVAIL`): one that
    /// may come (a boot that starts the router before the network, an address being added),
    /// which the session watches for ([`converse`]), asking for the snapshot again once it is.
    late: Option<SocketAddr>,
}

impl Refusal {
    fn new(reason: String) -> Refusal {
        Refusal { reason, late: None }
    }

    /// A refusal of `addr`, which could not be bound (`kind`).
    fn binding(addr: SocketAddr, kind: std::io::ErrorKind, reason: String) -> Refusal {
        let late = (kind == std::io::ErrorKind::AddrNotAvailable).then_some(addr);
        Refusal { reason, late }
    }
}

/// Whether this host can bind `addr`, node `node`'s QUIC address (tried, then let go). An
/// address in use passes ([`try_bind`]).
fn bindable(node: &NodeId, addr: SocketAddr) -> Result<(), Refusal> {
    try_bind(addr).map_err(|kind| {
        let reason =
            format!("node {node}'s QUIC address {addr} cannot be bound on this host: {kind}");
        Refusal::binding(addr, kind, reason)
    })
}

/// Whether this host can bind `addr` (tried, then let go), telling only the kind of error. In
/// use is no error: most often it is this router's previous process, whose socket is still
/// going away (the data plane's start fails then and is tried again), or another process for
/// this node, which the start reports; a snapshot is right either way. An address that is not
/// this host's is, as the router would exit binding it at every start.
fn try_bind(addr: SocketAddr) -> Result<(), std::io::ErrorKind> {
    match std::net::UdpSocket::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(()),
        Err(e) => Err(e.kind()),
    }
}

/// What one message of the controller's asks of the session ([`next_step`]).
#[derive(Debug)]
enum Step {
    /// Nothing for the snapshot (heartbeats, renewal answers, revocation lists).
    Nothing,
    /// A snapshot to check and apply, and its topology version.
    Apply(Snapshot, u64),
    /// A delta on a version this router does not have: ask for the current one whole.
    Resync { have_version: Option<u64> },
    /// A snapshot refused as it stands, with the reason.
    Nack { version: u64, reason: String },
}

/// The snapshot a message of the controller's makes from `base`, the last one the session
/// took. Version 0 means "none yet" on this side (the placeholder a start waits behind): a
/// snapshot numbered 0 is refused, and a delta on version 0 is never applied to the placeholder's
/// empty topology but answered with a resync. (A controller never numbers a version 0; one that
/// did, hostile or broken, had it applied and acknowledged while a router's start waited for
/// ever, and had its delta on "version 0" built on nothing.)
fn next_step(base: &Snapshot, msg: ToRouter) -> Result<Step, ControlError> {
    // The placeholder is no base.
    let have = (base.version != 0).then_some(base.version);
    let on_base = |base_version: u64| have == Some(base_version);
    let (snap, topology_version) = match msg {
        // Renewal answers are the session's (it holds the key).
        ToRouter::Heartbeat { .. }
        | ToRouter::Certificate { .. }
        | ToRouter::RenewRefused { .. }
        | ToRouter::Crl { .. } => return Ok(Step::Nothing),
        ToRouter::Refused { reason } => return Err(ControlError::refused(reason)),
        ToRouter::Delta { base_version, .. } | ToRouter::Live { base_version, .. }
            if !on_base(base_version) =>
        {
            return Ok(Step::Resync { have_version: have });
        }
        // Refused before anything is built from it.
        ToRouter::Snapshot { version: 0, .. }
        | ToRouter::Delta { version: 0, .. }
        | ToRouter::Live { version: 0, .. } => {
            return Ok(Step::Nack {
                version: 0,
                reason: "version 0 is no version (it means none yet)".to_string(),
            });
        }
        // A version names one snapshot, and the controller numbers them upwards: a delta that
        // would make its base's version (or an older one) name another snapshot is refused, or a
        // later delta "on" that version would build on whichever copy the router happened to hold.
        ToRouter::Delta {
            version,
            base_version,
            ..
        }
        | ToRouter::Live {
            version,
            base_version,
            ..
        } if version <= base_version => {
            return Ok(Step::Nack {
                version,
                reason: format!("version {version} does not follow its base, {base_version}"),
            });
        }
        ToRouter::Snapshot {
            version,
            topology_version,
            topology,
            live,
            circuits,
        } => (
            Snapshot {
                version,
                topology,
                live,
                circuits,
            },
            topology_version,
        ),
        ToRouter::Delta {
            version,
            topology_version,
            changes,
            live,
            ..
        } => {
            // A frame bounds each delta, not what deltas build: a topology no full snapshot
            // could carry is refused (the element counts are checked later, in `check`), or a
            // chain of deltas of large elements would grow it without end.
            // A delta that changes nothing keeps the base's topology, shared (neither copied
            // nor measured again).
            if changes.changes_nothing_in(&base.topology) {
                return Ok(Step::Apply(
                    Snapshot {
                        version,
                        topology: base.topology.clone(),
                        live,
                        circuits: base.circuits.clone(),
                    },
                    topology_version,
                ));
            }
            let topology = changes.apply(&base.topology);
            let max = proto::MAX_TO_ROUTER;
            if proto::write_json_at_most(&topology, &mut std::io::sink(), max).is_none() {
                return Ok(Step::Nack {
                    version,
                    reason: format!(
                        "the topology this delta builds takes more than {max} bytes encoded, \
                         more than a full snapshot carries"
                    ),
                });
            }
            (
                Snapshot {
                    version,
                    topology: Arc::new(topology),
                    live,
                    circuits: base.circuits.clone(),
                },
                topology_version,
            )
        }
        ToRouter::Live {
            version,
            topology_version,
            live,
            ..
        } => (
            Snapshot {
                version,
                topology: base.topology.clone(),
                live,
                circuits: base.circuits.clone(),
            },
            topology_version,
        ),
    };
    Ok(Step::Apply(snap, topology_version))
}

/// Takes one message of the controller's: a snapshot (whole or a delta on `base`,
/// [`next_step`]) is checked, becomes the `base` of the next delta, and is handed to the data
/// plane and acknowledged, unless the router drains ([`hand_over`]). `awaited`: the address
/// whose absence the last checked snapshot was refused for ([`Refusal::late`]), if it was.
fn handle(
    shared: &Shared,
    tx: &watch::Sender<Arc<Snapshot>>,
    base: &mut Arc<Snapshot>,
    awaited: &mut Option<SocketAddr>,
    msg: ToRouter,
) -> Result<Option<FromRouter>, ControlError> {
    let node = &shared.cfg.node;
    // 0 names no version (refused below): the metric keeps the last one named.
    if let ToRouter::Heartbeat { version }
    | ToRouter::Snapshot { version, .. }
    | ToRouter::Delta { version, .. }
    | ToRouter::Live { version, .. } = &msg
        && *version != 0
    {
        shared.controller_version.store(*version, Ordering::Relaxed);
    }
    let (snap, topology_version) = match next_step(base, msg)? {
        Step::Nothing => return Ok(None),
        Step::Resync { have_version } => return Ok(Some(FromRouter::Resync { have_version })),
        Step::Nack { version, reason } => {
            tracing::error!(version, "rejecting snapshot: {reason}");
            return Ok(Some(FromRouter::Nack { version, reason }));
        }
        Step::Apply(snap, topology_version) => (snap, topology_version),
    };
    let version = snap.version;
    let bound = shared
        .endpoint
        .lock()
        .ok()
        .and_then(|e| e.as_ref().and_then(|e| e.local_addr().ok()));
    let running = tx.borrow().topology.node(node.as_str()).map(|n| n.address);
    // A live update (or a delta that changed no topology) keeps its base's checked topology.
    let topology_checked = Arc::ptr_eq(&snap.topology, &base.topology);
    if let Err(Refusal { reason, late }) = check_with(node, &snap, bound, running, topology_checked)
    {
        tracing::error!(version, "rejecting snapshot: {reason}");
        *awaited = late;
        return Ok(Some(FromRouter::Nack { version, reason }));
    }
    *awaited = None;
    // The controller is the authority, whatever its numbers: its store restored from an older
    // backup starts again from the backup's versions (and topology). Taken, but said: the
    // operator may not know the fleet went back.
    if base.version != 0 && version < base.version {
        shared.version_regressions.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            version,
            held = base.version,
            "the controller sent an older version than the one held (its state restored from a backup?): taking it"
        );
    }
    let snap = Arc::new(snap);
    *base = snap.clone();
    if !hand_over(shared, tx, &snap) {
        // Not stored either: the stored snapshot is one the router ran on.
        if !shared.held_back.swap(true, Ordering::Relaxed) {
            tracing::info!(
                version,
                "draining: snapshots from the controller are no longer applied nor acknowledged"
            );
        }
        tracing::debug!(version, topology_version, "draining: snapshot not applied");
        return Ok(None);
    }
    shared
        .topology_version
        .store(topology_version, Ordering::Relaxed);
    tracing::debug!(version, topology_version, "applied snapshot");
    // Stored after it applied, by the store's own task (the latest snapshot wins: a burst of
    // live updates is one write): the ACK says the router runs on this version, which is what
    // the controller acts on (status, circuits going active), not that it is on disk. Waiting
    // for the disk here held applying, acknowledging, telemetry and the session's timers for as
    // long as a write took, forever on a stuck disk.
    if let Some(store) = &shared.store {
        store.send(StoredSnapshot {
            version,
            topology_version,
            received_unix_ms: now_ms(),
            topology: snap.topology.clone(),
            live: snap.live.clone(),
            circuits: snap.circuits.clone(),
        });
    }
    Ok(Some(FromRouter::Ack { version }))
}

/// Hands `snap` to the data plane, unless the attached router drains: its control task applies
/// no more snapshots then (`routes::Control::run`), and one handed over anyway would be
/// acknowledged and never applied. The drain flag is read, and the snapshot handed over, under
/// the flag's lock: a drain that begins after this finds the snapshot waiting, and the control
/// task applies it as it takes the drain; one that began before is seen here. True when handed
/// over.
fn hand_over(shared: &Shared, tx: &watch::Sender<Arc<Snapshot>>, snap: &Arc<Snapshot>) -> bool {
    let drain = shared.drain.lock().ok().and_then(|d| d.clone());
    // Held until the snapshot is in: `RouterHandle::begin_drain` waits for it.
    let draining = drain.as_ref().map(|d| d.borrow());
    if draining.as_deref() == Some(&true) {
        return false;
    }
    tx.send_replace(snap.clone());
    true
}

/// When the next renewal request is due: when the presented certificate is
/// ([`pki::renew_at`]), but not before the back-off allows; `None` when the certificate was not
/// loaded from files (nowhere to install a new one).
fn renew_due(shared: &Shared) -> Option<tokio::time::Instant> {
    let cert = &shared.cert;
    cert.dir()?;
    let at_ms = pki::renew_at(cert.not_before(), cert.not_after()).saturating_mul(1000);
    let wait = u64::try_from(at_ms.saturating_sub(now_ms() as i64)).unwrap_or(0);
    let due = tokio::time::Instant::now() + Duration::from_millis(wait);
    Some(shared.renew.lock().map_or(due, |r| r.next(due)))
}

/// How long until the back-off allows the next request.
fn renew_retry_in(shared: &Shared) -> Duration {
    let now = tokio::time::Instant::now();
    shared
        .renew
        .lock()
        .map_or(Duration::ZERO, |r| r.retry_in(now))
}

/// A request goes now: the next may go after the back-off, which doubles.
fn renew_attempted(shared: &Shared) {
    if let Ok(mut r) = shared.renew.lock() {
        r.attempted(tokio::time::Instant::now());
    }
}

/// Installs a renewed certificate with the key its request was made with (`cert` checks it
/// first), or keeps the current pair and says why; `schedule` starts its back-off again once it
/// is installed. Blocking (file writes): run by a `Writer`.
fn install_renewed(cert: &tls::CertResolver, schedule: &Mutex<RenewSchedule>, r: &Renewed) -> bool {
    match tls::install(cert, &r.key, &r.chain_pem) {
        Ok(not_after) => {
            cert.count_renewal(Renewal::Renewed);
            if let Ok(mut s) = schedule.lock() {
                s.succeeded(tokio::time::Instant::now());
            }
            tracing::info!(not_after, expires = %fmt_unix(not_after), "renewed the node certificate through the controller");
            true
        }
        Err(e) => {
            cert.count_renewal(Renewal::Invalid);
            tracing::warn!(
                "the renewed certificate was not installed, keeping the current one: {e}"
            );
            false
        }
    }
}

fn fmt_unix(t: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// How often the last word from the controller is recorded on disk at most: a tenth of
/// `max_stale` (a restart's staleness errs by no more), from 1 s to a minute.
fn contact_every(max_stale: Duration) -> Duration {
    (max_stale / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Unix ms of the last word from the controller, what staleness counts from: the client's start
/// until it hears from the controller or adopts a stored snapshot (then the time recorded with
/// it). A stored snapshot adopted late (its address came after the controller's first words:
/// `FromDisk::Late`) does not set it back: it only replaces the start's value. One atomic, so
/// that a contact and an adoption racing cannot leave the older time.
struct LastContact {
    ms: AtomicU64,
    started: u64,
}

impl LastContact {
    fn new(now: u64) -> Self {
        LastContact {
            ms: AtomicU64::new(now),
            started: now,
        }
    }
    fn get(&self) -> u64 {
        self.ms.load(Ordering::Relaxed)
    }
    /// The controller spoke at `now` (never taken for the start's value).
    fn heard(&self, now: u64) {
        self.ms.store(now.max(self.started + 1), Ordering::Relaxed);
    }
    /// A stored snapshot received at `at` was adopted: counts only if nothing was heard since
    /// the start.
    fn stored(&self, at: u64) {
        let _ = self
            .ms
            .compare_exchange(self.started, at, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// The controller was heard from at `now` (unix ms): a stale snapshot is stale no more.
fn contacted(shared: &Shared, now: u64) {
    shared.last_contact.heard(now);
    if shared.stale.swap(false, Ordering::Relaxed) {
        tracing::warn!("controller reachable again; snapshot no longer stale");
    }
    // Recorded only while the stored snapshot is the one in force: the record dates the
    // stored version at a restart. (A version applied but not stored, a full disk refusing its
    // write while the small record still went, left a restart running the older stored version
    // and calling it fresh.)
    if let Some(contact) = &shared.contact
        && shared.store.as_ref().is_none_or(Writer::caught_up)
    {
        let every = contact_every(shared.cfg.max_stale).as_millis() as u64;
        let sent = shared.contact_sent_ms.load(Ordering::Relaxed);
        if now.saturating_sub(sent) >= every {
            shared.contact_sent_ms.store(now, Ordering::Relaxed);
            contact.send(now);
        }
    }
}

async fn staleness_watch(shared: Arc<Shared>, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
    let period =
        (shared.cfg.max_stale / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut last_log = 0u64;
    // Looked at once at start too, and whenever a snapshot comes (a stored one adopted once its
    // address appeared brings its old contact time): a router started from a snapshot stored
    // long ago is stale at once (its gauge read 0 for up to a minute).
    loop {
        let age_ms = now_ms().saturating_sub(shared.last_contact.get());
        // Saturated: a limit past `u64::MAX` ms wrapped to a few hundred ms.
        if age_ms > u64::try_from(shared.cfg.max_stale.as_millis()).unwrap_or(u64::MAX) {
            shared.stale.store(true, Ordering::Relaxed);
            let now = now_ms();
            if now.saturating_sub(last_log) >= 60_000 || last_log == 0 {
                last_log = now;
                // No snapshot yet (none stored, or one waiting for its address): nothing is
                // forwarded, on a last good snapshot or otherwise.
                let running = if snapshots.borrow().version == 0 {
                    "and no snapshot in force yet: nothing is forwarded until one is"
                } else {
                    "still forwarding on the last good snapshot"
                };
                tracing::error!(
                    age_s = age_ms / 1000,
                    max_stale_s = shared.cfg.max_stale.as_secs(),
                    "STALE SNAPSHOT: no word from the controller for {}s (limit {}s); {running}",
                    age_ms / 1000,
                    shared.cfg.max_stale.as_secs()
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            changed = snapshots.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(period).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// After a long session (its end most likely the controller's, whatever the error), routers
    /// come back spread over a second, not within the first back-off's 50-100 ms all at once,
    /// and the back-off starts over; after a short one, the back-off grows. Handshake timeouts
    /// differ by up to a second.
    /// A session counts as long (the back-off starts over, the reconnect spread over a second)
    /// only if the controller spoke on it: one closed by its hello timeout, 10 s on, unanswered,
    /// is a failed connect.
    #[test]
    fn a_session_the_controller_never_answered_is_not_long() {
        let s = Duration::from_secs;
        assert!(super::was_long(0, true, s(11)));
        assert!(!super::was_long(0, false, s(11)), "never answered");
        assert!(!super::was_long(0, true, s(9)), "short");
        assert!(!super::was_long(1, true, s(60)), "superseded");
    }

    #[test]
    fn reconnects_after_a_controller_close_are_spread() {
        let mut b = super::Backoff {
            next: Duration::from_secs(8),
        };
        let draws: Vec<Duration> = (0..1000).map(|_| super::next_delay(&mut b, true)).collect();
        assert_eq!(b.next, super::Backoff::MIN);
        let short = super::next_delay(&mut b, false);
        assert!(short <= super::Backoff::MIN, "{short:?}");
        assert_eq!(b.next, super::Backoff::MIN * 2);
        let (min, max) = (draws.iter().min().unwrap(), draws.iter().max().unwrap());
        assert!(
            *min < Duration::from_millis(100) && *max > Duration::from_millis(900),
            "{min:?}..{max:?}"
        );
        assert!(draws.iter().all(|d| *d <= super::RECONNECT_SPREAD));
        let timeouts: Vec<Duration> = (0..1000).map(|_| super::connect_timeout()).collect();
        let (min, max) = (
            timeouts.iter().min().unwrap(),
            timeouts.iter().max().unwrap(),
        );
        assert!(
            *min >= Duration::from_secs(5) && *max - *min > Duration::from_millis(800),
            "{min:?}..{max:?}"
        );
    }

    /// Every check of [`check_with`], the topology's too.
    fn check(
        node: &NodeId,
        snap: &Snapshot,
        bound: Option<SocketAddr>,
        running: Option<SocketAddr>,
    ) -> Result<(), Refusal> {
        check_with(node, snap, bound, running, false)
    }

    /// The last contact follows the controller's words, and a stored snapshot adopted after
    /// the controller spoke does not set it back to the time stored with it (which made a
    /// connected router stale until the next heartbeat after an outage longer than
    /// `max_stale`); adopted before, it counts from its own time.
    #[test]
    fn a_stored_snapshot_adopted_late_does_not_set_the_last_contact_back() {
        let day = 24 * 3600 * 1000;
        let start = 10 * day;
        let c = LastContact::new(start);
        c.heard(start + 5);
        c.stored(start - 2 * day);
        assert_eq!(c.get(), start + 5);
        c.heard(start + 2000);
        assert_eq!(c.get(), start + 2000);
        // Adopted at once (nothing heard yet): staleness counts from the stored time.
        let c = LastContact::new(start);
        c.stored(start - 2 * day);
        assert_eq!(c.get(), start - 2 * day);
        // Heard in the start's own millisecond: still a contact, not the start.
        let c = LastContact::new(start);
        c.heard(start);
        c.stored(start - 2 * day);
        assert_eq!(c.get(), start + 1);
    }

    use super::*;
    use tokio::time::Instant;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// A write that fails is tried again after its back-off, with no newer value sent, and is
    /// not counted as written until it succeeds: `flush` (what `close` waits for) says so. (A
    /// failed write counted as written and was never tried again.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_is_tried_again_and_not_counted_written_until_it_succeeds() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let failures_left = Arc::new(AtomicU64::new(2));
        let (w, f) = (written.clone(), failures_left.clone());
        let (writer, task) = Writer::spawn("test write", move |v: u32| {
            if f.load(Ordering::Relaxed) > 0 {
                f.fetch_sub(1, Ordering::Relaxed);
                return false;
            }
            w.lock().unwrap().push(v);
            true
        });
        writer.send(7);
        assert!(
            !writer.flush(Duration::from_millis(500)).await,
            "a failed write counted as written"
        );
        // Tried again after 1 s, then 2 s: the third try succeeds.
        assert!(writer.flush(S(20)).await, "never written");
        assert_eq!(failures_left.load(Ordering::Relaxed), 0);
        assert_eq!(*written.lock().unwrap(), [7]);
        task.abort();
    }

    /// A writer writes the latest value (those sent during a write coalesce), and `flush`
    /// returns once the latest is written: what `ControlClient::close` waits for before a
    /// router stops (dropping it aborts the writer's task, and a snapshot still waiting was
    /// never stored). A write that has not ended makes `flush` give up at its bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_writes_the_latest_value_and_flush_waits_for_it() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Mutex::new(held);
        let w = written.clone();
        let (writer, task) = Writer::spawn("test write", move |v: u32| {
            let _ = started_tx.send(v);
            if v == 1 {
                let _ = held.lock().unwrap().recv(); // held until the test lets it go
            }
            std::thread::sleep(Duration::from_millis(50));
            w.lock().unwrap().push(v);
            true
        });
        assert!(
            writer.flush(S(1)).await,
            "nothing sent: nothing to wait for"
        );
        writer.send(1);
        assert_eq!(
            started.recv_timeout(S(20)),
            Ok(1),
            "the first write started"
        );
        writer.send(2);
        writer.send(3);
        assert!(
            !writer.flush(Duration::from_millis(100)).await,
            "flushed while the first write is held"
        );
        release.send(()).unwrap();
        assert!(writer.flush(S(20)).await);
        assert_eq!(
            *written.lock().unwrap(),
            [1, 3],
            "2 was replaced by 3 while 1 was written"
        );
        task.abort();
    }

    /// The schedule of a client with the default config.
    fn schedule() -> RenewSchedule {
        let id = TlsIdentity {
            name: "n".into(),
            cas: Vec::new(),
            chain: Vec::new(),
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(Vec::new().into()),
            dir: None,
        };
        let cfg = ClientConfig::new(([127, 0, 0, 1], 1).into(), NodeId::new("n"), id);
        RenewSchedule::new(cfg.renew_backoff_min, cfg.renew_backoff_max)
    }

    /// Requests sent each as soon as `s` allows, the certificate being due all along: the gaps
    /// between them.
    fn gaps(s: &mut RenewSchedule, t: &mut Instant, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                s.attempted(*t);
                let next = s.next(*t);
                let gap = next - *t;
                *t = next;
                gap
            })
            .collect()
    }

    fn secs<const N: usize>(s: [u64; N]) -> [Duration; N] {
        s.map(S)
    }

    /// A snapshot holding node `a` at `addr`.
    fn with_a_at(addr: &str) -> Snapshot {
        let node: topology::Node = serde_json::from_value(serde_json::json!({
            "id": "a", "kind": "transit", "region": "au-east", "country": "AU",
            "location": {"lat": 0.0, "lon": 0.0}, "address": addr,
        }))
        .unwrap();
        let mut t = topology::Topology::default();
        t.nodes.push(node);
        Snapshot {
            version: 1,
            topology: Arc::new(t),
            live: Default::default(),
            circuits: Arc::default(),
        }
    }

    /// [`with_a_at`] as stored, having come at `received_unix_ms`.
    fn stored_a_at(addr: &str, received_unix_ms: u64) -> StoredSnapshot {
        let s = with_a_at(addr);
        StoredSnapshot {
            version: s.version,
            topology_version: 1,
            received_unix_ms,
            topology: s.topology,
            live: s.live,
            circuits: s.circuits,
        }
    }

    /// Before a router is attached, a snapshot giving the node an address this host cannot
    /// bind is refused (acknowledged and stored, the router exited binding it at its start, and
    /// again at every restart from the stored copy, never living long enough to be sent a
    /// fixed one); the address the snapshot in force gives it is not tried again (the router
    /// may hold it by then).
    #[test]
    fn before_a_router_is_attached_an_unbindable_address_is_refused() {
        let a = NodeId::new("a");
        // TEST-NET-1: on no interface of this host.
        let foreign = with_a_at("192.0.2.1:4433");
        let e = check(&a, &foreign, None, None).unwrap_err();
        assert!(e.reason.contains("192.0.2.1:4433 cannot be bound"), "{e:?}");
        // Not this host's (yet): the session watches for it.
        assert_eq!(e.late, Some("192.0.2.1:4433".parse().unwrap()));
        // A reason no address can end.
        let absent = check(&NodeId::new("b"), &foreign, None, None).unwrap_err();
        assert_eq!(absent.late, None, "{absent:?}");
        assert!(check(&a, &foreign, None, Some("127.0.0.1:1".parse().unwrap())).is_err());
        // The address in force: held by the router about to run, not tried.
        let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = held.local_addr().unwrap();
        let same = with_a_at(&at.to_string());
        assert_eq!(check(&a, &same, None, Some(at)), Ok(()));
        // In use otherwise (this router's previous process, say): not this snapshot's fault.
        assert_eq!(check(&a, &same, None, None), Ok(()));
        drop(held);
        assert_eq!(check(&a, &same, None, None), Ok(()));
    }

    /// An attached router whose endpoint could not move yet to the address the version in force
    /// gives it (held by something else; the data plane retries) takes later versions at that
    /// address, a live update included; a new move to a held address is still refused.
    #[test]
    fn versions_at_an_address_the_endpoint_is_still_moving_to_are_taken() {
        let a = NodeId::new("a");
        let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let x = held.local_addr().unwrap();
        let old: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let at_x = with_a_at(&x.to_string());
        assert_eq!(check(&a, &at_x, Some(old), Some(x)), Ok(()));
        assert!(check(&a, &at_x, Some(old), Some(old)).is_err());
    }

    /// A topology over the limits a topology document has (nodes, links, services) is refused,
    /// a delta's result as a whole snapshot: deltas within the frame bound could otherwise
    /// grow the router's topology without end. (Every delta was applied and acknowledged.)
    #[test]
    fn a_topology_over_the_document_limits_is_refused() {
        use crate::control::proto::TopologyDelta;
        let a = NodeId::new("a");
        let base = with_a_at("127.0.0.1:0");
        let link = |i: usize| topology::Link {
            a: NodeId::new("a"),
            b: NodeId::new(format!("n{i}")),
            latency: topology::Latency::from_micros(1_000),
            capacity: topology::Bandwidth::from_mbps(1_000),
            state: Default::default(),
        };
        let grow = |base: &Snapshot, from: usize, n: usize| {
            let delta = ToRouter::Delta {
                version: base.version + 1,
                base_version: base.version,
                topology_version: base.version + 1,
                changes: TopologyDelta {
                    links_upsert: (from..from + n).map(link).collect(),
                    ..Default::default()
                },
                live: Default::default(),
            };
            match next_step(base, delta).unwrap() {
                Step::Apply(s, _) => s,
                _ => panic!("a delta on its base is applied"),
            }
        };
        let half = topology::MAX_LINKS / 2 + 1;
        let once = grow(&base, 0, half);
        assert_eq!(check(&a, &once, None, None), Ok(()));
        let twice = grow(&once, half, half);
        assert_eq!(twice.topology.links.len(), 2 * half);
        let e = check(&a, &twice, None, None).unwrap_err();
        assert!(e.reason.contains("over the limit of 250000"), "{e:?}");
        assert_eq!(e.late, None);
        let mut many = with_a_at("127.0.0.1:0");
        let t = Arc::make_mut(&mut many.topology);
        let n = t.nodes[0].clone();
        t.nodes.resize(topology::MAX_NODES + 1, n);
        assert!(
            check(&a, &many, None, None)
                .unwrap_err()
                .reason
                .contains("nodes")
        );
    }

    /// A snapshot naming a node, a link end or a service by what no document could hold (too
    /// long for a stream's header, control characters for the logs, `--` making link names
    /// ambiguous), or two nodes by one id, is refused, the name shown escaped and cut: it was
    /// applied and acknowledged, and streams to such a node failed one by one (`no_route`).
    #[test]
    fn a_snapshot_naming_a_node_or_service_by_an_invalid_id_is_refused() {
        let a = NodeId::new("a");
        let good = with_a_at("127.0.0.1:0");
        assert_eq!(check(&a, &good, None, None), Ok(()));
        let other = |id: &str| {
            let mut n = good.topology.nodes[0].clone();
            n.id = NodeId::new(id);
            n
        };
        let long = "x".repeat(64);
        for (bad, says) in [
            (long.as_str(), "node \"xxxx"),
            ("Edge", "node \"Edge\" is not a valid id"),
            ("a--b", "node \"a--b\""),
            ("evil\n2026-12-04 ERROR forged", "node \"evil\\n2026"),
        ] {
            let mut s = good.clone();
            Arc::make_mut(&mut s.topology).nodes.push(other(bad));
            let e = check(&a, &s, None, None).unwrap_err();
            assert!(e.reason.contains(says), "{bad:?}: {e:?}");
            assert!(e.reason.len() < 200 && !e.reason.contains('\n'), "{e:?}");
        }
        let mut twice = good.clone();
        Arc::make_mut(&mut twice.topology).nodes.push(other("a"));
        let e = check(&a, &twice, None, None).unwrap_err();
        assert_eq!(e.reason, "two nodes have the id \"a\"");

        let mut link = good.clone();
        Arc::make_mut(&mut link.topology)
            .links
            .push(topology::Link {
                a: NodeId::new("a"),
                b: NodeId::new("y".repeat(1000)),
                latency: topology::Latency::from_micros(1_000),
                capacity: topology::Bandwidth::from_mbps(1_000),
                state: Default::default(),
            });
        let e = check(&a, &link, None, None).unwrap_err();
        assert!(e.reason.starts_with("link end \"yyy"), "{e:?}");
        assert!(e.reason.len() < 200, "{e:?}");
        // Two links between one pair of nodes (either way round), or one from a node to itself.
        let joining = |x: &str, y: &str| topology::Link {
            a: NodeId::new(x),
            b: NodeId::new(y),
            latency: topology::Latency::from_micros(1_000),
            capacity: topology::Bandwidth::from_mbps(1_000),
            state: Default::default(),
        };
        let mut dup = good.clone();
        let t = Arc::make_mut(&mut dup.topology);
        t.links.push(joining("a", "b"));
        assert_eq!(check(&a, &dup, None, None), Ok(()), "one link a--b");
        Arc::make_mut(&mut dup.topology)
            .links
            .push(joining("b", "a"));
        let e = check(&a, &dup, None, None).unwrap_err();
        assert_eq!(e.reason, "two links join b and a");
        let mut to_itself = good.clone();
        Arc::make_mut(&mut to_itself.topology)
            .links
            .push(joining("a", "a"));
        let e = check(&a, &to_itself, None, None).unwrap_err();
        assert_eq!(e.reason, "a link joins node a to itself");

        let mut hc = good.clone();
        let t = Arc::make_mut(&mut hc.topology);
        t.services
            .push(serde_json::from_value(serde_json::json!({"name": "chat"})).unwrap());
        t.nodes[0].serves.push(
            serde_json::from_value(serde_json::json!({
                "service": "chat", "backend": "127.0.0.1:9", "capacity": 1,
                "health_check": "/h HTTP/1.1\r\nHost: evil\r\n\r\nGET /x"
            }))
            .unwrap(),
        );
        let e = check(&a, &hc, None, None).unwrap_err();
        assert!(e.reason.contains("is not an HTTP path"), "{e:?}");
        assert!(!e.reason.contains('\r'), "{e:?}");
        // A check every 0 s (a checker spinning), or a threshold of 0.
        for (field, value, said) in [
            (
                "health_interval",
                serde_json::json!("0ns"),
                "health_interval 0",
            ),
            ("unhealthy_after", serde_json::json!(0), "unhealthy_after 0"),
            (
                "healthy_after",
                serde_json::json!(1000),
                "healthy_after 1000",
            ),
        ] {
            let mut hp = good.clone();
            let t = Arc::make_mut(&mut hp.topology);
            t.services
                .push(serde_json::from_value(serde_json::json!({"name": "chat"})).unwrap());
            let mut entry = serde_json::json!({
                "service": "chat", "backend": "127.0.0.1:9", "capacity": 1,
            });
            entry[field] = value;
            t.nodes[0]
                .serves
                .push(serde_json::from_value(entry).unwrap());
            let e = check(&a, &hp, None, None).unwrap_err();
            assert!(e.reason.contains(said), "{field}: {e:?}");
        }

        let mut svc = good.clone();
        let t = Arc::make_mut(&mut svc.topology);
        t.services
            .push(serde_json::from_value(serde_json::json!({"name": "Chat"})).unwrap());
        let e = check(&a, &svc, None, None).unwrap_err();
        assert!(e.reason.starts_with("service \"Chat\""), "{e:?}");
    }

    /// A snapshot in which this node serves a service the topology does not have is refused:
    /// applied, the site ran health checks and reported load for a service no edge can ask
    /// for, and its table had no entry to go with them.
    #[test]
    fn a_snapshot_in_which_this_node_serves_an_unknown_service_is_refused() {
        let a = NodeId::new("a");
        let mut s = with_a_at("127.0.0.1:0");
        let t = Arc::make_mut(&mut s.topology);
        t.nodes[0].kind = topology::NodeKind::Site;
        t.nodes[0].serves.push(
            serde_json::from_value(serde_json::json!({
                "service": "chat", "backend": "127.0.0.1:9", "capacity": 1
            }))
            .unwrap(),
        );
        let e = check(&a, &s, None, None).unwrap_err();
        assert_eq!(
            e.reason,
            "node a serves \"chat\", which is not a service of the topology"
        );
        let t = Arc::make_mut(&mut s.topology);
        t.services
            .push(serde_json::from_value(serde_json::json!({"name": "chat"})).unwrap());
        assert_eq!(check(&a, &s, None, None), Ok(()));
    }

    /// A chain of deltas, each within its frame, cannot build a topology larger than a full
    /// snapshot may be: the delta that would is refused, and its base stays the base.
    #[test]
    fn deltas_cannot_build_a_topology_larger_than_a_full_snapshot() {
        use crate::control::proto::{MAX_TO_ROUTER, TopologyDelta};
        let base = with_a_at("127.0.0.1:0");
        // A node named by a little over a third of a frame: each delta fits in its frame.
        let big = |c: char| {
            let mut n = base.topology.nodes[0].clone();
            n.id = NodeId::new(c.to_string().repeat(MAX_TO_ROUTER / 3 + 1));
            n
        };
        let add = |base: &Snapshot, node| {
            let delta = ToRouter::Delta {
                version: base.version + 1,
                base_version: base.version,
                topology_version: base.version + 1,
                changes: TopologyDelta {
                    nodes_upsert: vec![node],
                    ..Default::default()
                },
                live: Default::default(),
            };
            next_step(base, delta).unwrap()
        };
        let Step::Apply(once, _) = add(&base, big('x')) else {
            panic!("a third of a frame is taken");
        };
        let Step::Apply(twice, _) = add(&once, big('y')) else {
            panic!("two thirds of a frame are taken");
        };
        let got = add(&twice, big('z'));
        assert!(
            matches!(got, Step::Nack { version: 4, ref reason } if reason.contains("more than a full snapshot")),
            "{:?}",
            matches!(got, Step::Apply(..))
        );
    }

    /// Version 0 is "none yet" on the router's side: a snapshot numbered 0 is refused, and a
    /// delta or live update on version 0 is not built on the placeholder's empty topology but
    /// answered with a resync. (Both were applied and acknowledged.)
    #[test]
    fn version_0_is_refused_and_never_a_base() {
        use crate::control::proto::TopologyDelta;
        let placeholder = Snapshot::default();
        let a = with_a_at("127.0.0.1:0");
        let whole = |version| ToRouter::Snapshot {
            version,
            topology_version: 1,
            topology: a.topology.clone(),
            live: Default::default(),
            circuits: Arc::default(),
        };
        let delta = |version, base_version| ToRouter::Delta {
            version,
            base_version,
            topology_version: 1,
            changes: TopologyDelta {
                nodes_upsert: a.topology.nodes.clone(),
                ..TopologyDelta::default()
            },
            live: Default::default(),
        };
        let live = |version, base_version| ToRouter::Live {
            version,
            base_version,
            topology_version: 1,
            live: Default::default(),
        };
        let step = |base: &Snapshot, msg| next_step(base, msg).unwrap();

        assert!(
            matches!(step(&placeholder, whole(0)), Step::Nack { version: 0, ref reason } if reason.contains("version 0")),
            "{:?}",
            step(&placeholder, whole(0))
        );
        assert!(matches!(step(&a, whole(0)), Step::Nack { version: 0, .. }));
        // On a base the router holds too.
        for msg in [delta(0, 1), live(0, 1)] {
            let got = step(&a, msg);
            assert!(matches!(got, Step::Nack { version: 0, .. }), "{got:?}");
        }
        for msg in [delta(1, 0), live(1, 0)] {
            let got = step(&placeholder, msg);
            assert!(
                matches!(got, Step::Resync { have_version: None }),
                "{got:?}"
            );
        }
        // What a controller does send is taken: a whole snapshot, then deltas on it.
        assert!(matches!(step(&placeholder, whole(1)), Step::Apply(ref s, 1) if s.version == 1));
        assert!(matches!(step(&a, delta(2, 1)), Step::Apply(ref s, 1) if s.version == 2));
        assert!(matches!(step(&a, live(2, 1)), Step::Apply(ref s, 1) if s.version == 2));
        let got = step(&a, delta(3, 2));
        assert!(
            matches!(
                got,
                Step::Resync {
                    have_version: Some(1)
                }
            ),
            "{got:?}"
        );
        // A delta or live update that does not move past its base names another snapshot with
        // the base's version (or an older one): refused, the base kept.
        let mut ten = a.clone();
        ten.version = 10;
        for (base, msg, version) in [
            (&a, delta(1, 1), 1),
            (&a, live(1, 1), 1),
            (&ten, live(3, 10), 3),
            (&ten, delta(9, 10), 9),
        ] {
            let got = step(base, msg);
            assert!(
                matches!(got, Step::Nack { version: v, ref reason } if v == version && reason.contains("does not follow")),
                "{got:?}"
            );
        }
    }

    /// A restart counts staleness from the last word from the controller recorded on disk, not
    /// from when the stored version came (a quiet fabric sends no new version for days, and a
    /// restart while the controller is away raised a false STALE SNAPSHOT at once).
    #[tokio::test]
    async fn a_stored_snapshot_is_dated_by_the_last_recorded_contact() {
        let dir = tempfile::tempdir().unwrap();
        let stored = |received_unix_ms| stored_a_at("127.0.0.1:0", received_unix_ms);
        let a = NodeId::new("a");
        let read = || stored_snapshot(dir.path().to_path_buf(), &a);
        disk::save(dir.path(), &stored(1_000)).unwrap();
        assert_eq!(read().await.unwrap().snapshot().received_unix_ms, 1_000);
        disk::save_contact(dir.path(), 5_000).unwrap();
        assert_eq!(read().await.unwrap().snapshot().received_unix_ms, 5_000);
        // A version stored after the last recorded contact: its own time.
        disk::save(dir.path(), &stored(9_000)).unwrap();
        assert_eq!(read().await.unwrap().snapshot().received_unix_ms, 9_000);
    }

    #[test]
    fn contact_is_recorded_every_tenth_of_max_stale_from_1s_to_a_minute() {
        assert_eq!(contact_every(S(24 * 3600)), S(60));
        assert_eq!(contact_every(S(300)), S(30));
        assert_eq!(contact_every(S(3)), S(1));
    }

    /// A stored snapshot is checked as the controller's are: one those checks refuse (here two
    /// nodes of one id, as a damaged file, or one stored by a release before a check, could
    /// hold) is not started from. (Only the node's presence and address were checked: the
    /// router ran, at every start, what it would have refused from the controller.)
    #[tokio::test]
    async fn a_stored_snapshot_the_checks_refuse_is_not_started_from() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeId::new("a");
        let mut s = stored_a_at("127.0.0.1:0", 0);
        disk::save(dir.path(), &s).unwrap();
        assert!(matches!(
            stored_snapshot(dir.path().to_path_buf(), &a).await,
            Some(FromDisk::Ready(_))
        ));
        let mut t = (*s.topology).clone();
        let twin = t.nodes[0].clone();
        t.nodes.push(twin);
        s.topology = Arc::new(t);
        disk::save(dir.path(), &s).unwrap();
        assert!(
            stored_snapshot(dir.path().to_path_buf(), &a)
                .await
                .is_none()
        );
        // Version 0 is the placeholder, no snapshot: refused from disk as from the controller.
        // (It was taken, its time and topology version with it, though never run.)
        let mut zero = stored_a_at("127.0.0.1:0", 0);
        zero.version = 0;
        disk::save(dir.path(), &zero).unwrap();
        assert!(
            stored_snapshot(dir.path().to_path_buf(), &a)
                .await
                .is_none()
        );
    }

    /// A stored snapshot whose address for the node is not one of this host's is not started
    /// from: the router waits for the controller's instead of exiting at every start.
    #[tokio::test]
    async fn a_stored_snapshot_with_an_unbindable_address_is_not_started_from() {
        let dir = tempfile::tempdir().unwrap();
        let stored = |addr: &str| stored_a_at(addr, 0);
        let a = NodeId::new("a");
        let read = || stored_snapshot(dir.path().to_path_buf(), &a);
        // Not on this host: started from once it is ([`wait_bindable`]), not at once.
        disk::save(dir.path(), &stored("192.0.2.1:4433")).unwrap();
        assert!(
            matches!(read().await, Some(FromDisk::Late(_, at)) if at.to_string() == "192.0.2.1:4433")
        );
        disk::save(dir.path(), &stored("127.0.0.1:0")).unwrap();
        assert!(matches!(read().await, Some(FromDisk::Ready(_))));
        // In use (the router's previous process still going away): started from, its start
        // tried again until the address is free.
        let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = held.local_addr().unwrap().to_string();
        disk::save(dir.path(), &stored(&at)).unwrap();
        assert!(matches!(read().await, Some(FromDisk::Ready(_))));
    }

    /// A stored snapshot whose address is not on this host yet (a boot that starts the router
    /// before the network is configured, while the controller is away) is run on as soon as
    /// the address can be bound, unless the controller's snapshot came first: then the newer
    /// one stays. (It was given up for good, and the router waited for the controller.)
    #[tokio::test]
    async fn a_stored_snapshot_whose_address_comes_late_is_run_on_once_it_is_here() {
        let addr: SocketAddr = "192.0.2.1:4433".parse().unwrap();
        let every = Duration::from_millis(1);
        // Bindable at the fourth try.
        let tries = std::sync::atomic::AtomicU32::new(0);
        let comes_late = |_| match tries.fetch_add(1, Ordering::SeqCst) {
            0..3 => Err(std::io::ErrorKind::AddrNotAvailable),
            _ => Ok(()),
        };
        assert!(wait_bindable(addr, every, comes_late, || true).await);
        assert_eq!(tries.load(Ordering::SeqCst), 4);
        // Never bindable, no longer wanted: it stops.
        let never = |_| Err(std::io::ErrorKind::AddrNotAvailable);
        let wanted = std::sync::atomic::AtomicU32::new(3);
        let still = || wanted.fetch_sub(1, Ordering::SeqCst) > 0;
        assert!(!wait_bindable(addr, every, never, still).await);

        // Handed over only while no snapshot is there, `first` before it shows.
        let stored = stored_a_at("192.0.2.1:4433", 0);
        let placeholder = Snapshot::default();
        let (tx, rx) = watch::channel(Arc::new(placeholder));
        let ran = std::cell::Cell::new(false);
        assert!(hand_stored(&tx, &stored, || ran.set(true)));
        assert!(ran.get());
        assert_eq!(rx.borrow().version, stored.version);
        let controllers = Snapshot {
            version: 7,
            ..with_a_at("127.0.0.1:0")
        };
        tx.send_replace(Arc::new(controllers));
        let ran = std::cell::Cell::new(false);
        assert!(!hand_stored(&tx, &stored, || ran.set(true)));
        assert!(!ran.get());
        assert_eq!(rx.borrow().version, 7);
    }

    /// (The whole reason was logged, up to 64 MiB a line at each reconnect.)
    #[test]
    fn a_refusal_is_logged_bounded() {
        let e = ControlError::refused("€".repeat(1 << 20));
        let logged = e.to_string();
        assert!(logged.len() < 300, "{} bytes", logged.len());
        assert!(logged.contains("refused this router: €€"), "{logged}");
    }

    #[test]
    fn before_any_request_the_certificate_alone_says_when() {
        let s = schedule();
        let t = Instant::now();
        assert_eq!(s.next(t), t);
        assert_eq!(s.next(t + S(3600)), t + S(3600));
        assert_eq!(s.retry_in(t), Duration::ZERO);
    }

    /// Only the controller's `superseded` close is told apart (logged at info, then once at warn
    /// when it repeats; not as an error at each reconnection).
    #[test]
    fn a_superseded_session_is_told_by_its_close_code() {
        let closed = |code: u32| {
            Some(quinn::ConnectionError::ApplicationClosed(
                quinn::ApplicationClose {
                    error_code: quinn::VarInt::from_u32(code),
                    reason: bytes::Bytes::from_static(b"superseded by a newer control session"),
                },
            ))
        };
        assert!(is_superseded(closed(close::SUPERSEDED).as_ref()));
        for code in [close::NORMAL, close::PROTOCOL, close::WRITE_STALLED, 11] {
            assert!(!is_superseded(closed(code).as_ref()), "{code}");
        }
        assert!(!is_superseded(None));
        assert!(!is_superseded(Some(&quinn::ConnectionError::TimedOut)));
        assert!(!is_superseded(Some(&quinn::ConnectionError::LocallyClosed)));
    }

    /// What the operator guide promises: 30 s, then 1, 2, 4 and 8 minutes, then every 10.
    #[test]
    fn unanswered_requests_back_off_from_30s_doubling_to_10_minutes() {
        let mut s = schedule();
        let mut t = Instant::now();
        assert_eq!(
            gaps(&mut s, &mut t, 9),
            secs([30, 60, 120, 240, 480, 600, 600, 600, 600])
        );
    }

    #[test]
    fn a_refused_request_is_not_repeated_before_the_backoff() {
        let mut s = schedule();
        let t = Instant::now();
        s.attempted(t);
        // Refused at once (the certificate is still due): the next request waits 30 s.
        assert_eq!(s.next(t), t + S(30));
        assert_eq!(s.retry_in(t), S(30));
        assert_eq!(s.retry_in(t + S(10)), S(20));
        assert_eq!(s.retry_in(t + S(31)), Duration::ZERO);
        // A certificate due later than the back-off: its own time rules.
        assert_eq!(s.next(t + S(45)), t + S(45));
    }

    #[test]
    fn an_installed_certificate_starts_the_backoff_again() {
        let mut s = schedule();
        let mut t = Instant::now();
        assert_eq!(gaps(&mut s, &mut t, 6), secs([30, 60, 120, 240, 480, 600]));
        // The answer to the last request comes 5 s after it and is installed.
        let ok = t + S(5);
        s.attempted(t);
        s.succeeded(ok);
        // Whenever the new certificate is due, a request may go 30 s after the success...
        assert_eq!(s.next(ok), ok + S(30));
        assert_eq!(s.retry_in(ok), S(30));
        // ... and failures from then on back off from 30 s again.
        let mut t = ok + S(30);
        assert_eq!(gaps(&mut s, &mut t, 3), secs([30, 60, 120]));
    }

    #[test]
    fn a_success_never_holds_the_next_request_back_longer_than_before() {
        let mut s = schedule();
        let t = Instant::now();
        s.attempted(t);
        // Installed 20 s after the request: the back-off of that request (30 s) still holds.
        s.succeeded(t + S(20));
        assert_eq!(s.next(t), t + S(30));
    }

    #[test]
    fn the_backoff_is_configurable_and_capped() {
        let mut s = RenewSchedule::new(Duration::from_millis(500), S(2));
        let mut t = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(gaps(&mut s, &mut t, 5), [ms(500), S(1), S(2), S(2), S(2)]);
    }
}
