//! `tasman demo` end to end: the real binary starts a controller and the APAC fabric (21
//! in-process routers taking their snapshots from it, every link emulated), sends requests from
//! several edges, fails a site over, raises a link's latency through the admin API, and exits 0.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_serves_every_edge_fails_over_and_moves_a_path_by_a_live_edit_then_exits_zero() {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tasman"))
        .args(["demo", "--quick", "--ephemeral-ports"])
        .output()
        .expect("run tasman demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tasman demo failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "demo took {:?}",
        start.elapsed()
    );

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
    assert!(
        stdout.contains("First new connection served by"),
        "{stdout}"
    );
    assert!(stdout.contains("Demo complete."), "{stdout}");

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
}
