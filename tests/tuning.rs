//! The routers' opt-in tuning flags. `--keep-awake`: every router on a path (edge, transit, site)
//! spins while traffic moves through it, and stops a window after it stops. `--worker-threads`:
//! the router's runtime has that many workers. `--hysteresis-*`: an edge reports its margins. And
//! the open-file limit a router raises for itself.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use common::*;

#[test]
fn routers_spin_while_traffic_moves_and_stop_after_the_window() {
    let backend = echo_backend("");
    let port = free_tcp_port(LOCAL);
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .transit("transit", free_udp(LOCAL))
        .site("site", free_udp(LOCAL), &[("chat", backend, 100)])
        .link("edge", "transit", "1ms")
        .link("transit", "site", "1ms")
        .service("chat", port, &[]);
    let mut f = Fabric::new(&y);
    let nodes = ["site", "transit", "edge"];
    for n in nodes {
        f.start_with(n, &["--keep-awake", "300ms"]);
    }
    f.wait_preferred("edge", "chat", "site");
    let spinning = |f: &Fabric, n: &str| f.metric(n, "tasman_keep_awake_spinning", "");
    // Probes and control traffic move no client bytes: nothing spins yet.
    for n in nodes {
        assert_eq!(spinning(&f, n), 0, "{n} spins without traffic");
    }

    // A client exchanging small messages through edge -> transit -> site.
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let client = std::thread::spawn(move || {
        let mut c = TcpStream::connect((LOCAL, port)).unwrap();
        c.set_nodelay(true).unwrap();
        let mut buf = [0u8; 64];
        let mut trips = 0u64;
        while !s.load(Relaxed) {
            c.write_all(&[7u8; 64]).unwrap();
            c.read_exact(&mut buf).unwrap();
            assert_eq!(buf, [7u8; 64]);
            trips += 1;
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        trips
    });
    eventually(DEADLINE, "every router on the path spinning", || {
        nodes.iter().all(|n| spinning(&f, n) >= 1)
    });
    stop.store(true, Relaxed);
    assert!(client.join().unwrap() > 0);

    // The window after the last byte, every spinner is asleep again, having spun meanwhile.
    eventually(DEADLINE, "every router's spinners asleep", || {
        nodes.iter().all(|n| spinning(&f, n) == 0)
    });
    for n in nodes {
        let text = f.metrics_text(n);
        let spun: f64 = text
            .lines()
            .find(|l| l.starts_with("tasman_keep_awake_spin_seconds_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0);
        assert!(spun > 0.0, "{n} reports no spin time:\n{text}");
    }
}

#[test]
fn worker_threads_sets_the_routers_runtime_workers() {
    let mut f = edge_and_site();
    f.start_with("site", &["--worker-threads", "1"]);
    f.start("edge");
    f.wait_preferred("edge", "chat", "site");
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    let workers = |n: &str| f.metric(n, "tasman_runtime_workers", "");
    assert_eq!(workers("site"), 1, "--worker-threads 1");
    assert_eq!(workers("edge"), cores, "the default: one per core");
}

/// A router raises its soft open-file limit to the hard limit at start (an edge started with
/// the usual 1,024 would stop accepting at about a thousand clients): started under a soft
/// limit of 256, it runs with the hard one.
#[test]
fn a_router_raises_its_open_file_limit_to_the_hard_one() {
    let mut f = edge_and_site();
    f.wrapper = ["prlimit", "--nofile=256:", "--"]
        .map(String::from)
        .to_vec();
    f.start("site");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", f.pid("site")))
        .expect("the router's /proc limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open-files line");
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    let (soft, hard) = (nums[0], nums[1]);
    assert_ne!(hard, "256", "the test needs a hard limit above 256: {line}");
    assert_eq!(soft, hard, "{line}\n{}", f.log("site"));
    assert!(
        f.log("site").contains("open-file limit"),
        "{}",
        f.log("site")
    );
}

/// `--hysteresis-*`: an edge reports the anti-flap margins it runs with (the controller's apply
/// plan predicts its moves with them); other roles report none.
#[test]
fn an_edge_reports_the_anti_flap_margins_it_runs_with() {
    let mut f = edge_and_site();
    f.start_with(
        "edge",
        &["--hysteresis-margin", "25ms", "--hysteresis-ratio", "1/2"],
    );
    f.start("site");
    f.wait_preferred("edge", "chat", "site");
    let edge = f.telemetry("edge").expect("the edge's telemetry");
    assert_eq!(
        edge["hysteresis"],
        serde_json::json!({"margin_us": 25_000, "ratio": 0.5}),
        "{edge}"
    );
    let site = f.telemetry("site").expect("the site's telemetry");
    assert!(site.get("hysteresis").is_none(), "{site}");
}

/// An edge and a site serving `chat` (an echo backend), 1 ms apart; nothing started yet.
fn edge_and_site() -> Fabric {
    let backend = echo_backend("");
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .site("site", free_udp(LOCAL), &[("chat", backend, 100)])
        .link("edge", "site", "1ms")
        .service("chat", free_tcp_port(LOCAL), &[]);
    Fabric::new(&y)
}

/// A site out of file descriptors (its open-file limit lower than its capacity asks) refuses a
/// stream it has no descriptor for as full (`site_full`, which the edge retries elsewhere) and
/// keeps its service healthy: the descriptors come back when connections end. (The failed
/// backend connect was counted as the backend's, `backend_refused`, and five in a row, or three
/// health checks that could not connect either, marked the service down for every edge.)
#[test]
fn a_site_out_of_file_descriptors_is_full_not_unhealthy() {
    let (mut f, port) = greeting_edge_and_site();
    f.wrapper = ["prlimit", "--nofile=64:64", "--"]
        .map(String::from)
        .to_vec();
    f.start("site");
    f.wrapper.clear();
    f.start("edge");
    f.wait_preferred("edge", "chat", "site");
    // Held until one is refused: each takes one of the site's 64 descriptors.
    let mut held = Vec::new();
    loop {
        match greet(port) {
            Ok((r, line)) if line == "hi" => held.push(r),
            _ => break,
        }
        assert!(held.len() < 64, "64 connections held under a limit of 64");
    }
    // Room again for the metrics page (and the health checks).
    held.truncate(held.len() / 2);
    let errors = |code: &str| {
        f.metric(
            "site",
            "tasman_stream_errors_total",
            &format!("code=\"{code}\""),
        )
    };
    assert!(errors("site_full") >= 1, "{}", f.metrics_text("site"));
    assert_eq!(errors("backend_refused"), 0, "{}", f.metrics_text("site"));
    assert_eq!(
        f.metric("site", "tasman_site_healthy", "service=\"chat\""),
        1,
        "{}",
        f.log("site")
    );
    assert!(
        f.log("site")
            .contains("no file descriptor for a backend connection"),
        "{}",
        f.log("site")
    );
    // Served again once the edge's hold-down of the full site has passed.
    eventually(Duration::from_secs(30), "a new connection served", || {
        greet(port).is_ok_and(|(_, line)| line == "hi")
    });
}

/// An edge out of file descriptors before its client cap (here the cap is set above its
/// open-file limit; listeners and circuit VIPs can take its reserve too) resets the client that
/// waits in its backlog, with a descriptor it keeps spare, so that the client can try another
/// edge at once, and counts it over the cap. (The client waited unanswered.)
#[test]
fn an_edge_out_of_file_descriptors_resets_the_client_waiting() {
    let (mut f, port) = greeting_edge_and_site();
    f.start("site");
    f.wrapper = ["prlimit", "--nofile=96:96", "--"]
        .map(String::from)
        .to_vec();
    f.start_with(
        "edge",
        &[
            "--max-client-connections",
            "10000",
            "--max-client-connections-per-source",
            "off",
        ],
    );
    f.wrapper.clear();
    f.wait_preferred("edge", "chat", "site");
    let mut held = Vec::new();
    let refused = loop {
        match greet(port) {
            Ok((r, line)) if line == "hi" => held.push(r),
            Ok((_, line)) => panic!("answered {line:?}"),
            Err(e) => break e,
        }
        assert!(held.len() < 96, "96 connections held under a limit of 96");
    };
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionReset,
        "{refused:?} after {} held",
        held.len()
    );
    // A burst waiting at once: every one reset, not one a second (a shed paid the accept
    // back-off, up to 1 s, and the rest waited unanswered).
    let burst: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect((LOCAL, port))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut b = [0u8; 1];
                s.read(&mut b).map(|_| ())
            })
        })
        .collect();
    for (i, t) in burst.into_iter().enumerate() {
        let got = t.join().unwrap();
        assert!(
            matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "connection {i} of the burst: {got:?}"
        );
    }
    held.clear();
    eventually(Duration::from_secs(10), "counted over the cap", || {
        f.get("edge", "/metrics")
            .is_some_and(|m| metric_sum(&m, "tasman_edge_clients_over_cap_total", "") >= 1)
    });
}

/// An edge and a site serving `chat` (capacity 1,000, a backend that greets `hi`), 1 ms apart;
/// the service's port; nothing started yet. Raises this process's open-file limit (the tests
/// hold many connections).
fn greeting_edge_and_site() -> (Fabric, u16) {
    raise_nofile();
    let backend = echo_backend("hi\n");
    let port = free_tcp_port(LOCAL);
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .site("site", free_udp(LOCAL), &[("chat", backend, 1000)])
        .link("edge", "site", "1ms")
        .service("chat", port, &[]);
    (Fabric::new(&y), port)
}
