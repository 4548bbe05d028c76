//! Config structs. Every field's doc comment is its reference documentation.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// `weir.yaml`: the project.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// Project name, shown in run summaries.
    pub name: String,
    /// Lake root: a local directory (relative to the project) or an object-store URL.
    #[serde(default = "default_lake")]
    pub lake: String,
    /// Object-store options of an `s3://` lake (delta-rs storage options such as
    /// `aws_endpoint_url`, `aws_region`, `aws_access_key_id`, `aws_secret_access_key`,
    /// `aws_allow_http`). Unset ones come from the environment (`AWS_*`). Write secrets as
    /// `${env:NAME}`.
    #[serde(default)]
    pub lake_options: BTreeMap<String, String>,
    /// Values for `var('name')` in models.
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
    /// Defaults for SQL models.
    #[serde(default)]
    pub models: ModelDefaults,
    /// Default retry policy for external failures (I/O, object stores).
    #[serde(default)]
    pub retry: RetryConfig,
    /// Named connections to databases, used by pipelines (`connection: name`).
    #[serde(default)]
    pub connections: BTreeMap<String, ConnectionConfig>,
    /// Where run history, the run queue and schedule state live.
    #[serde(default)]
    pub state: StateConfig,
    /// How many assets of one run execute at once (default: the number of cores).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Cron schedules of groups of assets, run by `weir serve`.
    #[serde(default)]
    pub schedules: Vec<crate::ScheduleConfig>,
    /// Sensors that start runs when files appear or a table changes, run by `weir serve`.
    #[serde(default)]
    pub sensors: Vec<crate::SensorConfig>,
    /// Where failed runs and missed freshness SLAs are reported.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Per-table maintenance (compaction, vacuum, retention), applied after writes and
    /// by `weir table maintain`.
    #[serde(default)]
    pub maintenance: Vec<crate::MaintenancePolicy>,
}

/// Alerts: a JSON POST to a webhook for every failed run and missed freshness SLA.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// An `http(s)://` URL that receives the alerts.
    #[serde(default)]
    pub webhook: Option<String>,
}

/// The state store: an SQLite file by default, or a PostgreSQL connection shared by
/// several workers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// A PostgreSQL connection from `connections:`; when set, `path` is unused.
    #[serde(default)]
    pub connection: Option<String>,
    /// The SQLite file, relative to the project (default `.weir/state.db`).
    #[serde(default = "default_state_path")]
    pub path: String,
    /// A running run whose worker sent no heartbeat for this long is taken back and
    /// resumed by another worker (default `30s`).
    #[serde(default = "default_lease", deserialize_with = "de_duration")]
    pub lease: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            connection: None,
            path: default_state_path(),
            lease: default_lease(),
        }
    }
}

fn default_state_path() -> String {
    ".weir/state.db".to_string()
}

fn default_lease() -> Duration {
    Duration::from_secs(30)
}

fn default_lake() -> String {
    "lake".to_string()
}

/// Defaults applied to every model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDefaults {
    /// Schema of models that sit directly in `models/` (models in `models/<dir>/` take `<dir>`).
    #[serde(default = "default_model_schema")]
    pub schema: String,
    /// Materialization used when a model does not say: `table`, `incremental` or `view`.
    #[serde(default)]
    pub materialized: Materialized,
}

impl Default for ModelDefaults {
    fn default() -> Self {
        Self {
            schema: default_model_schema(),
            materialized: Materialized::Table,
        }
    }
}

fn default_model_schema() -> String {
    "analytics".to_string()
}

/// Retry policy for failures of external systems. User errors are never retried.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Total attempts including the first; 1 disables retries.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry, doubled for each further one (with jitter), e.g. `200ms`.
    #[serde(default = "default_initial", deserialize_with = "de_duration")]
    pub initial_backoff: Duration,
    /// Upper bound for one delay, e.g. `30s`.
    #[serde(default = "default_max", deserialize_with = "de_duration")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_attempts(),
            initial_backoff: default_initial(),
            max_backoff: default_max(),
        }
    }
}

fn default_attempts() -> u32 {
    3
}
fn default_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_max() -> Duration {
    Duration::from_secs(10)
}

pub(crate) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration `{text}` ({e}); write e.g. `500ms`, `30s`, `5m`"
        ))
    })
}

/// `pipelines/<name>.yaml`: ingestion from a source into a lake table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Pipeline name; defaults to the file name without `.yaml`.
    #[serde(default)]
    pub name: Option<String>,
    /// What the pipeline loads, for people.
    #[serde(default)]
    pub description: Option<String>,
    /// Tags for selection (`weir run tag:nightly`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Where the data comes from.
    pub source: SourceConfig,
    /// Optional SQL over the incoming rows, which are the table `source`.
    #[serde(default)]
    pub transform: Option<String>,
    /// Where the data goes.
    pub sink: SinkConfig,
    /// How many malformed rows are tolerated before the run fails and commits nothing:
    /// a count (`100`) or a share of rows read (`"1%"`). Default: no limit (all bad rows are
    /// quarantined and the run succeeds).
    #[serde(default)]
    pub max_bad_rows: Option<BadRowLimit>,
    /// Retry policy for this pipeline; defaults to the project's.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// One attempt fails (and may be retried) when it takes longer than this, e.g. `30m`.
    #[serde(default, with = "duration_opt")]
    pub timeout: Option<Duration>,
    /// When `weir serve` runs this pipeline (and what is downstream of it).
    #[serde(default)]
    pub schedule: Option<crate::ScheduleConfig>,
    /// The pipeline must have succeeded within this long (e.g. `2h`); a miss shows in
    /// `weir status` and is sent to `alerts.webhook` by `weir serve`.
    #[serde(default, with = "duration_opt")]
    pub freshness_sla: Option<Duration>,
    /// Data quality checks on the loaded table (`weir test`).
    #[serde(default)]
    pub checks: Vec<crate::checks::CheckSpec>,
    /// Load one partition per run (time or a list of values): the source's `path` or
    /// `query` (or the transform) selects it with `{{ partition_start }}`,
    /// `{{ partition_end }}` or `{{ partition_key }}`, and the load replaces exactly the
    /// sink rows whose `column` falls in it. `weir backfill` loads ranges of them.
    #[serde(default)]
    pub partitions: Option<crate::PartitionsConfig>,
}

/// A source. `type` selects the connector; the other keys are that connector's options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Connector: `files`.
    #[serde(rename = "type")]
    pub kind: SourceKind,
    /// `files`: a file, a directory, or a glob (`data/orders/*.csv.gz`), relative to the
    /// project, or an object-store URL (`s3://bucket/prefix/*.csv`).
    #[serde(default)]
    pub path: String,
    /// `postgres`: the name of a connection in `weir.yaml`.
    #[serde(default)]
    pub connection: Option<String>,
    /// `postgres`: the table to read (`schema.table` or `table`).
    #[serde(default)]
    pub table: Option<String>,
    /// `postgres`: a query to read instead of a table.
    #[serde(default)]
    pub query: Option<String>,
    /// `postgres`: read incrementally by this column (e.g. `updated_at` or `id`); the
    /// highest value loaded is committed with the data.
    #[serde(default)]
    pub cursor: Option<String>,
    /// `postgres`: re-read this far behind the committed cursor, for rows committed late
    /// (`10m` for time cursors, a number for numeric ones). Needs a merge sink.
    #[serde(default)]
    pub lookback: Option<Lookback>,
    /// `postgres`: read in this many key ranges at once.
    #[serde(default)]
    pub partitions: Option<u32>,
    /// `postgres`: the integer column the ranges split (default: the primary key).
    #[serde(default)]
    pub partition_column: Option<String>,
    /// `postgres`: `error` (default) on a column type weir does not map, or `text` to read
    /// such columns as text.
    #[serde(default)]
    pub unsupported_types: UnsupportedTypes,
    /// `files`: `csv`, `ndjson` or `parquet`; guessed from the file extension when omitted.
    #[serde(default)]
    pub format: Option<FileFormat>,
    /// `files`: `auto` (from the extension), `none`, `gzip` or `zstd`.
    #[serde(default)]
    pub compression: Compression,
    /// `files`: CSV options.
    #[serde(default)]
    pub csv: CsvOptions,
    /// Declared columns. Declared types win over inference; values that do not cast are
    /// quarantined. Undeclared columns in the input are kept with inferred types.
    #[serde(default)]
    pub schema: Vec<ColumnSpec>,
    /// `files`: load only files not loaded before (the loaded set is committed with the data).
    #[serde(default = "yes")]
    pub incremental: bool,
    /// Rows per batch handed to the sink.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
}

fn yes() -> bool {
    true
}
fn default_batch_rows() -> usize {
    65_536
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Files,
    Postgres,
    /// A table of this project's lake (to load it into a database, for instance).
    Lake,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Files => "files",
            SourceKind::Postgres => "postgres",
            SourceKind::Lake => "lake",
        })
    }
}

/// What to do with a column type weir does not map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnsupportedTypes {
    #[default]
    Error,
    Text,
}

/// How far behind the committed cursor a read starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookback {
    /// For time cursors.
    Duration(Duration),
    /// For numeric cursors.
    Amount(i64),
}

impl<'de> Deserialize<'de> for Lookback {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Amount(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Amount(n) => Ok(Lookback::Amount(n)),
            Raw::Text(t) => humantime::parse_duration(&t)
                .map(Lookback::Duration)
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "lookback `{t}`: {e} (write a duration like `10m` or a number)"
                    ))
                }),
        }
    }
}

/// A named connection in `weir.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// `postgres`.
    #[serde(rename = "type")]
    pub kind: ConnectionKind,
    /// A URL (`postgresql://user:password@host:5432/db`) instead of the separate keys.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub database: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// Write `${env:NAME}`: the value is then redacted from all output.
    #[serde(default)]
    pub password: Option<String>,
    /// `disable`, `prefer` (default) or `require`.
    #[serde(default)]
    pub sslmode: SslMode,
    /// How long to wait for a connection (default 10s).
    #[serde(default, with = "duration_opt")]
    pub connect_timeout: Option<Duration>,
    /// At most this many assets of one run use this connection at once (default: no limit).
    #[serde(default)]
    pub max_concurrency: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionKind {
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
}

/// An optional duration written as `10s`, `5m`, `1d`.
pub(crate) mod duration_opt {
    use serde::Deserialize;
    use std::time::Duration;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    Csv,
    Ndjson,
    Parquet,
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileFormat::Csv => "csv",
            FileFormat::Ndjson => "ndjson",
            FileFormat::Parquet => "parquet",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    Auto,
    None,
    Gzip,
    Zstd,
}

/// CSV dialect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    /// The first line names the columns.
    #[serde(default = "yes")]
    pub header: bool,
    /// Field separator, one character.
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    /// Quote character, one character.
    #[serde(default = "default_quote")]
    pub quote: char,
    /// Field values read as NULL.
    #[serde(default = "default_nulls")]
    pub null_values: Vec<String>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            header: true,
            delimiter: default_delimiter(),
            quote: default_quote(),
            null_values: default_nulls(),
        }
    }
}

fn default_delimiter() -> char {
    ','
}
fn default_quote() -> char {
    '"'
}
fn default_nulls() -> Vec<String> {
    vec![String::new()]
}

/// A declared column.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// Column name as it appears in the input.
    pub name: String,
    /// SQL type: `string`, `bigint`, `int`, `double`, `decimal(p,s)`, `boolean`, `date`,
    /// `timestamp`, `timestamptz`.
    #[serde(rename = "type")]
    pub data_type: String,
    /// Reject rows where the value is missing (they are quarantined).
    #[serde(default = "yes")]
    pub nullable: bool,
}

/// A sink: a lake table and how rows are written into it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// `delta` (default: a table in the lake) or `postgres`.
    #[serde(rename = "type", default)]
    pub kind: SinkKind,
    /// `postgres`: the name of a connection in `weir.yaml`.
    #[serde(default)]
    pub connection: Option<String>,
    /// Target table as `schema.table`, e.g. `raw.orders`.
    pub table: String,
    /// `append`, `overwrite`, `merge` (upsert on `key`), `replace_partitions`, or a slowly
    /// changing dimension keyed by `key`: `scd1`, `scd2`, `scd3` or `snapshot`.
    #[serde(default)]
    pub mode: WriteMode,
    /// Key columns for `merge`.
    #[serde(default)]
    pub key: Vec<String>,
    /// `merge`: a boolean column; rows where it is true delete the matching key.
    #[serde(default)]
    pub delete_flag: Option<String>,
    /// Partition columns of the table.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// `add_columns` (new input columns are added to the table) or `strict` (fail instead).
    #[serde(default)]
    pub schema_evolution: SchemaEvolution,
    /// SCD: columns whose changes make a new version (`scd2`) or whose previous value is
    /// kept (`scd3`); default: every column but the key.
    #[serde(default, deserialize_with = "de_string_or_list")]
    pub tracked: Vec<String>,
    /// SCD: the column with each change's time (source time); default: the load time.
    #[serde(default)]
    pub change_ts: Option<String>,
    /// SCD: what a deleted key leaves: `close` (default) or `marker`.
    #[serde(default)]
    pub deletes: Option<crate::DeleteMode>,
    /// SCD: name of the surrogate key column (default `sk`).
    #[serde(default)]
    pub surrogate_key: Option<String>,
    /// SCD: keep an "unknown" member row (surrogate key `-1`) for facts without a match.
    #[serde(default)]
    pub unknown_member: Option<bool>,
    /// SCD: a table or model whose keys the dimension must have; missing ones get an
    /// inferred row, filled in when the real row arrives.
    #[serde(default)]
    pub inferred_members: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    #[default]
    Delta,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    #[default]
    Append,
    Overwrite,
    Merge,
    ReplacePartitions,
    Scd1,
    Scd2,
    Scd3,
    Snapshot,
}

impl WriteMode {
    /// The kind of slowly changing dimension this mode keeps, if it is one.
    pub fn scd(self) -> Option<crate::ScdType> {
        match self {
            WriteMode::Scd1 => Some(crate::ScdType::Scd1),
            WriteMode::Scd2 => Some(crate::ScdType::Scd2),
            WriteMode::Scd3 => Some(crate::ScdType::Scd3),
            WriteMode::Snapshot => Some(crate::ScdType::Snapshot),
            _ => None,
        }
    }
}

impl fmt::Display for WriteMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WriteMode::Append => "append",
            WriteMode::Overwrite => "overwrite",
            WriteMode::Merge => "merge",
            WriteMode::ReplacePartitions => "replace_partitions",
            WriteMode::Scd1 => "scd1",
            WriteMode::Scd2 => "scd2",
            WriteMode::Scd3 => "scd3",
            WriteMode::Snapshot => "snapshot",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaEvolution {
    #[default]
    AddColumns,
    Strict,
}

/// The bad-row budget of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BadRowLimit {
    Count(u64),
    /// A share of rows read, 0.0..=1.0.
    Ratio(f64),
}

impl BadRowLimit {
    /// Whether `bad` malformed rows out of `read` exceed the budget.
    pub fn exceeded(&self, bad: u64, read: u64) -> bool {
        match *self {
            BadRowLimit::Count(max) => bad > max,
            BadRowLimit::Ratio(max) => read > 0 && (bad as f64 / read as f64) > max,
        }
    }
}

impl fmt::Display for BadRowLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadRowLimit::Count(n) => write!(f, "{n}"),
            BadRowLimit::Ratio(r) => write!(f, "{}%", r * 100.0),
        }
    }
}

impl<'de> Deserialize<'de> for BadRowLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(BadRowLimit::Count(n)),
            Raw::Text(t) => {
                let bad = || {
                    serde::de::Error::custom(format!(
                        "invalid max_bad_rows `{t}`; write a count (`100`) or a percentage (`\"0.5%\"`)"
                    ))
                };
                if let Some(p) = t.trim().strip_suffix('%') {
                    let pct: f64 = p.trim().parse().map_err(|_| bad())?;
                    if !(0.0..=100.0).contains(&pct) {
                        return Err(bad());
                    }
                    Ok(BadRowLimit::Ratio(pct / 100.0))
                } else {
                    t.trim().parse().map(BadRowLimit::Count).map_err(|_| bad())
                }
            }
        }
    }
}

/// `models/**/*.yaml`: properties for models.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPropertiesFile {
    /// One entry per model.
    #[serde(default)]
    pub models: Vec<ModelProperties>,
}

/// Properties of one model; the same keys as `config(...)` in its SQL, which wins.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelProperties {
    /// Model name (the `.sql` file name without extension).
    pub name: String,
    /// What the model means, for people.
    #[serde(default)]
    pub description: Option<String>,
    /// Tags for selection.
    #[serde(default)]
    pub tags: Vec<String>,
    /// `table`, `incremental` or `view`.
    #[serde(default)]
    pub materialized: Option<Materialized>,
    /// Key columns: an incremental model with a key merges on it.
    #[serde(default, deserialize_with = "de_string_or_list")]
    pub unique_key: Vec<String>,
    /// Partition columns of the model's table.
    #[serde(default, deserialize_with = "de_string_or_list")]
    pub partition_by: Vec<String>,
    /// Incremental strategy: `append`, `merge` (default with a key) or `replace_partitions`.
    #[serde(default)]
    pub incremental_strategy: Option<WriteMode>,
    /// Schema (overrides the folder and the project default).
    #[serde(default)]
    pub schema: Option<String>,
    /// SCD: a boolean column; rows where it is true delete their key.
    #[serde(default)]
    pub delete_flag: Option<String>,
    /// SCD: columns whose changes make a new version (`scd2`) or whose previous value is
    /// kept (`scd3`); default: every column but the key.
    #[serde(default, deserialize_with = "de_string_or_list")]
    pub tracked: Vec<String>,
    /// SCD: the column with each change's time (source time); default: the load time.
    #[serde(default)]
    pub change_ts: Option<String>,
    /// SCD: what a deleted key leaves: `close` (default) or `marker`.
    #[serde(default)]
    pub deletes: Option<crate::DeleteMode>,
    /// SCD: name of the surrogate key column (default `sk`).
    #[serde(default)]
    pub surrogate_key: Option<String>,
    /// SCD: keep an "unknown" member row (surrogate key `-1`) for facts without a match.
    #[serde(default)]
    pub unknown_member: Option<bool>,
    /// SCD: a table or model whose keys the dimension must have; missing ones get an
    /// inferred row, filled in when the real row arrives.
    #[serde(default)]
    pub inferred_members: Option<String>,
    /// Data quality checks on the model's table (`weir test`).
    #[serde(default)]
    pub checks: Vec<crate::checks::CheckSpec>,
    /// Partitions of the model's output: each is built on its own (`weir backfill`), and
    /// a run replaces only its partition's rows.
    #[serde(default)]
    pub partitions: Option<crate::PartitionsConfig>,
    /// The model must have succeeded within this long (e.g. `26h`); a miss shows in
    /// `weir status` and is sent to `alerts.webhook` by `weir serve`.
    #[serde(default, with = "duration_opt")]
    pub freshness_sla: Option<Duration>,
    /// Retry policy for this model; defaults to the project's.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// One attempt fails (and may be retried) when it takes longer than this, e.g. `30m`.
    #[serde(default, with = "duration_opt")]
    pub timeout: Option<Duration>,
}

impl ModelProperties {
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            materialized: self.materialized,
            unique_key: self.unique_key.clone(),
            partition_by: self.partition_by.clone(),
            incremental_strategy: self.incremental_strategy,
            schema: self.schema.clone(),
            delete_flag: self.delete_flag.clone(),
            tracked: self.tracked.clone(),
            change_ts: self.change_ts.clone(),
            deletes: self.deletes,
            surrogate_key: self.surrogate_key.clone(),
            unknown_member: self.unknown_member,
            inferred_members: self.inferred_members.clone(),
        }
    }
}

/// Model configuration (from `config(...)` in SQL or a properties file).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `table`, `incremental` or `view`.
    #[serde(default)]
    pub materialized: Option<Materialized>,
    /// Key columns: an incremental model with a key merges on it.
    #[serde(default, deserialize_with = "de_string_or_list")]
    pub unique_key: Vec<String>,
    /// Partition columns of the model's table.
    #[serde(default, deserialize_with = "de_string_or_list")]
    pub partition_by: Vec<String>,
    /// Incremental strategy: `append`, `merge` (default with a key) or `replace_partitions`.
    #[serde(default)]
    pub incremental_strategy: Option<WriteMode>,
    /// Schema (overrides the folder and the project default).
    #[serde(default)]
    pub schema: Option<String>,
    /// SCD: a boolean column; rows where it is true delete their key.
    #[serde(default)]
    pub delete_flag: Option<String>,
    /// SCD: columns whose changes make a new version (`scd2`) or whose previous value is
    /// kept (`scd3`); default: every column but the key.
    #[serde(default, deserialize_with = "de_string_or_list")]
    pub tracked: Vec<String>,
    /// SCD: the column with each change's time (source time); default: the load time.
    #[serde(default)]
    pub change_ts: Option<String>,
    /// SCD: what a deleted key leaves: `close` (default) or `marker`.
    #[serde(default)]
    pub deletes: Option<crate::DeleteMode>,
    /// SCD: name of the surrogate key column (default `sk`).
    #[serde(default)]
    pub surrogate_key: Option<String>,
    /// SCD: keep an "unknown" member row (surrogate key `-1`) for facts without a match.
    #[serde(default)]
    pub unknown_member: Option<bool>,
    /// SCD: a table or model whose keys the dimension must have; missing ones get an
    /// inferred row, filled in when the real row arrives.
    #[serde(default)]
    pub inferred_members: Option<String>,
}

impl ModelConfig {
    /// The dimension a `scd1`/`scd2`/`scd3`/`snapshot` model keeps.
    pub fn dimension(&self, mat: Materialized) -> Option<crate::Dimension> {
        mat.scd().map(|scd| self.dimension_of(scd))
    }

    fn dimension_of(&self, scd: crate::ScdType) -> crate::Dimension {
        crate::Dimension {
            scd,
            key: self.unique_key.clone(),
            tracked: self.tracked.clone(),
            change_ts: self.change_ts.clone(),
            deletes: self.deletes.unwrap_or_default(),
            delete_flag: self.delete_flag.clone(),
            surrogate_key: self
                .surrogate_key
                .clone()
                .unwrap_or_else(|| crate::DEFAULT_SURROGATE_KEY.into()),
            unknown_member: self.unknown_member.unwrap_or(false),
            inferred_members: self.inferred_members.clone(),
        }
    }
}

impl SinkConfig {
    /// The dimension a sink with mode `scd1`/`scd2`/`scd3`/`snapshot` keeps: the same
    /// options as a model's, with `key` for `unique_key`.
    pub fn dimension(&self) -> Option<crate::Dimension> {
        let options = ModelConfig {
            unique_key: self.key.clone(),
            tracked: self.tracked.clone(),
            change_ts: self.change_ts.clone(),
            deletes: self.deletes,
            delete_flag: self.delete_flag.clone(),
            surrogate_key: self.surrogate_key.clone(),
            unknown_member: self.unknown_member,
            inferred_members: self.inferred_members.clone(),
            ..Default::default()
        };
        self.mode.scd().map(|scd| options.dimension_of(scd))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Materialized {
    #[default]
    Table,
    Incremental,
    View,
    Scd1,
    Scd2,
    Scd3,
    Snapshot,
}

impl Materialized {
    /// The kind of slowly changing dimension this materialization keeps, if it is one.
    pub fn scd(self) -> Option<crate::ScdType> {
        match self {
            Materialized::Scd1 => Some(crate::ScdType::Scd1),
            Materialized::Scd2 => Some(crate::ScdType::Scd2),
            Materialized::Scd3 => Some(crate::ScdType::Scd3),
            Materialized::Snapshot => Some(crate::ScdType::Snapshot),
            _ => None,
        }
    }
}

impl fmt::Display for Materialized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Materialized::Table => "table",
            Materialized::Incremental => "incremental",
            Materialized::View => "view",
            Materialized::Scd1 => "scd1",
            Materialized::Scd2 => "scd2",
            Materialized::Scd3 => "scd3",
            Materialized::Snapshot => "snapshot",
        })
    }
}

fn de_string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) => vec![s],
        Raw::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_row_limits() {
        assert!(BadRowLimit::Count(2).exceeded(3, 100));
        assert!(!BadRowLimit::Count(2).exceeded(2, 100));
        assert!(BadRowLimit::Ratio(0.01).exceeded(2, 100));
        assert!(!BadRowLimit::Ratio(0.01).exceeded(1, 100));
        assert!(!BadRowLimit::Ratio(0.01).exceeded(0, 0));
    }
}

impl crate::yaml::ConfigKeys for ProjectConfig {
    const DEFERRED_ENV: Option<&'static str> = Some("connections");
    const KEYS: &'static [&'static str] = &[
        "name",
        "lake",
        "lake_options",
        "vars",
        "models",
        "retry",
        "connections",
        "state",
        "concurrency",
        "schedules",
        "sensors",
        "alerts",
        "maintenance",
        "alerts.webhook",
        "state.connection",
        "state.path",
        "state.lease",
        "models.schema",
        "models.materialized",
        "retry.max_attempts",
        "retry.initial_backoff",
        "retry.max_backoff",
    ];
}

impl crate::yaml::ConfigKeys for PipelineConfig {
    const KEYS: &'static [&'static str] = &[
        "name",
        "description",
        "tags",
        "source",
        "transform",
        "sink",
        "max_bad_rows",
        "retry",
        "timeout",
        "schedule",
        "freshness_sla",
        "checks",
        "partitions",
        "partitions.every",
        "partitions.start",
        "partitions.values",
        "partitions.column",
        "schedule.name",
        "schedule.cron",
        "schedule.timezone",
        "schedule.select",
        "schedule.on_missed",
        "source.type",
        "source.path",
        "source.format",
        "source.compression",
        "source.csv",
        "source.schema",
        "source.incremental",
        "source.batch_rows",
        "source.connection",
        "source.table",
        "source.query",
        "source.cursor",
        "source.lookback",
        "source.partitions",
        "source.partition_column",
        "source.unsupported_types",
        "source.csv.header",
        "source.csv.delimiter",
        "source.csv.quote",
        "source.csv.null_values",
        "sink.type",
        "sink.connection",
        "sink.table",
        "sink.mode",
        "sink.key",
        "sink.delete_flag",
        "sink.partition_by",
        "sink.schema_evolution",
        "sink.tracked",
        "sink.change_ts",
        "sink.deletes",
        "sink.surrogate_key",
        "sink.unknown_member",
        "sink.inferred_members",
        "retry.max_attempts",
        "retry.initial_backoff",
        "retry.max_backoff",
    ];
}

impl crate::yaml::ConfigKeys for ModelPropertiesFile {
    const KEYS: &'static [&'static str] = &["models"];
}

#[cfg(test)]
mod key_tests {
    use super::*;
    use crate::yaml::{parse_yaml, ConfigKeys};
    use std::path::Path;

    /// The keys serde accepts in `section` of a document, read from the hint of an error
    /// about an unknown key planted there.
    fn accepted<T: serde::de::DeserializeOwned + ConfigKeys + std::fmt::Debug>(
        base: &str,
        section: &str,
    ) -> Vec<String> {
        let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(base).unwrap();
        let mut node = &mut doc;
        for part in section.split('.').filter(|p| !p.is_empty()) {
            let map = node.as_mapping_mut().unwrap();
            if !map.contains_key(part) {
                map.insert(part.into(), serde_yaml_ng::Mapping::new().into());
            }
            node = map.get_mut(part).unwrap();
        }
        node.as_mapping_mut()
            .unwrap()
            .insert("qqqqqqqqqq".into(), 1.into());
        let text = serde_yaml_ng::to_string(&doc).unwrap();
        let err = parse_yaml::<T>(Path::new("x.yaml"), &text).unwrap_err();
        let hint = err.hint.unwrap_or_default();
        let list = hint.rsplit("valid keys here: ").next().unwrap_or_default();
        let mut keys: Vec<String> = list.split(", ").map(str::to_string).collect();
        keys.sort();
        keys
    }

    fn listed(keys: &[&str], section: &str) -> Vec<String> {
        let mut out: Vec<String> = keys
            .iter()
            .filter_map(|k| {
                let (parent, last) = k.rsplit_once('.').unwrap_or(("", k));
                (parent == section).then(|| last.to_string())
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn key_lists_match_what_the_parser_accepts() {
        let pipe = "source: {type: files, path: x.csv}\nsink: {table: raw.x}\n";
        for section in ["", "source", "source.csv", "sink", "retry", "schedule"] {
            assert_eq!(
                accepted::<PipelineConfig>(pipe, section),
                listed(PipelineConfig::KEYS, section),
                "pipeline section `{section}`"
            );
        }
        for section in ["", "models", "retry", "state", "alerts"] {
            assert_eq!(
                accepted::<ProjectConfig>("name: p\n", section),
                listed(ProjectConfig::KEYS, section),
                "project section `{section}`"
            );
        }
    }

    #[test]
    fn cdc_key_lists_match_and_bad_jobs_are_refused_with_their_file() {
        let base = "source: {type: postgres_cdc, connection: db, tables: [t]}\nsink: {schema: m}\n";
        for section in ["", "source", "sink", "snapshot", "batch", "lag_limit"] {
            assert_eq!(
                accepted::<crate::CdcConfig>(base, section),
                listed(crate::CdcConfig::KEYS, section),
                "cdc section `{section}`"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("cdc")).unwrap();
        std::fs::write(
            d.join("weir.yaml"),
            "name: p\nconnections:\n  app_db:\n    type: postgres\n    host: localhost\n",
        )
        .unwrap();
        let load = |text: &str| {
            std::fs::write(d.join("cdc/app.yaml"), text).unwrap();
            crate::load_project(d)
        };
        let err = load(
            "source: {type: postgres_cdc, connection: app_bd, tables: [t]}\nsink: {schema: m}\n",
        )
        .unwrap_err();
        assert!(
            err.message.contains("cdc/app.yaml") && err.message.contains("app_bd"),
            "{err:?}"
        );
        assert_eq!(err.hint.as_deref(), Some("did you mean `app_db`?"));
        let err = load("source: {type: postgres_cdc, connection: app_db, tables: [t], slot: Bad-Slot}\nsink: {schema: m}\n")
            .unwrap_err();
        assert!(err.message.contains("Bad-Slot"), "{err:?}");
        let err = load("source: {type: postgres_cdc, connection: app_db, tables: [a.t, b.t]}\nsink: {schema: m}\n")
            .unwrap_err();
        assert!(
            err.message.contains("would both be mirrored in `m.t`"),
            "{err:?}"
        );
        let err = load("source: {type: postgres_cdc, connection: app_db, tables: [t]}\nsink: {schema: m, changelog: true}\n")
            .unwrap_err();
        assert!(err.message.contains("cdc/app.yaml:2"), "{err:?}");
        assert!(
            err.hint.as_deref().unwrap_or("").contains("change_log"),
            "{err:?}"
        );
        let p = load(
            "source: {type: postgres_cdc, connection: app_db, tables: [t]}\nsink: {schema: m}\n",
        )
        .unwrap();
        assert_eq!(p.cdc[0].slot(), "weir_app");
        assert_eq!(p.cdc[0].mirror("T"), "m.t");
    }

    #[test]
    fn a_key_in_the_wrong_section_points_to_its_place() {
        let text =
            "source:\n  type: files\n  path: x.csv\n  delimeter: ';'\nsink:\n  table: raw.x\n";
        let err = parse_yaml::<PipelineConfig>(Path::new("p.yaml"), text).unwrap_err();
        assert_eq!(
            err.message,
            "unknown key `delimeter` in `source` in p.yaml:4:3"
        );
        assert!(
            err.hint
                .as_deref()
                .unwrap()
                .starts_with("did you mean `source.csv.delimiter`? it belongs in another section"),
            "{:?}",
            err.hint
        );
        let text = "source:\n  type: files\n  path: x.csv\nsink:\n  table: raw.x\nmode: merge\n";
        let err = parse_yaml::<PipelineConfig>(Path::new("p.yaml"), text).unwrap_err();
        assert!(
            err.hint
                .as_deref()
                .unwrap()
                .starts_with("did you mean `sink.mode`?"),
            "{:?}",
            err.hint
        );
    }
}
