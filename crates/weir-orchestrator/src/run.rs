//! A run: the selected assets in graph order, in parallel where the graph allows, each
//! attempt recorded in the state store before it starts, failures skipping what depends
//! on them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use weir_common::{Error, RetryPolicy};
use weir_config::{Materialized, Project, RetryConfig, WriteMode};
use weir_core::Progress;
use weir_engine::session::{ensure_schema, lake_session};
use weir_engine::{render_model, AssetKind, Graph, RenderMode};
use weir_lake::{Lake, WriteOptions, WriteSpec};

use crate::pipeline::run_pipeline;
use crate::store::{now_ms, AssetRecord, RunRecord, Store};

/// Called with live counters while a pipeline reads.
pub type ProgressFn = Arc<dyn Fn(&str, &Progress) + Send + Sync>;

#[derive(Clone, Default)]
pub struct RunOptions {
    pub selector: Option<String>,
    /// Rebuild tables from scratch: reload all files, recompute incremental models.
    pub full_refresh: bool,
    pub progress: Option<ProgressFn>,
    /// Rerun what failed in this earlier run (and what it skipped because of that).
    pub retry_failed: Option<String>,
    /// The partition partitioned assets build (default: each one's last complete).
    pub partition: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AssetStatus {
    Succeeded,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssetResult {
    pub name: String,
    pub table: String,
    pub kind: String,
    pub status: AssetStatus,
    pub rows_read: u64,
    pub rows_written: u64,
    pub rows_quarantined: u64,
    pub rows_deleted: u64,
    pub bytes_read: u64,
    /// Files (or other units) loaded.
    pub units: usize,
    pub version: Option<u64>,
    pub attempts: u32,
    pub duration_ms: u64,
    pub error: Option<String>,
    pub error_domain: Option<String>,
    pub note: Option<String>,
    /// Checks run on the new data before it was published.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<weir_engine::checks::CheckResult>,
    /// The partition built, for partitioned models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// What the table's maintenance policy did after the write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<weir_lake::MaintenanceReport>,
}

impl AssetResult {
    /// Takes in what a write did.
    pub fn record(&mut self, m: &weir_lake::WriteMetrics) {
        self.rows_written = m.rows_inserted + m.rows_updated;
        self.rows_deleted = m.rows_deleted;
        self.version = Some(m.version);
        if m.skipped {
            self.note = Some("already committed by an earlier attempt".into());
        }
    }

    pub fn new(name: &str, table: &str) -> Self {
        Self {
            name: name.to_string(),
            table: table.to_string(),
            kind: String::new(),
            status: AssetStatus::Succeeded,
            rows_read: 0,
            rows_written: 0,
            rows_quarantined: 0,
            rows_deleted: 0,
            bytes_read: 0,
            units: 0,
            version: None,
            attempts: 1,
            duration_ms: 0,
            error: None,
            error_domain: None,
            note: None,
            checks: Vec::new(),
            partition: None,
            maintenance: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_id: String,
    pub project: String,
    /// `manual`, `schedule:NAME`, `retry:RUN` ...
    pub trigger: String,
    pub started_at: String,
    pub duration_ms: u64,
    pub ok: bool,
    pub assets: Vec<AssetResult>,
}

fn policy(c: &RetryConfig) -> RetryPolicy {
    RetryPolicy {
        max_attempts: c.max_attempts,
        initial_backoff: c.initial_backoff,
        max_backoff: c.max_backoff,
    }
}

/// Runs the selected assets now, in this process, recorded in the project's state store.
/// Returns `Err` only when nothing could start (bad selector, broken graph, unreachable
/// store); asset failures are in the summary.
pub async fn run(project: &Project, opts: RunOptions) -> Result<RunSummary, Error> {
    let store = Store::open(project).await?;
    let worker = worker_id();
    notify_recovered(&store.recover(project.config.state.lease, &worker).await?);
    let mut record = RunRecord::new(&project.config.name, "manual");
    record.selector = opts.selector.clone();
    record.full_refresh = opts.full_refresh;
    record.partition = opts.partition.clone();
    if let Some(old) = &opts.retry_failed {
        let old = store.find_run(old).await?;
        record.selector = Some(retry_selector(&store, &old).await?);
        record.trigger = format!("retry:{}", old.id);
        record.retry_of = Some(old.id.clone());
        record.full_refresh = old.full_refresh;
        record.partition = old.partition.clone();
    }
    // Fail on a bad selector before anything is recorded.
    let graph = Graph::build(project)?;
    let selected = graph.select(record.selector.as_deref())?;
    if let Some(key) = &record.partition {
        check_partition(project, &graph, &selected, key)?;
    }
    record.status = "running".into();
    record.worker = Some(worker.clone());
    record.started_at = Some(now_ms());
    record.heartbeat_at = record.started_at;
    store.insert_run(&record).await?;
    execute_planned(project, &store, &record, &worker, &opts, graph, selected).await
}

/// A partition named for a run must be one of at least one selected asset, and a valid key
/// for every selected partitioned asset.
pub fn check_partition(
    project: &Project,
    graph: &Graph,
    selected: &[usize],
    key: &str,
) -> Result<(), Error> {
    let mut any = false;
    for &i in selected {
        let name = &graph.assets[i].name;
        if let Some(parts) = project.partitions(name) {
            parts
                .window(key)
                .map_err(|e| e.context(format!("--partition for `{name}`")))?;
            any = true;
        }
    }
    if any {
        Ok(())
    } else {
        Err(Error::user(format!(
            "--partition {key}: none of the selected assets is partitioned"
        ))
        .with_hint("select a pipeline or model that declares `partitions:`"))
    }
}

/// Adds a run to the queue for a worker (`weir worker`, `weir serve`). Returns false when
/// a run with the same run key exists already.
pub async fn enqueue(store: &Store, record: &RunRecord) -> Result<bool, Error> {
    let mut r = record.clone();
    r.status = "queued".into();
    store.insert_run(&r).await
}

/// Names of the assets that failed in run `old` and of those it skipped because of them.
async fn retry_selector(store: &Store, old: &RunRecord) -> Result<String, Error> {
    let names: Vec<String> = store
        .assets(&old.id)
        .await?
        .into_iter()
        .filter(|a| a.status != "succeeded")
        .map(|a| a.asset)
        .collect();
    if names.is_empty() {
        return Err(Error::user(format!(
            "run {} has nothing to retry: every asset succeeded",
            old.id
        )));
    }
    Ok(names.join(" "))
}

/// Logs runs that recovery took back from a dead worker.
pub fn notify_recovered(recovered: &[crate::store::Recovered]) {
    for r in recovered {
        tracing::warn!(
            run = %r.run_id,
            failed = ?r.failed,
            retried = ?r.retried,
            "found an interrupted run (its worker stopped); queued it to resume"
        );
    }
}

/// `host:pid:random`: who holds a run.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &tag[..8])
}

fn asset_kind(kind: &AssetKind) -> &'static str {
    match kind {
        AssetKind::Pipeline(_) => "pipeline",
        AssetKind::Model(_) => "model",
    }
}

/// The retry policy and timeout of an asset.
fn asset_policy(project: &Project, kind: &AssetKind) -> (RetryPolicy, Option<Duration>) {
    match kind {
        AssetKind::Pipeline(p) => {
            let cfg = &project.pipelines[*p].config;
            (
                policy(cfg.retry.as_ref().unwrap_or(&project.config.retry)),
                cfg.timeout,
            )
        }
        AssetKind::Model(m) => {
            let props = project
                .models
                .iter()
                .find(|f| f.name == m.name)
                .and_then(|f| f.properties.as_ref());
            let retry = props.and_then(|p| p.retry.as_ref());
            (
                policy(retry.unwrap_or(&project.config.retry)),
                props.and_then(|p| p.timeout),
            )
        }
    }
}

/// Connections an asset holds while it runs (for `max_concurrency`).
fn asset_connections(project: &Project, kind: &AssetKind) -> Vec<String> {
    match kind {
        AssetKind::Pipeline(p) => {
            let cfg = &project.pipelines[*p].config;
            let mut v: Vec<String> = [&cfg.source.connection, &cfg.sink.connection]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            v.dedup();
            v
        }
        AssetKind::Model(_) => Vec::new(),
    }
}

fn result_from_record(a: &AssetRecord, table: &str) -> AssetResult {
    let mut r = AssetResult::new(&a.asset, table);
    r.kind = a.kind.clone();
    r.status = match a.status.as_str() {
        "succeeded" => AssetStatus::Succeeded,
        "skipped" => AssetStatus::Skipped,
        _ => AssetStatus::Failed,
    };
    r.rows_read = a.rows_read.unwrap_or(0) as u64;
    r.rows_written = a.rows_written.unwrap_or(0) as u64;
    r.rows_quarantined = a.rows_quarantined.unwrap_or(0) as u64;
    r.version = a.version.map(|v| v as u64);
    r.attempts = a.attempts as u32;
    r.duration_ms = match (a.started_at, a.ended_at) {
        (Some(s), Some(e)) => (e - s).max(0) as u64,
        _ => 0,
    };
    r.error = a.error.clone();
    r.error_domain = a.error_domain.clone();
    r.note = a.note.clone();
    r
}

fn settle(rec: &mut AssetRecord, r: &AssetResult) {
    rec.status = match r.status {
        AssetStatus::Succeeded => "succeeded",
        AssetStatus::Failed => "failed",
        AssetStatus::Skipped => "skipped",
    }
    .into();
    rec.ended_at = Some(now_ms());
    rec.rows_read = Some(r.rows_read as i64);
    rec.rows_written = Some(r.rows_written as i64);
    rec.rows_quarantined = Some(r.rows_quarantined as i64);
    rec.version = r.version.map(|v| v as i64);
    rec.error = r.error.clone();
    rec.error_domain = r.error_domain.clone();
    rec.note = r.note.clone();
}

/// Executes a run this worker holds (created by `run` or taken from the queue), resuming
/// it if an earlier worker finished some of its assets.
pub async fn execute(
    project: &Project,
    store: &Store,
    record: &RunRecord,
    worker: &str,
    opts: &RunOptions,
) -> Result<RunSummary, Error> {
    let planned =
        Graph::build(project).and_then(|g| g.select(record.selector.as_deref()).map(|s| (g, s)));
    match planned {
        Ok((graph, selected)) => {
            execute_planned(project, store, record, worker, opts, graph, selected).await
        }
        Err(e) => {
            store
                .finish_run(&record.id, "failed", Some(e.render()))
                .await?;
            Err(e)
        }
    }
}

/// [`execute`] with the graph built and the selection made.
async fn execute_planned(
    project: &Project,
    store: &Store,
    record: &RunRecord,
    worker: &str,
    opts: &RunOptions,
    graph: Graph,
    selected: Vec<usize>,
) -> Result<RunSummary, Error> {
    let started = Instant::now();
    let lake = Lake::for_project(project);
    let progress: ProgressFn = opts
        .progress
        .clone()
        .unwrap_or_else(|| Arc::new(|_: &str, _: &Progress| {}));
    let tables: BTreeMap<String, String> = graph
        .assets
        .iter()
        .filter(|a| matches!(a.kind, AssetKind::Model(_)))
        .map(|a| (a.name.clone(), a.table.clone()))
        .collect();

    // The run's asset rows: created on first execution, read back when resuming.
    let mut records: HashMap<usize, AssetRecord> = HashMap::new();
    let existing: HashMap<String, AssetRecord> = store
        .assets(&record.id)
        .await?
        .into_iter()
        .map(|a| (a.asset.clone(), a))
        .collect();
    let mut fresh = Vec::new();
    for (pos, &i) in selected.iter().enumerate() {
        let a = &graph.assets[i];
        let rec = match existing.get(&a.name) {
            Some(r) => r.clone(),
            None => {
                let r = AssetRecord::queued(
                    &record.id,
                    &a.name,
                    pos as i64,
                    asset_kind(&a.kind),
                    asset_policy(project, &a.kind).0.max_attempts.max(1) as i64,
                );
                fresh.push(r.clone());
                r
            }
        };
        records.insert(i, rec);
    }
    store.insert_assets(&fresh).await?;

    // The lease: a heartbeat while this worker holds the run.
    let lost = Arc::new(AtomicBool::new(false));
    let beat = {
        let (store, id, worker, lost) = (
            store.clone(),
            record.id.clone(),
            worker.to_string(),
            lost.clone(),
        );
        let every = (project.config.state.lease / 3).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match store.heartbeat(&id, &worker).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(run = %id, "lost the run's lease: another worker took it back; starting nothing more");
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => tracing::warn!(run = %id, error = %e, "heartbeat failed"),
                }
            }
        })
    };

    let limit = project
        .config
        .concurrency
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        })
        .max(1);
    let conn_limits: HashMap<String, usize> = project
        .config
        .connections
        .iter()
        .filter_map(|(n, c)| c.max_concurrency.map(|m| (n.clone(), m.max(1))))
        .collect();
    let mut conn_busy: HashMap<String, usize> = HashMap::new();
    let mut results: BTreeMap<usize, AssetResult> = BTreeMap::new();
    let mut pending: Vec<usize> = Vec::new();
    for &i in &selected {
        let rec = &records[&i];
        match rec.status.as_str() {
            "succeeded" | "failed" | "skipped" => {
                let mut r = result_from_record(rec, &graph.assets[i].table);
                if rec.status == "succeeded" && record.recoveries > 0 {
                    r.note = Some("done before the run was interrupted".into());
                }
                results.insert(i, r);
            }
            _ => pending.push(i),
        }
    }
    let mut running = FuturesUnordered::new();
    loop {
        // Start everything that is ready, in graph order, within the limits.
        let mut k = 0;
        while k < pending.len() {
            let i = pending[k];
            let asset = &graph.assets[i];
            let deps: Vec<usize> = asset
                .deps
                .iter()
                .copied()
                .filter(|d| records.contains_key(d))
                .collect();
            if let Some(&d) = deps.iter().find(|d| {
                results
                    .get(d)
                    .is_some_and(|r| r.status != AssetStatus::Succeeded)
            }) {
                let mut r = AssetResult::new(&asset.name, &asset.table);
                r.kind = asset_kind(&asset.kind).into();
                r.status = AssetStatus::Skipped;
                r.attempts = 0;
                r.error = Some(format!(
                    "upstream `{}` did not succeed",
                    graph.assets[d].name
                ));
                let rec = records.get_mut(&i).expect("record");
                settle(rec, &r);
                store.update_asset(rec).await?;
                results.insert(i, r);
                pending.remove(k);
                continue;
            }
            let ready = deps.iter().all(|d| results.contains_key(d));
            let conns = asset_connections(project, &asset.kind);
            let conn_ok = conns.iter().all(|c| {
                conn_limits
                    .get(c)
                    .is_none_or(|&m| conn_busy.get(c).copied().unwrap_or(0) < m)
            });
            if ready && conn_ok && running.len() < limit && !lost.load(Ordering::SeqCst) {
                for c in &conns {
                    *conn_busy.entry(c.clone()).or_default() += 1;
                }
                pending.remove(k);
                let rec = records[&i].clone();
                let ctx = AssetCtx {
                    project,
                    graph: &graph,
                    lake: &lake,
                    store,
                    tables: &tables,
                    progress: &progress,
                    run_id: &record.id,
                    full_refresh: record.full_refresh,
                    partition: record.partition.as_deref(),
                };
                running.push(async move { (i, conns, ctx.execute(i, rec).await) });
                continue;
            }
            k += 1;
        }
        let Some((i, conns, (rec, result))) = running.next().await else {
            break;
        };
        for c in conns {
            if let Some(n) = conn_busy.get_mut(&c) {
                *n = n.saturating_sub(1);
            }
        }
        records.insert(i, rec);
        results.insert(i, result);
    }
    beat.abort();
    // Partition state of partitioned assets (a failed one built no result naming it).
    for (i, r) in &results {
        let key = r.partition.clone().or_else(|| {
            project.partitions(&graph.assets[*i].name)?;
            record.partition.clone()
        });
        if let Some(key) = key {
            let status = match r.status {
                AssetStatus::Succeeded => "succeeded",
                AssetStatus::Failed => "failed",
                AssetStatus::Skipped => "skipped",
            };
            store
                .set_partition(&r.name, &key, status, Some(&record.id))
                .await?;
        }
    }
    // Assets never started because the lease was lost stay queued for whoever holds it.
    let finished = pending.is_empty();
    let assets: Vec<AssetResult> = selected.iter().filter_map(|i| results.remove(i)).collect();
    let ok = finished && assets.iter().all(|a| a.status == AssetStatus::Succeeded);
    if finished {
        let error = assets
            .iter()
            .find(|a| a.status == AssetStatus::Failed)
            .map(|a| format!("asset `{}` failed", a.name));
        store
            .finish_run(&record.id, if ok { "succeeded" } else { "failed" }, error)
            .await?;
    }
    let summary = RunSummary {
        run_id: record.id.clone(),
        project: project.config.name.clone(),
        trigger: record.trigger.clone(),
        started_at: chrono::DateTime::from_timestamp_millis(
            record.started_at.unwrap_or(record.created_at),
        )
        .unwrap_or_default()
        .to_rfc3339(),
        duration_ms: started.elapsed().as_millis() as u64,
        ok,
        assets,
    };
    if finished {
        crate::alert::run_failed(project, &summary).await;
    }
    Ok(summary)
}

/// What one asset's execution needs.
#[derive(Clone, Copy)]
struct AssetCtx<'a> {
    project: &'a Project,
    graph: &'a Graph,
    lake: &'a Lake,
    store: &'a Store,
    tables: &'a BTreeMap<String, String>,
    progress: &'a ProgressFn,
    run_id: &'a str,
    full_refresh: bool,
    partition: Option<&'a str>,
}

/// Lost commit races an asset attempt may retry before they count as failed attempts.
const MAX_CONFLICT_RETRIES: i64 = 20;

impl AssetCtx<'_> {
    /// Attempts an asset until it succeeds, fails for good or runs out of attempts. Each
    /// attempt is written to the store before it starts, so a worker that dies mid-attempt
    /// leaves a record saying so.
    async fn execute(self, i: usize, mut rec: AssetRecord) -> (AssetRecord, AssetResult) {
        let asset = &self.graph.assets[i];
        let (policy, timeout) = asset_policy(self.project, &asset.kind);
        let t0 = Instant::now();
        // Write conflicts (another worker committed to the table first) are retried apart
        // from the asset's attempts: each is a lost race, not a failure.
        let mut conflicts = 0i64;
        let outcome = loop {
            rec.attempts += 1;
            rec.status = "running".into();
            rec.started_at.get_or_insert_with(now_ms);
            if let Err(e) = self.store.update_asset(&rec).await {
                // Without the record the attempt must not start.
                rec.attempts -= 1;
                break Err(e.context("recording the attempt in the state store"));
            }
            tracing::info!(run = %self.run_id, asset = %asset.name, attempt = rec.attempts, "asset attempt started");
            let work = self.attempt(i);
            let out = match timeout {
                Some(t) => match tokio::time::timeout(t, work).await {
                    Ok(out) => out,
                    Err(_) => Err(Error::external(format!("timed out after {}", humanize(t)))),
                },
                None => work.await,
            };
            match out {
                Err(e) if e.conflict && conflicts < MAX_CONFLICT_RETRIES => {
                    // Another attempt, not counted against `max_attempts`; 50-550 ms later,
                    // at random, so two workers that collided do not collide again in step.
                    conflicts += 1;
                    let delay = Duration::from_millis(50 + rand::random::<u64>() % 500);
                    tracing::warn!(asset = %asset.name, attempt = rec.attempts, conflicts, delay_ms = delay.as_millis() as u64, error = %e, "a concurrent commit won; trying again");
                    rec.status = "retrying".into();
                    rec.error = Some(e.render());
                    rec.error_domain = Some(e.domain.to_string());
                    let _ = self.store.update_asset(&rec).await;
                    tokio::time::sleep(delay).await;
                }
                Err(e) if e.retryable && rec.attempts - conflicts < rec.max_attempts => {
                    let delay = policy.backoff(rec.attempts as u32);
                    tracing::warn!(asset = %asset.name, attempt = rec.attempts, delay_ms = delay.as_millis() as u64, error = %e, "retrying after an external failure");
                    rec.status = "retrying".into();
                    rec.error = Some(e.render());
                    rec.error_domain = Some(e.domain.to_string());
                    let _ = self.store.update_asset(&rec).await;
                    tokio::time::sleep(delay).await;
                }
                other => break other,
            }
        };
        let mut r = match outcome {
            Ok(mut r) => {
                self.after_success(i, &mut r).await;
                r
            }
            Err(e) => {
                let mut r = AssetResult::new(&asset.name, &asset.table);
                r.status = AssetStatus::Failed;
                r.error = Some(e.render());
                r.error_domain = Some(e.domain.to_string());
                r
            }
        };
        r.kind = asset_kind(&asset.kind).into();
        r.attempts = rec.attempts as u32;
        r.duration_ms = t0.elapsed().as_millis() as u64;
        settle(&mut rec, &r);
        if let Err(e) = self.store.update_asset(&rec).await {
            tracing::error!(asset = %asset.name, error = %e, "recording the asset's result failed");
        }
        (rec, r)
    }

    async fn attempt(&self, i: usize) -> Result<AssetResult, Error> {
        let asset = &self.graph.assets[i];
        match &asset.kind {
            AssetKind::Pipeline(p) => {
                run_pipeline(
                    self.project,
                    self.lake,
                    &self.project.pipelines[*p],
                    self.run_id,
                    self.full_refresh,
                    self.partition,
                    self.progress,
                )
                .await
            }
            AssetKind::Model(_) => run_model(self, i).await,
        }
    }

    /// Assets without checks: metrics of what this run committed; then the table's
    /// maintenance policy, if it has one.
    async fn after_success(&self, i: usize, r: &mut AssetResult) {
        let asset = &self.graph.assets[i];
        let delta = match &asset.kind {
            AssetKind::Pipeline(p) => {
                self.project.pipelines[*p].config.sink.kind == weir_config::SinkKind::Delta
            }
            AssetKind::Model(_) => true,
        };
        if let (true, true, Some(v), None) = (
            delta,
            r.checks.is_empty(),
            r.version,
            r.note
                .as_deref()
                .filter(|n| n.starts_with("up to date") || n.starts_with("already")),
        ) {
            if let Err(e) = crate::gate::record_version_metrics(
                self.lake,
                self.run_id,
                &asset.name,
                &asset.table,
                v,
                r.rows_written,
            )
            .await
            {
                tracing::warn!(asset = %asset.name, error = %e, "recording metrics failed");
            }
        }
        let wrote = r.rows_written > 0 || r.rows_deleted > 0;
        if !(delta && wrote) {
            return;
        }
        // The data is committed: a maintenance failure is reported, not the asset's.
        match maintain_table(self.project, self.lake, &asset.table).await {
            Some(Ok(report)) => r.maintenance = Some(report),
            Some(Err(e)) => {
                let note = format!("maintenance failed: {}", e.message);
                r.note = Some(match r.note.take() {
                    Some(n) => format!("{n}; {note}"),
                    None => note,
                });
            }
            None => {}
        }
    }
}

/// Runs table `table`'s maintenance policy, if weir.yaml gives it one, retrying steps that
/// conflict with a concurrent commit; a failure is logged and returned.
pub(crate) async fn maintain_table(
    project: &Project,
    lake: &Lake,
    table: &str,
) -> Option<Result<weir_lake::MaintenanceReport, Error>> {
    let policy = project.maintenance_for(table)?;
    let result = weir_common::retry::retry(
        &policy_retry(project),
        |_, e, _| tracing::warn!(table, error = %e, "maintenance conflicted; retrying"),
        |_| lake.maintain(table, policy, false),
    )
    .await;
    if let Err(e) = &result {
        tracing::warn!(table, error = %e, "maintenance failed");
    }
    Some(result)
}

/// Retries of a maintenance step that conflicted with a concurrent commit.
fn policy_retry(project: &Project) -> RetryPolicy {
    let mut p = policy(&project.config.retry);
    p.max_attempts = p.max_attempts.max(5);
    p
}

fn humanize(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
}

/// A session with the lake's tables and every view model registered.
pub async fn project_session(
    project: &Project,
    lake: &Lake,
    graph: &Graph,
) -> Result<datafusion::prelude::SessionContext, Error> {
    let ctx = lake_session(lake).await?;
    for a in &graph.assets {
        if let AssetKind::Model(m) = &a.kind {
            let mat = m
                .config
                .materialized
                .unwrap_or(project.config.models.materialized);
            if mat == Materialized::View {
                let (schema, _) = m.table.split_once('.').unwrap_or(("analytics", &m.table));
                ensure_schema(&ctx, schema)?;
                let _ = ctx.deregister_table(m.table.as_str());
                ctx.sql(&format!("CREATE VIEW {} AS {}", m.table, m.sql))
                    .await
                    .map_err(|e| Error::user(format!("view model `{}`: {e}", m.name)))?;
            }
        }
    }
    Ok(ctx)
}

async fn run_model(c: &AssetCtx<'_>, i: usize) -> Result<AssetResult, Error> {
    let (project, lake, graph, tables, run_id) = (c.project, c.lake, c.graph, c.tables, c.run_id);
    let (full_refresh, partition) = (c.full_refresh, c.partition);
    let asset = &graph.assets[i];
    let AssetKind::Model(compiled) = &asset.kind else {
        return Err(Error::internal("not a model"));
    };
    let mut result = AssetResult::new(&asset.name, &asset.table);
    let file = project
        .models
        .iter()
        .find(|m| m.name == compiled.name)
        .ok_or_else(|| Error::internal("model file missing"))?;
    let parts = file.properties.as_ref().and_then(|p| p.partitions.as_ref());
    // A partitioned model builds one partition: `partition`, or the last complete one.
    let window = weir_engine::model::partition_window(file, partition)?;
    let mat = compiled
        .config
        .materialized
        .unwrap_or(project.config.models.materialized);
    if let (Some(scd), Some(_)) = (mat.scd(), parts) {
        return Err(Error::user(format!(
            "model `{}` is `{scd}` and partitioned: a dimension's keys span all partitions",
            compiled.name
        ))
        .with_hint("remove `partitions:` from the model"));
    }
    // A view is defined when a session is built (its SQL was checked with the graph).
    if mat == Materialized::View {
        result.note = Some("view (computed at query time)".into());
        return Ok(result);
    }
    let ctx = project_session(project, lake, graph).await?;
    let exists = lake.exists(&asset.table).await;
    let incremental = (mat == Materialized::Incremental || mat.scd().is_some())
        && exists
        && !full_refresh
        && window.is_none();
    let sql = if incremental || window.is_some() {
        render_model(
            project,
            file,
            tables,
            RenderMode {
                is_incremental: incremental,
                partition: window.clone(),
            },
        )?
        .sql
    } else {
        compiled.sql.clone()
    };
    // The session is this model's own: CTEs held in it go with it.
    let sql = weir_engine::cte::materialize(&ctx, &sql).await.sql;
    let df = ctx.sql(&sql).await.map_err(|e| {
        let file = project
            .models
            .iter()
            .find(|m| m.name == compiled.name)
            .map(|m| m.file.display().to_string())
            .unwrap_or_default();
        Error::user(format!("model `{}` ({file}): {e}", compiled.name))
    })?;
    let cfg = &compiled.config;
    let mode = if !incremental {
        WriteMode::Overwrite
    } else {
        cfg.incremental_strategy
            .unwrap_or(if cfg.unique_key.is_empty() {
                WriteMode::Append
            } else {
                WriteMode::Merge
            })
    };
    let replace_where = match (parts, &window) {
        (Some(p), Some(w)) => Some(p.predicate(&w.key)?),
        _ => None,
    };
    let spec = WriteSpec {
        mode,
        key: cfg.unique_key.clone(),
        partition_by: cfg.partition_by.clone(),
        replace_where,
        ..Default::default()
    };
    let checks = project
        .models
        .iter()
        .find(|m| m.name == compiled.name)
        .and_then(|m| m.properties.as_ref())
        .map(|p| p.checks.clone())
        .unwrap_or_default();
    let load = if exists {
        lake.open(&asset.table).await?.version().unwrap_or(0) as i64 + 1
    } else {
        0
    };
    let qtable = format!("{}__quarantine", asset.table);
    let qmeta = std::collections::HashMap::from([(
        "weir.model".to_string(),
        serde_json::json!(compiled.name),
    )]);
    let target = crate::quarantine::Target {
        lake,
        table: &qtable,
        pipeline: &asset.name,
        run_id,
        load,
        partition: window.as_ref().map(|w| w.key.as_str()),
        metadata: &qmeta,
    };
    let audited =
        crate::gate::audit(&ctx, &asset.name, &asset.table, &checks, df, Some(&target)).await?;
    result.rows_quarantined = audited.quarantined;
    let df = audited.df.clone();
    result.checks = audited.results.clone();
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("weir.model".to_string(), serde_json::json!(compiled.name));
    metadata.insert("weir.run_id".to_string(), serde_json::json!(run_id));
    if let Some(mut dim) = cfg.dimension(mat) {
        // `inferred_members` may name a model: read its table.
        dim.inferred_members = dim
            .inferred_members
            .map(|x| tables.get(&x).cloned().unwrap_or(x));
        let applied = weir_engine::scd::apply::apply(
            lake,
            &ctx,
            &asset.table,
            &dim,
            df,
            &weir_engine::scd::apply::Load {
                txn: (format!("weir:model:{}", compiled.name), load),
                time: chrono::Utc::now(),
                rebuild: full_refresh,
                metadata,
            },
        )
        .await
        .map_err(|e| e.context(format!("model `{}`", compiled.name)))?;
        result.rows_written = applied.changes;
        result.version = Some(applied.write.version);
        result.note = Some(format!(
            "{mat}: {} change(s), {} key(s) recomputed",
            applied.changes, applied.keys
        ));
        return Ok(result);
    }
    let m = lake
        .write(
            &asset.table,
            &ctx,
            df,
            &spec,
            &WriteOptions {
                txn: None,
                positions: Vec::new(),
                metadata,
            },
        )
        .await?;
    result.rows_written = m.rows_inserted + m.rows_updated;
    result.rows_deleted = m.rows_deleted;
    result.version = Some(m.version);
    result.note = Some(match &window {
        Some(w) => format!("partition {} (replaced)", w.key),
        None => format!("{mat} ({mode})"),
    });
    result.partition = window.map(|w| w.key);
    Ok(result)
}
