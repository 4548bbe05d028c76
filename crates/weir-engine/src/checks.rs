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

impl CheckResult {
    /// A result with no rows counted and no sample: freshness, anomaly and the like.
    fn verdict(
        asset: &str,
        table: &str,
        c: &CheckSpec,
        status: CheckStatus,
        message: String,
    ) -> Self {
        CheckResult {
            asset: asset.to_string(),
            table: table.to_string(),
            name: c.display_name(),
            check: c.check.to_string(),
            status,
            failing: u64::from(status != CheckStatus::Pass),
            rows: 0,
            message,
            sample: vec![],
        }
    }
}

/// A freshness check's verdict on an age: past `error_after` fails, past `warn_after` warns.
fn age_status(c: &CheckSpec, age: std::time::Duration) -> CheckStatus {
    let over = |d: Option<std::time::Duration>| d.is_some_and(|d| age > d);
    if over(c.error_after) {
        CheckStatus::Fail
    } else if over(c.warn_after) {
        CheckStatus::Warn
    } else {
        CheckStatus::Pass
    }
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
    // Anomalies are judged by the gate against history; freshness of the last load by
    // `weir test` from the table's commits.
    let checks: Vec<CheckSpec> = checks
        .iter()
        .filter(|c| c.check != CheckKind::Anomaly)
        .filter(|c| !(c.check == CheckKind::Freshness && c.column.is_none()))
        .cloned()
        .collect();
    let checks = checks.as_slice();
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
    // Unique checks run narrowest key first, so that wider keys can be implied.
    let mut unique_keys: Vec<Vec<String>> = Vec::new();
    let mut order: Vec<usize> = (0..checks.len()).collect();
    order.sort_by_key(|&i| match checks[i].check {
        CheckKind::Unique => checks[i].target_columns().len(),
        _ => 0,
    });
    let mut by_index: Vec<Option<CheckResult>> = vec![None; checks.len()];
    for i in order {
        let (c, slot) = (&checks[i], slot[i]);
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
            CheckKind::Unique => {
                // A parallel group-by, much faster than an exact count(DISTINCT). Rows with
                // a null in the key are not compared, as in a SQL unique constraint.
                let names = c.target_columns();
                let keys = names
                    .iter()
                    .map(|k| ident(k))
                    .collect::<Vec<_>>()
                    .join(", ");
                // Keys that contain an already unique key are unique: no query needed.
                let implied = unique_keys
                    .iter()
                    .any(|u: &Vec<String>| u.iter().all(|k| names.contains(k)));
                let present = names
                    .iter()
                    .map(|k| format!("{} IS NOT NULL", ident(k)))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let dupes = if implied {
                    0
                } else {
                    count(
                        ctx,
                        &format!(
                            "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM {from} WHERE {present} GROUP BY {keys} HAVING count(*) > 1) d"
                        ),
                        table,
                    )
                    .await?
                };
                if dupes == 0 {
                    unique_keys.push(names.clone());
                }
                (
                    dupes,
                    format!(
                        "{dupes} extra rows repeat a ({}) of another row",
                        names.join(", ")
                    ),
                    Some(format!(
                        "SELECT {keys}, count(*) AS rows FROM {from} WHERE {present} GROUP BY {keys} HAVING count(*) > 1 LIMIT {SAMPLE_ROWS}"
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
                let (status, message) = freshness(ctx, &from, c, table).await?;
                let mut r = CheckResult::verdict(asset, table, c, status, message);
                r.rows = rows;
                by_index[i] = Some(r);
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
        by_index[i] = Some(CheckResult {
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
    out.extend(by_index.into_iter().flatten());
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
) -> Result<(CheckStatus, String), Error> {
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
            status,
            format!(
                "no `{}` values at all ({limits})",
                c.column.clone().unwrap_or_default()
            ),
        ));
    };
    let now = chrono::Utc::now().timestamp_micros();
    let age = std::time::Duration::from_micros((now - newest).max(0) as u64);
    let status = age_status(c, age);
    let shown = humantime::format_duration(std::time::Duration::from_secs(age.as_secs()));
    Ok((
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

/// One measured value of a run: `row_count`, or a column's `null_count`, `distinct`, `min`,
/// `max` or `mean`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metric {
    pub metric: String,
    pub column: String,
    pub value: f64,
}

/// The metrics of `table` in one scan: the row count, and per column the null count and a
/// distinct estimate, plus min, max and mean of numeric columns.
pub async fn measure(ctx: &SessionContext, table: &str) -> Result<Vec<Metric>, Error> {
    let df = ctx.table(table).await.map_err(df_err(table))?;
    let schema = df.schema().as_arrow().clone();
    let mut exprs = vec![(
        "row_count".to_string(),
        String::new(),
        "count(*)".to_string(),
    )];
    for f in schema.fields() {
        let c = ident(f.name());
        exprs.push((
            "null_count".into(),
            f.name().clone(),
            format!("count(*) - count({c})"),
        ));
        let countable = !matches!(
            f.data_type(),
            arrow::datatypes::DataType::List(_) | arrow::datatypes::DataType::Struct(_)
        );
        if countable {
            exprs.push((
                "distinct".into(),
                f.name().clone(),
                format!("approx_distinct({c})"),
            ));
        }
        if f.data_type().is_numeric() {
            for (m, agg) in [("min", "min"), ("max", "max"), ("mean", "avg")] {
                exprs.push((
                    m.into(),
                    f.name().clone(),
                    format!("{agg}(CAST({c} AS DOUBLE))"),
                ));
            }
        }
    }
    let sql = format!(
        "SELECT {} FROM {table}",
        exprs
            .iter()
            .enumerate()
            .map(|(i, (_, _, e))| format!("CAST({e} AS DOUBLE) AS m{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let batches = ctx
        .sql(&sql)
        .await
        .map_err(df_err(table))?
        .collect()
        .await
        .map_err(df_err(table))?;
    let Some(b) = batches.first().filter(|b| b.num_rows() > 0) else {
        return Ok(vec![]);
    };
    let mut out = Vec::new();
    for (i, (metric, column, _)) in exprs.into_iter().enumerate() {
        let a = b
            .column(i)
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .filter(|a| a.is_valid(0));
        if let Some(a) = a {
            out.push(Metric {
                metric,
                column,
                value: a.value(0),
            });
        }
    }
    Ok(out)
}

/// Judges this run's value of an `anomaly` check's metric against its history (newest
/// first): outside median +/- k * max(1.4826 * MAD, 1% of the median) is an anomaly.
/// Quiet until `min_history` runs exist.
pub fn anomaly(
    asset: &str,
    table: &str,
    c: &CheckSpec,
    current: &[Metric],
    history: &[f64],
) -> CheckResult {
    let metric = c.metric.clone().unwrap_or_else(|| "row_count".into());
    let column = c.column.clone().unwrap_or_default();
    let value = current
        .iter()
        .find(|m| m.metric == metric && m.column == column)
        .map(|m| m.value);
    let window = c.window.unwrap_or(20);
    let min_history = c.min_history.unwrap_or(5);
    let history: Vec<f64> = history.iter().take(window).copied().collect();
    let label = if column.is_empty() {
        metric.clone()
    } else {
        format!("{metric}({column})")
    };
    let (status, message) = match value {
        None => (CheckStatus::Pass, format!("no {label} measured this run")),
        Some(_) if history.len() < min_history => (
            CheckStatus::Pass,
            format!("quiet: {} of {min_history} runs of history", history.len()),
        ),
        Some(v) => {
            let median = median(&history);
            let deviations: Vec<f64> = history.iter().map(|h| (h - median).abs()).collect();
            let mad = median_of(deviations);
            let spread = (1.4826 * mad).max(0.01 * median.abs());
            let k = c.k.unwrap_or(3.0);
            let (lo, hi) = (median - k * spread, median + k * spread);
            let text = format!(
                "{label} = {v} against a median of {median} over {} runs (normal {lo:.2}..{hi:.2})",
                history.len()
            );
            if v < lo || v > hi {
                (
                    if c.severity == Severity::Warn {
                        CheckStatus::Warn
                    } else {
                        CheckStatus::Fail
                    },
                    text,
                )
            } else {
                (CheckStatus::Pass, text)
            }
        }
    };
    CheckResult::verdict(asset, table, c, status, message)
}

fn median(v: &[f64]) -> f64 {
    median_of(v.to_vec())
}

fn median_of(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A `freshness` check without a column: the age of the table's last commit.
pub fn last_load_freshness(
    asset: &str,
    table: &str,
    c: &CheckSpec,
    last_commit_millis: Option<i64>,
) -> CheckResult {
    let now = chrono::Utc::now().timestamp_millis();
    let (status, message) = match last_commit_millis {
        None => (
            CheckStatus::Fail,
            "the table has never been loaded".to_string(),
        ),
        Some(t) => {
            let age = std::time::Duration::from_secs(((now - t).max(0) / 1000) as u64);
            (
                age_status(c, age),
                format!("last load {} ago", humantime::format_duration(age)),
            )
        }
    };
    CheckResult::verdict(asset, table, c, status, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(min_history: usize) -> CheckSpec {
        serde_json::from_value(serde_json::json!({
            "check": "anomaly", "min_history": min_history
        }))
        .unwrap()
    }

    fn rows(v: f64) -> Vec<Metric> {
        vec![Metric {
            metric: "row_count".into(),
            column: String::new(),
            value: v,
        }]
    }

    #[test]
    fn last_load_freshness_by_commit_age() {
        let c: CheckSpec = serde_json::from_value(serde_json::json!({
            "check": "freshness", "warn_after": "1h", "error_after": "1d"
        }))
        .unwrap();
        let now = chrono::Utc::now().timestamp_millis();
        let at = |hours: i64| Some(now - hours * 3_600_000);
        assert_eq!(
            last_load_freshness("a", "t", &c, at(0)).status,
            CheckStatus::Pass
        );
        assert_eq!(
            last_load_freshness("a", "t", &c, at(2)).status,
            CheckStatus::Warn
        );
        let r = last_load_freshness("a", "t", &c, at(30));
        assert_eq!(r.status, CheckStatus::Fail);
        assert_eq!(r.message, "last load 1day 6h ago");
        assert_eq!(
            last_load_freshness("a", "t", &c, None).status,
            CheckStatus::Fail
        );
    }

    #[test]
    fn a_collapsed_row_count_is_an_anomaly_after_enough_history() {
        let history = [1000.0, 1010.0, 990.0, 1005.0, 995.0, 1002.0];
        assert_eq!(
            anomaly("a", "t", &spec(5), &rows(1003.0), &history).status,
            CheckStatus::Pass
        );
        let r = anomaly("a", "t", &spec(5), &rows(40.0), &history);
        assert_eq!(r.status, CheckStatus::Fail, "{}", r.message);
        // Quiet without enough history.
        let r = anomaly("a", "t", &spec(10), &rows(40.0), &history);
        assert_eq!(r.status, CheckStatus::Pass);
        assert!(r.message.starts_with("quiet: 6 of 10"), "{}", r.message);
        // A perfectly stable history tolerates 1% noise around it, not a collapse.
        let flat = [500.0; 8];
        assert_eq!(
            anomaly("a", "t", &spec(5), &rows(502.0), &flat).status,
            CheckStatus::Pass
        );
        assert_eq!(
            anomaly("a", "t", &spec(5), &rows(480.0), &flat).status,
            CheckStatus::Fail
        );
    }
}
