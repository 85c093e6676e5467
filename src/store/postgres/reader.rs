//! One reader of the relay's segments per store: the shards' workers ask it
//! for their next segments, and it reads what has gathered in one statement
//! for all their shards, behind one visibility gate, instead of a
//! statement per shard and wake-up.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::queries::READ_SEGMENTS;
use super::segments::SegmentRow;
use crate::store::StoreError;

/// Statements in flight at once: one gathers while another is read.
const READERS: usize = 2;

/// Most shards one statement reads.
const MAX_SHARDS: usize = 256;

/// Where a shard's read starts: (writer xid, segment number), inclusive.
pub(super) type From = (i64, i64);

/// A shard's unfinished segments from where it asked, and whether others
/// wait behind the visibility gate.
#[derive(Debug, Default)]
pub(super) struct Fetched {
    pub held_back: bool,
    pub rows: Vec<SegmentRow>,
}

/// One shard's request and where its answer goes.
struct Request {
    shard: u32,
    from: From,
    reply: oneshot::Sender<Result<Fetched, StoreError>>,
}

/// Hands requests to the reader tasks; they stop when every handle is gone.
pub(super) struct Reader {
    queue: mpsc::Sender<Request>,
    /// For a request the tasks can no longer take (the runtime is stopping).
    pool: PgPool,
    /// Most segments a read returns per shard.
    limit: i64,
}

impl Reader {
    /// Starts the reader tasks on `pool`; each read returns at most `limit`
    /// segments per shard.
    pub(super) fn start(pool: PgPool, limit: i64) -> Reader {
        let (queue, requests) = mpsc::channel(1_024);
        let requests = Arc::new(Mutex::new(requests));
        for _ in 0..READERS {
            tokio::spawn(serve(pool.clone(), requests.clone(), limit));
        }
        Reader { queue, pool, limit }
    }

    /// `shard`'s unfinished segments from `from` on, read together with the
    /// other shards' that are waiting too.
    pub(super) async fn read(&self, shard: u32, from: From) -> Result<Fetched, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = Request { shard, from, reply };
        if self.queue.send(request).await.is_ok()
            && let Ok(result) = answer.await
        {
            return result;
        }
        let mut connection = self.pool.acquire().await?;
        read_alone(&mut connection, shard, from, self.limit).await
    }
}

/// One reader task: takes what has gathered, reads it, answers each shard.
async fn serve(pool: PgPool, requests: Arc<Mutex<mpsc::Receiver<Request>>>, limit: i64) {
    loop {
        let gathered = {
            let mut requests = requests.lock().await;
            let Some(first) = requests.recv().await else {
                return;
            };
            let mut gathered = vec![first];
            while gathered.len() < MAX_SHARDS {
                match requests.try_recv() {
                    Ok(next) => gathered.push(next),
                    Err(_) => break,
                }
            }
            gathered
        };
        let asked: Vec<(u32, From)> = gathered.iter().map(|r| (r.shard, r.from)).collect();
        let result = match pool.acquire().await {
            Ok(mut connection) => read_shards(&mut connection, &asked, limit).await,
            Err(error) => Err(error.into()),
        };
        match result {
            Ok(mut fetched) => {
                for (index, request) in gathered.into_iter().enumerate() {
                    let answer = fetched.remove(&index).unwrap_or_default();
                    let _ = request.reply.send(Ok(answer));
                }
            }
            // Each alone: one shard's bad row fails only that shard.
            Err(_) => {
                for request in gathered {
                    let answer = match pool.acquire().await {
                        Ok(mut connection) => {
                            read_alone(&mut connection, request.shard, request.from, limit).await
                        }
                        Err(error) => Err(error.into()),
                    };
                    let _ = request.reply.send(answer);
                }
            }
        }
    }
}

/// One shard's segments, in a statement of its own.
async fn read_alone(
    connection: &mut PgConnection,
    shard: u32,
    from: From,
    limit: i64,
) -> Result<Fetched, StoreError> {
    let mut fetched = read_shards(connection, &[(shard, from)], limit).await?;
    Ok(fetched.remove(&0).unwrap_or_default())
}

/// The segments of each of `asked` (shard, from), by its index there.
async fn read_shards(
    connection: &mut PgConnection,
    asked: &[(u32, From)],
    limit: i64,
) -> Result<HashMap<usize, Fetched>, StoreError> {
    let shards: Vec<i32> = asked.iter().map(|(shard, _)| *shard as i32).collect();
    let xids: Vec<String> = asked.iter().map(|(_, from)| from.0.to_string()).collect();
    let numbers: Vec<i64> = asked.iter().map(|(_, from)| from.1).collect();
    let rows = sqlx::query(READ_SEGMENTS)
        .bind(&shards)
        .bind(&xids)
        .bind(&numbers)
        .bind(limit)
        .fetch_all(&mut *connection)
        .await?;
    let mut fetched: HashMap<usize, Fetched> = HashMap::with_capacity(asked.len());
    for row in &rows {
        // WITH ORDINALITY counts from one.
        let request: i64 = row.try_get("request")?;
        let entry = fetched.entry(request as usize - 1).or_default();
        entry.held_back = row.try_get("held_back")?;
        if row.try_get::<Option<i64>, _>("number")?.is_some() {
            entry.rows.push(SegmentRow::from_row(row)?);
        }
    }
    Ok(fetched)
}
