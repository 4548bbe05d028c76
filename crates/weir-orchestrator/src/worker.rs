//! Workers: take queued runs from the state store and execute them.

use std::time::Duration;

use weir_common::Error;
use weir_config::Project;

use crate::store::{RunRecord, Store};
use crate::{RunOptions, RunSummary};

/// Told about every run a worker finishes.
pub type OnRunDone = dyn Fn(&RunRecord, &Result<RunSummary, Error>) + Send + Sync;

/// How a worker stops.
#[derive(Clone, Copy)]
pub struct WorkerOptions {
    /// Exit once the queue is empty.
    pub drain: bool,
    /// Exit after this many runs.
    pub max_runs: Option<usize>,
    /// How long to wait between looks at an empty queue.
    pub poll: Duration,
    /// Only runs whose trigger is `LIKE` this (`backfill:%`); `None` takes any run.
    pub only: Option<&'static str>,
}

/// Takes queued runs and executes them until stopped (or drained). Returns the number of
/// runs executed and how many of them failed.
pub async fn work(
    project: &Project,
    store: &Store,
    opts: WorkerOptions,
    stop: &tokio::sync::watch::Receiver<bool>,
    on_done: &OnRunDone,
) -> Result<(usize, usize), Error> {
    let worker = crate::worker_id();
    let (mut done, mut failed) = (0, 0);
    loop {
        if *stop.borrow() {
            break;
        }
        crate::notify_recovered(&store.recover(project.config.state.lease, &worker).await?);
        if opts.max_runs.is_some_and(|m| done >= m) {
            break;
        }
        let Some(run) = store
            .claim_matching(&worker, opts.only.unwrap_or("%"))
            .await?
        else {
            if opts.drain {
                break;
            }
            let mut stop = stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(opts.poll) => continue,
                _ = stop.changed() => continue,
            }
        };
        tracing::info!(run = %run.id, worker = %worker, trigger = %run.trigger, "run claimed");
        let summary = crate::execute(project, store, &run, &worker, &RunOptions::default()).await;
        done += 1;
        if !summary.as_ref().is_ok_and(|s| s.ok) {
            failed += 1;
        }
        on_done(&run, &summary);
    }
    Ok((done, failed))
}
