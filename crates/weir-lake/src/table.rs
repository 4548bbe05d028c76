//! Locating, opening, listing and describing lake tables.

use std::path::PathBuf;

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use deltalake::{DeltaTable, DeltaTableBuilder, ObjectStore, Path as ObjectPath};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use serde::Serialize;
use url::Url;
use weir_common::Error;

use crate::delta_error;

/// Whether a table directory holds at least one commit: a writer killed before its first
/// commit leaves an empty `_delta_log`, which is not a table.
fn has_commit(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir.join("_delta_log")).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.ends_with(".json") || n.ends_with(".checkpoint.parquet")
        })
    })
}

/// Whether the table under `prefix` of `store` holds a commit.
async fn store_has_commit(store: &Arc<dyn ObjectStore>, prefix: &ObjectPath) -> bool {
    let log = match prefix.as_ref() {
        "" => ObjectPath::from("_delta_log"),
        p => ObjectPath::from(format!("{p}/_delta_log")),
    };
    let mut entries = store.list(Some(&log));
    while let Some(Ok(meta)) = entries.next().await {
        let n = meta.location.filename().unwrap_or_default();
        if n.ends_with(".json") || n.ends_with(".checkpoint.parquet") {
            return true;
        }
    }
    false
}

/// The lake: a root directory or object-store URL holding `schema/table` Delta tables.
#[derive(Debug, Clone)]
pub struct Lake {
    root: String,
    /// Object-store options (delta-rs storage options); the environment fills the rest.
    options: HashMap<String, String>,
}

/// Size and shape of a table, for `weir tables`.
#[derive(Debug, Clone, Serialize)]
pub struct TableStats {
    pub name: String,
    pub version: u64,
    pub rows: u64,
    pub files: u64,
    pub bytes: u64,
    pub partition_columns: Vec<String>,
    pub last_modified: Option<String>,
}

/// One commit of a table, for `weir table history`.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub timestamp: Option<String>,
    pub operation: String,
    pub parameters: serde_json::Value,
    pub metrics: serde_json::Value,
    pub weir: serde_json::Value,
    /// Files and rows this commit added and removed, and the table's size after it.
    #[serde(flatten)]
    pub counts: crate::log::VersionCounts,
}

impl Lake {
    pub fn new(root: impl Into<String>) -> Self {
        Self::with_options(root, HashMap::new())
    }

    /// A lake at `root` with object-store `options` (`aws_endpoint_url`, ...).
    pub fn with_options(root: impl Into<String>, options: HashMap<String, String>) -> Self {
        Self {
            root: root.into(),
            options,
        }
    }

    /// The lake of a project: its `lake:` root and `lake_options:`.
    pub fn for_project(project: &weir_config::Project) -> Self {
        let options = project
            .config
            .lake_options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Self::with_options(project.lake_root(), options)
    }

    /// A table builder for `url` with the lake's options.
    fn builder(&self, url: Url) -> Result<DeltaTableBuilder, Error> {
        Ok(DeltaTableBuilder::from_url(url.clone())
            .map_err(|e| delta_error(format!("opening {url}"), e))?
            .with_storage_options(self.options.clone()))
    }

    /// The object store rooted at `url`.
    pub(crate) fn store_at(&self, url: Url) -> Result<Arc<dyn ObjectStore>, Error> {
        Ok(self
            .builder(url.clone())?
            .build_storage()
            .map_err(|e| delta_error(format!("connecting to {url}"), e))?
            .object_store(None))
    }

    /// The lake root as a directory URL.
    fn root_url(&self) -> Result<Url, Error> {
        let base = self.root.trim_end_matches('/');
        Url::parse(&format!("{base}/"))
            .map_err(|e| Error::user(format!("invalid lake URL `{}`: {e}", self.root)))
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    fn is_local(&self) -> bool {
        !self.root.contains("://") || self.root.starts_with("file://")
    }

    fn local_root(&self) -> PathBuf {
        PathBuf::from(self.root.strip_prefix("file://").unwrap_or(&self.root))
    }

    /// The statistics (`numRecords`, `nullCount`, `minValues`, `maxValues`) of the data
    /// files commit `version` of table `name` added.
    pub async fn added_file_stats(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Vec<serde_json::Value>, Error> {
        let table = self.open_existing(name).await?;
        let actions = crate::log::commit_actions(&table, name, version).await?;
        Ok(actions
            .unwrap_or_default()
            .into_iter()
            .filter_map(|a| {
                a.pointer("/add/stats")
                    .and_then(|s| s.as_str())
                    .and_then(|s| serde_json::from_str(s).ok())
            })
            .collect())
    }

    /// Local directory of a table, when the lake is local.
    pub fn local_dir(&self, name: &str) -> Option<PathBuf> {
        self.is_local().then(|| {
            let mut p = self.local_root();
            for part in name.split('.') {
                p.push(part);
            }
            p
        })
    }

    /// The URL of table `schema.table`.
    pub fn table_url(&self, name: &str) -> Result<Url, Error> {
        let rel = name.replace('.', "/");
        if let Some(dir) = self.local_dir(name) {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            let dir = dir
                .canonicalize()
                .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
            Url::from_directory_path(&dir)
                .map_err(|_| Error::internal(format!("bad lake path {}", dir.display())))
        } else {
            let base = self.root.trim_end_matches('/');
            Url::parse(&format!("{base}/{rel}/"))
                .map_err(|e| Error::user(format!("invalid lake URL `{}`: {e}", self.root)))
        }
    }

    /// Whether a Delta table exists at `name`, without creating directories.
    pub async fn exists(&self, name: &str) -> bool {
        match self.local_dir(name) {
            Some(dir) => has_commit(&dir),
            None => match self.table_url(name).and_then(|u| self.store_at(u)) {
                Ok(store) => store_has_commit(&store, &ObjectPath::from("")).await,
                Err(_) => false,
            },
        }
    }

    /// Opens table `name`; the returned table has no version if it does not exist yet.
    pub async fn open(&self, name: &str) -> Result<DeltaTable, Error> {
        let url = self.table_url(name)?;
        let builder = self.builder(url)?;
        if !self.exists(name).await {
            // Not a table yet: an unloaded handle that writes create.
            return builder
                .build()
                .map_err(|e| delta_error(format!("opening table `{name}`"), e));
        }
        builder
            .load()
            .await
            .map_err(|e| delta_error(format!("opening table `{name}`"), e))
    }

    /// Opens table `name`, failing with a hint when it does not exist.
    pub async fn open_existing(&self, name: &str) -> Result<DeltaTable, Error> {
        if !self.exists(name).await {
            return Err(self.missing(name).await);
        }
        let t = self.open(name).await?;
        if t.version().is_none() {
            return Err(self.missing(name).await);
        }
        Ok(t)
    }

    async fn missing(&self, name: &str) -> Error {
        let known = self.list().await.unwrap_or_default();
        let hint = match weir_config::closest(name, &known) {
            Some(c) => format!("did you mean `{c}`? `weir tables` lists the lake's tables"),
            None => "`weir tables` lists the lake's tables; `weir run` creates them".to_string(),
        };
        Error::user(format!("table `{name}` does not exist")).with_hint(hint)
    }

    /// The arrow schema of a table, if it exists.
    pub async fn schema(&self, name: &str) -> Result<Option<SchemaRef>, Error> {
        if !self.exists(name).await {
            return Ok(None);
        }
        let t = self.open(name).await?;
        if t.version().is_none() {
            return Ok(None);
        }
        let snap = t.snapshot().map_err(|e| delta_error(name, e))?;
        Ok(Some(snap.snapshot().arrow_schema()))
    }

    /// All tables in the lake, as `schema.table`, sorted.
    pub async fn list(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        if !self.is_local() {
            let store = self.store_at(self.root_url()?)?;
            let listed = |e: object_store::Error| {
                Error::external(format!("listing the lake {}: {e}", self.root))
            };
            let schemas = store.list_with_delimiter(None).await.map_err(listed)?;
            for schema in schemas.common_prefixes {
                let Some(sname) = schema.filename().map(str::to_string) else {
                    continue;
                };
                if sname.starts_with(['.', '_']) {
                    continue;
                }
                let tables = store
                    .list_with_delimiter(Some(&schema))
                    .await
                    .map_err(listed)?;
                for t in tables.common_prefixes {
                    if store_has_commit(&store, &t).await {
                        if let Some(tname) = t.filename() {
                            out.push(format!("{sname}.{tname}"));
                        }
                    }
                }
            }
            out.sort();
            return Ok(out);
        }
        let root = self.local_root();
        let Ok(schemas) = std::fs::read_dir(&root) else {
            return Ok(out);
        };
        for s in schemas.flatten() {
            let sname = s.file_name().to_string_lossy().into_owned();
            if sname.starts_with(['.', '_']) || !s.path().is_dir() {
                continue;
            }
            let Ok(tables) = std::fs::read_dir(s.path()) else {
                continue;
            };
            for t in tables.flatten() {
                if has_commit(&t.path()) {
                    out.push(format!("{sname}.{}", t.file_name().to_string_lossy()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The committed txn version of `app_id` in `table`.
    pub async fn txn_version(
        &self,
        table: &DeltaTable,
        app_id: &str,
    ) -> Result<Option<i64>, Error> {
        if table.version().is_none() {
            return Ok(None);
        }
        let snap = table
            .snapshot()
            .map_err(|e| delta_error("reading snapshot", e))?;
        snap.transaction_version(table.log_store().as_ref(), app_id)
            .await
            .map_err(|e| delta_error("reading transaction version", e))
    }

    /// Rows, files and bytes of a table.
    pub async fn stats(&self, name: &str) -> Result<TableStats, Error> {
        let t = self.open_existing(name).await?;
        let snap = t.snapshot().map_err(|e| delta_error(name, e))?;
        let (mut rows, mut files, mut bytes) = (0u64, 0u64, 0u64);
        let mut newest = 0i64;
        for f in snap.log_data().iter() {
            files += 1;
            bytes += f.size().max(0) as u64;
            rows += f.num_records().unwrap_or(0) as u64;
            newest = newest.max(f.modification_time());
        }
        Ok(TableStats {
            name: name.to_string(),
            version: t.version().unwrap_or(0),
            rows,
            files,
            bytes,
            partition_columns: snap.metadata().partition_columns().to_vec(),
            last_modified: chrono::DateTime::from_timestamp_millis(newest)
                .filter(|_| newest > 0)
                .map(|d| d.to_rfc3339()),
        })
    }

    /// The time of a table's latest commit.
    pub async fn last_commit_time(&self, name: &str) -> Result<Option<i64>, Error> {
        let info = self.last_commit_info(name).await?;
        Ok(info.get("timestamp").and_then(|t| t.as_i64()))
    }

    /// The `commitInfo` of a table's latest commit (its time, operation and the metadata
    /// the writer added), read without replaying the log.
    pub async fn last_commit_info(
        &self,
        name: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, Error> {
        let t = self.open_existing(name).await?;
        crate::log::commit_info(&t, name, t.version().unwrap_or(0)).await
    }

    /// Commits of a table, newest first. Every commit is read, for the running totals.
    pub async fn history(
        &self,
        name: &str,
        limit: Option<usize>,
    ) -> Result<Vec<HistoryEntry>, Error> {
        let t = self.open_existing(name).await?;
        let commits = crate::log::replay(&t, name).await?;
        Ok(commits
            .into_iter()
            .rev()
            .take(limit.unwrap_or(usize::MAX))
            .map(|c| {
                let field = |k: &str| c.info.get(k).cloned().unwrap_or(serde_json::Value::Null);
                let weir: serde_json::Map<String, serde_json::Value> = c
                    .info
                    .iter()
                    .filter(|(k, _)| k.starts_with("weir."))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                HistoryEntry {
                    version: c.version,
                    timestamp: c
                        .info
                        .get("timestamp")
                        .and_then(|t| t.as_i64())
                        .and_then(chrono::DateTime::from_timestamp_millis)
                        .map(|d| d.to_rfc3339()),
                    // weir's own operations (TIER) ride on a Delta one.
                    operation: c
                        .info
                        .get("weir.operation")
                        .unwrap_or(&field("operation"))
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    parameters: field("operationParameters"),
                    metrics: field("operationMetrics"),
                    weir: serde_json::Value::Object(weir),
                    counts: c.counts,
                }
            })
            .collect())
    }

    fn state_path(app: &str, file: &str) -> ObjectPath {
        ObjectPath::from(format!("_weir/state/{app}/{file}"))
    }

    /// Writes the state checkpoint of epoch `n` of `app` beside `table` (before the commit
    /// of that epoch; Delta's vacuum leaves `_weir/` alone). The put is atomic.
    pub async fn write_state(
        &self,
        table: &str,
        app: &str,
        n: i64,
        bytes: Vec<u8>,
    ) -> Result<(), Error> {
        self.write_state_file(table, app, &format!("{n}.arrow"), bytes)
            .await
    }

    /// Reads the state checkpoint of epoch `n`; `None` if there is none.
    pub async fn read_state(
        &self,
        table: &str,
        app: &str,
        n: i64,
    ) -> Result<Option<Vec<u8>>, Error> {
        self.read_state_file(table, app, &format!("{n}.arrow"))
            .await
    }

    /// Deletes the state checkpoint of epoch `n`, if there is one.
    pub async fn delete_state(&self, table: &str, app: &str, n: i64) -> Result<(), Error> {
        self.delete_state_file(table, app, &format!("{n}.arrow"))
            .await
    }

    /// Writes `file` of `app`'s state area beside `table`, atomically.
    pub async fn write_state_file(
        &self,
        table: &str,
        app: &str,
        file: &str,
        bytes: Vec<u8>,
    ) -> Result<(), Error> {
        let store = self.store_at(self.table_url(table)?)?;
        let path = Self::state_path(app, file);
        store
            .put(&path, bytes.into())
            .await
            .map_err(|e| Error::external(format!("writing state {path} of `{table}`: {e}")))?;
        Ok(())
    }

    /// Reads `file` of `app`'s state area; `None` if it is not there.
    pub async fn read_state_file(
        &self,
        table: &str,
        app: &str,
        file: &str,
    ) -> Result<Option<Vec<u8>>, Error> {
        let store = self.store_at(self.table_url(table)?)?;
        let path = Self::state_path(app, file);
        let failed = |e: object_store::Error| {
            Error::external(format!("reading state {path} of `{table}`: {e}"))
        };
        match store.get(&path).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(failed)?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(failed(e)),
        }
    }

    /// Deletes `file` of `app`'s state area, if it is there.
    pub async fn delete_state_file(&self, table: &str, app: &str, file: &str) -> Result<(), Error> {
        let store = self.store_at(self.table_url(table)?)?;
        let path = Self::state_path(app, file);
        match store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::external(format!(
                "deleting state {path} of `{table}`: {e}"
            ))),
        }
    }

    fn manifest_path(app: &str, n: i64) -> ObjectPath {
        ObjectPath::from(format!("_weir/positions/{app}/{n}.json"))
    }

    /// Writes the position manifest for commit `n` of `app` (before that commit). The
    /// put is atomic: a reader sees the whole manifest or none.
    pub async fn write_manifest(
        &self,
        table: &str,
        app: &str,
        n: i64,
        value: &serde_json::Value,
    ) -> Result<(), Error> {
        let store = self.store_at(self.table_url(table)?)?;
        let path = Self::manifest_path(app, n);
        let text =
            serde_json::to_vec(value).map_err(|e| Error::internal(format!("manifest: {e}")))?;
        store.put(&path, text.into()).await.map_err(|e| {
            Error::external(format!(
                "writing position manifest {path} of `{table}`: {e}"
            ))
        })?;
        Ok(())
    }

    /// Reads the manifest of commit `n`: it must exist, as it was written before the commit.
    pub async fn read_manifest(
        &self,
        table: &str,
        app: &str,
        n: i64,
    ) -> Result<serde_json::Value, Error> {
        let store = self.store_at(self.table_url(table)?)?;
        let path = Self::manifest_path(app, n);
        let missing = |e: object_store::Error| {
            let gone = matches!(e, object_store::Error::NotFound { .. });
            let err = Error::external(format!("reading position manifest {path} of `{table}`: {e}"))
                .with_hint("the table records a load whose manifest is gone; rebuild with `weir run --full-refresh`");
            if gone {
                err.not_retryable()
            } else {
                err
            }
        };
        let bytes = store
            .get(&path)
            .await
            .map_err(missing)?
            .bytes()
            .await
            .map_err(missing)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::internal(format!("corrupt manifest {path} of `{table}`: {e}")))
    }
}
