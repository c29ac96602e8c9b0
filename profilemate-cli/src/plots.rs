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
use crate::data::{Component, LifecycleEvent, Phase, RunData};
use crate::recompute;
use crate::report::Note;
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

/// One of the figures the seed draws.
///
/// ```
/// use profilemate_cli::Figure;
/// assert_eq!(Figure::Throughput.file_stem(), "throughput_timeline");
/// assert_eq!(Figure::Throughput.size(), (1400, 600));
/// assert_eq!(Figure::ALL.len(), 7);
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
}

impl Figure {
    /// Every figure, in the seed's order.
    pub const ALL: [Figure; 7] = [
        Figure::Throughput,
        Figure::DecodeLatency,
        Figure::TokenUtilization,
        Figure::QueueLengths,
        Figure::Preemptions,
        Figure::EncoderDecoderShare,
        Figure::EncoderDecoderTimeline,
    ];

    /// The file name without extension (the seed's names).
    pub const fn file_stem(self) -> &'static str {
        match self {
            Figure::Throughput => "throughput_timeline",
            Figure::DecodeLatency => "decode_latency_dist",
            Figure::TokenUtilization => "token_utilization_timeline",
            Figure::QueueLengths => "queue_lengths",
            Figure::Preemptions => "preemption_timeline",
            Figure::EncoderDecoderShare => "encoder_decoder_breakdown",
            Figure::EncoderDecoderTimeline => "encoder_decoder_timeline",
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
        }
    }

    /// Width and height in pixels (the seed's figure sizes at 100 dpi).
    pub const fn size(self) -> (u32, u32) {
        match self {
            Figure::DecodeLatency => (1000, 600),
            Figure::EncoderDecoderShare => (800, 600),
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
        }
    }

    /// The figures `data` can give, and a "skipped" note for each other one.
    ///
    /// ```
    /// use profilemate_cli::{Figure, RunData};
    /// let (figures, skipped) = Figure::available_in(&RunData::default());
    /// assert!(figures.is_empty());
    /// assert_eq!(skipped.len(), 7);
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
                let series = Phase::ALL
                    .iter()
                    .enumerate()
                    .map(|(i, &phase)| Series {
                        label: phase.as_str().to_string(),
                        color: PALETTE[i],
                        points: rows
                            .iter()
                            .filter(|r| r.phase == phase)
                            .filter_map(|r| r.throughput_tokens_per_sec.map(|t| (r.timestamp_sec, t)))
                            .collect(),
                        kind: SeriesKind::Line,
                    })
                    .filter(|s| !s.points.is_empty())
                    .collect::<Vec<_>>();
                xy_chart(root, self.title(), "Time (s)", "Throughput (tokens/s)", &series, &[], None, None, false)
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
                    false,
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
                xy_chart(root, self.title(), "Time (s)", "Queue length (requests)", &series, &[], None, None, true)
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
                    true,
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
                xy_chart(root, self.title(), "Time (s)", "Duration (ms)", &series, &[], None, empty, false)
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
    count_axis: bool,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x_max = upper(all().map(|p| p.0).fold(empty_message.map_or(0.0, |m| m.1), f64::max));
    let (y_min, y_max) = y_range.unwrap_or_else(|| {
        let top = all().map(|p| p.1).chain(hlines.iter().map(|h| h.y)).fold(0.0, f64::max);
        let top = upper(top);
        (0.0, if count_axis { top.max(5.0) } else { top })
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
        .y_label_formatter(if count_axis { &whole_tick } else { &tick })
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
    fn upper_is_never_empty() {
        assert_eq!(upper(0.0), 1.0);
        assert_eq!(upper(f64::NAN), 1.0);
        assert!(upper(10.0) > 10.0);
    }
}
