//! The main job: a simulated continuous-batching inference engine, profiled by profilemate.
//!
//! ```text
//! cargo run --release --example simulated_engine -- [--model gpt|whisper|vlm] [--seed N]
//!     [--requests N] [--rate PER_SEC] [--prompt-len MIN-MAX] [--output-len MIN-MAX]
//!     [--max-num-seqs N] [--max-batched-tokens N] [--kv-blocks N] [--block-size N]
//!     [--experts N] [--moe-layers N] [--top-k N] [--moe-skew X]
//!     [--metrics-addr HOST:PORT [--metrics-linger-s N]]
//!     [--stall-every N] [--stall-ms MS] [--forward-factor X]
//! ```
//!
//! The files go into `PROFILEMATE_DIR` (default `./profilemate_out`); the run prints where.
//! With `--metrics-addr`, profilemate's live series (its `metrics` sink) are served for
//! Prometheus at `http://HOST:PORT/metrics` while the engine runs, and `--metrics-linger-s N`
//! seconds after its last step.

mod engine;
mod metrics_endpoint;

use engine::{Shape, SimConfig};
use std::process::ExitCode;

const USAGE: &str = "usage: simulated_engine [--model gpt|whisper|vlm] [--seed N] [--requests N] [--rate PER_SEC] \
[--prompt-len MIN-MAX] [--output-len MIN-MAX] [--max-num-seqs N] [--max-batched-tokens N] [--kv-blocks N] [--block-size N] \
[--experts N] [--moe-layers N] [--top-k N] [--moe-skew X] [--metrics-addr HOST:PORT [--metrics-linger-s N]] \
[--stall-every N] [--stall-ms MS] [--forward-factor X]";

fn parse_args(args: &[String]) -> Result<SimConfig, String> {
    let mut c = SimConfig::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.to_string());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|_| format!("{flag} {v:?}: expected a whole number"));
        let range = |v: &str| -> Result<(u32, u32), String> {
            let (a, b) = v.split_once('-').ok_or_else(|| format!("{flag} {v:?}: expected MIN-MAX, e.g. 32-256"))?;
            match (a.parse(), b.parse()) {
                (Ok(a), Ok(b)) => Ok((a, b)),
                _ => Err(format!("{flag} {v:?}: expected MIN-MAX with whole numbers")),
            }
        };
        let small =
            |v: &str| -> Result<u32, String> { u32::try_from(num(v)?).map_err(|_| format!("{flag} {v:?}: too large")) };
        match flag.as_str() {
            "--model" => c.shape = value.parse::<Shape>()?,
            "--seed" => c.seed = num(value)?,
            "--requests" => c.requests = num(value)? as usize,
            "--rate" => {
                c.arrival_rate = value.parse().map_err(|_| format!("--rate {value:?}: expected requests per second"))?
            }
            "--prompt-len" => c.prompt_len = range(value)?,
            "--output-len" => c.output_len = range(value)?,
            "--max-num-seqs" => c.max_num_seqs = small(value)?,
            "--max-batched-tokens" => c.max_num_batched_tokens = small(value)?,
            "--kv-blocks" => c.kv_blocks = small(value)?,
            "--block-size" => c.block_size = small(value)?,
            "--experts" => c.experts = small(value)?,
            "--moe-layers" => c.moe_layers = small(value)?,
            "--top-k" => c.top_k = small(value)?,
            "--moe-skew" => {
                c.moe_skew = value.parse().map_err(|_| format!("--moe-skew {value:?}: expected a number >= 0"))?
            }
            "--stall-every" => c.stall_every = num(value)?,
            "--stall-ms" => {
                c.stall_ms = value.parse().map_err(|_| format!("--stall-ms {value:?}: expected milliseconds >= 0"))?
            }
            "--forward-factor" => {
                c.forward_factor =
                    value.parse().map_err(|_| format!("--forward-factor {value:?}: expected a number >= 1"))?
            }
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    c.validate()?;
    Ok(c)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (config, metrics) = match metrics_endpoint::split_args(&args).and_then(|(rest, m)| Ok((parse_args(&rest)?, m)))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(addr) = metrics.addr {
        // Before the session: the metrics sink registers its series with the recorder in force.
        if let Err(e) = metrics_endpoint::serve(addr) {
            eprintln!("simulated_engine: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!("simulated_engine: serving profilemate's series at http://{addr}/metrics");
    }
    let session = match profilemate::builder().from_env().and_then(|b| {
        // `--metrics-addr` adds the metrics sink to those PROFILEMATE_SINKS names.
        let mut kinds = b.config_ref().sinks.clone();
        if metrics.addr.is_some() && !kinds.contains(&profilemate::SinkKind::Metrics) {
            kinds.push(profilemate::SinkKind::Metrics);
        }
        b.sinks(&kinds).build()
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("simulated_engine: cannot start profiling: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = session.dir().map(|d| d.display().to_string()).unwrap_or_else(|| "(no files)".into());
    eprintln!(
        "simulated_engine: {:?} model, {} requests, KV cache {} blocks x {} tokens; profiling into {dir}",
        config.shape, config.requests, config.kv_blocks, config.block_size
    );
    let started = std::time::Instant::now();
    let stats = match engine::run(&config, &session) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("simulated_engine: {e}");
            return ExitCode::FAILURE;
        }
    };
    if std::env::var_os("SIMULATED_ENGINE_PRINT_STEPS").is_some() {
        println!("shutdown {}", stats.steps);
    }
    let manifest = match session.shutdown() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("simulated_engine: profiling did not finish cleanly: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "simulated_engine: {} steps ({} prefill, {} decode, {} mixed), {} requests finished, {} preemptions, \
         {} encoder calls, in {:.1} s",
        stats.steps,
        stats.phases[0],
        stats.phases[1],
        stats.phases[2],
        stats.finished,
        stats.preemptions,
        stats.encoder_calls,
        started.elapsed().as_secs_f64()
    );
    eprintln!("profilemate wrote into {dir}:");
    for (file, rows) in &manifest.rows {
        eprintln!("  {file:<28} {rows:>7} rows");
    }
    eprintln!("  and the *_summary.json files and profilemate_run.json ({} events dropped)", manifest.total_dropped());
    if let (Some(addr), false) = (metrics.addr, metrics.linger.is_zero()) {
        eprintln!("simulated_engine: still serving http://{addr}/metrics for {:.1} s", metrics.linger.as_secs_f64());
        std::thread::sleep(metrics.linger);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests;
