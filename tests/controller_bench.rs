//! Controller benchmarks (ignored in CI; see docs/benchmarks.md "Controller"):
//!
//! ```text
//! cargo test -p tasman --test controller_bench -- --ignored --nocapture --test-threads 1
//! ```
//!
//! The controller runs as the real `tasman controller` process; N lightweight routers (the real
//! control client over real mutual-TLS QUIC, no data plane) run in this process.

mod common;
mod controller_common;
#[path = "../bench/src/proc_stat.rs"]
mod proc_stat;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use controller_common::*;
use fabric::admin::topology::ApplyRequest;
use fabric::cli::admin_client::{AdminArgs, AdminClient, Output};
use fabric::controller::ApplyOutcome;

const BIN: &str = env!("CARGO_BIN_EXE_tasman");

/// CPU seconds (user + system) and resident KiB of the controller process `pid`.
fn usage(pid: u32) -> (f64, u64) {
    let cpu_ms = proc_stat::cpu_ms(pid).expect("the controller's CPU time");
    let rss_kib = proc_stat::rss_kib(pid).expect("the controller's RSS");
    (cpu_ms as f64 / 1000.0, rss_kib)
}

async fn run(n: usize, net: u8, telemetry_secs: u64) {
    if std::env::var_os("BENCH_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("BENCH_LOG"))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let transits = 4;
    let edges = n - transits - 2;
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("pki");
    let nodes = fabric_nodes(edges, transits);
    let t = Instant::now();
    pki(&tls, &nodes);
    eprintln!("[{n}] pki for {n} nodes: {:?}", t.elapsed());
    let state = dir.path().join("state");
    let topo = dir.path().join("t.yaml");
    std::fs::write(&topo, fabric_yaml(net, edges, transits, 10)).unwrap();
    let mut ctl = common::spawn_controller(
        Command::new(BIN)
            .args(["controller", "--state"])
            .arg(&state)
            .arg("--topology")
            .arg(&topo)
            .arg("--tls-dir")
            .arg(&tls)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env(
                "RUST_LOG",
                std::env::var("BENCH_CTL_LOG").unwrap_or("warn".into()),
            )
            .stderr(match std::env::var_os("BENCH_CTL_LOGFILE") {
                Some(f) => Stdio::from(std::fs::File::create(f).unwrap()),
                None => Stdio::null(),
            }),
    );
    let (quic, admin) = (ctl.quic, ctl.admin.clone());
    let child = &mut ctl.proc.child;
    let c = AdminClient::new(&AdminArgs {
        controller: admin,
        token: None,
        token_file: Some(state.join("admin-token")),
        output: Output::Text,
        request_timeout: fabric::cli::admin_client::DEFAULT_REQUEST_TIMEOUT,
    })
    .unwrap();

    let t = Instant::now();
    let mut clients = Vec::with_capacity(n);
    // Routers connect in waves of BENCH_CONNECT_BATCH (default 50; 1000 = all at once).
    let batch = std::env::var("BENCH_CONNECT_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50usize)
        .max(1);
    for chunk in nodes.chunks(batch) {
        let mut starts = Vec::new();
        for node in chunk {
            let tls = tls.clone();
            let node = node.clone();
            starts.push(tokio::spawn(async move {
                start_client(quic, &node, &tls, None).await
            }));
        }
        for s in starts {
            clients.push(s.await.unwrap());
        }
    }
    eprintln!(
        "[{n}] {n} routers connected and on version 1: {:?}",
        t.elapsed()
    );

    let reconnects = |clients: &[router::control::ControlClient]| -> u64 {
        clients.iter().map(|c| c.connects().saturating_sub(1)).sum()
    };
    eprintln!(
        "[{n}] connected now: {}, reconnects so far: {}",
        clients.iter().filter(|c| c.is_connected()).count(),
        reconnects(&clients)
    );
    let mut samples = Vec::new();
    for round in 0..5u32 {
        let want = 2 + round as u64;
        let text = fabric_yaml(net, edges, transits, 11 + round);
        let req = ApplyRequest {
            text,
            dry_run: false,
            message: "bench".into(),
            author: "bench".into(),
            base_version: None,
        };
        let t0 = Instant::now();
        // The answer and the routers' progress are watched at the same time: the controller
        // distributes before it computes the impact plan for the answer.
        let post = {
            let c = c.clone();
            tokio::spawn(async move {
                let out: ApplyOutcome = c.post("/v1/topology", &req).await.unwrap();
                (out, t0.elapsed())
            })
        };
        loop {
            if clients.iter().all(|c| c.topology_version() == want) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let done = clients
                    .iter()
                    .filter(|c| c.topology_version() == want)
                    .count();
                let connected = clients.iter().filter(|c| c.is_connected()).count();
                panic!(
                    "[{n}] after 60 s only {done}/{n} routers applied version {want} ({connected} connected)"
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let all = t0.elapsed();
        let (out, answered) = post.await.unwrap();
        assert_eq!(out.version, Some(want));
        // The controller's own record: every router acknowledged.
        loop {
            let st: fabric::admin::status::Status = c.get("/v1/status").await.unwrap();
            if st.routers.iter().all(|r| r.applied_topology == want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let acked = t0.elapsed();
        eprintln!(
            "[{n}] apply {want}: answered {answered:?}, all {n} applied {all:?}, controller saw all acks by {acked:?}"
        );
        samples.push(all);
    }
    eprintln!(
        "[{n}] reconnects during the applies: {}",
        reconnects(&clients)
    );
    samples.sort();
    eprintln!(
        "[{n}] apply -> all routers applied: median {:?}, max {:?}",
        samples[samples.len() / 2],
        samples[samples.len() - 1]
    );

    if telemetry_secs > 0 {
        // Every router reports every second: 3 neighbours each, RTTs with a little jitter.
        for (i, cl) in clients.iter().enumerate() {
            let me = nodes[i].clone();
            let peers: Vec<String> = (1..=3)
                .map(|k| nodes[(i + k) % nodes.len()].clone())
                .collect();
            let tick = Arc::new(std::sync::atomic::AtomicU64::new(i as u64));
            cl.set_telemetry(Arc::new(move || {
                let t = tick.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let rtt_us = 4_000 + (t % 7) * 50;
                let neighbours = peers.iter().map(|p| neighbour(p, rtt_us)).collect();
                Some(telemetry_report(&me, neighbours))
            }));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (cpu0, _) = usage(child.id());
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(telemetry_secs)).await;
        let (cpu1, rss) = usage(child.id());
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "[{n}] telemetry every 1 s from {n} routers: controller CPU {:.1}% of one core, RSS {:.1} MiB",
            100.0 * (cpu1 - cpu0) / secs,
            rss as f64 / 1024.0
        );
    }
    let (_, rss) = usage(child.id());
    eprintln!(
        "[{n}] controller RSS at the end: {:.1} MiB",
        rss as f64 / 1024.0
    );
    drop(clients);
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_apply_to_all_acks_100_routers() {
    run(100, 81, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_apply_to_all_acks_1000_routers_and_telemetry_load() {
    run(1000, 82, 10).await;
}
