//! A continuous-batching inference engine simulated on the CPU, profiled by profilemate
//! through its public API only.
//!
//! What is simulated: request arrivals (a seeded Poisson process in simulated time), a
//! scheduler with `max_num_seqs`, `max_num_batched_tokens` and chunked prefill, a paged KV
//! cache of fixed-size blocks that preempts the newest running request when it runs out (its
//! blocks are freed and its tokens recomputed later, as vLLM V1 does), and three model shapes.
//! What is real: every forward pass, batch preparation and sampling does CPU work
//! proportional to its tokens (small matrix products, input building, argmax over logits),
//! and profilemate times that work. Scheduling decisions depend only on the seed, so a run is
//! reproducible; only the measured times differ between runs.

use profilemate::{BatchSample, Component, CpuOp, KvCacheSample, ModelType, Phase, Session};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::hint::black_box;

/// The three model shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// GPT-like: a decoder alone.
    DecoderOnly,
    /// Whisper-like: an audio encoder runs once per request, then the decoder with
    /// cross-attention to the encoder's output.
    EncoderDecoder,
    /// A vision encoder runs once per image of a request, then the language model.
    VisionLanguage,
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gpt" | "decoder-only" => Ok(Shape::DecoderOnly),
            "whisper" | "encoder-decoder" => Ok(Shape::EncoderDecoder),
            "vlm" | "vision-language" => Ok(Shape::VisionLanguage),
            other => Err(format!("unknown model `{other}`: expected gpt, whisper or vlm")),
        }
    }
}

/// Everything a run depends on.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Model shape.
    pub shape: Shape,
    /// Seed of every random choice.
    pub seed: u64,
    /// Requests in the run.
    pub requests: usize,
    /// Mean arrivals per simulated second.
    pub arrival_rate: f64,
    /// Prompt lengths are drawn uniformly from this range (tokens).
    pub prompt_len: (u32, u32),
    /// Output lengths are drawn uniformly from this range (tokens).
    pub output_len: (u32, u32),
    /// Scheduler's sequence limit.
    pub max_num_seqs: u32,
    /// Scheduler's token budget per step.
    pub max_num_batched_tokens: u32,
    /// KV cache size in blocks.
    pub kv_blocks: u32,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Width of the model's hidden state (cost of the real work per token).
    pub hidden: usize,
    /// Requests per wave of traffic.
    pub burst: usize,
    /// Simulated seconds of quiet between waves.
    pub quiet_sec: f64,
    /// Experts per MoE layer; 0 for a dense model.
    pub experts: u32,
    /// MoE layers.
    pub moe_layers: u32,
    /// Experts each token is routed to.
    pub top_k: u32,
    /// How uneven the router is: expert `e` (in a per-layer order) gets weight
    /// `1 / (e + 1)^(skew * (1 + layer / layers))`; 0 routes uniformly.
    pub moe_skew: f64,
    /// Every `stall_every`-th step (0: never), the host stalls for `stall_ms` before the step
    /// opens (a garbage collection, a slow tokenizer call): it shows as the step's host gap.
    pub stall_every: u64,
    /// Length of each injected stall, milliseconds.
    pub stall_ms: f64,
    /// Forward passes take this many times as long (at least 1.0: unchanged): after its real work
    /// a pass stays busy until it took `factor` times its own time. For before/after tests.
    pub forward_factor: f64,
    /// Batch sizes with a captured CUDA graph (decode steps up to the largest replay one,
    /// padded to the next captured size; other steps run eagerly).
    pub graph_sizes: Vec<u32>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            shape: Shape::VisionLanguage,
            seed: 7,
            requests: 400,
            arrival_rate: 90.0,
            prompt_len: (32, 960),
            output_len: (16, 160),
            max_num_seqs: 32,
            max_num_batched_tokens: 512,
            kv_blocks: 600,
            block_size: 16,
            hidden: 160,
            burst: 80,
            quiet_sec: 1.0,
            experts: 16,
            moe_layers: 4,
            top_k: 2,
            moe_skew: 1.0,
            graph_sizes: vec![1, 2, 4, 8, 16, 24, 32],
            stall_every: 0,
            stall_ms: 20.0,
            forward_factor: 1.0,
        }
    }
}

impl SimConfig {
    /// Checks that the run can make progress.
    pub fn validate(&self) -> Result<(), String> {
        let blocks_for_longest = (self.prompt_len.1 + self.output_len.1).div_ceil(self.block_size);
        if self.kv_blocks < blocks_for_longest {
            return Err(format!(
                "--kv-blocks {} cannot hold one request of the longest length ({} blocks of {} tokens)",
                self.kv_blocks, blocks_for_longest, self.block_size
            ));
        }
        if self.prompt_len.0 == 0 || self.prompt_len.0 > self.prompt_len.1 {
            return Err("--prompt-len: expected MIN-MAX with 0 < MIN <= MAX".into());
        }
        if self.output_len.0 == 0 || self.output_len.0 > self.output_len.1 {
            return Err("--output-len: expected MIN-MAX with 0 < MIN <= MAX".into());
        }
        if self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 || self.block_size == 0 {
            return Err("--max-num-seqs, --max-batched-tokens and --block-size must be positive".into());
        }
        if self.experts > 0 && (self.top_k == 0 || self.top_k > self.experts || self.moe_layers == 0) {
            return Err("--experts: top-k must be between 1 and the number of experts, with at least one layer".into());
        }
        if self.experts as usize > profilemate::MAX_EXPERTS {
            return Err(format!("--experts: at most {} experts per layer", profilemate::MAX_EXPERTS));
        }
        if !(self.forward_factor >= 1.0 && self.forward_factor.is_finite()) {
            return Err("--forward-factor: expected a number >= 1".into());
        }
        if !(self.stall_ms >= 0.0 && self.stall_ms.is_finite()) {
            return Err("--stall-ms: expected a number >= 0".into());
        }
        if !(self.moe_skew >= 0.0 && self.moe_skew.is_finite()) {
            return Err("--moe-skew: expected a number >= 0".into());
        }
        if self.arrival_rate.is_nan()
            || self.arrival_rate <= 0.0
            || self.requests == 0
            || self.hidden == 0
            || self.burst == 0
        {
            return Err("--rate, --requests and the model width must be positive".into());
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Request {
    id: String,
    arrival: f64,
    prompt_len: u32,
    output_len: u32,
    /// Tokens whose KV is in the cache (prompt and generated).
    computed: u32,
    generated: u32,
    blocks: u32,
    images: u32,
    encoded: bool,
    preempted: bool,
    preemptions: u32,
}

impl Request {
    /// Tokens that must be in the cache before the next token can be sampled.
    fn target_context(&self) -> u32 {
        self.prompt_len + self.generated
    }
}

/// What one run did, for the caller and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunStats {
    /// Engine steps that ran a forward pass.
    pub steps: u64,
    /// Steps per phase: prefill, decode, mixed.
    pub phases: [u64; 3],
    /// Preemptions.
    pub preemptions: u64,
    /// Requests finished.
    pub finished: u64,
    /// Encoder calls.
    pub encoder_calls: u64,
    /// (phase, sequences, tokens) of every step, in order.
    pub trace: Vec<(Phase, u32, u32)>,
    /// Largest KV usage seen, in blocks.
    pub peak_blocks: u32,
    /// Scheduling passes that ended with nothing to run (everything preempted).
    pub empty_schedules: u64,
    /// Step ids (as profilemate numbered them) before which a stall was injected.
    pub stalled_steps: Vec<u64>,
    /// Step ids in which a request was preempted.
    pub preempted_steps: Vec<u64>,
}

/// The model's real work: matrix-vector products of width `hidden`.
struct Model {
    hidden: usize,
    weights: Vec<f32>,
    state: Vec<f32>,
    vocab: usize,
    logits: Vec<f32>,
}

impl Model {
    fn new(hidden: usize, rng: &mut StdRng) -> Model {
        let vocab = 1024;
        Model {
            hidden,
            weights: (0..hidden * hidden).map(|_| rng.random_range(-0.1f32..0.1)).collect(),
            state: vec![0.5; hidden],
            vocab,
            logits: (0..vocab).map(|_| rng.random_range(0f32..1.0)).collect(),
        }
    }

    /// `rounds` matrix-vector products.
    fn layers(&mut self, rounds: u32) {
        let h = self.hidden;
        let mut next = vec![0f32; h];
        for _ in 0..rounds {
            for (out, row) in next.iter_mut().zip(self.weights.chunks_exact(h)) {
                *out = row.iter().zip(&self.state).map(|(w, x)| w * x).sum::<f32>().tanh();
            }
            std::mem::swap(&mut self.state, &mut next);
        }
        black_box(&self.state);
    }

    /// Greedy sampling: argmax over the logits, once per sequence.
    fn sample(&mut self, seqs: u32) -> u32 {
        let mut last = 0;
        for s in 0..seqs {
            let shift = self.state[s as usize % self.hidden];
            last = self
                .logits
                .iter()
                .enumerate()
                .max_by(|a, b| (a.1 + shift * a.0 as f32).total_cmp(&(b.1 + shift * b.0 as f32)))
                .map_or(0, |(i, _)| i as u32);
        }
        black_box(last % self.vocab as u32)
    }
}

/// A mixture-of-experts router that is deliberately uneven: per layer, a fixed permutation of
/// the experts gets Zipf-like weights, steeper in deeper layers.
struct Router {
    /// Per layer: cumulative weights over the experts.
    cumulative: Vec<Vec<f64>>,
    rng: StdRng,
    top_k: u32,
}

impl Router {
    fn new(config: &SimConfig) -> Router {
        // Its own random stream, so that MoE mode does not change the schedule.
        let mut rng = StdRng::seed_from_u64(config.seed ^ 0x6d6f65);
        let e = config.experts as usize;
        let cumulative = (0..config.moe_layers)
            .map(|layer| {
                let mut order: Vec<usize> = (0..e).collect();
                for i in (1..e).rev() {
                    order.swap(i, rng.random_range(0..=i));
                }
                let exponent = config.moe_skew * (1.0 + f64::from(layer) / f64::from(config.moe_layers));
                let mut weights = vec![0.0; e];
                for (rank, &expert) in order.iter().enumerate() {
                    weights[expert] = 1.0 / ((rank + 1) as f64).powf(exponent);
                }
                let mut acc = 0.0;
                weights
                    .iter()
                    .map(|w| {
                        acc += w;
                        acc
                    })
                    .collect()
            })
            .collect();
        Router { cumulative, rng, top_k: config.top_k }
    }

    /// Routes `tokens` tokens of `layer` to `top_k` distinct experts each; returns the counts.
    fn route(&mut self, layer: usize, tokens: u32, counts: &mut [u32]) {
        counts.iter_mut().for_each(|c| *c = 0);
        let cum = &self.cumulative[layer];
        let total = cum.last().copied().unwrap_or(0.0);
        let mut chosen = Vec::with_capacity(self.top_k as usize);
        for _ in 0..tokens {
            chosen.clear();
            while chosen.len() < self.top_k as usize {
                let x = self.rng.random::<f64>() * total;
                let expert = cum.partition_point(|c| *c <= x).min(cum.len() - 1);
                if !chosen.contains(&expert) {
                    chosen.push(expert);
                }
            }
            for &e in &chosen {
                counts[e] += 1;
            }
        }
    }
}

/// One scheduled piece of work in a step.
struct Scheduled {
    index: usize,
    tokens: u32,
    prefill: bool,
}

/// Runs the simulated engine to completion, recording into `session`.
pub fn run(config: &SimConfig, session: &Session) -> Result<RunStats, String> {
    config.validate()?;
    // The engine's own count of completed steps, one line each, for tests that kill it.
    let print_steps = std::env::var_os("SIMULATED_ENGINE_PRINT_STEPS").is_some();
    let steps = session.steps();
    let forward = session.forward_pass();
    let cpu = session.cpu_timing();
    let batches = session.batch_utilization();
    let lifecycle = session.requests();
    let components = session.components();
    let kv_cache = session.kv_cache();
    let graphs = session.cuda_graphs();
    let moe = session.moe_experts();
    let detokenize = session.register_cpu_operation("detokenize").map_err(|e| e.to_string())?;
    components.declare_model_type(match config.shape {
        Shape::DecoderOnly => ModelType::DecoderOnly,
        _ => ModelType::EncoderDecoder,
    });

    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut model = Model::new(config.hidden, &mut rng);
    let mut router = (config.experts > 0).then(|| Router::new(config));
    let mut expert_counts = vec![0u32; config.experts as usize];

    // "Capture" a graph per size: a warm-up pass of that batch, timed.
    let mut graph_sizes = config.graph_sizes.clone();
    graph_sizes.sort_unstable();
    graph_sizes.dedup();
    for &size in &graph_sizes {
        let t = std::time::Instant::now();
        model.layers(4 * size + 8);
        graphs.capture(size, t.elapsed());
    }

    // Arrivals in simulated time. Traffic comes in waves: each wave opens with a tenth of its
    // requests at once (prefill-only steps), the rest follow as a Poisson process, and a quiet
    // spell between waves lets the engine drain.
    let mut t = 0.0f64;
    let opening = config.burst.div_ceil(10);
    let mut arrivals: VecDeque<Request> = (0..config.requests)
        .map(|i| {
            if i > 0 && i % config.burst == 0 {
                t += config.quiet_sec;
            }
            if i % config.burst >= opening {
                t += -(1.0 - rng.random::<f64>()).ln() / config.arrival_rate;
            }
            Request {
                id: format!("req-{i:04}"),
                arrival: t,
                prompt_len: rng.random_range(config.prompt_len.0..=config.prompt_len.1),
                output_len: rng.random_range(config.output_len.0..=config.output_len.1),
                computed: 0,
                generated: 0,
                blocks: 0,
                images: if config.shape == Shape::VisionLanguage { rng.random_range(1..=2) } else { 0 },
                encoded: false,
                preempted: false,
                preemptions: 0,
            }
        })
        .collect();

    let mut now = 0.0f64;
    let mut free_blocks = config.kv_blocks;
    let mut waiting: VecDeque<Request> = VecDeque::new();
    let mut running: Vec<Request> = Vec::new();
    let mut stats = RunStats::default();
    let blocks_for = |tokens: u32| tokens.div_ceil(config.block_size);
    let mut opened: u64 = 0;

    while !(arrivals.is_empty() && waiting.is_empty() && running.is_empty()) {
        while arrivals.front().is_some_and(|r| r.arrival <= now) {
            waiting.extend(arrivals.pop_front());
        }
        if running.is_empty() && waiting.is_empty() {
            // Idle until the next arrival.
            now = arrivals.front().map_or(now, |r| r.arrival);
            continue;
        }

        // ---- the step opens before scheduling, so that scheduling belongs to it
        opened += 1;
        let stall = config.stall_every > 0 && opened % config.stall_every == 0;
        if stall {
            std::thread::sleep(std::time::Duration::from_secs_f64(config.stall_ms / 1e3));
        }
        let step = steps.begin();
        if stall {
            stats.stalled_steps.push(step.id());
        }

        // ---- scheduling (vLLM V1 style: running first, then waiting, newest preempted first)
        let scheduling = cpu.start(CpuOp::SCHEDULING);
        let mut budget = config.max_num_batched_tokens;
        let mut plan: Vec<Scheduled> = Vec::new();
        let mut preempted_now = false;
        let mut i = 0;
        while i < running.len() && budget > 0 {
            let r = &running[i];
            let remaining = r.target_context() - r.computed;
            let prefill = remaining > 1;
            let tokens = remaining.min(budget);
            let need = blocks_for(r.computed + tokens).saturating_sub(r.blocks);
            if need > free_blocks {
                // Out of KV blocks: preempt the newest running request and retry.
                let mut victim = running.pop().expect("running is not empty");
                let extra = format!(
                    "num_blocks={};num_computed_tokens={};free_blocks_before={free_blocks};needed_blocks={need}",
                    victim.blocks, victim.computed
                );
                lifecycle.preempted(&victim.id, "RECOMPUTE", &extra);
                free_blocks += victim.blocks;
                victim.blocks = 0;
                victim.computed = 0;
                victim.preempted = true;
                victim.preemptions += 1;
                stats.preemptions += 1;
                if stats.preempted_steps.last() != Some(&step.id()) {
                    stats.preempted_steps.push(step.id());
                }
                preempted_now = true;
                let was_current = running.len() == i;
                waiting.push_front(victim);
                if was_current {
                    break;
                }
                continue;
            }
            running[i].blocks += need;
            free_blocks -= need;
            budget -= tokens;
            plan.push(Scheduled { index: i, tokens, prefill });
            i += 1;
        }
        if !preempted_now {
            while budget > 0 && (running.len() as u32) < config.max_num_seqs {
                let Some(r) = waiting.front() else { break };
                let tokens = (r.target_context() - r.computed).min(budget);
                let need = blocks_for(r.computed + tokens);
                if need > free_blocks {
                    break;
                }
                let mut r = waiting.pop_front().expect("front exists");
                if r.preempted {
                    lifecycle.resumed(&r.id);
                    r.preempted = false;
                } else {
                    lifecycle.started(&r.id);
                }
                r.blocks = need;
                free_blocks -= need;
                budget -= tokens;
                running.push(r);
                plan.push(Scheduled { index: running.len() - 1, tokens, prefill: tokens > 1 });
            }
        }
        let prefill_seqs = plan.iter().filter(|s| s.prefill).count() as u32;
        let num_seqs = plan.len() as u32;
        let num_tokens: u32 = plan.iter().map(|s| s.tokens).sum();
        let phase = Phase::from_token_mix(prefill_seqs, num_seqs - prefill_seqs);
        stats.peak_blocks = stats.peak_blocks.max(config.kv_blocks - free_blocks);
        kv_cache.record(&KvCacheSample {
            used_blocks: config.kv_blocks - free_blocks,
            total_blocks: config.kv_blocks,
            // This engine has no prefix cache.
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
        });
        batches.record(&BatchSample {
            num_seqs,
            max_num_seqs: config.max_num_seqs,
            num_tokens,
            max_tokens: config.max_num_batched_tokens,
            phase,
            running_queue_len: running.len() as u32,
            waiting_queue_len: waiting.len() as u32,
        });
        scheduling.stop();
        if plan.is_empty() {
            // Everything was preempted this step; the next step reschedules.
            stats.empty_schedules += 1;
            now += 1e-4;
            continue;
        }

        // ---- batch preparation: input ids and positions for every scheduled token
        let context = format!("phase={phase};batch_size={num_seqs};num_tokens={num_tokens}");
        let inputs = cpu.time_with(CpuOp::BATCH_PREPARATION, &context, || {
            let mut ids = Vec::with_capacity(num_tokens as usize);
            let mut positions = Vec::with_capacity(num_tokens as usize);
            for s in &plan {
                let r = &running[s.index];
                for k in 0..s.tokens {
                    ids.push((r.computed + k).wrapping_mul(2654435761) % 1024);
                    positions.push(r.computed + k);
                }
            }
            black_box((ids, positions))
        });
        drop(inputs);

        // ---- forward pass: encoders for requests that need them, then the decoder
        let execution = cpu.start_with(CpuOp::MODEL_EXECUTION, &context);
        let pass = forward.start(phase, num_seqs, num_tokens);
        let forward_began = std::time::Instant::now();
        for s in &plan {
            let r = &mut running[s.index];
            if r.encoded {
                continue;
            }
            match config.shape {
                Shape::DecoderOnly => {}
                Shape::EncoderDecoder => {
                    let encoder = components.start(Component::Encoder, "audio_encoder");
                    model.layers(150);
                    encoder.stop();
                    stats.encoder_calls += 1;
                }
                Shape::VisionLanguage => {
                    for _ in 0..r.images {
                        let encoder = components.start(Component::Encoder, "vision_encoder");
                        model.layers(120);
                        encoder.stop();
                        stats.encoder_calls += 1;
                    }
                }
            }
            r.encoded = true;
        }
        let decoder = components.start(Component::Decoder, "language_model");
        model.layers(num_tokens + 4 * num_seqs);
        if let Some(router) = &mut router {
            for layer in 0..config.moe_layers {
                router.route(layer as usize, num_tokens, &mut expert_counts);
                // Each expert's feed-forward: work in proportion to the tokens it received.
                for &c in &expert_counts {
                    model.layers(c / 16);
                }
                moe.record_layer(layer, &expert_counts);
            }
        }
        decoder.stop();
        if config.shape == Shape::EncoderDecoder {
            let cross = components.start(Component::CrossAttention, "decoder_cross_attention");
            model.layers(num_seqs * 2);
            cross.stop();
        }
        if config.forward_factor > 1.0 {
            // A slower model: the pass's own work, then busy time until it took `factor` times as long.
            let target = forward_began.elapsed().mul_f64(config.forward_factor);
            while forward_began.elapsed() < target {
                std::hint::spin_loop();
            }
        }
        pass.stop();
        if print_steps {
            // Forward passes whose recording call returned: the kill-recovery check's bar.
            println!("forward {}", stats.steps + 1);
        }
        execution.stop();
        // Decode batches up to the largest captured size replay a graph, padded.
        match graph_sizes.iter().find(|&&g| g >= num_seqs) {
            Some(&padded) if phase == Phase::Decode => graphs.replay(num_seqs, padded),
            _ => graphs.eager(num_seqs),
        }

        // ---- sampling: one token for every sequence whose context is complete
        for s in &plan {
            running[s.index].computed += s.tokens;
        }
        let ready = plan.iter().filter(|s| running[s.index].computed == running[s.index].target_context()).count();
        cpu.time(CpuOp::SAMPLING, || model.sample(ready as u32));
        for s in &plan {
            let r = &mut running[s.index];
            if r.computed == r.target_context() {
                r.generated += 1;
            }
        }

        // ---- finished requests leave and free their blocks
        let mut k = 0;
        while k < running.len() {
            if running[k].generated >= running[k].output_len {
                let r = running.remove(k);
                free_blocks += r.blocks;
                cpu.time(detokenize, || black_box(r.id.bytes().map(u32::from).sum::<u32>()));
                let extra = format!(
                    "status=FINISHED_LENGTH_CAPPED;output_tokens={};num_preemptions={}",
                    r.generated, r.preemptions
                );
                lifecycle.finished(&r.id, &extra);
                stats.finished += 1;
            } else {
                k += 1;
            }
        }

        stats.steps += 1;
        if print_steps {
            println!("step {}", stats.steps);
        }
        stats.phases[match phase {
            Phase::Prefill => 0,
            Phase::Decode => 1,
            Phase::Mixed => 2,
        }] += 1;
        stats.trace.push((phase, num_seqs, num_tokens));
        step.stop();
        // Simulated time advances with the modelled cost of the step, not the measured one,
        // so that scheduling stays reproducible.
        now += 0.002 + f64::from(num_tokens) * 2e-6;
    }
    Ok(stats)
}
