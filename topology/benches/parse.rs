//! Parse + validate of a synthetic 10,000-node / 50,000-link topology (target: under 1 s).
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
    g.finish();
}

criterion_group!(benches, parse_and_validate);
criterion_main!(benches);
