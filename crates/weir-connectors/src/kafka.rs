//! Kafka: client settings and the decoding of records into Arrow.
//!
//! A record becomes a row: the fields of its JSON object (or its value as text, with
//! `format: raw`) and four columns about the record itself: `_kafka_partition`,
//! `_kafka_offset`, `_kafka_timestamp` and `_kafka_key`. A record that is not a JSON
//! object, or whose field does not fit the column's type, is a bad row with the reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use rdkafka::ClientConfig;
use weir_common::Error;
use weir_config::{KafkaSourceConfig, PayloadFormat, StartAt};
use weir_core::BadRow;

/// The columns every row carries about its record.
pub const META_COLUMNS: [&str; 5] = [
    "_kafka_partition",
    "_kafka_offset",
    "_kafka_timestamp",
    "_kafka_key",
    "_kafka_headers",
];

/// One record as read from the broker.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch (the record's timestamp).
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Header names and values, in order (a name can repeat).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// A consumer's context: librdkafka's errors are kept, so a failed request can say why
/// (a TLS handshake, an authentication), and a failing connection, retried every few
/// milliseconds, logs each of its errors once, not at every retry.
#[derive(Default)]
pub struct Recorder {
    /// The errors logged so far (without their timings), and the last telling one.
    seen: std::sync::Mutex<(std::collections::HashSet<String>, Option<String>)>,
}

impl Recorder {
    /// The last error librdkafka reported (other than "all brokers are down").
    pub fn last_error(&self) -> Option<String> {
        self.seen.lock().ok().and_then(|s| s.1.clone())
    }
}

impl rdkafka::ClientContext for Recorder {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        // Connection failures come again through `error`.
        if fac == "FAIL" {
            tracing::debug!(target: "librdkafka", "{fac}: {message}");
            return;
        }
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "{fac}: {message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", "{fac}: {message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", "{fac}: {message}"),
            L::Debug => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // "... (after 3ms in state SSL_HANDSHAKE)": the same error, whatever the timing.
        let kind = format!(
            "{error}: {}",
            reason.split(" (after ").next().unwrap_or(reason)
        );
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if seen.0.len() > 1_000 {
            seen.0.clear();
        }
        if seen.0.insert(kind) {
            tracing::warn!(target: "librdkafka", "{error}: {reason}");
        }
        let down =
            error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown);
        if !down {
            seen.1 = Some(reason.to_string());
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Recorder {}

/// Consumer settings: the source's, then weir's own (no automatic offset commits: weir
/// commits offsets itself after the table commit).
pub fn consumer_config(src: &KafkaSourceConfig, group: &str, buffer_bytes: u64) -> ClientConfig {
    let mut c = ClientConfig::new();
    // librdkafka's prefetch queue is bounded like weir's own buffer (its default is 64 MiB
    // per partition), so memory stays bounded whatever the backlog.
    let kib = (buffer_bytes / 1024).clamp(1024, 2 << 20);
    c.set("queued.max.messages.kbytes", kib.to_string());
    for (k, v) in &src.options {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &src.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "auto.offset.reset",
            match src.start {
                StartAt::Earliest => "earliest",
                StartAt::Latest => "latest",
            },
        );
    c
}

/// Records decoded into rows.
#[derive(Debug)]
pub struct Decoded {
    pub batch: RecordBatch,
    /// Records that are not a JSON object.
    pub malformed: Vec<BadRow>,
    /// Objects with a field that does not fit its column's type.
    pub misfits: Vec<BadRow>,
}

/// Rows from `records`, and the records that could not become rows.
///
/// Fields keep the types the table already has (`known`); new fields get the types their
/// values suggest, and the writer adds them as columns.
pub fn decode(
    records: &[Record],
    format: PayloadFormat,
    topic: &str,
    known: Option<&SchemaRef>,
    avro: Option<&crate::avro::AvroSchemas>,
) -> Result<Decoded, Error> {
    let source = |r: &Record| format!("kafka://{topic}/{}", r.partition);
    let mut bad = Vec::new();
    let mut misfits = Vec::new();
    let (good, payload): (Vec<&Record>, Vec<(Field, ArrayRef)>) = match format {
        PayloadFormat::Raw => {
            let values: StringArray = records
                .iter()
                .map(|r| r.value.as_deref().map(String::from_utf8_lossy))
                .collect();
            (
                records.iter().collect(),
                vec![(Field::new("value", DataType::Utf8, true), Arc::new(values))],
            )
        }
        PayloadFormat::Avro => {
            let schemas =
                avro.ok_or_else(|| Error::internal("Avro records without their schemas"))?;
            let values: Vec<&[u8]> = records
                .iter()
                .map(|r| r.value.as_deref().unwrap_or_default())
                .collect();
            let (verdicts, rows) = schemas.decode(&values)?;
            let mut good = Vec::with_capacity(records.len());
            for (r, v) in records.iter().zip(verdicts) {
                match v {
                    None => good.push(r),
                    Some(reason) => bad.push(bad_row(r, &reason, source(r))),
                }
            }
            let rows = conform(rows, known)?;
            let columns = rows
                .schema()
                .fields()
                .iter()
                .zip(rows.columns())
                .map(|(f, c)| (f.as_ref().clone(), c.clone()))
                .collect();
            (good, columns)
        }
        PayloadFormat::Json => {
            let mut good = Vec::new();
            let mut objects = Vec::new();
            for r in records {
                let raw = r.value.as_deref().unwrap_or_default();
                match serde_json::from_slice::<serde_json::Value>(raw) {
                    Ok(v @ serde_json::Value::Object(_)) => {
                        good.push(r);
                        objects.push(v);
                    }
                    Ok(_) => bad.push(bad_row(r, "the value is JSON but not an object", source(r))),
                    Err(e) => bad.push(bad_row(
                        r,
                        &format!("the value is not JSON: {e}"),
                        source(r),
                    )),
                }
            }
            let schema = json_schema(&objects, known)?;
            let (kept, rows) = decode_json(&objects, &schema);
            let mut kept_records = Vec::with_capacity(good.len());
            for (i, r) in good.into_iter().enumerate() {
                match &kept[i] {
                    None => kept_records.push(r),
                    Some(reason) => misfits.push(bad_row(r, reason, source(r))),
                }
            }
            let columns = schema
                .fields()
                .iter()
                .zip(rows.columns())
                .map(|(f, c)| (f.as_ref().clone(), c.clone()))
                .collect();
            (kept_records, columns)
        }
    };
    let mut fields: Vec<Field> = payload.iter().map(|(f, _)| f.clone()).collect();
    let mut columns: Vec<ArrayRef> = payload.into_iter().map(|(_, c)| c).collect();
    fields.extend(meta_fields());
    columns.extend(meta_columns(&good)?);
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| Error::internal(format!("building rows from `{topic}`: {e}")))?;
    Ok(Decoded {
        batch,
        malformed: bad,
        misfits,
    })
}

/// Avro rows in the types of `known` where it has the column (a cast; a value that does not
/// cast is an error naming the column), other columns as they are.
fn conform(rows: RecordBatch, known: Option<&SchemaRef>) -> Result<RecordBatch, Error> {
    let Some(known) = known else {
        return Ok(rows);
    };
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (f, c) in rows.schema().fields().iter().zip(rows.columns()) {
        match known.field_with_name(f.name()) {
            Ok(k) if k.data_type() != f.data_type() => {
                let cast = arrow::compute::cast(c, k.data_type()).map_err(|e| {
                    Error::user(format!(
                        "Avro field `{}` ({}) does not fit column type {}: {e}",
                        f.name(),
                        f.data_type(),
                        k.data_type()
                    ))
                })?;
                fields.push(Field::new(f.name(), k.data_type().clone(), true));
                columns.push(cast);
            }
            _ => {
                fields.push(f.as_ref().clone());
                columns.push(c.clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| Error::internal(format!("Avro rows: {e}")))
}

/// The declared fields of a stream's records (`source.columns`), as the known schema for
/// [`decode`].
pub fn declared_schema(columns: &[weir_config::ColumnSpec]) -> Result<SchemaRef, Error> {
    let mut fields = Vec::with_capacity(columns.len());
    for c in columns {
        let t = crate::types::parse_type(&c.data_type)
            .map_err(|e| e.context(format!("source.columns `{}`", c.name)))?;
        if META_COLUMNS.contains(&c.name.as_str()) {
            return Err(Error::user(format!(
                "source.columns: `{}` is a column every record has already",
                c.name
            )));
        }
        fields.push(Field::new(&c.name, t, true));
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// The values of the record's own columns.
fn meta_columns(good: &[&Record]) -> Result<Vec<ArrayRef>, Error> {
    Ok(vec![
        Arc::new(Int32Array::from_iter_values(
            good.iter().map(|r| r.partition),
        )),
        Arc::new(Int64Array::from_iter_values(good.iter().map(|r| r.offset))),
        Arc::new(
            TimestampMillisecondArray::from(good.iter().map(|r| r.timestamp).collect::<Vec<_>>())
                .with_timezone("UTC"),
        ),
        Arc::new(
            good.iter()
                .map(|r| r.key.as_deref().map(String::from_utf8_lossy))
                .collect::<StringArray>(),
        ),
        headers_column(good)?,
    ])
}

/// The columns about the record every row has.
fn meta_fields() -> [Field; 5] {
    [
        Field::new(META_COLUMNS[0], DataType::Int32, false),
        Field::new(META_COLUMNS[1], DataType::Int64, false),
        Field::new(
            META_COLUMNS[2],
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        Field::new(META_COLUMNS[3], DataType::Utf8, true),
        Field::new(META_COLUMNS[4], headers_type(), false),
    ]
}

/// The rows of a stream whose records' fields are `payload`: those, then the record's own
/// columns.
pub fn source_schema(payload: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = payload
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.extend(meta_fields());
    Arc::new(Schema::new(fields))
}

/// JSON records whose fields are declared (`declared`: the payload's columns): rows with
/// exactly those columns and the record's own; other fields are left out. All records are
/// decoded in one pass from their bytes; only when that fails are they taken one by one,
/// to set the bad ones aside with their reasons (as [`decode`] does).
pub fn decode_declared(
    records: &[Record],
    topic: &str,
    declared: &SchemaRef,
) -> Result<Decoded, Error> {
    let fast = || -> Result<RecordBatch, String> {
        let mut d = arrow::json::ReaderBuilder::new(declared.clone())
            .with_batch_size(records.len().max(1))
            .build_decoder()
            .map_err(|e| e.to_string())?;
        for (i, r) in records.iter().enumerate() {
            let v = r.value.as_deref().unwrap_or_default();
            // One whole object per record: anything else would shift the records after it.
            if v.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
                return Err("not an object".into());
            }
            let n = d.decode(v).map_err(|e| e.to_string())?;
            if n != v.len() || d.has_partial_record() || d.len() != i + 1 {
                return Err("not one whole object".into());
            }
        }
        let batch = d
            .flush()
            .map_err(|e| e.to_string())?
            .unwrap_or_else(|| RecordBatch::new_empty(declared.clone()));
        match batch.num_rows() == records.len() {
            true => Ok(batch),
            false => Err(format!(
                "{} records gave {} rows",
                records.len(),
                batch.num_rows()
            )),
        }
    };
    let Ok(payload) = fast() else {
        return decode(records, PayloadFormat::Json, topic, Some(declared), None);
    };
    let good: Vec<&Record> = records.iter().collect();
    let mut columns = payload.columns().to_vec();
    columns.extend(meta_columns(&good)?);
    let batch = RecordBatch::try_new(source_schema(declared), columns)
        .map_err(|e| Error::internal(format!("building rows from `{topic}`: {e}")))?;
    Ok(Decoded {
        batch,
        malformed: Vec::new(),
        misfits: Vec::new(),
    })
}

/// `_kafka_headers`: a map from header name to value (text; invalid UTF-8 replaced).
fn headers_type() -> DataType {
    let entries = Field::new(
        "key_value",
        DataType::Struct(
            vec![
                Field::new("key", DataType::Utf8, false),
                Field::new("value", DataType::Utf8, true),
            ]
            .into(),
        ),
        false,
    );
    DataType::Map(Arc::new(entries), false)
}

fn headers_column(records: &[&Record]) -> Result<ArrayRef, Error> {
    use arrow::array::{MapBuilder, MapFieldNames, StringBuilder};
    let names = MapFieldNames {
        entry: "key_value".into(),
        key: "key".into(),
        value: "value".into(),
    };
    let mut b = MapBuilder::new(Some(names), StringBuilder::new(), StringBuilder::new())
        .with_values_field(Field::new("value", DataType::Utf8, true));
    for r in records {
        for (k, v) in &r.headers {
            b.keys().append_value(k);
            b.values()
                .append_option(v.as_deref().map(String::from_utf8_lossy));
        }
        b.append(true)
            .map_err(|e| Error::internal(format!("record headers: {e}")))?;
    }
    Ok(Arc::new(b.finish()))
}

/// A record set aside: the reason, `kafka://topic/partition`, its offset and its value.
pub fn bad_row(r: &Record, reason: &str, source: String) -> BadRow {
    BadRow {
        reason: reason.to_string(),
        source,
        line: r.offset as u64,
        raw: String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned(),
    }
}

/// The payload columns: the table's (without the record columns), then new fields in
/// the order first seen, typed from their values.
fn json_schema(objects: &[serde_json::Value], known: Option<&SchemaRef>) -> Result<Schema, Error> {
    let inferred = arrow::json::reader::infer_json_schema_from_iterator(
        objects
            .iter()
            .map(|v| Ok::<_, arrow::error::ArrowError>(v.clone())),
    )
    .map_err(|e| Error::internal(format!("inferring the records' schema: {e}")))?;
    let mut fields: Vec<Field> = Vec::new();
    let mut seen: BTreeMap<String, ()> = BTreeMap::new();
    if let Some(known) = known {
        for f in known.fields() {
            if !META_COLUMNS.contains(&f.name().as_str()) {
                seen.insert(f.name().clone(), ());
                fields.push(f.as_ref().clone().with_nullable(true));
            }
        }
    }
    for f in inferred.fields() {
        if !seen.contains_key(f.name()) && !META_COLUMNS.contains(&f.name().as_str()) {
            seen.insert(f.name().clone(), ());
            fields.push(f.as_ref().clone().with_nullable(true));
        }
    }
    Ok(Schema::new(fields))
}

/// Decodes the objects with `schema`; per object, `None` if it was kept or the reason it
/// was not. Objects are decoded together, and one by one only when that fails, to find
/// the ones that do not fit.
fn decode_json(
    objects: &[serde_json::Value],
    schema: &Schema,
) -> (Vec<Option<String>>, RecordBatch) {
    let schema = Arc::new(schema.clone());
    let all = |objs: &[&serde_json::Value]| -> Result<RecordBatch, String> {
        let mut d = arrow::json::ReaderBuilder::new(schema.clone())
            .with_batch_size(objs.len().max(1))
            .build_decoder()
            .map_err(|e| e.to_string())?;
        d.serialize(objs).map_err(|e| e.to_string())?;
        Ok(d.flush()
            .map_err(|e| e.to_string())?
            .unwrap_or_else(|| RecordBatch::new_empty(schema.clone())))
    };
    let refs: Vec<&serde_json::Value> = objects.iter().collect();
    if let Ok(batch) = all(&refs) {
        return (vec![None; objects.len()], batch);
    }
    let mut verdicts = Vec::with_capacity(objects.len());
    let mut fitting = Vec::new();
    for o in &refs {
        match all(std::slice::from_ref(o)) {
            Ok(_) => {
                verdicts.push(None);
                fitting.push(*o);
            }
            Err(e) => verdicts.push(Some(format!("a field does not fit its column: {e}"))),
        }
    }
    let batch = all(&fitting).unwrap_or_else(|_| RecordBatch::new_empty(schema.clone()));
    (verdicts, batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: i64, value: &str) -> Record {
        Record {
            partition: 1,
            offset,
            timestamp: Some(1_700_000_000_000 + offset),
            key: Some(format!("k{offset}").into_bytes()),
            value: Some(value.as_bytes().to_vec()),
            headers: vec![("trace".into(), Some(format!("t{offset}").into_bytes()))],
        }
    }

    #[test]
    fn json_records_become_rows_and_bad_ones_are_set_aside_with_reasons() {
        let records = vec![
            rec(10, r#"{"id": 1, "name": "a"}"#),
            rec(11, "not json"),
            rec(12, r#"[1, 2]"#),
            rec(13, r#"{"id": 2, "extra": true}"#),
        ];
        let d = decode(&records, PayloadFormat::Json, "events", None, None).unwrap();
        let (batch, bad) = (d.batch, d.malformed);
        assert!(d.misfits.is_empty());
        assert_eq!(batch.num_rows(), 2);
        let names: Vec<&str> = batch
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(
            names,
            [
                "id",
                "name",
                "extra",
                "_kafka_partition",
                "_kafka_offset",
                "_kafka_timestamp",
                "_kafka_key",
                "_kafka_headers"
            ]
        );
        assert_eq!(bad.len(), 2);
        assert_eq!(bad[0].line, 11);
        assert!(bad[0].reason.contains("not JSON"), "{}", bad[0].reason);
        assert_eq!(bad[0].raw, "not json");
        assert_eq!(bad[0].source, "kafka://events/1");
        assert!(bad[1].reason.contains("not an object"), "{}", bad[1].reason);
        let offsets = batch
            .column(4)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(offsets.values(), &[10, 13]);
    }

    #[test]
    fn known_columns_keep_their_types_and_misfits_are_bad_rows() {
        let known: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("_kafka_offset", DataType::Int64, false),
        ]));
        let records = vec![
            rec(1, r#"{"id": 5}"#),
            rec(2, r#"{"id": "five"}"#),
            rec(3, r#"{"id": 7}"#),
        ];
        let d = decode(&records, PayloadFormat::Json, "t", Some(&known), None).unwrap();
        let (batch, bad) = (d.batch, d.misfits);
        assert!(d.malformed.is_empty());
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema_ref().field(0).data_type(), &DataType::Int64);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].line, 2);
        assert!(bad[0].reason.contains("does not fit"), "{}", bad[0].reason);
    }

    #[test]
    fn raw_records_keep_the_value_as_text() {
        let d = decode(&[rec(1, "hello")], PayloadFormat::Raw, "t", None, None).unwrap();
        let (batch, bad) = (d.batch, d.malformed);
        assert!(bad.is_empty());
        let v = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(v.value(0), "hello");
        let k = batch
            .column(4)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(k.value(0), "k1");
    }

    #[test]
    fn declared_fields_decode_in_one_pass_and_bad_records_fall_back_one_by_one() {
        let declared: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
        ]));
        let good = vec![
            rec(1, r#"{"id": 1, "name": "a", "other": [1]}"#),
            rec(2, r#" {"name": "b"}"#),
        ];
        let d = decode_declared(&good, "t", &declared).unwrap();
        assert_eq!(d.batch.num_rows(), 2);
        assert_eq!(d.batch.num_columns(), 2 + META_COLUMNS.len());
        assert!(d.batch.column(0).is_null(1));
        let mut mixed = good.clone();
        mixed.push(rec(3, r#"{"id": "x"}"#));
        mixed.push(rec(4, "[1]"));
        mixed.push(rec(5, r#"{"id": 5}{"id": 6}"#));
        let d = decode_declared(&mixed, "t", &declared).unwrap();
        assert_eq!(d.batch.num_rows(), 2);
        assert_eq!(d.misfits.len(), 1);
        assert_eq!(d.misfits[0].line, 3);
        assert_eq!(d.malformed.len(), 2, "{:?}", d.malformed);
    }
}
