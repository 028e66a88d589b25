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

/// mistral.rs 0.8.1 warns on every CPU load that the "device mapping
/// contains a mix of GPU and CPU" and that it disables paged attention,
/// whatever was asked. flywheel decides paged attention itself (never on the
/// CPU; `paged_attention = "on"` with a CPU device is refused at config load),
/// so on a CPU-only machine the line is false and only alarms: it is dropped,
/// by call site (target, file, line; a later mistral.rs moves the line and
/// the warning shows again).
pub fn is_false_alarm(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() == "mistralrs_core::pipeline::gguf"
        && *meta.level() == tracing::Level::WARN
        && meta.file().is_some_and(|f| f.ends_with("pipeline/gguf.rs"))
        && meta.line() == Some(407)
}

/// mistral.rs's name for an activation type.
fn model_dtype(a: Activations) -> ModelDType {
    match a {
        Activations::F32 => ModelDType::F32,
        Activations::Bf16 => ModelDType::BF16,
        Activations::F16 => ModelDType::F16,
        Activations::Auto => ModelDType::Auto,
    }
}

/// How to load a GGUF model.
#[derive(Debug, Clone)]
pub struct MistralOptions {
    /// The `.gguf` file.
    pub path: PathBuf,
    /// Answers a generation engine runs at once; it queues the rest itself.
    /// `None`: [`DEFAULT_MAX_NUM_SEQS`](crate::config::DEFAULT_MAX_NUM_SEQS)
    /// with paged attention, else
    /// [`DEFAULT_MAX_NUM_SEQS_CPU`](crate::config::DEFAULT_MAX_NUM_SEQS_CPU).
    pub max_num_seqs: Option<usize>,
    /// Finished sequences kept in the prefix cache.
    pub prefix_cache_n: usize,
    /// Device.
    pub device: DeviceChoice,
    /// Activation and KV-cache type.
    pub activations: Activations,
    /// Weights as stored or dequantized to f32 ([`Weights`]).
    pub weights: Weights,
    /// This engine makes route decisions (see the module docs).
    pub router: bool,
    /// Paged attention for a generation engine on a GPU (see [`crate::config::paged`]).
    pub paged_attention: PagedAttention,
    /// Tokens the paged KV cache holds, all sequences together.
    pub paged_kv_tokens: usize,
}

impl MistralOptions {
    /// Options for `path` with the defaults of a `[models.*]` entry on the CPU.
    pub fn new(path: impl Into<PathBuf>, router: bool) -> Self {
        Self {
            path: path.into(),
            max_num_seqs: None,
            prefix_cache_n: crate::config::DEFAULT_PREFIX_CACHE_N,
            device: DeviceChoice::Cpu,
            activations: Activations::F32,
            weights: Weights::Auto,
            router,
            paged_attention: PagedAttention::Auto,
            paged_kv_tokens: crate::config::paged::DEFAULT_PAGED_KV_TOKENS,
        }
    }
}

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

/// An f32 copy of a quantized GGUF file in a temporary folder, deleted on drop.
struct F32Copy {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl F32Copy {
    /// Write the copy of `model`, or `None` when it holds no quantized tensor.
    fn of(model: &Path) -> Result<Option<Self>, crate::model_prep::PrepError> {
        use crate::model_prep::{PrepError, dequantize_f32, has_quantized_tensors};
        if !has_quantized_tensors(model)? {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("flywheel-f32-")
            .tempdir()
            .map_err(|source| PrepError::Io {
                action: "cannot create a folder in",
                path: std::env::temp_dir(),
                source,
            })?;
        let name = model
            .file_name()
            .map_or_else(|| "model.gguf".into(), |n| n.to_os_string());
        let path = dir.path().join(name);
        let report = dequantize_f32(model, &path)?;
        tracing::info!(
            model = %model.display(),
            bytes = report.output_bytes,
            ms = started.elapsed().as_millis() as u64,
            "weights dequantized to f32"
        );
        Ok(Some(Self { _dir: dir, path }))
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl MistralEngine {
    /// Load a GGUF model from a local file. Never touches the network: the
    /// tokenizer and chat template come from the GGUF metadata.
    ///
    /// # Errors
    /// [`EngineError::ModelNotFound`] for a missing file, [`EngineError::Load`]
    /// when mistral.rs cannot load it.
    pub async fn load(opts: &MistralOptions) -> Result<Self, EngineError> {
        let path = &opts.path;
        let not_found = || EngineError::ModelNotFound {
            path: path.display().to_string(),
        };
        if !path.is_file() {
            return Err(not_found());
        }
        // The router's cache holds only the primed prefix (raw requests are
        // never added), so it needs one entry whatever the setting says.
        let prefix_cache_n = if opts.router {
            opts.prefix_cache_n.max(1)
        } else {
            opts.prefix_cache_n
        };
        let load_err = |source: anyhow::Error| EngineError::Load {
            path: path.display().to_string(),
            source,
        };
        let device = opts.device.open().map_err(|e| load_err(anyhow::Error::new(e)))?;
        let paged = opts
            .paged_attention
            .resolve(&device, opts.router)
            .map_err(|m| load_err(anyhow::anyhow!(m)))?;
        let paged_config = if paged {
            Some(
                PagedAttentionConfig::new(
                    None,
                    MemoryGpuConfig::ContextSize(opts.paged_kv_tokens),
                    PagedCacheType::Auto,
                )
                .map_err(load_err)?,
            )
        } else {
            None
        };
        // Made after the cheap checks above; held until mistral.rs has read
        // the tensors (it keeps no file open).
        let f32_copy =
            if opts.weights.dequantize(opts.router) {
                F32Copy::of(path).map_err(|e| {
                    load_err(anyhow::Error::new(e).context(
                        "making the f32 copy of the weights (TMPDIR sets where; weights = \"stored\" skips it)",
                    ))
                })?
            } else {
                None
            };
        let load_path = f32_copy.as_ref().map_or(path.as_path(), F32Copy::path);
        let dir = load_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let file = load_path
            .file_name()
            .ok_or_else(not_found)?
            .to_string_lossy()
            .to_string();
        // The loader mistral.rs's `GgufModelBuilder` wraps, called directly so
        // that the model goes on the device asked for (the builder always
        // picks GPU 0) with the activation type asked for (the builder always
        // picks bf16 where a matmul accepts it).
        let loader = GGUFLoaderBuilder::new(
            None,
            None,
            dir.to_string_lossy().to_string(),
            vec![file],
            GGUFSpecificConfig { topology: None },
            false,
            None,
        )
        .build();
        let pipeline = loader
            .load_model_from_hf(
                None,
                TokenSource::None,
                &model_dtype(opts.activations),
                &device,
                true,
                DeviceMapSetting::dummy(),
                None,
                paged_config,
            )
            .map_err(load_err)?;
        let f32_weights = f32_copy.is_some();
        drop(f32_copy);
        let paged_answers = opts.max_num_seqs.unwrap_or(DEFAULT_MAX_NUM_SEQS).max(1);
        let paged_scheduler = if paged {
            paged_scheduler(&pipeline, paged_answers).await
        } else {
            None
        };
        if paged && paged_scheduler.is_none() {
            let why = "mistral.rs loaded the model without paged attention";
            if opts.paged_attention == PagedAttention::On {
                return Err(load_err(anyhow::anyhow!(
                    "{why}; set paged_attention = \"auto\" or \"off\""
                )));
            }
            tracing::warn!(model = %path.display(), "{why}: using the contiguous KV cache");
        }
        let paged = paged_scheduler.is_some();
        if paged {
            tracing::info!(model = %path.display(), kv_tokens = opts.paged_kv_tokens, "paged attention on");
        }
        // Answers at once (see `MistralOptions::max_num_seqs`).
        let answers = if paged {
            paged_answers
        } else {
            opts.max_num_seqs.unwrap_or(DEFAULT_MAX_NUM_SEQS_CPU).max(1)
        };
        // Label-scoring passes are not admitted as answers: the default
        // scheduler takes them beside however many answers run.
        let scheduler = paged_scheduler.unwrap_or(SchedulerConfig::DefaultScheduler {
            method: DefaultSchedulerMethod::Fixed(
                NonZeroUsize::new(answers.max(DEFAULT_MAX_NUM_SEQS)).unwrap_or(NonZeroUsize::MIN),
            ),
        });
        // A paged engine's prefix cache is block-level inside its KV pool
        // (bounded, no copies), so it stays on whatever `prefix_cache_n` says.
        let no_prefix_cache = prefix_cache_n == 0 && !paged;
        let runner = MistralRsBuilder::new(pipeline, scheduler, false, None)
            .with_no_kv_cache(false)
            .with_no_prefix_cache(no_prefix_cache)
            .with_prefix_cache_n(prefix_cache_n.max(1))
            .build()
            .await;
        let model = Model::new(runner);
        Ok(Self {
            model,
            plans: Mutex::new(HashMap::new()),
            router: opts.router,
            prompt_gate: Arc::new(tokio::sync::Mutex::new(())),
            admission: Arc::new(tokio::sync::Semaphore::new(answers)),
            prefill: (!paged && !opts.router && answers > PREFILL_SLOTS)
                .then(|| Arc::new(tokio::sync::Semaphore::new(PREFILL_SLOTS))),
            paged,
            f32_weights,
        })
    }

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

/// The PagedAttention scheduler for a pipeline loaded with paged attention
/// (`None` when mistral.rs turned it off, e.g. for a model on the CPU).
async fn paged_scheduler<P: ?Sized + mistralrs::core::Pipeline>(
    pipeline: &tokio::sync::Mutex<P>,
    max_num_seqs: usize,
) -> Option<SchedulerConfig> {
    let config = pipeline.lock().await.get_metadata().cache_config.clone()?;
    Some(SchedulerConfig::PagedAttentionMeta { max_num_seqs, config })
}

/// The receiving end of one mistral.rs request, kept until the engine has
/// let go of the request.
///
/// mistral.rs 0.8.1 stops its engine thread when it cannot deliver a
/// tokenization, a raw-logit answer or a non-streamed answer (a panic in the
/// engine loop: every sequence in it fails, and the next request restarts
/// it with its caches empty). A cancelled gRPC call drops the future that
/// waits here, so an `Inbox` dropped before the engine is done hands its
/// receiver to a background task that takes what is still coming. It also
/// holds a router's prompt gate, given back once the engine has retired the
/// sequence, at most [`RAW_SEQUENCE_RETIRE_TIMEOUT`] after its answer.
/// Streamed answers need none of this: mistral.rs cancels a streamed
/// sequence whose receiver is gone.
struct Inbox<T: Send + 'static> {
    rx: Option<mpsc::Receiver<T>>,
    gate: Option<OwnedMutexGuard<()>>,
    /// A response arrived: the request's prompt step is done.
    answered: bool,
}

impl<T: Send + 'static> Inbox<T> {
    fn new(rx: mpsc::Receiver<T>, gate: Option<OwnedMutexGuard<()>>) -> Self {
        Self {
            rx: Some(rx),
            gate,
            answered: false,
        }
    }

    async fn recv(&mut self) -> Option<T> {
        let item = self.rx.as_mut()?.recv().await;
        self.answered |= item.is_some();
        item
    }

    /// Wait until the engine drops the request (its channel closes), at
    /// most [`RAW_SEQUENCE_RETIRE_TIMEOUT`], and give back the gate.
    async fn retire(mut self) -> Option<OwnedMutexGuard<()>> {
        if let Some(rx) = self.rx.as_mut()
            && tokio::time::timeout(RAW_SEQUENCE_RETIRE_TIMEOUT, drain(rx))
                .await
                .is_ok()
        {
            self.rx = None;
        }
        self.gate.take()
    }
}

impl<T: Send + 'static> Drop for Inbox<T> {
    fn drop(&mut self) {
        let (Some(mut rx), gate, answered) = (self.rx.take(), self.gate.take(), self.answered) else {
            return;
        };
        // Nothing can be sent any more, or no runtime to receive it on.
        if rx.is_closed() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // An unanswered request first waits for its prompt step.
            if answered || rx.recv().await.is_some() {
                let _ = tokio::time::timeout(RAW_SEQUENCE_RETIRE_TIMEOUT, drain(&mut rx)).await;
            }
            drop(gate);
            drain(&mut rx).await;
        });
    }
}

/// Receive until every sender is gone.
async fn drain<T>(rx: &mut mpsc::Receiver<T>) {
    while rx.recv().await.is_some() {}
}

/// The last position's logits of a `[.., vocab]` tensor.
fn last_row(t: &Tensor) -> mistralrs::Result<Vec<f32>> {
    let t = t.to_dtype(mistralrs::DType::F32)?;
    let vocab = t.dims().last().copied().unwrap_or(0);
    let rows = t.elem_count() / vocab.max(1);
    t.reshape((rows, vocab))?.get(rows.saturating_sub(1))?.to_vec1::<f32>()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn to_mistral_messages(messages: &[ChatMessage]) -> Vec<IndexMap<String, MessageContent>> {
    messages
        .iter()
        .map(|m| {
            let mut map = IndexMap::new();
            map.insert("role".to_string(), Either::Left(m.role.as_str().to_string()));
            map.insert("content".to_string(), Either::Left(m.content.clone()));
            map
        })
        .collect()
}

fn response_error(response: Response) -> EngineError {
    match response {
        Response::ValidationError(e) => EngineError::Rejected(e.to_string()),
        Response::InternalError(e) => EngineError::Backend(anyhow::anyhow!(e.to_string())),
        Response::ModelError(msg, _) | Response::CompletionModelError(msg, _) => {
            EngineError::Backend(anyhow::anyhow!(msg))
        }
        _ => EngineError::Backend(anyhow::anyhow!("unexpected response kind from mistral.rs")),
    }
}

fn finish_reason(s: &str) -> FinishReason {
    match s {
        "stop" | "eos" => FinishReason::Stop,
        "length" => FinishReason::Length,
        other => FinishReason::Other(other.to_string()),
    }
}

#[async_trait]
impl Engine for MistralEngine {
    fn backend(&self) -> &'static str {
        "mistralrs"
    }

    async fn generate(&self, messages: Vec<ChatMessage>, params: GenerateParams) -> Result<TokenStream, EngineError> {
        if self.router {
            return Err(EngineError::Rejected(
                "this engine is reserved for route decisions; load another engine to generate".into(),
            ));
        }
        let greedy = params.temperature.is_none_or(|t| t <= 0.0);
        // mistral.rs takes no per-request seed: a seeded request samples in
        // its own logits processor and leaves mistral.rs one token to take.
        let seeded = match (params.seed, params.temperature) {
            (Some(seed), Some(t)) if !greedy => Some(Arc::new(SeededLogits(SeededSampler::new(seed, t, params.top_p)))),
            _ => None,
        };
        let sampling = SamplingParams {
            temperature: if greedy || seeded.is_some() {
                None
            } else {
                params.temperature
            },
            top_k: if greedy || seeded.is_some() { Some(1) } else { None },
            top_p: if seeded.is_some() { None } else { params.top_p },
            max_len: Some(params.max_tokens.max(1)),
            ..SamplingParams::neutral()
        };
        let (tx, mut rx) = mpsc::channel(RESPONSE_BUFFER);
        let mut request = NormalRequest::new_simple(
            RequestMessage::Chat {
                messages: to_mistral_messages(&messages),
                enable_thinking: None,
                reasoning_effort: None,
            },
            sampling,
            tx,
            0,
            None,
            None,
        );
        request.is_streaming = true;
        let tally = Arc::new(SampleTally::default());
        let mut processors = vec![tally.clone() as Arc<dyn CustomLogitsProcessor>];
        processors.extend(seeded.map(|s| s as Arc<dyn CustomLogitsProcessor>));
        request.logits_processors = Some(processors);
        let max_len = params.max_tokens.max(1);
        // Held until the stream ends or is dropped (the semaphores are never closed).
        let admitted = self.admission.clone().acquire_owned().await.ok();
        if let Some(prefill) = &self.prefill {
            // Freed by the tally at the first sampled token, or with the request.
            tally.hold_until_sampled(prefill.clone().acquire_owned().await.ok());
        }
        let sender = self.sender()?;
        sender
            .send(Request::Normal(Box::new(request)))
            .await
            .map_err(|_| EngineError::Disconnected)?;
        // Stop strings are ours (see `super::stop`), not mistral.rs's.
        let mut stops = StopFilter::new(&params.stop);
        let stream = async_stream(move |out| async move {
            loop {
                let response = tokio::select! {
                    r = rx.recv() => r,
                    // The caller dropped the stream: return now, dropping `rx`,
                    // which makes mistral.rs cancel the sequence at its next token.
                    () = out.closed() => return,
                };
                let Some(response) = response else { break };
                match response {
                    Response::Chunk(chunk) => {
                        let mut finished = None;
                        for choice in chunk.choices {
                            if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                                let (text, stopped) = match stops.as_mut() {
                                    Some(f) => f.push(&text),
                                    None => (text, false),
                                };
                                if !text.is_empty() && out.send(Ok(GenerationEvent::Delta(text))).await.is_err() {
                                    return; // caller went away: dropping `rx` cancels the sequence
                                }
                                if stopped {
                                    // A stop string: the answer ends here, and
                                    // returning drops `rx`, which cancels the sequence.
                                    let mut summary = tally.summary(max_len).unwrap_or_else(usage_free_summary);
                                    summary.finish_reason = FinishReason::Stop;
                                    let _ = out.send(Ok(GenerationEvent::Done(summary))).await;
                                    return;
                                }
                            }
                            if let Some(reason) = choice.finish_reason {
                                finished = Some(reason);
                            }
                        }
                        if let Some(reason) = finished {
                            if !release_held(&out, &mut stops).await {
                                return;
                            }
                            let usage = chunk.usage.unwrap_or_default_usage();
                            let _ = out.send(Ok(GenerationEvent::Done(usage.summary(&reason)))).await;
                            return;
                        }
                    }
                    Response::Done(done) => {
                        let reason = done
                            .choices
                            .first()
                            .map(|c| c.finish_reason.clone())
                            .unwrap_or_default();
                        let summary = done.usage.summary(&reason);
                        if release_held(&out, &mut stops).await {
                            let _ = out.send(Ok(GenerationEvent::Done(summary))).await;
                        }
                        return;
                    }
                    other => {
                        let _ = out.send(Err(response_error(other))).await;
                        return;
                    }
                }
            }
            // The sequence's channel closed without a final chunk. With the
            // engine still running and tokens sampled, that is mistral.rs
            // finishing an answer whose text ends inside a character (see
            // `SampleTally`): finish it here. Otherwise the engine stopped.
            let event = match tally.summary(max_len) {
                Some(summary) if !sender.is_closed() => {
                    if !release_held(&out, &mut stops).await {
                        return;
                    }
                    tracing::debug!(
                        completion_tokens = summary.usage.completion_tokens,
                        "mistral.rs ended a stream inside a multi-byte character; finishing it without that character"
                    );
                    Ok(GenerationEvent::Done(summary))
                }
                _ => Err(EngineError::Disconnected),
            };
            let _ = out.send(event).await;
            drop(admitted);
        });
        Ok(stream)
    }

    async fn score_labels(&self, messages: &[ChatMessage], labels: &LabelSet) -> Result<LabelScores, EngineError> {
        let plan = self.plan_for(labels).await?;
        let prompt = self.tokenize(Either::Left(messages), true).await?;
        let step_tokens =
            |step: &super::labels::PlanStep| -> Vec<u32> { prompt.iter().chain(&step.prefix).copied().collect() };
        let step_logprobs: Vec<Vec<f32>> = if self.router {
            let mut gate = Some(self.prompt_gate.clone().lock_owned().await);
            let mut out = Vec::with_capacity(plan.steps().len());
            let mut steps = plan.steps().iter().peekable();
            while let Some(step) = steps.next() {
                let (logprobs, inbox) = self
                    .raw_next_token_logprobs(step_tokens(step), &step.next_tokens, gate.take())
                    .await;
                out.push(logprobs?);
                // After the last step the decision is known: answer now. The
                // dropped inbox lets the gate go once the engine has retired
                // the sequence (one more engine step the caller need not
                // wait for), as it does on an error or a cancelled call.
                if steps.peek().is_some() {
                    gate = inbox.retire().await;
                }
            }
            out
        } else {
            let passes = plan
                .steps()
                .iter()
                .map(|step| self.next_token_logprobs(step_tokens(step), step.next_tokens.clone(), None));
            futures::future::try_join_all(passes).await?
        };
        Ok(LabelScores {
            logprobs: plan.combine(&step_logprobs),
            prompt_tokens: prompt.len() as u32,
            forward_passes: plan.steps().len() as u32,
        })
    }

    async fn warm_up(&self, messages: &[ChatMessage]) -> Result<(), EngineError> {
        let tokens = self.tokenize(Either::Left(messages), true).await?;
        // A normal (non-raw) request: its finished sequence enters the prefix
        // cache, so later prompts sharing this prefix skip its prefill.
        let gate = if self.router {
            Some(self.prompt_gate.clone().lock_owned().await)
        } else {
            None
        };
        let lp = self.next_token_logprobs(tokens, vec![0], gate).await?;
        if lp.iter().any(|v| v.is_nan()) {
            return Err(EngineError::Backend(anyhow::anyhow!("model produced NaN logits")));
        }
        Ok(())
    }
}

trait UsageExt {
    fn unwrap_or_default_usage(self) -> mistralrs::Usage;
}

impl UsageExt for Option<mistralrs::Usage> {
    fn unwrap_or_default_usage(self) -> mistralrs::Usage {
        self.unwrap_or(mistralrs::Usage {
            completion_tokens: 0,
            prompt_tokens: 0,
            total_tokens: 0,
            avg_tok_per_sec: 0.0,
            avg_prompt_tok_per_sec: 0.0,
            avg_compl_tok_per_sec: 0.0,
            total_time_sec: 0.0,
            total_prompt_time_sec: 0.0,
            total_completion_time_sec: 0.0,
        })
    }
}

trait SummaryExt {
    fn summary(&self, reason: &str) -> GenerationSummary;
}

impl SummaryExt for mistralrs::Usage {
    fn summary(&self, reason: &str) -> GenerationSummary {
        GenerationSummary {
            usage: Usage {
                prompt_tokens: self.prompt_tokens as u32,
                completion_tokens: self.completion_tokens as u32,
            },
            finish_reason: finish_reason(reason),
            prefill_tokens_per_second: f64::from(self.avg_prompt_tok_per_sec),
            decode_tokens_per_second: f64::from(self.avg_compl_tok_per_sec),
        }
    }
}

/// What mistral.rs sampled for one streamed sequence, seen from a logits
/// processor: it runs once per sampled token, with the sequence's tokens so
/// far, and passes the logits through unchanged.
///
/// mistral.rs 0.8.1 sends a streamed sequence's final chunk (finish reason
/// and usage) only when the text so far ends on a whole UTF-8 character. An
/// answer that stops inside a multi-byte character (cut at `max_tokens` in
/// the middle of a CJK character or an emoji, which take several byte-level
/// tokens) gets no final chunk: its channel just closes. The tally lets
/// [`MistralEngine::generate`] finish such an answer with exact token counts;
/// the unfinished character is dropped.
///
/// It also holds the answer's prefill slot (see [`PREFILL_SLOTS`]) until the
/// first token is sampled, which is when the prompt step has run.
#[derive(Default)]
struct SampleTally {
    mark: Mutex<Option<TallyMark>>,
    prefilling: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

/// The tally after the latest sampled token.
#[derive(Clone, Copy)]
struct TallyMark {
    /// Tokens sampled so far.
    sampled: usize,
    /// Tokens in the context at the latest call.
    context_len: usize,
    /// When the first and the latest token were sampled.
    first: std::time::Instant,
    last: std::time::Instant,
}

/// A [`SeededSampler`] as a mistral.rs logits processor: every token but
/// the one it draws becomes impossible.
struct SeededLogits(SeededSampler);

impl CustomLogitsProcessor for SeededLogits {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> mistralrs::Result<Tensor> {
        let values: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let chosen = self.0.choose(&values);
        let mut only = vec![f32::NEG_INFINITY; values.len()];
        only[chosen] = 0.0;
        Tensor::from_vec(only, logits.shape(), logits.device())?.to_dtype(logits.dtype())
    }
}

impl CustomLogitsProcessor for SampleTally {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> mistralrs::Result<Tensor> {
        let now = std::time::Instant::now();
        drop(lock(&self.prefilling).take());
        let mut mark = lock(&self.mark);
        *mark = Some(TallyMark {
            sampled: mark.map_or(0, |m| m.sampled) + 1,
            context_len: context.len(),
            first: mark.map_or(now, |m| m.first),
            last: now,
        });
        Ok(logits.clone())
    }
}

impl SampleTally {
    /// Keep `slot` until the first sampled token.
    fn hold_until_sampled(&self, slot: Option<tokio::sync::OwnedSemaphorePermit>) {
        *lock(&self.prefilling) = slot;
    }

    /// The summary of a sequence that ended after sampling, or `None` if
    /// nothing was sampled. `max_len` is the request's token cap: a sequence
    /// that sampled that many stopped for length, any other stopped at its end
    /// of text (the only other stop of a request without stop strings).
    ///
    /// A sequence that finishes at its prompt step is sampled once more:
    /// mistral.rs 0.8.1 sets every sequence of a prompt step running after
    /// the step, which revives one that the step finished. That extra token
    /// is not part of the answer (no text of it is sent when the first token
    /// completed a character) and is not counted.
    fn summary(&self, max_len: usize) -> Option<GenerationSummary> {
        let mark = (*lock(&self.mark))?;
        let sampled = mark.sampled;
        // From the second token on, the context is the whole prompt plus the
        // tokens sampled before this call; at the first it is the prompt (the
        // uncached part of it after a prefix-cache hit).
        let prompt_tokens = mark.context_len.saturating_sub(sampled - 1);
        let decode_secs = (mark.last - mark.first).as_secs_f64();
        Some(GenerationSummary {
            usage: Usage {
                prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
                completion_tokens: u32::try_from(sampled.min(max_len)).unwrap_or(u32::MAX),
            },
            finish_reason: if sampled >= max_len { FinishReason::Length } else { FinishReason::Stop },
            prefill_tokens_per_second: 0.0,
            #[allow(clippy::cast_precision_loss)] // token counts are far below 2^52
            decode_tokens_per_second: if sampled > 1 && decode_secs > 0.0 {
                (sampled - 1) as f64 / decode_secs
            } else {
                0.0
            },
        })
    }
}

/// Send the text a stop filter still holds back, at the end of an answer
/// that reached no stop string; false when the caller went away.
async fn release_held(
    out: &mpsc::Sender<Result<GenerationEvent, EngineError>>,
    stops: &mut Option<StopFilter>,
) -> bool {
    match stops.as_mut().map(StopFilter::finish) {
        Some(tail) if !tail.is_empty() => out.send(Ok(GenerationEvent::Delta(tail))).await.is_ok(),
        _ => true,
    }
}

/// A summary with no counts (a stop string before any token was tallied).
fn usage_free_summary() -> GenerationSummary {
    GenerationSummary {
        usage: Usage::default(),
        finish_reason: FinishReason::Stop,
        prefill_tokens_per_second: 0.0,
        decode_tokens_per_second: 0.0,
    }
}

/// Turn a producer closure into a [`TokenStream`]: the producer runs as a task
/// writing into a bounded channel; dropping the stream closes the channel, the
/// producer's next send fails and it returns (dropping what it consumes).
fn async_stream<F, Fut>(producer: F) -> TokenStream
where
    F: FnOnce(mpsc::Sender<Result<GenerationEvent, EngineError>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
    tokio::spawn(producer(tx));
    Box::pin(tokio_stream_from(rx))
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
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
