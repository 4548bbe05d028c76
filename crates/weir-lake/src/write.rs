//! Writing a DataFrame into a lake table: append, overwrite, merge, replace_partitions,
//! with schema evolution and idempotent (txn-guarded) commits.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::logical_expr::{col, lit, Expr};
use datafusion::prelude::{DataFrame, SessionContext};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::operations::write::SchemaMode;
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::SaveMode;
use serde::Serialize;
use weir_common::Error;
use weir_config::{SchemaEvolution, WriteMode};

use crate::{delta_error, Lake};

/// How rows are written into a table.
#[derive(Debug, Clone, Default)]
pub struct WriteSpec {
    pub mode: WriteMode,
    pub key: Vec<String>,
    pub delete_flag: Option<String>,
    pub partition_by: Vec<String>,
    pub evolution: SchemaEvolution,
    /// With `Overwrite`: replace only the rows matching this SQL predicate (the rest of
    /// the table stays), in one commit. New columns are added.
    pub replace_where: Option<String>,
    /// Columns of hash values (hex digests): stored without dictionary encoding and with
    /// the fastest zstd level, because such values never repeat and zstd's higher levels
    /// find nothing more in them (level 1 gives the same size at a third of the time).
    pub hash_columns: Vec<String>,
    /// zstd level 1 for every column instead of 3: for frequent small commits whose files
    /// are compacted later anyway (a stream's), where compression was a sixth of the
    /// stream's CPU time.
    pub fast_compression: bool,
}

/// Commit-level options: the idempotency token and metadata recorded in the commit.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// `(app_id, version)`: skip the write when the table already has this version.
    pub txn: Option<(String, i64)>,
    /// More `(app_id, version)` txn actions recorded in the same commit, not checked:
    /// source positions such as a Kafka partition's next offset.
    pub positions: Vec<(String, i64)>,
    /// Extra commit-info entries (`weir.*`).
    pub metadata: HashMap<String, serde_json::Value>,
}

/// What a write did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WriteMetrics {
    /// Rows added (inserted or appended).
    pub rows_inserted: u64,
    pub rows_updated: u64,
    pub rows_deleted: u64,
    /// Table version after the write.
    pub version: u64,
    /// The commit had already landed (same txn version): nothing was written.
    pub skipped: bool,
}

/// The encoded size at which a Parquet row group is closed. A writer holds its row group
/// in memory until then, so this bounds a write's memory whatever the rows' width (the
/// row-count limit alone, 1M rows, held ~100 MB per writer for a table with hash columns).
const ROW_GROUP_BYTES: usize = 32 << 20;

fn writer_properties(spec: &WriteSpec) -> WriterProperties {
    let level = |l| Compression::ZSTD(ZstdLevel::try_new(l).unwrap_or_default());
    let hash_columns = &spec.hash_columns;
    let mut builder = WriterProperties::builder()
        .set_compression(level(if spec.fast_compression { 1 } else { 3 }))
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES));
    for c in hash_columns {
        let path = deltalake::parquet::schema::types::ColumnPath::from(c.as_str());
        builder = builder
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_compression(path, level(1));
    }
    builder.build()
}

/// Whether a value of `from` always fits `to` (a widening the table can absorb).
fn widens(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    matches!(
        (from, to),
        (Int8 | Int16 | Int32, Int64)
            | (Int8 | Int16, Int32)
            | (Int8, Int16)
            | (Int8 | Int16 | Int32 | Int64 | Float32, Float64)
            | (Date32, Timestamp(_, _))
            | (Utf8View | LargeUtf8, Utf8)
            | (BinaryView | LargeBinary, Binary)
            | (Null, _)
            | (Timestamp(_, _), Timestamp(_, _))
    ) || matches!((from, to), (Decimal128(p1, s1), Decimal128(p2, s2)) if *s1 <= *s2 && (*p1 as i16 - *s1 as i16) <= (*p2 as i16 - *s2 as i16))
        || matches!((from, to), (Int32 | Int64, Decimal128(p, s)) if *p as i16 - *s as i16 >= 19)
}

/// Projects `df` onto the table's types: columns the table has are cast when the cast
/// widens; an incompatible type, or a new column under `strict`, is an error with a hint.
/// Returns the projected frame and whether new columns must be added to the table.
pub fn cast_to_table(
    df: DataFrame,
    table: &Schema,
    table_name: &str,
    evolution: SchemaEvolution,
) -> Result<(DataFrame, bool), Error> {
    let mut exprs = Vec::new();
    let mut new_cols = Vec::new();
    for field in df.schema().fields() {
        let name = field.name();
        match table.field_with_name(name) {
            Ok(tf) if tf.data_type() == field.data_type() => exprs.push(col(quoted(name))),
            Ok(tf) if widens(field.data_type(), tf.data_type()) => exprs.push(
                datafusion::logical_expr::cast(col(quoted(name)), tf.data_type().clone()).alias(name),
            ),
            Ok(tf) => {
                return Err(Error::user(format!(
                    "column `{name}` of `{table_name}` is {} but the new data has {}",
                    tf.data_type(),
                    field.data_type()
                ))
                .with_hint(format!(
                    "cast it to {} in the SQL (`cast({name} as ...)`), or rebuild the table with `weir run --full-refresh`",
                    tf.data_type()
                )))
            }
            Err(_) => {
                new_cols.push(name.clone());
                exprs.push(col(quoted(name)));
            }
        }
    }
    // Columns of the table the data lacks are null in the new rows, as Delta appends them
    // (a column dropped at the source stays in the table).
    for tf in table.fields() {
        if df.schema().field_with_unqualified_name(tf.name()).is_err() && tf.is_nullable() {
            exprs.push(
                datafusion::logical_expr::cast(
                    lit(datafusion::scalar::ScalarValue::Null),
                    tf.data_type().clone(),
                )
                .alias(tf.name()),
            );
        }
    }
    if !new_cols.is_empty() && evolution == SchemaEvolution::Strict {
        return Err(Error::user(format!(
            "new column(s) {} are not in `{table_name}` and schema_evolution is `strict`",
            new_cols
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .with_hint(
            "set `schema_evolution: add_columns` on the sink, or drop the columns in `transform:`",
        ));
    }
    let df = df
        .select(exprs)
        .map_err(|e| Error::internal(format!("projecting to table schema: {e}")))?;
    Ok((df, !new_cols.is_empty()))
}

fn quoted(name: &str) -> datafusion::common::Column {
    datafusion::common::Column::new_unqualified(name)
}

fn df_err(context: &str) -> impl Fn(datafusion::error::DataFusionError) -> Error + '_ {
    move |e| Error::user(format!("{context}: {e}"))
}

impl Lake {
    /// Deletes the rows of table `name` matching the SQL `predicate`, if it has any.
    pub async fn delete_where(&self, name: &str, predicate: &str) -> Result<(), Error> {
        if !self.exists(name).await {
            return Ok(());
        }
        let table = self.open(name).await?;
        table
            .delete()
            .with_predicate(predicate.to_string())
            .await
            .map_err(|e| delta_error(format!("deleting from `{name}`"), e))?;
        Ok(())
    }

    /// Records `positions` (txn actions) and `metadata` in a commit of table `name` that
    /// changes no data: a source position that moved without rows (a CDC heartbeat).
    pub async fn commit_positions(
        &self,
        name: &str,
        positions: &[(String, i64)],
        metadata: HashMap<String, serde_json::Value>,
    ) -> Result<u64, Error> {
        use deltalake::kernel::transaction::CommitBuilder;
        let table = self.open_existing(name).await?;
        let mut commit = CommitProperties::default().with_metadata(metadata);
        for (app, n) in positions {
            commit = commit.with_application_transaction(Transaction::new(app, *n));
        }
        let snapshot = table.snapshot().map_err(|e| delta_error(name, e))?;
        let operation = deltalake::protocol::DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: None,
            predicate: None,
        };
        let committed = CommitBuilder::from(commit)
            .with_actions(Vec::new())
            .build(Some(snapshot), table.log_store(), operation)
            .await
            .map_err(|e| delta_error(format!("committing `{name}`"), e))?;
        Ok(committed.version() as u64)
    }

    /// Writes `df` into table `name` according to `spec`, once per txn version.
    pub async fn write(
        &self,
        name: &str,
        ctx: &SessionContext,
        df: DataFrame,
        spec: &WriteSpec,
        opts: &WriteOptions,
    ) -> Result<WriteMetrics, Error> {
        let table = self.open(name).await?;
        let existing = table.version().is_some();
        if let (Some((app, n)), true) = (&opts.txn, existing) {
            if let Some(v) = self.txn_version(&table, app).await? {
                if v >= *n {
                    tracing::info!(table = name, app = %app, version = n, "commit already landed; skipping");
                    return Ok(WriteMetrics {
                        skipped: true,
                        version: table.version().unwrap_or(0),
                        ..Default::default()
                    });
                }
            }
        }
        for c in spec.partition_by.iter().chain(&spec.key) {
            if df.schema().field_with_unqualified_name(c).is_err() {
                return Err(Error::user(format!(
                    "column `{c}` named in the sink of `{name}` is not in the data"
                ))
                .with_hint(format!(
                    "available columns: {}",
                    df.schema()
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        let mut commit = CommitProperties::default().with_metadata(opts.metadata.clone());
        if let Some((app, n)) = &opts.txn {
            commit = commit.with_application_transaction(Transaction::new(app, *n));
        }
        for (app, n) in &opts.positions {
            commit = commit.with_application_transaction(Transaction::new(app, *n));
        }
        let table_schema: Option<SchemaRef> = if existing {
            Some(
                table
                    .snapshot()
                    .map_err(|e| delta_error(name, e))?
                    .snapshot()
                    .arrow_schema(),
            )
        } else {
            None
        };

        // Deleted keys never reach the table: drop marked rows and the flag column.
        let (df, deletes) = match (&spec.delete_flag, spec.mode) {
            (Some(flag), WriteMode::Merge) => {
                if df.schema().field_with_unqualified_name(flag).is_err() {
                    return Err(Error::user(format!(
                        "delete_flag column `{flag}` is not in the data for `{name}`"
                    )));
                }
                let keep: Vec<Expr> = df
                    .schema()
                    .fields()
                    .iter()
                    .filter(|f| f.name() != flag)
                    .map(|f| col(quoted(f.name())))
                    .collect();
                let live = df
                    .clone()
                    .filter(col(quoted(flag)).is_not_true())
                    .and_then(|d| d.select(keep.clone()))
                    .map_err(df_err("filtering deleted rows"))?;
                let mut key_cols: Vec<Expr> = spec.key.iter().map(|k| col(quoted(k))).collect();
                key_cols.push(col(quoted(flag)));
                (
                    live,
                    Some(
                        df.select(key_cols)
                            .map_err(df_err("selecting deleted keys"))?,
                    ),
                )
            }
            _ => (df, None),
        };

        let (df, add_columns) = match (&table_schema, spec.mode) {
            (Some(ts), m) if m != WriteMode::Overwrite || spec.replace_where.is_some() => {
                cast_to_table(df, ts, name, spec.evolution)?
            }
            _ => (df, false),
        };

        if spec.mode == WriteMode::Merge && existing {
            return self
                .merge(name, table, ctx, df, deletes, spec, commit, add_columns)
                .await;
        }
        if let (WriteMode::Overwrite, true, None, Some(ts)) =
            (spec.mode, existing, &spec.replace_where, &table_schema)
        {
            if let Some(df) = same_columns(df.clone(), ts, &spec.partition_by, &table)? {
                return self
                    .overwrite_parallel(name, table, ctx, df, spec, commit)
                    .await;
            }
        }

        let mut builder = table
            .write(Vec::new())
            .with_input_plan(df.logical_plan().clone())
            .with_session_state(Arc::new(ctx.state()))
            .with_writer_properties(writer_properties(spec))
            .with_commit_properties(commit);
        if !existing && !spec.partition_by.is_empty() {
            builder = builder.with_partition_columns(spec.partition_by.clone());
        }
        match spec.mode {
            WriteMode::Append | WriteMode::Merge => {
                builder = builder.with_save_mode(SaveMode::Append);
                if add_columns {
                    builder = builder.with_schema_mode(SchemaMode::Merge);
                }
            }
            WriteMode::Overwrite if existing && spec.replace_where.is_some() => {
                builder = builder
                    .with_save_mode(SaveMode::Overwrite)
                    .with_replace_where(spec.replace_where.clone().unwrap_or_default());
                if add_columns {
                    builder = builder.with_schema_mode(SchemaMode::Merge);
                }
            }
            WriteMode::Overwrite => {
                builder = builder
                    .with_save_mode(SaveMode::Overwrite)
                    .with_schema_mode(SchemaMode::Overwrite);
                if !spec.partition_by.is_empty() {
                    builder = builder.with_partition_columns(spec.partition_by.clone());
                }
            }
            WriteMode::Scd1 | WriteMode::Scd2 | WriteMode::Scd3 | WriteMode::Snapshot => {
                return Err(Error::internal(format!(
                    "`{}` is applied by the dimension writer, not `Lake::write`",
                    spec.mode
                )));
            }
            WriteMode::ReplacePartitions => {
                if spec.partition_by.is_empty() {
                    return Err(Error::user(format!(
                        "`replace_partitions` on `{name}` needs `partition_by`"
                    ))
                    .with_hint("name the partition columns whose values the new data replaces"));
                }
                if existing {
                    let predicate = partition_predicate(&df, &spec.partition_by).await?;
                    builder = builder.with_save_mode(SaveMode::Overwrite);
                    match predicate {
                        Some(p) => builder = builder.with_replace_where(p),
                        None => {
                            // No rows: nothing to replace.
                            return Ok(WriteMetrics {
                                version: self.open(name).await?.version().unwrap_or(0),
                                ..Default::default()
                            });
                        }
                    }
                    if add_columns {
                        builder = builder.with_schema_mode(SchemaMode::Merge);
                    }
                } else {
                    builder = builder.with_save_mode(SaveMode::Append);
                }
            }
        }
        let table = builder
            .await
            .map_err(|e| delta_error(format!("writing `{name}`"), e))?;
        let version = table.version().unwrap_or(0);
        let rows = crate::log::commit_info(&table, name, version)
            .await?
            .get("operationMetrics")
            .and_then(|m| m.get("num_added_rows"))
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        Ok(WriteMetrics {
            rows_inserted: rows,
            version,
            ..Default::default()
        })
    }

    /// Replaces every row of an existing unpartitioned table with `df` (already in the
    /// table's schema), one Parquet writer per input partition: delta-rs encodes an
    /// unpartitioned write on a single core. The new files and the removal of the old ones
    /// are one commit.
    async fn overwrite_parallel(
        &self,
        name: &str,
        table: deltalake::DeltaTable,
        ctx: &SessionContext,
        df: DataFrame,
        spec: &WriteSpec,
        commit: CommitProperties,
    ) -> Result<WriteMetrics, Error> {
        use deltalake::kernel::transaction::CommitBuilder;
        use deltalake::kernel::Action;
        use deltalake::writer::{DeltaWriter, RecordBatchWriter};
        use futures::{StreamExt, TryStreamExt};
        // The plan runs on every core as usual; its batches are dealt round-robin to one
        // writer per core (the plan's own partitions may be few or uneven: one big file
        // scanned as one).
        let writers = ctx.state().config().target_partitions().max(1);
        let mut stream = df
            .execute_stream()
            .await
            .map_err(df_err("running the write"))?;
        let mut tasks = tokio::task::JoinSet::new();
        let mut senders = Vec::new();
        for _ in 0..writers {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<arrow::record_batch::RecordBatch>(2);
            senders.push(tx);
            let mut writer = RecordBatchWriter::for_table(&table)
                .map_err(|e| delta_error(format!("writing `{name}`"), e))?
                .with_writer_properties(writer_properties(spec));
            let context = format!("writing `{name}`");
            tasks.spawn(async move {
                let mut rows = 0u64;
                while let Some(batch) = rx.recv().await {
                    rows += batch.num_rows() as u64;
                    writer
                        .write(batch)
                        .await
                        .map_err(|e| delta_error(&context, e))?;
                }
                let adds = writer.flush().await.map_err(|e| delta_error(&context, e))?;
                Ok::<_, Error>((adds, rows))
            });
        }
        let mut next = 0;
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| Error::user(format!("writing `{name}`: {e}")))?;
            if batch.num_rows() == 0 {
                continue;
            }
            // A writer that stopped has failed: its error is reported below.
            if senders[next % writers].send(batch).await.is_err() {
                break;
            }
            next += 1;
        }
        drop(senders);
        let mut actions: Vec<Action> = Vec::new();
        let mut rows = 0u64;
        while let Some(done) = tasks.join_next().await {
            let (adds, n) =
                done.map_err(|e| Error::internal(format!("writer task of `{name}`: {e}")))??;
            rows += n;
            actions.extend(adds.into_iter().map(Action::Add));
        }
        let snapshot = table.snapshot().map_err(|e| delta_error(name, e))?;
        let removes: Vec<Action> = snapshot
            .snapshot()
            .file_views(table.log_store().as_ref(), None)
            .map_ok(|f| Action::Remove(f.remove_action(true)))
            .try_collect()
            .await
            .map_err(|e| delta_error(format!("listing the files of `{name}`"), e))?;
        actions.extend(removes);
        let operation = deltalake::protocol::DeltaOperation::Write {
            mode: SaveMode::Overwrite,
            partition_by: None,
            predicate: None,
        };
        let committed = CommitBuilder::from(commit)
            .with_actions(actions)
            .build(Some(snapshot), table.log_store(), operation)
            .await
            .map_err(|e| delta_error(format!("committing `{name}`"), e))?;
        Ok(WriteMetrics {
            rows_inserted: rows,
            version: committed.version() as u64,
            ..Default::default()
        })
    }

    #[allow(clippy::too_many_arguments)] // one call site; a struct would only rename these
    async fn merge(
        &self,
        name: &str,
        table: deltalake::DeltaTable,
        ctx: &SessionContext,
        live: DataFrame,
        deletes: Option<DataFrame>,
        spec: &WriteSpec,
        commit: CommitProperties,
        add_columns: bool,
    ) -> Result<WriteMetrics, Error> {
        if spec.key.is_empty() {
            return Err(Error::user(format!("merge into `{name}` needs `key`"))
                .with_hint("name the column(s) that identify a row, e.g. `key: [order_id]`"));
        }
        // One source row per key, or Delta's merge would be ambiguous.
        let mut keys: Vec<Expr> = spec.key.iter().map(|k| col(quoted(k))).collect();
        let source = match &deletes {
            // Deleted keys join as rows whose non-key columns are null, flagged for deletion.
            Some(del) => {
                let flag = spec.delete_flag.clone().unwrap_or_default();
                let live_cols: Vec<String> = live
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect();
                let live_x = live
                    .clone()
                    .with_column("__weir_delete", lit(false))
                    .map_err(df_err("merge source"))?;
                let mut del_exprs: Vec<Expr> = Vec::new();
                for c in &live_cols {
                    if spec.key.contains(c) {
                        del_exprs.push(col(quoted(c)));
                    } else {
                        let dt = live
                            .schema()
                            .field_with_unqualified_name(c)
                            .map(|f| f.data_type().clone())
                            .unwrap_or(DataType::Null);
                        del_exprs.push(
                            datafusion::logical_expr::cast(
                                lit(datafusion::scalar::ScalarValue::Null),
                                dt,
                            )
                            .alias(c),
                        );
                    }
                }
                del_exprs.push(lit(true).alias("__weir_delete"));
                let dels = del
                    .clone()
                    .filter(col(quoted(&flag)).is_true())
                    .and_then(|d| d.select(del_exprs))
                    .map_err(df_err("merge source"))?;
                live_x.union(dels).map_err(df_err("merge source"))?
            }
            None => live
                .clone()
                .with_column("__weir_delete", lit(false))
                .map_err(df_err("merge source"))?,
        };
        keys.push(datafusion::functions_aggregate::count::count(lit(1)).alias("__n"));
        let dupes = source
            .clone()
            .aggregate(
                spec.key.iter().map(|k| col(quoted(k))).collect(),
                vec![keys.pop().unwrap_or(lit(1))],
            )
            .and_then(|d| d.filter(col("__n").gt(lit(1i64))))
            .and_then(|d| d.limit(0, Some(1)))
            .map_err(df_err("checking merge keys"))?
            .collect()
            .await
            .map_err(df_err("checking merge keys"))?;
        if dupes.iter().any(|b| b.num_rows() > 0) {
            let shown = arrow::util::pretty::pretty_format_batches(&dupes)
                .map(|d| d.to_string())
                .unwrap_or_default();
            return Err(Error::user(format!(
                "merge into `{name}`: the new data has several rows for one key ({})\n{shown}",
                spec.key.join(", ")
            ))
            .with_hint("keep one row per key in the SQL, e.g. `qualify row_number() over (partition by key order by updated_at desc) = 1`; a pipeline transform that keeps the column `__weir_seq` (select *) lets the last row of each key win"));
        }
        let predicate = spec
            .key
            .iter()
            .map(|k| format!("target.\"{k}\" = source.\"{k}\""))
            .collect::<Vec<_>>()
            .join(" AND ");
        let cols: Vec<String> = live
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let mut builder = table
            .merge(source, predicate)
            .with_source_alias("source")
            .with_target_alias("target")
            .with_session_state(Arc::new(ctx.state()))
            .with_writer_properties(writer_properties(spec))
            .with_commit_properties(commit)
            .with_merge_schema(add_columns);
        if deletes.is_some() {
            builder = builder
                .when_matched_delete(|d| d.predicate("source.__weir_delete"))
                .map_err(|e| delta_error("merge", e))?;
        }
        let upd_cols = cols.clone();
        builder = builder
            .when_matched_update(move |mut u| {
                u = u.predicate("NOT source.__weir_delete");
                for c in &upd_cols {
                    u = u.update(format!("\"{c}\""), format!("source.\"{c}\""));
                }
                u
            })
            .map_err(|e| delta_error("merge", e))?
            .when_not_matched_insert(move |mut i| {
                i = i.predicate("NOT source.__weir_delete");
                for c in &cols {
                    i = i.set(format!("\"{c}\""), format!("source.\"{c}\""));
                }
                i
            })
            .map_err(|e| delta_error("merge", e))?;
        let (table, m) = builder
            .await
            .map_err(|e| delta_error(format!("merging into `{name}`"), e))?;
        Ok(WriteMetrics {
            rows_inserted: m.num_target_rows_inserted as u64,
            rows_updated: m.num_target_rows_updated as u64,
            rows_deleted: m.num_target_rows_deleted as u64,
            version: table.version().unwrap_or(0),
            skipped: false,
        })
    }
}

/// `df` cast to the table's schema when both have the same columns in the same order,
/// with types the table's absorb, and neither is partitioned: what an overwrite can write
/// without changing the table's metadata.
fn same_columns(
    df: DataFrame,
    table: &Schema,
    partition_by: &[String],
    delta: &deltalake::DeltaTable,
) -> Result<Option<DataFrame>, Error> {
    let partitioned = delta
        .snapshot()
        .map(|s| !s.metadata().partition_columns().is_empty())
        .unwrap_or(true);
    let fields = df.schema().fields();
    let same = !partitioned
        && partition_by.is_empty()
        && fields.len() == table.fields().len()
        && fields.iter().zip(table.fields()).all(|(a, b)| {
            a.name() == b.name()
                && (a.data_type() == b.data_type() || widens(a.data_type(), b.data_type()))
        });
    if !same {
        return Ok(None);
    }
    let exprs: Vec<Expr> = table
        .fields()
        .iter()
        .map(|f| {
            datafusion::logical_expr::cast(col(quoted(f.name())), f.data_type().clone())
                .alias(f.name())
        })
        .collect();
    df.select(exprs)
        .map(Some)
        .map_err(|e| Error::internal(format!("projecting to table schema: {e}")))
}

/// `p1 = v1 AND p2 = v2 OR ...` over the distinct partition values of `df`.
async fn partition_predicate(df: &DataFrame, cols: &[String]) -> Result<Option<Expr>, Error> {
    let batches = df
        .clone()
        .select(cols.iter().map(|c| col(quoted(c))).collect::<Vec<_>>())
        .and_then(|d| d.distinct())
        .map_err(df_err("finding partitions"))?
        .collect()
        .await
        .map_err(df_err("finding partitions"))?;
    let mut ors: Option<Expr> = None;
    for b in &batches {
        for row in 0..b.num_rows() {
            let mut and: Option<Expr> = None;
            for (i, c) in cols.iter().enumerate() {
                let v = datafusion::scalar::ScalarValue::try_from_array(b.column(i), row)
                    .map_err(|e| Error::internal(format!("partition value: {e}")))?;
                let term = if v.is_null() {
                    col(quoted(c)).is_null()
                } else {
                    col(quoted(c)).eq(lit(v))
                };
                and = Some(match and {
                    None => term,
                    Some(a) => a.and(term),
                });
            }
            if let Some(a) = and {
                ors = Some(match ors {
                    None => a,
                    Some(o) => o.or(a),
                });
            }
        }
    }
    Ok(ors)
}
