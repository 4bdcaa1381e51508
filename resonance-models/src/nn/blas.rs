//! The system's OpenBLAS as the CPU kernels' f32 matrix product, when it is installed.
//!
//! On x86 CPUs OpenBLAS's hand-written sgemm kernels run this project's products (a decoder
//! layer's forward and backward) 15–25 % faster than the `gemm` crate flex uses, and its large
//! products at the speed of PyTorch's MKL (`bench/README.md`). It is opened at run time
//! (`dlopen`), so building needs nothing and a machine without it keeps `gemm`: on Debian and
//! Ubuntu it is the `libopenblas0` package.
//!
//! `RESONANCE_BLAS` chooses: unset or `auto` opens `libopenblas.so.0` when present, `off` keeps
//! `gemm`, a path opens that library (any library exporting `cblas_sgemm`; LP64 integers).
//!
//! OpenBLAS is set to one thread and a large product is split in row or column blocks over
//! Rayon's threads, so that one thread pool runs the products and every other kernel (an
//! OpenBLAS pool spinning after its product would take a core from the element-wise kernels
//! that follow). A library without `openblas_set_num_threads` keeps its own threading and gets
//! each product whole.

use std::ffi::c_int;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::nn::cpu_ops::Operand;

const CBLAS_ROW_MAJOR: c_int = 101;
const CBLAS_NO_TRANS: c_int = 111;
const CBLAS_TRANS: c_int = 112;

/// Rows or columns per block below which a product is not split further.
const MIN_BLOCK: usize = 32;

type Sgemm = unsafe extern "C" fn(
    layout: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
) -> ();
type SetThreads = unsafe extern "C" fn(c_int) -> ();
type GetConfig = unsafe extern "C" fn() -> *const std::ffi::c_char;

/// An opened BLAS library.
pub struct Blas {
    sgemm: Sgemm,
    /// Whether the library runs on the caller's thread (products are then split here).
    single_threaded: bool,
    description: String,
    // Keeps the library mapped while `sgemm` may be called.
    _library: libloading::Library,
}

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();

/// The BLAS library products use, opened on first use; `None` when products use `gemm`.
pub fn blas() -> Option<&'static Blas> {
    BLAS.get_or_init(open).as_ref()
}

/// What runs the f32 matrix products, for logs and benchmark reports.
pub fn product_library() -> String {
    match blas() {
        Some(blas) => blas.description.clone(),
        None => "gemm (the crate flex uses)".to_string(),
    }
}

fn open() -> Option<Blas> {
    let choice = std::env::var("RESONANCE_BLAS").unwrap_or_default();
    let candidates: Vec<String> = match choice.as_str() {
        "off" | "0" | "none" | "gemm" => return None,
        "" | "auto" => ["libopenblas.so.0", "libopenblas.so", "libopenblas.dylib"]
            .map(String::from)
            .to_vec(),
        path => vec![path.to_string()],
    };
    let explicit = !matches!(choice.as_str(), "" | "auto");
    for name in &candidates {
        match load(name) {
            Ok(blas) => {
                tracing::info!("matrix products: {}", blas.description);
                return Some(blas);
            }
            Err(e) if explicit => {
                tracing::warn!("RESONANCE_BLAS={name}: {e}; matrix products use gemm")
            }
            Err(e) => tracing::debug!("{name}: {e}"),
        }
    }
    None
}

fn load(name: &str) -> Result<Blas, libloading::Error> {
    // SAFETY: opening a shared library runs its initialisers; BLAS libraries have no
    // requirements on them beyond being loaded once, which the `OnceLock` ensures.
    let library = unsafe { libloading::Library::new(name)? };
    // SAFETY: the symbols are the CBLAS and OpenBLAS C functions with these signatures.
    let (sgemm, set_threads, config) = unsafe {
        (
            *library.get::<Sgemm>(b"cblas_sgemm\0")?,
            library
                .get::<SetThreads>(b"openblas_set_num_threads\0")
                .ok()
                .map(|f| *f),
            library
                .get::<GetConfig>(b"openblas_get_config\0")
                .ok()
                .map(|f| *f),
        )
    };
    if let Some(set_threads) = set_threads {
        // SAFETY: an OpenBLAS setting, taken before any product runs.
        unsafe { set_threads(1) };
    }
    let config = config
        // SAFETY: OpenBLAS returns a static NUL-terminated string.
        .map(|get| {
            unsafe { std::ffi::CStr::from_ptr(get()) }
                .to_string_lossy()
                .into_owned()
        });
    let description = match config {
        Some(config) => format!("{name} ({})", config.trim()),
        None => name.to_string(),
    };
    Ok(Blas {
        sgemm,
        single_threaded: set_threads.is_some(),
        description,
        _library: library,
    })
}

/// How CBLAS reads a row-major operand: transposed or not, and its leading dimension.
fn cblas_layout(op: &Operand) -> Option<(c_int, c_int)> {
    let (rows, columns) = (op.rows(), op.columns());
    let (row_stride, column_stride) = op.strides();
    // Along a dimension of size 1 the stride is never used, so it may be anything; a leading
    // dimension only has to be at least the other dimension's size.
    let row_major = (column_stride == 1 || columns <= 1)
        && (rows <= 1 || row_stride >= columns.max(1) as isize);
    let column_major =
        (row_stride == 1 || rows <= 1) && (columns <= 1 || column_stride >= rows.max(1) as isize);
    let (trans, leading) = if row_major {
        let leading = if rows <= 1 {
            columns.max(1) as isize
        } else {
            row_stride
        };
        (CBLAS_NO_TRANS, leading)
    } else if column_major {
        let leading = if columns <= 1 {
            rows.max(1) as isize
        } else {
            column_stride
        };
        (CBLAS_TRANS, leading)
    } else {
        return None;
    };
    Some((trans, c_int::try_from(leading).ok()?))
}

/// Raw pointers handed to the threads of one product (each writes its own block of `dst`).
#[derive(Clone, Copy)]
struct Shared {
    dst: *mut f32,
    lhs: *const f32,
    rhs: *const f32,
}
// SAFETY: the blocks of one product read the operands and write disjoint parts of `dst`.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointers (a method, so that a closure captures the whole `Shared`, which is `Sync`,
    /// rather than its pointer fields, which are not).
    fn pointers(&self) -> (*mut f32, *const f32, *const f32) {
        (self.dst, self.lhs, self.rhs)
    }
}

impl Blas {
    /// `dst = beta·lhs·rhs`, or `dst += beta·lhs·rhs` when `accumulate`, as
    /// [`crate::nn::cpu_ops::product_into`]; split over Rayon's threads when `parallel`.
    /// Returns `false`, having done nothing, for matrix-vector products, an empty inner
    /// dimension and operands CBLAS cannot take (no unit stride, sizes beyond its integers); the
    /// caller then uses `gemm`.
    ///
    /// # Safety
    /// As [`crate::nn::cpu_ops::product_into`]'s.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn product(
        &self,
        dst: *mut f32,
        dst_row_stride: usize,
        accumulate: bool,
        lhs: Operand,
        rhs: Operand,
        beta: f32,
        parallel: bool,
    ) -> bool {
        let (m, k, n) = (lhs.rows(), lhs.columns(), rhs.columns());
        if m == 1 || n == 1 || k == 0 {
            // A matrix-vector product (decoding one sequence): gemm reads the matrix once,
            // OpenBLAS's sgemm packs all of it first (generate_b1: 1.7 s against 3.0 s). An
            // empty inner dimension (a zero product) is gemm's too.
            return false;
        }
        let (Some((trans_a, lda)), Some((trans_b, ldb))) = (cblas_layout(&lhs), cblas_layout(&rhs))
        else {
            return false;
        };
        let fits = |x: usize| c_int::try_from(x).is_ok();
        if !(fits(m) && fits(n) && fits(k) && fits(dst_row_stride)) || dst_row_stride < n {
            return false;
        }
        if m == 0 || n == 0 {
            return true;
        }
        let c_beta = if accumulate { 1.0 } else { 0.0 };
        let (a_row, _) = lhs.strides();
        let (_, b_col) = rhs.strides();
        let shared = Shared {
            dst,
            lhs: lhs.ptr(),
            rhs: rhs.ptr(),
        };
        // Block `[r0, r1) × [c0, c1)` of the output.
        let block = |[r0, r1, c0, c1]: [usize; 4]| {
            let (dst, lhs, rhs) = shared.pointers();
            // SAFETY: the block lies inside the operands' and `dst`'s extents, and blocks of
            // one product do not overlap in `dst`.
            unsafe {
                (self.sgemm)(
                    CBLAS_ROW_MAJOR,
                    trans_a,
                    trans_b,
                    (r1 - r0) as c_int,
                    (c1 - c0) as c_int,
                    k as c_int,
                    beta,
                    lhs.offset(r0 as isize * a_row),
                    lda,
                    rhs.offset(c0 as isize * b_col),
                    ldb,
                    c_beta,
                    dst.add(r0 * dst_row_stride + c0),
                    dst_row_stride as c_int,
                )
            }
        };
        let threads = rayon::current_num_threads();
        if !(parallel && self.single_threaded && threads > 1) {
            block([0, m, 0, n]);
            return true;
        }
        // Along the longer side: every block packs the operand it does not divide whole, so
        // dividing the larger one repeats the smaller packing (a weight gradient `xᵀ·dy`, 512 ×
        // 1376 from 2052 tokens, ran 5-10 % faster in column blocks than in row blocks).
        let split_rows = m >= n;
        let extent = if split_rows { m } else { n };
        let parts = threads.min(extent.div_ceil(MIN_BLOCK)).max(1);
        let size = extent.div_ceil(parts).next_multiple_of(8);
        (0..extent.div_ceil(size)).into_par_iter().for_each(|p| {
            let (lo, hi) = (p * size, ((p + 1) * size).min(extent));
            block(if split_rows {
                [lo, hi, 0, n]
            } else {
                [0, m, lo, hi]
            });
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::cpu_ops::gemm_product_into;

    /// The opened library, or `None` (the test then has nothing to compare) unless
    /// `RESONANCE_REQUIRE_BLAS` is set, as CI sets it after installing OpenBLAS.
    fn required_blas() -> Option<&'static Blas> {
        let found = blas();
        if found.is_none() {
            assert!(
                std::env::var_os("RESONANCE_REQUIRE_BLAS").is_none(),
                "RESONANCE_REQUIRE_BLAS is set but no BLAS library could be opened"
            );
            eprintln!("no BLAS library here: nothing to compare with gemm");
        }
        found
    }

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A `rows × columns` operand over `data`: row-major, transposed (stored column-major), or a
    /// block of a wider row-major matrix (rows `columns + 5` apart).
    fn operand(data: &[f32], rows: usize, columns: usize, layout: usize) -> Operand {
        let (row_stride, column_stride) = match layout {
            0 => (columns as isize, 1),
            1 => (1, rows as isize),
            _ => ((columns + 5) as isize, 1),
        };
        Operand::new(data.as_ptr(), [rows, columns], [row_stride, column_stride])
    }

    fn storage(rows: usize, columns: usize, layout: usize, seed: u64) -> Vec<f32> {
        let len = if layout == 2 {
            rows * (columns + 5)
        } else {
            rows * columns
        };
        values(len.max(1), seed)
    }

    /// OpenBLAS's products equal gemm's (to rounding) for every operand layout, accumulation
    /// and scale, whole or split in row or column blocks, into a destination wider than the
    /// product whose extra columns stay untouched.
    #[test]
    fn blas_products_match_gemm() {
        let Some(blas) = required_blas() else {
            return;
        };
        let shapes = [
            (37, 19, 23),
            (2, 64, 300),
            (8, 96, 700),
            (300, 40, 7),
            (64, 1, 64),
        ];
        for (case, &(m, k, n)) in shapes.iter().enumerate() {
            for (a_layout, b_layout) in [(0, 0), (1, 0), (0, 1), (1, 1), (2, 2)] {
                for (accumulate, beta, parallel) in [
                    (false, 1.0, false),
                    (true, 0.5, false),
                    (false, 1.0, true),
                    (true, 2.0, true),
                ] {
                    let a = storage(m, k, a_layout, case as u64);
                    let b = storage(k, n, b_layout, 100 + case as u64);
                    let (lhs, rhs) = (operand(&a, m, k, a_layout), operand(&b, k, n, b_layout));
                    let stride = n + 3;
                    let initial = values(m * stride, 7);
                    let mut expected = initial.clone();
                    let mut got = initial.clone();
                    // SAFETY: both buffers hold `m` rows `stride` apart; the operands' data live.
                    let done = unsafe {
                        let parallelism = if parallel {
                            gemm::Parallelism::Rayon(0)
                        } else {
                            gemm::Parallelism::None
                        };
                        gemm_product_into(
                            expected.as_mut_ptr(),
                            stride,
                            accumulate,
                            lhs,
                            rhs,
                            beta,
                            parallelism,
                        );
                        blas.product(
                            got.as_mut_ptr(),
                            stride,
                            accumulate,
                            lhs,
                            rhs,
                            beta,
                            parallel,
                        )
                    };
                    let what = format!(
                        "{m}x{k}x{n}, layouts {a_layout}/{b_layout}, accumulate {accumulate}, \
                         beta {beta}, parallel {parallel}"
                    );
                    assert!(done, "{what}: refused");
                    for row in 0..m {
                        for col in 0..stride {
                            let (g, e) = (got[row * stride + col], expected[row * stride + col]);
                            if col >= n {
                                assert_eq!(
                                    g,
                                    initial[row * stride + col],
                                    "{what}: ({row}, {col}) written"
                                );
                            } else {
                                assert!(
                                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                    "{what}: ({row}, {col}) {g} vs {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// An operand with no unit stride, and a matrix-vector product, are left to gemm, with
    /// nothing written.
    #[test]
    fn layouts_without_a_unit_stride_and_vectors_are_refused() {
        let Some(blas) = required_blas() else {
            return;
        };
        let a = values(4 * 6 * 2, 1);
        let b = values(6 * 5, 2);
        let lhs = Operand::new(a.as_ptr(), [4, 6], [12, 2]);
        let rhs = Operand::new(b.as_ptr(), [6, 5], [5, 1]);
        let mut dst = vec![7.0f32; 4 * 5];
        // SAFETY: the operands' extents lie inside `a` and `b`; `dst` holds 4 rows of 5.
        let done = unsafe { blas.product(dst.as_mut_ptr(), 5, false, lhs, rhs, 1.0, false) };
        assert!(!done);
        assert!(dst.iter().all(|&v| v == 7.0));
        let row = Operand::new(a.as_ptr(), [1, 6], [6, 1]);
        // SAFETY: as above, with one row of `a`.
        let done = unsafe { blas.product(dst.as_mut_ptr(), 5, false, row, rhs, 1.0, false) };
        assert!(!done);
        assert!(dst.iter().all(|&v| v == 7.0));
    }
}
