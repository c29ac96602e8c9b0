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
