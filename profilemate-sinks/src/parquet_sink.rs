//! The contract tables as Parquet files (the `parquet` feature).

use crate::numbers;
use crate::OutputBudget;
use parquet::basic::{Compression, LogicalType, Repetition, Type as PhysicalType};
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::{Type, TypePtr};
use profilemate_core::{Config, OutputFiles, ProfilerKind, Rows, RunManifest, Sink, SinkError, Table};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rows a table buffers before it writes them as one row group, unless
/// [`DEFAULT_ROW_GROUP_BYTES`] is reached first.
pub const DEFAULT_ROW_GROUP_ROWS: usize = 65_536;

/// Bytes (an estimate: 8 per number, the length of each text) a table buffers before it writes
/// them as one row group. This bounds memory when rows carry long text.
pub const DEFAULT_ROW_GROUP_BYTES: usize = 8 << 20;

/// The file name suffix of a table still being written; renamed to `.parquet` at shutdown.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// Writes the contract tables (those of the enabled profilers and trackers) as Parquet files,
/// `<table>.parquet` (`forward_pass_timing.parquet`, ...), into a directory.
///
/// - **Columns**: the contract CSV columns in the same order, then `host` (text) and `rank`
///   (integer, null when unknown), so that the files of many processes and machines read as one
///   table (`SELECT ... FROM 'runs/*/forward_pass_timing.parquet'`).
/// - **Types**: counts are `INT64`; times, durations, percentages and throughput are `DOUBLE`,
///   equal bit for bit to what a CSV reader parses from the same row of the CSV file (seconds
///   rounded to the microsecond, milliseconds exact to the nanosecond); text is `UTF8`. A field the
///   CSV leaves empty is null.
/// - **Compression**: Snappy, with dictionary encoding (a `phase` or `host` column costs almost
///   nothing).
/// - **Memory stays flat**: each table buffers at most [`DEFAULT_ROW_GROUP_ROWS`] rows (or
///   [`DEFAULT_ROW_GROUP_BYTES`]), then writes them to its file as one row group; see
///   [`with_row_group_rows`](Self::with_row_group_rows).
/// - **Complete at shutdown**: a Parquet file is readable only once its footer is written, so
///   each table is written as `<table>.parquet.partial` and renamed to `<table>.parquet` by
///   [`finish`](Sink::finish). A process killed mid-run leaves `.partial` files that readers
///   globbing `*.parquet` never see; the CSV files are the format that survives a kill.
///
/// ```
/// use profilemate_core::{Config, Phase, Session};
/// use profilemate_sinks::ParquetSink;
/// use parquet::file::reader::{FileReader, SerializedFileReader};
/// use parquet::record::RowAccessor;
///
/// let dir = tempfile::tempdir()?;
/// let sink = ParquetSink::create(dir.path(), &Config::default())?.with_rank(Some(3));
/// let session = Session::builder().in_memory_only().sink(sink).build()?;
/// session.forward_pass().record(Phase::Decode, 8, 8, std::time::Duration::from_millis(2));
/// session.shutdown()?; // writes the last row groups and the footers
///
/// let file = std::fs::File::open(dir.path().join("forward_pass_timing.parquet"))?;
/// let reader = SerializedFileReader::new(file)?;
/// assert_eq!(reader.metadata().file_metadata().num_rows(), 1);
/// let row = reader.get_row_iter(None)?.next().unwrap()?;
/// assert_eq!(row.get_double(4)?, 2.0); // forward_time_ms
/// assert_eq!(row.get_long(6)?, 1); // step: the forward pass opened step 1
/// assert_eq!(row.get_long(8)?, 3); // rank
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
pub struct ParquetSink {
    dir: PathBuf,
    tables: Vec<TableFile>,
    host: ByteArray,
    host_text: String,
    rank: Option<i64>,
    row_group_rows: usize,
    row_group_bytes: usize,
    finished: bool,
}

impl std::fmt::Debug for ParquetSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetSink")
            .field("dir", &self.dir)
            .field("host", &self.host_text)
            .field("rank", &self.rank)
            .field("row_group_rows", &self.row_group_rows)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Double,
    Long,
    Text,
}

/// One column: its name (as in [`Table::columns`]), its type, and whether it may be null.
type ColumnSpec = (&'static str, Kind, bool);

const HOST_RANK: [ColumnSpec; 2] = [("host", Kind::Text, false), ("rank", Kind::Long, true)];

/// The columns of `table`, without `host` and `rank`. Text columns are nullable (an empty text
/// field is empty in the CSV); numbers are nullable where the CSV may leave them empty.
fn contract_columns(table: Table) -> &'static [ColumnSpec] {
    use Kind::{Double as D, Long as L, Text as T};
    match table {
        Table::ForwardPass => &[
            ("timestamp_sec", D, false),
            ("phase", T, true),
            ("batch_size", L, false),
            ("num_tokens", L, false),
            ("forward_time_ms", D, false),
            ("throughput_tokens_per_sec", D, true),
            ("step", L, true),
        ],
        Table::CpuOperations => &[
            ("timestamp_sec", D, false),
            ("operation", T, true),
            ("duration_ms", D, false),
            ("context", T, true),
            ("step", L, true),
        ],
        Table::BatchUtilization => &[
            ("timestamp_sec", D, false),
            ("num_seqs", L, false),
            ("max_num_seqs", L, false),
            ("seq_utilization_pct", D, true),
            ("num_tokens", L, false),
            ("max_tokens", L, false),
            ("token_utilization_pct", D, true),
            ("phase", T, true),
            ("running_queue_len", L, false),
            ("waiting_queue_len", L, false),
            ("step", L, true),
        ],
        Table::PreemptionEvents => &[
            ("timestamp_sec", D, false),
            ("request_id", T, true),
            ("event", T, true),
            ("reason", T, true),
            ("running_time_sec", D, true),
            ("extra_info", T, true),
            ("step", L, true),
        ],
        Table::RequestLifecycle => &[
            ("request_id", T, true),
            ("started_sec", D, true),
            ("preempted_sec", D, true),
            ("resumed_sec", D, true),
            ("finished_sec", D, true),
            ("total_time_sec", D, true),
            ("preemption_delay_sec", D, true),
            ("num_preemptions", L, false),
            ("outcome", T, true),
        ],
        Table::EncoderDecoder => &[
            ("timestamp_sec", D, false),
            ("component", T, true),
            ("duration_ms", D, false),
            ("context", T, true),
            ("step", L, true),
        ],
        Table::KvCacheUsage => &[
            ("timestamp_sec", D, false),
            ("used_blocks", L, false),
            ("total_blocks", L, false),
            ("usage_pct", D, true),
            ("prefix_cache_queries", L, false),
            ("prefix_cache_hits", L, false),
            ("step", L, true),
        ],
        Table::CudaGraphEvents => &[
            ("timestamp_sec", D, false),
            ("event", T, true),
            ("batch_size", L, false),
            ("padded_batch_size", L, true),
            ("duration_ms", D, true),
            ("step", L, true),
        ],
        Table::MoeExpertRouting => &[
            ("timestamp_sec", D, false),
            ("layer", L, false),
            ("expert_id", L, false),
            ("num_tokens", L, false),
            ("window_first_step", L, false),
            ("window_steps", L, false),
            ("step", L, true),
        ],
        Table::StepTimeline => &[
            ("step", L, false),
            ("start_sec", D, false),
            ("phase", T, true),
            ("batch_size", L, true),
            ("num_tokens", L, true),
            ("forward_passes", L, false),
            ("forward_time_ms", D, true),
            ("scheduling_ms", D, true),
            ("batch_preparation_ms", D, true),
            ("sampling_ms", D, true),
            ("other_cpu_ms", D, true),
            ("step_wall_ms", D, false),
            ("host_gap_before_ms", D, true),
            ("unclaimed_ms", D, false),
            ("seq_utilization_pct", D, true),
            ("token_utilization_pct", D, true),
            ("running_queue_len", L, true),
            ("waiting_queue_len", L, true),
            ("kv_cache_usage_pct", D, true),
            ("cuda_graph", T, true),
            ("padded_batch_size", L, true),
            ("padding_pct", D, true),
            ("preemptions", L, true),
            ("resumes", L, true),
            ("encoder_time_ms", D, true),
            ("decoder_time_ms", D, true),
            ("moe_max_over_mean", D, true),
        ],
    }
}

/// The Parquet file name of `table`: its CSV name with `.parquet` for `.csv`.
///
/// ```
/// use profilemate_core::Table;
/// assert_eq!(profilemate_sinks::parquet_file_name(Table::ForwardPass), "forward_pass_timing.parquet");
/// ```
pub fn parquet_file_name(table: Table) -> String {
    format!("{}.parquet", table.name())
}

fn schema(table: Table) -> parquet::errors::Result<TypePtr> {
    let mut fields = Vec::new();
    for &(name, kind, nullable) in contract_columns(table).iter().chain(&HOST_RANK) {
        let (physical, logical) = match kind {
            Kind::Double => (PhysicalType::DOUBLE, None),
            Kind::Long => (PhysicalType::INT64, None),
            Kind::Text => (PhysicalType::BYTE_ARRAY, Some(LogicalType::String)),
        };
        let repetition = if nullable { Repetition::OPTIONAL } else { Repetition::REQUIRED };
        let field = Type::primitive_type_builder(name, physical)
            .with_repetition(repetition)
            .with_logical_type(logical)
            .build()?;
        fields.push(Arc::new(field));
    }
    Ok(Arc::new(Type::group_type_builder("schema").with_fields(fields).build()?))
}

enum Values {
    Double(Vec<f64>),
    Long(Vec<i64>),
    Text(Vec<ByteArray>),
}

/// A column's buffered values; `defs` holds one definition level per row (1 set, 0 null) for a
/// nullable column, and nulls have no entry in `values`.
struct Column {
    nullable: bool,
    values: Values,
    defs: Vec<i16>,
}

impl Column {
    fn new((_, kind, nullable): ColumnSpec) -> Column {
        let values = match kind {
            Kind::Double => Values::Double(Vec::new()),
            Kind::Long => Values::Long(Vec::new()),
            Kind::Text => Values::Text(Vec::new()),
        };
        Column { nullable, values, defs: Vec::new() }
    }

    fn set(&mut self, present: bool) {
        if self.nullable {
            self.defs.push(i16::from(present));
        }
    }

    fn double(&mut self, v: Option<f64>) {
        self.set(v.is_some());
        if let (Values::Double(values), Some(v)) = (&mut self.values, v) {
            values.push(v);
        }
    }

    fn long(&mut self, v: Option<i64>) {
        self.set(v.is_some());
        if let (Values::Long(values), Some(v)) = (&mut self.values, v) {
            values.push(v);
        }
    }

    /// Text; empty text is null, as the CSV field is empty. Returns the bytes buffered.
    fn text(&mut self, s: &str) -> usize {
        self.set(!s.is_empty());
        if let (Values::Text(values), false) = (&mut self.values, s.is_empty()) {
            values.push(ByteArray::from(s));
        }
        s.len()
    }

    fn shared_text(&mut self, v: &ByteArray) {
        self.set(true);
        if let Values::Text(values) = &mut self.values {
            values.push(v.clone());
        }
    }

    fn clear(&mut self) {
        match &mut self.values {
            Values::Double(v) => v.clear(),
            Values::Long(v) => v.clear(),
            Values::Text(v) => v.clear(),
        }
        self.defs.clear();
    }
}

struct TableFile {
    table: Table,
    columns: Vec<Column>,
    rows: usize,
    bytes: usize,
    writer: Option<SerializedFileWriter<BufWriter<File>>>,
    partial: PathBuf,
    path: PathBuf,
    /// Under an output budget: each row group is a complete numbered file of its own.
    budget: Option<Arc<OutputBudget>>,
    segments: u32,
    /// Bytes of the numbered files written (under a budget).
    written: u64,
}

fn file_writer<W: std::io::Write + Send>(out: W, table: Table) -> Result<SerializedFileWriter<W>, SinkError> {
    let metadata = vec![
        KeyValue::new("profilemate.table".to_string(), table.name().to_string()),
        KeyValue::new("profilemate.version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ];
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(format!("profilemate {} (parquet-rs)", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(metadata))
        .build();
    Ok(SerializedFileWriter::new(out, schema(table)?, Arc::new(properties))?)
}

fn write_group<W: std::io::Write + Send>(
    writer: &mut SerializedFileWriter<W>,
    columns: &[Column],
) -> Result<(), SinkError> {
    let mut group = writer.next_row_group()?;
    for column in columns {
        let mut out = group.next_column()?.ok_or("the schema has fewer columns than the table")?;
        let defs = column.nullable.then_some(&column.defs[..]);
        match &column.values {
            Values::Double(v) => out.typed::<DoubleType>().write_batch(v, defs, None)?,
            Values::Long(v) => out.typed::<Int64Type>().write_batch(v, defs, None)?,
            Values::Text(v) => out.typed::<ByteArrayType>().write_batch(v, defs, None)?,
        };
        out.close()?;
    }
    group.close()?;
    Ok(())
}

impl TableFile {
    fn create(dir: &Path, table: Table) -> Result<TableFile, SinkError> {
        let path = dir.join(parquet_file_name(table));
        let partial = dir.join(format!("{}{PARTIAL_SUFFIX}", parquet_file_name(table)));
        // A finished file of an earlier run in this directory would mix with this run's.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("cannot replace {}: {e}", path.display()).into())
            }
            _ => {}
        }
        for k in 1.. {
            if std::fs::remove_file(dir.join(format!("{}.{k}.parquet", table.name()))).is_err() {
                break;
            }
        }
        let file = File::create(&partial).map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
        let writer = file_writer(BufWriter::with_capacity(1 << 20, file), table)?;
        let columns = contract_columns(table).iter().chain(&HOST_RANK).map(|&spec| Column::new(spec)).collect();
        Ok(TableFile {
            table,
            columns,
            rows: 0,
            bytes: 0,
            writer: Some(writer),
            partial,
            path,
            budget: None,
            segments: 0,
            written: 0,
        })
    }

    /// Bytes written so far: the numbered files under a budget, else the file's size on disk.
    fn bytes_written(&self) -> u64 {
        if self.budget.is_some() {
            return self.written;
        }
        let on_disk = if self.writer.is_some() { &self.partial } else { &self.path };
        std::fs::metadata(on_disk).map_or(0, |m| m.len())
    }

    /// Writes the buffered rows as the next numbered file, complete with its footer, after
    /// making room for it in the budget.
    fn write_segment(&mut self, budget: &OutputBudget) -> Result<(), SinkError> {
        let mut writer = file_writer(Vec::new(), self.table)?;
        write_group(&mut writer, &self.columns)?;
        let bytes = writer.into_inner()?;
        let key = parquet_file_name(self.table);
        budget.reserve(&key, bytes.len() as u64)?;
        let path = self.path.with_file_name(format!("{}.{}.parquet", self.table.name(), self.segments + 1));
        std::fs::write(&path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        self.segments += 1;
        self.written += bytes.len() as u64;
        budget.rolled(&key, path);
        Ok(())
    }

    /// Writes the buffered rows as one row group.
    fn write_row_group(&mut self) -> Result<(), SinkError> {
        if self.rows == 0 {
            return Ok(());
        }
        let result = self.write_columns();
        // After a failure the rows are lost either way; keep the buffers bounded.
        self.columns.iter_mut().for_each(Column::clear);
        self.rows = 0;
        self.bytes = 0;
        result
    }

    fn write_columns(&mut self) -> Result<(), SinkError> {
        if let Some(budget) = self.budget.clone() {
            return self.write_segment(&budget);
        }
        let writer = self.writer.as_mut().ok_or("the file is already closed")?;
        write_group(writer, &self.columns)
    }

    /// Writes what is left, the footer, and renames the file into place.
    fn close(&mut self) -> Result<(), SinkError> {
        self.write_row_group()?;
        if self.budget.is_some() {
            return Ok(());
        }
        if let Some(mut writer) = self.writer.take() {
            writer.finish()?;
            drop(writer);
            std::fs::rename(&self.partial, &self.path)
                .map_err(|e| format!("cannot rename {} into place: {e}", self.partial.display()))?;
        }
        Ok(())
    }
}

/// What [`ParquetSink::complete_partial`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParquetCompletion {
    /// The Parquet files written complete (`<table>.parquet`) from their CSV tables.
    pub completed: Vec<String>,
    /// The `.partial` files left as they were, each with the reason.
    pub not_completed: std::collections::BTreeMap<String, String>,
}

impl ParquetSink {
    /// Creates the Parquet files of every table `config` enables, in `dir` (as
    /// `<table>.parquet.partial` until shutdown), for this host (its name) and the rank
    /// [`rank_from_env`](crate::rank_from_env) finds.
    ///
    /// # Errors
    ///
    /// A file cannot be created, or `PROFILEMATE_RANK` is malformed.
    pub fn create(dir: &Path, config: &Config) -> Result<ParquetSink, SinkError> {
        let rank = crate::rank_from_env()?;
        let mut tables = Vec::new();
        for table in Table::ALL {
            if config.is_enabled(table.profiler()) {
                tables.push(TableFile::create(dir, table)?);
            }
        }
        let host_text = gethostname::gethostname().to_string_lossy().into_owned();
        Ok(ParquetSink {
            dir: dir.to_path_buf(),
            tables,
            host: ByteArray::from(host_text.as_str()),
            host_text,
            rank,
            row_group_rows: DEFAULT_ROW_GROUP_ROWS,
            row_group_bytes: DEFAULT_ROW_GROUP_BYTES,
            finished: false,
        })
    }

    /// Completes the `<table>.parquet.partial` files a killed process left in `dir` (no
    /// footer: no reader can open them): each is written again, as a complete
    /// `<table>.parquet`, from the rows of its CSV table (complete after
    /// [`recover_buffers`](crate::recover_buffers): the same rows), with `host` and `rank` as
    /// given. Every table the sink writes is completed so, `request_lifecycle` and
    /// `step_timeline` included. A table is left `.partial`, with the reason in
    /// [`ParquetCompletion::not_completed`], when it has no CSV table to be rebuilt from (the
    /// CSV sink was off) or when lines of its CSV table do not parse (the Parquet file would
    /// lack their rows).
    ///
    /// ```
    /// use profilemate_core::{Phase, Session, SinkKind};
    /// let dir = tempfile::tempdir()?;
    /// let session = Session::builder()
    ///     .dir(dir.path())
    ///     .sinks(&[SinkKind::Csv, SinkKind::Parquet])
    ///     .sink_factory(profilemate_sinks::standard_sinks)
    ///     .build()?;
    /// session.forward_pass().start(Phase::Decode, 4, 4).stop();
    /// session.flush()?;
    /// // As a killed process leaves it: a `.partial` file without its footer.
    /// assert!(dir.path().join("forward_pass_timing.parquet.partial").exists());
    /// std::mem::forget(session);
    /// let done = profilemate_sinks::ParquetSink::complete_partial(dir.path(), "host-a", Some(0))?;
    /// assert!(done.completed.contains(&"forward_pass_timing.parquet".to_string()));
    /// assert!(done.completed.contains(&"step_timeline.parquet".to_string()));
    /// assert!(done.not_completed.is_empty());
    /// assert!(dir.path().join("forward_pass_timing.parquet").exists());
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A file cannot be read, written or renamed (the `.partial` files are then left).
    pub fn complete_partial(dir: &Path, host: &str, rank: Option<i64>) -> Result<ParquetCompletion, SinkError> {
        let mut done = ParquetCompletion::default();
        let mut tables = Vec::new();
        let mut rows = Rows::default();
        for table in Table::ALL {
            let partial = format!("{}{PARTIAL_SUFFIX}", parquet_file_name(table));
            if !dir.join(&partial).exists() {
                continue;
            }
            if !dir.join(table.file_name()).exists() {
                done.not_completed.insert(partial, format!("no {} to rebuild it from", table.file_name()));
                continue;
            }
            let mut follower = crate::TableFollower::with_tables(dir, &[table]);
            let table_rows = follower.poll();
            let skipped = follower.skipped_lines();
            if skipped > 0 {
                done.not_completed.insert(
                    partial,
                    format!(
                        "{skipped} line(s) of {} do not parse: the Parquet table would lack them",
                        table.file_name()
                    ),
                );
                continue;
            }
            rows.extend_from(&table_rows);
            tables.push(table);
        }
        if tables.is_empty() {
            return Ok(done);
        }
        let mut sink = ParquetSink {
            dir: dir.to_path_buf(),
            tables: tables.iter().map(|t| TableFile::create(dir, *t)).collect::<Result<_, _>>()?,
            host: ByteArray::from(host),
            host_text: host.to_string(),
            rank,
            row_group_rows: DEFAULT_ROW_GROUP_ROWS,
            row_group_bytes: DEFAULT_ROW_GROUP_BYTES,
            finished: false,
        };
        sink.write_rows(&rows)?;
        sink.finished = true;
        for t in &mut sink.tables {
            t.close().map_err(|e| format!("{}: {e}", parquet_file_name(t.table)))?;
        }
        done.completed = tables.iter().map(|t| parquet_file_name(*t)).collect();
        Ok(done)
    }

    /// Keeps the tables within `budget` (shared with the run's other table sinks): each row
    /// group is then written as a complete file of its own, `<table>.1.parquet`,
    /// `<table>.2.parquet`, ... (the higher the number, the newer the rows; read them with a glob,
    /// `'<table>.*.parquet'`), of at most about the budget's segment size, and the oldest are
    /// removed as the budget requires. No `.partial` file is left behind by a killed process.
    ///
    /// ```
    /// use profilemate_sinks::{OutputBudget, ParquetSink};
    /// let dir = tempfile::tempdir()?;
    /// let budget = std::sync::Arc::new(OutputBudget::new(1 << 20, 9));
    /// let sink = ParquetSink::create(dir.path(), &Default::default())?.with_budget(budget)?;
    /// assert!(std::fs::read_dir(dir.path())?.next().is_none(), "no file until a row group is written");
    /// # drop(sink);
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A `.partial` file made by [`create`](Self::create) cannot be removed.
    pub fn with_budget(mut self, budget: Arc<OutputBudget>) -> Result<Self, SinkError> {
        for t in &mut self.tables {
            drop(t.writer.take());
            std::fs::remove_file(&t.partial).map_err(|e| format!("cannot remove {}: {e}", t.partial.display()))?;
            t.budget = Some(budget.clone());
        }
        // Estimated row-group bytes run above the compressed size: a segment stays within its share.
        self.row_group_bytes = self.row_group_bytes.min(budget.segment_bytes() as usize);
        Ok(self)
    }

    /// Each table writes a row group once it buffers `rows` rows (at least 1).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let sink = profilemate_sinks::ParquetSink::create(dir.path(), &Default::default())?.with_row_group_rows(10_000);
    /// assert_eq!(sink.row_group_rows(), 10_000);
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    pub fn with_row_group_rows(mut self, rows: usize) -> Self {
        self.row_group_rows = rows.max(1);
        self
    }

    /// Each table writes a row group once its buffered rows hold about `bytes` bytes.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let sink = profilemate_sinks::ParquetSink::create(dir.path(), &Default::default())?.with_row_group_bytes(1 << 20);
    /// # drop(sink);
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    pub fn with_row_group_bytes(mut self, bytes: usize) -> Self {
        self.row_group_bytes = bytes.max(1);
        self
    }

    /// Replaces the `host` column's value (the host name by default).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let sink = profilemate_sinks::ParquetSink::create(dir.path(), &Default::default())?.with_host("node-7");
    /// assert_eq!(sink.host(), "node-7");
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    pub fn with_host(mut self, host: &str) -> Self {
        self.host = ByteArray::from(host);
        self.host_text = host.to_string();
        self
    }

    /// Replaces the `rank` column's value (from the environment by default; `None` writes null).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let sink = profilemate_sinks::ParquetSink::create(dir.path(), &Default::default())?.with_rank(Some(2));
    /// assert_eq!(sink.rank(), Some(2));
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    pub fn with_rank(mut self, rank: Option<i64>) -> Self {
        self.rank = rank;
        self
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `host` column's value.
    pub fn host(&self) -> &str {
        &self.host_text
    }

    /// The `rank` column's value.
    pub fn rank(&self) -> Option<i64> {
        self.rank
    }

    /// Rows a table buffers before writing a row group.
    pub fn row_group_rows(&self) -> usize {
        self.row_group_rows
    }

    /// Which profilers have files here.
    pub fn profilers(&self) -> Vec<ProfilerKind> {
        let mut v: Vec<_> = self.tables.iter().map(|t| t.table.profiler()).collect();
        v.dedup();
        v
    }

    fn write_table(&mut self, at: usize, rows: &Rows) -> Result<(), SinkError> {
        let (host, rank) = (&self.host, self.rank);
        let (max_rows, max_bytes) = (self.row_group_rows, self.row_group_bytes);
        let t = &mut self.tables[at];
        let long = |v: u64| Some(i64::try_from(v).unwrap_or(i64::MAX));
        let n = t.columns.len();
        // One row: fill the contract columns with `fill`, then host and rank, then write a row
        // group when the buffer is full.
        let push = |t: &mut TableFile, fill: &dyn Fn(&mut [Column]) -> usize| -> Result<(), SinkError> {
            let text = fill(&mut t.columns[..n - 2]);
            t.columns[n - 2].shared_text(host);
            t.columns[n - 1].long(rank);
            t.rows += 1;
            t.bytes += text + 8 * n;
            if t.rows >= max_rows || t.bytes >= max_bytes {
                t.write_row_group()?;
            }
            Ok(())
        };
        match t.table {
            Table::ForwardPass => {
                for r in &rows.forward_pass {
                    push(t, &|c| {
                        c[0].double(Some(numbers::sec(r.timestamp_ns)));
                        let text = c[1].text(r.phase.as_str());
                        c[2].long(long(r.batch_size.into()));
                        c[3].long(long(r.num_tokens.into()));
                        c[4].double(Some(numbers::ms(r.forward_time_ns)));
                        c[5].double(numbers::throughput(r.num_tokens, r.forward_time_ns));
                        c[6].long(r.step.and_then(long));
                        text
                    })?;
                }
            }
            Table::CpuOperations => {
                for r in &rows.cpu_operations {
                    push(t, &|c| {
                        c[0].double(Some(numbers::sec(r.timestamp_ns)));
                        let text = c[1].text(&r.operation);
                        c[2].double(Some(numbers::ms(r.duration_ns)));
                        c[4].long(r.step.and_then(long));
                        text + c[3].text(&r.context)
                    })?;
                }
            }
            Table::BatchUtilization => {
                for r in &rows.batch_utilization {
                    push(t, &|c| {
                        c[0].double(Some(numbers::sec(r.timestamp_ns)));
                        c[1].long(long(r.num_seqs.into()));
                        c[2].long(long(r.max_num_seqs.into()));
                        c[3].double(numbers::pct(r.num_seqs, r.max_num_seqs));
                        c[4].long(long(r.num_tokens.into()));
                        c[5].long(long(r.max_tokens.into()));
                        c[6].double(numbers::pct(r.num_tokens, r.max_tokens));
                        let text = c[7].text(r.phase.as_str());
                        c[8].long(long(r.running_queue_len.into()));
                        c[9].long(long(r.waiting_queue_len.into()));
                        c[10].long(r.step.and_then(long));
                        text
                    })?;
                }
            }
            Table::PreemptionEvents => {
                for r in &rows.preemption_events {
                    push(t, &|c| {
                        c[0].double(Some(numbers::sec(r.timestamp_ns)));
                        let text = c[1].text(&r.request_id) + c[2].text(r.event.as_str()) + c[3].text(&r.reason);
                        c[4].double(r.running_time_ns.map(numbers::sec));
                        c[6].long(r.step.and_then(long));
                        text + c[5].text(&r.extra_info)
                    })?;
                }
            }
            Table::RequestLifecycle => {
                for r in &rows.request_lifecycle {
                    push(t, &|c| {
                        let text = c[0].text(&r.request_id);
                        c[1].double(r.started_ns.map(numbers::sec));
                        c[2].double(r.preempted_ns.map(numbers::sec));
                        c[3].double(r.resumed_ns.map(numbers::sec));
                        c[4].double(r.finished_ns.map(numbers::sec));
                        c[5].double(r.total_time_ns.map(numbers::sec));
                        c[6].double(r.preemption_delay_ns.map(numbers::sec));
                        c[7].long(long(r.num_preemptions.into()));
                        text + c[8].text(r.outcome.as_str())
                    })?;
                }
            }
            Table::EncoderDecoder => {
                for r in &rows.encoder_decoder {
                    push(t, &|c| {
                        c[0].double(Some(numbers::sec(r.timestamp_ns)));
                        let text = c[1].text(r.component.as_str());
                        c[2].double(Some(numbers::ms(r.duration_ns)));
                        c[4].long(r.step.and_then(long));
                        text + c[3].text(&r.context)
                    })?;
                }
            }
            Table::KvCacheUsage => {
                for r in &rows.kv_cache {
                    push(t, &|c| {
                        c[0].double(Some(numbers::sec(r.timestamp_ns)));
                        c[1].long(long(r.used_blocks.into()));
                        c[2].long(long(r.total_blocks.into()));
                        c[3].double(numbers::pct(r.used_blocks, r.total_blocks));
                        c[4].long(long(r.prefix_cache_queries));
                        c[5].long(long(r.prefix_cache_hits));
                        c[6].long(r.step.and_then(long));
                        0
                    })?;
                }
            }
            Table::CudaGraphEvents => {
                for r in &rows.cuda_graph {
                    push(t, &|c| {
                        c[0].double(Some(numbers::sec(r.timestamp_ns)));
                        let text = c[1].text(r.event.as_str());
                        c[2].long(long(r.batch_size.into()));
                        c[3].long(r.padded_batch_size.and_then(|p| long(p.into())));
                        c[4].double(r.duration_ns.map(numbers::ms));
                        c[5].long(r.step.and_then(long));
                        text
                    })?;
                }
            }
            Table::MoeExpertRouting => {
                for r in &rows.moe_routing {
                    push(t, &|c| {
                        c[0].double(Some(numbers::sec(r.timestamp_ns)));
                        c[1].long(long(r.layer.into()));
                        c[2].long(long(r.expert_id.into()));
                        c[3].long(long(r.num_tokens.into()));
                        c[4].long(long(r.window_first_step));
                        c[5].long(long(r.window_steps));
                        c[6].long(r.step.and_then(long));
                        0
                    })?;
                }
            }
            Table::StepTimeline => {
                for r in &rows.step_timeline {
                    push(t, &|c| {
                        let l32 = |v: Option<u32>| v.and_then(|v| long(v.into()));
                        let ms = |v: Option<u64>| v.map(numbers::ms);
                        let f4 = |v: Option<f64>| v.filter(|v| v.is_finite()).map(|v| (v.max(0.0) * 1e4).round() / 1e4);
                        c[0].long(long(r.step));
                        c[1].double(Some(numbers::sec(r.start_ns)));
                        let mut text = c[2].text(r.phase.map_or("", |p| p.as_str()));
                        c[3].long(l32(r.batch_size));
                        c[4].long(l32(r.num_tokens));
                        c[5].long(long(r.forward_passes.into()));
                        c[6].double(ms(r.forward_time_ns));
                        c[7].double(ms(r.scheduling_ns));
                        c[8].double(ms(r.batch_preparation_ns));
                        c[9].double(ms(r.sampling_ns));
                        c[10].double(ms(r.other_cpu_ns));
                        c[11].double(Some(numbers::ms(r.wall_ns)));
                        c[12].double(ms(r.host_gap_before_ns));
                        c[13].double(Some(numbers::ms(r.unclaimed_ns)));
                        c[14].double(f4(r.seq_utilization_pct));
                        c[15].double(f4(r.token_utilization_pct));
                        c[16].long(l32(r.running_queue_len));
                        c[17].long(l32(r.waiting_queue_len));
                        c[18].double(f4(r.kv_cache_usage_pct));
                        text += c[19].text(r.cuda_graph.map_or("", |e| e.as_str()));
                        c[20].long(l32(r.padded_batch_size));
                        c[21].double(f4(r.padding_pct));
                        c[22].long(l32(r.preemptions));
                        c[23].long(l32(r.resumes));
                        c[24].double(ms(r.encoder_time_ns));
                        c[25].double(ms(r.decoder_time_ns));
                        c[26].double(f4(r.moe_max_over_mean));
                        text
                    })?;
                }
            }
        }
        Ok(())
    }
}

impl Sink for ParquetSink {
    fn name(&self) -> &str {
        "parquet"
    }

    fn write_rows(&mut self, rows: &Rows) -> Result<(), SinkError> {
        let mut first_error = None;
        for at in 0..self.tables.len() {
            if rows.len(self.tables[at].table) == 0 {
                continue;
            }
            if let Err(e) = self.write_table(at, rows) {
                let name = parquet_file_name(self.tables[at].table);
                first_error.get_or_insert_with(|| format!("{name}: {e}"));
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn output_files(&self) -> Option<OutputFiles> {
        let bytes_written = self.tables.iter().map(|t| (parquet_file_name(t.table), t.bytes_written())).collect();
        let budget = self.tables.iter().find_map(|t| t.budget.as_ref());
        let (rolled, removed) = budget.map(|b| b.files(|key| key.ends_with(".parquet"))).unwrap_or_default();
        Some(OutputFiles { bytes_written, rolled, removed })
    }

    /// Rows reach the files a row group at a time, not at every flush: a row group per second
    /// would make files of tiny row groups that read slowly.
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    fn finish(&mut self, _manifest: &RunManifest) -> Result<(), SinkError> {
        if std::mem::replace(&mut self.finished, true) {
            return Ok(());
        }
        let mut first_error = None;
        for t in &mut self.tables {
            if let Err(e) = t.close() {
                first_error.get_or_insert_with(|| format!("{}: {e}", parquet_file_name(t.table)));
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

    #[test]
    fn columns_are_the_contract_columns_then_host_and_rank() {
        for table in Table::ALL {
            let names: Vec<&str> = contract_columns(table).iter().map(|c| c.0).collect();
            assert_eq!(names, table.columns(), "{table:?}");
            let schema = schema(table).unwrap();
            let fields: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
            assert_eq!(&fields[..names.len()], &names[..]);
            assert_eq!(&fields[names.len()..], ["host", "rank"]);
        }
    }
}
