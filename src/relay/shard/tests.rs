//! The shard worker against a real SQLite store and a fake publisher whose
//! deliveries the tests complete by hand, one record at a time.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::*;
use crate::domain::{
    AppendBatch, EventId, EventStatus, NewEvent, TokenMode, TraceContext, TransactionToken,
};
use crate::relay::RelayWaker;
use crate::relay::publish::Placement;
use crate::store::DeadLetterFilter;
use crate::store::sqlite::SqliteStore;

/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long a test watches for something that must not happen: several
/// polls and retry delays of [`config`].
const QUIET: Duration = Duration::from_millis(400);

/// A record handed to the fake publisher; the test says what became of it.
struct Sent {
    row: RelayRow,
    outcome: oneshot::Sender<Delivery<Box<RelayRow>>>,
}

impl Sent {
    /// The test's name of the event: its payload.
    fn name(&self) -> String {
        String::from_utf8(self.row.payload.clone()).unwrap()
    }

    fn deliver(self, partition: i32, offset: i64) {
        let _ = self.outcome.send(Ok(Placement { partition, offset }));
    }

    fn fail(self, kind: FailureKind, error: &str) {
        let record = Box::new(self.row.clone());
        let _ = self.outcome.send(Err(failure(kind, error, Some(record))));
    }
}

fn failure(
    kind: FailureKind,
    error: &str,
    record: Option<Box<RelayRow>>,
) -> PublishFailure<Box<RelayRow>> {
    PublishFailure {
        kind,
        error_type: format!("{kind:?}"),
        error: error.to_owned(),
        record,
    }
}

/// What the fake publisher does with a record instead of taking it.
enum Refusal {
    QueueFull,
    Fail(FailureKind, &'static str),
}

/// Takes records in memory: each one is passed to the test, in the order
/// sent, and resolves when the test delivers or fails it.
struct FakePublisher {
    sent: mpsc::UnboundedSender<Sent>,
    /// Refusals for the next sends, in order.
    refusals: Mutex<VecDeque<Refusal>>,
    /// Every record taken, by name and the attempts its row had then.
    log: Mutex<Vec<(String, u32)>>,
    /// Copies to the dead-letter topic: (name, reason).
    dead_letter_copies: Mutex<Vec<(String, String)>>,
}

impl Publish for FakePublisher {
    type Record = Box<RelayRow>;
    type Pending = BoxFuture<'static, Delivery<Box<RelayRow>>>;

    fn send(
        &self,
        row: &RelayRow,
        _trace: Option<&TraceContext>,
    ) -> Result<Self::Pending, SendRefused<Box<RelayRow>>> {
        match self.refusals.lock().unwrap().pop_front() {
            Some(Refusal::QueueFull) => {
                return Err(SendRefused::QueueFull {
                    error_type: "QueueFull".into(),
                });
            }
            Some(Refusal::Fail(kind, error)) => {
                return Err(SendRefused::Failed(failure(
                    kind,
                    error,
                    Some(Box::new(row.clone())),
                )));
            }
            None => {}
        }
        let (outcome, delivery) = oneshot::channel();
        let sent = Sent {
            row: row.clone(),
            outcome,
        };
        self.log.lock().unwrap().push((sent.name(), row.attempts));
        self.sent.send(sent).expect("the test is listening");
        Ok(Box::pin(async move {
            delivery
                .await
                .unwrap_or_else(|_| Err(failure(FailureKind::Purged, "dropped", None)))
        }))
    }

    fn copy_to_dead_letter_topic(&self, record: &Self::Record, reason: &str) {
        let name = String::from_utf8(record.payload.clone()).unwrap();
        self.dead_letter_copies
            .lock()
            .unwrap()
            .push((name, reason.to_owned()));
    }
}

/// Short polls and retries, one shard.
fn config() -> RelayConfig {
    RelayConfig {
        shard_count: 1,
        poll_interval: Duration::from_millis(50),
        read_linger: Duration::ZERO,
        retry_base: Duration::from_millis(20),
        retry_cap: Duration::from_millis(40),
        drain_timeout: Duration::from_secs(1),
        max_attempts: 3,
        ..RelayConfig::default()
    }
}

/// `events` (name, ordering key) as one append of transaction
/// `transaction_id`; each event's payload is its name.
fn batch(transaction_id: &str, events: &[(&str, Option<&str>)]) -> AppendBatch {
    AppendBatch {
        token: TransactionToken {
            producer: "ledger".into(),
            transaction_id: transaction_id.into(),
            mode: TokenMode::Immediate,
        },
        sequence: 0,
        events: events
            .iter()
            .map(|(name, key)| NewEvent {
                event_id: None,
                topic: "accounts".into(),
                key: key.map(|key| key.as_bytes().to_vec()),
                payload: name.as_bytes().to_vec(),
                headers: vec![],
                aggregate_type: "account".into(),
                aggregate_id: String::new(),
                event_type: "changed".into(),
                occurred_at: None,
            })
            .collect(),
        trace: TraceContext::default(),
    }
}

/// A worker relaying shard 0 of a fresh SQLite store to a fake publisher.
struct Harness {
    store: Arc<dyn Store>,
    publisher: Arc<FakePublisher>,
    sent: mpsc::UnboundedReceiver<Sent>,
    breaker: Arc<SharedBreaker>,
    waker: RelayWaker,
    /// Event ids by name.
    ids: HashMap<String, EventId>,
    shutdown: CancellationToken,
    worker: JoinHandle<Result<(), ShardError>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// Appends `events` (name, ordering key) as one transaction, then
    /// starts the worker.
    async fn start(config: RelayConfig, events: &[(&str, Option<&str>)]) -> Harness {
        Self::launch(config, events, [], None).await
    }

    /// [`Harness::start`], with every event recorded in the same store
    /// unit, as the events of one segment are.
    async fn start_in_one_unit(config: RelayConfig, events: &[(&str, Option<&str>)]) -> Harness {
        Self::launch(config, events, [], Some(|_| 0)).await
    }

    /// [`Harness::start`], with the publisher refusing its first sends.
    async fn start_refusing(
        config: RelayConfig,
        events: &[(&str, Option<&str>)],
        refusals: impl IntoIterator<Item = Refusal>,
    ) -> Harness {
        Self::launch(config, events, refusals, None).await
    }

    async fn launch(
        config: RelayConfig,
        events: &[(&str, Option<&str>)],
        refusals: impl IntoIterator<Item = Refusal>,
        unit_of: Option<fn(i64) -> i64>,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/outboxd.db", dir.path().display());
        let store: Arc<dyn Store> = Arc::new(SqliteStore::connect(&url, 4, 1).await.unwrap());
        store.migrate().await.unwrap();
        let batch = batch("t1", events);
        let outcome = store.append(&[batch]).await.unwrap().remove(0).unwrap();
        let ids = events
            .iter()
            .map(|(name, _)| name.to_string())
            .zip(outcome.event_ids)
            .collect();
        let lease = store
            .acquire_leases("shard-test", Duration::from_secs(60), 1)
            .await
            .unwrap()
            .remove(0);
        let (sender, sent) = mpsc::unbounded_channel();
        let publisher = Arc::new(FakePublisher {
            sent: sender,
            refusals: Mutex::new(refusals.into_iter().collect()),
            log: Mutex::default(),
            dead_letter_copies: Mutex::default(),
        });
        let breaker = Arc::new(SharedBreaker::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
        ));
        let waker = RelayWaker::new(1);
        let worker = ShardWorker::new(
            lease,
            store.clone(),
            publisher.clone(),
            breaker.clone(),
            Arc::new(AtomicBool::new(false)),
            StatusBus::new(16),
            config,
        );
        let worker = match unit_of {
            Some(unit_of) => worker.with_recording_units(unit_of),
            None => worker,
        };
        let shutdown = CancellationToken::new();
        let worker = {
            let waker = waker.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let signal = waker.shard(0).expect("shard 0");
                worker.run(signal, shutdown).await
            })
        };
        Harness {
            store,
            publisher,
            sent,
            breaker,
            waker,
            ids,
            shutdown,
            worker,
            _dir: dir,
        }
    }

    /// Appends `events` as transaction `transaction_id` while the worker
    /// runs, and wakes it as the writers do.
    async fn append(&mut self, transaction_id: &str, events: &[(&str, Option<&str>)]) {
        let outcome = self
            .store
            .append(&[batch(transaction_id, events)])
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        for ((name, _), id) in events.iter().zip(outcome.event_ids) {
            self.ids.insert(name.to_string(), id);
        }
        self.waker.wake_shards(outcome.shards);
    }

    /// The next record the worker sends.
    async fn next_sent(&mut self) -> Sent {
        tokio::time::timeout(PATIENCE, self.sent.recv())
            .await
            .expect("a record to be sent")
            .expect("the publisher is alive")
    }

    /// The next record sent, which must be `name`'s with `attempts` so far.
    async fn expect_sent(&mut self, name: &str, attempts: u32) -> Sent {
        let sent = self.next_sent().await;
        assert_eq!(
            (sent.name().as_str(), sent.row.attempts),
            (name, attempts),
            "sent so far: {:?}",
            self.log()
        );
        sent
    }

    /// The next `count` records sent, by name.
    async fn sent_in_any_order(&mut self, count: usize) -> HashMap<String, Sent> {
        let mut sent = HashMap::new();
        for _ in 0..count {
            let next = self.next_sent().await;
            sent.insert(next.name(), next);
        }
        sent
    }

    /// Nothing is sent for a while.
    async fn expect_nothing_sent(&mut self) {
        if let Ok(Some(sent)) = tokio::time::timeout(QUIET, self.sent.recv()).await {
            panic!(
                "{} was sent (attempts {}); sent so far: {:?}",
                sent.name(),
                sent.row.attempts,
                self.log()
            );
        }
    }

    /// Every record taken so far: (name, attempts).
    fn log(&self) -> Vec<(String, u32)> {
        self.publisher.log.lock().unwrap().clone()
    }

    /// The names of the records taken so far, in order.
    fn names_sent(&self) -> Vec<String> {
        self.log().into_iter().map(|(name, _)| name).collect()
    }

    async fn status(&self, name: &str) -> EventStatus {
        self.store
            .status_by_ids(&[self.ids[name]])
            .await
            .unwrap()
            .remove(0)
    }

    /// `name`'s status once it is in `state`.
    async fn eventually(&self, name: &str, state: EventState) -> EventStatus {
        self.eventually_after(name, state, 0).await
    }

    /// `name`'s status once it is in `state` after at least `attempts`.
    async fn eventually_after(&self, name: &str, state: EventState, attempts: u32) -> EventStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let status = self.status(name).await;
            if status.state == state && status.attempts >= attempts {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is not {state:?} after {attempts} attempts: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `name` is dead-lettered after `attempts` with `reason`, and was
    /// copied to the dead-letter topic with it, the only one so far.
    async fn expect_dead_lettered(&self, name: &str, attempts: u32, reason: &str) {
        let status = self.status(name).await;
        assert_eq!(
            (status.state, status.attempts, status.reason.as_str()),
            (EventState::DeadLettered, attempts, reason)
        );
        assert_eq!(
            *self.publisher.dead_letter_copies.lock().unwrap(),
            [(name.to_owned(), reason.to_owned())]
        );
    }

    /// Stops the worker, which must not have failed.
    async fn stop(self) {
        self.shutdown.cancel();
        self.worker
            .await
            .expect("the worker does not panic")
            .expect("the worker keeps its lease");
    }
}

#[tokio::test]
async fn the_acks_of_one_store_unit_are_recorded_together_once_none_of_it_is_in_flight() {
    let mut relay = Harness::start_in_one_unit(
        RelayConfig {
            record_hold: Duration::from_secs(60),
            ..config()
        },
        &[("a1", Some("a")), ("b1", Some("b")), ("c1", Some("c"))],
    )
    .await;
    let mut sent = relay.sent_in_any_order(3).await;
    sent.remove("a1").unwrap().deliver(0, 0);
    sent.remove("b1").unwrap().deliver(0, 1);
    tokio::time::sleep(QUIET).await;
    for name in ["a1", "b1", "c1"] {
        assert_eq!(relay.status(name).await.state, EventState::Ready, "{name}");
    }
    sent.remove("c1").unwrap().deliver(0, 2);
    for (name, offset) in [("a1", 0), ("b1", 1), ("c1", 2)] {
        let status = relay.eventually(name, EventState::Published).await;
        assert_eq!(status.offset, Some(offset), "{name}");
    }
    // The unit holds nothing back once its records are all recorded.
    relay.append("t2", &[("d1", Some("d"))]).await;
    relay.expect_sent("d1", 0).await.deliver(0, 3);
    relay.eventually("d1", EventState::Published).await;
    relay.stop().await;
}

#[tokio::test]
async fn an_ack_waits_for_the_rest_of_its_store_unit_no_longer_than_the_record_hold() {
    let mut relay = Harness::start_in_one_unit(
        RelayConfig {
            record_hold: Duration::from_millis(100),
            ..config()
        },
        &[("a1", Some("a")), ("b1", Some("b"))],
    )
    .await;
    let mut sent = relay.sent_in_any_order(2).await;
    sent.remove("a1").unwrap().deliver(0, 0);
    let status = relay.eventually("a1", EventState::Published).await;
    assert_eq!(status.offset, Some(0));
    assert_eq!(relay.status("b1").await.state, EventState::Ready);
    sent.remove("b1").unwrap().deliver(0, 1);
    relay.eventually("b1", EventState::Published).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_stopping_worker_records_the_acks_that_wait_for_their_store_unit() {
    // The record hold outlasts the drain: the ack is recorded when the
    // drain gives up on the record still in flight.
    let mut relay = Harness::start_in_one_unit(
        RelayConfig {
            record_hold: Duration::from_secs(60),
            ..config()
        },
        &[("a1", Some("a")), ("b1", Some("b"))],
    )
    .await;
    let mut sent = relay.sent_in_any_order(2).await;
    sent.remove("a1").unwrap().deliver(0, 0);
    tokio::time::sleep(QUIET).await;
    assert_eq!(relay.status("a1").await.state, EventState::Ready);
    let store = relay.store.clone();
    let a1 = relay.ids["a1"];
    relay.stop().await;
    let status = store.status_by_ids(&[a1]).await.unwrap().remove(0);
    assert_eq!(status.state, EventState::Published);
    assert_eq!(status.offset, Some(0));
    drop(sent);
}

#[tokio::test]
async fn one_record_per_key_is_in_flight_while_other_keys_go_around() {
    let mut relay = Harness::start(
        config(),
        &[
            ("a1", Some("a")),
            ("a2", Some("a")),
            ("b1", Some("b")),
            ("a3", Some("a")),
            ("b2", Some("b")),
        ],
    )
    .await;
    let a1 = relay.expect_sent("a1", 0).await;
    let b1 = relay.expect_sent("b1", 0).await;
    relay.expect_nothing_sent().await;

    b1.deliver(1, 10);
    let b2 = relay.expect_sent("b2", 0).await;
    relay.expect_nothing_sent().await;

    a1.deliver(0, 10);
    let a2 = relay.expect_sent("a2", 0).await;
    relay.expect_nothing_sent().await;
    a2.deliver(0, 11);
    relay.expect_sent("a3", 0).await.deliver(0, 12);
    b2.deliver(1, 11);

    for (name, partition, offset) in [
        ("a1", 0, 10),
        ("a2", 0, 11),
        ("a3", 0, 12),
        ("b1", 1, 10),
        ("b2", 1, 11),
    ] {
        let status = relay.eventually(name, EventState::Published).await;
        assert_eq!(
            (status.partition, status.offset, status.attempts),
            (Some(partition), Some(offset), 0),
            "{name}"
        );
    }
    assert_eq!(relay.names_sent(), ["a1", "b1", "b2", "a2", "a3"]);
    relay.stop().await;
}

#[tokio::test]
async fn a_retried_record_holds_back_its_key_while_other_keys_go_on() {
    let mut relay = Harness::start(
        config(),
        &[
            ("a1", Some("a")),
            ("a2", Some("a")),
            ("b1", Some("b")),
            ("b2", Some("b")),
        ],
    )
    .await;
    let a1 = relay.expect_sent("a1", 0).await;
    let b1 = relay.expect_sent("b1", 0).await;
    a1.fail(FailureKind::Retriable, "not enough replicas");
    let retrying = relay.eventually("a1", EventState::Retrying).await;
    assert_eq!(
        (retrying.attempts, retrying.reason.as_str()),
        (1, "not enough replicas")
    );

    // Key b goes on; key a goes on with a1 again, never with a2.
    b1.deliver(1, 0);
    let mut sent = relay.sent_in_any_order(2).await;
    let b2 = sent.remove("b2").expect("b2 is sent");
    let a1 = sent.remove("a1").expect("a1 is sent again");
    assert_eq!(a1.row.attempts, 1, "the failed attempt is counted");
    relay.expect_nothing_sent().await;
    b2.deliver(1, 1);
    relay.eventually("b2", EventState::Published).await;
    relay.expect_nothing_sent().await;

    a1.deliver(0, 0);
    relay.expect_sent("a2", 0).await.deliver(0, 1);
    for name in ["a1", "a2", "b1", "b2"] {
        relay.eventually(name, EventState::Published).await;
    }
    let status = relay.status("a1").await;
    assert_eq!((status.attempts, status.reason.as_str()), (1, ""));
    let key_a: Vec<_> = relay
        .names_sent()
        .into_iter()
        .filter(|name| name.starts_with('a'))
        .collect();
    assert_eq!(key_a, ["a1", "a1", "a2"]);
    relay.stop().await;
}

#[tokio::test]
async fn retriable_failures_count_attempts_until_the_event_is_dead_lettered() {
    let mut relay = Harness::start(config(), &[("a1", Some("a")), ("a2", Some("a"))]).await;
    for attempts in 0..2 {
        relay
            .expect_sent("a1", attempts)
            .await
            .fail(FailureKind::Retriable, "request timed out");
        let status = relay
            .eventually_after("a1", EventState::Retrying, attempts + 1)
            .await;
        assert_eq!(status.attempts, attempts + 1);
        assert_eq!(status.reason, "request timed out");
    }
    // The third of `max_attempts` fails too: given up.
    relay
        .expect_sent("a1", 2)
        .await
        .fail(FailureKind::Retriable, "request timed out");
    // By default a dead letter lets the rest of its key pass.
    let a2 = relay.expect_sent("a2", 0).await;
    relay
        .expect_dead_lettered("a1", 3, "gave up after 3 attempts: request timed out")
        .await;
    a2.deliver(0, 0);
    relay.eventually("a2", EventState::Published).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_permanent_failure_dead_letters_at_once_and_the_key_moves_on() {
    let mut relay = Harness::start(config(), &[("a1", Some("a")), ("a2", Some("a"))]).await;
    relay
        .expect_sent("a1", 0)
        .await
        .fail(FailureKind::Permanent, "message too large");
    // a2 goes once a1 is recorded as dead.
    let a2 = relay.expect_sent("a2", 0).await;
    relay
        .expect_dead_lettered("a1", 1, "permanent failure: message too large")
        .await;
    a2.deliver(0, 0);
    relay.eventually("a2", EventState::Published).await;
    relay.expect_nothing_sent().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_record_refused_at_send_is_classified_like_a_failed_delivery() {
    let mut relay = Harness::start_refusing(
        config(),
        &[("a1", Some("a")), ("a2", Some("a"))],
        [Refusal::Fail(FailureKind::Permanent, "invalid record")],
    )
    .await;
    // a1 never reached the fake's queue; a2 follows once a1 is dead.
    let a2 = relay.expect_sent("a2", 0).await;
    relay
        .expect_dead_lettered("a1", 1, "permanent failure: invalid record")
        .await;
    a2.deliver(0, 0);
    relay.eventually("a2", EventState::Published).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_dead_letter_that_holds_its_key_stops_it_until_redriven() {
    let config = RelayConfig {
        dead_letter_holds_key: true,
        ..config()
    };
    let mut relay = Harness::start(
        config,
        &[("a1", Some("a")), ("a2", Some("a")), ("b1", Some("b"))],
    )
    .await;
    let a1 = relay.expect_sent("a1", 0).await;
    let b1 = relay.expect_sent("b1", 0).await;
    a1.fail(FailureKind::Permanent, "topic authorization failed");
    relay.eventually("a1", EventState::DeadLettered).await;
    b1.deliver(1, 0);
    relay.eventually("b1", EventState::Published).await;
    relay.expect_nothing_sent().await;
    assert_eq!(relay.status("a2").await.state, EventState::Ready);

    relay
        .store
        .redrive(&DeadLetterFilter {
            event_ids: vec![relay.ids["a1"]],
            ..DeadLetterFilter::default()
        })
        .await
        .unwrap();
    relay.waker.rewind_shards([0]);
    // Redriven with its attempts reset, and ahead of a2 still.
    relay.expect_sent("a1", 0).await.deliver(0, 0);
    relay.expect_sent("a2", 0).await.deliver(0, 1);
    for name in ["a1", "a2"] {
        relay.eventually(name, EventState::Published).await;
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_broker_level_failure_costs_no_attempt_and_waits_for_the_breaker() {
    let mut relay = Harness::start(config(), &[("a1", Some("a")), ("b1", Some("b"))]).await;
    let a1 = relay.expect_sent("a1", 0).await;
    relay.expect_sent("b1", 0).await.deliver(1, 0);
    relay.eventually("b1", EventState::Published).await;
    a1.fail(FailureKind::BrokerLevel, "all brokers down");

    // Nothing goes while the breaker is open, and nothing is recorded.
    relay.expect_nothing_sent().await;
    assert!(!relay.breaker.allows_claims());
    let status = relay.status("a1").await;
    assert_eq!((status.state, status.attempts), (EventState::Ready, 0));

    // The breaker closes (a probe got through): a1 goes again, free.
    relay.breaker.success();
    relay.waker.wake_all();
    relay.expect_sent("a1", 0).await.deliver(0, 0);
    let status = relay.eventually("a1", EventState::Published).await;
    assert_eq!(status.attempts, 0);
    relay.stop().await;
}

#[tokio::test]
async fn a_purged_record_is_sent_again_in_order_at_no_cost() {
    let mut relay = Harness::start(config(), &[("a1", Some("a")), ("a2", Some("a"))]).await;
    relay
        .expect_sent("a1", 0)
        .await
        .fail(FailureKind::Purged, "purged in flight");
    relay.expect_sent("a1", 0).await.deliver(0, 0);
    relay.expect_sent("a2", 0).await.deliver(0, 1);
    for name in ["a1", "a2"] {
        let status = relay.eventually(name, EventState::Published).await;
        assert_eq!(status.attempts, 0, "{name}");
    }
    assert!(relay.breaker.allows_claims(), "a purge is no broker outage");
    relay.stop().await;
}

#[tokio::test]
async fn a_full_queue_costs_nothing_and_the_record_goes_later() {
    let mut relay =
        Harness::start_refusing(config(), &[("a1", Some("a"))], [Refusal::QueueFull]).await;
    relay.expect_sent("a1", 0).await.deliver(0, 0);
    let status = relay.eventually("a1", EventState::Published).await;
    assert_eq!((status.attempts, status.reason.as_str()), (0, ""));
    relay.stop().await;
}

#[tokio::test]
async fn records_without_a_key_are_neither_gated_nor_held_back() {
    let mut relay = Harness::start(config(), &[("n1", None), ("n2", None), ("n3", None)]).await;
    // All three go at once: no key, no one-at-a-time.
    let n1 = relay.expect_sent("n1", 0).await;
    let n2 = relay.expect_sent("n2", 0).await;
    let n3 = relay.expect_sent("n3", 0).await;

    // n1's failure holds nothing back.
    n1.fail(FailureKind::Retriable, "leader not available");
    n3.deliver(0, 0);
    n2.deliver(0, 1);
    relay.expect_sent("n1", 1).await.deliver(0, 2);
    for (name, offset, attempts) in [("n1", 2, 1), ("n2", 1, 0), ("n3", 0, 0)] {
        let status = relay.eventually(name, EventState::Published).await;
        assert_eq!((status.offset, status.attempts), (Some(offset), attempts));
    }
    assert_eq!(relay.names_sent(), ["n1", "n2", "n3", "n1"]);
    relay.stop().await;
}

#[tokio::test]
async fn an_idle_shard_reads_a_new_commit_at_once_without_lingering() {
    // A linger and a poll far longer than the test's patience: only a
    // read at the wake-up can send the second event in time.
    let mut relay = Harness::start(
        RelayConfig {
            read_linger: Duration::from_secs(60),
            poll_interval: Duration::from_secs(60),
            ..config()
        },
        &[("a1", Some("a"))],
    )
    .await;
    relay.expect_sent("a1", 0).await.deliver(0, 0);
    relay.eventually("a1", EventState::Published).await;
    relay.append("t2", &[("b1", Some("b"))]).await;
    relay.expect_sent("b1", 0).await.deliver(0, 1);
    relay.eventually("b1", EventState::Published).await;
    relay.stop().await;
}
