//! Telemetry setup, called once from `main`: a `tracing` subscriber writing
//! to stderr, filtered by `RUST_LOG` (default `info`, with mistral.rs's own
//! chatter at `warn`).

use tracing_subscriber::EnvFilter;

/// Filter used when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info,mistralrs_core=warn,mistralrs_quant=warn,mistralrs=warn";

/// Install the global subscriber. Safe to call more than once (later calls are no-ops).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}
