//! The shipped example fabric loads cleanly and round-trips through `to_yaml`.

use topology::{NodeKind, load, to_yaml};

fn read(rel: &str) -> String {
    let path = format!("{}/../{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn apac_example_is_valid_without_warnings() {
    let loaded = load(&read("examples/apac.yaml")).unwrap_or_else(|d| panic!("{d:#?}"));
    assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
    let t = &loaded.topology;
    for city in [
        "syd", "mel", "bne", "akl", "sin", "jkt", "hkg", "tyo", "sel", "bom", "lax",
    ] {
        assert!(
            t.nodes.iter().any(|n| n.id.as_str().starts_with(city)),
            "no node in {city}"
        );
    }
    for kind in [NodeKind::Edge, NodeKind::Transit, NodeKind::Site] {
        assert!(t.nodes.iter().any(|n| n.kind == kind));
    }
    let au = t
        .service("llm-chat-au")
        .expect("residency-constrained service");
    assert!(!au.residency.is_unrestricted());
    for n in &t.nodes {
        assert!(n.address.ip().is_loopback(), "{} is not on loopback", n.id);
        if let Some(ip) = n.client_address {
            assert!(ip.is_loopback());
        }
    }
    let back = load(&to_yaml(t)).unwrap_or_else(|d| panic!("{d:#?}"));
    assert_eq!(&back.topology, t);
}

#[test]
fn every_full_example_in_the_format_reference_is_valid() {
    let doc = read("docs/topology.md");
    let mut found = 0;
    let mut rest = doc.as_str();
    while let Some(start) = rest.find("```yaml\n") {
        let body = &rest[start + "```yaml\n".len()..];
        let end = body.find("```").expect("unterminated yaml block");
        let block = &body[..end];
        if block.starts_with("version: 1") {
            found += 1;
            let loaded = load(block).unwrap_or_else(|d| panic!("docs/topology.md example: {d:#?}"));
            assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
        }
        rest = &body[end + 3..];
    }
    assert!(found >= 1, "docs/topology.md has no full example");
}
