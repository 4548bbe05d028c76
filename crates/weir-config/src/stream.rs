//! Streams (`streams/*.yaml`): continuous jobs that read a Kafka topic and land its
//! records in a lake table, exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// One `streams/NAME.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Stream name; defaults to the file name without `.yaml`.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub source: KafkaSourceConfig,
    /// A continuous query over the source (read as the table `source.name`); without it
    /// the records land as they are. Windows: `TUMBLE(source, ts, INTERVAL '1' MINUTE)`,
    /// `HOP(source, ts, slide, size)`, `SESSION(source, ts, gap[, key...])` in FROM.
    #[serde(default)]
    pub sql: Option<String>,
    /// Where event time comes from, and how late a record may be.
    #[serde(default)]
    pub event_time: Option<EventTimeConfig>,
    pub sink: StreamSinkConfig,
    /// When buffered records are committed to the table.
    #[serde(default)]
    pub flush: FlushConfig,
    /// Bounds on the query's state (open windows, a join's kept rows).
    #[serde(default)]
    pub state: StateConfig,
}

/// The most memory a query's state may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Past it, the stream stops before committing (`1GiB`).
    #[serde(default = "default_state_bytes", deserialize_with = "de_size")]
    pub max_bytes: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            max_bytes: default_state_bytes(),
        }
    }
}

fn default_state_bytes() -> u64 {
    1 << 30
}

/// A Kafka topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// `kafka`.
    #[serde(rename = "type")]
    pub kind: StreamSourceKind,
    /// `host:port[,host:port...]` (kafka).
    #[serde(default)]
    pub brokers: String,
    /// The topic (kafka).
    #[serde(default)]
    pub topic: String,
    /// The file (`type: file`), relative to the project: one record per line, read to its
    /// end (a replay or backfill through the stream's query).
    #[serde(default)]
    pub path: Option<String>,
    /// The consumer group; default `weir-<stream>`. Offsets are committed to it after each
    /// table commit (for monitoring tools); weir itself resumes from the table.
    #[serde(default)]
    pub group: Option<String>,
    /// How record values are decoded: `json` (one object per record; its fields become
    /// columns) or `raw` (the value as text in `value`).
    #[serde(default)]
    pub format: PayloadFormat,
    /// With `format: avro`: the schema registry or schema file.
    #[serde(default)]
    pub avro: Option<AvroConfig>,
    /// Where a partition starts when the table has no position for it.
    #[serde(default)]
    pub start: StartAt,
    /// The name the query reads the records by (with `sql`); default `source`.
    #[serde(default)]
    pub name: Option<String>,
    /// The fields of each record (with `sql`): only these become columns, with these
    /// types; a record whose field does not fit is quarantined or stops the stream
    /// (`sink.on_incompatible`), one missing a field that is not nullable is quarantined.
    #[serde(default)]
    pub columns: Vec<crate::ColumnSpec>,
    /// librdkafka settings passed through, e.g. `security.protocol: SASL_SSL`,
    /// `sasl.mechanism: SCRAM-SHA-512`, `sasl.username`, `sasl.password`, `ssl.ca.location`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamSourceKind {
    Kafka,
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    #[default]
    Json,
    Raw,
    /// Avro: see `source.avro`.
    Avro,
}

/// Where Avro records' schemas come from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvroConfig {
    /// A Confluent-compatible schema registry (`http://host:8081`, credentials as
    /// `https://user:password@host`): each record's schema id is looked up there.
    #[serde(default)]
    pub registry: Option<String>,
    /// An Avro schema file (`.avsc`, relative to the project). With a registry, it is the
    /// reader schema every record is resolved to; without one, it is the schema of every
    /// record.
    #[serde(default)]
    pub schema_file: Option<String>,
    /// `confluent` (default): a zero byte and a 4-byte schema id precede each value.
    /// `none`: values are bare Avro bodies of `schema_file`'s schema.
    #[serde(default)]
    pub framing: AvroFraming,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AvroFraming {
    #[default]
    Confluent,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    #[default]
    Earliest,
    Latest,
}

/// Event time: a column of the records, and the watermark that trails it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeConfig {
    /// A `timestamp`/`timestamptz` column, or a `bigint` of epoch milliseconds
    /// (`_kafka_timestamp` is the record's own time).
    pub column: String,
    /// How far behind the newest event time (per partition) the watermark stays: a record
    /// older than its partition's watermark is late and goes to the quarantine table.
    #[serde(default = "no_delay", deserialize_with = "crate::spec::de_duration")]
    pub allowed_delay: Duration,
    /// A partition that delivers nothing for this long stops holding the watermark back
    /// (an empty or quiet partition would otherwise keep every window open).
    #[serde(
        default = "default_idle",
        deserialize_with = "crate::spec::de_duration"
    )]
    pub idle_timeout: Duration,
}

fn default_idle() -> Duration {
    Duration::from_secs(60)
}

fn no_delay() -> Duration {
    Duration::ZERO
}

/// The table records land in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSinkConfig {
    /// `schema.table`.
    pub table: String,
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// The columns that identify a row: each commit updates the table's row with the
    /// same key (and inserts the others) instead of appending. A SQL stream may then
    /// aggregate without a window (a running result).
    #[serde(default)]
    pub key: Vec<String>,
    /// A field the table does not have yet: `add_columns` (default) adds it; `strict`
    /// stops the stream instead.
    #[serde(default)]
    pub schema_evolution: crate::SchemaEvolution,
    /// A field whose value does not fit its column (a string where the table has a
    /// number): `stop` (default) stops the stream before committing anything of the
    /// batch; `quarantine` sets the record aside and goes on.
    #[serde(default)]
    pub on_incompatible: OnIncompatible,
    /// Also publish each commit's rows to a Kafka topic, exactly once (transactions).
    #[serde(default)]
    pub kafka: Option<KafkaSinkConfig>,
}

/// A Kafka topic a stream's committed rows are published to, one JSON record per row.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    pub topic: String,
    /// `host:port[,...]`; default the source's brokers.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Columns whose values make each record's key: one column's value as text, several
    /// as a JSON object. Without a key, records are spread over partitions.
    #[serde(default)]
    pub key: Vec<String>,
    /// `json` (default) or `avro`: Avro in the Confluent wire format, its schema (made from
    /// the rows' columns) registered under `<topic>-value` in `registry`.
    #[serde(default)]
    pub format: SinkFormat,
    /// A Confluent-compatible schema registry (with `format: avro`).
    #[serde(default)]
    pub registry: Option<String>,
    /// `exactly_once` (default): each commit's rows in one Kafka transaction, with the
    /// record of what was published; readers use `isolation.level=read_committed`.
    /// `at_least_once`: no transactions (for brokers without them); a crash between
    /// sending a commit's rows and recording them sends that commit's rows again.
    #[serde(default)]
    pub delivery: Delivery,
    /// librdkafka producer settings passed through (SASL/TLS, compression, ...).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkFormat {
    #[default]
    Json,
    Avro,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    #[default]
    ExactlyOnce,
    AtLeastOnce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnIncompatible {
    #[default]
    Stop,
    Quarantine,
}

/// A flush commits what is buffered when either limit is reached.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlushConfig {
    /// Records per commit.
    #[serde(default = "default_rows")]
    pub rows: usize,
    /// Bytes of record values per commit (`64MiB`); bounds the buffer's memory.
    #[serde(default = "default_bytes", deserialize_with = "de_size")]
    pub bytes: u64,
    /// The longest a record waits before it is committed.
    #[serde(
        default = "default_interval",
        deserialize_with = "crate::spec::de_duration"
    )]
    pub interval: Duration,
}

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig {
            rows: default_rows(),
            bytes: default_bytes(),
            interval: default_interval(),
        }
    }
}

fn default_rows() -> usize {
    100_000
}
fn default_bytes() -> u64 {
    64 << 20
}
fn default_interval() -> Duration {
    Duration::from_secs(10)
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(b) => Ok(b),
        Size::Text(t) => crate::parse_size(&t).map_err(serde::de::Error::custom),
    }
}

impl crate::yaml::ConfigKeys for StreamConfig {
    const KEYS: &'static [&'static str] = &[
        "name",
        "description",
        "source",
        "sql",
        "event_time",
        "event_time.column",
        "event_time.allowed_delay",
        "event_time.idle_timeout",
        "sink",
        "flush",
        "source.type",
        "source.brokers",
        "source.path",
        "source.topic",
        "source.group",
        "source.format",
        "source.start",
        "source.options",
        "source.name",
        "source.avro",
        "source.avro.registry",
        "source.avro.schema_file",
        "source.avro.framing",
        "source.columns",
        "source.columns.name",
        "source.columns.type",
        "source.columns.nullable",
        "sink.table",
        "sink.partition_by",
        "sink.key",
        "sink.schema_evolution",
        "sink.on_incompatible",
        "sink.kafka",
        "sink.kafka.topic",
        "sink.kafka.brokers",
        "sink.kafka.key",
        "sink.kafka.delivery",
        "sink.kafka.format",
        "sink.kafka.registry",
        "sink.kafka.options",
        "flush.rows",
        "flush.bytes",
        "flush.interval",
        "state",
        "state.max_bytes",
    ];
}

/// A stream with its resolved name and the file it came from.
#[derive(Debug, Clone)]
pub struct Stream {
    pub name: String,
    pub file: std::path::PathBuf,
    pub config: StreamConfig,
}
