//! Exponential backoff with jitter for retried deliveries.

use std::time::Duration;

use rand::Rng;

/// Delay before attempt `attempt + 1` after `attempt` failures (`attempt` ≥ 1):
/// `base · 2^(attempt-1)`, capped at `cap`, then a uniform "equal jitter" in
/// `[d/2, d]` so that failures of many events do not retry in lockstep.
pub fn retry_delay(attempt: u32, base: Duration, cap: Duration, rng: &mut impl Rng) -> Duration {
    let exponent = attempt.saturating_sub(1).min(32);
    let raw = base.saturating_mul(1u32 << exponent.min(31)).min(cap);
    let half = raw / 2;
    half + Duration::from_nanos(rng.random_range(0..=half.as_nanos().min(u64::MAX as u128) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn doubles_up_to_the_cap_with_bounded_jitter() {
        let mut rng = StdRng::seed_from_u64(7);
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(10);
        for (attempt, full) in [(1, 100), (2, 200), (3, 400), (8, 10_000), (40, 10_000)] {
            for _ in 0..100 {
                let delay = retry_delay(attempt, base, cap, &mut rng);
                let full = Duration::from_millis(full);
                assert!(
                    delay >= full / 2 && delay <= full,
                    "attempt {attempt}: {delay:?}"
                );
            }
        }
    }
}
