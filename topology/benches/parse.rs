//! Parse + validate of a synthetic 10,000-node / 50,000-link topology (target: under 1 s), and
//! the refusal of the same fabric with its node ids renamed (100,000 unknown link ends).
//!
//! `cargo bench -p tasman-topology --bench parse`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use topology::synth::{self, Params};

fn parse_and_validate(c: &mut Criterion) {
    let params = Params {
        nodes: 10_000,
        links: 50_000,
        ..Params::default()
    };
    let text = synth::yaml(&params);
    // The benchmark is only meaningful if the document is valid.
    let loaded = topology::load(&text)
        .unwrap_or_else(|d| panic!("synthetic YAML invalid: {:?}", &d[..d.len().min(5)]));
    assert_eq!(loaded.topology.nodes.len(), 10_000);
    assert_eq!(loaded.topology.links.len(), 50_000);
    eprintln!(
        "synthetic document: {} bytes, {} lines",
        text.len(),
        text.lines().count()
    );

    let mut g = c.benchmark_group("topology");
    g.sample_size(10);
    g.bench_function("load_10k_nodes_50k_links", |b| {
        b.iter(|| topology::load(black_box(&text)))
    });
    // The same fabric with its node ids renamed but not its links' ends: 100,000 unknown
    // names, each once compared with every node id for its "closest of N known" hint.
    let renamed = renamed_ids(&text);
    let refused = topology::load(&renamed).expect_err("the renamed document is refused");
    assert_eq!(
        refused
            .iter()
            .filter(|d| d.message.starts_with("unknown node"))
            .count(),
        100_000
    );
    g.bench_function("refuse_10k_nodes_50k_links_renamed_ids", |b| {
        b.iter(|| topology::load(black_box(&renamed)))
    });
    g.finish();
}

/// `text` with every node id prefixed with `x`, the links left as they are.
fn renamed_ids(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 20_000);
    for line in text.lines() {
        let trimmed = line.trim_start();
        match trimmed.strip_prefix("- id: \"") {
            Some(rest) => {
                out.push_str(&line[..line.len() - trimmed.len()]);
                out.push_str("- id: \"x");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

criterion_group!(benches, parse_and_validate);
criterion_main!(benches);
