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
        let cfg: PipelineConfig = parse_yaml(&shown, &read(&file, &shown)?)?;
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
    Ok(Project {
        root: root.to_path_buf(),
        config,
        pipelines,
        models,
    })
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
