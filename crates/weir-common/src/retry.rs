//! Retries with exponential backoff and full jitter, driven by the error's retry hint.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

use crate::Error;

/// How often and how patiently to retry an operation that failed externally.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts, the first included; 1 disables retries.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubled for every further attempt.
    pub initial_backoff: Duration,
    /// Upper bound for one delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1` (attempt counts from 1): a random value in
    /// `[0, min(cap, initial * 2^(attempt-1))]` ("full jitter"), so retrying workers spread out.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
        let cap = exp.min(self.max_backoff);
        let millis = cap.as_millis() as u64;
        if millis == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis))
    }
}

/// Runs `op` until it succeeds, fails with a non-retryable error, or runs out of attempts.
/// `on_retry` is told about every failed attempt that will be retried.
pub async fn retry<T, F, Fut>(
    policy: &RetryPolicy,
    mut on_retry: impl FnMut(u32, &Error, Duration),
    mut op: F,
) -> Result<T, Error>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut attempt = 1;
    loop {
        match op(attempt).await {
            Ok(value) => return Ok(value),
            Err(err) if err.retryable && attempt < policy.max_attempts.max(1) => {
                let delay = policy.backoff(attempt);
                on_retry(attempt, &err, delay);
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn retries_external_until_success() {
        let mut retries = 0;
        let out = retry(
            &fast(),
            |_, _, _| retries += 1,
            |attempt| async move {
                if attempt < 3 {
                    Err(Error::external("flaky"))
                } else {
                    Ok(attempt)
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(out, 3);
        assert_eq!(retries, 2);
    }

    #[tokio::test]
    async fn user_errors_fail_at_once() {
        let mut calls = 0;
        let err = retry(
            &fast(),
            |_, _, _| {},
            |_| {
                calls += 1;
                async { Err::<(), _>(Error::user("bad config")) }
            },
        )
        .await
        .unwrap_err();
        assert_eq!(calls, 1);
        assert_eq!(err.message, "bad config");
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts() {
        let mut calls = 0;
        let _ = retry(
            &fast(),
            |_, _, _| {},
            |_| {
                calls += 1;
                async { Err::<(), _>(Error::external("down")) }
            },
        )
        .await;
        assert_eq!(calls, 4);
    }

    #[test]
    fn backoff_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
        };
        for attempt in 1..10 {
            assert!(p.backoff(attempt) <= Duration::from_millis(1000));
        }
        assert!(p.backoff(1) >= Duration::from_millis(50));
    }

    /// With tokio's paused clock the sleeps take no real time but are measured exactly.
    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_with_jitter_on_a_fake_clock() {
        let p = RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
        };
        let mut delays = Vec::new();
        let start = tokio::time::Instant::now();
        let _ = retry(
            &p,
            |_, _, d| delays.push(d),
            |_| async { Err::<(), _>(Error::external("down")) },
        )
        .await;
        let caps = [1u64, 2, 4, 8, 8];
        assert_eq!(delays.len(), caps.len());
        for (d, cap) in delays.iter().zip(caps) {
            let cap = Duration::from_secs(cap);
            assert!(
                *d <= cap && *d >= cap / 2,
                "{d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        let slept = start.elapsed();
        assert_eq!(slept, delays.iter().sum::<Duration>());
    }
}
