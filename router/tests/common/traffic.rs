//! Bulk TCP traffic for the circuit tests, in process (`router/tests/circuits.rs`) and end to end
//! (`tests/circuits_e2e.rs`, which includes this file by path): a backend that records when bytes
//! arrived, clients bound to chosen source addresses, tagged transfers and their steady rate.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Per connection that carried data: its tag (first byte), and (time, bytes so far) samples.
pub type Received = Arc<Mutex<Vec<(u8, Vec<(Instant, u64)>)>>>;

/// A backend that reads everything and records, per connection with data, when bytes arrived.
pub async fn sink_backend() -> (SocketAddr, Received) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let got: Received = Arc::default();
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let g = g.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let (mut total, mut tag, mut samples) = (0u64, 0u8, Vec::new());
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if total == 0 {
                        tag = buf[0];
                    }
                    total += n as u64;
                    samples.push((Instant::now(), total));
                }
                // Health checks connect and close without data: not transfers.
                if total > 0 {
                    g.lock().unwrap().push((tag, samples));
                }
            });
        }
    });
    (addr, got)
}

/// Steady-state rate in Mbit/s of the transfer tagged `tag` in `got`: bytes after its first
/// 500 ms, over the time from then to its last byte (which must be at least 5 s).
pub fn steady_mbps(got: &[(u8, Vec<(Instant, u64)>)], tag: u8) -> f64 {
    let (_, samples) = got
        .iter()
        .find(|(t, _)| *t == tag)
        .expect("tagged transfer");
    let t0 = samples[0].0 + Duration::from_millis(500);
    let start = samples.iter().find(|(t, _)| *t >= t0).expect("long enough");
    let (t_end, end) = *samples.last().unwrap();
    let d = t_end - start.0;
    assert!(d >= Duration::from_secs(5), "measured over {d:?} only");
    (end - start.1) as f64 * 8.0 / d.as_secs_f64() / 1e6
}

/// A TCP connection to `to` from source address `src` (any port).
pub async fn connect_from(src: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src.into(), 0))?;
    s.connect(to).await
}

/// The edge must refuse a client from `src` to `to`. It refuses at accept with a reset
/// (`edge::serve`: `splice::reset_tcp`, linger 0, then the socket dropped), having read and sent
/// nothing. The client's kernel reports that reset once, on the first call after it arrived:
/// `connect` (when it came before the connection was seen established), else the write, else
/// the read. A read after the reset was reported gives end of file. A clean close (FIN), a
/// reply, or a connect that fails otherwise (nothing listening) is no refusal.
pub async fn assert_refused(src: Ipv4Addr, to: SocketAddr) {
    use std::io::ErrorKind::ConnectionReset;
    let mut c = match connect_from(src, to).await {
        Ok(c) => c,
        Err(e) if e.kind() == ConnectionReset => return,
        Err(e) => panic!("{src} -> {to}: connect failed without a reset: {e}"),
    };
    let w = c.write_all(b"hello").await;
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
        .await
        .expect("refusal is prompt");
    let reset = |e: &std::io::Error| e.kind() == ConnectionReset;
    let refused = match (&w, &r) {
        (Ok(()), Err(e)) => reset(e),
        (Err(e), Ok(0)) => reset(e),
        _ => false,
    };
    assert!(
        refused,
        "{src} -> {to} was not reset by the edge: write {w:?}, then read {r:?}"
    );
}

/// Writes `tag` bytes as fast as the path takes them for `dur`, then half-closes.
pub async fn blast(mut s: TcpStream, tag: u8, dur: Duration) {
    let buf = vec![tag; 64 * 1024];
    let end = Instant::now() + dur;
    while Instant::now() < end {
        if s.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = s.shutdown().await;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
}
