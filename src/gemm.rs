//! The matrix product every layer runs: C ← α·A·B + β·C.
//!
//! One entry point, so that the ops say *what* they multiply and this module decides *how*.
//!
//! ## How
//! For f32 on a CPU with AVX-512, one register-blocked kernel does the arithmetic:
//!
//! - **NN** (B's rows contiguous, as Xₙ (F×P) in `Yₙ = W·Xₙ` and dYₙ in `dXₙ = Wᵀ·dYₙ`):
//!   a tile of C of 6 rows × 64 columns lives in 24 zmm registers; each step k broadcasts
//!   6 values `A[i,k]` (A may be any strided view, e.g. Wᵀ, so it is never copied) and loads
//!   4 vectors of B's row k, then issues 24 FMAs. K is cut in blocks of 128 so that B's panel
//!   (128×64 floats, 32 KiB) stays in L1 for every row tile after the first. Xₙ and dYₙ come
//!   from memory, so while a panel's later tiles compute from L1 each prefetches a share of
//!   the *next* panel, one cache line every few steps, and the next first tile finds it in
//!   cache (when A is large too — Xₙ, broadcast in dW's path — each tile also prefetches the
//!   next tile's rows of A). The bias and a ReLU can be applied as each tile is stored
//!   ([`gemm_bias_relu`]).
//! - **B transposed** (B's *columns* contiguous, as Xₙᵀ in `dW = Σ dYₙ·Xₙᵀ`): the smaller of
//!   the two operands is copied once into a row-major scratch buffer (kept per thread, so it
//!   is allocated once): B itself when N ≤ M, then NN runs straight into C; otherwise Aᵀ, then
//!   NN computes Cᵀ = Bᵀ·Aᵀ (Bᵀ's contiguous rows broadcast) and Cᵀ is added back transposed.
//!   The copy is O(K·min(M, N)) against O(M·N·K) arithmetic; both transposing copies move
//!   whole 16×16 blocks through registers (four rounds of shuffles), not one float at a time.
//!
//! Edges (M not a multiple of the tile height, N or K not a multiple of 16) use smaller tiles
//! and masked loads and stores, so no element is read or written outside its matrix.
//!
//! f32 on CPUs without AVX-512 runs products of small depth (K ≤ 32, or ≤ 64 with a bias or
//! ReLU to apply), of few rows (M ≤ 24, K ≤ 160) or of a small W (≤ 128 KiB, K ≤ 256; Wᵀ
//! from K = 128, copied row-major first) on an AVX2 version of the NN tile (6 rows × 16
//! columns in 12 ymm registers), where packing would cost as much as the arithmetic; products
//! with B transposed (dW's `dYₙ·Xₙᵀ`, a linear layer's `X·Wᵀ`) from K = 32 on the same tile,
//! B copied per block into strips of 16 columns (so that a step need not allocate); and
//! the rest (and layouts the kernels do not take) on the gemm crate, whose kernels are picked
//! at run time for the CPU (AVX2 + FMA on most x86-64); f64, which the gradient checks use,
//! goes to ndarray's `general_mat_mul`. `tests/gemm.rs` compares every path with an f64 triple
//! loop on many shapes, strides and α, β.
//!
//! A 1×1 layer's products over a batch (`gemm_samples`: the forward pass, and dX on maps under
//! 16×16) run on those CPUs as one packed product over the samples' columns side by side,
//! A packed once for the batch (see `gemm/samples.rs`).
//!
//! A large product called outside the ops' own parallel parts splits C's columns between the
//! threads (see [`crate::parallel`]); inside them, each call runs on one thread.

use crate::element::Element;
use crate::error::{Error, Result};
use crate::parallel::{in_parts, Along};
use ndarray::linalg::general_mat_mul;
use ndarray::{
    ArrayView1, ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2, ArrayViewMut3, Axis,
};
use std::any::TypeId;

/// The most multiply-adds one product may take: 2⁵⁰, over an hour at this machine's peak.
pub const MAX_MACS: u64 = 1 << 50;

/// C (M×N) ← α·A (M×K)·B (K×N) + β·C. With β = 0, C's old values are ignored (even NaN).
/// A and B may be transposed or strided views; C must not overlap them.
pub fn gemm<T: Element>(
    alpha: T,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    beta: T,
    c: ArrayViewMut2<T>,
) -> Result<()> {
    product(
        alpha,
        a,
        b,
        beta,
        Epilogue {
            bias: None,
            relu: false,
        },
        c,
    )
}

/// C (M×N) ← A (M×K)·B (K×N) + bias·1ᵀ, then max(·, 0) if `relu`: a convolution's forward
/// pass with its bias and activation applied as each tile of C is stored, without another
/// sweep over C.
pub fn gemm_bias_relu<T: Element>(
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    relu: bool,
    c: ArrayViewMut2<T>,
) -> Result<()> {
    if let Some(bias) = &bias {
        check_length("bias length", a.nrows(), bias.len())?;
    }
    product(T::one(), a, b, T::zero(), Epilogue { bias, relu }, c)
}

/// What is applied to C as it is stored: a bias per row, then a ReLU.
#[derive(Clone, Copy)]
struct Epilogue<'a, T> {
    bias: Option<ArrayView1<'a, T>>,
    relu: bool,
}

fn product<T: Element>(
    alpha: T,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    beta: T,
    epilogue: Epilogue<T>,
    c: ArrayViewMut2<T>,
) -> Result<()> {
    let ((m, k), n) = (a.dim(), b.ncols());
    if !check_operands(&a, &b, &c)? {
        return Ok(());
    }
    if splits(m, n, k) {
        let parts = (Along(b, Axis(1)), Along(c, Axis(1)));
        return in_parts(parts, &|(Along(b, _), Along(c, _))| {
            gemm_serial(alpha, a, b, beta, epilogue, c)
        });
    }
    gemm_serial(alpha, a, b, beta, epilogue, c)
}

/// Cₙ (M×P) ← A (M×K)·Bₙ (K×P) + β·Cₙ, plus bias·1ᵀ and then max(·, 0) if asked, for every
/// sample n of B (N, K, P) and C (N, M, P): a 1×1 layer's forward pass (A = W) or its dX
/// (A = Wᵀ, β = 1 to accumulate) over a batch. For f32 on AVX2 without AVX-512, and unless the
/// product is one to split between the threads, one packed product over the samples' columns
/// side by side (see `samples.rs`); otherwise one product per sample. With `row_sums` (N × K,
/// no bias or ReLU), row n gets sample n's `Σₚ Bₙ[k, p]` as [`gemm_and_row_sums_of_b`] would
/// give it: dX's sample terms of db.
pub(crate) fn gemm_samples<T: Element>(
    a: ArrayView2<T>,
    b: ArrayView3<T>,
    beta: T,
    (bias, relu): (Option<ArrayView1<T>>, bool),
    mut c: ArrayViewMut3<T>,
    mut row_sums: Option<ArrayViewMut2<T>>,
) -> Result<()> {
    if let Some(bias) = &bias {
        check_length("bias length", a.nrows(), bias.len())?;
    }
    check_length("samples of C", b.shape()[0], c.shape()[0])?;
    if let Some(sums) = &row_sums {
        check_length("samples of the row sums", b.shape()[0], sums.nrows())?;
        check_length("row sums of B", b.shape()[1], sums.ncols())?;
        if bias.is_some() || relu {
            return Err(Error::invalid_config(
                "gemm_samples",
                "row sums of B are taken with a plain product (no bias or ReLU)",
            ));
        }
    }
    let (Some(b_0), Some(c_0)) = (b.outer_iter().next(), c.outer_iter_mut().next()) else {
        return Ok(());
    };
    let ((m, k), pixels) = (a.dim(), b.shape()[2]);
    let nonempty = check_operands(&a, &b_0, &c_0)?;
    #[cfg(target_arch = "x86_64")]
    if nonempty
        && k > 0
        && !splits(m, pixels, k)
        && TypeId::of::<T>() == TypeId::of::<f32>()
        && !avx512::available()
        && shallow::available()
        && (pixels == 1 || (b.strides()[2] == 1 && c.strides()[2] == 1))
        && bias
            .as_ref()
            .is_none_or(|b| b.len() <= 1 || b.strides()[0] == 1)
        && row_sums
            .as_ref()
            .is_none_or(|sums| sums.is_standard_layout())
    {
        let operands = samples::Samples {
            shape: [m, k, pixels],
            samples: b.shape()[0],
            a: a.as_ptr().cast::<f32>(),
            a_strides: [a.strides()[0], a.strides()[1]],
            b: b.as_ptr().cast::<f32>(),
            b_strides: [b.strides()[0], b.strides()[1]],
            beta: beta.as_f64() as f32,
            bias: bias
                .as_ref()
                .map_or(std::ptr::null(), |b| b.as_ptr().cast::<f32>()),
            relu,
            c: c.as_mut_ptr().cast::<f32>(),
            c_strides: [c.strides()[0], c.strides()[1]],
            b_row_sums: row_sums
                .as_mut()
                .map_or(std::ptr::null_mut(), |sums| sums.as_mut_ptr().cast::<f32>()),
        };
        // SAFETY: T is f32; the pointers and strides describe the views, whose shapes were
        // checked ((M×K), N × (K×P), N × (M×P), the row sums N × K row-major, non-empty); C
        // and the sums are borrowed mutably, so they overlap nothing else, and C's samples are
        // apart; AVX2 and FMA were detected.
        if unsafe { samples::gemm_f32(&operands) } {
            return Ok(());
        }
    }
    for (n, (b_n, c_n)) in b.outer_iter().zip(c.outer_iter_mut()).enumerate() {
        if let Some(sums) = row_sums.as_mut() {
            gemm_and_row_sums_of_b(a, b_n, beta, c_n, sums.row_mut(n))?;
            continue;
        }
        let bias = bias.as_ref().map(|b| b.view());
        product(T::one(), a, b_n, beta, Epilogue { bias, relu }, c_n)?;
    }
    Ok(())
}

/// Y (N×F1) ← X (N×F)·Wᵀ + 1·bᵀ as dot products of rows, X's with W's: a linear layer's
/// forward pass on at most 8 samples (see `dots.rs`), where a GEMM would copy or pack all of W
/// for a few multiply-adds per value. For f32 on AVX2 and FMA with X's and W's rows
/// contiguous; the threads split W's rows. Returns false, with nothing done, elsewhere.
pub(crate) fn dot_rows<T: Element>(
    x: ArrayView2<T>,
    w: ArrayView2<T>,
    bias: Option<ArrayView1<T>>,
    y: ArrayViewMut2<T>,
) -> Result<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        let ((n, f), f1) = (x.dim(), w.nrows());
        check_length("bias length", f1, bias.as_ref().map_or(f1, |b| b.len()))?;
        if !check_operands(&x, &w.t(), &y)? {
            return Ok(true);
        }
        let contiguous = |strides: &[isize], len: usize| len == 1 || strides[1] == 1;
        if TypeId::of::<T>() == TypeId::of::<f32>()
            && shallow::available()
            && n <= dots::ROWS
            && f > 0
            && contiguous(x.strides(), f)
            && contiguous(w.strides(), f)
            && contiguous(y.strides(), f1)
            && bias.as_ref().is_none_or(|b| f1 == 1 || b.strides()[0] == 1)
        {
            let x_rows = x.strides()[0];
            let bias = bias.map(|b| Along(b, Axis(0)));
            in_parts(
                ((Along(w, Axis(0)), Along(y, Axis(1))), bias),
                &|((Along(w, _), Along(mut y, _)), bias)| {
                    let outputs = 0..w.nrows();
                    let d = dots::Dots {
                        shape: [n, f],
                        x: x.as_ptr().cast::<f32>(),
                        x_rows,
                        w: w.as_ptr().cast::<f32>(),
                        w_rows: w.strides()[0],
                        bias: bias
                            .as_ref()
                            .map_or(std::ptr::null(), |Along(b, _)| b.as_ptr().cast::<f32>()),
                        y: y.as_mut_ptr().cast::<f32>(),
                        y_rows: y.strides()[0],
                        outputs,
                    };
                    // SAFETY: T is f32; the pointers and strides describe this part's views
                    // (N ≤ 8 rows of F values, its rows of W and columns of Y, its biases),
                    // X's, W's and Y's rows contiguous; Y is borrowed mutably, so it overlaps
                    // neither X nor W; AVX2 and FMA were detected.
                    unsafe { dots::dots(&d) };
                    Ok(())
                },
            )?;
            return Ok(true);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, w, bias, y);
    Ok(false)
}

/// Whether [`gemm()`] splits a product's columns between the threads: called from outside the
/// ops' own parallel parts (which already use every thread), with work for tens of
/// microseconds in each part: 2²¹ multiply-adds (a batch-1 layer such as 32 → 16 on 112×112
/// maps has 6.4 million; with 2²⁴ as the bar it ran on one thread).
fn splits(m: usize, n: usize, k: usize) -> bool {
    !crate::parallel::in_split_part() && crate::parallel::threads() > 1 && m * n * k >= 1 << 21
}

/// C ← A·B + β·C, and `row_sums[k] = Σⱼ B[k, j]` for each row k of B:
/// a 1×1 layer's dXₙ = Wᵀ·dYₙ together with its sample's term of db, Σₚ dYₙ[o, p], taken as
/// the product reads dYₙ (on large maps dYₙ does not stay in cache for a second pass: 4.8 MB
/// on MobileNetV2's 16 → 96 at 112×112). Where the AVX2 kernel runs the product, its first
/// row of tiles adds up the rows of B it loads (on one thread); elsewhere, and where the
/// product's columns are split between the threads, each row is summed after.
pub(crate) fn gemm_and_row_sums_of_b<T: Element>(
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    beta: T,
    mut c: ArrayViewMut2<T>,
    mut row_sums: ArrayViewMut1<T>,
) -> Result<()> {
    check_length("row sums of B", b.nrows(), row_sums.len())?;
    let nonempty = check_operands(&a, &b, &c)?;
    #[cfg(target_arch = "x86_64")]
    if nonempty
        && !splits(a.nrows(), b.ncols(), a.ncols())
        && TypeId::of::<T>() == TypeId::of::<f32>()
        && !avx512::available()
        && shallow::available()
        && a.ncols() > 0
        && row_sums.strides()[0] == 1
    {
        let mut operands = operands(T::one(), &a, &b, beta, None, false, &mut c);
        operands.b_row_sums = row_sums.as_mut_ptr().cast::<f32>();
        // SAFETY: as in gemm_serial; the row sums are B's K values, contiguous, and borrowed
        // mutably apart from A, B and C.
        if unsafe { shallow::gemm_f32(&operands) } {
            return Ok(());
        }
    }
    gemm(T::one(), a, b, beta, c)?;
    // Where the AVX2 kernel sums other products, these sums take its order: a layer's db then
    // has the same bits whether its product ran there or was split between the threads.
    let kernel_order = backend::<T>() == "avx2+gemm";
    for (sum, row) in row_sums.iter_mut().zip(b.outer_iter()) {
        *sum = if kernel_order {
            sum_in_lanes(row)
        } else {
            row.sum()
        };
    }
    Ok(())
}

/// `Σⱼ row[j]` in the order of the AVX2 kernel's row sums: 8 lanes, lane l adding
/// `row[16s + l] + row[16s + 8 + l]` (0 past the end) for each strip s of 16 columns in turn,
/// then the lanes added in order.
fn sum_in_lanes<T: Element>(row: ArrayView1<T>) -> T {
    let value = |j: usize| row.get(j).copied().unwrap_or_else(T::zero);
    let mut lanes = [T::zero(); 8];
    for start in (0..row.len()).step_by(16) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane += value(start + l) + value(start + 8 + l);
        }
    }
    sum_of_lanes(&lanes)
}

/// A sum kept in lanes, finished: the lanes added in order, lane 0 first. Every kernel here
/// that sums in lanes (B's row sums, with dX on either kernel; a linear layer's dot products)
/// finishes this way, so that a layer's db has the same bits whichever path took it.
fn sum_of_lanes<T: Element>(lanes: &[T]) -> T {
    lanes.iter().fold(T::zero(), |total, &lane| total + lane)
}

/// Checks that a vector beside the product (a bias, B's row sums) has the length it must.
fn check_length(what: &str, expected: usize, found: usize) -> Result<()> {
    if found != expected {
        let (expected, found) = (expected.to_string(), found.to_string());
        return Err(Error::shape_mismatch("gemm", what, expected, found));
    }
    Ok(())
}

/// Checks that A (M×K), B (K×N) and C (M×N) fit and that the product is not absurdly large;
/// returns whether there is anything to compute (M, N > 0).
fn check_operands<T>(a: &ArrayView2<T>, b: &ArrayView2<T>, c: &ArrayViewMut2<T>) -> Result<bool> {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    if k != k2 || c.dim() != (m, n) {
        return Err(Error::shape_mismatch(
            "gemm",
            "operand shapes (M×K)·(K×N) → (M×N)",
            format!("({m}×{k})·({k}×N) → ({m}×N)"),
            format!("({m}×{k})·({k2}×{n}) → {:?}", c.dim()),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(false);
    }
    // Operands can be broadcast views of any size: a product that could not finish in hours
    // is refused rather than run.
    let macs = (m as u64)
        .checked_mul(n as u64)
        .and_then(|mn| mn.checked_mul(k as u64));
    if macs.is_none_or(|macs| macs > MAX_MACS) {
        return Err(Error::invalid_shape(
            "gemm",
            format!("a product of more than {MAX_MACS} multiply-adds"),
            &[m, k, n],
        ));
    }
    Ok(true)
}

/// The product on the calling thread.
fn gemm_serial<T: Element>(
    alpha: T,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    beta: T,
    Epilogue { bias, relu }: Epilogue<T>,
    mut c: ArrayViewMut2<T>,
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    let contiguous_bias = bias
        .as_ref()
        .is_none_or(|b| b.len() <= 1 || b.strides()[0] == 1);
    #[cfg(target_arch = "x86_64")]
    if TypeId::of::<T>() == TypeId::of::<f32>() && a.ncols() > 0 && contiguous_bias {
        let operands = operands(alpha, &a, &b, beta, bias.as_ref(), relu, &mut c);
        // SAFETY: the pointers and strides describe the three views above, whose shapes were
        // checked to be (M×K), (K×N), (M×N); C is borrowed mutably, so it overlaps neither.
        // Each kernel runs only where its instructions were detected.
        let done = if avx512::available() {
            unsafe { avx512::gemm_f32(&operands) }
        } else {
            shallow::available() && unsafe { shallow::gemm_f32(&operands) }
        };
        if done {
            return Ok(());
        }
    }
    let beta = match bias {
        Some(bias) => {
            // C = bias·1ᵀ + β·C (β = 0 in gemm_bias_relu: old values ignored), then the
            // product added onto it. Row by row: contiguous, where the broadcast column is not.
            for (mut row, &value) in c.rows_mut().into_iter().zip(&bias) {
                match beta == T::zero() {
                    true => row.fill(value),
                    false => row.mapv_inplace(|old| value + beta * old),
                }
            }
            T::one()
        }
        None => beta,
    };
    if !blocked::gemm(alpha, a, b, beta, &mut c) {
        general_mat_mul(alpha, &a, &b, beta, &mut c);
    }
    if relu {
        // max(v, 0) that keeps NaN (as PyTorch's ReLU does): a NaN is not ≤ 0.
        c.mapv_inplace(|v| if v <= T::zero() { T::zero() } else { v });
    }
    Ok(())
}

/// The raw parts of C ← α·A·B + β·C (+ bias, ReLU) for the f32 kernels (T is f32: the casts
/// only name the element type); no row sums of B.
#[cfg(target_arch = "x86_64")]
fn operands<T: Element>(
    alpha: T,
    a: &ArrayView2<T>,
    b: &ArrayView2<T>,
    beta: T,
    bias: Option<&ArrayView1<T>>,
    relu: bool,
    c: &mut ArrayViewMut2<T>,
) -> Operands {
    let strides = |s: &[isize]| [s[0], s[1]];
    Operands {
        shape: [a.nrows(), b.ncols(), a.ncols()],
        alpha: alpha.as_f64() as f32,
        a: a.as_ptr().cast::<f32>(),
        a_strides: strides(a.strides()),
        b: b.as_ptr().cast::<f32>(),
        b_strides: strides(b.strides()),
        beta: beta.as_f64() as f32,
        bias: bias.map_or(std::ptr::null(), |b| b.as_ptr().cast::<f32>()),
        relu,
        c: c.as_mut_ptr().cast::<f32>(),
        c_strides: strides(c.strides()),
        b_row_sums: std::ptr::null_mut(),
    }
}

/// Whether a product of few rows and many columns should be asked for transposed (Cᵀ = BᵀAᵀ,
/// the longer side as C's rows): faster on the gemm crate and on ndarray (measured on dW of
/// the 1×1 and 3×3 layers), and on the AVX2 kernel it is the smaller operand whose strips are
/// copied; the AVX-512 kernel orients a transposed product itself.
pub(crate) fn longer_side_as_rows<T: Element>() -> bool {
    backend::<T>() != "avx512"
}

/// Whether this CPU runs AVX2 and FMA (detected once): the ops with vector kernels of their
/// own (the depthwise convolution) ask here too.
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return shallow::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Which implementation [`gemm()`] uses for element type `T` on this CPU: `"avx512"` for the
/// kernels of this module, `"avx2+gemm"` for this module's AVX2 kernel on products of small
/// depth and the gemm crate's on the others, `"gemm"` for the gemm crate's alone, `"ndarray"`
/// for `general_mat_mul`.
pub fn backend<T: Element>() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if TypeId::of::<T>() == TypeId::of::<f32>() && avx512::available() {
        return "avx512";
    }
    #[cfg(target_arch = "x86_64")]
    if TypeId::of::<T>() == TypeId::of::<f32>() && shallow::available() {
        return "avx2+gemm";
    }
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        return "gemm";
    }
    "ndarray"
}

/// f32 products without AVX-512: the gemm crate, whose packed, register-blocked kernels are
/// chosen at run time for the CPU (AVX2 + FMA on most x86-64 machines) and run 10–20 % faster
/// than ndarray's on the ops' shapes. f64 stays on ndarray: it is what the gradient checks run,
/// and its results do not depend on how the threads split the columns.
mod blocked {
    use super::*;

    /// C ← α·A·B + β·C on the calling thread; `false` (nothing done) for other than f32.
    pub fn gemm<T: Element>(
        alpha: T,
        a: ArrayView2<T>,
        b: ArrayView2<T>,
        beta: T,
        c: &mut ArrayViewMut2<T>,
    ) -> bool {
        if TypeId::of::<T>() != TypeId::of::<f32>() {
            return false;
        }
        let ((m, k), n) = (a.dim(), b.ncols());
        let (a_strides, b_strides, c_strides) = (a.strides(), b.strides(), c.strides());
        let (c_row, c_column) = (c_strides[0], c_strides[1]);
        // SAFETY: T is f32 (TypeId above), so the casts only name the element type. The
        // pointers and (row, column) strides describe the three views, whose shapes the caller
        // checked to be (M×K), (K×N), (M×N); C is borrowed mutably, so it overlaps neither.
        // The crate computes dst ← α′·dst + β′·lhs·rhs, reading dst only if asked: α′ = β and
        // β′ = α here, and with β = 0 C's old values (even NaN) are not read.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr().cast::<f32>(),
                c_column,
                c_row,
                beta != T::zero(),
                a.as_ptr().cast::<f32>(),
                a_strides[1],
                a_strides[0],
                b.as_ptr().cast::<f32>(),
                b_strides[1],
                b_strides[0],
                beta.as_f64() as f32,
                alpha.as_f64() as f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        true
    }
}

#[cfg(target_arch = "x86_64")]
/// A product described by raw parts: C (M×N) ← α·A (M×K)·B (K×N) + β·C, element (i, j)
/// of a matrix X at `x + i·strides[0] + j·strides[1]`.
pub struct Operands {
    pub shape: [usize; 3],
    pub alpha: f32,
    pub a: *const f32,
    pub a_strides: [isize; 2],
    pub b: *const f32,
    pub b_strides: [isize; 2],
    pub beta: f32,
    /// A bias added to every row i of C (`bias[i]`, contiguous), or null.
    pub bias: *const f32,
    /// Apply max(·, 0) to C as it is stored.
    pub relu: bool,
    pub c: *mut f32,
    pub c_strides: [isize; 2],
    /// Where to write Σⱼ B[k, j] for every row k of B (K values, contiguous), or null. Only
    /// the AVX2 kernel takes it (for a layer's dX with its db).
    pub b_row_sums: *mut f32,
}

/// f32 products of small depth or few rows on CPUs with AVX2 and FMA but no AVX-512: the
/// product of a 1×1 layer with few input channels on a large map (MobileNetV2's 16 → 96 at
/// 112×112: Yₙ = W·Xₙ with K = 16), and its dX, with M = 16. There the arithmetic per
/// element of C, or per element of B, is short and the gemm crate's packing of B costs as
/// much as the product; this kernel reads B in place. A tile of C, 6 rows × 16 columns, lives
/// in 12 ymm registers; each step k loads 2 vectors of B's row k and broadcasts 6 values of A
/// (any strides, so Wᵀ is not copied); the whole depth runs in registers, then the tile is
/// stored once, bias and ReLU applied on the way. Columns go in blocks (of 16384 / K for the
/// shallow products: 64 KiB of B, in L2), so that the block's rows of B stay in cache for
/// every row tile after the first; products of few rows go one strip at a time. The first row
/// of tiles reads B from memory and prefetches the strip after next as it goes. Edges use
/// smaller tiles and masked loads and stores; a last strip of at most 8 columns (a 14×14 map's
/// 196 = 12·16 + 4) runs on tiles one vector wide and 12 rows tall, which do the same
/// arithmetic per element with half the idle lanes or fewer. Each element is the sum over k in order, then α,
/// the bias, β·C: the same bits whichever columns a thread is given. (The AVX-512 module's NN
/// tile is the same design at twice the width.)
///
/// Two more products run on the same tile. With B *transposed* (dW = Σ dYₙ·Xₙᵀ), B is copied
/// block by block into strips of 16 columns, its rows contiguous (`transposed_b`), the last
/// strip of at most 8 columns again one vector wide. And dX = Wᵀ·dYₙ can return
/// the row sums of dYₙ (db) as well: the first row of tiles, which loads every value of B,
/// adds them up on the way (`summing_tiles`).
#[cfg(target_arch = "x86_64")]
mod samples;

#[cfg(target_arch = "x86_64")]
mod dots;

#[cfg(target_arch = "x86_64")]
mod shallow {
    use super::Operands;
    use crate::element::with_scratch_in;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    /// The products taken, measured against the gemm crate on MobileNetV2's layers (batch 16,
    /// 1 thread): any of depth K ≤ 32 (5–25 % faster at K = 16, 24, 32, in column blocks of
    /// 256; blocks of 16384 / K were faster still on the 56×56 layers), and those of at most
    /// 24 rows up to K = 160 (dX of 16 → 96 at 112×112: 11.2 ms against 14.2), there one
    /// 16-column strip at a time: B's strip is read from memory by the first row tile and from
    /// L1 by the few others.
    const MAX_DEPTH: usize = 32;
    /// With a bias or ReLU epilogue, up to K = 64: the W2 step's 64 → 256 forward (bias and
    /// ReLU) 12.7 → 10.1 ms; a plain product at K = 64 (W1's dX) was slower than the crate's.
    const MAX_DEPTH_EPILOGUE: usize = 64;
    const FEW_ROWS: usize = 24;
    const MAX_DEPTH_FEW_ROWS: usize = 160;
    /// And up to K = 256 when A's rows are contiguous and A takes at most 128 KiB (a 1×1
    /// layer's forward, A = W, with few output channels): the crate packs A on every call,
    /// which costs as much there as reading it in place. Forward of W1 (256 → 64 at 28×28,
    /// batch 32, bias), min of 30 runs over four alternating rounds: 11.4–11.8 → 10.8–11.1 ms
    /// at 1 thread, 7.7–8.3 → 5.4–5.5 at 2; 144 → 32 at 28×28, batch 16: 1.9–2.3 → 1.45–1.49.
    /// With A transposed (Wᵀ, in dX) its rows are strided, and the crate was faster (W1's dX
    /// 10.3 against 13.4); at K = 384 (64 × 384) the two were level.
    const MAX_DEPTH_SMALL_A: usize = 256;
    const SMALL_A_BYTES: usize = 128 << 10;
    /// A small *transposed* A (Wᵀ in dX) of depth K ≥ 128 is copied row-major (per call, into
    /// a per-thread scratch) and then runs here too: MobileNetV2's 32 → 192 at 28×28 (dX, K =
    /// 192) 2.0 against the crate's 2.3 ms, W2's 64 → 256 (K = 256) level; at K = 64 (W1's
    /// dX) the crate stayed faster, copy or not.
    const MIN_DEPTH_COPIED_A: usize = 128;
    /// B with contiguous *columns* (Xₙᵀ in dW = Σ dYₙ·Xₙᵀ, Wᵀ in a linear layer's forward)
    /// runs here from this depth on, copied into strips (see [`transposed_b`]). Below it (dW
    /// per sample on maps under 6×6) each tile loads and stores C for few multiply-adds, and
    /// the gemm crate was faster: dW of a 1×1 layer 1024 → 512 on 1×1 maps (batch 128, K = 1)
    /// took 12.4 ms there against 20.9 here; 256 → 256 at K = 25 (batch 64) was level, and at
    /// K = 49 (7×7, batch 32) this path took 2.5 ms against 3.5.
    const MIN_DEPTH_COPIED_B: usize = 32;
    /// A block of the copied B: up to STRIP_BLOCK columns, and K cut into blocks as even as it
    /// allows, none deeper than MAX_DEPTH_BLOCK (strips of 2 MiB at most). Each depth block
    /// reads and writes every tile of C once more, and restarts A's rows at a new offset,
    /// while B's strip is read in order, whichever cache it comes from: deep blocks won over
    /// blocks of 256 (strips in L1). dW alone (`conv1x1::backward`, 1 thread, the two in one
    /// process, fastest of 40): 256 → 64 at 28×28 (batch 32, K = 784) 10.6 → 10.1 ms, 32 → 16
    /// at 112×112 3.9 → 3.4, 24 → 144 at 56×56 5.9 → 5.4, 960 → 320 at 7×7 (K = 392) 6.1 → 5.9;
    /// 14×14 maps (K = 196, one block either way) level. The blocks depend on K alone, so that
    /// each element's sum does not depend on how the threads split C's columns.
    const MAX_DEPTH_BLOCK: usize = 4096;
    const STRIP_BLOCK: usize = 128;
    const ROWS: usize = 6;
    const WIDTH: usize = 16;
    /// The height of a tile one vector wide: 12 accumulators, as in the 6 × 16 tile.
    const NARROW_ROWS: usize = 12;

    /// Whether this CPU runs AVX2 and FMA (detected once).
    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE
            .get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// Runs the product if it is shallow (K ≤ 32, or ≤ 64 with a bias or ReLU, or ≤ 256 with
    /// a small A: rows contiguous, or columns from K = 128) or of few rows, and B's and C's
    /// rows are contiguous; or if B's columns are contiguous from K = 32 on (A's and C's rows
    /// contiguous, no bias or ReLU). Returns false to let the caller fall back.
    ///
    /// # Safety
    /// The operands must describe valid, non-empty matrices (M, N, K > 0) of the stated shapes,
    /// C must not overlap A or B, and AVX2 and FMA must be available.
    pub unsafe fn gemm_f32(operands: &Operands) -> bool {
        let [m, n, k] = operands.shape;
        let contiguous = |[_, column]: [isize; 2]| column == 1 || n == 1;
        // With a bias or a ReLU to apply, the kernel pays deeper too: the gemm crate's path adds
        // a pass over C for each.
        let epilogue = !operands.bias.is_null() || operands.relu;
        let [rsa, csa] = operands.a_strides;
        let transposed_b_deep = operands.b_strides[0] == 1 && n > 1 && k >= MIN_DEPTH_COPIED_B;
        if transposed_b_deep && csa == 1 && !epilogue && operands.b_row_sums.is_null() {
            if !contiguous(operands.c_strides) {
                return false;
            }
            // SAFETY: the caller's contract; B's columns and A's and C's rows are contiguous.
            return unsafe { transposed_b(operands) };
        }
        let small_a = m * k * 4 <= SMALL_A_BYTES && k <= MAX_DEPTH_SMALL_A;
        let few_rows = m <= FEW_ROWS && k <= MAX_DEPTH_FEW_ROWS;
        // Wᵀ (dX's A): its columns are contiguous, and the tile's broadcasts along its rows
        // would each touch a new line; copied row-major first when deep enough to pay.
        let copy_a = small_a && csa != 1 && rsa == 1 && k >= MIN_DEPTH_COPIED_A && !few_rows;
        let block = if k <= MAX_DEPTH
            || (epilogue && k <= MAX_DEPTH_EPILOGUE)
            || (small_a && csa == 1)
            || copy_a
        {
            (16384 / k) / WIDTH * WIDTH
        } else if few_rows {
            WIDTH // one strip at a time
        } else {
            return false;
        };
        if !contiguous(operands.b_strides) || !contiguous(operands.c_strides) {
            return false;
        }
        if !copy_a {
            // SAFETY: the caller's contract, and B's and C's rows are contiguous.
            unsafe { summing_tiles(operands, block) };
            return true;
        }
        COPY.with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                return false;
            };
            scratch.resize(m * k, 0.0);
            // SAFETY: Aᵀ is (k×m) at `a` with row stride csa and contiguous rows: inside A.
            unsafe { transpose(k, m, operands.a, csa, &mut scratch) };
            let rows = Operands {
                a: scratch.as_ptr(),
                a_strides: [k as isize, 1],
                ..*operands
            };
            // SAFETY: as above, A now the scratch's (m×k) row-major copy.
            unsafe { summing_tiles(&rows, block) };
            true
        })
    }

    /// [`tiles`], and with `b_row_sums` given, B's row sums: each tile of the first row of
    /// tiles, which loads every column of B once (its strips in order: column blocks are
    /// whole strips), adds the two vectors of each row k it loads into vector k of a
    /// per-thread scratch (8 lanes; a fresh vector if the thread's is in use); each vector is
    /// summed across at the end.
    ///
    /// # Safety
    /// As [`tiles`]'s, and `b_row_sums`, when not null, must hold K writable values.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn summing_tiles(operands: &Operands, block: usize) {
        if operands.b_row_sums.is_null() {
            // SAFETY: the caller's.
            return unsafe { tiles(operands, block, std::ptr::null_mut()) };
        }
        let k = operands.shape[2];
        with_scratch_in(&VECTOR_SUMS, 8 * k, |sums| {
            // SAFETY: the caller's; the scratch holds 8 values for each of the K rows.
            unsafe { tiles(operands, block, sums.as_mut_ptr()) };
            for (row, lanes) in sums.chunks_exact(8).enumerate() {
                // The order of `sum_in_lanes`, which sums where this kernel does not.
                let sum = super::sum_of_lanes(lanes);
                // SAFETY: row < K, inside the caller's K values.
                unsafe { *operands.b_row_sums.add(row) = sum };
            }
        })
    }

    thread_local! {
        /// The copied operand, kept per thread: a transposed A row-major (see
        /// [`MIN_DEPTH_COPIED_A`]) or a transposed B's strips (see [`transposed_b`]).
        static COPY: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        /// B's row sums as 8-lane vectors while the tiles run (see [`summing_tiles`]).
        static VECTOR_SUMS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// C ← α·A·B + β·C with B's columns contiguous: B = Dᵀ for a row-major D (N×K), as in dW's
    /// `dYₙ·Xₙᵀ`. The tile needs B's *rows* contiguous, so each block of B (see
    /// [`MAX_DEPTH_BLOCK`] and [`STRIP_BLOCK`]) is first copied, transposed, into strips of 16
    /// columns (strip s holds B[p, 16s..16s+16] for each depth p in turn, zero-padded past N),
    /// then every row tile of C runs along the block's strips. A strip is read in order; a
    /// copy with B's own row stride instead (a multiple of 256 bytes on these layers) put a
    /// strip's lines in a few cache sets and ran at half the speed. The depth blocks add into
    /// C in turn: the first with β, the others with β = 1, so each element's sum is the same
    /// whichever columns a thread is given. Returns false (nothing done) if the thread's copy
    /// is in use.
    ///
    /// # Safety
    /// As [`gemm_f32`]'s, with B's columns and A's and C's rows contiguous.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn transposed_b(operands: &Operands) -> bool {
        let [m, n, k] = operands.shape;
        let d_rows = operands.b_strides[1]; // D's row stride: B[p, j] = D[j, p]
        COPY.with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                return false;
            };
            let depth_block = k.div_ceil(k.div_ceil(MAX_DEPTH_BLOCK));
            let strips_len = STRIP_BLOCK.min(n.next_multiple_of(WIDTH)) * depth_block;
            scratch.resize(strips_len, 0.0);
            for first_column in (0..n).step_by(STRIP_BLOCK) {
                let columns = STRIP_BLOCK.min(n - first_column);
                for first_depth in (0..k).step_by(depth_block) {
                    let depth = depth_block.min(k - first_depth);
                    // SAFETY: D's rows first_column.. (< n) from column first_depth (depth
                    // values each): inside D; the scratch holds the block's strips.
                    unsafe {
                        let block = operands
                            .b
                            .offset(first_column as isize * d_rows)
                            .add(first_depth);
                        copy_strips(columns, depth, block, d_rows, &mut scratch);
                    }
                    let block = Operands {
                        shape: [m, columns, depth],
                        a: operands.a.add(first_depth),
                        b: scratch.as_ptr(),
                        b_strides: [WIDTH as isize, 1],
                        beta: if first_depth == 0 { operands.beta } else { 1.0 },
                        c: operands.c.add(first_column),
                        ..*operands
                    };
                    // SAFETY: the block's A, C and strips, inside their matrices and scratch.
                    unsafe { strip_tiles(&block) };
                }
            }
            true
        })
    }

    /// The row tiles of C, each along every strip of B's block (strip s at `b + s·16·K`, its
    /// rows 16 floats apart).
    ///
    /// # Safety
    /// As [`gemm_f32`]'s, with B the strips [`copy_strips`] wrote and C's rows contiguous.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn strip_tiles(block: &Operands) {
        let [m, n, k] = block.shape;
        // A last strip of at most 8 columns (N = 24: dW of a projection to 24 channels) would
        // leave half of every tile's FMAs idle: it runs on tiles one vector wide and twice as tall.
        let narrow = n % WIDTH > 0 && n % WIDTH <= 8;
        let wide_end = if narrow { n - n % WIDTH } else { n };
        for row in (0..m).step_by(ROWS) {
            for column in (0..wide_end).step_by(WIDTH) {
                let strip = Operands {
                    b: block.b.add(column * k),
                    c: block.c.add(column),
                    ..*block
                };
                let tile = Tile {
                    row,
                    column: 0,
                    lanes: WIDTH.min(n - column),
                    prefetch: std::ptr::null(),
                    row_sums: std::ptr::null_mut(),
                };
                // SAFETY: the caller's contract; the tile lies inside C (rows < m, lanes
                // masked at n) and reads the strip's K rows of 16 floats.
                unsafe { any_tile(&strip, tile, ROWS.min(m - row)) };
            }
        }
        if narrow {
            let strip = Operands {
                b: block.b.add(wide_end * k),
                c: block.c.add(wide_end),
                ..*block
            };
            // SAFETY: the caller's contract; the strip's K rows of 16 floats, C's last columns.
            unsafe { narrow_strip(&strip, n - wide_end) };
        }
    }

    /// The columns left after the full strips, at most 8 (at `strip.b` and `strip.c`), on
    /// tiles one vector wide and [`NARROW_ROWS`] tall: a 16-column tile there would leave half
    /// of its FMAs idle or more.
    ///
    /// # Safety
    /// As [`tile_of`]'s for a tile of `lanes` columns at column 0, for every row of C.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn narrow_strip(strip: &Operands, lanes: usize) {
        let m = strip.shape[0];
        for row in (0..m).step_by(NARROW_ROWS) {
            // SAFETY: the caller's contract; rows < m, lanes masked at n, the strip's K rows.
            unsafe {
                match NARROW_ROWS.min(m - row) {
                    12 => narrow_tile::<12>(strip, row, lanes),
                    11 => narrow_tile::<11>(strip, row, lanes),
                    10 => narrow_tile::<10>(strip, row, lanes),
                    9 => narrow_tile::<9>(strip, row, lanes),
                    8 => narrow_tile::<8>(strip, row, lanes),
                    7 => narrow_tile::<7>(strip, row, lanes),
                    6 => narrow_tile::<6>(strip, row, lanes),
                    5 => narrow_tile::<5>(strip, row, lanes),
                    4 => narrow_tile::<4>(strip, row, lanes),
                    3 => narrow_tile::<3>(strip, row, lanes),
                    2 => narrow_tile::<2>(strip, row, lanes),
                    _ => narrow_tile::<1>(strip, row, lanes),
                }
            }
        }
    }

    /// C tile (R rows × the first `lanes` ≤ 8 columns) ← α·A·B + bias + β·C, then max(·, 0)
    /// with a ReLU: R accumulators of one vector, each step one (masked) load of B's row and R
    /// broadcasts of A.
    ///
    /// # Safety
    /// As [`tile_of`]'s, for rows row..row+R and columns ..lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn narrow_tile<const R: usize>(strip: &Operands, row: usize, lanes: usize) {
        let [_, _, k] = strip.shape;
        let ([rsa, csa], rsb, rsc) = (strip.a_strides, strip.b_strides[0], strip.c_strides[0]);
        let a = strip.a.offset(row as isize * rsa);
        let c = strip.c.offset(row as isize * rsc);
        let mask = lane_mask(lanes);
        let mut acc = [_mm256_setzero_ps(); R];
        for p in 0..k as isize {
            // SAFETY: B's row p, its first `lanes` values; A[row + i, p].
            let b = unsafe { _mm256_maskload_ps(strip.b.offset(p * rsb), mask) };
            for (i, slot) in acc.iter_mut().enumerate() {
                let broadcast = _mm256_set1_ps(unsafe { *a.offset(i as isize * rsa + p * csa) });
                *slot = _mm256_fmadd_ps(broadcast, b, *slot);
            }
        }
        let (alpha, beta) = (_mm256_set1_ps(strip.alpha), _mm256_set1_ps(strip.beta));
        for (i, &sum) in acc.iter().enumerate() {
            // SAFETY: C[row + i, ..lanes], masked past C's last column; bias[row + i].
            unsafe {
                let target = c.offset(i as isize * rsc);
                let mut result = _mm256_mul_ps(sum, alpha);
                if !strip.bias.is_null() {
                    result = _mm256_add_ps(result, _mm256_set1_ps(*strip.bias.add(row + i)));
                }
                if strip.beta != 0.0 {
                    result = _mm256_fmadd_ps(_mm256_maskload_ps(target, mask), beta, result);
                }
                if strip.relu {
                    // As in tile_of: a NaN stays.
                    result = _mm256_max_ps(_mm256_setzero_ps(), result);
                }
                _mm256_maskstore_ps(target, mask, result);
            }
        }
    }

    /// `strips[s·16·depth + p·16 + j] = D[16s + j, p]` for the `columns` rows of D at `d`
    /// (row stride `rs`, contiguous) and p < depth: Dᵀ cut into strips of 16 columns, zeros
    /// past the last; 8×8 blocks go through registers.
    ///
    /// # Safety
    /// Every `d + j·rs + p` (j < columns, p < depth) must be readable, and `strips` must hold
    /// columns.next_multiple_of(16)·depth values. AVX must be available.
    #[target_feature(enable = "avx")]
    unsafe fn copy_strips(
        columns: usize,
        depth: usize,
        d: *const f32,
        rs: isize,
        strips: &mut [f32],
    ) {
        let target = strips.as_mut_ptr();
        for first in (0..columns.next_multiple_of(WIDTH)).step_by(8) {
            let (strip, half) = (first / WIDTH, first % WIDTH);
            let rows = columns.saturating_sub(first).min(8);
            // SAFETY: the strip's values for these 8 columns, inside `strips` (its length).
            let out = unsafe { target.add(strip * WIDTH * depth + half) };
            let mut p = 0;
            if rows == 8 {
                while p + 8 <= depth {
                    // SAFETY: rows first..first+8 of D, values p..p+8: inside D.
                    unsafe {
                        let row = |i: usize| d.offset((first + i) as isize * rs).add(p);
                        let block = transpose_8x8(std::array::from_fn(|i| _mm256_loadu_ps(row(i))));
                        for (q, &values) in block.iter().enumerate() {
                            _mm256_storeu_ps(out.add((p + q) * WIDTH), values);
                        }
                    }
                    p += 8;
                }
            }
            for p in p..depth {
                for j in 0..8 {
                    // SAFETY: inside D (j < rows) and inside the strip.
                    unsafe {
                        *out.add(p * WIDTH + j) = if j < rows {
                            *d.offset((first + j) as isize * rs).add(p)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }

    /// `destination[q·rows + r] = source[r·rs + q]` for r < rows, q < columns: the (rows ×
    /// columns) matrix at `source`, its rows contiguous, written transposed and row-major;
    /// 8×8 blocks go through registers.
    ///
    /// # Safety
    /// Every `source + r·rs + q` in range must be readable; `destination` must hold
    /// rows·columns values. AVX must be available.
    #[target_feature(enable = "avx")]
    unsafe fn transpose(
        rows: usize,
        columns: usize,
        source: *const f32,
        rs: isize,
        destination: &mut [f32],
    ) {
        let target = destination.as_mut_ptr();
        for r0 in (0..rows).step_by(8) {
            for q0 in (0..columns).step_by(8) {
                if r0 + 8 <= rows && q0 + 8 <= columns {
                    // SAFETY: rows r0..r0+8 from column q0 of the source, and rows q0..q0+8
                    // from column r0 of the destination: inside both by the test above.
                    unsafe {
                        let row = |i: usize| source.offset((r0 + i) as isize * rs).add(q0);
                        let block = transpose_8x8(std::array::from_fn(|i| _mm256_loadu_ps(row(i))));
                        for (q, &column) in block.iter().enumerate() {
                            _mm256_storeu_ps(target.add((q0 + q) * rows + r0), column);
                        }
                    }
                    continue;
                }
                for r in r0..(r0 + 8).min(rows) {
                    for q in q0..(q0 + 8).min(columns) {
                        // SAFETY: inside both, by the loop bounds.
                        unsafe {
                            *target.add(q * rows + r) = *source.offset(r as isize * rs).add(q)
                        };
                    }
                }
            }
        }
    }

    /// The 8×8 block whose rows are `v` transposed: element j of row i moves to element i of
    /// row j (pairs interleaved, then quadruples, then the 128-bit halves exchanged).
    #[target_feature(enable = "avx")]
    fn transpose_8x8(v: [__m256; 8]) -> [__m256; 8] {
        let pairs = |lo: bool, a: __m256, b: __m256| {
            if lo {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        };
        let t = [
            pairs(true, v[0], v[1]),
            pairs(false, v[0], v[1]),
            pairs(true, v[2], v[3]),
            pairs(false, v[2], v[3]),
            pairs(true, v[4], v[5]),
            pairs(false, v[4], v[5]),
            pairs(true, v[6], v[7]),
            pairs(false, v[6], v[7]),
        ];
        let s = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        std::array::from_fn(|j| {
            if j < 4 {
                _mm256_permute2f128_ps::<0x20>(s[j], s[j + 4])
            } else {
                _mm256_permute2f128_ps::<0x31>(s[j - 4], s[j])
            }
        })
    }

    /// The tiles of C, in column blocks of `block` columns; the first row of tiles adds B's
    /// rows into `row_sums` (8 lanes per row of B) unless it is null.
    ///
    /// # Safety
    /// As [`gemm_f32`]'s, with B's and C's rows contiguous, and `row_sums` null or holding
    /// 8·K writable values.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tiles(operands: &Operands, block: usize, row_sums: *mut f32) {
        let [m, n, _] = operands.shape;
        // A last strip of at most 8 columns (14×14 maps: 196 = 12·16 + 4) runs on narrow
        // tiles, unless B's row sums are taken (the first row of tiles sums whole strips).
        let narrow = row_sums.is_null() && n % WIDTH > 0 && n % WIDTH <= 8;
        let wide_end = if narrow { n - n % WIDTH } else { n };
        for first in (0..wide_end).step_by(block) {
            let end = (first + block).min(wide_end);
            for row in (0..m).step_by(ROWS) {
                for column in (first..end).step_by(WIDTH) {
                    // A strip of B is a cache line from each of K rows: more streams than the
                    // hardware prefetcher follows, so the first row of tiles, which reads B
                    // from memory, asks for the strip after next, a line per step k (all K
                    // lines at once, before the tile, was 4–11 % slower; without it the
                    // forward of 32 → 16 at 112×112 took 4.4 ms instead of 3.7).
                    let prefetch = if row == 0 {
                        operands.b.wrapping_add(column + 2 * WIDTH)
                    } else {
                        std::ptr::null()
                    };
                    let tile = Tile {
                        row,
                        column,
                        lanes: WIDTH.min(end - column),
                        prefetch,
                        row_sums: if row == 0 {
                            row_sums
                        } else {
                            std::ptr::null_mut()
                        },
                    };
                    // SAFETY: the caller's contract; the tile lies inside C (rows < m, lanes
                    // masked at n), and it reads A's and B's elements for those rows, columns
                    // and depths < k only.
                    unsafe { any_tile(operands, tile, ROWS.min(m - row)) };
                }
            }
        }
        if narrow {
            let strip = Operands {
                b: operands.b.add(wide_end),
                c: operands.c.add(wide_end),
                ..*operands
            };
            // SAFETY: the caller's contract; B's and C's last n − wide_end columns.
            unsafe { narrow_strip(&strip, n - wide_end) };
        }
    }

    /// The tile of `rows` (1–6) rows, through the [`tile_of`] compiled for that height and for
    /// a full or a masked width.
    ///
    /// # Safety
    /// As [`tile_of`]'s.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn any_tile(operands: &Operands, tile: Tile, rows: usize) {
        // SAFETY: the caller's.
        unsafe {
            match (rows, tile.lanes == WIDTH) {
                (6, true) => tile_of::<6, true>(operands, tile),
                (5, true) => tile_of::<5, true>(operands, tile),
                (4, true) => tile_of::<4, true>(operands, tile),
                (3, true) => tile_of::<3, true>(operands, tile),
                (2, true) => tile_of::<2, true>(operands, tile),
                (_, true) => tile_of::<1, true>(operands, tile),
                (6, false) => tile_of::<6, false>(operands, tile),
                (5, false) => tile_of::<5, false>(operands, tile),
                (4, false) => tile_of::<4, false>(operands, tile),
                (3, false) => tile_of::<3, false>(operands, tile),
                (2, false) => tile_of::<2, false>(operands, tile),
                (_, false) => tile_of::<1, false>(operands, tile),
            }
        }
    }

    /// Where a tile of C starts, how many of its 16 columns are inside C, the columns of B
    /// whose line in each row k to prefetch on step k (null: none), and the vectors into
    /// which it adds each row k of B it loads (at `row_sums + 8k`; null: none).
    #[derive(Clone, Copy)]
    struct Tile {
        row: usize,
        column: usize,
        lanes: usize,
        prefetch: *const f32,
        row_sums: *mut f32,
    }

    /// The mask of the first `lanes` of 8 (a lane is on when its top bit is set).
    pub(super) fn lane_mask(lanes: usize) -> __m256i {
        let on = |lane: i32| if (lane as usize) < lanes { -1 } else { 0 };
        // SAFETY: AVX is implied by the AVX2 the caller checked.
        unsafe { _mm256_setr_epi32(on(0), on(1), on(2), on(3), on(4), on(5), on(6), on(7)) }
    }

    /// C tile (R rows × 16 columns, masked past C's last column unless `FULL`) ← α·A·B +
    /// bias + β·C, then max(·, 0) with a ReLU.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_of<const R: usize, const FULL: bool>(operands: &Operands, tile: Tile) {
        let Operands {
            shape: [_, _, k],
            alpha,
            a,
            b,
            beta,
            bias,
            relu,
            c,
            ..
        } = *operands;
        let ([rsa, csa], rsb, rsc) = (
            operands.a_strides,
            operands.b_strides[0],
            operands.c_strides[0],
        );
        let masks = [
            lane_mask(tile.lanes),
            lane_mask(tile.lanes.saturating_sub(8)),
        ];
        let (a, b, c) = (
            a.offset(tile.row as isize * rsa),
            b.add(tile.column),
            c.offset(tile.row as isize * rsc).add(tile.column),
        );
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for p in 0..k as isize {
            if !tile.prefetch.is_null() {
                let line = tile.prefetch.wrapping_offset(p * rsb);
                // A prefetch reads nothing and never faults, wherever it points.
                _mm_prefetch::<_MM_HINT_T0>(line.cast::<i8>());
            }
            let mut row = [_mm256_setzero_ps(); 2];
            for (v, slot) in row.iter_mut().enumerate() {
                // SAFETY: row p of B at the tile's columns; masked lanes are not read.
                *slot = unsafe { load::<FULL>(b.offset(p * rsb).add(8 * v), masks[v]) };
            }
            if !tile.row_sums.is_null() {
                // SAFETY: vector p of the sums, inside their 8·K values; masked lanes are 0.
                unsafe {
                    let sums = tile.row_sums.offset(8 * p);
                    let both = _mm256_add_ps(row[0], row[1]);
                    _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_loadu_ps(sums), both));
                }
            }
            for (i, acc_row) in acc.iter_mut().enumerate() {
                // SAFETY: A[row + i, p], inside A.
                let broadcast = _mm256_set1_ps(unsafe { *a.offset(i as isize * rsa + p * csa) });
                for (slot, &vector) in acc_row.iter_mut().zip(&row) {
                    *slot = _mm256_fmadd_ps(broadcast, vector, *slot);
                }
            }
        }
        let (alpha, beta_vector) = (_mm256_set1_ps(alpha), _mm256_set1_ps(beta));
        for (i, acc_row) in acc.iter().enumerate() {
            for (v, &sum) in acc_row.iter().enumerate() {
                // SAFETY: C[row + i, column + 8v..], masked past C's last column.
                unsafe {
                    let target = c.offset(i as isize * rsc).add(8 * v);
                    let mut result = _mm256_mul_ps(sum, alpha);
                    if !bias.is_null() {
                        result = _mm256_add_ps(result, _mm256_set1_ps(*bias.add(tile.row + i)));
                    }
                    if beta != 0.0 {
                        let old = load::<FULL>(target, masks[v]);
                        result = _mm256_fmadd_ps(old, beta_vector, result);
                    }
                    if relu {
                        // MAXPS returns its second operand when either is NaN: a NaN stays.
                        result = _mm256_max_ps(_mm256_setzero_ps(), result);
                    }
                    if FULL {
                        _mm256_storeu_ps(target, result);
                    } else {
                        _mm256_maskstore_ps(target, masks[v], result);
                    }
                }
            }
        }
    }

    /// 8 floats from `source`, or (not `FULL`) the lanes of `mask` and zeros.
    #[target_feature(enable = "avx2")]
    unsafe fn load<const FULL: bool>(source: *const f32, mask: __m256i) -> __m256 {
        // SAFETY: the caller's: 8 floats readable at `source`, or those of the mask's lanes.
        unsafe {
            if FULL {
                _mm256_loadu_ps(source)
            } else {
                _mm256_maskload_ps(source, mask)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Operands;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    /// Whether this CPU runs AVX-512F (detected once).
    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }

    /// Rows of an NN tile and 16-lane vectors across it.
    const NN_ROWS: usize = 6;
    const NN_VECTORS: usize = 4;
    const NN_WIDTH: usize = 16 * NN_VECTORS;
    /// K block of the NN kernel: B's panel of 128×64 floats is 32 KiB, inside L1.
    const NN_DEPTH: usize = 128;

    /// Runs the product if a kernel takes these layouts; returns false to let the caller fall
    /// back.
    ///
    /// # Safety
    /// The operands must describe valid, non-empty matrices (M, N, K > 0) of the stated shapes,
    /// C must not overlap A or B, and AVX-512F must be available.
    pub unsafe fn gemm_f32(operands: &Operands) -> bool {
        let Operands {
            shape: [m, n, k],
            alpha,
            a,
            b,
            beta,
            c,
            ..
        } = *operands;
        let [rsa, csa] = operands.a_strides;
        let [rsb, csb] = operands.b_strides;
        let [rsc, csc] = operands.c_strides;
        if csc != 1 && n > 1 {
            return false;
        }
        if csb == 1 || n == 1 {
            // SAFETY: the caller's contract; every address the kernel touches is an element of
            // A, B or C, by the bounds of its loops (rows < m, columns < n with masked tails,
            // depth < k) and the strides.
            unsafe {
                nn(
                    m,
                    n,
                    k,
                    alpha,
                    a,
                    rsa,
                    csa,
                    b,
                    rsb,
                    beta,
                    operands.bias,
                    operands.relu,
                    c,
                    rsc,
                )
            };
            true
        } else if rsb == 1 && operands.bias.is_null() && !operands.relu {
            // SAFETY: as above.
            unsafe { transposed(m, n, k, alpha, a, rsa, csa, b, csb, beta, c, rsc) }
        } else {
            false
        }
    }

    thread_local! {
        /// Reused scratch of the transposed path: Aᵀ packed, then the product Cᵀ.
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// C ← α·A·B + β·C when B's *columns* are contiguous (B = Xᵀ in dW = dY·Xᵀ): computes
    /// Cᵀ = Bᵀ·Aᵀ with the NN kernel — Bᵀ's contiguous rows are the broadcast operand, Aᵀ is
    /// packed once into a row-major scratch — then adds α·Cᵀ transposed into C.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn transposed(
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
    ) -> bool {
        SCRATCH.with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                return false;
            };
            if n <= m {
                // B is the smaller operand: pack it row-major (k×n) and run NN straight into C.
                if scratch.len() < k * n {
                    scratch.resize(k * n, 0.0);
                }
                // SAFETY: B[p, j] = b + j·csb + p for j < n, p < k: inside B.
                unsafe { transpose(n, k, b, csb, 1, &mut scratch) };
                // SAFETY: A (m×k) as given, the packed B (k×n), C (m×n).
                unsafe {
                    nn(
                        m,
                        n,
                        k,
                        alpha,
                        a,
                        rsa,
                        csa,
                        scratch.as_ptr(),
                        n as isize,
                        beta,
                        std::ptr::null(),
                        false,
                        c,
                        rsc,
                    )
                };
                return true;
            }
            let needed = k * m + n * m;
            if scratch.len() < needed {
                scratch.resize(needed, 0.0);
            }
            let (packed, product) = scratch.split_at_mut(k * m);
            // SAFETY: A[i, p] for i < m, p < k: inside A.
            unsafe { transpose(m, k, a, rsa, csa, packed) };
            let (mi, packed, product_ptr) = (m as isize, packed.as_ptr(), product.as_mut_ptr());
            let beta_is_nonzero = beta != 0.0;
            // SAFETY: Bᵀ (n×k) at b with row stride csb, packed Aᵀ (k×m), product (n×m): all
            // inside their buffers.
            let none = std::ptr::null();
            unsafe {
                nn(
                    n,
                    m,
                    k,
                    1.0,
                    b,
                    csb,
                    1,
                    packed,
                    mi,
                    0.0,
                    none,
                    false,
                    product_ptr,
                    mi,
                )
            };
            // C[i, j] = α·Cᵀ[j, i] + β·C[i, j], in 16×16 blocks so both sides stay in L1; a
            // full block is transposed in registers.
            for i0 in (0..m).step_by(BLOCK) {
                for j0 in (0..n).step_by(BLOCK) {
                    if i0 + BLOCK <= m && j0 + BLOCK <= n {
                        // SAFETY: rows j0..j0+16 of the product (n×m) from column i0, and
                        // C[i0..i0+16, j0..j0+16]: inside both by the test above.
                        unsafe {
                            let block = transpose_block(product_ptr.add(j0 * m + i0), mi);
                            let (alpha, beta) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
                            for (q, &column) in block.iter().enumerate() {
                                let target = c.offset((i0 + q) as isize * rsc).add(j0);
                                let mut value = _mm512_mul_ps(column, alpha);
                                if beta_is_nonzero {
                                    value = _mm512_fmadd_ps(_mm512_loadu_ps(target), beta, value);
                                }
                                _mm512_storeu_ps(target, value);
                            }
                        }
                        continue;
                    }
                    for i in i0..(i0 + BLOCK).min(m) {
                        for j in j0..(j0 + BLOCK).min(n) {
                            let value = product[j * m + i];
                            // SAFETY: C[i, j], inside C by the loop bounds.
                            unsafe {
                                let target = c.offset(i as isize * rsc).add(j);
                                *target = if beta == 0.0 {
                                    alpha * value
                                } else {
                                    alpha * value + beta * *target
                                };
                            }
                        }
                    }
                }
            }
            true
        })
    }

    /// Side of the blocks of the transposing copies: a 16×16 block of either side is 16 cache
    /// lines, so both stay in L1 while the block is copied.
    const BLOCK: usize = 16;

    /// `destination[q·rows + r] = source[r·rs + q·cs]` for r < rows, q < columns: the
    /// (rows × columns) matrix at `source`, written transposed and row-major.
    ///
    /// # Safety
    /// Every `source + r·rs + q·cs` in range must be readable; `destination` must hold
    /// rows·columns values.
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose(
        rows: usize,
        columns: usize,
        source: *const f32,
        rs: isize,
        cs: isize,
        destination: &mut [f32],
    ) {
        for r0 in (0..rows).step_by(BLOCK) {
            for q0 in (0..columns).step_by(BLOCK) {
                if cs == 1 && r0 + BLOCK <= rows && q0 + BLOCK <= columns {
                    // A full block of contiguous rows: transposed in registers.
                    // SAFETY: rows r0..r0+16 of the source from column q0 (the caller's
                    // contract), and destination rows q0..q0+16 from r0: inside, as
                    // (q0 + 15)·rows + r0 + 16 ≤ columns·rows.
                    unsafe {
                        let block = transpose_block(source.offset(r0 as isize * rs).add(q0), rs);
                        for (q, &column) in block.iter().enumerate() {
                            let target = destination.as_mut_ptr().add((q0 + q) * rows + r0);
                            _mm512_storeu_ps(target, column);
                        }
                    }
                    continue;
                }
                for r in r0..(r0 + BLOCK).min(rows) {
                    for q in q0..(q0 + BLOCK).min(columns) {
                        // SAFETY: the caller's contract.
                        destination[q * rows + r] =
                            unsafe { *source.offset(r as isize * rs + q as isize * cs) };
                    }
                }
            }
        }
    }

    /// The 16×16 block whose row r is the 16 floats at `source + r·rs`, transposed: element q
    /// of the result is column q. Four rounds of shuffles, each interleaving pairs of
    /// registers at a coarser grain (32-bit, 64-bit, then twice 128-bit lanes).
    ///
    /// # Safety
    /// The 16 rows of 16 floats must be readable.
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose_block(source: *const f32, rs: isize) -> [__m512; 16] {
        // SAFETY: the caller's contract.
        let r: [__m512; 16] =
            std::array::from_fn(|i| unsafe { _mm512_loadu_ps(source.offset(i as isize * rs)) });
        // Within each 128-bit lane L (columns 4L..4L+3), t[2i] holds columns 4L, 4L+1 and
        // t[2i+1] columns 4L+2, 4L+3 of rows 2i and 2i+1, interleaved.
        let t: [__m512; 16] = std::array::from_fn(|j| {
            let (a, b) = (r[j & !1], r[j | 1]);
            if j % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        // u[4g + c], lane L: column 4L + c of rows 4g..4g+3.
        let u: [__m512; 16] = std::array::from_fn(|j| {
            let (g, c) = (j / 4, j % 4);
            let (a, b) = (
                _mm512_castps_pd(t[4 * g + c / 2]),
                _mm512_castps_pd(t[4 * g + c / 2 + 2]),
            );
            _mm512_castpd_ps(if c % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        // Column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
        let mut columns = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let low_01 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
            let high_01 = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
            let low_23 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
            let high_23 = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
            columns[c] = _mm512_shuffle_f32x4::<0x88>(low_01, low_23);
            columns[4 + c] = _mm512_shuffle_f32x4::<0xDD>(low_01, low_23);
            columns[8 + c] = _mm512_shuffle_f32x4::<0x88>(high_01, high_23);
            columns[12 + c] = _mm512_shuffle_f32x4::<0xDD>(high_01, high_23);
        }
        columns
    }

    /// Mask of the first `lanes` (1..=16) lanes.
    fn lane_mask(lanes: usize) -> __mmask16 {
        if lanes >= 16 {
            0xFFFF
        } else {
            ((1u32 << lanes) - 1) as __mmask16
        }
    }

    /// A block of cache lines a tile asks for ahead of its use: `rows` rows of `lines` lines
    /// (16 floats each), the rows `stride` floats apart from `start`. Nothing when `rows` is 0.
    #[derive(Clone, Copy)]
    struct Upcoming {
        start: *const f32,
        rows: usize,
        lines: usize,
        stride: isize,
    }

    /// Issues the prefetches of an [`Upcoming`] block evenly over a tile's `depth` steps: one
    /// every `every` steps (or `burst` per step when there are more lines than steps). Spread
    /// out, they arrive while the tile computes, where bursts would queue behind each other.
    struct Prefetcher {
        block: Upcoming,
        remaining: usize,
        every: usize,
        burst: usize,
        countdown: usize,
        row: usize,
        line: usize,
    }

    impl Prefetcher {
        fn new(block: Upcoming, depth: usize) -> Self {
            let total = block.rows * block.lines;
            // A tile has depth ≥ 1 steps; no lines (total = 0) means no prefetch.
            let (every, burst) = match depth.checked_div(total) {
                None => (usize::MAX, 0),
                Some(steps) => (steps.max(1), total.div_ceil(depth)),
            };
            Prefetcher {
                block,
                remaining: total,
                every,
                burst,
                countdown: every,
                row: 0,
                line: 0,
            }
        }

        /// One step of the tile: a prefetch when its turn has come.
        #[inline(always)]
        fn step(&mut self) {
            if self.remaining == 0 {
                return;
            }
            self.countdown -= 1;
            if self.countdown != 0 {
                return;
            }
            self.countdown = self.every;
            for _ in 0..self.burst.min(self.remaining) {
                let address = self
                    .block
                    .start
                    .wrapping_offset(self.row as isize * self.block.stride)
                    .wrapping_add(16 * self.line);
                // SAFETY: a prefetch is only a hint: it never faults and reads nothing the
                // program sees (the addresses are inside A or B anyway).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(address.cast::<i8>()) };
                self.line += 1;
                if self.line == self.block.lines {
                    self.line = 0;
                    self.row += 1;
                }
                self.remaining -= 1;
            }
        }
    }

    /// C tile (ROWS × VECTORS·16, the last vector masked) ← α·A·B + β·C over `depth` steps.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn nn_tile<const ROWS: usize, const VECTORS: usize>(
        depth: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        beta: f32,
        bias: *const f32,
        relu: bool,
        c: *mut f32,
        rsc: isize,
        last: __mmask16,
        prefetch: bool,
        upcoming: [Upcoming; 2],
    ) {
        let mut acc = [[_mm512_setzero_ps(); VECTORS]; ROWS];
        let mask = |v: usize| if v + 1 == VECTORS { last } else { 0xFFFF };
        let mut prefetchers = upcoming.map(|block| Prefetcher::new(block, depth));
        for p in 0..depth as isize {
            for prefetcher in prefetchers.iter_mut() {
                prefetcher.step();
            }
            // The first tile of a panel also asks for its own rows of B 8 steps ahead: the
            // first panel of a product had no earlier tiles to fetch it. A prefetch never
            // faults.
            if prefetch {
                for v in 0..VECTORS {
                    let ahead = b.wrapping_offset((p + 8) * rsb).wrapping_add(16 * v);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.cast::<i8>());
                }
            }
            let mut row = [_mm512_setzero_ps(); VECTORS];
            for (v, slot) in row.iter_mut().enumerate() {
                // SAFETY: b + p·rsb is row p of B's panel; masked lanes are not read.
                *slot = unsafe { _mm512_maskz_loadu_ps(mask(v), b.offset(p * rsb).add(16 * v)) };
            }
            for (i, acc_row) in acc.iter_mut().enumerate() {
                // SAFETY: A[i, p] of the tile's rows.
                let scalar = unsafe { *a.offset(i as isize * rsa + p * csa) };
                let broadcast = _mm512_set1_ps(scalar);
                for (slot, &vector) in acc_row.iter_mut().zip(&row) {
                    *slot = _mm512_fmadd_ps(broadcast, vector, *slot);
                }
            }
        }
        let (alpha, beta_vector) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
        for (i, acc_row) in acc.iter().enumerate() {
            for (v, &sum) in acc_row.iter().enumerate() {
                // SAFETY: C[i, 16v..], masked past the tile's last column.
                unsafe {
                    let target = c.offset(i as isize * rsc).add(16 * v);
                    let mut result = _mm512_mul_ps(sum, alpha);
                    if !bias.is_null() {
                        result = _mm512_add_ps(result, _mm512_set1_ps(*bias.add(i)));
                    }
                    if beta != 0.0 {
                        result = _mm512_fmadd_ps(
                            _mm512_maskz_loadu_ps(mask(v), target),
                            beta_vector,
                            result,
                        );
                    }
                    if relu {
                        // MAXPS returns its second operand when either is NaN: with the
                        // result second, a NaN stays NaN (max(NaN, 0) = NaN, as in PyTorch).
                        result = _mm512_max_ps(_mm512_setzero_ps(), result);
                    }
                    _mm512_mask_storeu_ps(target, mask(v), result);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn nn(
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        beta: f32,
        bias: *const f32,
        relu: bool,
        c: *mut f32,
        rsc: isize,
    ) {
        macro_rules! tile {
            ($rows:expr, $vectors:expr, $($args:expr),*) => {
                match ($rows, $vectors) {
                    (6, 4) => nn_tile::<6, 4>($($args),*), (6, 3) => nn_tile::<6, 3>($($args),*),
                    (6, 2) => nn_tile::<6, 2>($($args),*), (6, 1) => nn_tile::<6, 1>($($args),*),
                    (5, 4) => nn_tile::<5, 4>($($args),*), (5, 3) => nn_tile::<5, 3>($($args),*),
                    (5, 2) => nn_tile::<5, 2>($($args),*), (5, 1) => nn_tile::<5, 1>($($args),*),
                    (4, 4) => nn_tile::<4, 4>($($args),*), (4, 3) => nn_tile::<4, 3>($($args),*),
                    (4, 2) => nn_tile::<4, 2>($($args),*), (4, 1) => nn_tile::<4, 1>($($args),*),
                    (3, 4) => nn_tile::<3, 4>($($args),*), (3, 3) => nn_tile::<3, 3>($($args),*),
                    (3, 2) => nn_tile::<3, 2>($($args),*), (3, 1) => nn_tile::<3, 1>($($args),*),
                    (2, 4) => nn_tile::<2, 4>($($args),*), (2, 3) => nn_tile::<2, 3>($($args),*),
                    (2, 2) => nn_tile::<2, 2>($($args),*), (2, 1) => nn_tile::<2, 1>($($args),*),
                    (1, 4) => nn_tile::<1, 4>($($args),*), (1, 3) => nn_tile::<1, 3>($($args),*),
                    (1, 2) => nn_tile::<1, 2>($($args),*), _ => nn_tile::<1, 1>($($args),*),
                }
            };
        }
        // SAFETY: B's k rows of n floats.

        for column in (0..n).step_by(NN_WIDTH) {
            let width = NN_WIDTH.min(n - column);
            let vectors = width.div_ceil(16);
            let last = lane_mask(width - 16 * (vectors - 1));
            for start in (0..k).step_by(NN_DEPTH) {
                let depth = NN_DEPTH.min(k - start);
                // Later K blocks add to what the first one wrote (bias included).
                let (beta, bias) = if start == 0 {
                    (beta, bias)
                } else {
                    (1.0, std::ptr::null())
                };
                // The ReLU applies to the finished sum, in the last K block.
                let relu = relu && start + depth == k;
                // The next panel of B in loop order: the next K block, else the next columns.
                let (next_column, next_start) = if start + NN_DEPTH < k {
                    (column, start + NN_DEPTH)
                } else {
                    (column + NN_WIDTH, 0)
                };
                let next_depth = if next_column < n {
                    NN_DEPTH.min(k - next_start)
                } else {
                    0
                };
                let next_lines = if next_column < n {
                    NN_WIDTH.min(n - next_column).div_ceil(16)
                } else {
                    0
                };
                let tiles = m.div_ceil(NN_ROWS);
                for row in (0..m).step_by(NN_ROWS) {
                    let rows = NN_ROWS.min(m - row);
                    let tile = row / NN_ROWS;
                    // While the panel's first tile waits on B, the others compute from L1:
                    // each asks for its share of the next panel's rows.
                    let next_panel = if tile > 0 && next_depth > 0 {
                        let first = (tile - 1) * next_depth / (tiles - 1);
                        let last = tile * next_depth / (tiles - 1);
                        Upcoming {
                            start: b
                                .wrapping_offset((next_start + first) as isize * rsb)
                                .wrapping_add(next_column),
                            rows: last - first,
                            lines: next_lines,
                            stride: rsb,
                        }
                    } else {
                        Upcoming {
                            start: b,
                            rows: 0,
                            lines: 1,
                            stride: 0,
                        }
                    };
                    // And the rows of A the next tile will broadcast, when A is large (Xₙ in
                    // dW's path) and so comes from memory too; a small A (W) stays cached.
                    let (next_row, next_a_start) = if row + NN_ROWS < m {
                        (row + NN_ROWS, start)
                    } else {
                        (0, start + NN_DEPTH)
                    };
                    let next_a = if csa == 1 && m * k * 4 >= 256 << 10 && next_a_start < k {
                        let next_a_depth = NN_DEPTH.min(k - next_a_start);
                        Upcoming {
                            start: a
                                .wrapping_offset(next_row as isize * rsa)
                                .wrapping_add(next_a_start),
                            rows: NN_ROWS.min(m - next_row),
                            lines: next_a_depth.div_ceil(16),
                            stride: rsa,
                        }
                    } else {
                        Upcoming {
                            start: a,
                            rows: 0,
                            lines: 1,
                            stride: 0,
                        }
                    };
                    // SAFETY: the tile's corner is inside A, B and C (row < m, column < n,
                    // start < k); the tile kernel stays inside by rows, depth and the mask.
                    unsafe {
                        let a = a.offset(row as isize * rsa + start as isize * csa);
                        let b = b.offset(start as isize * rsb).add(column);
                        let c = c.offset(row as isize * rsc).add(column);
                        let bias = if bias.is_null() { bias } else { bias.add(row) };
                        tile!(
                            rows,
                            vectors,
                            depth,
                            alpha,
                            a,
                            rsa,
                            csa,
                            b,
                            rsb,
                            beta,
                            bias,
                            relu,
                            c,
                            rsc,
                            last,
                            row == 0,
                            [next_panel, next_a]
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{gemm_and_row_sums_of_b, gemm_samples};
    use ndarray::{s, Array1, Array2, Array3, Axis};

    /// The row sums of B taken with the product (by the AVX2 kernel's first row of tiles where
    /// it runs: few rows, shallow, a copied Wᵀ; with masked last columns) against a plain sum,
    /// and C against the product alone; in f64 too (summed after).
    #[test]
    fn the_row_sums_of_b_come_with_the_product() {
        // (M, K, N, A transposed): dX of 16 → 96 (few rows), of a shallow layer, of 64 → 256
        // (Wᵀ copied row-major), and N not a multiple of 16.
        for (m, k, n, transposed) in [
            (16, 96, 300, true),
            (40, 24, 77, true),
            (64, 256, 100, true),
            (7, 130, 33, false),
        ] {
            let value = |i: usize, j: usize| ((i * 31 + j * 17) % 23) as f32 / 23.0 - 0.5;
            let a = match transposed {
                true => Array2::from_shape_fn((k, m), |(i, j)| value(i, j)).reversed_axes(),
                false => Array2::from_shape_fn((m, k), |(i, j)| value(i, j)),
            };
            let b = Array2::from_shape_fn((k, n), |(i, j)| value(i + 5, j));
            for beta in [0.0, 1.0] {
                let c0 = Array2::from_shape_fn((m, n), |(i, j)| value(j, i));
                let mut c = c0.clone();
                let mut sums = Array1::from_elem(k, f32::NAN);
                gemm_and_row_sums_of_b(a.view(), b.view(), beta, c.view_mut(), sums.view_mut())
                    .unwrap();
                let mut expected = c0.clone();
                super::gemm(1.0, a.view(), b.view(), beta, expected.view_mut()).unwrap();
                assert_eq!(c, expected, "C, {m}×{k}·{k}×{n} β {beta}");
                for (row, &sum) in b.outer_iter().zip(&sums) {
                    if super::backend::<f32>() == "avx2+gemm" {
                        // The same bits as the order the fallback takes.
                        assert_eq!(sum.to_bits(), super::sum_in_lanes(row).to_bits());
                    }
                    let plain: f64 = row.iter().map(|&v| f64::from(v)).sum();
                    let bound = 1e-6 * row.iter().map(|v| f64::from(v.abs())).sum::<f64>();
                    assert!((f64::from(sum) - plain).abs() <= bound, "{sum} vs {plain}");
                }
            }
        }
        let (a, b) = (Array2::<f64>::eye(3), Array2::from_elem((3, 5), 0.5));
        let (mut c, mut sums) = (Array2::zeros((3, 5)), Array1::zeros(3));
        gemm_and_row_sums_of_b(a.view(), b.view(), 0.0, c.view_mut(), sums.view_mut()).unwrap();
        assert_eq!((&c, &sums), (&b, &Array1::from_elem(3, 2.5)));
        let mut short = Array1::zeros(2);
        let refused =
            gemm_and_row_sums_of_b(a.view(), b.view(), 0.0, c.view_mut(), short.view_mut());
        assert!(refused.is_err());
    }

    /// The products over a batch against f64 loops: a 16-column panel that takes its columns
    /// from two samples (P = 17, 196) or from many (P = 3, 5: packed one value at a time), a
    /// last panel past the batch's end, rows not a multiple of 6, depths in one block and in
    /// two (700), A = Wᵀ (strided), samples that are channel slices of larger tensors, β = 0 over
    /// NaN and β = 1, with and without bias and ReLU.
    #[test]
    fn products_over_the_samples_match_loops() {
        let value = |i: usize, j: usize| ((i * 31 + j * 17) % 23) as f32 / 23.0 - 0.5;
        for (m, k, pixels, samples) in [
            (13, 700, 196, 3),
            (6, 64, 17, 5),
            (1, 7, 3, 7),
            (20, 96, 5, 1),
            (7, 130, 64, 2),
            // A of 300 × 260, more than the 256 KiB the packed A may take: one product per
            // sample.
            (300, 260, 20, 2),
        ] {
            for (transposed, beta, bias, relu) in [
                (false, 0.0, true, true),
                (true, 1.0, false, false),
                (false, 1.0, true, false),
                (true, 0.0, false, true),
            ] {
                let a = match transposed {
                    true => Array2::from_shape_fn((k, m), |(i, j)| value(i, j)).reversed_axes(),
                    false => Array2::from_shape_fn((m, k), |(i, j)| value(i, j)),
                };
                // B and C are the middle channels of larger tensors: their samples lie apart.
                let wide_b = Array3::from_shape_fn((samples, k + 3, pixels), |(n, i, j)| {
                    value(n * 7 + i, j + 2)
                });
                let b = wide_b.slice(s![.., 1..k + 1, ..]);
                let c0 = Array3::from_shape_fn((samples, m + 2, pixels), |(n, i, j)| {
                    value(i + 3, n + j)
                });
                let mut c = c0.clone();
                if beta == 0.0 {
                    c.slice_mut(s![.., 1..m + 1, ..]).fill(f32::NAN);
                }
                let bias_values = Array1::from_shape_fn(m, |i| value(i, 9));
                let bias_view = bias.then(|| bias_values.view());
                let c_view = c.slice_mut(s![.., 1..m + 1, ..]);
                gemm_samples(a.view(), b, beta, (bias_view, relu), c_view, None).unwrap();
                for ((n, i, j), &got) in c.indexed_iter() {
                    let old = f64::from(c0[[n, i, j]]);
                    if i == 0 || i == m + 1 {
                        assert_eq!(f64::from(got), old, "a row outside C was written");
                        continue;
                    }
                    let row = i - 1;
                    let terms = (0..k).map(|p| f64::from(a[[row, p]]) * f64::from(b[[n, p, j]]));
                    let (mut want, mut size) = (0.0, 0.0);
                    for term in terms.chain([
                        if bias {
                            f64::from(bias_values[row])
                        } else {
                            0.0
                        },
                        if beta == 0.0 { 0.0 } else { old },
                    ]) {
                        (want, size) = (want + term, size + term.abs());
                    }
                    if relu {
                        want = want.max(0.0);
                    }
                    // The worst-case error of a sum of k + 2 terms in f32: (k + 2)·u·Σ|terms|,
                    // u = 2⁻²⁴ the unit roundoff.
                    let case = format!("{m}×{k}·{samples}×({k}×{pixels}) Aᵀ {transposed} β {beta}");
                    let error = (f64::from(got) - want).abs();
                    let bound = (k + 2) as f64 * f64::from(f32::EPSILON) / 2.0 * size;
                    assert!(error <= bound, "{case}: {got} vs {want}");
                }
            }
        }
    }

    /// The row sums of B that the products over the samples take (dX's sample terms of db)
    /// have the bits the per-sample products' row sums have — in the packed product (maps of
    /// 16k pixels) and where it falls back (other maps, an A too large to pack) — and taking
    /// them leaves C's bits as they were.
    #[test]
    fn row_sums_over_the_samples_match_the_per_sample_ones() {
        let value = |i: usize, j: usize| ((i * 31 + j * 17) % 23) as f32 / 23.0 - 0.5;
        for (m, k, pixels, samples) in [
            (13, 700, 64, 3),
            (6, 64, 32, 5),
            (20, 96, 16, 1),
            (64, 256, 784, 2),
            (7, 130, 196, 2),
            (300, 260, 32, 2),
        ] {
            let a_t = Array2::from_shape_fn((k, m), |(i, j)| value(i, j));
            let a = a_t.t();
            let wide_b = Array3::from_shape_fn((samples, k + 3, pixels), |(n, i, j)| {
                value(n * 7 + i, j + 2)
            });
            let b = wide_b.slice(s![.., 1..k + 1, ..]);
            let c0 = Array3::from_shape_fn((samples, m, pixels), |(n, i, j)| value(i + 3, n + j));
            let (mut plain, mut summed) = (c0.clone(), c0.clone());
            let mut sums = Array2::from_elem((samples, k), f32::NAN);
            gemm_samples(a, b, 1.0, (None, false), plain.view_mut(), None).unwrap();
            let summing = Some(sums.view_mut());
            gemm_samples(a, b, 1.0, (None, false), summed.view_mut(), summing).unwrap();
            let case = format!("{m}×{k}·{samples}×({k}×{pixels})");
            assert!(
                plain
                    .iter()
                    .zip(&summed)
                    .all(|(p, s)| p.to_bits() == s.to_bits()),
                "{case}: C changed"
            );
            for (n, b_n) in b.outer_iter().enumerate() {
                let (mut c_n, mut want) = (c0.index_axis(Axis(0), n).to_owned(), Array1::zeros(k));
                gemm_and_row_sums_of_b(a, b_n, 1.0, c_n.view_mut(), want.view_mut()).unwrap();
                for (row, (&got, &want)) in sums.row(n).iter().zip(&want).enumerate() {
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{case}: sample {n} row {row}"
                    );
                }
                // And they are B's row sums, to f32's rounding of `pixels` terms.
                for (row, &got) in sums.row(n).iter().enumerate() {
                    let terms = b_n
                        .row(row)
                        .iter()
                        .map(|&v| f64::from(v))
                        .collect::<Vec<_>>();
                    let exact: f64 = terms.iter().sum();
                    let size: f64 = terms.iter().map(|v| v.abs()).sum();
                    let bound = pixels as f64 * f64::from(f32::EPSILON) / 2.0 * size;
                    assert!((f64::from(got) - exact).abs() <= bound, "{case}: row {row}");
                }
            }
        }
    }
}
