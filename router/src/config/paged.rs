//! Paged attention for generation engines on a GPU (`[models.*]
//! paged_attention`, `paged_kv_tokens`).
//!
//! With it, mistral.rs keeps every sequence's KV cache in fixed-size blocks of
//! one GPU pool and its PagedAttention scheduler decodes all running
//! sequences in one batch whatever their lengths, reusing blocks of shared
//! prompt prefixes. Without it (the default scheduler), only sequences of
//! equal length decode together and each change of the running set copies
//! every running sequence's cache into a new batch cache, so concurrent
//! streams mostly take turns.
//!
//! mistral.rs has no paged attention on the CPU, and route decisions send
//! raw-logit prompts one at a time against the router's primed
//! sequence-level prefix cache, so router engines and CPU engines always use
//! the contiguous cache.

use candle_core::Device;

/// `[models.*] paged_attention`: `auto` (the default: on for a generation
/// engine on a GPU), `on` (the same, and an error where it cannot be), `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PagedAttention {
    /// On for generation engines on a GPU, off elsewhere.
    #[default]
    Auto,
    /// On for generation engines; a model entry whose device is the CPU is an error.
    On,
    /// The contiguous KV cache and mistral.rs's default scheduler.
    Off,
}

/// Default `[models.*] paged_kv_tokens`: 64 sequences of 2,048 tokens.
pub const DEFAULT_PAGED_KV_TOKENS: usize = 131_072;

named_setting!(PagedAttention, "paged_attention", "use auto, on or off", {
    Auto => "auto",
    On => "on",
    Off => "off",
});

impl PagedAttention {
    /// Whether this setting can hold for a model entry on `device` before
    /// any GPU is opened (config load): `on` with `device = "cpu"` cannot.
    ///
    /// # Errors
    /// A message saying what to change.
    pub fn check_device(self, device: crate::device::DeviceChoice) -> Result<(), String> {
        if self == Self::On && device == crate::device::DeviceChoice::Cpu {
            return Err(on_cpu_message("device = \"cpu\""));
        }
        Ok(())
    }

    /// Whether an engine uses paged attention, once its device is open.
    /// Router engines never do (see the module docs).
    ///
    /// # Errors
    /// `on` for an engine that ended up on the CPU (`device = "auto"`
    /// without a usable GPU).
    pub fn resolve(self, device: &Device, router: bool) -> Result<bool, String> {
        match (self, device.is_cpu()) {
            (Self::Off, _) | (Self::Auto, true) => Ok(false),
            _ if router => Ok(false),
            (Self::On, true) => Err(on_cpu_message("the model opened on the CPU")),
            (Self::Auto | Self::On, false) => Ok(true),
        }
    }
}

fn on_cpu_message(why: &str) -> String {
    format!(
        "paged_attention = \"on\" needs a GPU and {why}: mistral.rs has no paged attention on the \
         CPU; set paged_attention = \"auto\" (on only on a GPU) or \"off\""
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceChoice;

    #[test]
    fn settings_parse_like_the_config_and_explain_a_typo() {
        for (s, p) in [
            ("auto", PagedAttention::Auto),
            ("ON", PagedAttention::On),
            ("off", PagedAttention::Off),
        ] {
            assert_eq!(s.parse::<PagedAttention>(), Ok(p));
            let toml_form: PagedAttention = serde_json::from_value(serde_json::json!(s.to_ascii_lowercase())).unwrap();
            assert_eq!(toml_form, p);
            assert_eq!(p.to_string(), s.to_ascii_lowercase());
        }
        let err = "yes".parse::<PagedAttention>().unwrap_err();
        assert!(err.contains("yes") && err.contains("auto, on or off"), "{err}");
        assert_eq!(PagedAttention::default(), PagedAttention::Auto);
    }

    #[test]
    fn cpu_engines_and_router_engines_keep_the_contiguous_cache() {
        for router in [false, true] {
            assert_eq!(PagedAttention::Auto.resolve(&Device::Cpu, router), Ok(false));
            assert_eq!(PagedAttention::Off.resolve(&Device::Cpu, router), Ok(false));
        }
        // `on` cannot hold on the CPU for an engine that would use it...
        let err = PagedAttention::On.resolve(&Device::Cpu, false).unwrap_err();
        assert!(
            err.contains("needs a GPU") && err.contains("paged_attention = \"auto\""),
            "{err}"
        );
        // ...but a router engine never uses it, so the same entry can route on the CPU.
        assert_eq!(PagedAttention::On.resolve(&Device::Cpu, true), Ok(false));
    }

    #[test]
    fn on_with_a_cpu_device_is_refused_before_loading() {
        let err = PagedAttention::On.check_device(DeviceChoice::Cpu).unwrap_err();
        assert!(err.contains("device = \"cpu\""), "{err}");
        for ok in [DeviceChoice::Auto, DeviceChoice::Cuda(0), DeviceChoice::Cuda(1)] {
            assert_eq!(PagedAttention::On.check_device(ok), Ok(()));
        }
        for p in [PagedAttention::Auto, PagedAttention::Off] {
            assert_eq!(p.check_device(DeviceChoice::Cpu), Ok(()));
        }
    }
}
