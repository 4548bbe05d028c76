//! Data quality checks as declared in YAML, on a pipeline's output or a model:
//!
//! ```yaml
//! checks:
//!   - { check: not_null, column: email }
//!   - { check: unique, columns: [order_id, line] }
//!   - { check: accepted_values, column: status, values: [new, paid, shipped] }
//!   - { check: range, column: amount, min: 0, max: 10000 }
//!   - { check: pattern, column: email, regex: '^[^@ ]+@[^@ ]+$', severity: warn }
//!   - { check: relationships, column: customer_id, to: raw.customers, field: customer_id }
//!   - { check: row_count, min: 1 }
//!   - { check: expression, sql: "shipped_at is null or shipped_at >= ordered_at" }
//!   - { check: sql, sql: "select * from {{ this }} where amount < 0" }
//! ```

use std::fmt;

use serde::Deserialize;
use weir_common::Error;

use crate::spec::BadRowLimit;

/// The kinds of check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    NotNull,
    Unique,
    AcceptedValues,
    Range,
    Pattern,
    Relationships,
    RowCount,
    Expression,
    Sql,
    Freshness,
    Schema,
    Anomaly,
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::NotNull => "not_null",
            CheckKind::Unique => "unique",
            CheckKind::AcceptedValues => "accepted_values",
            CheckKind::Range => "range",
            CheckKind::Pattern => "pattern",
            CheckKind::Relationships => "relationships",
            CheckKind::RowCount => "row_count",
            CheckKind::Expression => "expression",
            CheckKind::Sql => "sql",
            CheckKind::Freshness => "freshness",
            CheckKind::Schema => "schema",
            CheckKind::Anomaly => "anomaly",
        })
    }
}

/// `error` (blocks publishing, fails the run) or `warn` (reported only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    #[default]
    Error,
    Warn,
}

/// What a failing row-level check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFail {
    /// Fail (severity `error`) or report (severity `warn`).
    #[default]
    Fail,
    /// Move the failing rows to the quarantine table and publish the rest.
    Quarantine,
}

/// One declared check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// What is checked.
    pub check: CheckKind,
    /// A name for reports and quarantine (default: `<check>_<column>`).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub severity: Severity,
    /// `quarantine`: failing rows go to the quarantine table, the rest is published
    /// (row-level checks only).
    #[serde(default)]
    pub on_fail: OnFail,
    /// Failing rows tolerated before the check fails: a count or a share (`"1%"`).
    #[serde(default)]
    pub tolerance: Option<BadRowLimit>,
    /// The column of a column check.
    #[serde(default)]
    pub column: Option<String>,
    /// `unique`: the columns that together must be unique.
    #[serde(default)]
    pub columns: Vec<String>,
    /// `accepted_values`: the allowed values.
    #[serde(default)]
    pub values: Vec<serde_json::Value>,
    /// `range`, `row_count`: bounds.
    #[serde(default)]
    pub min: Option<serde_json::Value>,
    #[serde(default)]
    pub max: Option<serde_json::Value>,
    /// `range`: whether the bounds themselves are allowed (default true).
    #[serde(default = "yes")]
    pub inclusive: bool,
    /// `pattern`: a regular expression the whole value must match.
    #[serde(default)]
    pub regex: Option<String>,
    /// `relationships`: the table (`schema.table`) and column every value must exist in.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub field: Option<String>,
    /// `expression`: a SQL boolean that must hold for every row; `sql`: a query returning
    /// the failing rows (`{{ this }}` is the checked table).
    #[serde(default)]
    pub sql: Option<String>,
    /// `freshness`: the newest value of `column` (or, without a column, the last load)
    /// must be younger than these (`6h`, `2d`).
    #[serde(default, with = "crate::spec::duration_opt")]
    pub warn_after: Option<std::time::Duration>,
    #[serde(default, with = "crate::spec::duration_opt")]
    pub error_after: Option<std::time::Duration>,
    /// `schema`: expected columns and their types (`order_id: bigint`).
    #[serde(default)]
    pub expect: std::collections::BTreeMap<String, String>,
    /// `schema`: `evolve` (default: more columns are fine) or `freeze` (exactly these).
    #[serde(default)]
    pub mode: SchemaCheckMode,
    /// `anomaly`: the metric watched: `row_count` (default), or with `column`:
    /// `null_count`, `distinct`, `min`, `max`, `mean`.
    #[serde(default)]
    pub metric: Option<String>,
    /// `anomaly`: how many median absolute deviations from the median are normal (default 3).
    #[serde(default)]
    pub k: Option<f64>,
    /// `anomaly`: how many past runs form the history (default 20).
    #[serde(default)]
    pub window: Option<usize>,
    /// `anomaly`: runs of history needed before the check speaks (default 5).
    #[serde(default)]
    pub min_history: Option<usize>,
}

/// Metrics recorded per run and watched by `anomaly` checks.
pub const METRICS: [&str; 6] = ["row_count", "null_count", "distinct", "min", "max", "mean"];

/// Whether a `schema` check allows columns beyond the expected ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaCheckMode {
    #[default]
    Evolve,
    Freeze,
}

fn yes() -> bool {
    true
}

impl CheckSpec {
    /// The check's name in reports.
    pub fn display_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        let cols = if !self.columns.is_empty() {
            self.columns.join("_")
        } else {
            self.column.clone().unwrap_or_default()
        };
        if cols.is_empty() {
            self.check.to_string()
        } else {
            format!("{}_{cols}", self.check)
        }
    }

    /// The columns this check reads on the checked table.
    pub fn target_columns(&self) -> Vec<String> {
        let mut out: Vec<String> = self.column.iter().cloned().collect();
        out.extend(self.columns.iter().cloned());
        out
    }

    /// Checks that the keys a kind needs are there; `owner` names the pipeline or model.
    pub fn validate(&self, owner: &str) -> Result<(), Error> {
        let fail = |msg: &str| {
            Err(Error::user(format!(
                "check `{}` of `{owner}`: {msg}",
                self.display_name()
            )))
        };
        let needs_column = matches!(
            self.check,
            CheckKind::NotNull
                | CheckKind::AcceptedValues
                | CheckKind::Range
                | CheckKind::Pattern
                | CheckKind::Relationships
        );
        if needs_column && self.column.is_none() {
            return fail("needs `column`");
        }
        let row_level = needs_column || self.check == CheckKind::Expression;
        if self.on_fail == OnFail::Quarantine && !row_level {
            return fail("`on_fail: quarantine` applies to row-level checks (not_null, accepted_values, range, pattern, relationships, expression)");
        }
        match self.check {
            CheckKind::Unique if self.column.is_none() && self.columns.is_empty() => {
                fail("needs `column` or `columns`")
            }
            CheckKind::AcceptedValues if self.values.is_empty() => fail("needs `values`"),
            CheckKind::Range | CheckKind::RowCount if self.min.is_none() && self.max.is_none() => {
                fail("needs `min`, `max` or both")
            }
            CheckKind::Pattern => match &self.regex {
                None => fail("needs `regex`"),
                Some(r) if r.contains('\'') => fail("`regex` cannot contain a single quote"),
                _ => Ok(()),
            },
            CheckKind::Relationships if self.to.is_none() || self.field.is_none() => {
                fail("needs `to` (a table) and `field` (its column)")
            }
            CheckKind::Expression | CheckKind::Sql if self.sql.is_none() => fail("needs `sql`"),
            CheckKind::Freshness if self.warn_after.is_none() && self.error_after.is_none() => {
                fail("needs `warn_after`, `error_after` or both")
            }
            CheckKind::Anomaly => {
                let metric = self.metric.as_deref().unwrap_or("row_count");
                if !METRICS.contains(&metric) {
                    return fail(&format!(
                        "unknown metric `{metric}`; metrics: {}",
                        METRICS.join(", ")
                    ));
                }
                if (metric == "row_count") != self.column.is_none() {
                    return fail("`row_count` takes no `column`; the other metrics need one");
                }
                Ok(())
            }
            CheckKind::Schema if self.expect.is_empty() => {
                fail("needs `expect` (column: type, ...)")
            }
            _ => Ok(()),
        }
    }
}
