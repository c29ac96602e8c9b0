//! The contract CSV tables.

use crate::numbers;
use crate::OutputBudget;
use profilemate_core::{Config, OutputFiles, ProfilerKind, Rows, Sink, SinkError, Table};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Writes the contract CSV tables (those of the enabled profilers and trackers) into a directory.
///
/// Each file is created with its header row at once, so a reader finds every file from the
/// start of the run. Rows are buffered and reach the disk at every flush (after every collector pass);
/// a process killed at any instant leaves files whose complete lines all parse.
///
/// Formats: seconds with 6 decimals (rounded to the microsecond), milliseconds with 6 (exact to
/// the nanosecond), percentages with 4, throughput with at least 6 significant digits (and 3 decimals), all written from the integer
/// nanoseconds and counts by integer arithmetic; a field with no value is empty; text is quoted
/// where RFC 4180 requires it.
///
/// ```
/// use profilemate_sinks::CsvSink;
/// use profilemate_core::{Config, Rows, Sink};
///
/// let dir = tempfile::tempdir()?;
/// let mut sink = CsvSink::create(dir.path(), &Config::default())?;
/// sink.write_rows(&Rows::default())?;
/// sink.flush()?;
/// let header = std::fs::read_to_string(dir.path().join("forward_pass_timing.csv"))?;
/// assert!(header.starts_with("timestamp_sec,phase,batch_size"));
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
///
/// With an [`OutputBudget`] ([`with_budget`](Self::with_budget); `PROFILEMATE_MAX_OUTPUT_MB`),
/// a table's file rolls over once it reaches the budget's segment size: it is renamed
/// `<table>.1.csv`, `<table>.2.csv`, ... (the higher the number, the newer the rows) and a new
/// `<table>.csv`, with its header, takes the newest rows; the oldest numbered files are removed
/// before a write would take the tables past the budget.
pub struct CsvSink {
    dir: PathBuf,
    tables: Vec<TableFile>,
    budget: Option<Arc<OutputBudget>>,
    /// Lines a table buffers before handing them to its file.
    chunk: usize,
}

/// One table's file and the complete lines not written to it yet.
struct TableFile {
    table: Table,
    file: File,
    path: PathBuf,
    header: Vec<u8>,
    pending: Vec<u8>,
    /// Bytes in the file being written.
    size: u64,
    /// Bytes written over the run, every rolled file included.
    written: u64,
    /// Files rolled over so far.
    segments: u32,
}

impl TableFile {
    /// Hands the pending lines to the file. They are always whole lines, so a process killed
    /// at any instant leaves a file whose lines all parse, barring a write cut short.
    fn write_pending(&mut self, budget: Option<&OutputBudget>) -> std::io::Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let result = self.write_lines(&pending, budget);
        // On an error the lines are dropped (and counted by the collector): a file that fails
        // once must not grow without bound in memory.
        self.pending = pending;
        self.pending.clear();
        result
    }

    /// Writes whole lines, rolling the file over first when a budget says so.
    fn write_lines(&mut self, lines: &[u8], budget: Option<&OutputBudget>) -> std::io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let n = lines.len() as u64;
        if let Some(budget) = budget {
            if self.size > self.header.len() as u64 && self.size + n > budget.segment_bytes() {
                self.roll(budget)?;
            }
            budget.reserve(self.table.file_name(), n)?;
        }
        self.file.write_all(lines)?;
        self.size += n;
        self.written += n;
        Ok(())
    }

    /// Renames the file to the next number and starts a new one with the header.
    fn roll(&mut self, budget: &OutputBudget) -> std::io::Result<()> {
        self.file.flush()?;
        let rolled = self.path.with_file_name(format!("{}.{}.csv", self.table.name(), self.segments + 1));
        std::fs::rename(&self.path, &rolled)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot roll {} over: {e}", self.path.display())))?;
        self.segments += 1;
        budget.rolled(self.table.file_name(), rolled);
        budget.reserve(self.table.file_name(), self.header.len() as u64)?;
        self.file = File::create(&self.path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", self.path.display())))?;
        self.file.write_all(&self.header)?;
        self.size = self.header.len() as u64;
        self.written += self.size;
        Ok(())
    }
}

impl std::fmt::Debug for CsvSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsvSink").field("dir", &self.dir).finish()
    }
}

const BUFFER: usize = 256 * 1024;

impl CsvSink {
    /// Creates (truncating) the CSV files of every profiler `config` enables, in `dir`, and
    /// writes their headers.
    ///
    /// # Errors
    ///
    /// Any I/O error from creating a file or writing its header.
    pub fn create(dir: &Path, config: &Config) -> std::io::Result<CsvSink> {
        let mut tables = Vec::new();
        for table in Table::ALL {
            if !config.is_enabled(table.profiler()) {
                continue;
            }
            let path = dir.join(table.file_name());
            let mut file = File::create(&path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))?;
            let mut header = Line::new(Vec::new());
            for column in table.columns() {
                header.field(column.as_bytes());
            }
            let header = header.end();
            file.write_all(&header)?;
            // Numbered files of an earlier run in this directory would read as this run's.
            for k in 1.. {
                match std::fs::remove_file(dir.join(format!("{}.{k}.csv", table.name()))) {
                    Ok(()) => {}
                    Err(_) => break,
                }
            }
            let size = header.len() as u64;
            tables.push(TableFile {
                table,
                file,
                path,
                header,
                pending: Vec::with_capacity(BUFFER + 4096),
                size,
                written: size,
                segments: 0,
            });
        }
        Ok(CsvSink { dir: dir.to_path_buf(), tables, budget: None, chunk: BUFFER })
    }

    /// Opens the CSV files of every profiler `config` enables in `dir` for appending (a replay
    /// of a dead session's buffers, see [`crate::recover_buffers`]), creating with its header a
    /// file that is missing or empty. The files must end with a whole line
    /// ([`crate::drop_torn_line`] makes sure of it).
    ///
    /// ```
    /// use profilemate_core::Sink;
    /// let dir = tempfile::tempdir()?;
    /// drop(profilemate_sinks::CsvSink::create(dir.path(), &Default::default())?);
    /// let mut sink = profilemate_sinks::CsvSink::append(dir.path(), &Default::default())?;
    /// sink.flush()?;
    /// let text = std::fs::read_to_string(dir.path().join("forward_pass_timing.csv"))?;
    /// assert_eq!(text.lines().count(), 1, "one header, not two");
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Any I/O error from opening a file or writing a header, naming the file.
    pub fn append(dir: &Path, config: &Config) -> std::io::Result<CsvSink> {
        let mut tables = Vec::new();
        for table in Table::ALL {
            if !config.is_enabled(table.profiler()) {
                continue;
            }
            let path = dir.join(table.file_name());
            let named =
                |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot append to {}: {e}", path.display()));
            let mut file = std::fs::OpenOptions::new().append(true).create(true).open(&path).map_err(named)?;
            let mut header = Line::new(Vec::new());
            for column in table.columns() {
                header.field(column.as_bytes());
            }
            let header = header.end();
            let mut size = file.metadata().map_err(named)?.len();
            if size == 0 {
                file.write_all(&header).map_err(named)?;
                size = header.len() as u64;
            }
            tables.push(TableFile {
                table,
                file,
                path,
                header,
                pending: Vec::with_capacity(BUFFER + 4096),
                size,
                written: 0,
                segments: 0,
            });
        }
        Ok(CsvSink { dir: dir.to_path_buf(), tables, budget: None, chunk: BUFFER })
    }

    /// Keeps the files within `budget` (shared with the run's other table sinks), rolling
    /// them over as it says. The headers already written are accounted.
    ///
    /// ```
    /// use profilemate_sinks::{CsvSink, OutputBudget};
    /// let dir = tempfile::tempdir()?;
    /// let budget = std::sync::Arc::new(OutputBudget::new(1 << 20, 9));
    /// let sink = CsvSink::create(dir.path(), &Default::default())?.with_budget(budget.clone())?;
    /// assert!(budget.bytes_on_disk() > 0);
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The budget cannot hold the headers.
    pub fn with_budget(mut self, budget: Arc<OutputBudget>) -> std::io::Result<CsvSink> {
        for t in &self.tables {
            budget.reserve(t.table.file_name(), t.size)?;
        }
        // Writes stay a small part of a file, so that the files being written fit together.
        self.chunk = BUFFER.min((budget.segment_bytes() / 4).max(4096) as usize);
        self.budget = Some(budget);
        Ok(self)
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Which profilers have files here.
    pub fn profilers(&self) -> Vec<ProfilerKind> {
        let mut v: Vec<_> = self.tables.iter().map(|t| t.table.profiler()).collect();
        v.dedup();
        v
    }
}

/// Appends one CSV line to a buffer, field by field. Text goes through the `csv_core` writer,
/// which decides the quoting (RFC 4180: a field holding a comma, a quote or a line break is
/// quoted, its quotes doubled). Numbers, formatted here from integers (nanoseconds, counts) by
/// integer arithmetic, exactly and without float formatting, never need quoting and are
/// appended as they are.
struct Line {
    out: Vec<u8>,
    writer: csv_core::Writer,
}

impl Line {
    fn new(out: Vec<u8>) -> Line {
        Line { out, writer: csv_core::Writer::new() }
    }

    /// A field of text, then its comma.
    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        // Quoted, a field takes at most twice its length plus its two quotes and the comma.
        let at = self.out.len();
        self.out.resize(at + 2 * bytes.len() + 3, 0);
        let (result, _, n) = self.writer.field(bytes, &mut self.out[at..]);
        debug_assert_eq!(result, csv_core::WriteResult::InputEmpty);
        // The closing quote, if the field was quoted, and the comma.
        let (result, m) = self.writer.delimiter(&mut self.out[at + n..]);
        debug_assert_eq!(result, csv_core::WriteResult::InputEmpty);
        self.out.truncate(at + n + m);
        self
    }

    /// Ends the line: its last comma becomes the line feed.
    fn finish_line(&mut self) {
        if let Some(last) = self.out.last_mut() {
            debug_assert_eq!(*last, b',');
            *last = b'\n';
        }
    }

    /// Ends the line and gives the buffer back.
    fn end(mut self) -> Vec<u8> {
        self.finish_line();
        self.out
    }

    /// Digits of `v`.
    fn digits(&mut self, v: u64) {
        self.out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }
    fn text(&mut self, s: &str) -> &mut Self {
        self.field(s.as_bytes())
    }
    fn empty(&mut self) -> &mut Self {
        self.out.push(b',');
        self
    }
    fn int(&mut self, v: impl Into<u64>) -> &mut Self {
        self.digits(v.into());
        self.out.push(b',');
        self
    }
    /// `int.frac` with `frac` zero-padded to `digits`.
    fn fixed(&mut self, int: u64, frac: u64, digits: usize) -> &mut Self {
        self.digits(int);
        self.out.push(b'.');
        let mut buf = itoa::Buffer::new();
        let f = buf.format(frac).as_bytes();
        for _ in f.len()..digits {
            self.out.push(b'0');
        }
        self.out.extend_from_slice(f);
        self.out.push(b',');
        self
    }
    /// Nanoseconds as seconds with 6 decimals (rounded to the microsecond).
    fn sec(&mut self, ns: u64) -> &mut Self {
        let us = numbers::round_us(ns);
        self.fixed(us / 1_000_000, us % 1_000_000, 6)
    }
    fn opt_sec(&mut self, ns: Option<u64>) -> &mut Self {
        match ns {
            Some(ns) => self.sec(ns),
            None => self.empty(),
        }
    }
    /// Nanoseconds as milliseconds with 6 decimals (exact).
    fn ms(&mut self, ns: u64) -> &mut Self {
        self.fixed(ns / 1_000_000, ns % 1_000_000, 6)
    }
    /// `num / max * 100` clamped to 100, with 4 decimals; empty when `max` is 0.
    fn pct(&mut self, num: u32, max: u32) -> &mut Self {
        match numbers::pct_e4(num, max) {
            Some(scaled) => self.fixed(scaled / 10_000, scaled % 10_000, 4),
            None => self.empty(),
        }
    }
    fn opt_int(&mut self, v: Option<impl Into<u64>>) -> &mut Self {
        match v {
            Some(v) => self.int(v),
            None => self.empty(),
        }
    }
    fn opt_ms(&mut self, ns: Option<u64>) -> &mut Self {
        match ns {
            Some(ns) => self.ms(ns),
            None => self.empty(),
        }
    }
    /// A float with 4 decimals; empty for `None` (never NaN: the timeline's figures are finite).
    fn opt_f4(&mut self, v: Option<f64>) -> &mut Self {
        match v.filter(|v| v.is_finite()) {
            Some(v) => {
                let scaled = (v.max(0.0) * 1e4).round() as u64;
                self.fixed(scaled / 10_000, scaled % 10_000, 4)
            }
            None => self.empty(),
        }
    }
    /// `tokens / ns * 10^9` with at least 6 significant digits and 3 decimals; empty when `ns`
    /// is 0.
    fn throughput(&mut self, tokens: u32, ns: u64) -> &mut Self {
        match numbers::throughput_fixed(tokens, ns) {
            Some((t, d)) => {
                let scale = 10u64.pow(d);
                self.fixed(t / scale, t % scale, d as usize)
            }
            None => self.empty(),
        }
    }
}

impl CsvSink {
    fn write_table(&mut self, table: Table, rows: &Rows) -> std::io::Result<()> {
        let (budget, chunk) = (self.budget.as_deref(), self.chunk);
        let Some(file) = self.tables.iter_mut().find(|t| t.table == table) else {
            return Ok(());
        };
        let mut b = Line::new(std::mem::take(&mut file.pending));
        let mut result = Ok(());
        macro_rules! emit {
            ($b:ident) => {{
                $b.finish_line();
                if $b.out.len() >= chunk {
                    result = result.and(file.write_lines(&$b.out, budget));
                    $b.out.clear();
                }
            }};
        }
        match table {
            Table::ForwardPass => {
                for r in &rows.forward_pass {
                    b.sec(r.timestamp_ns)
                        .text(r.phase.as_str())
                        .int(r.batch_size)
                        .int(r.num_tokens)
                        .ms(r.forward_time_ns)
                        .throughput(r.num_tokens, r.forward_time_ns)
                        .opt_int(r.step);
                    emit!(b);
                }
            }
            Table::CpuOperations => {
                for r in &rows.cpu_operations {
                    b.sec(r.timestamp_ns).text(&r.operation).ms(r.duration_ns).text(&r.context).opt_int(r.step);
                    emit!(b);
                }
            }
            Table::BatchUtilization => {
                for r in &rows.batch_utilization {
                    b.sec(r.timestamp_ns)
                        .int(r.num_seqs)
                        .int(r.max_num_seqs)
                        .pct(r.num_seqs, r.max_num_seqs)
                        .int(r.num_tokens)
                        .int(r.max_tokens)
                        .pct(r.num_tokens, r.max_tokens)
                        .text(r.phase.as_str())
                        .int(r.running_queue_len)
                        .int(r.waiting_queue_len)
                        .opt_int(r.step);
                    emit!(b);
                }
            }
            Table::PreemptionEvents => {
                for r in &rows.preemption_events {
                    b.sec(r.timestamp_ns)
                        .text(&r.request_id)
                        .text(r.event.as_str())
                        .text(&r.reason)
                        .opt_sec(r.running_time_ns)
                        .text(&r.extra_info)
                        .opt_int(r.step);
                    emit!(b);
                }
            }
            Table::RequestLifecycle => {
                for r in &rows.request_lifecycle {
                    b.text(&r.request_id)
                        .opt_sec(r.started_ns)
                        .opt_sec(r.preempted_ns)
                        .opt_sec(r.resumed_ns)
                        .opt_sec(r.finished_ns)
                        .opt_sec(r.total_time_ns)
                        .opt_sec(r.preemption_delay_ns)
                        .int(r.num_preemptions)
                        .text(r.outcome.as_str());
                    emit!(b);
                }
            }
            Table::EncoderDecoder => {
                for r in &rows.encoder_decoder {
                    b.sec(r.timestamp_ns).text(r.component.as_str()).ms(r.duration_ns).text(&r.context).opt_int(r.step);
                    emit!(b);
                }
            }
            Table::KvCacheUsage => {
                for r in &rows.kv_cache {
                    b.sec(r.timestamp_ns)
                        .int(r.used_blocks)
                        .int(r.total_blocks)
                        .pct(r.used_blocks, r.total_blocks)
                        .int(r.prefix_cache_queries)
                        .int(r.prefix_cache_hits)
                        .opt_int(r.step);
                    emit!(b);
                }
            }
            Table::CudaGraphEvents => {
                for r in &rows.cuda_graph {
                    b.sec(r.timestamp_ns).text(r.event.as_str()).int(r.batch_size);
                    match r.padded_batch_size {
                        Some(p) => b.int(p),
                        None => b.empty(),
                    };
                    match r.duration_ns {
                        Some(ns) => b.ms(ns),
                        None => b.empty(),
                    };
                    b.opt_int(r.step);
                    emit!(b);
                }
            }
            Table::MoeExpertRouting => {
                for r in &rows.moe_routing {
                    b.sec(r.timestamp_ns)
                        .int(r.layer)
                        .int(r.expert_id)
                        .int(r.num_tokens)
                        .int(r.window_first_step)
                        .int(r.window_steps)
                        .opt_int(r.step);
                    emit!(b);
                }
            }
            Table::StepTimeline => {
                for r in &rows.step_timeline {
                    b.int(r.step).sec(r.start_ns);
                    match r.phase {
                        Some(p) => b.text(p.as_str()),
                        None => b.empty(),
                    };
                    b.opt_int(r.batch_size)
                        .opt_int(r.num_tokens)
                        .int(r.forward_passes)
                        .opt_ms(r.forward_time_ns)
                        .opt_ms(r.scheduling_ns)
                        .opt_ms(r.batch_preparation_ns)
                        .opt_ms(r.sampling_ns)
                        .opt_ms(r.other_cpu_ns)
                        .ms(r.wall_ns)
                        .opt_ms(r.host_gap_before_ns)
                        .ms(r.unclaimed_ns)
                        .opt_f4(r.seq_utilization_pct)
                        .opt_f4(r.token_utilization_pct)
                        .opt_int(r.running_queue_len)
                        .opt_int(r.waiting_queue_len)
                        .opt_f4(r.kv_cache_usage_pct);
                    match r.cuda_graph {
                        Some(e) => b.text(e.as_str()),
                        None => b.empty(),
                    };
                    b.opt_int(r.padded_batch_size)
                        .opt_f4(r.padding_pct)
                        .opt_int(r.preemptions)
                        .opt_int(r.resumes)
                        .opt_ms(r.encoder_time_ns)
                        .opt_ms(r.decoder_time_ns)
                        .opt_f4(r.moe_max_over_mean);
                    emit!(b);
                }
            }
        }
        file.pending = b.out;
        result
    }
}

impl Sink for CsvSink {
    fn name(&self) -> &str {
        "csv"
    }

    fn write_rows(&mut self, rows: &Rows) -> Result<(), SinkError> {
        let mut first_error = None;
        for table in Table::ALL {
            if rows.len(table) > 0 {
                if let Err(e) = self.write_table(table, rows) {
                    first_error.get_or_insert_with(|| format!("{}: {e}", table.file_name()));
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn output_files(&self) -> Option<OutputFiles> {
        let bytes_written = self.tables.iter().map(|t| (t.table.file_name().to_string(), t.written)).collect();
        let (rolled, removed) = match &self.budget {
            Some(b) => b.files(|key| key.ends_with(".csv")),
            None => Default::default(),
        };
        Some(OutputFiles { bytes_written, rolled, removed })
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        let budget = self.budget.as_deref();
        let mut first_error = None;
        for t in &mut self.tables {
            if let Err(e) = t.write_pending(budget).and_then(|()| t.file.flush()) {
                first_error.get_or_insert_with(|| format!("{}: {e}", t.table.file_name()));
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(f: impl FnOnce(&mut Line)) -> String {
        let mut line = Line::new(Vec::new());
        f(&mut line);
        let text = String::from_utf8(line.end()).unwrap();
        text.strip_suffix('\n').unwrap_or_else(|| panic!("{text:?}")).to_string()
    }

    #[test]
    fn text_is_quoted_only_where_needed() {
        let line = |fields: &[&str]| {
            let mut line = Line::new(Vec::new());
            for f in fields {
                line.text(f);
            }
            line.int(7u32);
            String::from_utf8(line.end()).unwrap()
        };
        assert_eq!(line(&["plain", "", "tab\there"]), "plain,,tab\there,7\n");
        assert_eq!(
            line(&["a,b", "say \"hi\"", "two\nlines", "cr\r"]),
            "\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",\"cr\r\",7\n"
        );
        assert_eq!(line(&["\"", "é ü 😀"]), "\"\"\"\",é ü 😀,7\n");
    }

    #[test]
    fn numbers_are_written_exactly() {
        assert_eq!(
            field(|b| {
                b.sec(0);
            }),
            "0.000000"
        );
        assert_eq!(
            field(|b| {
                b.sec(1_234_567_499);
            }),
            "1.234567"
        );
        assert_eq!(
            field(|b| {
                b.sec(1_234_567_500);
            }),
            "1.234568"
        );
        assert_eq!(
            field(|b| {
                b.sec(999_999_999_999);
            }),
            "1000.000000"
        );
        assert_eq!(
            field(|b| {
                b.ms(45_234_001);
            }),
            "45.234001"
        );
        assert_eq!(
            field(|b| {
                b.ms(7);
            }),
            "0.000007"
        );
        assert_eq!(
            field(|b| {
                b.pct(24, 256);
            }),
            "9.3750"
        );
        assert_eq!(
            field(|b| {
                b.pct(1, 3);
            }),
            "33.3333"
        );
        assert_eq!(
            field(|b| {
                b.pct(2, 3);
            }),
            "66.6667"
        );
        assert_eq!(
            field(|b| {
                b.pct(300, 256);
            }),
            "100.0000"
        );
        assert_eq!(
            field(|b| {
                b.pct(5, 0);
            }),
            ""
        );
        assert_eq!(
            field(|b| {
                b.throughput(256, 45_234_000);
            }),
            "5659.460"
        );
        assert_eq!(
            field(|b| {
                b.throughput(1, 0);
            }),
            ""
        );
        assert_eq!(
            field(|b| {
                b.int(u64::MAX);
            }),
            "18446744073709551615"
        );
    }

    #[test]
    fn written_numbers_agree_with_the_rows_floats() {
        for ns in [1u64, 999, 1_000_001, 45_234_567, 3_600_000_000_123] {
            let ms: f64 = field(|b| {
                b.ms(ns);
            })
            .parse()
            .unwrap();
            assert!((ms - ns as f64 / 1e6).abs() <= 1e-9 * ms.max(1.0));
        }
        for (num, max) in [(1u32, 7u32), (24, 256), (8191, 8192)] {
            let pct: f64 = field(|b| {
                b.pct(num, max);
            })
            .parse()
            .unwrap();
            assert!((pct - f64::from(num) / f64::from(max) * 100.0).abs() <= 0.5e-4 + 1e-12);
        }
    }
}
