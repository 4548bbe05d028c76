//! Time travel in queries: `schema.table@v3` and `schema.table@'2026-11-29 10:00'` in
//! SQL, and `--as-of` for every table a query names.
//!
//! A reference `raw.events@v3` is rewritten to the quoted name `raw."events@v3"` (quoted,
//! so SQL keeps the `@`) and that name is registered as the table at version 3. Strings,
//! quoted identifiers and comments are left alone.

use datafusion::common::TableReference;
use datafusion::prelude::SessionContext;
use weir_common::Error;
use weir_lake::{AsOf, Lake};

use crate::session::{ensure_schema, register_provider};

/// A lake table as one query reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scanned {
    /// `schema.table`.
    pub table: String,
    pub as_of: Option<AsOf>,
    /// The table's version the query reads.
    pub version: u64,
    /// Its data files at that version.
    pub files: u64,
    /// Its data files at that version, as the object-store paths a plan reads (tiered
    /// files included, wherever they are).
    pub paths: std::collections::BTreeSet<String>,
}

/// One `table@point` reference found in SQL.
#[derive(Debug, Clone, PartialEq)]
struct TravelRef {
    schema: String,
    table: String,
    as_of: AsOf,
    /// The text after `@`: part of the registered name.
    point: String,
}

impl TravelRef {
    fn registered(&self) -> TableReference {
        TableReference::partial(
            self.schema.as_str(),
            format!("{}@{}", self.table, self.point),
        )
    }
}

/// Rewrites the SQL's `table@point` references and registers those tables at their
/// points; with `as_of`, every lake table the query names is registered at that point.
/// Returns the SQL to run and, with `scans` (for `--explain`) or time travel, the lake
/// tables it reads.
pub async fn prepare(
    ctx: &SessionContext,
    lake: &Lake,
    sql: &str,
    as_of: Option<AsOf>,
    scans: bool,
) -> Result<(String, Vec<Scanned>), Error> {
    let (sql, refs) = rewrite(sql)?;
    let mut scanned = Vec::new();
    for r in &refs {
        let name = format!("{}.{}", r.schema, r.table);
        scanned.push(register_at(ctx, lake, &name, Some(r.as_of), r.registered()).await?);
    }
    if as_of.is_none() && !scans {
        // Plain references: the session opens them on first use.
        return Ok((sql, scanned));
    }
    let state = ctx.state();
    let dialect = state.config().options().sql_parser.dialect;
    let statement = state
        .sql_to_statement(&sql, &dialect)
        .map_err(|e| Error::user(format!("query failed: {e}")))?;
    let names = state
        .resolve_table_references(&statement)
        .map_err(|e| Error::user(format!("query failed: {e}")))?;
    for reference in names {
        let (Some(schema), table) = (reference.schema(), reference.table()) else {
            continue;
        };
        let name = format!("{schema}.{table}");
        let seen = scanned.iter().any(|s| s.table == name && s.as_of == as_of);
        if table.contains('@') || seen || !lake.exists(&name).await {
            continue;
        }
        let target = TableReference::partial(schema, table);
        scanned.push(register_at(ctx, lake, &name, as_of, target).await?);
    }
    Ok((sql, scanned))
}

/// Registers table `name` (at `as_of`, or its current version) as `target`.
async fn register_at(
    ctx: &SessionContext,
    lake: &Lake,
    name: &str,
    as_of: Option<AsOf>,
    target: TableReference,
) -> Result<Scanned, Error> {
    let table = match as_of {
        Some(point) => lake.open_as_of(name, point).await?,
        None => lake.open_existing(name).await?,
    };
    if let Some(schema) = target.schema() {
        ensure_schema(ctx, schema)?;
    }
    let root = table.table_url().path().trim_start_matches('/').to_string();
    let paths: std::collections::BTreeSet<String> = table
        .snapshot()
        .map(|s| {
            s.log_data()
                .iter()
                .map(|f| {
                    let p = f.path();
                    match url::Url::parse(&p) {
                        Ok(u) if p.contains("://") => u.path().trim_start_matches('/').to_string(),
                        _ => format!("{root}{p}"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let files = paths.len() as u64;
    let version = table.version().unwrap_or(0);
    register_provider(ctx, &table, name, target).await?;
    Ok(Scanned {
        table: name.to_string(),
        as_of,
        version,
        files,
        paths,
    })
}

/// Finds `schema.table@v3` / `schema.table@'time'` outside strings, quoted identifiers
/// and comments, and rewrites each to a quoted name.
fn rewrite(sql: &str) -> Result<(String, Vec<TravelRef>), Error> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = String::with_capacity(sql.len());
    let mut refs = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        // Copied verbatim: strings, quoted identifiers, comments.
        let skip_to = match (c, next) {
            ('\'', _) | ('"', _) => Some(closing(&chars, i + 1, c)),
            ('-', Some('-')) => Some(
                (i..chars.len())
                    .find(|&j| chars[j] == '\n')
                    .unwrap_or(chars.len()),
            ),
            ('/', Some('*')) => Some(
                (i + 2..chars.len().saturating_sub(1))
                    .find(|&j| chars[j] == '*' && chars[j + 1] == '/')
                    .map(|j| j + 2)
                    .unwrap_or(chars.len()),
            ),
            _ => None,
        };
        if let Some(end) = skip_to {
            out.extend(&chars[i..end]);
            i = end;
            continue;
        }
        if c != '@' {
            out.push(c);
            i += 1;
            continue;
        }
        // The name just before `@`: identifier characters and dots.
        let start = out
            .char_indices()
            .rev()
            .take_while(|(_, ch)| ch.is_alphanumeric() || *ch == '_' || *ch == '.')
            .last()
            .map(|(k, _)| k);
        let Some(start) = start else {
            out.push(c);
            i += 1;
            continue;
        };
        let name = out[start..].to_string();
        // The point just after `@`: `v12` / `12`, or a quoted time.
        let (point, end) = if chars.get(i + 1) == Some(&'\'') {
            let end = closing(&chars, i + 2, '\'');
            let text: String = chars[i + 2..end.saturating_sub(1).max(i + 2)]
                .iter()
                .collect();
            (text, end)
        } else {
            let end = (i + 1..chars.len())
                .find(|&j| !chars[j].is_alphanumeric())
                .unwrap_or(chars.len());
            (chars[i + 1..end].iter().collect::<String>(), end)
        };
        if point.is_empty() {
            // An operator (`@>`), not a time-travel reference.
            out.push(c);
            i += 1;
            continue;
        }
        let as_of = AsOf::parse(&point).map_err(|e| {
            let mut err = Error::user(format!("`{name}@{point}`: {}", e.message));
            err.hint = e.hint;
            err
        })?;
        let Some((schema, table)) = name.split_once('.') else {
            return Err(Error::user(format!(
                "`{name}@{point}`: time travel needs the table as `schema.table`"
            )));
        };
        let r = TravelRef {
            schema: schema.to_lowercase(),
            table: table.to_lowercase(),
            point: match as_of {
                AsOf::Version(v) => format!("v{v}"),
                AsOf::Time(_) => point.clone(),
            },
            as_of,
        };
        out.truncate(start);
        out.push_str(&format!("{}.\"{}@{}\"", r.schema, r.table, r.point));
        refs.push(r);
        i = end;
    }
    Ok((out, refs))
}

/// The index just past the quote closing one opened before `from` (`''` and `""` are
/// escaped quotes); the end when it is never closed.
fn closing(chars: &[char], from: usize, quote: char) -> usize {
    let mut j = from;
    while j < chars.len() {
        if chars[j] == quote {
            if chars.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    chars.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_rewritten_outside_strings_and_comments() {
        let (sql, refs) = rewrite(
            "select a.id, 'x@v1' as s, \"c@v2\" -- t.u@v3\n from raw.events@v3 a \
             join Raw.Users@'2026-11-29 10:00:00' u on a.id = u.id /* r.s@v4 */",
        )
        .unwrap();
        assert_eq!(
            sql,
            "select a.id, 'x@v1' as s, \"c@v2\" -- t.u@v3\n from raw.\"events@v3\" a \
             join raw.\"users@2026-11-29 10:00:00\" u on a.id = u.id /* r.s@v4 */"
        );
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0].as_of, AsOf::Version(3));
        assert!(matches!(refs[1].as_of, AsOf::Time(_)));
        assert_eq!(rewrite("select 1").unwrap().0, "select 1");
    }

    #[test]
    fn bad_references_say_why() {
        let err = rewrite("select * from events@v3").unwrap_err();
        assert!(err.message.contains("schema.table"), "{}", err.message);
        let err = rewrite("select * from raw.events@yesterday").unwrap_err();
        assert!(
            err.message.contains("raw.events@yesterday"),
            "{}",
            err.message
        );
    }
}
