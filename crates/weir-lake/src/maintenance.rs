//! Keeping tables fast and cheap: compaction (bin-packing or z-order), vacuum and restore,
//! all delta-rs operations underneath, so every one is an ordinary Delta commit that
//! readers and concurrent writers see through the log (a conflicting commit fails with a
//! retryable error, never silently).
//!
//! ```text
//!   many small files ──optimize──► few target-size files   (one commit: adds + removes)
//!   removed files ──vacuum──► deleted once older than the retention   (time travel ends there)
//!   version N ──restore──► a new commit whose files are version N's
//! ```

use std::num::NonZeroU64;
use std::time::Duration;

use deltalake::operations::optimize::OptimizeType;
use serde::Serialize;
use weir_common::Error;

use crate::{delta_error, Lake};

/// The shortest retention a vacuum takes without `force`: readers of older versions and
/// writers that started before the vacuum still need the files of the last week (the
/// Delta default for `delta.deletedFileRetentionDuration`).
pub const MIN_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How `optimize` rewrites a table.
#[derive(Debug, Clone, Default)]
pub struct OptimizeSpec {
    /// Cluster the rows by these columns (z-order) so filters on them skip files;
    /// empty: bin-packing only.
    pub zorder: Vec<String>,
    /// The file size to aim for (default: delta-rs', 100 MiB).
    pub target_size: Option<u64>,
    /// Only these partitions: `(column, value)` pairs, all of which must hold.
    pub partitions: Vec<(String, String)>,
}

/// What `optimize` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OptimizeMetrics {
    pub files_before: u64,
    pub files_after: u64,
    pub files_removed: u64,
    pub files_added: u64,
    pub bytes_removed: u64,
    pub bytes_added: u64,
    pub partitions_optimized: u64,
    /// The table's version after the commit (unchanged when there was nothing to do).
    pub version: u64,
}

/// What `vacuum` deleted, or would delete with `dry_run`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VacuumMetrics {
    pub dry_run: bool,
    /// The data files, relative to the table's root.
    pub files: Vec<String>,
}

/// What `restore` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreMetrics {
    pub restored_version: u64,
    pub version: u64,
    pub files_removed: u64,
    pub files_restored: u64,
}

impl Lake {
    /// Compacts the small files of table `name` (and clusters its rows with z-order).
    pub async fn optimize(
        &self,
        name: &str,
        spec: &OptimizeSpec,
    ) -> Result<OptimizeMetrics, Error> {
        let table = self.open_existing(name).await?;
        let files_before = file_count(&table);
        if !spec.zorder.is_empty() {
            let schema = self
                .schema(name)
                .await?
                .ok_or_else(|| Error::user(format!("`{name}` has no commits")))?;
            for c in &spec.zorder {
                if schema.field_with_name(c).is_err() {
                    let names: Vec<&str> =
                        schema.fields().iter().map(|f| f.name().as_str()).collect();
                    return Err(Error::user(format!("`{name}` has no column `{c}`"))
                        .with_hint(format!("its columns: {}", names.join(", "))));
                }
            }
        }
        // Partitions holding tiered (cold) files are left alone: compacting them would
        // bring their rows back to the hot location.
        let cold = cold_partitions(&table, &[]);
        if !spec.partitions.is_empty() {
            let columns = table
                .snapshot()
                .map_err(|e| delta_error(name, e))?
                .metadata()
                .partition_columns()
                .to_vec();
            if let Some((c, _)) = spec.partitions.iter().find(|(c, _)| !columns.contains(c)) {
                return Err(Error::user(format!("`{name}` is not partitioned by `{c}`"))
                    .with_hint(if columns.is_empty() {
                        "the table has no partitions: optimize it whole".to_string()
                    } else {
                        format!("its partition columns: {}", columns.join(", "))
                    }));
            }
        }
        let mut builder = table.optimize().with_type(if spec.zorder.is_empty() {
            OptimizeType::Compact
        } else {
            OptimizeType::ZOrder(spec.zorder.clone())
        });
        if let Some(size) = spec.target_size.and_then(NonZeroU64::new) {
            builder = builder.with_target_size(size);
        }
        let filters: Vec<deltalake::FilterLiteral<'_>> = cold
            .iter()
            .map(|(column, values)| {
                (
                    column.as_str(),
                    deltalake::FilterOp::NotIn,
                    deltalake::FilterValue::Set(values.iter().map(String::as_str).collect()),
                )
            })
            .chain(spec.partitions.iter().map(|(column, value)| {
                (
                    column.as_str(),
                    deltalake::FilterOp::Eq,
                    deltalake::FilterValue::Scalar(value.as_str()),
                )
            }))
            .collect();
        if !filters.is_empty() {
            builder = builder.with_filters(&filters);
        }
        let (table, m) = builder
            .await
            .map_err(|e| delta_error(format!("optimizing `{name}`"), e))?;
        let files_after = file_count(&table);
        Ok(OptimizeMetrics {
            files_before,
            files_after,
            files_removed: m.num_files_removed,
            files_added: m.num_files_added,
            bytes_removed: m.files_removed.total_size.max(0) as u64,
            bytes_added: m.files_added.total_size.max(0) as u64,
            partitions_optimized: m.partitions_optimized,
            version: table.version().unwrap_or(0),
        })
    }

    /// Deletes the files that table `name` no longer references and that were removed
    /// longer than `retain` ago. Versions older than that can no longer be read.
    pub async fn vacuum(
        &self,
        name: &str,
        retain: Duration,
        dry_run: bool,
        force: bool,
    ) -> Result<VacuumMetrics, Error> {
        if retain < MIN_RETENTION && !force {
            return Err(Error::user(format!(
                "a retention of {} is below the safe minimum of 7 days",
                duration_text(retain)
            ))
            .with_hint(
                "readers of older versions and running writers may still need those files; \
                 add --force if none can be running",
            ));
        }
        let table = self.open_existing(name).await?;
        let retain = chrono::Duration::from_std(retain)
            .map_err(|e| Error::user(format!("retention `{retain:?}`: {e}")))?;
        let (_, m) = table
            .vacuum()
            .with_retention_period(retain)
            .with_enforce_retention_duration(false)
            .with_dry_run(dry_run)
            .await
            .map_err(|e| delta_error(format!("vacuuming `{name}`"), e))?;
        // delta-rs lists a dry run's files relative to the table and a real run's as
        // store paths: both are shown relative to the table.
        let root = self.table_url(name)?.to_string();
        let mut files: Vec<String> = m
            .files_deleted
            .into_iter()
            .map(|f| {
                f.strip_prefix(&root)
                    .or_else(|| f.strip_prefix(root.trim_start_matches("file://")))
                    .map(|s| s.trim_start_matches('/').to_string())
                    .unwrap_or(f)
            })
            .collect();
        // A file removed in several versions (by a restore, say) is listed once.
        files.sort();
        files.dedup();
        Ok(VacuumMetrics {
            dry_run: m.dry_run,
            files,
        })
    }

    /// Makes table `name` hold what it held at `version`, in a new commit (the versions
    /// in between stay in the history).
    pub async fn restore(&self, name: &str, version: u64) -> Result<RestoreMetrics, Error> {
        let table = self.open_existing(name).await?;
        let current = table.version().unwrap_or(0);
        if version >= current {
            return Err(Error::user(format!(
                "`{name}` is at version {current}; restore takes an earlier version"
            ))
            .with_hint(format!("`weir table history {name}` lists the versions")));
        }
        let (table, m) = table
            .restore()
            .with_version_to_restore(version)
            .await
            .map_err(|e| {
                delta_error(format!("restoring `{name}` to version {version}"), e).with_hint(
                    "a vacuum deletes the files of old versions; versions older than its retention cannot be restored",
                )
            })?;
        Ok(RestoreMetrics {
            restored_version: version,
            version: table.version().unwrap_or(0),
            files_removed: m.num_removed_file as u64,
            files_restored: m.num_restored_file as u64,
        })
    }
}

/// For each partition column, the values of the partitions that hold files at absolute
/// (tiered) locations, or files in `moving` (about to be tiered).
pub(crate) fn cold_partitions(
    table: &deltalake::DeltaTable,
    moving: &[String],
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let Ok(snap) = table.snapshot() else {
        return out;
    };
    for f in snap.log_data().iter() {
        let path = f.path();
        if !path.contains("://") && !moving.iter().any(|m| *m == path) {
            continue;
        }
        for (column, value) in f.partition_values_map() {
            if let Some(v) = value {
                let values = out.entry(column).or_default();
                if !values.contains(&v) {
                    values.push(v);
                }
            }
        }
    }
    out
}

/// The data files of the table's current version.
fn file_count(table: &deltalake::DeltaTable) -> u64 {
    table
        .snapshot()
        .map(|s| s.log_data().iter().count() as u64)
        .unwrap_or(0)
}

/// `7d`, `12h`, `90s`: the largest whole unit.
pub(crate) fn duration_text(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
