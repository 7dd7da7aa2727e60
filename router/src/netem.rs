//! A user-space link emulator: a UDP relay on loopback that gives a link one-way delay, jitter and
//! loss in both directions (kernel netem is not available where Tasman's tests and demo run).
//!
//! ```text
//!  node A ──udp──▶ [listen]  LinkEmulator  [upstream socket per A-side peer] ──udp──▶ target (node B)
//!         ◀──────────────── delay/jitter/loss applied to each direction ◀──────────────
//! ```
//!
//! A peer dials the emulator's `listen` address instead of the target; every distinct source address
//! gets its own upstream socket, so the target sees one peer per client and replies find their way
//! back. Delivery times come from one sorted queue per emulator (a binary heap keyed by due time and
//! arrival order), drained by a single task with tokio's timer.
//!
//! Precision: tokio's timer has 1 ms ticks, rounds a deadline up to the next one, and the runtime
//! sleeps in whole milliseconds, so a held packet leaves about 1-2 ms after it is due (measured on
//! loopback on a 2-core VM: a round trip through a 300 µs link takes ~3.3 ms at the median instead of
//! 0.6 ms, through a 2 ms link ~6.4 ms instead of 4; a link without delay holds nothing and adds
//! ~0.1 ms). Next to the tens of milliseconds of long-haul links that is noise; a sub-millisecond
//! link (examples/apac.yaml's 300-500 µs metro links) is emulated as ~1.5 ms one way, so what is
//! measured across it is this floor, not the declared latency.
//!
//! Ordering: each direction keeps a monotonic base time, so with zero jitter packets leave in the
//! order they arrived, even across a live profile change, and with jitter J two packets can only swap
//! when their base times (arrival plus delay, after the packets queued ahead of them on a
//! bandwidth-limited link) are less than J apart: on an idle link, those that arrived less than J
//! apart; behind a queue, or just after a live cut of the delay, packets that arrived further
//! apart than J share nearly one base time and may swap, as under real netem. The queue is bounded; a packet that finds it full is dropped
//! and counted, as a real router's buffer would.
//!
//! Outages: [`LinkHandle::cut_for`] cuts the link for a fixed time and the emulator restores it
//! on its own at the deadline (a cut through `set_profile(LinkProfile::cut())` lasts until the
//! caller sets another profile, so its length is the caller's scheduling, which a loaded machine
//! can stretch by hundreds of milliseconds). Every datagram on a link cut by `cut_for` at any
//! moment of the cut is lost: the ones that reach the emulator during it, and the ones it was
//! still holding (delay, jitter) when it began. (A cut by `set_profile` drops the datagrams that
//! reach the emulator during it; those it holds already still leave when due.)
//!
//! Bandwidth: a profile with a `rate_bps` serialises each direction's packets one after another
//! at that rate before their delay, and holds at most `buffer` of queue (tail drop beyond it):
//! a sender faster than the link builds a standing queue, and its RTT grows by the queueing, as
//! at a real bottleneck. Each direction is one queue, whatever the number of clients: the
//! replies to every client share the way back's rate and buffer.
//!
//! Hot path: each reader receives into a shared `BytesMut` slab and hands the scheduler a frozen
//! `Bytes` slice of it (no per-packet allocation while slabs are recycled); a datagram dropped
//! (loss, cut, full queue) is not split off, so its room is used by the next. The profile and the
//! last cut are read lock-free through `ArcSwap`; the way back's queue is behind a mutex that its
//! flows' readers hold only to schedule a packet.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::{Bytes, BytesMut};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use topology::Latency;

/// Largest datagram relayed. QUIC never sends more than 64 KiB in one datagram.
const MAX_DATAGRAM: usize = 64 * 1024;
/// Receive slab size: many datagrams share one allocation until they have all been sent.
const SLAB: usize = 512 * 1024;

/// What a link does to each packet, per direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkProfile {
    /// One-way delay added to every packet.
    pub delay: Latency,
    /// Extra delay drawn uniformly from `[0, jitter]` per packet.
    pub jitter: Latency,
    /// Probability in `[0, 1]` that a packet is dropped.
    pub loss: f64,
    /// Bandwidth in bits per second; 0 is unlimited. A packet waits for the ones before it in
    /// its direction to be serialised at this rate, then for `delay`: a sender faster than the
    /// rate builds a queue, as at a real bottleneck, and the queueing shows in every RTT.
    pub rate_bps: u64,
    /// The most queueing a rate-limited link holds (its buffer, counted in time at `rate_bps`):
    /// a packet that would wait longer for its turn is dropped (tail drop, counted as
    /// `dropped_queue_full`).
    pub buffer: Latency,
}

impl LinkProfile {
    /// A link with a fixed one-way delay, no jitter, no loss.
    pub fn delay(delay: Latency) -> Self {
        LinkProfile {
            delay,
            jitter: Latency::ZERO,
            loss: 0.0,
            rate_bps: 0,
            buffer: Latency::ZERO,
        }
    }

    /// This profile with a bottleneck of `rate_bps` bits per second and `buffer` of queue.
    pub fn with_rate(self, rate_bps: u64, buffer: Latency) -> Self {
        LinkProfile {
            rate_bps,
            buffer,
            ..self
        }
    }

    /// A link that drops everything (a cut fibre).
    pub fn cut() -> Self {
        LinkProfile {
            loss: 1.0,
            ..LinkProfile::delay(Latency::ZERO)
        }
    }

    fn sanitized(mut self) -> Self {
        self.loss = if self.loss.is_nan() {
            0.0
        } else {
            self.loss.clamp(0.0, 1.0)
        };
        self
    }
}

impl Default for LinkProfile {
    fn default() -> Self {
        LinkProfile::delay(Latency::ZERO)
    }
}

/// Knobs that are not part of the link's physics.
#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    /// Most packets queued in each direction before new ones in that direction are dropped (a
    /// real link's queues are per direction: a sender filling one does not starve the
    /// acknowledgements and probe replies coming back the other way).
    pub queue_limit: usize,
    /// Most distinct client source addresses; packets from further ones are dropped.
    pub max_flows: usize,
    /// A flow with no packet in either direction for this long is forgotten.
    pub flow_idle_timeout: Duration,
    /// Seed for the loss and jitter draws (reproducible tests: the client direction and each
    /// flow's return direction get seeds derived from it in the order the flows are created);
    /// `None` seeds from the OS.
    pub seed: Option<u64>,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        EmulatorOptions {
            queue_limit: 16 * 1024,
            max_flows: 1024,
            flow_idle_timeout: Duration::from_secs(300),
            seed: None,
        }
    }
}

/// Counters of one emulator, both directions together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets received from either side.
    pub received: u64,
    /// Packets handed to the kernel on the other side.
    pub forwarded: u64,
    /// Packets dropped by the loss draw.
    pub dropped_loss: u64,
    /// Packets dropped because the queue was full (or the flow table was).
    pub dropped_queue_full: u64,
    /// Packets lost to a timed cut ([`LinkHandle::cut_for`]).
    pub dropped_cut: u64,
    /// Packets the kernel refused to send.
    pub send_errors: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    forwarded: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_cut: AtomicU64,
    send_errors: AtomicU64,
}

/// A timed cut: the link carries nothing from `from` until `until`.
#[derive(Debug, Clone, Copy)]
struct Cut {
    from: Instant,
    until: Instant,
}

impl Cut {
    /// Whether a packet that reached the emulator at `arrived` and is due to leave at `due` was
    /// on the link at some moment of the cut (an empty cut loses nothing).
    fn loses(&self, arrived: Instant, due: Instant) -> bool {
        self.from < self.until && arrived < self.until && due >= self.from
    }
}

/// Where a queued packet goes.
enum Dest {
    /// Towards the target, on the flow's own upstream socket (connected).
    Upstream(Arc<UdpSocket>),
    /// Back to a client, from the listen socket.
    Client(SocketAddr),
}

impl Dest {
    /// Index of the direction's queue in [`Shared::queued`].
    fn queue(&self) -> usize {
        match self {
            Dest::Upstream(_) => 0,
            Dest::Client(_) => 1,
        }
    }
}

struct Queued {
    due: Instant,
    /// When the packet reached the emulator (for a cut that begins while it is held).
    arrived: Instant,
    seq: u64,
    dest: Dest,
    data: Bytes,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// State shared by the emulator's tasks.
struct Shared {
    profile: ArcSwap<LinkProfile>,
    /// The last timed cut ([`LinkHandle::cut_for`]), also once it is over.
    cut: ArcSwapOption<Cut>,
    counters: Counters,
    /// Packets queued toward the target and back to clients ([`Dest::queue`]).
    queued: [AtomicUsize; 2],
    options: EmulatorOptions,
    seq: AtomicU64,
    /// Seeds handed to per-direction RNGs, derived from the options' seed.
    next_seed: AtomicU64,
    target: SocketAddr,
    /// The return direction (target to clients), shared by every flow's reader.
    back: Arc<Mutex<Lane>>,
}

impl Shared {
    fn rng(&self) -> SmallRng {
        match self.options.seed {
            Some(seed) => {
                let n = self.next_seed.fetch_add(1, Ordering::Relaxed);
                SmallRng::seed_from_u64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            }
            None => SmallRng::from_os_rng(),
        }
    }
}

/// The most delay, and the most jitter, a packet is given: a profile asking for more (through the
/// library; the CLI refuses it) holds packets this long.
pub const MAX_DELAY: Duration = Duration::from_secs(24 * 3600);

/// One direction of the link as every packet on it shares it: its queue at the bottleneck and
/// its order. The return direction's is shared by every flow's reader ([`Shared::back`]): the
/// link has one rate each way, not one per client.
struct Lane {
    /// Due time without jitter of the last packet: never goes backwards, so zero jitter keeps order.
    base: Instant,
    /// When the last packet accepted on a rate-limited link has been serialised (the end of
    /// the direction's queue).
    busy_until: Instant,
    /// The rate `busy_until` was reckoned at: a profile with another rate drains what is queued
    /// at its own.
    busy_rate: u64,
}

impl Lane {
    fn new() -> Self {
        Lane {
            base: Instant::now(),
            busy_until: Instant::now(),
            busy_rate: 0,
        }
    }
}

/// A reader's scheduling state: its own draws (loss, jitter: seeded per flow, so that a seed
/// gives each flow the same draws however the tasks run) on its direction's [`Lane`].
struct Direction {
    rng: SmallRng,
    /// Locked only within [`Direction::schedule`], never across an await.
    lane: Arc<Mutex<Lane>>,
}

/// What [`Direction::schedule`] decides for a packet.
#[derive(Debug, PartialEq)]
enum Fate {
    /// Sent at this instant.
    Due(Instant),
    /// Dropped by the loss draw.
    Lost,
    /// Dropped: the rate-limited link's buffer is full.
    Overflow,
}

impl Direction {
    fn new(rng: SmallRng) -> Self {
        Self::on(rng, Arc::new(Mutex::new(Lane::new())))
    }

    /// A reader on `lane`, shared with others.
    fn on(rng: SmallRng, lane: Arc<Mutex<Lane>>) -> Self {
        Direction { rng, lane }
    }

    /// Decides the fate of a packet of `len` bytes: lost to the loss draw, dropped at a full
    /// buffer, or its due time. Delay and jitter count up to [`MAX_DELAY`] each (an `Instant`
    /// plus `Duration::MAX` panics, which ended the direction's reader task and so the relay
    /// that way).
    fn schedule(&mut self, profile: &LinkProfile, now: Instant, len: usize) -> Fate {
        if profile.loss > 0.0 && self.rng.random::<f64>() < profile.loss {
            return Fate::Lost;
        }
        let base = {
            let mut lane = self.lane.lock().unwrap_or_else(|e| e.into_inner());
            // What is queued when the rate changes drains at the new rate (none: at once).
            if profile.rate_bps != lane.busy_rate {
                let queued = lane.busy_until.saturating_duration_since(now);
                let scaled = match profile.rate_bps {
                    0 => Duration::ZERO,
                    r => capped(queued.as_nanos() * u128::from(lane.busy_rate) / u128::from(r)),
                };
                lane.busy_until = now + scaled;
                lane.busy_rate = profile.rate_bps;
            }
            // Serialisation: after the packets before it, at the link's rate.
            let mut sent = now;
            if profile.rate_bps > 0 {
                let start = lane.busy_until.max(now);
                if start.saturating_duration_since(now)
                    > profile.buffer.as_duration().min(MAX_DELAY)
                {
                    return Fate::Overflow;
                }
                let nanos = (len as u128 * 8 * 1_000_000_000) / u128::from(profile.rate_bps);
                lane.busy_until = start + capped(nanos);
                sent = lane.busy_until;
            }
            lane.base = lane
                .base
                .max(sent + profile.delay.as_duration().min(MAX_DELAY));
            lane.base
        };
        let jitter = profile.jitter.as_nanos().min(MAX_DELAY.as_nanos() as u64);
        let extra = if jitter == 0 {
            0
        } else {
            self.rng.random_range(0..=jitter)
        };
        Fate::Due(base + Duration::from_nanos(extra))
    }
}

/// `nanos` as a duration of at most [`MAX_DELAY`].
fn capped(nanos: u128) -> Duration {
    Duration::from_nanos(nanos.min(MAX_DELAY.as_nanos()) as u64)
}

/// A running link emulator. Dropping the handle stops it too.
pub struct LinkHandle {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl LinkHandle {
    /// The address peers dial instead of the target.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address packets are relayed to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// Changes the link's delay, jitter and loss; packets received from now on use it.
    pub fn set_profile(&self, profile: LinkProfile) {
        self.shared.profile.store(Arc::new(profile.sanitized()));
    }

    /// The profile in force.
    pub fn profile(&self) -> LinkProfile {
        **self.shared.profile.load()
    }

    /// Cuts the link for `duration` from now, in both directions, and restores it on its own at
    /// the deadline: every datagram that reaches the emulator before then is dropped, and so is
    /// every one it still holds (delay, jitter) when the cut begins, as on a cut fibre (counted
    /// in [`LinkStats::dropped_cut`]); from the deadline on, packets pass with the profile in
    /// force again. The outage lasts `duration` however late the caller runs next, which a
    /// restore by [`LinkHandle::set_profile`] cannot promise on a loaded machine. A cut in
    /// progress is made to end `duration` from now instead (`cut_for(Duration::ZERO)` ends it
    /// at once; what was held during it is still lost). The profile is left alone.
    pub fn cut_for(&self, duration: Duration) {
        let now = Instant::now();
        // A duration past what an Instant holds cuts for a century.
        let until = now
            .checked_add(duration)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
            .unwrap_or(now);
        let from = match self.shared.cut.load().as_deref() {
            Some(c) if c.from <= now && now < c.until => c.from,
            // No cut in progress and none asked for: the record of the last one stays, so that
            // what was held during it is still lost (an empty cut in its place lost nothing).
            _ if duration.is_zero() => return,
            _ => now,
        };
        self.shared.cut.store(Some(Arc::new(Cut { from, until })));
    }

    /// Whether a timed cut is in progress.
    pub fn is_cut(&self) -> bool {
        self.shared
            .cut
            .load()
            .as_ref()
            .is_some_and(|c| Instant::now() < c.until)
    }

    /// Counters so far.
    pub fn stats(&self) -> LinkStats {
        let c = &self.shared.counters;
        LinkStats {
            received: c.received.load(Ordering::Relaxed),
            forwarded: c.forwarded.load(Ordering::Relaxed),
            dropped_loss: c.dropped_loss.load(Ordering::Relaxed),
            dropped_queue_full: c.dropped_queue_full.load(Ordering::Relaxed),
            dropped_cut: c.dropped_cut.load(Ordering::Relaxed),
            send_errors: c.send_errors.load(Ordering::Relaxed),
        }
    }

    /// Stops every task of the emulator; queued packets are discarded.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

impl Drop for LinkHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle")
            .field("local_addr", &self.local_addr)
            .field("target", &self.shared.target)
            .field("profile", &self.profile())
            .field("cut", &self.is_cut())
            .finish()
    }
}

/// The link emulator. See the module documentation.
pub struct LinkEmulator;

impl LinkEmulator {
    /// Binds `listen` and relays to `target` with `profile`, with default options.
    pub async fn spawn(
        listen: SocketAddr,
        target: SocketAddr,
        profile: LinkProfile,
    ) -> io::Result<LinkHandle> {
        Self::spawn_with(listen, target, profile, EmulatorOptions::default()).await
    }

    /// Binds `listen` and relays to `target` with `profile` and `options`. Must run in a tokio
    /// runtime with the time driver enabled.
    pub async fn spawn_with(
        listen: SocketAddr,
        target: SocketAddr,
        profile: LinkProfile,
        options: EmulatorOptions,
    ) -> io::Result<LinkHandle> {
        let socket = Arc::new(UdpSocket::bind(listen).await?);
        let local_addr = socket.local_addr()?;
        let shared = Arc::new(Shared {
            profile: ArcSwap::from_pointee(profile.sanitized()),
            cut: ArcSwapOption::empty(),
            counters: Counters::default(),
            queued: [AtomicUsize::new(0), AtomicUsize::new(0)],
            seq: AtomicU64::new(0),
            next_seed: AtomicU64::new(0),
            target,
            options,
            back: Arc::new(Mutex::new(Lane::new())),
        });
        let (shutdown, stop) = watch::channel(false);
        let (tx, rx) = mpsc::unbounded_channel();
        // Seeds are handed out here and as flows are created (under the flow table's lock), in
        // an order that does not depend on when each task first runs.
        let dir = Direction::new(shared.rng());
        tokio::spawn(scheduler(socket.clone(), shared.clone(), rx, stop.clone()));
        tokio::spawn(client_reader(socket, shared.clone(), dir, tx, stop));
        Ok(LinkHandle {
            local_addr,
            shared,
            shutdown,
        })
    }
}

/// One client's upstream socket and its activity clock (for idle expiry).
struct Flow {
    upstream: Arc<UdpSocket>,
    last_seen: Arc<AtomicU64>,
}

/// Milliseconds since `epoch`, for cheap activity stamps.
fn stamp(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Reads packets from clients on the listen socket and queues them towards the target.
async fn client_reader(
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    mut dir: Direction,
    tx: mpsc::UnboundedSender<Queued>,
    mut stop: watch::Receiver<bool>,
) {
    let flows: Arc<Mutex<HashMap<SocketAddr, Flow>>> = Arc::default();
    let epoch = Instant::now();
    let mut slab = BytesMut::with_capacity(SLAB);
    loop {
        if slab.capacity() < MAX_DATAGRAM {
            // Reclaims the slab in place once every datagram cut from it has been sent.
            slab.reserve(SLAB);
        }
        let (_, from) = tokio::select! {
            _ = stop.changed() => return,
            r = socket.recv_buf_from(&mut slab) => match r {
                Ok(r) => r,
                // ICMP errors from earlier sends surface here on some systems; keep serving.
                Err(_) => { slab.clear(); continue; }
            },
        };
        shared.counters.received.fetch_add(1, Ordering::Relaxed);
        let upstream = {
            // Never held across an await: flows are created with a synchronous bind.
            let mut map = flows.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&from) {
                Some(flow) => {
                    flow.last_seen.store(stamp(epoch), Ordering::Relaxed);
                    Some(flow.upstream.clone())
                }
                None if map.len() >= shared.options.max_flows => None,
                None => match new_flow(&shared, &socket, from, &flows, epoch, &stop, &tx) {
                    Ok(flow) => {
                        let up = flow.upstream.clone();
                        map.insert(from, flow);
                        Some(up)
                    }
                    Err(_) => None,
                },
            }
        };
        let Some(upstream) = upstream else {
            shared
                .counters
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
            slab.clear();
            continue;
        };
        enqueue(&shared, &tx, &mut dir, Dest::Upstream(upstream), &mut slab);
    }
}

/// Binds a client's upstream socket and spawns the task that relays the target's replies. Called
/// under the flow table's lock, so the return direction's seed follows the order flows are
/// created in (a seed drawn by the task itself would follow the order tasks first run in, which
/// the runtime decides: with a fixed seed, two flows created together swapped their draws from
/// one run to the next).
fn new_flow(
    shared: &Arc<Shared>,
    listen: &Arc<UdpSocket>,
    client: SocketAddr,
    flows: &Arc<Mutex<HashMap<SocketAddr, Flow>>>,
    epoch: Instant,
    stop: &watch::Receiver<bool>,
    tx: &mpsc::UnboundedSender<Queued>,
) -> io::Result<Flow> {
    let local_ip = match (listen.local_addr()?.ip(), shared.target.ip()) {
        // Same family as the target; the listen address when it is concrete and of that family.
        (ip @ IpAddr::V4(v4), IpAddr::V4(_)) if !v4.is_unspecified() => ip,
        (ip @ IpAddr::V6(v6), IpAddr::V6(_)) if !v6.is_unspecified() => ip,
        (_, IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        (_, IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    let std_sock = std::net::UdpSocket::bind(SocketAddr::new(local_ip, 0))?;
    std_sock.connect(shared.target)?;
    std_sock.set_nonblocking(true)?;
    let upstream = Arc::new(UdpSocket::from_std(std_sock)?);
    let last_seen = Arc::new(AtomicU64::new(stamp(epoch)));
    tokio::spawn(upstream_reader(UpstreamTask {
        dir: Direction::on(shared.rng(), shared.back.clone()),
        upstream: upstream.clone(),
        client,
        shared: shared.clone(),
        flows: flows.clone(),
        last_seen: last_seen.clone(),
        epoch,
        stop: stop.clone(),
        tx: tx.clone(),
    }));
    Ok(Flow {
        upstream,
        last_seen,
    })
}

struct UpstreamTask {
    /// The return direction's scheduling state, its RNG seeded when the flow was created.
    dir: Direction,
    upstream: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
    flows: Arc<Mutex<HashMap<SocketAddr, Flow>>>,
    last_seen: Arc<AtomicU64>,
    epoch: Instant,
    stop: watch::Receiver<bool>,
    tx: mpsc::UnboundedSender<Queued>,
}

/// Reads the target's replies on one flow's upstream socket and queues them back to the client.
async fn upstream_reader(mut t: UpstreamTask) {
    let idle = t.shared.options.flow_idle_timeout;
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let mut slab = BytesMut::with_capacity(SLAB);
    loop {
        if slab.capacity() < MAX_DATAGRAM {
            slab.reserve(SLAB);
        }
        let r = tokio::select! {
            _ = t.stop.changed() => return,
            r = tokio::time::timeout(idle, t.upstream.recv_buf(&mut slab)) => r,
        };
        match r {
            Ok(Ok(_)) => {}
            // Connection refused (target not listening yet or gone): keep the flow, it may return.
            Ok(Err(_)) => {
                slab.clear();
                continue;
            }
            Err(_elapsed) => {
                if stamp(t.epoch).saturating_sub(t.last_seen.load(Ordering::Relaxed)) >= idle_ms {
                    let mut map = t.flows.lock().unwrap_or_else(|e| e.into_inner());
                    // Only forget the flow if it is still this one.
                    if map
                        .get(&t.client)
                        .is_some_and(|f| Arc::ptr_eq(&f.upstream, &t.upstream))
                    {
                        map.remove(&t.client);
                    }
                    return;
                }
                continue;
            }
        }
        t.last_seen.store(stamp(t.epoch), Ordering::Relaxed);
        t.shared.counters.received.fetch_add(1, Ordering::Relaxed);
        enqueue(
            &t.shared,
            &t.tx,
            &mut t.dir,
            Dest::Client(t.client),
            &mut slab,
        );
    }
}

/// Applies a cut, loss and the queue bound to the datagram just received into `slab` (all of
/// its filled part), then hands the packet to the scheduler with its due time. Only a packet
/// queued is split from the slab: a dropped one's room is used again by the next receive (split
/// off too, it kept the whole slab allocated for as long as any packet queued with it was held,
/// and a slab was allocated anew: memory grew with what was received, not with what is queued).
fn enqueue(
    shared: &Shared,
    tx: &mpsc::UnboundedSender<Queued>,
    dir: &mut Direction,
    dest: Dest,
    slab: &mut BytesMut,
) {
    let now = Instant::now();
    if shared
        .cut
        .load()
        .as_ref()
        .is_some_and(|c| c.from <= now && now < c.until)
    {
        shared.counters.dropped_cut.fetch_add(1, Ordering::Relaxed);
        slab.clear();
        return;
    }
    let len = slab.len();
    // Reserve a slot in the direction's queue first (a packet dropped for want of one takes no
    // time on a rate-limited link); give it back if the queue was already full, or the packet
    // is dropped on the way.
    let queued = &shared.queued[dest.queue()];
    let fate = if queued.fetch_add(1, Ordering::AcqRel) >= shared.options.queue_limit {
        Fate::Overflow
    } else {
        dir.schedule(&shared.profile.load(), now, len)
    };
    let due = match fate {
        Fate::Due(due) => due,
        dropped => {
            slab.clear();
            queued.fetch_sub(1, Ordering::AcqRel);
            let counter = match dropped {
                Fate::Lost => &shared.counters.dropped_loss,
                _ => &shared.counters.dropped_queue_full,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let data = slab.split().freeze();
    let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
    if tx
        .send(Queued {
            due,
            arrived: now,
            seq,
            dest,
            data,
        })
        .is_err()
    {
        queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends every queued packet when it is due.
async fn scheduler(
    listen: Arc<UdpSocket>,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    mut stop: watch::Receiver<bool>,
) {
    let mut heap: BinaryHeap<Reverse<Queued>> = BinaryHeap::new();
    loop {
        // Send everything due.
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(q)| q.due <= now) {
            let Some(Reverse(q)) = heap.pop() else { break };
            shared.queued[q.dest.queue()].fetch_sub(1, Ordering::AcqRel);
            // Held when a cut began, and due during or after it: lost on the cut link.
            if shared
                .cut
                .load()
                .as_ref()
                .is_some_and(|c| c.loses(q.arrived, q.due))
            {
                shared.counters.dropped_cut.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            send(&listen, &shared, q).await;
        }
        let next = heap.peek().map(|Reverse(q)| q.due);
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            msg = rx.recv() => match msg {
                Some(q) => {
                    heap.push(Reverse(q));
                    // Take whatever else is already waiting, without another trip through select.
                    while let Ok(q) = rx.try_recv() {
                        heap.push(Reverse(q));
                    }
                }
                None => return,
            },
            _ = sleep_until_opt(next) => {}
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn send(listen: &UdpSocket, shared: &Shared, q: Queued) {
    let r = match &q.dest {
        Dest::Upstream(sock) => match sock.try_send(&q.data) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => sock.send(&q.data).await,
            r => r,
        },
        Dest::Client(addr) => match listen.try_send_to(&q.data, *addr) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => listen.send_to(&q.data, *addr).await,
            r => r,
        },
    };
    match r {
        Ok(_) => shared.counters.forwarded.fetch_add(1, Ordering::Relaxed),
        Err(_) => shared.counters.send_errors.fetch_add(1, Ordering::Relaxed),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(n: u64) -> Latency {
        Latency::from_duration(Duration::from_millis(n))
    }

    fn lo() -> SocketAddr {
        "127.0.0.1:0".parse().expect("literal address")
    }

    /// A UDP echo server on loopback; returns its address.
    async fn echo_server() -> SocketAddr {
        let sock = UdpSocket::bind(lo()).await.expect("bind echo");
        let addr = sock.local_addr().expect("echo addr");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let _ = sock.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    /// Sends one datagram through `link` and waits for its echo; returns the round-trip time.
    async fn rtt(client: &UdpSocket, link: SocketAddr, tag: u32) -> Duration {
        let start = std::time::Instant::now();
        client
            .send_to(&tag.to_be_bytes(), link)
            .await
            .expect("send");
        let mut buf = [0u8; 64];
        loop {
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                .await
                .expect("echo within 5 s")
                .expect("recv");
            if n == 4 && buf[..4] == tag.to_be_bytes() {
                return start.elapsed();
            }
        }
    }

    /// Polls `cond` until it holds or `deadline` passes.
    async fn eventually(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let end = std::time::Instant::now() + deadline;
        while std::time::Instant::now() < end {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cond()
    }

    /// A rate-limited direction serialises packets one after another at its rate before their
    /// delay, holds at most its buffer of queue (the next packet is dropped) and drains with time.
    #[test]
    fn a_rate_limited_link_queues_at_its_rate_and_drops_beyond_its_buffer() {
        let us = |n: u64| Duration::from_micros(n);
        // 8 Mbit/s: a 1,000-byte packet takes 1 ms to serialise; 2.5 ms of buffer.
        let profile = LinkProfile::delay(ms(10)).with_rate(8_000_000, Latency::from_micros(2_500));
        let mut dir = Direction::new(SmallRng::seed_from_u64(1));
        let t0 = Instant::now();
        let fates: Vec<Fate> = (0..5).map(|_| dir.schedule(&profile, t0, 1_000)).collect();
        assert_eq!(
            fates,
            [
                Fate::Due(t0 + us(11_000)),
                Fate::Due(t0 + us(12_000)),
                Fate::Due(t0 + us(13_000)),
                // Its turn would come 3 ms from now: beyond the 2.5 ms buffer.
                Fate::Overflow,
                Fate::Overflow,
            ]
        );
        // 2 ms later one packet's worth is left ahead: queued again, behind it.
        assert_eq!(
            dir.schedule(&profile, t0 + us(2_000), 500),
            Fate::Due(t0 + us(13_500))
        );
        // Drained: a packet long after goes at once, after its serialisation and delay.
        assert_eq!(
            dir.schedule(&profile, t0 + us(100_000), 1_000),
            Fate::Due(t0 + us(111_000))
        );
        // A new rate drains what is queued at its own: 3 ms queued at 8 Mbit/s is 0.75 ms at
        // 32 Mbit/s, within a 1 ms buffer (reckoned at the old rate, it overflowed it). The
        // packet still leaves after the ones held before it (order is kept).
        let mut dir = Direction::new(SmallRng::seed_from_u64(1));
        for _ in 0..3 {
            dir.schedule(&profile, t0, 1_000);
        }
        let faster = LinkProfile::delay(ms(10)).with_rate(32_000_000, Latency::from_micros(1_000));
        assert_eq!(dir.schedule(&faster, t0, 1_000), Fate::Due(t0 + us(13_000)));
        assert_eq!(dir.lane.lock().unwrap().busy_until, t0 + us(1_000));
        // Unlimited (rate 0): no serialisation, no buffer.
        let mut dir = Direction::new(SmallRng::seed_from_u64(1));
        for _ in 0..3 {
            assert_eq!(
                dir.schedule(&LinkProfile::delay(ms(10)), t0, 60_000),
                Fate::Due(t0 + us(10_000))
            );
        }
    }

    #[tokio::test]
    async fn delay_is_applied_in_both_directions() {
        let echo = echo_server().await;
        let link = LinkEmulator::spawn(lo(), echo, LinkProfile::delay(ms(25)))
            .await
            .expect("spawn");
        let client = UdpSocket::bind(lo()).await.expect("bind client");
        let mut fastest = Duration::MAX;
        for i in 0..5 {
            let rtt = rtt(&client, link.local_addr(), i).await;
            // 25 ms each way: never less, whatever the machine.
            assert!(
                rtt >= Duration::from_millis(50),
                "rtt {rtt:?} shorter than two one-way delays"
            );
            fastest = fastest.min(rtt);
        }
        // Not much more either (the delay is not applied twice each way): the fastest of five
        // round trips, with a wide margin for a loaded 2-core CI machine that may delay any one
        // of them.
        assert!(
            fastest < Duration::from_millis(400),
            "the fastest rtt, {fastest:?}, far above 50 ms"
        );
        assert_eq!(link.stats().forwarded, 10);
    }

    #[tokio::test]
    async fn live_profile_change_takes_effect() {
        let echo = echo_server().await;
        let link = LinkEmulator::spawn(lo(), echo, LinkProfile::delay(ms(2)))
            .await
            .expect("spawn");
        let client = UdpSocket::bind(lo()).await.expect("bind client");
        // The fastest of five round trips on the 2 ms link stays below the 120 ms that the
        // 60 ms one cannot go under (a loaded CI machine may delay any one of them).
        let mut before = Duration::MAX;
        for i in 0..5 {
            before = before.min(rtt(&client, link.local_addr(), 100 + i).await);
        }
        assert!(
            before >= Duration::from_millis(4),
            "rtt {before:?} with a 2 ms link"
        );
        assert!(
            before < Duration::from_millis(120),
            "the fastest rtt, {before:?}, with a 2 ms link"
        );
        link.set_profile(LinkProfile::delay(ms(60)));
        assert_eq!(link.profile().delay, ms(60));
        let after = rtt(&client, link.local_addr(), 2).await;
        assert!(
            after >= Duration::from_millis(120),
            "rtt {after:?} after raising the delay to 60 ms"
        );
        link.set_profile(LinkProfile::cut());
        client
            .send_to(b"lost", link.local_addr())
            .await
            .expect("send");
        assert!(eventually(Duration::from_secs(5), || link.stats().dropped_loss == 1).await);
    }

    #[tokio::test]
    async fn loss_rate_is_roughly_honoured() {
        let sink = UdpSocket::bind(lo()).await.expect("bind sink");
        let profile = LinkProfile {
            loss: 0.3,
            ..LinkProfile::default()
        };
        let options = EmulatorOptions {
            seed: Some(7),
            ..EmulatorOptions::default()
        };
        let link =
            LinkEmulator::spawn_with(lo(), sink.local_addr().expect("addr"), profile, options)
                .await
                .expect("spawn");
        let client = UdpSocket::bind(lo()).await.expect("bind client");
        const N: u64 = 2000;
        let sent = async {
            for i in 0..N {
                client
                    .send_to(&i.to_be_bytes(), link.local_addr())
                    .await
                    .expect("send");
                if i % 64 == 0 {
                    // Leave the relay time to drain so that the kernel's buffers never overflow.
                    tokio::task::yield_now().await;
                }
            }
        };
        let received = async {
            let mut got = 0u64;
            let mut buf = [0u8; 16];
            loop {
                let s = link.stats();
                if s.forwarded + s.dropped_loss == N && got == s.forwarded {
                    return got;
                }
                match tokio::time::timeout(Duration::from_secs(5), sink.recv_from(&mut buf)).await {
                    Ok(_) => got += 1,
                    Err(_) => return got,
                }
            }
        };
        let ((), got) = tokio::join!(sent, received);
        let stats = link.stats();
        assert_eq!(
            stats.received, N,
            "every datagram reached the relay: {stats:?}"
        );
        assert_eq!(stats.forwarded + stats.dropped_loss, N, "{stats:?}");
        assert_eq!(
            got, stats.forwarded,
            "what was forwarded arrived: {stats:?}"
        );
        let rate = stats.dropped_loss as f64 / N as f64;
        assert!(
            (0.25..=0.35).contains(&rate),
            "loss rate {rate} far from 0.3"
        );
    }

    #[tokio::test]
    async fn order_is_preserved_without_jitter_even_across_a_delay_drop() {
        let sink = UdpSocket::bind(lo()).await.expect("bind sink");
        let link = LinkEmulator::spawn(
            lo(),
            sink.local_addr().expect("addr"),
            LinkProfile::delay(ms(40)),
        )
        .await
        .expect("spawn");
        let client = UdpSocket::bind(lo()).await.expect("bind client");
        for i in 0u32..100 {
            if i == 50 {
                // Later packets must not overtake the ones still held for 40 ms.
                link.set_profile(LinkProfile::delay(ms(1)));
            }
            client
                .send_to(&i.to_be_bytes(), link.local_addr())
                .await
                .expect("send");
        }
        let mut buf = [0u8; 16];
        for want in 0u32..100 {
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), sink.recv_from(&mut buf))
                .await
                .expect("packet within 5 s")
                .expect("recv");
            assert_eq!(n, 4);
            let got = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            assert_eq!(got, want, "packet {got} arrived in place of {want}");
        }
    }

    #[tokio::test]
    async fn jitter_reorders_no_further_than_the_jitter() {
        let sink = UdpSocket::bind(lo()).await.expect("bind sink");
        let profile = LinkProfile {
            delay: ms(5),
            jitter: ms(10),
            ..LinkProfile::default()
        };
        let options = EmulatorOptions {
            seed: Some(3),
            ..EmulatorOptions::default()
        };
        let link =
            LinkEmulator::spawn_with(lo(), sink.local_addr().expect("addr"), profile, options)
                .await
                .expect("spawn");
        let client = UdpSocket::bind(lo()).await.expect("bind client");
        // Two bursts 100 ms apart: far more than the jitter, so no packet of the second burst may
        // arrive before one of the first.
        for i in 0u32..100 {
            if i == 50 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            client
                .send_to(&i.to_be_bytes(), link.local_addr())
                .await
                .expect("send");
        }
        let mut order = Vec::new();
        let mut buf = [0u8; 16];
        while order.len() < 100 {
            let (_, _) = tokio::time::timeout(Duration::from_secs(5), sink.recv_from(&mut buf))
                .await
                .expect("packet within 5 s")
                .expect("recv");
            order.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
        }
        let first_burst_done = order
            .iter()
            .rposition(|&i| i < 50)
            .expect("first burst arrived");
        let second_burst_start = order
            .iter()
            .position(|&i| i >= 50)
            .expect("second burst arrived");
        assert!(
            first_burst_done < second_burst_start,
            "bursts interleaved: {order:?}"
        );
        // And the jitter was applied: each burst is sent within about 1 ms, so its packets'
        // delays, spread over the 10 ms, put them out of order (about half of a burst's 1,225
        // pairs swap; none at all without jitter, whatever the machine's load, as the scheduler
        // sends in due order).
        let swapped: usize = order
            .iter()
            .enumerate()
            .map(|(i, a)| order[i + 1..].iter().filter(|b| *b < a).count())
            .sum();
        assert!(
            swapped >= 100,
            "only {swapped} pairs out of order: no jitter? {order:?}"
        );
    }

    /// Which of `n` replies to each of two clients come through a link that drops half of them,
    /// its draws seeded with `seed`. The clients' flows are created in the same order each time
    /// (client 0's first); `together` only changes when their reply tasks first run: with both
    /// first datagrams waiting at once, both flows are created before either task runs (and
    /// tokio runs the later-spawned one first); otherwise client 1 sends only after client 0's
    /// flow has carried a reply.
    async fn replies_through_a_lossy_link(seed: u64, together: bool, n: u32) -> [Vec<u32>; 2] {
        let target = UdpSocket::bind(lo()).await.expect("bind target");
        let options = EmulatorOptions {
            seed: Some(seed),
            ..EmulatorOptions::default()
        };
        let link = LinkEmulator::spawn_with(
            lo(),
            target.local_addr().expect("addr"),
            LinkProfile::default(),
            options,
        )
        .await
        .expect("spawn");
        // Each client sends through a std socket (a send that never waits for the runtime) and
        // receives through a tokio clone of it.
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..2 {
            let s = std::net::UdpSocket::bind(lo()).expect("bind client");
            s.set_nonblocking(true).expect("nonblocking");
            let r = UdpSocket::from_std(s.try_clone().expect("clone")).expect("tokio socket");
            senders.push(s);
            receivers.push(r);
        }
        let mut flows = [lo(), lo()];
        let mut buf = [0u8; 64];
        // Each client's first datagram (`c` and its index) makes its flow; the target notes
        // the flow's address and answers it, still loss-free.
        let hello = |i: usize| vec![b'c', i as u8];
        if together {
            for (i, s) in senders.iter().enumerate() {
                s.send_to(&hello(i), link.local_addr()).expect("send");
            }
        }
        for (i, sender) in senders.iter().enumerate() {
            if !together {
                sender.send_to(&hello(i), link.local_addr()).expect("send");
            }
            let (len, from) =
                tokio::time::timeout(Duration::from_secs(5), target.recv_from(&mut buf))
                    .await
                    .expect("hello within 5 s")
                    .expect("recv");
            let c = usize::from(buf[1]);
            assert_eq!(len, 2);
            flows[c] = from;
            target.send_to(b"hi", from).await.expect("answer");
            if !together {
                let (len, _) =
                    tokio::time::timeout(Duration::from_secs(5), receivers[c].recv_from(&mut buf))
                        .await
                        .expect("answer within 5 s")
                        .expect("recv");
                assert_eq!(&buf[..len], b"hi");
            }
        }
        if together {
            for r in &receivers {
                let (len, _) = tokio::time::timeout(Duration::from_secs(5), r.recv_from(&mut buf))
                    .await
                    .expect("answer within 5 s")
                    .expect("recv");
                assert_eq!(&buf[..len], b"hi");
            }
        }
        link.set_profile(LinkProfile {
            loss: 0.5,
            ..LinkProfile::default()
        });
        for seq in 0..n {
            for flow in flows {
                target
                    .send_to(&seq.to_be_bytes(), flow)
                    .await
                    .expect("send reply");
            }
        }
        // Two hellos and their answers, then the replies.
        let handled = u64::from(2 * n) + 4;
        assert!(
            eventually(Duration::from_secs(10), || {
                let s = link.stats();
                s.forwarded + s.dropped_loss == handled
            })
            .await,
            "{:?}",
            link.stats()
        );
        // Forwarded on loopback is delivered: what came is in the sockets' buffers now (read
        // through the non-blocking std sockets, which never wait).
        let mut got = [Vec::new(), Vec::new()];
        for (c, s) in senders.iter().enumerate() {
            while let Ok((len, _)) = s.recv_from(&mut buf) {
                assert_eq!(len, 4);
                got[c].push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
            }
        }
        let s = link.stats();
        assert_eq!(
            (got[0].len() + got[1].len()) as u64,
            s.forwarded - 4,
            "what was forwarded arrived: {s:?}"
        );
        got
    }

    /// Each flow's draws come from a seed fixed by the order the flows were created in, not by
    /// the order their tasks happen to run in: the same seed and the same clients give the same
    /// losses, also when both flows start at once.
    #[test]
    fn a_seed_gives_each_flow_the_same_draws_however_its_task_is_scheduled() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        const N: u32 = 64;
        // On the worker, so that nothing of the emulator runs while the test sends.
        let (apart, together) = rt
            .block_on(async {
                tokio::spawn(async {
                    let apart = replies_through_a_lossy_link(11, false, N).await;
                    let together = replies_through_a_lossy_link(11, true, N).await;
                    (apart, together)
                })
                .await
            })
            .expect("test task");
        for got in &apart {
            assert!(
                !got.is_empty() && got.len() < N as usize,
                "loss 0.5 dropped none or all of {N}: {got:?}"
            );
        }
        assert_ne!(
            apart[0], apart[1],
            "both flows drew the same losses: the test could not tell them apart"
        );
        assert_eq!(apart, together, "the same seed gave other losses");
    }

    /// The return direction is one bottleneck for every client, as the way out is: a burst
    /// from the target to two clients at once is held to one buffer's worth in all. (Each
    /// client's replies had a queue and a rate of their own: twice the link's rate back with two
    /// clients, and twice its buffer.)
    #[tokio::test]
    async fn the_way_back_is_one_bottleneck_for_every_client() {
        let target = UdpSocket::bind(lo()).await.expect("bind target");
        let link = LinkEmulator::spawn(
            lo(),
            target.local_addr().expect("addr"),
            LinkProfile::default(),
        )
        .await
        .expect("spawn");
        let mut clients = Vec::new();
        let mut flows = Vec::new();
        let mut buf = [0u8; 2048];
        for i in 0..2u8 {
            let c = UdpSocket::bind(lo()).await.expect("bind client");
            c.send_to(&[i], link.local_addr()).await.expect("send");
            let (_, from) =
                tokio::time::timeout(Duration::from_secs(5), target.recv_from(&mut buf))
                    .await
                    .expect("hello within 5 s")
                    .expect("recv");
            clients.push(c);
            flows.push(from);
        }
        // 800 kbit/s: a 1,000-byte packet takes 10 ms; 100 ms of buffer holds 10 (11 with the
        // one on the wire), however many clients they are for.
        link.set_profile(
            LinkProfile::delay(ms(0)).with_rate(800_000, Latency::from_micros(100_000)),
        );
        let before = link.stats();
        for _ in 0..20 {
            for flow in &flows {
                target.send_to(&[7u8; 1000], flow).await.expect("send");
            }
        }
        assert!(
            eventually(Duration::from_secs(10), || link.stats().received
                == before.received + 40)
            .await,
            "{:?}",
            link.stats()
        );
        let dropped = link.stats().dropped_queue_full - before.dropped_queue_full;
        // One queue: 40 sent, at most about 11 taken (a slow sender gives it time to drain a
        // few). One per client: about 22 taken, 18 dropped.
        assert!(dropped >= 24, "{dropped} of 40 dropped: {:?}", link.stats());
    }

    /// A cut asked for with no length while none is in progress leaves the last one's record:
    /// what the link held during that cut is still lost. (It replaced the record with an empty
    /// cut, which loses nothing: the packets held through the earlier cut were delivered.)
    #[tokio::test]
    async fn an_empty_cut_after_a_cut_does_not_bring_back_what_it_held() {
        let sink = UdpSocket::bind(lo()).await.expect("bind sink");
        let (link, _client) = holding_one(&sink).await;
        link.cut_for(Duration::from_millis(100));
        assert!(eventually(Duration::from_secs(5), || !link.is_cut()).await);
        link.cut_for(Duration::ZERO);
        assert!(
            eventually(Duration::from_secs(10), || link.stats().dropped_cut == 1).await,
            "{:?}",
            link.stats()
        );
        assert_eq!(link.stats().forwarded, 0);
    }

    #[tokio::test]
    async fn each_client_gets_its_own_flow_and_its_own_replies() {
        let echo = echo_server().await;
        let link = LinkEmulator::spawn(lo(), echo, LinkProfile::delay(ms(3)))
            .await
            .expect("spawn");
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(UdpSocket::bind(lo()).await.expect("bind client"));
        }
        for (i, c) in clients.iter().enumerate() {
            c.send_to(&(i as u32).to_be_bytes(), link.local_addr())
                .await
                .expect("send");
        }
        for (i, c) in clients.iter().enumerate() {
            let mut buf = [0u8; 16];
            let (n, from) = tokio::time::timeout(Duration::from_secs(5), c.recv_from(&mut buf))
                .await
                .expect("reply within 5 s")
                .expect("recv");
            assert_eq!(
                from,
                link.local_addr(),
                "replies come from the emulator's address"
            );
            assert_eq!(
                &buf[..n],
                &(i as u32).to_be_bytes(),
                "client {i} got another client's reply"
            );
        }
    }

    /// A link to `target` with `delay` and a queue of 10 packets each way.
    async fn ten_packet_queue(target: &UdpSocket, delay: u64) -> LinkHandle {
        let options = EmulatorOptions {
            queue_limit: 10,
            ..EmulatorOptions::default()
        };
        LinkEmulator::spawn_with(
            lo(),
            target.local_addr().expect("addr"),
            LinkProfile::delay(ms(delay)),
            options,
        )
        .await
        .expect("spawn")
    }

    /// Sends packets numbered `range` from `client` into `link`, and waits until the link has
    /// received them all (`range.end` in all).
    async fn burst(client: &UdpSocket, link: &LinkHandle, range: std::ops::Range<u32>) {
        let all = u64::from(range.end);
        for i in range {
            client
                .send_to(&i.to_be_bytes(), link.local_addr())
                .await
                .expect("send");
        }
        assert!(
            eventually(Duration::from_secs(5), || link.stats().received == all).await,
            "{:?}",
            link.stats()
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let sink = UdpSocket::bind(lo()).await.expect("bind sink");
        let link = ten_packet_queue(&sink, 300).await;
        let client = UdpSocket::bind(lo()).await.expect("bind client");
        burst(&client, &link, 0..50).await;
        let stats = link.stats();
        assert_eq!(stats.dropped_queue_full, 40, "{stats:?}");
        assert!(
            eventually(Duration::from_secs(5), || link.stats().forwarded == 10).await,
            "{:?}",
            link.stats()
        );
    }

    /// The queues are per direction: a client filling the one toward the target does not keep
    /// the target's answers from coming back. (One queue for both dropped them.)
    #[tokio::test]
    async fn a_full_queue_one_way_leaves_the_other_way_open() {
        let target = UdpSocket::bind(lo()).await.expect("bind target");
        // Long enough that the client's queue is still full when the answer comes, however slow
        // the machine is to send the second burst.
        let link = ten_packet_queue(&target, 2000).await;
        let client = UdpSocket::bind(lo()).await.expect("bind client");
        burst(&client, &link, 0..50).await;
        assert_eq!(link.stats().dropped_queue_full, 40, "{:?}", link.stats());
        // The first packets arrive (2 s later); the client fills its direction again, and
        // the flow's answer goes back while that queue is full.
        let (_, flow) = recv_one(&target).await;
        burst(&client, &link, 50..100).await;
        let dropped = link.stats().dropped_queue_full;
        assert!(
            dropped >= 80,
            "the client's direction is not full: {dropped} dropped"
        );
        target.send_to(b"answer", flow).await.expect("answer");
        assert_eq!(recv_one(&client).await.0, b"answer");
        assert_eq!(
            link.stats().dropped_queue_full,
            dropped,
            "{:?}",
            link.stats()
        );
    }

    /// A profile with a delay beyond what a clock can add (`Duration::MAX`) holds packets, and
    /// the relay goes on taking them. (The addition panicked in the reader task, which stopped
    /// relaying that way for good: the second packet was never read.)
    #[tokio::test]
    async fn an_absurd_delay_holds_packets_and_the_relay_goes_on() {
        let target = UdpSocket::bind(lo()).await.expect("bind target");
        let link = LinkEmulator::spawn(
            lo(),
            target.local_addr().expect("addr"),
            LinkProfile {
                delay: Latency::from_duration(Duration::MAX),
                jitter: Latency::from_duration(Duration::MAX),
                ..LinkProfile::default()
            },
        )
        .await
        .expect("spawn");
        let client = UdpSocket::bind(lo()).await.expect("bind client");
        burst(&client, &link, 0..2).await;
        assert_eq!(link.stats().forwarded, 0, "{:?}", link.stats());
    }

    /// Receives one datagram on `sock` within 5 s.
    async fn recv_one(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = [0u8; 64];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .expect("datagram within 5 s")
            .expect("recv");
        (buf[..n].to_vec(), from)
    }

    /// A timed cut drops what comes either way until its deadline, then the link carries
    /// packets again with nothing more asked of it.
    #[tokio::test]
    async fn a_timed_cut_drops_both_ways_and_ends_on_its_own_at_its_deadline() {
        const CUT: Duration = Duration::from_millis(1500);
        let target = UdpSocket::bind(lo()).await.expect("bind target");
        let link = LinkEmulator::spawn(
            lo(),
            target.local_addr().expect("addr"),
            LinkProfile::default(),
        )
        .await
        .expect("spawn");
        let client = UdpSocket::bind(lo()).await.expect("bind client");
        // The client's flow, and an answer back through it.
        client
            .send_to(b"hello", link.local_addr())
            .await
            .expect("send");
        let (got, flow) = recv_one(&target).await;
        assert_eq!(got, b"hello");
        target.send_to(b"hi", flow).await.expect("answer");
        assert_eq!(recv_one(&client).await.0, b"hi");

        let start = std::time::Instant::now();
        link.cut_for(CUT);
        assert!(link.is_cut());
        client
            .send_to(b"lost up", link.local_addr())
            .await
            .expect("send");
        target.send_to(b"lost down", flow).await.expect("send");
        assert!(
            eventually(Duration::from_secs(5), || link.stats().dropped_cut == 2).await,
            "{:?}",
            link.stats()
        );
        assert!(
            start.elapsed() < CUT,
            "the test ran too late to send within the cut: {:?}",
            start.elapsed()
        );
        assert_eq!(link.stats().forwarded, 2, "{:?}", link.stats());

        // Nothing more is asked of the link: the client sends until the target hears it.
        let heard = async {
            loop {
                client
                    .send_to(b"again", link.local_addr())
                    .await
                    .expect("send");
                let mut buf = [0u8; 64];
                if let Ok(r) =
                    tokio::time::timeout(Duration::from_millis(20), target.recv_from(&mut buf))
                        .await
                {
                    let (n, _) = r.expect("recv");
                    return buf[..n].to_vec();
                }
            }
        };
        let got = tokio::time::timeout(Duration::from_secs(10), heard)
            .await
            .expect("the link carries packets again within 10 s");
        let back_after = start.elapsed();
        // The first datagram through is one sent after the deadline, not the one cut.
        assert_eq!(got, b"again");
        assert!(
            back_after >= CUT,
            "a packet passed {back_after:?} into a {CUT:?} cut"
        );
        assert!(!link.is_cut());
        // The other way too, and what was cut that way never arrives.
        target.send_to(b"back", flow).await.expect("send");
        assert_eq!(recv_one(&client).await.0, b"back");
        assert_eq!(
            link.profile(),
            LinkProfile::default(),
            "the profile is kept"
        );
        println!("link back {back_after:?} after a {CUT:?} cut");
    }

    /// A link to `sink` with 1 s of delay, holding one datagram (`held`) from the client
    /// returned: received, not yet due.
    async fn holding_one(sink: &UdpSocket) -> (LinkHandle, UdpSocket) {
        let link = LinkEmulator::spawn(
            lo(),
            sink.local_addr().expect("addr"),
            LinkProfile::delay(ms(1000)),
        )
        .await
        .expect("spawn");
        let client = UdpSocket::bind(lo()).await.expect("bind client");
        client
            .send_to(b"held", link.local_addr())
            .await
            .expect("send");
        assert!(
            eventually(Duration::from_secs(5), || link.stats().received == 1).await,
            "{:?}",
            link.stats()
        );
        (link, client)
    }

    /// A packet the link still holds (its delay) when a cut begins is lost, although it is due
    /// after the cut: it was on the link during it.
    #[tokio::test]
    async fn a_cut_loses_the_packets_the_link_was_holding() {
        let sink = UdpSocket::bind(lo()).await.expect("bind sink");
        let (link, client) = holding_one(&sink).await;
        link.cut_for(Duration::from_millis(100));
        assert!(
            eventually(Duration::from_secs(5), || !link.is_cut()).await,
            "the cut ended"
        );
        client
            .send_to(b"after", link.local_addr())
            .await
            .expect("send");
        assert_eq!(recv_one(&sink).await.0, b"after", "{:?}", link.stats());
        // Counted once sent, a moment after the sink may have it.
        assert!(
            eventually(Duration::from_secs(5), || link.stats().forwarded == 1).await,
            "{:?}",
            link.stats()
        );
        assert_eq!(link.stats().dropped_cut, 1, "{:?}", link.stats());
    }

    /// A cut made while one is in progress moves its end: `Duration::ZERO` ends it at once,
    /// and what the link held during it is still lost; with no cut in progress an empty cut
    /// loses nothing. A duration no `Instant` holds cuts for good, without a panic.
    #[tokio::test]
    async fn a_new_cut_moves_the_end_of_the_one_in_progress() {
        let sink = UdpSocket::bind(lo()).await.expect("bind sink");
        let link = LinkEmulator::spawn(
            lo(),
            sink.local_addr().expect("addr"),
            LinkProfile::delay(ms(1000)),
        )
        .await
        .expect("spawn");
        let client = UdpSocket::bind(lo()).await.expect("bind client");
        let to = link.local_addr();
        let received = |n: u64| {
            let link = &link;
            async move { eventually(Duration::from_secs(5), || link.stats().received == n).await }
        };
        client.send_to(b"kept", to).await.expect("send");
        assert!(received(1).await, "{:?}", link.stats());
        link.cut_for(Duration::ZERO);
        assert!(!link.is_cut());
        assert_eq!(recv_one(&sink).await.0, b"kept", "{:?}", link.stats());
        client.send_to(b"held", to).await.expect("send");
        assert!(received(2).await, "{:?}", link.stats());
        link.cut_for(Duration::MAX);
        assert!(link.is_cut());
        client.send_to(b"lost", to).await.expect("send");
        assert!(received(3).await, "{:?}", link.stats());
        assert_eq!(link.stats().dropped_cut, 1, "{:?}", link.stats());
        link.cut_for(Duration::ZERO);
        assert!(!link.is_cut());
        client.send_to(b"after", to).await.expect("send");
        // "held", due first, was held during the cut.
        assert_eq!(recv_one(&sink).await.0, b"after", "{:?}", link.stats());
        assert!(
            eventually(Duration::from_secs(5), || link.stats().forwarded == 2).await,
            "{:?}",
            link.stats()
        );
        assert_eq!(link.stats().dropped_cut, 2, "{:?}", link.stats());
    }

    #[tokio::test]
    async fn shutdown_stops_relaying() {
        let echo = echo_server().await;
        let link = LinkEmulator::spawn(lo(), echo, LinkProfile::default())
            .await
            .expect("spawn");
        let client = UdpSocket::bind(lo()).await.expect("bind client");
        rtt(&client, link.local_addr(), 1).await;
        let addr = link.local_addr();
        link.shutdown();
        // The listen socket is released once its tasks have stopped.
        let mut rebound = false;
        for _ in 0..200 {
            if std::net::UdpSocket::bind(addr).is_ok() {
                rebound = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(rebound, "listen address {addr} still bound after shutdown");
    }
}
