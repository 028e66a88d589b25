//! [`Engine`] on mistral.rs: GGUF models on CPU (or CUDA when built with the
//! `cuda` feature).
//!
//! Generation sends a chat request and forwards its stream, finishing it
//! itself when mistral.rs closes a stream inside a character (see
//! `SampleTally`). Label scoring reads the next-token distribution at the end
//! of the prompt's prefill, so no text is generated and no label parsing is
//! needed; it has two modes:
//!
//! - **Router engines** (`MistralOptions::router`) send raw-logit requests.
//!   mistral.rs does not add those to its prefix cache, so the cache keeps
//!   exactly the entry primed by [`Engine::warm_up`] (the router's fixed
//!   prompt: instructions + expert list) and every decision, repeated queries
//!   included, prefills only the query's tokens. mistral.rs cannot batch a
//!   raw-logit prompt with any other prompt (it fails the whole step), so a
//!   router engine runs one scoring pass at a time and does not generate. It
//!   also keeps a raw sequence for one engine step after answering; a
//!   decision returns without waiting for that step, but the next one does.
//! - **Other engines** use a one-token completion with a logits processor
//!   that records the distribution; it batches freely with other requests.
//!
//! Why not rely on the prefix cache for everything: in mistral.rs 0.8.1 the
//! sequence-level prefix cache keeps every finished sequence and only evicts
//! entries held on a GPU, so on CPU it grows with every request (about 7 MB
//! per 150-token SmolLM2-135M sequence) and each lookup scans all entries; an
//! exact repeat of a cached prompt also misses it. Generation engines
//! therefore default to `prefix_cache_n = 0`.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use either::Either;
use indexmap::IndexMap;
use mistralrs::core::{
    DeviceMapSetting, GGUFLoaderBuilder, GGUFSpecificConfig, MistralRsBuilder, RequestMessage, TokenizationRequest,
};
use mistralrs::{
    Constraint, CustomLogitsProcessor, DefaultSchedulerMethod, MemoryGpuConfig, MessageContent, Model, ModelDType,
    NormalRequest, PagedAttentionConfig, PagedCacheType, Request, Response, SamplingParams, SchedulerConfig, Tensor,
    TokenSource,
};
use tokio::sync::{OwnedMutexGuard, mpsc};

use super::labels::{LabelPlan, log_softmax_at};
use super::seeded::SeededSampler;
use super::stop::StopFilter;
use super::{
    ChatMessage, Engine, EngineError, FinishReason, GenerateParams, GenerationEvent, GenerationSummary, LabelScores,
    LabelSet, TokenStream, Usage,
};
pub use crate::config::model::{Activations, Weights};
use crate::config::{DEFAULT_MAX_NUM_SEQS, DEFAULT_MAX_NUM_SEQS_CPU};

pub use crate::config::paged::PagedAttention;
pub use crate::device::DeviceChoice;

mod generate;
mod inbox;
mod load;
mod sampling;

use inbox::*;
pub use load::{MistralOptions, is_false_alarm};

use generate::*;
use sampling::*;

/// Streaming responses buffered between the engine thread and the caller.
/// mistral.rs awaits each send, so a small buffer keeps its loop from waiting
/// on a slow consumer without holding many tokens.
const RESPONSE_BUFFER: usize = 16;

/// Answers waiting for their prompt step inside mistral.rs at once, on its
/// default scheduler (the CPU). mistral.rs has no way to cancel a queued
/// sequence: one whose client went away is still prefilled before its first
/// token fails to send, so after a burst of cancelled calls the engine spent
/// minutes prefilling answers nobody waited for. An answer waiting here costs
/// nothing when cancelled. The default scheduler runs one length bucket per
/// step, so prompts of different lengths are prefilled one at a time anyway:
/// two slots keep the next prompt ready without a queue that work could pile
/// up in. The paged scheduler (GPU) batches prompts and gets no such limit.
pub const PREFILL_SLOTS: usize = 2;

/// Longest wait for mistral.rs to retire a raw-logit sequence (normally one
/// decode step, a few ms).
const RAW_SEQUENCE_RETIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A GGUF model loaded in mistral.rs.
pub struct MistralEngine {
    model: Model,
    plans: Mutex<HashMap<LabelSet, Arc<LabelPlan>>>,
    router: bool,
    /// Router engines: held by each scoring pass (and the warm-up), so a
    /// raw-logit prompt is never batched with another prompt; after the last
    /// pass of a decision it is held until mistral.rs retires the sequence.
    prompt_gate: Arc<tokio::sync::Mutex<()>>,
    /// Answers in mistral.rs at once (`max_num_seqs`); more wait here. A
    /// sequence queued inside mistral.rs is prefilled before it notices that
    /// its client went away, and its default scheduler admits every waiting
    /// sequence whenever none runs; a request waiting here costs nothing when
    /// cancelled, and the limit holds.
    admission: Arc<tokio::sync::Semaphore>,
    /// Generation engines on mistral.rs's default scheduler: admitted answers
    /// whose prompt step has not run yet ([`PREFILL_SLOTS`]). An answer takes
    /// a slot before it is sent to mistral.rs and frees it at its first
    /// sampled token.
    prefill: Option<Arc<tokio::sync::Semaphore>>,
    /// Runs mistral.rs's paged attention (see [`crate::config::paged`]).
    paged: bool,
    /// Loaded from an f32 copy of the file ([`Weights`]).
    f32_weights: bool,
}

impl MistralEngine {
    /// Whether this engine runs mistral.rs's paged attention.
    pub fn paged_attention(&self) -> bool {
        self.paged
    }

    /// Whether this engine loaded an f32 copy of a quantized file ([`Weights`]).
    pub fn f32_weights(&self) -> bool {
        self.f32_weights
    }

    fn sender(&self) -> Result<mpsc::Sender<Request>, EngineError> {
        self.model
            .inner()
            .get_sender(None)
            .map_err(|e| EngineError::Backend(anyhow::anyhow!(e)))
    }

    async fn tokenize(
        &self,
        text: Either<&[ChatMessage], &str>,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let (tx, rx) = mpsc::channel(1);
        let mut inbox = Inbox::new(rx, None);
        let request = Request::Tokenize(TokenizationRequest {
            text: text.map_left(to_mistral_messages).map_right(str::to_string),
            tools: None,
            add_generation_prompt,
            add_special_tokens: false,
            response: tx,
            enable_thinking: None,
            reasoning_effort: None,
        });
        self.sender()?
            .send(request)
            .await
            .map_err(|_| EngineError::Disconnected)?;
        inbox
            .recv()
            .await
            .ok_or(EngineError::Disconnected)?
            .map_err(|e| EngineError::Backend(anyhow::anyhow!(e)))
    }

    /// Tokens of a chat prompt, ready for the model's answer (the prompt a
    /// route decision prefills; the trainer builds its sequences with it).
    ///
    /// # Errors
    /// The engine stopped or its chat template failed.
    pub async fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, EngineError> {
        self.tokenize(Either::Left(messages), true).await
    }

    /// Tokens of plain `text` (no template, no special tokens added).
    ///
    /// # Errors
    /// The engine stopped.
    pub async fn text_tokens(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenize(Either::Right(text), false).await
    }

    /// Tokenize each label as the model would write it as its whole answer,
    /// and find the end-of-turn token that follows it.
    ///
    /// # Errors
    /// The engine stopped.
    pub async fn label_tokens(&self, labels: &LabelSet) -> Result<(Vec<Vec<u32>>, Option<u32>), EngineError> {
        let probe = [ChatMessage::user("x")];
        let prompt = self.tokenize(Either::Left(&probe), true).await?;
        let mut seqs = Vec::with_capacity(labels.len());
        let mut end_token = None;
        for name in labels.names() {
            let answered = [
                ChatMessage::user("x"),
                ChatMessage {
                    role: super::Role::Assistant,
                    content: name.clone(),
                },
            ];
            let full = self.tokenize(Either::Left(&answered), false).await?;
            let plain = self.tokenize(Either::Right(name), false).await?;
            let tail = full.get(prompt.len()..).unwrap_or_default();
            if full.starts_with(&prompt) && tail.starts_with(&plain) && tail.len() > plain.len() {
                end_token = end_token.or(Some(tail[plain.len()]));
            }
            seqs.push(plain);
        }
        Ok((seqs, end_token))
    }

    async fn plan_for(&self, labels: &LabelSet) -> Result<Arc<LabelPlan>, EngineError> {
        if let Some(plan) = lock(&self.plans).get(labels) {
            return Ok(plan.clone());
        }
        let (seqs, end_token) = self.label_tokens(labels).await?;
        let plan = Arc::new(LabelPlan::new(&seqs, end_token)?);
        lock(&self.plans).insert(labels.clone(), plan.clone());
        Ok(plan)
    }

    /// One prefill of `tokens`, returning the log-probabilities of `next` at
    /// its end. A router's prompt `gate` is held until the engine lets go of
    /// the sequence.
    async fn next_token_logprobs(
        &self,
        tokens: Vec<u32>,
        next: Vec<u32>,
        gate: Option<OwnedMutexGuard<()>>,
    ) -> Result<Vec<f32>, EngineError> {
        let captured: Arc<Mutex<Option<Vec<f32>>>> = Arc::new(Mutex::new(None));
        let slot = captured.clone();
        let processor = move |logits: &Tensor, _context: &[u32]| -> mistralrs::Result<Tensor> {
            let row = logits
                .to_dtype(mistralrs::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            *lock(&slot) = Some(log_softmax_at(&row, &next));
            Ok(logits.clone())
        };
        let sampling = SamplingParams {
            max_len: Some(1),
            ..SamplingParams::deterministic()
        };
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let mut inbox = Inbox::new(rx, gate);
        let mut request =
            NormalRequest::new_simple(RequestMessage::CompletionTokens(tokens), sampling, tx, 0, None, None);
        request.constraint = Constraint::None;
        request.logits_processors = Some(vec![Arc::new(processor) as Arc<dyn CustomLogitsProcessor>]);
        self.sender()?
            .send(Request::Normal(Box::new(request)))
            .await
            .map_err(|_| EngineError::Disconnected)?;
        loop {
            match inbox.recv().await {
                Some(Response::CompletionDone(_)) | Some(Response::Done(_)) => break,
                Some(Response::CompletionChunk(_)) | Some(Response::Chunk(_)) => continue,
                Some(other) => return Err(response_error(other)),
                None => return Err(EngineError::Disconnected),
            }
        }
        let values = lock(&captured)
            .take()
            .ok_or_else(|| EngineError::Backend(anyhow::anyhow!("the engine finished without sampling a token")))?;
        Ok(values)
    }
}

impl MistralEngine {
    /// One raw-logit prefill of `tokens` (not added to the prefix cache),
    /// returning the log-probabilities of `next` at its end, and the
    /// sequence's [`Inbox`], which holds the router's prompt `gate`.
    ///
    /// mistral.rs 0.8.1 answers a raw-logit request from its prompt step but
    /// keeps the sequence scheduled for one more step; a raw prompt arriving
    /// meanwhile can be batched with it, which fails the step and stops the
    /// engine. The gate goes back with [`Inbox::retire`], or when the inbox
    /// is dropped, once the sequence has retired; the answer itself need not
    /// wait for that step.
    async fn raw_next_token_logprobs(
        &self,
        tokens: Vec<u32>,
        next: &[u32],
        gate: Option<OwnedMutexGuard<()>>,
    ) -> (Result<Vec<f32>, EngineError>, Inbox<Response>) {
        let sampling = SamplingParams {
            max_len: Some(1),
            ..SamplingParams::deterministic()
        };
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let mut inbox = Inbox::new(rx, gate);
        let mut request =
            NormalRequest::new_simple(RequestMessage::CompletionTokens(tokens), sampling, tx, 0, None, None);
        request.return_raw_logits = true;
        let sent = match self.sender() {
            Ok(sender) => sender.send(Request::Normal(Box::new(request))).await.is_ok(),
            Err(e) => return (Err(e), inbox),
        };
        if !sent {
            return (Err(EngineError::Disconnected), inbox);
        }
        let result = match inbox.recv().await {
            Some(Response::Raw { logits_chunks, .. }) => logits_chunks
                .last()
                .ok_or_else(|| EngineError::Backend(anyhow::anyhow!("mistral.rs returned no logits")))
                .and_then(|last| last_row(last).map_err(|e| EngineError::Backend(e.into())))
                .map(|row| log_softmax_at(&row, next)),
            Some(other) => Err(response_error(other)),
            None => Err(EngineError::Disconnected),
        };
        (result, inbox)
    }
}

/// Loads GGUF models with mistral.rs.
#[derive(Debug, Default, Clone, Copy)]
pub struct MistralLoader;

#[async_trait]
impl super::EngineLoader for MistralLoader {
    async fn load(&self, spec: &crate::config::ModelSpec, router: bool) -> Result<Arc<dyn Engine>, EngineError> {
        let engine = MistralEngine::load(&MistralOptions {
            path: spec.path.clone(),
            max_num_seqs: spec.max_num_seqs,
            prefix_cache_n: spec.prefix_cache_n,
            device: spec.device,
            activations: spec.activations,
            weights: spec.weights,
            router,
            paged_attention: spec.paged_attention,
            paged_kv_tokens: spec.paged_kv_tokens,
        })
        .await?;
        Ok(Arc::new(engine))
    }
}

#[cfg(test)]
mod tests {
    use super::load::F32Copy;
    use super::*;

    #[test]
    fn activation_types_parse_like_the_config_and_explain_a_typo() {
        for (s, a) in [
            ("f32", Activations::F32),
            ("BF16", Activations::Bf16),
            ("f16", Activations::F16),
            ("auto", Activations::Auto),
        ] {
            assert_eq!(s.parse::<Activations>(), Ok(a));
            let toml_form: Activations = serde_json::from_value(serde_json::json!(s.to_ascii_lowercase())).unwrap();
            assert_eq!(toml_form, a);
        }
        let err = "fp8".parse::<Activations>().unwrap_err();
        assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
        assert_eq!(Activations::default(), Activations::F32);
    }

    #[test]
    fn weights_resolve_per_engine_kind_and_explain_a_typo() {
        assert_eq!(Weights::default(), Weights::Auto);
        assert!(Weights::Auto.dequantize(true) && !Weights::Auto.dequantize(false));
        assert!(Weights::F32.dequantize(false) && !Weights::Stored.dequantize(true));
        assert_eq!("F32".parse::<Weights>(), Ok(Weights::F32));
        let err = "q4".parse::<Weights>().unwrap_err();
        assert!(err.contains("q4") && err.contains("auto, stored or f32"), "{err}");
    }

    #[test]
    fn the_f32_copy_is_exact_and_its_folder_goes_with_it() {
        use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        let w = (Tensor::arange(0f32, 64.0 * 32.0, &mistralrs::Device::Cpu)
            .unwrap()
            .reshape((64, 32))
            .unwrap()
            / 700.0)
            .unwrap()
            .sin()
            .unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let tmpl = gguf_file::Value::String("{{ messages }}".into());
        crate::model_prep::write_gguf(&model, &[("tokenizer.chat_template", &tmpl)], &[("blk.0.w", &q)]).unwrap();

        let copy = F32Copy::of(&model).unwrap().expect("a quantized file gets a copy");
        let folder = copy.path().parent().unwrap().to_path_buf();
        let mut r = std::io::BufReader::new(std::fs::File::open(copy.path()).unwrap());
        let c = gguf_file::Content::read(&mut r).unwrap();
        assert_eq!(
            c.metadata["tokenizer.chat_template"].to_string().unwrap(),
            "{{ messages }}"
        );
        let back = c.tensor(&mut r, "blk.0.w", &mistralrs::Device::Cpu).unwrap();
        assert_eq!(back.dtype(), GgmlDType::F32);
        let want = q.dequantize(&mistralrs::Device::Cpu).unwrap().flatten_all().unwrap();
        let got = back.dequantize(&mistralrs::Device::Cpu).unwrap().flatten_all().unwrap();
        assert_eq!(
            got.to_vec1::<f32>().unwrap(),
            want.to_vec1::<f32>().unwrap(),
            "bit for bit"
        );

        // A file with no quantized tensor is loaded as it is.
        assert!(F32Copy::of(copy.path()).unwrap().is_none());
        drop(copy);
        assert!(!folder.exists(), "{} left behind", folder.display());
    }

    /// Feeds the tally as mistral.rs does: once per sampled token, with the
    /// prompt and the tokens sampled before.
    fn tally_of(prompt: usize, sampled: usize) -> SampleTally {
        let tally = SampleTally::default();
        let logits = Tensor::new(&[0.5f32, -1.0, 2.0], &mistralrs::Device::Cpu).unwrap();
        let context: Vec<u32> = (0..u32::try_from(prompt + sampled).unwrap()).collect();
        for k in 0..sampled {
            let out = tally.apply(&logits, &context[..prompt + k]).unwrap();
            assert_eq!(
                out.to_vec1::<f32>().unwrap(),
                vec![0.5, -1.0, 2.0],
                "logits pass through"
            );
        }
        tally
    }

    #[test]
    fn the_prefill_slot_is_freed_at_the_first_sampled_token() {
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let tally = SampleTally::default();
        tally.hold_until_sampled(Some(slots.clone().try_acquire_owned().unwrap()));
        assert_eq!(slots.available_permits(), 0);
        let logits = Tensor::new(&[0.5f32, -1.0], &mistralrs::Device::Cpu).unwrap();
        tally.apply(&logits, &[1, 2, 3]).unwrap();
        assert_eq!(slots.available_permits(), 1);
        // A request dropped before its prompt step frees it too.
        let tally = SampleTally::default();
        tally.hold_until_sampled(Some(slots.clone().try_acquire_owned().unwrap()));
        drop(tally);
        assert_eq!(slots.available_permits(), 1);
    }

    #[test]
    fn the_sample_tally_counts_tokens_and_tells_length_from_end_of_text() {
        assert!(
            SampleTally::default().summary(8).is_none(),
            "nothing sampled: no summary"
        );

        let cut = tally_of(40, 8).summary(8).unwrap();
        assert_eq!(
            cut.usage,
            Usage {
                prompt_tokens: 40,
                completion_tokens: 8
            }
        );
        assert_eq!(cut.finish_reason, FinishReason::Length);
        assert!(cut.decode_tokens_per_second > 0.0);

        let ended = tally_of(40, 5).summary(8).unwrap();
        assert_eq!(
            ended.usage,
            Usage {
                prompt_tokens: 40,
                completion_tokens: 5
            }
        );
        assert_eq!(ended.finish_reason, FinishReason::Stop);

        // A one-token answer is sampled twice (mistral.rs revives a sequence
        // its prompt step finished); the extra token is not counted.
        let one = tally_of(40, 2).summary(1).unwrap();
        assert_eq!(
            one.usage,
            Usage {
                prompt_tokens: 40,
                completion_tokens: 1
            }
        );
        assert_eq!(one.finish_reason, FinishReason::Length);
    }
}
