//! `profilemate compare BASE NEW`: did a change make the engine faster, or is that noise?
//!
//! Per phase, each figure of the two runs is compared with a 95 % confidence interval of its
//! change, computed from the steps by a **moving-block bootstrap**: each resample takes blocks
//! of ⌈√n⌉ consecutive steps (with replacement) from each run until it has as many steps as the
//! run, and computes the figure on both; the interval is the 2.5th to 97.5th percentile of the
//! change over [`RESAMPLES`] resamples (a fixed seed, so a comparison is reproducible). Blocks
//! rather than single steps because consecutive steps share their batch and are not
//! independent: resampling single steps would give intervals too narrow.
//!
//! When the two runs scheduled the same steps in a phase (the same batch sizes and tokens in the
//! same order, as two runs of a deterministic scheduler with one seed give: an A/B test of a
//! kernel or a library version), the resamples take the same blocks of steps from both runs (a
//! paired bootstrap), so that the workload's own variation cancels and only the change remains.
//!
//! The change is relative (percent of BASE) for times, throughput and utilization, and absolute
//! (NEW − BASE) for rates that may be 0 in BASE (preemptions per step, graph replay rate in
//! percentage points). The verdict is "better" or "worse" when the interval excludes 0 (in the
//! figure's good direction or not), else "no significant change"; figures with no good direction
//! (KV-cache usage) say "higher" or "lower".
//!
//! Forward time and throughput come from `forward_pass_timing.csv`, so any engine's output
//! compares; the other figures come from `step_timeline.csv` where both runs have one.

use crate::data::RunData;
use crate::timeline::StepRow;
use profilemate_core::{GraphEvent, Phase};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::fmt;

/// Bootstrap resamples per figure.
pub const RESAMPLES: usize = 1000;

/// Which way is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Smaller is better (times, preemptions).
    Lower,
    /// Larger is better (throughput, utilization, replay rate).
    Higher,
    /// Neither (KV-cache usage).
    Neutral,
}

/// The statistic of a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stat {
    /// Median.
    P50,
    /// 95th percentile.
    P95,
    /// 99th percentile.
    P99,
    /// Mean.
    Mean,
}

impl Stat {
    fn of(self, v: &mut [f64]) -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let q = match self {
            Stat::Mean => return v.iter().sum::<f64>() / v.len() as f64,
            Stat::P50 => 0.50,
            Stat::P95 => 0.95,
            Stat::P99 => 0.99,
        };
        // Nearest rank.
        let k = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        *v.select_nth_unstable_by(k, f64::total_cmp).1
    }

    /// Its name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Stat::P50 => "median",
            Stat::P95 => "p95",
            Stat::P99 => "p99",
            Stat::Mean => "mean",
        }
    }
}

/// How a figure changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Significantly better.
    Better,
    /// Significantly worse.
    Worse,
    /// Significantly higher (a figure with no good direction).
    Higher,
    /// Significantly lower (a figure with no good direction).
    Lower,
    /// The interval contains 0.
    NoSignificantChange,
    /// Too few steps in one of the runs (fewer than [`MIN_STEPS`]).
    TooFewSteps,
}

impl Verdict {
    /// Words for people.
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::Higher => "higher",
            Verdict::Lower => "lower",
            Verdict::NoSignificantChange => "no significant change",
            Verdict::TooFewSteps => "too few steps",
        }
    }
}

/// Fewer steps than this in either run and a figure gets no interval.
pub const MIN_STEPS: usize = 20;

/// One figure of one phase, in both runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metric {
    /// `prefill`, `decode` or `mixed`.
    pub phase: &'static str,
    /// The figure (`forward_time_ms`, `throughput_tokens_per_sec`, ...).
    pub figure: &'static str,
    /// Its statistic.
    pub stat: Stat,
    /// Which way is good.
    pub direction: Direction,
    /// Whether the change is relative (percent) or absolute (in the figure's unit).
    pub relative: bool,
    /// Steps (or passes) in BASE and NEW.
    pub n: (usize, usize),
    /// The statistic in BASE.
    pub base: f64,
    /// The statistic in NEW.
    pub new: f64,
    /// The change: percent of BASE when relative, NEW − BASE otherwise.
    pub change: f64,
    /// Its 95 % interval.
    pub ci: (f64, f64),
    /// The verdict.
    pub verdict: Verdict,
    /// Whether the two runs scheduled the same steps and were resampled in pairs.
    pub paired: bool,
}

/// The comparison of two runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// BASE's directory.
    pub base: String,
    /// NEW's directory.
    pub new: String,
    /// How the intervals were computed.
    pub method: String,
    /// Every figure of every phase present in both runs.
    pub metrics: Vec<Metric>,
    /// What could not be compared.
    pub notes: Vec<String>,
}

/// A figure's samples in one run, in step order.
type Samples = Vec<f64>;

/// Indices of one moving-block resample of `n` steps (blocks wrap around the end).
fn block_indices(rng: &mut StdRng, n: usize, out: &mut Vec<usize>) {
    out.clear();
    let block = (n as f64).sqrt().ceil().max(1.0) as usize;
    while out.len() < n {
        let start = rng.random_range(0..n);
        for i in 0..block {
            if out.len() == n {
                break;
            }
            out.push((start + i) % n);
        }
    }
}

fn pick(v: &[f64], idx: &[usize], out: &mut Vec<f64>) {
    out.clear();
    out.extend(idx.iter().map(|&i| v[i]));
}

fn change(base: f64, new: f64, relative: bool) -> f64 {
    if relative {
        if base != 0.0 {
            (new / base - 1.0) * 100.0
        } else {
            0.0
        }
    } else {
        new - base
    }
}

#[allow(clippy::too_many_arguments)]
fn metric(
    phase: Phase,
    figure: &'static str,
    stat: Stat,
    direction: Direction,
    relative: bool,
    base: &Samples,
    new: &Samples,
    paired: bool,
    seed: u64,
) -> Metric {
    let paired = paired && base.len() == new.len();
    let b = stat.of(&mut base.clone());
    let n = stat.of(&mut new.clone());
    let point = change(b, n, relative);
    let (ci, verdict) = if base.len() < MIN_STEPS || new.len() < MIN_STEPS {
        ((point, point), Verdict::TooFewSteps)
    } else {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut rb, mut rn, mut ib, mut in_) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut changes: Vec<f64> = (0..RESAMPLES)
            .map(|_| {
                block_indices(&mut rng, base.len(), &mut ib);
                pick(base, &ib, &mut rb);
                if paired {
                    pick(new, &ib, &mut rn);
                } else {
                    block_indices(&mut rng, new.len(), &mut in_);
                    pick(new, &in_, &mut rn);
                }
                change(stat.of(&mut rb), stat.of(&mut rn), relative)
            })
            .collect();
        changes.sort_by(f64::total_cmp);
        let lo = changes[(RESAMPLES as f64 * 0.025) as usize];
        let hi = changes[((RESAMPLES as f64 * 0.975) as usize).min(RESAMPLES - 1)];
        let verdict = if lo <= 0.0 && hi >= 0.0 {
            Verdict::NoSignificantChange
        } else {
            let up = lo > 0.0;
            match (direction, up) {
                (Direction::Lower, true) | (Direction::Higher, false) => Verdict::Worse,
                (Direction::Lower, false) | (Direction::Higher, true) => Verdict::Better,
                (Direction::Neutral, true) => Verdict::Higher,
                (Direction::Neutral, false) => Verdict::Lower,
            }
        };
        ((lo, hi), verdict)
    };
    Metric {
        phase: phase.as_str(),
        figure,
        stat,
        direction,
        relative,
        n: (base.len(), new.len()),
        base: b,
        new: n,
        change: point,
        ci,
        verdict,
        paired,
    }
}

/// The (batch size, tokens) of a phase's forward passes, in order: equal in both runs when they
/// scheduled the same steps.
fn forward_shapes(data: &RunData, phase: Phase) -> Vec<(u64, u64)> {
    data.forward_pass.iter().flatten().filter(|r| r.phase == phase).map(|r| (r.batch_size, r.num_tokens)).collect()
}

fn forward_samples(data: &RunData, phase: Phase) -> (Samples, Samples) {
    let rows = data.forward_pass.iter().flatten().filter(|r| r.phase == phase);
    let times = rows.clone().map(|r| r.forward_time_ms).collect();
    let throughput = rows.filter_map(|r| r.throughput_tokens_per_sec).collect();
    (times, throughput)
}

fn timeline_samples(rows: &[StepRow], phase: Phase, f: impl Fn(&StepRow) -> Option<f64>) -> Samples {
    rows.iter().filter(|r| r.phase == Some(phase)).filter_map(f).collect()
}

type Figure = (&'static str, Stat, Direction, bool, fn(&StepRow) -> Option<f64>);

/// The figures taken from `step_timeline.csv`.
const TIMELINE_FIGURES: [Figure; 10] = [
    ("step_wall_ms", Stat::P50, Direction::Lower, true, |r| Some(r.step_wall_ms)),
    ("step_wall_ms", Stat::P95, Direction::Lower, true, |r| Some(r.step_wall_ms)),
    ("scheduling_ms", Stat::P50, Direction::Lower, true, |r| r.scheduling_ms),
    ("batch_preparation_ms", Stat::P50, Direction::Lower, true, |r| r.batch_preparation_ms),
    ("sampling_ms", Stat::P50, Direction::Lower, true, |r| r.sampling_ms),
    ("token_utilization_pct", Stat::Mean, Direction::Higher, true, |r| r.token_utilization_pct),
    ("seq_utilization_pct", Stat::Mean, Direction::Higher, true, |r| r.seq_utilization_pct),
    ("preemptions_per_step", Stat::Mean, Direction::Lower, false, |r| r.preemptions.map(|p| p as f64)),
    ("kv_cache_usage_pct", Stat::Mean, Direction::Neutral, true, |r| r.kv_cache_usage_pct),
    ("graph_replay_rate_pct", Stat::Mean, Direction::Higher, false, |r| {
        r.cuda_graph.map(|g| if g == GraphEvent::Replay { 100.0 } else { 0.0 })
    }),
];

impl Comparison {
    /// Compares two runs.
    pub fn of(base: &RunData, new: &RunData) -> Comparison {
        let mut metrics = Vec::new();
        let mut notes = Vec::new();
        let mut seed = 0x70726f66696c65u64;
        let mut next_seed = || {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            seed
        };
        let timelines = match (&base.step_timeline, &new.step_timeline) {
            (Some(b), Some(n)) => Some((b, n)),
            _ => {
                notes.push(
                    "step_timeline.csv is missing in one of the runs: only forward time and throughput are compared"
                        .to_string(),
                );
                None
            }
        };
        if base.forward_pass.is_none() || new.forward_pass.is_none() {
            notes.push("forward_pass_timing.csv is missing in one of the runs: forward passes not compared".into());
        }
        for phase in Phase::ALL {
            let (bt, bx) = forward_samples(base, phase);
            let (nt, nx) = forward_samples(new, phase);
            if bt.is_empty() && nt.is_empty() {
                continue;
            }
            let paired = forward_shapes(base, phase) == forward_shapes(new, phase);
            for stat in [Stat::P50, Stat::P95, Stat::P99] {
                metrics.push(metric(
                    phase,
                    "forward_time_ms",
                    stat,
                    Direction::Lower,
                    true,
                    &bt,
                    &nt,
                    paired,
                    next_seed(),
                ));
            }
            let paired_throughput = paired && bx.len() == bt.len() && nx.len() == nt.len();
            metrics.push(metric(
                phase,
                "throughput_tokens_per_sec",
                Stat::P50,
                Direction::Higher,
                true,
                &bx,
                &nx,
                paired_throughput,
                next_seed(),
            ));
            if let Some((b, n)) = timelines {
                let shapes = |rows: &[StepRow]| -> Vec<(Option<u64>, Option<u64>)> {
                    rows.iter().filter(|r| r.phase == Some(phase)).map(|r| (r.batch_size, r.num_tokens)).collect()
                };
                let same_steps = shapes(b) == shapes(n);
                for (figure, stat, direction, relative, f) in TIMELINE_FIGURES {
                    let bs = timeline_samples(b, phase, f);
                    let ns = timeline_samples(n, phase, f);
                    if bs.is_empty() && ns.is_empty() {
                        continue;
                    }
                    // Pairs only where every step has the figure in both runs.
                    let all = |rows: &[StepRow]| rows.iter().filter(|r| r.phase == Some(phase)).all(|r| f(r).is_some());
                    let paired = same_steps && all(b) && all(n);
                    metrics.push(metric(phase, figure, stat, direction, relative, &bs, &ns, paired, next_seed()));
                }
            }
        }
        Comparison {
            base: base.dir.display().to_string(),
            new: new.dir.display().to_string(),
            method: format!(
                "95% interval of the change by moving-block bootstrap (blocks of sqrt(n) consecutive steps, {RESAMPLES} \
                 resamples; paired where both runs scheduled the same steps)"
            ),
            metrics,
            notes,
        }
    }

    /// The regressions `--fail-on-regression PCT` fails on: a phase's median forward time or
    /// median throughput significantly worse by more than `pct` percent.
    pub fn regressions(&self, pct: f64) -> Vec<&Metric> {
        self.metrics
            .iter()
            .filter(|m| {
                m.stat == Stat::P50
                    && matches!(m.figure, "forward_time_ms" | "throughput_tokens_per_sec")
                    && m.verdict == Verdict::Worse
                    && m.change.abs() > pct
            })
            .collect()
    }

    /// A metric by phase, figure and statistic.
    pub fn get(&self, phase: &str, figure: &str, stat: Stat) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.phase == phase && m.figure == figure && m.stat == stat)
    }
}

fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 || v == 0.0 {
        format!("{v:.3}")
    } else {
        // Sub-millisecond operations (scheduling takes microseconds) keep their digits.
        format!("{v:.5}")
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (change, ci) = if self.relative {
            (format!("{:+.1}%", self.change), format!("[{:+.1}%, {:+.1}%]", self.ci.0, self.ci.1))
        } else {
            (format!("{:+.3}", self.change), format!("[{:+.3}, {:+.3}]", self.ci.0, self.ci.1))
        };
        write!(
            f,
            "   {:<8} {:<26} {:<6} {:>11} {:>11} {:>9} {:>20}  {}{}",
            self.phase,
            self.figure,
            self.stat.as_str(),
            num(self.base),
            num(self.new),
            change,
            ci,
            self.verdict.as_str(),
            if self.paired { " (paired)" } else { "" }
        )
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "=== COMPARISON: BASE {} vs NEW {} ===", self.base, self.new)?;
        writeln!(f, "{}", self.method)?;
        writeln!(
            f,
            "   {:<8} {:<26} {:<6} {:>11} {:>11} {:>9} {:>20}  verdict",
            "phase", "figure", "stat", "base", "new", "change", "95% interval"
        )?;
        for m in &self.metrics {
            writeln!(f, "{m}")?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// The comparison as one self-contained HTML page: the table, then per phase the two runs'
/// forward-time distributions overlaid (SVG).
pub fn render_html(c: &Comparison, base: &RunData, new: &RunData) -> String {
    use std::fmt::Write as _;
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>profilemate compare</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}td.l,th.l{{text-align:left}}\
         .better{{color:#2ca02c}}.worse{{color:#d62728;font-weight:bold}}</style></head><body>\
         <h1>profilemate compare</h1><p>BASE <code>{}</code> vs NEW <code>{}</code></p><p>{}</p>\
         <table><tr><th class=\"l\">phase</th><th class=\"l\">figure</th><th class=\"l\">stat</th><th>base</th>\
         <th>new</th><th>change</th><th>95% interval</th><th class=\"l\">verdict</th></tr>",
        esc(&c.base),
        esc(&c.new),
        esc(&c.method)
    );
    for m in &c.metrics {
        let unit = if m.relative { "%" } else { "" };
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td>\
             <td>{:+.2}{unit}</td><td>[{:+.2}{unit}, {:+.2}{unit}]</td><td class=\"l {}\">{}</td></tr>",
            m.phase,
            m.figure,
            m.stat.as_str(),
            num(m.base),
            num(m.new),
            m.change,
            m.ci.0,
            m.ci.1,
            match m.verdict {
                Verdict::Better => "better",
                Verdict::Worse => "worse",
                _ => "",
            },
            m.verdict.as_str()
        );
    }
    h.push_str("</table>");
    for n in &c.notes {
        let _ = write!(h, "<p>note: {}</p>", esc(n));
    }
    for phase in Phase::ALL {
        let (b, _) = forward_samples(base, phase);
        let (n, _) = forward_samples(new, phase);
        if b.is_empty() || n.is_empty() {
            continue;
        }
        let _ = write!(h, "<h2>{} forward time: BASE and NEW overlaid</h2>{}", phase.as_str(), overlay_svg(&b, &n));
    }
    h.push_str("</body></html>\n");
    h
}

/// Two histograms on one axis, BASE blue and NEW orange, half transparent, as inline SVG. Hand
/// drawn: a few rectangles do not need the plotting library's font and backend set-up.
fn overlay_svg(base: &[f64], new: &[f64]) -> String {
    use std::fmt::Write as _;
    const W: f64 = 800.0;
    const H: f64 = 260.0;
    const BINS: usize = 50;
    let mut all: Vec<f64> = base.iter().chain(new).copied().collect();
    all.sort_by(f64::total_cmp);
    // The 99.5th percentile bounds the axis so a few outliers do not squash the distributions.
    let hi = all[((all.len() as f64 * 0.995) as usize).min(all.len() - 1)].max(all[0] + 1e-9);
    let lo = all[0];
    let width = (hi - lo) / BINS as f64;
    let hist = |v: &[f64]| {
        let mut c = vec![0f64; BINS];
        for &x in v {
            let i = (((x - lo) / width) as usize).min(BINS - 1);
            c[i] += 1.0;
        }
        let n = v.len() as f64;
        c.iter_mut().for_each(|x| *x /= n);
        c
    };
    let (hb, hn) = (hist(base), hist(new));
    let top = hb.iter().chain(&hn).copied().fold(0.0, f64::max).max(1e-9);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\">",
        H + 40.0,
        H + 40.0
    );
    for (h, color) in [(&hb, "#1f77b4"), (&hn, "#ff7f0e")] {
        for (i, &v) in h.iter().enumerate() {
            let bh = v / top * H;
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\" fill-opacity=\"0.5\"/>",
                i as f64 * W / BINS as f64,
                H - bh,
                W / BINS as f64,
                bh
            );
        }
    }
    let _ = write!(
        s,
        "<line x1=\"0\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\" stroke=\"#333\"/>\
         <text x=\"0\" y=\"{}\" font-size=\"13\">{lo:.3} ms</text>\
         <text x=\"{W}\" y=\"{}\" font-size=\"13\" text-anchor=\"end\">{hi:.3} ms</text>\
         <text x=\"{}\" y=\"{}\" font-size=\"13\" text-anchor=\"middle\">\
         <tspan fill=\"#1f77b4\">■ BASE ({} passes)</tspan> <tspan fill=\"#ff7f0e\">■ NEW ({} passes)</tspan></text></svg>",
        H + 16.0,
        H + 16.0,
        W / 2.0,
        H + 34.0,
        base.len(),
        new.len()
    );
    s
}
