//! Recomputation throttling after RFC 8405 (SPF back-off): a burst of changes makes one
//! recomputation, and a fabric that keeps changing is recomputed at a slower, bounded rate.
//!
//! States: `Quiet` → first event: run after `initial` (50 ms) → `ShortWait` (runs at most every
//! `short`, 200 ms) → after `learn` (500 ms) of continued events, `LongWait` (every `long`, 5 s)
//! → `Quiet` again once no event came for `hold_down` (10 s). Pure: the caller passes the time.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct BackoffParams {
    pub initial: Duration,
    pub short: Duration,
    pub long: Duration,
    pub hold_down: Duration,
    pub learn: Duration,
}

impl Default for BackoffParams {
    /// The values suggested by RFC 8405 §6 as used by ANCHORS §d 6.
    fn default() -> Self {
        BackoffParams {
            initial: Duration::from_millis(50),
            short: Duration::from_millis(200),
            long: Duration::from_secs(5),
            hold_down: Duration::from_secs(10),
            learn: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Quiet,
    ShortWait,
    LongWait,
}

#[derive(Debug)]
pub struct Backoff {
    p: BackoffParams,
    state: State,
    /// When the short-wait phase began (for the learn timer).
    short_since: Option<Instant>,
    last_event: Option<Instant>,
    /// A recomputation is due at this time.
    due: Option<Instant>,
}

impl Backoff {
    pub fn new(p: BackoffParams) -> Self {
        Backoff {
            p,
            state: State::Quiet,
            short_since: None,
            last_event: None,
            due: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    fn settle(&mut self, now: Instant) {
        if let Some(last) = self.last_event
            && now.duration_since(last) >= self.p.hold_down
            && self.due.is_none()
        {
            self.state = State::Quiet;
            self.short_since = None;
        }
        if self.state == State::ShortWait
            && let Some(since) = self.short_since
            && now.duration_since(since) >= self.p.learn
        {
            self.state = State::LongWait;
        }
    }

    /// A change arrived: returns when the recomputation covering it runs.
    pub fn event(&mut self, now: Instant) -> Instant {
        self.settle(now);
        self.last_event = Some(now);
        if let Some(due) = self.due {
            return due;
        }
        let delay = match self.state {
            State::Quiet => {
                self.state = State::ShortWait;
                self.short_since = Some(now);
                self.p.initial
            }
            State::ShortWait => self.p.short,
            State::LongWait => self.p.long,
        };
        let due = now + delay;
        self.due = Some(due);
        due
    }

    /// The pending recomputation, if any.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// The recomputation ran at `now`.
    pub fn ran(&mut self, now: Instant) {
        self.due = None;
        self.settle(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_makes_one_recomputation_then_backs_off_and_recovers() {
        let p = BackoffParams::default();
        let mut b = Backoff::new(p);
        let t0 = Instant::now();
        let due = b.event(t0);
        assert_eq!(due, t0 + p.initial);
        // 20 more events in the same 10 ms: all covered by the same run.
        for i in 0..20 {
            assert_eq!(b.event(t0 + Duration::from_micros(500 * i)), due);
        }
        b.ran(due);
        // Next event in short-wait: 200 ms.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.event(t1), t1 + p.short);
        b.ran(t1 + p.short);
        // Still changing after the learn interval: long wait.
        let t2 = t0 + Duration::from_millis(700);
        assert_eq!(b.event(t2), t2 + p.long);
        b.ran(t2 + p.long);
        assert_eq!(b.state(), State::LongWait);
        // Quiet for the hold-down: back to the fast initial delay.
        let t3 = t2 + p.long + p.hold_down;
        assert_eq!(b.event(t3), t3 + p.initial);
    }
}
