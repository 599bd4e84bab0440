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

/// A uniform sample in `[0, 1)` from a cheap thread-local generator.
pub fn unit_sample() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    fn seed() -> u64 {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        let addr = &nanos as *const u64 as u64;
        (nanos ^ addr.rotate_left(32)) | 1
    }
    STATE.with(|state| {
        // xorshift64*: plenty for jitter.
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    })
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
    let at = parse_http_date(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT` (the form RFC 9110 requires senders to use).
fn parse_http_date(value: &str) -> Option<SystemTime> {
    let mut parts = value.split_whitespace();
    let _weekday = parts.next()?;
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next()? != "GMT" || day == 0 || day > 31 || h > 23 || m > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day as i64);
    let secs = days.checked_mul(86_400)? + (h * 3600 + m * 60 + s) as i64;
    u64::try_from(secs)
        .ok()
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
    fn samples_are_uniform_enough_for_jitter() {
        let samples: Vec<f64> = (0..10_000).map(|_| unit_sample()).collect();
        assert!(samples.iter().all(|s| (0.0..1.0).contains(s)));
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        let low = samples.iter().filter(|s| **s < 0.1).count();
        assert!((800..1200).contains(&low), "{low} samples below 0.1");
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
