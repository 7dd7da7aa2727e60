//! Distribution of topology versions from the controller to routers (the real control client
//! over real mutual-TLS QUIC), and the admin API's refusals.

mod controller_common;

use std::time::Duration;

use controller_common::*;
use testkit::bytes_taken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_reaches_every_router_of_a_20_router_fabric() {
    let dir = tempfile::tempdir().unwrap();
    let (edges, transits) = (14, 4); // + 2 sites = 20 routers
    let nodes = fabric_nodes(edges, transits);
    assert_eq!(nodes.len(), 20);
    let (d, tls) =
        controller_with_pki(dir.path(), &nodes, &fabric_yaml(61, edges, transits, 10)).await;
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(start_client(d.quic_addr, n, &tls, None).await);
    }
    let v1 = d.ctl.published().version;
    for c in &clients {
        assert_eq!(c.snapshots().borrow().version, v1);
    }

    let out = apply(
        &d,
        &fabric_yaml(61, edges, transits, 25),
        "raise ring latency",
    )
    .await;
    assert_eq!(out.version, Some(2));
    let v2 = d.ctl.published().version;
    assert!(v2 > v1);
    // Every router has it, and every router reported it back.
    eventually(
        Duration::from_secs(10),
        "all 20 routers run the new snapshot",
        || {
            clients
                .iter()
                .all(|c| c.snapshots().borrow().version == v2 && c.topology_version() == 2)
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the controller saw 20 acknowledgements",
        || {
            let r = d.ctl.routers();
            r.len() == 20
                && r.iter()
                    .all(|r| r.record.applied_version == v2 && r.record.applied_topology == 2)
        },
    )
    .await;
    let link = clients[0]
        .snapshots()
        .borrow()
        .topology
        .links
        .iter()
        .find(|l| l.a.as_str().starts_with("transit"))
        .cloned();
    assert_eq!(link.map(|l| l.latency.as_millis_f64()), Some(25.0));
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_says_its_snapshot_is_stale_past_max_stale_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(66, 1, 1, 10)).await;
    let addr = d.quic_addr;
    // Stale after 6 s without a word: heartbeats come every 2 s, so a connected router hears
    // three of them in that time, and one late by up to 4 s does not make it stale.
    let max_stale = Duration::from_secs(6);
    let c = start_client_with(addr, "edge-0", &tls, |cfg| cfg.max_stale = max_stale).await;
    // Fresh all along for longer than max_stale: only heartbeats can do that.
    stays(
        max_stale + Duration::from_secs(3),
        "heartbeats keep a connected router fresh",
        || !c.is_stale() && c.is_connected(),
    )
    .await;
    d.shutdown().await;
    eventually(
        max_stale + Duration::from_secs(30),
        "stale after max_stale without the controller",
        || c.is_stale(),
    )
    .await;
    assert!(c.snapshots().borrow().version > 0, "still has its snapshot");
    let d2 = restart_controller(&dir.path().join("state"), &tls, addr).await;
    eventually(
        Duration::from_secs(20),
        "fresh again once the controller is back",
        || !c.is_stale() && c.is_connected(),
    )
    .await;
    d2.shutdown().await;
}

/// A full snapshot of a large fabric (~400 KB) arrives in many pieces while the router's
/// telemetry timer fires every millisecond (and the controller reads those reports while it
/// publishes new versions): the router reads frames cancel-safe, so no stream is desynchronised
/// and no router reconnects. (Reading with `read_exact` inside the `select!` lost the bytes of a
/// frame whenever the timer won, and dropped the connection: 280 of 1,000 routers reconnected
/// during the connect storm of the controller benchmark.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_snapshots_arrive_whole_while_telemetry_ticks_every_millisecond() {
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let (edges, transits) = (1200, 4);
    let nodes = fabric_nodes(edges, transits);
    let watched: Vec<String> = nodes.iter().take(6).cloned().collect();
    let (d, tls) =
        controller_with_pki(dir.path(), &watched, &fabric_yaml(62, edges, transits, 10)).await;
    assert!(
        d.ctl.published().full.len() > 300_000,
        "the snapshot must be large enough to arrive in many reads: {} bytes",
        d.ctl.published().full.len()
    );
    let mut clients = Vec::new();
    for n in &watched {
        let start = start_client_with(d.quic_addr, n, &tls, |cfg| {
            cfg.telemetry_interval = Duration::from_millis(1)
        });
        let c = tokio::time::timeout(Duration::from_secs(30), start)
            .await
            .expect("the first full snapshot arrives within 30 s");
        let report = telemetry_report(n, vec![neighbour("transit-0", 4_000)]);
        c.set_telemetry(Arc::new(move || Some(report.clone())));
        clients.push(c);
    }
    for (round, ring) in [11u32, 12, 13].into_iter().enumerate() {
        let want = round as u64 + 2;
        apply(&d, &fabric_yaml(62, edges, transits, ring), "ring latency").await;
        eventually(
            Duration::from_secs(30),
            "every router applied the new version",
            || clients.iter().all(|c| c.topology_version() == want),
        )
        .await;
    }
    for c in &clients {
        assert!(c.is_connected());
        assert_eq!(
            c.connects(),
            1,
            "a control connection was dropped and re-made"
        );
    }
    d.shutdown().await;
}

/// A control session of `node` made by hand ([`raw_hello`]) that has its first snapshot: what
/// the controller sends is read in the background (so it never waits on the session), keeping
/// the topology version it last sent. Keep the endpoint while the connection is in use.
async fn hello_with_first_snapshot(
    d: &fabric::controller::daemon::Daemon,
    tls: &std::path::Path,
    node: &str,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let RawSession {
        ep,
        conn,
        send,
        recv,
    } = raw_hello(d.quic_addr, tls, node, node).await;
    let topology_version = topology_versions(recv);
    eventually(Duration::from_secs(10), "the first snapshot", || {
        topology_version.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    (ep, conn, send, topology_version)
}

/// A router sending telemetry in a tight loop: the reports beyond its budget are dropped and
/// counted, its session stays up, and new versions still reach it and every other router.
/// (Each report was merged under the controller's global lock, with no limit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telemetry_flood_is_dropped_and_counted_while_versions_still_flow() {
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 2), &fabric_yaml(67, 1, 2, 10)).await;
    let other = start_client(d.quic_addr, "transit-1", &tls, None).await;

    let (_ep, conn, mut send, topology_version) =
        hello_with_first_snapshot(&d, &tls, "edge-0").await;

    const FLOOD: u64 = 5_000;
    let frame = telemetry_frame("edge-0", "transit-0", 4_000);
    for _ in 0..FLOOD {
        send.write_all(&frame).await.unwrap();
    }
    let dropped = || router_status(&d, "edge-0").map_or(0, |r| r.reports_dropped);
    // A burst of 20, then 10 a second: nearly all of them, however slowly they are read.
    eventually(
        Duration::from_secs(30),
        "the controller dropped the flood's excess",
        || dropped() >= FLOOD - 500,
    )
    .await;
    // The operator sees it in `tasman status`.
    let text = status_text(&d).await;
    let line = status_line(&text, "edge-0");
    assert!(
        line.contains("reports over the rate dropped"),
        "edge-0's status line: {line:?}\n{text}"
    );

    let out = apply(&d, &fabric_yaml(67, 1, 2, 20), "raise ring latency").await;
    assert_eq!(out.version, Some(2));
    eventually(
        Duration::from_secs(10),
        "the new version reaches the flooding router and the other one",
        || topology_version.load(Ordering::Relaxed) == 2 && other.topology_version() == 2,
    )
    .await;
    assert!(
        conn.close_reason().is_none(),
        "the flooding router's session stays up"
    );
    assert_eq!(other.connects(), 1);
    d.shutdown().await;
}

/// Heartbeats are recorded on disk as the controller's last word (at most every tenth of
/// `max_stale`, 1 s here), and a client restarted from disk while the controller is away counts
/// its staleness from that, not from when its stored version came. (Only the version's arrival
/// was stored: on a quiet fabric, a restart while the controller was away raised a false STALE
/// SNAPSHOT.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_disk_counts_staleness_from_the_last_heartbeat() {
    use router::control::disk;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(85, 1, 1, 10)).await;
    let state = dir.path().join("router-edge-0");
    let tune = |cfg: &mut router::control::ClientConfig| {
        cfg.state_dir = Some(state.clone());
        cfg.max_stale = Duration::from_secs(10);
    };
    let client = start_client_with(d.quic_addr, "edge-0", &tls, tune).await;
    let stored = || disk::load(&state).ok().flatten();
    eventually(Duration::from_secs(10), "the snapshot is stored", || {
        stored().is_some()
    })
    .await;
    let came = stored().unwrap().received_unix_ms;
    // Heartbeats every 2 s: one at least 2 s after the version is recorded.
    eventually(
        Duration::from_secs(20),
        "a later heartbeat is recorded",
        || disk::load_contact(&state).is_some_and(|t| t >= came + 2_000),
    )
    .await;
    assert!(client.close(Duration::from_secs(5)).await);
    let ctl_addr = d.quic_addr;
    d.shutdown().await;
    let last = disk::load_contact(&state).unwrap();
    assert_eq!(
        stored().unwrap().received_unix_ms,
        came,
        "no new version came"
    );

    let restarted = start_client_with(ctl_addr, "edge-0", &tls, tune).await;
    assert!(!restarted.is_connected());
    // Exactly the recorded contact: not the restart (a client that ignored the file would
    // count from its own start, and pass a `>=`).
    assert_eq!(
        restarted.last_contact_unix_ms(),
        last,
        "staleness counts from {} (the version came at {came}, the last heartbeat recorded at {last})",
        restarted.last_contact_unix_ms()
    );
}

/// The controller's last word is recorded only while the stored snapshot is the one in force:
/// a version applied that the disk refuses to store (a full disk, here a directory where its
/// temporary goes) leaves the record where it was, so that a restart from disk, which runs the
/// older stored version, does not call it fresh. (The small record went on being written: a
/// restart ran the version stored before and dated it with the latest heartbeat.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_contact_is_recorded_while_the_version_in_force_is_not_stored() {
    use router::control::disk;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(88, 1, 1, 10)).await;
    let state = dir.path().join("router-edge-0");
    let tune = |cfg: &mut router::control::ClientConfig| {
        cfg.state_dir = Some(state.clone());
        cfg.max_stale = Duration::from_secs(10);
    };
    let client = start_client_with(d.quic_addr, "edge-0", &tls, tune).await;
    let stored = || disk::load(&state).ok().flatten();
    eventually(Duration::from_secs(10), "the snapshot is stored", || {
        stored().is_some()
    })
    .await;
    let first = stored().unwrap().version;
    // Every store from here on fails.
    std::fs::create_dir(state.join(format!("{}.tmp", disk::FILE_NAME))).unwrap();
    let out = apply(&d, &fabric_yaml(88, 1, 2, 20), "raise ring latency").await;
    let v2 = out.version.expect("applied");
    eventually(
        Duration::from_secs(10),
        "the new version is applied",
        || client.topology_version() == v2,
    )
    .await;
    let applied = now_ms();
    // Heartbeats (every 2 s) are heard, and none is recorded.
    eventually(
        Duration::from_secs(20),
        "a heartbeat heard after the version came",
        || client.last_contact_unix_ms() >= applied + 2_500,
    )
    .await;
    assert!(
        !client.close(Duration::from_secs(3)).await,
        "a store that failed was said written"
    );
    assert_eq!(
        stored().unwrap().version,
        first,
        "the new version was stored"
    );
    let last = disk::load_contact(&state).unwrap_or(0);
    assert!(
        last <= applied,
        "a contact recorded at {last}, after the version stored was replaced in force at {applied}"
    );
    d.shutdown().await;
}

/// Two routers on one state directory would overwrite each other's stored snapshot and share its
/// temporary file: a second client on a directory in use is refused, naming the directory and
/// the process that holds it, and the directory is free again once the first client is gone.
/// (The second started and both wrote there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_in_use_is_refused_until_its_client_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(87, 1, 1, 10)).await;
    let state = dir.path().join("router-edge-0");
    let on_state = |cfg: &mut router::control::ClientConfig| cfg.state_dir = Some(state.clone());
    let first = start_client_with(d.quic_addr, "edge-0", &tls, on_state).await;

    let err = match try_start_client_with(d.quic_addr, "edge-0", &tls, on_state).await {
        Ok(_) => panic!("a second client started on a state directory in use"),
        Err(e) => e.to_string(),
    };
    for part in [
        state.display().to_string(),
        "in use".to_string(),
        format!("process {}", std::process::id()),
    ] {
        assert!(err.contains(&part), "{part:?} not in: {err}");
    }

    drop(first);
    let again = start_client_with(d.quic_addr, "edge-0", &tls, on_state).await;
    drop(again);
}

/// A state directory whose lock cannot be taken for another reason than a router holding it
/// (here its lock file is a directory) does not stop routing, but nothing is stored there:
/// without the lock, two routers on the directory would rename over each other's files. (The
/// router went on without the lock and wrote there all the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_without_its_lock_is_not_written() {
    use router::control::disk;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(88, 1, 1, 10)).await;
    let state = dir.path().join("router-edge-0");
    std::fs::create_dir_all(state.join(disk::LOCK_FILE)).unwrap();
    let tune = |cfg: &mut router::control::ClientConfig| {
        cfg.state_dir = Some(state.clone());
        cfg.max_stale = Duration::from_secs(10);
    };
    let client = start_client_with(d.quic_addr, "edge-0", &tls, tune).await;
    assert!(client.snapshots().borrow().version > 0);
    // A client that can store stores its snapshot at once, and its contact every second
    // (`max_stale` / 10): 3 s without either is none.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        assert!(
            !state.join(disk::FILE_NAME).exists() && !state.join(disk::CONTACT_FILE).exists(),
            "written without the directory's lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(client.close(Duration::from_secs(5)).await);
    d.shutdown().await;
}

/// A report naming another node than the one its session authenticated is not merged (it would
/// speak for that node's links) and is counted, so that the operator sees a misconfigured or
/// misbehaving router. (It was dropped without a trace.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_naming_another_node_is_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(80, 1, 1, 10)).await;
    let (_ep, conn, mut send, _) = hello_with_first_snapshot(&d, &tls, "edge-0").await;

    // Three reports speaking for transit-0's link to site-0, at 40 ms (merged, they would weigh
    // that link; within the rate budget), then one of edge-0's own.
    for _ in 0..3 {
        send.write_all(&telemetry_frame("transit-0", "site-0", 40_000))
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(15), "the three reports counted", || {
        router_status(&d, "edge-0").is_some_and(|r| r.reports_misnamed == 3)
    })
    .await;
    // No telemetry of edge-0's yet: its age is not reset by them.
    assert_eq!(
        router_status(&d, "edge-0").and_then(|r| r.last_telemetry),
        None
    );
    send.write_all(&telemetry_frame("edge-0", "transit-0", 4_000))
        .await
        .unwrap();
    let measured = |a: &str, b: &str| {
        d.ctl
            .rtt_matrix()
            .into_iter()
            .any(|e| ((e.a == a && e.b == b) || (e.a == b && e.b == a)) && e.rtt_ms.is_some())
    };
    // The stream is read in order: edge-0's own report merged, the three before it were handled.
    eventually(
        Duration::from_secs(15),
        "edge-0's own report merged",
        || measured("edge-0", "transit-0"),
    )
    .await;
    assert!(
        !measured("site-0", "transit-0"),
        "a report naming transit-0 measured its link: {:?}",
        d.ctl.rtt_matrix()
    );
    assert_eq!(
        router_status(&d, "edge-0").map(|r| r.reports_misnamed),
        Some(3)
    );
    let text = status_text(&d).await;
    assert!(
        status_line(&text, "edge-0").contains("3 reports naming another node dropped"),
        "edge-0's status line tells the dropped reports:\n{text}"
    );
    let edge = router_status(&d, "edge-0").expect("edge-0 is known");
    assert_eq!((edge.reports_misnamed, edge.reports_dropped), (3, 0));
    assert!(conn.close_reason().is_none(), "the session stays up");
    d.shutdown().await;
}

/// Reports naming another node, sent over the rate, leave the router's telemetry age alone:
/// none was merged. (Each one the budget dropped refreshed it: the age stayed near 0, and the
/// alert on it silent, for a router none of whose reports counted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_dropped_over_the_rate_do_not_refresh_the_telemetry_age() {
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(82, 1, 1, 10)).await;
    let (_ep, _conn, mut send, _) = hello_with_first_snapshot(&d, &tls, "edge-0").await;
    for _ in 0..40 {
        send.write_all(&telemetry_frame("transit-0", "site-0", 40_000))
            .await
            .unwrap();
    }
    eventually(
        Duration::from_secs(15),
        "reports over the rate dropped",
        || router_status(&d, "edge-0").is_some_and(|r| r.reports_dropped > 0),
    )
    .await;
    assert_eq!(
        router_status(&d, "edge-0").and_then(|r| r.last_telemetry),
        None
    );
    d.shutdown().await;
}

/// A router's telemetry budget is its node's, not its session's: a router that sends a burst,
/// then reconnects and sends another, gets no second burst (a burst of 20, then 10 a second,
/// across its sessions). (Each session had a full burst of its own: reconnecting in a loop
/// refilled it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_does_not_refill_the_telemetry_budget() {
    use router::control::proto::{self, FromRouter, ToRouter};
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(81, 1, 1, 10)).await;
    let dropped = || router_status(&d, "edge-0").map_or(0, |r| r.reports_dropped);
    const SENT: u64 = 100;
    // `SENT` reports, then a renewal request, whose answer comes once every report before it
    // was taken (a session handles its frames in order): the count is then final.
    let reports_then_barrier = async |s: &mut RawSession| {
        for _ in 0..SENT {
            s.send
                .write_all(&telemetry_frame("edge-0", "transit-0", 4_000))
                .await
                .unwrap();
        }
        let ask = proto::encode(&FromRouter::Renew {
            public_key: vec![4; 65],
            proof: Vec::new(),
        })
        .unwrap();
        s.send.write_all(&ask).await.unwrap();
        loop {
            if let ToRouter::RenewRefused { .. } = next_news(&mut s.recv).await {
                break;
            }
        }
    };
    // The first session spends the burst and more.
    let mut first = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    reports_then_barrier(&mut first).await;
    // The budget is spent (less than one report's worth left): it refills from here.
    let began = std::time::Instant::now();
    let settled = dropped();
    assert!(settled > 0, "no report of the first session dropped");
    // A second session: the budget goes on from where the first left it.
    let mut second = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    reports_then_barrier(&mut second).await;
    // Within what refilled at 10 a second since (and what was left, under one). A fresh burst
    // of 20 would have let 20 more through than that.
    let allowed = (began.elapsed().as_secs_f64() * 10.0).ceil() as u64 + 1;
    let taken = SENT - (dropped() - settled);
    assert!(
        taken <= allowed,
        "the second session took {taken} of {SENT} reports, {allowed} allowed by the rate since the first burst"
    );
    d.shutdown().await;
}

/// The controller ends a control connection it refuses, or whose frames do not decode, with an
/// application close code and the reason, after the `Refused` frame has reached the router.
/// (It dropped the connection: quinn closed it with code 0 and no reason, possibly discarding
/// the `Refused` frame on the way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_bad_frames_close_the_connection_with_a_code_and_the_reason() {
    use router::codes::close;
    use router::control::proto::ToRouter;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(68, 1, 1, 10)).await;
    let closed = |conn: quinn::Connection| async move {
        match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => (
                c.error_code.into_inner(),
                String::from_utf8_lossy(&c.reason).into_owned(),
            ),
            other => panic!("expected an application close, got {other:?}"),
        }
    };

    // edge-0's certificate, transit-0's hello: Refused, then the close with the reason.
    let mut s = raw_hello(d.quic_addr, &tls, "edge-0", "transit-0").await;
    match next_message(&mut s.recv).await {
        ToRouter::Refused { reason } => assert!(reason.contains("does not match"), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    let (code, reason) = closed(s.conn).await;
    assert_eq!(code, u64::from(close::REFUSED), "{reason}");
    assert!(reason.contains("does not match"), "{reason}");

    // A good hello, then bytes that are no message.
    let mut s = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    s.send
        .write_all(&[0, 0, 0, 3, b'x', b'y', b'z'])
        .await
        .unwrap();
    let (code, reason) = closed(s.conn).await;
    assert_eq!(code, u64::from(close::PROTOCOL), "{reason}");
    assert!(reason.contains("malformed"), "{reason}");

    // A second hello once the session had its hello (each was decoded and ignored).
    let mut s = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    s.send.write_all(&hello_frame("edge-0")).await.unwrap();
    let (code, reason) = closed(s.conn).await;
    assert_eq!(code, u64::from(close::PROTOCOL), "{reason}");
    assert!(reason.contains("a second hello"), "{reason}");

    // A frame announced over the limit.
    let mut s = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    s.send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let (code, reason) = closed(s.conn).await;
    assert_eq!(code, u64::from(close::PROTOCOL), "{reason}");
    assert!(reason.contains("exceeds the limit"), "{reason}");

    // A stream ended before its hello. (The connection was dropped with code 0 and no reason.)
    let (_ep, conn) = raw_control(d.quic_addr, &tls, "edge-0").await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.finish().unwrap();
    let (code, reason) = closed(conn).await;
    assert_eq!(code, u64::from(close::PROTOCOL), "{reason}");
    assert!(reason.contains("before its hello"), "{reason}");

    // A stream finished inside a frame: after the hello, and inside the hello itself. (Both
    // were dropped with code 0 and no reason, uncounted.)
    let mut s = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    s.send.write_all(&[0, 0, 0, 9, b'{']).await.unwrap();
    s.send.finish().unwrap();
    let (code, reason) = closed(s.conn).await;
    assert_eq!(code, u64::from(close::PROTOCOL), "{reason}");
    assert!(reason.contains("inside a frame"), "{reason}");
    let (_ep, conn) = raw_control(d.quic_addr, &tls, "edge-0").await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 9, b'{']).await.unwrap();
    send.finish().unwrap();
    let (code, reason) = closed(conn).await;
    assert_eq!(code, u64::from(close::PROTOCOL), "{reason}");
    assert!(reason.contains("inside a frame"), "{reason}");
    d.shutdown().await;
}

/// An authenticated peer that never opens its control stream is closed after the hello timeout
/// (the endpoint's 1 s keep-alive would otherwise hold it, and its task, open forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_never_opens_its_stream_is_closed_after_the_hello_timeout() {
    use fabric::controller::distribute::HELLO_TIMEOUT;
    use router::codes::close;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(69, 1, 1, 10)).await;
    let (_ep, conn) = raw_control(d.quic_addr, &tls, "edge-0").await;
    let started = std::time::Instant::now();
    match tokio::time::timeout(HELLO_TIMEOUT * 2, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code.into_inner(), u64::from(close::HELLO_TIMEOUT))
        }
        other => panic!("expected a close after the hello timeout, got {other:?}"),
    }
    assert!(started.elapsed() >= HELLO_TIMEOUT - Duration::from_secs(1));
    d.shutdown().await;
}

/// A router handshake that never finishes is dropped 10 s after it began however often its peer
/// sends its Initial again (a client with no idle timeout of its own, behind a relay that drops
/// every answer), and counted. (quinn bounds a handshake only by its idle timeout, which each
/// Initial restarted: the slot of the handshake gate stayed taken for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_kept_alive_by_its_initials_is_dropped_after_the_timeout() {
    use fabric::controller::distribute::CONTROLLER_NAME;
    use router::transport::HANDSHAKE_TIMEOUT;
    use std::sync::atomic::Ordering::Relaxed;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(68, 1, 1, 10)).await;
    // A relay that passes the client's packets on and drops every answer.
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let at = front.local_addr().unwrap();
    let to = d.quic_addr;
    tokio::spawn(async move {
        let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                r = front.recv_from(&mut a) => {
                    let Ok((n, _)) = r else { return };
                    let _ = back.send_to(&a[..n], to).await;
                }
                r = back.recv(&mut b) => if r.is_err() { return },
            }
        }
    });
    let id = router::tls::TlsIdentity::load(&tls, "edge-0").unwrap();
    let peers = router::tls::PeerNames::new([CONTROLLER_NAME.to_string()]);
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(None);
    let cfg = router::tls::client_config(&id, &peers, std::sync::Arc::new(transport)).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let started = std::time::Instant::now();
    let _connecting = tokio::spawn(ep.connect(at, CONTROLLER_NAME).unwrap());
    eventually(Duration::from_secs(40), "the handshake dropped", || {
        d.ctl.handshakes_turned.timed_out.load(Relaxed) >= 1
    })
    .await;
    assert!(
        started.elapsed() < HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        "dropped {:?} after it began",
        started.elapsed()
    );
    d.shutdown().await;
}

/// One node's connections awaiting their hello are bounded: past [`MAX_AWAITING_HELLO`], the
/// next is closed at once (`refused`), not held for the hello timeout; once they leave, the node
/// connects as usual. (Each was held, with its task, for the hello timeout: one certificate
/// could make the controller hold as many as it could open.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_connections_awaiting_their_hello_are_bounded() {
    use fabric::controller::distribute::{HELLO_TIMEOUT, MAX_AWAITING_HELLO};
    use router::codes::close;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(67, 1, 1, 10)).await;
    let mut silent = Vec::new();
    // Their hello timers start after this.
    let opened = std::time::Instant::now();
    for _ in 0..=MAX_AWAITING_HELLO {
        silent.push(raw_control(d.quic_addr, &tls, "edge-0").await);
    }
    // One of them is refused at once: the one the controller counted last (the handshakes end
    // on its side in an order of their own on a busy machine, not always this test's).
    let started = std::time::Instant::now();
    let refused = loop {
        let closed: Vec<usize> = (0..silent.len())
            .filter(|&i| silent[i].1.close_reason().is_some())
            .collect();
        if let [one] = closed[..] {
            break one;
        }
        assert!(closed.len() < 2, "{} of them closed", closed.len());
        assert!(
            started.elapsed() < HELLO_TIMEOUT / 2,
            "none refused within {:?}",
            HELLO_TIMEOUT / 2
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    match silent.remove(refused).1.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(
                c.error_code.into_inner(),
                u64::from(close::REFUSED),
                "{c:?}"
            );
            let reason = String::from_utf8_lossy(&c.reason).to_string();
            assert!(reason.contains("await their hello"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Refused alone: the others still wait for their hello.
    assert!(silent.iter().all(|(_, c)| c.close_reason().is_none()));
    // The waiting ones still count until they go: each is closed when its connection ends.
    for (ep, conn) in silent.drain(..) {
        conn.close(0u32.into(), b"bye");
        ep.wait_idle().await;
    }
    // (Their ends reach the controller in their own time: tried until a session is served,
    // before the hello timeout would have freed their slots anyway.)
    let deadline = opened + HELLO_TIMEOUT - Duration::from_secs(1);
    loop {
        let mut s = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
        let first = tokio::time::timeout(
            deadline.saturating_duration_since(std::time::Instant::now()),
            router::control::proto::read_frame(&mut s.recv, router::control::proto::MAX_TO_ROUTER),
        )
        .await;
        if matches!(first, Ok(Ok(Some(_)))) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no session within the hello timeout after the silent connections left: {first:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.shutdown().await;
}

/// A state directory whose store was made (its `store-made` is there) and is gone is refused at
/// start, naming it: a new store would start from epoch 1 and the `--topology` file
/// again, publishing version numbers the fabric has seen, with no circuits. (It started afresh.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_state_directory_without_its_store_is_refused() {
    use fabric::controller::daemon;
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(66, 1, 1, 10)).await;
    d.shutdown().await;
    let state = dir.path().join("state");
    std::fs::remove_file(state.join(fabric::store::redb::FILE)).unwrap();
    let e = daemon::start(import_config(&state, &tls, &fabric_yaml(66, 1, 1, 10)))
        .await
        .err()
        .expect("started on a used directory without its store");
    let msg = e.to_string();
    assert!(
        matches!(e, daemon::DaemonError::StoreMissing { .. })
            && msg.contains("state.redb")
            && msg.contains("restore it from a backup"),
        "{msg}"
    );
    assert!(!state.join(fabric::store::redb::FILE).exists());
    // A new directory with a read-only token put there by the operator starts as usual.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::write(fresh.join(daemon::READ_TOKEN_FILE), "chosen-read-token\n").unwrap();
    let d = daemon::start(import_config(&fresh, &tls, &fabric_yaml(66, 1, 1, 10)))
        .await
        .expect("a new directory with an operator's token");
    assert_eq!(d.read_token, "chosen-read-token");
    d.shutdown().await;
}

/// A hello is a few dozen bytes: one announced larger than [`MAX_HELLO`] closes the connection
/// at once as a protocol error, before its payload. (The controller took any frame up to 1 MiB
/// as a hello, allocated at its announced size and held for the hello timeout: with one valid
/// certificate, a peer could make it hold a mebibyte per connection it opened.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_announced_larger_than_a_hello_can_be_is_refused_at_once() {
    use fabric::controller::distribute::{HELLO_TIMEOUT, MAX_HELLO};
    use router::codes::close;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(68, 1, 1, 10)).await;
    let (_ep, conn) = raw_control(d.quic_addr, &tls, "edge-0").await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // 64 KiB: far more than any hello, far less than other frames may be.
    let announced: u32 = 64 * 1024;
    assert!(announced as usize > MAX_HELLO);
    send.write_all(&announced.to_be_bytes()).await.unwrap();
    match tokio::time::timeout(HELLO_TIMEOUT * 2, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(
                c.error_code.into_inner(),
                u64::from(close::PROTOCOL),
                "{c:?}"
            )
        }
        other => panic!("expected a protocol close, got {other:?}"),
    }
    // A hello of the usual size is still taken.
    let s = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    drop(s);
    d.shutdown().await;
}

/// The controller re-reads its certificate: a re-issued one is presented to new router
/// connections without a restart, while a connection made before keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_presents_a_reissued_certificate_without_a_restart() {
    use fabric::controller::daemon::{self, DaemonConfig};
    use fabric::controller::distribute::CONTROLLER_NAME;
    use router::tls::TlsIdentity;
    use rustls::pki_types::CertificateDer;

    let dir = tempfile::tempdir().unwrap();
    let nodes = fabric_nodes(2, 2);
    let tls = dir.path().join("pki");
    pki(&tls, &nodes);
    let d = daemon::start(DaemonConfig {
        cert_reload_interval: Duration::from_millis(50),
        ..import_config(&dir.path().join("state"), &tls, &fabric_yaml(64, 2, 2, 10))
    })
    .await
    .unwrap();
    let presented = |conn: &quinn::Connection| {
        conn.peer_identity()
            .unwrap()
            .downcast::<Vec<CertificateDer<'static>>>()
            .unwrap()[0]
            .to_vec()
    };
    let in_file = || TlsIdentity::load(&tls, CONTROLLER_NAME).unwrap().chain[0].to_vec();
    let old = in_file();
    let (_ep, before) = raw_control(d.quic_addr, &tls, "edge-0").await;
    assert_eq!(presented(&before), old);

    router::pki::issue(&tls, CONTROLLER_NAME).unwrap();
    let new = in_file();
    assert_ne!(new, old);
    eventually(
        Duration::from_secs(30),
        "the controller to reload its certificate",
        || d.cert.reloads() == 1,
    )
    .await;
    let (_ep2, after) = raw_control(d.quic_addr, &tls, "edge-0").await;
    assert_eq!(presented(&after), new);
    assert!(
        before.close_reason().is_none(),
        "the older connection was kept"
    );
    // A router's control client still takes its snapshot from the controller.
    let c = start_client(d.quic_addr, "edge-1", &tls, None).await;
    let v = d.ctl.published().version;
    eventually(Duration::from_secs(30), "the router's snapshot", || {
        c.snapshots().borrow().version == v
    })
    .await;
    d.shutdown().await;
}

/// A router that reports it is draining (it is stopping: `tasman router` got SIGTERM) shows so in
/// `/v1/status` and `tasman status` while its session is up; the mark goes with the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_router_shows_in_status_until_its_session_ends() {
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 2), &fabric_yaml(68, 1, 2, 10)).await;
    let c = start_client(d.quic_addr, "edge-0", &tls, None).await;
    let mut report = telemetry_report("edge-0", vec![neighbour("transit-0", 4_000)]);
    report.draining = true;
    c.set_telemetry(Arc::new(move || Some(report.clone())));
    eventually(Duration::from_secs(10), "edge-0 shown draining", || {
        router_status(&d, "edge-0").is_some_and(|r| r.draining)
    })
    .await;
    let text = status_text(&d).await;
    assert!(status_line(&text, "edge-0").contains("draining"), "{text}");
    assert!(
        !status_line(&text, "transit-0").contains("draining"),
        "{text}"
    );

    drop(c);
    eventually(Duration::from_secs(10), "edge-0 gone, not draining", || {
        router_status(&d, "edge-0").is_some_and(|r| !r.connected && !r.draining)
    })
    .await;
    d.shutdown().await;
}

/// A router that asks for a full snapshot (`Resync`) over and over gets the current version in
/// full once, not once per request: each request is a few dozen bytes, and a full snapshot of a
/// large fabric megabytes, so one router asking in a loop had the controller send snapshots as
/// fast as it could encrypt them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_resync_requests_get_the_current_version_in_full_once() {
    use router::control::proto::{self, FromRouter, ToRouter};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(71, 1, 1, 10)).await;
    let RawSession {
        ep: _ep,
        conn: _conn,
        mut send,
        mut recv,
    } = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    // Counts the full snapshots of topology version 1, and keeps the latest topology version.
    let (fulls, latest) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (f, l) = (fulls.clone(), latest.clone());
    tokio::spawn(async move {
        let mut frames = proto::FrameReader::new(proto::MAX_TO_ROUTER);
        while let Ok(Some(payload)) = frames.next(&mut recv).await {
            match proto::decode::<ToRouter>(&payload) {
                Ok(ToRouter::Snapshot {
                    topology_version, ..
                }) => {
                    if topology_version == 1 {
                        f.fetch_add(1, Ordering::Relaxed);
                    }
                    l.store(topology_version, Ordering::Relaxed);
                }
                Ok(ToRouter::Delta {
                    topology_version, ..
                }) => l.store(topology_version, Ordering::Relaxed),
                _ => {}
            }
        }
    });
    eventually(Duration::from_secs(10), "the first snapshot", || {
        latest.load(Ordering::Relaxed) == 1
    })
    .await;

    const ASKS: u64 = 200;
    let resync = proto::encode(&FromRouter::Resync { have_version: None }).unwrap();
    for _ in 0..ASKS {
        send.write_all(&resync).await.unwrap();
    }
    // The controller reads the stream in order: once the report after the requests is in, it
    // has answered them all.
    send.write_all(&telemetry_frame("edge-0", "transit-0", 4_000))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the report after the requests",
        || router_status(&d, "edge-0").is_some_and(|r| r.last_telemetry.is_some()),
    )
    .await;
    // And whatever it wrote before the next version has arrived once that version has.
    // One transit has no ring: a comment makes the text, and so the version, new.
    let next = format!("# version 2\n{}", fabric_yaml(71, 1, 1, 10));
    let out = apply(&d, &next, "a new version").await;
    assert_eq!(out.version, Some(2));
    eventually(Duration::from_secs(10), "version 2", || {
        latest.load(Ordering::Relaxed) == 2
    })
    .await;
    // The snapshot after the hello already answered them: version 1 went in full exactly once.
    let n = fulls.load(Ordering::Relaxed);
    assert_eq!(
        n, 1,
        "{n} full snapshots of version 1 for {ASKS} requests after the first one"
    );
    d.shutdown().await;
}

/// What this test binary's tracing events say at WARN and above (the controller runs in this
/// process and logs with `tracing`, as `tasman controller` does to its stderr), from the first
/// call on: every test's, so a test looks for its own words in it.
fn captured_log() -> &'static std::sync::Mutex<Vec<u8>> {
    use std::sync::{Mutex, OnceLock};
    static LOG: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log: &'static Mutex<Vec<u8>> = Box::leak(Box::default());
        struct Sink(&'static Mutex<Vec<u8>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
            .with_ansi(false)
            .with_writer(move || Sink(log))
            .finish()
            .try_init()
            .expect("the only tracing subscriber of this test binary");
        log
    })
}

/// The reason a router gives for rejecting a version is its word, up to a whole frame (1 MiB) of
/// it: the controller keeps (in the store, in `tasman status`) and logs a bounded part of it, as
/// it does with a hello's node name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_reason_is_kept_and_logged_bounded() {
    use router::control::proto::{self, FromRouter, MAX_REASON};

    let log = captured_log();
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(72, 1, 1, 10)).await;
    let mut s = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    let version = version_of(&next_message(&mut s.recv).await);
    let reason = "€".repeat(300_000);
    let nack = proto::encode(&FromRouter::Nack { version, reason }).unwrap();
    assert!(nack.len() < proto::MAX_FROM_ROUTER);
    s.send.write_all(&nack).await.unwrap();
    eventually(Duration::from_secs(10), "the rejection recorded", || {
        router_status(&d, "edge-0").is_some_and(|r| r.record.last_nack.is_some())
    })
    .await;
    let kept = router_status(&d, "edge-0")
        .and_then(|r| r.record.last_nack)
        .unwrap();
    assert_eq!(kept.version, version);
    // The reason's first MAX_REASON bytes at most, whole characters, the cut marked.
    assert!(
        kept.reason.len() <= MAX_REASON + "...".len()
            && kept.reason.len() > MAX_REASON - "€".len()
            && kept.reason.starts_with("€€")
            && kept.reason.ends_with("€..."),
        "kept {} bytes of the reason: {:?}",
        kept.reason.len(),
        kept.reason
    );
    // `tasman status` shows the rejection with that reason, on a line of bounded length.
    let status = status_text(&d).await;
    let line = status_line(&status, "edge-0");
    assert!(
        line.contains(&format!("rejected snapshot {version} ")) && line.contains(&kept.reason),
        "status line of edge-0: {line:?}\nall of it:\n{status}"
    );
    assert!(
        line.len() <= kept.reason.len() + 512,
        "{} bytes: {line}",
        line.len()
    );
    // The router then takes that version (asked for again, its cause gone): the rejection is
    // no longer shown as its state (the JSON keeps it, with its time).
    s.say(&FromRouter::Resync { have_version: None }).await;
    assert_eq!(version_of(&next_news(&mut s.recv).await), version);
    s.say(&FromRouter::Ack { version }).await;
    eventually(Duration::from_secs(10), "the version applied", || {
        router_status(&d, "edge-0").is_some_and(|r| r.record.applied_version == version)
    })
    .await;
    let status = status_text(&d).await;
    let line = status_line(&status, "edge-0");
    assert!(
        !line.contains("rejected"),
        "status line of edge-0: {line:?}"
    );
    let record = router_status(&d, "edge-0").and_then(|r| r.record.last_nack);
    assert!(
        record
            .as_ref()
            .is_some_and(|n| n.version == version && n.time_unix_ms > 0),
        "the rejection is no longer kept: {record:?}"
    );
    // The controller logged it, bounded the same way.
    let logged = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let line = logged
        .lines()
        .find(|l| l.contains("router rejected snapshot") && l.contains("€€"))
        .unwrap_or_else(|| panic!("no rejection logged; the log:\n{logged}"));
    assert!(
        line.contains(&format!("router rejected snapshot: {}", kept.reason))
            && line.contains("edge-0")
            && line.contains(&format!("version={version}")),
        "{line}"
    );
    assert!(
        line.len() <= kept.reason.len() + 512,
        "{} bytes: {line}",
        line.len()
    );
    d.shutdown().await;
}

/// The next message on a control stream made by hand, within 10 s.
async fn next_message(recv: &mut quinn::RecvStream) -> router::control::proto::ToRouter {
    use router::control::proto;
    let frame = tokio::time::timeout(
        Duration::from_secs(10),
        proto::read_frame(recv, proto::MAX_TO_ROUTER),
    )
    .await
    .expect("a frame within 10 s")
    .expect("a frame")
    .expect("not the end of the stream");
    proto::decode(&frame).unwrap()
}

/// The next message but revocation lists and heartbeats, within 10 s each.
async fn next_news(recv: &mut quinn::RecvStream) -> router::control::proto::ToRouter {
    use router::control::proto::ToRouter;
    loop {
        match next_message(recv).await {
            ToRouter::Crl { .. } | ToRouter::Heartbeat { .. } => continue,
            other => return other,
        }
    }
}

/// The version of a message that must be a snapshot.
fn version_of(msg: &router::control::proto::ToRouter) -> u64 {
    match msg {
        router::control::proto::ToRouter::Snapshot { version, .. } => *version,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

/// A controller on `yaml` (a PKI for `nodes` in `dir`), a session made by hand as edge-0, and
/// the version first offered to it.
async fn offered_to_edge_0(
    dir: &std::path::Path,
    nodes: &[String],
    yaml: &str,
) -> (
    fabric::controller::daemon::Daemon,
    std::path::PathBuf,
    RawSession,
    u64,
) {
    let (d, tls) = controller_with_pki(dir, nodes, yaml).await;
    let mut s = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    let version = version_of(&next_news(&mut s.recv).await);
    (d, tls, s, version)
}

/// edge-0's rejection of `version` for `reason`.
fn nack(version: u64, reason: &str) -> router::control::proto::FromRouter {
    router::control::proto::FromRouter::Nack {
        version,
        reason: reason.into(),
    }
}

/// A rejected version is offered again: at once to the router's next session (a restarted
/// router, or one whose reason has passed: a port that was taken), and within a session after a
/// back-off (from `NACK_RETRY_FIRST`, doubling). It was never sent to the node again, on any
/// session, until some newer version came: a router without a stored snapshot waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_version_is_offered_again_to_a_new_session_and_after_a_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let (d, tls, mut s, version) =
        offered_to_edge_0(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(74, 1, 1, 10)).await;
    s.say(&nack(version, "cannot bind: port taken")).await;
    // The same session: offered again after the back-off, in full.
    let nacked = std::time::Instant::now();
    let again = next_news(&mut s.recv).await;
    assert_eq!(version_of(&again), version);
    assert!(
        nacked.elapsed() >= fabric::controller::distribute::NACK_RETRY_FIRST / 2,
        "offered again after {:?}",
        nacked.elapsed()
    );
    // Rejected again: the session's next offer would come 2 x NACK_RETRY_FIRST after this.
    let nacked = std::time::Instant::now();
    s.say(&nack(version, "still taken")).await;
    // A new session of the node: offered at once, its first message, well before the old
    // session's back-off would have offered it (the bound leaves the set-up and a debug
    // build's encode all the slack up to there).
    s.conn.close(0u32.into(), b"restart");
    let mut s2 = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    assert_eq!(version_of(&next_news(&mut s2.recv).await), version);
    assert!(
        nacked.elapsed() < 2 * fabric::controller::distribute::NACK_RETRY_FIRST,
        "the new session waited {:?} after the rejection",
        nacked.elapsed()
    );
    d.shutdown().await;
}

/// A router whose reason for rejecting a version has passed (the address it was refused for is
/// on its host now) asks for it again with a `Resync` and gets it at once, not at the end of a
/// back-off that doubles to 5 minutes, however many times it asks; one that rejects and asks in
/// turn gets it no sooner than half the back-off's wait after its last ask, and still before
/// the back-off's own offer. (A `Resync` after a rejection went unanswered: the version had gone
/// out in full already.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_version_is_offered_again_at_once_when_the_router_asks() {
    use fabric::controller::distribute::NACK_RETRY_FIRST;
    use router::control::proto::FromRouter;

    let dir = tempfile::tempdir().unwrap();
    let (d, _, mut s, version) =
        offered_to_edge_0(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(79, 1, 1, 10)).await;
    let nack = nack(
        version,
        "node edge-0's QUIC address cannot be bound on this host",
    );
    let resync = FromRouter::Resync { have_version: None };
    // Rejected twice: the next offer would come 2 x NACK_RETRY_FIRST after the second.
    s.say(&nack).await;
    assert_eq!(version_of(&next_news(&mut s.recv).await), version);
    let nacked = std::time::Instant::now();
    s.say(&nack).await;
    // Asked twice: the second ask does not push the offer back. Offered before the back-off
    // would have (the bound leaves all the slack up to it).
    let asked = std::time::Instant::now();
    s.say(&resync).await;
    s.say(&resync).await;
    assert_eq!(version_of(&next_news(&mut s.recv).await), version);
    assert!(
        nacked.elapsed() < 2 * NACK_RETRY_FIRST,
        "offered again {:?} after the rejection, though the router asked",
        nacked.elapsed()
    );
    // Rejected a third time (the back-off's next offer 4 x NACK_RETRY_FIRST away) and asked for
    // at once: offered half that wait after the last ask.
    let nacked = std::time::Instant::now();
    s.say(&nack).await;
    s.say(&resync).await;
    assert_eq!(version_of(&next_news(&mut s.recv).await), version);
    assert!(
        asked.elapsed() >= 2 * NACK_RETRY_FIRST,
        "offered again {:?} after the first ask",
        asked.elapsed()
    );
    assert!(
        nacked.elapsed() < 4 * NACK_RETRY_FIRST,
        "offered again {:?} after the third rejection: by the back-off",
        nacked.elapsed()
    );
    // Taken, and recorded so.
    s.say(&FromRouter::Ack { version }).await;
    eventually(
        Duration::from_secs(10),
        "the acknowledgement recorded",
        || router_status(&d, "edge-0").is_some_and(|r| r.record.applied_version == version),
    )
    .await;
    d.shutdown().await;
}

/// Versions that change only the live state after a rejection (same topology, same
/// circuits) are the same offer: held back with the rejected one until its back-off ends, then
/// the current one goes, once. A new topology goes at once. (Each went out in full as it came,
/// to be rejected again: a router rejecting for a lasting reason got a full snapshot at every
/// live update.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_updates_after_a_rejection_wait_with_the_rejected_version() {
    use fabric::controller::distribute::NACK_RETRY_FIRST;

    let dir = tempfile::tempdir().unwrap();
    let (d, _, mut s, version) =
        offered_to_edge_0(dir.path(), &fabric_nodes(1, 2), &fabric_yaml(83, 1, 2, 10)).await;
    let nacked = std::time::Instant::now();
    s.say(&nack(version, "cannot bind: port taken")).await;
    eventually(Duration::from_secs(10), "the rejection recorded", || {
        router_status(&d, "edge-0").is_some_and(|r| r.record.last_nack.is_some())
    })
    .await;
    // A new version with the same topology and circuits (the circuit service publishing a new
    // list, equal: the rejected version's own is let go, as in the controller).
    let copy = (*d.ctl.published().circuits).clone();
    let live_only = d.ctl.publish_circuits(std::sync::Arc::new(copy)).unwrap();
    assert!(live_only > version);
    // Not sent before the back-off ends; then the current version, once.
    let offered = version_of(&next_news(&mut s.recv).await);
    assert_eq!(offered, live_only);
    assert!(
        nacked.elapsed() >= NACK_RETRY_FIRST / 2,
        "sent {:?} after the rejection",
        nacked.elapsed()
    );
    // Rejected again, then a new topology: sent at once, before the back-off (2 x 2 s) ends.
    // The apply after the controller took the rejection (before, a delta on the rejected
    // version could go out first, which the router answers with a resync: a race of the test's
    // own, failed under a loaded machine).
    // Timed from before the rejection: a version held until the back-off's end comes 4 s after
    // it, which a clock started after the rejection was seen recorded could pass as "at once".
    let renacked = std::time::Instant::now();
    s.say(&nack(offered, "still taken")).await;
    eventually(
        Duration::from_secs(10),
        "the second rejection recorded",
        || {
            router_status(&d, "edge-0")
                .and_then(|r| r.record.last_nack)
                .is_some_and(|n| n.version == offered)
        },
    )
    .await;
    apply(&d, &fabric_yaml(83, 1, 2, 20), "newer").await;
    let newer = version_of(&next_news(&mut s.recv).await);
    assert!(newer > live_only, "{newer} after {live_only}");
    // A version held back comes when the back-off ends, 4 s or more after the rejection.
    assert!(
        renacked.elapsed() < 2 * NACK_RETRY_FIRST,
        "sent {:?} after the second rejection, not before its back-off ({:?}) ended",
        renacked.elapsed(),
        2 * NACK_RETRY_FIRST
    );
    d.shutdown().await;
}

/// A version held back with a rejected one (the rejected topology and circuits again) goes out
/// once the router took a later version: the rejection is over. (Held back, it was marked seen
/// and owed to no one: the ACK ended the back-off whose end would have offered it, and the
/// router ran on the version before until something else changed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_held_back_with_a_rejected_one_goes_once_a_later_one_is_taken() {
    use router::control::proto::{FromRouter, ToRouter};
    let dir = tempfile::tempdir().unwrap();
    let (d, _, mut s, version) =
        offered_to_edge_0(dir.path(), &fabric_nodes(1, 2), &fabric_yaml(93, 1, 2, 10)).await;
    s.say(&nack(version, "cannot bind: port taken")).await;
    eventually(Duration::from_secs(10), "the rejection recorded", || {
        router_status(&d, "edge-0").is_some_and(|r| r.record.last_nack.is_some())
    })
    .await;
    // Other circuits: another offer, sent at once.
    let original = d.ctl.published().circuits.clone();
    let mut other = (*original).clone();
    other.push(topology::circuit::ProvisionedCircuit {
        id: topology::circuit::CircuitId::new("c-000001"),
        edge: topology::NodeId::new("edge-0"),
        prefix: "10.9.0.0/24".parse().unwrap(),
        service: topology::ServiceName::new("llm-chat"),
        vip: None,
        port: None,
        rate: topology::Bandwidth::from_mbps(10),
        path: ["edge-0", "transit-0", "site-0"]
            .into_iter()
            .map(topology::NodeId::new)
            .collect(),
    });
    let other = d.ctl.publish_circuits(std::sync::Arc::new(other)).unwrap();
    assert_eq!(version_of(&next_news(&mut s.recv).await), other);
    // Back to the rejected version's circuits: held back with it.
    let back = d.ctl.publish_circuits(original).unwrap();
    // The router takes the other version: the rejection is over, and the held one goes.
    s.say(&FromRouter::Ack { version: other }).await;
    let next = tokio::time::timeout(Duration::from_secs(20), next_news(&mut s.recv))
        .await
        .expect("the held-back version never went out");
    match next {
        ToRouter::Snapshot { version, .. }
        | ToRouter::Delta { version, .. }
        | ToRouter::Live { version, .. } => assert_eq!(version, back),
        other => panic!("expected version {back}, got {other:?}"),
    }
    d.shutdown().await;
}

/// A rejection that arrives after a later version of the same offer went out (a live update
/// written as a delta on the rejected version, which the router answers with `Resync`) is still
/// that offer: rejected again, its back-off doubles. (Its content was taken only from the
/// version written last, so such a rejection counted as a new offer: the back-off began again
/// at 2 s, and a router rejecting for a lasting reason got a full snapshot every few seconds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_answered_after_a_later_version_went_out_keeps_its_back_off() {
    use fabric::controller::distribute::NACK_RETRY_FIRST;
    use router::control::proto::{FromRouter, ToRouter};

    let dir = tempfile::tempdir().unwrap();
    let (d, _, mut s, version) =
        offered_to_edge_0(dir.path(), &fabric_nodes(1, 2), &fabric_yaml(88, 1, 2, 10)).await;
    // The same offer again (the circuit service publishing an equal list, the first one's let
    // go), written on top of the first.
    let copy = (*d.ctl.published().circuits).clone();
    let later = d.ctl.publish_circuits(std::sync::Arc::new(copy)).unwrap();
    match next_news(&mut s.recv).await {
        ToRouter::Delta { version, .. } | ToRouter::Live { version, .. } => {
            assert_eq!(version, later)
        }
        other => panic!("expected the later version as a delta, got {other:?}"),
    }
    // The router rejects the first, then asks for the rest (it lacks the delta's base): the
    // current version, in full, at once (the router asked).
    s.say(&nack(version, "cannot bind: port taken")).await;
    s.say(&FromRouter::Resync { have_version: None }).await;
    assert_eq!(version_of(&next_news(&mut s.recv).await), later);
    // Rejected again: the same offer, so the back-off doubles (2 x NACK_RETRY_FIRST).
    let nacked = std::time::Instant::now();
    s.say(&nack(later, "still taken")).await;
    assert_eq!(version_of(&next_news(&mut s.recv).await), later);
    assert!(
        nacked.elapsed() >= NACK_RETRY_FIRST * 3 / 2,
        "offered again {:?} after the second rejection",
        nacked.elapsed()
    );
    d.shutdown().await;
}

/// A rejected version's back-off, ending after a newer version went out, offers nothing: the
/// router has the newer one (or is answering it). (It sent the newer one again in full.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_overtaken_by_a_newer_version_offers_nothing_again() {
    use fabric::controller::distribute::NACK_RETRY_FIRST;

    let dir = tempfile::tempdir().unwrap();
    let (d, _, mut s, version) =
        offered_to_edge_0(dir.path(), &fabric_nodes(1, 2), &fabric_yaml(81, 1, 2, 10)).await;
    s.say(&nack(version, "cannot bind: port taken")).await;
    eventually(Duration::from_secs(10), "the rejection recorded", || {
        router_status(&d, "edge-0").is_some_and(|r| r.record.last_nack.is_some())
    })
    .await;
    // A transit ring link's latency changes.
    apply(&d, &fabric_yaml(81, 1, 2, 20), "newer").await;
    let newer = version_of(&next_news(&mut s.recv).await);
    assert!(newer > version, "{newer} after {version}");
    // Past the rejected version's back-off, with margin: nothing more.
    let more = tokio::time::timeout(2 * NACK_RETRY_FIRST, next_news(&mut s.recv)).await;
    let shown = |m: &router::control::proto::ToRouter| {
        format!("{m:?}").chars().take(100).collect::<String>()
    };
    assert!(
        more.is_err(),
        "sent again: {:?}",
        more.as_ref().ok().map(shown)
    );
    d.shutdown().await;
}

/// A controller whose first snapshot (a fabric of 300 transits) is larger than the stream
/// window (8 KiB) of a session said hello to by hand as `edge-0`: the session's write of it
/// stalls for as long as the test reads nothing. Returns once the session is connected.
async fn session_stuck_writing(
    dir: &std::path::Path,
) -> (fabric::controller::daemon::Daemon, RawSession) {
    let (d, tls) =
        controller_with_pki(dir, &fabric_nodes(1, 1), &fabric_yaml(75, 300, 2, 10)).await;
    let window: u32 = 8 << 10;
    assert!(d.ctl.published().full.len() > 4 * window as usize);
    let s = raw_hello_with(d.quic_addr, &tls, "edge-0", "edge-0", |t| {
        t.stream_receive_window(window.into());
    })
    .await;
    eventually(Duration::from_secs(10), "edge-0's session", || {
        router_status(&d, "edge-0").is_some_and(|r| r.connected)
    })
    .await;
    (d, s)
}

/// A router that writes its telemetry while the controller writes it a snapshot larger than its
/// stream window: the controller reads ahead while it writes (here 12 MiB of reports, over the
/// 1.25 MB stream window quinn grants by default and over the 4 MiB the controller queues), so
/// the router's writes finish and it can go back to reading (each report read takes the place of
/// the one waiting). (The session read nothing while it wrote: the router's report writes
/// stopped, so it stopped reading, so the snapshot's write stopped, until both ends' write-stall
/// timers closed the connection, and the next session did the same. Then it read up to 4 MiB
/// and stopped: the same, for a write that lasts while a router reports more than that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_reads_telemetry_while_it_writes_a_large_snapshot() {
    use router::control::proto::{self, FromRouter};

    let dir = tempfile::tempdir().unwrap();
    let (d, mut s) = session_stuck_writing(dir.path()).await;
    // About 100 KiB per report, 30 of them, written without reading.
    let neighbours = (0..1000)
        .map(|i| neighbour(&format!("transit-{i}"), 4_000))
        .collect();
    let frame = proto::encode(&FromRouter::Telemetry(telemetry_report(
        "edge-0", neighbours,
    )))
    .unwrap();
    assert!(frame.len() > 64 << 10 && frame.len() < proto::MAX_FROM_ROUTER);
    let total = 12 << 20;
    let writes = async {
        let mut sent = 0;
        while sent < total {
            s.send.write_all(&frame).await.unwrap();
            sent += frame.len();
        }
    };
    tokio::time::timeout(Duration::from_secs(20), writes)
        .await
        .expect("12 MiB of reports written within 20 s while the controller writes a snapshot");
    // The snapshot then arrives whole, on the same session.
    let snapshot = next_news(&mut s.recv).await;
    assert!(matches!(
        snapshot,
        router::control::proto::ToRouter::Snapshot { .. }
    ));
    assert!(router_status(&d, "edge-0").is_some_and(|r| r.connected));
    d.shutdown().await;
}

/// Reports that queue while the controller writes a long snapshot are superseded by the newest:
/// only it is merged once the write ends, and none counts as over the rate. (Each queued report
/// was merged in turn as if it had just come, the rate budget's burst of 20 spent on the oldest
/// and the rest dropped: the fabric ran on the router's state of the write's start, here a link
/// up the router had since found down, and an honest router was shown with reports over the rate
/// dropped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_queued_during_a_write_are_superseded_by_the_newest() {
    use router::control::proto::{FromRouter, ToRouter};

    let dir = tempfile::tempdir().unwrap();
    let (d, mut s) = session_stuck_writing(dir.path()).await;
    let report = |up: bool| {
        let mut n = neighbour("transit-0", 4_000);
        n.up = up;
        FromRouter::Telemetry(telemetry_report("edge-0", vec![n]))
    };
    // 25 s of reports, the last one finding the link down.
    for _ in 0..24 {
        s.say(&report(true)).await;
    }
    s.say(&report(false)).await;
    // The write ends (the snapshot read), and the queue is handled.
    assert!(matches!(
        next_news(&mut s.recv).await,
        ToRouter::Snapshot { .. }
    ));
    let link_up = || {
        d.ctl
            .rtt_matrix()
            .iter()
            .find(|r| r.link == "edge-0--transit-0")
            .map(|r| r.up)
    };
    eventually(
        Duration::from_secs(10),
        "the newest report (the link down) merged",
        || link_up() == Some(false),
    )
    .await;
    let r = router_status(&d, "edge-0").unwrap();
    assert_eq!(r.reports_dropped, 0, "reports counted as over the rate");
    d.shutdown().await;
}

/// Empty frames sent while the controller writes a large snapshot are counted against what it
/// reads ahead: it stops reading them, and the router's writes wait. (An empty frame counted
/// nothing: the controller read and queued them for as long as its write lasted, 24 bytes of
/// queue each, 2 GB in a 30 s write-stall window at 100 Mbit/s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_frames_during_a_write_are_not_read_ahead_without_end() {
    let dir = tempfile::tempdir().unwrap();
    let (d, mut s) = session_stuck_writing(dir.path()).await;
    // 2 M empty frames (8 MB): read whole, they would be written in well under a second. Read
    // at most 8 MiB's worth of queue (64 bytes each: 131,072 of them, 512 KiB), the rest stays
    // in the router's stream, past the controller's window (1.25 MB).
    let chunk = vec![0u8; 4 << 16];
    let writes = async {
        for _ in 0..(2 << 20) / (1 << 16) {
            s.send.write_all(&chunk).await.unwrap();
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(5), writes).await;
    assert!(
        done.is_err(),
        "8 MB of empty frames were all read while the controller wrote"
    );
    d.shutdown().await;
}

/// A router asking for certificate renewals in a tight loop gets the issuer's answer for a few
/// of them (a burst, then one every 10 s) and a cheap refusal for the rest: each answer by the
/// issuer costs a blocking task, the CA directory's lock and a warning in the log, so a router
/// (or a stolen key) could flood them at line rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_requests_beyond_a_small_budget_are_refused_cheaply() {
    use router::control::proto::{self, FromRouter, ToRouter};

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(76, 1, 1, 10)).await;
    let mut s = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    // Not a key: the issuer refuses it, as it would a request not due (its answer, either way).
    let ask = proto::encode(&FromRouter::Renew {
        public_key: vec![4; 65],
        proof: Vec::new(),
    })
    .unwrap();
    let asked = 40;
    for _ in 0..asked {
        s.send.write_all(&ask).await.unwrap();
    }
    let (mut by_issuer, mut over_budget) = (0, 0);
    while by_issuer + over_budget < asked {
        match next_news(&mut s.recv).await {
            ToRouter::RenewRefused { reason } if reason.contains("too many renewal requests") => {
                over_budget += 1
            }
            ToRouter::RenewRefused { .. } | ToRouter::Certificate { .. } => by_issuer += 1,
            _ => {}
        }
    }
    assert!(
        (1..=fabric::controller::distribute::RENEW_BURST as usize).contains(&by_issuer),
        "{by_issuer} of {asked} requests answered by the issuer"
    );
    d.shutdown().await;
}

/// A router that stops reading its control stream (here a peer that says hello, never reads, and
/// grants an 8 KiB stream window, well under the first snapshot): once the controller has been
/// unable to write a byte to it for the write-stall bound, it closes the connection with
/// `close::WRITE_STALLED`, counts it and ends the session; a router that reads is left alone.
/// (The write waited forever: the session task and the snapshot it was writing, up to 64 MiB,
/// stayed for as long as the peer kept the connection alive.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_stops_reading_is_closed_once_writes_to_it_stall() {
    use fabric::controller::daemon::{self, DaemonConfig};
    use router::codes::close;

    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("pki");
    pki(&tls, &fabric_nodes(1, 1));
    let stall = Duration::from_secs(1);
    let d = daemon::start(DaemonConfig {
        write_stall_timeout: stall,
        circuit_retention: Some(fabric::circuits::DEFAULT_RETENTION),
        ..import_config(
            &dir.path().join("state"),
            &tls,
            &fabric_yaml(73, 300, 2, 10),
        )
    })
    .await
    .expect("controller starts");
    let window: u32 = 8 << 10;
    let full = d.ctl.published().full.len();
    assert!(full > 4 * window as usize, "a snapshot of {full} bytes");
    let reading = start_client(d.quic_addr, "transit-0", &tls, None).await;

    let s = raw_hello_with(d.quic_addr, &tls, "edge-0", "edge-0", |t| {
        t.stream_receive_window(window.into());
    })
    .await;
    eventually(Duration::from_secs(10), "edge-0's session", || {
        router_status(&d, "edge-0").is_some_and(|r| r.connected)
    })
    .await;
    match tokio::time::timeout(Duration::from_secs(30), s.conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            let reason = String::from_utf8_lossy(&c.reason);
            assert_eq!(
                c.error_code.into_inner(),
                u64::from(close::WRITE_STALLED),
                "{reason}"
            );
            assert!(reason.contains("stopped reading"), "{reason}");
        }
        other => panic!("expected the controller to close the stalled session, got {other:?}"),
    }
    eventually(Duration::from_secs(10), "edge-0's session ended", || {
        router_status(&d, "edge-0").is_some_and(|r| !r.connected)
    })
    .await;
    assert_eq!(d.ctl.session_closes.get(close::WRITE_STALLED), 1);
    // The router that reads kept its one session all along (its writes never stalled).
    assert!(reading.is_connected());
    assert_eq!(reading.connects(), 1);
    drop(s);
    d.shutdown().await;
}

/// The controller reads one stream of a router's connection, the control stream the router
/// opens (renewals go over it too): a router can open no other. (The controller granted three
/// more bidirectional streams that nothing read: each held up to a stream window of the
/// router's bytes until the connection ended.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_cannot_open_streams_the_controller_never_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(74, 1, 1, 10)).await;
    let mut s = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    next_message(&mut s.recv).await;
    for (what, uni) in [("bidirectional", false), ("unidirectional", true)] {
        let n = bytes_taken(&s.conn, uni).await;
        assert_eq!(
            n, 0,
            "a second, {what} stream had the controller buffer {n} bytes it never reads"
        );
    }
    assert!(s.conn.close_reason().is_none(), "the session carries on");
    d.shutdown().await;
}

/// A router may acknowledge only a version its session sent it: an acknowledgement of any other
/// (here `u64::MAX`, and on a second session the version after the one sent) closes the
/// connection with `close::PROTOCOL`, is counted, and leaves the version recorded for the router
/// as it was. (Any version was recorded as applied, even one never sent: circuits, which wait for
/// routers to acknowledge the version that carries them, could go active early.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_of_a_version_the_session_did_not_send_closes_it_unrecorded() {
    use router::codes::close;
    use router::control::proto::{self, FromRouter};

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(75, 1, 1, 10)).await;
    let applied = || router_status(&d, "edge-0").map(|r| r.record.applied_version);
    let ack = |version: u64| proto::encode(&FromRouter::Ack { version }).unwrap();
    let mut sent = None;
    for (n, bogus) in [(1, None), (2, Some(1))] {
        let mut s = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
        let version = version_of(&next_message(&mut s.recv).await);
        if sent.is_none() {
            // The version sent, acknowledged: recorded.
            s.send.write_all(&ack(version)).await.unwrap();
            eventually(Duration::from_secs(10), "the acknowledgement", || {
                applied() == Some(version)
            })
            .await;
            sent = Some(version);
        }
        let never_sent = bogus.map_or(u64::MAX, |after: u64| version + after);
        s.send.write_all(&ack(never_sent)).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(10), s.conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
                let reason = String::from_utf8_lossy(&c.reason);
                assert_eq!(
                    c.error_code.into_inner(),
                    u64::from(close::PROTOCOL),
                    "{reason}"
                );
                assert!(reason.contains("did not send"), "{reason}");
            }
            other => panic!("expected a protocol close, got {other:?}"),
        }
        assert_eq!(applied(), sent, "the version recorded for edge-0");
        assert_eq!(d.ctl.session_closes.get(close::PROTOCOL), n);
    }
    d.shutdown().await;
}

/// The application close of `conn` within 10 s: (code, reason).
async fn closed_by_the_controller(conn: &quinn::Connection) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("expected the controller to close the connection, got {other:?}"),
    }
}

/// A second control session of a node while its first is up (a router that reconnected after a
/// network blip while the controller still holds its old connection): the controller closes the
/// older one with `close::SUPERSEDED` and counts it; the newer one gets the versions that follow.
/// (Both sessions were kept, each getting every version, until the older one's idle timeout; and
/// as many as a peer holding the node's key cared to open.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_session_of_a_node_closes_the_older_one_as_superseded() {
    use router::codes::close;
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(76, 1, 1, 10)).await;
    let RawSession {
        ep: _old_ep,
        conn: old,
        send: _old_send,
        recv,
    } = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    let old_version = topology_versions(recv);
    eventually(
        Duration::from_secs(10),
        "the older session's snapshot",
        || old_version.load(Ordering::Relaxed) == 1,
    )
    .await;

    let RawSession {
        ep: _new_ep,
        conn: new,
        send: _new_send,
        recv,
    } = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    let new_version = topology_versions(recv);
    let (code, reason) = closed_by_the_controller(&old).await;
    assert_eq!(code, u64::from(close::SUPERSEDED), "{reason}");
    assert_eq!(close::name(code), Some("superseded"));
    assert!(reason.contains("superseded"), "{reason}");
    eventually(Duration::from_secs(10), "the close counted", || {
        d.ctl.session_closes.get(close::SUPERSEDED) == 1
    })
    .await;

    // One transit has no ring: a comment makes the text, and so the version, new.
    let next = format!("# version 2\n{}", fabric_yaml(76, 1, 1, 10));
    let out = apply(&d, &next, "a new version").await;
    assert_eq!(out.version, Some(2));
    eventually(
        Duration::from_secs(10),
        "version 2 on the newer session",
        || new_version.load(Ordering::Relaxed) == 2,
    )
    .await;
    assert_eq!(
        old_version.load(Ordering::Relaxed),
        1,
        "the older one is gone"
    );
    assert!(new.close_reason().is_none(), "the newer session carries on");
    assert_eq!(d.ctl.session_closes.get(close::SUPERSEDED), 1);
    d.shutdown().await;
}

/// A node's status follows its newest session: the end of an older one (here the router closes
/// it too, as a router does with a connection it gave up on) leaves the node connected, and
/// draining if its newest session says so; only the end of the newest session disconnects it.
/// (The end of any session marked the node disconnected and not draining, under a live session,
/// until the router reconnected again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_end_of_a_nodes_newest_session_disconnects_it() {
    use router::control::proto::{FromRouter, encode};
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(77, 1, 1, 10)).await;
    let status = || router_status(&d, "edge-0").map(|r| (r.connected, r.draining));
    let old = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    eventually(Duration::from_secs(10), "the older session", || {
        status() == Some((true, false))
    })
    .await;

    let RawSession {
        ep: _new_ep,
        conn: new,
        mut send,
        recv,
    } = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    let version = topology_versions(recv);
    eventually(
        Duration::from_secs(10),
        "the newer session's snapshot",
        || version.load(Ordering::Relaxed) == 1,
    )
    .await;
    // The newer session says the router drains.
    let mut report = telemetry_report("edge-0", vec![neighbour("transit-0", 4_000)]);
    report.draining = true;
    send.write_all(&encode(&FromRouter::Telemetry(report)).unwrap())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "edge-0 draining", || {
        status() == Some((true, true))
    })
    .await;

    old.conn.close(0u32.into(), b"the old path");
    drop(old);
    stays(
        Duration::from_secs(3),
        "edge-0 connected and draining after its older session ended",
        || status() == Some((true, true)),
    )
    .await;
    let text = status_text(&d).await;
    let line = status_line(&text, "edge-0");
    assert!(
        line.contains(" yes ") && line.contains("draining"),
        "edge-0's status line: {line:?}\n{text}"
    );

    new.close(0u32.into(), b"stopped");
    eventually(
        Duration::from_secs(10),
        "edge-0 disconnected once its newest session ended",
        || status() == Some((false, false)),
    )
    .await;
    d.shutdown().await;
}

/// A router's control client whose session a newer one of its node supersedes treats the close
/// as any other: it reconnects after its back-off, and its new session supersedes the other in
/// turn, getting the versions that follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_whose_session_is_superseded_reconnects() {
    use router::codes::close;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(1, 1), &fabric_yaml(78, 1, 1, 10)).await;
    let c = start_client(d.quic_addr, "edge-0", &tls, None).await;
    assert_eq!(c.connects(), 1);
    let RawSession {
        ep: _ep,
        conn: other,
        send: _send,
        recv,
    } = raw_hello(d.quic_addr, &tls, "edge-0", "edge-0").await;
    let _version = topology_versions(recv);
    eventually(Duration::from_secs(20), "the client reconnected", || {
        c.connects() == 2 && c.is_connected()
    })
    .await;
    let (code, reason) = closed_by_the_controller(&other).await;
    assert_eq!(code, u64::from(close::SUPERSEDED), "{reason}");
    eventually(Duration::from_secs(10), "both closes counted", || {
        d.ctl.session_closes.get(close::SUPERSEDED) == 2
    })
    .await;
    assert!(router_status(&d, "edge-0").is_some_and(|r| r.connected));
    // One transit has no ring: a comment makes the text, and so the version, new.
    let next = format!("# version 2\n{}", fabric_yaml(78, 1, 1, 10));
    let out = apply(&d, &next, "a new version").await;
    assert_eq!(out.version, Some(2));
    eventually(Duration::from_secs(10), "version 2 at the client", || {
        c.topology_version() == 2
    })
    .await;
    assert_eq!(c.connects(), 2);
    d.shutdown().await;
}

/// An apply (or a rollback) that removes a node ends that node's control session at once, with
/// `close::NOT_ALLOWED` and the reason, before the version without it goes out: the removed
/// router never gets it (nor any later one), it is counted, and the controller forgets it. The
/// other routers' sessions carry on. (The session was checked only at its hello: a removed router
/// stayed connected, got every later version, the whole topology with its backends and circuits,
/// and its certificate renewed, while status no longer listed it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_that_removes_a_node_closes_its_session() {
    use router::codes::close;
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().unwrap();
    let (d, tls) =
        controller_with_pki(dir.path(), &fabric_nodes(2, 1), &fabric_yaml(83, 2, 1, 10)).await;
    let kept = start_client(d.quic_addr, "edge-0", &tls, None).await;
    let RawSession {
        ep: _ep,
        conn: removed,
        send: _send,
        recv,
    } = raw_hello(d.quic_addr, &tls, "edge-1", "edge-1").await;
    let removed_version = topology_versions(recv);
    eventually(Duration::from_secs(10), "edge-1's first snapshot", || {
        removed_version.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(router_status(&d, "edge-1").is_some_and(|r| r.connected));

    // The same fabric with one edge: edge-1 is gone.
    let out = apply(&d, &fabric_yaml(83, 1, 1, 10), "remove edge-1").await;
    assert_eq!(out.version, Some(2));
    let (code, reason) = closed_by_the_controller(&removed).await;
    assert_eq!(code, u64::from(close::NOT_ALLOWED), "{reason}");
    assert!(
        reason.contains("edge-1") && reason.contains("not in the topology since version 2"),
        "{reason}"
    );
    eventually(Duration::from_secs(10), "the close counted", || {
        d.ctl.session_closes.get(close::NOT_ALLOWED) == 1
    })
    .await;
    eventually(Duration::from_secs(10), "edge-1 forgotten", || {
        router_status(&d, "edge-1").is_none()
    })
    .await;
    eventually(Duration::from_secs(10), "version 2 at edge-0", || {
        kept.topology_version() == 2
    })
    .await;
    assert_eq!(
        removed_version.load(Ordering::Relaxed),
        1,
        "the removed router got the version without it"
    );
    assert!(
        kept.is_connected() && kept.connects() == 1,
        "edge-0 carries on"
    );

    // A rollback is a topology change like any: back to version 1, edge-1 may connect again;
    // back to version 2, its session ends the same way.
    let back = d
        .ctl
        .rollback(1, "test", "", false, None)
        .await
        .expect("rollback");
    assert_eq!(back.version, Some(3));
    let RawSession {
        ep: _ep2,
        conn: again,
        send: _send2,
        recv,
    } = raw_hello(d.quic_addr, &tls, "edge-1", "edge-1").await;
    let again_version = topology_versions(recv);
    eventually(Duration::from_secs(10), "edge-1 back at version 3", || {
        again_version.load(Ordering::Relaxed) == 3
    })
    .await;
    let out = d
        .ctl
        .rollback(2, "test", "", false, None)
        .await
        .expect("rollback");
    assert_eq!(out.version, Some(4));
    let (code, reason) = closed_by_the_controller(&again).await;
    assert_eq!(code, u64::from(close::NOT_ALLOWED), "{reason}");
    assert!(reason.contains("since version 4"), "{reason}");
    assert_eq!(again_version.load(Ordering::Relaxed), 3);
    eventually(Duration::from_secs(10), "both closes counted", || {
        d.ctl.session_closes.get(close::NOT_ALLOWED) == 2
    })
    .await;
    assert!(
        kept.is_connected() && kept.connects() == 1,
        "edge-0 carries on"
    );
    assert_eq!(d.ctl.session_closes.get(close::SUPERSEDED), 0);
    d.shutdown().await;
}

/// A router that drains applies no more snapshots, and so acknowledges none: a version applied
/// while it drains reaches the other routers, and the draining one stays at the version it runs,
/// shown `behind` and `draining`, its session up. (Its control client handed every snapshot over
/// and acknowledged it, though the control task no longer applied any: the controller counted
/// the router as running versions it never ran, for status, circuits and `wait_acknowledged`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_router_does_not_acknowledge_versions_it_does_not_apply() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = fabric_yaml(84, 1, 1, 10);
    let (d, tls) = controller_with_pki(dir.path(), &fabric_nodes(1, 1), &yaml).await;
    let edge = LiveRouter::start(d.quic_addr, "edge-0", &tls, None, &[]).await;
    let transit = start_client(d.quic_addr, "transit-0", &tls, None).await;
    let applied = |node: &str| router_status(&d, node).map_or(0, |r| r.record.applied_version);
    let first = d.ctl.published().version;
    eventually(
        Duration::from_secs(10),
        "both routers at the first version",
        || applied("edge-0") == first && applied("transit-0") == first,
    )
    .await;

    edge.handle.begin_drain();
    eventually(Duration::from_secs(10), "edge-0 shown draining", || {
        router_status(&d, "edge-0").is_some_and(|r| r.connected && r.draining)
    })
    .await;
    let out = apply(&d, &format!("# version 2\n{yaml}"), "while edge-0 drains").await;
    assert_eq!(out.version, Some(2));
    let second = d.ctl.published().version;
    assert!(second > first);
    eventually(
        Duration::from_secs(10),
        "transit-0 at the second version",
        || applied("transit-0") >= second && transit.topology_version() == 2,
    )
    .await;
    stays(
        Duration::from_secs(2),
        "edge-0 acknowledged a version it does not apply",
        || applied("edge-0") == first,
    )
    .await;
    assert_eq!(edge.handle.telemetry().snapshot_version, first);
    assert_eq!(edge.client.topology_version(), 1);
    assert!(edge.client.is_connected() && edge.client.connects() == 1);
    let text = status_text(&d).await;
    let line = status_line(&text, "edge-0");
    assert!(
        line.contains("behind") && line.contains("draining") && !line.contains("rejected"),
        "{text}"
    );
    edge.handle.shutdown().await;
    d.shutdown().await;
}

/// A version that moves a router's own QUIC address is applied: the router rebinds its endpoint
/// at the new address (its neighbours dial that one from the same version). One whose address
/// cannot be bound on the router's host is refused with the reason, and the router stays on the
/// version it runs. (The address was bound once, at start: the router acknowledged the move and
/// went on listening at the old address, where no neighbour dialled any more.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_moves_a_routers_address_rebinds_it_or_is_refused() {
    use std::net::SocketAddr;
    let dir = tempfile::tempdir().unwrap();
    let yaml = fabric_yaml(86, 1, 1, 10);
    let ports = fabric_ports(86);
    let (d, tls) = controller_with_pki(dir.path(), &fabric_nodes(1, 1), &yaml).await;
    let edge = LiveRouter::start(d.quic_addr, "edge-0", &tls, None, &[]).await;
    let applied = || router_status(&d, "edge-0").map_or(0, |r| r.record.applied_version);
    let first = d.ctl.published().version;
    eventually(
        Duration::from_secs(10),
        "edge-0 at the first version",
        || applied() == first,
    )
    .await;
    // edge-0 is the fourth node (after the transit and the two sites).
    let old: SocketAddr = format!("127.86.0.4:{}", ports.quic).parse().unwrap();
    assert_eq!(edge.handle.quic_addr(), Some(old));

    let moved: SocketAddr = format!("127.86.0.200:{}", ports.quic).parse().unwrap();
    let text = yaml.replace(&format!("address: {old}"), &format!("address: {moved}"));
    assert_ne!(text, yaml);
    assert_eq!(apply(&d, &text, "move edge-0").await.version, Some(2));
    let second = d.ctl.published().version;
    eventually(Duration::from_secs(10), "edge-0 at the new address", || {
        applied() == second && edge.handle.quic_addr() == Some(moved)
    })
    .await;

    // An address of no interface of this host (TEST-NET-1): refused, and nothing changes.
    let away = text.replace(
        &format!("address: {moved}"),
        &format!("address: 192.0.2.1:{}", ports.quic),
    );
    assert_eq!(apply(&d, &away, "move edge-0 away").await.version, Some(3));
    eventually(Duration::from_secs(10), "edge-0 refuses version 3", || {
        router_status(&d, "edge-0")
            .and_then(|r| r.record.last_nack)
            .is_some_and(|n| n.reason.contains("192.0.2.1"))
    })
    .await;
    assert_eq!(applied(), second);
    assert_eq!(edge.handle.quic_addr(), Some(moved));
    assert_eq!(edge.client.topology_version(), 2);
    edge.handle.shutdown().await;
    d.shutdown().await;
}
