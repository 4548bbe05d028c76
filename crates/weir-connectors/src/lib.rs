//! Built-in sources, one folder per system, and the registry that maps a config `type:` to
//! an implementation. A new connector is one folder plus one line in [`source_for`].

pub mod avro;
pub mod files;
pub mod kafka;
pub mod kafka_sink;
pub mod postgres;
pub mod types;

use std::sync::Arc;

use arrow::datatypes::SchemaRef;

use weir_common::Error;
use weir_config::{Project, SourceConfig, SourceKind};
use weir_core::Source;

/// The explicit registry: config `type:` to source.
/// `hints` is the target table's schema, when it exists: columns the config does not
/// declare keep the types earlier loads gave them. With `sequence`, batches carry
/// [`weir_core::SEQ_COLUMN`], the rows' input order.
pub fn source_for(
    project: &Project,
    config: &SourceConfig,
    hints: Option<SchemaRef>,
    sequence: bool,
) -> Result<Arc<dyn Source>, Error> {
    match config.kind {
        SourceKind::Files => Ok(Arc::new(
            files::FilesSource::new(config.clone(), &project.root)?
                .with_type_hints(hints)
                .with_sequence(sequence),
        )),
        SourceKind::Lake => Err(Error::internal(
            "lake sources are read by the orchestrator, not a connector",
        )),
        SourceKind::Postgres => {
            let name = config.connection.clone().unwrap_or_default();
            let conn = project.config.connections.get(&name).ok_or_else(|| {
                Error::user(format!("unknown connection `{name}`"))
                    .with_hint("add it under `connections:` in weir.yaml")
            })?;
            Ok(Arc::new(postgres::PostgresSource::new(
                config.clone(),
                &name,
                conn.clone(),
            )))
        }
    }
}
