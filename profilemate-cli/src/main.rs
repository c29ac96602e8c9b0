//! `profilemate`: reports, insights and figures from a profilemate output directory.

use clap::{Parser, Subcommand};
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
}

fn run(cli: Cli) -> Result<(), profilemate_cli::ReportError> {
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
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("profilemate: error: {e}");
            ExitCode::FAILURE
        }
    }
}
