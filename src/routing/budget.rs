//! The retry budget: across the whole sidecar, retries may add at most `ratio` of the requests of
//! the last `window`, plus a small floor, so an outage does not multiply the load on providers.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Counts for one second. Slots are reused round-robin; a slot whose second has passed is reset
/// by the first request that lands on it, so recording is lock-free.
#[derive(Debug, Default)]
struct Slot {
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

const SLOTS: usize = 32;

#[derive(Debug)]
pub struct RetryBudget {
    window: u64,
    origin: Instant,
    slots: [Slot; SLOTS],
}

impl RetryBudget {
    /// `window` is rounded to whole seconds, between 1 and 30.
    pub fn new(window: Duration) -> RetryBudget {
        RetryBudget {
            window: window.as_secs().clamp(1, SLOTS as u64 - 2),
            origin: Instant::now(),
            slots: Default::default(),
        }
    }

    /// Seconds since the budget was made, plus one so that no live slot is ever second 0.
    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() + 1
    }

    fn current(&self, now: Instant) -> &Slot {
        let second = self.second(now);
        let slot = &self.slots[(second % SLOTS as u64) as usize];
        let seen = slot.second.load(Ordering::Acquire);
        if seen != second
            && slot
                .second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Release);
            slot.retries.store(0, Ordering::Release);
        }
        slot
    }

    /// Counts one request from a client.
    pub fn record_request(&self, now: Instant) {
        self.current(now).requests.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes one retry from the budget; false when it is spent. The ratio and floor come from
    /// the current config, so a reload changes them without losing the window's counts.
    pub fn try_retry(&self, now: Instant, ratio: f64, min_per_second: u32) -> bool {
        let slot = self.current(now);
        let second = self.second(now);
        let (mut requests, mut retries) = (0u64, 0u64);
        for s in &self.slots {
            let at = s.second.load(Ordering::Acquire);
            if at != 0 && at <= second && second - at < self.window {
                requests += s.requests.load(Ordering::Acquire) as u64;
                retries += s.retries.load(Ordering::Acquire) as u64;
            }
        }
        let allowed = min_per_second as f64 * self.window as f64 + ratio * requests as f64;
        if (retries as f64) < allowed {
            slot.retries.fetch_add(1, Ordering::AcqRel);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_capped_by_recent_traffic_plus_a_floor() {
        let budget = RetryBudget::new(Duration::from_secs(10));
        let now = Instant::now();
        for _ in 0..100 {
            budget.record_request(now);
        }
        // 20 % of 100 requests plus a floor of 1/s over 10 s.
        let granted = (0..100).filter(|_| budget.try_retry(now, 0.2, 1)).count();
        assert_eq!(granted, 30);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_as_the_window_moves_on() {
        let budget = RetryBudget::new(Duration::from_secs(2));
        assert!(budget.try_retry(Instant::now(), 0.0, 1));
        assert!(budget.try_retry(Instant::now(), 0.0, 1));
        assert!(!budget.try_retry(Instant::now(), 0.0, 1));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(budget.try_retry(Instant::now(), 0.0, 1));
    }
}
