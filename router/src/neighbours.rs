//! The pool of neighbour connections: one dialled QUIC connection per neighbour, kept up with
//! reconnect backoff, probed BFD-style, and handed to streams only while the neighbour is up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use rand::Rng;
use topology::NodeId;

use crate::Shared;
use crate::codes::close;
use crate::probe::Probe;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub(crate) struct Neighbour {
    pub id: NodeId,
    pub addr: SocketAddr,
    /// Set only while the neighbour is up (connected, answering probes, past its hold-down).
    conn: ArcSwapOption<quinn::Connection>,
    up: AtomicBool,
    rtt_us: AtomicU64,
}

impl Neighbour {
    pub fn new(id: NodeId, addr: SocketAddr) -> Self {
        Neighbour {
            id,
            addr,
            conn: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            rtt_us: AtomicU64::new(0),
        }
    }
    /// Hot path: one atomic load. `None` while the neighbour is down.
    pub fn connection(&self) -> Option<Arc<quinn::Connection>> {
        self.conn.load_full()
    }
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }
    pub fn rtt_us(&self) -> u64 {
        self.rtt_us.load(Relaxed)
    }
    fn set_up(&self, conn: &quinn::Connection) {
        self.conn.store(Some(Arc::new(conn.clone())));
        self.up.store(true, Relaxed);
    }
    fn set_down(&self) {
        self.conn.store(None);
        self.up.store(false, Relaxed);
    }
}

/// Dials `nb` forever (until aborted), with exponential backoff and jitter between attempts.
pub(crate) async fn run_dialer(shared: Arc<Shared>, nb: Arc<Neighbour>) {
    let mut backoff = BACKOFF_MIN;
    let mut down_since: Option<Instant> = None;
    loop {
        let attempt = async {
            let connecting = shared.endpoint.connect(nb.addr, nb.id.as_str()).ok()?;
            tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                .await
                .ok()?
                .ok()
        };
        if let Some(conn) = attempt.await {
            backoff = BACKOFF_MIN;
            tracing::debug!(node = %shared.node, neighbour = %nb.id, "connected");
            probe_until_down(&shared, &nb, &conn, &mut down_since).await;
            if nb.is_up() {
                nb.set_down();
                shared.changed.notify_one();
            }
            down_since = Some(Instant::now());
        } else if down_since.is_none() {
            down_since = Some(Instant::now());
        }
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Probes the connection every interval; returns when the neighbour is declared down (no sign
/// of life for `interval * misses`) or the connection closes.
async fn probe_until_down(
    shared: &Shared,
    nb: &Neighbour,
    conn: &quinn::Connection,
    down_since: &mut Option<Instant>,
) {
    let p = shared.probe;
    let detect = p.interval * p.misses.max(1);
    let mut tick = tokio::time::interval(p.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    let mut last_alive = tokio::time::Instant::now();
    let mut udp_rx = conn.stats().udp_rx.datagrams;
    let mut pongs: u64 = 0;
    let mut pongs_at_tick: u64 = 0;
    let mut prev_tick = tokio::time::Instant::now();
    loop {
        tokio::select! {
            // Detection is exact: `detect` after the last sign of life, not rounded to a tick.
            _ = tokio::time::sleep_until(last_alive + detect) => {
                tracing::warn!(node = %shared.node, neighbour = %nb.id, after_ms = last_alive.elapsed().as_millis() as u64, "neighbour down: missed probes");
                shared.metrics.neighbour_down_total.fetch_add(1, Relaxed);
                conn.close(quinn::VarInt::from_u32(close::DECLARED_DOWN), b"missed probes");
                return;
            }
            _ = tick.tick() => {
                // Traffic beyond the probe replies (and their ACKs) is also a sign of life: a busy
                // link must not be declared down because a reply queued behind bulk data. The
                // margin keeps a dead peer's last few packets from extending its life.
                let rx = conn.stats().udp_rx.datagrams;
                let extra = (rx - udp_rx).saturating_sub(2 * (pongs - pongs_at_tick));
                udp_rx = rx;
                pongs_at_tick = pongs;
                // Those packets arrived some time since the previous tick: credit that instant.
                if extra >= 32 {
                    last_alive = last_alive.max(prev_tick);
                }
                prev_tick = tokio::time::Instant::now();
                seq += 1;
                let _ = conn.send_datagram(Probe::encode_ping(seq));
            }
            d = conn.read_datagram() => {
                let Ok(bytes) = d else { return };
                let Ok(Probe::Pong { entries, .. }) = Probe::decode(bytes) else { continue };
                last_alive = tokio::time::Instant::now();
                pongs += 1;
                nb.rtt_us.store(conn.rtt().as_micros() as u64, Relaxed);
                let mut changed = shared.evidence.learn(&shared.node, entries);
                if !nb.is_up() && down_since.is_none_or(|t| t.elapsed() >= p.hold_down) {
                    nb.set_up(conn);
                    *down_since = None;
                    tracing::info!(node = %shared.node, neighbour = %nb.id, rtt_us = nb.rtt_us(), "neighbour up");
                    changed = true;
                }
                if changed {
                    shared.changed.notify_one();
                }
            }
            _ = conn.closed() => return,
        }
    }
}
