//! The binding's configuration: the core's `PROFILEMATE_*` variables, plus the seed's
//! `VLLM_PROFILING_*` names that vLLM users already set.

use profilemate::{env, Config, Error};
use std::cell::RefCell;

/// The seed's output directory variable. Setting it (or `PROFILEMATE_DIR`) activates the plugin.
pub const VLLM_PROFILING_DIR: &str = "VLLM_PROFILING_DIR";

/// The seed's switch between CUDA events (`1`) and the host clock (`0`).
pub const VLLM_PROFILING_USE_CUDA_EVENTS: &str = "VLLM_PROFILING_USE_CUDA_EVENTS";

/// Where the seed wrote when no directory was given.
pub const DEFAULT_DIR: &str = "/tmp/vllm_profiling";

/// The collector period the binding uses unless `PROFILEMATE_FLUSH_MS` says otherwise: on a
/// CPU-only host vLLM's OpenMP threads occupy every core, and a collector waking ten times a
/// second (the core's default) measurably slows their steps; once a second does not.
pub const DEFAULT_FLUSH_MS: u64 = 1000;

/// Each core variable and the seed's name for it. When both are set, the core's name wins.
pub const VLLM_ALIASES: &[(&str, &str)] = &[
    (env::DIR, VLLM_PROFILING_DIR),
    (env::LOG_INTERVAL, "VLLM_PROFILING_LOG_INTERVAL"),
    (env::VERBOSE, "VLLM_PROFILING_VERBOSE"),
    (env::CUDA_EVENT_BATCH, "VLLM_PROFILING_CUDA_EVENT_BATCH_SIZE"),
    (env::DISABLE, "VLLM_PROFILING_DISABLE"),
    (env::SINKS, "VLLM_PROFILING_SINKS"),
];

/// Reads the binding's configuration through `lookup` (the process environment, or a test's).
///
/// Every `PROFILEMATE_*` variable of [`Config::from_lookup`] is honoured; where it is unset, the
/// seed's name from [`VLLM_ALIASES`] is read instead, and `VLLM_PROFILING_USE_CUDA_EVENTS=1/0`
/// stands for `PROFILEMATE_BACKEND=cuda/host`. With no directory given, the seed's
/// [`DEFAULT_DIR`] is used; with no collector period, [`DEFAULT_FLUSH_MS`]. A malformed value is an error that names the variable the user
/// actually set.
///
/// ```
/// use profilemate_vllm::binding_config;
/// let env = [("VLLM_PROFILING_DIR", "/tmp/run"), ("VLLM_PROFILING_LOG_INTERVAL", "10")];
/// let config = binding_config(|n| env.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string()))?;
/// assert_eq!(config.dir, std::path::PathBuf::from("/tmp/run"));
/// assert_eq!(config.log_interval, 10);
///
/// let bad = [("VLLM_PROFILING_LOG_INTERVAL", "often")];
/// let err = binding_config(|n| bad.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string()));
/// assert!(err.unwrap_err().to_string().contains("VLLM_PROFILING_LOG_INTERVAL"));
/// # Ok::<(), profilemate::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidSetting`] naming the first malformed variable.
pub fn binding_config(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, Error> {
    // Which variable each core name was actually read from, to name it in errors.
    let read_from: RefCell<Vec<(&'static str, &'static str)>> = RefCell::new(Vec::new());
    let bad_cuda_events: RefCell<Option<String>> = RefCell::new(None);
    let config = Config::from_lookup(|name| {
        if let Some(v) = lookup(name) {
            return Some(v);
        }
        if name == env::BACKEND {
            let v = lookup(VLLM_PROFILING_USE_CUDA_EVENTS)?;
            return match v.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Some("cuda".into()),
                "0" | "false" | "no" | "off" => Some("host".into()),
                _ => {
                    *bad_cuda_events.borrow_mut() = Some(v);
                    None
                }
            };
        }
        let (core, alias) = VLLM_ALIASES.iter().find(|(core, _)| *core == name)?;
        // (The collector period has no seed name; its binding default is applied below.)
        match lookup(alias) {
            Some(v) => {
                read_from.borrow_mut().push((core, alias));
                Some(v)
            }
            None if name == env::DIR => Some(DEFAULT_DIR.into()),
            None => None,
        }
    });
    let config = config.map(|mut c| {
        if lookup(env::FLUSH_MS).is_none() {
            c.flush_interval_ms = DEFAULT_FLUSH_MS;
        }
        // The merge combines the processes' MoE rows step by step: the parts keep per-step rows
        // unless the user asks for windows.
        if lookup(env::MOE_WINDOW).is_none() {
            c.moe_window_steps = 0;
        }
        c
    });
    if let Some(value) = bad_cuda_events.into_inner() {
        return Err(Error::InvalidSetting {
            name: VLLM_PROFILING_USE_CUDA_EVENTS.into(),
            value,
            expected: "1 (CUDA events) or 0 (host clock)".into(),
        });
    }
    config.map_err(|e| match e {
        Error::InvalidSetting { name, value, expected } => {
            let name = read_from
                .borrow()
                .iter()
                .find(|(core, _)| *core == name)
                .map_or(name, |(_, alias)| (*alias).to_string());
            Error::InvalidSetting { name, value, expected }
        }
        other => other,
    })
}

/// Whether the plugin is active: `PROFILEMATE_DIR` or `VLLM_PROFILING_DIR` is set and not empty.
///
/// ```
/// assert!(!profilemate_vllm::is_activated(|_| None));
/// assert!(profilemate_vllm::is_activated(|n| (n == "VLLM_PROFILING_DIR").then(|| "/tmp/x".into())));
/// ```
pub fn is_activated(lookup: impl Fn(&str) -> Option<String>) -> bool {
    [env::DIR, VLLM_PROFILING_DIR].iter().any(|n| lookup(n).is_some_and(|v| !v.trim().is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use profilemate::{BackendChoice, ProfilerKind, SinkKind};

    fn from(pairs: &[(&str, &str)]) -> Result<Config, Error> {
        binding_config(|n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn seed_names_map_to_the_core_settings() {
        let c = from(&[
            ("VLLM_PROFILING_DIR", "/tmp/seed"),
            ("VLLM_PROFILING_LOG_INTERVAL", "7"),
            ("VLLM_PROFILING_VERBOSE", "1"),
            ("VLLM_PROFILING_USE_CUDA_EVENTS", "0"),
            ("VLLM_PROFILING_CUDA_EVENT_BATCH_SIZE", "12"),
            ("VLLM_PROFILING_DISABLE", "preemption,encoder_decoder"),
            ("VLLM_PROFILING_SINKS", "csv"),
        ])
        .unwrap();
        assert_eq!(c.dir, std::path::PathBuf::from("/tmp/seed"));
        assert_eq!(c.log_interval, 7);
        assert!(c.verbose);
        assert_eq!(c.backend, BackendChoice::Host);
        assert_eq!(c.cuda_event_batch, 12);
        assert_eq!(c.disabled, vec![ProfilerKind::Preemption, ProfilerKind::EncoderDecoder]);
        assert_eq!(c.sinks, vec![SinkKind::Csv]);
        assert_eq!(from(&[("VLLM_PROFILING_USE_CUDA_EVENTS", "1")]).unwrap().backend, BackendChoice::Cuda);
    }

    #[test]
    fn core_names_win_and_the_seed_default_dir_applies() {
        let c = from(&[("PROFILEMATE_DIR", "/a"), ("VLLM_PROFILING_DIR", "/b")]).unwrap();
        assert_eq!(c.dir, std::path::PathBuf::from("/a"));
        assert_eq!(from(&[]).unwrap().dir, std::path::PathBuf::from(DEFAULT_DIR));
        assert_eq!(from(&[]).unwrap().flush_interval_ms, DEFAULT_FLUSH_MS);
        assert_eq!(from(&[("PROFILEMATE_FLUSH_MS", "100")]).unwrap().flush_interval_ms, 100);
        let c = from(&[("PROFILEMATE_BACKEND", "host"), ("VLLM_PROFILING_USE_CUDA_EVENTS", "1")]).unwrap();
        assert_eq!(c.backend, BackendChoice::Host);
    }

    #[test]
    fn errors_name_the_variable_that_was_set() {
        let e = from(&[("VLLM_PROFILING_USE_CUDA_EVENTS", "maybe")]).unwrap_err().to_string();
        assert!(e.contains("VLLM_PROFILING_USE_CUDA_EVENTS") && e.contains("maybe"), "{e}");
        let e = from(&[("VLLM_PROFILING_DISABLE", "forward")]).unwrap_err().to_string();
        assert!(e.contains("VLLM_PROFILING_DISABLE"), "{e}");
        let e = from(&[("PROFILEMATE_LOG_INTERVAL", "0")]).unwrap_err().to_string();
        assert!(e.contains("PROFILEMATE_LOG_INTERVAL"), "{e}");
    }

    #[test]
    fn activation_needs_a_directory() {
        assert!(!is_activated(|_| None));
        assert!(!is_activated(|n| (n == "VLLM_PROFILING_DIR").then(|| " ".into())));
        assert!(is_activated(|n| (n == "PROFILEMATE_DIR").then(|| "/x".into())));
    }
}
