//! The seed's "Optimization Insights", as explicit rules over the report's numbers.
//!
//! Each rule reads one figure, compares it with one threshold and, when the figure is beyond it,
//! yields an [`Insight`] that carries the figure, the threshold and the advice. A figure exactly
//! at its threshold does not fire. The thresholds are the seed's where it gives one (token
//! utilization 60 % / 95 %, preemption rate 10 %, resume delay 1 s) and this crate's otherwise;
//! all of them live in [`Thresholds`]. The seed names CUDA graph, KV cache and MoE expert
//! tracking but gives no insight for them; their rules and thresholds are this crate's.
//!
//! One rule departs from the seed on purpose: the seed reads a dominant `RECOMPUTE` preemption
//! reason as "CUDA graph cache misses". It is not: `RECOMPUTE` means the scheduler freed the
//! request's KV cache and will recompute it on resume, which is KV-cache pressure. The rule here
//! says so and advises on KV-cache memory, not on graph modes.

use crate::report::Report;
pub use crate::rules::{Comparison, Insight, Rule, Severity, Thresholds};

struct Fired<'a> {
    out: &'a mut Vec<Insight>,
}

impl Fired<'_> {
    #[allow(clippy::too_many_arguments)]
    fn check(
        &mut self,
        rule: Rule,
        severity: Severity,
        title: &str,
        figure: &str,
        value: f64,
        unit: &'static str,
        comparison: Comparison,
        threshold: f64,
        advice: impl FnOnce() -> Vec<String>,
    ) {
        let fires = match comparison {
            Comparison::Above => value > threshold,
            Comparison::Below => value < threshold,
        };
        if fires {
            self.out.push(Insight {
                rule,
                severity,
                title: title.to_string(),
                figure: figure.to_string(),
                value,
                unit,
                comparison,
                threshold,
                advice: advice(),
            });
        }
    }
}

/// Evaluates every rule on `report`'s numbers (its own `insights` are not read).
///
/// ```
/// use profilemate_cli::{insights::evaluate, Report, Thresholds};
/// let dir = tempfile::tempdir()?;
/// std::fs::write(
///     dir.path().join("preemption_summary.json"),
///     r#"{"total_preemptions": 3, "total_requests": 100, "requests_preempted": 3,
///         "preemption_rate_pct": 3.0, "preemption_reasons": {"SWAP": 3},
///         "mean_running_time_before_preempt": 0.5, "mean_resume_delay": 0.2, "max_resume_delay": 0.9}"#,
/// )?;
/// let report = Report::from_dir(dir.path())?;
/// assert!(evaluate(&report, &Thresholds::default()).is_empty());
/// let strict = Thresholds { preemption_rate_pct: 2.0, ..Thresholds::default() };
/// assert_eq!(evaluate(&report, &strict).len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn evaluate(report: &Report, t: &Thresholds) -> Vec<Insight> {
    use Comparison::{Above, Below};
    use Severity::{Info, Warning};
    let mut out = Vec::new();
    let mut fired = Fired { out: &mut out };

    if let Some(run) = &report.run {
        if let Some(dropped) = run.events_dropped {
            fired.check(
                Rule::EventsDropped,
                Warning,
                "Events dropped",
                "events dropped by the profilers",
                dropped as f64,
                "",
                Above,
                0.0,
                || {
                    vec![
                        "Every count and total in this report is short by those events; the manifest \
                         (profilemate_run.json) lists them per profiler and reason."
                            .into(),
                        "`buffer_full` drops: raise the event buffer or the flush rate.".into(),
                    ]
                },
            );
        }
    }

    if let Some(b) = &report.batch {
        let s = &b.summary;
        if s.total_samples > 0 {
            let which = match (s.max_num_seqs, s.max_tokens) {
                (0, 0) => "max_num_seqs and max_tokens are",
                (0, _) => "max_num_seqs is",
                _ => "max_tokens is",
            };
            fired.check(
                Rule::MissingBatchLimits,
                Warning,
                "Batch limits not recorded",
                "smaller of max_num_seqs and max_tokens at the last sample",
                s.max_num_seqs.min(s.max_tokens) as f64,
                "",
                Below,
                1.0,
                || {
                    vec![
                        format!("{which} 0, so utilization percentages are empty or meaningless."),
                        "The scheduler was not instrumented correctly: pass the limits in force with each \
                         batch sample."
                            .into(),
                    ]
                },
            );
        }
        if s.total_samples > 0 {
            let decode_bound =
                (s.max_num_seqs > 0 && s.max_tokens > 0).then(|| s.max_num_seqs as f64 / s.max_tokens as f64 * 100.0);
            let waiting = s.mean_waiting_queue_len > 0.0;
            fired.check(
                Rule::LowTokenUtilization,
                Warning,
                "Low token utilization",
                "mean token utilization",
                s.mean_token_utilization_pct,
                "%",
                Below,
                t.low_token_utilization_pct,
                || {
                    let mut a = vec![
                        "Reduce max_num_batched_tokens to save memory (batches do not use the budget).".to_string()
                    ];
                    if s.mean_seq_utilization_pct < t.low_seq_utilization_pct {
                        a.push(format!(
                            "Sequence utilization is also low ({:.1}% < {:.0}%): reduce max_num_seqs.",
                            s.mean_seq_utilization_pct, t.low_seq_utilization_pct
                        ));
                    } else {
                        a.push(format!(
                            "Sequence utilization is {:.1}%: keep max_num_seqs; only the token budget is oversized.",
                            s.mean_seq_utilization_pct
                        ));
                    }
                    a.push("Consider smaller batch sizes.".into());
                    if let Some(bound) = decode_bound {
                        if bound < t.low_token_utilization_pct {
                            a.push(format!(
                                "A decode step schedules one token per sequence, so decode token utilization \
                                 cannot exceed max_num_seqs / max_tokens = {bound:.1}%: in a decode-heavy run low \
                                 token utilization is expected; judge by sequence utilization."
                            ));
                        }
                    }
                    if waiting {
                        a.push(format!(
                            "Requests were waiting (mean queue {:.1}) while batches ran under-full: the token budget \
                             is not what binds; look at KV-cache capacity (preemptions) instead.",
                            s.mean_waiting_queue_len
                        ));
                    }
                    a
                },
            );
            fired.check(
                Rule::HighTokenUtilization,
                Warning,
                "Token budget saturated",
                "mean token utilization",
                s.mean_token_utilization_pct,
                "%",
                Above,
                t.high_token_utilization_pct,
                || {
                    vec![
                        "Increase max_num_batched_tokens for better batching.".into(),
                        "Batches hit the limit, so long prompts are split by chunked prefill (see the mixed phase)."
                            .into(),
                    ]
                },
            );
            let backlog_advice = || {
                vec![
                    "The system is overloaded: requests queue for a batch slot.".into(),
                    "Add GPUs (replicas or tensor parallelism) or raise throughput per GPU.".into(),
                ]
            };
            match b.waiting_batches_pct {
                Some(pct) => fired.check(
                    Rule::WaitingQueueBacklog,
                    Warning,
                    "Requests waiting consistently",
                    "batches scheduled while requests were waiting",
                    pct,
                    "%",
                    Above,
                    t.waiting_batches_pct,
                    backlog_advice,
                ),
                None => fired.check(
                    Rule::WaitingQueueBacklog,
                    Warning,
                    "Requests waiting consistently",
                    "mean waiting queue length",
                    s.mean_waiting_queue_len,
                    "",
                    Above,
                    t.mean_waiting_queue_len,
                    backlog_advice,
                ),
            }
        }
    }

    if let Some(p) = &report.preemption {
        let s = &p.summary;
        fired.check(
            Rule::HighPreemptionRate,
            Warning,
            "High preemption rate",
            "preemption rate",
            s.preemption_rate_pct,
            "%",
            Above,
            t.preemption_rate_pct,
            || {
                vec![
                    "Give the KV cache more memory: raise gpu_memory_utilization.".into(),
                    "Reduce max_model_len if such long contexts are not needed.".into(),
                    "Lower max_num_seqs so fewer sequences compete for KV-cache blocks.".into(),
                ]
            },
        );
        if s.total_preemptions > 0 {
            fired.check(
                Rule::LongResumeDelay,
                Warning,
                "Long delays after preemption",
                "mean resume delay",
                s.mean_resume_delay,
                "s",
                Above,
                t.mean_resume_delay_sec,
                || {
                    vec![
                        format!("The longest wait was {:.3} s: the system is overloaded.", s.max_resume_delay),
                        "Add capacity, or admit fewer requests at once.".into(),
                    ]
                },
            );
            let recompute = s.preemption_reasons.get("RECOMPUTE").copied().unwrap_or(0);
            fired.check(
                Rule::RecomputeDominates,
                Warning,
                "RECOMPUTE preemptions dominate: KV-cache pressure",
                "share of preemptions with reason RECOMPUTE",
                recompute as f64 / s.total_preemptions as f64 * 100.0,
                "%",
                Above,
                t.recompute_share_pct,
                || {
                    vec![
                        "RECOMPUTE means the scheduler freed the request's KV cache and recomputes it on \
                         resume: the cache is too small for the load (not a CUDA graph issue)."
                            .into(),
                        "Raise gpu_memory_utilization to enlarge the KV cache.".into(),
                        "Lower max_num_seqs (or max_num_batched_tokens) so fewer sequences hold blocks at once.".into(),
                        "Reduce max_model_len if not needed; enable prefix caching if prompts share prefixes.".into(),
                    ]
                },
            );
        }
    }

    if let Some(c) = &report.cpu {
        if let Some(share) = c.host_overhead_share_pct {
            let top = c
                .operations
                .iter()
                .filter(|(op, _)| op.as_str() != "model_execution")
                .max_by(|a, b| a.1.total_ms.total_cmp(&b.1.total_ms))
                .map(|(op, s)| (op.clone(), s.total_ms));
            fired.check(
                Rule::HighCpuOverhead,
                Warning,
                "High host CPU overhead",
                "host CPU time (all operations but model_execution) / (that + forward time)",
                share,
                "%",
                Above,
                t.cpu_overhead_pct,
                || {
                    let mut a = Vec::new();
                    if let Some((op, ms)) = top {
                        a.push(format!(
                            "The largest is `{op}` ({ms:.1} ms in all): the GPU waits while the host works."
                        ));
                    }
                    a.push(
                        "Overlap host work with the GPU (async scheduling), batch more per step, and use CUDA \
                         graphs to cut kernel launch time in decode."
                            .into(),
                    );
                    a
                },
            );
        }
    }

    if let Some(fp) = &report.forward_pass {
        let d = &fp.phases.decode;
        if d.count >= t.min_decode_passes && d.p50_ms > 0.0 {
            fired.check(
                Rule::DecodeTailLatency,
                Warning,
                "Long decode latency tail",
                "decode p99 / p50",
                d.p99_ms / d.p50_ms,
                "x",
                Above,
                t.decode_p99_over_p50,
                || {
                    vec![
                        format!(
                            "Decode p50 {:.3} ms, p99 {:.3} ms: one step in a hundred is that slow.",
                            d.p50_ms, d.p99_ms
                        ),
                        "Look for steps that share the GPU with prefill chunks (mixed phase), preemptions, host \
                         stalls (CPU p95) and batch sizes that miss a captured CUDA graph and run eagerly."
                            .into(),
                    ]
                },
            );
        }
    }

    if let Some(ed) = &report.components {
        let s = &ed.summary;
        if s.model_type == "encoder_decoder" {
            fired.check(
                Rule::EncoderBottleneck,
                Info,
                "Encoder is the larger component",
                "encoder share of component time",
                s.encoder_pct,
                "%",
                Above,
                t.encoder_share_pct,
                || {
                    vec!["Optimize the encoder first: batch encoder inputs (images, audio) and cache encoder \
                         outputs that repeat."
                        .into()]
                },
            );
        }
    }

    if let Some(k) = &report.kv_cache {
        if let Some(m) = k.preemptions.as_ref().filter(|m| m.preemptions > 0) {
            fired.check(
                Rule::PreemptionsAtFullKvCache,
                Warning,
                "Preemptions while the KV cache is full: KV-cache pressure confirmed",
                &format!("preemptions at KV-cache usage >= {:.0}%", m.near_full_pct),
                m.at_near_full_pct,
                "%",
                Above,
                t.kv_full_preemptions_pct,
                || {
                    let mut a = vec![format!(
                        "{} of {} preemptions came when the cache was at least {:.0}% full ({} at 100%; mean usage \
                         at a preemption {:.1}%): the scheduler preempts because it runs out of KV-cache blocks.",
                        m.at_near_full, m.preemptions, m.near_full_pct, m.at_full, m.mean_usage_pct
                    )];
                    if let Some(full) = k.full_samples {
                        a.push(format!(
                            "Over the run the cache averaged {:.1}% and was full in {full} of {} samples.",
                            k.summary.mean_usage_pct, k.summary.samples
                        ));
                    }
                    a.push("Raise gpu_memory_utilization (or free memory elsewhere) to enlarge the KV cache.".into());
                    a.push(
                        "Lower max_num_seqs so fewer sequences hold blocks at once; reduce max_model_len if such \
                         long contexts are not needed."
                            .into(),
                    );
                    a
                },
            );
        }
        if let Some(q) = k.prefix_cache_queries.filter(|q| *q > 0) {
            fired.check(
                Rule::LowPrefixCacheHitRate,
                Info,
                "Low prefix-cache hit rate",
                "prefix-cache hit rate",
                k.summary.prefix_cache_hit_rate_pct,
                "%",
                Below,
                t.prefix_cache_hit_rate_pct,
                || {
                    vec![
                        format!(
                            "{} of {q} prefix-cache queries hit: requests share little prefix.",
                            k.prefix_cache_hits.map_or_else(|| "few".into(), |h| h.to_string())
                        ),
                        "If prompts should share a prefix (system prompt, few-shot examples), make it byte-identical \
                         and put it first; otherwise prefix caching costs lookups and cache space for little gain."
                            .into(),
                    ]
                },
            );
        }
    }

    if let Some(slow) = &report.slow_steps {
        for p in &slow.phases {
            let Some(top) = p.top() else { continue };
            let lift = top.lift.map_or("only in the tail".to_string(), |l| format!("lift {l:.1}x"));
            fired.check(
                Rule::SlowStepCause,
                Warning,
                &format!("Slow {} steps: {}", p.phase, top.condition.describe()),
                &format!("share of the {} tail's excess time attributable to {}", p.phase, top.condition.describe()),
                top.attributable_pct,
                "%",
                Above,
                t.slow_step_attributable_pct,
                || {
                    let mut a = vec![format!(
                        "{} of the {} slowest {} steps have it against {} of the other {} ({lift}); they hold {:.1}% \
                         of the tail's {:.1} ms over the median ({:.3} ms).",
                        top.tail_with,
                        p.tail_steps,
                        p.phase,
                        top.rest_with,
                        p.steps - p.tail_steps,
                        top.excess_share_pct,
                        p.tail_excess_ms,
                        p.median_ms
                    )];
                    a.push(crate::slow_steps::advice(top.condition).to_string());
                    a
                },
            );
        }
    }

    if let Some(g) = &report.cuda_graph {
        let s = &g.summary;
        if g.steps > 0 {
            fired.check(
                Rule::LowGraphReplayRate,
                Warning,
                "Many steps run without a CUDA graph",
                "CUDA graph replay rate (replays / (replays + eager steps))",
                s.replay_rate_pct,
                "%",
                Below,
                t.graph_replay_rate_pct,
                || {
                    let mut a = vec![format!(
                        "{} of {} steps ran eagerly, paying kernel launch overhead a graph replay avoids.",
                        s.eager_steps, g.steps
                    )];
                    let largest = g.largest_captured_size;
                    let max_eager = g.max_eager_batch_size.map_or_else(|| "?".into(), |m| m.to_string());
                    if let (Some(beyond), Some(l)) = (g.eager_beyond_largest_graph, largest) {
                        if beyond > 0 {
                            a.push(format!(
                                "{beyond} eager steps had batch sizes beyond the largest captured graph ({l}; largest \
                                 eager batch {max_eager}): capture larger sizes (raise max_capture_size or extend \
                                 cudagraph_capture_sizes up to max_num_seqs)."
                            ));
                        }
                    } else if let (Some(l), Some(m)) = (largest, g.max_eager_batch_size) {
                        if m > l {
                            a.push(format!(
                                "The largest eager batch ({m}) is beyond the largest captured graph ({l}): capture \
                                 larger sizes (raise max_capture_size or extend cudagraph_capture_sizes)."
                            ));
                        }
                    }
                    if let Some(within) = g.eager_within_graphs.filter(|w| *w > 0) {
                        let mut line = format!(
                            "{within} eager steps had batch sizes a captured graph covers: engines capture graphs for \
                             decode-only batches, so these are usually prefill or mixed steps (expected with chunked \
                             prefill)."
                        );
                        if let Some(fp) = &report.forward_pass {
                            let prompt = fp.phases.prefill.count + fp.phases.mixed.count;
                            line.push_str(&format!(
                                " The run had {prompt} prefill and mixed passes against {} eager steps{}.",
                                s.eager_steps,
                                if prompt == s.eager_steps {
                                    ": consistent with every decode-only step replaying a graph"
                                } else {
                                    ""
                                }
                            ));
                        }
                        a.push(line);
                        a.push(
                            "To replay those too, use a graph mode that covers batches with prompt tokens (piecewise \
                             graphs, which run attention eagerly and replay the rest), or fewer, larger prefill \
                             chunks."
                                .into(),
                        );
                    }
                    a
                },
            );
        }
        if s.replays > 0 {
            fired.check(
                Rule::GraphPaddingWaste,
                Warning,
                "Replayed batches carry much padding",
                "mean padding of a replayed batch",
                s.mean_padding_pct,
                "%",
                Above,
                t.graph_padding_pct,
                || {
                    let mut a = vec![format!(
                        "A replayed batch is padded up to the next captured size; on average {:.1}% of its slots \
                         computed nothing.",
                        s.mean_padding_pct
                    )];
                    if let Some(p) = &g.most_padded_graph {
                        a.push(format!(
                            "Most waste is in graph size {}: {} padded slots over {} replays ({:.1}% of its slots).",
                            p.graph_size, p.padded_slots, p.replays, p.padding_pct
                        ));
                    }
                    a.push(
                        "Capture more sizes where batches fall (finer steps in cudagraph_capture_sizes below that \
                         size); each costs capture time and a little memory."
                            .into(),
                    );
                    a
                },
            );
        }
    }

    if let Some(m) = &report.moe_expert {
        if !m.layers.is_empty() {
            fired.check(
                Rule::MoeExpertImbalance,
                Warning,
                "MoE expert load is imbalanced",
                "highest max_over_mean of a layer (busiest expert's tokens / mean per expert)",
                m.max_over_mean,
                "x",
                Above,
                t.moe_max_over_mean,
                || {
                    let above = m.layers_above(t.moe_max_over_mean);
                    let named: Vec<String> = above
                        .iter()
                        .take(8)
                        .map(|l| {
                            format!(
                                "layer {} ({:.2}x, expert {} takes {:.1}%)",
                                l.layer, l.max_over_mean, l.hottest_expert, l.hottest_share_pct
                            )
                        })
                        .collect();
                    let more = above.len().saturating_sub(named.len());
                    let mut a = vec![format!(
                        "{} of {} layers are above {:.2}x: {}{}.",
                        above.len(),
                        m.layers.len(),
                        t.moe_max_over_mean,
                        named.join(", "),
                        if more > 0 { format!(" and {more} more") } else { String::new() }
                    )];
                    a.push(
                        "With expert parallelism the busiest expert's GPU sets the step time: rebalance experts \
                         (expert-parallel load balancing, redundant copies of hot experts)."
                            .into(),
                    );
                    a.push(
                        "If the imbalance follows the workload (one domain or language), check that the routing \
                         matches what the model saw in training; otherwise it is the model's own."
                            .into(),
                    );
                    a
                },
            );
        }
    }

    out
}
