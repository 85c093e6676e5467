//! Producer watches against concurrent writers: a watch resumed from any
//! cursor it was given learns every final state that came after it.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use outboxd::proto;
use outboxd::proto::outbox_client::OutboxClient;
use support::{Gateway, MockKafka, append_request, immediate_token, keyed_event};
use tonic::transport::Channel;

/// Every update a producer watch from `after` delivered so far, in order.
fn follow(
    channel: Channel,
    producer: &str,
    after: u64,
) -> (
    Arc<Mutex<Vec<proto::EventStatus>>>,
    tokio::task::JoinHandle<()>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let task = tokio::spawn({
        let seen = seen.clone();
        let producer = producer.to_owned();
        async move {
            let mut stream = OutboxClient::new(channel)
                .watch_status(proto::WatchStatusRequest {
                    producer,
                    after_cursor: after,
                    ..Default::default()
                })
                .await
                .expect("a producer watch")
                .into_inner();
            while let Some(update) = stream.next().await {
                let status = match update {
                    Ok(update) => update.status.expect("a status"),
                    // Ends the watch; the test says so if it misses events.
                    Err(status) => panic!("the watch failed: {status}"),
                };
                seen.lock().unwrap().push(status);
            }
        }
    });
    (seen, task)
}

/// The ids of the events whose final state is among `statuses`.
fn finals(statuses: &Mutex<Vec<proto::EventStatus>>) -> HashSet<String> {
    statuses
        .lock()
        .unwrap()
        .iter()
        .filter(|s| is_final(s.state))
        .map(|s| s.event_id.clone())
        .collect()
}

fn is_final(state: i32) -> bool {
    [
        proto::EventState::Published as i32,
        proto::EventState::DeadLettered as i32,
        proto::EventState::Discarded as i32,
    ]
    .contains(&state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_resumed_from_any_cursor_misses_no_final_state() {
    const WRITERS: usize = 8;
    const APPENDS: usize = 40;
    const EVENTS: usize = 5;
    let kafka = MockKafka::start(1);
    let topic = support::unique("watched");
    kafka.create_topic(&topic, 4).await;
    let mut config = support::test_config(&support::fresh_database().await, &kafka.bootstrap);
    config.ingest.writers = 4;
    let gateway = Gateway::start(config).await;
    let channel = gateway.channel().await;
    let (first, first_task) = follow(channel.clone(), "watched", 0);

    let writers = (0..WRITERS).map(|writer| {
        let mut client = OutboxClient::new(channel.clone());
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..APPENDS {
                let events = (0..EVENTS)
                    .map(|e| keyed_event(&topic, &format!("k{writer}-{}", (n + e) % 7), b"x"))
                    .collect();
                let request = append_request(
                    immediate_token("watched", &format!("w{writer}-{n}")),
                    events,
                );
                ids.extend(client.append(request).await.unwrap().into_inner().event_ids);
            }
            ids
        })
    });
    let mut all: HashSet<String> = HashSet::new();
    for writer in writers {
        all.extend(writer.await.unwrap());
    }
    assert_eq!(all.len(), WRITERS * APPENDS * EVENTS);

    // The first watch learns every final state.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !all.is_subset(&finals(&first)) {
        if std::time::Instant::now() > deadline {
            // Say whether the events are not final in the store, or final
            // there and missing from the watch.
            let missing: Vec<String> = all.difference(&finals(&first)).cloned().collect();
            let stored = OutboxClient::new(channel.clone())
                .get_status(proto::GetStatusRequest {
                    event_ids: missing.iter().take(1_000).cloned().collect(),
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let mut states = std::collections::BTreeMap::<i32, usize>::new();
                    for status in r.into_inner().events {
                        *states.entry(status.state).or_default() += 1;
                    }
                    format!("{states:?}")
                })
                .unwrap_or_else(|status| format!("GetStatus failed: {status}"));
            let ended = if first_task.is_finished() {
                match first_task.await {
                    Err(error) if error.is_panic() => format!("it ended: {error}"),
                    _ => "it ended".to_owned(),
                }
            } else {
                "it is still open".to_owned()
            };
            panic!(
                "after 60s the first watch had not seen {} of {} events final ({} updates; {ended}); \
                 their states in the store (EventState number: count): {stored}",
                missing.len(),
                all.len(),
                first.lock().unwrap().len(),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first_task.abort();
    let delivered: Vec<proto::EventStatus> = first.lock().unwrap().clone();

    // Resumed from a spread of the cursors it gave, a watch must deliver
    // the final state of every event whose final state came later.
    let step = (delivered.len() / 25).max(1);
    for index in (0..delivered.len()).step_by(step) {
        let cursor = delivered[index].cursor;
        let expected: HashSet<String> = delivered[index + 1..]
            .iter()
            .filter(|s| is_final(s.state))
            .map(|s| s.event_id.clone())
            .collect();
        let (resumed, task) = follow(channel.clone(), "watched", cursor);
        let outcome = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if expected.is_subset(&finals(&resumed)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        task.abort();
        if outcome.is_err() {
            let missed = expected.difference(&finals(&resumed)).count();
            panic!(
                "resumed after cursor {cursor} (update {index} of {}), the watch missed {missed} final states",
                delivered.len()
            );
        }
    }
    gateway.stop().await;
}

/// A watch on event ids started right after their append, while they are
/// still on their way, ends once every one of them is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_fresh_events_ends_when_they_are_published() {
    let kafka = MockKafka::start(1);
    let topic = support::unique("fresh");
    kafka.create_topic(&topic, 3).await;
    let gateway = Gateway::start(support::test_config(
        &support::fresh_database().await,
        &kafka.bootstrap,
    ))
    .await;
    let mut client = gateway.client().await;
    for round in 0..30 {
        let ids = client
            .append(append_request(
                immediate_token("fresh", &format!("t{round}")),
                (0..4)
                    .map(|n| keyed_event(&topic, &format!("k{n}"), format!("{round}")))
                    .collect(),
            ))
            .await
            .unwrap()
            .into_inner()
            .event_ids;
        let mut stream = client
            .watch_status(proto::WatchStatusRequest {
                event_ids: ids.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut published = HashSet::new();
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(update) = stream.next().await {
                let status = update.unwrap().status.unwrap();
                if status.state == proto::EventState::Published as i32 {
                    published.insert(status.event_id);
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "round {round}: the watch did not end; published {published:?} of {ids:?}"
        );
        assert_eq!(published.len(), ids.len(), "round {round}");
    }
    gateway.stop().await;
}
