//! `tasman demo` end to end: the real binary starts the APAC fabric (21 in-process routers, every
//! link emulated), sends requests from several edges, fails a site over, and exits 0.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_serves_every_edge_and_fails_over_then_exits_zero() {
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
}
