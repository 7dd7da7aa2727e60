//! 1,000 concurrent client connections through one edge all complete correctly, and all of
//! them are open through the fabric at once: each is held, mid-exchange, until every one of
//! them has had its first part echoed, while the routers' gauges count 1,000 open streams.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENTS: usize = 1000;
/// What each client sends (and reads back) before it is held.
const FIRST: usize = 4 * 1024;

async fn echo_backend() -> SocketAddr {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(LOCAL, 0)).unwrap();
    let l = sock.listen(4096).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Every client connects (each from a source address of its own), sends its first [`FIRST`] bytes and reads their echo, then waits for
/// the release: all 1,000 connections are then open edge -> transit -> site -> backend at once
/// (an edge serving one connection at a time, or capping its streams, never gets them all
/// there). Once released, each sends the rest, half-closes and checks the whole echo.
#[test]
fn a_thousand_concurrent_clients_through_one_edge_all_complete() {
    let limit = raise_nofile();
    assert!(
        limit >= 2 * CLIENTS as u64 + 256,
        "RLIMIT_NOFILE hard limit {limit} is too low for this test"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let backend = rt.block_on(echo_backend());
    let port = free_tcp_port(LOCAL);
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .transit("transit", free_udp(LOCAL))
        .site("site", free_udp(LOCAL), &[("chat", backend, 4000)])
        .link("edge", "transit", "1ms")
        .link("transit", "site", "1ms")
        .service("chat", port, &[]);
    let mut f = Fabric::new(&y);
    f.start_all();
    f.wait_preferred("edge", "chat", "site");

    let connected = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    // Clients whose first part came back (and which now wait), and clients that failed.
    let held = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (connected, held, failed) = (connected.clone(), held.clone(), failed.clone());
            let mut released = released.clone();
            rt.spawn(async move {
                let client = async {
                    // Each client from an address of its own, as 1,000 users would be: the
                    // edge's default per-source cap (a quarter of its client budget, at least
                    // 64) is not what this test measures.
                    let connect = async {
                        let sock = tokio::net::TcpSocket::new_v4()?;
                        let src =
                            std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
                        sock.bind((src, 0).into())?;
                        sock.connect((LOCAL, port).into()).await
                    };
                    let s = connect.await;
                    // Every connection is open before any sends. (A failed connect still
                    // reaches the barrier, so the others are not held forever.)
                    connected.wait().await;
                    let mut s = s?;
                    let mut msg = vec![0u8; 2 * FIRST + i];
                    fill(&mut msg, &mut (i as u64 + 1));
                    s.write_all(&msg[..FIRST]).await?;
                    let mut back = vec![0u8; FIRST];
                    s.read_exact(&mut back).await?;
                    if back != msg[..FIRST] {
                        return Ok(false);
                    }
                    held.fetch_add(1, Ordering::SeqCst);
                    // Held open, mid-exchange, until every client got here.
                    let _ = released.wait_for(|r| *r).await;
                    s.write_all(&msg[FIRST..]).await?;
                    s.shutdown().await?;
                    let mut rest = Vec::with_capacity(msg.len() - FIRST);
                    s.read_to_end(&mut rest).await?;
                    Ok::<bool, std::io::Error>(rest == msg[FIRST..])
                };
                let r = client.await;
                if !matches!(r, Ok(true)) {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                r
            })
        })
        .collect();

    eventually(
        DEADLINE * 4,
        "every client's first part echoed (or failed)",
        || held.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst) == CLIENTS,
    );
    let at_once = held.load(Ordering::SeqCst);
    // Every connection is open through the fabric now: counted by the edge and the site as a
    // client (backend) stream, by the transit as a relayed one.
    let gauges = [
        ("edge", "tasman_streams_active"),
        ("transit", "tasman_relayed_streams_active"),
        ("site", "tasman_streams_active"),
    ]
    .map(|(node, name)| (node, f.metric(node, name, "")));
    release.send(true).unwrap();

    let results = rt.block_on(async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(tokio::time::timeout(DEADLINE * 4, t).await);
        }
        out
    });
    let mut ok = 0;
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(Ok(Ok(true))) => ok += 1,
            other => eprintln!("client {i}: {other:?}"),
        }
    }
    println!("{at_once} clients held at once; open streams then: {gauges:?}");
    assert_eq!(
        at_once, CLIENTS,
        "only {at_once} of {CLIENTS} clients had their first part echoed while all were held \
         open; streams open then: {gauges:?}"
    );
    for (node, open) in gauges {
        assert!(
            open >= CLIENTS as u64,
            "{node} counted {open} open streams while all {CLIENTS} clients were held: {gauges:?}"
        );
    }
    assert_eq!(
        ok, CLIENTS,
        "only {ok} of {CLIENTS} clients completed byte-exact"
    );
    assert!(f.metric("edge", "tasman_streams_total", "") >= CLIENTS as u64);
}
