//! # profilemate-mistralrs
//!
//! profilemate inside [mistral.rs](https://github.com/EricLBuehler/mistral.rs): a [`Pipeline`]
//! wrapper that records every engine step of a real mistral.rs engine into profilemate's
//! contract files (`forward_pass_timing.csv`, `cpu_operations_timing.csv`,
//! `batch_utilization.csv`, `preemption_events.csv`, `request_lifecycle.csv` and their
//! summaries), without changing what the engine computes.
//!
//! ## The integration (ten lines)
//!
//! Build the pipeline with mistral.rs's own builder functions instead of
//! `TextModelBuilder::build`, wrap it, and hand the wrapper to the engine:
//!
//! ```no_run
//! use mistralrs::model_builder_trait::{build_model_from_pipeline, build_text_pipeline};
//! use mistralrs::{TextMessageRole, TextMessages, TextModelBuilder};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let session = profilemate::from_env()?; // PROFILEMATE_DIR, PROFILEMATE_DISABLE, ...
//! let (pipeline, scheduler, config) = build_text_pipeline(TextModelBuilder::new("path/to/model")).await?;
//! let pipeline = profilemate_mistralrs::profile(pipeline, &session, &scheduler)?;
//! let model = build_model_from_pipeline(pipeline, scheduler, config).await;
//!
//! let messages = TextMessages::new().add_message(TextMessageRole::User, "Hello!");
//! let response = model.send_chat_request(messages).await?; // as usual
//!
//! drop(model); // stops the engine
//! session.shutdown()?; // writes the summaries and profilemate_run.json
//! # let _ = response; Ok(()) }
//! ```
//!
//! ## What each profiler receives from mistral.rs
//!
//! mistral.rs's engine (`Engine::run`) schedules, then calls [`Pipeline::step`] once for the
//! decoding sequences and once for the prompt sequences. The wrapper keeps mistral.rs's own
//! `step` and is called back from inside it:
//!
//! | file | row | from |
//! | --- | --- | --- |
//! | `forward_pass_timing.csv` | one per `step` | `forward_inputs` timed; phase from `is_prompt`; batch size = sequences; tokens = prompt tokens computed (prefill) or one per sequence (decode) |
//! | `cpu_operations_timing.csv` | `scheduling`, `batch_preparation`, `sampling` | `Pipeline::scheduled` (the hook the patch adds), `InputsProcessor::process_inputs`, `sample_causal_gen` |
//! | `batch_utilization.csv` | one per `step` | sequences and tokens as above; `max_num_seqs` from the [`SchedulerConfig`]; queue lengths after scheduling from `Pipeline::scheduled` |
//! | `preemption_events.csv`, `request_lifecycle.csv` | `started`/`finished` per request | the first prompt step of a sequence (before its forward pass); its state after sampling (`SequenceState::Done(reason)` becomes `stop_reason=...`) |
//!
//! `request_id` is mistral.rs's sequence id, the `id` of the request's response.
//!
//! Two behaviours of mistral.rs 0.8.1's default scheduler show in the rows. It runs one length
//! bucket at a time and sets the other sequences aside; when nothing runs, it puts every waiting
//! sequence back through a prompt step, and one set aside mid-generation is recomputed from all
//! its tokens: a `preempted` row with reason `RECOMPUTE` and `recomputed_tokens=N` (the tokens that
//! prompt step computed) followed by `resumed`, both at that step (mistral.rs does not say when it
//! set the sequence aside). And after a prompt step it sets every sequence back to running, even
//! one whose sampling just finished it, which then gets one more decode pass: such a request's
//! `finished` row is written at the prompt step, with `finished_in=prefill`. The engine's own
//! warm-up request at start-up is recorded like any other.
//!
//! What mistral.rs does not give a pipeline, and so is not recorded: a token budget per step
//! (`max_tokens` is 0, token utilization empty), KV cache blocks (the default scheduler has none;
//! the PagedAttention scheduler runs on CUDA and Metal only), preemptions (same), and the time a
//! request waited before its first step (its `started` row is its first prompt step).
//!
//! ## The patch this needs
//!
//! mistral.rs 0.8.1 makes [`Pipeline`] public but keeps its mixin traits and the types in
//! their signatures private, so no crate outside it can implement a pipeline. The crate is built
//! against mistralrs-core 0.8.1 with `patches/mistralrs-core-0.8.1.patch` applied (34 added
//! lines: the re-exports in `mistralrs_core::pipeline_ext`, and the `Pipeline::scheduled` hook
//! with `IntervalLogger::queue_lengths`), which `scripts/mistralrs-patch.sh` prepares outside the
//! checkout.
//!
//! ## Host timing
//!
//! Forward passes are timed with the session's timing backend around `forward_inputs`. On the
//! CPU that is the model's execution time. On a GPU, candle returns before the device finishes;
//! use the `cuda` timing backend there (see profilemate-cuda).

use mistralrs_core::pipeline_ext::{
    AnyMoePipelineMixin, AnyMoeTrainingInputs, AnyMoeTrainingResult, CacheManagerMixin, DeviceMapper, EitherCache,
    ForwardInputsResult, GeneralMetadata, InputProcessorOutput, InputsProcessor, InputsProcessorType, Isaac64Rng,
    IsqPipelineMixin, MessagesAction, MetadataMixin, PagedAttentionMeta, PreProcessingMixin, PrefixCacheManagerV2,
    Processor, Sequence, SequenceState, StopReason, Tokenizer,
};
use mistralrs_core::{
    AnyMoeConfig, AnyMoeExpertType, ChatTemplate, DefaultSchedulerMethod, IsqType, MessageContent, ModelCategory,
    ModelGenerationDefaults, ModelKind, Pipeline, ReasoningEffort, SchedulerConfig, TokenSource, Tool,
};

use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;
use profilemate::{BatchSample, BatchUtilization, CpuOp, CpuTiming, ForwardPass, Phase, Requests, Session};
use std::any::Any;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, OwnedMutexGuard};

pub mod tiny_model;

/// The pipeline type mistral.rs's builders return and its engine takes.
pub type SharedPipeline = Arc<Mutex<dyn Pipeline>>;

/// Why a pipeline could not be wrapped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline's mutex was held elsewhere (an engine already runs it).
    #[error(
        "the mistral.rs pipeline is locked elsewhere: wrap it before handing it to an engine \
         (MistralRsBuilder / build_model_from_pipeline)"
    )]
    Locked,
    /// A speculative pipeline overrides `Pipeline::step`; running mistral.rs's default `step` on
    /// it, as the wrapper does, would change what it computes.
    #[error(
        "speculative mistral.rs pipelines override Pipeline::step and cannot be wrapped; \
         accepted: normal, GGUF, GGML, multimodal, embedding, speech, diffusion and AnyMoE pipelines"
    )]
    Speculative,
}

/// Wraps `pipeline` so that `session` records every engine step, or returns it unchanged when
/// the session is disabled (nothing is recorded or written then, and nothing is added to the
/// engine's steps).
///
/// `scheduler` is the configuration the engine will be given: its `max_num_seqs` is the limit in
/// `batch_utilization.csv`.
///
/// # Errors
///
/// [`Error::Locked`] when the pipeline is already in use by an engine, [`Error::Speculative`] for
/// a speculative pipeline.
pub fn profile(
    pipeline: SharedPipeline,
    session: &Session,
    scheduler: &SchedulerConfig,
) -> Result<SharedPipeline, Error> {
    if !session.is_enabled() {
        return Ok(pipeline);
    }
    Ok(Arc::new(Mutex::new(ProfiledPipeline::new(pipeline, session, scheduler)?)))
}

/// The most sequences the engine runs at once under `scheduler`.
pub fn max_num_seqs(scheduler: &SchedulerConfig) -> usize {
    match scheduler {
        SchedulerConfig::DefaultScheduler { method: DefaultSchedulerMethod::Fixed(n) } => n.get(),
        SchedulerConfig::PagedAttentionMeta { max_num_seqs, .. } => *max_num_seqs,
    }
}

/// The recording handles and what the current step looks like, shared by the pipeline wrapper
/// and the input processor wrapper it hands out. Only atomics: nothing here locks.
struct Recorder {
    forward: ForwardPass,
    cpu: CpuTiming,
    batches: BatchUtilization,
    requests: Requests,
    max_num_seqs: u32,
    /// Phase of the step being run: 0 prefill, 1 decode.
    phase: AtomicU32,
    batch_size: AtomicU32,
    num_tokens: AtomicU32,
    /// Queue lengths after the last scheduling pass.
    running: AtomicU32,
    waiting: AtomicU32,
    /// Ids (+ 1; 0 is empty) of sequences that finished in a prompt step, until their extra
    /// decode pass.
    finished_in_prefill: [AtomicUsize; 32],
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Recorder {
    /// A step begins (its inputs are being built): lifecycle `started` rows for new sequences,
    /// the step's shape for the forward pass, one batch row.
    fn begin_step(&self, seqs: &[&mut Sequence], is_prompt: bool, paged: bool) -> Phase {
        let (phase, phase_id) = if is_prompt { (Phase::Prefill, 0) } else { (Phase::Decode, 1) };
        let tokens: usize = if is_prompt {
            seqs.iter()
                .map(|seq| {
                    // With PagedAttention the cached prefix is skipped; without it the prefix
                    // cacher already shortened `get_toks` to the tokens left to compute.
                    let cached = if paged { seq.prefix_cache_len() } else { 0 };
                    seq.get_toks().len().saturating_sub(cached)
                })
                .sum()
        } else {
            seqs.len()
        };
        let (batch_size, num_tokens) = (to_u32(seqs.len()), to_u32(tokens));
        self.phase.store(phase_id, Ordering::Relaxed);
        self.batch_size.store(batch_size, Ordering::Relaxed);
        self.num_tokens.store(num_tokens, Ordering::Relaxed);
        if is_prompt {
            let mut id = itoa::Buffer::new();
            for seq in seqs {
                // A prompt step for a sequence that already generated tokens is a recompute:
                // mistral.rs's default scheduler runs one length bucket at a time, and when no
                // sequence is running it sets every waiting one, including those it had set
                // aside mid-generation, back to `RunningPrompt` (their KV cache rebuilt from all
                // their tokens).
                let generated = seq.get_toks().len().saturating_sub(seq.prompt_tokens());
                if generated == 0 {
                    self.requests.started(id.format(*seq.id()));
                } else {
                    let mut info = Info::new(b"recomputed_tokens=");
                    let info = info.push(seq.get_toks().len());
                    let id = id.format(*seq.id());
                    self.requests.preempted(id, "RECOMPUTE", info);
                    self.requests.resumed(id);
                }
            }
        }
        self.batches.record(&BatchSample {
            num_seqs: batch_size,
            max_num_seqs: self.max_num_seqs,
            num_tokens,
            max_tokens: 0,
            phase,
            running_queue_len: self.running.load(Ordering::Relaxed),
            waiting_queue_len: self.waiting.load(Ordering::Relaxed),
        });
        phase
    }

    fn current_step(&self) -> (Phase, u32, u32) {
        let phase = if self.phase.load(Ordering::Relaxed) == 0 { Phase::Prefill } else { Phase::Decode };
        (phase, self.batch_size.load(Ordering::Relaxed), self.num_tokens.load(Ordering::Relaxed))
    }

    /// After sampling: `finished` (or `evicted`) rows for the sequences that ended.
    ///
    /// After a prompt step the engine sets every sequence back to `RunningCompletion`, even one
    /// that sampling just finished (its response already sent), and runs it through one more
    /// decode pass, after which it is `Done` again. Its `finished` row is written at the prompt
    /// step (`finished_in=prefill`), and its id is kept until that extra pass so that it is not
    /// written twice.
    fn end_step(&self, seqs: &[&mut Sequence], prompt_step: bool) {
        let mut id = itoa::Buffer::new();
        for seq in seqs {
            let key = *seq.id() + 1;
            match seq.getstate() {
                SequenceState::Done(reason) if prompt_step => {
                    self.requests.finished(id.format(*seq.id()), stop_reason_info(reason, true));
                    let _ = self
                        .finished_in_prefill
                        .iter()
                        .any(|slot| slot.compare_exchange(0, key, Ordering::Relaxed, Ordering::Relaxed).is_ok());
                }
                SequenceState::Done(reason) => {
                    let seen = self
                        .finished_in_prefill
                        .iter()
                        .any(|slot| slot.compare_exchange(key, 0, Ordering::Relaxed, Ordering::Relaxed).is_ok());
                    if !seen {
                        self.requests.finished(id.format(*seq.id()), stop_reason_info(reason, false));
                    }
                }
                SequenceState::Error => self.requests.evicted(id.format(*seq.id()), "error", ""),
                SequenceState::FinishedAborted => self.requests.evicted(id.format(*seq.id()), "aborted", ""),
                SequenceState::FinishedIgnored => self.requests.evicted(id.format(*seq.id()), "ignored", ""),
                _ => {}
            }
        }
    }
}

/// A `key=value` field written into a stack buffer (no allocation on the engine's thread).
struct Info {
    buf: [u8; 48],
    len: usize,
}

impl Info {
    fn new(key: &[u8]) -> Self {
        let mut buf = [0u8; 48];
        let len = key.len().min(24);
        buf[..len].copy_from_slice(&key[..len]);
        Self { buf, len }
    }

    fn push(&mut self, value: usize) -> &str {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(value).as_bytes();
        let end = self.len + digits.len();
        self.buf[self.len..end].copy_from_slice(digits);
        std::str::from_utf8(&self.buf[..end]).unwrap_or("")
    }
}

/// `extra_info` of a `finished` row: mistral.rs's stop reason, and `finished_in=prefill` when the
/// request ended in a prompt step (see the crate docs).
pub fn stop_reason_info(reason: StopReason, in_prefill: bool) -> &'static str {
    match (reason, in_prefill) {
        (StopReason::Eos, false) => "stop_reason=eos",
        (StopReason::Eos, true) => "stop_reason=eos;finished_in=prefill",
        (StopReason::StopTok(_), false) => "stop_reason=stop_token",
        (StopReason::StopTok(_), true) => "stop_reason=stop_token;finished_in=prefill",
        (StopReason::Length(_), false) => "stop_reason=length",
        (StopReason::Length(_), true) => "stop_reason=length;finished_in=prefill",
        (StopReason::ModelLength(_), false) => "stop_reason=model_length",
        (StopReason::ModelLength(_), true) => "stop_reason=model_length;finished_in=prefill",
        (StopReason::StopString { .. }, false) => "stop_reason=stop_string",
        (StopReason::StopString { .. }, true) => "stop_reason=stop_string;finished_in=prefill",
        (StopReason::Canceled, false) => "stop_reason=canceled",
        (StopReason::Canceled, true) => "stop_reason=canceled;finished_in=prefill",
        (StopReason::GeneratedImage, _) => "stop_reason=generated_image",
        (StopReason::GeneratedSpeech, _) => "stop_reason=generated_speech",
        (StopReason::ToolCalls, false) => "stop_reason=tool_calls",
        (StopReason::ToolCalls, true) => "stop_reason=tool_calls;finished_in=prefill",
    }
}

/// A mistral.rs [`Pipeline`] that records each step into a profilemate [`Session`] and
/// otherwise does exactly what the pipeline it wraps does. Build one with [`profile`].
///
/// It does not override `Pipeline::step`: mistral.rs's own `step` runs on the wrapper and calls
/// back its `get_processor` (the input processor is wrapped to time `batch_preparation` and
/// learn the batch), `forward_inputs` (the forward pass) and `sample_causal_gen` (`sampling`,
/// then the lifecycle rows of the sequences that finished). Every other method delegates.
pub struct ProfiledPipeline {
    inner: OwnedMutexGuard<dyn Pipeline>,
    rec: Arc<Recorder>,
}

impl ProfiledPipeline {
    /// Wraps `pipeline` (which must not be locked) for `session`. [`profile`] is the usual entry.
    ///
    /// # Errors
    ///
    /// As for [`profile`].
    pub fn new(pipeline: SharedPipeline, session: &Session, scheduler: &SchedulerConfig) -> Result<Self, Error> {
        let inner = pipeline.try_lock_owned().map_err(|_| Error::Locked)?;
        if matches!(inner.get_metadata().kind, ModelKind::Speculative { .. }) {
            return Err(Error::Speculative);
        }
        Ok(Self {
            inner,
            rec: Arc::new(Recorder {
                forward: session.forward_pass(),
                cpu: session.cpu_timing(),
                batches: session.batch_utilization(),
                requests: session.requests(),
                max_num_seqs: to_u32(max_num_seqs(scheduler)),
                phase: AtomicU32::new(0),
                batch_size: AtomicU32::new(0),
                num_tokens: AtomicU32::new(0),
                running: AtomicU32::new(0),
                waiting: AtomicU32::new(0),
                finished_in_prefill: std::array::from_fn(|_| AtomicUsize::new(0)),
            }),
        })
    }
}

/// The pipeline's processor, handing out a timed input processor.
struct ProfiledProcessor {
    inner: Arc<dyn Processor>,
    rec: Arc<Recorder>,
}

impl Processor for ProfiledProcessor {
    fn process(
        &self,
        pipeline: &dyn Pipeline,
        messages: Vec<IndexMap<String, MessageContent>>,
        add_generation_prompt: bool,
        add_special_tokens: bool,
        enable_thinking: Option<bool>,
        reasoning_effort: Option<ReasoningEffort>,
        tools: Vec<Tool>,
    ) -> anyhow::Result<(Vec<u32>, String)> {
        self.inner.process(
            pipeline,
            messages,
            add_generation_prompt,
            add_special_tokens,
            enable_thinking,
            reasoning_effort,
            tools,
        )
    }
    fn inputs_processor(&self) -> Arc<dyn InputsProcessor> {
        // mistral.rs's `Processor::inputs_processor` returns `Arc<dyn InputsProcessor>`, neither
        // `Send` nor `Sync`; the wrapper holds one such inner `Arc`, so it is neither either.
        #[allow(clippy::arc_with_non_send_sync)]
        let wrapped = Arc::new(ProfiledInputsProcessor { inner: self.inner.inputs_processor(), rec: self.rec.clone() });
        wrapped
    }
    fn get_special_tokens(&self) -> &[&'static str] {
        self.inner.get_special_tokens()
    }
    fn template_action(&self) -> MessagesAction {
        self.inner.template_action()
    }
}

/// Builds a step's input tensors (timed as `batch_preparation`) after recording the step.
struct ProfiledInputsProcessor {
    inner: Arc<dyn InputsProcessor>,
    rec: Arc<Recorder>,
}

impl InputsProcessor for ProfiledInputsProcessor {
    fn process_inputs(
        &self,
        tokenizer: Option<Arc<Tokenizer>>,
        input_seqs: &mut [&mut Sequence],
        is_prompt: bool,
        is_xlora: bool,
        device: &Device,
        no_kv_cache: bool,
        last_n_context_len: Option<(usize, usize)>,
        return_raw_logits: bool,
        sliding_window: Option<usize>,
        other_config: Option<Arc<dyn Any>>,
        paged_attn_metadata: Option<PagedAttentionMeta>,
        mapper: Option<&dyn DeviceMapper>,
    ) -> anyhow::Result<InputProcessorOutput> {
        let phase = self.rec.begin_step(input_seqs, is_prompt, paged_attn_metadata.is_some());
        let context = if phase == Phase::Prefill { "phase=prefill" } else { "phase=decode" };
        let _preparation = self.rec.cpu.start_with(CpuOp::BATCH_PREPARATION, context);
        self.inner.process_inputs(
            tokenizer,
            input_seqs,
            is_prompt,
            is_xlora,
            device,
            no_kv_cache,
            last_n_context_len,
            return_raw_logits,
            sliding_window,
            other_config,
            paged_attn_metadata,
            mapper,
        )
    }
    fn get_type(&self) -> InputsProcessorType {
        self.inner.get_type()
    }
}

impl PreProcessingMixin for ProfiledPipeline {
    fn get_processor(&self) -> Arc<dyn Processor> {
        // `get_processor` returns `Arc<dyn Processor>` (not `Send`/`Sync`) in mistral.rs's trait.
        #[allow(clippy::arc_with_non_send_sync)]
        let wrapped = Arc::new(ProfiledProcessor { inner: self.inner.get_processor(), rec: self.rec.clone() });
        wrapped
    }
    fn get_chat_template(&self) -> Option<Arc<ChatTemplate>> {
        self.inner.get_chat_template()
    }
    fn get_input_processor_config(&self) -> Option<Arc<dyn Any>> {
        self.inner.get_input_processor_config()
    }
}

impl IsqPipelineMixin for ProfiledPipeline {
    fn re_isq_model(&mut self, dtype: IsqType) -> anyhow::Result<()> {
        self.inner.re_isq_model(dtype)
    }
}

impl CacheManagerMixin for ProfiledPipeline {
    fn clone_in_cache(&self, seqs: &mut [&mut Sequence]) {
        self.inner.clone_in_cache(seqs)
    }
    fn clone_out_cache(&self, seqs: &mut [&mut Sequence]) {
        self.inner.clone_out_cache(seqs)
    }
    fn set_none_cache(
        &self,
        seqs: &mut [&mut Sequence],
        reset_non_granular: bool,
        modify_draft_cache: bool,
        load_preallocated_cache: bool,
    ) {
        self.inner.set_none_cache(seqs, reset_non_granular, modify_draft_cache, load_preallocated_cache)
    }
    fn cache(&self) -> &EitherCache {
        self.inner.cache()
    }
}

impl MetadataMixin for ProfiledPipeline {
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn tokenizer(&self) -> Option<Arc<Tokenizer>> {
        self.inner.tokenizer()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    fn reset_non_granular_state(&self) {
        self.inner.reset_non_granular_state()
    }
    fn get_metadata(&self) -> Arc<GeneralMetadata> {
        self.inner.get_metadata()
    }
    fn generation_defaults(&self) -> Option<ModelGenerationDefaults> {
        self.inner.generation_defaults()
    }
    fn device_mapper(&self) -> Option<&dyn DeviceMapper> {
        self.inner.device_mapper()
    }
}

impl AnyMoePipelineMixin for ProfiledPipeline {
    fn amoe_layer_vars(&self) -> Vec<Vec<Var>> {
        self.inner.amoe_layer_vars()
    }
    fn amoe_finish_training(&mut self, gate_model_id: Option<String>) -> candle_core::Result<()> {
        self.inner.amoe_finish_training(gate_model_id)
    }
    fn amoe_base_model_trainable_params(&self) -> usize {
        self.inner.amoe_base_model_trainable_params()
    }
    fn amoe_supported(&self) -> bool {
        self.inner.amoe_supported()
    }
    fn amoe_take_cached_gating_outputs(&mut self) -> Vec<Tensor> {
        self.inner.amoe_take_cached_gating_outputs()
    }
    #[allow(clippy::too_many_arguments)]
    fn amoe_create_layers(
        &mut self,
        model_ids: Vec<String>,
        token: &TokenSource,
        revision: Option<String>,
        match_regex: &str,
        config: AnyMoeConfig,
        dtype: DType,
        dev: &Device,
        prefix_mlp: (String, String),
        layers: Vec<usize>,
        expert_type: AnyMoeExpertType,
        silent: bool,
        gate_model_id: Option<String>,
    ) -> candle_core::Result<()> {
        self.inner.amoe_create_layers(
            model_ids,
            token,
            revision,
            match_regex,
            config,
            dtype,
            dev,
            prefix_mlp,
            layers,
            expert_type,
            silent,
            gate_model_id,
        )
    }
    #[allow(clippy::too_many_arguments)]
    fn amoe_pre_train(
        &self,
        inputs: AnyMoeTrainingInputs,
        prefix_mlp: (String, String),
        model_ids: Vec<String>,
        token: TokenSource,
        revision: Option<String>,
        layers: Vec<usize>,
        silent: bool,
    ) -> Result<Option<AnyMoeTrainingResult>, candle_core::Error> {
        self.inner.amoe_pre_train(inputs, prefix_mlp, model_ids, token, revision, layers, silent)
    }
}

#[async_trait::async_trait]
impl Pipeline for ProfiledPipeline {
    fn forward_inputs(
        &mut self,
        inputs: Box<dyn Any>,
        return_raw_logits: bool,
    ) -> Result<ForwardInputsResult, candle_core::Error> {
        let (phase, batch_size, num_tokens) = self.rec.current_step();
        let _pass = self.rec.forward.start(phase, batch_size, num_tokens);
        self.inner.forward_inputs(inputs, return_raw_logits)
    }

    async fn sample_causal_gen(
        &self,
        seqs: &mut [&mut Sequence],
        logits: Vec<Tensor>,
        prefix_cacher: &mut PrefixCacheManagerV2,
        disable_eos_stop: bool,
        rng: Arc<std::sync::Mutex<Isaac64Rng>>,
    ) -> Result<(), candle_core::Error> {
        let sampling = self.rec.cpu.start(CpuOp::SAMPLING);
        let result = self.inner.sample_causal_gen(seqs, logits, prefix_cacher, disable_eos_stop, rng).await;
        sampling.stop();
        self.rec.end_step(seqs, self.rec.phase.load(Ordering::Relaxed) == 0);
        result
    }

    fn category(&self) -> ModelCategory {
        self.inner.category()
    }

    fn encoder_cache_counters(&self) -> Option<(Arc<AtomicUsize>, Arc<AtomicUsize>)> {
        self.inner.encoder_cache_counters()
    }

    fn scheduled(&mut self, schedule_time: Duration, running: usize, waiting: usize) {
        self.rec.running.store(to_u32(running), Ordering::Relaxed);
        self.rec.waiting.store(to_u32(waiting), Ordering::Relaxed);
        self.rec.cpu.record(CpuOp::SCHEDULING, schedule_time, "");
        self.inner.scheduled(schedule_time, running, waiting);
    }
}
