//! Write-audit-publish: an asset's checks run over its new data, staged as local Parquet,
//! before anything is committed. Rows failing an `on_fail: quarantine` check go to the
//! quarantine table and the rest goes on; then a failing error check fails the asset with
//! a report, the table stays at its previous version and downstream assets are skipped.

use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::{DataFrame, ParquetReadOptions, SessionContext};
use weir_common::Error;
use weir_config::{CheckKind, CheckSpec, OnFail};
use weir_core::BadRow;
use weir_engine::checks::{
    anomaly, describe, failing_predicate, measure, run_checks, CheckResult, CheckStatus, Metric,
};
use weir_engine::session::ensure_schema;

use crate::quarantine::{self, Scope, Target, CHECKS_SOURCE};

/// Staged rows that passed the checks; the staging directory lives as long as this.
pub struct Audited {
    pub df: DataFrame,
    pub results: Vec<CheckResult>,
    /// Rows moved to quarantine by checks.
    pub quarantined: u64,
    _dir: Option<tempfile::TempDir>,
}

impl Audited {
    /// Whether the rows were staged (and so can be read more than once).
    pub fn is_staged(&self) -> bool {
        self._dir.is_some()
    }
}

fn df_err(asset: &str) -> impl Fn(datafusion::error::DataFusionError) -> Error + '_ {
    move |e| Error::user(format!("checks of `{asset}`: {e}"))
}

/// Checks `df` (what `asset` is about to write into `table`) with `checks`; returns the
/// rows to write, or an error naming the failed checks with failing rows. `target` is
/// where quarantining checks put their rows.
pub async fn audit(
    ctx: &SessionContext,
    asset: &str,
    table: &str,
    checks: &[CheckSpec],
    df: DataFrame,
    target: Option<&Target<'_>>,
) -> Result<Audited, Error> {
    if checks.is_empty() {
        return Ok(Audited {
            df,
            results: vec![],
            quarantined: 0,
            _dir: None,
        });
    }
    let dir = tempfile::Builder::new()
        .prefix("weir-audit-")
        .tempdir()
        .map_err(|e| Error::io("creating a staging directory", e))?;
    let path = dir.path().to_string_lossy().to_string();
    df.write_parquet(&path, DataFrameWriteOptions::new(), None)
        .await
        .map_err(df_err(asset))?;
    ensure_schema(ctx, "weir_staged")?;
    let base = table.replace('.', "__");
    let staged = format!("weir_staged.{base}");
    let _ = ctx.deregister_table(staged.as_str());
    ctx.register_parquet(staged.as_str(), &path, ParquetReadOptions::default())
        .await
        .map_err(|e| Error::internal(format!("reading staged rows: {e}")))?;

    // Quarantining checks first: their failing rows leave, the rest is checked further.
    let (moving, gating): (Vec<&CheckSpec>, Vec<&CheckSpec>) =
        checks.iter().partition(|c| c.on_fail == OnFail::Quarantine);
    let mut checked = staged.clone();
    let mut quarantined = 0;
    if !moving.is_empty() {
        let preds: Vec<(String, String)> = moving
            .iter()
            .map(|c| {
                (
                    failing_predicate(c).unwrap_or_else(|| "false".into()),
                    format!("check `{}`: {}", c.display_name(), describe(c)),
                )
            })
            .collect();
        let any = preds
            .iter()
            .map(|(p, _)| format!("({p})"))
            .collect::<Vec<_>>()
            .join(" OR ");
        let reason = format!(
            "CASE {} END",
            preds
                .iter()
                .map(|(p, r)| format!("WHEN {p} THEN '{}'", r.replace('\'', "''")))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let bad = ctx
            .sql(&format!(
                "SELECT {reason} AS weir_reason, * FROM {staged} weir_checked WHERE {any}"
            ))
            .await
            .map_err(df_err(asset))?
            .collect()
            .await
            .map_err(df_err(asset))?;
        let rows = bad_rows(&bad)?;
        quarantined = rows.len() as u64;
        if let Some(t) = target {
            quarantine::write(t, Scope::Checks, &rows).await?;
        }
        let kept = ctx
            .sql(&format!(
                "SELECT * FROM {staged} weir_checked WHERE NOT ({any})"
            ))
            .await
            .map_err(df_err(asset))?;
        checked = format!("weir_staged.{base}__kept");
        let _ = ctx.deregister_table(checked.as_str());
        ctx.register_table(checked.as_str(), kept.into_view())
            .map_err(|e| Error::internal(format!("kept rows: {e}")))?;
    }

    let gating: Vec<CheckSpec> = gating.into_iter().cloned().collect();
    let mut results = run_checks(ctx, asset, &checked, &gating).await?;
    // This run's metrics, judged against their history by anomaly checks.
    let metrics = measure(ctx, &checked).await?;
    for c in gating.iter().filter(|c| c.check == CheckKind::Anomaly) {
        let history = match target {
            Some(t) => metric_history(ctx, t.lake, asset, c).await?,
            None => vec![],
        };
        results.push(anomaly(asset, table, c, &metrics, &history));
    }
    for r in &mut results {
        r.table = table.to_string();
    }
    let failed: Vec<&CheckResult> = results
        .iter()
        .filter(|r| r.status == CheckStatus::Fail)
        .collect();
    if !failed.is_empty() {
        let mut report = String::new();
        for r in &failed {
            report.push_str(&format!("  {}: {}\n", r.name, r.message));
            for row in r.sample.iter().take(3) {
                report.push_str(&format!("    {row}\n"));
            }
        }
        return Err(Error::user(format!(
            "`{asset}`: {} check(s) failed on the new data; nothing was published to `{table}`\n{}",
            failed.len(),
            report.trim_end()
        ))
        .with_hint(
            "fix the data or the checks; `weir test` shows the checks of published tables",
        ));
    }
    for r in results.iter().filter(|r| r.status == CheckStatus::Warn) {
        tracing::warn!(asset, check = %r.name, "{}", r.message);
    }
    if let Some(t) = target {
        record_metrics(t, asset, table, &metrics).await?;
    }
    let df = ctx
        .table(checked.as_str())
        .await
        .map_err(|e| Error::internal(format!("reading staged rows: {e}")))?;
    Ok(Audited {
        df,
        results,
        quarantined,
        _dir: Some(dir),
    })
}

/// Rows refused by checks as quarantine rows: the reason, and the row as JSON.
fn bad_rows(batches: &[arrow::record_batch::RecordBatch]) -> Result<Vec<BadRow>, Error> {
    let mut out = Vec::new();
    for b in batches {
        let reasons = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)
            .map_err(|e| Error::internal(format!("check reasons: {e}")))?;
        let reasons = reasons
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .ok_or_else(|| Error::internal("check reasons"))?;
        let rest = b
            .project(&(1..b.num_columns()).collect::<Vec<_>>())
            .map_err(|e| Error::internal(format!("check rows: {e}")))?;
        let mut buf = Vec::new();
        let mut w = arrow::json::ArrayWriter::new(&mut buf);
        w.write(&rest)
            .map_err(|e| Error::internal(format!("check rows: {e}")))?;
        w.finish()
            .map_err(|e| Error::internal(format!("check rows: {e}")))?;
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&buf).unwrap_or_default();
        for (i, row) in rows.into_iter().enumerate() {
            out.push(BadRow {
                reason: reasons.value(i).to_string(),
                source: CHECKS_SOURCE.to_string(),
                line: 0,
                raw: row.to_string(),
            });
        }
    }
    Ok(out)
}

/// The lake table holding every run's metrics.
pub const METRICS_TABLE: &str = "_weir.metrics";

/// Past values of an anomaly check's metric for `asset`, newest first.
async fn metric_history(
    ctx: &SessionContext,
    lake: &weir_lake::Lake,
    asset: &str,
    c: &CheckSpec,
) -> Result<Vec<f64>, Error> {
    if !lake.exists(METRICS_TABLE).await {
        return Ok(vec![]);
    }
    weir_engine::session::register_table(ctx, lake, METRICS_TABLE).await?;
    let q = |s: &str| s.replace('\'', "''");
    let sql = format!(
        "SELECT value FROM {METRICS_TABLE} WHERE asset = '{}' AND metric = '{}' AND \"column\" = '{}' ORDER BY recorded_at DESC LIMIT {}",
        q(asset),
        q(c.metric.as_deref().unwrap_or("row_count")),
        q(c.column.as_deref().unwrap_or_default()),
        c.window.unwrap_or(20)
    );
    let batches = ctx
        .sql(&sql)
        .await
        .map_err(df_err(asset))?
        .collect()
        .await
        .map_err(df_err(asset))?;
    let mut out = Vec::new();
    for b in &batches {
        if let Some(a) = b
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
        {
            out.extend(a.iter().flatten());
        }
    }
    Ok(out)
}

/// Appends this run's metrics to [`METRICS_TABLE`].
async fn record_metrics(
    t: &Target<'_>,
    asset: &str,
    table: &str,
    metrics: &[Metric],
) -> Result<(), Error> {
    use arrow::array::{Float64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    if metrics.is_empty() {
        return Ok(());
    }
    let n = metrics.len();
    let schema = std::sync::Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("asset", DataType::Utf8, false),
        Field::new("table", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("column", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
        Field::new(
            "recorded_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]));
    let now = chrono::Utc::now().timestamp_micros();
    let batch = arrow::record_batch::RecordBatch::try_new(
        schema,
        vec![
            std::sync::Arc::new(StringArray::from(vec![t.run_id; n])),
            std::sync::Arc::new(StringArray::from(vec![asset; n])),
            std::sync::Arc::new(StringArray::from(vec![table; n])),
            std::sync::Arc::new(StringArray::from_iter_values(
                metrics.iter().map(|m| m.metric.as_str()),
            )),
            std::sync::Arc::new(StringArray::from_iter_values(
                metrics.iter().map(|m| m.column.as_str()),
            )),
            std::sync::Arc::new(Float64Array::from_iter_values(
                metrics.iter().map(|m| m.value),
            )),
            std::sync::Arc::new(TimestampMicrosecondArray::from(vec![now; n]).with_timezone("UTC")),
        ],
    )
    .map_err(|e| Error::internal(format!("metrics batch: {e}")))?;
    let ctx = weir_lake::new_session();
    let df = ctx
        .read_batch(batch)
        .map_err(|e| Error::internal(format!("metrics frame: {e}")))?;
    t.lake
        .write(
            METRICS_TABLE,
            &ctx,
            df,
            &weir_lake::WriteSpec::default(),
            &weir_lake::WriteOptions::default(),
        )
        .await?;
    Ok(())
}

/// Records the metrics of what commit `version` of `table` added, for an asset whose new
/// data was not staged by checks (the metrics of audited assets come from the gate). They
/// come from the Delta statistics of the added files, without reading data: the row
/// count (`rows`, the run's own; a merge's files also hold rewritten rows), and per column
/// the null count and, for numbers, min and max.
pub async fn record_version_metrics(
    lake: &weir_lake::Lake,
    run_id: &str,
    asset: &str,
    table: &str,
    version: u64,
    rows: u64,
) -> Result<(), Error> {
    let stats = lake.added_file_stats(table, version).await?;
    let mut metrics = vec![Metric {
        metric: "row_count".into(),
        column: String::new(),
        value: rows as f64,
    }];
    let mut per_column: std::collections::BTreeMap<(String, &str), f64> = Default::default();
    for s in &stats {
        let fold = |key: &str,
                    name: &'static str,
                    merge: fn(f64, f64) -> f64,
                    out: &mut std::collections::BTreeMap<(String, &str), f64>| {
            if let Some(cols) = s.get(key).and_then(|v| v.as_object()) {
                for (col, v) in cols {
                    if let Some(x) = v.as_f64() {
                        out.entry((col.clone(), name))
                            .and_modify(|acc| *acc = merge(*acc, x))
                            .or_insert(x);
                    }
                }
            }
        };
        fold("nullCount", "null_count", |a, b| a + b, &mut per_column);
        fold("minValues", "min", f64::min, &mut per_column);
        fold("maxValues", "max", f64::max, &mut per_column);
    }
    metrics.extend(
        per_column
            .into_iter()
            .map(|((column, metric), value)| Metric {
                metric: metric.to_string(),
                column,
                value,
            }),
    );
    let metadata = std::collections::HashMap::new();
    let target = Target {
        lake,
        table: METRICS_TABLE,
        pipeline: asset,
        run_id,
        load: version as i64,
        partition: None,
        metadata: &metadata,
    };
    record_metrics(&target, asset, table, &metrics).await
}
