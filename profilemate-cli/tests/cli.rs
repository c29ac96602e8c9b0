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
    assert_eq!(std::fs::read_dir(&plots).unwrap().count(), 24);
    assert!(plots.join("queue_lengths.svg").exists() && plots.join("throughput_timeline.png").exists());
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("Insights"));
    assert!(stderr(&out).contains("wrote 24 plot files"), "{}", stderr(&out));
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

#[test]
fn compare_gives_verdicts_json_html_and_the_regression_exit_status() {
    // BASE: forward passes of 10 ms; NEW: the same steps 20 % slower; SAME: BASE again.
    let write = |factor: f64| {
        let run = Run::new();
        let mut fp = String::from(FORWARD_HEADER);
        for i in 0..400 {
            let ms = (10.0 + (i % 7) as f64 * 0.1) * factor;
            fp.push_str(&format!("{:.6},decode,8,8,{ms:.3},{:.3}\n", i as f64 * 0.02, 8.0 / ms * 1000.0));
        }
        run.write("forward_pass_timing.csv", &fp);
        run
    };
    let (base, slower, same) = (write(1.0), write(1.2), write(1.0));
    let out = profilemate(&["compare".as_ref(), base.path().as_os_str(), slower.path().as_os_str(), "--json".as_ref()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let median = json["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["phase"] == "decode" && m["figure"] == "forward_time_ms" && m["stat"] == "p50")
        .unwrap();
    assert_eq!(median["verdict"], "worse");
    assert_eq!(median["paired"], true, "the same steps in the same order are compared in pairs");
    let (lo, hi) = (median["ci"][0].as_f64().unwrap(), median["ci"][1].as_f64().unwrap());
    assert!(lo > 0.0 && lo <= 20.0 && 20.0 <= hi + 1e-9, "[{lo}, {hi}]");

    let html = tempfile::tempdir().unwrap().keep().join("compare.html");
    let slow = profilemate(&[
        "compare".as_ref(),
        base.path().as_os_str(),
        slower.path().as_os_str(),
        "--fail-on-regression".as_ref(),
        "5".as_ref(),
        "--html".as_ref(),
        html.as_os_str(),
    ]);
    assert_eq!(slow.status.code(), Some(3), "{}", stderr(&slow));
    assert!(stderr(&slow).contains("regression: decode forward_time_ms median"));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("worse"));
    let lenient = profilemate(&[
        "compare".as_ref(),
        base.path().as_os_str(),
        slower.path().as_os_str(),
        "--fail-on-regression".as_ref(),
        "50".as_ref(),
    ]);
    assert_eq!(lenient.status.code(), Some(0), "a 20 % regression is within 50 %");
    let unchanged = profilemate(&[
        "compare".as_ref(),
        base.path().as_os_str(),
        same.path().as_os_str(),
        "--fail-on-regression".as_ref(),
        "0".as_ref(),
    ]);
    assert_eq!(unchanged.status.code(), Some(0), "{}", String::from_utf8_lossy(&unchanged.stdout));
    assert!(String::from_utf8_lossy(&unchanged.stdout).contains("no significant change"));
    let bad = profilemate(&[
        "compare".as_ref(),
        base.path().as_os_str(),
        same.path().as_os_str(),
        "--fail-on-regression".as_ref(),
        "-1".as_ref(),
    ]);
    assert_eq!(bad.status.code(), Some(2));
}
