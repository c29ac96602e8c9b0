use super::Profiler;
use crate::event::Event;
use crate::rows::{BatchUtilizationRow, Rows};
use crate::stats::Mean;
use crate::summary::{BatchUtilizationSummary, Summaries};
use crate::types::{Phase, ProfilerKind};

/// Batch utilization against the scheduler's limits.
#[derive(Debug, Clone)]
pub struct BatchUtilizationProfiler {
    threshold_pct: f64,
    samples: u64,
    seq_util: Mean,
    token_util: Mean,
    phase_util: [Mean; 3],
    underutilized: u64,
    last_limits: (u32, u32),
    running: Mean,
    waiting: Mean,
    max_waiting: u32,
    over_limit: u64,
    zero_limit: u64,
}

/// `num / max * 100`, clamped to 100; `None` when `max` is 0. The flag says it was clamped.
fn utilization(num: u32, max: u32) -> (Option<f64>, bool) {
    if max == 0 {
        return (None, false);
    }
    let pct = f64::from(num) / f64::from(max) * 100.0;
    if pct > 100.0 {
        (Some(100.0), true)
    } else {
        (Some(pct), false)
    }
}

impl BatchUtilizationProfiler {
    /// An empty profiler; token utilization below `threshold_pct` counts as underutilized.
    pub fn new(threshold_pct: f64) -> Self {
        BatchUtilizationProfiler {
            threshold_pct,
            samples: 0,
            seq_util: Mean::default(),
            token_util: Mean::default(),
            phase_util: [Mean::default(); 3],
            underutilized: 0,
            last_limits: (0, 0),
            running: Mean::default(),
            waiting: Mean::default(),
            max_waiting: 0,
            over_limit: 0,
            zero_limit: 0,
        }
    }
}

impl Profiler for BatchUtilizationProfiler {
    fn kind(&self) -> ProfilerKind {
        ProfilerKind::BatchUtilization
    }

    fn observe(&mut self, event: &Event<'_>, rows: &mut Rows) {
        let Event::Batch { timestamp_ns, sample: s } = *event else {
            return;
        };
        let (seq, seq_over) = utilization(s.num_seqs, s.max_num_seqs);
        let (tok, tok_over) = utilization(s.num_tokens, s.max_tokens);
        self.samples += 1;
        if seq_over || tok_over {
            self.over_limit += 1;
        }
        if s.max_num_seqs == 0 || s.max_tokens == 0 {
            self.zero_limit += 1;
        }
        if let Some(v) = seq {
            self.seq_util.add(v);
        }
        if let Some(v) = tok {
            self.token_util.add(v);
            self.phase_util[s.phase.index()].add(v);
            if v < self.threshold_pct {
                self.underutilized += 1;
            }
        }
        self.last_limits = (s.max_num_seqs, s.max_tokens);
        self.running.add(f64::from(s.running_queue_len));
        self.waiting.add(f64::from(s.waiting_queue_len));
        self.max_waiting = self.max_waiting.max(s.waiting_queue_len);
        rows.batch_utilization.push(BatchUtilizationRow {
            step: None,
            timestamp_ns,
            num_seqs: s.num_seqs,
            max_num_seqs: s.max_num_seqs,
            seq_utilization_pct: seq,
            num_tokens: s.num_tokens,
            max_tokens: s.max_tokens,
            token_utilization_pct: tok,
            phase: s.phase,
            running_queue_len: s.running_queue_len,
            waiting_queue_len: s.waiting_queue_len,
        });
    }

    fn summarize(&self, out: &mut Summaries) {
        out.batch_utilization = Some(BatchUtilizationSummary {
            total_samples: self.samples,
            mean_seq_utilization_pct: self.seq_util.value(),
            mean_token_utilization_pct: self.token_util.value(),
            underutilization_events: self.underutilized,
            underutilization_threshold_pct: self.threshold_pct,
            prefill_avg_utilization: self.phase_util[Phase::Prefill.index()].value(),
            decode_avg_utilization: self.phase_util[Phase::Decode.index()].value(),
            mixed_avg_utilization: self.phase_util[Phase::Mixed.index()].value(),
            max_num_seqs: self.last_limits.0,
            max_tokens: self.last_limits.1,
            mean_running_queue_len: self.running.value(),
            mean_waiting_queue_len: self.waiting.value(),
            max_waiting_queue_len: self.max_waiting,
            over_limit_samples: self.over_limit,
            zero_limit_samples: self.zero_limit,
        });
    }
}
