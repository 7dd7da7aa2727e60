//! The bare-quinn baselines: one bidirectional stream between two endpoints with the router's
//! mutual TLS, and no proxying around it; with the router's transport configuration (windows,
//! socket buffers, path MTU up to 6,500 bytes) or with quinn's defaults.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use router::tls::{PeerNames, TlsIdentity};
use router::{pki, tls, transport};

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
) -> anyhow::Result<quinn::Endpoint> {
    let id = TlsIdentity::load(dir, name)?;
    let addr: SocketAddr = "127.0.0.1:0".parse()?;
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
    let a = endpoint(dir.path(), "bench-a", &peers, tuning)?;
    let b = endpoint(dir.path(), "bench-b", &peers, tuning)?;
    Ok((dir, a, b))
}

/// Sends `bytes` over one quinn stream and waits for the receiver's count; returns the time from
/// the start of the handshake to the count.
pub async fn push(bytes: u64, tuning: Tuning) -> anyhow::Result<Duration> {
    let (_dir, a, b) = pair(tuning)?;
    let b_addr = b.local_addr()?;
    let receiver = tokio::spawn(async move {
        let conn = b.accept().await.context("no incoming connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut n = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            n += chunk.bytes.len() as u64;
        }
        send.write_all(&n.to_be_bytes()).await?;
        send.finish()?;
        // Keep the connection until the sender has read the count.
        conn.closed().await;
        Ok::<_, anyhow::Error>(())
    });
    let buf: Vec<u8> = (0..CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let start = Instant::now();
    let conn = a.connect(b_addr, "bench-b")?.await.context("handshake")?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut left = bytes;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        send.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    send.finish()?;
    let mut count = [0u8; 8];
    recv.read_exact(&mut count).await?;
    let elapsed = start.elapsed();
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), receiver).await;
    if u64::from_be_bytes(count) != bytes {
        bail!(
            "receiver counted {} bytes of {bytes}",
            u64::from_be_bytes(count)
        );
    }
    Ok(elapsed)
}

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
