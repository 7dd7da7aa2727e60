//! The controller's store under SIGKILL: every apply answered as successful survives, no
//! apply is half-applied, and the history stays whole.

mod common;
mod controller_common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use controller_common::*;
use fabric::admin::topology::{ApplyRequest, HistoryEntry};
use fabric::cli::admin_client::{AdminArgs, AdminClient, Output};
use fabric::controller::ApplyOutcome;
use fabric::controller::records::TopologyVersion;

const BIN: &str = env!("CARGO_BIN_EXE_tasman");

/// The controller, SIGKILLed when dropped.
fn start(state: &std::path::Path, topo: &std::path::Path) -> common::ControllerProc {
    common::spawn_controller(
        Command::new(BIN)
            .args(["controller", "--state"])
            .arg(state)
            .arg("--topology")
            .arg(topo)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null()),
    )
}

fn client(admin: &str, state: &std::path::Path) -> AdminClient {
    AdminClient::new(&AdminArgs {
        controller: admin.to_string(),
        token: None,
        token_file: Some(state.join("admin-token")),
        output: Output::Text,
        request_timeout: fabric::cli::admin_client::DEFAULT_REQUEST_TIMEOUT,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_applies_loses_no_answered_apply_and_half_applies_none() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let topo = dir.path().join("import.yaml");
    let base = fabric_yaml(65, 4, 3, 10);
    std::fs::write(&topo, &base).unwrap();
    // (version, text) of every apply the controller answered as successful.
    let acked: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let mut total_attempts = 0u64;

    // At least ten rounds, and on until ten applies in all were answered, so that the test
    // exercised real applies: a slow disk or a busy machine fits fewer into a kill window, and
    // gets more windows (within a generous bound) instead of failing.
    const ROUNDS: u64 = 10;
    const ACKED: usize = 10;
    const MAX_ROUNDS: u64 = 100;
    let started = std::time::Instant::now();
    for round in 0u64.. {
        let acked_so_far = acked.lock().unwrap().len();
        assert!(
            round < MAX_ROUNDS && started.elapsed() < Duration::from_secs(300),
            "only {acked_so_far} applies answered of {total_attempts} in {round} rounds ({:?})",
            started.elapsed()
        );
        let ctl = start(&state, &topo);
        let c = client(&ctl.admin, &state);

        // After a restart: everything answered before is there, exactly, and history is whole.
        let hist: Vec<HistoryEntry> = c
            .get("/v1/topology/history?limit=100000")
            .await
            .expect("history");
        let versions: Vec<u64> = hist.iter().rev().map(|h| h.version).collect();
        let n = versions.len() as u64;
        assert_eq!(
            versions,
            (1..=n).collect::<Vec<_>>(),
            "history has no gaps (round {round})"
        );
        assert!(hist[0].current, "the newest version is the current one");
        let answered = acked.lock().unwrap().clone();
        for (v, text) in &answered {
            let rec: TopologyVersion = c
                .get(&format!("/v1/topology/versions/{v}"))
                .await
                .expect("answered version present");
            assert_eq!(&rec.text, text, "version {v} is exactly what was applied");
        }
        for v in 1..=n {
            let rec: TopologyVersion = c.get(&format!("/v1/topology/versions/{v}")).await.unwrap();
            assert!(
                topology::load(&rec.text).is_ok(),
                "version {v} is a whole, valid topology"
            );
            // Its metadata (what history lists) committed with it and describes it.
            let h = &hist[(n - v) as usize];
            assert_eq!(
                (h.version, h.bytes),
                (v, rec.text.len() as u64),
                "history's row of version {v} is its text's"
            );
        }
        // Enough rounds and applies: the checks above covered the last round's too. (The loop
        // ended before the restart that checks them: the last round's answered applies went
        // unchecked but for a count.)
        if round >= ROUNDS && answered.len() >= ACKED {
            assert!(
                n as usize > answered.len(),
                "import + every answered apply (+ possibly unanswered ones that committed)"
            );
            eprintln!("{} applies answered of {total_attempts}", answered.len());
            drop(ctl);
            break;
        }

        // A stream of applies, killed after a varying delay.
        let acked2 = acked.clone();
        let c2 = client(&ctl.admin, &state);
        let applier = tokio::spawn(async move {
            let mut attempts = 0u64;
            for i in 0.. {
                let ms = 10 + (round * 100 + i) % 40;
                let text =
                    fabric_yaml(65, 4, 3, ms as u32) + &format!("# round {round} apply {i}\n");
                let req = ApplyRequest {
                    text: text.clone(),
                    dry_run: false,
                    message: format!("r{round} i{i}"),
                    author: "crash-test".into(),
                    base_version: None,
                };
                attempts += 1;
                match c2.post::<_, ApplyOutcome>("/v1/topology", &req).await {
                    Ok(out) => acked2
                        .lock()
                        .unwrap()
                        .push((out.version.expect("applied"), text)),
                    Err(_) => return attempts,
                }
            }
            attempts
        });
        tokio::time::sleep(Duration::from_millis(60 + (round * 37) % 200)).await;
        drop(ctl); // SIGKILL (std's kill() on unix), then reaped
        total_attempts += tokio::time::timeout(Duration::from_secs(10), applier)
            .await
            .expect("applier stops")
            .unwrap();
    }
}
