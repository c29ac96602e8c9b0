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
    for needle in [
        "1. Forward pass timing",
        "5. Preemptions",
        "6. KV cache",
        "7. CUDA graphs",
        "8. MoE experts",
        "Insights",
        "mean token utilization",
        "replay rate",
        "hottest expert",
        "<table>",
    ] {
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

// --- the trackers' figures ----------------------------------------------------------------------

fn hex(c: [u8; 4]) -> String {
    format!("#{:02X}{:02X}{:02X}", c[0], c[1], c[2])
}

/// The heat map's cells as `(x, y, width, height, fill)`: the rectangles larger than a colour
/// bar step, in drawing order (layer by layer, expert by expert).
fn heat_map_cells(svg: &str) -> Vec<(f64, f64, f64, f64, String)> {
    let doc = roxmltree::Document::parse(svg).unwrap();
    let (w, _) = Figure::MoeExpertLoad.size();
    doc.descendants()
        .filter(|n| n.has_tag_name("rect"))
        .filter_map(|n| {
            let num = |a: &str| n.attribute(a).and_then(|v| v.parse::<f64>().ok());
            let (x, y, cw, ch) = (num("x")?, num("y")?, num("width")?, num("height")?);
            let fill = n.attribute("fill")?.to_uppercase();
            (cw > 60.0 && cw < f64::from(w) / 2.0).then_some((x, y, cw, ch, fill))
        })
        .collect()
}

fn moe_run(layers: &[Vec<u64>]) -> Run {
    let run = Run::new();
    run.json("moe_expert_summary.json", &moe_json(layers));
    run
}

/// One layer, four experts: the hot expert's cell has its own colour, lighter than the others,
/// in the SVG and at the same place in the PNG; an even load paints every cell alike.
#[test]
fn heat_map_colours_vary_with_load() {
    let skewed = moe_run(&[vec![700, 100, 100, 100]]);
    let data = RunData::load(skewed.path()).unwrap();
    let svg = Figure::MoeExpertLoad.to_svg(&data).unwrap();
    let cells = heat_map_cells(&svg);
    assert_eq!(cells.len(), 4, "{cells:?}");
    let fills: Vec<&str> = cells.iter().map(|c| c.4.as_str()).collect();
    assert_ne!(fills[0], fills[1], "the hot expert stands out");
    assert_eq!((fills[1], fills[2]), (fills[3], fills[3]), "equal loads, equal colours");
    assert_eq!(fills[0], "#FDE725", "the largest share is the top of the scale");
    assert!(svg.contains("70.0%") && svg.contains("10.0%"), "cells carry their shares");

    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("moe.png");
    Figure::MoeExpertLoad.write_png(&data, &png).unwrap();
    let img = image::open(&png).unwrap().to_rgba8();
    assert_eq!(img.dimensions(), Figure::MoeExpertLoad.size());
    for (x, y, w, h, fill) in &cells {
        // A quarter down from the cell's centre, clear of the share printed in the middle.
        let p = img.get_pixel((x + w / 2.0) as u32, (y + h * 0.75) as u32).0;
        assert_eq!(&hex(p), fill, "PNG and SVG agree at ({x}, {y})");
    }

    let even = moe_run(&[vec![100; 4]]);
    let svg = Figure::MoeExpertLoad.to_svg(&RunData::load(even.path()).unwrap()).unwrap();
    let fills: HashSet<String> = heat_map_cells(&svg).into_iter().map(|c| c.4).collect();
    assert_eq!(fills.len(), 1, "{fills:?}");
}

/// Layers are rows, the first on top; each row's hottest expert is the lightest cell of the row.
#[test]
fn heat_map_has_a_row_per_layer_and_a_column_per_expert() {
    let run = moe_run(&[vec![50, 10, 10, 10, 10, 10], vec![10, 10, 10, 10, 10, 50], vec![10; 6]]);
    let svg = Figure::MoeExpertLoad.to_svg(&RunData::load(run.path()).unwrap()).unwrap();
    let cells = heat_map_cells(&svg);
    assert_eq!(cells.len(), 18, "3 layers x 6 experts");
    let rows: Vec<f64> = cells.chunks(6).map(|row| row[0].1).collect();
    assert!(rows[0] < rows[1] && rows[1] < rows[2], "layer 0 on top: {rows:?}");
    let lum = |fill: &str| {
        let v = |i: usize| f64::from(u8::from_str_radix(&fill[i..i + 2], 16).unwrap());
        0.2126 * v(1) + 0.7152 * v(3) + 0.0722 * v(5)
    };
    let lightest = |row: &[(f64, f64, f64, f64, String)]| {
        (0..row.len()).max_by(|&a, &b| lum(&row[a].4).total_cmp(&lum(&row[b].4))).unwrap()
    };
    assert_eq!(lightest(&cells[0..6]), 0);
    assert_eq!(lightest(&cells[6..12]), 5);
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let texts: Vec<&str> = doc.descendants().filter(|n| n.is_text()).filter_map(|n| n.text()).map(str::trim).collect();
    for label in ["Expert", "Layer", "Share of the layer's tokens (%)", "5", "2"] {
        assert!(texts.contains(&label), "{label} in {texts:?}");
    }
    // Without layers there is nothing to colour, and the figure says so.
    let svg = Figure::MoeExpertLoad.to_svg(&RunData::load(moe_run(&[]).path()).unwrap()).unwrap();
    assert!(svg.contains("No MoE routing recorded"));
}

#[test]
fn kv_cache_figure_marks_each_preemption_on_the_time_axis() {
    let run = Run::new();
    let mut kv = String::from(KV_HEADER);
    for i in 0..100 {
        let used = 20 + (i % 40) * 2;
        kv.push_str(&format!("{:.6},{used},100,{used}.0000,0,0\n", f64::from(i) * 0.1));
    }
    run.write("kv_cache_usage.csv", &kv);
    run.write(
        "preemption_events.csv",
        &format!(
            "{EVENTS_HEADER}3.950000,a,preempted,RECOMPUTE,0.1,\n3.960000,a,resumed,,,\n7.950000,b,preempted,RECOMPUTE,0.1,\n"
        ),
    );
    let data = RunData::load(run.path()).unwrap();
    let svg = Figure::KvCacheUsage.to_svg(&data).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let markers = doc
        .descendants()
        .filter(|n| n.has_tag_name("polygon") && n.attribute("fill").is_some_and(|f| f.eq_ignore_ascii_case("#D62728")))
        .count();
    assert_eq!(markers, 2 + 1, "two preemptions and the legend's sample");
    for text in
        ["Preemption (2), at the usage of the sample before it", "Near full (95%)", "KV-cache usage (%)", "Time (s)"]
    {
        assert!(svg.contains(text), "{text}");
    }
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("kv.png");
    Figure::KvCacheUsage.write_png(&data, &png).unwrap();
    let img = image::open(&png).unwrap().to_rgba8();
    assert_eq!(img.dimensions(), Figure::KvCacheUsage.size());
    assert!(distinct_colours(&img) > 10);
    // Red marker pixels exist in the PNG too (the triangles, drawn 75 % opaque over white or the line).
    let reddish = img.pixels().filter(|p| p.0[0] > 200 && p.0[1] < 110 && p.0[2] < 110).count();
    assert!(reddish > 40, "{reddish} red pixels");

    // Without preemption_events.csv the usage is still drawn.
    run.remove("preemption_events.csv");
    let svg = Figure::KvCacheUsage.to_svg(&RunData::load(run.path()).unwrap()).unwrap();
    assert!(svg.contains("KV-cache usage") && !svg.contains("Preemption ("));
}

#[test]
fn cuda_graph_figure_shows_replays_eager_steps_and_padding() {
    let run = Run::new();
    write_csv_run(&run, 100);
    let data = RunData::load(run.path()).unwrap();
    let svg = Figure::CudaGraphs.to_svg(&data).unwrap();
    for text in [
        "Replayed a graph (80 steps)",
        "Ran eagerly (20 steps)",
        "Largest captured graph (32); 6 sizes captured",
        "Captured graph size",
        "Padding (%)",
        "Batch size (sequences)",
    ] {
        assert!(svg.contains(text), "{text}");
    }
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("g.png");
    Figure::CudaGraphs.write_png(&data, &png).unwrap();
    let img = image::open(&png).unwrap().to_rgba8();
    assert_eq!(img.dimensions(), (1400, 800));
    let has = |c: [u8; 3]| img.pixels().filter(|p| p.0[..3] == c).count();
    assert!(has([31, 119, 180]) > 500, "replay bars (blue)");
    assert!(has([255, 127, 14]) > 500, "eager bars (orange)");
    assert!(has([44, 160, 44]) > 500, "padding bars (green)");

    // Captures only: the figure says there was no step.
    run.write("cuda_graph_events.csv", &format!("{GRAPH_HEADER}0.0,capture,8,,1.0\n"));
    let svg = Figure::CudaGraphs.to_svg(&RunData::load(run.path()).unwrap()).unwrap();
    assert!(svg.contains("No replayed or eager steps recorded"));
}

#[test]
fn tracker_figures_without_their_files_are_skipped_with_a_note() {
    let run = Run::new();
    write_csv_run(&run, 30);
    for f in ["kv_cache_usage.csv", "cuda_graph_events.csv", "moe_expert_routing.csv", "step_timeline.csv"] {
        run.remove(f);
    }
    let out = tempfile::tempdir().unwrap();
    let plots = write_plots(&RunData::load(run.path()).unwrap(), out.path()).unwrap();
    assert_eq!(plots.files.len(), 14, "the seed's seven figures");
    let notes: Vec<String> = plots.notes.iter().map(|n| n.to_string()).collect();
    assert_eq!(
        notes,
        [
            "skipped: kv_cache_usage_timeline plot: no kv_cache_usage.csv",
            "skipped: cuda_graph_batch_sizes plot: no cuda_graph_events.csv",
            "skipped: moe_expert_load plot: no moe_expert_summary.json or moe_expert_routing.csv",
            "skipped: step_breakdown plot: no step_timeline.csv (with steps)",
            "skipped: slow_steps plot: no step_timeline.csv (with steps)",
        ]
    );
    // The summary alone is enough for the heat map.
    run.json("moe_expert_summary.json", &moe_json(&[vec![3, 1]]));
    let (figures, _) = Figure::available_in(&RunData::load(run.path()).unwrap());
    assert!(figures.contains(&Figure::MoeExpertLoad));
}
