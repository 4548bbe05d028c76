//! Decoding PostgreSQL's binary COPY format straight into Arrow columns.
//!
//! The stream is a signature and header, then one tuple per row (a 16-bit field count, then
//! per field a 32-bit length, -1 for NULL, and the value in the type's binary send format),
//! then a trailer of field count -1. A row is decoded whole before anything is appended, so
//! a value that does not fit its column (a numeric beyond the decimal's scale, an infinite
//! timestamp, a multi-dimensional array) rejects the row, never half of it.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder,
    Float32Builder, Float64Builder, Int16Builder, Int32Builder, Int64Builder, ListBuilder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use super::types::Kind;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days between 1970-01-01 and 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;

/// A decoded value, borrowing from the input where it can.
#[derive(Debug, Clone, PartialEq)]
enum Value<'a> {
    Null,
    Bool(bool),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Dec(i128),
    Str(&'a str),
    String(String),
    Bin(&'a [u8]),
    Date(i32),
    Micros(i64),
    List(Vec<Value<'a>>),
}

/// Where the decoder is in the stream.
#[derive(Debug, PartialEq)]
enum State {
    Header,
    Tuples,
    Done,
}

/// Turns binary COPY bytes into batches of `kinds`; rows that cannot be represented are
/// returned with the reason.
pub struct CopyDecoder {
    kinds: Vec<Kind>,
    schema: SchemaRef,
    cols: Vec<Box<dyn ArrayBuilder>>,
    rows: usize,
    state: State,
    buf: Vec<u8>,
    /// Rows rejected since the last batch: (row number in this stream, reason, raw text).
    pub rejected: Vec<(u64, String, String)>,
    /// Rows seen in this stream (good and rejected).
    pub seen: u64,
    /// Keep a row whose value cannot be represented, with that value null (the row is
    /// still listed in `rejected`, with the reason), instead of rejecting it.
    pub null_bad_values: bool,
}

impl CopyDecoder {
    pub fn new(schema: SchemaRef, kinds: Vec<Kind>) -> Self {
        let cols = schema
            .fields()
            .iter()
            .map(|f| arrow::array::make_builder(f.data_type(), 1024))
            .collect();
        Self {
            kinds,
            schema,
            cols,
            rows: 0,
            state: State::Header,
            buf: Vec::new(),
            rejected: Vec::new(),
            seen: 0,
            null_bad_values: false,
        }
    }

    /// Rows decoded and not yet taken.
    pub fn pending_rows(&self) -> usize {
        self.rows
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds the next piece of the stream; decodes every whole tuple in it.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        if self.state == State::Header {
            if self.buf.len() < SIGNATURE.len() + 8 {
                return Ok(());
            }
            if &self.buf[..SIGNATURE.len()] != SIGNATURE {
                return Err("not a binary COPY stream".into());
            }
            let ext = be_i32(&self.buf[SIGNATURE.len() + 4..]) as usize;
            pos = SIGNATURE.len() + 8 + ext;
            if self.buf.len() < pos {
                return Ok(());
            }
            self.state = State::Tuples;
        }
        let buf = std::mem::take(&mut self.buf);
        let result = self.tuples(&buf, &mut pos);
        self.buf = buf;
        self.buf.drain(..pos);
        result
    }

    fn tuples(&mut self, buf: &[u8], pos: &mut usize) -> Result<(), String> {
        let n = self.kinds.len();
        let mut spans: Vec<Option<(usize, usize)>> = Vec::with_capacity(n);
        while self.state == State::Tuples && buf.len() >= *pos + 2 {
            let count = be_i16(&buf[*pos..]);
            if count == -1 {
                self.state = State::Done;
                *pos += 2;
                break;
            }
            if count as usize != n {
                return Err(format!("a row has {count} fields, expected {n}"));
            }
            // Find the whole tuple first; stop if it is not all here yet.
            let mut p = *pos + 2;
            spans.clear();
            let mut whole = true;
            for _ in 0..n {
                if buf.len() < p + 4 {
                    whole = false;
                    break;
                }
                let len = be_i32(&buf[p..]);
                p += 4;
                if len < 0 {
                    spans.push(None);
                } else {
                    let end = p + len as usize;
                    if buf.len() < end {
                        whole = false;
                        break;
                    }
                    spans.push(Some((p, end)));
                    p = end;
                }
            }
            if !whole {
                break;
            }
            *pos = p;
            self.seen += 1;
            let mut values = Vec::with_capacity(n);
            let mut failure = None;
            let mut nulled: Option<String> = None;
            for (i, span) in spans.iter().enumerate() {
                let v = match span {
                    None => Ok(Value::Null),
                    Some((s, e)) => decode(&self.kinds[i], &buf[*s..*e]),
                };
                match v {
                    Ok(v) => values.push(v),
                    Err(reason) if self.null_bad_values => {
                        let reason = format!("column `{}`: {reason}", self.schema.field(i).name());
                        nulled = Some(match nulled {
                            Some(r) => format!("{r}; {reason}"),
                            None => reason,
                        });
                        values.push(Value::Null);
                    }
                    Err(reason) => {
                        failure = Some(format!(
                            "column `{}`: {reason}",
                            self.schema.field(i).name()
                        ));
                        break;
                    }
                }
            }
            if failure.is_none() {
                for (i, v) in values.iter().enumerate() {
                    if matches!(v, Value::Null) && !self.schema.field(i).is_nullable() {
                        failure = Some(format!(
                            "column `{}` is required but empty",
                            self.schema.field(i).name()
                        ));
                    }
                }
            }
            match failure {
                Some(reason) => {
                    let raw = raw_text(&spans, buf);
                    self.rejected.push((self.seen, reason, raw));
                }
                None => {
                    if let Some(reason) = nulled {
                        let raw = raw_text(&spans, buf);
                        self.rejected.push((self.seen, reason, raw));
                    }
                    for (col, v) in self.cols.iter_mut().zip(&values) {
                        append(col.as_mut(), v)?;
                    }
                    self.rows += 1;
                }
            }
        }
        Ok(())
    }

    /// The rows decoded so far as a batch.
    pub fn take_batch(&mut self) -> Result<RecordBatch, String> {
        let arrays: Vec<ArrayRef> = self.cols.iter_mut().map(|c| c.finish()).collect();
        self.rows = 0;
        // Builders make nullable list elements and lose metadata: restore the declared
        // fields where the data allows it.
        let fields: Vec<_> = self
            .schema
            .fields()
            .iter()
            .zip(&arrays)
            .map(|(f, a)| {
                f.as_ref()
                    .clone()
                    .with_data_type(a.data_type().clone())
                    .with_nullable(f.is_nullable() || a.null_count() > 0)
            })
            .collect();
        let schema = Arc::new(Schema::new_with_metadata(
            fields,
            self.schema.metadata().clone(),
        ));
        RecordBatch::try_new(schema, arrays).map_err(|e| e.to_string())
    }
}

/// A uuid's 16 bytes in PostgreSQL's text form.
pub fn uuid_text(v: &[u8]) -> String {
    let h: String = v.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn be_i16(b: &[u8]) -> i16 {
    i16::from_be_bytes([b[0], b[1]])
}

fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_i64(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    i64::from_be_bytes(a)
}

fn need(v: &[u8], n: usize) -> Result<(), String> {
    if v.len() == n {
        Ok(())
    } else {
        Err(format!("expected {n} bytes, got {}", v.len()))
    }
}

fn decode<'a>(kind: &Kind, v: &'a [u8]) -> Result<Value<'a>, String> {
    Ok(match kind {
        Kind::Bool => {
            need(v, 1)?;
            Value::Bool(v[0] != 0)
        }
        Kind::Int2 => {
            need(v, 2)?;
            Value::I16(be_i16(v))
        }
        Kind::Int4 => {
            need(v, 4)?;
            Value::I32(be_i32(v))
        }
        Kind::Int8 => {
            need(v, 8)?;
            Value::I64(be_i64(v))
        }
        Kind::Oid => {
            need(v, 4)?;
            Value::I64(u32::from_be_bytes([v[0], v[1], v[2], v[3]]) as i64)
        }
        Kind::Float4 => {
            need(v, 4)?;
            Value::F32(f32::from_bits(be_i32(v) as u32))
        }
        Kind::Float8 => {
            need(v, 8)?;
            Value::F64(f64::from_bits(be_i64(v) as u64))
        }
        Kind::Numeric { precision, scale } => Value::Dec(numeric(v, *precision, *scale)?),
        Kind::Text | Kind::Json => Value::Str(utf8(v)?),
        Kind::Jsonb => match v.split_first() {
            Some((1, rest)) => Value::Str(utf8(rest)?),
            _ => return Err("unknown jsonb version".into()),
        },
        Kind::Bytea => Value::Bin(v),
        Kind::Date => {
            need(v, 4)?;
            let d = be_i32(v);
            if d == i32::MAX || d == i32::MIN {
                return Err("infinite date".into());
            }
            Value::Date(d.checked_add(PG_EPOCH_DAYS).ok_or("date out of range")?)
        }
        Kind::Timestamp | Kind::TimestampTz => {
            need(v, 8)?;
            let t = be_i64(v);
            if t == i64::MAX || t == i64::MIN {
                return Err("infinite timestamp".into());
            }
            Value::Micros(
                t.checked_add(PG_EPOCH_MICROS)
                    .ok_or("timestamp out of range")?,
            )
        }
        Kind::Time => {
            need(v, 8)?;
            Value::String(time_text(be_i64(v)))
        }
        Kind::Interval => {
            need(v, 16)?;
            Value::String(interval_text(be_i64(v), be_i32(&v[8..]), be_i32(&v[12..])))
        }
        Kind::Uuid => {
            need(v, 16)?;
            Value::String(uuid_text(v))
        }
        Kind::Array(inner) => {
            if v.len() < 12 {
                return Err("truncated array".into());
            }
            let ndim = be_i32(v);
            if ndim == 0 {
                return Ok(Value::List(vec![]));
            }
            if ndim != 1 {
                return Err(format!(
                    "{ndim}-dimensional arrays are not supported (only one dimension)"
                ));
            }
            let n = be_i32(&v[12..]) as usize;
            let mut p = 20;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                if v.len() < p + 4 {
                    return Err("truncated array".into());
                }
                let len = be_i32(&v[p..]);
                p += 4;
                if len < 0 {
                    items.push(Value::Null);
                } else {
                    let end = p + len as usize;
                    if v.len() < end {
                        return Err("truncated array".into());
                    }
                    items.push(decode(inner, &v[p..end])?);
                    p = end;
                }
            }
            Value::List(items)
        }
    })
}

fn utf8(v: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(v).map_err(|_| "invalid UTF-8".to_string())
}

/// A binary numeric as an integer scaled by 10^scale, exactly, within `precision` digits.
pub(super) fn numeric(v: &[u8], precision: u8, scale: i8) -> Result<i128, String> {
    if v.len() < 8 {
        return Err("truncated numeric".into());
    }
    let ndigits = be_i16(v) as usize;
    let weight = be_i16(&v[2..]) as i32;
    let sign = u16::from_be_bytes([v[4], v[5]]);
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Err("NaN does not fit a decimal".into()),
        _ => return Err("infinity does not fit a decimal".into()),
    }
    if v.len() != 8 + 2 * ndigits {
        return Err("truncated numeric".into());
    }
    let too_big = || format!("value does not fit numeric({precision},{scale})");
    let mut acc: i128 = 0;
    for i in 0..ndigits {
        let digit = be_i16(&v[8 + 2 * i..]) as i128;
        // This group is digit * 10000^(weight - i); scaled, digit * 10^(4 * (weight - i) + scale).
        let exp = 4 * (weight - i as i32) + scale as i32;
        let term = if exp >= 0 {
            10i128
                .checked_pow(exp as u32)
                .and_then(|p| digit.checked_mul(p))
                .ok_or_else(too_big)?
        } else {
            let div = 10i128.checked_pow((-exp) as u32).unwrap_or(i128::MAX);
            if digit % div != 0 {
                return Err(format!(
                    "value has more than {scale} decimal places for numeric({precision},{scale})"
                ));
            }
            digit / div
        };
        acc = acc.checked_add(term).ok_or_else(too_big)?;
    }
    if acc >= 10i128.pow(precision as u32) {
        return Err(too_big());
    }
    Ok(if sign == 0x4000 { -acc } else { acc })
}

/// `HH:MM:SS[.ffffff]` from microseconds since midnight.
fn time_text(us: i64) -> String {
    let (s, frac) = (us / 1_000_000, us % 1_000_000);
    let base = format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
    if frac == 0 {
        base
    } else {
        format!("{base}.{frac:06}")
    }
}

/// An interval in PostgreSQL's own output syntax (`1 year 2 mons 3 days 04:05:06.5`),
/// which PostgreSQL reads back exactly.
fn interval_text(us: i64, days: i32, months: i32) -> String {
    let mut parts = Vec::new();
    let (years, mons) = (months / 12, months % 12);
    if years != 0 {
        parts.push(format!(
            "{years} year{}",
            if years.abs() == 1 { "" } else { "s" }
        ));
    }
    if mons != 0 {
        parts.push(format!(
            "{mons} mon{}",
            if mons.abs() == 1 { "" } else { "s" }
        ));
    }
    if days != 0 {
        parts.push(format!(
            "{days} day{}",
            if days.abs() == 1 { "" } else { "s" }
        ));
    }
    if us != 0 || parts.is_empty() {
        let sign = if us < 0 { "-" } else { "" };
        parts.push(format!("{sign}{}", time_text(us.unsigned_abs() as i64)));
    }
    parts.join(" ")
}

/// A rejected row as text: each field as UTF-8 when it is, else hex.
fn raw_text(spans: &[Option<(usize, usize)>], buf: &[u8]) -> String {
    spans
        .iter()
        .map(|s| match s {
            None => "NULL".to_string(),
            Some((a, b)) => match std::str::from_utf8(&buf[*a..*b]) {
                Ok(t) if t.chars().all(|c| !c.is_control()) => t.to_string(),
                _ => format!(
                    "\\x{}",
                    buf[*a..*b]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                ),
            },
        })
        .collect::<Vec<_>>()
        .join("|")
}

fn append(b: &mut dyn ArrayBuilder, v: &Value) -> Result<(), String> {
    macro_rules! put {
        ($ty:ty, $val:expr) => {{
            let b = b
                .as_any_mut()
                .downcast_mut::<$ty>()
                .ok_or("builder type mismatch")?;
            match $val {
                Some(x) => b.append_value(x),
                None => b.append_null(),
            }
        }};
    }
    let any = b.as_any();
    if any.is::<BooleanBuilder>() {
        put!(
            BooleanBuilder,
            match v {
                Value::Bool(x) => Some(*x),
                _ => None,
            }
        )
    } else if any.is::<Int16Builder>() {
        put!(
            Int16Builder,
            match v {
                Value::I16(x) => Some(*x),
                _ => None,
            }
        )
    } else if any.is::<Int32Builder>() {
        put!(
            Int32Builder,
            match v {
                Value::I32(x) => Some(*x),
                _ => None,
            }
        )
    } else if any.is::<Int64Builder>() {
        put!(
            Int64Builder,
            match v {
                Value::I64(x) => Some(*x),
                _ => None,
            }
        )
    } else if any.is::<Float32Builder>() {
        put!(
            Float32Builder,
            match v {
                Value::F32(x) => Some(*x),
                _ => None,
            }
        )
    } else if any.is::<Float64Builder>() {
        put!(
            Float64Builder,
            match v {
                Value::F64(x) => Some(*x),
                _ => None,
            }
        )
    } else if any.is::<Decimal128Builder>() {
        put!(
            Decimal128Builder,
            match v {
                Value::Dec(x) => Some(*x),
                _ => None,
            }
        )
    } else if any.is::<StringBuilder>() {
        put!(
            StringBuilder,
            match v {
                Value::Str(s) => Some(*s),
                Value::String(s) => Some(s.as_str()),
                _ => None,
            }
        )
    } else if any.is::<BinaryBuilder>() {
        put!(
            BinaryBuilder,
            match v {
                Value::Bin(x) => Some(*x),
                _ => None,
            }
        )
    } else if any.is::<Date32Builder>() {
        put!(
            Date32Builder,
            match v {
                Value::Date(x) => Some(*x),
                _ => None,
            }
        )
    } else if any.is::<TimestampMicrosecondBuilder>() {
        put!(
            TimestampMicrosecondBuilder,
            match v {
                Value::Micros(x) => Some(*x),
                _ => None,
            }
        )
    } else if any.is::<ListBuilder<Box<dyn ArrayBuilder>>>() {
        let b = b
            .as_any_mut()
            .downcast_mut::<ListBuilder<Box<dyn ArrayBuilder>>>()
            .ok_or("builder type mismatch")?;
        match v {
            Value::List(items) => {
                for item in items {
                    append(b.values().as_mut(), item)?;
                }
                b.append(true);
            }
            _ => b.append(false),
        }
    } else {
        return Err("unsupported builder".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric_bytes(ndigits: &[i16], weight: i16, neg: bool, dscale: u16) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((ndigits.len() as i16).to_be_bytes());
        v.extend(weight.to_be_bytes());
        v.extend((if neg { 0x4000u16 } else { 0 }).to_be_bytes());
        v.extend(dscale.to_be_bytes());
        for d in ndigits {
            v.extend(d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numerics_decode_exactly_or_not_at_all() {
        // 12345.67 = [1, 2345, 6700] weight 1
        let b = numeric_bytes(&[1, 2345, 6700], 1, false, 2);
        assert_eq!(numeric(&b, 12, 2), Ok(1_234_567));
        assert_eq!(numeric(&b, 12, 4), Ok(123_456_700));
        assert!(numeric(&b, 12, 1).unwrap_err().contains("decimal places"));
        assert!(numeric(&b, 5, 2).unwrap_err().contains("does not fit"));
        let neg = numeric_bytes(&[5], -1, true, 4); // -0.0005
        assert_eq!(numeric(&neg, 10, 4), Ok(-5));
        assert_eq!(numeric(&numeric_bytes(&[], 0, false, 0), 10, 2), Ok(0));
    }

    #[test]
    fn times_and_intervals_in_postgres_syntax() {
        assert_eq!(time_text(3_723_000_500), "01:02:03.000500");
        assert_eq!(time_text(0), "00:00:00");
        assert_eq!(
            interval_text(14_706_500_000, 3, 14),
            "1 year 2 mons 3 days 04:05:06.500000"
        );
        assert_eq!(interval_text(-1_000_000, 0, 0), "-00:00:01");
        assert_eq!(interval_text(0, -1, 0), "-1 day");
        assert_eq!(interval_text(0, 0, 0), "00:00:00");
    }
}
