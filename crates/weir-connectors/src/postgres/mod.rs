//! The `postgres` source: a table or a query, read through binary COPY into Arrow.
//!
//! - **plan** connects, describes the columns (types, modifiers, NOT NULL), maps each to
//!   Arrow (an unmapped type is an error naming the column, or text when the pipeline says
//!   `unsupported_types: text`), and, for a `cursor`, fixes the range to read:
//!   `committed - lookback < cursor <= max(cursor) now`. The upper bound is the position
//!   committed with the data, so a retried or crashed run reads the same rows again and
//!   the next run starts exactly where this one ended.
//! - **read** runs `COPY (SELECT ...) TO STDOUT (FORMAT binary)`, one connection per key
//!   range when `partitions` > 1, and decodes the stream as it arrives: memory stays
//!   bounded whatever the table size.

mod binary;
pub mod cdc;
pub mod conn;
pub mod encode;
pub mod sink;
pub mod types;

use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_postgres::Client;
use weir_common::Error;
use weir_config::{ConnectionConfig, Lookback, SourceConfig, UnsupportedTypes};
use weir_core::{BadRow, Position, Progress, ReadPlan, Source, SourceEvent};

pub use conn::{connect, quote_ident, quote_literal};
use types::Kind;

/// The committed position of a cursor read.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CursorPosition {
    /// The highest cursor value loaded, as PostgreSQL prints it.
    pub cursor: Option<String>,
}

/// One column as read: its name, how it decodes, and the select expression.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    kind: Kind,
    select: String,
    /// The source column's type as PostgreSQL spells it.
    pg_type: String,
}

pub struct PostgresSource {
    config: SourceConfig,
    conn_name: String,
    conn: ConnectionConfig,
    /// What the last `plan` decided to read.
    planned: std::sync::Mutex<Option<Extract>>,
}

impl PostgresSource {
    pub fn new(config: SourceConfig, conn_name: &str, conn: ConnectionConfig) -> Self {
        Self {
            config,
            conn_name: conn_name.to_string(),
            conn,
            planned: std::sync::Mutex::new(None),
        }
    }

    /// What is read: the table, or the query as a subquery.
    fn relation(&self) -> String {
        match (&self.config.table, &self.config.query) {
            (Some(t), _) => quote_ident(t),
            (None, Some(q)) => format!("({}) as weir_q", q.trim().trim_end_matches(';')),
            (None, None) => "(select 1) as weir_q".into(),
        }
    }

    /// A short name for messages and bad-row sources.
    fn label(&self) -> String {
        match (&self.config.table, &self.config.query) {
            (Some(t), _) => format!("postgres:{}/{t}", self.conn_name),
            _ => format!("postgres:{}/query", self.conn_name),
        }
    }

    async fn client(&self) -> Result<Client, Error> {
        connect(&self.conn_name, &self.conn).await
    }

    fn err<'a>(&'a self, doing: &'a str) -> impl Fn(tokio_postgres::Error) -> Error + 'a {
        move |e| conn::classify(&self.conn_name, doing, e)
    }

    /// The columns of the relation, mapped to Arrow.
    async fn describe(&self, client: &Client) -> Result<Vec<(Column, bool)>, Error> {
        let stmt = client
            .prepare(&format!("select * from {} limit 0", self.relation()))
            .await
            .map_err(self.err("describing the source"))?;
        let mut out = Vec::new();
        for c in stmt.columns() {
            let name = crate::files::normalize_column_name(c.name());
            let quoted = quote_ident(c.name());
            let not_null = match (c.table_oid(), c.column_id()) {
                (Some(t), Some(a)) if t != 0 => client
                    .query_opt(
                        "select attnotnull from pg_attribute where attrelid = $1 and attnum = $2",
                        &[&t, &a],
                    )
                    .await
                    .map_err(self.err("describing the source"))?
                    .map(|r| r.get::<_, bool>(0))
                    .unwrap_or(false),
                _ => false,
            };
            // The exact type name (varchar(20), numeric without a modifier...), recorded
            // with the field so a PostgreSQL sink can recreate the column as it was.
            let pg_type: String = client
                .query_one(
                    "select format_type($1, nullif($2, -1))",
                    &[&c.type_().oid(), &c.type_modifier()],
                )
                .await
                .map_err(self.err("describing the source"))?
                .get(0);
            let column = match Kind::of(c.type_().oid(), c.type_modifier()) {
                Some(kind) => Column {
                    name,
                    kind,
                    select: quoted,
                    pg_type,
                },
                None if self.config.unsupported_types == UnsupportedTypes::Text => Column {
                    name,
                    kind: Kind::Text,
                    select: format!("{quoted}::text"),
                    pg_type,
                },
                None => {
                    return Err(Error::user(format!(
                        "column `{}` of {} has type `{}`, which weir does not map",
                        c.name(),
                        self.label(),
                        c.type_().name()
                    ))
                    .with_hint(
                        "set `unsupported_types: text` on the source to read it as text, or cast it in a `query:`",
                    ))
                }
            };
            out.push((column, not_null));
        }
        Ok(out)
    }

    /// The cursor column's select expression and PostgreSQL type.
    fn cursor_type(&self, columns: &[(Column, bool)]) -> Result<Option<(String, Kind)>, Error> {
        let Some(cursor) = &self.config.cursor else {
            return Ok(None);
        };
        let norm = crate::files::normalize_column_name(cursor);
        let Some((c, _)) = columns.iter().find(|(c, _)| c.name == norm) else {
            return Err(Error::user(format!(
                "cursor column `{cursor}` is not in {}",
                self.label()
            ))
            .with_hint(format!(
                "columns: {}",
                columns
                    .iter()
                    .map(|(c, _)| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        match c.kind {
            Kind::Int2
            | Kind::Int4
            | Kind::Int8
            | Kind::Numeric { .. }
            | Kind::Date
            | Kind::Timestamp
            | Kind::TimestampTz
            | Kind::Text => Ok(Some((c.select.clone(), c.kind.clone()))),
            _ => Err(Error::user(format!(
                "cursor column `{cursor}` has type {}, which cannot order loads",
                c.kind.pg_name()
            ))
            .with_hint("use an increasing integer, timestamp or date column")),
        }
    }

    /// `cursor > lower - lookback` as SQL.
    fn lower_bound(&self, cursor: &str, kind: &Kind, lower: &str) -> Result<String, Error> {
        let typ = kind.pg_name();
        let value = format!("{}::{typ}", quote_literal(lower));
        let value = match (&self.config.lookback, kind) {
            (None, _) => value,
            (Some(Lookback::Duration(d)), Kind::Timestamp | Kind::TimestampTz | Kind::Date) => {
                format!(
                    "({value} - interval {})",
                    quote_literal(&format!("{} microseconds", d.as_micros()))
                )
            }
            (
                Some(Lookback::Amount(n)),
                Kind::Int2 | Kind::Int4 | Kind::Int8 | Kind::Numeric { .. },
            ) => {
                format!("({value} - {n})")
            }
            (Some(_), _) => {
                return Err(Error::user(format!(
                    "`lookback` does not fit the {typ} cursor `{cursor}`"
                ))
                .with_hint("a duration (`10m`) for time cursors, a number for numeric ones"))
            }
        };
        Ok(format!("{cursor} > {value}"))
    }

    /// Splits `column` into up to `n` ranges, as SQL predicates.
    async fn ranges(
        &self,
        client: &Client,
        filter: &str,
        columns: &[(Column, bool)],
    ) -> Result<Vec<String>, Error> {
        let n = self.config.partitions.unwrap_or(1).max(1) as i64;
        if n == 1 {
            return Ok(vec!["true".into()]);
        }
        let column = match &self.config.partition_column {
            Some(c) => c.clone(),
            None => self.primary_key(client).await?,
        };
        let norm = crate::files::normalize_column_name(&column);
        let Some((c, _)) = columns.iter().find(|(c, _)| c.name == norm) else {
            return Err(Error::user(format!(
                "partition column `{column}` is not in {}",
                self.label()
            )));
        };
        if !matches!(c.kind, Kind::Int2 | Kind::Int4 | Kind::Int8) {
            return Err(Error::user(format!(
                "partition column `{column}` must be an integer, not {}",
                c.kind.pg_name()
            ))
            .with_hint("name an integer key with `partition_column:`"));
        }
        let sql = format!(
            "select min({0})::bigint, max({0})::bigint from {1} where {filter}",
            c.select,
            self.relation()
        );
        let row = client
            .query_one(&sql, &[])
            .await
            .map_err(self.err("finding key ranges"))?;
        let (Some(lo), Some(hi)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1))
        else {
            return Ok(vec!["true".into()]);
        };
        let span = (hi as i128 - lo as i128 + 1).max(1);
        let step = ((span + n as i128 - 1) / n as i128).max(1);
        let mut out = Vec::new();
        let mut start = lo as i128;
        while start <= hi as i128 {
            let end = (start + step - 1).min(hi as i128);
            out.push(format!("{0} between {start} and {end}", c.select));
            start = end + 1;
        }
        // Rows with a NULL key belong to no range: read them with the first.
        if let Some(first) = out.first_mut() {
            *first = format!("({first} or {} is null)", c.select);
        }
        Ok(out)
    }

    async fn primary_key(&self, client: &Client) -> Result<String, Error> {
        let Some(table) = &self.config.table else {
            return Err(Error::user(
                "`partitions` over a query needs `partition_column`",
            ));
        };
        let rows = client
            .query(
                "select a.attname::text from pg_index i join pg_attribute a \
                 on a.attrelid = i.indrelid and a.attnum = any(i.indkey) \
                 where i.indrelid = $1::text::regclass and i.indisprimary",
                &[&quote_ident(table)],
            )
            .await
            .map_err(self.err("finding the primary key"))?;
        match rows.as_slice() {
            [one] => Ok(one.get(0)),
            _ => Err(Error::user(format!(
                "{} has no single-column primary key to split into partitions",
                self.label()
            ))
            .with_hint("name an integer column with `partition_column:`")),
        }
    }
}

/// What `plan` decided beyond the generic [`ReadPlan`]: the select list, the column
/// kinds and one filter per range.
#[derive(Debug, Clone)]
struct Extract {
    select: Vec<String>,
    kinds: Vec<Kind>,
    ranges: Vec<String>,
}

#[async_trait]
impl Source for PostgresSource {
    async fn plan(&self, from: Option<&Position>) -> Result<ReadPlan, Error> {
        let client = self.client().await?;
        let columns = self.describe(&client).await?;
        let fields: Vec<_> = columns
            .iter()
            .map(|(c, not_null)| c.kind.field(&c.name, !not_null, &c.pg_type))
            .collect();
        let schema: SchemaRef = Arc::new(Schema::new(fields));

        let mut filters = vec!["true".to_string()];
        let mut next = CursorPosition::default();
        let mut unit = self.label();
        if let Some((cursor, kind)) = self.cursor_type(&columns)? {
            let lower: Option<String> = from
                .map(|p| serde_json::from_value::<CursorPosition>(p.0.clone()))
                .transpose()
                .map_err(|e| Error::internal(format!("unreadable cursor position: {e}")))?
                .and_then(|p| p.cursor);
            let upper: Option<String> = client
                .query_one(
                    &format!("select max({cursor})::text from {}", self.relation()),
                    &[],
                )
                .await
                .map_err(self.err("reading the cursor's high mark"))?
                .get(0);
            let Some(upper) = upper else {
                // An empty source: nothing to read, the position stays.
                return Ok(ReadPlan {
                    units: vec![],
                    next: Position(
                        serde_json::to_value(CursorPosition { cursor: lower }).unwrap_or_default(),
                    ),
                    schema,
                });
            };
            if lower.as_deref() == Some(upper.as_str()) && self.config.lookback.is_none() {
                return Ok(ReadPlan {
                    units: vec![],
                    next: Position(
                        serde_json::to_value(CursorPosition { cursor: lower }).unwrap_or_default(),
                    ),
                    schema,
                });
            }
            let typ = kind.pg_name();
            filters.push(format!("{cursor} <= {}::{typ}", quote_literal(&upper)));
            if let Some(lower) = &lower {
                filters.push(self.lower_bound(&cursor, &kind, lower)?);
                unit = format!(
                    "{unit} ({} > {lower}, <= {upper})",
                    self.config.cursor.clone().unwrap_or_default()
                );
            } else {
                unit = format!("{unit} (<= {upper})");
            }
            next.cursor = Some(upper);
        }
        let filter = filters.join(" and ");
        let ranges = self.ranges(&client, &filter, &columns).await?;
        let extract = Extract {
            select: columns.iter().map(|(c, _)| c.select.clone()).collect(),
            kinds: columns.iter().map(|(c, _)| c.kind.clone()).collect(),
            ranges: ranges.iter().map(|r| format!("{filter} and {r}")).collect(),
        };
        if let Ok(mut p) = self.planned.lock() {
            *p = Some(extract);
        }
        Ok(ReadPlan {
            units: vec![unit],
            next: Position(serde_json::to_value(&next).unwrap_or_default()),
            schema,
        })
    }

    async fn read(
        &self,
        plan: &ReadPlan,
        out: mpsc::Sender<SourceEvent>,
        progress: Arc<Progress>,
    ) -> Result<(), Error> {
        let planned = self.planned.lock().ok().and_then(|p| p.clone());
        let Some(extract) = planned else {
            return Err(Error::internal("postgres source read before plan"));
        };
        if plan.units.is_empty() {
            return Ok(());
        }
        let kinds = extract.kinds.clone();
        let select = extract.select.join(", ");
        let mut tasks = Vec::new();
        for (i, range) in extract.ranges.iter().enumerate() {
            let sql = format!(
                "copy (select {select} from {} where {range}) to stdout (format binary)",
                self.relation()
            );
            let source = if extract.ranges.len() > 1 {
                format!("{} [range {}]", self.label(), i + 1)
            } else {
                self.label()
            };
            tasks.push(copy_out(
                self,
                sql,
                plan.schema.clone(),
                kinds.clone(),
                source,
                out.clone(),
                progress.clone(),
            ));
        }
        let results = futures::future::join_all(tasks).await;
        results.into_iter().collect::<Result<Vec<()>, Error>>()?;
        Ok(())
    }
}

/// Streams one COPY into batches.
async fn copy_out(
    src: &PostgresSource,
    sql: String,
    schema: SchemaRef,
    kinds: Vec<Kind>,
    label: String,
    out: mpsc::Sender<SourceEvent>,
    progress: Arc<Progress>,
) -> Result<(), Error> {
    let client = src.client().await?;
    let stream = client
        .copy_out(sql.as_str())
        .await
        .map_err(src.err("starting COPY"))?;
    futures::pin_mut!(stream);
    let mut dec = binary::CopyDecoder::new(schema, kinds);
    let batch_rows = src.config.batch_rows.max(1);
    let closed = || Error::external("the sink stopped while reading").not_retryable();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(src.err("reading COPY data"))?;
        progress.add(0, chunk.len() as u64);
        dec.feed(&chunk)
            .map_err(|e| Error::internal(format!("{label}: decoding COPY data: {e}")))?;
        if dec.pending_rows() >= batch_rows || dec.rejected.len() >= batch_rows {
            flush(&mut dec, &label, &out, &progress)
                .await
                .map_err(|_| closed())?;
        }
    }
    if !dec.is_done() {
        return Err(Error::external(format!(
            "{label}: the COPY stream ended early"
        )));
    }
    flush(&mut dec, &label, &out, &progress)
        .await
        .map_err(|_| closed())
}

async fn flush(
    dec: &mut binary::CopyDecoder,
    label: &str,
    out: &mpsc::Sender<SourceEvent>,
    progress: &Progress,
) -> Result<(), ()> {
    let bad: Vec<BadRow> = dec
        .rejected
        .drain(..)
        .map(|(row, reason, raw)| BadRow {
            reason,
            source: label.to_string(),
            line: row,
            raw,
        })
        .collect();
    let rows = dec.pending_rows();
    if rows > 0 {
        let batch = dec.take_batch().map_err(|_| ())?;
        progress.add(rows as u64, 0);
        out.send(SourceEvent::Batch(batch)).await.map_err(|_| ())?;
    }
    if !bad.is_empty() {
        progress.add(bad.len() as u64, 0);
        out.send(SourceEvent::Bad(bad)).await.map_err(|_| ())?;
    }
    Ok(())
}
