//! The operator's topology workflow through the admin API and the real `tasman` binary:
//! refusals (no token, invalid YAML with line:column), apply with a plan, history, rollback and
//! `edit` driven by a scripted $EDITOR.

mod controller_common;
#[path = "common/netns.rs"]
#[allow(dead_code)]
mod netns;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use controller_common::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A raw HTTP/1.1 request; returns the status code.
fn http_status(addr: &str, req: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

async fn setup(dir: &std::path::Path, yaml: &str) -> (fabric::controller::daemon::Daemon, Env) {
    let (d, _tls) = controller_with_pki(dir, &[], yaml).await;
    let env = Env::of(&d);
    (d, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_admin_requests_are_refused_and_status_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    // A 1 ms ring: each edge has its sites 3 and 4 ms away, within 2 ms, so they share it.
    let (d, env) = setup(dir.path(), &fabric_yaml(62, 2, 2, 1)).await;
    let addr = env.admin.clone();
    let token = env.token.clone();
    let (none, wrong, good, apply_none) = tokio::task::spawn_blocking(move || {
        (
            http_status(&addr, "GET /v1/topology HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            http_status(&addr, "GET /v1/topology HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nConnection: close\r\n\r\n"),
            http_status(
                &addr,
                &format!("GET /v1/topology HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
            ),
            http_status(
                &addr,
                "POST /v1/topology HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"text\":\"\"}",
            ),
        )
    })
    .await
    .unwrap();
    assert_eq!((none, wrong, good, apply_none), (401, 401, 200, 401));
    // The CLI without a token: refused, exit 1, nothing changed.
    let no_token = Env {
        admin: env.admin.clone(),
        token: String::new(),
    };
    let out = tokio::task::spawn_blocking(move || tasman(&no_token, &["topology", "get"], &[], ""))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("token"), "{}", text(&out.stderr));
    assert_eq!(d.ctl.current().record.version, 1);

    // With the token: `tasman status` shows every router, per-service choices and the RTT matrix.
    let e = Env {
        admin: env.admin.clone(),
        token: env.token.clone(),
    };
    let out = tokio::task::spawn_blocking(move || {
        (
            tasman(&e, &["status"], &[], ""),
            tasman(&e, &["status", "-o", "json"], &[], ""),
        )
    })
    .await
    .unwrap();
    let (txt, json) = out;
    assert!(txt.status.success(), "{}", text(&txt.stderr));
    let so = text(&txt.stdout);
    assert!(
        so.contains("topology version 1")
            && so.contains("edge-1")
            && so.contains("service llm-chat"),
        "{so}"
    );
    assert!(so.contains("transit-0--transit-1"), "{so}");
    let st: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(st["routers"].as_array().unwrap().len(), 6);
    assert!(
        st["routers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["behind"] == true && r["connected"] == false)
    );
    assert_eq!(st["services"][0]["edges"].as_array().unwrap().len(), 2);
    // No router runs, so no edge reported the site it uses: the cheapest one is shown, marked.
    assert!(
        st["services"][0]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["reported"] == false && e["site"].is_string())
    );
    assert!(so.contains("(estimate: no report from the edge)"), "{so}");
    // Equal weights: the two sites share each edge's new connections half and half.
    let shares = &st["services"][0]["edges"][0]["shares"];
    assert_eq!(
        shares,
        &serde_json::json!([{"site": "site-0", "share": 0.5}, {"site": "site-1", "share": 0.5}]),
        "{st}"
    );
    assert!(
        so.contains("shared by weight: site-0 50% + site-1 50%"),
        "{so}"
    );
    d.shutdown().await;
}

/// A read-only token (`<state>/admin-read-token`, generated beside the admin token) lets a
/// dashboard or `tasman status` read everything and change nothing: GETs are served with it, a
/// change is refused with 403 (the CLI exits 1 saying the token is read-only), and nothing
/// changes; the admin token still changes the topology. (One token did everything: whatever
/// polled the status could apply a topology or delete circuits.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_only_token_reads_everything_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (d, env) = setup(dir.path(), &fabric_yaml(61, 2, 2, 1)).await;
    let read = std::fs::read_to_string(dir.path().join("state").join("admin-read-token"))
        .expect("the read-only token is generated in the state directory");
    let read = read.trim().to_string();
    assert!(read.len() >= 32 && read != env.token, "{read:?}");
    let ro = Env {
        admin: env.admin.clone(),
        token: read.clone(),
    };
    let changed = dir.path().join("changed.yaml");
    std::fs::write(&changed, fabric_yaml(61, 2, 2, 2)).unwrap();
    let file = changed.to_str().unwrap().to_string();
    let addr = env.admin.clone();
    let (reads, apply, delete) = tokio::task::spawn_blocking(move || {
        let reads: Vec<_> = [
            &["status"][..],
            &["topology", "get"],
            &["topology", "history"],
            &["circuit", "list"],
        ]
        .iter()
        .map(|args| (args.join(" "), tasman(&ro, args, &[], "")))
        .collect();
        let apply = tasman(&ro, &["topology", "apply", &file], &[], "");
        let delete = http_status(
            &addr,
            &format!(
                "POST /v1/circuits/1/delete HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {read}\r\n\
                 Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            ),
        );
        (reads, apply, delete)
    })
    .await
    .unwrap();
    for (what, out) in &reads {
        assert!(out.status.success(), "{what}: {}", text(&out.stderr));
    }
    assert_eq!(apply.status.code(), Some(1), "{}", text(&apply.stderr));
    assert!(
        text(&apply.stderr).contains("read-only"),
        "{}",
        text(&apply.stderr)
    );
    assert_eq!(delete, 403);
    assert_eq!(d.ctl.current().record.version, 1, "nothing changed");
    let admin = Env {
        admin: env.admin.clone(),
        token: env.token.clone(),
    };
    let file = changed.to_str().unwrap().to_string();
    let out =
        tokio::task::spawn_blocking(move || tasman(&admin, &["topology", "apply", &file], &[], ""))
            .await
            .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(d.ctl.current().record.version, 2);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_apply_changes_nothing_and_reports_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let good = fabric_yaml(63, 2, 2, 10);
    let (d, env) = setup(dir.path(), &good).await;
    let env = std::sync::Arc::new(env);
    // A link to a node that does not exist.
    let bad = good.replace("{a: edge-1, b: transit-1", "{a: edge-9, b: transit-1");
    let bad_line = bad.lines().position(|l| l.contains("edge-9")).unwrap() + 1;
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, &bad).unwrap();
    let (e, f) = (env.clone(), file.display().to_string());
    let out = tokio::task::spawn_blocking(move || tasman(&e, &["topology", "apply", &f], &[], ""))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let prefix = format!("{}:{bad_line}:", file.display());
    assert!(
        err.lines()
            .any(|l| l.starts_with(&prefix) && l.contains("error") && l.contains("edge-9")),
        "{err}"
    );
    assert_eq!(d.ctl.current().record.version, 1);
    assert_eq!(d.ctl.current().record.text, good);
    assert_eq!(d.ctl.history(100).unwrap().len(), 1);

    // A valid text's warnings point into the file too (they were "topology:LINE:COL").
    let lonely = good.replace(
        "links:\n",
        &format!(
            "  - id: edge-9\n    kind: edge\n    region: au-east\n    country: AU\n    \
             location: {{lat: -33.8, lon: 151.2}}\n    address: 127.63.9.9:{}\n    \
             client_address: 127.63.9.10\nlinks:\n",
            fabric_ports(63).quic
        ),
    );
    let file = dir.path().join("lonely.yaml");
    std::fs::write(&file, &lonely).unwrap();
    let (e, f) = (env.clone(), file.display().to_string());
    let out = tokio::task::spawn_blocking(move || {
        tasman(&e, &["topology", "apply", &f, "--dry-run"], &[], "")
    })
    .await
    .unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let prefix = format!("{}:", file.display());
    assert!(
        err.lines()
            .any(|l| l.starts_with(&prefix) && l.contains("warning") && l.contains("edge-9")),
        "{err}"
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_plan_history_rollback_and_edit_keep_the_operators_text() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = fabric_yaml(64, 3, 3, 10);
    let (d, env) = setup(dir.path(), &v1).await;
    let env = std::sync::Arc::new(env);

    // Dry run: a plan, nothing applied. Raising one ring link moves edge-2 to the other site.
    let v2 = v1.replace(
        "{a: transit-2, b: transit-0, latency: 10ms",
        "{a: transit-2, b: transit-0, latency: 40ms",
    ) + "# an operator's comment that must survive\n";
    assert_ne!(v1, v2);
    let file = dir.path().join("v2.yaml");
    std::fs::write(&file, &v2).unwrap();
    let f = file.display().to_string();
    let e = env.clone();
    let out = tokio::task::spawn_blocking(move || {
        tasman(&e, &["topology", "apply", &f, "--dry-run"], &[], "")
    })
    .await
    .unwrap();
    let so = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        so.contains("~ link transit-0--transit-2: latency \"10ms\" -> \"40ms\""),
        "{so}"
    );
    assert!(so.contains("edge-2 llm-chat:"), "{so}");
    assert!(so.contains("dry run"), "{so}");
    assert_eq!(d.ctl.current().record.version, 1);

    // Apply (JSON output), then get returns the text byte for byte.
    let (e, f) = (env.clone(), file.display().to_string());
    let out = tokio::task::spawn_blocking(move || {
        tasman(
            &e,
            &["topology", "apply", &f, "-m", "slow ring", "-o", "json"],
            &[],
            "",
        )
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["version"], 2);
    assert!(
        !json["plan"]["impact"].as_array().unwrap().is_empty(),
        "{json}"
    );
    let e = env.clone();
    let out = tokio::task::spawn_blocking(move || tasman(&e, &["topology", "get"], &[], ""))
        .await
        .unwrap();
    assert_eq!(text(&out.stdout), v2);
    // The version it is, for the next apply's `--base-version`, on stderr (stdout is the file).
    assert!(
        text(&out.stderr).contains("version 2: apply your edit with --base-version 2"),
        "{}",
        text(&out.stderr)
    );

    // The same file again (a retry whose answer was lost): nothing applied, no version 3.
    let (e, f) = (env.clone(), file.display().to_string());
    let out = tokio::task::spawn_blocking(move || tasman(&e, &["topology", "apply", &f], &[], ""))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("unchanged: version 2 has this text already"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(d.ctl.current().record.version, 2);
    let (e, f) = (env.clone(), file.display().to_string());
    let out = tokio::task::spawn_blocking(move || {
        tasman(&e, &["topology", "apply", &f, "-o", "json"], &[], "")
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&json["unchanged"], &json["version"], &json["dry_run"]),
        (
            &serde_json::json!(true),
            &serde_json::Value::Null,
            &serde_json::json!(false)
        ),
        "{json}"
    );

    // Rollback to 1 creates version 3 with version 1's text.
    let e = env.clone();
    let out =
        tokio::task::spawn_blocking(move || tasman(&e, &["topology", "rollback", "1"], &[], ""))
            .await
            .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(d.ctl.current().record.version, 3);
    assert_eq!(d.ctl.current().record.text, v1);

    // Edit: the scripted editor first breaks the file (a link to an unknown node), then, seeing
    // the errors on top, fixes it and adds a comment. The plan is shown, "y" applies it.
    let script = dir.path().join("editor.sh");
    std::fs::write(
        &script,
        r##"#!/bin/sh
f="$1"
if grep -q '^# tasman-edit: ' "$f"; then
  grep '^# tasman-edit: ' "$f" > "$f.errors-seen"
  sed -i -e '/^# tasman-edit: /d' -e 's/edge-7/edge-2/' -e 's/latency: 10ms/latency: 12ms/' "$f"
  echo "# kept: raised ring latency for maintenance" >> "$f"
else
  sed -i 's/{a: edge-2, b: transit-2/{a: edge-7, b: transit-2/' "$f"
fi
"##,
    )
    .unwrap();
    let status = Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    assert!(status.success());
    let (e, s) = (env.clone(), script.display().to_string());
    let out = tokio::task::spawn_blocking(move || {
        tasman(&e, &["topology", "edit"], &[("EDITOR", s.as_str())], "y\n")
    })
    .await
    .unwrap();
    let so = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {so}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(so.contains("latency \"10ms\" -> \"12ms\""), "{so}");
    assert!(so.contains("applied: version 4"), "{so}");
    let cur = d.ctl.current().record.clone();
    assert_eq!(cur.version, 4);
    assert!(
        cur.text
            .contains("# kept: raised ring latency for maintenance")
    );
    assert!(
        cur.text.starts_with("# generated test fabric\n"),
        "the original comment survives"
    );
    assert!(!cur.text.contains("tasman-edit"));
    assert!(
        text(&out.stderr).contains("invalid; re-opening"),
        "{}",
        text(&out.stderr)
    );

    // Declining at the prompt applies nothing.
    let (e, s) = (env.clone(), script.display().to_string());
    let out = tokio::task::spawn_blocking(move || {
        tasman(&e, &["topology", "edit"], &[("EDITOR", s.as_str())], "n\n")
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    // Exit 1 for the refusal asked, not for an editor or request failure.
    let so = text(&out.stdout);
    assert!(so.contains("Apply this change? [y/N]"), "{so}");
    assert!(so.contains("not applied; your edit is kept in"), "{so}");
    assert_eq!(d.ctl.current().record.version, 4);
    // Kept in a directory of this user's only, made for this edit (a predictable, shared one
    // let another user of the host swap the text applied).
    let kept = so
        .lines()
        .find_map(|l| l.split("your edit is kept in ").nth(1))
        .map(std::path::PathBuf::from)
        .unwrap();
    assert!(kept.exists(), "{}", kept.display());
    let kept_dir = kept.parent().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(kept_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} has mode {mode:o}", kept_dir.display());
    }
    std::fs::remove_dir_all(kept_dir).unwrap();

    // History lists all four, newest first.
    let e = env.clone();
    let out = tokio::task::spawn_blocking(move || {
        tasman(&e, &["topology", "history", "-o", "json"], &[], "")
    })
    .await
    .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let versions: Vec<u64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![4, 3, 2, 1]);
    assert_eq!(rows[1]["origin"]["kind"], "rollback");
    assert_eq!(rows[2]["message"], "slow ring");
    assert_eq!(rows[2]["author"], "tester");
    // Each row's size and hash are its own text's (the rollback's are version 1's), read from
    // the versions' metadata.
    let sha256 = |t: &str| -> String {
        use sha2::{Digest, Sha256};
        Sha256::digest(t.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let texts = [&cur.text, &v1, &v2, &v1];
    let sizes: Vec<(u64, String)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["bytes"].as_u64().unwrap(),
                r["sha256"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let expected: Vec<(u64, String)> = texts.iter().map(|t| (t.len() as u64, sha256(t))).collect();
    assert_eq!(sizes, expected);
    assert_ne!(v1.len(), v2.len());
    // The table shows them too: size and the hash's first 12 digits.
    let e = env.clone();
    let out = tokio::task::spawn_blocking(move || tasman(&e, &["topology", "history"], &[], ""))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let row3 = table
        .lines()
        .find(|l| l.trim_start().starts_with("3 "))
        .unwrap_or_else(|| panic!("no row for version 3: {table}"));
    assert!(
        row3.contains(&format!(" {} ", v1.len())) && row3.contains(&sha256(&v1)[..12]),
        "{table}"
    );

    // A text in force topped by a whole header of edit's (a file kept after a refused round,
    // applied as it was): an edit that changes nothing is "no changes", the header kept. (It
    // was removed as edit's own: a plan and a prompt, and with a "y" a version without it.)
    let kept_header = format!(
        "# tasman-edit: invalid topology; fix and save, or save unchanged to give up\n\
         # tasman-edit: (these lines are removed before the topology is checked)\n{}",
        d.ctl.current().record.text
    );
    let f = dir.path().join("with-header.yaml");
    std::fs::write(&f, &kept_header).unwrap();
    let (e, f) = (env.clone(), f.display().to_string());
    let out = tokio::task::spawn_blocking(move || tasman(&e, &["topology", "apply", &f], &[], ""))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let version = d.ctl.current().record.version;
    assert_eq!(d.ctl.current().record.text, kept_header);
    let e = env.clone();
    let out = tokio::task::spawn_blocking(move || {
        tasman(&e, &["topology", "edit"], &[("EDITOR", "true")], "y\n")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("no changes"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(d.ctl.current().record.version, version);
    // An editor that fails before any edit (`EDITOR` misspelt) leaves nothing behind: the copy
    // held only the text in force (it was kept, and said to hold "your edit").
    let tmp = tempfile::tempdir().unwrap();
    let (e, t) = (env.clone(), tmp.path().display().to_string());
    let out = tokio::task::spawn_blocking(move || {
        tasman(
            &e,
            &["topology", "edit"],
            &[("EDITOR", "false"), ("TMPDIR", t.as_str())],
            "",
        )
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("kept in"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "left behind"
    );
    d.shutdown().await;
}

/// A message with a line break and an escape sequence, stored as given, is shown on its own
/// row of `topology history`, escaped: it cannot forge a row nor rewrite the reader's screen.
/// `--before` lists the next page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_cannot_forge_a_row_of_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = fabric_yaml(64, 1, 1, 10);
    let (d, env) = setup(dir.path(), &v1).await;
    let env = std::sync::Arc::new(env);
    let file = dir.path().join("v2.yaml");
    std::fs::write(&file, format!("{v1}# a comment\n")).unwrap();
    let f = file.display().to_string();
    let forged = "fix\n     42*  2026-01-01 00:00:00  alice  apply\u{1b}[2J";
    let run = |args: Vec<String>| {
        let e = env.clone();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                tasman(&e, &args, &[], "")
            })
            .await
            .unwrap();
            assert!(out.status.success(), "{}", text(&out.stderr));
            text(&out.stdout)
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    run(args(&["topology", "apply", &f, "-m", forged])).await;
    let table = run(args(&["topology", "history"])).await;
    // A header and the two versions.
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(
        !table.contains('\u{1b}') && !table.contains("\n     42*"),
        "{table}"
    );
    assert!(table.contains("fix\\n     42*"), "{table}");
    // The next page: the versions older than the oldest listed (here only version 1).
    let page = run(args(&[
        "topology", "history", "--before", "2", "-o", "json",
    ]))
    .await;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&page).unwrap();
    let versions: Vec<u64> = rows
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1]);
    d.shutdown().await;
}

/// The admin API is plain HTTP: an `--admin` address other than loopback is refused at start
/// (exit 2, nothing created), saying why and what to do, unless `--admin-insecure-remote` is
/// given; then the controller serves there. (Any address was taken, silently: the token that
/// changes the topology crossed the network in clear text.)
#[test]
fn a_remote_admin_address_needs_the_insecure_flag() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("t.yaml");
    std::fs::write(&yaml, fabric_yaml(63, 1, 1, 1)).unwrap();
    let state = dir.path().join("state");
    let controller = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tasman"));
        c.args(["controller", "--topology"])
            .arg(&yaml)
            .arg("--state")
            .arg(&state)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra);
        c
    };
    for admin in ["0.0.0.0:0", "[::]:0", "[::ffff:10.1.2.3]:7401"] {
        let mut child = controller(&["--admin", admin])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("the controller started with --admin {admin}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{admin}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("plain HTTP") && stderr.contains("--admin-insecure-remote"),
            "{stderr}"
        );
        assert!(!state.exists(), "the state directory was created");
    }
    // Accepted, it listens on every address: in a network namespace of the test's own, so that
    // nothing outside loopback is ever served.
    let Some(ns) = netns::NetNs::create(&format!("tasman-admin-{}", std::process::id())) else {
        netns::unavailable(
            "`ip netns add` failed: no network namespace can be made here",
            "root, network namespaces and ip",
        );
        return;
    };
    assert!(ns.run(&["ip", "link", "set", "lo", "up"]));
    let plain = controller(&["--admin", "0.0.0.0:0", "--admin-insecure-remote"]);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(plain.get_program())
        .args(plain.get_args())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let _ = std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    let _ = child.kill();
    let _ = child.wait();
    let admin = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admin="))
        .unwrap_or_else(|| panic!("the controller did not start: {line:?}"));
    assert!(admin.starts_with("0.0.0.0:"), "{line}");
}

/// `topology edit` asks in the terminal: `-o json` is refused (exit 2, saying what to use)
/// before it asks the controller anything, not ignored (a script reading JSON got a prompt).
#[test]
fn edit_refuses_json_output() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tasman"))
        .args([
            "topology",
            "edit",
            "-o",
            "json",
            "--controller",
            "127.0.0.1:1",
        ])
        .env("EDITOR", "false")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("is interactive and prints no JSON")
            && stderr.contains("--dry-run -o json"),
        "{stderr}"
    );
}

/// `apply` and `rollback` with `--base-version N` are refused (409, exit 1, nothing changed) once
/// someone else changed the topology after version N, and go ahead while N is in force; a dry
/// run says which version its plan was computed against and how to pin it. (Neither command
/// could send a base version: the one computed after your dry run overwrote a change made in
/// between.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_and_rollback_with_a_base_version_do_not_overwrite_a_change_made_since() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = fabric_yaml(95, 1, 1, 10);
    let (d, env) = setup(dir.path(), &v1).await;
    let env = std::sync::Arc::new(env);
    let file = |name: &str, text: &str| {
        let f = dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        f.display().to_string()
    };
    let (f2, f3) = (
        file(
            "v2.yaml",
            &format!(
                "{v1}# someone else's change
"
            ),
        ),
        file(
            "v3.yaml",
            &format!(
                "{v1}# my change
"
            ),
        ),
    );
    let run = |args: Vec<String>| {
        let e = env.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = tasman(&e, &args, &[], "");
            (out.status.code(), text(&out.stdout), text(&out.stderr))
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // My dry run, against version 1: it says how to apply exactly that plan (on this
    // controller, with this message).
    let (code, so, se) = run(args(&[
        "topology",
        "apply",
        &f3,
        "--dry-run",
        "-m",
        "my change",
    ]))
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{se}");
    assert!(
        so.contains(&format!(
            "to apply exactly this plan: tasman topology apply {f3} --controller {} \
             --message='my change' --base-version 1",
            env.admin
        )),
        "{so}"
    );
    // Someone else applies version 2 meanwhile.
    let (code, _, se) = run(args(&["topology", "apply", &f2])).await.unwrap();
    assert_eq!(code, Some(0), "{se}");
    assert_eq!(d.ctl.current().record.version, 2);

    // Pinned to version 1, my apply and a rollback are refused; version 2 stays.
    for refused in [
        args(&["topology", "apply", &f3, "--base-version", "1"]),
        args(&["topology", "apply", &f3, "--base-version", "1", "--dry-run"]),
        args(&["topology", "rollback", "1", "--base-version", "1"]),
    ] {
        let (code, so, se) = run(refused.clone()).await.unwrap();
        assert_eq!(code, Some(1), "{refused:?}: {so}{se}");
        assert!(
            se.contains("the topology changed since version 1 (now 2)"),
            "{refused:?}: {se}"
        );
    }
    // A base version that was never in force (a typo, 0) is named so, not as a change made
    // since it. (It read "the topology changed since version 99 (now 2)".)
    for never in ["99", "0"] {
        let (code, so, se) = run(args(&["topology", "apply", &f3, "--base-version", never]))
            .await
            .unwrap();
        assert_eq!(code, Some(1), "{so}{se}");
        assert!(
            se.contains(&format!(
                "the base version {never} was never in force (the version in force is 2)"
            )),
            "{se}"
        );
    }
    assert_eq!(d.ctl.current().record.version, 2);
    assert!(d.ctl.current().record.text.ends_with(
        "# someone else's change
"
    ));
    assert_eq!(d.ctl.history(100).unwrap().len(), 2);

    // Pinned to the version in force, they go ahead.
    let (code, so, se) = run(args(&["topology", "apply", &f3, "--base-version", "2"]))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{se}");
    assert!(so.contains("applied: version 3 (was 2)"), "{so}");
    // The same command again, as a retry whose first answer was lost: version 3 is my text, so
    // nothing is overwritten and nothing is applied (not a 409 that reads as someone else's
    // change).
    let (code, so, se) = run(args(&["topology", "apply", &f3, "--base-version", "2"]))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{so}{se}");
    assert!(
        so.contains("unchanged: version 3 has this text already"),
        "{so}"
    );
    assert_eq!(d.ctl.current().record.version, 3);
    let (code, so, se) = run(args(&["topology", "rollback", "1", "--dry-run"]))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{se}");
    assert!(
        so.contains(&format!(
            "to apply exactly this plan: tasman topology rollback 1 --controller {} \
             --base-version 3",
            env.admin
        )),
        "{so}"
    );
    let (code, so, se) = run(args(&["topology", "rollback", "1", "--base-version", "3"]))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{se}");
    assert!(so.contains("applied: version 4 (was 3)"), "{so}");
    assert_eq!(d.ctl.current().record.text, v1);
    // Retried, the rollback finds its text in force: unchanged, no version 5.
    let (code, so, se) = run(args(&["topology", "rollback", "1", "--base-version", "3"]))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{so}{se}");
    assert!(so.contains("unchanged: version 4"), "{so}");
    assert_eq!(d.ctl.current().record.version, 4);
    d.shutdown().await;
}

/// Bytes read from `s` until the server closes it or `limit` passes (None: still open).
async fn read_until_closed(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut got))
        .await
        .ok()
        .map(|_| got)
}

/// Serves the admin API of `d` on a port of its own within `limits`.
async fn serve_admin(
    d: &fabric::controller::daemon::Daemon,
    env: &Env,
    limits: fabric::admin::ServeLimits,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use fabric::admin::AdminState;
    use fabric::circuits::service::{CircuitService, DEFAULT_PROVISION_TIMEOUT};
    let circuits = CircuitService::new(d.ctl.clone(), DEFAULT_PROVISION_TIMEOUT).unwrap();
    let state = AdminState::new(d.ctl.clone(), &env.token, circuits);
    let listener = fabric::admin::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(fabric::admin::serve_with(listener, state, limits));
    (addr, server)
}

fn get_topology(env: &Env, connection: &str) -> String {
    format!(
        "GET /v1/topology HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: {connection}\r\n\r\n",
        env.token
    )
}

/// A client that sends part of its headers, or nothing, is cut off after the admin API's
/// header-read timeout, before any authentication (axum::serve kept such connections forever);
/// so is a kept-alive connection that stays idle after its request was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_cuts_off_clients_that_never_finish_their_headers() {
    use tokio::io::AsyncWriteExt;
    let limit = fabric::admin::DEFAULT_LIMITS.header_read_timeout;
    let dir = tempfile::tempdir().unwrap();
    let (d, env) = setup(dir.path(), &fabric_yaml(63, 1, 1, 10)).await;
    let started = std::time::Instant::now();
    let mut partial = tokio::net::TcpStream::connect(d.admin_addr).await.unwrap();
    partial
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(d.admin_addr).await.unwrap();
    let mut kept_alive = tokio::net::TcpStream::connect(d.admin_addr).await.unwrap();
    kept_alive
        .write_all(get_topology(&env, "keep-alive").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    for s in [&mut partial, &mut silent, &mut kept_alive] {
        got = read_until_closed(s, limit * 2)
            .await
            .unwrap_or_else(|| panic!("still open after {:?}", started.elapsed()));
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", text(&got));
    assert!(started.elapsed() >= limit - Duration::from_secs(1));
    d.shutdown().await;
}

/// At the connection cap, a new connection waits until one of the held ones ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_serves_at_most_its_connection_cap() {
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().unwrap();
    let (d, env) = setup(dir.path(), &fabric_yaml(64, 1, 1, 10)).await;
    let limits = fabric::admin::ServeLimits {
        header_read_timeout: Duration::from_secs(60),
        max_connections: 2,
        ..fabric::admin::DEFAULT_LIMITS
    };
    let (addr, server) = serve_admin(&d, &env, limits).await;

    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /v1/status HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    third
        .write_all(get_topology(&env, "close").as_bytes())
        .await
        .unwrap();
    if let Some(got) = read_until_closed(&mut third, Duration::from_millis(500)).await {
        panic!("served beyond the cap of 2: {}", text(&got));
    }
    drop(held.pop());
    let got = read_until_closed(&mut third, Duration::from_secs(10))
        .await
        .expect("served once a slot is free");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", text(&got));
    server.abort();
    d.shutdown().await;
}

/// One address holds at most its share of the connections: a third from an address holding
/// two is closed at once, and a client from another address is served. And a request without
/// the token is answered with the connection closed (kept alive, a client without the token held
/// its slot with a request every few seconds). (One address could take every slot, the
/// operators' commands waiting in the backlog until they timed out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_the_admin_apis_connections() {
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().unwrap();
    let (d, env) = setup(dir.path(), &fabric_yaml(66, 1, 1, 10)).await;
    let limits = fabric::admin::ServeLimits {
        header_read_timeout: Duration::from_secs(60),
        max_connections: 3,
        max_per_source: 2,
        ..fabric::admin::DEFAULT_LIMITS
    };
    let (addr, server) = serve_admin(&d, &env, limits).await;
    let from = |ip: &str| {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        async move {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind((ip, 0).into()).unwrap();
            s.connect(addr).await.unwrap()
        }
    };

    // Without the token: refused, and the connection closed after the answer. (From an address
    // of its own: its share may be given back a moment after the client saw the close.)
    let mut anonymous = from("127.0.0.3").await;
    anonymous
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut anonymous, Duration::from_secs(10))
        .await
        .expect("a refused client's connection stays open");
    assert!(got.starts_with(b"HTTP/1.1 401"), "{}", text(&got));

    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = from("127.0.0.1").await;
        s.write_all(b"GET /v1/status HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    // Both hold their share (accepted in order): a third from the same address is answered
    // 503 (the admin API's JSON error) and closed.
    let mut third = from("127.0.0.1").await;
    let got = read_until_closed(&mut third, Duration::from_secs(10))
        .await
        .expect("a third connection from one address was kept");
    let got = text(&got);
    assert!(
        got.starts_with("HTTP/1.1 503") && got.contains("too many connections from this address"),
        "{got}"
    );
    // Another address is served.
    let mut other = from("127.0.0.2").await;
    other
        .write_all(get_topology(&env, "close").as_bytes())
        .await
        .unwrap();
    let got = read_until_closed(&mut other, Duration::from_secs(10))
        .await
        .expect("a client of another address was not served");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", text(&got));
    drop(held);
    server.abort();
    d.shutdown().await;
}

/// A client that sends its headers and then stalls in its body is answered 408 once the
/// body-read timeout passes, and its connection closed: the slot serves the next client. Before,
/// the JSON extractor waited for the body forever, holding one of the 256 slots; only a client
/// with the token could, since one without it is refused before its body is read and cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_408_to_a_body_that_stops_arriving_and_frees_its_slot() {
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().unwrap();
    let (d, env) = setup(dir.path(), &fabric_yaml(65, 1, 1, 10)).await;
    let body_timeout = Duration::from_millis(500);
    let limits = fabric::admin::ServeLimits {
        body_read_timeout: body_timeout,
        max_connections: 1,
        ..fabric::admin::DEFAULT_LIMITS
    };
    let (addr, server) = serve_admin(&d, &env, limits).await;
    let stalled_apply = |auth: &str| {
        format!(
            "POST /v1/topology HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: 1000\r\n\r\n{{\"text\": \"nodes:"
        )
    };

    let mut unauthenticated = tokio::net::TcpStream::connect(addr).await.unwrap();
    unauthenticated
        .write_all(stalled_apply("").as_bytes())
        .await
        .unwrap();
    let got = read_until_closed(&mut unauthenticated, Duration::from_secs(10))
        .await
        .expect("an unauthenticated stalled body holds its connection");
    assert!(got.starts_with(b"HTTP/1.1 401"), "{}", text(&got));

    let started = std::time::Instant::now();
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = format!("Authorization: Bearer {}\r\n", env.token);
    stalled
        .write_all(stalled_apply(&auth).as_bytes())
        .await
        .unwrap();
    let got = read_until_closed(&mut stalled, Duration::from_secs(10))
        .await
        .expect("a stalled body holds its connection past the body-read timeout");
    assert!(got.starts_with(b"HTTP/1.1 408"), "{}", text(&got));
    assert!(started.elapsed() >= body_timeout);

    // The only slot is free again.
    let mut next = tokio::net::TcpStream::connect(addr).await.unwrap();
    next.write_all(get_topology(&env, "close").as_bytes())
        .await
        .unwrap();
    let got = read_until_closed(&mut next, Duration::from_secs(10))
        .await
        .expect("served once the stalled client is gone");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", text(&got));
    server.abort();
    d.shutdown().await;
}

/// `got`, a whole response, is `status` with an `application/json` body in the admin API's error
/// shape whose `error` says `says`.
#[track_caller]
fn assert_json_error(got: &[u8], status: u16, says: &str) {
    let all = text(got);
    let Some((head, body)) = all.split_once("\r\n\r\n") else {
        panic!("no whole response to expect {status}: {all}");
    };
    assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{all}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{all}"
    );
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {all}"));
    let error = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {all}"));
    assert!(error.contains(says), "{all}");
}

/// The refusals no handler makes are the admin API's JSON errors too (`{"error": ...}`,
/// `application/json`), so that clients read every error one way: the accept loop's 408 to a
/// client that sends its headers and never its body, and axum's 413 to a body over the limit,
/// 400 to one that is not JSON, 404 and 405 (plain text or empty before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_a_late_or_oversized_body_with_a_json_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let (d, env) = setup(dir.path(), &fabric_yaml(66, 1, 1, 10)).await;
    let limits = fabric::admin::ServeLimits {
        body_read_timeout: Duration::from_millis(500),
        ..fabric::admin::DEFAULT_LIMITS
    };
    let (addr, server) = serve_admin(&d, &env, limits).await;
    let apply = |len: usize| {
        format!(
            "POST /v1/topology HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
            env.token
        )
    };

    // Headers, then nothing.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    silent.write_all(apply(1000).as_bytes()).await.unwrap();
    let got = read_until_closed(&mut silent, Duration::from_secs(10))
        .await
        .expect("a body that never comes holds its connection past the body-read timeout");
    assert_json_error(&got, 408, "request body not received within");

    // A body over the limit, written while the answer is read, to the daemon's own listener
    // (its body-read timeout is 30 s; a loaded machine may take more than the 500 ms above to
    // send 32 MiB). The write half stays open (the task returns it): shut down once the body
    // was written, the connection was closed without an answer (hyper's server does not
    // support half-closed connections by default).
    let len = fabric::admin::MAX_BODY + 1;
    let (mut rx, mut tx) = tokio::net::TcpStream::connect(d.admin_addr)
        .await
        .unwrap()
        .into_split();
    let head = apply(len);
    let writer = tokio::spawn(async move {
        tx.write_all(head.as_bytes()).await?;
        let chunk = vec![b' '; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            tx.write_all(&chunk[..n]).await?;
            left -= n;
        }
        Ok::<_, std::io::Error>(tx)
    });
    let mut got = Vec::new();
    // It may end in a reset (the rest of the body arrived after the server stopped reading);
    // what came before it is in `got`.
    let _ = tokio::time::timeout(Duration::from_secs(30), rx.read_to_end(&mut got))
        .await
        .expect("an oversized body holds its connection");
    writer.abort();
    assert_json_error(&got, 413, "length limit exceeded");

    // Not JSON at all.
    let mut garbled = tokio::net::TcpStream::connect(d.admin_addr).await.unwrap();
    garbled
        .write_all(format!("{}nope!", apply(5)).as_bytes())
        .await
        .unwrap();
    let got = read_until_closed(&mut garbled, Duration::from_secs(10))
        .await
        .expect("answered");
    assert_json_error(&got, 400, "JSON");
    // No such route, no such method: JSON too.
    for (req, status, says) in [
        ("GET /v1/nope", 404, "not found"),
        ("DELETE /v1/topology", 405, "method not allowed"),
    ] {
        let mut s = tokio::net::TcpStream::connect(d.admin_addr).await.unwrap();
        let req = format!(
            "{req} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            env.token
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let got = read_until_closed(&mut s, Duration::from_secs(10))
            .await
            .expect("answered");
        assert_json_error(&got, status, says);
    }

    assert_eq!(d.ctl.current().record.version, 1, "nothing was applied");
    server.abort();
    d.shutdown().await;
}

/// A request body with a field the endpoint does not know is refused, naming the field, and
/// changes nothing: a misspelt `dry_run` is not a real apply, a misspelt `base_version` is not an
/// apply without `edit`'s guard, and a misspelt restriction of a circuit's B-end is not a
/// circuit placed without it. What the CLI sends is still accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misspelt_fields_of_admin_requests_are_refused_naming_them() {
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().unwrap();
    // A pool: a circuit could be made.
    let v1 = fabric_yaml(71, 1, 1, 10) + "pools:\n  - {name: vips, prefix: 127.79.0.0/28}\n";
    let (d, env) = setup(dir.path(), &v1).await;
    let v2 = v1.replace("latency: 2ms", "latency: 3ms");
    assert_ne!(v1, v2);
    let post = |path: &str, body: &serde_json::Value| {
        let body = body.to_string();
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            env.token,
            body.len()
        )
    };
    let refused = [
        (
            post(
                "/v1/topology",
                &serde_json::json!({ "text": v2, "dryrun": true }),
            ),
            "dryrun",
        ),
        (
            post(
                "/v1/topology",
                &serde_json::json!({ "text": v2, "base_versoin": 0 }),
            ),
            "base_versoin",
        ),
        (
            post(
                "/v1/topology/rollback",
                &serde_json::json!({ "version": 1, "dryrun": true }),
            ),
            "dryrun",
        ),
        (
            post(
                "/v1/circuits",
                &serde_json::json!({
                    "spec": {
                        "name": "c1",
                        "a_end": { "edge": "edge-0", "prefix": "10.1.0.0/24" },
                        "b_end": { "service": "llm-chat", "site": ["site-1"] },
                        "rate": "10Mbps",
                    },
                }),
            ),
            "site",
        ),
    ];
    for (req, field) in refused {
        let mut s = tokio::net::TcpStream::connect(d.admin_addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let got = read_until_closed(&mut s, Duration::from_secs(10))
            .await
            .expect("answered");
        assert_json_error(&got, 422, &format!("unknown field `{field}`"));
    }
    assert_eq!(d.ctl.current().record.version, 1, "nothing was applied");
    assert_eq!(d.ctl.history(100).unwrap().len(), 1);
    let circuits =
        fabric::store::read(&**d.ctl.store(), |tx| fabric::circuits::CIRCUITS.all(tx)).unwrap();
    assert!(circuits.is_empty(), "no circuit was made: {circuits:?}");

    // The CLI's requests (the same types, serialised) still pass.
    let file = dir.path().join("v2.yaml");
    std::fs::write(&file, &v2).unwrap();
    let f = file.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        tasman(&env, &["topology", "apply", &f, "--dry-run"], &[], "")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(d.ctl.current().record.version, 1, "a dry run");
    d.shutdown().await;
}

/// A traffic dial on a site that shares a service shows in `tasman status` as the expected
/// shares of first tries (site-0 at 50 % keeps half of its half, the rest goes to site-1), and
/// an apply that removes it plans the field change and the shares it moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_the_apply_plan_show_a_traffic_dial() {
    let dir = tempfile::tempdir().unwrap();
    // A 1 ms ring: each edge has its sites 3 and 4 ms away, within 2 ms, so they share it.
    let plain = fabric_yaml(70, 2, 2, 1);
    let site0 = format!("250.1:{}, capacity: 100}}", fabric_ports(70).backend);
    assert_eq!(plain.matches(&site0).count(), 1, "{plain}");
    let dialled = plain.replace(&site0, &site0.replace('}', ", dial: 50}"));
    let (d, env) = setup(dir.path(), &dialled).await;
    let env = std::sync::Arc::new(env);
    let e = env.clone();
    let (txt, json) = tokio::task::spawn_blocking(move || {
        (
            tasman(&e, &["status"], &[], ""),
            tasman(&e, &["status", "-o", "json"], &[], ""),
        )
    })
    .await
    .unwrap();
    assert!(txt.status.success(), "{}", text(&txt.stderr));
    let st: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    for edge in st["services"][0]["edges"].as_array().unwrap() {
        assert_eq!(edge["dialled"], true, "{edge}");
        let mut shares: Vec<(String, f64)> = edge["shares"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["site"].as_str().unwrap().to_string(),
                    s["share"].as_f64().unwrap(),
                )
            })
            .collect();
        shares.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            shares,
            [("site-0".to_string(), 0.25), ("site-1".to_string(), 0.75)],
            "{edge}"
        );
    }
    let so = text(&txt.stdout);
    assert!(so.contains("shared by weight and dial: "), "{so}");
    assert!(
        so.contains("site-0 25%") && so.contains("site-1 75%"),
        "{so}"
    );

    // Dry run of the file without the dial: the plan names the field and the shares it moves.
    let file = dir.path().join("plain.yaml");
    std::fs::write(&file, &plain).unwrap();
    let f = file.display().to_string();
    let e = env.clone();
    let out = tokio::task::spawn_blocking(move || {
        tasman(&e, &["topology", "apply", &f, "--dry-run"], &[], "")
    })
    .await
    .unwrap();
    let so = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        so.contains("~ node site-0: serves[llm-chat].dial 50 -> 100"),
        "{so}"
    );
    assert!(
        so.contains("llm-chat: shares change:") && so.contains("-> site-0 50% + site-1 50%"),
        "{so}"
    );
    d.shutdown().await;
}

/// A controller that accepts the connection and never answers (hung, or a wrong address that
/// accepts): every admin command gives up at `--request-timeout` (here from the environment)
/// with a clear error and exit 2, instead of waiting for ever.
#[test]
fn admin_commands_give_up_on_a_controller_that_never_answers() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let env = Env {
        admin: silent.local_addr().unwrap().to_string(),
        token: "t".into(),
    };
    // Holds every connection open without reading or answering.
    let _held = std::thread::spawn(move || silent.incoming().collect::<Vec<_>>());
    for args in [
        &["topology", "get"][..],
        &["status"],
        &["circuit", "list"],
        &["topology", "apply", "/dev/null", "--dry-run"],
    ] {
        let (tx, rx) = std::sync::mpsc::channel();
        let (env, owned): (Env, Vec<String>) =
            (env.clone(), args.iter().map(|a| a.to_string()).collect());
        std::thread::spawn(move || {
            let args: Vec<&str> = owned.iter().map(String::as_str).collect();
            let _ = tx.send(tasman(&env, &args, &[("TASMAN_REQUEST_TIMEOUT", "1s")], ""));
        });
        let out = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("`tasman {}` still waiting after 60 s", args.join(" ")));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("did not answer within 1s"), "{args:?}: {err}");
    }
}
