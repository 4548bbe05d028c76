//! Write-audit-publish: an asset's error-severity checks run over its new data, staged as
//! local Parquet, before anything is committed. A failing check fails the asset with a
//! report, the table stays at its previous version and downstream assets are skipped.

use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::{DataFrame, ParquetReadOptions, SessionContext};
use weir_common::Error;
use weir_config::CheckSpec;
use weir_engine::checks::{run_checks, CheckResult, CheckStatus};
use weir_engine::session::ensure_schema;

/// Staged rows that passed the checks; the staging directory lives as long as this.
pub struct Audited {
    pub df: DataFrame,
    pub results: Vec<CheckResult>,
    _dir: Option<tempfile::TempDir>,
}

/// Checks `df` (what `asset` is about to write into `table`) with `checks`; returns the
/// staged rows to write, or an error naming the failed checks with failing rows.
pub async fn audit(
    ctx: &SessionContext,
    asset: &str,
    table: &str,
    checks: &[CheckSpec],
    df: DataFrame,
) -> Result<Audited, Error> {
    if checks.is_empty() {
        return Ok(Audited {
            df,
            results: vec![],
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
        .map_err(|e| Error::user(format!("`{asset}`: {e}")))?;
    ensure_schema(ctx, "weir_staged")?;
    let staged_name = format!("weir_staged.{}", table.replace('.', "__"));
    let _ = ctx.deregister_table(staged_name.as_str());
    ctx.register_parquet(staged_name.as_str(), &path, ParquetReadOptions::default())
        .await
        .map_err(|e| Error::internal(format!("reading staged rows: {e}")))?;
    let mut results = run_checks(ctx, asset, &staged_name, checks).await?;
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
        .table(staged_name.as_str())
        .await
        .map_err(|e| Error::internal(format!("reading staged rows: {e}")))?;
    Ok(Audited {
        df,
        results,
        _dir: Some(dir),
    })
}
