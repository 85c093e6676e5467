//! Property: for any interleaving of appends, commits, aborts and rollbacks
//! over a few keys, what reaches Kafka is exactly the committed events, in
//! append order per key. Real PostgreSQL (callers' transactions included), a
//! real broker, an independent consumer.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::time::Duration;

use outboxd::proto;
use outboxd::proto::outbox_client::OutboxClient;
use proptest::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use support::{
    AppendBuilder, CallerTransaction, EventBuilder, Gateway, Tansu, consume_until,
    first_sightings_by_key,
};
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy)]
enum Mode {
    TwoPhase,
    PostgresXid,
}

#[derive(Debug, Clone)]
struct PlannedTransaction {
    mode: Mode,
    /// Key index of each event.
    keys: Vec<usize>,
    commits: bool,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Append(usize),
    Resolve(usize),
}

fn transaction() -> impl Strategy<Value = PlannedTransaction> {
    (
        prop_oneof![Just(Mode::TwoPhase), Just(Mode::PostgresXid)],
        prop::collection::vec(0usize..3, 1..4),
        any::<bool>(),
    )
        .prop_map(|(mode, keys, commits)| PlannedTransaction {
            mode,
            keys,
            commits,
        })
}

/// A random order of every transaction's append and resolution, each
/// append before its resolution.
fn schedule(count: usize, seed: u64) -> Vec<Step> {
    let mut steps: Vec<Step> = (0..count)
        .flat_map(|t| [Step::Append(t), Step::Resolve(t)])
        .collect();
    steps.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let position = |steps: &[Step], wanted: fn(&Step, usize) -> bool, t| {
        steps.iter().position(|s| wanted(s, t)).unwrap()
    };
    for t in 0..count {
        let a = position(&steps, |s, t| matches!(s, Step::Append(x) if *x == t), t);
        let r = position(&steps, |s, t| matches!(s, Step::Resolve(x) if *x == t), t);
        if r < a {
            steps.swap(a, r);
        }
    }
    steps
}

struct Environment {
    runtime: tokio::runtime::Runtime,
    gateway: Gateway,
    caller_url: String,
    topic: String,
}

fn environment() -> &'static Environment {
    static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();
    ENVIRONMENT.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let (gateway, caller_url, topic) = runtime.block_on(async {
            let tansu = Tansu::shared();
            let topic = support::unique("interleavings");
            tansu.create_topic(&topic, 3).await;
            let store_url = support::fresh_database().await;
            let caller_url = support::fresh_database().await;
            let gateway = Gateway::start(support::test_config(&store_url, &tansu.bootstrap)).await;
            (gateway, caller_url, topic)
        });
        Environment {
            runtime,
            gateway,
            caller_url,
            topic,
        }
    })
}

async fn run_case(plan: Vec<PlannedTransaction>, seed: u64) {
    let env = environment();
    let mut client: OutboxClient<Channel> = env.gateway.client().await;
    let case = support::unique("case");
    let producer = format!("producer-{case}");
    let key = |k: usize| format!("{case}-key-{k}");
    let mut callers: HashMap<usize, CallerTransaction> = HashMap::new();
    let mut ids: HashMap<usize, Vec<String>> = HashMap::new();
    let mut appended_in_order: Vec<(usize, String, String)> = Vec::new();

    for step in schedule(plan.len(), seed) {
        match step {
            Step::Append(t) => {
                let planned = &plan[t];
                let transaction_id = format!("t{t}");
                let token = match planned.mode {
                    Mode::TwoPhase => support::two_phase_token(
                        &producer,
                        &transaction_id,
                        Duration::from_secs(600),
                    ),
                    Mode::PostgresXid => {
                        let caller = CallerTransaction::begin(&env.caller_url).await;
                        let token = caller.token(&producer, &transaction_id);
                        callers.insert(t, caller);
                        token
                    }
                };
                let events = planned.keys.iter().enumerate().map(|(i, k)| {
                    EventBuilder::new(&env.topic)
                        .key(key(*k))
                        .payload(format!("t{t}-e{i}"))
                });
                let response = client
                    .append(AppendBuilder::with_token(token).events(events).build())
                    .await
                    .unwrap()
                    .into_inner();
                for (id, k) in response.event_ids.iter().zip(&planned.keys) {
                    appended_in_order.push((t, key(*k), id.clone()));
                }
                ids.insert(t, response.event_ids);
            }
            Step::Resolve(t) => {
                let planned = &plan[t];
                let transaction_id = format!("t{t}");
                match (planned.mode, planned.commits) {
                    (Mode::TwoPhase, true) => {
                        client
                            .commit(proto::CommitRequest {
                                producer: producer.clone(),
                                transaction_id,
                            })
                            .await
                            .unwrap();
                    }
                    (Mode::TwoPhase, false) => {
                        client
                            .abort(proto::AbortRequest {
                                producer: producer.clone(),
                                transaction_id,
                            })
                            .await
                            .unwrap();
                    }
                    (Mode::PostgresXid, true) => callers.remove(&t).unwrap().commit().await,
                    (Mode::PostgresXid, false) => callers.remove(&t).unwrap().rollback().await,
                }
            }
        }
    }

    let committed: HashSet<usize> = (0..plan.len()).filter(|t| plan[*t].commits).collect();
    let expected: HashSet<String> = appended_in_order
        .iter()
        .filter(|(t, _, _)| committed.contains(t))
        .map(|(_, _, id)| id.clone())
        .collect();
    // Every event reaches a final state: PUBLISHED or DISCARDED.
    let all_ids: Vec<String> = appended_in_order
        .iter()
        .map(|(_, _, id)| id.clone())
        .collect();
    support::statuses_when(
        &client,
        &all_ids,
        "every event to be final",
        Duration::from_secs(30),
        |s| {
            s.state == proto::EventState::Published as i32
                || s.state == proto::EventState::Discarded as i32
        },
    )
    .await;

    let records = consume_until(
        &Tansu::shared().bootstrap,
        &env.topic,
        &expected,
        Duration::from_millis(1_500),
        Duration::from_secs(60),
    )
    .await;
    let mine: Vec<support::Consumed> = records
        .into_iter()
        .filter(|r| r.header("outbox-producer").as_deref() == Some(producer.as_str()))
        .collect();
    let found: HashSet<String> = mine.iter().map(|r| r.event_id()).collect();
    assert_eq!(
        found, expected,
        "exactly the committed events reached Kafka"
    );
    let order = first_sightings_by_key(&mine);
    for k in 0..3 {
        let wanted: Vec<String> = appended_in_order
            .iter()
            .filter(|(t, key_name, _)| committed.contains(t) && *key_name == key(k))
            .map(|(_, _, id)| id.clone())
            .collect();
        let got = order.get(key(k).as_bytes()).cloned().unwrap_or_default();
        assert_eq!(got, wanted, "key {k}: Kafka order equals append order");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn only_committed_events_reach_kafka_in_append_order(
        plan in prop::collection::vec(transaction(), 2..6),
        seed in any::<u64>(),
    ) {
        environment().runtime.block_on(run_case(plan, seed));
    }
}
