//! Parameter updates: SGD with momentum and weight decay, Adam, and learning-rate schedules.
//!
//! An optimizer walks the graph's parameters in creation order ([`Graph::params_mut`]) and keeps
//! one state buffer per parameter, allocated on the first step and reused after. Frozen
//! parameters ([`Graph::set_trainable`]) are left alone. [`ParamGroup`]s give some parameters
//! their own learning-rate factor and weight decay, as PyTorch's parameter groups do.
//!
//! A step is all or nothing: every gradient is checked, and every new value computed and
//! checked finite, before any parameter or state changes.
//!
//! ```text
//! SGD:   g ← ∇ + λ·θ          v ← μ·v + g           θ ← θ − η·v
//! Adam:  g ← ∇ + λ·θ          m ← β₁·m + (1−β₁)·g   s ← β₂·s + (1−β₂)·g²
//!        θ ← θ − η·m̂ / (√ŝ + ε)     with m̂ = m/(1−β₁ᵗ), ŝ = s/(1−β₂ᵗ)
//! ```
//! Weight decay is the plain L2 form (added to the gradient), as in PyTorch's `SGD` and `Adam`.

use crate::element::Element;
use crate::error::{printable, Error, Result};
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

    /// Checks the hyper-parameters, both as given and as the element type `T` will hold them
    /// (ε = 1e-50 is positive in f64 and 0 in f32).
    fn validate<T: Element>(&self) -> Result<()> {
        let representable = |v: f64, nonzero: bool| {
            let held = T::from_f64(v);
            held.is_finite() && (!nonzero || held != T::zero())
        };
        let below_one = |v: f64| T::from_f64(v) < T::one();
        let ok = match *self {
            OptimizerKind::Sgd {
                momentum,
                weight_decay,
            } => {
                (0.0..1.0).contains(&momentum)
                    && below_one(momentum)
                    && weight_decay >= 0.0
                    && representable(weight_decay, false)
            }
            OptimizerKind::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                (0.0..1.0).contains(&beta1)
                    && (0.0..1.0).contains(&beta2)
                    && below_one(beta1)
                    && below_one(beta2)
                    && eps > 0.0
                    && representable(eps, true)
                    && weight_decay >= 0.0
                    && representable(weight_decay, false)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(Error::invalid_config(
                "optimizer",
                format!(
                    "hyper-parameters out of range (or not representable in {}): {self:?}",
                    std::any::type_name::<T>()
                ),
            ))
        }
    }
}

/// Parameters that train with their own learning-rate factor and weight decay.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ParamGroup {
    /// The parameters of the group: names, or patterns where `*` matches any run of characters
    /// (`"head.*"`, `"*.bias"`). A parameter belongs to the first group that matches it.
    pub patterns: Vec<String>,
    /// Multiplies the scheduled learning rate (1 for the rate itself).
    pub lr_scale: f64,
    /// Replaces the optimizer's weight decay; `None` keeps it.
    pub weight_decay: Option<f64>,
}

impl ParamGroup {
    fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|pattern| glob(pattern, name))
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&at| tail.is_char_boundary(at))
                .any(|at| glob(rest, &tail[at..]))
        }
    }
}

/// An optimizer with its per-parameter state.
#[derive(Clone, Debug)]
pub struct Optimizer<T> {
    kind: OptimizerKind,
    groups: Vec<ParamGroup>,
    /// Per parameter: (learning-rate factor, weight decay), from its group.
    settings: Vec<(T, T)>,
    /// SGD: the velocity v. Adam: the first moment m.
    first: Vec<ArrayD<T>>,
    /// Adam: the second moment s.
    second: Vec<ArrayD<T>>,
    steps: u64,
}

/// The state an optimizer carries from step to step: what a training checkpoint saves.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState<T> {
    pub steps: u64,
    /// Per parameter, in creation order: SGD's velocity or Adam's first moment.
    pub first: Vec<ArrayD<T>>,
    /// Adam's second moment (zeros for SGD).
    pub second: Vec<ArrayD<T>>,
}

impl<T: Element> Optimizer<T> {
    /// A fresh optimizer (no state yet).
    pub fn new(kind: OptimizerKind) -> Result<Self> {
        Optimizer::with_groups(kind, Vec::new())
    }

    /// A fresh optimizer whose `groups` train with their own settings; the other parameters
    /// with `kind`'s.
    pub fn with_groups(kind: OptimizerKind, groups: Vec<ParamGroup>) -> Result<Self> {
        kind.validate::<T>()?;
        for group in &groups {
            let decay = group.weight_decay.unwrap_or(0.0);
            let held = [T::from_f64(group.lr_scale), T::from_f64(decay)];
            if !(group.lr_scale >= 0.0 && decay >= 0.0 && held.iter().all(|v| v.is_finite())) {
                return Err(Error::invalid_config(
                    "optimizer",
                    format!("parameter group settings out of range: {group:?}"),
                ));
            }
        }
        Ok(Optimizer {
            kind,
            groups,
            settings: Vec::new(),
            first: Vec::new(),
            second: Vec::new(),
            steps: 0,
        })
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// A copy of the state (empty buffers before the first step).
    pub fn state(&self) -> OptimizerState<T> {
        OptimizerState {
            steps: self.steps,
            first: self.first.clone(),
            second: self.second.clone(),
        }
    }

    /// Restores a state saved by [`Optimizer::state`] (shapes are checked on the next step).
    pub fn set_state(&mut self, state: OptimizerState<T>) -> Result<()> {
        if state.first.len() != state.second.len() {
            return Err(Error::invalid_config(
                "optimizer",
                "the state's first and second moments differ in count",
            ));
        }
        self.steps = state.steps;
        self.first = state.first;
        self.second = state.second;
        self.settings.clear();
        Ok(())
    }

    /// Applies one update with learning rate `lr` to every trainable parameter of `graph`,
    /// from the gradients its last backward pass accumulated. On error nothing has changed.
    pub fn step(&mut self, graph: &mut Graph<T>, lr: f64) -> Result<()> {
        let rate = T::from_f64(lr);
        if !(lr.is_finite() && lr >= 0.0 && rate.is_finite() && (lr == 0.0 || rate > T::zero())) {
            return Err(Error::invalid_config(
                "optimizer",
                format!(
                    "learning rate must be finite and ≥ 0 (and not round to 0 in {}), found {lr}",
                    std::any::type_name::<T>()
                ),
            ));
        }
        self.prepare(graph)?;
        let t = (self.steps + 1).min(i32::MAX as u64) as i32;
        let rule = Rule::new(self.kind, t);
        // First pass: every new value is computed and checked, nothing is written.
        for (index, param) in graph.params_mut().enumerate() {
            if !param.trainable {
                continue;
            }
            let (scale, decay) = self.settings[index];
            let (first, second) = (&self.first[index], &self.second[index]);
            let bad = Zip::from(&*param.value)
                .and(param.grad)
                .and(first)
                .and(second)
                .fold(None, |bad, &theta, &grad, &m, &s| {
                    let (theta, ..) = rule.update(theta, grad, m, s, rate * scale, decay);
                    bad.or((!theta.is_finite()).then_some(theta))
                });
            if let Some(value) = bad {
                return Err(Error::non_finite(format!(
                    "the update of parameter {} (a value {}): no parameter was changed",
                    printable(param.name),
                    value.as_f64()
                )));
            }
        }
        for (index, param) in graph.params_mut().enumerate() {
            if !param.trainable {
                continue;
            }
            let (scale, decay) = self.settings[index];
            Zip::from(&mut *param.value)
                .and(param.grad)
                .and(&mut self.first[index])
                .and(&mut self.second[index])
                .for_each(|theta, &grad, m, s| {
                    (*theta, *m, *s) = rule.update(*theta, grad, *m, *s, rate * scale, decay);
                });
        }
        self.steps += 1;
        Ok(())
    }

    /// Allocates the state on the first step (the steady state allocates nothing), resolves
    /// each parameter's group once, and checks every trainable parameter's gradient.
    fn prepare(&mut self, graph: &mut Graph<T>) -> Result<()> {
        let count = graph.params_mut().count();
        if self.first.len() != count {
            if self.first.is_empty() {
                self.first = graph
                    .params_mut()
                    .map(|p| ArrayD::zeros(IxDyn(p.value.shape())))
                    .collect();
                self.second = self.first.clone();
            } else {
                return Err(Error::invalid_config(
                    "optimizer",
                    format!(
                        "the state holds {} parameters, the graph has {count}",
                        self.first.len()
                    ),
                ));
            }
        }
        if self.settings.len() != count {
            let base_decay = match self.kind {
                OptimizerKind::Sgd { weight_decay, .. }
                | OptimizerKind::Adam { weight_decay, .. } => weight_decay,
            };
            self.settings = graph
                .params_mut()
                .map(|p| {
                    let group = self.groups.iter().find(|g| g.matches(p.name));
                    let scale = group.map_or(1.0, |g| g.lr_scale);
                    let decay = group.and_then(|g| g.weight_decay).unwrap_or(base_decay);
                    (T::from_f64(scale), T::from_f64(decay))
                })
                .collect();
        }
        for (index, param) in graph.params_mut().enumerate() {
            let shape = param.value.shape();
            let state = [self.first[index].shape(), self.second[index].shape()];
            if state.iter().any(|s| *s != shape) {
                return Err(Error::shape_mismatch(
                    "optimizer",
                    format!("saved state of {}", printable(param.name)),
                    format!("{shape:?}"),
                    format!("{:?}", state[0]),
                ));
            }
            if param.trainable && param.grad.shape() != shape {
                return Err(Error::graph(format!(
                    "parameter {} has no gradient: run backward first, or, if the loss does \
                     not depend on it, freeze it (Graph::set_trainable)",
                    printable(param.name)
                )));
            }
        }
        Ok(())
    }
}

/// One update rule with its constants converted to the element type.
#[derive(Clone, Copy)]
enum Rule<T> {
    Sgd {
        momentum: T,
    },
    Adam {
        beta1: T,
        beta2: T,
        eps: T,
        correction1: T,
        correction2: T,
    },
}

impl<T: Element> Rule<T> {
    /// The rule at step `t` (from 1: Adam's bias corrections).
    fn new(kind: OptimizerKind, t: i32) -> Self {
        match kind {
            OptimizerKind::Sgd { momentum, .. } => Rule::Sgd {
                momentum: T::from_f64(momentum),
            },
            OptimizerKind::Adam {
                beta1, beta2, eps, ..
            } => Rule::Adam {
                beta1: T::from_f64(beta1),
                beta2: T::from_f64(beta2),
                eps: T::from_f64(eps),
                correction1: T::from_f64(1.0 - beta1.powi(t)),
                correction2: T::from_f64(1.0 - beta2.powi(t)),
            },
        }
    }

    /// (θ, m, s) after one step with learning rate `lr` and weight decay `decay`.
    #[inline(always)]
    fn update(self, theta: T, grad: T, m: T, s: T, lr: T, decay: T) -> (T, T, T) {
        let g = grad + decay * theta;
        match self {
            Rule::Sgd { momentum } => {
                let v = momentum * m + g;
                (theta - lr * v, v, s)
            }
            Rule::Adam {
                beta1,
                beta2,
                eps,
                correction1,
                correction2,
            } => {
                let m = beta1 * m + (T::one() - beta1) * g;
                let s = beta2 * s + (T::one() - beta2) * g * g;
                let theta = theta - lr * (m / correction1) / ((s / correction2).sqrt() + eps);
                (theta, m, s)
            }
        }
    }
}

/// A learning-rate schedule: an optional linear warm-up, then a decay.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// Steps over which the rate climbs linearly from base/warmup_steps to the base rate.
    pub warmup_steps: u64,
    pub decay: Decay,
}

/// What the rate does after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Decay {
    /// The base rate throughout.
    Constant,
    /// Half a cosine from the base rate down to 0 at `total_steps` (counted from the start,
    /// warm-up included).
    Cosine { total_steps: u64 },
    /// The base rate times `factor` after every `every` steps.
    Step { every: u64, factor: f64 },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::constant()
    }
}

impl Schedule {
    /// The base rate at every step.
    pub fn constant() -> Self {
        Schedule {
            warmup_steps: 0,
            decay: Decay::Constant,
        }
    }

    /// Cosine decay to 0 at `total_steps`.
    pub fn cosine(total_steps: u64) -> Self {
        Schedule {
            warmup_steps: 0,
            decay: Decay::Cosine { total_steps },
        }
    }

    /// Step decay: × `factor` every `every` steps.
    pub fn step(every: u64, factor: f64) -> Self {
        Schedule {
            warmup_steps: 0,
            decay: Decay::Step { every, factor },
        }
    }

    /// The same schedule after a linear warm-up over `steps` steps.
    pub fn with_warmup(self, steps: u64) -> Self {
        Schedule {
            warmup_steps: steps,
            ..self
        }
    }

    /// Checks the settings: a step decay needs `every` ≥ 1 and a finite factor ≥ 0.
    pub fn validate(&self) -> Result<()> {
        if let Decay::Step { every, factor } = self.decay {
            if every == 0 || !(factor.is_finite() && factor >= 0.0) {
                return Err(Error::invalid_config(
                    "schedule",
                    format!("a step decay needs every ≥ 1 and a finite factor ≥ 0: {self:?}"),
                ));
            }
        }
        Ok(())
    }

    /// The learning rate at `step` (counting from 0) for base rate `base`.
    pub fn rate(&self, base: f64, step: u64) -> f64 {
        let warmup = self.warmup_steps;
        if step < warmup {
            return base * (step + 1) as f64 / warmup as f64;
        }
        let after = step - warmup;
        match self.decay {
            Decay::Constant => base,
            Decay::Cosine { total_steps } => {
                let span = total_steps.saturating_sub(warmup).max(1) as f64;
                let progress = (after as f64 / span).min(1.0);
                0.5 * base * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Decay::Step { every, factor } => {
                let drops = (after / every.max(1)).min(i32::MAX as u64) as i32;
                base * factor.powi(drops)
            }
        }
    }
}
