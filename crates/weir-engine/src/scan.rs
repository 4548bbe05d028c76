//! weir's scan of a Delta table: a DataFusion Parquet scan of the snapshot's files, built
//! straight from the log's add actions.
//!
//! - Files are skipped by their partition values and the log's min/max/null counts
//!   before any is opened; a `LIMIT` without filters reads only the files it needs.
//! - The scan reports the table's row count and every column's min, max and null count,
//!   so DataFusion sizes joins from the log (build sides, single-partition joins).
//! - Inside the files, DataFusion's own Parquet reader prunes row groups and pages with
//!   the filters it pushes down, with the session's Parquet settings.
//!
//! Tables this scan cannot read exactly (column mapping, deletion vectors, reader features
//! it does not know, files in another store) are read by delta-rs' provider instead:
//! [`LakeScan::try_new`] says `None`.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, FieldRef, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::stats::Precision;
use datafusion::common::{Column, ColumnStatistics, DFSchema, ScalarValue, Statistics};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::object_store::ObjectStoreUrl;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::datasource::table_schema::TableSchema;
use datafusion::datasource::TableType;
use datafusion::error::Result as DfResult;
use datafusion::functions_aggregate::min_max::{MaxAccumulator, MinAccumulator};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::Accumulator;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_optimizer::pruning::{PruningPredicateBuilder, PruningStatistics};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::ExecutionPlan;
use deltalake::DeltaTable;

/// Reader features whose tables this scan reads as plain Parquet files. Column mapping
/// and deletion vectors are checked apart: they are fine while unused.
const KNOWN_READER_FEATURES: &[&str] = &[
    "timestampNtz",
    "v2Checkpoint",
    "vacuumProtocolCheck",
    "columnMapping",
    "deletionVectors",
];

/// One version of a Delta table, scanned as Parquet files.
#[derive(Debug)]
pub(crate) struct LakeScan {
    /// The table's columns in the log's order (strings as views when the session reads
    /// them so).
    schema: SchemaRef,
    /// The columns stored in the files, then the partition columns: what the Parquet
    /// scan produces.
    table_schema: TableSchema,
    /// For each column of `schema`, its position in `table_schema`.
    positions: Vec<usize>,
    store: ObjectStoreUrl,
    files: Vec<File>,
    /// Per column of `schema`: the files' min, max and null counts, one row per file.
    stats: Vec<ColumnArrays>,
    rows: Option<Int64Array>,
}

#[derive(Debug, Clone)]
struct File {
    location: String,
    size: u64,
    partition_values: Vec<ScalarValue>,
}

#[derive(Debug, Default, Clone)]
struct ColumnArrays {
    min: Option<ArrayRef>,
    max: Option<ArrayRef>,
    nulls: Option<ArrayRef>,
}

impl LakeScan {
    /// The scan of `table`'s loaded version, or `None` when the table needs delta-rs'
    /// reader (see the module docs). `views`: strings and binaries read as view types.
    pub(crate) fn try_new(table: &DeltaTable, views: bool) -> Option<Self> {
        let state = table.snapshot().ok()?;
        let snapshot = state.snapshot();
        let protocol = snapshot.protocol();
        if protocol.min_reader_version() >= 3 {
            let features = protocol.reader_features().unwrap_or_default();
            if features
                .iter()
                .any(|f| !KNOWN_READER_FEATURES.contains(&f.to_string().as_str()))
            {
                return None;
            }
        }
        let metadata = snapshot.metadata();
        if metadata
            .configuration()
            .get("delta.columnMapping.mode")
            .is_some_and(|m| m != "none")
        {
            return None;
        }
        let adds = state.add_actions_table(true).ok()?;
        if has_deletion_vectors(&adds) {
            return None;
        }
        let root = table.table_url().clone();
        let store = store_url(&root)?;
        let delta_schema = snapshot.arrow_schema();
        let partition_columns = metadata.partition_columns().to_vec();
        let fields: Vec<FieldRef> = delta_schema
            .fields()
            .iter()
            .map(|f| if views { viewed(f) } else { f.clone() })
            .collect();
        let schema = Arc::new(Schema::new(fields.clone()));
        let (file_fields, partition_fields): (Vec<_>, Vec<_>) = fields
            .iter()
            .cloned()
            .partition(|f| !partition_columns.contains(f.name()));
        let positions = fields
            .iter()
            .map(
                |f| match partition_fields.iter().position(|p| p.name() == f.name()) {
                    Some(i) => file_fields.len() + i,
                    None => file_fields
                        .iter()
                        .position(|x| x.name() == f.name())
                        .unwrap_or_default(),
                },
            )
            .collect();
        let table_schema = TableSchema::builder(Arc::new(Schema::new(file_fields)))
            .with_table_partition_cols(partition_fields.clone())
            .build();
        let files = files_of(&adds, &root, &store, &partition_fields)?;
        let stats = fields.iter().map(|f| column_arrays(&adds, f)).collect();
        let rows = adds
            .column_by_name("num_records")
            .and_then(|c| arrow::compute::cast(c, &DataType::Int64).ok())
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned())
            .filter(|r| r.null_count() == 0);
        Some(Self {
            schema,
            table_schema,
            positions,
            store,
            files,
            stats,
            rows,
        })
    }

    /// Which files may hold rows matching all of `filters` (`true` to read).
    fn keep(&self, state: &dyn Session, filters: &[Expr]) -> Vec<bool> {
        let all = vec![true; self.files.len()];
        let Some(predicate) = conjunction(filters.iter().cloned()) else {
            return all;
        };
        // A predicate it cannot use for pruning keeps every file: the filters still
        // apply to the rows above the scan.
        let Ok(df_schema) = DFSchema::try_from(self.schema.as_ref().clone()) else {
            return all;
        };
        let Ok(expr) = state.create_physical_expr(predicate, &df_schema) else {
            return all;
        };
        let max_in_list = state.config_options().execution.parquet.max_in_list_size;
        PruningPredicateBuilder::new()
            .with_file_schema(self.schema.clone())
            .with_max_in_list_size(max_in_list)
            .build(expr)
            .and_then(|p| p.prune(self).ok())
            .unwrap_or(all)
    }

    /// Rows, and the min, max and null count of the columns in `columns` (every column
    /// without it), over the files in `kept`.
    fn statistics(&self, kept: &[usize], columns: Option<&[usize]>) -> Statistics {
        let rows = match &self.rows {
            Some(r) => Precision::Exact(kept.iter().map(|i| r.value(*i) as usize).sum()),
            None => Precision::Absent,
        };
        let indices = arrow::array::UInt32Array::from_iter_values(kept.iter().map(|i| *i as u32));
        let columns = self
            .stats
            .iter()
            .enumerate()
            .map(|(i, c)| match columns {
                Some(wanted) if !wanted.contains(&i) => ColumnStatistics::new_unknown(),
                _ => column_statistics(c, &indices, kept.len()),
            })
            .collect();
        Statistics {
            num_rows: rows,
            total_byte_size: Precision::Inexact(
                kept.iter().map(|i| self.files[*i].size as usize).sum(),
            ),
            column_statistics: columns,
        }
    }
}

#[async_trait::async_trait]
impl TableProvider for LakeScan {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Filters skip files and row groups; DataFusion still applies them to the rows.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let keep = self.keep(state, filters);
        let mut kept: Vec<usize> = (0..self.files.len()).filter(|i| keep[*i]).collect();
        // Without filters, a limit needs only the first files that hold enough rows.
        if let (Some(limit), true, Some(rows)) = (limit, filters.is_empty(), &self.rows) {
            let mut total = 0usize;
            let mut upto = kept.len();
            for (n, i) in kept.iter().enumerate() {
                total += rows.value(*i).max(0) as usize;
                if total >= limit {
                    upto = n + 1;
                    break;
                }
            }
            kept.truncate(upto);
        }
        let positions: Vec<usize> = match projection {
            Some(p) => p.iter().map(|i| self.positions[*i]).collect(),
            None => self.positions.clone(),
        };
        if kept.is_empty() {
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => self.schema.clone(),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        // Statistics are in the scan's column order: file columns, then partition columns.
        let stats = self.statistics(&kept, projection.map(|p| p.as_slice()));
        let mut ordered = vec![ColumnStatistics::new_unknown(); self.positions.len()];
        for (i, c) in stats.column_statistics.into_iter().enumerate() {
            ordered[self.positions[i]] = c;
        }
        let stats = Statistics {
            column_statistics: ordered,
            ..stats
        };
        let groups = balanced_groups(&self.files, &kept, state.config().target_partitions());
        let options = state.table_options().parquet.clone();
        let format = ParquetFormat::default().with_options(options);
        let source = format.file_source(self.table_schema.clone());
        let config = FileScanConfigBuilder::new(self.store.clone(), source)
            .with_file_groups(groups)
            .with_statistics(stats)
            .with_projection_indices(Some(positions))?
            .with_limit(limit)
            .build();
        format.create_physical_plan(state, config).await
    }
}

impl PruningStatistics for LakeScan {
    fn min_values(&self, column: &Column) -> Option<ArrayRef> {
        self.column(column).and_then(|c| c.min.clone())
    }

    fn max_values(&self, column: &Column) -> Option<ArrayRef> {
        self.column(column).and_then(|c| c.max.clone())
    }

    fn num_containers(&self) -> usize {
        self.files.len()
    }

    fn null_counts(&self, column: &Column) -> Option<ArrayRef> {
        self.column(column).and_then(|c| c.nulls.clone())
    }

    fn row_counts(&self) -> Option<ArrayRef> {
        self.rows.clone().map(|r| Arc::new(r) as ArrayRef)
    }

    fn contained(&self, _column: &Column, _values: &HashSet<ScalarValue>) -> Option<BooleanArray> {
        None
    }
}

impl LakeScan {
    fn column(&self, column: &Column) -> Option<&ColumnArrays> {
        let i = self.schema.index_of(&column.name).ok()?;
        self.stats.get(i)
    }
}

/// The object store URL (scheme and authority) that delta-rs registers for the table's
/// store in the session.
fn store_url(root: &url::Url) -> Option<ObjectStoreUrl> {
    ObjectStoreUrl::parse(format!(
        "{}://{}",
        root.scheme(),
        &root[url::Position::BeforeHost..url::Position::AfterPort],
    ))
    .ok()
}

fn viewed(f: &FieldRef) -> FieldRef {
    match f.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 => {
            Arc::new(f.as_ref().clone().with_data_type(DataType::Utf8View))
        }
        DataType::Binary | DataType::LargeBinary => {
            Arc::new(f.as_ref().clone().with_data_type(DataType::BinaryView))
        }
        _ => f.clone(),
    }
}

fn has_deletion_vectors(adds: &RecordBatch) -> bool {
    adds.schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| f.name().starts_with("deletion_vector"))
        .any(|(i, _)| {
            let c = adds.column(i);
            c.null_count() < c.len()
        })
}

/// The files of `adds` as the scan names them: paths in the store, with their partition
/// values typed as `partition_fields`. `None` when a file is in another store.
fn files_of(
    adds: &RecordBatch,
    root: &url::Url,
    store: &ObjectStoreUrl,
    partition_fields: &[FieldRef],
) -> Option<Vec<File>> {
    let paths = adds.column_by_name("path")?;
    let paths = arrow::compute::cast(paths, &DataType::Utf8).ok()?;
    let paths = paths.as_any().downcast_ref::<arrow::array::StringArray>()?;
    let sizes = arrow::compute::cast(adds.column_by_name("size_bytes")?, &DataType::Int64).ok()?;
    let sizes = sizes.as_any().downcast_ref::<Int64Array>()?;
    let partitions: Vec<ArrayRef> = partition_fields
        .iter()
        .map(|f| {
            let c = adds.column_by_name(&format!("partition.{}", f.name()))?;
            arrow::compute::cast(c, f.data_type()).ok()
        })
        .collect::<Option<_>>()?;
    let base = root.as_str().trim_end_matches('/').to_string() + "/";
    let base = url::Url::parse(&base).ok()?;
    (0..adds.num_rows())
        .map(|i| {
            let url = base.join(paths.value(i)).ok()?;
            if store_url(&url)? != *store {
                return None;
            }
            let location = deltalake::Path::from_url_path(url.path()).ok()?;
            let partition_values = partitions
                .iter()
                .map(|c| ScalarValue::try_from_array(c, i).ok())
                .collect::<Option<_>>()?;
            Some(File {
                location: location.to_string(),
                size: sizes.value(i).max(0) as u64,
                partition_values,
            })
        })
        .collect()
}

/// Field `f`'s min, max and null counts per file, from the flattened add actions, typed
/// as `f`. Partition columns have their value as min and max.
fn column_arrays(adds: &RecordBatch, f: &FieldRef) -> ColumnArrays {
    let typed = |name: String| -> Option<ArrayRef> {
        let c = adds.column_by_name(&name)?;
        arrow::compute::cast(c, f.data_type()).ok()
    };
    if let Some(v) = typed(format!("partition.{}", f.name())) {
        // A null partition value: every row of the file is null there.
        let rows = adds
            .column_by_name("num_records")
            .and_then(|r| arrow::compute::cast(r, &DataType::Int64).ok())
            .and_then(|r| r.as_any().downcast_ref::<Int64Array>().cloned());
        let nulls = rows.map(|rows| {
            Arc::new(Int64Array::from_iter((0..v.len()).map(|i| {
                if v.is_null(i) {
                    (!rows.is_null(i)).then(|| rows.value(i))
                } else {
                    Some(0)
                }
            }))) as ArrayRef
        });
        return ColumnArrays {
            min: Some(v.clone()),
            max: Some(v),
            nulls,
        };
    }
    if !usable_stats(f.data_type()) {
        return ColumnArrays::default();
    }
    let max = typed(format!("max.{}", f.name())).map(|m| widen_truncated(m, f.data_type()));
    ColumnArrays {
        min: typed(format!("min.{}", f.name())),
        max,
        nulls: adds
            .column_by_name(&format!("null_count.{}", f.name()))
            .and_then(|c| arrow::compute::cast(c, &DataType::Int64).ok()),
    }
}

/// Types whose min and max in the log are the files' own: numbers, dates, strings,
/// booleans and timestamps (see [`widen_truncated`]). Decimals past 15 digits are left
/// out: the log writes them as floating point numbers.
fn usable_stats(t: &DataType) -> bool {
    match t {
        DataType::Decimal128(p, _) | DataType::Decimal256(p, _) => *p <= 15,
        t => {
            t.is_integer()
                || t.is_floating()
                || matches!(
                    t,
                    DataType::Date32
                        | DataType::Date64
                        | DataType::Utf8
                        | DataType::Utf8View
                        | DataType::LargeUtf8
                        | DataType::Boolean
                        | DataType::Timestamp(_, _)
                )
        }
    }
}

/// Timestamps' max values are written to the millisecond, cut down: a file's true max
/// can be up to 999 µs later.
fn widen_truncated(max: ArrayRef, t: &DataType) -> ArrayRef {
    let DataType::Timestamp(unit, _) = t else {
        return max;
    };
    let extra = match unit {
        TimeUnit::Microsecond => 999,
        TimeUnit::Nanosecond => 999_999,
        _ => return max,
    };
    let Ok(raw) = arrow::compute::cast(&max, &DataType::Int64) else {
        return max;
    };
    let Some(raw) = raw.as_any().downcast_ref::<Int64Array>() else {
        return max;
    };
    let wider: Int64Array = raw
        .iter()
        .map(|v| v.map(|v| v.saturating_add(extra)))
        .collect();
    arrow::compute::cast(&wider, t).unwrap_or(max)
}

/// One column's statistics over the files at `indices`. Min and max are inexact (the log
/// may round them); null counts are exact when every file has one.
fn column_statistics(
    c: &ColumnArrays,
    indices: &arrow::array::UInt32Array,
    files: usize,
) -> ColumnStatistics {
    let pick = |a: &Option<ArrayRef>| -> Option<ArrayRef> {
        let a = a.as_ref()?;
        arrow::compute::take(a.as_ref(), indices, None).ok()
    };
    let bound = |a: Option<ArrayRef>, max: bool| -> Precision<ScalarValue> {
        let Some(a) = a else {
            return Precision::Absent;
        };
        // A file without the statistic leaves the bound unknown.
        if a.null_count() > 0 || a.is_empty() {
            return Precision::Absent;
        }
        let value = if max {
            MaxAccumulator::try_new(a.data_type()).and_then(|mut m| {
                m.update_batch(std::slice::from_ref(&a))?;
                m.evaluate()
            })
        } else {
            MinAccumulator::try_new(a.data_type()).and_then(|mut m| {
                m.update_batch(std::slice::from_ref(&a))?;
                m.evaluate()
            })
        };
        value.map(Precision::Inexact).unwrap_or(Precision::Absent)
    };
    let nulls = pick(&c.nulls)
        .and_then(|a| {
            let a = a.as_any().downcast_ref::<Int64Array>()?.clone();
            (a.null_count() == 0 && a.len() == files)
                .then(|| Precision::Exact(a.values().iter().map(|v| (*v).max(0) as usize).sum()))
        })
        .unwrap_or(Precision::Absent);
    ColumnStatistics {
        null_count: nulls,
        min_value: bound(pick(&c.min), false),
        max_value: bound(pick(&c.max), true),
        ..ColumnStatistics::new_unknown()
    }
}

/// The files in `kept` spread over `partitions` groups of about equal bytes.
fn balanced_groups(files: &[File], kept: &[usize], partitions: usize) -> Vec<FileGroup> {
    let n = partitions.max(1).min(kept.len());
    let mut order: Vec<usize> = kept.to_vec();
    order.sort_by_key(|i| std::cmp::Reverse(files[*i].size));
    let mut groups: Vec<(u64, Vec<PartitionedFile>)> = vec![(0, Vec::new()); n];
    for i in order {
        let f = &files[i];
        let smallest = groups
            .iter_mut()
            .min_by_key(|g| g.0)
            .expect("at least one group");
        smallest.0 += f.size;
        smallest.1.push(
            PartitionedFile::new(f.location.clone(), f.size)
                .with_partition_values(f.partition_values.clone()),
        );
    }
    groups
        .into_iter()
        .map(|(_, files)| FileGroup::new(files))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::prelude::SessionContext;
    use weir_config::WriteMode;
    use weir_lake::{Lake, WriteOptions, WriteSpec};

    /// Appends the rows of `sql` to table `raw.events`, partitioned by `day`.
    async fn append(lake: &Lake, sql: &str) {
        let ctx = weir_lake::new_session();
        let df = ctx.sql(sql).await.unwrap();
        let spec = WriteSpec {
            mode: WriteMode::Append,
            partition_by: vec!["day".into()],
            ..Default::default()
        };
        lake.write("raw.events", &ctx, df, &spec, &WriteOptions::default())
            .await
            .unwrap();
    }

    /// A session with the table as `t` through this scan and as `d` through delta-rs.
    async fn both(lake: &Lake) -> (SessionContext, Arc<LakeScan>) {
        let table = lake.open_existing("raw.events").await.unwrap();
        let ctx = weir_lake::new_session();
        table.update_datafusion_session(&ctx.state()).unwrap();
        let scan = Arc::new(LakeScan::try_new(&table, true).expect("a plain table"));
        ctx.register_table("t", scan.clone()).unwrap();
        ctx.register_table("d", table.table_provider().await.unwrap())
            .unwrap();
        (ctx, scan)
    }

    async fn rows(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        pretty_format_batches(&batches).unwrap().to_string()
    }

    /// How many files the plan of `sql` reads.
    async fn files_read(ctx: &SessionContext, sql: &str) -> usize {
        let plan = ctx
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let mut files = std::collections::BTreeSet::new();
        weir_lake::plan_files(&plan, &mut files);
        files.len()
    }

    async fn table() -> (tempfile::TempDir, Lake) {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path().to_str().unwrap());
        // Two commits: days a and b and a row without a day, then day c with a new
        // column. Times carry microseconds past the millisecond.
        append(
            &lake,
            "SELECT * FROM (VALUES \
             (1, 'a', CAST('2026-01-01T00:00:00.000100Z' AS TIMESTAMP) AT TIME ZONE 'UTC', 'x'), \
             (2, 'a', CAST('2026-01-01T00:00:01.000700Z' AS TIMESTAMP) AT TIME ZONE 'UTC', NULL), \
             (3, 'b', CAST('2026-01-02T00:00:00.000900Z' AS TIMESTAMP) AT TIME ZONE 'UTC', 'y'), \
             (6, NULL, CAST('2026-01-04T00:00:00Z' AS TIMESTAMP) AT TIME ZONE 'UTC', 'n')) \
             AS v(id, day, ts, s)",
        )
        .await;
        append(
            &lake,
            "SELECT * FROM (VALUES \
             (4, 'c', CAST('2026-01-03T00:00:00.000500Z' AS TIMESTAMP) AT TIME ZONE 'UTC', 'z', 40), \
             (5, 'c', CAST('2026-01-03T00:00:02.000001Z' AS TIMESTAMP) AT TIME ZONE 'UTC', 'w', 50)) \
             AS v(id, day, ts, s, extra)",
        )
        .await;
        (dir, lake)
    }

    #[tokio::test]
    async fn the_scan_reads_what_delta_rs_reads_and_skips_files_by_the_log() {
        let (_dir, lake) = table().await;
        let (ctx, scan) = both(&lake).await;
        assert_eq!(scan.files.len(), 4, "one file per day and commit");
        // The log's column order (delta-rs puts partition columns last when it creates
        // the table; the new column comes after them).
        let names: Vec<_> = scan
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(names, ["id", "ts", "s", "day", "extra"]);
        let queries = [
            "SELECT * FROM {} ORDER BY id",
            "SELECT id, extra, day FROM {} WHERE day = 'c' ORDER BY id",
            "SELECT id FROM {} WHERE day IS NULL",
            "SELECT id FROM {} WHERE day IS NOT NULL AND extra IS NULL ORDER BY id",
            "SELECT count(*) AS n, sum(extra) AS e, min(ts) AS lo, max(ts) AS hi FROM {}",
            // Past the millisecond the log keeps: each file's true max is later.
            "SELECT id FROM {} WHERE ts > TIMESTAMP '2026-01-01T00:00:01.000500Z' ORDER BY id",
            "SELECT id FROM {} WHERE ts >= TIMESTAMP '2026-01-03T00:00:02.000001Z' ORDER BY id",
            "SELECT id FROM {} WHERE id > 3 AND s <> 'z' ORDER BY id",
        ];
        for q in queries {
            let ours = rows(&ctx, &q.replace("{}", "t")).await;
            let theirs = rows(&ctx, &q.replace("{}", "d")).await;
            assert_eq!(ours, theirs, "{q}");
        }
        let late = rows(
            &ctx,
            "SELECT id FROM t WHERE ts > TIMESTAMP '2026-01-01T00:00:01.000500Z' ORDER BY id",
        )
        .await;
        assert!(late.contains("| 2  |"), "{late}");
        // Partition values and min/max skip files before any is opened.
        assert_eq!(files_read(&ctx, "SELECT * FROM t").await, 4);
        assert_eq!(files_read(&ctx, "SELECT * FROM t WHERE day = 'c'").await, 1);
        assert_eq!(
            files_read(&ctx, "SELECT * FROM t WHERE day IS NULL").await,
            1
        );
        assert_eq!(files_read(&ctx, "SELECT * FROM t WHERE id = 3").await, 1);
        // Files from before the column have no statistics for it and are read.
        assert_eq!(
            files_read(&ctx, "SELECT * FROM t WHERE extra > 45").await,
            4
        );
        assert_eq!(
            files_read(&ctx, "SELECT * FROM t WHERE extra > 60").await,
            3
        );
        assert_eq!(files_read(&ctx, "SELECT * FROM t WHERE id > 100").await, 0);
        let none = ctx.sql("SELECT * FROM t WHERE id > 100").await.unwrap();
        assert_eq!(none.count().await.unwrap(), 0);
        // A limit without filters stops at the files that hold enough rows.
        assert_eq!(files_read(&ctx, "SELECT * FROM t LIMIT 1").await, 1);
    }

    #[tokio::test]
    async fn the_scan_reports_rows_and_column_bounds_from_the_log() {
        let (_dir, lake) = table().await;
        let (ctx, scan) = both(&lake).await;
        let all: Vec<usize> = (0..scan.files.len()).collect();
        let stats = scan.statistics(&all, None);
        assert_eq!(stats.num_rows, Precision::Exact(6));
        let column = |name: &str| &stats.column_statistics[scan.schema.index_of(name).unwrap()];
        let id = column("id");
        assert_eq!(
            id.min_value,
            Precision::Inexact(ScalarValue::Int64(Some(1)))
        );
        assert_eq!(
            id.max_value,
            Precision::Inexact(ScalarValue::Int64(Some(6)))
        );
        assert_eq!(id.null_count, Precision::Exact(0));
        // The partition column: one file of one row has no day.
        assert_eq!(column("day").null_count, Precision::Exact(1));
        // Files written before the column existed have no statistics for it.
        assert_eq!(column("extra").min_value, Precision::Absent);
        // The plan carries them (an aggregate of the whole table needs no file).
        let plan = ctx
            .sql("SELECT * FROM t")
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
        let stats = StatisticsContext::new()
            .compute(plan.as_ref(), &StatisticsArgs::new())
            .unwrap();
        assert_eq!(stats.num_rows, Precision::Exact(6));
    }
}
