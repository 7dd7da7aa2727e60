//! Incoming QUIC connections: authenticate the peer's node name, answer its probes, and serve
//! the streams it opens (relay them as a transit, or terminate them as a site).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use quinn::{RecvStream, SendStream};

use crate::Shared;
use crate::codes::{Code, close};
use crate::header::{Header, HeaderError, MAX_HEADER_LEN, PREFIX_LEN};
use crate::probe::Probe;
use crate::{site, splice, tls};

pub(crate) async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        if *shared.shutdown.borrow() {
            incoming.refuse();
            continue;
        }
        // Handshakes at once are bounded (a flood of Initials from forged addresses).
        match shared.handshakes.admit(incoming) {
            Ok((incoming, ticket)) => {
                tokio::spawn(serve_connection(shared.clone(), incoming, ticket));
            }
            Err(turned) => shared.metrics.handshake_turned(turned),
        }
    }
}

/// Connections one peer (one node name) may hold to this router at once. A neighbour dials one;
/// a second is there while a restarted neighbour's old connection has not timed out yet. Each is
/// granted [`crate::transport::MAX_CONCURRENT_STREAMS`] streams, whose state quinn allocates at
/// once (1.45 MB measured), and may fill its receive windows: past this, the oldest is closed
/// (`superseded`), so that a peer (a leaked node certificate) cannot make the router hold more.
pub(crate) const MAX_CONNECTIONS_PER_PEER: usize = 4;

/// Silence after which an incoming connection is closed (`peer_silent`): a live neighbour sends
/// on it at least every [`crate::transport::KEEP_ALIVE`] (its probes every 100 ms by default),
/// so this much means it crashed or its path is cut. The streams it opened end then, a site's
/// capacity slots and backend connections with them; they were held until QUIC's idle timeout
/// ([`crate::transport::IDLE_TIMEOUT`], 10 s), as the probes that close a dead neighbour's
/// connection close only this router's own dial.
pub(crate) const PEER_SILENCE: std::time::Duration =
    crate::transport::KEEP_ALIVE.saturating_add(crate::neighbours::DEAD_AFTER);

/// How often an incoming connection's silence is looked at.
const SILENCE_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Tells when nothing has come on a connection for [`PEER_SILENCE`], by its count of UDP
/// datagrams received, looked at every [`SILENCE_CHECK`]. A look that comes late (this router
/// was starved of CPU or paused: what came may still be unread in the socket) starts the
/// silence over instead of judging it.
struct Silence {
    datagrams: u64,
    heard: tokio::time::Instant,
    looked: tokio::time::Instant,
}

impl Silence {
    fn new(conn: &quinn::Connection, now: tokio::time::Instant) -> Silence {
        Silence {
            datagrams: conn.stats().udp_rx.datagrams,
            heard: now,
            looked: now,
        }
    }

    /// Whether `conn` has been silent for [`PEER_SILENCE`] at `now`.
    fn silent(&mut self, conn: &quinn::Connection, now: tokio::time::Instant) -> bool {
        let datagrams = conn.stats().udp_rx.datagrams;
        let late = now.saturating_duration_since(self.looked) > SILENCE_CHECK * 4;
        self.looked = now;
        if datagrams != self.datagrams || late {
            self.datagrams = datagrams;
            self.heard = now;
            return false;
        }
        now.saturating_duration_since(self.heard) >= PEER_SILENCE
    }
}

/// The authenticated incoming connections, by peer name.
#[derive(Default)]
pub(crate) struct PeerConnections(Mutex<Peers>);

/// [`PeerConnections`]' state.
#[derive(Default)]
struct Peers {
    live: HashMap<String, Vec<quinn::Connection>>,
    /// Per peer, the packets QUIC declared lost on its connections that ended (peers are
    /// topology nodes that authenticated: bounded by the names a topology held).
    ended_lost: HashMap<String, u64>,
}

impl Peers {
    fn ended(&mut self, peer: &str, conn: &quinn::Connection) {
        *self.ended_lost.entry(peer.to_string()).or_default() += conn.stats().path.lost_packets;
    }
}

impl PeerConnections {
    /// Packets QUIC declared lost on `peer`'s connections to this router since it started,
    /// ended and live (part of its `neighbour_lost_packets_total`: what this router sent on
    /// them, the answers to the peer's streams most of all).
    pub(crate) fn lost_packets(&self, peer: &str) -> u64 {
        let p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let live: u64 = p
            .live
            .get(peer)
            .map_or(0, |c| c.iter().map(|c| c.stats().path.lost_packets).sum());
        p.ended_lost
            .get(peer)
            .copied()
            .unwrap_or(0)
            .saturating_add(live)
    }

    /// Counts `conn` as `peer`'s newest connection until the returned guard drops; returns the
    /// oldest of its connections past [`MAX_CONNECTIONS_PER_PEER`], for the caller to close.
    fn register<'a>(
        &'a self,
        peer: &str,
        conn: &quinn::Connection,
    ) -> (Registered<'a>, Option<quinn::Connection>) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let conns = p.live.entry(peer.to_string()).or_default();
        conns.push(conn.clone());
        let oldest = (conns.len() > MAX_CONNECTIONS_PER_PEER).then(|| conns.remove(0));
        if let Some(old) = &oldest {
            p.ended(peer, old);
        }
        let registered = Registered {
            set: self,
            peer: peer.to_string(),
            id: conn.stable_id(),
        };
        (registered, oldest)
    }
}

/// A connection counted in [`PeerConnections`], until dropped.
struct Registered<'a> {
    set: &'a PeerConnections,
    peer: String,
    id: usize,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut p = self.set.0.lock().unwrap_or_else(|e| e.into_inner());
        let p = &mut *p;
        if let Some(conns) = p.live.get_mut(&self.peer) {
            // Gone already if `register` evicted it (counted as ended there).
            let gone = conns
                .iter()
                .position(|c| c.stable_id() == self.id)
                .map(|i| conns.remove(i));
            let empty = conns.is_empty();
            if let Some(c) = gone {
                p.ended(&self.peer, &c);
            }
            if empty {
                p.live.remove(&self.peer);
            }
        }
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    ticket: crate::transport::HandshakeTicket,
) {
    let conn = match ticket.complete(incoming).await {
        Some(Ok(c)) => c,
        None => {
            shared.metrics.refused_peers_total.fetch_add(1, Relaxed);
            tracing::info!(node = %shared.node, "incoming handshake not done within {:?}: dropped",
                crate::transport::HANDSHAKE_TIMEOUT);
            return;
        }
        Some(Err(e)) => {
            // Certificate refusals (wrong CA, name not in the topology) end here.
            shared.metrics.refused_peers_total.fetch_add(1, Relaxed);
            tracing::info!(node = %shared.node, error = %e, "incoming connection refused");
            return;
        }
    };
    let Some(peer) = tls::peer_name(&conn, &shared.peers) else {
        shared.metrics.refused_peers_total.fetch_add(1, Relaxed);
        conn.close(
            quinn::VarInt::from_u32(close::NOT_ALLOWED),
            b"certificate name is not a node of the topology",
        );
        return;
    };
    if !is_neighbour(&shared, &peer) {
        shared.metrics.refused_peers_total.fetch_add(1, Relaxed);
        tracing::info!(node = %shared.node, %peer, remote = %conn.remote_address(), "refused a node that is not a neighbour of this one");
        conn.close(
            quinn::VarInt::from_u32(close::NOT_A_NEIGHBOUR),
            b"not a neighbour of this node in the topology",
        );
        return;
    }
    tracing::debug!(node = %shared.node, %peer, remote = %conn.remote_address(), "peer connected");
    let (_registered, oldest) = shared.inbound.register(&peer, &conn);
    if let Some(old) = oldest {
        shared
            .metrics
            .peer_connections_superseded_total
            .fetch_add(1, Relaxed);
        tracing::info!(node = %shared.node, %peer, remote = %old.remote_address(), "closing the oldest connection of a peer past its cap");
        old.close(
            quinn::VarInt::from_u32(close::SUPERSEDED),
            b"superseded by a newer connection of the same node",
        );
    }
    // Streams only now: none were granted at the handshake, before the peer was known
    // (`transport::accept_transport_config_with`).
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(shared.peer_streams));
    // It is back: our own dial to it need not wait out its backoff.
    if let Some(nb) = shared.neighbours.load().get(peer.as_str()) {
        nb.peer_connected();
    }
    let _trust_watch = tls::watch_trust(shared.cert.clone(), conn.clone());
    let peer_id: Arc<str> = peer.as_str().into();
    // Where the next pong's learned entries start: each pong goes on where the previous one
    // stopped, so entries beyond one datagram's worth are carried in turn (`Probe::encode_pong`).
    let mut rotation = 0;
    let mut pongs = crate::probe::PongBudget::new(tokio::time::Instant::now());
    // A peer the topology no longer has (a snapshot removed it), or no longer links to this
    // node, is closed at its next stream or probe, as its next handshake would be refused: it
    // must not go on relaying through us.
    let removed = || {
        let (code, why): (u32, &[u8]) = if !shared.peers.contains(&peer) {
            (close::NOT_ALLOWED, b"no longer a node of the topology")
        } else if !is_neighbour(&shared, &peer) {
            (
                close::NOT_A_NEIGHBOUR,
                b"no longer a neighbour of this node",
            )
        } else {
            return false;
        };
        shared.metrics.refused_peers_total.fetch_add(1, Relaxed);
        tracing::info!(node = %shared.node, %peer, reason = %String::from_utf8_lossy(why), "closing the connection of a peer");
        conn.close(quinn::VarInt::from_u32(code), why);
        true
    };
    let mut silence = Silence::new(&conn, tokio::time::Instant::now());
    let mut look = tokio::time::interval(SILENCE_CHECK);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            now = look.tick() => if silence.silent(&conn, now) {
                shared.metrics.peer_connections_silent_total.fetch_add(1, Relaxed);
                tracing::warn!(node = %shared.node, %peer, remote = %conn.remote_address(),
                    silent_ms = PEER_SILENCE.as_millis() as u64,
                    "nothing came on a neighbour's connection: closing it and the streams it opened");
                conn.close(quinn::VarInt::from_u32(close::PEER_SILENT), b"nothing heard");
                break;
            },
            s = conn.accept_bi() => match s {
                Ok(_) if removed() => break,
                Ok((send, recv)) => { tokio::spawn(serve_stream(shared.clone(), peer_id.clone(), send, recv)); }
                Err(_) => break,
            },
            d = conn.read_datagram() => match d {
                Ok(_) if removed() => break,
                Ok(bytes) => {
                    if let Ok(Probe::Ping { seq }) = Probe::decode(bytes) {
                        // Each pong costs this router its own entry, a digest and up to a
                        // datagram: a peer's burst of pings (a hundred fit in one packet) must
                        // not be answered in full.
                        if !pongs.take(tokio::time::Instant::now()) {
                            shared.metrics.pings_ignored_total.fetch_add(1, Relaxed);
                            continue;
                        }
                        let max = conn.max_datagram_size().unwrap_or(1200);
                        let (own, learned, taken) = shared.digest();
                        let aged = taken.elapsed().as_nanos().div_ceil(1_000_000);
                        let aged = u32::try_from(aged).unwrap_or(u32::MAX);
                        let (pong, next) =
                            Probe::encode_pong_parts(seq, &own, &learned, aged, rotation, max);
                        rotation = next;
                        let _ = conn.send_datagram(pong);
                    }
                }
                Err(_) => break,
            },
        }
    }
}

/// Whether `peer` may hold a connection to this router: a node this one shares a link with in
/// the snapshot in force (peering is with configured neighbours only: every hop of a path is a
/// link, so no one else has streams to send here), or a name the configuration adds
/// (`RouterConfig::extra_peer_names`).
fn is_neighbour(shared: &Shared, peer: &str) -> bool {
    shared.neighbours.load().contains_key(peer) || shared.extra_peer_names.iter().any(|n| n == peer)
}

/// Why no header came: a bad one (the peer's fault: refused and counted by its code), or a stream
/// the peer reset, or whose connection was lost, before it was whole (nothing was wrong with what
/// came: counted by the reset's code, or as `upstream_lost`).
#[derive(Debug)]
pub(crate) enum NoHeader {
    Bad(HeaderError),
    Ended(Code),
}

impl From<HeaderError> for NoHeader {
    fn from(e: HeaderError) -> Self {
        NoHeader::Bad(e)
    }
}

/// Reads exactly `buf` of a stream's header; `needed` is what the header has by then.
async fn read_part(recv: &mut RecvStream, buf: &mut [u8], needed: usize) -> Result<(), NoHeader> {
    use quinn::{ReadError, ReadExactError};
    recv.read_exact(buf).await.map_err(|e| match e {
        ReadExactError::FinishedEarly(got) => NoHeader::Bad(HeaderError::Truncated {
            needed,
            had: needed - buf.len() + got,
        }),
        ReadExactError::ReadError(ReadError::Reset(c)) => NoHeader::Ended(Code::from_peer(c)),
        ReadExactError::ReadError(_) => NoHeader::Ended(Code::UpstreamLost),
    })
}

/// Reads a stream's header: 4-byte prefix, then the announced body, bounded and timed.
pub(crate) async fn read_header(recv: &mut RecvStream) -> Result<Header, NoHeader> {
    let mut prefix = [0u8; PREFIX_LEN];
    read_part(recv, &mut prefix, PREFIX_LEN).await?;
    let n = Header::body_len(prefix)?;
    let mut buf = [0u8; MAX_HEADER_LEN];
    buf[..PREFIX_LEN].copy_from_slice(&prefix);
    read_part(recv, &mut buf[PREFIX_LEN..PREFIX_LEN + n], PREFIX_LEN + n).await?;
    Ok(Header::decode(&mut &buf[..PREFIX_LEN + n])?)
}

/// Ends a stream both ways with `code`, counted.
pub(crate) fn refuse(shared: &Shared, send: &mut SendStream, recv: &mut RecvStream, code: Code) {
    refuse_as(shared, send, recv, code, code);
}

/// [`refuse`], counted as `counted` and sent as `sent` (a code peers of every build know).
fn refuse_as(
    shared: &Shared,
    send: &mut SendStream,
    recv: &mut RecvStream,
    counted: Code,
    sent: Code,
) {
    shared.metrics.error(counted);
    let _ = send.reset(sent.varint());
    let _ = recv.stop(sent.varint());
}

/// Whether the hops a stream still has to visit could be a path from `peer` through this node:
/// a path visits each node once, so hops that name this node, the peer that sent the stream, or
/// a node twice are a loop, which no router builds (a peer that made one would have the stream
/// relayed back to itself, or around two transits, and hold each relay for good).
fn hops_loop(node: &str, peer: &str, hops: &[topology::NodeId]) -> bool {
    hops.iter()
        .enumerate()
        .any(|(i, h)| h.as_str() == node || h.as_str() == peer || hops[..i].contains(h))
}

async fn serve_stream(
    shared: Arc<Shared>,
    peer: Arc<str>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let header = match tokio::time::timeout(shared.header_timeout, read_header(&mut recv)).await {
        Ok(Ok(h)) => h,
        Ok(Err(NoHeader::Bad(e))) => {
            tracing::debug!(node = %shared.node, error = %e, "bad stream header");
            return refuse(&shared, &mut send, &mut recv, e.code());
        }
        Ok(Err(NoHeader::Ended(code))) => {
            // Not a bad header: the previous hop gave up on the stream (its client went away,
            // its reply deadline passed) or lost its connection.
            return refuse(&shared, &mut send, &mut recv, code);
        }
        Err(_) => return refuse(&shared, &mut send, &mut recv, Code::HeaderTimeout),
    };
    if shared.draining() {
        // Retryable: the edge moves the connection to its next candidate.
        return refuse(&shared, &mut send, &mut recv, Code::ShuttingDown);
    }
    if header.hops.is_empty() {
        return site::serve(shared, header, send, recv).await;
    }
    if !shared.routes.load().relays {
        return refuse(&shared, &mut send, &mut recv, Code::WrongRole);
    }
    if hops_loop(shared.node.as_str(), &peer, &header.hops) {
        tracing::debug!(node = %shared.node, %peer, hops = ?header.hops, "stream header whose path loops");
        return refuse(&shared, &mut send, &mut recv, Code::MalformedHeader);
    }
    // Boxed: the relay's state (two pumps' chunk arrays) is the larger of the two, and inline it
    // would size every site stream's task too.
    Box::pin(relay(shared, header, send, recv)).await
}

/// Transit: forward to the next hop named in the header.
async fn relay(
    shared: Arc<Shared>,
    mut header: Header,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let next = header.hops.remove(0);
    let Some(nb) = shared.neighbours.load().get(&next).cloned() else {
        return refuse(&shared, &mut send, &mut recv, Code::NotANeighbour);
    };
    // Registered before the check below, so a verdict in between is not missed.
    let next_hop_down = nb.went_down();
    tokio::pin!(next_hop_down);
    let Some(conn) = nb.connection() else {
        return refuse(&shared, &mut send, &mut recv, Code::NextHopUnreachable);
    };
    let mut buf = BytesMut::with_capacity(256);
    if header.encode(&mut buf).is_err() {
        return refuse(&shared, &mut send, &mut recv, Code::NextHopUnreachable);
    }
    // Handing the stream on is bounded like receiving it (`header_timeout`, below the edge's
    // reply timeout) and gives up at a down verdict (`open_next_hop`): otherwise a stuck next hop
    // would hold the edge's first try for a whole reply timeout before the edge tries the next
    // candidate; `next_hop_unreachable` hands it back at once.
    let deadline = tokio::time::sleep(shared.header_timeout);
    tokio::pin!(deadline);
    // Counted from here: a drain waits for a stream being handed on as for one relayed.
    let starting = crate::metrics::Held::count(&shared.metrics.streams_starting);
    let (dsend, drecv) = match splice::open_next_hop(
        &conn,
        &mut [buf.freeze()],
        deadline.as_mut(),
        next_hop_down.as_mut(),
    )
    .await
    {
        Ok(streams) => streams,
        // Busy, not down: counted here as `stream_limit`, and handed back as `upstream_lost`,
        // which every edge retries and blames nothing for (an edge built before `stream_limit`
        // would take that code, unknown to it, as `internal` and reset its client).
        Err(splice::Unopened::NoStream) => {
            return refuse_as(
                &shared,
                &mut send,
                &mut recv,
                Code::StreamLimit,
                Code::UpstreamLost,
            );
        }
        Err(splice::Unopened::NotTaken) => {
            return refuse(&shared, &mut send, &mut recv, Code::NextHopUnreachable);
        }
    };
    shared.metrics.relayed_total.fetch_add(1, Relaxed);
    let _open = crate::metrics::Held::count(&shared.metrics.relays_active);
    drop(starting);
    if let Some(code) = splice::relay(
        send,
        recv,
        dsend,
        drecv,
        next_hop_down,
        &shared.metrics.relayed_bytes,
    )
    .await
    {
        shared.metrics.error(code);
        tracing::debug!(node = %shared.node, next = %next, code = %code, "next hop down before it answered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splice::{assert_future_within, future_size, never};

    #[test]
    fn stream_task_future_size() {
        let n = future_size(|| serve_stream(never(), never(), never(), never()));
        assert_future_within("site/transit stream task", n, 3072);
    }

    #[test]
    fn a_path_loops_when_it_names_this_node_the_sender_or_a_node_twice() {
        let ids = |v: &[&str]| {
            v.iter()
                .map(|h| topology::NodeId::new(*h))
                .collect::<Vec<_>>()
        };
        assert!(!hops_loop("t", "e", &ids(&["t2", "s"])));
        assert!(!hops_loop("t", "e", &[]));
        for bad in [&["t"][..], &["e"], &["t2", "t", "e"], &["t2", "s", "t2"]] {
            assert!(hops_loop("t", "e", &ids(bad)), "{bad:?}");
        }
    }
}
