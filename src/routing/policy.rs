//! The failover policy: after each failed attempt, and when the plan runs out, what the exchange
//! does next. Pure: the exchange passes in the failure class, the tries so far, the settings,
//! the time left and a jitter sample, and does the IO the answer asks for.

use std::time::Duration;

use tokio::time::Instant;

use super::backoff::full_jitter;
use super::classify::Class;
use crate::config::Resilience;

/// One failed attempt, as the policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct Failed {
    pub class: Class,
    /// Attempts made on this target so far, this one included.
    pub tries: u32,
    /// The context window of the attempt's route, and the request's estimated prompt size.
    pub route_window: Option<u64>,
    pub prompt_tokens: u64,
    /// The provider's refusal was kept whole, so it can go back to the client as it is.
    pub answer_kept: bool,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Next {
    /// Try the same target again after this delay (if the retry budget allows).
    Retry { after: Duration },
    /// Go on with the next target of the plan.
    MoveOn {
        /// The prompt did not fit: skip every target whose window is at most this.
        context_limit: Option<u64>,
        /// The target is rate limited for this long: it may be waited for once the plan is done.
        rate_limited_for: Option<Duration>,
    },
    /// The request itself was refused: return the provider's answer to the client.
    ReturnAnswer,
}

impl Next {
    const MOVE_ON: Next = Next::MoveOn {
        context_limit: None,
        rate_limited_for: None,
    };
}

/// The next step after `failed`, with `left` until the request's deadline and `jitter` a
/// uniform sample in `[0, 1)` for the backoff.
pub fn after_failure(failed: Failed, r: &Resilience, left: Duration, jitter: f64) -> Next {
    let backoff = || {
        let retry = failed.tries.saturating_sub(1);
        full_jitter(r.backoff_base, r.backoff_max, retry, jitter)
    };
    let retry = |after: Duration| {
        if after < left {
            Next::Retry { after }
        } else {
            Next::MOVE_ON
        }
    };
    match failed.class {
        Class::ContextTooLong => Next::MoveOn {
            context_limit: Some(
                failed
                    .route_window
                    .unwrap_or(failed.prompt_tokens.saturating_sub(1)),
            ),
            rate_limited_for: None,
        },
        Class::ClientError if failed.answer_kept => Next::ReturnAnswer,
        Class::ClientError | Class::Silent | Class::Misconfigured | Class::LocalConfig => {
            Next::MOVE_ON
        }
        // "Retry the same target once" for server errors.
        Class::ServerError if failed.tries < r.attempts_per_target.min(2) => retry(backoff()),
        Class::Transient if failed.tries < r.attempts_per_target => retry(backoff()),
        Class::ServerError | Class::Transient => Next::MOVE_ON,
        Class::RateLimited(Some(after))
            if after <= r.backoff_max && failed.tries < r.attempts_per_target =>
        {
            retry(after)
        }
        Class::RateLimited(Some(after)) => Next::MoveOn {
            context_limit: None,
            rate_limited_for: Some(after),
        },
        Class::RateLimited(None) if failed.tries < r.attempts_per_target => retry(backoff()),
        Class::RateLimited(None) => Next::MOVE_ON,
    }
}

/// What to do when every target of the plan was tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtEnd {
    /// Wait until `at`, then try the plan's step `step` once more.
    WaitFor {
        step: usize,
        at: Instant,
    },
    GiveUp,
}

/// Once the plan is exhausted: wait for the soonest rate limit that clears before the
/// deadline, at most `rate_limit_waits` times per request; else give up. `limited` holds each
/// rate-limited step and when its limit clears.
pub fn at_end_of_plan(
    limited: &[(usize, Instant)],
    waits_so_far: u32,
    r: &Resilience,
    deadline: Instant,
) -> AtEnd {
    if waits_so_far >= r.rate_limit_waits {
        return AtEnd::GiveUp;
    }
    limited
        .iter()
        .filter(|(_, at)| *at < deadline)
        .min_by_key(|(_, at)| *at)
        .map_or(AtEnd::GiveUp, |&(step, at)| AtEnd::WaitFor { step, at })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn settings() -> Resilience {
        Resilience {
            attempts_per_target: 3,
            backoff_base: 100 * MS,
            backoff_max: 1000 * MS,
            rate_limit_waits: 1,
            ..Resilience::default()
        }
    }

    fn failed(class: Class, tries: u32) -> Failed {
        Failed {
            class,
            tries,
            route_window: None,
            prompt_tokens: 5000,
            answer_kept: true,
        }
    }

    fn retry(ms: u32) -> Next {
        Next::Retry { after: ms * MS }
    }

    const ON: Next = Next::MOVE_ON;

    #[test]
    fn each_failure_class_gets_its_step() {
        let r = settings();
        let long = Duration::from_secs(60);
        // (class, tries so far, time left, jitter) → next step
        let table: Vec<(Class, u32, Duration, f64, Next)> = vec![
            // Connection trouble: retried with full jitter (base × 2^retry), then moved on.
            (Class::Transient, 1, long, 0.5, retry(50)),
            (Class::Transient, 2, long, 0.5, retry(100)),
            (Class::Transient, 3, long, 0.5, ON),
            // Server errors: the same target once more, whatever attempts_per_target says.
            (Class::ServerError, 1, long, 0.99, retry(99)),
            (Class::ServerError, 2, long, 0.5, ON),
            // Silent and misconfigured targets are left at once.
            (Class::Silent, 1, long, 0.5, ON),
            (Class::Misconfigured, 1, long, 0.5, ON),
            // Nothing was sent: another try would fail the same way.
            (Class::LocalConfig, 1, long, 0.5, ON),
            // A Retry-After that fits the backoff ceiling is waited out on the same target.
            (Class::RateLimited(Some(800 * MS)), 1, long, 0.5, retry(800)),
            (
                Class::RateLimited(Some(800 * MS)),
                3,
                long,
                0.5,
                Next::MoveOn {
                    context_limit: None,
                    rate_limited_for: Some(800 * MS),
                },
            ),
            // A longer one moves on and is remembered for the wait at the end of the plan.
            (
                Class::RateLimited(Some(5000 * MS)),
                1,
                long,
                0.5,
                Next::MoveOn {
                    context_limit: None,
                    rate_limited_for: Some(5000 * MS),
                },
            ),
            // Without Retry-After: backoff.
            (Class::RateLimited(None), 1, long, 0.0, retry(0)),
            (Class::RateLimited(None), 3, long, 0.5, ON),
            // No retry that would end after the deadline.
            (Class::Transient, 1, 50 * MS, 0.5, ON),
            (Class::RateLimited(Some(800 * MS)), 1, 800 * MS, 0.5, ON),
            // The request's own fault goes back to the client.
            (Class::ClientError, 1, long, 0.5, Next::ReturnAnswer),
        ];
        for (class, tries, left, jitter, expected) in table {
            assert_eq!(
                after_failure(failed(class, tries), &r, left, jitter),
                expected,
                "{class:?} after {tries} tries with {left:?} left"
            );
        }
    }

    #[test]
    fn a_refusal_not_kept_whole_moves_on_and_a_too_long_prompt_skips_small_windows() {
        let r = settings();
        let long = Duration::from_secs(60);
        let lost = Failed {
            answer_kept: false,
            ..failed(Class::ClientError, 1)
        };
        assert_eq!(after_failure(lost, &r, long, 0.5), ON);

        let too_long = |route_window| Failed {
            route_window,
            ..failed(Class::ContextTooLong, 1)
        };
        assert_eq!(
            after_failure(too_long(Some(8000)), &r, long, 0.5),
            Next::MoveOn {
                context_limit: Some(8000),
                rate_limited_for: None
            }
        );
        // Without a configured window, the estimate says what did not fit.
        assert_eq!(
            after_failure(too_long(None), &r, long, 0.5),
            Next::MoveOn {
                context_limit: Some(4999),
                rate_limited_for: None
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_the_plan_waits_once_for_the_soonest_limit_that_clears_in_time() {
        let r = settings();
        let now = Instant::now();
        let deadline = now + Duration::from_secs(10);
        let limited = [
            (0, now + Duration::from_secs(4)),
            (2, now + Duration::from_secs(2)),
            (1, now + Duration::from_secs(11)),
        ];
        assert_eq!(
            at_end_of_plan(&limited, 0, &r, deadline),
            AtEnd::WaitFor {
                step: 2,
                at: now + Duration::from_secs(2)
            }
        );
        // One wait per request.
        assert_eq!(at_end_of_plan(&limited, 1, &r, deadline), AtEnd::GiveUp);
        // A limit that clears after the deadline is not waited for.
        assert_eq!(
            at_end_of_plan(&limited[2..], 0, &r, deadline),
            AtEnd::GiveUp
        );
        assert_eq!(at_end_of_plan(&[], 0, &r, deadline), AtEnd::GiveUp);
        let none = Resilience {
            rate_limit_waits: 0,
            ..settings()
        };
        assert_eq!(at_end_of_plan(&limited, 0, &none, deadline), AtEnd::GiveUp);
    }
}
