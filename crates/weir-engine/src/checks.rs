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
            CheckKind::Freshness => {
                let (failing, status, message) = freshness(ctx, &from, c, table).await?;
                out.push(CheckResult {
                    asset: asset.to_string(),
                    table: table.to_string(),
                    name: c.display_name(),
                    check: c.check.to_string(),
                    status,
                    failing,
                    rows,
                    message,
                    sample: vec![],
                });
                continue;
            }
            CheckKind::Schema => {
                let problems = schema_problems(ctx, table, c).await?;
                (
                    problems.len() as u64,
                    if problems.is_empty() {
                        "columns and types as expected".to_string()
                    } else {
                        problems.join("; ")
                    },
                    None,
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
            (_, CheckKind::RowCount | CheckKind::Schema) => failing == 0,
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

/// The age of the newest `column` value against `warn_after` / `error_after`.
async fn freshness(
    ctx: &SessionContext,
    from: &str,
    c: &CheckSpec,
    table: &str,
) -> Result<(u64, CheckStatus, String), Error> {
    let col = ident(c.column.as_deref().unwrap_or_default());
    let batches = ctx
        .sql(&format!(
            "SELECT CAST(max({col}) AS TIMESTAMP) AS newest FROM {from}"
        ))
        .await
        .map_err(df_err(table))?
        .collect()
        .await
        .map_err(df_err(table))?;
    let newest = batches
        .first()
        .and_then(|b| {
            arrow::compute::cast(
                b.column(0),
                &arrow::datatypes::DataType::Timestamp(
                    arrow::datatypes::TimeUnit::Microsecond,
                    None,
                ),
            )
            .ok()
        })
        .and_then(|a| {
            a.as_any()
                .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
                .and_then(|a| (!a.is_empty() && a.is_valid(0)).then(|| a.value(0)))
        });
    let limits = format!(
        "{}{}",
        c.warn_after
            .map(|d| format!("warn after {}", humantime::format_duration(d)))
            .unwrap_or_default(),
        c.error_after
            .map(|d| format!(
                "{}error after {}",
                if c.warn_after.is_some() { ", " } else { "" },
                humantime::format_duration(d)
            ))
            .unwrap_or_default()
    );
    let Some(newest) = newest else {
        let status = if c.error_after.is_some() {
            CheckStatus::Fail
        } else {
            CheckStatus::Warn
        };
        return Ok((
            1,
            status,
            format!(
                "no `{}` values at all ({limits})",
                c.column.clone().unwrap_or_default()
            ),
        ));
    };
    let now = chrono::Utc::now().timestamp_micros();
    let age = std::time::Duration::from_micros((now - newest).max(0) as u64);
    let over = |d: Option<std::time::Duration>| d.is_some_and(|d| age > d);
    let status = if over(c.error_after) {
        CheckStatus::Fail
    } else if over(c.warn_after) {
        CheckStatus::Warn
    } else {
        CheckStatus::Pass
    };
    let shown = humantime::format_duration(std::time::Duration::from_secs(age.as_secs()));
    Ok((
        u64::from(status != CheckStatus::Pass),
        status,
        format!(
            "newest `{}` is {shown} old ({limits})",
            c.column.clone().unwrap_or_default()
        ),
    ))
}

/// A type's name for comparing with what a `schema` check expects.
fn type_name(dt: &arrow::datatypes::DataType) -> String {
    use arrow::datatypes::DataType::*;
    match dt {
        Int8 => "tinyint".into(),
        Int16 | UInt8 => "smallint".into(),
        Int32 | UInt16 => "int".into(),
        Int64 | UInt32 => "bigint".into(),
        Float32 => "float".into(),
        Float64 => "double".into(),
        Utf8 | LargeUtf8 | Utf8View => "string".into(),
        Binary | LargeBinary | BinaryView => "binary".into(),
        Boolean => "boolean".into(),
        Date32 | Date64 => "date".into(),
        Timestamp(_, _) => "timestamp".into(),
        Decimal128(p, s) => format!("decimal({p},{s})"),
        List(f) | LargeList(f) => format!("array<{}>", type_name(f.data_type())),
        other => other.to_string().to_lowercase(),
    }
}

/// An expected type as written by a person, in [`type_name`]'s terms.
fn expected_name(t: &str) -> String {
    let t = t.trim().to_lowercase().replace(' ', "");
    let t = t.replace("numeric", "decimal");
    match t.as_str() {
        "integer" | "int4" | "int32" => "int".into(),
        "long" | "int8" | "int64" => "bigint".into(),
        "short" | "int2" | "int16" => "smallint".into(),
        "text" | "varchar" | "utf8" | "str" => "string".into(),
        "real" | "float4" | "float32" => "float".into(),
        "float8" | "float64" | "doubleprecision" => "double".into(),
        "bool" => "boolean".into(),
        "timestamptz" | "datetime" => "timestamp".into(),
        "bytea" | "bytes" => "binary".into(),
        _ => t,
    }
}

/// Differences between the table's columns and a `schema` check's expectation.
async fn schema_problems(
    ctx: &SessionContext,
    table: &str,
    c: &CheckSpec,
) -> Result<Vec<String>, Error> {
    let df = ctx.table(table).await.map_err(df_err(table))?;
    let schema = df.schema().as_arrow().clone();
    let mut problems = Vec::new();
    for (name, want) in &c.expect {
        match schema.field_with_name(name) {
            Err(_) => problems.push(format!("column `{name}` is missing")),
            Ok(f) => {
                let (got, want) = (type_name(f.data_type()), expected_name(want));
                if got != want {
                    problems.push(format!("column `{name}` is {got}, expected {want}"));
                }
            }
        }
    }
    if c.mode == weir_config::SchemaCheckMode::Freeze {
        for f in schema.fields() {
            if !c.expect.contains_key(f.name()) {
                problems.push(format!(
                    "unexpected column `{}` (schema is frozen)",
                    f.name()
                ));
            }
        }
    }
    Ok(problems)
}
