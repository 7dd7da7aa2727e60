//! Splicing bytes between a TCP socket and a QUIC stream, or between two QUIC streams.
//!
//! HOT PATH. TCP→QUIC reads into a `BytesMut` and hands the frozen `Bytes` to quinn with
//! `write_chunk` (no copy into quinn's send buffer; see [`TcpBuf`]); QUIC→TCP and QUIC→QUIC use
//! `read_chunks`, which hands out up to 16 of quinn's own `Bytes` at once without a copy; they go
//! to TCP with one `writev`. A transit writes what is ready as one block per write (see
//! [`pump`]: quinn's send buffer must not hold one segment per packet).
//! Backpressure is end to end: a pump awaits its write before it reads again, so a slow reader
//! shrinks the QUIC flow-control window and, behind it, the TCP window.
//!
//! Half-close: EOF on one side becomes `finish` (FIN) on the other, and the other direction keeps
//! flowing. Errors: a reset arriving on QUIC resets the TCP socket (RST via zero linger); a TCP
//! read error resets the QUIC stream with a code, and so does a TCP write refused, except when its
//! peer had sent a FIN (`EPIPE`): that stops the stream it came from with a code and ends that
//! direction only (the other reads on to the FIN); a lost connection resets the other side with
//! `UpstreamLost`. No path ends with both sides
//! waiting on each other.
//!
//! Idle and stalled: with `RouterConfig::idle_timeout`, a TCP<->QUIC splice (edge and site each)
//! that moved no chunk either way for the timeout resets both sides with `IdleTimeout`; with
//! `RouterConfig::write_stall_timeout`, one whose QUIC->TCP write took no byte for that timeout
//! resets them with `WriteStalled` ([`ConnTimer`]: one timer per connection, ticking at most every
//! half of each timeout; the pumps only set flags). A transit has no timer: the resets of the ends
//! reach both of its pumps.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Shared;
use crate::codes::Code;
use crate::metrics::Held;
use crate::ratelimit::{CircuitLimiter, TokenBucket};

/// Bytes read from TCP per syscall (to start with). A connection's current block lives as long
/// as it is not used up, so this is also most of the per-connection memory.
pub const TCP_BUF: usize = 16 * 1024;

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

    /// The code a reset of the stream by the far end counts as here: its own, except this
    /// side's TCP abort code, which names this router's own TCP peer (a site's backend, an
    /// edge's client) and no far end can say (a transit relays each end's code to the other):
    /// taken for `upstream_lost`. (A peer resetting a site's streams with `backend_abort` had
    /// them counted as the backend's resets, and joining the run that has the site check the
    /// backend and take it out of service.)
    fn peer_reset_code(self, code: Code) -> Code {
        if code == self.tcp_abort_code() {
            Code::UpstreamLost
        } else {
            code
        }
    }
}

/// Why a pump stopped abnormally; the caller tears down the whole splice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Abort(pub Code);

/// How the TCP → QUIC direction ended without failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The TCP side's FIN, passed on as the stream's FIN.
    Eof,
    /// The far end stopped the stream with this code: it takes no more of these bytes (a
    /// backend that answered early and closed, say). The TCP side's bytes were read and dropped
    /// while the other direction, whose answer may still be coming, went on ([`discard`], for
    /// [`DISCARD_MAX`] at most); the lingering close ([`linger`]) reads what the TCP side sends
    /// after that.
    Stopped(Code),
}

/// How the QUIC → TCP direction ended without failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// The stream's FIN, passed on as the TCP side's FIN: everything reached the TCP side.
    Whole,
    /// The TCP side refused a write with `EPIPE`: its peer had closed its side (the FIN came) and
    /// then the connection (an RST answered the bytes it did not read): the stream was stopped
    /// with this code. The other direction goes on to its end: what the peer sent before its FIN
    /// (a backend's early answer) is still in the socket, read whole, and then the FIN. (A write
    /// refused otherwise, `ECONNRESET` for a reset with no FIN, fails the connection.)
    Refused(Code),
}

/// The code of a peer's stop of the stream (not of a lost connection).
fn stop_code(e: &WriteError) -> Option<Code> {
    match e {
        WriteError::Stopped(c) => Some(Code::from_peer(*c)),
        _ => None,
    }
}

/// The code a failed write ends with: the peer's stop code, else `upstream_lost`.
pub(crate) fn write_error_code(e: &WriteError) -> Code {
    stop_code(e).unwrap_or(Code::UpstreamLost)
}

/// How often a direction left waiting on its read side once the other has ended checks that
/// the stream it sends on is still wanted ([`read_unless_stopped`]).
const STOP_CHECK: Duration = Duration::from_secs(1);

/// Whether the peer stopped `send` (or its connection is lost): a zero-length write, polled once
/// and never waited for. (quinn's `SendStream::stopped` keeps an entry per stream it is polled
/// for until that stream finishes or is stopped: every stream this router reset itself leaked
/// one on a connection that lives for days.) `Ok`: a stop, with its code as the peer sent it;
/// `Err`: the connection's loss.
fn stop_of(send: &mut SendStream) -> Option<Result<VarInt, Code>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(send.write(&[])).poll(&mut cx) {
        Poll::Ready(Err(WriteError::Stopped(c))) => Some(Ok(c)),
        Poll::Ready(Err(_)) => Some(Err(Code::UpstreamLost)),
        _ => None,
    }
}

/// Waits for `read`. Once `watch` is set (the other direction has ended, its FIN passed on), a
/// check every [`STOP_CHECK`] while it waits looks at `send`, the stream this direction writes:
/// a stop from the far end, or the loss of its connection, ends the wait with its code.
///
/// A site whose client sent its FIN waits on its backend, a transit on its next hop: a stream
/// the far end then gave up (an edge's idle timeout, drain, crash) showed only at the next byte
/// to write, and with a silent backend the site's capacity slot, the backend connection and the
/// transit's relay were held until then. `tick` is the direction's timer, made at its first
/// need (none for a stream that never half-closes); before `watch` is set this costs a relaxed
/// load per poll.
/// (`read` is pinned by the caller, whose future holds it anyway.)
fn read_unless_stopped<'a, T>(
    mut read: Pin<&'a mut impl std::future::Future<Output = T>>,
    send: &'a mut SendStream,
    watch: &'a AtomicBool,
    tick: &'a mut Option<Pin<Box<tokio::time::Sleep>>>,
) -> impl std::future::Future<Output = Result<T, Result<VarInt, Code>>> + 'a {
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(r) = read.as_mut().poll(cx) {
            return Poll::Ready(Ok(r));
        }
        // Looked at on every poll: the other direction ends while this one waits.
        if watch.load(Relaxed) {
            let t = tick.get_or_insert_with(|| Box::pin(tokio::time::sleep(STOP_CHECK)));
            while t.as_mut().poll(cx).is_ready() {
                if let Some(code) = stop_of(send) {
                    return Poll::Ready(Err(code));
                }
                t.as_mut().reset(tokio::time::Instant::now() + STOP_CHECK);
            }
        }
        Poll::Pending
    })
}

fn read_error_code(e: &ReadError) -> Code {
    Code::from_peer(read_error_varint(e))
}

/// What a relay hands on for a failed read: the peer's reset code as it came (one this build
/// does not know included: a newer router's code crosses an older transit as it is, as the
/// wire rules want), else `upstream_lost`.
fn read_error_varint(e: &ReadError) -> VarInt {
    match e {
        ReadError::Reset(c) => *c,
        _ => Code::UpstreamLost.varint(),
    }
}

/// [`read_error_varint`] for a failed write: the peer's stop code as it came.
fn write_error_varint(e: &WriteError) -> VarInt {
    match e {
        WriteError::Stopped(c) => *c,
        _ => Code::UpstreamLost.varint(),
    }
}

/// The code a relay hands on when [`read_unless_stopped`] gave up: a stop's as it came, or the
/// connection's loss.
fn given_up(r: Result<VarInt, Code>) -> VarInt {
    r.unwrap_or_else(Code::varint)
}

/// A read that drains the socket with fewer bytes than this is copied out of its block
/// ([`TcpBuf::read`]).
const SMALL_READ: usize = TCP_BUF / 4;

/// A connection that fills its read buffer in one read is a bulk transfer: its reads double up to
/// this, so idle and interactive connections keep the small buffer (memory per connection) and
/// bulk ones hand quinn fewer, larger chunks (throughput).
pub const TCP_BUF_MAX: usize = 256 * 1024;

/// The TCP read side of one connection. Reads land in a `BytesMut` and are handed to quinn as
/// frozen `Bytes` (`write_chunk`): quinn keeps them until acknowledged instead of copying them
/// into its send buffer. A block is taken only when the socket has data: a read that drains the
/// socket (returns less than the room it had) lets go of the block, and the next read waits for
/// readiness before it allocates. An idle connection so holds no read memory (a `TCP_BUF` block
/// kept across the wait cost ~4-8 KiB of RSS per idle connection, edge and site each), and an
/// interactive one allocates once per message, reusing the allocator's freed blocks, and copies
/// a message under [`SMALL_READ`] out of its block (so a chunk never keeps more than 4 times its
/// bytes alive while quinn or a replay holds it). Bulk
/// transfers (reads grown past `TCP_BUF`) keep sharing one block across reads.
pub(crate) struct TcpBuf {
    buf: BytesMut,
    /// Bytes asked for per read (doubles while reads fill it, up to `TCP_BUF_MAX`).
    want: usize,
    /// The last read drained the socket (returned less than the room it had).
    drained: bool,
    /// A read returned a byte ([`TcpBuf::read_any`]).
    read_any: bool,
    /// Chunks the edge read before the splice and still has to write (last first): written
    /// before anything more is read ([`TcpBuf::queue`]).
    queued: Vec<Bytes>,
    /// Bytes at the head of `queued` already counted in `bytes_up` (a try before wrote them).
    queued_counted: usize,
    /// Until when a circuit's rate holds the queued chunks back (the last one read was
    /// charged when read, and is held), and what that charge was (ns: given back if the wait
    /// is given up, [`TokenBucket::wait_paid`]).
    queued_until: Option<(tokio::time::Instant, u64)>,
    /// Memory the last chunk of a read that drained the socket keeps alive (tests).
    #[cfg(test)]
    pinned: usize,
}

/// The read side of a TCP connection: the bytes, and readiness without a buffer.
pub(crate) trait TcpRead: AsyncRead + Unpin {
    fn stream(&self) -> &TcpStream;
}

impl TcpRead for TcpStream {
    fn stream(&self) -> &TcpStream {
        self
    }
}

impl TcpRead for tokio::net::tcp::ReadHalf<'_> {
    fn stream(&self) -> &TcpStream {
        self.as_ref()
    }
}

impl TcpBuf {
    pub fn new() -> Self {
        TcpBuf {
            buf: BytesMut::new(),
            want: TCP_BUF,
            drained: false,
            read_any: false,
            queued: Vec::new(),
            queued_counted: 0,
            queued_until: None,
            #[cfg(test)]
            pinned: 0,
        }
    }

    /// `chunks`, in order, go to the stream before the next read of the socket: what an edge
    /// read and had not written when its site answered. The splice writes them (its answer
    /// direction running meanwhile), already paid to a circuit's rate; their first `counted`
    /// bytes are counted in `bytes_up` already; a circuit's rate holds them back until
    /// `until`'s instant, for the charge it says (and each waits for the circuit to be still
    /// there).
    pub fn queue(
        &mut self,
        chunks: Vec<Bytes>,
        counted: usize,
        until: Option<(tokio::time::Instant, u64)>,
    ) {
        self.queued = chunks;
        self.queued.retain(|c| !c.is_empty());
        self.queued.reverse();
        self.queued_counted = counted;
        self.queued_until = until;
    }

    /// The next queued chunk, with how many of its bytes were counted already.
    fn next_queued(&mut self) -> Option<(Bytes, usize)> {
        let c = self.queued.pop()?;
        let counted = self.queued_counted.min(c.len());
        self.queued_counted -= counted;
        Some((c, counted))
    }

    /// Drops what is still queued (the stream was stopped or lost): its bytes.
    fn drop_queued(&mut self) -> usize {
        self.queued_counted = 0;
        self.queued_until = None;
        std::mem::take(&mut self.queued)
            .iter()
            .map(Bytes::len)
            .sum()
    }

    /// Reads once; an empty chunk is EOF. Cancel safe (nothing is consumed unless it returns).
    /// `grow`: let bulk transfers read larger chunks.
    pub async fn read(&mut self, rd: &mut impl TcpRead, grow: bool) -> std::io::Result<Bytes> {
        if self.want > TCP_BUF && self.drained {
            // A bulk connection that drained its socket, and whose next read would have to
            // wait: the bulk phase is over. Back to `TCP_BUF`, and the grown block's tail (up to
            // `TCP_BUF_MAX`) is not kept across the wait, which may last hours (a client waiting
            // for a long answer after its prompt). Mid-transfer the socket is seldom empty, and
            // the block is kept. (Readiness is only looked at: the read below waits for it with
            // this task's waker.)
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if rd.stream().poll_read_ready(&mut cx).is_pending() {
                self.want = TCP_BUF;
                self.buf = BytesMut::new();
            }
        }
        if self.buf.capacity() == 0 {
            // The last read drained the socket (tokio cleared its readiness): wait for data
            // before taking memory.
            rd.stream().readable().await?;
        }
        if self.buf.capacity() - self.buf.len() < self.want / 4 {
            self.buf = BytesMut::with_capacity(self.want);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = rd.read_buf(&mut self.buf).await?;
        self.read_any |= n > 0;
        if grow && n == room && room >= self.want && self.want < TCP_BUF_MAX {
            self.want *= 2;
        }
        self.drained = n < room;
        if n < room && self.want == TCP_BUF {
            // Drained: the block is let go. A bulk transfer (reads grown past `TCP_BUF`) keeps
            // its block: its next read, likely soon and large, fills the tail instead of taking
            // a new block.
            let block = std::mem::take(&mut self.buf);
            #[cfg(test)]
            {
                self.pinned = if n < SMALL_READ { n } else { block.capacity() };
            }
            if n < SMALL_READ {
                // A small read is copied out: a chunk of a few bytes (a streamed token, a
                // keystroke) would otherwise keep the whole block alive until quinn has it
                // acknowledged, or while an edge holds it for a replay (whose limit counts
                // bytes): 1,000 one-byte chunks held 16 MB. Chunks so hold at most 4 times
                // their bytes.
                return Ok(Bytes::copy_from_slice(&block));
            }
            return Ok(block.freeze());
        }
        Ok(self.buf.split().freeze())
    }

    /// Whether a read returned a byte: the TCP side sent something (a site's backend answered).
    pub fn read_any(&self) -> bool {
        self.read_any
    }

    /// Whether a block is held between reads (tests).
    #[cfg(test)]
    fn holds_block(&self) -> bool {
        self.buf.capacity() > 0
    }
}

/// Bytes one pump moves before it yields to the scheduler. quinn's reads and writes are outside
/// tokio's cooperative budget (a transit's pump touches nothing else), and a TCP socket that is
/// always ready spends its budget only every 128 reads (up to 32 MiB): a pump with both sides
/// ready could keep its worker thread for as long as the transfer lasts, while the quinn
/// connection driver it woke waits in that worker's LIFO slot (not stealable), and so do the
/// other connections' tasks queued there.
pub const YIELD_EVERY: usize = 1 << 20;

/// Counts the bytes a pump moved and yields once per [`YIELD_EVERY`].
#[derive(Default)]
struct Fairness {
    moved: usize,
}

impl Fairness {
    async fn moved(&mut self, n: usize) {
        self.moved += n;
        if self.moved >= YIELD_EVERY {
            self.moved = 0;
            tokio::task::yield_now().await;
        }
    }
}

/// Whether a connection moved a chunk (either way) since its idle timer last looked.
///
/// Both pumps of a connection mark it once per chunk, next to their byte count; the timer reads
/// and clears it once per tick. Marking is a relaxed store of `true`: a plain byte store (no
/// read-modify-write, no fence, no lock prefix), as a `Cell` would be. It is an atomic only in
/// type: a `&Cell` held across `.await` would make the connection's task `!Send`.
#[derive(Default)]
pub(crate) struct Activity(AtomicBool);

impl Activity {
    #[inline]
    fn mark(&self) {
        self.0.store(true, Relaxed);
    }
    /// Whether a chunk moved since the last call.
    fn take(&self) -> bool {
        self.0.swap(false, Relaxed)
    }
}

/// Whether a connection's QUIC→TCP write is waiting, and whether it wrote a byte since the
/// connection's timer last looked ([`ConnTimer`]). The pump sets `waiting` around each write and
/// `wrote` at each partial write (a relaxed store each, as [`Activity`]).
#[derive(Default)]
pub(crate) struct WriteWatch {
    waiting: AtomicBool,
    wrote: AtomicBool,
}

impl WriteWatch {
    #[inline]
    fn waiting(&self, w: bool) {
        self.waiting.store(w, Relaxed);
    }
    #[inline]
    fn wrote(&self) {
        self.wrote.store(true, Relaxed);
    }
    /// Whether a write is waiting and none wrote a byte since the last call.
    fn stalled(&self) -> bool {
        let wrote = self.wrote.swap(false, Relaxed);
        self.waiting.load(Relaxed) && !wrote
    }
}

/// One connection's timer for its idle and write-stall timeouts, a branch of its splice's
/// `select!`. It ticks at most every half of each timeout, a whole fraction of the idle one
/// ([`ConnTimer::tick`]); it is ready with `IdleTimeout` once `idle_ticks` ticks in a row saw no
/// [`Activity`] (between one idle timeout and one tick more after the last chunk: at most 1.5
/// timeouts), and with `WriteStalled` once `stall_ticks` ticks in a row saw the QUIC→TCP write
/// waiting without a byte written ([`WriteWatch`]; between one and two stall timeouts after its
/// last byte).
///
/// The task is woken, and this polled, about once per chunk; only a tick touches tokio's timer. In
/// between, a poll reads whether the sleep has fired (one relaxed load) and returns: the waker
/// registered at the last real poll is this task's, and a tokio task's waker does not change. So
/// the data path never resets a timer and never registers a waker for it. The real polls are
/// outside tokio's cooperative budget: a sleep polled with the budget spent returns pending
/// without registering, and this one would then never be polled again.
struct ConnTimer<'a> {
    /// `None`: neither timeout (never ready).
    sleep: Option<Pin<&'a mut tokio::time::Sleep>>,
    every: Duration,
    activity: &'a Activity,
    watch: &'a WriteWatch,
    /// The sleep was polled since its last reset (its waker is registered).
    armed: bool,
    /// Ticks in a row without a chunk, and how many end the connection (0: no idle timeout).
    quiet: u32,
    idle_ticks: u32,
    /// Ticks in a row with the write stalled, and how many end the connection (0: no bound).
    stalled: u32,
    stall_ticks: u32,
}

impl<'a> ConnTimer<'a> {
    /// The tick for `idle` and `stall`, `None` when neither is set: at most half of each, and
    /// a whole fraction of the idle timeout (so that it ends less than one tick after it, at
    /// most 1.5 timeouts after the last chunk); at least 1 ms (tokio's timer resolution).
    fn tick(idle: Option<Duration>, stall: Option<Duration>) -> Option<Duration> {
        let floor = |t: Duration| t.max(Duration::from_millis(1));
        match (idle, stall) {
            (Some(i), Some(s)) => {
                let parts = (2 * i.as_nanos()).div_ceil(s.as_nanos().max(1)).max(2);
                let parts = u32::try_from(parts).unwrap_or(u32::MAX);
                // At most half the stall timeout also when `parts` did not fit (an idle timeout
                // of centuries): the whole fraction matters less than the stall's bound.
                Some(floor((i / parts).min(s / 2)))
            }
            (Some(t), None) | (None, Some(t)) => Some(floor(t / 2)),
            (None, None) => None,
        }
    }

    fn new(
        sleep: Option<Pin<&'a mut tokio::time::Sleep>>,
        idle: Option<Duration>,
        stall: Option<Duration>,
        activity: &'a Activity,
        watch: &'a WriteWatch,
    ) -> Self {
        let every = Self::tick(idle, stall).unwrap_or_default();
        // Whole ticks in `t`, rounded up; a remainder of at most one nanosecond a tick is what
        // dividing `t` into that many ticks left over (`tick`), not a part of a tick.
        let ticks = |t: Duration| -> u32 {
            let (t, e) = (t.as_nanos(), every.as_nanos().max(1));
            let n = t / e;
            let n = if t - n * e <= n { n } else { n + 1 };
            u32::try_from(n).unwrap_or(u32::MAX)
        };
        ConnTimer {
            sleep,
            every,
            activity,
            watch,
            armed: false,
            quiet: 0,
            idle_ticks: idle.map_or(0, ticks),
            stalled: 0,
            // The first stalled tick may come right after the write began: one tick more.
            stall_ticks: stall.map_or(0, |t| ticks(t).saturating_add(1)),
        }
    }
}

impl std::future::Future for ConnTimer<'_> {
    type Output = Code;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Code> {
        let this = self.get_mut();
        let Some(sleep) = this.sleep.as_mut() else {
            return Poll::Pending;
        };
        loop {
            if this.armed && !sleep.is_elapsed() {
                return Poll::Pending;
            }
            let mut unbudgeted = tokio::task::unconstrained(sleep.as_mut());
            if Pin::new(&mut unbudgeted).poll(cx).is_pending() {
                this.armed = true;
                return Poll::Pending;
            }
            // A tick.
            if this.activity.take() {
                this.quiet = 0;
            } else {
                this.quiet = this.quiet.saturating_add(1);
                if this.idle_ticks > 0 && this.quiet >= this.idle_ticks {
                    return Poll::Ready(Code::IdleTimeout);
                }
            }
            if this.watch.stalled() {
                this.stalled = this.stalled.saturating_add(1);
                if this.stall_ticks > 0 && this.stalled >= this.stall_ticks {
                    return Poll::Ready(Code::WriteStalled);
                }
            } else {
                this.stalled = 0;
            }
            sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + this.every);
            this.armed = false;
        }
    }
}

/// TCP → QUIC until EOF (then FIN), or until the far end stops the stream ([`Ended`]): its code is
/// then put in `stopped` (the other direction sees it) and the TCP side's bytes are read and
/// dropped ([`discard`]) until its EOF or [`DISCARD_MAX`], unless the caller, once the answer is
/// out, stops first. A circuit revoked meanwhile fails the connection with `circuit_refused`.
// The pump's two streams, its buffer and its five per-connection signals, each used as is.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn tcp_to_quic(
    shared: &Shared,
    rd: &mut impl TcpRead,
    send: &mut SendStream,
    buf: &mut TcpBuf,
    side: Side,
    bucket: Option<&TokenBucket>,
    activity: &Activity,
    watch_stop: &AtomicBool,
    stopped: &StoppedCode,
) -> Result<Ended, Abort> {
    let mut fair = Fairness::default();
    let mut pace = crate::ratelimit::Pace::default();
    let mut tick = None;
    let code = loop {
        // What the edge read before the splice goes first: already paid to the circuit's rate,
        // and part of it maybe counted.
        let (read, paid, precounted) = match buf.next_queued() {
            Some((c, counted)) => (Ok(Ok(c)), true, counted),
            // The read future ends here, so that it shares its place in this future's state
            // with the write below (left alive to the end of the loop's body, it cost 192 bytes
            // in every open connection's future).
            None => {
                let read = std::pin::pin!(buf.read(rd, bucket.is_none()));
                (
                    read_unless_stopped(read, send, watch_stop, &mut tick).await,
                    false,
                    0,
                )
            }
        };
        let read = match read {
            Ok(r) => r,
            Err(Ok(code)) => break Code::from_peer(code),
            Err(Err(lost)) => return Err(Abort(lost)),
        };
        let chunk = match read {
            Ok(c) if c.is_empty() => {
                let _ = send.finish();
                return Ok(Ended::Eof);
            }
            Ok(c) => c,
            Err(_) => {
                let code = side.tcp_abort_code();
                let _ = send.reset(code.varint());
                return Err(Abort(code));
            }
        };
        let n = chunk.len();
        if let Some(b) = bucket
            && match paid {
                // Charged when the edge read it: what is left of its hold, and the circuit
                // looked at again (deleted meanwhile, the chunk goes no further).
                true => b.wait_paid(buf.queued_until.take(), &mut pace).await,
                false => b.take(n, &mut pace).await,
            }
            .is_err()
        {
            let code = Code::CircuitRefused;
            let _ = send.reset(code.varint());
            return Err(Abort(code));
        }
        // Each part quinn takes is activity: a bulk chunk (up to 256 KiB) going to a slow
        // reader may take longer than the idle timeout to go whole, and it was marked only
        // once whole (the connection was reset as idle while it moved).
        let mut rest = [chunk];
        let failed = loop {
            if rest[0].is_empty() {
                break None;
            }
            match send.write_chunks(&mut rest).await {
                Ok(_) => activity.mark(),
                Err(e) => break Some(e),
            }
        };
        if let Some(e) = failed {
            // What quinn took before the failure went: counted (`rest` is cut down as it is
            // written). The rest of a stopped chunk is dropped, as what follows it is (what
            // was queued included).
            let left = rest[0].len();
            count(shared, side, true, (n - left).saturating_sub(precounted));
            let queued = buf.drop_queued();
            match stop_code(&e) {
                Some(code) => {
                    (shared.metrics.bytes_discarded).fetch_add((left + queued) as u64, Relaxed);
                    break code;
                }
                None => return Err(Abort(Code::UpstreamLost)),
            }
        }
        count(shared, side, true, n - precounted);
        fair.moved(n).await;
    };
    // Stopped: the other direction sees it, and, while the answer is still going out, what the
    // TCP side sends is dropped (boxed: the future every connection keeps does not hold the
    // discard's state). Once the answer is out the caller lingers instead.
    stopped.set(code);
    if !watch_stop.load(Relaxed) {
        let counter = &shared.metrics.bytes_discarded;
        if Box::pin(discard(counter, rd, bucket)).await.is_err() {
            return Err(Abort(Code::CircuitRefused));
        }
    }
    Ok(Ended::Stopped(code))
}

/// Chunks taken from quinn per read on QUIC → TCP, written with one `writev`. quinn hands out one
/// chunk per received STREAM frame (~1.2-1.4 KB on a 1500-byte path), so a `write` per chunk would
/// be a syscall per packet.
const IOV: usize = 16;

/// Writes `bufs` to `wr` in full with vectored writes; each chunk is released once written.
/// Each write that takes bytes is told to `watch` and counts as `activity` (the idle timer's):
/// a batch can be a stream window (quinn merges a slow reader's chunks), which a slow but
/// steady reader takes for longer than the idle timeout, and only the whole batch counted.
async fn write_all_chunks(
    wr: &mut (impl AsyncWrite + Unpin),
    bufs: &mut [Bytes],
    watch: &WriteWatch,
    activity: &Activity,
) -> std::io::Result<()> {
    let mut first = 0;
    loop {
        while first < bufs.len() && bufs[first].is_empty() {
            first += 1;
        }
        if first == bufs.len() {
            return Ok(());
        }
        // The slices are built at each poll, so they are not part of the future's state (which
        // every open connection keeps).
        let mut written = std::future::poll_fn(|cx| {
            let io: [IoSlice<'_>; IOV] =
                std::array::from_fn(|i| IoSlice::new(bufs.get(first + i).map_or(&[], |b| &b[..])));
            let k = (bufs.len() - first).min(IOV);
            std::pin::Pin::new(&mut *wr).poll_write_vectored(cx, &io[..k])
        })
        .await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        watch.wrote();
        activity.mark();
        while written > 0 && first < bufs.len() {
            let len = bufs[first].len();
            if written >= len {
                written -= len;
                bufs[first] = Bytes::new();
                first += 1;
            } else {
                bufs[first].advance(written);
                written = 0;
            }
        }
    }
}

/// The next chunks of `recv` into `bufs` (how many; `None` at its end). `limited` (a rate-limited
/// circuit): at most [`crate::ratelimit::CHUNK`] bytes, well inside the circuit's burst. One of
/// quinn's chunks is not: it merges a slow reader's contiguous chunks, up to a stream window,
/// and such a chunk was written at line rate once the bucket had paid for it.
async fn read_batch(
    recv: &mut RecvStream,
    bufs: &mut [Bytes; IOV],
    limited: bool,
) -> Result<Option<usize>, ReadError> {
    if !limited {
        return recv.read_chunks(bufs).await;
    }
    Ok(recv
        .read_chunk(crate::ratelimit::CHUNK, true)
        .await?
        .map(|c| {
            bufs[0] = c.bytes;
            1
        }))
}

/// QUIC → TCP until FIN (then TCP shutdown of the write half), or until the TCP side refuses a
/// write ([`Delivered::Refused`]).
pub(crate) async fn quic_to_tcp(
    shared: &Shared,
    recv: &mut RecvStream,
    wr: &mut (impl AsyncWrite + Unpin),
    side: Side,
    bucket: Option<&TokenBucket>,
    activity: &Activity,
    watch: &WriteWatch,
) -> Result<Delivered, Abort> {
    let mut bufs: [Bytes; IOV] = Default::default();
    let mut fair = Fairness::default();
    let mut pace = crate::ratelimit::Pace::default();
    loop {
        match read_batch(recv, &mut bufs, bucket.is_some()).await {
            Ok(Some(k)) => {
                let n: usize = bufs[..k].iter().map(Bytes::len).sum();
                if let Some(b) = bucket
                    && b.take(n, &mut pace).await.is_err()
                {
                    let code = Code::CircuitRefused;
                    let _ = recv.stop(code.varint());
                    return Err(Abort(code));
                }
                // Waiting for the TCP side only, not for the circuit's rate above.
                watch.waiting(true);
                let written = write_all_chunks(wr, &mut bufs[..k], watch, activity).await;
                watch.waiting(false);
                if let Err(e) = written {
                    // What went before the failure was delivered: counted (the batch is cut
                    // down to what is left as it is written).
                    let left: usize = bufs[..k].iter().map(Bytes::len).sum();
                    count(shared, side, false, n - left);
                    let code = side.tcp_abort_code();
                    let _ = recv.stop(code.varint());
                    // `EPIPE`: the peer had closed its side (its FIN came first, so what it sent
                    // is whole) and then the connection. Anything else (`ECONNRESET`: a reset
                    // with no FIN, a crash) fails the connection: the other direction would
                    // read on to a clean end, since the write took the socket's error.
                    return match e.kind() {
                        std::io::ErrorKind::BrokenPipe => Ok(Delivered::Refused(code)),
                        _ => Err(Abort(code)),
                    };
                }
                count(shared, side, false, n);
                activity.mark();
                fair.moved(n).await;
            }
            Ok(None) => {
                let _ = wr.shutdown().await;
                return Ok(Delivered::Whole);
            }
            Err(e) => return Err(Abort(side.peer_reset_code(read_error_code(&e)))),
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
/// `starting` is the stream's count among those starting (`streams_starting`), let go once it
/// counts as active: a drain, which waits for both, never sees it in neither.
pub(crate) async fn tcp_quic(
    shared: &Shared,
    tcp: TcpStream,
    send: SendStream,
    recv: RecvStream,
    side: Side,
    starting: Held<'_>,
) -> Spliced {
    let mut buf = TcpBuf::new();
    tcp_quic_with(shared, tcp, send, recv, side, &mut buf, None, starting).await
}

/// How a splice ([`tcp_quic_with`]) ended, for a site's passive health check.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Spliced {
    /// The code it was torn down with; `None`: both directions ended (cleanly, or one stopped
    /// by the far end and the other finished).
    pub aborted: Option<Code>,
    /// Whether the TCP side sent a byte.
    pub tcp_sent: bool,
    /// Whether the TCP side closed first: its FIN while the other direction was still open, or
    /// a write it refused (`EPIPE`: it had closed, then reset).
    pub tcp_closed_first: bool,
}

/// As [`tcp_quic`], with a caller-provided (reused) buffer, and the circuit's limiter when the
/// connection belongs to one (client-to-service bytes take from `up`, the others from `down`).
/// Returns how it ended.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn tcp_quic_with(
    shared: &Shared,
    mut tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    side: Side,
    buf: &mut TcpBuf,
    limiter: Option<&CircuitLimiter>,
    starting: Held<'_>,
) -> Spliced {
    shared.metrics.streams_active.fetch_add(1, Relaxed);
    drop(starting);
    shared.metrics.streams_total.fetch_add(1, Relaxed);
    let activity = Activity::default();
    let watch = WriteWatch::default();
    // Set once QUIC -> TCP has ended ([`read_unless_stopped`]).
    let watch_stop = AtomicBool::new(false);
    // The far end stopped the client's bytes ([`Ended::Stopped`]); they are read and dropped
    // from then on ([`discard`]).
    let stopped = StoppedCode::default();
    // The TCP side refused a write ([`Delivered::Refused`]), counted when it happened.
    let mut refused = None;
    // The TCP side's FIN came while the QUIC -> TCP direction was still open.
    let mut tcp_eof_first = false;
    let (outcome, up_done, down_done) = {
        let (mut rd, mut wr) = tcp.split();
        let up = tcp_to_quic(
            shared,
            &mut rd,
            &mut send,
            buf,
            side,
            limiter.map(|l| &l.up),
            &activity,
            &watch_stop,
            &stopped,
        );
        let down = quic_to_tcp(
            shared,
            &mut recv,
            &mut wr,
            side,
            limiter.map(|l| &l.down),
            &activity,
            &watch,
        );
        // One timer per connection, ticking at most every half of the idle and the write-stall
        // timeouts (`ConnTimer::tick`; none when both are off).
        let (idle, stall) = (shared.idle_timeout, shared.write_stall_timeout);
        let sleep = ConnTimer::tick(idle, stall).map(tokio::time::sleep);
        tokio::pin!(up, down, sleep);
        let mut timer = ConnTimer::new(sleep.as_pin_mut(), idle, stall, &activity, &watch);
        let (mut up_done, mut down_done) = (false, false);
        let outcome = loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(end) => {
                        up_done = true;
                        tcp_eof_first = end == Ended::Eof && !down_done;
                    }
                    Err(a) => break Err(a),
                },
                r = &mut down, if !down_done => match r {
                    Ok(end) => {
                        down_done = true;
                        // Bytes that are only dropped hold nothing up: the rest of them are
                        // read by the lingering close.
                        up_done |= stopped.get().is_some();
                        watch_stop.store(true, Relaxed);
                        if let Delivered::Refused(code) = end {
                            // Counted now: the other direction may take long to end.
                            shared.metrics.error(code);
                            refused = Some(code);
                        }
                    }
                    Err(a) => break Err(a),
                },
                code = &mut timer, if timer.sleep.is_some() => {
                    tracing::debug!(node = %shared.node, ?side, %code, idle = ?idle, stall = ?stall, "connection reset by its timer");
                    break Err(Abort(code));
                }
            }
            if up_done && down_done {
                break Ok(());
            }
        };
        (outcome, up_done, down_done)
    };
    let stopped = stopped.get();
    let aborted = match outcome {
        Err(Abort(code)) => Some(code),
        Ok(()) => None,
    };
    // A stop that no write met (the TCP side's bytes were all out, its FIN read, before the
    // stop came; or an edge's attempt met it before the answer, and the client's FIN came
    // before its next bytes): counted all the same, so that the count does not follow the
    // order in which the two ends' last packets came.
    let unmet = match (stopped, outcome) {
        (None, Ok(())) => stop_arrived(&send),
        _ => None,
    };
    // A far end's stop and reset with the same code count once: a site that lost its backend
    // both stops the upload and resets the answer.
    if let Some(code) = stopped.or(unmet)
        && !matches!(outcome, Err(Abort(c)) if c == code)
    {
        shared.metrics.error(code);
    }
    // A direction that ended cleanly keeps its end: a finished stream is delivered whole (a
    // reset would drop what it still buffers: the answer of a backend that closed early), and a
    // TCP side that was sent everything and a FIN is closed, not reset (an RST drops what its
    // send buffer still holds), after a lingering close ([`linger`]) when its bytes were not all
    // taken. A TCP side that refused a write is past saving: it is closed at once.
    let lingering = match outcome {
        Err(Abort(code)) => {
            if refused != Some(code) {
                shared.metrics.error(code);
            }
            if !up_done {
                let _ = send.reset(code.varint());
            }
            if !down_done {
                let _ = recv.stop(code.varint());
                reset_tcp(&tcp);
                None
            } else {
                // Not after this side's own read error either: the socket is dead.
                (refused.is_none() && code != side.tcp_abort_code()).then_some(tcp)
            }
        }
        Ok(()) => stopped.filter(|_| refused.is_none()).map(|_| tcp),
    };
    // Counted as lingering before it stops counting as active (the release pairs with the
    // drain's acquire): a drain waits for lingering sockets too.
    let _lingering = lingering
        .is_some()
        .then(|| Held::count(&shared.metrics.lingering));
    shared
        .metrics
        .streams_active
        .fetch_sub(1, std::sync::atomic::Ordering::Release);
    drop((send, recv));
    if let Some(tcp) = lingering {
        Box::pin(linger(shared, tcp)).await;
    }
    Spliced {
        aborted,
        tcp_sent: buf.read_any(),
        tcp_closed_first: tcp_eof_first || refused.is_some(),
    }
}

/// The code the far end stopped `send` with, if its stop has come: looked at once, not waited
/// for. (After `finish`, quinn drops what it keeps for the look once the peer has acknowledged
/// the stream's end, or stopped it.)
fn stop_arrived(send: &SendStream) -> Option<Code> {
    let stopped = std::pin::pin!(send.stopped());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match stopped.poll(&mut cx) {
        std::task::Poll::Ready(Ok(Some(code))) => Some(Code::from_peer(code)),
        _ => None,
    }
}

/// The code a far end stopped a direction's stream with, if it did ([`tcp_quic_with`]: set by
/// that direction, read by the other and at the end; the future must be `Send`).
pub(crate) struct StoppedCode(std::sync::atomic::AtomicU32);

impl Default for StoppedCode {
    fn default() -> Self {
        StoppedCode(std::sync::atomic::AtomicU32::new(u32::MAX))
    }
}

impl StoppedCode {
    fn set(&self, code: Code) {
        self.0.store(code as u32, Relaxed);
    }
    fn get(&self) -> Option<Code> {
        match self.0.load(Relaxed) {
            u32::MAX => None,
            c => Code::from_u64(c.into()),
        }
    }
}

/// Reads and drops what the TCP side sends after the far end stopped its bytes
/// ([`Ended::Stopped`]: a backend that answered early and closed), until its EOF or an error,
/// [`DISCARD_MAX`] or a revoked circuit, or until the answer has gone out whole (the caller then
/// stops polling it and lingers). A client that sends its whole request before it reads the
/// answer, as most do, would otherwise wait on its upload while the edge waits on it to read
/// the answer, until the write-stall timeout reset both (nginx discards the body of a request it
/// answered early the same way). The bytes do not cross the fabric, so a circuit's bucket is not
/// charged for them (paced at a slow circuit's rate, a large upload outlasted the write-stall
/// timeout); a circuit revoked meanwhile ends it with [`crate::ratelimit::Revoked`]. The bytes
/// are counted in `counter` and mark no activity: the idle and write-stall timeouts are about
/// the answer (as nginx's `send_timeout` is), so a client whose upload outlasts the write-stall
/// timeout while it reads nothing is still reset.
async fn discard(
    counter: &AtomicU64,
    rd: &mut (impl AsyncRead + Unpin),
    bucket: Option<&TokenBucket>,
) -> Result<(), crate::ratelimit::Revoked> {
    let mut scratch = vec![0u8; 16 << 10];
    let mut fair = Fairness::default();
    let read_and_drop = async {
        loop {
            match rd.read(&mut scratch).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => {
                    counter.fetch_add(n as u64, Relaxed);
                    if bucket.is_some_and(TokenBucket::is_revoked) {
                        return Err(crate::ratelimit::Revoked);
                    }
                    fair.moved(n).await;
                }
            }
        }
    };
    tokio::time::timeout(DISCARD_MAX, read_and_drop)
        .await
        .unwrap_or(Ok(()))
}

/// The longest the TCP side's bytes are read and dropped while the answer goes out
/// ([`discard`]); then the sender is held back again (and, once the answer is out, lingered on).
const DISCARD_MAX: Duration = Duration::from_secs(60);

/// A lingering close ([`linger`]) gives up once the client has for this long neither acknowledged
/// more of the answer nor sent a byte (nginx's `lingering_timeout`, 5 s).
const LINGER_STALL: Duration = Duration::from_secs(10);
/// The longest a lingering close lasts, however steadily the client takes the answer (nginx's
/// `lingering_time`, 30 s).
const LINGER_MAX: Duration = Duration::from_secs(60);
/// How long a lingering close still reads, once the client has acknowledged the whole answer,
/// for the client to close: an RST then drops nothing of the answer, but a client still
/// uploading would see it at once.
const LINGER_GRACE: Duration = Duration::from_secs(2);
/// How often a lingering close looks at what the client has not yet acknowledged: every 20 ms
/// while that shrinks, backing off, doubling, to every 500 ms while it does not.
const LINGER_TICK: Duration = Duration::from_millis(20);
const LINGER_TICK_MAX: Duration = Duration::from_millis(500);

/// Closes a TCP socket whose answer (and FIN) went out whole but whose client bytes were no
/// longer taken (the far end stopped them), without losing the answer. Closed with unread bytes,
/// a socket sends an RST at once and throws away what its send buffer still holds: the tail of
/// the answer. So this reads and drops what the client still sends, with no cap on the bytes,
/// while it waits until the client has acknowledged everything sent, FIN included (the send
/// queue, `SIOCOUTQ`, is empty), and then up to [`LINGER_GRACE`] for the client to close. It
/// ends at once when the client closes (nothing is then left unread: the kernel sends the rest
/// of the answer after the close) or resets. It gives
/// up on a client that neither acknowledges nor sends anything for [`LINGER_STALL`], after
/// [`LINGER_MAX`] in all, and at once on a socket error (a client's RST: nothing left to save).
async fn linger(shared: &Shared, mut tcp: TcpStream) {
    use tokio::time::Instant;
    let started = Instant::now();
    let mut scratch = vec![0u8; 16 << 10];
    let mut period = LINGER_TICK;
    let tick = tokio::time::sleep(period);
    tokio::pin!(tick);
    let (mut outq, mut progress, mut acked_at) = (u32::MAX, started, None);
    loop {
        tokio::select! {
            r = tcp.read(&mut scratch) => match r {
                // The client closed: with nothing left unread the close sends no RST, and the
                // kernel goes on sending what the client has not yet acknowledged. Or an error
                // (the client's RST): nothing left to save.
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    shared.metrics.bytes_discarded.fetch_add(n as u64, Relaxed);
                    progress = Instant::now();
                }
            },
            () = &mut tick => {
                let now = Instant::now();
                let Some(q) = unacked(&tcp) else { return };
                if q < outq {
                    (outq, progress, period) = (q, now, LINGER_TICK);
                } else {
                    period = (period * 2).min(LINGER_TICK_MAX);
                }
                if q == 0 && now - *acked_at.get_or_insert(now) >= LINGER_GRACE {
                    return;
                }
                if now - progress >= LINGER_STALL || now - started >= LINGER_MAX {
                    return;
                }
                tick.as_mut().reset(now + period);
            }
        }
    }
}

/// Bytes sent on `tcp` that its peer has not acknowledged, a FIN counting as one (`SIOCOUTQ`);
/// `None` when the kernel does not say.
#[cfg(target_os = "linux")]
fn unacked(tcp: &TcpStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: `SIOCOUTQ` (`TIOCOUTQ` on Linux) writes one `c_int` through the pointer, which
    // points at `n`; the descriptor is a TCP socket that `tcp` keeps open.
    let r = unsafe { libc::ioctl(tcp.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    (r == 0).then(|| u32::try_from(n).ok()).flatten()
}

/// Elsewhere the send queue is not known: a lingering close waits out [`LINGER_GRACE`].
#[cfg(not(target_os = "linux"))]
fn unacked(_tcp: &TcpStream) -> Option<u32> {
    Some(0)
}

/// How long a stream waits for its next hop's connection to have a stream to give (the streams
/// open on it at the next hop's grant, `RouterConfig::peer_streams`) before it is moved on
/// ([`Unopened::NoStream`], `stream_limit`). A stream is opened at once while the connection has
/// one to give; at the limit one frees up whenever a stream ends (the next hop's grant comes
/// back within a round trip).
pub const STREAM_GRANT_WAIT: Duration = Duration::from_millis(500);

/// Why [`open_next_hop`] did not hand a stream on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unopened {
    /// The next hop's connection had no stream to give for [`STREAM_GRANT_WAIT`] (or until the
    /// deadline, when that came first).
    NoStream,
    /// The deadline passed, the next hop was declared down, or its connection failed.
    NotTaken,
}

/// Opens a stream on the next hop `conn` and writes `chunks` (the header, and an edge's replay) to
/// it, giving up at `deadline` or when `down` (the next hop's down verdict) fires: a next hop that
/// answers probes but grants no flow-control window would otherwise hold the stream forever, and
/// one whose connection has no stream to give for [`STREAM_GRANT_WAIT`] (it waited until the
/// deadline, which at a transit blamed the link to a site that was only busy). A stream opened but
/// not written is reset with `next_hop_unreachable`.
pub(crate) async fn open_next_hop(
    conn: &quinn::Connection,
    chunks: &mut [Bytes],
    mut deadline: std::pin::Pin<&mut tokio::time::Sleep>,
    mut down: std::pin::Pin<&mut impl std::future::Future>,
) -> Result<(SendStream, RecvStream), Unopened> {
    let grant = tokio::time::sleep(STREAM_GRANT_WAIT);
    tokio::pin!(grant);
    // Biased: a stream the connection has to give is taken at the first poll, before the grant's
    // timer is polled (and registered).
    let (mut send, mut recv) = tokio::select! {
        biased;
        r = conn.open_bi() => r.map_err(|_| Unopened::NotTaken)?,
        _ = &mut down => return Err(Unopened::NotTaken),
        // Waiting here means the connection has no stream to give, whichever bound ends it.
        _ = &mut deadline => return Err(Unopened::NoStream),
        _ = &mut grant => return Err(Unopened::NoStream),
    };
    let written = tokio::select! {
        r = send.write_all_chunks(chunks) => r.is_ok(),
        _ = &mut deadline => false,
        _ = &mut down => false,
    };
    if !written {
        let code = Code::NextHopUnreachable;
        let _ = send.reset(code.varint());
        let _ = recv.stop(code.varint());
        return Err(Unopened::NotTaken);
    }
    Ok((send, recv))
}

/// The most a transit gathers into one block before handing it on (see [`pump`]).
pub const RELAY_BLOCK: usize = 512 * 1024;

/// Takes what `recv` has ready now (up to `bufs.len()` chunks) without waiting; `None` if nothing.
/// `read_chunks` is cancel-safe, and polling it here registers this task's own waker.
async fn ready_chunks(
    recv: &mut RecvStream,
    bufs: &mut [Bytes],
) -> Option<Result<Option<usize>, ReadError>> {
    tokio::select! {
        biased;
        r = recv.read_chunks(bufs) => Some(r),
        _ = std::future::ready(()) => None,
    }
}

/// What one [`gather`] took from a stream: the bytes ready, and how the stream went on.
struct Gathered {
    block: Bytes,
    fin: bool,
    failed: Option<ReadError>,
}

/// A transit pump's buffers, reused for the life of the stream.
#[derive(Default)]
struct Gather {
    bufs: [Bytes; IOV],
    /// quinn's chunks taken for the next block (references, not copies).
    held: Vec<Bytes>,
}

/// Waits for data on `recv`, then takes everything ready now (up to about [`RELAY_BLOCK`]) as
/// one block: a lone chunk is handed on as it is; several are copied once into a block of
/// exactly their size. "About": the last `read_chunks` can pass the mark by up to 16 chunks,
/// and quinn merges the contiguous chunks of a stream with more than 2,048 unread (a next hop
/// that holds it back), so a chunk can be up to a stream window. Bounding each read
/// (`read_chunk` with a length) would settle flow control once per packet, which cost ~13 %
/// more CPU per GiB on the edge's path (ARCHITECTURE).
async fn gather(recv: &mut RecvStream, g: &mut Gather) -> Gathered {
    let mut r = recv.read_chunks(&mut g.bufs).await;
    let (mut total, mut fin, mut failed) = (0, false, None);
    loop {
        match r {
            Ok(Some(k)) => {
                for b in &mut g.bufs[..k] {
                    total += b.len();
                    g.held.push(std::mem::take(b));
                }
            }
            Ok(None) => fin = true,
            Err(e) => failed = Some(e),
        }
        if fin || failed.is_some() || total >= RELAY_BLOCK {
            break;
        }
        match ready_chunks(recv, &mut g.bufs).await {
            Some(next) => r = next,
            None => break,
        }
    }
    let block = if g.held.len() == 1 {
        g.held.pop().unwrap_or_default()
    } else {
        let mut block = BytesMut::with_capacity(total);
        for b in g.held.drain(..) {
            block.extend_from_slice(&b);
        }
        block.freeze()
    };
    Gathered { block, fin, failed }
}

/// QUIC → QUIC, one direction (transit). Propagates FIN, resets and stops.
///
/// quinn hands out one chunk per received packet (unless it merged them: [`gather`]), and its send buffer keeps one segment per chunk
/// written, which it scans from the oldest unacknowledged one for every packet it sends
/// (`SendBuffer::get`). Forwarding packet-sized chunks as they came makes that scan quadratic in
/// the bytes in flight (a 32 MiB stream window holds ~23,000 segments of 1,452 bytes). So the
/// pump writes what is ready as one block ([`gather`]; one `memcpy` when it is several chunks):
/// under load many packets per segment, and an interactive exchange still goes out at once.
async fn pump(
    recv: &mut RecvStream,
    send: &mut SendStream,
    moved: &AtomicU64,
    watch_stop: &AtomicBool,
) {
    let mut g = Gather::default();
    // Watched for a stop from the start, as after its first bytes: a client that sends nothing
    // after its header (a server-speaks-first backend) held the relay, and the edge its client,
    // after the site had given up, until a byte came to write.
    let mut tick = None;
    let first = {
        let next = std::pin::pin!(gather(recv, &mut g));
        read_unless_stopped(next, send, watch_stop, &mut tick).await
    };
    let first = match first {
        Ok(first) => first,
        Err(r) => {
            let _ = recv.stop(given_up(r));
            return;
        }
    };
    pump_from(recv, send, g, first, moved, watch_stop).await;
}

/// [`pump`], with its first block already gathered. Counts what it forwards in `moved`. Once
/// `watch_stop` is set (the other direction has ended), a stop of `send` from the far end (or
/// the loss of its connection) seen while it waits is passed on as a stop of `recv` with its
/// code ([`read_unless_stopped`]).
async fn pump_from(
    recv: &mut RecvStream,
    send: &mut SendStream,
    mut g: Gather,
    mut got: Gathered,
    moved: &AtomicU64,
    watch_stop: &AtomicBool,
) {
    let mut fair = Fairness::default();
    let mut tick = None;
    loop {
        let Gathered { block, fin, failed } = got;
        let n = block.len();
        if n > 0 {
            // Written in parts, as quinn takes them: a block cut by a stop or a lost connection
            // counts the part quinn took (counted only whole, such a part went uncounted).
            let mut rest = [block];
            while !rest[0].is_empty() {
                if let Err(e) = send.write_chunks(&mut rest).await {
                    moved.fetch_add((n - rest[0].len()) as u64, Relaxed);
                    let _ = recv.stop(write_error_varint(&e));
                    return;
                }
            }
            moved.fetch_add(n as u64, Relaxed);
            fair.moved(n).await;
        }
        if let Some(e) = failed {
            let _ = send.reset(read_error_varint(&e));
            return;
        }
        if fin {
            let _ = send.finish();
            return;
        }
        let next = {
            let next = std::pin::pin!(gather(recv, &mut g));
            read_unless_stopped(next, send, watch_stop, &mut tick).await
        };
        got = match next {
            Ok(got) => got,
            Err(r) => {
                let _ = recv.stop(given_up(r));
                return;
            }
        };
    }
}

/// Relays a stream between an upstream and a downstream neighbour (transit).
///
/// Until the downstream answers (its first bytes, FIN or reset), `next_hop_down` is watched as
/// well (and, once the upstream direction has ended, a stop from the upstream, as after it): if the next hop is declared down first, all four halves are reset with
/// [`Code::NextHopUnreachable`], which the edge retries on its next candidate, as it does when
/// its own first hop goes down. Without the watch such a first try would wait for the dead
/// connection to close (`neighbours::DEAD_AFTER`). Once the downstream has answered, a down
/// verdict no longer touches the stream: it ends with its connection. Once one direction has
/// ended, a stop of the other's sending end (or the loss of its connection) is passed to its
/// receiving end as a stop with the same code ([`pump_from`]), so that both ends let go (the
/// site its backend connection and capacity slot) without waiting for a byte to write. Returns
/// the code it reset with when it gave up. Bytes forwarded either way are added to `moved`.
pub(crate) async fn relay(
    mut up_send: SendStream,
    mut up_recv: RecvStream,
    mut down_send: SendStream,
    mut down_recv: RecvStream,
    next_hop_down: impl std::future::Future<Output = ()>,
    moved: &AtomicU64,
) -> Option<Code> {
    // Each set once the other direction has ended ([`pump_from`]).
    let (up_watch, down_watch) = (AtomicBool::new(false), AtomicBool::new(false));
    let gave_up = {
        let up = pump(&mut up_recv, &mut down_send, moved, &up_watch);
        let down = async {
            let mut g = Gather::default();
            // Before the downstream's first bytes as after them: once the upstream direction
            // has ended, a stop from the upstream (an edge that gave up waiting for the answer)
            // ends this one, which would otherwise wait on a downstream that never answers.
            let mut tick = None;
            let first = {
                let read = std::pin::pin!(gather(&mut down_recv, &mut g));
                let read = read_unless_stopped(read, &mut up_send, &down_watch, &mut tick);
                tokio::select! {
                    // An answer already there wins over a down verdict in the same poll: the
                    // site's backend has the request, which a retry would send to another.
                    biased;
                    got = read => got,
                    () = next_hop_down => return true,
                }
            };
            match first {
                Ok(first) => {
                    pump_from(&mut down_recv, &mut up_send, g, first, moved, &down_watch).await
                }
                Err(r) => {
                    let _ = down_recv.stop(given_up(r));
                }
            }
            false
        };
        tokio::pin!(up, down);
        // Both directions run to their end, unless the downstream gave up first.
        tokio::select! {
            () = &mut up => {
                down_watch.store(true, Relaxed);
                down.await
            }
            gave_up = &mut down => {
                if !gave_up {
                    up_watch.store(true, Relaxed);
                    up.await;
                }
                gave_up
            }
        }
    };
    if !gave_up {
        return None;
    }
    let code = Code::NextHopUnreachable;
    let _ = up_send.reset(code.varint());
    let _ = up_recv.stop(code.varint());
    let _ = down_send.reset(code.varint());
    let _ = down_recv.stop(code.varint());
    Some(code)
}

/// The size of the future `make` would return, without calling it (tests: the memory each open
/// connection's task keeps).
#[cfg(test)]
pub(crate) fn future_size<F: std::future::Future>(_make: impl FnOnce() -> F) -> usize {
    std::mem::size_of::<F>()
}

/// Prints a per-connection future's size and fails if it outgrew `budget`: every open connection
/// keeps one (docs/benchmarks.md, memory per connection). The budgets leave room for compiler
/// changes, not for a buffer moved into the future.
#[cfg(test)]
pub(crate) fn assert_future_within(what: &str, size: usize, budget: usize) {
    println!("{what} future: {size} bytes");
    assert!(
        size <= budget,
        "{what} future is {size} bytes, over its {budget}-byte budget"
    );
}

/// A value of any type, for [`future_size`]'s never-called closures.
#[cfg(test)]
pub(crate) fn never<T>() -> T {
    unreachable!("only named, never called")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn splice_future_size() {
        let n = future_size(|| {
            tcp_quic_with(
                never(),
                never(),
                never(),
                never(),
                Side::Edge,
                never(),
                None,
                never(),
            )
        });
        assert_future_within("tcp_quic_with", n, 2048);
    }

    /// A batch written to a slow but steady reader counts as activity at each partial write,
    /// not only once whole: a batch of a merged chunk (up to a stream window) to a reader of 8
    /// KB/s took longer than the idle timeout, and the connection was cut as idle meanwhile.
    #[tokio::test]
    async fn each_partial_write_of_a_batch_counts_as_activity() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let mut chunks = vec![Bytes::from(vec![7u8; 64 * 1024])];
        let (watch, activity) = (WriteWatch::default(), Activity::default());
        watch.waiting(true);
        let mut write = Box::pin(write_all_chunks(&mut a, &mut chunks, &watch, &activity));
        let mut buf = vec![0u8; 1024];
        for round in 0..8 {
            // The write goes as far as the pipe takes, then waits for the reader.
            assert!(
                futures_poll_once(write.as_mut()).is_none(),
                "the batch was written whole by round {round}"
            );
            assert!(
                activity.take(),
                "round {round}: no activity for a partial write"
            );
            b.read_exact(&mut buf).await.unwrap();
        }
    }

    /// Polls `f` once: its output, if it is ready.
    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        match f.poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn vectored_writes_deliver_every_chunk_in_order_across_partial_writes() {
        // A 7-byte pipe: every write is partial, often mid-chunk.
        let (mut a, mut b) = tokio::io::duplex(7);
        let data: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut at = 0;
        for (i, len) in [1usize, 0, 13, 70, 2, 100, 0, 128]
            .iter()
            .cycle()
            .enumerate()
        {
            if at >= data.len() || i > 100 {
                break;
            }
            let end = (at + len).min(data.len());
            chunks.push(Bytes::copy_from_slice(&data[at..end]));
            at = end;
        }
        assert!(chunks.len() > IOV, "more chunks than one writev takes");
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.map(|_| got)
        });
        let watch = WriteWatch::default();
        watch.waiting(true);
        write_all_chunks(&mut a, &mut chunks, &watch, &Activity::default())
            .await
            .unwrap();
        assert!(
            chunks.iter().all(Bytes::is_empty),
            "written chunks are released"
        );
        assert!(!watch.stalled(), "the writes were told to the watch");
        drop(a);
        assert_eq!(reader.await.unwrap().unwrap(), data);
    }

    /// Two endpoints with the fabric's TLS and transport, and one connection between them.
    pub(crate) async fn quic_pair() -> (quinn::Connection, quinn::Connection, tempfile::TempDir) {
        quic_pair_with(crate::transport::Windows::default()).await
    }

    /// [`quic_pair`], both ends granting the receive windows `w`, and taking at most
    /// `w.connection` bytes ahead of what the peer acknowledged (quinn's send window: a write
    /// past it waits, so one can be cut part-way).
    async fn quic_pair_with(
        w: crate::transport::Windows,
    ) -> (quinn::Connection, quinn::Connection, tempfile::TempDir) {
        use crate::tls::{PeerNames, TlsIdentity};
        let dir = tempfile::tempdir().unwrap();
        crate::pki::init(dir.path()).unwrap();
        let peers = PeerNames::new(["a".to_string(), "b".to_string()]);
        let mut eps = Vec::new();
        for name in ["a", "b"] {
            crate::pki::issue(dir.path(), name).unwrap();
            let id = TlsIdentity::load(dir.path(), name).unwrap();
            let mut t = crate::transport::transport_config_with(w);
            t.send_window(u64::from(w.connection));
            let t = std::sync::Arc::new(t);
            let server = crate::tls::server_config(&id, &peers, t.clone()).unwrap();
            let client = crate::tls::client_config(&id, &peers, t).unwrap();
            let addr = "127.0.0.1:0".parse().unwrap();
            eps.push(crate::transport::endpoint(addr, server, client).unwrap());
        }
        let b_addr = eps[1].local_addr().unwrap();
        let (a, b) = tokio::join!(
            async { eps[0].connect(b_addr, "b").unwrap().await.unwrap() },
            async { eps[1].accept().await.unwrap().await.unwrap() }
        );
        (a, b, dir)
    }

    #[tokio::test]
    async fn transit_gathers_what_is_ready_into_blocks_not_one_write_per_packet() {
        const TOTAL: usize = 4 << 20;
        let (a, b, _dir) = quic_pair().await;
        let data: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 251) as u8).collect();
        let (mut send, _keep) = a.open_bi().await.unwrap();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        let (_reply, mut recv) = b.accept_bi().await.unwrap();
        // Wait (generous deadline) until most of it has arrived, as under a bulk transfer.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while b.stats().udp_rx.bytes < (TOTAL as u64) * 9 / 10 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "data did not arrive"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut gathering = Gather::default();
        let (mut got, mut writes) = (Vec::new(), 0);
        loop {
            let g = gather(&mut recv, &mut gathering).await;
            assert!(g.failed.is_none());
            if !g.block.is_empty() {
                writes += 1;
                got.extend_from_slice(&g.block);
            }
            if g.fin {
                break;
            }
        }
        assert!(got == data, "bytes relayed intact and in order");
        let packets = b.stats().udp_rx.datagrams as usize;
        assert!(
            writes * 20 < packets,
            "{writes} writes for {packets} packets: the transit must not write one segment per packet"
        );
    }

    /// A rate-limited read takes at most `ratelimit::CHUNK` bytes, also from a stream whose
    /// reader fell behind, whose chunks quinn has merged (more than 2,048 unread): the one
    /// chunk a limited read took could be megabytes, written at line rate in one burst.
    #[tokio::test]
    async fn a_rate_limited_read_takes_at_most_a_chunk_of_a_merged_stream() {
        const TOTAL: usize = 24 << 20;
        let (a, b, _dir) = quic_pair().await;
        let data: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 251) as u8).collect();
        let (mut send, _keep) = a.open_bi().await.unwrap();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        let (_reply, mut recv) = b.accept_bi().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while b.stats().udp_rx.bytes < TOTAL as u64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "data did not arrive"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut bufs: [Bytes; IOV] = Default::default();
        let (mut got, mut largest) = (Vec::new(), 0);
        while let Some(k) = read_batch(&mut recv, &mut bufs, true).await.unwrap() {
            let n: usize = bufs[..k].iter().map(Bytes::len).sum();
            largest = largest.max(n);
            for b in &mut bufs[..k] {
                got.extend_from_slice(&std::mem::take(b));
            }
        }
        assert!(got == data, "bytes intact and in order");
        assert!(
            largest <= crate::ratelimit::CHUNK,
            "a limited read took {largest} bytes"
        );
    }

    /// A transit's relay between these streams, its next hop never declared down, and its
    /// count of bytes moved.
    fn spawn_relay(
        up_send: SendStream,
        up_recv: RecvStream,
        down_send: SendStream,
        down_recv: RecvStream,
    ) -> (tokio::task::JoinHandle<Option<Code>>, &'static AtomicU64) {
        spawn_relay_until(
            up_send,
            up_recv,
            down_send,
            down_recv,
            std::future::pending(),
        )
    }

    /// [`spawn_relay`], its next hop declared down when `next_hop_down` ends.
    fn spawn_relay_until(
        up_send: SendStream,
        up_recv: RecvStream,
        down_send: SendStream,
        down_recv: RecvStream,
        next_hop_down: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> (tokio::task::JoinHandle<Option<Code>>, &'static AtomicU64) {
        let moved: &'static AtomicU64 = Box::leak(Box::default());
        let relay = tokio::spawn(relay(
            up_send,
            up_recv,
            down_send,
            down_recv,
            next_hop_down,
            moved,
        ));
        (relay, moved)
    }

    /// A block the site stops part-way counts the part quinn took. (Counted only when written
    /// whole, the cut block's part went uncounted: up to a block per stopped stream.) The block
    /// is the edge's whole megabyte, there before the relay starts, so the transit's first write
    /// is the one cut: a send window of 256 KiB takes part of it, then the site stops.
    #[tokio::test]
    async fn a_block_cut_by_a_stop_counts_what_went() {
        const WINDOW: u32 = 64 * 1024;
        let (edge, t_up, _d1) = quic_pair().await;
        let small = crate::transport::Windows {
            stream: WINDOW,
            connection: 4 * WINDOW,
        };
        let (t_down, site, _d2) = quic_pair_with(small).await;
        let (mut e_send, _e_recv) = edge.open_bi().await.unwrap();
        let data = vec![7u8; 1 << 20];
        e_send.write_all(&data).await.unwrap();
        let (up_send, up_recv) = t_up.accept_bi().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while t_up.stats().udp_rx.bytes < data.len() as u64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the megabyte never came"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (down_send, down_recv) = t_down.open_bi().await.unwrap();
        let (relay, moved) = spawn_relay(up_send, up_recv, down_send, down_recv);
        let (mut s_send, mut s_recv) = site.accept_bi().await.unwrap();
        let mut b = [0u8; 1];
        s_recv.read_exact(&mut b).await.unwrap();
        s_recv.stop(Code::BackendAbort.varint()).unwrap();
        s_send.finish().unwrap();
        tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the relay outlived the stop and the finish")
            .unwrap();
        let moved = moved.load(Relaxed);
        assert!(
            moved >= u64::from(WINDOW) && moved < data.len() as u64,
            "the transit counted {moved} bytes of {}",
            data.len()
        );
    }

    /// A transit has no idle timer: its relay ends when the edge or the site resets the stream
    /// (the reset goes on to the other end, whose splice then resets its own halves, as every
    /// abort does).
    #[tokio::test]
    async fn a_transit_relay_ends_when_either_end_resets() {
        // A code this build does not know (a newer router's) crosses as it is: a relay only
        // hands it on. (It became `internal`, which an edge does not retry.)
        for (code, edge_resets) in [
            (Code::IdleTimeout.varint(), true),
            (Code::IdleTimeout.varint(), false),
            (quinn::VarInt::from_u32(0x7f), true),
            (quinn::VarInt::from_u32(0x7f), false),
        ] {
            let (edge, t_up, _d1) = quic_pair().await;
            let (t_down, site, _d2) = quic_pair().await;
            let (mut e_send, mut e_recv) = edge.open_bi().await.unwrap();
            e_send.write_all(b"q").await.unwrap();
            let (up_send, up_recv) = t_up.accept_bi().await.unwrap();
            let (down_send, down_recv) = t_down.open_bi().await.unwrap();
            let (relay, moved) = spawn_relay(up_send, up_recv, down_send, down_recv);
            let (mut s_send, mut s_recv) = site.accept_bi().await.unwrap();
            let mut b = [0u8; 1];
            s_recv.read_exact(&mut b).await.unwrap();
            s_send.write_all(b"a").await.unwrap();
            e_recv.read_exact(&mut b).await.unwrap();
            // One end resets both halves; the other sees the reset and does the same.
            let (mut first, mut other) = if edge_resets {
                ((e_send, e_recv), (s_send, s_recv))
            } else {
                ((s_send, s_recv), (e_send, e_recv))
            };
            first.0.reset(code).unwrap();
            first.1.stop(code).unwrap();
            let seen = tokio::time::timeout(Duration::from_secs(5), other.1.read(&mut b))
                .await
                .expect("the reset did not cross the transit");
            assert!(
                matches!(seen, Err(ReadError::Reset(c)) if c == code),
                "{seen:?}"
            );
            other.0.reset(code).unwrap();
            let _ = other.1.stop(code);
            let gave_up = tokio::time::timeout(Duration::from_secs(5), relay)
                .await
                .expect("the relay outlived both ends' resets")
                .unwrap();
            assert_eq!(gave_up, None);
            assert_eq!(moved.load(Relaxed), 2, "one byte each way was forwarded");
        }
    }

    /// An answer already at the transit when its next hop's down verdict comes, in the same
    /// poll, wins: the stream is relayed, not reset. (The two were picked at random: half the
    /// time the edge was told `next_hop_unreachable` and sent the request, which the site's
    /// backend had, to another site.)
    #[tokio::test]
    async fn an_answer_already_there_wins_over_a_down_verdict() {
        for _ in 0..16 {
            let (edge, t_up, _d1) = quic_pair().await;
            let (t_down, site, _d2) = quic_pair().await;
            let (mut e_send, mut e_recv) = edge.open_bi().await.unwrap();
            e_send.write_all(b"q").await.unwrap();
            let (up_send, up_recv) = t_up.accept_bi().await.unwrap();
            let (mut down_send, down_recv) = t_down.open_bi().await.unwrap();
            down_send.write_all(b"h").await.unwrap();
            let (mut s_send, mut s_recv) = site.accept_bi().await.unwrap();
            let mut b = [0u8; 1];
            s_recv.read_exact(&mut b).await.unwrap();
            s_send.write_all(b"ok").await.unwrap();
            // The answer is at the transit before its relay starts.
            tokio::time::timeout(Duration::from_secs(5), async {
                while t_down.stats().frame_rx.stream == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
            .await
            .expect("the answer never reached the transit");
            let (relay, _) = spawn_relay_until(
                up_send,
                up_recv,
                down_send,
                down_recv,
                std::future::ready(()),
            );
            let mut answer = [0u8; 2];
            let got = tokio::time::timeout(Duration::from_secs(5), e_recv.read_exact(&mut answer))
                .await
                .expect("the answer did not cross the transit");
            assert!(got.is_ok() && &answer == b"ok", "{got:?}");
            e_send.finish().unwrap();
            s_send.finish().unwrap();
            let gave_up = tokio::time::timeout(Duration::from_secs(5), relay)
                .await
                .expect("the relay outlived both ends")
                .unwrap();
            assert_eq!(gave_up, None);
        }
    }

    /// An edge that gives up on a stream before the site has answered (its reply deadline, its
    /// client gone) ends the transit's relay, even when the site never answers nor lets go: the
    /// relay held the stream (and a slot of the edge's connection's stream limit) until the
    /// site's connection closed.
    #[tokio::test]
    async fn a_transit_relay_ends_when_the_edge_gives_up_before_the_site_answers() {
        let code = Code::UpstreamLost;
        let (edge, t_up, _d1) = quic_pair().await;
        let (t_down, site, _d2) = quic_pair().await;
        let (mut e_send, mut e_recv) = edge.open_bi().await.unwrap();
        e_send.write_all(b"q").await.unwrap();
        let (up_send, up_recv) = t_up.accept_bi().await.unwrap();
        let (down_send, down_recv) = t_down.open_bi().await.unwrap();
        let (relay, _) = spawn_relay(up_send, up_recv, down_send, down_recv);
        // The site takes the stream and the byte, and then neither answers nor lets go.
        let (s_send, mut s_recv) = site.accept_bi().await.unwrap();
        let mut b = [0u8; 1];
        s_recv.read_exact(&mut b).await.unwrap();
        e_send.reset(code.varint()).unwrap();
        e_recv.stop(code.varint()).unwrap();
        let gave_up = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the relay outlived the edge giving up")
            .unwrap();
        assert_eq!(gave_up, None);
        // And the site is told: its half towards the transit is stopped.
        let seen = tokio::time::timeout(Duration::from_secs(5), s_send.stopped())
            .await
            .expect("the site's stream was not stopped");
        assert!(seen.is_ok(), "{seen:?}");
    }

    /// The site answers and ends its answer, then gives up on the upload (its idle timer) while
    /// the edge has sent nothing after its header (a server-speaks-first backend, a client that
    /// stays): the stop crosses the transit without waiting for a byte from the edge. (The
    /// upstream direction looked for a stop only after its first forwarded bytes: the relay,
    /// and the edge's client, were held until the edge sent one.)
    #[tokio::test]
    async fn a_stop_crosses_a_transit_before_the_edge_sends_a_byte() {
        let code = Code::IdleTimeout;
        let (edge, t_up, _d1) = quic_pair().await;
        let (t_down, site, _d2) = quic_pair().await;
        let (mut e_send, mut e_recv) = edge.open_bi().await.unwrap();
        e_send.write_all(b"q").await.unwrap();
        let (up_send, mut up_recv) = t_up.accept_bi().await.unwrap();
        // The header, read by the transit before the relay starts.
        let mut b = [0u8; 1];
        up_recv.read_exact(&mut b).await.unwrap();
        let (mut down_send, down_recv) = t_down.open_bi().await.unwrap();
        down_send.write_all(b"h").await.unwrap();
        let (relay, _) = spawn_relay(up_send, up_recv, down_send, down_recv);
        let (mut s_send, mut s_recv) = site.accept_bi().await.unwrap();
        s_recv.read_exact(&mut b).await.unwrap();
        s_send.write_all(b"a").await.unwrap();
        s_send.finish().unwrap();
        s_recv.stop(code.varint()).unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(n) = e_recv.read(&mut b).await.unwrap() {
                answer.extend_from_slice(&b[..n]);
            }
        })
        .await
        .expect("the answer did not end at the edge");
        assert_eq!(answer, b"a");
        let stopped = tokio::time::timeout(Duration::from_secs(10), e_send.stopped())
            .await
            .expect("the site's stop did not reach the edge");
        assert_eq!(stopped.unwrap(), Some(code.varint()));
        let gave_up = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the relay outlived both ends")
            .unwrap();
        assert_eq!(gave_up, None);
    }

    #[tokio::test]
    async fn tcp_buf_hands_out_what_was_read_and_grows_only_for_bulk() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut b, _) = l.accept().await.unwrap();
        let mut buf = TcpBuf::new();
        a.write_all(b"hello").await.unwrap();
        assert_eq!(&buf.read(&mut b, true).await.unwrap()[..], b"hello");
        assert_eq!(buf.want, TCP_BUF);
        assert!(
            !buf.holds_block(),
            "a read that drained the socket lets go of its block"
        );
        // Idle: waiting holds no block, and the wait ends with the next bytes.
        {
            let mut read = std::pin::pin!(buf.read(&mut b, true));
            let polled =
                std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
            assert!(polled.is_pending(), "nothing to read yet");
        }
        assert!(!buf.holds_block(), "no block while waiting");
        a.write_all(b"again").await.unwrap();
        assert_eq!(&buf.read(&mut b, true).await.unwrap()[..], b"again");
        assert_eq!(buf.pinned, 5, "a small chunk keeps no block alive");
        let big = vec![3u8; SMALL_READ + 1];
        a.write_all(&big).await.unwrap();
        let mut got = 0;
        while got < big.len() {
            got += buf.read(&mut b, true).await.unwrap().len();
        }
        assert!(
            buf.pinned <= 4 * (SMALL_READ + 1),
            "a larger chunk keeps at most 4 times its bytes: {}",
            buf.pinned
        );
        a.write_all(&vec![7u8; 4 * TCP_BUF]).await.unwrap();
        let mut total = 0;
        while total < 4 * TCP_BUF {
            total += buf.read(&mut b, true).await.unwrap().len();
        }
        assert!(buf.want > TCP_BUF, "a full read doubles the next one");
        // The bulk phase over (a small message, then quiet): the read that has to wait goes
        // back to the small buffer and holds no block (it held the grown block's tail, up to
        // 256 KiB, for as long as the connection lasted).
        a.write_all(b"done").await.unwrap();
        assert_eq!(&buf.read(&mut b, true).await.unwrap()[..], b"done");
        {
            let mut read = std::pin::pin!(buf.read(&mut b, true));
            let polled =
                std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
            assert!(polled.is_pending(), "nothing to read yet");
        }
        assert_eq!(buf.want, TCP_BUF, "a wait after bulk reads");
        assert!(
            !buf.holds_block(),
            "a block held across the wait after the bulk phase"
        );
        a.write_all(b"more").await.unwrap();
        assert_eq!(&buf.read(&mut b, true).await.unwrap()[..], b"more");
        drop(a);
        assert!(buf.read(&mut b, true).await.unwrap().is_empty(), "EOF");
    }

    /// Dropping the bytes of a stopped upload ([`discard`]) ends at the sender's EOF at once,
    /// after [`DISCARD_MAX`] with a sender that neither stops nor closes, and with `Revoked` at
    /// the next bytes of a circuit revoked meanwhile; every byte read is counted.
    #[tokio::test(start_paused = true)]
    async fn discarding_ends_at_eof_at_its_cap_or_on_a_revoked_circuit() {
        let counter = AtomicU64::new(0);
        let (mut client, mut edge) = tokio::io::duplex(64 << 10);
        client.write_all(&[7u8; 5000]).await.unwrap();
        let start = tokio::time::Instant::now();
        let ended = tokio::time::timeout(DISCARD_MAX * 2, discard(&counter, &mut edge, None));
        assert_eq!(
            ended.await,
            Ok(Ok(())),
            "a silent sender's bytes dropped with no end"
        );
        let took = start.elapsed();
        assert!(
            took >= DISCARD_MAX && took < DISCARD_MAX + Duration::from_secs(1),
            "a silent sender's bytes were dropped for {took:?}"
        );
        assert_eq!(counter.load(Relaxed), 5000);

        // A live circuit's rate does not pace them (they do not cross the fabric): 4 MiB at
        // 8 Mbit/s would take 4 s.
        let circuit = crate::ratelimit::CircuitLimiter::new(topology::Bandwidth::from_mbps(8));
        let (mut sender, mut rd) = tokio::io::duplex(64 << 10);
        let writer = tokio::spawn(async move {
            sender.write_all(&vec![1u8; 4 << 20]).await.unwrap();
        });
        let start = tokio::time::Instant::now();
        assert_eq!(discard(&counter, &mut rd, Some(&circuit.up)).await, Ok(()));
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "paced at the circuit's rate"
        );
        writer.await.unwrap();
        assert_eq!(counter.load(Relaxed), 5000 + (4 << 20));
        counter.store(5000, Relaxed);
        circuit.revoke();
        client.write_all(b"more").await.unwrap();
        let start = tokio::time::Instant::now();
        let ended = discard(&counter, &mut edge, Some(&circuit.up)).await;
        assert_eq!(ended, Err(crate::ratelimit::Revoked));
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(counter.load(Relaxed), 5004);

        client.write_all(b"last").await.unwrap();
        drop(client);
        let start = tokio::time::Instant::now();
        assert_eq!(discard(&counter, &mut edge, None).await, Ok(()));
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "EOF ends it at once"
        );
        assert_eq!(counter.load(Relaxed), 5008);
    }

    /// When [`ConnTimer`] ends a connection, in virtual time: `idle`, `stall`, whether a write
    /// waits from the start, and whether chunks keep moving (every second) so that only a stall
    /// can end it.
    async fn ends_after(
        idle: Option<Duration>,
        stall: Option<Duration>,
        waiting: bool,
        moving: bool,
    ) -> (Code, Duration) {
        let activity: &'static Activity = Box::leak(Box::default());
        let watch: &'static WriteWatch = Box::leak(Box::default());
        activity.mark();
        watch.waiting(waiting);
        if moving {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    activity.mark();
                }
            });
        }
        let start = tokio::time::Instant::now();
        let sleep = ConnTimer::tick(idle, stall).map(tokio::time::sleep);
        tokio::pin!(sleep);
        let timer = ConnTimer::new(sleep.as_pin_mut(), idle, stall, activity, watch);
        let code = timer.await;
        (code, start.elapsed())
    }

    /// The timer's bounds: idle ends between one and 1.5 idle timeouts after the last chunk, a
    /// stall between one and two stall timeouts after the write began, with either timeout the
    /// shorter, and with a stall timeout that does not divide the idle one. (With idle 50 s and
    /// stall 40 s the idle end came 80 s after the last chunk: the tick, 20 s, did not divide it.)
    #[tokio::test(start_paused = true)]
    async fn the_connection_timer_ends_within_its_bounds() {
        let s = Duration::from_secs;
        for (idle, stall) in [(50, 40), (10, 30), (3600, 30), (30, 30), (1, 3600)] {
            let (i, st) = (s(idle), s(stall));
            let (code, took) = ends_after(Some(i), Some(st), false, false).await;
            assert_eq!(code, Code::IdleTimeout, "({idle}, {stall})");
            assert!(
                took >= i && took <= i * 3 / 2,
                "({idle}, {stall}): idle after {took:?}"
            );
            if stall < 600 {
                let (code, took) = ends_after(Some(s(100_000)), Some(st), true, true).await;
                assert_eq!(code, Code::WriteStalled, "({idle}, {stall})");
                assert!(
                    took >= st && took <= st * 2,
                    "({idle}, {stall}): stalled after {took:?}"
                );
            }
        }
        // An idle timeout of "never" leaves the stall bound as it is (it was turned off: the
        // tick came to 136 years).
        assert!(ConnTimer::tick(Some(Duration::MAX), Some(s(30))) <= Some(s(15)));
        let (code, took) = ends_after(Some(Duration::MAX), Some(s(30)), true, true).await;
        assert_eq!(code, Code::WriteStalled);
        assert!(took >= s(30) && took <= s(60), "{took:?}");
        // Alone.
        let (code, took) = ends_after(None, Some(s(30)), true, true).await;
        assert_eq!(code, Code::WriteStalled);
        assert!(took >= s(30) && took <= s(60), "{took:?}");
        let (code, took) = ends_after(Some(s(60)), None, true, false).await;
        assert_eq!(code, Code::IdleTimeout);
        assert!(took >= s(60) && took <= s(90), "{took:?}");
    }

    /// A write that takes a byte now and then is slow, not stalled: it is never ended for it.
    #[tokio::test(start_paused = true)]
    async fn a_slow_write_is_not_a_stall() {
        let activity: &'static Activity = Box::leak(Box::default());
        let watch: &'static WriteWatch = Box::leak(Box::default());
        watch.waiting(true);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                activity.mark();
                watch.wrote();
            }
        });
        let stall = Some(Duration::from_secs(10));
        let sleep = ConnTimer::tick(None, stall).map(tokio::time::sleep);
        tokio::pin!(sleep);
        let timer = ConnTimer::new(sleep.as_pin_mut(), None, stall, activity, watch);
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), timer)
                .await
                .is_err(),
            "a slow write was ended"
        );
    }
}
