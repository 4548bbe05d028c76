//! `weir table stats`: what a table costs and how healthy its layout is, with the
//! maintenance that would help.
//!
//! ```text
//!   files, bytes ── from the snapshot (the log's add actions)
//!   compression ── Parquet footers of up to 256 files (uncompressed / stored bytes)
//!   reclaimable ── a vacuum dry run at the 7-day retention, sized by listing the table
//!   checkpoint  ── _delta_log/_last_checkpoint
//! ```

use std::collections::{BTreeSet, HashMap};

use deltalake::{DeltaTable, ObjectStore, Path};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use serde::Serialize;
use weir_common::Error;

use crate::{delta_error, Lake, MIN_RETENTION};

/// A file under this size is small: compaction would merge it (a quarter of the 128 MiB
/// files that readers of object stores do best with).
pub const SMALL_FILE: u64 = 32 << 20;

/// Small files that make `optimize` worth suggesting.
const SMALL_FILES_TO_COMPACT: u64 = 5;

/// Commits since the last checkpoint that make a checkpoint worth suggesting: readers
/// replay every JSON commit after it.
const COMMITS_TO_CHECKPOINT: u64 = 100;

/// Footers read to estimate the compression ratio.
const FOOTERS_SAMPLED: usize = 256;

/// The health of one table.
#[derive(Debug, Clone, Serialize)]
pub struct TableHealth {
    pub name: String,
    pub version: u64,
    pub files: u64,
    pub bytes: u64,
    pub avg_file_bytes: u64,
    /// Files under `SMALL_FILE` bytes.
    pub small_files: u64,
    /// `small_files / files`.
    pub small_file_share: f64,
    pub partition_columns: Vec<String>,
    /// Distinct partition values (1 for an unpartitioned table).
    pub partitions: u64,
    pub rows: u64,
    /// Uncompressed over stored bytes of the sampled files' data.
    pub compression_ratio: Option<f64>,
    pub compression_files_sampled: u64,
    /// Versions still in the log.
    pub versions: u64,
    pub last_checkpoint: Option<u64>,
    pub commits_since_checkpoint: u64,
    /// What a vacuum at the default 7-day retention would delete.
    pub reclaimable_files: u64,
    pub reclaimable_bytes: u64,
    /// Removed files kept for time travel (younger than the retention).
    pub retained_files: u64,
    pub retained_bytes: u64,
    pub suggestions: Vec<String>,
}

impl Lake {
    /// The health report of table `name`.
    pub async fn health(&self, name: &str) -> Result<TableHealth, Error> {
        let table = self.open_existing(name).await?;
        let snap = table.snapshot().map_err(|e| delta_error(name, e))?;
        let partition_columns = snap.metadata().partition_columns().to_vec();
        let (mut files, mut bytes, mut rows, mut small) = (0u64, 0u64, 0u64, 0u64);
        let mut partitions = BTreeSet::new();
        let mut paths = Vec::new();
        for f in snap.log_data().iter() {
            let size = f.size().max(0) as u64;
            files += 1;
            bytes += size;
            rows += f.num_records().unwrap_or(0) as u64;
            if size < SMALL_FILE {
                small += 1;
            }
            if !partition_columns.is_empty() {
                let mut values: Vec<(String, Option<String>)> =
                    f.partition_values_map().into_iter().collect();
                values.sort();
                partitions.insert(values);
            }
            paths.push((f.object_store_path(), size));
        }
        let store = table.log_store().object_store(None);
        let (compression_ratio, sampled) = compression(&store, &paths).await;
        let version = table.version().unwrap_or(0);
        let last_checkpoint = last_checkpoint(&store).await;
        let sizes = object_sizes(&store).await?;
        let versions = sizes.keys().filter(|p| is_commit(p)).count() as u64;
        let sum = |files: &[String]| files.iter().filter_map(|f| sizes.get(f)).sum::<u64>();
        let reclaimable = self.vacuum(name, MIN_RETENTION, true, false).await?.files;
        let all_removed = self
            .vacuum(name, std::time::Duration::ZERO, true, true)
            .await?
            .files;
        let retained: Vec<String> = all_removed
            .into_iter()
            .filter(|f| !reclaimable.contains(f))
            .collect();
        let mut h = TableHealth {
            name: name.to_string(),
            version,
            files,
            bytes,
            avg_file_bytes: bytes.checked_div(files).unwrap_or(0),
            small_files: small,
            small_file_share: if files == 0 {
                0.0
            } else {
                small as f64 / files as f64
            },
            partitions: if partition_columns.is_empty() {
                1
            } else {
                partitions.len() as u64
            },
            partition_columns,
            rows,
            compression_ratio,
            compression_files_sampled: sampled,
            versions,
            last_checkpoint,
            commits_since_checkpoint: match last_checkpoint {
                Some(c) => version.saturating_sub(c),
                None => version + 1,
            },
            reclaimable_files: reclaimable.len() as u64,
            reclaimable_bytes: sum(&reclaimable),
            retained_files: retained.len() as u64,
            retained_bytes: sum(&retained),
            suggestions: vec![],
        };
        h.suggestions = suggestions(&h);
        Ok(h)
    }
}

fn suggestions(h: &TableHealth) -> Vec<String> {
    let mut out = Vec::new();
    let name = &h.name;
    if h.small_files >= SMALL_FILES_TO_COMPACT && h.small_files as f64 >= h.partitions as f64 * 2.0
    {
        out.push(format!(
            "compact: {} of {} files are under {} MiB; `weir table optimize {name}` merges them",
            h.small_files,
            h.files,
            SMALL_FILE >> 20
        ));
    }
    if h.reclaimable_files > 0 {
        out.push(format!(
            "vacuum: {} unreferenced files ({} bytes) are older than 7 days; \
             `weir table vacuum {name}` deletes them",
            h.reclaimable_files, h.reclaimable_bytes
        ));
    }
    if h.commits_since_checkpoint >= COMMITS_TO_CHECKPOINT {
        out.push(format!(
            "checkpoint: readers replay {} commits; `weir table checkpoint {name}` writes one",
            h.commits_since_checkpoint
        ));
    }
    out
}

/// Uncompressed over stored bytes of up to `FOOTERS_SAMPLED` files, spread evenly.
async fn compression(
    store: &std::sync::Arc<dyn ObjectStore>,
    paths: &[(Path, u64)],
) -> (Option<f64>, u64) {
    let step = paths.len().div_ceil(FOOTERS_SAMPLED).max(1);
    let (mut raw, mut stored, mut sampled) = (0u64, 0u64, 0u64);
    for (path, size) in paths.iter().step_by(step) {
        // A footer that cannot be read leaves the file out of the estimate.
        let Some(meta) = footer(store, path, *size).await else {
            continue;
        };
        for rg in meta.row_groups() {
            raw += rg.total_byte_size().max(0) as u64;
            stored += rg.compressed_size().max(0) as u64;
        }
        sampled += 1;
    }
    let ratio = (stored > 0).then(|| (raw as f64 / stored as f64 * 100.0).round() / 100.0);
    (ratio, sampled)
}

/// The Parquet metadata at the end of a file of `size` bytes.
async fn footer(
    store: &std::sync::Arc<dyn ObjectStore>,
    path: &Path,
    size: u64,
) -> Option<ParquetMetaData> {
    let tail = store
        .get_range(path, size.checked_sub(8)?..size)
        .await
        .ok()?;
    if &tail[4..] != b"PAR1" {
        return None;
    }
    let len = u32::from_le_bytes(tail[..4].try_into().ok()?) as u64;
    let start = size.checked_sub(8 + len)?;
    let bytes = store.get_range(path, start..size - 8).await.ok()?;
    ParquetMetaDataReader::decode_metadata(&bytes).ok()
}

/// The version of the table's last checkpoint, if it has one.
async fn last_checkpoint(store: &std::sync::Arc<dyn ObjectStore>) -> Option<u64> {
    let bytes = store
        .get(&Path::from("_delta_log/_last_checkpoint"))
        .await
        .ok()?
        .bytes()
        .await
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("version")?
        .as_u64()
}

/// Whether `path` is a commit file: `_delta_log/00000000000000000012.json`.
fn is_commit(path: &str) -> bool {
    path.strip_prefix("_delta_log/")
        .and_then(|n| n.strip_suffix(".json"))
        .is_some_and(|v| v.len() == 20 && v.bytes().all(|b| b.is_ascii_digit()))
}

/// The size of every object under the table, by path relative to the table.
async fn object_sizes(
    store: &std::sync::Arc<dyn ObjectStore>,
) -> Result<HashMap<String, u64>, Error> {
    let objects: Vec<_> = store
        .list(None)
        .try_collect()
        .await
        .map_err(|e| Error::external(format!("listing the table's files: {e}")))?;
    Ok(objects
        .into_iter()
        .map(|o| (o.location.to_string(), o.size))
        .collect())
}

/// Writes a checkpoint of the table's current version, so readers start from one Parquet
/// file instead of replaying every JSON commit.
pub(crate) async fn checkpoint(table: &DeltaTable, name: &str) -> Result<u64, Error> {
    deltalake::checkpoints::create_checkpoint(table, None)
        .await
        .map_err(|e| delta_error(format!("checkpointing `{name}`"), e))?;
    Ok(table.version().unwrap_or(0))
}

impl Lake {
    /// Writes a checkpoint of table `name` at its current version; returns that version.
    pub async fn checkpoint(&self, name: &str) -> Result<u64, Error> {
        let table = self.open_existing(name).await?;
        checkpoint(&table, name).await
    }
}
