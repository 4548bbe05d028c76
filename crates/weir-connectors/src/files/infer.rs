//! Settling one schema for a run from declared columns, the target table and samples.

use arrow::array::{Array, StringArray};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

/// What was sampled from one file.
pub struct Sample {
    pub columns: Vec<(String, SampleType)>,
}

pub enum SampleType {
    /// Text values to infer from (CSV, NDJSON).
    Strings(StringArray),
    /// A type the file declares itself (Parquet).
    Typed(DataType),
}

/// Candidate types in order of preference; the first that parses every non-null value wins.
fn candidates() -> [DataType; 5] {
    [
        DataType::Int64,
        DataType::Float64,
        DataType::Boolean,
        DataType::Date32,
        DataType::Timestamp(TimeUnit::Microsecond, None),
    ]
}

/// The narrowest type all non-null values parse as; None when every value is null.
pub fn infer_type(values: &StringArray) -> Option<DataType> {
    if values.null_count() == values.len() {
        return None;
    }
    let opts = CastOptions {
        safe: true,
        ..Default::default()
    };
    // Arrow casts `2024-01-05 10:00:00` to a date by dropping the time: only plain
    // `YYYY-MM-DD` values may infer as dates.
    let date_like = values.iter().flatten().all(|v| v.len() <= 10);
    for dt in candidates() {
        if dt == DataType::Date32 && !date_like {
            continue;
        }
        if let Ok(out) = cast_with_options(values, &dt, &opts) {
            if out.null_count() == values.null_count() {
                return Some(dt);
            }
        }
    }
    Some(DataType::Utf8)
}

/// The type that holds values of both `a` and `b`.
pub fn unify(a: &DataType, b: &DataType) -> DataType {
    use DataType::*;
    match (a, b) {
        _ if a == b => a.clone(),
        (Int64, Float64) | (Float64, Int64) => Float64,
        (Int32 | Int16, Int64) | (Int64, Int32 | Int16) => Int64,
        (Date32, Timestamp(u, tz)) | (Timestamp(u, tz), Date32) => Timestamp(*u, tz.clone()),
        _ => Utf8,
    }
}

/// One schema for the run. Column order: first appearance in the samples, then declared
/// columns no file had. Types: declared, else the table's, else inferred and unified.
pub fn settle_schema(declared: &[Field], table: Option<&Schema>, samples: &[Sample]) -> Schema {
    let mut names: Vec<String> = Vec::new();
    for s in samples {
        for (n, _) in &s.columns {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    for f in declared {
        if !names.contains(f.name()) {
            names.push(f.name().clone());
        }
    }
    let fields = names
        .iter()
        .map(|name| {
            if let Some(f) = declared.iter().find(|f| f.name() == name) {
                return f.clone();
            }
            if let Some(f) = table.and_then(|t| t.field_with_name(name).ok()) {
                return Field::new(name, f.data_type().clone(), true);
            }
            let mut ty: Option<DataType> = None;
            for s in samples {
                for (n, st) in &s.columns {
                    if n != name {
                        continue;
                    }
                    let found = match st {
                        SampleType::Strings(v) => infer_type(v),
                        SampleType::Typed(t) => Some(t.clone()),
                    };
                    if let Some(found) = found {
                        ty = Some(match ty {
                            None => found,
                            Some(prev) => unify(&prev, &found),
                        });
                    }
                }
            }
            Field::new(name, ty.unwrap_or(DataType::Utf8), true)
        })
        .collect::<Vec<_>>();
    Schema::new(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[Option<&str>]) -> StringArray {
        StringArray::from(v.to_vec())
    }

    #[test]
    fn infers_narrowest() {
        assert_eq!(
            infer_type(&s(&[Some("1"), None, Some("-3")])),
            Some(DataType::Int64)
        );
        assert_eq!(
            infer_type(&s(&[Some("1"), Some("2.5")])),
            Some(DataType::Float64)
        );
        assert_eq!(
            infer_type(&s(&[Some("true"), Some("false")])),
            Some(DataType::Boolean)
        );
        assert_eq!(
            infer_type(&s(&[Some("2024-01-05")])),
            Some(DataType::Date32)
        );
        assert_eq!(
            infer_type(&s(&[Some("2024-01-05 10:00:00")])),
            Some(DataType::Timestamp(TimeUnit::Microsecond, None))
        );
        assert_eq!(
            infer_type(&s(&[Some("1"), Some("x")])),
            Some(DataType::Utf8)
        );
        assert_eq!(infer_type(&s(&[None])), None);
    }

    #[test]
    fn declared_and_table_types_win() {
        let samples = vec![Sample {
            columns: vec![
                ("a".into(), SampleType::Strings(s(&[Some("1")]))),
                ("b".into(), SampleType::Strings(s(&[Some("1")]))),
                ("c".into(), SampleType::Strings(s(&[Some("1")]))),
            ],
        }];
        let declared = vec![Field::new("a", DataType::Utf8, false)];
        let table = Schema::new(vec![Field::new("b", DataType::Float64, true)]);
        let out = settle_schema(&declared, Some(&table), &samples);
        assert_eq!(out.field(0).data_type(), &DataType::Utf8);
        assert!(!out.field(0).is_nullable());
        assert_eq!(out.field(1).data_type(), &DataType::Float64);
        assert_eq!(out.field(2).data_type(), &DataType::Int64);
    }
}
