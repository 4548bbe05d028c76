//! A join of the stream with itself, run incrementally: each side keeps the rows of its
//! own that passed its filters (the join's state), and each new row is matched against
//! the other side's kept rows, so every pair is produced once, in the batch of its later
//! row. Inner joins only: their output is never taken back.
//!
//! **Time bounds.** A condition such as `b.ts BETWEEN a.ts AND a.expires` bounds the
//! event time of the rows a kept row can still meet: once the watermark passes
//! `a.expires`, no on-time `b` row can join that `a` row, so it leaves the state. Bounds
//! are read from the join's conditions of the form `x.<event time> <= <expression of
//! the other side>` (also `<`, `=`, `BETWEEN`); a join without one keeps every row.
//!
//! **Outer joins.** A LEFT, RIGHT or FULL join needs such a bound on each side whose
//! unmatched rows it keeps: a row that leaves the state without having met a match is
//! emitted then, with nulls for the other side, once, when no later row can match it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array};
use arrow::compute::{
    cast, concat_batches, filter_record_batch, interleave, take, take_record_batch,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use datafusion::common::{Column, DFSchema, NullEquality};
use datafusion::logical_expr::execution_props::ExecutionProps;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, Join, JoinType, LogicalPlan, Operator};
use datafusion::physical_expr::{create_physical_expr, PhysicalExpr};
use weir_common::Error;

use super::{eval_all, event_times, exec_error, plan_error};

/// Kept batches per side, past which they are merged into one.
const MAX_BATCHES: usize = 32;

/// Which columns of a join's inputs carry the source's event time, unchanged.
#[derive(Clone, Copy)]
pub(super) struct EventTime<'a> {
    /// The table the source is read from in the plan.
    pub slot: &'a str,
    /// The source's event-time column.
    pub column: &'a str,
    /// With a tumbling or hopping window over the source: its size (µs).
    pub window: Option<i64>,
}

/// The join's operator and state.
pub(super) struct StreamJoin {
    sides: [Side; 2],
    /// Conditions besides the keys, over the joined rows.
    filter: Option<Arc<dyn PhysicalExpr>>,
    /// Left columns, then right.
    schema: SchemaRef,
    converter: RowConverter,
    key_types: Vec<DataType>,
    nulls_match: bool,
    /// The bounds of both sides, as planned (over the join's columns).
    bound_exprs: Vec<Expr>,
}

struct Side {
    schema: SchemaRef,
    /// An outer join keeps this side's unmatched rows.
    preserved: bool,
    /// Per kept batch, whether each row has met a match (or was emitted unmatched).
    matched: Vec<Vec<bool>>,
    keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Upper bounds on the other side's event time for a match, over this side's rows.
    bounds: Vec<Arc<dyn PhysicalExpr>>,
    batches: Vec<RecordBatch>,
    /// Per kept batch, each row's expiry (µs): the least of its bounds.
    expiries: Vec<Vec<i64>>,
    /// Key → (batch, row) of the kept rows with that key.
    index: HashMap<Box<[u8]>, Vec<(u32, u32)>>,
    rows: usize,
    /// Rows not yet expired, by expiry.
    expiring: BTreeMap<i64, usize>,
    /// Rows expired but still held (dropped once they are half the state).
    expired: usize,
}

impl StreamJoin {
    /// The operator for `join`, whose sides each read the source once.
    pub(super) fn new(
        join: &Join,
        props: &ExecutionProps,
        time: Option<EventTime<'_>>,
    ) -> Result<StreamJoin, Error> {
        let preserved = match join.join_type {
            JoinType::Inner => [false, false],
            JoinType::Left => [true, false],
            JoinType::Right => [false, true],
            JoinType::Full => [true, true],
            other => {
                return Err(Error::user(format!(
                    "a join of the stream with itself is an inner, left, right or full join, \
                     not {other}"
                ))
                .with_hint("IN and EXISTS over the stream are semi and anti joins: use JOIN"))
            }
        };
        if join.on.is_empty() {
            return Err(Error::user(
                "a join of the stream with itself needs an equality between its sides \
                 (ON a.key = b.key): without one every row would be matched with every other",
            ));
        }
        let planning = PhysicalPlanningContext::default();
        let physical = |e: &Expr, schema: &DFSchema| {
            create_physical_expr(e, schema, props, &planning).map_err(plan_error)
        };
        let (ls, rs) = (join.left.schema(), join.right.schema());
        let mut key_types = Vec::new();
        let (mut lk, mut rk) = (Vec::new(), Vec::new());
        for (l, r) in &join.on {
            let (l, r) = (physical(l, ls)?, physical(r, rs)?);
            key_types.push(l.data_type(ls.as_arrow()).map_err(plan_error)?);
            lk.push(l);
            rk.push(r);
        }
        let converter = RowConverter::new(
            key_types
                .iter()
                .map(|t| SortField::new(t.clone()))
                .collect(),
        )
        .map_err(|e| Error::internal(format!("stream join keys: {e}")))?;
        // The bounds each side's rows get from the other side's event time.
        let mut bounds: [Vec<Arc<dyn PhysicalExpr>>; 2] = [Vec::new(), Vec::new()];
        let mut bound_exprs = Vec::new();
        if let Some(t) = &time {
            let mut conds: Vec<Expr> = join
                .on
                .iter()
                .map(|(l, r)| l.clone().eq(r.clone()))
                .collect();
            if let Some(f) = &join.filter {
                conds.extend(split_conjunction(f).into_iter().cloned());
            }
            let inputs = [join.left.as_ref(), join.right.as_ref()];
            for c in &conds {
                for (timed, bound) in upper_bounds(c) {
                    let Expr::Column(col) = timed else { continue };
                    for x in 0..2 {
                        let y = 1 - x;
                        let bound_on_y = !bound.column_refs().is_empty()
                            && bound
                                .column_refs()
                                .iter()
                                .all(|c| inputs[y].schema().has_column(c));
                        if inputs[x].schema().has_column(col)
                            && bound_on_y
                            && carries_source_column(inputs[x], col, t)
                        {
                            let e = physical(bound, inputs[y].schema())?;
                            let dt = e.data_type(inputs[y].schema().as_arrow());
                            // Only a time or epoch-milliseconds bound reads as a time.
                            if matches!(
                                dt,
                                Ok(DataType::Timestamp(_, _) | DataType::Int64 | DataType::Int32)
                            ) {
                                bounds[y].push(e);
                                bound_exprs.push(bound.clone());
                            }
                        }
                    }
                }
            }
            // Sides joined on their window (`a.window_start = b.window_start`): a row can
            // meet only rows of its own window, so it goes once the watermark reaches the
            // window's end.
            if let Some(size) = t.window {
                for (l, r) in &join.on {
                    let (Expr::Column(lc), Expr::Column(rc)) = (l, r) else {
                        continue;
                    };
                    for (name, to_end) in [(super::WINDOW_START, size), (super::WINDOW_END, 0)] {
                        let w = EventTime { column: name, ..*t };
                        if !(carries_source_column(inputs[0], lc, &w)
                            && carries_source_column(inputs[1], rc, &w))
                        {
                            continue;
                        }
                        for (side, col) in [(0, lc), (1, rc)] {
                            // The last µs of the window.
                            let last = Expr::Column(col.clone())
                                + Expr::Literal(
                                    datafusion::common::ScalarValue::new_interval_mdn(
                                        0,
                                        0,
                                        (to_end - 1) * 1_000,
                                    ),
                                    None,
                                );
                            bounds[side].push(physical(&last, inputs[side].schema())?);
                        }
                    }
                }
            }
        }
        let filter = match &join.filter {
            Some(f) => Some(physical(f, &join.schema)?),
            None => None,
        };
        for (s, kept) in preserved.iter().enumerate() {
            if *kept && bounds[s].is_empty() {
                let (this, other) = match s {
                    0 => ("left", "right"),
                    _ => ("right", "left"),
                };
                return Err(Error::user(format!(
                    "a {} join of the stream with itself emits a {this} row without a match \
                     once no later row can match it, which needs a time bound on the {other} \
                     side's event time",
                    join.join_type
                ))
                .with_hint(format!(
                    "add a condition such as `{other}.ts BETWEEN {this}.ts AND {this}.ts + \
                     INTERVAL '1' HOUR` to the ON clause (with the stream's event-time column)"
                )));
            }
        }
        let [lb, rb] = bounds;
        Ok(StreamJoin {
            sides: [
                Side::new(ls.as_arrow().clone().into(), lk, lb, preserved[0]),
                Side::new(rs.as_arrow().clone().into(), rk, rb, preserved[1]),
            ],
            filter,
            schema: Arc::new(join.schema.as_arrow().clone()),
            converter,
            key_types,
            bound_exprs,
            nulls_match: join.null_equality == NullEquality::NullEqualsNull,
        })
    }

    /// The expressions that bound the other side's event time, over the join's columns.
    pub(super) fn bound_exprs(&self) -> &[Expr] {
        &self.bound_exprs
    }

    /// Whether kept rows ever leave (the join's conditions bound them in time).
    pub(super) fn bounded(&self) -> [bool; 2] {
        [0, 1].map(|s| !self.sides[s].bounds.is_empty())
    }

    /// Bytes the state takes: the kept rows and their index.
    pub(super) fn bytes(&self) -> usize {
        self.sides
            .iter()
            .map(|s| {
                let rows: usize = s.batches.iter().map(|b| b.get_array_memory_size()).sum();
                let keys: usize = s
                    .index
                    .iter()
                    .map(|(k, v)| k.len() + v.capacity() * 8 + 48)
                    .sum();
                rows + keys + s.expiries.iter().map(|e| e.capacity() * 8).sum::<usize>()
            })
            .sum()
    }

    /// Batches kept, per side.
    #[cfg(test)]
    pub(super) fn kept_batches(&self) -> [usize; 2] {
        [0, 1].map(|s| self.sides[s].batches.len())
    }

    /// Rows held, per side.
    pub(super) fn held(&self) -> [usize; 2] {
        [0, 1].map(|s| self.sides[s].rows - self.sides[s].expired)
    }

    /// Joins new rows of each side with the other side's kept rows (and each other's),
    /// then keeps them. Returns the joined rows, left columns then right.
    pub(super) fn push(
        &mut self,
        left: &[RecordBatch],
        right: &[RecordBatch],
    ) -> Result<Vec<RecordBatch>, Error> {
        let mut out = Vec::new();
        for (s, new) in [(0, left), (1, right)] {
            for b in new.iter().filter(|b| b.num_rows() > 0) {
                let (b, keys, keyless) = self.keyed(s, b)?;
                // A row with a null key never matches: an outer join emits it at once.
                if let Some(k) = keyless.filter(|_| self.sides[s].preserved) {
                    out.push(self.unmatched(s, &k)?);
                }
                let (joined, matched) = self.probe(s, &b, &keys)?;
                out.extend(joined);
                // Batches out of a plan may hold buffers sized for more rows than they
                // have (or share them with the whole input): the state keeps its own,
                // sized to its rows. (Compactions and checkpoints make tight ones.)
                let b =
                    take_record_batch(&b, &UInt32Array::from_iter_values(0..b.num_rows() as u32))
                        .map_err(|e| Error::internal(format!("stream join: {e}")))?;
                self.keep(s, b, &keys, matched)?;
            }
        }
        Ok(out)
    }

    /// Rows of side `s` with nulls for the other side, in the joined layout.
    fn unmatched(&self, s: usize, rows: &RecordBatch) -> Result<RecordBatch, Error> {
        let other = &self.sides[1 - s].schema;
        let nulls = other
            .fields()
            .iter()
            .map(|f| arrow::array::new_null_array(f.data_type(), rows.num_rows()));
        let columns: Vec<ArrayRef> = match s {
            0 => rows.columns().iter().cloned().chain(nulls).collect(),
            _ => nulls.chain(rows.columns().iter().cloned()).collect(),
        };
        self.joined(columns)
    }

    /// Columns in the join's layout, cast to its types.
    fn joined(&self, columns: Vec<ArrayRef>) -> Result<RecordBatch, Error> {
        let err = |e: arrow::error::ArrowError| Error::internal(format!("stream join: {e}"));
        let columns = columns
            .into_iter()
            .zip(self.schema.fields())
            .map(|(c, f)| match c.data_type() == f.data_type() {
                true => Ok(c),
                false => cast(&c, f.data_type()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        RecordBatch::try_new(self.schema.clone(), columns).map_err(err)
    }

    fn with_side_schema(&self, s: usize, b: &RecordBatch) -> Result<RecordBatch, Error> {
        RecordBatch::try_new(self.sides[s].schema.clone(), b.columns().to_vec())
            .map_err(|e| Error::internal(format!("stream join: {e}")))
    }

    /// The rows of `b` that have a key, their keys, and the rows without one (a null key
    /// matches nothing).
    fn keyed(&self, s: usize, b: &RecordBatch) -> Result<Keyed, Error> {
        let b = self.with_side_schema(s, b)?;
        let keys = self.key_rows(s, &b)?;
        if keys.valid.iter().all(|v| *v) {
            return Ok((b, keys.rows, None));
        }
        let err = |e: arrow::error::ArrowError| Error::internal(format!("stream join: {e}"));
        let mask: arrow::array::BooleanArray = keys.valid.iter().map(|v| Some(*v)).collect();
        let keyless =
            filter_record_batch(&b, &arrow::compute::not(&mask).map_err(err)?).map_err(err)?;
        let b = filter_record_batch(&b, &mask).map_err(err)?;
        let keys = self.key_rows(s, &b)?;
        Ok((b, keys.rows, Some(keyless)))
    }

    /// The rows' keys, and whether each can match (no null in it, unless nulls match).
    fn key_rows(&self, s: usize, b: &RecordBatch) -> Result<KeyRows, Error> {
        let err = |e: arrow::error::ArrowError| Error::internal(format!("stream join keys: {e}"));
        let mut cols = eval_all(&self.sides[s].keys, b)?;
        for (c, t) in cols.iter_mut().zip(&self.key_types) {
            if c.data_type() != t {
                *c = cast(c, t).map_err(err)?;
            }
        }
        let rows = self.converter.convert_columns(&cols).map_err(err)?;
        let valid: Vec<bool> = (0..b.num_rows())
            .map(|i| self.nulls_match || cols.iter().all(|c| c.is_valid(i)))
            .collect();
        Ok(KeyRows { rows, valid })
    }

    /// `b` (rows of side `s`) joined with the other side's kept rows, and which rows of
    /// `b` met a match. The kept rows that met one are marked.
    fn probe(
        &mut self,
        s: usize,
        b: &RecordBatch,
        keys: &arrow::row::Rows,
    ) -> Result<(Option<RecordBatch>, Vec<bool>), Error> {
        let mut matched = vec![false; b.num_rows()];
        let other = &self.sides[1 - s];
        if other.rows == 0 {
            return Ok((None, matched));
        }
        let mut mine = Vec::new();
        let mut theirs = Vec::new();
        for i in 0..b.num_rows() {
            if let Some(hits) = other.index.get(keys.row(i).as_ref()) {
                for &(bi, ri) in hits {
                    mine.push(i as u32);
                    theirs.push((bi as usize, ri as usize));
                }
            }
        }
        if mine.is_empty() {
            return Ok((None, matched));
        }
        let err = |e: arrow::error::ArrowError| Error::internal(format!("stream join: {e}"));
        let picked = UInt32Array::from(mine.clone());
        let mut own: Vec<ArrayRef> = b
            .columns()
            .iter()
            .map(|c| take(c, &picked, None))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let mut others: Vec<ArrayRef> = Vec::with_capacity(other.schema.fields().len());
        for c in 0..other.schema.fields().len() {
            let arrays: Vec<&dyn Array> =
                other.batches.iter().map(|b| b.column(c).as_ref()).collect();
            others.push(interleave(&arrays, &theirs).map_err(err)?);
        }
        let columns = match s {
            0 => {
                own.extend(others);
                own
            }
            _ => {
                others.extend(own);
                others
            }
        };
        let joined = self.joined(columns)?;
        let (joined, pass) = match &self.filter {
            None => (joined, None),
            Some(f) => {
                let mask = f
                    .evaluate(&joined)
                    .and_then(|v| v.into_array(joined.num_rows()))
                    .map_err(exec_error)?;
                let mask = mask.as_boolean().clone();
                (
                    filter_record_batch(&joined, &mask).map_err(err)?,
                    Some(mask),
                )
            }
        };
        let other = &mut self.sides[1 - s];
        for (k, (i, (bi, ri))) in mine.iter().zip(&theirs).enumerate() {
            if pass.as_ref().is_none_or(|m| m.is_valid(k) && m.value(k)) {
                matched[*i as usize] = true;
                if other.preserved {
                    other.matched[*bi][*ri] = true;
                }
            }
        }
        Ok(((joined.num_rows() > 0).then_some(joined), matched))
    }

    /// Keeps the rows of `b` (all with a key), and whether each has met a match.
    fn keep(
        &mut self,
        s: usize,
        b: RecordBatch,
        keys: &arrow::row::Rows,
        matched: Vec<bool>,
    ) -> Result<(), Error> {
        if b.num_rows() == 0 {
            return Ok(());
        }
        let side = &mut self.sides[s];
        let expiry = side.expiries_of(&b)?;
        let bi = side.batches.len() as u32;
        for (i, e) in expiry.iter().enumerate() {
            side.index
                .entry(keys.row(i).as_ref().into())
                .or_default()
                .push((bi, i as u32));
            *side.expiring.entry(*e).or_default() += 1;
        }
        side.rows += b.num_rows();
        side.batches.push(b);
        side.expiries.push(expiry);
        if side.preserved {
            side.matched.push(matched);
        }
        // A probe gathers from every kept batch: they are merged into one now and then,
        // so a long-running join does not probe thousands of small ones.
        if side.batches.len() > MAX_BATCHES {
            self.compact(s, i64::MIN)?;
        }
        Ok(())
    }

    /// Marks rows whose expiry is before `watermark` (µs) as gone; drops them once they
    /// are half of a side's rows. Returns an outer join's rows that went without a match,
    /// with nulls for the other side.
    pub(super) fn prune(&mut self, watermark: i64) -> Result<Vec<RecordBatch>, Error> {
        let mut out = Vec::new();
        for s in 0..2 {
            if self.sides[s].preserved {
                out.extend(self.take_unmatched(s, watermark)?);
            }
            let side = &mut self.sides[s];
            let keep = side.expiring.split_off(&watermark);
            side.expired += std::mem::replace(&mut side.expiring, keep)
                .values()
                .sum::<usize>();
            if side.expired > 0 && side.expired * 2 >= side.rows {
                self.compact(s, watermark)?;
            }
        }
        Ok(out)
    }

    /// Side `s`'s rows that expire before `watermark` without a match, in the joined
    /// layout; they are marked, so each is emitted once.
    fn take_unmatched(&mut self, s: usize, watermark: i64) -> Result<Option<RecordBatch>, Error> {
        let side = &mut self.sides[s];
        let mut picked = Vec::new();
        for (bi, (expiry, matched)) in side.expiries.iter().zip(&mut side.matched).enumerate() {
            for (ri, (e, m)) in expiry.iter().zip(matched.iter_mut()).enumerate() {
                if *e < watermark && !*m {
                    *m = true;
                    picked.push((bi, ri));
                }
            }
        }
        if picked.is_empty() {
            return Ok(None);
        }
        let err = |e: arrow::error::ArrowError| Error::internal(format!("stream join: {e}"));
        let columns = (0..side.schema.fields().len())
            .map(|c| {
                let arrays: Vec<&dyn Array> =
                    side.batches.iter().map(|b| b.column(c).as_ref()).collect();
                interleave(&arrays, &picked)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let rows = RecordBatch::try_new(side.schema.clone(), columns).map_err(err)?;
        self.unmatched(s, &rows).map(Some)
    }

    /// Rebuilds side `s` from its rows that expire at or after `watermark`.
    fn compact(&mut self, s: usize, watermark: i64) -> Result<(), Error> {
        let err = |e: arrow::error::ArrowError| Error::internal(format!("stream join: {e}"));
        let side = &mut self.sides[s];
        let mut live = Vec::new();
        let mut flags = Vec::new();
        for (i, (b, e)) in side.batches.iter().zip(&side.expiries).enumerate() {
            let mask: arrow::array::BooleanArray =
                e.iter().map(|e| Some(*e >= watermark)).collect();
            live.push(filter_record_batch(b, &mask).map_err(err)?);
            if let Some(m) = side.matched.get(i) {
                flags.extend(
                    m.iter()
                        .zip(e)
                        .filter(|(_, e)| **e >= watermark)
                        .map(|(m, _)| *m),
                );
            }
        }
        let all = concat_batches(&side.schema, &live).map_err(err)?;
        side.clear();
        self.insert(s, all, flags)
    }

    /// Adds kept rows (from a checkpoint, or a compaction) without joining them, with
    /// whether each has met a match (an outer join's preserved side).
    fn insert(&mut self, s: usize, b: RecordBatch, matched: Vec<bool>) -> Result<(), Error> {
        if b.num_rows() == 0 {
            return Ok(());
        }
        let (b, keys, _) = self.keyed(s, &b)?;
        let mut matched = matched;
        matched.resize(b.num_rows(), false);
        self.keep(s, b, &keys, matched)
    }

    /// Per side, the rows held (expired ones left out), for a checkpoint.
    pub(super) fn state(&mut self) -> Result<[RecordBatch; 2], Error> {
        let err = |e: arrow::error::ArrowError| Error::internal(format!("stream checkpoint: {e}"));
        let mut out = Vec::new();
        for s in 0..2 {
            let least = self.sides[s].expiring.keys().next().copied();
            if self.sides[s].expired > 0 {
                self.compact(s, least.unwrap_or(i64::MAX))?;
            }
            let side = &self.sides[s];
            let all = match side.batches.as_slice() {
                [one] => one.clone(),
                many => concat_batches(&side.schema, many).map_err(err)?,
            };
            let mut fields: Vec<Field> = side
                .schema
                .fields()
                .iter()
                .enumerate()
                .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), true))
                .collect();
            // Last, whether each row has met a match (always false on an inner join).
            fields.push(Field::new("matched", DataType::Boolean, false));
            let mut columns = all.columns().to_vec();
            let matched: arrow::array::BooleanArray = match side.preserved {
                true => side.matched.iter().flatten().map(|m| Some(*m)).collect(),
                false => vec![Some(false); all.num_rows()].into_iter().collect(),
            };
            columns.push(Arc::new(matched));
            out.push(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(err)?);
        }
        let [l, r]: [RecordBatch; 2] = out
            .try_into()
            .map_err(|_| Error::internal("stream join state"))?;
        Ok([l, r])
    }

    /// Takes up side `s`'s rows from a checkpoint.
    pub(super) fn restore(&mut self, s: usize, batches: &[RecordBatch]) -> Result<(), Error> {
        self.sides[s].clear();
        for b in batches {
            let n = b.num_columns();
            let bad = || Error::internal("stream checkpoint: a join side without its flags");
            let flags = b
                .column(n.checked_sub(1).ok_or_else(bad)?)
                .as_boolean_opt()
                .ok_or_else(bad)?;
            let matched = flags.iter().map(|m| m.unwrap_or(false)).collect();
            self.insert(
                s,
                b.project(&(0..n - 1).collect::<Vec<_>>())
                    .map_err(|e| Error::internal(format!("stream checkpoint: {e}")))?,
                matched,
            )?;
        }
        Ok(())
    }
}

struct KeyRows {
    rows: arrow::row::Rows,
    valid: Vec<bool>,
}

/// Rows with a key, their keys, and the rows without one.
type Keyed = (RecordBatch, arrow::row::Rows, Option<RecordBatch>);

impl Side {
    fn new(
        schema: SchemaRef,
        keys: Vec<Arc<dyn PhysicalExpr>>,
        bounds: Vec<Arc<dyn PhysicalExpr>>,
        preserved: bool,
    ) -> Side {
        Side {
            schema,
            preserved,
            matched: Vec::new(),
            keys,
            bounds,
            batches: Vec::new(),
            expiries: Vec::new(),
            index: HashMap::new(),
            rows: 0,
            expiring: BTreeMap::new(),
            expired: 0,
        }
    }

    fn clear(&mut self) {
        self.batches.clear();
        self.matched.clear();
        self.expiries.clear();
        self.index.clear();
        self.rows = 0;
        self.expiring.clear();
        self.expired = 0;
    }

    /// Each row's expiry (µs): the least of its bounds; never without bounds, and at once
    /// for a null bound (the condition is not true: the row matches nothing).
    fn expiries_of(&self, b: &RecordBatch) -> Result<Vec<i64>, Error> {
        let mut out = vec![i64::MAX; b.num_rows()];
        for e in &self.bounds {
            let v = e
                .evaluate(b)
                .and_then(|v| v.into_array(b.num_rows()))
                .map_err(exec_error)?;
            // In µs, as the watermark: once it is past the bound, no on-time row of the
            // other side can be at or before it.
            for (o, t) in out.iter_mut().zip(event_times(v.data_type(), Some(&v))?) {
                *o = (*o).min(t.unwrap_or(i64::MIN));
            }
        }
        Ok(out)
    }
}

/// The upper bounds a condition puts on an expression: `(x, bound)` for `x <= bound`.
fn upper_bounds(e: &Expr) -> Vec<(&Expr, &Expr)> {
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::LtEq | Operator::Lt => vec![(left, right)],
            Operator::GtEq | Operator::Gt => vec![(right, left)],
            Operator::Eq => vec![(left, right), (right, left)],
            _ => vec![],
        },
        Expr::Between(Between {
            expr,
            negated: false,
            low,
            high,
        }) => vec![(expr, high), (low, expr)],
        _ => vec![],
    }
    .into_iter()
    .map(|(a, b)| (a.as_ref(), b.as_ref()))
    .collect()
}

/// Whether `col` of `plan`'s output is the source's event-time column, passed through
/// unchanged (projections, filters and aliases only).
fn carries_source_column(plan: &LogicalPlan, col: &Column, t: &EventTime<'_>) -> bool {
    match plan {
        LogicalPlan::TableScan(s) => s.table_name.table() == t.slot && col.name == t.column,
        LogicalPlan::Projection(p) => {
            let Some(i) = p.schema.maybe_index_of_column(col) else {
                return false;
            };
            match p.expr[i].clone().unalias() {
                Expr::Column(c) => carries_source_column(&p.input, &c, t),
                _ => false,
            }
        }
        LogicalPlan::Filter(f) => carries_source_column(&f.input, col, t),
        LogicalPlan::SubqueryAlias(a) => {
            let Some(i) = a.schema.maybe_index_of_column(col) else {
                return false;
            };
            let (q, f) = a.input.schema().qualified_field(i);
            carries_source_column(&a.input, &Column::new(q.cloned(), f.name()), t)
        }
        _ => false,
    }
}
