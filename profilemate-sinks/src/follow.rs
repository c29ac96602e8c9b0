//! Reading an output directory's CSV tables back as they grow, for a process that did not record
//! them: vLLM's API server, which serves the series of its engine-core and worker processes from
//! the part directories they write.

use profilemate_core::{
    BatchUtilizationRow, Component, ComponentRow, CpuOperationRow, CudaGraphRow, ForwardPassRow, GraphEvent,
    KvCacheRow, LifecycleEvent, MoeRoutingRow, Outcome, Phase, PreemptionEventRow, RequestLifecycleRow, Rows,
    StepTimelineRow, Table,
};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The tables a [`TableFollower::new`] follows: those the live series need (the request
/// lifecycle table is written only when a request finishes, the step timeline joins the
/// others). [`TableFollower::with_tables`] reads every table, these two included.
pub const FOLLOWED_TABLES: [Table; 8] = [
    Table::ForwardPass,
    Table::CpuOperations,
    Table::BatchUtilization,
    Table::PreemptionEvents,
    Table::EncoderDecoder,
    Table::KvCacheUsage,
    Table::CudaGraphEvents,
    Table::MoeExpertRouting,
];

/// Follows the contract CSV files of one output directory (one process's part): each
/// [`poll`](TableFollower::poll) returns the rows completed since the previous one. A line the
/// writer has not finished yet (no line end, or a quoted field still open) is left for the next
/// poll; a complete line that does not parse is skipped and counted. Files that do not exist yet
/// are looked for again at the next poll; a file that becomes shorter than what was read (a new
/// file in its place) is read again from its start.
///
/// Times are the part's own (`timestamp_sec` since that process's start): rows of different
/// parts are on different time bases until rebased with the manifests' `monotonic_start_ns`.
///
/// ```
/// use profilemate_core::{Phase, Session};
///
/// let dir = tempfile::tempdir()?;
/// let mut follower = profilemate_sinks::TableFollower::new(dir.path());
/// assert!(follower.poll().is_empty());
/// let session = Session::builder().dir(dir.path()).sink_factory(profilemate_sinks::standard_sinks).build()?;
/// session.forward_pass().start(Phase::Decode, 4, 4).stop();
/// session.shutdown()?;
/// let rows = follower.poll();
/// assert_eq!(rows.forward_pass.len(), 1);
/// assert!(follower.poll().is_empty(), "each row is returned once");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct TableFollower {
    dir: PathBuf,
    files: Vec<FollowedFile>,
    skipped: u64,
}

#[derive(Debug)]
struct FollowedFile {
    table: Table,
    /// Bytes consumed: the header and every complete line returned.
    offset: u64,
    /// Column name -> index, from the header.
    columns: HashMap<String, usize>,
}

impl TableFollower {
    /// Follows the tables of `dir`, from their beginning.
    pub fn new(dir: impl Into<PathBuf>) -> TableFollower {
        let files = FOLLOWED_TABLES.map(|table| FollowedFile { table, offset: 0, columns: HashMap::new() }).into();
        TableFollower { dir: dir.into(), files, skipped: 0 }
    }

    /// Follows only `tables` of `dir` (any of [`Table::ALL`], `request_lifecycle.csv` and
    /// `step_timeline.csv` included), from their beginning.
    ///
    /// ```
    /// use profilemate_core::Table;
    /// let mut follower = profilemate_sinks::TableFollower::with_tables("out", &[Table::PreemptionEvents, Table::StepTimeline]);
    /// assert!(follower.poll().is_empty());
    /// ```
    pub fn with_tables(dir: impl Into<PathBuf>, tables: &[Table]) -> TableFollower {
        let files = Table::ALL
            .into_iter()
            .filter(|t| tables.contains(t))
            .map(|table| FollowedFile { table, offset: 0, columns: HashMap::new() })
            .collect();
        TableFollower { dir: dir.into(), files, skipped: 0 }
    }

    /// The directory followed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Complete lines that did not parse as a row of their table, so far.
    pub fn skipped_lines(&self) -> u64 {
        self.skipped
    }

    /// The rows completed since the previous poll. I/O errors (a file removed, unreadable) leave
    /// the file where it was, to be tried again.
    pub fn poll(&mut self) -> Rows {
        let mut rows = Rows::default();
        for f in &mut self.files {
            let path = self.dir.join(f.table.file_name());
            match read_from(&path, f.offset) {
                Ok(Some(chunk)) => self.skipped += f.consume(&chunk, &mut rows),
                Ok(None) => {
                    // Replaced by a shorter file: start over on the new one.
                    f.offset = 0;
                    f.columns.clear();
                    if let Ok(Some(chunk)) = read_from(&path, 0) {
                        self.skipped += f.consume(&chunk, &mut rows);
                    }
                }
                Err(_) => {}
            }
        }
        rows
    }
}

/// The bytes of `path` from `offset` on; `None` when the file is now shorter than `offset` (it
/// was replaced, for example rolled over to a new file), so that it is read again from the start.
fn read_from(path: &Path, offset: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut file = std::fs::File::open(path)?;
    if file.metadata()?.len() < offset {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

impl FollowedFile {
    /// Appends the complete records of `chunk` (the file from `offset` on) to `rows` and moves
    /// `offset` past them; returns the number of complete records that did not parse. A record
    /// ends at a line end outside quotes (RFC 4180: a doubled quote inside a quoted field toggles
    /// twice), so a field holding a line end stays in its record.
    fn consume(&mut self, chunk: &[u8], rows: &mut Rows) -> u64 {
        let (mut in_quotes, mut start, mut skipped) = (false, 0usize, 0u64);
        for (i, &b) in chunk.iter().enumerate() {
            match b {
                b'"' => in_quotes = !in_quotes,
                b'\n' if !in_quotes => {
                    if !self.record(&chunk[start..=i], rows) {
                        skipped += 1;
                    }
                    start = i + 1;
                }
                _ => {}
            }
        }
        self.offset += start as u64;
        skipped
    }

    /// One complete record: the header (the first) or a row. `false` when it does not parse.
    fn record(&mut self, bytes: &[u8], rows: &mut Rows) -> bool {
        let mut reader = csv::ReaderBuilder::new().has_headers(false).from_reader(bytes);
        let mut record = csv::StringRecord::new();
        if !matches!(reader.read_record(&mut record), Ok(true)) {
            return false;
        }
        if self.columns.is_empty() {
            self.columns = record.iter().enumerate().map(|(i, name)| (name.to_string(), i)).collect();
            return true;
        }
        parse_row(self.table, &record, &self.columns, rows).is_some()
    }
}

fn field<'r>(record: &'r csv::StringRecord, columns: &HashMap<String, usize>, name: &str) -> Option<&'r str> {
    columns.get(name).and_then(|&i| record.get(i))
}

fn parse_row(table: Table, r: &csv::StringRecord, c: &HashMap<String, usize>, rows: &mut Rows) -> Option<()> {
    let text = |name: &str| field(r, c, name);
    let num = |name: &str| text(name).and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite() && *v >= 0.0);
    let ns = |name: &str, scale: f64| num(name).map(|v| (v * scale).round() as u64);
    let int = |name: &str| text(name).and_then(|v| v.parse::<u64>().ok());
    let small = |name: &str| int(name).and_then(|v| u32::try_from(v).ok());
    let opt = |name: &str| -> Option<Option<f64>> {
        match text(name)? {
            "" => Some(None),
            v => v.parse::<f64>().ok().map(Some),
        }
    };
    // The engine step, a column added at the end: absent in older files, empty outside a step.
    let step = match text("step") {
        None | Some("") => None,
        Some(v) => Some(v.parse::<u64>().ok()?),
    };
    let phase = || text("phase").and_then(|p| Phase::ALL.into_iter().find(|x| x.as_str() == p));
    // An optional field: `None` when empty, the row rejected when it does not parse.
    let opt_ns = |name: &str, scale: f64| -> Option<Option<u64>> {
        match text(name)? {
            "" => Some(None),
            v => v.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).map(|v| Some((v * scale).round() as u64)),
        }
    };
    let opt_small = |name: &str| -> Option<Option<u32>> {
        match text(name)? {
            "" => Some(None),
            v => v.parse::<u32>().ok().map(Some),
        }
    };
    match table {
        Table::RequestLifecycle => {
            let finished_ns = opt_ns("finished_sec", 1e9)?;
            rows.request_lifecycle.push(RequestLifecycleRow {
                request_id: text("request_id")?.to_string(),
                started_ns: opt_ns("started_sec", 1e9)?,
                preempted_ns: opt_ns("preempted_sec", 1e9)?,
                resumed_ns: opt_ns("resumed_sec", 1e9)?,
                finished_ns,
                total_time_ns: opt_ns("total_time_sec", 1e9)?,
                preemption_delay_ns: opt_ns("preemption_delay_sec", 1e9)?,
                num_preemptions: small("num_preemptions")?,
                // Files of versions before the column: finished, or in flight at shutdown.
                outcome: match text("outcome") {
                    None if finished_ns.is_some() => Outcome::Finished,
                    None => Outcome::InFlight,
                    Some(v) => [Outcome::Finished, Outcome::Evicted, Outcome::InFlight]
                        .into_iter()
                        .find(|x| x.as_str() == v)?,
                },
            });
            return Some(());
        }
        Table::StepTimeline => {
            rows.step_timeline.push(StepTimelineRow {
                step: int("step")?,
                start_ns: ns("start_sec", 1e9)?,
                phase: match text("phase")? {
                    "" => None,
                    _ => Some(phase()?),
                },
                batch_size: opt_small("batch_size")?,
                num_tokens: opt_small("num_tokens")?,
                forward_passes: small("forward_passes")?,
                forward_time_ns: opt_ns("forward_time_ms", 1e6)?,
                scheduling_ns: opt_ns("scheduling_ms", 1e6)?,
                batch_preparation_ns: opt_ns("batch_preparation_ms", 1e6)?,
                sampling_ns: opt_ns("sampling_ms", 1e6)?,
                other_cpu_ns: opt_ns("other_cpu_ms", 1e6)?,
                wall_ns: ns("step_wall_ms", 1e6)?,
                host_gap_before_ns: opt_ns("host_gap_before_ms", 1e6)?,
                unclaimed_ns: ns("unclaimed_ms", 1e6)?,
                seq_utilization_pct: opt("seq_utilization_pct")?,
                token_utilization_pct: opt("token_utilization_pct")?,
                running_queue_len: opt_small("running_queue_len")?,
                waiting_queue_len: opt_small("waiting_queue_len")?,
                kv_cache_usage_pct: opt("kv_cache_usage_pct")?,
                cuda_graph: match text("cuda_graph")? {
                    "" => None,
                    v => Some(GraphEvent::ALL.into_iter().find(|x| x.as_str() == v)?),
                },
                padded_batch_size: opt_small("padded_batch_size")?,
                padding_pct: opt("padding_pct")?,
                preemptions: opt_small("preemptions")?,
                resumes: opt_small("resumes")?,
                encoder_time_ns: opt_ns("encoder_time_ms", 1e6)?,
                decoder_time_ns: opt_ns("decoder_time_ms", 1e6)?,
                moe_max_over_mean: opt("moe_max_over_mean")?,
            });
            return Some(());
        }
        _ => {}
    }
    let timestamp_ns = ns("timestamp_sec", 1e9)?;
    match table {
        Table::ForwardPass => rows.forward_pass.push(ForwardPassRow {
            timestamp_ns,
            phase: phase()?,
            batch_size: small("batch_size")?,
            num_tokens: small("num_tokens")?,
            forward_time_ns: ns("forward_time_ms", 1e6)?,
            step,
        }),
        Table::CpuOperations => rows.cpu_operations.push(CpuOperationRow {
            timestamp_ns,
            operation: text("operation")?.into(),
            duration_ns: ns("duration_ms", 1e6)?,
            context: text("context")?.to_string(),
            step,
        }),
        Table::BatchUtilization => rows.batch_utilization.push(BatchUtilizationRow {
            timestamp_ns,
            num_seqs: small("num_seqs")?,
            max_num_seqs: small("max_num_seqs")?,
            seq_utilization_pct: opt("seq_utilization_pct")?,
            num_tokens: small("num_tokens")?,
            max_tokens: small("max_tokens")?,
            token_utilization_pct: opt("token_utilization_pct")?,
            phase: phase()?,
            running_queue_len: small("running_queue_len")?,
            waiting_queue_len: small("waiting_queue_len")?,
            step,
        }),
        Table::PreemptionEvents => rows.preemption_events.push(PreemptionEventRow {
            timestamp_ns,
            request_id: text("request_id")?.to_string(),
            event: text("event").and_then(|e| LifecycleEvent::ALL.into_iter().find(|x| x.as_str() == e))?,
            reason: text("reason")?.to_string(),
            running_time_ns: opt("running_time_sec")?.map(|s| (s * 1e9).round() as u64),
            extra_info: text("extra_info")?.to_string(),
            step,
        }),
        Table::EncoderDecoder => rows.encoder_decoder.push(ComponentRow {
            timestamp_ns,
            component: text("component").and_then(|v| Component::ALL.into_iter().find(|x| x.as_str() == v))?,
            duration_ns: ns("duration_ms", 1e6)?,
            context: text("context")?.to_string(),
            step,
        }),
        Table::KvCacheUsage => rows.kv_cache.push(KvCacheRow {
            timestamp_ns,
            used_blocks: small("used_blocks")?,
            total_blocks: small("total_blocks")?,
            prefix_cache_queries: int("prefix_cache_queries")?,
            prefix_cache_hits: int("prefix_cache_hits")?,
            step,
        }),
        Table::CudaGraphEvents => rows.cuda_graph.push(CudaGraphRow {
            timestamp_ns,
            event: text("event").and_then(|e| GraphEvent::ALL.into_iter().find(|x| x.as_str() == e))?,
            batch_size: small("batch_size")?,
            padded_batch_size: match text("padded_batch_size")? {
                "" => None,
                v => Some(v.parse().ok()?),
            },
            duration_ns: opt("duration_ms")?.map(|ms| (ms * 1e6).round() as u64),
            step,
        }),
        Table::MoeExpertRouting => rows.moe_routing.push(MoeRoutingRow {
            timestamp_ns,
            layer: small("layer")?,
            expert_id: small("expert_id")?,
            num_tokens: small("num_tokens")?,
            // Files of versions before windowed rows have one step per row.
            window_first_step: match text("window_first_step") {
                None => 0,
                Some(v) => v.parse().ok()?,
            },
            window_steps: match text("window_steps") {
                None => 1,
                Some(v) => v.parse().ok()?,
            },
            step,
        }),
        // Parsed above.
        Table::RequestLifecycle | Table::StepTimeline => return None,
    }
    Some(())
}
