//! The seams between weir's parts.
//!
//! ```text
//!  Source ──SourceEvent::Batch──► (transform) ──► staged in the sink ──► commit(position)
//!     │
//!     └──SourceEvent::Bad──► quarantine (reason, location, raw text)
//! ```
//!
//! A [`Source`] pushes events into a bounded channel, so a slow sink slows the source and
//! memory stays bounded. It is told where to resume from (the [`Position`] the sink last
//! committed) and returns the position reached; the sink commits that position in the
//! same transaction as the data (ARCHITECTURE section 4).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use weir_common::Error;

/// A row that could not be read or cast, kept with everything needed to fix and replay it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadRow {
    /// Why the row was rejected.
    pub reason: String,
    /// Where it came from (file path or URL).
    pub source: String,
    /// 1-based line (CSV/NDJSON) or row number (Parquet) in the source.
    pub line: u64,
    /// The raw text of the row.
    pub raw: String,
}

/// The column a source adds, when asked, holding each row's place in the input (file
/// order, then line): later rows win when several carry the same key.
pub const SEQ_COLUMN: &str = "__weir_seq";

/// What a source emits.
#[derive(Debug)]
pub enum SourceEvent {
    Batch(RecordBatch),
    Bad(Vec<BadRow>),
}

/// A source position: opaque to everyone but the source that made it. For files it is the
/// set of loaded files; later sources store cursors, offsets or LSNs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Position(pub serde_json::Value);

/// Live counters a source updates while reading, for progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
}

impl Progress {
    pub fn add(&self, rows: u64, bytes: u64) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// What a source planned to read in this run.
#[derive(Debug, Clone)]
pub struct ReadPlan {
    /// Human description of the work units (e.g. the new files), for logs and summaries.
    pub units: Vec<String>,
    /// Position to commit after reading everything planned.
    pub next: Position,
    /// Output schema of the batches.
    pub schema: SchemaRef,
}

/// A batch source.
#[async_trait]
pub trait Source: Send + Sync {
    /// Decides what to read given the last committed position (None: from the beginning).
    async fn plan(&self, from: Option<&Position>) -> Result<ReadPlan, Error>;

    /// Reads what `plan` decided, sending events into `out`. Every row read is either in a
    /// batch or in a bad-row event.
    async fn read(
        &self,
        plan: &ReadPlan,
        out: mpsc::Sender<SourceEvent>,
        progress: Arc<Progress>,
    ) -> Result<(), Error>;
}
