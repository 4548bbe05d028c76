//! The state store: runs and their assets, the run queue, partitions and small named
//! state (schedule ticks, sensor cursors). An SQLite file under `.weir/` by default; a
//! PostgreSQL database when several workers share one queue.
//!
//! ```text
//!  queued ──claim──► running ──► succeeded | failed
//!    ▲                  │ heartbeat stops (worker died)
//!    └──── recover ◄────┘   running assets with attempts left -> queued, others -> failed
//! ```

mod db;

use std::time::Duration;

pub use db::Value;
use db::{Db, Row};
use serde::Serialize;
use weir_common::Error;
use weir_config::Project;

/// Schema versions, applied in order, each in its own transaction.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        run_trigger TEXT NOT NULL,
        run_key TEXT UNIQUE,
        selector TEXT,
        partition_key TEXT,
        full_refresh BIGINT NOT NULL DEFAULT 0,
        retry_of TEXT,
        status TEXT NOT NULL,
        worker TEXT,
        recoveries BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        started_at BIGINT,
        ended_at BIGINT,
        heartbeat_at BIGINT,
        error TEXT
    );
    CREATE INDEX runs_by_status ON runs (status, created_at);
    CREATE INDEX runs_by_time ON runs (created_at);
    CREATE TABLE run_assets (
        run_id TEXT NOT NULL,
        asset TEXT NOT NULL,
        position BIGINT NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts BIGINT NOT NULL DEFAULT 0,
        max_attempts BIGINT NOT NULL DEFAULT 1,
        started_at BIGINT,
        ended_at BIGINT,
        rows_read BIGINT,
        rows_written BIGINT,
        rows_quarantined BIGINT,
        version BIGINT,
        error TEXT,
        error_domain TEXT,
        note TEXT,
        PRIMARY KEY (run_id, asset)
    );
    CREATE INDEX run_assets_by_asset ON run_assets (asset, ended_at);
    CREATE TABLE partitions (
        asset TEXT NOT NULL,
        partition_key TEXT NOT NULL,
        status TEXT NOT NULL,
        run_id TEXT,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (asset, partition_key)
    );
    CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at BIGINT NOT NULL
    );",
)];

/// Key of the PostgreSQL advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 7_218_118_263;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A run as the store holds it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunRecord {
    pub id: String,
    pub project: String,
    /// `manual`, `schedule:NAME`, `sensor:NAME`, `backfill:ID`, `retry:RUN`.
    pub trigger: String,
    pub run_key: Option<String>,
    pub selector: Option<String>,
    pub partition: Option<String>,
    pub full_refresh: bool,
    pub retry_of: Option<String>,
    /// `queued`, `running`, `succeeded`, `failed`.
    pub status: String,
    pub worker: Option<String>,
    /// How often a dead worker's run was taken back.
    pub recoveries: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub heartbeat_at: Option<i64>,
    pub error: Option<String>,
}

const RUN_COLS: &str = "id, project, run_trigger, run_key, selector, partition_key, full_refresh, \
     retry_of, status, worker, recoveries, created_at, started_at, ended_at, heartbeat_at, error";

impl RunRecord {
    pub fn new(project: &str, trigger: &str) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            project: project.to_string(),
            trigger: trigger.to_string(),
            run_key: None,
            selector: None,
            partition: None,
            full_refresh: false,
            retry_of: None,
            status: "queued".into(),
            worker: None,
            recoveries: 0,
            created_at: now_ms(),
            started_at: None,
            ended_at: None,
            heartbeat_at: None,
            error: None,
        }
    }

    fn from_row(r: &Row) -> Self {
        Self {
            id: r[0].text().unwrap_or_default(),
            project: r[1].text().unwrap_or_default(),
            trigger: r[2].text().unwrap_or_default(),
            run_key: r[3].text(),
            selector: r[4].text(),
            partition: r[5].text(),
            full_refresh: r[6].int().unwrap_or(0) != 0,
            retry_of: r[7].text(),
            status: r[8].text().unwrap_or_default(),
            worker: r[9].text(),
            recoveries: r[10].int().unwrap_or(0),
            created_at: r[11].int().unwrap_or(0),
            started_at: r[12].int(),
            ended_at: r[13].int(),
            heartbeat_at: r[14].int(),
            error: r[15].text(),
        }
    }

    fn params(&self) -> Vec<Value> {
        vec![
            self.id.as_str().into(),
            self.project.as_str().into(),
            self.trigger.as_str().into(),
            self.run_key.clone().into(),
            self.selector.clone().into(),
            self.partition.clone().into(),
            i64::from(self.full_refresh).into(),
            self.retry_of.clone().into(),
            self.status.as_str().into(),
            self.worker.clone().into(),
            self.recoveries.into(),
            self.created_at.into(),
            self.started_at.into(),
            self.ended_at.into(),
            self.heartbeat_at.into(),
            self.error.clone().into(),
        ]
    }
}

/// One asset of one run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AssetRecord {
    pub run_id: String,
    pub asset: String,
    /// Place in the run's graph order.
    pub position: i64,
    pub kind: String,
    /// `queued`, `running`, `retrying`, `succeeded`, `failed`, `skipped`.
    pub status: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub started_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub rows_read: Option<i64>,
    pub rows_written: Option<i64>,
    pub rows_quarantined: Option<i64>,
    pub version: Option<i64>,
    pub error: Option<String>,
    pub error_domain: Option<String>,
    pub note: Option<String>,
}

const ASSET_COLS: &str = "run_id, asset, position, kind, status, attempts, max_attempts, \
     started_at, ended_at, rows_read, rows_written, rows_quarantined, version, error, \
     error_domain, note";

impl AssetRecord {
    /// A queued asset of a run, not attempted yet.
    pub fn queued(run_id: &str, asset: &str, position: i64, kind: &str, max_attempts: i64) -> Self {
        Self {
            run_id: run_id.into(),
            asset: asset.into(),
            position,
            kind: kind.into(),
            status: "queued".into(),
            attempts: 0,
            max_attempts,
            started_at: None,
            ended_at: None,
            rows_read: None,
            rows_written: None,
            rows_quarantined: None,
            version: None,
            error: None,
            error_domain: None,
            note: None,
        }
    }

    fn from_row(r: &Row) -> Self {
        Self {
            run_id: r[0].text().unwrap_or_default(),
            asset: r[1].text().unwrap_or_default(),
            position: r[2].int().unwrap_or(0),
            kind: r[3].text().unwrap_or_default(),
            status: r[4].text().unwrap_or_default(),
            attempts: r[5].int().unwrap_or(0),
            max_attempts: r[6].int().unwrap_or(1),
            started_at: r[7].int(),
            ended_at: r[8].int(),
            rows_read: r[9].int(),
            rows_written: r[10].int(),
            rows_quarantined: r[11].int(),
            version: r[12].int(),
            error: r[13].text(),
            error_domain: r[14].text(),
            note: r[15].text(),
        }
    }

    fn params(&self) -> Vec<Value> {
        vec![
            self.run_id.as_str().into(),
            self.asset.as_str().into(),
            self.position.into(),
            self.kind.as_str().into(),
            self.status.as_str().into(),
            self.attempts.into(),
            self.max_attempts.into(),
            self.started_at.into(),
            self.ended_at.into(),
            self.rows_read.into(),
            self.rows_written.into(),
            self.rows_quarantined.into(),
            self.version.into(),
            self.error.clone().into(),
            self.error_domain.clone().into(),
            self.note.clone().into(),
        ]
    }
}

/// `$1, $2, ... $n` starting after `offset`.
fn placeholders(offset: usize, n: usize) -> String {
    (offset + 1..=offset + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What recovery did with a run whose worker stopped sending heartbeats.
#[derive(Debug, Clone, Serialize)]
pub struct Recovered {
    pub run_id: String,
    /// Assets interrupted with no attempts left: failed, never run again.
    pub failed: Vec<String>,
    /// Assets interrupted with attempts left: they run again when the run resumes.
    pub retried: Vec<String>,
}

/// The state store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Db,
}

impl Store {
    /// The project's store: `state.connection` (PostgreSQL) or the SQLite file
    /// `state.path` (default `.weir/state.db`). Applies pending migrations.
    pub async fn open(project: &Project) -> Result<Store, Error> {
        let state = &project.config.state;
        let db = match &state.connection {
            Some(name) => {
                let conn = project.config.connections.get(name).ok_or_else(|| {
                    Error::user(format!(
                        "state.connection `{name}` is not defined under `connections:` in weir.yaml"
                    ))
                    .with_hint(format!(
                        "known connections: {}",
                        project
                            .config
                            .connections
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                let client = weir_connectors::postgres::connect(name, conn).await?;
                client
                    .batch_execute(
                        "CREATE SCHEMA IF NOT EXISTS weir_state; SET search_path TO weir_state",
                    )
                    .await
                    .map_err(|e| Error::external(format!("state store ({name}): {e}")))?;
                Db::from_postgres(client)
            }
            None => {
                let path = project.root.join(&state.path);
                Db::open_sqlite(&path)?
            }
        };
        let store = Store { db };
        store.migrate().await?;
        Ok(store)
    }

    /// A SQLite store at `path` (tests, tools).
    pub async fn open_sqlite(path: &std::path::Path) -> Result<Store, Error> {
        let store = Store {
            db: Db::open_sqlite(path)?,
        };
        store.migrate().await?;
        Ok(store)
    }

    pub fn describe(&self) -> String {
        self.db.describe()
    }

    async fn migrate(&self) -> Result<(), Error> {
        // On PostgreSQL a session lock serializes workers that start at once; SQLite's
        // writer lock does the same per transaction.
        if self.db.is_postgres() {
            self.db
                .execute("SELECT pg_advisory_lock($1)", &[MIGRATION_LOCK.into()])
                .await?;
        }
        let result = self.apply_migrations().await;
        if self.db.is_postgres() {
            self.db
                .execute("SELECT pg_advisory_unlock($1)", &[MIGRATION_LOCK.into()])
                .await?;
        }
        result
    }

    async fn apply_migrations(&self) -> Result<(), Error> {
        self.db
            .execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
                &[],
            )
            .await?;
        for (version, sql) in MIGRATIONS {
            if self.has_migration(*version).await? {
                continue;
            }
            let script = format!(
                "{sql};\nINSERT INTO schema_migrations VALUES ({version}, {});",
                now_ms()
            );
            if let Err(e) = self.db.batch(&script).await {
                // Another SQLite process applied it between the check and the lock.
                if !self.has_migration(*version).await? {
                    return Err(
                        e.context(format!("migrating the state store to version {version}"))
                    );
                }
            }
        }
        Ok(())
    }

    async fn has_migration(&self, version: i64) -> Result<bool, Error> {
        let rows = self
            .db
            .query(
                "SELECT count(*) FROM schema_migrations WHERE version = $1",
                &[version.into()],
            )
            .await?;
        Ok(rows.first().and_then(|r| r[0].int()).unwrap_or(0) > 0)
    }

    /// The newest schema version applied.
    pub async fn schema_version(&self) -> Result<i64, Error> {
        let rows = self
            .db
            .query("SELECT max(version) FROM schema_migrations", &[])
            .await?;
        Ok(rows.first().and_then(|r| r[0].int()).unwrap_or(0))
    }

    /// Adds a run. Returns false (and adds nothing) when a run with the same run key
    /// exists: the same schedule tick or sensor event enqueued twice.
    pub async fn insert_run(&self, run: &RunRecord) -> Result<bool, Error> {
        let sql = format!(
            "INSERT INTO runs ({RUN_COLS}) VALUES ({}) ON CONFLICT DO NOTHING",
            placeholders(0, 16)
        );
        Ok(self.db.execute(&sql, &run.params()).await? == 1)
    }

    pub async fn run(&self, id: &str) -> Result<Option<RunRecord>, Error> {
        let sql = format!("SELECT {RUN_COLS} FROM runs WHERE id = $1");
        let rows = self.db.query(&sql, &[id.into()]).await?;
        Ok(rows.first().map(RunRecord::from_row))
    }

    /// A run by id or unique id prefix.
    pub async fn find_run(&self, id: &str) -> Result<RunRecord, Error> {
        if let Some(r) = self.run(id).await? {
            return Ok(r);
        }
        let sql = format!("SELECT {RUN_COLS} FROM runs WHERE id LIKE $1 LIMIT 2");
        let rows = self.db.query(&sql, &[format!("{id}%").into()]).await?;
        match rows.len() {
            1 => Ok(RunRecord::from_row(&rows[0])),
            0 => Err(Error::user(format!("no run `{id}` in the state store"))
                .with_hint("`weir runs` lists recent runs")),
            _ => Err(Error::user(format!("run id prefix `{id}` is ambiguous"))
                .with_hint("give more characters of the id")),
        }
    }

    /// The newest runs first.
    pub async fn list_runs(
        &self,
        limit: usize,
        status: Option<&str>,
    ) -> Result<Vec<RunRecord>, Error> {
        let rows = match status {
            Some(s) => {
                let sql = format!(
                    "SELECT {RUN_COLS} FROM runs WHERE status = $1 ORDER BY created_at DESC, id LIMIT $2"
                );
                self.db
                    .query(&sql, &[s.into(), (limit as i64).into()])
                    .await?
            }
            None => {
                let sql =
                    format!("SELECT {RUN_COLS} FROM runs ORDER BY created_at DESC, id LIMIT $1");
                self.db.query(&sql, &[(limit as i64).into()]).await?
            }
        };
        Ok(rows.iter().map(RunRecord::from_row).collect())
    }

    /// Takes the oldest queued run for `worker`. Safe with many workers: on PostgreSQL
    /// competing workers skip each other's locked rows; SQLite serializes writers.
    pub async fn claim(&self, worker: &str) -> Result<Option<RunRecord>, Error> {
        self.claim_matching(worker, "%").await
    }

    /// As [`Store::claim`], only runs whose trigger is `LIKE` the pattern (`backfill:%`).
    pub async fn claim_matching(
        &self,
        worker: &str,
        trigger: &str,
    ) -> Result<Option<RunRecord>, Error> {
        let lock = if self.db.is_postgres() {
            "FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let now = now_ms();
        let sql = format!(
            "UPDATE runs SET status = 'running', worker = $1, started_at = COALESCE(started_at, $2), heartbeat_at = $2
             WHERE status = 'queued' AND id = (
                SELECT id FROM runs WHERE status = 'queued' AND run_trigger LIKE $3
                ORDER BY created_at, id LIMIT 1 {lock})
             RETURNING {RUN_COLS}"
        );
        let rows = self
            .db
            .query(&sql, &[worker.into(), now.into(), trigger.into()])
            .await?;
        Ok(rows.first().map(RunRecord::from_row))
    }

    /// Partitions of `selector`'s runs that are queued or running now.
    pub async fn active_partitions(&self, selector: &str) -> Result<Vec<String>, Error> {
        let rows = self
            .db
            .query(
                "SELECT partition_key FROM runs WHERE selector = $1 AND partition_key IS NOT NULL
                 AND status IN ('queued', 'running')",
                &[selector.into()],
            )
            .await?;
        Ok(rows.iter().filter_map(|r| r[0].text()).collect())
    }

    /// Renews `worker`'s lease on a run. False when the run is no longer this worker's
    /// (it was recovered by another process after missed heartbeats).
    pub async fn heartbeat(&self, run_id: &str, worker: &str) -> Result<bool, Error> {
        let n = self
            .db
            .execute(
                "UPDATE runs SET heartbeat_at = $1 WHERE id = $2 AND worker = $3 AND status = 'running'",
                &[now_ms().into(), run_id.into(), worker.into()],
            )
            .await?;
        Ok(n == 1)
    }

    pub async fn finish_run(
        &self,
        run_id: &str,
        status: &str,
        error: Option<String>,
    ) -> Result<(), Error> {
        self.db
            .execute(
                "UPDATE runs SET status = $1, ended_at = $2, error = $3 WHERE id = $4",
                &[status.into(), now_ms().into(), error.into(), run_id.into()],
            )
            .await?;
        Ok(())
    }

    /// Adds asset rows for a run (in chunks: one statement per 50 rows).
    pub async fn insert_assets(&self, assets: &[AssetRecord]) -> Result<(), Error> {
        for chunk in assets.chunks(50) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| format!("({})", placeholders(i * 16, 16)))
                .collect();
            let sql = format!(
                "INSERT INTO run_assets ({ASSET_COLS}) VALUES {} ON CONFLICT DO NOTHING",
                values.join(", ")
            );
            let params: Vec<Value> = chunk.iter().flat_map(AssetRecord::params).collect();
            self.db.execute(&sql, &params).await?;
        }
        Ok(())
    }

    /// Writes an asset row's state.
    pub async fn update_asset(&self, a: &AssetRecord) -> Result<(), Error> {
        let mut params = a.params();
        let (run_id, asset) = (params.remove(0), params.remove(0));
        params.push(run_id);
        params.push(asset);
        self.db
            .execute(
                "UPDATE run_assets SET position = $1, kind = $2, status = $3, attempts = $4,
                   max_attempts = $5, started_at = $6, ended_at = $7, rows_read = $8,
                   rows_written = $9, rows_quarantined = $10, version = $11, error = $12,
                   error_domain = $13, note = $14
                 WHERE run_id = $15 AND asset = $16",
                &params,
            )
            .await?;
        Ok(())
    }

    /// A run's assets in graph order.
    pub async fn assets(&self, run_id: &str) -> Result<Vec<AssetRecord>, Error> {
        let sql =
            format!("SELECT {ASSET_COLS} FROM run_assets WHERE run_id = $1 ORDER BY position");
        let rows = self.db.query(&sql, &[run_id.into()]).await?;
        Ok(rows.iter().map(AssetRecord::from_row).collect())
    }

    /// The latest finished record of each asset (for `weir status`).
    pub async fn latest_assets(&self) -> Result<Vec<AssetRecord>, Error> {
        let sql = format!(
            "SELECT {} FROM run_assets a
             WHERE a.ended_at = (SELECT max(b.ended_at) FROM run_assets b
                                 WHERE b.asset = a.asset AND b.status IN ('succeeded', 'failed'))
             ORDER BY a.asset",
            ASSET_COLS
                .split(", ")
                .map(|c| format!("a.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let rows = self.db.query(&sql, &[]).await?;
        Ok(rows.iter().map(AssetRecord::from_row).collect())
    }

    /// When each asset last succeeded.
    pub async fn last_success(&self) -> Result<Vec<(String, i64)>, Error> {
        let rows = self
            .db
            .query(
                "SELECT asset, max(ended_at) FROM run_assets WHERE status = 'succeeded' GROUP BY asset",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((r[0].text()?, r[1].int()?)))
            .collect())
    }

    /// Finds runs whose worker has not sent a heartbeat for `lease`, takes each back
    /// (only one process can win a given run), settles its interrupted assets by their
    /// retry policy and queues the run again so a worker resumes it.
    pub async fn recover(&self, lease: Duration, me: &str) -> Result<Vec<Recovered>, Error> {
        let cutoff = now_ms() - lease.as_millis() as i64;
        let stale = self
            .db
            .query(
                "SELECT id FROM runs WHERE status = 'running' AND COALESCE(heartbeat_at, 0) < $1",
                &[cutoff.into()],
            )
            .await?;
        let mut out = Vec::new();
        for row in stale {
            let Some(id) = row[0].text() else { continue };
            let won = self
                .db
                .execute(
                    "UPDATE runs SET worker = $1, heartbeat_at = $2
                     WHERE id = $3 AND status = 'running' AND COALESCE(heartbeat_at, 0) < $4",
                    &[
                        me.into(),
                        now_ms().into(),
                        id.as_str().into(),
                        cutoff.into(),
                    ],
                )
                .await?;
            if won != 1 {
                continue;
            }
            let mut rec = Recovered {
                run_id: id.clone(),
                failed: Vec::new(),
                retried: Vec::new(),
            };
            for mut a in self.assets(&id).await? {
                if a.status != "running" && a.status != "retrying" {
                    continue;
                }
                if a.attempts >= a.max_attempts {
                    a.status = "failed".into();
                    a.ended_at = Some(now_ms());
                    a.error = Some(format!(
                        "interrupted: the worker stopped during attempt {} of {} (no attempts left, not run again)",
                        a.attempts, a.max_attempts
                    ));
                    a.error_domain = Some("external".into());
                    rec.failed.push(a.asset.clone());
                } else {
                    a.status = "queued".into();
                    a.note = Some(format!(
                        "interrupted during attempt {}; retried when the run resumes",
                        a.attempts
                    ));
                    rec.retried.push(a.asset.clone());
                }
                self.update_asset(&a).await?;
            }
            self.db
                .execute(
                    "UPDATE runs SET status = 'queued', worker = NULL, recoveries = recoveries + 1
                     WHERE id = $1 AND worker = $2",
                    &[id.as_str().into(), me.into()],
                )
                .await?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Small named state: schedule ticks, sensor cursors.
    pub async fn get_state(&self, key: &str) -> Result<Option<String>, Error> {
        let rows = self
            .db
            .query("SELECT value FROM kv WHERE key = $1", &[key.into()])
            .await?;
        Ok(rows.first().and_then(|r| r[0].text()))
    }

    pub async fn set_state(&self, key: &str, value: &str) -> Result<(), Error> {
        self.db
            .execute(
                "INSERT INTO kv (key, value, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                &[key.into(), value.into(), now_ms().into()],
            )
            .await?;
        Ok(())
    }

    /// Partition states of an asset: (partition key, status, run id).
    pub async fn partitions(
        &self,
        asset: &str,
    ) -> Result<Vec<(String, String, Option<String>)>, Error> {
        let rows = self
            .db
            .query(
                "SELECT partition_key, status, run_id FROM partitions WHERE asset = $1 ORDER BY partition_key",
                &[asset.into()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r[0].text().unwrap_or_default(),
                    r[1].text().unwrap_or_default(),
                    r[2].text(),
                )
            })
            .collect())
    }

    pub async fn set_partition(
        &self,
        asset: &str,
        key: &str,
        status: &str,
        run_id: Option<&str>,
    ) -> Result<(), Error> {
        self.db
            .execute(
                "INSERT INTO partitions (asset, partition_key, status, run_id, updated_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (asset, partition_key) DO UPDATE SET status = excluded.status,
                   run_id = excluded.run_id, updated_at = excluded.updated_at",
                &[asset.into(), key.into(), status.into(), run_id.into(), now_ms().into()],
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
