//! The pool of neighbour connections: one dialled QUIC connection per neighbour, kept up with
//! reconnect backoff, probed BFD-style, and handed to streams only while the neighbour is up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rand::Rng;
use tokio::time::Instant;
use topology::NodeId;

use crate::Shared;
use crate::codes::close;
use crate::probe::Probe;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a connection that answered probes must have lasted for the back-off to start over
/// (and the neighbour's wakes to be heeded again): one that answers a ping and is then closed,
/// again and again (a peer in a crash loop, or a misbehaving one), is redialled at the growing
/// back-off, not every 50-75 ms.
const STABLE_FOR: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A dial still pending this long when the neighbour has connected to us lost its Initial: it
/// is made again at once. Quinn sends a lost Initial again at its probe timeout, about 1 s after
/// the first (which reaches a neighbour back by then), then only 2 s after that, with
/// [`CONNECT_TIMEOUT`]. Past the first resend, not before: a dial given up leaves its connection
/// closing on the endpoint for three probe timeouts (3 s), and one resend would have made it.
const STUCK_AFTER: Duration = Duration::from_millis(1500);

pub(crate) struct Neighbour {
    pub id: NodeId,
    pub addr: SocketAddr,
    /// Set only while the neighbour is up (connected, answering probes, past its hold-down).
    conn: ArcSwapOption<quinn::Connection>,
    /// The dialer's connection, up or not (down after a verdict, or answering in a hold-down):
    /// its lost packets are added to `lost_before` once, by whoever takes it out
    /// ([`Neighbour::end_live`]: the dialer at the connection's end, or a snapshot that moves
    /// the neighbour and aborts the dialer).
    live: ArcSwapOption<quinn::Connection>,
    up: AtomicBool,
    /// The link's RTT as routing takes it: the lowest sampled over the last [`MIN_RTT_WINDOW`]
    /// ([`MinRtt`]), in microseconds (0 until the first connection).
    rtt_us: AtomicU64,
    /// QUIC's smoothed RTT of our connection to it, queueing included (metrics only).
    srtt_us: AtomicU64,
    /// Dial attempts that ended without a usable connection: refused, no answer within
    /// `CONNECT_TIMEOUT` (or within `STUCK_AFTER`, given up when the neighbour connected to us),
    /// or closed before it answered a probe (the peer refused our certificate).
    dial_failures: AtomicU64,
    /// Packets QUIC declared lost on this neighbour's connections that have ended (added when
    /// one ends, after it is taken down): with the live connection's, a counter that does not
    /// go back to 0 at each reconnect.
    lost_before: AtomicU64,
    /// The most [`Neighbour::path`] has answered for the lost packets: a read that races a connection's end
    /// (the connection gone, its count not yet added) is not shown lower than the one before.
    lost_shown: AtomicU64,
    /// Since when it is held down after a down verdict ([`ProbeConfig::hold_down`]; `None`:
    /// no hold-down runs). Here, not in its dialer: a neighbour a snapshot moves goes on with
    /// the hold-down of the one it replaces ([`Neighbour::succeed`]).
    ///
    /// [`ProbeConfig::hold_down`]: crate::ProbeConfig::hold_down
    down_since: std::sync::Mutex<Option<Instant>>,
    /// Woken when the neighbour is declared down: streams still waiting for their first answer
    /// through it give up and try the next candidate instead of waiting for the connection to
    /// close ([`DEAD_AFTER`]).
    went_down: tokio::sync::Notify,
    /// Woken when the neighbour connects to us ([`Neighbour::peer_connected`]): a dialer waiting
    /// out its backoff, or an attempt stuck on a lost Initial, dials again at once (once until a
    /// dial makes a connection, [`run_dialer`]).
    wake: tokio::sync::Notify,
}

impl Neighbour {
    pub fn new(id: NodeId, addr: SocketAddr) -> Self {
        Neighbour {
            id,
            addr,
            conn: ArcSwapOption::empty(),
            live: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            rtt_us: AtomicU64::new(0),
            srtt_us: AtomicU64::new(0),
            dial_failures: AtomicU64::new(0),
            lost_before: AtomicU64::new(0),
            lost_shown: AtomicU64::new(0),
            down_since: std::sync::Mutex::new(None),
            went_down: tokio::sync::Notify::new(),
            wake: tokio::sync::Notify::new(),
        }
    }
    /// Hot path: one atomic load, and the connection's lock to see whether it is closed.
    /// `None` while the neighbour is down, and once its connection is closed though its dialer
    /// has not seen it yet (the peer's close, a stateless reset): handed out, it failed every
    /// stream opened on it at once, so a client connection spent all its tries on candidates
    /// behind this neighbour in microseconds.
    pub fn connection(&self) -> Option<Arc<quinn::Connection>> {
        self.conn.load_full().filter(|c| c.close_reason().is_none())
    }
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }
    pub fn rtt_us(&self) -> u64 {
        self.rtt_us.load(Relaxed)
    }
    pub fn srtt_us(&self) -> u64 {
        self.srtt_us.load(Relaxed)
    }
    pub fn dial_failures(&self) -> u64 {
        self.dial_failures.load(Relaxed)
    }
    /// The live connection's path statistics (`None` while down) and the packets QUIC
    /// declared lost to this neighbour since the router started (its
    /// `neighbour_lost_packets_total`): on the connections this router dialled, ended and live,
    /// and `incoming_lost` on those the neighbour dialled ([`crate::inbound::PeerConnections::
    /// lost_packets`]: the answers to its streams go back on those). Never lower than an earlier
    /// answer.
    pub fn path(&self, incoming_lost: u64) -> (Option<quinn::PathStats>, u64) {
        let (path, dialled) = self.dialled_lost();
        let v = dialled.saturating_add(incoming_lost);
        (path, self.lost_shown.fetch_max(v, SeqCst).max(v))
    }
    /// The live connection's path statistics and the packets lost on the connections this
    /// router dialled, ended and live. The live one is the dialer's, up or not: a neighbour in
    /// its hold-down, whose connection is open and answering probes, shows the loss and path MTU
    /// measured on it (read only while it was up, they stood still while the hold-down ran, the
    /// time an operator looks at loss, then jumped once it ended).
    fn dialled_lost(&self) -> (Option<quinn::PathStats>, u64) {
        // The ended connections' first: a connection that ends between the two reads is then
        // counted in neither (shown no lower than before, in `path`), never in both.
        let before = self.lost_before.load(SeqCst);
        let path = self.live.load_full().map(|c| c.stats().path);
        (
            path,
            before.saturating_add(path.map_or(0, |p| p.lost_packets)),
        )
    }
    /// A connection of this neighbour ended (it is down: [`Neighbour::connection`] is `None`):
    /// its lost packets count from now on as the ended ones of [`Neighbour::path`].
    fn connection_ended(&self, conn: &quinn::Connection) {
        self.lost_before
            .fetch_add(conn.stats().path.lost_packets, SeqCst);
    }
    /// The dialer's connection ended, or is about to be closed with the dialer aborted: its
    /// lost packets count from now on as ended ones (once: the first caller takes it).
    pub(crate) fn end_live(&self) {
        if let Some(c) = self.live.swap(None) {
            self.connection_ended(&c);
        }
    }
    /// This neighbour replaces `old`, the same node at another address (a snapshot moved it):
    /// its counters go on from `old`'s instead of falling back to 0 under the same labels, and
    /// its hold-down too (a neighbour that went down a moment before stays down for the rest of
    /// it, wherever it is reached now). `old`'s live connection is read before it is closed.
    pub fn succeed(&self, old: &Neighbour) {
        self.dial_failures.store(old.dial_failures(), Relaxed);
        self.lost_before.store(old.dialled_lost().1, SeqCst);
        self.set_down_since(old.down_since());
    }
    fn down_since(&self) -> Option<Instant> {
        *self
            .down_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn set_down_since(&self, t: Option<Instant>) {
        *self
            .down_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = t;
    }
    fn set_up(&self, conn: &quinn::Connection) {
        self.conn.store(Some(Arc::new(conn.clone())));
        self.up.store(true, Relaxed);
    }
    fn set_down(&self) {
        self.conn.store(None);
        self.up.store(false, Relaxed);
        self.went_down.notify_waiters();
    }
    /// The neighbour's own connection to this router was accepted: it is reachable now. Wakes
    /// our dialer if it is between attempts or in one (not while it holds a connection, nor
    /// after a first wake until a dial makes a connection: [`run_dialer`]).
    pub fn peer_connected(&self) {
        self.wake.notify_waiters();
    }
    /// Completes when the neighbour is declared down after this call (check [`Neighbour::is_up`]
    /// after creating it).
    pub fn went_down(&self) -> tokio::sync::futures::Notified<'_> {
        self.went_down.notified()
    }
}

/// Closes a neighbour's connection when dropped ([`run_dialer`] aborted).
struct CloseOnDrop<'a>(&'a quinn::Connection);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        if self.0.close_reason().is_none() {
            self.0
                .close(quinn::VarInt::from_u32(close::NORMAL), b"topology changed");
        }
    }
}

/// Dials `nb` forever (until aborted), with exponential backoff and jitter between attempts.
///
/// A connection counts as made only once it has answered a probe: the handshake completes on
/// our side before the peer has checked the certificate we sent, so a peer refusing it (expired,
/// or not for a node of its topology) closes a connection we already hold. That is a failed dial
/// (counted, backed off), not a connection lost: redialling at once would cost the peer a
/// handshake every [`BACKOFF_MIN`] for as long as it refuses us.
///
/// The hold-down (a neighbour that went down comes back up only [`ProbeConfig::hold_down`] after
/// it last failed) is for flapping neighbours: it starts when the neighbour is declared down
/// (missed probes) or its connection is lost, and starts over at every failure before it is up
/// again (missed probes again, [`Verdict::Relapse`], or another connection lost), so that a
/// neighbour failing more often than the hold-down stays down instead of flapping the routes.
/// Failed dials to a neighbour never connected yet (it starts later than this router) do not
/// start it, so such a neighbour is up at its first answered probe.
///
/// The neighbour's own connection to us, accepted ([`Neighbour::peer_connected`]), says it is
/// back: the dialer then stops waiting and dials at once: out of its backoff (up to 3 s after a
/// long outage), or out of an attempt pending for [`STUCK_AFTER`], whose Initial went to the
/// neighbour while it was away and would be sent again only at QUIC's probe timeout, within
/// [`CONNECT_TIMEOUT`]. A neighbour returning from a long outage is so up again about when its
/// hold-down allows. The attempt given up counts as a failed dial.
///
/// One wake is heeded until a dial makes a connection again: once a wake has cut a backoff short
/// or given up an attempt, the dial it brought on is left to its end, and if it fails it is
/// counted and followed by the full backoff, as any failed dial, with wakes ignored. A neighbour
/// that connects to us but does not take our dials (drops or refuses them, or refuses our
/// certificate) so gets one early dial, not one per connection it makes: it cannot drive our
/// dial rate above the backoff's.
///
/// [`ProbeConfig::hold_down`]: crate::ProbeConfig::hold_down
pub(crate) async fn run_dialer(shared: Arc<Shared>, nb: Arc<Neighbour>) {
    let mut backoff = BACKOFF_MIN;
    // Cleared when a wake is acted on, set again when a dial makes a connection.
    let mut heed_wakes = true;
    loop {
        // Registered before the attempt, so that a connection accepted from the neighbour
        // during it or before the backoff sleep below is not missed.
        let woken = nb.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let attempt = async {
            let connecting = shared.endpoint.connect(nb.addr, nb.id.as_str()).ok()?;
            tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                .await
                .ok()?
                .ok()
        };
        // The neighbour connecting to us during the attempt says it is there: an attempt still
        // pending `STUCK_AFTER` after it began has lost its Initial, and is made again. A younger
        // one is left alone: a handshake under way (both ends dial each other at start), or one
        // that quinn's first resend of the Initial will complete.
        let stuck_at = tokio::time::Instant::now() + STUCK_AFTER;
        tokio::pin!(attempt);
        let mut peer_back = false;
        let made = loop {
            tokio::select! {
                made = &mut attempt => break made,
                _ = woken.as_mut(), if heed_wakes && !peer_back => peer_back = true,
                _ = tokio::time::sleep_until(stuck_at), if peer_back => break None,
            }
        };
        if made.is_none() && peer_back {
            nb.dial_failures.fetch_add(1, Relaxed);
            heed_wakes = false;
            tracing::debug!(node = %shared.node, neighbour = %nb.id, "neighbour connected to us: dialling again");
            continue;
        }
        if let Some(conn) = made {
            tracing::debug!(node = %shared.node, neighbour = %nb.id, "connected");
            let _trust_watch = crate::tls::watch_trust(shared.cert.clone(), conn.clone());
            // The dialer aborted (the link left the topology, or its address changed) while
            // it holds the connection closes it, down or up: streams still on it must not run
            // on unprobed and unwatched. (Ended here, it is closed already.)
            let _close = CloseOnDrop(&conn);
            nb.live.store(Some(Arc::new(conn.clone())));
            let began = Instant::now();
            let answered = probe_until_down(&shared, &nb, &conn).await;
            if nb.is_up() {
                // Down because its connection ended (the neighbour restarted or drained, a
                // stateless reset, the idle timeout): logged and counted as a missed-probes
                // verdict is (it went down with neither). Not when this router closed it (its
                // own stop, or its trust watch): nothing is wrong with the neighbour.
                let reason = conn.close_reason();
                let ours = matches!(&reason, Some(quinn::ConnectionError::LocallyClosed))
                    || *shared.shutdown.borrow();
                let orderly = matches!(&reason, Some(quinn::ConnectionError::ApplicationClosed(c))
                    if c.error_code == quinn::VarInt::from_u32(close::NORMAL));
                if ours {
                    tracing::debug!(node = %shared.node, neighbour = %nb.id, "connection to the neighbour closed by this router");
                } else if orderly {
                    tracing::info!(node = %shared.node, neighbour = %nb.id, "neighbour down: it closed its connection");
                } else {
                    tracing::warn!(node = %shared.node, neighbour = %nb.id, reason = ?reason, "neighbour down: its connection ended");
                }
                if !ours {
                    shared.metrics.neighbour_down_total.fetch_add(1, Relaxed);
                }
                nb.set_down();
                shared.changed.notify_one();
            }
            // Also when it was not up (in its hold-down, it answered on this connection and so
            // spoke for itself again): its own word ends with the connection.
            shared.evidence.unheard(&nb.id);
            nb.end_live();
            if answered {
                nb.set_down_since(Some(Instant::now()));
                if began.elapsed() >= STABLE_FOR {
                    backoff = BACKOFF_MIN;
                    heed_wakes = true;
                }
            } else {
                nb.dial_failures.fetch_add(1, Relaxed);
                tracing::debug!(node = %shared.node, neighbour = %nb.id,
                    reason = ?conn.close_reason(), "connection closed before answering a probe");
            }
            // What woke it while it held a connection is old news.
            woken.set(nb.wake.notified());
            woken.as_mut().enable();
        } else {
            nb.dial_failures.fetch_add(1, Relaxed);
            tracing::debug!(node = %shared.node, neighbour = %nb.id, "dial failed");
        }
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::select! {
            _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
            _ = woken.as_mut(), if heed_wakes => {
                heed_wakes = false;
                tracing::debug!(node = %shared.node, neighbour = %nb.id, "neighbour connected to us: backoff cut short");
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Shortest time a probe may take to be answered before it counts as missed (scheduling noise
/// on a busy host, the peer's ACK delay). The real bound is `3 x smoothed RTT` when that is longer.
pub(crate) const MIN_PROBE_TIMEOUT: Duration = Duration::from_millis(30);

/// How long a probe may go unanswered before it counts as missed: 3 x the smoothed RTT, at least
/// [`MIN_PROBE_TIMEOUT`].
pub(crate) fn probe_timeout(rtt: Duration) -> Duration {
    (rtt * 3).max(MIN_PROBE_TIMEOUT)
}

/// How far back [`MinRtt`] looks: BBR's min-RTT filter length. A queue that lasts less than this
/// (a transfer's own, on the link it crosses) does not raise the link's cost; a lasting rise (a
/// longer path under the link, a queue that does not drain) shows within it.
pub(crate) const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// [`MIN_RTT_WINDOW`] in slots of one second: the window moves one slot at a time.
const MIN_RTT_SLOTS: usize = MIN_RTT_WINDOW.as_secs() as usize;

/// The lowest RTT sampled over the last [`MIN_RTT_WINDOW`] (9 to 10 s: one minimum per second,
/// the last ten seconds kept), which routing takes a link's latency from. QUIC's smoothed RTT of
/// the connection carrying traffic includes the queue that traffic builds at the link's
/// bottleneck: routing on it, a bulk upload made its own path look far, and moved every new
/// client to a farther site while it ran. The minimum is the propagation delay plus the least
/// queueing seen; it falls at once and rises only when a whole window has gone by above it.
/// Samples: each probe's round trip and QUIC's smoothed RTT when its answer comes, the lower.
pub(crate) struct MinRtt {
    start: tokio::time::Instant,
    /// Per slot: (the second since `start` it holds, the lowest sample in that second).
    slots: [(u64, Duration); MIN_RTT_SLOTS],
}

impl MinRtt {
    /// A filter whose first sample, taken at `now`, is `rtt`.
    pub fn new(now: tokio::time::Instant, rtt: Duration) -> Self {
        let mut m = MinRtt {
            start: now,
            slots: [(u64::MAX, Duration::MAX); MIN_RTT_SLOTS],
        };
        m.sample(now, rtt);
        m
    }

    /// Takes the sample `rtt` seen at `now`; returns the lowest of the window.
    pub fn sample(&mut self, now: tokio::time::Instant, rtt: Duration) -> Duration {
        let second = now.saturating_duration_since(self.start).as_secs();
        let slot = &mut self.slots[(second % MIN_RTT_SLOTS as u64) as usize];
        if slot.0 != second {
            *slot = (second, rtt);
        } else {
            slot.1 = slot.1.min(rtt);
        }
        self.slots
            .iter()
            .filter(|(s, _)| *s != u64::MAX && *s + MIN_RTT_SLOTS as u64 > second)
            .map(|(_, rtt)| *rtt)
            .min()
            .unwrap_or(rtt)
    }
}

/// What the liveness detector wants done at its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `misses` probes in a row went unanswered (or no sign of life for [`Liveness::detect`]).
    Down,
    /// The outstanding probe was missed: send another one now (fast re-probe).
    Reprobe,
    /// The deadline was met late because this router itself was not running: nothing is
    /// judged; send another probe now ([`Liveness::stalled`]).
    Stalled,
    /// Declared down, then [`DEAD_AFTER`] without any packet: close the connection.
    Dead,
    /// Declared down and not up again yet, it failed the same test again (`misses` probes in a
    /// row, or no sign of life for [`Liveness::detect`]): its hold-down starts over, so that a
    /// neighbour flapping faster than the hold-down stays down instead of flapping the routes.
    Relapse,
}

/// Longest silence (no packet at all from the peer) tolerated whatever else holds, even while
/// this router's own probes could not leave (see [`Liveness::unsent`]).
pub(crate) const HARD_SILENCE: Duration = Duration::from_secs(2);

/// How long a neighbour declared down may stay silent (no packet at all) before its connection
/// is closed, resetting the streams still open on it. A down verdict only stops new streams:
/// a peer that was silent for a few hundred ms because it (or this router) was starved of CPU
/// comes back without its transfers being cut, and a dead one's streams end after this.
pub(crate) const DEAD_AFTER: Duration = Duration::from_secs(1);

/// How many deadlines in a row, met late by this router's own stall, may re-probe instead of
/// judging the peer ([`Liveness::stalled`]).
pub(crate) const MAX_STALL_GRACES: u32 = 3;

/// BFD-style liveness of one neighbour connection, as a pure state machine (times are passed in).
///
/// A probe is *missed* when neither its reply nor any other packet from the peer arrived within
/// its timeout ([`probe_timeout`]). Probes go out every `interval` while the peer answers; after
/// a miss the next probe goes out at once (fast re-probe, like HAProxy's `fastinter`), so that
/// `misses` consecutive misses confirm a dead peer in about `interval + misses x timeout`
/// (190 ms with the defaults on a short link) instead of `interval x misses`. Whatever happens,
/// no sign of life for `interval x misses` plus a slack is also down (the classic rule; it
/// decides on links whose RTT makes the timeout long). A reply resets the count: one or two lost
/// probes or replies never take a link down.
///
/// The classic rule's slack ([`Liveness::detect`]): replies come `interval` apart, so after
/// `misses - 1` lost ones the next reply is due exactly `interval x misses` after the last; without
/// a slack the verdict and that reply race, and on a long link (where the re-probe's timeout is
/// longer than the classic rule) any jitter decides. The slack is `max(interval / 2, 4 x RTT
/// variation)`, the variation measured from the probes' own round trips. The classic rule counts
/// from the first reply due on a new connection (one handshake RTT after it was made,
/// [`Liveness::for_connection`]), not from the handshake: a link whose RTT is longer than
/// `interval x misses` would otherwise be declared down before its first reply could arrive.
///
/// Probes are QUIC DATAGRAM frames, which are congestion-controlled: after a burst of loss under
/// a bulk transfer the congestion window can stay full until quinn's loss-probe timer fires, and
/// nothing at all is sent to the peer (so it has nothing to answer). A probe that has not left
/// this router is not held against the peer ([`Liveness::unsent`]); [`HARD_SILENCE`] bounds that.
///
/// Nor is a stall of this router's own process (starved of CPU, paused): its deadline's timer
/// then fires late, and the peer's replies may be waiting unread in this router's own socket.
/// A deadline met more than a probe timeout late re-probes instead of judging
/// ([`Liveness::stalled`]), up to [`MAX_STALL_GRACES`] times in a row without hearing from the
/// peer, which bounds what a router that keeps stalling adds to a dead peer's detection.
#[derive(Debug)]
pub(crate) struct Liveness {
    /// `interval x misses`: the classic rule's silence, before its slack.
    misses_time: Duration,
    interval: Duration,
    /// Smoothed RTT and its mean deviation over the probes' round trips (RFC 6298's estimator),
    /// for the classic rule's slack.
    srtt: Option<Duration>,
    rttvar: Duration,
    misses_needed: u32,
    /// Last reply (or traffic credited as a sign of life).
    last_alive: tokio::time::Instant,
    /// Last packet of any kind from the peer (for [`HARD_SILENCE`]).
    last_heard: tokio::time::Instant,
    /// Deadline of the oldest probe not yet answered.
    outstanding: Option<tokio::time::Instant>,
    /// The sequence number of that probe: a late answer to an older one does not answer it.
    outstanding_seq: u64,
    /// The last probe's sequence number (the first is 1).
    sent: u64,
    misses: u32,
    /// Stall graces given since the peer last answered ([`Liveness::stalled`]).
    graces: u32,
    /// A `Down` verdict was given and the peer has not [`Liveness::recovered`] since: probes go
    /// on being judged (a failure is a [`Verdict::Relapse`]), and [`DEAD_AFTER`] of silence
    /// closes the connection.
    down: bool,
    /// The connection's handshake RTT ([`Liveness::for_connection`]): the first probe sample is
    /// capped as later ones are, from it.
    handshake_rtt: Option<Duration>,
    /// When the last `Down` verdict was given: a deadline it moved into the past (the silence
    /// allowed once down is shorter) was not missed by a stall of this router's.
    judged: tokio::time::Instant,
}

impl Liveness {
    pub fn new(p: crate::ProbeConfig, now: tokio::time::Instant) -> Self {
        let misses_needed = p.misses.max(1);
        Liveness {
            misses_time: p.interval * misses_needed,
            interval: p.interval,
            srtt: None,
            rttvar: Duration::ZERO,
            misses_needed,
            last_alive: now,
            last_heard: now,
            outstanding: None,
            outstanding_seq: 0,
            sent: 0,
            misses: 0,
            graces: 0,
            down: false,
            handshake_rtt: None,
            judged: now,
        }
    }
    /// The detector of a connection made at `now` with a handshake RTT of `rtt`: the classic rule
    /// counts from `now + rtt`, when the first reply is due at the earliest (probes go out from
    /// `now` on).
    pub fn for_connection(p: crate::ProbeConfig, now: tokio::time::Instant, rtt: Duration) -> Self {
        let mut live = Liveness::new(p, now);
        live.last_alive = now + rtt;
        live.handshake_rtt = Some(rtt);
        live
    }
    /// How long without a sign of life is down whatever the probes' timeouts say: `interval x
    /// misses` plus a slack of `max(interval / 2, 4 x RTT variation)` (see [`Liveness`]).
    pub fn detect(&self) -> Duration {
        self.misses_time + (self.interval / 2).max(self.rttvar * 4)
    }
    /// A probe's round trip took `rtt` (RFC 6298's smoothing: the variation moves by a quarter
    /// of each new deviation, the average by an eighth). A sample counts for at most the
    /// average plus the slack in force (`max(interval / 2, 4 x variation)`): one far longer
    /// than the rest is mostly this router's own delay (a pong read after a stall, a probe that
    /// sat behind a full congestion window), and whole it widened the slack for seconds (1 s on
    /// a 300 us link: a silence of 1.3 s, not 350 ms, was down). Jitter within the slack is
    /// measured as ever and widens it; a path that really got longer moves the average there
    /// sample by sample (the slack judges silence, which a longer path alone does not make).
    /// The first sample of a connection is capped likewise from its handshake RTT (as an
    /// average with half of it as the variation): a first pong read late (this router busy just
    /// after the handshake) widened the slack for seconds after every reconnect.
    pub fn rtt_sample(&mut self, rtt: Duration) {
        let rtt = match (self.srtt, self.handshake_rtt) {
            (Some(srtt), _) => rtt.min(srtt + (self.interval / 2).max(self.rttvar * 4)),
            (None, Some(h)) => rtt.min(h + (self.interval / 2).max(h * 2)),
            (None, None) => rtt,
        };
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let dev = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + dev) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }
    /// The answer to probe `echoed` arrived: the peer is alive. A late answer to a probe older
    /// than the outstanding one (re-sent when the older was missed) does not answer that one:
    /// the peer may have died since it sent it.
    pub fn reply(&mut self, now: tokio::time::Instant, echoed: u64) {
        self.last_alive = now;
        self.heard(now);
        if echoed >= self.outstanding_seq {
            self.answered();
        } else {
            self.misses = 0;
            self.graces = 0;
        }
    }
    /// The last probe's sequence number (0 before the first).
    pub fn sent(&self) -> u64 {
        self.sent
    }
    /// Other packets from the peer arrived since the outstanding probe went out: it is answered
    /// (the reply may be queued behind them), without extending the classic deadline.
    pub fn answered(&mut self) {
        self.outstanding = None;
        self.misses = 0;
        self.graces = 0;
    }
    /// Whether the deadline, met at `now`, came more than a probe timeout late because this
    /// router itself was not running (see [`Liveness`]), and the peer gets the benefit of the
    /// doubt. If so, the outstanding probe is forgotten (the caller sends another) and neither
    /// the classic rule nor [`HARD_SILENCE`] may give a verdict before `now + timeout`, one probe
    /// timeout for the replies waiting in the socket to be read. Not past [`MAX_STALL_GRACES`]
    /// in a row. Down too: a relapse (the hold-down starting over) or the connection closed as
    /// dead for this router's own stall would keep a live neighbour out for as long as this
    /// router is starved.
    fn stalled(&mut self, now: tokio::time::Instant, timeout: Duration) -> bool {
        let late = now.saturating_duration_since(self.deadline().max(self.judged));
        if late <= timeout || self.graces >= MAX_STALL_GRACES {
            return false;
        }
        self.graces += 1;
        self.outstanding = None;
        let until = now + timeout;
        if let Some(t) = until.checked_sub(self.detect()) {
            self.last_alive = self.last_alive.max(t);
        }
        if let Some(t) = until.checked_sub(self.silence()) {
            self.last_heard = self.last_heard.max(t);
        }
        true
    }
    /// Credits traffic seen up to `at` as a sign of life for the classic rule.
    pub fn credit(&mut self, at: tokio::time::Instant) {
        self.last_alive = self.last_alive.max(at);
        self.heard(at);
    }
    /// Some packet from the peer arrived by `at`.
    pub fn heard(&mut self, at: tokio::time::Instant) {
        self.last_heard = self.last_heard.max(at);
    }
    /// At the outstanding probe's deadline it had not left this router yet (congestion window
    /// full): not a miss. Its deadline moves to `now + timeout`, and the classic rule may not
    /// fire before that either.
    pub fn unsent(&mut self, now: tokio::time::Instant, timeout: Duration) {
        self.outstanding = Some(now + timeout);
        if let Some(t) = (now + timeout).checked_sub(self.detect()) {
            self.last_alive = self.last_alive.max(t);
        }
    }
    /// At the deadline, nothing having come from the peer since the outstanding probe was
    /// queued: `probe_left` says whether that probe has been transmitted. Down, a re-probe, a
    /// stall of this router's own, or nothing yet.
    pub fn at_deadline(
        &mut self,
        now: tokio::time::Instant,
        probe_left: bool,
        timeout: Duration,
    ) -> Option<Verdict> {
        if self.stalled(now, timeout) {
            return Some(Verdict::Stalled);
        }
        if self.down && now >= self.last_heard + self.dead_after() {
            return Some(Verdict::Dead);
        }
        // Down too: a probe that has not left is no miss, and a relapse for it would start the
        // hold-down over for as long as this router's own window stays full.
        if !probe_left && self.outstanding.is_some() && now < self.last_heard + self.silence() {
            self.unsent(now, timeout);
            return None;
        }
        self.expire(now)
    }
    pub fn last_alive(&self) -> tokio::time::Instant {
        self.last_alive
    }
    /// The neighbour is up again (after its hold-down): probes judge it afresh.
    pub fn recovered(&mut self) {
        self.down = false;
    }
    /// A probe goes out at `now`: its sequence number. It is missed at `now + timeout` unless
    /// answered.
    pub fn probe_sent(&mut self, now: tokio::time::Instant, timeout: Duration) -> u64 {
        self.sent += 1;
        if self.outstanding.is_none() {
            self.outstanding = Some(now + timeout);
            self.outstanding_seq = self.sent;
        }
        self.sent
    }
    /// The longest silence (no packet at all) that gives no verdict: [`Self::hard_silence`],
    /// and once down [`Self::dead_after`] (shorter), which ends the connection.
    fn silence(&self) -> Duration {
        if self.down {
            self.dead_after()
        } else {
            self.hard_silence()
        }
    }
    /// [`HARD_SILENCE`], or the classic rule's silence when that is longer: a probe interval
    /// over about 2 s leaves a live peer silent that long between its pongs, and the fixed
    /// bound took it down (and, with [`DEAD_AFTER`], closed its connection) after each one.
    fn hard_silence(&self) -> Duration {
        HARD_SILENCE.max(self.detect())
    }
    /// [`DEAD_AFTER`], or two probe intervals when that is longer (a neighbour down, answering
    /// each probe of a long interval, is alive).
    fn dead_after(&self) -> Duration {
        DEAD_AFTER.max(self.interval * 2)
    }
    /// When [`Liveness::expire`] must run next.
    pub fn deadline(&self) -> tokio::time::Instant {
        let classic = (self.last_alive + self.detect()).min(self.last_heard + self.silence());
        self.outstanding.map_or(classic, |o| o.min(classic))
    }
    /// At the deadline: is the peer down (or, once down, dead, or failing again), or does a
    /// missed probe call for a re-probe?
    pub fn expire(&mut self, now: tokio::time::Instant) -> Option<Verdict> {
        if self.down && now >= self.last_heard + self.dead_after() {
            return Some(Verdict::Dead);
        }
        let verdict = if now >= self.last_alive + self.detect()
            || now >= self.last_heard + self.hard_silence()
        {
            Some(Verdict::Down)
        } else {
            match self.outstanding {
                Some(o) if now >= o => {
                    self.outstanding = None;
                    self.misses += 1;
                    Some(if self.misses >= self.misses_needed {
                        Verdict::Down
                    } else {
                        Verdict::Reprobe
                    })
                }
                _ => None,
            }
        };
        if verdict == Some(Verdict::Down) {
            // Judged afresh from now: a relapse needs as much failure again (the verdict's own
            // deadline, left in the past, made one at once).
            self.judged = now;
            self.last_alive = now;
            self.misses = 0;
            self.outstanding = None;
            if self.down {
                return Some(Verdict::Relapse);
            }
            // Down until `recovered`, whatever later verdicts say.
            self.down = true;
        }
        verdict
    }
}

/// Frames the connection received from its peer: only what decrypted counts as a sign of life.
/// (quinn counts a UDP datagram in `udp_rx` before it decrypts it: a forger who knows the
/// connection's ID and the peer's address could keep a dead neighbour up with garbage.)
fn frames_in(st: &quinn::ConnectionStats) -> u64 {
    let f = &st.frame_rx;
    [
        f.acks,
        f.ack_frequency,
        f.crypto,
        f.connection_close,
        f.data_blocked,
        f.datagram,
        u64::from(f.handshake_done),
        f.immediate_ack,
        f.max_data,
        f.max_stream_data,
        f.max_streams_bidi,
        f.max_streams_uni,
        f.new_connection_id,
        f.new_token,
        f.path_challenge,
        f.path_response,
        f.ping,
        f.reset_stream,
        f.retire_connection_id,
        f.stream_data_blocked,
        f.streams_blocked_bidi,
        f.streams_blocked_uni,
        f.stop_sending,
        f.stream,
    ]
    .iter()
    .fold(0u64, |a, n| a.saturating_add(*n))
}

/// A neighbour not up failed its probes again: a hold-down running (it was up, then failed on
/// this connection or lost one) starts over; a neighbour never up has none.
/// Its own word ends as at a first down verdict: pongs in the hold-down made it the word on
/// itself again, which kept relayed copies (its only news now) out until it aged.
fn fail_again(shared: &Shared, nb: &Neighbour) {
    let holding_down = nb.down_since().is_some();
    tracing::debug!(node = %shared.node, neighbour = %nb.id, holding_down, "missed probes while not up");
    shared.evidence.unheard(&nb.id);
    if holding_down {
        nb.set_down_since(Some(Instant::now()));
    }
}

/// Whether a pong echoing `echoed` answers a ping: one sent (`sent` is the last sequence number
/// sent) and newer than the last one answered (`answered`). Replays, duplicates and unsolicited
/// pongs do not.
fn answers(sent: u64, answered: u64, echoed: u64) -> bool {
    echoed > answered && echoed <= sent
}

/// Probes the connection every interval. A `Down` verdict marks the neighbour down (no new
/// streams); returns when it is `Dead` (the connection is closed) or the connection closes:
/// whether any probe was answered.
async fn probe_until_down(shared: &Shared, nb: &Neighbour, conn: &quinn::Connection) -> bool {
    let p = shared.probe;
    let mut tick = tokio::time::interval(p.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The highest ping answered so far.
    let mut answered: u64 = 0;
    let mut live = Liveness::for_connection(p, tokio::time::Instant::now(), conn.rtt());
    // Per connection: a new one may take another path. Its first sample is the handshake's.
    let mut min_rtt = MinRtt::new(tokio::time::Instant::now(), conn.rtt());
    // When the last few pings were sent (by sequence number), for the RTT samples.
    let mut sent_at = [(0u64, tokio::time::Instant::now()); 16];
    let mut frames_rx = frames_in(&conn.stats());
    // Frames received, and pings transmitted (only pings are sent as datagrams on a dialled
    // connection), when the outstanding probe was queued.
    let mark = || {
        let st = conn.stats();
        (frames_in(&st), st.frame_tx.datagram)
    };
    let mut at_probe = mark();
    let mut pongs: u64 = 0;
    let mut pongs_at_tick: u64 = 0;
    let mut prev_tick = tokio::time::Instant::now();
    let send_probe = |live: &mut Liveness,
                      at_probe: &mut (u64, u64),
                      sent_at: &mut [(u64, tokio::time::Instant); 16]| {
        if live.outstanding.is_none() {
            *at_probe = mark();
        }
        let now = tokio::time::Instant::now();
        let seq = live.probe_sent(now, probe_timeout(conn.rtt()));
        let _ = conn.send_datagram(Probe::encode_ping(seq));
        sent_at[(seq % 16) as usize] = (seq, now);
    };
    loop {
        let deadline = live.deadline();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                // Any packet from the peer since the probe went out answers it (a reply may
                // queue behind bulk data); a dead peer sends nothing.
                let st = conn.stats();
                if live.outstanding.is_some() && frames_in(&st) > at_probe.0 {
                    live.answered();
                    continue;
                }
                let now = tokio::time::Instant::now();
                // A probe still queued behind a full congestion window has not left.
                let probe_left = st.frame_tx.datagram > at_probe.1;
                // Read before the verdict: a down verdict restarts it from now.
                let silent_ms = now.saturating_duration_since(live.last_alive()).as_millis() as u64;
                match live.at_deadline(now, probe_left, probe_timeout(conn.rtt())) {
                    // Failing again before it is up: in its hold-down, the hold-down starts
                    // over; never up, it has none to start (and nothing to take down).
                    Some(Verdict::Relapse) => fail_again(shared, nb),
                    Some(Verdict::Down) if !nb.is_up() => fail_again(shared, nb),
                    Some(Verdict::Down) => {
                        let path = &st.path;
                        tracing::warn!(
                            node = %shared.node,
                            neighbour = %nb.id,
                            after_ms = silent_ms,
                            rtt_us = path.rtt.as_micros() as u64,
                            cwnd = path.cwnd,
                            lost_packets = path.lost_packets,
                            pings_sent = st.frame_tx.datagram,
                            datagrams_received = st.udp_rx.datagrams,
                            frames_received = frames_in(&st),
                            "neighbour down: missed probes"
                        );
                        shared.metrics.neighbour_down_total.fetch_add(1, Relaxed);
                        nb.set_down();
                        shared.evidence.unheard(&nb.id);
                        shared.changed.notify_one();
                        nb.set_down_since(Some(Instant::now()));
                    }
                    Some(Verdict::Dead) => {
                        tracing::warn!(node = %shared.node, neighbour = %nb.id, "neighbour silent: closing its connection");
                        conn.close(quinn::VarInt::from_u32(close::DECLARED_DOWN), b"missed probes");
                        return answered > 0;
                    }
                    Some(Verdict::Reprobe) => {
                        send_probe(&mut live, &mut at_probe, &mut sent_at)
                    }
                    Some(Verdict::Stalled) => {
                        // The peer's replies may be unread in our socket: probe again.
                        tracing::debug!(
                            node = %shared.node,
                            neighbour = %nb.id,
                            late_ms = now.saturating_duration_since(deadline).as_millis() as u64,
                            "probe deadline met late (this router stalled): probing again"
                        );
                        shared.metrics.probe_stalls_total.fetch_add(1, Relaxed);
                        send_probe(&mut live, &mut at_probe, &mut sent_at);
                    }
                    None => {}
                }
            }
            _ = tick.tick() => {
                // Traffic beyond the probe replies (and their ACKs) is also a sign of life: a busy
                // link must not be declared down because a reply queued behind bulk data. The
                // margin keeps a dead peer's last few packets from extending its life.
                let rx = frames_in(&conn.stats());
                // A pong's packet holds its DATAGRAM and often an ACK, and another ACK may follow.
                let extra = rx.saturating_sub(frames_rx).saturating_sub(3 * (pongs - pongs_at_tick));
                frames_rx = rx;
                pongs_at_tick = pongs;
                // Those packets arrived some time since the previous tick: credit that instant.
                if extra >= 32 {
                    live.credit(prev_tick);
                } else if extra > 0 {
                    live.heard(prev_tick);
                }
                prev_tick = tokio::time::Instant::now();
                send_probe(&mut live, &mut at_probe, &mut sent_at);
            }
            d = conn.read_datagram() => {
                let Ok(bytes) = d else { return answered > 0 };
                // Only the first answer to a ping we sent counts: a neighbour cannot push
                // evidence (and table rebuilds) faster than we probe it. Told by the sequence
                // number alone, before the entries are decoded.
                if Probe::pong_seq(&bytes).is_none_or(|echoed| !answers(live.sent(), answered, echoed)) {
                    continue;
                }
                let Ok(Probe::Pong { seq: echoed, entries }) = Probe::decode(bytes) else { continue };
                answered = echoed;
                let now = tokio::time::Instant::now();
                let (sent_seq, sent) = sent_at[(echoed % 16) as usize];
                let srtt = conn.rtt();
                let mut sample = srtt;
                if sent_seq == echoed {
                    live.rtt_sample(now - sent);
                    sample = sample.min(now - sent);
                }
                live.reply(now, echoed);
                pongs += 1;
                let rtt = min_rtt.sample(now, sample);
                nb.rtt_us.store(rtt.as_micros() as u64, Relaxed);
                nb.srtt_us.store(srtt.as_micros() as u64, Relaxed);
                let mut changed = crate::routes::Evidence::learn_from(shared, &nb.id, entries);
                if !nb.is_up() && nb.down_since().is_none_or(|t| t.elapsed() >= p.hold_down) {
                    nb.set_up(conn);
                    nb.set_down_since(None);
                    live.recovered();
                    tracing::info!(node = %shared.node, neighbour = %nb.id, rtt_us = nb.rtt_us(), "neighbour up");
                    changed = true;
                }
                if changed {
                    shared.changed.notify_one();
                }
            }
            _ = conn.closed() => return answered > 0,
        }
    }
}

#[cfg(test)]
mod tests {
    /// A neighbour a snapshot moves goes on with the hold-down of the one it replaces (its
    /// dialer reads it there): moved a moment after a down verdict, it stayed down for no time.
    #[test]
    fn a_moved_neighbour_keeps_its_hold_down() {
        let id = topology::NodeId::new("transit");
        let old = Neighbour::new(id.clone(), "127.0.0.1:1".parse().unwrap());
        let since = Instant::now();
        old.set_down_since(Some(since));
        let new = Neighbour::new(id, "127.0.0.1:2".parse().unwrap());
        new.succeed(&old);
        assert_eq!(new.down_since(), Some(since));
        // One that was not held down is not held down at its new address either.
        let fresh = Neighbour::new(topology::NodeId::new("t2"), "127.0.0.1:3".parse().unwrap());
        let moved = Neighbour::new(topology::NodeId::new("t2"), "127.0.0.1:4".parse().unwrap());
        moved.succeed(&fresh);
        assert_eq!(moved.down_since(), None);
    }

    use super::*;
    use crate::ProbeConfig;
    use tokio::time::Instant as T;

    const MS: Duration = Duration::from_millis(1);

    /// Drives a detector for a peer that answers every probe until `dies_at` (replies take
    /// `rtt`), sending a probe every interval and re-probing on misses; returns when it is
    /// declared down.
    fn run(p: ProbeConfig, rtt: Duration, dies_at: Duration, lose: &[u64]) -> Option<Duration> {
        run_late(p, rtt, dies_at, lose, &[])
    }

    /// [`run`], the replies to the probes numbered in `late` taking that much longer. A reply
    /// due at the very instant of the detector's deadline comes after it: whichever the real
    /// race would favour, a verdict that close to a reply is a failure.
    fn run_late(
        p: ProbeConfig,
        rtt: Duration,
        dies_at: Duration,
        lose: &[u64],
        late: &[(u64, Duration)],
    ) -> Option<Duration> {
        let t0 = T::now();
        let mut live = Liveness::for_connection(p, t0, rtt);
        let timeout = probe_timeout(rtt);
        let mut next_tick = t0;
        // (arrival, round trip, the probe answered)
        let mut replies: Vec<(T, Duration, u64)> = Vec::new();
        let mut now = t0;
        while now < t0 + Duration::from_secs(10) {
            // The next event: a tick, a reply, or the detector's deadline.
            let next_reply = replies.iter().map(|r| r.0).min();
            let next = [Some(next_tick), next_reply, Some(live.deadline())]
                .into_iter()
                .flatten()
                .min()?;
            now = next;
            let mut send = false;
            if now == live.deadline() {
                match live.at_deadline(now, true, timeout) {
                    Some(Verdict::Down | Verdict::Dead | Verdict::Relapse) => {
                        return Some(now - t0);
                    }
                    Some(Verdict::Reprobe | Verdict::Stalled) => send = true,
                    None => {}
                }
            }
            if Some(now) == next_reply {
                for (_, took, echoed) in replies.iter().filter(|r| r.0 == now) {
                    live.rtt_sample(*took);
                    live.reply(now, *echoed);
                }
                replies.retain(|r| r.0 != now);
            }
            if now == next_tick {
                next_tick += p.interval;
                send = true;
            }
            if send {
                let seq = live.probe_sent(now, timeout);
                let extra = late
                    .iter()
                    .find(|l| l.0 == seq)
                    .map_or(Duration::ZERO, |l| l.1);
                let took = rtt + extra;
                if now + took < t0 + dies_at && !lose.contains(&seq) {
                    replies.push((now + took, took, seq));
                }
            }
        }
        None
    }

    /// A neighbour whose connection the peer closed hands it out no more, before its dialer has
    /// seen the close (and set it down).
    #[tokio::test]
    async fn a_closed_connection_is_not_handed_out() {
        let (a, b, _dir) = crate::splice::tests::quic_pair().await;
        let nb = Neighbour::new(NodeId::new("b"), a.remote_address());
        nb.set_up(&a);
        assert!(nb.connection().is_some());
        b.close(quinn::VarInt::from_u32(0), b"gone");
        tokio::time::timeout(Duration::from_secs(10), a.closed())
            .await
            .unwrap();
        assert!(nb.connection().is_none());
    }

    #[test]
    fn a_pong_answers_only_a_ping_sent_and_only_once() {
        // Pings 1..=5 sent, 3 answered.
        assert!(answers(5, 3, 4));
        assert!(answers(5, 3, 5));
        assert!(!answers(5, 3, 3), "a duplicate answer");
        assert!(
            !answers(5, 3, 2),
            "an older ping, answered by a newer pong already"
        );
        assert!(!answers(5, 3, 6), "a ping not sent yet");
        assert!(!answers(5, 3, u64::MAX));
        assert!(!answers(0, 0, 0), "unsolicited, before any ping");
    }

    /// The filter falls with the first lower sample, holds through higher ones (a queue) for a
    /// whole window, and then takes the lowest of the last ten seconds.
    #[test]
    fn min_rtt_falls_at_once_and_rises_only_after_a_window() {
        let t0 = tokio::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let ms = Duration::from_millis;
        let mut m = MinRtt::new(t0, ms(12));
        assert_eq!(m.sample(at(100), ms(10)), ms(10), "falls at once");
        // A queue: 200 ms round trips every 100 ms for 9.8 s, the 10 ms one still in the window.
        for i in 2..100 {
            assert_eq!(m.sample(at(i * 100), ms(200)), ms(10), "at {} ms", i * 100);
        }
        // Second 10: the slot of second 0 (its 10 ms and 12 ms) has left the window.
        assert_eq!(m.sample(at(10_000), ms(200)), ms(200));
        assert_eq!(m.sample(at(10_500), ms(150)), ms(150));
        assert_eq!(m.sample(at(11_000), ms(190)), ms(150));
        // A long silence: only the new sample is in the window.
        assert_eq!(m.sample(at(60_000), ms(30)), ms(30));
        assert_eq!(MinRtt::new(t0, ms(7)).sample(t0, ms(9)), ms(7));
    }

    #[test]
    fn probe_timeout_is_three_rtts_with_a_floor() {
        assert_eq!(probe_timeout(Duration::from_micros(200)), MIN_PROBE_TIMEOUT);
        assert_eq!(probe_timeout(40 * MS), 120 * MS);
    }

    #[test]
    fn dead_peer_is_down_within_interval_plus_three_timeouts_whatever_the_phase() {
        let p = ProbeConfig::default();
        let rtt = Duration::from_micros(300);
        let bound = p.interval + 3 * probe_timeout(rtt) + MS;
        for phase in (0..100).step_by(7) {
            let dies_at = Duration::from_millis(1000 + phase);
            let down = run(p, rtt, dies_at, &[]).expect("declared down");
            let after_death = down - dies_at;
            assert!(
                after_death <= bound && after_death < Duration::from_millis(300),
                "phase {phase} ms: down {after_death:?} after death"
            );
        }
    }

    #[test]
    fn isolated_and_double_losses_do_not_take_a_live_peer_down() {
        let p = ProbeConfig::default();
        let forever = Duration::from_secs(3600);
        let rtt = Duration::from_micros(300);
        assert_eq!(run(p, rtt, forever, &[3, 7, 8, 20, 21]), None);
    }

    #[test]
    fn long_rtt_link_is_not_declared_down_by_the_timeout() {
        // 150 ms RTT, probes every 100 ms: replies arrive after the next probe went out.
        let p = ProbeConfig::default();
        assert_eq!(run(p, 150 * MS, Duration::from_secs(3600), &[5]), None);
        // ... and a dead one is still found by the classic rule.
        let down = run(p, 150 * MS, Duration::from_secs(2), &[]).expect("down");
        assert!(down - Duration::from_secs(2) <= p.interval * 3 + 150 * MS);
    }

    #[test]
    fn probes_stuck_behind_the_congestion_window_are_not_misses_but_silence_is_bounded() {
        let p = ProbeConfig::default();
        let timeout = probe_timeout(Duration::from_micros(300));
        let t0 = T::now();
        let mut live = Liveness::new(p, t0);
        // Every probe stays queued here, and the peer, sent nothing, says nothing.
        let mut next_tick = t0;
        let mut now;
        let down = loop {
            now = next_tick.min(live.deadline());
            if now == next_tick {
                next_tick += p.interval;
                live.probe_sent(now, timeout);
            }
            if now == live.deadline()
                && let Some(Verdict::Down) = live.at_deadline(now, false, timeout)
            {
                break now - t0;
            }
            assert!(now - t0 < Duration::from_secs(10), "never declared down");
        };
        assert!(
            down >= HARD_SILENCE && down <= HARD_SILENCE + timeout,
            "down after {down:?}, not at the hard silence bound"
        );
        // Once the probes leave, misses count again: a peer silent from then on is down as fast
        // as ever.
        let mut live = Liveness::new(p, now);
        live.probe_sent(now, timeout);
        live.heard(now);
        let (verdicts, _) = silent_peer_until(&mut live, timeout, Verdict::Down);
        assert_eq!(
            verdicts,
            [Verdict::Reprobe, Verdict::Reprobe, Verdict::Down]
        );
    }

    /// Drives `live` from deadline to deadline with every probe leaving and no answer coming,
    /// re-probing when told to, until the verdict `until`; returns the verdicts given (with it)
    /// and when it came.
    fn silent_peer_until(
        live: &mut Liveness,
        timeout: Duration,
        until: Verdict,
    ) -> (Vec<Verdict>, T) {
        let mut verdicts = Vec::new();
        loop {
            let at = live.deadline();
            if let Some(v) = live.at_deadline(at, true, timeout) {
                if v == Verdict::Reprobe {
                    live.probe_sent(at, timeout);
                }
                verdicts.push(v);
                if v == until {
                    return (verdicts, at);
                }
            }
        }
    }

    /// A probe missed and re-sent, then the late answer to the first: the peer was alive when
    /// it sent that, but the re-sent probe still has its deadline (a peer that died right after
    /// answering is found one probe timeout later, not one interval later), and a miss there
    /// counts afresh from one.
    #[test]
    fn a_late_answer_to_an_older_probe_leaves_the_newer_one_outstanding() {
        let t0 = T::now();
        let (mut live, timeout) = probing(t0);
        let first = live.sent();
        assert_eq!(
            live.at_deadline(t0 + timeout, true, timeout),
            Some(Verdict::Reprobe)
        );
        let again = live.probe_sent(t0 + timeout, timeout);
        assert_eq!(again, first + 1);
        let late = t0 + timeout + 5 * MS;
        live.reply(late, first);
        assert_eq!(
            live.deadline(),
            t0 + 2 * timeout,
            "the re-sent probe's deadline"
        );
        assert_eq!(
            live.at_deadline(t0 + 2 * timeout, true, timeout),
            Some(Verdict::Reprobe),
            "one miss since the late answer, not two"
        );
        // The answer to the newest probe answers it.
        let newest = live.probe_sent(t0 + 2 * timeout, timeout);
        live.reply(t0 + 2 * timeout + MS, newest);
        assert_eq!(live.deadline(), t0 + 2 * timeout + MS + live.detect());
    }

    #[test]
    fn a_peer_declared_down_is_dead_after_its_last_packet_plus_dead_after_unless_it_recovers() {
        let t0 = T::now();
        let (mut live, timeout) = probing(t0);
        let (mut verdicts, dead_at) = silent_peer_until(&mut live, timeout, Verdict::Dead);
        assert_eq!(verdicts.pop(), Some(Verdict::Dead));
        // Silent while down, it fails the classic rule again and again: each a relapse (its
        // hold-down starting over), none another down.
        let relapses = verdicts.split_off(3);
        assert_eq!(
            verdicts,
            [Verdict::Reprobe, Verdict::Reprobe, Verdict::Down]
        );
        assert!(
            !relapses.is_empty() && relapses.iter().all(|v| *v == Verdict::Relapse),
            "{relapses:?}"
        );
        assert_eq!(
            dead_at,
            t0 + DEAD_AFTER,
            "dead one DEAD_AFTER after the last packet"
        );
        // A peer that answers while down is not dead; once recovered, misses count afresh.
        let (mut live, _) = probing(t0);
        silent_peer_until(&mut live, timeout, Verdict::Down);
        let back = t0 + Duration::from_millis(500);
        live.reply(back, live.sent());
        assert_eq!(live.deadline(), back + live.detect());
        live.recovered();
        live.probe_sent(back, timeout);
        assert_eq!(
            live.at_deadline(back + timeout, true, timeout),
            Some(Verdict::Reprobe)
        );
    }

    /// A deadline met late by this router's own stall while the peer is down re-probes (a
    /// grace), as when it is up: no relapse, and no close as dead, for the router's own stall.
    #[test]
    fn a_stall_of_our_own_while_a_peer_is_down_is_no_relapse() {
        let t0 = T::now();
        let (mut live, timeout) = probing(t0);
        let (_, down_at) = silent_peer_until(&mut live, timeout, Verdict::Down);
        let back = down_at + ProbeConfig::default().interval;
        live.probe_sent(back, timeout);
        live.reply(back, live.sent());
        // The next deadline, met 500 ms late (this router was not running).
        let late = live.deadline() + Duration::from_millis(500);
        assert_eq!(
            live.at_deadline(late, true, timeout),
            Some(Verdict::Stalled)
        );
        // The replies read now: alive, no verdict.
        live.reply(late, live.sent());
        assert!(live.deadline() > late);
    }

    /// A peer declared down that answers for a while and then misses `misses` probes in a row
    /// again, before it was up, relapses (its hold-down starts over) at the same point a peer
    /// that is up would be declared down; one that goes on answering never relapses.
    #[test]
    fn a_peer_down_that_fails_again_relapses_and_one_that_answers_does_not() {
        let p = ProbeConfig::default();
        let rtt = Duration::from_micros(300);
        let timeout = probe_timeout(rtt);
        let t0 = T::now();
        let mut live = Liveness::new(p, t0);
        live.probe_sent(t0, timeout);
        let (_, down_at) = silent_peer_until(&mut live, timeout, Verdict::Down);
        // Back: it answers every probe for 2 s (20 intervals); no verdict at all.
        let mut now = down_at;
        for _ in 0..20 {
            now += p.interval;
            live.probe_sent(now, timeout);
            assert!(
                live.deadline() > now + rtt,
                "a verdict due before the reply"
            );
            live.reply(now + rtt, live.sent());
        }
        // Then silent again, each probe leaving: re-probes, then a relapse, not a down (and not
        // dead: it was heard well within DEAD_AFTER).
        let quiet = now + rtt;
        now += p.interval;
        live.probe_sent(now, timeout);
        let (verdicts, at) = silent_peer_until(&mut live, timeout, Verdict::Relapse);
        assert_eq!(
            verdicts,
            [Verdict::Reprobe, Verdict::Reprobe, Verdict::Relapse]
        );
        assert!(
            at < quiet + DEAD_AFTER,
            "relapse {:?} after quiet",
            at - quiet
        );
        // Judged afresh from the relapse: it takes as much failure again to relapse again.
        assert!(live.deadline() > at, "{:?}", live.deadline() - at);
        assert_eq!(live.expire(at), None);
    }

    #[test]
    fn two_lost_probes_in_a_row_do_not_take_a_long_link_down() {
        // 150 ms RTT: the re-probe's timeout (450 ms) is longer than the classic rule, which
        // decides. Probes 5 and 6 lost, the reply to 7 a little late (2 ms of jitter): it comes
        // 3 x interval + 2 ms after the last one. (Down at 3 x interval, before the slack.)
        let p = ProbeConfig::default();
        let forever = Duration::from_secs(3600);
        let late = [(7, 2 * MS)];
        assert_eq!(run_late(p, 150 * MS, forever, &[5, 6], &late), None);
        assert_eq!(run_late(p, 150 * MS, forever, &[5, 6, 20, 21], &late), None);
        // Jitter well beyond half an interval is measured, and widens the slack with it.
        let jittery: Vec<(u64, Duration)> = (1..200)
            .map(|s| (s, if s % 2 == 0 { 60 * MS } else { Duration::ZERO }))
            .collect();
        assert_eq!(run_late(p, 150 * MS, forever, &[40, 41], &jittery), None);
        // Three lost in a row are still down, in 3 x interval + the slack once the RTT has
        // settled (the variation starts at half the first sample).
        let down = run(p, 150 * MS, forever, &[25, 26, 27]).expect("down");
        let last_reply = 2300 * MS + 150 * MS; // the reply to probe 24
        assert!(
            down - last_reply <= p.interval * 3 + p.interval / 2 + MS,
            "down {down:?}"
        );
    }

    #[test]
    fn a_link_longer_than_the_classic_rule_is_not_down_before_its_first_reply() {
        // 400 ms RTT: the first reply comes 400 ms after the connection, past interval x misses.
        let p = ProbeConfig::default();
        assert_eq!(run(p, 400 * MS, Duration::from_secs(3600), &[]), None);
        // A peer that never answers at all is still down, counting from the first reply due.
        let down = run(p, 400 * MS, Duration::ZERO, &[]).expect("down");
        assert!(down <= 400 * MS + p.interval * 3 + p.interval / 2 + 200 * MS + MS);
    }

    #[test]
    fn three_lost_probes_in_a_row_are_down() {
        let p = ProbeConfig::default();
        let rtt = Duration::from_micros(300);
        // Probes 5, 6 (fast re-probe) and 7 (fast re-probe) lost: down.
        assert!(run(p, rtt, Duration::from_secs(3600), &[5, 6, 7]).is_some());
    }

    /// A neighbour down (in its hold-down) whose probes sit behind this router's own full
    /// congestion window (a bulk upload on the connection after a cut healed) is not failing
    /// again: an unsent probe is no miss there either, and only [`DEAD_AFTER`] of silence ends
    /// it. (Three unsent probes were a relapse that started the hold-down over, again and again
    /// while the upload stalled.)
    #[test]
    fn a_down_neighbours_unsent_probes_are_not_a_relapse() {
        let t0 = T::now();
        let (mut live, timeout) = probing(t0);
        silent_peer_until(&mut live, timeout, Verdict::Down);
        // It answers, then its probes stay queued here.
        let back = live.deadline();
        live.reply(back, live.sent());
        live.probe_sent(back + 100 * MS, timeout);
        let mut verdicts = Vec::new();
        let dead = loop {
            let at = live.deadline();
            assert!(
                at - back <= DEAD_AFTER + timeout,
                "no verdict for {:?}",
                at - back
            );
            match live.at_deadline(at, false, timeout) {
                Some(Verdict::Dead) => break at,
                Some(v) => verdicts.push(v),
                None => {}
            }
        };
        assert!(
            !verdicts.contains(&Verdict::Relapse),
            "unsent probes judged as missed: {verdicts:?}"
        );
        assert!(
            dead - back >= DEAD_AFTER,
            "dead {:?} after the answer",
            dead - back
        );
    }

    /// The verdict `Down` judges the neighbour afresh from then on: the next verdict is not a
    /// relapse at the same instant (which started a hold-down over as it began).
    #[test]
    fn a_down_verdict_is_not_followed_by_a_relapse_at_once() {
        let t0 = T::now();
        // Down by the probes' misses, and by the silence rule (the answers stopped coming, no
        // probe judged: a long link's probe timeout outlasts the rule).
        let (mut by_misses, timeout) = probing(t0);
        let (_, at) = silent_peer_until(&mut by_misses, timeout, Verdict::Down);
        let mut by_silence = Liveness::new(ProbeConfig::default(), t0);
        let quiet = by_silence.deadline();
        assert_eq!(by_silence.expire(quiet), Some(Verdict::Down));
        for (mut live, at) in [(by_misses, at), (by_silence, quiet)] {
            let next = live.deadline();
            assert!(
                next > at,
                "next deadline {:?} before the verdict",
                at - next
            );
            assert_eq!(live.expire(at), None);
        }
    }

    /// One round trip far longer than the rest (a pong read after this router's own stall, a
    /// probe that sat behind a full congestion window) does not widen the silence that is down
    /// for seconds after it: a sample counts for at most the silence it would have ended.
    #[test]
    fn one_huge_rtt_sample_does_not_blunt_detection() {
        let p = ProbeConfig::default();
        let mut live = Liveness::new(p, T::now());
        for _ in 0..50 {
            live.rtt_sample(Duration::from_micros(300));
        }
        let settled = live.detect();
        live.rtt_sample(Duration::from_secs(1));
        for _ in 0..3 {
            live.rtt_sample(Duration::from_micros(300));
        }
        assert!(
            live.detect() <= settled + settled / 2,
            "detection {:?}, {settled:?} before the sample",
            live.detect()
        );
    }

    /// The same, the long sample being a connection's first: it is capped from the handshake
    /// RTT. (Detection took 2.3 s after it, 350 ms before.)
    #[test]
    fn a_huge_first_rtt_sample_does_not_blunt_detection() {
        let p = ProbeConfig::default();
        let rtt = Duration::from_micros(300);
        let settled = {
            let mut live = Liveness::for_connection(p, T::now(), rtt);
            for _ in 0..4 {
                live.rtt_sample(rtt);
            }
            live.detect()
        };
        let mut live = Liveness::for_connection(p, T::now(), rtt);
        live.rtt_sample(Duration::from_secs(1));
        for _ in 0..3 {
            live.rtt_sample(rtt);
        }
        assert!(
            live.detect() <= settled + settled / 2,
            "detection {:?}, {settled:?} without the long sample",
            live.detect()
        );
    }

    /// A detector with a probe outstanding since `t0`, on a short link, and the probe timeout.
    fn probing(t0: T) -> (Liveness, Duration) {
        let timeout = probe_timeout(Duration::from_micros(300));
        let mut live = Liveness::new(ProbeConfig::default(), t0);
        live.probe_sent(t0, timeout);
        (live, timeout)
    }

    /// A probe interval longer than the fixed silences (2 s up, 1 s down): a live peer, silent
    /// between its pongs for an interval, stays up, and a dead one is still found by its missed
    /// probes. (It went down 2 s after each pong, was closed as dead 1 s later, and never came
    /// up: every interval over about 2 s, which the bounds allow, left no neighbour up.)
    #[test]
    fn a_long_probe_interval_keeps_a_live_peer_up() {
        let p = ProbeConfig {
            interval: Duration::from_secs(5),
            ..ProbeConfig::default()
        };
        let rtt = Duration::from_millis(1);
        assert_eq!(run(p, rtt, Duration::from_secs(3600), &[]), None);
        // Dead before the second probe (at 5 s): down at its misses.
        let down = run(p, rtt, Duration::from_millis(4500), &[]).expect("a dead peer found");
        assert!(
            down <= Duration::from_secs(5) + 4 * probe_timeout(rtt),
            "{down:?}"
        );
    }

    /// Down by the hard silence (the probes stuck behind a full window, the peer dead), a
    /// deadline right after is the dead verdict, not a stall of this router's: the shorter
    /// silence allowed once down had put that deadline in the past. (It was taken for a stall:
    /// `tasman_probe_stalls_total` counted one, the log blamed this router, and the close came
    /// a probe timeout late.)
    #[test]
    fn a_down_by_the_hard_silence_is_followed_by_dead_not_a_stall() {
        let t0 = T::now();
        let (mut live, timeout) = probing(t0);
        let mut now = t0;
        loop {
            now = live.deadline().max(now);
            match live.at_deadline(now, false, timeout) {
                Some(Verdict::Down) => break,
                None => {}
                other => panic!("{other:?} at {:?}", now - t0),
            }
            assert!(now - t0 < Duration::from_secs(10), "never down");
        }
        assert!(now - t0 >= HARD_SILENCE, "{:?}", now - t0);
        let next = live.deadline().max(now);
        assert_eq!(live.at_deadline(next, true, timeout), Some(Verdict::Dead));
    }

    /// This router stalls for 500 ms with a probe outstanding, its peer alive: the deadline met
    /// late re-probes instead of judging (the classic rule and the hard silence, both passed
    /// during the stall, wait one more probe timeout), and the reply read just after the stall
    /// keeps the peer up. (The late deadline declared a live peer down.)
    #[test]
    fn a_deadline_met_late_by_our_own_stall_reprobes_instead_of_judging() {
        let t0 = T::now();
        let (mut live, timeout) = probing(t0);
        let woke = live.deadline() + Duration::from_millis(500);
        assert_eq!(
            live.at_deadline(woke, true, timeout),
            Some(Verdict::Stalled)
        );
        live.probe_sent(woke, timeout);
        assert_eq!(live.deadline(), woke + timeout);
        // Before that deadline, nothing is decided; the reply waiting in the socket is read.
        assert_eq!(live.expire(woke + timeout - MS), None);
        live.reply(woke + MS, live.sent());
        assert_eq!(live.expire(woke + timeout), None);
        assert!(!live.down);
        // A deadline met late by no more than a probe timeout is judged as ever.
        let (mut judged, timeout) = probing(t0);
        let woke = judged.deadline() + timeout;
        assert_eq!(
            judged.at_deadline(woke, true, timeout),
            Some(Verdict::Reprobe)
        );
    }

    /// A dead peer is still declared down by a router whose every deadline is met late: after
    /// [`MAX_STALL_GRACES`] graces in a row (nothing heard), the next late deadline judges.
    #[test]
    fn a_router_that_keeps_stalling_still_declares_a_dead_peer_down() {
        let t0 = T::now();
        let (mut live, timeout) = probing(t0);
        let late = timeout * 2;
        let mut graces = 0;
        let down_at = loop {
            let now = live.deadline() + late;
            match live.at_deadline(now, true, timeout) {
                Some(Verdict::Down) => break now,
                Some(Verdict::Stalled) => graces += 1,
                _ => {}
            }
            live.probe_sent(now, timeout);
            assert!(now - t0 < Duration::from_secs(10), "never declared down");
        };
        assert_eq!(graces, MAX_STALL_GRACES);
        // Each grace costs a probe timeout plus the lateness: bounded.
        assert!(
            down_at - t0 <= live.detect() + (timeout + late) * (MAX_STALL_GRACES + 1),
            "down after {:?}",
            down_at - t0
        );
        // A reply resets the graces.
        let (mut live, timeout) = probing(t0);
        for _ in 0..MAX_STALL_GRACES {
            assert_eq!(
                live.at_deadline(live.deadline() + late, true, timeout),
                Some(Verdict::Stalled)
            );
        }
        live.reply(live.deadline(), live.sent());
        assert_eq!(
            live.at_deadline(live.deadline() + late, true, timeout),
            Some(Verdict::Stalled)
        );
    }
}
