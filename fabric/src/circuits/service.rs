//! The circuits runtime inside the controller: runs each operation as one durable store
//! transaction (off the async threads), republishes the snapshot when the set of provisioned
//! circuits changes, and watches routers' acknowledgements to move circuits to `active` (or
//! `decommissioned`), or to `failed` when the path's routers do not acknowledge in time (a
//! removal not acknowledged in time is `decommissioned` anyway). A sweep archives the circuits
//! decommissioned for longer than the retention ([`CircuitService::sweep_loop`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use topology::circuit::CircuitId;
use topology::{Bandwidth, NodeId, Topology};

use super::api::HistoryResponse;
use super::{Admission, Archived, Circuit, CircuitError, CircuitSpec, CircuitState, HistoryEntry};
use crate::controller::{Controller, ControllerError, records};
use crate::store::{self, StoreError};

/// How long routers have to acknowledge a circuit before it is marked `failed` (it still
/// becomes `active` if they acknowledge later), or its removal before it is marked
/// `decommissioned` without them.
pub const DEFAULT_PROVISION_TIMEOUT: Duration = Duration::from_secs(60);
/// How often acknowledgements are checked.
const SETTLE_EVERY: Duration = Duration::from_millis(100);
/// How many circuits one archiving transaction moves at most: a first sweep after an upgrade
/// may have years of decommissioned circuits to move, and one transaction for all of them
/// would hold the store's writer (every operation waits for it) for as long.
const ARCHIVE_BATCH: usize = 256;

/// How often the retention sweep runs: hourly, or as often as the retention when it is
/// shorter (a short retention, as tests use, is kept within twice itself), but not more than
/// once a second (each run reads the whole live table).
pub fn sweep_every(retention: Duration) -> Duration {
    retention.clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Circuit(#[from] CircuitError),
    #[error(transparent)]
    Controller(#[from] ControllerError),
    #[error("internal: {0}")]
    Internal(String),
    /// Try again shortly (503, `Retry-After`): nothing was written.
    #[error("busy: {0}")]
    Busy(String),
}

/// How long a circuit change waits for the controller to switch to a topology version the
/// store already holds ([`CircuitService::write`]): an apply publishes right after its commit,
/// in milliseconds, unless the controller is starved.
pub const STALE_WAIT: Duration = Duration::from_secs(5);

/// A blocking task that panicked or was cancelled ([`crate::task_failed`]).
impl From<tokio::task::JoinError> for ServiceError {
    fn from(e: tokio::task::JoinError) -> Self {
        ServiceError::Internal(crate::task_failed(e))
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        ServiceError::Circuit(CircuitError::Store(e))
    }
}

/// Pending acknowledgement: the snapshot version that first carried the circuit's current
/// revision ([`super::UNPUBLISHED`] while no snapshot has: its publication failed), and since
/// when its routers are waited for (the acknowledgement timeout counts from there): its
/// publication, or its commit while it is unpublished.
#[derive(Debug, Clone, Copy)]
struct Pending {
    revision: u64,
    version: u64,
    since: Instant,
}

pub struct CircuitService {
    ctl: Arc<Controller>,
    /// The circuits awaiting acknowledgement: the only ones a settle pass reads (by id). It is
    /// memory, not a store table: it holds what is not durable anyway (the snapshot version
    /// that carried each circuit, and when), and a crash cannot make it drift from the store,
    /// since [`Self::new`] rebuilds it from the records at every start (what
    /// [`Circuit::awaits_ack`] says of each). Each operation inserts what it changed after its
    /// transaction commits ([`Self::publish`]); each pass removes what it settled.
    pending: Mutex<BTreeMap<CircuitId, Pending>>,
    /// Held by a publication across its read of the circuits, its publication and its update
    /// of `pending`, so that two operations finishing together cannot publish an older list
    /// last. Only publications take it, on blocking threads ([`Self::publish_off_workers`]):
    /// `pending` itself is held briefly, so that a publication waiting on the disk holds no
    /// settle pass.
    publishing: Mutex<()>,
    /// A publication failed after its transaction committed: the next settle pass publishes
    /// again (the entries it left [`super::UNPUBLISHED`] then get the version that carries
    /// them).
    republish: AtomicBool,
    provision_timeout: Duration,
    /// How long a decommissioned circuit stays in the live table before the sweep archives it
    /// (`None`: never).
    retention: Option<Duration>,
    /// The topology version whose broken circuits have been failed ([`super::fail_broken`]).
    checked: AtomicU64,
    /// Tests: how many of the next publications fail.
    #[cfg(test)]
    fail_publish: std::sync::atomic::AtomicUsize,
    /// Tests: runs in [`Self::settle_once`] between its decisions and their transaction.
    #[cfg(test)]
    between: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Tests: awaited in [`Self::settle_once`] after its transaction, before it updates
    /// `pending`.
    #[cfg(test)]
    after: Mutex<Option<AfterHook>>,
    /// Tests: runs in [`Self::resize`] and [`Self::delete`] before their transaction.
    #[cfg(test)]
    before_write: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// What a test runs in [`CircuitService::settle_once`] after its transaction.
#[cfg(test)]
type AfterHook =
    Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CircuitService {
    /// Starts tracking the circuits in the store: first fails those the topology in force
    /// breaks (the follow-up of an apply that a crash cut off), then those whose routers'
    /// acknowledgement can still move them on ([`Circuit::awaits_ack`]) wait for
    /// acknowledgement of the controller's current snapshot (which carries them).
    pub fn new(
        ctl: Arc<Controller>,
        provision_timeout: Duration,
    ) -> Result<Arc<Self>, ServiceError> {
        Self::with_retention(ctl, provision_timeout, Some(super::DEFAULT_RETENTION))
    }

    /// [`Self::new`], archiving decommissioned circuits after `retention` (`None`: never;
    /// [`Self::sweep_loop`] does it).
    pub fn with_retention(
        ctl: Arc<Controller>,
        provision_timeout: Duration,
        retention: Option<Duration>,
    ) -> Result<Arc<Self>, ServiceError> {
        let cur = ctl.current();
        fail_broken_durably(&**ctl.store(), &cur.topology, cur.record.version)?;
        let svc = Arc::new(CircuitService {
            ctl,
            pending: Mutex::new(BTreeMap::new()),
            publishing: Mutex::new(()),
            republish: AtomicBool::new(false),
            provision_timeout,
            retention,
            checked: AtomicU64::new(cur.record.version),
            #[cfg(test)]
            fail_publish: 0.into(),
            #[cfg(test)]
            between: Mutex::new(None),
            #[cfg(test)]
            after: Mutex::new(None),
            #[cfg(test)]
            before_write: Mutex::new(None),
        });
        // The controller starts with no circuits in its snapshot: publish the stored ones, and
        // wait for that version's acknowledgement for those not settled yet. A publication
        // that fails (a snapshot over the routers' limit) does not stop the controller: routers
        // keep the snapshot they hold (no version without the stored circuits is served:
        // `Published::with_circuits`), the operator can delete circuits or roll back through
        // the API, and each settle pass publishes again.
        let unsettled: Vec<Circuit> = svc
            .list()?
            .into_iter()
            .filter(Circuit::awaits_ack)
            .collect();
        if let Err(e) = svc.publish(&unsettled) {
            tracing::error!(
                "circuits: the stored circuits are not distributed (routers keep the snapshot they have; retried at each settle pass): {e}"
            );
        }
        Ok(svc)
    }

    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctl
    }

    pub fn list(&self) -> Result<Vec<Circuit>, ServiceError> {
        Ok(store::read(&**self.ctl.store(), |tx| super::all(tx))?)
    }

    /// A page of the live circuits: up to `limit` whose ids come after `after`, in id order.
    pub fn list_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Circuit>, ServiceError> {
        Ok(store::read(&**self.ctl.store(), |tx| {
            super::page(&super::CIRCUITS, tx, after, limit)
        })?)
    }

    /// A page of the archive: up to `limit` circuits whose ids come after `after`, in id order.
    pub fn list_archived_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Archived>, ServiceError> {
        Ok(store::read(&**self.ctl.store(), |tx| {
            super::page(&super::CIRCUITS_ARCHIVE, tx, after, limit)
        })?)
    }

    pub fn get(&self, id_or_name: &str) -> Result<Circuit, ServiceError> {
        Ok(store::read(&**self.ctl.store(), |tx| {
            super::find(tx, id_or_name)
        })?)
    }

    /// The circuits archived after the retention period (the whole archive).
    pub fn list_archived(&self) -> Result<Vec<Archived>, ServiceError> {
        Ok(store::read(&**self.ctl.store(), |tx| {
            super::all_archived(tx)
        })?)
    }

    pub fn history(&self, id_or_name: &str) -> Result<(Circuit, Vec<HistoryEntry>), ServiceError> {
        let h = self.history_with_archive(id_or_name)?;
        Ok((h.circuit, h.history))
    }

    /// A circuit's history, an archived one's too (by id; its history is kept), saying when it
    /// was archived.
    pub fn history_with_archive(&self, id_or_name: &str) -> Result<HistoryResponse, ServiceError> {
        Ok(store::read(
            &**self.ctl.store(),
            |tx| -> Result<_, CircuitError> {
                let (circuit, archived_unix_ms) = match super::find(tx, id_or_name) {
                    Ok(c) => (c, None),
                    Err(CircuitError::Archived { id, .. }) => {
                        let a = super::find_archived(tx, id.as_str())?
                            .ok_or_else(|| CircuitError::NotFound(id.to_string()))?;
                        (a.circuit, Some(a.archived_unix_ms))
                    }
                    Err(e) => return Err(e),
                };
                let history = super::history(tx, &circuit.id)?;
                Ok(HistoryResponse {
                    circuit,
                    history,
                    archived_unix_ms,
                })
            },
        )?)
    }

    /// Per-link capacity, reservations and free bandwidth under the topology in force.
    pub fn headroom(
        &self,
    ) -> Result<BTreeMap<topology::LinkId, topology::circuit::LinkHeadroom>, ServiceError> {
        let topo = self.ctl.current().topology.clone();
        Ok(topology::circuit::headroom(
            &topo,
            &super::reservations(&self.list()?),
        ))
    }

    /// Admission only: where the circuit would go and which VIP it would get, and that the
    /// routers' snapshot would be within their limit with it ([`fits`]: a create checks both).
    /// Writes nothing. A full encode: run it off the runtime's workers.
    pub fn validate(&self, spec: &CircuitSpec) -> Result<Admission, ServiceError> {
        let topo = self.ctl.current().topology.clone();
        let (adm, carried) = store::read(&**self.ctl.store(), |tx| {
            let circuits = super::all(tx)?;
            let adm = super::admit(&topo, &circuits, spec)?;
            let carried = super::carried_if_created(tx, &circuits, spec, &adm)?;
            Ok::<_, CircuitError>((adm, carried))
        })?;
        carries(&self.ctl, carried)?;
        Ok(adm)
    }

    /// Runs `f` in one durable transaction against the topology in force (so admission never
    /// uses a stale topology). When the store holds a newer topology version than the
    /// controller has switched to (an apply between its commit and its publication), the
    /// transaction is aborted, writing nothing, and `f` runs again once the controller has
    /// switched; [`ServiceError::Busy`] if that takes longer than [`STALE_WAIT`].
    async fn write<R: Send + 'static>(
        &self,
        f: impl Fn(&mut dyn store::WriteTxn, &Topology) -> Result<R, CircuitError>
        + Send
        + Sync
        + 'static,
    ) -> Result<R, ServiceError> {
        /// Why a transaction ended without committing.
        enum Abort {
            Stale(u64),
            Failed(CircuitError),
        }
        impl From<StoreError> for Abort {
            fn from(e: StoreError) -> Self {
                Abort::Failed(CircuitError::Store(e))
            }
        }
        let f = Arc::new(f);
        let deadline = Instant::now() + STALE_WAIT;
        loop {
            let cur = self.ctl.current();
            let (store, f) = (self.ctl.store().clone(), f.clone());
            let expected = cur.record.version;
            let topo = cur.topology.clone();
            let res = tokio::task::spawn_blocking(move || {
                store::transaction(&*store, |tx| -> Result<R, Abort> {
                    // The number only: the version's text can be megabytes.
                    let now = records::current_version(tx)?;
                    if now != Some(expected) {
                        return Err(Abort::Stale(now.unwrap_or(0)));
                    }
                    f(tx, &topo).map_err(Abort::Failed)
                })
            })
            .await?;
            let newer = match res {
                Ok(r) => return Ok(r),
                Err(Abort::Failed(e)) => return Err(e.into()),
                Err(Abort::Stale(v)) => v,
            };
            // The store has a newer topology than the controller has switched to: wait for
            // the switch (the apply publishes right after its commit).
            while self.ctl.current().record.version == expected {
                if Instant::now() >= deadline {
                    return Err(ServiceError::Busy(format!(
                        "topology version {newer} is committed but not in force yet after \
                         {STALE_WAIT:?}; try again"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Publishes the circuits in the store to routers and starts waiting for `changed`'s
    /// acknowledgements. When it fails, `changed` still waits, for a snapshot that carries it
    /// ([`super::UNPUBLISHED`]), and the next settle pass publishes again: each of its callers
    /// has committed `changed` already, so nothing may forget it (until a restart rebuilt the
    /// pending set, a circuit was left provisioning, never settled nor expired, and its
    /// routers never told).
    fn publish(&self, changed: &[Circuit]) -> Result<u64, ServiceError> {
        let _serial = lock(&self.publishing);
        let published = self.publish_locked();
        let mut p = lock(&self.pending);
        let version = match &published {
            Ok(v) => {
                // This snapshot carries every circuit committed before its read of the store,
                // those an earlier failure left unpublished too: their routers have had them
                // from now on, not since the failure.
                let now = Instant::now();
                for e in p.values_mut().filter(|e| e.version == super::UNPUBLISHED) {
                    e.version = *v;
                    e.since = now;
                }
                *v
            }
            Err(_) => {
                self.republish.store(true, Ordering::SeqCst);
                super::UNPUBLISHED
            }
        };
        for c in changed {
            // Two operations on one circuit commit in order, but may publish in the other: the
            // later revision's entry stays (an earlier one in its place made every settle pass
            // skip the circuit, for good).
            if p.get(&c.id).is_some_and(|e| e.revision > c.revision) {
                continue;
            }
            p.insert(
                c.id.clone(),
                Pending {
                    revision: c.revision,
                    version,
                    since: Instant::now(),
                },
            );
        }
        published
    }

    fn publish_locked(&self) -> Result<u64, ServiceError> {
        #[cfg(test)]
        if self
            .fail_publish
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(ServiceError::Internal(
                "injected publication failure".into(),
            ));
        }
        let circuits = self.list()?;
        Ok(self
            .ctl
            .publish_circuits(Arc::new(super::provisioned(&circuits)))?)
    }

    /// [`Self::publish`] on a blocking thread: it reads every circuit from the store and
    /// encodes a full snapshot (megabytes on a large fabric), and the runtime's workers also
    /// serve routers' control sessions and the admin API.
    async fn publish_off_workers(
        self: &Arc<Self>,
        changed: Vec<Circuit>,
    ) -> Result<u64, ServiceError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.publish(&changed)).await?
    }

    /// [`Self::publish`] after an operation committed `changed`: a failure is logged, not
    /// returned, as the operation stands (durable, and published by the next settle pass).
    async fn publish_committed(self: &Arc<Self>, changed: &Circuit) {
        if let Err(e) = self.publish_off_workers(vec![changed.clone()]).await {
            tracing::error!(
                "circuits: publishing {} (committed) failed, the next pass tries again: {e}",
                changed.id
            );
        }
    }

    /// Creates a circuit (or returns the one created earlier with the same idempotency key).
    /// A circuit the routers' snapshot would be too large with is refused, not committed
    /// ([`fits`]).
    /// Returns the circuit and whether it was created now.
    pub async fn create(
        self: &Arc<Self>,
        spec: CircuitSpec,
        key: Option<String>,
        actor: String,
    ) -> Result<(Circuit, bool), ServiceError> {
        let spec2 = spec.clone();
        let ctl = self.ctl.clone();
        let (c, created) = self
            .write(move |tx, topo| {
                let (c, created) = super::create(tx, topo, &spec2, key.as_deref(), &actor)?;
                if created {
                    fits(&ctl, tx)?;
                }
                Ok((c, created))
            })
            .await?;
        if created {
            self.publish_committed(&c).await;
        }
        Ok((c, created))
    }

    pub async fn resize(
        self: &Arc<Self>,
        id_or_name: String,
        rate: Bandwidth,
        actor: String,
    ) -> Result<Circuit, ServiceError> {
        #[cfg(test)]
        self.run_before_write();
        // Whether the transaction changed the circuit, not a comparison with a read before it:
        // the name may find another circuit by then.
        let ctl = self.ctl.clone();
        let (c, changed) = self
            .write(move |tx, topo| {
                let (c, changed) = super::resize(tx, topo, &id_or_name, rate, &actor)?;
                if changed {
                    fits(&ctl, tx)?;
                }
                Ok((c, changed))
            })
            .await?;
        if changed {
            self.publish_committed(&c).await;
        }
        Ok(c)
    }

    pub async fn delete(
        self: &Arc<Self>,
        id_or_name: String,
        actor: String,
    ) -> Result<Circuit, ServiceError> {
        #[cfg(test)]
        self.run_before_write();
        let (c, changed) = self
            .write(move |tx, _| super::delete(tx, &id_or_name, &actor))
            .await?;
        if changed {
            self.publish_committed(&c).await;
        }
        Ok(c)
    }

    /// Tests: runs the [`Self::before_write`] hook, once.
    #[cfg(test)]
    fn run_before_write(&self) {
        let f = lock(&self.before_write).take();
        if let Some(f) = f {
            f();
        }
    }

    /// After a topology apply: circuits whose path the topology in force breaks become
    /// `failed`, and the snapshot is republished. When this fails, the settle loop retries it.
    pub async fn on_topology_applied(self: &Arc<Self>) -> Result<(), ServiceError> {
        let cur = self.ctl.current();
        let version = cur.record.version;
        let store = self.ctl.store().clone();
        let changed = tokio::task::spawn_blocking(move || {
            fail_broken_durably(&*store, &cur.topology, cur.record.version)
        })
        .await??;
        self.checked.fetch_max(version, Ordering::SeqCst);
        if !changed.is_empty() {
            // A circuit that only let go of its old path still awaits its new path's
            // acknowledgement, now at its new revision.
            let waiting: Vec<Circuit> = changed.into_iter().filter(Circuit::awaits_ack).collect();
            self.publish_off_workers(waiting).await?;
        }
        Ok(())
    }

    /// One pass: fails the circuits the topology in force breaks if that was not done yet
    /// (its run after the apply failed), settles circuits whose routers acknowledged, fails
    /// overdue provisioning ones and decommissions overdue removals, and stops waiting for those no acknowledgement moves on any more (failed
    /// by a topology change). Writes nothing when none of them changes.
    pub async fn settle_once(self: &Arc<Self>) -> Result<(), ServiceError> {
        // Its failure must not hold up the others: settling and expiry go on, and the next
        // pass tries it again.
        if self.ctl.current().record.version != self.checked.load(Ordering::SeqCst)
            && let Err(e) = self.on_topology_applied().await
        {
            tracing::error!("circuits: failing those the topology in force breaks: {e}");
        }
        if self.republish.swap(false, Ordering::SeqCst)
            && let Err(e) = self.publish_off_workers(Vec::new()).await
        {
            tracing::error!("circuits: publishing again: {e}");
        }
        let pending = lock(&self.pending).clone();
        if pending.is_empty() {
            return Ok(());
        }
        let applied: BTreeMap<String, u64> = self
            .ctl
            .routers()
            .into_iter()
            .map(|r| (r.record.node.clone(), r.record.applied_version))
            .collect();
        let acked = move |n: &NodeId, v: u64| applied.get(n.as_str()).is_some_and(|a| *a >= v);
        let topo = self.ctl.current().topology.clone();
        // The pending circuits only, each by id: a pass costs what is pending, not every
        // circuit ever created.
        let (store, ids) = (
            self.ctl.store().clone(),
            pending.keys().cloned().collect::<Vec<_>>(),
        );
        let circuits = tokio::task::spawn_blocking(move || {
            store::read(&*store, |tx| super::by_ids(tx, ids.iter()))
        })
        .await??;
        let now = Instant::now();
        let (mut ready, mut overdue, mut done) = (BTreeMap::new(), BTreeMap::new(), Vec::new());
        // A pending circuit the live table no longer holds (archived) waits for nothing.
        let found: BTreeSet<&CircuitId> = circuits.iter().map(|c| &c.id).collect();
        done.extend(pending.keys().filter(|id| !found.contains(id)).cloned());
        for c in &circuits {
            let Some(p) = pending.get(&c.id) else {
                continue;
            };
            if !c.awaits_ack() {
                // Settled elsewhere, or failed by a topology change: nothing to wait for.
                done.push(c.id.clone());
                continue;
            }
            if p.revision != c.revision && c.state != CircuitState::Failed {
                continue;
            }
            // Decided on the circuit as read here: the transaction below acts on it only if it
            // is still at this revision (a delete or resize committed meanwhile is pending on
            // a newer snapshot, not acknowledged by this one).
            if c.awaited(&topo).iter().all(|n| acked(n, p.version)) {
                ready.insert(c.id.clone(), (p.version, c.revision));
            } else if match c.state {
                CircuitState::Provisioning => true,
                // A removal no snapshot carries yet is not expired: no router was told, and its
                // capacity and VIP stay held until one is (its time counts from that one).
                CircuitState::Decommissioning => p.version != super::UNPUBLISHED,
                _ => false,
            } && now.duration_since(p.since) >= self.provision_timeout
            {
                overdue.insert(c.id.clone(), (p.version, c.revision));
            }
        }
        // An entry is let go only as this pass saw it: an operation that committed meanwhile
        // (a delete, a resize) published the circuit again under a newer entry, which waits
        // for its own acknowledgement.
        let as_seen = |p: &BTreeMap<CircuitId, Pending>, id: &CircuitId| {
            let key = |e: &Pending| (e.revision, e.version);
            p.get(id).map(key) == pending.get(id).map(key)
        };
        if !done.is_empty() {
            let mut p = lock(&self.pending);
            for id in &done {
                if as_seen(&p, id) {
                    p.remove(id);
                }
            }
        }
        if ready.is_empty() && overdue.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        if let Some(f) = lock(&self.between).take() {
            f();
        }
        let store = self.ctl.store().clone();
        let timeout = self.provision_timeout;
        let (changed, failed) = tokio::task::spawn_blocking(move || {
            store::transaction(&*store, |tx| -> Result<_, StoreError> {
                let unchanged = |decided: &BTreeMap<CircuitId, (u64, u64)>, c: &Circuit| {
                    let (version, revision) = decided.get(&c.id)?;
                    (*revision == c.revision).then_some(*version)
                };
                let (ready_ids, overdue_ids): (Vec<_>, Vec<_>) = (
                    ready.keys().cloned().collect(),
                    overdue.keys().cloned().collect(),
                );
                let a = super::settle(tx, &topo, &ready_ids, &|c| unchanged(&ready, c), &acked)?;
                let f = super::expire(
                    tx,
                    &topo,
                    timeout,
                    &overdue_ids,
                    &|c| unchanged(&overdue, c),
                    &acked,
                )?;
                Ok((a, f))
            })
        })
        .await??;
        #[cfg(test)]
        {
            let f = lock(&self.after).take();
            if let Some(f) = f {
                f().await;
            }
        }
        let mut p = lock(&self.pending);
        for c in &changed {
            if as_seen(&p, &c.id) {
                p.remove(&c.id);
            }
        }
        for c in &failed {
            if !as_seen(&p, &c.id) {
                continue;
            }
            if c.awaits_ack() {
                // Failed, but stays pending: late acknowledgements still activate it.
                if let Some(e) = p.get_mut(&c.id) {
                    e.revision = c.revision;
                }
            } else {
                // Decommissioned without the routers that did not acknowledge.
                p.remove(&c.id);
            }
        }
        Ok(())
    }

    /// One retention sweep at `now_unix_ms` (the caller's clock: tests pass a later one):
    /// moves every circuit decommissioned for the retention or longer to the archive, in
    /// transactions of [`ARCHIVE_BATCH`] circuits, each circuit's move whole in one. Returns how
    /// many it moved. Nothing is published: a decommissioned circuit is in no snapshot.
    pub async fn sweep_once(&self, now_unix_ms: u64) -> Result<usize, ServiceError> {
        let Some(retention) = self.retention else {
            return Ok(0);
        };
        let store = self.ctl.store().clone();
        let moved = tokio::task::spawn_blocking(move || -> Result<usize, StoreError> {
            let due = store::read(&*store, |tx| {
                super::due_for_archive(tx, now_unix_ms, retention)
            })?;
            let mut moved = 0;
            for batch in due.chunks(ARCHIVE_BATCH) {
                moved += store::transaction(&*store, |tx| {
                    super::archive(tx, batch, now_unix_ms, retention)
                })?
                .len();
            }
            Ok(moved)
        })
        .await??;
        if moved > 0 {
            tracing::info!(
                moved,
                retention = %humantime::format_duration(retention),
                "circuits: archived those decommissioned for longer than the retention"
            );
        }
        Ok(moved)
    }

    /// Spawned once by the daemon: a retention sweep at start (the first after an upgrade
    /// archives what earlier builds kept), then every [`sweep_every`]. Returns at once when
    /// the retention is off.
    pub async fn sweep_loop(self: Arc<Self>) {
        let Some(retention) = self.retention else {
            tracing::info!("circuits: retention off, decommissioned circuits are never archived");
            return;
        };
        loop {
            if let Err(e) = self.sweep_once(records::now_unix_ms()).await {
                tracing::error!("circuits: archiving decommissioned circuits: {e}");
            }
            tokio::time::sleep(sweep_every(retention)).await;
        }
    }

    /// Spawned once by the daemon.
    pub async fn settle_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SETTLE_EVERY).await;
            if let Err(e) = self.settle_once().await {
                tracing::error!("circuits: {e}");
            }
        }
    }
}

/// [`super::fail_broken`] in one durable transaction, only when a circuit is broken: most
/// applies break none, and then nothing is written. Only while `version` is the store's
/// current one: a newer version committed meanwhile (a quick second apply, a rollback) may
/// have the links `topo` lacks, and may carry circuits created since on them; its own
/// follow-up judges the circuits.
fn fail_broken_durably(
    store: &dyn store::Store,
    topo: &Topology,
    version: u64,
) -> Result<Vec<Circuit>, StoreError> {
    let circuits = store::read(store, |tx| super::all(tx))?;
    if !circuits.iter().any(|c| super::changed_by(topo, c)) {
        return Ok(Vec::new());
    }
    store::transaction(store, |tx| {
        // The number only: the version's text can be megabytes.
        if records::current_version(tx)? != Some(version) {
            return Ok(Vec::new());
        }
        super::fail_broken(tx, topo, version)
    })
}

/// Refuses, inside its transaction, a change of circuits that would make the snapshot routers
/// are sent too large to send ([`Controller::check_circuits_fit`] on the circuits `tx` holds
/// with it): committed, it could never be published (each pass would try and fail until the
/// provisioning timeout failed it) while its answer said it was made. A create or resize only:
/// a delete makes the snapshot smaller.
fn fits(ctl: &Controller, tx: &dyn store::ReadTxn) -> Result<(), CircuitError> {
    carries(ctl, super::provisioned(&super::all(tx)?))
}

/// Whether the routers' snapshot, carrying `circuits`, is within the limit they take.
fn carries(
    ctl: &Controller,
    circuits: Vec<topology::circuit::ProvisionedCircuit>,
) -> Result<(), CircuitError> {
    match ctl.check_circuits_fit(&Arc::new(circuits)) {
        Ok(()) => Ok(()),
        Err(ControllerError::TooLarge { bytes, max }) => Err(CircuitError::TooLarge { bytes, max }),
        Err(e) => Err(CircuitError::Internal(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::SeqCst;

    use super::*;
    use crate::circuits::tests::{spec, yaml};
    use crate::controller::RouterSession;
    use crate::controller::records::{self, Origin};
    use crate::store::Store;
    use crate::store::redb::RedbStore;
    use crate::store::testing::FaultyStore;

    const POOL: &str = "127.79.0.0/28";

    /// The actions of a history, in order.
    fn actions(h: &[super::super::HistoryEntry]) -> Vec<&str> {
        h.iter().map(|e| e.action.as_str()).collect()
    }

    /// A controller on `store` with e, t, s and the link e–s, circuits on it, and circuit c1
    /// on e–s.
    async fn with_c1(store: Arc<dyn Store>) -> (Arc<Controller>, Arc<CircuitService>) {
        let ctl = Controller::open(store, Some((&yaml(POOL, true), "t.yaml"))).unwrap();
        let svc = CircuitService::new(ctl.clone(), DEFAULT_PROVISION_TIMEOUT).unwrap();
        let (c, _) = svc
            .create(spec("c1", "10.1.0.0/24", "100Mbps"), None, "ops".into())
            .await
            .unwrap();
        assert_eq!(c.path, [NodeId::new("e"), NodeId::new("s")]);
        (ctl, svc)
    }

    /// [`with_c1`] in `dir`, its routers' acknowledgement (the sessions: keep them) and a
    /// settle pass: c1 as it is then.
    async fn settled_c1(
        dir: &std::path::Path,
    ) -> (
        Arc<Controller>,
        Arc<CircuitService>,
        Circuit,
        Vec<RouterSession>,
    ) {
        let (ctl, svc) = with_c1(FaultyStore::open(dir)).await;
        let sessions = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        let c = svc.get("c1").unwrap();
        (ctl, svc, c, sessions)
    }

    /// A controller on a [`FaultyStore`] in `dir` that starts with the topology `text`, and its
    /// circuit service with the provisioning timeout `timeout`.
    fn service_on(
        dir: &std::path::Path,
        text: &str,
        timeout: Duration,
    ) -> (Arc<Controller>, Arc<CircuitService>) {
        let ctl = Controller::open(FaultyStore::open(dir), Some((text, "t.yaml"))).unwrap();
        let svc = CircuitService::new(ctl.clone(), timeout).unwrap();
        (ctl, svc)
    }

    /// Applies `text` as an operator would, and the circuits' follow-up to it.
    async fn apply_settled(ctl: &Controller, svc: &Arc<CircuitService>, text: &str, message: &str) {
        ctl.apply(text, "ops", message, Origin::Apply, false, None)
            .await
            .unwrap();
        svc.on_topology_applied().await.unwrap();
    }

    /// Applies the topology without the link e–s (version 2), as an operator would; the
    /// circuits' follow-up is left to the caller.
    async fn drop_es(ctl: &Controller) {
        ctl.apply(
            &yaml(POOL, false),
            "ops",
            "drop e–s",
            Origin::Apply,
            false,
            None,
        )
        .await
        .unwrap();
    }

    /// Applies the test topology without t and its links (e–s stays).
    async fn drop_t(ctl: &Controller) {
        let without_t: String = yaml(POOL, true)
            .lines()
            .filter(|l| !["id: t,", "a: t,", "b: t,"].iter().any(|t| l.contains(t)))
            .map(|l| format!("{l}\n"))
            .collect();
        ctl.apply(&without_t, "ops", "drop t", Origin::Apply, false, None)
            .await
            .unwrap();
    }

    /// `nodes` acknowledge the snapshot the controller publishes now.
    fn ack(ctl: &Controller, nodes: &[&str]) -> Vec<RouterSession> {
        let p = ctl.published();
        nodes
            .iter()
            .map(|n| {
                let (s, _) = ctl.router_session_start(n);
                assert!(ctl.router_ack(&s, p.version, p.topology_version));
                s
            })
            .collect()
    }

    fn failed_by_version_2(c: &Circuit) -> bool {
        c.state == CircuitState::Failed
            && c.reason
                .as_deref()
                .is_some_and(|r| r.starts_with("topology version 2:"))
    }

    /// A circuit a topology change failed waits for no acknowledgement: once its routers
    /// acknowledged, settle passes neither write (a durable transaction each, 10 a second)
    /// nor keep waiting for it, and a restarted service does not wait for it again.
    #[tokio::test]
    async fn a_circuit_failed_by_a_topology_change_is_not_settled_again_and_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::open(dir.path());
        let (ctl, svc) = with_c1(store.clone()).await;
        drop_es(&ctl).await;
        svc.on_topology_applied().await.unwrap();
        let c = svc.get("c1").unwrap();
        assert!(failed_by_version_2(&c), "{c:?}");
        let _sessions = ack(&ctl, &["e", "s"]);
        let writes = store.writes.load(SeqCst);
        for _ in 0..5 {
            svc.settle_once().await.unwrap();
        }
        assert_eq!(store.writes.load(SeqCst), writes, "settle passes wrote");
        assert!(lock(&svc.pending).is_empty());
        assert_eq!(svc.get("c1").unwrap(), c);

        let restarted = CircuitService::new(ctl.clone(), DEFAULT_PROVISION_TIMEOUT).unwrap();
        assert!(lock(&restarted.pending).is_empty());
    }

    /// A circuit a topology change failed comes back when a later apply makes its path whole
    /// again (the change undone): provisioning, then active once its routers acknowledge, on
    /// its VIP and path. (It stayed failed for good: delete and create gave it another VIP.)
    #[tokio::test]
    async fn a_circuit_failed_by_an_apply_comes_back_when_the_apply_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc, before, _sessions) = settled_c1(dir.path()).await;
        assert_eq!(before.state, CircuitState::Active);
        drop_es(&ctl).await;
        svc.on_topology_applied().await.unwrap();
        assert!(failed_by_version_2(&svc.get("c1").unwrap()));
        // Version 3 sets e–s back.
        apply_settled(&ctl, &svc, &yaml(POOL, true), "undo").await;
        let c = svc.get("c1").unwrap();
        assert_eq!(
            (c.state, c.reason.as_ref()),
            (CircuitState::Provisioning, None)
        );
        assert_eq!((c.vip, &c.path), (before.vip, &before.path));
        let (_, history) = svc.history("c1").unwrap();
        let last = history.last().unwrap();
        assert_eq!(last.action, "restore");
        assert!(
            last.detail.starts_with("topology version 3:"),
            "{}",
            last.detail
        );
        // Idempotent: the same topology again changes nothing.
        svc.on_topology_applied().await.unwrap();
        assert_eq!(svc.get("c1").unwrap(), c);
        let _again = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Active);
    }

    /// A circuit moved by a resize, failed by a break of its new path (keeping the old one it
    /// held), then restored by an apply that mends the new path and removes the old one: the
    /// hold is released in the same pass, so the circuit waits for no router the topology no
    /// longer has. (Restored first, it kept the hold until a second pass.)
    #[tokio::test]
    async fn a_restore_releases_an_old_path_the_same_apply_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc, c, _sessions) = c1_moved_via_t(dir.path()).await;
        assert!(c.held.is_some(), "{c:?}");
        drop_t(&ctl).await;
        svc.on_topology_applied().await.unwrap();
        let failed = svc.get("c1").unwrap();
        assert!(failed_by_version_2(&failed), "{failed:?}");
        assert!(failed.held.is_some(), "the old path, intact, still held");
        // Version 3: t back, e–s gone.
        ctl.apply(
            &yaml(POOL, false),
            "ops",
            "t back",
            Origin::Apply,
            false,
            None,
        )
        .await
        .unwrap();
        svc.on_topology_applied().await.unwrap();
        let c = svc.get("c1").unwrap();
        assert_eq!(
            (c.state, c.held.as_ref()),
            (CircuitState::Provisioning, None)
        );
        svc.on_topology_applied().await.unwrap();
        assert_eq!(svc.get("c1").unwrap(), c, "a second pass changes nothing");
    }

    /// A settle pass reads the circuits awaiting acknowledgement only, not every circuit ever
    /// created: with 30 circuits active and one provisioning, a pass that activates that one
    /// reads its record (before and inside its transaction), and a pass with nothing pending
    /// reads none. (Every pass decoded the whole circuits table three times.)
    #[tokio::test]
    async fn a_settle_pass_reads_only_the_circuits_awaiting_acknowledgement() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::open(dir.path());
        let ctl = Controller::open(
            store.clone(),
            Some((&yaml("127.79.0.0/26", true), "t.yaml")),
        )
        .unwrap();
        let svc = CircuitService::new(ctl.clone(), DEFAULT_PROVISION_TIMEOUT).unwrap();
        for i in 1..=30 {
            svc.create(
                spec(&format!("c{i}"), &format!("10.{i}.0.0/24"), "1Mbps"),
                None,
                "ops".into(),
            )
            .await
            .unwrap();
        }
        let _first = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        assert!(
            svc.list()
                .unwrap()
                .iter()
                .all(|c| c.state == CircuitState::Active)
        );
        let (late, _) = svc
            .create(spec("late", "10.99.0.0/24", "1Mbps"), None, "ops".into())
            .await
            .unwrap();
        let _second = ack(&ctl, &["e", "s"]);
        store.reset_rows_read();
        svc.settle_once().await.unwrap();
        let read = store.rows_read(super::super::CIRCUITS.name);
        assert!(
            read <= 2,
            "a pass settling one circuit read {read} circuit records"
        );
        assert_eq!(
            svc.get(late.id.as_str()).unwrap().state,
            CircuitState::Active
        );
        store.reset_rows_read();
        svc.settle_once().await.unwrap();
        assert_eq!(store.rows_read(super::super::CIRCUITS.name), 0);
    }

    /// c1 created, activated, deleted and decommissioned (its routers acknowledge each step)
    /// on a store in `dir`; returns when it was decommissioned. The controller is gone when it
    /// returns (as when it stops).
    async fn decommissioned_c1(dir: &std::path::Path) -> u64 {
        let store = Arc::new(RedbStore::open(dir).unwrap());
        let (ctl, svc) = with_c1(store).await;
        let _first = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        svc.delete("c1".into(), "ops".into()).await.unwrap();
        let _second = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        let c = svc.get("c1").unwrap();
        c.decommissioned_unix_ms()
            .unwrap_or_else(|| panic!("not decommissioned: {c:?}"))
    }

    /// A store as a build before the archive left it (its decommissioned circuits in the live
    /// table, no archive table) is archived by the upgraded controller's first sweep once the
    /// retention has passed, and a restart keeps it archived: not listed, not in the snapshot's
    /// list, found by id as archived, its history whole with the archiving last.
    #[tokio::test]
    async fn the_first_sweep_archives_what_an_earlier_build_kept_and_a_restart_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let at = decommissioned_c1(dir.path()).await;
        let retention_ms = super::super::DEFAULT_RETENTION.as_millis() as u64;
        {
            let store = Arc::new(RedbStore::open(dir.path()).unwrap());
            let archive = store::read(&*store, |tx| super::super::all_archived(tx)).unwrap();
            assert_eq!(archive, [], "an old store has no archive");
            let ctl = Controller::open(store, None).unwrap();
            let svc = CircuitService::new(ctl, DEFAULT_PROVISION_TIMEOUT).unwrap();
            assert_eq!(svc.sweep_once(at + retention_ms - 1).await.unwrap(), 0);
            assert_eq!(svc.list().unwrap().len(), 1);
            assert_eq!(svc.sweep_once(at + retention_ms).await.unwrap(), 1);
        }
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, None).unwrap();
        let svc = CircuitService::new(ctl, DEFAULT_PROVISION_TIMEOUT).unwrap();
        assert_eq!(svc.list().unwrap(), []);
        let archived = svc.list_archived().unwrap();
        assert_eq!(
            archived
                .iter()
                .map(|a| (a.circuit.name.as_str(), a.archived_unix_ms))
                .collect::<Vec<_>>(),
            [("c1", at + retention_ms)]
        );
        let err = svc.get("c-000001").unwrap_err();
        assert!(
            matches!(&err, ServiceError::Circuit(CircuitError::Archived { .. })),
            "{err}"
        );
        let h = svc.history_with_archive("c-000001").unwrap();
        assert_eq!(h.archived_unix_ms, Some(at + retention_ms));
        assert_eq!(
            actions(&h.history),
            [
                "create",
                "place",
                "activate",
                "delete",
                "decommission",
                "archive"
            ]
        );
        // Later sweeps find nothing more to move.
        assert_eq!(svc.sweep_once(at + 2 * retention_ms).await.unwrap(), 0);
    }

    /// `--circuit-retention off`: nothing is ever archived.
    #[tokio::test]
    async fn with_the_retention_off_nothing_is_archived() {
        let dir = tempfile::tempdir().unwrap();
        let at = decommissioned_c1(dir.path()).await;
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ctl = Controller::open(store, None).unwrap();
        let svc = CircuitService::with_retention(ctl, DEFAULT_PROVISION_TIMEOUT, None).unwrap();
        assert_eq!(
            svc.sweep_once(at + 100 * 365 * 86_400_000).await.unwrap(),
            0
        );
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Decommissioned);
    }

    #[test]
    fn the_sweep_runs_hourly_or_as_often_as_a_shorter_retention() {
        let s = Duration::from_secs;
        assert_eq!(sweep_every(super::super::DEFAULT_RETENTION), s(3600));
        assert_eq!(sweep_every(s(90)), s(90));
        assert_eq!(sweep_every(Duration::ZERO), s(1));
    }

    /// A delete that commits while a settle pass has decided that the circuit's routers
    /// acknowledged it (the create's snapshot) does not make the circuit `decommissioned` on
    /// those acknowledgements: its removal is in a newer snapshot, not acknowledged yet. It
    /// stays `decommissioning`, waiting for that one.
    #[tokio::test]
    async fn a_delete_during_a_settle_pass_waits_for_its_own_acknowledgement() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::open(dir.path());
        let (ctl, svc) = with_c1(store.clone()).await;
        let _sessions = ack(&ctl, &["e", "s"]);
        let ctl2 = ctl.clone();
        *lock(&svc.between) = Some(Box::new(move || {
            let (deleted, _) =
                store::transaction(&**ctl2.store(), |tx| super::super::delete(tx, "c1", "ops"))
                    .unwrap();
            assert_eq!(deleted.state, CircuitState::Decommissioning);
        }));
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Decommissioning);
    }

    /// A delete that commits while a settle pass activates the circuit (after the pass's
    /// transaction, before it lets go of the circuit's pending entry) keeps the entry the
    /// delete published: the circuit is decommissioned once its routers acknowledge the
    /// removal. (The pass dropped the delete's entry with its own, and the circuit stayed
    /// `decommissioning` until a restart.)
    #[tokio::test]
    async fn an_operation_during_a_settle_pass_keeps_its_own_pending_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::open(dir.path());
        let (ctl, svc) = with_c1(store.clone()).await;
        let sessions = ack(&ctl, &["e", "s"]);
        let svc2 = svc.clone();
        *lock(&svc.after) = Some(Box::new(move || {
            Box::pin(async move {
                let c = svc2.delete("c1".into(), "ops".into()).await.unwrap();
                assert_eq!(c.state, CircuitState::Decommissioning);
            })
        }));
        svc.settle_once().await.unwrap();
        let id = svc.get("c1").unwrap().id;
        assert!(lock(&svc.pending).contains_key(&id), "the delete's entry");
        let p = ctl.published();
        for s in &sessions {
            assert!(ctl.router_ack(s, p.version, p.topology_version));
        }
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Decommissioned);
    }

    /// When failing the circuits a topology broke fails in a settle pass (the store refused
    /// it), the pass still settles the others (it returned at that error, and nothing settled
    /// while it kept failing), and the next pass fails the broken ones.
    #[tokio::test]
    async fn a_failing_topology_check_does_not_hold_up_settling_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::open(dir.path());
        let (ctl, svc) = with_c1(store.clone()).await;
        let _first = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Active);
        // e–s goes; its follow-up (`on_topology_applied`) is left to the settle loop.
        drop_es(&ctl).await;
        let (c2, _) = svc
            .create(spec("c2", "10.2.0.0/24", "100Mbps"), None, "ops".into())
            .await
            .unwrap();
        assert_eq!(c2.path.len(), 3, "via t: {c2:?}");
        let _second = ack(&ctl, &["e", "t", "s"]);
        store.fail_next.store(1, SeqCst);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c2").unwrap().state, CircuitState::Active);
        assert_eq!(
            svc.get("c1").unwrap().state,
            CircuitState::Active,
            "not failed yet"
        );
        svc.settle_once().await.unwrap();
        assert!(failed_by_version_2(&svc.get("c1").unwrap()));
    }

    /// An apply committed, then the controller crashed before the circuits' follow-up: at
    /// start-up, the circuits the topology in force breaks are failed (and so are not left
    /// provisioning or active on a link that is gone).
    #[tokio::test]
    async fn circuits_a_committed_topology_breaks_fail_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Arc::new(RedbStore::open(dir.path()).unwrap());
            let _ = with_c1(store.clone()).await;
            // The apply's own transaction, and nothing after it.
            let text = yaml(POOL, false);
            let (topo, _) = crate::controller::validate(&text).unwrap();
            store::transaction(&*store, |tx| {
                records::commit_topology(tx, &text, &topo, "ops", "drop e–s", Origin::Apply)
            })
            .unwrap();
        }
        let store = FaultyStore::open(dir.path());
        let ctl = Controller::open(store.clone(), None).unwrap();
        assert_eq!(ctl.current().record.version, 2);
        let svc = CircuitService::new(ctl.clone(), DEFAULT_PROVISION_TIMEOUT).unwrap();
        let c = svc.get("c1").unwrap();
        assert!(failed_by_version_2(&c), "{c:?}");
        // Idempotent: starting again changes nothing, and writes nothing.
        let writes = store.writes.load(SeqCst);
        let _again = CircuitService::new(ctl.clone(), DEFAULT_PROVISION_TIMEOUT).unwrap();
        assert_eq!(svc.get("c1").unwrap(), c);
        assert_eq!(store.writes.load(SeqCst), writes);
    }

    /// The follow-up of an apply that runs after a newer version was committed (two applies
    /// in quick succession, a rollback) fails nothing: the newer version's own follow-up
    /// judges the circuits. (Version 2's follow-up failed c1 for a link version 3 has again,
    /// for good: a circuit failed by a topology waits for no acknowledgement.)
    #[tokio::test]
    async fn the_follow_up_of_an_apply_superseded_before_it_ran_fails_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::open(dir.path());
        let (ctl, svc) = with_c1(store.clone()).await;
        drop_es(&ctl).await;
        let v2 = ctl.current();
        assert_eq!(v2.record.version, 2);
        ctl.apply(
            &yaml(POOL, true),
            "ops",
            "e–s back",
            Origin::Apply,
            false,
            None,
        )
        .await
        .unwrap();
        let failed = fail_broken_durably(&*store, &v2.topology, 2).unwrap();
        assert_eq!(failed, []);
        assert_ne!(svc.get("c1").unwrap().state, CircuitState::Failed);
        svc.on_topology_applied().await.unwrap();
        assert_ne!(svc.get("c1").unwrap().state, CircuitState::Failed);
    }

    /// A circuit failed by a topology change goes to routers without its path (they send its
    /// traffic unreserved): routers drop a reserved path only when it is down or its site no
    /// longer serves, and know nothing of a circuit's regions.
    #[tokio::test]
    async fn a_circuit_whose_site_leaves_its_regions_is_shipped_without_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc) = service_on(dir.path(), &yaml(POOL, true), DEFAULT_PROVISION_TIMEOUT);
        let mut s = spec("c1", "10.1.0.0/24", "100Mbps");
        s.b_end.regions = vec![topology::Region::new("r")];
        svc.create(s, None, "ops".into()).await.unwrap();
        let _sessions = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Active);
        let shipped = super::super::provisioned(&svc.list().unwrap());
        assert_eq!(shipped[0].path, [NodeId::new("e"), NodeId::new("s")]);

        let moved = yaml(POOL, true).replace(
            "id: s, kind: site, region: r,",
            "id: s, kind: site, region: r2,",
        );
        assert_ne!(moved, yaml(POOL, true));
        apply_settled(&ctl, &svc, &moved, "s to r2").await;
        let c = svc.get("c1").unwrap();
        assert!(failed_by_version_2(&c), "{c:?}");
        assert!(
            c.reason
                .as_deref()
                .is_some_and(|r| r.contains("not among the circuit's regions")),
            "{c:?}"
        );
        // Still at its edge (classified, rate-limited), on no reserved path.
        let shipped = super::super::provisioned(&svc.list().unwrap());
        assert_eq!(shipped.len(), 1);
        assert!(shipped[0].path.is_empty(), "{:?}", shipped[0]);
        // Back in its regions: restored, on its path again.
        ctl.apply(
            &yaml(POOL, true),
            "ops",
            "s back",
            Origin::Apply,
            false,
            None,
        )
        .await
        .unwrap();
        svc.on_topology_applied().await.unwrap();
        let shipped = super::super::provisioned(&svc.list().unwrap());
        assert_eq!(shipped[0].path, [NodeId::new("e"), NodeId::new("s")]);
    }

    /// A topology that sets a node of a circuit's path down, removes its service, or leaves
    /// its site no longer serving (or allowed for) the service breaks the circuit as a removed
    /// link does: the apply plan says so, and the apply fails it naming the node or service.
    /// (They went unnoticed: the circuit stayed active while its traffic ran unreserved.)
    #[tokio::test]
    async fn a_node_down_or_a_site_no_longer_serving_fails_the_circuit() {
        let base = yaml(POOL, true);
        let site = "address: \"127.0.0.3:7000\"";
        let serves = "serves: [{service: chat, backend: \"127.0.0.9:9000\", capacity: 10}]";
        let service = "{name: chat, port: 8080}";
        assert!(base.contains(site) && base.contains(serves) && base.contains(service));
        // Another site serving chat, in NZ: a topology where no site serves a service, or its
        // residency allows none, is refused.
        let with_s2 = base.replace(
            "links:\n",
            "  - {id: s2, kind: site, region: r2, country: NZ, location: {lat: 0, lon: 0}, \
             address: \"127.0.0.4:7000\", serves: [{service: chat, backend: \"127.0.0.9:9001\", capacity: 10}]}\n\
             links:\n  - {a: t, b: s2, latency: 1ms, capacity: 1Gbps}\n",
        );
        let cases = [
            (
                base.replace(site, &format!("{site}, state: down")),
                "circuit c-000001 is reserved through node s, which would be down",
            ),
            (
                base.replace(
                    "address: \"127.0.0.1:7000\"",
                    "address: \"127.0.0.1:7000\", state: down",
                ),
                "circuit c-000001 is reserved through node e, which would be down",
            ),
            (
                with_s2
                    .replace(
                        service,
                        "{name: chat, port: 8080}\n  - {name: other, port: 8081}",
                    )
                    .replace(serves, &serves.replace("chat", "other")),
                "circuit c-000001 ends at site s, which would no longer serve chat",
            ),
            (
                base.replace(service, "{name: other, port: 8081}")
                    .replace(serves, &serves.replace("chat", "other")),
                "circuit c-000001 is for service chat, which the topology no longer has",
            ),
            (
                with_s2.replace(
                    service,
                    "{name: chat, port: 8080, residency: {countries: [NZ]}}",
                ),
                "circuit c-000001 ends at site s, which would no longer be allowed for chat: s (r, AU) is outside the service's residency",
            ),
        ];
        for (text, issue) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (ctl, svc, c, _sessions) = settled_c1(dir.path()).await;
            assert_eq!(c.state, CircuitState::Active);
            let dry = ctl
                .apply(&text, "ops", "change", Origin::Apply, true, None)
                .await
                .unwrap_or_else(|e| panic!("{issue}: {e}"));
            let listed: Vec<String> = dry.plan.circuits.iter().map(|i| i.to_string()).collect();
            assert_eq!(listed, [issue], "plan");
            assert!(dry.plan.text.contains(issue), "{}", dry.plan.text);
            apply_settled(&ctl, &svc, &text, "change").await;
            let c = svc.get("c1").unwrap();
            assert!(failed_by_version_2(&c), "{issue}: {c:?}");
            assert_eq!(
                c.reason.as_deref(),
                Some(format!("topology version 2: {issue}").as_str())
            );
        }
    }

    /// An apply that moves the pool and gives the service a VIP over a live circuit's VIP
    /// (the edge would classify those connections as the circuit's first, refusing the
    /// service's other clients there) shows it in the plan; the circuit is not failed for it
    /// (its VIP is its customer's address). (The plan said nothing.)
    #[tokio::test]
    async fn a_service_vip_over_a_circuit_vip_shows_in_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc, c, _sessions) = settled_c1(dir.path()).await;
        assert_eq!(c.vip, Some("127.79.0.1".parse().unwrap()));
        let text = yaml("127.80.0.0/28", true).replace(
            "{name: chat, port: 8080}",
            "{name: chat, port: 8080, vips: [\"127.79.0.0/28:8080\"]}",
        );
        let issue = "circuit c-000001's VIP 127.79.0.1:8080 is inside service chat's VIP \
                     127.79.0.0/28:8080: the edge would take those connections for the circuit";
        assert_eq!(planned(&ctl, &text).await, [issue], "plan");
        apply_settled(&ctl, &svc, &text, "move the pool").await;
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Active);
    }

    /// The same for an edge whose new `client_address` is a live circuit's VIP, with a service
    /// on the VIP's port: that listener's connections would be classified as the circuit's
    /// (the rest of the service's clients there refused). The plan said nothing of it.
    #[tokio::test]
    async fn a_client_address_on_a_circuit_vip_shows_in_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, _svc, c, _sessions) = settled_c1(dir.path()).await;
        assert_eq!(
            (c.vip, c.port),
            (Some("127.79.0.1".parse().unwrap()), Some(8080))
        );
        let text = yaml("127.80.0.0/28", true).replace(
            "client_address: \"127.0.0.1\"",
            "client_address: \"127.79.0.1\"",
        );
        let issue = "circuit c-000001's VIP 127.79.0.1:8080 would be edge e's client_address, \
                     where service chat listens on the same port: the edge would take that \
                     service's connections there for the circuit";
        assert_eq!(planned(&ctl, &text).await, [issue], "plan");
        // Another port on that address is no issue.
        let other_port = text.replace("{name: chat, port: 8080}", "{name: chat, port: 8081}");
        assert_eq!(planned(&ctl, &other_port).await, Vec::<String>::new());
    }

    /// The circuit problems the apply plan of `text` lists (a dry run).
    async fn planned(ctl: &Controller, text: &str) -> Vec<String> {
        let dry = ctl
            .apply(text, "ops", "plan", Origin::Apply, true, None)
            .await
            .unwrap();
        dry.plan.circuits.iter().map(|i| i.to_string()).collect()
    }

    /// c1 (100Mbps on e–s) and c2 (850Mbps) active, then c1 resized to 200Mbps: no longer
    /// fitting on e–s beside c2, it moves via t, holding e–s meanwhile. Returns c1 as resized,
    /// with the sessions that acknowledged e–s (keep them).
    async fn c1_moved_via_t(
        dir: &std::path::Path,
    ) -> (
        Arc<Controller>,
        Arc<CircuitService>,
        Circuit,
        Vec<RouterSession>,
    ) {
        let (ctl, svc) = with_c1(FaultyStore::open(dir)).await;
        svc.create(spec("c2", "10.2.0.0/24", "850Mbps"), None, "ops".into())
            .await
            .unwrap();
        let sessions = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        let c = svc
            .resize("c1".into(), "200Mbps".parse().unwrap(), "ops".into())
            .await
            .unwrap();
        assert_eq!(
            c.path,
            [NodeId::new("e"), NodeId::new("t"), NodeId::new("s")]
        );
        (ctl, svc, c, sessions)
    }

    /// A circuit moved by a resize holds its old path until the new one is acknowledged. A
    /// topology that breaks the old path releases what it holds there and leaves the circuit
    /// waiting for its new path, which then activates it. (It failed the circuit for good, and
    /// the old reservation was never released.)
    #[tokio::test]
    async fn a_break_on_the_path_a_resize_leaves_releases_it_and_fails_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc, c, _sessions) = c1_moved_via_t(dir.path()).await;
        assert!(c.held.is_some(), "{c:?}");
        // The plan says so: c2 (on e–s) breaks, c1 only leaves the path it held. (It listed c1
        // as reserved on a link the topology no longer has, as a circuit that fails.)
        let plan = planned(&ctl, &yaml(POOL, false)).await;
        assert!(plan.iter().any(|i| i.contains("c-000002")), "{plan:?}");
        assert!(plan.iter().all(|i| !i.contains("c-000001")), "{plan:?}");
        drop_es(&ctl).await;
        svc.on_topology_applied().await.unwrap();
        let c = svc.get("c1").unwrap();
        assert_eq!(
            (c.state, c.held.as_ref()),
            (CircuitState::Provisioning, None),
            "{c:?}"
        );
        assert!(failed_by_version_2(&svc.get("c2").unwrap()));
        let (_, history) = svc.history("c1").unwrap();
        let release = history.last().unwrap();
        assert_eq!(
            (release.action.as_str(), release.detail.as_str()),
            (
                "release",
                "topology version 2: released 100Mbps held on e -> s (the path a resize leaves): \
                 circuit c-000001 is reserved on link e--s, which the topology no longer has"
            )
        );
        let es = topology::LinkId::new(&NodeId::new("e"), &NodeId::new("s"));
        let reserved_on_es = super::super::reservations(&svc.list().unwrap())
            .iter()
            .filter(|r| r.circuit == c.id && topology::circuit::path_links(&r.path).contains(&es))
            .count();
        assert_eq!(reserved_on_es, 0);
        // Its new path's routers acknowledge: active at the new rate.
        let _new = ack(&ctl, &["e", "t", "s"]);
        svc.settle_once().await.unwrap();
        let c = svc.get("c1").unwrap();
        assert_eq!(
            (c.state, c.assigned_rate),
            (CircuitState::Active, Some("200Mbps".parse().unwrap()))
        );
    }

    /// A shrink holds the old rate's excess on the circuit's own path until its routers
    /// acknowledge the new rate. A topology that breaks that path fails the circuit, which keeps
    /// the excess like the rest of its reservation: an edge that has not heard of the shrink
    /// still sends at the old rate. (The break released the excess as if the circuit were
    /// moving off that path, and a new circuit could be admitted into it.)
    #[tokio::test]
    async fn a_break_on_a_shrunk_circuits_path_keeps_the_old_rates_excess() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc, c, _sessions) = settled_c1(dir.path()).await;
        assert_eq!(c.state, CircuitState::Active);
        let c = svc
            .resize("c1".into(), "40Mbps".parse().unwrap(), "ops".into())
            .await
            .unwrap();
        let held = c.held.clone().expect("the old rate's excess held");
        assert_eq!(held.path, c.path);
        drop_es(&ctl).await;
        svc.on_topology_applied().await.unwrap();
        let c = svc.get("c1").unwrap();
        assert!(failed_by_version_2(&c), "{c:?}");
        assert_eq!(c.held.as_ref(), Some(&held), "{c:?}");
        let (_, history) = svc.history("c1").unwrap();
        assert!(history.iter().all(|e| e.action != "release"), "{history:?}");
    }

    /// A circuit moved by a resize holds its old path until the new one is acknowledged. A
    /// topology that breaks only the new path fails the circuit, which keeps what it holds on
    /// the old one (intact) like the rest of its reservation, until it is deleted and
    /// decommissioned. (The hold vanished with the failure, and no `release` entry said so.)
    #[tokio::test]
    async fn a_break_on_the_path_a_resize_moves_to_keeps_the_hold_on_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc, c, _sessions) = c1_moved_via_t(dir.path()).await;
        let held = c.held.clone().expect("the old path held");
        // Version 2 removes t (and its links), leaving e–s.
        drop_t(&ctl).await;
        svc.on_topology_applied().await.unwrap();
        let c = svc.get("c1").unwrap();
        assert!(failed_by_version_2(&c), "{c:?}");
        assert_eq!(c.held.as_ref(), Some(&held), "{c:?}");
        let (_, history) = svc.history("c1").unwrap();
        assert_eq!(
            history
                .iter()
                .rev()
                .take(2)
                .map(|e| e.action.as_str())
                .collect::<Vec<_>>(),
            ["fail", "resize"]
        );
        let es = topology::LinkId::new(&NodeId::new("e"), &NodeId::new("s"));
        let room = topology::circuit::headroom(
            &ctl.current().topology,
            &super::super::reservations(&svc.list().unwrap()),
        );
        assert_eq!(
            (room[&es].reserved, room[&es].circuits),
            ("950Mbps".parse().unwrap(), 2)
        );
        // The same topology again changes nothing; a delete keeps the hold with the rest until
        // the routers still in the topology acknowledge the removal, which releases both.
        svc.on_topology_applied().await.unwrap();
        assert_eq!(svc.get("c1").unwrap(), c);
        let c = svc.delete("c1".into(), "ops".into()).await.unwrap();
        assert_eq!(c.held.as_ref(), Some(&held));
        let _removed = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        let c = svc.get("c1").unwrap();
        assert_eq!((c.state, c.held), (CircuitState::Decommissioned, None));
    }

    /// A topology removes the transit of a circuit's path (the circuit fails), and the operator
    /// deletes it: its removal waits for the routers still in the topology only, and is
    /// decommissioned once they acknowledge. (It waited for the removed transit, which is
    /// refused a control session, and stayed `decommissioning` for ever.)
    #[tokio::test]
    async fn a_removal_waits_for_no_router_the_topology_no_longer_has() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc) = service_on(dir.path(), &yaml(POOL, false), DEFAULT_PROVISION_TIMEOUT);
        let (c, _) = svc
            .create(spec("c1", "10.1.0.0/24", "100Mbps"), None, "ops".into())
            .await
            .unwrap();
        assert_eq!(
            c.path,
            [NodeId::new("e"), NodeId::new("t"), NodeId::new("s")]
        );
        let _first = ack(&ctl, &["e", "t", "s"]);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Active);
        // Version 2: no t (e–s instead).
        drop_t(&ctl).await;
        svc.on_topology_applied().await.unwrap();
        assert!(failed_by_version_2(&svc.get("c1").unwrap()));
        svc.delete("c1".into(), "ops".into()).await.unwrap();
        let _second = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        let (c, history) = svc.history("c1").unwrap();
        assert_eq!(c.state, CircuitState::Decommissioned);
        assert_eq!(
            history.last().unwrap().detail,
            format!(
                "removal acknowledged by e, s in snapshot {} (t no longer in the topology); \
                 capacity 100Mbps and VIP released",
                ctl.published().version
            )
        );
        assert!(lock(&svc.pending).is_empty());
    }

    /// A router still in the topology that never acknowledges a circuit's removal (stopped for
    /// good) holds it `decommissioning` for the acknowledgement timeout at most: then it is
    /// `decommissioned`, its history naming the router. (It stayed `decommissioning` for ever.)
    #[tokio::test]
    async fn a_removal_not_acknowledged_in_time_is_decommissioned_anyway() {
        let dir = tempfile::tempdir().unwrap();
        // Every acknowledgement is overdue at once.
        let (ctl, svc) = service_on(dir.path(), &yaml(POOL, true), Duration::ZERO);
        svc.create(spec("c1", "10.1.0.0/24", "100Mbps"), None, "ops".into())
            .await
            .unwrap();
        let _first = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Active);
        svc.delete("c1".into(), "ops".into()).await.unwrap();
        let _second = ack(&ctl, &["e"]);
        svc.settle_once().await.unwrap();
        let (c, history) = svc.history("c1").unwrap();
        assert_eq!(c.state, CircuitState::Decommissioned);
        let last = history.last().unwrap();
        assert_eq!(
            (last.action.as_str(), last.detail.as_str()),
            (
                "decommission",
                format!(
                    "removal not acknowledged by s within 0 s (snapshot {}); decommissioned \
                     without them; capacity 100Mbps and VIP released",
                    ctl.published().version
                )
                .as_str()
            )
        );
        assert!(lock(&svc.pending).is_empty());
    }

    /// Whether `err` is a refusal for want of capacity.
    fn no_capacity(err: &ServiceError) -> bool {
        matches!(
            err,
            ServiceError::Circuit(CircuitError::Placement(
                topology::circuit::PlacementError::InsufficientCapacity(_)
                    | topology::circuit::PlacementError::ExceedsCapacity { .. }
            ))
        )
    }

    /// c1 (600Mbps, on e -> t -> s: the only path, 1Gbps a link) active on `svc`, then
    /// deleted: decommissioning, its routers not having acknowledged its removal. Returns it,
    /// with the sessions that acknowledged its creation (keep them).
    async fn c1_deleted_at_600(
        ctl: &Controller,
        svc: &Arc<CircuitService>,
    ) -> (Circuit, Vec<RouterSession>) {
        svc.create(spec("c1", "10.1.0.0/24", "600Mbps"), None, "ops".into())
            .await
            .unwrap();
        let sessions = ack(ctl, &["e", "t", "s"]);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Active);
        let c1 = svc.delete("c1".into(), "ops".into()).await.unwrap();
        assert_eq!(c1.state, CircuitState::Decommissioning);
        (c1, sessions)
    }

    /// A deleted circuit keeps its capacity and its VIP until it is decommissioned: routers
    /// that have not acknowledged its removal (an edge cut off from the controller, on its last
    /// snapshot) still carry it. While it is decommissioning, a create or a resize that needs
    /// its capacity is refused, and a create that fits gets another VIP; it is out of the
    /// snapshot, the apply plan does not list it, and an apply does not fail it. Once the
    /// routers acknowledge its removal, the capacity and the VIP are free again. (Both were
    /// free at the delete: a second 600Mbps circuit was admitted on a 1Gbps link the deleted
    /// one still flowed on, and the next create got its VIP.)
    #[tokio::test]
    async fn a_deleted_circuit_holds_its_capacity_and_vip_until_decommissioned() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc) = service_on(dir.path(), &yaml(POOL, false), DEFAULT_PROVISION_TIMEOUT);
        let (c1, _first) = c1_deleted_at_600(&ctl, &svc).await;
        let err = svc
            .create(spec("c2", "10.2.0.0/24", "600Mbps"), None, "ops".into())
            .await
            .expect_err("600Mbps admitted beside the 600Mbps c1 still holds");
        assert!(no_capacity(&err), "{err}");
        let (c2, _) = svc
            .create(spec("c2", "10.2.0.0/24", "300Mbps"), None, "ops".into())
            .await
            .unwrap();
        assert_ne!(c2.vip, c1.vip, "c2 got the VIP c1 still holds");
        let err = svc
            .resize("c2".into(), "500Mbps".parse().unwrap(), "ops".into())
            .await
            .expect_err("a resize into what c1 still holds");
        assert!(no_capacity(&err), "{err}");
        // Out of the routers' snapshot (it holds, it is not carried).
        let carried: Vec<CircuitId> = ctl
            .published()
            .circuits
            .iter()
            .map(|p| p.id.clone())
            .collect();
        assert_eq!(carried, std::slice::from_ref(&c2.id));
        // A link shrunk under what c1 holds: the plan names no circuit (c2 fits), and the
        // apply fails nothing, c1 still awaiting its routers.
        let shrunk = yaml(POOL, false).replacen("capacity: 1Gbps", "capacity: 700Mbps", 1);
        assert_eq!(planned(&ctl, &shrunk).await, Vec::<String>::new());
        apply_settled(&ctl, &svc, &shrunk, "shrink").await;
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Decommissioning);
        assert_eq!(svc.get("c2").unwrap().state, CircuitState::Provisioning);
        // The routers acknowledge: c1 is decommissioned, its capacity and VIP free again.
        let _second = ack(&ctl, &["e", "t", "s"]);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Decommissioned);
        let (c3, _) = svc
            .create(spec("c3", "10.3.0.0/24", "400Mbps"), None, "ops".into())
            .await
            .unwrap_or_else(|e| panic!("c1's capacity still held: {e}"));
        assert_eq!(c3.vip, c1.vip, "the lowest free VIP: c1's, released");
        let (_, history) = svc.history("c1").unwrap();
        let delete = history.iter().find(|e| e.action == "delete").unwrap();
        assert_eq!(
            delete.detail,
            "capacity 600Mbps and VIP held until the routers acknowledge the removal (or the \
             acknowledgement timeout passes)"
        );
    }

    /// A deleted circuit whose removal is not acknowledged in time is decommissioned anyway,
    /// and then its capacity is free again.
    #[tokio::test]
    async fn a_removal_not_acknowledged_in_time_frees_the_capacity_once_expired() {
        let dir = tempfile::tempdir().unwrap();
        // Every acknowledgement is overdue at once.
        let (ctl, svc) = service_on(dir.path(), &yaml(POOL, false), Duration::ZERO);
        let _first = c1_deleted_at_600(&ctl, &svc).await;
        let err = svc
            .create(spec("c2", "10.2.0.0/24", "600Mbps"), None, "ops".into())
            .await
            .expect_err("600Mbps admitted beside the 600Mbps c1 still holds");
        assert!(no_capacity(&err), "{err}");
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Decommissioned);
        svc.create(spec("c2", "10.2.0.0/24", "600Mbps"), None, "ops".into())
            .await
            .unwrap_or_else(|e| panic!("c1's capacity still held: {e}"));
    }

    /// A removal whose publications fail is not expired: no router has been told, so the
    /// circuit's capacity and VIP stay held until a snapshot without it goes out, and its
    /// acknowledgement timeout counts from that one. (It was decommissioned "never published" at
    /// the timeout, its capacity free with every router still carrying it.)
    #[tokio::test]
    async fn a_removal_not_published_yet_is_not_expired() {
        let dir = tempfile::tempdir().unwrap();
        // Every acknowledgement is overdue at once.
        let (ctl, svc) = service_on(dir.path(), &yaml(POOL, false), Duration::ZERO);
        svc.create(spec("c1", "10.1.0.0/24", "600Mbps"), None, "ops".into())
            .await
            .unwrap();
        let _sessions = ack(&ctl, &["e", "t", "s"]);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Active);
        svc.fail_publish.store(usize::MAX, SeqCst);
        svc.delete("c1".into(), "ops".into()).await.unwrap();
        svc.settle_once().await.unwrap();
        assert_eq!(
            svc.get("c1").unwrap().state,
            CircuitState::Decommissioning,
            "expired before any snapshot carried the removal"
        );
        let err = svc
            .create(spec("c2", "10.2.0.0/24", "600Mbps"), None, "ops".into())
            .await
            .expect_err("600Mbps admitted beside the 600Mbps c1 still holds");
        assert!(no_capacity(&err), "{err}");
        // Published at last: then overdue at once (no router acknowledges here).
        svc.fail_publish.store(0, SeqCst);
        svc.settle_once().await.unwrap();
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Decommissioned);
    }

    /// c1 (300Mbps) on e -> t -> s moved by a resize to 900Mbps on e -> s (c2, 600Mbps, leaves
    /// too little there), holding its old path, and deleted before any router acknowledged the
    /// move. Returns the sessions that acknowledged the circuits before the resize (keep them).
    async fn c1_deleted_while_moving(
        ctl: &Controller,
        svc: &Arc<CircuitService>,
    ) -> Vec<RouterSession> {
        // c0 fills e–s for a while: c1 and c2 go via t.
        svc.create(spec("c0", "10.9.0.0/24", "800Mbps"), None, "ops".into())
            .await
            .unwrap();
        for (name, prefix, rate) in [
            ("c1", "10.1.0.0/24", "300Mbps"),
            ("c2", "10.2.0.0/24", "600Mbps"),
        ] {
            let (c, _) = svc
                .create(spec(name, prefix, rate), None, "ops".into())
                .await
                .unwrap();
            assert_eq!(
                c.path,
                [NodeId::new("e"), NodeId::new("t"), NodeId::new("s")]
            );
        }
        svc.delete("c0".into(), "ops".into()).await.unwrap();
        let sessions = ack(ctl, &["e", "t", "s"]);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c0").unwrap().state, CircuitState::Decommissioned);
        let c1 = svc
            .resize("c1".into(), "900Mbps".parse().unwrap(), "ops".into())
            .await
            .unwrap();
        assert_eq!(c1.path, [NodeId::new("e"), NodeId::new("s")]);
        let held = crate::circuits::Held {
            path: vec![NodeId::new("e"), NodeId::new("t"), NodeId::new("s")],
            rate: "300Mbps".parse().unwrap(),
        };
        assert_eq!(c1.held.as_ref(), Some(&held));
        let c1 = svc.delete("c1".into(), "ops".into()).await.unwrap();
        assert_eq!(c1.state, CircuitState::Decommissioning);
        sessions
    }

    /// A circuit deleted in the middle of a move (a resize no router acknowledged yet, the edge
    /// cut off, say) still holds its old path until it is decommissioned: routers may still
    /// send it there. A create that needs that capacity is refused, and the removal waits for
    /// the old path's routers too; once they acknowledge, it fits. (The delete dropped the
    /// hold: a 400Mbps circuit was admitted on e–t–s beside the 300Mbps c1 still held there,
    /// and the removal was decommissioned without waiting for t.)
    #[tokio::test]
    async fn a_circuit_deleted_while_moving_holds_its_old_path_until_decommissioned() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc) = service_on(dir.path(), &yaml(POOL, true), DEFAULT_PROVISION_TIMEOUT);
        let _first = c1_deleted_while_moving(&ctl, &svc).await;
        // e–s: 900Mbps of c1's new path; e–t–s: c2's 600Mbps and the 300Mbps c1 held there.
        let err = svc
            .create(spec("c3", "10.3.0.0/24", "400Mbps"), None, "ops".into())
            .await
            .expect_err("400Mbps admitted beside the old path c1 still holds");
        assert!(no_capacity(&err), "{err}");
        let c1 = svc.get("c1").unwrap();
        assert_eq!(
            c1.held.as_ref().map(|h| h.rate.to_string()),
            Some("300Mbps".into()),
            "{c1:?}"
        );
        // The routers of c1's new path acknowledge its removal; t, on the old one, does not.
        let _second = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Decommissioning);
        let err = svc
            .create(spec("c3", "10.3.0.0/24", "400Mbps"), None, "ops".into())
            .await
            .expect_err("400Mbps admitted before t acknowledged c1's removal");
        assert!(no_capacity(&err), "{err}");
        let _third = ack(&ctl, &["t"]);
        svc.settle_once().await.unwrap();
        let (c1, history) = svc.history("c1").unwrap();
        assert_eq!(
            (c1.state, c1.held.as_ref()),
            (CircuitState::Decommissioned, None)
        );
        let version = ctl.published().version;
        let details: Vec<&str> = history
            .iter()
            .rev()
            .take(2)
            .map(|e| e.detail.as_str())
            .collect();
        assert_eq!(
            details,
            [
                format!(
                    "removal acknowledged by e, s, t in snapshot {version}; capacity 900Mbps and \
                     VIP released; released 300Mbps held on e -> t -> s by a resize"
                ),
                "capacity 900Mbps, and 300Mbps held on e -> t -> s by a resize, and VIP held \
                 until the routers acknowledge the removal (or the acknowledgement timeout \
                 passes)"
                    .to_string(),
            ]
        );
        svc.create(spec("c3", "10.3.0.0/24", "400Mbps"), None, "ops".into())
            .await
            .unwrap_or_else(|e| panic!("c1's old path still held: {e}"));
    }

    /// A topology change that breaks the old path a circuit deleted mid-move still holds
    /// neither fails the circuit nor releases the hold (a decommissioning circuit is leaving:
    /// an apply leaves it alone); its removal then waits for no router the topology no longer
    /// has. (With the hold kept through decommissioning, the apply released it, with a
    /// `release` entry.)
    #[tokio::test]
    async fn an_apply_breaking_the_old_path_of_a_circuit_deleted_while_moving_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc) = service_on(dir.path(), &yaml(POOL, true), DEFAULT_PROVISION_TIMEOUT);
        let _first = c1_deleted_while_moving(&ctl, &svc).await;
        let before = svc.get("c1").unwrap();
        drop_t(&ctl).await;
        svc.on_topology_applied().await.unwrap();
        assert_eq!(svc.get("c1").unwrap(), before);
        assert!(failed_by_version_2(&svc.get("c2").unwrap()));
        let _second = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        let (c1, history) = svc.history("c1").unwrap();
        assert_eq!(c1.state, CircuitState::Decommissioned);
        assert_eq!(
            actions(&history),
            [
                "create",
                "place",
                "activate",
                "resize",
                "delete",
                "decommission"
            ]
        );
    }

    /// A circuit over two 31 s links (each accepted by validation) has a path latency of 62 s,
    /// above what an operator may write for one link: its record is read back, so listing
    /// circuits, an apply (which plans with them) and a restart of the service still work.
    /// (The record's "62s" could not be read back: every read of the circuits table failed as
    /// corrupt, and the controller could not start again.)
    #[tokio::test]
    async fn a_circuit_whose_path_latency_is_above_a_links_limit_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let slow = yaml(POOL, false).replace("latency: 1ms", "latency: 31s");
        assert_eq!(slow.matches("latency: 31s").count(), 2);
        let (ctl, svc) = service_on(dir.path(), &slow, DEFAULT_PROVISION_TIMEOUT);
        let (c, created) = svc
            .create(spec("c1", "10.1.0.0/24", "100Mbps"), None, "ops".into())
            .await
            .unwrap();
        assert!(created);
        assert_eq!(c.latency, Some(topology::Latency::from_micros(62_000_000)));
        let listed = svc.list().unwrap();
        assert_eq!(listed, std::slice::from_ref(&c));
        ctl.apply(
            &slow.replace("capacity: 1Gbps", "capacity: 2Gbps"),
            "ops",
            "more capacity",
            Origin::Apply,
            false,
            None,
        )
        .await
        .unwrap();
        svc.on_topology_applied().await.unwrap();
        let restarted = CircuitService::new(ctl.clone(), DEFAULT_PROVISION_TIMEOUT).unwrap();
        assert_eq!(restarted.get("c1").unwrap(), c);
    }

    /// When failing the circuits an apply broke fails (the store refused), the settle loop's
    /// next pass does it.
    #[tokio::test]
    async fn a_failed_follow_up_of_an_apply_is_retried_by_the_next_settle_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::open(dir.path());
        let (ctl, svc) = with_c1(store.clone()).await;
        drop_es(&ctl).await;
        store.fail.store(true, SeqCst);
        assert!(svc.on_topology_applied().await.is_err());
        store.fail.store(false, SeqCst);
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Provisioning);
        svc.settle_once().await.unwrap();
        let c = svc.get("c1").unwrap();
        assert!(failed_by_version_2(&c), "{c:?}");
        // Done once: later passes do not run it again.
        let writes = store.writes.load(SeqCst);
        svc.settle_once().await.unwrap();
        assert_eq!(store.writes.load(SeqCst), writes);
    }

    /// Circuit operations, their publication and settle passes use the store (and encode
    /// snapshots) on blocking threads, never on a worker of the runtime, whose workers also
    /// serve routers' control sessions and the admin API: here, never on the test's own thread,
    /// the one worker of its runtime. (A publication read every circuit and encoded the snapshot
    /// on the worker that ran the operation, and a settle pass read the pending circuits there.)
    #[tokio::test]
    async fn circuit_operations_use_the_store_off_the_runtimes_workers() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::open(dir.path());
        let ctl = Controller::open(store.clone(), Some((&yaml(POOL, true), "t.yaml"))).unwrap();
        let svc = CircuitService::new(ctl.clone(), DEFAULT_PROVISION_TIMEOUT).unwrap();
        let worker = std::thread::current().name().unwrap().to_string();
        // Each step since the last (opening, the test's own reads and its topology apply use
        // the store where they are called).
        let off_workers = |step: &str| {
            let threads = store.threads();
            assert!(!threads.is_empty(), "{step}: the store was not used");
            assert!(
                !threads.contains(&worker),
                "{step}: the store was used on the runtime's worker {worker:?}: {threads:?}"
            );
        };
        store.reset_threads();
        svc.create(spec("c1", "10.1.0.0/24", "100Mbps"), None, "ops".into())
            .await
            .unwrap();
        off_workers("create");
        let _acks = ack(&ctl, &["e", "s"]);
        store.reset_threads();
        svc.settle_once().await.unwrap();
        off_workers("settle");
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Active);
        store.reset_threads();
        svc.resize("c1".into(), "200Mbps".parse().unwrap(), "ops".into())
            .await
            .unwrap();
        svc.settle_once().await.unwrap();
        off_workers("resize and settle");
        // A publication that failed is published again by the next pass.
        svc.fail_publish.store(1, SeqCst);
        svc.delete("c1".into(), "ops".into()).await.unwrap();
        svc.settle_once().await.unwrap();
        off_workers("delete and publish again");
        drop_t(&ctl).await;
        store.reset_threads();
        svc.on_topology_applied().await.unwrap();
        off_workers("after a topology apply");
    }

    /// A controller that starts with stored circuits it cannot publish (a snapshot over the
    /// routers' limit after an upgrade, a store read error) serves no router a version without
    /// them until a publication carries them: every router kept its circuits' VIPs only until
    /// it reconnected, then was served the start's version, with no circuits, and dropped them.
    #[tokio::test]
    async fn a_start_that_cannot_publish_its_circuits_serves_routers_none_without_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_ctl, svc) = service_on(dir.path(), &yaml(POOL, true), DEFAULT_PROVISION_TIMEOUT);
            svc.create(spec("c1", "10.1.0.0/24", "100Mbps"), None, "ops".into())
                .await
                .unwrap();
        }
        let ctl = Controller::open(FaultyStore::open(dir.path()), None).unwrap();
        // Room for the snapshot without circuits only.
        ctl.set_snapshot_limit(ctl.published().full.len() - 4 + 1);
        let svc = CircuitService::new(ctl.clone(), DEFAULT_PROVISION_TIMEOUT).unwrap();
        let p = ctl.published();
        assert!(p.circuits.is_empty());
        assert!(
            !p.with_circuits,
            "version {} is served to routers",
            p.version
        );
        ctl.set_snapshot_limit(router::control::proto::MAX_TO_ROUTER);
        svc.settle_once().await.unwrap();
        let p = ctl.published();
        assert!(
            p.with_circuits && p.circuits.len() == 1,
            "{}",
            p.circuits.len()
        );
    }

    /// A create or resize with which the routers' snapshot would be over their frame limit is
    /// refused (409) and not committed: nothing stored, nothing published, the circuit keeps
    /// its rate; within the limit the same changes go through. (The create was committed and
    /// answered as made, then never published: each pass failed it again until the
    /// provisioning timeout marked it failed.)
    #[tokio::test]
    async fn a_circuit_change_the_routers_snapshot_could_not_carry_is_refused_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc) = service_on(dir.path(), &yaml(POOL, true), DEFAULT_PROVISION_TIMEOUT);
        let size = || ctl.published().full.len() - 4;
        let c1 = || spec("c1", "10.1.0.0/24", "100Mbps");
        // Room for the snapshot as it is, not for a circuit more.
        ctl.set_snapshot_limit(size() + 10);
        let before = ctl.published().version;
        let err = svc.create(c1(), None, "ops".into()).await.unwrap_err();
        assert!(
            matches!(err, ServiceError::Circuit(CircuitError::TooLarge { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("not made"), "{err}");
        let api = crate::admin::ApiError::from(err);
        assert_eq!(api.status, axum::http::StatusCode::CONFLICT);
        assert!(svc.list().unwrap().is_empty(), "committed");
        assert_eq!(ctl.published().version, before, "published");

        // A validate says so too, at the very limit a create has: the smallest limit it passes
        // at is the smallest the create passes at. (It passed, and the create it vouched for
        // was refused.)
        let err = svc.validate(&c1()).unwrap_err();
        assert!(
            matches!(err, ServiceError::Circuit(CircuitError::TooLarge { .. })),
            "{err}"
        );
        let least = (size()..size() + 4096)
            .find(|&limit| {
                ctl.set_snapshot_limit(limit);
                svc.validate(&c1()).is_ok()
            })
            .expect("a limit validate passes at");
        ctl.set_snapshot_limit(least - 1);
        assert!(svc.create(c1(), None, "ops".into()).await.is_err());
        ctl.set_snapshot_limit(least);
        let (made, _) = svc.create(c1(), None, "ops".into()).await.unwrap();
        svc.delete(made.id.to_string(), "ops".into()).await.unwrap();
        svc.settle_once().await.unwrap();

        ctl.set_snapshot_limit(router::control::proto::MAX_TO_ROUTER);
        let (c, created) = svc.create(c1(), None, "ops".into()).await.unwrap();
        assert!(created);
        // Room for the snapshot with c1 as it is, as the check counts it (a version number of
        // 20 digits, the longest; the live state at its largest): "100.5Mbps" is two bytes
        // longer, "50Mbps" one shorter.
        ctl.set_snapshot_limit(ctl.checked_len());
        let before = ctl.published().version;
        let err = svc
            .resize("c1".into(), "100.5Mbps".parse().unwrap(), "ops".into())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ServiceError::Circuit(CircuitError::TooLarge { .. })),
            "{err}"
        );
        let now = svc.get("c1").unwrap();
        assert_eq!(
            (now.requested_rate, now.revision),
            (c.requested_rate, c.revision),
            "committed"
        );
        assert_eq!(ctl.published().version, before, "published");
        // Smaller fits.
        let now = svc
            .resize("c1".into(), "50Mbps".parse().unwrap(), "ops".into())
            .await
            .unwrap();
        assert_eq!(now.requested_rate, "50Mbps".parse().unwrap());
    }

    /// A create whose publication fails after its transaction committed is answered (it stands,
    /// durably), and the next settle pass publishes it: routers get it, and their
    /// acknowledgement of that snapshot activates it. (The create answered an error, and the
    /// circuit, left out of the pending set, stayed provisioning and unpublished until a
    /// restart.)
    #[tokio::test]
    async fn a_circuit_whose_publication_failed_is_published_by_the_next_pass() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc) = service_on(dir.path(), &yaml(POOL, true), DEFAULT_PROVISION_TIMEOUT);
        let before = ctl.published().version;
        svc.fail_publish.store(1, SeqCst);
        let (c, created) = svc
            .create(spec("c1", "10.1.0.0/24", "100Mbps"), None, "ops".into())
            .await
            .unwrap();
        assert!(created);
        assert_eq!(
            ctl.published().version,
            before,
            "published despite the failure"
        );
        assert!(ctl.published().circuits.is_empty());
        // Routers acknowledging the snapshot that lacks it do not activate it.
        let _old = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        assert!(ctl.published().circuits.iter().any(|p| p.id == c.id));
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Provisioning);
        let _new = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Active);
        assert!(lock(&svc.pending).is_empty());
    }

    /// A circuit change made while the store holds a topology version the controller has not
    /// switched to yet waits for the switch, writing nothing meanwhile, and is then made
    /// against that version. (It committed an empty transaction, an fsync, every 20 ms, and
    /// gave up after 400 ms with a 500 saying the topology "kept changing".)
    #[tokio::test]
    async fn a_circuit_change_waits_for_a_committed_topology_to_be_in_force_writing_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::open(dir.path());
        let (ctl, svc) = with_c1(store.clone()).await;
        // Version 2 committed behind the controller's back: in the store, not in force.
        let (text, topo) = (yaml(POOL, true) + "# v2\n", ctl.current().topology.clone());
        store::transaction(&*store, |tx| {
            records::commit_topology(tx, &text, &topo, "ops", "", Origin::Apply)
        })
        .unwrap();
        let writes = store.writes.load(SeqCst);
        let s2 = svc.clone();
        let create = tokio::spawn(async move {
            s2.create(spec("c2", "10.2.0.0/24", "1Mbps"), None, "ops".into())
                .await
        });
        // Long enough for the retries the old loop made (one every 20 ms).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!create.is_finished(), "{:?}", create.await);
        // One transaction, aborted on the version; none while waiting.
        assert_eq!(
            store.writes.load(SeqCst),
            writes + 1,
            "retried while waiting"
        );
        // The controller switches (an apply of version 3), and the change is made.
        let v3 = yaml(POOL, true) + "# v3\n";
        ctl.apply(&v3, "ops", "", Origin::Apply, false, None)
            .await
            .unwrap();
        let (c, created) = create.await.unwrap().unwrap();
        assert!(created);
        assert_eq!(c.name, "c2");
        assert_eq!(ctl.current().record.version, 3);
    }

    /// Two changes of one circuit whose publications run in the other order than their
    /// commits: the later revision is the one waited for, and the circuit settles. (The earlier
    /// one's entry replaced it: every settle pass skipped the circuit, which stayed
    /// `provisioning` until a restart.)
    #[tokio::test]
    async fn a_late_publication_of_an_earlier_revision_does_not_replace_the_later() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc) = with_c1(FaultyStore::open(dir.path())).await;
        let _sessions = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        let first = svc
            .resize("c1".into(), Bandwidth::from_mbps(200), "a".into())
            .await
            .unwrap();
        let _sessions = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        let second = svc
            .resize("c1".into(), Bandwidth::from_mbps(300), "b".into())
            .await
            .unwrap();
        assert!(second.revision > first.revision);
        // The first change's publication comes last.
        svc.publish(std::slice::from_ref(&first)).unwrap();
        assert_eq!(lock(&svc.pending)[&second.id].revision, second.revision);
        let _sessions = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        let c = svc.get("c1").unwrap();
        assert_eq!(c.state, CircuitState::Active, "{c:?}");
        assert!(lock(&svc.pending).is_empty());
    }

    /// The answer to a change that could not wait longer is a 503 with `Retry-After`.
    #[test]
    fn busy_is_answered_503_with_retry_after() {
        use axum::response::IntoResponse;
        let r = crate::admin::ApiError::from(ServiceError::Busy("x".into())).into_response();
        assert_eq!(r.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "1");
    }

    /// A controller whose stored circuits it cannot publish at start (the snapshot would be
    /// over the routers' limit) still starts: routers keep the snapshot they have, the
    /// operator can delete circuits or roll the topology back through the API, and the next
    /// settle pass publishes once the snapshot fits. (The service refused to start, and with it
    /// the controller: nothing could be changed until the store was edited by hand.)
    #[tokio::test]
    async fn circuits_too_large_to_publish_at_start_do_not_stop_the_controller() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::open(dir.path());
        let (ctl, _svc) = with_c1(store.clone()).await;
        let limit = ctl.published().full.len() - 8;
        drop((ctl, _svc));
        let ctl = Controller::open(store, None).unwrap();
        ctl.set_snapshot_limit(limit);
        let svc = CircuitService::new(ctl.clone(), DEFAULT_PROVISION_TIMEOUT)
            .expect("starts with circuits it cannot publish yet");
        assert!(ctl.published().circuits.is_empty());
        svc.settle_once().await.unwrap();
        assert!(ctl.published().circuits.is_empty(), "still too large");
        ctl.set_snapshot_limit(router::control::proto::MAX_TO_ROUTER);
        svc.settle_once().await.unwrap();
        assert_eq!(ctl.published().circuits.len(), 1);
    }

    /// A circuit no publication carried within the provisioning timeout fails, saying so, and
    /// still becomes active once a publication carries it and its routers acknowledge it.
    #[tokio::test]
    async fn a_circuit_never_published_in_time_fails_and_recovers_once_published() {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, svc) = service_on(dir.path(), &yaml(POOL, true), Duration::ZERO);
        // The create's publication and the first pass's both fail.
        svc.fail_publish.store(2, SeqCst);
        svc.create(spec("c1", "10.1.0.0/24", "100Mbps"), None, "ops".into())
            .await
            .unwrap();
        let _acks = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        let c = svc.get("c1").unwrap();
        assert_eq!(c.state, CircuitState::Failed);
        assert_eq!(
            c.reason.as_deref(),
            Some("not acknowledged by e, s (never published)")
        );
        assert!(ctl.published().circuits.is_empty());
        svc.settle_once().await.unwrap();
        assert_eq!(ctl.published().circuits.len(), 1);
        let _acks = ack(&ctl, &["e", "s"]);
        svc.settle_once().await.unwrap();
        assert_eq!(svc.get("c1").unwrap().state, CircuitState::Active);
    }

    /// A resize or a delete by name while that name moves to another circuit (the one it found
    /// is deleted and a new one created under its name before the operation's transaction)
    /// publishes what it changed, and awaits its acknowledgement: whether it changed something
    /// is what its transaction did, not a comparison of the revisions of two circuits. (The
    /// revision of the circuit the name found first was compared with the new one's: equal,
    /// the change was neither published nor awaited.)
    #[tokio::test]
    async fn a_resize_or_delete_by_a_name_that_moved_publishes_what_it_changed() {
        for op in ["resize", "delete"] {
            let dir = tempfile::tempdir().unwrap();
            let (ctl, svc, old, _acks) = settled_c1(dir.path()).await;
            assert_eq!(old.state, CircuitState::Active);
            let ctl2 = ctl.clone();
            *lock(&svc.before_write) = Some(Box::new(move || {
                let topo = ctl2.current().topology.clone();
                let new = spec("c1", "10.9.0.0/24", "100Mbps");
                store::transaction(&**ctl2.store(), |tx| {
                    super::super::delete(tx, "c1", "ops")?;
                    super::super::create(tx, &topo, &new, None, "ops")
                })
                .unwrap();
            }));
            let c = match op {
                "resize" => {
                    svc.resize("c1".into(), "200Mbps".parse().unwrap(), "ops".into())
                        .await
                }
                _ => svc.delete("c1".into(), "ops".into()).await,
            }
            .unwrap();
            assert_ne!(c.id, old.id, "{op}");
            assert_eq!(
                c.revision, old.revision,
                "{op}: revisions equal, the case at hand"
            );
            let pending = lock(&svc.pending).get(&c.id).map(|p| p.revision);
            assert_eq!(pending, Some(c.revision), "{op}: its change is not awaited");
            let published: Vec<_> = ctl
                .published()
                .circuits
                .iter()
                .map(|p| (p.id.clone(), p.rate))
                .collect();
            let want = match op {
                "resize" => vec![(c.id.clone(), "200Mbps".parse().unwrap())],
                _ => vec![],
            };
            assert_eq!(published, want, "{op}: not published");
        }
    }

    /// The acknowledgement timeout counts from the publication that carried the change, not
    /// from a failed one before it: a circuit whose first publication failed is not failed at
    /// once when a later one carries it, and is once its routers have not acknowledged that
    /// one within the timeout. (The wait was counted from the failed publication.)
    #[tokio::test]
    async fn the_acknowledgement_timeout_counts_from_the_publication_that_carried_the_change() {
        let dir = tempfile::tempdir().unwrap();
        let timeout = Duration::from_millis(500);
        let (ctl, svc) = service_on(dir.path(), &yaml(POOL, true), timeout);
        svc.fail_publish.store(1, SeqCst);
        let (c, _) = svc
            .create(spec("c1", "10.1.0.0/24", "100Mbps"), None, "ops".into())
            .await
            .unwrap();
        tokio::time::sleep(timeout + Duration::from_millis(100)).await;
        // This pass publishes it: its routers have had it for no time at all.
        svc.settle_once().await.unwrap();
        assert!(ctl.published().circuits.iter().any(|p| p.id == c.id));
        let c = svc.get("c1").unwrap();
        assert_eq!(c.state, CircuitState::Provisioning, "{c:?}");
        // Then failed, once the timeout has passed since that publication.
        let deadline = std::time::Instant::now() + 20 * timeout;
        let c = loop {
            svc.settle_once().await.unwrap();
            let c = svc.get("c1").unwrap();
            if c.state != CircuitState::Provisioning || std::time::Instant::now() > deadline {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(c.state, CircuitState::Failed);
        assert_eq!(
            c.reason,
            Some(format!(
                "not acknowledged by e, s (snapshot {})",
                ctl.published().version
            ))
        );
    }
}
