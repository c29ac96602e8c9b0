//! `TableFollower`: the tables of an output directory read back while a session writes them.

use profilemate_core::{BatchSample, CpuOp, LifecycleEvent, Phase, Rows, Session, Table};
use profilemate_sinks::TableFollower;
use std::io::Write;

fn append(path: &std::path::Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open for appending");
    f.write_all(bytes).expect("append");
}

#[test]
fn unfinished_lines_wait_for_the_next_poll_and_bad_lines_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(Table::PreemptionEvents.file_name());
    let mut follower = TableFollower::new(dir.path());
    assert!(follower.poll().is_empty(), "no file yet");

    append(&path, b"timestamp_sec,request_id,event,reason,running_time_sec,extra_info\n0.5,req-1,sta");
    assert!(follower.poll().is_empty(), "a line without its end");
    append(&path, b"rted,,,\n1.25,\"req,2\",preempted,RECOMPUTE,0.75,\"note=\"\"a");
    let rows = follower.poll();
    assert_eq!(rows.preemption_events.len(), 1);
    assert_eq!(rows.preemption_events[0].request_id, "req-1");
    assert_eq!(rows.preemption_events[0].event, LifecycleEvent::Started);
    assert_eq!(rows.preemption_events[0].timestamp_ns, 500_000_000);

    // A quoted field holding a line end is still open: the record is not complete yet.
    append(&path, b"\nb\"\"\"\n");
    append(&path, b"2.0,req-3,exploded,,,\n");
    let rows = follower.poll();
    assert_eq!(rows.preemption_events.len(), 1, "{rows:?}");
    let r = &rows.preemption_events[0];
    assert_eq!((r.request_id.as_str(), r.event, r.reason.as_str()), ("req,2", LifecycleEvent::Preempted, "RECOMPUTE"));
    assert_eq!(r.running_time_ns, Some(750_000_000));
    assert_eq!(r.extra_info, "note=\"a\nb\"");
    assert_eq!(follower.skipped_lines(), 1, "`exploded` is no lifecycle event");
    assert!(follower.poll().is_empty());

    // A new, shorter file in its place is read from its start.
    std::fs::write(&path, b"timestamp_sec,request_id,event,reason,running_time_sec,extra_info\n3,r,finished,,,\n")
        .unwrap();
    let rows = follower.poll();
    assert_eq!(rows.preemption_events.len(), 1);
    assert_eq!(rows.preemption_events[0].event, LifecycleEvent::Finished);
}

fn total(all: &[Rows], t: Table) -> usize {
    all.iter().map(|r| r.len(t)).sum()
}

fn csv_rows(dir: &std::path::Path, t: Table) -> usize {
    let mut reader = csv::Reader::from_path(dir.join(t.file_name())).expect("a table written");
    reader.records().count()
}

#[test]
fn rows_polled_while_two_sessions_write_equal_their_files() {
    let engine_dir = tempfile::tempdir().unwrap();
    let worker_dir = tempfile::tempdir().unwrap();
    let build = |dir: &std::path::Path| {
        Session::builder()
            .dir(dir)
            .flush_interval(std::time::Duration::from_millis(5))
            .sink_factory(profilemate_sinks::standard_sinks)
            .build()
            .unwrap()
    };
    let (engine, worker) = (build(engine_dir.path()), build(worker_dir.path()));
    let mut followers = [TableFollower::new(engine_dir.path()), TableFollower::new(worker_dir.path())];
    let mut polled = Vec::new();
    let (cpu, batches, requests, forward) =
        (engine.cpu_timing(), engine.batch_utilization(), engine.requests(), worker.forward_pass());
    for i in 0..3000u32 {
        let s = cpu.start_with(CpuOp::SCHEDULING, "phase=decode;note=\"quoted, with a comma\"");
        batches.record(&BatchSample {
            num_seqs: 4,
            max_num_seqs: 16,
            num_tokens: 4,
            max_tokens: 64,
            phase: Phase::Decode,
            running_queue_len: 4,
            waiting_queue_len: 0,
        });
        s.stop();
        forward.start(if i % 7 == 0 { Phase::Mixed } else { Phase::Decode }, 4, 4).stop();
        if i % 100 == 0 {
            requests.started(&format!("req-{i}"));
            requests.preempted(&format!("req-{i}"), "RECOMPUTE", "num_blocks=3;note=line\nend");
        }
        if i % 250 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            polled.extend(followers.iter_mut().map(TableFollower::poll));
        }
    }
    engine.shutdown().unwrap();
    worker.shutdown().unwrap();
    polled.extend(followers.iter_mut().map(TableFollower::poll));
    assert!(polled.iter().filter(|r| !r.is_empty()).count() >= 2, "rows arrived over several polls");
    for t in [Table::CpuOperations, Table::BatchUtilization, Table::PreemptionEvents] {
        assert_eq!(total(&polled, t), csv_rows(engine_dir.path(), t), "{t:?}");
    }
    assert_eq!(total(&polled, Table::ForwardPass), csv_rows(worker_dir.path(), Table::ForwardPass));
    assert_eq!(total(&polled, Table::ForwardPass), 3000);
    assert_eq!(followers.iter().map(TableFollower::skipped_lines).sum::<u64>(), 0);
}

/// The process-independent half of serving a multi-process engine's series from one endpoint:
/// the parts' rows, followed, through one metrics sink.
#[cfg(feature = "metrics")]
#[test]
fn followed_rows_through_the_metrics_sink_count_what_the_files_hold() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use profilemate_core::Sink;

    let dir = tempfile::tempdir().unwrap();
    let session = Session::builder().dir(dir.path()).sink_factory(profilemate_sinks::standard_sinks).build().unwrap();
    let forward = session.forward_pass();
    for i in 0..500u32 {
        forward.start(if i % 5 == 0 { Phase::Prefill } else { Phase::Decode }, 2, 2 + i).stop();
    }
    session.shutdown().unwrap();

    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        let mut sink = profilemate_sinks::MetricsSink::new();
        sink.write_rows(&TableFollower::new(dir.path()).poll()).unwrap();
    });
    let mut steps = 0;
    let mut tokens = 0;
    for (key, _, _, value) in recorder.snapshotter().snapshot().into_vec() {
        match (key.key().name(), value) {
            ("profilemate_steps_total", DebugValue::Counter(n)) => steps += n,
            ("profilemate_tokens_total", DebugValue::Counter(n)) => tokens += n,
            _ => {}
        }
    }
    assert_eq!(steps, 500);
    assert_eq!(tokens, (0..500u64).map(|i| 2 + i).sum::<u64>());
}
