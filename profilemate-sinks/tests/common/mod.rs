//! Rows of every table with the awkward cases (text that needs quoting, empty fields, zero
//! durations, nested and overlapping spans), and a run manifest, for the sink tests.

#![allow(dead_code)]

use profilemate_core::*;
use std::sync::Arc;

const MS: u64 = 1_000_000;

/// A manifest as a session hands it to `finish`.
pub fn manifest() -> RunManifest {
    let memory = MemorySink::new();
    let session = Session::builder().in_memory_only().sink(memory.clone()).build().expect("session");
    session.shutdown().expect("shutdown");
    memory.manifest().expect("a manifest")
}

/// Batch `b` (0-based) of rows: every table, times growing with `b`.
pub fn rows(b: u64) -> Rows {
    let t0 = b * 100 * MS;
    let mut rows = Rows::default();
    for (i, (phase, batch, tokens, dur)) in
        [(Phase::Prefill, 1, 512, 12 * MS + 345), (Phase::Decode, 8, 8, 0), (Phase::Mixed, 4, 260, 7_777_777)]
            .into_iter()
            .enumerate()
    {
        rows.forward_pass.push(ForwardPassRow {
            step: Some(i as u64 + 1),
            timestamp_ns: t0 + 20 * MS * i as u64 + 499,
            phase,
            batch_size: batch,
            num_tokens: tokens,
            forward_time_ns: dur,
        });
    }
    let cpu = |at: u64, op: &str, dur: u64, context: &str| CpuOperationRow {
        step: None,
        timestamp_ns: t0 + at,
        operation: Arc::from(op),
        duration_ns: dur,
        context: context.to_string(),
    };
    rows.cpu_operations.extend([
        cpu(0, "scheduling", 2 * MS, ""),
        cpu(2 * MS, "model_execution", 30 * MS, "phase=prefill;batch_size=1"),
        cpu(3 * MS, "batch_preparation", MS, "text, with \"quotes\"\nand a newline;ünïcode"),
        // Overlaps model_execution without nesting in it: another thread's work.
        cpu(25 * MS, "detokenize", 10 * MS, "thread=2"),
        cpu(40 * MS, "sampling", 0, ""),
    ]);
    rows.batch_utilization.push(BatchUtilizationRow {
        step: None,
        timestamp_ns: t0 + 1,
        num_seqs: 3,
        max_num_seqs: 256,
        seq_utilization_pct: Some(3.0 / 256.0 * 100.0),
        num_tokens: 1,
        max_tokens: 3,
        token_utilization_pct: Some(100.0 / 3.0),
        phase: Phase::Mixed,
        running_queue_len: 3,
        waiting_queue_len: 7,
    });
    rows.batch_utilization.push(BatchUtilizationRow {
        step: None,
        timestamp_ns: t0 + 50 * MS,
        num_seqs: 0,
        max_num_seqs: 0,
        seq_utilization_pct: None,
        num_tokens: 0,
        max_tokens: 0,
        token_utilization_pct: None,
        phase: Phase::Decode,
        running_queue_len: 0,
        waiting_queue_len: 0,
    });
    let id = format!("req-{b},\"x\"");
    let event = |at: u64, event: LifecycleEvent, reason: &str, running: Option<u64>, extra: &str| PreemptionEventRow {
        step: None,
        timestamp_ns: t0 + at,
        request_id: id.clone(),
        event,
        reason: reason.to_string(),
        running_time_ns: running,
        extra_info: extra.to_string(),
    };
    rows.preemption_events.extend([
        event(MS, LifecycleEvent::Started, "", None, ""),
        event(
            10 * MS,
            LifecycleEvent::Preempted,
            "RECOMPUTE",
            Some(9 * MS + 500),
            "num_blocks=128;num_computed_tokens=812",
        ),
        event(20 * MS, LifecycleEvent::Resumed, "", None, ""),
        event(30 * MS, LifecycleEvent::Evicted, "kv_cache_full", None, ""),
        event(40 * MS, LifecycleEvent::Finished, "", None, "status=stop"),
    ]);
    rows.request_lifecycle.push(RequestLifecycleRow {
        request_id: id.clone(),
        started_ns: Some(t0 + MS),
        preempted_ns: Some(t0 + 10 * MS),
        resumed_ns: Some(t0 + 20 * MS),
        finished_ns: Some(t0 + 40 * MS),
        total_time_ns: Some(39 * MS),
        preemption_delay_ns: Some(10 * MS),
        num_preemptions: 1,
        outcome: Outcome::Finished,
    });
    rows.request_lifecycle.push(RequestLifecycleRow {
        request_id: format!("never-preempted-{b}"),
        started_ns: Some(t0),
        preempted_ns: None,
        resumed_ns: None,
        finished_ns: None,
        total_time_ns: None,
        preemption_delay_ns: None,
        num_preemptions: 0,
        outcome: Outcome::InFlight,
    });
    rows.encoder_decoder.extend([
        ComponentRow {
            step: None,
            timestamp_ns: t0 + 2 * MS,
            component: Component::Encoder,
            duration_ns: 3 * MS,
            context: "vision_encoder".into(),
        },
        ComponentRow {
            step: None,
            timestamp_ns: t0 + 5 * MS,
            component: Component::Decoder,
            duration_ns: 9 * MS,
            context: String::new(),
        },
        ComponentRow {
            step: None,
            timestamp_ns: t0 + 6 * MS,
            component: Component::CrossAttention,
            duration_ns: MS,
            context: "decoder_cross_attention".into(),
        },
    ]);
    rows.kv_cache.push(KvCacheRow {
        step: None,
        timestamp_ns: t0 + 1,
        used_blocks: 100,
        total_blocks: 300,
        prefix_cache_queries: u64::from(u32::MAX) + 5,
        prefix_cache_hits: 3,
    });
    rows.kv_cache.push(KvCacheRow {
        step: None,
        timestamp_ns: t0 + 2,
        used_blocks: 0,
        total_blocks: 0,
        prefix_cache_queries: 0,
        prefix_cache_hits: 0,
    });
    rows.cuda_graph.extend([
        CudaGraphRow {
            step: None,
            timestamp_ns: t0,
            event: GraphEvent::Capture,
            batch_size: 8,
            padded_batch_size: Some(8),
            duration_ns: Some(40 * MS),
        },
        CudaGraphRow {
            step: None,
            timestamp_ns: t0 + 41 * MS,
            event: GraphEvent::Replay,
            batch_size: 5,
            padded_batch_size: Some(8),
            duration_ns: None,
        },
        CudaGraphRow {
            step: None,
            timestamp_ns: t0 + 42 * MS,
            event: GraphEvent::Eager,
            batch_size: 300,
            padded_batch_size: None,
            duration_ns: None,
        },
    ]);
    for expert in 0..4 {
        rows.moe_routing.push(MoeRoutingRow {
            step: None,
            timestamp_ns: t0 + 5 * MS,
            layer: 1,
            expert_id: expert,
            num_tokens: 10 * expert + 1,
            window_first_step: 0,
            window_steps: 1,
        });
    }
    // A step with every figure, and one with only a wall time (empty fields).
    rows.step_timeline.push(StepTimelineRow {
        step: 7 + b,
        start_ns: t0 + 500,
        phase: Some(Phase::Decode),
        batch_size: Some(8),
        num_tokens: Some(8),
        forward_passes: 1,
        forward_time_ns: Some(2_000_123),
        scheduling_ns: Some(51_000),
        batch_preparation_ns: Some(12_345),
        sampling_ns: Some(40_001),
        other_cpu_ns: None,
        wall_ns: 2_400_000,
        host_gap_before_ns: Some(3_000),
        unclaimed_ns: 296_531,
        seq_utilization_pct: Some(25.0),
        token_utilization_pct: Some(100.0 / 3.0),
        running_queue_len: Some(8),
        waiting_queue_len: Some(0),
        kv_cache_usage_pct: Some(61.25),
        cuda_graph: Some(GraphEvent::Replay),
        padded_batch_size: Some(8),
        padding_pct: Some(0.0),
        preemptions: Some(0),
        resumes: Some(1),
        encoder_time_ns: Some(0),
        decoder_time_ns: Some(2_000_000),
        moe_max_over_mean: Some(2.5),
    });
    rows.step_timeline.push(StepTimelineRow { step: 100 + b, wall_ns: 5, ..Default::default() });
    rows
}
