//! Records stamped with a clock reading the caller took (`record_ended_at`, `record_at`,
//! `open_at`, `close_at`): rows carry exactly that reading, converted like the session's own.

use profilemate_core::{BatchSample, Component, CpuOp, HostClock, KvCacheSample, MemorySink, Phase, Session};
use std::time::Duration;

fn spin(d: Duration) {
    let t = std::time::Instant::now();
    while t.elapsed() < d {}
}

#[test]
fn rows_stamped_with_one_reading_share_it() {
    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().unwrap();
    let clock = HostClock::new();
    let steps = session.steps();
    let opened = clock.raw();
    assert!(steps.open_at(4, opened));
    assert!(!steps.open_at(0, opened), "step id 0 is refused");
    spin(Duration::from_micros(300));
    let end = clock.raw();
    let took = Duration::from_nanos(clock.delta_ns(opened, end));
    session.forward_pass().record_ended_at(Phase::Decode, 3, 3, took, end);
    session.cpu_timing().record_ended_at(CpuOp::SCHEDULING, took, end, "phase=decode");
    session.components().record_ended_at(Component::Decoder, "language_model", took, end);
    let batch = BatchSample {
        num_seqs: 3,
        max_num_seqs: 8,
        num_tokens: 3,
        max_tokens: 64,
        phase: Phase::Decode,
        running_queue_len: 3,
        waiting_queue_len: 1,
    };
    session.batch_utilization().record_at(&batch, end);
    let kv = KvCacheSample { used_blocks: 2, total_blocks: 10, prefix_cache_queries: 0, prefix_cache_hits: 0 };
    session.kv_cache().record_at(&kv, end);
    spin(Duration::from_micros(200));
    let closed = clock.raw();
    steps.close_at(closed);
    assert_eq!(steps.current(), None);
    session.shutdown().unwrap();

    let rows = memory.rows();
    let (f, c, d) = (&rows.forward_pass[0], &rows.cpu_operations[0], &rows.encoder_decoder[0]);
    // Each duration row starts where the reading says it ended, less its duration.
    assert_eq!(f.timestamp_ns, c.timestamp_ns);
    assert_eq!(f.timestamp_ns, d.timestamp_ns);
    let (b, k) = (&rows.batch_utilization[0], &rows.kv_cache[0]);
    assert_eq!(b.timestamp_ns, k.timestamp_ns);
    let end_ns = f.timestamp_ns + f.forward_time_ns;
    assert!(b.timestamp_ns.abs_diff(end_ns) <= 1, "batch at {} vs the pass's end {end_ns}", b.timestamp_ns);
    // The step: opened at the first reading (where the pass began), closed at the last.
    let step = &rows.step_timeline[0];
    assert_eq!(step.step, 4);
    assert!(
        step.start_ns.abs_diff(f.timestamp_ns) <= 1,
        "step start {} vs pass start {}",
        step.start_ns,
        f.timestamp_ns
    );
    let wall = clock.delta_ns(opened, closed);
    assert!(step.wall_ns.abs_diff(wall) <= 1, "wall {} vs readings {wall}", step.wall_ns);
    assert!(step.wall_ns >= 500_000, "{}", step.wall_ns);
    assert!(f.forward_time_ns >= 300_000 && step.wall_ns >= f.forward_time_ns + 200_000);
}

fn batch_sample() -> BatchSample {
    BatchSample {
        num_seqs: 3,
        max_num_seqs: 8,
        num_tokens: 5,
        max_tokens: 64,
        phase: Phase::Mixed,
        running_queue_len: 3,
        waiting_queue_len: 2,
    }
}

fn kv_sample() -> KvCacheSample {
    KvCacheSample { used_blocks: 4, total_blocks: 10, prefix_cache_queries: 7, prefix_cache_hits: 3 }
}

/// Records one step of each handle, through the methods that read the clock (`at: None`) or
/// through those given a reading (`at: Some(reading function)`).
fn one_step(session: &Session, clock: &HostClock, given: bool) {
    let steps = session.steps();
    let d = Duration::from_micros(40);
    if given {
        assert!(steps.open_at(9, clock.raw()));
        let now = clock.raw();
        session.forward_pass().record_ended_at(Phase::Prefill, 2, 70, d, now);
        session.cpu_timing().record_ended_at(CpuOp::SAMPLING, d, now, "phase=prefill");
        session.components().record_ended_at(Component::Encoder, "vision", d, now);
        session.batch_utilization().record_at(&batch_sample(), now);
        session.kv_cache().record_at(&kv_sample(), now);
        steps.close_at(clock.raw());
    } else {
        assert!(steps.open(9));
        session.forward_pass().record(Phase::Prefill, 2, 70, d);
        session.cpu_timing().record(CpuOp::SAMPLING, d, "phase=prefill");
        session.components().record(Component::Encoder, "vision", d);
        session.batch_utilization().record(&batch_sample());
        session.kv_cache().record(&kv_sample());
        steps.close();
    }
    // A bad id: refused and counted the same way by both.
    assert!(!(if given { steps.open_at(0, clock.raw()) } else { steps.open(0) }));
    assert!(!(if given { steps.open_at(profilemate_core::MAX_STEP + 1, clock.raw()) } else { steps.open(u64::MAX) }));
    assert_eq!(steps.current(), None);
    // Without a step open, the forward pass opens the next one in both.
    if given {
        session.forward_pass().record_ended_at(Phase::Decode, 1, 1, d, clock.raw());
    } else {
        session.forward_pass().record(Phase::Decode, 1, 1, d);
    }
    assert_eq!(steps.current(), Some(10));
}

#[test]
fn given_readings_record_what_the_clock_reading_methods_record() {
    let clock = HostClock::new();
    let run = |given: bool| {
        let memory = MemorySink::new();
        let session = Session::builder().in_memory_only().sink(memory.clone()).build().unwrap();
        one_step(&session, &clock, given);
        let manifest = session.shutdown().unwrap();
        (memory.rows(), manifest.dropped, manifest.steps)
    };
    let (mut a, drops_a, steps_a) = run(false);
    let (mut b, drops_b, steps_b) = run(true);
    assert_eq!(drops_a, drops_b);
    assert_eq!(drops_a.values().flat_map(|m| m.values()).sum::<u64>(), 2, "{drops_a:?}");
    assert_eq!(steps_a, steps_b);
    // Everything but the times is the same.
    for rows in [&mut a, &mut b] {
        rows.forward_pass.iter_mut().for_each(|r| r.timestamp_ns = 0);
        rows.cpu_operations.iter_mut().for_each(|r| r.timestamp_ns = 0);
        rows.encoder_decoder.iter_mut().for_each(|r| r.timestamp_ns = 0);
        rows.batch_utilization.iter_mut().for_each(|r| r.timestamp_ns = 0);
        rows.kv_cache.iter_mut().for_each(|r| r.timestamp_ns = 0);
    }
    assert_eq!(a.forward_pass, b.forward_pass);
    assert_eq!(a.cpu_operations, b.cpu_operations);
    assert_eq!(a.encoder_decoder, b.encoder_decoder);
    assert_eq!(a.batch_utilization, b.batch_utilization);
    assert_eq!(a.kv_cache, b.kv_cache);
    assert_eq!(a.forward_pass.len(), 2);
    assert_eq!(a.forward_pass[0].step, Some(9));
    assert_eq!(a.batch_utilization[0].step, Some(9));
    assert_eq!(
        a.step_timeline.iter().map(|r| r.step).collect::<Vec<_>>(),
        b.step_timeline.iter().map(|r| r.step).collect::<Vec<_>>()
    );
}

#[test]
fn disabled_handles_record_nothing_from_readings() {
    let clock = HostClock::new();
    let session = Session::disabled();
    one_step_disabled(&session, &clock);
    // A session with the profilers off: nothing recorded, nothing counted.
    let memory = MemorySink::new();
    let mut builder = Session::builder().in_memory_only().sink(memory.clone());
    for kind in [
        profilemate_core::ProfilerKind::ForwardPass,
        profilemate_core::ProfilerKind::CpuTiming,
        profilemate_core::ProfilerKind::EncoderDecoder,
        profilemate_core::ProfilerKind::BatchUtilization,
        profilemate_core::ProfilerKind::KvCache,
    ] {
        builder = builder.disable(kind);
    }
    let session = builder.build().unwrap();
    let now = clock.raw();
    let d = Duration::from_micros(5);
    session.forward_pass().record_ended_at(Phase::Decode, 1, 1, d, now);
    session.cpu_timing().record_ended_at(CpuOp::SCHEDULING, d, now, "");
    session.components().record_ended_at(Component::Decoder, "x", d, now);
    session.batch_utilization().record_at(&batch_sample(), now);
    session.kv_cache().record_at(&kv_sample(), now);
    let manifest = session.shutdown().unwrap();
    let rows = memory.rows();
    assert!(rows.forward_pass.is_empty() && rows.cpu_operations.is_empty() && rows.encoder_decoder.is_empty());
    assert!(rows.batch_utilization.is_empty() && rows.kv_cache.is_empty());
    assert_eq!(manifest.total_dropped(), 0);
}

fn one_step_disabled(session: &Session, clock: &HostClock) {
    let steps = session.steps();
    assert!(!steps.open_at(3, clock.raw()));
    assert_eq!(steps.current(), None);
    steps.close_at(clock.raw());
    let d = Duration::from_micros(5);
    session.forward_pass().record_ended_at(Phase::Decode, 1, 1, d, clock.raw());
    session.cpu_timing().record_ended_at(CpuOp::SCHEDULING, d, clock.raw(), "");
    session.components().record_ended_at(Component::Decoder, "x", d, clock.raw());
    session.batch_utilization().record_at(&batch_sample(), clock.raw());
    session.kv_cache().record_at(&kv_sample(), clock.raw());
}

#[test]
fn open_at_and_close_at_with_guards_and_forward_passes() {
    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().unwrap();
    let (steps, forward, clock) = (session.steps(), session.forward_pass(), HostClock::new());
    // A step opened at a reading holds: a forward pass inside opens none of its own.
    assert!(steps.open_at(20, clock.raw()));
    forward.start(Phase::Decode, 1, 1).stop();
    assert_eq!(steps.current(), Some(20));
    steps.close_at(clock.raw());
    // Guards continue above the highest id seen, and the forward pass opens the next one.
    let guard = steps.begin();
    assert_eq!(guard.id(), 21);
    guard.stop();
    forward.start(Phase::Decode, 1, 1).stop();
    assert_eq!(steps.current(), Some(22));
    // A step opened at a reading while a guard holds one: the newer step is open; the guard's
    // close leaves it open.
    let guard = steps.begin_with_id(30);
    assert!(steps.open_at(31, clock.raw()));
    drop(guard);
    assert_eq!(steps.current(), Some(31));
    steps.close_at(clock.raw());
    assert_eq!(steps.current(), None);
    session.shutdown().unwrap();
    let ids: Vec<u64> = memory.rows().step_timeline.iter().map(|r| r.step).collect();
    assert_eq!(ids, [20, 21, 22, 30, 31]);
}

#[test]
fn readings_from_the_past_or_far_future_neither_panic_nor_overflow() {
    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().unwrap();
    let (steps, clock) = (session.steps(), HostClock::new());
    let d = Duration::from_millis(3);
    let readings = [(0, 1), (1, 0), (u64::MAX, u64::MAX), (0, u64::MAX), (u64::MAX, 0), (u64::MAX / 2, 5), (0, 0)];
    for (id, (open, end)) in readings.into_iter().enumerate() {
        assert!(steps.open_at(id as u64 + 1, open));
        session.forward_pass().record_ended_at(Phase::Decode, 1, 1, d, end);
        session.cpu_timing().record_ended_at(CpuOp::SCHEDULING, d, end, "phase=decode");
        session.components().record_ended_at(Component::Decoder, "language_model", d, end);
        session.batch_utilization().record_at(&batch_sample(), end);
        session.kv_cache().record_at(&kv_sample(), end);
        steps.close_at(end);
    }
    // A normal step after them.
    let start = clock.raw();
    assert!(steps.open_at(100, start));
    spin(Duration::from_micros(100));
    session.forward_pass().record_ended_at(Phase::Decode, 1, 1, Duration::from_micros(50), clock.raw());
    let end = clock.raw();
    steps.close_at(end);
    let manifest = session.shutdown().unwrap();
    assert!(manifest.finished);
    let rows = memory.rows();
    assert_eq!((rows.forward_pass.len(), rows.batch_utilization.len(), rows.kv_cache.len()), (8, 7, 7));
    let ids: Vec<u64> = rows.step_timeline.iter().map(|r| r.step).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6, 7, 100]);
    // A reading from before the session started is its start (0); a duration reaching back
    // before it starts there too.
    assert!(rows
        .forward_pass
        .iter()
        .filter(|r| r.step.unwrap() <= 2 || r.step == Some(7))
        .all(|r| r.timestamp_ns == 0));
    // A step whose end reading precedes its start lasts 0 (step 6), unless its rows reach
    // further: step 2's rows end at the session's start, after 3 ms that begin there too.
    assert_eq!(rows.step_timeline[5].wall_ns, 0);
    assert_eq!(rows.step_timeline[1].wall_ns, d.as_nanos() as u64);
    // The normal step keeps its own readings.
    let last = rows.step_timeline.last().unwrap();
    assert!(last.wall_ns.abs_diff(clock.delta_ns(start, end)) <= 1, "{last:?}");
}

#[test]
fn durations_too_long_to_add_up_saturate_in_the_step_timeline() {
    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().unwrap();
    let (steps, clock) = (session.steps(), HostClock::new());
    for id in [1, 2] {
        assert!(steps.open_at(id, clock.raw()));
        let end = clock.raw();
        session.forward_pass().record_ended_at(Phase::Decode, 1, 1, Duration::MAX, end);
        session.forward_pass().record_ended_at(Phase::Decode, 1, 1, Duration::MAX, end);
        session.cpu_timing().record_ended_at(CpuOp::SCHEDULING, Duration::MAX, end, "phase=decode");
        session.components().record_ended_at(Component::Decoder, "language_model", Duration::MAX, end);
        session.components().record_ended_at(Component::Decoder, "language_model", Duration::MAX, end);
        steps.close_at(clock.raw());
    }
    session.shutdown().unwrap();
    let rows = memory.rows();
    assert_eq!(rows.step_timeline.len(), 2);
    let step = &rows.step_timeline[0];
    assert_eq!((step.forward_time_ns, step.decoder_time_ns), (Some(u64::MAX), Some(u64::MAX)));
    assert_eq!(step.unclaimed_ns, 0);
}
