//! Hostile documents are refused quickly with a clear error: never a hang, a crash or an
//! allocation proportional to an expansion.

use std::time::{Duration, Instant};

use topology::{Diagnostic, MAX_DIAGNOSTICS, MAX_DOCUMENT_BYTES, load};

/// How long a load may run before it counts as a hang: a guard, not a speed test (a debug build
/// on 2 busy cores). Each test's diagnostic shows which check refused the document: before
/// parsing, or before an expansion or a copy grew.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Loads `text` on a thread of its own, asserts it fails within [`HANG_GUARD`], and returns the
/// diagnostics.
fn refused(text: &str) -> Vec<Diagnostic> {
    let (tx, rx) = std::sync::mpsc::channel();
    let text = text.to_string();
    std::thread::spawn(move || {
        let start = Instant::now();
        let result = load(&text);
        let _ = tx.send((result.map(|_| ()), start.elapsed()));
    });
    let (result, took) = rx
        .recv_timeout(HANG_GUARD)
        .unwrap_or_else(|_| panic!("load still running after {HANG_GUARD:?}"));
    match result {
        Ok(_) => panic!("hostile document was accepted"),
        Err(d) => {
            assert!(d.iter().any(Diagnostic::is_error), "{d:?}");
            eprintln!("refused in {took:?}: {}", d[0]);
            d
        }
    }
}

#[test]
fn document_over_the_size_limit_is_refused_before_parsing() {
    let mut text = String::from("version: 1\nnodes: []\n# ");
    text.push_str(&"x".repeat(MAX_DOCUMENT_BYTES));
    let d = refused(&text);
    assert_eq!(d.len(), 1);
    assert!(d[0].message.contains("over the limit"), "{}", d[0].message);
}

#[test]
fn deeply_nested_flow_collections_are_refused() {
    let text = format!(
        "version: 1\nnodes: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let d = refused(&text);
    assert!(d[0].message.contains("refused"), "{}", d[0].message);
}

#[test]
fn deeply_nested_block_collections_are_refused() {
    let mut text = String::from("version: 1\nnodes:\n");
    for depth in 0..2_000 {
        text.push_str(&" ".repeat(2 * depth + 2));
        text.push_str("- \n");
    }
    let d = refused(&text);
    assert!(d[0].message.contains("refused"), "{}", d[0].message);
}

#[test]
fn alias_expansion_bomb_is_refused() {
    // "Billion laughs": 9 levels of 10 aliases each would expand to 10^9 strings.
    let mut text = String::from("version: 1\nlol0: &l0 \"lol\"\n");
    for i in 1..=9 {
        let refs: Vec<String> = (0..10).map(|_| format!("*l{}", i - 1)).collect();
        text.push_str(&format!("lol{i}: &l{i} [{}]\n", refs.join(", ")));
    }
    text.push_str("nodes: *l9\n");
    let d = refused(&text);
    assert!(d[0].message.contains("refused"), "{}", d[0].message);
}

/// Anchors nested around one large list, with no alias at all: each level's anchor copied the
/// whole list again (14 levels of 400,000 nodes: 5.6 million copied nodes, ~270 MB, from 800 KB
/// of text). The copies count against the node limit, and the document is refused.
#[test]
fn nested_anchors_around_a_large_node_are_refused() {
    let mut text = String::from(
        "version: 1
x: ",
    );
    for i in 0..14 {
        text.push_str(&format!("&a{i} ["));
    }
    text.push_str(&"0,".repeat(400_000));
    text.push('0');
    text.push_str(&"]".repeat(14));
    text.push('\n');
    let d = refused(&text);
    assert!(
        d[0].message
            .contains("counting a copy of each anchored node"),
        "{}",
        d[0].message
    );
    // One anchor around it is fine (copied once, well under the limit).
    let one = format!("version: 1\nx: &a [{}0]\n", "0,".repeat(400_000));
    let d = refused(&one);
    assert!(
        !d.iter().any(|d| d.message.contains("anchored")),
        "{}",
        d[0].message
    );
}

/// Aliases to one long scalar, within the alias and node limits (which count nodes, and a
/// scalar is one node whatever its length): each alias copied the whole text (999 aliases to a
/// 16 MiB block scalar held about 16 GiB). The text copied for anchors and aliases is bounded,
/// and the alias that crosses the bound is named by its line.
#[test]
fn aliases_to_a_long_scalar_are_refused_by_the_bytes_they_copy() {
    let big = "y".repeat(256 * 1024);
    let with_aliases = |n: usize| {
        format!(
            "version: 1\nx: &big |\n  {big}\nnodes:\n{}",
            "  - *big\n".repeat(n)
        )
    };
    let d = refused(&with_aliases(40));
    assert!(
        d[0].message
            .contains("anchors and aliases copy more than 4 MiB of text"),
        "{}",
        d[0].message
    );
    // Each copy is 256 KiB and the block's newline: the anchor's and 15 aliases' pass 4 MiB,
    // so the 15th alias (line 19) is the one refused.
    assert_eq!((d[0].line, d[0].column), (19, 5), "{}", d[0]);
    // A few aliases to it are fine (the document fails later, on what it says).
    let d = refused(&with_aliases(2));
    assert!(!d.iter().any(|d| d.message.contains("copy more")), "{d:?}");
}

/// An integer too long to read is copied by its aliases as text is, and counted so: 40
/// aliases to a 256 KiB run of digits are refused as 40 to a 256 KiB string are (they were
/// taken, and each use's message quoted the digits whole: about 10 MiB of messages here, 16 GB
/// from a 16 MiB file).
#[test]
fn aliases_to_a_long_integer_are_refused_by_the_bytes_they_copy() {
    let big = "1".repeat(256 * 1024);
    let text = format!(
        "version: 1\nx: &big {big}\nlinks:\n{}",
        "  - {a: e, b: s, latency: *big}\n".repeat(40)
    );
    let d = refused(&text);
    assert!(
        d[0].message
            .contains("anchors and aliases copy more than 4 MiB of text"),
        "{}",
        d[0].message
    );
    assert!(
        d.iter().map(|d| d.message.len()).sum::<usize>() < 1 << 20,
        "{} bytes of messages",
        d.iter().map(|d| d.message.len()).sum::<usize>()
    );
}

#[test]
fn many_aliases_to_one_anchor_are_refused() {
    let mut text = String::from("version: 1\nx: &big [1, 2, 3, 4, 5, 6, 7, 8]\nnodes:\n");
    for _ in 0..200_000 {
        text.push_str("  - *big\n");
    }
    let d = refused(&text);
    assert!(d[0].message.contains("refused"), "{}", d[0].message);
}

#[test]
fn too_many_nodes_are_refused() {
    let mut text = String::from("version: 1\nnodes:\n");
    for _ in 0..50_001 {
        text.push_str("  - {}\n");
    }
    let d = refused(&text);
    assert!(
        d.iter().any(|d| d.message.contains("over the limit")),
        "{:?}",
        &d[..d.len().min(3)]
    );
}

#[test]
fn garbage_never_panics() {
    let samples = [
        "\u{0}\u{1}\u{2}",
        "{",
        "]",
        "version: 1\nnodes: [{id: }",
        "%YAML 9.9\n---\na: 1",
        "--- 1\n--- 2\n",
        "version: 99999999999999999999999999999999999999999",
        "version: 1\nnodes:\n  - id: a\n    location: {lat: .nan, lon: .inf}\n",
        "!!binary AAAA",
        "? [a, b]\n: c\n",
        "version: 1\nnodes:\n  - &a {id: x}\n  - *a\n",
    ];
    for s in samples {
        let _ = load(s);
    }
}

/// Every single-line deletion and many truncations of the example fabric load without a panic,
/// and every diagnostic points inside the document.
#[test]
fn mutilated_example_never_panics_and_points_inside_the_document() {
    let path = format!("{}/../examples/apac.yaml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).expect("example");
    let lines: Vec<&str> = text.lines().collect();
    let mut variants: Vec<String> = (0..lines.len())
        .map(|skip| {
            lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, l)| format!("{l}\n"))
                .collect()
        })
        .collect();
    variants.extend(
        (0..text.len())
            .step_by(97)
            .filter(|i| text.is_char_boundary(*i))
            .map(|i| text[..i].to_string()),
    );
    for v in &variants {
        let n_lines = v.lines().count().max(1);
        if let Err(diags) = load(v) {
            for d in diags {
                assert!(
                    d.line <= n_lines + 1,
                    "{d} is past the end ({n_lines} lines)"
                );
            }
        }
    }
}

/// A valid document near the size limit with many VIPs and pools: one site serves one service
/// with `vips` VIPs on one port, and `pools` pools, none overlapping anything.
fn many_prefixes(vips: u32, pools: u32) -> String {
    let mut text = String::from(
        "version: 1\nnodes:\n  - {id: s, kind: site, region: r, country: AU, location: {lat: 0, lon: 0}, \
         address: \"127.0.0.1:7000\", serves: [{service: chat, backend: \"127.0.0.1:9000\", capacity: 1}]}\n\
         services:\n  - name: chat\n    vips: [",
    );
    for i in 0..vips {
        let [_, b, c, d] = i.to_be_bytes();
        text.push_str(&format!("\"10.{b}.{c}.{d}:443\","));
    }
    text.push_str("]\npools:\n");
    for i in 0..pools {
        let [_, b, c, d] = i.to_be_bytes();
        text.push_str(&format!("  - {{name: p{i}, prefix: 100.{b}.{c}.{d}/32}}\n"));
    }
    text
}

/// Overlaps are found by sorting, not by comparing every VIP (pool) with every other: a
/// scan of all pairs of 300,000 VIPs and 200,000 pools is over 10^11 comparisons (minutes);
/// the deadline is only a guard against that.
#[test]
fn many_vips_and_pools_validate_without_comparing_all_pairs() {
    let text = many_prefixes(300_000, 200_000);
    assert!(text.len() < MAX_DOCUMENT_BYTES, "{} bytes", text.len());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let loaded =
            load(&text).map(|l| (l.topology.services[0].vips.len(), l.topology.pools.len()));
        let _ = tx.send((loaded, start.elapsed()));
    });
    let (loaded, took) = rx
        .recv_timeout(HANG_GUARD)
        .unwrap_or_else(|_| panic!("validation still running after {HANG_GUARD:?}"));
    eprintln!("validated in {took:?}");
    assert_eq!(loaded.expect("valid"), (300_000, 200_000));
}

/// A large fabric whose node ids were renamed but not its links' ends: each unknown end was
/// compared with every node id (the "closest of N known" hint), 100,000 ends times 10,000 ids
/// (minutes). The closest known names are searched for the first 100 unknown names only, and
/// never for a word longer than any name can be (a 1 MiB link end); the others still name the
/// count known. (900 unknown ends, so that every one is among the diagnostics shown; the nodes
/// are valid, so that theirs do not take the places.)
#[test]
fn unknown_names_get_the_closest_known_ones_for_the_first_100_only() {
    let mut text = String::from("version: 1\nnodes:\n");
    for i in 0..10_000u32 {
        let [_, _, c, d] = i.to_be_bytes();
        text.push_str(&format!(
            "  - {{id: node-{i}, kind: transit, region: r, country: AU, location: {{lat: 0, lon: 0}}, \
             address: \"127.1.{c}.{d}:7000\"}}\n"
        ));
    }
    text.push_str("links:\n");
    for i in 0..900 {
        text.push_str(&format!(
            "  - {{a: nod-{i}, b: node-{i}, latency: 1ms, capacity: 1Gbps}}\n"
        ));
    }
    let long = "x".repeat(1024 * 1024);
    text.push_str(&format!(
        "  - {{a: \"{long}\", b: node-1, latency: 1ms, capacity: 1Gbps}}\n"
    ));
    let d = refused(&text);
    let unknown: Vec<&Diagnostic> = d
        .iter()
        .filter(|d| d.message.starts_with("unknown node"))
        .collect();
    assert_eq!(unknown.len(), 901);
    let hinted = unknown
        .iter()
        .filter(|d| d.message.contains("(closest of 10000 known: "))
        .count();
    assert_eq!(hinted, 100);
    // The first one's hint is right: `nod-0` is one letter from `node-0`.
    assert!(
        unknown[0]
            .message
            .contains("(closest of 10000 known: node-0"),
        "{}",
        unknown[0].message
    );
    let unhinted = unknown
        .iter()
        .filter(|d| {
            d.message.contains(
                "(10000 known; the closest are given for the first 100 unknown names only)",
            )
        })
        .count();
    assert_eq!(unhinted, 800);
    assert!(
        unknown
            .iter()
            .any(|d| d.message.ends_with("(10000 known, none that long)")),
        "no diagnostic for the long end"
    );
}

/// Long ids make each distance of a "did you mean" hint long: 100 unknown link ends of 64
/// characters against 50,000 ids of 63 were 2 x 10^10 steps (minutes). The hints share a
/// budget of steps; past it, the count known is given.
#[test]
fn hints_against_many_long_ids_stay_within_a_budget() {
    let mut text = String::from("version: 1\nnodes:\n");
    let stem = "a".repeat(57);
    for i in 0..50_000u32 {
        let [_, _, c, d] = i.to_be_bytes();
        text.push_str(&format!(
            "  - {{id: {stem}-{i:05}, kind: transit, region: r, country: AU, \
             location: {{lat: 0, lon: 0}}, address: \"127.1.{c}.{d}:7000\"}}\n"
        ));
    }
    text.push_str("links:\n");
    for i in 0..100 {
        text.push_str(&format!(
            "  - {{a: {stem}x-{i:05}, b: {stem}y-{i:05}, latency: 1ms, capacity: 1Gbps}}\n"
        ));
    }
    let d = refused(&text);
    let unknown: Vec<&Diagnostic> = d
        .iter()
        .filter(|d| d.message.starts_with("unknown node"))
        .collect();
    assert_eq!(unknown.len(), 200, "{:?}", &d[..3]);
    assert!(
        unknown.iter().all(|d| d
            .message
            .contains("(50000 known; too many to search for the closest)")),
        "{}",
        unknown[0].message
    );
}

/// An edge without a client_address while services listen on edges names the first few of
/// them and counts the rest: it named every one, once per edge (10,000 services on 50,000
/// edges, 32 GB of messages).
#[test]
fn an_edge_without_client_address_names_a_few_services() {
    // Its `services:` (none) last: the ones with ports follow.
    let mut text = isolated_edges(0, 2_000);
    for i in 0..2_000u32 {
        text.push_str(&format!("  - {{name: svc-{i}, port: {}}}\n", 10_000 + i));
    }
    let d = refused(&text);
    let no_address: Vec<&Diagnostic> = d
        .iter()
        .filter(|d| d.message.contains("has no client_address"))
        .collect();
    assert!(no_address.len() >= 900, "{}", no_address.len());
    for d in no_address {
        assert!(
            d.message
                .ends_with("(svc-0, svc-1, svc-2, svc-3, svc-4 and 1995 more)"),
            "{}",
            &d.message[..d.message.len().min(300)]
        );
    }
}

/// A valid fabric with `services` services, all served by one site, and `edges` edges that link
/// to nothing.
fn isolated_edges(services: u32, edges: u32) -> String {
    let mut text = String::from(
        "version: 1\nnodes:\n  - {id: s, kind: site, region: r, country: AU, location: {lat: 0, lon: 0}, \
         address: \"127.0.0.1:7000\", serves: [",
    );
    for i in 0..services {
        text.push_str(&format!(
            "{{service: svc-{i}, backend: \"127.0.0.1:9000\", capacity: 1}},"
        ));
    }
    text.push_str("]}\n");
    for i in 0..edges {
        let [_, _, c, d] = i.to_be_bytes();
        text.push_str(&format!(
            "  - {{id: e{i}, kind: edge, region: r, country: AU, location: {{lat: 0, lon: 0}}, \
             address: \"127.1.{c}.{d}:7000\"}}\n"
        ));
    }
    text.push_str("services:\n");
    for i in 0..services {
        // A VIP each (a service with neither a port nor VIPs is a warning of its own).
        let [_, b, c, d] = i.to_be_bytes();
        text.push_str(&format!(
            "  - {{name: svc-{i}, vips: [\"10.{b}.{c}.{d}:443\"]}}\n"
        ));
    }
    text
}

/// One site serving every service, each edge linked to it directly: which services each edge
/// reaches is found by ORing bitsets, not by listing each (service, site, edge): for 10,000
/// services and 49,000 edges that was 4.9 x 10^8 list entries (gigabytes, minutes), on every
/// load of a valid topology, the controller's start included.
#[test]
fn reachability_of_many_services_from_many_edges_stays_small() {
    let (services, edges) = (10_000u32, 49_000u32);
    let mut text = isolated_edges(services, 0);
    let at = text.find("services:\n").unwrap();
    let mut nodes = String::new();
    let mut links = String::from("links:\n");
    for i in 0..edges {
        let [_, _, c, d] = i.to_be_bytes();
        nodes.push_str(&format!(
            "  - {{id: e{i}, kind: edge, region: r, country: AU, location: {{lat: 0, lon: 0}}, \
             address: \"127.1.{c}.{d}:7000\"}}\n"
        ));
        links.push_str(&format!(
            "  - {{a: s, b: e{i}, latency: 1ms, capacity: 1Gbps}}\n"
        ));
    }
    text.insert_str(at, &(nodes + &links));
    assert!(text.len() < MAX_DOCUMENT_BYTES, "{} bytes", text.len());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let loaded = load(&text).map(|l| l.warnings.len());
        let _ = tx.send((loaded, start.elapsed()));
    });
    let (loaded, took) = rx
        .recv_timeout(HANG_GUARD)
        .unwrap_or_else(|_| panic!("validation still running after {HANG_GUARD:?}"));
    eprintln!("validated in {took:?}");
    assert_eq!(
        loaded.expect("valid"),
        0,
        "every edge reaches every service"
    );
}

/// An edge that reaches no site is one warning naming the first few services it cannot reach,
/// not one per service: 200 services and 900 cut-off edges were 180,000 warnings (and 1,000
/// services on 10,000 edges, 10^7, gigabytes).
#[test]
fn an_isolated_edge_is_one_warning_whatever_the_number_of_services() {
    let loaded = load(&isolated_edges(200, 900)).unwrap_or_else(|d| panic!("{:?}", &d[..3]));
    let w = &loaded.warnings;
    assert_eq!(w.len(), 900, "{:?}", &w[..w.len().min(3)]);
    assert!(
        w[0].message.starts_with(
            "edge node \"e0\" cannot reach any site of 200 services over links that are not \
             down, relayed by transits only: \"svc-0\" (allowed sites: s), \"svc-1\" (allowed \
             sites: s)"
        ),
        "{}",
        w[0].message
    );
    assert!(w[0].message.ends_with(" and 195 more"), "{}", w[0].message);
}

/// Lists of empty entries, bounded only by the YAML node limit, made millions of diagnostics
/// (each `{}` in `serves` is three missing fields, each in `pools` two). The first 1,000 by
/// position are kept, then one line counts the rest.
#[test]
fn diagnostics_stop_at_a_limit_and_count_the_rest() {
    let site = "  - {id: s, kind: site, region: r, country: AU, location: {lat: 0, lon: 0}, \
                address: \"127.0.0.1:7000\", serves: [";
    let text = format!(
        "version: 1\nnodes:\n{site}{}]}}\nservices:\n  - {{name: chat}}\npools: [{}]\n",
        "{},".repeat(200_000),
        "{},".repeat(200_000)
    );
    let d = refused(&text);
    assert_eq!(d.len(), MAX_DIAGNOSTICS + 1, "{:?}", &d[..3]);
    let last = &d[MAX_DIAGNOSTICS];
    assert!(last.is_error(), "{last}");
    assert_eq!((last.line, last.column), (0, 0));
    assert_eq!(
        last.message,
        "999002 more problems not shown (999001 errors, 1 warnings): only 1000 are listed, \
         errors first"
    );
    // The ones shown are the first: the site's first serves entries, in order.
    assert!(d[..MAX_DIAGNOSTICS].windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(
        d[0].to_string(),
        "3:113: error: missing field \"backend\" in serves entry 1 of node \"s\""
    );
}

/// A residency list repeating one entry (1,500,000 times, within the document's limits) and
/// 20,000 sites serving its service: every check of a site against the residency read the
/// whole list (3 x 10^10 comparisons per pass, minutes; a pass on every load and in every
/// router's graph). Repeats are taken once.
#[test]
fn a_residency_repeating_one_entry_is_read_once() {
    let (repeats, sites) = (1_500_000usize, 20_000u32);
    let mut text = String::from(
        "version: 1\nnodes:\n  - {id: e, kind: edge, region: r, country: AU, location: {lat: 0, lon: 0}, \
         address: \"127.0.0.1:7000\", client_address: \"127.0.0.1\"}\n",
    );
    let mut links = String::from("links:\n");
    for i in 0..sites {
        let [_, b, c, d] = i.to_be_bytes();
        let country = if i == 0 { "AU" } else { "NZ" };
        text.push_str(&format!(
            "  - {{id: s{i}, kind: site, region: r, country: {country}, location: {{lat: 0, lon: 0}}, \
             address: \"127.{}.{c}.{d}:7000\", serves: [{{service: chat, backend: \"10.0.0.1:80\", capacity: 1}}]}}\n",
            b + 1
        ));
        links.push_str(&format!(
            "  - {{a: e, b: s{i}, latency: 1ms, capacity: 1Gbps}}\n"
        ));
    }
    text.push_str(&links);
    text.push_str("services:\n  - {name: chat, port: 8080, residency: {countries: [");
    text.push_str(&"AU, ".repeat(repeats - 1));
    text.push_str("AU]}}\n");
    assert!(text.len() < MAX_DOCUMENT_BYTES, "{} bytes", text.len());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let loaded = load(&text).map(|l| {
            let graph = topology::graph::Graph::new(&l.topology);
            (
                l.topology.services[0].residency.countries.len(),
                graph.node_count(),
            )
        });
        let _ = tx.send((loaded, start.elapsed()));
    });
    let (loaded, took) = rx
        .recv_timeout(HANG_GUARD)
        .unwrap_or_else(|_| panic!("validation still running after {HANG_GUARD:?}"));
    eprintln!("validated in {took:?}");
    let (countries, _) = loaded.unwrap_or_else(|d| panic!("{:?}", &d[..d.len().min(3)]));
    assert_eq!(countries, 1, "the repeats kept");
}

/// A refused file whose warnings alone would fill the list shows its errors all the same, at
/// their line and column: errors are kept before warnings. (The first 1,000 by position were
/// kept: 1,001 edges without a `client_address` before a bad link showed 1,000 warnings, and
/// the error only as a count.)
#[test]
fn errors_are_listed_however_many_warnings_come_before_them() {
    let mut text = String::from("version: 1\nnodes:\n");
    for i in 0..1_001 {
        text.push_str(&format!(
            "  - {{id: e{i}, kind: edge, region: r, country: AU, location: {{lat: 0, lon: 0}}, \
             address: \"127.0.{}.{}:7000\", transparent_port: 15001}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    text.push_str(
        "  - {id: s, kind: site, region: r, country: AU, location: {lat: 0, lon: 0}, \
         address: \"127.1.0.1:7000\", serves: [{service: chat, backend: \"127.1.0.1:80\", \
         capacity: 10}]}\nservices:\n  - {name: chat, vips: [\"10.9.9.9:443\"]}\n\
         links:\n  - {a: e0, b: s, latency: fast, capacity: 1Gbps}\n",
    );
    let d = refused(&text);
    let warnings = d.iter().filter(|x| !x.is_error()).count();
    assert!(
        warnings >= 900,
        "the test needs the warnings to fill the list: {warnings}"
    );
    let bad = d
        .iter()
        .find(|x| x.is_error() && x.line > 0)
        .unwrap_or_else(|| panic!("no error located: {:?}", &d[d.len() - 2..]));
    assert!(bad.message.contains("latency"), "{bad}");
    // Still listed in position order.
    let shown = &d[..d.len() - 1];
    assert!(shown.windows(2).all(|w| w[0] <= w[1]));
}
