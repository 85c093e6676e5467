//! gRPC adapters: each RPC extracts, calls the domain, converts the result.
//! Errors become `tonic::Status` only in `error.rs`.

pub mod auth;
/// Public so that tests can drive the request conversions directly.
pub mod convert;
mod error;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub use auth::{AuthConfig, Authenticator};
pub use error::ApiError;

use crate::domain::{AppendBatch, FieldViolation, Limits};
use crate::ingest::{Ingest, Operations, Transactions};
use crate::proto;
use crate::status::{StatusBus, WatchSettings, WatchTarget};
use crate::store::Store;

/// The `Outbox` service.
#[derive(Clone)]
pub struct OutboxApi {
    /// Where appends are stored.
    pub ingest: Ingest,
    /// Commit and Abort of two_phase transactions.
    pub transactions: Transactions,
    /// Where statuses are looked up.
    pub store: Arc<dyn Store>,
    /// Where watches hear of changes.
    pub bus: StatusBus,
    /// Bounds of a request.
    pub limits: Limits,
    /// How watches poll and resume.
    pub watch: WatchSettings,
    /// Who the callers are and what they may do.
    pub auth: Authenticator,
    /// Places for open watches (`watch.max_open`); each stream holds one.
    pub open_watches: Arc<tokio::sync::Semaphore>,
    /// Ends streams (AppendStream, WatchStatus) at shutdown.
    pub shutdown: CancellationToken,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// PERMISSION_DENIED unless the caller may act for the batch's producer and
/// write to each of its topics; checked before anything is stored.
fn authorize_append(access: &auth::Access, batch: &AppendBatch) -> Result<(), ApiError> {
    access.check_producer(&batch.token.producer)?;
    for event in &batch.events {
        access.check_topic(&event.topic)?;
    }
    Ok(())
}

#[tonic::async_trait]
impl proto::outbox_server::Outbox for OutboxApi {
    async fn append(
        &self,
        request: Request<proto::AppendRequest>,
    ) -> Result<Response<proto::AppendResponse>, Status> {
        let access = self.auth.access(&request)?;
        let trace = crate::telemetry::for_append(convert::trace_context(request.metadata()));
        let request = request.into_inner();
        let correlation = request.correlation;
        let batch = convert::append_batch(request, trace, &self.limits)?;
        authorize_append(&access, &batch)?;
        let outcome = self.ingest.append(batch).await.map_err(ApiError::from)?;
        Ok(Response::new(convert::append_response(
            outcome,
            correlation,
        )))
    }

    type AppendStreamStream = BoxStream<proto::AppendResponse>;

    async fn append_stream(
        &self,
        request: Request<Streaming<proto::AppendRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let access = self.auth.access(&request)?;
        let stream_place = access.open_stream()?;
        let trace = crate::telemetry::for_append(convert::trace_context(request.metadata()));
        let limits = self.limits.clone();
        // A request the stream cannot read ends it; the requests read are
        // still answered.
        let requests = request
            .into_inner()
            .map_while(|message| {
                message
                    .inspect_err(|status| tracing::debug!(%status, "append stream broke"))
                    .ok()
            })
            .map(move |request| {
                let correlation = request.correlation;
                let batch = convert::append_batch(request, trace.clone(), &limits)
                    .and_then(|batch| authorize_append(&access, &batch).map(|()| batch));
                (correlation, batch)
            });
        let acks = self
            .ingest
            .append_stream(Box::pin(requests), self.shutdown.clone())
            .map(move |(correlation, outcome)| {
                // Given back when the stream ends.
                let _stream_place = &stream_place;
                Ok(match outcome {
                    Ok(outcome) => convert::append_response(outcome, correlation),
                    Err(error) => convert::append_failure(&error, correlation),
                })
            });
        Ok(Response::new(Box::pin(acks)))
    }

    async fn commit(
        &self,
        request: Request<proto::CommitRequest>,
    ) -> Result<Response<proto::CommitResponse>, Status> {
        let access = self.auth.access(&request)?;
        let request = request.into_inner();
        let transaction = convert::transaction_ref(request.producer, request.transaction_id)?;
        access.check_producer(&transaction.producer)?;
        let events = self
            .transactions
            .commit(&transaction)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(proto::CommitResponse { events }))
    }

    async fn abort(
        &self,
        request: Request<proto::AbortRequest>,
    ) -> Result<Response<proto::AbortResponse>, Status> {
        let access = self.auth.access(&request)?;
        let request = request.into_inner();
        let transaction = convert::transaction_ref(request.producer, request.transaction_id)?;
        access.check_producer(&transaction.producer)?;
        let events = self
            .transactions
            .abort(&transaction)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(proto::AbortResponse { events }))
    }

    async fn get_status(
        &self,
        request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::GetStatusResponse>, Status> {
        let access = self.auth.access(&request)?;
        let request = request.into_inner();
        let statuses = match (
            request.event_ids.is_empty(),
            request.transactions.is_empty(),
        ) {
            (false, true) => {
                let ids = convert::event_ids(&request.event_ids, "event_ids")?;
                self.store
                    .status_by_ids(&ids)
                    .await
                    .map_err(ApiError::from)?
            }
            (true, false) => {
                let refs = convert::transaction_refs(request.transactions, "transactions")?;
                for transaction in &refs {
                    access.check_producer(&transaction.producer)?;
                }
                self.store
                    .status_by_transactions(&refs)
                    .await
                    .map_err(ApiError::from)?
            }
            _ => {
                return Err(ApiError::invalid(vec![FieldViolation::new(
                    "event_ids",
                    "give event_ids or transactions (exactly one of them)",
                )])
                .into());
            }
        };
        // Others' events are not there, as far as this caller can tell.
        Ok(Response::new(proto::GetStatusResponse {
            events: statuses
                .iter()
                .filter(|status| access.allows_producer(&status.producer))
                .map(convert::event_status)
                .collect(),
        }))
    }

    type WatchStatusStream = BoxStream<proto::StatusUpdate>;

    async fn watch_status(
        &self,
        request: Request<proto::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let access = self.auth.access(&request)?;
        let request = request.into_inner();
        let targets = [
            !request.event_ids.is_empty(),
            !request.transactions.is_empty(),
            !request.producer.is_empty(),
        ];
        if targets.iter().filter(|t| **t).count() != 1 {
            return Err(ApiError::invalid(vec![FieldViolation::new(
                "event_ids",
                "give exactly one of event_ids, transactions or producer",
            )])
            .into());
        }
        let target = if targets[0] {
            let ids = convert::event_ids(&request.event_ids, "event_ids")?;
            if !matches!(access, auth::Access::Open) {
                // Another producer's event is as unknown as one that never was.
                let statuses = self
                    .store
                    .status_by_ids(&ids)
                    .await
                    .map_err(ApiError::from)?;
                let theirs: Vec<String> = statuses
                    .iter()
                    .filter(|s| !access.allows_producer(&s.producer))
                    .map(|s| s.event_id.to_string())
                    .collect();
                if !theirs.is_empty() {
                    return Err(ApiError::NotFound(format!(
                        "unknown event ids: {}",
                        theirs.join(", ")
                    ))
                    .into());
                }
            }
            WatchTarget::Events(ids)
        } else if targets[1] {
            let refs = convert::transaction_refs(request.transactions, "transactions")?;
            for transaction in &refs {
                access.check_producer(&transaction.producer)?;
            }
            WatchTarget::Transactions(refs)
        } else {
            if let Some(violation) = convert::nul_violation("producer", &request.producer) {
                return Err(ApiError::invalid(vec![violation]).into());
            }
            access.check_producer(&request.producer)?;
            WatchTarget::Producer {
                producer: request.producer,
                after_cursor: request.after_cursor,
            }
        };
        let identity_place = access.open_stream()?;
        let place = self.open_watches.clone().try_acquire_owned().map_err(|_| {
            ApiError::ResourceExhausted {
                message: "too many open watches (watch.max_open); retry shortly".into(),
                retry_after: std::time::Duration::from_secs(1),
            }
        })?;
        let updates = crate::status::watch(
            self.store.clone(),
            &self.bus,
            target,
            self.watch,
            self.shutdown.clone(),
        );
        // The place is given back when the stream is dropped.
        let stream = ReceiverStream::new(updates).map(move |update| match update {
            Ok(update) => {
                let _held = (&place, &identity_place);
                Ok(proto::StatusUpdate {
                    status: Some(convert::event_status(&update.status)),
                    snapshot: update.snapshot,
                })
            }
            Err(error) => Err(Status::from(ApiError::from(error))),
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Most prepared transactions one ListPrepared returns.
const MAX_PREPARED_LISTED: u32 = 10_000;

/// ListPrepared's longest `older_than`.
const OLDEST_PREPARED: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

/// Largest ListDeadLetters page.
const MAX_DEAD_LETTER_PAGE: u32 = 1_000;

/// The `OutboxAdmin` service.
#[derive(Clone)]
pub struct AdminApi {
    /// What the operations do.
    pub operations: Operations,
    /// Who the callers are: OutboxAdmin needs the admin role (ListPrepared
    /// only the right to act for its producer).
    pub auth: Authenticator,
}

impl AdminApi {
    /// PauseRelay and ResumeRelay: for admins only.
    async fn set_relay_paused<T>(&self, request: &Request<T>, paused: bool) -> Result<(), Status> {
        self.auth.access(request)?.check_admin()?;
        self.operations
            .set_relay_paused(paused)
            .await
            .map_err(ApiError::from)?;
        Ok(())
    }
}

#[tonic::async_trait]
impl proto::outbox_admin_server::OutboxAdmin for AdminApi {
    async fn list_dead_letters(
        &self,
        request: Request<proto::ListDeadLettersRequest>,
    ) -> Result<Response<proto::ListDeadLettersResponse>, Status> {
        self.auth.access(&request)?.check_admin()?;
        let request = request.into_inner();
        let after_seq = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse::<i64>().map_err(|_| {
                ApiError::invalid(vec![FieldViolation::new(
                    "page_token",
                    "is not a token from an earlier page",
                )])
            })?
        };
        let page_size = match request.page_size {
            0 => 100,
            n => n.min(MAX_DEAD_LETTER_PAGE),
        };
        let filter = convert::dead_letter_filter(
            Vec::new(),
            request.producer,
            request.topic,
            request.since,
        )?;
        let page = self
            .operations
            .dead_letters(&filter, after_seq, page_size)
            .await
            .map_err(ApiError::from)?;
        let next_page_token = if page.len() as u32 == page_size {
            page.last()
                .map(|(seq, _)| seq.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(proto::ListDeadLettersResponse {
            events: page.iter().map(|(_, s)| convert::event_status(s)).collect(),
            next_page_token,
        }))
    }

    async fn redrive(
        &self,
        request: Request<proto::RedriveRequest>,
    ) -> Result<Response<proto::RedriveResponse>, Status> {
        self.auth.access(&request)?.check_admin()?;
        let request = request.into_inner();
        if request.event_ids.is_empty() && request.producer.is_empty() && request.topic.is_empty() {
            return Err(ApiError::invalid(vec![FieldViolation::new(
                "event_ids",
                "name event_ids, or a producer or topic whose dead letters to redrive",
            )])
            .into());
        }
        let ids = convert::event_ids(&request.event_ids, "event_ids")?;
        let filter = convert::dead_letter_filter(ids, request.producer, request.topic, None)?;
        let events = self
            .operations
            .redrive(&filter)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(proto::RedriveResponse { events }))
    }

    async fn pause_relay(
        &self,
        request: Request<proto::PauseRelayRequest>,
    ) -> Result<Response<proto::PauseRelayResponse>, Status> {
        self.set_relay_paused(&request, true).await?;
        Ok(Response::new(proto::PauseRelayResponse {}))
    }

    async fn resume_relay(
        &self,
        request: Request<proto::ResumeRelayRequest>,
    ) -> Result<Response<proto::ResumeRelayResponse>, Status> {
        self.set_relay_paused(&request, false).await?;
        Ok(Response::new(proto::ResumeRelayResponse {}))
    }

    async fn get_backlog(
        &self,
        request: Request<proto::GetBacklogRequest>,
    ) -> Result<Response<proto::GetBacklogResponse>, Status> {
        self.auth.access(&request)?.check_admin()?;
        let backlog = self.operations.backlog().await.map_err(ApiError::from)?;
        let now = chrono::Utc::now();
        Ok(Response::new(proto::GetBacklogResponse {
            shards: backlog
                .iter()
                .map(|b| proto::ShardBacklog {
                    shard: b.shard,
                    depth: b.depth,
                    oldest_age: b.oldest.map(|oldest| {
                        let age = (now - oldest).to_std().unwrap_or_default();
                        prost_types::Duration {
                            seconds: age.as_secs() as i64,
                            nanos: age.subsec_nanos() as i32,
                        }
                    }),
                })
                .collect(),
        }))
    }

    async fn list_leases(
        &self,
        request: Request<proto::ListLeasesRequest>,
    ) -> Result<Response<proto::ListLeasesResponse>, Status> {
        self.auth.access(&request)?.check_admin()?;
        let leases = self.operations.leases().await.map_err(ApiError::from)?;
        Ok(Response::new(proto::ListLeasesResponse {
            leases: leases
                .iter()
                .map(|l| proto::Lease {
                    shard: l.shard,
                    owner: l.owner.clone(),
                    epoch: l.epoch as u64,
                    expires_at: Some(convert::utc_to_timestamp(l.expires_at)),
                })
                .collect(),
        }))
    }

    async fn list_prepared(
        &self,
        request: Request<proto::ListPreparedRequest>,
    ) -> Result<Response<proto::ListPreparedResponse>, Status> {
        let access = self.auth.access(&request)?;
        let request = request.into_inner();
        if request.producer.is_empty() {
            return Err(ApiError::invalid(vec![FieldViolation::new(
                "producer",
                "must not be empty",
            )])
            .into());
        }
        if let Some(violation) = convert::nul_violation("producer", &request.producer) {
            return Err(ApiError::invalid(vec![violation]).into());
        }
        access.check_producer(&request.producer)?;
        let older_than = match request.older_than {
            None => std::time::Duration::ZERO,
            // Nothing is older than a century: a longer duration asks the
            // same, and would overflow PostgreSQL's intervals.
            Some(d) if d.seconds >= 0 && (0..1_000_000_000).contains(&d.nanos) => {
                std::time::Duration::new(d.seconds as u64, d.nanos as u32).min(OLDEST_PREPARED)
            }
            Some(_) => {
                return Err(ApiError::invalid(vec![FieldViolation::new(
                    "older_than",
                    "must be a non-negative duration",
                )])
                .into());
            }
        };
        let prepared = self
            .operations
            .prepared(&request.producer, older_than, MAX_PREPARED_LISTED)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(proto::ListPreparedResponse {
            transactions: prepared.iter().map(convert::prepared_transaction).collect(),
        }))
    }
}
