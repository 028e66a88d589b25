//! Where models run: `cpu` (the default), `auto` (the first CUDA GPU when the
//! binary has CUDA support and the machine has one, else the CPU), `cuda` or
//! `cuda:N` (that GPU, or a clear error).
//!
//! CUDA support is the `cuda` cargo feature (`bench/gpu/build-cuda.sh` builds
//! it); a CPU-only binary asked for a GPU says so at config load, and a CUDA
//! binary on a machine without a usable GPU says what the driver answered.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// Whether this binary was built with CUDA support.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// The device a model runs on, as configured (`device = "cpu" | "auto" |
/// "cuda" | "cuda:N"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceChoice {
    /// The CPU (the default, and the only device CI has).
    #[default]
    Cpu,
    /// CUDA GPU 0 when this binary has CUDA support and the GPU opens, else
    /// the CPU (with a warning saying why).
    Auto,
    /// CUDA GPU `N`; an error when it cannot be used.
    Cuda(usize),
}

/// Why a device cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// A GPU was asked of a CPU-only binary.
    #[error(
        "device `{0}` needs a binary built with CUDA support (cargo feature `cuda`, see \
         bench/gpu/build-cuda.sh); this one runs on the CPU only: set device = \"cpu\" or \"auto\""
    )]
    NotBuilt(DeviceChoice),
    /// The binary has CUDA support but the GPU did not open.
    #[error(
        "device `{choice}` is not usable: {reason}; check the NVIDIA driver (nvidia-smi), the \
         GPU number and CUDA_VISIBLE_DEVICES, or set device = \"cpu\" or \"auto\""
    )]
    Unavailable {
        /// What was asked.
        choice: DeviceChoice,
        /// What the driver said.
        reason: String,
    },
}

/// A device string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device `{0}`: use \"cpu\", \"auto\", \"cuda\" or \"cuda:N\" (N = GPU number)")]
pub struct ParseDeviceError(String);

impl FromStr for DeviceChoice {
    type Err = ParseDeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| ParseDeviceError(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Auto => f.write_str("auto"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Whether this binary can honour the choice at all (checked at config
    /// load, before any model is read).
    ///
    /// # Errors
    /// [`DeviceError::NotBuilt`] for a GPU in a CPU-only binary.
    pub fn check_supported(self) -> Result<(), DeviceError> {
        match self {
            Self::Cuda(_) if !CUDA_BUILT => Err(DeviceError::NotBuilt(self)),
            _ => Ok(()),
        }
    }

    /// Open the device.
    ///
    /// # Errors
    /// See [`DeviceError`]; `auto` never fails (it falls back to the CPU).
    pub fn open(self) -> Result<Device, DeviceError> {
        // The driver's answer only: candle appends a backtrace when RUST_BACKTRACE is set.
        self.open_with(CUDA_BUILT, |n| {
            let device =
                Device::new_cuda(n).map_err(|e| e.to_string().lines().next().unwrap_or_default().trim().to_string())?;
            without_event_tracking(&device);
            Ok(device)
        })
    }

    /// [`Self::open`] with the build flag and the GPU probe given, so the
    /// selection logic is tested on machines without a GPU.
    fn open_with(
        self,
        cuda_built: bool,
        cuda: impl Fn(usize) -> Result<Device, String>,
    ) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto if !cuda_built => Ok(Device::Cpu),
            Self::Auto => cuda(0).or_else(|reason| {
                tracing::warn!(%reason, "device = \"auto\": CUDA GPU 0 is not usable, running on the CPU");
                Ok(Device::Cpu)
            }),
            Self::Cuda(_) if !cuda_built => Err(DeviceError::NotBuilt(self)),
            Self::Cuda(n) => cuda(n).map_err(|reason| DeviceError::Unavailable { choice: self, reason }),
        }
    }
}

/// Turn off cudarc's per-tensor CUDA event tracking on a freshly opened GPU.
///
/// With tracking on, every kernel launch records (and may wait on) a CUDA
/// event per tensor argument so that tensors can be shared between streams.
/// candle runs everything of a device on the one stream it opened, so the
/// events only add driver calls to every operation, which dominate small
/// kernels (the trainer's steps and optimizer updates on a 135M model).
/// mistral.rs does the same for the devices it opens. Must be called before
/// any tensor is created on `device`.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub fn without_event_tracking(device: &Device) {
    if let Device::Cuda(cuda) = device {
        // SAFETY: every tensor of this device is created after this call and
        // used on its single stream (candle's default); nothing here creates
        // a second stream, so no cross-stream synchronisation is needed.
        unsafe { cuda.disable_event_tracking() };
    }
}

/// CPU-only builds have no CUDA device to configure.
#[cfg(not(feature = "cuda"))]
pub fn without_event_tracking(_device: &Device) {}

// Serde uses the same strings as the config and flags.
impl serde::Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_parse_and_print_back() {
        for (s, d) in [
            ("cpu", DeviceChoice::Cpu),
            ("auto", DeviceChoice::Auto),
            ("cuda", DeviceChoice::Cuda(0)),
            ("CUDA:1", DeviceChoice::Cuda(1)),
            (" gpu ", DeviceChoice::Cuda(0)),
        ] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap(), d, "{s}");
        }
        assert_eq!(DeviceChoice::Cuda(3).to_string(), "cuda:3");
        for bad in ["", "metal", "cuda:", "cuda:x", "cuda:-1", "cpu:0"] {
            let err = bad.parse::<DeviceChoice>().unwrap_err().to_string();
            assert!(err.contains("\"cuda:N\""), "{bad}: {err}");
        }
        let v: toml::Value = toml::from_str("d = \"cuda:2\"").unwrap();
        let d: DeviceChoice = v["d"].clone().try_into().unwrap();
        assert_eq!(d, DeviceChoice::Cuda(2));
    }

    #[test]
    fn a_gpu_in_a_cpu_only_build_is_refused_and_auto_runs_on_the_cpu() {
        let never = |_: usize| -> Result<Device, String> { panic!("a CPU-only build must not probe a GPU") };
        let err = DeviceChoice::Cuda(0).open_with(false, never).unwrap_err();
        assert_eq!(err, DeviceError::NotBuilt(DeviceChoice::Cuda(0)));
        let msg = err.to_string();
        assert!(
            msg.contains("`cuda:0`") && msg.contains("feature `cuda`") && msg.contains("device = \"cpu\""),
            "{msg}"
        );
        assert!(DeviceChoice::Auto.open_with(false, never).unwrap().is_cpu());
        assert!(DeviceChoice::Cpu.open_with(false, never).unwrap().is_cpu());
    }

    #[test]
    fn a_cuda_build_without_a_usable_gpu_explains_and_auto_falls_back() {
        let no_gpu = |_: usize| -> Result<Device, String> { Err("CUDA_ERROR_NO_DEVICE".into()) };
        let err = DeviceChoice::Cuda(1).open_with(true, no_gpu).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`cuda:1`") && msg.contains("CUDA_ERROR_NO_DEVICE") && msg.contains("nvidia-smi"),
            "{msg}"
        );
        assert!(DeviceChoice::Auto.open_with(true, no_gpu).unwrap().is_cpu());
        // The GPU asked for is the one probed.
        let probed = std::sync::Mutex::new(Vec::new());
        let ok = |n: usize| -> Result<Device, String> {
            probed.lock().unwrap().push(n);
            Ok(Device::Cpu)
        };
        DeviceChoice::Cuda(2).open_with(true, ok).unwrap();
        DeviceChoice::Auto.open_with(true, ok).unwrap();
        assert_eq!(*probed.lock().unwrap(), vec![2, 0]);
    }

    /// The real probe of this build: a CPU-only binary refuses GPUs; a CUDA
    /// binary either opens GPU 0 or reports the driver's answer (machines
    /// without a GPU, e.g. with the link-time stub libcuda).
    #[test]
    fn this_build_opens_or_explains() {
        let built = CUDA_BUILT;
        match DeviceChoice::Cuda(0).open() {
            Ok(d) => assert!(built && d.is_cuda()),
            Err(DeviceError::NotBuilt(_)) => assert!(!built),
            Err(DeviceError::Unavailable { reason, .. }) => assert!(built && !reason.is_empty()),
        }
        assert_eq!(DeviceChoice::Cuda(0).check_supported().is_ok(), CUDA_BUILT);
        DeviceChoice::Auto.open().unwrap();
    }
}
