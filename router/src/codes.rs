//! Application error codes carried by QUIC stream resets (`RESET_STREAM`, `STOP_SENDING`) and
//! connection closes. They are part of the wire protocol: never renumber, only add.
//!
//! An edge acts on them: codes for which [`Code::retryable`] holds let it retry a client
//! connection on the next candidate (if no byte came back yet); [`Code::marks_site_down`] makes it
//! mark that site down for the service at once (local evidence, no controller round trip).

use std::fmt;

/// A stream reset code. `u32` values are put on the wire as QUIC varints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Code {
    /// Graceful end (also the code of a normal connection close).
    NoError = 0x00,
    /// The stream header did not decode (bad length, bad field, trailing bytes).
    MalformedHeader = 0x10,
    /// The header's version is not one this router speaks.
    UnsupportedVersion = 0x11,
    /// The header announced more than `header::MAX_HEADER_LEN` bytes.
    HeaderTooLarge = 0x12,
    /// The header did not arrive within the header timeout.
    HeaderTimeout = 0x13,
    /// The service named in the header is not in this router's topology.
    UnknownService = 0x20,
    /// The edge has no eligible candidate for the service.
    NoRoute = 0x21,
    /// The next hop in the header is down or its connection failed.
    NextHopUnreachable = 0x22,
    /// The next hop in the header is not a neighbour of this router.
    NotANeighbour = 0x23,
    /// The stream asks this node for a role it does not have (e.g. terminate at a transit).
    WrongRole = 0x24,
    /// The site's backend refused or failed the TCP connect.
    BackendRefused = 0x30,
    /// The site is at its capacity for the service.
    SiteFull = 0x31,
    /// The site does not serve the service.
    ServiceNotServed = 0x32,
    /// The client's TCP connection was reset.
    ClientAbort = 0x40,
    /// The backend's TCP connection was reset or failed mid-stream.
    BackendAbort = 0x41,
    /// A connection further along the path was lost; also what a transit hands back for a next
    /// hop whose connection had no stream to give (counted [`Code::StreamLimit`] there).
    UpstreamLost = 0x42,
    /// No byte moved either way for the idle timeout (`RouterConfig::idle_timeout`) at the edge or
    /// the site that reset the stream.
    IdleTimeout = 0x43,
    /// The edge or the site could not write a byte to its TCP side (the client or the backend
    /// took none) for the write-stall timeout (`RouterConfig::write_stall_timeout`) while bytes
    /// waited: the stream is reset, so that it stops holding its connection's flow-control
    /// window, which the other streams on that neighbour connection share.
    WriteStalled = 0x44,
    /// The next hop's connection had no stream to give: the streams open on it reached the
    /// next hop's grant (`RouterConfig::peer_streams`, 16,384 by default) and none freed up
    /// within `splice::STREAM_GRANT_WAIT`. Retryable, and it blames neither the site nor a link:
    /// they answer, they are busy. Counted by the edge or transit that waited, never sent: a
    /// transit hands such a stream back as `upstream_lost`, which edges built before this code
    /// retry too.
    StreamLimit = 0x45,
    /// The router is shutting down.
    ShuttingDown = 0x50,
    /// An internal error (a bug or resource exhaustion).
    Internal = 0x51,
    /// Reserved for circuits: the circuit's rate limit refused the stream.
    RateLimited = 0x60,
    /// Reserved for circuits: the client is not allowed on any circuit for the service.
    CircuitRefused = 0x61,
    /// The client's source address is in none of the service's `clients` prefixes (its
    /// allow-list): refused at the edge.
    ClientRefused = 0x62,
}

impl Code {
    pub const ALL: [Code; 24] = [
        Code::NoError,
        Code::MalformedHeader,
        Code::UnsupportedVersion,
        Code::HeaderTooLarge,
        Code::HeaderTimeout,
        Code::UnknownService,
        Code::NoRoute,
        Code::NextHopUnreachable,
        Code::NotANeighbour,
        Code::WrongRole,
        Code::BackendRefused,
        Code::SiteFull,
        Code::ServiceNotServed,
        Code::ClientAbort,
        Code::BackendAbort,
        Code::UpstreamLost,
        Code::IdleTimeout,
        Code::WriteStalled,
        Code::StreamLimit,
        Code::ShuttingDown,
        Code::Internal,
        Code::RateLimited,
        Code::CircuitRefused,
        Code::ClientRefused,
    ];

    pub fn from_u64(v: u64) -> Option<Code> {
        Code::ALL.into_iter().find(|c| *c as u64 == v)
    }
    pub fn from_varint(v: quinn::VarInt) -> Option<Code> {
        Code::from_u64(v.into_inner())
    }
    /// The code a peer reset or stopped a stream with: one this build does not know (a newer
    /// peer's) as `internal`.
    pub fn from_peer(v: quinn::VarInt) -> Code {
        Code::from_varint(v).unwrap_or(Code::Internal)
    }
    pub fn varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self as u32)
    }
    /// Snake-case name, used in logs and as the metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Code::NoError => "no_error",
            Code::MalformedHeader => "malformed_header",
            Code::UnsupportedVersion => "unsupported_version",
            Code::HeaderTooLarge => "header_too_large",
            Code::HeaderTimeout => "header_timeout",
            Code::UnknownService => "unknown_service",
            Code::NoRoute => "no_route",
            Code::NextHopUnreachable => "next_hop_unreachable",
            Code::NotANeighbour => "not_a_neighbour",
            Code::WrongRole => "wrong_role",
            Code::BackendRefused => "backend_refused",
            Code::SiteFull => "site_full",
            Code::ServiceNotServed => "service_not_served",
            Code::ClientAbort => "client_abort",
            Code::BackendAbort => "backend_abort",
            Code::UpstreamLost => "upstream_lost",
            Code::IdleTimeout => "idle_timeout",
            Code::WriteStalled => "write_stalled",
            Code::StreamLimit => "stream_limit",
            Code::ShuttingDown => "shutting_down",
            Code::Internal => "internal",
            Code::RateLimited => "rate_limited",
            Code::CircuitRefused => "circuit_refused",
            Code::ClientRefused => "client_refused",
        }
    }
    /// Whether an edge may retry the client connection on the next candidate (when nothing came
    /// back to the client yet). The failure happened, as far as the edge can know, before a
    /// backend took the request; not always in fact: a site that accepted the stream, wrote its
    /// reply and began handing the request to its backend, on a path whose later link then
    /// failed before the reply came back, is reported `upstream_lost` or
    /// `next_hop_unreachable`, and the request may reach a second backend (`--replay-limit 0`
    /// retries only connections that sent nothing). A hop that refused the stream's header (it
    /// came late, or in a version or form the hop does not take, as in a rolling upgrade)
    /// handed nothing to a backend.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Code::MalformedHeader
                | Code::UnsupportedVersion
                | Code::HeaderTooLarge
                | Code::HeaderTimeout
                | Code::NoRoute
                | Code::NextHopUnreachable
                | Code::NotANeighbour
                | Code::WrongRole
                | Code::BackendRefused
                | Code::SiteFull
                | Code::ServiceNotServed
                | Code::UpstreamLost
                | Code::StreamLimit
                | Code::ShuttingDown
                | Code::UnknownService
        )
    }
    /// Whether the edge may mark the chosen site down for the service, or a link of its path,
    /// for a hold-down at once: when the code is the path's word about it (`edge::blame`: a
    /// transit may send the last two; its `next_hop_unreachable` marks its link to the site).
    /// Not `backend_refused`: one backend connect refused says little of the next (a load
    /// balancer with a dead target refuses a share of them), and the site itself advertises the
    /// service down after 5 in a row (`site::SERVE_DOWN_AFTER`) that 4 more connects confirm, or
    /// after its failed checks; marked at
    /// the first, a service with one site was `no_route` at that edge for the whole hold-down.
    pub fn marks_site_down(self) -> bool {
        matches!(
            self,
            Code::SiteFull | Code::ServiceNotServed | Code::NextHopUnreachable | Code::ShuttingDown
        )
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:02x})", self.name(), *self as u32)
    }
}

/// Connection close codes (`CONNECTION_CLOSE` application codes).
pub mod close {
    /// Normal close (shutdown, topology change removed the link).
    pub const NORMAL: u32 = 0;
    /// The peer's certificate is not (any more) for a node of the topology (a neighbour's
    /// connection, or the controller's session of a node a topology change removed).
    pub const NOT_ALLOWED: u32 = 1;
    /// This router declared the neighbour down (missed probes) and dropped the connection.
    pub const DECLARED_DOWN: u32 = 2;
    /// The peer is not a neighbour of this node in the topology.
    pub const NOT_A_NEIGHBOUR: u32 = 3;
    /// The controller refused a router's control session (unknown node, certificate name and
    /// hello disagree, or its first message was not a hello); a `Refused` frame went first.
    pub const REFUSED: u32 = 4;
    /// A control frame over its size limit, or a message that did not decode.
    pub const PROTOCOL: u32 = 5;
    /// No control stream and hello within the controller's hello timeout.
    pub const HELLO_TIMEOUT: u32 = 6;
    /// The peer's certificate is on a revocation list this node adopted
    /// (`tls::close_when_untrusted`).
    pub const REVOKED: u32 = 7;
    /// The peer's certificate chains to no CA of the trust bundle this node has in force: its CA
    /// left the bundle (`ca.pem` reloaded, e.g. after `tasman pki retire-ca`;
    /// `tls::close_when_untrusted`).
    pub const UNTRUSTED: u32 = 8;
    /// One side of a control connection could not write a byte to the control stream for its
    /// write-stall bound: the peer stopped reading. The controller closes a router so
    /// (`distribute::WRITE_STALL_TIMEOUT`, 30 s), and a router's control client its controller
    /// (`control::client::WRITE_STALL_TIMEOUT`, 30 s).
    pub const WRITE_STALLED: u32 = 9;
    /// The controller took a newer control session of the same node (the same certificate name)
    /// and closed this older one: a node has one live session, the newest (a router that
    /// reconnects after a network blip gets its new session at once, while the controller's side
    /// of the old one could otherwise stay until its idle timeout). A router closes so the oldest
    /// of a peer's connections past `inbound::MAX_CONNECTIONS_PER_PEER` (4) at once.
    pub const SUPERSEDED: u32 = 10;
    /// A router's control client heard no byte from the controller for its silence bound
    /// (`control::client::SILENCE_TIMEOUT`, 20 s: ten heartbeats) on a connection still up: the
    /// controller's session stopped talking.
    pub const CONTROLLER_SILENT: u32 = 11;
    /// A router heard nothing on a neighbour's incoming connection for
    /// `inbound::PEER_SILENCE` (3 s; a live neighbour's probes come every 100 ms and its
    /// keep-alives every 2 s): the neighbour crashed or its path is cut, and the streams it
    /// opened (a site's capacity slots and backend connections) end now rather than at the
    /// 10 s idle timeout.
    pub const PEER_SILENT: u32 = 12;

    /// Every close code with its name (snake case, for logs and docs), in number order.
    pub const ALL: [(u32, &str); 13] = [
        (NORMAL, "normal"),
        (NOT_ALLOWED, "not_allowed"),
        (DECLARED_DOWN, "declared_down"),
        (NOT_A_NEIGHBOUR, "not_a_neighbour"),
        (REFUSED, "refused"),
        (PROTOCOL, "protocol"),
        (HELLO_TIMEOUT, "hello_timeout"),
        (REVOKED, "revoked"),
        (UNTRUSTED, "untrusted"),
        (WRITE_STALLED, "write_stalled"),
        (SUPERSEDED, "superseded"),
        (CONTROLLER_SILENT, "controller_silent"),
        (PEER_SILENT, "peer_silent"),
    ];

    /// The name of close code `code`, if it is one.
    pub fn name(code: u64) -> Option<&'static str> {
        ALL.iter()
            .find(|(c, _)| u64::from(*c) == code)
            .map(|(_, n)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_roundtrip_and_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for c in Code::ALL {
            assert!(seen.insert(c as u32), "{c} duplicated");
            assert_eq!(Code::from_varint(c.varint()), Some(c));
        }
        assert_eq!(Code::from_u64(0xdead), None);
    }

    /// In number order, each once (numbers are taken in parallel changes, so a gap can stand
    /// until the change that takes it lands).
    #[test]
    fn close_codes_are_numbered_in_order_and_named_once() {
        for pair in close::ALL.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{pair:?}");
        }
        for (code, name) in close::ALL {
            assert_eq!(close::name(code.into()), Some(name));
            assert_eq!(
                close::ALL.iter().filter(|(_, n)| *n == name).count(),
                1,
                "{name}"
            );
        }
        assert_eq!(close::name(close::UNTRUSTED.into()), Some("untrusted"));
        assert_eq!(close::name(99), None);
    }
}
