//! Change data capture from PostgreSQL's logical replication: a publication, a `pgoutput`
//! slot, and the decoding of its messages (protocol version 1).
//!
//! Changes are read with `pg_logical_slot_peek_binary_changes`, which leaves the slot where
//! it is; the slot moves on (`pg_replication_slot_advance`) only once the changes are
//! durable elsewhere, so a crash in between reads them again. This is the groundwork of
//! `type: postgres_cdc` (issue 9): the apply side (mirror tables in Delta) comes next.

use std::collections::HashMap;

use tokio_postgres::Client;
use weir_common::Error;

/// A column of a published table, as its Relation message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    pub name: String,
    /// Part of the replica identity (the primary key, by default).
    pub key: bool,
    pub type_oid: u32,
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
                b't' | b'b' => {
                    let len = self.u32("value length")? as usize;
                    let v = self.take(len, "value")?;
                    Value::Text(String::from_utf8_lossy(v).into_owned())
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
                let _modifier = r.u32("type modifier")?;
                columns.push(RelColumn {
                    name,
                    key: flags & 1 == 1,
                    type_oid,
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
    let pg = |what: &str| {
        let what = what.to_string();
        move |e: tokio_postgres::Error| Error::external(format!("{what}: {e}"))
    };
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(pg("reading publications"))?
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
            .map_err(pg("creating the publication"))?;
    }
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg("reading replication slots"))?;
    let lsn: String = match row {
        Some(r) => r.get(0),
        None => client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .map_err(pg("creating the replication slot"))?
            .get(0),
    };
    parse_lsn(&lsn)
}

/// Up to `limit` changes after the slot's position, with the LSN each message is at; the
/// slot does not move.
pub async fn peek(
    client: &Client,
    slot: &str,
    publication: &str,
    limit: i32,
) -> Result<Vec<(u64, Message)>, Error> {
    let rows = client
        .query(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
             'proto_version', '1', 'publication_names', $3)",
            &[&slot, &limit, &publication],
        )
        .await
        .map_err(|e| Error::external(format!("reading changes from slot `{slot}`: {e}")))?;
    rows.iter()
        .map(|r| {
            let lsn: String = r.get(0);
            let data: Vec<u8> = r.get(1);
            Ok((parse_lsn(&lsn)?, decode(&data)?))
        })
        .collect()
}

/// Moves the slot to `lsn` (the end of a transaction that is durable elsewhere): PostgreSQL
/// may then recycle the WAL before it.
pub async fn advance(client: &Client, slot: &str, lsn: u64) -> Result<(), Error> {
    client
        .query_one(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)::text",
            &[&slot, &format_lsn(lsn)],
        )
        .await
        .map_err(|e| Error::external(format!("advancing slot `{slot}`: {e}")))?;
    Ok(())
}

/// Relations seen so far, by id (a Relation message precedes the first change of a table
/// in each session, and again after its schema changes).
#[derive(Debug, Default)]
pub struct Relations(pub HashMap<u32, Relation>);

impl Relations {
    /// Notes a Relation message; other messages are left alone.
    pub fn note(&mut self, m: &Message) {
        if let Message::Relation(r) = m {
            self.0.insert(r.id, r.clone());
        }
    }
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
