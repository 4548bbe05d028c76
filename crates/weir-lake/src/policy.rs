//! Applying a table's maintenance policy (`maintenance:` in weir.yaml): retention first
//! (old rows go), then compaction when enough files are small, then vacuum when it is due.
//! Each step is an ordinary Delta commit, so a concurrent writer's commit is never lost:
//! a conflicting step fails with a retryable error and the caller retries it.
//!
//! A dry run computes what each step would do and changes nothing.

use std::sync::Arc;
use std::time::Duration;

use datafusion::physical_plan::ExecutionPlan;
use object_store::ObjectStoreExt;
use serde::Serialize;
use weir_common::Error;
use weir_config::{MaintenancePolicy, RetentionPolicy};

use crate::{delta_error, Lake, OptimizeMetrics, OptimizeSpec, VacuumMetrics, MIN_RETENTION};

/// What the retention rule deleted (or would delete).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RetentionMetrics {
    /// Rows older than this were deleted: `column < cutoff`.
    pub cutoff: String,
    pub rows: u64,
    /// Data files the delete removes (whole files when the column partitions the table).
    pub files: u64,
}

/// What one application of a policy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MaintenanceReport {
    pub table: String,
    pub dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiering: Option<crate::tier::TieringMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimize: Option<OptimizeMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vacuum: Option<VacuumMetrics>,
    /// Steps not taken, and why (`optimize: 3 small files, fewer than 10`).
    pub skipped: Vec<String>,
}

/// Where the time of the last policy vacuum is kept, under the table.
const LAST_VACUUM: &str = "_weir/maintenance/last_vacuum.json";

impl Lake {
    /// Applies `policy` to table `name` (or, with `dry_run`, reports what it would do).
    pub async fn maintain(
        &self,
        name: &str,
        policy: &MaintenancePolicy,
        dry_run: bool,
    ) -> Result<MaintenanceReport, Error> {
        let mut report = MaintenanceReport {
            table: name.to_string(),
            dry_run,
            ..Default::default()
        };
        // In a dry run the files retention would remove are left out of compaction.
        let mut gone = std::collections::BTreeSet::new();
        if let Some(rule) = &policy.retention {
            let (m, files) = self.retention(name, rule, dry_run).await?;
            report.retention = Some(m);
            gone = files;
        }
        // Files tiering moves (in a dry run) are left out of compaction too.
        let mut moving: Vec<String> = Vec::new();
        if let Some(rule) = &policy.tiering {
            let m = self.tier(name, rule, dry_run).await?;
            if dry_run {
                moving = m.files.clone();
            }
            report.tiering = Some(m);
        }
        if let Some(o) = &policy.optimize {
            let table = self.open_existing(name).await?;
            let snap = table.snapshot().map_err(|e| delta_error(name, e))?;
            // Partitions with cold files are never compacted (that would bring them back);
            // in a dry run, those tiering would move count as cold.
            let cold = crate::maintenance::cold_partitions(&table, &moving);
            // Small files by partition: a partition's lone small file stays as it is.
            let mut by_partition: std::collections::BTreeMap<Vec<(String, Option<String>)>, u64> =
                Default::default();
            for f in snap.log_data().iter() {
                let path = f.path().to_string();
                let values = f.partition_values_map();
                // As optimize filters: a partition value that a cold file has.
                let in_cold = values.iter().any(|(c, v)| {
                    v.as_ref()
                        .is_some_and(|v| cold.get(c).is_some_and(|vs| vs.contains(v)))
                });
                if (f.size().max(0) as u64) >= o.small_file_size
                    || in_cold
                    || gone.iter().any(|g| g.ends_with(&path))
                {
                    continue;
                }
                let mut key: Vec<_> = values.into_iter().collect();
                key.sort();
                *by_partition.entry(key).or_default() += 1;
            }
            let small: u64 = by_partition.values().sum();
            let packable: u64 = by_partition.values().filter(|n| **n > 1).sum();
            if small < o.min_small_files.max(2) {
                report.skipped.push(format!(
                    "optimize: {small} small files, fewer than {}",
                    o.min_small_files.max(2)
                ));
            } else if dry_run {
                report.optimize = Some(OptimizeMetrics {
                    files_before: snap.log_data().iter().count() as u64,
                    files_removed: packable,
                    version: table.version().unwrap_or(0),
                    ..Default::default()
                });
            } else {
                let spec = OptimizeSpec {
                    zorder: o.zorder.clone(),
                    target_size: o.target_size,
                    partitions: vec![],
                };
                report.optimize = Some(self.optimize(name, &spec).await?);
            }
        }
        if let Some(v) = &policy.vacuum {
            let now = chrono::Utc::now().timestamp_millis();
            let last = self.last_vacuum(name).await?;
            match last {
                Some(at) if now - at < v.every.as_millis() as i64 => {
                    report.skipped.push(format!(
                        "vacuum: last one {} ago, due every {}",
                        crate::maintenance::duration_text(Duration::from_millis(
                            (now - at).max(0) as u64
                        )),
                        crate::maintenance::duration_text(v.every)
                    ));
                }
                _ => {
                    let retain = v.retain.max(MIN_RETENTION);
                    report.vacuum = Some(self.vacuum(name, retain, dry_run, false).await?);
                    if !dry_run {
                        self.record_vacuum(name, now).await?;
                    }
                }
            }
        }
        Ok(report)
    }

    /// Deletes (or counts) the rows of `name` older than the rule's duration; in a dry run
    /// also the store paths of the files holding them.
    async fn retention(
        &self,
        name: &str,
        rule: &RetentionPolicy,
        dry_run: bool,
    ) -> Result<(RetentionMetrics, std::collections::BTreeSet<String>), Error> {
        let table = self.open_existing(name).await?;
        let schema = table
            .snapshot()
            .map_err(|e| delta_error(name, e))?
            .snapshot()
            .arrow_schema();
        let field = schema.field_with_name(&rule.column).map_err(|_| {
            Error::user(format!(
                "retention of `{name}`: the table has no column `{}`",
                rule.column
            ))
            .with_hint("`retention.column` names a date or timestamp column of the table")
        })?;
        let keep = chrono::Duration::from_std(rule.keep)
            .map_err(|e| Error::user(format!("retention `keep`: {e}")))?;
        let cutoff = chrono::Utc::now() - keep;
        use arrow::datatypes::DataType;
        let (cutoff_text, literal) = match field.data_type() {
            DataType::Date32 | DataType::Date64 => {
                let d = cutoff.date_naive().to_string();
                (d.clone(), format!("DATE '{d}'"))
            }
            DataType::Timestamp(_, _) => {
                let t = cutoff.format("%Y-%m-%dT%H:%M:%S").to_string();
                (t.clone(), format!("CAST('{t}' AS TIMESTAMP)"))
            }
            other => {
                return Err(Error::user(format!(
                    "retention of `{name}`: column `{}` is {other}, not a date or timestamp",
                    rule.column
                )))
            }
        };
        let predicate = format!("\"{}\" < {literal}", rule.column.replace('"', "\"\""));
        if dry_run {
            let (rows, files) = self.matching(&table, name, &predicate).await?;
            let metrics = RetentionMetrics {
                cutoff: cutoff_text,
                rows,
                files: files.len() as u64,
            };
            return Ok((metrics, files));
        }
        let (_, m) = table
            .delete()
            .with_predicate(predicate)
            .await
            .map_err(|e| delta_error(format!("deleting old rows of `{name}`"), e))?;
        let metrics = RetentionMetrics {
            cutoff: cutoff_text,
            rows: m.num_deleted_rows.unwrap_or(0) as u64,
            files: m.num_removed_files as u64,
        };
        Ok((metrics, Default::default()))
    }

    /// Rows matching `predicate`, and the files that may hold them (all of them when the
    /// predicate is on a partition column).
    async fn matching(
        &self,
        table: &deltalake::DeltaTable,
        name: &str,
        predicate: &str,
    ) -> Result<(u64, std::collections::BTreeSet<String>), Error> {
        let ctx = crate::new_session();
        table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| delta_error(name, e))?;
        let provider = table
            .table_provider()
            .await
            .map_err(|e| Error::internal(format!("table provider for `{name}`: {e}")))?;
        ctx.register_table("t", provider)
            .map_err(|e| Error::internal(e.to_string()))?;
        let failed = |e: datafusion::error::DataFusionError| {
            Error::user(format!("retention of `{name}`: {e}"))
        };
        let batches = ctx
            .sql(&format!("select count(*) as n from t where {predicate}"))
            .await
            .map_err(failed)?
            .collect()
            .await
            .map_err(failed)?;
        let rows = batches
            .first()
            .and_then(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .map(|a| a.value(0))
            })
            .unwrap_or(0) as u64;
        let plan = ctx
            .sql(&format!("select * from t where {predicate}"))
            .await
            .map_err(failed)?
            .create_physical_plan()
            .await
            .map_err(failed)?;
        let mut files = std::collections::BTreeSet::new();
        crate::plan_files(&plan, &mut files);
        if rows == 0 {
            files.clear();
        }
        Ok((rows, files))
    }

    async fn last_vacuum(&self, name: &str) -> Result<Option<i64>, Error> {
        let store = self.store_at(self.table_url(name)?)?;
        match store.get(&LAST_VACUUM.into()).await {
            Ok(r) => {
                let bytes = r
                    .bytes()
                    .await
                    .map_err(|e| Error::external(format!("reading {LAST_VACUUM}: {e}")))?;
                Ok(serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["at"].as_i64()))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::external(format!("reading {LAST_VACUUM}: {e}"))),
        }
    }

    async fn record_vacuum(&self, name: &str, at: i64) -> Result<(), Error> {
        let store = self.store_at(self.table_url(name)?)?;
        store
            .put(
                &LAST_VACUUM.into(),
                serde_json::json!({ "at": at })
                    .to_string()
                    .into_bytes()
                    .into(),
            )
            .await
            .map_err(|e| Error::external(format!("writing {LAST_VACUUM}: {e}")))?;
        Ok(())
    }
}

/// The object-store paths of every file the plan's file scans read.
pub fn plan_files(plan: &Arc<dyn ExecutionPlan>, out: &mut std::collections::BTreeSet<String>) {
    use datafusion::datasource::physical_plan::FileScanConfig;
    use datafusion::datasource::source::DataSourceExec;
    if let Some(source) = plan.downcast_ref::<DataSourceExec>() {
        if let Some(config) = source.data_source().downcast_ref::<FileScanConfig>() {
            for group in &config.file_groups {
                for f in group.iter() {
                    out.insert(f.object_meta.location.to_string());
                }
            }
        }
    }
    for child in plan.children() {
        plan_files(child, out);
    }
}
