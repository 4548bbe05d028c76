//! Two logical plan rewrites for queries with `IN`, `EXISTS` and correlated subqueries,
//! which DataFusion turns into semi and anti joins and leaves where the query put them.
//!
//! - [`push_semi`]: a semi or anti join whose keys and condition read one input of
//!   the inner joins below it moves down to that input, so the rows it removes are gone
//!   before the joins. `o_orderkey IN (57 large orders)` over customer ⋈ orders ⋈
//!   lineitem filters orders first instead of the 6M-row join (TPC-H q18).
//! - [`reduce_aggregate`]: a join with a grouped subquery on its group key (a
//!   decorrelated `x < (SELECT avg(..) .. WHERE k = outer.k)`) needs only the groups whose
//!   key the other side can have. When that side takes the key from a filtered scan, the
//!   aggregate's input is semi-joined with that scan's keys first: the average per part of
//!   the 200 parts a query keeps, not of all 200,000 (TPC-H q17, q2, q20).
//!
//! Both keep the query's answer: an inner join only drops rows, and a semi or anti join
//! decides each row by the row's own key columns, wherever it runs. The reduction only
//! adds a filter that keeps every group the join can match.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, NullEquality, Result};
use datafusion::logical_expr::{
    Expr, Join, JoinType, LogicalPlan, LogicalPlanBuilder, Projection, SubqueryAlias,
};
use datafusion::optimizer::optimizer::ApplyOrder;
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};

/// The two rewrites of the module docs as one optimizer rule: at each join, first the
/// aggregate reduction, then the semi join's move down.
#[derive(Debug, Default)]
pub struct SubqueryJoins;

impl OptimizerRule for SubqueryJoins {
    fn name(&self) -> &str {
        "weir_subquery_joins"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::TopDown)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Join(join) = &plan else {
            return Ok(Transformed::no(plan));
        };
        let reduced = reduce_aggregate(join)?;
        if let Some(pushed) = push_semi(reduced.as_ref().unwrap_or(join))? {
            return Ok(Transformed::yes(pushed));
        }
        Ok(match reduced {
            Some(j) => Transformed::yes(LogicalPlan::Join(j)),
            None => Transformed::no(plan),
        })
    }
}

/// `join` (a semi or anti join) moved as far down its left input as it goes, when that is
/// below at least one inner join.
fn push_semi(join: &Join) -> Result<Option<LogicalPlan>> {
    if !matches!(join.join_type, JoinType::LeftSemi | JoinType::LeftAnti) {
        return Ok(None);
    }
    let reads = left_columns(join);
    match join.left.as_ref() {
        LogicalPlan::Projection(p) => {
            // Through a projection when it passes every column read unchanged.
            let Some(map) = passed_through(p, &reads) else {
                return Ok(None);
            };
            let moved = with_left(join, p.input.clone(), &map)?;
            let Some(below) = push_semi(&moved)? else {
                return Ok(None);
            };
            Ok(Some(LogicalPlan::Projection(Projection::try_new(
                p.expr.clone(),
                Arc::new(below),
            )?)))
        }
        LogicalPlan::Join(inner) if inner.join_type == JoinType::Inner => {
            // Below the inner join only when its other input has no filter: then the
            // join keeps or multiplies the rows, and the semi join does better first. A
            // filtered other input (a dimension cut to one nation) may leave fewer rows
            // to test after the join than before it (TPC-H q21).
            // The key sets of [`reduce_aggregate`] (a filtered scan's keys, which the
            // query's own join drops the rest of anyway) go all the way down.
            let keys = matches!(join.right.as_ref(),
                LogicalPlan::SubqueryAlias(a) if a.alias.table().starts_with(KEYS));
            let from = |side: &LogicalPlan, other: &LogicalPlan| {
                reads.iter().all(|c| side.schema().has_column(c)) && (keys || !filtered(other))
            };
            let none = std::collections::HashMap::new();
            let (left, right) = if from(&inner.left, &inner.right) {
                let moved = with_left(join, inner.left.clone(), &none)?;
                let moved = push_semi(&moved)?.unwrap_or(LogicalPlan::Join(moved));
                (Arc::new(moved), inner.right.clone())
            } else if from(&inner.right, &inner.left) {
                let moved = with_left(join, inner.right.clone(), &none)?;
                let moved = push_semi(&moved)?.unwrap_or(LogicalPlan::Join(moved));
                (inner.left.clone(), Arc::new(moved))
            } else {
                return Ok(None);
            };
            Ok(Some(LogicalPlan::Join(over(inner, left, right)?)))
        }
        _ => Ok(None),
    }
}

/// `join` over new inputs.
fn over(join: &Join, left: Arc<LogicalPlan>, right: Arc<LogicalPlan>) -> Result<Join> {
    Join::try_new(
        left,
        right,
        join.on.clone(),
        join.filter.clone(),
        join.join_type,
        join.join_constraint,
        join.null_equality,
        join.null_aware,
    )
}

/// Whether `plan` filters rows anywhere: a filter, a scan with filters, a semi or anti
/// join, or a limit.
fn filtered(plan: &LogicalPlan) -> bool {
    let mut found = false;
    let _ = plan.apply(|p| {
        found = match p {
            LogicalPlan::Filter(_) | LogicalPlan::Limit(_) => true,
            LogicalPlan::TableScan(s) => !s.filters.is_empty() || s.fetch.is_some(),
            LogicalPlan::Join(j) => {
                !matches!(
                    j.join_type,
                    JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full
                ) || j.filter.is_some()
            }
            _ => false,
        };
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

/// The columns of the join's left input that its keys and condition read.
fn left_columns(join: &Join) -> Vec<Column> {
    let mut out: Vec<Column> = Vec::new();
    let exprs = join.on.iter().map(|(l, _)| l).chain(join.filter.as_ref());
    for e in exprs {
        for c in e.column_refs() {
            if join.left.schema().has_column(c) && !out.contains(c) {
                out.push(c.clone());
            }
        }
    }
    out
}

/// For each of `columns` (outputs of `p`), the input column `p` passes unchanged, or
/// `None` when one is computed.
fn passed_through(
    p: &Projection,
    columns: &[Column],
) -> Option<std::collections::HashMap<Column, Column>> {
    columns
        .iter()
        .map(|c| {
            let i = p.schema.index_of_column(c).ok()?;
            match &p.expr[i] {
                Expr::Column(inner) => Some((c.clone(), inner.clone())),
                Expr::Alias(a) => match a.expr.as_ref() {
                    Expr::Column(inner) => Some((c.clone(), inner.clone())),
                    _ => None,
                },
                _ => None,
            }
        })
        .collect()
}

/// `join` over `left` instead of its left input, its left-side columns renamed by `map`.
fn with_left(
    join: &Join,
    left: Arc<LogicalPlan>,
    map: &std::collections::HashMap<Column, Column>,
) -> Result<Join> {
    let rename = |e: &Expr| -> Result<Expr> {
        e.clone()
            .transform(|e| match &e {
                Expr::Column(c) => match map.get(c) {
                    Some(to) => Ok(Transformed::yes(Expr::Column(to.clone()))),
                    None => Ok(Transformed::no(e)),
                },
                _ => Ok(Transformed::no(e)),
            })
            .map(|t| t.data)
    };
    let on = join
        .on
        .iter()
        .map(|(l, r)| Ok((rename(l)?, r.clone())))
        .collect::<Result<Vec<_>>>()?;
    let filter = join.filter.as_ref().map(rename).transpose()?;
    Join::try_new(
        left,
        join.right.clone(),
        on,
        filter,
        join.join_type,
        join.join_constraint,
        join.null_equality,
        join.null_aware,
    )
}

/// Names the key sets [`reduce_aggregate`] adds, so a plan is never reduced twice.
const KEYS: &str = "__weir_keys_";

static NEXT_KEYS: AtomicUsize = AtomicUsize::new(0);

/// `join` with its grouped right side fed only the keys its left side can have (see the
/// module docs), or `None`.
fn reduce_aggregate(join: &Join) -> Result<Option<Join>> {
    // The grouped side is the right one: it must lose nothing the left can match (inner
    // and semi joins), and rows it loses must not change the left's rows. The added semi
    // join never matches null keys: neither may this join.
    if !matches!(join.join_type, JoinType::Inner | JoinType::LeftSemi)
        || join.null_equality != NullEquality::NullEqualsNothing
    {
        return Ok(None);
    }
    for (l, r) in &join.on {
        let (Expr::Column(l), Expr::Column(r)) = (l, r) else {
            continue;
        };
        let Some(reduced) = reduce_right(&join.right, r, || keys_of(&join.left, l))? else {
            continue;
        };
        return Ok(Some(over(join, join.left.clone(), Arc::new(reduced))?));
    }
    Ok(None)
}

/// `plan` with the aggregate that produces its column `column` as a group key fed only
/// the rows whose key is in `keys()`; `None` when `column` does not come from a group
/// key through aliases, projections and filters, or there are no selective keys.
fn reduce_right(
    plan: &LogicalPlan,
    column: &Column,
    keys: impl FnOnce() -> Option<(LogicalPlan, Column)>,
) -> Result<Option<LogicalPlan>> {
    let child = |i: usize, input: &Arc<LogicalPlan>| -> Option<Column> {
        let (q, f) = input.schema().qualified_field(i);
        Some(Column::new(q.cloned(), f.name()))
    };
    let (input, below) = match plan {
        LogicalPlan::SubqueryAlias(a) => {
            let i = a.schema.index_of_column(column).ok();
            match i.and_then(|i| child(i, &a.input)) {
                Some(c) => (&a.input, c),
                None => return Ok(None),
            }
        }
        LogicalPlan::Projection(p) => match passed_through(p, std::slice::from_ref(column)) {
            Some(map) => (&p.input, map[column].clone()),
            None => return Ok(None),
        },
        LogicalPlan::Filter(f) => (&f.input, column.clone()),
        LogicalPlan::Aggregate(agg) => {
            let i = match agg.schema.index_of_column(column) {
                Ok(i) if i < agg.group_expr.len() => i,
                _ => return Ok(None),
            };
            let Expr::Column(grouped) = &agg.group_expr[i] else {
                return Ok(None);
            };
            if already_reduced(&agg.input) {
                return Ok(None);
            }
            let Some((set, key)) = keys() else {
                return Ok(None);
            };
            let alias = format!("{KEYS}{}", NEXT_KEYS.fetch_add(1, Ordering::Relaxed));
            let set = LogicalPlanBuilder::from(set)
                .project(vec![Expr::Column(key.clone())])?
                .build()?;
            let set =
                LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(Arc::new(set), alias.as_str())?);
            let key = Column::new(Some(alias.as_str()), key.name());
            let input = LogicalPlanBuilder::from(agg.input.as_ref().clone())
                .join_on(
                    set,
                    JoinType::LeftSemi,
                    vec![Expr::Column(grouped.clone()).eq(Expr::Column(key))],
                )?
                .build()?;
            let exprs = plan.expressions();
            return Ok(Some(plan.with_new_exprs(exprs, vec![input])?));
        }
        _ => return Ok(None),
    };
    let Some(new_input) = reduce_right(input, &below, keys)? else {
        return Ok(None);
    };
    Ok(Some(
        plan.with_new_exprs(plan.expressions(), vec![new_input])?,
    ))
}

fn already_reduced(plan: &LogicalPlan) -> bool {
    let mut found = false;
    let _ = plan.apply(|p| {
        if let LogicalPlan::SubqueryAlias(a) = p {
            if a.alias.table().starts_with(KEYS) {
                found = true;
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// A small plan that yields every value column `column` of `plan` can have, and the
/// column in it: a filtered scan (no joins or aggregates, cheap to run twice) that the
/// column comes from through projections, inner joins (on either side of an equality)
/// and semi joins (whose other side bounds a key).
fn keys_of(plan: &LogicalPlan, column: &Column) -> Option<(LogicalPlan, Column)> {
    match plan {
        LogicalPlan::Projection(p) => {
            let map = passed_through(p, std::slice::from_ref(column))?;
            keys_of(&p.input, &map[column])
        }
        LogicalPlan::SubqueryAlias(a) => {
            let i = a.schema.index_of_column(column).ok()?;
            let (q, f) = a.input.schema().qualified_field(i);
            keys_of(&a.input, &Column::new(q.cloned(), f.name()))
        }
        LogicalPlan::Join(j) if matches!(j.join_type, JoinType::Inner | JoinType::LeftSemi) => {
            // The side the column comes from, else the other side of an equality.
            let side = if j.left.schema().has_column(column) {
                &j.left
            } else {
                &j.right
            };
            if let Some(found) = keys_of(side, column) {
                return Some(found);
            }
            j.on.iter().find_map(|(l, r)| match (l, r) {
                (Expr::Column(l), Expr::Column(r)) if l == column => keys_of(&j.right, r),
                (Expr::Column(l), Expr::Column(r)) if r == column => keys_of(&j.left, l),
                _ => None,
            })
        }
        p if selective_scan(p) && p.schema().has_column(column) => {
            Some((p.clone(), column.clone()))
        }
        _ => None,
    }
}

/// Whether `plan` is filters and projections over one scan, with at least one filter.
fn selective_scan(plan: &LogicalPlan) -> bool {
    let mut filtered = false;
    let mut simple = true;
    let _ = plan.apply(|p| {
        match p {
            LogicalPlan::Filter(_) => filtered = true,
            LogicalPlan::TableScan(s) => filtered |= !s.filters.is_empty(),
            LogicalPlan::Projection(_) | LogicalPlan::SubqueryAlias(_) => {}
            _ => {
                simple = false;
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    filtered && simple
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    /// Orders, their lines and parts, with null keys and keys without a match, made from
    /// a fixed pseudo-random sequence.
    fn tables() -> Vec<String> {
        let mut x: u64 = 7;
        let mut next = |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        let key = |v: u64| {
            if v == 0 {
                "NULL".to_string()
            } else {
                v.to_string()
            }
        };
        let mut orders = Vec::new();
        for o in 1..=60 {
            orders.push(format!("({o}, {}, {})", key(next(12)), next(1000)));
        }
        let mut lines = Vec::new();
        for _ in 0..400 {
            lines.push(format!(
                "({}, {}, {}, {})",
                key(next(70)),
                key(next(30)),
                next(50),
                next(100)
            ));
        }
        let mut parts = Vec::new();
        for p in 1..=25 {
            parts.push(format!("({p}, 'b{}', {})", next(4), next(40)));
        }
        vec![
            format!(
                "CREATE TABLE s.orders AS SELECT * FROM (VALUES {}) AS t(o_key, o_cust, o_price)",
                orders.join(", ")
            ),
            format!(
                "CREATE TABLE s.lines AS SELECT * FROM (VALUES {}) AS t(l_order, l_part, l_qty, l_price)",
                lines.join(", ")
            ),
            format!(
                "CREATE TABLE s.parts AS SELECT * FROM (VALUES {}) AS t(p_key, p_brand, p_size)",
                parts.join(", ")
            ),
            "CREATE TABLE s.custs AS SELECT * FROM (VALUES (1, 'a'), (2, 'b'), (3, 'c'), \
             (5, 'e'), (8, 'h'), (9, 'i'), (11, 'k')) AS t(c_key, c_name)"
                .to_string(),
        ]
    }

    async fn session(rules: bool) -> SessionContext {
        let ctx = weir_lake::new_session();
        if rules {
            ctx.add_optimizer_rule(Arc::new(SubqueryJoins));
        }
        crate::session::ensure_schema(&ctx, "s").unwrap();
        for sql in tables() {
            ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        }
        ctx
    }

    async fn sorted(ctx: &SessionContext, sql: &str) -> Vec<String> {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        let mut rows: Vec<String> = text.lines().skip(3).map(str::to_string).collect();
        rows.sort();
        rows
    }

    async fn logical(ctx: &SessionContext, sql: &str) -> String {
        let df = ctx.sql(sql).await.unwrap();
        df.into_optimized_plan()
            .unwrap()
            .display_indent()
            .to_string()
    }

    const QUERIES: &[&str] = &[
        // IN over a join of three tables (q18's shape).
        "SELECT c_name, o_key, sum(l_qty) FROM s.custs, s.orders, s.lines \
         WHERE o_key IN (SELECT l_order FROM s.lines GROUP BY l_order HAVING sum(l_qty) > 60) \
         AND c_key = o_cust AND o_key = l_order GROUP BY c_name, o_key",
        // NOT IN (null-aware), EXISTS and NOT EXISTS with a condition.
        "SELECT c_name, o_key FROM s.custs JOIN s.orders ON c_key = o_cust \
         WHERE o_key NOT IN (SELECT l_order FROM s.lines WHERE l_qty > 45)",
        "SELECT c_name, o_key FROM s.custs JOIN s.orders ON c_key = o_cust \
         WHERE o_key NOT IN (SELECT l_order FROM s.lines WHERE l_qty > 45 AND l_order IS NOT NULL)",
        "SELECT o_key, c_name FROM s.orders JOIN s.custs ON c_key = o_cust WHERE EXISTS \
         (SELECT 1 FROM s.lines WHERE l_order = o_key AND l_price > o_price / 10)",
        "SELECT o_key, c_name FROM s.orders JOIN s.custs ON c_key = o_cust WHERE NOT EXISTS \
         (SELECT 1 FROM s.lines WHERE l_order = o_key AND l_qty > 40)",
        // A correlated average per part of the parts a filter keeps (q17's shape).
        "SELECT sum(l_price), count(*) FROM s.lines, s.parts WHERE p_key = l_part \
         AND p_brand = 'b1' AND l_qty < (SELECT 0.5 * avg(l_qty) FROM s.lines WHERE l_part = p_key)",
        // The same through an inner join on the other side, and a minimum (q2's shape).
        "SELECT p_key, o_key FROM s.parts JOIN s.lines ON l_part = p_key JOIN s.orders ON o_key = l_order \
         WHERE p_size < 20 AND l_price = (SELECT min(l2.l_price) FROM s.lines l2 JOIN s.orders o2 \
         ON o2.o_key = l2.l_order WHERE l2.l_part = p_key)",
        // Two keys, the first bounded by a semi join (q20's shape).
        "SELECT o_key FROM s.orders WHERE o_cust IN (SELECT c_key FROM s.custs WHERE c_name < 'f') \
         AND o_price > (SELECT sum(l_qty) FROM s.lines WHERE l_order = o_key AND l_part = o_cust)",
    ];

    #[tokio::test]
    async fn rewritten_plans_give_the_same_answers() {
        let plain = session(false).await;
        let ours = session(true).await;
        for q in QUERIES {
            let want = sorted(&plain, q).await;
            let got = sorted(&ours, q).await;
            assert!(want.len() > 1, "{q}: {want:?}");
            assert_eq!(got, want, "{q}\n{}", logical(&ours, q).await);
            // Each query is one the rules rewrite.
            assert_ne!(logical(&ours, q).await, logical(&plain, q).await, "{q}");
        }
    }

    #[tokio::test]
    async fn the_semi_join_filters_one_table_before_the_joins() {
        let ours = session(true).await;
        let plan = logical(&ours, QUERIES[0]).await;
        // The IN filters orders, under both inner joins.
        let semi = plan
            .lines()
            .position(|l| l.contains("LeftSemi Join: s.orders.o_key"))
            .expect(&plan);
        let joins: Vec<usize> = plan
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains("Inner Join"))
            .map(|(i, _)| i)
            .collect();
        assert!(joins.iter().all(|j| *j < semi), "{plan}");
        // Over a join with a filtered side (one customer), the join may leave fewer rows
        // to test than the table has: the semi join stays above it.
        let q = "SELECT o_key FROM s.orders JOIN s.custs ON c_key = o_cust WHERE c_name = 'b' \
                 AND EXISTS (SELECT 1 FROM s.lines WHERE l_order = o_key AND l_qty > 40)";
        let plan = logical(&ours, q).await;
        let semi = plan
            .lines()
            .position(|l| l.contains("LeftSemi Join"))
            .expect(&plan);
        let inner = plan
            .lines()
            .position(|l| l.contains("Inner Join"))
            .expect(&plan);
        assert!(semi < inner, "{plan}");
        assert_eq!(
            sorted(&ours, q).await,
            sorted(&session(false).await, q).await
        );
    }

    #[tokio::test]
    async fn a_correlated_aggregate_reads_only_the_kept_parts() {
        let ours = session(true).await;
        let plan = logical(&ours, QUERIES[5]).await;
        assert!(plan.contains("__weir_keys_"), "{plan}");
        // The average runs over lines semi-joined with the filtered parts.
        let agg = plan.lines().position(|l| l.contains("avg(")).expect(&plan);
        let keys = plan
            .lines()
            .position(|l| l.contains("__weir_keys_"))
            .unwrap();
        assert!(keys > agg, "{plan}");
        // Without a filtered scan to take keys from, nothing is added.
        let unfiltered = "SELECT sum(l_price) FROM s.lines, s.parts WHERE p_key = l_part \
             AND l_qty < (SELECT avg(l_qty) FROM s.lines WHERE l_part = p_key)";
        assert!(!logical(&ours, unfiltered).await.contains("__weir_keys_"));
    }
}
