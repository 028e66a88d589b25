//! The server's one configuration struct: defaults, then an optional TOML
//! file, then `FLYWHEEL_*` environment variables, then command-line flags.
//! Validated once, before any model is loaded or any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};
use flywheel_router::config::{ConfigError, EngineSettings};
use flywheel_router::device::DeviceChoice;
use serde::Deserialize;
use serde::de::IgnoredAny;

/// Default listen address: loopback only, the gRPC port convention.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Shortest accepted admin token: a guessable token is no protection.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;
/// How long shutdown waits for in-flight requests before closing them.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
/// Connections each listener keeps open at once; more wait in the kernel's
/// backlog. Keep it under the process's file-descriptor limit (`ulimit -n`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Time a new connection has to send its first bytes (ms).
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Which engine serves the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// mistral.rs on the configured GGUF models.
    #[default]
    Mistralrs,
    /// No model: a fixed token stream, to measure the server's own overhead.
    Stub,
}

/// One client API key: an id (recorded in the request log) and the SHA-256
/// digest of the key, as `flywheel-server hash-key` prints them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySpec {
    /// Who holds the key (letters, digits, `.`, `_`, `-`; at most 64).
    pub id: String,
    /// Hex SHA-256 digest of the key (64 hex digits).
    pub sha256: String,
}

impl std::str::FromStr for ApiKeySpec {
    type Err = String;

    /// `id:sha256`, as in `FLYWHEEL_API_KEYS=team-a:9f86...,team-b:60303...`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, sha256) = s
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("`{s}` is not `id:sha256` (`flywheel-server hash-key` prints one)"))?;
        Ok(Self {
            id: id.trim().into(),
            sha256: sha256.trim().into(),
        })
    }
}

/// Helper commands instead of serving.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Print the `[[api_keys]]` entry of a client API key: read from standard
    /// input (one line), or a new random key made and printed once with `--new`.
    HashKey {
        /// The key's id (recorded in the request log with each request).
        #[arg(long)]
        id: String,
        /// Make a new random key instead of reading one.
        #[arg(long)]
        new: bool,
    },
}

/// Command-line flags (each also readable from a `FLYWHEEL_*` variable).
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "flywheel-server",
    version,
    about = "gRPC router + expert agents on mistral.rs, with a request log for the data flywheel"
)]
pub struct Flags {
    /// A helper command instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file.
    #[arg(long, env = "FLYWHEEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "FLYWHEEL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Serve the OpenAI-compatible HTTP API on this address (off when unset).
    #[arg(long, env = "FLYWHEEL_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Client API keys as `id:sha256` pairs, comma-separated; when any is set,
    /// Chat, Router and Feedback (gRPC and HTTP) need `authorization: Bearer <key>`.
    #[arg(long, env = "FLYWHEEL_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<ApiKeySpec>,
    /// Engine: `mistralrs` (default) or `stub` (no model, for overhead benchmarks).
    #[arg(long, env = "FLYWHEEL_ENGINE", value_enum)]
    pub engine: Option<EngineKind>,
    /// Serve this GGUF file in every model entry.
    #[arg(long, env = "FLYWHEEL_MODEL")]
    pub model: Option<PathBuf>,
    /// Device of every model (`cpu`, `auto`, `cuda`, `cuda:N`), overriding `[models.*] device`.
    #[arg(long, env = "FLYWHEEL_DEVICE")]
    pub device: Option<DeviceChoice>,
    /// Request-log database file.
    #[arg(long, env = "FLYWHEEL_LOG_PATH")]
    pub log_path: Option<PathBuf>,
    /// PostgreSQL URL of a request log shared by several replicas (instead of the file).
    #[arg(long, env = "FLYWHEEL_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,
    /// Requests admitted at once.
    #[arg(long, env = "FLYWHEEL_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Folder of the jailbreak rail's sentence embedder (all-MiniLM-L6-v2).
    #[arg(long, env = "FLYWHEEL_EMBEDDER")]
    pub embedder: Option<PathBuf>,
    /// Stub engine only: delay before each token, in milliseconds.
    #[arg(long, env = "FLYWHEEL_STUB_TOKEN_DELAY_MS")]
    pub stub_token_delay_ms: Option<u64>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address (off when unset).
    #[arg(long, env = "FLYWHEEL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Model registry folder (versions that `Admin.Promote` can serve); promotion is off when unset.
    #[arg(long, env = "FLYWHEEL_REGISTRY_DIR")]
    pub registry_dir: Option<PathBuf>,
    /// Token that mutating Admin calls must present (`authorization: Bearer <token>`).
    #[arg(long, env = "FLYWHEEL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Export traces over OTLP/gRPC to this collector (e.g. `http://127.0.0.1:4317`);
    /// off when unset (`OTEL_EXPORTER_OTLP_ENDPOINT` also turns it on).
    #[arg(long, env = "FLYWHEEL_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Name of this replica in `Admin.Status` (default: host name and process id).
    #[arg(long, env = "FLYWHEEL_REPLICA_ID")]
    pub replica_id: Option<String>,
}

/// The TOML file: every section optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    replica_id: Option<String>,
    listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    api_keys: Option<Vec<ApiKeySpec>>,
    engine: Option<EngineKind>,
    shutdown_grace_ms: Option<u64>,
    max_connections: Option<usize>,
    handshake_timeout_ms: Option<u64>,
    stub_token_delay_ms: Option<u64>,
    stub_sign_tokens: Option<bool>,
    metrics_listen: Option<SocketAddr>,
    registry_dir: Option<PathBuf>,
    admin_token: Option<String>,
    otlp_endpoint: Option<String>,
    // The domain's sections, read by `EngineSettings::from_config_file`;
    // named here so that an unknown top-level key is refused.
    #[serde(rename = "models")]
    _models: Option<IgnoredAny>,
    #[serde(rename = "router")]
    _router: Option<IgnoredAny>,
    #[serde(rename = "experts")]
    _experts: Option<IgnoredAny>,
    #[serde(rename = "limits")]
    _limits: Option<IgnoredAny>,
    #[serde(rename = "log")]
    _log: Option<IgnoredAny>,
    #[serde(rename = "feedback")]
    _feedback: Option<IgnoredAny>,
    #[serde(rename = "rails")]
    _rails: Option<IgnoredAny>,
    #[serde(rename = "retrieval")]
    _retrieval: Option<IgnoredAny>,
}

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (line, column, field).
        source: toml::de::Error,
    },
    /// A value is out of range or a reference dangles.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// The server's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// OpenAI-compatible HTTP API address (off when `None`).
    pub http_listen: Option<SocketAddr>,
    /// Client API keys; empty: Chat, Router and Feedback are open.
    pub api_keys: Vec<ApiKeySpec>,
    /// Engine kind.
    pub engine: EngineKind,
    /// Drain deadline on shutdown (ms).
    pub shutdown_grace_ms: u64,
    /// Connections each listener (gRPC, HTTP) keeps open at once.
    pub max_connections: usize,
    /// A connection that has not sent its handshake (the HTTP/2 preface, an
    /// HTTP/1 request line) this long after it was accepted is closed (ms).
    pub handshake_timeout_ms: u64,
    /// Stub engine per-token delay (ms).
    pub stub_token_delay_ms: u64,
    /// Stub engine: sign every streamed word with the model version
    /// (`word@version`), so tests see which model produced each token.
    pub stub_sign_tokens: bool,
    /// Prometheus metrics address (off when `None`).
    pub metrics_listen: Option<SocketAddr>,
    /// Model registry folder (promotion off when `None`).
    pub registry_dir: Option<PathBuf>,
    /// Token of mutating Admin calls (`UpdateRails`, `Promote`, `Rollback`);
    /// without one those calls are refused.
    pub admin_token: Option<String>,
    /// OpenTelemetry collector receiving traces over OTLP/gRPC (off when `None`).
    pub otlp_endpoint: Option<String>,
    /// Name of this replica (`Admin.Status`).
    pub replica_id: String,
    /// Models, router, experts, limits, log.
    pub settings: EngineSettings,
}

/// This process's default replica name: the host's name and the process
/// id (unique among replicas on one host, readable in a pod's logs).
fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            http_listen: None,
            api_keys: Vec::new(),
            engine: EngineKind::default(),
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            stub_token_delay_ms: 0,
            stub_sign_tokens: false,
            metrics_listen: None,
            registry_dir: None,
            admin_token: None,
            otlp_endpoint: None,
            replica_id: default_replica_id(),
            settings: EngineSettings::default(),
        }
    }
}

impl Config {
    /// Build from flags (which clap already merged with the environment).
    ///
    /// # Errors
    /// Unreadable or invalid file, or invalid values.
    pub fn load(flags: &Flags) -> Result<Self, LoadError> {
        let mut config = match &flags.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        if let Some(listen) = flags.listen {
            config.listen = listen;
        }
        if let Some(engine) = flags.engine {
            config.engine = engine;
        }
        if let Some(addr) = flags.http_listen {
            config.http_listen = Some(addr);
        }
        if !flags.api_keys.is_empty() {
            config.api_keys = flags.api_keys.clone();
        }
        check_api_keys(&config.api_keys)?;
        if let Some(model) = &flags.model {
            for spec in config.settings.models.values_mut() {
                spec.path = model.clone();
            }
        }
        if let Some(device) = flags.device {
            for spec in config.settings.models.values_mut() {
                spec.device = device;
            }
        }
        if let Some(path) = &flags.log_path {
            config.settings.log.path = path.clone();
        }
        if let Some(url) = &flags.store_url {
            config.settings.log.store_url = Some(url.clone());
        }
        if let Some(n) = flags.max_in_flight {
            config.settings.limits.max_in_flight = n;
        }
        if let Some(dir) = &flags.embedder {
            config.settings.rails.jailbreak.embedder_dir = dir.clone();
        }
        if let Some(addr) = flags.metrics_listen {
            config.metrics_listen = Some(addr);
        }
        if let Some(ms) = flags.stub_token_delay_ms {
            config.stub_token_delay_ms = ms;
        }
        if let Some(dir) = &flags.registry_dir {
            config.registry_dir = Some(dir.clone());
        }
        if let Some(token) = &flags.admin_token {
            config.admin_token = Some(token.clone());
        }
        if let Some(id) = &flags.replica_id {
            config.replica_id = id.clone();
        }
        check_replica_id(&config.replica_id)?;
        if let Some(endpoint) = &flags.otlp_endpoint {
            config.otlp_endpoint = Some(endpoint.clone());
        }
        if config.otlp_endpoint.is_none() {
            // The OpenTelemetry convention, honoured so collectors set up for
            // other services work unchanged.
            config.otlp_endpoint = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
                .iter()
                .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()));
        }
        if let Some(endpoint) = &config.otlp_endpoint {
            check_endpoint(endpoint)?;
        }
        if config
            .admin_token
            .as_ref()
            .is_some_and(|t| t.trim().len() < MIN_ADMIN_TOKEN_LEN)
        {
            return Err(LoadError::Invalid(ConfigError::Invalid {
                key: "admin_token".into(),
                reason: format!("use at least {MIN_ADMIN_TOKEN_LEN} characters"),
            }));
        }
        for (key, zero) in [
            ("max_connections", config.max_connections == 0),
            ("handshake_timeout_ms", config.handshake_timeout_ms == 0),
        ] {
            if zero {
                return Err(LoadError::Invalid(ConfigError::Invalid {
                    key: key.into(),
                    reason: "must be at least 1".into(),
                }));
            }
        }
        config.settings.validate()?;
        Ok(config)
    }

    /// What the listeners allow.
    pub fn connection_limits(&self) -> crate::listener::ConnectionLimits {
        crate::listener::ConnectionLimits {
            max_connections: self.max_connections,
            handshake_timeout: std::time::Duration::from_millis(self.handshake_timeout_ms),
        }
    }

    fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| LoadError::Parse {
            path: path.into(),
            source,
        })
    }

    /// Parse a TOML document over the defaults (sections left out keep their defaults).
    ///
    /// # Errors
    /// TOML syntax errors and unknown fields.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        let file: FileConfig = toml::from_str(text)?;
        let mut c = Self::default();
        if let Some(v) = file.listen {
            c.listen = v;
        }
        if let Some(v) = file.engine {
            c.engine = v;
        }
        c.http_listen = file.http_listen;
        c.api_keys = file.api_keys.unwrap_or_default();
        if let Some(v) = file.shutdown_grace_ms {
            c.shutdown_grace_ms = v;
        }
        if let Some(v) = file.max_connections {
            c.max_connections = v;
        }
        if let Some(v) = file.handshake_timeout_ms {
            c.handshake_timeout_ms = v;
        }
        if let Some(v) = file.metrics_listen {
            c.metrics_listen = Some(v);
        }
        if let Some(v) = file.stub_token_delay_ms {
            c.stub_token_delay_ms = v;
        }
        c.stub_sign_tokens = file.stub_sign_tokens.unwrap_or(false);
        c.registry_dir = file.registry_dir;
        c.admin_token = file.admin_token;
        c.otlp_endpoint = file.otlp_endpoint;
        if let Some(id) = file.replica_id {
            c.replica_id = id;
        }
        c.settings = EngineSettings::from_config_file(text)?;
        Ok(c)
    }
}

/// Key ids are short, plain and unique; digests are 64 hex digits.
///
/// # Errors
/// The first entry that breaks a rule, named by its index.
pub fn check_api_keys(keys: &[ApiKeySpec]) -> Result<(), LoadError> {
    let invalid = |i: usize, reason: String| {
        LoadError::Invalid(ConfigError::Invalid {
            key: format!("api_keys[{i}]"),
            reason,
        })
    };
    for (i, k) in keys.iter().enumerate() {
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if k.id.is_empty() || k.id.len() > 64 || !k.id.chars().all(plain) {
            return Err(invalid(
                i,
                format!(
                    "id `{}` must be 1 to 64 letters, digits, `.`, `_` or `-`",
                    k.id.escape_debug()
                ),
            ));
        }
        if keys[..i].iter().any(|o| o.id == k.id) {
            return Err(invalid(i, format!("id `{}` is used by two keys", k.id)));
        }
        if k.sha256.len() != 64 || !k.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(invalid(
                i,
                format!(
                    "sha256 of `{}` must be 64 hex digits (the key's digest, as `flywheel-server hash-key` prints it), not the key",
                    k.id
                ),
            ));
        }
    }
    Ok(())
}

/// Longest replica name, in characters.
const MAX_REPLICA_ID_CHARS: usize = 128;

/// A replica name is short and printable (it is shown to operators).
fn check_replica_id(id: &str) -> Result<(), LoadError> {
    let n = id.chars().count();
    if id.trim().is_empty() || n > MAX_REPLICA_ID_CHARS || id.chars().any(char::is_control) {
        return Err(LoadError::Invalid(ConfigError::Invalid {
            key: "replica_id".into(),
            reason: format!("must be 1 to {MAX_REPLICA_ID_CHARS} printable characters, got {n}"),
        }));
    }
    Ok(())
}

/// An OTLP/gRPC endpoint must be an `http://` or `https://` URL with a host.
fn check_endpoint(endpoint: &str) -> Result<(), LoadError> {
    let invalid = |reason: &str| {
        LoadError::Invalid(ConfigError::Invalid {
            key: "otlp_endpoint".into(),
            reason: format!("{reason} (got `{endpoint}`; e.g. http://127.0.0.1:4317)"),
        })
    };
    let uri: tonic::codegen::http::Uri = endpoint.parse().map_err(|_| invalid("not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(invalid("use an http:// or https:// URL"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("the URL names no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use flywheel_router::engine::mistral::Activations;

    use super::*;

    #[test]
    fn empty_file_gives_valid_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c, Config::default());
        c.settings.validate().unwrap();
    }

    #[test]
    fn rails_and_feedback_sections_parse_with_per_kind_policies() {
        use flywheel_router::guardrails::pii::PiiKind;
        use flywheel_router::guardrails::rails::{PiiPolicy, TopicPolicy};
        let c = Config::from_toml(
            "[rails.pii]\npolicies = { ssn = \"block\", email = \"allow\" }\n\
             [rails.topic]\npolicy = \"refuse\"\n[rails.jailbreak]\nthreshold = 0.8\n\
             [feedback]\nrephrase_window_s = 30\n",
        )
        .unwrap();
        let r = &c.settings.rails;
        assert_eq!(r.pii.policies[&PiiKind::Ssn], PiiPolicy::Block);
        assert_eq!(r.pii.policies[&PiiKind::Email], PiiPolicy::Allow);
        assert_eq!(r.topic.policy, TopicPolicy::Refuse);
        assert_eq!(r.jailbreak.threshold, Some(0.8));
        assert_eq!(c.settings.feedback.rephrase_window_s, 30);
        c.settings.validate().unwrap();
        let bad = Config::from_toml("[rails.jailbreak]\nthreshold = 1.5\n").unwrap();
        assert!(
            bad.settings
                .validate()
                .unwrap_err()
                .to_string()
                .contains("rails.jailbreak.threshold")
        );
        assert!(Config::from_toml("[rails.pii]\npolicies = { passport = \"block\" }\n").is_err());
    }

    #[test]
    fn sections_override_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:7000\"\n[limits]\nmax_in_flight = 3\n[log]\npath = \"x.db\"\n",
        )
        .unwrap();
        let flags = Flags {
            config: Some(path.clone()),
            ..Flags::default()
        };
        let c = Config::load(&flags).unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.settings.limits.max_in_flight, 3);
        assert_eq!(
            c.settings.limits.max_query_chars,
            flywheel_router::config::DEFAULT_MAX_QUERY_CHARS
        );
        assert_eq!(c.settings.log.path, PathBuf::from("x.db"));
        let flags = Flags {
            config: Some(path),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            max_in_flight: Some(9),
            ..Flags::default()
        };
        let c = Config::load(&flags).unwrap();
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.settings.limits.max_in_flight, 9);
    }

    #[test]
    fn unknown_field_and_bad_reference_are_clear_errors() {
        let err = Config::from_toml("[limits]\nmax_inflight = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_inflight"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, "[router]\nfallback_expert = \"legal\"\n").unwrap();
        let err = Config::load(&Flags {
            config: Some(path),
            ..Flags::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("router.fallback_expert") && err.contains("legal"), "{err}");
    }

    #[test]
    fn the_device_flag_sets_every_model_and_is_checked_against_the_build() {
        let c = Config::load(&Flags {
            device: Some(DeviceChoice::Auto),
            ..Flags::default()
        })
        .unwrap();
        assert!(c.settings.models.values().all(|m| m.device == DeviceChoice::Auto));
        let c = Config::from_toml("[models.m]\npath = \"m.gguf\"\ndevice = \"cuda:1\"\n").unwrap();
        assert_eq!(c.settings.models["m"].device, DeviceChoice::Cuda(1));
        assert!(Config::from_toml("[models.m]\npath = \"m.gguf\"\ndevice = \"tpu\"\n").is_err());
        let gpu = Config::load(&Flags {
            device: Some(DeviceChoice::Cuda(0)),
            ..Flags::default()
        });
        if flywheel_router::device::CUDA_BUILT {
            gpu.unwrap();
        } else {
            let err = gpu.unwrap_err().to_string();
            assert!(err.contains(".device") && err.contains("CUDA support"), "{err}");
        }
    }

    #[test]
    fn activations_default_to_f32_and_unknown_types_are_refused() {
        let c = Config::from_toml("[models.m]\npath = \"m.gguf\"\n").unwrap();
        assert_eq!(c.settings.models["m"].activations, Activations::F32);
        let c = Config::from_toml("[models.m]\npath = \"m.gguf\"\nactivations = \"bf16\"\n").unwrap();
        assert_eq!(c.settings.models["m"].activations, Activations::Bf16);
        let err = Config::from_toml("[models.m]\npath = \"m.gguf\"\nactivations = \"fp8\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
    }

    #[test]
    fn weights_default_to_auto_and_unknown_kinds_are_refused() {
        use flywheel_router::engine::mistral::Weights;
        let c = Config::from_toml("[models.m]\npath = \"m.gguf\"\n").unwrap();
        assert_eq!(c.settings.models["m"].weights, Weights::Auto);
        let c = Config::from_toml("[models.m]\npath = \"m.gguf\"\nweights = \"stored\"\n").unwrap();
        assert_eq!(c.settings.models["m"].weights, Weights::Stored);
        let err = Config::from_toml("[models.m]\npath = \"m.gguf\"\nweights = \"f16\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("f16") && err.contains("auto, stored or f32"), "{err}");
    }

    #[test]
    fn paged_attention_defaults_to_auto_and_on_needs_a_device_that_can_be_a_gpu() {
        use flywheel_router::config::paged::{DEFAULT_PAGED_KV_TOKENS, PagedAttention};
        let model = |extra: &str| format!("[models.smollm2]\npath = \"m.gguf\"\n{extra}");
        let c = Config::from_toml(&model("")).unwrap();
        let m = &c.settings.models["smollm2"];
        assert_eq!(
            (m.paged_attention, m.paged_kv_tokens),
            (PagedAttention::Auto, DEFAULT_PAGED_KV_TOKENS)
        );
        c.settings.validate().unwrap();

        let c = Config::from_toml(&model("paged_attention = \"off\"\npaged_kv_tokens = 4096\n")).unwrap();
        let m = &c.settings.models["smollm2"];
        assert_eq!((m.paged_attention, m.paged_kv_tokens), (PagedAttention::Off, 4096));
        c.settings.validate().unwrap();

        let refused = |extra: &str| {
            Config::from_toml(&model(extra))
                .unwrap()
                .settings
                .validate()
                .unwrap_err()
                .to_string()
        };
        // `on` with the CPU can never hold: refused before any model is read.
        let err = refused("paged_attention = \"on\"\n");
        assert!(
            err.contains("models.smollm2.paged_attention") && err.contains("device = \"cpu\""),
            "{err}"
        );
        // The device flag applies before the check: with `auto` it may hold.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, model("paged_attention = \"on\"\n")).unwrap();
        let flags = |device| Flags {
            config: Some(path.clone()),
            device,
            ..Flags::default()
        };
        assert!(Config::load(&flags(None)).is_err());
        let c = Config::load(&flags(Some(DeviceChoice::Auto))).unwrap();
        assert_eq!(c.settings.models["smollm2"].paged_attention, PagedAttention::On);

        let err = refused("paged_kv_tokens = 100\n");
        assert!(
            err.contains("models.smollm2.paged_kv_tokens") && err.contains("2048"),
            "{err}"
        );
        let err = Config::from_toml(&model("paged_attention = \"yes\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("yes") && err.contains("auto, on or off"), "{err}");
    }

    #[test]
    fn http_listener_and_api_keys_come_from_file_env_or_flags_and_are_checked() {
        assert_eq!(Config::default().http_listen, None);
        let digest = "a".repeat(64);
        let c = Config::from_toml(&format!(
            "http_listen = \"127.0.0.1:8080\"\n[[api_keys]]\nid = \"webui\"\nsha256 = \"{digest}\"\n"
        ))
        .unwrap();
        assert_eq!(c.http_listen, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(c.api_keys[0].id, "webui");
        let flags = Flags::try_parse_from([
            "flywheel-server",
            "--http-listen",
            "127.0.0.1:0",
            "--api-keys",
            &format!("a:{digest},b:{digest}"),
        ])
        .unwrap();
        let c = Config::load(&flags).unwrap();
        assert_eq!(c.http_listen.map(|a| a.port()), Some(0));
        assert_eq!(c.api_keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let refused = |keys: &str| {
            let flags = Flags::try_parse_from(["flywheel-server", "--api-keys", keys]).unwrap();
            Config::load(&flags).unwrap_err().to_string()
        };
        let err = refused("a:sk-plain-key");
        assert!(err.contains("api_keys[0]") && err.contains("64 hex digits"), "{err}");
        let err = refused(&format!("a:{digest},a:{digest}"));
        assert!(err.contains("api_keys[1]") && err.contains("used by two keys"), "{err}");
        let err = refused(&format!("bad id:{digest}"));
        assert!(err.contains("letters, digits"), "{err}");
        assert!(Flags::try_parse_from(["flywheel-server", "--api-keys", "no-colon"]).is_err());
    }

    #[test]
    fn the_replica_id_defaults_to_host_and_pid_and_comes_from_file_or_flag() {
        let own = Config::default().replica_id;
        assert!(own.ends_with(&format!(":{}", std::process::id())), "{own}");
        let c = Config::from_toml("replica_id = \"eu-1\"\n").unwrap();
        assert_eq!(c.replica_id, "eu-1");
        for bad in ["", "  ", "a\nb"] {
            let err = check_replica_id(bad).unwrap_err().to_string();
            assert!(err.contains("replica_id"), "{err}");
        }
        assert!(check_replica_id(&"x".repeat(MAX_REPLICA_ID_CHARS + 1)).is_err());
    }

    #[test]
    fn otlp_endpoint_comes_from_file_or_flag_and_must_be_a_url() {
        let c = Config::from_toml("otlp_endpoint = \"http://collector:4317\"\n").unwrap();
        assert_eq!(c.otlp_endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(Config::default().otlp_endpoint, None);
        let flags = |e: &str| Flags {
            otlp_endpoint: Some(e.into()),
            ..Flags::default()
        };
        let c = Config::load(&flags("https://otel.example.com:4317")).unwrap();
        assert_eq!(c.otlp_endpoint.as_deref(), Some("https://otel.example.com:4317"));
        for bad in ["127.0.0.1:4317", "grpc://collector:4317", "not a url"] {
            let err = Config::load(&flags(bad)).unwrap_err().to_string();
            assert!(err.contains("otlp_endpoint") && err.contains(bad), "{err}");
        }
    }

    #[test]
    fn shipped_overhead_configs_are_valid_and_differ_only_in_logging() {
        let on = Config::from_toml(include_str!("../config/overhead.toml")).unwrap();
        let off = Config::from_toml(include_str!("../config/overhead-nolog.toml")).unwrap();
        for c in [&on, &off] {
            c.settings.validate().unwrap();
            assert_eq!(c.engine, EngineKind::Stub);
            assert!(!c.settings.rails.jailbreak.enabled && !c.settings.rails.pii.enabled);
        }
        assert!(on.settings.log.persist && !off.settings.log.persist);
        // `[retrieval]` is read from the file (BM25 only: no query embedding).
        assert_eq!(on.settings.retrieval.mode, flywheel_router::retrieval::Mode::Bm25);
        assert_ne!(on.listen, off.listen);
        assert_eq!(on.settings.rails, off.settings.rails);
    }
}
