//! A circuit breaker per target: opens after N consecutive failures, then tests the target once
//! per cooldown. With background probing (the default) a cheap request the sidecar sends itself
//! tests it, and its success lets one user request through to confirm; without, the first user
//! request after the cooldown is the probe and the cooldown doubles on each failed one.

use tokio::time::Instant;

pub use crate::config::{BreakerConfig, ProbeMode};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    /// `until`: when the next probe is due. Under background probing, user requests are turned
    /// away until a background probe succeeds, however late it is.
    Open {
        until: Instant,
        probe: ProbeMode,
    },
    HalfOpen {
        probing: bool,
    },
}

/// What the breaker says about sending a request now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// The one request allowed through to test a target that was failing.
    Probe,
    Rejected,
}

/// The state as `/metrics` shows it: 0 closed, 1 open, 2 half-open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Clone, Debug)]
pub struct Breaker {
    state: State,
    /// Consecutive trips without a success in between: under request probing, each one
    /// doubles the cooldown.
    trips: u32,
    last_failure: Option<Instant>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: State::Closed { failures: 0 },
            trips: 0,
            last_failure: None,
        }
    }
}

impl Breaker {
    pub fn phase(&self, now: Instant) -> Phase {
        match self.state {
            State::Closed { .. } => Phase::Closed,
            State::Open {
                probe: ProbeMode::Background,
                ..
            } => Phase::Open,
            State::Open { until, .. } if now < until => Phase::Open,
            State::Open { .. } | State::HalfOpen { .. } => Phase::HalfOpen,
        }
    }

    /// True when a request now would be turned away.
    pub fn is_blocking(&self, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } => false,
            State::Open {
                probe: ProbeMode::Background,
                ..
            } => true,
            State::Open { until, .. } => now < until,
            State::HalfOpen { probing } => probing,
        }
    }

    /// Closed with no failure counted: nothing about this target needs a second look.
    pub fn is_clean(&self) -> bool {
        self.state == State::Closed { failures: 0 }
    }

    pub fn last_failure(&self) -> Option<Instant> {
        self.last_failure
    }

    /// Asks to send a request now; a half-open breaker admits exactly one probe at a time.
    pub fn admit(&mut self, now: Instant) -> Admission {
        if self.is_blocking(now) {
            return Admission::Rejected;
        }
        match self.state {
            State::Closed { .. } => Admission::Allowed,
            _ => {
                self.state = State::HalfOpen { probing: true };
                Admission::Probe
            }
        }
    }

    /// Lets one request through even though the breaker is open: used when every target of a
    /// request is open, so the sidecar tests one instead of refusing everything.
    pub fn force_probe(&mut self) -> Admission {
        match self.state {
            State::Closed { .. } => Admission::Allowed,
            State::HalfOpen { probing: true } => Admission::Rejected,
            _ => {
                self.state = State::HalfOpen { probing: true };
                Admission::Probe
            }
        }
    }

    /// When the next background probe is due, while one is wanted.
    pub fn background_probe_due(&self) -> Option<Instant> {
        match self.state {
            State::Open {
                until,
                probe: ProbeMode::Background,
            } => Some(until),
            _ => None,
        }
    }

    /// Takes the background probe that is due now, if any, and schedules the next one a
    /// cooldown later: a dead target is tested once per cooldown, however slow each test is.
    pub fn start_background_probe(&mut self, now: Instant, config: &BreakerConfig) -> bool {
        match self.state {
            State::Open {
                until,
                probe: ProbeMode::Background,
            } if now >= until => {
                self.state = State::Open {
                    until: now + config.cooldown,
                    probe: ProbeMode::Background,
                };
                true
            }
            _ => false,
        }
    }

    /// A background probe reached the target: the next user request confirms it (a reachable
    /// API is not yet a working model), and its success closes the breaker.
    pub fn on_background_success(&mut self) {
        if let State::Open {
            probe: ProbeMode::Background,
            ..
        } = self.state
        {
            self.state = State::HalfOpen { probing: false };
        }
    }

    /// A failure that tells nothing new about the state (a failed background probe).
    pub fn note_failure(&mut self, now: Instant) {
        self.last_failure = Some(now);
    }

    pub fn on_success(&mut self) {
        self.state = State::Closed { failures: 0 };
        self.trips = 0;
    }

    pub fn on_failure(&mut self, now: Instant, config: &BreakerConfig) {
        self.last_failure = Some(now);
        match self.state {
            State::Closed { failures } if failures + 1 < config.failures.max(1) => {
                self.state = State::Closed {
                    failures: failures + 1,
                };
            }
            State::Closed { .. } | State::HalfOpen { .. } => self.trip(now, config),
            // Failures of requests admitted before the trip change nothing.
            State::Open { .. } => {}
        }
    }

    /// A probe that ended without telling anything about the target's health (for example the
    /// client went away): the next request may probe again.
    pub fn on_inconclusive(&mut self) {
        if let State::HalfOpen { probing: true } = self.state {
            self.state = State::HalfOpen { probing: false };
        }
    }

    fn trip(&mut self, now: Instant, config: &BreakerConfig) {
        let cooldown = match config.probe {
            ProbeMode::Background => config.cooldown,
            ProbeMode::Request => {
                let factor = 1u32.checked_shl(self.trips.min(16)).unwrap_or(u32::MAX);
                config
                    .cooldown
                    .checked_mul(factor)
                    .unwrap_or(config.max_cooldown)
                    .min(config.max_cooldown)
            }
        };
        self.trips = self.trips.saturating_add(1);
        self.state = State::Open {
            until: now + cooldown,
            probe: config.probe,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The user-request probing these tests were written for.
    fn config() -> BreakerConfig {
        BreakerConfig {
            probe: ProbeMode::Request,
            ..BreakerConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_probes_once_after_cooldown() {
        let mut b = Breaker::default();
        let cfg = config();
        b.on_failure(Instant::now(), &cfg);
        b.on_failure(Instant::now(), &cfg);
        assert_eq!(b.admit(Instant::now()), Admission::Allowed);
        b.on_failure(Instant::now(), &cfg);
        assert_eq!(b.phase(Instant::now()), Phase::Open);
        assert_eq!(b.admit(Instant::now()), Admission::Rejected);

        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(b.admit(Instant::now()), Admission::Rejected);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.phase(Instant::now()), Phase::HalfOpen);
        assert_eq!(b.admit(Instant::now()), Admission::Probe);
        assert_eq!(
            b.admit(Instant::now()),
            Admission::Rejected,
            "one probe at a time"
        );
        b.on_success();
        assert_eq!(b.phase(Instant::now()), Phase::Closed);
        assert_eq!(b.admit(Instant::now()), Admission::Allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_failure_count() {
        let mut b = Breaker::default();
        let cfg = config();
        for _ in 0..10 {
            b.on_failure(Instant::now(), &cfg);
            b.on_failure(Instant::now(), &cfg);
            b.on_success();
        }
        assert_eq!(b.phase(Instant::now()), Phase::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_with_a_longer_cooldown_up_to_the_cap() {
        let mut b = Breaker::default();
        let cfg = config();
        for _ in 0..3 {
            b.on_failure(Instant::now(), &cfg);
        }
        let mut expected = Duration::from_secs(30);
        for _ in 0..6 {
            tokio::time::advance(expected - Duration::from_millis(1)).await;
            assert_eq!(
                b.admit(Instant::now()),
                Admission::Rejected,
                "still open before {expected:?}"
            );
            tokio::time::advance(Duration::from_millis(1)).await;
            assert_eq!(b.admit(Instant::now()), Admission::Probe);
            b.on_failure(Instant::now(), &cfg);
            expected = (expected * 2).min(cfg.max_cooldown);
        }
        assert_eq!(expected, Duration::from_secs(300));
        // Recovery resets the growth.
        tokio::time::advance(expected).await;
        assert_eq!(b.admit(Instant::now()), Admission::Probe);
        b.on_success();
        for _ in 0..3 {
            b.on_failure(Instant::now(), &cfg);
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.admit(Instant::now()), Admission::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn an_inconclusive_probe_frees_the_probe_slot_and_forced_probes_bypass_the_cooldown() {
        let mut b = Breaker::default();
        let cfg = config();
        for _ in 0..3 {
            b.on_failure(Instant::now(), &cfg);
        }
        assert_eq!(b.force_probe(), Admission::Probe);
        assert_eq!(b.force_probe(), Admission::Rejected);
        b.on_inconclusive();
        assert_eq!(b.admit(Instant::now()), Admission::Probe);
    }
}
