//! `outboxd tail`: a small consumer that prints a topic's records with their
//! headers, for a look at what reached Kafka.

use std::time::Duration;

use clap::Args;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug, Clone)]
pub struct TailArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "OUTBOXD_KAFKA_BROKERS")]
    pub brokers: String,
    /// Topic to read.
    #[arg(long)]
    pub topic: String,
    /// Start at the end of each partition instead of the beginning.
    #[arg(long)]
    pub from_end: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop when no record arrived for this long (e.g. "5s").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_exit: Option<Duration>,
}

/// One record as read back from Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl TailRecord {
    fn from_message(message: &BorrowedMessage<'_>) -> Self {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        TailRecord {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// The value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    }
}

/// A consumer assigned to every partition of `topic`, without a group.
pub fn assigned_consumer(
    brokers: &str,
    topic: &str,
    from_end: bool,
) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("outboxd-tail-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic:?} has no partitions");
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment.add_partition_offset(
            topic,
            partition,
            if from_end {
                Offset::End
            } else {
                Offset::Beginning
            },
        )?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Reads records until `done` says so, `idle` passes with no record, or
/// `shutdown`. Blocking: run it off the async runtime.
pub fn read_records(
    consumer: &BaseConsumer,
    idle: Option<Duration>,
    shutdown: &CancellationToken,
    mut on_record: impl FnMut(TailRecord) -> bool,
) -> anyhow::Result<()> {
    let mut last = std::time::Instant::now();
    while !shutdown.is_cancelled() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                last = std::time::Instant::now();
                if !on_record(TailRecord::from_message(&message)) {
                    return Ok(());
                }
            }
            Some(Err(error)) => return Err(error.into()),
            None => {
                if idle.is_some_and(|idle| last.elapsed() >= idle) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

fn printable(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => format!(
            "0x{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

pub async fn run(args: TailArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        let consumer = assigned_consumer(&args.brokers, &args.topic, args.from_end)?;
        let mut seen = 0u64;
        read_records(&consumer, args.idle_exit, &shutdown, |record| {
            seen += 1;
            println!(
                "{}[{}]@{} key={} headers={{{}}}",
                args.topic,
                record.partition,
                record.offset,
                record
                    .key
                    .as_deref()
                    .map(printable)
                    .unwrap_or_else(|| "null".into()),
                record
                    .headers
                    .iter()
                    .map(|(k, v)| format!("{k}={}", printable(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "  {}",
                record
                    .payload
                    .as_deref()
                    .map(printable)
                    .unwrap_or_else(|| "null".into())
            );
            args.count.is_none_or(|count| seen < count)
        })
    })
    .await?
}
