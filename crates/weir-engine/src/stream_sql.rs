//! Streaming SQL: a query over an unbounded source, run one batch of records at a time,
//! with event time, watermarks, windows and state that can be checkpointed.
//!
//! A query reads the source as a table, or as a window of it in FROM:
//! `TUMBLE(source, ts, INTERVAL '1' MINUTE)`, `HOP(source, ts, slide, size)` or
//! `SESSION(source, ts, gap[, key...])`, which add `window_start` and `window_end`.
//!
//! **Time.** Each source partition's watermark is its newest event time minus the allowed
//! delay. A row whose event time is before its partition's watermark (as it stood when the
//! row was read) is late: it goes back to the caller with the reason, for the quarantine
//! table. Because the decision depends only on the rows before it in its own partition,
//! it is the same however partitions interleave and wherever batches are cut, so a replay
//! after a crash decides exactly as the first run did. The query's watermark is the least
//! of its partitions' (partitions that have not delivered a row yet do not hold it back); a
//! window is emitted, complete, once that watermark reaches its end. A row that is on time
//! for its partition is never in a window already emitted, except when it comes from a
//! partition that was silent while others moved the watermark on: such a row is late too.
//!
//! **Plan.** The query is planned once by DataFusion and cut at the aggregate that reads
//! the source. What is below it (filters, projections, joins with lake tables) runs on
//! every batch; the aggregate itself is incremental (DataFusion's group accumulators,
//! kept across batches); what is above it (HAVING, further projections, joins,
//! aggregates over a window's groups) runs on each set of emitted windows. A query
//! without an aggregate runs whole on every batch.
//!
//! **State** (open windows' groups, or a session window's rows, and the partitions'
//! newest event times) is written by [`StreamSql::checkpoint`] as Arrow IPC and read back by
//! [`StreamSql::restore`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int32Array, RecordBatch, TimestampMicrosecondArray,
    UInt32Array,
};
use arrow::compute::{cast, concat_batches, take, take_record_batch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit};
use arrow::row::{RowConverter, SortField};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::tree_node::TreeNode;
use datafusion::common::{Column, TableReference};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    EmitTo, Expr, GroupsAccumulator, LogicalPlan, LogicalPlanBuilder, Projection,
};
use datafusion::physical_expr::aggregate::{AggregateFunctionExpr, LoweredAggregateBuilder};
use datafusion::physical_expr::{create_physical_expr, GroupsAccumulatorAdapter, PhysicalExpr};
use datafusion::physical_plan::aggregates::group_values::{new_group_values, GroupValues};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{collect, ExecutionPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    self as sql, FunctionArg, FunctionArgExpr, Ident, ObjectName, TableAlias, TableFactor,
    VisitMut, VisitorMut,
};
use weir_common::Error;

mod join;

/// The columns a window adds.
pub const WINDOW_START: &str = "window_start";
pub const WINDOW_END: &str = "window_end";

/// The table a windowed source is read from once its TVF is rewritten.
const SOURCE_SLOT: &str = "__weir_stream_source";
/// The table an aggregate's emitted groups are read from by the rest of the query.
const GROUPS_SLOT: &str = "__weir_stream_groups";
/// The table a join of the source with itself is read from by the rest of the query.
const JOIN_SLOT: &str = "__weir_stream_join";

/// A window over event time; durations in microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Window {
    Tumble { size: i64 },
    Hop { slide: i64, size: i64 },
    Session { gap: i64, keys: Vec<String> },
}

/// What a streaming query reads.
#[derive(Debug, Clone)]
pub struct StreamSqlSpec {
    pub sql: String,
    /// The name the query reads the source by.
    pub source: String,
    /// The source's rows.
    pub schema: SchemaRef,
    /// The column holding each row's source partition (an `Int32`).
    pub partition_column: String,
    /// The event-time column and the allowed delay.
    pub event_time: Option<(String, Duration)>,
    /// The sink keeps one row per key, updated in place: an aggregate without a window
    /// is allowed, and emits its changed groups' current values at each commit.
    pub updating: bool,
}

/// What a batch of source rows produced: rows for the sink (a query without an aggregate)
/// and the rows that were late or had no event time, by index in the batch, with why.
#[derive(Debug, Default)]
pub struct Pushed {
    pub rows: Vec<RecordBatch>,
    pub late: Vec<(usize, String)>,
}

/// Rows of a batch that were late, by index, with why.
type Late = Vec<(usize, String)>;

/// A compiled streaming query and its state.
pub struct StreamSql {
    source_schema: SchemaRef,
    window: Option<Window>,
    /// Index of the event-time column in the source, and the allowed delay (µs).
    time: Option<(usize, i64)>,
    time_name: String,
    partition_index: usize,
    /// What runs on every batch: the query, or what is below each aggregate.
    pre: Vec<Stage>,
    /// The aggregates over the source (several when windows of it are joined), each
    /// with its `pre` stage.
    aggs: Vec<Aggregation>,
    /// The rest of the query, over the groups the aggregates emit.
    post: Option<Stage>,
    /// Instead of `post`, with a keyed sink: a running aggregate over the emitted groups.
    outer: Option<Outer>,
    /// A join of the source with itself, instead of `pre`.
    join: Option<JoinStages>,
    output_schema: SchemaRef,
    /// Per partition, the newest event time of a row that was on time (µs).
    marks: BTreeMap<i32, i64>,
    /// The watermark windows were last emitted at: windows ending at or before it are gone.
    emitted_to: Option<i64>,
    /// The watermark a join's state was last cleared to: rows before it may have lost
    /// their matches.
    pruned_to: Option<i64>,
    /// The source's partitions: each holds the watermark back until it has delivered a
    /// row (none set: the partitions seen so far).
    partitions: BTreeSet<i32>,
    /// Partitions left out of the watermark for now (silent for a while).
    idle: BTreeSet<i32>,
}

impl fmt::Debug for StreamSql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSql")
            .field("window", &self.window)
            .field("output", &self.output_schema)
            .finish_non_exhaustive()
    }
}

/// A running aggregate over the groups the query's aggregates emit (complete groups of
/// windows, or of a bounded join), kept across commits: the sink updates its rows.
struct Outer {
    /// Its input, over the emitted groups.
    pre: Stage,
    agg: Aggregation,
    /// What follows it (projections only), over its changed groups.
    post: Stage,
}

/// A join of the source with itself: each side's plan over the batch, the incremental
/// join, and the rest of the query over the joined rows.
struct JoinStages {
    left: Stage,
    right: Stage,
    op: join::StreamJoin,
    /// Where the rest of the query reads the joined rows.
    slot: SchemaRef,
}

/// A plan whose leaf is a slot: each run reads what was put in the slot.
struct Stage {
    ctx: SessionContext,
    slots: Vec<Slot>,
    plan: LogicalPlan,
    /// The physical plan, kept when it holds no join (a hash join's dynamic filters cannot
    /// be reset between runs; such a plan is made again for each run).
    physical: Option<Arc<dyn ExecutionPlan>>,
}

impl Stage {
    async fn new(
        ctx: &SessionContext,
        slots: Vec<Slot>,
        plan: &LogicalPlan,
    ) -> Result<Stage, Error> {
        let plan = ctx.state().optimize(plan).map_err(plan_error)?;
        let mut stage = Stage {
            ctx: ctx.clone(),
            slots,
            plan,
            physical: None,
        };
        let physical = stage.plan_physical().await?;
        if !has_join(&physical) {
            stage.physical = Some(physical);
        }
        Ok(stage)
    }

    async fn plan_physical(&self) -> Result<Arc<dyn ExecutionPlan>, Error> {
        let state = self.ctx.state();
        state
            .query_planner()
            .create_physical_plan(&self.plan, &state)
            .await
            .map_err(plan_error)
    }

    /// Runs the plan with `inputs[i]` in slot `i`.
    async fn run(&self, inputs: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>, Error> {
        // A plan keeps state from a run (a repartition's channels, for one): each run gets
        // fresh nodes.
        let plan = match &self.physical {
            Some(p) => datafusion::physical_plan::execution_plan::reset_plan_states(p.clone())
                .map_err(|e| Error::internal(format!("streaming query: {e}")))?,
            None => self.plan_physical().await?,
        };
        for (slot, input) in self.slots.iter().zip(inputs) {
            slot.put(input);
        }
        let out = collect(plan, self.ctx.task_ctx()).await;
        for slot in &self.slots {
            slot.put(Vec::new());
        }
        out.map_err(|e| Error::internal(format!("streaming query: {e}")))
    }
}

fn has_join(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.name().contains("Join") || plan.children().iter().any(|c| has_join(c))
}

fn plan_error(e: datafusion::error::DataFusionError) -> Error {
    Error::user(format!("streaming query: {e}"))
}

/// Batches handed to a plan's leaf table.
#[derive(Clone)]
struct Slot {
    schema: SchemaRef,
    batches: Arc<Mutex<Vec<RecordBatch>>>,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").finish_non_exhaustive()
    }
}

impl Slot {
    fn new(schema: SchemaRef) -> Slot {
        Slot {
            schema,
            batches: Default::default(),
        }
    }

    fn put(&self, batches: Vec<RecordBatch>) {
        *self.batches.lock().unwrap_or_else(|p| p.into_inner()) = batches;
    }

    fn provider(&self) -> Result<Arc<dyn datafusion::catalog::TableProvider>, Error> {
        let table = StreamingTable::try_new(
            self.schema.clone(),
            vec![Arc::new(self.clone()) as Arc<dyn PartitionStream>],
        )
        .map_err(|e| Error::internal(format!("stream slot: {e}")))?;
        Ok(Arc::new(table))
    }

    fn register(&self, ctx: &SessionContext, name: &str) -> Result<(), Error> {
        let _ = ctx.deregister_table(name);
        ctx.register_table(name, self.provider()?)
            .map_err(|e| Error::internal(format!("stream slot: {e}")))?;
        Ok(())
    }
}

impl PartitionStream for Slot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches = self
            .batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stream = futures::stream::iter(batches.into_iter().map(Ok));
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

/// An incremental aggregate over the source.
struct Aggregation {
    spec: Arc<GroupsSpec>,
    groups: Groups,
    /// The window end of each group: key column index, plus what to add (the size, when
    /// only `window_start` is grouped by).
    end_of: (usize, i64),
    /// Window ends of the groups held, to know when one closes.
    open_ends: BTreeSet<i64>,
    /// Session windows: rows held until their session closes.
    session: Option<SessionCols>,
    session_rows: Vec<RecordBatch>,
    /// A session window's gap (µs).
    gap: i64,
    /// The emitted groups' columns (the slot the rest of the query reads them from).
    emitted: SchemaRef,
    /// A running aggregate (no window): which groups changed since they were last
    /// emitted, by group index.
    changed: Option<Vec<bool>>,
}

/// Where a session window's columns are in the rows the aggregate reads.
struct SessionCols {
    keys: Vec<usize>,
    time: usize,
    start: usize,
    end: usize,
}

/// The aggregate's expressions over its input.
struct GroupsSpec {
    input: SchemaRef,
    keys: Vec<Arc<dyn PhysicalExpr>>,
    key_schema: SchemaRef,
    aggs: Vec<Arc<AggregateFunctionExpr>>,
    filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    /// The aggregate's output (keys, then values), all nullable.
    output: SchemaRef,
}

/// Groups and their accumulators.
struct Groups {
    spec: Arc<GroupsSpec>,
    values: Box<dyn GroupValues>,
    accs: Vec<Box<dyn GroupsAccumulator>>,
}

type GroupState = (Vec<ArrayRef>, Vec<Vec<ArrayRef>>);

impl Groups {
    fn new(spec: &Arc<GroupsSpec>) -> Result<Groups, Error> {
        let values =
            new_group_values(spec.key_schema.clone(), &GroupOrdering::None).map_err(exec_error)?;
        let accs = spec
            .aggs
            .iter()
            .map(|a| {
                if a.groups_accumulator_supported() {
                    a.create_groups_accumulator()
                } else {
                    let a = a.clone();
                    Ok(Box::new(GroupsAccumulatorAdapter::new(move || {
                        a.create_accumulator()
                    })) as Box<dyn GroupsAccumulator>)
                }
            })
            .collect::<datafusion::error::Result<Vec<_>>>()
            .map_err(exec_error)?;
        Ok(Groups {
            spec: spec.clone(),
            values,
            accs,
        })
    }

    fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Adds the rows of `batch`; returns the key columns it had, and each row's group.
    fn update(&mut self, batch: &RecordBatch) -> Result<(Vec<ArrayRef>, Vec<usize>), Error> {
        let n = batch.num_rows();
        let keys = eval_all(&self.spec.keys, batch)?;
        let mut ids = Vec::with_capacity(n);
        self.values.intern(&keys, &mut ids).map_err(exec_error)?;
        let total = self.values.len();
        for (i, acc) in self.accs.iter_mut().enumerate() {
            // Arguments, then ORDER BY values: an order-sensitive accumulator (first_value
            // ORDER BY ...) compares those itself, whatever order rows come in.
            let agg = &self.spec.aggs[i];
            let mut exprs = agg.expressions();
            exprs.extend(agg.order_bys().iter().map(|o| o.expr.clone()));
            let args = eval_all(&exprs, batch)?;
            let filter = match &self.spec.filters[i] {
                Some(f) => Some(
                    f.evaluate(batch)
                        .and_then(|v| v.into_array(n))
                        .map_err(exec_error)?
                        .as_boolean()
                        .clone(),
                ),
                None => None,
            };
            acc.update_batch(&args, &ids, filter.as_ref(), total)
                .map_err(exec_error)?;
        }
        Ok((keys, ids))
    }

    /// The groups' keys and accumulator states; the groups are emptied.
    fn take(&mut self) -> Result<GroupState, Error> {
        let keys = self.values.emit(EmitTo::All).map_err(exec_error)?;
        let states = self
            .accs
            .iter_mut()
            .map(|a| a.state(EmitTo::All))
            .collect::<datafusion::error::Result<Vec<_>>>()
            .map_err(exec_error)?;
        *self = Groups::new(&self.spec)?;
        Ok((keys, states))
    }

    /// Adds groups from their states (distinct keys, as [`Groups::take`] gives them).
    fn merge(&mut self, keys: &[ArrayRef], states: &[Vec<ArrayRef>]) -> Result<(), Error> {
        let mut ids = Vec::new();
        self.values.intern(keys, &mut ids).map_err(exec_error)?;
        let total = self.values.len();
        for (acc, state) in self.accs.iter_mut().zip(states) {
            acc.merge_batch(state, &ids, total).map_err(exec_error)?;
        }
        Ok(())
    }

    /// The groups' final rows, in the aggregate's output schema; the groups are emptied.
    fn finish(&mut self) -> Result<RecordBatch, Error> {
        let mut columns = self.values.emit(EmitTo::All).map_err(exec_error)?;
        for acc in &mut self.accs {
            columns.push(acc.evaluate(EmitTo::All).map_err(exec_error)?);
        }
        *self = Groups::new(&self.spec)?;
        let out = &self.spec.output;
        let columns = columns
            .into_iter()
            .zip(out.fields())
            .map(|(c, f)| match c.data_type() == f.data_type() {
                true => Ok(c),
                false => cast(&c, f.data_type()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::internal(format!("aggregate output: {e}")))?;
        RecordBatch::try_new(out.clone(), columns)
            .map_err(|e| Error::internal(format!("aggregate output: {e}")))
    }
}

fn eval_all(exprs: &[Arc<dyn PhysicalExpr>], batch: &RecordBatch) -> Result<Vec<ArrayRef>, Error> {
    exprs
        .iter()
        .map(|e| {
            e.evaluate(batch)
                .and_then(|v| v.into_array(batch.num_rows()))
        })
        .collect::<datafusion::error::Result<Vec<_>>>()
        .map_err(exec_error)
}

fn exec_error(e: datafusion::error::DataFusionError) -> Error {
    Error::internal(format!("streaming aggregate: {e}"))
}

impl StreamSql {
    /// Plans `spec.sql` in `ctx` (a lake session: lake tables can be joined).
    pub async fn compile(ctx: &SessionContext, spec: &StreamSqlSpec) -> Result<StreamSql, Error> {
        let state = ctx.state();
        let dialect = state.config_options().sql_parser.dialect;
        let mut statement = state
            .sql_to_statement(&spec.sql, &dialect)
            .map_err(plan_error)?;
        let found = match &mut statement {
            DfStatement::Statement(s) => rewrite_windows(s, &spec.source)?,
            _ => {
                return Err(Error::user(
                    "a streaming query must be a SELECT over the source",
                ))
            }
        };
        let window = match &found {
            Some(f) => Some(f.window(ctx).await?),
            None => None,
        };
        let time = match (&spec.event_time, &found) {
            (None, Some(f)) => {
                return Err(Error::user(format!(
                    "the query's window is over `{}`, but the stream has no event time",
                    f.time
                ))
                .with_hint(format!(
                    "add `event_time: {{column: {}, allowed_delay: 5s}}` to the stream",
                    f.time
                )))
            }
            (Some((col, _)), Some(f)) if !col.eq_ignore_ascii_case(&f.time) => {
                return Err(Error::user(format!(
                    "the query's window is over `{}`, but the stream's event time is `{col}`",
                    f.time
                ))
                .with_hint("a window is over the event-time column: use the same column"))
            }
            (Some((col, delay)), _) => {
                let i = spec.schema.index_of(col).map_err(|_| {
                    Error::user(format!("event time column `{col}` is not a source column"))
                        .with_hint(format!("source columns: {}", names(&spec.schema)))
                })?;
                event_times(spec.schema.field(i).data_type(), None)?;
                Some((i, delay.as_micros() as i64))
            }
            (None, None) => None,
        };
        let partition_index = spec.schema.index_of(&spec.partition_column).map_err(|_| {
            Error::internal(format!("no partition column {}", spec.partition_column))
        })?;
        let slot_schema = match &window {
            Some(_) => {
                let mut fields: Vec<Field> = spec
                    .schema
                    .fields()
                    .iter()
                    .map(|f| f.as_ref().clone())
                    .collect();
                for n in [WINDOW_START, WINDOW_END] {
                    fields.push(Field::new(n, window_type(), true));
                }
                Arc::new(Schema::new(fields))
            }
            None => spec.schema.clone(),
        };
        let source_slot = Slot::new(slot_schema);
        let slot_name = match &window {
            Some(_) => SOURCE_SLOT,
            None => spec.source.as_str(),
        };
        source_slot.register(ctx, slot_name)?;
        let plan = state
            .statement_to_plan(statement)
            .await
            .map_err(plan_error)?;
        let plan = state
            .analyzer()
            .execute_and_check(plan, state.config_options(), |_, _| {})
            .map_err(plan_error)?;
        if matches!(
            plan,
            LogicalPlan::Dml(_) | LogicalPlan::Ddl(_) | LogicalPlan::Statement(_)
        ) {
            return Err(Error::user(
                "a streaming query must be a SELECT over the source",
            ));
        }
        let reads = count_scans(&plan, slot_name);
        let joined = match reads {
            2 => split_join(&state.optimize(&plan).map_err(plan_error)?, slot_name)?,
            _ => None,
        };
        let (pre, aggs, post, outer, join, output_schema) = if let Some((upper, j, slot)) = joined {
            let column = time.map(|(i, _)| spec.schema.field(i).name().as_str());
            let op = join::StreamJoin::new(
                &j,
                state.execution_props(),
                column.map(|column| join::EventTime {
                    slot: slot_name,
                    column,
                    window: match &window {
                        Some(Window::Tumble { size } | Window::Hop { size, .. }) => Some(*size),
                        _ => None,
                    },
                }),
            )?;
            check_per_batch(&j.left, slot_name)?;
            check_per_batch(&j.right, slot_name)?;
            let (above, cuts) = split(&upper, JOIN_SLOT)?;
            if !cuts.is_empty() && count_scans(&above, JOIN_SLOT) > 0 {
                return Err(Error::user(
                    "a join of the stream with itself is read once, or under one aggregate",
                ));
            }
            let mut pre = Vec::new();
            let mut aggs = Vec::new();
            let mut post = None;
            let mut outer = None;
            let output_schema = if cuts.is_empty() {
                check_per_batch(&upper, JOIN_SLOT)?;
                pre.push(Stage::new(ctx, vec![slot.clone()], &upper).await?);
                Arc::new(upper.schema().as_arrow().clone())
            } else {
                let mut slots = Vec::new();
                for (a, groups) in &cuts {
                    check_per_batch(&a.input, JOIN_SLOT)?;
                    pre.push(Stage::new(ctx, vec![slot.clone()], &a.input).await?);
                    let close = Close::Bound(op.bound_exprs());
                    aggs.push(Aggregation::new(ctx, a, close, &spec.event_time, groups).await?);
                    slots.push(groups.clone());
                }
                let (p, o, schema) = after_groups(ctx, spec, slots, &above).await?;
                (post, outer) = (p, o);
                schema
            };
            let join = JoinStages {
                left: Stage::new(ctx, vec![source_slot.clone()], &j.left).await?,
                right: Stage::new(ctx, vec![source_slot.clone()], &j.right).await?,
                op,
                slot: slot.schema.clone(),
            };
            (pre, aggs, post, outer, Some(join), output_schema)
        } else {
            let (upper, cuts) = split(&plan, slot_name)?;
            let unaggregated = !cuts.is_empty() && count_scans(&upper, slot_name) > 0;
            if reads == 0 || (cuts.is_empty() && reads > 1) || unaggregated {
                return Err(Error::user(format!(
                    "a streaming query reads its source `{}` once, or in windows that are each aggregated; this one reads it {reads} times",
                    spec.source
                ))
                .with_hint(match reads {
                    0 => format!("read the records `FROM {}`", spec.source),
                    _ => "join the source with lake tables, with itself (an inner join ON a key of each side), or join aggregates of the same window of it (ON their window_start)".to_string(),
                }));
            }
            let pre_plans: Vec<LogicalPlan> = match cuts.is_empty() {
                true => vec![plan.clone()],
                false => cuts.iter().map(|(a, _)| a.input.as_ref().clone()).collect(),
            };
            let mut pre = Vec::new();
            for p in &pre_plans {
                check_per_batch(p, slot_name)?;
                pre.push(Stage::new(ctx, vec![source_slot.clone()], p).await?);
            }
            let mut aggs = Vec::new();
            let mut post = None;
            let mut outer = None;
            let output_schema = if cuts.is_empty() {
                if matches!(window, Some(Window::Session { .. })) {
                    return Err(Error::user(
                        "a SESSION window needs an aggregate: GROUP BY window_start, window_end",
                    ));
                }
                Arc::new(plan.schema().as_arrow().clone())
            } else {
                let close = match &window {
                    Some(w) => Close::Window(w),
                    None if spec.updating => Close::Running,
                    None => return Err(Error::user(
                        "an aggregate over a stream needs a window: its groups would never be complete",
                    )
                    .with_hint(format!(
                        "read the source through a window: `FROM TUMBLE({}, <time column>, INTERVAL '1' MINUTE)` and GROUP BY window_start, window_end; or keep a running result, updated at each commit, with `sink.key` set to the GROUP BY columns",
                        spec.source
                    ))),
                };
                match (&close, cuts.len() > 1) {
                    (Close::Window(Window::Session { .. }), true) => {
                        return Err(Error::user(
                            "aggregates of SESSION windows cannot be joined: each key's sessions differ",
                        ))
                    }
                    (Close::Running, true) => {
                        return Err(Error::user(
                            "aggregates without a window cannot be joined: their results change",
                        ))
                    }
                    (Close::Running, false) => check_in_place(&upper)?,
                    _ => {}
                }
                let mut slots = Vec::new();
                for (a, slot) in &cuts {
                    aggs.push(
                        Aggregation::new(ctx, a, close.clone(), &spec.event_time, slot).await?,
                    );
                    slots.push(slot.clone());
                }
                let (p, o, schema) = after_groups(ctx, spec, slots, &upper).await?;
                (post, outer) = (p, o);
                schema
            };
            (pre, aggs, post, outer, None, output_schema)
        };
        for f in output_schema.fields() {
            if !f
                .name()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(Error::user(format!(
                    "the streaming query's column `{}` needs a name to be a table column",
                    f.name()
                ))
                .with_hint("name it with AS, e.g. `count(*) AS events`"));
            }
        }
        Ok(StreamSql {
            source_schema: spec.schema.clone(),
            window,
            time,
            time_name: spec.event_time.clone().map(|t| t.0).unwrap_or_default(),
            partition_index,
            pre,
            aggs,
            post,
            outer,
            join,
            output_schema,
            marks: BTreeMap::new(),
            emitted_to: None,
            pruned_to: None,
            partitions: BTreeSet::new(),
            idle: BTreeSet::new(),
        })
    }

    /// The rows the query produces.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Sets the source's partitions: until each has delivered a row (or is idle), no
    /// window is emitted.
    pub fn set_partitions(&mut self, partitions: impl IntoIterator<Item = i32>) {
        self.partitions = partitions.into_iter().collect();
    }

    /// Sets the partitions to leave out of the watermark (silent for a while): the others
    /// move it on. A row that comes later from an idle partition into a window already
    /// emitted is late.
    pub fn set_idle(&mut self, idle: impl IntoIterator<Item = i32>) {
        self.idle = idle.into_iter().collect();
    }

    /// The query's watermark (µs): the least of its partitions'; none while a partition
    /// that is not idle has delivered nothing.
    pub fn watermark(&self) -> Option<i64> {
        let (_, delay) = self.time?;
        let least = if self.partitions.is_empty() {
            self.marks.values().min().copied()
        } else {
            let mut least: Option<i64> = None;
            for p in self.partitions.difference(&self.idle) {
                let m = *self.marks.get(p)?;
                least = Some(least.map_or(m, |l| l.min(m)));
            }
            least
        };
        least.map(|m| m - delay)
    }

    /// Bytes the query's state takes in memory: open windows' groups (or sessions' rows)
    /// and a join's kept rows.
    pub fn state_bytes(&self) -> usize {
        let aggs: usize = self
            .aggs
            .iter()
            .chain(self.outer.as_ref().map(|o| &o.agg))
            .map(Aggregation::bytes)
            .sum();
        aggs + self.join.as_ref().map_or(0, |j| j.op.bytes())
    }

    /// Rows a join of the source with itself holds, per side.
    pub fn join_rows_held(&self) -> Option<[usize; 2]> {
        self.join.as_ref().map(|j| j.op.held())
    }

    /// Per partition, the newest event time of an on-time row (µs).
    pub fn partition_marks(&self) -> &BTreeMap<i32, i64> {
        &self.marks
    }

    /// Runs the query over `batch` (source rows in the order they were read).
    pub async fn push(&mut self, batch: &RecordBatch) -> Result<Pushed, Error> {
        if batch.schema_ref().fields() != self.source_schema.fields() {
            return Err(Error::internal(
                "streaming query: a batch does not have the source's columns",
            ));
        }
        let (keep, late) = self.sort_out_late(batch)?;
        let input = match keep {
            Some(keep) => take_record_batch(batch, &keep)
                .map_err(|e| Error::internal(format!("streaming query: {e}")))?,
            None => batch.clone(),
        };
        let input = match &self.window {
            Some(w) => with_windows(&input, w, self.time.map(|t| t.0).unwrap_or(0))?,
            None => input,
        };
        let mut pushed = Pushed {
            rows: Vec::new(),
            late,
        };
        // What the query runs on: the batch, or the pairs a join of it with itself made.
        let input = match &mut self.join {
            None => vec![input],
            Some(j) => {
                let left = j.left.run(vec![vec![input.clone()]]).await?;
                let right = j.right.run(vec![vec![input]]).await?;
                let joined =
                    j.op.push(&left, &right)?
                        .into_iter()
                        .map(|b| RecordBatch::try_new(j.slot.clone(), b.columns().to_vec()))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| Error::internal(format!("stream join: {e}")))?;
                if joined.is_empty() {
                    return Ok(pushed);
                }
                joined
            }
        };
        pushed.rows = self.feed(input).await?;
        Ok(pushed)
    }

    /// Runs what is below each aggregate over `input` (rows of the source, or of a join of
    /// it with itself) and adds its rows to the aggregate; returns the rows of a query
    /// without one.
    async fn feed(&mut self, input: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, Error> {
        let mut rows = Vec::new();
        for (i, stage) in self.pre.iter().enumerate() {
            let out = stage.run(vec![input.clone()]).await?;
            match self.aggs.get_mut(i) {
                None => rows = out,
                Some(a) if a.session.is_some() => a.session_rows.extend(out),
                Some(a) => {
                    for b in &out {
                        a.add(b)?;
                    }
                }
            }
        }
        Ok(rows)
    }

    /// Which rows of `batch` are on time (`None`: all), and why the others are not.
    fn sort_out_late(&mut self, batch: &RecordBatch) -> Result<(Option<UInt32Array>, Late), Error> {
        let Some((ti, delay)) = self.time else {
            return Ok((None, Vec::new()));
        };
        let times = event_times(
            batch.schema_ref().field(ti).data_type(),
            Some(batch.column(ti)),
        )?;
        let parts = batch
            .column(self.partition_index)
            .as_any()
            .downcast_ref::<Int32Array>()
            .ok_or_else(|| Error::internal("the partition column is not an Int32"))?;
        let mut keep = Vec::with_capacity(batch.num_rows());
        let mut late = Vec::new();
        for (i, t) in times.iter().enumerate() {
            let p = parts.value(i);
            let Some(t) = *t else {
                late.push((i, format!("no event time: `{}` is null", self.time_name)));
                continue;
            };
            let mark = self.marks.get(&p).copied();
            if let Some(m) = mark {
                if t < m - delay {
                    late.push((
                        i,
                        format!(
                            "late: event time {} is before partition {p}'s watermark {} \
                             (its newest event time {} minus the allowed delay {})",
                            show_time(t),
                            show_time(m - delay),
                            show_time(m),
                            humantime::format_duration(Duration::from_micros(delay as u64))
                        ),
                    ));
                    continue;
                }
            }
            if let (Some(done), Some(w)) = (self.emitted_to, &self.window) {
                if first_window_end(w, t) <= done {
                    late.push((
                        i,
                        format!(
                            "late: event time {} is in a window already emitted (the watermark \
                             was {} while partition {p} was silent)",
                            show_time(t),
                            show_time(done)
                        ),
                    ));
                    continue;
                }
            }
            if let Some(cleared) = self.pruned_to.filter(|c| t < *c) {
                late.push((
                    i,
                    format!(
                        "late: event time {} is before the watermark {} the join's state was \
                         cleared to (while partition {p} was silent)",
                        show_time(t),
                        show_time(cleared)
                    ),
                ));
                continue;
            }
            self.marks.insert(p, mark.map_or(t, |m| m.max(t)));
            keep.push(i as u32);
        }
        Ok(match late.is_empty() {
            true => (None, late),
            false => (Some(UInt32Array::from(keep)), late),
        })
    }

    /// Emits the windows the watermark has passed: the query's rows for them.
    pub async fn advance(&mut self) -> Result<Vec<RecordBatch>, Error> {
        if self.aggs.iter().any(|a| a.changed.is_some()) {
            return self.emit_changed().await;
        }
        let Some(wm) = self.watermark() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        if let Some(j) = &mut self.join {
            if j.op.bounded().contains(&true) {
                // An outer join's rows that can no longer meet a match.
                let unmatched =
                    j.op.prune(wm)?
                        .into_iter()
                        .map(|b| RecordBatch::try_new(j.slot.clone(), b.columns().to_vec()))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| Error::internal(format!("stream join: {e}")))?;
                self.pruned_to = Some(self.pruned_to.map_or(wm, |p| p.max(wm)));
                if !unmatched.is_empty() {
                    out = self.feed(unmatched).await?;
                }
            }
        }
        if self.post.is_none() && self.outer.is_none() {
            return Ok(out);
        }
        self.emitted_to = Some(self.emitted_to.map_or(wm, |e| e.max(wm)));
        let mut inputs = Vec::with_capacity(self.aggs.len());
        let mut any = false;
        for a in &mut self.aggs {
            let closed = match &a.session {
                Some(_) => a.close_sessions(wm)?,
                None => a.close_windows(wm)?,
            };
            let closed = closed.unwrap_or_else(|| RecordBatch::new_empty(a.emitted.clone()));
            any |= closed.num_rows() > 0;
            inputs.push(vec![closed]);
        }
        match (&self.post, &mut self.outer) {
            (Some(post), _) if any => out.extend(post.run(inputs).await?),
            (_, Some(o)) => {
                if any {
                    for b in o.pre.run(inputs).await? {
                        o.agg.add(&b)?;
                    }
                }
                if let Some(changed) = o.agg.changed_groups()? {
                    out.extend(o.post.run(vec![vec![changed]]).await?);
                }
            }
            _ => {}
        }
        Ok(out)
    }

    /// A running aggregate's groups that changed since the last commit, through the rest
    /// of the query (projections only).
    async fn emit_changed(&mut self) -> Result<Vec<RecordBatch>, Error> {
        let mut inputs = Vec::with_capacity(self.aggs.len());
        let mut any = false;
        for a in &mut self.aggs {
            let rows = a
                .changed_groups()?
                .unwrap_or_else(|| RecordBatch::new_empty(a.emitted.clone()));
            any |= rows.num_rows() > 0;
            inputs.push(vec![rows]);
        }
        match (&self.post, any) {
            (Some(post), true) => post.run(inputs).await,
            _ => Ok(Vec::new()),
        }
    }

    /// The state: partitions' event times, and each aggregate's open windows, as Arrow IPC
    /// streams (the first one carries the times in its schema's metadata).
    pub fn checkpoint(&mut self) -> Result<Vec<u8>, Error> {
        let meta = serde_json::json!({
            "version": 2,
            "marks": self.marks.iter().map(|(p, m)| (p.to_string(), *m)).collect::<BTreeMap<_, _>>(),
            "emitted_to": self.emitted_to,
            "pruned_to": self.pruned_to,
        });
        let mut streams = vec![ipc_stream(None, Some(&meta))?];
        for a in &mut self.aggs {
            streams.push(ipc_stream(a.state_batch()?, None)?);
        }
        if let Some(j) = &mut self.join {
            for side in j.op.state()? {
                streams.push(ipc_stream(Some(side), None)?);
            }
        }
        if let Some(o) = &mut self.outer {
            streams.push(ipc_stream(o.agg.state_batch()?, None)?);
        }
        let mut out = STATE_MAGIC.to_vec();
        for s in streams {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s);
        }
        Ok(out)
    }

    /// Takes up the state [`StreamSql::checkpoint`] wrote.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let streams = state_streams(bytes)?;
        let (meta, _) = read_ipc(streams[0])?;
        let meta = meta.ok_or_else(|| Error::internal("stream checkpoint: no state metadata"))?;
        let parts = self.aggs.len()
            + 2 * usize::from(self.join.is_some())
            + usize::from(self.outer.is_some());
        if streams.len() != parts + 1 {
            return Err(Error::user(format!(
                "the stream's checkpoint holds {} parts of state (aggregates, join sides), \
                 its query has {parts}",
                streams.len() - 1,
            ))
            .with_hint("the query changed: its open windows cannot be carried over; drop the sink table to start over"));
        }
        self.marks = marks_of(&meta);
        self.emitted_to = meta["emitted_to"].as_i64();
        self.pruned_to = meta["pruned_to"].as_i64();
        for (a, s) in self.aggs.iter_mut().zip(&streams[1..]) {
            let (_, batches) = read_ipc(s)?;
            a.load_state(&batches)?;
        }
        let mut rest = streams[1 + self.aggs.len()..].iter();
        if let Some(j) = &mut self.join {
            for side in 0..2 {
                let (_, batches) = read_ipc(rest.next().copied().unwrap_or_default())?;
                j.op.restore(side, &batches)?;
            }
        }
        if let (Some(o), Some(s)) = (&mut self.outer, rest.next()) {
            let (_, batches) = read_ipc(s)?;
            o.agg.load_state(&batches)?;
        }
        Ok(())
    }
}

/// The start of a checkpoint: then, per stream, its length (u64, little-endian) and bytes.
const STATE_MAGIC: &[u8; 8] = b"WEIRST02";

fn ipc_stream(
    batch: Option<RecordBatch>,
    meta: Option<&serde_json::Value>,
) -> Result<Vec<u8>, Error> {
    let io = |e: arrow::error::ArrowError| Error::internal(format!("stream checkpoint: {e}"));
    let mut schema = batch
        .as_ref()
        .map(|b| b.schema_ref().as_ref().clone())
        .unwrap_or_else(Schema::empty);
    if let Some(m) = meta {
        schema = schema.with_metadata([("weir.stream.state".to_string(), m.to_string())].into());
    }
    let mut out = Vec::new();
    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema).map_err(io)?;
    if let Some(b) = batch {
        w.write(&b.with_schema(Arc::new(schema.clone())).map_err(io)?)
            .map_err(io)?;
    }
    w.finish().map_err(io)?;
    drop(w);
    Ok(out)
}

fn read_ipc(bytes: &[u8]) -> Result<(Option<serde_json::Value>, Vec<RecordBatch>), Error> {
    let bad = |e: String| Error::internal(format!("stream checkpoint unreadable: {e}"));
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| bad(e.to_string()))?;
    let meta = reader
        .schema()
        .metadata()
        .get("weir.stream.state")
        .and_then(|m| serde_json::from_str(m).ok());
    let batches = reader
        .map(|b| b.map_err(|e| bad(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((meta, batches))
}

/// The IPC streams of a checkpoint.
fn state_streams(bytes: &[u8]) -> Result<Vec<&[u8]>, Error> {
    let bad = || Error::internal("stream checkpoint unreadable: truncated or not a checkpoint");
    let mut rest = bytes.strip_prefix(STATE_MAGIC.as_slice()).ok_or_else(bad)?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let len: [u8; 8] = rest
            .get(..8)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?;
        let len = u64::from_le_bytes(len) as usize;
        out.push(rest.get(8..8 + len).ok_or_else(bad)?);
        rest = &rest[8 + len..];
    }
    match out.is_empty() {
        true => Err(bad()),
        false => Ok(out),
    }
}

/// When an aggregate's groups are complete.
#[derive(Clone)]
enum Close<'a> {
    /// Never: the groups' current values are emitted at each commit where they changed,
    /// and the sink updates them in place.
    Running,
    /// When the watermark passes the end of their window.
    Window(&'a Window),
    /// Over a join of the source with itself: when the watermark passes the group's value
    /// of one of these expressions (bounds on the other side's event time), which the
    /// GROUP BY must hold.
    Bound(&'a [Expr]),
}

impl Aggregation {
    async fn new(
        ctx: &SessionContext,
        agg: &datafusion::logical_expr::Aggregate,
        close: Close<'_>,
        event_time: &Option<(String, Duration)>,
        groups_slot: &Slot,
    ) -> Result<Aggregation, Error> {
        let input_df = agg.input.schema();
        let input = Arc::new(input_df.as_arrow().clone());
        let props = ctx.state().execution_props().clone();
        if agg
            .group_expr
            .iter()
            .any(|e| matches!(e, Expr::GroupingSet(_)))
        {
            return Err(Error::user(
                "GROUPING SETS, ROLLUP and CUBE are not supported in a streaming query",
            ));
        }
        let planning = PhysicalPlanningContext::default();
        let keys = agg
            .group_expr
            .iter()
            .map(|e| create_physical_expr(e, input_df, &props, &planning))
            .collect::<datafusion::error::Result<Vec<_>>>()
            .map_err(plan_error)?;
        let agg_schema = agg.schema.as_arrow();
        let nk = agg.group_expr.len();
        let key_schema = Arc::new(Schema::new(
            agg_schema.fields()[..nk]
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ));
        let mut aggs = Vec::new();
        let mut filters = Vec::new();
        for e in &agg.aggr_expr {
            let lowered = LoweredAggregateBuilder::new(e, input_df, &input, &props, &planning)
                .build()
                .map_err(plan_error)?;
            if !lowered.order_bys.is_empty()
                && lowered.aggregate.order_sensitivity()
                    == datafusion::logical_expr::utils::AggregateOrderSensitivity::HardRequirement
            {
                return Err(Error::user(format!(
                    "`{e}` needs its rows in order, which a stream does not give"
                ))
                .with_hint(
                    "first_value/last_value with ORDER BY work; order what a window emits instead",
                ));
            }
            aggs.push(lowered.aggregate);
            filters.push(lowered.filter);
        }
        let output = groups_slot.schema.clone();
        let spec = Arc::new(GroupsSpec {
            input,
            keys,
            key_schema,
            aggs,
            filters,
            output: output.clone(),
        });
        // An aggregate without a window's sessions.
        let plain = |end_of: (usize, i64), changed: Option<Vec<bool>>| -> Result<_, Error> {
            Ok(Aggregation {
                groups: Groups::new(&spec)?,
                spec: spec.clone(),
                end_of,
                open_ends: BTreeSet::new(),
                session: None,
                session_rows: Vec::new(),
                gap: 0,
                emitted: output.clone(),
                changed,
            })
        };
        let window = match close {
            Close::Window(w) => w,
            Close::Running => return plain((0, 0), Some(Vec::new())),
            Close::Bound(bounds) => {
                // A group's pairs all have the other side's event time at or before its
                // bound: once the watermark passes it, no on-time row adds to the group.
                let Some(i) = agg.group_expr.iter().position(|e| bounds.contains(e)) else {
                    let shown: Vec<String> = bounds.iter().map(|b| format!("`{b}`")).collect();
                    return Err(Error::user(
                        "an aggregate over a join of the stream with itself must group by a \
                         time bound of the join, to know when a group is complete",
                    )
                    .with_hint(match shown.is_empty() {
                        true => "bound one side's event time by the other side's columns \
                                 (`b.ts BETWEEN a.ts AND a.expires`) and GROUP BY that bound \
                                 (`a.expires`)"
                            .to_string(),
                        false => format!("add one of {} to the GROUP BY", shown.join(", ")),
                    }));
                };
                return plain((i, 1), None);
            }
        };
        // The window's end, from the GROUP BY.
        let key_named = |name: &str| {
            agg.group_expr
                .iter()
                .position(|e| matches!(e, Expr::Column(c) if c.name == name))
        };
        let size = match window {
            Window::Tumble { size } | Window::Hop { size, .. } => *size,
            Window::Session { .. } => 0,
        };
        let end_of =
            match (key_named(WINDOW_END), key_named(WINDOW_START)) {
                (Some(i), _) => (i, 0),
                (None, Some(i)) if size > 0 => (i, size),
                _ => return Err(Error::user(
                    "a windowed aggregate groups by the window: GROUP BY window_start, window_end",
                )
                .with_hint("add window_start and window_end to the GROUP BY (and the SELECT)")),
            };
        let session = match window {
            Window::Session { keys: names, .. } => {
                let qualifier = agg.group_expr.iter().find_map(|e| match e {
                    Expr::Column(c) if c.name == WINDOW_START || c.name == WINDOW_END => {
                        Some(c.relation.clone())
                    }
                    _ => None,
                });
                let qualifier = qualifier.flatten();
                let find = |name: &str| -> Result<usize, Error> {
                    input_df
                        .index_of_column_by_name(qualifier.as_ref(), name)
                        .or_else(|| input_df.index_of_column_by_name(None, name))
                        .ok_or_else(|| {
                            Error::user(format!("session window column `{name}` not found"))
                        })
                };
                let (time_name, _) = event_time
                    .as_ref()
                    .ok_or_else(|| Error::internal("session without event time"))?;
                Some(SessionCols {
                    keys: names.iter().map(|k| find(k)).collect::<Result<_, _>>()?,
                    time: find(time_name)?,
                    start: find(WINDOW_START)?,
                    end: find(WINDOW_END)?,
                })
            }
            _ => None,
        };
        Ok(Aggregation {
            groups: Groups::new(&spec)?,
            spec,
            end_of,
            open_ends: BTreeSet::new(),
            session,
            session_rows: Vec::new(),
            gap: match window {
                Window::Session { gap, .. } => *gap,
                _ => 0,
            },
            emitted: groups_slot.schema.clone(),
            changed: None,
        })
    }

    /// Bytes its state takes: the groups and their accumulators, or sessions' rows.
    fn bytes(&self) -> usize {
        self.groups.values.size()
            + self.groups.accs.iter().map(|x| x.size()).sum::<usize>()
            + self
                .session_rows
                .iter()
                .map(|b| b.get_array_memory_size())
                .sum::<usize>()
            + self.changed.as_ref().map_or(0, |c| c.capacity())
    }

    /// Adds rows to the groups, and notes which changed (running) or which windows they
    /// are in.
    fn add(&mut self, b: &RecordBatch) -> Result<(), Error> {
        let (keys, ids) = self.groups.update(b)?;
        match &mut self.changed {
            Some(changed) => {
                changed.resize(self.groups.values.len(), false);
                for id in ids {
                    changed[id] = true;
                }
            }
            None => self.note_ends(&keys),
        }
        Ok(())
    }

    fn ends(&self, keys: &[ArrayRef]) -> Vec<i64> {
        let (i, add) = self.end_of;
        if let Some(col) = keys[i].as_primitive_opt::<arrow::datatypes::TimestampMicrosecondType>()
        {
            return col.iter().map(|v| v.unwrap_or(i64::MIN) + add).collect();
        }
        // A join's bound: a time or epoch milliseconds (checked when the join was planned).
        event_times(keys[i].data_type(), Some(&keys[i]))
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.unwrap_or(i64::MIN).saturating_add(add))
            .collect()
    }

    fn note_ends(&mut self, keys: &[ArrayRef]) {
        let mut last = None;
        for e in self.ends(keys) {
            if last != Some(e) {
                self.open_ends.insert(e);
                last = Some(e);
            }
        }
    }

    /// Tumbling and hopping windows: the groups of windows ending by `wm`, finished.
    fn close_windows(&mut self, wm: i64) -> Result<Option<RecordBatch>, Error> {
        if self.open_ends.first().is_none_or(|e| *e > wm) {
            return Ok(None);
        }
        let (keys, states) = self.groups.take()?;
        let ends = self.ends(&keys);
        let closed: BooleanArray = ends.iter().map(|e| Some(*e <= wm)).collect();
        let open: BooleanArray = ends.iter().map(|e| Some(*e > wm)).collect();
        let pick = |arrays: &[ArrayRef], mask: &BooleanArray| -> Result<Vec<ArrayRef>, Error> {
            arrays
                .iter()
                .map(|a| arrow::compute::filter(a, mask))
                .collect::<Result<_, _>>()
                .map_err(|e| Error::internal(format!("closing windows: {e}")))
        };
        let mut done = Groups::new(&self.spec)?;
        done.merge(
            &pick(&keys, &closed)?,
            &states
                .iter()
                .map(|s| pick(s, &closed))
                .collect::<Result<Vec<_>, _>>()?,
        )?;
        self.groups.merge(
            &pick(&keys, &open)?,
            &states
                .iter()
                .map(|s| pick(s, &open))
                .collect::<Result<Vec<_>, _>>()?,
        )?;
        self.open_ends = self.open_ends.split_off(&(wm + 1));
        done.finish().map(Some)
    }

    /// Session windows: the sessions (per key, rows less than `gap` apart) that ended by
    /// `wm`, aggregated; their rows leave the state.
    fn close_sessions(&mut self, wm: i64) -> Result<Option<RecordBatch>, Error> {
        let Some(cols) = &self.session else {
            return Ok(None);
        };
        if self.session_rows.is_empty() {
            return Ok(None);
        }
        let gap = self.gap;
        let err = |e: arrow::error::ArrowError| Error::internal(format!("sessions: {e}"));
        let all = concat_batches(&self.spec.input, &self.session_rows).map_err(err)?;
        let times = event_times(
            all.schema_ref().field(cols.time).data_type(),
            Some(all.column(cols.time)),
        )?;
        let key_cols: Vec<ArrayRef> = cols.keys.iter().map(|i| all.column(*i).clone()).collect();
        let converter = RowConverter::new(
            key_cols
                .iter()
                .map(|c| SortField::new(c.data_type().clone()))
                .collect(),
        )
        .map_err(err)?;
        let rows = converter.convert_columns(&key_cols).map_err(err)?;
        let mut order: Vec<usize> = (0..all.num_rows()).collect();
        order.sort_by(|a, b| {
            rows.row(*a)
                .cmp(&rows.row(*b))
                .then(times[*a].cmp(&times[*b]))
        });
        let mut closed_idx = Vec::new();
        let mut starts = Vec::new();
        let mut ends = Vec::new();
        let mut open_idx = Vec::new();
        let mut i = 0;
        while i < order.len() {
            // One session: rows of one key, each less than `gap` after the one before.
            let first = order[i];
            let start = times[first].unwrap_or(i64::MIN);
            let mut last = start;
            let mut j = i + 1;
            while j < order.len()
                && rows.row(order[j]) == rows.row(first)
                && times[order[j]].unwrap_or(i64::MIN) < last.saturating_add(gap)
            {
                last = last.max(times[order[j]].unwrap_or(i64::MIN));
                j += 1;
            }
            let end = last.saturating_add(gap);
            for &r in &order[i..j] {
                if end <= wm {
                    closed_idx.push(r as u32);
                    starts.push(start);
                    ends.push(end);
                } else {
                    open_idx.push(r as u32);
                }
            }
            i = j;
        }
        if closed_idx.is_empty() {
            return Ok(None);
        }
        let open = take_record_batch(&all, &UInt32Array::from(open_idx)).map_err(err)?;
        self.session_rows = vec![open];
        let closed = take_record_batch(&all, &UInt32Array::from(closed_idx)).map_err(err)?;
        let mut columns = closed.columns().to_vec();
        columns[cols.start] =
            Arc::new(TimestampMicrosecondArray::from(starts).with_timezone("UTC"));
        columns[cols.end] = Arc::new(TimestampMicrosecondArray::from(ends).with_timezone("UTC"));
        let columns = columns
            .into_iter()
            .zip(self.spec.input.fields())
            .map(|(c, f)| cast(&c, f.data_type()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let closed = RecordBatch::try_new(self.spec.input.clone(), columns).map_err(err)?;
        let mut done = Groups::new(&self.spec)?;
        done.update(&closed)?;
        done.finish().map(Some)
    }

    /// A running aggregate: the current values of the groups that changed since the last
    /// call (the groups stay).
    fn changed_groups(&mut self) -> Result<Option<RecordBatch>, Error> {
        let Some(changed) = &mut self.changed else {
            return Ok(None);
        };
        if !changed.contains(&true) {
            return Ok(None);
        }
        // Taken out and merged back in the same order: the groups keep their indexes.
        let (keys, states) = self.groups.take()?;
        self.groups.merge(&keys, &states)?;
        let mask: BooleanArray = changed.iter().map(|c| Some(*c)).collect();
        changed.iter_mut().for_each(|c| *c = false);
        let pick = |arrays: &[ArrayRef]| -> Result<Vec<ArrayRef>, Error> {
            arrays
                .iter()
                .map(|a| arrow::compute::filter(a, &mask))
                .collect::<Result<_, _>>()
                .map_err(|e| Error::internal(format!("running aggregate: {e}")))
        };
        let mut done = Groups::new(&self.spec)?;
        done.merge(
            &pick(&keys)?,
            &states
                .iter()
                .map(|s| pick(s))
                .collect::<Result<Vec<_>, _>>()?,
        )?;
        done.finish().map(Some)
    }

    /// The state to checkpoint: held groups (keys, then each aggregate's state columns)
    /// or held session rows.
    fn state_batch(&mut self) -> Result<Option<RecordBatch>, Error> {
        let err = |e: arrow::error::ArrowError| Error::internal(format!("stream checkpoint: {e}"));
        if self.session.is_some() {
            if self.session_rows.is_empty() {
                return Ok(None);
            }
            let all = concat_batches(&self.spec.input, &self.session_rows).map_err(err)?;
            let fields: Vec<Field> = all
                .schema_ref()
                .fields()
                .iter()
                .enumerate()
                .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), true))
                .collect();
            self.session_rows = vec![all.clone()];
            return RecordBatch::try_new(Arc::new(Schema::new(fields)), all.columns().to_vec())
                .map(Some)
                .map_err(err);
        }
        if self.groups.is_empty() {
            return Ok(None);
        }
        let (keys, states) = self.groups.take()?;
        self.groups.merge(&keys, &states)?;
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            fields.push(Field::new(format!("k{i}"), k.data_type().clone(), true));
            columns.push(k.clone());
        }
        for (j, s) in states.iter().enumerate() {
            for (i, c) in s.iter().enumerate() {
                fields.push(Field::new(format!("s{j}_{i}"), c.data_type().clone(), true));
                columns.push(c.clone());
            }
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .map(Some)
            .map_err(err)
    }

    fn load_state(&mut self, batches: &[RecordBatch]) -> Result<(), Error> {
        self.groups = Groups::new(&self.spec)?;
        self.open_ends.clear();
        self.session_rows.clear();
        let err = |e: arrow::error::ArrowError| Error::internal(format!("stream checkpoint: {e}"));
        for b in batches {
            if self.session.is_some() {
                let b = RecordBatch::try_new(self.spec.input.clone(), b.columns().to_vec())
                    .map_err(err)?;
                self.session_rows.push(b);
                continue;
            }
            let nk = self.spec.key_schema.fields().len();
            let keys = b.columns()[..nk].to_vec();
            let mut at = nk;
            let mut states = Vec::new();
            for a in &self.spec.aggs {
                let n = a.state_fields().map_err(exec_error)?.len();
                states.push(b.columns()[at..at + n].to_vec());
                at += n;
            }
            self.groups.merge(&keys, &states)?;
            if self.changed.is_none() {
                self.note_ends(&keys);
            }
        }
        if let Some(changed) = &mut self.changed {
            *changed = vec![false; self.groups.values.len()];
        }
        Ok(())
    }
}

/// What a checkpoint says about time: per partition, the newest on-time event time (µs).
pub fn checkpoint_marks(bytes: &[u8]) -> Result<BTreeMap<i32, i64>, Error> {
    let streams = state_streams(bytes)?;
    let (meta, _) = read_ipc(streams[0])?;
    let meta = meta.ok_or_else(|| Error::internal("stream checkpoint: no state metadata"))?;
    Ok(marks_of(&meta))
}

fn marks_of(meta: &serde_json::Value) -> BTreeMap<i32, i64> {
    meta["marks"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(p, v)| Some((p.parse().ok()?, v.as_i64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The type of `window_start` and `window_end`.
fn window_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// A time in µs, as RFC 3339 text.
pub fn show_time(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| us.to_string())
}

fn names(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Event times in µs from a timestamp column, or a bigint/int column of epoch milliseconds.
/// With no column, checks the type only.
fn event_times(dt: &DataType, column: Option<&ArrayRef>) -> Result<Vec<Option<i64>>, Error> {
    let to_us = |c: &ArrayRef| -> Result<Vec<Option<i64>>, Error> {
        let us = cast(c, &DataType::Timestamp(TimeUnit::Microsecond, None))
            .map_err(|e| Error::internal(format!("event time: {e}")))?;
        Ok(us
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
            .iter()
            .collect())
    };
    match dt {
        DataType::Timestamp(_, _) => column.map_or(Ok(Vec::new()), to_us),
        DataType::Int64 | DataType::Int32 => match column {
            None => Ok(Vec::new()),
            Some(c) => {
                let ms = cast(c, &DataType::Int64)
                    .map_err(|e| Error::internal(format!("event time: {e}")))?;
                Ok(ms
                    .as_primitive::<Int64Type>()
                    .iter()
                    .map(|v| v.and_then(|v| v.checked_mul(1000)))
                    .collect())
            }
        },
        other => Err(Error::user(format!(
            "the event time column is {other}: it must be a timestamp, or a bigint of epoch milliseconds"
        ))),
    }
}

/// The end of the earliest window holding time `t`.
fn first_window_end(w: &Window, t: i64) -> i64 {
    match w {
        Window::Tumble { size } => t.div_euclid(*size) * size + size,
        Window::Hop { slide, size } => {
            // The least multiple of `slide` past `t - size`.
            let s = (t - size).div_euclid(*slide) * slide + slide;
            s + size
        }
        Window::Session { .. } => t.saturating_add(1),
    }
}

/// `batch` with `window_start` and `window_end`: a row per window it is in (tumbling and
/// hopping), or null windows (sessions: set when the session closes).
fn with_windows(batch: &RecordBatch, w: &Window, time: usize) -> Result<RecordBatch, Error> {
    let err = |e: arrow::error::ArrowError| Error::internal(format!("windows: {e}"));
    let times = event_times(
        batch.schema_ref().field(time).data_type(),
        Some(batch.column(time)),
    )?;
    let (rows, starts, size): (Option<UInt32Array>, Vec<Option<i64>>, i64) = match w {
        Window::Tumble { size } => (
            None,
            times
                .iter()
                .map(|t| t.map(|t| t.div_euclid(*size) * size))
                .collect(),
            *size,
        ),
        Window::Hop { slide, size } => {
            let mut rows = Vec::new();
            let mut starts = Vec::new();
            for (i, t) in times.iter().enumerate() {
                let Some(t) = *t else { continue };
                let mut s = first_window_end(w, t) - size;
                while s <= t {
                    rows.push(i as u32);
                    starts.push(Some(s));
                    s += slide;
                }
            }
            (Some(UInt32Array::from(rows)), starts, *size)
        }
        Window::Session { .. } => (None, vec![None; batch.num_rows()], 0),
    };
    let mut columns: Vec<ArrayRef> = match &rows {
        Some(idx) => batch
            .columns()
            .iter()
            .map(|c| take(c, idx, None))
            .collect::<Result<_, _>>()
            .map_err(err)?,
        None => batch.columns().to_vec(),
    };
    let ends: Vec<Option<i64>> = starts
        .iter()
        .map(|s| s.filter(|_| size > 0).map(|s| s + size))
        .collect();
    columns.push(Arc::new(
        TimestampMicrosecondArray::from(starts).with_timezone("UTC"),
    ));
    columns.push(Arc::new(
        TimestampMicrosecondArray::from(ends).with_timezone("UTC"),
    ));
    let mut fields: Vec<Field> = batch
        .schema_ref()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    for n in [WINDOW_START, WINDOW_END] {
        fields.push(Field::new(n, window_type(), true));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(err)
}

/// A window TVF found in the query.
struct FoundWindow {
    kind: String,
    time: String,
    args: Vec<sql::Expr>,
    keys: Vec<String>,
}

impl FoundWindow {
    /// What makes two windows the same.
    fn signature(&self) -> String {
        let args: Vec<String> = self.args.iter().map(|a| a.to_string()).collect();
        format!(
            "{}|{}|{}|{}",
            self.kind,
            self.time.to_ascii_lowercase(),
            args.join(","),
            self.keys.join(",")
        )
    }

    async fn window(&self, ctx: &SessionContext) -> Result<Window, Error> {
        let mut d = Vec::new();
        for a in &self.args {
            d.push(duration_of(ctx, a).await?);
        }
        let positive = |v: i64, what: &str| match v > 0 {
            true => Ok(v),
            false => Err(Error::user(format!(
                "{}: the {what} must be longer than zero",
                self.kind
            ))),
        };
        Ok(match self.kind.as_str() {
            "tumble" => Window::Tumble {
                size: positive(d[0], "size")?,
            },
            "hop" => {
                let (slide, size) = (positive(d[0], "slide")?, positive(d[1], "size")?);
                if slide > size {
                    return Err(Error::user(
                        "HOP(source, time, slide, size): the slide is longer than the size, so rows would fall between windows",
                    ));
                }
                if size / slide > 1_000 {
                    return Err(Error::user(format!(
                        "HOP(source, time, slide, size): each row would be in {} windows",
                        size / slide
                    ))
                    .with_hint("at most 1,000 windows per row: a longer slide or a shorter size"));
                }
                Window::Hop { slide, size }
            }
            _ => Window::Session {
                gap: positive(d[0], "gap")?,
                keys: self.keys.clone(),
            },
        })
    }
}

/// An interval in µs: `INTERVAL '1' MINUTE`, `INTERVAL '10 seconds'` or `'10s'`.
async fn duration_of(ctx: &SessionContext, e: &sql::Expr) -> Result<i64, Error> {
    let bad = || {
        Error::user(format!("`{e}` is not a duration"))
            .with_hint("write e.g. INTERVAL '1' MINUTE, INTERVAL '30 seconds' or '30s'")
    };
    if let sql::Expr::Value(v) = e {
        if let sql::Value::SingleQuotedString(s) = &v.value {
            return humantime::parse_duration(s)
                .map(|d| d.as_micros() as i64)
                .map_err(|_| bad());
        }
    }
    let batches = ctx
        .sql(&format!("SELECT {e}"))
        .await
        .map_err(|_| bad())?
        .collect()
        .await
        .map_err(|_| bad())?;
    let v = batches
        .first()
        .filter(|b| b.num_rows() == 1)
        .map(|b| b.column(0).clone())
        .ok_or_else(bad)?;
    match v.data_type() {
        DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano) => {
            let x = v
                .as_primitive::<arrow::datatypes::IntervalMonthDayNanoType>()
                .value(0);
            if x.months != 0 {
                return Err(bad().with_hint("months vary in length: use days"));
            }
            Ok(x.days as i64 * 86_400_000_000 + x.nanoseconds / 1000)
        }
        DataType::Interval(arrow::datatypes::IntervalUnit::DayTime) => {
            let x = v
                .as_primitive::<arrow::datatypes::IntervalDayTimeType>()
                .value(0);
            Ok(x.days as i64 * 86_400_000_000 + x.milliseconds as i64 * 1000)
        }
        _ => Err(bad()),
    }
}

/// Replaces the one window TVF over `source` with the slot table, keeping its alias (or
/// naming it after the source).
fn rewrite_windows(
    statement: &mut sql::Statement,
    source: &str,
) -> Result<Option<FoundWindow>, Error> {
    struct Finder<'a> {
        source: &'a str,
        found: Vec<FoundWindow>,
        error: Option<Error>,
    }
    impl VisitorMut for Finder<'_> {
        type Break = ();
        fn pre_visit_table_factor(&mut self, t: &mut TableFactor) -> ControlFlow<()> {
            let TableFactor::Table {
                name, args, alias, ..
            } = t
            else {
                return ControlFlow::Continue(());
            };
            let Some(a) = args else {
                return ControlFlow::Continue(());
            };
            let kind = name.to_string().to_ascii_lowercase();
            if !matches!(kind.as_str(), "tumble" | "hop" | "session") {
                return ControlFlow::Continue(());
            }
            match parse_tvf(&kind, &a.args, self.source) {
                Ok(f) => {
                    let alias_name = alias
                        .as_ref()
                        .map(|a| a.name.clone())
                        .unwrap_or_else(|| Ident::new(self.source));
                    *alias = Some(TableAlias {
                        explicit: true,
                        name: alias_name,
                        columns: vec![],
                        at: None,
                    });
                    *name = ObjectName::from(vec![Ident::new(SOURCE_SLOT)]);
                    *args = None;
                    self.found.push(f);
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    self.error = Some(e);
                    ControlFlow::Break(())
                }
            }
        }
    }
    let mut finder = Finder {
        source,
        found: Vec::new(),
        error: None,
    };
    let _ = statement.visit(&mut finder);
    if let Some(e) = finder.error {
        return Err(e);
    }
    let first = finder.found.first().map(FoundWindow::signature);
    if finder.found.iter().any(|f| Some(f.signature()) != first) {
        return Err(Error::user(
            "the windows over a streaming query's source must be the same (kind, time column, sizes and keys)",
        )
        .with_hint("windows of the source are joined when they close together"));
    }
    Ok(finder.found.pop())
}

fn parse_tvf(kind: &str, args: &[FunctionArg], source: &str) -> Result<FoundWindow, Error> {
    let usage = match kind {
        "tumble" => "TUMBLE(source, time_column, size)",
        "hop" => "HOP(source, time_column, slide, size)",
        _ => "SESSION(source, time_column, gap[, key...])",
    };
    let bad = |what: String| {
        Error::user(format!("{}: {what}", kind.to_ascii_uppercase())).with_hint(format!(
            "write {usage}, e.g. TUMBLE({source}, ts, INTERVAL '1' MINUTE)"
        ))
    };
    let exprs: Vec<&sql::Expr> = args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e),
            other => Err(bad(format!("`{other}` is not a supported argument"))),
        })
        .collect::<Result<_, _>>()?;
    let ident = |e: &sql::Expr| -> Option<String> {
        match e {
            sql::Expr::Identifier(i) => Some(i.value.clone()),
            sql::Expr::Function(f) if f.name.to_string().eq_ignore_ascii_case("descriptor") => {
                match &f.args {
                    sql::FunctionArguments::List(l) => match l.args.as_slice() {
                        [FunctionArg::Unnamed(FunctionArgExpr::Expr(sql::Expr::Identifier(i)))] => {
                            Some(i.value.clone())
                        }
                        _ => None,
                    },
                    _ => None,
                }
            }
            _ => None,
        }
    };
    let durations = match kind {
        "hop" => 2,
        _ => 1,
    };
    if exprs.len() < 2 + durations || (kind != "session" && exprs.len() != 2 + durations) {
        return Err(bad(format!("{} arguments", exprs.len())));
    }
    match ident(exprs[0]) {
        Some(s) if s.eq_ignore_ascii_case(source) => {}
        other => {
            return Err(bad(format!(
                "the first argument is the source `{source}`, not `{}`",
                other.unwrap_or_else(|| exprs[0].to_string())
            )))
        }
    }
    let time =
        ident(exprs[1]).ok_or_else(|| bad(format!("`{}` is not a column name", exprs[1])))?;
    let keys = exprs[2 + durations..]
        .iter()
        .map(|e| ident(e).ok_or_else(|| bad(format!("`{e}` is not a column name"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(FoundWindow {
        kind: kind.to_string(),
        time,
        args: exprs[2..2 + durations]
            .iter()
            .map(|e| (*e).clone())
            .collect(),
        keys,
    })
}

fn count_scans(plan: &LogicalPlan, slot: &str) -> usize {
    let mut n = 0;
    let _ = plan.apply(|p| {
        if let LogicalPlan::TableScan(s) = p {
            if s.table_name.table() == slot {
                n += 1;
            }
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    n
}

/// The aggregate a plan was cut at, and the slot its groups are read from above the cut.
type Cut = (datafusion::logical_expr::Aggregate, Slot);

/// Cuts `plan` at the lowest aggregate above each read of the source: the rest of the
/// plan reads each aggregate's groups from a slot of its own. Without such an aggregate,
/// nothing is cut.
fn split(plan: &LogicalPlan, slot: &str) -> Result<(LogicalPlan, Vec<Cut>), Error> {
    fn walk(
        plan: &LogicalPlan,
        slot: &str,
        cuts: &mut Vec<Cut>,
    ) -> Result<(Option<LogicalPlan>, bool), Error> {
        if let LogicalPlan::TableScan(s) = plan {
            return Ok((None, s.table_name.table() == slot));
        }
        let inputs = plan.inputs();
        let before = cuts.len();
        let mut new_inputs = Vec::new();
        let mut reads = false;
        for input in &inputs {
            let (rebuilt, r) = walk(input, slot, cuts)?;
            reads |= r;
            new_inputs.push(rebuilt);
        }
        if cuts.len() > before {
            let inputs: Vec<LogicalPlan> = new_inputs
                .into_iter()
                .zip(inputs)
                .map(|(n, old)| n.unwrap_or_else(|| old.clone()))
                .collect();
            let rebuilt = plan
                .with_new_exprs(plan.expressions(), inputs)
                .map_err(plan_error)?;
            return Ok((Some(rebuilt), reads));
        }
        if reads {
            if let LogicalPlan::Aggregate(a) = plan {
                let name = match slot.starts_with(GROUPS_SLOT) {
                    true => format!("{slot}_outer_{}", cuts.len()),
                    false => format!("{GROUPS_SLOT}_{}", cuts.len()),
                };
                let name = TableReference::bare(name);
                let (scan, groups) = slot_scan(&a.schema, &name)?;
                cuts.push((a.clone(), groups));
                return Ok((Some(scan), true));
            }
        }
        Ok((None, reads))
    }
    let mut cuts = Vec::new();
    let (rebuilt, _) = walk(plan, slot, &mut cuts)?;
    Ok((rebuilt.unwrap_or_else(|| plan.clone()), cuts))
}

/// Cuts `plan` at the join whose two sides each read the source: the rest of the plan
/// reads the joined rows from a slot. None when there is no such join.
fn split_join(
    plan: &LogicalPlan,
    slot: &str,
) -> Result<Option<(LogicalPlan, datafusion::logical_expr::Join, Slot)>, Error> {
    if let LogicalPlan::Join(j) = plan {
        let rows = |p: &LogicalPlan| -> Result<bool, Error> {
            Ok(count_scans(p, slot) == 1 && split(p, slot)?.1.is_empty())
        };
        if rows(&j.left)? && rows(&j.right)? {
            let (scan, s) = slot_scan(&j.schema, &TableReference::bare(JOIN_SLOT))?;
            return Ok(Some((scan, j.clone(), s)));
        }
    }
    let inputs = plan.inputs();
    let Some(at) = inputs.iter().position(|i| count_scans(i, slot) == 2) else {
        return Ok(None);
    };
    let Some((rebuilt, j, s)) = split_join(inputs[at], slot)? else {
        return Ok(None);
    };
    let mut new_inputs: Vec<LogicalPlan> = inputs.into_iter().cloned().collect();
    new_inputs[at] = rebuilt;
    let plan = plan
        .with_new_exprs(plan.expressions(), new_inputs)
        .map_err(plan_error)?;
    Ok(Some((plan, j, s)))
}

/// A scan of a slot (returned too) that looks like a plan of `schema` to the plan above
/// it: an aggregate's emitted groups, or a join's rows.
fn slot_scan(
    schema: &datafusion::common::DFSchema,
    name: &TableReference,
) -> Result<(LogicalPlan, Slot), Error> {
    let groups = name;
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), true))
        .collect();
    let slot = Slot::new(Arc::new(Schema::new(fields)));
    let source = datafusion::datasource::provider_as_source(slot.provider()?);
    let scan = LogicalPlanBuilder::scan(groups.clone(), source, None)
        .map_err(plan_error)?
        .build()
        .map_err(plan_error)?;
    let exprs = schema
        .iter()
        .enumerate()
        .map(|(i, (q, f))| {
            Expr::Column(Column::new(Some(groups.clone()), format!("c{i}")))
                .alias_qualified(q.cloned(), f.name())
        })
        .collect::<Vec<_>>();
    let p = Projection::try_new(exprs, Arc::new(scan)).map_err(plan_error)?;
    Ok((LogicalPlan::Projection(p), slot))
}

/// What reads the emitted groups of the query's aggregates (over `slots`): the rest of
/// the query as a stage, or, with a keyed sink and an aggregate in it, a running
/// aggregate over them and what follows it. Also returns the query's output columns.
async fn after_groups(
    ctx: &SessionContext,
    spec: &StreamSqlSpec,
    slots: Vec<Slot>,
    upper: &LogicalPlan,
) -> Result<(Option<Stage>, Option<Outer>, SchemaRef), Error> {
    let reads = |p: &LogicalPlan| -> usize {
        slots
            .iter()
            .enumerate()
            .map(|(i, _)| count_scans(p, &format!("{GROUPS_SLOT}_{i}")))
            .sum()
    };
    let (above, cuts) = match (spec.updating, slots.len()) {
        (true, 1) => split(upper, &format!("{GROUPS_SLOT}_0"))?,
        _ => (upper.clone(), Vec::new()),
    };
    let Some((a, groups)) = cuts.first() else {
        let schema = Arc::new(upper.schema().as_arrow().clone());
        return Ok((Some(Stage::new(ctx, slots, upper).await?), None, schema));
    };
    if cuts.len() > 1 || reads(&above) > 0 {
        return Err(Error::user(
            "a running aggregate over a query's groups reads them once",
        ));
    }
    check_per_batch(&a.input, &format!("{GROUPS_SLOT}_0"))?;
    check_in_place(&above)?;
    let outer = Outer {
        pre: Stage::new(ctx, slots, &a.input).await?,
        agg: Aggregation::new(ctx, a, Close::Running, &spec.event_time, groups).await?,
        post: Stage::new(ctx, vec![groups.clone()], &above).await?,
    };
    let schema = Arc::new(above.schema().as_arrow().clone());
    Ok((None, Some(outer), schema))
}

/// What follows a running aggregate maps each group to one row, so the sink can update
/// it in place: projections only.
fn check_in_place(plan: &LogicalPlan) -> Result<(), Error> {
    let what = match plan {
        LogicalPlan::Projection(_) | LogicalPlan::SubqueryAlias(_) | LogicalPlan::TableScan(_) => {
            None
        }
        LogicalPlan::Filter(_) => Some("a filter (HAVING or WHERE)"),
        LogicalPlan::Sort(_) => Some("ORDER BY"),
        LogicalPlan::Limit(_) => Some("LIMIT"),
        LogicalPlan::Join(_) => Some("a join"),
        LogicalPlan::Window(_) => Some("a window function (OVER)"),
        LogicalPlan::Aggregate(_) | LogicalPlan::Distinct(_) => Some("another aggregate"),
        _ => Some("this step"),
    };
    if let Some(what) = what {
        return Err(Error::user(format!(
            "a running aggregate (no window) is updated in place at each commit: {what} over \
             its groups would leave rows in the table that no longer hold"
        ))
        .with_hint("keep the running aggregate to SELECT ... GROUP BY; filter or join it in a query over the table"));
    }
    for i in plan.inputs() {
        check_in_place(i)?;
    }
    Ok(())
}

/// What runs on every batch may not need rows from other batches.
fn check_per_batch(plan: &LogicalPlan, slot: &str) -> Result<(), Error> {
    if count_scans(plan, slot) == 0 {
        return Ok(());
    }
    let what = match plan {
        LogicalPlan::Sort(_) => Some("ORDER BY"),
        LogicalPlan::Limit(_) => Some("LIMIT"),
        LogicalPlan::Window(_) => Some("a window function (OVER)"),
        LogicalPlan::Distinct(_) => Some("DISTINCT"),
        LogicalPlan::Aggregate(_) => Some("an aggregate"),
        _ => None,
    };
    if let Some(what) = what {
        return Err(Error::user(format!(
            "{what} over the whole stream never finishes"
        ))
        .with_hint("aggregate over a window (TUMBLE, HOP or SESSION in FROM) and order or limit what it emits"));
    }
    for i in plan.inputs() {
        check_per_batch(i, slot)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Windows against a naive reference: random events, out of order within each
    //! partition, with some far too late; the stream is cut into random batches and its
    //! state checkpointed and restored into a freshly compiled query at random points.

    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use std::collections::BTreeMap;

    const USERS: [&str; 4] = ["ann", "bob", "cy", "dee"];
    const DELAY_MS: i64 = 3_000;

    #[derive(Clone, Copy, Debug)]
    struct Event {
        id: i64,
        partition: i32,
        user: usize,
        amount: i64,
        ts: i64,
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("user_name", DataType::Utf8, true),
            Field::new("amount", DataType::Int64, true),
            Field::new("ts", DataType::Int64, true),
            Field::new("_kafka_partition", DataType::Int32, false),
        ]))
    }

    fn batch(events: &[Event]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from_iter_values(events.iter().map(|e| e.id))),
                Arc::new(StringArray::from_iter_values(
                    events.iter().map(|e| USERS[e.user]),
                )),
                Arc::new(Int64Array::from_iter_values(
                    events.iter().map(|e| e.amount),
                )),
                Arc::new(Int64Array::from_iter_values(events.iter().map(|e| e.ts))),
                Arc::new(Int32Array::from_iter_values(
                    events.iter().map(|e| e.partition),
                )),
            ],
        )
        .unwrap()
    }

    /// Events of 3 partitions, interleaved; each partition's clock moves on by 0-400 ms a
    /// row, with a 6 s lull now and then; rows are up to 2.5 s out of order (on time),
    /// and 1 in 40 is 5-30 s behind.
    fn events(rng: &mut Rng, n: usize) -> Vec<Event> {
        let mut clocks = [1_700_000_000_000i64; 3];
        let mut out = Vec::new();
        for id in 0..n as i64 {
            // Every partition's first row comes first: no partition starts after windows
            // were emitted without it (that case is tested on its own).
            let p = match id {
                0..=2 => id as usize,
                _ => rng.below(3) as usize,
            };
            clocks[p] += rng.below(400) as i64;
            if rng.below(150) == 0 {
                // A lull on every partition: sessions end.
                let next = clocks.iter().max().unwrap() + 6_000;
                clocks = [next; 3];
            }
            let ts = match rng.below(40) {
                0 => clocks[p] - 5_000 - rng.below(25_000) as i64,
                _ => clocks[p] - rng.below(2_500) as i64,
            };
            out.push(Event {
                id,
                partition: p as i32,
                user: rng.below(USERS.len() as u64) as usize,
                amount: rng.below(100) as i64,
                ts,
            });
        }
        out
    }

    /// Which events are late, by the rule: before their partition's newest on-time event
    /// time minus the delay; and the final watermark.
    fn reference_late(events: &[Event]) -> (BTreeSet<i64>, i64) {
        let mut marks: BTreeMap<i32, i64> = BTreeMap::new();
        let mut late = BTreeSet::new();
        for e in events {
            match marks.get(&e.partition) {
                Some(m) if e.ts < m - DELAY_MS => {
                    late.insert(e.id);
                }
                _ => {
                    let m = marks.entry(e.partition).or_insert(e.ts);
                    *m = (*m).max(e.ts);
                }
            }
        }
        let wm = marks.values().min().unwrap() - DELAY_MS;
        (late, wm)
    }

    /// (window start ms, window end ms, user) -> (count, sum, max, distinct amount % 5).
    type Result3 = BTreeMap<(i64, i64, String), (i64, i64, i64, i64)>;

    fn aggregate(rows: impl Iterator<Item = ((i64, i64, String), i64)>) -> Result3 {
        let mut acc: BTreeMap<(i64, i64, String), Vec<i64>> = BTreeMap::new();
        for (k, amount) in rows {
            acc.entry(k).or_default().push(amount);
        }
        acc.into_iter()
            .map(|(k, v)| {
                let kinds: BTreeSet<i64> = v.iter().map(|a| a % 5).collect();
                (
                    k,
                    (
                        v.len() as i64,
                        v.iter().sum(),
                        *v.iter().max().unwrap(),
                        kinds.len() as i64,
                    ),
                )
            })
            .collect()
    }

    fn reference(events: &[Event], window: &Window) -> (Result3, BTreeSet<i64>) {
        let (late, wm) = reference_late(events);
        let on_time: Vec<&Event> = events.iter().filter(|e| !late.contains(&e.id)).collect();
        let mut rows = Vec::new();
        match window {
            Window::Tumble { size } => {
                let size = size / 1000;
                for e in &on_time {
                    let s = e.ts.div_euclid(size) * size;
                    rows.push(((s, s + size, USERS[e.user].to_string()), e.amount));
                }
            }
            Window::Hop { slide, size } => {
                let (slide, size) = (slide / 1000, size / 1000);
                for e in &on_time {
                    let mut s = e.ts.div_euclid(slide) * slide;
                    while s + size > e.ts {
                        rows.push(((s, s + size, USERS[e.user].to_string()), e.amount));
                        s -= slide;
                    }
                }
            }
            Window::Session { gap, .. } => {
                let gap = gap / 1000;
                for (u, name) in USERS.iter().enumerate() {
                    let mut mine: Vec<&&Event> = on_time.iter().filter(|e| e.user == u).collect();
                    mine.sort_by_key(|e| e.ts);
                    let mut i = 0;
                    while i < mine.len() {
                        let start = mine[i].ts;
                        let mut last = start;
                        let mut j = i + 1;
                        while j < mine.len() && mine[j].ts < last + gap {
                            last = last.max(mine[j].ts);
                            j += 1;
                        }
                        for e in &mine[i..j] {
                            rows.push(((start, last + gap, name.to_string()), e.amount));
                        }
                        i = j;
                    }
                }
            }
        }
        let emitted = aggregate(rows.into_iter())
            .into_iter()
            .filter(|((_, end, _), _)| *end <= wm)
            .collect();
        (emitted, late)
    }

    const SQL_AGGS: &str = "count(*) AS n, sum(amount) AS total, max(amount) AS top, \
                            count(DISTINCT amount % 5) AS kinds";

    async fn compile(from: &str) -> StreamSql {
        let ctx = weir_lake::new_session();
        let sql = format!(
            "SELECT window_start, window_end, user_name, {SQL_AGGS} FROM {from} \
             GROUP BY window_start, window_end, user_name"
        );
        StreamSql::compile(
            &ctx,
            &StreamSqlSpec {
                sql,
                source: "events".into(),
                schema: schema(),
                partition_column: "_kafka_partition".into(),
                event_time: Some(("ts".into(), Duration::from_millis(DELAY_MS as u64))),
                updating: false,
            },
        )
        .await
        .unwrap()
    }

    fn collect_output(out: &[RecordBatch], into: &mut Result3) {
        for b in out {
            let ms = |i: usize| {
                b.column(i)
                    .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                    .values()
                    .iter()
                    .map(|v| v / 1000)
                    .collect::<Vec<_>>()
            };
            let (starts, ends) = (ms(0), ms(1));
            let users = b.column(2).as_string::<i32>();
            let int = |i: usize| b.column(i).as_primitive::<Int64Type>().clone();
            let (n, total, top, kinds) = (int(3), int(4), int(5), int(6));
            for r in 0..b.num_rows() {
                let key = (starts[r], ends[r], users.value(r).to_string());
                let v = (n.value(r), total.value(r), top.value(r), kinds.value(r));
                assert!(
                    into.insert(key.clone(), v).is_none(),
                    "{key:?} emitted twice"
                );
            }
        }
    }

    async fn run_against_reference(from: &str, window: Window, seed: u64) {
        let mut rng = Rng(seed);
        let events = events(&mut rng, 3_000);
        let (want, want_late) = reference(&events, &window);
        let mut q = compile(from).await;
        let mut got = Result3::new();
        let mut late = BTreeSet::new();
        let mut at = 0;
        let mut restores = 0;
        while at < events.len() {
            let n = 1 + rng.below(200) as usize;
            let part = &events[at..(at + n).min(events.len())];
            let pushed = q.push(&batch(part)).await.unwrap();
            assert!(pushed.rows.is_empty());
            for (i, reason) in &pushed.late {
                assert!(reason.starts_with("late: event time"), "{reason}");
                late.insert(part[*i].id);
            }
            collect_output(&q.advance().await.unwrap(), &mut got);
            if rng.below(3) == 0 {
                // A crash after this commit: a new process takes up the checkpoint.
                let state = q.checkpoint().unwrap();
                q = compile(from).await;
                q.restore(&state).unwrap();
                restores += 1;
            }
            at += n;
        }
        assert!(restores > 3);
        assert!(want_late.len() > 20, "the data has late rows");
        assert_eq!(late, want_late, "late rows");
        assert!(want.len() > 50, "{} windows", want.len());
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn tumbling_windows_match_the_reference() {
        for seed in [1, 2, 3] {
            run_against_reference(
                "TUMBLE(events, ts, INTERVAL '10' SECOND)",
                Window::Tumble { size: 10_000_000 },
                seed,
            )
            .await;
        }
    }

    #[tokio::test]
    async fn hopping_windows_match_the_reference() {
        for seed in [4, 5] {
            run_against_reference(
                "HOP(events, ts, INTERVAL '5 seconds', '15s')",
                Window::Hop {
                    slide: 5_000_000,
                    size: 15_000_000,
                },
                seed,
            )
            .await;
        }
    }

    #[tokio::test]
    async fn session_windows_match_the_reference() {
        for seed in [6, 7] {
            run_against_reference(
                "SESSION(events, DESCRIPTOR(ts), '2s', user_name)",
                Window::Session {
                    gap: 2_000_000,
                    keys: vec!["user_name".into()],
                },
                seed,
            )
            .await;
        }
    }

    fn spec(sql: &str, event_time: bool) -> StreamSqlSpec {
        StreamSqlSpec {
            sql: sql.into(),
            source: "events".into(),
            schema: schema(),
            partition_column: "_kafka_partition".into(),
            event_time: event_time.then(|| ("ts".into(), Duration::from_millis(DELAY_MS as u64))),
            updating: false,
        }
    }

    fn ev(id: i64, partition: i32, ts: i64) -> Event {
        Event {
            id,
            partition,
            user: 0,
            amount: 1,
            ts,
        }
    }

    #[tokio::test]
    async fn a_partition_holds_the_watermark_until_it_delivers_or_is_idle() {
        let mut q = compile("TUMBLE(events, ts, INTERVAL '10' SECOND)").await;
        q.set_partitions([0, 1]);
        let t0 = 1_700_000_000_000;
        q.push(&batch(&[ev(1, 0, t0), ev(2, 0, t0 + 60_000)]))
            .await
            .unwrap();
        assert_eq!(q.watermark(), None, "partition 1 has not delivered");
        assert!(q.advance().await.unwrap().is_empty());
        q.set_idle([1]);
        assert_eq!(q.watermark(), Some((t0 + 60_000 - DELAY_MS) * 1000));
        let out = q.advance().await.unwrap();
        assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
        // Partition 1 wakes up with a row for the window already emitted: late, with why.
        let pushed = q.push(&batch(&[ev(3, 1, t0 + 1)])).await.unwrap();
        assert_eq!(pushed.late.len(), 1);
        assert!(
            pushed.late[0].1.contains("already emitted"),
            "{}",
            pushed.late[0].1
        );
        // On time for a window still open: counted.
        let pushed = q.push(&batch(&[ev(4, 1, t0 + 59_000)])).await.unwrap();
        assert!(pushed.late.is_empty());
    }

    #[tokio::test]
    async fn queries_that_cannot_stream_are_refused_with_a_reason() {
        let ctx = weir_lake::new_session();
        let cases = [
            ("SELECT user_name, count(*) AS n FROM events GROUP BY user_name", true, "needs a window"),
            ("SELECT id FROM events ORDER BY id", false, "ORDER BY over the whole stream"),
            ("SELECT window_start, count(*) AS n FROM TUMBLE(events, ts, '10s') GROUP BY window_start", false, "no event time"),
            ("SELECT user_name, count(*) AS n FROM TUMBLE(events, ts, '10s') GROUP BY user_name", true, "groups by the window"),
            ("SELECT window_start, window_end, count(*) FROM TUMBLE(events, ts, '10s') GROUP BY window_start, window_end", true, "needs a name"),
            ("SELECT * FROM TUMBLE(other, ts, '10s')", true, "first argument is the source"),
            ("SELECT * FROM HOP(events, ts, '10s', '5s')", true, "slide is longer than the size"),
            ("SELECT * FROM HOP(events, ts, '1ms', '1d')", true, "in 86400000 windows"),
            ("SELECT a.id FROM events a JOIN events b ON a.id = b.id JOIN events c ON b.id = c.id", false, "reads it 3 times"),
            ("SELECT a.id FROM events a LEFT JOIN events b ON a.id = b.id", true, "needs a time bound"),
            ("SELECT a.id FROM events a JOIN events b ON a.ts < b.ts", false, "needs an equality"),
            ("SELECT count(*) AS n FROM events a JOIN events b ON a.id = b.id", false, "must group by a time bound"),
            (
                "SELECT a.n FROM (SELECT window_start, count(*) AS n FROM TUMBLE(events, ts, '10s') \
                 GROUP BY window_start) a JOIN TUMBLE(events, ts, '10s') b \
                 ON a.window_start = b.window_start",
                true,
                "each aggregated",
            ),
            (
                "SELECT a.n FROM (SELECT window_start, count(*) AS n FROM TUMBLE(events, ts, '10s') \
                 GROUP BY window_start) a JOIN (SELECT window_start, count(*) AS m \
                 FROM TUMBLE(events, ts, '20s') GROUP BY window_start) b \
                 ON a.window_start = b.window_start",
                true,
                "must be the same",
            ),
        ];
        for (sql, et, want) in cases {
            let e = StreamSql::compile(&ctx, &spec(sql, et)).await.unwrap_err();
            assert!(e.to_string().contains(want), "{sql}: {e}");
        }
    }

    #[tokio::test]
    async fn a_query_without_an_aggregate_runs_on_every_batch() {
        let ctx = weir_lake::new_session();
        let mut q = StreamSql::compile(
            &ctx,
            &spec(
                "SELECT id, amount * 2 AS doubled, window_start FROM TUMBLE(events, ts, '10s') WHERE amount > 0",
                true,
            ),
        )
        .await
        .unwrap();
        let t0 = 1_700_000_000_000;
        let mut zero = ev(2, 0, t0);
        zero.amount = 0;
        let pushed = q
            .push(&batch(&[ev(1, 0, t0 + 12_000), zero]))
            .await
            .unwrap();
        let rows: usize = pushed.rows.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 1);
        let b = &pushed.rows[0];
        assert_eq!(b.column(1).as_primitive::<Int64Type>().value(0), 2);
        assert_eq!(
            b.column(2)
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                .value(0),
            (t0 + 10_000) * 1000
        );
        // The same plan runs again for every batch (a repartition in it included).
        for i in 0..3 {
            let pushed = q
                .push(&batch(&[
                    ev(10 + i, 0, t0 + 20_000),
                    ev(20 + i, 0, t0 + 21_000),
                ]))
                .await
                .unwrap();
            assert_eq!(pushed.rows.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
        }
    }

    #[tokio::test]
    async fn first_value_by_order_is_right_whatever_order_rows_come_in() {
        let ctx = weir_lake::new_session();
        let mk = || {
            spec(
                "SELECT window_start, max(amount) AS top, \
                 first_value(id ORDER BY amount DESC, id) AS top_id \
                 FROM TUMBLE(events, ts, '10s') GROUP BY window_start",
                true,
            )
        };
        let mut q = StreamSql::compile(&ctx, &mk()).await.unwrap();
        let t0 = 1_700_000_000_000;
        let mut rng = Rng(11);
        let mut events: Vec<Event> = (0..500)
            .map(|i| {
                let mut e = ev(i, 0, t0 + rng.below(5_000) as i64);
                e.amount = rng.below(1_000) as i64;
                e
            })
            .collect();
        events.sort_by_key(|e| e.ts);
        let want = events
            .iter()
            .max_by_key(|e| (e.amount, -e.id))
            .map(|e| (e.amount, e.id))
            .unwrap();
        for (i, chunk) in events.chunks(70).enumerate() {
            q.push(&batch(chunk)).await.unwrap();
            if i % 2 == 1 {
                let state = q.checkpoint().unwrap();
                q = StreamSql::compile(&ctx, &mk()).await.unwrap();
                q.restore(&state).unwrap();
            }
        }
        q.push(&batch(&[ev(999, 0, t0 + 60_000)])).await.unwrap();
        let out = q.advance().await.unwrap();
        let b = &out[0];
        assert_eq!(b.num_rows(), 1);
        assert_eq!(b.column(1).as_primitive::<Int64Type>().value(0), want.0);
        assert_eq!(b.column(2).as_primitive::<Int64Type>().value(0), want.1);
    }

    #[tokio::test]
    async fn aggregates_of_the_same_window_are_joined_when_it_closes() {
        let sql = "SELECT u.window_start, u.user_name, u.n, t.total_n \
             FROM (SELECT window_start, user_name, count(*) AS n \
                   FROM TUMBLE(events, ts, '10s') WHERE amount >= 50 \
                   GROUP BY window_start, user_name) u \
             JOIN (SELECT window_start, count(*) AS total_n \
                   FROM TUMBLE(events, ts, '10s') GROUP BY window_start) t \
             ON u.window_start = t.window_start";
        let ctx = weir_lake::new_session();
        let mut rng = Rng(21);
        let events = events(&mut rng, 3_000);
        let (late, wm) = reference_late(&events);
        let mut totals: BTreeMap<i64, i64> = BTreeMap::new();
        let mut per_user: BTreeMap<(i64, String), i64> = BTreeMap::new();
        for e in events.iter().filter(|e| !late.contains(&e.id)) {
            let s = e.ts.div_euclid(10_000) * 10_000;
            if s + 10_000 > wm {
                continue;
            }
            *totals.entry(s).or_default() += 1;
            if e.amount >= 50 {
                *per_user.entry((s, USERS[e.user].to_string())).or_default() += 1;
            }
        }
        let want: BTreeMap<(i64, String), (i64, i64)> = per_user
            .into_iter()
            .map(|((s, u), n)| ((s * 1000, u), (n, totals[&s])))
            .collect();
        let mut q = StreamSql::compile(&ctx, &spec(sql, true)).await.unwrap();
        let mut got = BTreeMap::new();
        for (i, chunk) in events.chunks(170).enumerate() {
            q.push(&batch(chunk)).await.unwrap();
            for b in q.advance().await.unwrap() {
                let s = b
                    .column(0)
                    .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
                let u = b.column(1).as_string::<i32>();
                let n = b.column(2).as_primitive::<Int64Type>();
                let t = b.column(3).as_primitive::<Int64Type>();
                for r in 0..b.num_rows() {
                    let k = (s.value(r), u.value(r).to_string());
                    assert!(got.insert(k, (n.value(r), t.value(r))).is_none());
                }
            }
            if i % 3 == 2 {
                let state = q.checkpoint().unwrap();
                q = StreamSql::compile(&ctx, &spec(sql, true)).await.unwrap();
                q.restore(&state).unwrap();
            }
        }
        assert!(want.len() > 30, "{} rows", want.len());
        assert_eq!(got, want);
    }

    /// (a id, b id) pairs a self-join query produced, checking them as they come.
    fn pairs(out: &[RecordBatch], into: &mut Vec<(i64, i64)>) {
        for b in out {
            let a = b.column(0).as_primitive::<Int64Type>();
            let c = b.column(1).as_primitive::<Int64Type>();
            into.extend((0..b.num_rows()).map(|r| (a.value(r), c.value(r))));
        }
    }

    /// (a id, b id) pairs of an outer join, either side possibly null.
    fn nullable_pairs(out: &[RecordBatch], into: &mut Vec<(Option<i64>, Option<i64>)>) {
        for b in out {
            let a = b.column(0).as_primitive::<Int64Type>();
            let c = b.column(1).as_primitive::<Int64Type>();
            into.extend((0..b.num_rows()).map(|r| {
                (
                    a.is_valid(r).then(|| a.value(r)),
                    c.is_valid(r).then(|| c.value(r)),
                )
            }));
        }
    }

    /// A join of the stream with itself against the naive join of its on-time rows: the
    /// stream in random batches, checkpointed into a fresh query now and then. Returns the
    /// most rows the join held on a side.
    async fn self_join_against_reference(
        sql: &str,
        seed: u64,
        matches: impl Fn(&Event, &Event) -> bool,
    ) -> (usize, usize) {
        let ctx = weir_lake::new_session();
        let mut rng = Rng(seed);
        let events = events(&mut rng, 3_000);
        let (want_late, _) = reference_late(&events);
        let on_time: Vec<&Event> = events
            .iter()
            .filter(|e| !want_late.contains(&e.id))
            .collect();
        let mut want = Vec::new();
        for a in &on_time {
            for b in &on_time {
                if matches(a, b) {
                    want.push((a.id, b.id));
                }
            }
        }
        let mut q = StreamSql::compile(&ctx, &spec(sql, true)).await.unwrap();
        let (mut got, mut late, mut most, mut restores) = (Vec::new(), BTreeSet::new(), 0, 0);
        let mut at = 0;
        while at < events.len() {
            let part = &events[at..(at + 1 + rng.below(150) as usize).min(events.len())];
            let pushed = q.push(&batch(part)).await.unwrap();
            late.extend(pushed.late.iter().map(|(i, _)| part[*i].id));
            pairs(&pushed.rows, &mut got);
            assert!(q.advance().await.unwrap().is_empty());
            most = most.max(q.join_rows_held().unwrap().into_iter().max().unwrap());
            if rng.below(4) == 0 {
                let state = q.checkpoint().unwrap();
                q = StreamSql::compile(&ctx, &spec(sql, true)).await.unwrap();
                q.restore(&state).unwrap();
                restores += 1;
            }
            at += part.len();
        }
        assert!(restores > 3);
        assert_eq!(late, want_late, "late rows");
        got.sort_unstable();
        want.sort_unstable();
        assert!(want.len() > 500, "{} pairs", want.len());
        assert_eq!(got.len(), want.len(), "pairs: each exactly once");
        assert_eq!(got, want);
        (most, on_time.len())
    }

    #[tokio::test]
    async fn a_join_of_the_stream_with_itself_matches_the_naive_join() {
        // No time bound: every row of each side is kept.
        let sql = "SELECT a.id AS a_id, b.id AS b_id FROM events a JOIN events b \
                   ON a.amount = b.amount WHERE a.user_name = 'ann' AND b.user_name = 'bob'";
        let (most, _) = self_join_against_reference(sql, 5, |a, b| {
            a.amount == b.amount && a.user == 0 && b.user == 1
        })
        .await;
        assert!(most > 600, "every row is kept: {most}");
    }

    #[tokio::test]
    async fn a_time_bounded_self_join_matches_and_lets_rows_go() {
        // b within 5 s after a: a's rows go once the watermark passes a.ts + 5 s, b's
        // once it passes b.ts.
        let sql = "SELECT a.id AS a_id, b.id AS b_id FROM events a JOIN events b \
                   ON a.user_name = b.user_name AND b.ts BETWEEN a.ts AND a.ts + 5000 \
                   WHERE a.amount % 2 = 0 AND b.amount % 2 = 1";
        let (most, rows) = self_join_against_reference(sql, 9, |a, b| {
            a.user == b.user
                && b.ts >= a.ts
                && b.ts <= a.ts + 5_000
                && a.amount % 2 == 0
                && b.amount % 2 == 1
        })
        .await;
        assert!(most < rows / 6, "held at most {most} of {rows} rows");
    }

    #[tokio::test]
    async fn an_aggregate_over_a_bounded_self_join_emits_each_group_once_complete() {
        // Per "auction" a (even amounts), its "bids" b (odd) of the same user within 4 s:
        // a group is complete once the watermark passes a.ts + 4 s.
        let sql = "SELECT a.id AS a_id, max(b.amount) AS top, count(*) AS n \
                   FROM events a JOIN events b \
                   ON a.user_name = b.user_name AND b.ts BETWEEN a.ts AND a.ts + 4000 \
                   WHERE a.amount % 2 = 0 AND b.amount % 2 = 1 \
                   GROUP BY a.id, a.ts + 4000";
        let ctx = weir_lake::new_session();
        let mut rng = Rng(33);
        let events = events(&mut rng, 3_000);
        let (late, wm) = reference_late(&events);
        let on_time: Vec<&Event> = events.iter().filter(|e| !late.contains(&e.id)).collect();
        let mut want: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
        for a in on_time
            .iter()
            .filter(|a| a.amount % 2 == 0 && a.ts + 4_000 < wm)
        {
            for b in &on_time {
                if b.amount % 2 == 1 && b.user == a.user && b.ts >= a.ts && b.ts <= a.ts + 4_000 {
                    let e = want.entry(a.id).or_insert((i64::MIN, 0));
                    *e = (e.0.max(b.amount), e.1 + 1);
                }
            }
        }
        let mut q = StreamSql::compile(&ctx, &spec(sql, true)).await.unwrap();
        let mut got = BTreeMap::new();
        let mut most = 0;
        for (i, chunk) in events.chunks(130).enumerate() {
            let pushed = q.push(&batch(chunk)).await.unwrap();
            assert!(pushed.rows.is_empty());
            for b in q.advance().await.unwrap() {
                let id = b.column(0).as_primitive::<Int64Type>();
                let top = b.column(1).as_primitive::<Int64Type>();
                let n = b.column(2).as_primitive::<Int64Type>();
                for r in 0..b.num_rows() {
                    let v = (top.value(r), n.value(r));
                    assert!(
                        got.insert(id.value(r), v).is_none(),
                        "{} twice",
                        id.value(r)
                    );
                }
            }
            most = most.max(q.join_rows_held().unwrap().into_iter().max().unwrap());
            if i % 4 == 3 {
                let state = q.checkpoint().unwrap();
                q = StreamSql::compile(&ctx, &spec(sql, true)).await.unwrap();
                q.restore(&state).unwrap();
            }
        }
        assert!(want.len() > 300, "{} groups", want.len());
        assert_eq!(got, want);
        assert!(most < 400, "held at most {most} rows a side");
        // Without the bound in the GROUP BY, a group is never known complete.
        let e = StreamSql::compile(&ctx, &spec(&sql.replace(", a.ts + 4000", ""), true))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("must group by a time bound"), "{e}");
        assert!(format!("{e:?}").contains("a.ts + Int64(4000)"), "{e:?}");
    }

    #[tokio::test]
    async fn a_left_self_join_emits_each_unmatched_row_once_when_it_can_no_longer_match() {
        // "Orders" (even amounts) and their "payments" (odd, same user, within 1.5 s): an
        // order without a payment comes out with nulls once the watermark passes a.ts + 1.5 s.
        let sql = "SELECT a.id AS a_id, b.id AS b_id FROM events a LEFT JOIN events b \
                   ON a.user_name = b.user_name AND b.ts BETWEEN a.ts AND a.ts + 1500 \
                   AND b.amount % 2 = 1 WHERE a.amount % 2 = 0";
        let ctx = weir_lake::new_session();
        let mut rng = Rng(17);
        let events = events(&mut rng, 2_000);
        let (late, wm) = reference_late(&events);
        let on_time: Vec<&Event> = events.iter().filter(|e| !late.contains(&e.id)).collect();
        let mut want = Vec::new();
        for a in on_time.iter().filter(|a| a.amount % 2 == 0) {
            let mut any = false;
            for b in &on_time {
                if b.amount % 2 == 1 && b.user == a.user && b.ts >= a.ts && b.ts <= a.ts + 1_500 {
                    want.push((Some(a.id), Some(b.id)));
                    any = true;
                }
            }
            if !any && a.ts + 1_500 < wm {
                want.push((Some(a.id), None));
            }
        }
        let mut q = StreamSql::compile(&ctx, &spec(sql, true)).await.unwrap();
        let mut got = Vec::new();
        let mut at = 0;
        while at < events.len() {
            let part = &events[at..(at + 1 + rng.below(120) as usize).min(events.len())];
            nullable_pairs(&q.push(&batch(part)).await.unwrap().rows, &mut got);
            nullable_pairs(&q.advance().await.unwrap(), &mut got);
            if rng.below(3) == 0 {
                let state = q.checkpoint().unwrap();
                q = StreamSql::compile(&ctx, &spec(sql, true)).await.unwrap();
                q.restore(&state).unwrap();
            }
            at += part.len();
        }
        got.sort_unstable();
        want.sort_unstable();
        let unmatched = want.iter().filter(|w| w.1.is_none()).count();
        assert!(
            unmatched > 50 && want.len() - unmatched > 200,
            "{unmatched} of {}",
            want.len()
        );
        assert_eq!(got, want);
        // Without a bound on the right side's time, an unmatched row is never final.
        let unbounded = "SELECT a.id AS a_id, b.id AS b_id FROM events a LEFT JOIN events b \
                         ON a.user_name = b.user_name";
        let e = StreamSql::compile(&ctx, &spec(unbounded, true))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("needs a time bound on the right side"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_running_aggregate_emits_the_groups_each_commit_changed_with_current_values() {
        let sql = "SELECT user_name, count(*) AS n, sum(amount) AS total, \
                   count(DISTINCT amount % 7) AS kinds FROM events GROUP BY user_name";
        let running = |sql: &str| StreamSqlSpec {
            updating: true,
            ..spec(sql, false)
        };
        let ctx = weir_lake::new_session();
        let mut rng = Rng(5);
        let events = events(&mut rng, 3_000);
        let mut q = StreamSql::compile(&ctx, &running(sql)).await.unwrap();
        // The table as the sink keeps it: each emitted row replaces its key's.
        let mut table: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
        let mut at = 0;
        let mut restores = 0;
        while at < events.len() {
            // Only the groups of the batch's users come out.
            let part = &events[at..(at + 1 + rng.below(60) as usize).min(events.len())];
            assert!(q.push(&batch(part)).await.unwrap().rows.is_empty());
            let touched: BTreeSet<&str> = part.iter().map(|e| USERS[e.user]).collect();
            let mut emitted = BTreeSet::new();
            for b in q.advance().await.unwrap() {
                let u = b.column(0).as_string::<i32>();
                let int = |i: usize| b.column(i).as_primitive::<Int64Type>().clone();
                let (n, total, kinds) = (int(1), int(2), int(3));
                for r in 0..b.num_rows() {
                    assert!(emitted.insert(u.value(r).to_string()), "a group twice");
                    table.insert(
                        u.value(r).to_string(),
                        (n.value(r), total.value(r), kinds.value(r)),
                    );
                }
            }
            let emitted: BTreeSet<&str> = emitted.iter().map(|s| s.as_str()).collect();
            assert_eq!(emitted, touched, "the changed groups, only");
            // Nothing changed, nothing emitted.
            assert!(q.advance().await.unwrap().is_empty());
            if rng.below(4) == 0 {
                let state = q.checkpoint().unwrap();
                q = StreamSql::compile(&ctx, &running(sql)).await.unwrap();
                q.restore(&state).unwrap();
                restores += 1;
            }
            at += part.len();
        }
        assert!(restores > 5);
        let mut want: BTreeMap<String, (i64, i64, BTreeSet<i64>)> = BTreeMap::new();
        for e in &events {
            let w = want.entry(USERS[e.user].to_string()).or_default();
            w.0 += 1;
            w.1 += e.amount;
            w.2.insert(e.amount % 7);
        }
        let want: BTreeMap<String, (i64, i64, i64)> = want
            .into_iter()
            .map(|(k, (n, t, d))| (k, (n, t, d.len() as i64)))
            .collect();
        assert_eq!(table, want);
        // What follows it must map each group to one row.
        let having = format!("{sql} HAVING count(*) > 10");
        let e = StreamSql::compile(&ctx, &running(&having))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("updated in place"), "{e}");
        // Without a keyed sink, an aggregate without a window is refused, with both ways out.
        let e = StreamSql::compile(&ctx, &spec(sql, false))
            .await
            .unwrap_err();
        assert!(format!("{e:?}").contains("sink.key"), "{e:?}");
    }

    #[tokio::test]
    async fn a_running_aggregate_over_completed_groups_of_a_bounded_self_join() {
        // Nexmark q4's shape: per "auction" a its top "bid" once complete, then per user
        // the running average of those tops.
        let sql = "SELECT user_name, avg(top) AS average, count(*) AS auctions FROM ( \
                   SELECT a.id, a.user_name, max(b.amount) AS top FROM events a JOIN events b \
                   ON a.user_name = b.user_name AND b.ts BETWEEN a.ts AND a.ts + 4000 \
                   WHERE a.amount % 2 = 0 AND b.amount % 2 = 1 \
                   GROUP BY a.id, a.user_name, a.ts + 4000) q GROUP BY user_name";
        let running = StreamSqlSpec {
            updating: true,
            ..spec(sql, true)
        };
        let ctx = weir_lake::new_session();
        let mut rng = Rng(41);
        let events = events(&mut rng, 3_000);
        let (late, wm) = reference_late(&events);
        let on_time: Vec<&Event> = events.iter().filter(|e| !late.contains(&e.id)).collect();
        let mut tops: BTreeMap<(usize, i64), i64> = BTreeMap::new();
        for a in on_time
            .iter()
            .filter(|a| a.amount % 2 == 0 && a.ts + 4_000 < wm)
        {
            for b in &on_time {
                if b.amount % 2 == 1 && b.user == a.user && b.ts >= a.ts && b.ts <= a.ts + 4_000 {
                    let t = tops.entry((a.user, a.id)).or_insert(b.amount);
                    *t = (*t).max(b.amount);
                }
            }
        }
        let mut want: BTreeMap<String, (f64, i64)> = BTreeMap::new();
        for (u, name) in USERS.iter().enumerate() {
            let mine: Vec<i64> = tops
                .iter()
                .filter(|((w, _), _)| *w == u)
                .map(|(_, t)| *t)
                .collect();
            let avg = mine.iter().sum::<i64>() as f64 / mine.len() as f64;
            want.insert(name.to_string(), (avg, mine.len() as i64));
        }
        let mut q = StreamSql::compile(&ctx, &running).await.unwrap();
        let mut table: BTreeMap<String, (f64, i64)> = BTreeMap::new();
        let mut updates = 0;
        for (i, chunk) in events.chunks(150).enumerate() {
            q.push(&batch(chunk)).await.unwrap();
            for b in q.advance().await.unwrap() {
                let u = b.column(0).as_string::<i32>();
                let avg = b.column(1).as_primitive::<arrow::datatypes::Float64Type>();
                let n = b.column(2).as_primitive::<Int64Type>();
                for r in 0..b.num_rows() {
                    table.insert(u.value(r).to_string(), (avg.value(r), n.value(r)));
                    updates += 1;
                }
            }
            if i % 3 == 2 {
                let state = q.checkpoint().unwrap();
                q = StreamSql::compile(&ctx, &running).await.unwrap();
                q.restore(&state).unwrap();
            }
        }
        assert!(updates > 20, "{updates} updates");
        assert_eq!(table.len(), want.len());
        for (u, (avg, n)) in &want {
            let (got_avg, got_n) = table[u];
            assert_eq!(got_n, *n, "{u}");
            assert!((got_avg - avg).abs() < 1e-9, "{u}: {got_avg} vs {avg}");
        }
    }

    #[tokio::test]
    async fn a_long_running_join_merges_its_kept_batches() {
        let sql = "SELECT a.id AS a_id, b.id AS b_id FROM events a JOIN events b \
                   ON a.amount = b.amount WHERE a.user_name = 'ann' AND b.user_name = 'bob'";
        let ctx = weir_lake::new_session();
        let mut rng = Rng(77);
        let events = events(&mut rng, 1_500);
        let mut want = Vec::new();
        for a in events.iter().filter(|e| e.user == 0) {
            for b in events.iter().filter(|e| e.user == 1) {
                if a.amount == b.amount {
                    want.push((a.id, b.id));
                }
            }
        }
        let mut q = StreamSql::compile(&ctx, &spec(sql, false)).await.unwrap();
        let mut got = Vec::new();
        let mut most = 0;
        // One event a batch: hundreds of small batches on each side.
        for e in &events {
            pairs(
                &q.push(&batch(std::slice::from_ref(e))).await.unwrap().rows,
                &mut got,
            );
            let kept = q.join.as_ref().unwrap().op.kept_batches();
            most = most.max(kept[0].max(kept[1]));
        }
        got.sort_unstable();
        want.sort_unstable();
        assert!(want.len() > 1_000, "{} pairs", want.len());
        assert_eq!(got, want);
        assert!(most <= 33, "{most} batches kept on a side");
        assert!(q.join_rows_held().unwrap()[0] > 300);
    }

    #[tokio::test]
    async fn a_self_join_on_the_window_lets_each_window_go_when_it_ends() {
        let sql = "SELECT a.id AS a_id, b.id AS b_id \
                   FROM TUMBLE(events, ts, '10s') a JOIN TUMBLE(events, ts, '10s') b \
                   ON a.user_name = b.user_name AND a.window_start = b.window_start \
                   WHERE a.amount % 2 = 0 AND b.amount % 2 = 1";
        let (most, rows) = self_join_against_reference(sql, 13, |a, b| {
            a.user == b.user
                && a.ts.div_euclid(10_000) == b.ts.div_euclid(10_000)
                && a.amount % 2 == 0
                && b.amount % 2 == 1
        })
        .await;
        assert!(most < rows / 6, "held at most {most} of {rows} rows");
    }

    #[tokio::test]
    async fn a_full_self_join_emits_the_unmatched_rows_of_both_sides() {
        let sql = "SELECT a.id AS a_id, b.id AS b_id \
                   FROM (SELECT * FROM events WHERE amount % 2 = 0) a \
                   FULL JOIN (SELECT * FROM events WHERE amount % 2 = 1) b \
                   ON a.user_name = b.user_name AND b.ts BETWEEN a.ts AND a.ts + 1500";
        let ctx = weir_lake::new_session();
        let mut rng = Rng(23);
        let events = events(&mut rng, 2_000);
        let (late, wm) = reference_late(&events);
        let on_time: Vec<&Event> = events.iter().filter(|e| !late.contains(&e.id)).collect();
        let matches =
            |a: &Event, b: &Event| a.user == b.user && b.ts >= a.ts && b.ts <= a.ts + 1_500;
        let (evens, odds): (Vec<&Event>, Vec<&Event>) =
            on_time.iter().partition(|e| e.amount % 2 == 0);
        let mut want = Vec::new();
        for a in &evens {
            let before = want.len();
            want.extend(
                odds.iter()
                    .filter(|b| matches(a, b))
                    .map(|b| (Some(a.id), Some(b.id))),
            );
            // Gone once the watermark passes a.ts + 1.5 s: no later b can be in range.
            if want.len() == before && a.ts + 1_500 < wm {
                want.push((Some(a.id), None));
            }
        }
        for b in &odds {
            // Gone once the watermark passes b.ts: no later a can start before it.
            if !evens.iter().any(|a| matches(a, b)) && b.ts < wm {
                want.push((None, Some(b.id)));
            }
        }
        let mut q = StreamSql::compile(&ctx, &spec(sql, true)).await.unwrap();
        let mut got = Vec::new();
        for (i, chunk) in events.chunks(90).enumerate() {
            nullable_pairs(&q.push(&batch(chunk)).await.unwrap().rows, &mut got);
            nullable_pairs(&q.advance().await.unwrap(), &mut got);
            if i % 4 == 1 {
                let state = q.checkpoint().unwrap();
                q = StreamSql::compile(&ctx, &spec(sql, true)).await.unwrap();
                q.restore(&state).unwrap();
            }
        }
        got.sort_unstable();
        want.sort_unstable();
        let lone_a = want.iter().filter(|w| w.1.is_none()).count();
        let lone_b = want.iter().filter(|w| w.0.is_none()).count();
        assert!(
            lone_a > 50 && lone_b > 50,
            "{lone_a} and {lone_b} lone rows"
        );
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_running_aggregate_over_closed_windows_keeps_its_totals() {
        // Per user: how many 10 s windows had clicks, and the clicks in them, kept up to
        // date as windows close.
        let sql = "SELECT user_name, count(*) AS windows, sum(n) AS clicks FROM ( \
                   SELECT window_start, user_name, count(*) AS n \
                   FROM TUMBLE(events, ts, '10s') GROUP BY window_start, user_name) w \
                   GROUP BY user_name";
        let running = StreamSqlSpec {
            updating: true,
            ..spec(sql, true)
        };
        let ctx = weir_lake::new_session();
        let mut rng = Rng(61);
        let events = events(&mut rng, 3_000);
        let (late, wm) = reference_late(&events);
        let mut windows: BTreeMap<(usize, i64), i64> = BTreeMap::new();
        for e in events.iter().filter(|e| !late.contains(&e.id)) {
            let start = e.ts.div_euclid(10_000) * 10_000;
            if start + 10_000 <= wm {
                *windows.entry((e.user, start)).or_default() += 1;
            }
        }
        let mut want: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for ((u, _), n) in windows {
            let w = want.entry(USERS[u].to_string()).or_default();
            w.0 += 1;
            w.1 += n;
        }
        let mut q = StreamSql::compile(&ctx, &running).await.unwrap();
        let mut table: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for (i, chunk) in events.chunks(110).enumerate() {
            q.push(&batch(chunk)).await.unwrap();
            for b in q.advance().await.unwrap() {
                let u = b.column(0).as_string::<i32>();
                let w = b.column(1).as_primitive::<Int64Type>();
                let n = b.column(2).as_primitive::<Int64Type>();
                for r in 0..b.num_rows() {
                    table.insert(u.value(r).to_string(), (w.value(r), n.value(r)));
                }
            }
            if i % 5 == 3 {
                let state = q.checkpoint().unwrap();
                q = StreamSql::compile(&ctx, &running).await.unwrap();
                q.restore(&state).unwrap();
            }
        }
        assert!(want.values().all(|w| w.0 > 20), "{want:?}");
        assert_eq!(table, want);
    }
}
