//! Keeping cores awake while traffic flows (opt-in: `tasman router --keep-awake WINDOW`).
//!
//! An idle core halts, and waking a process on it waits for the core to leave its halt: tens of
//! microseconds on a virtual machine (the hypervisor must reschedule the virtual CPU), and deeper
//! power states cost as much on bare metal. A request through two routers wakes four or five
//! processes in turn, so on an otherwise idle host these wake-ups are most of the latency a round
//! trip through the fabric adds (docs/benchmarks.md). This keeps cores out of their halt while
//! traffic flows: threads at the kernel's idle priority (`SCHED_IDLE`) spin as long as a byte
//! moved through the router in the last `window`, and sleep otherwise. At idle priority a spinner
//! runs only when nothing else wants its core and gives the core up to any woken thread at once
//! (Linux also prefers a core running only idle-priority threads when it places a woken thread),
//! so it takes (almost) no CPU time from real work; what it costs is power, and the core showing busy.
//! Guests with the kernel's `haltpoll` idle driver poll before halting by themselves.
//!
//! The spinners watch a counter that the data path bumps anyway (bytes moved, per chunk), read
//! every few microseconds while spinning and every `window` (at least 1 ms, at most 10 ms) while
//! asleep: nothing is added to the data path, and the first request after a quiet spell longer
//! than the window is not helped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a spinner spins between two looks at the activity counter.
const SPIN_SLICE: Duration = Duration::from_micros(20);

/// Bounds on how often a sleeping spinner looks for traffic.
const MIN_NAP: Duration = Duration::from_millis(1);
const MAX_NAP: Duration = Duration::from_millis(10);

/// What the spinners watch: any value that changes whenever traffic moves.
pub type Activity = Arc<dyn Fn() -> u64 + Send + Sync>;

/// How a router keeps cores awake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Spin until this long has passed without a byte moving.
    pub window: Duration,
    /// Spinning threads (at least one). One is enough for a router alone on a few cores: the
    /// kernel places woken threads on its core first.
    pub threads: usize,
}

/// Running spinners; stopped (and joined) when dropped.
pub struct KeepAwake {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

struct Inner {
    activity: Activity,
    window: Duration,
    stop: AtomicBool,
    /// Spinners running at `SCHED_IDLE`. One the kernel refused it to does not spin at all (at
    /// normal priority it would take CPU time from real work): it logs why and ends.
    idle_priority: AtomicU64,
    /// Each spinner's CPU time (nanoseconds, its thread's clock), read at each turn of its loop,
    /// asleep or spinning: all it costs (read only after a spin, CPU burnt while asleep went
    /// unseen, and was counted as spinning at the next spin).
    cpu_ns: Vec<AtomicU64>,
    /// Spinners spinning now.
    spinning: AtomicU64,
}

impl std::fmt::Debug for KeepAwake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeepAwake")
            .field("window", &self.inner.window)
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl KeepAwake {
    /// Starts `threads` spinners (at least one) that spin while `activity` changed in the last
    /// `window`.
    pub fn start(activity: Activity, window: Duration, threads: usize) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            activity,
            window,
            stop: AtomicBool::new(false),
            idle_priority: AtomicU64::new(0),
            cpu_ns: (0..threads.max(1)).map(|_| AtomicU64::new(0)).collect(),
            spinning: AtomicU64::new(0),
        });
        let mut me = KeepAwake {
            inner,
            threads: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let inner = me.inner.clone();
            me.threads.push(
                std::thread::Builder::new()
                    .name(format!("keep-awake-{i}"))
                    .spawn(move || inner.run(i))?,
            );
        }
        Ok(me)
    }

    /// CPU time the spinners used, all of them (their threads' clocks, as of their loop's last
    /// turn): spinning, nearly all of it; asleep, microseconds a second.
    pub fn spun(&self) -> Duration {
        Duration::from_nanos(self.inner.cpu_ns.iter().map(|c| c.load(Relaxed)).sum())
    }

    /// Spinners spinning now (the others are asleep, waiting for traffic).
    pub fn spinning(&self) -> u64 {
        self.inner.spinning.load(Relaxed)
    }

    /// Spinners that run at idle priority (`SCHED_IDLE`).
    pub fn at_idle_priority(&self) -> u64 {
        self.inner.idle_priority.load(Relaxed)
    }

    /// Tells the spinners to end (at once if spinning, after their nap if asleep) without
    /// waiting for them; dropping waits.
    pub fn stop(&self) {
        self.inner.stop.store(true, Relaxed);
    }

    /// Prometheus series: spinners spinning now, and time spent spinning.
    pub fn render_metrics(&self, node: &str, s: &mut String) {
        use crate::metrics::series;
        series(
            s,
            node,
            "tasman_keep_awake_spinning",
            "gauge",
            "Keep-awake threads spinning now (traffic moved within the window).",
            self.spinning(),
        );
        series(
            s,
            node,
            "tasman_keep_awake_spin_seconds_total",
            "counter",
            "CPU time the keep-awake threads used (at idle priority): spinning, nearly all of it.",
            format_args!("{:.3}", self.spun().as_secs_f64()),
        );
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        self.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Inner {
    fn run(&self, me: usize) {
        if let Err(e) = set_idle_priority() {
            tracing::warn!(
                "keep-awake: the kernel refused the idle scheduling class ({e}); this thread \
                 will not spin (at normal priority it would take CPU time from real work)"
            );
            return;
        }
        self.idle_priority.fetch_add(1, Relaxed);
        let nap = self.window.clamp(MIN_NAP, MAX_NAP);
        let mut seen = (self.activity)();
        // Asleep until traffic moves.
        let mut last_moved: Option<Instant> = None;
        let mut spinning = false;
        while !self.stop.load(Relaxed) {
            let now = Instant::now();
            let moved = (self.activity)();
            if moved != seen {
                seen = moved;
                last_moved = Some(now);
            }
            let awake = last_moved.is_some_and(|t| now.duration_since(t) < self.window);
            if awake != spinning {
                spinning = awake;
                if awake {
                    self.spinning.fetch_add(1, Relaxed);
                } else {
                    self.spinning.fetch_sub(1, Relaxed);
                }
            }
            if awake {
                let until = now + SPIN_SLICE;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::sleep(nap);
            }
            self.cpu_ns[me].store(thread_cpu_ns(), Relaxed);
        }
        if spinning {
            self.spinning.fetch_sub(1, Relaxed);
        }
    }
}

/// The calling thread's CPU time, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Puts the calling thread in the `SCHED_IDLE` class (Linux; no privilege needed).
fn set_idle_priority() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed `sched_param` is valid (priority 0, which SCHED_IDLE requires), and
        // pid 0 is the calling thread.
        let r = unsafe {
            let param: libc::sched_param = std::mem::zeroed();
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(std::io::Error::other(
            "no idle scheduling class on this system",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(what: &str, ok: impl FnMut() -> bool) {
        testkit::eventually(Duration::from_secs(20), what, ok);
    }

    /// Asleep until traffic moves, spinning while it moves, asleep again a window after it
    /// stopped; at idle priority.
    #[test]
    fn spins_while_traffic_moves_and_sleeps_a_window_after_it_stops() {
        let moved = Arc::new(AtomicU64::new(0));
        let m = moved.clone();
        let ka = KeepAwake::start(
            Arc::new(move || m.load(Relaxed)),
            Duration::from_millis(50),
            2,
        )
        .unwrap();
        #[cfg(target_os = "linux")]
        wait_for("both spinners at SCHED_IDLE", || ka.at_idle_priority() == 2);
        // No traffic yet: asleep, they use next to no CPU (their threads' own clocks: a spinner
        // that burnt CPU while "asleep" is seen, whatever its flags say).
        let idle = ka.spun();
        std::thread::sleep(Duration::from_millis(300));
        let used = ka.spun().saturating_sub(idle);
        assert!(used < Duration::from_millis(30), "asleep, used {used:?}");
        assert_eq!(ka.spinning(), 0);

        // Traffic keeps moving for a while: both spin.
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (moved.clone(), stop.clone());
        let traffic = std::thread::spawn(move || {
            while !s.load(Relaxed) {
                m.fetch_add(1, Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        wait_for("both spinners spinning", || ka.spinning() == 2);
        let spun = ka.spun();
        wait_for("spin time grows", || ka.spun() > spun);
        stop.store(true, Relaxed);
        traffic.join().unwrap();

        // A window after the last byte both are asleep, and stay so.
        wait_for("spinners asleep", || ka.spinning() == 0);
        std::thread::sleep(Duration::from_millis(100));
        let spun = ka.spun();
        std::thread::sleep(Duration::from_millis(300));
        let used = ka.spun().saturating_sub(spun);
        assert!(
            used < Duration::from_millis(30),
            "asleep without traffic, used {used:?}"
        );
        drop(ka);
    }
}
