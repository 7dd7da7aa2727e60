//! The circuits runtime inside the controller: runs each operation as one durable store
//! transaction (off the async threads), republishes the snapshot when the set of provisioned
//! circuits changes, and watches routers' acknowledgements to move circuits to `active` (or
//! `decommissioned`), or to `failed` when the path's routers do not acknowledge in time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use topology::circuit::CircuitId;
use topology::{Bandwidth, NodeId, Topology};

use super::{Admission, Circuit, CircuitError, CircuitSpec, CircuitState, HistoryEntry};
use crate::controller::{Controller, ControllerError, records};
use crate::store::{self, StoreError};

/// How long routers have to acknowledge a circuit before it is marked `failed` (it still
/// becomes `active` if they acknowledge later).
pub const DEFAULT_PROVISION_TIMEOUT: Duration = Duration::from_secs(60);
/// How often acknowledgements are checked.
const SETTLE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Circuit(#[from] CircuitError),
    #[error(transparent)]
    Controller(#[from] ControllerError),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        ServiceError::Circuit(CircuitError::Store(e))
    }
}

/// Pending acknowledgement: the snapshot version that first carried the circuit's current
/// revision, and when it was published.
#[derive(Debug, Clone, Copy)]
struct Pending {
    revision: u64,
    version: u64,
    since: Instant,
}

pub struct CircuitService {
    ctl: Arc<Controller>,
    pending: Mutex<BTreeMap<CircuitId, Pending>>,
    provision_timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CircuitService {
    /// Starts tracking the circuits in the store: those still provisioning or decommissioning
    /// wait for acknowledgement of the controller's current snapshot (which carries them).
    pub fn new(
        ctl: Arc<Controller>,
        provision_timeout: Duration,
    ) -> Result<Arc<Self>, ServiceError> {
        let svc = Arc::new(CircuitService {
            ctl,
            pending: Mutex::new(BTreeMap::new()),
            provision_timeout,
        });
        // The controller starts with no circuits in its snapshot: publish the stored ones, and
        // wait for that version's acknowledgement for those not settled yet.
        let unsettled: Vec<Circuit> = svc
            .list()?
            .into_iter()
            .filter(|c| {
                matches!(
                    c.state,
                    CircuitState::Provisioning
                        | CircuitState::Decommissioning
                        | CircuitState::Failed
                )
            })
            .collect();
        svc.publish(&unsettled)?;
        Ok(svc)
    }

    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctl
    }

    pub fn list(&self) -> Result<Vec<Circuit>, ServiceError> {
        Ok(store::read(&**self.ctl.store(), |tx| super::all(tx))?)
    }

    pub fn get(&self, id_or_name: &str) -> Result<Circuit, ServiceError> {
        Ok(store::read(&**self.ctl.store(), |tx| {
            super::find(tx, id_or_name)
        })?)
    }

    pub fn history(&self, id_or_name: &str) -> Result<(Circuit, Vec<HistoryEntry>), ServiceError> {
        Ok(store::read(
            &**self.ctl.store(),
            |tx| -> Result<_, CircuitError> {
                let c = super::find(tx, id_or_name)?;
                let h = super::history(tx, &c.id)?;
                Ok((c, h))
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

    /// Admission only: where the circuit would go and which VIP it would get. Writes nothing.
    pub fn validate(&self, spec: &CircuitSpec) -> Result<Admission, ServiceError> {
        let topo = self.ctl.current().topology.clone();
        let circuits = self.list()?;
        Ok(super::admit(&topo, &circuits, spec)?)
    }

    /// Runs `f` in one durable transaction against the topology in force, retrying if a
    /// topology apply committed in between (so admission never uses a stale topology).
    async fn write<R: Send + 'static>(
        &self,
        f: impl Fn(&mut dyn store::WriteTxn, &Topology) -> Result<R, CircuitError>
        + Send
        + Sync
        + 'static,
    ) -> Result<R, ServiceError> {
        let f = Arc::new(f);
        for _ in 0..20 {
            let cur = self.ctl.current();
            let (store, f) = (self.ctl.store().clone(), f.clone());
            let expected = cur.record.version;
            let topo = cur.topology.clone();
            let res = tokio::task::spawn_blocking(move || {
                store::transaction(&*store, |tx| -> Result<Option<R>, CircuitError> {
                    // The number only: the version's text can be megabytes.
                    let now = records::current_version(tx)?;
                    if now != Some(expected) {
                        return Ok(None);
                    }
                    f(tx, &topo).map(Some)
                })
            })
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))??;
            if let Some(r) = res {
                return Ok(r);
            }
            // The store has a newer topology than the controller has published yet.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(ServiceError::Internal(
            "the topology kept changing; try again".into(),
        ))
    }

    /// Publishes the circuits in the store to routers and starts waiting for `changed`'s
    /// acknowledgements.
    fn publish(&self, changed: &[Circuit]) -> Result<u64, ServiceError> {
        // Held across read-and-publish, so that two operations finishing together cannot
        // publish an older list last.
        let mut p = lock(&self.pending);
        let circuits = self.list()?;
        let version = self
            .ctl
            .publish_circuits(Arc::new(super::provisioned(&circuits)))?;
        for c in changed {
            p.insert(
                c.id.clone(),
                Pending {
                    revision: c.revision,
                    version,
                    since: Instant::now(),
                },
            );
        }
        Ok(version)
    }

    /// Creates a circuit (or returns the one created earlier with the same idempotency key).
    /// Returns the circuit and whether it was created now.
    pub async fn create(
        &self,
        spec: CircuitSpec,
        key: Option<String>,
        actor: String,
    ) -> Result<(Circuit, bool), ServiceError> {
        let spec2 = spec.clone();
        let (c, created) = self
            .write(move |tx, topo| super::create(tx, topo, &spec2, key.as_deref(), &actor))
            .await?;
        if created {
            self.publish(std::slice::from_ref(&c))?;
        }
        Ok((c, created))
    }

    pub async fn resize(
        &self,
        id_or_name: String,
        rate: Bandwidth,
        actor: String,
    ) -> Result<Circuit, ServiceError> {
        let before = self.get(&id_or_name)?;
        let c = self
            .write(move |tx, topo| super::resize(tx, topo, &id_or_name, rate, &actor))
            .await?;
        if c.revision != before.revision {
            self.publish(std::slice::from_ref(&c))?;
        }
        Ok(c)
    }

    pub async fn delete(&self, id_or_name: String, actor: String) -> Result<Circuit, ServiceError> {
        let before = self.get(&id_or_name)?;
        let c = self
            .write(move |tx, _| super::delete(tx, &id_or_name, &actor))
            .await?;
        if c.revision != before.revision {
            self.publish(std::slice::from_ref(&c))?;
        }
        Ok(c)
    }

    /// After a topology apply: circuits whose path the new topology breaks become `failed`,
    /// and the snapshot is republished without them.
    pub async fn on_topology_applied(&self, version: u64) -> Result<(), ServiceError> {
        let topo = self.ctl.current().topology.clone();
        let store = self.ctl.store().clone();
        let changed = tokio::task::spawn_blocking(move || {
            store::transaction(&*store, |tx| super::fail_broken(tx, &topo, version))
        })
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??;
        if !changed.is_empty() {
            self.publish(&[])?;
        }
        Ok(())
    }

    /// One pass: settles circuits whose routers acknowledged, fails overdue ones.
    pub async fn settle_once(&self) -> Result<(), ServiceError> {
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
        let circuits = self.list()?;
        let now = Instant::now();
        let (mut ready, mut overdue) = (BTreeMap::new(), BTreeMap::new());
        for c in &circuits {
            let Some(p) = pending.get(&c.id) else {
                continue;
            };
            if p.revision != c.revision && c.state != CircuitState::Failed {
                continue;
            }
            if c.routers().iter().all(|n| acked(n, p.version)) {
                ready.insert(c.id.clone(), p.version);
            } else if c.state == CircuitState::Provisioning
                && now.duration_since(p.since) >= self.provision_timeout
            {
                overdue.insert(c.id.clone(), p.version);
            }
        }
        if ready.is_empty() && overdue.is_empty() {
            return Ok(());
        }
        let store = self.ctl.store().clone();
        let (changed, failed) = tokio::task::spawn_blocking(move || {
            store::transaction(&*store, |tx| -> Result<_, StoreError> {
                let a = super::settle(tx, &|id| ready.get(id).copied(), &acked)?;
                let f = super::expire(tx, &|id| overdue.get(id).copied(), &acked)?;
                Ok((a, f))
            })
        })
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??;
        let mut p = lock(&self.pending);
        for c in &changed {
            p.remove(&c.id);
        }
        for c in &failed {
            // Stays pending: late acknowledgements still activate it.
            if let Some(e) = p.get_mut(&c.id) {
                e.revision = c.revision;
            }
        }
        Ok(())
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
