//! Splicing bytes between a TCP socket and a QUIC stream, or between two QUIC streams.
//!
//! HOT PATH. TCP→QUIC reads into one reused buffer per connection and `write_all`s it (quinn
//! copies into its send buffer); QUIC→TCP and QUIC→QUIC use `read_chunk`, which hands out quinn's
//! own `Bytes` without a copy, and a transit forwards them with `write_chunk` (zero copy).
//! Backpressure is end to end: a pump awaits its write before it reads again, so a slow reader
//! shrinks the QUIC flow-control window and, behind it, the TCP window.
//!
//! Half-close: EOF on one side becomes `finish` (FIN) on the other, and the other direction keeps
//! flowing. Errors: a reset arriving on QUIC resets the TCP socket (RST via zero linger); a TCP
//! error resets the QUIC stream with a code; a lost connection resets the other side with
//! `UpstreamLost`. No path ends with both sides waiting on each other.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use quinn::{ReadError, RecvStream, SendStream, WriteError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Shared;
use crate::codes::Code;
use crate::ratelimit::{CircuitLimiter, TokenBucket};

/// Bytes read from TCP per syscall. A buffer lives as long as its connection, so this is also
/// most of the per-connection memory.
pub const TCP_BUF: usize = 16 * 1024;
/// Largest chunk taken from quinn at once.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The TCP socket is a client (edge): TCP→QUIC is "up".
    Edge,
    /// The TCP socket is a backend (site): QUIC→TCP is "up".
    Site,
}

impl Side {
    fn tcp_abort_code(self) -> Code {
        match self {
            Side::Edge => Code::ClientAbort,
            Side::Site => Code::BackendAbort,
        }
    }
}

/// Why a pump stopped abnormally; the caller tears down the whole splice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Abort(pub Code);

fn write_error_code(e: &WriteError) -> Code {
    match e {
        WriteError::Stopped(c) => Code::from_varint(*c).unwrap_or(Code::Internal),
        _ => Code::UpstreamLost,
    }
}

fn read_error_code(e: &ReadError) -> Code {
    match e {
        ReadError::Reset(c) => Code::from_varint(*c).unwrap_or(Code::Internal),
        _ => Code::UpstreamLost,
    }
}

/// A connection that fills its read buffer in one read is a bulk transfer: its buffer doubles up to
/// this, so idle and interactive connections keep the small one (memory per connection) and bulk
/// ones make fewer, larger writes (throughput).
pub const TCP_BUF_MAX: usize = 256 * 1024;

/// TCP → QUIC until EOF (then FIN). `buf` is reused (and grown for bulk transfers).
pub(crate) async fn tcp_to_quic(
    shared: &Shared,
    rd: &mut (impl AsyncReadExt + Unpin),
    send: &mut SendStream,
    buf: &mut Vec<u8>,
    side: Side,
    bucket: Option<&TokenBucket>,
) -> Result<(), Abort> {
    loop {
        let n = match rd.read(&mut buf[..]).await {
            Ok(0) => {
                let _ = send.finish();
                return Ok(());
            }
            Ok(n) => n,
            Err(_) => {
                let code = side.tcp_abort_code();
                let _ = send.reset(code.varint());
                return Err(Abort(code));
            }
        };
        if let Some(b) = bucket {
            b.take(n).await;
        }
        if let Err(e) = send.write_all(&buf[..n]).await {
            return Err(Abort(write_error_code(&e)));
        }
        count(shared, side, true, n);
        if n == buf.len() && buf.len() < TCP_BUF_MAX && bucket.is_none() {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// QUIC → TCP until FIN (then TCP shutdown of the write half).
pub(crate) async fn quic_to_tcp(
    shared: &Shared,
    recv: &mut RecvStream,
    wr: &mut (impl AsyncWriteExt + Unpin),
    side: Side,
    bucket: Option<&TokenBucket>,
) -> Result<(), Abort> {
    // A rate-limited circuit takes smaller chunks so that one chunk stays well inside its burst.
    let max = if bucket.is_some() { TCP_BUF } else { CHUNK };
    loop {
        match recv.read_chunk(max, true).await {
            Ok(Some(chunk)) => {
                let n = chunk.bytes.len();
                if let Some(b) = bucket {
                    b.take(n).await;
                }
                if wr.write_all(&chunk.bytes).await.is_err() {
                    let code = side.tcp_abort_code();
                    let _ = recv.stop(code.varint());
                    return Err(Abort(code));
                }
                count(shared, side, false, n);
            }
            Ok(None) => {
                let _ = wr.shutdown().await;
                return Ok(());
            }
            Err(e) => return Err(Abort(read_error_code(&e))),
        }
    }
}

#[inline]
fn count(shared: &Shared, side: Side, tcp_to_quic: bool, n: usize) {
    let up = match side {
        Side::Edge => tcp_to_quic,
        Side::Site => !tcp_to_quic,
    };
    let c = if up {
        &shared.metrics.bytes_up
    } else {
        &shared.metrics.bytes_down
    };
    c.fetch_add(n as u64, Relaxed);
}

/// Resets a TCP socket (RST instead of FIN) so the peer sees an error, not a clean end.
pub(crate) fn reset_tcp(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// Full-duplex splice of an accepted stream; returns when both directions ended or one failed.
pub(crate) async fn tcp_quic(
    shared: &Shared,
    tcp: TcpStream,
    send: SendStream,
    recv: RecvStream,
    side: Side,
) {
    let mut buf = vec![0u8; TCP_BUF];
    tcp_quic_with(shared, tcp, send, recv, side, &mut buf, None).await;
}

/// As [`tcp_quic`], with a caller-provided (reused) buffer, and the circuit's limiter when the
/// connection belongs to one (client-to-service bytes take from `up`, the others from `down`).
pub(crate) async fn tcp_quic_with(
    shared: &Shared,
    mut tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    side: Side,
    buf: &mut Vec<u8>,
    limiter: Option<&CircuitLimiter>,
) {
    shared.metrics.streams_active.fetch_add(1, Relaxed);
    shared.metrics.streams_total.fetch_add(1, Relaxed);
    let outcome = {
        let (mut rd, mut wr) = tcp.split();
        let up = tcp_to_quic(
            shared,
            &mut rd,
            &mut send,
            buf,
            side,
            limiter.map(|l| &l.up),
        );
        let down = quic_to_tcp(shared, &mut recv, &mut wr, side, limiter.map(|l| &l.down));
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(a) => break Err(a),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(a) => break Err(a),
                },
            }
            if up_done && down_done {
                break Ok(());
            }
        }
    };
    if let Err(Abort(code)) = outcome {
        shared.metrics.error(code);
        let _ = send.reset(code.varint());
        let _ = recv.stop(code.varint());
        reset_tcp(&tcp);
    }
    shared.metrics.streams_active.fetch_sub(1, Relaxed);
}

/// QUIC → QUIC, one direction, zero copy. Propagates FIN, resets and stops.
async fn pump(recv: &mut RecvStream, send: &mut SendStream) {
    loop {
        match recv.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                if let Err(e) = send.write_chunk(chunk.bytes).await {
                    let _ = recv.stop(write_error_code(&e).varint());
                    return;
                }
            }
            Ok(None) => {
                let _ = send.finish();
                return;
            }
            Err(e) => {
                let _ = send.reset(read_error_code(&e).varint());
                return;
            }
        }
    }
}

/// Relays a stream between an upstream and a downstream neighbour (transit).
pub(crate) async fn relay(
    mut up_send: SendStream,
    mut up_recv: RecvStream,
    mut down_send: SendStream,
    mut down_recv: RecvStream,
) {
    tokio::join!(
        pump(&mut up_recv, &mut down_send),
        pump(&mut down_recv, &mut up_send)
    );
}
