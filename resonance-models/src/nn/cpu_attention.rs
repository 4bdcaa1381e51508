//! The f32 forward kernel of the attention extension on Burn's CPU backend (`flex`).
//!
//! flex's own kernel scores every query against every key and runs a scalar softmax with libm's
//! `expf` over the whole square, masked half included; in the benchmark that was a fifth of a
//! forward pass. This kernel works on blocks of queries: it finds the keys the block can see (for a
//! causal mask, the keys up to the block's last query; for the rejected answer of a packed
//! preference pair, the shared prefix and the answer itself, not the chosen answer between them),
//! multiplies only those, and computes the exponentials with a branch-free polynomial the compiler
//! vectorises. Queries that see no key get zeros, as flex's kernel gives them.

use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::nn::cpu_math::exp_nonpositive;
use crate::nn::cpu_ops::{product_into, zeroed, Operand};
use crate::nn::simd::wide;

/// Queries per block: small enough that a causal block skips most masked keys, large enough for
/// the block's two products to run at the GEMM's speed.
const QUERY_BLOCK: usize = 64;

/// `softmax(scale · Q Kᵀ, masked) V` for f32 tensors `[batch, heads, tokens, dim]` (`key` and
/// `value` may have fewer heads, shared by groups of query heads). `mask` (`true` = hidden) is
/// `[batch, heads or 1, queries, keys]`. Returns `None` for inputs this kernel does not take
/// (another dtype, an unexpected mask layout); the caller then uses flex's kernel.
pub fn attention_f32(
    query: &FlexTensor,
    key: &FlexTensor,
    value: &FlexTensor,
    mask: Option<&FlexTensor>,
    scale: f32,
) -> Option<FlexTensor> {
    let shape = Shape::of(query, key, value)?;
    let mask = match mask {
        Some(mask) => Some(MaskView::new(mask, shape.score_dims())?),
        None => None,
    };
    // Q, K and V arrive as `[b, t, h, d]` buffers seen through a head-swapping view; they are
    // read through their strides rather than copied.
    let (query, key, value) = (readable(query), readable(key), readable(value));
    let (q, k, v) = (
        StridedTensor::new(&query)?,
        StridedTensor::new(&key)?,
        StridedTensor::new(&value)?,
    );
    let mut output = zeroed(shape.output_len());
    if !shape.is_empty() {
        output
            .par_chunks_mut(shape.queries * shape.value_dim)
            .enumerate()
            .for_each(|(head_index, out)| {
                let (b, h) = (head_index / shape.heads, head_index % shape.heads);
                let head = shape.head(&q, &k, &v, b, h, scale);
                head.attend(out, mask.as_ref().map(|m| (m, b, h)));
            });
    }
    Some(FlexTensor::from_data(TensorData::new(
        output,
        shape.output_dims(),
    )))
}

/// The gradients `[dQ, dK, dV]` of [`attention_f32`] given its output `O` and the gradient `dO`
/// of the loss with respect to it (both `[batch, heads, queries, value_dim]`). The probabilities
/// are recomputed block by block, as in the forward pass, so no score-sized tensor is built.
/// Returns `None` for inputs the forward kernel would not take.
pub fn attention_backward_f32(
    query: &FlexTensor,
    key: &FlexTensor,
    value: &FlexTensor,
    mask: Option<&FlexTensor>,
    output: &FlexTensor,
    grad_output: &FlexTensor,
    scale: f32,
) -> Option<[FlexTensor; 3]> {
    let shape = Shape::of(query, key, value)?;
    let output_dims = shape.output_dims();
    for t in [output, grad_output] {
        if t.dtype() != DType::F32 || t.layout().shape().as_slice() != output_dims.as_slice() {
            return None;
        }
    }
    let mask = match mask {
        Some(mask) => Some(MaskView::new(mask, shape.score_dims())?),
        None => None,
    };
    let (query, key, value) = (readable(query), readable(key), readable(value));
    let (output, grad_output) = (readable(output), readable(grad_output));
    let (q, k, v) = (
        StridedTensor::new(&query)?,
        StridedTensor::new(&key)?,
        StridedTensor::new(&value)?,
    );
    let (o, grad_o) = (
        StridedTensor::new(&output)?,
        StridedTensor::new(&grad_output)?,
    );
    let Shape {
        batch,
        heads,
        kv_heads,
        queries,
        keys,
        dim,
        value_dim,
    } = shape;
    // Key and value gradients per query head; grouped heads are summed afterwards.
    let mut grad_query = zeroed(batch * heads * queries * dim);
    let mut grad_key = zeroed(batch * heads * keys * dim);
    let mut grad_value = zeroed(batch * heads * keys * value_dim);
    if !shape.is_empty() {
        grad_query
            .par_chunks_mut(queries * dim)
            .zip(grad_key.par_chunks_mut(keys * dim))
            .zip(grad_value.par_chunks_mut(keys * value_dim))
            .enumerate()
            .for_each(|(head_index, ((dq, dk), dv))| {
                let (b, h) = (head_index / heads, head_index % heads);
                let head = shape.head(&q, &k, &v, b, h, scale);
                head.gradients(
                    o.matrix(b, h),
                    grad_o.matrix(b, h),
                    dq,
                    dk,
                    dv,
                    mask.as_ref().map(|m| (m, b, h)),
                );
            });
    }
    let group = heads / kv_heads;
    let sum_groups = |per_head: Vec<f32>, width: usize| -> Vec<f32> {
        if group == 1 {
            return per_head;
        }
        let size = keys * width;
        let mut summed = vec![0.0f32; batch * kv_heads * size];
        for (head_index, chunk) in per_head.chunks_exact(size.max(1)).enumerate() {
            let (b, h) = (head_index / heads, head_index % heads);
            let target = (b * kv_heads + h / group) * size;
            for (s, &g) in summed[target..target + size].iter_mut().zip(chunk) {
                *s += g;
            }
        }
        summed
    };
    let tensor =
        |values: Vec<f32>, dims: [usize; 4]| FlexTensor::from_data(TensorData::new(values, dims));
    Some([
        tensor(grad_query, [batch, heads, queries, dim]),
        tensor(sum_groups(grad_key, dim), [batch, kv_heads, keys, dim]),
        tensor(
            sum_groups(grad_value, value_dim),
            [batch, kv_heads, keys, value_dim],
        ),
    ])
}

/// The dimensions of an attention call the kernels take: f32 `[batch, heads, tokens, dim]`
/// tensors, key and value heads dividing the query heads.
#[derive(Clone, Copy)]
struct Shape {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    dim: usize,
    value_dim: usize,
}

impl Shape {
    fn of(query: &FlexTensor, key: &FlexTensor, value: &FlexTensor) -> Option<Shape> {
        if [query, key, value].iter().any(|t| t.dtype() != DType::F32) {
            return None;
        }
        let dims = |t: &FlexTensor| -> Option<[usize; 4]> {
            t.layout().shape().as_slice().try_into().ok()
        };
        let [batch, heads, queries, dim] = dims(query)?;
        let [key_batch, kv_heads, keys, key_dim] = dims(key)?;
        let [value_batch, value_heads, value_keys, value_dim] = dims(value)?;
        let fits = key_batch == batch
            && value_batch == batch
            && key_dim == dim
            && value_heads == kv_heads
            && value_keys == keys
            && kv_heads > 0
            && heads % kv_heads == 0
            && dim > 0;
        fits.then_some(Shape {
            batch,
            heads,
            kv_heads,
            queries,
            keys,
            dim,
            value_dim,
        })
    }

    /// Nothing to compute: the outputs are empty or zeros.
    fn is_empty(&self) -> bool {
        self.batch * self.heads * self.queries * self.keys * self.value_dim == 0
    }

    fn score_dims(&self) -> [usize; 4] {
        [self.batch, self.heads, self.queries, self.keys]
    }

    fn output_dims(&self) -> [usize; 4] {
        [self.batch, self.heads, self.queries, self.value_dim]
    }

    fn output_len(&self) -> usize {
        self.output_dims().iter().product()
    }

    /// The operands of query head `h` of batch entry `b`.
    fn head<'a>(
        &self,
        q: &StridedTensor<'a>,
        k: &StridedTensor<'a>,
        v: &StridedTensor<'a>,
        b: usize,
        h: usize,
        scale: f32,
    ) -> Head<'a> {
        let group = self.heads / self.kv_heads;
        Head {
            q: q.matrix(b, h),
            k: k.matrix(b, h / group),
            v: v.matrix(b, h / group),
            dim: self.dim,
            value_dim: self.value_dim,
            keys: self.keys,
            scale,
        }
    }
}

/// The tensor itself when its strides are all non-negative (a cheap shared handle), otherwise a
/// contiguous copy.
fn readable(t: &FlexTensor) -> FlexTensor {
    if t.layout().strides().iter().all(|&s| s >= 0) {
        t.clone()
    } else {
        t.to_contiguous()
    }
}

/// An f32 tensor of rank 4 read through its layout.
struct StridedTensor<'a> {
    data: &'a [f32],
    start: usize,
    strides: [usize; 4],
}

impl<'a> StridedTensor<'a> {
    /// `None` for negative strides or a layout that would read past the buffer.
    fn new(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let shape: [usize; 4] = layout.shape().as_slice().try_into().ok()?;
        let mut strides = [0usize; 4];
        for (stride, &s) in strides.iter_mut().zip(layout.strides()) {
            *stride = usize::try_from(s).ok()?;
        }
        let data = t.storage::<f32>();
        let start = layout.start_offset();
        if shape.iter().all(|&n| n > 0) {
            let last = start + (0..4).map(|i| (shape[i] - 1) * strides[i]).sum::<usize>();
            if last >= data.len() {
                return None;
            }
        }
        Some(StridedTensor {
            data,
            start,
            strides,
        })
    }

    /// The `[tokens, dim]` matrix of batch entry `b`, head `h`.
    fn matrix(&self, b: usize, h: usize) -> Matrix<'a> {
        Matrix {
            data: self.data,
            offset: self.start + b * self.strides[0] + h * self.strides[1],
            row: self.strides[2],
            column: self.strides[3],
        }
    }
}

/// A strided matrix inside a tensor's buffer.
#[derive(Clone, Copy)]
struct Matrix<'a> {
    data: &'a [f32],
    offset: usize,
    row: usize,
    column: usize,
}

impl Matrix<'_> {
    /// Rows `first..first + count` of `columns` elements as a product operand (in bounds:
    /// `StridedTensor::new` checked the whole extent).
    fn rows(&self, first: usize, count: usize, columns: usize) -> Operand {
        Operand::new(
            self.data[self.offset + first * self.row..].as_ptr(),
            [count, columns],
            [self.row as isize, self.column as isize],
        )
    }

    /// The element at row `i`, column `j`.
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[self.offset + i * self.row + j * self.column]
    }
}

/// A boolean mask read in place through its strides (an expanded head dimension costs nothing).
struct MaskView<'a> {
    bytes: &'a [u8],
    start: usize,
    strides: [usize; 4],
}

impl<'a> MaskView<'a> {
    fn new(mask: &'a FlexTensor, target: [usize; 4]) -> Option<Self> {
        if !matches!(mask.dtype(), DType::Bool(_)) || mask.dtype().size() != 1 {
            return None;
        }
        let layout = mask.layout();
        let shape: [usize; 4] = layout.shape().as_slice().try_into().ok()?;
        let mut strides = [0usize; 4];
        for axis in 0..4 {
            let stride = layout.strides()[axis];
            if stride < 0 {
                return None;
            }
            strides[axis] = if shape[axis] == target[axis] {
                stride as usize
            } else if shape[axis] == 1 {
                0
            } else {
                return None;
            };
        }
        if target[3] > 1 && strides[3] != 1 {
            return None;
        }
        Some(MaskView {
            bytes: mask.storage::<u8>(),
            start: layout.start_offset(),
            strides,
        })
    }

    /// The hidden flags of query `i` of head `(b, h)` over keys `0..keys`.
    fn row(&self, b: usize, h: usize, i: usize, keys: usize) -> &[u8] {
        let offset = self.start + b * self.strides[0] + h * self.strides[1] + i * self.strides[2];
        &self.bytes[offset..offset + keys]
    }
}

/// One (batch, head) pair's operands.
struct Head<'a> {
    q: Matrix<'a>,
    k: Matrix<'a>,
    v: Matrix<'a>,
    dim: usize,
    value_dim: usize,
    keys: usize,
    scale: f32,
}

impl Head<'_> {
    fn attend(&self, out: &mut [f32], mask: Option<(&MaskView, usize, usize)>) {
        let queries = out.len() / self.value_dim;
        let mut scores = vec![0.0f32; QUERY_BLOCK.min(queries) * self.keys];
        let mut runs = KeyRuns::default();
        for first in (0..queries).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(queries - first);
            let block_out = &mut out[first * self.value_dim..(first + rows) * self.value_dim];
            if !self.probabilities(first, rows, &mut scores, &mut runs, mask) {
                block_out.fill(0.0);
                continue;
            }
            // out[block] = Σ over runs of P[:, run] · V[run]
            runs.sum_of_products(block_out, &scores, rows, &self.v, self.value_dim);
        }
    }

    /// The probabilities of queries `first..first + rows` over the keys the block may see, into
    /// `scores` as a `rows × runs.total` matrix whose columns are the keys of `runs` (planned
    /// here) one run after another; `false` when the block sees no key at all. Forward and
    /// backward passes share it, so the backward pass differentiates exactly the forward's
    /// numbers.
    fn probabilities(
        &self,
        first: usize,
        rows: usize,
        scores: &mut [f32],
        runs: &mut KeyRuns,
        mask: Option<(&MaskView, usize, usize)>,
    ) -> bool {
        let rows_of = |i: usize| mask.map(|(m, b, h)| m.row(b, h, first + i, self.keys));
        match mask {
            None => runs.whole(self.keys),
            Some(_) => runs.plan((0..rows).filter_map(rows_of)),
        }
        if runs.total == 0 {
            return false;
        }
        let total = runs.total;
        let block_scores = &mut scores[..rows * total];
        // scores[:, run] = scale · Q[block] · K[run]ᵀ
        let query_block = self.q.rows(first, rows, self.dim);
        runs.products_by_key_rows(block_scores, query_block, &self.k, self.dim, self.scale);
        wide!({
            for (i, row) in block_scores.chunks_exact_mut(total).enumerate() {
                if let Some(hidden) = rows_of(i) {
                    for run in &runs.runs {
                        let columns = &mut row[run.column..run.column + run.len];
                        for (s, &m) in columns.iter_mut().zip(&hidden[run.key..run.key + run.len]) {
                            *s = if m != 0 { f32::NEG_INFINITY } else { *s };
                        }
                    }
                }
                softmax_in_place(row);
            }
        });
        true
    }

    /// One head's gradients, flash attention's backward pass block by block: with P recomputed,
    /// `dV += Pᵀ dO`, `dS = scale · P ⊙ (dO Vᵀ − rowsum(dO ⊙ O))`, `dQ = dS K`, `dK += dSᵀ Q`.
    /// `grad_query` is `queries × dim`, `grad_key` `keys × dim` and `grad_value` `keys ×
    /// value_dim`, all row-major; the key and value gradients are accumulated into (zeroed by
    /// the caller).
    #[allow(clippy::too_many_arguments)]
    fn gradients(
        &self,
        output: Matrix,
        grad_output: Matrix,
        grad_query: &mut [f32],
        grad_key: &mut [f32],
        grad_value: &mut [f32],
        mask: Option<(&MaskView, usize, usize)>,
    ) {
        let queries = grad_query.len() / self.dim;
        let block = QUERY_BLOCK.min(queries);
        let mut probs = vec![0.0f32; block * self.keys];
        let mut grad_scores = vec![0.0f32; block * self.keys];
        let mut runs = KeyRuns::default();
        for first in (0..queries).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(queries - first);
            let block_grad_query = &mut grad_query[first * self.dim..(first + rows) * self.dim];
            if !self.probabilities(first, rows, &mut probs, &mut runs, mask) {
                block_grad_query.fill(0.0);
                continue;
            }
            let total = runs.total;
            let probs = &probs[..rows * total];
            let grad_scores = &mut grad_scores[..rows * total];
            // dV[run] += P[:, run]ᵀ · dO[block]
            let grad_output_block = grad_output.rows(first, rows, self.value_dim);
            runs.add_to_key_rows(grad_value, self.value_dim, probs, rows, grad_output_block);
            // dP[:, run] = dO[block] · V[run]ᵀ
            runs.products_by_key_rows(grad_scores, grad_output_block, &self.v, self.value_dim, 1.0);
            wide!({
                for (i, (grad_row, prob_row)) in grad_scores
                    .chunks_exact_mut(total)
                    .zip(probs.chunks_exact(total))
                    .enumerate()
                {
                    let row_dot = (0..self.value_dim)
                        .map(|c| grad_output.at(first + i, c) * output.at(first + i, c))
                        .sum::<f32>();
                    for (g, &p) in grad_row.iter_mut().zip(prob_row) {
                        *g = p * (*g - row_dot) * self.scale;
                    }
                }
            });
            // dQ[block] = Σ over runs of dS[:, run] · K[run]
            runs.sum_of_products(block_grad_query, grad_scores, rows, &self.k, self.dim);
            // dK[run] += dS[:, run]ᵀ · Q[block]
            let query_block = self.q.rows(first, rows, self.dim);
            runs.add_to_key_rows(grad_key, self.dim, grad_scores, rows, query_block);
        }
    }
}

/// A hidden gap of at least this many keys between keys a block sees is left out of the
/// block's products (a packed row's rejected answer skips the chosen one it may not see); a
/// shorter gap is scored and masked with the rest, which costs less than splitting the products.
const MIN_SKIPPED_GAP: usize = 32;

/// Consecutive keys a block of queries scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyRun {
    /// The first key.
    key: usize,
    /// Its column in the block's score matrix.
    column: usize,
    len: usize,
}

/// The keys a block of queries scores, as runs in key order: every key some query of the block
/// sees, and the hidden gaps shorter than [`MIN_SKIPPED_GAP`] between them. Reused from block to
/// block.
#[derive(Debug, Default)]
struct KeyRuns {
    runs: Vec<KeyRun>,
    /// The keys of all runs: the score matrix's width.
    total: usize,
    /// Scratch: 1 where every row of the block hides the key.
    hidden_by_all: Vec<u8>,
}

impl KeyRuns {
    /// All `keys` in one run (no mask).
    fn whole(&mut self, keys: usize) {
        self.runs.clear();
        self.total = keys;
        if keys > 0 {
            self.runs.push(KeyRun {
                key: 0,
                column: 0,
                len: keys,
            });
        }
    }

    /// The runs of the block whose rows' hidden flags (`1` = hidden) are `rows`.
    fn plan<'m>(&mut self, rows: impl Iterator<Item = &'m [u8]> + Clone) {
        self.runs.clear();
        self.total = 0;
        let (lo, hi) = rows
            .clone()
            .filter_map(visible_span)
            .fold((usize::MAX, 0), |(lo, hi), (a, b)| (lo.min(a), hi.max(b)));
        if lo >= hi {
            return;
        }
        // Keys hidden from every row, between the block's outermost visible keys.
        self.hidden_by_all.clear();
        self.hidden_by_all.resize(hi - lo, 1);
        for row in rows {
            for (all, &h) in self.hidden_by_all.iter_mut().zip(&row[lo..hi]) {
                *all &= h;
            }
        }
        // `lo` and `hi - 1` are visible to some row: runs start and end on visible keys.
        let mut start = lo;
        let mut key = lo;
        while key < hi {
            if self.hidden_by_all[key - lo] == 0 {
                key += 1;
                continue;
            }
            let gap_start = key;
            while self.hidden_by_all[key - lo] != 0 {
                key += 1;
            }
            if key - gap_start >= MIN_SKIPPED_GAP {
                self.push(start, gap_start);
                start = key;
            }
        }
        self.push(start, hi);
    }

    fn push(&mut self, first: usize, end: usize) {
        self.runs.push(KeyRun {
            key: first,
            column: self.total,
            len: end - first,
        });
        self.total += end - first;
    }

    /// `dst = Σ over runs of S[:, run] · X[run]`: `S` (`scores`) is `rows × total` with the runs'
    /// columns, `X` the key-indexed matrix whose rows the runs select (`width` columns), `dst`
    /// `rows × width` row-major.
    fn sum_of_products(
        &self,
        dst: &mut [f32],
        scores: &[f32],
        rows: usize,
        x: &Matrix,
        width: usize,
    ) {
        assert!(dst.len() >= rows * width);
        for (index, run) in self.runs.iter().enumerate() {
            // SAFETY: `rows × total` of S hold the run's columns (checked above), X's rows
            // `run.key..run.key + run.len` lie inside its buffer (`StridedTensor::new` checked
            // the whole extent), `dst` holds `rows × width`.
            unsafe {
                product_into(
                    dst.as_mut_ptr(),
                    width,
                    index > 0,
                    self.columns(scores, rows, run),
                    x.rows(run.key, run.len, width),
                    1.0,
                    gemm::Parallelism::None,
                );
            }
        }
    }

    /// `S[:, run] = scale · Y · X[run]ᵀ` for every run: `Y` is a `rows × width` block of the
    /// block's queries, `X` the key-indexed matrix whose rows the runs select (`width` columns),
    /// `S` (`scores`) `rows × total` with the runs' columns.
    fn products_by_key_rows(
        &self,
        scores: &mut [f32],
        y: Operand,
        x: &Matrix,
        width: usize,
        scale: f32,
    ) {
        assert!(y.columns() == width && scores.len() >= y.rows() * self.total);
        for run in &self.runs {
            // SAFETY: the run's columns of the `rows × total` scores (checked above), `y` is
            // valid for its extent (taken from a checked matrix), X's rows of the run lie inside
            // its buffer (`StridedTensor::new` checked the whole extent).
            unsafe {
                product_into(
                    scores[run.column..].as_mut_ptr(),
                    self.total,
                    false,
                    y,
                    x.rows(run.key, run.len, width).transposed(),
                    scale,
                    gemm::Parallelism::None,
                );
            }
        }
    }

    /// `grad[run] += S[:, run]ᵀ · Y` for every run: `S` (`scores`) is `rows × total` with the runs'
    /// columns, `Y` a `rows × width` block of the block's queries, `grad` a key-indexed row-major
    /// matrix of `width` columns.
    fn add_to_key_rows(
        &self,
        grad: &mut [f32],
        width: usize,
        scores: &[f32],
        rows: usize,
        y: Operand,
    ) {
        assert!(y.rows() == rows && y.columns() == width);
        for run in &self.runs {
            let rows_of_run = &mut grad[run.key * width..(run.key + run.len) * width];
            // SAFETY: `rows × total` of S hold the run's columns (checked in `columns`), `y` is
            // valid for its extent (the caller took it from a checked matrix), the run's rows
            // of `grad` were sliced above.
            unsafe {
                product_into(
                    rows_of_run.as_mut_ptr(),
                    width,
                    true,
                    self.columns(scores, rows, run).transposed(),
                    y,
                    1.0,
                    gemm::Parallelism::None,
                );
            }
        }
    }

    /// A run's columns of the `rows × total` row-major matrix `scores` as a product operand.
    fn columns(&self, scores: &[f32], rows: usize, run: &KeyRun) -> Operand {
        assert!(scores.len() >= rows * self.total && run.column + run.len <= self.total);
        Operand::new(
            scores[run.column..].as_ptr(),
            [rows, run.len],
            [self.total as isize, 1],
        )
    }
}

/// `[first visible key, last visible key + 1)` of a mask row, `None` when every key is hidden.
fn visible_span(hidden: &[u8]) -> Option<(usize, usize)> {
    let first = first_zero(hidden)?;
    let last = last_zero(hidden)?;
    Some((first, last + 1))
}

/// Whether any of the eight bytes of `word` is zero (the classic SWAR test).
fn has_zero_byte(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    word.wrapping_sub(ONES) & !word & HIGHS != 0
}

fn word(chunk: &[u8]) -> u64 {
    u64::from_le_bytes(chunk.try_into().expect("chunks of eight bytes"))
}

/// The first zero byte, eight bytes at a time (a causal row is mostly hidden keys).
fn first_zero(bytes: &[u8]) -> Option<usize> {
    let mut chunks = bytes.chunks_exact(8);
    for (index, chunk) in (&mut chunks).enumerate() {
        if has_zero_byte(word(chunk)) {
            return chunk.iter().position(|&b| b == 0).map(|i| index * 8 + i);
        }
    }
    let start = bytes.len() - chunks.remainder().len();
    chunks
        .remainder()
        .iter()
        .position(|&b| b == 0)
        .map(|i| start + i)
}

/// The last zero byte, eight bytes at a time from the end.
fn last_zero(bytes: &[u8]) -> Option<usize> {
    let mut chunks = bytes.rchunks_exact(8);
    for (index, chunk) in (&mut chunks).enumerate() {
        if has_zero_byte(word(chunk)) {
            let start = bytes.len() - (index + 1) * 8;
            return chunk.iter().rposition(|&b| b == 0).map(|i| start + i);
        }
    }
    chunks.remainder().iter().rposition(|&b| b == 0)
}

/// Softmax of one row in place; a row of `-inf` (no visible key) becomes zeros.
#[inline(always)]
fn softmax_in_place(row: &mut [f32]) {
    // Eight partial maxima and sums: a fixed order (deterministic) that vectorises.
    let mut partial_max = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        for (m, &x) in partial_max.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&partial_max)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    for x in row.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    let mut partial = [0.0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        for (p, &x) in partial.iter_mut().zip(chunk) {
            *p += x;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    let sum = partial.iter().sum::<f32>() + tail;
    let inverse = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inverse;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::fused_attention::options;
    use burn::backend::ops::ModuleOps;
    use burn::backend::Flex;

    fn tensor(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    fn random(shape: [usize; 4], seed: u64) -> FlexTensor {
        let n: usize = shape.iter().product();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let values = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        tensor(values, shape)
    }

    fn values(t: FlexTensor) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().expect("f32")
    }

    /// Compares with flex's own kernel on the same inputs.
    fn check(
        batch: usize,
        heads: usize,
        kv_heads: usize,
        queries: usize,
        keys: usize,
        hidden: Option<Vec<bool>>,
    ) {
        let (dim, value_dim) = (8, 6);
        // Q as the model passes it: a `[b, t, h, d]` buffer seen as `[b, h, t, d]`.
        let q = random([batch, queries, heads, dim], 1).transpose(1, 2);
        let k = random([batch, kv_heads, keys, dim], 2);
        let v = random([batch, keys, kv_heads, value_dim], 3).transpose(1, 2);
        // One mask row per batch entry, broadcast over the heads by both kernels.
        let mask =
            hidden.map(|h| FlexTensor::from_data(TensorData::new(h, [batch, 1, queries, keys])));
        let ours = attention_f32(&q, &k, &v, mask.as_ref(), 0.3).expect("f32 inputs");
        // flex's kernel wants as many key heads as query heads.
        let repeat = |t: FlexTensor, d: usize| {
            let data = values(t);
            let per_head = data.len() / (batch * kv_heads);
            let mut out = Vec::new();
            for b in 0..batch {
                for h in 0..heads {
                    let kv = b * kv_heads + h / (heads / kv_heads);
                    out.extend_from_slice(&data[kv * per_head..(kv + 1) * per_head]);
                }
            }
            tensor(out, [batch, heads, keys, d])
        };
        let reference = Flex::attention(
            q,
            repeat(k, dim),
            repeat(v, value_dim),
            mask,
            None,
            options(0.3),
        );
        let (ours, reference) = (values(ours), values(reference));
        let worst = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 2e-6, "max difference {worst}");
    }

    /// Compares the backward kernel with the gradients composed from flex's tensor operations.
    fn check_gradients(
        batch: usize,
        heads: usize,
        kv_heads: usize,
        queries: usize,
        keys: usize,
        hidden: Option<Vec<bool>>,
    ) {
        use crate::nn::fused_attention::{composed_gradients, AttentionState};
        use burn::backend::ops::BoolTensorOps;
        use burn::tensor::Shape as BurnShape;

        let (dim, value_dim, scale) = (8, 6, 0.3);
        let q = random([batch, queries, heads, dim], 4).transpose(1, 2);
        let k = random([batch, kv_heads, keys, dim], 5);
        let v = random([batch, keys, kv_heads, value_dim], 6).transpose(1, 2);
        let grad_output = random([batch, queries, heads, value_dim], 7).transpose(1, 2);
        let mask =
            hidden.map(|h| FlexTensor::from_data(TensorData::new(h, [batch, 1, queries, keys])));
        let output = attention_f32(&q, &k, &v, mask.as_ref(), scale).expect("f32 inputs");
        let ours = attention_backward_f32(&q, &k, &v, mask.as_ref(), &output, &grad_output, scale)
            .expect("f32 inputs");

        let group = heads / kv_heads;
        let repeat = |t: FlexTensor, d: usize| {
            let data = values(t.to_contiguous());
            let per_head = keys * d;
            let mut out = Vec::new();
            for b in 0..batch {
                for h in 0..heads {
                    let kv = b * kv_heads + h / group;
                    out.extend_from_slice(&data[kv * per_head..(kv + 1) * per_head]);
                }
            }
            tensor(out, [batch, heads, keys, d])
        };
        let expanded =
            mask.map(|m| Flex::bool_expand(m, BurnShape::new([batch, heads, queries, keys])));
        let state = AttentionState::new(
            [q, repeat(k, dim), repeat(v, value_dim)],
            expanded,
            output,
            scale as f64,
        );
        let reference = composed_gradients::<Flex>(state, grad_output);
        let sum_groups = |t: FlexTensor, d: usize| {
            let data = values(t);
            let per_head = keys * d;
            let mut summed = vec![0.0f32; batch * kv_heads * per_head];
            for (index, chunk) in data.chunks_exact(per_head).enumerate() {
                let (b, h) = (index / heads, index % heads);
                let target = (b * kv_heads + h / group) * per_head;
                for (s, g) in summed[target..target + per_head].iter_mut().zip(chunk) {
                    *s += g;
                }
            }
            summed
        };
        let [ref_query, ref_key, ref_value] = reference;
        let expected = [
            values(ref_query),
            sum_groups(ref_key, dim),
            sum_groups(ref_value, value_dim),
        ];
        for ((name, ours), expected) in ["query", "key", "value"].iter().zip(ours).zip(expected) {
            let ours = values(ours);
            assert_eq!(ours.len(), expected.len(), "{name} gradient size");
            let worst = ours
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{name} gradient: max difference {worst}");
        }
    }

    #[test]
    fn gradients_match_the_composed_backward() {
        check_gradients(2, 4, 4, 70, 70, None);
        check_gradients(2, 4, 4, 150, 150, Some(causal(2, 150, 150, &[0, 0], None)));
        // Left padding: the first queries of row 1 see no key and pass no gradient.
        check_gradients(2, 4, 2, 130, 130, Some(causal(2, 130, 130, &[0, 5], None)));
        check_gradients(2, 6, 2, 3, 90, Some(causal(2, 3, 90, &[3, 0], None)));
        check_gradients(1, 2, 1, 100, 100, Some(causal(1, 100, 100, &[0], Some(16))));
        // Shared-prefix rows: the rejected answer's queries skip the chosen answer's keys.
        check_gradients(
            2,
            4,
            2,
            180,
            180,
            Some(packed(&[(40, 70, 60), (20, 20, 30)], 180)),
        );
    }

    /// Rows packed as a shared prefix, then a first answer, then a second answer that sees the
    /// prefix and itself but not the first answer, then padding (`segments`: the three lengths
    /// of each batch entry).
    fn packed(segments: &[(usize, usize, usize)], keys: usize) -> Vec<bool> {
        let mut hidden = Vec::new();
        for &(prefix, first, second) in segments {
            for i in 0..keys {
                for j in 0..keys {
                    let visible = if i < prefix + first {
                        j <= i
                    } else if i < prefix + first + second {
                        j < prefix || (prefix + first..=i).contains(&j)
                    } else {
                        false
                    };
                    hidden.push(!visible);
                }
            }
        }
        hidden
    }

    #[test]
    fn key_runs_skip_long_gaps_only() {
        let plan = |rows: &[Vec<u8>]| {
            let mut runs = KeyRuns::default();
            runs.plan(rows.iter().map(|r| r.as_slice()));
            (
                runs.runs
                    .iter()
                    .map(|r| (r.key, r.column, r.len))
                    .collect::<Vec<_>>(),
                runs.total,
            )
        };
        let row = |visible: &[std::ops::Range<usize>]| {
            let mut hidden = vec![1u8; 200];
            for range in visible {
                hidden[range.clone()].fill(0);
            }
            hidden
        };
        // A gap of 35 hidden from both rows is skipped; the keys one row sees stay.
        assert_eq!(
            plan(&[row(&[5..50, 90..100]), row(&[5..55, 95..130])]),
            (vec![(5, 0, 50), (90, 50, 40)], 90)
        );
        // A gap of 31 is kept in.
        assert_eq!(plan(&[row(&[0..10, 41..50])]), (vec![(0, 0, 50)], 50));
        assert_eq!(
            plan(&[row(&[0..10, 42..50])]),
            (vec![(0, 0, 10), (42, 10, 8)], 18)
        );
        // No visible key.
        assert_eq!(plan(&[row(&[]), row(&[])]), (vec![], 0));
    }

    fn causal(
        batch: usize,
        queries: usize,
        keys: usize,
        padding: &[usize],
        window: Option<usize>,
    ) -> Vec<bool> {
        let past = keys - queries;
        let mut hidden = Vec::new();
        for &pad in padding.iter().take(batch) {
            for i in 0..queries {
                for j in 0..keys {
                    let position = past + i;
                    let outside = window.is_some_and(|w| position >= j + w);
                    hidden.push(j < pad || j > position || outside);
                }
            }
        }
        hidden
    }

    #[test]
    fn visible_span_finds_the_outermost_visible_keys() {
        for len in 0..40 {
            for first in 0..len {
                for last in first..len {
                    let mut hidden = vec![1u8; len];
                    hidden[first] = 0;
                    hidden[last] = 0;
                    assert_eq!(
                        visible_span(&hidden),
                        Some((first, last + 1)),
                        "{len} {first}"
                    );
                }
            }
            assert_eq!(visible_span(&vec![1u8; len]), None);
        }
    }

    #[test]
    fn matches_flex_kernel() {
        check(2, 4, 4, 70, 70, None);
        check(2, 4, 4, 150, 150, Some(causal(2, 150, 150, &[0, 0], None)));
        // Left padding: the first queries of row 1 see no key.
        check(2, 4, 2, 130, 130, Some(causal(2, 130, 130, &[0, 5], None)));
        // Decoding one token after a cache, grouped-query heads, a sliding window.
        check(2, 6, 2, 1, 90, Some(causal(2, 1, 90, &[3, 0], None)));
        check(1, 2, 1, 100, 100, Some(causal(1, 100, 100, &[0], Some(16))));
        check(
            2,
            4,
            2,
            180,
            180,
            Some(packed(&[(40, 70, 60), (20, 20, 30)], 180)),
        );
    }
}
