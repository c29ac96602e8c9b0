//! A Chrome trace (JSON Array Format) timeline, which <https://ui.perfetto.dev> and
//! `chrome://tracing` open.

use crate::numbers;
use profilemate_core::{GraphEvent, LifecycleEvent, Rows, RunManifest, Sink, SinkError};
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The first trace file's name; later ones are [`trace_file_name`]`(1)`, `(2)`, ...
pub const TRACE_FILE: &str = "profilemate_trace.json";

/// Events a trace file holds before the next file is started (metadata events naming the
/// process and its tracks come on top).
pub const DEFAULT_MAX_EVENTS_PER_FILE: usize = 1_000_000;

/// Tracks one kind of event may spread over before events that overlap all of them are left out
/// of the trace (and counted).
pub const MAX_TRACKS_PER_KIND: usize = 64;

/// The name of trace file number `index`: `profilemate_trace.json`, then
/// `profilemate_trace.1.json`, `profilemate_trace.2.json`, ...
///
/// ```
/// assert_eq!(profilemate_sinks::trace_file_name(0), "profilemate_trace.json");
/// assert_eq!(profilemate_sinks::trace_file_name(2), "profilemate_trace.2.json");
/// ```
pub fn trace_file_name(index: usize) -> String {
    if index == 0 {
        TRACE_FILE.to_string()
    } else {
        format!("profilemate_trace.{index}.json")
    }
}

/// The kinds of events, each on its own named thread track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ForwardPass,
    CpuOperations,
    EncoderDecoder,
    CudaGraph,
    Requests,
}

impl Kind {
    const fn name(self) -> &'static str {
        match self {
            Kind::ForwardPass => "forward_pass",
            Kind::CpuOperations => "cpu_operations",
            Kind::EncoderDecoder => "encoder_decoder",
            Kind::CudaGraph => "cuda_graph",
            Kind::Requests => "requests",
        }
    }

    /// Thread ids above any Linux process id (`pid_max` is at most 2^22), so that no track is
    /// mistaken for a process's main thread (servers in containers often run as pid 1).
    const fn tid(self, lane: usize) -> u64 {
        10_000_000 + 1000 * (self as u64) + lane as u64
    }
}

/// One thread track of a kind: events on it nest or are disjoint, never partially overlap.
///
/// `stack` holds the chain of events still open at `last_start` (outermost first); events are
/// accepted in order of their start.
#[derive(Debug, Default)]
struct Lane {
    stack: Vec<(u64, u64)>,
    last_start: u64,
}

impl Lane {
    /// The stack depth under `[start, end)` if it fits on this track.
    fn fits(&self, start: u64, end: u64) -> Option<usize> {
        if start < self.last_start {
            return None;
        }
        let mut depth = self.stack.len();
        while depth > 0 && self.stack[depth - 1].1 <= start {
            depth -= 1;
        }
        if depth > 0 && end > self.stack[depth - 1].1 {
            return None;
        }
        Some(depth)
    }

    fn push(&mut self, depth: usize, start: u64, end: u64) {
        self.stack.truncate(depth);
        self.stack.push((start, end));
        self.last_start = start;
    }
}

/// Microseconds with 3 decimals, from nanoseconds, for `ts` and `dur`.
struct Micros(u64);

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// An integer scaled by 10^digits, written with its decimal point.
/// A trace file that receives whole events only: events are built in memory, and only the part
/// that ends with a complete event ([`mark`](Self::mark)) is handed to the file, in one write.
/// A process killed at any instant leaves a file that ends with a whole event, so appending
/// `]` (or nothing: Perfetto opens an unclosed array) gives a valid trace.
struct EventWriter {
    file: File,
    buf: Vec<u8>,
    /// Bytes of `buf` that end with a complete event.
    complete: usize,
}

/// Whole events are handed to the file once this many bytes of them are buffered.
const EVENT_WRITE_BYTES: usize = 256 * 1024;

impl EventWriter {
    fn new(file: File) -> EventWriter {
        EventWriter { file, buf: Vec::with_capacity(EVENT_WRITE_BYTES + 4096), complete: 0 }
    }

    /// Everything buffered so far ends with a whole event.
    fn mark(&mut self) -> std::io::Result<()> {
        self.complete = self.buf.len();
        if self.complete >= EVENT_WRITE_BYTES {
            self.write_complete()?;
        }
        Ok(())
    }

    fn write_complete(&mut self) -> std::io::Result<()> {
        if self.complete > 0 {
            let result = self.file.write_all(&self.buf[..self.complete]);
            self.buf.drain(..self.complete);
            self.complete = 0;
            result?;
        }
        Ok(())
    }
}

impl Write for EventWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    /// Hands the whole events to the file (a partial one stays buffered).
    fn flush(&mut self) -> std::io::Result<()> {
        self.write_complete()?;
        self.file.flush()
    }
}

struct Fixed(u64, u32);

impl fmt::Display for Fixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scale = 10u64.pow(self.1);
        write!(f, "{}.{:0width$}", self.0 / scale, self.0 % scale, width = self.1 as usize)
    }
}

/// Writes a timeline of the run in the Chrome Trace Event Format (a JSON array), which
/// [Perfetto](https://ui.perfetto.dev) and `chrome://tracing` open.
///
/// What it shows, on one process (the recording process's id, named after the host, pid and
/// rank; a trace of several processes on one timeline, such as the merge of a multi-process vLLM
/// run, names each with [`create_for_process`](Self::create_for_process) and
/// [`begin_process`](Self::begin_process)):
///
/// | rows | trace events | track |
/// | --- | --- | --- |
/// | forward passes | complete events (`"ph":"X"`) named by phase; args `batch_size`, `num_tokens`, `throughput_tokens_per_sec` | thread `forward_pass` |
/// | CPU operations | complete events named by operation; args `context` | thread `cpu_operations` |
/// | encoder/decoder calls | complete events named by component; args `context` | thread `encoder_decoder` |
/// | CUDA graph captures | complete events `capture`; args `batch_size` | thread `cuda_graph` |
/// | preemptions, resumes, evictions | instant events (`"ph":"i"`) named by event; args `request_id`, `reason`, `running_time_sec`, `extra_info` | thread `requests` |
/// | scheduled batches | counters (`"ph":"C"`) `queue` (`running`, `waiting`) and `batch` (`token_utilization_pct`, `seq_utilization_pct`) | process counters |
/// | KV cache samples | counter `kv_cache` (`usage_pct`, `used_blocks`) | process counters |
///
/// `ts` and `dur` are microseconds since the session started (3 decimals: nanoseconds).
///
/// **Tracks.** The rows carry no thread id, so each kind of event has its own named thread
/// track (a `thread_name` metadata event). Perfetto needs the complete events of one track to
/// nest or follow each other; an event that would partially overlap one already on its track
/// (recorded from another thread, say) goes to the next track of its kind, `cpu_operations 2`,
/// `cpu_operations 3`, ... up to [`MAX_TRACKS_PER_KIND`]; beyond that it is left out of the
/// trace and counted (the tables still have it).
///
/// **Streaming and rolling files.** The file starts with `[` and the events follow as the run
/// goes (flushed after every collector pass, in whole events only: a process killed at any instant
/// leaves a file that ends with a complete event); [`finish`](Sink::finish) closes the array. A
/// trace whose closing `]` is missing (a process killed mid-run) still opens: the JSON Array
/// Format allows it, and appending `]` makes it valid JSON. A file holds at most [`DEFAULT_MAX_EVENTS_PER_FILE`] events (1,000,000, some 150 MB, which
/// the Perfetto UI opens in a browser tab; change it with
/// [`with_max_events_per_file`](Self::with_max_events_per_file)); the next events go to
/// `profilemate_trace.1.json`, `profilemate_trace.2.json`, ... ([`trace_file_name`]). Each file
/// is a complete trace on its own, with the process and track names repeated at its start. Files
/// are kept; the disk use grows with the run, as the CSV files do.
///
/// ```
/// use profilemate_core::{CpuOp, Phase, Session};
/// use profilemate_sinks::PerfettoSink;
///
/// let dir = tempfile::tempdir()?;
/// let session = Session::builder().in_memory_only().sink(PerfettoSink::create(dir.path())?).build()?;
/// let cpu = session.cpu_timing();
/// cpu.time(CpuOp::SCHEDULING, || {});
/// session.forward_pass().start(Phase::Prefill, 1, 128).stop();
/// session.shutdown()?;
///
/// let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("profilemate_trace.json"))?)?;
/// let events = trace.as_array().unwrap();
/// assert!(events.iter().any(|e| e["ph"] == "X" && e["name"] == "scheduling"));
/// assert!(events.iter().any(|e| e["ph"] == "X" && e["name"] == "prefill" && e["args"]["num_tokens"] == 128));
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
pub struct PerfettoSink {
    dir: PathBuf,
    max_events: usize,
    out: Option<EventWriter>,
    file_index: usize,
    events_in_file: usize,
    pid: u32,
    process_name: String,
    /// Every track created so far, as `(tid, name)`, for the metadata at each file's start.
    tracks: Vec<(u64, String)>,
    lanes: [Vec<Lane>; 4],
    requests_track: bool,
    left_out: u64,
    order: Vec<(u64, u64, usize)>,
    finished: bool,
}

impl std::fmt::Debug for PerfettoSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerfettoSink")
            .field("dir", &self.dir)
            .field("max_events", &self.max_events)
            .field("file_index", &self.file_index)
            .finish()
    }
}

impl PerfettoSink {
    /// Starts `profilemate_trace.json` in `dir` (removing the trace files of an earlier run
    /// there), for this process: its id, the host name and the rank
    /// [`rank_from_env`](crate::rank_from_env) finds name the process in the trace.
    ///
    /// # Errors
    ///
    /// The file cannot be created, or `PROFILEMATE_RANK` is malformed.
    pub fn create(dir: &Path) -> Result<PerfettoSink, SinkError> {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let pid = std::process::id();
        let process_name = match crate::rank_from_env()? {
            Some(rank) => format!("profilemate {host} pid {pid} rank {rank}"),
            None => format!("profilemate {host} pid {pid}"),
        };
        PerfettoSink::create_for_process(dir, pid, &process_name)
    }

    /// Starts `profilemate_trace.json` in `dir` (removing the trace files of an earlier run
    /// there) whose first events belong to process `pid`, named `process_name` in the trace:
    /// for a trace written on behalf of another process (the merge of a multi-process run, which
    /// names each part's process; see [`begin_process`](Self::begin_process)).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let sink = profilemate_sinks::PerfettoSink::create_for_process(dir.path(), 4242, "vLLM engine pid 4242")?;
    /// # drop(sink);
    /// let start = std::fs::read_to_string(dir.path().join("profilemate_trace.json"))?;
    /// assert!(start.contains(r#""pid":4242"#) && start.contains("vLLM engine pid 4242"));
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The file cannot be created, or an earlier trace file there cannot be removed.
    pub fn create_for_process(dir: &Path, pid: u32, process_name: &str) -> Result<PerfettoSink, SinkError> {
        let process_name = process_name.to_string();
        let mut index = 0;
        loop {
            let path = dir.join(trace_file_name(index));
            match std::fs::remove_file(&path) {
                Ok(()) => index += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && index > 0 => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => index += 1,
                Err(e) => return Err(format!("cannot replace {}: {e}", path.display()).into()),
            }
        }
        let mut sink = PerfettoSink {
            dir: dir.to_path_buf(),
            max_events: DEFAULT_MAX_EVENTS_PER_FILE,
            out: None,
            file_index: 0,
            events_in_file: 0,
            pid,
            process_name,
            tracks: Vec::new(),
            lanes: Default::default(),
            requests_track: false,
            left_out: 0,
            order: Vec::new(),
            finished: false,
        };
        sink.open()?;
        Ok(sink)
    }

    /// A file holds at most `events` events (at least 1) before the next file is started.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let sink = profilemate_sinks::PerfettoSink::create(dir.path())?.with_max_events_per_file(100_000);
    /// assert_eq!(sink.max_events_per_file(), 100_000);
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    pub fn with_max_events_per_file(mut self, events: usize) -> Self {
        self.max_events = events.max(1);
        self
    }

    /// Events a file holds before the next is started.
    pub fn max_events_per_file(&self) -> usize {
        self.max_events
    }

    /// The trace files written so far, in order.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let sink = profilemate_sinks::PerfettoSink::create(dir.path())?;
    /// assert_eq!(sink.files(), [dir.path().join("profilemate_trace.json")]);
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    pub fn files(&self) -> Vec<PathBuf> {
        (0..=self.file_index).map(|i| self.dir.join(trace_file_name(i))).collect()
    }

    /// Complete events left out because they overlapped events on every track of their kind.
    pub fn left_out(&self) -> u64 {
        self.left_out
    }

    /// The rows written from here on belong to process `pid`, named `process_name`: one trace of
    /// many processes on one timeline (the rows' timestamps must share one time base), each
    /// process a track group of its own with its own `forward_pass`, `cpu_operations`, ...
    /// tracks and counters. The merge of a multi-process vLLM run writes each part's rows after
    /// a `begin_process` for that part's process.
    ///
    /// ```
    /// use profilemate_core::{ForwardPassRow, Phase, Rows, Sink};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let mut sink = profilemate_sinks::PerfettoSink::create_for_process(dir.path(), 10, "engine")?;
    /// let mut rows = Rows::default();
    /// let pass = ForwardPassRow { timestamp_ns: 1_000, phase: Phase::Decode, batch_size: 1, num_tokens: 1, forward_time_ns: 500, step: None };
    /// rows.forward_pass.push(pass);
    /// sink.write_rows(&rows)?;
    /// sink.begin_process(11, "worker rank 0")?;
    /// sink.write_rows(&rows)?;
    /// let manifest = profilemate_core::Session::builder().in_memory_only().build()?.shutdown()?;
    /// sink.finish(&manifest)?;
    ///
    /// let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("profilemate_trace.json"))?)?;
    /// let slices: Vec<_> = trace.as_array().unwrap().iter().filter(|e| e["ph"] == "X").map(|e| e["pid"].clone()).collect();
    /// assert_eq!(slices, [10, 11]);
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The trace is already finished, or the file cannot be written.
    pub fn begin_process(&mut self, pid: u32, process_name: &str) -> Result<(), SinkError> {
        if self.finished {
            return Err("the trace is already finished".into());
        }
        self.pid = pid;
        self.process_name = process_name.to_string();
        self.tracks.clear();
        self.lanes = Default::default();
        self.requests_track = false;
        if let Some(out) = self.out.as_mut() {
            let result = (|| {
                write!(
                    out,
                    ",\n{{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":{pid},\"tid\":0,\"args\":{{\"name\":"
                )?;
                json_string(out, process_name)?;
                out.write_all(b"}}")?;
                out.mark()
            })();
            result.map_err(|e| format!("{}: {e}", trace_file_name(self.file_index)))?;
        }
        Ok(())
    }

    fn open(&mut self) -> std::io::Result<()> {
        let path = self.dir.join(trace_file_name(self.file_index));
        let file = File::create(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))?;
        let mut out = EventWriter::new(file);
        out.write_all(b"[\n")?;
        write!(out, r#"{{"name":"process_name","ph":"M","pid":{},"tid":0,"args":{{"name":"#, self.pid)?;
        json_string(&mut out, &self.process_name)?;
        out.write_all(b"}}")?;
        for (tid, name) in &self.tracks {
            thread_metadata(&mut out, self.pid, *tid, name)?;
        }
        // The file holds a valid start from the first moment.
        out.mark()?;
        out.flush()?;
        self.out = Some(out);
        self.events_in_file = 0;
        Ok(())
    }

    /// Closes the current file's array.
    fn close(&mut self) -> std::io::Result<()> {
        if let Some(mut out) = self.out.take() {
            out.write_all(b"\n]\n")?;
            out.mark()?;
            out.flush()?;
        }
        Ok(())
    }

    /// The writer, positioned for one more event: a new file when this one is full.
    fn next_event(&mut self) -> std::io::Result<&mut EventWriter> {
        if self.out.is_none() {
            self.open()?;
        } else if self.events_in_file >= self.max_events {
            self.close()?;
            self.file_index += 1;
            self.open()?;
        }
        self.events_in_file += 1;
        let out = self.out.as_mut().ok_or_else(|| std::io::Error::other("trace file is closed"))?;
        // What is buffered ends with a whole event: it may reach the file from here on.
        out.mark()?;
        out.write_all(b",\n")?;
        Ok(out)
    }

    fn add_track(&mut self, tid: u64, name: String) -> std::io::Result<()> {
        if let Some(out) = self.out.as_mut() {
            thread_metadata(out, self.pid, tid, &name)?;
        }
        self.tracks.push((tid, name));
        Ok(())
    }

    /// The track for a complete event `[start, end)` of `kind`, created when needed.
    fn track_for(&mut self, kind: Kind, start: u64, end: u64) -> std::io::Result<Option<u64>> {
        let lanes = &mut self.lanes[kind as usize];
        for (i, lane) in lanes.iter_mut().enumerate() {
            if let Some(depth) = lane.fits(start, end) {
                lane.push(depth, start, end);
                return Ok(Some(kind.tid(i)));
            }
        }
        if lanes.len() >= MAX_TRACKS_PER_KIND {
            if self.left_out == 0 {
                eprintln!(
                    "profilemate: trace: {} events overlap on all {MAX_TRACKS_PER_KIND} tracks; further ones are \
                     left out of the trace (the tables keep them)",
                    kind.name()
                );
            }
            self.left_out += 1;
            return Ok(None);
        }
        let mut lane = Lane::default();
        lane.push(0, start, end);
        lanes.push(lane);
        let i = lanes.len() - 1;
        let name = if i == 0 { kind.name().to_string() } else { format!("{} {}", kind.name(), i + 1) };
        self.add_track(kind.tid(i), name)?;
        Ok(Some(kind.tid(i)))
    }

    /// Writes the complete events of one kind, `spans` giving each row's `(start, duration)`,
    /// in order of start (outer events first), each on a track where it nests.
    fn write_spans(
        &mut self,
        kind: Kind,
        spans: impl Iterator<Item = (u64, u64)>,
        mut write: impl FnMut(&mut EventWriter, usize) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        order.extend(spans.enumerate().map(|(i, (start, dur))| (start, start.saturating_add(dur), i)));
        order.sort_unstable_by_key(|&(start, end, i)| (start, std::cmp::Reverse(end), i));
        let result = (|| {
            for &(start, end, i) in &order {
                let Some(tid) = self.track_for(kind, start, end)? else { continue };
                let pid = self.pid;
                let out = self.next_event()?;
                write!(
                    out,
                    r#"{{"ph":"X","pid":{pid},"tid":{tid},"ts":{},"dur":{},"#,
                    Micros(start),
                    Micros(end - start)
                )?;
                write(out, i)?;
                out.write_all(b"}")?;
            }
            Ok(())
        })();
        self.order = order;
        result
    }

    fn write_all_rows(&mut self, rows: &Rows) -> std::io::Result<()> {
        let pid = self.pid;
        self.write_spans(
            Kind::ForwardPass,
            rows.forward_pass.iter().map(|r| (r.timestamp_ns, r.forward_time_ns)),
            |out, i| {
                let r = &rows.forward_pass[i];
                write!(
                    out,
                    r#""name":"{}","cat":"forward_pass","args":{{"batch_size":{},"num_tokens":{}"#,
                    r.phase.as_str(),
                    r.batch_size,
                    r.num_tokens
                )?;
                if let Some((t, d)) = numbers::throughput_fixed(r.num_tokens, r.forward_time_ns) {
                    write!(out, r#","throughput_tokens_per_sec":{}"#, Fixed(t, d))?;
                }
                out.write_all(b"}")
            },
        )?;
        self.write_spans(
            Kind::CpuOperations,
            rows.cpu_operations.iter().map(|r| (r.timestamp_ns, r.duration_ns)),
            |out, i| {
                let r = &rows.cpu_operations[i];
                out.write_all(br#""name":"#)?;
                json_string(out, &r.operation)?;
                out.write_all(br#","cat":"cpu_operation","args":{"#)?;
                if !r.context.is_empty() {
                    out.write_all(br#""context":"#)?;
                    json_string(out, &r.context)?;
                }
                out.write_all(b"}")
            },
        )?;
        self.write_spans(
            Kind::EncoderDecoder,
            rows.encoder_decoder.iter().map(|r| (r.timestamp_ns, r.duration_ns)),
            |out, i| {
                let r = &rows.encoder_decoder[i];
                write!(out, r#""name":"{}","cat":"encoder_decoder","args":{{"#, r.component.as_str())?;
                if !r.context.is_empty() {
                    out.write_all(br#""context":"#)?;
                    json_string(out, &r.context)?;
                }
                out.write_all(b"}")
            },
        )?;
        let captures: Vec<_> = rows
            .cuda_graph
            .iter()
            .filter(|r| r.event == profilemate_core::GraphEvent::Capture)
            .filter_map(|r| r.duration_ns.map(|d| (r, d)))
            .collect();
        self.write_spans(Kind::CudaGraph, captures.iter().map(|(r, d)| (r.timestamp_ns, *d)), |out, i| {
            write!(out, r#""name":"capture","cat":"cuda_graph","args":{{"batch_size":{}}}"#, captures[i].0.batch_size)
        })?;

        for r in &rows.preemption_events {
            if !matches!(r.event, LifecycleEvent::Preempted | LifecycleEvent::Resumed | LifecycleEvent::Evicted) {
                continue;
            }
            let tid = Kind::Requests.tid(0);
            if !self.requests_track {
                self.requests_track = true;
                self.add_track(tid, Kind::Requests.name().to_string())?;
            }
            let out = self.next_event()?;
            write!(
                out,
                r#"{{"ph":"i","s":"t","pid":{pid},"tid":{tid},"ts":{},"name":"{}","cat":"request","args":{{"request_id":"#,
                Micros(r.timestamp_ns),
                r.event.as_str()
            )?;
            json_string(out, &r.request_id)?;
            if !r.reason.is_empty() {
                out.write_all(br#","reason":"#)?;
                json_string(out, &r.reason)?;
            }
            if let Some(ns) = r.running_time_ns {
                write!(out, r#","running_time_sec":{}"#, Fixed(numbers::round_us(ns), 6))?;
            }
            if !r.extra_info.is_empty() {
                out.write_all(br#","extra_info":"#)?;
                json_string(out, &r.extra_info)?;
            }
            out.write_all(b"}}")?;
        }

        for r in &rows.batch_utilization {
            let out = self.next_event()?;
            write!(
                out,
                r#"{{"ph":"C","pid":{pid},"ts":{},"name":"queue","args":{{"running":{},"waiting":{}}}}}"#,
                Micros(r.timestamp_ns),
                r.running_queue_len,
                r.waiting_queue_len
            )?;
            let tokens = numbers::pct_e4(r.num_tokens, r.max_tokens);
            let seqs = numbers::pct_e4(r.num_seqs, r.max_num_seqs);
            if tokens.is_none() && seqs.is_none() {
                continue;
            }
            let out = self.next_event()?;
            write!(out, r#"{{"ph":"C","pid":{pid},"ts":{},"name":"batch","args":{{"#, Micros(r.timestamp_ns))?;
            let mut sep = "";
            if let Some(p) = tokens {
                write!(out, r#""token_utilization_pct":{}"#, Fixed(p, 4))?;
                sep = ",";
            }
            if let Some(p) = seqs {
                write!(out, r#"{sep}"seq_utilization_pct":{}"#, Fixed(p, 4))?;
            }
            out.write_all(b"}}")?;
        }

        for r in &rows.kv_cache {
            let out = self.next_event()?;
            write!(out, r#"{{"ph":"C","pid":{pid},"ts":{},"name":"kv_cache","args":{{"#, Micros(r.timestamp_ns))?;
            if let Some(p) = numbers::pct_e4(r.used_blocks, r.total_blocks) {
                write!(out, r#""usage_pct":{},"#, Fixed(p, 4))?;
            }
            write!(out, r#""used_blocks":{}}}}}"#, r.used_blocks)?;
        }
        Ok(())
    }
}

/// What [`PerfettoSink::complete_trace`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceCompletion {
    /// The trace file the events were appended to (the run's last one); `None` when there was
    /// nothing to complete (no trace, or its last file already closed).
    pub file: Option<String>,
    /// Events appended: rows of the tables that the trace did not show yet (less any left
    /// out because they overlap events on every track of their kind, as the live sink leaves
    /// them out).
    pub events_added: u64,
}

/// One trace event, as much of it as [`PerfettoSink::complete_trace`] needs.
#[derive(serde::Deserialize)]
struct TraceEvent {
    ph: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    cat: Option<String>,
    #[serde(default)]
    ts: Option<f64>,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    args: Option<TraceArgs>,
}

#[derive(serde::Deserialize)]
struct TraceArgs {
    #[serde(default)]
    name: Option<serde_json::Value>,
}

/// What identifies a row's event in the trace: its category (or counter), its name, and its
/// time in whole microseconds (the CSV tables' resolution).
type EventKey = (&'static str, String, u64);

fn key_us(ns: u64) -> u64 {
    numbers::round_us(ns)
}

/// The keys of the events `rows` make in a trace, one per row that makes events, with the row's
/// index; in the order of [`PerfettoSink::write_all_rows`].
fn row_keys(rows: &Rows) -> Vec<(EventKey, profilemate_core::Table, usize)> {
    use profilemate_core::Table as T;
    let mut keys = Vec::new();
    for (i, r) in rows.forward_pass.iter().enumerate() {
        keys.push((("forward_pass", r.phase.as_str().to_string(), key_us(r.timestamp_ns)), T::ForwardPass, i));
    }
    for (i, r) in rows.cpu_operations.iter().enumerate() {
        keys.push((("cpu_operation", r.operation.to_string(), key_us(r.timestamp_ns)), T::CpuOperations, i));
    }
    for (i, r) in rows.encoder_decoder.iter().enumerate() {
        let key = ("encoder_decoder", r.component.as_str().to_string(), key_us(r.timestamp_ns));
        keys.push((key, T::EncoderDecoder, i));
    }
    for (i, r) in rows.cuda_graph.iter().enumerate() {
        if r.event == GraphEvent::Capture && r.duration_ns.is_some() {
            keys.push((("cuda_graph", "capture".to_string(), key_us(r.timestamp_ns)), T::CudaGraphEvents, i));
        }
    }
    for (i, r) in rows.preemption_events.iter().enumerate() {
        if matches!(r.event, LifecycleEvent::Preempted | LifecycleEvent::Resumed | LifecycleEvent::Evicted) {
            keys.push((("request", r.event.as_str().to_string(), key_us(r.timestamp_ns)), T::PreemptionEvents, i));
        }
    }
    for (i, r) in rows.batch_utilization.iter().enumerate() {
        keys.push((("counter", "queue".to_string(), key_us(r.timestamp_ns)), T::BatchUtilization, i));
    }
    for (i, r) in rows.kv_cache.iter().enumerate() {
        keys.push((("counter", "kv_cache".to_string(), key_us(r.timestamp_ns)), T::KvCacheUsage, i));
    }
    keys
}

impl PerfettoSink {
    /// Completes the trace of a process killed before it finished (its last trace file has no
    /// closing `]`): the rows of `rows` (the run's tables, complete after
    /// [`recover_buffers`](crate::recover_buffers) replayed the thread buffers) that have no
    /// event in the trace files of `dir` yet are appended, as whole events, to the last file,
    /// on the tracks of the process that file names. A row's event is matched by its kind,
    /// name and time to the microsecond (the tables' resolution; the appended events' times
    /// have that resolution too). Running it again appends nothing, and a trace whose last
    /// file is closed is left alone. The array is left open: close it by appending `]`
    /// (`profilemate recover` does).
    ///
    /// ```
    /// use profilemate_core::{ForwardPassRow, Phase, Rows, Sink};
    /// use profilemate_sinks::PerfettoSink;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let pass = |ms: u64| ForwardPassRow { timestamp_ns: ms * 1_000_000, phase: Phase::Decode, batch_size: 1, num_tokens: 1, forward_time_ns: 500_000, step: None };
    /// let mut sink = PerfettoSink::create_for_process(dir.path(), 7, "engine")?;
    /// let mut rows = Rows::default();
    /// rows.forward_pass.push(pass(1));
    /// sink.write_rows(&rows)?;
    /// sink.flush()?;
    /// std::mem::forget(sink); // killed: the array is not closed
    /// rows.forward_pass.push(pass(2)); // a row the trace did not get
    /// let done = PerfettoSink::complete_trace(dir.path(), &rows)?;
    /// assert_eq!(done.events_added, 1);
    /// assert_eq!(PerfettoSink::complete_trace(dir.path(), &rows)?.events_added, 0, "idempotent");
    /// let mut text = std::fs::read_to_string(dir.path().join("profilemate_trace.json"))?;
    /// text.push_str("\n]\n");
    /// let trace: serde_json::Value = serde_json::from_str(&text)?;
    /// let slices = trace.as_array().unwrap().iter().filter(|e| e["ph"] == "X" && e["pid"] == 7).count();
    /// assert_eq!(slices, 2);
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A trace file cannot be read, does not parse as whole events, or cannot be written.
    pub fn complete_trace(dir: &Path, rows: &Rows) -> Result<TraceCompletion, SinkError> {
        let mut files = Vec::new();
        while dir.join(trace_file_name(files.len())).exists() {
            files.push(trace_file_name(files.len()));
        }
        let Some(last_name) = files.last().cloned() else { return Ok(TraceCompletion::default()) };
        let last_path = dir.join(&last_name);
        let text = std::fs::read(&last_path).map_err(|e| format!("{}: {e}", last_path.display()))?;
        let trimmed = text.trim_ascii_end();
        if trimmed.ends_with(b"]") || trimmed.is_empty() {
            return Ok(TraceCompletion::default());
        }
        let body_len = trimmed.strip_suffix(b",").unwrap_or(trimmed).len();
        // The events already in the trace, by key, counted.
        let mut seen: HashMap<EventKey, u64> = HashMap::new();
        let (mut pid, mut process_name, mut events_in_last) = (None, None, 0usize);
        for (index, name) in files.iter().enumerate() {
            let is_last = index + 1 == files.len();
            let mut bytes = if is_last {
                text[..body_len].to_vec()
            } else {
                std::fs::read(dir.join(name)).map_err(|e| format!("{name}: {e}"))?
            };
            if is_last {
                bytes.extend_from_slice(b"\n]");
            }
            let events: Vec<TraceEvent> =
                serde_json::from_slice(&bytes).map_err(|e| format!("{name} does not end with a whole event: {e}"))?;
            for e in events {
                let ts = e.ts.map(|us| us.round().max(0.0) as u64);
                let key: Option<EventKey> = match (e.ph.as_str(), e.cat.as_deref(), e.name, ts) {
                    ("X" | "i", Some(cat), Some(name), Some(ts)) => {
                        let cat = ["forward_pass", "cpu_operation", "encoder_decoder", "cuda_graph", "request"]
                            .into_iter()
                            .find(|c| *c == cat);
                        cat.map(|c| (c, name, ts))
                    }
                    ("C", _, Some(name), Some(ts)) if name == "queue" || name == "kv_cache" => {
                        Some(("counter", name, ts))
                    }
                    ("M", _, Some(name), _) if name == "process_name" && is_last && pid.is_none() => {
                        pid = e.pid;
                        process_name = e.args.and_then(|a| a.name).and_then(|n| n.as_str().map(String::from));
                        None
                    }
                    _ => None,
                };
                if is_last && e.ph != "M" {
                    events_in_last += 1;
                }
                if let Some(key) = key {
                    *seen.entry(key).or_insert(0) += 1;
                }
            }
        }
        let mut missing = Rows::default();
        let mut added = 0u64;
        for (key, table, i) in row_keys(rows) {
            if let Some(n) = seen.get_mut(&key).filter(|n| **n > 0) {
                *n -= 1;
                continue;
            }
            added += 1;
            use profilemate_core::Table as T;
            match table {
                T::ForwardPass => missing.forward_pass.push(rows.forward_pass[i].clone()),
                T::CpuOperations => missing.cpu_operations.push(rows.cpu_operations[i].clone()),
                T::EncoderDecoder => missing.encoder_decoder.push(rows.encoder_decoder[i].clone()),
                T::CudaGraphEvents => missing.cuda_graph.push(rows.cuda_graph[i].clone()),
                T::PreemptionEvents => missing.preemption_events.push(rows.preemption_events[i].clone()),
                T::BatchUtilization => missing.batch_utilization.push(rows.batch_utilization[i].clone()),
                T::KvCacheUsage => missing.kv_cache.push(rows.kv_cache[i].clone()),
                _ => {}
            }
        }
        if added == 0 {
            return Ok(TraceCompletion { file: Some(last_name), events_added: 0 });
        }
        // Appended after the last whole event (a trailing comma, if any, cut first).
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&last_path)
            .map_err(|e| format!("cannot append to {}: {e}", last_path.display()))?;
        if body_len < text.len() {
            file.set_len(body_len as u64).map_err(|e| format!("{}: {e}", last_path.display()))?;
        }
        let pid = pid.unwrap_or(0);
        let mut sink = PerfettoSink {
            dir: dir.to_path_buf(),
            max_events: DEFAULT_MAX_EVENTS_PER_FILE,
            out: Some(EventWriter::new(file)),
            file_index: files.len() - 1,
            events_in_file: events_in_last,
            pid,
            process_name: process_name.unwrap_or_else(|| format!("profilemate pid {pid}")),
            tracks: Vec::new(),
            lanes: Default::default(),
            requests_track: false,
            left_out: 0,
            order: Vec::new(),
            finished: false,
        };
        sink.write_rows(&missing)?;
        sink.flush()?;
        // Events that overlap others on every track of their kind are left out again, as the
        // live sink left them out.
        Ok(TraceCompletion { file: Some(trace_file_name(sink.file_index)), events_added: added - sink.left_out })
    }
}

fn json_string(out: &mut impl Write, s: &str) -> std::io::Result<()> {
    serde_json::to_writer(out, s).map_err(std::io::Error::other)
}

fn thread_metadata(out: &mut impl Write, pid: u32, tid: u64, name: &str) -> std::io::Result<()> {
    write!(out, r#",{}{{"name":"thread_name","ph":"M","pid":{pid},"tid":{tid},"args":{{"name":"#, '\n')?;
    json_string(out, name)?;
    write!(
        out,
        r#"}}}},{}{{"name":"thread_sort_index","ph":"M","pid":{pid},"tid":{tid},"args":{{"sort_index":{}}}}}"#,
        '\n',
        tid % 10_000_000
    )
}

impl Sink for PerfettoSink {
    fn name(&self) -> &str {
        "perfetto"
    }

    fn write_rows(&mut self, rows: &Rows) -> Result<(), SinkError> {
        if self.finished {
            return Err("the trace is already finished".into());
        }
        let result = self.write_all_rows(rows);
        result.map_err(|e| format!("{}: {e}", trace_file_name(self.file_index)).into())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        if let Some(out) = self.out.as_mut() {
            // Between two batches of rows the last event is whole.
            out.mark().and_then(|()| out.flush()).map_err(|e| format!("{}: {e}", trace_file_name(self.file_index)))?;
        }
        Ok(())
    }

    fn finish(&mut self, _manifest: &RunManifest) -> Result<(), SinkError> {
        self.finished = true;
        self.close().map_err(|e| format!("{}: {e}", trace_file_name(self.file_index)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_track_takes_nested_and_following_events_and_refuses_partial_overlaps() {
        let mut lane = Lane::default();
        for (s, e) in [(0, 100), (0, 50), (10, 20), (20, 30), (50, 100), (100, 100), (100, 200)] {
            let depth = lane.fits(s, e).unwrap_or_else(|| panic!("[{s}, {e}) should fit"));
            lane.push(depth, s, e);
        }
        assert_eq!(lane.fits(150, 250), None, "partially overlaps [100, 200)");
        assert_eq!(lane.fits(90, 95), None, "starts before the last start");
        assert_eq!(lane.fits(150, 200), Some(1));
        assert_eq!(lane.fits(200, 300), Some(0));
    }

    #[test]
    fn numbers_are_written_exactly() {
        assert_eq!(Micros(1_234_567).to_string(), "1234.567");
        assert_eq!(Micros(5).to_string(), "0.005");
        assert_eq!(Fixed(93_750, 4).to_string(), "9.3750");
        assert_eq!(Fixed(5_659_460, 3).to_string(), "5659.460");
        assert_eq!(Fixed(7, 6).to_string(), "0.000007");
    }
}
