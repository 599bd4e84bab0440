//! Wall-clock time for the budgets' local days: the system clock in production, or a start
//! time advanced by tokio's clock so tests can cross midnight on paused time.

use std::time::Duration;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use tokio::time::Instant;

/// Where "now" comes from.
#[derive(Clone, Debug)]
pub enum Clock {
    System,
    /// `start` at `base`, then as far on as tokio's clock has moved since.
    FromTokio {
        start: Timestamp,
        base: Instant,
    },
}

impl Clock {
    /// Starts at `start` now and follows tokio's (possibly paused) clock.
    pub fn starting_at(start: Timestamp) -> Clock {
        Clock::FromTokio {
            start,
            base: Instant::now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        match self {
            Clock::System => Timestamp::now(),
            Clock::FromTokio { start, base } => {
                let elapsed = Instant::now().saturating_duration_since(*base);
                jiff::SignedDuration::try_from(elapsed)
                    .ok()
                    .and_then(|d| start.checked_add(d).ok())
                    .unwrap_or(*start)
            }
        }
    }
}

/// The local date in `tz` at `now`.
pub fn day(tz: &TimeZone, now: Timestamp) -> Date {
    tz.to_datetime(now).date()
}

/// How long from `now` until the next local midnight in `tz` (the day's reset); at least one
/// second, so a `Retry-After` is never 0.
pub fn until_reset(tz: &TimeZone, now: Timestamp) -> Duration {
    let next = day(tz, now)
        .tomorrow()
        .ok()
        .and_then(|d| d.to_zoned(tz.clone()).ok())
        .map(|z| z.timestamp());
    let secs = next
        .map(|n| n.as_second() - now.as_second())
        .unwrap_or(86_400);
    Duration::from_secs(secs.clamp(1, 2 * 86_400) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_is_at_local_midnight() {
        let shanghai = TimeZone::get("Asia/Shanghai").unwrap();
        // 15:30 UTC is 23:30 in Shanghai: half an hour to go there, 8.5 h in UTC.
        let now: Timestamp = "2025-03-01T15:30:00Z".parse().unwrap();
        assert_eq!(day(&shanghai, now).to_string(), "2025-03-01");
        assert_eq!(until_reset(&shanghai, now), Duration::from_secs(30 * 60));
        assert_eq!(
            until_reset(&TimeZone::UTC, now),
            Duration::from_secs(8 * 3600 + 30 * 60)
        );
        // A DST day in New York has 23 hours.
        let ny = TimeZone::get("America/New_York").unwrap();
        let morning: Timestamp = "2025-03-09T05:00:00Z".parse().unwrap(); // 00:00 EST
        assert_eq!(until_reset(&ny, morning), Duration::from_secs(23 * 3600));
    }
}
