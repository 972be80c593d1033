//! Capped exponential backoff with jitter, and the one retry helper every network call uses.
//!
//! Jitter is "equal jitter": half the exponential delay is kept, the other half is random, so
//! a fleet of agents reconnecting after a coordinator restart spreads out without any of them
//! retrying in a tight loop.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Delays between attempts: `initial`, doubling, never above `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max }
    }

    /// The delay before retry number `attempt` (0-based), jittered within [d/2, d].
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << attempt.min(20));
        let capped = exp.min(self.max);
        let half = capped / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Sleeps for `delay` unless `cancel` fires first; returns false when cancelled.
pub async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = cancel.cancelled() => false,
    }
}

/// Why [`retry`] gave up.
#[derive(Debug, PartialEq, Eq)]
pub enum RetryError<E> {
    /// The operation failed permanently, or still failed after the last attempt.
    Failed { error: E, attempts: u32 },
    /// The cancellation token fired.
    Cancelled,
}

/// Runs `op` until it succeeds, fails with an error `is_permanent` accepts, has been tried
/// `max_attempts` times, or `cancel` fires.
pub async fn retry<T, E, Fut>(
    backoff: Backoff,
    max_attempts: u32,
    is_permanent: impl Fn(&E) -> bool,
    cancel: &CancellationToken,
    mut op: impl FnMut(u32) -> Fut,
) -> Result<T, RetryError<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        if cancel.is_cancelled() {
            return Err(RetryError::Cancelled);
        }
        let result = tokio::select! {
            result = op(attempt) => result,
            _ = cancel.cancelled() => return Err(RetryError::Cancelled),
        };
        match result {
            Ok(value) => return Ok(value),
            Err(error) if is_permanent(&error) || attempt + 1 >= max_attempts => {
                return Err(RetryError::Failed {
                    error,
                    attempts: attempt + 1,
                });
            }
            Err(_) => {
                if !sleep_or_cancel(backoff.delay(attempt), cancel).await {
                    return Err(RetryError::Cancelled);
                }
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

    #[test]
    fn delays_grow_and_stay_capped() {
        for attempt in 0..40 {
            let d = B.delay(attempt);
            let full = (B.initial * 2u32.pow(attempt.min(20))).min(B.max);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} vs {full:?}"
            );
        }
        assert!(B.delay(30) <= B.max);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_then_succeeds() {
        let cancel = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let result = retry(
            B,
            5,
            |_: &&str| false,
            &cancel,
            |attempt| async move {
                if attempt < 3 {
                    Err("busy")
                } else {
                    Ok(attempt)
                }
            },
        )
        .await;
        assert_eq!(result, Ok(3));
        // Three waits: at least 50 + 100 + 200 ms of (paused, virtual) time.
        assert!(
            start.elapsed() >= Duration::from_millis(350),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_and_exhaustion_stop_early() {
        let cancel = CancellationToken::new();
        let result: Result<(), _> = retry(
            B,
            5,
            |e: &&str| *e == "forbidden",
            &cancel,
            |_| async { Err("forbidden") },
        )
        .await;
        assert_eq!(
            result,
            Err(RetryError::Failed {
                error: "forbidden",
                attempts: 1
            })
        );

        let result: Result<(), _> =
            retry(B, 4, |_: &&str| false, &cancel, |_| async { Err("busy") }).await;
        assert_eq!(
            result,
            Err(RetryError::Failed {
                error: "busy",
                attempts: 4
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_interrupts_the_wait() {
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            trigger.cancel();
        });
        let slow = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        let result: Result<(), _> = retry(
            slow,
            10,
            |_: &&str| false,
            &cancel,
            |_| async { Err("busy") },
        )
        .await;
        assert_eq!(result, Err(RetryError::Cancelled));
    }
}
