//! Encoding Arrow batches as PostgreSQL binary COPY, for loading through a staging table.
//!
//! Each Arrow type travels as its natural PostgreSQL "wire" type ([`wire_type`]); the
//! staging table has those types, and the final `INSERT ... SELECT` casts them to the
//! target's own column types (text to interval or uuid, for instance), so PostgreSQL
//! does every conversion with its own rules.

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BinaryViewArray, BooleanArray, Date32Array,
    Decimal128Array, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array, Int8Array,
    LargeBinaryArray, LargeStringArray, StringArray, StringViewArray, TimestampMicrosecondArray,
    TimestampMillisecondArray, TimestampNanosecondArray, TimestampSecondArray, UInt16Array,
    UInt32Array, UInt8Array,
};
use arrow::datatypes::{DataType, Field, TimeUnit};
use arrow::record_batch::RecordBatch;

const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
const PG_EPOCH_DAYS: i32 = 10_957;

/// The binary COPY header.
pub fn header() -> Vec<u8> {
    let mut v = b"PGCOPY\n\xff\r\n\0".to_vec();
    v.extend(0i32.to_be_bytes());
    v.extend(0i32.to_be_bytes());
    v
}

/// The binary COPY trailer.
pub fn trailer() -> Vec<u8> {
    (-1i16).to_be_bytes().to_vec()
}

/// The PostgreSQL type an Arrow type is sent as; None when it has none.
pub fn wire_type(dt: &DataType) -> Option<String> {
    Some(match dt {
        DataType::Boolean => "boolean".into(),
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => "smallint".into(),
        DataType::Int32 | DataType::UInt16 => "integer".into(),
        DataType::Int64 | DataType::UInt32 => "bigint".into(),
        DataType::Float32 => "real".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Decimal128(p, s) if *s >= 0 => format!("numeric({p},{s})"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "bytea".into(),
        DataType::Date32 => "date".into(),
        DataType::Timestamp(_, None) => "timestamp".into(),
        DataType::Timestamp(_, Some(_)) => "timestamptz".into(),
        DataType::List(f) | DataType::LargeList(f) => {
            let inner = wire_type(f.data_type())?;
            if matches!(f.data_type(), DataType::List(_) | DataType::LargeList(_)) {
                return None;
            }
            format!("{inner}[]")
        }
        _ => return None,
    })
}

/// The column type for a new target table: the PostgreSQL type recorded when the data came
/// from PostgreSQL, else the wire type.
pub fn column_type(f: &Field) -> Option<String> {
    f.metadata()
        .get(super::types::PG_TYPE_KEY)
        .cloned()
        .or_else(|| wire_type(f.data_type()))
}

/// The element type OID of a wire type, for array headers.
fn element_oid(dt: &DataType) -> u32 {
    match dt {
        DataType::Boolean => 16,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => 21,
        DataType::Int32 | DataType::UInt16 => 23,
        DataType::Int64 | DataType::UInt32 => 20,
        DataType::Float32 => 700,
        DataType::Float64 => 701,
        DataType::Decimal128(..) => 1700,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => 17,
        DataType::Date32 => 1082,
        DataType::Timestamp(_, None) => 1114,
        DataType::Timestamp(_, Some(_)) => 1184,
        _ => 25,
    }
}

/// Appends every row of `batch` to `out`.
pub fn encode_batch(batch: &RecordBatch, out: &mut Vec<u8>) -> Result<(), String> {
    let n = batch.num_columns() as i16;
    for row in 0..batch.num_rows() {
        out.extend(n.to_be_bytes());
        for col in batch.columns() {
            encode_value(col, row, out)?;
        }
    }
    Ok(())
}

/// Writes one value with its length prefix (-1 for NULL).
fn encode_value(col: &ArrayRef, row: usize, out: &mut Vec<u8>) -> Result<(), String> {
    if col.is_null(row) {
        out.extend((-1i32).to_be_bytes());
        return Ok(());
    }
    let len_at = out.len();
    out.extend(0i32.to_be_bytes());
    let start = out.len();
    write_value(col, row, out)?;
    let len = (out.len() - start) as i32;
    out[len_at..start].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

fn micros(unit: &TimeUnit, v: i64) -> Result<i64, String> {
    match unit {
        TimeUnit::Second => v.checked_mul(1_000_000),
        TimeUnit::Millisecond => v.checked_mul(1_000),
        TimeUnit::Microsecond => Some(v),
        TimeUnit::Nanosecond => Some(v.div_euclid(1_000)),
    }
    .and_then(|us| us.checked_sub(PG_EPOCH_MICROS))
    .ok_or_else(|| "timestamp out of range".to_string())
}

/// Writes the value itself, in the wire type's binary format.
fn write_value(col: &ArrayRef, row: usize, out: &mut Vec<u8>) -> Result<(), String> {
    macro_rules! prim {
        ($ty:ty, $conv:expr) => {{
            let v = col
                .as_any()
                .downcast_ref::<$ty>()
                .ok_or("array type")?
                .value(row);
            out.extend(($conv)(v).to_be_bytes());
        }};
    }
    match col.data_type() {
        DataType::Boolean => {
            let v = col
                .as_any()
                .downcast_ref::<BooleanArray>()
                .ok_or("array type")?
                .value(row);
            out.push(v as u8);
        }
        DataType::Int8 => prim!(Int8Array, |v: i8| v as i16),
        DataType::UInt8 => prim!(UInt8Array, |v: u8| v as i16),
        DataType::Int16 => prim!(Int16Array, |v: i16| v),
        DataType::UInt16 => prim!(UInt16Array, |v: u16| v as i32),
        DataType::Int32 => prim!(Int32Array, |v: i32| v),
        DataType::UInt32 => prim!(UInt32Array, |v: u32| v as i64),
        DataType::Int64 => prim!(Int64Array, |v: i64| v),
        DataType::Float32 => prim!(Float32Array, |v: f32| v.to_bits()),
        DataType::Float64 => prim!(Float64Array, |v: f64| v.to_bits()),
        DataType::Date32 => {
            let v = col
                .as_any()
                .downcast_ref::<Date32Array>()
                .ok_or("array type")?
                .value(row);
            out.extend((v - PG_EPOCH_DAYS).to_be_bytes());
        }
        DataType::Timestamp(unit, _) => {
            let v = match unit {
                TimeUnit::Second => col
                    .as_any()
                    .downcast_ref::<TimestampSecondArray>()
                    .map(|a| a.value(row)),
                TimeUnit::Millisecond => col
                    .as_any()
                    .downcast_ref::<TimestampMillisecondArray>()
                    .map(|a| a.value(row)),
                TimeUnit::Microsecond => col
                    .as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .map(|a| a.value(row)),
                TimeUnit::Nanosecond => col
                    .as_any()
                    .downcast_ref::<TimestampNanosecondArray>()
                    .map(|a| a.value(row)),
            }
            .ok_or("array type")?;
            out.extend(micros(unit, v)?.to_be_bytes());
        }
        DataType::Decimal128(_, scale) => {
            let a = col
                .as_any()
                .downcast_ref::<Decimal128Array>()
                .ok_or("array type")?;
            write_numeric(a.value(row), *scale, out);
        }
        DataType::Utf8 => out.extend(
            col.as_any()
                .downcast_ref::<StringArray>()
                .ok_or("array type")?
                .value(row)
                .as_bytes(),
        ),
        DataType::LargeUtf8 => out.extend(
            col.as_any()
                .downcast_ref::<LargeStringArray>()
                .ok_or("array type")?
                .value(row)
                .as_bytes(),
        ),
        DataType::Utf8View => out.extend(
            col.as_any()
                .downcast_ref::<StringViewArray>()
                .ok_or("array type")?
                .value(row)
                .as_bytes(),
        ),
        DataType::Binary => out.extend(
            col.as_any()
                .downcast_ref::<BinaryArray>()
                .ok_or("array type")?
                .value(row),
        ),
        DataType::LargeBinary => out.extend(
            col.as_any()
                .downcast_ref::<LargeBinaryArray>()
                .ok_or("array type")?
                .value(row),
        ),
        DataType::BinaryView => out.extend(
            col.as_any()
                .downcast_ref::<BinaryViewArray>()
                .ok_or("array type")?
                .value(row),
        ),
        DataType::List(f) | DataType::LargeList(f) => {
            let items: ArrayRef = match col.data_type() {
                DataType::List(_) => col.as_list::<i32>().value(row),
                _ => col.as_list::<i64>().value(row),
            };
            out.extend(1i32.to_be_bytes());
            out.extend(((items.null_count() > 0) as i32).to_be_bytes());
            out.extend(element_oid(f.data_type()).to_be_bytes());
            out.extend((items.len() as i32).to_be_bytes());
            out.extend(1i32.to_be_bytes());
            for i in 0..items.len() {
                encode_value(&items, i, out)?;
            }
        }
        other => return Err(format!("type {other} has no PostgreSQL counterpart")),
    }
    Ok(())
}

/// A scaled integer (`v / 10^scale`) in numeric's binary format: base-10000 digits.
fn write_numeric(v: i128, scale: i8, out: &mut Vec<u8>) {
    let neg = v < 0;
    let mag = v.unsigned_abs();
    let scale = scale.max(0) as u32;
    // Split into integer and fraction parts, then into base-10000 groups.
    let pow = 10u128.pow(scale);
    let (mut int, frac) = (mag / pow, mag % pow);
    let mut int_groups = Vec::new();
    while int > 0 {
        int_groups.push((int % 10_000) as i16);
        int /= 10_000;
    }
    int_groups.reverse();
    // The fraction padded to a multiple of 4 digits.
    let frac_digits = scale.div_ceil(4) * 4;
    let mut frac_val = frac * 10u128.pow(frac_digits - scale);
    let mut frac_groups = vec![0i16; (frac_digits / 4) as usize];
    for g in frac_groups.iter_mut().rev() {
        *g = (frac_val % 10_000) as i16;
        frac_val /= 10_000;
    }
    let mut weight = int_groups.len() as i16 - 1;
    let mut digits: Vec<i16> = int_groups.into_iter().chain(frac_groups).collect();
    // Strip leading zero groups (adjusting the weight) and trailing ones.
    while digits.first() == Some(&0) {
        digits.remove(0);
        weight -= 1;
    }
    while digits.last() == Some(&0) {
        digits.pop();
    }
    if digits.is_empty() {
        weight = 0;
    }
    out.extend((digits.len() as i16).to_be_bytes());
    out.extend(weight.to_be_bytes());
    out.extend(
        (if neg && !digits.is_empty() {
            0x4000u16
        } else {
            0
        })
        .to_be_bytes(),
    );
    out.extend((scale as u16).to_be_bytes());
    for d in digits {
        out.extend(d.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numerics_round_trip_through_the_decoder() {
        for (v, p, s) in [
            (1_234_567i128, 12u8, 2i8),
            (-5, 10, 4),
            (0, 10, 2),
            (10_000_000, 12, 0),
            (1, 38, 18),
            (-123_456_789_012_345_678_901_234_567, 38, 9),
        ] {
            let mut out = Vec::new();
            write_numeric(v, s, &mut out);
            assert_eq!(
                super::super::binary::numeric(&out, p, s),
                Ok(v),
                "{v} ({p},{s})"
            );
        }
    }
}
