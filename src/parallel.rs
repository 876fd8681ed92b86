//! How many threads the ops use, and the one helper that splits their work.
//!
//! The ops split a batch (or a weight matrix) into as many contiguous parts as [`threads`]
//! says and run them on rayon's global pool with `rayon::join`, so each output element is
//! written by exactly one thread, in a fixed order: results do not depend on scheduling (a
//! different thread count may round differently, as the parts change). GEMMs run one thread
//! each inside a part, so two levels never oversubscribe the cores; a product outside any
//! split (a batch of one sample, inside [`install`] or not) splits its own columns. A pass
//! of the tape called from outside the pool moves onto one of its threads first, so that the
//! ops' splits start inside it.
//!
//! The count is, in order: [`set_threads`], the `POINTWISE_THREADS` environment variable, or
//! the size of rayon's global pool (`RAYON_NUM_THREADS`, else the number of cores). Work on
//! fewer values than [`split_from`] runs whole on the calling thread.

use crate::error::{Error, Result};
use ndarray::{
    ArrayBase, ArrayView, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut, ArrayViewMut2,
    ArrayViewMut3, ArrayViewMut4, Axis, Dimension, Ix3, Ix4, RawData,
};
use std::sync::atomic::{AtomicUsize, Ordering};

/// 0 until decided.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets how many parts the ops split their work into (at least 1).
pub fn set_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        return Err(Error::invalid_config(
            "set_threads",
            "the thread count must be at least 1",
        ));
    }
    THREADS.store(threads, Ordering::Relaxed);
    Ok(())
}

/// The default of [`split_from`]: work on fewer values takes a few microseconds, less than
/// handing half of it to another thread and waiting for it (a linear layer's backward on a
/// chunk of 4 samples, 256 → 10, took 0.05 ms a step on one thread and 0.4 ms split in two,
/// over W2's eight chunks). PyTorch's CPU loops split from 32768 values.
pub const SPLIT_FROM_VALUES: usize = 1 << 14;

static SPLIT_FROM: AtomicUsize = AtomicUsize::new(SPLIT_FROM_VALUES);

/// Sets the least work, in values the ops read and write, that is split between the threads
/// (0: any work). Like the thread count, it changes how the work is cut; the tests set 0 to
/// run small shapes split.
pub fn set_split_from(values: usize) {
    SPLIT_FROM.store(values, Ordering::Relaxed);
}

/// The least work that is split between the threads: [`SPLIT_FROM_VALUES`] unless
/// [`set_split_from`] said otherwise.
pub fn split_from() -> usize {
    SPLIT_FROM.load(Ordering::Relaxed)
}

/// How many parts the ops split their work into.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            let from_env = std::env::var("POINTWISE_THREADS")
                .ok()
                .and_then(|v| v.parse().ok());
            let threads = from_env
                .filter(|&t| t > 0)
                .unwrap_or_else(rayon::current_num_threads);
            THREADS.store(threads, Ordering::Relaxed);
            threads
        }
        threads => threads,
    }
}

/// Work that can be cut in two along an axis (a view, or a tuple of views cut together).
pub(crate) trait Split: Sized + Send {
    /// Length of the axis being cut.
    fn len(&self) -> usize;
    /// The parts before and after `mid`.
    fn split(self, mid: usize) -> (Self, Self);
    /// How many values the work reads or writes: a measure of its size.
    fn elements(&self) -> usize;
}

/// A view to be cut along `axis`.
pub(crate) struct Along<V>(pub V, pub Axis);

/// The length along `axis`; a view without that axis (a scalar) is one item that is never cut.
fn along_len(shape: &[usize], axis: Axis) -> usize {
    shape.get(axis.index()).copied().unwrap_or(1)
}

impl<T: Sync, D: Dimension> Split for Along<ArrayView<'_, T, D>> {
    fn len(&self) -> usize {
        along_len(self.0.shape(), self.1)
    }
    fn split(self, mid: usize) -> (Self, Self) {
        let (first, second) = self.0.split_at(self.1, mid);
        (Along(first, self.1), Along(second, self.1))
    }
    fn elements(&self) -> usize {
        self.0.len()
    }
}

impl<T: Send, D: Dimension> Split for Along<ArrayViewMut<'_, T, D>> {
    fn len(&self) -> usize {
        along_len(self.0.shape(), self.1)
    }
    fn split(self, mid: usize) -> (Self, Self) {
        let (first, second) = self.0.split_at(self.1, mid);
        (Along(first, self.1), Along(second, self.1))
    }
    fn elements(&self) -> usize {
        self.0.len()
    }
}

/// A slice of items of `.1` values each (e.g. the arg-max positions of one sample), cut
/// between items.
pub(crate) struct Items<S>(pub S, pub usize);

impl<T: Send> Split for Items<&mut [T]> {
    fn len(&self) -> usize {
        self.0.len() / self.1.max(1)
    }
    fn split(self, mid: usize) -> (Self, Self) {
        let (first, second) = self.0.split_at_mut(mid * self.1);
        (Items(first, self.1), Items(second, self.1))
    }
    fn elements(&self) -> usize {
        self.0.len()
    }
}

impl<T: Sync> Split for Items<&[T]> {
    fn len(&self) -> usize {
        self.0.len() / self.1.max(1)
    }
    fn split(self, mid: usize) -> (Self, Self) {
        let (first, second) = self.0.split_at(mid * self.1);
        (Items(first, self.1), Items(second, self.1))
    }
    fn elements(&self) -> usize {
        self.0.len()
    }
}

/// Work cut only between whole groups of `.1` items (the samples that share a slot of a
/// sum, say); the last group may be shorter.
pub(crate) struct Groups<S>(pub S, pub usize);

impl<S: Split> Split for Groups<S> {
    fn len(&self) -> usize {
        self.0.len().div_ceil(self.1.max(1))
    }
    fn split(self, mid: usize) -> (Self, Self) {
        let at = (mid * self.1.max(1)).min(self.0.len());
        let (first, second) = self.0.split(at);
        (Groups(first, self.1), Groups(second, self.1))
    }
    fn elements(&self) -> usize {
        self.0.elements()
    }
}

/// Indices (the channels a part covers, say), cut with the views they index: a part reads
/// per-channel constants by index and writes only its own views.
impl Split for std::ops::Range<usize> {
    fn len(&self) -> usize {
        ExactSizeIterator::len(self)
    }
    fn split(self, mid: usize) -> (Self, Self) {
        let mid = self.start + mid;
        (self.start..mid, mid..self.end)
    }
    /// Unknown: the indices stand for work on views that are not cut with them.
    fn elements(&self) -> usize {
        usize::MAX
    }
}

/// A buffer that may be absent (a gradient nobody asked for): cut if present.
impl<S: Split> Split for Option<S> {
    fn len(&self) -> usize {
        self.as_ref().map_or(0, Split::len)
    }
    fn split(self, mid: usize) -> (Self, Self) {
        match self {
            Some(parts) => {
                let (first, second) = parts.split(mid);
                (Some(first), Some(second))
            }
            None => (None, None),
        }
    }
    fn elements(&self) -> usize {
        self.as_ref().map_or(0, Split::elements)
    }
}

impl<A: Split, B: Split> Split for (A, B) {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn split(self, mid: usize) -> (Self, Self) {
        let ((a1, a2), (b1, b2)) = (self.0.split(mid), self.1.split(mid));
        ((a1, b1), (a2, b2))
    }
    fn elements(&self) -> usize {
        self.0.elements().saturating_add(self.1.elements())
    }
}

impl<A: Split, B: Split, C: Split> Split for (A, B, C) {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn split(self, mid: usize) -> (Self, Self) {
        let ((a1, a2), (b1, b2), (c1, c2)) =
            (self.0.split(mid), self.1.split(mid), self.2.split(mid));
        ((a1, b1, c1), (a2, b2, c2))
    }
    fn elements(&self) -> usize {
        (self.0.elements())
            .saturating_add(self.1.elements())
            .saturating_add(self.2.elements())
    }
}

/// Runs `work` on [`threads`] contiguous parts of `parts` (fewer if it is shorter, one if it
/// is small: [`split_from`]), in parallel.
/// All views in a tuple must have the same length along their axes. Returns the first error.
pub(crate) fn in_parts<S: Split>(parts: S, work: &(impl Fn(S) -> Result<()> + Sync)) -> Result<()> {
    let count = if parts.elements() < split_from() {
        1
    } else {
        threads().min(parts.len()).max(1)
    };
    run(parts, count, work)
}

fn run<S: Split>(parts: S, count: usize, work: &(impl Fn(S) -> Result<()> + Sync)) -> Result<()> {
    if count <= 1 {
        return work(parts);
    }
    let left = count / 2;
    let mid = parts.len() * left / count;
    let (first, second) = parts.split(mid);
    let (a, b) = rayon::join(
        || as_part(|| run(first, left, work)),
        || as_part(|| run(second, count - left, work)),
    );
    a.and(b)
}

thread_local! {
    /// Whether this thread is running one of several parts of an op's work.
    static IN_PART: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `work` marked as one part of a split: the products it calls then run whole on this
/// thread (see [`in_split_part`]).
fn as_part<R>(work: impl FnOnce() -> R) -> R {
    /// Puts the thread's mark back as it was, also if `work` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            IN_PART.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(IN_PART.with(|flag| flag.replace(true)));
    work()
}

/// Whether the calling thread is running one part of an op's work split between the threads:
/// every thread is then busy with a part, and a product inside one should not split again. A
/// batch of one sample is not split, so its products may be, on the pool's threads as well as
/// from outside them.
pub(crate) fn in_split_part() -> bool {
    IN_PART.with(|flag| flag.get())
}

/// Sets every element of `view` to `value`, the batch split between the threads.
pub(crate) fn fill<T: Copy + Send + Sync, D: Dimension>(
    view: ArrayViewMut<'_, T, D>,
    value: T,
) -> Result<()> {
    in_parts(Along(view, Axis(0)), &|Along(mut part, _)| {
        part.fill(value);
        Ok(())
    })
}

/// Runs `work` on one of the pool's threads and returns its result. The ops' parallel parts
/// then split from inside the pool (onto its own work queues). The tape's passes move there
/// by themselves when more than one thread splits their work, but each move is a hand-off
/// from outside, which costs an occasional allocation in rayon's injector queue: run a
/// training loop in here for steps that allocate nothing at any thread count.
pub fn install<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let mut result = None;
    rayon::scope(|_| result = Some(work()));
    match result {
        Some(result) => result,
        // rayon::scope runs the closure to completion before it returns.
        None => unreachable!("rayon::scope returned without running its closure"),
    }
}

/// Runs `work` on one of the pool's threads when the ops split their work (more than one
/// thread) and the caller is not already on one: a pass hands its work to the pool once,
/// rather than every split of every op handing its parts over from outside and waiting for
/// them. The tape's passes and a model's step run in here. The W2 step at 2 threads called
/// from outside the pool, against the same inside [`install`] (alternating in one process,
/// 50 steps each, min / median): 29.5 / 32.1 against 28.3 / 30.6 ms, and 29.6 / 36.1 against
/// 28.8 / 34.4.
pub(crate) fn on_the_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    match threads() > 1 && rayon::current_thread_index().is_none() {
        true => install(work),
        false => work(),
    }
}

/// Sample n's (C, H, W) block seen as a (C, P) matrix, without copying: in a row-major
/// tensor it already is one.
pub(crate) fn sample_matrix<T>(block: ArrayView3<'_, T>) -> Result<ArrayView2<'_, T>> {
    let (channels, height, width) = block.dim();
    block
        .into_shape_with_order((channels, height * width))
        .map_err(|_| not_row_major([channels, height, width]))
}

/// The same for a mutable block.
pub(crate) fn sample_matrix_mut<T>(block: ArrayViewMut3<'_, T>) -> Result<ArrayViewMut2<'_, T>> {
    let (channels, height, width) = block.dim();
    block
        .into_shape_with_order((channels, height * width))
        .map_err(|_| not_row_major([channels, height, width]))
}

/// An (N, C, H, W) tensor (a view or a mutable view) seen as N (C, P) matrices, without
/// copying: each sample's rows must be row-major (H·W in a row), though the samples and
/// channels may lie anywhere (a grouped layer's channels are slices).
pub(crate) fn samples_matrices<S: RawData>(mut x: ArrayBase<S, Ix4>) -> Result<ArrayBase<S, Ix3>> {
    let [_, channels, height, width] = x.shape().try_into().unwrap_or([0; 4]);
    match x.merge_axes(Axis(2), Axis(3)) && (x.strides()[3] == 1 || height * width <= 1) {
        true => Ok(x.remove_axis(Axis(2))),
        false => Err(not_row_major([channels, height, width])),
    }
}

/// How many samples of `pixels` columns each to lay side by side (at most `batch`, at least 1):
/// about 512 columns, so that a group's product is wide (one sample of a 7×7 map has 49: a
/// product that narrow spends its time packing the other operand), in groups of equal size
/// (16 samples of 7×7 as 8 + 8, not 10 + 6: the five 7×7 layers of MobileNetV2, forward, dX
/// and dW, were 1–3 % faster so, in two runs alternating the two in one process).
pub(crate) fn samples_per_group(pixels: usize, batch: usize) -> usize {
    let widest = (512 / pixels.max(1)).clamp(1, batch.max(1));
    let groups = batch.max(1).div_ceil(widest);
    batch.max(1).div_ceil(groups)
}

/// Copies the samples of an (N, C, H, W) block side by side into `target` (C, N·P): sample
/// n's (C, P) matrix becomes columns n·P..(n+1)·P, so that one product covers them all.
pub(crate) fn side_by_side<T: Copy>(
    samples: ArrayView4<'_, T>,
    mut target: ArrayViewMut2<'_, T>,
) -> Result<()> {
    let pixels = samples.shape()[2] * samples.shape()[3];
    for (n, sample) in samples.outer_iter().enumerate() {
        let columns = ndarray::s![.., n * pixels..(n + 1) * pixels];
        target.slice_mut(columns).assign(&sample_matrix(sample)?);
    }
    Ok(())
}

fn not_row_major(shape: [usize; 3]) -> Error {
    Error::invalid_shape(
        "sample matrix",
        "tensors must be in standard (row-major) layout",
        &shape,
    )
}

/// Runs `work(Aₙ, Bₙ)` for every sample n of two (N, C, H, W) tensors, each seen as a (C, P)
/// matrix; the samples split between the threads.
pub(crate) fn each_sample<T: Sync + Send>(
    a: ArrayView4<'_, T>,
    b: ArrayViewMut4<'_, T>,
    work: &(impl Fn(ArrayView2<T>, ArrayViewMut2<T>) -> Result<()> + Sync),
) -> Result<()> {
    in_parts((Along(a, Axis(0)), Along(b, Axis(0))), &|(
        Along(a, _),
        Along(mut b, _),
    )| {
        for (a_n, b_n) in a.outer_iter().zip(b.outer_iter_mut()) {
            work(sample_matrix(a_n)?, sample_matrix_mut(b_n)?)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::{in_split_part, install, on_the_pool, run, samples_per_group, threads};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The mark that keeps a product from splitting again: set in each part of a split, on
    /// whichever thread runs it, and nowhere else — not on the pool's threads as such (a
    /// batch of one sample inside `install` is not split, so its products may be), not in a
    /// "split" into one part, and not after the split returns.
    #[test]
    fn only_the_parts_of_a_split_are_marked() {
        assert!(!in_split_part());
        assert!(!install(in_split_part));
        let marked = AtomicUsize::new(0);
        let count_marked = |_: std::ops::Range<usize>| {
            marked.fetch_add(usize::from(in_split_part()), Ordering::Relaxed);
            Ok(())
        };
        run(0..4, 4, &count_marked).unwrap();
        assert_eq!(marked.swap(0, Ordering::Relaxed), 4, "4 parts, each marked");
        run(0..4, 1, &count_marked).unwrap();
        assert_eq!(marked.load(Ordering::Relaxed), 0, "one part is no split");
        install(|| run(0..2, 2, &count_marked)).unwrap();
        assert_eq!(marked.load(Ordering::Relaxed), 2);
        assert!(!in_split_part() && !install(in_split_part));
    }

    /// A pass called from outside the pool runs on one of its threads when the ops split their
    /// work, and where it was called otherwise; one already on the pool stays there.
    #[test]
    fn passes_move_to_the_pool_only_when_it_splits_their_work() {
        let on_a_pool_thread = || rayon::current_thread_index().is_some();
        assert!(!on_a_pool_thread());
        assert_eq!(on_the_pool(on_a_pool_thread), threads() > 1);
        assert!(install(|| on_the_pool(on_a_pool_thread)));
    }

    /// Groups of samples side by side: no wider than 512 columns (unless one sample is), as
    /// few as that allows, and of equal size but for the last, which is never larger.
    #[test]
    fn groups_of_samples_are_as_even_as_their_count_allows() {
        assert_eq!(samples_per_group(49, 16), 8, "16 samples of 7×7: 8 + 8");
        assert_eq!(samples_per_group(49, 8), 8);
        assert_eq!(samples_per_group(600, 4), 1);
        for pixels in [1, 2, 7, 16, 25, 49, 100, 196, 300, 512, 513] {
            for batch in 1..=70 {
                let group = samples_per_group(pixels, batch);
                assert!((1..=batch).contains(&group), "{pixels} {batch}");
                assert!(group * pixels <= 512 || group == 1, "{pixels} {batch}");
                let widest = (512 / pixels).clamp(1, batch);
                assert_eq!(
                    batch.div_ceil(group),
                    batch.div_ceil(widest),
                    "{pixels} {batch}"
                );
            }
        }
    }
}
