//! SQL type names used in declared schemas, mapped to Arrow types.

use arrow::datatypes::{DataType, TimeUnit};
use weir_common::Error;

/// Parses a declared type such as `bigint`, `decimal(12,2)` or `timestamptz`.
pub fn parse_type(text: &str) -> Result<DataType, Error> {
    let t = text.trim().to_ascii_lowercase();
    let dt = match t.as_str() {
        "string" | "text" | "varchar" | "utf8" => DataType::Utf8,
        "bigint" | "int64" | "long" => DataType::Int64,
        "int" | "integer" | "int32" => DataType::Int32,
        "smallint" | "int16" => DataType::Int16,
        "double" | "float64" | "float8" => DataType::Float64,
        "float" | "real" | "float32" | "float4" => DataType::Float32,
        "boolean" | "bool" => DataType::Boolean,
        "date" => DataType::Date32,
        "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, None),
        "timestamptz" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        _ => {
            if let Some(args) = t.strip_prefix("decimal(").and_then(|r| r.strip_suffix(')')) {
                let parts: Vec<&str> = args.split(',').map(str::trim).collect();
                let (p, s) = match parts.as_slice() {
                    [p] => (p.parse().ok(), Some(0)),
                    [p, s] => (p.parse().ok(), s.parse().ok()),
                    _ => (None, None),
                };
                match (p, s) {
                    (Some(p), Some(s)) if (1..=38).contains(&p) && s <= p as i8 => DataType::Decimal128(p, s),
                    _ => {
                        return Err(Error::user(format!("invalid decimal type `{text}`"))
                            .with_hint("write `decimal(precision, scale)` with precision 1..38, e.g. `decimal(12,2)`"))
                    }
                }
            } else {
                return Err(Error::user(format!("unknown column type `{text}`")).with_hint(
                    "valid types: string, bigint, int, smallint, double, float, decimal(p,s), boolean, date, timestamp, timestamptz",
                ));
            }
        }
    };
    Ok(dt)
}

/// The SQL name of an Arrow type, for messages.
pub fn type_name(dt: &DataType) -> String {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Int32 => "int".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Float64 => "double".into(),
        DataType::Float32 => "float".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Date32 => "date".into(),
        DataType::Timestamp(_, None) => "timestamp".into(),
        DataType::Timestamp(_, Some(_)) => "timestamptz".into(),
        DataType::Decimal128(p, s) => format!("decimal({p},{s})"),
        other => other.to_string().to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_types() {
        assert_eq!(parse_type("BIGINT").unwrap(), DataType::Int64);
        assert_eq!(
            parse_type("decimal(12, 2)").unwrap(),
            DataType::Decimal128(12, 2)
        );
        assert!(parse_type("decimal(40,2)").is_err());
        let err = parse_type("bigintt").unwrap_err();
        assert!(err.hint.unwrap().contains("bigint"));
    }
}
