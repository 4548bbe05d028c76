//! Tiering: the files of old partitions move to a cold location, and one commit swaps each
//! file's entry for the same file at its absolute cold URL, so the table keeps reading
//! every row (time travel too) while the hot copies become ordinary removed files that
//! vacuum deletes after the retention.
//!
//! ```text
//!   <lake>/raw/events/day=2024-01-01/part-1.parquet
//!        ──copy──► <to>/raw/events/day=2024-01-01/part-1.parquet
//!   commit: remove(day=2024-01-01/part-1.parquet) + add(file:///cold/.../part-1.parquet)
//! ```
//!
//! The copy happens before the commit: a crash in between leaves a stray cold copy that the
//! next run overwrites, never a table entry without its file.

use chrono::{NaiveDate, NaiveDateTime};
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::Action;
use object_store::ObjectStoreExt;
use serde::Serialize;
use url::Url;
use weir_common::Error;
use weir_config::TieringPolicy;

use crate::{delta_error, Lake};

/// What tiering moved (or would move).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TieringMetrics {
    /// Partitions whose column is before this moved.
    pub cutoff: String,
    pub to: String,
    /// The moved files, relative to the table.
    pub files: Vec<String>,
    pub bytes: u64,
    /// The table's version after the move (none in a dry run or when nothing moved).
    pub version: Option<u64>,
}

/// A partition value, as a date or a time.
#[derive(PartialEq, PartialOrd)]
enum Point {
    Date(NaiveDate),
    Time(NaiveDateTime),
}

fn point(text: &str) -> Option<Point> {
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Some(Point::Date(d));
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(Point::Time(t.naive_utc()));
    }
    ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
        .map(Point::Time)
}

impl Lake {
    /// The cold location of table `name` under `to`, as a directory URL.
    fn cold_url(&self, name: &str, to: &str) -> Result<Url, Error> {
        let base = if to.contains("://") {
            Url::parse(&format!("{}/", to.trim_end_matches('/')))
                .map_err(|e| Error::user(format!("tiering `to: {to}`: {e}")))?
        } else if std::path::Path::new(to).is_absolute() {
            std::fs::create_dir_all(to)
                .map_err(|e| Error::io(format!("creating the cold location {to}"), e))?;
            Url::from_directory_path(to)
                .map_err(|_| Error::user(format!("tiering `to: {to}` is not a directory path")))?
        } else {
            return Err(Error::user(format!(
                "tiering `to: {to}` must be an absolute directory or a URL"
            ))
            .with_hint("for example `to: /mnt/cold/lake` or `to: s3://my-bucket/cold`"));
        };
        base.join(&format!("{}/", name.replace('.', "/")))
            .map_err(|e| Error::user(format!("tiering `to: {to}`: {e}")))
    }

    /// Moves (or, with `dry_run`, lists) the files of the partitions of `name` older than
    /// the rule's duration.
    pub(crate) async fn tier(
        &self,
        name: &str,
        rule: &TieringPolicy,
        dry_run: bool,
    ) -> Result<TieringMetrics, Error> {
        let table = self.open_existing(name).await?;
        let snap = table.snapshot().map_err(|e| delta_error(name, e))?;
        if !snap
            .metadata()
            .partition_columns()
            .iter()
            .any(|c| c == &rule.column)
        {
            return Err(Error::user(format!(
                "tiering of `{name}`: `{}` does not partition the table",
                rule.column
            ))
            .with_hint(
                "tiering moves whole partitions: add the column to the sink's `partition_by`",
            ));
        }
        let after = chrono::Duration::from_std(rule.after)
            .map_err(|e| Error::user(format!("tiering `after`: {e}")))?;
        let cutoff = chrono::Utc::now() - after;
        let cold = self.cold_url(name, &rule.to)?;
        let mut metrics = TieringMetrics {
            cutoff: cutoff.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            to: cold.to_string(),
            ..Default::default()
        };
        let mut moving = Vec::new();
        for f in snap.log_data().iter() {
            let path = f.path().to_string();
            // Already cold: its entry is an absolute URL.
            if path.contains("://") {
                continue;
            }
            let value = f
                .partition_values_map()
                .get(&rule.column)
                .cloned()
                .flatten();
            let old = match value.as_deref().and_then(point) {
                Some(Point::Date(d)) => d < cutoff.date_naive(),
                Some(Point::Time(t)) => t < cutoff.naive_utc(),
                None => false,
            };
            if old {
                metrics.files.push(path);
                metrics.bytes += f.size().max(0) as u64;
                moving.push(f);
            }
        }
        metrics.files.sort();
        if dry_run || moving.is_empty() {
            return Ok(metrics);
        }
        let hot = table.log_store().object_store(None);
        let cold_store = self.store_at(cold.clone())?;
        let mut actions = Vec::new();
        for f in &moving {
            let rel = f.path().to_string();
            let failed = |e: object_store::Error| {
                Error::external(format!("moving `{rel}` of `{name}` to {cold}: {e}"))
            };
            let bytes = hot
                .get(&f.object_store_path())
                .await
                .map_err(failed)?
                .bytes()
                .await
                .map_err(failed)?;
            cold_store
                .put(&object_store::path::Path::from(rel.as_str()), bytes.into())
                .await
                .map_err(failed)?;
            let target = cold
                .join(&rel)
                .map_err(|e| Error::internal(format!("cold path of `{rel}`: {e}")))?;
            #[allow(deprecated)] // the one way to carry a file's stats into a new entry
            let mut add = f.add_action();
            add.path = target.to_string();
            add.data_change = false;
            actions.push(Action::Add(add));
            actions.push(Action::Remove(f.remove_action(false)));
        }
        let commit = CommitProperties::default().with_metadata([
            ("weir.operation".to_string(), serde_json::json!("TIER")),
            (
                "weir.tier_to".to_string(),
                serde_json::json!(cold.to_string()),
            ),
        ]);
        let operation = deltalake::protocol::DeltaOperation::Optimize {
            predicate: Some(format!("{} < {}", rule.column, metrics.cutoff)),
            target_size: 0,
        };
        let committed = CommitBuilder::from(commit)
            .with_actions(actions)
            .build(Some(snap), table.log_store(), operation)
            .await
            .map_err(|e| delta_error(format!("committing the move of `{name}`"), e))?;
        metrics.version = Some(committed.version() as u64);
        Ok(metrics)
    }
}
