//! Seeded synthetic images whose class lives in the *channel* direction of single pixels.
//!
//! Each class k has a channel signature vₖ, a random unit vector in R^C. An image of class k is
//! Gaussian noise everywhere plus a square blob of pixels, each equal to ±a·vₖ with a random
//! sign, **exactly half of them +** and half −.
//!
//! Why this design: global-average-pooling the input sums the blob's pixels, and the balanced
//! signs cancel the signal *exactly*, leaving only noise: a "global average pool → linear"
//! classifier is at chance level. A 1×1 convolution followed by a ReLU, applied *before* the
//! pooling, can compute ReLU(vₖ·x) and ReLU(−vₖ·x) at every pixel, which are both large on the
//! blob whatever the sign, and survive the average. This is the Network-in-Network point: a 1×1
//! conv + ReLU is a per-pixel non-linear detector in the channel direction.

use crate::element::Element;
use crate::error::{Error, Result};
use ndarray::{s, Array2, Array4, ArrayD, ArrayView4, ArrayViewMut4, ArrayViewMutD, Axis, Zip};
use ndarray_rand::rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use ndarray_rand::rand_distr::{Distribution, StandardNormal};

/// The knobs of the generator.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SyntheticConfig {
    pub classes: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Side of the square blob; blob_side² must be even so that signs can balance exactly.
    pub blob_side: usize,
    /// Length a of the signal vector ±a·vₖ at a blob pixel.
    pub amplitude: f32,
    /// Standard deviation of the noise on every channel of every pixel.
    pub noise: f32,
    pub train_images: usize,
    pub test_images: usize,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            classes: 4,
            channels: 32,
            height: 8,
            width: 8,
            blob_side: 4,
            amplitude: 2.0,
            noise: 0.5,
            train_images: 2048,
            test_images: 512,
        }
    }
}

/// Images (N, C, H, W) with a label each (classification) or a target tensor each
/// (regression: targets of shape (N, ...)).
#[derive(Clone, Debug)]
pub struct Dataset {
    images: Array4<f32>,
    labels: Vec<usize>,
    targets: Option<ArrayD<f32>>,
}

impl Dataset {
    /// Images and their labels, one each.
    pub fn new(images: Array4<f32>, labels: Vec<usize>) -> Result<Self> {
        crate::ops::check_same(
            "dataset",
            "labels",
            &[images.len_of(Axis(0))],
            &[labels.len()],
        )?;
        Ok(Dataset {
            images,
            labels,
            targets: None,
        })
    }

    /// Images and their regression targets: `targets` is (N, ...), one row per image.
    pub fn regression(images: Array4<f32>, targets: ArrayD<f32>) -> Result<Self> {
        let count = targets.shape().first().copied().unwrap_or(0);
        crate::ops::check_same("dataset", "targets", &[images.len_of(Axis(0))], &[count])?;
        Ok(Dataset {
            images,
            labels: Vec::new(),
            targets: Some(targets),
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len_of(Axis(0))
    }

    /// True when there is no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The labels (empty for a regression set).
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// The regression targets (`None` for a classification set).
    pub fn targets(&self) -> Option<&ArrayD<f32>> {
        self.targets.as_ref()
    }

    /// Copies the images at `indices` into `batch`, which must be (indices.len(), C, H, W) (for
    /// training, the model's own input buffer: [`crate::Model::input_mut`]), and their labels
    /// into `labels`, reusing its buffer.
    pub fn gather<T: Element>(
        &self,
        indices: &[usize],
        mut batch: ArrayViewMut4<T>,
        labels: &mut Vec<usize>,
    ) -> Result<()> {
        let (_, channels, height, width) = self.images.dim();
        let shape = [indices.len(), channels, height, width];
        crate::ops::check_same("dataset", "batch", &shape, batch.shape())?;
        labels.clear();
        for (slot, &index) in batch.outer_iter_mut().zip(indices) {
            self.check_index(index)?;
            let image = self.images.index_axis(Axis(0), index);
            Zip::from(slot)
                .and(image)
                .for_each(|to, &from| *to = T::from_f64(f64::from(from)));
            if let Some(&label) = self.labels.get(index) {
                labels.push(label);
            }
        }
        Ok(())
    }

    /// The shape of the targets of `count` images, for [`crate::Model::target_mut`].
    pub fn target_shape(&self, count: usize) -> Option<Vec<usize>> {
        let mut shape = self.targets.as_ref()?.shape().to_vec();
        shape[0] = count;
        Some(shape)
    }

    /// Copies the targets at `indices` into `batch` (indices.len(), ...).
    pub fn gather_targets<T: Element>(
        &self,
        indices: &[usize],
        mut batch: ArrayViewMutD<T>,
    ) -> Result<()> {
        let targets = self.targets.as_ref().ok_or_else(|| {
            Error::invalid_config("dataset", "a classification set has no targets")
        })?;
        let expected = self.target_shape(indices.len()).unwrap_or_default();
        crate::ops::check_same("dataset", "targets", &expected, batch.shape())?;
        for (slot, &index) in batch.outer_iter_mut().zip(indices) {
            self.check_index(index)?;
            Zip::from(slot)
                .and(targets.index_axis(Axis(0), index))
                .for_each(|to, &from| *to = T::from_f64(f64::from(from)));
        }
        Ok(())
    }

    fn check_index(&self, index: usize) -> Result<()> {
        if index >= self.len() {
            return Err(Error::invalid_config(
                "dataset",
                format!("index {index} is out of range for {} images", self.len()),
            ));
        }
        Ok(())
    }

    /// A view of every image (N, C, H, W).
    pub fn images(&self) -> ArrayView4<'_, f32> {
        self.images.view()
    }
}

/// The generated data with the signatures that define the classes.
#[derive(Clone, Debug)]
pub struct Synthetic {
    pub config: SyntheticConfig,
    /// (K, C): row k is the unit channel signature vₖ of class k.
    pub signatures: Array2<f32>,
    pub train: Dataset,
    pub test: Dataset,
}

impl SyntheticConfig {
    fn validate(&self) -> Result<()> {
        let fail = |reason: String| Err(Error::invalid_config("synthetic data", reason));
        if self.classes < 2 || self.channels == 0 {
            return fail(format!(
                "need at least 2 classes and 1 channel, found {} and {}",
                self.classes, self.channels
            ));
        }
        if self.blob_side == 0 || self.blob_side > self.height.min(self.width) {
            return fail(format!(
                "blob side {} must be in 1..={}",
                self.blob_side,
                self.height.min(self.width)
            ));
        }
        if !(self.blob_side * self.blob_side).is_multiple_of(2) {
            return fail(format!(
                "blob side {} gives an odd pixel count: signs cannot balance",
                self.blob_side
            ));
        }
        if !(self.amplitude.is_finite() && self.noise.is_finite() && self.noise >= 0.0) {
            return fail("amplitude and noise must be finite, noise ≥ 0".to_string());
        }
        let elements = [
            self.train_images.max(self.test_images),
            self.channels,
            self.height,
            self.width,
        ]
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let signatures = self.classes.checked_mul(self.channels);
        match (elements, signatures) {
            (Some(e), Some(s)) if e <= 1 << 30 && s <= 1 << 30 => Ok(()),
            _ => fail("the dataset or its class signatures would exceed 2^30 elements".to_string()),
        }
    }
}

/// Generates the training and test sets from `seed` (the same seed gives the same bits).
pub fn generate(config: &SyntheticConfig, seed: u64) -> Result<Synthetic> {
    config.validate()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut signatures = Array2::<f32>::zeros((config.classes, config.channels));
    for mut row in signatures.outer_iter_mut() {
        row.mapv_inplace(|_| StandardNormal.sample(&mut rng));
        let norm = row.dot(&row).sqrt();
        row /= norm.max(f32::MIN_POSITIVE);
    }
    let train = make_split(config, &signatures, config.train_images, &mut rng);
    let test = make_split(config, &signatures, config.test_images, &mut rng);
    Ok(Synthetic {
        config: config.clone(),
        signatures,
        train,
        test,
    })
}

fn make_split(
    config: &SyntheticConfig,
    signatures: &Array2<f32>,
    count: usize,
    rng: &mut StdRng,
) -> Dataset {
    let shape = (count, config.channels, config.height, config.width);
    let mut images = Array4::<f32>::zeros(shape);
    images.mapv_inplace(|_| {
        let z: f32 = StandardNormal.sample(&mut *rng);
        config.noise * z
    });
    let blob_pixels = config.blob_side * config.blob_side;
    let mut signs: Vec<f32> = (0..blob_pixels)
        .map(|i| if i < blob_pixels / 2 { 1.0 } else { -1.0 })
        .collect();
    // Classes in turn, so that every class has the same number of images.
    let labels: Vec<usize> = (0..count).map(|i| i % config.classes).collect();
    for (mut image, &label) in images.outer_iter_mut().zip(&labels) {
        let top = rng.random_range(0..=config.height - config.blob_side);
        let left = rng.random_range(0..=config.width - config.blob_side);
        signs.shuffle(rng);
        let signature = signatures.row(label);
        let mut blob = image.slice_mut(s![
            ..,
            top..top + config.blob_side,
            left..left + config.blob_side
        ]);
        for (pixel, &sign) in signs.iter().enumerate() {
            let (h, w) = (pixel / config.blob_side, pixel % config.blob_side);
            let mut channels = blob.slice_mut(s![.., h, w]);
            channels.scaled_add(sign * config.amplitude, &signature);
        }
    }
    Dataset {
        images,
        labels,
        targets: None,
    }
}
