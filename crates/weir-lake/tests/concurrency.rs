//! Several writers on one table at once: appends, a merge and compaction. Delta's
//! optimistic concurrency must hold: every write either lands or fails with a retryable
//! conflict (and is retried), so no acknowledged commit is lost and the final rows are
//! exactly the expected set.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use weir_common::retry::{retry, RetryPolicy};
use weir_common::Error;
use weir_config::WriteMode;
use weir_lake::{Lake, OptimizeSpec, WriteOptions, WriteSpec};

const TABLE: &str = "raw.items";
const BASE: i64 = 100;
const APPENDERS: i64 = 3;
const APPENDS: i64 = 4;
const APPEND_ROWS: i64 = 25;
const MERGES: i64 = 3;

fn batch(ids: impl Iterator<Item = i64>, v: i64) -> RecordBatch {
    let ids: Vec<i64> = ids.collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let vs = vec![v; ids.len()];
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(Int64Array::from(vs)),
        ],
    )
    .unwrap()
}

async fn write(lake: &Lake, rows: RecordBatch, mode: WriteMode) -> Result<(), Error> {
    let ctx = weir_lake::new_session();
    let df = ctx.read_batch(rows).unwrap();
    let spec = WriteSpec {
        mode,
        key: if mode == WriteMode::Merge {
            vec!["id".into()]
        } else {
            vec![]
        },
        ..Default::default()
    };
    lake.write(TABLE, &ctx, df, &spec, &WriteOptions::default())
        .await
        .map(|_| ())
}

/// Runs `op` with retries of conflicts; counts the retries.
async fn with_retries<F, Fut>(retries: &std::sync::atomic::AtomicU32, op: F) -> Result<(), Error>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    let policy = RetryPolicy {
        max_attempts: 30,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(100),
    };
    retry(
        &policy,
        |_, e, _| {
            assert!(e.message.contains("concurrent"), "unexpected error: {e}");
            retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        },
        op,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_merges_and_optimize_lose_no_commit() {
    let dir = tempfile::tempdir().unwrap();
    concurrent_writers(Lake::new(dir.path().to_string_lossy().to_string())).await;
}

/// On S3 the commits race through conditional puts (`If-None-Match: *`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_merges_and_optimize_lose_no_commit_on_s3() {
    let server = weir_test::S3Server::shared();
    let options = server
        .options()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let root = format!(
        "s3://{}/concurrency-{}",
        weir_test::S3Server::BUCKET,
        std::process::id()
    );
    concurrent_writers(Lake::with_options(root, options)).await;
}

async fn concurrent_writers(lake: Lake) {
    write(&lake, batch(0..BASE, 0), WriteMode::Append)
        .await
        .unwrap();
    let retries = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for a in 0..APPENDERS {
        let (lake, retries) = (lake.clone(), retries.clone());
        tasks.spawn(async move {
            for n in 0..APPENDS {
                let start = 1_000 * (a + 1) + n * APPEND_ROWS;
                with_retries(&retries, |_| {
                    write(
                        &lake,
                        batch(start..start + APPEND_ROWS, -1),
                        WriteMode::Append,
                    )
                })
                .await?;
            }
            Ok::<_, Error>(())
        });
    }
    {
        // Round r sets v = r on the base rows and inserts one new row 10_000 + r.
        let (lake, retries) = (lake.clone(), retries.clone());
        tasks.spawn(async move {
            for r in 1..=MERGES {
                let rows = batch((0..BASE).chain([10_000 + r]), r);
                with_retries(&retries, |_| write(&lake, rows.clone(), WriteMode::Merge)).await?;
            }
            Ok(())
        });
    }
    {
        let (lake, retries) = (lake.clone(), retries.clone());
        tasks.spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(30)).await;
                with_retries(&retries, |_| async {
                    lake.optimize(TABLE, &OptimizeSpec::default())
                        .await
                        .map(|_| ())
                })
                .await?;
            }
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }

    // The rows: every appended id once with v = -1, the base and merged rows with the
    // last merge round's value.
    let ctx = weir_lake::new_session();
    let table = lake.open_existing(TABLE).await.unwrap();
    let df = ctx
        .read_table(table.table_provider().await.unwrap())
        .unwrap();
    let mut got = BTreeMap::new();
    for b in df.collect().await.unwrap() {
        let ids = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        let vs = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
        for i in 0..b.num_rows() {
            assert!(
                got.insert(ids.value(i), vs.value(i)).is_none(),
                "id {} twice",
                ids.value(i)
            );
        }
    }
    let mut expected = BTreeMap::new();
    for id in 0..BASE {
        expected.insert(id, MERGES);
    }
    for r in 1..=MERGES {
        expected.insert(10_000 + r, r);
    }
    for a in 0..APPENDERS {
        for id in 1_000 * (a + 1)..1_000 * (a + 1) + APPENDS * APPEND_ROWS {
            expected.insert(id, -1);
        }
    }
    assert_eq!(got, expected);

    // Every acknowledged write is one commit in the log, versions without gaps.
    let history = lake.history(TABLE, None).await.unwrap();
    let count = |op: &str| history.iter().filter(|h| h.operation == op).count() as i64;
    assert_eq!(count("WRITE"), 1 + APPENDERS * APPENDS);
    assert_eq!(count("MERGE"), MERGES);
    let versions: Vec<u64> = history.iter().rev().map(|h| h.version).collect();
    assert_eq!(versions, (0..versions.len() as u64).collect::<Vec<_>>());
    eprintln!(
        "{} commits ({} optimize), {} conflicts retried",
        history.len(),
        count("OPTIMIZE"),
        retries.load(std::sync::atomic::Ordering::Relaxed)
    );
}
