//! Write-audit-publish: an asset's checks run over its new data, staged as local Parquet,
//! before anything is committed. Rows failing an `on_fail: quarantine` check go to the
//! quarantine table and the rest goes on; then a failing error check fails the asset with
//! a report, the table stays at its previous version and downstream assets are skipped.

use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::{DataFrame, ParquetReadOptions, SessionContext};
use weir_common::Error;
use weir_config::{CheckSpec, OnFail};
use weir_core::BadRow;
use weir_engine::checks::{describe, failing_predicate, run_checks, CheckResult, CheckStatus};
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
