//! The training loop: seeded shuffles, mini-batches, an optimizer and a schedule.

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::{argmax_rows, Model};
use crate::optim::{Optimizer, OptimizerKind, Schedule};
use ndarray::s;
use ndarray_rand::rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::time::Instant;

/// How to train.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Base learning rate.
    pub lr: f64,
    pub optimizer: OptimizerKind,
    /// Use a cosine schedule with a short warm-up (otherwise a constant rate).
    pub cosine: bool,
    /// Seeds the mini-batch shuffles.
    pub seed: u64,
}

impl TrainConfig {
    fn validate(&self, train_len: usize) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(Error::invalid_config(
                "train",
                "epochs and batch size must be at least 1",
            ));
        }
        if train_len == 0 {
            return Err(Error::EmptyBatch { op: "train" });
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid_config(
                "train",
                format!(
                    "learning rate must be positive and finite, found {}",
                    self.lr
                ),
            ));
        }
        Ok(())
    }
}

/// What one epoch did.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Accuracy on the training batches as they were seen (before each update).
    pub train_accuracy: f64,
    pub learning_rate: f64,
    pub images_per_second: f64,
}

/// Trains a model epoch by epoch; owns the optimizer state, the shuffle RNG and the label
/// buffer (each batch is gathered straight into the model's input).
pub struct Trainer {
    config: TrainConfig,
    optimizer: Optimizer<f32>,
    schedule: Schedule,
    rng: StdRng,
    order: Vec<usize>,
    labels: Vec<usize>,
    step: u64,
    epoch: usize,
}

impl Trainer {
    /// A trainer for `config` on a training set of `train_len` images.
    pub fn new(config: TrainConfig, train_len: usize) -> Result<Self> {
        config.validate(train_len)?;
        let steps_per_epoch = train_len.div_ceil(config.batch_size) as u64;
        let total_steps = steps_per_epoch * config.epochs as u64;
        let schedule = if config.cosine {
            Schedule::Cosine {
                warmup_steps: steps_per_epoch.min(total_steps / 10),
                total_steps,
            }
        } else {
            Schedule::Constant
        };
        Ok(Trainer {
            optimizer: Optimizer::new(config.optimizer)?,
            schedule,
            rng: StdRng::seed_from_u64(config.seed),
            order: (0..train_len).collect(),
            labels: Vec::new(),
            step: 0,
            epoch: 0,
            config,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// One pass over `data` in a fresh seeded order. `on_batch(batch_index, batches, loss)` is
    /// called after every update (for progress bars). A non-finite loss stops the epoch with
    /// [`Error::NonFinite`] naming the step; that step's update is not applied.
    pub fn train_epoch(
        &mut self,
        model: &mut Model,
        data: &Dataset,
        mut on_batch: impl FnMut(usize, usize, f64) + Send,
    ) -> Result<EpochReport> {
        if data.len() != self.order.len() {
            return Err(Error::shape_mismatch(
                "train",
                "training set size",
                self.order.len().to_string(),
                data.len().to_string(),
            ));
        }
        self.order.shuffle(&mut self.rng);
        let started = Instant::now();
        let batches = data.len().div_ceil(self.config.batch_size);
        // The loop runs inside the thread pool, so that the ops' parallel parts allocate
        // nothing (see parallel::install).
        let (loss_sum, correct, learning_rate) =
            crate::parallel::install(|| -> Result<(f64, usize, f64)> {
                let (mut loss_sum, mut correct) = (0.0f64, 0usize);
                let mut learning_rate = self.config.lr;
                for (index, chunk) in self.order.chunks(self.config.batch_size).enumerate() {
                    // Gathered straight into the model's input: the batch is never copied twice.
                    let (_, channels, height, width) = data.images().dim();
                    let batch = model.input_mut([chunk.len(), channels, height, width])?;
                    data.gather(chunk, batch, &mut self.labels)?;
                    let loss = model
                        .forward_backward_in_place(&self.labels)
                        .map_err(|error| match error {
                            Error::NonFinite { what, .. } => Error::NonFinite {
                                what,
                                step: Some(self.step),
                                epoch: Some(self.epoch + 1),
                                batch: Some(index),
                            },
                            other => other,
                        })?;
                    correct += argmax_rows(model.last_logits()?)
                        .iter()
                        .zip(&self.labels)
                        .filter(|(p, l)| p == l)
                        .count();
                    learning_rate = self.schedule.rate(self.config.lr, self.step);
                    self.optimizer.step(model.graph_mut(), learning_rate)?;
                    self.step += 1;
                    loss_sum += f64::from(loss);
                    on_batch(index, batches, f64::from(loss));
                }
                Ok((loss_sum, correct, learning_rate))
            })?;
        self.epoch += 1;
        Ok(EpochReport {
            epoch: self.epoch,
            train_loss: loss_sum / batches as f64,
            train_accuracy: correct as f64 / data.len() as f64,
            learning_rate,
            images_per_second: data.len() as f64 / started.elapsed().as_secs_f64().max(1e-9),
        })
    }
}

/// Predictions for every image of `data`, in batches of `batch_size`.
pub fn predict_all(model: &mut Model, data: &Dataset, batch_size: usize) -> Result<Vec<usize>> {
    if batch_size == 0 {
        return Err(Error::invalid_config(
            "predict",
            "batch size must be at least 1",
        ));
    }
    let mut predictions = Vec::with_capacity(data.len());
    for start in (0..data.len()).step_by(batch_size) {
        let end = (start + batch_size).min(data.len());
        predictions.extend(model.predict(data.images.slice(s![start..end, .., .., ..]))?);
    }
    Ok(predictions)
}

/// Fraction of `data` that `model` classifies correctly.
pub fn accuracy(model: &mut Model, data: &Dataset, batch_size: usize) -> Result<f64> {
    let predictions = predict_all(model, data, batch_size)?;
    let correct = predictions
        .iter()
        .zip(&data.labels)
        .filter(|(p, l)| p == l)
        .count();
    Ok(correct as f64 / data.len().max(1) as f64)
}
