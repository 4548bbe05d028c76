//! The `files` source: CSV, NDJSON and Parquet from a file, a directory or a glob, on local
//! disk or an object store, optionally gzip- or zstd-compressed.
//!
//! Reading is two passes over the planned files, the first one cheap:
//!
//! 1. **plan**: list the files, drop those already loaded (the committed position holds the
//!    loaded set), sample the first rows of each new file and settle one schema for the run
//!    (declared types win, then the target table's existing types, then inference);
//! 2. **read**: parse each file into string columns, cast them to the settled schema in
//!    bulk, and route every row that fails (wrong field count, invalid UTF-8, a value that
//!    does not cast, a missing required value) to the bad-row side output with its line and
//!    raw text. No row is dropped silently: `rows read == rows emitted + rows bad`.

mod decode;
mod infer;
mod list;
mod read;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{Field, SchemaRef};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use weir_common::Error;
use weir_config::{FileFormat, SourceConfig};
use weir_core::{Position, Progress, ReadPlan, Source, SourceEvent, SEQ_COLUMN};

pub use decode::normalize_column_name;
pub use list::FileEntry;

/// Rows sampled per file to infer types.
const SAMPLE_ROWS: usize = 2_000;

/// The position of a files source: the files loaded so far, by key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadedFiles {
    pub files: BTreeMap<String, LoadedFile>,
}

/// What was seen of a file when it was loaded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadedFile {
    pub size: u64,
}

pub struct FilesSource {
    config: SourceConfig,
    root: PathBuf,
    /// Existing target-table schema: types to keep for undeclared columns.
    hints: Option<SchemaRef>,
    /// Add [`SEQ_COLUMN`] to every batch.
    sequence: bool,
}

impl FilesSource {
    pub fn new(config: SourceConfig, root: &Path) -> Result<Self, Error> {
        for col in &config.schema {
            crate::types::parse_type(&col.data_type)?;
        }
        Ok(Self {
            config,
            root: root.to_path_buf(),
            hints: None,
            sequence: false,
        })
    }

    /// Types of an existing target table, used for columns the config does not declare so
    /// that later runs keep the types earlier runs chose.
    pub fn with_type_hints(mut self, schema: Option<SchemaRef>) -> Self {
        self.hints = schema;
        self
    }

    /// Adds [`SEQ_COLUMN`] to every row: the file's place in the load order (files sort by
    /// name) in the high bits, the line or row number in the low 40.
    pub fn with_sequence(mut self, on: bool) -> Self {
        self.sequence = on;
        self
    }

    fn format_of(&self, file: &FileEntry) -> Result<FileFormat, Error> {
        if let Some(f) = self.config.format {
            return Ok(f);
        }
        decode::guess_format(&file.key).ok_or_else(|| {
            Error::user(format!(
                "cannot tell the format of `{}` from its name",
                file.key
            ))
            .with_hint("set `format: csv`, `ndjson` or `parquet` on the source")
        })
    }
}

#[async_trait]
impl Source for FilesSource {
    async fn plan(&self, from: Option<&Position>) -> Result<ReadPlan, Error> {
        let loaded: LoadedFiles = match from {
            Some(p) if self.config.incremental => serde_json::from_value(p.0.clone())
                .map_err(|e| Error::internal(format!("unreadable files position: {e}")))?,
            _ => LoadedFiles::default(),
        };
        let all = list::list_files(&self.config.path, &self.root).await?;
        let new: Vec<FileEntry> = all
            .into_iter()
            .filter(|f| !loaded.files.contains_key(&f.key))
            .collect();

        // Settle the schema from samples of the new files.
        let declared = declared_fields(&self.config)?;
        let mut samples = Vec::new();
        for file in &new {
            let format = self.format_of(file)?;
            let sample = read::sample(file, format, &self.config, SAMPLE_ROWS).await?;
            samples.push(sample);
        }
        let mut schema = infer::settle_schema(&declared, self.hints.as_deref(), &samples);
        if self.sequence {
            let mut fields: Vec<Field> = schema
                .fields()
                .iter()
                .filter(|f| f.name() != SEQ_COLUMN)
                .map(|f| f.as_ref().clone())
                .collect();
            fields.push(Field::new(
                SEQ_COLUMN,
                arrow::datatypes::DataType::UInt64,
                false,
            ));
            schema = arrow::datatypes::Schema::new(fields);
        }

        let mut next = loaded.clone();
        for f in &new {
            next.files
                .insert(f.key.clone(), LoadedFile { size: f.size });
        }
        let next = Position(
            serde_json::to_value(&next).map_err(|e| Error::internal(format!("position: {e}")))?,
        );
        Ok(ReadPlan {
            units: new.iter().map(|f| f.key.clone()).collect(),
            next,
            schema: Arc::new(schema),
        })
    }

    async fn read(
        &self,
        plan: &ReadPlan,
        out: mpsc::Sender<SourceEvent>,
        progress: Arc<Progress>,
    ) -> Result<(), Error> {
        let all = list::list_files(&self.config.path, &self.root).await?;
        let data_schema = if self.sequence {
            let fields: Vec<_> = plan
                .schema
                .fields()
                .iter()
                .filter(|f| f.name() != SEQ_COLUMN)
                .cloned()
                .collect();
            Arc::new(arrow::datatypes::Schema::new(fields))
        } else {
            plan.schema.clone()
        };
        for (ordinal, key) in plan.units.iter().enumerate() {
            let Some(file) = all.iter().find(|f| &f.key == key) else {
                return Err(
                    Error::external(format!("file `{key}` disappeared while loading"))
                        .with_hint("files must stay in place until they are loaded"),
                );
            };
            let format = self.format_of(file)?;
            read::read_file(
                file,
                format,
                &self.config,
                data_schema.clone(),
                out.clone(),
                progress.clone(),
                self.sequence.then_some((ordinal as u64) << 40),
            )
            .await?;
        }
        Ok(())
    }
}

fn declared_fields(config: &SourceConfig) -> Result<Vec<Field>, Error> {
    config
        .schema
        .iter()
        .map(|c| {
            Ok(Field::new(
                normalize_column_name(&c.name),
                crate::types::parse_type(&c.data_type)?,
                c.nullable,
            ))
        })
        .collect()
}
