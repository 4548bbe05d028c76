//! The typed project spec and its loader.
//!
//! A project is a directory holding `weir.yaml`, `pipelines/*.yaml` and `models/**/*.sql`
//! (with optional `models/**/*.yaml` property files). Loading is strict: an unknown key is an
//! error naming the file, line, key and the closest valid key, because a misspelled option
//! that is silently ignored is the most expensive kind of bug in a data pipeline.
//!
//! `${env:VAR}` is substituted in the raw text before parsing; every substituted value is
//! registered as a secret so it is redacted from everything weir prints.

mod cdc;
mod checks;
mod dimension;
mod load;
mod maintenance;
mod partition;
mod schedule;
mod spec;
mod stream;
mod yaml;

pub use cdc::{
    Cdc, CdcBatchConfig, CdcConfig, CdcSinkConfig, CdcSourceConfig, CdcSourceKind, LagLimit,
    SnapshotConfig, SnapshotMode,
};
pub use checks::{CheckKind, CheckSpec, OnFail, SchemaCheckMode, Severity};
pub use dimension::{DeleteMode, Dimension, ScdType, DEFAULT_SURROGATE_KEY, UNKNOWN_MEMBER};
pub use load::{load_project, validate_table_name, ModelFile, Pipeline, Project};
pub use maintenance::{
    parse_size, table_matches, MaintenancePolicy, OptimizePolicy, RetentionPolicy, TieringPolicy,
    VacuumPolicy,
};
pub use partition::{mentions_partition, PartitionEvery, PartitionWindow, PartitionsConfig};
pub use schedule::{CronExpr, OnMissed, ScheduleConfig, SensorConfig, TimeZone};
pub use spec::*;
pub use stream::{
    AvroConfig, AvroFraming, Delivery, EventTimeConfig, FlushConfig, KafkaSinkConfig,
    KafkaSourceConfig, OnIncompatible, PayloadFormat, SinkFormat, StartAt, Stream, StreamConfig,
    StreamSinkConfig, StreamSourceKind,
};
pub use yaml::{closest, interpolate_env, parse_yaml, ConfigKeys};
