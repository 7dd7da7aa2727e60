//! Pinned diagnostics. Each `tests/invalid/NAME.yaml` must fail to load with exactly the
//! `LINE:COL: severity: message` lines in `NAME.expected`; each `tests/warnings/NAME.yaml` must load
//! with exactly those warnings.
//!
//! After an intended change of messages, regenerate the golden files and review the diff:
//!
//! ```sh
//! UPDATE_GOLDEN=1 cargo test -p tasman-topology --test golden
//! git diff topology/tests/
//! ```

use std::path::{Path, PathBuf};

fn cases(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    v
}

/// Compares (or with UPDATE_GOLDEN=1 rewrites) every case's rendered diagnostics; returns
/// the mismatches so that one run reports all of them.
fn check(dir: &str, expect_valid: bool) -> (usize, Vec<String>) {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    let all = cases(dir);
    for path in &all {
        let text = std::fs::read_to_string(path).expect("readable case");
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let diags = match (topology::load(&text), expect_valid) {
            (Err(d), false) => d,
            (Ok(l), true) => l.warnings,
            (Ok(_), false) => {
                failures.push(format!(
                    "{name}: loaded, but it is under invalid/ and must fail"
                ));
                continue;
            }
            (Err(d), true) => {
                failures.push(format!(
                    "{name}: must load (with warnings) but failed: {d:#?}"
                ));
                continue;
            }
        };
        let got: String = diags.iter().map(|d| format!("{d}\n")).collect();
        if got.is_empty() {
            failures.push(format!("{name}: no diagnostics at all"));
        }
        let golden = path.with_extension("expected");
        if update {
            std::fs::write(&golden, &got).expect("write golden");
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if want != got {
            failures.push(format!(
                "{name}: diagnostics differ from {}\n--- expected\n{want}--- got\n{got}",
                golden.display()
            ));
        }
    }
    (all.len(), failures)
}

#[test]
fn invalid_documents_report_pinned_errors_with_positions() {
    let (n, failures) = check("invalid", false);
    assert!(
        n >= 15,
        "at least 15 invalid documents are pinned, found {n}"
    );
    assert!(
        failures.is_empty(),
        "{}\n(regenerate with UPDATE_GOLDEN=1 if the change is intended)",
        failures.join("\n")
    );
}

#[test]
fn documents_with_warnings_load_and_report_pinned_warnings() {
    let (n, failures) = check("warnings", true);
    assert!(n >= 1);
    assert!(
        failures.is_empty(),
        "{}\n(regenerate with UPDATE_GOLDEN=1 if the change is intended)",
        failures.join("\n")
    );
}

/// The rules added after texts were stored (a capacity in bytes per second, no nodes, an empty
/// `clients`, an unusable address, a pool holding an edge's
/// client_address, a transparent port taken by a service, a reserved node id, an IPv4-mapped
/// address or prefix) refuse a new text but only warn on a
/// stored one (`load_stored`), so that a controller upgraded onto a store holding such a text
/// still starts: each error of `load` is a warning of `load_stored`, and nothing else changes.
/// (The controller refused to start: its store's text in force no longer loaded.)
#[test]
fn rules_added_since_a_text_was_stored_only_warn_on_it() {
    for name in [
        "bytes_per_second_capacity",
        "empty_clients",
        "empty_nodes",
        "ipv4_mapped_addresses",
        "ipv4_mapped_quic_address",
        "pool_contains_client_address",
        "reserved_node_ids",
        "transparent_port_is_a_service_port",
        "unusable_addresses",
    ] {
        let text = invalid_text(name);
        let errors = topology::load(&text).expect_err(name);
        let stored = topology::load_stored(&text)
            .unwrap_or_else(|d| panic!("{name}: a stored text is refused: {d:?}"));
        assert!(!errors.is_empty());
        for e in errors.iter().filter(|d| d.is_error()) {
            let w = format!(
                "{}:{}: warning: {} (accepted in this stored version; a new text is refused for it)",
                e.line, e.column, e.message
            );
            assert!(
                stored.warnings.iter().any(|d| d.to_string() == w),
                "{name}: {w:?} not among {:?}",
                stored
                    .warnings
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
            );
        }
    }
    // A stored text's mapped QUIC address counts as its IPv4 form: the endpoint another node
    // has (accepted before the rule) is a warning too, naming both spellings.
    let text = invalid_text("ipv4_mapped_quic_address");
    let stored = topology::load_stored(&text).unwrap();
    assert!(
        stored.warnings.iter().any(|d| d.to_string()
            == "17:14: warning: address of node \"syd-site-1\": [::ffff:127.10.0.1]:7000 is already \
                the QUIC address of node \"syd-edge-1\" (written 127.10.0.1:7000) (accepted in \
                this stored version; a new text is refused for it)"),
        "{:?}",
        stored.warnings
    );
    // A stored byte rate keeps the meaning earlier builds gave it: bits.
    let text = invalid_text("bytes_per_second_capacity");
    let stored = topology::load_stored(&text).unwrap();
    assert_eq!(
        stored.topology.links[0].capacity,
        topology::Bandwidth::from_mbps(10_000)
    );
}

/// The text of `tests/invalid/NAME.yaml`.
fn invalid_text(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/invalid")
        .join(format!("{name}.yaml"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
