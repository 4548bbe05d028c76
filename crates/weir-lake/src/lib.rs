//! The lake: Delta tables under one root, addressed as `schema.table`.
//!
//! ```text
//!   <root>/<schema>/<table>/_delta_log/...        the Delta table
//!   <root>/<schema>/<table>/_weir/positions/<id>/<N>.json   source position manifests
//!   <root>/<schema>/<table>__quarantine/          rejected rows of that table's loads
//! ```
//!
//! **Idempotent commits.** Every write made for a pipeline carries a Delta `txn` action
//! `(app_id = weir:<pipeline>, version = N)` in the same commit as the data. Before
//! committing, the writer reads the table's txn version: if it is already `N`, the write
//! landed earlier (a crash or an ambiguous error after the commit) and is skipped. A source
//! position too large for a txn action (a loaded-file set) is written *before* the commit
//! as the immutable manifest `_weir/positions/<pipeline>/<N>.json`; only the manifest whose
//! `N` equals the committed txn version is trusted, so the table stays the single source of
//! truth for progress (ARCHITECTURE section 4). Vacuum never deletes `_`-prefixed paths.

mod health;
mod log;
mod maintenance;
mod policy;
mod table;
mod tier;
mod travel;
mod write;

pub use health::{TableHealth, SMALL_FILE};
pub use log::VersionCounts;
pub use maintenance::{
    OptimizeMetrics, OptimizeSpec, RestoreMetrics, VacuumMetrics, MIN_RETENTION,
};
pub use policy::{plan_files, MaintenanceReport, RetentionMetrics};
pub use table::{HistoryEntry, Lake, TableStats};
pub use tier::TieringMetrics;
pub use travel::AsOf;
pub use write::{cast_to_table, WriteMetrics, WriteOptions, WriteSpec};

use weir_common::Error;

/// A DataFusion session with the Delta planner that writes and merges need, standard SQL
/// identifier rules, and `weir.public` as the default catalog and schema.
pub fn new_session() -> datafusion::prelude::SessionContext {
    let overrides: std::collections::HashMap<String, String> = [
        ("datafusion.catalog.information_schema", "true"),
        ("datafusion.catalog.default_catalog", "weir"),
        ("datafusion.catalog.default_schema", "public"),
        ("datafusion.sql_parser.enable_ident_normalization", "true"),
        // A join side of up to 1M rows / 32 MiB is built once and shared by every
        // partition, instead of hash-repartitioning both sides (DataFusion's default
        // limits, 128k rows / 1 MiB, repartitioned a 10M-row table to join 110k keys).
        (
            "datafusion.optimizer.hash_join_single_partition_threshold",
            "33554432",
        ),
        (
            "datafusion.optimizer.hash_join_single_partition_threshold_rows",
            "1048576",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let ctx =
        deltalake::delta_datafusion::DeltaSessionContext::new_with_session_overrides(&overrides)
            .unwrap_or_default()
            .into_inner();
    if ctx.catalog("weir").is_none() {
        ctx.register_catalog(
            "weir",
            std::sync::Arc::new(datafusion::catalog::MemoryCatalogProvider::new()),
        );
    }
    ctx
}

/// Maps a delta-rs error to a weir error with the right domain.
pub fn delta_error(context: impl std::fmt::Display, err: deltalake::DeltaTableError) -> Error {
    use deltalake::kernel::transaction::TransactionError;
    use deltalake::DeltaTableError as E;
    let text = err.to_string();
    match &err {
        E::ObjectStore { .. } | E::Io { .. } => Error::external(format!("{context}: {text}")),
        E::VersionAlreadyExists(_) => {
            Error::external(format!("{context}: concurrent commit: {text}")).conflicting()
        }
        // Another writer committed something this commit conflicts with (two overwrites,
        // two creations of one table, a merge and a delete): nothing was written, and a new
        // attempt reads the new state.
        E::Transaction {
            source:
                TransactionError::CommitConflict(_)
                | TransactionError::MaxCommitAttempts(_)
                | TransactionError::VersionAlreadyExists(_),
        } => Error::external(format!(
            "{context}: a concurrent commit to the same table conflicted: {text}"
        ))
        .conflicting(),
        E::SchemaMismatch { .. } => Error::user(format!("{context}: {text}")),
        _ if text.contains("Schema error") || text.contains("schema") => {
            Error::user(format!("{context}: {text}"))
        }
        _ => Error::external(format!("{context}: {text}")).not_retryable(),
    }
}

#[cfg(test)]
mod error_tests {
    use deltalake::kernel::transaction::{CommitConflictError, TransactionError};
    use deltalake::DeltaTableError;

    #[test]
    fn commit_conflicts_are_retryable_external_errors() {
        for conflict in [
            CommitConflictError::MetadataChanged,
            CommitConflictError::ConcurrentDeleteRead,
            CommitConflictError::ConcurrentAppend,
        ] {
            let err = super::delta_error(
                "writing `a.b`",
                DeltaTableError::Transaction {
                    source: TransactionError::CommitConflict(conflict),
                },
            );
            assert_eq!(err.domain, weir_common::Domain::External, "{err}");
            assert!(err.retryable, "{err}");
        }
        let other = super::delta_error(
            "writing `a.b`",
            DeltaTableError::Transaction {
                source: TransactionError::DeltaTableAppendOnly,
            },
        );
        assert!(!other.retryable, "{other}");
    }
}
