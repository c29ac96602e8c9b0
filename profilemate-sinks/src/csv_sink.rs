//! The contract CSV tables.

use crate::numbers;
use profilemate_core::{Config, ProfilerKind, Rows, Sink, SinkError, Table};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Writes the contract CSV tables (those of the enabled profilers and trackers) into a directory.
///
/// Each file is created with its header row at once, so a reader finds every file from the
/// start of the run. Rows are buffered and reach the disk at every flush (about once a second);
/// a process killed at any instant leaves files whose complete lines all parse.
///
/// Formats: seconds with 6 decimals (rounded to the microsecond), milliseconds with 6 (exact to
/// the nanosecond), percentages with 4, throughput with 3, all written from the integer
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
pub struct CsvSink {
    dir: PathBuf,
    writers: Vec<(Table, csv::Writer<File>)>,
    record: csv::ByteRecord,
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
        Ok(CsvSink { dir: dir.to_path_buf(), writers, record: csv::ByteRecord::new() })
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

/// Builds one CSV record field by field. Times are integers (nanoseconds) and are written
/// with integer arithmetic, exactly and without float formatting.
struct RecordBuilder<'a> {
    record: &'a mut csv::ByteRecord,
}

impl RecordBuilder<'_> {
    fn text(&mut self, s: &str) -> &mut Self {
        self.record.push_field(s.as_bytes());
        self
    }
    fn empty(&mut self) -> &mut Self {
        self.record.push_field(b"");
        self
    }
    fn int(&mut self, v: impl Into<u64>) -> &mut Self {
        let mut buf = [0u8; 20];
        self.record.push_field(fmt_u64(&mut buf, v.into()));
        self
    }
    /// `int.frac` with `frac` zero-padded to `digits`.
    fn fixed(&mut self, int: u64, frac: u64, digits: usize) -> &mut Self {
        let mut buf = [0u8; 48];
        let mut digits_buf = [0u8; 20];
        let i = fmt_u64(&mut digits_buf, int);
        let mut at = i.len();
        buf[..at].copy_from_slice(i);
        buf[at] = b'.';
        at += 1;
        let f = fmt_u64(&mut digits_buf, frac);
        for _ in f.len()..digits {
            buf[at] = b'0';
            at += 1;
        }
        buf[at..at + f.len()].copy_from_slice(f);
        at += f.len();
        self.record.push_field(&buf[..at]);
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
    /// `tokens / ns * 10^9` with 3 decimals; empty when `ns` is 0.
    fn throughput(&mut self, tokens: u32, ns: u64) -> &mut Self {
        match numbers::throughput_e3(tokens, ns) {
            Some(milli) => self.fixed(milli / 1000, milli % 1000, 3),
            None => self.empty(),
        }
    }
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
        let mut b = RecordBuilder { record: &mut self.record };
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
                        .throughput(r.num_tokens, r.forward_time_ns);
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
                        .pct(r.num_seqs, r.max_num_seqs)
                        .int(r.num_tokens)
                        .int(r.max_tokens)
                        .pct(r.num_tokens, r.max_tokens)
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
            Table::KvCacheUsage => {
                for r in &rows.kv_cache {
                    b.sec(r.timestamp_ns)
                        .int(r.used_blocks)
                        .int(r.total_blocks)
                        .pct(r.used_blocks, r.total_blocks)
                        .int(r.prefix_cache_queries)
                        .int(r.prefix_cache_hits);
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
                    emit!(b);
                }
            }
            Table::MoeExpertRouting => {
                for r in &rows.moe_routing {
                    b.sec(r.timestamp_ns).int(r.layer).int(r.expert_id).int(r.num_tokens);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn field(f: impl FnOnce(&mut RecordBuilder<'_>)) -> String {
        let mut record = csv::ByteRecord::new();
        f(&mut RecordBuilder { record: &mut record });
        String::from_utf8(record[0].to_vec()).unwrap()
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
