//! Byte-level decoding: decompression, format guessing, CSV records with their raw text.

use std::io::{BufReader, Read};

use weir_common::Error;
use weir_config::{Compression, FileFormat};

use super::list::{FileEntry, Location};

/// Guesses the format from a file name, ignoring a compression suffix.
pub fn guess_format(name: &str) -> Option<FileFormat> {
    let lower = name.to_ascii_lowercase();
    let base = lower
        .strip_suffix(".gz")
        .or_else(|| lower.strip_suffix(".zst"))
        .or_else(|| lower.strip_suffix(".zstd"))
        .unwrap_or(&lower);
    let ext = base.rsplit('.').next()?;
    match ext {
        "csv" | "tsv" | "txt" => Some(FileFormat::Csv),
        "json" | "jsonl" | "ndjson" => Some(FileFormat::Ndjson),
        "parquet" | "pq" => Some(FileFormat::Parquet),
        _ => None,
    }
}

fn compression_of(name: &str, configured: Compression) -> Compression {
    match configured {
        Compression::Auto => {
            let lower = name.to_ascii_lowercase();
            if lower.ends_with(".gz") {
                Compression::Gzip
            } else if lower.ends_with(".zst") || lower.ends_with(".zstd") {
                Compression::Zstd
            } else {
                Compression::None
            }
        }
        c => c,
    }
}

/// Opens `file` as a decompressed byte stream. Local files stream from disk; object-store
/// files are fetched whole first. Must be called from a blocking context.
pub fn open(file: &FileEntry, compression: Compression) -> Result<Box<dyn Read + Send>, Error> {
    let raw: Box<dyn Read + Send> = match &file.location {
        Location::Local(p) => Box::new(
            std::fs::File::open(p).map_err(|e| Error::io(format!("opening {}", file.key), e))?,
        ),
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
            Box::new(std::io::Cursor::new(bytes))
        }
    };
    let raw = BufReader::with_capacity(1 << 20, raw);
    Ok(match compression_of(&file.key, compression) {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(raw)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(raw)
                .map_err(|e| Error::io(format!("opening {}", file.key), e))?,
        ),
        _ => Box::new(raw),
    })
}

/// Turns a header into a column name that SQL can use unquoted: lower snake case, letters,
/// digits and `_` only (`Order ID` -> `order_id`, `unitPrice` -> `unit_price`).
pub fn normalize_column_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut prev_lower = false;
    for ch in name.trim().chars() {
        if ch.is_alphanumeric() {
            if ch.is_uppercase() && prev_lower {
                out.push('_');
            }
            prev_lower = ch.is_lowercase() || ch.is_ascii_digit();
            out.extend(ch.to_lowercase());
        } else {
            if !out.ends_with('_') {
                out.push('_');
            }
            prev_lower = false;
        }
    }
    let trimmed = out.trim_matches('_').to_string();
    if trimmed.is_empty() {
        return trimmed;
    }
    if trimmed.starts_with(|c: char| c.is_ascii_digit()) {
        format!("_{trimmed}")
    } else {
        trimmed
    }
}

/// Normalizes a header row: empty names become `column_N`, duplicates get `_2`, `_3`...
pub fn normalize_header(names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for (i, n) in names.iter().enumerate() {
        let mut name = normalize_column_name(n);
        if name.is_empty() {
            name = format!("column_{}", i + 1);
        }
        let base = name.clone();
        let mut k = 2;
        while out.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        out.push(name);
    }
    out
}

/// A CSV record reader over a byte stream that also yields each record's raw bytes and
/// starting line, so a rejected row can be quarantined exactly as it was written.
pub struct CsvRecords<R> {
    reader: csv_core::Reader,
    src: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    /// Field bytes of the current record, and where each field ends.
    pub fields: Vec<u8>,
    pub ends: Vec<usize>,
    /// Raw bytes of the current record.
    pub raw: Vec<u8>,
    /// Line (1-based) the next record starts on.
    line: u64,
    /// Bytes consumed so far.
    pub bytes: u64,
}

impl<R: Read> CsvRecords<R> {
    pub fn new(src: R, delimiter: u8, quote: u8) -> Self {
        Self::starting_at(src, delimiter, quote, 1)
    }

    /// A reader whose first byte is on line `line` of the file.
    pub fn starting_at(src: R, delimiter: u8, quote: u8, line: u64) -> Self {
        let reader = csv_core::ReaderBuilder::new()
            .delimiter(delimiter)
            .quote(quote)
            .build();
        Self {
            reader,
            src,
            buf: vec![0; 1 << 20],
            start: 0,
            end: 0,
            eof: false,
            fields: vec![0; 4096],
            ends: vec![0; 64],
            raw: Vec::with_capacity(4096),
            line,
            bytes: 0,
        }
    }

    /// Reads the next record; returns its starting line and field count, or None at the end.
    /// Blank lines are skipped.
    pub fn next_record(&mut self) -> std::io::Result<Option<(u64, usize)>> {
        loop {
            self.raw.clear();
            let mut nout_total = 0;
            let mut nend_total = 0;
            let line = self.line;
            loop {
                if self.start == self.end && !self.eof {
                    self.start = 0;
                    self.end = 0;
                    let n = self.src.read(&mut self.buf)?;
                    if n == 0 {
                        self.eof = true;
                    }
                    self.end = n;
                }
                let input = &self.buf[self.start..self.end];
                let (res, nin, nout, nend) = self.reader.read_record(
                    input,
                    &mut self.fields[nout_total..],
                    &mut self.ends[nend_total..],
                );
                self.raw.extend_from_slice(&input[..nin]);
                self.start += nin;
                self.bytes += nin as u64;
                nout_total += nout;
                nend_total += nend;
                match res {
                    csv_core::ReadRecordResult::InputEmpty => continue,
                    csv_core::ReadRecordResult::OutputFull => {
                        let len = self.fields.len() * 2;
                        self.fields.resize(len, 0);
                    }
                    csv_core::ReadRecordResult::OutputEndsFull => {
                        let len = self.ends.len() * 2;
                        self.ends.resize(len, 0);
                    }
                    csv_core::ReadRecordResult::Record => {
                        // Blank lines before the record are consumed with it.
                        let leading = self
                            .raw
                            .iter()
                            .take_while(|b| **b == b'\n' || **b == b'\r')
                            .filter(|&&b| b == b'\n')
                            .count() as u64;
                        let line = line + leading;
                        self.line += memchr::memchr_iter(b'\n', &self.raw).count() as u64;
                        if nend_total == 1
                            && nout_total == 0
                            && self.raw.iter().all(|b| b.is_ascii_whitespace())
                        {
                            break; // blank line
                        }
                        return Ok(Some((line, nend_total)));
                    }
                    csv_core::ReadRecordResult::End => return Ok(None),
                }
            }
        }
    }

    /// The line the next record starts on (blank lines before it not yet skipped).
    pub fn next_line(&self) -> u64 {
        self.line
    }

    /// Bytes of field `i` of the current record.
    pub fn field(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.fields[start..self.ends[i]]
    }

    /// The raw text of the current record without its line ending.
    pub fn raw_text(&self) -> String {
        let start = self
            .raw
            .iter()
            .take_while(|b| **b == b'\n' || **b == b'\r')
            .count();
        let mut r = &self.raw[start..];
        while let Some((&last, rest)) = r.split_last() {
            if last == b'\n' || last == b'\r' {
                r = rest;
            } else {
                break;
            }
        }
        String::from_utf8_lossy(r).into_owned()
    }
}

/// A run of whole CSV records cut from a file, and the line its first byte is on.
pub struct Chunk {
    pub data: Vec<u8>,
    pub first_line: u64,
}

/// Cuts a CSV byte stream into chunks of about `target` bytes that end on record
/// boundaries, so that the chunks can be parsed in parallel. Boundaries follow the same
/// quoting rules as the record parser: a quote opens a quoted field only at the start of a
/// field, `""` inside one is a literal quote, and a newline inside one is data.
pub struct CsvChunker<R> {
    src: R,
    delimiter: u8,
    quote: u8,
    target: usize,
    carry: Vec<u8>,
    line: u64,
    eof: bool,
}

impl<R: Read> CsvChunker<R> {
    pub fn new(src: R, delimiter: u8, quote: u8, target: usize) -> Self {
        Self {
            src,
            delimiter,
            quote,
            target: target.max(1),
            carry: Vec::new(),
            line: 1,
            eof: false,
        }
    }

    /// The next chunk, or None at the end of the stream.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<Chunk>> {
        let mut want = self.target;
        loop {
            let mut buf = std::mem::take(&mut self.carry);
            while buf.len() < want && !self.eof {
                let len = buf.len();
                buf.resize(want, 0);
                match self.src.read(&mut buf[len..]) {
                    Ok(0) => {
                        buf.truncate(len);
                        self.eof = true;
                    }
                    Ok(n) => buf.truncate(len + n),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => buf.truncate(len),
                    Err(e) => return Err(e),
                }
            }
            if buf.is_empty() {
                return Ok(None);
            }
            let cut = if self.eof {
                Some(buf.len())
            } else {
                last_record_end(&buf, self.delimiter, self.quote)
            };
            match cut {
                Some(cut) => {
                    self.carry = buf.split_off(cut);
                    let first_line = self.line;
                    self.line += memchr::memchr_iter(b'\n', &buf).count() as u64;
                    return Ok(Some(Chunk {
                        data: buf,
                        first_line,
                    }));
                }
                None => {
                    // One record longer than the chunk: read on until it ends.
                    self.carry = buf;
                    want = self.carry.len() * 2;
                }
            }
        }
    }
}

/// The offset just past the last record-ending newline of `buf`, which starts at a record
/// boundary; None when no record ends in it.
fn last_record_end(buf: &[u8], delimiter: u8, quote: u8) -> Option<usize> {
    if memchr::memchr(quote, buf).is_none() {
        return memchr::memrchr(b'\n', buf).map(|i| i + 1);
    }
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        FieldStart,
        Unquoted,
        Quoted,
        QuoteInQuoted,
    }
    let mut state = State::FieldStart;
    let mut last = None;
    for (i, &b) in buf.iter().enumerate() {
        state = match state {
            State::Quoted => {
                if b == quote {
                    State::QuoteInQuoted
                } else {
                    State::Quoted
                }
            }
            State::QuoteInQuoted if b == quote => State::Quoted,
            State::FieldStart if b == quote => State::Quoted,
            _ if b == b'\n' => {
                last = Some(i + 1);
                State::FieldStart
            }
            _ if b == b'\r' || b == delimiter => State::FieldStart,
            _ => State::Unquoted,
        };
    }
    last
}

/// Reads the next line of an NDJSON stream into `line`; returns false at the end.
pub fn next_line(
    reader: &mut dyn std::io::BufRead,
    line: &mut Vec<u8>,
) -> Result<bool, std::io::Error> {
    line.clear();
    let n = reader.read_until(b'\n', line)?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_names() {
        assert_eq!(normalize_column_name("Order ID"), "order_id");
        assert_eq!(normalize_column_name("unitPrice"), "unit_price");
        assert_eq!(normalize_column_name(" total ($) "), "total");
        assert_eq!(normalize_column_name("2nd"), "_2nd");
        let h = normalize_header(&["a".into(), "A".into(), "".into()]);
        assert_eq!(h, vec!["a", "a_2", "column_3"]);
    }

    #[test]
    fn csv_records_keep_raw_text_and_lines() {
        let data = b"id,name\n1,\"multi\nline\"\n\n2,bob\n";
        let mut r = CsvRecords::new(&data[..], b',', b'"');
        assert_eq!(r.next_record().unwrap(), Some((1, 2)));
        assert_eq!(r.next_record().unwrap(), Some((2, 2)));
        assert_eq!(r.field(1), b"multi\nline");
        assert_eq!(r.raw_text(), "1,\"multi\nline\"");
        assert_eq!(r.next_record().unwrap(), Some((5, 2)));
        assert_eq!(r.raw_text(), "2,bob");
        assert_eq!(r.next_record().unwrap(), None);
    }

    /// Every record of `data` with its line, parsed in one piece.
    fn records(data: &[u8], first_line: u64) -> Vec<(u64, Vec<Vec<u8>>)> {
        let mut r = CsvRecords::starting_at(data, b',', b'"', first_line);
        let mut out = Vec::new();
        while let Some((line, n)) = r.next_record().unwrap() {
            out.push((line, (0..n).map(|i| r.field(i).to_vec()).collect()));
        }
        out
    }

    #[test]
    fn chunks_end_on_record_boundaries_whatever_their_size() {
        let data: &[u8] = b"id,note\r\n1,\"two\nlines\"\r\n2,\"a \"\"quoted\"\", b\"\n\n3,5\" pipe\n4,\"x\ny\nz\",\n5,last";
        let whole = records(data, 1);
        assert_eq!(whole.len(), 6);
        for target in 1..=data.len() + 1 {
            let mut chunker = CsvChunker::new(data, b',', b'"', target);
            let mut joined = Vec::new();
            let mut parsed = Vec::new();
            while let Some(chunk) = chunker.next_chunk().unwrap() {
                joined.extend_from_slice(&chunk.data);
                parsed.extend(records(&chunk.data, chunk.first_line));
            }
            assert_eq!(joined, data, "chunk size {target}");
            assert_eq!(parsed, whole, "chunk size {target}");
        }
    }

    #[test]
    fn guesses_formats() {
        assert_eq!(guess_format("a/b.csv.gz"), Some(FileFormat::Csv));
        assert_eq!(guess_format("x.jsonl.zst"), Some(FileFormat::Ndjson));
        assert_eq!(guess_format("x.parquet"), Some(FileFormat::Parquet));
        assert_eq!(guess_format("x.bin"), None);
    }
}
