//! The control protocol between a router and the controller: length-prefixed JSON frames on one
//! bidirectional QUIC stream of a mutual-TLS connection that the router opens.
//!
//! ```text
//! router                                   controller
//!   Hello{node, have_version}  ───────────▶
//!                              ◀─────────── Snapshot{version, topology_version, topology, live}   (full)
//!   Ack{version} | Nack{version, reason} ─▶
//!                              ◀─────────── Live{version, base_version, live}   (delta: topology unchanged)
//!   Resync{have_version}       ───────────▶   (delta did not apply, or a rejection's reason
//!                                               passed: send a full snapshot)
//!   Telemetry(report)          ───────────▶   (every second)
//!                              ◀─────────── Heartbeat{version}   (refreshes the router's staleness clock)
//!   Renew{public_key}          ───────────▶   (the router's certificate is due for renewal)
//!                              ◀─────────── Certificate{chain_pem} | RenewRefused{reason}
//!                              ◀─────────── Crl{pem}   (at connect and on change; hello said crl)
//! ```
//!
//! Each frame is a 4-byte big-endian length and that many bytes of JSON. A reader refuses a
//! frame over its limit ([`MAX_TO_ROUTER`], [`MAX_FROM_ROUTER`]) before reading it, and
//! [`decode`] holds a few times a frame's size at most while it decodes it ([`Message`]). The
//! controller encodes each version once ([`encode`]) and writes the same `Bytes` to every
//! router (go-control-plane #238: per-connection serialisation dominates at scale).

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use topology::circuit::ProvisionedCircuit;
use topology::route::LiveState;
use topology::{Link, LinkId, Node, NodeId, Pool, Service, Topology};

use crate::telemetry::TelemetryReport;

/// Largest frame the controller sends: a full snapshot of a large fabric.
pub const MAX_TO_ROUTER: usize = 64 << 20;
/// Largest frame a router sends (a telemetry report of a router with many neighbours).
pub const MAX_FROM_ROUTER: usize = 1 << 20;

/// Longest part of the peer's free text either end keeps, logs or closes with (a refusal's or
/// a rejection's reason, a hello's node name): each is the peer's word, up to a whole frame of
/// it. See [`clip`].
pub const MAX_REASON: usize = 256;

/// Written as JSON objects with a `type` field naming the variant (serde's internally tagged
/// form); read by [`decode`], variant by variant ([`Message`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToRouter {
    /// A full snapshot: the first version a connection carries (revocation lists and heartbeats
    /// may come before it while no version the controller published carries its stored
    /// circuits yet).
    Snapshot {
        version: u64,
        topology_version: u64,
        topology: Arc<Topology>,
        live: LiveState,
        /// Provisioned circuits (a change of circuits is always sent in full).
        #[serde(default)]
        circuits: Arc<Vec<ProvisionedCircuit>>,
    },
    /// Only the live state changed since `base_version`: apply it on top of that version's
    /// topology and circuits.
    Live {
        version: u64,
        base_version: u64,
        topology_version: u64,
        live: LiveState,
    },
    /// The topology changed since `base_version` by `changes` (nodes and links by id; services
    /// and pools whole); apply them to that version's topology, keep its circuits, take `live`.
    /// The controller sends it only when applying `changes` to the base gives exactly the new
    /// topology, else a full snapshot.
    Delta {
        version: u64,
        base_version: u64,
        topology_version: u64,
        changes: TopologyDelta,
        live: LiveState,
    },
    /// Sent when nothing changed for a while; the router's staleness clock restarts.
    Heartbeat { version: u64 },
    /// The controller refuses this router (unknown node, name mismatch); it closes after this.
    Refused { reason: String },
    /// The answer to a `Renew`: a certificate for the session's node over the key sent, the
    /// chain in PEM (the leaf, then the CA).
    Certificate { chain_pem: String },
    /// The answer to a `Renew` the controller will not serve (no CA, too soon, bad key); the
    /// session goes on.
    RenewRefused { reason: String },
    /// The revocation lists of the controller's CA directory (`ca.crl.pem`, PEM), sent after
    /// the first snapshot and whenever they change, to routers whose hello says they take it.
    /// The router adopts them as it would the file ([`crate::tls::install_crl`]: checked against
    /// its own bundle, no rollback) and writes them to its TLS directory.
    Crl { pem: String },
}

/// A topology change by element: what an apply of a few lines costs on the wire, instead of the
/// whole topology to every router.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TopologyDelta {
    pub nodes_upsert: Vec<Node>,
    pub nodes_remove: Vec<NodeId>,
    pub links_upsert: Vec<Link>,
    pub links_remove: Vec<LinkId>,
    pub services: Vec<Service>,
    pub pools: Vec<Pool>,
}

impl TopologyDelta {
    pub fn between(old: &Topology, new: &Topology) -> TopologyDelta {
        use std::collections::BTreeMap;
        let on: BTreeMap<&NodeId, &Node> = old.nodes.iter().map(|n| (&n.id, n)).collect();
        let nn: BTreeMap<&NodeId, &Node> = new.nodes.iter().map(|n| (&n.id, n)).collect();
        let ol: BTreeMap<LinkId, &Link> = old.links.iter().map(|l| (l.id(), l)).collect();
        let nl: BTreeMap<LinkId, &Link> = new.links.iter().map(|l| (l.id(), l)).collect();
        TopologyDelta {
            nodes_upsert: new
                .nodes
                .iter()
                .filter(|n| on.get(&n.id) != Some(n))
                .cloned()
                .collect(),
            nodes_remove: old
                .nodes
                .iter()
                .filter(|n| !nn.contains_key(&n.id))
                .map(|n| n.id.clone())
                .collect(),
            links_upsert: new
                .links
                .iter()
                .filter(|l| ol.get(&l.id()) != Some(l))
                .cloned()
                .collect(),
            links_remove: old
                .links
                .iter()
                .map(|l| l.id())
                .filter(|id| !nl.contains_key(id))
                .collect(),
            services: new.services.clone(),
            pools: new.pools.clone(),
        }
    }

    /// Whether applying it to `base` gives `base` again without looking further: no element
    /// upserted or removed, and `base`'s services and pools.
    pub fn changes_nothing_in(&self, base: &Topology) -> bool {
        self.nodes_upsert.is_empty()
            && self.nodes_remove.is_empty()
            && self.links_upsert.is_empty()
            && self.links_remove.is_empty()
            && self.services == base.services
            && self.pools == base.pools
    }

    /// `base` with these changes: changed elements in place (the first of an id, if the base has
    /// it twice), new ones appended. Elements are looked up by id through a map, so the cost is
    /// the sizes' sum, not their product: a router applies a delta on its control task (the
    /// controller under its lock), where scanning for each element took over 20 s for 100,000
    /// new links (a frame of under 10 MiB; a frame may be 64 MiB), the time growing with the
    /// square of the size.
    pub fn apply(&self, base: &Topology) -> Topology {
        use std::collections::{HashMap, HashSet};
        let mut t = base.clone();
        let removed: HashSet<&NodeId> = self.nodes_remove.iter().collect();
        t.nodes.retain(|n| !removed.contains(&n.id));
        let mut at: HashMap<NodeId, usize> = HashMap::with_capacity(t.nodes.len());
        for (i, n) in t.nodes.iter().enumerate() {
            at.entry(n.id.clone()).or_insert(i);
        }
        for n in &self.nodes_upsert {
            match at.get(&n.id) {
                Some(&i) => t.nodes[i] = n.clone(),
                None => {
                    at.insert(n.id.clone(), t.nodes.len());
                    t.nodes.push(n.clone());
                }
            }
        }
        let removed: HashSet<&LinkId> = self.links_remove.iter().collect();
        t.links.retain(|l| !removed.contains(&l.id()));
        let mut at: HashMap<LinkId, usize> = HashMap::with_capacity(t.links.len());
        for (i, l) in t.links.iter().enumerate() {
            at.entry(l.id()).or_insert(i);
        }
        for l in &self.links_upsert {
            match at.get(&l.id()) {
                Some(&i) => t.links[i] = l.clone(),
                None => {
                    at.insert(l.id(), t.links.len());
                    t.links.push(l.clone());
                }
            }
        }
        t.services = self.services.clone();
        t.pools = self.pools.clone();
        t
    }
}

/// Written and read as [`ToRouter`] is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromRouter {
    /// First message: who the router is and which snapshot version it already has (from disk).
    Hello {
        node: String,
        have_version: Option<u64>,
        /// The router takes [`ToRouter::Crl`] (a controller sends it only then, so routers from
        /// before it keep their sessions).
        #[serde(default)]
        crl: bool,
    },
    Ack {
        version: u64,
    },
    /// The router rejected `version` and keeps its previous snapshot. The controller records
    /// it and offers that version to this router again only after a back-off (or at a
    /// `Resync`).
    Nack {
        version: u64,
        reason: String,
    },
    /// Send the current version in full: a delta arrived for a base the router does not hold,
    /// or the reason the router rejected the current version has passed (its address came).
    Resync {
        have_version: Option<u64>,
    },
    Telemetry(TelemetryReport),
    /// Asks for a certificate over a new key: the raw P-256 public key (65 bytes, an
    /// uncompressed point) and the proof that the router holds it (a signature by it over this
    /// connection's TLS binding, [`crate::pki::prove_possession`]; empty from a router before
    /// proofs, which is refused). The name certified is the one the connection authenticated,
    /// never one the router states.
    Renew {
        public_key: Vec<u8>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        proof: Vec<u8>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    /// serde's word, clipped ([`clip`]): it quotes what it refused, which a peer can make as
    /// long as a frame (a 64 MiB variant name), and the error is logged.
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

impl From<serde_json::Error> for ProtoError {
    fn from(e: serde_json::Error) -> Self {
        ProtoError::Malformed(clip(e.to_string()))
    }
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, ProtoError> {
    let mut buf = BytesMut::with_capacity(256);
    buf.put_u32(0);
    serde_json::to_writer((&mut buf).writer(), msg)?;
    let len = buf.len() - 4;
    let len32 = u32::try_from(len).map_err(|_| ProtoError::TooLarge {
        size: len,
        max: u32::MAX as usize,
    })?;
    buf[..4].copy_from_slice(&len32.to_be_bytes());
    Ok(buf.freeze())
}

/// Writes `value`'s JSON to `out` unless it takes more than `max` bytes, and returns its length;
/// `None` when it would take more (or does not encode): the encoding stops there, so its time
/// and memory are bounded by `max` whatever `value` holds.
pub fn write_json_at_most<T: Serialize>(
    value: &T,
    out: &mut impl std::io::Write,
    max: usize,
) -> Option<usize> {
    struct Capped<'a, W> {
        out: &'a mut W,
        written: usize,
        max: usize,
    }
    impl<W: std::io::Write> std::io::Write for Capped<'_, W> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if b.len() > self.max - self.written {
                return Err(std::io::Error::other("over the limit"));
            }
            self.out.write_all(b)?;
            self.written += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.out.flush()
        }
    }
    let mut capped = Capped {
        out,
        written: 0,
        max,
    };
    serde_json::to_writer(&mut capped, value).ok()?;
    Some(capped.written)
}

/// Decodes one frame's payload.
pub fn decode<T: Message>(payload: &[u8]) -> Result<T, ProtoError> {
    T::decode(payload)
}

/// A message of the control protocol, read in two passes over its frame: the first takes the
/// `type` field alone (every other value skipped, nothing kept), the second the named variant's
/// fields into their own types (fields nobody knows skipped, not kept).
///
/// serde's derived reader for an internally tagged enum cannot know the variant before the
/// whole object is read, so it first copies every value of the object, unknown fields included,
/// into a tree of its own, about 16 bytes of tree for each byte of `[],[],...`: a frame of
/// 64 MiB took 1 GiB (and one of empty strings in a list of names 2 GiB) before a byte of it
/// was checked. Read this way, what a frame costs is what it decodes to
/// (`router/tests/control_decode_memory.rs` measures it).
pub trait Message: Sized {
    fn decode(payload: &[u8]) -> Result<Self, ProtoError>;
}

/// The `type` of a message, borrowed from the frame when it has no escapes.
#[derive(Deserialize)]
struct Kind<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

fn kind(payload: &[u8]) -> Result<std::borrow::Cow<'_, str>, ProtoError> {
    let Kind { kind } = serde_json::from_slice(payload)?;
    Ok(kind)
}

/// Whether `payload` is a [`FromRouter::Telemetry`] frame (by its `type` alone).
pub fn is_telemetry(payload: &[u8]) -> bool {
    kind(payload).is_ok_and(|k| k == "telemetry")
}

fn unknown_kind(kind: &str, expected: &str) -> ProtoError {
    ProtoError::Malformed(clip(format!(
        "unknown message type `{kind}`, expected one of {expected}"
    )))
}

/// `$enum::$variant { fields }` read from `$payload` through a struct of the same fields (and
/// serde attributes): the compiler checks that the fields are the variant's, and the round-trip
/// tests below that the attributes (defaults) are.
macro_rules! variant {
    ($payload:expr, $enum:ident :: $variant:ident { $($(#[$attr:meta])* $field:ident : $ty:ty),* $(,)? }) => {{
        #[derive(Deserialize)]
        struct Fields {
            $($(#[$attr])* $field: $ty),*
        }
        let Fields { $($field),* } = serde_json::from_slice($payload)?;
        $enum::$variant { $($field),* }
    }};
}

impl Message for ToRouter {
    fn decode(payload: &[u8]) -> Result<Self, ProtoError> {
        Ok(match &*kind(payload)? {
            "snapshot" => variant!(payload, ToRouter::Snapshot {
                version: u64,
                topology_version: u64,
                topology: Arc<Topology>,
                live: LiveState,
                #[serde(default)]
                circuits: Arc<Vec<ProvisionedCircuit>>,
            }),
            "live" => variant!(
                payload,
                ToRouter::Live {
                    version: u64,
                    base_version: u64,
                    topology_version: u64,
                    live: LiveState,
                }
            ),
            "delta" => variant!(
                payload,
                ToRouter::Delta {
                    version: u64,
                    base_version: u64,
                    topology_version: u64,
                    changes: TopologyDelta,
                    live: LiveState,
                }
            ),
            "heartbeat" => variant!(payload, ToRouter::Heartbeat { version: u64 }),
            "refused" => variant!(payload, ToRouter::Refused { reason: String }),
            "certificate" => variant!(payload, ToRouter::Certificate { chain_pem: String }),
            "renew_refused" => variant!(payload, ToRouter::RenewRefused { reason: String }),
            "crl" => variant!(payload, ToRouter::Crl { pem: String }),
            other => {
                return Err(unknown_kind(
                    other,
                    "snapshot, live, delta, heartbeat, refused, certificate, renew_refused, crl",
                ));
            }
        })
    }
}

impl Message for FromRouter {
    fn decode(payload: &[u8]) -> Result<Self, ProtoError> {
        Ok(match &*kind(payload)? {
            "hello" => variant!(payload, FromRouter::Hello {
                node: String,
                have_version: Option<u64>,
                #[serde(default)]
                crl: bool,
            }),
            "ack" => variant!(payload, FromRouter::Ack { version: u64 }),
            "nack" => variant!(
                payload,
                FromRouter::Nack {
                    version: u64,
                    reason: String,
                }
            ),
            "resync" => variant!(payload, FromRouter::Resync {
                have_version: Option<u64>,
            }),
            // A newtype variant: the report's fields sit beside `type`, which it skips.
            "telemetry" => FromRouter::Telemetry(serde_json::from_slice(payload)?),
            "renew" => variant!(
                payload,
                FromRouter::Renew {
                    public_key: Vec<u8>,
                    #[serde(default)]
                    proof: Vec<u8>,
                }
            ),
            other => {
                return Err(unknown_kind(
                    other,
                    "hello, ack, nack, resync, telemetry, renew",
                ));
            }
        })
    }
}

/// `s` made safe to log and show: control characters (a newline forging a log line, terminal
/// escapes) and bidirectional and line-separator format characters (text that reads
/// differently than it is) escaped as Rust writes them (`\n`, `\u{202e}`), then cut to at most
/// [`MAX_REASON`] bytes at a character boundary, `...` marking the cut; escapes count toward
/// the limit. Reasons and names come from the peer.
pub fn clip(s: String) -> String {
    clip_to(s, MAX_REASON)
}

/// Whether `c` is escaped before text from elsewhere is logged or shown ([`clip`]): a control
/// character (a newline forging a line, a terminal escape), or a bidirectional or line-separator
/// format character (text that reads differently than it is).
pub fn unsafe_to_show(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// [`clip`] to at most `max` bytes (and the `...`), for a peer's name inside a longer text.
pub fn clip_to(s: String, max: usize) -> String {
    if s.len() <= max && !s.chars().any(unsafe_to_show) {
        return s;
    }
    let mut out = String::with_capacity(max + 3);
    for c in s.chars() {
        let before = out.len();
        if unsafe_to_show(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > max {
            out.truncate(before);
            out.push_str("...");
            break;
        }
    }
    out
}

/// Reads one frame's payload; `None` at a clean end of stream before a frame starts.
/// Not for `select!` loops (a cancelled read loses the bytes read so far): use a
/// [`FrameReader`] there.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, ProtoError> {
    FrameReader::new(max).next(r).await
}

/// Reads frames from one stream, **cancel-safe**: a partly read frame stays in the reader, so
/// `next` can be a branch of a `tokio::select!` that other branches win (heartbeats, telemetry
/// ticks, new versions) without losing bytes and desynchronising the stream.
#[derive(Debug)]
pub struct FrameReader {
    max: usize,
    len: [u8; 4],
    len_read: usize,
    /// The payload being read (allocated once its length is known and checked).
    payload: Vec<u8>,
    payload_read: usize,
    /// When a read last took bytes from the stream.
    progress: Option<tokio::time::Instant>,
    /// A read failed: the stream is out of step with its frames.
    broken: bool,
}

impl FrameReader {
    pub fn new(max: usize) -> FrameReader {
        FrameReader {
            max,
            len: [0; 4],
            len_read: 0,
            payload: Vec::new(),
            payload_read: 0,
            progress: None,
            broken: false,
        }
    }

    /// When a read last took any byte from the stream, whole frame or not (`None`: none yet).
    /// A large frame over a slow link takes long to arrive whole, but its bytes keep coming: a
    /// peer is silent only when this stops moving.
    pub fn last_progress(&self) -> Option<tokio::time::Instant> {
        self.progress
    }

    /// The next frame's payload; `None` at a clean end of stream between frames. Every await
    /// point is a single `read`, whose result is kept before the next one starts. After an
    /// error every call fails: where the next frame starts is unknown (a refused frame's
    /// payload is still in the stream), so nothing read after it is a frame.
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<Vec<u8>>, ProtoError> {
        if self.broken {
            return Err(ProtoError::Io(std::io::Error::other(
                "the stream failed earlier: no frame boundary to read from",
            )));
        }
        let res = self.read_frame(r).await;
        // A cancelled read (the future dropped) leaves the reader as it was: only an error
        // breaks it.
        self.broken = res.is_err();
        res
    }

    async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<Vec<u8>>, ProtoError> {
        while self.len_read < 4 {
            let n = r.read(&mut self.len[self.len_read..]).await?;
            if n == 0 {
                return if self.len_read == 0 {
                    Ok(None)
                } else {
                    Err(truncated())
                };
            }
            self.progress = Some(tokio::time::Instant::now());
            self.len_read += n;
            if self.len_read == 4 {
                let size = u32::from_be_bytes(self.len) as usize;
                if size > self.max {
                    return Err(ProtoError::TooLarge {
                        size,
                        max: self.max,
                    });
                }
                self.payload = vec![0u8; size];
                self.payload_read = 0;
            }
        }
        while self.payload_read < self.payload.len() {
            let n = r.read(&mut self.payload[self.payload_read..]).await?;
            if n == 0 {
                return Err(truncated());
            }
            self.progress = Some(tokio::time::Instant::now());
            self.payload_read += n;
        }
        self.len_read = 0;
        self.payload_read = 0;
        Ok(Some(std::mem::take(&mut self.payload)))
    }
}

fn truncated() -> ProtoError {
    ProtoError::Io(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "stream ended inside a frame",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a frame is refused (or the stream fails inside one), the reader reads no more:
    /// the refused payload is still in the stream, and read on, it came back as an empty frame,
    /// then its first bytes as the next length.
    #[tokio::test]
    async fn a_frame_reader_reads_nothing_more_after_an_error() {
        let mut bytes: Vec<u8> = vec![0, 0, 0, 9];
        bytes.extend_from_slice(br#"{"type":1}"#);
        let mut r = &bytes[..];
        let mut frames = FrameReader::new(4);
        assert!(matches!(
            frames.next(&mut r).await,
            Err(ProtoError::TooLarge { size: 9, max: 4 })
        ));
        for _ in 0..2 {
            let again = frames.next(&mut r).await;
            assert!(again.is_err(), "{again:?}");
        }
        // A truncated frame, too.
        let mut r: &[u8] = &[0, 0, 0, 3, b'{'];
        let mut frames = FrameReader::new(4);
        assert!(frames.next(&mut r).await.is_err());
        let mut more: &[u8] = &[0, 0, 0, 1, b'x'];
        assert!(frames.next(&mut more).await.is_err());
    }

    /// A traffic dial travels to routers: a change of a dial alone upserts its site in the delta,
    /// and the decoded delta applied to the old topology gives the new one, dial included.
    #[test]
    fn a_dial_change_travels_in_the_topology_delta() {
        use topology::NodeKind;
        use topology::builder::{TopologyBuilder, ms};
        let mut b = TopologyBuilder::new();
        b.node("edge", NodeKind::Edge)
            .node("near", NodeKind::Site)
            .node("far", NodeKind::Site)
            .link("edge", "near", ms(1.0))
            .link("edge", "far", ms(9.0))
            .service("chat")
            .serve("near", "chat", 10)
            .serve("far", "chat", 10);
        let old = b.build();
        let new = b.dial("near", "chat", 25).build();
        let delta = TopologyDelta::between(&old, &new);
        let ids: Vec<&str> = delta.nodes_upsert.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["near"]);
        let wire = encode(&delta).unwrap();
        let back: TopologyDelta = serde_json::from_slice(&wire[4..]).unwrap();
        let applied = back.apply(&old);
        assert_eq!(applied, new);
        assert_eq!(applied.node("near").unwrap().serves[0].dial, 25);
        // And back to 100: the field is left out on the wire, and read back as 100.
        let undo = TopologyDelta::between(&new, &old);
        let wire = encode(&undo).unwrap();
        assert!(!String::from_utf8_lossy(&wire).contains("dial"));
        let back: TopologyDelta = serde_json::from_slice(&wire[4..]).unwrap();
        assert_eq!(back.apply(&new), old);
    }

    /// Changes in place and appends as before, repeated ids included: an upsert of an id the base
    /// has twice changes the first, two upserts of one new id leave the second.
    #[test]
    fn a_delta_changes_in_place_and_appends() {
        use topology::builder::{TopologyBuilder, ms};
        use topology::{Latency, NodeKind};
        let mut b = TopologyBuilder::new();
        b.node("a", NodeKind::Edge)
            .node("b", NodeKind::Transit)
            .node("c", NodeKind::Site)
            .link("a", "b", ms(1.0))
            .link("b", "c", ms(2.0))
            .service("chat");
        let mut base = b.build();
        base.links.push(Link {
            latency: ms(9.0),
            ..base.links[0].clone()
        });
        let slower = |l: &Link, by: f64| Link {
            latency: Latency::from_millis_f64(l.latency.as_millis_f64() + by),
            ..l.clone()
        };
        let d = base.nodes[0].clone();
        let d = Node {
            id: NodeId::new("d"),
            ..d
        };
        let d_site = Node {
            kind: NodeKind::Site,
            ..d.clone()
        };
        let delta = TopologyDelta {
            nodes_upsert: vec![d.clone(), d_site],
            nodes_remove: vec![NodeId::new("b")],
            links_upsert: vec![
                slower(&base.links[1], 1.0),
                slower(&base.links[0], 1.0),
                Link {
                    b: NodeId::new("d"),
                    ..base.links[0].clone()
                },
            ],
            links_remove: Vec::new(),
            services: base.services.clone(),
            pools: Vec::new(),
        };
        let t = delta.apply(&base);
        let ids: Vec<&str> = t.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["a", "c", "d"]);
        assert_eq!(t.nodes[2].kind, NodeKind::Site);
        let links: Vec<(String, f64)> = t
            .links
            .iter()
            .map(|l| (l.id().to_string(), l.latency.as_millis_f64()))
            .collect();
        assert_eq!(
            links,
            [
                ("a--b".to_string(), 2.0),
                ("b--c".to_string(), 3.0),
                ("a--b".to_string(), 9.0),
                ("a--d".to_string(), 1.0),
            ]
        );
    }

    /// 100,000 new links and 100,000 removed nodes apply at once. (Each element was looked up by
    /// scanning: this did not finish within 20 s.)
    #[test]
    fn a_large_delta_applies_in_time_linear_in_its_size() {
        use topology::builder::{TopologyBuilder, ms};
        use topology::{Bandwidth, NodeKind};
        const N: usize = 100_000;
        let mut b = TopologyBuilder::new();
        b.node("a", NodeKind::Edge);
        let like = b.build().nodes[0].clone();
        let base = Topology {
            nodes: (0..N)
                .map(|i| Node {
                    id: NodeId::new(format!("n{i}")),
                    ..like.clone()
                })
                .collect(),
            ..Topology::default()
        };
        let delta = TopologyDelta {
            nodes_remove: base.nodes.iter().map(|n| n.id.clone()).collect(),
            links_upsert: (0..N)
                .map(|i| Link {
                    a: NodeId::new(format!("n{i}")),
                    b: NodeId::new(format!("m{i}")),
                    latency: ms(1.0),
                    capacity: Bandwidth::from_mbps(1_000),
                    state: Default::default(),
                })
                .collect(),
            ..TopologyDelta::default()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(delta.apply(&base));
        });
        let t = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the delta applied within 20 s");
        assert!(t.nodes.is_empty());
        assert_eq!(t.links.len(), N);
    }

    #[tokio::test]
    async fn frame_round_trip_and_oversized_frame_is_refused_before_reading() {
        let msg = FromRouter::Nack {
            version: 7,
            reason: "node not in topology".into(),
        };
        let bytes = encode(&msg).unwrap();
        let mut r = &bytes[..];
        let payload = read_frame(&mut r, MAX_FROM_ROUTER).await.unwrap().unwrap();
        assert_eq!(decode::<FromRouter>(&payload).unwrap(), msg);
        assert!(read_frame(&mut r, MAX_FROM_ROUTER).await.unwrap().is_none());

        let mut huge = Vec::from(((MAX_FROM_ROUTER + 1) as u32).to_be_bytes());
        huge.extend_from_slice(b"{}");
        let mut r = &huge[..];
        assert!(matches!(
            read_frame(&mut r, MAX_FROM_ROUTER).await,
            Err(ProtoError::TooLarge { .. })
        ));
    }

    /// A read cancelled by `select!` (here: a timer that wins while a frame arrives in
    /// pieces) must not lose bytes: every frame comes out whole, in order.
    #[tokio::test]
    async fn frame_reader_survives_cancellation_in_the_middle_of_a_frame() {
        let frames: Vec<Bytes> = (0..20u64)
            .map(|v| {
                encode(&ToRouter::Heartbeat {
                    version: v * 1_000_003,
                })
                .unwrap()
            })
            .collect();
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(f);
        }
        let (mut w, mut r) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // Three bytes at a time, with pauses, so reads keep ending mid-frame.
            for chunk in wire.chunks(3) {
                w.write_all(chunk).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
        });
        let mut reader = FrameReader::new(MAX_TO_ROUTER);
        let mut got = Vec::new();
        let mut cancelled = 0;
        loop {
            tokio::select! {
                f = reader.next(&mut r) => match f.unwrap() {
                    Some(p) => got.push(decode::<ToRouter>(&p).unwrap()),
                    None => break,
                },
                _ = tokio::time::sleep(std::time::Duration::from_micros(50)) => cancelled += 1,
            }
        }
        writer.await.unwrap();
        assert!(cancelled > 0, "the test must actually cancel reads");
        let want: Vec<ToRouter> = frames.iter().map(|f| decode(&f[4..]).unwrap()).collect();
        assert_eq!(got, want);
    }

    /// Silence is judged on bytes, not frames: a frame still arriving is progress.
    #[tokio::test]
    async fn progress_is_any_byte_taken_not_a_whole_frame() {
        use tokio::io::AsyncWriteExt;
        let f = encode(&ToRouter::Heartbeat { version: 1 }).unwrap();
        let (mut w, mut r) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(MAX_TO_ROUTER);
        assert!(reader.last_progress().is_none());
        w.write_all(&f[..6]).await.unwrap();
        let wait = std::time::Duration::from_millis(100);
        assert!(
            tokio::time::timeout(wait, reader.next(&mut r))
                .await
                .is_err(),
            "the frame is not whole yet"
        );
        let first = reader
            .last_progress()
            .expect("the bytes of a partial frame count");
        w.write_all(&f[6..]).await.unwrap();
        let payload = reader.next(&mut r).await.unwrap().unwrap();
        assert_eq!(
            decode::<ToRouter>(&payload).unwrap(),
            ToRouter::Heartbeat { version: 1 }
        );
        assert!(reader.last_progress().unwrap() > first);
    }

    #[tokio::test]
    async fn a_stream_ending_inside_a_frame_is_an_error() {
        let f = encode(&ToRouter::Heartbeat { version: 1 }).unwrap();
        let mut r = &f[..f.len() - 1];
        assert!(read_frame(&mut r, MAX_TO_ROUTER).await.is_err());
        let mut r = &f[..2];
        assert!(read_frame(&mut r, MAX_TO_ROUTER).await.is_err());
    }

    #[test]
    fn a_malformed_messages_error_is_bounded_whatever_it_quotes() {
        let long = "x".repeat(1 << 20);
        for frame in [
            format!(r#"{{"type":"{long}"}}"#),
            format!(r#"{{"type":"heartbeat","version":"{long}"}}"#),
        ] {
            let e = decode::<ToRouter>(frame.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.len() < 300, "{} bytes", e.len());
            assert!(e.starts_with("malformed message: "), "{e}");
            let e = decode::<FromRouter>(frame.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.len() < 300, "{} bytes", e.len());
        }
    }

    #[test]
    fn clip_cuts_long_text_at_a_character_boundary() {
        assert_eq!(clip("short".into()), "short");
        let exact = "a".repeat(MAX_REASON);
        assert_eq!(clip(exact.clone()), exact);
        // 3-byte characters: 256 is inside the 86th, so the cut comes before it.
        let cut = clip("€".repeat(100_000));
        assert_eq!(cut, format!("{}...", "€".repeat(85)));
        assert!(cut.len() <= MAX_REASON + 3);
    }

    /// A reason from the peer cannot forge a log line or reorder what is shown: control and
    /// bidirectional characters are escaped (a NACK reason with a newline was logged as two
    /// lines, the second the sender's), and the escapes count toward the limit.
    #[test]
    fn clip_escapes_control_characters() {
        assert_eq!(
            clip("bad\n2026-12-04T00:00:00Z INFO forged\r\x1b[2J".into()),
            "bad\\n2026-12-04T00:00:00Z INFO forged\\r\\u{1b}[2J"
        );
        assert_eq!(clip("abc\u{202e}fed".into()), "abc\\u{202e}fed");
        assert_eq!(clip("tab\tok é".into()), "tab\\tok é");
        let cut = clip("\n".repeat(1000));
        assert_eq!(cut, format!("{}...", "\\n".repeat(MAX_REASON / 2)));
        // Nothing to escape, short: unchanged.
        assert_eq!(
            clip("node a: version 7 refused".into()),
            "node a: version 7 refused"
        );
    }

    /// Every message reads back as it was written (the per-variant readers of [`Message`] keep
    /// the enum's fields and defaults), and one from an older sender, without the fields added
    /// since, takes their defaults.
    #[test]
    fn every_message_reads_back_as_written() {
        use topology::NodeKind;
        use topology::builder::{TopologyBuilder, ms};
        let old = TopologyBuilder::new()
            .node("edge", NodeKind::Edge)
            .node("site", NodeKind::Site)
            .link("edge", "site", ms(1.0))
            .service("chat")
            .serve("site", "chat", 10)
            .build();
        let mut new = old.clone();
        new.links[0].latency = topology::Latency::from_micros(2_000);
        let mut live = LiveState::default();
        live.down_nodes.insert(NodeId::new("site"));
        let to_router = [
            ToRouter::Snapshot {
                version: 3,
                topology_version: 2,
                topology: Arc::new(old.clone()),
                live: live.clone(),
                circuits: Arc::new(Vec::new()),
            },
            ToRouter::Live {
                version: 4,
                base_version: 3,
                topology_version: 2,
                live: live.clone(),
            },
            ToRouter::Delta {
                version: 5,
                base_version: 4,
                topology_version: 3,
                changes: TopologyDelta::between(&old, &new),
                live,
            },
            ToRouter::Heartbeat { version: 5 },
            ToRouter::Refused {
                reason: "no such node".into(),
            },
            ToRouter::Certificate {
                chain_pem: "-----BEGIN CERTIFICATE-----".into(),
            },
            ToRouter::RenewRefused {
                reason: "too soon".into(),
            },
            ToRouter::Crl {
                pem: "-----BEGIN X509 CRL-----".into(),
            },
        ];
        for m in to_router {
            let wire = encode(&m).unwrap();
            assert_eq!(decode::<ToRouter>(&wire[4..]).unwrap(), m);
        }
        let from_router = [
            FromRouter::Hello {
                node: "edge".into(),
                have_version: Some(3),
                crl: true,
            },
            FromRouter::Hello {
                node: "edge".into(),
                have_version: None,
                crl: false,
            },
            FromRouter::Ack { version: 3 },
            FromRouter::Nack {
                version: 3,
                reason: "address not here".into(),
            },
            FromRouter::Resync {
                have_version: Some(2),
            },
            FromRouter::Telemetry(TelemetryReport {
                node: NodeId::new("edge"),
                snapshot_version: 3,
                neighbours: Vec::new(),
                sites: Vec::new(),
                preferred: [("chat".to_string(), "site".to_string())].into(),
                draining: true,
                hysteresis: None,
            }),
            FromRouter::Renew {
                public_key: vec![4; 65],
                proof: vec![0x30; 70],
            },
            FromRouter::Renew {
                public_key: vec![4; 65],
                proof: Vec::new(),
            },
        ];
        for m in from_router {
            let wire = encode(&m).unwrap();
            assert_eq!(decode::<FromRouter>(&wire[4..]).unwrap(), m);
        }
        // An older sender's: no circuits in a snapshot, no crl in a hello, no have_version.
        let live = serde_json::to_string(&LiveState::default()).unwrap();
        let topo = serde_json::to_string(&old).unwrap();
        let snap = format!(
            r#"{{"type":"snapshot","version":1,"topology_version":1,"topology":{topo},"live":{live}}}"#
        );
        let ToRouter::Snapshot { circuits, .. } = decode(snap.as_bytes()).unwrap() else {
            panic!("a snapshot");
        };
        assert!(circuits.is_empty());
        assert_eq!(
            decode::<FromRouter>(br#"{"node":"edge","type":"hello"}"#).unwrap(),
            FromRouter::Hello {
                node: "edge".into(),
                have_version: None,
                crl: false,
            }
        );
    }

    #[test]
    fn a_message_of_no_known_type_is_refused_naming_it() {
        let e = decode::<ToRouter>(br#"{"type":"ping","version":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown message type `ping`"), "{e}");
        let e = decode::<FromRouter>(br#"{"version":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `type`"), "{e}");
        // The type is read before anything else is checked, wherever it stands.
        let e = decode::<FromRouter>(br#"{"version":"x","type":"ack"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn a_delta_between_equal_topologies_changes_nothing() {
        use topology::NodeKind;
        use topology::builder::{TopologyBuilder, ms};
        let t = TopologyBuilder::new()
            .node("edge", NodeKind::Edge)
            .node("site", NodeKind::Site)
            .link("edge", "site", ms(1.0))
            .service("chat")
            .serve("site", "chat", 10)
            .build();
        assert!(TopologyDelta::between(&t, &t).changes_nothing_in(&t));
        let mut other = t.clone();
        other.services[0].requires_circuit = true;
        let d = TopologyDelta::between(&t, &other);
        assert!(!d.changes_nothing_in(&t));
        assert_eq!(d.apply(&t), other);
        let mut moved = t.clone();
        moved.links[0].latency = topology::Latency::from_micros(5_000);
        assert!(!TopologyDelta::between(&t, &moved).changes_nothing_in(&t));
    }

    #[test]
    fn json_is_written_up_to_its_limit_and_no_further() {
        let value = vec!["abc"; 1_000];
        let len = serde_json::to_vec(&value).unwrap().len();
        let mut out = Vec::new();
        assert_eq!(write_json_at_most(&value, &mut out, len), Some(len));
        assert_eq!(out, serde_json::to_vec(&value).unwrap());
        let mut out = Vec::new();
        assert_eq!(write_json_at_most(&value, &mut out, len - 1), None);
        assert!(out.len() < len, "{} bytes written", out.len());
        assert_eq!(write_json_at_most(&value, &mut std::io::sink(), 10), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode::<ToRouter>(b"\xff\x00not json").is_err());
        assert!(decode::<ToRouter>(br#"{"type":"snapshot","version":"x"}"#).is_err());
    }
}
