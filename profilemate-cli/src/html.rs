//! One self-contained HTML page: the report's tables, the insights, and the figures inlined as
//! SVG. It loads nothing from anywhere, so it can be mailed or attached to a ticket.

use crate::contract::ComponentStats;
use crate::data::RunData;
use crate::insights::{Comparison, Severity};
use crate::plots::Figure;
use crate::report::{Note, Report};
use crate::ReportError;
use std::fmt::Write as _;

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn num(count: u64, v: f64, decimals: usize) -> String {
    if count == 0 {
        "-".into()
    } else {
        format!("{v:.decimals$}")
    }
}

struct Table {
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&'static str]) -> Table {
        Table { head: head.to_vec(), rows: Vec::new() }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        out.push_str("<table><thead><tr>");
        for h in &self.head {
            let _ = write!(out, "<th>{}</th>", esc(h));
        }
        out.push_str("</tr></thead><tbody>");
        for r in &self.rows {
            out.push_str("<tr>");
            for (i, c) in r.iter().enumerate() {
                let class = if i == 0 { "" } else { " class=\"n\"" };
                let _ = write!(out, "<td{class}>{}</td>", esc(c));
            }
            out.push_str("</tr>");
        }
        out.push_str("</tbody></table>\n");
    }
}

fn para(out: &mut String, text: &str) {
    let _ = writeln!(out, "<p>{}</p>", esc(text));
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;\
padding:0 1em;color:#222}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}\
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em}th{background:#f4f4f4}\
td.n{text-align:right;font-variant-numeric:tabular-nums}.src{color:#777;font-size:.9em}\
.insight{border-left:4px solid #d62728;background:#fff5f5;padding:.5em 1em;margin:.6em 0}\
.insight.info{border-color:#1f77b4;background:#f3f8fc}.fig{margin:1em 0}.fig svg{max-width:100%;height:auto}\
.notes li{color:#555}";

/// The report as one HTML page, with every figure `data` can give inlined as SVG.
///
/// ```
/// use profilemate_cli::{html::render, Report, RunData, Thresholds};
/// let dir = tempfile::tempdir()?;
/// std::fs::write(
///     dir.path().join("forward_pass_timing.csv"),
///     "timestamp_sec,phase,batch_size,num_tokens,forward_time_ms,throughput_tokens_per_sec\n\
///      0.000000,decode,4,4,2.000,2000.000\n",
/// )?;
/// let data = RunData::load(dir.path())?;
/// let page = render(&Report::from_data(&data, &Thresholds::default()), &data)?;
/// assert!(page.starts_with("<!DOCTYPE html>"));
/// assert!(page.contains("<svg"));
/// assert!(!page.contains("<script"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`ReportError::Plot`] when drawing a figure fails.
pub fn render(report: &Report, data: &RunData) -> Result<String, ReportError> {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\
         <title>profilemate report: {}</title><style>{STYLE}</style></head><body>\n",
        esc(&report.dir)
    );
    let _ = writeln!(out, "<h1>profilemate report</h1><p class=\"src\">{}</p>", esc(&report.dir));
    if let Some(run) = &report.run {
        let mut t = Table::new(&["run", ""]);
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                t.row(vec![k.to_string(), v]);
            }
        };
        add("profilemate version", run.profilemate_version.clone());
        add("started at", run.started_at.clone());
        add("host", run.host.clone());
        add("pid", run.pid.map(|p| p.to_string()));
        add("timing backend", run.timing_backend.clone());
        add("steps", run.steps.map(|p| p.to_string()));
        add("finished cleanly", run.finished.map(|p| p.to_string()));
        add("events dropped", run.events_dropped.map(|p| p.to_string()));
        t.render(&mut out);
    }

    out.push_str("<h2>Insights</h2>\n");
    if report.insights.is_empty() {
        para(&mut out, "No rule fired: every figure is within its threshold.");
    }
    for i in &report.insights {
        let class = if i.severity == Severity::Info { "insight info" } else { "insight" };
        let cmp = if i.comparison == Comparison::Above { "&gt;" } else { "&lt;" };
        let unit = |v: f64| match i.unit {
            "%" => format!("{v:.1}%"),
            "s" => format!("{v:.3} s"),
            "x" => format!("{v:.2}x"),
            _ => format!("{v}"),
        };
        let _ = write!(
            out,
            "<div class=\"{class}\"><strong>{}</strong>: {} <strong>{}</strong> {cmp} {} <span class=\"src\">({})</span><ul>",
            esc(&i.title),
            esc(&i.figure),
            esc(&unit(i.value)),
            esc(&unit(i.threshold)),
            i.rule.as_str()
        );
        for a in &i.advice {
            let _ = write!(out, "<li>{}</li>", esc(a));
        }
        out.push_str("</ul></div>\n");
    }

    if let Some(b) = &report.step_breakdown {
        out.push_str("<h2>Step breakdown</h2>\n<p>Shares of the summed step time, from step_timeline.csv.</p>\n");
        let _ = writeln!(out, "<pre style=\"overflow-x:auto\">{}</pre>", esc(&b.to_string()));
    }
    if let Some(slow) = &report.slow_steps {
        out.push_str("<h2>Slow steps</h2>\n<p>Per phase, the steps above p99 or over twice the median of host gap + wall time, and the conditions they share.</p>\n");
        let _ = writeln!(out, "<pre style=\"overflow-x:auto\">{}</pre>", esc(&slow.to_string()));
    }
    out.push_str("<h2>1. Forward pass timing</h2>\n");
    match &report.forward_pass {
        None => para(&mut out, "No data."),
        Some(fp) => {
            let _ = writeln!(out, "<p class=\"src\">source: {}</p>", esc(&fp.source));
            let mut t = Table::new(&[
                "phase",
                "count",
                "mean ms",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "total ms",
                "tokens",
                "mean tokens/s",
                "time share",
            ]);
            let shares = [fp.time_share_pct.prefill, fp.time_share_pct.decode, fp.time_share_pct.mixed];
            for ((name, p), share) in
                [("prefill", &fp.phases.prefill), ("decode", &fp.phases.decode), ("mixed", &fp.phases.mixed)]
                    .into_iter()
                    .zip(shares)
            {
                t.row(vec![
                    name.into(),
                    p.count.to_string(),
                    num(p.count, p.mean_ms, 3),
                    num(p.count, p.p50_ms, 3),
                    num(p.count, p.p95_ms, 3),
                    num(p.count, p.p99_ms, 3),
                    num(p.count, p.total_ms, 3),
                    p.total_tokens.to_string(),
                    num(p.count, p.mean_throughput_tokens_per_sec, 1),
                    format!("{share:.1}%"),
                ]);
            }
            t.render(&mut out);
            para(
                &mut out,
                &format!(
                    "All phases: {} passes, {} tokens in {:.3} ms of forward time = {:.1} tokens/s.",
                    fp.total_passes, fp.total_tokens, fp.total_forward_ms, fp.overall_throughput_tokens_per_sec
                ),
            );
        }
    }

    out.push_str("<h2>2. CPU operations</h2>\n");
    match &report.cpu {
        None => para(&mut out, "No data."),
        Some(c) => {
            let _ = writeln!(out, "<p class=\"src\">source: {}</p>", esc(&c.source));
            let mut t = Table::new(&["operation", "count", "mean ms", "p95 ms", "total ms"]);
            let mut ops: Vec<_> = c.operations.iter().collect();
            ops.sort_by(|a, b| b.1.total_ms.total_cmp(&a.1.total_ms).then(a.0.cmp(b.0)));
            for (op, s) in ops {
                t.row(vec![
                    op.clone(),
                    s.count.to_string(),
                    num(s.count, s.mean_ms, 3),
                    num(s.count, s.p95_ms, 3),
                    num(s.count, s.total_ms, 3),
                ]);
            }
            t.render(&mut out);
            if let (Some(fwd), Some(share)) = (c.forward_ms, c.cpu_share_pct) {
                para(
                    &mut out,
                    &format!(
                        "CPU overhead (the seed's cpu / (cpu + forward)): {:.3} ms CPU vs {fwd:.3} ms forward = {share:.1}%.",
                        c.total_cpu_ms
                    ),
                );
            }
            if let Some(h) = c.host_overhead_share_pct {
                para(
                    &mut out,
                    &format!(
                        "Without model_execution (it wraps the forward pass): {:.3} ms = {h:.1}%.",
                        c.host_overhead_ms
                    ),
                );
            }
        }
    }

    out.push_str("<h2>3. Model components</h2>\n");
    match &report.components {
        None => para(&mut out, "No data."),
        Some(c) => {
            let s = &c.summary;
            let _ = writeln!(out, "<p class=\"src\">source: {}</p>", esc(&c.source));
            para(&mut out, &format!("Model type: {}", s.model_type));
            let mut t = Table::new(&["component", "share", "calls", "mean ms", "p95 ms", "total ms"]);
            let mut add = |name: &str, pct: f64, g: &ComponentStats| {
                t.row(vec![
                    name.into(),
                    format!("{pct:.1}%"),
                    g.count.to_string(),
                    num(g.count, g.mean_ms, 3),
                    num(g.count, g.p95_ms, 3),
                    num(g.count, g.total_ms, 3),
                ])
            };
            add("encoder", s.encoder_pct, &s.encoder);
            add("decoder", s.decoder_pct, &s.decoder);
            add("cross_attention", s.cross_attention_pct, &s.cross_attention);
            t.render(&mut out);
        }
    }

    out.push_str("<h2>4. Batch utilization</h2>\n");
    match &report.batch {
        None => para(&mut out, "No data."),
        Some(b) => {
            let s = &b.summary;
            let _ = writeln!(out, "<p class=\"src\">source: {}</p>", esc(&b.source));
            let mut t = Table::new(&["figure", "value"]);
            t.row(vec!["samples".into(), s.total_samples.to_string()]);
            t.row(vec![
                "max_num_seqs / max_tokens (last sample)".into(),
                format!("{} / {}", s.max_num_seqs, s.max_tokens),
            ]);
            t.row(vec!["mean sequence utilization".into(), format!("{:.1}%", s.mean_seq_utilization_pct)]);
            t.row(vec!["mean token utilization".into(), format!("{:.1}%", s.mean_token_utilization_pct)]);
            t.row(vec![
                format!("underutilization events (< {:.0}%)", s.underutilization_threshold_pct),
                format!("{} ({:.1}%)", s.underutilization_events, b.underutilization_share_pct),
            ]);
            t.row(vec!["prefill token utilization".into(), format!("{:.1}%", s.prefill_avg_utilization)]);
            t.row(vec!["decode token utilization".into(), format!("{:.1}%", s.decode_avg_utilization)]);
            t.row(vec!["mixed token utilization".into(), format!("{:.1}%", s.mixed_avg_utilization)]);
            let max_running = b.max_running_queue_len.map_or_else(|| "-".into(), |m| m.to_string());
            t.row(vec!["running queue mean (max)".into(), format!("{:.1} ({max_running})", s.mean_running_queue_len)]);
            t.row(vec![
                "waiting queue mean (max)".into(),
                format!("{:.1} ({})", s.mean_waiting_queue_len, s.max_waiting_queue_len),
            ]);
            if let Some(w) = b.waiting_batches_pct {
                t.row(vec!["batches scheduled while requests waited".into(), format!("{w:.1}%")]);
            }
            t.render(&mut out);
        }
    }

    out.push_str("<h2>5. Preemptions</h2>\n");
    match &report.preemption {
        None => para(&mut out, "No data."),
        Some(p) => {
            let s = &p.summary;
            let _ = writeln!(out, "<p class=\"src\">source: {}</p>", esc(&p.source));
            let mut t = Table::new(&["figure", "value"]);
            t.row(vec!["total preemptions".into(), s.total_preemptions.to_string()]);
            t.row(vec!["requests".into(), s.total_requests.to_string()]);
            t.row(vec!["preemption rate".into(), format!("{:.1}%", s.preemption_rate_pct)]);
            t.row(vec![
                "requests preempted".into(),
                format!("{} ({:.1}%)", s.requests_preempted, p.requests_preempted_pct),
            ]);
            t.row(vec![
                "mean running time before preemption".into(),
                format!("{:.3} s", s.mean_running_time_before_preempt),
            ]);
            t.row(vec!["mean resume delay".into(), format!("{:.3} s", s.mean_resume_delay)]);
            t.row(vec!["max resume delay".into(), format!("{:.3} s", s.max_resume_delay)]);
            for (reason, n) in &s.preemption_reasons {
                t.row(vec![format!("reason {reason}"), n.to_string()]);
            }
            t.render(&mut out);
        }
    }

    out.push_str("<h2>6. KV cache</h2>\n");
    match &report.kv_cache {
        None => para(&mut out, "No data."),
        Some(k) => {
            let s = &k.summary;
            let _ = writeln!(out, "<p class=\"src\">source: {}</p>", esc(&k.source));
            let mut t = Table::new(&["figure", "value"]);
            t.row(vec!["samples".into(), s.samples.to_string()]);
            if let Some(b) = s.total_blocks {
                t.row(vec!["blocks (last sample)".into(), b.to_string()]);
            }
            t.row(vec!["mean usage".into(), format!("{:.1}%", s.mean_usage_pct)]);
            t.row(vec!["max usage".into(), format!("{:.1}%", s.max_usage_pct)]);
            t.row(vec![
                "samples at 100%".into(),
                match (k.full_samples, k.full_samples_pct) {
                    (Some(n), Some(p)) => format!("{n} ({p:.1}%)"),
                    _ => "unknown".into(),
                },
            ]);
            t.row(vec![
                "prefix cache".into(),
                match k.prefix_cache_queries {
                    Some(0) => "no queries".into(),
                    Some(q) => format!(
                        "{} hits of {q} queries = {:.1}%",
                        k.prefix_cache_hits.map_or_else(|| "?".into(), |h| h.to_string()),
                        s.prefix_cache_hit_rate_pct
                    ),
                    None => format!("hit rate {:.1}%", s.prefix_cache_hit_rate_pct),
                },
            ]);
            match &k.preemptions {
                Some(m) => {
                    t.row(vec![
                        format!("preemptions at usage >= {:.0}% (nearest sample before each)", m.near_full_pct),
                        format!(
                            "{} of {} ({:.1}%), {} at 100%",
                            m.at_near_full, m.preemptions, m.at_near_full_pct, m.at_full
                        ),
                    ]);
                    t.row(vec!["mean usage at a preemption".into(), format!("{:.1}%", m.mean_usage_pct)]);
                }
                None => t.row(vec![
                    "preemptions against usage".into(),
                    "unknown (needs kv_cache_usage.csv and preemption_events.csv)".into(),
                ]),
            }
            t.render(&mut out);
        }
    }

    out.push_str("<h2>7. CUDA graphs</h2>\n");
    match &report.cuda_graph {
        None => para(&mut out, "No data."),
        Some(g) => {
            let s = &g.summary;
            let _ = writeln!(out, "<p class=\"src\">source: {}</p>", esc(&g.source));
            let mut t = Table::new(&["figure", "value"]);
            t.row(vec!["captures".into(), s.captures.to_string()]);
            if let Some(sizes) = &g.captured_sizes {
                t.row(vec!["captured sizes".into(), sizes.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")]);
            }
            t.row(vec!["capture time".into(), format!("{:.3} ms", s.capture_time_ms)]);
            t.row(vec!["steps (replayed + eager)".into(), format!("{} ({} + {})", g.steps, s.replays, s.eager_steps)]);
            t.row(vec!["replay rate".into(), format!("{:.1}%", s.replay_rate_pct)]);
            t.row(vec!["mean padding of a replayed batch".into(), format!("{:.1}%", s.mean_padding_pct)]);
            if let Some(p) = &g.most_padded_graph {
                t.row(vec![
                    "most padded graph".into(),
                    format!(
                        "size {}: {} slots over {} replays ({:.1}%)",
                        p.graph_size, p.padded_slots, p.replays, p.padding_pct
                    ),
                ]);
            }
            t.row(vec!["eager steps".into(), s.eager_steps.to_string()]);
            if let Some(m) = g.max_eager_batch_size {
                t.row(vec!["largest eager batch".into(), m.to_string()]);
            }
            if let (Some(b), Some(w)) = (g.eager_beyond_largest_graph, g.eager_within_graphs) {
                let largest = g.largest_captured_size.map_or_else(|| "none captured".into(), |l| l.to_string());
                t.row(vec![format!("eager steps beyond the largest graph ({largest})"), b.to_string()]);
                t.row(vec!["eager steps within the captured sizes".into(), w.to_string()]);
            }
            t.render(&mut out);
        }
    }

    out.push_str("<h2>8. MoE experts</h2>\n");
    match &report.moe_expert {
        None => para(&mut out, "No data."),
        Some(m) => {
            let _ = writeln!(out, "<p class=\"src\">source: {}</p>", esc(&m.source));
            para(
                &mut out,
                &format!(
                    "{} layers; max_over_mean: highest {:.2}x, mean over layers {:.2}x. Most imbalanced layers: {}.",
                    m.layers.len(),
                    m.max_over_mean,
                    m.mean_max_over_mean,
                    if m.most_imbalanced_layers.is_empty() {
                        "none".to_string()
                    } else {
                        m.most_imbalanced_layers.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
                    }
                ),
            );
            let mut t = Table::new(&["layer", "experts", "tokens", "max/mean", "CV", "hottest expert", "its share"]);
            for l in &m.layers {
                t.row(vec![
                    l.layer.clone(),
                    l.experts.to_string(),
                    l.total_tokens.to_string(),
                    format!("{:.2}x", l.max_over_mean),
                    format!("{:.3}", l.coefficient_of_variation),
                    l.hottest_expert.to_string(),
                    format!("{:.1}%", l.hottest_share_pct),
                ]);
            }
            t.render(&mut out);
        }
    }

    out.push_str("<h2>Figures</h2>\n");
    let (figures, skipped) = Figure::available_in(data);
    for fig in figures {
        let svg = fig.to_svg(data)?;
        let _ = writeln!(out, "<div class=\"fig\" id=\"{}\">{svg}</div>", fig.file_stem());
    }

    let notes: Vec<&Note> = report.notes.iter().chain(skipped.iter()).collect();
    if !notes.is_empty() {
        out.push_str("<h2>Notes</h2><ul class=\"notes\">\n");
        for n in notes {
            let _ = writeln!(out, "<li>{}</li>", esc(&n.to_string()));
        }
        out.push_str("</ul>\n");
    }
    out.push_str("</body></html>\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(super::esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }
}
