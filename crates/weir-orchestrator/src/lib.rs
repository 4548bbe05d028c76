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

mod gate;
mod pipeline;
mod quarantine;
mod run;
mod test;

pub use pipeline::app_id;
pub use run::{project_session, run, AssetResult, AssetStatus, ProgressFn, RunOptions, RunSummary};
pub use test::test;
