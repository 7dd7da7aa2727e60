//! Circuits through the real binary: `tasman controller` as a process, `tasman circuit ...` as
//! processes against its admin API. Admission, refusal naming the link, idempotency under
//! concurrent creates, bad input that changes nothing, survival of a controller restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{
    ControllerProc, LOCAL, admin_command, circuit_cli, circuit_create_args as create_args,
    eventually, free_tcp_port, free_udp, spawn_controller, tasman,
};

/// e1 -- t1 -- s1 (1 Gbit/s, fast) and t1 -- s2 (400 Mbit/s, slow); e1 -- t1 is 10 Gbit/s.
fn topology(port: u16) -> String {
    let node = |id: &str, kind: &str, extra: &str| {
        format!(
            "  - id: {id}\n    kind: {kind}\n    region: au-east\n    country: AU\n    location: {{lat: -33.9, lon: 151.2}}\n    address: \"{}\"\n{extra}",
            free_udp(LOCAL)
        )
    };
    let serves = |b: u16| {
        format!(
            "    serves:\n      - {{service: llm, backend: \"127.0.0.1:{b}\", capacity: 100}}\n"
        )
    };
    format!(
        "version: 1\nnodes:\n{}{}{}{}links:\n  - {{a: e1, b: t1, latency: 1ms, capacity: 10Gbps}}\n  - {{a: t1, b: s1, latency: 1ms, capacity: 1Gbps}}\n  - {{a: t1, b: s2, latency: 5ms, capacity: 400Mbps}}\nservices:\n  - name: llm\n    port: {port}\n    requires_circuit: true\npools:\n  - {{name: vips, prefix: 127.78.0.0/28}}\n",
        node("e1", "edge", "    client_address: \"127.0.0.1\"\n"),
        node("t1", "transit", ""),
        node("s1", "site", &serves(free_tcp_port(LOCAL))),
        node("s2", "site", &serves(free_tcp_port(LOCAL))),
    )
}

/// A `tasman controller` process (killed on drop) and its state directory.
struct Controller {
    _proc: ControllerProc,
    admin: String,
    state: PathBuf,
}

impl Controller {
    fn start(topology: &Path, state: &Path) -> Controller {
        let proc = spawn_controller(
            Command::new(tasman())
                .args(["controller", "--topology"])
                .arg(topology)
                .arg("--state")
                .arg(state)
                .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
                .stderr(Stdio::null()),
        );
        Controller {
            admin: proc.admin.clone(),
            _proc: proc,
            state: state.to_path_buf(),
        }
    }

    fn circuit(&self, args: &[&str]) -> Output {
        circuit_cli(&self.admin, &self.state, args)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.circuit(&a);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    /// Every circuit (`list --all`): the output must be an array.
    fn list(&self) -> Vec<serde_json::Value> {
        let list = self.json(&["list", "--all"]);
        list.as_array()
            .unwrap_or_else(|| panic!("list --all: not an array: {list}"))
            .clone()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let topo = dir.path().join("topology.yaml");
    std::fs::write(&topo, topology(free_tcp_port(LOCAL))).unwrap();
    (dir, topo)
}

#[test]
fn bad_input_is_refused_with_a_clear_message_and_changes_nothing() {
    let (dir, topo) = setup();
    let c = Controller::start(&topo, &dir.path().join("state"));
    let keyed = |key| {
        let mut a = create_args("a", "10.0.0.0/24", "100Mbps");
        a.extend(["--idempotency-key", key]);
        a
    };
    let with = |extra: &[&'static str]| {
        let mut a = create_args("a", "10.0.0.0/24", "100Mbps");
        a.extend(extra);
        a
    };
    let cases: [(Vec<&str>, i32, &str); 14] = [
        (
            create_args("a", "10.0.0.0/24", "100Mbps")
                .into_iter()
                .map(|a| if a == "llm" { "lml" } else { a })
                .collect(),
            1,
            "unknown service \"lml\" (services: llm)",
        ),
        (
            create_args("a", "10.0.0.300/24", "100Mbps"),
            2,
            "is not an IP prefix",
        ),
        (
            create_args("a", "10.0.0.7/24", "100Mbps"),
            2,
            "has host bits set; did you mean 10.0.0.0/24?",
        ),
        (
            create_args("a", "10.0.0.0/24", "100Mbs"),
            2,
            "unknown unit \"Mbs\"",
        ),
        (
            create_args("a", "10.0.0.0/24", "2Gbps"),
            1,
            "rate 2Gbps exceeds the capacity of every path from \"e1\" to \"llm\": the widest path is limited by link s1--t1 with capacity 1Gbps",
        ),
        // Malformed names and keys are bad input (exit 2) named by their flag, as the docs
        // say; they were sent and refused by the controller (exit 1) without the flag.
        (
            create_args("bad name!", "10.0.0.0/24", "100Mbps"),
            2,
            "invalid value 'bad name!' for '--name <NAME>': name \"bad name!\" contains ' '",
        ),
        (
            create_args("c-7", "10.0.0.0/24", "100Mbps"),
            2,
            "invalid value 'c-7' for '--name <NAME>': name \"c-7\" has the form of a circuit id",
        ),
        (
            create_args("headroom", "10.0.0.0/24", "100Mbps"),
            2,
            "invalid value 'headroom' for '--name <NAME>': name \"headroom\" is reserved",
        ),
        (
            keyed("order 7"),
            2,
            "invalid value 'order 7' for '--idempotency-key <IDEMPOTENCY_KEY>': idempotency key \"order 7\" contains ' '",
        ),
        // So are malformed regions and sites; they were refused by the controller (exit 1)
        // naming the JSON field b_end.regions.
        (
            with(&["--region", "AU-East"]),
            2,
            "invalid value 'AU-East' for '--region <REGION>': \"AU-East\" is not a valid id",
        ),
        (
            with(&["--site", "s1", "--site", "s1"]),
            2,
            "--site lists \"s1\" twice",
        ),
        // A reserved name is no circuit's (exit 1, as an unknown one): `show headroom` read
        // the headroom table as a circuit and exited 2.
        (
            vec!["show", "headroom"],
            1,
            "no circuit \"headroom\" (by id or name): \"headroom\" is reserved",
        ),
        (
            vec!["history", "validate"],
            1,
            "no circuit \"validate\" (by id or name): \"validate\" is reserved",
        ),
        // validate records nothing: it has no --author to record.
        (
            {
                let mut v = with(&["--author", "alice"]);
                v[0] = "validate";
                v
            },
            2,
            "unexpected argument '--author'",
        ),
    ];
    for (args, code, msg) in cases {
        let out = c.circuit(&args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(msg),
            "{args:?}: stderr {:?} lacks {msg:?}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "nothing on stdout for a refusal");
    }
    // validate refuses the same way and never records anything either.
    let mut v = create_args("a", "10.0.0.0/24", "2Gbps");
    v[0] = "validate";
    assert_eq!(c.circuit(&v).status.code(), Some(1));
    assert_eq!(
        c.list(),
        Vec::<serde_json::Value>::new(),
        "a refused request changed nothing"
    );
    let headroom = c.json(&["headroom"]);
    let rows = headroom.as_array().expect("headroom: an array");
    assert_eq!(rows.len(), 3, "a row per link: {headroom}");
    assert!(rows.iter().all(|r| r["reserved"] == "0bps"), "{headroom}");
}

#[test]
fn placement_refuses_what_does_not_fit_naming_the_link_also_beside_a_deleted_circuit() {
    let (dir, topo) = setup();
    let c = Controller::start(&topo, &dir.path().join("state"));
    let a = c.json(&create_args("acme", "10.1.0.0/24", "600Mbps"));
    assert_eq!(a["state"], "provisioning", "{a}");
    assert_eq!(a["requested_rate"], "600Mbps");
    assert!(
        a.get("assigned_rate").is_none(),
        "nothing acknowledged yet: {a}"
    );
    assert_eq!(a["path"], serde_json::json!(["e1", "t1", "s1"]));
    assert_eq!(a["vip"], "127.78.0.1");

    // 600 more: 400 left towards s1, and the s2 path is only 400 wide.
    let out = c.circuit(&create_args("beta", "10.2.0.0/24", "600Mbps"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        "error: cannot place 600Mbps from \"e1\" to \"llm\": link s1--t1 has only 400Mbps free (capacity 1Gbps, 600Mbps \
         reserved by other circuits) on the best path e1 -> t1 -> s1; at most 400Mbps fits on any path now"
    );
    // 300 fits beside it on the fast path; 400 more then only on the slow one.
    let b = c.json(&create_args("small", "10.3.0.0/24", "300Mbps"));
    assert_eq!(b["path"], serde_json::json!(["e1", "t1", "s1"]));
    assert_eq!(b["vip"], "127.78.0.2");

    // Resize: in place when it fits (requested changes now, assigned when acknowledged);
    // refused, changing nothing, when no path has room.
    let r = c.json(&["resize", "small", "--rate", "350Mbps"]);
    assert_eq!(
        (r["requested_rate"].as_str(), r["path"].clone()),
        (Some("350Mbps"), serde_json::json!(["e1", "t1", "s1"]))
    );
    let out = c.circuit(&["resize", "small", "--rate", "900Mbps"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("link s1--t1 has only"),
        "{}",
        stderr(&out)
    );
    assert_eq!(c.json(&["show", "small"])["requested_rate"], "350Mbps");

    // Delete acme: out of the snapshots, but it holds its capacity and VIP until its routers
    // acknowledge its removal (none runs here: the 60 s acknowledgement timeout), since a
    // router still on an older snapshot carries it. beta still does not fit, and a circuit
    // that fits does not get acme's VIP.
    let d = c.json(&["delete", "acme"]);
    assert_eq!(d["state"], "decommissioning");
    let out = c.circuit(&create_args("beta", "10.2.0.0/24", "600Mbps"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot place 600Mbps")
            && stderr(&out).contains("950Mbps reserved by other circuits"),
        "{}",
        stderr(&out)
    );
    let beta = c.json(&create_args("beta", "10.2.0.0/24", "50Mbps"));
    assert_eq!(beta["path"], serde_json::json!(["e1", "t1", "s1"]));
    assert_eq!(
        beta["vip"], "127.78.0.3",
        "a VIP an edge may still map to a deleted circuit is not handed out"
    );

    // A topology edit that would over-commit a reserved link is flagged in the apply plan
    // (for the live circuits: acme is leaving).
    let text = std::fs::read_to_string(&topo).unwrap().replace(
        "{a: t1, b: s1, latency: 1ms, capacity: 1Gbps}",
        "{a: t1, b: s1, latency: 1ms, capacity: 300Mbps}",
    );
    let smaller = dir.path().join("smaller.yaml");
    std::fs::write(&smaller, text).unwrap();
    let out = admin_command()
        .args(["topology", "apply"])
        .arg(&smaller)
        .args(["--dry-run", "--controller", &c.admin, "--token-file"])
        .arg(c.state.join("admin-token"))
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("link s1--t1 would be over-committed: 400Mbps reserved by circuits c-000002, c-000003 but capacity 300Mbps"),
        "plan: {plan}\nstderr: {}",
        stderr(&out)
    );

    // The history says who did what.
    let out = c.circuit(&["history", "acme"]);
    let h = String::from_utf8_lossy(&out.stdout);
    assert!(
        h.contains("tester") && h.contains("create") && h.contains("place") && h.contains("delete"),
        "{h}"
    );
    // Table and YAML outputs exist and name the circuits.
    let t = String::from_utf8_lossy(&c.circuit(&["list", "-o", "table"]).stdout).into_owned();
    assert!(t.contains("beta") && t.contains("small"), "{t}");
    // No router acknowledged acme's removal (none runs here): it stays decommissioning (for
    // the 60 s acknowledgement timeout), holding its capacity and VIP until then.
    assert!(
        t.lines()
            .any(|l| l.contains("acme") && l.contains("decommissioning")),
        "{t}"
    );
    let y =
        String::from_utf8_lossy(&c.circuit(&["show", "beta", "-o", "yaml"]).stdout).into_owned();
    assert!(y.contains("requested_rate: 50Mbps"), "{y}");

    // Shared automation sets TASMAN_AUTHOR, as for topology changes: it names the author of a
    // circuit change too (over $USER).
    let out = admin_command()
        .args(["circuit", "resize", "beta", "--rate", "40Mbps"])
        .args(["--controller", &c.admin, "--token-file"])
        .arg(c.state.join("admin-token"))
        .env("USER", "tester")
        .env("TASMAN_AUTHOR", "provisioning-bot")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let h = String::from_utf8_lossy(&c.circuit(&["history", "beta"]).stdout).into_owned();
    assert!(
        h.lines()
            .any(|l| l.contains("provisioning-bot") && l.contains("resize")),
        "{h}"
    );
}

#[test]
fn concurrent_creates_with_one_idempotency_key_yield_one_circuit_and_survive_a_restart() {
    let (dir, topo) = setup();
    let state = dir.path().join("state");
    let c = Controller::start(&topo, &state);
    let token = state.join("admin-token");
    // Eight clients at once, one key.
    let children: Vec<Child> = (0..8)
        .map(|_| {
            let mut args = create_args("acme", "10.1.0.0/24", "100Mbps");
            args.extend(["--idempotency-key", "order-1234", "-o", "json"]);
            admin_command()
                .arg("circuit")
                .args(&args)
                .args(["--controller", &c.admin, "--token-file"])
                .arg(&token)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ids = Vec::new();
    for ch in children {
        let out = ch.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one circuit for one key: {ids:?}");
    // The same key with a different request is refused.
    let mut args = create_args("acme", "10.1.0.0/24", "200Mbps");
    args.extend(["--idempotency-key", "order-1234"]);
    let out = c.circuit(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("was used for circuit"),
        "{}",
        stderr(&out)
    );
    let other = c.json(&create_args("other", "10.9.0.0/24", "50Mbps"));
    c.json(&["delete", other["id"].as_str().unwrap()]);
    let before = c.list();
    assert_eq!(before.len(), 2);

    // Restart (SIGKILL, then the same state directory; --topology is ignored now).
    drop(c);
    let c = Controller::start(&topo, &state);
    let after = c.list();
    let key = |v: &serde_json::Value| {
        (
            v["id"].clone(),
            v["state"].clone(),
            v["vip"].clone(),
            v["path"].clone(),
        )
    };
    assert_eq!(
        after.iter().map(key).collect::<Vec<_>>(),
        before.iter().map(key).collect::<Vec<_>>()
    );
    // A retry after the restart still returns the same circuit.
    let mut args = create_args("acme", "10.1.0.0/24", "100Mbps");
    args.extend(["--idempotency-key", "order-1234"]);
    let again = c.json(&args);
    assert_eq!(again["id"], serde_json::json!(ids[0]));
    eventually(Duration::from_secs(5), "list is stable", || {
        c.list().len() == 2
    });
}
