//! `weir query --explain`: the physical plan, and for each lake table how many of its
//! files the plan reads: the others were skipped by partition values or by the file
//! statistics (min/max/null counts) in the Delta log, before any file is opened.
//! With `analyze` the plan also runs, and the Parquet reader's own metrics (row groups and
//! pages pruned by statistics) appear in the plan.

use std::collections::BTreeSet;

use datafusion::physical_plan::display::DisplayableExecutionPlan;
use datafusion::physical_plan::displayable;
use datafusion::prelude::SessionContext;
use serde::Serialize;
use weir_common::Error;

use crate::travel::Scanned;

/// How much of one table a query reads.
#[derive(Debug, Clone, Serialize)]
pub struct TableScan {
    pub table: String,
    /// The `--as-of` or `@` point, when not the current version.
    pub as_of: Option<String>,
    pub version: u64,
    pub files_total: u64,
    pub files_scanned: u64,
    pub files_skipped: u64,
}

/// A query's plan and its reads.
#[derive(Debug, Clone, Serialize)]
pub struct Explained {
    pub tables: Vec<TableScan>,
    pub analyzed: bool,
    pub plan: String,
}

/// Plans `sql` (and runs it with `analyze`) in `ctx`, where `scanned` are the lake tables
/// it reads.
pub async fn explain(
    ctx: &SessionContext,
    sql: &str,
    scanned: &[Scanned],
    analyze: bool,
) -> Result<Explained, Error> {
    let failed = |e: datafusion::error::DataFusionError| Error::user(format!("query failed: {e}"));
    let df = ctx.sql(sql).await.map_err(failed)?;
    let plan = df.create_physical_plan().await.map_err(failed)?;
    if analyze {
        datafusion::physical_plan::collect(plan.clone(), ctx.task_ctx())
            .await
            .map_err(failed)?;
    }
    let mut files = BTreeSet::new();
    weir_lake::plan_files(&plan, &mut files);
    let tables = scanned
        .iter()
        .map(|s| {
            let read = files.iter().filter(|f| s.paths.contains(*f)).count() as u64;
            TableScan {
                table: s.table.clone(),
                as_of: s.as_of.map(|a| a.to_string()),
                version: s.version,
                files_total: s.files,
                files_scanned: read,
                files_skipped: s.files.saturating_sub(read),
            }
        })
        .collect();
    let stats = ctx.state().config().options().explain.show_statistics;
    let shown = if analyze {
        DisplayableExecutionPlan::with_metrics(plan.as_ref())
            .set_show_statistics(stats)
            .indent(false)
            .to_string()
    } else {
        displayable(plan.as_ref())
            .set_show_statistics(stats)
            .indent(false)
            .to_string()
    };
    Ok(Explained {
        tables,
        analyzed: analyze,
        plan: shown,
    })
}

/// The text form: one line per table, then the plan.
pub fn render(e: &Explained) -> String {
    let mut text = String::new();
    for t in &e.tables {
        let at = t
            .as_of
            .as_ref()
            .filter(|a| !a.starts_with("version"))
            .map(|a| format!(", as of {a}"))
            .unwrap_or_default();
        text.push_str(&format!(
            "{} (version {}{at}): {} of {} files scanned, {} skipped by partitions or statistics\n",
            t.table, t.version, t.files_scanned, t.files_total, t.files_skipped
        ));
    }
    if !e.tables.is_empty() {
        text.push('\n');
    }
    text.push_str(&e.plan);
    text
}
