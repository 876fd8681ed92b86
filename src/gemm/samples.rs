//! A layer's product over all its samples at once: Cₙ ← A·Bₙ + β·Cₙ for n = 1..N, with A
//! shared (W in a 1×1 layer's forward pass, Wᵀ in its dX), on CPUs with AVX2 and FMA.
//!
//! ## Why
//! In NCHW a sample's (F, H, W) block is an (F, P) matrix, so each sample is its own product,
//! and a product of P = 196 columns (a 14×14 map) and depth 576 spends much of its time on
//! what surrounds the arithmetic: a packing GEMM copies all of A into panels on every call (16
//! times for a batch of 16, though A is the same), and 196 = 12·16 + 4 leaves a last panel of
//! 4 columns on a 16-column tile (three quarters of its multiply-adds idle). Channels-last
//! layouts make the batch one (F × N·P) matrix and avoid both.
//!
//! Here the samples' columns are taken side by side as one wide B = [B₁ … B_N] (K × N·P)
//! *without* copying them into such a matrix: packing, which every fast GEMM does anyway,
//! copies B's columns into 16-column panels, and a panel may take its first columns from the
//! end of sample n and its last from the start of sample n + 1. A is packed once per call for
//! every sample. The tile that straddles two samples stores each part of its columns into its
//! own sample (masked stores), so C is written in place.
//!
//! ## How
//! ```text
//! pack A (M × K) once: for each depth block, 6-row panels, a panel's 6 values for depth p
//!                      side by side (zeros past row M); at most 256 KiB, so it stays in L2
//! for each 16-column panel of [B₁ … B_N]:
//!   for each depth block (≤ 640 deep, the depth split evenly):
//!     pack B's panel: its 16 values for depth p side by side (zeros past the last sample);
//!                     40 KiB at most, in L1 and L2 for every row tile
//!     for each 6-row panel of A
//!       the 6 × 16 tile: 12 ymm accumulators, per step 2 loads of B, 6 broadcasts of A,
//!       12 FMAs; then C += the tile (the first depth block: C = tile + bias + β·C, the last:
//!       max(·, 0) with a ReLU)
//! ```
//! While the first row tile of a panel runs it prefetches the next panel's rows of B, and each
//! tile prefetches its lines of C before its sums: both come from memory or L3 (the samples'
//! rows are hundreds of bytes apart, more streams than the hardware prefetcher follows).
//!
//! Every element of C sums its depth blocks in the same order whatever the batch or the
//! thread split, so the results do not depend on how the samples are shared out.

use std::arch::x86_64::*;
use std::cell::RefCell;

/// Cₙ (M×P) ← A (M×K)·Bₙ (K×P) + bias·1ᵀ + β·Cₙ, then max(·, 0) with `relu`, for the
/// `samples` samples; element (i, j) of sample n at `b + n·b_strides[0] + i·b_strides[1] + j`
/// (C likewise; its columns and B's are contiguous), A's at `a + i·a_strides[0] + j·a_strides[1]`.
pub struct Samples {
    /// M, K, P.
    pub shape: [usize; 3],
    pub samples: usize,
    pub a: *const f32,
    pub a_strides: [isize; 2],
    pub b: *const f32,
    /// (sample, row) strides of B.
    pub b_strides: [isize; 2],
    pub beta: f32,
    /// A bias added to every row i of C (`bias[i]`, contiguous), or null.
    pub bias: *const f32,
    pub relu: bool,
    pub c: *mut f32,
    /// (sample, row) strides of C.
    pub c_strides: [isize; 2],
    /// Where to write each sample's row sums of B, Σₚ Bₙ[k, p] at `b_row_sums + n·K + k`
    /// (a layer's db beside its dX), or null. Taken only where P is a multiple of 16.
    pub b_row_sums: *mut f32,
}

const ROWS: usize = 6;
const WIDTH: usize = 16;
/// The depth of a block: one C update per tile and block, so few blocks; a B panel of 640
/// steps (40 KiB) is read from L1 and L2 alike. Against blocks of at most 256, the forward of
/// 576 → 96 (one block of 576, not three of 192) and 384 → 64 at 14×14 took 2–4 % less time
/// (batch 16, 1 thread, alternating in one process, min of 20: 4.24 → 4.11 ms, 1.96 → 1.88).
const MAX_DEPTH_BLOCK: usize = 640;
/// The most A may take packed: it is read from L2 by every panel of B.
const MAX_PACKED_A_BYTES: usize = 256 << 10;

thread_local! {
    /// The packed A and the packed block of B, kept per thread (grown, never zeroed: packing
    /// writes every value a tile reads).
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs the products; false (nothing done) if the thread's packing buffer is in use.
///
/// # Safety
/// The operands must describe valid matrices of the stated shapes (M, K, P, samples > 0), C
/// must overlap neither A nor B (nor another sample's C), and AVX2 and FMA must be available.
pub unsafe fn gemm_f32(s: &Samples) -> bool {
    let [m, k, _] = s.shape;
    let padded_rows = m.next_multiple_of(ROWS);
    let a_len = padded_rows * k;
    let b_len = WIDTH * k;
    let sums_len = if s.b_row_sums.is_null() { 0 } else { 8 * k };
    if a_len * 4 > MAX_PACKED_A_BYTES || (sums_len > 0 && !s.shape[2].is_multiple_of(WIDTH)) {
        return false;
    }
    PACKED.with(|buffer| {
        let Ok(mut buffer) = buffer.try_borrow_mut() else {
            return false;
        };
        if buffer.len() < a_len + b_len + sums_len {
            buffer.resize(a_len + b_len + sums_len, 0.0);
        }
        let (packed_a, rest) = buffer.split_at_mut(a_len);
        let (packed_b, lanes) = rest.split_at_mut(b_len);
        let lanes = match sums_len {
            0 => std::ptr::null_mut(),
            _ => lanes.as_mut_ptr(),
        };
        // SAFETY: the caller's contract; the buffers hold the packed A, a block of B and,
        // with row sums, 8 lanes for each row of B.
        unsafe { run(s, packed_a.as_mut_ptr(), packed_b.as_mut_ptr(), lanes) };
        true
    })
}

/// The loops of the module's outline; with `lanes` (8·K values, or null), each sample's row
/// sums of B as well (see [`pack_b`]).
#[target_feature(enable = "avx2,fma")]
unsafe fn run(s: &Samples, packed_a: *mut f32, packed_b: *mut f32, lanes: *mut f32) {
    let [m, k, pixels] = s.shape;
    let columns = s.samples * pixels;
    let depth_blocks = k.div_ceil(MAX_DEPTH_BLOCK);
    let depth_block = k.div_ceil(depth_blocks);
    let padded_rows = m.next_multiple_of(ROWS);
    // SAFETY (this function): the caller's contract; packed_a holds padded_rows·K values and
    // packed_b COLUMN_BLOCK·depth_block.
    for first_depth in (0..k).step_by(depth_block) {
        let depth = depth_block.min(k - first_depth);
        unsafe {
            pack_a(
                s,
                first_depth,
                depth,
                packed_a.add(padded_rows * first_depth),
            )
        };
    }
    if !lanes.is_null() {
        // The lanes start at zero for the first sample (`finish_row_sums` zeroes them after).
        unsafe { std::ptr::write_bytes(lanes, 0, 8 * k) };
    }
    for column in (0..columns).step_by(WIDTH) {
        if !lanes.is_null() && column > 0 && column % pixels == 0 {
            // The previous sample's panels are all packed: its sums are complete.
            unsafe { finish_row_sums(s, column / pixels - 1, lanes) };
        }
        let panel_lanes = WIDTH.min(columns - column);
        for first_depth in (0..k).step_by(depth_block) {
            let depth = depth_block.min(k - first_depth);
            let block_a = unsafe { packed_a.add(padded_rows * first_depth) };
            let store = Store {
                first: first_depth == 0,
                last: first_depth + depth == k,
            };
            unsafe { pack_b(s, column, first_depth, depth, packed_b, lanes) };
            // The next panel's rows of B (this depth block; its first and last columns) are
            // asked for while the first row tile runs, one step of depth at a time.
            let next = column + WIDTH;
            let prefetch = match next < columns {
                true => [
                    source(s, next, first_depth),
                    source(s, (next + WIDTH - 1).min(columns - 1), first_depth),
                ],
                false => [std::ptr::null(); 2],
            };
            for row in (0..m).step_by(ROWS) {
                let panel_a = unsafe { block_a.add(row * depth) };
                let tile = Tile {
                    row,
                    column,
                    lanes: panel_lanes,
                    depth,
                    prefetch: if row == 0 {
                        prefetch
                    } else {
                        [std::ptr::null(); 2]
                    },
                };
                unsafe {
                    match ROWS.min(m - row) {
                        6 => tile_of::<6>(s, tile, panel_a, packed_b, store),
                        5 => tile_of::<5>(s, tile, panel_a, packed_b, store),
                        4 => tile_of::<4>(s, tile, panel_a, packed_b, store),
                        3 => tile_of::<3>(s, tile, panel_a, packed_b, store),
                        2 => tile_of::<2>(s, tile, panel_a, packed_b, store),
                        _ => tile_of::<1>(s, tile, panel_a, packed_b, store),
                    }
                }
            }
        }
    }
    if !lanes.is_null() {
        unsafe { finish_row_sums(s, s.samples - 1, lanes) };
    }
}

/// Sample n's row sums of B from their 8 lanes, added in order (the order of the crate's other
/// row sums, `sum_in_lanes`), written to `b_row_sums + n·K`; the lanes are zeroed for the next
/// sample.
///
/// # Safety
/// `lanes` holds 8·K values; `s.b_row_sums` holds samples·K.
unsafe fn finish_row_sums(s: &Samples, n: usize, lanes: *mut f32) {
    let k = s.shape[1];
    for row in 0..k {
        // SAFETY: row < K, inside the lanes and sample n's sums.
        unsafe {
            let row_lanes = std::slice::from_raw_parts_mut(lanes.add(8 * row), 8);
            *s.b_row_sums.add(n * k + row) = super::sum_of_lanes(row_lanes);
            row_lanes.fill(0.0);
        }
    }
}

/// A's depths first..first + depth, as 6-row panels at `target`: panel r holds, for each
/// depth p in turn, A[6r..6r + 6, first + p] (zeros past row M).
///
/// # Safety
/// Those elements of A exist; `target` holds M rounded up to 6, times `depth`, values.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_a(s: &Samples, first: usize, depth: usize, target: *mut f32) {
    let m = s.shape[0];
    let [rsa, csa] = s.a_strides;
    for row in (0..m).step_by(ROWS) {
        let panel = unsafe { target.add(row * depth) };
        for i in 0..ROWS {
            for p in 0..depth {
                let value = if row + i < m {
                    // SAFETY: A[row + i, first + p], inside A.
                    unsafe {
                        *s.a.offset((row + i) as isize * rsa + (first + p) as isize * csa)
                    }
                } else {
                    0.0
                };
                // SAFETY: inside the panel's 6·depth values.
                unsafe { *panel.add(p * ROWS + i) = value };
            }
        }
    }
}

/// The 16 columns of the wide B from `column` at depths first..first + depth, as one panel at
/// `target`: for each depth p in turn, the 16 values side by side (zeros past the last
/// sample). A panel's columns may come from two samples (or more, on maps under 16 pixels).
/// With `lanes` (not null; P a multiple of 16, so that a panel is 16 columns of one sample),
/// the two vectors of each row are added to that row's 8 lanes as they pass, `lanes[row] +=
/// v₀ + v₁`: B's row sums, taken while B streams from memory to be packed anyway, where a
/// pass of their own would read all of B again (25.7 MB for dY of W2's 64 → 256 layer).
///
/// # Safety
/// The elements named exist in B; `target` holds 16·depth values; `lanes`, when not null,
/// holds 8·K values.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_b(
    s: &Samples,
    column: usize,
    first: usize,
    depth: usize,
    target: *mut f32,
    lanes: *mut f32,
) {
    let pixels = s.shape[2];
    let columns = s.samples * pixels;
    let rsb = s.b_strides[1];
    let source = |j: usize| source(s, j, first);
    let q = column % pixels;
    if q + WIDTH <= pixels {
        // One sample: two vectors per depth (with lanes, their sum added to the row's).
        let from = source(column);
        for p in 0..depth as isize {
            // SAFETY: 16 values of row first + p of one sample, the panel's row p, and that
            // row's 8 lanes.
            unsafe {
                let row = from.offset(p * rsb);
                let to = target.offset(p * WIDTH as isize);
                let (low, high) = (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)));
                _mm256_storeu_ps(to, low);
                _mm256_storeu_ps(to.add(8), high);
                if !lanes.is_null() {
                    let sums = lanes.add(8 * (first + p as usize));
                    let pair = _mm256_add_ps(low, high);
                    _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_loadu_ps(sums), pair));
                }
            }
        }
        return;
    }
    debug_assert!(lanes.is_null(), "row sums need whole panels of one sample");
    if pixels >= WIDTH {
        // At most two samples: each part loaded under its mask, at an address shifted so that
        // its lanes land in their place (masked lanes are neither read nor faulted), then
        // or-ed together (a masked-off lane is +0.0, all bits clear).
        let split = pixels - q;
        let end = WIDTH.min(columns - column);
        let first_part = (source(column), lane_range(0, split.min(end)));
        let second_part = (
            source(column + split).wrapping_sub(split),
            lane_range(split.min(end), end),
        );
        for p in 0..depth as isize {
            // SAFETY: the masks' lanes are B's elements named; the panel's row p.
            unsafe {
                let to = target.offset(p * WIDTH as isize);
                for v in 0..2 {
                    let (from, masks) = first_part;
                    let from = from.wrapping_offset(p * rsb).wrapping_add(8 * v);
                    let first = _mm256_maskload_ps(from, masks[v]);
                    let (from, masks) = second_part;
                    let from = from.wrapping_offset(p * rsb).wrapping_add(8 * v);
                    let second = _mm256_maskload_ps(from, masks[v]);
                    _mm256_storeu_ps(to.add(8 * v), _mm256_or_ps(first, second));
                }
            }
        }
        return;
    }
    for l in 0..WIDTH {
        let j = column + l;
        for p in 0..depth as isize {
            let value = if j < columns {
                // SAFETY: B's element (row first + p, wide column j).
                unsafe { *source(j).offset(p * rsb) }
            } else {
                0.0
            };
            // SAFETY: inside the panel.
            unsafe { *target.offset(p * WIDTH as isize).add(l) = value };
        }
    }
}

/// Where column j of the wide B starts at row `first` (its sample's row, at its pixel).
fn source(s: &Samples, j: usize, first: usize) -> *const f32 {
    let pixels = s.shape[2];
    let (n, q) = (j / pixels, j % pixels);
    s.b.wrapping_offset(n as isize * s.b_strides[0] + first as isize * s.b_strides[1])
        .wrapping_add(q)
}

/// The masks of lanes lo..hi of a 16-lane tile, as its two 8-lane vectors.
fn lane_range(lo: usize, hi: usize) -> [__m256i; 2] {
    let on = |lane: usize| if lo <= lane && lane < hi { -1 } else { 0 };
    let vector = |v: usize| {
        let lanes: [i32; 8] = std::array::from_fn(|t| on(8 * v + t));
        // SAFETY: AVX is implied by the AVX2 the caller checked; 8 i32 are 32 bytes.
        unsafe { _mm256_loadu_si256(lanes.as_ptr().cast::<__m256i>()) }
    };
    [vector(0), vector(1)]
}

/// Where a tile of C starts (row, column of the wide C), how many of its 16 columns exist,
/// and the depth of its block.
#[derive(Clone, Copy)]
struct Tile {
    row: usize,
    column: usize,
    lanes: usize,
    depth: usize,
    /// Two columns of B whose line in each row p of the block to prefetch on step p (null:
    /// none).
    prefetch: [*const f32; 2],
}

/// Whether a depth block is the first (C = tile + bias + β·C) and the last (then the ReLU).
#[derive(Clone, Copy)]
struct Store {
    first: bool,
    last: bool,
}

/// The R × 16 tile: R rows of A's panel times B's panel, added into C as [`Store`] says, each
/// run of its columns that lies in one sample stored into that sample.
///
/// # Safety
/// The panels hold `depth` steps; the tile's rows (< M) and columns (< N·P) exist in C.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_of<const R: usize>(
    s: &Samples,
    tile: Tile,
    panel_a: *const f32,
    panel_b: *const f32,
    store: Store,
) {
    let pixels = s.shape[2];
    let rsc = s.c_strides[1];
    // The tile's lines of C (in its first and last columns' samples) are asked for now, to
    // arrive while the sums run: read from memory when C is added to (dX accumulated into), and
    // written lines are fetched too. Measured on MobileNetV2's 14×14 layers (batch 16, 1
    // thread): dX accumulated on 576 → 96 4.44 → 4.06 ms, the forward of 96 → 576 4.48 → 4.01.
    for j in [tile.column, tile.column + tile.lanes - 1] {
        let (n, q) = (j / pixels, j % pixels);
        let start =
            s.c.wrapping_offset(n as isize * s.c_strides[0])
                .wrapping_add(q);
        for i in 0..R {
            let line = start.wrapping_offset((tile.row + i) as isize * rsc);
            // A prefetch reads nothing and never faults, wherever it points.
            _mm_prefetch::<_MM_HINT_T0>(line.cast::<i8>());
        }
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    // SAFETY: the caller's.
    unsafe {
        match tile.prefetch[0].is_null() {
            true => sums::<R, false>(tile, panel_a, panel_b, s.b_strides[1], &mut acc),
            false => sums::<R, true>(tile, panel_a, panel_b, s.b_strides[1], &mut acc),
        }
    }
    let beta = _mm256_set1_ps(if store.first { s.beta } else { 1.0 });
    let read_c = !store.first || s.beta != 0.0;
    let mut lane = 0;
    while lane < tile.lanes {
        let j = tile.column + lane;
        let (n, q) = (j / pixels, j % pixels);
        let run = (tile.lanes - lane).min(pixels - q);
        // Lane l of the tile goes to column q + l − lane of sample n: the base is shifted
        // back by `lane`, and the masks keep the run's lanes only.
        let base =
            s.c.wrapping_offset(n as isize * s.c_strides[0] + (tile.row as isize) * rsc)
                .wrapping_add(q)
                .wrapping_sub(lane);
        let full = lane == 0 && run == WIDTH;
        let masks = match full {
            true => [_mm256_set1_epi32(-1); 2],
            false => lane_range(lane, lane + run),
        };
        for (i, acc_row) in acc.iter().enumerate() {
            for (v, &sum) in acc_row.iter().enumerate() {
                let target = base.wrapping_offset(i as isize * rsc).wrapping_add(8 * v);
                // SAFETY: the masks' lanes are elements of C (row tile.row + i, the run's
                // columns of sample n); masked lanes are neither read nor written.
                unsafe {
                    let mut result = sum;
                    if store.first && !s.bias.is_null() {
                        let bias = _mm256_set1_ps(*s.bias.add(tile.row + i));
                        result = _mm256_add_ps(result, bias);
                    }
                    if read_c {
                        let old = match full {
                            true => _mm256_loadu_ps(target),
                            false => _mm256_maskload_ps(target, masks[v]),
                        };
                        result = _mm256_fmadd_ps(old, beta, result);
                    }
                    if store.last && s.relu {
                        // MAXPS returns its second operand when either is NaN: a NaN stays.
                        result = _mm256_max_ps(_mm256_setzero_ps(), result);
                    }
                    match full {
                        true => _mm256_storeu_ps(target, result),
                        false => _mm256_maskstore_ps(target, masks[v], result),
                    }
                }
            }
        }
        lane += run;
    }
}

/// The tile's sums over its depth block, in registers until written to `acc`: a function of
/// its own, so that the stores after it cannot take registers from the 12 accumulators.
///
/// # Safety
/// The panels hold `tile.depth` steps.
#[inline(never)]
#[target_feature(enable = "avx2,fma")]
unsafe fn sums<const R: usize, const PREFETCH: bool>(
    tile: Tile,
    panel_a: *const f32,
    panel_b: *const f32,
    rsb: isize,
    acc: &mut [[__m256; 2]; R],
) {
    let mut sums = [[_mm256_setzero_ps(); 2]; R];
    for p in 0..tile.depth {
        if PREFETCH {
            for line in tile.prefetch {
                // A prefetch reads nothing and never faults, wherever it points.
                _mm_prefetch::<_MM_HINT_T0>(line.wrapping_offset(p as isize * rsb).cast::<i8>());
            }
        }
        // SAFETY: step p of the two panels.
        let row = unsafe {
            let b = panel_b.add(p * WIDTH);
            [_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8))]
        };
        for (i, sums_row) in sums.iter_mut().enumerate() {
            let broadcast = _mm256_set1_ps(unsafe { *panel_a.add(p * ROWS + i) });
            for (slot, &vector) in sums_row.iter_mut().zip(&row) {
                *slot = _mm256_fmadd_ps(broadcast, vector, *slot);
            }
        }
    }
    *acc = sums;
}
