//! `tasman topology validate`, run as the real binary: exit status 0 valid (warnings on
//! stderr), 1 invalid (every diagnostic on stderr as FILE:LINE:COL), 2 unreadable.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn validate(files: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tasman"))
        .args(["topology", "validate"])
        .args(files)
        .output()
        .expect("run tasman")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn valid_example_exits_zero_with_a_summary() {
    let apac = repo("examples/apac.yaml");
    let out = validate(&[&apac]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("apac.yaml: valid: 21 nodes"), "{stdout}");
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn warnings_are_printed_but_do_not_fail() {
    let f = repo("topology/tests/warnings/unreachable_sites.yaml");
    let out = validate(&[&f]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:11:9: warning: edge node \"akl-edge-1\" cannot reach",
            f.display()
        )),
        "{stderr}"
    );
}

#[test]
fn invalid_file_exits_one_with_every_diagnostic_as_file_line_col() {
    let f = repo("topology/tests/invalid/unknown_link_nodes.yaml");
    let out = validate(&[&f]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let shown = f.display();
    for line in [
        format!(
            "{shown}:21:24: error: unknown node \"mel-site-3\" in link 2 (known: mel-site-1, mel-site-2)"
        ),
        format!(
            "{shown}:22:9: error: unknown node \"syd-site-1\" in link 3 (known: mel-site-1, mel-site-2)"
        ),
        format!(
            "{shown}:23:9: error: unknown node \"mel-site-9\" in link 4 (known: mel-site-1, mel-site-2)"
        ),
    ] {
        assert!(
            stderr.lines().any(|l| l == line),
            "missing {line:?} in:\n{stderr}"
        );
    }
    assert!(text(&out.stdout).contains("invalid: 3 errors, 1 warning"));
}

/// A document with more problems than are listed (the first 1,000, then a line counting the
/// rest) is summed up with its own numbers, not the list's. (The summary said "1001 errors":
/// the listed ones, and the line counting the others as one.)
#[test]
fn a_capped_list_is_summed_up_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("many.yaml");
    // 1,500 links naming unknown nodes: two errors each.
    let mut doc = String::from(
        "version: 1\nnodes:\n  - {id: e, kind: edge, region: r, country: AU, \
         location: {lat: 0, lon: 0}, address: \"127.0.0.1:7000\", client_address: \"127.0.0.1\"}\n\
         links:\n",
    );
    for i in 0..1500 {
        doc.push_str(&format!("  - {{a: x{i}, b: y{i}, latency: 1ms}}\n"));
    }
    std::fs::write(&f, doc).unwrap();
    let out = validate(&[&f]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let (listed, more) = stderr.lines().fold((0, None), |(n, more), l| {
        match l.split_once(" more problems not shown (") {
            Some((_, rest)) => (n, rest.split_once(" errors").map(|(e, _)| e.to_string())),
            None => (n + usize::from(l.contains(": error: ")), more),
        }
    });
    let more: usize = more
        .expect("a line counting the problems not listed")
        .parse()
        .unwrap();
    assert_eq!(listed, 1000, "{stderr}");
    let total = listed + more;
    assert!(total >= 3000, "{total}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("invalid: {total} errors, ")),
        "{stdout}"
    );
}

/// A valid document with more warnings than are listed is summed up with its own count too.
/// (It said "1001 warnings": the listed ones, and the line counting the others as one.)
#[test]
fn a_capped_list_of_warnings_is_summed_up_with_every_warning() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("many.yaml");
    // 1,200 sites that serve nothing: a warning each, and nothing else wrong.
    let mut doc = String::from(
        "version: 1\nnodes:\n  - {id: e, kind: edge, region: r, country: AU, \
         location: {lat: 0, lon: 0}, address: \"127.0.0.1:7000\", client_address: \"127.0.0.1\"}\n",
    );
    for i in 0..1200 {
        doc.push_str(&format!(
            "  - {{id: s{i}, kind: site, region: r, country: AU, location: {{lat: 0, lon: 0}}, \
             address: \"127.1.{}.{}:7000\"}}\n",
            i / 200,
            i % 200 + 1
        ));
    }
    std::fs::write(&f, doc).unwrap();
    let out = validate(&[&f, &f]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(" more problems not shown ("), "{stderr}");
    // Each file's list: its listed warnings, then the line counting the rest.
    let total = stderr.matches("serves no service").count() / 2
        + stderr
            .lines()
            .find_map(|l| l.split_once(" more problems not shown (0 errors, "))
            .and_then(|(_, rest)| rest.split_once(" warnings")?.0.parse::<usize>().ok())
            .expect("a line counting the warnings not listed");
    assert!(total >= 1200, "{total}: {stderr}");
    assert!(
        stdout.contains(&format!(", 0 pools ({total} warnings)\n")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "2 files checked: 2 valid, 0 invalid, 0 unreadable; 0 errors, {} warnings",
            2 * total
        )),
        "{stdout}"
    );
}

#[test]
fn unreadable_files_exit_two() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.yaml");
    let out = validate(&[&missing]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read"),
        "{}",
        text(&out.stderr)
    );

    let binary = dir.path().join("binary.yaml");
    std::fs::write(&binary, b"version: 1\nnodes: \xff\xfe\n").expect("write");
    let out = validate(&[&binary]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not UTF-8"),
        "{}",
        text(&out.stderr)
    );

    let huge = dir.path().join("huge.yaml");
    let f = std::fs::File::create(&huge).expect("create");
    f.set_len(topology::MAX_DOCUMENT_BYTES as u64 + 1)
        .expect("sparse file");
    let out = validate(&[&huge]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("over the size limit"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn several_files_unreadable_wins_over_invalid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let apac = repo("examples/apac.yaml");
    let bad = repo("topology/tests/invalid/self_and_duplicate_links.yaml");
    let out = validate(&[&apac, &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("2 files checked: 1 valid, 1 invalid, 0 unreadable"));
    let out = validate(&[&apac, &bad, &dir.path().join("nope.yaml")]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_shows_an_example() {
    let out = Command::new(env!("CARGO_BIN_EXE_tasman"))
        .args(["topology", "validate", "--help"])
        .output()
        .expect("run tasman");
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("tasman topology validate examples/apac.yaml"));
}

/// Output into a pipe whose reader has gone (`tasman topology validate ... | head -0`) ends the
/// command quietly, killed by SIGPIPE like any Unix filter; it panicked ("failed printing to
/// stdout: Broken pipe") with a backtrace on stderr and exit status 101.
#[cfg(unix)]
#[test]
fn a_closed_stdout_pipe_ends_it_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().expect("pipe");
    // Closed before the command starts: its first write finds no reader.
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_tasman"))
        .args(["topology", "validate"])
        .arg(repo("examples/apac.yaml"))
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run tasman");
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

/// The errors quoted in `tasman topology validate --help` and in the operator guide are what
/// validate prints for the files they describe (the help's said `(known: ...)` of nodes its
/// file could not have, the guide's a line of a comment).
#[test]
fn the_errors_the_help_and_the_guide_quote_are_what_validate_prints() {
    let dir = tempfile::tempdir().unwrap();
    let node = |id: &str, kind: &str, n: u8, extra: &str| {
        format!(
            "  - {{id: {id}, kind: {kind}, region: au-south, country: AU, location: {{lat: -37.8, lon: 145.0}}, address: \"127.10.0.{n}:7000\"{extra}}}\n"
        )
    };
    let broken = format!(
        "version: 1\nnodes:\n{}{}links:\n  - {{a: mel-edge-1, b: mel-site-9, latency: 1ms, capacity: 10Gbps}}\nservices:\n  - {{name: chat, port: 8443}}\n",
        node("mel-edge-1", "edge", 1, ", client_address: 127.20.0.1"),
        node(
            "mel-site-1",
            "site",
            2,
            ", serves: [{service: chat, backend: \"127.30.0.1:9001\", capacity: 64}]"
        ),
    );
    let apac = std::fs::read_to_string(repo("examples/apac.yaml")).unwrap();
    let edited = apac.replacen("b: mel-site-1, latency", "b: mel-site-9, latency", 1);
    assert_ne!(apac, edited);
    let help = Command::new(env!("CARGO_BIN_EXE_tasman"))
        .args(["topology", "validate", "--help"])
        .output()
        .unwrap();
    let guide = std::fs::read_to_string(repo("docs/operator-guide.md")).unwrap();
    for (name, body, quoted_in, quoted) in [
        ("broken.yaml", broken, "--help", text(&help.stdout)),
        ("apac.yaml", edited, "the operator guide", guide),
    ] {
        std::fs::write(dir.path().join(name), body).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tasman"))
            .current_dir(dir.path())
            .args(["topology", "validate", name])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        let err = text(&out.stderr);
        let line = err.lines().next().unwrap_or_default();
        assert!(line.contains("error: unknown node"), "{err}");
        assert!(quoted.contains(line), "{quoted_in} does not quote {line:?}");
    }
}
