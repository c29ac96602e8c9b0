//! Reading contract files: CSV with a torn last line tolerated, JSON with positions in errors.

use crate::contract::{optional_columns, required_columns};
use crate::note::Note;
use crate::ReportError;
use serde::de::DeserializeOwned;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The contract's words of an enum that a CSV column holds.
pub(crate) trait Word: Copy + 'static {
    /// Every value.
    const ALL: &'static [Self];
    /// The word written in files.
    fn word(self) -> &'static str;
}

/// A problem with one field, before the reader adds the file and the line.
#[derive(Debug)]
pub(crate) struct FieldError {
    pub(crate) column: usize,
    pub(crate) message: String,
}

/// One CSV row, with the contract columns looked up by name.
pub(crate) struct Row<'a> {
    record: &'a csv::ByteRecord,
    /// For each required column, its index in the record.
    index: &'a [usize],
    /// The index of the optional `step` column, where the file has one.
    step: Option<usize>,
}

/// The `column` of a [`FieldError`] about the optional `step` column.
pub(crate) const STEP_FIELD: usize = usize::MAX;

impl Row<'_> {
    /// The optional `step` column (added at the end of the tables whose rows belong to an
    /// engine step): `None` when the file has no such column or the field is empty.
    pub(crate) fn step(&self) -> Result<Option<u64>, FieldError> {
        let Some(i) = self.step else { return Ok(None) };
        let raw = std::str::from_utf8(self.record.get(i).unwrap_or_default())
            .map_err(|e| FieldError { column: STEP_FIELD, message: format!("not UTF-8 ({e})") })?
            .trim();
        if raw.is_empty() {
            return Ok(None);
        }
        match raw.parse::<u64>() {
            Ok(v) => Ok(Some(v)),
            Err(_) => match raw.parse::<f64>() {
                // pandas writes an integer column with empty fields as floats.
                Ok(v) if v.is_finite() && v >= 0.0 && v.fract() == 0.0 => Ok(Some(v as u64)),
                _ => Err(FieldError { column: STEP_FIELD, message: format!("`{raw}` is not a step id") }),
            },
        }
    }

    fn raw(&self, column: usize) -> Result<&str, FieldError> {
        let bytes = self.record.get(self.index[column]).unwrap_or_default();
        std::str::from_utf8(bytes).map_err(|e| FieldError { column, message: format!("not UTF-8 ({e})") })
    }

    /// A free-text field.
    pub(crate) fn text(&self, column: usize) -> Result<String, FieldError> {
        self.raw(column).map(str::to_string)
    }

    /// An optional finite number (empty means none).
    pub(crate) fn opt_f64(&self, column: usize) -> Result<Option<f64>, FieldError> {
        let raw = self.raw(column)?.trim();
        if raw.is_empty() {
            return Ok(None);
        }
        match raw.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(Some(v)),
            Ok(_) => Err(FieldError {
                column,
                message: format!("`{raw}` is not a finite number (the contract forbids NaN and infinities)"),
            }),
            Err(_) => Err(FieldError { column, message: format!("`{raw}` is not a number") }),
        }
    }

    /// A required finite number.
    pub(crate) fn f64(&self, column: usize) -> Result<f64, FieldError> {
        self.opt_f64(column)?.ok_or_else(|| FieldError { column, message: "empty, a number is required".into() })
    }

    /// A required number that is not negative (a duration or a time since the start).
    pub(crate) fn non_negative(&self, column: usize) -> Result<f64, FieldError> {
        let v = self.f64(column)?;
        if v < 0.0 {
            return Err(FieldError { column, message: format!("{v} is negative") });
        }
        Ok(v)
    }

    /// An optional number that is not negative.
    pub(crate) fn opt_non_negative(&self, column: usize) -> Result<Option<f64>, FieldError> {
        match self.opt_f64(column)? {
            Some(v) if v < 0.0 => Err(FieldError { column, message: format!("{v} is negative") }),
            v => Ok(v),
        }
    }

    /// A required count. `32.0` is accepted as 32 (pandas writes integers so when a column
    /// holds an empty value).
    pub(crate) fn count(&self, column: usize) -> Result<u64, FieldError> {
        let raw = self.raw(column)?.trim();
        if let Ok(v) = raw.parse::<u64>() {
            return Ok(v);
        }
        match raw.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= u64::MAX as f64 => Ok(v as u64),
            _ if raw.is_empty() => Err(FieldError { column, message: "empty, a count is required".into() }),
            _ => Err(FieldError { column, message: format!("`{raw}` is not a non-negative integer") }),
        }
    }

    /// An optional count (empty means none).
    pub(crate) fn opt_count(&self, column: usize) -> Result<Option<u64>, FieldError> {
        if self.raw(column)?.trim().is_empty() {
            return Ok(None);
        }
        self.count(column).map(Some)
    }

    /// One of a fixed set of words.
    pub(crate) fn word<T: Word>(&self, column: usize) -> Result<T, FieldError> {
        let raw = self.raw(column)?;
        T::ALL.iter().find(|t| t.word() == raw).copied().ok_or_else(|| {
            let accepted: Vec<&str> = T::ALL.iter().map(|t| t.word()).collect();
            FieldError { column, message: format!("`{raw}` is not one of {}", accepted.join(", ")) }
        })
    }
}

/// Reads `dir/file` row by row. `Ok(None)` when the file does not exist.
///
/// A last row that is torn (the file does not end with a line end, or the row at the end has
/// fewer fields than the header) is skipped and a warning is added to `notes`; any other bad row
/// is an error naming the file, the line and the column.
///
/// A table an output budget rolled over (`<table>.1.csv`, `<table>.2.csv`, ..., then
/// `<table>.csv` with the newest rows) is read file after file, oldest first; a note says how
/// many files were read.
pub(crate) fn read_csv<T>(
    dir: &Path,
    file: &'static str,
    notes: &mut Vec<Note>,
    mut parse: impl FnMut(&Row<'_>) -> Result<T, FieldError>,
) -> Result<Option<Vec<T>>, ReportError> {
    let rolled = rolled_files(dir, file).map_err(|e| ReportError::io(dir, e))?;
    let mut rows = Vec::new();
    for name in &rolled {
        read_csv_file(dir, file, &dir.join(name), notes, &mut parse, &mut rows)?;
    }
    let live = read_csv_file(dir, file, &dir.join(file), notes, &mut parse, &mut rows)?;
    if !rolled.is_empty() {
        notes.push(Note::warning(format!(
            "{file}: read {} rolled-over files ({} to {}) before it; the output budget may have removed older ones \
             (see output_budget in profilemate_run.json)",
            rolled.len(),
            rolled[0],
            rolled[rolled.len() - 1]
        )));
    }
    Ok((live || !rolled.is_empty()).then_some(rows))
}

/// The rolled-over files of `file` in `dir` (`<table>.<n>.csv`), oldest (lowest n) first.
pub(crate) fn rolled_files(dir: &Path, file: &str) -> std::io::Result<Vec<String>> {
    let Some((stem, ext)) = file.rsplit_once('.') else { return Ok(Vec::new()) };
    let mut found: Vec<(u64, String)> = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let number = name
            .strip_prefix(stem)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_suffix(ext))
            .and_then(|r| r.strip_suffix('.'))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = number {
            found.push((n, name));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, name)| name).collect())
}

/// Reads one file of a table into `rows`; `false` when it does not exist.
fn read_csv_file<T>(
    dir: &Path,
    file: &'static str,
    path: &Path,
    notes: &mut Vec<Note>,
    parse: &mut impl FnMut(&Row<'_>) -> Result<T, FieldError>,
    rows: &mut Vec<T>,
) -> Result<bool, ReportError> {
    let required = required_columns(file).expect("read_csv is only called with contract files");
    let optional = optional_columns(file);
    let columns: Vec<&str> = required.iter().chain(optional).copied().collect();
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(ReportError::io(path, e)),
    };
    let path = path.to_path_buf();
    let len = f.metadata().map_err(|e| ReportError::io(&path, e))?.len();
    if len == 0 {
        notes.push(Note::warning(format!("{file} is empty (not even a header); read as no rows")));
        return Ok(true);
    }
    let ends_with_newline = {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::End(-1)).and_then(|_| f.read_exact(&mut last)).map_err(|e| ReportError::io(&path, e))?;
        f.seek(SeekFrom::Start(0)).map_err(|e| ReportError::io(&path, e))?;
        last[0] == b'\n'
    };
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(BufReader::new(f));
    let mut record = csv::ByteRecord::new();
    let csv_err = |e: csv::Error| {
        let line = e.position().map_or(0, csv::Position::line);
        match e.into_kind() {
            csv::ErrorKind::Io(e) => ReportError::io(dir.join(file), e),
            other => ReportError::MalformedCsv {
                file: file.to_string(),
                line,
                column_index: 0,
                column: String::new(),
                message: format!("{other:?}"),
            },
        }
    };

    if !reader.read_byte_record(&mut record).map_err(csv_err)? {
        notes.push(Note::warning(format!("{file} has no header row; read as no rows")));
        return Ok(true);
    }
    if reader.position().byte() >= len && !ends_with_newline {
        notes.push(Note::warning(format!("{file}: torn header line (no line end) skipped; read as no rows")));
        return Ok(true);
    }
    let header: Vec<String> = record
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let h = String::from_utf8_lossy(h);
            // A byte order mark is not part of the first column's name.
            if i == 0 {
                h.trim_start_matches('\u{feff}').to_string()
            } else {
                h.into_owned()
            }
        })
        .collect();
    let mut index = Vec::with_capacity(columns.len());
    for column in required {
        match header.iter().position(|h| h == column) {
            Some(i) => index.push(i),
            None => {
                return Err(ReportError::MissingColumn {
                    file: file.to_string(),
                    column: column.to_string(),
                    header: header.join(","),
                })
            }
        }
    }
    let needed = index.iter().max().map_or(0, |m| m + 1);
    // An optional column the file lacks reads as empty fields.
    for column in optional {
        index.push(header.iter().position(|h| h == column).unwrap_or(usize::MAX));
    }
    let step = header.iter().position(|h| h == "step").filter(|_| !columns.contains(&"step"));

    loop {
        if !reader.read_byte_record(&mut record).map_err(csv_err)? {
            break;
        }
        let line = record.position().map_or(0, csv::Position::line);
        let at_end = reader.position().byte() >= len;
        let start = record.position().map_or(0, csv::Position::byte);
        if at_end && (!ends_with_newline || record.len() < needed || open_quote(&path, start)?) {
            notes.push(Note::warning(format!(
                "{file}: torn last line {line} skipped (incomplete row, as a process killed mid-write leaves)"
            )));
            break;
        }
        if record.len() < needed {
            let missing = index.iter().position(|&i| i >= record.len()).unwrap_or(0);
            return Err(ReportError::MalformedCsv {
                file: file.to_string(),
                line,
                column_index: index[missing] + 1,
                column: columns[missing].to_string(),
                message: format!("the row has {} fields, the header {}", record.len(), header.len()),
            });
        }
        let row = Row { record: &record, index: &index, step };
        match parse(&row) {
            Ok(t) => rows.push(t),
            Err(FieldError { column: STEP_FIELD, message }) => {
                return Err(ReportError::MalformedCsv {
                    file: file.to_string(),
                    line,
                    column_index: step.map_or(0, |i| i + 1),
                    column: "step".to_string(),
                    message,
                })
            }
            Err(FieldError { column, message }) => {
                return Err(ReportError::MalformedCsv {
                    file: file.to_string(),
                    line,
                    column_index: index[column].wrapping_add(1),
                    column: columns[column].to_string(),
                    message,
                })
            }
        }
    }
    Ok(true)
}

/// Whether the bytes of `path` from `start` to the end hold an odd number of quotes: a quoted
/// field left open, as a write cut inside a field that holds a newline leaves.
fn open_quote(path: &Path, start: u64) -> Result<bool, ReportError> {
    let mut f = File::open(path).map_err(|e| ReportError::io(path, e))?;
    f.seek(SeekFrom::Start(start)).map_err(|e| ReportError::io(path, e))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).map_err(|e| ReportError::io(path, e))?;
    Ok(tail.iter().filter(|&&b| b == b'"').count() % 2 == 1)
}

/// Reads and deserializes `dir/file`. `Ok(None)` when the file does not exist.
pub(crate) fn read_json<T: DeserializeOwned>(dir: &Path, file: &'static str) -> Result<Option<T>, ReportError> {
    let path = dir.join(file);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReportError::io(path, e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        let message = e.to_string();
        // serde_json appends the position; the error carries it in its own fields.
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let message = message.strip_suffix(&suffix).unwrap_or(&message).to_string();
        ReportError::MalformedJson { file: file.to_string(), line: e.line(), column: e.column().max(1), message }
    })
}
