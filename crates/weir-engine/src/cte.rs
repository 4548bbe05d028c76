//! Common table expressions that a query reads more than once are computed once.
//!
//! DataFusion inlines every reference to a CTE, so `WITH r AS (SELECT ... GROUP BY ...)
//! SELECT ... FROM r WHERE x = (SELECT max(x) FROM r)` scans and aggregates twice (TPC-H
//! q15). A CTE that reduces its input (GROUP BY, DISTINCT or LIMIT) and is referenced at
//! least twice, or one written `AS MATERIALIZED`, is run first, held in memory as a
//! table of the session, and the query reads that table. `AS NOT MATERIALIZED` keeps a
//! CTE inlined. A result larger than [`LIMIT_BYTES`] is dropped and the query runs as
//! written; so does any query this cannot handle: the answer is always the one the
//! written SQL gives.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    visit_relations, CteAsMaterialized, GroupByExpr, Ident, Query, SetExpr, Statement,
};
use futures::StreamExt;

/// The most memory one query's materialized CTEs may hold.
pub const LIMIT_BYTES: usize = 256 * 1024 * 1024;

/// Numbers the tables holding CTEs, unique within the process.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The SQL to run and the session tables holding materialized CTEs (drop them with
/// [`Materialized::release`] after the query).
#[derive(Debug, Default)]
pub struct Materialized {
    pub sql: String,
    pub tables: Vec<String>,
}

impl Materialized {
    /// Deregisters the tables holding this query's CTEs.
    pub fn release(&self, ctx: &SessionContext) {
        for t in &self.tables {
            let _ = ctx.deregister_table(t.as_str());
        }
    }
}

/// Runs the CTEs of `sql` that are worth computing once and returns the query rewritten
/// to read them; `sql` unchanged when there are none or anything fails.
pub async fn materialize(ctx: &SessionContext, sql: &str) -> Materialized {
    materialize_within(ctx, sql, LIMIT_BYTES).await
}

async fn materialize_within(ctx: &SessionContext, sql: &str, limit: usize) -> Materialized {
    let unchanged = || Materialized {
        sql: sql.to_string(),
        tables: Vec::new(),
    };
    let Some(mut query) = parse_query(ctx, sql) else {
        return unchanged();
    };
    let chosen = chosen(&query);
    // The hints are weir's to follow; DataFusion's planner does not take them.
    let mut hinted = false;
    if let Some(with) = query.with.as_mut() {
        for cte in &mut with.cte_tables {
            hinted |= cte.materialized.take().is_some();
        }
    }
    if chosen.is_empty() {
        return match hinted {
            true => Materialized {
                sql: query.to_string(),
                tables: Vec::new(),
            },
            false => unchanged(),
        };
    }
    if crate::session::ensure_schema(ctx, "public").is_err() {
        return unchanged();
    }
    let mut out = Materialized::default();
    let mut held = 0usize;
    for i in chosen {
        let Some(with) = query.with.as_ref() else {
            break;
        };
        // The CTE's body, with the CTEs before it in scope (some already materialized).
        let mut body = Query::clone(&with.cte_tables[i].query);
        if i > 0 {
            let mut earlier = with.clone();
            earlier.cte_tables.truncate(i);
            if body.with.is_some() {
                // A CTE body with its own WITH: leave it inlined.
                continue;
            }
            body.with = Some(earlier);
        }
        let Some(table) = collect_capped(ctx, &body.to_string(), &mut held, limit).await else {
            out.release(ctx);
            return unchanged();
        };
        let name = format!("__weir_cte_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let registered = table.and_then(|t| ctx.register_table(name.as_str(), Arc::new(t)));
        if registered.is_err() {
            out.release(ctx);
            return unchanged();
        }
        out.tables.push(name.clone());
        let Some(read) = parse_query(ctx, &format!("SELECT * FROM {name}")) else {
            out.release(ctx);
            return unchanged();
        };
        if let Some(with) = query.with.as_mut() {
            *with.cte_tables[i].query = read;
        }
    }
    if out.tables.is_empty() && !hinted {
        return unchanged();
    }
    out.sql = query.to_string();
    out
}

/// The query of `sql` if it is one plain query.
fn parse_query(ctx: &SessionContext, sql: &str) -> Option<Query> {
    let state = ctx.state();
    let dialect = state.config().options().sql_parser.dialect;
    match state.sql_to_statement(sql, &dialect).ok()? {
        DfStatement::Statement(s) => match *s {
            Statement::Query(q) => Some(*q),
            _ => None,
        },
        _ => None,
    }
}

/// Indexes of the CTEs to materialize, in order.
fn chosen(query: &Query) -> Vec<usize> {
    let Some(with) = &query.with else {
        return Vec::new();
    };
    if with.recursive {
        return Vec::new();
    }
    let names: Vec<String> = with
        .cte_tables
        .iter()
        .map(|c| normalized(&c.alias.name))
        .collect();
    let mut uses = vec![0usize; names.len()];
    let _ = visit_relations(query, |rel| {
        if let [part] = rel.0.as_slice() {
            if let Some(ident) = part.as_ident() {
                let n = normalized(ident);
                if let Some(i) = names.iter().position(|c| *c == n) {
                    uses[i] += 1;
                }
            }
        }
        ControlFlow::<()>::Continue(())
    });
    with.cte_tables
        .iter()
        .enumerate()
        .filter(|(i, cte)| match cte.materialized {
            Some(CteAsMaterialized::Materialized) => true,
            Some(CteAsMaterialized::NotMaterialized) => false,
            None => uses[*i] >= 2 && reduces(&cte.query),
        })
        .map(|(i, _)| i)
        .collect()
}

/// Whether a CTE's result is usually much smaller than what it reads.
fn reduces(query: &Query) -> bool {
    if query.limit_clause.is_some() {
        return true;
    }
    match query.body.as_ref() {
        SetExpr::Select(s) => {
            s.distinct.is_some()
                || match &s.group_by {
                    GroupByExpr::All(_) => true,
                    GroupByExpr::Expressions(e, _) => !e.is_empty(),
                }
        }
        _ => false,
    }
}

/// An identifier as the planner sees it: unquoted ones are lower-cased.
fn normalized(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

/// The result of `sql` as a table (with the plan's schema, also when it has no rows), or
/// `None` if it fails or `held` would pass `limit` bytes.
async fn collect_capped(
    ctx: &SessionContext,
    sql: &str,
    held: &mut usize,
    limit: usize,
) -> Option<datafusion::error::Result<MemTable>> {
    let mut stream = ctx.sql(sql).await.ok()?.execute_stream().await.ok()?;
    let schema = stream.schema();
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch.ok()?;
        *held += batch.get_array_memory_size();
        if *held > limit {
            return None;
        }
        batches.push(batch);
    }
    Some(MemTable::try_new(schema, vec![batches]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::util::pretty::pretty_format_batches;

    async fn session() -> SessionContext {
        let ctx = weir_lake::new_session();
        crate::session::ensure_schema(&ctx, "raw").unwrap();
        ctx.sql(
            "CREATE TABLE raw.sales AS SELECT * FROM (VALUES \
             (1, 10.0), (1, 5.0), (2, 15.0), (3, 7.0), (3, 8.0), (4, 1.0)) AS t(store, amount)",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
        ctx
    }

    async fn answer(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        pretty_format_batches(&batches).unwrap().to_string()
    }

    const TOP: &str = "WITH revenue (store_no, total) AS ( \
        SELECT store, sum(amount) FROM raw.sales GROUP BY store) \
        SELECT store_no, total FROM revenue \
        WHERE total = (SELECT max(total) FROM revenue) ORDER BY store_no";

    #[tokio::test]
    async fn a_reduced_cte_read_twice_is_computed_once_with_the_same_answer() {
        let ctx = session().await;
        let written = answer(&ctx, TOP).await;
        let m = materialize(&ctx, TOP).await;
        assert_eq!(m.tables.len(), 1, "{}", m.sql);
        assert!(m.sql.contains(&m.tables[0]), "{}", m.sql);
        assert!(!m.sql.to_lowercase().contains("raw.sales"), "{}", m.sql);
        let got = answer(&ctx, &m.sql).await;
        assert_eq!(got, written);
        assert!(got.contains("| 1        | 15.0  |"), "{got}");
        assert!(got.contains("| 2        | 15.0  |"), "{got}");
        assert!(got.contains("| 3        | 15.0  |"), "{got}");
        m.release(&ctx);
        assert!(!ctx.table_exist(m.tables[0].as_str()).unwrap());
    }

    #[tokio::test]
    async fn later_ctes_read_earlier_ones_and_hints_are_honoured() {
        let ctx = session().await;
        let sql = "WITH a AS (SELECT store, sum(amount) AS s FROM raw.sales GROUP BY store), \
            b AS (SELECT DISTINCT s FROM a WHERE s > 7), \
            c AS (SELECT store FROM raw.sales) \
            SELECT (SELECT count(*) FROM b) AS nb, (SELECT max(s) FROM b) AS mb, \
            (SELECT count(*) FROM a) AS na, (SELECT count(*) FROM c) + (SELECT count(*) FROM c) AS nc";
        let m = materialize(&ctx, sql).await;
        // `a` (used by the query and by `b`) and `b` are grouped or distinct; `c` is not.
        assert_eq!(m.tables.len(), 2, "{}", m.sql);
        assert_eq!(answer(&ctx, &m.sql).await, answer(&ctx, sql).await);
        assert!(answer(&ctx, &m.sql)
            .await
            .contains("| 1  | 15.0 | 4  | 12 |"));

        // The hints parse in the PostgreSQL dialect.
        ctx.state_ref()
            .write()
            .config_mut()
            .options_mut()
            .set("datafusion.sql_parser.dialect", "PostgreSQL")
            .unwrap();
        let hinted = sql
            .replace("a AS (", "a AS NOT MATERIALIZED (")
            .replace("c AS (", "c AS MATERIALIZED (");
        let m = materialize(&ctx, &hinted).await;
        assert_eq!(m.tables.len(), 2, "b and c: {}", m.sql);
        assert!(
            m.sql.contains("GROUP BY store"),
            "a stays inlined: {}",
            m.sql
        );
        assert!(!m.sql.contains("MATERIALIZED"), "{}", m.sql);
        assert_eq!(answer(&ctx, &m.sql).await, answer(&ctx, sql).await);
    }

    #[tokio::test]
    async fn once_used_too_large_or_failing_ctes_leave_the_query_as_written() {
        let ctx = session().await;
        let once = "WITH r AS (SELECT store, sum(amount) AS s FROM raw.sales GROUP BY store) \
            SELECT * FROM r";
        assert!(materialize(&ctx, once).await.tables.is_empty());
        let m = materialize_within(&ctx, TOP, 16).await;
        assert!(m.tables.is_empty());
        assert_eq!(m.sql, TOP);
        assert_eq!(
            ctx.catalog("weir")
                .unwrap()
                .schema("public")
                .unwrap()
                .table_names()
                .len(),
            0
        );
        let bad = TOP.replace("raw.sales", "raw.nothing");
        assert_eq!(materialize(&ctx, &bad).await.sql, bad);
        assert_eq!(materialize(&ctx, "SELECT 1").await.sql, "SELECT 1");
    }
}
