//! profilemate's live series of a multi-process run, rendered in one process: what vLLM's API
//! server adds to its own `/metrics` endpoint.
//!
//! The engine-core and worker processes cannot reach the API server's Prometheus registry, but
//! each already writes its part directory. [`PartsSeries::render`] reads, at scrape time, the
//! rows every part completed since the previous scrape ([`profilemate::TableFollower`]), passes
//! them through the same [`profilemate::MetricsSink`] a Rust engine uses (one per part, so each
//! part's step clock sees only its own CPU operations), into a private Prometheus recorder, and
//! returns the Prometheus text exposition. Nothing here depends on the process it runs in.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use profilemate::{MetricsSink, RunManifest, Sink, TableFollower, MANIFEST_FILE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::merge::PARTS_DIR;

/// The series of every part of one run, as Prometheus text. Counters and histograms add up over
/// the parts (a forward pass counted by two tensor-parallel workers counts twice, as the merged
/// `forward_pass_timing.csv` holds it twice); gauges hold the latest batch or KV sample of the
/// part that records them (the engine core). Events dropped are summed over the parts'
/// manifests (rewritten with every summary). A part's last step is observed once its manifest
/// says its session finished.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let part = dir.path().join("parts/20250101T000000Z-1/worker-7");
/// let session = profilemate::builder().dir(&part).build()?;
/// session.forward_pass().record_ms(profilemate::Phase::Decode, 4, 4, 1.5);
/// session.shutdown()?;
/// let mut series = profilemate_vllm::PartsSeries::new(dir.path(), "20250101T000000Z-1");
/// let text = series.render();
/// assert!(text.contains("profilemate_steps_total{phase=\"decode\"} 1"), "{text}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PartsSeries {
    run_dir: PathBuf,
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    parts: BTreeMap<PathBuf, Part>,
}

/// One part: its tables followed, its own sink (its own step clock), whether its session ended.
struct Part {
    follower: TableFollower,
    sink: MetricsSink,
    finished: bool,
}

impl std::fmt::Debug for PartsSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartsSeries").field("run_dir", &self.run_dir).field("parts", &self.parts.len()).finish()
    }
}

impl PartsSeries {
    /// Follows the parts of `run` under `dir` (`dir/parts/<run>/<role>-<pid>/`); parts that
    /// appear later are picked up at the next render. Histograms get
    /// [`profilemate::DURATION_BUCKETS_SECONDS`].
    pub fn new(dir: &Path, run: &str) -> PartsSeries {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), profilemate::DURATION_BUCKETS_SECONDS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        PartsSeries { run_dir: dir.join(PARTS_DIR).join(run), recorder, handle, parts: BTreeMap::new() }
    }

    /// Parts found so far.
    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    /// Reads what the parts completed since the previous call and returns every series in the
    /// Prometheus text format (version 0.0.4), ready for `prometheus_client`'s parser
    /// (`text_string_to_metric_families`) or to be served as is. Unreadable files are tried
    /// again at the next call.
    pub fn render(&mut self) -> String {
        let found: Vec<PathBuf> = std::fs::read_dir(&self.run_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        let parts = &mut self.parts;
        metrics::with_local_recorder(&self.recorder, || {
            for path in found {
                parts.entry(path.clone()).or_insert_with(|| Part {
                    follower: TableFollower::new(path),
                    sink: MetricsSink::new(),
                    finished: false,
                });
            }
            let mut dropped: Option<RunManifest> = None;
            for (path, part) in parts.iter_mut() {
                // The manifest first: when it says the part finished, its files were complete
                // before this poll, and the part's last step can be closed.
                let manifest = read_manifest(path);
                // The sink never fails; a failure would only mean these rows are not counted.
                let _ = part.sink.write_rows(&part.follower.poll());
                if let (Some(m), false) = (&manifest, part.finished) {
                    if m.finished {
                        part.finished = true;
                        let _ = part.sink.finish(m);
                    }
                }
                if let Some(m) = manifest {
                    match &mut dropped {
                        None => dropped = Some(m),
                        Some(total) => {
                            for (profiler, reasons) in m.dropped {
                                let into = total.dropped.entry(profiler).or_default();
                                for (reason, n) in reasons {
                                    *into.entry(reason).or_insert(0) += n;
                                }
                            }
                        }
                    }
                }
            }
            if let (Some(manifest), Some(part)) = (dropped, parts.values_mut().next()) {
                let _ = part.sink.write_manifest(&manifest);
            }
        });
        self.handle.render()
    }
}

/// `profilemate_vllm._native.PartsSeries(dir, run)`: [`PartsSeries`] for the plugin's
/// `/metrics` collector in the API server. `render()` returns the Prometheus text (it reads files
/// and releases the GIL meanwhile); `parts` is the number of parts found so far.
#[pyo3::pyclass(frozen, name = "PartsSeries", module = "profilemate_vllm._native")]
pub(crate) struct PyPartsSeries(std::sync::Mutex<PartsSeries>);

#[pyo3::pymethods]
impl PyPartsSeries {
    #[new]
    fn py_new(dir: PathBuf, run: &str) -> Self {
        PyPartsSeries(std::sync::Mutex::new(PartsSeries::new(&dir, run)))
    }

    fn render(&self, py: pyo3::Python<'_>) -> String {
        py.detach(|| self.0.lock().unwrap_or_else(|p| p.into_inner()).render())
    }

    #[getter]
    fn parts(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).parts()
    }
}

fn read_manifest(part: &Path) -> Option<RunManifest> {
    std::fs::read(part.join(MANIFEST_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use profilemate::{BatchSample, CpuOp, Phase};

    /// `name{labels} value` lines of the exposition.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
    }

    fn csv_count(path: &Path, column: usize, value: &str) -> usize {
        let mut reader = csv::Reader::from_path(path).unwrap();
        reader.records().filter(|r| r.as_ref().unwrap().get(column) == Some(value)).count()
    }

    #[test]
    fn the_parts_of_a_run_render_as_one_set_of_series_equal_to_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let run = "20260101T000000Z-1";
        let engine_dir = dir.path().join(PARTS_DIR).join(run).join("engine-2");
        let worker_dirs = ["worker-3", "worker-4"].map(|w| dir.path().join(PARTS_DIR).join(run).join(w));
        let mut series = PartsSeries::new(dir.path(), run);
        assert!(!series.render().contains("profilemate_steps_total"), "no part yet");

        let engine = profilemate::builder().dir(&engine_dir).build().unwrap();
        let workers = worker_dirs.clone().map(|d| profilemate::builder().dir(d).build().unwrap());
        let (cpu, batches, requests) = (engine.cpu_timing(), engine.batch_utilization(), engine.requests());
        let forwards = workers.each_ref().map(|w| w.forward_pass());
        let mut rendered_during = 0;
        for i in 0..400u32 {
            let s = cpu.start(CpuOp::SCHEDULING);
            batches.record(&BatchSample {
                num_seqs: 2,
                max_num_seqs: 8,
                num_tokens: 2,
                max_tokens: 64,
                phase: Phase::Decode,
                running_queue_len: 2,
                waiting_queue_len: 1,
            });
            s.stop();
            for f in &forwards {
                f.start(if i % 4 == 0 { Phase::Prefill } else { Phase::Decode }, 2, 2).stop();
            }
            if i % 40 == 0 {
                requests.started(&format!("req-{i}"));
                requests.preempted(&format!("req-{i}"), if i % 80 == 0 { "RECOMPUTE" } else { "SWAP" }, "");
            }
            if i % 100 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(150));
                series.render();
                rendered_during += 1;
            }
        }
        engine.shutdown().unwrap();
        let worker_steps: u64 = workers.map(|w| w.shutdown().unwrap().steps).iter().sum();
        let text = series.render();
        assert_eq!(series.parts(), 3);
        assert!(rendered_during >= 4);

        let forward_csvs: Vec<PathBuf> = worker_dirs.iter().map(|d| d.join("forward_pass_timing.csv")).collect();
        for phase in ["prefill", "decode"] {
            let rows: usize = forward_csvs.iter().map(|p| csv_count(p, 1, phase)).sum();
            assert_eq!(value(&text, &format!("profilemate_steps_total{{phase=\"{phase}\"}}")), Some(rows as f64));
            assert_eq!(
                value(&text, &format!("profilemate_forward_pass_duration_seconds_count{{phase=\"{phase}\"}}")),
                Some(rows as f64)
            );
        }
        assert_eq!(worker_steps, 800);
        let events = engine_dir.join("preemption_events.csv");
        for reason in ["RECOMPUTE", "SWAP"] {
            assert_eq!(
                value(&text, &format!("profilemate_preemptions_total{{reason=\"{reason}\"}}")),
                Some(csv_count(&events, 3, reason) as f64),
                "{reason}"
            );
        }
        assert_eq!(value(&text, "profilemate_step_duration_seconds_count"), Some(400.0));
        assert_eq!(value(&text, "profilemate_waiting_requests"), Some(1.0));
        assert_eq!(
            value(&text, "profilemate_events_dropped_total{profiler=\"forward_pass\",reason=\"buffer_full\"}"),
            Some(0.0)
        );
        assert!(text.contains("# TYPE profilemate_forward_pass_duration_seconds histogram"), "{text}");
        assert!(text.contains("# HELP profilemate_steps_total"), "{text}");
    }
}
