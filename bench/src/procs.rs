//! Processes under test: routers (each in its own process, so that its memory can be measured and
//! it can be killed with SIGKILL), the minimal quinn proxy pair and HAProxy.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use topology::{NodeId, Topology};

use crate::proc_stat::{cpu_ms, rss_kib};

/// Routers of one benchmark fabric, one process each (`tasman-bench serve-router`).
pub struct ProcFabric {
    dir: tempfile::TempDir,
    topology_path: PathBuf,
    children: BTreeMap<String, Child>,
    /// Each router's metrics endpoint (`--metrics`), on its QUIC address's IP.
    metrics: BTreeMap<String, SocketAddr>,
    /// How many neighbours each router has (its links in the topology).
    neighbours: BTreeMap<String, usize>,
}

impl ProcFabric {
    /// Writes the topology and a PKI for every node; starts nothing yet.
    pub fn new(topology: &Topology) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        router::pki::init(dir.path())?;
        for n in &topology.nodes {
            router::pki::issue(dir.path(), n.id.as_str())?;
        }
        let topology_path = dir.path().join("topology.json");
        std::fs::write(&topology_path, serde_json::to_vec(topology)?)?;
        let mut metrics = BTreeMap::new();
        let mut neighbours = BTreeMap::new();
        for n in &topology.nodes {
            let ip = n.address.ip();
            metrics.insert(
                n.id.to_string(),
                SocketAddr::new(ip, crate::net::free_tcp_port(ip)?),
            );
            neighbours.insert(n.id.to_string(), topology.links_of(&n.id).count());
        }
        Ok(ProcFabric {
            dir,
            topology_path,
            children: BTreeMap::new(),
            metrics,
            neighbours,
        })
    }

    /// Starts `node` and returns once its listeners are bound.
    pub fn start(&mut self, node: &str) -> anyhow::Result<()> {
        self.start_with(node, &[])
    }

    /// [`ProcFabric::start`] with more `serve-router` arguments.
    pub fn start_with(&mut self, node: &str, extra: &[&str]) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?;
        let metrics = self.metrics.get(node).context("no such node")?;
        let mut child = Command::new(exe)
            .arg("serve-router")
            .arg("--topology")
            .arg(&self.topology_path)
            .arg("--node")
            .arg(node)
            .arg("--tls-dir")
            .arg(self.dir.path())
            .arg("--metrics")
            .arg(metrics.to_string())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn router process")?;
        let stdout = child.stdout.take().context("router stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("router {node} did not start: {line:?}");
        }
        self.children.insert(node.to_string(), child);
        Ok(())
    }

    /// SIGKILL: the process gets no chance to say goodbye to its neighbours.
    pub fn kill(&mut self, node: &str) -> anyhow::Result<()> {
        let mut child = self
            .children
            .remove(node)
            .context("no such router process")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// The process id of a running router.
    pub fn pid(&self, node: &str) -> anyhow::Result<u32> {
        Ok(self
            .children
            .get(node)
            .context("no such router process")?
            .id())
    }

    /// Waits until every running router reports each of its neighbours up (`tasman_neighbour_up`
    /// on its metrics endpoint): every neighbour connection, in both directions, is made and
    /// answers probes.
    pub async fn wait_neighbours_up(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut waiting = Vec::new();
            for node in self.children.keys() {
                let (Some(addr), Some(want)) = (self.metrics.get(node), self.neighbours.get(node))
                else {
                    bail!("no metrics endpoint for {node}");
                };
                let up = match crate::net::http_get(*addr, "/metrics").await {
                    Ok(text) => neighbours_up(&text),
                    Err(_) => 0,
                };
                if up < *want {
                    waiting.push(format!("{node} ({up} of {want} up)"));
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "neighbours not all up within {timeout:?}: {}",
                    waiting.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resident memory of a router process, in KiB.
    pub fn rss_kib(&self, node: &str) -> anyhow::Result<u64> {
        let child = self.children.get(node).context("no such router process")?;
        rss_kib(child.id())
    }
}

impl Drop for ProcFabric {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.children) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How many `tasman_neighbour_up` series of a router's /metrics text are 1.
fn neighbours_up(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| l.starts_with("tasman_neighbour_up{"))
        .filter(|l| l.rsplit(' ').next() == Some("1"))
        .count()
}

/// The machine's count of UDP datagrams dropped because a socket's receive buffer was full
/// (`RcvbufErrors` in /proc/net/snmp); 0 if unreadable.
pub fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time of all of `pids` together, in ms.
pub fn cpu_ms_of(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|p| cpu_ms(*p)).sum()
}

/// Spinning threads of a router started with `--keep-awake` (as `tasman router`'s default
/// `--keep-awake-threads`).
pub const KEEP_AWAKE_THREADS: usize = 1;

/// The body of `tasman-bench serve-router`: one router in this process until killed.
pub async fn serve_router(
    topology: PathBuf,
    node: String,
    tls_dir: PathBuf,
    metrics: Option<SocketAddr>,
    keep_awake: Option<Duration>,
) -> anyhow::Result<()> {
    // Router logs only when asked (e.g. TASMAN_BENCH_LOG=router=debug): logging costs time.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("TASMAN_BENCH_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let topo: Topology = serde_json::from_slice(&std::fs::read(&topology)?)?;
    let snapshot = Arc::new(router::Snapshot::new(1, Arc::new(topo)));
    let (_tx, rx) = tokio::sync::watch::channel(snapshot);
    let tls = router::tls::TlsIdentity::load(&tls_dir, &node)?;
    let mut cfg = router::RouterConfig::new(NodeId::new(&node), tls, rx);
    cfg.metrics_addr = metrics;
    // The bench's clients all come from 127.0.0.1, one address standing for many users: its
    // 10,000-connection run must not meet the per-source cap (a quarter of the overall cap,
    // below 10,000 where the open-file limit could not be raised past about 40,000).
    cfg.max_client_connections_per_source = router::SourceCap::Off;
    cfg.keep_awake = keep_awake.map(|window| router::keep_awake::Config {
        window,
        threads: KEEP_AWAKE_THREADS,
    });
    let _handle = router::Router::spawn(cfg).await?;
    println!("ready");
    std::future::pending::<()>().await;
    Ok(())
}

/// Starts `tasman-bench ARGS` and waits for its `ready ADDR` line.
fn spawn_ready(args: &[&OsStr], what: &str) -> anyhow::Result<(Child, SocketAddr)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn {what} process"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|a| a.parse().ok());
    match addr {
        Some(addr) => Ok((child, addr)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} process did not start: {line:?}")
        }
    }
}

/// An echo server in a child process (`tasman-bench serve-echo`).
pub struct EchoProc {
    child: Child,
    addr: SocketAddr,
}

impl EchoProc {
    pub fn start(listen: SocketAddr) -> anyhow::Result<Self> {
        let listen = listen.to_string();
        let (child, addr) = spawn_ready(
            &["serve-echo".as_ref(), "--listen".as_ref(), listen.as_ref()],
            "echo",
        )?;
        Ok(EchoProc { child, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EchoProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The minimal quinn proxy pair to `target`: an entry and an exit process
/// (`tasman-bench serve-quinn-proxy`, the routers' runtime), one QUIC connection between them.
pub struct QuinnProxyPair {
    /// Entry first: dropped (killed) before the exit.
    children: Vec<Child>,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl QuinnProxyPair {
    /// Both sides bind on `ip` (the entry's TCP listener, both UDP endpoints); returns once the
    /// entry's QUIC connection to the exit is up and it listens.
    pub fn start(ip: IpAddr, target: SocketAddr) -> anyhow::Result<Self> {
        let dir = crate::quic::proxy_pki()?;
        let listen = SocketAddr::new(ip, 0).to_string();
        let side = |role: &str, target: SocketAddr| {
            let target = target.to_string();
            spawn_ready(
                &[
                    "serve-quinn-proxy".as_ref(),
                    "--role".as_ref(),
                    role.as_ref(),
                    "--tls-dir".as_ref(),
                    dir.path().as_os_str(),
                    "--listen".as_ref(),
                    listen.as_ref(),
                    "--target".as_ref(),
                    target.as_ref(),
                ],
                &format!("quinn proxy {role}"),
            )
        };
        let (mut exit, exit_addr) = side("exit", target)?;
        let (entry, addr) = match side("entry", exit_addr) {
            Ok(e) => e,
            Err(e) => {
                let _ = exit.kill();
                let _ = exit.wait();
                return Err(e);
            }
        };
        Ok(QuinnProxyPair {
            children: vec![entry, exit],
            addr,
            _dir: dir,
        })
    }

    /// The entry's TCP listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Entry and exit.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for QuinnProxyPair {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Connections HAProxy can hold under a 20,000 open-file limit (two descriptors each).
pub const HAPROXY_MAX_CONNS: usize = 9_000;

/// HAProxy in `mode tcp` from `listen` to `target`, with two threads (`nbthread 2`; left out,
/// HAProxy runs one per CPU, and the report's "2-thread" would hold only on a 2-core machine).
pub struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    pub fn start(listen: SocketAddr, target: SocketAddr) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 9500\n  nbthread 2\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
                 listen bench\n  bind {listen}\n  server s1 {target}\n"
            ),
        )?;
        let mut child = Command::new(Self::bin())
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn haproxy (install it with scripts/deps --bench)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(listen).is_err() {
            if Instant::now() > deadline {
                // Not left running behind the failed run.
                let _ = child.kill();
                let _ = child.wait();
                bail!("haproxy did not listen on {listen}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Haproxy { child, _dir: dir })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The HAProxy binary: in the sbin directories a user's `PATH` may lack, else on `PATH`.
    /// The run and its version read the same one.
    fn bin() -> &'static str {
        ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy", "haproxy"]
            .into_iter()
            .find(|p| !p.starts_with('/') || std::path::Path::new(p).exists())
            .unwrap_or("haproxy")
    }

    pub fn version() -> String {
        Command::new(Self::bin())
            .arg("-v")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_else(|| "haproxy (version unknown)".into())
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spinning threads in a process of its own under `SCHED_IDLE` (`chrt --idle 0`): one per core
/// ([`Spinner::per_core`]) and the cores never go idle, yet the spinner runs only when nothing
/// else wants a core, so it takes (almost) no CPU from the processes under test. What it changes
/// is the cost of a wake-up: on this VM a process woken on an idle vCPU first waits for the vCPU
/// to leave its halt (a trip through the hypervisor); on a busy one it preempts the spinner at
/// once. It stands for a host whose cores are kept busy by other work, as a loaded production
/// router's are. With as many threads as `--keep-awake` routers run ([`Spinner::start`]), it is
/// the condition those routers put every process of the host in.
pub struct Spinner {
    child: Child,
}

impl Spinner {
    /// One thread per core.
    pub fn per_core() -> anyhow::Result<Self> {
        Self::start(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    /// `threads` threads; returns once the process has been spinning for a clock tick.
    pub fn start(threads: usize) -> anyhow::Result<Self> {
        let child = Command::new("chrt")
            .arg("--idle")
            .arg("0")
            .arg(std::env::current_exe()?)
            .args(["spin", "--threads", &threads.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the idle-priority spinner (chrt, from util-linux)")?;
        let spinner = Spinner { child };
        let deadline = Instant::now() + Duration::from_secs(2);
        while cpu_ms(spinner.child.id()).unwrap_or(0) == 0 {
            if Instant::now() > deadline {
                bail!("the idle-priority spinner did not start spinning within 2 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(spinner)
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The spinner's body: `threads` threads that never sleep.
pub fn spin(threads: usize) -> ! {
    for _ in 1..threads.max(1) {
        std::thread::spawn(|| {
            loop {
                std::hint::spin_loop();
            }
        });
    }
    loop {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_neighbours_reported_up_count() {
        let text = "# HELP tasman_neighbour_up Neighbour state (1 up).\n\
                    # TYPE tasman_neighbour_up gauge\n\
                    tasman_neighbour_up{node=\"s1\",neighbour=\"e1\"} 1\n\
                    tasman_neighbour_up{node=\"s1\",neighbour=\"t1\"} 0\n\
                    tasman_neighbour_up_total{node=\"s1\"} 1\n\
                    tasman_neighbour_rtt_seconds{node=\"s1\",neighbour=\"e1\"} 0.0001\n";
        assert_eq!(neighbours_up(text), 1);
    }
}
