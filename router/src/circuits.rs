//! Circuits at the edge: classify a client connection to its circuit, and hold each circuit's
//! rate limiter (one [`CircuitLimiter`] per circuit, shared by all its connections).
//!
//! The table is rebuilt off the data path on every snapshot ([`CircuitTable::build`]) and read
//! with one atomic load per connection. A circuit's limiter survives rebuilds (same id, same
//! `Arc`), and a resize changes its rate in place, so connections in flight follow it.
//!
//! Classification of a connection accepted at `dst` from `client`:
//! 1. `dst` is a circuit's VIP:port at this edge: that circuit, if `client` is in its prefix;
//!    otherwise refused (`CircuitRefused`): a VIP belongs to one customer.
//! 2. else, with the service known (listener or service VIP): the circuit of that service at
//!    this edge whose prefix contains `client` (longest prefix wins);
//! 3. else, when the service has `requires_circuit: true`: refused (`CircuitRefused`);
//! 4. else, when the service has a `clients` allow-list that `client` is in none of: refused
//!    (`ClientRefused`). A circuit is a grant of its own: its prefix is its allow-list;
//! 5. else the connection is carried without a circuit.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::task::AbortHandle;
use topology::circuit::ProvisionedCircuit;
use topology::{NodeId, ServiceName};

use crate::codes::Code;
pub use crate::ratelimit::CircuitLimiter;
use crate::snapshot::Snapshot;

/// One circuit of this edge.
#[derive(Debug)]
pub struct EdgeCircuit {
    pub spec: ProvisionedCircuit,
    /// The circuit id as the stream header carries it.
    pub id: String,
    pub limiter: Arc<CircuitLimiter>,
    /// The last path the circuit was published with (kept while it is published without one:
    /// failed by a topology change), which its connections took: a path other than this one
    /// is a move ([`CircuitTable::build`]).
    placed: Vec<NodeId>,
}

impl EdgeCircuit {
    /// Whether `dst` is this circuit's VIP (at its port), as a VIP listener's connections see
    /// it: such a listener carries its own circuit's clients only.
    pub fn is_vip(&self, dst: Option<SocketAddr>) -> bool {
        let vip = (self.spec.vip.zip(self.spec.port))
            .map(|(ip, port)| canonical_sock(SocketAddr::new(ip, port)));
        vip.is_some() && vip == dst.map(canonical_sock)
    }
}

/// What a connection is, after classification.
#[derive(Debug, Clone)]
pub enum Classified {
    Circuit(ServiceName, Arc<EdgeCircuit>),
    Plain(ServiceName),
    Refused(Code),
}

/// This edge's circuits, indexed for classification.
#[derive(Debug, Default)]
pub struct CircuitTable {
    /// Per service, longest prefix first.
    by_service: HashMap<ServiceName, Vec<Arc<EdgeCircuit>>>,
    by_vip: HashMap<SocketAddr, Arc<EdgeCircuit>>,
    requires: HashSet<ServiceName>,
    /// The services with a `clients` allow-list, and that list.
    clients: HashMap<ServiceName, Vec<ipnetwork::IpNetwork>>,
}

impl CircuitTable {
    /// Revokes every circuit's limiter: their connections still open end at their next bytes
    /// (the node carries no circuits any more: it is no longer an edge).
    pub fn revoke_all(&self) {
        for c in self.by_service.values().flatten() {
            c.limiter.revoke();
        }
    }

    /// Builds the table for `node` from a snapshot, reusing `previous`'s limiters.
    pub fn build(node: &NodeId, snap: &Snapshot, previous: &CircuitTable) -> CircuitTable {
        let old: HashMap<&str, &Arc<EdgeCircuit>> = previous
            .by_service
            .values()
            .flatten()
            .map(|c| (c.id.as_str(), c))
            .collect();
        let mut t = CircuitTable {
            requires: snap
                .topology
                .services
                .iter()
                .filter(|s| s.requires_circuit)
                .map(|s| s.name.clone())
                .collect(),
            clients: snap
                .topology
                .services
                .iter()
                .filter(|s| !s.clients.is_empty())
                .map(|s| (s.name.clone(), s.clients.clone()))
                .collect(),
            ..CircuitTable::default()
        };
        for spec in snap.circuits.iter().filter(|c| &c.edge == node) {
            // The path its connections took: the last one it was published with.
            let placed = match old.get(spec.id.as_str()) {
                Some(o) if spec.path.is_empty() => o.placed.clone(),
                _ => spec.path.clone(),
            };
            let limiter = match old.get(spec.id.as_str()) {
                // The same path as the last one, or none now (a circuit a topology change failed
                // is published without one, its connections carried unreserved) or before (a
                // new edge's first sight of it): no move. Restored on another path than the one
                // it had before it failed, it has moved.
                Some(o) if o.placed == placed || o.placed.is_empty() => {
                    if o.limiter.rate() != spec.rate {
                        o.limiter.set_rate(spec.rate);
                    }
                    o.limiter.clone()
                }
                // Moved to another path (a resize the old path had no room for): the
                // connections open on the old path end at their next bytes, as a removed
                // circuit's do, and the new ones take the new path under a limiter of their
                // own. (They went on over the old path at the new rate, and, once the move was
                // active, over links whose reservation the move had given back to others.)
                Some(o) => {
                    o.limiter.revoke();
                    CircuitLimiter::new(spec.rate)
                }
                None => CircuitLimiter::new(spec.rate),
            };
            let c = Arc::new(EdgeCircuit {
                id: spec.id.to_string(),
                spec: spec.clone(),
                limiter,
                placed,
            });
            if let (Some(ip), Some(port)) = (spec.vip, spec.port) {
                // Keyed as `classify` looks it up: a VIP from an IPv4-mapped pool (refused in a
                // new text, kept with a warning in a stored one) is the IPv4 address clients
                // reach, and the listener binds that.
                t.by_vip
                    .insert(canonical_sock(SocketAddr::new(ip, port)), c.clone());
            }
            t.by_service
                .entry(spec.service.clone())
                .or_default()
                .push(c);
        }
        // A circuit the snapshot no longer has: its capacity went back to the fabric, so its
        // connections still open end at their next bytes.
        let kept: HashSet<&str> = t
            .by_service
            .values()
            .flatten()
            .map(|c| c.id.as_str())
            .collect();
        for (id, c) in &old {
            if !kept.contains(id) {
                c.limiter.revoke();
            }
        }
        for v in t.by_service.values_mut() {
            v.sort_by(|a, b| {
                b.spec
                    .prefix
                    .prefix()
                    .cmp(&a.spec.prefix.prefix())
                    .then(a.id.cmp(&b.id))
            });
        }
        t
    }

    /// HOT PATH (per connection): hash lookups and a short scan, no allocation.
    pub fn classify(
        &self,
        service: Option<&ServiceName>,
        client: IpAddr,
        dst: Option<SocketAddr>,
    ) -> Classified {
        let client = canonical(client);
        if let Some(c) = dst.map(canonical_sock).and_then(|d| self.by_vip.get(&d)) {
            return if c.spec.prefix.contains(client) {
                Classified::Circuit(c.spec.service.clone(), c.clone())
            } else {
                Classified::Refused(Code::CircuitRefused)
            };
        }
        let Some(service) = service else {
            return Classified::Refused(Code::UnknownService);
        };
        if let Some(c) = self
            .by_service
            .get(service)
            .and_then(|v| v.iter().find(|c| c.spec.prefix.contains(client)))
        {
            return Classified::Circuit(service.clone(), c.clone());
        }
        if self.requires.contains(service) {
            return Classified::Refused(Code::CircuitRefused);
        }
        if let Some(allowed) = self.clients.get(service)
            && !allowed.iter().any(|p| p.contains(client))
        {
            return Classified::Refused(Code::ClientRefused);
        }
        Classified::Plain(service.clone())
    }

    /// The VIP:port addresses this edge should accept on, with their service.
    pub fn vips(&self) -> impl Iterator<Item = (SocketAddr, &ServiceName)> + '_ {
        self.by_vip.iter().map(|(a, c)| (*a, &c.spec.service))
    }

    pub fn len(&self) -> usize {
        self.by_service.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`, from dual-stack sockets) compares as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `a` with an IPv4-mapped IPv6 address written as IPv4.
pub(crate) fn canonical_sock(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(a.ip()), a.port())
}

/// Listeners on this edge's circuit VIPs, kept in step with the circuit table (at each snapshot
/// and each tick of the control task). A VIP that cannot be bound here (not a local address) is
/// logged once and left to transparent mode (iptables REDIRECT to the transparent port
/// classifies by original destination the same way); it is tried again at each sync, so a VIP
/// whose port was held by a listener being closed is bound a second later.
#[derive(Default)]
pub struct VipListeners {
    bound: Mutex<VipState>,
}

#[derive(Default)]
struct VipState {
    bound: HashMap<SocketAddr, AbortHandle>,
    /// VIPs that could not be bound.
    failed: crate::edge::BindFailures,
}

impl VipListeners {
    /// Binds listeners for new VIPs and closes those no longer wanted. A VIP that `covered`
    /// says a client listener already serves (a wildcard address on its port) is not bound.
    /// `spawn` starts the accept loop for a bound listener (the edge's, with the VIP's service).
    pub fn sync(
        &self,
        table: &CircuitTable,
        covered: impl Fn(SocketAddr) -> bool,
        spawn: impl Fn(TcpListener, ServiceName) -> AbortHandle,
    ) {
        let want: HashMap<SocketAddr, &ServiceName> =
            table.vips().filter(|(addr, _)| !covered(*addr)).collect();
        let mut st = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        let VipState { bound, failed } = &mut *st;
        bound.retain(|addr, h| {
            let keep = want.contains_key(addr);
            if !keep {
                h.abort();
            }
            keep
        });
        failed.keep(|addr| want.contains_key(addr));
        for (addr, service) in want {
            if bound.contains_key(&addr) {
                continue;
            }
            match crate::edge::listen(addr) {
                Ok(l) => {
                    tracing::info!(%addr, %service, "circuit VIP listener");
                    failed.bound(&addr);
                    bound.insert(addr, spawn(l, service.clone()));
                }
                Err(e) => {
                    if failed.failed(addr, &e) {
                        tracing::warn!(%addr, error = %e, "cannot bind circuit VIP (transparent mode still works; tried again every second)")
                    }
                }
            }
        }
    }

    /// Closes every VIP listener (router shutdown).
    pub fn close_all(&self) {
        let mut st = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        for (_, h) in st.bound.drain() {
            h.abort();
        }
        st.failed.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use topology::Bandwidth;
    use topology::circuit::CircuitId;

    fn circuit(
        id: &str,
        edge: &str,
        prefix: &str,
        service: &str,
        vip: Option<&str>,
        mbps: u64,
    ) -> ProvisionedCircuit {
        ProvisionedCircuit {
            id: CircuitId::new(id),
            edge: NodeId::new(edge),
            prefix: prefix.parse().unwrap(),
            service: ServiceName::new(service),
            vip: vip.map(|v| v.parse().unwrap()),
            port: Some(8080),
            rate: Bandwidth::from_mbps(mbps),
            path: vec![NodeId::new(edge), NodeId::new("site")],
        }
    }

    fn snap(circuits: Vec<ProvisionedCircuit>, requires: bool) -> Snapshot {
        let mut topo = topology::Topology::default();
        topo.services.push(topology::Service {
            name: ServiceName::new("llm"),
            port: Some(8080),
            vips: vec![],
            clients: vec![],
            residency: Default::default(),
            requires_circuit: requires,
            affinity: Default::default(),
        });
        topo.services.push(topology::Service {
            name: ServiceName::new("open"),
            port: Some(8081),
            vips: vec![],
            clients: vec![],
            residency: Default::default(),
            requires_circuit: false,
            affinity: Default::default(),
        });
        let mut s = Snapshot::new(1, Arc::new(topo));
        s.circuits = Arc::new(circuits);
        s
    }

    fn id(c: &Classified) -> String {
        match c {
            Classified::Circuit(s, c) => format!("{s}/{}", c.id),
            Classified::Plain(s) => format!("{s}/-"),
            Classified::Refused(code) => format!("refused:{}", code.name()),
        }
    }

    /// How `t` classifies a connection from `client` to `dest` that came in on no service
    /// listener (a VIP's).
    fn by_vip(t: &CircuitTable, client: &str, dest: &str) -> String {
        id(&t.classify(None, client.parse().unwrap(), Some(dest.parse().unwrap())))
    }

    /// A client of a deleted circuit's VIP (its listener not closed yet) whose address is in
    /// another circuit's prefix classifies as that circuit: the VIP listener must refuse it
    /// (`EdgeCircuit::is_vip`), not carry it as another customer's.
    #[test]
    fn a_deleted_circuits_vip_client_is_not_another_circuits() {
        let me = NodeId::new("syd");
        let c2 = circuit("c-2", "syd", "127.0.0.0/8", "llm", Some("127.77.0.2"), 100);
        let t = CircuitTable::build(&me, &snap(vec![c2], true), &CircuitTable::default());
        let dst: SocketAddr = "127.77.0.1:8080".parse().unwrap();
        let Classified::Circuit(_, other) = t.classify(
            Some(&ServiceName::new("llm")),
            "127.1.2.3".parse().unwrap(),
            Some(dst),
        ) else {
            panic!("classified as no circuit");
        };
        assert_eq!(other.id, "c-2");
        assert!(
            !other.is_vip(Some(dst)),
            "c-2's VIP is not the deleted one's"
        );
        assert!(other.is_vip(Some("127.77.0.2:8080".parse().unwrap())));
        assert!(!other.is_vip(None));
    }

    /// A circuit whose rate changes on its path keeps its limiter (its open connections go on
    /// at the new rate); one moved to another path ends the connections open on the old path
    /// (its old limiter revoked, as a removed circuit's) and starts a limiter of its own.
    #[test]
    fn a_circuit_moved_to_another_path_ends_its_connections_on_the_old_one() {
        let me = NodeId::new("syd");
        let c = circuit("c-1", "syd", "10.0.0.0/8", "llm", Some("127.77.0.1"), 100);
        let t1 = CircuitTable::build(&me, &snap(vec![c.clone()], true), &CircuitTable::default());
        let first = t1.by_service[&ServiceName::new("llm")][0].limiter.clone();
        let mut faster = c.clone();
        faster.rate = Bandwidth::from_mbps(200);
        let t2 = CircuitTable::build(&me, &snap(vec![faster.clone()], true), &t1);
        let kept = t2.by_service[&ServiceName::new("llm")][0].limiter.clone();
        assert!(Arc::ptr_eq(&first, &kept) && !first.up.is_revoked());
        assert_eq!(kept.rate(), Bandwidth::from_mbps(200));
        let mut moved = faster.clone();
        moved.path = vec![NodeId::new("syd"), NodeId::new("t2"), NodeId::new("site")];
        let t3 = CircuitTable::build(&me, &snap(vec![moved.clone()], true), &t2);
        let new = t3.by_service[&ServiceName::new("llm")][0].limiter.clone();
        assert!(first.up.is_revoked(), "the old path's connections end");
        assert!(!Arc::ptr_eq(&first, &new) && !new.up.is_revoked());
        // Failed by a topology change (published without a path: carried unreserved), then
        // restored on the path it had: no move either way, its connections go on.
        let mut failed = moved.clone();
        failed.path = Vec::new();
        let t4 = CircuitTable::build(&me, &snap(vec![failed.clone()], true), &t3);
        let t5 = CircuitTable::build(&me, &snap(vec![moved], true), &t4);
        let last = t5.by_service[&ServiceName::new("llm")][0].limiter.clone();
        assert!(Arc::ptr_eq(&new, &last) && !new.up.is_revoked());
        // Failed again, and restored on another path (the edge missed the version between):
        // a move, its connections on the old path end.
        let t6 = CircuitTable::build(&me, &snap(vec![failed], true), &t5);
        let t7 = CircuitTable::build(&me, &snap(vec![c], true), &t6);
        let other = t7.by_service[&ServiceName::new("llm")][0].limiter.clone();
        assert!(new.up.is_revoked() && !Arc::ptr_eq(&new, &other));
    }

    #[test]
    fn classifies_by_vip_then_longest_prefix_and_refuses_without_circuit() {
        let me = NodeId::new("syd");
        let s = snap(
            vec![
                circuit("c-1", "syd", "10.0.0.0/8", "llm", Some("127.77.0.1"), 100),
                circuit("c-2", "syd", "10.1.0.0/16", "llm", Some("127.77.0.2"), 50),
                circuit("c-3", "mel", "10.0.0.0/8", "llm", Some("127.77.0.3"), 50),
            ],
            true,
        );
        let t = CircuitTable::build(&me, &s, &CircuitTable::default());
        assert_eq!(t.len(), 2, "only this edge's circuits");
        let llm = ServiceName::new("llm");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let sock = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        // By VIP: the VIP's circuit, whatever the longest prefix says.
        assert_eq!(by_vip(&t, "10.1.2.3", "127.77.0.1:8080"), "llm/c-1");
        // A VIP only serves its customer's prefix.
        assert_eq!(
            by_vip(&t, "192.0.2.1", "127.77.0.2:8080"),
            "refused:circuit_refused"
        );
        // Another edge's VIP is not ours.
        assert_eq!(
            by_vip(&t, "10.1.2.3", "127.77.0.3:8080"),
            "refused:unknown_service"
        );
        // By listener: longest prefix.
        assert_eq!(
            id(&t.classify(Some(&llm), ip("10.1.2.3"), sock("127.0.0.1:8080"))),
            "llm/c-2"
        );
        assert_eq!(id(&t.classify(Some(&llm), ip("10.2.0.1"), None)), "llm/c-1");
        // Mapped IPv4 is IPv4.
        assert_eq!(
            id(&t.classify(Some(&llm), ip("::ffff:10.2.0.1"), None)),
            "llm/c-1"
        );
        // No circuit for a service that requires one: refused; one that does not: plain.
        assert_eq!(
            id(&t.classify(Some(&llm), ip("192.0.2.1"), None)),
            "refused:circuit_refused"
        );
        assert_eq!(
            id(&t.classify(Some(&ServiceName::new("open")), ip("192.0.2.1"), None)),
            "open/-"
        );
    }

    /// A VIP allocated from an IPv4-mapped pool (a stored text keeps one, with a warning) is
    /// matched as the IPv4 address a client connects to. (`by_vip` kept `::ffff:127.77.0.1`,
    /// `classify` looked up `127.77.0.1`: the circuit's clients were refused.)
    #[test]
    fn an_ipv4_mapped_vip_classifies_connections_to_its_ipv4_address() {
        let me = NodeId::new("syd");
        let s = snap(
            vec![circuit(
                "c-1",
                "syd",
                "10.0.0.0/8",
                "llm",
                Some("::ffff:127.77.0.1"),
                100,
            )],
            true,
        );
        let t = CircuitTable::build(&me, &s, &CircuitTable::default());
        assert_eq!(by_vip(&t, "10.1.2.3", "127.77.0.1:8080"), "llm/c-1");
        assert_eq!(
            by_vip(&t, "10.1.2.3", "[::ffff:127.77.0.1]:8080"),
            "llm/c-1"
        );
        assert_eq!(
            by_vip(&t, "192.0.2.1", "127.77.0.1:8080"),
            "refused:circuit_refused"
        );
        // The listener binds the address clients reach.
        assert_eq!(
            t.vips().map(|(a, _)| a).collect::<Vec<_>>(),
            ["127.77.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
    }

    /// A `clients` allow-list admits its prefixes only (IPv4-mapped sources as IPv4); a
    /// circuit's own prefix is a grant of its own, whatever the list says.
    #[test]
    fn a_clients_list_refuses_other_sources_but_not_a_circuits() {
        let me = NodeId::new("syd");
        let mut s = snap(
            vec![circuit("c-1", "syd", "192.0.2.0/24", "open", None, 100)],
            false,
        );
        let mut topo = (*s.topology).clone();
        topo.services[1].clients = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        s.topology = Arc::new(topo);
        let t = CircuitTable::build(&me, &s, &CircuitTable::default());
        let open = ServiceName::new("open");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let at = |client: &str| id(&t.classify(Some(&open), ip(client), None));
        assert_eq!(at("10.2.3.4"), "open/-");
        assert_eq!(at("::ffff:10.2.3.4"), "open/-");
        assert_eq!(at("2001:db8::1"), "open/-");
        assert_eq!(at("198.51.100.1"), "refused:client_refused");
        assert_eq!(at("2001:db9::1"), "refused:client_refused");
        assert_eq!(at("192.0.2.7"), "open/c-1");
        // A service without a list takes any source.
        assert_eq!(
            id(&t.classify(Some(&ServiceName::new("llm")), ip("198.51.100.1"), None)),
            "llm/-"
        );
    }

    #[test]
    fn limiters_survive_rebuilds_and_follow_resizes() {
        let me = NodeId::new("syd");
        let t1 = CircuitTable::build(
            &me,
            &snap(
                vec![circuit("c-1", "syd", "10.0.0.0/8", "llm", None, 100)],
                true,
            ),
            &CircuitTable::default(),
        );
        let t2 = CircuitTable::build(
            &me,
            &snap(
                vec![circuit("c-1", "syd", "10.0.0.0/8", "llm", None, 200)],
                true,
            ),
            &t1,
        );
        let a = &t1.by_service[&ServiceName::new("llm")][0];
        let b = &t2.by_service[&ServiceName::new("llm")][0];
        assert!(Arc::ptr_eq(&a.limiter, &b.limiter));
        assert_eq!(a.limiter.rate(), Bandwidth::from_mbps(200));
    }
}
