//! `tasman demo` end to end: the real binary starts a controller and the APAC fabric (21
//! in-process routers taking their snapshots from it, every link emulated), sends requests from
//! several edges, fails a site over, raises a link's latency through the admin API, drains a
//! site as planned maintenance does, keeps the
//! fabric up (`--keep`) for `tasman status` with the printed admin address and token, and exits 0
//! on SIGTERM. Ctrl-C in the middle of the tour stops the fabric and leaves nothing in the
//! temporary directory; a `--fail` that would show no failover is refused.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Held by each test while its demo runs: a demo is 21 routers and 54 link emulators, and two
/// at once on a small machine slow each other past their start-up deadlines.
static ONE_DEMO_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_demo_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_DEMO_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits for `child` to exit, at most until `deadline`; kills it then.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait for tasman demo") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// The entries of `dir`, by name.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read the temporary directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// Ctrl-C while the tour runs: the demo stops the fabric and removes its directory (the demo
/// CA's and every node's private key) before it exits; a process killed by the signal left it.
#[test]
fn ctrl_c_during_the_tour_stops_the_fabric_and_removes_its_directory() {
    interrupted_during_the_tour(libc::SIGINT);
}

/// The terminal closed while the tour runs (SIGHUP) stops the demo as Ctrl-C does, its
/// directory removed. (SIGHUP killed it by the default action: the directory, the demo CA's
/// key in it, was left behind.)
#[test]
fn a_closed_terminal_during_the_tour_stops_the_fabric_and_removes_its_directory() {
    interrupted_during_the_tour(libc::SIGHUP);
}

/// A demo started with SIGHUP ignored (`nohup tasman ...`) keeps it ignored: a SIGHUP (its
/// terminal closing) does not stop it, and the tour goes on. (tokio's handler replaced the
/// disposition the parent had set: a `nohup tasman router` stopped when its terminal closed.)
#[test]
fn a_hangup_the_parent_ignored_stays_ignored() {
    let _one = one_demo_at_a_time();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let mut demo = Demo::start_with(&["--quick", "--ephemeral-ports"], Some(tmp.path()), true);
    assert!(
        demo.read_until("Requests:"),
        "the tour did not start:\n{}",
        demo.out
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(demo.child.id() as libc::pid_t, libc::SIGHUP);
    }
    assert!(
        demo.read_until("Failover:"),
        "the tour stopped after the ignored SIGHUP:\n{}",
        demo.out
    );
    // SIGINT is not ignored: it stops the demo, which cleans up.
    unsafe {
        libc::kill(demo.child.id() as libc::pid_t, libc::SIGINT);
    }
    let status = wait_until(&mut demo.child, Instant::now() + Duration::from_secs(60));
    assert!(status.is_some(), "still running 60 s after SIGINT");
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));
}

/// The tour's reader gone (`tasman demo | head`) stops the demo as Ctrl-C does: exit 1, its
/// directory removed, no panic. (`println!` panicked: exit 101, and the directory was removed
/// while the routers still ran.)
#[test]
fn a_reader_gone_stops_the_demo_as_ctrl_c_does() {
    let _one = one_demo_at_a_time();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tasman"));
    cmd.args(["demo", "--quick", "--ephemeral-ports"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    common::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().expect("run tasman demo");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut out = String::new();
    let touring = lines.by_ref().map_while(Result::ok).any(|l| {
        out.push_str(&l);
        out.push('\n');
        l.starts_with("Requests:")
    });
    assert!(touring, "the tour did not start:\n{out}");
    // The reader goes.
    drop(lines);
    let status = wait_until(&mut child, Instant::now() + Duration::from_secs(120));
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = status.unwrap_or_else(|| panic!("still running 120 s after its reader went"));
    assert_eq!(status.code(), Some(1), "{status:?}\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        entries(tmp.path()).is_empty(),
        "left behind in TMPDIR: {:?}",
        entries(tmp.path())
    );
}

fn interrupted_during_the_tour(sig: libc::c_int) {
    let _one = one_demo_at_a_time();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let mut demo = Demo::start(&["--quick", "--ephemeral-ports"], Some(tmp.path()));
    // Printed once the fabric runs, before the first request.
    let touring = demo.read_until("Requests:");
    let Demo {
        mut child,
        rx,
        reader,
        mut out,
    } = demo;
    assert!(touring, "the tour did not start:\n{out}");
    // The demo keeps its PKI and state under TMPDIR.
    let during = entries(tmp.path());
    assert_eq!(during.len(), 1, "{during:?}");
    assert!(
        tmp.path().join(&during[0]).join("pki").is_dir(),
        "{during:?}"
    );

    let signalled = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
    let status = wait_until(&mut child, signalled + Duration::from_secs(60));
    let _ = reader.join();
    out.extend(rx.try_iter().map(|l| l + "\n"));
    let status = status.unwrap_or_else(|| panic!("still running 60 s after Ctrl-C:\n{out}"));
    assert!(
        entries(tmp.path()).is_empty(),
        "left behind in TMPDIR: {:?} (exit: {status:?})",
        entries(tmp.path())
    );
    // It exited on its own (not killed by the signal), with the tour unfinished.
    assert_eq!(status.code(), Some(1), "{status:?}\n{out}");
    assert!(out.contains("Demo interrupted."), "{out}");
    eprintln!("exited {:?} after Ctrl-C", signalled.elapsed());
}

/// A `tasman demo` running, its stdout read line by line on a thread.
struct Demo {
    child: Child,
    rx: mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
    /// What it printed so far.
    out: String,
}

impl Demo {
    /// Starts `tasman demo ARGS` (with `TMPDIR` set when given), stderr inherited.
    fn start(args: &[&str], tmpdir: Option<&Path>) -> Demo {
        Demo::start_with(args, tmpdir, false)
    }

    /// [`Demo::start`], SIGHUP ignored in the child from its start when `nohup` (as `nohup`
    /// starts a command).
    fn start_with(args: &[&str], tmpdir: Option<&Path>, nohup: bool) -> Demo {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tasman"));
        cmd.arg("demo").args(args);
        common::die_with_parent(&mut cmd);
        if nohup {
            use std::os::unix::process::CommandExt;
            // SAFETY: signal(2) is async-signal-safe, and nothing else runs between fork and
            // exec here.
            unsafe {
                cmd.pre_exec(|| {
                    libc::signal(libc::SIGHUP, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        if let Some(dir) = tmpdir {
            cmd.env("TMPDIR", dir);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run tasman demo");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Demo {
            child,
            rx,
            reader,
            out: String::new(),
        }
    }

    /// Reads lines until one starts with `prefix` (true), the output ends or 150 s pass.
    fn read_until(&mut self, prefix: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(150);
        while Instant::now() < deadline {
            match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    let found = line.starts_with(prefix);
                    self.out.push_str(&line);
                    self.out.push('\n');
                    if found {
                        return true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        false
    }
}

/// Runs `tasman demo ARGS`; returns its exit status (None: killed at `within`), stdout and
/// stderr.
fn run_demo(args: &[&str], within: Duration) -> (Option<ExitStatus>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tasman"))
        .arg("demo")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tasman demo");
    let read_all = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read_all(Box::new(child.stdout.take().expect("stdout")));
    let err = read_all(Box::new(child.stderr.take().expect("stderr")));
    let status = wait_until(&mut child, Instant::now() + within);
    (
        status,
        out.join().expect("stdout"),
        err.join().expect("stderr"),
    )
}

/// A topology whose first service has one site for the first edge has nothing to fail over to,
/// nor to drain around: the tour says so and skips both, and exits 0. (It stopped the only site,
/// printed "no failover within 10 s", then failed the maintenance on a reset: exit 1.)
#[test]
fn a_topology_with_one_site_skips_the_failover_and_the_maintenance() {
    let _one = one_demo_at_a_time();
    let dir = tempfile::tempdir().expect("temporary directory");
    let node = |id: &str, kind: &str, n: u8, extra: &str| {
        format!(
            "  - {{id: {id}, kind: {kind}, region: au-east, country: AU, location: {{lat: -33.9, lon: 151.2}}, address: \"127.10.0.{n}:7000\"{extra}}}\n"
        )
    };
    let text = format!(
        "version: 1\nnodes:\n{}{}links:\n  - {{a: syd-edge-1, b: syd-site-1, latency: 1ms, capacity: 10Gbps}}\nservices:\n  - {{name: chat, port: 8443}}\n",
        node("syd-edge-1", "edge", 1, ", client_address: 127.20.0.1"),
        node(
            "syd-site-1",
            "site",
            3,
            ", serves: [{service: chat, backend: \"127.30.0.1:9001\", capacity: 64}]"
        ),
    );
    let topo = dir.path().join("one-site.yaml");
    std::fs::write(&topo, text).unwrap();
    let topo = topo.to_str().unwrap();
    let (status, out, err) = run_demo(
        &["--quick", "--ephemeral-ports", "--topology", topo],
        Duration::from_secs(150),
    );
    let status = status.unwrap_or_else(|| panic!("still running after 150 s:\n{out}\n{err}"));
    assert_eq!(status.code(), Some(0), "{out}\n{err}");
    for said in [
        "Failover: syd-site-1 is the only site syd-edge-1 has for chat: nothing to fail over to (skipped).",
        "Planned maintenance: syd-site-1 is the only site syd-edge-1 has for chat (skipped).",
        "Demo complete.",
    ] {
        assert!(out.contains(said), "{said}\n{out}");
    }
}

/// `--fail` must name the site the first edge uses for the first service: stopping another
/// moves nothing there, and the failover would be "shown" at once without happening. A node
/// that is no site is refused before the fabric starts.
#[test]
fn a_fail_site_that_would_show_no_failover_is_refused() {
    let _one = one_demo_at_a_time();
    let (status, out, err) = run_demo(
        &[
            "--quick",
            "--ephemeral-ports",
            "--edges",
            "lax-edge-1",
            "--fail",
            "syd-site-1",
        ],
        Duration::from_secs(150),
    );
    let status = status.unwrap_or_else(|| panic!("still running after 150 s:\n{out}\n{err}"));
    assert_eq!(status.code(), Some(1), "{out}\n{err}");
    assert!(
        err.contains("error: --fail syd-site-1: ")
            && err.contains("lax-edge-1")
            && err.contains("llm-chat"),
        "{err}"
    );
    assert!(
        !out.contains("Failover:") && !out.contains("First new connection"),
        "{out}"
    );

    for (node, says) in [
        ("lax-edge-1", "not a site"),
        ("nowhere-1", "no such node in the topology"),
    ] {
        let (status, out, err) = run_demo(
            &["--quick", "--ephemeral-ports", "--fail", node],
            Duration::from_secs(60),
        );
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}\n{err}");
        assert!(
            err.contains(&format!("error: --fail {node}: {says} (sites: ")),
            "{err}"
        );
        assert!(
            !out.contains("Started the controller"),
            "the fabric started for a --fail that is no site:\n{out}"
        );
    }
}

/// Runs `tasman demo --keep`: the tour, then (the fabric kept up) `tasman status` against the
/// admin address and token the demo printed, then SIGTERM. Returns the demo's whole stdout,
/// whether it exited 0, the status output, and how long the demo ran: from its start (after
/// the wait for other demos, which can take minutes) to its exit.
fn run_demo_keep() -> (String, bool, String, Duration) {
    let _one = one_demo_at_a_time();
    let started = Instant::now();
    let mut demo = Demo::start(&["--quick", "--ephemeral-ports", "--keep"], None);
    let up = demo.read_until("The fabric is up");
    let Demo {
        mut child,
        rx,
        reader,
        mut out,
    } = demo;
    let mut status = String::new();
    if up {
        // The admin address and token, as printed for the operator.
        let env = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("export "))
            .unwrap_or_default()
            .to_string();
        // The status command as printed: the demo's own binary by its path (`scripts/demo`
        // runs it through cargo, so `tasman` need not be on PATH; a bare `tasman` was printed).
        let printed = out
            .lines()
            .map(str::trim)
            .find(|l| l.split_whitespace().nth(1) == Some("status"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_default()
            .to_string();
        assert_eq!(
            std::path::Path::new(&printed).canonicalize().ok(),
            std::path::Path::new(env!("CARGO_BIN_EXE_tasman"))
                .canonicalize()
                .ok(),
            "the printed status command is not the demo's binary: {printed:?}"
        );
        let mut cmd = Command::new(&printed);
        cmd.arg("status");
        for kv in env.split_whitespace() {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
        let st = cmd.output().expect("run tasman status");
        status = format!(
            "{}{}",
            String::from_utf8_lossy(&st.stdout),
            String::from_utf8_lossy(&st.stderr)
        );
    }
    // SIGTERM: the demo stops the fabric and ends as it would after Ctrl-C.
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let exited = wait_until(&mut child, Instant::now() + Duration::from_secs(60));
    let ran = started.elapsed();
    let _ = reader.join();
    out.extend(rx.try_iter().map(|l| l + "\n"));
    let exited = exited.unwrap_or_else(|| panic!("still running 60 s after SIGTERM:\n{out}"));
    (out, exited.success(), status, ran)
}

/// A port the demo's fixed addresses need, held by another program (here the controller's
/// admin port on every address), ends the demo with exit 1, the error, and a hint to run it on
/// free ports. (It said only "Address already in use".)
#[test]
fn a_port_the_demo_needs_in_use_is_refused_with_a_hint() {
    let _one = one_demo_at_a_time();
    // Held on loopback, where the demo binds it (a machine where something else holds it
    // already, on loopback or every address, proves the same); then an edge's service port: the
    // edge logs it and retries, so the demo looks after the start (its requests failed, or
    // reached the other program, with no hint).
    for (held, says) in [
        (("127.0.0.1", 7401), "in use"),
        (("127.20.0.1", 8443), "client listeners of syd-edge-1"),
    ] {
        let _held = std::net::TcpListener::bind(held);
        assert!(_held.is_ok() || held.1 == 7401, "cannot hold {held:?}");
        let out = Command::new(env!("CARGO_BIN_EXE_tasman"))
            .args(["demo", "--quick"])
            .output()
            .expect("run tasman demo");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{held:?}: {err}");
        assert!(
            err.contains(says) && err.contains("in use") && err.contains("--ephemeral-ports"),
            "{held:?}: {err}"
        );
    }
}

/// A --topology file the demo cannot run is reported as `tasman topology validate` reports it,
/// `FILE:LINE:COL: error: message` (it printed the severity's Debug form, `Error`), and the demo
/// exits 1 without starting anything.
#[test]
fn demo_with_an_invalid_topology_prints_file_line_col_errors_and_exits_one() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("topology/tests/invalid");
    let file = dir.join("unknown_link_nodes.yaml");
    let expected = std::fs::read_to_string(dir.join("unknown_link_nodes.expected")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tasman"))
        .args(["demo", "--quick", "--ephemeral-ports", "--topology"])
        .arg(&file)
        .output()
        .expect("run tasman demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(expected.lines().count() >= 3, "{expected}");
    for line in expected.lines() {
        let want = format!("{}:{line}", file.display());
        assert!(
            stderr.lines().any(|l| l == want),
            "missing {want:?} in:\n{stderr}"
        );
    }
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn demo_serves_every_edge_fails_over_and_moves_a_path_by_a_live_edit_then_exits_zero() {
    let (stdout, ok, status, ran) = run_demo_keep();
    assert!(ok, "tasman demo failed:\n{stdout}");
    // A hang guard, not a speed check (a run takes about a minute).
    assert!(ran < Duration::from_secs(600), "demo took {ran:?}");

    // Every default edge printed its table with real sites.
    for edge in [
        "syd-edge-1",
        "akl-edge-1",
        "sin-edge-1",
        "tyo-edge-1",
        "lax-edge-1",
    ] {
        assert!(
            stdout.contains(&format!("{edge} (")),
            "no table for {edge}:\n{stdout}"
        );
    }
    assert!(!stdout.contains("error:"), "a request failed:\n{stdout}");
    // Sydney's nearest llm-chat site is in Sydney; the failover stops it and moves to another site.
    let table = stdout.split("syd-edge-1 (").nth(1).expect("sydney table");
    let chat = table
        .lines()
        .find(|l| l.trim_start().starts_with("llm-chat "))
        .expect("llm-chat row");
    assert!(
        chat.contains("syd-site-1"),
        "Sydney's llm-chat not served in Sydney: {chat}"
    );
    assert!(
        stdout.contains("Failover: syd-site-1 goes dark"),
        "{stdout}"
    );
    let after = stdout
        .split("syd-edge-1 after the failover")
        .nth(1)
        .expect("after-failover table");
    let chat = after
        .lines()
        .find(|l| l.trim_start().starts_with("llm-chat "))
        .expect("llm-chat row after");
    assert!(
        !chat.contains("syd-site-1") && chat.contains("-site-"),
        "llm-chat did not move: {chat}"
    );
    // The time reported is when the first byte of that connection's answer came, not its end.
    let first = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("First new connection served by "))
        .unwrap_or_else(|| panic!("no first new connection:\n{stdout}"));
    let ms = |s: &str| -> f64 {
        s.trim()
            .strip_suffix(" ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("not a time in ms: {s:?} in {first}"))
    };
    let (at, ttfb) = first
        .split_once(": its first byte ")
        .and_then(|(_, r)| r.split_once(" after the stop (TTFB "))
        .and_then(|(at, r)| Some((ms(at), ms(r.split_once(')')?.0))))
        .unwrap_or_else(|| panic!("{first}"));
    assert!(at >= ttfb, "first byte at {at} ms, TTFB {ttfb} ms: {first}");
    assert!(stdout.contains("Demo complete."), "{stdout}");

    // Planned maintenance: the edge's site drains while a slow completion streams through it;
    // the stream finishes there, every new connection is served elsewhere, none fails, and the
    // drain ends with the stream, before its timeout.
    let drain = stdout
        .split("Planned maintenance: ")
        .nth(1)
        .expect("maintenance section");
    let site = drain.split_whitespace().next().expect("drained site");
    assert!(
        drain.contains(&format!(
            "The completion in flight finished on {site}: 100 of 100 tokens"
        )),
        "{drain}"
    );
    let during = drain
        .lines()
        .find(|l| l.contains("new connections during the drain: served by"))
        .expect("new connections line");
    assert!(
        during.ends_with("; 0 failed.") && !during.contains(&format!("{site}×")),
        "{during}"
    );
    assert!(drain.contains(&format!("{site}'s drain ended ")), "{drain}");

    // The live edit: one link's declared latency raised through the controller, every running
    // router acknowledged the new version, and the edge's path moved off that link.
    assert!(
        stdout.contains("imports it as topology version 1"),
        "{stdout}"
    );
    let edit = stdout
        .split("Live edit through the controller: ")
        .nth(1)
        .expect("live edit section");
    let edge = edit.split_whitespace().next().expect("edge").to_string();
    let link = edit
        .split("Raising the declared one-way latency of ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("raised link");
    let (a, b) = link.split_once("--").expect("link id a--b");
    assert!(
        edit.contains("The controller's plan:")
            && edit.contains(&format!("~ link {link}: latency")),
        "no plan for the edit:\n{edit}"
    );
    assert!(
        edit.contains("Applied as topology version 2 (was 1)")
            && edit.contains("all 20 running routers acknowledged it"),
        "not acknowledged by every running router:\n{edit}"
    );
    let result = edit
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with(&format!("{edge} llm-chat: path before "))
        })
        .expect("before/after line");
    let (before, after) = result
        .split_once("path before ")
        .and_then(|(_, r)| r.split_once(" ⇒ after "))
        .expect("before ⇒ after");
    let hops = |p: &str| -> Vec<String> {
        p.split(" (")
            .next()
            .unwrap_or("")
            .split(" → ")
            .map(|s| s.trim().to_string())
            .collect()
    };
    let uses = |p: &[String]| {
        p.windows(2)
            .any(|w| (w[0] == a && w[1] == b) || (w[0] == b && w[1] == a))
    };
    let (before, after) = (hops(before), hops(after));
    assert!(
        uses(&before),
        "the raised link {link} was not on {edge}'s path {before:?}"
    );
    assert!(!uses(&after), "{edge} still crosses {link}: {after:?}");
    assert_ne!(before, after);
    assert!(result.ends_with(", as predicted"), "{result}");
    // Every choice the controller's plan predicted for the edge (site and path) is what its
    // routing table holds after the apply.
    let checked = edit
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("The plan's "))
        .expect("plan check line");
    let (n, rest) = checked.split_once(" prediction(s) for ").expect("count");
    assert!(
        n.parse::<usize>().is_ok_and(|n| n > 0)
            && rest.ends_with(&format!(": {n} match the edge's routing table now.")),
        "{edit}"
    );
    // Real requests after the edit: the edge's llm-chat row names the site the backend
    // answered from and the new path (a mismatch would print "(table: ...)").
    let table = edit
        .split(&format!("{edge} after the edit"))
        .nth(1)
        .expect("after-edit table");
    let row = table
        .lines()
        .find(|l| l.trim_start().starts_with("llm-chat "))
        .expect("llm-chat row after the edit");
    assert!(
        row.contains(&after.join(" → "))
            && !row.contains("(table:")
            && row.trim_end().ends_with("ms"),
        "{row}"
    );

    // --keep: the controller's admin address and token were printed, and `tasman status` with
    // them shows every router (the stopped site restarted) connected, at the edited topology.
    assert!(stdout.contains("The controller: admin API on"), "{stdout}");
    assert!(
        status.starts_with("topology version 2"),
        "tasman status:\n{status}"
    );
    for node in ["syd-edge-1", "syd-site-1", "lax-transit-1"] {
        assert!(
            status.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&node) && f.get(2) == Some(&"yes") && f.get(3) == Some(&"2")
            }),
            "{node} not connected at topology version 2:\n{status}"
        );
    }
    // Per service, each edge's site is the one the edge reports it uses, not an estimate.
    assert!(
        status.contains("service llm-chat\n  ") && !status.contains("(estimate"),
        "tasman status:\n{status}"
    );
}
