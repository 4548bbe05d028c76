//! A table fed by a channel: how rows flowing out of a source reach DataFusion (a transform,
//! then the Delta writer) without first gathering them in memory.
//!
//! The table has several partitions that all pull from one bounded channel, so the
//! consumers (projection, casts, Parquet encoding) run on every core while the producer
//! sees backpressure as soon as they fall behind. An error sent down the channel fails the
//! query that reads it, which is how a producer vetoes the commit after the last row.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::catalog::TableProvider;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use tokio::sync::{mpsc, Mutex};
use weir_common::Error;

/// What producers send: a batch, or the reason the query must fail.
pub type BatchResult = Result<RecordBatch, DataFusionError>;

struct ChannelPartition {
    schema: SchemaRef,
    rx: Arc<Mutex<mpsc::Receiver<BatchResult>>>,
}

impl fmt::Debug for ChannelPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelPartition").finish_non_exhaustive()
    }
}

impl PartitionStream for ChannelPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let rx = self.rx.clone();
        let stream = futures::stream::unfold(rx, |rx| async move {
            let next = rx.lock().await.recv().await;
            next.map(|item| (item, rx))
        });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

/// A table of `schema` whose rows are what arrives on `rx`, read by `partitions` consumers.
/// It can be scanned once: a second scan sees the channel already drained.
pub fn channel_table(
    schema: SchemaRef,
    rx: mpsc::Receiver<BatchResult>,
    partitions: usize,
) -> Result<Arc<dyn TableProvider>, Error> {
    let rx = Arc::new(Mutex::new(rx));
    let parts: Vec<Arc<dyn PartitionStream>> = (0..partitions.max(1))
        .map(|_| {
            Arc::new(ChannelPartition {
                schema: schema.clone(),
                rx: rx.clone(),
            }) as Arc<dyn PartitionStream>
        })
        .collect();
    let table = StreamingTable::try_new(schema, parts)
        .map_err(|e| Error::internal(format!("channel table: {e}")))?;
    Ok(Arc::new(table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(schema: &SchemaRef, from: i64, n: i64) -> RecordBatch {
        let ids: Int64Array = (from..from + n).collect();
        RecordBatch::try_new(schema.clone(), vec![Arc::new(ids)]).expect("batch")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_row_arrives_once_across_partitions() {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let (tx, rx) = mpsc::channel(2);
        let table = channel_table(schema.clone(), rx, 3).expect("table");
        let producer = {
            let schema = schema.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    tx.send(Ok(batch(&schema, i * 100, 100)))
                        .await
                        .expect("send");
                }
            })
        };
        let ctx = weir_lake::new_session();
        let df = ctx.read_table(table).expect("frame");
        let out = df
            .aggregate(
                vec![],
                vec![
                    datafusion::functions_aggregate::count::count(datafusion::prelude::col("id")),
                    datafusion::functions_aggregate::count::count_distinct(
                        datafusion::prelude::col("id"),
                    ),
                ],
            )
            .expect("aggregate")
            .collect()
            .await
            .expect("collect");
        producer.await.expect("producer");
        let counts: Vec<i64> = (0..2)
            .map(|i| {
                out[0]
                    .column(i)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("count")
                    .value(0)
            })
            .collect();
        assert_eq!(counts, vec![5000, 5000]);
        assert_eq!(out[0].column(0).len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_error_sent_by_the_producer_fails_the_query() {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let (tx, rx) = mpsc::channel(2);
        let table = channel_table(schema.clone(), rx, 2).expect("table");
        tx.send(Ok(batch(&schema, 0, 10))).await.expect("send");
        tx.send(Err(DataFusionError::External("too many bad rows".into())))
            .await
            .expect("send");
        drop(tx);
        let ctx = weir_lake::new_session();
        let err = ctx
            .read_table(table)
            .expect("frame")
            .collect()
            .await
            .expect_err("the producer's error fails the query");
        assert!(err.to_string().contains("too many bad rows"), "{err}");
    }
}
