//! `tasman router` and `tasman controller` exit after SIGTERM while a blocking thread of theirs
//! is stuck on a file that never answers, as on a hung disk: the runtime is shut down with a
//! bound (5 s), not waited for until that thread returns. The stuck file is a FIFO that this test
//! holds open and never writes. Also what a router says when the controller is away and it has
//! no snapshot at all.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use common::{
    DEADLINE, LOCAL, Proc, controlled_router, eventually, fabric_controller, free_tcp_port,
    http_get, make_pki, spawn_controller, tasman, write_topology,
};

/// How long a process may take to exit after SIGTERM: its drain, and the 5 s bounds on the
/// snapshot stored at exit and on the runtime's shutdown, with room for a busy machine. A
/// process waiting for its stuck thread never exits.
const EXIT_GUARD: Duration = Duration::from_secs(60);

/// A FIFO at `path`, held open by this test at both ends and never written: a reader opens it at
/// once and then waits in its read for as long as this is held, as on a hung disk. (Dropped,
/// a waiting read returns end-of-file: drop it only once the reader has gone.)
struct HungFile {
    held: std::fs::File,
}

impl HungFile {
    fn at(path: &Path) -> HungFile {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path that outlives the call.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(
            rc,
            0,
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        // Read and write: on Linux such an open of a FIFO does not wait for the other end.
        let held = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        HungFile { held }
    }

    /// Whether process `pid` has the FIFO open: its read of it has begun, and cannot end while
    /// this is held (nothing is ever written).
    fn read_by(&self, pid: u32) -> bool {
        let fifo = self.held.metadata().unwrap();
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.flatten().any(|fd| {
            std::fs::metadata(fd.path())
                .is_ok_and(|m| m.dev() == fifo.dev() && m.ino() == fifo.ino())
        })
    }
}

/// Sends SIGTERM to `p` and waits up to [`EXIT_GUARD`] for it to exit; fails with `log()` if it
/// does not.
fn terminate(p: &mut Proc, log: impl Fn() -> String) -> ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill(SIGTERM) {}", p.name);
    let sent = Instant::now();
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            eprintln!("{} exited {:?} after SIGTERM", p.name, sent.elapsed());
            return status;
        }
        assert!(
            sent.elapsed() < EXIT_GUARD,
            "{} still running {EXIT_GUARD:?} after SIGTERM (held by its stuck thread?):\n{}",
            p.name,
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A router in controller mode whose stored snapshot never reads (its start goes on without it
/// after 5 s, leaving a blocking thread in the read) serves, and exits after SIGTERM. (It
/// drained, stored its snapshot, and then waited for ever for the stuck thread as its runtime
/// was dropped.)
#[test]
fn a_router_whose_stored_snapshot_never_reads_exits_after_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, ctl) = fabric_controller(dir.path(), "e1");

    let state = dir.path().join("e1-state");
    std::fs::create_dir(&state).unwrap();
    let stuck = HungFile::at(&state.join(router::control::disk::FILE_NAME));
    let metrics = std::net::SocketAddr::new(LOCAL, free_tcp_port(LOCAL));
    let log_path = dir.path().join("e1.log");
    let mut router = controlled_router(&ctl, "e1", &pki, &log_path, |cmd| {
        cmd.arg("--state-dir")
            .arg(&state)
            .args(["--metrics", &metrics.to_string()]);
    });
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Serving (its metrics endpoint is bound last), on the controller's snapshot: the stored
    // one was given up after 5 s.
    eventually(
        DEADLINE + Duration::from_secs(5),
        "the router to serve",
        || {
            if let Ok(Some(status)) = router.child.try_wait() {
                panic!("the router exited early ({status}):\n{}", log());
            }
            http_get(metrics, "/metrics").is_some()
        },
    );
    assert!(
        log().contains("the stored snapshot was not read in time"),
        "{}",
        log()
    );
    assert!(
        stuck.read_by(router.child.id()),
        "the router is not reading its stored snapshot: the disk was not stuck\n{}",
        log()
    );

    let status = terminate(&mut router, log);
    assert!(status.success(), "{status}:\n{}", log());
    drop(stuck);
}

/// A controller whose CA directory's revocation lists never read (its first look, at start,
/// leaves a blocking thread in the read) exits after SIGTERM. (Its runtime, dropped, waited
/// for ever for the stuck thread.)
#[test]
fn a_controller_whose_revocation_lists_never_read_exits_after_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let topo = write_topology(dir.path());
    // The CA directory apart from the controller's TLS directory, which the controller reads
    // (its own ca.crl.pem too) before it is up.
    let ca = dir.path().join("ca");
    make_pki(&ca, &["controller"]);
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    for f in ["ca.pem", "controller.pem", "controller.key"] {
        std::fs::copy(ca.join(f), tls.join(f)).unwrap();
    }
    let stuck = HungFile::at(&ca.join(router::pki::CA_CRL));
    let log_path = dir.path().join("controller.log");
    let mut ctl = spawn_controller(
        Command::new(tasman())
            .args(["controller", "--topology"])
            .arg(&topo)
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--tls-dir")
            .arg(&tls)
            .arg("--ca-dir")
            .arg(&ca)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log_path).unwrap()),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let pid = ctl.proc.child.id();
    eventually(
        DEADLINE,
        "the controller to read its revocation lists",
        || stuck.read_by(pid),
    );

    let status = terminate(&mut ctl.proc, log);
    assert!(status.success(), "{status}:\n{}", log());
    drop(stuck);
}

/// A router asked to stop while it starts (in controller mode, waiting for a first snapshot the
/// controller does not give it: it refuses this node) exits cleanly, status 0. (Its signal
/// handlers were installed only once it served: the SIGTERM killed it by the default action,
/// "signal: 15"; the controller had the same window during its start.)
#[test]
fn a_router_stopped_while_it_starts_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // `x9` has a certificate of the fabric's CA but is no node of the topology.
    let (pki, ctl) = fabric_controller(dir.path(), "x9");
    let log_path = dir.path().join("x9.log");
    let mut router = controlled_router(&ctl, "x9", &pki, &log_path, |_| {});
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Refused in its TLS handshake or after its hello, by one log line or the other.
    eventually(DEADLINE, "the controller to refuse the router", || {
        if let Ok(Some(status)) = router.child.try_wait() {
            panic!("the router exited early ({status}):\n{}", log());
        }
        let log = log();
        log.contains("controller refused this router") || log.contains("control connection:")
    });
    let status = terminate(&mut router, log);
    assert!(status.success(), "{status}:\n{}", log());
}

/// A controller asked to stop while its start is stuck on a file (here its admin token file,
/// a FIFO nobody writes; as on a hung mount under `--state`) exits, status 0, without waiting
/// for the file. (The start ran on the thread that polls the signals: the SIGTERM was caught
/// and not heard until the file answered.)
#[test]
fn a_controller_stopped_while_its_start_is_stuck_on_a_file_exits() {
    let dir = tempfile::tempdir().unwrap();
    let topo = write_topology(dir.path());
    let token = dir.path().join("admin-token");
    let stuck = HungFile::at(&token);
    let log_path = dir.path().join("controller.log");
    let mut cmd = Command::new(tasman());
    cmd.args(["controller", "--topology"])
        .arg(&topo)
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--admin-token-file")
        .arg(&token)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        // One runtime worker (as on one CPU): a start stuck on it leaves none to drive the
        // signals.
        .env("TOKIO_WORKER_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    common::die_with_parent(&mut cmd);
    let mut ctl = Proc {
        name: "controller".into(),
        child: cmd.spawn().expect("spawn tasman controller"),
    };
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let pid = ctl.child.id();
    eventually(DEADLINE, "the controller to read its admin token", || {
        if let Ok(Some(status)) = ctl.child.try_wait() {
            panic!("the controller exited early ({status}):\n{}", log());
        }
        stuck.read_by(pid)
    });

    let status = terminate(&mut ctl, log);
    assert!(status.success(), "{status}:\n{}", log());
    drop(stuck);
}

/// A router with no snapshot yet (none stored, its controller gone) says so past `--max-stale`,
/// not that it forwards on a last good snapshot. (It said "still forwarding on the last good
/// snapshot", with no data plane started.)
#[test]
fn a_router_with_no_snapshot_yet_does_not_claim_to_forward() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, mut ctl) = fabric_controller(dir.path(), "e1");
    // The controller gone: the router's start waits for it, on nothing.
    ctl.proc.child.kill().unwrap();
    ctl.proc.child.wait().unwrap();
    let log_path = dir.path().join("e1.log");
    let _router = controlled_router(&ctl, "e1", &pki, &log_path, |cmd| {
        cmd.args(["--max-stale", "6s"]);
    });
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    eventually(
        DEADLINE,
        "the router to say it has heard nothing for --max-stale",
        || log().contains("STALE SNAPSHOT"),
    );
    let log = log();
    assert!(
        log.contains("no snapshot in force yet: nothing is forwarded")
            && !log.contains("still forwarding"),
        "{log}"
    );
}
