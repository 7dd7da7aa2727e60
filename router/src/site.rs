//! Site role: terminate a stream at the service's local backend, count active streams against
//! capacity, and keep the backend's health (checks plus the evidence of real connects).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;
use topology::{ServiceName, Topology};

use crate::Shared;
use crate::codes::Code;
use crate::header::{Header, REPLY_OK};
use crate::probe::ServiceState;
use crate::splice::{self, Side};
use crate::telemetry::SiteReport;

/// Health checks: a TCP connect every this often; down after 3 failures, up after 2 successes
/// (and the hold-down).
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
const DOWN_AFTER: u32 = 3;
const UP_AFTER: u32 = 2;

pub(crate) struct SiteService {
    pub service: ServiceName,
    pub backend: SocketAddr,
    pub capacity: u32,
    active: Arc<AtomicU32>,
    healthy: Arc<AtomicBool>,
    /// When the service was last marked unhealthy (ms since router start), for the hold-down.
    down_at_ms: Arc<AtomicU32>,
}

impl SiteService {
    pub fn state(&self) -> ServiceState {
        ServiceState {
            service: self.service.clone(),
            healthy: self.healthy.load(Relaxed),
            active: self.active.load(Relaxed),
            capacity: self.capacity,
        }
    }
    pub fn report(&self) -> SiteReport {
        SiteReport {
            service: self.service.clone(),
            healthy: self.healthy.load(Relaxed),
            active_streams: self.active.load(Relaxed),
            capacity: self.capacity,
        }
    }
    fn mark_unhealthy(&self, shared: &Shared, why: &str) {
        self.down_at_ms
            .store(shared.started.elapsed().as_millis() as u32, Relaxed);
        if self.healthy.swap(false, Relaxed) {
            tracing::warn!(node = %shared.node, service = %self.service, backend = %self.backend, why, "backend unhealthy");
            shared.changed.notify_one();
        }
    }
    /// Takes one slot of capacity, or `None` when full.
    fn acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut cur = self.active.load(Relaxed);
        loop {
            if cur >= self.capacity {
                return None;
            }
            match self
                .active
                .compare_exchange_weak(cur, cur + 1, Relaxed, Relaxed)
            {
                Ok(_) => return Some(Slot(self.active.clone())),
                Err(v) => cur = v,
            }
        }
    }
}

struct Slot(Arc<AtomicU32>);
impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Brings the site services in line with the topology (keeps counters of unchanged services).
pub(crate) fn reconcile(
    shared: &Arc<Shared>,
    topo: &Topology,
    checkers: &mut HashMap<ServiceName, AbortHandle>,
) {
    let old = shared.sites.load_full();
    let mut new = HashMap::new();
    if let Some(me) = topo.node(shared.node.as_str()) {
        for s in &me.serves {
            let svc = match old.get(&s.service) {
                Some(o) if o.backend == s.backend && o.capacity == s.capacity => o.clone(),
                o => Arc::new(SiteService {
                    service: s.service.clone(),
                    backend: s.backend,
                    capacity: s.capacity,
                    active: o.map(|o| o.active.clone()).unwrap_or_default(),
                    healthy: Arc::new(AtomicBool::new(true)),
                    down_at_ms: Arc::new(AtomicU32::new(0)),
                }),
            };
            new.insert(s.service.clone(), svc);
        }
    }
    checkers.retain(|name, h| {
        let keep = new
            .get(name)
            .is_some_and(|n| old.get(name).is_some_and(|o| Arc::ptr_eq(n, o)));
        if !keep {
            h.abort();
        }
        keep
    });
    for (name, svc) in &new {
        if !checkers.contains_key(name) {
            let h = tokio::spawn(check_loop(shared.clone(), svc.clone())).abort_handle();
            checkers.insert(name.clone(), h);
        }
    }
    shared.sites.store(Arc::new(new));
}

async fn check_loop(shared: Arc<Shared>, svc: Arc<SiteService>) {
    let mut ok = 0u32;
    let mut fail = 0u32;
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    loop {
        tick.tick().await;
        let r = tokio::time::timeout(
            shared.backend_connect_timeout,
            tokio::net::TcpStream::connect(svc.backend),
        )
        .await;
        if matches!(r, Ok(Ok(_))) {
            ok += 1;
            fail = 0;
            let since = (shared.started.elapsed().as_millis() as u32)
                .saturating_sub(svc.down_at_ms.load(Relaxed));
            if !svc.healthy.load(Relaxed)
                && ok >= UP_AFTER
                && since as u128 >= shared.probe.hold_down.as_millis()
            {
                svc.healthy.store(true, Relaxed);
                tracing::info!(node = %shared.node, service = %svc.service, "backend healthy again");
                shared.changed.notify_one();
            }
        } else {
            ok = 0;
            fail += 1;
            if fail >= DOWN_AFTER {
                svc.mark_unhealthy(&shared, "health check failed");
            }
        }
    }
}

/// Terminates a stream whose header has no hops left at this node.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    header: Header,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let svc = shared.sites.load().get(&header.service).cloned();
    let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code: Code| {
        shared.metrics.error(code);
        let _ = send.reset(code.varint());
        let _ = recv.stop(code.varint());
    };
    let Some(svc) = svc else {
        let known = shared
            .snapshot
            .load()
            .topology
            .service(header.service.as_str())
            .is_some();
        let code = if !known {
            Code::UnknownService
        } else if shared
            .snapshot
            .load()
            .topology
            .node(shared.node.as_str())
            .is_some_and(|n| n.kind == topology::NodeKind::Site)
        {
            Code::ServiceNotServed
        } else {
            Code::WrongRole
        };
        return refuse(&mut send, &mut recv, code);
    };
    if !svc.healthy.load(Relaxed) {
        return refuse(&mut send, &mut recv, Code::BackendRefused);
    }
    let Some(slot) = svc.acquire() else {
        return refuse(&mut send, &mut recv, Code::SiteFull);
    };
    let started = Instant::now();
    let tcp = match tokio::time::timeout(
        shared.backend_connect_timeout,
        tokio::net::TcpStream::connect(svc.backend),
    )
    .await
    {
        Ok(Ok(t)) => t,
        r => {
            let why = match r {
                Ok(Err(e)) => e.to_string(),
                _ => "connect timeout".to_string(),
            };
            svc.mark_unhealthy(&shared, &why);
            return refuse(&mut send, &mut recv, Code::BackendRefused);
        }
    };
    let _ = tcp.set_nodelay(true);
    if send.write_all(&REPLY_OK).await.is_err() {
        return;
    }
    tracing::debug!(node = %shared.node, service = %svc.service, connect_us = started.elapsed().as_micros() as u64, "backend connected");
    splice::tcp_quic(&shared, tcp, send, recv, Side::Site).await;
    drop(slot);
}
