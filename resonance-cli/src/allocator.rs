//! glibc malloc settings for tensor workloads.
//!
//! Every Burn operation on the CPU allocates its output afresh. With glibc's defaults, buffers of
//! a few MB are served by `mmap` and handed back on free, and the heap top is trimmed, so each
//! step faults in and zeroes the same pages again (about a tenth of a forward pass, measured with
//! `perf` on `resonance bench --child score`). Keeping freed memory in the heap lets the next step
//! reuse it; the peak resident size is unchanged, it is only not returned between steps.

/// Largest allocation served from the heap instead of `mmap` (glibc's maximum, 32 MiB on 64-bit).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 * 1024 * 1024;
/// Free memory at the heap top that is kept rather than trimmed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = libc::c_int::MAX;
/// Extra space requested from the kernel each time the heap grows.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TOP_PAD: libc::c_int = 256 * 1024 * 1024;

/// Applies the settings; call once, before any thread starts. Elsewhere than glibc it does nothing.
pub fn configure_for_tensors() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (option, value) in [
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (libc::M_TOP_PAD, TOP_PAD),
    ] {
        // SAFETY: mallopt only changes allocator parameters, and it runs before other threads
        // exist. A refused setting (return value 0) keeps glibc's default, which is still correct.
        unsafe {
            libc::mallopt(option, value);
        }
    }
}
