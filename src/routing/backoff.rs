//! Exponential backoff with full jitter, and `Retry-After` parsing (seconds or HTTP date).

use std::time::{Duration, SystemTime};

/// Full jitter: a uniform delay in `[0, min(max, base * 2^retry))`, so retrying clients spread
/// out instead of arriving together. `unit` is a uniform sample in `[0, 1)`.
pub fn full_jitter(base: Duration, max: Duration, retry: u32, unit: f64) -> Duration {
    let ceiling = base
        .checked_mul(1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

/// `Retry-After` as delta-seconds or an HTTP date, relative to `now`. Dates in the past are zero.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    // A provider's number is added to the clock: a day is the most that means anything.
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds.min(86_400)));
    }
    if let Ok(seconds) = value.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Some(Duration::from_secs_f64(seconds.min(86_400.0)));
        }
        return None;
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_the_exponential_ceiling() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for retry in 0..10 {
            let ceiling = (base * 2u32.pow(retry)).min(max);
            for unit in [0.0, 0.25, 0.5, 0.999] {
                let d = full_jitter(base, max, retry, unit);
                assert!(d <= ceiling, "retry {retry}: {d:?} > {ceiling:?}");
            }
            assert_eq!(full_jitter(base, max, retry, 0.0), Duration::ZERO);
        }
        assert_eq!(full_jitter(base, max, 40, 0.5), Duration::from_secs(1));
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        // A huge value is capped, so adding it to the clock cannot overflow.
        let day = Some(Duration::from_secs(86_400));
        assert_eq!(parse_retry_after("18446744073709551615", now), day);
        assert_eq!(parse_retry_after("1e300", now), day);
        assert_eq!(
            parse_retry_after(" 1.5 ", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:42 GMT", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 25:00:00 GMT", now),
            None
        );
    }
}
