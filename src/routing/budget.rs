//! The retry budget: across the whole sidecar, retries may add at most `ratio` of the requests of
//! the last `window`, plus a small floor, so an outage does not multiply the load on providers.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Counts per one-second slot over the window.
#[derive(Debug)]
struct Slot {
    start: Instant,
    requests: u32,
    retries: u32,
}

#[derive(Debug)]
pub struct RetryBudget {
    window: Duration,
    slots: Mutex<VecDeque<Slot>>,
}

impl RetryBudget {
    pub fn new(window: Duration) -> RetryBudget {
        RetryBudget {
            window,
            slots: Mutex::new(VecDeque::new()),
        }
    }

    fn with_current<T>(&self, now: Instant, f: impl FnOnce(&mut VecDeque<Slot>) -> T) -> T {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        while slots
            .front()
            .is_some_and(|s| now.duration_since(s.start) >= self.window)
        {
            slots.pop_front();
        }
        if slots
            .back()
            .is_none_or(|s| now.duration_since(s.start) >= Duration::from_secs(1))
        {
            slots.push_back(Slot {
                start: now,
                requests: 0,
                retries: 0,
            });
        }
        f(&mut slots)
    }

    /// Counts one request from a client.
    pub fn record_request(&self, now: Instant) {
        self.with_current(now, |slots| {
            if let Some(slot) = slots.back_mut() {
                slot.requests += 1;
            }
        });
    }

    /// Takes one retry from the budget; false when it is spent. The ratio and floor come from
    /// the current config, so a reload changes them without losing the window's counts.
    pub fn try_retry(&self, now: Instant, ratio: f64, min_per_second: u32) -> bool {
        let floor = min_per_second as f64 * self.window.as_secs_f64();
        self.with_current(now, |slots| {
            let (requests, retries) = slots.iter().fold((0u64, 0u64), |(q, r), s| {
                (q + s.requests as u64, r + s.retries as u64)
            });
            let allowed = floor + ratio * requests as f64;
            if (retries as f64) < allowed {
                if let Some(slot) = slots.back_mut() {
                    slot.retries += 1;
                }
                true
            } else {
                false
            }
        })
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
