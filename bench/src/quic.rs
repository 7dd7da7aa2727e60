//! The bare-quinn baselines: one bidirectional stream between two endpoints with the router's
//! mutual TLS, and no proxying around it; with the router's transport configuration (windows,
//! socket buffers, path MTU up to 6,500 bytes) or with quinn's defaults.
//!
//! And the minimal quinn proxy pair (`tasman-bench serve-quinn-proxy`, one process per side): an
//! entry that carries each client TCP connection on one bidirectional stream of its one QUIC
//! connection to an exit, which connects TCP to a fixed target. The same TLS and transport
//! configuration as the routers, and nothing else: no header, routing, metrics or health.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, Bytes, BytesMut};
use router::tls::{PeerNames, TlsIdentity};
use router::{pki, tls, transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 256 * 1024;

/// Which transport configuration the bare stream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// `router::transport`: the configuration every fabric connection uses.
    Fabric,
    /// `quinn::TransportConfig::default()`, `EndpointConfig::default()`, a plain UDP socket.
    QuinnDefaults,
}

fn endpoint(
    dir: &Path,
    name: &str,
    peers: &PeerNames,
    tuning: Tuning,
    addr: SocketAddr,
) -> anyhow::Result<quinn::Endpoint> {
    let id = TlsIdentity::load(dir, name)?;
    match tuning {
        Tuning::Fabric => {
            let server = tls::server_config(&id, peers, transport::shared_transport())?;
            let client = tls::client_config(&id, peers, transport::shared_transport())?;
            Ok(transport::endpoint(addr, server, client)?)
        }
        Tuning::QuinnDefaults => {
            let defaults = Arc::new(quinn::TransportConfig::default());
            let server = tls::server_config(&id, peers, defaults.clone())?;
            let client = tls::client_config(&id, peers, defaults)?;
            let mut ep = quinn::Endpoint::server(server, addr)?;
            ep.set_default_client_config(client);
            Ok(ep)
        }
    }
}

/// Two endpoints, `bench-a` and `bench-b`, with certificates from a fresh CA (kept in the
/// returned directory, which must outlive them).
fn pair(tuning: Tuning) -> anyhow::Result<(tempfile::TempDir, quinn::Endpoint, quinn::Endpoint)> {
    let dir = tempfile::tempdir()?;
    pki::init(dir.path())?;
    pki::issue(dir.path(), "bench-a")?;
    pki::issue(dir.path(), "bench-b")?;
    let peers = PeerNames::new(["bench-a".to_string(), "bench-b".to_string()]);
    let addr: SocketAddr = "127.0.0.1:0".parse()?;
    let a = endpoint(dir.path(), "bench-a", &peers, tuning, addr)?;
    let b = endpoint(dir.path(), "bench-b", &peers, tuning, addr)?;
    Ok((dir, a, b))
}

/// A bare quinn connection made and warmed for [`Warm::push`]: a first stream of [`WARM_UP`]
/// bytes grew its window and found its path MTU, as the routers' long-lived connections have.
pub struct Warm {
    _dir: tempfile::TempDir,
    conn: quinn::Connection,
    receiver: tokio::task::JoinHandle<anyhow::Result<()>>,
    buf: Bytes,
}

impl Warm {
    pub async fn new(tuning: Tuning) -> anyhow::Result<Warm> {
        let (dir, a, b) = pair(tuning)?;
        let b_addr = b.local_addr()?;
        let receiver = tokio::spawn(async move {
            let conn = b.accept().await.context("no incoming connection")?.await?;
            // Each stream: count its bytes, answer the count. Until the sender closes.
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let mut n = 0u64;
                while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                    n += chunk.bytes.len() as u64;
                }
                send.write_all(&n.to_be_bytes()).await?;
                send.finish()?;
            }
            Ok::<_, anyhow::Error>(())
        });
        let buf = Bytes::from(
            (0..CHUNK)
                .map(|i| (i * 31 % 251) as u8)
                .collect::<Vec<u8>>(),
        );
        let conn = a.connect(b_addr, "bench-b")?.await.context("handshake")?;
        let warm = Warm {
            _dir: dir,
            conn,
            receiver,
            buf,
        };
        warm.send_counted(WARM_UP).await?;
        Ok(warm)
    }

    /// Sends `bytes` over a new stream of the warm connection and waits for the receiver's count;
    /// returns the time from the stream's opening to the count. It hands quinn its bytes without
    /// copying them (`write_chunk` of one shared buffer), as the routers write each chunk they
    /// read. Closes the connection.
    pub async fn push(self, bytes: u64) -> anyhow::Result<Duration> {
        let start = Instant::now();
        self.send_counted(bytes).await?;
        let elapsed = start.elapsed();
        self.conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.receiver).await;
        Ok(elapsed)
    }

    async fn send_counted(&self, n: u64) -> anyhow::Result<()> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK as u64) as usize;
            send.write_chunk(self.buf.slice(..k)).await?;
            left -= k as u64;
        }
        send.finish()?;
        let mut count = [0u8; 8];
        recv.read_exact(&mut count).await?;
        let counted = u64::from_be_bytes(count);
        if counted != n {
            bail!("receiver counted {counted} bytes of {n}");
        }
        Ok(())
    }
}

/// The bytes of a [`Warm`] connection's first, untimed stream.
const WARM_UP: u64 = 64 << 20;

/// Round trips of `size` bytes on one bare quinn stream (echoed by a second endpoint in this
/// process); nanoseconds per round trip after 500 warm-up round trips.
pub async fn ping_pong(n: usize, size: usize, tuning: Tuning) -> anyhow::Result<Vec<u64>> {
    let (_dir, a, b) = pair(tuning)?;
    let b_addr = b.local_addr()?;
    let echo = tokio::spawn(async move {
        let conn = b.accept().await.context("no incoming connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            send.write_all(&chunk.bytes).await?;
        }
        send.finish()?;
        conn.closed().await;
        Ok::<_, anyhow::Error>(())
    });
    let conn = a.connect(b_addr, "bench-b")?.await.context("handshake")?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut out = Vec::with_capacity(n);
    for i in 0..n + crate::net::WARM_UP {
        let t = Instant::now();
        send.write_all(&msg).await?;
        recv.read_exact(&mut back).await?;
        if i >= crate::net::WARM_UP {
            out.push(t.elapsed().as_nanos() as u64);
        }
    }
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), echo).await;
    if back != msg {
        bail!("echo corrupted");
    }
    Ok(out)
}

/// The certificate names of the minimal quinn proxy pair's two sides.
pub const PROXY_ENTRY: &str = "qproxy-entry";
pub const PROXY_EXIT: &str = "qproxy-exit";

fn proxy_peers() -> PeerNames {
    PeerNames::new([PROXY_ENTRY.to_string(), PROXY_EXIT.to_string()])
}

/// A directory with a fresh CA and certificates for both sides of a minimal quinn proxy pair.
pub fn proxy_pki() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    pki::init(dir.path())?;
    pki::issue(dir.path(), PROXY_ENTRY)?;
    pki::issue(dir.path(), PROXY_EXIT)?;
    Ok(dir)
}

/// The entry of the minimal quinn proxy pair: one QUIC connection to the exit at `exit` (made
/// before it listens), then one bidirectional stream on it per TCP connection accepted on
/// `listen`. Prints `ready ADDR` (the TCP listener) and serves until killed.
pub async fn proxy_entry(
    tls_dir: &Path,
    listen: SocketAddr,
    exit: SocketAddr,
) -> anyhow::Result<()> {
    let ep = endpoint(
        tls_dir,
        PROXY_ENTRY,
        &proxy_peers(),
        Tuning::Fabric,
        SocketAddr::new(listen.ip(), 0),
    )?;
    let conn = ep
        .connect(exit, PROXY_EXIT)?
        .await
        .context("handshake with the exit")?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    println!("ready {}", listener.local_addr()?);
    loop {
        let tcp = crate::net::accept(&listener, "quinn proxy entry").await;
        let conn = conn.clone();
        tokio::spawn(async move {
            tcp.set_nodelay(true)?;
            // quinn announces a new stream with its first bytes: the client speaks first here
            // (bulk data, pings), as it does to a router (whose header goes first).
            let (send, recv) = conn.open_bi().await?;
            copy_both_ways(tcp, send, recv).await
        });
    }
}

/// The exit of the minimal quinn proxy pair: an endpoint on `listen` whose every incoming stream
/// is carried to a new TCP connection to `target`. Prints `ready ADDR` (the UDP endpoint) and
/// serves until killed.
pub async fn proxy_exit(
    tls_dir: &Path,
    listen: SocketAddr,
    target: SocketAddr,
) -> anyhow::Result<()> {
    let ep = endpoint(tls_dir, PROXY_EXIT, &proxy_peers(), Tuning::Fabric, listen)?;
    println!("ready {}", ep.local_addr()?);
    while let Some(incoming) = ep.accept().await {
        tokio::spawn(async move {
            let conn = incoming.await?;
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let tcp = TcpStream::connect(target).await?;
                    tcp.set_nodelay(true)?;
                    copy_both_ways(tcp, send, recv).await
                });
            }
            anyhow::Ok(())
        });
    }
    Ok(())
}

/// Bytes each side of the minimal quinn proxy pair reads from TCP into one block: the routers'
/// largest TCP read (`TCP_BUF_MAX` in router/src/splice.rs). A new block is taken when less than a
/// quarter of this is left in the current one. (With an 8 KiB buffer, a syscall and a quinn
/// write per 8 KiB, the pair used about a quarter more CPU per GiB in quick runs: not a floor.)
const PROXY_READ: usize = 256 * 1024;

/// Chunks taken from quinn per read on QUIC -> TCP, written with one vectored write (the routers'
/// `IOV` in router/src/splice.rs).
const PROXY_IOV: usize = 16;

/// Both ways between a TCP connection and a quinn stream, without copying the bytes, as the
/// routers do (router/src/splice.rs): TCP -> QUIC reads into a block and hands quinn the frozen
/// bytes (`write_chunk`, which keeps them instead of copying them into its send buffer); QUIC ->
/// TCP takes quinn's own chunks (`read_chunks`) and writes them with vectored writes. EOF on one
/// side becomes a half-close of the other (`finish`, TCP shutdown), and the other way keeps
/// flowing.
async fn copy_both_ways(
    tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let (mut rd, mut wr) = tcp.into_split();
    let tcp_to_quic = async {
        let mut block = BytesMut::new();
        loop {
            if block.capacity() - block.len() < PROXY_READ / 4 {
                block = BytesMut::with_capacity(PROXY_READ);
            }
            if rd.read_buf(&mut block).await? == 0 {
                break;
            }
            send.write_chunk(block.split().freeze()).await?;
        }
        send.finish()?;
        anyhow::Ok(())
    };
    let quic_to_tcp = async {
        let mut bufs: [Bytes; PROXY_IOV] = Default::default();
        while let Some(k) = recv.read_chunks(&mut bufs).await? {
            write_all_chunks(&mut wr, &mut bufs[..k]).await?;
        }
        wr.shutdown().await?;
        anyhow::Ok(())
    };
    tokio::try_join!(tcp_to_quic, quic_to_tcp)?;
    Ok(())
}

/// Writes `bufs` to `wr` in full with vectored writes (up to [`PROXY_IOV`] chunks each).
async fn write_all_chunks(wr: &mut OwnedWriteHalf, bufs: &mut [Bytes]) -> std::io::Result<()> {
    let mut first = 0;
    while first < bufs.len() {
        if bufs[first].is_empty() {
            first += 1;
            continue;
        }
        let io: [IoSlice<'_>; PROXY_IOV] =
            std::array::from_fn(|i| IoSlice::new(bufs.get(first + i).map_or(&[], |b| &b[..])));
        let k = (bufs.len() - first).min(PROXY_IOV);
        let mut written = wr.write_vectored(&io[..k]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 && first < bufs.len() {
            let n = bufs[first].len().min(written);
            bufs[first].advance(n);
            written -= n;
            if bufs[first].is_empty() {
                first += 1;
            }
        }
    }
    Ok(())
}
