//! Loading a GGUF model into mistral.rs: options, the f32 copy for router
//! engines, and the one mistral.rs log line that is a false alarm.

use super::*;

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
pub(super) fn model_dtype(a: Activations) -> ModelDType {
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

/// An f32 copy of a quantized GGUF file in a temporary folder, deleted on drop.
pub(super) struct F32Copy {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl F32Copy {
    /// Write the copy of `model`, or `None` when it holds no quantized tensor.
    pub(super) fn of(model: &Path) -> Result<Option<Self>, crate::model_prep::PrepError> {
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

    pub(super) fn path(&self) -> &Path {
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
}
