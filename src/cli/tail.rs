//! `outboxd tail`: a small consumer that prints a topic's records with their
//! headers, for a look at what reached Kafka.
//!
//! It is also the one way the operator tools read outboxd's topics:
//! [`assigned_consumer`] builds the consumer, [`read_messages`] and
//! [`read_records`] run the reading loop (`bench` and `dev` use them too).

use std::time::Duration;

use clap::Args;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

/// The arguments of `outboxd tail`.
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
    /// The partition it was read from.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
    /// Its key, if it has one.
    pub key: Option<Vec<u8>>,
    /// Its value, if it has one.
    pub payload: Option<Vec<u8>>,
    /// Its headers in order (a header without a value has an empty one).
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

/// How [`assigned_consumer`] sets its consumer up.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsumerOptions {
    /// Start at the end of each partition instead of the beginning.
    pub from_end: bool,
    /// The longest the broker holds a fetch back waiting for records
    /// (librdkafka's `fetch.wait.max.ms`); librdkafka's default when
    /// `None`. Short for a reader that times each record's arrival.
    pub fetch_wait: Option<Duration>,
}

/// A consumer of one of outboxd's topics, assigned to every partition of
/// `topic` under a throwaway group id (never joined, nothing committed):
/// the one way the operator tools read what reached Kafka.
pub fn assigned_consumer(
    brokers: &str,
    topic: &str,
    options: ConsumerOptions,
) -> anyhow::Result<BaseConsumer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("outboxd-tail-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    if let Some(wait) = options.fetch_wait {
        config.set("fetch.wait.max.ms", wait.as_millis().to_string());
    }
    let consumer: BaseConsumer = config.create()?;
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
            if options.from_end {
                Offset::End
            } else {
                Offset::Beginning
            },
        )?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Polls `consumer`, waiting up to `poll` each time, until `on_poll`
/// returns false, `idle` passes with no record, or `shutdown`. `on_poll`
/// sees each record as it is read, and `None` after a poll that read none.
/// Blocking: run it off the async runtime.
pub fn read_messages(
    consumer: &BaseConsumer,
    poll: Duration,
    idle: Option<Duration>,
    shutdown: &CancellationToken,
    mut on_poll: impl FnMut(Option<&BorrowedMessage<'_>>) -> bool,
) -> anyhow::Result<()> {
    let mut last = std::time::Instant::now();
    while !shutdown.is_cancelled() {
        let message = consumer.poll(poll).transpose()?;
        if message.is_some() {
            last = std::time::Instant::now();
        } else if idle.is_some_and(|idle| last.elapsed() >= idle) {
            return Ok(());
        }
        if !on_poll(message.as_ref()) {
            return Ok(());
        }
    }
    Ok(())
}

/// How long [`read_records`] waits for a record in one poll.
const RECORD_POLL: Duration = Duration::from_millis(200);

/// Reads records until `on_record` returns false, `idle` passes with no
/// record, or `shutdown`. Blocking: run it off the async runtime.
pub fn read_records(
    consumer: &BaseConsumer,
    idle: Option<Duration>,
    shutdown: &CancellationToken,
    mut on_record: impl FnMut(TailRecord) -> bool,
) -> anyhow::Result<()> {
    read_messages(consumer, RECORD_POLL, idle, shutdown, |message| {
        message.is_none_or(|message| on_record(TailRecord::from_message(message)))
    })
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

/// Prints the topic's records, each as a line with its partition, offset,
/// key and headers and an indented line with its payload (text, or hex
/// when not UTF-8), until `--count`, `--idle-exit` or `shutdown`.
pub async fn run(args: TailArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        let options = ConsumerOptions {
            from_end: args.from_end,
            ..ConsumerOptions::default()
        };
        let consumer = assigned_consumer(&args.brokers, &args.topic, options)?;
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
