//! `outboxd admin …`: the OutboxAdmin operations from the command line.

use std::time::Duration;

use clap::{Args, Subcommand};

use crate::proto;
use crate::proto::outbox_admin_client::OutboxAdminClient;

/// The arguments of `outboxd admin`: where the gateway is, how to reach
/// it, and the operation.
#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// The gateway's gRPC address.
    #[arg(
        long,
        env = "OUTBOXD_ADDRESS",
        default_value = "http://127.0.0.1:50051"
    )]
    pub address: String,
    /// TLS and the bearer token (of an identity with the admin role) for a
    /// secured gateway.
    #[command(flatten)]
    pub access: crate::cli::client::GatewayAccess,
    /// The operation.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// One `OutboxAdmin` operation.
#[derive(Subcommand, Debug, Clone)]
pub enum AdminCommand {
    /// List dead-lettered events, oldest first.
    DeadLetters {
        /// Only dead letters of this producer.
        #[arg(long)]
        producer: Option<String>,
        /// Only dead letters of this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Most events to list.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Make dead letters READY again: by id, or all of a producer or topic.
    Redrive {
        /// Event id of a dead letter to redrive (repeatable).
        #[arg(long = "event-id")]
        event_ids: Vec<String>,
        /// Only dead letters of this producer.
        #[arg(long)]
        producer: Option<String>,
        /// Only dead letters of this topic.
        #[arg(long)]
        topic: Option<String>,
    },
    /// Pause relaying on every instance (appends go on).
    Pause,
    /// Resume relaying.
    Resume,
    /// Unpublished events per shard.
    Backlog,
    /// Who relays which shard.
    Leases,
    /// Open two_phase transactions of a producer.
    Prepared {
        /// The producer whose transactions to list.
        #[arg(long)]
        producer: String,
        /// Only transactions open at least this long (e.g. "10m").
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        older_than: Duration,
    },
}

/// Runs one admin operation against the gateway and prints its answer.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let mut client = OutboxAdminClient::new(args.access.connect(&args.address).await?);
    match args.command {
        AdminCommand::DeadLetters {
            producer,
            topic,
            limit,
        } => {
            let mut page_token = String::new();
            let mut listed = 0;
            loop {
                let page = client
                    .list_dead_letters(proto::ListDeadLettersRequest {
                        producer: producer.clone().unwrap_or_default(),
                        topic: topic.clone().unwrap_or_default(),
                        since: None,
                        page_size: (limit - listed).min(1_000),
                        page_token,
                    })
                    .await?
                    .into_inner();
                for event in &page.events {
                    println!(
                        "{}  {}  {}/{}  attempts={}  {}",
                        event.event_id,
                        event.topic,
                        event.producer,
                        event.transaction_id,
                        event.attempts,
                        event.reason
                    );
                }
                listed += page.events.len() as u32;
                if page.next_page_token.is_empty() || listed >= limit {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        AdminCommand::Redrive {
            event_ids,
            producer,
            topic,
        } => {
            let response = client
                .redrive(proto::RedriveRequest {
                    event_ids,
                    producer: producer.unwrap_or_default(),
                    topic: topic.unwrap_or_default(),
                })
                .await?
                .into_inner();
            println!("redriven: {} events", response.events);
        }
        AdminCommand::Pause => {
            client.pause_relay(proto::PauseRelayRequest {}).await?;
            println!("relaying paused");
        }
        AdminCommand::Resume => {
            client.resume_relay(proto::ResumeRelayRequest {}).await?;
            println!("relaying resumed");
        }
        AdminCommand::Backlog => {
            let backlog = client
                .get_backlog(proto::GetBacklogRequest {})
                .await?
                .into_inner();
            println!("shard  depth  oldest");
            for shard in backlog.shards {
                let age = shard.oldest_age.map(|d| d.seconds).unwrap_or_default();
                println!("{:>5}  {:>5}  {age}s", shard.shard, shard.depth);
            }
        }
        AdminCommand::Leases => {
            let leases = client
                .list_leases(proto::ListLeasesRequest {})
                .await?
                .into_inner();
            println!("shard  epoch  owner");
            for lease in leases.leases {
                println!("{:>5}  {:>5}  {}", lease.shard, lease.epoch, lease.owner);
            }
        }
        AdminCommand::Prepared {
            producer,
            older_than,
        } => {
            let prepared = client
                .list_prepared(proto::ListPreparedRequest {
                    producer,
                    older_than: Some(prost_types::Duration {
                        seconds: older_than.as_secs() as i64,
                        nanos: older_than.subsec_nanos() as i32,
                    }),
                })
                .await?
                .into_inner();
            for transaction in prepared.transactions {
                println!(
                    "{}/{}  events={}",
                    transaction.producer, transaction.transaction_id, transaction.events
                );
            }
        }
    }
    Ok(())
}
