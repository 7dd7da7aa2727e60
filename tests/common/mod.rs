//! Shared harness for the end-to-end tests: a temporary PKI, topology YAML with free loopback
//! ports, real `tasman router` processes (killed on drop), nginx, and `eventually`.
//!
//! ```ignore
//! let mut y = TopoYaml::default();
//! y.edge("e", free_udp(), LOCAL, None).site("s", free_udp(), &[("svc", backend, 100)]).link("e", "s", "1ms");
//! y.service("svc", free_tcp_port(LOCAL), &[]);
//! let mut f = Fabric::new(&y);
//! f.start_all();
//! f.wait_preferred("e", "svc", "s");
//! ```
#![allow(dead_code)]

pub mod netns;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The loopback address every test fabric lives on.
pub const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Generous bound for conditions that normally hold within milliseconds (CI is 2 busy cores).
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The `tasman` binary under test.
pub fn tasman() -> &'static str {
    env!("CARGO_BIN_EXE_tasman")
}

/// Free loopback ports that stay free until bound (outside the kernel's ephemeral range), and
/// `eventually` (polls a condition until a deadline).
#[allow(unused_imports)] // every test binary includes this module; not all of them need all
pub use testkit::{eventually, free_tcp_port, free_udp};

/// Raises RLIMIT_NOFILE to its hard limit (children inherit it), as the routers do.
pub fn raise_nofile() -> u64 {
    router::limits::raise_nofile().unwrap_or(0)
}

/// Whether the tests run as root (network namespaces, iptables).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Finds a system tool on PATH or in the sbin directories.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Topology YAML in the project's format, with every node on loopback.
#[derive(Default, Clone)]
pub struct TopoYaml {
    nodes: Vec<String>,
    links: Vec<String>,
    services: Vec<String>,
}

impl TopoYaml {
    fn node(&mut self, id: &str, kind: &str, quic: SocketAddr, extra: &str) -> &mut Self {
        let mut s = format!(
            "  - id: {id}\n    kind: {kind}\n    region: au-east\n    country: AU\n    location: {{lat: -33.9, lon: 151.2}}\n    address: \"{quic}\"\n"
        );
        s.push_str(extra);
        self.nodes.push(s);
        self
    }
    /// An edge at `quic` taking clients on `client_ip` (and on a transparent port, if given).
    pub fn edge(
        &mut self,
        id: &str,
        quic: SocketAddr,
        client_ip: IpAddr,
        transparent_port: Option<u16>,
    ) -> &mut Self {
        let mut extra = format!("    client_address: \"{client_ip}\"\n");
        if let Some(p) = transparent_port {
            let _ = writeln!(extra, "    transparent_port: {p}");
        }
        self.node(id, "edge", quic, &extra)
    }
    /// A transit with QUIC address `quic`.
    pub fn transit(&mut self, id: &str, quic: SocketAddr) -> &mut Self {
        self.node(id, "transit", quic, "")
    }
    /// `serves`: (service, backend, capacity), at the default weight.
    pub fn site(
        &mut self,
        id: &str,
        quic: SocketAddr,
        serves: &[(&str, SocketAddr, u32)],
    ) -> &mut Self {
        let weighted: Vec<_> = serves.iter().map(|&(s, b, c)| (s, b, c, None)).collect();
        self.site_weighted(id, quic, &weighted)
    }
    /// `serves`: (service, backend, capacity, weight if not the default).
    pub fn site_weighted(
        &mut self,
        id: &str,
        quic: SocketAddr,
        serves: &[(&str, SocketAddr, u32, Option<u32>)],
    ) -> &mut Self {
        let mut extra = String::from("    serves:\n");
        for (svc, backend, cap, weight) in serves {
            let weight = weight.map(|w| format!(", weight: {w}")).unwrap_or_default();
            let _ = writeln!(
                extra,
                "      - {{service: {svc}, backend: \"{backend}\", capacity: {cap}{weight}}}"
            );
        }
        self.node(id, "site", quic, &extra)
    }
    /// A 10 Gbit/s link between `a` and `b` with the declared `latency` (e.g. "1ms").
    pub fn link(&mut self, a: &str, b: &str, latency: &str) -> &mut Self {
        self.links.push(format!(
            "  - {{a: {a}, b: {b}, latency: {latency}, capacity: 10Gbps}}\n"
        ));
        self
    }
    /// `vips`: "PREFIX:PORT" strings, e.g. "198.18.0.10/32:80".
    pub fn service(&mut self, name: &str, port: u16, vips: &[&str]) -> &mut Self {
        let mut s = format!("  - name: {name}\n    port: {port}\n");
        if !vips.is_empty() {
            let list: Vec<String> = vips.iter().map(|v| format!("\"{v}\"")).collect();
            let _ = writeln!(s, "    vips: [{}]", list.join(", "));
        }
        self.services.push(s);
        self
    }
    /// Adds `field: value` to service `name` (added before with [`TopoYaml::service`]).
    pub fn service_field(&mut self, name: &str, field: &str, value: &str) -> &mut Self {
        let head = format!("  - name: {name}\n");
        let s = self
            .services
            .iter_mut()
            .find(|s| s.starts_with(&head))
            .unwrap_or_else(|| panic!("no service {name}"));
        let _ = writeln!(s, "    {field}: {value}");
        self
    }
    /// The topology file's text.
    pub fn render(&self) -> String {
        format!(
            "version: 1\nnodes:\n{}links:\n{}services:\n{}",
            self.nodes.concat(),
            self.links.concat(),
            self.services.concat()
        )
    }
}

/// The child gets SIGKILL if the test process dies without running destructors, and starts
/// with SIGHUP, SIGINT and SIGTERM at their default action whatever the test process came with
/// (ignored under `nohup`, or SIGINT in a shell's background job, which `tasman` keeps ignored
/// as asked: the tests that send them would wait in vain).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl and signal are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            for sig in [libc::SIGHUP, libc::SIGINT, libc::SIGTERM] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tasman pki init` and `tasman pki issue NAMES...` in `dir` (the real CLI).
pub fn make_pki(dir: &Path, names: &[&str]) {
    let ok = Command::new(tasman())
        .args(["pki", "init", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .status();
    assert!(ok.is_ok_and(|s| s.success()), "tasman pki init failed");
    let ok = Command::new(tasman())
        .args(["pki", "issue"])
        .args(names)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .status();
    assert!(ok.is_ok_and(|s| s.success()), "tasman pki issue failed");
}

/// A fabric of real router processes built from a [`TopoYaml`].
pub struct Fabric {
    pub tmp: tempfile::TempDir,
    pub yaml: PathBuf,
    pub pki: PathBuf,
    pub node_ids: Vec<String>,
    /// Prefix for every router command (e.g. `ip netns exec NS`).
    pub wrapper: Vec<String>,
    pub metrics: BTreeMap<String, SocketAddr>,
    /// A node's own `--tls-dir`, where it has one; the others read `pki`.
    pub tls_dirs: BTreeMap<String, PathBuf>,
    procs: BTreeMap<String, Proc>,
}

impl Fabric {
    /// Writes `y` (checked to load) and a PKI for its nodes to a temp dir; starts nothing.
    pub fn new(y: &TopoYaml) -> Fabric {
        let tmp = tempfile::tempdir().expect("tempdir");
        let yaml = tmp.path().join("topology.yaml");
        let text = y.render();
        std::fs::write(&yaml, &text).expect("write topology");
        let loaded = match topology::load(&text) {
            Ok(l) => l,
            Err(d) => panic!("test topology invalid: {d:?}\n{text}"),
        };
        let node_ids: Vec<String> = loaded
            .topology
            .nodes
            .iter()
            .map(|n| n.id.to_string())
            .collect();
        let pki = tmp.path().join("pki");
        let names: Vec<&str> = node_ids.iter().map(String::as_str).collect();
        make_pki(&pki, &names);
        Fabric {
            tmp,
            yaml,
            pki,
            node_ids,
            wrapper: Vec::new(),
            metrics: BTreeMap::new(),
            tls_dirs: BTreeMap::new(),
            procs: BTreeMap::new(),
        }
    }

    /// The `--tls-dir` of `node`'s router: its own if [`Fabric::own_tls_dir`] gave it one,
    /// else the fabric's PKI directory.
    pub fn tls_dir(&self, node: &str) -> &Path {
        self.tls_dirs.get(node).unwrap_or(&self.pki)
    }

    /// Gives `node` a TLS directory of its own (before it starts), holding copies of the PKI's
    /// `ca.pem` and the node's pair, as on a host of its own. Its path.
    pub fn own_tls_dir(&mut self, node: &str) -> PathBuf {
        let dir = self.tmp.path().join(format!("{node}-tls"));
        std::fs::create_dir_all(&dir).expect("tls dir");
        self.tls_dirs.insert(node.to_string(), dir.clone());
        for f in [
            "ca.pem".to_string(),
            format!("{node}.key"),
            format!("{node}.pem"),
        ] {
            self.copy_to(node, &f);
        }
        dir
    }

    /// Copies the PKI directory's file `name` into `node`'s own TLS directory, by rename (a
    /// router reading it meanwhile never sees half of it).
    pub fn copy_to(&self, node: &str, name: &str) {
        let dir = self
            .tls_dirs
            .get(node)
            .expect("no TLS directory of its own");
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::copy(self.pki.join(name), &tmp).expect("copy");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }

    /// Where the router of `node` logs.
    pub fn log_path(&self, node: &str) -> PathBuf {
        self.tmp.path().join(format!("{node}.log"))
    }

    /// Starts `tasman router` for `node` and waits until its metrics endpoint answers (which the
    /// router binds last, after its QUIC endpoint and listeners).
    pub fn start(&mut self, node: &str) {
        self.start_with(node, &[]);
    }

    /// [`Fabric::start`] with `extra` arguments for `tasman router`.
    pub fn start_with(&mut self, node: &str, extra: &[&str]) {
        let metrics = *self
            .metrics
            .entry(node.to_string())
            .or_insert_with(|| SocketAddr::new(LOCAL, free_tcp_port(LOCAL)));
        let log = std::fs::File::create(self.log_path(node)).expect("log file");
        let (prog, pre): (&str, Vec<&str>) = match self.wrapper.split_first() {
            Some((p, rest)) => (
                p.as_str(),
                rest.iter().map(String::as_str).chain([tasman()]).collect(),
            ),
            None => (tasman(), Vec::new()),
        };
        let mut cmd = Command::new(prog);
        die_with_parent(&mut cmd);
        let child = cmd
            .args(pre)
            .args(["router", "--node", node, "--topology"])
            .arg(&self.yaml)
            .arg("--tls-dir")
            .arg(self.tls_dir(node))
            .args(["--metrics", &metrics.to_string()])
            .args(extra)
            // Not the caller's RUST_LOG: tests read info-level lines of these logs.
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tasman router");
        self.procs.insert(
            node.to_string(),
            Proc {
                name: node.to_string(),
                child,
            },
        );
        let what = format!("router {node} metrics on {metrics}");
        eventually(DEADLINE, &what, || {
            if let Some(p) = self.procs.get_mut(node)
                && let Ok(Some(status)) = p.child.try_wait()
            {
                panic!("router {node} exited early ({status}):\n{}", self.log(node));
            }
            self.get(node, "/metrics").is_some()
        });
    }

    /// The process id of `node`'s running router.
    pub fn pid(&self, node: &str) -> u32 {
        self.procs
            .get(node)
            .unwrap_or_else(|| panic!("{node} is not running"))
            .child
            .id()
    }

    /// Starts every node's router, one after another.
    pub fn start_all(&mut self) {
        for n in self.node_ids.clone() {
            self.start(&n);
        }
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self, node: &str) {
        if let Some(mut p) = self.procs.remove(node) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the router of `node`.
    pub fn signal(&self, node: &str, sig: libc::c_int) {
        let p = self.procs.get(node).expect("no such router process");
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(p.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig}) {node}");
    }

    /// Whether the router of `node` is still running.
    pub fn running(&mut self, node: &str) -> bool {
        self.procs
            .get_mut(node)
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// Waits (up to `deadline`) for the router of `node` to exit, and reaps it.
    pub fn wait_exit(&mut self, node: &str, deadline: Duration) -> std::process::ExitStatus {
        let what = format!("router {node} to exit");
        let mut status = None;
        eventually(deadline, &what, || {
            let p = self.procs.get_mut(node).expect("no such router process");
            status = p.child.try_wait().ok().flatten();
            status.is_some()
        });
        self.procs.remove(node);
        status.expect("exited")
    }

    /// What the router of `node` has logged so far.
    pub fn log(&self, node: &str) -> String {
        std::fs::read_to_string(self.log_path(node)).unwrap_or_default()
    }

    /// HTTP/1.0 GET on a router's metrics endpoint.
    pub fn get(&self, node: &str, path: &str) -> Option<String> {
        self.fetch(node, path).ok()
    }

    /// [`Fabric::get`], saying why when there is no answer.
    pub fn fetch(&self, node: &str, path: &str) -> Result<String, String> {
        let addr = self
            .metrics
            .get(node)
            .ok_or_else(|| format!("{node} has no metrics address (never started)"))?;
        if let Some((prog, rest)) = self.wrapper.split_first() {
            // Inside a network namespace: ask curl in there.
            let out = Command::new(prog)
                .args(rest)
                .args(["curl", "-sS", "--fail", "--max-time", "5"])
                .arg(format!("http://{addr}{path}"))
                .output()
                .map_err(|e| format!("run curl: {e}"))?;
            return if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                Err(format!(
                    "curl http://{addr}{path}: {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            };
        }
        http_fetch(*addr, path)
    }

    /// The /metrics text of `node`'s router. A router that does not answer fails the test (with
    /// the error and its log): read as nothing, every "nothing counted" check would pass for a
    /// router that died. Retried for 10 s first: one slow answer on a loaded machine is no
    /// failure.
    pub fn metrics_text(&self, node: &str) -> String {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.fetch(node, "/metrics") {
                Ok(text) => return text,
                Err(e) if std::time::Instant::now() >= end => {
                    panic!(
                        "router {node}'s /metrics did not answer for 10 s: {e}\n{node} log:\n{}",
                        self.log(node)
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The `/telemetry` JSON of `node`'s router.
    pub fn telemetry(&self, node: &str) -> Option<serde_json::Value> {
        serde_json::from_str(&self.get(node, "/telemetry")?).ok()
    }

    /// The preferred site of `edge` for `service`, per its telemetry.
    pub fn preferred(&self, edge: &str, service: &str) -> Option<String> {
        self.telemetry(edge)?
            .get("preferred")?
            .get(service)?
            .as_str()
            .map(str::to_string)
    }

    /// Waits (up to [`DEADLINE`]) until `edge` prefers `site` for `service`.
    pub fn wait_preferred(&self, edge: &str, service: &str, site: &str) {
        let what = format!("{edge} to prefer {site} for {service}");
        eventually(DEADLINE, &what, || {
            self.preferred(edge, service).as_deref() == Some(site)
        });
    }

    /// A counter or gauge from `node`'s /metrics (sum over label sets matching `filter`). An
    /// unreachable router fails the test ([`Fabric::metrics_text`]).
    pub fn metric(&self, node: &str, name: &str, filter: &str) -> u64 {
        metric_sum(&self.metrics_text(node), name, filter)
    }
}

/// HTTP/1.0 GET of `path` on `addr` (a router's metrics endpoint): the body of an HTTP answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    http_fetch(addr, path).ok()
}

/// [`http_get`], saying why when there is no answer.
pub fn http_fetch(addr: SocketAddr, path: &str) -> Result<String, String> {
    let err = |what: &str, e: std::io::Error| format!("{what} {addr}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| err("connect to", e))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| err("set a read timeout on", e))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| err("write to", e))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| err("read from", e))?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") => Ok(body.to_string()),
        _ => Err(format!("GET {path} on {addr}: not an HTTP answer: {out:?}")),
    }
}

/// The sum of the samples of metric `name` in Prometheus text `text` whose labels contain
/// `filter` ("" for all).
pub fn metric_sum(text: &str, name: &str, filter: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(filter)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// nginx serving `root` on `addr`, in the foreground, with its own temp config.
pub struct Nginx {
    _proc: Proc,
    pub addr: SocketAddr,
}

impl Nginx {
    /// Panics when nginx is not installed (scripts/deps installs it) or does not start.
    pub fn start(dir: &Path, root: &Path, addr: SocketAddr, wrapper: &[String]) -> Nginx {
        let nginx = which("nginx").expect("nginx is not installed: run scripts/deps");
        let conf = dir.join("nginx.conf");
        let d = dir.display();
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nuser root root;\nworker_processes 1;\nerror_log {d}/nginx-error.log;\npid {d}/nginx.pid;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
                 server {{ listen {addr}; root {}; }}\n}}\n",
                root.display()
            ),
        )
        .expect("write nginx.conf");
        let (prog, pre): (String, Vec<String>) = match wrapper.split_first() {
            Some((p, rest)) => (
                p.clone(),
                rest.iter()
                    .cloned()
                    .chain([nginx.display().to_string()])
                    .collect(),
            ),
            None => (nginx.display().to_string(), Vec::new()),
        };
        let mut cmd = Command::new(prog);
        die_with_parent(&mut cmd);
        let child = cmd
            .args(pre)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn nginx ({}): {e}", nginx.display()));
        Nginx {
            _proc: Proc {
                name: "nginx".into(),
                child,
            },
            addr,
        }
    }
}

/// A TCP backend on loopback, a thread per connection: writes `greeting` (may be empty), echoes
/// until EOF, then half-closes.
pub fn echo_backend(greeting: &str) -> SocketAddr {
    echo_on(std::net::TcpListener::bind((LOCAL, 0)).unwrap(), greeting)
}

/// [`echo_backend`] on listener `l` (bound where the caller wants: in a network namespace, say).
pub fn echo_on(l: std::net::TcpListener, greeting: &str) -> SocketAddr {
    let addr = l.local_addr().unwrap();
    let greeting = greeting.to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let greeting = greeting.clone();
            std::thread::spawn(move || {
                let _ = s.write_all(greeting.as_bytes());
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// Deterministic pseudo-random bytes (xorshift), for payloads.
pub fn fill(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        let mut x = *seed;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *seed = x;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// A `tasman controller` process (killed and reaped on drop) and the addresses of its ready line.
pub struct ControllerProc {
    pub proc: Proc,
    pub quic: SocketAddr,
    pub admin: String,
}

/// Spawns `cmd` (a `tasman controller ...` command; its stdout is taken here) and waits for the
/// ready line (`controller listening quic=ADDR admin=ADDR`). Panics with the line, and the
/// process's stderr when the caller piped it, if the controller does not start.
pub fn spawn_controller(cmd: &mut Command) -> ControllerProc {
    use std::io::BufRead;
    cmd.stdout(Stdio::piped());
    die_with_parent(cmd);
    let mut child = cmd.spawn().expect("spawn tasman controller");
    // Read on a thread of its own, for at most the deadline: a start that hangs (a file it
    // waits on for ever) fails the test, where a blocking read hung the suite.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(DEADLINE) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            let out = child.wait_with_output().expect("controller output");
            panic!(
                "controller gave no ready line within {DEADLINE:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_string)
    };
    match (field("quic="), field("admin=")) {
        (Some(quic), Some(admin)) => ControllerProc {
            proc: Proc {
                name: "controller".into(),
                child,
            },
            quic: quic.parse().expect("quic address"),
            admin,
        },
        _ => {
            let _ = child.kill();
            let out = child.wait_with_output().expect("controller output");
            panic!(
                "controller did not start: {line:?} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Connects to the edge's service `port` and reads the backend's greeting line (trimmed).
pub fn greet(port: u16) -> std::io::Result<(BufReader<TcpStream>, String)> {
    let s = TcpStream::connect((LOCAL, port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    Ok((r, line.trim().to_string()))
}

/// Runs `tasman circuit ARGS` against the controller at `admin`, with the admin token in `state`,
/// as user "tester".
pub fn circuit_cli(admin: &str, state: &Path, args: &[&str]) -> Output {
    admin_command()
        .arg("circuit")
        .args(args)
        .args(["--controller", admin, "--token-file"])
        .arg(state.join("admin-token"))
        .env("USER", "tester")
        .output()
        .expect("run tasman circuit")
}

/// `tasman`, for a command to a test's controller: without the caller's `TASMAN_TOKEN` (which
/// wins over `--token-file`; `tasman demo --keep` prints an `export` of it), `TASMAN_AUTHOR`
/// (over `$USER`) and `TASMAN_REQUEST_TIMEOUT`.
pub fn admin_command() -> Command {
    let mut cmd = Command::new(tasman());
    for var in ["TASMAN_TOKEN", "TASMAN_AUTHOR", "TASMAN_REQUEST_TIMEOUT"] {
        cmd.env_remove(var);
    }
    cmd
}

/// The arguments of `tasman circuit create` for circuit `name`: `prefix` on edge e1 to service
/// llm at `rate`.
pub fn circuit_create_args<'a>(name: &'a str, prefix: &'a str, rate: &'a str) -> Vec<&'a str> {
    vec![
        "create",
        "--name",
        name,
        "--edge",
        "e1",
        "--prefix",
        prefix,
        "--service",
        "llm",
        "--rate",
        rate,
    ]
}

/// `tasman controller` of [`write_topology`]'s fabric, everything in `dir`: a PKI (returned)
/// with certificates for the controller and `router`, its state in `dir`/controller.
pub fn fabric_controller(dir: &Path, router: &str) -> (PathBuf, ControllerProc) {
    let topo = write_topology(dir);
    let pki = dir.join("pki");
    make_pki(&pki, &["controller", router]);
    let ctl = spawn_controller(
        Command::new(tasman())
            .args(["controller", "--topology"])
            .arg(&topo)
            .arg("--state")
            .arg(dir.join("controller"))
            .arg("--tls-dir")
            .arg(&pki)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .stderr(Stdio::null()),
    );
    (pki, ctl)
}

/// `tasman router` of `node` in controller mode (its certificate in `pki`), logging at info to
/// `log`, with the arguments `more` adds.
pub fn controlled_router(
    ctl: &ControllerProc,
    node: &str,
    pki: &Path,
    log: &Path,
    more: impl FnOnce(&mut Command),
) -> Proc {
    let mut cmd = Command::new(tasman());
    die_with_parent(&mut cmd);
    cmd.args([
        "router",
        "--controller",
        &ctl.quic.to_string(),
        "--node",
        node,
    ])
    .arg("--tls-dir")
    .arg(pki)
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(log).unwrap());
    more(&mut cmd);
    Proc {
        name: format!("router {node}"),
        child: cmd.spawn().unwrap(),
    }
}

/// Writes an edge and a site joined by a link, in `dir`; the file's path.
pub fn write_topology(dir: &Path) -> PathBuf {
    let mut y = TopoYaml::default();
    y.edge("e1", free_udp(LOCAL), LOCAL, None)
        .site("s1", free_udp(LOCAL), &[("svc", free_udp(LOCAL), 100)])
        .link("e1", "s1", "1ms")
        .service("svc", free_tcp_port(LOCAL), &[]);
    let topo = dir.join("topology.yaml");
    std::fs::write(&topo, y.render()).unwrap();
    topo
}
