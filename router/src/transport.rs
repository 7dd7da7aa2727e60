//! QUIC transport: the tuning for long fat links and the router's one endpoint.
//!
//! Tuning (see docs/ARCHITECTURE.md, "Transport"): the bandwidth-delay product of a 150 ms RTT
//! path at 1 Gbit/s is ~18.75 MB, so a stream may have 32 MiB unacknowledged in flight and the
//! connection 512 MiB over all its streams (many client streams share one neighbour connection,
//! and a stream whose reader stopped holds its share until it is reset); the send window is
//! 128 MiB (data acknowledged by the peer's transport leaves it, read or not). Windows are limits, not allocations: memory is used only for bytes
//! actually in flight. The UDP socket gets 8 MiB kernel buffers so bursts at those rates are not
//! dropped before quinn reads them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};

pub const STREAM_RECEIVE_WINDOW: u32 = 32 * 1024 * 1024;
/// Sixteen stream windows. A stream whose reader stopped (a client that does not read its
/// response, a backend that does not read its request) keeps what it received, up to its stream
/// window, out of this window, which every stream of the connection shares, until its write-stall
/// timeout resets it (`RouterConfig::write_stall_timeout`): so it takes sixteen such streams at
/// once, not four, to stop the others.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 * STREAM_RECEIVE_WINDOW;
pub const SEND_WINDOW: u64 = 128 * 1024 * 1024;
/// Client connections per neighbour connection (one stream each). quinn pre-allocates state for
/// every stream the peer may open (`StreamsState::new` inserts each id into two hash maps), so
/// this costs CPU and memory on every connection set-up: 2^17 made each handshake insert 262k
/// entries (tens of MB and a stalled runtime with the demo's ~100 neighbour connections).
/// 16,384 still carries the 10,000-connection benchmark on one neighbour connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 1 << 14;
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest an incoming handshake may take, whatever the peer sends: quinn bounds one only by
/// the idle timeout, which every packet it decrypts restarts, an Initial sent again included, so
/// a peer that never finished but resent its Initial every few seconds held its slot of the
/// [`HandshakeGate`] for as long as it liked (1,024 such, and every new peer was turned away).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const UDP_BUFFER: usize = 8 * 1024 * 1024;
/// Largest UDP payload path MTU discovery tries (and the endpoint accepts from peers).
/// Cross-connects and data-centre fabrics commonly carry jumbo frames; where a path does not, the
/// probes are lost and quinn stays at what it confirmed (1200 bytes at least). Not a full jumbo
/// frame (8,952): quinn sends up to 10 segments per GSO `sendmsg`, which must fit 64 KiB.
pub const MTU_UPPER_BOUND: u16 = 6500;

/// The transport configuration every fabric connection uses; the connections a router accepts
/// use it as [`accept_transport_config_with`] gives it, and those it dials as
/// [`dial_transport_config`] does.
///
/// A neighbour may open bidirectional streams only: the router serves no other. A stream nothing
/// reads keeps what the peer sends into it (up to the stream window, the connection window over
/// all of them) until the connection ends, so the router grants none.
pub fn transport_config() -> TransportConfig {
    transport_config_with(Windows::default())
}

/// A connection's receive windows: per stream and over all its streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub stream: u32,
    pub connection: u32,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            stream: STREAM_RECEIVE_WINDOW,
            connection: CONNECTION_RECEIVE_WINDOW,
        }
    }
}

/// [`transport_config`] with other receive windows (tests use small ones).
pub fn transport_config_with(w: Windows) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(w.stream))
        .receive_window(VarInt::from_u32(w.connection))
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
            IDLE_TIMEOUT.as_millis() as u32,
        ))))
        .datagram_receive_buffer_size(Some(1024 * 1024))
        .datagram_send_buffer_size(1024 * 1024);
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtud));
    t
}

/// Binds the router's UDP socket (large kernel buffers) and makes a server+client endpoint.
pub fn endpoint(
    addr: SocketAddr,
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
) -> std::io::Result<quinn::Endpoint> {
    let udp = fabric_socket(addr)?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MTU_UPPER_BOUND)
        .map_err(std::io::Error::other)?;
    let mut ep = quinn::Endpoint::new_with_abstract_socket(
        config,
        Some(server),
        udp,
        Arc::new(quinn::TokioRuntime),
    )?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// The endpoint's UDP socket, bound at `addr`, its buffers sized ([`size_buffers`]).
fn fabric_socket(addr: SocketAddr) -> std::io::Result<Arc<crate::udp::FabricUdp>> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    sock.bind(&addr.into())?;
    // Once bound: a bind that fails (a move retried every second while its address is held)
    // warns of no buffer it did not get.
    size_buffers(&sock);
    Ok(Arc::new(crate::udp::FabricUdp::new(sock.into())?))
}

/// Whether the endpoint bound at `bound` is at `addr` already: the same address whatever its
/// spelling (an IPv4-mapped IPv6 address of a stored topology, the IPv4 form it is now written
/// in: rebinding would fail on the router's own socket).
pub fn bound_at(bound: SocketAddr, addr: SocketAddr) -> bool {
    bound.ip().to_canonical() == addr.ip().to_canonical() && bound.port() == addr.port()
}

/// Moves `ep` to a socket bound at `addr` (a topology that moved this node). Connections this
/// router dialled go on from the new address (QUIC migrates them); those its neighbours dialled
/// end, and they dial the new address, which the same topology gives them. On error the old
/// socket is kept.
pub fn rebind(ep: &quinn::Endpoint, addr: SocketAddr) -> std::io::Result<()> {
    ep.rebind_abstract(fabric_socket(addr)?)
}

/// Gives the socket [`UDP_BUFFER`]-byte kernel buffers. The kernel caps `SO_RCVBUF`/`SO_SNDBUF`
/// at `net.core.{r,w}mem_max` (often 208 KiB to 4 MiB), and a full receive buffer drops datagrams
/// (probes among them) before quinn sees them; a process with `CAP_NET_ADMIN` may exceed the cap
/// with `SO_{RCV,SND}BUFFORCE`, as other QUIC stacks do. Best effort: what it got is logged.
fn size_buffers(sock: &socket2::Socket) {
    // Linux reports twice the size granted (the doubling covers its bookkeeping overhead).
    let short = |got: &std::io::Result<usize>| got.as_ref().map_or(true, |g| *g < 2 * UDP_BUFFER);
    let _ = sock.set_recv_buffer_size(UDP_BUFFER);
    if short(&sock.recv_buffer_size()) {
        force(sock, libc::SO_RCVBUFFORCE);
    }
    let _ = sock.set_send_buffer_size(UDP_BUFFER);
    if short(&sock.send_buffer_size()) {
        force(sock, libc::SO_SNDBUFFORCE);
    }
    let (rcv, snd) = (sock.recv_buffer_size(), sock.send_buffer_size());
    if short(&rcv) {
        tracing::warn!(
            wanted = UDP_BUFFER,
            got = ?rcv,
            "UDP receive buffer below the wanted size (raise net.core.rmem_max, or run with \
             CAP_NET_ADMIN): bursts may be dropped before QUIC reads them"
        );
    } else {
        tracing::debug!(?rcv, ?snd, "UDP socket buffers");
    }
}

/// `setsockopt(SOL_SOCKET, opt, UDP_BUFFER)`; fails quietly without `CAP_NET_ADMIN`.
fn force(sock: &socket2::Socket, opt: libc::c_int) {
    use std::os::fd::AsRawFd;
    let size = UDP_BUFFER as libc::c_int;
    // SAFETY: a valid socket descriptor, and an option value of the size passed.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Shared transport config (one Arc for all connections).
pub fn shared_transport() -> Arc<TransportConfig> {
    Arc::new(transport_config())
}

/// The transport configuration of the connections a router dials: [`transport_config`], but the
/// neighbour may open no stream at all on them (the router opens its streams there; those it
/// serves arrive on the connections the neighbour dialled, see [`transport_config`]).
pub fn dial_transport_config() -> TransportConfig {
    dial_transport_config_with(Windows::default())
}

/// The transport configuration of the connections a router accepts: [`transport_config_with`],
/// but no stream granted at the handshake. quinn allocates its state for every stream id granted
/// as the connection is made (`StreamsState::new`: 1.45 MB measured at [`MAX_CONCURRENT_STREAMS`]),
/// before the peer's certificate is checked, so that a flood of handshakes that never complete
/// (up to the [`HandshakeGate`]'s bound, held for the [`IDLE_TIMEOUT`]) held gigabytes. The
/// router grants [`MAX_CONCURRENT_STREAMS`] once the peer is a node of the topology
/// (`inbound::serve_connection`): a neighbour's first stream waits for that `MAX_STREAMS` frame,
/// one round trip after the handshake at most.
pub fn accept_transport_config_with(w: Windows) -> TransportConfig {
    let mut t = transport_config_with(w);
    t.max_concurrent_bidi_streams(VarInt::from_u32(0));
    t
}

/// [`dial_transport_config`] with other receive windows: no stream granted, as on an accepted
/// connection at its handshake, and none granted later.
pub fn dial_transport_config_with(w: Windows) -> TransportConfig {
    accept_transport_config_with(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node whose stored address was IPv4-mapped and is now written in its IPv4 form has not
    /// moved: rebinding would collide with the router's own socket (and the control client
    /// refused every later version as unbindable).
    #[test]
    fn an_address_in_another_spelling_is_where_the_endpoint_is_bound() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(bound_at(
            a("[::ffff:127.10.0.1]:7000"),
            a("127.10.0.1:7000")
        ));
        assert!(bound_at(
            a("127.10.0.1:7000"),
            a("[::ffff:127.10.0.1]:7000")
        ));
        assert!(!bound_at(a("127.10.0.1:7000"), a("127.10.0.1:7001")));
        assert!(!bound_at(a("127.10.0.1:7000"), a("127.10.0.2:7000")));
    }

    /// The gate admits handshakes up to `validate_above`, then only peers that proved their
    /// address (a Retry first: the client comes back with its token), and refuses at `max`; a
    /// handshake that ends makes room. Real quinn endpoints on loopback; the admitted handshakes
    /// are held, never completed, as a flood's would be.
    #[tokio::test]
    async fn the_handshake_gate_retries_then_refuses_past_its_bounds() {
        let dir = tempfile::tempdir().unwrap();
        crate::pki::init(dir.path()).unwrap();
        crate::pki::issue(dir.path(), "srv").unwrap();
        crate::pki::issue(dir.path(), "cli").unwrap();
        let peers = crate::tls::PeerNames::new(["srv".to_string(), "cli".to_string()]);
        let srv_id = crate::tls::TlsIdentity::load(dir.path(), "srv").unwrap();
        let cli_id = crate::tls::TlsIdentity::load(dir.path(), "cli").unwrap();
        let server_cfg = crate::tls::server_config(&srv_id, &peers, shared_transport()).unwrap();
        let client_cfg = crate::tls::client_config(&cli_id, &peers, shared_transport()).unwrap();
        let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let at = server.local_addr().unwrap();
        let gate = HandshakeGate::new((2, 4));
        let mut held = Vec::new();
        let mut clients = Vec::new();
        // What the gate does with each client's attempts, in order, until one is admitted or
        // refused.
        let mut next = async |held: &mut Vec<_>| {
            let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            client.set_default_client_config(client_cfg.clone());
            let connecting = client.connect(at, "srv").unwrap();
            clients.push((client, tokio::spawn(connecting)));
            let mut seen = Vec::new();
            loop {
                let incoming = tokio::time::timeout(Duration::from_secs(10), server.accept())
                    .await
                    .expect("no attempt reached the server")
                    .unwrap();
                let validated = incoming.remote_address_validated();
                match gate.admit(incoming) {
                    Ok(admitted) => {
                        held.push(admitted);
                        seen.push(("admitted", validated));
                        return seen;
                    }
                    Err(Turned::Retried) => seen.push(("retried", validated)),
                    Err(Turned::Refused) => {
                        seen.push(("refused", validated));
                        return seen;
                    }
                }
            }
        };
        assert_eq!(next(&mut held).await, [("admitted", false)]);
        assert_eq!(next(&mut held).await, [("admitted", false)]);
        assert_eq!(gate.in_progress(), 2);
        let proved = [("retried", false), ("admitted", true)];
        assert_eq!(next(&mut held).await, proved);
        assert_eq!(next(&mut held).await, proved);
        assert_eq!(gate.in_progress(), 4);
        assert_eq!(next(&mut held).await, [("refused", false)]);
        // A handshake ends: room for one more, still past `validate_above`.
        held.pop();
        assert_eq!(gate.in_progress(), 3);
        assert_eq!(next(&mut held).await, proved);
        assert_eq!(gate.in_progress(), 4);
    }

    #[test]
    fn udp_buffers_reach_the_wanted_size_past_the_sysctl_cap_when_permitted() {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        size_buffers(&sock);
        let rcv = sock.recv_buffer_size().unwrap();
        let snd = sock.send_buffer_size().unwrap();
        // The force needs CAP_NET_ADMIN (bit 12 of the effective set), which root in a
        // container may lack.
        let net_admin = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|st| {
                let hex = st.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
                u64::from_str_radix(hex.trim(), 16).ok()
            })
            .is_some_and(|caps| caps & (1 << 12) != 0);
        let cap = |f: &str| -> usize {
            std::fs::read_to_string(f)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        if net_admin {
            // Linux reports twice what it granted.
            assert!(rcv >= 2 * UDP_BUFFER, "receive buffer {rcv}");
            assert!(snd >= 2 * UDP_BUFFER, "send buffer {snd}");
        } else {
            let want = |max: usize| 2 * UDP_BUFFER.min(max);
            assert!(rcv >= want(cap("/proc/sys/net/core/rmem_max")), "{rcv}");
            assert!(snd >= want(cap("/proc/sys/net/core/wmem_max")), "{snd}");
        }
    }
}

/// Bounds the QUIC handshakes an endpoint runs at once. Each accepted handshake costs an ECDHE
/// and a certificate signature and holds its state until it completes or times out
/// ([`HANDSHAKE_TIMEOUT`], [`HandshakeTicket::complete`]); a flood of Initials from spoofed sources (which never complete) would
/// otherwise make the endpoint sign for every one and hold them all, with up to three times
/// their bytes sent back to the forged addresses. Above `validate_above` handshakes in
/// progress, a peer that has not proven its address is sent a Retry first (one round trip more
/// for a real peer, no state and no signature for a forged one); at `max`, new ones are refused.
pub struct HandshakeGate {
    in_progress: Arc<std::sync::atomic::AtomicUsize>,
    validate_above: usize,
    max: usize,
}

/// One handshake counted by a [`HandshakeGate`] until dropped.
pub struct HandshakeTicket(Arc<std::sync::atomic::AtomicUsize>);

impl HandshakeTicket {
    /// The admitted handshake, run to its end or for [`HANDSHAKE_TIMEOUT`] at most (`None`: not
    /// done in time; dropped, its connection closes); counted by the gate until then.
    pub async fn complete(
        self,
        incoming: quinn::Incoming,
    ) -> Option<Result<quinn::Connection, quinn::ConnectionError>> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await.ok()
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a [`HandshakeGate`] did with an incoming connection it did not admit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turned {
    /// Sent a Retry: the peer comes back with a token proving its address.
    Retried,
    /// Refused (at the cap).
    Refused,
}

impl HandshakeGate {
    /// A router's peers are its neighbours: tens of handshakes at once at most.
    pub const ROUTER: (usize, usize) = (64, 1024);
    /// A controller's are every router, all at once after it restarts.
    pub const CONTROLLER: (usize, usize) = (1024, 16_384);

    pub fn new((validate_above, max): (usize, usize)) -> Self {
        HandshakeGate {
            in_progress: Arc::default(),
            validate_above,
            max,
        }
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> usize {
        self.in_progress.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Admits `incoming` (counted until the ticket is dropped: hold it until the handshake
    /// ends), or turns it away.
    pub fn admit(
        &self,
        incoming: quinn::Incoming,
    ) -> Result<(quinn::Incoming, HandshakeTicket), Turned> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.in_progress.load(Relaxed);
        if now >= self.max {
            incoming.refuse();
            return Err(Turned::Refused);
        }
        if now >= self.validate_above && !incoming.remote_address_validated() {
            // Only an unvalidated peer can be retried; it is not one here.
            let _ = incoming.retry();
            return Err(Turned::Retried);
        }
        self.in_progress.fetch_add(1, Relaxed);
        Ok((incoming, HandshakeTicket(self.in_progress.clone())))
    }
}
