//! The training loop for any [`Model`]: seeded shuffles, mini-batches, an optimizer with its
//! parameter groups, a schedule, and a state that a checkpoint saves so that a run resumes
//! bit for bit.

use crate::data::Dataset;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::model::{argmax_rows, Model};
use crate::optim::{Optimizer, OptimizerKind, OptimizerState, ParamGroup, Schedule};
use ndarray_rand::rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::time::Instant;

/// How to train.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Base learning rate (the schedule scales it).
    pub lr: f64,
    pub optimizer: OptimizerKind,
    /// The learning rate over the steps of the run ([`TrainConfig::steps_per_epoch`] helps
    /// to express it in epochs).
    pub schedule: Schedule,
    /// Parameters with their own learning-rate factor and weight decay.
    pub groups: Vec<ParamGroup>,
    /// Seeds the mini-batch order: epoch e's order depends on (seed, e) alone.
    pub seed: u64,
}

impl TrainConfig {
    /// Constant learning rate `lr`, no groups.
    pub fn new(epochs: usize, batch_size: usize, lr: f64, optimizer: OptimizerKind) -> Self {
        TrainConfig {
            epochs,
            batch_size,
            lr,
            optimizer,
            schedule: Schedule::constant(),
            groups: Vec::new(),
            seed: 0,
        }
    }

    /// Updates per epoch on a training set of `train_len` images (the last batch may be short).
    pub fn steps_per_epoch(&self, train_len: usize) -> u64 {
        train_len.div_ceil(self.batch_size.max(1)) as u64
    }

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
        if self
            .steps_per_epoch(train_len)
            .checked_mul(self.epochs as u64)
            .is_none_or(|steps| steps > 1 << 53)
        {
            return Err(Error::invalid_config(
                "train",
                format!("{} epochs are more steps than can be counted", self.epochs),
            ));
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
        self.schedule.validate()
    }
}

/// What one epoch did.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Accuracy on the training batches as they were seen (before each update); 0 for a
    /// regression.
    pub train_accuracy: f64,
    pub learning_rate: f64,
    pub images_per_second: f64,
}

/// Where a run stands: what a training checkpoint saves besides the model.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingState<T = f32> {
    pub config: TrainConfig,
    /// Epochs done.
    pub epoch: u64,
    /// Updates done (the schedule's position).
    pub step: u64,
    pub optimizer: OptimizerState<T>,
}

/// Trains a model epoch by epoch; owns the optimizer state, the batch order and the label
/// buffer (each batch is gathered straight into the model's input).
pub struct Trainer<T = f32> {
    config: TrainConfig,
    optimizer: Optimizer<T>,
    order: Vec<usize>,
    labels: Vec<usize>,
    step: u64,
    epoch: usize,
}

impl<T: Element> Trainer<T> {
    /// A trainer for `config` on a training set of `train_len` images.
    pub fn new(config: TrainConfig, train_len: usize) -> Result<Self> {
        config.validate(train_len)?;
        Ok(Trainer {
            optimizer: Optimizer::with_groups(config.optimizer, config.groups.clone())?,
            order: (0..train_len).collect(),
            labels: Vec::new(),
            step: 0,
            epoch: 0,
            config,
        })
    }

    /// A trainer that goes on from a saved state.
    pub fn resume(state: TrainingState<T>, train_len: usize) -> Result<Self> {
        let mut trainer = Trainer::new(state.config, train_len)?;
        trainer.optimizer.set_state(state.optimizer)?;
        trainer.epoch = usize::try_from(state.epoch)
            .map_err(|_| Error::invalid_config("train", "the saved epoch is out of range"))?;
        trainer.step = state.step;
        Ok(trainer)
    }

    /// The state to save to resume from.
    pub fn state(&self) -> TrainingState<T> {
        TrainingState {
            config: self.config.clone(),
            epoch: self.epoch as u64,
            step: self.step,
            optimizer: self.optimizer.state(),
        }
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Epochs done so far.
    pub fn epochs_done(&self) -> usize {
        self.epoch
    }

    /// One pass over `data` in the order of this epoch (seeded by the config's seed and the
    /// epoch number). `on_batch(batch_index, batches, loss)` is called after every update (for
    /// progress bars). A non-finite loss or update stops the epoch with [`Error::NonFinite`]
    /// naming the step; that step changed no parameter.
    pub fn train_epoch(
        &mut self,
        model: &mut Model<T>,
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
        let regression = model.roles().target.is_some();
        if regression != data.targets().is_some() {
            return Err(Error::invalid_config(
                "train",
                "a classifier trains on labels, a regressor on target tensors",
            ));
        }
        self.order.sort_unstable();
        let mut rng = StdRng::seed_from_u64(epoch_seed(self.config.seed, self.epoch));
        self.order.shuffle(&mut rng);
        let started = Instant::now();
        let batches = data.len().div_ceil(self.config.batch_size);
        model.graph_mut().set_training(true);
        // The loop runs inside the thread pool, so that the ops' parallel parts allocate
        // nothing (see parallel::install).
        let (loss_sum, correct, learning_rate) =
            crate::parallel::install(|| -> Result<(f64, usize, f64)> {
                let (mut loss_sum, mut correct) = (0.0f64, 0usize);
                let mut learning_rate = self.config.lr;
                for (index, chunk) in self.order.chunks(self.config.batch_size).enumerate() {
                    let at_step = |error| match error {
                        Error::NonFinite { what, .. } => Error::NonFinite {
                            what,
                            step: Some(self.step),
                            epoch: Some(self.epoch + 1),
                            batch: Some(index),
                        },
                        other => other,
                    };
                    // Gathered straight into the model's input: the batch is never copied twice.
                    let (_, channels, height, width) = data.images().dim();
                    let batch = model.input_mut([chunk.len(), channels, height, width])?;
                    data.gather(chunk, batch, &mut self.labels)?;
                    if let Some(shape) = data.target_shape(chunk.len()) {
                        data.gather_targets(chunk, model.target_mut(&shape)?)?;
                    }
                    let loss = model
                        .forward_backward_in_place(&self.labels)
                        .map_err(at_step)?;
                    if !regression {
                        correct += argmax_rows(model.last_logits()?)
                            .iter()
                            .zip(&self.labels)
                            .filter(|(p, l)| p == l)
                            .count();
                    }
                    learning_rate = self.config.schedule.rate(self.config.lr, self.step);
                    self.optimizer
                        .step(model.graph_mut(), learning_rate)
                        .map_err(at_step)?;
                    self.step += 1;
                    loss_sum += loss.as_f64();
                    on_batch(index, batches, loss.as_f64());
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

/// The seed of epoch `epoch`'s order: SplitMix64's mix of (seed, epoch), so that nearby seeds
/// and epochs give unrelated orders.
fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    let mut z = seed.wrapping_add(
        (epoch as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a model makes of a whole data set.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean loss over the images.
    pub loss: f64,
    /// The predicted class of every image (empty for a regression).
    pub predictions: Vec<usize>,
    /// Fraction predicted correctly (0 for a regression).
    pub accuracy: f64,
}

/// Runs `model` over `data` in batches of `batch_size`, in evaluation mode (batch norm uses its
/// running statistics; the mode is restored after).
pub fn evaluate<T: Element>(
    model: &mut Model<T>,
    data: &Dataset,
    batch_size: usize,
) -> Result<Evaluation> {
    if batch_size == 0 {
        return Err(Error::invalid_config(
            "evaluate",
            "batch size must be at least 1",
        ));
    }
    let training = model.graph().is_training();
    model.graph_mut().set_training(false);
    let result = evaluate_batches(model, data, batch_size);
    model.graph_mut().set_training(training);
    result
}

fn evaluate_batches<T: Element>(
    model: &mut Model<T>,
    data: &Dataset,
    batch_size: usize,
) -> Result<Evaluation> {
    let roles = model.roles();
    let (_, channels, height, width) = data.images().dim();
    let (mut loss_sum, mut predictions, mut labels) = (0.0, Vec::new(), Vec::new());
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(batch_size) {
        let batch = model.input_mut([chunk.len(), channels, height, width])?;
        data.gather(chunk, batch, &mut labels)?;
        model.graph_mut().check_input_finite(roles.input)?;
        match data.target_shape(chunk.len()) {
            Some(shape) => data.gather_targets(chunk, model.target_mut(&shape)?)?,
            None if roles.target.is_none() => model.graph_mut().set_labels(roles.loss, &labels)?,
            None => {
                return Err(Error::invalid_config(
                    "evaluate",
                    "a regressor needs target tensors",
                ))
            }
        }
        model.graph_mut().forward(roles.loss)?;
        loss_sum += model.graph().scalar(roles.loss)?.as_f64() * chunk.len() as f64;
        if roles.target.is_none() {
            predictions.extend(argmax_rows(model.last_logits()?));
        }
    }
    let correct = predictions
        .iter()
        .zip(data.labels())
        .filter(|(p, l)| p == l)
        .count();
    Ok(Evaluation {
        loss: loss_sum / data.len().max(1) as f64,
        accuracy: correct as f64 / data.len().max(1) as f64,
        predictions,
    })
}

/// Predictions for every image of `data`, in batches of `batch_size` (evaluation mode).
pub fn predict_all<T: Element>(
    model: &mut Model<T>,
    data: &Dataset,
    batch_size: usize,
) -> Result<Vec<usize>> {
    Ok(evaluate(model, data, batch_size)?.predictions)
}

/// Fraction of `data` that `model` classifies correctly (evaluation mode).
pub fn accuracy<T: Element>(
    model: &mut Model<T>,
    data: &Dataset,
    batch_size: usize,
) -> Result<f64> {
    Ok(evaluate(model, data, batch_size)?.accuracy)
}
