//! Software prefetch for the tile kernels: a block of cache lines a tile asks for while it
//! computes, so that the next tile finds them in L1. Used where an operand comes from memory
//! in runs too short or too many for the hardware prefetcher to follow (a strip of B is one
//! line from each of K rows; a row tile of a large A is 6 runs of a few lines).

use std::arch::x86_64::*;

/// A block of cache lines a tile asks for ahead of its use: `rows` rows of `lines` lines
/// (16 floats each), the rows `stride` floats apart from `start`. Nothing when `rows` is 0.
#[derive(Clone, Copy)]
pub(super) struct Upcoming {
    pub start: *const f32,
    pub rows: usize,
    pub lines: usize,
    pub stride: isize,
}

impl Upcoming {
    /// No lines.
    pub const NONE: Upcoming = Upcoming {
        start: std::ptr::null(),
        rows: 0,
        lines: 1,
        stride: 0,
    };
}

/// Issues the prefetches of an [`Upcoming`] block evenly over a tile's `depth` steps: one
/// every `every` steps (or `burst` per step when there are more lines than steps). Spread
/// out, they arrive while the tile computes, where bursts would queue behind each other.
pub(super) struct Prefetcher {
    block: Upcoming,
    remaining: usize,
    every: usize,
    burst: usize,
    countdown: usize,
    row: usize,
    line: usize,
}

impl Prefetcher {
    pub fn new(block: Upcoming, depth: usize) -> Self {
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
    pub fn step(&mut self) {
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
