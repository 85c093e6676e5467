//! Wake-ups between instances through `LISTEN/NOTIFY` on one channel.
//!
//! A payload names its sender, the shards with new rows and the shards to
//! rewind: `instance|n:1,5|r:3`. PostgreSQL refuses payloads of 8,000 bytes
//! or more, so a wake-up too large for one says `instance|*`: rewind every
//! shard.

use std::collections::BTreeSet;

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use crate::store::{StoreError, WakeUp, WakeUpListener};

/// The channel every instance of one store listens on.
const CHANNEL: &str = "outboxd_wake";
/// Longest payload sent as is; PostgreSQL's limit is 8,000 bytes.
const MAX_PAYLOAD: usize = 7_000;

pub(super) async fn announce(
    pool: &PgPool,
    instance: &str,
    wake: &WakeUp,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(encode(instance, wake))
        .execute(pool)
        .await?;
    Ok(())
}

pub(super) async fn listen(
    pool: &PgPool,
    instance: &str,
    shard_count: u32,
) -> Result<Box<dyn WakeUpListener>, StoreError> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(Box::new(PgWakeUps {
        listener,
        instance: instance.to_owned(),
        shard_count,
    }))
}

struct PgWakeUps {
    listener: PgListener,
    /// This instance's own announcements come back too; they are skipped.
    instance: String,
    shard_count: u32,
}

#[async_trait]
impl WakeUpListener for PgWakeUps {
    async fn next(&mut self) -> Result<Option<WakeUp>, StoreError> {
        loop {
            // None: the connection was lost (and is made again at the next
            // call); what was announced meanwhile is missed.
            let Some(notification) = self.listener.try_recv().await? else {
                return Ok(None);
            };
            match decode(notification.payload(), self.shard_count) {
                Some((origin, _)) if origin == self.instance => continue,
                Some((_, wake)) => return Ok(Some(wake)),
                None => {
                    tracing::warn!(
                        payload = notification.payload(),
                        "ignoring an unreadable wake-up"
                    );
                }
            }
        }
    }
}

fn list(shards: &BTreeSet<u32>) -> String {
    shards
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn encode(instance: &str, wake: &WakeUp) -> String {
    let payload = format!(
        "{instance}|n:{}|r:{}",
        list(&wake.new_rows),
        list(&wake.rewind)
    );
    if payload.len() <= MAX_PAYLOAD {
        payload
    } else {
        format!("{instance}|*")
    }
}

fn decode(payload: &str, shard_count: u32) -> Option<(&str, WakeUp)> {
    let mut parts = payload.split('|');
    let origin = parts.next()?;
    let mut wake = WakeUp::default();
    for part in parts {
        let (target, shards) = match part.split_once(':') {
            Some(("n", shards)) => (&mut wake.new_rows, shards),
            Some(("r", shards)) => (&mut wake.rewind, shards),
            _ if part == "*" => {
                wake.rewind = (0..shard_count).collect();
                continue;
            }
            _ => return None,
        };
        for shard in shards.split(',').filter(|s| !s.is_empty()) {
            target.insert(shard.parse().ok()?);
        }
    }
    Some((origin, wake))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let wake = WakeUp {
            new_rows: [1, 5].into(),
            rewind: [3].into(),
        };
        let payload = encode("gw-1", &wake);
        assert_eq!(payload, "gw-1|n:1,5|r:3");
        assert_eq!(decode(&payload, 8), Some(("gw-1", wake)));
    }

    #[test]
    fn a_wake_up_too_large_for_one_payload_rewinds_every_shard() {
        let wake = WakeUp {
            new_rows: (0..4096).collect(),
            rewind: BTreeSet::new(),
        };
        let payload = encode("gw-1", &wake);
        assert!(payload.len() < 8_000);
        let (_, decoded) = decode(&payload, 4096).unwrap();
        assert_eq!(decoded.rewind.len(), 4096);
    }
}
