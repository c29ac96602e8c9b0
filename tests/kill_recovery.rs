//! Records that survive a SIGKILL: a child process records into a session and is killed before
//! its collector drained them; `recover_buffers` replays its thread buffers into the CSV tables,
//! exactly once, also after a flush, and keeps them when the directory cannot be written.
//!
//! The child is this test binary itself, running the ignored test `child_records_then_waits`
//! with `PROFILEMATE_TEST_CHILD_DIR` set.
#![allow(clippy::unwrap_used)]

use profilemate::{CpuOp, Phase, SinkKind};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const CHILD_DIR: &str = "PROFILEMATE_TEST_CHILD_DIR";
/// `FLUSHED,MORE`: passes recorded then flushed (committed), then passes recorded after.
const CHILD_PASSES: &str = "PROFILEMATE_TEST_CHILD_PASSES";
/// Set: once ready, the child forks a process of its own without exec (that sleeps) and says
/// `forked <pid>` before `ready`.
const CHILD_FORKS: &str = "PROFILEMATE_TEST_CHILD_FORKS";

/// The child: records, says `ready` on stdout, and waits to be killed. Its collector's period is
/// a minute, so nothing recorded after the flush is drained before the kill.
#[test]
#[ignore = "run as a child process by the tests of this file"]
fn child_records_then_waits() {
    let dir = std::env::var(CHILD_DIR).expect("run only as a child of this file's tests");
    let passes = std::env::var(CHILD_PASSES).unwrap();
    let (flushed, more) = passes.split_once(',').unwrap();
    let (flushed, more): (u32, u32) = (flushed.parse().unwrap(), more.parse().unwrap());
    let session = profilemate::builder()
        .dir(&dir)
        .sinks(&[SinkKind::Csv, SinkKind::Json])
        .buffer_events(8192)
        .flush_interval(Duration::from_secs(60))
        .build()
        .unwrap();
    let detokenize = session.register_cpu_operation("detokenize").unwrap();
    let (forward, cpu, requests) = (session.forward_pass(), session.cpu_timing(), session.requests());
    let mut step = 0u32;
    let mut record = |n: u32| {
        for _ in 0..n {
            step += 1;
            cpu.record(detokenize, Duration::from_micros(20), "batch_size=4");
            forward.record(Phase::Decode, 4, 4, Duration::from_micros(500 + u64::from(step)));
            if step % 10 == 0 {
                requests.started(&format!("req-{step}"));
            }
        }
    };
    record(flushed);
    session.flush().unwrap();
    record(more);
    if flushed >= 10 {
        // A request started before the flush, preempted and finished after it.
        requests.preempted("req-10", "RECOMPUTE", "num_blocks=4");
        requests.resumed("req-10");
        requests.finished("req-10", "");
    }
    drop(cpu.start(CpuOp::SCHEDULING));
    #[cfg(unix)]
    if std::env::var_os(CHILD_FORKS).is_some() {
        // SAFETY: the forked process only sleeps and exits (async-signal-safe calls).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            unsafe {
                libc::sleep(600);
                libc::_exit(0);
            }
        }
        println!("forked {pid}");
    }
    println!("ready");
    std::thread::sleep(Duration::from_secs(600));
}

fn spawn_child(dir: &Path, flushed: u32, more: u32) -> Child {
    spawn_child_forking(dir, flushed, more, false).0
}

/// [`spawn_child`]; with `fork`, the child also forks a sleeping process without exec, whose
/// pid is returned.
fn spawn_child_forking(dir: &Path, flushed: u32, more: u32, fork: bool) -> (Child, Option<i32>) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "child_records_then_waits", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_PASSES, format!("{flushed},{more}"))
        .stdout(Stdio::piped());
    if fork {
        command.env(CHILD_FORKS, "1");
    }
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut forked = None;
    loop {
        match lines.next() {
            // libtest prints the test's name first, on the same line.
            Some(Ok(l)) if l.trim_end().ends_with("ready") => break,
            Some(Ok(l)) if l.contains("forked ") => {
                forked = l.rsplit("forked ").next().and_then(|p| p.trim().parse().ok());
            }
            Some(Ok(_)) => continue,
            other => panic!("the child ended before it was ready: {other:?}"),
        }
    }
    (child, forked)
}

/// Runs a child that records `flushed` passes, flushes, records `more`, and SIGKILLs it.
fn killed_run(dir: &Path, flushed: u32, more: u32) {
    let mut child = spawn_child(dir, flushed, more);
    child.kill().unwrap();
    child.wait().unwrap();
}

fn rows(dir: &Path, file: &str) -> Vec<csv::StringRecord> {
    let mut reader = csv::Reader::from_path(dir.join(file)).unwrap();
    reader.records().map(|r| r.expect("every row parses")).collect()
}

fn buffer_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".profilemate_buffers."))
        .collect();
    v.sort();
    v
}

/// Forward rows hold every step id from 1 to `n` once.
fn assert_forward_exactly(dir: &Path, n: u32) {
    let forward = rows(dir, "forward_pass_timing.csv");
    let mut steps: Vec<u32> = forward.iter().map(|r| r[6].parse().unwrap()).collect();
    steps.sort_unstable();
    assert_eq!(steps, (1..=n).collect::<Vec<_>>(), "forward rows: each step once, none missing");
}

#[test]
fn records_a_killed_process_had_not_drained_are_replayed_once() {
    let dir = tempfile::tempdir().unwrap();
    killed_run(dir.path(), 0, 700);
    assert_eq!(rows(dir.path(), "forward_pass_timing.csv").len(), 0, "nothing drained before the kill");
    assert_eq!(buffer_files(dir.path()).len(), 1, "the killed session's buffers are in the directory");

    let done = profilemate_sinks::recover_buffers(dir.path()).unwrap();
    assert_eq!(done.replay.sessions.len(), 1);
    let s = &done.replay.sessions[0];
    // 700 forward passes, 700 CPU operations, 70 lifecycle events, one scheduling span.
    assert_eq!(s.events_recovered, 700 + 700 + 70 + 1);
    assert_eq!(s.events_lost_in_flight, 0);
    assert_eq!(s.rows["forward_pass_timing.csv"], 700);
    assert_forward_exactly(dir.path(), 700);
    let cpu = rows(dir.path(), "cpu_operations_timing.csv");
    assert_eq!(cpu.iter().filter(|r| &r[1] == "detokenize" && &r[3] == "batch_size=4").count(), 700);
    assert_eq!(cpu.iter().filter(|r| &r[1] == "scheduling").count(), 1);
    assert_eq!(rows(dir.path(), "preemption_events.csv").len(), 70);
    assert!(buffer_files(dir.path()).is_empty(), "replayed buffers are removed");

    // Idempotent: a second run finds nothing and changes no file.
    let before = std::fs::read(dir.path().join("forward_pass_timing.csv")).unwrap();
    let again = profilemate_sinks::recover_buffers(dir.path()).unwrap();
    assert_eq!(again.replay.sessions.len(), 0);
    assert_eq!(std::fs::read(dir.path().join("forward_pass_timing.csv")).unwrap(), before);
}

#[test]
fn rows_flushed_before_the_kill_are_not_written_twice() {
    let dir = tempfile::tempdir().unwrap();
    killed_run(dir.path(), 400, 250);
    assert_eq!(rows(dir.path(), "forward_pass_timing.csv").len(), 400, "the flushed rows");
    let done = profilemate_sinks::recover_buffers(dir.path()).unwrap();
    assert_eq!(done.replay.sessions[0].rows["forward_pass_timing.csv"], 250);
    assert_forward_exactly(dir.path(), 650);
    // The request started before the flush and finished in the replayed records: its whole
    // lifecycle row (the replay knew its start from preemption_events.csv).
    let lifecycle = rows(dir.path(), "request_lifecycle.csv");
    let req = lifecycle.iter().find(|r| &r[0] == "req-10").expect("req-10's lifecycle row");
    assert!(!req[1].is_empty(), "started_sec: {req:?}");
    assert!(!req[2].is_empty() && !req[4].is_empty(), "preempted and finished: {req:?}");
    assert_eq!(&req[7], "1", "num_preemptions: {req:?}");
}

#[test]
fn a_live_session_and_a_recovery_under_way_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let session = profilemate::builder().dir(dir.path()).sinks(&[SinkKind::Csv]).build().unwrap();
    session.forward_pass().record(Phase::Decode, 1, 1, Duration::from_micros(10));
    let done = profilemate_sinks::recover_buffers(dir.path()).unwrap();
    assert_eq!((done.replay.sessions.len(), done.replay.live.len()), (0, 1), "a live session's buffers");
    session.shutdown().unwrap();
    assert!(buffer_files(dir.path()).is_empty(), "a normal shutdown removes the buffers");
    assert_eq!(rows(dir.path(), "forward_pass_timing.csv").len(), 1);
}

/// A process forked without exec inherits the session's buffer file descriptor; it lets go
/// of the lock (a `pthread_atfork` handler), so the buffers read as live while the session's
/// process lives, and are recovered once it is killed although the forked process still runs.
#[cfg(unix)]
#[test]
fn a_process_forked_without_exec_does_not_keep_a_dead_sessions_buffers_live() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, forked) = spawn_child_forking(dir.path(), 100, 150, true);
    let forked = forked.expect("the child said the pid it forked");
    let alive = |pid: i32| unsafe { libc::kill(pid, 0) } == 0;
    // The parent holds the lock: its buffers are live (the forked process's copy of the lock
    // descriptor was let go of, not the lock itself).
    let done = profilemate_sinks::recover_buffers(dir.path()).unwrap();
    assert_eq!((done.replay.sessions.len(), done.replay.live.len()), (0, 1), "the live session's buffers");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(alive(forked), "the forked process still runs");
    let done = profilemate_sinks::recover_buffers(dir.path()).unwrap();
    let still_alive = alive(forked);
    // SAFETY: a signal to the process this test's child forked.
    unsafe { libc::kill(forked, libc::SIGKILL) };
    assert!(still_alive, "the forked process ran during the recovery");
    assert_eq!(done.replay.live.len(), 0, "the forked process does not keep the buffers live");
    assert_eq!(done.replay.sessions.len(), 1);
    assert_eq!(done.replay.sessions[0].rows["forward_pass_timing.csv"], 150);
    assert_forward_exactly(dir.path(), 250);
    assert!(buffer_files(dir.path()).is_empty());
}

/// Runs `mount` with `args`; false (and says why) where this process may not mount.
fn mount(args: &[&str]) -> bool {
    match Command::new("mount").args(args).output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!("mount {args:?} failed ({}): not checked here", String::from_utf8_lossy(&o.stderr).trim());
            false
        }
        Err(e) => {
            eprintln!("cannot run mount ({e}): not checked here");
            false
        }
    }
}

/// A read-only directory during recovery: a clear error naming the directory, the buffers kept;
/// writable again, the same buffers replay exactly once. (A tmpfs remounted read-only: as root,
/// file permissions would not stop the writes. Skipped, saying so, where mounting is not allowed.)
#[test]
fn a_read_only_directory_keeps_the_buffers_for_a_later_try() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("ro");
    std::fs::create_dir(&mnt).unwrap();
    if !mount(&["-t", "tmpfs", "-o", "size=16m", "tmpfs", mnt.to_str().unwrap()]) {
        return;
    }
    let result = std::panic::catch_unwind(|| {
        killed_run(&mnt, 30, 70);
        let buffers = buffer_files(&mnt);
        assert_eq!(buffers.len(), 1);
        let kept = std::fs::read(&buffers[0]).unwrap();
        assert!(mount(&["-o", "remount,ro", mnt.to_str().unwrap()]));
        let err = profilemate_sinks::recover_buffers(&mnt).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&mnt.display().to_string()), "{msg}");
        assert!(msg.contains("kept for a later try"), "{msg}");
        assert_eq!(std::fs::read(&buffers[0]).unwrap(), kept, "the buffers are untouched");
        assert!(mount(&["-o", "remount,rw", mnt.to_str().unwrap()]));
        let done = profilemate_sinks::recover_buffers(&mnt).unwrap();
        assert_eq!(done.replay.sessions[0].rows["forward_pass_timing.csv"], 70);
        assert_forward_exactly(&mnt, 100);
    });
    let _ = Command::new("umount").arg(&mnt).status();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// A full disk during recovery: the error names the directory, the buffers stay, and once room
/// is made the replay completes without a row written twice (the rows appended before the disk
/// filled are cut back by the journal).
#[test]
fn a_full_disk_keeps_the_buffers_for_a_later_try() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("full");
    std::fs::create_dir(&mnt).unwrap();
    if !mount(&["-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt.to_str().unwrap()]) {
        return;
    }
    let result = std::panic::catch_unwind(|| {
        killed_run(&mnt, 100, 3000);
        assert_eq!(buffer_files(&mnt).len(), 1);
        // Fill the file system, leaving less room than the replayed rows take.
        let filler = mnt.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        drop(f);
        let err = profilemate_sinks::recover_buffers(&mnt).unwrap_err().to_string();
        assert!(err.contains(&mnt.display().to_string()), "{err}");
        assert_eq!(buffer_files(&mnt).len(), 1, "the buffers are kept");
        std::fs::remove_file(&filler).unwrap();
        let done = profilemate_sinks::recover_buffers(&mnt).unwrap();
        assert_eq!(done.replay.sessions.len(), 1, "{err}; {done:?}");
        assert_forward_exactly(&mnt, 3100);
    });
    let _ = Command::new("umount").arg(&mnt).status();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// A new session started where a killed run left its buffers moves that run's files aside (its
/// sinks would truncate them) and replays the buffers there.
#[test]
fn a_new_session_sets_a_killed_run_aside_and_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    killed_run(dir.path(), 10, 20);
    let session = profilemate::builder().dir(dir.path()).sinks(&[SinkKind::Csv, SinkKind::Json]).build().unwrap();
    session.forward_pass().record(Phase::Prefill, 1, 8, Duration::from_micros(10));
    session.shutdown().unwrap();
    assert_eq!(rows(dir.path(), "forward_pass_timing.csv").len(), 1, "the new run's own rows");
    let aside: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("killed-run-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_forward_exactly(&aside[0], 30);
    assert!(buffer_files(&aside[0]).is_empty(), "replayed");
    assert!(buffer_files(dir.path()).is_empty());
}

/// A process killed while it was making its buffer file (before the header was complete) left a
/// file that never held a record: recovery removes it instead of failing on it.
#[test]
fn a_buffer_file_killed_while_being_made_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".profilemate_buffers.1.0"), b"").unwrap();
    std::fs::write(dir.path().join(".profilemate_buffers.1.1"), vec![0u8; 200_000]).unwrap();
    let done = profilemate_sinks::recover_buffers(dir.path()).unwrap();
    assert_eq!((done.replay.sessions.len(), done.replay.live.len()), (0, 0));
    assert!(buffer_files(dir.path()).is_empty());
    // A file of another kind under the same name is an error naming it, left in place.
    std::fs::write(dir.path().join(".profilemate_buffers.1.2"), vec![7u8; 200_000]).unwrap();
    let err = profilemate_sinks::recover_buffers(dir.path()).unwrap_err().to_string();
    assert!(err.contains(".profilemate_buffers.1.2"), "{err}");
    assert_eq!(buffer_files(dir.path()).len(), 1);
}
