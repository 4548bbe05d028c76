//! Slowly changing dimensions, type 2: the history of a dimension as a pure function of
//! the changes received for its keys.
//!
//! A change is one row: the business key, the attributes, when the change happened
//! ([`TS`], source time when the source has it), the order it arrived in ([`SEQ`], which
//! breaks ties between changes of one key at one time) and whether it deletes the key
//! ([`DELETED`]). Walking a key's changes in time order, a change whose tracked attributes
//! hash like the state before it is no change at all, and a delete of an absent key is no
//! delete; every other change opens a version that is valid until the next change.
//!
//! History is computed from the changes, never patched: a late change (older than the
//! current version) lands in its place and the neighbouring validity ranges follow, and
//! several changes to one key in one load are applied in order, exactly as if every change
//! had arrived at once and in time. (The changes must therefore be kept, not only the
//! versions: a change back to an earlier value that was a no-op when it arrived becomes a
//! version when a late change lands before it.)

use datafusion::prelude::{DataFrame, SessionContext};
use weir_common::Error;

/// When a change happened.
pub const TS: &str = "__weir_ts";
/// Arrival order: breaks ties between changes of one key at one time.
pub const SEQ: &str = "__weir_seq";
/// True when the change deletes the key.
pub const DELETED: &str = "__weir_deleted";
/// True for the change that makes an inferred member: a key facts refer to before the
/// dimension has any change for it. It takes the attributes of the key's first real
/// change, so the inferred version (and its surrogate key) is filled in, not replaced.
pub const INFERRED: &str = "__weir_inferred";

pub use weir_config::DeleteMode;

/// How a type 2 dimension tracks its rows.
#[derive(Debug, Clone, Default)]
pub struct Scd2 {
    /// The business key.
    pub key: Vec<String>,
    /// The columns whose changes make a new version (empty: every non-key column).
    pub tracked: Vec<String>,
    pub deletes: DeleteMode,
    /// The changes have an [`INFERRED`] column (and the history an `is_inferred` one).
    pub inferred: bool,
    /// Columns of binary type (hashed as hex).
    pub binary: Vec<String>,
}

fn ident(c: &str) -> String {
    format!("\"{}\"", c.replace('"', "\"\""))
}

/// The hash of `columns` as SQL (an md5 hex string): each value as its length and text,
/// null as `-` (which no length starts with), so null, `''` and values holding the
/// separator all hash differently. Change detection and `surrogate_key()` use it.
pub fn hash_expr(columns: &[String]) -> String {
    hash_expr_typed(columns, &[])
}

/// [`hash_expr`], with the `binary` columns hashed as their hex text (a cast to text would
/// fail on bytes that are not UTF-8).
pub fn hash_expr_typed(columns: &[String], binary: &[String]) -> String {
    if columns.is_empty() {
        return "md5('')".into();
    }
    let parts: Vec<String> = columns
        .iter()
        .map(|c| {
            let text = if binary.contains(c) {
                format!("encode({}, 'hex')", ident(c))
            } else {
                format!("cast({} as varchar)", ident(c))
            };
            format!("coalesce(cast(character_length({text}) as varchar) || ':' || {text}, '-')")
        })
        .collect();
    format!("md5(concat({}))", parts.join(", '|', "))
}

impl Scd2 {
    /// The SQL over the changes table `changes` (with `columns` besides the internal ones)
    /// that gives the history: the key and attribute columns, then `valid_from`,
    /// `valid_to` (null while current), `is_current`, `version` (1, 2, ... per key),
    /// `row_hash`, and `is_deleted` with [`DeleteMode::Marker`].
    pub fn history_sql(&self, changes: &str, columns: &[String]) -> Result<String, Error> {
        if self.key.is_empty() {
            return Err(Error::user("a type 2 dimension needs a `key`"));
        }
        for c in self.key.iter().chain(&self.tracked) {
            if !columns.contains(c) {
                return Err(
                    Error::user(format!("column `{c}` is not in the dimension's input"))
                        .with_hint(format!("its columns: {}", columns.join(", "))),
                );
            }
        }
        let tracked: Vec<String> = if self.tracked.is_empty() {
            columns
                .iter()
                .filter(|c| !self.key.contains(c))
                .cloned()
                .collect()
        } else {
            self.tracked.clone()
        };
        let keys: Vec<String> = self.key.iter().map(|k| ident(k)).collect();
        let keys = keys.join(", ");
        let order = format!("{}, {}", ident(TS), ident(SEQ));
        let cols: Vec<String> = columns.iter().map(|c| ident(c)).collect();
        let cols = cols.join(", ");
        let (ts, del) = (ident(TS), ident(DELETED));
        let (rows, marker) = match self.deletes {
            DeleteMode::Close => (format!("where not {del}"), String::new()),
            DeleteMode::Marker => (String::new(), format!(", {del} as is_deleted")),
        };
        // Untracked columns change in place: a version shows the values of its last change.
        let filled: Vec<String> = columns
            .iter()
            .map(|c| {
                if tracked.contains(c) || self.key.contains(c) {
                    ident(c)
                } else {
                    format!(
                        "last_value({c}) over (partition by {keys}, __weir_grp order by {order} \
                         rows between unbounded preceding and unbounded following) as {c}",
                        c = ident(c)
                    )
                }
            })
            .collect();
        let filled = filled.join(", ");
        // Inferred changes take the attributes of the key's first real change.
        let (source, inferred_col) = if self.inferred {
            let inf = ident(INFERRED);
            let first = format!(
                "partition by {keys} order by case when {inf} then 1 else 0 end, {order} \
                 rows between unbounded preceding and unbounded following"
            );
            let cols: Vec<String> = columns
                .iter()
                .map(|c| {
                    if self.key.contains(c) {
                        ident(c)
                    } else {
                        format!(
                            "case when {inf} then first_value({c}) over ({first}) else {c} end as {c}",
                            c = ident(c)
                        )
                    }
                })
                .collect();
            (
                format!(
                    "(select {}, {ts}, {seq}, {del}, \
                       coalesce({inf}, false) and bool_and(coalesce({inf}, false)) over (partition by {keys}) as is_inferred \
                     from {changes})",
                    cols.join(", "),
                    seq = ident(SEQ),
                ),
                ", is_inferred",
            )
        } else {
            (changes.to_string(), "")
        };
        Ok(format!(
            "with hashed as (\
               select {cols}{inferred_col}, {ts}, {seq}, coalesce({del}, false) as {del}, {hash} as __weir_hash \
               from {source}), \
             walked as (\
               select *, case when {del} then lag({del}) over w = false \
                 else lag({del}) over w is null or lag({del}) over w or lag(__weir_hash) over w <> __weir_hash end \
                 as __weir_effective \
               from hashed window w as (partition by {keys} order by {order})), \
             grouped as (\
               select *, sum(case when __weir_effective then 1 else 0 end) over (partition by {keys} order by {order} \
                 rows between unbounded preceding and current row) as __weir_grp from walked), \
             filled as (\
               select {filled}{inferred_col}, {ts}, {seq}, {del}, __weir_hash, __weir_effective from grouped), \
             effective as (\
               select *, lead({ts}) over w as __weir_next from filled where __weir_effective \
               window w as (partition by {keys} order by {order})) \
             select {cols}{inferred_col}, {ts} as valid_from, __weir_next as valid_to, \
               __weir_next is null as is_current, \
               cast(row_number() over (partition by {keys} order by {order}) as bigint) as version, \
               __weir_hash as row_hash{marker} \
             from effective {rows}",
            seq = ident(SEQ),
            hash = hash_expr_typed(&tracked, &self.binary),
        ))
    }

    /// The history of every key in `changes` (see [`Scd2::history_sql`]).
    pub async fn history(
        &self,
        ctx: &SessionContext,
        changes: DataFrame,
    ) -> Result<DataFrame, Error> {
        let internal = [TS, SEQ, DELETED, INFERRED];
        let columns: Vec<String> = changes
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| !internal.contains(&n.as_str()))
            .collect();
        for c in [TS, SEQ] {
            if changes.schema().field_with_unqualified_name(c).is_err() {
                return Err(Error::internal(format!("changes without `{c}`")));
            }
        }
        let changes = if changes
            .schema()
            .field_with_unqualified_name(DELETED)
            .is_err()
        {
            changes
                .with_column(DELETED, datafusion::prelude::lit(false))
                .map_err(|e| Error::internal(format!("changes: {e}")))?
        } else {
            changes
        };
        let inferred = changes
            .schema()
            .field_with_unqualified_name(INFERRED)
            .is_ok();
        let binary: Vec<String> = changes
            .schema()
            .fields()
            .iter()
            .filter(|f| {
                matches!(
                    f.data_type(),
                    arrow::datatypes::DataType::Binary
                        | arrow::datatypes::DataType::LargeBinary
                        | arrow::datatypes::DataType::BinaryView
                )
            })
            .map(|f| f.name().clone())
            .collect();
        let name = "__weir_scd_history_input";
        let _ = ctx.deregister_table(name);
        ctx.register_table(name, changes.into_view())
            .map_err(|e| Error::internal(format!("changes: {e}")))?;
        let sql = Scd2 {
            inferred,
            binary,
            ..self.clone()
        }
        .history_sql(name, &columns)?;
        ctx.sql(&sql)
            .await
            .map_err(|e| Error::user(format!("building the history: {e}")))
    }
}

pub mod apply;

#[cfg(test)]
mod tests;
