//! Route selection benchmarks (results and machine in docs/benchmarks.md, "Topology"):
//! - a per-edge `RoutingTable::build` on the synthetic 10,000-node / 50,000-link graph
//!   (target < 10 ms), without and with live state;
//! - `RoutingTable::candidates` lookup, the per-connection path (target < 100 ns);
//! - `diff` + `impact` between two versions of examples/apac.yaml.
//!
//! Run: `cargo bench -p tasman-topology --bench route` (add `-- --quick` on a shared machine).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use topology::diff::{diff, impact};
use topology::route::{LiveState, RoutingTable, SiteLoad};
use topology::{Graph, Latency, NodeKind, synth};

fn synthetic() -> (topology::Topology, Graph) {
    let t = synth::topology(&synth::Params::default());
    assert_eq!(
        (t.nodes.len(), t.links.len()),
        (10_000, 50_000),
        "the benchmark's graph size"
    );
    let g = Graph::new(&t);
    (t, g)
}

fn bench_build(c: &mut Criterion) {
    let (t, g) = synthetic();
    let from = t
        .nodes
        .iter()
        .find(|n| n.kind == NodeKind::Edge)
        .map(|n| n.id.clone())
        .expect("an edge");
    let live = LiveState::default();
    let table = RoutingTable::build(&t, &g, &from, &live).expect("edge exists");
    let per_service: Vec<usize> = table.services().map(|(_, c)| c.len()).collect();
    eprintln!(
        "synthetic graph: {} nodes, {} links; candidates per service from {from}: {per_service:?}",
        t.nodes.len(),
        t.links.len()
    );

    let mut group = c.benchmark_group("routing_table");
    group.bench_function("graph_new_10k_nodes_50k_links", |b| {
        b.iter(|| Graph::new(black_box(&t)))
    });
    group.bench_function("build_10k_nodes_50k_links", |b| {
        b.iter(|| RoutingTable::build(black_box(&t), &g, black_box(&from), &live))
    });

    // Live state as a controller would have it: every 10th link measured, 1 % of links and
    // nodes down, every site reporting load.
    let mut busy = LiveState::default();
    for (i, l) in t.links.iter().enumerate() {
        if i % 10 == 0 {
            busy.link_latency
                .insert(l.id(), Latency::from_nanos(l.latency.as_nanos() * 11 / 10));
        }
        if i % 100 == 7 {
            busy.down_links.insert(l.id());
        }
    }
    for (i, n) in t.nodes.iter().enumerate() {
        if i % 100 == 3 && n.id != from {
            busy.down_nodes.insert(n.id.clone());
        }
        if n.kind == NodeKind::Site {
            busy.site_load.insert(
                n.id.clone(),
                SiteLoad {
                    active_streams: (i % 97) as u32,
                    capacity: 100,
                    healthy: i % 50 != 0,
                },
            );
        }
    }
    group.bench_function("build_10k_nodes_50k_links_with_live_state", |b| {
        b.iter(|| RoutingTable::build(black_box(&t), &g, black_box(&from), &busy))
    });
    group.finish();
}

fn bench_lookup(c: &mut Criterion) {
    let (t, g) = synthetic();
    let from = t
        .nodes
        .iter()
        .find(|n| n.kind == NodeKind::Edge)
        .map(|n| n.id.clone())
        .expect("an edge");
    let table = RoutingTable::build(&t, &g, &from, &LiveState::default()).expect("edge exists");
    let service = t.services[t.services.len() / 2].name.to_string();
    assert!(!table.candidates(&service).is_empty());
    c.bench_function("candidates_lookup", |b| {
        b.iter(|| {
            black_box(&table)
                .candidates(black_box(&service))
                .first()
                .map(|c| c.cost)
        })
    });
}

fn bench_diff(c: &mut Criterion) {
    let text = include_str!("../../examples/apac.yaml");
    let old = topology::load(text)
        .expect("examples/apac.yaml is valid")
        .topology;
    // A realistic edit: one link slower, one node drained, one site's capacity halved.
    let mut new = old.clone();
    new.links[0].latency = Latency::from_nanos(new.links[0].latency.as_nanos() * 3);
    if let Some(n) = new.nodes.iter_mut().find(|n| n.kind == NodeKind::Transit) {
        n.state = topology::AdminState::Drain;
    }
    if let Some(sv) = new
        .nodes
        .iter_mut()
        .find(|n| n.kind == NodeKind::Site)
        .and_then(|s| s.serves.first_mut())
    {
        sv.capacity /= 2;
    }
    let live = LiveState::default();
    eprintln!(
        "apac: {} nodes, {} links; {} impact entries for the edit",
        old.nodes.len(),
        old.links.len(),
        impact(&old, &new, &live).len()
    );
    c.bench_function("diff_and_impact_apac", |b| {
        b.iter(|| {
            (
                diff(black_box(&old), black_box(&new)),
                impact(black_box(&old), black_box(&new), &live),
            )
        })
    });
}

criterion_group!(benches, bench_build, bench_lookup, bench_diff);
criterion_main!(benches);
