//! PostgreSQL: a private cluster per test process, a fresh database per
//! test, and a caller's own transaction for postgres_xid tokens.

use super::*;

/// The newest PostgreSQL server binaries installed (Debian's layout), or
/// those in `OUTBOXD_TEST_PG_BIN`.
fn pg_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("OUTBOXD_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
}

/// A private PostgreSQL cluster in a temporary directory.
pub struct PgCluster {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// PostgreSQL refuses to run as root: then commands run as `postgres`.
    run_as: Option<&'static str>,
    /// fsync on, as in production; off (the default for tests) saves the
    /// shared cluster its disk flushes.
    durable: bool,
}

impl PgCluster {
    /// The cluster shared by every test of this process (or the one named by
    /// `OUTBOXD_TEST_DATABASE_URL`, then `None`).
    pub fn shared() -> Option<&'static PgCluster> {
        static SHARED: OnceLock<Option<PgCluster>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                if std::env::var("OUTBOXD_TEST_DATABASE_URL").is_ok() {
                    None
                } else {
                    Some(PgCluster::start())
                }
            })
            .as_ref()
    }

    /// A new cluster of its own, e.g. for a test that stops it.
    pub fn start() -> PgCluster {
        Self::start_with(false)
    }

    /// A new cluster of its own with fsync on, for a test that crashes it.
    pub fn start_durable() -> PgCluster {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> PgCluster {
        let bin = pg_bin_dir();
        let dir = std::env::temp_dir().join(unique("outboxd-pg"));
        std::fs::create_dir_all(&dir).unwrap();
        let run_as = is_root().then_some("postgres");
        if run_as.is_some() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "chown of the cluster directory failed");
        }
        let port = free_port();
        let cluster = PgCluster {
            port,
            dir,
            bin,
            run_as,
            durable,
        };
        watchdog(&format!(
            "{} ; rm -rf {}",
            cluster.shell(&format!(
                "{}/pg_ctl -D {}/data stop -m immediate",
                cluster.bin.display(),
                cluster.dir.display()
            )),
            cluster.dir.display()
        ));
        cluster.run(
            "initdb",
            &[
                "-D",
                &format!("{}/data", cluster.dir.display()),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        cluster.start_server();
        cluster
    }

    fn shell(&self, command: &str) -> String {
        match self.run_as {
            Some(user) => format!("runuser -u {user} -- {command}"),
            None => command.to_owned(),
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let output = command
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("running {tool}: {e}"));
        assert!(
            output.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Starts the server and waits (pg_ctl -w probes readiness) until it accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections=400 -c shared_buffers=128MB",
            self.port,
            self.dir.display(),
            if self.durable { "on" } else { "off" }
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &format!("{}/data", self.dir.display()),
                "-l",
                &format!("{}/server.log", self.dir.display()),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server at once, as a crash or an operator would.
    pub fn stop_server(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &format!("{}/data", self.dir.display()),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// Immediate shutdown: every server process quits at once, with no
    /// checkpoint and nothing written that was not written already; the
    /// next start recovers from the WAL, as after a crash.
    pub fn crash_server(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &format!("{}/data", self.dir.display()),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

/// A new, empty database for one test: its URL.
pub async fn fresh_database() -> String {
    let admin_url = match PgCluster::shared() {
        Some(cluster) => cluster.url("postgres"),
        None => std::env::var("OUTBOXD_TEST_DATABASE_URL").unwrap(),
    };
    fresh_database_on(&admin_url).await
}

/// A new database on the server of `admin_url`: its URL.
pub async fn fresh_database_on(admin_url: &str) -> String {
    use sqlx::Connection;
    let name = unique("outboxd_test");
    let mut connection = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("connecting to the test cluster");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut connection)
        .await
        .expect("creating a test database");
    let base = admin_url.rsplit_once('/').map(|(base, _)| base).unwrap();
    format!("{base}/{name}")
}

/// Every event id a PostgreSQL store holds, read from its tables alone: the
/// ids callers chose, and for every other position of every segment the
/// id that names it. One entry per stored event (a duplicate shows twice).
pub async fn stored_event_ids(store_url: &str) -> Vec<uuid::Uuid> {
    stored_events(store_url)
        .await
        .expect("reading the store's events")
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// [`stored_event_ids`], each with its stored state (`EventState` as
/// stored); an error while the store cannot be read (not migrated yet).
pub async fn stored_events(store_url: &str) -> Result<Vec<(uuid::Uuid, i16)>, sqlx::Error> {
    use outboxd::store::segment::EventLocation;
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(store_url).await?;
    let segments: Vec<(i64, i64, Vec<u8>)> =
        sqlx::query_as("SELECT number, millis, states FROM outbox_segments")
            .fetch_all(&mut connection)
            .await?;
    let chosen: HashMap<(i64, i32), uuid::Uuid> = sqlx::query_as::<_, (uuid::Uuid, i64, i32)>(
        "SELECT event_id, segment, position FROM outbox_caller_ids",
    )
    .fetch_all(&mut connection)
    .await?
    .into_iter()
    .map(|(id, segment, position)| ((segment, position), id))
    .collect();
    let mut ids = Vec::new();
    for (number, millis, states) in segments {
        for (position, state) in states.iter().enumerate() {
            let position = position as i32;
            let id = match chosen.get(&(number, position)) {
                Some(id) => *id,
                None => {
                    EventLocation {
                        segment: number as u64,
                        position: position as u16,
                    }
                    .id(millis as u64)
                    .0
                }
            };
            ids.push((id, i16::from(*state)));
        }
    }
    Ok(ids)
}

/// A caller's open PostgreSQL transaction and its postgres_xid token.
pub struct CallerTransaction {
    connection: sqlx::PgConnection,
    pub pid: i32,
    pub xid: u64,
    pub system_id: u64,
}

impl CallerTransaction {
    pub async fn begin(url: &str) -> CallerTransaction {
        use sqlx::Connection;
        let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut connection).await.unwrap();
        // Some business write of the caller's own.
        let (xid, system_id, pid): (String, i64, i32) = sqlx::query_as(
            "SELECT pg_current_xact_id()::text, (SELECT system_identifier FROM pg_control_system()), pg_backend_pid()",
        )
        .fetch_one(&mut connection)
        .await
        .unwrap();
        CallerTransaction {
            connection,
            pid,
            xid: xid.parse().unwrap(),
            system_id: system_id as u64,
        }
    }

    pub fn token(
        &self,
        producer: &str,
        transaction_id: &str,
    ) -> Option<outboxd::proto::TransactionToken> {
        super::postgres_xid_token(producer, transaction_id, self.xid, self.system_id)
    }

    pub async fn commit(mut self) {
        sqlx::query("COMMIT")
            .execute(&mut self.connection)
            .await
            .unwrap();
    }

    pub async fn rollback(mut self) {
        sqlx::query("ROLLBACK")
            .execute(&mut self.connection)
            .await
            .unwrap();
    }
}
