//! Parameter updates: SGD with momentum and weight decay, Adam, and learning-rate schedules.
//!
//! An optimizer walks the graph's parameters in creation order ([`Graph::params_mut`]) and keeps
//! one state buffer per parameter, allocated on the first step and reused after.
//!
//! ```text
//! SGD:   g ← ∇ + λ·θ          v ← μ·v + g           θ ← θ − η·v
//! Adam:  g ← ∇ + λ·θ          m ← β₁·m + (1−β₁)·g   s ← β₂·s + (1−β₂)·g²
//!        θ ← θ − η·m̂ / (√ŝ + ε)     with m̂ = m/(1−β₁ᵗ), ŝ = s/(1−β₂ᵗ)
//! ```
//! Weight decay is the plain L2 form (added to the gradient), as in PyTorch's `SGD` and `Adam`.

use crate::element::Element;
use crate::error::{Error, Result};
use crate::graph::Graph;
use ndarray::{ArrayD, IxDyn, Zip};

/// Which update rule to use, with its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum OptimizerKind {
    Sgd {
        momentum: f64,
        weight_decay: f64,
    },
    Adam {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

impl OptimizerKind {
    /// SGD with momentum 0.9 and weight decay 5e-4.
    pub fn sgd() -> Self {
        OptimizerKind::Sgd {
            momentum: 0.9,
            weight_decay: 5e-4,
        }
    }

    /// Adam with the usual β₁ = 0.9, β₂ = 0.999, ε = 1e-8 and no weight decay.
    pub fn adam() -> Self {
        OptimizerKind::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    fn validate(&self) -> Result<()> {
        let ok = match *self {
            OptimizerKind::Sgd {
                momentum,
                weight_decay,
            } => (0.0..1.0).contains(&momentum) && weight_decay >= 0.0 && weight_decay.is_finite(),
            OptimizerKind::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                (0.0..1.0).contains(&beta1)
                    && (0.0..1.0).contains(&beta2)
                    && eps > 0.0
                    && eps.is_finite()
                    && weight_decay >= 0.0
                    && weight_decay.is_finite()
            }
        };
        if ok {
            Ok(())
        } else {
            Err(Error::invalid_config(
                "optimizer",
                format!("hyper-parameters out of range: {self:?}"),
            ))
        }
    }
}

/// An optimizer with its per-parameter state.
#[derive(Clone, Debug)]
pub struct Optimizer<T> {
    kind: OptimizerKind,
    /// SGD: the velocity v. Adam: the first moment m.
    first: Vec<ArrayD<T>>,
    /// Adam: the second moment s.
    second: Vec<ArrayD<T>>,
    steps: u64,
}

impl<T: Element> Optimizer<T> {
    /// A fresh optimizer (no state yet).
    pub fn new(kind: OptimizerKind) -> Result<Self> {
        kind.validate()?;
        Ok(Optimizer {
            kind,
            first: Vec::new(),
            second: Vec::new(),
            steps: 0,
        })
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Applies one update with learning rate `lr` to every parameter of `graph`, from the
    /// gradients its last backward pass accumulated.
    pub fn step(&mut self, graph: &mut Graph<T>, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid_config(
                "optimizer",
                format!("learning rate must be finite and ≥ 0, found {lr}"),
            ));
        }
        // State is allocated on the first step only: the steady state allocates nothing.
        if self.first.len() != graph.params_mut().count() {
            self.first = graph
                .params_mut()
                .map(|p| ArrayD::zeros(IxDyn(p.value.shape())))
                .collect();
            self.second = self.first.clone();
        }
        self.steps += 1;
        let lr = T::from_f64(lr);
        for ((param, first), second) in graph
            .params_mut()
            .zip(&mut self.first)
            .zip(&mut self.second)
        {
            if param.grad.shape() != param.value.shape() || first.shape() != param.value.shape() {
                return Err(Error::shape_mismatch(
                    "optimizer",
                    format!("gradient of {:?} (was backward run?)", param.name),
                    format!("{:?}", param.value.shape()),
                    format!("{:?}", param.grad.shape()),
                ));
            }
            match self.kind {
                OptimizerKind::Sgd {
                    momentum,
                    weight_decay,
                } => {
                    let (momentum, decay) = (T::from_f64(momentum), T::from_f64(weight_decay));
                    Zip::from(&mut *param.value)
                        .and(param.grad)
                        .and(first)
                        .for_each(|theta, &grad, velocity| {
                            *velocity = momentum * *velocity + grad + decay * *theta;
                            *theta -= lr * *velocity;
                        });
                }
                OptimizerKind::Adam {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let t = self.steps.min(i32::MAX as u64) as i32;
                    let correction1 = T::from_f64(1.0 - beta1.powi(t));
                    let correction2 = T::from_f64(1.0 - beta2.powi(t));
                    let (beta1, beta2) = (T::from_f64(beta1), T::from_f64(beta2));
                    let (eps, decay) = (T::from_f64(eps), T::from_f64(weight_decay));
                    Zip::from(&mut *param.value)
                        .and(param.grad)
                        .and(first)
                        .and(second)
                        .for_each(|theta, &grad, m, s| {
                            let g = grad + decay * *theta;
                            *m = beta1 * *m + (T::one() - beta1) * g;
                            *s = beta2 * *s + (T::one() - beta2) * g * g;
                            *theta -= lr * (*m / correction1) / ((*s / correction2).sqrt() + eps);
                        });
                }
            }
        }
        Ok(())
    }
}

/// A learning-rate schedule over a known number of steps.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Half a cosine from the base rate down to 0 over `total_steps`, after a linear warm-up.
    Cosine { warmup_steps: u64, total_steps: u64 },
    /// The base rate times `factor` after every `every` steps.
    Step { every: u64, factor: f64 },
}

impl Schedule {
    /// The learning rate at `step` (counting from 0) for base rate `base`.
    pub fn rate(&self, base: f64, step: u64) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::Cosine {
                warmup_steps,
                total_steps,
            } => {
                if step < warmup_steps {
                    base * (step + 1) as f64 / warmup_steps as f64
                } else {
                    let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                    let progress = ((step - warmup_steps) as f64 / span).min(1.0);
                    0.5 * base * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
            Schedule::Step { every, factor } => base * factor.powf((step / every.max(1)) as f64),
        }
    }
}
