//! Helpers shared by the test suites of several crates (dev-dependency only; nothing here ships).
//!
//! [`free_udp`] and [`free_tcp_port`] hand out loopback ports for a test to bind *later* (a
//! router's address is written into a topology before the router starts). A port the kernel
//! picked for `bind(ip, 0)` and that was then released is exactly the kind the kernel hands to the
//! next `bind(ip, 0)` elsewhere in the process (a QUIC client endpoint, a TCP connect), so a router
//! that started late could find its port taken (`AddrInUse`). These helpers pick from the ports
//! *below* the kernel's ephemeral range instead, which the kernel never assigns on its own, each
//! port at most once per process, and check that it can be bound right now.

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// How many ports below the ephemeral range the helpers use.
const SPAN: u32 = 16_384;

/// The kernel's ephemeral range (Linux default when it cannot be read).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// The next candidate port: a per-process random start (so test binaries run one after another
/// do not walk the same sequence), then one step per call. `None` when the range below the
/// ephemeral ports is too small to use.
fn next_candidate() -> Option<u16> {
    static RANGE: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (base, span) = (*RANGE.get_or_init(|| {
        let low = ephemeral_low();
        let base = low.saturating_sub(SPAN).max(1_024);
        let span = low.saturating_sub(base);
        let seed = std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        NEXT.store(seed % span.max(1), Ordering::Relaxed);
        (span >= 1_024).then_some((base, span))
    }))?;
    let i = NEXT.fetch_add(1, Ordering::Relaxed) % span;
    u16::try_from(base + i).ok()
}

/// A port on `ip` that `probe` can bind now, outside the ephemeral range where possible.
fn pick(ip: IpAddr, probe: impl Fn(SocketAddr) -> std::io::Result<SocketAddr>) -> SocketAddr {
    for _ in 0..4_096 {
        let Some(port) = next_candidate() else { break };
        if let Ok(addr) = probe(SocketAddr::new(ip, port)) {
            return addr;
        }
    }
    // No usable range (or all of it busy): fall back to a kernel-chosen port, said once (a
    // router started late may then find its port taken: tests may fail with AddrInUse).
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!(
            "testkit: no free port below the kernel's ephemeral range (it starts at {}): using \
             kernel-chosen ports, which a late bind may find taken (widen the range below it in \
             /proc/sys/net/ipv4/ip_local_port_range)",
            ephemeral_low()
        )
    });
    probe(SocketAddr::new(ip, 0)).expect("no free loopback port")
}

/// A free UDP address on `ip` (bound once to check, then released).
pub fn free_udp(ip: IpAddr) -> SocketAddr {
    pick(ip, |a| UdpSocket::bind(a)?.local_addr())
}

/// A free TCP port on `ip` (bound once to check, then released).
pub fn free_tcp_port(ip: IpAddr) -> u16 {
    pick(ip, |a| TcpListener::bind(a)?.local_addr()).port()
}

/// Bytes a stream opened by `conn` gets the peer to take within 3 s (unidirectional, or
/// bidirectional): 0 when the peer grants no such stream.
pub async fn bytes_taken(conn: &quinn::Connection, uni: bool) -> usize {
    let taken = std::sync::atomic::AtomicUsize::new(0);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), async {
        let mut send = if uni {
            conn.open_uni().await.ok()?
        } else {
            conn.open_bi().await.ok()?.0
        };
        let chunk = vec![0u8; 64 << 10];
        loop {
            let n = send.write(&chunk).await.ok()?;
            taken.fetch_add(n, Ordering::Relaxed);
        }
        #[allow(unreachable_code)]
        Some(())
    })
    .await;
    taken.into_inner()
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `deadline`.
pub fn eventually(deadline: std::time::Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + deadline;
    loop {
        if cond() {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::Ipv4Addr;

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let u = free_udp(LO);
            let t = free_tcp_port(LO);
            assert!(
                u32::from(u.port()) < low && u32::from(t) < low,
                "{u} {t} (low {low})"
            );
            assert!(
                seen.insert(u.port()) && seen.insert(t),
                "port handed out twice"
            );
            UdpSocket::bind(u).unwrap();
            TcpListener::bind((LO, t)).unwrap();
        }
    }

    #[test]
    fn a_port_that_cannot_be_bound_is_skipped() {
        // Every other candidate is "in use": pick moves on to the next one.
        let got = pick(LO, |a| {
            if a.port() % 2 == 0 {
                Err(std::io::ErrorKind::AddrInUse.into())
            } else {
                Ok(a)
            }
        });
        assert_eq!(got.port() % 2, 1);
    }
}
