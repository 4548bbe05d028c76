//! Change data capture jobs (`cdc/*.yaml`): PostgreSQL tables mirrored into lake tables
//! from logical replication, exactly once.

use std::time::Duration;

use serde::Deserialize;

/// One `cdc/NAME.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcConfig {
    /// Job name; defaults to the file name without `.yaml`.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub source: CdcSourceConfig,
    pub sink: CdcSinkConfig,
    /// How the tables' existing rows are read before their changes are applied.
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    /// When read changes are applied (one Delta commit per table per batch).
    #[serde(default)]
    pub batch: CdcBatchConfig,
    /// With no captured change for this long, the slot is moved up to the server's
    /// current WAL position (recorded in the lake first), so a quiet table does not make
    /// the server keep WAL for other databases' or tables' writes.
    #[serde(
        default = "default_heartbeat",
        deserialize_with = "crate::spec::de_duration"
    )]
    pub heartbeat: Duration,
    /// Lag past which `weir cdc status` reports the job as lagging (and exits non-zero):
    /// WAL the slot holds back, and how old the oldest unapplied commit is.
    #[serde(default)]
    pub lag_limit: LagLimit,
}

/// A PostgreSQL database's tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcSourceConfig {
    /// `postgres_cdc`.
    #[serde(rename = "type")]
    pub kind: CdcSourceKind,
    /// A connection of `weir.yaml` (the user needs the REPLICATION attribute, and the
    /// server `wal_level = logical`).
    pub connection: String,
    /// `schema.table` (or `table`, in `public`). Each needs a primary key (or a replica
    /// identity index).
    pub tables: Vec<String>,
    /// The replication slot; default `weir_<job>`. Created if missing on the first run.
    #[serde(default)]
    pub slot: Option<String>,
    /// The publication; default `weir_<job>`. Created (for `tables`) if missing.
    #[serde(default)]
    pub publication: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CdcSourceKind {
    PostgresCdc,
}

/// Where the mirrors go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcSinkConfig {
    /// The lake schema of the mirror tables: source table `public.orders` is mirrored
    /// in `<schema>.orders`.
    pub schema: String,
    /// Also append every change to `<schema>.<table>__changes`: operation, LSN, commit
    /// time, transaction id, the row after (before, for deletes) and the old key or row.
    #[serde(default)]
    pub change_log: bool,
    /// Also keep the type 2 history of every row in `<schema>.<table>__history`
    /// (`valid_from`, `valid_to`, `is_current`... from source commit times), built by the
    /// dimension writer.
    #[serde(default)]
    pub history: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// `initial` (default): copy each table's rows first, consistent with the slot;
    /// `never`: only apply changes from the slot's start.
    #[serde(default)]
    pub mode: SnapshotMode,
    /// Rows per snapshot commit: an interrupted snapshot resumes after the last chunk.
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            mode: SnapshotMode::Initial,
            chunk_rows: default_chunk_rows(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    #[default]
    Initial,
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcBatchConfig {
    /// Row changes read per batch (whole source transactions: a bigger one is taken whole).
    #[serde(default = "default_max_changes")]
    pub max_changes: usize,
    /// How often the slot is polled when it had nothing new.
    #[serde(
        default = "default_poll",
        deserialize_with = "crate::spec::de_duration"
    )]
    pub poll: Duration,
}

impl Default for CdcBatchConfig {
    fn default() -> Self {
        CdcBatchConfig {
            max_changes: default_max_changes(),
            poll: default_poll(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LagLimit {
    /// WAL bytes the slot may hold back (`1GiB`).
    #[serde(default, deserialize_with = "de_opt_size")]
    pub bytes: Option<u64>,
    /// Age of the oldest unapplied change (`5m`).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub time: Option<Duration>,
}

fn de_opt_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::Bytes(b)) => Ok(Some(b)),
        Some(Size::Text(t)) => crate::parse_size(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

fn de_opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(text) => humantime::parse_duration(&text).map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration `{text}` ({e}); write e.g. `30s`, `5m`"
            ))
        }),
    }
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(60)
}
fn default_chunk_rows() -> usize {
    100_000
}
fn default_max_changes() -> usize {
    100_000
}
fn default_poll() -> Duration {
    Duration::from_millis(200)
}

impl crate::yaml::ConfigKeys for CdcConfig {
    const KEYS: &'static [&'static str] = &[
        "name",
        "description",
        "source",
        "source.type",
        "source.connection",
        "source.tables",
        "source.slot",
        "source.publication",
        "sink",
        "sink.schema",
        "sink.change_log",
        "sink.history",
        "snapshot",
        "snapshot.mode",
        "snapshot.chunk_rows",
        "batch",
        "batch.max_changes",
        "batch.poll",
        "heartbeat",
        "lag_limit",
        "lag_limit.bytes",
        "lag_limit.time",
    ];
}

/// A CDC job with its resolved name and the file it came from.
#[derive(Debug, Clone)]
pub struct Cdc {
    pub name: String,
    pub file: std::path::PathBuf,
    pub config: CdcConfig,
}

impl Cdc {
    /// The replication slot: `source.slot`, else `weir_<job>` in lower case (slot names
    /// allow only lower-case letters, digits and `_`).
    pub fn slot(&self) -> String {
        self.config
            .source
            .slot
            .clone()
            .unwrap_or_else(|| format!("weir_{}", self.name.to_lowercase()))
    }
    pub fn publication(&self) -> String {
        self.config
            .source
            .publication
            .clone()
            .unwrap_or_else(|| format!("weir_{}", self.name))
    }
    /// `(schema, table)` of each source table.
    pub fn source_tables(&self) -> Vec<(String, String)> {
        self.config
            .source
            .tables
            .iter()
            .map(|t| match t.split_once('.') {
                Some((s, t)) => (s.to_string(), t.to_string()),
                None => ("public".to_string(), t.clone()),
            })
            .collect()
    }
    /// The mirror of source table `table` (without its schema).
    pub fn mirror(&self, table: &str) -> String {
        format!("{}.{}", self.config.sink.schema, table.to_lowercase())
    }
}
