//! `--metrics-addr HOST:PORT` and `--metrics-linger-s N`: a Prometheus `/metrics` endpoint
//! (`metrics-exporter-prometheus`) fed by profilemate's `metrics` sink while the engine runs.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::net::SocketAddr;
use std::time::Duration;

/// The endpoint's options.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MetricsOptions {
    /// Where to serve `/metrics`; `None` serves nothing.
    pub addr: Option<SocketAddr>,
    /// How long to keep serving after the last step, so that a last scrape sees the final counts.
    pub linger: Duration,
}

/// Takes `--metrics-addr` and `--metrics-linger-s` out of `args`; the rest is the engine's.
pub fn split_args(args: &[String]) -> Result<(Vec<String>, MetricsOptions), String> {
    let mut rest = Vec::new();
    let mut options = MetricsOptions::default();
    let mut linger_given = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--metrics-addr" => {
                let v = it.next().ok_or("--metrics-addr needs a value, e.g. 127.0.0.1:9464")?;
                let addr = v.parse::<SocketAddr>().map_err(|_| {
                    format!("--metrics-addr {v:?}: expected HOST:PORT with an IP address, e.g. 127.0.0.1:9464")
                })?;
                options.addr = Some(addr);
            }
            "--metrics-linger-s" => {
                let v = it.next().ok_or("--metrics-linger-s needs a value (seconds)")?;
                let secs = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && (0.0..=86_400.0).contains(s))
                    .ok_or_else(|| format!("--metrics-linger-s {v:?}: expected seconds from 0 to 86400"))?;
                options.linger = Duration::from_secs_f64(secs);
                linger_given = true;
            }
            _ => rest.push(flag.clone()),
        }
    }
    if linger_given && options.addr.is_none() {
        return Err("--metrics-linger-s needs --metrics-addr".into());
    }
    Ok((rest, options))
}

/// Installs the Prometheus recorder globally and serves it on `addr` (a thread of its own).
/// Every `_seconds` histogram gets [`profilemate_sinks::DURATION_BUCKETS_SECONDS`], so that
/// Prometheus sees true histograms it can aggregate across machines.
pub fn serve(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), profilemate_sinks::DURATION_BUCKETS_SECONDS)
        .and_then(PrometheusBuilder::install)
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn metrics_flags_are_taken_out_and_checked() {
        let (rest, o) =
            split_args(&args(&["--seed", "3", "--metrics-addr", "127.0.0.1:9464", "--metrics-linger-s", "2.5"]))
                .unwrap();
        assert_eq!(rest, args(&["--seed", "3"]));
        assert_eq!(o.addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(o.linger, Duration::from_millis(2500));
        assert_eq!(split_args(&args(&["--seed", "3"])).unwrap().1, MetricsOptions::default());
        assert!(split_args(&args(&["--metrics-addr", "localhost"])).unwrap_err().contains("HOST:PORT"));
        assert!(split_args(&args(&["--metrics-addr"])).unwrap_err().contains("needs a value"));
        assert!(split_args(&args(&["--metrics-addr", "127.0.0.1:1", "--metrics-linger-s", "-1"]))
            .unwrap_err()
            .contains("seconds from 0"));
        assert!(split_args(&args(&["--metrics-linger-s", "1"])).unwrap_err().contains("needs --metrics-addr"));
    }
}
