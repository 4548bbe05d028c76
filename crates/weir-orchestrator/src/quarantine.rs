//! The quarantine table of an asset (`<table>__quarantine`): rows that could not be read
//! or cast, and rows refused by an `on_fail: quarantine` check, each with its reason,
//! source, line and raw text.
//!
//! Rows carry the load number they belong to. Writing a load's rows replaces those an
//! earlier attempt at the same load left (it failed after its quarantine commit), in one
//! commit: a replay writes the same rows again, changed input exactly its own rows. Rows of
//! a partitioned asset also carry their `partition_key`: loading a partition again replaces
//! its quarantined rows as it replaces its data.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use weir_common::Error;
use weir_core::BadRow;
use weir_lake::{Lake, WriteOptions, WriteSpec};

/// The `source` of rows refused by checks.
pub const CHECKS_SOURCE: &str = "checks";

/// Which of a load's quarantined rows a write replaces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scope {
    /// Rows that failed reading or casting.
    Read,
    /// Rows refused by checks.
    Checks,
}

pub struct Target<'a> {
    pub lake: &'a Lake,
    pub table: &'a str,
    pub pipeline: &'a str,
    pub run_id: &'a str,
    pub load: i64,
    /// The partition loaded, for partitioned assets.
    pub partition: Option<&'a str>,
    pub metadata: &'a HashMap<String, serde_json::Value>,
}

/// Commits `bad` as the quarantined rows of `scope` for the target's load.
pub async fn write(t: &Target<'_>, scope: Scope, bad: &[BadRow]) -> Result<(), Error> {
    let scope_sql = match scope {
        Scope::Read => format!("source <> '{CHECKS_SOURCE}'"),
        Scope::Checks => format!("source = '{CHECKS_SOURCE}'"),
    };
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    // Quarantine tables from before the `load` column are appended to as they were; the
    // `partition_key` column is added by the first partitioned write.
    let schema = t.lake.schema(t.table).await?;
    let has = |c: &str| {
        schema
            .as_ref()
            .is_some_and(|s| s.field_with_name(c).is_ok())
    };
    let has_load = has("load");
    let this_load = match t.partition {
        Some(k) if has("partition_key") => format!(
            "pipeline = {} AND partition_key = {} AND {scope_sql}",
            lit(t.pipeline),
            lit(k)
        ),
        _ => format!(
            "pipeline = {} AND load = {} AND {scope_sql}",
            lit(t.pipeline),
            t.load
        ),
    };
    if bad.is_empty() {
        if has_load {
            t.lake.delete_where(t.table, &this_load).await?;
        }
        return Ok(());
    }
    let q = batch(bad, t)?;
    let ctx = weir_lake::new_session();
    let df = ctx
        .read_batch(q)
        .map_err(|e| Error::internal(format!("quarantine frame: {e}")))?;
    let spec = if t.lake.exists(t.table).await && has_load {
        WriteSpec {
            mode: weir_config::WriteMode::Overwrite,
            replace_where: Some(this_load),
            ..Default::default()
        }
    } else {
        WriteSpec::default()
    };
    let opts = WriteOptions {
        txn: None,
        positions: Vec::new(),
        metadata: t.metadata.clone(),
    };
    t.lake.write(t.table, &ctx, df, &spec, &opts).await?;
    Ok(())
}

fn batch(bad: &[BadRow], t: &Target<'_>) -> Result<RecordBatch, Error> {
    let (pipeline, run_id, load) = (t.pipeline, t.run_id, t.load);
    let now = chrono::Utc::now().timestamp_micros();
    let schema = Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("load", DataType::Int64, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("line", DataType::Int64, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("raw", DataType::Utf8, false),
        Field::new(
            "quarantined_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("partition_key", DataType::Utf8, true),
    ]));
    let n = bad.len();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![run_id; n])),
        Arc::new(StringArray::from(vec![pipeline; n])),
        Arc::new(Int64Array::from(vec![load; n])),
        Arc::new(StringArray::from(
            bad.iter().map(|b| b.source.as_str()).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            bad.iter().map(|b| b.line as i64).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            bad.iter().map(|b| b.reason.as_str()).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            bad.iter().map(|b| b.raw.as_str()).collect::<Vec<_>>(),
        )),
        Arc::new(TimestampMicrosecondArray::from(vec![now; n]).with_timezone("UTC")),
        Arc::new(StringArray::from(vec![t.partition; n])),
    ];
    RecordBatch::try_new(schema, cols)
        .map_err(|e| Error::internal(format!("quarantine batch: {e}")))
}
