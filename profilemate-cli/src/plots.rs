//! The seed's figures, drawn with plotters into PNG and SVG.
//!
//! Text is set in DejaVu Sans, embedded in this crate (`assets/DejaVuSans.ttf`, Bitstream Vera
//! license beside it) and registered with plotters' `ab_glyph` font backend, so drawing needs no
//! system font and no fontconfig. SVG files name the font family `sans-serif` and leave the
//! rendering to the viewer.
//!
//! Long runs are thinned for drawing: a series of more than [`MAX_POINTS`] points keeps, per
//! bucket of consecutive points, the lowest and the highest one, so spikes survive.

use crate::contract::EncoderDecoderSummary;
use crate::data::{Component, CudaGraphRow, GraphEvent, LifecycleEvent, Phase, RunData};
use crate::insights::Thresholds;
use crate::note::Note;
use crate::recompute;
use crate::report::{kv_usage_samples, usage_before};
use crate::ReportError;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Most points drawn per series; longer series are thinned to this many.
pub const MAX_POINTS: usize = 4000;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the embedded font as plotters' `sans-serif` (once per process).
fn ensure_font() -> Result<(), ReportError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        // Bold and italic fall back to the regular face, which is all the figures use.
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(ReportError::Plot {
            file: PathBuf::from("assets/DejaVuSans.ttf"),
            message: "the embedded font could not be loaded".into(),
        })
    }
}

/// One of the figures: the seed's seven, then one per tracker beyond the five profilers.
///
/// ```
/// use profilemate_cli::Figure;
/// assert_eq!(Figure::Throughput.file_stem(), "throughput_timeline");
/// assert_eq!(Figure::Throughput.size(), (1400, 600));
/// assert_eq!(Figure::ALL.len(), 12);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Figure {
    /// Throughput of each forward pass over time, one line per phase.
    Throughput,
    /// Histogram of decode forward times.
    DecodeLatency,
    /// Token utilization over time with the underutilization (50 %) and good (80 %) lines.
    TokenUtilization,
    /// Running and waiting queue lengths over time.
    QueueLengths,
    /// Preemption events over time.
    Preemptions,
    /// Share of component time: encoder, decoder, cross-attention.
    EncoderDecoderShare,
    /// Encoder and decoder durations over time.
    EncoderDecoderTimeline,
    /// KV-cache usage over time, with each preemption marked at the usage the cache had.
    KvCacheUsage,
    /// Steps per batch size, replayed from a CUDA graph or run eagerly, and the padding of the
    /// replays.
    CudaGraphs,
    /// Heat map of tokens per expert: layers by experts, colour = share of the layer's tokens.
    MoeExpertLoad,
    /// Where each phase's step time goes (the step breakdown tree), stacked bars in percent.
    StepBreakdown,
    /// Step time against tokens in the step, the slow steps coloured by their leading cause.
    SlowSteps,
}

impl Figure {
    /// Every figure, in the seed's order.
    pub const ALL: [Figure; 12] = [
        Figure::Throughput,
        Figure::DecodeLatency,
        Figure::TokenUtilization,
        Figure::QueueLengths,
        Figure::Preemptions,
        Figure::EncoderDecoderShare,
        Figure::EncoderDecoderTimeline,
        Figure::KvCacheUsage,
        Figure::CudaGraphs,
        Figure::MoeExpertLoad,
        Figure::StepBreakdown,
        Figure::SlowSteps,
    ];

    /// The file name without extension (the seed's names for the seed's figures).
    pub const fn file_stem(self) -> &'static str {
        match self {
            Figure::Throughput => "throughput_timeline",
            Figure::DecodeLatency => "decode_latency_dist",
            Figure::TokenUtilization => "token_utilization_timeline",
            Figure::QueueLengths => "queue_lengths",
            Figure::Preemptions => "preemption_timeline",
            Figure::EncoderDecoderShare => "encoder_decoder_breakdown",
            Figure::EncoderDecoderTimeline => "encoder_decoder_timeline",
            Figure::KvCacheUsage => "kv_cache_usage_timeline",
            Figure::CudaGraphs => "cuda_graph_batch_sizes",
            Figure::MoeExpertLoad => "moe_expert_load",
            Figure::StepBreakdown => "step_breakdown",
            Figure::SlowSteps => "slow_steps",
        }
    }

    /// The figure's title.
    pub const fn title(self) -> &'static str {
        match self {
            Figure::Throughput => "Forward Pass Throughput Over Time",
            Figure::DecodeLatency => "Decode Latency Distribution",
            Figure::TokenUtilization => "Batch Token Utilization Over Time",
            Figure::QueueLengths => "Request Queue Lengths Over Time",
            Figure::Preemptions => "Preemption Events Over Time",
            Figure::EncoderDecoderShare => "Model Component Time Distribution",
            Figure::EncoderDecoderTimeline => "Encoder vs Decoder Timing",
            Figure::KvCacheUsage => "KV Cache Usage and Preemptions Over Time",
            Figure::CudaGraphs => "CUDA Graph Replay vs Eager Steps per Batch Size",
            Figure::MoeExpertLoad => "MoE Expert Load: Share of Tokens per Layer",
            Figure::StepBreakdown => "Where Step Time Goes, per Phase",
            Figure::SlowSteps => "Step Time vs Tokens, Slow Steps by Cause",
        }
    }

    /// Width and height in pixels (the seed's figure sizes at 100 dpi).
    pub const fn size(self) -> (u32, u32) {
        match self {
            Figure::DecodeLatency => (1000, 600),
            Figure::EncoderDecoderShare => (800, 600),
            Figure::CudaGraphs => (1400, 800),
            _ => (1400, 600),
        }
    }

    /// Whether `data` has what the figure needs; `Err` says what is missing.
    fn available(self, data: &RunData) -> Result<(), String> {
        let need = |present: bool, file: &str| if present { Ok(()) } else { Err(format!("no {file}")) };
        match self {
            Figure::Throughput => need(data.forward_pass.is_some(), "forward_pass_timing.csv"),
            Figure::DecodeLatency => {
                need(data.forward_pass.is_some(), "forward_pass_timing.csv")?;
                let any = data.forward_pass.iter().flatten().any(|r| r.phase == Phase::Decode);
                if any {
                    Ok(())
                } else {
                    Err("no decode passes in forward_pass_timing.csv".into())
                }
            }
            Figure::TokenUtilization | Figure::QueueLengths => need(data.batch.is_some(), "batch_utilization.csv"),
            Figure::Preemptions => need(data.preemption_events.is_some(), "preemption_events.csv"),
            Figure::EncoderDecoderShare => need(
                data.encoder_decoder_summary.is_some() || data.components.is_some(),
                "encoder_decoder_summary.json or encoder_decoder_timing.csv",
            ),
            Figure::EncoderDecoderTimeline => need(data.components.is_some(), "encoder_decoder_timing.csv"),
            Figure::KvCacheUsage => need(data.kv_cache.is_some(), "kv_cache_usage.csv"),
            Figure::CudaGraphs => need(data.cuda_graph.is_some(), "cuda_graph_events.csv"),
            Figure::MoeExpertLoad => need(
                data.moe_expert_summary.is_some() || data.moe_routing.is_some(),
                "moe_expert_summary.json or moe_expert_routing.csv",
            ),
            Figure::StepBreakdown | Figure::SlowSteps => {
                need(data.step_timeline.as_ref().is_some_and(|r| !r.is_empty()), "step_timeline.csv (with steps)")
            }
        }
    }

    /// The figures `data` can give, and a "skipped" note for each other one.
    ///
    /// ```
    /// use profilemate_cli::{Figure, RunData};
    /// let (figures, skipped) = Figure::available_in(&RunData::default());
    /// assert!(figures.is_empty());
    /// assert_eq!(skipped.len(), 12);
    /// ```
    pub fn available_in(data: &RunData) -> (Vec<Figure>, Vec<Note>) {
        let mut figures = Vec::new();
        let mut notes = Vec::new();
        for fig in Figure::ALL {
            match fig.available(data) {
                Ok(()) => figures.push(fig),
                Err(why) => notes.push(Note::skipped(format!("{} plot: {why}", fig.file_stem()))),
            }
        }
        (figures, notes)
    }

    /// The figure as an SVG document.
    ///
    /// # Errors
    ///
    /// [`ReportError::Plot`] when `data` lacks what the figure needs or drawing fails.
    pub fn to_svg(self, data: &RunData) -> Result<String, ReportError> {
        ensure_font()?;
        let file = PathBuf::from(format!("{}.svg", self.file_stem()));
        self.available(data).map_err(|message| ReportError::Plot { file: file.clone(), message })?;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, self.size()).into_drawing_area();
            self.draw(data, &root).map_err(|message| ReportError::Plot { file: file.clone(), message })?;
            root.present().map_err(|e| ReportError::Plot { file, message: e.to_string() })?;
        }
        Ok(svg)
    }

    /// Draws the figure into a PNG file.
    ///
    /// # Errors
    ///
    /// [`ReportError::Plot`] when `data` lacks what the figure needs, or drawing or writing the
    /// file fails.
    pub fn write_png(self, data: &RunData, path: &Path) -> Result<(), ReportError> {
        ensure_font()?;
        let err = |message: String| ReportError::Plot { file: path.to_path_buf(), message };
        self.available(data).map_err(err)?;
        let root = BitMapBackend::new(path, self.size()).into_drawing_area();
        self.draw(data, &root).map_err(err)?;
        root.present().map_err(|e| err(e.to_string()))
    }

    fn draw<DB: DrawingBackend>(self, data: &RunData, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        match self {
            Figure::Throughput => {
                let rows = data.forward_pass.as_deref().unwrap_or_default();
                let all: Vec<f64> = rows.iter().map(|r| r.timestamp_sec).collect();
                let series = Phase::ALL
                    .iter()
                    .enumerate()
                    .map(|(i, &phase)| {
                        let points: Vec<(f64, f64)> = rows
                            .iter()
                            .filter(|r| r.phase == phase)
                            .filter_map(|r| r.throughput_tokens_per_sec.map(|t| (r.timestamp_sec, t)))
                            .collect();
                        // A phase whose passes are far apart (a few prefill steps seconds apart) is
                        // drawn as points: a line would join them across the gaps.
                        let kind = if sparse(&points, &all) { SeriesKind::Points } else { SeriesKind::Line };
                        Series { label: phase.as_str().to_string(), color: PALETTE[i], points, kind }
                    })
                    .filter(|s| !s.points.is_empty())
                    .collect::<Vec<_>>();
                xy_chart(
                    root,
                    self.title(),
                    "Time (s)",
                    "Throughput (tokens/s)",
                    &series,
                    &[],
                    None,
                    None,
                    YAxis::Plain,
                )
            }
            Figure::DecodeLatency => {
                let times: Vec<f64> = data
                    .forward_pass
                    .iter()
                    .flatten()
                    .filter(|r| r.phase == Phase::Decode)
                    .map(|r| r.forward_time_ms)
                    .collect();
                histogram(root, self.title(), "Forward time (ms)", "Frequency (passes)", &times, 50)
            }
            Figure::TokenUtilization => {
                let rows = data.batch.as_deref().unwrap_or_default();
                let points: Vec<(f64, f64)> =
                    rows.iter().filter_map(|r| r.token_utilization_pct.map(|u| (r.timestamp_sec, u))).collect();
                let threshold = data.batch_summary.as_ref().map_or(50.0, |s| s.underutilization_threshold_pct);
                let series =
                    [Series { label: "Token utilization".into(), color: PALETTE[0], points, kind: SeriesKind::Line }];
                let lines = [
                    HLine {
                        y: threshold,
                        label: format!("Underutilization threshold ({threshold:.0}%)"),
                        color: RED_LINE,
                    },
                    HLine { y: 80.0, label: "Good utilization (80%)".into(), color: GREEN_LINE },
                ];
                xy_chart(
                    root,
                    self.title(),
                    "Time (s)",
                    "Token utilization (%)",
                    &series,
                    &lines,
                    Some((0.0, 100.0)),
                    None,
                    YAxis::Plain,
                )
            }
            Figure::QueueLengths => {
                let rows = data.batch.as_deref().unwrap_or_default();
                let series = [
                    Series {
                        label: "Running".into(),
                        color: PALETTE[0],
                        points: rows.iter().map(|r| (r.timestamp_sec, r.running_queue_len as f64)).collect(),
                        kind: SeriesKind::Line,
                    },
                    Series {
                        label: "Waiting".into(),
                        color: PALETTE[1],
                        points: rows.iter().map(|r| (r.timestamp_sec, r.waiting_queue_len as f64)).collect(),
                        kind: SeriesKind::Line,
                    },
                ];
                xy_chart(
                    root,
                    self.title(),
                    "Time (s)",
                    "Queue length (requests)",
                    &series,
                    &[],
                    None,
                    None,
                    YAxis::Count,
                )
            }
            Figure::Preemptions => {
                let rows = data.preemption_events.as_deref().unwrap_or_default();
                let points: Vec<(f64, f64)> = rows
                    .iter()
                    .filter(|r| r.event == LifecycleEvent::Preempted)
                    .enumerate()
                    .map(|(i, r)| (r.timestamp_sec, i as f64))
                    .collect();
                let empty = points.is_empty().then_some("No preemptions recorded");
                let x_max = rows.iter().map(|r| r.timestamp_sec).fold(0.0, f64::max);
                let series =
                    [Series { label: "Preemption".into(), color: PALETTE[3], points, kind: SeriesKind::Points }];
                xy_chart(
                    root,
                    self.title(),
                    "Time (s)",
                    "Preemption event #",
                    &series,
                    &[],
                    None,
                    empty.map(|m| (m, x_max)),
                    YAxis::Count,
                )
            }
            Figure::EncoderDecoderShare => {
                let summary = match (&data.encoder_decoder_summary, &data.components) {
                    (Some(s), _) => s.clone(),
                    (None, Some(rows)) => recompute::encoder_decoder(rows),
                    (None, None) => return Err("no component data".into()),
                };
                share_bars(root, &summary)
            }
            Figure::EncoderDecoderTimeline => {
                let rows = data.components.as_deref().unwrap_or_default();
                let series = Component::ALL
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| Series {
                        label: match c {
                            Component::Encoder => "Encoder".into(),
                            Component::Decoder => "Decoder".into(),
                            Component::CrossAttention => "Cross-attention".into(),
                        },
                        color: PALETTE[i],
                        points: rows
                            .iter()
                            .filter(|r| r.component == c)
                            .map(|r| (r.timestamp_sec, r.duration_ms))
                            .collect(),
                        kind: SeriesKind::Line,
                    })
                    .filter(|s| !s.points.is_empty())
                    .collect::<Vec<_>>();
                let empty = series.is_empty().then_some(("No component time recorded", 1.0));
                xy_chart(root, self.title(), "Time (s)", "Duration (ms)", &series, &[], None, empty, YAxis::Plain)
            }
            Figure::KvCacheUsage => {
                let rows = data.kv_cache.as_deref().unwrap_or_default();
                let samples = kv_usage_samples(rows);
                let near_full = Thresholds::default().kv_near_full_pct;
                let preemptions: Vec<(f64, f64)> = if samples.is_empty() {
                    Vec::new()
                } else {
                    data.preemption_events
                        .iter()
                        .flatten()
                        .filter(|e| e.event == LifecycleEvent::Preempted)
                        .map(|e| (e.timestamp_sec, usage_before(&samples, e.timestamp_sec)))
                        .collect()
                };
                let label = if data.preemption_events.is_some() {
                    format!("Preemption ({}), at the usage of the sample before it", preemptions.len())
                } else {
                    "Preemption (no preemption_events.csv)".into()
                };
                let empty = samples.is_empty().then_some(("No KV-cache usage recorded", 1.0));
                let series = [
                    Series {
                        label: "KV-cache usage".into(),
                        color: PALETTE[0],
                        points: samples,
                        kind: SeriesKind::Line,
                    },
                    Series { label, color: RED_LINE, points: preemptions, kind: SeriesKind::Markers },
                ];
                let lines = [HLine { y: near_full, label: format!("Near full ({near_full:.0}%)"), color: PALETTE[1] }];
                xy_chart(
                    root,
                    self.title(),
                    "Time (s)",
                    "KV-cache usage (%)",
                    &series,
                    &lines,
                    Some((0.0, 130.0)),
                    empty,
                    YAxis::Percent,
                )
            }
            Figure::CudaGraphs => graph_batches(root, data.cuda_graph.as_deref().unwrap_or_default()),
            Figure::StepBreakdown => {
                let rows = data.step_timeline.as_deref().unwrap_or_default();
                step_breakdown(root, self.title(), &crate::breakdown::Breakdown::of(rows))
            }
            Figure::SlowSteps => {
                let rows = data.step_timeline.as_deref().unwrap_or_default();
                slow_steps(root, self.title(), rows)
            }
            Figure::MoeExpertLoad => {
                let summary = match (&data.moe_expert_summary, &data.moe_routing) {
                    (Some(s), _) => s.clone(),
                    (None, Some(rows)) => recompute::moe_expert(rows),
                    (None, None) => return Err("no MoE routing data".into()),
                };
                let mut layers: Vec<(String, Vec<u64>)> =
                    summary.layers.into_iter().map(|(l, s)| (l, s.tokens_per_expert)).collect();
                layers.sort_by(|a, b| match (a.0.parse::<u64>(), b.0.parse::<u64>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    _ => a.0.cmp(&b.0),
                });
                heat_map(root, self.title(), &layers)
            }
        }
    }
}

/// What [`write_plots`] wrote and skipped.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct PlotOutput {
    /// The files written, PNG then SVG for each figure.
    pub files: Vec<PathBuf>,
    /// A "skipped" note for each figure whose data is missing.
    pub notes: Vec<Note>,
}

/// Writes `STEM.png` and `STEM.svg` of every figure `data` can give into `outdir` (created if
/// needed).
///
/// ```
/// use profilemate_cli::{write_plots, RunData};
/// let run = tempfile::tempdir()?;
/// std::fs::write(
///     run.path().join("forward_pass_timing.csv"),
///     "timestamp_sec,phase,batch_size,num_tokens,forward_time_ms,throughput_tokens_per_sec\n\
///      0.000000,decode,4,4,2.000,2000.000\n0.010000,decode,4,4,4.000,1000.000\n",
/// )?;
/// let out = tempfile::tempdir()?;
/// let written = write_plots(&RunData::load(run.path())?, out.path())?;
/// assert_eq!(written.files.len(), 4); // throughput and decode latency, PNG and SVG
/// assert!(out.path().join("decode_latency_dist.png").exists());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`ReportError::Io`] when `outdir` cannot be created or a file written, [`ReportError::Plot`]
/// when drawing fails.
pub fn write_plots(data: &RunData, outdir: &Path) -> Result<PlotOutput, ReportError> {
    std::fs::create_dir_all(outdir).map_err(|e| ReportError::io(outdir, e))?;
    let (figures, notes) = Figure::available_in(data);
    let mut files = Vec::new();
    for fig in figures {
        let png = outdir.join(format!("{}.png", fig.file_stem()));
        fig.write_png(data, &png)?;
        files.push(png);
        let svg_path = outdir.join(format!("{}.svg", fig.file_stem()));
        let svg = fig.to_svg(data)?;
        std::fs::write(&svg_path, svg).map_err(|e| ReportError::io(&svg_path, e))?;
        files.push(svg_path);
    }
    Ok(PlotOutput { files, notes })
}

// matplotlib's tab10, so the figures look like the seed's.
const PALETTE: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];
const RED_LINE: RGBColor = RGBColor(214, 39, 40);
const GREEN_LINE: RGBColor = RGBColor(44, 160, 44);

const LIGHT_GRID: RGBColor = RGBColor(244, 244, 244);
const TITLE_SIZE: u32 = 26;
const LABEL_SIZE: u32 = 15;
const DESC_SIZE: u32 = 17;

enum SeriesKind {
    Line,
    Points,
    /// Event markers (triangles) over a line.
    Markers,
}

struct Series {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    kind: SeriesKind,
}

struct HLine {
    y: f64,
    label: String,
    color: RGBColor,
}

/// Whether a series is sparse against all passes: its median gap between consecutive points is
/// over 20 times the median gap between any two consecutive passes.
fn sparse(points: &[(f64, f64)], all_times: &[f64]) -> bool {
    fn median_gap(t: impl Iterator<Item = f64>) -> Option<f64> {
        let t: Vec<f64> = t.collect();
        let mut gaps: Vec<f64> = t.windows(2).map(|w| (w[1] - w[0]).abs()).collect();
        if gaps.is_empty() {
            return None;
        }
        gaps.sort_by(f64::total_cmp);
        Some(gaps[gaps.len() / 2])
    }
    match (median_gap(points.iter().map(|p| p.0)), median_gap(all_times.iter().copied())) {
        (Some(mine), Some(all)) => mine > 20.0 * all.max(1e-9),
        // One point alone: a point.
        (None, _) => true,
        _ => false,
    }
}

/// Colours of the breakdown's parts and of the slow-step causes.
const PARTS_PALETTE: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn step_breakdown<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    b: &crate::breakdown::Breakdown,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let phases = &b.phases;
    let n = phases.len() as i32;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", TITLE_SIZE))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(85)
        // Headroom above 100 % for the legend.
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..135.0)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("Phase (steps)")
        .y_desc("Share of step time (%)")
        .y_label_formatter(&|v| if *v <= 100.0 { tick(v) } else { String::new() })
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => {
                phases.get(*i as usize).map_or(String::new(), |p| format!("{} ({})", p.phase, p.steps))
            }
            _ => String::new(),
        })
        .label_style(("sans-serif", LABEL_SIZE))
        .axis_desc_style(("sans-serif", DESC_SIZE))
        .light_line_style(LIGHT_GRID)
        .draw()
        .map_err(e)?;
    let names: Vec<&'static str> = phases.first().map(|p| p.parts.iter().map(|x| x.name).collect()).unwrap_or_default();
    for (k, name) in names.iter().enumerate() {
        let color = PARTS_PALETTE[k % PARTS_PALETTE.len()];
        chart
            .draw_series(phases.iter().enumerate().map(|(i, p)| {
                let below: f64 = p.parts[..k].iter().map(|x| x.pct).sum::<f64>().min(100.0);
                let top = (below + p.parts[k].pct).min(100.0);
                let i = i as i32;
                let mut bar = Rectangle::new(
                    [(SegmentValue::Exact(i), below), (SegmentValue::Exact(i + 1), top)],
                    color.filled(),
                );
                bar.set_margin(0, 0, 25, 25);
                bar
            }))
            .map_err(e)?
            .label(crate::breakdown::label(name).to_string())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", LABEL_SIZE))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(120, 120, 120))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(e)?;
    Ok(())
}

fn slow_steps<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    rows: &[crate::timeline::StepRow],
) -> Result<(), String> {
    use crate::slow_steps::{step_time_ms, Condition, SlowSteps};
    let slow = SlowSteps::of(rows);
    let mut cause: std::collections::HashMap<u64, Option<Condition>> = std::collections::HashMap::new();
    for p in &slow.phases {
        cause.extend(p.tail.iter().copied());
    }
    let point = |r: &crate::timeline::StepRow| (r.num_tokens.unwrap_or(0) as f64, step_time_ms(r));
    let mut series = vec![Series {
        label: "ordinary step".into(),
        color: RGBColor(170, 170, 170),
        points: rows.iter().filter(|r| !cause.contains_key(&r.step)).map(point).collect(),
        kind: SeriesKind::Points,
    }];
    for (k, c) in Condition::ALL.iter().enumerate() {
        let points: Vec<(f64, f64)> =
            rows.iter().filter(|r| cause.get(&r.step) == Some(&Some(*c))).map(point).collect();
        if !points.is_empty() {
            series.push(Series {
                label: format!("slow: {}", c.describe()),
                color: PARTS_PALETTE[k % PARTS_PALETTE.len()],
                points,
                kind: SeriesKind::Points,
            });
        }
    }
    let unexplained: Vec<(f64, f64)> = rows.iter().filter(|r| cause.get(&r.step) == Some(&None)).map(point).collect();
    if !unexplained.is_empty() {
        series.push(Series {
            label: "slow: no recorded cause".into(),
            color: BLACK,
            points: unexplained,
            kind: SeriesKind::Points,
        });
    }
    xy_chart(
        root,
        title,
        "Tokens in the step",
        "Step time: host gap + wall (ms)",
        &series,
        &[],
        None,
        None,
        YAxis::Plain,
    )
}

/// Keeps the lowest and the highest point of each bucket, in their order, so a long series
/// keeps its shape and its spikes.
fn thin(points: &[(f64, f64)], max_points: usize) -> Vec<(f64, f64)> {
    if points.len() <= max_points || max_points < 2 {
        return points.to_vec();
    }
    let per_bucket = points.len().div_ceil(max_points / 2);
    let mut out = Vec::with_capacity(max_points);
    for chunk in points.chunks(per_bucket) {
        let (mut lo, mut hi) = (0, 0);
        for (i, p) in chunk.iter().enumerate() {
            if p.1 < chunk[lo].1 {
                lo = i;
            }
            if p.1 > chunk[hi].1 {
                hi = i;
            }
        }
        out.push(chunk[lo.min(hi)]);
        if lo != hi {
            out.push(chunk[lo.max(hi)]);
        }
    }
    out
}

/// A tick label without trailing zeros: `18000`, `0.05`, `12.5`.
fn tick(v: &f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Tick labels of a count axis: whole numbers only.
fn whole_tick(v: &f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        String::new()
    }
}

/// Tick labels of a percent axis drawn above 100 to make room for the legend: none above 100.
fn pct_tick(v: &f64) -> String {
    if *v > 100.0 {
        String::new()
    } else {
        tick(v)
    }
}

/// What the y axis of an [`xy_chart`] counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum YAxis {
    /// Any quantity.
    Plain,
    /// Whole numbers: labels only at integers, at least 0..5.
    Count,
    /// A percentage: no labels above 100, where the legend sits.
    Percent,
}

/// `0..max` with head room; never empty.
fn upper(max: f64) -> f64 {
    if max.is_finite() && max > 0.0 {
        max * 1.08
    } else {
        1.0
    }
}

#[allow(clippy::too_many_arguments)]
fn xy_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    hlines: &[HLine],
    y_range: Option<(f64, f64)>,
    empty_message: Option<(&str, f64)>,
    y_axis: YAxis,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x_max = upper(all().map(|p| p.0).fold(empty_message.map_or(0.0, |m| m.1), f64::max));
    let (y_min, y_max) = y_range.unwrap_or_else(|| {
        let top = all().map(|p| p.1).chain(hlines.iter().map(|h| h.y)).fold(0.0, f64::max);
        let top = upper(top);
        (0.0, if y_axis == YAxis::Count { top.max(5.0) } else { top })
    });
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", TITLE_SIZE))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(85)
        .build_cartesian_2d(0.0..x_max, y_min..y_max)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&tick)
        .y_label_formatter(match y_axis {
            YAxis::Plain => &tick,
            YAxis::Count => &whole_tick,
            YAxis::Percent => &pct_tick,
        })
        .label_style(("sans-serif", LABEL_SIZE))
        .axis_desc_style(("sans-serif", DESC_SIZE))
        .light_line_style(LIGHT_GRID)
        .draw()
        .map_err(e)?;
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        let color = s.color;
        let points = thin(&s.points, MAX_POINTS);
        match s.kind {
            SeriesKind::Line => {
                // Markers too where points are few, so a lone point (one prefill) still shows.
                // Dense lines are drawn 1 px wide: wider polylines get miter spikes at sharp turns
                // that reach out of the plotting area.
                let sparse = points.len() <= 500;
                if sparse {
                    chart.draw_series(points.iter().map(|&p| Circle::new(p, 2, color.filled()))).map_err(e)?;
                }
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(if sparse { 2 } else { 1 })))
                    .map_err(e)?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
            }
            SeriesKind::Points => {
                chart
                    .draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.mix(0.6).filled())))
                    .map_err(e)?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| Circle::new((x + 12, y), 4, color.mix(0.6).filled()));
            }
            SeriesKind::Markers => {
                chart
                    .draw_series(points.into_iter().map(|p| TriangleMarker::new(p, 6, color.mix(0.75).filled())))
                    .map_err(e)?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| TriangleMarker::new((x + 12, y), 6, color.mix(0.75).filled()));
            }
        }
    }
    for h in hlines {
        let color = h.color;
        chart
            .draw_series(DashedLineSeries::new([(0.0, h.y), (x_max, h.y)], 10, 6, color.stroke_width(2)))
            .map_err(e)?
            .label(h.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2)));
    }
    if let Some((message, _)) = empty_message {
        let (w, h) = root.dim_in_pixel();
        let style = TextStyle::from(("sans-serif", 22).into_font())
            .color(&RGBColor(90, 90, 90))
            .pos(Pos::new(HPos::Center, VPos::Center));
        root.draw(&Text::new(message, (w as i32 / 2, h as i32 / 2), style)).map_err(e)?;
    }
    if series.iter().any(|s| !s.points.is_empty()) || !hlines.is_empty() {
        chart
            .configure_series_labels()
            .label_font(("sans-serif", LABEL_SIZE))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(120, 120, 120))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(e)?;
    }
    Ok(())
}

fn histogram<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    values: &[f64],
    bins: usize,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi - lo < 1e-9 {
        ((lo - 0.5).max(0.0), lo + 0.5)
    } else {
        (lo, hi)
    };
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0u64; bins];
    for &v in values {
        let i = (((v - lo) / width) as usize).min(bins - 1);
        counts[i] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0) as f64;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", TITLE_SIZE))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(85)
        .build_cartesian_2d(lo..hi, 0.0..upper(top))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&tick)
        .y_label_formatter(&whole_tick)
        .label_style(("sans-serif", LABEL_SIZE))
        .axis_desc_style(("sans-serif", DESC_SIZE))
        .light_line_style(LIGHT_GRID)
        .draw()
        .map_err(e)?;
    let color = PALETTE[0];
    chart
        .draw_series(counts.iter().enumerate().filter(|(_, &n)| n > 0).map(|(i, &n)| {
            let x0 = lo + width * i as f64;
            let mut bar = Rectangle::new([(x0, 0.0), (x0 + width, n as f64)], color.filled());
            bar.set_margin(0, 0, 1, 1);
            bar
        }))
        .map_err(e)?;
    Ok(())
}

fn share_bars<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &EncoderDecoderSummary) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let bars = [
        ("Encoder", s.encoder_pct, s.encoder.mean_ms, s.encoder.count),
        ("Decoder", s.decoder_pct, s.decoder.mean_ms, s.decoder.count),
        ("Cross-attention", s.cross_attention_pct, s.cross_attention.mean_ms, s.cross_attention.count),
    ];
    let title = format!("{}: {}", Figure::EncoderDecoderShare.title(), s.model_type);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", TITLE_SIZE))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(85)
        .build_cartesian_2d((0..bars.len() as i32 - 1).into_segmented(), 0.0..110.0)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("Component")
        .y_desc("Share of component time (%)")
        .y_label_formatter(&tick)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i as usize).map_or(String::new(), |b| b.0.to_string()),
            _ => String::new(),
        })
        .label_style(("sans-serif", LABEL_SIZE))
        .axis_desc_style(("sans-serif", DESC_SIZE))
        .light_line_style(LIGHT_GRID)
        .draw()
        .map_err(e)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let i = i as i32;
            let mut bar = Rectangle::new(
                [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), b.1)],
                PALETTE[i as usize].filled(),
            );
            bar.set_margin(0, 0, 30, 30);
            bar
        }))
        .map_err(e)?;
    let label_style = TextStyle::from(("sans-serif", LABEL_SIZE).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let text = if b.3 == 0 { format!("{:.1}%", b.1) } else { format!("{:.1}% (mean {:.2} ms)", b.1, b.2) };
            Text::new(text, (SegmentValue::CenterOf(i as i32), b.1 + 2.0), label_style.clone())
        }))
        .map_err(e)?;
    Ok(())
}

/// Replayed and eager steps per batch size (stacked bars) above the mean padding of the
/// replays at each batch size, on one batch-size axis.
fn graph_batches<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, rows: &[CudaGraphRow]) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    // Per batch size: replays, eager steps, summed padding percent of the replays.
    let mut per_size: std::collections::BTreeMap<u64, (u64, u64, f64)> = std::collections::BTreeMap::new();
    let mut captured: Vec<u64> = Vec::new();
    let (mut replays, mut padded_replays, mut padding_sum) = (0u64, 0u64, 0.0f64);
    for r in rows {
        match r.event {
            GraphEvent::Capture => captured.push(r.batch_size),
            GraphEvent::Replay => {
                let entry = per_size.entry(r.batch_size).or_default();
                entry.0 += 1;
                replays += 1;
                if let Some(p) = r.padded_batch_size.filter(|p| *p > 0) {
                    let pad = p.saturating_sub(r.batch_size) as f64 / p as f64 * 100.0;
                    entry.2 += pad;
                    padding_sum += pad;
                    padded_replays += 1;
                }
            }
            GraphEvent::Eager => per_size.entry(r.batch_size).or_default().1 += 1,
        }
    }
    let largest = captured.iter().copied().max();
    let x_max = per_size.keys().copied().chain(largest).max().unwrap_or(1) as f64 + 1.0;
    let top_count = per_size.values().map(|v| v.0 + v.1).max().unwrap_or(0) as f64;
    let mean_padding = if padded_replays == 0 { 0.0 } else { padding_sum / padded_replays as f64 };

    let area = root.margin(14, 0, 0, 0).titled(Figure::CudaGraphs.title(), ("sans-serif", TITLE_SIZE)).map_err(e)?;
    let (_, h) = area.dim_in_pixel();
    let (upper_area, lower_area) = area.split_vertically((h as f64 * 0.62) as u32);

    let mut chart = ChartBuilder::on(&upper_area)
        .margin(20)
        .margin_top(8)
        .x_label_area_size(45)
        .y_label_area_size(85)
        .build_cartesian_2d(0.0..x_max, 0.0..upper(top_count).max(5.0))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("Batch size (sequences)")
        .y_desc("Steps")
        .x_label_formatter(&whole_tick)
        .y_label_formatter(&whole_tick)
        .label_style(("sans-serif", LABEL_SIZE))
        .axis_desc_style(("sans-serif", DESC_SIZE))
        .light_line_style(LIGHT_GRID)
        .draw()
        .map_err(e)?;
    let (replay_color, eager_color) = (PALETTE[0], PALETTE[1]);
    chart
        .draw_series(per_size.iter().filter(|(_, v)| v.0 > 0).map(|(&b, v)| {
            Rectangle::new([(b as f64 - 0.4, 0.0), (b as f64 + 0.4, v.0 as f64)], replay_color.filled())
        }))
        .map_err(e)?
        .label(format!("Replayed a graph ({replays} steps)"))
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], replay_color.filled()));
    chart
        .draw_series(per_size.iter().filter(|(_, v)| v.1 > 0).map(|(&b, v)| {
            Rectangle::new([(b as f64 - 0.4, v.0 as f64), (b as f64 + 0.4, (v.0 + v.1) as f64)], eager_color.filled())
        }))
        .map_err(e)?
        .label(format!("Ran eagerly ({} steps)", per_size.values().map(|v| v.1).sum::<u64>()))
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], eager_color.filled()));
    if let Some(l) = largest {
        let y_top = upper(top_count).max(5.0);
        chart
            .draw_series(DashedLineSeries::new([(l as f64, 0.0), (l as f64, y_top)], 8, 5, RED_LINE.stroke_width(2)))
            .map_err(e)?
            .label(format!("Largest captured graph ({l}); {} sizes captured", captured.len()))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], RED_LINE.stroke_width(2)));
    }
    if per_size.is_empty() {
        let (w, h) = upper_area.dim_in_pixel();
        let style = TextStyle::from(("sans-serif", 22).into_font())
            .color(&RGBColor(90, 90, 90))
            .pos(Pos::new(HPos::Center, VPos::Center));
        upper_area
            .draw(&Text::new("No replayed or eager steps recorded", (w as i32 / 2, h as i32 / 2), style))
            .map_err(e)?;
    } else {
        chart
            .configure_series_labels()
            .label_font(("sans-serif", LABEL_SIZE))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(120, 120, 120))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(e)?;
    }

    // Replays without a recorded padded size have no padding to show.
    let mut padded_per_size: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    for r in rows.iter().filter(|r| r.event == GraphEvent::Replay && r.padded_batch_size.is_some_and(|p| p > 0)) {
        *padded_per_size.entry(r.batch_size).or_default() += 1;
    }
    let padding: Vec<(u64, f64)> =
        per_size.iter().filter_map(|(&b, v)| padded_per_size.get(&b).map(|&n| (b, v.2 / n as f64))).collect();
    let top_pad = padding.iter().map(|p| p.1).fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(&lower_area)
        .margin(20)
        .margin_top(5)
        .x_label_area_size(45)
        .y_label_area_size(85)
        .build_cartesian_2d(0.0..x_max, 0.0..upper(top_pad.max(10.0)))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("Batch size (sequences)")
        .y_desc("Padding (%)")
        .x_label_formatter(&whole_tick)
        .y_label_formatter(&tick)
        .label_style(("sans-serif", LABEL_SIZE))
        .axis_desc_style(("sans-serif", DESC_SIZE))
        .light_line_style(LIGHT_GRID)
        .draw()
        .map_err(e)?;
    let pad_color = PALETTE[2];
    chart
        .draw_series(
            padding
                .iter()
                .map(|&(b, p)| Rectangle::new([(b as f64 - 0.4, 0.0), (b as f64 + 0.4, p)], pad_color.filled())),
        )
        .map_err(e)?
        .label(format!("Mean padding of a replay at this batch size (all replays: {mean_padding:.1}%)"))
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], pad_color.filled()));
    // Padding drops to zero at each captured size: mark them on the axis.
    if !captured.is_empty() {
        chart
            .draw_series(captured.iter().map(|&c| TriangleMarker::new((c as f64, 0.0), 7, RED_LINE.filled())))
            .map_err(e)?
            .label("Captured graph size")
            .legend(|(x, y)| TriangleMarker::new((x + 9, y), 6, RED_LINE.filled()));
    }
    if !padding.is_empty() || !captured.is_empty() {
        chart
            .configure_series_labels()
            .label_font(("sans-serif", LABEL_SIZE))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(120, 120, 120))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(e)?;
    }
    Ok(())
}

// matplotlib's viridis at nine stops: dark (little load) to yellow (most load), readable in grey
// and by the colour-blind.
const VIRIDIS: [(u8, u8, u8); 9] = [
    (68, 1, 84),
    (72, 40, 120),
    (62, 73, 137),
    (49, 104, 142),
    (38, 130, 142),
    (31, 158, 137),
    (53, 183, 121),
    (110, 206, 88),
    (253, 231, 37),
];

/// The colour of `t` in 0..=1 on the viridis scale.
fn viridis(t: f64) -> RGBColor {
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (VIRIDIS.len() - 1) as f64;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Layers (rows, the first on top) by experts (columns); each cell's colour is the expert's
/// share of its layer's tokens, on a scale from 0 to the largest share, shown by a colour bar.
fn heat_map<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    layers: &[(String, Vec<u64>)],
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let experts = layers.iter().map(|l| l.1.len()).max().unwrap_or(0);
    let shares: Vec<Vec<f64>> = layers
        .iter()
        .map(|(_, tokens)| {
            let total: u64 = tokens.iter().sum();
            tokens.iter().map(|&t| if total == 0 { 0.0 } else { t as f64 / total as f64 * 100.0 }).collect()
        })
        .collect();
    let top = shares.iter().flatten().copied().fold(0.0, f64::max);
    let scale = if top > 0.0 { top } else { 1.0 };

    let area = root.margin(14, 0, 0, 0).titled(title, ("sans-serif", TITLE_SIZE)).map_err(e)?;
    if layers.is_empty() || experts == 0 {
        let (w, h) = area.dim_in_pixel();
        let style = TextStyle::from(("sans-serif", 22).into_font())
            .color(&RGBColor(90, 90, 90))
            .pos(Pos::new(HPos::Center, VPos::Center));
        return area.draw(&Text::new("No MoE routing recorded", (w as i32 / 2, h as i32 / 2), style)).map_err(e);
    }
    let (w, _) = area.dim_in_pixel();
    let (cells_area, bar_area) = area.split_horizontally(w.saturating_sub(150));

    // Cell (expert x, row r) spans x - 0.5 ..= x + 0.5 and r - 0.5 ..= r + 0.5, so whole
    // numbers sit at the cells' centres, where their tick labels go. Row r (from the bottom)
    // shows layer n_layers - 1 - r: the first layer is on top.
    let (n_layers, n_experts) = (layers.len(), experts);
    let row_of = |k: usize| (n_layers - 1 - k) as f64;
    let mut chart = ChartBuilder::on(&cells_area)
        .margin(20)
        .margin_top(8)
        .x_label_area_size(55)
        .y_label_area_size(85)
        .build_cartesian_2d(-0.5..n_experts as f64 - 0.5, -0.5..n_layers as f64 - 0.5)
        .map_err(e)?;
    let layer_of_row = |v: &f64| {
        let r = v.round();
        if (v - r).abs() > 1e-9 || r < 0.0 || r >= n_layers as f64 {
            return String::new();
        }
        layers[n_layers - 1 - r as usize].0.clone()
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("Expert")
        .y_desc("Layer")
        .x_labels((n_experts + 1).min(33))
        .y_labels((n_layers + 1).min(41))
        .x_label_formatter(&whole_tick)
        .y_label_formatter(&layer_of_row)
        .label_style(("sans-serif", LABEL_SIZE))
        .axis_desc_style(("sans-serif", DESC_SIZE))
        .draw()
        .map_err(e)?;
    chart
        .draw_series(shares.iter().enumerate().flat_map(|(k, row)| {
            let r = row_of(k);
            (0..n_experts).map(move |x| {
                let share = row.get(x).copied().unwrap_or(0.0);
                let x = x as f64;
                Rectangle::new([(x - 0.5, r - 0.5), (x + 0.5, r + 0.5)], viridis(share / scale).filled())
            })
        }))
        .map_err(e)?;
    // The share in each cell, where cells are large enough to hold it.
    let (pw, ph) = chart.plotting_area().dim_in_pixel();
    let (cell_w, cell_h) = (f64::from(pw) / n_experts as f64, f64::from(ph) / n_layers as f64);
    if cell_w >= 44.0 && cell_h >= 20.0 {
        let style = |dark: bool| {
            TextStyle::from(("sans-serif", 13).into_font())
                .color(if dark { &BLACK } else { &WHITE })
                .pos(Pos::new(HPos::Center, VPos::Center))
        };
        chart
            .draw_series(shares.iter().enumerate().flat_map(|(k, row)| {
                let r = row_of(k);
                let style = &style;
                row.iter().enumerate().map(move |(x, &share)| {
                    // Dark text on the light (yellow-green) end of the scale.
                    Text::new(format!("{share:.1}%"), (x as f64, r), style(share / scale > 0.6))
                })
            }))
            .map_err(e)?;
    }

    // The colour bar.
    let steps = 100;
    let mut bar = ChartBuilder::on(&bar_area)
        .margin(20)
        .margin_top(8)
        .margin_left(0)
        .x_label_area_size(55)
        .right_y_label_area_size(95)
        .build_cartesian_2d(0.0..1.0, 0.0..scale)
        .map_err(e)?;
    bar.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc("Share of the layer's tokens (%)")
        .y_label_formatter(&tick)
        .label_style(("sans-serif", LABEL_SIZE))
        .axis_desc_style(("sans-serif", DESC_SIZE))
        .draw()
        .map_err(e)?;
    bar.draw_series((0..steps).map(|i| {
        let (lo, hi) = (scale * i as f64 / steps as f64, scale * (i + 1) as f64 / steps as f64);
        // Each step overlaps the next by half a step, so an SVG viewer's antialiasing leaves no
        // seams between them.
        let top = if i + 1 < steps { hi + scale / steps as f64 / 2.0 } else { hi };
        Rectangle::new([(0.0, lo), (1.0, top)], viridis((lo + hi) / 2.0 / scale).filled())
    }))
    .map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_keeps_short_series_and_spikes() {
        let short: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 1.0)).collect();
        assert_eq!(thin(&short, 100), short);
        let mut long: Vec<(f64, f64)> = (0..100_000).map(|i| (i as f64, 1.0)).collect();
        long[54_321].1 = 500.0;
        let thinned = thin(&long, 1000);
        assert!(thinned.len() <= 1000, "{}", thinned.len());
        assert!(thinned.contains(&(54_321.0, 500.0)));
        assert!(thinned.windows(2).all(|w| w[0].0 < w[1].0), "order kept");
    }

    #[test]
    fn viridis_runs_dark_to_light() {
        let lum = |c: RGBColor| 0.2126 * f64::from(c.0) + 0.7152 * f64::from(c.1) + 0.0722 * f64::from(c.2);
        let ramp: Vec<f64> = (0..=20).map(|i| lum(viridis(f64::from(i) / 20.0))).collect();
        assert!(ramp.windows(2).all(|w| w[0] < w[1]), "{ramp:?}");
        assert_eq!(viridis(-1.0), viridis(0.0));
        assert_eq!(viridis(f64::NAN), viridis(0.0));
        assert_eq!(viridis(2.0), RGBColor(253, 231, 37));
    }

    #[test]
    fn upper_is_never_empty() {
        assert_eq!(upper(0.0), 1.0);
        assert_eq!(upper(f64::NAN), 1.0);
        assert!(upper(10.0) > 10.0);
    }
}
