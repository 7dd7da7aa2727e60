//! The controller: the truth about the fabric (topology versions in the [`Store`]), the live
//! state merged from telemetry, and the versioned snapshots it distributes to routers.
//!
//! Flow: an apply validates the text, commits it durably (one store transaction), then
//! publishes a full snapshot at once. Telemetry changes that pass the anti-flap thresholds
//! schedule a recomputation through the RFC 8405 back-off ([`throttle`]); it publishes a
//! `Live` delta on top of the previous version. Each published version is encoded once
//! ([`Published`]) and the same bytes go to every router ([`distribute`]).

pub mod daemon;
pub mod distribute;
pub mod live;
pub mod metrics;
pub mod records;
pub mod renew;
pub mod throttle;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use topology::circuit::ProvisionedCircuit;
use topology::route::LiveState;

/// The observations an apply's plan compares: the live state merged for the topology in force
/// and for the new one, the sites edges use, and their margins, all of one instant.
type Observed = (
    LiveState,
    LiveState,
    topology::diff::Incumbents,
    topology::diff::Margins,
);

/// What `live` has observed at `now`, for an apply's plan onto the topology of `new`.
fn observe(live: &LiveAggregator, new: &live::Index, now: Instant) -> Observed {
    (
        live.merged(now),
        live.merged_for(new, now),
        live.incumbents(now),
        live.margins(now),
    )
}
use topology::{Diagnostic, NodeId, Topology};

use crate::store::{self, Store, StoreError};
use live::{LiveAggregator, LiveParams, Sample};
use records::{Nack, Origin, RouterRecord, TopologyVersion, VersionMeta};
use router::control::proto::{self, ToRouter};
use throttle::{Backoff, BackoffParams};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("the topology is invalid ({} error(s))", topology::tally(.0).0)]
    Invalid(Vec<Diagnostic>),
    /// The store's current version no longer loads (a newer loader is stricter): the operator
    /// must see why rather than the controller serving something else.
    #[error("the stored topology version {version} is invalid under this build ({} error(s))", topology::tally(.diags).0)]
    InvalidStored {
        version: u64,
        diags: Vec<Diagnostic>,
    },
    #[error("{}", conflict(*expected, *current))]
    Conflict { expected: u64, current: u64 },
    #[error("no topology version {0}")]
    NoSuchVersion(u64),
    #[error("the store has no topology: start the controller with --topology FILE once")]
    Empty,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("encoding a snapshot: {0}")]
    Encode(#[from] proto::ProtoError),
    /// Routers refuse a control frame over [`proto::MAX_TO_ROUTER`] (and would reconnect to
    /// be sent it again, for ever): such a version is never published.
    #[error(
        "the snapshot would be {bytes} bytes, over the {max} bytes a router takes in one frame: \
         make the topology or the circuits smaller"
    )]
    TooLarge { bytes: usize, max: usize },
    #[error("internal: {0}")]
    Internal(String),
}

/// A base version that is not the one in force: changed since, or a version that was never in
/// force (newer than the current one, or 0: a typo, "changed since" would send the operator
/// looking for a change no one made).
fn conflict(expected: u64, current: u64) -> String {
    if expected > current || expected == 0 {
        format!(
            "the base version {expected} was never in force (the version in force is {current}); \
             fetch the topology and give its version"
        )
    } else {
        format!("the topology changed since version {expected} (now {current}); fetch it again")
    }
}

/// A blocking task of the controller that panicked or was cancelled ([`crate::task_failed`]:
/// logged, and told without the panic's message).
impl From<tokio::task::JoinError> for ControllerError {
    fn from(e: tokio::task::JoinError) -> Self {
        ControllerError::Internal(crate::task_failed(e))
    }
}

/// The topology in force.
#[derive(Debug, Clone)]
pub struct Current {
    pub record: TopologyVersion,
    pub topology: Arc<Topology>,
    pub warnings: Vec<Diagnostic>,
}

/// One distributed version, encoded once and shared by every router connection.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub topology_version: u64,
    pub topology: Arc<Topology>,
    pub live: LiveState,
    pub circuits: Arc<Vec<ProvisionedCircuit>>,
    /// A digest of `circuits` ([`circuits_digest`]): what a router's rejection of this version
    /// is compared by, without keeping the list.
    pub circuits_digest: u64,
    /// `ToRouter::Snapshot` frame.
    pub full: Bytes,
    /// `ToRouter::Live` frame, or a topology `Delta` frame, and its base version.
    pub delta: Option<(u64, Bytes)>,
    pub at: Instant,
    /// It carries the stored circuits: a publication made them part of the controller's
    /// versions. Routers are served only such versions ([`distribute`]): the versions before
    /// (the start's, and any while the stored circuits cannot be published) carry none, and a
    /// router served one would drop every circuit it holds.
    pub with_circuits: bool,
}

/// What the controller knows about one router right now (the durable part is in the store).
#[derive(Debug, Clone)]
pub struct RouterLive {
    pub record: RouterRecord,
    /// It has a control session now (its current one: see [`RouterSession`]).
    pub connected: bool,
    /// Its current control session, the only one whose reports count (None: not connected).
    session: Option<CurrentSession>,
    pub last_seen: Instant,
    /// When its last telemetry report arrived (None: none since the controller started).
    pub last_telemetry: Option<Instant>,
    /// Neighbour samples of its telemetry refused as implausible (an RTT above
    /// [`distribute::MAX_RTT`]), since the controller started.
    pub samples_refused: u64,
    /// Telemetry reports dropped for coming faster than [`distribute::TELEMETRY_PER_SEC`],
    /// since the controller started.
    pub reports_dropped: u64,
    /// Telemetry reports dropped for naming another node than the one its session
    /// authenticated (a misconfigured or misbehaving router), since the controller started.
    pub reports_misnamed: u64,
    /// Its last telemetry said it is draining before it stops (cleared when its current session
    /// ends).
    pub draining: bool,
}

/// A router's current control session, as its [`RouterLive`] holds it.
#[derive(Debug, Clone)]
struct CurrentSession {
    id: u64,
    /// Told when the controller ends the session (a newer session of the node took over, or
    /// the node left the topology).
    end: Arc<Ending>,
}

/// Why the controller ends a router's control session ([`RouterSession::ended`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// A newer session of the node passed its hello checks.
    Superseded,
    /// The node is not in the topology in force since `topology_version` (an apply or a
    /// rollback removed it).
    Removed { topology_version: u64 },
}

/// How a session is told to end: the first reason given, and a wake-up.
#[derive(Debug, Default)]
struct Ending {
    why: std::sync::OnceLock<SessionEnd>,
    notify: Notify,
}

impl Ending {
    /// Tells the session to end for `why`, unless it was told already.
    fn end(&self, why: SessionEnd) {
        if self.why.set(why).is_ok() {
            // A permit is kept if the session is not waiting at this instant.
            self.notify.notify_one();
        }
    }
}

/// One control session of a router ([`distribute`]), from [`Controller::router_session_start`]
/// to [`Controller::router_session_end`]. A node has one current session, the newest: what an
/// older one reports (acknowledgements, rejections, telemetry, draining) is not taken, and its
/// end leaves the node connected. A router that reconnects after a network blip gets its new
/// session while the controller's side of the old one can live on until its idle timeout; each
/// ended session marked the node disconnected, the old one's end too, under the new one.
/// A session of a node that a topology change removes is told to end too, before the version
/// without the node is published.
#[derive(Debug)]
pub struct RouterSession {
    node: String,
    id: u64,
    end: Arc<Ending>,
}

impl RouterSession {
    /// The node the session authenticated.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// This session's number: session numbers only grow while the controller runs.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether the session was told to end ([`RouterSession::ended`] would be ready).
    pub fn is_ended(&self) -> bool {
        self.end.why.get().is_some()
    }

    /// Completes once the controller ends this session: a newer session of the node took over,
    /// or the node left the topology (cancel-safe; at once when it already happened).
    pub async fn ended(&self) -> SessionEnd {
        loop {
            if let Some(why) = self.end.why.get() {
                return *why;
            }
            self.end.notify.notified().await;
        }
    }
}

impl RouterLive {
    /// A router as first seen (from the store at start-up, or at its first connection or ack).
    fn new(record: RouterRecord, connected: bool) -> RouterLive {
        RouterLive {
            record,
            connected,
            session: None,
            last_seen: Instant::now(),
            last_telemetry: None,
            samples_refused: 0,
            reports_dropped: 0,
            reports_misnamed: 0,
            draining: false,
        }
    }

    /// Whether `session` is its current control session.
    fn in_session(&self, session: &RouterSession) -> bool {
        self.session.as_ref().is_some_and(|c| c.id == session.id)
    }

    /// A router not in the store yet.
    fn unrecorded(node: &str, connected: bool) -> RouterLive {
        let record = RouterRecord {
            node: node.to_string(),
            ..Default::default()
        };
        RouterLive::new(record, connected)
    }
}

/// Topology changes of one kind (applies, or rollbacks) since the controller started: accepted
/// (committed and distributed) or rejected (invalid, conflicting, no such version, or failed).
/// Dry runs, and changes to the text already in force, change nothing and are not counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeCount {
    pub accepted: u64,
    pub rejected: u64,
}

#[derive(Debug, Default)]
struct ChangeCounter {
    accepted: AtomicU64,
    rejected: AtomicU64,
}

impl ChangeCounter {
    /// Counts a real (not dry-run) apply or rollback.
    fn count<E>(&self, outcome: &Result<ApplyOutcome, E>) {
        let n = match outcome {
            // The text in force already: nothing changed.
            Ok(o) if o.unchanged => return,
            // Committed, but routers were not sent it: not the change the operator asked for.
            Ok(o) if o.not_distributed.is_some() => &self.rejected,
            Ok(_) => &self.accepted,
            Err(_) => &self.rejected,
        };
        n.fetch_add(1, Relaxed);
    }

    fn get(&self) -> ChangeCount {
        ChangeCount {
            accepted: self.accepted.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
        }
    }
}

/// The result of an apply or a dry run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ApplyOutcome {
    /// The new version: None for a dry run, and when the text is the current version's byte for
    /// byte (nothing applied; a retried apply or rollback is safe).
    pub version: Option<u64>,
    pub previous_version: u64,
    pub dry_run: bool,
    /// The text is the version in force's, byte for byte: nothing is (or would be) applied.
    #[serde(default)]
    pub unchanged: bool,
    pub warnings: Vec<crate::admin::Diag>,
    pub plan: crate::plan::Plan,
    /// The version was committed (it is the version in force) but its snapshot could not be
    /// published, with why: routers run the one before it until a later change can be. It
    /// cannot be published when it is over the routers' frame limit, which the check before
    /// the commit rules out but for circuits published in between.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_distributed: Option<String>,
}

/// How often the recompute loop looks for observations that aged out ([`Controller::recompute_loop`]).
const EXPIRY_TICK: Duration = Duration::from_secs(1);

pub struct Controller {
    store: Arc<dyn Store>,
    inner: Mutex<Inner>,
    published: watch::Sender<Arc<Published>>,
    routers: DashMap<String, RouterLive>,
    /// Routers whose record changed since the last flush to the store.
    dirty_routers: Mutex<BTreeMap<String, RouterRecord>>,
    /// Each node's telemetry and renewal budgets, shared by its sessions: a router that
    /// reconnects goes on with them (a new session's full burst, each time, let a router
    /// reconnecting in a loop send at will).
    pub(crate) session_budgets: DashMap<String, Arc<Mutex<distribute::Budgets>>>,
    /// Held by the flush writing `dirty_routers` ([`Controller::flush_routers`]).
    flushing: Mutex<()>,
    recompute: Notify,
    apply_lock: tokio::sync::Mutex<()>,
    /// Names allowed to connect (the nodes of the current topology); swapped on every apply.
    pub peers: router::tls::PeerNames,
    epoch: u64,
    applies: ChangeCounter,
    rollbacks: ChangeCounter,
    /// Router connections closed by the controller, by close code ([`distribute`]).
    pub session_closes: distribute::SessionCloses,
    /// Router handshakes the handshake gate turned away ([`distribute`]).
    pub handshakes_turned: distribute::HandshakesTurned,
    /// The last [`RouterSession`] number handed out.
    last_session: AtomicU64,
    /// The largest snapshot published, in bytes: [`proto::MAX_TO_ROUTER`], a router's frame
    /// limit (tests lower it, [`Controller::set_snapshot_limit`]).
    snapshot_limit: AtomicUsize,
    /// Tests: run once by an apply just before it commits.
    #[cfg(test)]
    before_commit: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Tests: taken by the next apply's plan, which runs it first (it may block, or panic).
    #[cfg(test)]
    plan_gate: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

struct Inner {
    current: Arc<Current>,
    /// Provisioned circuits (set by the circuits module), carried in every full snapshot.
    circuits: Arc<Vec<ProvisionedCircuit>>,
    /// `circuits` are the stored ones ([`Controller::publish_circuits`] went through once):
    /// what [`Published::with_circuits`] says of each version.
    circuits_published: bool,
    live: LiveAggregator,
    /// The RFC 8405 back-off of gradual changes (RTTs, loads within a site's room).
    backoff: Backoff,
    /// The back-off of urgent ones (a link up or down, a site or service healthy or not, full or
    /// not), kept apart: a busy fabric's loads hold `backoff` in its long wait (5 s), and a link
    /// going down behind them waited as long (`live::Change`).
    urgent: Backoff,
    /// The back-off of links going up or down, kept apart from `urgent`: a site hovering at its
    /// capacity flips full and not full at its reports and holds `urgent` in its long wait.
    links: Backoff,
    seq: u64,
}

impl Inner {
    /// The back-off that throttles a change of this kind (`None`: no change).
    fn backoff_of(&mut self, change: live::Change) -> Option<&mut Backoff> {
        match change {
            live::Change::None => None,
            live::Change::Gradual => Some(&mut self.backoff),
            live::Change::Urgent => Some(&mut self.urgent),
            live::Change::Link => Some(&mut self.links),
        }
    }

    /// When the next recomputation is due, of any kind.
    fn due(&self) -> Option<Instant> {
        [self.backoff.due(), self.urgent.due(), self.links.due()]
            .into_iter()
            .flatten()
            .min()
    }
}

/// The most warnings of an imported `--topology` file that its import logs.
const MAX_IMPORT_WARNINGS_LOGGED: usize = 20;

/// Logs the warnings of the `--topology` file imported at a first start, each as
/// `FILE:LINE:COL: warning: ...`, at most [`MAX_IMPORT_WARNINGS_LOGGED`] and a count of the rest.
fn log_import_warnings(file: &str, warnings: &[Diagnostic]) {
    for w in warnings.iter().take(MAX_IMPORT_WARNINGS_LOGGED) {
        tracing::warn!("{}", w.display(file));
    }
    if warnings.len() > MAX_IMPORT_WARNINGS_LOGGED {
        tracing::warn!(
            more = warnings.len() - MAX_IMPORT_WARNINGS_LOGGED,
            "more warnings in {file}: `tasman topology validate {file}` lists them all"
        );
    }
}

/// The most warnings of rules added since the text in force was stored that a start logs.
const MAX_NEWER_RULES_LOGGED: usize = 20;

/// Logs the warnings of rules added since the text in force (`version`) was stored
/// (`topology::load_stored` says "accepted in this stored version"), each as
/// `stored-version-N:LINE:COL: ...`, at most [`MAX_NEWER_RULES_LOGGED`] and a count of the rest.
fn log_newer_rules(version: u64, warnings: &[Diagnostic]) {
    let newer: Vec<&Diagnostic> = warnings
        .iter()
        .filter(|w| w.message.contains("accepted in this stored version"))
        .collect();
    let file = format!("stored-version-{version}");
    for w in newer.iter().take(MAX_NEWER_RULES_LOGGED) {
        tracing::warn!(
            "the topology in force breaks a rule added since it was stored: {}",
            w.display(&file)
        );
    }
    if newer.len() > MAX_NEWER_RULES_LOGGED {
        tracing::warn!(
            more = newer.len() - MAX_NEWER_RULES_LOGGED,
            "more rules added since the topology in force was stored are broken by it"
        );
    }
    if !newer.is_empty() {
        tracing::warn!(
            "apply a fixed text when you can: a new text, or a rollback to this one, is refused for these"
        );
    }
}

/// Validates topology text with the one loader (line:column diagnostics on failure).
pub fn validate(text: &str) -> Result<(Arc<Topology>, Vec<Diagnostic>), ControllerError> {
    loaded(topology::load(text))
}

/// [`validate`] for the text in force in the store, accepted by an earlier build: the rules
/// added since are warnings (`topology::load_stored`), so that an upgrade starts.
fn validate_stored(text: &str) -> Result<(Arc<Topology>, Vec<Diagnostic>), ControllerError> {
    loaded(topology::load_stored(text))
}

fn loaded(
    l: Result<topology::Loaded, Vec<Diagnostic>>,
) -> Result<(Arc<Topology>, Vec<Diagnostic>), ControllerError> {
    l.map(|l| (Arc::new(l.topology), l.warnings))
        .map_err(ControllerError::Invalid)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Controller {
    /// Opens the controller on `store`. When the store has no topology yet, `import` (the
    /// `--topology FILE` text and its file name) becomes version 1; afterwards the store is
    /// the truth and `import` is ignored.
    pub fn open(
        store: Arc<dyn Store>,
        import: Option<(&str, &str)>,
    ) -> Result<Arc<Controller>, ControllerError> {
        let mut cur = store::read(&*store, |tx| records::current(tx))?;
        if cur.is_none()
            && let Some((text, file)) = import
        {
            let (topo, warnings) = validate(text)?;
            // Said as `tasman topology validate` and an apply say them: a start imports the
            // file once, and no later start names its warnings again.
            log_import_warnings(file, &warnings);
            let rec = store::transaction(&*store, |tx| {
                records::commit_topology(
                    tx,
                    text,
                    &topo,
                    "controller",
                    &format!("imported from {file}"),
                    Origin::Import {
                        file: file.to_string(),
                    },
                )
            })?;
            cur = Some(rec);
        }
        let record = cur.ok_or(ControllerError::Empty)?;
        // The stored text was valid when applied; a newer loader could disagree, and then the
        // operator must see why rather than the controller silently serving something else.
        let (topology, warnings) = validate_stored(&record.text).map_err(|e| match e {
            ControllerError::Invalid(diags) => ControllerError::InvalidStored {
                version: record.version,
                diags,
            },
            e => e,
        })?;
        // Said at every start: a rule added since this text was stored (a newer build's) is a
        // warning here and an error for any new text, the text in force included when it is
        // applied again or rolled back to. (It was kept for tests only: the operator learnt of it
        // at the first unrelated apply, refused.)
        log_newer_rules(record.version, &warnings);
        // Versions stored by an earlier build have no metadata record, which history reads:
        // written once, in the transaction (one fsync) that bumps the epoch.
        let (backfilled, epoch) = store::transaction(&*store, |tx| -> Result<_, StoreError> {
            Ok((records::backfill_meta(tx)?, records::next_epoch(tx)?))
        })?;
        if backfilled > 0 {
            tracing::info!(
                versions = backfilled,
                "topology history: wrote the metadata of versions stored by an earlier build"
            );
        }
        // The routers of the topology in force (the store keeps the records of removed nodes).
        let routers = DashMap::new();
        let nodes: std::collections::HashSet<&str> =
            topology.nodes.iter().map(|n| n.id.as_str()).collect();
        for (node, rec) in store::read(&*store, |tx| records::ROUTERS.all(tx))? {
            if nodes.contains(node.as_str()) {
                routers.insert(node, RouterLive::new(rec, false));
            }
        }
        let peers = router::tls::PeerNames::new(topology.nodes.iter().map(|n| n.id.to_string()));
        let current = Arc::new(Current {
            record,
            topology,
            warnings,
        });
        let circuits: Arc<Vec<ProvisionedCircuit>> = Arc::default();
        let first = encode(
            epoch << 32 | 1,
            &current,
            &circuits,
            circuits_digest(&circuits),
            LiveState::default(),
            None,
            proto::MAX_TO_ROUTER,
        )?;
        let (published, _) = watch::channel(Arc::new(first));
        let live = LiveAggregator::new(LiveParams::default(), current.topology.clone());
        Ok(Arc::new(Controller {
            store,
            inner: Mutex::new(Inner {
                current,
                circuits,
                circuits_published: false,
                live,
                backoff: Backoff::new(BackoffParams::default()),
                urgent: Backoff::new(BackoffParams::default()),
                links: Backoff::new(BackoffParams::default()),
                seq: 1,
            }),
            published,
            routers,
            dirty_routers: Mutex::new(BTreeMap::new()),
            session_budgets: DashMap::new(),
            flushing: Mutex::new(()),
            recompute: Notify::new(),
            apply_lock: tokio::sync::Mutex::new(()),
            peers,
            epoch,
            applies: ChangeCounter::default(),
            rollbacks: ChangeCounter::default(),
            session_closes: Default::default(),
            handshakes_turned: Default::default(),
            last_session: AtomicU64::new(0),
            snapshot_limit: AtomicUsize::new(proto::MAX_TO_ROUTER),
            #[cfg(test)]
            before_commit: Mutex::new(None),
            #[cfg(test)]
            plan_gate: Mutex::new(None),
        }))
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn current(&self) -> Arc<Current> {
        lock(&self.inner).current.clone()
    }

    pub fn published(&self) -> Arc<Published> {
        self.published.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.published.subscribe()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Applies accepted and rejected since the controller started (not dry runs, not rollbacks).
    pub fn applies(&self) -> ChangeCount {
        self.applies.get()
    }

    /// Rollbacks accepted and rejected since the controller started (not dry runs).
    pub fn rollbacks(&self) -> ChangeCount {
        self.rollbacks.get()
    }

    /// Validates `text`, computes the impact plan against the current topology and, unless
    /// `dry_run`, commits it durably as the next version and distributes it. `base_version`
    /// guards against applying over someone else's change: unless it is the version in force,
    /// the apply (or dry run) is refused ([`ControllerError::Conflict`]; `tasman topology edit`,
    /// and `apply`/`rollback --base-version`).
    pub async fn apply(
        &self,
        text: &str,
        author: &str,
        message: &str,
        origin: Origin,
        dry_run: bool,
        base_version: Option<u64>,
    ) -> Result<ApplyOutcome, ControllerError> {
        let out = self
            .apply_uncounted(text, author, message, origin, dry_run, base_version)
            .await;
        if !dry_run {
            self.applies.count(&out);
        }
        out
    }

    /// [`Controller::apply`], counted by the caller as an apply or a rollback.
    async fn apply_uncounted(
        &self,
        text: &str,
        author: &str,
        message: &str,
        origin: Origin,
        dry_run: bool,
        base_version: Option<u64>,
    ) -> Result<ApplyOutcome, ControllerError> {
        let started = Instant::now();
        // Up to 16 MiB of text: seconds of CPU, never on a runtime worker.
        // The index the plan merges telemetry against is built there too (not under the lock).
        let (topology, warnings, index) = {
            let text = text.to_owned();
            tokio::task::spawn_blocking(move || {
                validate(&text).map(|(t, w)| (t.clone(), w, live::Index::new(t)))
            })
            .await??
        };
        let validated = started.elapsed();
        let _serial = self.apply_lock.lock().await;
        // The plan sees every fresh observation, including those the RFC 8405 back-off has not
        // pushed to the routers yet (they act on their own evidence sooner anyway): a site that
        // just died is not predicted as a destination.
        // It starts from the sites edges report in use, and moves them as routers would.
        // The new side merges the same observations against the new topology, as the first
        // version published after the apply does (a measurement below the old declared latency
        // is no excess there, but it is above a lowered one).
        let (old, (live, new_live, incumbents, margins), provisioned) = {
            let inner = lock(&self.inner);
            let observed = observe(&inner.live, &index, Instant::now());
            (inner.current.clone(), observed, inner.circuits.clone())
        };
        // A text already in force changes nothing whatever the base (below: `unchanged`): a
        // retried `--base-version N` apply whose first attempt made N+1 is answered as done,
        // not refused as if someone else had changed the topology.
        if let Some(expected) = base_version
            && expected != old.record.version
            && text != old.record.text
        {
            return Err(ControllerError::Conflict {
                expected,
                current: old.record.version,
            });
        }
        let circuits = self.read_off_workers(crate::circuits::all).await?;
        // The impact plan (one shortest-path tree per edge: ~0.3 s at 1,000 edges) is
        // informational, it never blocks an apply; so a real apply commits and distributes
        // first and computes the plan while routers are already applying the new version.
        #[cfg(test)]
        let plan_gate = lock(&self.plan_gate).take();
        // The plan, on both sides from one instant's observations: those merged above for a
        // dry run or an unchanged text, those of the instant the new version is published for
        // a change (telemetry merged during the commit is in what routers were sent; the plan
        // told the state before it).
        let plan_with = {
            let (old_topology, new_topology) = (old.topology.clone(), topology.clone());
            move |(live, new_live, incumbents, margins): Observed| {
                #[cfg(test)]
                if let Some(gate) = plan_gate {
                    gate();
                }
                crate::plan::Plan::compute(
                    &old_topology,
                    &new_topology,
                    &live,
                    &new_live,
                    &incumbents,
                    &margins,
                )
                .with_circuits(&old_topology, &new_topology, &circuits)
            }
        };
        // The text of the version in force, byte for byte (a retried apply or rollback, whose
        // first attempt's answer was lost): nothing to do, no new version. A text that differs
        // only in comments or layout is a new version (history keeps it), with no routing change.
        let unchanged = text == old.record.text;
        // A version whose snapshot routers would refuse is never committed (nor passes a dry
        // run): it could not be distributed (checked again, with the circuits then in force,
        // when it is published).
        if !unchanged {
            let (max, probe, at) = (self.snapshot_limit(), topology.clone(), old.record.version);
            let provisioned = provisioned.clone();
            tokio::task::spawn_blocking(move || fits(at, &probe, &provisioned, max)).await??;
        }
        if dry_run || unchanged {
            let observed = (live, new_live, incumbents, margins);
            // The version in force that was committed but could not be published (a retry of
            // that apply, whose answer was lost) is published again now, and still told when
            // it cannot be: "unchanged" alone said it was in force on the routers.
            let mut not_distributed = None;
            if unchanged && !dry_run {
                tracing::info!(
                    version = old.record.version,
                    author,
                    "topology unchanged: not applied"
                );
                let mut inner = lock(&self.inner);
                let version = inner.current.record.version;
                if self.published.borrow().topology_version != version {
                    not_distributed = self.publish_locked(&mut inner, true).err().map(|e| {
                        tracing::error!(
                            version,
                            "topology version {version} is in force but still not distributed (routers keep the one before): {e}"
                        );
                        e.to_string()
                    });
                }
            }
            // The plan reads only what it captured: the next apply or rollback does not wait
            // for it (a dry run's plan, seconds on a large fabric, held every change behind it).
            drop(_serial);
            let plan = tokio::task::spawn_blocking(move || plan_with(observed)).await?;
            return Ok(ApplyOutcome {
                version: None,
                previous_version: old.record.version,
                dry_run,
                unchanged,
                warnings: diags(&warnings),
                plan,
                not_distributed,
            });
        }
        #[cfg(test)]
        if let Some(f) = lock(&self.before_commit).take() {
            f();
        }
        let store = self.store.clone();
        let (text2, topo2, author2, message2) = (
            text.to_string(),
            topology.clone(),
            author.to_string(),
            message.to_string(),
        );
        let (max, at) = (self.snapshot_limit(), old.record.version);
        let record = tokio::task::spawn_blocking(move || {
            store::transaction(&*store, |tx| {
                // Circuits committed since the check above (their publication, which `provisioned`
                // is read from, still to come) go out with this version too: checked again with
                // those the store holds, inside the transaction, so that none commits between. A
                // version too large with them could never be sent, nor could the circuits be
                // published at the controller's next start.
                let stored = Arc::new(crate::circuits::provisioned(&crate::circuits::all(tx)?));
                if stored != provisioned {
                    fits(at, &topo2, &stored, max)?;
                }
                records::commit_topology(tx, &text2, &topo2, &author2, &message2, origin)
                    .map_err(ControllerError::from)
            })
        })
        .await??;
        let version = record.version;
        let current = Arc::new(Current {
            record,
            topology: topology.clone(),
            warnings: warnings.clone(),
        });
        // Routers of the new topology may connect; removed ones are refused at their next
        // handshake, and their sessions end now, before the new version goes out.
        self.peers
            .set(topology.nodes.iter().map(|n| n.id.to_string()));
        let (not_distributed, observed) = {
            let mut inner = lock(&self.inner);
            // What the plan compares: the observations as the new version is published.
            let observed = observe(&inner.live, &index, Instant::now());
            inner.live.set_topology(index);
            inner.current = current;
            self.end_removed(inner.live.index(), version);
            // Committed: it is the version in force whatever happens now, so a failure to
            // publish it is told with it, not as the apply's failure (which said the change
            // was refused while history showed it).
            let not_distributed = self.publish_locked(&mut inner, true).err().map(|e| {
                tracing::error!(
                    version,
                    "topology version {version} committed but not distributed (routers keep the one before): {e}"
                );
                e.to_string()
            });
            (not_distributed, observed)
        };
        let published = started.elapsed();
        // Committed and published: the next change need not wait for this one's plan.
        drop(_serial);
        // Committed and published: a plan that fails now (a bug) is told in the plan, not as
        // the apply's failure, which would say a change in force was refused.
        let plan = tokio::task::spawn_blocking(move || plan_with(observed))
            .await
            .unwrap_or_else(|e| {
                // Logged there, with the panic's message.
                let _ = crate::task_failed(e);
                crate::plan::Plan {
                    changed: true,
                    text: format!(
                        "no plan: computing it failed unexpectedly (the controller's log says \
                         why); version {version} is applied"
                    ),
                    ..Default::default()
                }
            });
        tracing::info!(
            version,
            author,
            validate_ms = validated.as_secs_f64() * 1e3,
            published_ms = published.as_secs_f64() * 1e3,
            planned_ms = started.elapsed().as_secs_f64() * 1e3,
            "topology applied"
        );
        Ok(ApplyOutcome {
            version: Some(version),
            previous_version: old.record.version,
            dry_run,
            unchanged: false,
            warnings: diags(&warnings),
            plan,
            not_distributed,
        })
    }

    /// Applies the text of an earlier version as a new version. `base_version` guards against
    /// rolling back over someone else's change, as [`Self::apply`]'s.
    pub async fn rollback(
        &self,
        to: u64,
        author: &str,
        message: &str,
        dry_run: bool,
        base_version: Option<u64>,
    ) -> Result<ApplyOutcome, ControllerError> {
        let out = async {
            let rec = self
                .read_off_workers(move |tx| records::version(tx, to))
                .await?
                .ok_or(ControllerError::NoSuchVersion(to))?;
            let msg = if message.is_empty() {
                format!("rollback to version {to}")
            } else {
                message.to_string()
            };
            self.apply_uncounted(
                &rec.text,
                author,
                &msg,
                Origin::Rollback { to },
                dry_run,
                base_version,
            )
            .await
        }
        .await;
        if !dry_run {
            self.rollbacks.count(&out);
        }
        out
    }

    /// Newest first, at most `limit` versions' metadata (never their texts). Reads the store on
    /// the calling thread: async callers run it on the blocking pool.
    pub fn history(&self, limit: usize) -> Result<Vec<VersionMeta>, ControllerError> {
        Ok(store::read(&*self.store, |tx| records::history(tx, limit))?)
    }

    /// [`Self::history`] and the version the store holds as current, read together: the two
    /// agree even while an apply commits (the version in memory is taken up only after).
    /// `before`: only versions older than it ([`records::history_before`]).
    pub fn history_with_current(
        &self,
        limit: usize,
        before: Option<u64>,
    ) -> Result<(Option<u64>, Vec<VersionMeta>), ControllerError> {
        Ok(store::read(&*self.store, |tx| {
            Ok::<_, StoreError>((
                records::current_version(tx)?,
                records::history_before(tx, limit, before)?,
            ))
        })?)
    }

    /// One version, text and all. Reads the store on the calling thread, like [`Self::history`].
    pub fn version(&self, v: u64) -> Result<Option<TopologyVersion>, ControllerError> {
        Ok(store::read(&*self.store, |tx| records::version(tx, v))?)
    }

    /// Runs `f` on a consistent read view on tokio's blocking pool: a read that waits on a slow
    /// disk (or decodes a large text) holds a blocking thread, not one of the runtime's
    /// workers, which also serve routers' sessions.
    async fn read_off_workers<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn store::ReadTxn) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, ControllerError> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || store::read(&*store, f)).await??)
    }

    /// Encodes and publishes the next version. `full_only`: the topology changed (no delta).
    fn publish_locked(
        &self,
        inner: &mut Inner,
        topology_changed: bool,
    ) -> Result<(), ControllerError> {
        let prev = self.published.borrow().clone();
        inner.seq += 1;
        let version = self.epoch << 32 | inner.seq;
        let live = inner.live.merged(Instant::now());
        let base = (!topology_changed && prev.topology_version == inner.current.record.version)
            .then_some(prev.version);
        // The same list as the version before (a live update): its digest, not another pass.
        let digest = if Arc::ptr_eq(&prev.circuits, &inner.circuits) {
            prev.circuits_digest
        } else {
            circuits_digest(&inner.circuits)
        };
        let mut p = encode(
            version,
            &inner.current,
            &inner.circuits,
            digest,
            live.clone(),
            base,
            self.snapshot_limit(),
        )?;
        p.with_circuits = inner.circuits_published;
        inner.live.publish(live);
        // A topology change with the same circuits goes out as a delta when it is exact and
        // smaller than the snapshot (which is within the routers' frame limit): one that
        // replaces most of the topology carries more, and could pass the limit. (`Arc`'s `==`
        // compares the pointers first.)
        if topology_changed && prev.circuits == inner.circuits {
            let changes = proto::TopologyDelta::between(&prev.topology, &inner.current.topology);
            if changes.apply(&prev.topology) == *inner.current.topology {
                let frame = proto::encode(&ToRouter::Delta {
                    version,
                    base_version: prev.version,
                    topology_version: inner.current.record.version,
                    changes,
                    live: p.live.clone(),
                })?;
                if frame.len() < p.full.len() {
                    p.delta = Some((prev.version, frame));
                }
            }
        }
        self.published.send_replace(Arc::new(p));
        Ok(())
    }

    fn snapshot_limit(&self) -> usize {
        self.snapshot_limit.load(Relaxed)
    }

    /// Tests: the payload bytes of the snapshot published as a change's size check counts them:
    /// its version at the longest, its live state at the largest ([`fits`]).
    #[cfg(test)]
    pub(crate) fn checked_len(&self) -> usize {
        let p = self.published();
        let current = self.current();
        full_frame(
            u64::MAX,
            current.record.version,
            &current.topology,
            &p.circuits,
            largest_live(&current.topology),
            usize::MAX,
        )
        .unwrap()
        .len()
            - 4
    }

    /// Tests: publish no snapshot over `bytes` (instead of [`proto::MAX_TO_ROUTER`]).
    #[cfg(test)]
    pub(crate) fn set_snapshot_limit(&self, bytes: usize) {
        self.snapshot_limit.store(bytes, Relaxed);
    }

    /// Whether a snapshot carrying `circuits` instead of those in force, with the topology in
    /// force and the largest live state it can have, is within the limit a router takes: a circuit
    /// operation checks its change before it commits it, so that what it commits can be sent
    /// ([`ControllerError::TooLarge`] when not). A full encode, as a publication does: run it
    /// off the runtime's workers.
    pub fn check_circuits_fit(
        &self,
        circuits: &Arc<Vec<ProvisionedCircuit>>,
    ) -> Result<(), ControllerError> {
        let current = lock(&self.inner).current.clone();
        let max = self.snapshot_limit();
        fits(current.record.version, &current.topology, circuits, max)
    }

    /// Replaces the provisioned circuits and distributes them at once (a full snapshot).
    /// Returns the version that carries them: a router has them once it acknowledged it.
    pub fn publish_circuits(
        &self,
        circuits: Arc<Vec<ProvisionedCircuit>>,
    ) -> Result<u64, ControllerError> {
        let mut inner = lock(&self.inner);
        let before = std::mem::replace(&mut inner.circuits, circuits);
        let published_before = std::mem::replace(&mut inner.circuits_published, true);
        if let Err(e) = self.publish_locked(&mut inner, true) {
            // Not published: the snapshots to come carry the circuits routers have.
            inner.circuits = before;
            inner.circuits_published = published_before;
            return Err(e);
        }
        Ok(self.published.borrow().version)
    }

    /// Merges a router's telemetry; schedules a throttled recomputation when it matters.
    pub fn on_telemetry(&self, sample: Sample) {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        let change = inner.live.observe(sample, now);
        let Some(backoff) = inner.backoff_of(change) else {
            return;
        };
        backoff.event(now);
        drop(inner);
        self.recompute.notify_one();
    }

    /// Runs recomputations when the back-offs say so, and ages out stale telemetry
    /// ([`EXPIRY_TICK`]). Spawned once.
    pub async fn recompute_loop(self: Arc<Self>) {
        // Observations ageing out change the live state without a report: looked at every
        // second, whatever is due (on a busy fabric the gradual back-off is nearly always due,
        // and an urgent change ageing out, a down link's reports expiring, waited behind it).
        let mut next_tick = Instant::now() + EXPIRY_TICK;
        loop {
            let due = lock(&self.inner).due();
            let wake = due.map_or(next_tick, |d| d.min(next_tick));
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = self.recompute.notified() => continue,
            }
            let mut inner = lock(&self.inner);
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + EXPIRY_TICK;
                // Scheduled on the back-off of its kind, unless that one is due already (a
                // change it will publish then: marking it again each second would hold the
                // back-off in its long wait).
                let change = inner.live.pending_change(now);
                if let Some(backoff) = inner.backoff_of(change)
                    && backoff.due().is_none()
                {
                    backoff.event(now);
                }
            }
            if due.is_some_and(|d| now >= d) {
                // One publication carries every change observed so far, of either kind.
                inner.backoff.ran(now);
                inner.urgent.ran(now);
                inner.links.ran(now);
                if inner.live.expired(now)
                    && let Err(e) = self.publish_locked(&mut inner, false)
                {
                    tracing::error!("publishing live state: {e}");
                }
            }
        }
    }

    pub fn rtt_matrix(&self) -> Vec<live::RttEntry> {
        let inner = lock(&self.inner);
        inner.live.rtt_matrix(Instant::now())
    }

    /// The sites edges report in use per service (fresh reports only).
    pub fn incumbents(&self) -> topology::diff::Incumbents {
        lock(&self.inner).live.incumbents(Instant::now())
    }

    pub fn live_state(&self) -> LiveState {
        lock(&self.inner).live.published().clone()
    }

    // ---- routers ----

    pub fn routers(&self) -> Vec<RouterLive> {
        let mut v: Vec<_> = self.routers.iter().map(|r| r.value().clone()).collect();
        v.sort_by(|a, b| a.record.node.cmp(&b.record.node));
        v
    }

    /// A control session of `node` passed its hello checks: it is the node's current session
    /// from now on, and the node is connected. Returns it, and the number of the session it
    /// supersedes, if the node had one (that session is told to end: [`RouterSession::ended`]).
    /// A topology change that removed the node since its hello was checked ends it at once
    /// ([`SessionEnd::Removed`]).
    pub fn router_session_start(&self, node: &str) -> (RouterSession, Option<u64>) {
        let id = self.last_session.fetch_add(1, Relaxed) + 1;
        let end = Arc::new(Ending::default());
        let older = {
            let mut e = self
                .routers
                .entry(node.to_string())
                .or_insert_with(|| RouterLive::unrecorded(node, true));
            let older = e.session.replace(CurrentSession {
                id,
                end: end.clone(),
            });
            if let Some(older) = &older {
                older.end.end(SessionEnd::Superseded);
            }
            e.connected = true;
            e.last_seen = Instant::now();
            e.record.last_seen_unix_ms = records::now_unix_ms();
            older
        };
        // After the session is in place (and its entry lock let go: an apply takes the
        // topology's lock, then the routers'): an apply that removed the node either saw the
        // session and ended it, or committed its topology before this check.
        let cur = lock(&self.inner).current.clone();
        if cur.topology.node(node).is_none() {
            end.end(SessionEnd::Removed {
                topology_version: cur.record.version,
            });
        }
        let session = RouterSession {
            node: node.to_string(),
            id,
            end,
        };
        (session, older.map(|o| o.id))
    }

    /// `session` ended. When it is its node's current one, the node is disconnected (and no
    /// longer draining), and forgotten if the topology in force no longer has it; the end of a
    /// superseded session changes nothing. Returns whether it was the current one.
    pub fn router_session_end(&self, session: &RouterSession) -> bool {
        let mut rec = None;
        let current = self.current_router(session, |e| {
            e.session = None;
            e.connected = false;
            e.draining = false;
            e.last_seen = Instant::now();
            e.record.last_seen_unix_ms = records::now_unix_ms();
            rec = Some(e.record.clone());
        });
        if current && !self.is_node(&session.node) {
            self.routers
                .remove_if(&session.node, |_, e| e.session.is_none());
            // Unless a newer session of the node (added again meanwhile) kept its entry.
            self.session_budgets
                .remove_if(&session.node, |node, _| !self.routers.contains_key(node));
        } else if let Some(rec) = rec {
            // When it was last seen, for a restart to show (its record was stored only at its
            // answers to snapshots: after a restart, a router gone since showed as last seen
            // at its last answer, hours or days before).
            lock(&self.dirty_routers).insert(session.node.clone(), rec);
        }
        current
    }

    /// Queues the records of the routers connected now, for the store to hold when each was
    /// last seen (a shutdown's last flush: see [`Self::router_session_end`]).
    pub fn note_connected_routers(&self) {
        let connected: Vec<(String, RouterRecord)> = self
            .routers
            .iter()
            .filter(|e| e.connected)
            .map(|e| (e.key().clone(), e.record.clone()))
            .collect();
        let mut dirty = lock(&self.dirty_routers);
        for (node, rec) in connected {
            // A record an answer queued meanwhile is as new or newer.
            dirty.entry(node).or_insert(rec);
        }
    }

    /// Ends the control sessions of the routers `topology` does not have (it is in force from
    /// `topology_version` on) and forgets those that have none: a removed node gets no further
    /// version (which carries the whole topology, backends and circuits), no certificate, and
    /// no line in the controller's records. Called with the topology's lock held, before the
    /// version without the node is published.
    fn end_removed(&self, topology: &live::Index, topology_version: u64) {
        self.routers.retain(|node, e| {
            if topology.has_node(node) {
                return true;
            }
            match &e.session {
                Some(s) => {
                    s.end.end(SessionEnd::Removed { topology_version });
                    // Forgotten at its session's end (`router_session_end`).
                    true
                }
                None => false,
            }
        });
        // Its budgets go with it, unless its session still runs (then at that session's end).
        self.session_budgets
            .retain(|node, _| topology.has_node(node) || self.routers.contains_key(node));
    }

    /// Whether `session` is its node's current one (what it reports counts).
    pub fn router_session_current(&self, session: &RouterSession) -> bool {
        self.routers
            .get(&session.node)
            .is_some_and(|e| e.in_session(session))
    }

    /// `f` on the router's live state, only while `session` is its current one (the check and
    /// the change under the same entry lock: a newer session cannot start in between).
    fn current_router(&self, session: &RouterSession, f: impl FnOnce(&mut RouterLive)) -> bool {
        match self.routers.get_mut(&session.node) {
            Some(mut e) if e.in_session(session) => {
                f(&mut e);
                true
            }
            _ => false,
        }
    }

    /// The router's telemetry on `session` says whether it is draining.
    pub fn router_draining(&self, session: &RouterSession, draining: bool) {
        self.current_router(session, |e| {
            if e.draining != draining && draining {
                tracing::info!(node = session.node, "router draining (stopping)");
            }
            e.draining = draining;
        });
    }

    /// A telemetry report of this router, naming it, was merged on `session`: its telemetry's
    /// age counts from here.
    pub fn router_seen(&self, session: &RouterSession) {
        self.current_router(session, |e| {
            let now = Instant::now();
            e.last_telemetry = Some(now);
            e.last_seen = now;
            e.record.last_seen_unix_ms = records::now_unix_ms();
        });
    }

    /// `n` neighbour samples of this router's telemetry on `session` were refused (see
    /// [`distribute::sample_of`]).
    pub fn router_samples_refused(&self, session: &RouterSession, n: usize) {
        self.current_router(session, |e| e.samples_refused += n as u64);
    }

    /// `n` telemetry reports of this router on `session` were dropped (over its budget, or
    /// past what a session reads ahead: see [`distribute`]).
    pub fn router_reports_dropped(&self, session: &RouterSession, n: u64) {
        if n > 0 {
            self.current_router(session, |e| e.reports_dropped += n);
        }
    }

    /// A telemetry report on `session` named another node than the session's and was dropped.
    pub fn router_report_misnamed(&self, session: &RouterSession) {
        self.current_router(session, |e| e.reports_misnamed += 1);
    }

    /// A router acknowledged `version` (of `topology_version`) on `session`. Not taken from a
    /// superseded session: its answer would overwrite what the current one recorded (an older
    /// version, which circuits waiting for the router then wait for again). Returns whether it
    /// was taken.
    pub fn router_ack(&self, session: &RouterSession, version: u64, topology_version: u64) -> bool {
        self.update_router(session, |r| {
            r.applied_version = version;
            r.applied_topology = topology_version;
        })
    }

    /// A router rejected `version` (of `topology_version`) on `session`; not taken from a
    /// superseded session (the version would never be sent to the current one). Returns whether
    /// it was taken.
    pub fn router_nack(
        &self,
        session: &RouterSession,
        version: u64,
        topology_version: u64,
        reason: &str,
    ) -> bool {
        let taken = self.update_router(session, |r| {
            r.last_nack = Some(Nack {
                version,
                topology_version,
                reason: reason.to_string(),
                time_unix_ms: records::now_unix_ms(),
            })
        });
        if taken {
            tracing::warn!(
                node = session.node,
                version,
                "router rejected snapshot: {reason}"
            );
        }
        taken
    }

    /// `f` on the router's record, while `session` is its current one, queued for the store.
    fn update_router(&self, session: &RouterSession, f: impl FnOnce(&mut RouterRecord)) -> bool {
        let mut rec = None;
        self.current_router(session, |e| {
            f(&mut e.record);
            e.last_seen = Instant::now();
            e.record.last_seen_unix_ms = records::now_unix_ms();
            rec = Some(e.record.clone());
        });
        let Some(rec) = rec else { return false };
        lock(&self.dirty_routers).insert(session.node.clone(), rec);
        true
    }

    /// Writes routers' applied versions to the store in batches (one transaction for many
    /// acknowledgements, so 1,000 routers acknowledging cost one fsync, not 1,000). Spawned once.
    pub async fn flush_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Err(e) = self.flush_routers().await {
                tracing::error!("recording routers' versions: {e}");
            }
        }
    }

    /// Writes the routers' records changed since the last flush. When the transaction fails the
    /// batch is queued again (the next flush retries it), except for routers whose record
    /// changed meanwhile: the newer record is the one to keep. One flush at a time, its batch
    /// taken once it is its turn, on the blocking thread that writes it: an older batch never
    /// commits after a newer one (the periodic flush cut off at shutdown goes on writing, and
    /// the shutdown's own flush waits for it).
    pub async fn flush_routers(self: &Arc<Self>) -> Result<(), ControllerError> {
        let ctl = self.clone();
        tokio::task::spawn_blocking(move || {
            let _serial = lock(&ctl.flushing);
            let batch = std::mem::take(&mut *lock(&ctl.dirty_routers));
            if batch.is_empty() {
                return Ok(());
            }
            let res = store::transaction(&*ctl.store, |tx| -> Result<(), StoreError> {
                for (node, rec) in &batch {
                    records::ROUTERS.put(tx, node, rec)?;
                }
                Ok(())
            });
            if res.is_err() {
                let mut dirty = lock(&ctl.dirty_routers);
                for (node, rec) in batch {
                    dirty.entry(node).or_insert(rec);
                }
            }
            Ok(res?)
        })
        .await?
    }

    pub fn is_node(&self, node: &str) -> bool {
        lock(&self.inner).live.index().has_node(node)
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        lock(&self.inner)
            .current
            .topology
            .nodes
            .iter()
            .map(|n| n.id.clone())
            .collect()
    }
}

fn diags(d: &[Diagnostic]) -> Vec<crate::admin::Diag> {
    d.iter().map(crate::admin::Diag::from).collect()
}

/// Whether the full snapshot of `topology` (at `topology_version`) and `circuits` would be
/// within `max` bytes ([`ControllerError::TooLarge`] when not), checked before a change is
/// committed. Its snapshot version is counted at its longest (`u64::MAX`), so that the check
/// never passes a snapshot its real version makes too large (a real one is `epoch << 32 | seq`,
/// 13 digits and more), and its live state at its largest ([`largest_live`]): checked with the
/// live state of the moment, a change that left the snapshot a few bytes under the limit on a
/// quiet fabric stopped every publication once a link went down or a site filled up (each
/// adds an entry), live updates included, exactly while the fabric degraded.
fn fits(
    topology_version: u64,
    topology: &Arc<Topology>,
    circuits: &Arc<Vec<ProvisionedCircuit>>,
    max: usize,
) -> Result<(), ControllerError> {
    let live = largest_live(topology);
    full_frame(u64::MAX, topology_version, topology, circuits, live, max).map(drop)
}

/// The largest live state `topology` can have: every node and link down, every link measured
/// at the longest latency text, every site and service loaded with the longest figures. What a
/// merged live state holds is within it (its entries are the topology's nodes, links, sites
/// and services).
fn largest_live(topology: &Topology) -> LiveState {
    use topology::route::SiteLoad;
    let load = SiteLoad {
        active_streams: u32::MAX,
        capacity: u32::MAX,
        healthy: false,
    };
    // Not a multiple of 1,000 ns: printed whole, in 20 digits ("...ns"), the longest form.
    let latency = topology::Latency::from_nanos(u64::MAX);
    let mut live = LiveState::default();
    for n in &topology.nodes {
        live.down_nodes.insert(n.id.clone());
        if !n.serves.is_empty() {
            live.site_load.insert(n.id.clone(), load);
            live.service_load.insert(
                n.id.clone(),
                n.serves.iter().map(|s| (s.service.clone(), load)).collect(),
            );
        }
    }
    for l in &topology.links {
        live.down_links.insert(l.id());
        live.link_latency.insert(l.id(), latency);
    }
    live
}

/// The full snapshot's frame, refused when its payload is over `max` bytes.
fn full_frame(
    version: u64,
    topology_version: u64,
    topology: &Arc<Topology>,
    circuits: &Arc<Vec<ProvisionedCircuit>>,
    live: LiveState,
    max: usize,
) -> Result<Bytes, ControllerError> {
    let full = proto::encode(&ToRouter::Snapshot {
        version,
        topology_version,
        topology: topology.clone(),
        live,
        circuits: circuits.clone(),
    })?;
    // The frame's payload, after its 4-byte length, is what a router's limit bounds.
    let bytes = full.len().saturating_sub(4);
    if bytes > max {
        return Err(ControllerError::TooLarge { bytes, max });
    }
    Ok(full)
}

/// A digest of a circuit list (SipHash with this process's fixed keys): equal lists, equal
/// digests, whichever allocation holds them.
pub fn circuits_digest(circuits: &[ProvisionedCircuit]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    circuits.hash(&mut h);
    h.finish()
}

/// `circuits_digest`: [`circuits_digest`] of `circuits`.
fn encode(
    version: u64,
    cur: &Current,
    circuits: &Arc<Vec<ProvisionedCircuit>>,
    circuits_digest: u64,
    live: LiveState,
    base: Option<u64>,
    max: usize,
) -> Result<Published, ControllerError> {
    let topology_version = cur.record.version;
    let full = full_frame(
        version,
        topology_version,
        &cur.topology,
        circuits,
        live.clone(),
        max,
    )?;
    let delta = match base {
        Some(base_version) => Some((
            base_version,
            proto::encode(&ToRouter::Live {
                version,
                base_version,
                topology_version,
                live: live.clone(),
            })?,
        )),
        None => None,
    };
    Ok(Published {
        version,
        topology_version,
        topology: cur.topology.clone(),
        live,
        circuits_digest,
        circuits: circuits.clone(),
        full,
        delta,
        at: Instant::now(),
        with_circuits: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb::RedbStore;
    use topology::{Latency, ServiceName};

    /// e reaches s1 (near) or s2 (far) through transit t.
    pub(super) fn yaml(far: &str) -> String {
        let node = |id: &str, kind: &str, n: u8, extra: &str| {
            format!(
                "  - {{id: {id}, kind: {kind}, region: r, country: AU, location: {{lat: 0, lon: 0}}, \
                 address: \"127.0.0.{n}:7000\"{extra}}}\n"
            )
        };
        let serves = |port: u16| {
            format!(", serves: [{{service: chat, backend: \"127.0.0.9:{port}\", capacity: 10}}]")
        };
        format!(
            "version: 1\nnodes:\n{}{}{}{}links:\n  - {{a: e, b: t, latency: 1ms, capacity: 1Gbps}}\n  \
             - {{a: t, b: s1, latency: 1ms, capacity: 1Gbps}}\n  - {{a: t, b: s2, latency: {far}, capacity: 1Gbps}}\n\
             services:\n  - {{name: chat, port: 8080}}\n",
            node("e", "edge", 1, ", client_address: \"127.0.0.1\""),
            node("t", "transit", 2, ""),
            node("s1", "site", 3, &serves(9001)),
            node("s2", "site", 4, &serves(9002)),
        )
    }

    /// The plan an apply answers tells the live state it published: a link reported down while
    /// the version was committed is in the plan's new side as it is in what routers were sent.
    /// (The plan used the live state merged before the commit: the edge shown staying on a site
    /// the published version had it leave.)
    #[tokio::test]
    async fn the_plan_tells_the_live_state_the_apply_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("10ms"), "t.yaml"))).unwrap();
        let c = ctl.clone();
        *lock(&ctl.before_commit) = Some(Box::new(move || {
            c.on_telemetry(Sample::one_link("t", "s1", None, false));
        }));
        let out = ctl
            .apply(&yaml("8ms"), "me", "", Origin::Apply, false, None)
            .await
            .unwrap();
        assert!(out.not_distributed.is_none(), "{out:?}");
        assert!(
            !ctl.published().live.down_links.is_empty(),
            "the version went out with t--s1 down"
        );
        let e = out
            .plan
            .impact
            .iter()
            .find(|i| i.edge.as_str() == "e" && i.service.as_str() == "chat")
            .unwrap_or_else(|| panic!("no entry for e/chat: {}", out.plan.text));
        assert_eq!(
            e.new.as_ref().map(|n| n.site.as_str()),
            Some("s2"),
            "{}",
            out.plan.text
        );
        // Both sides from that instant: the link is down on the old side too, so a text that
        // changes nothing but a comment, applied as a link goes down, plans no change (with the
        // new side alone from the publication, it showed e moving, the apply's doing).
        let c = ctl.clone();
        *lock(&ctl.before_commit) = Some(Box::new(move || {
            c.on_telemetry(Sample::one_link("t", "s2", None, false));
        }));
        let out = ctl
            .apply(
                &format!("# a comment\n{}", yaml("8ms")),
                "me",
                "",
                Origin::Apply,
                false,
                None,
            )
            .await
            .unwrap();
        assert!(out.plan.impact.is_empty(), "{}", out.plan.text);
    }

    /// A circuit whose path names a node id of `id_len` bytes (only its size matters here).
    fn bulky_circuit(id_len: usize) -> ProvisionedCircuit {
        ProvisionedCircuit {
            id: topology::circuit::CircuitId::new("c-000001"),
            edge: NodeId::new("e"),
            prefix: "10.0.0.0/24".parse().unwrap(),
            service: ServiceName::new("chat"),
            vip: None,
            port: None,
            rate: topology::Bandwidth::from_mbps(10),
            path: vec![NodeId::new("x".repeat(id_len))],
        }
    }

    /// A version whose snapshot is over the routers' frame limit is never published (routers
    /// would refuse it, reconnect, and be sent it again, for ever): circuits that would make it
    /// so are refused and the circuits in force stay; a topology that would is refused before
    /// it is committed (dry runs too), and nothing changes.
    #[tokio::test]
    async fn a_snapshot_over_the_routers_frame_limit_is_never_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("5ms"), "t.yaml"))).unwrap();
        let max = proto::MAX_TO_ROUTER;
        let first = ctl.published().version;
        match ctl.publish_circuits(Arc::new(vec![bulky_circuit(max)])) {
            Err(ControllerError::TooLarge { bytes, max: m }) => assert!(bytes > max && m == max),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(ctl.published().version, first, "nothing published");
        // Circuits that fit: the snapshot 20 bytes under the limit.
        let base = ctl
            .publish_circuits(Arc::new(vec![bulky_circuit(0)]))
            .map(|_| ctl.published().full.len() - 4)
            .unwrap();
        let v = ctl
            .publish_circuits(Arc::new(vec![bulky_circuit(max - 20 - base)]))
            .unwrap();
        assert_eq!(ctl.published().full.len() - 4, max - 20);
        // A topology some 50 bytes larger (its nodes' latitudes) does not fit with them.
        let bigger = yaml("5ms").replace("lat: 0,", "lat: -33.86881971234,");
        for dry_run in [true, false] {
            match ctl
                .apply(&bigger, "me", "", Origin::Apply, dry_run, None)
                .await
            {
                Err(ControllerError::TooLarge { bytes, .. }) => assert!(bytes > max),
                other => panic!("dry run {dry_run}: expected TooLarge, got {other:?}"),
            }
        }
        assert_eq!(ctl.published().version, v);
        assert_eq!(ctl.current().record.version, 1, "nothing committed");
        assert_eq!(ctl.history(10).unwrap().len(), 1);
    }

    /// A circuit change is checked with room for the live state at its largest: circuits that
    /// left the snapshot 20 bytes under the limit on a quiet fabric are refused, and those
    /// accepted at the limit as checked are still published once the fabric degrades (a link
    /// down adds live entries). (Checked with the live state of the moment, they were taken,
    /// and every publication after a link went down, live updates included, was refused.)
    #[tokio::test]
    async fn circuits_are_checked_with_room_for_the_largest_live_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("5ms"), "t.yaml"))).unwrap();
        let max = proto::MAX_TO_ROUTER;
        let (base, checked) = ctl
            .publish_circuits(Arc::new(vec![bulky_circuit(0)]))
            .map(|_| (ctl.published().full.len() - 4, checked_len(&ctl)))
            .unwrap();
        assert!(checked > base + 100, "{checked} {base}");
        let tight = Arc::new(vec![bulky_circuit(max - 20 - base)]);
        match ctl.check_circuits_fit(&tight) {
            Err(ControllerError::TooLarge { .. }) => {}
            other => panic!("no room left for the live state: {other:?}"),
        }
        let fits = Arc::new(vec![bulky_circuit(max - checked)]);
        ctl.check_circuits_fit(&fits)
            .expect("at the limit as checked");
        ctl.publish_circuits(fits).unwrap();
        // The fabric degrades: each down link and node is published.
        ctl.on_telemetry(Sample::one_link("t", "s1", None, false));
        ctl.on_telemetry(Sample::one_link("t", "s2", None, false));
        ctl.publish_locked(&mut lock(&ctl.inner), false)
            .expect("published with its live state");
        assert_eq!(ctl.published().live.down_links.len(), 2);
    }

    /// What `f` returns, and what it logged.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        let log = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let said = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
        (out, said)
    }

    /// The `--topology` file a first start imports has its warnings logged, naming the file,
    /// line and column, as `tasman topology validate` and an apply give them. (They were
    /// dropped: the file was served and no start ever named them.)
    #[test]
    fn an_imported_files_warnings_are_logged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        // A link between two sites: no path can use it.
        let text = yaml("5ms").replace(
            "services:",
            "  - {a: s1, b: s2, latency: 1ms, capacity: 1Gbps}\nservices:",
        );
        let (ctl, said) = logged(|| Controller::open(store, Some((&text, "t.yaml"))));
        let ctl = ctl.expect("imported");
        assert!(!ctl.current().warnings.is_empty());
        let line = text
            .lines()
            .position(|l| l.contains("a: s1, b: s2"))
            .unwrap()
            + 1;
        assert!(
            said.contains(&format!("t.yaml:{line}:")) && said.contains("warning"),
            "{said}"
        );
    }

    /// A topology change goes out as a delta only when the delta is smaller than the full
    /// snapshot: one that replaces most of the topology (every node renamed) carries more than
    /// the snapshot (the new elements and every removed id), and one near the frame limit would
    /// pass it while the snapshot fits, so every router would close its session as a protocol
    /// error and reconnect at once. (The delta was published whatever its size; and the first
    /// apply after a start sent no delta at all, the circuits of the first version being
    /// another empty list.)
    #[tokio::test]
    async fn a_topology_delta_goes_out_only_when_smaller_than_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("5ms"), "t.yaml"))).unwrap();
        ctl.apply(&yaml("50ms"), "me", "", Origin::Apply, false, None)
            .await
            .unwrap();
        let p = ctl.published();
        let (_, small) = p.delta.clone().expect("one link's latency: a delta");
        assert!(small.len() < p.full.len());
        let mut renamed = yaml("50ms");
        for (from, to) in [("e", "e9"), ("t", "t9"), ("s1", "s8"), ("s2", "s9")] {
            for field in ["id", "a", "b"] {
                renamed = renamed.replace(&format!("{field}: {from},"), &format!("{field}: {to},"));
            }
        }
        assert!(!renamed.contains("id: e,"), "{renamed}");
        ctl.apply(&renamed, "me", "", Origin::Apply, false, None)
            .await
            .unwrap();
        let p = ctl.published();
        assert_eq!(p.topology_version, 3);
        let full = p.full.len();
        if let Some((_, d)) = &p.delta {
            panic!(
                "a delta of {} bytes went out for a snapshot of {full}",
                d.len()
            );
        }
    }

    /// A change's plan, computed after its commit, or a dry run's, holds no other change up:
    /// an apply (or rollback) goes ahead while another's plan is still being computed. (The
    /// apply lock was held through the plan: seconds on a large fabric, per dry run queued.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plan_being_computed_holds_no_other_change_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("5ms"), "t.yaml"))).unwrap();
        for dry_run in [true, false] {
            let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
            let (release, released) = std::sync::mpsc::channel::<()>();
            *lock(&ctl.plan_gate) = Some(Box::new(move || {
                let _ = entered_tx.send(());
                let _ = released.recv();
            }));
            let c = ctl.clone();
            let first = tokio::spawn(async move {
                c.apply(&yaml("50ms"), "me", "", Origin::Apply, dry_run, None)
                    .await
            });
            tokio::task::spawn_blocking(move || entered.recv())
                .await
                .unwrap()
                .expect("the first apply's plan never started");
            let other = if dry_run { "7ms" } else { "9ms" };
            let second = tokio::time::timeout(
                Duration::from_secs(10),
                ctl.apply(&yaml(other), "me", "", Origin::Apply, false, None),
            )
            .await;
            release.send(()).unwrap();
            let second = second
                .unwrap_or_else(|_| panic!("dry run {dry_run}: the apply waited for a plan"))
                .unwrap();
            assert!(second.version.is_some());
            first.await.unwrap().unwrap();
        }
    }

    /// An apply whose plan fails after its commit (a bug: the plan panics) answers the version
    /// it applied, with the failure in the plan's text: the change is in force. (It answered
    /// 500, a refusal of a change that had been made.)
    #[tokio::test]
    async fn an_apply_whose_plan_fails_after_the_commit_answers_the_version_applied() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("5ms"), "t.yaml"))).unwrap();
        *lock(&ctl.plan_gate) = Some(Box::new(|| panic!("injected failure of the plan")));
        let out = ctl
            .apply(&yaml("50ms"), "me", "", Origin::Apply, false, None)
            .await
            .expect("applied: not an error");
        assert_eq!(out.version, Some(2));
        assert!(
            out.plan.text.starts_with("no plan: computing it failed"),
            "{}",
            out.plan.text
        );
        assert!(!out.plan.text.contains("injected"), "{}", out.plan.text);
        assert_eq!(ctl.current().record.version, 2);
        assert_eq!(ctl.published().topology_version, 2);
    }

    fn checked_len(ctl: &Controller) -> usize {
        ctl.checked_len()
    }

    /// Circuits published between an apply's size check and its commit can make the committed
    /// version's snapshot too large to publish: the apply says it applied that version (it is
    /// in force, history shows it) and that it was not distributed, and why. (It answered the
    /// publication's error, a refusal of a change that had been made.)
    #[tokio::test]
    async fn a_committed_version_that_cannot_be_published_is_told_applied_and_not_distributed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("5ms"), "t.yaml"))).unwrap();
        let max = proto::MAX_TO_ROUTER;
        // The snapshot's size, and the size its checks count (the live state at its largest).
        let (base, checked) = ctl
            .publish_circuits(Arc::new(vec![bulky_circuit(0)]))
            .map(|_| (ctl.published().full.len() - 4, checked_len(&ctl)))
            .unwrap();
        // 200 bytes under the limit as checked: a topology some 50 bytes larger fits...
        ctl.publish_circuits(Arc::new(vec![bulky_circuit(max - 200 - checked)]))
            .unwrap();
        let bigger = yaml("5ms").replace("lat: 0,", "lat: -33.86881971234,");
        ctl.apply(&bigger, "me", "", Origin::Apply, true, None)
            .await
            .expect("the larger topology fits with these circuits");
        // ... until circuits exactly at the limit are published just before the commit.
        let c = ctl.clone();
        *lock(&ctl.before_commit) = Some(Box::new(move || {
            c.publish_circuits(Arc::new(vec![bulky_circuit(max - base)]))
                .expect("at the limit, with the topology in force");
        }));
        let carried = ctl.published().version;
        let out = ctl
            .apply(&bigger, "me", "", Origin::Apply, false, None)
            .await
            .expect("committed: not an error");
        assert_eq!(out.version, Some(2));
        let why = out.not_distributed.expect("told not distributed");
        assert!(why.contains("over the"), "{why}");
        assert_eq!(ctl.current().record.version, 2, "in force");
        assert_eq!(ctl.history(10).unwrap().len(), 2);
        let p = ctl.published();
        assert!(p.version > carried, "the circuits went out");
        assert_eq!(p.topology_version, 1, "routers keep the version before");
        // Not the change asked for: counted with the failed ones.
        let n = ctl.applies.get();
        assert_eq!((n.accepted, n.rejected), (0, 1));
        // The same apply again (its answer lost, say): nothing to commit, and it still says the
        // version in force was not distributed. (It said "unchanged", exit 0: as if in force.)
        let again = ctl
            .apply(&bigger, "me", "", Origin::Apply, false, None)
            .await
            .unwrap();
        assert!(again.unchanged && again.version.is_none());
        let why = again.not_distributed.expect("told not distributed again");
        assert!(why.contains("over the"), "{why}");
        assert_eq!(ctl.published().topology_version, 1);
        // Once the circuits shrink, their publication carries the version in force, and a retry
        // says nothing is missing.
        ctl.publish_circuits(Arc::new(vec![bulky_circuit(0)]))
            .unwrap();
        assert_eq!(ctl.published().topology_version, 2);
        let third = ctl
            .apply(&bigger, "me", "", Origin::Apply, false, None)
            .await
            .unwrap();
        assert!(third.unchanged && third.not_distributed.is_none());
        assert_eq!(ctl.published().topology_version, 2);
    }

    /// A circuit committed while an apply is between its size check and its commit is carried
    /// by the new version's snapshot: the apply checks again inside its transaction, with the
    /// circuits the store holds, and is refused. (It committed a version that the circuits then
    /// made too large to send: a controller restarted on that store could not publish its
    /// circuits, and refused to start.)
    #[tokio::test]
    async fn an_apply_checks_again_with_the_circuits_committed_before_it() {
        use crate::circuits::tests::{spec, yaml};
        let pool = "127.79.0.0/28";
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store.clone(), Some((&yaml(pool, true), "t.yaml"))).unwrap();
        let topo = ctl.current().topology.clone();
        let create = |store: &RedbStore, topo: &Topology, name: &str, prefix: &str| {
            store::transaction(store, |tx| {
                crate::circuits::create(tx, topo, &spec(name, prefix, "1Mbps"), None, "ops")
            })
            .unwrap();
        };
        create(&store, &topo, "c1", "10.1.0.0/24");
        let stored = store::read(&*store, |tx| crate::circuits::all(tx)).unwrap();
        ctl.publish_circuits(Arc::new(crate::circuits::provisioned(&stored)))
            .unwrap();
        // Room for a few more bytes, not for another circuit.
        ctl.set_snapshot_limit(checked_len(&ctl) + 16);
        let edited = yaml(pool, true).replace("latency: 1ms", "latency: 2ms");
        ctl.apply(&edited, "me", "", Origin::Apply, true, None)
            .await
            .expect("the edit fits with c1");
        let s2 = store.clone();
        *lock(&ctl.before_commit) = Some(Box::new(move || {
            create(&s2, &topo, "c2", "10.2.0.0/24");
        }));
        let e = ctl
            .apply(&edited, "me", "", Origin::Apply, false, None)
            .await
            .expect_err("too large with c2");
        assert!(matches!(e, ControllerError::TooLarge { .. }), "{e}");
        assert_eq!(ctl.current().record.version, 1);
        assert_eq!(ctl.history(10).unwrap().len(), 1);
    }

    /// Two flushes at once (the periodic one cut off by shutdown goes on writing while the
    /// shutdown's own runs): the older batch never commits after the newer. (Each took its
    /// batch at once and wrote it on its own thread: a router's older record could overwrite
    /// its newer one.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_older_batch_of_routers_records_never_commits_after_a_newer() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::FaultyStore::open(dir.path());
        let ctl = Controller::open(store.clone(), Some((&yaml("5ms"), "t.yaml"))).unwrap();
        let (e, _) = ctl.router_session_start("e");
        ctl.router_ack(&e, 7, 1);
        // The first flush's write waits until told to go on.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (entered, started) = std::sync::mpsc::channel::<()>();
        *lock(&store.before_write) = Some(Box::new(move || {
            let _ = entered.send(());
            let _ = wait.recv();
        }));
        let first = tokio::spawn({
            let ctl = ctl.clone();
            async move { ctl.flush_routers().await }
        });
        tokio::task::spawn_blocking(move || started.recv())
            .await
            .unwrap()
            .unwrap();
        ctl.router_ack(&e, 8, 1);
        let second = tokio::spawn({
            let ctl = ctl.clone();
            async move { ctl.flush_routers().await }
        });
        // The second flush has had its chance to write first (nothing to wait for: with the
        // fix it waits, without it it wrote).
        tokio::time::sleep(Duration::from_millis(100)).await;
        go.send(()).unwrap();
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        let stored = store::read(&*ctl.store, |tx| records::ROUTERS.get(tx, "e")).unwrap();
        assert_eq!(stored.map(|r| r.applied_version), Some(8));
    }

    /// A batch of routers' records whose transaction failed is written by the next flush, and a
    /// record that changed while the failed transaction ran is not overwritten by the older one.
    #[tokio::test]
    async fn routers_records_of_a_failed_flush_are_written_by_the_next() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::FaultyStore::open(dir.path());
        let ctl = Controller::open(store.clone(), Some((&yaml("5ms"), "t.yaml"))).unwrap();
        let (e, _) = ctl.router_session_start("e");
        let (t, _) = ctl.router_session_start("t");
        ctl.router_ack(&e, 5, 1);
        ctl.router_ack(&t, 6, 1);
        let weak = Arc::downgrade(&ctl);
        *lock(&store.during_failure) = Some(Box::new(move || {
            if let Some(ctl) = weak.upgrade() {
                ctl.router_ack(&e, 7, 1);
            }
        }));
        store.fail.store(true, Ordering::SeqCst);
        assert!(ctl.flush_routers().await.is_err());
        store.fail.store(false, Ordering::SeqCst);
        ctl.flush_routers().await.unwrap();
        let stored = store::read(&*ctl.store, |tx| records::ROUTERS.all(tx)).unwrap();
        let applied: BTreeMap<String, u64> = stored
            .into_iter()
            .map(|(node, r)| (node, r.applied_version))
            .collect();
        assert_eq!(
            applied,
            BTreeMap::from([("e".to_string(), 7), ("t".to_string(), 6)])
        );
    }

    /// A store written by a build before the versions' metadata (versions and the current
    /// pointer only, written through the store API as that build did) lists its whole history
    /// once the controller opened it, with each text's size; opening it again writes nothing.
    #[tokio::test]
    async fn history_is_whole_after_opening_a_store_of_an_earlier_build() {
        let dir = tempfile::tempdir().unwrap();
        let texts: Vec<String> = ["5ms", "6ms", "7ms", "5ms"]
            .iter()
            .enumerate()
            .map(|(i, far)| yaml(far) + &"#\n".repeat(i * 100))
            .collect();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            store::transaction(&store, |tx| -> Result<(), StoreError> {
                for (i, text) in texts.iter().enumerate() {
                    let v = i as u64 + 1;
                    let rec = TopologyVersion {
                        version: v,
                        text: text.clone(),
                        author: "earlier".into(),
                        time_unix_ms: 1000 + v,
                        message: format!("v{v}"),
                        origin: Origin::Apply,
                    };
                    records::TOPOLOGY_VERSIONS.put(tx, &store::seq_key(v), &rec)?;
                    records::META.put(tx, "current_topology", &v)?;
                }
                Ok(())
            })
            .unwrap();
        }
        let expected: Vec<(u64, u64, String)> = texts
            .iter()
            .enumerate()
            .rev()
            .map(|(i, t)| (i as u64 + 1, t.len() as u64, records::text_sha256(t)))
            .collect();
        for _ in 0..2 {
            let store = Arc::new(RedbStore::open(dir.path()).unwrap());
            let ctl = Controller::open(store.clone(), None).unwrap();
            assert_eq!(ctl.current().record.version, 4);
            let listed: Vec<_> = ctl
                .history(100)
                .unwrap()
                .into_iter()
                .map(|m| (m.version, m.bytes, m.sha256))
                .collect();
            assert_eq!(listed, expected);
            assert_eq!(
                store::transaction(&*store, |tx| records::backfill_meta(tx)).unwrap(),
                0,
                "open wrote every missing record"
            );
        }
    }

    /// A node's newest session is its current one: the older one is told it was superseded,
    /// what it reports is not taken, and its end leaves the node connected (and draining); the
    /// node is disconnected when the current session ends.
    #[tokio::test]
    async fn only_the_newest_session_of_a_node_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("5ms"), "t.yaml"))).unwrap();
        let live = |ctl: &Controller| ctl.routers().into_iter().find(|r| r.record.node == "e");
        let (old, none) = ctl.router_session_start("e");
        assert_eq!(none, None);
        assert!(ctl.router_ack(&old, 5, 1));
        ctl.router_draining(&old, true);
        let (new, superseded) = ctl.router_session_start("e");
        assert_eq!(superseded, Some(old.id()));
        assert!(new.id() > old.id());
        let why = tokio::time::timeout(Duration::from_secs(5), old.ended())
            .await
            .expect("the older session is told");
        assert_eq!(why, SessionEnd::Superseded);
        // The older session's late answers and reports are not taken.
        assert!(!ctl.router_ack(&old, 4, 1));
        assert!(!ctl.router_nack(&old, 6, 1, "late"));
        ctl.router_draining(&old, false);
        ctl.router_reports_dropped(&old, 1);
        ctl.router_samples_refused(&old, 3);
        ctl.router_seen(&old);
        assert!(!ctl.router_session_current(&old) && ctl.router_session_current(&new));
        let r = live(&ctl).unwrap();
        assert_eq!(r.record.applied_version, 5);
        assert!(r.record.last_nack.is_none());
        assert!(r.connected && r.draining);
        assert_eq!((r.reports_dropped, r.samples_refused), (0, 0));
        assert!(r.last_telemetry.is_none());
        // Its end changes nothing; the current one's does.
        assert!(!ctl.router_session_end(&old));
        let r = live(&ctl).unwrap();
        assert!(r.connected && r.draining);
        assert!(ctl.router_ack(&new, 7, 1));
        assert!(ctl.router_session_end(&new));
        let r = live(&ctl).unwrap();
        assert_eq!(r.record.applied_version, 7);
        assert!(!r.connected && !r.draining);
        assert!(!ctl.router_ack(&new, 8, 1), "an ended session");
    }

    /// `yaml(far)` without the nodes `gone` and their links.
    pub(super) fn yaml_without(far: &str, gone: &[&str]) -> String {
        yaml(far)
            .lines()
            .filter(|l| {
                !gone.iter().any(|n| {
                    [format!("id: {n},"), format!("a: {n},"), format!("b: {n},")]
                        .iter()
                        .any(|p| l.contains(p.as_str()))
                })
            })
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// A topology change that removes a node ends its current session (the session is told
    /// before the version without the node is published) and forgets the router once that
    /// session ends, a disconnected one at once, also when the controller opens its store again;
    /// a session whose hello was checked before the change and that starts after it is ended at
    /// its start. (A removed router's session lived on, got every version and its certificate
    /// renewed; its record stayed.)
    #[tokio::test]
    async fn a_removed_nodes_session_is_ended_and_the_router_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("5ms"), "t.yaml"))).unwrap();
        let known = |ctl: &Controller, n: &str| ctl.routers().iter().any(|r| r.record.node == n);
        async fn told(s: &RouterSession) -> Result<SessionEnd, tokio::time::error::Elapsed> {
            tokio::time::timeout(Duration::from_secs(5), s.ended()).await
        }
        let (e, _) = ctl.router_session_start("e");
        let (s2, _) = ctl.router_session_start("s2");
        let (t, _) = ctl.router_session_start("t");
        assert!(ctl.router_ack(&e, 5, 1) && ctl.router_ack(&s2, 5, 1) && ctl.router_ack(&t, 5, 1));
        assert!(ctl.router_session_end(&s2));
        ctl.flush_routers().await.unwrap();
        assert!(
            known(&ctl, "s2"),
            "a disconnected router of the topology is kept"
        );

        let text = yaml_without("5ms", &["e", "s2"]);
        let out = ctl
            .apply(&text, "t", "remove e and s2", Origin::Apply, false, None)
            .await
            .unwrap();
        let v = out.version.expect("applied");
        assert_eq!(
            told(&e).await.expect("e's session is told"),
            SessionEnd::Removed {
                topology_version: v
            }
        );
        assert!(
            !known(&ctl, "s2"),
            "a disconnected removed router is forgotten"
        );
        assert!(known(&ctl, "e"), "e is known until its session ends");
        assert!(ctl.router_session_end(&e));
        assert!(!known(&ctl, "e"));
        let (late, _) = ctl.router_session_start("e");
        assert_eq!(
            told(&late)
                .await
                .expect("a session started after the apply"),
            SessionEnd::Removed {
                topology_version: v
            }
        );
        assert!(ctl.router_session_end(&late));
        assert!(
            tokio::time::timeout(Duration::from_millis(200), t.ended())
                .await
                .is_err(),
            "t is still in the topology"
        );
        assert!(known(&ctl, "t"));

        // The store keeps the removed routers' records; the controller opened again skips them.
        let store = ctl.store().clone();
        drop((ctl, e, late, t));
        let ctl = Controller::open(store, None).unwrap();
        assert!(!known(&ctl, "e") && !known(&ctl, "s2"));
        assert!(known(&ctl, "t"));
    }

    /// The router's decode path: one frame through its reader, then its message decoder.
    async fn decode_as_router(frame: &Bytes) -> Result<ToRouter, proto::ProtoError> {
        let payload = proto::FrameReader::new(proto::MAX_TO_ROUTER)
            .next(&mut &frame[..])
            .await?
            .expect("one frame");
        proto::decode(&payload)
    }

    /// The worst telemetry a router can send (RTTs up to `u64::MAX` µs, or a sample that skips
    /// the conversion's bound) never makes the controller publish a version that routers cannot
    /// decode: their decoder refuses latencies above `Latency::MAX`, and a version they cannot
    /// decode fails every router's control session, over and over.
    #[tokio::test]
    async fn the_worst_telemetry_publishes_only_what_routers_decode() {
        use router::telemetry::{NeighbourReport, TelemetryReport};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        // t--s2 declared at the largest latency there is.
        let ctl = Controller::open(store, Some((&yaml("60s"), "t.yaml"))).unwrap();
        let max_us = distribute::MAX_RTT.as_micros() as u64;
        let report = |node: &str, rtts: &[(&str, u64)]| TelemetryReport {
            node: NodeId::new(node),
            snapshot_version: 0,
            neighbours: rtts
                .iter()
                .map(|(n, rtt_us)| NeighbourReport {
                    id: NodeId::new(n),
                    rtt_us: *rtt_us,
                    up: true,
                    srtt_us: *rtt_us,
                    path_mtu: 1452,
                    lost_packets: 0,
                    dial_failures: 0,
                })
                .collect(),
            sites: Vec::new(),
            preferred: BTreeMap::new(),
            draining: false,
            hysteresis: None,
        };
        let (sample, refused) = distribute::sample_of(&report(
            "t",
            &[("e", max_us), ("s1", max_us + 1), ("s2", u64::MAX)],
        ));
        assert_eq!(refused, 2, "RTTs above MAX_RTT are no measurements");
        ctl.on_telemetry(sample);
        // A sample that did not come through the conversion: still capped.
        ctl.on_telemetry(Sample::one_link("s2", "t", Some(Duration::MAX), true));
        // Published as a live delta (as the recompute loop does), then in full.
        ctl.publish_locked(&mut lock(&ctl.inner), false).unwrap();
        let p = ctl.published();
        let link = |a: &str, b: &str| topology::LinkId::new(&NodeId::new(a), &NodeId::new(b));
        assert_eq!(
            p.live.link_latency.get(&link("e", "t")),
            Some(&Latency::MAX)
        );
        assert_eq!(p.live.link_latency.get(&link("t", "s1")), None, "refused");
        assert_eq!(
            p.live.link_latency.get(&link("t", "s2")),
            None,
            "capped at Latency::MAX, its declared latency"
        );
        let (_, delta) = p.delta.clone().expect("a live delta");
        match decode_as_router(&delta).await {
            Ok(ToRouter::Live { live, .. }) => assert_eq!(live, p.live),
            other => panic!("the router cannot read the live delta: {other:?}"),
        }
        ctl.publish_circuits(Arc::default()).unwrap();
        let p = ctl.published();
        match decode_as_router(&p.full).await {
            Ok(ToRouter::Snapshot { live, .. }) => assert_eq!(live, p.live),
            other => panic!("the router cannot read the snapshot: {other:?}"),
        }
    }

    /// An applied text (up to 16 MiB: seconds of CPU) is validated on a blocking thread, not
    /// within the apply's poll on a runtime worker, where every other task of that worker would
    /// wait for it: with the runtime's one blocking thread held, the first poll of an apply of
    /// an invalid text has not validated it, and once the thread is let go the text is refused.
    /// (The test polled with the blocking pool free, and a validation that finished on it
    /// before the poll looked at its result made the poll ready: it failed now and then.)
    #[test]
    fn an_applied_text_is_validated_off_the_runtime_workers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(RedbStore::open(dir.path()).unwrap());
            let ctl = Controller::open(store, Some((&yaml("10ms"), "t.yaml"))).unwrap();
            let invalid = yaml("10ms").replace("latency: 1ms", "latency: 1parsec");
            let (held, release) = std::sync::mpsc::channel::<()>();
            let (go, on_hold) = tokio::sync::oneshot::channel();
            let holder = tokio::task::spawn_blocking(move || {
                let _ = go.send(());
                let _ = release.recv();
            });
            on_hold.await.unwrap();
            let mut apply =
                std::pin::pin!(ctl.apply(&invalid, "test", "bad", Origin::Apply, true, None));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(
                apply.as_mut().poll(&mut cx).is_pending(),
                "the text was validated within the poll"
            );
            drop(held);
            holder.await.unwrap();
            assert!(
                matches!(apply.await, Err(ControllerError::Invalid(_))),
                "an invalid text is refused"
            );
        });
    }

    /// Gradual changes (a measured RTT) and urgent ones (a link down) wait behind back-offs of
    /// their own: loads and RTTs that keep moving hold theirs in its 5 s long wait, and a link
    /// going down is not held behind them (it waited as long).
    #[tokio::test]
    async fn a_link_down_is_not_held_behind_the_back_off_of_moving_rtts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("10ms"), "t.yaml"))).unwrap();
        let dues = || {
            let inner = lock(&ctl.inner);
            (inner.backoff.due(), inner.links.due())
        };
        // RTTs keep moving (no recompute loop runs here): only the gradual back-off is due.
        ctl.on_telemetry(Sample::one_link(
            "t",
            "s1",
            Some(Duration::from_millis(40)),
            true,
        ));
        let (gradual, urgent) = dues();
        assert!(
            gradual.is_some() && urgent.is_none(),
            "{gradual:?} {urgent:?}"
        );
        // Held in its long wait, as a busy fabric's loads keep it.
        {
            let mut inner = lock(&ctl.inner);
            let t = Instant::now();
            inner.backoff.ran(t);
            inner.backoff.event(t + Duration::from_millis(100));
            inner.backoff.ran(t + Duration::from_millis(300));
            let due = inner.backoff.event(t + Duration::from_millis(700));
            assert!(due >= t + Duration::from_secs(5), "not in its long wait");
        }
        // The link goes down: due on the urgent back-off's first delay, not the long wait.
        let before = Instant::now();
        ctl.on_telemetry(Sample::one_link("t", "s1", None, false));
        let (gradual, urgent) = dues();
        let urgent = urgent.expect("the link down is due on the urgent back-off");
        assert!(
            urgent <= before + Duration::from_secs(1),
            "{urgent:?} from {before:?}"
        );
        let gradual = gradual.unwrap();
        assert!(gradual > urgent);
        // The recompute loop publishes it on the urgent back-off's time, before the gradual
        // one's is due.
        let recompute = tokio::spawn(ctl.clone().recompute_loop());
        let down = || !ctl.published().live.down_links.is_empty();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !down() {
            assert!(
                Instant::now() < deadline,
                "the link down was never published"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            Instant::now() < gradual,
            "published only when the gradual back-off was due"
        );
        recompute.abort();
    }

    /// A site hovering at its capacity (full, then a stream short, at its reports: an
    /// overloaded service) keeps the sites' urgent back-off in its long wait; a link going down
    /// meanwhile is due on a back-off of its own, not 5 s on. (Both shared one: the link waited.)
    #[tokio::test]
    async fn a_link_down_is_not_held_behind_a_site_hovering_at_its_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("10ms"), "t.yaml"))).unwrap();
        // s1 serves chat with a capacity of 10 (`yaml`).
        let capacity = 10;
        let service = topology::ServiceName::new("chat");
        let site_report = |active: u32| {
            let load = topology::route::SiteLoad {
                active_streams: active,
                capacity,
                healthy: true,
            };
            let mut s = Sample::one_link("s1", "t", Some(Duration::from_millis(20)), true);
            s.site = Some(load);
            s.services = [(service.clone(), load)].into();
            s
        };
        let t = Instant::now();
        for (i, active) in [capacity, capacity - 1, capacity, capacity - 1]
            .into_iter()
            .enumerate()
        {
            ctl.on_telemetry(site_report(active));
            let mut inner = lock(&ctl.inner);
            ctl.publish_locked(&mut inner, false).unwrap();
            let at = t + Duration::from_millis([0, 100, 700, 800][i]);
            inner.urgent.ran(at);
            inner.backoff.ran(at);
            inner.links.ran(at);
            if i + 1 < 4 {
                inner.urgent.event(at + Duration::from_millis(50));
            }
        }
        {
            let mut inner = lock(&ctl.inner);
            let due = inner.urgent.event(t + Duration::from_millis(900));
            assert!(
                due >= t + Duration::from_secs(5),
                "the sites' back-off is not in its long wait"
            );
        }
        let before = Instant::now();
        ctl.on_telemetry(Sample::one_link("t", "s1", None, false));
        let due = lock(&ctl.inner).due().expect("the link down is due");
        assert!(
            due <= before + Duration::from_secs(1),
            "{due:?} from {before:?}"
        );
    }

    /// A change that observations ageing out make (a down link's reports expire: it comes
    /// back) is looked at every second and scheduled on its kind's back-off, also while the
    /// gradual back-off is due: it was looked at only when nothing was due, and on a busy
    /// fabric waited for the gradual one's long wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_back_by_ageing_out_is_not_held_behind_the_gradual_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("10ms"), "t.yaml"))).unwrap();
        // The link down, published; its reports then stop.
        ctl.on_telemetry(Sample::one_link("t", "s1", None, false));
        let gradual_due = {
            let mut inner = lock(&ctl.inner);
            ctl.publish_locked(&mut inner, false).unwrap();
            inner.links = Backoff::new(BackoffParams::default());
            // The gradual back-off in its long wait, due 9 s from now (loads keep moving).
            let t = Instant::now();
            inner.backoff.event(t);
            inner.backoff.ran(t);
            inner.backoff.event(t + Duration::from_millis(100));
            inner.backoff.ran(t + Duration::from_millis(300));
            inner.backoff.event(t + Duration::from_secs(4))
        };
        assert!(!ctl.published().live.down_links.is_empty());
        let recompute = tokio::spawn(ctl.clone().recompute_loop());
        // Fresh for 5 s: then the link is published up again, before the gradual back-off.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ctl.published().live.down_links.is_empty() {
            assert!(Instant::now() < deadline, "the link stayed down");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            Instant::now() < gradual_due,
            "published only when the gradual back-off was due"
        );
        recompute.abort();
    }

    #[tokio::test]
    async fn the_plan_sees_telemetry_the_back_off_has_not_published_yet() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("10ms"), "t.yaml"))).unwrap();
        // The transit reports s1 down. No recompute loop runs here, so nothing is published.
        ctl.on_telemetry(Sample::one_link("t", "s1", None, false));
        assert!(ctl.published().live.down_links.is_empty());
        // Raising the far site's link moves e's cost: it is on s2 already, s1 being cut off.
        let out = ctl
            .apply(&yaml("20ms"), "test", "raise", Origin::Apply, true, None)
            .await
            .unwrap();
        assert!(
            out.plan
                .text
                .contains("e chat: cost changes: s2 (11.00 ms via e > t > s2) -> s2 (21.00 ms"),
            "{}",
            out.plan.text
        );
        assert!(!out.plan.text.contains("s1 ("), "{}", out.plan.text);
    }

    /// Edge `e`'s report that it uses `s2` for `chat`, with `margins`.
    fn e_uses_s2(margins: Option<topology::Hysteresis>) -> Sample {
        Sample {
            node: NodeId::new("e"),
            neighbours: vec![],
            site: None,
            services: BTreeMap::new(),
            preferred: BTreeMap::from([(ServiceName::new("chat"), NodeId::new("s2"))]),
            margins,
        }
    }

    #[tokio::test]
    async fn the_plan_starts_from_the_sites_edges_report_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("5ms"), "t.yaml"))).unwrap();
        // s1 costs 2 ms from e, s2 6 ms; e reports it uses s2 for chat (s1 does not beat it by
        // the 10 ms margin: a router keeps s2).
        ctl.on_telemetry(e_uses_s2(None));
        let plan = |far: &'static str| {
            let ctl = &ctl;
            async move {
                ctl.apply(&yaml(far), "test", "raise", Origin::Apply, true, None)
                    .await
                    .unwrap()
                    .plan
                    .text
            }
        };
        // s2 at 9 ms: still within the margins, e stays on s2 and pays more.
        let text = plan("8ms").await;
        assert!(
            text.contains("e chat: cost changes: s2 (6.00 ms via e > t > s2) -> s2 (9.00 ms"),
            "{text}"
        );
        // s2 at 21 ms: s1 wins by both margins.
        let text = plan("20ms").await;
        assert!(
            text.contains("e chat: site changes: s2 (6.00 ms via e > t > s2) -> s1 (2.00 ms"),
            "{text}"
        );
    }

    /// The plan's new side merges telemetry against the new declared latencies, as the version
    /// the apply publishes does. e--t 1 ms, t--s1 declared 40 ms but measured 12 ms one-way,
    /// t--s2 20 ms, e on s2; t--s1 lowered to 5 ms: routers see s1 at 13 ms against s2's 21 ms,
    /// within the 10 ms margin, and stay. (The plan merged under the old topology, where 12 ms
    /// is no excess over 40 ms: the measurement was missing, s1 was predicted at 6 ms, a move.)
    #[tokio::test]
    async fn the_plan_merges_telemetry_against_the_new_declared_latencies() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let text = |near: &str| {
            let t = yaml("20ms");
            let declared = "{a: t, b: s1, latency: 1ms";
            assert!(t.contains(declared), "{t}");
            t.replace(declared, &format!("{{a: t, b: s1, latency: {near}"))
        };
        let ctl = Controller::open(store, Some((&text("40ms"), "t.yaml"))).unwrap();
        ctl.on_telemetry(Sample::one_link(
            "t",
            "s1",
            Some(Duration::from_millis(24)),
            true,
        ));
        ctl.on_telemetry(e_uses_s2(None));
        let lowered = text("5ms");
        let planned = ctl
            .apply(&lowered, "test", "lower", Origin::Apply, true, None)
            .await
            .unwrap()
            .plan;
        assert!(planned.changed);
        assert!(
            !planned.text.contains("site changes"),
            "e stays on s2: {}",
            planned.text
        );
        // The same impact from what the apply publishes.
        let (old_topology, old_live, incumbents, margins) = {
            let inner = lock(&ctl.inner);
            let now = Instant::now();
            (
                inner.current.topology.clone(),
                inner.live.merged(now),
                inner.live.incumbents(now),
                inner.live.margins(now),
            )
        };
        ctl.apply(&lowered, "test", "lower", Origin::Apply, false, None)
            .await
            .unwrap();
        let p = ctl.published();
        let link = topology::LinkId::new(&NodeId::new("t"), &NodeId::new("s1"));
        assert_eq!(
            p.live.link_latency.get(&link),
            Some(&Latency::from_micros(12_000))
        );
        let published = topology::diff::impact_with(
            &old_topology,
            &old_live.floored(&old_topology),
            &p.topology,
            &p.live.floored(&p.topology),
            &incumbents,
            &margins,
        );
        assert_eq!(planned.impact, published, "{}", planned.text);
    }

    /// Applying the text in force again (a retry whose first answer was lost) makes no new
    /// version; a rollback to the version in force neither; a text that differs only in a
    /// comment is a new version (history keeps the operator's text).
    #[tokio::test]
    async fn applying_the_text_in_force_again_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("5ms"), "t.yaml"))).unwrap();
        let apply = |text: String| {
            let ctl = &ctl;
            async move {
                ctl.apply(&text, "test", "m", Origin::Apply, false, None)
                    .await
                    .unwrap()
            }
        };
        let first = apply(yaml("8ms")).await;
        assert_eq!(first.version, Some(2));
        assert!(!first.unchanged);
        let again = apply(yaml("8ms")).await;
        assert_eq!((again.version, again.previous_version), (None, 2));
        assert!(again.unchanged && !again.dry_run);
        assert!(!again.plan.changed);
        let back = ctl
            .rollback(2, "test", "", false, None)
            .await
            .expect("a rollback to the version in force");
        assert_eq!(back.version, None);
        assert_eq!(ctl.history(10).unwrap().len(), 2);
        assert_eq!(ctl.current().record.version, 2);
        let commented = apply(format!("# a comment\n{}", yaml("8ms"))).await;
        assert_eq!(commented.version, Some(3));
        assert!(!commented.plan.changed);
    }

    /// An edge that runs with wider anti-flap margins (`--hysteresis-margin`) reports them, and
    /// the plan predicts its moves with them: the change that moves an edge with the defaults
    /// leaves this one where it is.
    #[tokio::test]
    async fn the_plan_moves_each_edge_by_the_margins_it_reports() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("5ms"), "t.yaml"))).unwrap();
        let report = |margins| e_uses_s2(margins);
        let plan = || async {
            ctl.apply(&yaml("20ms"), "test", "raise", Origin::Apply, true, None)
                .await
                .unwrap()
                .plan
                .text
        };
        // With the defaults (10 ms, 2/3), s1 at 2 ms beats s2 at 21 ms.
        ctl.on_telemetry(report(None));
        let text = plan().await;
        assert!(text.contains("e chat: site changes: s2"), "{text}");
        // e reports a 30 ms margin: 19 ms cheaper is not enough, e stays on s2.
        ctl.on_telemetry(report(Some(topology::Hysteresis {
            absolute: Latency::from_micros(30_000),
            relative: 2.0 / 3.0,
        })));
        let text = plan().await;
        assert!(
            text.contains("e chat: cost changes: s2 (6.00 ms via e > t > s2) -> s2 (21.00 ms"),
            "{text}"
        );
    }

    /// A store whose text in force breaks a rule this build added (here a pool holding the
    /// edge's client_address) still opens, on that text, with the rule as a warning; the same
    /// text applied anew is refused. (The controller refused to start: after an upgrade, nothing
    /// could be applied to fix it but a downgrade or a wiped store.)
    #[tokio::test]
    async fn a_stored_text_breaking_a_newer_rule_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}pools:\n  - {{name: p, prefix: \"127.0.0.0/24\"}}\n",
            yaml("5ms")
        );
        assert!(
            validate(&text).is_err(),
            "the rule is in force for new texts"
        );
        let topo = Arc::new(topology::load_stored(&text).unwrap().topology);
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        store::transaction(&*store, |tx| {
            records::commit_topology(
                tx,
                &text,
                &topo,
                "earlier build",
                "stored before the rule",
                Origin::Apply,
            )
        })
        .unwrap();
        // Said at the start, in the log.
        let (ctl, said) = logged(|| Controller::open(store, None));
        let ctl = ctl.expect("the controller opens");
        assert!(
            said.contains(
                "the topology in force breaks a rule added since it was stored: stored-version-"
            ) && said.contains("accepted in this stored version"),
            "{said}"
        );
        let cur = ctl.current();
        assert_eq!(cur.record.text, text);
        assert!(
            cur.warnings
                .iter()
                .any(|w| w.message.contains("contains 127.0.0.1, the client_address")),
            "{:?}",
            cur.warnings
        );
        let again = ctl
            .apply(&text, "test", "again", Origin::Apply, false, None)
            .await;
        assert!(
            matches!(again, Err(ControllerError::Invalid(_))),
            "{again:?}"
        );
    }
}
