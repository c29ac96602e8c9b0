//! Slow steps, explained: which conditions the tail of each phase shares that its other steps
//! lack.
//!
//! A step's time here is its host gap plus its wall time (`host_gap_before_ms + step_wall_ms`,
//! what one turn of the engine loop took), so a stall before a step counts against it. The tail
//! of a phase is every step above the phase's p99 or over twice its median. For each condition
//! the section gives:
//!
//! - how many tail steps have it against the rest, and the **lift**: the share of tail steps with
//!   it over the share of the other steps with it (infinite when no other step has it);
//! - its **share of the tail's excess**: the summed excess (step time minus the phase median) of
//!   the tail steps that have it, over the summed excess of the whole tail. A step may have
//!   several conditions, so shares can add to more than 100 %;
//! - the **attributable excess** used to rank causes: share × (1 − 1/lift), the part of that
//!   share beyond what the condition's base rate in ordinary steps explains (0 when lift ≤ 1).
//!
//! A large batch and a MoE imbalance are above the phase's p90 (tokens, max over mean). The
//! scheduling time and the host gap take their p99 from the phase's *other* steps, so that a cause frequent enough to fill the
//! top percent itself (a stall every fifty steps) is still measured against normal steps. A time
//! (host gap, scheduling) counts only where it also makes up at least half of the step's excess
//! over the median (its own excess over its median), so that a gap a few microseconds above its
//! p99 is not blamed for a step that is milliseconds slow.

use crate::timeline::StepRow;
use profilemate_core::{GraphEvent, Phase};
use serde::Serialize;
use std::fmt;

/// A condition a step may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// The host gap before the step is above the other steps' p99 and makes up at least half of
    /// the step's excess.
    HostGap,
    /// Scheduling took longer than the other steps' p99, and makes up at least half of the
    /// step's excess.
    SlowScheduling,
    /// A request was preempted or resumed in the step.
    Preemption,
    /// The step ran an encoder.
    EncoderCall,
    /// The step ran eagerly instead of replaying a CUDA graph.
    Eager,
    /// The step holds prompt tokens (more tokens than sequences: a prefill or a prefill chunk).
    PromptTokens,
    /// The step's tokens are above the phase's p90.
    LargeBatch,
    /// The KV cache was at least 90 % full.
    KvCacheNearFull,
    /// The step's MoE imbalance (max over mean) is above the phase's p90.
    MoeImbalance,
}

impl Condition {
    /// Every condition.
    pub const ALL: [Condition; 9] = [
        Condition::HostGap,
        Condition::SlowScheduling,
        Condition::Preemption,
        Condition::EncoderCall,
        Condition::Eager,
        Condition::PromptTokens,
        Condition::LargeBatch,
        Condition::KvCacheNearFull,
        Condition::MoeImbalance,
    ];

    /// Words for people.
    pub const fn describe(self) -> &'static str {
        match self {
            Condition::HostGap => "host gap above its p99",
            Condition::SlowScheduling => "scheduling above its p99",
            Condition::Preemption => "preemption or resume",
            Condition::EncoderCall => "encoder call",
            Condition::Eager => "eager instead of graph replay",
            Condition::PromptTokens => "prompt tokens (prefill chunk)",
            Condition::LargeBatch => "large batch (tokens above p90)",
            Condition::KvCacheNearFull => "KV cache >= 90% full",
            Condition::MoeImbalance => "MoE imbalance above p90",
        }
    }

    /// A short name (figures, JSON).
    pub const fn name(self) -> &'static str {
        match self {
            Condition::HostGap => "host_gap",
            Condition::SlowScheduling => "slow_scheduling",
            Condition::Preemption => "preemption",
            Condition::EncoderCall => "encoder_call",
            Condition::Eager => "eager",
            Condition::PromptTokens => "prompt_tokens",
            Condition::LargeBatch => "large_batch",
            Condition::KvCacheNearFull => "kv_cache_near_full",
            Condition::MoeImbalance => "moe_imbalance",
        }
    }
}

/// What to look at when `c` leads a tail.
pub fn advice(c: Condition) -> &'static str {
    match c {
        Condition::HostGap => {
            "The engine loop stalls between steps: look for garbage collection, blocking I/O, a slow \
             tokenizer or detokenizer, or another process taking the CPU before these steps."
        }
        Condition::SlowScheduling => {
            "Scheduling itself is slow in these steps: long waiting queues, prefix-cache lookups or \
             block allocation; profile the scheduler."
        }
        Condition::Preemption => {
            "Preemptions and resumes cost recomputation: enlarge the KV cache or lower max_num_seqs."
        }
        Condition::EncoderCall => {
            "Encoder calls inflate these steps: cache encoder outputs, or schedule encoder work \
             apart from decode (an encoder budget per step)."
        }
        Condition::Eager => "These steps ran without a CUDA graph: capture larger graph sizes.",
        Condition::PromptTokens => {
            "Prefill chunks make these steps slow: lower max_num_batched_tokens (smaller chunks) to even \
             out step times."
        }
        Condition::LargeBatch => "The largest batches are the slowest: a lower token budget evens out step time.",
        Condition::KvCacheNearFull => "The KV cache is near full in these steps: enlarge it or admit fewer sequences.",
        Condition::MoeImbalance => {
            "Some experts get most tokens in these steps: consider expert parallel load balancing."
        }
    }
}

/// One condition's figures in one phase's tail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cause {
    /// The condition.
    pub condition: Condition,
    /// Tail steps with it.
    pub tail_with: u64,
    /// Other steps with it.
    pub rest_with: u64,
    /// Share of tail steps with it over share of other steps with it; `None` when no other
    /// step has it (only the tail does).
    pub lift: Option<f64>,
    /// Summed excess of the tail steps with it, over the tail's summed excess, percent.
    pub excess_share_pct: f64,
    /// `excess_share_pct × (1 − 1/lift)`: what ranks the causes.
    pub attributable_pct: f64,
}

/// One phase's tail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseTail {
    /// The phase.
    pub phase: &'static str,
    /// Steps in the phase.
    pub steps: u64,
    /// Median step time, ms.
    pub median_ms: f64,
    /// p99 step time, ms.
    pub p99_ms: f64,
    /// Steps in the tail (above p99 or over twice the median).
    pub tail_steps: u64,
    /// Their summed excess over the median, ms.
    pub tail_excess_ms: f64,
    /// Conditions present in the tail, the largest attributable excess first.
    pub causes: Vec<Cause>,
    /// Tail step ids with each one's leading condition (for the figure), slowest first.
    pub tail: Vec<(u64, Option<Condition>)>,
}

/// The slow-step section: one entry per phase that has steps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlowSteps {
    /// Per phase.
    pub phases: Vec<PhaseTail>,
}

/// One step's time: host gap plus wall time.
pub fn step_time_ms(r: &StepRow) -> f64 {
    r.host_gap_before_ms.unwrap_or(0.0) + r.step_wall_ms
}

/// The `p`-th percentile (0..=100) of `sorted`, by the nearest-rank rule; 0 for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// The conditions of one step, given the thresholds of its phase's ordinary steps.
struct Thresholds {
    median_time: f64,
    gap_p99: f64,
    gap_median: f64,
    scheduling_p99: f64,
    scheduling_median: f64,
    tokens_p90: f64,
    moe_p90: f64,
}

fn has(c: Condition, r: &StepRow, t: &Thresholds) -> bool {
    // A time component is a condition when it is above the ordinary steps' p99 and its own excess
    // is at least half the step's excess: a gap of a few microseconds above p99 does not make a
    // step several milliseconds slow.
    let explains =
        |v: f64, p99: f64, median: f64| v > p99 && (v - median) >= 0.5 * (step_time_ms(r) - t.median_time).max(0.0);
    match c {
        Condition::HostGap => r.host_gap_before_ms.is_some_and(|g| explains(g, t.gap_p99, t.gap_median)),
        Condition::SlowScheduling => {
            r.scheduling_ms.is_some_and(|s| explains(s, t.scheduling_p99, t.scheduling_median))
        }
        Condition::Preemption => r.preemptions.unwrap_or(0) + r.resumes.unwrap_or(0) > 0,
        Condition::EncoderCall => r.encoder_time_ms.is_some_and(|e| e > 0.0),
        Condition::Eager => r.cuda_graph == Some(GraphEvent::Eager),
        Condition::PromptTokens => matches!((r.num_tokens, r.batch_size), (Some(t), Some(b)) if t > b),
        Condition::LargeBatch => r.num_tokens.is_some_and(|n| n as f64 > t.tokens_p90),
        Condition::KvCacheNearFull => r.kv_cache_usage_pct.is_some_and(|u| u >= 90.0),
        Condition::MoeImbalance => r.moe_max_over_mean.is_some_and(|m| m > t.moe_p90),
    }
}

impl PhaseTail {
    /// The tail of `rows` (one phase's steps).
    pub fn of(phase: &'static str, rows: &[&StepRow]) -> PhaseTail {
        let times = sorted(rows.iter().map(|r| step_time_ms(r)).collect());
        let median = percentile(&times, 50.0);
        let p99 = percentile(&times, 99.0);
        let in_tail = |r: &StepRow| {
            let t = step_time_ms(r);
            t > p99 || t > 2.0 * median
        };
        let (tail, rest): (Vec<&StepRow>, Vec<&StepRow>) = rows.iter().partition(|r| in_tail(r));
        let of_rest = |f: &dyn Fn(&StepRow) -> Option<f64>| sorted(rest.iter().filter_map(|r| f(r)).collect());
        let of_phase = |f: &dyn Fn(&StepRow) -> Option<f64>| sorted(rows.iter().filter_map(|r| f(r)).collect());
        let (gaps, scheduling) = (of_rest(&|r| r.host_gap_before_ms), of_rest(&|r| r.scheduling_ms));
        let th = Thresholds {
            median_time: median,
            gap_p99: percentile(&gaps, 99.0),
            gap_median: percentile(&gaps, 50.0),
            scheduling_p99: percentile(&scheduling, 99.0),
            scheduling_median: percentile(&scheduling, 50.0),
            tokens_p90: percentile(&of_phase(&|r| r.num_tokens.map(|n| n as f64)), 90.0),
            moe_p90: percentile(&of_phase(&|r| r.moe_max_over_mean), 90.0),
        };
        let excess = |r: &StepRow| (step_time_ms(r) - median).max(0.0);
        let tail_excess: f64 = tail.iter().map(|r| excess(r)).sum::<f64>() + 0.0;
        let mut causes: Vec<Cause> = Condition::ALL
            .iter()
            .filter_map(|&c| {
                let tail_with: Vec<&&StepRow> = tail.iter().filter(|r| has(c, r, &th)).collect();
                if tail_with.is_empty() {
                    return None;
                }
                let rest_with = rest.iter().filter(|r| has(c, r, &th)).count() as u64;
                let tail_rate = tail_with.len() as f64 / tail.len() as f64;
                let lift = (rest_with > 0).then(|| tail_rate / (rest_with as f64 / rest.len() as f64));
                let share = if tail_excess > 0.0 {
                    tail_with.iter().map(|r| excess(r)).sum::<f64>() / tail_excess * 100.0
                } else {
                    0.0
                };
                let attributable = match lift {
                    None => share,
                    Some(l) if l > 1.0 => share * (1.0 - 1.0 / l),
                    Some(_) => 0.0,
                };
                Some(Cause {
                    condition: c,
                    tail_with: tail_with.len() as u64,
                    rest_with,
                    lift,
                    excess_share_pct: share,
                    attributable_pct: attributable,
                })
            })
            .collect();
        causes.sort_by(|a, b| b.attributable_pct.total_cmp(&a.attributable_pct));
        let mut tail_ids: Vec<(f64, u64, Option<Condition>)> = tail
            .iter()
            .map(|r| {
                // The step's leading condition: the highest-ranked cause it has.
                let lead = causes.iter().find(|c| c.attributable_pct > 0.0 && has(c.condition, r, &th));
                (step_time_ms(r), r.step, lead.map(|c| c.condition))
            })
            .collect();
        tail_ids.sort_by(|a, b| b.0.total_cmp(&a.0));
        PhaseTail {
            phase,
            steps: rows.len() as u64,
            median_ms: median,
            p99_ms: p99,
            tail_steps: tail.len() as u64,
            tail_excess_ms: tail_excess,
            causes,
            tail: tail_ids.into_iter().map(|(_, id, c)| (id, c)).collect(),
        }
    }

    /// The leading cause, if any condition explains part of the tail.
    pub fn top(&self) -> Option<&Cause> {
        self.causes.first().filter(|c| c.attributable_pct > 0.0)
    }
}

impl SlowSteps {
    /// The tails of every phase of a step timeline.
    pub fn of(rows: &[StepRow]) -> SlowSteps {
        let phases = Phase::ALL
            .iter()
            .filter_map(|&p| {
                let of_phase: Vec<&StepRow> = rows.iter().filter(|r| r.phase == Some(p)).collect();
                (!of_phase.is_empty()).then(|| PhaseTail::of(p.as_str(), &of_phase))
            })
            .collect();
        SlowSteps { phases }
    }
}

impl fmt::Display for PhaseTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "   {}: {} steps, median {:.3} ms, p99 {:.3} ms; tail {} steps, {:.1} ms over the median",
            self.phase, self.steps, self.median_ms, self.p99_ms, self.tail_steps, self.tail_excess_ms
        )?;
        if self.tail_steps == 0 {
            return writeln!(f, "     (no step above p99 or twice the median)");
        }
        if self.causes.is_empty() {
            return writeln!(f, "     no recorded condition is present in the tail");
        }
        writeln!(
            f,
            "     {:<32} {:>11} {:>11} {:>7} {:>13} {:>13}",
            "condition", "tail with", "rest with", "lift", "excess share", "attributable"
        )?;
        for c in &self.causes {
            let lift = c.lift.map_or("only tail".to_string(), |l| format!("{l:.1}x"));
            writeln!(
                f,
                "     {:<32} {:>5} / {:<3} {:>5} / {:<3} {:>7} {:>12.1}% {:>12.1}%",
                c.condition.describe(),
                c.tail_with,
                self.tail_steps,
                c.rest_with,
                self.steps - self.tail_steps,
                lift,
                c.excess_share_pct,
                c.attributable_pct
            )?;
        }
        let ids: Vec<String> = self.tail.iter().take(8).map(|(id, _)| id.to_string()).collect();
        writeln!(f, "     slowest steps: {}", ids.join(", "))
    }
}

impl fmt::Display for SlowSteps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.phases {
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: u64, wall: f64, gap: f64, preemptions: u64) -> StepRow {
        StepRow {
            step: id,
            phase: Some(Phase::Decode),
            batch_size: Some(8),
            num_tokens: Some(8),
            step_wall_ms: wall,
            host_gap_before_ms: Some(gap),
            scheduling_ms: Some(0.1),
            preemptions: Some(preemptions),
            resumes: Some(0),
            ..StepRow::default()
        }
    }

    #[test]
    fn injected_causes_lead_the_tail_with_their_counts() {
        // 200 steps of about 1 ms; every 40th has a 10 ms gap before it, every 50th (not the
        // same) a preemption that makes it 4 ms.
        let rows: Vec<StepRow> = (1..=200u64)
            .map(|i| {
                let jitter = (i % 5) as f64 * 0.01;
                match (i % 40 == 0, i % 50 == 25) {
                    (true, _) => step(i, 1.0 + jitter, 10.0, 0),
                    (_, true) => step(i, 4.0 + jitter, 0.01, 1),
                    _ => step(i, 1.0 + jitter, 0.01, 0),
                }
            })
            .collect();
        let slow = SlowSteps::of(&rows);
        let decode = &slow.phases[0];
        assert_eq!(decode.tail_steps, 9, "5 stalled and 4 preempted steps");
        let top = decode.top().expect("a cause");
        assert_eq!((top.condition, top.tail_with, top.rest_with, top.lift), (Condition::HostGap, 5, 0, None));
        let preemption = decode.causes.iter().find(|c| c.condition == Condition::Preemption).unwrap();
        assert_eq!((preemption.tail_with, preemption.rest_with), (4, 0));
        // The stalls hold 5 x 9.x ms of the excess, the preemptions 4 x 3 ms.
        assert!(top.excess_share_pct > 70.0 && preemption.excess_share_pct > 15.0, "{decode:?}");
        let (id, lead) = decode.tail[0];
        assert_eq!((id % 40, lead), (0, Some(Condition::HostGap)));
    }

    #[test]
    fn percentile_is_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((percentile(&v, 50.0), percentile(&v, 99.0), percentile(&v, 100.0)), (50.0, 99.0, 100.0));
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
