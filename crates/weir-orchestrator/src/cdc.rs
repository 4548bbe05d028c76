//! `weir cdc run`: PostgreSQL tables mirrored in lake tables from logical replication,
//! exactly once.
//!
//! ```text
//!  slot (pgoutput, binary) ─► peek a batch of whole transactions ─► per table: net effect
//!    by key, in commit order ─► one Delta merge per table, with the batch's end LSN as a
//!    txn action in the same commit ─► every table committed ─► advance the slot
//! ```
//! Each mirror records `weir:cdc:<job>` = the end LSN of the last source transaction it
//! holds. Changes are read with `pg_logical_slot_peek_binary_changes`, which does not move
//! the slot; the slot moves only after every table of the batch is committed. A crash in
//! between reads the batch again, and each table skips the transactions it already holds
//! (commit LSN below its own LSN). So the slot never confirms a position the lake does not
//! hold, and nothing is applied twice.
//!
//! The initial snapshot runs after the slot exists, in a repeatable-read transaction per
//! table, in key order and chunks (one commit each, resumable). Its visibility
//! (`pg_current_snapshot()`) decides, for each streamed transaction that committed before
//! the snapshot was taken, whether the snapshot's rows already hold it: those are skipped,
//! the others applied. A snapshot resumed after a crash continues with a new snapshot for
//! the keys after the last chunk (keys of integer or uuid type; other keys restart it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use weir_common::Error;
use weir_config::{Cdc, Project, SnapshotMode, WriteMode};
use weir_connectors::postgres::cdc::{
    self as pg, format_lsn, Message, SnapshotMark, TableShape, Value,
};
use weir_lake::{Lake, WriteOptions, WriteSpec};

/// When a run stops (besides Ctrl-C or SIGTERM).
#[derive(Debug, Clone, Default)]
pub struct CdcOptions {
    /// Stop once the slot has had nothing new for this long (everything read is applied).
    pub until_idle: Option<Duration>,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CdcSummary {
    pub job: String,
    /// Rows copied by snapshots.
    pub snapshot_rows: u64,
    /// Source transactions applied (with at least one change of a captured table).
    pub transactions: u64,
    /// Row changes applied (inserts, updates, deletes; a truncate counts one).
    pub changes: u64,
    /// Row changes read again after a restart and skipped: their tables already held them.
    pub skipped: u64,
    /// Delta commits of mirror and change-log tables.
    pub commits: u64,
    pub batches: u64,
    /// The slot's confirmed position after the run.
    pub lsn: String,
    /// From a source commit to the Delta commit holding it, over the run's transactions.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

/// The app id of the LSN a mirror holds.
pub fn lsn_app(job: &str) -> String {
    format!("weir:cdc:{job}")
}

fn snapshot_app(job: &str) -> String {
    format!("weir:cdc:{job}:snapshot")
}

fn snapshot_file(n: i64) -> String {
    format!("snapshot-{n}.json")
}

const RESNAPSHOT_FILE: &str = "resnapshot";
const DELETED: &str = "__weir_deleted";

/// The snapshot of one table: the snapshots its chunks were read in, and how far it got.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SnapshotState {
    /// In key order: each segment's rows were read in `mark`, up to key `upto` (the last
    /// segment: to the end).
    segments: Vec<Segment>,
    last_key: Option<Vec<String>>,
    done: bool,
    rows: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Segment {
    mark: SnapshotMark,
    upto: Option<Vec<String>>,
}

/// A captured table and its mirror.
struct Mirror {
    source: String,
    table: String,
    shape: TableShape,
    /// The end LSN of the last source transaction the mirror holds (0: none yet).
    lsn: u64,
    snapshot: SnapshotState,
    /// Snapshot chunks committed (the `weir:cdc:<job>:snapshot` txn version).
    chunks: i64,
    /// Changes read in this batch, in commit order.
    pending: Vec<Change>,
    /// Whether the mirror table exists.
    exists: bool,
    /// What the change log and history tables hold, read once per run.
    held: Held,
}

#[derive(Debug, Default)]
struct Held {
    /// The LSN `<mirror>__changes` holds.
    log: Option<u64>,
    /// The last load number and LSN of `<mirror>__history`.
    history: Option<(i64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

#[derive(Debug, Clone)]
struct Change {
    op: Op,
    /// The new row (insert, update), or the old key or row (delete); empty for truncate.
    row: Vec<Value>,
    /// An update's old key or row, when sent (the key changed, or REPLICA IDENTITY FULL).
    old: Option<Vec<Value>>,
    commit_lsn: u64,
    xid: u32,
    commit_time_us: i64,
}

type Key = Vec<Option<Vec<u8>>>;

/// Puts `key`'s values at the key `positions` of `row`.
fn set_key(row: &mut [Value], positions: &[usize], key: &Key) {
    for (p, k) in positions.iter().zip(key) {
        row[*p] = match k {
            Some(b) => Value::Binary(b.clone()),
            None => Value::Null,
        };
    }
}

fn key_of(row: &[Value], positions: &[usize]) -> Key {
    positions
        .iter()
        .map(|i| match row.get(*i) {
            Some(Value::Binary(b)) => Some(b.clone()),
            Some(Value::Text(t)) => Some(t.as_bytes().to_vec()),
            _ => None,
        })
        .collect()
}

/// The CDC job named `name`, or a usage error listing the ones there are.
pub fn find<'a>(project: &'a Project, name: &str) -> Result<&'a Cdc, Error> {
    project.cdc.iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<String> = project.cdc.iter().map(|s| s.name.clone()).collect();
        Error::user(format!("unknown CDC job `{name}`")).with_hint(
            match weir_config::closest(name, &names) {
                Some(c) => format!("did you mean `{c}`?"),
                None if names.is_empty() => "CDC jobs are defined in cdc/*.yaml".into(),
                None => format!("CDC jobs: {}", names.join(", ")),
            },
        )
    })
}

async fn connect(project: &Project, job: &Cdc) -> Result<Client, Error> {
    let name = &job.config.source.connection;
    let conn = project.config.connections.get(name).ok_or_else(|| {
        Error::user(format!(
            "{}: connection `{name}` is not defined",
            job.file.display()
        ))
    })?;
    weir_connectors::postgres::conn::connect(name, conn).await
}

/// The slot as PostgreSQL reports it.
#[derive(Debug, Clone, Serialize)]
pub struct SlotInfo {
    pub confirmed_lsn: u64,
    pub active: bool,
    /// `reserved`, `extended`, `unreserved` or `lost` (invalidated: its WAL is gone).
    pub wal_status: Option<String>,
    pub plugin: String,
}

async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, Error> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, active, wal_status, plugin::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg::pg_err("reading replication slots"))?;
    row.map(|r| {
        let lsn: Option<String> = r.get(0);
        Ok(SlotInfo {
            confirmed_lsn: match lsn {
                Some(l) => pg::parse_lsn(&l)?,
                None => 0,
            },
            active: r.get(1),
            wal_status: r.get(2),
            plugin: r.get(3),
        })
    })
    .transpose()
}

async fn current_lsn(client: &Client) -> Result<u64, Error> {
    let row = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(pg::pg_err("reading the WAL position"))?;
    pg::parse_lsn(row.get(0))
}

/// Loads each table's shape and its mirror's position.
async fn load_mirrors(lake: &Lake, client: &Client, job: &Cdc) -> Result<Vec<Mirror>, Error> {
    let mut mirrors = Vec::new();
    for (schema, table) in job.source_tables() {
        let shape = pg::describe(client, &schema, &table).await?;
        let mirror = job.mirror(&table);
        let exists = lake.exists(&mirror).await;
        let (lsn, chunks, snapshot) = if exists {
            let t = lake.open(&mirror).await?;
            let lsn = lake
                .txn_version(&t, &lsn_app(&job.name))
                .await?
                .unwrap_or(0) as u64;
            let chunks = lake
                .txn_version(&t, &snapshot_app(&job.name))
                .await?
                .unwrap_or(0);
            let state = if chunks > 0 {
                let bytes = lake
                    .read_state_file(&mirror, &lsn_app(&job.name), &snapshot_file(chunks))
                    .await?
                    .ok_or_else(|| {
                        Error::internal(format!(
                            "`{mirror}` records snapshot chunk {chunks}, but its state file is missing"
                        ))
                    })?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| Error::internal(format!("snapshot state of `{mirror}`: {e}")))?
            } else {
                SnapshotState::default()
            };
            (lsn, chunks, state)
        } else {
            (0, 0, SnapshotState::default())
        };
        mirrors.push(Mirror {
            source: format!("{schema}.{table}"),
            table: mirror,
            shape,
            lsn,
            snapshot,
            chunks,
            pending: Vec::new(),
            exists,
            held: Held::default(),
        });
    }
    Ok(mirrors)
}

/// Tables whose re-snapshot was requested (`weir cdc resnapshot`).
async fn resnapshot_requested(lake: &Lake, job: &Cdc, m: &Mirror) -> Result<bool, Error> {
    if !m.exists {
        return Ok(false);
    }
    Ok(lake
        .read_state_file(&m.table, &lsn_app(&job.name), RESNAPSHOT_FILE)
        .await?
        .is_some())
}

/// Asks the job to copy `tables` (source names, or all with none) again: the running job
/// does it between batches, a stopped one when it starts.
pub async fn request_resnapshot(
    project: &Project,
    lake: &Lake,
    name: &str,
    tables: &[String],
) -> Result<Vec<String>, Error> {
    let job = find(project, name)?;
    let mut out = Vec::new();
    let all = job.source_tables();
    for t in tables {
        let bare = t.rsplit('.').next().unwrap_or(t);
        if !all
            .iter()
            .any(|(s, n)| n == bare && (t == bare || *t == format!("{s}.{n}")))
        {
            return Err(
                Error::user(format!("`{t}` is not captured by CDC job `{name}`")).with_hint(
                    format!(
                        "its tables: {}",
                        all.iter()
                            .map(|(s, n)| format!("{s}.{n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
            );
        }
    }
    for (schema, table) in all {
        let source = format!("{schema}.{table}");
        if !tables.is_empty() && !tables.iter().any(|t| *t == source || *t == table) {
            continue;
        }
        let mirror = job.mirror(&table);
        if !lake.exists(&mirror).await {
            // Not copied yet: the first run snapshots it anyway.
            continue;
        }
        lake.write_state_file(&mirror, &lsn_app(&job.name), RESNAPSHOT_FILE, b"1".to_vec())
            .await?;
        out.push(source);
    }
    Ok(out)
}

/// Runs CDC job `name` until stopped (or idle, with `until_idle`).
pub async fn run_cdc(
    project: &Project,
    lake: &Lake,
    name: &str,
    opts: &CdcOptions,
) -> Result<CdcSummary, Error> {
    let job = find(project, name)?;
    let cfg = &job.config;
    let client = connect(project, job).await?;
    let slot = job.slot();
    let publication = job.publication();
    let mut mirrors = load_mirrors(lake, &client, job).await?;
    let mut requested = Vec::new();
    for m in &mirrors {
        requested.push(resnapshot_requested(lake, job, m).await?);
    }
    let started = mirrors.iter().any(|m| m.lsn > 0 || m.chunks > 0);
    let high = mirrors.iter().map(|m| m.lsn).max().unwrap_or(0);
    match slot_info(&client, &slot).await? {
        None if started && !requested.iter().all(|r| *r) => {
            return Err(Error::user(format!(
                "replication slot `{slot}` of CDC job `{name}` is gone, but its mirrors hold changes up to {}: \
                 the changes since cannot be read any more",
                format_lsn(high)
            ))
            .with_hint(format!(
                "copy the tables again from a new slot: `weir cdc resnapshot {name}`, then `weir cdc run {name}`"
            )));
        }
        Some(s) if s.wal_status.as_deref() == Some("lost") => {
            return Err(Error::user(format!(
                "replication slot `{slot}` was invalidated by the server (its WAL was removed, e.g. past \
                 `max_slot_wal_keep_size`): changes after {} are lost",
                format_lsn(s.confirmed_lsn)
            ))
            .with_hint(format!(
                "drop the slot (`SELECT pg_drop_replication_slot('{slot}')`), then `weir cdc resnapshot {name}` and run again"
            )));
        }
        Some(s) if s.plugin != "pgoutput" => {
            return Err(Error::user(format!(
                "replication slot `{slot}` uses plugin `{}`, not pgoutput",
                s.plugin
            ))
            .with_hint("name another slot with `source.slot`"));
        }
        Some(s) if started && s.confirmed_lsn > high && !requested.iter().all(|r| *r) => {
            return Err(Error::user(format!(
                "replication slot `{slot}` is at {}, past the {} the mirrors hold: something else moved it, \
                 and the changes in between are lost to this job",
                format_lsn(s.confirmed_lsn),
                format_lsn(high)
            ))
            .with_hint(format!(
                "give the job a slot of its own; to rebuild the mirrors: `weir cdc resnapshot {name}`"
            )));
        }
        _ => {}
    }
    let tables: Vec<String> = mirrors.iter().map(|m| m.source.clone()).collect();
    let mut position = pg::ensure_slot(&client, &publication, &slot, &tables).await?;
    tracing::info!(job = name, slot = %slot, position = %format_lsn(position), "cdc started");
    let mut summary = CdcSummary {
        job: name.to_string(),
        ..Default::default()
    };
    // Snapshots: tables never copied, interrupted copies, and requested ones.
    for (i, m) in mirrors.iter_mut().enumerate() {
        let fresh = !m.exists || (m.lsn == 0 && m.chunks == 0);
        let needed = match cfg.snapshot.mode {
            SnapshotMode::Initial => fresh || !m.snapshot.done || requested[i],
            SnapshotMode::Never => requested[i],
        };
        if needed {
            summary.snapshot_rows +=
                snapshot(lake, project, job, m, position, requested[i]).await?;
            summary.commits += 1;
        } else if fresh {
            m.lsn = position;
        }
    }
    let mut latencies: Vec<f64> = Vec::new();
    let mut last_change = Instant::now();
    let mut last_check = Instant::now();
    // When the last lag alert went out (one per 5 minutes while lagging).
    let mut alerted: Option<Instant> = None;
    let stop = crate::stream::shutdown_signal();
    tokio::pin!(stop);
    loop {
        if last_check.elapsed() >= Duration::from_secs(5) {
            last_check = Instant::now();
            for m in mirrors.iter_mut() {
                if !m.snapshot.done || !resnapshot_requested(lake, job, m).await? {
                    continue;
                }
                if ranged(&m.shape) {
                    // Chunk by chunk between batches; the other tables go on.
                    tracing::info!(table = %m.source, "re-snapshot started");
                    m.snapshot = SnapshotState::default();
                } else {
                    summary.snapshot_rows +=
                        snapshot(lake, project, job, m, position, true).await?;
                }
            }
        }
        for m in mirrors.iter_mut().filter(|m| !m.snapshot.done) {
            summary.snapshot_rows += copy_next_chunk(lake, project, job, m).await?;
        }
        let wal = current_lsn(&client).await?;
        let messages = pg::peek(
            &client,
            &slot,
            &publication,
            cfg.batch.max_changes.min(i32::MAX as usize) as i32,
            true,
        )
        .await?;
        // Lag: the WAL the slot holds back, and the age of the oldest change read now.
        let oldest = messages.iter().find_map(|(_, m)| match m {
            Message::Begin { commit_time_us, .. } => Some(*commit_time_us),
            _ => None,
        });
        let lag_bytes = wal.saturating_sub(position);
        let lag_secs = oldest.map_or(0.0, |t| (now_us() - t) as f64 / 1e6);
        let limit = &cfg.lag_limit;
        let over = limit.bytes.is_some_and(|b| lag_bytes > b)
            || limit.time.is_some_and(|t| lag_secs > t.as_secs_f64());
        if over && alerted.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(300)) {
            alerted = Some(Instant::now());
            tracing::warn!(job = name, lag_bytes, lag_secs, "cdc lag past lag_limit");
            crate::alert::send(
                project,
                serde_json::json!({
                    "kind": "cdc_lag",
                    "job": name,
                    "slot": slot,
                    "lag_bytes": lag_bytes,
                    "lag_seconds": lag_secs,
                }),
            )
            .await;
        } else if !over {
            alerted = None;
        }
        if messages.is_empty() {
            // Idle is measured from the end of the last batch applied, and only stops a run
            // whose slot had nothing more to read.
            if let Some(idle) = opts.until_idle {
                if last_change.elapsed() >= idle {
                    break;
                }
            }
            // Quiet: record the server's position in the lake, then let the slot go there.
            if last_change.elapsed() >= cfg.heartbeat
                && wal > position
                && record_position(lake, job, &mut mirrors, wal, "heartbeat").await?
            {
                pg::advance(&client, &slot, wal).await?;
                position = wal;
                tracing::debug!(job = name, lsn = %format_lsn(wal), "heartbeat");
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.batch.poll) => {}
                _ = &mut stop => break,
            }
            continue;
        }
        let commits_before = summary.commits;
        let end = apply_batch(
            lake,
            &client,
            job,
            &mut mirrors,
            messages,
            &mut summary,
            &mut latencies,
        )
        .await?;
        if let Some(end) = end {
            // A batch whose changes the mirrors already held (a snapshot's rows) commits
            // nothing: its end is recorded anyway before the slot moves past it.
            if summary.commits == commits_before {
                record_position(lake, job, &mut mirrors, end, "held").await?;
            }
            pg::advance(&client, &slot, end).await?;
            position = end;
        }
        summary.batches += 1;
        last_change = Instant::now();
        // A signal between batches stops here, with everything read applied.
        if futures::FutureExt::now_or_never(&mut stop).is_some() {
            break;
        }
    }
    summary.lsn = format_lsn(position);
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        (!latencies.is_empty())
            .then(|| latencies[((latencies.len() - 1) as f64 * p).round() as usize])
    };
    summary.latency_p50_ms = pct(0.5);
    summary.latency_p99_ms = pct(0.99);
    Ok(summary)
}

/// Records `lsn` in the first existing mirror with a commit that changes no data (unless
/// a mirror already holds it), so that the slot can move there while never being past
/// what the lake holds. Returns whether the slot may move.
async fn record_position(
    lake: &Lake,
    job: &Cdc,
    mirrors: &mut [Mirror],
    lsn: u64,
    why: &str,
) -> Result<bool, Error> {
    if mirrors.iter().any(|m| m.lsn >= lsn) {
        return Ok(true);
    }
    let Some(first) = mirrors.iter_mut().find(|m| m.exists) else {
        return Ok(false);
    };
    lake.commit_positions(
        &first.table,
        &[(lsn_app(&job.name), lsn as i64)],
        HashMap::from([(
            "weir.cdc".to_string(),
            serde_json::json!({"job": job.name, why: format_lsn(lsn)}),
        )]),
    )
    .await?;
    first.lsn = lsn;
    Ok(true)
}

/// Whether keys of these kinds compare in Rust as PostgreSQL orders them.
fn comparable_keys(shape: &TableShape) -> bool {
    use weir_connectors::postgres::types::Kind;
    shape.key.iter().all(|k| {
        shape.columns.iter().any(|c| {
            &c.name == k && matches!(c.kind, Kind::Int2 | Kind::Int4 | Kind::Int8 | Kind::Uuid)
        })
    })
}

/// Orders two keys given as text (integers by value, uuids by their text).
fn cmp_keys(a: &[String], b: &[String]) -> std::cmp::Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = match (x.parse::<i64>(), y.parse::<i64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    std::cmp::Ordering::Equal
}

/// Copies `m`'s table in key-ordered chunks, one commit each; resumes an interrupted copy
/// after its last chunk when the keys allow it. Returns the rows copied.
async fn snapshot(
    lake: &Lake,
    project: &Project,
    job: &Cdc,
    m: &mut Mirror,
    position: u64,
    restart: bool,
) -> Result<u64, Error> {
    let client = connect(project, job).await?;
    let resume = !restart
        && m.exists
        && m.chunks > 0
        && !m.snapshot.done
        && m.snapshot.last_key.is_some()
        && comparable_keys(&m.shape);
    let mut state = if resume {
        m.snapshot.clone()
    } else {
        SnapshotState::default()
    };
    // A fresh copy starts where the stream is; a resumed one keeps its position.
    let lsn = if resume && m.lsn > 0 { m.lsn } else { position };
    let mark = pg::begin_snapshot(&client).await?;
    if let Some(last) = state.segments.last_mut() {
        last.upto = state.last_key.clone();
    }
    state.segments.push(Segment { mark, upto: None });
    state.done = false;
    let mut first = !resume;
    let mut copied = 0u64;
    let started = Instant::now();
    tracing::info!(table = %m.source, mirror = %m.table, resume, "snapshot started");
    loop {
        let (batch, last, bad) = pg::snapshot_chunk(
            &client,
            &m.shape,
            state.last_key.as_deref(),
            job.config.snapshot.chunk_rows,
        )
        .await?;
        copied += batch.num_rows() as u64;
        if !bad.is_empty() {
            quarantine(lake, job, m, &bad, -(m.chunks + 1), "the snapshot").await?;
        }
        commit_chunk(lake, job, m, &mut state, batch, last, lsn, first).await?;
        first = false;
        if state.done {
            break;
        }
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(pg::pg_err("ending the snapshot"))?;
    m.lsn = lsn;
    m.snapshot = state;
    lake.delete_state_file(&m.table, &lsn_app(&job.name), RESNAPSHOT_FILE)
        .await?;
    tracing::info!(table = %m.source, rows = copied, secs = started.elapsed().as_secs_f64(), "snapshot done");
    Ok(copied)
}

/// Whether the mirror's key is one integer or uuid column: its snapshot chunks then
/// replace their key range, and a re-snapshot runs between the stream's batches.
fn ranged(shape: &TableShape) -> bool {
    shape.key.len() == 1 && comparable_keys(shape)
}

/// `key > lo AND key <= hi` over the mirror's key column, as SQL.
fn key_range(shape: &TableShape, lo: Option<&[String]>, hi: Option<&[String]>) -> String {
    use weir_connectors::postgres::types::Kind;
    let key = &shape.key[0];
    let numeric = shape
        .columns
        .iter()
        .any(|c| &c.name == key && matches!(c.kind, Kind::Int2 | Kind::Int4 | Kind::Int8));
    let lit = |v: &[String]| {
        let v = v.first().cloned().unwrap_or_default();
        if numeric {
            v
        } else {
            format!("'{}'", v.replace('\'', "''"))
        }
    };
    let col = format!("\"{}\"", key.replace('"', "\"\""));
    let mut parts = Vec::new();
    if let Some(lo) = lo {
        parts.push(format!("{col} > {}", lit(lo)));
    }
    if let Some(hi) = hi {
        parts.push(format!("{col} <= {}", lit(hi)));
    }
    if parts.is_empty() {
        "true".into()
    } else {
        parts.join(" AND ")
    }
}

/// Commits one snapshot chunk of `m` (the rows after `state.last_key` up to `last`):
/// the state file first, then the rows with the chunk number and `lsn` in one commit.
/// With a ranged key the chunk replaces its key range, so a mirror being copied again
/// keeps its other rows meanwhile; otherwise the first chunk replaces the table and the
/// others append.
#[allow(clippy::too_many_arguments)] // two call sites, both in this file
async fn commit_chunk(
    lake: &Lake,
    job: &Cdc,
    m: &mut Mirror,
    state: &mut SnapshotState,
    batch: RecordBatch,
    last: Option<Vec<String>>,
    lsn: u64,
    first: bool,
) -> Result<(), Error> {
    let rows = batch.num_rows();
    let lo = state.last_key.clone();
    state.rows += rows as u64;
    if let Some(last) = last {
        state.last_key = Some(last);
    }
    state.done = rows < job.config.snapshot.chunk_rows;
    let n = m.chunks + 1;
    let bytes =
        serde_json::to_vec(&state).map_err(|e| Error::internal(format!("snapshot state: {e}")))?;
    lake.write_state_file(&m.table, &lsn_app(&job.name), &snapshot_file(n), bytes)
        .await?;
    let ctx = weir_lake::new_session();
    if job.config.sink.history && rows > 0 {
        let n = batch.num_rows();
        let seed = vec![history_batch(
            batch.clone(),
            vec![now_us(); n],
            vec![false; n],
            0,
        )?];
        apply_history(lake, &ctx, job, m, seed, lsn).await?;
    }
    let df = ctx
        .read_batch(batch)
        .map_err(|e| Error::internal(format!("snapshot batch: {e}")))?;
    let spec = if ranged(&m.shape) {
        let hi = if state.done {
            None
        } else {
            state.last_key.as_deref()
        };
        WriteSpec {
            mode: WriteMode::Overwrite,
            replace_where: m.exists.then(|| key_range(&m.shape, lo.as_deref(), hi)),
            ..Default::default()
        }
    } else {
        WriteSpec {
            mode: if first {
                WriteMode::Overwrite
            } else {
                WriteMode::Append
            },
            ..Default::default()
        }
    };
    let opts = WriteOptions {
        txn: None,
        positions: vec![
            (snapshot_app(&job.name), n),
            (lsn_app(&job.name), lsn as i64),
        ],
        metadata: HashMap::from([(
            "weir.cdc".to_string(),
            serde_json::json!({"job": job.name, "snapshot_chunk": n, "rows": rows, "done": state.done}),
        )]),
    };
    lake.write(&m.table, &ctx, df, &spec, &opts).await?;
    if n > 1 {
        let _ = lake
            .delete_state_file(&m.table, &lsn_app(&job.name), &snapshot_file(n - 1))
            .await;
    }
    m.chunks = n;
    m.exists = true;
    Ok(())
}

/// One chunk of a re-snapshot that runs between the stream's batches: read in a
/// snapshot of its own, which judges the streamed changes of its key range. Returns the
/// rows copied.
async fn copy_next_chunk(
    lake: &Lake,
    project: &Project,
    job: &Cdc,
    m: &mut Mirror,
) -> Result<u64, Error> {
    let client = connect(project, job).await?;
    let mark = pg::begin_snapshot(&client).await?;
    let (batch, last, bad) = pg::snapshot_chunk(
        &client,
        &m.shape,
        m.snapshot.last_key.as_deref(),
        job.config.snapshot.chunk_rows,
    )
    .await?;
    if !bad.is_empty() {
        quarantine(lake, job, m, &bad, -(m.chunks + 1), "the snapshot").await?;
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(pg::pg_err("ending the snapshot"))?;
    let rows = batch.num_rows();
    let mut state = m.snapshot.clone();
    let done = rows < job.config.snapshot.chunk_rows;
    state.segments.push(Segment {
        mark,
        upto: if done { None } else { last.clone() },
    });
    let lsn = m.lsn;
    commit_chunk(lake, job, m, &mut state, batch, last, lsn, false).await?;
    m.snapshot = state;
    if m.snapshot.done {
        lake.delete_state_file(&m.table, &lsn_app(&job.name), RESNAPSHOT_FILE)
            .await?;
        tracing::info!(table = %m.source, rows = m.snapshot.rows, "re-snapshot done");
    }
    Ok(rows as u64)
}

/// Whether `m`'s snapshot already holds the effect of transaction `xid` on the row with
/// key `key`.
fn snapshot_holds(m: &Mirror, row: &[Value], xid: u32, commit_lsn: u64) -> bool {
    let copying = !m.snapshot.done && ranged(&m.shape);
    let segs = &m.snapshot.segments;
    // The snapshots were taken in order: a commit after the last one is in none of them
    // (the common case, once a snapshot is done, needs no key).
    let after_all = segs.last().is_none_or(|s| commit_lsn >= s.mark.lsn);
    if after_all && !copying {
        return false;
    }
    let key: Vec<String> = m
        .shape
        .key_positions()
        .iter()
        .map(|i| key_text(&m.shape, *i, row.get(*i)))
        .collect();
    // A re-snapshot under way: a key it has not reached yet will be copied with the
    // change in it.
    if copying {
        match &m.snapshot.last_key {
            None => return true,
            Some(last) if cmp_keys(&key, last) == std::cmp::Ordering::Greater => return true,
            _ => {}
        }
    }
    if after_all {
        return false;
    }
    // The segment whose key range holds the key (segments are in key order; the last
    // one's range is open).
    let i = segs.partition_point(|s| match &s.upto {
        Some(up) => cmp_keys(&key, up) == std::cmp::Ordering::Greater,
        None => false,
    });
    let seg = &segs[i.min(segs.len() - 1)];
    let sees = seg.mark.sees(xid, commit_lsn);
    if sees {
        tracing::trace!(table = %m.table, ?key, xid, lsn = %format_lsn(commit_lsn), mark = ?seg.mark, upto = ?seg.upto, "held by the snapshot");
    }
    sees
}

/// A key value (integer or uuid, in binary form) as text.
fn key_text(shape: &TableShape, i: usize, v: Option<&Value>) -> String {
    use weir_connectors::postgres::types::Kind;
    let Some(Value::Binary(b)) = v else {
        return String::new();
    };
    match (&shape.columns[i].kind, b.len()) {
        (Kind::Int2, 2) => i16::from_be_bytes([b[0], b[1]]).to_string(),
        (Kind::Int4, 4) => i32::from_be_bytes([b[0], b[1], b[2], b[3]]).to_string(),
        (Kind::Int8, 8) => i64::from_be_bytes(b[..8].try_into().unwrap_or_default()).to_string(),
        (Kind::Uuid, 16) => pg::uuid_text(b),
        _ => String::from_utf8_lossy(b).into_owned(),
    }
}

/// Sorts a batch of messages into the mirrors' pending changes and commits them; returns
/// the end LSN of the batch's last transaction.
async fn apply_batch(
    lake: &Lake,
    client: &Client,
    job: &Cdc,
    mirrors: &mut [Mirror],
    messages: Vec<(u64, Message)>,
    summary: &mut CdcSummary,
    latencies: &mut Vec<f64>,
) -> Result<Option<u64>, Error> {
    let mut relations: HashMap<u32, usize> = HashMap::new();
    let mut txn: Option<(u64, u32, i64)> = None;
    let mut last_end: Option<u64> = None;
    let mut commit_times: Vec<i64> = Vec::new();
    let mut txn_changes = 0u64;
    let find = |mirrors: &[Mirror], schema: &str, name: &str| {
        mirrors
            .iter()
            .position(|m| m.shape.schema == schema && m.shape.name == name)
    };
    for (_, msg) in messages {
        match msg {
            Message::Begin {
                final_lsn,
                commit_time_us,
                xid,
            } => {
                txn = Some((final_lsn, xid, commit_time_us));
                txn_changes = 0;
            }
            Message::Commit {
                end_lsn,
                commit_time_us,
                ..
            } => {
                last_end = Some(end_lsn);
                if txn_changes > 0 {
                    summary.transactions += 1;
                    commit_times.push(commit_time_us);
                }
                txn = None;
            }
            Message::Relation(rel) => {
                let Some(i) = find(mirrors, &rel.schema, &rel.name) else {
                    continue;
                };
                relations.insert(rel.id, i);
                let m = &mirrors[i];
                let shape = pg::relation_shape(client, &rel, &m.shape.key, Some(&m.shape)).await?;
                if shape.columns != m.shape.columns {
                    // The table changed: what is pending was read in the old shape.
                    if !mirrors[i].pending.is_empty() {
                        if let Some(end) = last_end {
                            summary.commits +=
                                commit_mirror(lake, job, &mut mirrors[i], end).await?;
                        }
                    }
                    tracing::info!(table = %mirrors[i].source, "table changed at the source; the mirror follows");
                    mirrors[i].shape = shape;
                }
            }
            Message::Insert { relation, new } => push(
                mirrors,
                &relations,
                relation,
                txn,
                Op::Insert,
                new,
                None,
                summary,
                &mut txn_changes,
            )?,
            Message::Update { relation, old, new } => push(
                mirrors,
                &relations,
                relation,
                txn,
                Op::Update,
                new,
                old,
                summary,
                &mut txn_changes,
            )?,
            Message::Delete { relation, old } => push(
                mirrors,
                &relations,
                relation,
                txn,
                Op::Delete,
                old,
                None,
                summary,
                &mut txn_changes,
            )?,
            Message::Truncate { relations: ids } => {
                for id in ids {
                    push(
                        mirrors,
                        &relations,
                        id,
                        txn,
                        Op::Truncate,
                        Vec::new(),
                        None,
                        summary,
                        &mut txn_changes,
                    )?;
                }
            }
            Message::Other(_) => {}
        }
    }
    let Some(end) = last_end else {
        return Ok(None);
    };
    for m in mirrors.iter_mut() {
        if !m.pending.is_empty() {
            summary.commits += commit_mirror(lake, job, m, end).await?;
        }
    }
    let now = now_us();
    latencies.extend(commit_times.iter().map(|t| (now - t) as f64 / 1000.0));
    Ok(Some(end))
}

#[allow(clippy::too_many_arguments)] // the loop's state, passed down once
fn push(
    mirrors: &mut [Mirror],
    relations: &HashMap<u32, usize>,
    relation: u32,
    txn: Option<(u64, u32, i64)>,
    op: Op,
    row: Vec<Value>,
    old: Option<Vec<Value>>,
    summary: &mut CdcSummary,
    txn_changes: &mut u64,
) -> Result<(), Error> {
    let Some(i) = relations.get(&relation) else {
        return Err(Error::internal(format!(
            "a change of relation {relation} came before its description"
        )));
    };
    let (commit_lsn, xid, commit_time_us) =
        txn.ok_or_else(|| Error::internal("a change outside a transaction"))?;
    let m = &mut mirrors[*i];
    // Already in the mirror: committed before (a batch read again after a restart), or
    // held by the snapshot's rows.
    let held = commit_lsn < m.lsn
        || match op {
            Op::Truncate => false,
            _ => snapshot_holds(m, &row, xid, commit_lsn),
        };
    if held {
        summary.skipped += 1;
        return Ok(());
    }
    summary.changes += 1;
    *txn_changes += 1;
    m.pending.push(Change {
        op,
        row,
        old,
        commit_lsn,
        xid,
        commit_time_us,
    });
    Ok(())
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The net effect of `m`'s pending changes, by key: the last row of each key (or its
/// deletion), and whether the table was truncated first. An update's unchanged TOASTed
/// values are taken from an earlier change of the batch where there is one.
struct Net {
    truncated: bool,
    rows: Vec<(Key, Option<Vec<Value>>)>,
    /// For rows whose key an update changed while values stayed unchanged: the old key,
    /// under which the mirror holds those values.
    moved: HashMap<Key, Key>,
}

fn net_effect(m: &Mirror) -> Net {
    let positions = m.shape.key_positions();
    let mut at: HashMap<Key, usize> = HashMap::new();
    let mut rows: Vec<(Key, Option<Vec<Value>>)> = Vec::new();
    let mut moved: HashMap<Key, Key> = HashMap::new();
    let mut truncated = false;
    fn set(
        at: &mut HashMap<Key, usize>,
        rows: &mut Vec<(Key, Option<Vec<Value>>)>,
        key: Key,
        v: Option<Vec<Value>>,
    ) {
        match at.get(&key) {
            Some(i) => rows[*i].1 = v,
            None => {
                at.insert(key.clone(), rows.len());
                rows.push((key, v));
            }
        }
    }
    for c in &m.pending {
        match c.op {
            Op::Truncate => {
                truncated = true;
                rows.clear();
                at.clear();
                moved.clear();
            }
            Op::Insert => {
                let key = key_of(&c.row, &positions);
                moved.remove(&key);
                set(&mut at, &mut rows, key, Some(c.row.clone()))
            }
            Op::Delete => {
                let key = key_of(&c.row, &positions);
                moved.remove(&key);
                set(&mut at, &mut rows, key, None)
            }
            Op::Update => {
                let key = key_of(&c.row, &positions);
                // Where the previous values are: under the old key if the key changed.
                let mut from = key.clone();
                if let Some(old) = &c.old {
                    let old_key = key_of(old, &positions);
                    if old_key != key {
                        from = moved.remove(&old_key).unwrap_or(old_key);
                    }
                }
                let mut row = c.row.clone();
                if row.contains(&Value::Unchanged) {
                    if let Some(Some(prev)) = at.get(&from).map(|i| &rows[*i].1) {
                        for (j, v) in row.iter_mut().enumerate() {
                            if *v == Value::Unchanged {
                                *v = prev.get(j).cloned().unwrap_or(Value::Null);
                            }
                        }
                    }
                }
                if from != key {
                    set(&mut at, &mut rows, from.clone(), None);
                    if row.contains(&Value::Unchanged) {
                        moved.insert(key.clone(), from);
                    } else {
                        moved.remove(&key);
                    }
                }
                set(&mut at, &mut rows, key, Some(row));
            }
        }
    }
    Net {
        truncated,
        rows,
        moved,
    }
}

fn batch_err(e: impl std::fmt::Display) -> Error {
    Error::internal(format!("building the changes batch: {e}"))
}

/// Commits `m`'s pending changes (and their change-log rows) with LSN `end`; returns the
/// number of commits made.
async fn commit_mirror(lake: &Lake, job: &Cdc, m: &mut Mirror, end: u64) -> Result<u64, Error> {
    let net = net_effect(m);
    let shape = m.shape.clone();
    let positions = shape.key_positions();
    let mut commits = 0;
    if job.config.sink.change_log {
        write_change_log(lake, job, m, end).await?;
        commits += 1;
    }
    if job.config.sink.history {
        write_history(lake, job, m, end).await?;
        commits += 2;
    }
    let upserts: Vec<&[Value]> = net.rows.iter().filter_map(|(_, r)| r.as_deref()).collect();
    // The key each upsert's unchanged values are found under in the mirror.
    let lookups: Vec<Vec<Value>> = net
        .rows
        .iter()
        .filter(|(_, r)| r.is_some())
        .map(|(key, r)| {
            let mut row = r.clone().unwrap_or_default();
            if let Some(from) = net.moved.get(key) {
                set_key(&mut row, &positions, from);
            }
            row
        })
        .collect();
    let deletes: Vec<Vec<Value>> = net
        .rows
        .iter()
        .filter(|(_, r)| r.is_none())
        .map(|(key, _)| {
            let mut row = vec![Value::Null; shape.columns.len()];
            set_key(&mut row, &positions, key);
            row
        })
        .collect();
    let unchanged: Vec<usize> = (0..shape.columns.len())
        .filter(|j| upserts.iter().any(|r| r.get(*j) == Some(&Value::Unchanged)))
        .collect();
    let (mut live, bad) = pg::rows_to_batch(&shape, &upserts)?;
    if !bad.is_empty() {
        quarantine(
            lake,
            job,
            m,
            &bad,
            end as i64,
            &format!("the change at {}", format_lsn(end)),
        )
        .await?;
    }
    let ctx = weir_lake::new_session();
    if !unchanged.is_empty() && m.exists && !net.truncated {
        let lookup_refs: Vec<&[Value]> = lookups.iter().map(|r| r.as_slice()).collect();
        let lookup = pg::rows_to_batch(&shape, &lookup_refs)?.0;
        live = keep_unchanged(
            lake, &ctx, &m.table, &shape, live, &lookup, &upserts, &unchanged,
        )
        .await?;
    }
    // (Columns dropped at the source stay in the mirror: `Lake::write` fills them with
    // nulls.)
    let widen = |b: RecordBatch, flag: Option<bool>| -> Result<RecordBatch, Error> {
        let n = b.num_rows();
        let extra = flag.map(|flag| {
            let c: ArrayRef = Arc::new(BooleanArray::from(vec![flag; n]));
            (Field::new(DELETED, DataType::Boolean, false), c)
        });
        with_columns(&b, extra)
    };
    let (df, spec) = if net.truncated {
        let df = ctx.read_batch(widen(live, None)?).map_err(batch_err)?;
        (
            df,
            WriteSpec {
                mode: WriteMode::Overwrite,
                ..Default::default()
            },
        )
    } else {
        let del_refs: Vec<&[Value]> = deletes.iter().map(|r| r.as_slice()).collect();
        let dead = pg::rows_to_batch(&shape, &del_refs)?.0;
        let live = widen(live, Some(false))?;
        let dead = widen(dead, Some(true))?;
        let dead =
            RecordBatch::try_new(live.schema(), dead.columns().to_vec()).map_err(batch_err)?;
        let df = ctx.read_batches(vec![live, dead]).map_err(batch_err)?;
        (
            df,
            WriteSpec {
                mode: WriteMode::Merge,
                key: shape.key.clone(),
                delete_flag: Some(DELETED.to_string()),
                fast_compression: true,
                ..Default::default()
            },
        )
    };
    let opts = WriteOptions {
        txn: Some((lsn_app(&job.name), end as i64)),
        positions: Vec::new(),
        metadata: HashMap::from([(
            "weir.cdc".to_string(),
            serde_json::json!({
                "job": job.name,
                "lsn": format_lsn(end),
                "changes": m.pending.len(),
                "source_commit_time_us": m.pending.last().map(|c| c.commit_time_us),
            }),
        )]),
    };
    let w = lake.write(&m.table, &ctx, df, &spec, &opts).await?;
    tracing::debug!(table = %m.table, lsn = %format_lsn(end), inserted = w.rows_inserted, updated = w.rows_updated, deleted = w.rows_deleted, "applied");
    m.pending.clear();
    m.lsn = end;
    m.exists = true;
    Ok(commits + 1)
}

/// Sets aside, in `<mirror>__quarantine`, the rows whose values the mirror cannot hold
/// (they land with those values null), with the reason and the row as text. `load`
/// identifies the batch (its end LSN) or snapshot chunk (negative), so a replay replaces
/// its rows instead of adding them again.
async fn quarantine(
    lake: &Lake,
    job: &Cdc,
    m: &Mirror,
    bad: &[pg::BadValue],
    load: i64,
    what: &str,
) -> Result<(), Error> {
    let table = format!("{}__quarantine", m.table);
    tracing::warn!(table = %m.source, rows = bad.len(), "values the mirror cannot hold were set to null and quarantined");
    let rows: Vec<weir_core::BadRow> = bad
        .iter()
        .map(|b| weir_core::BadRow {
            reason: format!("{} (stored as null in `{}`)", b.reason, m.table),
            source: format!("postgres_cdc:{}/{}: {what}", job.name, m.source),
            line: b.row as u64 + 1,
            raw: b.raw.clone(),
        })
        .collect();
    let metadata = HashMap::new();
    let target = crate::quarantine::Target {
        lake,
        table: &table,
        pipeline: &job.name,
        run_id: "cdc",
        load,
        partition: None,
        metadata: &metadata,
    };
    crate::quarantine::write(&target, crate::quarantine::Scope::Read, &rows).await
}

/// Fills the unchanged TOASTed values of `live` from the mirror's current rows, found by
/// the key columns of `lookup` (the old key where an update changed it).
#[allow(clippy::too_many_arguments)] // one call site
async fn keep_unchanged(
    lake: &Lake,
    ctx: &datafusion::prelude::SessionContext,
    mirror: &str,
    shape: &TableShape,
    live: RecordBatch,
    lookup: &RecordBatch,
    rows: &[&[Value]],
    unchanged: &[usize],
) -> Result<RecordBatch, Error> {
    let mut extra: Vec<(Field, ArrayRef)> = Vec::new();
    for (i, p) in shape.key_positions().iter().enumerate() {
        let field = lookup.schema().field(*p).clone();
        extra.push((
            field.with_name(format!("__weir_lookup_{i}")),
            lookup.column(*p).clone(),
        ));
    }
    // The join does not keep the input's order; callers rely on it.
    extra.push((
        Field::new("__weir_row", DataType::Int64, false),
        Arc::new(Int64Array::from_iter_values(0..live.num_rows() as i64)),
    ));
    for j in unchanged {
        let mask: BooleanArray = rows
            .iter()
            .map(|r| Some(r.get(*j) == Some(&Value::Unchanged)))
            .collect();
        extra.push((
            Field::new(format!("__weir_unchanged_{j}"), DataType::Boolean, false),
            Arc::new(mask),
        ));
    }
    let marked = with_columns(&live, extra)?;
    weir_engine::session::register_lake_table(ctx, lake, mirror, "__weir_mirror").await?;
    ctx.register_batch("__weir_changes", marked)
        .map_err(batch_err)?;
    let q = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
    let select: Vec<String> = shape
        .columns
        .iter()
        .enumerate()
        .map(|(j, c)| {
            if unchanged.contains(&j) {
                format!(
                    "CASE WHEN c.\"__weir_unchanged_{j}\" THEN t.{0} ELSE c.{0} END AS {0}",
                    q(&c.name)
                )
            } else {
                format!("c.{0} AS {0}", q(&c.name))
            }
        })
        .collect();
    let on: Vec<String> = shape
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("c.\"__weir_lookup_{i}\" = t.{}", q(k)))
        .collect();
    let sql = format!(
        "SELECT {} FROM __weir_changes c LEFT JOIN __weir_mirror t ON {} ORDER BY c.\"__weir_row\"",
        select.join(", "),
        on.join(" AND ")
    );
    let batches = ctx
        .sql(&sql)
        .await
        .map_err(batch_err)?
        .collect()
        .await
        .map_err(batch_err)?;
    let _ = ctx.deregister_table("__weir_mirror");
    let _ = ctx.deregister_table("__weir_changes");
    let schema = live.schema();
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let cols: Vec<ArrayRef> = b
            .columns()
            .iter()
            .zip(schema.fields())
            .map(|(a, f)| arrow::compute::cast(a, f.data_type()).map_err(batch_err))
            .collect::<Result<_, _>>()?;
        out.push(RecordBatch::try_new(schema.clone(), cols).map_err(batch_err)?);
    }
    arrow::compute::concat_batches(&schema, &out).map_err(batch_err)
}

/// Appends `m`'s pending changes to `<mirror>__changes`: one row per change with its
/// operation, commit LSN and time and transaction id, the row (the old key or row for a
/// delete), and the columns an update did not send (unchanged TOASTed values).
async fn write_change_log(lake: &Lake, job: &Cdc, m: &mut Mirror, end: u64) -> Result<(), Error> {
    let table = format!("{}__changes", m.table);
    let held = match m.held.log {
        Some(l) => l,
        None if lake.exists(&table).await => {
            let t = lake.open(&table).await?;
            lake.txn_version(&t, &lsn_app(&job.name))
                .await?
                .unwrap_or(0) as u64
        }
        None => 0,
    };
    let changes: Vec<&Change> = m.pending.iter().filter(|c| c.commit_lsn >= held).collect();
    let empty = vec![Value::Null; m.shape.columns.len()];
    let rows: Vec<&[Value]> = changes
        .iter()
        .map(|c| {
            if c.op == Op::Truncate {
                empty.as_slice()
            } else {
                c.row.as_slice()
            }
        })
        .collect();
    let data = pg::rows_to_batch(&m.shape, &rows)?.0;
    let mut fields = vec![
        Field::new("_op", DataType::Utf8, false),
        Field::new("_lsn", DataType::Utf8, false),
        Field::new(
            "_commit_time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("_xid", DataType::Int64, false),
        Field::new("_unchanged", DataType::Utf8, true),
    ];
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            changes.iter().map(|c| c.op.name()),
        )),
        Arc::new(StringArray::from_iter_values(
            changes.iter().map(|c| format_lsn(c.commit_lsn)),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(changes.iter().map(|c| c.commit_time_us))
                .with_timezone("UTC"),
        ),
        Arc::new(Int64Array::from_iter_values(
            changes.iter().map(|c| c.xid as i64),
        )),
        Arc::new(StringArray::from_iter(changes.iter().map(|c| {
            let names: Vec<&str> = c
                .row
                .iter()
                .enumerate()
                .filter(|(_, v)| **v == Value::Unchanged)
                .map(|(j, _)| m.shape.columns[j].name.as_str())
                .collect();
            (!names.is_empty()).then(|| names.join(","))
        }))),
    ];
    fields.extend(data.schema().fields().iter().map(|f| f.as_ref().clone()));
    cols.extend(data.columns().iter().cloned());
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(batch_err)?;
    let ctx = weir_lake::new_session();
    let df = ctx.read_batch(batch).map_err(batch_err)?;
    let spec = WriteSpec {
        mode: WriteMode::Append,
        fast_compression: true,
        ..Default::default()
    };
    let opts = WriteOptions {
        txn: Some((lsn_app(&job.name), end as i64)),
        ..Default::default()
    };
    lake.write(&table, &ctx, df, &spec, &opts).await?;
    m.held.log = Some(end);
    Ok(())
}

/// The type 2 history of `m`'s rows in `<mirror>__history` (with its own change table
/// `<mirror>__history__changes`), built by the dimension writer from every change:
/// `valid_from`/`valid_to` are source commit times. A key change closes the old key and
/// opens the new one; a truncate closes every key. Written before the mirror's commit,
/// since unchanged TOASTed values are looked up in the mirror as it was before the batch.
async fn write_history(lake: &Lake, job: &Cdc, m: &mut Mirror, end: u64) -> Result<(), Error> {
    let (_, held) = history_held(lake, job, m).await?;
    let shape = &m.shape;
    let positions = shape.key_positions();
    let key_row = |key: &Key| {
        let mut row = vec![Value::Null; shape.columns.len()];
        set_key(&mut row, &positions, key);
        row
    };
    let mut last: HashMap<Key, Vec<Value>> = HashMap::new();
    let mut rows: Vec<Vec<Value>> = Vec::new();
    let mut lookups: Vec<Vec<Value>> = Vec::new();
    let mut deleted: Vec<bool> = Vec::new();
    let mut times: Vec<i64> = Vec::new();
    // Truncates: the time, and where in `rows` it falls.
    let mut truncates: Vec<(i64, usize)> = Vec::new();
    for c in m.pending.iter().filter(|c| c.commit_lsn >= held) {
        let mut push = |row: Vec<Value>, lookup: Vec<Value>, del: bool| {
            rows.push(row);
            lookups.push(lookup);
            deleted.push(del);
            times.push(c.commit_time_us);
        };
        match c.op {
            Op::Truncate => {
                for key in std::mem::take(&mut last).into_keys() {
                    let row = key_row(&key);
                    push(row.clone(), row, true);
                }
                truncates.push((c.commit_time_us, rows.len()));
            }
            Op::Insert => {
                last.insert(key_of(&c.row, &positions), c.row.clone());
                push(c.row.clone(), c.row.clone(), false);
            }
            Op::Delete => {
                let key = key_of(&c.row, &positions);
                last.remove(&key);
                let row = key_row(&key);
                push(row.clone(), row, true);
            }
            Op::Update => {
                let key = key_of(&c.row, &positions);
                let mut from = key.clone();
                if let Some(old) = &c.old {
                    let old_key = key_of(old, &positions);
                    if old_key != key {
                        let row = key_row(&old_key);
                        push(row.clone(), row, true);
                        from = old_key;
                    }
                }
                let mut row = c.row.clone();
                let prev = last.remove(&from);
                if let Some(prev) = &prev {
                    for (j, v) in row.iter_mut().enumerate() {
                        if *v == Value::Unchanged {
                            *v = prev.get(j).cloned().unwrap_or(Value::Null);
                        }
                    }
                }
                // Values still unchanged are the mirror's, under the key they had.
                let mut lookup = row.clone();
                set_key(&mut lookup, &positions, &from);
                last.insert(key, row.clone());
                push(row, lookup, false);
            }
        }
    }
    let refs: Vec<&[Value]> = rows.iter().map(|r| r.as_slice()).collect();
    let mut batch = pg::rows_to_batch(shape, &refs)?.0;
    let ctx = weir_lake::new_session();
    let unchanged: Vec<usize> = (0..shape.columns.len())
        .filter(|j| refs.iter().any(|r| r.get(*j) == Some(&Value::Unchanged)))
        .collect();
    if !unchanged.is_empty() && m.exists {
        let lookup_refs: Vec<&[Value]> = lookups.iter().map(|r| r.as_slice()).collect();
        let lookup = pg::rows_to_batch(shape, &lookup_refs)?.0;
        batch = keep_unchanged(
            lake, &ctx, &m.table, shape, batch, &lookup, &refs, &unchanged,
        )
        .await?;
    }
    let mut parts = vec![history_batch(batch, times, deleted, 0)?];
    // A truncate closes every key the mirror held before the batch, too (closing a key
    // that has no current version is no change).
    if !truncates.is_empty() && m.exists {
        weir_engine::session::register_lake_table(&ctx, lake, &m.table, "__weir_mirror_keys")
            .await?;
        let keys: Vec<String> = shape
            .key
            .iter()
            .map(|k| format!("\"{}\"", k.replace('"', "\"\"")))
            .collect();
        let found = ctx
            .sql(&format!(
                "SELECT {} FROM __weir_mirror_keys",
                keys.join(", ")
            ))
            .await
            .map_err(batch_err)?
            .collect()
            .await
            .map_err(batch_err)?;
        let _ = ctx.deregister_table("__weir_mirror_keys");
        let schema = parts[0].schema();
        let mut seq = rows.len();
        for b in found {
            let cols: Vec<ArrayRef> = shape
                .columns
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    let dt = schema.field(j).data_type();
                    match b.schema().index_of(&c.name) {
                        Ok(i) if shape.key.contains(&c.name) => {
                            arrow::compute::cast(b.column(i), dt).map_err(batch_err)
                        }
                        _ => Ok(arrow::array::new_null_array(dt, b.num_rows())),
                    }
                })
                .collect::<Result<_, _>>()?;
            let data = RecordBatch::try_new(
                Arc::new(Schema::new(
                    schema.fields()[..shape.columns.len()]
                        .iter()
                        .map(|f| f.as_ref().clone())
                        .collect::<Vec<_>>(),
                )),
                cols,
            )
            .map_err(batch_err)?;
            let n = data.num_rows();
            let (time, _) = truncates[0];
            let part = history_batch(data, vec![time; n], vec![true; n], seq)?;
            seq += n;
            parts.push(
                RecordBatch::try_new(schema.clone(), part.columns().to_vec()).map_err(batch_err)?,
            );
        }
    }
    if parts.iter().all(|p| p.num_rows() == 0) {
        return Ok(());
    }
    apply_history(lake, &ctx, job, m, parts, end).await
}

/// Applies change rows (the columns, `_commit_time`, the delete flag and the order) to
/// `<mirror>__history` as one load of the dimension writer, recording `lsn`.
async fn apply_history(
    lake: &Lake,
    ctx: &datafusion::prelude::SessionContext,
    job: &Cdc,
    m: &mut Mirror,
    parts: Vec<RecordBatch>,
    lsn: u64,
) -> Result<(), Error> {
    let table = format!("{}__history", m.table);
    let app = history_app(&job.name);
    let (n, _) = history_held(lake, job, m).await?;
    let shape = &m.shape;
    let df = ctx.read_batches(parts).map_err(batch_err)?;
    let dim = weir_config::Dimension {
        scd: weir_config::ScdType::Scd2,
        key: shape.key.clone(),
        tracked: Vec::new(),
        change_ts: Some("_commit_time".into()),
        deletes: weir_config::DeleteMode::Close,
        delete_flag: Some(DELETED.into()),
        surrogate_key: weir_config::DEFAULT_SURROGATE_KEY.into(),
        unknown_member: false,
        inferred_members: None,
    };
    let load = weir_engine::scd::apply::Load {
        txn: (app, n + 1),
        time: chrono::Utc::now(),
        rebuild: false,
        metadata: HashMap::from([(
            "weir.cdc".to_string(),
            serde_json::json!({"job": job.name, "lsn": format_lsn(lsn)}),
        )]),
    };
    weir_engine::scd::apply::apply(lake, ctx, &table, &dim, df, &load).await?;
    m.held.history = Some((n + 1, lsn));
    Ok(())
}

fn history_app(job: &str) -> String {
    format!("{}:history", lsn_app(job))
}

/// The last load number of `<mirror>__history` and the LSN it holds (its last load's,
/// from that commit's metadata); read from the table once per run.
async fn history_held(lake: &Lake, job: &Cdc, m: &mut Mirror) -> Result<(i64, u64), Error> {
    if let Some(h) = m.held.history {
        return Ok(h);
    }
    let table = format!("{}__history", m.table);
    let h = if lake.exists(&table).await {
        let t = lake.open(&table).await?;
        let n = lake
            .txn_version(&t, &history_app(&job.name))
            .await?
            .unwrap_or(0);
        let lsn = lake
            .last_commit_info(&table)
            .await?
            .get("weir.cdc")
            .and_then(|v| v.get("lsn"))
            .and_then(|v| v.as_str())
            .map(pg::parse_lsn)
            .transpose()?
            .unwrap_or(0);
        (n, lsn)
    } else {
        (0, 0)
    };
    m.held.history = Some(h);
    Ok(h)
}

/// `b`'s rows as the history's change rows: with their commit times, delete flags and
/// order (from `seq0`).
fn history_batch(
    b: RecordBatch,
    times: Vec<i64>,
    deleted: Vec<bool>,
    seq0: usize,
) -> Result<RecordBatch, Error> {
    let n = b.num_rows();
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let extra: [(Field, ArrayRef); 3] = [
        (
            Field::new("_commit_time", time, false),
            Arc::new(TimestampMicrosecondArray::from(times).with_timezone("UTC")),
        ),
        (
            Field::new(DELETED, DataType::Boolean, false),
            Arc::new(BooleanArray::from(deleted)),
        ),
        (
            Field::new(weir_engine::scd::SEQ, DataType::Int64, false),
            Arc::new(Int64Array::from_iter_values(
                (seq0..seq0 + n).map(|i| i as i64),
            )),
        ),
    ];
    with_columns(&b, extra)
}

/// `b` with more columns after its own.
fn with_columns(
    b: &RecordBatch,
    extra: impl IntoIterator<Item = (Field, ArrayRef)>,
) -> Result<RecordBatch, Error> {
    let mut fields: Vec<Field> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut cols = b.columns().to_vec();
    for (f, c) in extra {
        fields.push(f);
        cols.push(c);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(batch_err)
}

/// One mirror in `weir cdc status`.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorStatus {
    pub source: String,
    pub mirror: String,
    /// The end LSN of the last source transaction the mirror holds.
    pub lsn: Option<String>,
    pub rows: Option<u64>,
    /// `done`, `in progress (N chunks)`, or `not started`.
    pub snapshot: String,
    pub resnapshot_requested: bool,
}

/// `weir cdc status`: the slot, its lag, and each mirror's position.
#[derive(Debug, Clone, Serialize)]
pub struct CdcStatus {
    pub job: String,
    pub slot: String,
    pub slot_exists: bool,
    /// A `weir cdc run` (or another client) is reading the slot now.
    pub slot_active: bool,
    pub wal_status: Option<String>,
    pub confirmed_lsn: Option<String>,
    pub server_lsn: String,
    /// WAL the slot holds back, in bytes.
    pub lag_bytes: Option<u64>,
    /// How long ago the oldest change not yet applied was committed (when the slot is free
    /// to be read; otherwise unknown).
    pub lag_seconds: Option<f64>,
    /// Past `lag_limit`, or the slot is gone or invalidated.
    pub problem: Option<String>,
    pub tables: Vec<MirrorStatus>,
}

pub async fn status(project: &Project, lake: &Lake, name: &str) -> Result<CdcStatus, Error> {
    let job = find(project, name)?;
    let client = connect(project, job).await?;
    let slot = job.slot();
    let info = slot_info(&client, &slot).await?;
    let server = current_lsn(&client).await?;
    let mut tables = Vec::new();
    let mut started = false;
    for (schema, table) in job.source_tables() {
        let mirror = job.mirror(&table);
        let (lsn, rows, snapshot, requested) = if lake.exists(&mirror).await {
            let t = lake.open(&mirror).await?;
            let lsn = lake.txn_version(&t, &lsn_app(&job.name)).await?;
            let chunks = lake
                .txn_version(&t, &snapshot_app(&job.name))
                .await?
                .unwrap_or(0);
            let done = match lake
                .read_state_file(&mirror, &lsn_app(&job.name), &snapshot_file(chunks))
                .await?
            {
                Some(b) => serde_json::from_slice::<SnapshotState>(&b)
                    .map(|s| s.done)
                    .unwrap_or(false),
                None => chunks == 0,
            };
            started |= lsn.is_some();
            let rows = lake.stats(&mirror).await.ok().map(|s| s.rows);
            let snapshot = match (chunks, done) {
                (0, _) => "none".to_string(),
                (_, true) => "done".to_string(),
                (n, false) => format!("in progress ({n} chunks)"),
            };
            let requested = lake
                .read_state_file(&mirror, &lsn_app(&job.name), RESNAPSHOT_FILE)
                .await?
                .is_some();
            (lsn.map(|l| format_lsn(l as u64)), rows, snapshot, requested)
        } else {
            (None, None, "not started".to_string(), false)
        };
        tables.push(MirrorStatus {
            source: format!("{schema}.{table}"),
            mirror,
            lsn,
            rows,
            snapshot,
            resnapshot_requested: requested,
        });
    }
    let lag_bytes = info
        .as_ref()
        .map(|s| server.saturating_sub(s.confirmed_lsn));
    // The oldest unapplied commit's time: peek one transaction, if the slot is free.
    let lag_seconds = match &info {
        Some(s) if !s.active && s.wal_status.as_deref() != Some("lost") => {
            match pg::peek(&client, &slot, &job.publication(), 1, true).await {
                Ok(msgs) => Some(
                    msgs.iter()
                        .find_map(|(_, m)| match m {
                            Message::Begin { commit_time_us, .. } => {
                                Some((now_us() - commit_time_us) as f64 / 1e6)
                            }
                            _ => None,
                        })
                        .unwrap_or(0.0),
                ),
                Err(_) => None,
            }
        }
        _ => None,
    };
    let limit = &job.config.lag_limit;
    let problem = match &info {
        None if started => Some(format!("replication slot `{slot}` is gone")),
        Some(s) if s.wal_status.as_deref() == Some("lost") => {
            Some(format!("replication slot `{slot}` was invalidated"))
        }
        _ => match (limit.bytes, lag_bytes, limit.time, lag_seconds) {
            (Some(max), Some(lag), _, _) if lag > max => Some(format!(
                "lagging: the slot holds {lag} bytes of WAL, over the {max} limit"
            )),
            (_, _, Some(max), Some(lag)) if lag > max.as_secs_f64() => Some(format!(
                "lagging: the oldest unapplied change is {lag:.1}s old, over the {}s limit",
                max.as_secs_f64()
            )),
            _ => None,
        },
    };
    Ok(CdcStatus {
        job: job.name.clone(),
        slot,
        slot_exists: info.is_some(),
        slot_active: info.as_ref().map(|s| s.active).unwrap_or(false),
        wal_status: info.as_ref().and_then(|s| s.wal_status.clone()),
        confirmed_lsn: info.as_ref().map(|s| format_lsn(s.confirmed_lsn)),
        server_lsn: format_lsn(server),
        lag_bytes,
        lag_seconds,
        problem,
        tables,
    })
}
