//! Backend selection: the CLI is the only place that names a backend.

use anyhow::{bail, Result};
use burn::tensor::Device;

/// Backends the user can ask for; only those compiled in can be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// Pure-Rust CPU backend (Burn's `flex`).
    Cpu,
    /// Burn's deprecated ndarray CPU backend (feature `ndarray`), kept for comparison.
    Ndarray,
    /// WebGPU-style backend on Vulkan/Metal/DX12 (feature `wgpu`).
    Wgpu,
    /// NVIDIA CUDA (feature `cuda`).
    Cuda,
}

/// Names of the backends this binary was built with.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut out = vec!["cpu"];
    if cfg!(feature = "ndarray") {
        out.push("ndarray");
    }
    if cfg!(feature = "wgpu") {
        out.push("wgpu");
    }
    if cfg!(feature = "cuda") {
        out.push("cuda");
    }
    out
}

/// Builds the device of a backend, or explains which feature it needs.
pub fn device(kind: BackendKind) -> Result<Device> {
    match kind {
        BackendKind::Cpu => Ok(Device::flex()),
        BackendKind::Ndarray => {
            #[cfg(feature = "ndarray")]
            {
                #[allow(deprecated)]
                return Ok(Device::ndarray());
            }
            #[cfg(not(feature = "ndarray"))]
            bail!(
                "this binary was built without the ndarray backend (available: {}); rebuild with `--features ndarray`",
                compiled_backends().join(", ")
            )
        }
        BackendKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            {
                return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
            }
            #[cfg(not(feature = "wgpu"))]
            bail!(
                "this binary was built without the wgpu backend (available: {}); rebuild with `--features wgpu`",
                compiled_backends().join(", ")
            )
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                return Ok(Device::cuda(0));
            }
            #[cfg(not(feature = "cuda"))]
            bail!(
                "this binary was built without the cuda backend (available: {}); rebuild with `--features cuda` on a machine with network access (see docs/BACKENDS.md)",
                compiled_backends().join(", ")
            )
        }
    }
}
