//! Snapshot distribution: the controller's QUIC endpoint and one task per router connection.
//!
//! Per connection: the peer's certificate name must be a node of the current topology and
//! match its `Hello`; it then gets the current version in full, and every later version as a
//! delta when it holds the delta's base, else in full. Versions are taken from a `watch`
//! channel, so a slow router skips intermediate versions rather than queueing them. A version
//! the router rejected (NACK) is recorded and offered again only after a back-off (or on the
//! router's `Resync`); the next version goes out at once. A version without the stored
//! circuits (`Published::with_circuits`) is never sent.
//! A `Renew` is answered by the [`NodeIssuer`] for the session's authenticated node.
//!
//! A router that stops reading is closed once the controller has been unable to write a byte to it
//! for [`WRITE_STALL_TIMEOUT`] ([`close::WRITE_STALLED`]): the session, and the version it was
//! writing (up to a whole snapshot), would otherwise stay for as long as the peer keeps the
//! connection alive. Closes the controller makes are counted by code ([`SessionCloses`]).
//!
//! A node has at most one live session, the newest ([`RouterSession`]): once a session passes
//! its hello checks, an older session of the same node is closed ([`close::SUPERSEDED`]). A
//! router reconnecting after a network blip gets its new session while the controller's side of
//! the old connection could live on until its idle timeout; both got every version, and the old
//! one's end marked the node disconnected under its new session. What a superseded session
//! reports until it is gone is not taken.
//!
//! A topology change (an apply or a rollback) that removes a node ends that node's session
//! before the version without it goes out ([`close::NOT_ALLOWED`]): the hello's check alone left
//! such a session running, getting every later version (the whole topology, backends and
//! circuits) and its certificate renewed for as long as the router stayed connected. A `Renew` is
//! answered only for a node of the topology in force.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;

use router::codes::close;
use router::control::proto::{self, FromRouter, MAX_FROM_ROUTER, ToRouter, clip};
use router::tls;
use router::transport::{HandshakeGate, Turned};

use topology::{Latency, NodeId, ServiceName};

use super::live::{NeighbourSample, Sample};
use super::renew::{NodeIssuer, Request};
use super::{Controller, RouterSession, SessionEnd};

/// A version a router rejected is offered to it again this long after the rejection (in full,
/// on the same session), then after twice as long each time it is rejected again, up to
/// [`NACK_RETRY_MAX`]: a reason may pass (a port taken for a while). A router that sees its
/// reason pass (its address came) says so with a `Resync` and gets it at once (asked again and
/// again, no sooner than half the back-off's wait, [`NACK_RETRY_FIRST`] at least, since the last
/// time). Its next session gets the current version at once, whatever its last session said.
pub const NACK_RETRY_FIRST: Duration = Duration::from_secs(2);
/// The longest wait before a rejected version is offered again on the same session.
pub const NACK_RETRY_MAX: Duration = Duration::from_secs(300);

/// The controller's certificate name.
pub const CONTROLLER_NAME: &str = router::control::client::CONTROLLER_NAME;
/// With nothing else to send, a heartbeat this often refreshes routers' staleness clocks.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// The largest RTT taken from a telemetry report: twice [`Latency::MAX`], the largest one-way
/// latency a router's decoder accepts. Anything above it is no measurement (a bug or a lying
/// router); taken in, it would become a published weight that no router can decode, and every
/// router's control session would fail on every snapshot for as long as it is reported.
pub const MAX_RTT: Duration = Latency::MAX.as_duration().saturating_mul(2);
/// Telemetry reports a router may send: a burst of [`TELEMETRY_BURST`], then
/// [`TELEMETRY_PER_SEC`] a second (routers report once a second). Each report is merged under
/// the controller's lock, so a router sending in a tight loop would starve applies and
/// publishes; reports beyond the budget are dropped (counted per router, `reports_dropped`).
pub const TELEMETRY_PER_SEC: u32 = 10;
pub const TELEMETRY_BURST: u32 = 20;
/// Certificate renewal requests a router's sessions answer through the issuer in a burst (the
/// budget is the node's, across its sessions), then one every
/// [`RENEW_EVERY`]; the others get a refusal that costs nothing (a router asks once when its
/// certificate is due, then again only when unanswered).
pub const RENEW_BURST: u32 = 4;
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// A router must open its control stream and send its hello within this time.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections of one node (by its certificate) that may wait for their hello at once; more are
/// closed at once (`close::REFUSED`). A router sends its hello as soon as it connects, and
/// keeps at most one session; without a bound, one certificate could hold a connection and a
/// task per handshake for [`HELLO_TIMEOUT`] each, as many as it could open.
pub const MAX_AWAITING_HELLO: u32 = 4;
/// The largest hello taken (a hello is a node id, a version and a flag: a few dozen bytes). A
/// connection's frames are read at their announced size, so this bounds what a peer that has
/// not said who it is yet can make the controller hold; later frames may be up to
/// [`MAX_FROM_ROUTER`].
pub const MAX_HELLO: usize = 4 * 1024;
/// Streams a router may open on its connection: its control stream, the only one the controller
/// reads (no unidirectional ones).
pub const CONTROL_STREAMS: u32 = 1;
/// Versions written to a router and not answered (ACK/NACK) yet that a session remembers: an
/// answer must be for one of them. A router answers them in order, as they arrive; more than this
/// in flight, and the router's answer to the oldest (forgotten) is taken as a protocol error (it
/// reconnects and gets the current version in full).
const MAX_UNANSWERED: usize = 256;
/// How long a write to a router's control stream may go without the stream taking a byte before
/// the controller closes the connection ([`close::WRITE_STALLED`]): the router stopped reading. A
/// slow but live router takes bytes as its acknowledgements free flow-control credit (a snapshot of
/// tens of MiB over a slow link takes long, but never stalls for long); this is well above any
/// pause of a reading router, and the router reconnects (and resyncs) after the close as it does
/// after any. [`DaemonConfig::write_stall_timeout`](super::daemon::DaemonConfig::write_stall_timeout)
/// overrides it (tests).
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `Refused` frame may take to reach the router before the connection is closed
/// anyway (a close discards stream data the peer has not received).
const REFUSE_LINGER: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DistributeError {
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("QUIC endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the controller's QUIC endpoint (mutual TLS: only our CA, only current node names).
pub fn endpoint(
    ctl: &Controller,
    cert: &Arc<tls::CertResolver>,
    listen: SocketAddr,
) -> Result<quinn::Endpoint, DistributeError> {
    let cfg = server_config(ctl, cert)?;
    quinn::Endpoint::server(cfg, listen).map_err(|source| DistributeError::Bind {
        addr: listen,
        source,
    })
}

/// The controller's QUIC server configuration (mutual TLS with the current node ids).
fn server_config(
    ctl: &Controller,
    cert: &Arc<tls::CertResolver>,
) -> Result<quinn::ServerConfig, DistributeError> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        10_000,
    ))));
    // A router opens one stream, its control stream (renewals go over it too), and the
    // controller reads no other: a stream it granted and never read would hold what the router
    // sends into it (up to a stream window) until the connection ends.
    transport.max_concurrent_bidi_streams(CONTROL_STREAMS.into());
    transport.max_concurrent_uni_streams(0u32.into());
    Ok(tls::server_config_with(
        cert,
        &ctl.peers,
        Arc::new(transport),
    )?)
}

/// [`endpoint`] on a socket bound already (the controller's start binds it before anything is
/// stored).
pub fn endpoint_on(
    ctl: &Controller,
    cert: &Arc<tls::CertResolver>,
    socket: std::net::UdpSocket,
) -> Result<quinn::Endpoint, DistributeError> {
    let addr = socket
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let server = server_config(ctl, cert)?;
    let runtime = quinn::default_runtime().ok_or_else(|| DistributeError::Bind {
        addr,
        source: std::io::Error::other("no async runtime"),
    })?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        runtime,
    )
    .map_err(|source| DistributeError::Bind { addr, source })
}

/// Accepts router connections until the endpoint closes; `issuer` answers their certificate
/// renewals. A session whose router's certificate `cert` stops trusting (a revocation list
/// adopted revokes it, or its CA left the bundle in force) is closed
/// ([`tls::close_when_untrusted`]); one whose router takes no byte of its control stream for
/// `write_stall` ([`WRITE_STALL_TIMEOUT`]) too.
pub async fn serve(
    ctl: Arc<Controller>,
    endpoint: quinn::Endpoint,
    issuer: Arc<NodeIssuer>,
    cert: Arc<tls::CertResolver>,
    write_stall: Duration,
) {
    // Handshakes at once are bounded (a flood of Initials from forged addresses): every
    // router at once after a restart fits; past that, peers prove their address first.
    let gate = HandshakeGate::new(HandshakeGate::CONTROLLER);
    let awaiting = Arc::new(AwaitingHello::default());
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let (incoming, ticket) = match gate.admit(incoming) {
            Ok(admitted) => admitted,
            Err(turned) => {
                ctl.handshakes_turned.count(turned);
                tracing::debug!(%remote, ?turned, in_progress = gate.in_progress(), "handshake turned away");
                continue;
            }
        };
        let ctl = ctl.clone();
        let issuer = issuer.clone();
        let cert = cert.clone();
        let awaiting = awaiting.clone();
        tokio::spawn(async move {
            let Some(conn) = ticket.complete(incoming).await else {
                ctl.handshakes_turned.timed_out.fetch_add(1, Relaxed);
                tracing::debug!(%remote, "handshake not done within {:?}: dropped",
                    router::transport::HANDSHAKE_TIMEOUT);
                return;
            };
            match conn {
                Ok(conn) => {
                    let _trust_watch = tls::watch_trust(cert, conn.clone());
                    match connection(&ctl, &issuer, conn.clone(), write_stall, &awaiting).await {
                        // Normal after a router reconnected: the newer session logged its start.
                        Err(e @ ConnError::Superseded { .. }) => {
                            let node = tls::peer_name(&conn, &ctl.peers).map(clip);
                            tracing::info!(%remote, ?node, "closed a router connection: {e}")
                        }
                        // The operator's doing (the error names the node: the current peer
                        // names no longer do).
                        Err(e @ ConnError::Removed { .. }) => {
                            tracing::info!(%remote, "closed a router connection: {e}")
                        }
                        Err(e) if e.close_code().is_some() => {
                            let node = tls::peer_name(&conn, &ctl.peers).map(clip);
                            tracing::warn!(%remote, ?node, "closed a router connection: {e}")
                        }
                        Err(e) => tracing::debug!(%remote, "router connection ended: {e}"),
                        Ok(()) => {}
                    }
                }
                Err(e) => tracing::debug!(%remote, "router handshake failed: {e}"),
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Write(#[from] quinn::WriteError),
    #[error("{0}")]
    Proto(#[from] proto::ProtoError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("no hello within {HELLO_TIMEOUT:?}")]
    Timeout,
    #[error("{MAX_AWAITING_HELLO} connections of this node already await their hello")]
    TooManyAwaiting,
    #[error("{what} of version {version}, which this session did not send (or it was answered)")]
    NotSent { what: &'static str, version: u64 },
    #[error("the router took no byte of its control stream for {0:?}: it stopped reading")]
    Stalled(Duration),
    #[error("session {id} superseded by a newer control session of this node")]
    Superseded { id: u64 },
    #[error("a second hello on a session that had its hello")]
    SecondHello,
    #[error("node {node} is not in the topology since version {topology_version}")]
    Removed { node: String, topology_version: u64 },
}

impl ConnError {
    /// The code to close the connection with, for errors that are the router's doing (the
    /// others are a connection already gone).
    fn close_code(&self) -> Option<u32> {
        match self {
            ConnError::Refused(_) | ConnError::TooManyAwaiting => Some(close::REFUSED),
            ConnError::Timeout => Some(close::HELLO_TIMEOUT),
            ConnError::Stalled(_) => Some(close::WRITE_STALLED),
            ConnError::Superseded { .. } => Some(close::SUPERSEDED),
            ConnError::Removed { .. } => Some(close::NOT_ALLOWED),
            ConnError::Proto(proto::ProtoError::TooLarge { .. })
            | ConnError::Proto(proto::ProtoError::Malformed(_))
            | ConnError::NotSent { .. }
            | ConnError::SecondHello => Some(close::PROTOCOL),
            // The router finished its stream inside a frame: its doing, not a lost link (as
            // the router's client takes the controller's).
            ConnError::Proto(proto::ProtoError::Io(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                Some(close::PROTOCOL)
            }
            ConnError::Proto(proto::ProtoError::Io(_))
            | ConnError::Connection(_)
            | ConnError::Write(_) => None,
        }
    }
}

/// Sends `Refused` and waits, for at most [`REFUSE_LINGER`], until the router acknowledged it:
/// the connection is closed next, and a close discards what the router has not received.
async fn refuse(send: &mut quinn::SendStream, reason: String) -> ConnError {
    let reason = clip(reason);
    if let Ok(b) = proto::encode(&ToRouter::Refused {
        reason: reason.clone(),
    }) {
        let delivered = async {
            send.write_all(&b).await.ok()?;
            send.finish().ok()?;
            send.stopped().await.ok()
        };
        let _ = tokio::time::timeout(REFUSE_LINGER, delivered).await;
    }
    ConnError::Refused(reason)
}

/// Serves one router connection; a refusal or a protocol error closes it with a [`close`]
/// code and the reason.
async fn connection(
    ctl: &Arc<Controller>,
    issuer: &Arc<NodeIssuer>,
    conn: quinn::Connection,
    write_stall: Duration,
    awaiting: &Arc<AwaitingHello>,
) -> Result<(), ConnError> {
    let res = handshake_and_session(ctl, issuer, &conn, write_stall, awaiting).await;
    if let Err(e) = &res
        && let Some(code) = e.close_code()
    {
        // Counted first: whoever sees the close (the router, a test) sees it counted.
        ctl.session_closes.count(code);
        conn.close(code.into(), clip(e.to_string()).as_bytes());
    }
    res
}

/// Writes `bytes` whole to a router's control stream; fails with [`ConnError::Stalled`] as soon
/// as the stream takes no byte of it for `stall` (a write makes progress whenever flow control
/// lets any part of it in, so a slow router is never cut, only one that stopped reading).
async fn write(
    send: &mut quinn::SendStream,
    bytes: Bytes,
    stall: Duration,
) -> Result<(), ConnError> {
    let mut rest = [bytes];
    while !rest[0].is_empty() {
        tokio::time::timeout(stall, send.write_chunks(&mut rest))
            .await
            .map_err(|_| ConnError::Stalled(stall))??;
    }
    Ok(())
}

/// Connections awaiting their hello, per node name of their certificate
/// ([`MAX_AWAITING_HELLO`]).
#[derive(Default)]
struct AwaitingHello(dashmap::DashMap<String, u32>);

/// One connection counted in [`AwaitingHello`] until dropped.
struct Awaits<'a> {
    of: &'a AwaitingHello,
    node: String,
}

impl AwaitingHello {
    /// Counts a connection of `node`, unless [`MAX_AWAITING_HELLO`] are counted already.
    fn enter(&self, node: &str) -> Option<Awaits<'_>> {
        let mut n = self.0.entry(node.to_string()).or_insert(0);
        if *n >= MAX_AWAITING_HELLO {
            return None;
        }
        *n += 1;
        Some(Awaits {
            of: self,
            node: node.to_string(),
        })
    }
}

impl Drop for Awaits<'_> {
    fn drop(&mut self) {
        self.of.0.remove_if_mut(&self.node, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

async fn handshake_and_session(
    ctl: &Arc<Controller>,
    issuer: &Arc<NodeIssuer>,
    conn: &quinn::Connection,
    write_stall: Duration,
    awaiting: &AwaitingHello,
) -> Result<(), ConnError> {
    let cert_name = tls::peer_name(conn, &ctl.peers);
    // Counted until its hello was taken (a certificate of no node of the topology is refused
    // at its hello, as before).
    let awaits = match cert_name.as_deref() {
        Some(name) => Some(awaiting.enter(name).ok_or(ConnError::TooManyAwaiting)?),
        None => None,
    };
    // The stream and the hello on it, both within the timeout: the endpoint's keep-alive holds
    // an idle connection open, so a peer that never opens a stream would hold its task forever.
    let opened = async {
        let (send, mut recv) = conn.accept_bi().await?;
        let hello = proto::read_frame(&mut recv, MAX_HELLO).await?;
        Ok::<_, ConnError>((send, recv, hello))
    };
    let (mut send, mut recv, hello) = tokio::time::timeout(HELLO_TIMEOUT, opened)
        .await
        .map_err(|_| ConnError::Timeout)??;
    drop(awaits);
    let Some(hello) = hello else {
        return Err(proto::ProtoError::Malformed(
            "the control stream ended before its hello".into(),
        )
        .into());
    };
    let FromRouter::Hello {
        node,
        have_version,
        crl,
    } = proto::decode(&hello)?
    else {
        return Err(refuse(&mut send, "expected hello".into()).await);
    };
    if cert_name.as_deref() != Some(node.as_str()) {
        return Err(refuse(
            &mut send,
            format!("certificate name {cert_name:?} does not match node {node:?}"),
        )
        .await);
    }
    if !ctl.is_node(&node) {
        return Err(refuse(&mut send, format!("node {node} is not in the topology")).await);
    }
    // The certificate the router presented: what a renewal on this session renews (it must be
    // due, and not revoked). There is one: the name above came from it.
    let Some(presented) = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().cloned())
    else {
        return Err(refuse(&mut send, "no certificate presented".into()).await);
    };
    // What a renewal's proof of possession signs: this session's alone.
    let binding = router::pki::session_binding(conn);
    let (rs, superseded) = ctl.router_session_start(&node);
    tracing::info!(
        node,
        ?have_version,
        session = rs.id(),
        ?superseded,
        "router connected"
    );
    // The node's budgets, shared by its sessions, one taking over from another included (full
    // at its first).
    let budgets = ctl
        .session_budgets
        .entry(node.clone())
        .or_insert_with(|| Arc::new(std::sync::Mutex::new(Budgets::new(Instant::now()))))
        .clone();
    // Ended wherever it waits (a write to a dead path included) once a newer session took over
    // or the node left the topology; the connection is closed next, so nothing half-written
    // matters.
    let res = tokio::select! {
        // Checked first at each wake-up: an ended session takes nothing more in, and sends
        // nothing more (a removed node's session is told before the version without it is
        // published).
        biased;
        why = rs.ended() => Err(match why {
            SessionEnd::Superseded => ConnError::Superseded { id: rs.id() },
            SessionEnd::Removed { topology_version } => ConnError::Removed {
                node: clip(node.clone()),
                topology_version,
            },
        }),
        res = session(ctl, issuer, &rs, (&presented, binding), crl, &mut send, &mut recv, write_stall, &budgets) => res,
    };
    ctl.router_session_end(&rs);
    res
}

#[allow(clippy::too_many_arguments)]
async fn session(
    ctl: &Arc<Controller>,
    issuer: &Arc<NodeIssuer>,
    rs: &RouterSession,
    (presented, binding): (
        &rustls::pki_types::CertificateDer<'static>,
        Option<router::pki::SessionBinding>,
    ),
    takes_crl: bool,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    stall: Duration,
    budgets: &std::sync::Mutex<Budgets>,
) -> Result<(), ConnError> {
    let node = rs.node();
    let mut rx = ctl.subscribe();
    // The revocation lists go after the first snapshot (before any, while no published version
    // carries the stored circuits), then at each change.
    let mut crls = issuer.crl();
    let mut crl_due = takes_crl;
    // Cancel-safe: heartbeats and new versions win the select while a report is arriving.
    let mut inbox = Inbox::new();
    // The version last written to this router (it applies messages in order).
    let mut sent: Option<u64> = None;
    // The version last sent in full. A `Resync` asks for the current version in full: once it
    // went out so, a repeated request is answered already (each would otherwise cost a whole
    // snapshot for a few dozen bytes, as often as the router cares to ask).
    let mut sent_full: Option<u64> = None;
    // The versions written and not answered yet, oldest first, each with its topology version
    // (what an ACK records); an answer to a version not in it is a protocol error.
    let mut unanswered = Unanswered::default();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.reset();
    let mut force_full = true;
    let mut changed = false;
    // Warn once per session about refused telemetry; later refusals are counted and debug-logged.
    let mut warned_rtt = false;
    let mut warned_rate = false;
    let mut warned_name = false;
    // Held for one look or take at a time, never across an await.
    let budget = || {
        budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let mut warned_renewals = false;
    // The version this session's router rejected last (see [`NACK_RETRY_FIRST`]).
    let mut rejected: Option<Rejected> = None;
    // The current version was held back with a rejected one (the same offer) and not sent.
    let mut held_back = false;
    loop {
        // Told to end (superseded, or the node removed) while this task ran on: it sends
        // nothing more, the version that removes the node least of all. The caller's select
        // sees the end at its next look, woken by it.
        if rs.is_ended() {
            return std::future::pending().await;
        }
        ctl.router_reports_dropped(rs, inbox.take_dropped());
        if force_full || changed {
            changed = false;
            let p = rx.borrow_and_update().clone();
            let refused = rejected
                .as_ref()
                .is_some_and(|r| r.offers(&p) && r.retry_at.is_some());
            // A version without the stored circuits (they could not be published since the
            // start) is no version to serve: the router keeps the snapshot it holds, with its
            // circuits, until one carries them (then its first full snapshot goes out).
            if p.with_circuits {
                held_back = refused && sent != Some(p.version);
                if !refused && (force_full || sent != Some(p.version)) {
                    let bytes = match &p.delta {
                        Some((base, delta)) if !force_full && sent == Some(*base) => delta.clone(),
                        _ => {
                            sent_full = Some(p.version);
                            p.full.clone()
                        }
                    };
                    inbox.write(recv, send, bytes, stall).await?;
                    sent = Some(p.version);
                    unanswered.sent(p.version, p.topology_version, p.circuits_digest);
                    heartbeat.reset();
                }
                force_full = false;
            }
        }
        if crl_due {
            crl_due = false;
            let pem = crls.borrow_and_update().clone();
            if let Some(pem) = pem {
                let msg = ToRouter::Crl {
                    pem: pem.to_string(),
                };
                inbox.write(recv, send, proto::encode(&msg)?, stall).await?;
            }
        }
        let retry_at = rejected.as_ref().and_then(|r| r.retry_at);
        tokio::select! {
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                // Offered again in full at the top of the loop, if it is still the current one
                // (a newer one went out as it came, or will: offering that again would send the
                // router a full snapshot it has, or is answering).
                if let Some(r) = &mut rejected {
                    r.retry_at = None;
                    let current = rx.borrow().clone();
                    if r.offers(&current) {
                        // The version sent: the rejected one, or a later one of the same offer
                        // (a live update of its content).
                        tracing::info!(node, version = current.version, rejected = r.version, "offering a rejected version again");
                        force_full = true;
                    }
                }
            }
            res = crls.changed(), if takes_crl && !crl_due => {
                // The sender lives as long as the issuer: an error only at shutdown.
                crl_due = res.is_ok();
            }
            res = rx.changed() => {
                if res.is_err() {
                    return Ok(());
                }
                changed = true; // sent at the top of the loop
            }
            frame = inbox.next(recv) => {
                let Some(payload) = frame? else { return Ok(()) };
                // A report over the budget is dropped on its type alone: the full decode (up to
                // MAX_FROM_ROUTER bytes of JSON) is the work the budget is there to bound. The
                // type is looked at only then (it is a pass over the frame too); a report within
                // it spends it below.
                if !budget().reports.has(Instant::now()) && proto::is_telemetry(&payload) {
                    // Not seen: a dropped report is no telemetry, and its name is not looked
                    // at (one naming another node, over the rate, kept the age near 0).
                    ctl.router_reports_dropped(rs, 1);
                    if !warned_rate {
                        warned_rate = true;
                        tracing::warn!(
                            node,
                            "dropping telemetry beyond {TELEMETRY_PER_SEC} reports a \
                             second (counted in status)"
                        );
                    }
                    continue;
                }
                match proto::decode::<FromRouter>(&payload)? {
                    FromRouter::Ack { version } => {
                        let (tv, _) = unanswered
                            .answer(version)
                            .ok_or(ConnError::NotSent { what: "acknowledgement", version })?;
                        ctl.router_ack(rs, version, tv);
                        rejected = None;
                        // A version held back with the rejection is owed now (marked seen when
                        // it was held back): the top of the loop sends it.
                        changed |= held_back;
                    }
                    FromRouter::Nack { version, reason } => {
                        let (tv, digest) = unanswered
                            .answer(version)
                            .ok_or(ConnError::NotSent { what: "rejection", version })?;
                        ctl.router_nack(rs, version, tv, &clip(reason));
                        // What it rejected, also when a later version went out before the
                        // answer came (it was taken only from the version written last: a
                        // rejection answered after a live update went out began the back-off
                        // again, and the live updates were no longer held back with it).
                        rejected = Some(Rejected::again(
                            rejected.take(),
                            version,
                            Some((tv, digest)),
                        ));
                        // It holds an older version: no delta on top of the one it rejected.
                        sent = None;
                        // The rejection it replaced may have held back a version that this one
                        // does not: the top of the loop decides again.
                        changed |= held_back;
                    }
                    FromRouter::Resync { .. } => {
                        let (current, offers) = {
                            let p = rx.borrow();
                            (p.version, rejected.as_ref().is_some_and(|r| r.offers(&p)))
                        };
                        match &mut rejected {
                            // The reason it was rejected for has passed (its address came): the
                            // back-off ends at once the first time; after that, no sooner than
                            // half the back-off's wait (2 s at least) after the last time a
                            // Resync ended it, so a router that rejects and asks in turn gets a
                            // full snapshot less and less often, not once a round trip. A Resync
                            // that would not bring the offer forward changes nothing (nor is it
                            // logged: the router could send any number).
                            Some(Rejected {
                                retry_at: Some(due),
                                wait,
                                asked,
                                ..
                            }) if offers => {
                                let now = tokio::time::Instant::now();
                                let floor = (*wait / 2).max(NACK_RETRY_FIRST);
                                let at = asked.map_or(now, |a| (a + floor).max(now));
                                if at < *due {
                                    *due = at;
                                    *asked = Some(at);
                                    tracing::info!(
                                        node,
                                        version = current,
                                        "the router asks for the version it rejected: offering it again"
                                    );
                                }
                            }
                            _ => force_full = sent_full != Some(current),
                        }
                    }
                    FromRouter::Telemetry(report) => {
                        // Within the budget (looked at above, on the frame's type).
                        budget().reports.take(Instant::now());
                        if report_node(&report) == node && ctl.router_session_current(rs) {
                            // Its telemetry's age counts from reports merged: one naming
                            // another node only was no telemetry (the age stayed near 0, and the
                            // alert on it silent, while nothing of the router was merged).
                            ctl.router_seen(rs);
                            ctl.router_draining(rs, report.draining);
                            let (sample, refused) = sample_of(&report);
                            if refused > 0 {
                                ctl.router_samples_refused(rs, refused);
                                if !warned_rtt {
                                    warned_rtt = true;
                                    tracing::warn!(
                                        node,
                                        "refusing neighbour samples with an RTT above \
                                         {MAX_RTT:?} (counted in status)"
                                    );
                                } else {
                                    tracing::debug!(node, refused, "refused implausible RTTs");
                                }
                            }
                            ctl.on_telemetry(sample);
                        } else if report_node(&report) != node {
                            // It would speak for another node's links: only a misbehaving
                            // router sends one (its hello named the session's node).
                            ctl.router_report_misnamed(rs);
                            if !warned_name {
                                warned_name = true;
                                tracing::warn!(
                                    node,
                                    named = %clip(report_node(&report).to_string()),
                                    "dropping telemetry reports naming another node (counted in status)"
                                );
                            }
                        }
                    }
                    // Sent once, first: another is a misbehaving router (each one was decoded,
                    // up to MAX_FROM_ROUTER bytes, and ignored, without a limit or a trace).
                    FromRouter::Hello { .. } => return Err(ConnError::SecondHello),
                    FromRouter::Renew { public_key, proof } => {
                        let now = Instant::now();
                        let reply = if budget().renewals.take(now) {
                            // The name certified is the one this session authenticated.
                            let req = Request { public_key, proof, binding };
                            renew(ctl, issuer, node, req, presented, now).await
                        } else {
                            if !warned_renewals {
                                warned_renewals = true;
                                tracing::warn!(node, "refusing renewal requests beyond {RENEW_BURST}, then one every {RENEW_EVERY:?}");
                            }
                            ToRouter::RenewRefused {
                                reason: format!(
                                    "too many renewal requests: {RENEW_BURST}, then one every {RENEW_EVERY:?}"
                                ),
                            }
                        };
                        inbox.write(recv, send, proto::encode(&reply)?, stall).await?;
                    }
                }
            }
            _ = heartbeat.tick() => {
                let v = rx.borrow().version;
                inbox.write(recv, send, proto::encode(&ToRouter::Heartbeat { version: v })?, stall).await?;
            }
        }
    }
}

/// Most bytes of frames a session reads ahead of its handling while it writes ([`Inbox`]);
/// past it, telemetry reports are read and dropped, and other frames are kept up to twice it.
const READ_AHEAD: usize = 4 << 20;

/// What a frame read ahead counts against [`READ_AHEAD`] beyond its payload: its place in the
/// queue and its allocation. (Counted by payload alone, empty frames cost nothing: a router
/// sending them during a long write queued them without end.)
const FRAME_OVERHEAD: usize = 64;

/// What a session reads from its router. While the session writes, it goes on reading: frames
/// wait here and are handled, in order, before any read anew. A router writing its telemetry
/// while the session writes it a large snapshot could otherwise block on its write (the
/// session's stream window full), stop reading, and so block the session's write: neither
/// would move until both write-stall timers closed the connection. A telemetry report read
/// while one waits here takes its place (a report is the router's whole state: the newest
/// supersedes it; each queued one was merged as if new, the rate budget spent on the oldest and
/// the newest dropped). Past [`READ_AHEAD`] bytes a telemetry report with none to replace is
/// dropped as it is read (counted as a report dropped), so a long write to a slow router does
/// not stop the reading either; other frames (acknowledgements, requests: few, each answering
/// the session) are kept up to twice it, then reading waits.
struct Inbox {
    reader: proto::FrameReader,
    ahead: std::collections::VecDeque<Vec<u8>>,
    /// Where in `ahead` the telemetry report waiting is (at most one waits).
    telemetry: Option<usize>,
    bytes: usize,
    /// The router ended its stream (cleanly, between frames) during a write.
    ended: bool,
    /// Telemetry reports dropped past [`READ_AHEAD`], not yet counted ([`Inbox::take_dropped`]).
    dropped: u64,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            reader: proto::FrameReader::new(MAX_FROM_ROUTER),
            ahead: Default::default(),
            telemetry: None,
            bytes: 0,
            ended: false,
            dropped: 0,
        }
    }

    /// The telemetry reports dropped since the last call.
    fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// The next frame: one read ahead, else one from the stream (`None`: it ended). Cancel
    /// safe: a frame read ahead is taken only when this returns it; the reader keeps a partial
    /// frame across polls.
    async fn next(
        &mut self,
        recv: &mut quinn::RecvStream,
    ) -> Result<Option<Vec<u8>>, proto::ProtoError> {
        if let Some(f) = self.ahead.pop_front() {
            self.bytes -= f.len() + FRAME_OVERHEAD;
            self.telemetry = self.telemetry.and_then(|i| i.checked_sub(1));
            return Ok(Some(f));
        }
        if self.ended {
            return Ok(None);
        }
        self.reader.next(recv).await
    }

    /// [`write`], reading ahead meanwhile.
    async fn write(
        &mut self,
        recv: &mut quinn::RecvStream,
        send: &mut quinn::SendStream,
        bytes: Bytes,
        stall: Duration,
    ) -> Result<(), ConnError> {
        let written = write(send, bytes, stall);
        tokio::pin!(written);
        loop {
            tokio::select! {
                biased;
                res = &mut written => return res,
                frame = self.reader.next(recv), if !self.ended && self.bytes < 2 * READ_AHEAD => {
                    match frame? {
                        Some(f) if proto::is_telemetry(&f) => match self.telemetry {
                            Some(i) => {
                                self.bytes = self.bytes - self.ahead[i].len() + f.len();
                                self.ahead[i] = f;
                            }
                            None if self.bytes >= READ_AHEAD => self.dropped += 1,
                            None => {
                                self.telemetry = Some(self.ahead.len());
                                self.bytes += f.len() + FRAME_OVERHEAD;
                                self.ahead.push_back(f);
                            }
                        },
                        Some(f) => {
                            self.bytes += f.len() + FRAME_OVERHEAD;
                            self.ahead.push_back(f);
                        }
                        None => self.ended = true,
                    }
                }
            }
        }
    }
}

/// A version the router rejected on this session: offered again at `retry_at` (`None`: offered
/// again, not answered yet), after `wait`, or sooner at the router's `Resync` (the last one
/// at `asked`). Later versions with the same topology and circuits (`content`, when the session
/// knows what it sent: live-state updates) are the same offer: held back with it, not sent in
/// full as they come only to be rejected again.
#[derive(Debug, Clone)]
struct Rejected {
    version: u64,
    content: Option<(u64, u64)>,
    retry_at: Option<tokio::time::Instant>,
    wait: Duration,
    asked: Option<tokio::time::Instant>,
}

impl Rejected {
    /// `version` (with `content`, when known) rejected, `last` what was rejected before it on
    /// this session: the same offer waits twice as long as last time, up to
    /// [`NACK_RETRY_MAX`]; another starts from [`NACK_RETRY_FIRST`].
    fn again(last: Option<Rejected>, version: u64, content: Option<(u64, u64)>) -> Rejected {
        let same = |r: &Rejected| {
            r.version == version || content.is_some_and(|(tv, digest)| r.holds(tv, digest))
        };
        let (wait, asked) = match last {
            Some(r) if same(&r) => ((r.wait * 2).min(NACK_RETRY_MAX), r.asked),
            _ => (NACK_RETRY_FIRST, None),
        };
        Rejected {
            version,
            content,
            retry_at: Some(tokio::time::Instant::now() + wait),
            wait,
            asked,
        }
    }

    /// Whether a version of topology `topology_version` whose circuits have `digest` offers
    /// what was rejected (only the live state differs).
    fn holds(&self, topology_version: u64, digest: u64) -> bool {
        self.content == Some((topology_version, digest))
    }

    /// Whether `p` is the rejected version, or the same offer.
    fn offers(&self, p: &super::Published) -> bool {
        self.version == p.version || self.holds(p.topology_version, p.circuits_digest)
    }
}

/// The answer to a `Renew` (`req`) on `node`'s session at `now`. The name certified is
/// the one the session authenticated, and only while the topology in force has that node: a
/// request that arrives as an apply removes it (its session is being ended) gets no
/// certificate.
async fn renew(
    ctl: &Controller,
    issuer: &Arc<NodeIssuer>,
    node: &str,
    req: Request,
    presented: &rustls::pki_types::CertificateDer<'static>,
    now: Instant,
) -> ToRouter {
    if !ctl.is_node(node) {
        let reason = format!("node {node} is not in the topology");
        tracing::warn!(node, "certificate renewal refused: {reason}");
        return ToRouter::RenewRefused { reason };
    }
    // The answer takes the CA directory's lock and writes its record: off the async workers,
    // one at a time, and given up (refused, the router asks again later) after
    // `renew::SIGN_WAIT` rather than silencing this session while the directory hangs. A
    // blocking thread cannot be stopped: one that hangs keeps the permit, and the requests
    // after it are refused without a thread of their own.
    let busy = || {
        let reason = "the CA directory did not answer in time: asked again later".to_string();
        tracing::warn!(node, "certificate renewal refused: {reason}");
        ToRouter::RenewRefused { reason }
    };
    let deadline = tokio::time::Instant::now() + super::renew::SIGN_WAIT;
    let Some(permit) = issuer.signing(deadline).await else {
        return busy();
    };
    // A permit that came with less than a second left: the answer would likely come too late
    // and be thrown away, its certificate signed and logged for no one.
    if deadline.saturating_duration_since(tokio::time::Instant::now()) < Duration::from_secs(1) {
        return busy();
    }
    let (i, n, p) = (issuer.clone(), node.to_string(), presented.clone());
    let answer = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        i.answer(&n, &req, &p, now)
    });
    match tokio::time::timeout_at(deadline, answer).await {
        Ok(answer) => answer.unwrap_or_else(|e| ToRouter::RenewRefused {
            reason: crate::internal(e),
        }),
        Err(_) => busy(),
    }
}

/// The versions a session wrote and the router has not answered yet (at most
/// [`MAX_UNANSWERED`], oldest first), each with its topology version. A router answers (ACK or
/// NACK) what it applies in the order it arrived, and answers some versions with nothing (a
/// delta for a base it lacks gets a `Resync`), so an answer consumes its version and every older
/// one; a version may be in it twice (a delta, then the same version in full after a `Resync`).
/// Each keeps the digest of its circuits too ([`super::Published::circuits_digest`]): a
/// rejection is compared with later versions by its content ([`Rejected`]). (An `Arc` of each
/// list kept the lists of up to [`MAX_UNANSWERED`] versions alive for a router that answers
/// nothing: every circuit operation publishes a new list.)
#[derive(Debug, Default)]
struct Unanswered(std::collections::VecDeque<(u64, u64, u64)>);

impl Unanswered {
    /// `version` (of `topology_version`, its circuits' digest `digest`) was written to the
    /// router.
    fn sent(&mut self, version: u64, topology_version: u64, digest: u64) {
        if self.0.len() == MAX_UNANSWERED {
            self.0.pop_front();
        }
        self.0.push_back((version, topology_version, digest));
    }

    /// The router answered `version`: its topology version and circuits, or `None` when this
    /// session did not send it (or it was answered, or an answer to a later version came
    /// first).
    fn answer(&mut self, version: u64) -> Option<(u64, u64)> {
        let at = self.0.iter().position(|(v, _, _)| *v == version)?;
        self.0
            .drain(..=at)
            .next_back()
            .map(|(_, tv, digest)| (tv, digest))
    }
}

/// Router connections the controller closed since it started, by close code: nodes a topology
/// change removed, refused, protocol errors, hello timeouts, stalled writes and superseded
/// sessions (closes for revocation are counted by the [`tls::CertResolver`]). Served as
/// `tasman_controller_sessions_closed_total{reason}`.
#[derive(Debug, Default)]
pub struct SessionCloses([AtomicU64; SessionCloses::REASONS.len()]);

impl SessionCloses {
    /// Each close code counted (its `reason` label is its name, [`close::name`]).
    pub const REASONS: [u32; 6] = [
        close::NOT_ALLOWED,
        close::REFUSED,
        close::PROTOCOL,
        close::HELLO_TIMEOUT,
        close::WRITE_STALLED,
        close::SUPERSEDED,
    ];

    /// The `reason` label of a counted close code.
    pub fn reason(code: u32) -> &'static str {
        close::name(code.into()).unwrap_or("other")
    }

    fn count(&self, code: u32) {
        if let Some(i) = Self::REASONS.iter().position(|c| *c == code) {
            self.0[i].fetch_add(1, Relaxed);
        }
    }

    /// Closes with `code` so far.
    pub fn get(&self, code: u32) -> u64 {
        Self::REASONS
            .iter()
            .position(|c| *c == code)
            .map_or(0, |i| self.0[i].load(Relaxed))
    }
}

/// Router handshakes the [`HandshakeGate`] turned away since the controller started: sent a
/// Retry (more than [`HandshakeGate::CONTROLLER`]`.0` in progress, the peer's address not yet
/// proven) or refused (at [`HandshakeGate::CONTROLLER`]`.1`). Served as
/// `tasman_controller_handshakes_retried_total` and `tasman_controller_handshakes_refused_total`:
/// a flood of forged Initials shows there, not only in debug logs. Also the handshakes admitted
/// and dropped unfinished at [`router::transport::HANDSHAKE_TIMEOUT`]
/// (`tasman_controller_handshakes_timed_out_total`).
#[derive(Debug, Default)]
pub struct HandshakesTurned {
    pub retried: AtomicU64,
    pub refused: AtomicU64,
    pub timed_out: AtomicU64,
}

impl HandshakesTurned {
    pub fn count(&self, turned: Turned) {
        match turned {
            Turned::Retried => &self.retried,
            Turned::Refused => &self.refused,
        }
        .fetch_add(1, Relaxed);
    }
}

/// A node's budgets across its sessions ([`Controller::session_budgets`]).
#[derive(Debug)]
pub(crate) struct Budgets {
    reports: Budget,
    renewals: Budget,
}

impl Budgets {
    fn new(now: Instant) -> Self {
        Budgets {
            reports: Budget::reports(now),
            renewals: Budget::renewals(now),
        }
    }
}

/// A token bucket of a router's requests of one kind: telemetry reports
/// ([`TELEMETRY_PER_SEC`], [`TELEMETRY_BURST`]), renewal requests ([`RENEW_EVERY`],
/// [`RENEW_BURST`]).
#[derive(Debug)]
struct Budget {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    last: Instant,
}

impl Budget {
    /// Telemetry reports.
    fn reports(now: Instant) -> Self {
        Budget::new(now, TELEMETRY_BURST, f64::from(TELEMETRY_PER_SEC))
    }

    /// Certificate renewal requests.
    fn renewals(now: Instant) -> Self {
        Budget::new(now, RENEW_BURST, 1.0 / RENEW_EVERY.as_secs_f64())
    }

    fn new(now: Instant, burst: u32, per_sec: f64) -> Self {
        Budget {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_sec,
            last: now,
        }
    }

    /// True when a request arriving at `now` is within the budget (and spends it).
    fn take(&mut self, now: Instant) -> bool {
        if self.has(now) {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// True when a request arriving at `now` would be within the budget (spending nothing).
    fn has(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.per_sec;
        self.last = now;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.tokens >= 1.0
    }
}

fn report_node(r: &router::telemetry::TelemetryReport) -> &str {
    r.node.as_str()
}

/// The controller's view of a router's telemetry report. A site's load is kept per service
/// (what routing reads) and also folded into one [`SiteLoad`](topology::route::SiteLoad) for
/// routers of an older version: streams and capacity add up, and the site counts as healthy
/// while any of its services is (a router refuses streams for a failed backend itself, and
/// edges retry elsewhere). A service reported twice keeps its last entry, in both. Whether the
/// node is a site and serves these services is the aggregator's business
/// ([`LiveAggregator::observe`](super::live::LiveAggregator::observe)).
///
/// A neighbour sample with an RTT above [`MAX_RTT`] is left out; the second value counts them.
/// Anti-flap margins outside what `tasman router` accepts (a margin above [`Latency::MAX`], a
/// ratio not in (0, 1]) are left out: the plan then assumes the defaults for that edge.
pub fn sample_of(r: &router::telemetry::TelemetryReport) -> (Sample, usize) {
    let services: std::collections::BTreeMap<ServiceName, topology::route::SiteLoad> = r
        .sites
        .iter()
        .map(|s| {
            let load = topology::route::SiteLoad {
                active_streams: s.active_streams,
                capacity: s.capacity,
                healthy: s.healthy,
            };
            (s.service.clone(), load)
        })
        .collect();
    // Saturating: the numbers are the router's word, and a sum must not overflow (a panic).
    let site = super::live::summed(&services);
    // One sample per neighbour, its first in the report: a report naming one 30,000 times
    // (a 1 MiB frame's worth) cost as many merges under the controller's lock.
    let plausible =
        |n: &&router::telemetry::NeighbourReport| Duration::from_micros(n.rtt_us) <= MAX_RTT;
    let mut named = std::collections::HashSet::new();
    let neighbours: Vec<NeighbourSample> = r
        .neighbours
        .iter()
        .filter(plausible)
        .filter(|n| named.insert(&n.id))
        .map(|n| NeighbourSample {
            neighbour: n.id.clone(),
            rtt: (n.rtt_us > 0).then(|| Duration::from_micros(n.rtt_us)),
            up: n.up,
            // Shown only: an implausible one is left out, not the report refused for it.
            srtt: (n.srtt_us > 0)
                .then(|| Duration::from_micros(n.srtt_us))
                .filter(|d| *d <= MAX_RTT),
        })
        .collect();
    let refused = r.neighbours.iter().filter(|n| !plausible(n)).count();
    let sample = Sample {
        node: r.node.clone(),
        neighbours,
        site,
        services,
        preferred: r
            .preferred
            .iter()
            .map(|(service, site)| (ServiceName::new(service), NodeId::new(site)))
            .collect(),
        margins: r.hysteresis.and_then(|h| {
            let margin = Duration::from_micros(h.margin_us);
            (margin <= Latency::MAX.as_duration() && h.ratio > 0.0 && h.ratio <= 1.0).then(|| {
                topology::Hysteresis {
                    absolute: Latency::from_micros(h.margin_us),
                    relative: h.ratio,
                }
            })
        }),
    };
    (sample, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use router::telemetry::{SiteReport, TelemetryReport};

    /// A `Renew` is answered only for a node of the topology in force: one that arrives on a
    /// removed node's session as the apply ends it gets a refusal, not a certificate. (A removed
    /// router kept getting its certificate renewed for as long as its session stayed.)
    #[tokio::test]
    async fn no_certificate_for_a_node_the_topology_in_force_does_not_have() {
        use crate::controller::tests::{yaml, yaml_without};
        use crate::controller::{records::Origin, renew::DEFAULT_VALIDITY};

        let ca = tempfile::tempdir().unwrap();
        router::pki::init(ca.path()).unwrap();
        let issuer = Arc::new(NodeIssuer::load(ca.path(), DEFAULT_VALIDITY).unwrap());
        let state = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::redb::RedbStore::open(state.path()).unwrap());
        let ctl = Controller::open(store, Some((&yaml("5ms"), "t.yaml"))).unwrap();
        // What each node's session presented: a certificate due for renewal.
        let presented = |node: &str| {
            let now = std::time::SystemTime::now();
            let due = router::pki::Validity::between(
                now - std::time::Duration::from_secs(1000),
                now + std::time::Duration::from_secs(300),
            )
            .unwrap();
            router::pki::issue_with(ca.path(), node, due).unwrap();
            router::tls::TlsIdentity::load(ca.path(), node)
                .unwrap()
                .chain[0]
                .clone()
        };
        let ask = async |node: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let binding = router::pki::SessionBinding::new([1; 32]);
            let req = Request {
                public_key: key.public_key_raw().to_vec(),
                proof: router::pki::prove_possession(&key, &binding).unwrap(),
                binding: Some(binding),
            };
            let p = presented(node);
            renew(&ctl, &issuer, node, req, &p, Instant::now()).await
        };
        assert!(matches!(ask("e").await, ToRouter::Certificate { .. }));

        ctl.apply(
            &yaml_without("5ms", &["e"]),
            "t",
            "remove e",
            Origin::Apply,
            false,
            None,
        )
        .await
        .unwrap();
        match ask("e").await {
            ToRouter::RenewRefused { reason } => {
                assert_eq!(reason, "node e is not in the topology")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(matches!(ask("t").await, ToRouter::Certificate { .. }));
    }

    #[test]
    fn the_renewal_budget_allows_a_burst_then_one_every_ten_seconds() {
        let t0 = Instant::now();
        let mut b = Budget::renewals(t0);
        assert_eq!(
            (0..100).filter(|_| b.take(t0)).count(),
            RENEW_BURST as usize
        );
        assert!(!b.take(t0 + RENEW_EVERY / 2));
        assert!(b.take(t0 + RENEW_EVERY + RENEW_EVERY / 2));
        assert!(!b.take(t0 + RENEW_EVERY + RENEW_EVERY / 2));
    }

    #[test]
    fn the_report_budget_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Budget::reports(t0);
        let taken = (0..1000).filter(|_| b.take(t0)).count();
        assert_eq!(taken, TELEMETRY_BURST as usize, "a burst, then nothing");
        // One second later: one second's worth, however many arrive.
        let t1 = t0 + Duration::from_secs(1);
        let taken = (0..1000).filter(|_| b.take(t1)).count();
        assert_eq!(taken, TELEMETRY_PER_SEC as usize);
        // A router reporting once a second is never dropped.
        assert!((2..100).all(|s| b.take(t0 + Duration::from_secs(s))));
    }

    #[test]
    fn only_versions_sent_and_not_answered_yet_can_be_answered() {
        let mut u = Unanswered::default();
        let none = super::super::circuits_digest(&[]);
        let tv = |a: Option<(u64, u64)>| a.map(|(tv, _)| tv);
        assert_eq!(tv(u.answer(1)), None, "nothing sent");
        u.sent(10, 1, none);
        u.sent(11, 1, none);
        // 11 went as a delta the router could not apply (Resync), then in full.
        u.sent(11, 1, none);
        u.sent(12, 2, none);
        assert_eq!(tv(u.answer(u64::MAX)), None);
        assert_eq!(tv(u.answer(9)), None);
        // 10 unanswered (the router resynced): answering 11 passes over it.
        assert_eq!(tv(u.answer(11)), Some(1));
        assert_eq!(tv(u.answer(10)), None, "older than an answered version");
        assert_eq!(tv(u.answer(11)), Some(1), "sent twice, answered twice");
        assert_eq!(tv(u.answer(11)), None, "not a third time");
        assert_eq!(tv(u.answer(12)), Some(2));
        assert_eq!(tv(u.answer(12)), None);
        // Bounded: the oldest are forgotten.
        for v in 0..(MAX_UNANSWERED as u64 + 5) {
            u.sent(100 + v, 3, none);
        }
        assert_eq!(u.0.len(), MAX_UNANSWERED);
        assert_eq!(tv(u.answer(100)), None);
        assert_eq!(tv(u.answer(105)), Some(3));
    }

    /// A rejection is compared with later versions by what they carry: a version whose circuit
    /// list is equal to the rejected one's (a republication that changed nothing for the
    /// routers, as after an apply that fails a circuit, whose path stays) is the same offer,
    /// whichever list it is; another topology or other circuits are not. (Kept weakly, an equal
    /// list published after the rejected one was dropped was another offer: the back-off
    /// restarted and a full snapshot went out.)
    #[test]
    fn a_rejected_offer_is_known_by_its_content() {
        use topology::circuit::ProvisionedCircuit;
        let circuit = |rate: &str| ProvisionedCircuit {
            id: topology::circuit::CircuitId::new("c-000001"),
            edge: topology::NodeId::new("e"),
            prefix: "10.1.0.0/24".parse().unwrap(),
            service: topology::ServiceName::new("chat"),
            vip: None,
            port: None,
            rate: rate.parse().unwrap(),
            path: vec![topology::NodeId::new("e"), topology::NodeId::new("s")],
        };
        let digest = |c: &[ProvisionedCircuit]| super::super::circuits_digest(c);
        let mut u = Unanswered::default();
        u.sent(301, 1, digest(&[circuit("100Mbps")]));
        let (tv, kept) = u.answer(301).unwrap();
        let r = Rejected::again(None, 301, Some((tv, kept)));
        assert!(r.holds(1, digest(&[circuit("100Mbps")])), "an equal list");
        assert!(
            !r.holds(2, digest(&[circuit("100Mbps")])),
            "another topology"
        );
        assert!(!r.holds(1, digest(&[circuit("200Mbps")])), "other circuits");
        assert!(!r.holds(1, digest(&[])), "no circuits");
    }

    #[test]
    fn site_loads_add_up_without_overflowing() {
        let site = |service: &str, n: u32| SiteReport {
            service: ServiceName::new(service),
            healthy: true,
            active_streams: n,
            capacity: n,
        };
        let report = TelemetryReport {
            node: NodeId::new("s"),
            snapshot_version: 0,
            neighbours: Vec::new(),
            sites: vec![site("a", u32::MAX), site("b", 7), site("c", 1)],
            preferred: Default::default(),
            draining: false,
            hysteresis: None,
        };
        let (sample, _) = sample_of(&report);
        let load = sample.site.expect("a site's load");
        assert_eq!((load.active_streams, load.capacity), (u32::MAX, u32::MAX));
    }

    /// A neighbour named many times in one report is one sample (its first); an RTT over the
    /// bound is counted refused, a repeat is not. (Each copy was merged in turn under the
    /// controller's lock: 30,000 of one neighbour fit in a 1 MiB report.)
    #[test]
    fn a_neighbour_named_many_times_is_one_sample() {
        use router::telemetry::NeighbourReport;
        let n = |id: &str, rtt_us: u64| NeighbourReport {
            id: NodeId::new(id),
            rtt_us,
            srtt_us: 0,
            up: true,
            path_mtu: 0,
            lost_packets: 0,
            dial_failures: 0,
        };
        let mut neighbours = vec![n("t", 1_000)];
        neighbours.extend((0..30_000).map(|_| n("t", 9_000)));
        neighbours.push(n("u", u64::MAX));
        let report = TelemetryReport {
            node: NodeId::new("e"),
            snapshot_version: 0,
            neighbours,
            sites: Vec::new(),
            preferred: Default::default(),
            draining: false,
            hysteresis: None,
        };
        let (sample, refused) = sample_of(&report);
        assert_eq!(sample.neighbours.len(), 1);
        assert_eq!(sample.neighbours[0].rtt, Some(Duration::from_micros(1_000)));
        assert_eq!(refused, 1);
    }

    /// An edge's margins are taken as `tasman router` accepts them; any other is the router's
    /// word against its own flags, and the plan falls back to the defaults.
    #[test]
    fn reported_margins_are_taken_only_within_the_routers_bounds() {
        use router::telemetry::HysteresisReport;
        let margins = |margin_us: u64, ratio: f64| {
            let report = TelemetryReport {
                node: NodeId::new("e"),
                snapshot_version: 0,
                neighbours: Vec::new(),
                sites: Vec::new(),
                preferred: Default::default(),
                draining: false,
                hysteresis: Some(HysteresisReport { margin_us, ratio }),
            };
            sample_of(&report).0.margins
        };
        let h = margins(25_000, 0.5).expect("in bounds");
        assert_eq!(
            (h.absolute, h.relative),
            (Latency::from_micros(25_000), 0.5)
        );
        assert!(
            margins(60_000_000, 1.0).is_some(),
            "60 s and 1 are the largest"
        );
        for (margin_us, ratio) in [
            (60_000_001, 0.5),
            (u64::MAX, 0.5),
            (1, 0.0),
            (1, -1.0),
            (1, 1.5),
            (1, f64::NAN),
            (1, f64::INFINITY),
        ] {
            assert_eq!(margins(margin_us, ratio), None, "{margin_us} us, {ratio}");
        }
    }
}
