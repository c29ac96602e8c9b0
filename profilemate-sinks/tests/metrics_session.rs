//! `PROFILEMATE_SINKS=csv,metrics` through a real session: the collector thread records into the
//! recorder the application installed globally, and the series agree with the CSV files.
#![cfg(feature = "metrics")]

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use profilemate_core::{BatchSample, Config, CpuOp, Phase, Session};

#[test]
fn a_session_with_the_metrics_sink_feeds_the_global_recorder() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("the only recorder of this test binary");

    let dir = tempfile::tempdir().unwrap();
    let env =
        [("PROFILEMATE_DIR", dir.path().to_str().unwrap().to_string()), ("PROFILEMATE_SINKS", "csv,metrics".into())];
    let config = Config::from_lookup(|name| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())).unwrap();
    let session = Session::builder().config(config).sink_factory(profilemate_sinks::standard_sinks).build().unwrap();
    let (forward, cpu, batches, requests) =
        (session.forward_pass(), session.cpu_timing(), session.batch_utilization(), session.requests());
    let phases = [Phase::Prefill, Phase::Decode, Phase::Decode, Phase::Mixed, Phase::Decode];
    for (i, &phase) in phases.iter().cycle().take(50).enumerate() {
        let s = cpu.start(CpuOp::SCHEDULING);
        batches.record(&BatchSample {
            num_seqs: 4,
            max_num_seqs: 16,
            num_tokens: 64,
            max_tokens: 256,
            phase,
            running_queue_len: 4,
            waiting_queue_len: i as u32 % 3,
        });
        s.stop();
        forward.start(phase, 4, 64).stop();
        cpu.time(CpuOp::SAMPLING, || std::hint::black_box(i));
        if i % 10 == 0 {
            requests.started(&format!("req-{i}"));
            requests.preempted(&format!("req-{i}"), "RECOMPUTE", "");
        }
    }
    let manifest = session.shutdown().unwrap();
    assert_eq!(manifest.sinks, ["csv", "metrics"]);

    let mut steps = std::collections::BTreeMap::new();
    let (mut forward_observations, mut step_observations, mut preemptions) = (0, 0, 0);
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let label = key.key().labels().next().map(|l| l.value().to_string()).unwrap_or_default();
        match (key.key().name(), value) {
            ("profilemate_steps_total", DebugValue::Counter(n)) => {
                steps.insert(label, n);
            }
            ("profilemate_forward_pass_duration_seconds", DebugValue::Histogram(v)) => forward_observations += v.len(),
            ("profilemate_step_duration_seconds", DebugValue::Histogram(v)) => step_observations += v.len(),
            ("profilemate_preemptions_total", DebugValue::Counter(n)) => preemptions += n,
            _ => {}
        }
    }
    let csv = std::fs::read_to_string(dir.path().join("forward_pass_timing.csv")).unwrap();
    let per_phase = |p: &str| csv.lines().skip(1).filter(|l| l.split(',').nth(1) == Some(p)).count() as u64;
    assert_eq!(steps["prefill"], per_phase("prefill"));
    assert_eq!(steps["decode"], per_phase("decode"));
    assert_eq!(steps["mixed"], per_phase("mixed"));
    assert_eq!(steps.values().sum::<u64>(), 50);
    assert_eq!(forward_observations, 50);
    assert_eq!(step_observations, 50, "one step per scheduling, the last closed at shutdown");
    assert_eq!(preemptions, 5);
}
