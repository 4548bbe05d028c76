//! Change data capture from PostgreSQL's logical replication: a publication, a `pgoutput`
//! slot, and the decoding of its messages (protocol version 1).
//!
//! Changes are read with `pg_logical_slot_peek_binary_changes`, which leaves the slot where
//! it is; the slot moves on (`pg_replication_slot_advance`) only once the changes are
//! durable elsewhere, so a crash in between reads them again. The apply side (mirrors in
//! Delta) is `weir_orchestrator::cdc`.

use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use tokio_postgres::Client;
use weir_common::Error;

pub use super::binary::uuid_text;
use super::binary::CopyDecoder;
use super::types::Kind;

/// A column of a published table, as its Relation message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    pub name: String,
    /// Part of the replica identity (the primary key, by default).
    pub key: bool,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A published table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelColumn>,
}

/// One column's value in a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value the update did not change: it is not sent, and the previous row's
    /// value stands.
    Unchanged,
    /// The value in PostgreSQL's text form.
    Text(String),
    /// The value in its type's binary send format (the `binary` option), as binary COPY
    /// carries it.
    Binary(Vec<u8>),
}

/// A decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        commit_time_us: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_time_us: i64,
    },
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    Update {
        relation: u32,
        /// The old key (`K`) or old row (`O`, with REPLICA IDENTITY FULL), if sent.
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: Vec<Value>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Origin, Type and logical messages: nothing to apply.
    Other(u8),
}

/// PostgreSQL's epoch (2000-01-01) in Unix microseconds.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> Error {
        Error::internal(format!("pgoutput message cut short reading {what}"))
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Error> {
        if self.bytes.len() < n {
            return Err(self.err(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, Error> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, Error> {
        Ok(u16::from_be_bytes(
            self.take(2, what)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self, what: &str) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(
            self.take(4, what)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64, Error> {
        Ok(u64::from_be_bytes(
            self.take(8, what)?.try_into().unwrap_or_default(),
        ))
    }
    fn cstr(&mut self, what: &str) -> Result<String, Error> {
        let end = self
            .bytes
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| self.err(what))?;
        let s = String::from_utf8_lossy(&self.bytes[..end]).into_owned();
        self.bytes = &self.bytes[end + 1..];
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Value>, Error> {
        let n = self.u16("tuple width")?;
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            out.push(match self.u8("column kind")? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32("value length")? as usize;
                    let v = self.take(len, "value")?;
                    Value::Text(String::from_utf8_lossy(v).into_owned())
                }
                b'b' => {
                    let len = self.u32("value length")? as usize;
                    Value::Binary(self.take(len, "value")?.to_vec())
                }
                k => {
                    return Err(Error::internal(format!(
                        "pgoutput: unknown column kind {k}"
                    )))
                }
            });
        }
        Ok(out)
    }
}

/// Decodes one `pgoutput` message (protocol version 1).
pub fn decode(bytes: &[u8]) -> Result<Message, Error> {
    let mut r = Reader { bytes };
    let kind = r.u8("message kind")?;
    Ok(match kind {
        b'B' => Message::Begin {
            final_lsn: r.u64("final LSN")?,
            commit_time_us: r.u64("commit time")? as i64 + PG_EPOCH_US,
            xid: r.u32("xid")?,
        },
        b'C' => {
            let _flags = r.u8("flags")?;
            Message::Commit {
                commit_lsn: r.u64("commit LSN")?,
                end_lsn: r.u64("end LSN")?,
                commit_time_us: r.u64("commit time")? as i64 + PG_EPOCH_US,
            }
        }
        b'R' => {
            let id = r.u32("relation id")?;
            let schema = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.u16("column count")?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                let name = r.cstr("column name")?;
                let type_oid = r.u32("type oid")?;
                let type_modifier = r.u32("type modifier")? as i32;
                columns.push(RelColumn {
                    name,
                    key: flags & 1 == 1,
                    type_oid,
                    type_modifier,
                });
            }
            Message::Relation(Relation {
                id,
                schema,
                name,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32("relation id")?;
            let _n = r.u8("N")?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32("relation id")?;
            let mut old = None;
            let mut tag = r.u8("tuple tag")?;
            if tag == b'K' || tag == b'O' {
                old = Some(r.tuple()?);
                tag = r.u8("tuple tag")?;
            }
            if tag != b'N' {
                return Err(Error::internal(format!(
                    "pgoutput: update without a new row (tag {tag})"
                )));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32("relation id")?;
            let _tag = r.u8("tuple tag")?;
            Message::Delete {
                relation,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.u32("relation count")?;
            let _options = r.u8("options")?;
            let mut relations = Vec::with_capacity(n as usize);
            for _ in 0..n {
                relations.push(r.u32("relation id")?);
            }
            Message::Truncate { relations }
        }
        other => Message::Other(other),
    })
}

/// `0/16B3748`: an LSN as PostgreSQL writes it.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// An LSN from PostgreSQL's text form.
pub fn parse_lsn(text: &str) -> Result<u64, Error> {
    let bad = || Error::internal(format!("not an LSN: `{text}`"));
    let (hi, lo) = text.split_once('/').ok_or_else(bad)?;
    let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
    let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
    Ok((hi << 32) | lo)
}

/// Makes sure publication `publication` (for `tables`, `schema.table`) and `pgoutput` slot
/// `slot` exist; returns the slot's confirmed position.
pub async fn ensure_slot(
    client: &Client,
    publication: &str,
    slot: &str,
    tables: &[String],
) -> Result<u64, Error> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(pg_err("reading publications"))?
        .is_some();
    if !exists {
        let list = tables
            .iter()
            .map(|t| {
                t.split('.')
                    .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect::<Vec<_>>()
            .join(", ");
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION \"{}\" FOR TABLE {list}",
                publication.replace('"', "\"\"")
            ))
            .await
            .map_err(pg_err("creating the publication"))?;
    }
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg_err("reading replication slots"))?;
    let lsn: String = match row {
        Some(r) => r.get(0),
        None => client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .map_err(pg_err("creating the replication slot"))?
            .get(0),
    };
    parse_lsn(&lsn)
}

/// Up to `limit` changes after the slot's position (whole transactions: the last one is
/// finished past the limit), with the LSN each message is at; the slot does not move.
/// While another session reads the slot, this waits for it (up to 10 s).
/// Values come in their binary send format with `binary`, else as text.
pub async fn peek(
    client: &Client,
    slot: &str,
    publication: &str,
    limit: i32,
    binary: bool,
) -> Result<Vec<(u64, Message)>, Error> {
    let binary = if binary { "true" } else { "false" };
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&slot, &limit, &publication, &binary];
    let rows = while_busy(|| {
        client.query(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
             'proto_version', '1', 'publication_names', $3, 'binary', $4)",
            &params,
        )
    })
    .await
    .map_err(|e| pg_err(&format!("reading changes from slot `{slot}`"))(e))?;
    rows.iter()
        .map(|r| {
            let lsn: String = r.get(0);
            let data: Vec<u8> = r.get(1);
            Ok((parse_lsn(&lsn)?, decode(&data)?))
        })
        .collect()
}

/// Runs `f` again while the slot is busy (up to 10 s): a slot is held only while it is
/// read or moved, so another reader (`weir cdc status`, a monitoring query) makes it busy
/// for a moment.
async fn while_busy<T, F, Fut>(mut f: F) -> Result<T, tokio_postgres::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    let mut busy = 0;
    loop {
        match f().await {
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && busy < 100 =>
            {
                busy += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Moves the slot to `lsn` (the end of a transaction that is durable elsewhere): PostgreSQL
/// may then recycle the WAL before it.
pub async fn advance(client: &Client, slot: &str, lsn: u64) -> Result<(), Error> {
    let to = format_lsn(lsn);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&slot, &to];
    while_busy(|| {
        client.query_one(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)::text",
            &params,
        )
    })
    .await
    .map_err(|e| pg_err(&format!("advancing slot `{slot}`"))(e))?;
    Ok(())
}

/// A captured table's columns and key, from the catalog or a Relation message.
#[derive(Debug, Clone, PartialEq)]
pub struct TableShape {
    pub schema: String,
    pub name: String,
    pub columns: Vec<ShapeColumn>,
    /// The replica identity's columns (the primary key, or the identity index's).
    pub key: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShapeColumn {
    pub name: String,
    pub kind: Kind,
    /// The type as PostgreSQL names it (`numeric(12,2)`), recorded in the field metadata.
    pub pg_type: String,
}

impl TableShape {
    /// The Arrow schema of the mirror: every column nullable (a delete carries only the
    /// key; a column added later is empty in older rows).
    pub fn arrow_schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.columns
                .iter()
                .map(|c| c.kind.field(&c.name, true, &c.pg_type))
                .collect::<Vec<_>>(),
        ))
    }

    pub fn kinds(&self) -> Vec<Kind> {
        self.columns.iter().map(|c| c.kind.clone()).collect()
    }

    /// Positions of the key columns.
    pub fn key_positions(&self) -> Vec<usize> {
        self.key
            .iter()
            .filter_map(|k| self.columns.iter().position(|c| &c.name == k))
            .collect()
    }
}

pub fn pg_err(what: &str) -> impl Fn(tokio_postgres::Error) -> Error + '_ {
    move |e| match e.as_db_error() {
        Some(db) => Error::external(format!("{what}: {}", db.message())),
        None => Error::external(format!("{what}: {e}")),
    }
}

/// How a column of type `oid` is decoded: built-in types directly, enums as text, domains
/// as their base type. Other types are refused with a hint.
pub async fn kind_of(
    client: &Client,
    oid: u32,
    typmod: i32,
    column: &str,
    table: &str,
) -> Result<Kind, Error> {
    if let Some(k) = Kind::of(oid, typmod) {
        return Ok(k);
    }
    let row = client
        .query_opt(
            "SELECT typtype::text, typbasetype, typtypmod, format_type(oid, NULL) \
             FROM pg_type WHERE oid = $1",
            &[&oid],
        )
        .await
        .map_err(pg_err("reading column types"))?;
    let Some(row) = row else {
        return Err(Error::internal(format!(
            "type {oid} of `{table}.{column}` is unknown"
        )));
    };
    let typtype: String = row.get(0);
    let base: u32 = row.get(1);
    let base_mod: i32 = row.get(2);
    let name: String = row.get(3);
    match typtype.as_str() {
        // An enum's binary form is its label.
        "e" => Ok(Kind::Text),
        "d" => Box::pin(kind_of(client, base, if typmod >= 0 { typmod } else { base_mod }, column, table)).await,
        _ => Err(Error::user(format!(
            "column `{column}` of `{table}` has type `{name}`, which change data capture does not map"
        ))
        .with_hint("capture a table without it, or change the column to a built-in type (text, jsonb, numeric...)")),
    }
}

/// The shape of `schema.table` from the catalog: its columns and replica identity key.
/// A table without a primary key or replica identity index is refused.
pub async fn describe(client: &Client, schema: &str, table: &str) -> Result<TableShape, Error> {
    let shown = format!("{schema}.{table}");
    let rel = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n \
             ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &table],
        )
        .await
        .map_err(pg_err("reading the catalog"))?;
    let Some(rel) = rel else {
        return Err(Error::user(format!("table `{shown}` does not exist"))
            .with_hint("check `source.tables`: `schema.table`, as PostgreSQL spells it"));
    };
    let oid: u32 = rel.get(0);
    let ident: String = rel.get(1);
    let rows = client
        .query(
            "SELECT attname::text, atttypid, atttypmod, format_type(atttypid, atttypmod) \
             FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(pg_err("reading the catalog"))?;
    let mut columns = Vec::with_capacity(rows.len());
    for r in &rows {
        let name: String = r.get(0);
        let kind = kind_of(client, r.get(1), r.get(2), &name, &shown).await?;
        columns.push(ShapeColumn {
            name,
            kind,
            pg_type: r.get(3),
        });
    }
    // The replica identity: the primary key by default, or the chosen index.
    let index = match ident.as_str() {
        "i" => "i.indisreplident",
        "d" => "i.indisprimary",
        _ => "false",
    };
    let key: Vec<String> = client
        .query(
            &format!(
                "SELECT a.attname::text FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, n) \
                 JOIN pg_attribute a ON a.attnum = k.attnum \
                 WHERE i.indrelid = $1 AND a.attrelid = $1 AND {index} ORDER BY k.n"
            ),
            &[&oid],
        )
        .await
        .map_err(pg_err("reading the catalog"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if key.is_empty() {
        return Err(Error::user(format!(
            "table `{shown}` has no primary key, so its changes cannot be applied by key"
        ))
        .with_hint(format!(
            "add one (`ALTER TABLE {shown} ADD PRIMARY KEY (...)`), or name a unique index: \
             `ALTER TABLE {shown} REPLICA IDENTITY USING INDEX <index>`"
        )));
    }
    Ok(TableShape {
        schema: schema.to_string(),
        name: table.to_string(),
        columns,
        key,
    })
}

/// The shape a Relation message describes (the columns as they were when the changes
/// after it were made). Its key is the message's key columns, else `key`.
pub async fn relation_shape(
    client: &Client,
    rel: &Relation,
    key: &[String],
    known: Option<&TableShape>,
) -> Result<TableShape, Error> {
    let shown = format!("{}.{}", rel.schema, rel.name);
    let mut columns = Vec::with_capacity(rel.columns.len());
    for c in &rel.columns {
        // The catalog's type name where the column is unchanged.
        let same = known.and_then(|k| k.columns.iter().find(|k| k.name == c.name));
        let kind = kind_of(client, c.type_oid, c.type_modifier, &c.name, &shown).await?;
        let pg_type = match same {
            Some(s) if s.kind == kind => s.pg_type.clone(),
            _ => client
                .query_one(
                    "SELECT format_type($1, nullif($2, -1))",
                    &[&c.type_oid, &c.type_modifier],
                )
                .await
                .map_err(pg_err("reading column types"))?
                .get(0),
        };
        columns.push(ShapeColumn {
            name: c.name.clone(),
            kind,
            pg_type,
        });
    }
    let from_message: Vec<String> = rel
        .columns
        .iter()
        .filter(|c| c.key)
        .map(|c| c.name.clone())
        .collect();
    Ok(TableShape {
        schema: rel.schema.clone(),
        name: rel.name.clone(),
        columns,
        key: if from_message.is_empty() {
            key.to_vec()
        } else {
            from_message
        },
    })
}

/// A value a mirror cannot hold (an infinite date, a numeric past 38 digits): its row is
/// kept with the value null, and this says which row and why.
#[derive(Debug, Clone)]
pub struct BadValue {
    /// The row's index in the input.
    pub row: usize,
    pub reason: String,
    /// The row's values as text.
    pub raw: String,
}

fn bad_values(dec: &mut CopyDecoder) -> Vec<BadValue> {
    dec.rejected
        .drain(..)
        .map(|(seen, reason, raw)| BadValue {
            row: seen.saturating_sub(1) as usize,
            reason,
            raw,
        })
        .collect()
}

/// Rows of binary values as one batch of `shape`'s schema. `Null` and `Unchanged` become
/// null (the caller tracks which were unchanged); a value that cannot be represented
/// becomes null too, and is reported.
pub fn rows_to_batch(
    shape: &TableShape,
    rows: &[&[Value]],
) -> Result<(RecordBatch, Vec<BadValue>), Error> {
    let schema = shape.arrow_schema();
    let mut copy = COPY_HEADER.to_vec();
    for row in rows {
        copy.extend_from_slice(&(row.len() as i16).to_be_bytes());
        for v in row.iter() {
            match v {
                Value::Null | Value::Unchanged => copy.extend_from_slice(&(-1i32).to_be_bytes()),
                Value::Binary(b) => {
                    copy.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    copy.extend_from_slice(b);
                }
                Value::Text(_) => {
                    return Err(Error::internal("a text value in a binary change stream"))
                }
            }
        }
    }
    copy.extend_from_slice(&(-1i16).to_be_bytes());
    let mut dec = CopyDecoder::new(schema, shape.kinds());
    dec.null_bad_values = true;
    let shown = format!("{}.{}", shape.schema, shape.name);
    dec.feed(&copy)
        .map_err(|e| Error::internal(format!("decoding changes of `{shown}`: {e}")))?;
    let bad = bad_values(&mut dec);
    let batch = dec
        .take_batch()
        .map_err(|e| Error::internal(format!("decoding changes of `{shown}`: {e}")))?;
    Ok((batch, bad))
}

/// The header of a binary COPY stream (signature, flags, no extension).
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// A snapshot's visibility (`pg_current_snapshot()`) and the WAL position it was taken
/// at: a transaction committed before that position is in the snapshot's rows exactly
/// when it is visible to the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotMark {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
    pub lsn: u64,
}

impl SnapshotMark {
    /// Whether the rows read in this snapshot already hold the effects of the transaction
    /// with 32-bit id `xid` that committed at `commit_lsn`.
    pub fn sees(&self, xid: u32, commit_lsn: u64) -> bool {
        if commit_lsn >= self.lsn {
            return false;
        }
        // Widen the 32-bit id with the epoch of xmax.
        let mut full = (self.xmax & !0xffff_ffff) | xid as u64;
        if full > self.xmax {
            full = full.wrapping_sub(1 << 32);
        }
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }

    fn parse(text: &str, lsn: u64) -> Result<SnapshotMark, Error> {
        let bad = || Error::internal(format!("unreadable snapshot `{text}`"));
        let mut parts = text.split(':');
        let xmin = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let xmax = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let xip = parts
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().map_err(|_| bad()))
            .collect::<Result<Vec<u64>, Error>>()?;
        Ok(SnapshotMark {
            xmin,
            xmax,
            xip,
            lsn,
        })
    }
}

/// Starts a repeatable-read, read-only transaction on `client` and returns its snapshot.
/// Every `snapshot_chunk` until `COMMIT` reads as of that snapshot.
pub async fn begin_snapshot(client: &Client) -> Result<SnapshotMark, Error> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(pg_err("starting the snapshot"))?;
    let row = client
        .query_one(
            "SELECT pg_current_snapshot()::text, pg_current_wal_lsn()::text",
            &[],
        )
        .await
        .map_err(pg_err("starting the snapshot"))?;
    let lsn = parse_lsn(row.get(1))?;
    SnapshotMark::parse(row.get(0), lsn)
}

/// The next `limit` rows of `shape`'s table after key `after` (text values, in key
/// order), the last row's key, and the values that could not be represented (nulled). Runs in the caller's snapshot transaction.
pub async fn snapshot_chunk(
    client: &Client,
    shape: &TableShape,
    after: Option<&[String]>,
    limit: usize,
) -> Result<(RecordBatch, Option<Vec<String>>, Vec<BadValue>), Error> {
    use super::conn::{quote_ident, quote_literal};
    use futures::StreamExt;
    let table = format!(
        "{}.{}",
        quote_ident(&shape.schema),
        quote_ident(&shape.name)
    );
    let keys: Vec<String> = shape.key.iter().map(|k| quote_ident(k)).collect();
    let mut select: Vec<String> = shape.columns.iter().map(|c| quote_ident(&c.name)).collect();
    select.extend(
        keys.iter()
            .enumerate()
            .map(|(i, k)| format!("{k}::text AS \"__weir_key_{i}\"")),
    );
    let filter = match after {
        Some(vals) => {
            let typed: Vec<String> = vals
                .iter()
                .zip(&shape.key)
                .map(|(v, k)| {
                    let t = shape
                        .columns
                        .iter()
                        .find(|c| &c.name == k)
                        .map(|c| c.pg_type.clone())
                        .unwrap_or_else(|| "text".into());
                    format!("{}::{t}", quote_literal(v))
                })
                .collect();
            format!("WHERE ({}) > ({})", keys.join(", "), typed.join(", "))
        }
        None => String::new(),
    };
    let sql = format!(
        "COPY (SELECT {} FROM {table} {filter} ORDER BY {} LIMIT {limit}) TO STDOUT (FORMAT binary)",
        select.join(", "),
        keys.join(", ")
    );
    let shown = format!("{}.{}", shape.schema, shape.name);
    let stream = client
        .copy_out(sql.as_str())
        .await
        .map_err(pg_err("reading the snapshot"))?;
    futures::pin_mut!(stream);
    let mut fields: Vec<arrow::datatypes::Field> = shape
        .arrow_schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut kinds = shape.kinds();
    for k in &shape.key {
        fields.push(arrow::datatypes::Field::new(
            format!("__weir_key_{k}"),
            arrow::datatypes::DataType::Utf8,
            true,
        ));
        kinds.push(Kind::Text);
    }
    let mut dec = CopyDecoder::new(Arc::new(Schema::new(fields)), kinds);
    dec.null_bad_values = true;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(pg_err("reading the snapshot"))?;
        dec.feed(&chunk)
            .map_err(|e| Error::internal(format!("decoding the snapshot of `{shown}`: {e}")))?;
    }
    let bad = bad_values(&mut dec);
    let batch = dec
        .take_batch()
        .map_err(|e| Error::internal(format!("decoding the snapshot of `{shown}`: {e}")))?;
    let n = shape.columns.len();
    let last = (batch.num_rows() > 0).then(|| {
        (n..batch.num_columns())
            .map(|i| {
                batch
                    .column(i)
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .map(|a| a.value(batch.num_rows() - 1).to_string())
                    .unwrap_or_default()
            })
            .collect()
    });
    let data = batch
        .project(&(0..n).collect::<Vec<_>>())
        .map_err(|e| Error::internal(format!("snapshot batch: {e}")))?;
    Ok((data, last, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_round_trip_through_text() {
        assert_eq!(parse_lsn("0/16B3748").unwrap(), 0x16B3748);
        assert_eq!(parse_lsn("1/0").unwrap(), 1 << 32);
        assert_eq!(format_lsn(0x1_0000_00AB), "1/AB");
        assert!(parse_lsn("nope").is_err());
    }

    #[test]
    fn a_cut_message_is_an_error_not_a_panic() {
        assert!(decode(b"I\x00\x00").is_err());
        assert!(decode(b"").is_err());
        assert!(decode(b"R\x00\x00\x00\x01public").is_err());
    }
}
