//! Site role: terminate a stream at the service's local backend, count active streams against
//! capacity, and keep the backend's health (checks plus the evidence of real connects).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;
use topology::{ServiceName, Topology};

use crate::Shared;
use crate::codes::Code;
use crate::header::{Header, REPLY_OK};
use crate::probe::ServiceState;
use crate::splice::{self, Side};
use crate::telemetry::SiteReport;

/// The serving path marks the service down after this many of its backend connects in a row
/// failed (Envoy's outlier detection ejects after 5 consecutive connect failures), confirmed by
/// [`refuses_connects`]; any connect that succeeds, a stream's or a check's, ends the run. One
/// failure refuses only its stream: a backend behind a load balancer with one dead target of
/// four refused a quarter of connects, and each marked the whole service down for the
/// hold-down, for every edge.
/// As many streams in a row whose backend accepted and then reset the connection before it sent
/// a byte ([`SiteService::stream_ended`]) have the site confirm the fault
/// ([`closes_unprompted`]) and mark the service down if it holds: a TCP check connects to a
/// backend that resets every connection (a proxy in front of a dead process) and finds it
/// healthy, and its streams fail after the site said `ok`, too late for the edge to retry them
/// elsewhere.
const SERVE_DOWN_AFTER: u32 = 5;

/// How long the connection of [`closes_unprompted`] must stay open, sent nothing, for the
/// backend to be let off. A backend that resets every connection does so at once.
const UNPROMPTED_WINDOW: Duration = Duration::from_millis(250);

/// Whether `backend` closes or resets a connection it was sent nothing on within
/// [`UNPROMPTED_WINDOW`] (why, if so): the confirmation of [`SERVE_DOWN_AFTER`] silent resets.
/// The resets alone do not say the backend is at fault: clients choose what it reads, and a
/// backend that resets on junk (a database given a bad startup packet, with bytes unread) or
/// on a connection idle past its own timeout is healthy; neither closes a fresh connection
/// that says nothing. A connect that fails or times out says nothing here (the checks and the
/// connects of streams judge those); nor does a backend that speaks first (a banner).
async fn closes_unprompted(backend: SocketAddr, connect_within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let connect = tokio::time::timeout(connect_within, tokio::net::TcpStream::connect(backend));
    let read = match connect.await {
        Ok(Ok(mut tcp)) => {
            let mut byte = [0u8; 1];
            tokio::time::timeout(UNPROMPTED_WINDOW, tcp.read(&mut byte))
                .await
                .ok()?
        }
        // Reset as the handshake ended (before the connect was looked at again).
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Err(e),
        _ => return None,
    };
    match read {
        Ok(0) => Some("closed a connection it was sent nothing on at once".to_string()),
        Err(e) => Some(format!(
            "reset a connection it was sent nothing on at once: {e}"
        )),
        Ok(_) => None,
    }
}

/// How many connects, made at once, confirm [`SERVE_DOWN_AFTER`] failed stream connects in a
/// row ([`refuses_connects`]).
const CONFIRM_CONNECTS: usize = 4;

/// Whether every one of [`CONFIRM_CONNECTS`] connects to `backend`, made at once, fails within
/// `within` (why, if so): the confirmation of [`SERVE_DOWN_AFTER`] stream connects in a row
/// failed. A run of five says little at a high rate of connects to a backend behind a load
/// balancer with one dead target of four: one begins about every 1,365 connects (at 1,000 a
/// second the service went down for every edge every 1.4 s, though three connects in four
/// succeeded); four more failing with it, once in 256 runs. A dead backend fails them all at
/// once (refused), or within the connect timeout. A connect this router has no descriptor for
/// says nothing of the backend.
async fn refuses_connects(backend: SocketAddr, within: Duration) -> Option<String> {
    let mut tries = tokio::task::JoinSet::new();
    for _ in 0..CONFIRM_CONNECTS {
        tries.spawn(tokio::time::timeout(
            within,
            tokio::net::TcpStream::connect(backend),
        ));
    }
    let mut why = None;
    while let Some(r) = tries.join_next().await {
        match r {
            Ok(Ok(Ok(_))) => return None,
            Ok(Ok(Err(e))) if crate::limits::out_of_descriptors(&e) => return None,
            Ok(Ok(Err(e))) => why = Some(e.to_string()),
            Ok(Err(_)) => why = Some("connect timeout".to_string()),
            Err(_) => return None,
        }
    }
    why.map(|why| format!("{CONFIRM_CONNECTS} more made at once failed too: {why}"))
}

pub(crate) struct SiteService {
    pub service: ServiceName,
    pub backend: SocketAddr,
    pub capacity: u32,
    /// The HTTP path the checks `GET` (`topology::SiteService::health_check`); `None`: a TCP
    /// connect is the check.
    health_check: Option<String>,
    /// How often it is checked and how many results in a row change its health.
    health: topology::HealthPolicy,
    active: Arc<AtomicU32>,
    healthy: Arc<AtomicBool>,
    /// When the service was last marked unhealthy (ms since router start), for the hold-down.
    /// 64 bits: a `u32` of milliseconds wraps after 49.7 days, and a wrap inside the hold-down
    /// would keep the service unhealthy for another 49.7 days.
    down_at_ms: Arc<AtomicU64>,
    /// Streams' backend connects that failed in a row, for [`SERVE_DOWN_AFTER`]; any connect
    /// that succeeds, a stream's or a check's, ends the run (failed checks count in the
    /// checker's own run, `unhealthy_after`).
    failed_connects: Arc<AtomicU32>,
    /// Streams in a row whose backend reset before it sent a byte, for [`SERVE_DOWN_AFTER`]; a
    /// stream whose backend sent a byte ends the run (a check does not: a TCP check connects to
    /// a backend that resets every stream).
    silent_resets: Arc<AtomicU32>,
    /// Marked down for dropping streams ([`closes_unprompted`] confirmed it), and not healthy
    /// since: a TCP check connects to such a backend and finds it healthy, so until it is
    /// healthy again its TCP checks also require it to keep a silent connection open.
    silent_down: Arc<AtomicBool>,
}

impl SiteService {
    /// Counts a failed backend connect of a stream: whether the run reached
    /// [`SERVE_DOWN_AFTER`] in a row, for the caller to confirm ([`refuses_connects`]); the run
    /// then starts again, whatever the confirmation finds (of failures together only the one
    /// that reaches the count confirms).
    fn connect_failed(&self) -> bool {
        let before = self.failed_connects.fetch_update(Relaxed, Relaxed, |n| {
            Some(if n + 1 >= SERVE_DOWN_AFTER { 0 } else { n + 1 })
        });
        matches!(before, Ok(n) if n + 1 >= SERVE_DOWN_AFTER)
    }
    /// A backend connect (a stream's or a check's) succeeded: the run of failures ends.
    fn connect_succeeded(&self) {
        end_run(&self.failed_connects);
    }
    /// Counts a spliced stream's end: whether the backend has now dropped [`SERVE_DOWN_AFTER`]
    /// streams in a row before it sent a byte of any, for the caller to confirm
    /// ([`closes_unprompted`]); the run then starts again, whatever the confirmation finds.
    /// Only the backend's own doing counts: a reset (`backend_abort`), or a close while the
    /// client's side was still open (a proxy in front of a dead process closes as often as it
    /// resets). A stream the client or the fabric ended, or one the backend closed after the
    /// client had (a one-way service's), says nothing of it; a stream it answered ends the run.
    fn stream_ended(&self, end: splice::Spliced) -> bool {
        if end.tcp_sent {
            end_run(&self.silent_resets);
            return false;
        }
        let reset = end.aborted == Some(Code::BackendAbort);
        let closed = end.aborted.is_none() && end.tcp_closed_first;
        if !reset && !closed {
            return false;
        }
        // One step, so that of streams ending together only the one that reaches the count
        // confirms (a load and a store let each one past it confirm too).
        let before = self.silent_resets.fetch_update(Relaxed, Relaxed, |n| {
            Some(if n + 1 >= SERVE_DOWN_AFTER { 0 } else { n + 1 })
        });
        matches!(before, Ok(n) if n + 1 >= SERVE_DOWN_AFTER)
    }
    pub fn state(&self) -> ServiceState {
        ServiceState {
            service: self.service.clone(),
            healthy: self.healthy.load(Relaxed),
            active: self.active.load(Relaxed),
            capacity: self.capacity,
        }
    }
    pub fn report(&self) -> SiteReport {
        SiteReport {
            service: self.service.clone(),
            healthy: self.healthy.load(Relaxed),
            active_streams: self.active.load(Relaxed),
            capacity: self.capacity,
        }
    }
    fn mark_unhealthy(&self, shared: &Shared, why: &str) {
        self.mark_down_at(ms_since(shared.started));
        if self.healthy.swap(false, Relaxed) {
            tracing::warn!(node = %shared.node, service = %self.service, backend = %self.backend, why, "backend unhealthy");
            shared.changed.notify_one();
        }
    }
    /// Records `now_ms` (ms since router start) as the last time the service was marked down
    /// (at least 1: 0 says never).
    fn mark_down_at(&self, now_ms: u64) {
        self.down_at_ms.store(now_ms.max(1), Relaxed);
    }
    /// Whether `hold_down` has passed since the service was last marked down, at `now_ms`; at
    /// once when it never was (a service with an HTTP check starts unhealthy, not held down:
    /// it was held for the hold-down from the router's start, a minute with `--hold-down 60s`).
    fn held_down_long_enough(&self, now_ms: u64, hold_down: Duration) -> bool {
        let down_at = self.down_at_ms.load(Relaxed);
        let since = now_ms.saturating_sub(down_at);
        down_at == 0 || u128::from(since) >= hold_down.as_millis()
    }
    /// Takes one slot of capacity, or `None` when full.
    fn acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut cur = self.active.load(Relaxed);
        loop {
            if cur >= self.capacity {
                return None;
            }
            match self
                .active
                .compare_exchange_weak(cur, cur + 1, Relaxed, Relaxed)
            {
                Ok(_) => return Some(Slot(self.active.clone())),
                Err(v) => cur = v,
            }
        }
    }
}

/// Ends a run counted in `run`. Read first, written only when there was a run: every stream
/// ends one, and a store on each would move the counter's cache line between the cores serving
/// the service.
fn end_run(run: &AtomicU32) {
    if run.load(Relaxed) != 0 {
        run.store(0, Relaxed);
    }
}

struct Slot(Arc<AtomicU32>);
impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Milliseconds since `t` (a `u64` holds 584 million years of them).
fn ms_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The site services a snapshot removed while streams still held slots of them: a service
/// served again before those streams end takes its record back, so that its count of open
/// streams (and the health of the same backend) goes on. (A fresh record counted 0 while the
/// old streams ran on: a site at capacity took as many again.) A record leaves once its last
/// slot is given back.
pub(crate) type Retired = HashMap<ServiceName, Arc<SiteService>>;

/// Brings the site services in line with the topology (keeps counters of unchanged services).
pub(crate) fn reconcile(
    shared: &Arc<Shared>,
    topo: &Topology,
    checkers: &mut HashMap<ServiceName, AbortHandle>,
    retired: &mut Retired,
) {
    let old = shared.sites.load_full();
    let mut new = HashMap::new();
    if let Some(me) = topo.node(shared.node.as_str()) {
        // A service whose residency this site is outside of is not served here, whatever its
        // serves entry says: an edge still on an older snapshot (cut off from the controller,
        // or not reached yet) would send its streams on, and they are refused
        // `service_not_served`, which the edge retries elsewhere. (Only the edges' tables
        // applied the rule: the site served them.)
        let excluded: std::collections::HashSet<&str> = if me.serves.is_empty() {
            Default::default()
        } else {
            topo.services
                .iter()
                .filter(|svc| !svc.residency.allows(me))
                .map(|svc| svc.name.as_str())
                .collect()
        };
        for s in me
            .serves
            .iter()
            .filter(|s| !excluded.contains(s.service.as_str()))
        {
            // A retired record only while a stream holds one of its slots: once the last is given
            // back, the service is judged afresh (the record waits for the next snapshot to be
            // pruned, with the health it had at its removal).
            let held = || {
                retired
                    .get(&s.service)
                    .filter(|r| r.active.load(Relaxed) > 0)
            };
            let svc = match old.get(&s.service).or_else(held) {
                Some(o)
                    if o.backend == s.backend
                        && o.capacity == s.capacity
                        && o.health_check == s.health_check
                        && o.health == s.health =>
                {
                    o.clone()
                }
                o => {
                    // Same backend, another capacity or health check: its health and hold-down
                    // go on (a new record, healthy and never down, would advertise a backend in
                    // an outage healthy at once); its checker starts again if its checks changed
                    // ([`checked_alike`]). A new backend is
                    // judged afresh: healthy at once when a connect is the check, healthy once
                    // its HTTP check passes when it has one (a model server still loading
                    // accepts connections, and answers 503).
                    let same = o.filter(|o| o.backend == s.backend);
                    let fresh = s.health_check.is_none();
                    Arc::new(SiteService {
                        service: s.service.clone(),
                        backend: s.backend,
                        capacity: s.capacity,
                        health_check: s.health_check.clone(),
                        health: s.health,
                        active: o.map(|o| o.active.clone()).unwrap_or_default(),
                        healthy: same.map_or_else(
                            || Arc::new(AtomicBool::new(fresh)),
                            |o| o.healthy.clone(),
                        ),
                        down_at_ms: same.map(|o| o.down_at_ms.clone()).unwrap_or_default(),
                        failed_connects: same
                            .map(|o| o.failed_connects.clone())
                            .unwrap_or_default(),
                        silent_resets: same.map(|o| o.silent_resets.clone()).unwrap_or_default(),
                        silent_down: same.map(|o| o.silent_down.clone()).unwrap_or_default(),
                    })
                }
            };
            new.insert(s.service.clone(), svc);
        }
    }
    for (name, svc) in old.iter() {
        if !new.contains_key(name) {
            retired.insert(name.clone(), svc.clone());
        }
    }
    // Kept while a slot is taken: `active` counts them. (Its references do not: records of one
    // service share it across a capacity change, and a checker still holds an older record.)
    retired.retain(|name, svc| !new.contains_key(name) && svc.active.load(Relaxed) > 0);
    checkers.retain(|name, h| {
        let keep = new
            .get(name)
            .is_some_and(|n| old.get(name).is_some_and(|o| checked_alike(n, o)));
        if !keep {
            h.abort();
        }
        keep
    });
    for (name, svc) in &new {
        if !checkers.contains_key(name) {
            let h = tokio::spawn(check_loop(shared.clone(), svc.clone())).abort_handle();
            checkers.insert(name.clone(), h);
        }
    }
    shared.sites.store(Arc::new(new));
}

/// Whether the checker of `old` goes on for `new`: the same record, or one that only changed
/// what checks do not read (its capacity) and shares the health the checker writes. (A
/// capacity change restarted the checker: its runs of successes and failures began again, and
/// an automation changing capacities every second kept a failing backend from ever being
/// counted down.)
/// (`reconcile` shares the health, hold-down and runs only between records of one backend.)
fn checked_alike(new: &SiteService, old: &SiteService) -> bool {
    Arc::ptr_eq(&new.healthy, &old.healthy)
        && new.health_check == old.health_check
        && new.health == old.health
}

/// Checks the backend every `health_interval` (500 ms by default): `unhealthy_after` failures
/// in a row (3) mark it unhealthy, `healthy_after` successes in a row (2) and the hold-down make
/// it healthy again ([`topology::HealthPolicy`]).
///
/// The next check starts an interval after the last one ended: one that takes longer than
/// the interval (a backend that drops SYNs: each check waits the whole connect timeout) leaves
/// no tick due behind it. (With tokio's `interval`, ticks piled up into a burst of connects at
/// the recovering backend; with its `Delay` behaviour one overdue tick still fired at once, so
/// the two successes `healthy_after` needs came microseconds apart, not an interval.)
async fn check_loop(shared: Arc<Shared>, svc: Arc<SiteService>) {
    let mut checker = Checker::default();
    // Bounded again here (a zero interval panics the timer): every snapshot received is
    // checked, but one stored on disk by hand or by a build before the bounds is not.
    let every = svc
        .health
        .interval
        .as_duration()
        .max(topology::HealthPolicy::MIN_INTERVAL.as_duration());
    loop {
        let mut r = check_once(
            svc.backend,
            svc.health_check.as_deref(),
            shared.backend_connect_timeout,
        )
        .await;
        if r.no_descriptor {
            if let Some(skipped) = CHECKS_NOT_RUN.due(Instant::now()) {
                tracing::warn!(node = %shared.node, service = %svc.service, backend = %svc.backend, skipped,
                    "health check not run: this router is out of file descriptors (raise its open-file limit, or lower the site's capacity)");
            }
            tokio::time::sleep(every).await;
            continue;
        }
        // Down for dropping streams: a connect alone would bring it back at once, to drop the
        // next five streams (an HTTP check fails on such a backend by itself).
        if r.failure.is_none()
            && svc.health_check.is_none()
            && svc.silent_down.load(Relaxed)
            && !svc.healthy.load(Relaxed)
        {
            r.failure = closes_unprompted(svc.backend, shared.backend_connect_timeout)
                .await
                .map(|why| format!("it still {why}"));
        }
        let now_ms = ms_since(shared.started);
        if r.connected {
            svc.connect_succeeded();
        }
        let success = r.failure.is_none();
        // The flag means something only while the service is down: one left set by a mark
        // that raced the recovery is cleared by the next check that finds it healthy.
        if success && svc.healthy.load(Relaxed) && svc.silent_down.load(Relaxed) {
            svc.silent_down.store(false, Relaxed);
        }
        if let Some(why) = &r.failure {
            tracing::debug!(node = %shared.node, service = %svc.service, backend = %svc.backend, "health check failed: {why}");
        }
        match checker.observe(&svc, success, now_ms, shared.probe.hold_down) {
            Some(true) => {
                svc.silent_down.store(false, Relaxed);
                svc.healthy.store(true, Relaxed);
                tracing::info!(node = %shared.node, service = %svc.service, "backend healthy again");
                shared.changed.notify_one();
            }
            Some(false) => svc.mark_unhealthy(
                &shared,
                &format!(
                    "health check failed: {}",
                    r.failure.as_deref().unwrap_or("unknown")
                ),
            ),
            None => {}
        }
        tokio::time::sleep(every).await;
    }
}

/// What one health check found.
struct CheckResult {
    /// The TCP connect succeeded (whatever the HTTP answer).
    connected: bool,
    /// Why the check failed; `None`: healthy.
    failure: Option<String>,
    /// The check could not run: this router is out of file descriptors (its own fault, not the
    /// backend's), so it counts neither way.
    no_descriptor: bool,
}

/// A warning of this router's own lack of descriptors, at most one a second in the process (at
/// such a moment every new stream, or every check, would log one): one for streams refused, one
/// for checks not run.
struct Throttle(std::sync::Mutex<(Option<Instant>, u64)>);

/// [`Throttle`]s of the warnings of streams refused and of checks not run.
static STREAMS_REFUSED: Throttle = Throttle::new();
static CHECKS_NOT_RUN: Throttle = Throttle::new();

impl Throttle {
    const fn new() -> Throttle {
        Throttle(std::sync::Mutex::new((None, 0)))
    }

    /// Whether the warning is due at `now`; with the number left out since the last one.
    fn due(&self, now: Instant) -> Option<u64> {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match last.0 {
            Some(at) if now.duration_since(at) < Duration::from_secs(1) => {
                last.1 += 1;
                None
            }
            _ => {
                let skipped = std::mem::take(&mut last.1);
                last.0 = Some(now);
                Some(skipped)
            }
        }
    }
}

/// The most of an HTTP answer a check reads: interim (1xx) answers, then the final status line,
/// which must be whole in it.
const MAX_CHECK_ANSWER: usize = 16 * 1024;

/// One health check of `backend`, within `within`: a TCP connect, then, with a `path`, an
/// HTTP/1.1 `GET` of it whose status must be 2xx or 3xx (as Envoy's and AWS's HTTP checks).
/// Only the status line is read, at most [`MAX_CHECK_ANSWER`] bytes.
async fn check_once(backend: SocketAddr, path: Option<&str>, within: Duration) -> CheckResult {
    use tokio::io::AsyncWriteExt;
    let mut connected = false;
    let mut no_descriptor = false;
    let run = async {
        let mut tcp = tokio::net::TcpStream::connect(backend).await.map_err(|e| {
            no_descriptor = crate::limits::out_of_descriptors(&e);
            format!("connect: {e}")
        })?;
        connected = true;
        let Some(path) = path else {
            return Ok(());
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {backend}\r\nUser-Agent: tasman-health-check\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        judge_answer(tokio::io::BufReader::with_capacity(1024, tcp)).await
    };
    let failure = match tokio::time::timeout(within, run).await {
        Ok(Ok(())) => None,
        Ok(Err(why)) => Some(why),
        Err(_) => Some(format!("no answer within {within:?}")),
    };
    CheckResult {
        connected,
        failure,
        no_descriptor,
    }
}

/// Reads an HTTP answer from `r` up to its final status line, skipping interim (1xx) answers,
/// each ended by an empty line, as RFC 9110 (15.2) asks of a client (a backend may send `103
/// Early Hints` first, with a page of `Link` headers), and judges that line
/// ([`http_status_ok`]); at most [`MAX_CHECK_ANSWER`] bytes in all. An answer that ends within an
/// interim one is judged by its status line (a failure). (The answer was read into a 1 KiB
/// buffer: interim answers that filled it had their status line judged, and a backend that
/// sent one never became healthy.)
async fn judge_answer(r: impl tokio::io::AsyncBufRead + Unpin) -> Result<(), String> {
    use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};
    async fn read_line(
        r: &mut (impl AsyncBufRead + Unpin),
        line: &mut Vec<u8>,
    ) -> Result<usize, String> {
        line.clear();
        r.read_until(b'\n', line)
            .await
            .map_err(|e| format!("reading the answer: {e}"))
    }
    let mut r = r.take(MAX_CHECK_ANSWER as u64);
    let mut status = Vec::new();
    let mut header = Vec::new();
    loop {
        read_line(&mut r, &mut status).await?;
        if !is_interim(&status) {
            return http_status_ok(&status);
        }
        // Its header lines, to the empty one.
        loop {
            if read_line(&mut r, &mut header).await? == 0 {
                return http_status_ok(&status);
            }
            if header == b"\r\n" || header == b"\n" {
                break;
            }
        }
    }
}

/// Whether `line` is an interim answer's status line (`HTTP/1.1 103 Early Hints`).
fn is_interim(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.starts_with(b"HTTP/")
        && line
            .split(|&b| b == b' ')
            .nth(1)
            .is_some_and(|code| code.len() == 3 && code[0] == b'1')
}

/// Whether an HTTP answer's status line (`HTTP/1.1 200 OK`) says 2xx or 3xx.
/// Only a whole line counts: an answer cut off inside it (the backend closed, or the line is
/// longer than what is read) is a failure, not `HTTP/1.1 200` taken for a success.
fn http_status_ok(head: &[u8]) -> Result<(), String> {
    let Some(end) = head.iter().position(|&b| b == b'\n') else {
        return Err(if head.is_empty() {
            "closed without an answer".to_string()
        } else {
            "the answer ended inside its status line".to_string()
        });
    };
    let line = &head[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with(b"HTTP/") && code.len() == 3 => {
            std::str::from_utf8(code)
                .ok()
                .and_then(|c| c.parse::<u16>().ok())
        }
        _ => None,
    };
    match status {
        Some(s) if (200..400).contains(&s) => Ok(()),
        Some(s) => Err(format!("HTTP status {s}")),
        None => Err(format!(
            "not an HTTP answer: {:?}",
            String::from_utf8_lossy(&line[..line.len().min(64)])
        )),
    }
}

/// The health checks' count of successes and failures in a row.
#[derive(Debug, Default)]
struct Checker {
    ok: u32,
    fail: u32,
    /// The service's last mark down this checker has seen: a mark by the serving path (a
    /// refused connect) between two checks ends the run of successes before it.
    down_seen_ms: u64,
}

impl Checker {
    /// Counts one check's result at `now_ms`: `Some(true)` when the service becomes healthy
    /// again (`healthy_after` successes in a row since it was last marked down, and the hold-down
    /// over), `Some(false)` when it is to be marked unhealthy, `None` when nothing changes.
    fn observe(
        &mut self,
        svc: &SiteService,
        success: bool,
        now_ms: u64,
        hold_down: Duration,
    ) -> Option<bool> {
        let down_at = svc.down_at_ms.load(Relaxed);
        if down_at != self.down_seen_ms {
            self.down_seen_ms = down_at;
            self.ok = 0;
        }
        if success {
            self.ok += 1;
            self.fail = 0;
            (!svc.healthy.load(Relaxed)
                && self.ok >= svc.health.healthy_after.max(1)
                && svc.held_down_long_enough(now_ms, hold_down))
            .then_some(true)
        } else {
            self.ok = 0;
            self.fail += 1;
            // Not a service unhealthy since the start that was never marked down (a model
            // server with an HTTP check, still loading): marked, its first pass after a long
            // load waited out the whole hold-down from its last 503, which the start has none of.
            let marked = svc.healthy.load(Relaxed) || svc.down_at_ms.load(Relaxed) != 0;
            (self.fail >= svc.health.unhealthy_after.max(1) && marked).then_some(false)
        }
    }
}

/// Terminates a stream whose header has no hops left at this node.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    header: Header,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let svc = shared.sites.load().get(&header.service).cloned();
    let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code: Code| {
        crate::inbound::refuse(&shared, send, recv, code)
    };
    let Some(svc) = svc else {
        let known = shared
            .snapshot
            .load()
            .topology
            .service(header.service.as_str())
            .is_some();
        let code = if !known {
            Code::UnknownService
        } else if shared
            .snapshot
            .load()
            .topology
            .node(shared.node.as_str())
            .is_some_and(|n| n.kind == topology::NodeKind::Site)
        {
            Code::ServiceNotServed
        } else {
            Code::WrongRole
        };
        return refuse(&mut send, &mut recv, code);
    };
    if !svc.healthy.load(Relaxed) {
        return refuse(&mut send, &mut recv, Code::BackendRefused);
    }
    let Some(slot) = svc.acquire() else {
        return refuse(&mut send, &mut recv, Code::SiteFull);
    };
    // Counted until the splice starts (a draining router waits for it).
    let starting = crate::metrics::Held::count(&shared.metrics.streams_starting);
    let started = Instant::now();
    let tcp = match tokio::time::timeout(
        shared.backend_connect_timeout,
        tokio::net::TcpStream::connect(svc.backend),
    )
    .await
    {
        Ok(Ok(t)) => t,
        // This router has no descriptor for the connection: it is full, not its backend
        // refusing (counted as the backend's, five in a row marked the service down for every
        // edge).
        Ok(Err(e)) if crate::limits::out_of_descriptors(&e) => {
            if let Some(skipped) = STREAMS_REFUSED.due(Instant::now()) {
                tracing::warn!(node = %shared.node, service = %svc.service, error = %e, skipped,
                    "no file descriptor for a backend connection: refused as full (raise this router's open-file limit, or lower the site's capacity)");
            }
            return refuse(&mut send, &mut recv, Code::SiteFull);
        }
        r => {
            let why = match r {
                Ok(Err(e)) => e.to_string(),
                _ => "connect timeout".to_string(),
            };
            if svc.connect_failed() {
                // Confirmed apart: the stream is refused now (its edge tries the next site).
                let (shared, svc) = (shared.clone(), svc.clone());
                tokio::spawn(async move {
                    match refuses_connects(svc.backend, shared.backend_connect_timeout).await {
                        Some(confirmed) => svc.mark_unhealthy(
                            &shared,
                            &format!(
                                "{SERVE_DOWN_AFTER} stream connects in a row failed, the last: \
                                 {why}; {confirmed}"
                            ),
                        ),
                        None => {
                            tracing::info!(node = %shared.node, service = %svc.service, backend = %svc.backend,
                            "{SERVE_DOWN_AFTER} stream connects in a row failed, the last: {why}; one of {CONFIRM_CONNECTS} more made at once succeeded: left in service")
                        }
                    }
                });
            } else {
                tracing::debug!(node = %shared.node, service = %svc.service, backend = %svc.backend, "a stream's backend connect failed: {why}");
            }
            return refuse(&mut send, &mut recv, Code::BackendRefused);
        }
    };
    svc.connect_succeeded();
    let _ = tcp.set_nodelay(true);
    match shared.bounded_write(send.write_all(&REPLY_OK)).await {
        Some(Ok(())) => {}
        // Stopped by the edge (its reply deadline passed) or the connection lost: counted and
        // both halves ended with the code, as every other refusal.
        Some(Err(e)) => return refuse(&mut send, &mut recv, splice::write_error_code(&e)),
        None => {
            // The edge's side grants no window for two bytes.
            tracing::debug!(node = %shared.node, service = %svc.service, "reply not taken: stream reset");
            return refuse(&mut send, &mut recv, Code::IdleTimeout);
        }
    }
    tracing::debug!(node = %shared.node, service = %svc.service, connect_us = started.elapsed().as_micros() as u64, "backend connected");
    let end = splice::tcp_quic(&shared, tcp, send, recv, Side::Site, starting).await;
    drop(slot);
    if svc.stream_ended(end) {
        match closes_unprompted(svc.backend, shared.backend_connect_timeout).await {
            Some(why) => {
                svc.silent_down.store(true, Relaxed);
                svc.mark_unhealthy(
                    &shared,
                    &format!(
                        "{SERVE_DOWN_AFTER} streams in a row dropped by the backend before it answered, and it {why}"
                    ),
                );
            }
            None => {
                tracing::info!(node = %shared.node, service = %svc.service, backend = %svc.backend,
                "{SERVE_DOWN_AFTER} streams in a row dropped by the backend before it answered; it keeps a connection it is sent nothing on open (or could not be reached to ask): left in service")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connect that failed for want of this host's descriptors is the router's own fault; a
    /// refusal, and an address this host cannot connect from (`EADDRNOTAVAIL`, which local
    /// ports running out also give), the backend's.
    #[test]
    fn a_connect_short_of_descriptors_is_the_routers_own_fault() {
        for own in [libc::EMFILE, libc::ENFILE] {
            assert!(
                crate::limits::out_of_descriptors(&std::io::Error::from_raw_os_error(own)),
                "{own}"
            );
        }
        for backend in [
            libc::ECONNREFUSED,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(!crate::limits::out_of_descriptors(
                &std::io::Error::from_raw_os_error(backend)
            ));
        }
    }

    /// The warnings of a router short of descriptors come at most once a second, each with the
    /// count of those left out (every stream and check logged one).
    #[test]
    fn own_fault_warnings_come_at_most_once_a_second() {
        // The streams' and the checks' apart: one due does not hold the other back.
        let later = Instant::now() + Duration::from_secs(3600);
        assert!(STREAMS_REFUSED.due(later).is_some());
        assert!(
            CHECKS_NOT_RUN.due(later).is_some(),
            "held back by the streams'"
        );
        let t = Throttle::new();
        let t0 = Instant::now();
        assert_eq!(t.due(t0), Some(0), "the first is due");
        let ms = Duration::from_millis;
        assert!((0..49).all(|i| t.due(t0 + ms(i * 20)).is_none()));
        assert_eq!(
            t.due(t0 + ms(1000)),
            Some(49),
            "the next, with the count left out"
        );
        assert_eq!(t.due(t0 + ms(1500)), None);
    }

    fn service() -> SiteService {
        SiteService {
            service: ServiceName::new("echo"),
            backend: "127.0.0.1:1".parse().unwrap(),
            capacity: 1,
            health_check: None,
            health: topology::HealthPolicy::default(),
            active: Arc::default(),
            healthy: Arc::new(AtomicBool::new(false)),
            down_at_ms: Arc::default(),
            failed_connects: Arc::default(),
            silent_resets: Arc::default(),
            silent_down: Arc::default(),
        }
    }

    /// Interim answers (1xx) before the final one are skipped: a `103 Early Hints` then `200`
    /// is healthy, a `100 Continue` then `503` is not. (The 103 failed the check.)
    #[tokio::test]
    async fn an_http_check_judges_the_final_answer_after_interim_ones() {
        let judge = |head: &'static [u8]| judge_answer(head);
        assert_eq!(
            judge(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\n").await,
            Ok(())
        );
        assert_eq!(
            judge(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\n").await,
            Err("HTTP status 503".to_string())
        );
        // No reason phrase: the code is still read whole (the line's CR is not part of it).
        assert_eq!(
            judge(b"HTTP/1.1 100\r\n\r\nHTTP/1.1 200 OK\r\n").await,
            Ok(())
        );
        assert_eq!(judge(b"HTTP/1.1 200 OK\r\n").await, Ok(()));
        // Cut off within or after the interim answer, or inside the final status line: a
        // failure.
        assert_eq!(
            judge(b"HTTP/1.1 103 Early Hints\r\n").await,
            Err("HTTP status 103".to_string())
        );
        assert_eq!(
            judge(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n").await,
            Err("HTTP status 103".to_string())
        );
        assert!(judge(b"HTTP/1.1 103 X\r\n\r\nHTTP/1.1 200").await.is_err());
        assert!(judge(b"").await.is_err());
    }

    /// Interim answers longer than 1 KiB (a `103` with a page of `Link` headers) are read past
    /// and the final answer judged; endless ones fail at the bound.
    #[tokio::test]
    async fn interim_answers_longer_than_a_kilobyte_are_read_past() {
        let mut early = b"HTTP/1.1 103 Early Hints\r\n".to_vec();
        for i in 0..40 {
            early.extend_from_slice(
                format!("Link: </assets/style-{i:04}.css>; rel=preload\r\n").as_bytes(),
            );
        }
        early.extend_from_slice(b"\r\n");
        assert!(early.len() > 1024);
        let answer = |interim: usize| {
            let mut a = early.repeat(interim);
            a.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            a
        };
        assert_eq!(judge_answer(&answer(1)[..]).await, Ok(()));
        assert!(answer(40).len() > MAX_CHECK_ANSWER);
        assert!(judge_answer(&answer(40)[..]).await.is_err());
        // Through a real connection too (its reads split anywhere).
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let bytes = answer(3);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut c, _) = l.accept().await.unwrap();
            let mut req = [0u8; 512];
            let _ = c.read(&mut req).await;
            for chunk in bytes.chunks(700) {
                let _ = c.write_all(chunk).await;
            }
        });
        let r = check_once(addr, Some("/health"), Duration::from_secs(10)).await;
        assert_eq!(r.failure, None);
    }

    #[test]
    fn an_http_check_passes_on_2xx_and_3xx_only() {
        assert_eq!(http_status_ok(b"HTTP/1.1 200 OK\r\n"), Ok(()));
        assert_eq!(http_status_ok(b"HTTP/1.0 302 Found\r\nLocation: /"), Ok(()));
        assert_eq!(http_status_ok(b"HTTP/1.1 204\r\n"), Ok(()));
        assert_eq!(
            http_status_ok(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Err("HTTP status 503".to_string())
        );
        assert!(http_status_ok(b"").is_err());
        // Cut off inside the status line (the backend closed): not a success.
        assert_eq!(
            http_status_ok(b"HTTP/1.1 200"),
            Err("the answer ended inside its status line".to_string())
        );
        assert!(http_status_ok(b"HTTP/1.1 200 OK").is_err());
        assert!(http_status_ok(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(http_status_ok(b"HTTP/1.1 2000 OK\r\n").is_err());
        assert!(http_status_ok(&[0xff; 2000]).is_err());
    }

    /// The serving path's rule: down at the fifth failed connect in a row, a success (a
    /// stream's or a check's) starting the count again.
    #[test]
    fn the_serving_path_marks_down_after_five_failed_connects_in_a_row() {
        let svc = service();
        for _ in 0..4 {
            assert!(!svc.connect_failed());
        }
        svc.connect_succeeded();
        for _ in 0..4 {
            assert!(!svc.connect_failed());
        }
        assert!(svc.connect_failed());
        // The run starts again: the next confirmation is five failures later.
        for _ in 0..4 {
            assert!(!svc.connect_failed());
        }
        assert!(svc.connect_failed());
    }

    /// The confirmation of five failed connects: all of [`CONFIRM_CONNECTS`] fail at a port
    /// nothing listens on; one succeeds at a listening one (a load balancer with a dead target
    /// among live ones), and the service is left in service.
    #[tokio::test]
    async fn failed_connects_are_confirmed_by_more_made_at_once() {
        let within = Duration::from_secs(5);
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let why = refuses_connects(closed, within).await;
        assert!(
            why.as_deref()
                .is_some_and(|w| w.starts_with("4 more made at once failed too: ")),
            "{why:?}"
        );
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(
            refuses_connects(open.local_addr().unwrap(), within).await,
            None
        );
    }

    /// Streams whose backend reset before it answered: down at the fifth in a row; a stream it
    /// answered ends the run; streams that ended otherwise (cleanly, or by the client or the
    /// fabric) neither count nor end it.
    #[test]
    fn the_serving_path_marks_down_after_five_silent_resets_in_a_row() {
        let svc = service();
        let silent = splice::Spliced {
            aborted: Some(Code::BackendAbort),
            ..Default::default()
        };
        let answered = splice::Spliced {
            aborted: Some(Code::BackendAbort),
            tcp_sent: true,
            ..Default::default()
        };
        let closed_first = splice::Spliced {
            tcp_closed_first: true,
            ..Default::default()
        };
        for _ in 0..4 {
            assert!(!svc.stream_ended(silent));
        }
        assert!(!svc.stream_ended(answered));
        for _ in 0..4 {
            assert!(!svc.stream_ended(silent));
        }
        for other in [None, Some(Code::ClientAbort), Some(Code::IdleTimeout)] {
            let end = splice::Spliced {
                aborted: other,
                ..Default::default()
            };
            assert!(!svc.stream_ended(end), "{other:?}");
        }
        // Closed by the backend after the client's end: a one-way service's.
        assert!(!svc.stream_ended(splice::Spliced::default()));
        assert!(
            svc.stream_ended(closed_first),
            "the fifth in a row: closed first"
        );
        // The run starts again after it; a successful connect does not end it.
        for _ in 0..3 {
            assert!(!svc.stream_ended(silent));
        }
        svc.connect_succeeded();
        assert!(!svc.stream_ended(silent));
        assert!(svc.stream_ended(silent), "five more in a row");
        // Torn down otherwise after the backend closed first: not the backend's doing.
        for _ in 0..SERVE_DOWN_AFTER {
            let end = splice::Spliced {
                aborted: Some(Code::ClientAbort),
                tcp_closed_first: true,
                ..Default::default()
            };
            assert!(!svc.stream_ended(end));
        }
    }

    /// The confirmation: a backend that resets or closes a connection it is sent nothing on at
    /// once is at fault; one that waits for its client (or speaks first) is not.
    #[tokio::test]
    async fn a_backend_is_at_fault_only_if_it_drops_a_silent_connection_at_once() {
        async fn backend(how: u8) -> SocketAddr {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut c, _)) = l.accept().await {
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        match how {
                            0 => {
                                let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
                            }
                            1 => {}
                            2 => {
                                let _ = c.write_all(b"220 ready\r\n").await;
                                let _ = c.read(&mut [0u8; 16]).await;
                            }
                            _ => {
                                let _ = c.read(&mut [0u8; 16]).await;
                            }
                        }
                    });
                }
            });
            addr
        }
        let within = Duration::from_secs(2);
        let resets = closes_unprompted(backend(0).await, within).await;
        assert!(
            resets.as_deref().is_some_and(|w| w.contains("reset")),
            "{resets:?}"
        );
        let closes = closes_unprompted(backend(1).await, within).await;
        assert!(
            closes.as_deref().is_some_and(|w| w.contains("closed")),
            "{closes:?}"
        );
        assert_eq!(
            closes_unprompted(backend(2).await, within).await,
            None,
            "a banner"
        );
        assert_eq!(
            closes_unprompted(backend(3).await, within).await,
            None,
            "waits for its client"
        );
        let nothing = SocketAddr::from(([127, 0, 0, 1], 1));
        assert_eq!(
            closes_unprompted(nothing, within).await,
            None,
            "refused: the checks' part"
        );
    }

    /// Connects refused on the serving path mark the service down between two checks: the
    /// successes the checker counted before it do not count towards its return (it needs
    /// `healthy_after` in a row after the mark, whatever the hold-down).
    #[test]
    fn a_mark_down_by_the_serving_path_restarts_the_run_of_successes() {
        let hold = Duration::from_millis(100);
        let svc = service();
        svc.healthy.store(true, Relaxed);
        let mut c = Checker::default();
        for t in [500, 1000, 1500] {
            assert_eq!(c.observe(&svc, true, t, hold), None);
        }
        // Refused on the serving path at 1,700 ms.
        svc.mark_down_at(1700);
        svc.healthy.store(false, Relaxed);
        // The hold-down is over at the next check, but it is the first success since the mark.
        assert_eq!(c.observe(&svc, true, 2000, hold), None, "up on one check");
        assert_eq!(c.observe(&svc, true, 2500, hold), Some(true));
        svc.healthy.store(true, Relaxed);
        // Failures: down at the third in a row.
        assert_eq!(c.observe(&svc, false, 3000, hold), None);
        assert_eq!(c.observe(&svc, false, 3500, hold), None);
        assert_eq!(c.observe(&svc, false, 4000, hold), Some(false));
    }

    /// A service with an HTTP check starts unhealthy and is healthy once its checks pass, with
    /// no hold-down: it was never marked down. (The hold-down ran from the router's start.)
    #[test]
    fn a_service_never_marked_down_is_not_held_down() {
        let hold = Duration::from_secs(30);
        let mut svc = service();
        svc.health_check = Some("/health".into());
        let mut c = Checker::default();
        assert_eq!(c.observe(&svc, true, 100, hold), None, "up on one check");
        assert_eq!(c.observe(&svc, true, 600, hold), Some(true));
        // Marked down (even at the router's first millisecond): held down from then.
        svc.healthy.store(false, Relaxed);
        svc.mark_down_at(0);
        assert!(!svc.held_down_long_enough(600, hold));
        assert!(svc.held_down_long_enough(30_001, hold));
        // Failing at the start for longer than `unhealthy_after` checks (a model server still
        // loading, its health path answering 503) is no mark-down either: healthy at its
        // `healthy_after`-th pass. (Each failure from the third marked it down again, as
        // `check_loop` does on `Some(false)`, and it waited out the hold-down after loading.)
        let mut svc = service();
        svc.health_check = Some("/health".into());
        let mut c = Checker::default();
        for t in [100, 600, 1100, 1600] {
            if c.observe(&svc, false, t, hold) == Some(false) {
                svc.mark_down_at(t);
            }
        }
        assert_eq!(c.observe(&svc, true, 2100, hold), None, "up on one check");
        assert_eq!(c.observe(&svc, true, 2600, hold), Some(true));
    }

    /// The serves entry's thresholds decide: down at the first failure with `unhealthy_after:
    /// 1`, up at the fourth success with `healthy_after: 4` (they were 3 and 2 whatever the
    /// topology said).
    #[test]
    fn the_topologys_thresholds_decide_when_health_changes() {
        let hold = Duration::ZERO;
        let mut svc = service();
        svc.health = topology::HealthPolicy {
            interval: topology::Latency::from_micros(100_000),
            unhealthy_after: 1,
            healthy_after: 4,
        };
        svc.healthy.store(true, Relaxed);
        let mut c = Checker::default();
        assert_eq!(c.observe(&svc, false, 100, hold), Some(false));
        svc.mark_down_at(100);
        svc.healthy.store(false, Relaxed);
        for t in [200, 300, 400] {
            assert_eq!(c.observe(&svc, true, t, hold), None, "at {t} ms");
        }
        assert_eq!(c.observe(&svc, true, 500, hold), Some(true));
    }

    #[test]
    fn hold_down_ends_across_the_49_7_day_mark_of_a_32_bit_millisecond_clock() {
        let hold = Duration::from_secs(1);
        let wrap = u64::from(u32::MAX) + 1;
        let svc = service();
        // Marked down 200 ms before a u32 of milliseconds would wrap.
        svc.mark_down_at(wrap - 200);
        assert!(!svc.held_down_long_enough(wrap - 100, hold));
        assert!(!svc.held_down_long_enough(wrap + 700, hold), "800 ms after");
        assert!(
            svc.held_down_long_enough(wrap + 800, hold),
            "the hold-down ends 1 s after the last failure, wrap or not"
        );
        assert!(svc.held_down_long_enough(wrap + 60_000, hold));
    }
}
