//! Finding and loading a project's files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use weir_common::Error;

use crate::spec::*;
use crate::yaml::parse_yaml;

/// A loaded project: its config, pipelines and model files, not yet compiled.
#[derive(Debug, Clone)]
pub struct Project {
    /// The directory holding `weir.yaml`.
    pub root: PathBuf,
    pub config: ProjectConfig,
    pub pipelines: Vec<Pipeline>,
    pub models: Vec<ModelFile>,
    /// `streams/*.yaml`.
    pub streams: Vec<crate::Stream>,
    /// `cdc/*.yaml`.
    pub cdc: Vec<crate::Cdc>,
}

/// A pipeline with its resolved name and the file it came from.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    pub config: PipelineConfig,
}

/// A model's SQL file and the properties declared for it in YAML.
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub name: String,
    /// Schema from the folder (`models/staging/x.sql` -> `staging`), if any.
    pub folder_schema: Option<String>,
    pub file: PathBuf,
    pub sql: String,
    pub properties: Option<ModelProperties>,
}

impl Project {
    /// The lake root as a URL string or an absolute local path.
    pub fn lake_root(&self) -> String {
        let lake = &self.config.lake;
        if lake.contains("://") {
            lake.clone()
        } else {
            let p = Path::new(lake);
            if p.is_absolute() {
                lake.clone()
            } else {
                self.root.join(p).to_string_lossy().into_owned()
            }
        }
    }

    /// The partitions of the pipeline or model named `asset`, if it is partitioned.
    pub fn partitions(&self, asset: &str) -> Option<&crate::PartitionsConfig> {
        match self.pipelines.iter().find(|p| p.name == asset) {
            Some(p) => p.config.partitions.as_ref(),
            None => self
                .models
                .iter()
                .find(|m| m.name == asset)?
                .properties
                .as_ref()?
                .partitions
                .as_ref(),
        }
    }

    /// Path relative to the project root, for messages.
    pub fn rel<'a>(&self, p: &'a Path) -> &'a Path {
        p.strip_prefix(&self.root).unwrap_or(p)
    }
}

fn read(path: &Path, shown: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", shown.display()), e))
}

/// Loads the project in `root` (the directory with `weir.yaml`).
pub fn load_project(root: &Path) -> Result<Project, Error> {
    let config_path = root.join("weir.yaml");
    if !config_path.exists() {
        return Err(
            Error::user(format!("no weir.yaml in `{}`", root.display())).with_hint(
                "run weir inside a project, pass --project DIR, or create one with `weir init DIR`",
            ),
        );
    }
    let config: ProjectConfig = parse_yaml(
        Path::new("weir.yaml"),
        &read(&config_path, Path::new("weir.yaml"))?,
    )?;

    let mut pipelines = Vec::new();
    let pipe_dir = root.join("pipelines");
    for file in list_files(&pipe_dir, &["yaml", "yml"])? {
        let shown = file.strip_prefix(root).unwrap_or(&file).to_path_buf();
        let text = read(&file, &shown)?;
        let cfg: PipelineConfig = parse_yaml(&shown, &text)?;
        validate_source(&cfg, &config, &shown, &text)?;
        validate_sink(&cfg, &config, &shown)?;
        validate_partitions(&cfg, &shown, &text)?;
        for c in &cfg.checks {
            c.validate(&shown.display().to_string())?;
        }
        let name = cfg.name.clone().unwrap_or_else(|| {
            file.file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        });
        validate_table_name(&cfg.sink.table, &shown)?;
        pipelines.push(Pipeline {
            name,
            file: shown,
            config: cfg,
        });
    }

    let mut models = Vec::new();
    let mut props: BTreeMap<String, (PathBuf, ModelProperties)> = BTreeMap::new();
    let model_dir = root.join("models");
    for file in list_files(&model_dir, &["yaml", "yml"])? {
        let shown = file.strip_prefix(root).unwrap_or(&file).to_path_buf();
        let parsed: ModelPropertiesFile = parse_yaml(&shown, &read(&file, &shown)?)?;
        for p in parsed.models {
            for c in &p.checks {
                c.validate(&p.name)?;
            }
            if let Some(parts) = &p.partitions {
                parts.validate(&format!("{} (model `{}`)", shown.display(), p.name))?;
            }
            if let Some((other, _)) = props.get(&p.name) {
                return Err(Error::user(format!(
                    "model `{}` has properties in both {} and {}",
                    p.name,
                    other.display(),
                    shown.display()
                )));
            }
            props.insert(p.name.clone(), (shown.clone(), p));
        }
    }
    for file in list_files(&model_dir, &["sql"])? {
        let shown = file.strip_prefix(root).unwrap_or(&file).to_path_buf();
        let name = file
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let folder_schema = file
            .strip_prefix(&model_dir)
            .ok()
            .and_then(|rel| {
                rel.components()
                    .next()
                    .filter(|_| rel.components().count() > 1)
            })
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        if let Some(other) = models.iter().find(|m: &&ModelFile| m.name == name) {
            return Err(Error::user(format!(
                "two models are named `{name}`: {} and {}",
                other.file.display(),
                shown.display()
            ))
            .with_hint("model names must be unique; rename one file"));
        }
        let sql = read(&file, &shown)?;
        let properties = props.remove(&name).map(|(_, p)| p);
        models.push(ModelFile {
            name,
            folder_schema,
            file: shown,
            sql,
            properties,
        });
    }
    if let Some((name, (file, _))) = props.into_iter().next() {
        return Err(Error::user(format!(
            "{} describes model `{name}`, but there is no `{name}.sql` under models/",
            file.display()
        )));
    }

    let mut seen = BTreeMap::new();
    for p in &pipelines {
        if let Some(other) = seen.insert(p.name.clone(), p.file.clone()) {
            return Err(Error::user(format!(
                "two pipelines are named `{}`: {} and {}",
                p.name,
                other.display(),
                p.file.display()
            )));
        }
    }
    validate_triggers(&config, &pipelines)?;
    let mut streams = Vec::new();
    for file in list_files(&root.join("streams"), &["yaml", "yml"])? {
        let shown = file.strip_prefix(root).unwrap_or(&file).to_path_buf();
        let cfg: crate::StreamConfig = parse_yaml(&shown, &read(&file, &shown)?)?;
        validate_table_name(&cfg.sink.table, &shown)?;
        let src = &cfg.source;
        let missing = match src.kind {
            crate::StreamSourceKind::Kafka if src.brokers.is_empty() => Some("source.brokers"),
            crate::StreamSourceKind::Kafka if src.topic.is_empty() => Some("source.topic"),
            crate::StreamSourceKind::File if src.path.is_none() => Some("source.path"),
            _ => None,
        };
        if let Some(key) = missing {
            return Err(Error::user(format!(
                "{}: a `{}` source needs `{key}`",
                shown.display(),
                match src.kind {
                    crate::StreamSourceKind::Kafka => "kafka",
                    crate::StreamSourceKind::File => "file",
                }
            )));
        }
        if cfg.flush.rows == 0 {
            return Err(Error::user(format!(
                "{}: `flush.rows` must be at least 1",
                shown.display()
            )));
        }
        if !cfg.sink.key.is_empty() && cfg.sql.is_none() {
            return Err(Error::user(format!(
                "{}: `sink.key` updates the rows a query returns, and this stream has no `sql`",
                shown.display()
            ))
            .with_hint("add `sql: SELECT ... FROM <source.name>` returning the key columns, or remove `sink.key` to append the records"));
        }
        let name = cfg.name.clone().unwrap_or_else(|| {
            file.file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        });
        streams.push(crate::Stream {
            name,
            file: shown,
            config: cfg,
        });
    }
    let cdc = load_cdc(root, &config)?;
    Ok(Project {
        root: root.to_path_buf(),
        config,
        pipelines,
        models,
        streams,
        cdc,
    })
}

/// `cdc/*.yaml`, checked against the project's connections.
fn load_cdc(root: &Path, config: &ProjectConfig) -> Result<Vec<crate::Cdc>, Error> {
    let mut out: Vec<crate::Cdc> = Vec::new();
    for file in list_files(&root.join("cdc"), &["yaml", "yml"])? {
        let shown = file.strip_prefix(root).unwrap_or(&file).to_path_buf();
        let cfg: crate::CdcConfig = parse_yaml(&shown, &read(&file, &shown)?)?;
        let name = cfg.name.clone().unwrap_or_else(|| {
            file.file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        });
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::user(format!(
                "{}: CDC job name `{name}` may hold only letters, digits and `_`",
                shown.display()
            ))
            .with_hint("it names the replication slot and publication (`weir_<name>`)"));
        }
        if !config.connections.contains_key(&cfg.source.connection) {
            let names: Vec<String> = config.connections.keys().cloned().collect();
            return Err(Error::user(format!(
                "{}: `source.connection` names `{}`, which weir.yaml does not define",
                shown.display(),
                cfg.source.connection
            ))
            .with_hint(match crate::closest(&cfg.source.connection, &names) {
                Some(c) => format!("did you mean `{c}`?"),
                None => "add it under `connections:` in weir.yaml".into(),
            }));
        }
        if cfg.source.tables.is_empty() {
            return Err(
                Error::user(format!("{}: `source.tables` is empty", shown.display()))
                    .with_hint("list the tables to capture, e.g. `tables: [public.orders]`"),
            );
        }
        if cfg.batch.max_changes == 0 || cfg.snapshot.chunk_rows == 0 {
            return Err(Error::user(format!(
                "{}: `batch.max_changes` and `snapshot.chunk_rows` must be at least 1",
                shown.display()
            )));
        }
        let job = crate::Cdc {
            name,
            file: shown.clone(),
            config: cfg,
        };
        let slot = job.slot();
        if slot.len() > 63
            || !slot
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(Error::user(format!(
                "{}: replication slot name `{slot}` is not valid in PostgreSQL",
                shown.display()
            ))
            .with_hint(
                "use lower-case letters, digits and `_`, at most 63 characters, in `source.slot`",
            ));
        }
        let mut mirrors = BTreeMap::new();
        for (schema, table) in job.source_tables() {
            let mirror = job.mirror(&table);
            validate_table_name(&mirror, &shown)?;
            if let Some(other) = mirrors.insert(mirror.clone(), format!("{schema}.{table}")) {
                return Err(Error::user(format!(
                    "{}: `{other}` and `{schema}.{table}` would both be mirrored in `{mirror}`",
                    shown.display()
                ))
                .with_hint("capture them in two CDC jobs with different `sink.schema`"));
            }
        }
        if let Some(other) = out.iter().find(|o| o.name == job.name) {
            return Err(Error::user(format!(
                "two CDC jobs are named `{}`: {} and {}",
                job.name,
                other.file.display(),
                shown.display()
            )));
        }
        out.push(job);
    }
    Ok(out)
}

/// Schedules need unique names; a sensor watches exactly one thing.
fn validate_triggers(config: &ProjectConfig, pipelines: &[Pipeline]) -> Result<(), Error> {
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for (i, s) in config.schedules.iter().enumerate() {
        let Some(name) = &s.name else {
            return Err(Error::user(format!(
                "weir.yaml: schedules[{i}] (`{}`) has no `name`",
                s.cron.text
            ))
            .with_hint("give every schedule a unique name, e.g. `name: nightly`"));
        };
        if let Some(other) = names.insert(name.clone(), "weir.yaml".into()) {
            return Err(Error::user(format!(
                "two schedules are named `{name}` ({other} and weir.yaml)"
            )));
        }
    }
    for p in pipelines {
        if let Some(s) = &p.config.schedule {
            let name = s.name.clone().unwrap_or_else(|| p.name.clone());
            if let Some(other) = names.insert(name.clone(), p.file.display().to_string()) {
                return Err(Error::user(format!(
                    "two schedules are named `{name}` ({other} and {})",
                    p.file.display()
                ))
                .with_hint("set `schedule.name` to tell them apart"));
            }
        }
    }
    let mut sensors = std::collections::BTreeSet::new();
    for s in &config.sensors {
        if !sensors.insert(s.name.clone()) {
            return Err(Error::user(format!(
                "weir.yaml: two sensors are named `{}`",
                s.name
            )));
        }
        if s.files.is_some() == s.asset.is_some() {
            return Err(Error::user(format!(
                "weir.yaml: sensor `{}` must watch exactly one of `files` (a glob) and `asset` (a table)",
                s.name
            ))
            .with_hint("e.g. `files: data/orders/*.csv` or `asset: raw.orders`"));
        }
    }
    Ok(())
}

/// `file:line` of the first `key:` under `source:` in a pipeline file, for messages.
fn place(file: &Path, text: &str, key: &str) -> String {
    let mut in_source = false;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if !line.starts_with([' ', '\t']) {
            in_source = trimmed.starts_with("source:");
        } else if in_source && trimmed.starts_with(&format!("{key}:")) {
            return format!("{}:{}", file.display(), i + 1);
        }
    }
    file.display().to_string()
}

/// Checks that a source's keys fit its `type`, and that a named connection exists.
fn validate_source(
    cfg: &PipelineConfig,
    project: &ProjectConfig,
    file: &Path,
    text: &str,
) -> Result<(), Error> {
    let src = &cfg.source;
    let kind = src.kind;
    let foreign = |key: &str| {
        Error::user(format!(
            "key `source.{key}` does not apply to a `{kind}` source ({})",
            place(file, text, key)
        ))
        .with_hint(match kind {
            SourceKind::Files => "files sources take path, format, compression, csv, schema, incremental, batch_rows",
            SourceKind::Postgres => "postgres sources take connection, table or query, cursor, lookback, partitions, partition_column, unsupported_types, batch_rows",
            SourceKind::Lake => "lake sources take table (`schema.table` of this project's lake)",
        })
    };
    let set = [
        ("path", !src.path.is_empty()),
        ("format", src.format.is_some()),
        ("schema", !src.schema.is_empty()),
        ("connection", src.connection.is_some()),
        ("table", src.table.is_some()),
        ("query", src.query.is_some()),
        ("cursor", src.cursor.is_some()),
        ("lookback", src.lookback.is_some()),
        ("partitions", src.partitions.is_some()),
        ("partition_column", src.partition_column.is_some()),
    ];
    let allowed: &[&str] = match kind {
        SourceKind::Files => &["path", "format", "schema"],
        SourceKind::Lake => &["table"],
        SourceKind::Postgres => &[
            "connection",
            "table",
            "query",
            "cursor",
            "lookback",
            "partitions",
            "partition_column",
        ],
    };
    if let Some((key, _)) = set.iter().find(|(k, on)| *on && !allowed.contains(k)) {
        return Err(foreign(key));
    }
    match kind {
        SourceKind::Files => {
            if src.path.is_empty() {
                return Err(Error::user(format!(
                    "missing key `path` in `source` in {}",
                    file.display()
                ))
                .with_hint("a files source reads `path:` (a file, a directory or a glob)"));
            }
        }
        SourceKind::Lake => match &src.table {
            Some(t) => validate_table_name(t, file)?,
            None => {
                return Err(Error::user(format!(
                    "missing key `table` in `source` in {}",
                    file.display()
                ))
                .with_hint("name the lake table to read, e.g. `table: marts.daily_revenue`"))
            }
        },
        SourceKind::Postgres => {
            let Some(name) = &src.connection else {
                return Err(Error::user(format!(
                    "missing key `connection` in `source` in {}",
                    file.display()
                ))
                .with_hint("name a connection from `connections:` in weir.yaml"));
            };
            if !project.connections.contains_key(name) {
                let names: Vec<String> = project.connections.keys().cloned().collect();
                let hint = match crate::yaml::closest(name, &names) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None if names.is_empty() => {
                        "add it under `connections:` in weir.yaml".to_string()
                    }
                    None => format!("connections in weir.yaml: {}", names.join(", ")),
                };
                return Err(Error::user(format!(
                    "unknown connection `{name}` ({})",
                    place(file, text, "connection")
                ))
                .with_hint(hint));
            }
            match (&src.table, &src.query) {
                (Some(_), Some(_)) => {
                    return Err(Error::user(format!(
                        "a postgres source reads a `table` or a `query`, not both ({})",
                        place(file, text, "query")
                    )))
                }
                (None, None) => {
                    return Err(Error::user(format!(
                        "missing key `table` or `query` in `source` in {}",
                        file.display()
                    ))
                    .with_hint("e.g. `table: public.orders`"))
                }
                _ => {}
            }
            if src.lookback.is_some() {
                if src.cursor.is_none() {
                    return Err(Error::user(format!(
                        "`lookback` needs a `cursor` ({})",
                        place(file, text, "lookback")
                    )));
                }
                if cfg.sink.mode != WriteMode::Merge {
                    return Err(Error::user(format!(
                        "`lookback` re-reads rows, so the sink must merge on a key ({})",
                        place(file, text, "lookback")
                    ))
                    .with_hint("set `mode: merge` and `key: [...]` on the sink"));
                }
            }
            if src.cursor.is_none()
                && cfg.sink.mode == WriteMode::Append
                && cfg.partitions.is_none()
            {
                return Err(Error::user(format!(
                    "a postgres source without `cursor` reads the whole table every run, so appending would duplicate it ({})",
                    file.display()
                ))
                .with_hint("set the sink's `mode: overwrite` or `merge`, or read incrementally with `cursor:`"));
            }
            if src.partitions == Some(0) {
                return Err(Error::user(format!(
                    "`partitions` must be at least 1 ({})",
                    place(file, text, "partitions")
                )));
            }
        }
    }
    Ok(())
}

/// A partitioned pipeline reads its partition and replaces it in the sink.
fn validate_partitions(cfg: &PipelineConfig, file: &Path, text: &str) -> Result<(), Error> {
    let Some(parts) = &cfg.partitions else {
        return Ok(());
    };
    let line = text
        .lines()
        .position(|l| l.starts_with("partitions:"))
        .map(|i| format!(":{}", i + 1))
        .unwrap_or_default();
    let at = format!("{}{line}", file.display());
    parts.validate(&at)?;
    if cfg.source.kind == SourceKind::Lake {
        return Err(Error::user(format!(
            "partitions apply to files and postgres sources, not `lake` ({at})"
        ))
        .with_hint(
            "partition a model over the lake table instead (`partitions:` in models/*.yaml)",
        ));
    }
    if !matches!(cfg.sink.mode, WriteMode::Append | WriteMode::Overwrite) {
        return Err(Error::user(format!(
            "a partitioned pipeline replaces its partition in the sink, so `sink.mode: {}` does not apply ({at})",
            cfg.sink.mode
        ))
        .with_hint("remove `mode` (or set `mode: overwrite`)"));
    }
    let texts = [
        Some(cfg.source.path.as_str()),
        cfg.source.query.as_deref(),
        cfg.transform.as_deref(),
    ];
    // Placeholders are checked on the first partition, so a typo fails `weir validate`.
    let first = parts.resolve(parts.start.as_deref(), chrono::NaiveDateTime::MIN)?;
    for (key, t) in ["source.path", "source.query", "transform"]
        .iter()
        .zip(texts)
    {
        if let Some(t) = t {
            first
                .fill(t)
                .map_err(|e| e.context(format!("`{key}` of {}", file.display())))?;
        }
    }
    if !texts.into_iter().flatten().any(crate::mentions_partition) {
        return Err(Error::user(format!(
            "a partitioned pipeline must read only its partition, but neither `source.path`, `source.query` nor `transform` refers to it ({at})"
        ))
        .with_hint(match cfg.source.kind {
            SourceKind::Files => "e.g. `path: data/events/{{ partition_key }}/*.csv`",
            _ => "e.g. `query: select * from events where ts >= '{{ partition_start }}' and ts < '{{ partition_end }}'`",
        }));
    }
    Ok(())
}

/// Checks a sink's connection and the modes its type supports.
fn validate_sink(cfg: &PipelineConfig, project: &ProjectConfig, file: &Path) -> Result<(), Error> {
    let sink = &cfg.sink;
    match sink.kind {
        SinkKind::Delta => {
            if sink.connection.is_some() {
                return Err(Error::user(format!(
                    "key `sink.connection` applies to `type: postgres` sinks ({})",
                    file.display()
                ))
                .with_hint("add `type: postgres` to the sink, or remove `connection`"));
            }
        }
        SinkKind::Postgres => {
            let Some(name) = &sink.connection else {
                return Err(Error::user(format!(
                    "missing key `connection` in `sink` in {}",
                    file.display()
                ))
                .with_hint("name a connection from `connections:` in weir.yaml"));
            };
            if !project.connections.contains_key(name) {
                return Err(Error::user(format!(
                    "unknown connection `{name}` in the sink of {}",
                    file.display()
                ))
                .with_hint("add it under `connections:` in weir.yaml"));
            }
            if sink.mode.scd().is_some() {
                return Err(Error::user(format!(
                    "a postgres sink cannot keep a slowly changing dimension (`mode: {}` in {})",
                    sink.mode,
                    file.display()
                ))
                .with_hint(
                    "load the dimension into the lake (`type: delta`), or use `mode: merge`",
                ));
            }
            if sink.mode == WriteMode::ReplacePartitions || !sink.partition_by.is_empty() {
                return Err(Error::user(format!(
                    "a postgres sink has no partitions ({})",
                    file.display()
                ))
                .with_hint("use mode append, overwrite or merge, without partition_by"));
            }
        }
    }
    if (sink.mode == WriteMode::Merge || sink.mode.scd().is_some()) && sink.key.is_empty() {
        return Err(Error::user(format!(
            "`mode: {}` needs `key` ({})",
            sink.mode,
            file.display()
        ))
        .with_hint("name the column(s) that identify a row, e.g. `key: [id]`"));
    }
    Ok(())
}

/// Checks `schema.table` form.
pub fn validate_table_name(table: &str, file: &Path) -> Result<(), Error> {
    let parts: Vec<&str> = table.split('.').collect();
    let ok = parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    if ok {
        Ok(())
    } else {
        Err(Error::user(format!(
            "invalid table name `{table}` in {}",
            file.display()
        ))
        .with_hint("write `schema.table` using letters, digits and `_`, e.g. `raw.orders`"))
    }
}

/// Files under `dir` (recursively) with one of `exts`, sorted for determinism.
fn list_files(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).map_err(|e| Error::io(format!("listing {}", d.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", d.display()), e))?;
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}
