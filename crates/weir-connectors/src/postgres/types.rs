//! PostgreSQL types and their Arrow (and so Delta) counterparts.
//!
//! Types Delta cannot hold (time, interval, uuid, json) become text in PostgreSQL's own
//! input syntax, and every field records its PostgreSQL type in the field metadata
//! (`weir.pg_type`), so that the PostgreSQL sink can recreate the original column type.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, TimeUnit};

/// Field metadata key holding the PostgreSQL type name (`numeric(12,2)`, `interval`...).
pub const PG_TYPE_KEY: &str = "weir.pg_type";

/// Precision and scale for `numeric` columns declared without them.
pub const UNCONSTRAINED_NUMERIC: (u8, i8) = (38, 18);

/// How a PostgreSQL value is decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Bool,
    Int2,
    Int4,
    Int8,
    /// `oid`: unsigned 32-bit, kept as a 64-bit integer.
    Oid,
    Float4,
    Float8,
    Numeric {
        precision: u8,
        scale: i8,
    },
    /// text, varchar, char(n), name, and anything read as text.
    Text,
    Bytea,
    Date,
    Timestamp,
    TimestampTz,
    Time,
    Interval,
    Uuid,
    Json,
    Jsonb,
    Array(Box<Kind>),
}

impl Kind {
    /// The kind of a built-in type by OID and type modifier; None when unsupported.
    pub fn of(oid: u32, typmod: i32) -> Option<Kind> {
        Some(match oid {
            16 => Kind::Bool,
            21 => Kind::Int2,
            23 => Kind::Int4,
            20 => Kind::Int8,
            26 => Kind::Oid,
            700 => Kind::Float4,
            701 => Kind::Float8,
            1700 => numeric(typmod),
            25 | 1043 | 1042 | 19 => Kind::Text,
            17 => Kind::Bytea,
            1082 => Kind::Date,
            1114 => Kind::Timestamp,
            1184 => Kind::TimestampTz,
            1083 => Kind::Time,
            1186 => Kind::Interval,
            2950 => Kind::Uuid,
            114 => Kind::Json,
            3802 => Kind::Jsonb,
            1000 => array(Kind::Bool),
            1005 => array(Kind::Int2),
            1007 => array(Kind::Int4),
            1016 => array(Kind::Int8),
            1021 => array(Kind::Float4),
            1022 => array(Kind::Float8),
            1231 => array(numeric(typmod)),
            1009 | 1015 | 1014 => array(Kind::Text),
            1182 => array(Kind::Date),
            1115 => array(Kind::Timestamp),
            1185 => array(Kind::TimestampTz),
            2951 => array(Kind::Uuid),
            3807 => array(Kind::Jsonb),
            199 => array(Kind::Json),
            _ => return None,
        })
    }

    /// The OID of the element type of an array kind, or of the kind itself.
    pub fn oid(&self) -> u32 {
        match self {
            Kind::Bool => 16,
            Kind::Int2 => 21,
            Kind::Int4 => 23,
            Kind::Int8 => 20,
            Kind::Oid => 26,
            Kind::Float4 => 700,
            Kind::Float8 => 701,
            Kind::Numeric { .. } => 1700,
            Kind::Text => 25,
            Kind::Bytea => 17,
            Kind::Date => 1082,
            Kind::Timestamp => 1114,
            Kind::TimestampTz => 1184,
            Kind::Time => 1083,
            Kind::Interval => 1186,
            Kind::Uuid => 2950,
            Kind::Json => 114,
            Kind::Jsonb => 3802,
            Kind::Array(inner) => inner.oid(),
        }
    }

    pub fn arrow_type(&self) -> DataType {
        match self {
            Kind::Bool => DataType::Boolean,
            Kind::Int2 => DataType::Int16,
            Kind::Int4 => DataType::Int32,
            Kind::Int8 | Kind::Oid => DataType::Int64,
            Kind::Float4 => DataType::Float32,
            Kind::Float8 => DataType::Float64,
            Kind::Numeric { precision, scale } => DataType::Decimal128(*precision, *scale),
            Kind::Text | Kind::Time | Kind::Interval | Kind::Uuid | Kind::Json | Kind::Jsonb => {
                DataType::Utf8
            }
            Kind::Bytea => DataType::Binary,
            Kind::Date => DataType::Date32,
            Kind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Kind::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            Kind::Array(inner) => {
                DataType::List(Arc::new(Field::new("element", inner.arrow_type(), true)))
            }
        }
    }

    /// The PostgreSQL type name, as a column definition would spell it.
    pub fn pg_name(&self) -> String {
        match self {
            Kind::Bool => "boolean".into(),
            Kind::Int2 => "smallint".into(),
            Kind::Int4 => "integer".into(),
            Kind::Int8 => "bigint".into(),
            Kind::Oid => "oid".into(),
            Kind::Float4 => "real".into(),
            Kind::Float8 => "double precision".into(),
            Kind::Numeric { precision, scale } => format!("numeric({precision},{scale})"),
            Kind::Text => "text".into(),
            Kind::Bytea => "bytea".into(),
            Kind::Date => "date".into(),
            Kind::Timestamp => "timestamp".into(),
            Kind::TimestampTz => "timestamptz".into(),
            Kind::Time => "time".into(),
            Kind::Interval => "interval".into(),
            Kind::Uuid => "uuid".into(),
            Kind::Json => "json".into(),
            Kind::Jsonb => "jsonb".into(),
            Kind::Array(inner) => format!("{}[]", inner.pg_name()),
        }
    }

    /// The Arrow field for a column of this kind, recording the source's type name.
    pub fn field(&self, name: &str, nullable: bool, pg_type: &str) -> Field {
        Field::new(name, self.arrow_type(), nullable).with_metadata(HashMap::from([(
            PG_TYPE_KEY.to_string(),
            pg_type.to_string(),
        )]))
    }
}

fn array(k: Kind) -> Kind {
    Kind::Array(Box::new(k))
}

/// `numeric(p, s)` from its type modifier (`((p << 16) | s) + 4`), or the default.
fn numeric(typmod: i32) -> Kind {
    if typmod < 4 {
        let (precision, scale) = UNCONSTRAINED_NUMERIC;
        return Kind::Numeric { precision, scale };
    }
    let m = typmod - 4;
    let precision = ((m >> 16) & 0xffff) as i64;
    let scale = (m & 0xffff) as i16 as i64;
    if (1..=38).contains(&precision) && (0..=precision).contains(&scale) {
        Kind::Numeric {
            precision: precision as u8,
            scale: scale as i8,
        }
    } else {
        let (precision, scale) = UNCONSTRAINED_NUMERIC;
        Kind::Numeric { precision, scale }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_typmods() {
        // numeric(12,2): ((12 << 16) | 2) + 4
        assert_eq!(
            Kind::of(1700, (12 << 16 | 2) + 4),
            Some(Kind::Numeric {
                precision: 12,
                scale: 2
            })
        );
        assert_eq!(
            Kind::of(1700, -1),
            Some(Kind::Numeric {
                precision: 38,
                scale: 18
            })
        );
        assert_eq!(Kind::of(1007, -1), Some(Kind::Array(Box::new(Kind::Int4))));
        assert_eq!(Kind::of(600, -1), None); // point
        assert_eq!(
            Kind::of(1231, (10 << 16 | 3) + 4).unwrap().pg_name(),
            "numeric(10,3)[]"
        );
    }
}
