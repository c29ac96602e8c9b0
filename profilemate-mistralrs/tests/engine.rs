//! profilemate inside a real mistral.rs engine (CPU, the tiny Llama written by `tiny_model`):
//! concurrent chat requests through mistral.rs's own request API, the rows checked against what
//! mistral.rs reports in each response's `Usage`.
//!
//! Set `PROFILEMATE_MISTRALRS_KEEP=DIR` to keep the profiled run's files in `DIR` (the test script
//! validates them against the contract and runs `profilemate report` on them).

use mistralrs::model_builder_trait::{build_model_from_pipeline, build_text_pipeline};
use mistralrs::{ModelDType, RequestBuilder, SchedulerConfig, TextMessageRole, TextModelBuilder, TokenSource};
use profilemate::Session;
use profilemate_mistralrs::{tiny_model, SharedPipeline};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

type Row = BTreeMap<String, String>;

/// (prompt words, max_len) per request: different lengths on both sides.
const WORK: [(usize, usize); 6] = [(5, 12), (40, 6), (17, 20), (80, 3), (9, 9), (33, 15)];
const MAX_NUM_SEQS: usize = 8;

#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    id: String,
    text: String,
    finish_reason: String,
    prompt_tokens: usize,
    completion_tokens: usize,
}

async fn load(model: &Path) -> (SharedPipeline, SchedulerConfig, mistralrs_core::AddModelConfig) {
    let builder = TextModelBuilder::new(model.display())
        .with_dtype(ModelDType::F32)
        .with_token_source(TokenSource::None)
        .with_force_cpu()
        .with_max_num_seqs(MAX_NUM_SEQS);
    build_text_pipeline(builder).await.expect("mistral.rs loads the tiny model")
}

/// Runs [`WORK`] concurrently through a mistral.rs engine whose pipeline `session` profiles;
/// returns the outcomes in `WORK` order.
async fn run_workload(model: &Path, session: &Session) -> Vec<Outcome> {
    let (pipeline, scheduler, config) = load(model).await;
    let wrapped =
        profilemate_mistralrs::profile(pipeline.clone(), session, &scheduler).expect("the pipeline can be wrapped");
    assert_eq!(
        Arc::ptr_eq(&pipeline, &wrapped),
        !session.is_enabled(),
        "a disabled session leaves the pipeline as it is"
    );
    drop(pipeline);
    let engine = Arc::new(build_model_from_pipeline(wrapped.clone(), scheduler, config).await);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, &(words, max_len)) in WORK.iter().enumerate() {
        let engine = engine.clone();
        tasks.spawn(async move {
            let request = RequestBuilder::new()
                .add_message(TextMessageRole::User, tiny_model::prompt(words, i))
                .set_deterministic_sampler()
                .set_sampler_max_len(max_len);
            (i, engine.send_chat_request(request).await.expect("mistral.rs answers"))
        });
    }
    let mut outcomes = vec![None; WORK.len()];
    while let Some(joined) = tasks.join_next().await {
        let (i, response) = joined.expect("request task");
        let choice = &response.choices[0];
        outcomes[i] = Some(Outcome {
            id: response.id.clone(),
            text: choice.message.content.clone().unwrap_or_default(),
            finish_reason: choice.finish_reason.clone(),
            prompt_tokens: response.usage.prompt_tokens,
            completion_tokens: response.usage.completion_tokens,
        });
    }
    // The engine holds the pipeline for a whole step: once we hold it, the step that sent the
    // last response (and recorded its `finished` row) is over.
    drop(wrapped.lock().await);
    drop(engine);
    outcomes.into_iter().map(|o| o.expect("every request answered")).collect()
}

fn read_csv(dir: &Path, name: &str) -> Vec<Row> {
    let mut reader = csv::Reader::from_path(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let headers = reader.headers().expect("header").clone();
    reader
        .records()
        .map(|r| {
            let r = r.expect("row");
            headers.iter().zip(r.iter()).map(|(h, v)| (h.to_string(), v.to_string())).collect()
        })
        .collect()
}

fn num(row: &Row, key: &str) -> f64 {
    row[key].parse().unwrap_or_else(|_| panic!("{key}={:?} in {row:?}", row[key]))
}

fn int(row: &Row, key: &str) -> usize {
    row[key].parse().unwrap_or_else(|_| panic!("{key}={:?} in {row:?}", row[key]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_a_real_engine_and_agrees_with_its_usage() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("tiny-llama");
    tiny_model::write(&model).expect("tiny model");

    // Profiled run.
    let out = tmp.path().join("profiled");
    let session = profilemate::builder().dir(&out).log_interval(5).build().expect("session");
    let profiled = run_workload(&model, &session).await;
    let manifest = session.shutdown().expect("shutdown");

    // Same workload with profiling disabled: nothing written, the same tokens generated.
    let off = tmp.path().join("disabled");
    let session = profilemate::builder().enabled(false).dir(&off).build().expect("session");
    let plain = run_workload(&model, &session).await;
    session.shutdown().expect("shutdown");
    assert!(
        !off.exists() || std::fs::read_dir(&off).expect("dir").next().is_none(),
        "a disabled session wrote files into {}",
        off.display()
    );
    for (p, q) in profiled.iter().zip(&plain) {
        assert_eq!(
            (&p.text, p.completion_tokens, &p.finish_reason, p.prompt_tokens),
            (&q.text, q.completion_tokens, &q.finish_reason, q.prompt_tokens),
            "the profiler changed what mistral.rs generated"
        );
    }
    assert!(profiled.iter().any(|o| !o.text.is_empty()), "the model generated text");

    let forward = read_csv(&out, "forward_pass_timing.csv");
    let batches = read_csv(&out, "batch_utilization.csv");
    let cpu = read_csv(&out, "cpu_operations_timing.csv");
    let events = read_csv(&out, "preemption_events.csv");
    let lifecycle = read_csv(&out, "request_lifecycle.csv");
    let n = WORK.len();

    // One forward row per `step` with sequences, and one batch row for the same step, in order:
    // the batch row comes from the sequences the step was given, the forward row from the pass.
    assert!(!forward.is_empty());
    assert_eq!(forward.len(), batches.len(), "one batch row per forward row");
    for (f, b) in forward.iter().zip(&batches) {
        assert_eq!(f["phase"], b["phase"]);
        assert_eq!(int(f, "batch_size"), int(b, "num_seqs"));
        assert_eq!(int(f, "num_tokens"), int(b, "num_tokens"));
        assert!(num(f, "timestamp_sec") >= num(b, "timestamp_sec"), "batch before its pass");
        assert!(int(b, "num_seqs") >= 1 && int(b, "num_seqs") <= MAX_NUM_SEQS, "{b:?}");
        assert_eq!(int(b, "max_num_seqs"), MAX_NUM_SEQS);
        assert_eq!(int(b, "max_tokens"), 0, "mistral.rs has no per-step token budget");
        // Queue lengths after scheduling (the patch's hook): the batch is part of what runs.
        assert!(int(b, "running_queue_len") >= int(b, "num_seqs"), "{b:?}");
        if f["phase"] == "decode" {
            assert_eq!(int(f, "num_tokens"), int(f, "batch_size"), "decode: one token per sequence");
        } else {
            assert_eq!(f["phase"], "prefill");
        }
    }

    // mistral.rs runs one warm-up request of its own while the engine starts (its rows come
    // before our first request); then our requests. Recomputes: mistral.rs's default scheduler
    // runs one length bucket at a time and, when nothing runs, puts set-aside sequences back
    // through a prompt step with all their tokens; each is a RECOMPUTE preemption row whose
    // extra_info says how many tokens that prompt step computed.
    let ids: Vec<&str> = profiled.iter().map(|o| o.id.as_str()).collect();
    let ours = |r: &Row| ids.contains(&r["request_id"].as_str());
    let t0 = lifecycle.iter().filter(|r| ours(r)).map(|r| num(r, "started_sec")).fold(f64::INFINITY, f64::min);
    for r in lifecycle.iter().filter(|r| !ours(r)) {
        assert!(num(r, "finished_sec") <= t0, "a request that is not ours after ours started: {r:?}");
    }
    let recomputes: Vec<&Row> = events.iter().filter(|e| ours(e) && e["event"] == "preempted").collect();
    let recomputed: usize = recomputes
        .iter()
        .map(|e| {
            assert_eq!(e["reason"], "RECOMPUTE");
            e["extra_info"].strip_prefix("recomputed_tokens=").expect("recomputed_tokens").parse::<usize>().expect("n")
        })
        .sum();
    let forward_ours: Vec<&Row> = forward.iter().filter(|r| num(r, "timestamp_sec") >= t0).collect();

    // Against mistral.rs's own accounting (each response's Usage): every prompt token is
    // computed in the request's first prefill step (no prefix-cache hits: the prompts differ from
    // their second token on), a recompute computes the tokens it says, and every completion
    // token but the last is produced by a decode step or a recompute.
    let prompt: usize = profiled.iter().map(|o| o.prompt_tokens).sum();
    let completion: usize = profiled.iter().map(|o| o.completion_tokens).sum();
    let tokens = |phase: &str| -> usize {
        forward_ours.iter().filter(|r| r["phase"] == phase).map(|r| int(r, "num_tokens")).sum()
    };
    let sequences = |phase: &str| -> usize {
        forward_ours.iter().filter(|r| r["phase"] == phase).map(|r| int(r, "batch_size")).sum()
    };
    let r = recomputes.len();
    // A request that ends in a prompt step gets one more decode pass from mistral.rs (its state is
    // reset to RunningCompletion after the step); its finished row says `finished_in=prefill`.
    let extra = events.iter().filter(|e| ours(e) && e["extra_info"].ends_with(";finished_in=prefill")).count();
    assert_eq!(tokens("prefill"), prompt + recomputed, "prefill tokens = Usage.prompt_tokens summed + recomputed");
    assert_eq!(sequences("prefill"), n + r, "each request prefilled once, plus its recomputes");
    assert_eq!(
        tokens("decode"),
        completion - n - r + extra,
        "decode tokens = Usage.completion_tokens - 1 per request - recomputes + extra passes"
    );
    for (o, &(_, max_len)) in profiled.iter().zip(WORK.iter()) {
        assert!(o.completion_tokens <= max_len, "{o:?}");
        if o.finish_reason == "length" {
            assert_eq!(o.completion_tokens, max_len, "{o:?}");
        }
    }
    eprintln!(
        "cross-check: {} forward rows for our requests ({} prefill, {} decode, {} of them recomputes of {} tokens); \
         prefill tokens {} = Usage prompt {} + recomputed {}; decode tokens {} = Usage completion {} - {} requests - {} recomputes + {} extra passes",
        forward_ours.len(),
        forward_ours.iter().filter(|r| r["phase"] == "prefill").count(),
        forward_ours.iter().filter(|r| r["phase"] == "decode").count(),
        r,
        recomputed,
        tokens("prefill"),
        prompt,
        recomputed,
        tokens("decode"),
        completion,
        n,
        r,
        extra
    );

    // One lifecycle row per request, id = the response's id; started before its first forward
    // pass, finished after its last; its stop reason in the finished event's extra_info.
    assert_eq!(lifecycle.iter().filter(|r| ours(r)).count(), n, "{lifecycle:?}");
    for o in &profiled {
        let row = lifecycle
            .iter()
            .find(|r| r["request_id"] == o.id)
            .unwrap_or_else(|| panic!("no lifecycle row for {}", o.id));
        let (started, finished) = (num(row, "started_sec"), num(row, "finished_sec"));
        assert!(started < finished);
        let own_recomputes = recomputes.iter().filter(|e| e["request_id"] == o.id).count();
        assert_eq!(int(row, "num_preemptions"), own_recomputes);
        // Its prefill pass begins after `started`; the decode passes that produced its other
        // tokens end before `finished`.
        let within = |phase: &str| {
            forward
                .iter()
                .filter(|f| f["phase"] == phase)
                .filter(|f| {
                    let t = num(f, "timestamp_sec");
                    t >= started && t + num(f, "forward_time_ms") / 1e3 <= finished + 1e-6
                })
                .count()
        };
        assert!(within("prefill") > own_recomputes, "no prefill pass between start and finish of {o:?}");
        assert!(
            within("decode") >= o.completion_tokens - 1 - own_recomputes,
            "{o:?}: {} decode passes",
            within("decode")
        );
        let finish_event = events
            .iter()
            .find(|e| e["request_id"] == o.id && e["event"] == "finished")
            .unwrap_or_else(|| panic!("no finished event for {}", o.id));
        let info =
            finish_event["extra_info"].strip_suffix(";finished_in=prefill").unwrap_or(&finish_event["extra_info"]);
        let reason = info.strip_prefix("stop_reason=").expect("stop_reason");
        let openai = match reason {
            "eos" | "stop_token" | "stop_string" => "stop",
            "length" | "model_length" => "length",
            other => other,
        };
        assert_eq!(openai, o.finish_reason, "{finish_event:?}");
    }
    assert_eq!(events.iter().filter(|e| ours(e) && e["event"] == "started").count(), n);
    assert_eq!(events.iter().filter(|e| ours(e) && e["event"] == "finished").count(), n);

    // CPU operations: scheduling (the patch's hook) at least once per engine iteration that ran
    // a step; batch preparation once per step; sampling once per step.
    let ops = |name: &str| cpu.iter().filter(|r| r["operation"] == name).count();
    assert_eq!(ops("batch_preparation"), forward.len());
    assert_eq!(ops("sampling"), forward.len());
    let decode_steps = forward.iter().filter(|r| r["phase"] == "decode").count();
    let prefill_steps = forward.len() - decode_steps;
    assert!(ops("scheduling") >= decode_steps.max(prefill_steps), "{} scheduling rows", ops("scheduling"));

    // The manifest counts what was written and dropped nothing.
    assert_eq!(manifest.rows["forward_pass_timing.csv"], forward.len() as u64);
    assert!(
        manifest.dropped.values().all(|per| per.values().all(|&n| n == 0)),
        "dropped events: {:?}",
        manifest.dropped
    );

    if let Some(keep) = std::env::var_os("PROFILEMATE_MISTRALRS_KEEP") {
        let keep = Path::new(&keep);
        std::fs::create_dir_all(keep).expect("keep dir");
        for entry in std::fs::read_dir(&out).expect("out") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), keep.join(entry.file_name())).expect("copy");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_in_use_is_refused_with_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("tiny-llama");
    tiny_model::write(&model).expect("tiny model");
    let (pipeline, scheduler, _) = load(&model).await;
    let session = Session::builder().in_memory_only().build().expect("session");
    let held = pipeline.clone().lock_owned().await;
    let err = profilemate_mistralrs::profile(pipeline.clone(), &session, &scheduler)
        .err()
        .expect("a locked pipeline is refused");
    assert!(err.to_string().contains("locked elsewhere"), "{err}");
    drop(held);
    assert!(profilemate_mistralrs::profile(pipeline, &session, &scheduler).is_ok());
}
