//! The endpoint's UDP socket: quinn's tokio socket, less one system call per sparse datagram.
//!
//! quinn's endpoint driver reads until the socket says `EAGAIN`. With quinn's own tokio socket
//! that costs an extra `recvmmsg` after every batch that already emptied the queue, which on a
//! request/response flow (one datagram per wake-up) is one system call in two, on the critical
//! path of every round trip. A `recvmmsg` that returns fewer datagrams than it had room for has
//! emptied the queue, so this socket then clears tokio's read readiness itself, the way tokio
//! does for a short TCP read: the next poll waits for the next readiness event instead of asking
//! the kernel. Clearing is race-free: tokio clears only the readiness it handed out, so an event
//! that arrived meanwhile still wakes the driver.

use std::io::{self, IoSliceMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;

/// A UDP socket for a quinn endpoint on the tokio runtime.
#[derive(Debug)]
pub struct FabricUdp {
    io: tokio::net::UdpSocket,
    inner: UdpSocketState,
}

impl FabricUdp {
    /// Wraps a bound socket; must be called inside a tokio runtime.
    pub fn new(sock: std::net::UdpSocket) -> io::Result<Self> {
        Ok(FabricUdp {
            inner: UdpSocketState::new((&sock).into())?,
            io: tokio::net::UdpSocket::from_std(sock)?,
        })
    }
}

/// Waits for the socket to be writable again after a send that would have blocked.
#[derive(Debug)]
struct Writable(Arc<FabricUdp>);

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.0.io.poll_send_ready(cx)
    }
}

impl AsyncUdpSocket for FabricUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable(self))
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, || {
            self.inner.send((&self.io).into(), transmit)
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let room = bufs.len().min(quinn::udp::BATCH_SIZE);
        loop {
            std::task::ready!(self.io.poll_recv_ready(cx))?;
            // A short batch is handed back as `WouldBlock` so that `try_io` clears the readiness
            // it read; the count travels outside.
            let mut short = None;
            match self.io.try_io(Interest::READABLE, || {
                let n = self.inner.recv((&self.io).into(), bufs, meta)?;
                if n < room {
                    short = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            }) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(n) = short.filter(|n| *n > 0) {
                        return Poll::Ready(Ok(n));
                    }
                }
                // Another error is one datagram's or the socket's pending error (a stored
                // ICMP error, say), taken by this call: polled again, as quinn's own socket
                // does. Handed to quinn, it ended the endpoint's driver, and with it every
                // connection of the router until a restart.
                Err(e) => tracing::debug!("fabric socket: receive error, ignored: {e}"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.gro_segments()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Bursts of every size around the batch size arrive in full: clearing the readiness after a
    /// short batch never strands a datagram that came in meanwhile.
    #[tokio::test]
    async fn every_datagram_of_bursts_around_the_batch_size_is_received() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_nonblocking(true).unwrap();
        let to = sock.local_addr().unwrap();
        let udp = FabricUdp::new(sock).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut storage = vec![[0u8; 1500]; quinn::udp::BATCH_SIZE];
        let mut meta = vec![RecvMeta::default(); quinn::udp::BATCH_SIZE];
        let mut sent = 0u32;
        for burst in [1, 2, 31, 32, 33, 64, 65, 1, 100] {
            for _ in 0..burst {
                tx.send_to(&sent.to_be_bytes(), to).unwrap();
                sent += 1;
            }
            let mut got = 0;
            while got < burst {
                let mut bufs: Vec<IoSliceMut> =
                    storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let n = tokio::time::timeout(
                    Duration::from_secs(10),
                    std::future::poll_fn(|cx| udp.poll_recv(cx, &mut bufs, &mut meta)),
                )
                .await
                .expect("a datagram was stranded")
                .unwrap();
                for (i, m) in meta[..n].iter().enumerate() {
                    let first = sent - burst + got + i as u32;
                    assert_eq!(&storage[i][..m.len], &first.to_be_bytes()[..], "in order");
                }
                got += n as u32;
            }
        }
    }
}
