//! A hash join whose rows are then grouped by the join's own key is hash-partitioned on
//! that key instead of building one shared table.
//!
//! With a large build side ([`MIN_BUILD_ROWS`] rows or more), DataFusion still builds
//! one table for every partition when it fits weir's single-partition limits
//! (`weir_lake::new_session`). When the next step groups by the join key, as in "orders
//! per customer", that choice costs twice: each partition's partial aggregate sees every
//! key and reduces nothing, then its rows are hash-repartitioned by the key anyway.
//! Partitioning the join by the key instead hands the aggregate rows already partitioned
//! by its group, so it runs once per partition with no exchange (TPC-H q13: customer
//! left join orders, grouped by customer).
//!
//! The rule runs right after DataFusion's join selection, before the distribution of
//! rows is planned, and only changes the join's mode.

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::Result;
use datafusion::execution::SessionStateBuilder;
use datafusion::logical_expr::JoinType;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::replace_children_if_necessary;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;

/// `ctx` with [`GroupedJoinMode`] right after DataFusion's join selection, whose choice
/// it revises, and before rows are distributed.
pub fn install(ctx: SessionContext) -> SessionContext {
    let state = ctx.state();
    let mut rules = state.physical_optimizers().to_vec();
    let at = rules
        .iter()
        .position(|r| r.name() == "join_selection")
        .map_or(0, |i| i + 1);
    rules.insert(at, Arc::new(GroupedJoinMode));
    SessionContext::new_with_state(
        SessionStateBuilder::new_from_existing(state)
            .with_physical_optimizer_rules(rules)
            .build(),
    )
}

/// Below this many build rows the shared table is cheap and the groups few.
pub const MIN_BUILD_ROWS: usize = 100_000;

#[derive(Debug, Default)]
pub struct GroupedJoinMode;

impl PhysicalOptimizerRule for GroupedJoinMode {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_down(|node| {
            let Some(agg) = node.downcast_ref::<AggregateExec>() else {
                return Ok(Transformed::no(node));
            };
            // The join, under at most a projection of its columns (which later becomes
            // the join's own projection).
            let projection = agg.input().downcast_ref::<ProjectionExec>();
            let input = projection.map_or(agg.input(), |p| p.input());
            let Some(join) = input.downcast_ref::<HashJoinExec>() else {
                return Ok(Transformed::no(node));
            };
            if *agg.mode() != AggregateMode::Partial
                || !groups_by_join_key(agg, projection, join)
                || !large_build_side(join)
            {
                return Ok(Transformed::no(node));
            }
            let partitioned: Arc<dyn ExecutionPlan> = Arc::new(
                join.builder()
                    .with_partition_mode(PartitionMode::Partitioned)
                    .build()?,
            );
            let input = match projection {
                Some(_) => {
                    replace_children_if_necessary(Arc::clone(agg.input()), vec![partitioned])?
                }
                None => partitioned,
            };
            let node = replace_children_if_necessary(Arc::clone(&node), vec![input])?;
            Ok(Transformed::yes(node))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "weir_grouped_join_mode"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Whether `agg` groups by exactly the key of `join`, a collect-left inner or left join on
/// columns: one group column per key, each the key's left column (or, for an inner join,
/// either side's, as both hold the same value).
fn groups_by_join_key(
    agg: &AggregateExec,
    projection: Option<&ProjectionExec>,
    join: &HashJoinExec,
) -> bool {
    if *join.partition_mode() != PartitionMode::CollectLeft
        || !matches!(join.join_type(), JoinType::Inner | JoinType::Left)
        || join.filter().is_some()
        || agg.group_expr().has_grouping_set()
        || agg.group_expr().expr().len() != join.on().len()
    {
        return false;
    }
    let left_width = join.left().schema().fields().len();
    let column = |e: &Arc<dyn datafusion::physical_expr::PhysicalExpr>| {
        e.downcast_ref::<Column>().map(Column::index)
    };
    // Each group column as an index into the join's rows before its projection.
    let groups: Option<Vec<usize>> = agg
        .group_expr()
        .expr()
        .iter()
        .map(|(e, _)| {
            let i = column(e)?;
            let i = match projection {
                Some(p) => column(&p.expr().get(i)?.expr)?,
                None => i,
            };
            match &join.projection {
                Some(p) => p.get(i).copied(),
                None => Some(i),
            }
        })
        .collect();
    let Some(groups) = groups else {
        return false;
    };
    join.on().iter().all(|(l, r)| {
        let left = column(l);
        let right = column(r).map(|r| r + left_width);
        groups.iter().any(|g| {
            Some(*g) == left || (*join.join_type() == JoinType::Inner && Some(*g) == right)
        })
    })
}

fn large_build_side(join: &HashJoinExec) -> bool {
    StatisticsContext::default()
        .compute(join.left().as_ref(), &StatisticsArgs::new())
        .ok()
        .and_then(|s| s.num_rows.get_value().copied())
        .is_some_and(|rows| rows >= MIN_BUILD_ROWS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::physical_plan::displayable;
    use datafusion::prelude::SessionConfig;

    /// A session with weir's join limits (`weir_lake::new_session`) and two partitions;
    /// with the rule or without it.
    async fn session(rule: bool) -> SessionContext {
        let config = SessionConfig::new()
            .with_target_partitions(2)
            .set_usize(
                "datafusion.optimizer.hash_join_single_partition_threshold",
                32 << 20,
            )
            .set_usize(
                "datafusion.optimizer.hash_join_single_partition_threshold_rows",
                1 << 20,
            );
        let ctx = SessionContext::new_with_config(config);
        let ctx = if rule { install(ctx) } else { ctx };
        for sql in [
            // 120,000 customers, every 1,000th key null; orders for keys past the
            // customers' too, and null keys.
            "create table c as select case when value % 1000 = 0 then null else value end as k \
             from generate_series(1, 120000)",
            "create table small as select value as k from generate_series(1, 5000)",
            "create table o as select case when value % 777 = 0 then null \
             else (value * 7919) % 130000 end as k, value as v from generate_series(1, 400000)",
        ] {
            ctx.sql(sql).await.unwrap().collect().await.unwrap();
        }
        ctx
    }

    async fn plan_and_rows(ctx: &SessionContext, sql: &str) -> (String, Vec<String>) {
        let df = ctx.sql(sql).await.unwrap();
        let plan = df.clone().create_physical_plan().await.unwrap();
        let text = displayable(plan.as_ref()).indent(true).to_string();
        let batches = df.collect().await.unwrap();
        let mut rows: Vec<String> = arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string()
            .lines()
            .map(str::to_string)
            .collect();
        rows.sort();
        (text, rows)
    }

    #[tokio::test]
    async fn a_join_grouped_by_its_key_is_partitioned_and_answers_the_same() {
        let (with, without) = (session(true).await, session(false).await);
        for sql in [
            "select c.k, count(o.v) as n, sum(o.v) as s from c left join o on c.k = o.k group by c.k",
            "select o.k, count(*) as n from c join o on c.k = o.k group by o.k",
        ] {
            let (plan, rows) = plan_and_rows(&with, sql).await;
            assert!(plan.contains("HashJoinExec: mode=Partitioned"), "{sql}\n{plan}");
            assert!(plan.contains("mode=SinglePartitioned"), "{sql}\n{plan}");
            let (before, expected) = plan_and_rows(&without, sql).await;
            assert!(before.contains("mode=CollectLeft"), "{sql}\n{before}");
            assert!(rows.len() > 100_000, "{sql}: {} rows", rows.len());
            assert_eq!(rows, expected, "{sql}");
        }
    }

    #[tokio::test]
    async fn other_joins_keep_their_mode() {
        let ctx = session(true).await;
        for sql in [
            // A small build side.
            "select small.k, count(o.v) from small left join o on small.k = o.k group by small.k",
            // Grouped by something else than the key.
            "select o.v % 10, count(*) from c join o on c.k = o.k group by o.v % 10",
            // Grouped by the key and more.
            "select c.k, o.v, count(*) from c join o on c.k = o.k group by c.k, o.v",
            // A left join grouped by the right side's key, which is null for unmatched rows.
            "select o.k, count(*) from c left join o on c.k = o.k group by o.k",
        ] {
            let (plan, _) = plan_and_rows(&ctx, sql).await;
            assert!(plan.contains("mode=CollectLeft"), "{sql}\n{plan}");
            assert!(!plan.contains("mode=Partitioned"), "{sql}\n{plan}");
        }
    }
}
