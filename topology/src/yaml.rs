//! Topology YAML, format version 1: text to a position-carrying tree, then (in
//! `crate::validate`) to the validated [`Topology`].
//!
//! The YAML is read by `crate::tree` into a generic tree whose every node carries its line and
//! column; validation then walks that tree by hand instead of deriving `Deserialize` for the
//! format, because serde stops at the first problem while operators want every problem at once,
//! each with the position of its field.

use std::fmt;

use crate::diag::Diagnostic;
use crate::model::{AdminState, Topology};
use crate::tree::parse_tree;

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
/// Most bytes of scalar text copied for anchors and their aliases in total: each anchored node
/// is copied once, and again for each alias to it, so that counting nodes alone let one alias
/// to a long scalar copy all of it (999 aliases to a 16 MiB block scalar held about 16 GiB).
pub const MAX_ANCHOR_COPY_BYTES: usize = 4 * 1024 * 1024;

/// Most diagnostics one load returns, then one that counts the rest: lists of empty entries
/// (`serves: [{}, {}, ...]`), bounded only by [`MAX_YAML_NODES`], made millions (gigabytes of
/// messages nobody reads past the first screens). The first ones by position are kept.
pub const MAX_DIAGNOSTICS: usize = 1_000;

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
    load_as(text, crate::validate::Texts::New)
}

fn load_as(text: &str, texts: crate::validate::Texts) -> Result<Loaded, Vec<Diagnostic>> {
    let root = parse_tree(text).map_err(|d| vec![d])?;
    crate::validate::validate(&root, texts)
}

/// [`load`] for a text a controller accepted and stored under an earlier build: the rules this
/// build added since (an unusable QUIC or client address, a pool holding an edge's
/// client_address, a transparent port taken by a service, an empty `nodes` or `clients`...) are warnings, so that an upgrade
/// starts on its store and the operator can apply a fixed text. Everything else is as
/// [`load`].
pub fn load_stored(text: &str) -> Result<Loaded, Vec<Diagnostic>> {
    load_as(text, crate::validate::Texts::Stored)
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
                let _ = write!(
                    o,
                    "      - {{service: {}, backend: {}, capacity: {}, weight: {}",
                    q(&s.service),
                    q(s.backend),
                    s.capacity,
                    s.weight
                );
                if !crate::model::is_full_dial(&s.dial) {
                    let _ = write!(o, ", dial: {}", s.dial);
                }
                if let Some(p) = &s.health_check {
                    let _ = write!(o, ", health_check: {}", q(p));
                }
                let (h, d) = (&s.health, crate::model::HealthPolicy::default());
                if h.interval != d.interval {
                    let _ = write!(o, ", health_interval: {}", q(h.interval));
                }
                if h.unhealthy_after != d.unhealthy_after {
                    let _ = write!(o, ", unhealthy_after: {}", h.unhealthy_after);
                }
                if h.healthy_after != d.healthy_after {
                    let _ = write!(o, ", healthy_after: {}", h.healthy_after);
                }
                o.push_str("}\n");
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
        if !s.affinity.is_none() {
            let _ = writeln!(o, "    affinity: {}", s.affinity.as_str());
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
    fn to_yaml_round_trips_a_synthetic_topology() {
        let t = crate::synth::topology(&crate::synth::Params {
            nodes: 300,
            links: 1200,
            ..Default::default()
        });
        let text = to_yaml(&t);
        let back = load(&text).unwrap_or_else(|d| panic!("{d:#?}"));
        assert_eq!(back.topology, t);
        // Connected through transits: every edge reaches a site of every service.
        assert!(back.warnings.is_empty(), "{:#?}", back.warnings);
    }

    /// A dial reads from the file, writes back only when set, and leaves the serialised forms of
    /// a topology without dials as they were (no `dial` key anywhere).
    #[test]
    fn dials_round_trip_and_are_left_out_at_100() {
        let text = r#"
version: 1
nodes:
  - {id: e, kind: edge, region: r, country: AU, location: {lat: 0, lon: 0}, address: "127.0.0.1:7000", client_address: 127.0.0.1}
  - id: s1
    kind: site
    region: r
    country: AU
    location: {lat: 0, lon: 0}
    address: "127.0.0.1:7001"
    serves:
      - {service: chat, backend: "127.0.0.1:9000", capacity: 8, dial: 30}
      - {service: embed, backend: "127.0.0.1:9001", capacity: 8, dial: 0}
  - id: s2
    kind: site
    region: r
    country: AU
    location: {lat: 0, lon: 0}
    address: "127.0.0.1:7002"
    serves:
      - {service: chat, backend: "127.0.0.1:9000", capacity: 8, dial: 100}
      - {service: embed, backend: "127.0.0.1:9001", capacity: 8}
links:
  - {a: e, b: s1, latency: 1ms, capacity: 1Gbps}
  - {a: e, b: s2, latency: 9ms, capacity: 1Gbps}
services:
  - {name: chat, port: 8000}
  - {name: embed, port: 8001}
"#;
        let t = load(text).unwrap_or_else(|d| panic!("{d:#?}")).topology;
        let dials = |t: &Topology| {
            t.nodes
                .iter()
                .flat_map(|n| n.serves.iter().map(move |s| (n.id.to_string(), s.dial)))
                .collect::<Vec<_>>()
        };
        let want = [("s1", 30), ("s1", 0), ("s2", 100), ("s2", 100)];
        assert_eq!(
            dials(&t),
            want.map(|(n, d)| (n.to_string(), d)),
            "absent is 100"
        );
        let yaml = to_yaml(&t);
        assert_eq!(yaml.matches(", dial: ").count(), 2, "{yaml}");
        assert_eq!(load(&yaml).unwrap().topology, t);
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["nodes"][1]["serves"][0]["dial"], 30);
        assert!(json["nodes"][2]["serves"][0].get("dial").is_none());
        assert_eq!(serde_json::from_value::<Topology>(json).unwrap(), t);

        // No dials: nothing in YAML or JSON says "dial".
        let plain = crate::synth::topology(&crate::synth::Params::default());
        assert!(!to_yaml(&plain).contains("dial"));
        assert!(!serde_json::to_string(&plain).unwrap().contains("dial"));
    }

    /// An edge and a site serving `chat`, `extra` appended to the site's serves entry (line 12,
    /// its fields from column 79).
    fn one_site_serving_chat(extra: &str) -> String {
        format!(
            r#"
version: 1
nodes:
  - {{id: e, kind: edge, region: r, country: AU, location: {{lat: 0, lon: 0}}, address: "127.0.0.1:7000", client_address: 127.0.0.1}}
  - id: s1
    kind: site
    region: r
    country: AU
    location: {{lat: 0, lon: 0}}
    address: "127.0.0.1:7001"
    serves:
      - {{service: chat, backend: "127.0.0.1:9000", capacity: 8{extra}}}
links:
  - {{a: e, b: s1, latency: 1ms, capacity: 1Gbps}}
services:
  - {{name: chat, port: 8000}}
"#
        )
    }

    /// A `health_check` path reads from the file and writes back when set; one that is not a
    /// path (no leading `/`, a space that would split the request line, a control character)
    /// is refused at its line and column, naming the field.
    #[test]
    fn health_check_paths_round_trip_and_bad_ones_are_refused_where_they_are() {
        let doc = one_site_serving_chat;
        let t = load(&doc(", health_check: /v1/health?ready=1"))
            .unwrap_or_else(|d| panic!("{d:#?}"))
            .topology;
        assert_eq!(
            t.nodes[1].serves[0].health_check.as_deref(),
            Some("/v1/health?ready=1")
        );
        let yaml = to_yaml(&t);
        assert!(
            yaml.contains(r#"health_check: "/v1/health?ready=1""#),
            "{yaml}"
        );
        assert_eq!(load(&yaml).unwrap().topology, t);
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(serde_json::from_value::<Topology>(json).unwrap(), t);

        let none = load(&doc("")).unwrap().topology;
        assert_eq!(none.nodes[1].serves[0].health_check, None);
        assert!(!to_yaml(&none).contains("health_check"));
        assert!(
            !serde_json::to_string(&none)
                .unwrap()
                .contains("health_check")
        );

        for bad in ["health", "\"/a b\"", "\"/a\\r\\nHost: evil\"", "8080"] {
            let d = load(&doc(&format!(", health_check: {bad}"))).unwrap_err();
            let msg = format!("{d:?}");
            assert!(
                msg.contains("health_check") && msg.contains("line: 12, column: 79"),
                "{bad}: {msg}"
            );
        }
    }
    /// A serves entry's check timing reads from the file and writes back when set (nothing when
    /// left at the defaults); a value out of bounds is refused at its line and column, naming
    /// the field and the bounds.
    #[test]
    fn health_check_timing_round_trips_and_out_of_bounds_values_are_refused_where_they_are() {
        let doc = one_site_serving_chat;
        let t = load(&doc(
            ", health_interval: 2s, unhealthy_after: 5, healthy_after: 1",
        ))
        .unwrap_or_else(|d| panic!("{d:#?}"))
        .topology;
        let h = t.nodes[1].serves[0].health;
        assert_eq!(
            (h.interval, h.unhealthy_after, h.healthy_after),
            (crate::units::Latency::from_micros(2_000_000), 5, 1)
        );
        let yaml = to_yaml(&t);
        assert!(yaml.contains("health_interval: \"2s\""), "{yaml}");
        assert_eq!(load(&yaml).unwrap().topology, t);
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["nodes"][1]["serves"][0]["unhealthy_after"], 5);
        assert_eq!(serde_json::from_value::<Topology>(json).unwrap(), t);
        let plain = load(&doc("")).unwrap().topology;
        assert_eq!(
            plain.nodes[1].serves[0].health,
            crate::model::HealthPolicy::default()
        );
        for text in [to_yaml(&plain), serde_json::to_string(&plain).unwrap()] {
            assert!(
                !text.contains("health_interval") && !text.contains("healthy_after"),
                "{text}"
            );
        }
        for (bad, field, bounds) in [
            (", health_interval: 10ms", "health_interval", "100ms"),
            (", health_interval: 61s", "health_interval", "60s"),
            (", health_interval: soon", "health_interval", ""),
            (", unhealthy_after: 0", "unhealthy_after", "1"),
            (", healthy_after: 101", "healthy_after", "100"),
        ] {
            let d = load(&doc(bad)).unwrap_err();
            let msg = format!("{d:?}");
            assert!(
                msg.contains(field) && msg.contains(bounds) && msg.contains("line: 12, column: "),
                "{bad}: {msg}"
            );
        }
    }
}
