//! `tasman topology route` and `tasman topology diff` on examples/apac.yaml, run as real
//! processes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/apac.yaml")
}

fn tasman(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tasman"))
        .args(args)
        .output()
        .expect("run tasman")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `route ... -o json` on the example and returns the parsed JSON (asserting exit 0).
fn route_json(from: &str, service: &str, down: &[&str]) -> Value {
    let file = example();
    let mut args = vec![
        "topology",
        "route",
        file.to_str().unwrap(),
        "--from",
        from,
        "--service",
        service,
        "-o",
        "json",
    ];
    for d in down {
        args.extend(["--down", d]);
    }
    let o = tasman(&args);
    assert!(
        o.status.success(),
        "exit {:?}, stderr: {}",
        o.status,
        stderr(&o)
    );
    serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", stdout(&o)))
}

fn sites(v: &Value) -> Vec<&str> {
    v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["site"].as_str().unwrap())
        .collect()
}

/// The first candidate in route JSON `v` is `site`, over `path`, at `latency_ms`.
fn assert_best(v: &Value, site: &str, path: &[&str], latency_ms: f64) {
    let c = &v["candidates"][0];
    assert_eq!(c["site"], site);
    assert_eq!(c["path"], serde_json::json!(path));
    assert!(
        (c["latency_ms"].as_f64().unwrap() - latency_ms).abs() < 1e-9,
        "{c}"
    );
}

#[test]
fn sydney_edge_picks_the_sydney_site_and_melbourne_when_sydney_is_down() {
    let v = route_json("syd-edge-1", "llm-chat", &[]);
    assert_eq!(v["from"], "syd-edge-1");
    assert_eq!(v["service"], "llm-chat");
    // 500us edge--transit + 300us transit--site.
    assert_best(
        &v,
        "syd-site-1",
        &["syd-edge-1", "syd-transit-1", "syd-site-1"],
        0.8,
    );
    // Best first, and the whole ranking is by distance: MEL (6.5ms) before SIN, TYO, BOM.
    assert_eq!(
        sites(&v),
        [
            "syd-site-1",
            "mel-site-1",
            "sin-site-1",
            "tyo-site-1",
            "bom-site-1"
        ]
    );

    let v = route_json("syd-edge-1", "llm-chat", &["syd-site-1"]);
    assert_eq!(v["down"], serde_json::json!(["syd-site-1"]));
    assert_best(
        &v,
        "mel-site-1",
        &["syd-edge-1", "syd-transit-1", "mel-site-1"],
        6.5,
    );
    assert!(!sites(&v).contains(&"syd-site-1"));
}

#[test]
fn a_down_link_is_avoided_like_a_down_node() {
    // Either spelling of the link name.
    for link in ["syd-site-1--syd-transit-1", "syd-transit-1--syd-site-1"] {
        let v = route_json("syd-edge-1", "llm-chat", &[link]);
        assert_eq!(sites(&v)[0], "mel-site-1", "--down {link}");
    }
}

#[test]
fn residency_keeps_au_only_service_in_australia_even_when_both_au_sites_are_down() {
    let v = route_json("syd-edge-1", "llm-chat-au", &[]);
    assert_eq!(sites(&v), ["syd-site-1", "mel-site-1"]);
    let v = route_json("syd-edge-1", "llm-chat-au", &["syd-site-1", "mel-site-1"]);
    assert!(sites(&v).is_empty());
    let v = route_json("syd-edge-1", "llm-chat", &["syd-site-1", "mel-site-1"]);
    assert_eq!(sites(&v)[0], "sin-site-1");
}

#[test]
fn table_output_shows_rank_site_cost_and_path() {
    let file = example();
    let o = tasman(&[
        "topology",
        "route",
        file.to_str().unwrap(),
        "--from",
        "syd-edge-1",
        "--service",
        "llm-chat",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let first = out
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .expect("a first row");
    assert!(
        first.contains("syd-site-1") && first.contains("800us"),
        "{out}"
    );
    assert!(
        first.contains("syd-edge-1 > syd-transit-1 > syd-site-1"),
        "{out}"
    );
}

/// Runs `route` on the example with `flags` and asserts exit 1, nothing on stdout, and every
/// `expected` piece in stderr.
fn refused(flags: &[&str], expected: &[&str]) {
    let file = example();
    let mut args = vec!["topology", "route", file.to_str().unwrap()];
    args.extend(flags);
    let o = tasman(&args);
    assert_eq!(o.status.code(), Some(1), "{flags:?}: {}", stderr(&o));
    assert!(stdout(&o).is_empty(), "{flags:?}");
    let e = stderr(&o);
    for piece in expected {
        assert!(e.contains(piece), "{flags:?}: {piece:?} not in {e}");
    }
}

#[test]
fn unknown_names_in_flags_are_refused_with_the_known_ones() {
    refused(
        &["--from", "syd-edge-9", "--service", "llm-chat"],
        &["--from", "unknown node \"syd-edge-9\"", "syd-edge-1"],
    );
    refused(
        &["--from", "syd-edge-1", "--service", "llm-video"],
        &[
            "--service",
            "unknown service \"llm-video\"",
            "embed, llm-chat, llm-chat-au",
        ],
    );
    refused(
        &[
            "--from",
            "syd-edge-1",
            "--service",
            "llm-chat",
            "--down",
            "syd-edge-1--tyo-site-1",
        ],
        &[
            "--down",
            "unknown link \"syd-edge-1--tyo-site-1\"",
            "syd-edge-1--syd-transit-1",
        ],
    );
    refused(
        &[
            "--from",
            "syd-edge-1",
            "--service",
            "llm-chat",
            "--down",
            "atlantis",
        ],
        &["--down", "unknown node \"atlantis\""],
    );
}

#[test]
fn unreadable_file_exits_2_and_invalid_file_prints_diagnostics_and_exits_1() {
    let o = tasman(&[
        "topology",
        "route",
        "/nonexistent/apac.yaml",
        "--from",
        "a",
        "--service",
        "b",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("/nonexistent/apac.yaml"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(example()).unwrap().replacen(
        "latency: 500us",
        "latency: 500 parsecs",
        1,
    );
    std::fs::write(&bad, text).unwrap();
    let o = tasman(&[
        "topology",
        "route",
        bad.to_str().unwrap(),
        "--from",
        "syd-edge-1",
        "--service",
        "llm-chat",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("{}:", bad.display())) && e.contains("parsecs"),
        "{e}"
    );
}

#[test]
fn diff_reports_the_changed_link_and_the_edges_that_move() {
    let dir = tempfile::tempdir().unwrap();
    let new = dir.path().join("new.yaml");
    let old_text = std::fs::read_to_string(example()).unwrap();
    let line = "  - {a: syd-site-1, b: syd-transit-1, latency: 300us, capacity: 100Gbps}";
    assert!(
        old_text.contains(line),
        "the example still has the SYD site link"
    );
    std::fs::write(
        &new,
        old_text.replace(
            line,
            "  - {a: syd-site-1, b: syd-transit-1, latency: 20ms, capacity: 100Gbps}",
        ),
    )
    .unwrap();
    let (old, new) = (example(), new);
    // `tasman topology diff OLD NEW -o json`, with `extra` flags.
    let diff_json = |extra: &[&str]| {
        let mut args = vec![
            "topology",
            "diff",
            old.to_str().unwrap(),
            new.to_str().unwrap(),
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        tasman(&args)
    };
    // The impact entry of syd-edge-1 for llm-chat.
    let syd_chat = |v: &Value| {
        v["impact"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["edge"] == "syd-edge-1" && e["service"] == "llm-chat")
            .expect("syd-edge-1/llm-chat is impacted")
            .clone()
    };
    let o = diff_json(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let changed = &v["changes"]["links"]["changed"];
    assert_eq!(changed[0]["id"], "syd-site-1--syd-transit-1");
    assert_eq!(
        changed[0]["fields"][0],
        serde_json::json!({"field": "latency", "old": "300us", "new": "20ms"})
    );
    assert_eq!(v["changes"]["nodes"]["changed"], serde_json::json!([]));
    let moved = syd_chat(&v);
    assert_eq!(moved["kind"], "site_changed");
    assert_eq!(moved["old"]["site"], "syd-site-1");
    assert_eq!(moved["new"]["site"], "mel-site-1");

    let o = tasman(&[
        "topology",
        "diff",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.contains("~ syd-site-1--syd-transit-1 latency: \"300us\" -> \"20ms\""),
        "{out}"
    );
    assert!(
        out.contains("syd-edge-1 llm-chat: site changed: syd-site-1"),
        "{out}"
    );

    // Edges that run with a wider anti-flap margin keep syd-site-1: only its cost changes.
    let wide =
        |margin: &str| diff_json(&["--hysteresis-margin", margin, "--hysteresis-ratio", "1"]);
    let o = wide("60s");
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let kept = syd_chat(&v);
    assert_eq!(kept["kind"], "cost_changed", "{kept}");
    assert_eq!(kept["new"]["site"], "syd-site-1");
    let o = wide("61s");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--hysteresis-margin"), "{}", stderr(&o));

    let o = tasman(&[
        "topology",
        "diff",
        old.to_str().unwrap(),
        old.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("no structural changes"));
}

#[test]
fn route_and_diff_help_show_examples() {
    for cmd in ["route", "diff"] {
        let o = tasman(&["topology", cmd, "--help"]);
        assert!(o.status.success());
        let out = stdout(&o);
        assert!(
            out.contains("Examples:")
                && out.contains(&format!("tasman topology {cmd} examples/apac.yaml")),
            "{out}"
        );
    }
}

/// The words of `site`'s row of a `topology route` table in `out`.
fn table_row(out: &str, site: &str) -> Vec<String> {
    out.lines()
        .find(|l| l.contains(&format!(" {site} ")))
        .unwrap_or_else(|| panic!("no row for {site}: {out}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Two sites 1 ms apart from the edge share its new connections by weight; the route command
/// shows each site's weight and share, in the table and in JSON.
#[test]
fn route_shows_the_weighted_share_of_equally_near_sites() {
    use common::{LOCAL, TopoYaml, free_udp};
    let backend = "127.0.0.1:9".parse().unwrap();
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .site_weighted(
            "site-a",
            free_udp(LOCAL),
            &[("chat", backend, 10, Some(300))],
        )
        .site_weighted("site-b", free_udp(LOCAL), &[("chat", backend, 10, None)])
        .site("site-far", free_udp(LOCAL), &[("chat", backend, 10)])
        .link("edge", "site-a", "1ms")
        .link("edge", "site-b", "2ms")
        .link("edge", "site-far", "3.5ms")
        .service("chat", 8080, &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.yaml");
    std::fs::write(&file, y.render()).unwrap();
    let route = |f: &std::path::Path, extra: &[&'static str]| {
        let mut a = vec!["topology", "route", f.to_str().unwrap()];
        a.extend(["--from", "edge", "--service", "chat"]);
        a.extend(extra);
        tasman(&a)
    };
    let args = |extra: &[&'static str]| route(&file, extra);
    let o = args(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let row = |site: &str| table_row(&out, site);
    // # site cost latency penalty weight share path
    assert_eq!(&row("site-a")[5..7], ["300", "75%"], "{out}");
    assert_eq!(&row("site-b")[5..7], ["100", "25%"], "{out}");
    assert_eq!(&row("site-far")[5..7], ["100", "-"], "{out}");
    assert!(
        out.contains("shared by weight among the sites within 2ms"),
        "{out}"
    );
    assert!(!out.contains("affinity"), "{out}");

    let o = args(&["-o", "json"]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let got: Vec<(&str, u64, f64)> = v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let site = c["site"].as_str().unwrap();
            (
                site,
                c["weight"].as_u64().unwrap(),
                c["share"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("site-a", 300, 0.75),
            ("site-b", 100, 0.25),
            ("site-far", 100, 0.0)
        ]
    );

    // A share above nothing that rounds to 0 reads `<1%` (it read `0%`, as a site taking none
    // would), as the plan and `tasman status` write it.
    let lopsided = dir.path().join("lopsided.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&lopsided, text.replace("weight: 300", "weight: 1000000")).unwrap();
    let out = stdout(&route(&lopsided, &[]));
    assert_eq!(
        &table_row(&out, "site-a")[5..7],
        ["1000000", "100%"],
        "{out}"
    );
    assert_eq!(&table_row(&out, "site-b")[5..7], ["100", "<1%"], "{out}");

    // With affinity, the table says that each client keeps to one site.
    y.service_field("chat", "affinity", "source_ip");
    let sticky = dir.path().join("sticky.yaml");
    std::fs::write(&sticky, y.render()).unwrap();
    let o = route(&sticky, &[]);
    assert!(
        stdout(&o).contains("; each client address keeps to one (affinity: source_ip)"),
        "{}",
        stdout(&o)
    );

    // The diff's impact names a change of weight that moves shares, though no site changes.
    let text = std::fs::read_to_string(&file).unwrap();
    let even = dir.path().join("even.yaml");
    std::fs::write(&even, text.replace("weight: 300", "weight: 100")).unwrap();
    let o = tasman(&[
        "topology",
        "diff",
        file.to_str().unwrap(),
        even.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("edge chat: shares changed: site-a")
            && out.contains("; shared: site-a 75% + site-b 25% -> site-a 50% + site-b 50%"),
        "{out}"
    );
}

/// A near site dialled to 30 keeps 30 % of the edge's first tries and the far site, outside the
/// equally near group, gets the rest: `route` shows the dial and the expected shares (table and
/// JSON), and `diff` shows the dial change and its effect on shares, though no site changes.
#[test]
fn route_and_diff_show_a_traffic_dial() {
    use common::{LOCAL, TopoYaml, free_udp};
    let backend = "127.0.0.1:9".parse().unwrap();
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .site_weighted("near", free_udp(LOCAL), &[("chat", backend, 10, Some(100))])
        .site("far", free_udp(LOCAL), &[("chat", backend, 10)])
        .link("edge", "near", "1ms")
        .link("edge", "far", "9ms")
        .service("chat", 8080, &[]);
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.yaml");
    let text = y.render();
    std::fs::write(&plain, &text).unwrap();
    let dialled = dir.path().join("dialled.yaml");
    assert_eq!(text.matches("weight: 100}").count(), 1, "{text}");
    std::fs::write(
        &dialled,
        text.replace("weight: 100}", "weight: 100, dial: 30}"),
    )
    .unwrap();
    let route = |file: &Path, extra: &[&str]| {
        let mut a = vec!["topology", "route", file.to_str().unwrap()];
        a.extend(["--from", "edge", "--service", "chat"]);
        a.extend(extra);
        let o = tasman(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };

    let out = route(&dialled, &[]);
    let row = |site: &str| {
        out.lines()
            .find(|l| l.contains(&format!(" {site} ")))
            .unwrap_or_else(|| panic!("no row for {site}: {out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    // # site cost latency penalty weight dial share path
    assert!(
        out.lines().any(|l| l.contains("weight  dial  share")),
        "{out}"
    );
    assert_eq!(&row("near")[5..8], ["100", "30%", "30%"], "{out}");
    assert_eq!(&row("far")[5..8], ["100", "100%", "70%"], "{out}");
    assert!(
        out.contains("traffic dials: a site takes its dial's percent"),
        "{out}"
    );
    // Without the dial: no dial column, near takes every first try.
    let out = route(&plain, &[]);
    assert!(!out.contains("dial"), "{out}");

    let v: Value = serde_json::from_str(&route(&dialled, &["-o", "json"])).unwrap();
    let c = v["candidates"].as_array().unwrap();
    assert_eq!(
        (
            c[0]["site"].as_str(),
            c[0]["dial"].as_u64(),
            c[0]["share"].as_f64()
        ),
        (Some("near"), Some(30), Some(0.3))
    );
    assert_eq!(
        (
            c[1]["site"].as_str(),
            c[1].get("dial"),
            c[1]["share"].as_f64()
        ),
        (Some("far"), None, Some(0.7)),
        "no dial key at 100"
    );

    let o = tasman(&[
        "topology",
        "diff",
        plain.to_str().unwrap(),
        dialled.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("  ~ near serves[chat].dial: 100 -> 30"),
        "{out}"
    );
    assert!(
        out.contains("edge chat: shares changed: near")
            && out.contains("; shared: one site -> near 30% + far 70%"),
        "{out}"
    );
    let o = tasman(&[
        "topology",
        "diff",
        plain.to_str().unwrap(),
        dialled.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let field = &v["changes"]["nodes"]["changed"][0]["fields"][0];
    assert_eq!(
        (
            field["field"].as_str(),
            field["old"].as_u64(),
            field["new"].as_u64()
        ),
        (Some("serves[chat].dial"), Some(100), Some(30))
    );
    assert_eq!(v["impact"][0]["kind"], "shares_changed");

    // Out of range: refused with the field's line and column.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        text.replace("weight: 100}", "weight: 100, dial: 101}"),
    )
    .unwrap();
    let o = tasman(&["topology", "validate", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let line = text
        .lines()
        .position(|l| l.contains("weight: 100}"))
        .unwrap()
        + 1;
    let col = text
        .lines()
        .nth(line - 1)
        .unwrap()
        .find("weight: 100}")
        .unwrap()
        + 20;
    assert!(
        stderr(&o).contains(&format!(
            "{}:{line}:{col}: error: dial of serves entry 1 of node \"near\": 101 is out of range (expected 0 to 100)",
            bad.display()
        )),
        "{}",
        stderr(&o)
    );
}

/// The old side of a diff is often the text in force, as `tasman topology get` prints it,
/// which an older build may have stored under fewer rules (here an empty `clients`, refused in a new
/// text since): it is read as the controller reads it, those rules as warnings, so the diff
/// with the fixed text is shown. (The diff exited 1 on the old file's error.) The new side
/// keeps every rule.
#[test]
fn a_diff_reads_its_old_side_as_a_stored_text() {
    let dir = tempfile::tempdir().unwrap();
    let stored = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("topology/tests/invalid/empty_clients.yaml"),
    )
    .unwrap();
    let fixed: String = stored
        .lines()
        .filter(|l| !l.trim_start().starts_with("clients:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(stored, fixed);
    let (old, new) = (dir.path().join("old.yaml"), dir.path().join("new.yaml"));
    std::fs::write(&old, &stored).unwrap();
    std::fs::write(&new, &fixed).unwrap();
    let o = tasman(&[
        "topology",
        "diff",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning"), "{}", stderr(&o));
    // An empty list and no list read alike (any client): the same model.
    assert!(
        stdout(&o).contains("no structural changes"),
        "{}",
        stdout(&o)
    );
    // The other way round, the new side's error still fails the diff.
    let o = tasman(&[
        "topology",
        "diff",
        new.to_str().unwrap(),
        old.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}
