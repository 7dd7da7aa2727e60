//! A router on a host whose address for it is not configured yet (a boot that starts the router
//! before the network) runs as soon as the address appears: on its stored snapshot when the
//! controller is away (it gave the stored snapshot up at start, for good, and waited for the
//! controller), and on the controller's when it has none (it rejected the controller's
//! snapshot and waited for the controller to offer it again, after a back-off that doubles to
//! 5 minutes).
//!
//! The address comes and goes in a network namespace that the test makes, so it needs root,
//! `ip` and `curl` (`scripts/deps`; CI runs as root); set `TASMAN_SKIP_NETNS=1` to skip it on a machine
//! that cannot make network namespaces.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::netns::{self, NetNs};
use common::*;

/// The router's QUIC address, on the namespace's loopback only while the test says so.
const LATE: &str = "10.99.0.1";

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

/// A namespace with [`LATE`] on its loopback, and in `dir` the PKI and topology of one edge at
/// [`LATE`] and one site: the controller and router of a test.
struct Fabric {
    ns: NetNs,
    dir: tempfile::TempDir,
}

impl Fabric {
    /// `None` when the machine cannot make one (and [`netns::OPT_OUT`] says to skip).
    fn new(test: &str) -> Option<Fabric> {
        let unavailable = |why| netns::unavailable(why, "root, network namespaces, ip and curl");
        if !is_root() {
            unavailable("not root (a network namespace needs it)");
            return None;
        }
        // `ip` makes the namespace; `curl`, run in it, reads the router's metrics.
        for tool in ["ip", "curl"] {
            if which(tool).is_none() {
                unavailable(&format!(
                    "{tool} is not installed (scripts/deps installs it)"
                ));
                return None;
            }
        }
        let Some(ns) = NetNs::create(&format!("tasman-{test}-{}", std::process::id())) else {
            unavailable("`ip netns add` failed: no network namespace can be made here");
            return None;
        };
        assert!(ns.run(&["ip", "link", "set", "lo", "up"]));
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        make_pki(&d.join("pki"), &["controller", "e1"]);
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
        let f = Fabric { ns, dir };
        f.address(true);
        Some(f)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Adds (`true`) or deletes [`LATE`].
    fn address(&self, there: bool) {
        let op = if there { "add" } else { "del" };
        let host = format!("{LATE}/32");
        assert!(self.ns.run(&["ip", "addr", op, &host, "dev", "lo"]));
    }

    fn controller(&self) -> ControllerProc {
        let (topo, state, pki) = (
            self.path("topology.yaml"),
            self.path("controller"),
            self.path("pki"),
        );
        let (topo, state, pki) = (topo.display(), state.display(), pki.display());
        spawn_controller(&mut in_ns(
            &self.ns,
            &self.path("controller.log"),
            &[
                "controller",
                "--topology",
                &topo.to_string(),
                "--state",
                &state.to_string(),
                "--tls-dir",
                &pki.to_string(),
                "--listen",
                "127.0.0.1:7400",
                "--admin",
                "127.0.0.1:7401",
            ],
        ))
    }

    /// Router e1, with its state in `e1-state` and its log in `log`.
    fn router(&self, log: &str) -> Proc {
        let (pki, state) = (self.path("pki"), self.path("e1-state"));
        let (pki, state) = (pki.display().to_string(), state.display().to_string());
        let args = [
            "router",
            "--controller",
            "127.0.0.1:7400",
            "--node",
            "e1",
            "--tls-dir",
            &pki,
            "--state-dir",
            &state,
            "--metrics",
            "127.0.0.1:9100",
        ];
        Proc {
            name: "router e1".into(),
            child: in_ns(&self.ns, &self.path(log), &args)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Waits for `router` (logging to `log`) to start and serve: its metrics endpoint, bound
    /// last, answers. `on` names the snapshot it must say it runs on.
    fn serving(&self, router: &mut Proc, log: &str, on: &str) {
        eventually(DEADLINE, "the router to start", || {
            if let Ok(Some(status)) = router.child.try_wait() {
                panic!("the router exited ({status}):\n{}", self.log(log));
            }
            let l = self.log(log);
            l.contains(on) && l.contains("router started")
        });
        eventually(DEADLINE, "the router's metrics endpoint", || {
            self.ns.run(&[
                "curl",
                "-sf",
                "-o",
                "/dev/null",
                "http://127.0.0.1:9100/metrics",
            ])
        });
    }
}

#[test]
fn a_router_runs_on_its_stored_snapshot_once_its_late_address_appears() {
    let Some(f) = Fabric::new("late") else { return };
    // A first run with the controller stores the snapshot.
    let ctl = f.controller();
    let first = f.router("e1-first.log");
    let stored = f.path("e1-state").join(router::control::disk::FILE_NAME);
    eventually(DEADLINE, "the snapshot is stored", || stored.exists());
    drop(first);
    drop(ctl);

    // The restart: no controller, and the address not there yet.
    f.address(false);
    let mut router = f.router("e1.log");
    // It has read its stored snapshot and found the address missing.
    eventually(DEADLINE, "the router to read its stored snapshot", || {
        f.log("e1.log").contains("stored snapshot")
    });
    let log = f.log("e1.log");
    assert!(
        !log.contains("running on the snapshot stored on disk"),
        "{log}"
    );
    assert!(router.child.try_wait().unwrap().is_none(), "exited:\n{log}");

    f.address(true);
    f.serving(
        &mut router,
        "e1.log",
        "running on the snapshot stored on disk",
    );
}

/// The controller offers a rejected version again after 2 s, then 4, 8... A router that rejected
/// it three times, its address missing, would wait 8 s more for the next offer after the
/// address came: it asks for the snapshot itself as soon as the address can be bound.
#[test]
fn a_router_without_a_stored_snapshot_asks_again_once_its_late_address_appears() {
    let Some(f) = Fabric::new("late-new") else {
        return;
    };
    f.address(false);
    let _ctl = f.controller();
    let mut router = f.router("e1.log");
    let rejections = || f.log("e1.log").matches("rejecting snapshot").count();
    eventually(
        DEADLINE,
        "the router to reject the snapshot 3 times",
        || rejections() >= 3,
    );
    let log = f.log("e1.log");
    assert!(
        log.contains(&format!("{LATE}:7000 cannot be bound")),
        "{log}"
    );
    assert!(!log.contains("router started"), "{log}");

    f.address(true);
    f.serving(
        &mut router,
        "e1.log",
        "asking the controller for its snapshot again",
    );
    // No fourth rejection, and the controller brought its offer forward because the router
    // asked (it logs that only when the ask moves the offer earlier than its back-off's).
    assert_eq!(rejections(), 3, "{}", f.log("e1.log"));
    let ctl_log = f.log("controller.log");
    assert!(
        ctl_log.contains("the router asks for the version it rejected: offering it again"),
        "{ctl_log}"
    );
}
