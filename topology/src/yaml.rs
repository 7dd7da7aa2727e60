//! Topology YAML, format version 1: text to a position-carrying tree, then (in
//! [`crate::validate`]) to the validated [`Topology`].
//!
//! The YAML is parsed with `serde-saphyr` under a strict [`Budget`] into a generic tree whose
//! every node carries its line and column ([`serde_saphyr::Spanned`]). Validation then walks that
//! tree by hand instead of deriving `Deserialize` for the format, because serde stops at the first
//! problem while operators want every problem at once, each with the position of its field.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Budget, DuplicateKeyPolicy, Spanned};

use crate::diag::Diagnostic;
use crate::model::{AdminState, Topology};

/// Largest topology document accepted, checked before parsing. A 10,000-node / 50,000-link
/// fabric in block style is about 8 MiB.
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;
/// Deepest nesting accepted. Format v1 needs 5 levels; the slack is for flow style.
pub const MAX_DEPTH: usize = 16;
/// Most YAML nodes (scalars + collections) in one document.
pub const MAX_YAML_NODES: usize = 3_000_000;
/// Most alias (`*name`) uses, and most events replayed through them in total: aliases are
/// allowed for sharing small settings, never to multiply a document (billion laughs).
pub const MAX_ALIASES: usize = 1_000;
pub const MAX_ALIAS_REPLAYED_EVENTS: usize = 10_000;

/// A successfully loaded topology, plus the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub topology: Topology,
    pub warnings: Vec<Diagnostic>,
}

/// Parses and validates a topology document. On failure, returns every problem found (errors
/// and warnings, sorted by position), not only the first.
///
/// ```
/// let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/apac.yaml")).unwrap();
/// let loaded = topology::load(&text).expect("the example is valid");
/// assert!(loaded.topology.node("syd-edge-1").is_some());
/// ```
pub fn load(text: &str) -> Result<Loaded, Vec<Diagnostic>> {
    let root = parse_tree(text).map_err(|d| vec![d])?;
    crate::validate::validate(&root)
}

/// Source position of a YAML node (1-based line and column, in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

/// A YAML node with its position. Scalars keep the type the YAML core schema resolves them to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct YNode {
    pub pos: Pos,
    pub value: YValue,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum YValue {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<YNode>),
    Map(Vec<(YNode, YNode)>),
}

impl YValue {
    /// What the value is, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match self {
            YValue::Null => "nothing (null)",
            YValue::Bool(_) => "a boolean",
            YValue::Int(_) => "an integer",
            YValue::Float(_) => "a number",
            YValue::Str(_) => "a string",
            YValue::Seq(_) => "a list",
            YValue::Map(_) => "a mapping",
        }
    }
    /// A scalar's text, for fields that take text (numbers are accepted where the text is meant,
    /// e.g. a region named `1`, so the unit parsers can explain `latency: 12`).
    pub fn scalar_text(&self) -> Option<String> {
        match self {
            YValue::Str(s) => Some(s.clone()),
            YValue::Int(i) => Some(i.to_string()),
            YValue::Float(f) => Some(f.to_string()),
            YValue::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for YNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<YValue>::deserialize(d)?;
        let pos = Pos {
            line: s.referenced.line() as usize,
            column: s.referenced.column() as usize,
        };
        Ok(YNode {
            pos,
            value: s.value,
        })
    }
}

impl<'de> Deserialize<'de> for YValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(YValueVisitor)
    }
}

struct YValueVisitor;

impl<'de> Visitor<'de> for YValueVisitor {
    type Value = YValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<YValue, E> {
        Ok(YValue::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<YValue, E> {
        Ok(YValue::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<YValue, D::Error> {
        YValue::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<YValue, E> {
        Ok(YValue::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<YValue, E> {
        Ok(YValue::Int(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<YValue, E> {
        Ok(YValue::Int(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<YValue, E> {
        Ok(YValue::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<YValue, E> {
        Ok(i128::try_from(v)
            .map(YValue::Int)
            .unwrap_or(YValue::Float(v as f64)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<YValue, E> {
        Ok(YValue::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<YValue, E> {
        Ok(YValue::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<YValue, E> {
        Ok(YValue::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<YValue, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element::<YNode>()? {
            items.push(item);
        }
        Ok(YValue::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<YValue, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(k) = map.next_key::<YNode>()? {
            let v = map.next_value::<YNode>()?;
            entries.push((k, v));
        }
        Ok(YValue::Map(entries))
    }
}

fn options() -> serde_saphyr::Options {
    let mut budget = Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.flow_nesting_limit = MAX_DEPTH;
    budget.max_nodes = MAX_YAML_NODES;
    budget.max_events = 2 * MAX_YAML_NODES;
    budget.max_aliases = MAX_ALIASES;
    budget.max_anchors = MAX_ALIASES;
    budget.max_documents = 1;
    budget.max_inclusion_depth = 0;
    budget.max_merge_keys = MAX_ALIASES;
    budget.max_total_scalar_bytes = MAX_DOCUMENT_BYTES;
    budget.max_recorded_anchor_events = MAX_ALIAS_REPLAYED_EVENTS;
    budget.max_recorded_anchor_bytes = 1024 * 1024;
    let mut o = serde_saphyr::Options::default();
    o.budget = Some(budget);
    o.alias_limits.max_total_replayed_events = MAX_ALIAS_REPLAYED_EVENTS;
    o.alias_limits.max_replay_stack_depth = 8;
    // Duplicate keys reach the validator, which reports each of them with both positions.
    o.duplicate_keys = DuplicateKeyPolicy::PassThrough;
    // `country: NO` is Norway, not `false`.
    o.strict_booleans = true;
    o
}

/// Text to tree. Hostile input (too big, too deep, alias bombs, too many nodes) is refused here,
/// before any of it is expanded.
pub(crate) fn parse_tree(text: &str) -> Result<YNode, Diagnostic> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(Diagnostic::error(
            0,
            0,
            format!(
                "document is {} bytes, over the limit of {} bytes ({} MiB)",
                text.len(),
                MAX_DOCUMENT_BYTES,
                MAX_DOCUMENT_BYTES / (1024 * 1024)
            ),
        ));
    }
    match serde_saphyr::from_str_with_options::<Option<YNode>>(text, options()) {
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err(Diagnostic::error(
            1,
            1,
            "empty document (expected a mapping with `version: 1`)",
        )),
        Err(e) => Err(yaml_error(&e)),
    }
}

fn yaml_error(e: &serde_saphyr::Error) -> Diagnostic {
    let inner = e.without_snippet();
    let (line, column) = inner
        .location()
        .or_else(|| e.location())
        .map(|l| (l.line() as usize, l.column() as usize))
        .unwrap_or((0, 0));
    Diagnostic::error(line, column, inner.to_string())
}

/// Writes a topology as a format-v1 document that [`load`] reads back to an equal value.
/// Block style for nodes and services, one flow mapping per link. Comments are not kept.
pub fn to_yaml(t: &Topology) -> String {
    use std::fmt::Write as _;
    // Strings are written as JSON strings, which are valid YAML double-quoted scalars.
    fn q(s: impl fmt::Display) -> String {
        serde_json::to_string(&s.to_string()).unwrap_or_else(|_| "\"\"".to_string())
    }
    fn state(s: AdminState) -> &'static str {
        match s {
            AdminState::Up => "up",
            AdminState::Drain => "drain",
            AdminState::Down => "down",
        }
    }
    let mut o = String::with_capacity(t.nodes.len() * 256 + t.links.len() * 96 + 1024);
    o.push_str("version: 1\nnodes:\n");
    for n in &t.nodes {
        let _ = writeln!(
            o,
            "  - id: {}\n    kind: {}\n    region: {}",
            q(&n.id),
            n.kind,
            q(&n.region)
        );
        let _ = writeln!(
            o,
            "    country: {}\n    location: {{lat: {:?}, lon: {:?}}}",
            q(n.country),
            n.location.lat,
            n.location.lon
        );
        let _ = writeln!(o, "    address: {}", q(n.address));
        if n.state != AdminState::Up {
            let _ = writeln!(o, "    state: {}", state(n.state));
        }
        if let Some(ip) = n.client_address {
            let _ = writeln!(o, "    client_address: {}", q(ip));
        }
        if let Some(p) = n.transparent_port {
            let _ = writeln!(o, "    transparent_port: {p}");
        }
        if !n.serves.is_empty() {
            o.push_str("    serves:\n");
            for s in &n.serves {
                let _ = writeln!(
                    o,
                    "      - {{service: {}, backend: {}, capacity: {}, weight: {}}}",
                    q(&s.service),
                    q(s.backend),
                    s.capacity,
                    s.weight
                );
            }
        }
    }
    o.push_str(if t.links.is_empty() {
        "links: []\n"
    } else {
        "links:\n"
    });
    for l in &t.links {
        let _ = write!(
            o,
            "  - {{a: {}, b: {}, latency: {}, capacity: {}",
            q(&l.a),
            q(&l.b),
            q(l.latency),
            q(l.capacity)
        );
        if l.state != AdminState::Up {
            let _ = write!(o, ", state: {}", state(l.state));
        }
        o.push_str("}\n");
    }
    o.push_str(if t.services.is_empty() {
        "services: []\n"
    } else {
        "services:\n"
    });
    for s in &t.services {
        let _ = writeln!(o, "  - name: {}", q(&s.name));
        if let Some(p) = s.port {
            let _ = writeln!(o, "    port: {p}");
        }
        if !s.vips.is_empty() {
            let v: Vec<String> = s.vips.iter().map(q).collect();
            let _ = writeln!(o, "    vips: [{}]", v.join(", "));
        }
        if !s.clients.is_empty() {
            let v: Vec<String> = s.clients.iter().map(q).collect();
            let _ = writeln!(o, "    clients: [{}]", v.join(", "));
        }
        if !s.residency.is_unrestricted() {
            let r: Vec<String> = s.residency.regions.iter().map(q).collect();
            let c: Vec<String> = s.residency.countries.iter().map(q).collect();
            let _ = writeln!(
                o,
                "    residency: {{regions: [{}], countries: [{}]}}",
                r.join(", "),
                c.join(", ")
            );
        }
        if s.requires_circuit {
            o.push_str("    requires_circuit: true\n");
        }
    }
    if !t.pools.is_empty() {
        o.push_str("pools:\n");
        for p in &t.pools {
            let _ = writeln!(o, "  - {{name: {}, prefix: {}}}", q(&p.name), q(p.prefix));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_keeps_positions_and_scalar_types() {
        let t = parse_tree("a: 1\nb:\n  - \"x\"\n  - 2.5\nc: NO\n").unwrap();
        let YValue::Map(m) = &t.value else {
            panic!("not a map: {t:?}")
        };
        assert_eq!(m[0].0.pos, Pos { line: 1, column: 1 });
        assert_eq!(m[0].1.pos, Pos { line: 1, column: 4 });
        assert_eq!(m[0].1.value, YValue::Int(1));
        assert_eq!(
            m[1].1.value,
            YValue::Seq(vec![
                YNode {
                    pos: Pos { line: 3, column: 5 },
                    value: YValue::Str("x".into())
                },
                YNode {
                    pos: Pos { line: 4, column: 5 },
                    value: YValue::Float(2.5)
                },
            ])
        );
        assert_eq!(m[2].1.value, YValue::Str("NO".into()));
    }

    #[test]
    fn to_yaml_round_trips_a_synthetic_topology() {
        let t = crate::synth::topology(&crate::synth::Params {
            nodes: 300,
            links: 1200,
            ..Default::default()
        });
        let text = to_yaml(&t);
        let back = load(&text).unwrap_or_else(|d| panic!("{d:#?}"));
        assert_eq!(back.topology, t);
    }
}
