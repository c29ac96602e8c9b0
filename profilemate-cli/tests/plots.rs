//! Figures: every file is written, PNGs decode to the right size and are not blank, SVGs parse
//! and carry their titles; the HTML page is self-contained.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use profilemate_cli::{html, write_plots, Figure, Report, RunData, Thresholds, MAX_POINTS};
use std::collections::HashSet;

fn distinct_colours(img: &image::RgbaImage) -> usize {
    img.pixels().map(|p| p.0).collect::<HashSet<_>>().len()
}

#[test]
fn every_figure_is_written_as_png_and_svg() {
    let run = Run::normal();
    write_csv_run(&run, 200);
    let out = tempfile::tempdir().unwrap();
    let plots = write_plots(&RunData::load(run.path()).unwrap(), out.path()).unwrap();
    assert!(plots.notes.is_empty(), "{:?}", plots.notes);
    assert_eq!(plots.files.len(), 2 * Figure::ALL.len());

    for fig in Figure::ALL {
        let png = out.path().join(format!("{}.png", fig.file_stem()));
        let svg = out.path().join(format!("{}.svg", fig.file_stem()));
        assert!(plots.files.contains(&png) && plots.files.contains(&svg), "{fig:?}");

        let img = image::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display())).to_rgba8();
        assert_eq!(img.dimensions(), fig.size(), "{fig:?}");
        // Axes, text and data in more than one colour: not a blank canvas. Antialiased text
        // alone gives dozens of shades.
        assert!(distinct_colours(&img) > 10, "{fig:?} has {} colours", distinct_colours(&img));

        let text = std::fs::read_to_string(&svg).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", svg.display()));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let (w, h) = fig.size();
        assert_eq!(doc.root_element().attribute("width"), Some(w.to_string().as_str()));
        assert_eq!(doc.root_element().attribute("height"), Some(h.to_string().as_str()));
        let texts: String = doc.descendants().filter(|n| n.is_text()).filter_map(|n| n.text()).collect();
        assert!(texts.contains(fig.title()), "{fig:?}: title {:?} not in SVG text", fig.title());
        assert!(texts.contains("Time (s)") || texts.contains("(ms)") || texts.contains("(%)"), "{fig:?}: axis units");
    }
}

/// The embedded font draws text into the bitmap: the title band holds dark pixels in its middle
/// and none at its far edges (no system font is looked up, so this holds on a machine without
/// any).
#[test]
fn png_titles_are_rendered_with_the_embedded_font() {
    let run = Run::new();
    write_csv_run(&run, 30);
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("t.png");
    Figure::Throughput.write_png(&RunData::load(run.path()).unwrap(), &png).unwrap();
    let img = image::open(&png).unwrap().to_rgba8();
    let (w, _) = img.dimensions();
    let dark = |x0: u32, x1: u32| {
        (x0..x1).flat_map(|x| (15..50).map(move |y| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0[0] < 100).count()
    };
    assert!(dark(w / 2 - 150, w / 2 + 150) > 200, "title glyphs: {}", dark(w / 2 - 150, w / 2 + 150));
    assert_eq!(dark(0, 100), 0, "nothing left of the title");
}

#[test]
fn token_utilization_figure_has_the_50_and_80_percent_lines() {
    let run = Run::new();
    write_csv_run(&run, 50);
    let svg = Figure::TokenUtilization.to_svg(&RunData::load(run.path()).unwrap()).unwrap();
    assert!(svg.contains("Underutilization threshold (50%)"), "legend of the 50% line");
    assert!(svg.contains("Good utilization (80%)"), "legend of the 80% line");
    assert!(svg.contains("Token utilization (%)"), "y axis with unit");
}

#[test]
fn figures_without_data_are_skipped_with_a_note() {
    let run = Run::new();
    run.write("forward_pass_timing.csv", &format!("{FORWARD_HEADER}0.1,prefill,1,128,10.000,12800.000\n"));
    let out = tempfile::tempdir().unwrap();
    let plots = write_plots(&RunData::load(run.path()).unwrap(), out.path()).unwrap();
    assert_eq!(plots.files.len(), 2, "only the throughput figure: {:?}", plots.files);
    let notes: Vec<String> = plots.notes.iter().map(|n| n.to_string()).collect();
    assert!(
        notes.contains(&"skipped: decode_latency_dist plot: no decode passes in forward_pass_timing.csv".to_string()),
        "{notes:?}"
    );
    assert!(notes.contains(&"skipped: preemption_timeline plot: no preemption_events.csv".to_string()), "{notes:?}");
    assert!(!out.path().join("preemption_timeline.png").exists());
    // Asking for a figure directly names what is missing.
    let err = Figure::QueueLengths.to_svg(&RunData::load(run.path()).unwrap()).unwrap_err();
    assert!(err.to_string().contains("no batch_utilization.csv"), "{err}");
}

#[test]
fn figures_with_no_events_still_draw() {
    let run = Run::new();
    run.write("preemption_events.csv", &format!("{EVENTS_HEADER}0.5,a,started,,,\n1.0,a,finished,,,\n"));
    let data = RunData::load(run.path()).unwrap();
    let svg = Figure::Preemptions.to_svg(&data).unwrap();
    assert!(svg.contains("No preemptions recorded"));
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("p.png");
    Figure::Preemptions.write_png(&data, &png).unwrap();
    assert!(distinct_colours(&image::open(&png).unwrap().to_rgba8()) > 10);
}

#[test]
fn long_series_are_thinned_but_keep_their_spikes() {
    let run = Run::new();
    let mut csv = String::from(FORWARD_HEADER);
    for i in 0..50_000 {
        let ms = if i == 31_337 { 900.0 } else { 8.0 + (i % 5) as f64 * 0.1 };
        csv.push_str(&format!("{:.6},decode,8,8,{ms:.3},{:.3}\n", i as f64 * 0.01, 8.0 / ms * 1000.0));
    }
    run.write("forward_pass_timing.csv", &csv);
    let data = RunData::load(run.path()).unwrap();
    let svg = Figure::Throughput.to_svg(&data).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    // The longest polyline is the data line (the others are ticks and the legend's sample).
    let polyline_points = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .map(|n| n.attribute("points").unwrap_or("").split_whitespace().count())
        .max()
        .unwrap();
    assert!(polyline_points > 100 && polyline_points <= MAX_POINTS, "{polyline_points} points drawn");
    assert!(svg.len() < 2_000_000, "SVG of {} bytes", svg.len());
    let report = Report::from_data(&data, &Thresholds::default());
    assert_eq!(report.forward_pass.unwrap().phases.decode.count, 50_000, "the report itself uses every row");
}

#[test]
fn html_page_is_self_contained() {
    let run = Run::normal();
    write_csv_run(&run, 100);
    let data = RunData::load(run.path()).unwrap();
    let report = Report::from_data(&data, &Thresholds::default());
    let page = html::render(&report, &data).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert_eq!(page.matches("<svg").count(), Figure::ALL.len());
    for fig in Figure::ALL {
        assert!(page.contains(fig.title()), "{fig:?}");
    }
    for needle in ["1. Forward pass timing", "5. Preemptions", "Insights", "mean token utilization", "<table>"] {
        assert!(page.contains(needle), "{needle}");
    }
    for external in ["<script", "src=\"http", "href=\"http", "<link", "@import"] {
        assert!(!page.contains(external), "loads {external}");
    }
    // Stale-summary warnings (CSV rows differ from the summaries' counts) reach the page.
    assert!(page.contains("<h2>Notes</h2>"));
    let parsed = roxmltree::Document::parse(page.trim_start_matches("<!DOCTYPE html>"));
    assert!(parsed.is_ok(), "the page is well-formed: {:?}", parsed.err());
}
