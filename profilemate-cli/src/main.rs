//! `profilemate`: reports, insights and figures from a profilemate output directory.

use clap::{Parser, Subcommand};
use profilemate_cli::compare::{self, Comparison};
use profilemate_cli::{html, write_plots, Report, RunData, Thresholds};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "profilemate", version, about = "Reports, insights and figures from profilemate output")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the combined performance breakdown of a run directory, with insights.
    ///
    /// Reads only the contract files (forward_pass_timing.csv, *_summary.json, ...), so it works
    /// on any engine's output. A section whose JSON summary is missing is recomputed from its CSV
    /// file; a section with neither is skipped.
    Report {
        /// The run directory (PROFILEMATE_DIR or VLLM_PROFILING_DIR of the run).
        dir: PathBuf,
        /// Print the report as one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also write the figures as PNG and SVG into this directory.
        #[arg(long, value_name = "OUTDIR")]
        plots: Option<PathBuf>,
        /// Also write one self-contained HTML page (tables, insights, figures) to this file.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
    /// Complete the files of a run whose process was killed: drop torn last CSV lines, close
    /// the Perfetto trace, rebuild the summaries from the rows and record in
    /// profilemate_run.json what was done (finished_cleanly: false). Safe to run again.
    Recover {
        /// The run directory.
        dir: PathBuf,
    },
    /// Compare two run directories (BASE, then NEW) per phase, with 95% intervals.
    ///
    /// Median, p95 and p99 forward time and median throughput (forward_pass_timing.csv), and,
    /// where both runs have step_timeline.csv, step wall time, each CPU operation, utilization,
    /// preemptions per step, KV-cache usage and the CUDA graph replay rate. Each change has a
    /// 95% interval from a moving-block bootstrap over the steps and a verdict: better, worse,
    /// or no significant change.
    ///
    /// Exit status: 0, or 3 when --fail-on-regression finds a regression (1 on an error).
    Compare {
        /// The run before the change.
        base: PathBuf,
        /// The run after the change.
        new: PathBuf,
        /// Print the comparison as one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also write one self-contained HTML page (the table, the two distributions overlaid).
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        /// Exit with status 3 when a phase's median forward time or median throughput got
        /// significantly worse by more than PCT percent.
        #[arg(long, value_name = "PCT")]
        fail_on_regression: Option<f64>,
    },
}

/// Exit status of `compare --fail-on-regression` when it finds a regression.
const REGRESSION_EXIT: u8 = 3;

fn run(cli: Cli) -> Result<ExitCode, profilemate_cli::ReportError> {
    match cli.command {
        Command::Report { dir, json, plots, html: html_file } => {
            let data = RunData::load(&dir)?;
            let report = Report::from_data(&data, &Thresholds::default());
            if json {
                // Machines read stdout; people still see the caveats.
                for n in &report.notes {
                    eprintln!("profilemate: {n}");
                }
                let text = serde_json::to_string_pretty(&report).expect("a report always serializes");
                println!("{text}");
            } else {
                print!("{report}");
            }
            if let Some(outdir) = plots {
                let out = write_plots(&data, &outdir)?;
                for n in &out.notes {
                    eprintln!("profilemate: {n}");
                }
                eprintln!("profilemate: wrote {} plot files into {}", out.files.len(), outdir.display());
            }
            if let Some(file) = html_file {
                let page = html::render(&report, &data)?;
                std::fs::write(&file, page)
                    .map_err(|e| profilemate_cli::ReportError::Io { path: file.clone(), source: e })?;
                eprintln!("profilemate: wrote {}", file.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare { base, new, json, html: html_file, fail_on_regression } => {
            if let Some(p) = fail_on_regression {
                if !(p.is_finite() && p >= 0.0) {
                    eprintln!(
                        "profilemate: error: --fail-on-regression {p}: expected a percentage >= 0 (for example 5)"
                    );
                    return Ok(ExitCode::from(2));
                }
            }
            let (b, n) = (RunData::load(&base)?, RunData::load(&new)?);
            let comparison = Comparison::of(&b, &n);
            if json {
                let text = serde_json::to_string_pretty(&comparison).expect("a comparison always serializes");
                println!("{text}");
            } else {
                print!("{comparison}");
            }
            if let Some(file) = html_file {
                std::fs::write(&file, compare::render_html(&comparison, &b, &n))
                    .map_err(|e| profilemate_cli::ReportError::Io { path: file.clone(), source: e })?;
                eprintln!("profilemate: wrote {}", file.display());
            }
            if let Some(pct) = fail_on_regression {
                let regressions = comparison.regressions(pct);
                if !regressions.is_empty() {
                    for m in regressions {
                        eprintln!(
                            "profilemate: regression: {} {} {} changed {:+.1}% (95% interval [{:+.1}%, {:+.1}%]), more \
                             than the {pct}% allowed",
                            m.phase,
                            m.figure,
                            m.stat.as_str(),
                            m.change,
                            m.ci.0,
                            m.ci.1
                        );
                    }
                    return Ok(ExitCode::from(REGRESSION_EXIT));
                }
                eprintln!("profilemate: no regression beyond {pct}%");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Recover { dir } => {
            let r = profilemate_cli::recover(&dir)?;
            if !r.needed {
                eprintln!("profilemate: {} finished cleanly: nothing to recover", dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            for (file, bytes) in &r.torn_bytes_dropped {
                eprintln!("profilemate: {file}: dropped a torn last line ({bytes} bytes)");
            }
            if r.trace_events_added > 0 {
                eprintln!("profilemate: added {} events the trace lacked, from the tables", r.trace_events_added);
            }
            for file in &r.traces_closed {
                eprintln!("profilemate: {file}: closed the trace");
            }
            for file in &r.parquet_completed {
                eprintln!("profilemate: {file}: written complete from its CSV table");
            }
            for (file, why) in &r.parquet_not_completed {
                eprintln!("profilemate: {file}: incomplete Parquet file (no footer) left as it is: {why}");
            }
            eprintln!(
                "profilemate: rebuilt {} summaries from the rows; profilemate_run.json says finished_cleanly: false",
                r.summaries_rebuilt.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("profilemate: error: {e}");
            ExitCode::FAILURE
        }
    }
}
