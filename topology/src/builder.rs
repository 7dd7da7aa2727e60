//! Build a [`Topology`] in code, for tests, property tests and benchmarks. Operators write
//! YAML (see `crate::load`); this is the programmer's shorthand with boring defaults
//! (region `r1`, country `AU`, location 0,0, address 127.0.0.1:0, capacity 10Gbps).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::model::*;
use crate::units::{Bandwidth, Latency};

#[derive(Debug, Clone, Default)]
pub struct TopologyBuilder {
    topo: Topology,
}

impl TopologyBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node in region `r1`, country `AU`.
    pub fn node(&mut self, id: &str, kind: NodeKind) -> &mut Self {
        self.node_in(id, kind, "r1", country("AU"))
    }

    /// Adds a node in the given region and country.
    pub fn node_in(
        &mut self,
        id: &str,
        kind: NodeKind,
        region: &str,
        country: CountryCode,
    ) -> &mut Self {
        self.topo.nodes.push(Node {
            id: NodeId::new(id),
            kind,
            region: Region::new(region),
            country,
            location: Location { lat: 0.0, lon: 0.0 },
            address: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
            state: AdminState::Up,
            client_address: None,
            transparent_port: None,
            serves: Vec::new(),
        });
        self
    }

    /// Sets a node's admin state (no-op for an unknown id).
    pub fn node_state(&mut self, id: &str, state: AdminState) -> &mut Self {
        if let Some(n) = self.topo.nodes.iter_mut().find(|n| n.id.as_str() == id) {
            n.state = state;
        }
        self
    }

    /// Adds an up link with a 10Gbps capacity.
    pub fn link(&mut self, a: &str, b: &str, latency: Latency) -> &mut Self {
        self.link_with(a, b, latency, AdminState::Up)
    }

    pub fn link_with(
        &mut self,
        a: &str,
        b: &str,
        latency: Latency,
        state: AdminState,
    ) -> &mut Self {
        self.topo.links.push(Link {
            a: NodeId::new(a),
            b: NodeId::new(b),
            latency,
            capacity: Bandwidth::from_mbps(10_000),
            state,
        });
        self
    }

    /// Adds an unrestricted service.
    pub fn service(&mut self, name: &str) -> &mut Self {
        self.service_with(name, Residency::default())
    }

    pub fn service_with(&mut self, name: &str, residency: Residency) -> &mut Self {
        self.topo.services.push(Service {
            name: ServiceName::new(name),
            port: None,
            vips: Vec::new(),
            clients: Vec::new(),
            residency,
            requires_circuit: false,
            affinity: Affinity::None,
        });
        self
    }

    /// Makes `site` serve `service` with the given capacity (no-op for an unknown site).
    pub fn serve(&mut self, site: &str, service: &str, capacity: u32) -> &mut Self {
        if let Some(n) = self.topo.nodes.iter_mut().find(|n| n.id.as_str() == site) {
            n.serves.push(SiteService {
                service: ServiceName::new(service),
                backend: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9)),
                capacity,
                weight: default_weight(),
                dial: default_dial(),
                health_check: None,
                health: Default::default(),
            });
        }
        self
    }

    /// Sets the traffic dial (percent) of `service` at `site` (no-op unless `site` serves it).
    pub fn dial(&mut self, site: &str, service: &str, percent: u8) -> &mut Self {
        if let Some(s) = self
            .topo
            .nodes
            .iter_mut()
            .filter(|n| n.id.as_str() == site)
            .flat_map(|n| n.serves.iter_mut())
            .find(|s| s.service.as_str() == service)
        {
            s.dial = percent;
        }
        self
    }

    pub fn build(&self) -> Topology {
        self.topo.clone()
    }
}

/// A country code from a literal. Panics on an invalid code: for literals in tests only.
pub fn country(code: &str) -> CountryCode {
    CountryCode::parse(code)
        .unwrap_or_else(|| panic!("{code:?} is not a two-letter upper-case country code"))
}

/// Shorthand for a latency in milliseconds (fractions allowed).
pub fn ms(v: f64) -> Latency {
    Latency::from_millis_f64(v)
}
