//! Resolves transaction tokens in the background: discards two_phase
//! transactions whose timeout passed, and asks the callers' PostgreSQL
//! clusters, in bulk, whether postgres_xid transactions committed.
//! (Retention and backlog figures are [`super::Housekeeping`]'s.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::StateChanges;
use crate::domain::TransactionRef;
use crate::store::xid::{XactStatus, XidSource};
use crate::store::{Resolved, Store, StoreError, XidToken, XidVerdict};

/// Token settings (`[tokens]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenConfig {
    /// How often open tokens are resolved while there are any.
    #[serde(with = "humantime_serde")]
    pub resolve_interval: Duration,
    /// Clusters that resolve postgres_xid tokens, by producer. Producers not
    /// named here are resolved against the store's own cluster (when the
    /// store is PostgreSQL).
    pub postgres_xid_clusters: BTreeMap<String, String>,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            resolve_interval: Duration::from_millis(50),
            postgres_xid_clusters: BTreeMap::new(),
        }
    }
}

/// Where each producer's postgres_xid tokens are resolved.
#[derive(Clone, Default)]
pub struct XidSources {
    own: Option<XidSource>,
    by_producer: HashMap<String, XidSource>,
}

impl XidSources {
    /// The clusters of `tokens.postgres_xid_clusters`, connected lazily,
    /// and the store's own cluster for the other producers (PostgreSQL
    /// stores only).
    pub fn new(store: &dyn Store, config: &TokenConfig) -> Result<Self, StoreError> {
        let mut by_producer = HashMap::new();
        for (producer, url) in &config.postgres_xid_clusters {
            by_producer.insert(producer.clone(), XidSource::connect_lazy(url)?);
        }
        Ok(XidSources {
            own: store.own_xid_source(),
            by_producer,
        })
    }

    fn for_producer(&self, producer: &str) -> Option<&XidSource> {
        self.by_producer.get(producer).or(self.own.as_ref())
    }

    /// Whether postgres_xid tokens of `producer` can be resolved at all.
    pub fn can_resolve(&self, producer: &str) -> bool {
        self.for_producer(producer).is_some()
    }
}

/// Resolves postgres_xid tokens against the callers' clusters and expires
/// two_phase transactions past their timeout.
pub struct Resolver {
    /// Where the open tokens are.
    pub store: Arc<dyn Store>,
    /// Where resolutions are announced (and the resolver is woken from).
    pub changes: StateChanges,
    /// Where each producer's tokens are resolved.
    pub sources: XidSources,
    /// Token settings (`[tokens]`).
    pub config: TokenConfig,
    /// When nothing is open, look at least this often (other instances may
    /// have appended tokens).
    pub idle_interval: Duration,
}

/// Most tokens one pass resolves.
const PASS_LIMIT: u32 = 5_000;
/// How long a token that cannot be resolved now is left alone: its
/// producer's configuration or cluster has to change first.
const PUT_OFF: Duration = Duration::from_secs(5);

impl Resolver {
    /// Resolves in passes, when woken or at the interval, until `shutdown`;
    /// a failed pass is logged and retried.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut busy = true;
        loop {
            let wait = if busy {
                self.config.resolve_interval
            } else {
                self.idle_interval
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.changes.waker.resolver.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            match self.pass().await {
                Ok(open) => busy = open,
                Err(error) => {
                    tracing::warn!(%error, "token resolution failed; retrying");
                    busy = true;
                }
            }
        }
    }

    fn announce(&self, resolved: Resolved) {
        crate::telemetry::resolutions(&resolved.changed);
        self.changes.announce(resolved);
    }

    /// One pass; returns whether open tokens remain.
    async fn pass(&self) -> Result<bool, StoreError> {
        let expired = self.store.expire_transactions(PASS_LIMIT).await?;
        if !expired.changed.is_empty() {
            tracing::info!(
                events = expired.changed.len(),
                "discarded events of expired two_phase transactions"
            );
        }
        self.announce(expired);

        let tokens = self.store.open_xid_tokens(PASS_LIMIT).await?;
        if tokens.is_empty() {
            return Ok(false);
        }
        let Verdicts { decided, put_off } = self.verdicts(&tokens).await;
        // Resolutions first, in their own store transaction: recording why
        // many tokens cannot be resolved takes a while and must not hold
        // them back.
        let (unresolvable, resolutions): (Vec<_>, Vec<_>) = decided
            .into_iter()
            .partition(|(_, verdict)| matches!(verdict, XidVerdict::Unresolvable(_)));
        if !resolutions.is_empty() {
            let resolved = self.store.resolve_xid_tokens(&resolutions).await?;
            self.announce(resolved);
        }
        if !put_off.is_empty() {
            self.store.defer_xid_tokens(&put_off, PUT_OFF).await?;
        }
        if unresolvable.is_empty() {
            return Ok(true);
        }
        let resolved = self.store.resolve_xid_tokens(&unresolvable).await?;
        let mut warned = HashSet::new();
        for status in &resolved.changed {
            if status.state == crate::domain::EventState::Pending
                && warned.insert((status.producer.clone(), status.transaction_id.clone()))
            {
                tracing::warn!(
                    producer = %status.producer,
                    transaction_id = %status.transaction_id,
                    reason = %status.reason,
                    "postgres_xid token cannot be resolved; its events stay pending"
                );
            }
        }
        self.announce(resolved);
        Ok(true)
    }

    /// Asks each cluster about its tokens, one round trip per cluster.
    async fn verdicts(&self, tokens: &[XidToken]) -> Verdicts {
        let mut by_producer: BTreeMap<&str, Vec<&XidToken>> = BTreeMap::new();
        for token in tokens {
            by_producer
                .entry(token.transaction.producer.as_str())
                .or_default()
                .push(token);
        }
        let mut verdicts = Verdicts::default();
        for (producer, tokens) in by_producer {
            let Some(source) = self.sources.for_producer(producer) else {
                let reason = format!(
                    "no PostgreSQL cluster is configured to resolve postgres_xid tokens of producer {producer:?}"
                );
                for token in tokens {
                    verdicts.unresolvable(token, reason.clone());
                }
                continue;
            };
            let cluster = match source.system_identifier().await {
                Ok(id) => id,
                Err(error) => {
                    tracing::warn!(producer, %error, "cannot reach the cluster of postgres_xid tokens");
                    verdicts
                        .put_off
                        .extend(tokens.iter().map(|t| t.transaction.clone()));
                    continue;
                }
            };
            // A token of another cluster must never be resolved here.
            let (ours, foreign): (Vec<&XidToken>, Vec<&XidToken>) =
                tokens.into_iter().partition(|t| t.system_id == cluster);
            for token in foreign {
                let reason = format!(
                    "system identifier mismatch: the token names cluster {}, but producer {producer:?} resolves against cluster {cluster}; not publishing",
                    token.system_id
                );
                verdicts.unresolvable(token, reason);
            }
            if ours.is_empty() {
                continue;
            }
            let xids: Vec<u64> = ours.iter().map(|t| t.caller_xid).collect();
            let statuses = match source.statuses(&xids).await {
                Ok(statuses) => statuses.into_iter().collect::<HashMap<u64, XactStatus>>(),
                Err(error) => {
                    tracing::warn!(producer, %error, "cannot ask the cluster about postgres_xid tokens");
                    verdicts
                        .put_off
                        .extend(ours.iter().map(|t| t.transaction.clone()));
                    continue;
                }
            };
            for token in ours {
                let verdict = match statuses.get(&token.caller_xid) {
                    Some(XactStatus::Committed) => XidVerdict::Committed,
                    Some(XactStatus::Aborted) => XidVerdict::Aborted,
                    Some(XactStatus::InProgress) | None => continue,
                    Some(XactStatus::Unknown) => XidVerdict::TooOld(format!(
                        "the caller's transaction {} is too old to resolve (pg_xact_status returned NULL)",
                        token.caller_xid
                    )),
                };
                verdicts.decided.push((token.transaction.clone(), verdict));
            }
        }
        verdicts
    }
}

/// What one pass learnt about the tokens it read.
#[derive(Default)]
struct Verdicts {
    /// Tokens with something to record: a resolution, or why they cannot
    /// be resolved.
    decided: Vec<(TransactionRef, XidVerdict)>,
    /// Tokens that cannot be resolved now: asked about again after
    /// [`PUT_OFF`], so that they never fill the window of a pass.
    put_off: Vec<TransactionRef>,
}

impl Verdicts {
    fn unresolvable(&mut self, token: &XidToken, reason: String) {
        self.put_off.push(token.transaction.clone());
        self.decided
            .push((token.transaction.clone(), XidVerdict::Unresolvable(reason)));
    }
}
