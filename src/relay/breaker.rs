//! The relay's circuit breaker.
//!
//! Broker-level failures (all brokers down, request timeouts, transport
//! errors) open it: the relay stops claiming rows and retries nothing, and
//! nothing counts against any event's attempts. After a cool-down it lets one
//! probe through (half-open); a probe or a delivery that succeeds closes it,
//! a failed probe opens it again with a longer cool-down.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// What the breaker allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Relaying normally.
    Closed,
    /// The broker is unreachable: no claims until the next probe.
    Open,
    /// A probe is under way.
    HalfOpen,
}

/// The state machine, with time passed in.
#[derive(Debug)]
pub struct Breaker {
    state: BreakerState,
    base_cooldown: Duration,
    max_cooldown: Duration,
    cooldown: Duration,
    next_probe: Instant,
}

impl Breaker {
    /// A closed breaker whose first cool-down is `base_cooldown`, doubling
    /// after each failed probe up to `max_cooldown`.
    pub fn new(base_cooldown: Duration, max_cooldown: Duration, now: Instant) -> Self {
        Breaker {
            state: BreakerState::Closed,
            base_cooldown,
            max_cooldown,
            cooldown: base_cooldown,
            next_probe: now,
        }
    }

    /// Its current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// A broker-level failure: open (or stay open).
    pub fn trip(&mut self, now: Instant) {
        if self.state == BreakerState::Closed {
            self.cooldown = self.base_cooldown;
            self.next_probe = now + self.cooldown;
        }
        if self.state != BreakerState::HalfOpen {
            self.state = BreakerState::Open;
        }
    }

    /// A delivery or a probe succeeded: close.
    pub fn success(&mut self) {
        self.state = BreakerState::Closed;
        self.cooldown = self.base_cooldown;
    }

    /// Whether a probe should go out now; if so the breaker is half-open.
    pub fn probe_due(&mut self, now: Instant) -> bool {
        if self.state == BreakerState::Open && now >= self.next_probe {
            self.state = BreakerState::HalfOpen;
            return true;
        }
        false
    }

    /// The probe failed: open again, waiting twice as long (capped).
    pub fn probe_failed(&mut self, now: Instant) {
        if self.state == BreakerState::HalfOpen {
            self.cooldown = (self.cooldown * 2).min(self.max_cooldown);
            self.next_probe = now + self.cooldown;
            self.state = BreakerState::Open;
        }
    }

    /// Whether shard workers may read and send rows: only when closed.
    pub fn allows_claims(&self) -> bool {
        self.state == BreakerState::Closed
    }
}

/// The breaker shared by the producer's callbacks, the shard workers and
/// the prober; state changes are published for health checks and logs.
pub struct SharedBreaker {
    breaker: Mutex<Breaker>,
    changes: watch::Sender<BreakerState>,
}

impl SharedBreaker {
    /// A closed breaker; see [`Breaker::new`].
    pub fn new(base_cooldown: Duration, max_cooldown: Duration) -> Self {
        SharedBreaker {
            breaker: Mutex::new(Breaker::new(base_cooldown, max_cooldown, Instant::now())),
            changes: watch::channel(BreakerState::Closed).0,
        }
    }

    fn update(&self, change: impl FnOnce(&mut Breaker) -> bool) -> bool {
        let (result, state) = {
            let mut breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
            let result = change(&mut breaker);
            (result, breaker.state())
        };
        self.changes.send_if_modified(|current| {
            if *current != state {
                if *current == BreakerState::Closed {
                    metrics::counter!(crate::telemetry::names::BREAKER_OPENED).increment(1);
                }
                metrics::gauge!(crate::telemetry::names::BREAKER_STATE).set(match state {
                    BreakerState::Closed => 0.0,
                    BreakerState::Open => 1.0,
                    BreakerState::HalfOpen => 2.0,
                });
                match state {
                    BreakerState::Open => {
                        tracing::warn!("circuit breaker open: Kafka unreachable; relaying paused")
                    }
                    BreakerState::HalfOpen => {
                        tracing::info!("circuit breaker half-open: probing Kafka")
                    }
                    BreakerState::Closed => {
                        tracing::info!("circuit breaker closed: relaying resumed")
                    }
                }
                *current = state;
                true
            } else {
                false
            }
        });
        result
    }

    /// A broker-level failure; see [`Breaker::trip`].
    pub fn trip(&self) {
        self.update(|b| {
            b.trip(Instant::now());
            true
        });
    }

    /// A delivery or a probe succeeded: close.
    pub fn success(&self) {
        // Cheap when already closed: no lock contention worth avoiding here,
        // but skip the watch update.
        if *self.changes.borrow() == BreakerState::Closed {
            return;
        }
        self.update(|b| {
            b.success();
            true
        });
    }

    /// Whether a probe should go out now; if so the breaker is half-open.
    pub fn probe_due(&self) -> bool {
        self.update(|b| b.probe_due(Instant::now()))
    }

    /// The probe failed: open again, with a longer cool-down.
    pub fn probe_failed(&self) {
        self.update(|b| {
            b.probe_failed(Instant::now());
            true
        });
    }

    /// Whether shard workers may read and send rows: only when closed.
    pub fn allows_claims(&self) -> bool {
        *self.changes.borrow() == BreakerState::Closed
    }

    /// Follows the breaker's state changes.
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_probes_after_cooldown_backs_off_and_closes() {
        let base = Duration::from_secs(1);
        let mut breaker = Breaker::new(base, Duration::from_secs(4), Instant::now());
        assert!(breaker.allows_claims());

        breaker.trip(Instant::now());
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.allows_claims());
        assert!(
            !breaker.probe_due(Instant::now()),
            "no probe before the cool-down"
        );

        tokio::time::advance(base).await;
        assert!(breaker.probe_due(Instant::now()));
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(!breaker.allows_claims(), "half-open claims nothing");
        assert!(!breaker.probe_due(Instant::now()), "one probe at a time");

        // Failed probes double the cool-down up to the cap: 2s, then 4s, 4s.
        for cooldown in [2, 4, 4] {
            breaker.probe_failed(Instant::now());
            assert_eq!(breaker.state(), BreakerState::Open);
            tokio::time::advance(Duration::from_secs(cooldown) - Duration::from_millis(1)).await;
            assert!(!breaker.probe_due(Instant::now()));
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(breaker.probe_due(Instant::now()));
        }

        breaker.success();
        assert!(breaker.allows_claims());
        // The next outage starts again from the base cool-down.
        breaker.trip(Instant::now());
        tokio::time::advance(base).await;
        assert!(breaker.probe_due(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_while_open_does_not_postpone_the_probe() {
        let mut breaker = Breaker::new(
            Duration::from_secs(1),
            Duration::from_secs(30),
            Instant::now(),
        );
        breaker.trip(Instant::now());
        tokio::time::advance(Duration::from_millis(900)).await;
        breaker.trip(Instant::now());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(breaker.probe_due(Instant::now()));
    }
}
