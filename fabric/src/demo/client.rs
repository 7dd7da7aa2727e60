//! The demo's client: one completion request on a new TCP connection, timed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response the demo client reads.
const MAX_RESPONSE: usize = 1024 * 1024;

/// What one request saw.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The site that served it (`x-tasman-site`).
    pub site: String,
    /// From starting the TCP connect to the first response byte.
    pub ttfb: Duration,
    /// From starting the TCP connect to the end of the response.
    pub total: Duration,
    /// Tokens streamed.
    pub tokens: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected response: {0}")]
    Bad(String),
}

/// `GET /v1/completions?tokens=N` through `addr` on a new connection.
pub async fn complete(
    addr: SocketAddr,
    tokens: usize,
    timeout: Duration,
) -> Result<Reply, RequestError> {
    complete_paced(addr, tokens, None, timeout).await
}

/// [`complete`], with the backend streaming one token every `delay` (the backend's own pace when
/// `None`; at most 1 s).
pub async fn complete_paced(
    addr: SocketAddr,
    tokens: usize,
    delay: Option<Duration>,
    timeout: Duration,
) -> Result<Reply, RequestError> {
    let mut query = format!("tokens={tokens}");
    if let Some(d) = delay {
        query.push_str(&format!("&delay_ms={}", d.as_millis()));
    }
    tokio::time::timeout(timeout, complete_inner(addr, &query))
        .await
        .map_err(|_| RequestError::Timeout(timeout))?
}

async fn complete_inner(addr: SocketAddr, query: &str) -> Result<Reply, RequestError> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET /v1/completions?{query} HTTP/1.1\r\nhost: tasman-demo\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut ttfb = None;
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        ttfb.get_or_insert_with(|| start.elapsed());
        if buf.len() + n > MAX_RESPONSE {
            return Err(RequestError::Bad("response over 1 MiB".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let total = start.elapsed();
    let ttfb =
        ttfb.ok_or_else(|| RequestError::Bad("connection closed without a response".into()))?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200") {
        return Err(RequestError::Bad(status.to_string()));
    }
    let site = text
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-tasman-site")
                .then(|| v.trim().to_string())
        })
        .ok_or_else(|| RequestError::Bad("no x-tasman-site header".into()))?;
    if !text.contains("data: [DONE]") {
        return Err(RequestError::Bad("stream ended before [DONE]".into()));
    }
    Ok(Reply {
        site,
        ttfb,
        total,
        tokens: text.matches("\"token\"").count(),
    })
}
