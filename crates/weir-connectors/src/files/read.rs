//! Reading files into typed batches, with every rejected row kept as a [`BadRow`].

use std::collections::HashMap;

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBufferBuilder, StringArray, StringBuilder,
};
use arrow::compute::{cast_with_options, filter_record_batch, CastOptions};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;
use weir_common::Error;
use weir_config::{FileFormat, SourceConfig};
use weir_core::{BadRow, Progress, SourceEvent, SEQ_COLUMN};

use super::decode::{self, normalize_header, CsvRecords};
use super::infer::{Sample, SampleType};
use super::list::{FileEntry, Location};
use crate::types::type_name;

/// Samples the first `n` rows of a file for type inference.
pub async fn sample(
    file: &FileEntry,
    format: FileFormat,
    config: &SourceConfig,
    n: usize,
) -> Result<Sample, Error> {
    let file = file.clone();
    let config = config.clone();
    weir_common::blocking("reader", move || match format {
        FileFormat::Csv => sample_csv(&file, &config, n),
        FileFormat::Ndjson => sample_ndjson(&file, &config, n),
        FileFormat::Parquet => sample_parquet(&file),
    })
    .await
}

/// Reads a whole file, sending batches of the settled `schema` and bad rows into `out`.
pub async fn read_file(
    file: &FileEntry,
    format: FileFormat,
    config: &SourceConfig,
    schema: SchemaRef,
    out: mpsc::Sender<SourceEvent>,
    progress: Arc<Progress>,
    seq_base: Option<u64>,
) -> Result<(), Error> {
    let file = file.clone();
    let config = config.clone();
    weir_common::blocking("reader", move || {
        let mut sink = BatchSink {
            out,
            progress,
            seq_base,
        };
        match format {
            FileFormat::Csv => read_csv(&file, &config, schema, &mut sink),
            FileFormat::Ndjson => read_ndjson(&file, &config, schema, &mut sink),
            FileFormat::Parquet => read_parquet(&file, schema, &mut sink),
        }
    })
    .await
}

#[derive(Clone)]
struct BatchSink {
    out: mpsc::Sender<SourceEvent>,
    progress: Arc<Progress>,
    /// Set when rows carry their input order: `base + line` in [`SEQ_COLUMN`].
    seq_base: Option<u64>,
}

impl BatchSink {
    /// Sends good rows (`lines` holds the line of each) and bad ones.
    fn send(
        &mut self,
        batch: RecordBatch,
        lines: &[u64],
        bad: Vec<BadRow>,
        bytes: u64,
    ) -> Result<(), Error> {
        let batch = match self.seq_base {
            Some(base) => with_seq(batch, lines, base)?,
            None => batch,
        };
        self.progress
            .add((batch.num_rows() + bad.len()) as u64, bytes);
        let closed = || Error::external("the sink stopped while reading").not_retryable();
        // The good rows first, so a consumer counting bad rows against rows read sees the
        // whole chunk.
        if batch.num_rows() > 0 {
            self.out
                .blocking_send(SourceEvent::Batch(batch))
                .map_err(|_| closed())?;
        }
        if !bad.is_empty() {
            self.out
                .blocking_send(SourceEvent::Bad(bad))
                .map_err(|_| closed())?;
        }
        Ok(())
    }
}

/// Appends [`SEQ_COLUMN`]: `base + line` of each row.
fn with_seq(batch: RecordBatch, lines: &[u64], base: u64) -> Result<RecordBatch, Error> {
    if lines.len() != batch.num_rows() {
        return Err(Error::internal(format!(
            "{} lines for {} rows",
            lines.len(),
            batch.num_rows()
        )));
    }
    let mut fields: Vec<arrow::datatypes::FieldRef> = batch.schema().fields().to_vec();
    fields.push(Arc::new(arrow::datatypes::Field::new(
        SEQ_COLUMN,
        DataType::UInt64,
        false,
    )));
    let mut cols = batch.columns().to_vec();
    cols.push(Arc::new(arrow::array::UInt64Array::from_iter_values(
        lines.iter().map(|l| base + l),
    )));
    RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), cols)
        .map_err(|e| Error::internal(format!("sequence column: {e}")))
}

/// Rows gathered as text before the bulk cast: one builder per target column, plus each
/// row's line and raw text for quarantine.
struct TextRows {
    schema: SchemaRef,
    source: String,
    cols: Vec<StringBuilder>,
    /// Target columns that are not text (values are trimmed before the cast).
    trim: Vec<bool>,
    lines: Vec<u64>,
    raw: Vec<u8>,
    raw_ends: Vec<usize>,
    bad: Vec<BadRow>,
}

impl TextRows {
    fn new(schema: SchemaRef, source: &str) -> Self {
        let cols = schema
            .fields()
            .iter()
            .map(|_| StringBuilder::new())
            .collect();
        let trim = schema
            .fields()
            .iter()
            .map(|f| f.data_type() != &DataType::Utf8)
            .collect();
        Self {
            schema,
            source: source.to_string(),
            cols,
            trim,
            lines: Vec::new(),
            raw: Vec::new(),
            raw_ends: Vec::new(),
            bad: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.lines.len()
    }

    fn reject(&mut self, line: u64, reason: String, raw: String) {
        self.bad.push(BadRow {
            reason,
            source: self.source.clone(),
            line,
            raw,
        });
    }

    fn push_row_meta(&mut self, line: u64, raw: &[u8]) {
        self.lines.push(line);
        self.raw.extend_from_slice(raw);
        self.raw_ends.push(self.raw.len());
    }

    fn raw_of(&self, row: usize) -> String {
        let start = if row == 0 { 0 } else { self.raw_ends[row - 1] };
        let text = String::from_utf8_lossy(&self.raw[start..self.raw_ends[row]]);
        text.trim_matches(['\n', '\r']).to_string()
    }

    /// Casts the gathered text to the schema; returns the good rows and all bad rows.
    /// Also returns the line of each good row.
    fn finish(&mut self) -> Result<(RecordBatch, Vec<u64>, Vec<BadRow>), Error> {
        let n = self.len();
        let mut ok = BooleanBufferBuilder::new(n);
        ok.append_n(n, true);
        let mut reasons: HashMap<usize, String> = HashMap::new();
        let opts = CastOptions {
            safe: true,
            ..Default::default()
        };
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.cols.len());
        for (i, field) in self.schema.fields().iter().enumerate() {
            let text: StringArray = self.cols[i].finish();
            let typed: ArrayRef = if field.data_type() == &DataType::Utf8 {
                Arc::new(text.clone())
            } else {
                cast_with_options(&text, field.data_type(), &opts)
                    .map_err(|e| Error::internal(format!("cast of `{}`: {e}", field.name())))?
            };
            if typed.null_count() > text.null_count() {
                for row in 0..n {
                    if text.is_valid(row) && typed.is_null(row) && ok.get_bit(row) {
                        ok.set_bit(row, false);
                        reasons.insert(
                            row,
                            format!(
                                "column `{}`: cannot parse `{}` as {}",
                                field.name(),
                                text.value(row),
                                type_name(field.data_type())
                            ),
                        );
                    }
                }
            }
            if !field.is_nullable() && typed.null_count() > 0 {
                for row in 0..n {
                    if typed.is_null(row) && ok.get_bit(row) {
                        ok.set_bit(row, false);
                        reasons.insert(
                            row,
                            format!("column `{}` is required but empty", field.name()),
                        );
                    }
                }
            }
            arrays.push(typed);
        }
        let schema = self.schema.clone();
        let batch = RecordBatch::try_new(schema.clone(), arrays.clone())
            .or_else(|_| {
                // Required columns may hold nulls in rows about to be filtered out: build with
                // a nullable schema, filter, then restore the declared one.
                let loose = Arc::new(arrow::datatypes::Schema::new(
                    schema
                        .fields()
                        .iter()
                        .map(|f| f.as_ref().clone().with_nullable(true))
                        .collect::<Vec<_>>(),
                ));
                RecordBatch::try_new(loose, arrays.clone())
            })
            .map_err(|e| Error::internal(format!("assembling batch: {e}")))?;
        let mut bad = std::mem::take(&mut self.bad);
        let good = if reasons.is_empty() {
            batch
        } else {
            let mut rows: Vec<usize> = reasons.keys().copied().collect();
            rows.sort_unstable();
            for row in rows {
                bad.push(BadRow {
                    reason: reasons.remove(&row).unwrap_or_default(),
                    source: self.source.clone(),
                    line: self.lines[row],
                    raw: self.raw_of(row),
                });
            }
            let mask = BooleanArray::new(ok.finish(), None);
            filter_record_batch(&batch, &mask)
                .map_err(|e| Error::internal(format!("filter: {e}")))?
        };
        let good = RecordBatch::try_new(schema, good.columns().to_vec())
            .map_err(|e| Error::internal(format!("assembling batch: {e}")))?;
        bad.sort_by_key(|b| b.line);
        let good_lines: Vec<u64> = if bad.is_empty() {
            std::mem::take(&mut self.lines)
        } else {
            let failed: std::collections::HashSet<u64> = bad.iter().map(|b| b.line).collect();
            self.lines
                .drain(..)
                .filter(|l| !failed.contains(l))
                .collect()
        };
        self.lines.clear();
        self.raw.clear();
        self.raw_ends.clear();
        Ok((good, good_lines, bad))
    }
}

fn csv_byte(c: char, what: &str) -> Result<u8, Error> {
    if c.is_ascii() {
        Ok(c as u8)
    } else {
        Err(Error::user(format!(
            "csv {what} `{c}` must be a single ASCII character"
        )))
    }
}

fn csv_reader(
    file: &FileEntry,
    config: &SourceConfig,
) -> Result<CsvRecords<Box<dyn std::io::Read + Send>>, Error> {
    let input = decode::open(file, config.compression)?;
    Ok(CsvRecords::new(
        input,
        csv_byte(config.csv.delimiter, "delimiter")?,
        csv_byte(config.csv.quote, "quote")?,
    ))
}

fn io_err(file: &FileEntry) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| {
        if e.kind() == std::io::ErrorKind::InvalidData
            || e.kind() == std::io::ErrorKind::UnexpectedEof
        {
            Error::user(format!("cannot decompress `{}`: {e}", file.key))
                .with_hint("check the file and the `compression:` setting")
        } else {
            Error::io(format!("reading {}", file.key), e)
        }
    }
}

/// Header of a CSV file (normalized), or `column_N` names when there is none.
fn csv_header(
    rec: &mut CsvRecords<Box<dyn std::io::Read + Send>>,
    config: &SourceConfig,
    file: &FileEntry,
) -> Result<Option<Vec<String>>, Error> {
    if config.csv.header {
        match rec.next_record().map_err(io_err(file))? {
            None => Ok(None),
            Some((_, n)) => {
                let names: Vec<String> = (0..n)
                    .map(|i| String::from_utf8_lossy(rec.field(i)).into_owned())
                    .collect();
                Ok(Some(normalize_header(&names)))
            }
        }
    } else {
        Ok(Some(vec![]))
    }
}

fn sample_csv(file: &FileEntry, config: &SourceConfig, n: usize) -> Result<Sample, Error> {
    let mut rec = csv_reader(file, config)?;
    let Some(mut header) = csv_header(&mut rec, config, file)? else {
        return Ok(Sample { columns: vec![] });
    };
    let nulls: Vec<&[u8]> = config
        .csv
        .null_values
        .iter()
        .map(|s| s.as_bytes())
        .collect();
    let mut cols: Vec<StringBuilder> = header.iter().map(|_| StringBuilder::new()).collect();
    let mut rows = 0;
    while rows < n {
        let Some((_, count)) = rec.next_record().map_err(io_err(file))? else {
            break;
        };
        if header.is_empty() {
            header = (1..=count).map(|i| format!("column_{i}")).collect();
            cols = header.iter().map(|_| StringBuilder::new()).collect();
        }
        if count != header.len() {
            continue;
        }
        for (i, col) in cols.iter_mut().enumerate() {
            let v = rec.field(i);
            match std::str::from_utf8(v) {
                Ok(s) if !nulls.contains(&v) => col.append_value(s.trim()),
                _ => col.append_null(),
            }
        }
        rows += 1;
    }
    Ok(Sample {
        columns: header
            .into_iter()
            .zip(cols)
            .map(|(h, mut c)| (h, SampleType::Strings(c.finish())))
            .collect(),
    })
}

/// Bytes per CSV chunk handed to a parsing thread.
const CSV_CHUNK_BYTES: usize = 4 << 20;

/// What every CSV parsing thread shares.
struct CsvLayout {
    source: String,
    schema: SchemaRef,
    header: Vec<String>,
    /// Target column of each file column.
    map: Vec<Option<usize>>,
    nulls: Vec<Vec<u8>>,
    delimiter: u8,
    quote: u8,
    batch_rows: usize,
}

/// Reads a CSV file: this thread decompresses and cuts the stream into chunks on record
/// boundaries, parsing threads turn chunks into typed batches. A file of one chunk is
/// parsed here.
fn read_csv(
    file: &FileEntry,
    config: &SourceConfig,
    schema: SchemaRef,
    sink: &mut BatchSink,
) -> Result<(), Error> {
    read_csv_chunked(file, config, schema, sink, CSV_CHUNK_BYTES)
}

fn read_csv_chunked(
    file: &FileEntry,
    config: &SourceConfig,
    schema: SchemaRef,
    sink: &mut BatchSink,
    chunk_bytes: usize,
) -> Result<(), Error> {
    let delimiter = csv_byte(config.csv.delimiter, "delimiter")?;
    let quote = csv_byte(config.csv.quote, "quote")?;
    let input = decode::open(file, config.compression)?;
    let mut chunks = decode::CsvChunker::new(input, delimiter, quote, chunk_bytes);
    let Some(mut first) = chunks.next_chunk().map_err(io_err(file))? else {
        return Ok(());
    };

    // The header (or, without one, the width of the first record) comes from the first
    // chunk; the data starts after it.
    let mut rec = CsvRecords::new(std::io::Cursor::new(&first.data[..]), delimiter, quote);
    let Some((_, width)) = rec.next_record().map_err(io_err(file))? else {
        return Ok(());
    };
    let header: Vec<String> = if config.csv.header {
        let names: Vec<String> = (0..width)
            .map(|i| String::from_utf8_lossy(rec.field(i)).into_owned())
            .collect();
        let header = normalize_header(&names);
        let consumed = rec.bytes as usize;
        first.first_line = rec.next_line();
        first.data.drain(..consumed);
        header
    } else {
        (1..=width).map(|i| format!("column_{i}")).collect()
    };
    let layout = CsvLayout {
        source: file.key.clone(),
        map: header.iter().map(|h| schema.index_of(h).ok()).collect(),
        header,
        schema,
        nulls: config
            .csv
            .null_values
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect(),
        delimiter,
        quote,
        batch_rows: config.batch_rows,
    };

    let Some(second) = chunks.next_chunk().map_err(io_err(file))? else {
        return parse_csv_chunk(first, &layout, sink);
    };
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::sync_channel::<decode::Chunk>(workers);
    let rx = std::sync::Mutex::new(rx);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..workers)
            .map(|_| {
                let mut sink = sink.clone();
                let (rx, layout, failed) = (&rx, &layout, &failed);
                scope.spawn(move || -> Result<(), Error> {
                    loop {
                        let next = rx.lock().map(|r| r.recv());
                        let Ok(Ok(chunk)) = next else { return Ok(()) };
                        if let Err(e) = parse_csv_chunk(chunk, layout, &mut sink) {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                })
            })
            .collect();
        let cut = || -> Result<(), Error> {
            for chunk in [first, second] {
                if tx.send(chunk).is_err() {
                    return Ok(());
                }
            }
            while !failed.load(std::sync::atomic::Ordering::Relaxed) {
                match chunks.next_chunk().map_err(io_err(file))? {
                    Some(chunk) => {
                        if tx.send(chunk).is_err() {
                            break;
                        }
                    }
                    None => break,
                }
            }
            Ok(())
        };
        let cutting = cut();
        drop(tx);
        let mut result = cutting;
        for t in threads {
            let joined = t
                .join()
                .unwrap_or_else(|_| Err(Error::internal("a CSV parsing thread panicked")));
            if result.is_ok() {
                result = joined;
            }
        }
        result
    })
}

/// Parses one chunk of whole records into batches of the settled schema and bad rows.
fn parse_csv_chunk(
    chunk: decode::Chunk,
    layout: &CsvLayout,
    sink: &mut BatchSink,
) -> Result<(), Error> {
    let mut rec = CsvRecords::starting_at(
        std::io::Cursor::new(chunk.data),
        layout.delimiter,
        layout.quote,
        chunk.first_line,
    );
    let mut rows = TextRows::new(layout.schema.clone(), &layout.source);
    let mut last_bytes = 0;
    let io = |e: std::io::Error| Error::internal(format!("parsing an in-memory chunk: {e}"));
    while let Some((line, count)) = rec.next_record().map_err(io)? {
        if count != layout.header.len() {
            let raw = rec.raw_text();
            rows.reject(
                line,
                format!("expected {} fields, found {count}", layout.header.len()),
                raw,
            );
        } else {
            // The record's fields lie end to end in one buffer: one UTF-8 check for all of
            // them, plus a char-boundary check at each field end.
            let end = if count == 0 { 0 } else { rec.ends[count - 1] };
            let text = std::str::from_utf8(&rec.fields[..end])
                .ok()
                .filter(|t| rec.ends[..count].iter().all(|&e| t.is_char_boundary(e)));
            let Some(text) = text else {
                let i = (0..count)
                    .find(|&i| std::str::from_utf8(rec.field(i)).is_err())
                    .unwrap_or(0);
                let raw = rec.raw_text();
                let name = &layout.header[i];
                rows.reject(line, format!("column `{name}`: invalid UTF-8"), raw);
                continue;
            };
            let mut seen = vec![false; rows.cols.len()];
            for (i, target) in layout.map.iter().enumerate() {
                let Some(t) = *target else { continue };
                let start = if i == 0 { 0 } else { rec.ends[i - 1] };
                let s = &text[start..rec.ends[i]];
                seen[t] = true;
                if layout.nulls.iter().any(|n| n.as_slice() == s.as_bytes()) {
                    rows.cols[t].append_null();
                } else {
                    rows.cols[t].append_value(if rows.trim[t] { s.trim() } else { s });
                }
            }
            for (t, s) in seen.iter().enumerate() {
                if !s {
                    rows.cols[t].append_null();
                }
            }
            rows.push_row_meta(line, &rec.raw);
        }
        if rows.len() >= layout.batch_rows || rows.bad.len() >= layout.batch_rows {
            let (batch, lines, bad) = rows.finish()?;
            sink.send(batch, &lines, bad, rec.bytes - last_bytes)?;
            last_bytes = rec.bytes;
        }
    }
    let (batch, lines, bad) = rows.finish()?;
    sink.send(batch, &lines, bad, rec.bytes - last_bytes)
}

fn json_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn ndjson_reader(
    file: &FileEntry,
    config: &SourceConfig,
) -> Result<std::io::BufReader<Box<dyn std::io::Read + Send>>, Error> {
    Ok(std::io::BufReader::with_capacity(
        1 << 20,
        decode::open(file, config.compression)?,
    ))
}

fn sample_ndjson(file: &FileEntry, config: &SourceConfig, n: usize) -> Result<Sample, Error> {
    let mut reader = ndjson_reader(file, config)?;
    let mut names: Vec<String> = Vec::new();
    let mut values: Vec<Vec<Option<String>>> = Vec::new();
    let mut line = Vec::new();
    let mut rows = 0;
    while rows < n && decode::next_line(&mut reader, &mut line).map_err(io_err(file))? {
        let Ok(obj) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&line)
        else {
            continue;
        };
        for (k, v) in obj {
            let k = decode::normalize_column_name(&k);
            let idx = match names.iter().position(|n| *n == k) {
                Some(i) => i,
                None => {
                    names.push(k);
                    values.push(vec![None; rows]);
                    names.len() - 1
                }
            };
            values[idx].push(json_text(&v).map(|s| s.trim().to_string()));
        }
        rows += 1;
        for col in values.iter_mut() {
            col.resize(rows, None);
        }
    }
    Ok(Sample {
        columns: names
            .into_iter()
            .zip(values)
            .map(|(n, v)| (n, SampleType::Strings(StringArray::from(v))))
            .collect(),
    })
}

fn read_ndjson(
    file: &FileEntry,
    config: &SourceConfig,
    schema: SchemaRef,
    sink: &mut BatchSink,
) -> Result<(), Error> {
    let mut reader = ndjson_reader(file, config)?;
    let mut rows = TextRows::new(schema.clone(), &file.key);
    let mut line = Vec::new();
    let mut line_no = 0u64;
    let mut bytes = 0u64;
    let mut index: HashMap<String, Option<usize>> = HashMap::new();
    let mut vals: Vec<Option<String>> = vec![None; schema.fields().len()];
    while decode::next_line(&mut reader, &mut line).map_err(io_err(file))? {
        line_no += 1;
        bytes += line.len() as u64;
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let raw = || String::from_utf8_lossy(&line).trim_end().to_string();
        let obj = match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&line)
        {
            Ok(o) => o,
            Err(e) => {
                let r = raw();
                rows.reject(line_no, format!("invalid JSON: {e}"), r);
                continue;
            }
        };
        vals.iter_mut().for_each(|v| *v = None);
        let mut unknown = None;
        for (k, v) in obj {
            let target = *index
                .entry(k.clone())
                .or_insert_with(|| schema.index_of(&decode::normalize_column_name(&k)).ok());
            match target {
                Some(t) => vals[t] = json_text(&v),
                None => {
                    unknown = Some(k);
                    break;
                }
            }
        }
        if let Some(k) = unknown {
            let r = raw();
            rows.reject(
                line_no,
                format!(
                    "unexpected field `{k}` (not seen in the rows sampled to settle the schema)"
                ),
                r,
            );
            continue;
        }
        for (t, v) in vals.iter().enumerate() {
            match v {
                Some(s) => rows.cols[t].append_value(if rows.trim[t] { s.trim() } else { s }),
                None => rows.cols[t].append_null(),
            }
        }
        rows.push_row_meta(line_no, &line);
        if rows.len() >= config.batch_rows {
            let (batch, lines, bad) = rows.finish()?;
            sink.send(batch, &lines, bad, std::mem::take(&mut bytes))?;
        }
    }
    let (batch, lines, bad) = rows.finish()?;
    sink.send(batch, &lines, bad, bytes)
}

/// Runs `f` on a Parquet reader builder for a local file or fetched object-store bytes.
fn with_parquet<T>(
    file: &FileEntry,
    f: impl FnOnce(ParquetBuilderAny) -> Result<T, Error>,
) -> Result<T, Error> {
    let bad = |e: parquet::errors::ParquetError| {
        Error::user(format!(
            "`{}` is not a readable Parquet file: {e}",
            file.key
        ))
    };
    match &file.location {
        Location::Local(p) => {
            let f0 = std::fs::File::open(p)
                .map_err(|e| Error::io(format!("opening {}", file.key), e))?;
            f(ParquetBuilderAny::File(
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f0)
                    .map_err(bad)?,
            ))
        }
        Location::Remote { store, path } => {
            let handle = tokio::runtime::Handle::current();
            let bytes = handle
                .block_on(async {
                    object_store::ObjectStoreExt::get(store.as_ref(), path)
                        .await?
                        .bytes()
                        .await
                })
                .map_err(|e| Error::external(format!("fetching {}: {e}", file.key)))?;
            f(ParquetBuilderAny::Bytes(
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
                    .map_err(bad)?,
            ))
        }
    }
}

enum ParquetBuilderAny {
    File(parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder<std::fs::File>),
    Bytes(parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder<bytes::Bytes>),
}

impl ParquetBuilderAny {
    fn schema(&self) -> SchemaRef {
        match self {
            ParquetBuilderAny::File(b) => b.schema().clone(),
            ParquetBuilderAny::Bytes(b) => b.schema().clone(),
        }
    }

    fn build(
        self,
    ) -> parquet::errors::Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
        match self {
            ParquetBuilderAny::File(b) => b.with_batch_size(65_536).build(),
            ParquetBuilderAny::Bytes(b) => b.with_batch_size(65_536).build(),
        }
    }
}

fn sample_parquet(file: &FileEntry) -> Result<Sample, Error> {
    let schema = with_parquet(file, |b| Ok(b.schema()))?;
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            (
                decode::normalize_column_name(f.name()),
                SampleType::Typed(f.data_type().clone()),
            )
        })
        .collect();
    Ok(Sample { columns })
}

fn read_parquet(file: &FileEntry, schema: SchemaRef, sink: &mut BatchSink) -> Result<(), Error> {
    let reader = with_parquet(file, |b| {
        b.build()
            .map_err(|e| Error::user(format!("reading `{}`: {e}", file.key)))
    })?;
    let mut row_base = 0u64;
    let opts = CastOptions {
        safe: true,
        ..Default::default()
    };
    for batch in reader {
        let batch = batch.map_err(|e| Error::user(format!("reading `{}`: {e}", file.key)))?;
        let n = batch.num_rows();
        let names: Vec<String> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| decode::normalize_column_name(f.name()))
            .collect();
        let mut ok = BooleanBufferBuilder::new(n);
        ok.append_n(n, true);
        let mut reasons: HashMap<usize, String> = HashMap::new();
        let mut arrays = Vec::with_capacity(schema.fields().len());
        for field in schema.fields() {
            let arr = match names.iter().position(|n| n == field.name()) {
                None => arrow::array::new_null_array(field.data_type(), n),
                Some(i) => {
                    let col = batch.column(i);
                    if col.data_type() == field.data_type() {
                        col.clone()
                    } else {
                        let typed =
                            cast_with_options(col, field.data_type(), &opts).map_err(|e| {
                                Error::user(format!(
                                    "`{}`: column `{}` of type {} cannot become {}: {e}",
                                    file.key,
                                    field.name(),
                                    type_name(col.data_type()),
                                    type_name(field.data_type())
                                ))
                            })?;
                        for row in 0..n {
                            if col.is_valid(row) && typed.is_null(row) && ok.get_bit(row) {
                                ok.set_bit(row, false);
                                reasons.insert(
                                    row,
                                    format!(
                                        "column `{}`: value does not fit {}",
                                        field.name(),
                                        type_name(field.data_type())
                                    ),
                                );
                            }
                        }
                        typed
                    }
                }
            };
            if !field.is_nullable() {
                for row in 0..n {
                    if arr.is_null(row) && ok.get_bit(row) {
                        ok.set_bit(row, false);
                        reasons.insert(
                            row,
                            format!("column `{}` is required but empty", field.name()),
                        );
                    }
                }
            }
            arrays.push(arr);
        }
        let loose = Arc::new(arrow::datatypes::Schema::new(
            schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ));
        let typed = RecordBatch::try_new(loose, arrays)
            .map_err(|e| Error::internal(format!("batch: {e}")))?;
        let mut bad = Vec::new();
        let lines: Vec<u64> = (0..n)
            .filter(|&r| !reasons.contains_key(&r))
            .map(|r| row_base + r as u64 + 1)
            .collect();
        let good = if reasons.is_empty() {
            typed
        } else {
            let mut rows: Vec<usize> = reasons.keys().copied().collect();
            rows.sort_unstable();
            for row in rows {
                bad.push(BadRow {
                    reason: reasons.remove(&row).unwrap_or_default(),
                    source: file.key.clone(),
                    line: row_base + row as u64 + 1,
                    raw: row_as_json(&batch, row),
                });
            }
            filter_record_batch(&typed, &BooleanArray::new(ok.finish(), None))
                .map_err(|e| Error::internal(format!("filter: {e}")))?
        };
        let good = RecordBatch::try_new(schema.clone(), good.columns().to_vec())
            .map_err(|e| Error::internal(format!("batch: {e}")))?;
        row_base += n as u64;
        sink.send(good, &lines, bad, 0)?;
    }
    Ok(())
}

fn row_as_json(batch: &RecordBatch, row: usize) -> String {
    let slice = batch.slice(row, 1);
    let mut buf = Vec::new();
    let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
    if w.write(&slice).is_err() || w.finish().is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&buf).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};

    /// Reads `path` with chunks of `chunk_bytes`; returns the rows as text, sorted, and the
    /// bad rows as (line, reason, raw), sorted.
    fn read_all(
        path: &std::path::Path,
        schema: SchemaRef,
        chunk_bytes: usize,
    ) -> (Vec<String>, Vec<(u64, String, String)>) {
        let file = FileEntry {
            key: "data.csv".into(),
            size: std::fs::metadata(path).unwrap().len(),
            location: Location::Local(path.to_path_buf()),
        };
        let config: SourceConfig = serde_json::from_value(serde_json::json!({
            "type": "files", "path": "data.csv", "batch_rows": 1000
        }))
        .unwrap();
        let (tx, mut rx) = mpsc::channel(100_000);
        let mut sink = BatchSink {
            out: tx,
            progress: Arc::new(Progress::default()),
            seq_base: None,
        };
        read_csv_chunked(&file, &config, schema, &mut sink, chunk_bytes).unwrap();
        drop(sink);
        let (mut rows, mut bad) = (Vec::new(), Vec::new());
        while let Ok(ev) = rx.try_recv() {
            match ev {
                SourceEvent::Batch(b) => {
                    for row in 0..b.num_rows() {
                        let cells: Vec<String> = b
                            .columns()
                            .iter()
                            .map(|c| arrow::util::display::array_value_to_string(c, row).unwrap())
                            .collect();
                        rows.push(cells.join("|"));
                    }
                }
                SourceEvent::Bad(b) => bad.extend(b.into_iter().map(|r| (r.line, r.reason, r.raw))),
            }
        }
        rows.sort();
        bad.sort();
        (rows, bad)
    }

    #[test]
    fn parallel_chunks_read_exactly_what_one_pass_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.csv");
        let mut text = String::from("id,amount,note\n");
        for i in 0..20_000 {
            match i % 997 {
                0 => text.push_str(&format!("{i},oops,bad amount\n")),
                1 => text.push_str(&format!("{i},1.5\n")),
                2 => text.push_str(&format!("{i},2.5,\"multi\nline, \"\"quoted\"\"\"\n")),
                3 => text.push('\n'),
                _ => text.push_str(&format!("{i},{}.25,plain\n", i % 100)),
            }
        }
        std::fs::write(&path, text).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("amount", DataType::Float64, true),
            Field::new("note", DataType::Utf8, true),
        ]));
        let (one_rows, one_bad) = read_all(&path, schema.clone(), 1 << 30);
        assert_eq!(one_rows.len() + one_bad.len(), 20_000 - 21);
        assert_eq!(one_bad.len(), 2 * 21);
        for chunk in [1 << 10, 7_777] {
            let (rows, bad) = read_all(&path, schema.clone(), chunk);
            assert_eq!(rows, one_rows, "chunk size {chunk}");
            assert_eq!(bad, one_bad, "chunk size {chunk}");
        }
        // Row 997 is on line 1000: the header, rows 0..997, and one extra line for the
        // multi-line record (the blank line takes the place of row 3).
        assert!(one_bad.iter().any(|(line, reason, raw)| *line == 1000
            && reason.contains("cannot parse `oops`")
            && raw == "997,oops,bad amount"));
    }

    #[test]
    fn invalid_utf8_is_quarantined_and_multibyte_text_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.csv");
        let mut bytes =
            b"id,amount,note\n1,1.5,caf\xc3\xa9\n2,2.5,caf\xe9\n3,3.5,\xe2\x82\xac\n".to_vec();
        bytes.extend_from_slice(b"4,4.5,ok\n");
        std::fs::write(&path, bytes).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("amount", DataType::Float64, true),
            Field::new("note", DataType::Utf8, true),
        ]));
        let (rows, bad) = read_all(&path, schema, 1 << 20);
        assert_eq!(rows, vec!["1|1.5|café", "3|3.5|€", "4|4.5|ok"]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, 3);
        assert_eq!(bad[0].1, "column `note`: invalid UTF-8");
    }
}
