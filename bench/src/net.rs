//! TCP servers and clients the benchmarks drive: a byte-counting sink, an echo server, a bulk
//! sender, a ping-pong client and a connection holder.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 256 * 1024;

/// The next connection on `listener`. An accept error (EMFILE when the 10,000-connection run
/// meets the open-file limit, say) is logged and accepting goes on after a short pause: a server
/// that stopped at the first error would leave the run to fail later, and misleadingly, with "no
/// echo within 30 s".
pub async fn accept(listener: &TcpListener, what: &str) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((s, _)) => return s,
            Err(e) => {
                eprintln!("{what} server: accept: {e} (accepting again in 50 ms)");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Accepts connections; each is read to EOF, then the byte count goes back (8 bytes, big endian).
pub async fn count_sink(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind sink {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let mut s = accept(&listener, "sink").await;
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(local)
}

/// Accepts connections and echoes every byte back until EOF.
pub async fn echo_server(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind echo {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let s = accept(&listener, "echo").await;
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut buf = vec![0u8; 4096];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            if w.write_all(&buf[..k]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(local)
}

/// Sends `bytes` on one connection, half-closes, and waits for the sink's count. Returns the time
/// from connect to the count (every byte delivered).
pub async fn push(addr: SocketAddr, bytes: u64) -> anyhow::Result<Duration> {
    let buf: Vec<u8> = (0..CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let start = Instant::now();
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let mut left = bytes;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..k]).await.context("write")?;
        left -= k as u64;
    }
    s.shutdown().await.context("half-close")?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)
        .await
        .context("read the sink's count")?;
    let elapsed = start.elapsed();
    let got = u64::from_be_bytes(count);
    if got != bytes {
        bail!("sink counted {got} bytes of {bytes}");
    }
    Ok(elapsed)
}

/// Round trips each latency connection makes before it starts timing.
pub const WARM_UP: usize = 500;

/// `n` request/response round trips of `size` bytes on one connection (after a warm-up).
/// Returns each round trip's time in nanoseconds.
pub async fn ping_pong(addr: SocketAddr, n: usize, size: usize) -> anyhow::Result<Vec<u64>> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut out = Vec::with_capacity(n);
    for i in 0..n + WARM_UP {
        let t = Instant::now();
        s.write_all(&msg).await.context("write")?;
        s.read_exact(&mut back).await.context("read echo")?;
        if i >= WARM_UP {
            out.push(t.elapsed().as_nanos() as u64);
        }
    }
    if back != msg {
        bail!("echo corrupted");
    }
    Ok(out)
}

/// Opens `n` connections to an echo service, each proven end to end by one echoed byte, and
/// returns them open.
pub async fn hold(addr: SocketAddr, n: usize, parallel: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut held = Vec::with_capacity(n);
    let mut set = tokio::task::JoinSet::new();
    let mut started = 0;
    while held.len() < n {
        while started < n && set.len() < parallel {
            started += 1;
            set.spawn(async move {
                let mut s = TcpStream::connect(addr).await?;
                s.write_all(b"x").await?;
                let mut b = [0u8; 1];
                tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut b))
                    .await
                    .map_err(|_| std::io::Error::other("no echo within 30 s"))??;
                Ok::<_, std::io::Error>(s)
            });
        }
        match set.join_next().await {
            Some(Ok(Ok(s))) => held.push(s),
            Some(Ok(Err(e))) => bail!("connection {} of {n}: {e}", held.len() + 1),
            Some(Err(e)) => bail!("task: {e}"),
            None => break,
        }
    }
    Ok(held)
}

/// One HTTP/1.1 GET with `Connection: close` to a demo backend; returns its `x-tasman-site`
/// header once the whole response arrived.
pub async fn which_site(addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(b"GET /v1/completions?tokens=1&delay_ms=0 HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
            .await?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await?;
        Ok::<_, std::io::Error>(resp)
    };
    let resp = tokio::time::timeout(timeout, fut)
        .await
        .context("timed out")??;
    let text = String::from_utf8_lossy(&resp);
    if !text.starts_with("HTTP/1.1 200") {
        bail!(
            "unexpected response: {:?}",
            text.lines().next().unwrap_or("")
        );
    }
    text.lines()
        .find_map(|l| l.strip_prefix("x-tasman-site: "))
        .map(|s| s.trim().to_string())
        .context("no x-tasman-site header")
}

/// The body of one HTTP/1.1 GET of `path` with `Connection: close` (a router's metrics endpoint);
/// an error unless the answer is a 200 within 2 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await?;
        Ok::<_, std::io::Error>(resp)
    };
    let resp = tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .context("timed out")??;
    let text = String::from_utf8_lossy(&resp);
    if !text.starts_with("HTTP/1.1 200") {
        bail!(
            "GET {path} from {addr}: {:?}",
            text.lines().next().unwrap_or("")
        );
    }
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(body.to_string())
}

/// Percentile of sorted nanoseconds, in microseconds.
pub fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

/// A free TCP port on `ip` (bound and released; the benchmark runs alone, so it stays free).
pub fn free_tcp_port(ip: std::net::IpAddr) -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// A free UDP port on `ip`.
pub fn free_udp_port(ip: std::net::IpAddr) -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind((ip, 0))?.local_addr()?.port())
}
