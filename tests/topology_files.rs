//! Every command that reads an operator's topology file reads it the same way (size-capped,
//! UTF-8), and the controller reads its `--topology` only for the first import.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_tasman");

fn huge(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("huge.yaml");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(topology::MAX_DOCUMENT_BYTES as u64 + 1)
        .unwrap();
    p
}

#[test]
fn every_command_refuses_an_oversize_topology_file_by_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let huge = huge(dir.path());
    let state = dir.path().join("state");
    let h = huge.to_str().unwrap();
    let s = state.to_str().unwrap();
    let commands: [&[&str]; 4] = [
        &["router", "--topology", h, "--node", "syd-edge-1"],
        &["demo", "--topology", h],
        &["topology", "apply", h, "--controller", "127.0.0.1:9"],
        &[
            "controller",
            "--state",
            s,
            "--topology",
            h,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
    ];
    for args in commands {
        let out = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // Unreadable is exit status 2 for the commands; a controller that cannot start exits 1.
        let want = if args[0] == "controller" { 1 } else { 2 };
        assert_eq!(out.status.code(), Some(want), "{args:?}");
        assert!(
            err.contains("over the size limit"),
            "{args:?} should name the size limit, said: {err}"
        );
    }
}

/// `tasman controller --state STATE --topology TOPO` on free loopback ports.
fn controller_cmd(state: &Path, topo: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["controller", "--state"])
        .arg(state)
        .arg("--topology")
        .arg(topo)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    cmd
}

/// Starts a controller on `state` with `--topology topo`; returns it once it is ready.
fn controller(state: &Path, topo: &Path) -> common::ControllerProc {
    common::spawn_controller(
        controller_cmd(state, topo)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped()),
    )
}

#[test]
fn a_controller_restarts_from_its_store_when_the_import_file_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let topo = dir.path().join("import.yaml");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join("examples/apac.yaml"), &topo).unwrap();
    drop(controller(&state, &topo));
    std::fs::remove_file(&topo).unwrap();
    let again = controller(&state, &topo);
    // It serves the imported topology from its store.
    let got = common::admin_command()
        .args([
            "topology",
            "get",
            "--controller",
            &again.admin,
            "--token-file",
        ])
        .arg(state.join("admin-token"))
        .output()
        .unwrap();
    assert!(got.status.success(), "{got:?}");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim_end(),
        std::fs::read_to_string(root.join("examples/apac.yaml"))
            .unwrap()
            .trim_end()
    );
}

#[test]
fn a_controller_names_its_invalid_import_file_in_each_diagnostic() {
    let dir = tempfile::tempdir().unwrap();
    let topo = dir.path().join("import.yaml");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("examples/apac.yaml")).unwrap();
    let link = "b: sin-transit-1,";
    assert!(text.contains(link), "examples/apac.yaml has no {link:?}");
    std::fs::write(&topo, text.replacen(link, "b: sin-transit-9,", 1)).unwrap();
    let out = controller_cmd(&dir.path().join("state"), &topo)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("{}:", topo.display());
    assert!(
        err.lines()
            .any(|l| l.starts_with(&want) && l.contains("sin-transit-9")),
        "no diagnostic names {want}: {err}"
    );
}
