//! The contract CSV tables.

use profilemate_core::{ns_to_ms, ns_to_sec, Config, ProfilerKind, Rows, Sink, SinkError, Table};
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Writes the six contract CSV tables (one per enabled profiler table) into a directory.
///
/// Each file is created with its header row at once, so a reader finds every file from the
/// start of the run. Rows are buffered and reach the disk at every flush (about once a second);
/// a process killed at any instant leaves files whose complete lines all parse.
///
/// Formats: seconds with 6 decimals, milliseconds with 6, percentages with 4, throughput with
/// 3; a field with no value is empty; text is quoted where RFC 4180 requires it.
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
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct CsvSink {
    dir: PathBuf,
    writers: Vec<(Table, csv::Writer<File>)>,
    record: csv::ByteRecord,
    field: String,
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
        let mut writers = Vec::new();
        for table in Table::ALL {
            if !config.is_enabled(table.profiler()) {
                continue;
            }
            let path = dir.join(table.file_name());
            let file = File::create(&path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))?;
            let mut w = csv::WriterBuilder::new()
                .terminator(csv::Terminator::Any(b'\n'))
                .buffer_capacity(BUFFER)
                .from_writer(file);
            w.write_record(table.columns()).map_err(std::io::Error::other)?;
            w.flush()?;
            writers.push((table, w));
        }
        Ok(CsvSink { dir: dir.to_path_buf(), writers, record: csv::ByteRecord::new(), field: String::new() })
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Which profilers have files here.
    pub fn profilers(&self) -> Vec<ProfilerKind> {
        let mut v: Vec<_> = self.writers.iter().map(|(t, _)| t.profiler()).collect();
        v.dedup();
        v
    }
}

/// Builds one CSV record field by field, formatting numbers without allocating.
struct RecordBuilder<'a> {
    record: &'a mut csv::ByteRecord,
    field: &'a mut String,
}

impl RecordBuilder<'_> {
    fn text(&mut self, s: &str) -> &mut Self {
        self.record.push_field(s.as_bytes());
        self
    }
    fn int(&mut self, v: impl Into<u64>) -> &mut Self {
        let mut b = itoa_buf();
        let s = fmt_u64(&mut b, v.into());
        self.record.push_field(s);
        self
    }
    fn float(&mut self, v: f64, decimals: usize) -> &mut Self {
        self.field.clear();
        let _ = write!(self.field, "{v:.decimals$}");
        self.record.push_field(self.field.as_bytes());
        self
    }
    fn opt_float(&mut self, v: Option<f64>, decimals: usize) -> &mut Self {
        match v {
            Some(v) if v.is_finite() => self.float(v, decimals),
            _ => self.text(""),
        }
    }
    fn sec(&mut self, ns: u64) -> &mut Self {
        self.float(ns_to_sec(ns), 6)
    }
    fn opt_sec(&mut self, ns: Option<u64>) -> &mut Self {
        self.opt_float(ns.map(ns_to_sec), 6)
    }
    fn ms(&mut self, ns: u64) -> &mut Self {
        self.float(ns_to_ms(ns), 6)
    }
}

fn itoa_buf() -> [u8; 20] {
    [0; 20]
}

fn fmt_u64(buf: &mut [u8; 20], mut v: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

impl CsvSink {
    fn write_table(&mut self, table: Table, rows: &Rows) -> csv::Result<()> {
        let Some((_, w)) = self.writers.iter_mut().find(|(t, _)| *t == table) else {
            return Ok(());
        };
        let mut b = RecordBuilder { record: &mut self.record, field: &mut self.field };
        macro_rules! emit {
            ($b:ident) => {{
                w.write_byte_record($b.record)?;
                $b.record.clear();
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
                        .opt_float(r.throughput_tokens_per_sec(), 3);
                    emit!(b);
                }
            }
            Table::CpuOperations => {
                for r in &rows.cpu_operations {
                    b.sec(r.timestamp_ns).text(&r.operation).ms(r.duration_ns).text(&r.context);
                    emit!(b);
                }
            }
            Table::BatchUtilization => {
                for r in &rows.batch_utilization {
                    b.sec(r.timestamp_ns)
                        .int(r.num_seqs)
                        .int(r.max_num_seqs)
                        .opt_float(r.seq_utilization_pct, 4)
                        .int(r.num_tokens)
                        .int(r.max_tokens)
                        .opt_float(r.token_utilization_pct, 4)
                        .text(r.phase.as_str())
                        .int(r.running_queue_len)
                        .int(r.waiting_queue_len);
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
                        .text(&r.extra_info);
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
                    b.sec(r.timestamp_ns).text(r.component.as_str()).ms(r.duration_ns).text(&r.context);
                    emit!(b);
                }
            }
        }
        Ok(())
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
                    self.record.clear();
                    first_error.get_or_insert_with(|| format!("{}: {e}", table.file_name()));
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        for (table, w) in &mut self.writers {
            w.flush().map_err(|e| format!("{}: {e}", table.file_name()))?;
        }
        Ok(())
    }
}
