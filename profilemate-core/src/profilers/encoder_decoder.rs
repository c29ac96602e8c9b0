use super::Profiler;
use crate::event::Event;
use crate::rows::{ComponentRow, Rows};
use crate::stats::DurationStats;
use crate::summary::{component_shares, ComponentStats, EncoderDecoderSummary, Summaries};
use crate::types::{ModelType, ProfilerKind};

/// Encoder, decoder and cross-attention time.
#[derive(Debug, Default, Clone)]
pub struct EncoderDecoderProfiler {
    components: [DurationStats; 3],
    declared: Option<ModelType>,
}

impl EncoderDecoderProfiler {
    /// An empty profiler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the model type the engine declared (otherwise it is inferred: any encoder time
    /// means `encoder_decoder`).
    pub fn set_declared_model_type(&mut self, model_type: Option<ModelType>) {
        self.declared = model_type;
    }
}

impl Profiler for EncoderDecoderProfiler {
    fn kind(&self) -> ProfilerKind {
        ProfilerKind::EncoderDecoder
    }

    fn observe(&mut self, event: &Event<'_>, rows: &mut Rows) {
        let Event::Component { timestamp_ns, component, duration_ns, context } = *event else {
            return;
        };
        self.components[component as usize].record(duration_ns);
        rows.encoder_decoder.push(ComponentRow {
            timestamp_ns,
            component,
            duration_ns,
            context: context.to_string(),
            step: None,
        });
    }

    fn summarize(&self, out: &mut Summaries) {
        let [enc, dec, cross] = &self.components;
        let model_type =
            self.declared.unwrap_or(if enc.count() > 0 { ModelType::EncoderDecoder } else { ModelType::DecoderOnly });
        let (encoder_pct, decoder_pct, cross_attention_pct) =
            component_shares(enc.total_ns(), dec.total_ns(), cross.total_ns());
        out.encoder_decoder = Some(EncoderDecoderSummary {
            model_type: model_type.as_str().to_string(),
            encoder: ComponentStats::from(enc),
            decoder: ComponentStats::from(dec),
            cross_attention: ComponentStats::from(cross),
            encoder_pct,
            decoder_pct,
            cross_attention_pct,
            model_type_declared: self.declared.is_some(),
        });
    }
}
