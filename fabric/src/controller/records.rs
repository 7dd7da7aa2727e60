//! The controller's records in the [`Store`](crate::store::Store): topology versions (the
//! operator's YAML text, comments and all) and a small metadata record per version (what
//! history lists), node identities, routers' applied versions and the audit log. Each function
//! that changes records takes a [`WriteTxn`] so that callers (the admin API, circuits) compose
//! them into one atomic transaction.

use std::ops::Bound;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
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

/// What history lists of one version, without its text: a version's text can be megabytes (a
/// 10,000-node topology is ~6 MB of YAML), so listing thousands of versions must not read them.
/// Written in the same transaction as the version ([`commit_topology`]); for versions stored by
/// builds before this record, once when the controller opens its store ([`backfill_meta`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMeta {
    pub version: u64,
    /// At most [`MAX_META_FIELD`] bytes of the version's author (the version keeps it whole).
    pub author: String,
    pub time_unix_ms: u64,
    /// At most [`MAX_META_FIELD`] bytes of the version's message (the version keeps it whole).
    pub message: String,
    pub origin: Origin,
    /// Size of the text in bytes.
    pub bytes: u64,
    /// SHA-256 of the text, lower-case hex: equal for versions with the same text (a rollback
    /// and its target; an apply that changed nothing but the message), without reading them.
    pub sha256: String,
}

/// How much of a version's author and message its [`VersionMeta`] keeps, and of the operator's
/// free text an [`AuditEntry`] or a circuit's records keep: the admin API takes it free-form
/// within its body limit (tens of MB), and history lists up to 10,000 rows.
pub const MAX_META_FIELD: usize = 1024;

/// `s` cut to at most `max` bytes at a character boundary, marked with `…` when cut.
pub fn clipped(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    format!("{}…", &s[..s.floor_char_boundary(max)])
}

/// SHA-256 of `text`, lower-case hex.
pub fn text_sha256(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl VersionMeta {
    pub fn of(v: &TopologyVersion) -> VersionMeta {
        VersionMeta {
            version: v.version,
            author: clipped(&v.author, MAX_META_FIELD),
            time_unix_ms: v.time_unix_ms,
            message: clipped(&v.message, MAX_META_FIELD),
            origin: v.origin.clone(),
            bytes: v.text.len() as u64,
            sha256: text_sha256(&v.text),
        }
    }
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

/// One line of the audit log. Its actor and detail carry the operator's free text (an author, an
/// apply's message): [`audit`] keeps at most [`MAX_META_FIELD`] bytes of each, so that one apply
/// with a message of megabytes does not make an entry of megabytes that every reader of the log
/// reads back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub time_unix_ms: u64,
    pub actor: String,
    pub action: String,
    pub detail: String,
}

pub const TOPOLOGY_VERSIONS: Table<TopologyVersion> = Table::new("topology_versions");
/// One [`VersionMeta`] per topology version, under the same key as the version.
pub const TOPOLOGY_VERSION_META: Table<VersionMeta> = Table::new("topology_version_meta");
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

/// The topology version in force, if any was ever applied. A pointer to a version the store
/// does not hold is corrupt: read as no version, a controller started with `--topology` would
/// import the file again on top of the history.
pub fn current(tx: &dyn ReadTxn) -> Result<Option<TopologyVersion>, StoreError> {
    let Some(v) = META.get(tx, CURRENT)? else {
        return Ok(None);
    };
    match TOPOLOGY_VERSIONS.get(tx, &seq_key(v))? {
        Some(rec) => Ok(Some(rec)),
        None => Err(StoreError::Corrupt {
            table: META.name,
            key: CURRENT.to_string(),
            reason: format!("it names topology version {v}, which the store does not hold"),
        }),
    }
}

/// The number of the topology version in force, without reading its text.
pub fn current_version(tx: &dyn ReadTxn) -> Result<Option<u64>, StoreError> {
    META.get(tx, CURRENT)
}

pub fn version(tx: &dyn ReadTxn, v: u64) -> Result<Option<TopologyVersion>, StoreError> {
    TOPOLOGY_VERSIONS.get(tx, &seq_key(v))
}

/// Newest first, at most `limit`: the versions' metadata only, never their texts.
pub fn history(tx: &dyn ReadTxn, limit: usize) -> Result<Vec<VersionMeta>, StoreError> {
    history_before(tx, limit, None)
}

/// [`history`] of the versions older than `before` (all with `None`): the next page of a
/// history longer than one request lists.
pub fn history_before(
    tx: &dyn ReadTxn,
    limit: usize,
    before: Option<u64>,
) -> Result<Vec<VersionMeta>, StoreError> {
    let key = before.map(seq_key);
    let end = key.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
    Ok(TOPOLOGY_VERSION_META
        .scan(tx, (Bound::Unbounded, end), limit, true)?
        .into_iter()
        .map(|(_, m)| m)
        .collect())
}

/// Writes the [`VersionMeta`] of every version stored without one (by a build before the
/// metadata table) and returns how many it wrote; 0 when there are none, so running it at every
/// start is cheap: one metadata record and one empty range are read.
///
/// Those versions are the ones newer than the newest metadata record: versions are numbered
/// in order and never deleted, an earlier build only appends versions without metadata, and
/// this build writes metadata with every version and runs this at every start before it
/// commits any. Versions are read one at a time, so at most one text is held at once.
pub fn backfill_meta(tx: &mut dyn WriteTxn) -> Result<usize, StoreError> {
    let mut after = TOPOLOGY_VERSION_META.last(tx)?.map(|(key, _)| key);
    let mut written = 0;
    loop {
        let from = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let Some((key, v)) = TOPOLOGY_VERSIONS
            .scan(tx, (from, Bound::Unbounded), 1, false)?
            .pop()
        else {
            return Ok(written);
        };
        TOPOLOGY_VERSION_META.put(tx, &key, &VersionMeta::of(&v))?;
        written += 1;
        after = Some(key);
    }
}

/// Records `text` (already validated into `topology`) as the next topology version with its
/// [`VersionMeta`], makes it current, updates node identities and appends to the audit log, all
/// in `tx`.
pub fn commit_topology(
    tx: &mut dyn WriteTxn,
    text: &str,
    topology: &Topology,
    author: &str,
    message: &str,
    origin: Origin,
) -> Result<TopologyVersion, StoreError> {
    let prev = META.get(tx, CURRENT)?.unwrap_or(0);
    // From the newest version's key (`seq_key(version)`), not its record: decoding that would
    // read its whole text, megabytes for a large topology, at every apply. The versions' table,
    // not the metadata table, is the authority: it is the one every build has written.
    let latest = TOPOLOGY_VERSIONS.last_seq(tx)?.unwrap_or(0).max(prev);
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
    TOPOLOGY_VERSION_META.put(tx, &seq_key(version), &VersionMeta::of(&rec))?;
    META.put(tx, CURRENT, &version)?;
    // The new topology's ids, once: `Topology::node` is a linear search, and the nodes ever
    // stored (removed ones stay) times the topology's made an apply of a 50,000-node fabric
    // seconds long inside the store's one write transaction.
    let present: std::collections::HashSet<&str> =
        topology.nodes.iter().map(|n| n.id.as_str()).collect();
    for (id, mut ident) in NODES.all(tx)? {
        if ident.in_version != 0 && !present.contains(id.as_str()) {
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
    // The version keeps the whole message; the audit log a clip of it (`audit` clips the
    // detail whole again, this spares formatting a copy of megabytes first).
    let detail = format!("version {version}: {}", clipped(message, MAX_META_FIELD));
    audit(tx, author, action, &detail)?;
    Ok(rec)
}

/// Appends one entry to the audit log (in the caller's transaction), with at most
/// [`MAX_META_FIELD`] bytes of `actor` and of `detail`: every writer (topology changes,
/// circuits) hands it the operator's free text. Its number comes from the newest entry's key,
/// so that entry is not read (one an earlier build stored unclipped may be megabytes).
pub fn audit(
    tx: &mut dyn WriteTxn,
    actor: &str,
    action: &str,
    detail: &str,
) -> Result<(), StoreError> {
    let seq = AUDIT.last_seq(tx)?.unwrap_or(0) + 1;
    AUDIT.put(
        tx,
        &seq_key(seq),
        &AuditEntry {
            seq,
            time_unix_ms: now_unix_ms(),
            actor: clipped(actor, MAX_META_FIELD),
            action: action.to_string(),
            detail: clipped(detail, MAX_META_FIELD),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb::RedbStore;
    use crate::store::{self, Store};

    /// An edge and a site `latency` apart, with `pad` bytes of comment (a bigger text).
    fn yaml(latency: &str, pad: usize) -> String {
        format!(
            "# {}\nversion: 1\nnodes:\n  \
             - {{id: e, kind: edge, region: r, country: AU, location: {{lat: 0, lon: 0}}, \
             address: \"127.0.0.1:7000\", client_address: \"127.0.0.1\"}}\n  \
             - {{id: s, kind: site, region: r, country: AU, location: {{lat: 0, lon: 0}}, \
             address: \"127.0.0.2:7000\", serves: [{{service: chat, backend: \"127.0.0.9:9000\", capacity: 10}}]}}\n\
             links:\n  - {{a: e, b: s, latency: {latency}, capacity: 1Gbps}}\n\
             services:\n  - {{name: chat, port: 8080}}\n",
            "x".repeat(pad)
        )
    }

    fn commit(
        s: &dyn Store,
        text: &str,
        message: &str,
        origin: Origin,
    ) -> Result<TopologyVersion, StoreError> {
        let (topo, _) = crate::controller::validate(text).unwrap();
        store::transaction(s, |tx| {
            commit_topology(tx, text, &topo, "ops", message, origin)
        })
    }

    /// A read view on which the values of `table` cannot be read, only its keys (the versions'
    /// texts, or audit entries as an earlier build may have stored them: megabytes).
    struct Blind<'a> {
        tx: &'a dyn ReadTxn,
        table: &'static str,
    }

    impl ReadTxn for Blind<'_> {
        fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            if table == self.table {
                return Err(StoreError::Backend(format!("read {table} entry {key}")));
            }
            self.tx.get(table, key)
        }
        fn scan(
            &self,
            table: &'static str,
            range: (Bound<&str>, Bound<&str>),
            limit: usize,
            reverse: bool,
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            if table == self.table {
                return Err(StoreError::Backend(format!("scanned {table}")));
            }
            self.tx.scan(table, range, limit, reverse)
        }
        fn last_key(&self, table: &'static str) -> Result<Option<String>, StoreError> {
            self.tx.last_key(table)
        }
    }

    /// A write transaction whose reads go through [`Blind`].
    struct BlindWrite<'a> {
        tx: &'a mut dyn WriteTxn,
        table: &'static str,
    }

    impl BlindWrite<'_> {
        fn view(&self) -> Blind<'_> {
            Blind {
                tx: &*self.tx,
                table: self.table,
            }
        }
    }

    impl ReadTxn for BlindWrite<'_> {
        fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.view().get(table, key)
        }
        fn scan(
            &self,
            table: &'static str,
            range: (Bound<&str>, Bound<&str>),
            limit: usize,
            reverse: bool,
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.view().scan(table, range, limit, reverse)
        }
        fn last_key(&self, table: &'static str) -> Result<Option<String>, StoreError> {
            self.view().last_key(table)
        }
    }

    impl WriteTxn for BlindWrite<'_> {
        fn put(&mut self, table: &'static str, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.tx.put(table, key, value)
        }
        fn delete(&mut self, table: &'static str, key: &str) -> Result<bool, StoreError> {
            self.tx.delete(table, key)
        }
    }

    /// Every way a version is made (import, apply, rollback) writes its metadata in the same
    /// transaction: size and hash of its text, author, message (clipped), origin. An aborted
    /// transaction writes neither the version nor its metadata.
    /// A store whose pointer to the version in force names a version it does not hold (a hand
    /// edit, or damage whose checksums hold) is refused as corrupt, naming the pointer: it read
    /// as a store with no topology, and a controller started with `--topology` imported the
    /// file again as a new version on top of the history.
    #[test]
    fn a_pointer_to_a_missing_version_is_corrupt_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        for m in ["one", "two", "three"] {
            commit(&s, &yaml("1ms", 0), m, Origin::Apply).unwrap();
        }
        store::transaction(&s, |tx| META.put(tx, CURRENT, &7)).unwrap();
        let e = store::read(&s, |tx| current(tx)).unwrap_err();
        assert!(
            matches!(&e, StoreError::Corrupt { table: "meta", key, .. } if key == CURRENT),
            "{e:?}"
        );
        assert!(e.to_string().contains("version 7"), "{e}");
    }
    #[test]
    fn each_committed_version_has_its_metadata_and_an_aborted_one_neither() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let (t1, t2) = (yaml("1ms", 10), yaml("2ms", 5000));
        let long = "é".repeat(MAX_META_FIELD);
        commit(&s, &t1, "imported", Origin::Import { file: "f".into() }).unwrap();
        commit(&s, &t2, &long, Origin::Apply).unwrap();
        commit(&s, &t1, "back", Origin::Rollback { to: 1 }).unwrap();
        let aborted: Result<(), StoreError> = store::transaction(&s, |tx| {
            let (topo, _) = crate::controller::validate(&t2).unwrap();
            commit_topology(tx, &t2, &topo, "ops", "never", Origin::Apply)?;
            Err(StoreError::Aborted)
        });
        assert!(aborted.is_err());

        let rows = store::read(&s, |tx| history(tx, 100)).unwrap();
        let got: Vec<_> = rows
            .iter()
            .map(|m| (m.version, m.bytes, m.origin.clone(), m.author.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (3, t1.len() as u64, Origin::Rollback { to: 1 }, "ops"),
                (2, t2.len() as u64, Origin::Apply, "ops"),
                (
                    1,
                    t1.len() as u64,
                    Origin::Import { file: "f".into() },
                    "ops"
                ),
            ]
        );
        assert_eq!(
            rows[0].sha256, rows[2].sha256,
            "a rollback has its target's text"
        );
        assert_eq!(rows[1].sha256, text_sha256(&t2));
        assert_ne!(rows[1].sha256, rows[2].sha256);
        assert_eq!(rows[1].sha256.len(), 64);
        assert_eq!(
            rows[1].message,
            format!("{}…", "é".repeat(MAX_META_FIELD / 2)),
            "clipped at a character boundary"
        );
        let v2 = store::read(&s, |tx| version(tx, 2)).unwrap().unwrap();
        assert_eq!(v2.message, long, "the version keeps the whole message");
        assert_eq!(rows[2].message, "imported");
    }

    /// History reads only the metadata: it answers on a view where reading any version's text
    /// fails.
    #[test]
    fn history_reads_no_version_text() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        for i in 1..=5 {
            commit(&s, &yaml(&format!("{i}ms"), i * 100), "", Origin::Apply).unwrap();
        }
        let rows = store::read(&s, |tx| {
            history(
                &Blind {
                    tx,
                    table: TOPOLOGY_VERSIONS.name,
                },
                3,
            )
        })
        .unwrap();
        let versions: Vec<u64> = rows.iter().map(|m| m.version).collect();
        assert_eq!(versions, vec![5, 4, 3]);
        assert_eq!(rows[0].bytes, yaml("5ms", 500).len() as u64);
    }

    /// A history longer than one request lists is read page by page: the versions older than
    /// the oldest listed. (Only the newest 10,000 could be listed.)
    #[test]
    fn history_pages_go_back_to_the_first_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        for i in 1..=12 {
            commit(&s, &yaml(&format!("{i}ms"), i * 100), "", Origin::Apply).unwrap();
        }
        let page = |before: Option<u64>| -> Vec<u64> {
            store::read(&s, |tx| history_before(tx, 5, before))
                .unwrap()
                .iter()
                .map(|m| m.version)
                .collect()
        };
        assert_eq!(page(None), vec![12, 11, 10, 9, 8]);
        assert_eq!(page(Some(8)), vec![7, 6, 5, 4, 3]);
        assert_eq!(page(Some(3)), vec![2, 1]);
        assert_eq!(page(Some(1)), Vec::<u64>::new());
        // Past the newest: from the newest.
        assert_eq!(page(Some(100)), vec![12, 11, 10, 9, 8]);
    }

    /// Committing a version reads no version's text (the newest one's would be megabytes for a
    /// large topology, at every apply, under the apply lock): its number comes from the newest
    /// version's key. Versions stay numbered in order, rollbacks included.
    #[test]
    fn commit_reads_no_version_text() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let commit_blind = |text: &str, origin: Origin| {
            let (topo, _) = crate::controller::validate(text).unwrap();
            store::transaction(&s, |tx| {
                commit_topology(
                    &mut BlindWrite {
                        tx,
                        table: TOPOLOGY_VERSIONS.name,
                    },
                    text,
                    &topo,
                    "ops",
                    "",
                    origin.clone(),
                )
            })
        };
        let first = commit_blind(&yaml("1ms", 10), Origin::Import { file: "f".into() });
        assert_eq!(first.unwrap().version, 1);
        for i in 2..=4 {
            let v = commit_blind(&yaml(&format!("{i}ms"), 100_000), Origin::Apply).unwrap();
            assert_eq!(v.version, i as u64);
        }
        let back = commit_blind(&yaml("1ms", 10), Origin::Rollback { to: 1 }).unwrap();
        assert_eq!(back.version, 5);
        let listed: Vec<u64> = store::read(&s, |tx| history(tx, 10))
            .unwrap()
            .iter()
            .map(|m| m.version)
            .collect();
        assert_eq!(listed, vec![5, 4, 3, 2, 1]);
        let current = store::read(&s, |tx| current(tx)).unwrap().unwrap();
        assert_eq!((current.version, current.text), (5, yaml("1ms", 10)));
    }

    /// An audit entry keeps at most `MAX_META_FIELD` bytes (and the cut mark) of the operator's
    /// free text, whoever writes it; the version keeps its whole message. Entries are numbered
    /// on from the newest one's key, which is not read (an earlier build's may be megabytes).
    #[test]
    fn audit_entries_keep_a_clip_of_the_operators_text() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let long = "é".repeat(1 << 20);
        let text = yaml("1ms", 10);
        let (topo, _) = crate::controller::validate(&text).unwrap();
        store::transaction(&s, |tx| {
            commit_topology(tx, &text, &topo, &long, &long, Origin::Apply)?;
            audit(tx, &long, "circuit.create", &long)
        })
        .unwrap();
        let entries: Vec<AuditEntry> = store::read(&s, |tx| AUDIT.all(tx))
            .unwrap()
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        assert_eq!(entries.len(), 2);
        let bound = MAX_META_FIELD + '…'.len_utf8();
        for e in &entries {
            assert!(e.actor.len() <= bound, "actor of {} bytes", e.actor.len());
            assert!(
                e.detail.len() <= bound,
                "detail of {} bytes",
                e.detail.len()
            );
            assert!(e.actor.ends_with('…') && e.detail.ends_with('…'));
        }
        assert!(entries[0].detail.starts_with("version 1: éé"));
        assert_eq!((entries[0].seq, entries[1].seq), (1, 2));
        let v1 = store::read(&s, |tx| version(tx, 1)).unwrap().unwrap();
        assert_eq!(v1.message, long, "the version keeps the whole message");
        // An entry too big to read (as if stored by an earlier build) is not read.
        let next = store::transaction(&s, |tx| {
            audit(
                &mut BlindWrite {
                    tx,
                    table: AUDIT.name,
                },
                "ops",
                "topology.apply",
                "short",
            )?;
            AUDIT.last_seq(tx)
        })
        .unwrap();
        assert_eq!(next, Some(3));
    }

    /// Versions an earlier build stored (no metadata) get theirs once; a second run writes
    /// nothing; versions such a build appended after this one's are found too (a downgrade and
    /// back).
    #[test]
    fn backfill_writes_the_missing_metadata_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        // The earlier build's records: versions and the current pointer only.
        let old = |versions: std::ops::RangeInclusive<u64>| {
            store::transaction(&s, |tx| -> Result<(), StoreError> {
                for v in versions.clone() {
                    let rec = TopologyVersion {
                        version: v,
                        text: yaml("1ms", v as usize * 10),
                        author: format!("a{v}"),
                        time_unix_ms: v,
                        message: format!("m{v}"),
                        origin: Origin::Apply,
                    };
                    TOPOLOGY_VERSIONS.put(tx, &seq_key(v), &rec)?;
                    META.put(tx, CURRENT, &v)?;
                }
                Ok(())
            })
            .unwrap()
        };
        let backfill = || store::transaction(&s, |tx| backfill_meta(tx)).unwrap();
        let listed = || {
            store::read(&s, |tx| history(tx, 100))
                .unwrap()
                .into_iter()
                .map(|m| (m.version, m.bytes, m.author, m.message))
                .collect::<Vec<_>>()
        };
        let expected = |n: u64| {
            (1..=n)
                .rev()
                .map(|v| {
                    let bytes = yaml("1ms", v as usize * 10).len() as u64;
                    (v, bytes, format!("a{v}"), format!("m{v}"))
                })
                .collect::<Vec<_>>()
        };
        old(1..=3);
        assert!(listed().is_empty());
        assert_eq!(backfill(), 3);
        assert_eq!(listed(), expected(3));
        assert_eq!(backfill(), 0, "idempotent");
        assert_eq!(listed(), expected(3));
        // This build applies one, an earlier build two more, then this build starts again.
        let v4 = commit(&s, &yaml("1ms", 40), "m4", Origin::Apply).unwrap();
        assert_eq!(v4.version, 4);
        old(5..=6);
        assert_eq!(backfill(), 2);
        let rows = listed();
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[..2], expected(6)[..2]);
        assert_eq!(rows[2].0, 4);
        assert_eq!(backfill(), 0);
    }
}
