//! Pieces the CPU kernels share: contiguous f32 access to a flex tensor, and matrix products
//! into row-major buffers (the system's OpenBLAS when it is installed, see [`crate::nn::blas`],
//! else `gemm`, the crate flex itself uses).

use std::mem::MaybeUninit;

use burn::tensor::DType;
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Below this many elements a buffer is zeroed by the calling thread (waking the pool costs more).
const PARALLEL_ZEROING: usize = 1 << 15;

/// `len` zeros, written by Rayon's threads.
///
/// A kernel's output allocated as `vec![0.0; len]` is zeroed by the thread issuing the kernel
/// while the others wait (`memset` on that one thread was about 1 % of the bench's SFT step,
/// 1.7 % of its wall time); each thread then writes its chunks over again. Here the zeroing is
/// split as the kernel's own pass is.
pub fn zeroed(len: usize) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    if len < PARALLEL_ZEROING {
        return vec![0.0; len];
    }
    let mut values = Vec::with_capacity(len);
    values.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .for_each(|chunk| chunk.fill(MaybeUninit::new(0.0)));
    // SAFETY: the first `len` elements of the capacity were all written just above.
    unsafe { values.set_len(len) };
    values
}

/// The contiguous f32 elements of a tensor, `None` for another dtype or layout.
pub fn contiguous_f32(t: &FlexTensor) -> Option<&[f32]> {
    if t.dtype() != DType::F32 {
        return None;
    }
    t.as_slice::<f32>()
}

/// A strided f32 matrix read by a product: element `(i, j)` at
/// `ptr + i·row_stride + j·column_stride`.
#[derive(Clone, Copy)]
pub struct Operand {
    ptr: *const f32,
    rows: usize,
    columns: usize,
    row_stride: isize,
    column_stride: isize,
}

impl Operand {
    /// The caller keeps `ptr` valid for the whole `rows × columns` extent while it is used.
    pub fn new(
        ptr: *const f32,
        [rows, columns]: [usize; 2],
        [row_stride, column_stride]: [isize; 2],
    ) -> Self {
        Operand {
            ptr,
            rows,
            columns,
            row_stride,
            column_stride,
        }
    }

    /// `data` as `rows` rows of `columns` contiguous elements.
    pub fn row_major(data: &[f32], rows: usize, columns: usize) -> Self {
        debug_assert!(data.len() >= rows * columns);
        Operand::new(data.as_ptr(), [rows, columns], [columns as isize, 1])
    }

    /// The same elements read as the transpose.
    pub fn transposed(self) -> Self {
        Operand {
            rows: self.columns,
            columns: self.rows,
            row_stride: self.column_stride,
            column_stride: self.row_stride,
            ..self
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn columns(&self) -> usize {
        self.columns
    }

    /// `(row_stride, column_stride)` in elements.
    pub fn strides(&self) -> (isize, isize) {
        (self.row_stride, self.column_stride)
    }

    /// The address of element `(0, 0)`.
    pub fn ptr(&self) -> *const f32 {
        self.ptr
    }
}

/// `dst = beta·lhs·rhs`, or `dst += beta·lhs·rhs` when `accumulate`, where `dst` is
/// `lhs.rows × rhs.columns`, row-major with rows `dst_row_stride` apart.
///
/// # Safety
/// Both operands are valid for their extents, `lhs.columns == rhs.rows`, and `dst` is writable
/// for its extent (and initialised when `accumulate`).
pub unsafe fn product_into(
    dst: *mut f32,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    debug_assert_eq!(lhs.columns, rhs.rows);
    let blas =
        crate::nn::blas::blas().filter(|_| !gemm_is_faster(lhs.rows, lhs.columns, rhs.columns));
    if let Some(blas) = blas {
        let parallel = matches!(parallelism, gemm::Parallelism::Rayon(_));
        // SAFETY: as the caller promises.
        let done =
            unsafe { blas.product(dst, dst_row_stride, accumulate, lhs, rhs, beta, parallel) };
        if done {
            return;
        }
    }
    // SAFETY: as the caller promises.
    unsafe { gemm_product_into(dst, dst_row_stride, accumulate, lhs, rhs, beta, parallelism) }
}

/// Whether `gemm` multiplies `m × k` by `k × n` faster than OpenBLAS (both measured on a Zen 3
/// core, median of 40, one thread and two):
///
/// * a narrow product (`n` ≤ 16: a LoRA down-projection `x·Aᵀ`, its gradient `dy·B`, and
///   `dyᵀ·(x·Aᵀ)`): 0.6–0.9× OpenBLAS's time, which packs the whole `m × k` operand for a few
///   columns;
/// * a block of attention queries (16 < `m` ≤ 64: scores `Q·Kᵀ`, `P·V` and their gradients
///   `dO·Vᵀ`, `dS·K`): 0.86–0.92×.
///
/// An inner dimension of 16 or less (adding a LoRA update `(x·Aᵀ)·Bᵀ`) stays with OpenBLAS
/// (gemm took 1.24–1.7× its time), as do the tall products of attention's key and value
/// gradients and the full-size ones (equal speed).
fn gemm_is_faster(m: usize, k: usize, n: usize) -> bool {
    k > 16 && (n <= 16 || (16 < m && m <= 64))
}

/// [`product_into`] by the `gemm` crate, whatever BLAS is installed.
///
/// # Safety
/// As [`product_into`]'s.
pub unsafe fn gemm_product_into(
    dst: *mut f32,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: as the caller promises.
    unsafe {
        gemm::gemm(
            lhs.rows,
            rhs.columns,
            lhs.columns,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.ptr,
            lhs.column_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.column_stride,
            rhs.row_stride,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod zeroed_tests {
    use super::*;

    /// Small and large buffers (the large ones zeroed in parallel) hold only zeros, also when the
    /// allocator hands back memory that held other values.
    #[test]
    fn zeroed_buffers_are_all_zero() {
        for len in [
            0,
            1,
            1000,
            PARALLEL_ZEROING,
            3 * PARALLEL_ZEROING + 17,
            1 << 20,
        ] {
            drop(vec![7.5f32; len]);
            let values = zeroed(len);
            assert_eq!(values.len(), len);
            assert!(values.iter().all(|&v| v.to_bits() == 0), "len {len}");
        }
    }
}
