//! Running assets in dependency order: pipelines (source -> quarantine -> sink commit) and
//! models (render -> DataFusion -> materialize), with retries for external failures and a
//! run summary of rows read, written and quarantined.
//!
//! ```text
//!  pipeline:  committed txn N ─► manifest N ─► plan (new files) ─► read ─► budget check
//!               ─► manifest N+1 ─► quarantine commit (txn N+1) ─► data commit (txn N+1)
//! ```
//! A crash anywhere before the data commit leaves the table at N, so the rerun plans the
//! same files again; the quarantine commit is skipped if it already holds N+1.

pub mod alert;
pub mod cdc;
mod gate;
mod pipeline;
mod quarantine;
mod run;
pub mod schedule;
pub mod store;
pub mod stream;
mod test;
pub mod worker;

pub use pipeline::app_id;
pub use run::{
    check_partition, enqueue, execute, notify_recovered, project_session, run, worker_id,
    AssetResult, AssetStatus, ProgressFn, RunOptions, RunSummary,
};
pub use store::Store;
pub use test::test;
