//! Circuits in the controller: the durable model, its lifecycle and the operations the admin
//! API exposes (validate, create, resize, delete), each one atomic store transaction.
//!
//! Lifecycle (Megaport's words in brackets):
//! `requested` (DESIGN) -> `provisioning` (DEPLOYABLE/CONFIGURED: placed, capacity reserved,
//! VIP allocated, in the snapshots) -> `active` (LIVE: every router on the path acknowledged a
//! snapshot that contains it) ; `failed` (with a reason) ; `decommissioning` (CANCELLED:
//! removed from snapshots, its capacity and VIP still held, since a router that has not
//! acknowledged its removal still carries it) -> `decommissioned` (every router on the path the
//! topology still has acknowledged a snapshot without it, or the acknowledgement timeout
//! passed: its capacity and VIP released). A create that cannot be placed is refused and
//! records nothing, so `requested` only shows inside the history of the create transaction.
//! A circuit decommissioned for longer than the retention (`--circuit-retention`) leaves the
//! live table for the archive ([`archive`]): found by id only then, its key and history kept.
//!
//! Requested and assigned values are separate fields: `requested_rate` is what the operator
//! asked for last, `assigned_rate` what the fabric has acknowledged and enforces. They differ
//! while a resize is provisioning, so automation never mistakes one for the other.
//!
//! The placement maths is [`topology::circuit`]; this module only holds records and
//! transitions. Callers pass the topology in force; the records are read and written in the
//! transaction they are given, so that an idempotent create, a resize's make-before-break or a
//! delete is all-or-nothing and serialised with every other write of the controller.

pub mod api;
pub mod service;

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::ops::Bound::{Excluded, Included};
use std::str::FromStr;
use topology::circuit::arrows;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use topology::circuit::{
    self as placement, BEnd, CircuitId, PlacementError, PlacementRequest, PoolError,
    ProvisionedCircuit, Reservation,
};
use topology::{Bandwidth, NodeId, PoolName, Topology};

use crate::controller::records::{self, now_unix_ms};
use crate::store::{ReadTxn, StoreError, Table, WriteTxn, seq_key};

/// Where a circuit is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Requested,
    Provisioning,
    Active,
    Failed,
    Decommissioning,
    Decommissioned,
}

impl CircuitState {
    /// Every state, in lifecycle order.
    pub const ALL: [CircuitState; 6] = [
        CircuitState::Requested,
        CircuitState::Provisioning,
        CircuitState::Active,
        CircuitState::Failed,
        CircuitState::Decommissioning,
        CircuitState::Decommissioned,
    ];

    /// States in which the circuit is in the routers' snapshots (and holds capacity and a
    /// VIP): not deleted. A deleted circuit still holds them while `decommissioning`
    /// ([`Self::holds_capacity`]).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            CircuitState::Requested
                | CircuitState::Provisioning
                | CircuitState::Active
                | CircuitState::Failed
        )
    }
    /// States in which the circuit holds its capacity (its reservations) and its VIP against
    /// other circuits' admission and resizes: live, and `decommissioning`. A deleted circuit is
    /// out of the snapshots, but routers that have not acknowledged that (an edge cut off from
    /// the controller, on its last snapshot) still carry it at its rate and map its VIP to it,
    /// so both are released only when it is `decommissioned` (make before break, as a resize's
    /// old path is held until the routers acknowledge the new one).
    pub fn holds_capacity(self) -> bool {
        self.is_live() || self == CircuitState::Decommissioning
    }
    /// States `--wait` stops at.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            CircuitState::Active | CircuitState::Failed | CircuitState::Decommissioned
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Requested => "requested",
            CircuitState::Provisioning => "provisioning",
            CircuitState::Active => "active",
            CircuitState::Failed => "failed",
            CircuitState::Decommissioning => "decommissioning",
            CircuitState::Decommissioned => "decommissioned",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The customer's end: an edge node and the source prefix its clients come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AEnd {
    pub edge: NodeId,
    pub prefix: IpNetwork,
}

/// What an operator asks for (the body of validate and create). An unknown field, here or in
/// its ends, is refused rather than ignored: a misspelt `pool` or `sites` would otherwise place
/// the circuit without it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitSpec {
    pub name: String,
    #[serde(deserialize_with = "StrictAEnd::deserialize")]
    pub a_end: AEnd,
    #[serde(deserialize_with = "StrictBEnd::deserialize")]
    pub b_end: BEnd,
    pub rate: Bandwidth,
    /// The pool to take the VIP from, of the prefix's address family (default: the topology's
    /// first pool of that family with a free address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// [`AEnd`] as a [`CircuitSpec`] reads it: an unknown field is refused. A stored [`Circuit`] (and
/// a response a client reads) reads `AEnd` as it is, which ignores one: a record or an answer
/// of a later build stays readable.
#[derive(Deserialize)]
#[serde(remote = "AEnd", deny_unknown_fields)]
struct StrictAEnd {
    edge: NodeId,
    prefix: IpNetwork,
}

/// [`BEnd`] as a [`CircuitSpec`] reads it: an unknown field is refused (see [`StrictAEnd`]).
#[derive(Deserialize)]
#[serde(remote = "BEnd", deny_unknown_fields)]
struct StrictBEnd {
    service: topology::ServiceName,
    #[serde(default)]
    regions: Vec<topology::Region>,
    #[serde(default)]
    sites: Vec<NodeId>,
}

/// A create request as a circuit's record keeps it with its idempotency key
/// ([`Circuit::created_with`]): the [`CircuitSpec`], read as a stored record is (an unknown
/// field ignored, so that a record of a later build stays readable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptRequest {
    pub name: String,
    pub a_end: AEnd,
    pub b_end: BEnd,
    pub rate: Bandwidth,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

impl KeptRequest {
    /// Whether `spec` is the request kept: equal, the B-end's regions and sites taken as sets
    /// ([`sorted_b_end`]). A record keeps them in the order given, as earlier builds did.
    fn matches(&self, spec: &CircuitSpec) -> bool {
        let ordered = |k: &KeptRequest| KeptRequest {
            b_end: sorted_b_end(&k.b_end),
            ..k.clone()
        };
        ordered(self) == ordered(&KeptRequest::from(spec))
    }
}

/// `b` with its regions and sites sorted (duplicates kept: admission refuses a list naming one
/// twice, so a request with one is not the request admitted).
fn sorted_b_end(b: &BEnd) -> BEnd {
    let mut b = b.clone();
    b.regions.sort();
    b.sites.sort();
    b
}

/// Whether two B-ends are the same request: the same service, regions and sites, the lists
/// compared as sets, as placement takes them (a retry listing them in another order is the
/// same request).
fn same_b_end(a: &BEnd, b: &BEnd) -> bool {
    sorted_b_end(a) == sorted_b_end(b)
}

impl From<&CircuitSpec> for KeptRequest {
    fn from(s: &CircuitSpec) -> Self {
        KeptRequest {
            name: s.name.clone(),
            a_end: s.a_end.clone(),
            b_end: s.b_end.clone(),
            rate: s.rate,
            pool: s.pool.clone(),
        }
    }
}

/// Capacity a circuit still holds on its old path (or its old, larger rate) while a resize is
/// provisioning: released when the new reservation is acknowledged (make before break).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub path: Vec<NodeId>,
    pub rate: Bandwidth,
}

/// A circuit record, as stored and as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Circuit {
    pub id: CircuitId,
    pub name: String,
    pub a_end: AEnd,
    pub b_end: BEnd,
    /// What the operator asked for last.
    pub requested_rate: Bandwidth,
    /// What the fabric has acknowledged and enforces (`None` until first active).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_rate: Option<Bandwidth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolName>,
    /// The circuit's VIP (held while it is decommissioning; kept in the record once it is
    /// decommissioned, for history, but released).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<IpAddr>,
    /// The service's port at the VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The site the path ends at, and the reserved path (edge first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<NodeId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<NodeId>,
    /// Declared one-way latency of the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<topology::Latency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
    pub state: CircuitState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The create request its idempotency key was used with (kept with a key only): a replay
    /// of the create is compared with it, not with the circuit as it is now (a resize changes
    /// its rate). Records stored before it was kept have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_with: Option<KeptRequest>,
    pub created_by: String,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// Bumped on every change.
    pub revision: u64,
}

impl Circuit {
    /// The reservations this circuit holds now (its path, plus what a resize still holds),
    /// also while it is decommissioning ([`CircuitState::holds_capacity`]).
    pub fn reservations(&self) -> Vec<Reservation> {
        self.path_reservation()
            .into_iter()
            .chain(self.held_reservation())
            .collect()
    }

    /// The reservation of the path the circuit is on (in the snapshots, or, decommissioning,
    /// just taken out of them), when it holds one.
    pub fn path_reservation(&self) -> Option<Reservation> {
        (self.state.holds_capacity() && !self.path.is_empty()).then(|| Reservation {
            circuit: self.id.clone(),
            path: self.path.clone(),
            rate: self.requested_rate,
        })
    }

    /// What a resize still holds (the old path, or the old rate's excess), when it holds it.
    pub fn held_reservation(&self) -> Option<Reservation> {
        let h = self.held.as_ref()?;
        (self.state.holds_capacity() && !self.path.is_empty()).then(|| Reservation {
            circuit: self.id.clone(),
            path: h.path.clone(),
            rate: h.rate,
        })
    }

    /// What routers get, when the circuit is in the snapshots. A circuit a topology change
    /// failed goes without its path: its edge still classifies and rate-limits its
    /// connections, and sends them on the best path the topology offers, unreserved. (Routers
    /// drop a reserved path only when it is down or its site no longer serves; they know
    /// nothing of a circuit's regions, and sent every connection of a circuit whose site left
    /// them to that site first.)
    pub fn provisioned(&self) -> Option<ProvisionedCircuit> {
        let failed_by_topology = self.state == CircuitState::Failed && !self.awaits_ack();
        (self.state.is_live() && !self.path.is_empty()).then(|| ProvisionedCircuit {
            id: self.id.clone(),
            edge: self.a_end.edge.clone(),
            prefix: self.a_end.prefix,
            service: self.b_end.service.clone(),
            vip: self.vip,
            port: self.port,
            rate: self.requested_rate,
            path: if failed_by_topology {
                Vec::new()
            } else {
                self.path.clone()
            },
        })
    }

    /// Whether routers' acknowledgements can still move the circuit on: provisioning (to
    /// `active`), decommissioning (to `decommissioned`), or failed because routers did not
    /// acknowledge in time ([`NOT_ACKED`]: it recovers to `active`). A circuit failed by a
    /// topology change waits for nothing.
    pub fn awaits_ack(&self) -> bool {
        match self.state {
            CircuitState::Provisioning | CircuitState::Decommissioning => true,
            CircuitState::Failed => self
                .reason
                .as_deref()
                .is_none_or(|r| r.starts_with(NOT_ACKED)),
            _ => false,
        }
    }

    /// Routers that must acknowledge the circuit before it is active (or gone).
    pub fn routers(&self) -> BTreeSet<NodeId> {
        let mut s: BTreeSet<NodeId> = self.path.iter().cloned().collect();
        if let Some(h) = &self.held {
            s.extend(h.path.iter().cloned());
        }
        s
    }

    /// The routers whose acknowledgement is awaited under `topo`: [`Self::routers`], except
    /// that a removal waits for none the topology no longer has (a removed router is refused a
    /// control session, so it never acknowledges; and it carries no circuit any more). A
    /// circuit to activate waits for all of them: a removed one breaks it ([`fail_broken`]).
    pub fn awaited(&self, topo: &Topology) -> BTreeSet<NodeId> {
        let mut s = self.routers();
        if self.state == CircuitState::Decommissioning {
            s.retain(|n| topo.node(n.as_str()).is_some());
        }
        s
    }
}

/// One line of a circuit's audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub time_unix_ms: u64,
    pub actor: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<CircuitState>,
    pub to: CircuitState,
    pub detail: String,
}

pub const CIRCUITS: Table<Circuit> = Table::new("circuits");
/// Idempotency key -> circuit id.
pub const CIRCUIT_KEYS: Table<String> = Table::new("circuit_keys");
/// `<id>/<seq>` -> history entry.
pub const CIRCUIT_HISTORY: Table<HistoryEntry> = Table::new("circuit_history");
/// `next_id`.
pub const CIRCUIT_META: Table<u64> = Table::new("circuit_meta");
/// Circuit id -> [`Archived`]: the circuits decommissioned for longer than the retention, out of
/// [`CIRCUITS`] (which every create, apply, listing and metrics scrape reads whole). Read by id
/// (a `get`, a replayed create's key, history) or whole by `list --archived` only.
pub const CIRCUITS_ARCHIVE: Table<Archived> = Table::new("circuits_archive");

/// A circuit the retention sweep moved out of the live table ([`archive`]): its last record,
/// unchanged (decommissioned, its capacity and VIP long released), and when it moved. Its
/// history entries and its idempotency key (in [`CIRCUIT_KEYS`]) stay where they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archived {
    pub archived_unix_ms: u64,
    pub circuit: Circuit,
}

/// The default of `--circuit-retention`: how long a decommissioned circuit stays in the live
/// table (listed, counted in the metrics) before the sweep archives it. Megaport hides a
/// DECOMMISSIONED service after 30 days.
pub const DEFAULT_RETENTION: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// A time for messages: RFC 3339, to the second, UTC.
fn rfc3339(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Why a circuit operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CircuitError {
    #[error("invalid circuit: {0}")]
    Invalid(String),
    #[error("{0}")]
    Placement(#[from] PlacementError),
    #[error("{0}")]
    Pool(#[from] PoolError),
    #[error("no circuit {0:?} (by id or name)")]
    NotFound(String),
    /// Looked up by id, the circuit is in the archive ([`archive`]): gone, not unknown.
    #[error(
        "circuit {id} ({name}) was decommissioned and then archived at {}, after the retention \
         period (--circuit-retention); `tasman circuit list --archived` and `tasman circuit \
         history {id}` still show it",
        rfc3339(*archived_unix_ms)
    )]
    Archived {
        id: CircuitId,
        name: String,
        archived_unix_ms: u64,
    },
    #[error("{0}")]
    Conflict(String),
    /// With the change, the snapshot routers are sent would be over the frame limit a router
    /// takes ([`crate::controller::Controller::check_circuits_fit`]): the change is not made.
    #[error(
        "not made: with it, the snapshot sent to routers would be {bytes} bytes, over the {max} \
         bytes a router takes in one frame; delete circuits or make the topology smaller"
    )]
    TooLarge { bytes: usize, max: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal: {0}")]
    Internal(String),
}

/// Limits on operator-chosen strings.
const MAX_NAME: usize = 64;
const MAX_KEY: usize = 128;
/// How many regions, and how many sites, a circuit's B-end may name.
pub const MAX_B_END_ENTRIES: usize = 64;

fn check_name(what: &str, s: &str, max: usize) -> Result<(), CircuitError> {
    if s.is_empty() || s.len() > max {
        return Err(CircuitError::Invalid(format!(
            "{what} must be 1 to {max} characters, got {}",
            s.len()
        )));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(CircuitError::Invalid(format!(
            "{what} {s:?} contains {c:?}; use letters, digits, '-', '_', '.' or ':'"
        )));
    }
    Ok(())
}

/// Names the admin API's own paths under `/v1/circuits/` take: a circuit so named could not be
/// shown (`/v1/circuits/headroom` answers the headroom, whatever circuit has that name).
pub const RESERVED_NAMES: [&str; 2] = ["headroom", "validate"];

/// A circuit's name as [`admit`] takes it: 1 to 64 letters, digits, `-`, `_`, `.` or `:`, not
/// of the form of an id, and not one of [`RESERVED_NAMES`]. Public for the CLI, to refuse a
/// malformed `--name` before asking.
pub fn check_circuit_name(name: &str) -> Result<(), CircuitError> {
    check_name("name", name, MAX_NAME)?;
    if is_id_form(name) {
        return Err(CircuitError::Invalid(format!(
            "name {name:?} has the form of a circuit id (c- and digits), which commands taking an id or a name would read as an id; choose another name"
        )));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(CircuitError::Invalid(format!(
            "name {name:?} is reserved (/v1/circuits/{name} is a path of the admin API of its own); choose another name"
        )));
    }
    // A URL's dot segments: clients resolve `/v1/circuits/..` to `/v1/` before sending it, so
    // a circuit so named could be reached by its id only.
    if name == "." || name == ".." {
        return Err(CircuitError::Invalid(format!(
            "name {name:?} cannot be a part of a URL's path (it means this or the parent \
             directory there); choose another name"
        )));
    }
    Ok(())
}

/// An idempotency key as a create takes it: 1 to 128 letters, digits, `-`, `_`, `.` or `:`.
pub fn check_idempotency_key(key: &str) -> Result<(), CircuitError> {
    check_name("idempotency key", key, MAX_KEY)
}

/// A B-end's `regions` and `sites` as [`admit`] takes them: at most [`MAX_B_END_ENTRIES`] each,
/// each a valid id (as the topology's), named once. Checked before placement, since the record
/// keeps the lists (twice, with an idempotency key) and a refusal names them.
fn check_b_end(b: &BEnd) -> Result<(), CircuitError> {
    check_b_end_list(
        "b_end.regions",
        b.regions.iter().map(topology::Region::as_str),
    )?;
    check_b_end_list("b_end.sites", b.sites.iter().map(NodeId::as_str))
}

/// One list of a B-end (`what` names it) as [`check_b_end`] takes it. Public for the CLI, to
/// refuse `--region` and `--site` before asking, naming the flag.
pub fn check_b_end_list<'a>(
    what: &str,
    ids: impl ExactSizeIterator<Item = &'a str>,
) -> Result<(), CircuitError> {
    if ids.len() > MAX_B_END_ENTRIES {
        return Err(CircuitError::Invalid(format!(
            "{what} lists {} entries; at most {MAX_B_END_ENTRIES}",
            ids.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for id in ids {
        check_b_end_id(id).map_err(|e| CircuitError::Invalid(format!("{what}: {e}")))?;
        if !seen.insert(id) {
            return Err(CircuitError::Invalid(format!("{what} lists {id:?} twice")));
        }
    }
    Ok(())
}

/// One entry of a B-end's `regions` or `sites`: an id, as the topology's. The refusal says why
/// without naming the list (the caller does). Public for the CLI, to refuse a malformed
/// `--region` or `--site` value as clap refuses any.
pub fn check_b_end_id(id: &str) -> Result<(), String> {
    if topology::is_valid_id(id) {
        return Ok(());
    }
    // A long one is not echoed back.
    let shown = if id.len() > MAX_NAME {
        format!("an entry of {} characters", id.len())
    } else {
        format!("{id:?}")
    };
    Err(format!(
        "{shown} is not a valid id (1-63 lowercase letters and digits joined by single hyphens)"
    ))
}

/// A name a spec gives for something of the topology (`field` names where): an id, or the
/// request is refused naming the field, a long one not echoed back (a request body may be
/// megabytes; the refusal quotes what it refuses).
fn check_spec_id(field: &str, id: &str) -> Result<(), CircuitError> {
    check_b_end_id(id).map_err(|e| CircuitError::Invalid(format!("{field}: {e}")))
}

/// Each region a B-end names is one the topology has (a node's region), as the topology's own
/// `residency` regions must be: a typo is the request's fault (422), not the fabric's state
/// (no eligible site, 409, which a client may retry).
fn check_regions_known(topo: &Topology, b: &BEnd) -> Result<(), CircuitError> {
    let Some(unknown) = b
        .regions
        .iter()
        .find(|r| !topo.nodes.iter().any(|n| n.region == **r))
    else {
        return Ok(());
    };
    let known: BTreeSet<&str> = topo.nodes.iter().map(|n| n.region.as_str()).collect();
    let list = topology::diag::first_few(known.into_iter(), 10);
    Err(CircuitError::Invalid(format!(
        "b_end.regions: unknown region {:?} (the topology's regions: {list})",
        unknown.as_str()
    )))
}

/// The number of a circuit id (`c-000007`: 7), which orders ids beyond six digits too.
fn id_number(id: &CircuitId) -> Option<u64> {
    id.as_str().strip_prefix("c-")?.parse().ok()
}

/// `c-` and one or more digits: the form of circuit ids (`c-000007`).
fn is_id_form(s: &str) -> bool {
    s.strip_prefix("c-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses a customer prefix, refusing host bits (`10.1.2.3/24` is almost always a typo).
pub fn parse_prefix(s: &str) -> Result<IpNetwork, CircuitError> {
    let p = IpNetwork::from_str(s.trim()).map_err(|e| {
        CircuitError::Invalid(format!(
            "{s:?} is not an IP prefix like 203.0.113.0/24: {e}"
        ))
    })?;
    check_prefix(p)?;
    Ok(p)
}

fn check_prefix(p: IpNetwork) -> Result<(), CircuitError> {
    if p.ip() != p.network() {
        return Err(CircuitError::Invalid(format!(
            "prefix {p} has host bits set; did you mean {}/{}?",
            p.network(),
            p.prefix()
        )));
    }
    // The edge sees a client with a mapped address as IPv4, which an IPv6 prefix never holds.
    if let Some(v4) = topology::ipv4_mapped(p) {
        return Err(CircuitError::Invalid(format!(
            "prefix {p} is an IPv4-mapped address, which never matches (the edge sees such \
             clients as IPv4); write {v4}"
        )));
    }
    Ok(())
}

/// All circuits, in id order.
pub fn all(tx: &dyn ReadTxn) -> Result<Vec<Circuit>, StoreError> {
    Ok(CIRCUITS.all(tx)?.into_iter().map(|(_, c)| c).collect())
}

/// A page of a table keyed by circuit id ([`CIRCUITS`], [`CIRCUITS_ARCHIVE`]): up to `limit`
/// records whose ids come after `after` (all from the first when `None`), in the store's key
/// order. Only those records are read.
pub fn page<V: Serialize + serde::de::DeserializeOwned>(
    table: &Table<V>,
    tx: &dyn ReadTxn,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<V>, StoreError> {
    let from = match after {
        Some(a) => Excluded(a),
        None => std::ops::Bound::Unbounded,
    };
    Ok(table
        .scan(tx, (from, std::ops::Bound::Unbounded), limit, false)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// The circuits of `ids` the live table holds (others are skipped), in the order given: each is
/// read by its key, so the cost is that of `ids`, not of the table.
pub fn by_ids<'a>(
    tx: &dyn ReadTxn,
    ids: impl IntoIterator<Item = &'a CircuitId>,
) -> Result<Vec<Circuit>, StoreError> {
    let mut out = Vec::new();
    for id in ids {
        out.extend(CIRCUITS.get(tx, id.as_str())?);
    }
    Ok(out)
}

/// The ids of the circuits whose routers' acknowledgements can still move them on
/// ([`Circuit::awaits_ack`]): what [`settle`] and [`expire`] are given when every such circuit
/// is to be looked at (the service's start; tests). It reads the whole live table.
pub fn awaiting_ack(tx: &dyn ReadTxn) -> Result<Vec<CircuitId>, StoreError> {
    Ok(all(tx)?
        .into_iter()
        .filter(Circuit::awaits_ack)
        .map(|c| c.id)
        .collect())
}

/// A circuit by id, or by name in the live table: the live one of that name (not deleted;
/// there is one at most), else the newest (the highest id; ids are given in order, clocks may
/// go back). An archived circuit is found by id only ([`CircuitError::Archived`]): its name
/// may have been given to another circuit since, and finding it would read the whole archive.
pub fn find(tx: &dyn ReadTxn, id_or_name: &str) -> Result<Circuit, CircuitError> {
    if let Some(c) = CIRCUITS.get(tx, id_or_name)? {
        return Ok(c);
    }
    let by_name = all(tx)?
        .into_iter()
        .filter(|c| c.name == id_or_name)
        .max_by_key(|c| (c.state.is_live(), id_number(&c.id)));
    if let Some(c) = by_name {
        return Ok(c);
    }
    match CIRCUITS_ARCHIVE.get(tx, id_or_name)? {
        Some(a) => Err(CircuitError::Archived {
            id: a.circuit.id,
            name: a.circuit.name,
            archived_unix_ms: a.archived_unix_ms,
        }),
        None => Err(CircuitError::NotFound(id_or_name.to_string())),
    }
}

/// An archived circuit, by id.
pub fn find_archived(tx: &dyn ReadTxn, id: &str) -> Result<Option<Archived>, StoreError> {
    CIRCUITS_ARCHIVE.get(tx, id)
}

/// Every archived circuit, in id order (the whole archive: for `list --archived`).
pub fn all_archived(tx: &dyn ReadTxn) -> Result<Vec<Archived>, StoreError> {
    Ok(CIRCUITS_ARCHIVE
        .all(tx)?
        .into_iter()
        .map(|(_, a)| a)
        .collect())
}

/// The keys of one circuit's history entries: from `<id>/` to `<id>0` (excluded; `'0'` is the
/// character after `'/'`), so that a scan reads that circuit's entries and no other's.
fn history_keys(id: &CircuitId) -> (String, String) {
    (format!("{id}/"), format!("{id}0"))
}

/// One circuit's history, oldest first: its own entries only are read.
pub fn history(tx: &dyn ReadTxn, id: &CircuitId) -> Result<Vec<HistoryEntry>, StoreError> {
    let (from, to) = history_keys(id);
    Ok(CIRCUIT_HISTORY
        .scan(tx, (Included(&from), Excluded(&to)), usize::MAX, false)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// The number of a circuit's next history entry, from the key of its newest one (one entry is
/// read, not decoded).
fn next_history_seq(tx: &dyn ReadTxn, id: &CircuitId) -> Result<u64, StoreError> {
    let (from, to) = history_keys(id);
    let newest = tx.scan(
        CIRCUIT_HISTORY.name,
        (Included(&from), Excluded(&to)),
        1,
        true,
    )?;
    let Some((key, _)) = newest.into_iter().next() else {
        return Ok(1);
    };
    match key[from.len()..].parse::<u64>() {
        Ok(n) => Ok(n + 1),
        Err(_) => Err(StoreError::Corrupt {
            table: CIRCUIT_HISTORY.name,
            key,
            reason: "not <circuit id>/<sequence number>".into(),
        }),
    }
}

/// Every reservation held now, by every circuit (a decommissioning one's too).
pub fn reservations(circuits: &[Circuit]) -> Vec<Reservation> {
    circuits.iter().flat_map(Circuit::reservations).collect()
}

/// What `topo` does to the circuits held now, for the apply plan: links over-committed, nodes
/// or links of a reserved path removed or down, sites that may no longer carry a circuit's
/// service, service VIPs over a circuit's VIP ([`placement::check_reservations`],
/// [`placement::check_site`], [`placement::check_vip`]; the last fails no circuit).
/// Live circuits only: a decommissioning one still holds its capacity until its routers
/// acknowledge its removal (or the acknowledgement timeout passes), but it is leaving and
/// nothing an apply does fails it, so the plan leaves it out (a link shrunk under what it holds
/// is over-committed until then; admission and resizes there count it and wait for it).
///
/// The path a resize moves a circuit off (held until the new one is acknowledged) that `topo`
/// breaks is released by the apply, the circuit going on to its new path (`held_broken_by`):
/// not a circuit that fails, so neither its breaks nor what it held there are counted. (The
/// plan listed such a circuit as broken.)
pub fn check(topo: &Topology, circuits: &[Circuit]) -> Vec<placement::ReservationIssue> {
    let live = || circuits.iter().filter(|c| c.state.is_live());
    let held: Vec<Reservation> = live()
        .flat_map(|c| {
            let released = !held_broken_by(topo, c).is_empty();
            c.path_reservation()
                .into_iter()
                .chain(c.held_reservation().filter(|_| !released))
        })
        .collect();
    let mut issues = placement::check_reservations(topo, &held);
    issues.extend(
        live().filter_map(|c| placement::check_site(topo, &c.id, &c.b_end, c.site.as_ref()?)),
    );
    issues.extend(
        live().filter_map(|c| placement::check_vip(topo, &c.id, &c.a_end.edge, c.vip?, c.port?)),
    );
    issues
}

/// The circuits routers must carry, for the snapshot.
pub fn provisioned(circuits: &[Circuit]) -> Vec<ProvisionedCircuit> {
    circuits.iter().filter_map(Circuit::provisioned).collect()
}

/// Appends to the circuit's history and the controller's audit log.
fn record(
    tx: &mut dyn WriteTxn,
    c: &Circuit,
    actor: &str,
    action: &str,
    from: Option<CircuitState>,
    detail: String,
) -> Result<(), StoreError> {
    record_at(tx, c, c.updated_unix_ms, actor, action, from, detail)
}

/// [`record`], at `time_unix_ms` rather than the circuit's last change (an archived circuit's
/// record keeps the time it was decommissioned).
fn record_at(
    tx: &mut dyn WriteTxn,
    c: &Circuit,
    time_unix_ms: u64,
    actor: &str,
    action: &str,
    from: Option<CircuitState>,
    detail: String,
) -> Result<(), StoreError> {
    let n = next_history_seq(tx, &c.id)?;
    let entry = HistoryEntry {
        time_unix_ms,
        actor: actor.to_string(),
        action: action.to_string(),
        from,
        to: c.state,
        detail: detail.clone(),
    };
    CIRCUIT_HISTORY.put(tx, &format!("{}/{}", c.id, seq_key(n)), &entry)?;
    records::audit(
        tx,
        actor,
        &format!("circuit.{action}"),
        &format!("{} ({}): {detail}", c.id, c.name),
    )
}

fn save(tx: &mut dyn WriteTxn, c: &Circuit) -> Result<(), StoreError> {
    CIRCUITS.put(tx, c.id.as_str(), c)
}

/// The outcome of admission for a spec: where it would go and which VIP it would get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    pub placement: placement::Placement,
    pub pool: PoolName,
    pub vip: IpAddr,
    pub port: Option<u16>,
}

/// Checks a spec against the topology and the circuits held now: names, prefix, the B-end's
/// lists, placement with capacity, a VIP. Writes nothing. A decommissioning circuit still holds
/// its capacity and its VIP ([`CircuitState::holds_capacity`]), but not its name or its prefix:
/// it is out of the snapshots, so no router is sent the new circuit beside it, and a name finds
/// the live circuit first ([`find`]).
pub fn admit(
    topo: &Topology,
    circuits: &[Circuit],
    spec: &CircuitSpec,
) -> Result<Admission, CircuitError> {
    check_circuit_name(&spec.name)?;
    check_prefix(spec.a_end.prefix).map_err(|e| match e {
        CircuitError::Invalid(m) => CircuitError::Invalid(format!("a_end.prefix: {m}")),
        e => e,
    })?;
    check_spec_id("a_end.edge", spec.a_end.edge.as_str())?;
    check_spec_id("b_end.service", spec.b_end.service.as_str())?;
    if let Some(pool) = &spec.pool {
        check_spec_id("pool", pool)?;
    }
    check_b_end(&spec.b_end)?;
    check_regions_known(topo, &spec.b_end)?;
    if let Some(other) = circuits
        .iter()
        .find(|c| c.state.is_live() && c.name == spec.name)
    {
        return Err(CircuitError::Conflict(format!(
            "a circuit named {:?} already exists ({})",
            spec.name, other.id
        )));
    }
    if let Some(other) = circuits.iter().find(|c| {
        c.state.is_live()
            && c.a_end.edge == spec.a_end.edge
            && c.b_end.service == spec.b_end.service
            && c.a_end.prefix == spec.a_end.prefix
    }) {
        return Err(CircuitError::Conflict(format!(
            "circuit {} ({}) already carries {} at {} to {}; one circuit per prefix, edge and service",
            other.id, other.name, spec.a_end.prefix, spec.a_end.edge, spec.b_end.service
        )));
    }
    let req = PlacementRequest {
        edge: spec.a_end.edge.clone(),
        b_end: spec.b_end.clone(),
        rate: spec.rate,
    };
    let service = topo.service(spec.b_end.service.as_str());
    let port = service.and_then(|s| s.port.or(s.vips.first().map(|v| v.port)));
    // The edge serves a circuit at its VIP and this port: without one, nothing would reach the
    // circuit while it held its capacity. Checked before placement and pools: a mistake in the
    // request (422) whatever the fabric's state (a full fabric answered 409, which clients
    // retry). An unknown service is placement's to name.
    if port.is_none() && service.is_some() {
        return Err(CircuitError::Invalid(format!(
            "b_end.service: service {:?} has no port and no vips, so a circuit's VIP would have \
             no port to be reached at (give the service a port in the topology)",
            spec.b_end.service.as_str()
        )));
    }
    let used: BTreeSet<IpAddr> = circuits
        .iter()
        .filter(|c| c.state.holds_capacity())
        .filter_map(|c| c.vip)
        .collect();
    // The pool named, before placement: a misspelt one, or one of the other family, is the
    // request's mistake (422) however full the fabric is (a full fabric answered 409, naming a
    // link's capacity, for as long as it stayed full). A pool with no address free is the
    // fabric's state, told after placement's.
    let vip = match placement::allocate_vip(topo, spec.pool.as_deref(), spec.a_end.prefix, &used) {
        Err(e) if e.in_request() => return Err(e.into()),
        v => v,
    };
    let placement = placement::place(topo, &reservations(circuits), &req)?;
    let (pool, vip) = vip?;
    Ok(Admission {
        placement,
        pool,
        vip,
        port,
    })
}

/// Creates a circuit: admission, then one record in `provisioning` with its path reserved and
/// its VIP allocated. With an idempotency key already used, returns that circuit as it is now
/// (`false`; it may have been resized or deleted since) when the spec is the one the key was
/// first used with (pool included; the B-end's regions and sites in any order), and refuses
/// when it differs.
pub fn create(
    tx: &mut dyn WriteTxn,
    topo: &Topology,
    spec: &CircuitSpec,
    key: Option<&str>,
    actor: &str,
) -> Result<(Circuit, bool), CircuitError> {
    if let Some(k) = key {
        check_idempotency_key(k)?;
        if let Some(id) = CIRCUIT_KEYS.get(tx, k)? {
            // The key outlives the circuit's stay in the live table (a tombstone): a replay of
            // an archived circuit's create gets that circuit, decommissioned, as before its
            // archiving, never a new circuit.
            let c = match CIRCUITS.get(tx, &id)? {
                Some(c) => c,
                None => find_archived(tx, &id)?
                    .map(|a| a.circuit)
                    .ok_or_else(|| CircuitError::NotFound(id.clone()))?,
            };
            let same = match &c.created_with {
                Some(kept) => kept.matches(spec),
                // A record stored before requests were kept: compared with the circuit as it
                // is (a resize since, or another pool, is not told apart).
                None => {
                    c.name == spec.name
                        && c.a_end == spec.a_end
                        && same_b_end(&c.b_end, &spec.b_end)
                        && c.requested_rate == spec.rate
                }
            };
            if !same {
                return Err(CircuitError::Conflict(format!(
                    "idempotency key {k:?} was used for circuit {} ({}) with a different request",
                    c.id, c.name
                )));
            }
            return Ok((c, false));
        }
    }
    let circuits = all(tx)?;
    let adm = admit(topo, &circuits, spec)?;
    let n = next_number(tx)?;
    CIRCUIT_META.put(tx, "next_id", &(n + 1))?;
    let mut c = admitted(spec, &adm, n, key, actor);
    record(
        tx,
        &c,
        actor,
        "create",
        None,
        format!(
            "{} from {} at {} to {}",
            spec.rate, spec.a_end.prefix, spec.a_end.edge, spec.b_end.service
        ),
    )?;
    c.state = CircuitState::Provisioning;
    record(
        tx,
        &c,
        actor,
        "place",
        Some(CircuitState::Requested),
        format!(
            "path {} ({}), VIP {} from pool {}",
            arrows(&c.path),
            adm.placement.latency,
            adm.vip,
            adm.pool
        ),
    )?;
    save(tx, &c)?;
    if let Some(k) = key {
        CIRCUIT_KEYS.put(tx, k, &c.id.to_string())?;
    }
    Ok((c, true))
}

/// The number the next circuit created gets (its id is `c-` and the number).
fn next_number(tx: &dyn ReadTxn) -> Result<u64, StoreError> {
    Ok(CIRCUIT_META.get(tx, "next_id")?.unwrap_or(1))
}

/// The circuit that `spec`, admitted as `adm`, becomes as circuit number `n`: requested, its
/// path and VIP those of the admission.
fn admitted(
    spec: &CircuitSpec,
    adm: &Admission,
    n: u64,
    key: Option<&str>,
    actor: &str,
) -> Circuit {
    let now = now_unix_ms();
    Circuit {
        id: CircuitId::new(format!("c-{n:06}")),
        name: spec.name.clone(),
        a_end: spec.a_end.clone(),
        b_end: spec.b_end.clone(),
        requested_rate: spec.rate,
        assigned_rate: None,
        pool: Some(adm.pool.clone()),
        vip: Some(adm.vip),
        port: adm.port,
        site: Some(adm.placement.site.clone()),
        path: adm.placement.path.clone(),
        latency: Some(adm.placement.latency),
        held: None,
        state: CircuitState::Requested,
        reason: None,
        idempotency_key: key.map(str::to_string),
        created_with: key.map(|_| KeptRequest::from(spec)),
        created_by: actor.to_string(),
        created_unix_ms: now,
        updated_unix_ms: now,
        revision: 1,
    }
}

/// What routers would be sent were `spec`, admitted as `adm` against `circuits` (those in
/// `tx`), created now: the circuits provisioned and it, as [`create`] would number it. A
/// validate checks its size as a create does.
pub fn carried_if_created(
    tx: &dyn ReadTxn,
    circuits: &[Circuit],
    spec: &CircuitSpec,
    adm: &Admission,
) -> Result<Vec<ProvisionedCircuit>, StoreError> {
    let mut carried = provisioned(circuits);
    carried.extend(admitted(spec, adm, next_number(tx)?, None, "").provisioned());
    Ok(carried)
}

/// Changes a circuit's rate, re-checking admission. Make before break: the circuit keeps its
/// path when the new rate fits there; otherwise a new path is reserved while the old one is
/// still held (`held`), and the old one is released only once the new one is acknowledged.
/// The rate it already has returns the circuit unchanged (same revision), so a retry succeeds,
/// also once the circuit has failed. Returns the circuit and whether it was changed now (to be
/// published: the name may find another circuit here than before the transaction).
pub fn resize(
    tx: &mut dyn WriteTxn,
    topo: &Topology,
    id_or_name: &str,
    rate: Bandwidth,
    actor: &str,
) -> Result<(Circuit, bool), CircuitError> {
    let mut c = find(tx, id_or_name)?;
    // First: a retry of a resize that worked (which may still hold the old rate or path, or
    // have failed since, its routers not acknowledging in time) is answered with the circuit
    // as it is, not refused. A deleted one is refused: it has no rate any more.
    if c.state.is_live() && rate == c.requested_rate {
        return Ok((c, false));
    }
    if !matches!(c.state, CircuitState::Active | CircuitState::Provisioning) {
        return Err(CircuitError::Conflict(format!(
            "circuit {} is {}; only a provisioning or active circuit can be resized",
            c.id, c.state
        )));
    }
    if c.held.is_some() {
        return Err(CircuitError::Conflict(format!(
            "circuit {} is still provisioning an earlier resize (to {}); wait until it is active",
            c.id, c.requested_rate
        )));
    }
    let circuits = all(tx)?;
    let req = PlacementRequest {
        edge: c.a_end.edge.clone(),
        b_end: c.b_end.clone(),
        rate,
    };
    let p = placement::resize(topo, &reservations(&circuits), &c.id, &req)?;
    let old_rate = c.requested_rate;
    c.held = if p.path != c.path {
        Some(Held {
            path: c.path.clone(),
            rate: old_rate,
        })
    } else if rate < old_rate {
        // Same path, smaller rate: keep holding the difference until the edge enforces it.
        Some(Held {
            path: c.path.clone(),
            rate: old_rate.saturating_sub(rate),
        })
    } else {
        None
    };
    let moved = p.path != c.path;
    c.requested_rate = rate;
    c.site = Some(p.site.clone());
    c.path = p.path.clone();
    c.latency = Some(p.latency);
    let from = c.state;
    c.state = CircuitState::Provisioning;
    c.reason = None;
    c.updated_unix_ms = now_unix_ms();
    c.revision += 1;
    let detail = if moved {
        format!(
            "rate {old_rate} -> {rate}; moved to {} (old path held until acknowledged)",
            arrows(&c.path)
        )
    } else {
        format!("rate {old_rate} -> {rate} on the same path")
    };
    record(tx, &c, actor, "resize", Some(from), detail)?;
    save(tx, &c)?;
    Ok((c, true))
}

/// Starts decommissioning: the circuit leaves the snapshots at once, but holds its capacity
/// (what a resize still holds too: the old path of a move not acknowledged yet, or an old
/// rate's excess) and its VIP until it becomes `decommissioned`, when the routers of its paths
/// acknowledge a snapshot without it or the acknowledgement timeout passes ([`settle`],
/// [`expire`]): until then a router may still carry it, on either path.
/// Returns the circuit and whether it was changed now (a circuit deleted already is returned
/// as it is), as [`resize`] does.
pub fn delete(
    tx: &mut dyn WriteTxn,
    id_or_name: &str,
    actor: &str,
) -> Result<(Circuit, bool), CircuitError> {
    let mut c = find(tx, id_or_name)?;
    if matches!(
        c.state,
        CircuitState::Decommissioning | CircuitState::Decommissioned
    ) {
        return Ok((c, false));
    }
    let from = c.state;
    c.state = CircuitState::Decommissioning;
    // `held` stays: a router that acknowledged neither the move nor the removal (an edge cut
    // off) still sends the circuit on the old path, and its routers are awaited (`routers`).
    // A failure's reason is about the circuit it no longer is (its history keeps it): a
    // deleted circuit showed `decommissioning`, then `decommissioned`, with it for good.
    c.reason = None;
    c.updated_unix_ms = now_unix_ms();
    c.revision += 1;
    record(
        tx,
        &c,
        actor,
        "delete",
        Some(from),
        format!(
            "capacity {}{} and VIP held until the routers acknowledge the removal (or the \
             acknowledgement timeout passes)",
            c.requested_rate,
            c.held
                .as_ref()
                .map(|h| format!(", and {},", held_by_resize(h)))
                .unwrap_or_default()
        ),
    )?;
    save(tx, &c)?;
    Ok((c, true))
}

/// What the routers have acknowledged: called with the circuits to look at (`ids`: those the
/// caller waits for, read by id, so that a pass costs what is pending and not every circuit
/// ever created), a predicate "has this router applied a snapshot at least as new as version
/// V", and the version in which each pending circuit was first distributed in its current form
/// (`None` for a circuit not pending, or changed since that was decided: the caller compares
/// revisions). Moves circuits to `active` / `decommissioned` once the routers
/// [`Circuit::awaited`] under `topo` (the topology in force) acknowledged, and releases held
/// capacity (what a resize held; a decommissioned circuit's capacity and VIP). Returns the
/// circuits changed.
pub fn settle(
    tx: &mut dyn WriteTxn,
    topo: &Topology,
    ids: &[CircuitId],
    pending: &dyn Fn(&Circuit) -> Option<u64>,
    acked: &dyn Fn(&NodeId, u64) -> bool,
) -> Result<Vec<Circuit>, StoreError> {
    let mut changed = Vec::new();
    for mut c in by_ids(tx, ids)? {
        if !c.awaits_ack() {
            continue;
        }
        let target = match c.state {
            CircuitState::Decommissioning => CircuitState::Decommissioned,
            _ => CircuitState::Active,
        };
        let Some(version) = pending(&c) else {
            continue;
        };
        let awaited = c.awaited(topo);
        if !awaited.iter().all(|n| acked(n, version)) {
            continue;
        }
        let from = c.state;
        c.state = target;
        c.updated_unix_ms = now_unix_ms();
        c.revision += 1;
        c.reason = None;
        let detail = if target == CircuitState::Active {
            c.assigned_rate = Some(c.requested_rate);
            let released = c
                .held
                .take()
                .map(|h| format!("; released {} on {}", h.rate, arrows(&h.path)))
                .unwrap_or_default();
            format!(
                "acknowledged by {} in snapshot {version}; {} enforced{released}",
                list(&c.routers()),
                c.requested_rate
            )
        } else {
            c.assigned_rate = None;
            let gone: BTreeSet<NodeId> = c.routers().difference(&awaited).cloned().collect();
            let removal = if awaited.is_empty() {
                format!(
                    "removal awaits no acknowledgement: {} no longer in the topology",
                    list(&gone)
                )
            } else if gone.is_empty() {
                format!(
                    "removal acknowledged by {} in snapshot {version}",
                    list(&awaited)
                )
            } else {
                format!(
                    "removal acknowledged by {} in snapshot {version} ({} no longer in the topology)",
                    list(&awaited),
                    list(&gone)
                )
            };
            format!("{removal}; {}", release(&mut c))
        };
        record(
            tx,
            &c,
            "controller",
            if target == CircuitState::Active {
                "activate"
            } else {
                "decommission"
            },
            Some(from),
            detail,
        )?;
        save(tx, &c)?;
        changed.push(c);
    }
    Ok(changed)
}

/// The reason prefix of circuits that failed because routers did not acknowledge in time
/// (they recover to `active` when the acknowledgements arrive).
pub const NOT_ACKED: &str = "not acknowledged";

/// The snapshot version of a change no snapshot has carried yet (its publication failed): no
/// router acknowledges it.
pub const UNPUBLISHED: u64 = u64::MAX;

/// Clears what a resize still held when a circuit deleted mid-resize is decommissioned (no
/// longer counted by then: [`CircuitState::holds_capacity`]), and says what the decommission
/// released (held since the delete) for its history entry.
fn release(c: &mut Circuit) -> String {
    let held = c
        .held
        .take()
        .map(|h| format!("; released {}", held_by_resize(&h)))
        .unwrap_or_default();
    format!("capacity {} and VIP released{held}", c.requested_rate)
}

/// What a resize holds, for a history entry: `300Mbps held on e -> t -> s by a resize`.
fn held_by_resize(h: &Held) -> String {
    format!("{} held on {} by a resize", h.rate, arrows(&h.path))
}

/// How a failure or decommission names the snapshot it waited for.
fn snapshot_name(version: u64) -> String {
    if version == UNPUBLISHED {
        "never published".into()
    } else {
        format!("snapshot {version}")
    }
}

/// Acts on the provisioning and decommissioning circuits of `ids` (read by id, as in [`settle`])
/// `overdue` gives a version for (distributed in it `timeout` ago or longer; `None` as for
/// [`settle`]) that routers
/// [`Circuit::awaited`] under `topo` have not acknowledged: a provisioning one is marked failed,
/// naming them; a decommissioning one becomes `decommissioned` anyway, its history naming them,
/// which releases its capacity and VIP (held since its delete; a router that comes back gets
/// the snapshot without it).
pub fn expire(
    tx: &mut dyn WriteTxn,
    topo: &Topology,
    timeout: std::time::Duration,
    ids: &[CircuitId],
    overdue: &dyn Fn(&Circuit) -> Option<u64>,
    acked: &dyn Fn(&NodeId, u64) -> bool,
) -> Result<Vec<Circuit>, StoreError> {
    let mut changed = Vec::new();
    for mut c in by_ids(tx, ids)? {
        if !matches!(
            c.state,
            CircuitState::Provisioning | CircuitState::Decommissioning
        ) {
            continue;
        }
        let Some(version) = overdue(&c) else {
            continue;
        };
        let missing: BTreeSet<NodeId> = c
            .awaited(topo)
            .into_iter()
            .filter(|n| !acked(n, version))
            .collect();
        if missing.is_empty() {
            continue;
        }
        let from = c.state;
        c.updated_unix_ms = now_unix_ms();
        c.revision += 1;
        if from == CircuitState::Decommissioning {
            c.state = CircuitState::Decommissioned;
            c.assigned_rate = None;
            c.reason = None;
            let detail = format!(
                "removal not acknowledged by {} within {} s ({}); \
                 decommissioned without them; {}",
                list(&missing),
                timeout.as_secs(),
                snapshot_name(version),
                release(&mut c)
            );
            record(tx, &c, "controller", "decommission", Some(from), detail)?;
        } else {
            c.state = CircuitState::Failed;
            let reason = format!(
                "{NOT_ACKED} by {} ({})",
                list(&missing),
                snapshot_name(version)
            );
            c.reason = Some(reason.clone());
            record(tx, &c, "controller", "fail", Some(from), reason)?;
        }
        save(tx, &c)?;
        changed.push(c);
    }
    Ok(changed)
}

/// How `topo` breaks the circuit (a node or link of its path removed or down, its service
/// removed, its site no longer serving it or no longer allowed for it), for a circuit
/// [`fail_broken`] would fail: empty when it would not (not live, failed for a reason no
/// acknowledgement undoes, such as an earlier topology change, or intact). A circuit failed for
/// want of acknowledgements is checked: it would become active again when they arrive.
/// The path checked is the one the circuit is on: the old path a resize still holds until the
/// new one is acknowledged is the circuit's no more ([`held_broken_by`]).
pub fn broken_by(topo: &Topology, c: &Circuit) -> Vec<String> {
    if !c.state.is_live() || (c.state == CircuitState::Failed && !c.awaits_ack()) {
        return Vec::new();
    }
    path_issues(topo, c.path_reservation())
        .chain(
            c.site
                .as_ref()
                .and_then(|site| placement::check_site(topo, &c.id, &c.b_end, site)),
        )
        .map(|i| i.to_string())
        .collect()
}

/// Whether [`fail_broken`] would change the circuit under `topo`: fail it, release what it
/// holds, or restore it.
pub fn changed_by(topo: &Topology, c: &Circuit) -> bool {
    restored_by(topo, c) || !broken_by(topo, c).is_empty() || !held_broken_by(topo, c).is_empty()
}

/// Whether the circuit, failed by an earlier topology change, is whole under `topo`: nothing
/// of it breaks its path, service or site (what [`broken_by`] checks of a live circuit).
fn restored_by(topo: &Topology, c: &Circuit) -> bool {
    c.state == CircuitState::Failed
        && !c.awaits_ack()
        && !c.path.is_empty()
        && path_issues(topo, c.path_reservation()).next().is_none()
        && c.site
            .as_ref()
            .is_some_and(|site| placement::check_site(topo, &c.id, &c.b_end, site).is_none())
}

/// How `topo` breaks what a resize still holds (a node or link of the old path removed or
/// down), for a circuit whose held reservation [`fail_broken`] would release: empty when it
/// would not (not live: a decommissioning circuit keeps what it holds until it is
/// decommissioned, as it keeps its path's reservation), and for a shrink (the old rate's excess
/// held on the circuit's own path: a break there is the circuit's, [`broken_by`], and the excess
/// stays with the rest of its reservation, as an edge not yet told of the shrink still sends at
/// the old rate). Such a break does not fail the circuit, which is moving off that path.
pub fn held_broken_by(topo: &Topology, c: &Circuit) -> Vec<String> {
    if !c.state.is_live() || c.held.as_ref().is_some_and(|h| h.path == c.path) {
        return Vec::new();
    }
    path_issues(topo, c.held_reservation())
        .map(|i| i.to_string())
        .collect()
}

/// Nodes or links of a reservation's path removed or down (over-commitment breaks nothing).
fn path_issues(
    topo: &Topology,
    r: Option<Reservation>,
) -> impl Iterator<Item = placement::ReservationIssue> {
    r.map(|r| placement::check_reservations(topo, std::slice::from_ref(&r)))
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !matches!(i, placement::ReservationIssue::OverCommitted { .. }))
}

/// Marks circuits a new topology breaks ([`broken_by`]) as failed, with the topology as the
/// reason, and releases what a resize still holds on an old path the topology breaks
/// ([`held_broken_by`]; the circuit goes on waiting for its new path's acknowledgement). A
/// circuit failed for its new path keeps what it holds on an old one the topology leaves intact.
/// A circuit an earlier topology failed that this one leaves whole goes back to provisioning
/// (history `restore`). Idempotent: a second run with the same topology changes nothing.
pub fn fail_broken(
    tx: &mut dyn WriteTxn,
    topo: &Topology,
    version: u64,
) -> Result<Vec<Circuit>, StoreError> {
    let mut changed = Vec::new();
    for mut c in all(tx)? {
        // Failed by an earlier topology change and whole again under this one (the change
        // undone, a link set up again): provisioning again, for its routers to acknowledge, as
        // an AWS Direct Connect connection goes from `down` back to `available`. (It stayed
        // failed for good: a mistaken apply undone a minute later failed every circuit it
        // crossed, whose only way back was delete and create, on another VIP.) It kept its VIP,
        // its reservation and its place in the snapshots meanwhile. An old path a resize held
        // that this topology breaks is released in the same pass (below): restored with it,
        // the circuit would wait for routers the topology no longer has.
        let restore = restored_by(topo, &c);
        let issues = broken_by(topo, &c);
        let held_issues = held_broken_by(topo, &c);
        if !restore && issues.is_empty() && held_issues.is_empty() {
            continue;
        }
        c.updated_unix_ms = now_unix_ms();
        c.revision += 1;
        // Only a break of the held path releases it: a circuit failed for its new path keeps
        // what it holds on the old one, like the rest of its reservation, until it is deleted.
        if let Some(h) = c.held.take_if(|_| !held_issues.is_empty()) {
            record(
                tx,
                &c,
                "controller",
                "release",
                Some(c.state),
                format!(
                    "topology version {version}: released {} held on {} (the path a resize \
                     leaves): {}",
                    h.rate,
                    arrows(&h.path),
                    held_issues.join("; ")
                ),
            )?;
        }
        if restore {
            let from = c.state;
            c.state = CircuitState::Provisioning;
            c.reason = None;
            record(
                tx,
                &c,
                "controller",
                "restore",
                Some(from),
                format!(
                    "topology version {version}: its path, service and site are whole again; \
                     awaiting its routers' acknowledgement"
                ),
            )?;
        } else if !issues.is_empty() {
            let from = c.state;
            c.state = CircuitState::Failed;
            c.reason = Some(format!("topology version {version}: {}", issues.join("; ")));
            record(
                tx,
                &c,
                "controller",
                "fail",
                Some(from),
                c.reason.clone().unwrap_or_default(),
            )?;
        }
        save(tx, &c)?;
        changed.push(c);
    }
    Ok(changed)
}

impl Circuit {
    /// When the circuit was decommissioned (`None`: it is not). No operation changes a
    /// decommissioned record (a delete returns it as it is, a resize refuses it, `fail_broken`
    /// skips it as not live, `settle` and `expire` act on circuits awaiting acknowledgement
    /// only), so its last change is its decommissioning.
    pub fn decommissioned_unix_ms(&self) -> Option<u64> {
        (self.state == CircuitState::Decommissioned).then_some(self.updated_unix_ms)
    }

    /// Whether the retention sweep archives it at `now_unix_ms`: decommissioned for `retention`
    /// or longer. Only `decommissioned` is archived: it is the one state nothing leaves. A
    /// `failed` circuit still holds its VIP and reservation and is in the snapshots until it is
    /// deleted (then it is decommissioned, and its retention starts); a `decommissioning` one
    /// still waits for its routers.
    pub fn due_for_archive(&self, now_unix_ms: u64, retention: std::time::Duration) -> bool {
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        self.decommissioned_unix_ms()
            .is_some_and(|t| now_unix_ms.saturating_sub(t) >= retention_ms)
    }
}

/// The ids of the circuits [`Circuit::due_for_archive`] at `now_unix_ms`: a read of the whole
/// live table, which the sweep does once per run (hourly), not per operation.
pub fn due_for_archive(
    tx: &dyn ReadTxn,
    now_unix_ms: u64,
    retention: std::time::Duration,
) -> Result<Vec<CircuitId>, StoreError> {
    Ok(all(tx)?
        .into_iter()
        .filter(|c| c.due_for_archive(now_unix_ms, retention))
        .map(|c| c.id)
        .collect())
}

/// Moves the circuits of `ids` that are due at `now_unix_ms` (read again here, by id) from the
/// live table to the archive, each with a history entry (`archive`) and an audit entry, all in
/// the caller's transaction: a crash leaves a circuit in one table or the other, never both or
/// neither. Returns what it archived.
pub fn archive(
    tx: &mut dyn WriteTxn,
    ids: &[CircuitId],
    now_unix_ms: u64,
    retention: std::time::Duration,
) -> Result<Vec<Archived>, StoreError> {
    let mut moved = Vec::new();
    for c in by_ids(tx, ids)? {
        let Some(since) = c
            .decommissioned_unix_ms()
            .filter(|_| c.due_for_archive(now_unix_ms, retention))
        else {
            continue;
        };
        let detail = format!(
            "decommissioned at {}, {} ago (retention {}): moved out of the live circuits",
            rfc3339(since),
            humantime::format_duration(std::time::Duration::from_secs(
                now_unix_ms.saturating_sub(since) / 1000
            )),
            humantime::format_duration(retention)
        );
        record_at(
            tx,
            &c,
            now_unix_ms,
            "controller",
            "archive",
            Some(c.state),
            detail,
        )?;
        CIRCUITS.delete(tx, c.id.as_str())?;
        let a = Archived {
            archived_unix_ms: now_unix_ms,
            circuit: c,
        };
        CIRCUITS_ARCHIVE.put(tx, a.circuit.id.as_str(), &a)?;
        moved.push(a);
    }
    Ok(moved)
}

fn list(nodes: &BTreeSet<NodeId>) -> String {
    nodes
        .iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store;
    use crate::store::redb::RedbStore;

    /// Edge e, transit t, site s; links e–s, e–t, t–s (e–s the shortest), and `pool` as the
    /// VIP pool. Without `with_es`, the link e–s is left out.
    pub(crate) fn yaml(pool: &str, with_es: bool) -> String {
        let node = |id: &str, kind: &str, n: u8, extra: &str| {
            format!(
                "  - {{id: {id}, kind: {kind}, region: r, country: AU, location: {{lat: 0, lon: 0}}, \
                 address: \"127.0.0.{n}:7000\"{extra}}}\n"
            )
        };
        format!(
            "version: 1\nnodes:\n{}{}{}links:\n{}  - {{a: e, b: t, latency: 1ms, capacity: 1Gbps}}\n  \
             - {{a: t, b: s, latency: 1ms, capacity: 1Gbps}}\n\
             services:\n  - {{name: chat, port: 8080}}\npools:\n  - {{name: vips, prefix: {pool}}}\n",
            node("e", "edge", 1, ", client_address: \"127.0.0.1\""),
            node("t", "transit", 2, ""),
            node(
                "s",
                "site",
                3,
                ", serves: [{service: chat, backend: \"127.0.0.9:9000\", capacity: 10}]"
            ),
            if with_es {
                "  - {a: e, b: s, latency: 1ms, capacity: 1Gbps}\n"
            } else {
                ""
            },
        )
    }

    /// A service with no port and no VIPs: a circuit to it is refused (its VIP would have no
    /// port, so no edge would serve it), nothing reserved or allocated.
    #[test]
    fn a_circuit_to_a_service_without_a_port_is_refused() {
        let text = yaml("127.79.0.0/26", true).replace("{name: chat, port: 8080}", "{name: chat}");
        let t = crate::controller::validate(&text).unwrap().0;
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let sp = spec("acme", "10.1.0.0/24", "1Mbps");
        let err = admit(&t, &[], &sp).unwrap_err();
        assert!(
            matches!(&err, CircuitError::Invalid(m) if m.contains("has no port and no vips")),
            "{err}"
        );
        let err = store::transaction(&s, |tx| create(tx, &t, &sp, None, "ops")).unwrap_err();
        assert!(matches!(&err, CircuitError::Invalid(_)), "{err}");
        assert_eq!(store::read(&s, |tx| all(tx)).unwrap(), []);
        // Whatever the fabric's state: a rate no link has room for is still the request's
        // mistake (422), not a conflict (409) a client would retry until room freed up.
        let wide = spec("acme", "10.1.0.0/24", "5Gbps");
        let err = admit(&t, &[], &wide).unwrap_err();
        assert!(
            matches!(&err, CircuitError::Invalid(m) if m.contains("has no port and no vips")),
            "{err}"
        );
    }

    /// A mistake in the request (a misspelt pool or service, a pool of the other family, a
    /// pinned site that does not serve the service) is refused as such (422) whatever the
    /// fabric's state: no path with room for the rate, or the edge down. (A full fabric answered
    /// 409 for a misspelt pool, and a down edge 409 for a misspelt service: refusals a client
    /// retries for as long as the state lasts, naming something other than the mistake.)
    #[test]
    fn a_mistake_in_the_request_is_told_whatever_the_fabrics_state() {
        use topology::circuit::{PlacementError, PoolError};
        let t = topo(true);
        // No path carries 5 Gbit/s (the links have 1).
        let mut typo = spec("acme", "10.1.0.0/24", "5Gbps");
        typo.pool = Some("vipz".into());
        let err = admit(&t, &[], &typo).unwrap_err();
        assert!(
            matches!(&err, CircuitError::Pool(PoolError::UnknownPool { .. })),
            "{err}"
        );
        let mut v6 = spec("acme", "2001:db8::/48", "5Gbps");
        v6.pool = Some("vips".into());
        let err = admit(&t, &[], &v6).unwrap_err();
        assert!(
            matches!(&err, CircuitError::Pool(PoolError::Family { .. })),
            "{err}"
        );
        // Without a pool named, the rate is the answer.
        let err = admit(&t, &[], &spec("acme", "10.1.0.0/24", "5Gbps")).unwrap_err();
        assert!(matches!(&err, CircuitError::Placement(_)), "{err}");
        // The edge down: a misspelt service, or a pinned site that does not serve it.
        let text = yaml("127.79.0.0/26", true).replace(
            "address: \"127.0.0.1:7000\", client_address",
            "address: \"127.0.0.1:7000\", state: down, client_address",
        );
        let down = crate::controller::validate(&text).unwrap().0;
        let mut svc = spec("acme", "10.1.0.0/24", "1Mbps");
        svc.b_end.service = topology::ServiceName::new("chta");
        let err = admit(&down, &[], &svc).unwrap_err();
        assert!(
            matches!(
                &err,
                CircuitError::Placement(PlacementError::UnknownService { .. })
            ),
            "{err}"
        );
        let mut pinned = spec("acme", "10.1.0.0/24", "1Mbps");
        pinned.b_end.sites = vec![NodeId::new("t")];
        let err = admit(&down, &[], &pinned).unwrap_err();
        assert!(
            matches!(
                &err,
                CircuitError::Placement(PlacementError::SiteDoesNotServe { .. })
            ),
            "{err}"
        );
        // A request with no mistake: the edge's state is the answer.
        let err = admit(&down, &[], &spec("acme", "10.1.0.0/24", "1Mbps")).unwrap_err();
        assert!(
            matches!(
                &err,
                CircuitError::Placement(PlacementError::EdgeDown { .. })
            ),
            "{err}"
        );
    }

    pub(crate) fn spec(name: &str, prefix: &str, rate: &str) -> CircuitSpec {
        CircuitSpec {
            name: name.into(),
            a_end: AEnd {
                edge: NodeId::new("e"),
                prefix: parse_prefix(prefix).unwrap(),
            },
            b_end: BEnd {
                service: topology::ServiceName::new("chat"),
                regions: Vec::new(),
                sites: Vec::new(),
            },
            rate: rate.parse().unwrap(),
            pool: None,
        }
    }

    fn topo(with_es: bool) -> std::sync::Arc<Topology> {
        crate::controller::validate(&yaml("127.79.0.0/26", with_es))
            .unwrap()
            .0
    }

    /// A write transaction that counts the circuit history entries its reads return.
    struct Counting<'a> {
        tx: &'a mut dyn WriteTxn,
        rows: std::cell::Cell<usize>,
    }

    impl ReadTxn for Counting<'_> {
        fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            let v = self.tx.get(table, key)?;
            if table == CIRCUIT_HISTORY.name && v.is_some() {
                self.rows.set(self.rows.get() + 1);
            }
            Ok(v)
        }
        fn scan(
            &self,
            table: &'static str,
            range: (std::ops::Bound<&str>, std::ops::Bound<&str>),
            limit: usize,
            reverse: bool,
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            let rows = self.tx.scan(table, range, limit, reverse)?;
            if table == CIRCUIT_HISTORY.name {
                self.rows.set(self.rows.get() + rows.len());
            }
            Ok(rows)
        }
        fn last_key(&self, table: &'static str) -> Result<Option<String>, StoreError> {
            self.tx.last_key(table)
        }
    }

    impl WriteTxn for Counting<'_> {
        fn put(&mut self, table: &'static str, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.tx.put(table, key, value)
        }
        fn delete(&mut self, table: &'static str, key: &str) -> Result<bool, StoreError> {
            self.tx.delete(table, key)
        }
    }

    /// Reading a circuit's history, and appending to it (every change of the circuit), reads
    /// that circuit's entries only, not the rest of the table (all later circuits' entries).
    #[test]
    fn a_circuits_history_reads_its_own_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = crate::controller::validate(&yaml("127.79.0.0/25", true))
            .unwrap()
            .0;
        store::transaction(&s, |tx| -> Result<(), CircuitError> {
            for i in 1..=50 {
                create(
                    tx,
                    &t,
                    &spec(&format!("c{i}"), &format!("10.{i}.0.0/24"), "1Mbps"),
                    None,
                    "ops",
                )?;
            }
            Ok(())
        })
        .unwrap();
        let id = CircuitId::new("c-000001");
        store::transaction(&s, |tx| -> Result<(), CircuitError> {
            let mut tx = Counting { tx, rows: 0.into() };
            let h = history(&tx, &id)?;
            assert_eq!(
                h.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
                ["create", "place"]
            );
            assert!(
                tx.rows.get() <= h.len() + 1,
                "history read {} entries",
                tx.rows.get()
            );
            tx.rows.set(0);
            delete(&mut tx, "c-000001", "ops")?;
            assert!(
                tx.rows.get() <= 1,
                "a change read {} history entries",
                tx.rows.get()
            );
            Ok(())
        })
        .unwrap();
        // The entry the delete appended is numbered after the circuit's others.
        let keys: Vec<String> = store::read(&s, |tx| CIRCUIT_HISTORY.all(tx))
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with("c-000001/"))
            .collect();
        assert_eq!(
            keys,
            (1..=3)
                .map(|n| format!("c-000001/{}", seq_key(n)))
                .collect::<Vec<_>>()
        );
        let h = store::read(&s, |tx| history(tx, &id)).unwrap();
        assert_eq!(h.last().map(|e| e.action.as_str()), Some("delete"));
        let next = store::read(&s, |tx| history(tx, &CircuitId::new("c-000002"))).unwrap();
        assert_eq!(next.len(), 2);
    }

    /// A name that is a URL's dot segment (`.`, `..`) is refused: clients resolve
    /// `/v1/circuits/..` to `/v1/` before sending it, so such a circuit could be shown, resized or
    /// deleted by its id only. Longer runs of dots are names like any other.
    #[test]
    fn a_name_that_is_a_dot_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        for name in [".", ".."] {
            let err = store::transaction(&s, |tx| {
                create(tx, &t, &spec(name, "10.2.0.0/24", "1Mbps"), None, "ops")
            })
            .unwrap_err();
            assert!(
                matches!(&err, CircuitError::Invalid(m) if m.contains("part of a URL's path")),
                "{name}: {err}"
            );
        }
        created(&s, &t, "...", "10.1.0.0/24", "1Mbps");
        assert_eq!(store::read(&s, |tx| find(tx, "...")).unwrap().name, "...");
    }

    /// A name of the form of a circuit id (`c-` and digits) is refused: commands that take an
    /// id or a name look the id up first, so `tasman circuit delete c-000002` would delete
    /// circuit c-000002, not the one named so.
    #[test]
    fn a_name_of_the_form_of_a_circuit_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        created(&s, &t, "acme", "10.1.0.0/24", "1Mbps");
        for name in ["c-000001", "c-000002", "c-1", "c-0000042"] {
            let err = store::transaction(&s, |tx| {
                create(tx, &t, &spec(name, "10.2.0.0/24", "1Mbps"), None, "ops")
            })
            .unwrap_err();
            assert!(
                matches!(&err, CircuitError::Invalid(m) if m.contains("circuit id")),
                "{name}: {err}"
            );
        }
        let acme = store::read(&s, |tx| find(tx, "c-000001")).unwrap();
        assert_eq!(acme.name, "acme");
        assert_eq!(store::read(&s, |tx| all(tx)).unwrap().len(), 1);
        // Names that only look alike are fine.
        for (i, name) in [
            "c-",
            "c-7a",
            "cc-000003",
            "C-000004",
            "c-000005-acme",
            "c000006",
        ]
        .into_iter()
        .enumerate()
        {
            store::transaction(&s, |tx| {
                create(
                    tx,
                    &t,
                    &spec(name, &format!("10.{}.0.0/24", i + 10), "1Mbps"),
                    None,
                    "ops",
                )
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// A circuit failed because its routers had not acknowledged it in time, whose path a
    /// topology change then breaks, fails for the topology: late acknowledgements must not make
    /// it active on a link that is gone.
    #[test]
    fn a_not_acknowledged_circuit_a_topology_breaks_does_not_recover() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        created(&s, &t, "c1", "10.1.0.0/24", "100Mbps");
        let expired = store::transaction(&s, |tx| {
            let ids = awaiting_ack(tx)?;
            expire(
                tx,
                &t,
                Duration::from_secs(60),
                &ids,
                &|_| Some(7),
                &|_, _| false,
            )
        })
        .unwrap();
        assert_eq!(expired.len(), 1);
        let failed = store::transaction(&s, |tx| fail_broken(tx, &topo(false), 2)).unwrap();
        assert_eq!(failed.len(), 1, "the topology did not fail it");
        assert!(!failed[0].awaits_ack(), "{:?}", failed[0]);
        let settled = store::transaction(&s, |tx| {
            let ids = awaiting_ack(tx)?;
            settle(tx, &t, &ids, &|_| Some(7), &|_, _| true)
        })
        .unwrap();
        assert_eq!(settled, []);
        let c = store::read(&s, |tx| find(tx, "c1")).unwrap();
        assert_eq!(c.state, CircuitState::Failed);
        assert!(
            c.reason
                .as_deref()
                .is_some_and(|r| r.starts_with("topology version 2:")),
            "{c:?}"
        );
        // And once is enough.
        let again = store::transaction(&s, |tx| fail_broken(tx, &topo(false), 2)).unwrap();
        assert_eq!(again, []);
    }

    /// A removal whose path the topology no longer has at all awaits no acknowledgement, and
    /// its history says so (rather than "acknowledged by" no one).
    #[test]
    fn a_removal_with_no_router_left_is_decommissioned_saying_why() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        store::transaction(&s, |tx| {
            create(tx, &t, &spec("c1", "10.1.0.0/24", "100Mbps"), None, "ops")?;
            delete(tx, "c1", "ops")
        })
        .unwrap();
        let mut empty = (*t).clone();
        empty.nodes.clear();
        let settled = store::transaction(&s, |tx| {
            let ids = awaiting_ack(tx)?;
            settle(tx, &empty, &ids, &|_| Some(3), &|_, _| false)
        })
        .unwrap();
        assert_eq!(settled.len(), 1);
        let h = store::read(&s, |tx| history(tx, &settled[0].id)).unwrap();
        assert_eq!(
            h.last().unwrap().detail,
            "removal awaits no acknowledgement: e, s no longer in the topology; \
             capacity 100Mbps and VIP released"
        );
    }

    /// Circuit `name` for `prefix` at `rate`, created in a transaction of its own.
    fn created(s: &RedbStore, t: &Topology, name: &str, prefix: &str, rate: &str) -> Circuit {
        store::transaction(s, |tx| {
            create(tx, t, &spec(name, prefix, rate), None, "ops")
        })
        .unwrap()
        .0
    }

    fn rate(s: &str) -> Bandwidth {
        s.parse().unwrap()
    }

    /// An IPv4-mapped prefix is refused in a create (the API) and in `--prefix` (the CLI),
    /// naming its IPv4 form: the edge sees those clients as IPv4, so it would never match.
    /// (The circuit was created, and its clients refused.)
    #[test]
    fn an_ipv4_mapped_prefix_is_refused_naming_its_ipv4_form() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        let want = "prefix ::ffff:10.0.0.0/104 is an IPv4-mapped address, which never matches \
                    (the edge sees such clients as IPv4); write 10.0.0.0/8";
        let mut mapped = spec("acme", "10.1.0.0/24", "1Mbps");
        mapped.a_end.prefix = "::ffff:10.0.0.0/104".parse().unwrap();
        let err = store::transaction(&s, |tx| create(tx, &t, &mapped, None, "ops")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("invalid circuit: a_end.prefix: {want}")
        );
        assert_eq!(store::read(&s, |tx| all(tx)).unwrap(), []);
        let err = parse_prefix("::ffff:10.0.0.0/104").unwrap_err();
        assert_eq!(err.to_string(), format!("invalid circuit: {want}"));
        // An IPv6 prefix that merely holds the mapped range is an IPv6 prefix.
        for ok in ["::/0", "::fffe:0:0/95", "2001:db8::/32", "10.0.0.0/8"] {
            parse_prefix(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    /// A circuit of IPv6 clients on a fabric whose only pool is IPv4 is refused, nothing
    /// stored (it got an IPv4 VIP, which the edge serves to the circuit's prefix only, so no
    /// client could use it); naming an IPv4 pool for it is refused the same way.
    #[test]
    fn a_circuit_gets_no_vip_of_the_other_family() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        let mut v6 = spec("acme", "10.1.0.0/24", "1Mbps");
        v6.a_end.prefix = "2001:db8:1::/48".parse().unwrap();
        let err = store::transaction(&s, |tx| create(tx, &t, &v6, None, "ops")).unwrap_err();
        assert!(
            matches!(&err, CircuitError::Pool(PoolError::NoPoolOfFamily { .. })),
            "{err}"
        );
        let pool = t.pools[0].name.to_string();
        v6.pool = Some(pool.clone());
        let err = store::transaction(&s, |tx| create(tx, &t, &v6, None, "ops")).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("pool {pool} (127.79.0.0/26) holds IPv4 addresses")),
            "{err}"
        );
        assert_eq!(store::read(&s, |tx| all(tx)).unwrap(), []);
    }

    /// A replayed create is compared with the request its idempotency key was first used
    /// with: after a resize, the same request returns the circuit (at its new rate), and a
    /// request with another rate or pool is refused, also one asking for the circuit's
    /// current rate. (The replay was compared with the circuit as it is now: the identical
    /// request was refused as "different" after a resize, and the pool not compared at all.)
    #[test]
    fn a_replayed_create_is_compared_with_the_request_the_key_was_used_with() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        let original = spec("acme", "10.1.0.0/24", "100Mbps");
        let (c, created) =
            store::transaction(&s, |tx| create(tx, &t, &original, Some("order-1"), "ops")).unwrap();
        assert!(created);
        store::transaction(&s, |tx| resize(tx, &t, "acme", rate("200Mbps"), "ops")).unwrap();
        let (again, created) =
            store::transaction(&s, |tx| create(tx, &t, &original, Some("order-1"), "ops"))
                .unwrap_or_else(|e| panic!("the same request: {e}"));
        assert!(!created);
        assert_eq!(
            (again.id.clone(), again.requested_rate),
            (c.id.clone(), rate("200Mbps"))
        );
        let other_pool = CircuitSpec {
            pool: Some("elsewhere".into()),
            ..original.clone()
        };
        let current_rate = CircuitSpec {
            rate: rate("200Mbps"),
            ..original.clone()
        };
        for (what, other) in [("another pool", other_pool), ("another rate", current_rate)] {
            let err = store::transaction(&s, |tx| create(tx, &t, &other, Some("order-1"), "ops"))
                .unwrap_err();
            assert!(
                matches!(&err, CircuitError::Conflict(m) if m.contains("with a different request")),
                "{what}: {err}"
            );
        }
        assert_eq!(store::read(&s, |tx| all(tx)).unwrap().len(), 1);
    }

    /// A replayed create is compared with the request its key was used with taking the
    /// B-end's regions and sites as sets, as placement does: the same regions in another order
    /// return the circuit, also for a record stored before requests were kept and for one
    /// whose kept request an earlier build wrote in the order given; another set is refused.
    /// (The lists were compared in order: a retry that listed them otherwise got 409 Conflict.)
    #[test]
    fn a_replayed_create_with_its_regions_in_another_order_gets_the_circuit() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        // t in region r2, so that the topology knows it.
        let text = yaml("127.79.0.0/26", true).replacen(
            "{id: t, kind: transit, region: r,",
            "{id: t, kind: transit, region: r2,",
            1,
        );
        let t = crate::controller::validate(&text).unwrap().0;
        let with_regions = |regions: &[&str]| {
            let mut sp = spec("acme", "10.1.0.0/24", "100Mbps");
            sp.b_end.regions = regions.iter().map(topology::Region::new).collect();
            sp
        };
        let (c, created) = store::transaction(&s, |tx| {
            create(tx, &t, &with_regions(&["r2", "r"]), Some("order-1"), "ops")
        })
        .unwrap();
        assert!(created);
        let replay = |regions: &[&str]| {
            store::transaction(&s, |tx| {
                create(tx, &t, &with_regions(regions), Some("order-1"), "ops")
            })
        };
        let (again, created) = replay(&["r", "r2"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((again.id.clone(), created), (c.id.clone(), false));
        for other in [&["r"][..], &["r", "r2", "r"], &[]] {
            let err = replay(other).unwrap_err();
            assert!(matches!(err, CircuitError::Conflict(_)), "{other:?}: {err}");
        }
        // The record as an earlier build wrote it: its kept request in the order given, or
        // none kept (compared with the circuit's B-end).
        let mut old = serde_json::to_value(&c).unwrap();
        assert_eq!(
            old["created_with"]["b_end"]["regions"],
            serde_json::json!(["r2", "r"])
        );
        assert_eq!(old["b_end"]["regions"], serde_json::json!(["r2", "r"]));
        for stored in [old.clone(), {
            old.as_object_mut().unwrap().remove("created_with");
            old
        }] {
            store::transaction(&s, |tx| {
                tx.put(CIRCUITS.name, c.id.as_str(), stored.to_string().as_bytes())
            })
            .unwrap();
            let (again, created) = replay(&["r", "r2"]).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!((again.id.clone(), created), (c.id.clone(), false));
        }
        assert_eq!(store::read(&s, |tx| all(tx)).unwrap().len(), 1);
    }

    /// A record stored before creates kept their request (no `created_with`) still loads, and
    /// a replay of its key is compared with the record as before.
    #[test]
    fn a_record_without_its_create_request_loads_and_replays_compare_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        let original = spec("acme", "10.1.0.0/24", "100Mbps");
        let (c, _) =
            store::transaction(&s, |tx| create(tx, &t, &original, Some("order-1"), "ops")).unwrap();
        assert!(c.created_with.is_some());
        // The record as an older build wrote it.
        let mut old = serde_json::to_value(&c).unwrap();
        old.as_object_mut().unwrap().remove("created_with");
        store::transaction(&s, |tx| {
            tx.put(CIRCUITS.name, c.id.as_str(), old.to_string().as_bytes())
        })
        .unwrap();
        let loaded = store::read(&s, |tx| find(tx, "acme")).unwrap();
        assert_eq!(loaded.created_with, None);
        let (again, created) =
            store::transaction(&s, |tx| create(tx, &t, &original, Some("order-1"), "ops")).unwrap();
        assert_eq!((again, created), (loaded, false));
        let err = store::transaction(&s, |tx| {
            let other = CircuitSpec {
                rate: rate("200Mbps"),
                ..original.clone()
            };
            create(tx, &t, &other, Some("order-1"), "ops")
        })
        .unwrap_err();
        assert!(matches!(err, CircuitError::Conflict(_)), "{err}");
    }

    /// `name`'s id, in a test's store.
    fn id_of(s: &RedbStore, name: &str) -> CircuitId {
        store::read(s, |tx| find(tx, name)).unwrap().id
    }

    /// The retention, on the sweep's clock (`now`): a circuit decommissioned for the retention
    /// or longer moves to the archive, not a moment sooner; circuits in other states stay,
    /// whatever their age (a failed one still holds its VIP and reservation). The archived one
    /// leaves the live table (lists, metrics, admission read it) and name lookups; by id it is
    /// found as archived, saying when; its history says why; a second sweep moves nothing.
    #[test]
    fn a_decommissioned_circuit_is_archived_once_the_retention_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        let day = Duration::from_secs(86_400);
        let retention = 30 * day;
        let names = ["gone", "active", "failed", "leaving"];
        store::transaction(&s, |tx| -> Result<(), CircuitError> {
            for (i, n) in names.iter().enumerate() {
                let prefix = format!("10.{}.0.0/24", i + 1);
                create(tx, &t, &spec(n, &prefix, "100Mbps"), None, "ops")?;
            }
            Ok(())
        })
        .unwrap();
        let [gone, active, failed, leaving] = names.map(|n| id_of(&s, n));
        store::transaction(&s, |tx| -> Result<(), CircuitError> {
            let acked = [gone.clone(), active.clone(), leaving.clone()];
            settle(tx, &t, &acked, &|_| Some(1), &|_, _| true)?;
            let late = [failed.clone()];
            expire(tx, &t, day, &late, &|_| Some(1), &|_, _| false)?;
            delete(tx, gone.as_str(), "ops")?;
            delete(tx, leaving.as_str(), "ops")?;
            settle(
                tx,
                &t,
                std::slice::from_ref(&gone),
                &|_| Some(2),
                &|_, _| true,
            )?;
            Ok(())
        })
        .unwrap();
        let before = store::read(&s, |tx| all(tx)).unwrap();
        let states: Vec<CircuitState> = before.iter().map(|c| c.state).collect();
        use CircuitState::*;
        assert_eq!(states, [Decommissioned, Active, Failed, Decommissioning]);
        let record = before[0].clone();
        let at = record.decommissioned_unix_ms().unwrap();
        let retention_ms = retention.as_millis() as u64;
        let ids: Vec<CircuitId> = before.iter().map(|c| c.id.clone()).collect();
        let sweep = |now: u64| {
            let due = store::read(&s, |tx| due_for_archive(tx, now, retention)).unwrap();
            let moved = store::transaction(&s, |tx| archive(tx, &ids, now, retention)).unwrap();
            assert_eq!(
                due,
                moved
                    .iter()
                    .map(|a| a.circuit.id.clone())
                    .collect::<Vec<_>>()
            );
            moved
        };
        assert_eq!(sweep(at + retention_ms - 1), [], "a moment too young");
        let moved = sweep(at + retention_ms);
        assert_eq!(
            moved,
            [Archived {
                archived_unix_ms: at + retention_ms,
                circuit: record.clone(),
            }]
        );
        assert_eq!(
            sweep(at + 1000 * retention_ms),
            [],
            "none of the others, ever"
        );

        let live = store::read(&s, |tx| all(tx)).unwrap();
        assert_eq!(live, before[1..]);
        let archived = store::read(&s, |tx| all_archived(tx)).unwrap();
        assert_eq!(archived, moved);
        let err = store::read(&s, |tx| find(tx, "gone")).unwrap_err();
        assert!(matches!(err, CircuitError::NotFound(_)), "{err}");
        let err = store::read(&s, |tx| find(tx, gone.as_str())).unwrap_err();
        let when = rfc3339(at + retention_ms);
        assert!(
            matches!(&err, CircuitError::Archived { id, name, archived_unix_ms }
                if *id == gone && name == "gone" && *archived_unix_ms == at + retention_ms),
            "{err}"
        );
        assert!(
            err.to_string().starts_with(&format!(
                "circuit {gone} (gone) was decommissioned and then archived at {when}"
            )),
            "{err}"
        );
        let h = store::read(&s, |tx| history(tx, &gone)).unwrap();
        let last = h.last().unwrap();
        assert_eq!(
            (
                last.action.as_str(),
                last.time_unix_ms,
                last.from,
                last.to,
                last.detail.as_str()
            ),
            (
                "archive",
                at + retention_ms,
                Some(Decommissioned),
                Decommissioned,
                format!(
                    "decommissioned at {}, 30days ago (retention 30days): moved out of the live \
                     circuits",
                    rfc3339(at)
                )
                .as_str()
            )
        );
        // A retention of zero archives at the first sweep.
        assert!(
            !live[0].due_for_archive(at, Duration::ZERO),
            "active: never"
        );
        assert!(record.due_for_archive(at, Duration::ZERO));
    }

    /// A replayed create whose circuit was archived gets that circuit (decommissioned,
    /// `created` false) as before its archiving, and creates nothing: the key stays, with the
    /// request it was used with in the archived record. Another request with the key is still
    /// refused. The circuit's name, VIP and capacity were free since its delete.
    #[test]
    fn a_replayed_create_of_an_archived_circuit_gets_that_circuit_not_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        let original = spec("acme", "10.1.0.0/24", "900Mbps");
        let (c, _) =
            store::transaction(&s, |tx| create(tx, &t, &original, Some("order-1"), "ops")).unwrap();
        store::transaction(&s, |tx| -> Result<(), CircuitError> {
            delete(tx, "acme", "ops")?;
            settle(
                tx,
                &t,
                std::slice::from_ref(&c.id),
                &|_| Some(1),
                &|_, _| true,
            )?;
            Ok(())
        })
        .unwrap();
        let decommissioned = store::read(&s, |tx| find(tx, c.id.as_str())).unwrap();
        let now = decommissioned.updated_unix_ms + 1;
        let ids = [c.id.clone()];
        let moved = store::transaction(&s, |tx| archive(tx, &ids, now, Duration::ZERO)).unwrap();
        assert_eq!(moved.len(), 1);

        let (again, created) =
            store::transaction(&s, |tx| create(tx, &t, &original, Some("order-1"), "ops")).unwrap();
        assert_eq!((again, created), (decommissioned, false));
        assert_eq!(store::read(&s, |tx| all(tx)).unwrap(), []);
        assert_eq!(
            store::read(&s, |tx| CIRCUIT_META.get(tx, "next_id")).unwrap(),
            Some(2)
        );
        let other = CircuitSpec {
            rate: rate("100Mbps"),
            ..original.clone()
        };
        let err = store::transaction(&s, |tx| create(tx, &t, &other, Some("order-1"), "ops"))
            .unwrap_err();
        assert!(
            matches!(&err, CircuitError::Conflict(m) if m.contains("with a different request")),
            "{err}"
        );
        // The same circuit again, under a new key: a new one, on the same VIP and 900Mbps of
        // the same 1Gbps link.
        let (new, created) =
            store::transaction(&s, |tx| create(tx, &t, &original, Some("order-2"), "ops")).unwrap();
        assert!(created);
        assert_eq!((new.id.as_str(), new.vip), ("c-000002", c.vip));
        assert_eq!(new.path, c.path);
    }

    /// Retrying a resize that worked (a timeout, a re-run pipeline) is answered with the
    /// circuit as it is, not refused: also while the first attempt still holds the old rate
    /// (a shrink) or the old path (a move).
    #[test]
    fn retrying_a_resize_returns_the_circuit_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        created(&s, &t, "c1", "10.1.0.0/24", "600Mbps");
        // A second circuit leaves e–s 200Mbps: growing c1 to 900Mbps moves it via t.
        created(&s, &t, "c2", "10.2.0.0/24", "200Mbps");
        for (to, held_path) in [("400Mbps", "e s"), ("900Mbps", "e t s")] {
            let (first, changed) =
                store::transaction(&s, |tx| resize(tx, &t, "c1", rate(to), "ops"))
                    .unwrap_or_else(|e| panic!("resize to {to}: {e}"));
            assert!(changed, "{to}");
            assert!(first.held.is_some(), "{to}: {first:?}");
            assert_eq!(
                first
                    .path
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                held_path
            );
            let retry = store::transaction(&s, |tx| resize(tx, &t, "c1", rate(to), "ops"))
                .unwrap_or_else(|e| panic!("retried resize to {to}: {e}"));
            assert_eq!(retry, (first, false));
            // Let the resize finish before the next one.
            store::transaction(&s, |tx| {
                let ids = awaiting_ack(tx)?;
                settle(tx, &t, &ids, &|_| Some(0), &|_, _| true)
            })
            .unwrap();
        }
    }

    /// A VIP stored in its IPv4-mapped form (from a pool written `::ffff:127.79.0.0/122`
    /// before validation refused it, since rewritten as IPv4) is still in use: a new circuit
    /// gets another address. (The in-use set was compared as written, and the second circuit
    /// got the first one's VIP.)
    #[test]
    fn a_vip_stored_in_its_ipv4_mapped_form_is_not_handed_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        let c1 = created(&s, &t, "c1", "10.1.0.0/24", "1Mbps");
        let Some(IpAddr::V4(v4)) = c1.vip else {
            panic!("{c1:?}");
        };
        // The record as it was stored when the pool was written IPv4-mapped.
        let old = Circuit {
            vip: Some(IpAddr::V6(v4.to_ipv6_mapped())),
            ..c1.clone()
        };
        store::transaction(&s, |tx| save(tx, &old)).unwrap();
        let c2 = created(&s, &t, "c2", "10.2.0.0/24", "1Mbps");
        assert_ne!(c2.vip.map(|ip| ip.to_canonical()), c1.vip, "{c2:?}");
    }

    /// The B-end's `regions` and `sites` are bounded (at most [`MAX_B_END_ENTRIES`] each), ids,
    /// and each named once: a create or a validate refuses anything else as invalid, naming the
    /// field, and records nothing. (Any list was taken, kept twice in the record, and echoed
    /// whole by a refusal.)
    #[test]
    fn a_b_end_with_too_many_invalid_or_repeated_regions_or_sites_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        // Each list holds the region or site the circuit can be placed in ("r", "s").
        let many = |first: &str| {
            std::iter::once(first.to_string())
                .chain((1..=MAX_B_END_ENTRIES).map(|i| format!("{first}{i}")))
                .collect::<Vec<_>>()
        };
        let cases: [(&str, Vec<String>, Vec<String>, String); 6] = [
            (
                "too many regions",
                many("r"),
                vec![],
                format!(
                    "b_end.regions lists {} entries; at most {MAX_B_END_ENTRIES}",
                    MAX_B_END_ENTRIES + 1
                ),
            ),
            (
                "too many sites",
                vec![],
                many("s"),
                format!(
                    "b_end.sites lists {} entries; at most {MAX_B_END_ENTRIES}",
                    MAX_B_END_ENTRIES + 1
                ),
            ),
            (
                "a repeated region",
                vec!["r".into(), "r".into()],
                vec![],
                "b_end.regions lists \"r\" twice".into(),
            ),
            (
                "a repeated site",
                vec![],
                vec!["s".into(), "s".into()],
                "b_end.sites lists \"s\" twice".into(),
            ),
            (
                "an invalid region",
                vec!["r".into(), "R!".into()],
                vec![],
                "b_end.regions: \"R!\" is not a valid id".into(),
            ),
            (
                "a long site",
                vec![],
                vec!["s".into(), "s".repeat(1000)],
                "b_end.sites: an entry of 1000 characters is not a valid id".into(),
            ),
        ];
        for (what, regions, sites, want) in cases {
            let mut sp = spec("acme", "10.1.0.0/24", "1Mbps");
            sp.b_end.regions = regions.iter().map(topology::Region::new).collect();
            sp.b_end.sites = sites.iter().map(NodeId::new).collect();
            let err = admit(&t, &[], &sp).unwrap_err();
            assert!(
                matches!(&err, CircuitError::Invalid(m) if m.starts_with(&want)),
                "{what}: {err}"
            );
            assert!(err.to_string().len() < 400, "{what}: {err}");
            let err = store::transaction(&s, |tx| create(tx, &t, &sp, None, "ops")).unwrap_err();
            assert!(matches!(&err, CircuitError::Invalid(_)), "{what}: {err}");
        }
        assert_eq!(store::read(&s, |tx| all(tx)).unwrap(), []);
        // At most as many as allowed, each once, passes these checks (and is then refused for
        // the first region the topology does not have); the topology's own is fine.
        let mut sp = spec("acme", "10.1.0.0/24", "1Mbps");
        sp.b_end.regions = many("r")[..MAX_B_END_ENTRIES]
            .iter()
            .map(topology::Region::new)
            .collect();
        sp.b_end.sites = vec![NodeId::new("s")];
        let err = admit(&t, &[], &sp).unwrap_err();
        assert!(
            matches!(&err, CircuitError::Invalid(m) if m.starts_with("b_end.regions: unknown region")),
            "{err}"
        );
        sp.b_end.regions = vec![topology::Region::new("r")];
        store::transaction(&s, |tx| create(tx, &t, &sp, None, "ops")).unwrap();
    }

    /// Retrying a resize that worked is answered with the circuit as it is also once the
    /// circuit has failed (its routers did not acknowledge the resize in time): the rate it
    /// already has changes nothing. Another rate is still refused. (The retry was refused as a
    /// resize of a failed circuit.)
    #[test]
    fn retrying_a_resize_of_a_circuit_failed_since_returns_it_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        created(&s, &t, "c1", "10.1.0.0/24", "100Mbps");
        store::transaction(&s, |tx| resize(tx, &t, "c1", rate("200Mbps"), "ops")).unwrap();
        let expired = store::transaction(&s, |tx| {
            let ids = awaiting_ack(tx)?;
            expire(tx, &t, Duration::ZERO, &ids, &|_| Some(1), &|_, _| false)
        })
        .unwrap();
        let failed = store::read(&s, |tx| find(tx, "c1")).unwrap();
        assert_eq!(expired, std::slice::from_ref(&failed));
        assert_eq!(failed.state, CircuitState::Failed);
        let retry = store::transaction(&s, |tx| resize(tx, &t, "c1", rate("200Mbps"), "ops"))
            .unwrap_or_else(|e| panic!("the retried resize: {e}"));
        assert_eq!(retry, (failed, false));
        let err =
            store::transaction(&s, |tx| resize(tx, &t, "c1", rate("300Mbps"), "ops")).unwrap_err();
        assert!(
            matches!(&err, CircuitError::Conflict(m) if m.contains("is failed")),
            "{err}"
        );
    }

    /// A failed circuit that is deleted loses its failure's reason (the history keeps it),
    /// also when its removal is not acknowledged in time. (It showed `decommissioning`, then
    /// `decommissioned`, with the failure's reason, as if its removal had failed.)
    #[test]
    fn a_deleted_failed_circuit_loses_its_failures_reason() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        created(&s, &t, "c1", "10.1.0.0/24", "100Mbps");
        let never = |s: &RedbStore| {
            store::transaction(s, |tx| {
                let ids = awaiting_ack(tx)?;
                expire(tx, &t, Duration::ZERO, &ids, &|_| Some(1), &|_, _| false)
            })
            .unwrap()
        };
        never(&s);
        let failed = store::read(&s, |tx| find(tx, "c1")).unwrap();
        assert_eq!(failed.state, CircuitState::Failed);
        assert!(failed.reason.is_some());
        let (deleted, _) = store::transaction(&s, |tx| delete(tx, "c1", "ops")).unwrap();
        assert_eq!(deleted.state, CircuitState::Decommissioning);
        assert_eq!(deleted.reason, None);
        never(&s);
        let gone = store::read(&s, |tx| find(tx, "c1")).unwrap();
        assert_eq!(gone.state, CircuitState::Decommissioned);
        assert_eq!(gone.reason, None);
        let history = store::read(&s, |tx| history(tx, &gone.id)).unwrap();
        assert!(
            history.iter().any(|h| h.action == "fail"),
            "the failure stays in the history: {history:?}"
        );
    }

    /// A spec naming a region the topology does not have is refused as invalid (422), naming
    /// the field, the region and the topology's regions: a typo is the request's fault, not
    /// the fabric's state. (It was "no eligible site", 409, which a client may retry.) The
    /// edge, service and pool a spec names are ids, refused naming their field, and a long one
    /// is not echoed back. (They went unchecked into messages that quoted them whole.)
    #[test]
    fn a_spec_names_the_topologys_regions_and_ids() {
        let t = topo(true);
        let mut sp = spec("c1", "10.1.0.0/24", "1Mbps");
        sp.b_end.regions = vec![topology::Region::new("au-eats")];
        match admit(&t, &[], &sp) {
            Err(CircuitError::Invalid(m)) => {
                assert!(m.contains("b_end.regions") && m.contains("au-eats"), "{m}");
                assert!(m.contains("the topology's regions: r"), "{m}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        sp.b_end.regions = vec![topology::Region::new("r")];
        admit(&t, &[], &sp).expect("a region of the topology");
        // A prefix with host bits, as the API takes it (the CLI's `--prefix` is checked first).
        sp.a_end.prefix = "10.1.0.7/24".parse().unwrap();
        match admit(&t, &[], &sp) {
            Err(CircuitError::Invalid(m)) => assert!(
                m.starts_with("a_end.prefix: prefix 10.1.0.7/24 has host bits set"),
                "{m}"
            ),
            other => panic!("expected Invalid, got {other:?}"),
        }
        let long = "a".repeat(1 << 20);
        for field in ["a_end.edge", "b_end.service", "pool"] {
            let mut sp = spec("c1", "10.1.0.0/24", "1Mbps");
            match field {
                "a_end.edge" => sp.a_end.edge = NodeId::new(&long),
                "b_end.service" => sp.b_end.service = topology::ServiceName::new(&long),
                _ => sp.pool = Some(long.clone()),
            }
            match admit(&t, &[], &sp) {
                Err(CircuitError::Invalid(m)) => {
                    assert!(m.starts_with(field) && m.len() < 200, "{field}: {m:.300}")
                }
                other => panic!(
                    "{field}: expected Invalid, got {:.300}",
                    format!("{other:?}")
                ),
            }
        }
    }

    /// A name finds the live circuit of that name before a deleted one, and then the newest by
    /// id, whatever the clocks said when they were created. (The newest by creation time won,
    /// and a circuit still decommissioning counted as live.)
    #[test]
    fn a_name_finds_the_live_circuit_then_the_highest_id() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let t = topo(true);
        let c1 = created(&s, &t, "acme", "10.1.0.0/24", "1Mbps");
        store::transaction(&s, |tx| delete(tx, "acme", "ops")).unwrap();
        let c2 = created(&s, &t, "acme", "10.1.0.0/24", "1Mbps");
        // The controller's clock went back between the two creates.
        let skewed = Circuit {
            created_unix_ms: c1.created_unix_ms - 60_000,
            ..c2.clone()
        };
        store::transaction(&s, |tx| save(tx, &skewed)).unwrap();
        assert_eq!(store::read(&s, |tx| find(tx, "acme")).unwrap().id, c2.id);
        // Both deleted: the newer one.
        store::transaction(&s, |tx| delete(tx, c2.id.as_str(), "ops")).unwrap();
        assert_eq!(store::read(&s, |tx| find(tx, "acme")).unwrap().id, c2.id);
    }
}
