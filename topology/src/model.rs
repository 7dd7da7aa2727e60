//! The validated topology model: plain data, no spans, no I/O.
//!
//! Values of these types only come out of [`crate::load`] (or are built by tests and
//! benchmarks), so every id they name exists and every unit is in range. The YAML layer
//! (`crate::yaml`) keeps the source positions; this layer does not need them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::units::{Bandwidth, Latency};

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn new(s: impl AsRef<str>) -> Self {
                $name(Arc::from(s.as_ref()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::new(s)
            }
        }
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

/// Whether `s` is a valid id for a node, service, region or pool: 1 to 63 lowercase ASCII
/// letters and digits in groups joined by single hyphens (`syd-edge-1`). Ids never contain
/// `--`, which is what makes link names `a--b` unambiguous.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.split('-').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

/// Why `id` cannot be a node's id although it is a valid id, if it cannot: a node's id is the
/// name in its certificate and of its files beside the CA's, and these names are taken; and it
/// is the TLS server name its peers verify, which may not read as a number.
pub fn reserved_node_id(id: &str) -> Option<&'static str> {
    if reads_as_number(id) {
        return Some(
            "a node's id is the TLS server name its peers check, and TLS refuses a name that \
             reads as a number (all digits, or 0x and hex digits): no connection to or from \
             the node could be made",
        );
    }
    match id {
        "ca" => Some(
            "the CA's files are ca.pem and ca.key: a node's certificate files of that name would \
             replace them",
        ),
        "controller" => Some(
            "it is the controller's certificate name: a node's certificate for it would be a \
             controller every router trusts",
        ),
        _ => None,
    }
}

/// Whether `id` (one DNS label) reads as a number: all decimal digits, or `0x` followed by hex
/// digits. rustls refuses such a server name (the WHATWG "ends in a number" rule, against
/// confusion with an IPv4 address), so a node so named could neither dial nor be verified.
fn reads_as_number(id: &str) -> bool {
    let b = id.as_bytes();
    (!b.is_empty() && b.iter().all(u8::is_ascii_digit))
        || b.strip_prefix(b"0x")
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
}

id_newtype!(
    /// A node's id, e.g. `syd-edge-1`. Also the name in its certificate.
    NodeId
);
id_newtype!(
    /// An inference service's name, e.g. `llm-chat`.
    ServiceName
);
id_newtype!(
    /// A region name, e.g. `au-east`.
    Region
);
id_newtype!(
    /// An address pool's name, e.g. `circuit-vips`.
    PoolName
);

/// ISO 3166-1 alpha-2 country code, upper case (`AU`, `NZ`, `SG`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CountryCode([u8; 2]);

/// ISO 3166-1 alpha-2 officially assigned codes, sorted (249 of them).
const ISO_3166_ALPHA2: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR \
BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK \
FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO \
JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU \
MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC \
SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA \
VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

impl CountryCode {
    /// Whether this is an officially assigned ISO 3166-1 alpha-2 code (`XX` is well formed
    /// but not assigned).
    pub fn is_assigned(&self) -> bool {
        ISO_3166_ALPHA2.split(' ').any(|c| c == self.as_str())
    }
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        (b.len() == 2 && b.iter().all(|c| c.is_ascii_uppercase()))
            .then(|| CountryCode([b[0], b[1]]))
    }
    pub fn as_str(&self) -> &str {
        // Both bytes are ASCII upper case by construction.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}
impl TryFrom<String> for CountryCode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        CountryCode::parse(&s)
            .ok_or_else(|| format!("{s:?} is not a two-letter upper-case country code (e.g. AU)"))
    }
}
impl From<CountryCode> for String {
    fn from(c: CountryCode) -> String {
        c.as_str().to_string()
    }
}
impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// Accepts client TCP connections and carries them over QUIC.
    Edge,
    /// Relays streams between neighbours.
    Transit,
    /// Terminates streams at local inference backends.
    Site,
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeKind::Edge => "edge",
            NodeKind::Transit => "transit",
            NodeKind::Site => "site",
        })
    }
}

/// Operator's administrative state of a node or link.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    #[default]
    Up,
    /// Used only when no path without drained elements exists.
    Drain,
    /// Never used.
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Location {
    pub lat: f64,
    pub lon: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub kind: NodeKind,
    pub region: Region,
    pub country: CountryCode,
    pub location: Location,
    /// The UDP address this node's QUIC endpoint listens on.
    pub address: SocketAddr,
    #[serde(default)]
    pub state: AdminState,
    /// Edge only: the IP on which service listeners accept clients (each service's `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<IpAddr>,
    /// Edge only: the port that iptables REDIRECT sends transparent traffic to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transparent_port: Option<u16>,
    /// Site only: the services this site serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serves: Vec<SiteService>,
}

/// A service as served at one site. Read through [`SiteServiceFields`]: `flatten` (which
/// writes [`HealthPolicy`]'s fields inline) would make serde buffer every field it does not
/// know into a tree before checking anything, 16 times its size in memory for a field of empty
/// lists (a controller's 64 MiB frame: 1 GiB); a plain struct skips such a field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "SiteServiceFields")]
pub struct SiteService {
    pub service: ServiceName,
    /// The local inference backend (TCP).
    pub backend: SocketAddr,
    /// Concurrent streams the backend accepts before the site counts as full.
    pub capacity: u32,
    /// This site's share of new connections among the sites equally near an edge (default 100,
    /// 1..=1_000_000): see [`crate::route::Spread`].
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The traffic dial: the percent (0..=100, default 100) of the new connections that would
    /// start on this site that do; the rest start on the next site in the edge's order (see
    /// [`crate::route::TryOrder::dialled`]). A dial never makes a connection fail: a site that
    /// declined is still tried, last. Left out of the serialised form at 100, so a topology
    /// without dials serialises (and diffs) as it did before dials existed.
    #[serde(default = "default_dial", skip_serializing_if = "is_full_dial")]
    pub dial: u8,
    /// The backend's health is checked by an HTTP `GET` of this path (a 2xx or 3xx answer is
    /// healthy) instead of a TCP connect alone: a model server accepts connections while it
    /// still loads its weights, and answers its health path 503 until it is ready. See
    /// [`is_valid_health_path`]. Left out of the serialised form when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
    /// How often the check runs and how many results in a row change the backend's health
    /// (`health_interval`, `unhealthy_after`, `healthy_after` in the text).
    #[serde(flatten)]
    pub health: HealthPolicy,
}

/// [`SiteService`]'s serialised form, its health policy's fields inline.
#[derive(Deserialize)]
struct SiteServiceFields {
    service: ServiceName,
    backend: SocketAddr,
    capacity: u32,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default = "default_dial")]
    dial: u8,
    #[serde(default)]
    health_check: Option<String>,
    #[serde(default = "HealthPolicy::default_interval")]
    health_interval: Latency,
    #[serde(default = "HealthPolicy::default_unhealthy_after")]
    unhealthy_after: u32,
    #[serde(default = "HealthPolicy::default_healthy_after")]
    healthy_after: u32,
}

impl From<SiteServiceFields> for SiteService {
    fn from(f: SiteServiceFields) -> SiteService {
        SiteService {
            service: f.service,
            backend: f.backend,
            capacity: f.capacity,
            weight: f.weight,
            dial: f.dial,
            health_check: f.health_check,
            health: HealthPolicy {
                interval: f.health_interval,
                unhealthy_after: f.unhealthy_after,
                healthy_after: f.healthy_after,
            },
        }
    }
}

/// How a site checks one backend's health: a check every `interval`; `unhealthy_after`
/// failures in a row mark it unhealthy, `healthy_after` successes in a row (and the router's
/// hold-down) healthy again. Each field is left out of the serialised form at its default, so
/// a topology without them serialises (and diffs) as before they existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthPolicy {
    #[serde(
        rename = "health_interval",
        default = "HealthPolicy::default_interval",
        skip_serializing_if = "HealthPolicy::is_default_interval"
    )]
    pub interval: Latency,
    #[serde(
        default = "HealthPolicy::default_unhealthy_after",
        skip_serializing_if = "HealthPolicy::is_default_unhealthy_after"
    )]
    pub unhealthy_after: u32,
    #[serde(
        default = "HealthPolicy::default_healthy_after",
        skip_serializing_if = "HealthPolicy::is_default_healthy_after"
    )]
    pub healthy_after: u32,
}

impl HealthPolicy {
    /// A check every 500 ms (the anchors suggest 1 s; half of it halves detection).
    pub const DEFAULT_INTERVAL: Latency = Latency::from_micros(500_000);
    /// The shortest `health_interval`: a check is a TCP connect (and a request) to a backend.
    pub const MIN_INTERVAL: Latency = Latency::from_micros(100_000);
    /// The longest `health_interval`.
    pub const MAX_INTERVAL: Latency = Latency::from_micros(60_000_000);
    /// Failures in a row that mark the backend unhealthy.
    pub const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
    /// Successes in a row that make it healthy again.
    pub const DEFAULT_HEALTHY_AFTER: u32 = 2;
    /// The most `unhealthy_after` or `healthy_after` can be.
    pub const MAX_THRESHOLD: u32 = 100;

    fn default_interval() -> Latency {
        Self::DEFAULT_INTERVAL
    }
    fn is_default_interval(v: &Latency) -> bool {
        *v == Self::DEFAULT_INTERVAL
    }
    fn default_unhealthy_after() -> u32 {
        Self::DEFAULT_UNHEALTHY_AFTER
    }
    fn is_default_unhealthy_after(v: &u32) -> bool {
        *v == Self::DEFAULT_UNHEALTHY_AFTER
    }
    fn default_healthy_after() -> u32 {
        Self::DEFAULT_HEALTHY_AFTER
    }
    fn is_default_healthy_after(v: &u32) -> bool {
        *v == Self::DEFAULT_HEALTHY_AFTER
    }

    /// What is wrong with it, if anything (a field out of its bounds), naming the field.
    pub fn problem(&self) -> Option<String> {
        if self.interval < Self::MIN_INTERVAL || self.interval > Self::MAX_INTERVAL {
            return Some(format!(
                "health_interval {} is outside {}..={}",
                self.interval,
                Self::MIN_INTERVAL,
                Self::MAX_INTERVAL
            ));
        }
        for (name, v) in [
            ("unhealthy_after", self.unhealthy_after),
            ("healthy_after", self.healthy_after),
        ] {
            if !(1..=Self::MAX_THRESHOLD).contains(&v) {
                return Some(format!("{name} {v} is outside 1..={}", Self::MAX_THRESHOLD));
            }
        }
        None
    }
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            interval: Self::DEFAULT_INTERVAL,
            unhealthy_after: Self::DEFAULT_UNHEALTHY_AFTER,
            healthy_after: Self::DEFAULT_HEALTHY_AFTER,
        }
    }
}

/// The longest `health_check` path.
pub const MAX_HEALTH_PATH: usize = 256;

/// Whether `p` can be a `health_check` path: `/` then visible ASCII (no space or control
/// character: it is written into a request line as it is), at most [`MAX_HEALTH_PATH`] bytes.
pub fn is_valid_health_path(p: &str) -> bool {
    p.starts_with('/') && p.len() <= MAX_HEALTH_PATH && p.bytes().all(|b| b.is_ascii_graphic())
}

pub fn default_weight() -> u32 {
    100
}

/// A dial that takes every connection offered (the default).
pub const FULL_DIAL: u8 = 100;

pub fn default_dial() -> u8 {
    FULL_DIAL
}

/// Whether `dial` takes every connection offered (100, or more from a hand-made snapshot).
pub fn is_full_dial(dial: &u8) -> bool {
    *dial >= FULL_DIAL
}

/// An undirected link; latency is one-way and the same both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub a: NodeId,
    pub b: NodeId,
    pub latency: Latency,
    pub capacity: Bandwidth,
    #[serde(default)]
    pub state: AdminState,
}

impl Link {
    /// The link's name, as used by `--down` and in diffs: `a--b` with the ends in sorted order.
    pub fn id(&self) -> LinkId {
        LinkId::new(&self.a, &self.b)
    }
    pub fn other_end(&self, n: &NodeId) -> Option<&NodeId> {
        if &self.a == n {
            Some(&self.b)
        } else if &self.b == n {
            Some(&self.a)
        } else {
            None
        }
    }
}

/// An unordered pair of node ids naming a link, printed `a--b` (sorted).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct LinkId(pub NodeId, pub NodeId);

impl LinkId {
    pub fn new(a: &NodeId, b: &NodeId) -> Self {
        if a <= b {
            LinkId(a.clone(), b.clone())
        } else {
            LinkId(b.clone(), a.clone())
        }
    }
    /// Parses `a--b` (either order). Node ids never contain `--`.
    pub fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.split_once("--")?;
        (!a.is_empty() && !b.is_empty() && !b.contains("--"))
            .then(|| LinkId::new(&NodeId::new(a), &NodeId::new(b)))
    }
}
impl fmt::Display for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}--{}", self.0, self.1)
    }
}
impl From<LinkId> for String {
    fn from(l: LinkId) -> String {
        l.to_string()
    }
}
impl TryFrom<String> for LinkId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        LinkId::parse(&s).ok_or_else(|| format!("{s:?} is not a link name (expected NODE--NODE)"))
    }
}

/// The IPv4 prefix an IPv4-mapped IPv6 prefix stands for (`::ffff:10.0.0.0/104` is
/// `10.0.0.0/8`): one inside `::ffff:0:0/96`; `None` for any other prefix. Routers see a client
/// or destination with a mapped address as IPv4, and an IPv6 prefix contains no IPv4 address,
/// so a mapped prefix in the configuration never matches: validation refuses it, naming this
/// form.
pub fn ipv4_mapped(p: IpNetwork) -> Option<ipnetwork::Ipv4Network> {
    let IpNetwork::V6(v6) = p else {
        return None;
    };
    let v4 = v6
        .network()
        .to_ipv4_mapped()
        .filter(|_| v6.prefix() >= 96)?;
    ipnetwork::Ipv4Network::new(v4, v6.prefix() - 96).ok()
}

/// A virtual IP (or a prefix of them) and the port on which a service is reached there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Vip {
    pub prefix: IpNetwork,
    pub port: u16,
}

impl Vip {
    /// Whether `addr` is one of this VIP's addresses at its port. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`, an IPv4 client of a dual-stack socket) is read as the IPv4 address.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr.ip(), IpAddr::V4),
            v4 => v4,
        };
        self.port == addr.port() && self.prefix.contains(ip)
    }
    pub fn overlaps(&self, other: &Vip) -> bool {
        self.port == other.port
            && (self.prefix.contains(other.prefix.network())
                || other.prefix.contains(self.prefix.network()))
    }
}

impl fmt::Display for Vip {
    /// `198.18.0.10/32:443`, or `[2001:db8::/64]:443` for IPv6.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix {
            IpNetwork::V4(p) => write!(f, "{p}:{}", self.port),
            IpNetwork::V6(p) => write!(f, "[{p}]:{}", self.port),
        }
    }
}

impl std::str::FromStr for Vip {
    type Err = String;
    /// Parses `PREFIX:PORT` (`198.18.0.10/32:443`), `IP:PORT` (a single address) and the
    /// bracketed IPv6 forms `[2001:db8::/64]:443`, `[2001:db8::1]:443`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not a VIP (expected PREFIX:PORT, e.g. \"198.18.0.10/32:443\" or \"[2001:db8::10/128]:443\")"
            )
        };
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (net, port) = rest.split_once("]:").ok_or_else(bad)?;
            if !net.contains(':') {
                return Err(bad());
            }
            (net, port)
        } else {
            let (net, port) = s.rsplit_once(':').ok_or_else(bad)?;
            if net.contains(':') {
                return Err(bad());
            }
            (net, port)
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(format!("{s:?}: port 0 is not a usable port"));
        }
        let prefix: IpNetwork = if net.contains('/') {
            net.parse().map_err(|_| bad())?
        } else {
            let ip: IpAddr = net.parse().map_err(|_| bad())?;
            IpNetwork::from(ip)
        };
        Ok(Vip { prefix, port })
    }
}

/// Where a service's traffic may be served. Empty lists mean "anywhere".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Residency {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<Region>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub countries: Vec<CountryCode>,
}

impl Residency {
    pub fn is_unrestricted(&self) -> bool {
        self.regions.is_empty() && self.countries.is_empty()
    }
    /// A site is allowed when it matches every non-empty list.
    pub fn allows(&self, node: &Node) -> bool {
        (self.regions.is_empty() || self.regions.contains(&node.region))
            && (self.countries.is_empty() || self.countries.contains(&node.country))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: ServiceName,
    /// The TCP port each edge listens on (on its `client_address`) for this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// VIP:port pairs that transparent mode maps to this service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<Vip>,
    /// Client source prefixes allowed to use the service (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<IpNetwork>,
    #[serde(default)]
    pub residency: Residency,
    /// Only clients that match a provisioned circuit may use the service.
    #[serde(default)]
    pub requires_circuit: bool,
    /// How an edge deals one client's connections among equally near sites.
    #[serde(default, skip_serializing_if = "Affinity::is_none")]
    pub affinity: Affinity,
}

/// Client affinity of a service: how an edge deals a client's new connections among the sites
/// that share the service by weight ([`crate::route::Spread`]). It never overrides nearness,
/// health or load: only sites of the equally near group are dealt, and a failed first try
/// still moves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Affinity {
    /// Each new connection takes the next turn: shares are exact over any run of connections.
    #[default]
    None,
    /// Every connection from one client IP address starts on the same site while that site
    /// stays in the group (weighted rendezvous hashing: when a site leaves or joins, only the
    /// clients it loses or gains move). Shares hold over many clients.
    SourceIp,
}

impl Affinity {
    pub fn is_none(&self) -> bool {
        *self == Affinity::None
    }
    /// The name used in topology files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::SourceIp => "source_ip",
        }
    }
}

/// An address pool from which the controller allocates circuit VIPs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub name: PoolName,
    pub prefix: IpNetwork,
}

/// A whole, validated topology.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Topology {
    pub nodes: Vec<Node>,
    pub links: Vec<Link>,
    pub services: Vec<Service>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<Pool>,
}

impl Topology {
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id.as_str() == id)
    }
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name.as_str() == name)
    }
    pub fn link(&self, id: &LinkId) -> Option<&Link> {
        self.links.iter().find(|l| &l.id() == id)
    }
    /// Sites that serve `service`, with their per-site settings.
    pub fn sites_serving<'a>(
        &'a self,
        service: &'a str,
    ) -> impl Iterator<Item = (&'a Node, &'a SiteService)> + 'a {
        self.nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Site)
            .filter_map(move |n| {
                n.serves
                    .iter()
                    .find(|s| s.service.as_str() == service)
                    .map(|s| (n, s))
            })
    }
    /// Links incident to `node`.
    pub fn links_of<'a>(&'a self, node: &'a NodeId) -> impl Iterator<Item = &'a Link> + 'a {
        self.links
            .iter()
            .filter(move |l| &l.a == node || &l.b == node)
    }
    /// Map of node id to node, for callers that look up many ids.
    pub fn node_index(&self) -> BTreeMap<&NodeId, &Node> {
        self.nodes.iter().map(|n| (&n.id, n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 client of a dual-stack (`::`) socket is seen at an IPv4-mapped address; an IPv4
    /// VIP covers it (VIPs themselves are never written mapped: validation refuses them). It
    /// covered none: such a client of another service's VIP on a `::` listener was carried as
    /// the listener's service.
    #[test]
    fn an_ipv4_vip_covers_the_ipv4_mapped_form_of_its_addresses() {
        let vip: Vip = "198.18.0.0/24:8443".parse().unwrap();
        let mapped = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(vip.contains(mapped("198.18.0.10:8443")));
        assert!(vip.contains(mapped("[::ffff:198.18.0.10]:8443")));
        assert!(!vip.contains(mapped("[::ffff:198.18.1.10]:8443")));
        assert!(!vip.contains(mapped("[::ffff:198.18.0.10]:8444")));
        let v6: Vip = "[2001:db8::/64]:443".parse().unwrap();
        assert!(v6.contains(mapped("[2001:db8::7]:443")));
        assert!(!v6.contains(mapped("[::ffff:198.18.0.10]:443")));
    }

    /// A site's service keeps its health policy through its serialised form (as controller
    /// snapshots carry it), the policy's fields inline and left out at their defaults.
    #[test]
    fn a_site_service_round_trips_through_json_with_its_health_policy() {
        let mut svc = SiteService {
            service: ServiceName::new("chat"),
            backend: "127.0.0.1:8000".parse().unwrap(),
            capacity: 10,
            weight: 7,
            dial: 40,
            health_check: Some("/health".into()),
            health: HealthPolicy::default(),
        };
        let json = serde_json::to_string(&svc).unwrap();
        assert!(
            !json.contains("health_interval") && !json.contains("_after"),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<SiteService>(&json).unwrap(), svc);
        svc.health = HealthPolicy {
            interval: Latency::from_micros(2_000_000),
            unhealthy_after: 5,
            healthy_after: 9,
        };
        let json = serde_json::to_string(&svc).unwrap();
        assert!(
            json.contains(r#""health_interval":"#)
                && json.contains(r#""unhealthy_after":5"#)
                && json.contains(r#""healthy_after":9"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<SiteService>(&json).unwrap(), svc);
    }
}
