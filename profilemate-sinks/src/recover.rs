//! Recovery of a killed run's tables: torn last lines dropped, the dead session's thread buffers
//! replayed into the CSV tables.
//!
//! `profilemate recover DIR` (the CLI) calls these first and then rebuilds the summaries and
//! the manifest from the rows; anything else that completes a killed run's directory (the vLLM
//! binding's merge) can call them the same way.

use crate::CsvSink;
use profilemate_core::{BufferReplay, Error, ProfilerKind, ReplayTarget, Sink, Table};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Cuts the CSV file at `path` back to its last complete row: a process killed in the middle
/// of a write can leave a torn last line (also one cut inside a quoted field). Returns the
/// bytes dropped, `None` when the file ends with a whole row or does not exist.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("cpu_operations_timing.csv");
/// std::fs::write(&path, "timestamp_sec,operation,duration_ms,context\n0.1,scheduling,0.2,\n0.2,sched")?;
/// assert_eq!(profilemate_sinks::drop_torn_line(&path)?, Some(9));
/// assert_eq!(profilemate_sinks::drop_torn_line(&path)?, None, "idempotent");
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// The I/O error reading or cutting the file (a read-only file, say), naming it.
pub fn drop_torn_line(path: &Path) -> std::io::Result<Option<u64>> {
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(named(e)),
    };
    let len = file.metadata().map_err(named)?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::End(-1)).and_then(|_| file.read_exact(&mut last)).map_err(named)?;
    file.seek(SeekFrom::Start(0)).map_err(named)?;
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(file);
    let mut record = csv::ByteRecord::new();
    let mut fields = None;
    let mut good_end = 0u64;
    loop {
        let start = reader.position().byte();
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            // A row cut inside a quoted field reads as an error or as a short row: cut there.
            Err(_) => {
                good_end = start;
                break;
            }
        }
        let end = reader.position().byte();
        let width = *fields.get_or_insert(record.len());
        let at_end = end >= len;
        if record.len() < width || (at_end && last[0] != b'\n') {
            good_end = start;
            break;
        }
        good_end = end;
    }
    if good_end >= len {
        return Ok(None);
    }
    let file = std::fs::OpenOptions::new().write(true).open(path).map_err(named)?;
    file.set_len(good_end).map_err(named)?;
    Ok(Some(len - good_end))
}

/// What [`recover_buffers`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BufferRecovery {
    /// The dead sessions replayed (and the live ones left alone).
    pub replay: BufferReplay,
    /// Bytes of torn last lines dropped before the replayed rows were appended, per file.
    pub torn_bytes_dropped: BTreeMap<String, u64>,
}

/// Replays the thread buffers of every dead session in `dir` into its CSV tables (see
/// [`profilemate_core::replay_dead_buffers`] for what "dead" means and why the replay is
/// exactly once): each table's torn last line is dropped, then the records still in the
/// buffers are appended as rows, and the buffer files removed. Summaries, the manifest, the
/// Perfetto trace and Parquet tables are not touched here (the replayed rows reach the CSV
/// tables only). `profilemate recover DIR` (`profilemate_cli::recover`) does this with
/// [`replay_buffers`], then completes the trace ([`PerfettoSink::complete_trace`](crate::PerfettoSink::complete_trace))
/// and the Parquet tables from the CSV tables, records the figures in the manifest, and removes
/// the files.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let done = profilemate_sinks::recover_buffers(dir.path())?;
/// assert_eq!((done.replay.events_recovered(), done.replay.events_lost_in_flight()), (0, 0));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`Error::Recovery`] naming the directory and the file that could not be read or written (a
/// read-only directory, a full disk); the buffers are kept for a later try.
pub fn recover_buffers(dir: &Path) -> Result<BufferRecovery, Error> {
    let done = replay_buffers(dir)?;
    profilemate_core::remove_replayed_buffers(dir)?;
    Ok(done)
}

/// [`recover_buffers`] without removing the replayed buffer files: the caller records the
/// figures (a killed caller's successor finds them in the files, marked
/// [`already_replayed`](profilemate_core::ReplayedSession::already_replayed)), then calls
/// [`profilemate_core::remove_replayed_buffers`].
///
/// # Errors
///
/// As [`recover_buffers`].
pub fn replay_buffers(dir: &Path) -> Result<BufferRecovery, Error> {
    let fail = |source: std::io::Error| Error::Recovery { dir: dir.to_path_buf(), source };
    let mut torn = BTreeMap::new();
    let replay = profilemate_core::replay_dead_buffers(dir, &mut |config, dir| {
        for table in Table::ALL.iter().filter(|t| config.is_enabled(t.profiler())) {
            if let Some(n) = drop_torn_line(&dir.join(table.file_name())).map_err(fail)? {
                *torn.entry(table.file_name().to_string()).or_insert(0) += n;
            }
        }
        let sink = CsvSink::append(dir, config).map_err(fail)?;
        let lifecycle_before = if config.is_enabled(ProfilerKind::Preemption) {
            crate::TableFollower::with_tables(dir, &[Table::PreemptionEvents]).poll().preemption_events
        } else {
            Vec::new()
        };
        Ok(ReplayTarget { sinks: vec![Box::new(sink) as Box<dyn Sink>], lifecycle_before })
    })?;
    Ok(BufferRecovery { replay, torn_bytes_dropped: torn })
}
