//! Running data quality checks over a table with as few scans as possible: every row-level
//! check (not_null, accepted_values, range, pattern, expression), single-column uniqueness
//! and the row count are counted by one aggregate query; multi-column uniqueness,
//! relationships and `sql` checks need a query each. Failing checks fetch a few failing
//! rows to show.

use datafusion::prelude::SessionContext;
use serde::Serialize;
use weir_common::Error;
use weir_config::{CheckKind, CheckSpec, Severity};

/// Failing rows shown per failed check.
const SAMPLE_ROWS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Pass,
    /// Failed, with severity `warn`.
    Warn,
    Fail,
}

/// The outcome of one check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub asset: String,
    pub table: String,
    pub name: String,
    pub check: String,
    pub status: CheckStatus,
    /// Rows (or, for `row_count`, the count) that failed.
    pub failing: u64,
    /// Rows checked.
    pub rows: u64,
    /// What was expected, for the report.
    pub message: String,
    /// A few failing rows, as JSON objects.
    pub sample: Vec<serde_json::Value>,
}

/// A SQL literal for a YAML value.
fn literal(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => format!("'{}'", s.replace('\'', "''")),
        serde_json::Value::Null => "NULL".into(),
        other => other.to_string(),
    }
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The predicate a failing row satisfies, for row-level checks.
pub fn failing_predicate(c: &CheckSpec) -> Option<String> {
    let col = c.column.as_deref().map(ident).unwrap_or_default();
    let (lo, hi) = if c.inclusive {
        ("<", ">")
    } else {
        ("<=", ">=")
    };
    Some(match c.check {
        CheckKind::NotNull => format!("{col} IS NULL"),
        CheckKind::AcceptedValues => format!(
            "{col} IS NOT NULL AND {col} NOT IN ({})",
            c.values.iter().map(literal).collect::<Vec<_>>().join(", ")
        ),
        CheckKind::Range => {
            let mut ors = Vec::new();
            if let Some(min) = &c.min {
                ors.push(format!("{col} {lo} {}", literal(min)));
            }
            if let Some(max) = &c.max {
                ors.push(format!("{col} {hi} {}", literal(max)));
            }
            format!("{col} IS NOT NULL AND ({})", ors.join(" OR "))
        }
        CheckKind::Pattern => format!(
            "{col} IS NOT NULL AND NOT (CAST({col} AS VARCHAR) ~ '^(?:{})$')",
            c.regex.clone().unwrap_or_default()
        ),
        CheckKind::Expression => format!("({}) IS NOT TRUE", c.sql.clone().unwrap_or_default()),
        CheckKind::Relationships => format!(
            "{col} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {} weir_parent WHERE weir_parent.{} = weir_checked.{col})",
            c.to.clone().unwrap_or_default(),
            ident(c.field.as_deref().unwrap_or_default())
        ),
        _ => return None,
    })
}

fn df_err(table: &str) -> impl Fn(datafusion::error::DataFusionError) -> Error + '_ {
    move |e| {
        Error::user(format!("checking `{table}`: {e}"))
            .with_hint("check the columns, values and SQL named in the checks")
    }
}

async fn count(ctx: &SessionContext, sql: &str, table: &str) -> Result<u64, Error> {
    let batches = ctx
        .sql(sql)
        .await
        .map_err(df_err(table))?
        .collect()
        .await
        .map_err(df_err(table))?;
    Ok(batches
        .first()
        .filter(|b| b.num_rows() > 0)
        .and_then(|b| {
            arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64)
                .ok()
                .and_then(|a| {
                    a.as_any()
                        .downcast_ref::<arrow::array::Int64Array>()
                        .map(|a| if a.is_null(0) { 0 } else { a.value(0) })
                })
        })
        .unwrap_or(0)
        .max(0) as u64)
}

use arrow::array::Array;

async fn sample(ctx: &SessionContext, sql: &str) -> Vec<serde_json::Value> {
    let Ok(df) = ctx.sql(sql).await else {
        return vec![];
    };
    let Ok(batches) = df.collect().await else {
        return vec![];
    };
    let mut buf = Vec::new();
    let mut w = arrow::json::ArrayWriter::new(&mut buf);
    for b in &batches {
        if w.write(b).is_err() {
            return vec![];
        }
    }
    if w.finish().is_err() {
        return vec![];
    }
    serde_json::from_slice::<Vec<serde_json::Value>>(&buf).unwrap_or_default()
}

/// Runs `checks` over `table` (registered in `ctx` as `schema.table`), for `asset`.
pub async fn run_checks(
    ctx: &SessionContext,
    asset: &str,
    table: &str,
    checks: &[CheckSpec],
) -> Result<Vec<CheckResult>, Error> {
    if checks.is_empty() {
        return Ok(vec![]);
    }
    let from = format!("{table} weir_checked");
    // One scan: the row count, each row-level predicate, single-column duplicates.
    let mut exprs = vec!["count(*)".to_string()];
    let mut slot: Vec<Option<usize>> = Vec::new();
    for c in checks {
        let e = match (c.check, failing_predicate(c)) {
            (CheckKind::Relationships, _) => None,
            (_, Some(p)) => Some(format!("sum(CASE WHEN {p} THEN 1 ELSE 0 END)")),
            (CheckKind::Unique, None) if c.columns.len() <= 1 => {
                let col = ident(
                    c.column
                        .as_deref()
                        .or(c.columns.first().map(|s| s.as_str()))
                        .unwrap_or_default(),
                );
                Some(format!("count({col}) - count(DISTINCT {col})"))
            }
            _ => None,
        };
        slot.push(e.map(|e| {
            exprs.push(format!("{e} AS weir_c{}", exprs.len()));
            exprs.len() - 1
        }));
    }
    let sql = format!("SELECT {} FROM {from}", exprs.join(", "));
    let batches = ctx
        .sql(&sql)
        .await
        .map_err(df_err(table))?
        .collect()
        .await
        .map_err(df_err(table))?;
    let value = |i: usize| -> u64 {
        batches
            .first()
            .and_then(|b| {
                arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Int64).ok()
            })
            .and_then(|a| {
                a.as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .map(|a| {
                        if a.is_empty() || a.is_null(0) {
                            0
                        } else {
                            a.value(0)
                        }
                    })
            })
            .unwrap_or(0)
            .max(0) as u64
    };
    let rows = value(0);

    let mut out = Vec::new();
    for (c, slot) in checks.iter().zip(slot) {
        let (failing, message, sample_sql) = match c.check {
            CheckKind::RowCount => {
                let below = c
                    .min
                    .as_ref()
                    .and_then(|m| m.as_u64())
                    .is_some_and(|m| rows < m);
                let above = c
                    .max
                    .as_ref()
                    .and_then(|m| m.as_u64())
                    .is_some_and(|m| rows > m);
                let bounds = format!(
                    "row count {rows}, expected {}{}",
                    c.min
                        .as_ref()
                        .map(|m| format!(">= {m}"))
                        .unwrap_or_default(),
                    c.max
                        .as_ref()
                        .map(|m| format!("{}<= {m}", if c.min.is_some() { " and " } else { "" }))
                        .unwrap_or_default()
                );
                (u64::from(below || above), bounds, None)
            }
            CheckKind::Unique if slot.is_none() => {
                let cols: Vec<String> = c.columns.iter().map(|k| ident(k)).collect();
                let keys = cols.join(", ");
                let dupes = count(
                    ctx,
                    &format!(
                        "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM {from} GROUP BY {keys} HAVING count(*) > 1) d"
                    ),
                    table,
                )
                .await?;
                (
                    dupes,
                    format!("{dupes} extra rows share a ({}) with another row", c.columns.join(", ")),
                    Some(format!(
                        "SELECT {keys}, count(*) AS rows FROM {from} GROUP BY {keys} HAVING count(*) > 1 LIMIT {SAMPLE_ROWS}"
                    )),
                )
            }
            CheckKind::Unique => {
                let col = ident(
                    c.column
                        .as_deref()
                        .or(c.columns.first().map(|s| s.as_str()))
                        .unwrap_or_default(),
                );
                let n = slot.map(value).unwrap_or(0);
                (
                    n,
                    format!("{n} extra rows repeat a value of {col}"),
                    Some(format!(
                        "SELECT {col}, count(*) AS rows FROM {from} WHERE {col} IS NOT NULL GROUP BY {col} HAVING count(*) > 1 LIMIT {SAMPLE_ROWS}"
                    )),
                )
            }
            CheckKind::Relationships => {
                let p = failing_predicate(c).unwrap_or_default();
                let n = count(
                    ctx,
                    &format!("SELECT count(*) FROM {from} WHERE {p}"),
                    table,
                )
                .await?;
                (
                    n,
                    format!(
                        "{n} rows have a {} missing from {}.{}",
                        c.column.clone().unwrap_or_default(),
                        c.to.clone().unwrap_or_default(),
                        c.field.clone().unwrap_or_default()
                    ),
                    Some(format!(
                        "SELECT * FROM {from} WHERE {p} LIMIT {SAMPLE_ROWS}"
                    )),
                )
            }
            CheckKind::Sql => {
                let query = c
                    .sql
                    .clone()
                    .unwrap_or_default()
                    .replace("{{ this }}", table)
                    .replace("{{this}}", table);
                let n = count(ctx, &format!("SELECT count(*) FROM ({query}) q"), table).await?;
                (
                    n,
                    format!("{n} rows returned by the check's query"),
                    Some(format!("SELECT * FROM ({query}) q LIMIT {SAMPLE_ROWS}")),
                )
            }
            _ => {
                let p = failing_predicate(c).unwrap_or_default();
                let n = slot.map(value).unwrap_or(0);
                (
                    n,
                    format!("{n} of {rows} rows fail: {}", describe(c)),
                    Some(format!(
                        "SELECT * FROM {from} WHERE {p} LIMIT {SAMPLE_ROWS}"
                    )),
                )
            }
        };
        let tolerated = match (&c.tolerance, c.check) {
            (_, CheckKind::RowCount) => failing == 0,
            (Some(t), _) => !t.exceeded(failing, rows.max(1)),
            (None, _) => failing == 0,
        };
        let status = match (tolerated, c.severity) {
            (true, _) => CheckStatus::Pass,
            (false, Severity::Warn) => CheckStatus::Warn,
            (false, Severity::Error) => CheckStatus::Fail,
        };
        let sample = match (&sample_sql, status) {
            (Some(sql), CheckStatus::Warn | CheckStatus::Fail) => sample(ctx, sql).await,
            _ => vec![],
        };
        out.push(CheckResult {
            asset: asset.to_string(),
            table: table.to_string(),
            name: c.display_name(),
            check: c.check.to_string(),
            status,
            failing,
            rows,
            message,
            sample,
        });
    }
    Ok(out)
}

/// What a row-level check requires, in words.
pub fn describe(c: &CheckSpec) -> String {
    let col = c.column.clone().unwrap_or_default();
    match c.check {
        CheckKind::NotNull => format!("`{col}` must not be null"),
        CheckKind::AcceptedValues => format!(
            "`{col}` must be one of {}",
            c.values.iter().map(literal).collect::<Vec<_>>().join(", ")
        ),
        CheckKind::Range => format!(
            "`{col}` must be within {}{}, {}{}",
            if c.inclusive { "[" } else { "(" },
            c.min
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or("-inf".into()),
            c.max
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or("inf".into()),
            if c.inclusive { "]" } else { ")" }
        ),
        CheckKind::Pattern => format!(
            "`{col}` must match /{}/",
            c.regex.clone().unwrap_or_default()
        ),
        CheckKind::Expression => format!("`{}` must hold", c.sql.clone().unwrap_or_default()),
        _ => c.check.to_string(),
    }
}
