//! A run: the selected assets in graph order, failures skipping what depends on them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use weir_common::{Error, RetryPolicy};
use weir_config::{Materialized, Project, RetryConfig, WriteMode};
use weir_core::Progress;
use weir_engine::session::{ensure_schema, lake_session};
use weir_engine::{render_model, AssetKind, Graph, RenderMode};
use weir_lake::{Lake, WriteOptions, WriteSpec};

use crate::pipeline::run_pipeline;

/// Called with live counters while a pipeline reads.
pub type ProgressFn = Arc<dyn Fn(&str, &Progress) + Send + Sync>;

#[derive(Clone, Default)]
pub struct RunOptions {
    pub selector: Option<String>,
    /// Rebuild tables from scratch: reload all files, recompute incremental models.
    pub full_refresh: bool,
    pub progress: Option<ProgressFn>,
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
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_id: String,
    pub project: String,
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

/// Runs the selected assets. Returns `Err` only when nothing could start (bad selector,
/// broken graph); asset failures are in the summary.
pub async fn run(project: &Project, opts: RunOptions) -> Result<RunSummary, Error> {
    let graph = Graph::build(project)?;
    let selected = graph.select(opts.selector.as_deref())?;
    let lake = Lake::new(project.lake_root());
    let run_id = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339();
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

    let mut results: BTreeMap<usize, AssetResult> = BTreeMap::new();
    for &i in &selected {
        let asset = &graph.assets[i];
        let t0 = Instant::now();
        let kind = match asset.kind {
            AssetKind::Pipeline(_) => "pipeline",
            AssetKind::Model(_) => "model",
        };
        if let Some(&d) = asset.deps.iter().find(|d| {
            results
                .get(d)
                .is_some_and(|r| r.status != AssetStatus::Succeeded)
        }) {
            let mut r = AssetResult::new(&asset.name, &asset.table);
            r.kind = kind.into();
            r.status = AssetStatus::Skipped;
            r.attempts = 0;
            r.error = Some(format!(
                "upstream `{}` did not succeed",
                graph.assets[d].name
            ));
            results.insert(i, r);
            continue;
        }
        let retry_cfg = match &asset.kind {
            AssetKind::Pipeline(p) => project.pipelines[*p].config.retry.clone(),
            AssetKind::Model(_) => None,
        }
        .unwrap_or_else(|| project.config.retry.clone());
        let mut attempts = 0;
        let outcome = weir_common::retry(
            &policy(&retry_cfg),
            |attempt, err, delay| {
                tracing::warn!(asset = %asset.name, attempt, delay_ms = delay.as_millis() as u64, error = %err, "retrying after an external failure");
            },
            |attempt| {
                attempts = attempt;
                let lake = &lake;
                let run_id = &run_id;
                let progress = &progress;
                let tables = &tables;
                let graph = &graph;
                async move {
                    match &asset.kind {
                        AssetKind::Pipeline(p) => {
                            run_pipeline(project, lake, &project.pipelines[*p], run_id, opts.full_refresh, progress).await
                        }
                        AssetKind::Model(_) => run_model(project, lake, graph, i, tables, run_id, opts.full_refresh).await,
                    }
                }
            },
        )
        .await;
        let mut r = match outcome {
            Ok(r) => {
                // Assets without checks: metrics of what this run committed.
                let delta = match &asset.kind {
                    AssetKind::Pipeline(p) => {
                        project.pipelines[*p].config.sink.kind == weir_config::SinkKind::Delta
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
                        &lake,
                        &run_id,
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
        r.kind = kind.into();
        r.attempts = attempts;
        r.duration_ms = t0.elapsed().as_millis() as u64;
        results.insert(i, r);
    }
    let assets: Vec<AssetResult> = results.into_values().collect();
    Ok(RunSummary {
        run_id,
        project: project.config.name.clone(),
        started_at,
        duration_ms: started.elapsed().as_millis() as u64,
        ok: assets.iter().all(|a| a.status == AssetStatus::Succeeded),
        assets,
    })
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

async fn run_model(
    project: &Project,
    lake: &Lake,
    graph: &Graph,
    i: usize,
    tables: &BTreeMap<String, String>,
    run_id: &str,
    full_refresh: bool,
) -> Result<AssetResult, Error> {
    let asset = &graph.assets[i];
    let AssetKind::Model(compiled) = &asset.kind else {
        return Err(Error::internal("not a model"));
    };
    let mut result = AssetResult::new(&asset.name, &asset.table);
    let mat = compiled
        .config
        .materialized
        .unwrap_or(project.config.models.materialized);
    let ctx = project_session(project, lake, graph).await?;
    if mat == Materialized::View {
        result.note = Some("view (computed at query time)".into());
        return Ok(result);
    }
    let exists = lake.exists(&asset.table);
    let incremental = mat == Materialized::Incremental && exists && !full_refresh;
    let sql = if incremental {
        let file = project
            .models
            .iter()
            .find(|m| m.name == compiled.name)
            .ok_or_else(|| Error::internal("model file missing"))?;
        render_model(
            project,
            file,
            tables,
            RenderMode {
                is_incremental: true,
            },
        )?
        .sql
    } else {
        compiled.sql.clone()
    };
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
    let spec = WriteSpec {
        mode,
        key: cfg.unique_key.clone(),
        partition_by: cfg.partition_by.clone(),
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
    let m = lake
        .write(
            &asset.table,
            &ctx,
            df,
            &spec,
            &WriteOptions {
                txn: None,
                metadata,
            },
        )
        .await?;
    result.rows_written = m.rows_inserted + m.rows_updated;
    result.rows_deleted = m.rows_deleted;
    result.version = Some(m.version);
    result.note = Some(format!("{mat} ({mode})"));
    Ok(result)
}
