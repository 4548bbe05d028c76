//! Loading a slowly changing dimension: the changes of each load are kept in the table
//! `<dimension>__changes`, and the rows of every key they touch are recomputed from all
//! of that key's changes, so the result never depends on how changes were split into loads
//! or in which order the loads came.
//!
//! One load:
//!
//! 1. the input rows become changes (`__weir_ts` from `change_ts` or the load time,
//!    `__weir_seq` = load number << 32 | arrival order, `__weir_deleted` from
//!    `delete_flag`) and are appended to `<dimension>__changes`;
//! 2. the keys of these changes are the affected keys (every key for a snapshot or a
//!    rebuild); their history is computed from all their changes ([`Scd2::history`]);
//! 3. the dimension is rewritten in one commit: the untouched rows as they were, the
//!    affected keys' new rows, and the unknown member.
//!
//! Both commits carry the load's txn `(app, n)`: a load retried after the changes landed
//! skips the append and finishes the dimension from the stored changes.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{new_null_array, ArrayRef, BooleanArray, Int64Array, StringArray};
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::prelude::{DataFrame, SessionContext};
use weir_common::Error;
use weir_config::{DeleteMode, Dimension, ScdType, SchemaEvolution, WriteMode, UNKNOWN_MEMBER};
use weir_lake::{Lake, WriteMetrics, WriteOptions, WriteSpec};

use super::{hash_expr, ident, Scd2, DELETED, INFERRED, SEQ, TS};
use crate::session::register_lake_table;

/// Columns weir adds to a dimension; input columns may not use these names.
fn reserved(scd: ScdType) -> &'static [&'static str] {
    match scd {
        ScdType::Scd2 | ScdType::Snapshot => &[
            "valid_from",
            "valid_to",
            "is_current",
            "version",
            "row_hash",
            "is_deleted",
        ],
        ScdType::Scd1 | ScdType::Scd3 => &["updated_at", "row_hash", "is_deleted"],
    }
}

/// The table holding every change a dimension has received.
pub fn changes_table(dimension: &str) -> String {
    format!("{dimension}__changes")
}

/// How one load is applied.
#[derive(Debug, Clone)]
pub struct Load {
    /// `(app, n)`: the load's idempotency token; `n` also orders loads.
    pub txn: (String, i64),
    /// The change time of rows without `change_ts`.
    pub time: chrono::DateTime<chrono::Utc>,
    /// Recompute every key, not only those this load touches.
    pub rebuild: bool,
    /// Extra commit-info entries.
    pub metadata: HashMap<String, serde_json::Value>,
}

/// What a load did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Changes received.
    pub changes: u64,
    /// Keys whose rows were recomputed.
    pub keys: u64,
    /// The dimension's commit.
    pub write: WriteMetrics,
}

fn df_err(context: &'static str) -> impl Fn(datafusion::error::DataFusionError) -> Error {
    move |e| Error::user(format!("{context}: {e}"))
}

async fn count(ctx: &SessionContext, sql: &str) -> Result<u64, Error> {
    let batches = ctx
        .sql(sql)
        .await
        .map_err(df_err("counting"))?
        .collect()
        .await
        .map_err(df_err("counting"))?;
    Ok(batches
        .first()
        .and_then(|b| b.column(0).as_any().downcast_ref::<Int64Array>())
        .map(|a| a.value(0) as u64)
        .unwrap_or(0))
}

fn register(ctx: &SessionContext, name: &str, df: DataFrame) -> Result<(), Error> {
    let _ = ctx.deregister_table(name);
    ctx.register_table(name, df.into_view())
        .map(|_| ())
        .map_err(|e| Error::internal(format!("registering {name}: {e}")))
}

/// Checks the dimension's columns against the input's; returns the attribute columns
/// (every input column but `change_ts`, `delete_flag` and the arrival order).
fn attributes(dim: &Dimension, columns: &[String]) -> Result<Vec<String>, Error> {
    let listed = || columns.join(", ");
    if dim.key.is_empty() {
        return Err(
            Error::user(format!("a `{}` dimension needs a key", dim.scd))
                .with_hint("name the business key: `unique_key` on a model, `key` on a sink"),
        );
    }
    let named = dim
        .key
        .iter()
        .map(|c| ("key", c))
        .chain(dim.tracked.iter().map(|c| ("tracked", c)))
        .chain(dim.change_ts.iter().map(|c| ("change_ts", c)))
        .chain(dim.delete_flag.iter().map(|c| ("delete_flag", c)));
    for (what, c) in named {
        if !columns.contains(c) {
            return Err(Error::user(format!(
                "`{what}` column `{c}` is not in the dimension's input"
            ))
            .with_hint(format!("its columns: {}", listed())));
        }
    }
    let kept = columns
        .iter()
        .filter(|c| Some(*c) != dim.change_ts.as_ref() && Some(*c) != dim.delete_flag.as_ref());
    for c in kept {
        if reserved(dim.scd).contains(&c.as_str())
            || *c == dim.surrogate_key
            || (dim.scd == ScdType::Scd3 && c.starts_with("previous_"))
        {
            return Err(Error::user(format!(
                "the dimension's input has a column `{c}`, a name the dimension keeps for itself"
            ))
            .with_hint("rename it in the SQL (`... as other_name`)"));
        }
    }
    Ok(columns
        .iter()
        .filter(|c| {
            Some(*c) != dim.change_ts.as_ref()
                && Some(*c) != dim.delete_flag.as_ref()
                && c.as_str() != SEQ
        })
        .cloned()
        .collect())
}

/// Applies one load of `input` to the dimension `table` (see the module docs).
pub async fn apply(
    lake: &Lake,
    ctx: &SessionContext,
    table: &str,
    dim: &Dimension,
    input: DataFrame,
    load: &Load,
) -> Result<Applied, Error> {
    let columns: Vec<String> = input
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let attrs = attributes(dim, &columns)?;
    let (app, n) = (&load.txn.0, load.txn.1);
    if !(0..1 << 31).contains(&n) {
        return Err(Error::internal(format!("load number {n} out of range")));
    }
    let changes = changes_table(table);
    let started = std::time::Instant::now();
    let input_name = "__weir_scd_input";
    register(ctx, input_name, input)?;

    // Bad keys fail the load before anything is written.
    let null_key = dim
        .key
        .iter()
        .map(|k| format!("{} is null", ident(k)))
        .collect::<Vec<_>>()
        .join(" or ");
    let nulls = count(
        ctx,
        &format!("select count(*) from {input_name} where {null_key}"),
    )
    .await?;
    if nulls > 0 {
        return Err(Error::user(format!(
            "{nulls} input row(s) of dimension `{table}` have no key ({})",
            dim.key.join(", ")
        ))
        .with_hint("add a `not_null` check on the key so such rows are quarantined, or filter them in the SQL"));
    }

    // The changes of later loads without their dimension: the dimension was removed, and
    // loading again would skip this input as already stored.
    if !lake.exists(table).await && lake.exists(&changes).await {
        let stored = lake.open(&changes).await?;
        if let Some(c) = lake.txn_version(&stored, app).await?.filter(|c| *c > n) {
            return Err(Error::user(format!(
                "`{changes}` holds load {c} of `{table}`, but `{table}` is missing"
            ))
            .with_hint(format!(
                "delete the directory of `{changes}` too to start the dimension over"
            )));
        }
    }

    // 1. The changes, appended once per load.
    let base = n << 32;
    let ts = match &dim.change_ts {
        Some(c) => ident(c),
        None => format!(
            "arrow_cast('{}', 'Timestamp(Microsecond, Some(\"UTC\"))')",
            load.time.format("%Y-%m-%dT%H:%M:%S%.6fZ")
        ),
    };
    let deleted = match &dim.delete_flag {
        Some(c) => format!("coalesce({}, false)", ident(c)),
        None => "false".into(),
    };
    let order = if columns.iter().any(|c| c == SEQ) {
        format!("cast({} as bigint)", ident(SEQ))
    } else {
        "cast(row_number() over () as bigint)".into()
    };
    let select: Vec<String> = attrs.iter().map(|c| ident(c)).collect();
    let inferred_flag = if dim.inferred_members.is_some() {
        format!(", false as {}", ident(INFERRED))
    } else {
        String::new()
    };
    let mut new_changes = ctx
        .sql(&format!(
            "select {}, {ts} as {}, {base} + {order} as {}, {deleted} as {}{inferred_flag} from {input_name}",
            select.join(", "),
            ident(TS),
            ident(SEQ),
            ident(DELETED),
        ))
        .await
        .map_err(|e| Error::user(format!("the changes of `{table}`: {e}")))?;
    if let Some(src) = &dim.inferred_members {
        let inferred = inferred_changes(
            ctx,
            lake,
            dim,
            src,
            &changes,
            input_name,
            &new_changes,
            base,
        )
        .await
        .map_err(|e| e.context(format!("inferred members of `{table}` from `{src}`")))?;
        new_changes = new_changes
            .union(inferred)
            .map_err(df_err("inferred members"))?;
    }
    // The keys of this load, kept in memory: small beside the dimension.
    let key_cols: Vec<datafusion::logical_expr::Expr> = dim
        .key
        .iter()
        .map(|k| datafusion::logical_expr::col(datafusion::common::Column::new_unqualified(k)))
        .collect();
    let mut load_keys = new_changes
        .clone()
        .select(key_cols)
        .and_then(|d| d.distinct())
        .map_err(df_err("the keys of the load"))?
        .collect()
        .await
        .map_err(df_err("the keys of the load"))?;
    let appended = lake
        .write(
            &changes,
            ctx,
            new_changes,
            &WriteSpec {
                mode: WriteMode::Append,
                evolution: SchemaEvolution::AddColumns,
                ..Default::default()
            },
            &WriteOptions {
                txn: Some((app.clone(), n)),
                positions: Vec::new(),
                metadata: load.metadata.clone(),
            },
        )
        .await?;

    tracing::debug!(table, changes = appended.rows_inserted, elapsed = ?started.elapsed(), "scd: changes appended");

    // 2. The affected keys' history.
    let all_name = "__weir_scd_changes";
    register_lake_table(ctx, lake, &changes, all_name).await?;
    let exists = lake.exists(table).await;
    let old_name = "__weir_scd_old";
    let mut rebuild = load.rebuild || dim.scd == ScdType::Snapshot || !exists;
    if exists {
        register_lake_table(ctx, lake, table, old_name).await?;
    }
    let keys: Vec<String> = dim.key.iter().map(|k| ident(k)).collect();
    let keys = keys.join(", ");
    let on = |a: &str, b: &str| {
        dim.key
            .iter()
            .map(|k| format!("{a}.{k} = {b}.{k}", k = ident(k)))
            .collect::<Vec<_>>()
            .join(" and ")
    };
    if appended.skipped {
        // A retried load: its changes are the stored ones.
        load_keys = ctx
            .sql(&format!(
                "select distinct {keys} from {all_name} where {seq} >= {base} and {seq} < {next}",
                seq = ident(SEQ),
                next = (n + 1) << 32,
            ))
            .await
            .map_err(df_err("the keys of the load"))?
            .collect()
            .await
            .map_err(df_err("the keys of the load"))?;
    }
    let keys_name = "__weir_scd_load_keys";
    let touched_keys: usize = load_keys.iter().map(|b| b.num_rows()).sum();
    // A load touching a large share of the keys (a full reload, say) recomputes every key:
    // one pass over the changes costs less than joining them with millions of keys.
    if !rebuild && touched_keys > 1 << 16 && touched_keys as u64 * 4 > lake.stats(table).await?.rows
    {
        rebuild = true;
    }
    if let Some(first) = load_keys.first() {
        let mem = datafusion::datasource::MemTable::try_new(first.schema(), vec![load_keys])
            .map_err(|e| Error::internal(format!("the keys of the load: {e}")))?;
        let _ = ctx.deregister_table(keys_name);
        ctx.register_table(keys_name, Arc::new(mem))
            .map_err(|e| Error::internal(format!("the keys of the load: {e}")))?;
    } else {
        register(
            ctx,
            keys_name,
            ctx.sql(&format!("select {keys} from {all_name} where false"))
                .await
                .map_err(df_err("the keys of the load"))?,
        )?;
    }
    let new_keys = format!("select * from {keys_name}");
    let stored_attrs: Vec<String> = ctx
        .table(all_name)
        .await
        .map_err(df_err("reading the changes"))?
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|c| ![TS, SEQ, DELETED, INFERRED].contains(&c.as_str()))
        .collect();
    let scoped = |rebuild: bool| {
        let scoped = if rebuild {
            format!("select * from {all_name}")
        } else {
            format!(
                "select c.* from {all_name} c left semi join ({new_keys}) a on {}",
                on("c", "a")
            )
        };
        if dim.scd == ScdType::Snapshot {
            snapshot_deletes(&scoped, &dim.key, &stored_attrs)
        } else {
            scoped
        }
    };
    let mut rows = dimension_rows(ctx, table, dim, &scoped(rebuild), &stored_attrs).await?;
    // A dimension whose columns changed (a new input column, other options) is rebuilt.
    if !rebuild {
        let old = ctx.table(old_name).await.map_err(df_err("the dimension"))?;
        let same = old.schema().fields().len() == rows.schema().fields().len()
            && old
                .schema()
                .fields()
                .iter()
                .zip(rows.schema().fields())
                .all(|(a, b)| a.name() == b.name());
        if !same {
            rebuild = true;
            rows = dimension_rows(ctx, table, dim, &scoped(true), &stored_attrs).await?;
        }
    }
    let keys_touched = if rebuild {
        let all = format!("select distinct {keys} from {all_name}");
        count(ctx, &format!("select count(*) from ({all})")).await?
    } else {
        touched_keys as u64
    };

    // 3. The dimension: untouched rows, the new rows, the unknown member.
    if !rebuild {
        let sk = ident(&dim.surrogate_key);
        let kept = ctx
            .sql(&format!(
                "select o.* from {old_name} o left anti join ({new_keys}) a on {} \
                 where o.{sk} <> '{UNKNOWN_MEMBER}'",
                on("o", "a"),
            ))
            .await
            .map_err(df_err("the unchanged rows"))?;
        rows = rows.union(kept).map_err(df_err("the dimension's rows"))?;
    }
    if dim.unknown_member {
        let unknown = ctx
            .read_batch(unknown_member(dim, rows.schema().as_arrow())?)
            .map_err(df_err("the unknown member"))?;
        rows = rows
            .union(unknown)
            .map_err(df_err("the dimension's rows"))?;
    }
    tracing::debug!(table, keys = keys_touched, elapsed = ?started.elapsed(), "scd: rows planned");
    let write = lake
        .write(
            table,
            ctx,
            rows,
            &WriteSpec {
                mode: WriteMode::Overwrite,
                hash_columns: vec![dim.surrogate_key.clone(), "row_hash".into()],
                ..Default::default()
            },
            &WriteOptions {
                txn: Some((app.clone(), n)),
                positions: Vec::new(),
                metadata: load.metadata.clone(),
            },
        )
        .await?;
    tracing::debug!(table, rows = write.rows_inserted, elapsed = ?started.elapsed(), "scd: dimension written");
    for name in [
        input_name,
        all_name,
        old_name,
        keys_name,
        "__weir_scd_history",
    ] {
        let _ = ctx.deregister_table(name);
    }
    Ok(Applied {
        changes: appended.rows_inserted,
        keys: keys_touched,
        write,
    })
}

/// One inferred change per key of `src` that the dimension has never seen (neither in
/// its stored changes nor in this load): attributes null, valid from 1900-01-01.
#[allow(clippy::too_many_arguments)] // the load's parts, named
async fn inferred_changes(
    ctx: &SessionContext,
    lake: &Lake,
    dim: &Dimension,
    src: &str,
    changes: &str,
    input_name: &str,
    new_changes: &DataFrame,
    base: i64,
) -> Result<DataFrame, Error> {
    use datafusion::logical_expr::{cast, col, lit};
    use datafusion::scalar::ScalarValue;
    let keys: Vec<String> = dim.key.iter().map(|k| ident(k)).collect();
    let keys = keys.join(", ");
    let on = |b: &str| {
        dim.key
            .iter()
            .map(|k| format!("s.{k} = {b}.{k}", k = ident(k)))
            .collect::<Vec<_>>()
            .join(" and ")
    };
    let not_null: Vec<String> = dim
        .key
        .iter()
        .map(|k| format!("{} is not null", ident(k)))
        .collect();
    let mut sql = format!(
        "select distinct {keys} from {src} where {}",
        not_null.join(" and ")
    );
    sql = format!(
        "select s.* from ({sql}) s left anti join (select distinct {keys} from {input_name}) i on {}",
        on("i")
    );
    if lake.exists(changes).await {
        register_lake_table(ctx, lake, changes, "__weir_scd_known").await?;
        sql = format!(
            "select s.* from ({sql}) s left anti join (select distinct {keys} from __weir_scd_known) k on {}",
            on("k")
        );
    }
    let keys_df = ctx.sql(&sql).await.map_err(|e| {
        Error::user(format!("reading the keys: {e}")).with_hint(
            "`inferred_members` names a table (`schema.table`) or model with the dimension's key columns",
        )
    })?;
    let mut exprs = Vec::new();
    for f in new_changes.schema().fields() {
        let name = f.name().as_str();
        let t = f.data_type();
        let e = if dim.key.iter().any(|k| k == name) {
            cast(
                col(datafusion::common::Column::new_unqualified(name)),
                t.clone(),
            )
        } else if name == TS {
            let text = if matches!(t, DataType::Date32 | DataType::Date64) {
                "1900-01-01"
            } else {
                "1900-01-01T00:00:00"
            };
            let v = ScalarValue::Utf8(Some(text.into()))
                .cast_to(t)
                .map_err(|e| Error::internal(format!("the inferred members' time: {e}")))?;
            lit(v)
        } else if name == SEQ {
            lit(base)
        } else if name == DELETED {
            lit(false)
        } else if name == INFERRED {
            lit(true)
        } else {
            lit(ScalarValue::try_from(t).map_err(|e| Error::internal(e.to_string()))?)
        };
        exprs.push(e.alias(name));
    }
    keys_df.select(exprs).map_err(df_err("inferred members"))
}

/// The rows of the keys whose changes `scoped` (SQL) selects.
async fn dimension_rows(
    ctx: &SessionContext,
    table: &str,
    dim: &Dimension,
    scoped: &str,
    attrs: &[String],
) -> Result<DataFrame, Error> {
    let changes = ctx
        .sql(scoped)
        .await
        .map_err(|e| Error::user(format!("the changes of `{table}`: {e}")))?;
    let scd2 = Scd2 {
        key: dim.key.clone(),
        tracked: dim.tracked.clone(),
        deletes: dim.deletes,
        inferred: false,
        binary: Vec::new(),
    };
    let hist = scd2.history(ctx, changes).await?;
    register(ctx, "__weir_scd_history", hist)?;
    ctx.sql(&project_sql(dim, "__weir_scd_history", attrs))
        .await
        .map_err(|e| Error::user(format!("the rows of `{table}`: {e}")))
}

/// A snapshot's changes plus the deletes it implies: a key seen in one snapshot and
/// absent from the next is deleted at the next snapshot's time.
fn snapshot_deletes(scoped: &str, key: &[String], attrs: &[String]) -> String {
    let (ts, seq, del) = (ident(TS), ident(SEQ), ident(DELETED));
    let keys: Vec<String> = key.iter().map(|k| ident(k)).collect();
    let keys = keys.join(", ");
    let cols: Vec<String> = attrs.iter().map(|c| ident(c)).collect();
    let cols = cols.join(", ");
    format!(
        "with scoped as ({scoped}), \
         times as (select {ts} as __weir_t, lead({ts}) over (order by {ts}) as __weir_next_t \
                   from (select distinct {ts} from scoped)), \
         last_seen as (select * from (select *, row_number() over \
                         (partition by {keys}, {ts} order by {seq} desc) as __weir_last \
                       from scoped where not {del}) where __weir_last = 1), \
         seen as (select *, lead({ts}) over (partition by {keys} order by {ts}) as __weir_key_next \
                  from last_seen) \
         select {cols}, {ts}, {seq}, {del} from scoped \
         union all \
         select {cols}, __weir_next_t as {ts}, {seq}, true as {del} \
         from seen join times on {ts} = __weir_t \
         where __weir_next_t is not null \
           and (__weir_key_next is null or __weir_key_next <> __weir_next_t)"
    )
}

/// The dimension's rows from the history view `hist`, by kind.
fn project_sql(dim: &Dimension, hist: &str, attrs: &[String]) -> String {
    let cols: Vec<String> = attrs.iter().map(|c| ident(c)).collect();
    let cols = cols.join(", ");
    let marker = if dim.deletes == DeleteMode::Marker {
        ", is_deleted"
    } else {
        ""
    };
    let sk = ident(&dim.surrogate_key);
    let marker = if dim.inferred_members.is_some() {
        format!("{marker}, is_inferred")
    } else {
        marker.to_string()
    };
    let rows = match dim.scd {
        ScdType::Scd2 | ScdType::Snapshot => format!(
            "select {cols}, valid_from, valid_to, is_current, version, row_hash{marker} from {hist}"
        ),
        ScdType::Scd1 => format!(
            "select {cols}, valid_from as updated_at, row_hash{marker} from {hist} where is_current"
        ),
        ScdType::Scd3 => {
            let tracked: Vec<&String> = if dim.tracked.is_empty() {
                attrs.iter().filter(|c| !dim.key.contains(c)).collect()
            } else {
                dim.tracked.iter().collect()
            };
            let current: Vec<String> = attrs.iter().map(|c| format!("c.{}", ident(c))).collect();
            let previous: Vec<String> = tracked
                .iter()
                .map(|c| format!("p.{} as {}", ident(c), ident(&format!("previous_{c}"))))
                .collect();
            let on: Vec<String> = dim
                .key
                .iter()
                .map(|k| format!("p.{k} = c.{k}", k = ident(k)))
                .collect();
            let marker = marker.replace(", ", ", c.");
            format!(
                "select {}, {}, c.valid_from as updated_at, c.row_hash{marker} \
                 from {hist} c left join {hist} p on {} and p.version = c.version - 1 \
                 where c.is_current",
                current.join(", "),
                previous.join(", "),
                on.join(" and ")
            )
        }
    };
    let mut sk_cols = dim.key.clone();
    if matches!(dim.scd, ScdType::Scd2 | ScdType::Snapshot) {
        sk_cols.push("valid_from".into());
    }
    format!(
        "select {} as {sk}, x.* from ({rows}) x",
        hash_expr(&sk_cols)
    )
}

/// The unknown member: surrogate key `-1`, everything else null but its flags.
fn unknown_member(dim: &Dimension, schema: &Schema) -> Result<RecordBatch, Error> {
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for f in schema.fields() {
        let name = f.name().as_str();
        let a: ArrayRef = match (name, f.data_type()) {
            (n, t) if n == dim.surrogate_key => {
                arrow::compute::cast(&StringArray::from(vec![UNKNOWN_MEMBER]), t)
                    .map_err(|e| Error::internal(format!("the unknown member's key: {e}")))?
            }
            ("is_current", DataType::Boolean) => Arc::new(BooleanArray::from(vec![true])),
            ("is_deleted" | "is_inferred", DataType::Boolean) => {
                Arc::new(BooleanArray::from(vec![false]))
            }
            ("version", DataType::Int64) => Arc::new(Int64Array::from(vec![0])),
            (_, t) => new_null_array(t, 1),
        };
        arrays.push(a);
    }
    let fields: Vec<arrow::datatypes::Field> = schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
        .map_err(|e| Error::internal(format!("the unknown member: {e}")))
}
