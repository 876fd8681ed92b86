//! A linear layer's forward pass on a few samples, Y = X·Wᵀ + 1·bᵀ, as dot products of rows, on
//! CPUs with AVX2 and FMA.
//!
//! ## Why
//! At inference batch sizes (N = 1 to 8 rows of X) the product is a handful of matrix-vector
//! products: 2·N·F·F1 FLOPs against F·F1 values of W that must be read, so its speed is how
//! fast W streams in. A GEMM kernel first copies or packs W (to make B's rows contiguous),
//! which writes and re-reads all of it for a few multiply-adds per value: a 1024 → 512 layer at
//! batch 1 took 0.14 ms that way, where reading W's 2 MiB once takes under 0.05. Both X's rows
//! and W's rows are contiguous (W is (F1, F), row o the weights of output o), so each element
//! of Y is a dot product of two contiguous rows, and W can be read once, row by row, in order.
//!
//! ## How
//! ```text
//! for each output o (the threads split them):
//!   for each depth step of 8V: load 8V values of W's row o, and for each of the N rows of X
//!                              V FMAs into its V vectors of partial sums (V = 4 for N ≤ 2,
//!                              2 up to 6, 1 for 7 and 8: N·V ≤ 12 registers)
//!   the last step masked (zeros past F)
//!   y[i, o] = the 8V lanes of row i added in a fixed order, + b[o]
//! ```
//! Each element is summed in the same order whatever outputs a thread is given, so the results
//! do not depend on the thread count. They depend on N only through the choice of this path
//! (N ≤ 8 here, a GEMM over the batch above), which the batch decides, never the threads.

use super::shallow::lane_mask;
use std::arch::x86_64::*;

/// The most rows of X. From 9 rows on the GEMM over the batch was faster (1024 → 512,
/// 1 thread, medians of single steps: 9 rows here 0.25–0.26 ms against 0.21–0.23 there, 12
/// rows 0.39–0.57 against 0.23; 7 rows 0.11 against 0.22, 8 rows 0.14 against 0.21–0.24).
pub const ROWS: usize = 8;

/// Y (N×F1) ← X (N×F)·Wᵀ + bias, its rows `y_rows` apart (columns contiguous), for the outputs
/// `outputs.start..outputs.end` of W's rows; X's and W's rows contiguous, `x_rows` and
/// `w_rows` apart; `bias` holds F1 values (null: none).
pub struct Dots {
    /// N, F.
    pub shape: [usize; 2],
    pub x: *const f32,
    pub x_rows: isize,
    pub w: *const f32,
    pub w_rows: isize,
    pub bias: *const f32,
    pub y: *mut f32,
    pub y_rows: isize,
    pub outputs: std::ops::Range<usize>,
}

/// Runs the dot products.
///
/// # Safety
/// The pointers must describe matrices of the stated shapes (1 ≤ N ≤ [`ROWS`], F ≥ 1), with W's
/// rows and Y's columns `outputs` inside them; Y must overlap neither X nor W; AVX2 and FMA
/// must be available.
pub unsafe fn dots(d: &Dots) {
    // SAFETY: the caller's contract. One or two rows take 4 vectors of partial sums each
    // (with 2, a single row's FMAs would wait on each other: 4 cycles each, 2 in flight); 7
    // and 8 rows one each, so that the sums stay in the 16 registers.
    unsafe {
        match d.shape[0] {
            1 => rows::<1, 4>(d),
            2 => rows::<2, 4>(d),
            3 => rows::<3, 2>(d),
            4 => rows::<4, 2>(d),
            5 => rows::<5, 2>(d),
            6 => rows::<6, 2>(d),
            7 => rows::<7, 1>(d),
            _ => rows::<8, 1>(d),
        }
    }
}

/// [`dots`] for R rows of X, each with V vectors of partial sums in registers (R·V ≤ 12).
#[target_feature(enable = "avx2,fma")]
unsafe fn rows<const R: usize, const V: usize>(d: &Dots) {
    let depth = d.shape[1];
    let step = 8 * V;
    let whole = depth / step * step;
    let rest = depth - whole;
    let masks: [__m256i; V] = std::array::from_fn(|v| lane_mask(rest.saturating_sub(8 * v)));
    for o in d.outputs.clone() {
        // SAFETY: row o of W, inside W (o < F1).
        let w = unsafe { d.w.offset(o as isize * d.w_rows) };
        let mut sums = [[_mm256_setzero_ps(); V]; R];
        for p in (0..whole).step_by(step) {
            // SAFETY: values p..p + 8V ≤ F of row o of W and of each row of X.
            unsafe {
                let weights: [__m256; V] =
                    std::array::from_fn(|v| _mm256_loadu_ps(w.add(p + 8 * v)));
                for (i, row_sums) in sums.iter_mut().enumerate() {
                    let x = d.x.offset(i as isize * d.x_rows).add(p);
                    for (v, sum) in row_sums.iter_mut().enumerate() {
                        *sum = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8 * v)), weights[v], *sum);
                    }
                }
            }
        }
        if rest > 0 {
            // SAFETY: the masks' lanes are values whole..F of the rows; the others are not
            // read (and are zeros, which add nothing), so a vector wholly past F reads nothing
            // (its address, past the row, is only computed, with wrapping arithmetic).
            unsafe {
                let load = |row: *const f32, v: usize| {
                    _mm256_maskload_ps(row.wrapping_add(whole + 8 * v), masks[v])
                };
                let weights: [__m256; V] = std::array::from_fn(|v| load(w, v));
                for (i, row_sums) in sums.iter_mut().enumerate() {
                    let x = d.x.offset(i as isize * d.x_rows);
                    for (v, sum) in row_sums.iter_mut().enumerate() {
                        *sum = _mm256_fmadd_ps(load(x, v), weights[v], *sum);
                    }
                }
            }
        }
        for (i, row_sums) in sums.iter().enumerate() {
            // The vectors added in order, then the lanes in order.
            let total = row_sums[1..]
                .iter()
                .fold(row_sums[0], |total, &sum| _mm256_add_ps(total, sum));
            let mut lanes = [0.0f32; 8];
            // SAFETY: 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
            let mut dot = super::sum_of_lanes(&lanes);
            if !d.bias.is_null() {
                // SAFETY: bias[o], o < F1.
                dot += unsafe { *d.bias.add(o) };
            }
            // SAFETY: y[i, o], inside Y.
            unsafe { *d.y.offset(i as isize * d.y_rows).add(o) = dot };
        }
    }
}
