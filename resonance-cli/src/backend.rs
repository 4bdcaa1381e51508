//! Backend selection: the CLI is the only place that names a backend.

use anyhow::Result;
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
        BackendKind::Ndarray => ndarray_device(),
        BackendKind::Wgpu => wgpu_device(),
        BackendKind::Cuda => cuda_device(),
    }
}

#[cfg_attr(
    all(feature = "ndarray", feature = "wgpu", feature = "cuda"),
    allow(dead_code)
)]
fn missing(name: &str, how: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "this binary was built without the {name} backend (available: {}); {how}",
        compiled_backends().join(", ")
    )
}

#[cfg(feature = "ndarray")]
fn ndarray_device() -> Result<Device> {
    #[allow(deprecated)]
    Ok(Device::ndarray())
}

#[cfg(not(feature = "ndarray"))]
fn ndarray_device() -> Result<Device> {
    Err(missing("ndarray", "rebuild with `--features ndarray`"))
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device> {
    Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<Device> {
    Err(missing("wgpu", "rebuild with `--features wgpu`"))
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device> {
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device> {
    Err(missing(
        "cuda",
        "rebuild with `--features cuda` on a machine with network access (see docs/BACKENDS.md)",
    ))
}
