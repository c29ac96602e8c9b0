//! The `profilemate` binary: exit codes, text, JSON, plots and HTML.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::process::{Command, Output};

fn profilemate(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_profilemate")).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[test]
fn report_prints_the_breakdown_and_insights() {
    let run = Run::normal();
    let mut b = batch_json();
    b["mean_token_utilization_pct"] = serde_json::json!(97.0);
    run.json("batch_utilization_summary.json", &b);
    let out = profilemate(&["report".as_ref(), run.path().as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("=== COMPLETE PERFORMANCE BREAKDOWN: "), "{text}");
    assert!(text.contains("5. Preemptions"));
    assert!(text.contains("[warning] Token budget saturated: mean token utilization 97.0% > 95.0%"), "{text}");
}

#[test]
fn json_flag_prints_one_json_object_and_warnings_on_stderr() {
    let run = Run::normal();
    run.write("forward_pass_timing.csv", &format!("{FORWARD_HEADER}0.1,decode,1,1,1.000,1000.000\n0.2,dec"));
    let out = profilemate(&["report".as_ref(), run.path().as_os_str(), "--json".as_ref()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["forward_pass"]["total_passes"], 4100);
    assert!(v["notes"].as_array().unwrap().iter().any(|n| n["message"].as_str().unwrap().contains("torn last line")));
    assert!(
        stderr(&out).contains("profilemate: warning: forward_pass_timing.csv: torn last line 3 skipped"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn plots_and_html_are_written() {
    let run = Run::new();
    write_csv_run(&run, 60);
    let out_dir = tempfile::tempdir().unwrap();
    let plots = out_dir.path().join("figures");
    let html = out_dir.path().join("run.html");
    let out = profilemate(&[
        "report".as_ref(),
        run.path().as_os_str(),
        "--plots".as_ref(),
        plots.as_os_str(),
        "--html".as_ref(),
        html.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&plots).unwrap().count(), 20);
    assert!(plots.join("queue_lengths.svg").exists() && plots.join("throughput_timeline.png").exists());
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("Insights"));
    assert!(stderr(&out).contains("wrote 20 plot files"), "{}", stderr(&out));
}

#[test]
fn malformed_file_fails_with_file_line_and_column() {
    let run = Run::new();
    run.write("cpu_operations_timing.csv", &format!("{CPU_HEADER}0.1,scheduling,0.5,\n0.2,sampling,fast,\n"));
    let out = profilemate(&["report".as_ref(), run.path().as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    assert_eq!(
        stderr(&out).trim_end(),
        "profilemate: error: cpu_operations_timing.csv: line 3, column 3 (`duration_ms`): `fast` is not a number"
    );
}

#[test]
fn missing_directory_and_bad_usage_fail() {
    let out = profilemate(&["report".as_ref(), "/nonexistent/profilemate/run".as_ref()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/nonexistent/profilemate/run"), "{}", stderr(&out));
    let out = profilemate(&["report".as_ref()]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    let out = profilemate(&["--help".as_ref()]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("report"));
}
