//! A router that restarts while the controller is away, on a host whose address for it is not
//! configured yet (a boot that starts the router before the network), runs on its stored
//! snapshot as soon as the address appears. (It gave the stored snapshot up at start, for good,
//! and waited for the controller.)
//!
//! The address comes and goes in a network namespace that the test makes, so it needs root and
//! `ip` (`scripts/deps`; CI runs as root); set `TASMAN_SKIP_NETNS=1` to skip it on a machine
//! that cannot make network namespaces.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::netns::{self, NetNs};
use common::*;

/// The router's QUIC address, on the namespace's loopback only while the test says so.
const LATE: &str = "10.99.0.1";

fn unavailable(why: &str) {
    netns::unavailable(why, "root, network namespaces and ip");
}

/// `tasman ARGS` in namespace `ns`, dying with the test, logging at info to `log`.
fn in_ns(ns: &NetNs, log: &Path, args: &[&str]) -> Command {
    let exec = ns.exec();
    let mut cmd = Command::new(&exec[0]);
    cmd.args(&exec[1..])
        .arg(tasman())
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(log).unwrap());
    die_with_parent(&mut cmd);
    cmd
}

#[test]
fn a_router_runs_on_its_stored_snapshot_once_its_late_address_appears() {
    if !is_root() {
        unavailable("not root (a network namespace needs it)");
        return;
    }
    let Some(ns) = NetNs::create(&format!("tasman-late-{}", std::process::id())) else {
        unavailable("`ip netns add` failed: no network namespace can be made here");
        return;
    };
    let host = format!("{LATE}/32");
    assert!(ns.run(&["ip", "link", "set", "lo", "up"]));
    assert!(ns.run(&["ip", "addr", "add", &host, "dev", "lo"]));

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = d.join("pki");
    make_pki(&pki, &["controller", "e1"]);
    let at = |a: &str| a.parse::<std::net::SocketAddr>().unwrap();
    let mut y = TopoYaml::default();
    y.edge("e1", at(&format!("{LATE}:7000")), LOCAL, None)
        .site(
            "s1",
            at("127.0.0.1:7002"),
            &[("chat", at("127.0.0.1:9000"), 10)],
        )
        .link("e1", "s1", "1ms")
        .service("chat", 8080, &[]);
    std::fs::write(d.join("topology.yaml"), y.render()).unwrap();
    let (pki_s, state) = (pki.display().to_string(), d.join("e1-state"));
    let state_s = state.display().to_string();
    let router_args = [
        "router",
        "--controller",
        "127.0.0.1:7400",
        "--node",
        "e1",
        "--tls-dir",
        &pki_s,
        "--state-dir",
        &state_s,
        "--metrics",
        "127.0.0.1:9100",
    ];

    // A first run with the controller stores the snapshot.
    let topo = d.join("topology.yaml").display().to_string();
    let ctl_state = d.join("controller").display().to_string();
    let ctl = spawn_controller(
        in_ns(
            &ns,
            &d.join("controller.log"),
            &[
                "controller",
                "--topology",
                &topo,
                "--state",
                &ctl_state,
                "--tls-dir",
                &pki_s,
                "--listen",
                "127.0.0.1:7400",
                "--admin",
                "127.0.0.1:7401",
            ],
        )
        .stderr(Stdio::null()),
    );
    let first = Proc {
        name: "router e1".into(),
        child: in_ns(&ns, &d.join("e1-first.log"), &router_args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let stored = state.join(router::control::disk::FILE_NAME);
    eventually(DEADLINE, "the snapshot is stored", || stored.exists());
    drop(first);
    drop(ctl);

    // The restart: no controller, and the address not there yet.
    assert!(ns.run(&["ip", "addr", "del", &host, "dev", "lo"]));
    let log_path = d.join("e1.log");
    let mut router = Proc {
        name: "router e1".into(),
        child: in_ns(&ns, &log_path, &router_args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // It has read its stored snapshot and found the address missing.
    eventually(DEADLINE, "the router to read its stored snapshot", || {
        log().contains("stored snapshot")
    });
    assert!(
        !log().contains("running on the snapshot stored on disk"),
        "{}",
        log()
    );
    assert!(
        router.child.try_wait().unwrap().is_none(),
        "exited:\n{}",
        log()
    );

    assert!(ns.run(&["ip", "addr", "add", &host, "dev", "lo"]));
    eventually(
        DEADLINE,
        "the router to start on its stored snapshot",
        || {
            if let Ok(Some(status)) = router.child.try_wait() {
                panic!("the router exited ({status}):\n{}", log());
            }
            let l = log();
            l.contains("running on the snapshot stored on disk") && l.contains("router started")
        },
    );
    // It serves: its metrics endpoint, bound last, answers.
    eventually(DEADLINE, "the router's metrics endpoint", || {
        ns.run(&[
            "curl",
            "-sf",
            "-o",
            "/dev/null",
            "http://127.0.0.1:9100/metrics",
        ])
    });
}
