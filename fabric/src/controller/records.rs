//! The controller's records in the [`Store`](crate::store::Store): topology versions (the
//! operator's YAML text, comments and all), node identities, routers' applied versions and the
//! audit log. Each function that changes records takes a [`WriteTxn`] so that callers (the
//! admin API, circuits) compose them into one atomic transaction.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use topology::{NodeId, NodeKind, Topology};

use crate::store::{ReadTxn, StoreError, Table, WriteTxn, seq_key};

/// One applied topology, as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopologyVersion {
    pub version: u64,
    /// The YAML exactly as submitted: comments, order and formatting intact.
    pub text: String,
    pub author: String,
    pub time_unix_ms: u64,
    pub message: String,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Origin {
    /// First start: imported from `--topology FILE`.
    Import {
        file: String,
    },
    Apply,
    Rollback {
        to: u64,
    },
}

/// A node the controller knows (from any applied topology). Its certificate name is its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub id: NodeId,
    pub kind: NodeKind,
    pub first_version: u64,
    /// The latest topology version that still contains the node (0: removed).
    pub in_version: u64,
}

/// What a router last told the controller.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RouterRecord {
    pub node: String,
    /// Last snapshot version the router acknowledged, and its topology version.
    pub applied_version: u64,
    pub applied_topology: u64,
    pub last_seen_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<Nack>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nack {
    pub version: u64,
    pub topology_version: u64,
    pub reason: String,
    pub time_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub time_unix_ms: u64,
    pub actor: String,
    pub action: String,
    pub detail: String,
}

pub const TOPOLOGY_VERSIONS: Table<TopologyVersion> = Table::new("topology_versions");
pub const NODES: Table<NodeIdentity> = Table::new("nodes");
pub const ROUTERS: Table<RouterRecord> = Table::new("routers");
pub const AUDIT: Table<AuditEntry> = Table::new("audit");
/// Single values: `current_topology`, `epoch`.
pub const META: Table<u64> = Table::new("meta");

const CURRENT: &str = "current_topology";
const EPOCH: &str = "epoch";

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The topology version in force, if any was ever applied.
pub fn current(tx: &dyn ReadTxn) -> Result<Option<TopologyVersion>, StoreError> {
    match META.get(tx, CURRENT)? {
        Some(v) => TOPOLOGY_VERSIONS.get(tx, &seq_key(v)),
        None => Ok(None),
    }
}

pub fn version(tx: &dyn ReadTxn, v: u64) -> Result<Option<TopologyVersion>, StoreError> {
    TOPOLOGY_VERSIONS.get(tx, &seq_key(v))
}

/// Newest first, at most `limit`.
pub fn history(tx: &dyn ReadTxn, limit: usize) -> Result<Vec<TopologyVersion>, StoreError> {
    Ok(TOPOLOGY_VERSIONS
        .scan(tx, std::ops::Bound::Unbounded, limit, true)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// Records `text` (already validated into `topology`) as the next topology version, makes it
/// current, updates node identities and appends to the audit log, all in `tx`.
pub fn commit_topology(
    tx: &mut dyn WriteTxn,
    text: &str,
    topology: &Topology,
    author: &str,
    message: &str,
    origin: Origin,
) -> Result<TopologyVersion, StoreError> {
    let prev = META.get(tx, CURRENT)?.unwrap_or(0);
    let latest = TOPOLOGY_VERSIONS
        .last(tx)?
        .map(|(_, v)| v.version)
        .unwrap_or(0)
        .max(prev);
    let version = latest + 1;
    let rec = TopologyVersion {
        version,
        text: text.to_string(),
        author: author.to_string(),
        time_unix_ms: now_unix_ms(),
        message: message.to_string(),
        origin: origin.clone(),
    };
    TOPOLOGY_VERSIONS.put(tx, &seq_key(version), &rec)?;
    META.put(tx, CURRENT, &version)?;
    for (id, mut ident) in NODES.all(tx)? {
        if topology.node(&id).is_none() && ident.in_version != 0 {
            ident.in_version = 0;
            NODES.put(tx, &id, &ident)?;
        }
    }
    for n in &topology.nodes {
        let ident = match NODES.get(tx, n.id.as_str())? {
            Some(mut i) => {
                i.kind = n.kind;
                i.in_version = version;
                i
            }
            None => NodeIdentity {
                id: n.id.clone(),
                kind: n.kind,
                first_version: version,
                in_version: version,
            },
        };
        NODES.put(tx, n.id.as_str(), &ident)?;
    }
    let action = match &origin {
        Origin::Import { .. } => "topology.import",
        Origin::Apply => "topology.apply",
        Origin::Rollback { .. } => "topology.rollback",
    };
    audit(tx, author, action, &format!("version {version}: {message}"))?;
    Ok(rec)
}

/// Appends one entry to the audit log (in the caller's transaction).
pub fn audit(
    tx: &mut dyn WriteTxn,
    actor: &str,
    action: &str,
    detail: &str,
) -> Result<(), StoreError> {
    let seq = AUDIT.last(tx)?.map(|(_, e)| e.seq).unwrap_or(0) + 1;
    AUDIT.put(
        tx,
        &seq_key(seq),
        &AuditEntry {
            seq,
            time_unix_ms: now_unix_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            detail: detail.to_string(),
        },
    )
}

/// Bumps and returns the controller's start epoch: snapshot versions are `epoch << 32 | n`,
/// so they only grow across restarts without an fsync per telemetry recomputation.
pub fn next_epoch(tx: &mut dyn WriteTxn) -> Result<u64, StoreError> {
    let e = META.get(tx, EPOCH)?.unwrap_or(0) + 1;
    META.put(tx, EPOCH, &e)?;
    Ok(e)
}
