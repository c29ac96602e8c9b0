//! Replaying the thread buffers of a dead session into its files.
//!
//! See [`crate::ring`] for the buffers' layout and the journal that makes the replay exactly
//! once; [`replay_dead_buffers`] is the entry point.

use crate::backend::HostClock;
use crate::collector::{Collector, RunInfo};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::moe_counts::MoeCounts;
use crate::recorder::{DropCounters, MoeSource, Shared, ThreadBuffer, Timing};
use crate::ring::{buffer_files, remove_if_replayed, DeadBuffers, Opened, RingKind};
use crate::rows::{PreemptionEventRow, Table};
use crate::sink::Sink;
use crate::types::ProfilerKind;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// What [`replay_dead_buffers`] did with one dead session's buffers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplayedSession {
    /// The buffer file (its name in the directory; removed once replayed).
    pub file: String,
    /// The dead process's id, from the file's header.
    pub pid: u32,
    /// Records found in the buffers and turned into rows (an event whose recording call had
    /// returned before the kill).
    pub events_recovered: u64,
    /// Records lost because they were being written at the instant of the kill, or held by the
    /// collector waiting for their device time.
    pub events_lost_in_flight: u64,
    /// The process died during a collector pass: the rows of that pass were cut from the
    /// files (truncated to their journaled lengths) and replayed.
    pub killed_in_pass: bool,
    /// Rows appended, per table file.
    pub rows: BTreeMap<String, u64>,
    /// Replayed by an earlier recovery that stopped before its file was removed: no row was
    /// written now, and the figures are the earlier recovery's (from the file), so a caller
    /// that had recorded them already (the same `file` in its manifest) does not add them again.
    pub already_replayed: bool,
}

/// What [`replay_dead_buffers`] did in a directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BufferReplay {
    /// Dead sessions replayed.
    pub sessions: Vec<ReplayedSession>,
    /// Buffer files left alone because their session is alive (or another process is
    /// recovering them right now).
    pub live: Vec<String>,
}

impl BufferReplay {
    /// Events recovered, over every session.
    pub fn events_recovered(&self) -> u64 {
        self.sessions.iter().map(|s| s.events_recovered).sum()
    }
    /// Events lost in flight, over every session.
    pub fn events_lost_in_flight(&self) -> u64 {
        self.sessions.iter().map(|s| s.events_lost_in_flight).sum()
    }
}

/// What a replay writes into, built for the dead session's configuration and output directory
/// by a [`ReplaySinkFactory`].
#[derive(Default)]
pub struct ReplayTarget {
    /// The sinks the replayed rows are appended to (`profilemate-sinks`' `recover_buffers`
    /// opens the CSV tables for appending).
    pub sinks: Vec<Box<dyn Sink>>,
    /// The lifecycle events already in the files (`preemption_events.csv`), so that a request
    /// started before the kill and finished in the replayed records gets its whole
    /// `request_lifecycle.csv` row. Empty: such a request's row lacks its start.
    pub lifecycle_before: Vec<PreemptionEventRow>,
}

impl std::fmt::Debug for ReplayTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayTarget")
            .field("sinks", &self.sinks.iter().map(|s| s.name().to_string()).collect::<Vec<_>>())
            .field("lifecycle_before", &self.lifecycle_before.len())
            .finish()
    }
}

/// Builds the [`ReplayTarget`] of a dead session, from its configuration and output directory.
pub type ReplaySinkFactory<'a> = &'a mut dyn FnMut(&Config, &Path) -> Result<ReplayTarget>;

/// Turns the records left in the thread buffers of every dead session in `dir` into rows,
/// through the sinks `make_sinks` builds (appending to the run's files).
///
/// A session is dead when its buffer file's lock can be taken (the kernel releases it when the
/// process dies); the lock is then held for the replay, so two processes never replay the same
/// buffers. A session killed during a collector pass first has its table files cut back to
/// their lengths at the pass's start. The replay runs the records through the same collector
/// code as the live session (host-clock durations for device-timed records, whose GPU events
/// died with the process). Once the sinks have flushed, the buffers are committed and the file
/// marked replayed, with its figures: running it again replays nothing (it reports the file
/// as [`already_replayed`](ReplayedSession::already_replayed)). The caller records the figures
/// and then removes the files with [`remove_replayed_buffers`]. Summaries and the manifest are
/// left to the caller (`profilemate recover` rebuilds them from the rows).
///
/// ```
/// use profilemate_core::{replay_dead_buffers, Session};
/// let dir = tempfile::tempdir()?;
/// // Nothing to replay in a directory whose sessions all shut down.
/// let session = Session::builder().dir(dir.path()).sinks(&[]).build()?;
/// session.shutdown()?;
/// let done = replay_dead_buffers(dir.path(), &mut |_, _| Ok(Default::default()))?;
/// assert_eq!(done.sessions.len(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`Error::Recovery`] naming the directory and the file when a buffer file cannot be read or
/// the table files cannot be cut or written (a read-only directory, a full disk): the buffers
/// are kept, and a later call picks up where this one stopped. Errors from `make_sinks` are
/// returned as they are, the buffers kept too.
pub fn replay_dead_buffers(dir: &Path, make_sinks: ReplaySinkFactory<'_>) -> Result<BufferReplay> {
    let fail = |source: std::io::Error| Error::Recovery { dir: dir.to_path_buf(), source };
    let named = |path: &Path, e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let mut out = BufferReplay::default();
    for path in buffer_files(dir).map_err(|e| fail(named(dir, e)))? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dead = match DeadBuffers::open(&path).map_err(|e| fail(named(&path, e)))? {
            Opened::Locked => {
                out.live.push(name);
                continue;
            }
            Opened::Empty => continue,
            Opened::Dead(d) => d,
        };
        if let Some((events_recovered, events_lost_in_flight)) = dead.replayed {
            out.sessions.push(ReplayedSession {
                file: name,
                pid: dead.pid,
                events_recovered,
                events_lost_in_flight,
                already_replayed: true,
                ..ReplayedSession::default()
            });
            continue;
        }
        out.sessions.push(replay_one(dir, *dead, name, make_sinks, &fail, &named)?);
    }
    Ok(out)
}

/// Removes the buffer files in `dir` that [`replay_dead_buffers`] replayed; returns how many.
/// Call it once the replay's figures are recorded (in the manifest).
///
/// # Errors
///
/// [`Error::Recovery`] naming the file that cannot be removed (a read-only directory): it is
/// removed by a later call, and its figures are not counted twice by a caller that checks
/// [`ReplayedSession::already_replayed`].
pub fn remove_replayed_buffers(dir: &Path) -> Result<usize> {
    let fail = |path: &Path, e: std::io::Error| Error::Recovery {
        dir: dir.to_path_buf(),
        source: std::io::Error::new(e.kind(), format!("{}: {e}", path.display())),
    };
    let mut removed = 0;
    for path in buffer_files(dir).map_err(|e| fail(dir, e))? {
        removed += usize::from(remove_if_replayed(&path).map_err(|e| fail(&path, e))?);
    }
    Ok(removed)
}

fn replay_one(
    dir: &Path,
    mut dead: DeadBuffers,
    name: String,
    make_sinks: ReplaySinkFactory<'_>,
    fail: &dyn Fn(std::io::Error) -> Error,
    named: &dyn Fn(&Path, std::io::Error) -> std::io::Error,
) -> Result<ReplayedSession> {
    let enabled: [bool; ProfilerKind::ALL.len()] = std::array::from_fn(|i| dead.enabled & (1 << i) != 0);
    let moe_detail = dead.enabled & (1 << 63) != 0;
    let mut config = Config { dir: dir.to_path_buf(), ..Config::default() };
    config.disabled = ProfilerKind::ALL.into_iter().filter(|k| !enabled[k.index()]).collect();
    if moe_detail {
        config.moe_window_steps = 0;
    }
    let killed_in_pass = dead.journal.is_some();
    // 1. A pass cut short: its rows (whole or torn) leave the files; the rings replay it.
    if let Some(journal) = &dead.journal {
        for (table, len) in Table::ALL.iter().zip(journal) {
            let Some(len) = *len else { continue };
            let path = dir.join(table.file_name());
            let cut = || -> std::io::Result<()> {
                let file = match std::fs::OpenOptions::new().write(true).open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(e),
                };
                if file.metadata()?.len() > len {
                    file.set_len(len)?;
                }
                Ok(())
            };
            cut().map_err(|e| fail(named(&path, e)))?;
        }
    }
    let lost = dead.lost_in_flight();
    // 2. The sinks, before anything of the buffers changes: a directory that refuses them
    //    leaves the buffers as they were.
    let target = make_sinks(&config, dir)?;
    // 3. The replay's own journal: killed from here on, the next recovery cuts back to these
    //    lengths and replays the same records.
    let lengths: Vec<Option<u64>> =
        Table::ALL.iter().map(|t| std::fs::metadata(dir.join(t.file_name())).ok().map(|m| m.len())).collect();
    dead.begin_pass(&lengths);
    let clock = HostClock::new();
    let mut shared = Shared::new(clock, Timing::Host, enabled, 1);
    shared.start_raw = dead.start_raw;
    shared.anchor = dead.anchor;
    shared.moe_detail = moe_detail;
    shared.operations = RwLock::new(dead.ops.iter().map(|n| Arc::<str>::from(n.as_str())).collect());
    let info = RunInfo {
        config,
        manifest_dir: None,
        started_at: String::new(),
        monotonic_start_ns: 0,
        host: String::new(),
        timing_backend: "host".into(),
    };
    let mut collector = Collector::new(Arc::new(shared), info, target.sinks);
    collector.seed_lifecycle(&target.lifecycle_before);
    let mut buffers = Vec::new();
    let mut moe = Vec::new();
    for (kind, consumer) in std::mem::take(&mut dead.rings) {
        match kind {
            RingKind::Events => buffers.push(ThreadBuffer { consumer, drops: Arc::new(DropCounters::default()) }),
            RingKind::MoeDetail => moe.push(MoeSource { counts: Arc::new(MoeCounts::new()), detail: Some(consumer) }),
        }
    }
    let (events, rows, errors) = collector.replay(buffers, moe);
    if let Some((sink, n)) = errors.into_iter().next() {
        return Err(fail(std::io::Error::other(format!(
            "sink `{sink}` failed {n} time(s) while writing the replayed rows into {}",
            dir.display()
        ))));
    }
    let pid = dead.pid;
    dead.finish(events, lost);
    Ok(ReplayedSession {
        file: name,
        pid,
        events_recovered: events,
        events_lost_in_flight: lost,
        killed_in_pass,
        rows,
        already_replayed: false,
    })
}
