//! One budget's counts for its current local day, in integer nano-USD under a mutex: exact
//! under concurrency, and a reservation that would pass the cap is refused in the same step
//! that checks it. In memory it is the store; with Redis it mirrors the shared count.

use std::sync::Mutex;

use jiff::civil::Date;

/// Nano-USD: integers add exactly, and an i64 holds 9 billion USD.
pub type Nanos = i64;

const NANOS_PER_USD: f64 = 1e9;

/// USD to nano-USD, rounded up: a reservation never covers less than its worst case.
pub fn nanos_ceil(usd: f64) -> Nanos {
    if usd.is_finite() && usd > 0.0 {
        (usd * NANOS_PER_USD).ceil().min(i64::MAX as f64) as Nanos
    } else {
        0
    }
}

/// USD to nano-USD, to the nearest: an actual cost.
pub fn nanos_round(usd: f64) -> Nanos {
    if usd.is_finite() && usd > 0.0 {
        (usd * NANOS_PER_USD).round().min(i64::MAX as f64) as Nanos
    } else {
        0
    }
}

pub fn usd(nanos: Nanos) -> f64 {
    nanos as f64 / NANOS_PER_USD
}

/// A budget-day's spend: settled, and reserved by attempts still under way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub spent: Nanos,
    pub reserved: Nanos,
}

impl Counts {
    /// What counts against the cap: reservations count as spent until they settle.
    pub fn used(&self) -> Nanos {
        self.spent.saturating_add(self.reserved)
    }
}

#[derive(Debug, Default)]
struct Day {
    date: Option<Date>,
    counts: Counts,
    /// The `alert_at` levels (by index) already raised this day.
    alerted: u64,
    /// A reservation was refused and nothing has been freed since.
    refusing: bool,
}

impl Day {
    /// This day's state, after moving on to `date` if it is a later day.
    fn at(&mut self, date: Date) -> Option<&mut Day> {
        match self.date {
            Some(d) if d > date => None,
            Some(d) if d == date => Some(self),
            _ => {
                *self = Day {
                    date: Some(date),
                    ..Day::default()
                };
                Some(self)
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Ledger {
    day: Mutex<Day>,
}

/// What a look at a ledger shows for one day.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub counts: Counts,
    pub refusing: bool,
}

impl Ledger {
    fn locked(&self) -> std::sync::MutexGuard<'_, Day> {
        self.day.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `amount` to the reserved count when spent + reserved + amount stays within `cap`
    /// (or always, with `force`); the counts after, or the counts that refused it.
    pub fn try_reserve(
        &self,
        date: Date,
        amount: Nanos,
        cap: Nanos,
        force: bool,
    ) -> Result<Counts, Counts> {
        let mut day = self.locked();
        let Some(day) = day.at(date) else {
            // The clock went back past a day boundary: refuse nothing, count nothing.
            return Ok(Counts::default());
        };
        if !force && day.counts.used().saturating_add(amount) > cap {
            day.refusing = true;
            return Err(day.counts);
        }
        day.counts.reserved = day.counts.reserved.saturating_add(amount);
        Ok(day.counts)
    }

    /// Takes `reserved` off the reserved count and adds `actual` to the spent count of `date`;
    /// `None` when that day is over (its counts are gone with it).
    pub fn settle(&self, date: Date, reserved: Nanos, actual: Nanos) -> Option<Counts> {
        let mut day = self.locked();
        if day.date != Some(date) {
            return None;
        }
        day.counts.reserved = (day.counts.reserved - reserved).max(0);
        day.counts.spent = day.counts.spent.saturating_add(actual);
        if actual < reserved {
            day.refusing = false;
        }
        Some(day.counts)
    }

    /// The shared store's counts for `date`, as it answered.
    pub fn observe(&self, date: Date, counts: Counts) {
        let mut day = self.locked();
        if let Some(day) = day.at(date) {
            if counts.used() < day.counts.used() {
                day.refusing = false;
            }
            day.counts = counts;
        }
    }

    /// The shared store refused a reservation for lack of room.
    pub fn mark_refusing(&self, date: Date) {
        if let Some(day) = self.locked().at(date) {
            day.refusing = true;
        }
    }

    pub fn state(&self, date: Date) -> State {
        let day = self.locked();
        match day.date {
            Some(d) if d == date => State {
                counts: day.counts,
                refusing: day.refusing,
            },
            _ => State::default(),
        }
    }

    /// The `alert_at` levels reached for the first time on `date`, now marked as raised: the
    /// used share of `cap`, or the whole cap once reservations are refused.
    pub fn new_alerts(&self, date: Date, cap: Nanos, levels: &[f64]) -> Vec<f64> {
        let mut day = self.locked();
        let Some(day) = day.at(date) else {
            return Vec::new();
        };
        let share = if day.refusing {
            1.0
        } else {
            day.counts.used() as f64 / cap.max(1) as f64
        };
        let mut raised = Vec::new();
        for (i, level) in levels.iter().enumerate().take(64) {
            let bit = 1u64 << i;
            if share >= *level && day.alerted & bit == 0 {
                day.alerted |= bit;
                raised.push(*level);
            }
        }
        raised
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(s: &str) -> Date {
        s.parse().unwrap()
    }

    #[test]
    fn reserve_and_settle_arithmetic() {
        let l = Ledger::default();
        let d = date("2025-03-01");
        let cap = nanos_ceil(1.0);
        assert_eq!(
            l.try_reserve(d, nanos_ceil(0.6), cap, false),
            Ok(Counts {
                spent: 0,
                reserved: 600_000_000
            })
        );
        // 0.6 + 0.5 > 1: refused, nothing changes.
        assert!(l.try_reserve(d, nanos_ceil(0.5), cap, false).is_err());
        assert!(l.state(d).refusing);
        // Settled at 0.25 of the 0.6 reserved: the rest is free again.
        assert_eq!(
            l.settle(d, nanos_ceil(0.6), nanos_round(0.25)),
            Some(Counts {
                spent: 250_000_000,
                reserved: 0
            })
        );
        assert!(!l.state(d).refusing);
        assert!(l.try_reserve(d, nanos_ceil(0.75), cap, false).is_ok());
        // Over the worst case (a longer answer than max_tokens said): the actual cost counts.
        assert_eq!(
            l.settle(d, nanos_ceil(0.75), nanos_round(0.8))
                .unwrap()
                .spent,
            1_050_000_000
        );
        // A released reservation (settled at 0) leaves nothing behind.
        let e = Ledger::default();
        e.try_reserve(d, 5, 10, false).unwrap();
        assert_eq!(e.settle(d, 5, 0), Some(Counts::default()));
    }

    #[test]
    fn a_new_day_starts_from_zero_and_yesterdays_settle_is_dropped() {
        let l = Ledger::default();
        let (d1, d2) = (date("2025-03-01"), date("2025-03-02"));
        l.try_reserve(d1, 10, 10, false).unwrap();
        assert!(l.try_reserve(d1, 1, 10, false).is_err());
        assert_eq!(l.try_reserve(d2, 10, 10, false).unwrap().reserved, 10);
        assert_eq!(l.settle(d1, 10, 10), None);
        assert_eq!(l.state(d2).counts.reserved, 10);
        assert_eq!(l.state(d1), State::default());
    }

    #[test]
    fn each_alert_level_is_raised_once_a_day() {
        let l = Ledger::default();
        let d = date("2025-03-01");
        let levels = [0.5, 0.8, 1.0];
        l.try_reserve(d, 85, 100, false).unwrap();
        assert_eq!(l.new_alerts(d, 100, &levels), [0.5, 0.8]);
        assert!(l.new_alerts(d, 100, &levels).is_empty());
        assert!(l.try_reserve(d, 20, 100, false).is_err());
        assert_eq!(l.new_alerts(d, 100, &levels), [1.0]);
        let next = date("2025-03-02");
        l.try_reserve(next, 60, 100, false).unwrap();
        assert_eq!(l.new_alerts(next, 100, &levels), [0.5]);
    }
}
