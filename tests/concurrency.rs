//! 1,000 concurrent client connections through one edge all complete correctly.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENTS: usize = 1000;

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

    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..CLIENTS {
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let s = tokio::net::TcpStream::connect((LOCAL, port)).await;
                // Every connection is open before any sends: they are all concurrent. (A failed
                // connect still reaches the barrier, so the others are not held forever.)
                barrier.wait().await;
                let mut s = s?;
                let mut msg = vec![0u8; 8 * 1024 + i];
                fill(&mut msg, &mut (i as u64 + 1));
                s.write_all(&msg).await?;
                s.shutdown().await?;
                let mut back = Vec::with_capacity(msg.len());
                s.read_to_end(&mut back).await?;
                Ok::<bool, std::io::Error>(back == msg)
            }));
        }
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
    assert_eq!(
        ok, CLIENTS,
        "only {ok} of {CLIENTS} clients completed byte-exact"
    );
    assert!(f.metric("edge", "tasman_streams_total", "") >= CLIENTS as u64);
}
