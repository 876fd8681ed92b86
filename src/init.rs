//! Initial values of parameters, seeded: PyTorch's defaults and the classic schemes.
//!
//! A weight's fans come from its shape (out, in, k₁, k₂, …), as in PyTorch:
//! fan_in = in·k₁·k₂·…, fan_out = out·k₁·k₂·…. For a 1×1 or linear weight (out, in) they are
//! simply in and out.
//!
//! | scheme | distribution |
//! |---|---|
//! | [`kaiming_uniform`] (He), slope a | U(−b, b), b = √(6 / ((1 + a²)·fan_in)) |
//! | [`kaiming_normal`] (He) | N(0, 2 / fan_in) |
//! | [`xavier_uniform`] (Glorot) | U(−b, b), b = √(6 / (fan_in + fan_out)) |
//! | [`xavier_normal`] (Glorot) | N(0, 2 / (fan_in + fan_out)) |
//! | [`pytorch_weight`]: `nn.Conv2d` / `nn.Linear` | kaiming_uniform with a = √5, i.e. U(±1/√fan_in) |
//! | [`pytorch_bias`] | U(±1/√fan_in) of the layer's weight |
//!
//! Kaiming keeps the variance of activations constant through ReLU layers (the ReLU halves it,
//! the factor 2 restores it); Xavier keeps it constant through linear layers in both
//! directions.

use crate::element::Element;
use crate::error::{Error, Result};
use ndarray::{ArrayD, IxDyn};
use ndarray_rand::rand::rngs::StdRng;
use ndarray_rand::rand_distr::{Normal, Uniform};
use ndarray_rand::RandomExt;

/// (fan_in, fan_out) of a weight of shape (out, in, k₁, k₂, …); a 1-d shape has fan_in = its
/// length.
pub fn fans(shape: &[usize]) -> Result<(usize, usize)> {
    let receptive = shape
        .get(2..)
        .unwrap_or(&[])
        .iter()
        .try_fold(1usize, |p, &k| p.checked_mul(k));
    let (fan_in, fan_out) = match (shape, receptive) {
        ([length], _) => (Some(*length), Some(*length)),
        ([out, inputs, ..], Some(receptive)) => {
            (inputs.checked_mul(receptive), out.checked_mul(receptive))
        }
        _ => (None, None),
    };
    match (fan_in, fan_out) {
        (Some(fan_in), Some(fan_out)) if fan_in > 0 && fan_out > 0 => Ok((fan_in, fan_out)),
        _ => Err(Error::invalid_shape(
            "init",
            "a weight needs non-zero (out, in, ...) sizes",
            shape,
        )),
    }
}

/// U(−bound, bound) of `shape`.
pub fn uniform<T: Element>(shape: &[usize], bound: f64, rng: &mut StdRng) -> Result<ArrayD<T>> {
    let distribution = Uniform::new_inclusive(-bound, bound)
        .map_err(|e| Error::invalid_config("init", format!("uniform bound {bound}: {e}")))?;
    Ok(ArrayD::random_using(IxDyn(shape), distribution, rng).mapv(T::from_f64))
}

/// N(0, std²) of `shape`.
pub fn normal<T: Element>(shape: &[usize], std: f64, rng: &mut StdRng) -> Result<ArrayD<T>> {
    let distribution = Normal::new(0.0, std)
        .map_err(|e| Error::invalid_config("init", format!("normal std {std}: {e}")))?;
    Ok(ArrayD::random_using(IxDyn(shape), distribution, rng).mapv(T::from_f64))
}

/// He uniform with negative slope `a` (0 for a ReLU).
pub fn kaiming_uniform<T: Element>(shape: &[usize], a: f64, rng: &mut StdRng) -> Result<ArrayD<T>> {
    let (fan_in, _) = fans(shape)?;
    uniform(shape, (6.0 / ((1.0 + a * a) * fan_in as f64)).sqrt(), rng)
}

/// He normal: N(0, 2 / fan_in).
pub fn kaiming_normal<T: Element>(shape: &[usize], rng: &mut StdRng) -> Result<ArrayD<T>> {
    let (fan_in, _) = fans(shape)?;
    normal(shape, (2.0 / fan_in as f64).sqrt(), rng)
}

/// Glorot uniform: U(±√(6 / (fan_in + fan_out))).
pub fn xavier_uniform<T: Element>(shape: &[usize], rng: &mut StdRng) -> Result<ArrayD<T>> {
    let (fan_in, fan_out) = fans(shape)?;
    uniform(shape, (6.0 / (fan_in + fan_out) as f64).sqrt(), rng)
}

/// Glorot normal: N(0, 2 / (fan_in + fan_out)).
pub fn xavier_normal<T: Element>(shape: &[usize], rng: &mut StdRng) -> Result<ArrayD<T>> {
    let (fan_in, fan_out) = fans(shape)?;
    normal(shape, (2.0 / (fan_in + fan_out) as f64).sqrt(), rng)
}

/// PyTorch's default weight of `nn.Conv2d` and `nn.Linear`: Kaiming uniform with a = √5,
/// which is U(±1/√fan_in).
pub fn pytorch_weight<T: Element>(shape: &[usize], rng: &mut StdRng) -> Result<ArrayD<T>> {
    kaiming_uniform(shape, 5f64.sqrt(), rng)
}

/// PyTorch's default bias of `nn.Conv2d` and `nn.Linear`: U(±1/√fan_in), fan_in being the
/// layer's weight's.
pub fn pytorch_bias<T: Element>(weight_shape: &[usize], rng: &mut StdRng) -> Result<ArrayD<T>> {
    let (fan_in, _) = fans(weight_shape)?;
    uniform(&weight_shape[..1], 1.0 / (fan_in as f64).sqrt(), rng)
}

/// LeCun normal: N(0, 1 / fan_in), Kaiming's variance argument without the ReLU's factor 2
/// (for a layer followed by no ReLU, such as a classifier head).
pub fn lecun_normal<T: Element>(shape: &[usize], rng: &mut StdRng) -> Result<ArrayD<T>> {
    let (fan_in, _) = fans(shape)?;
    normal(shape, (1.0 / fan_in as f64).sqrt(), rng)
}

/// How [`crate::layers::Layers`] initialises the weight and bias of the layers it creates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightInit {
    /// PyTorch's defaults: [`pytorch_weight`] and [`pytorch_bias`].
    #[default]
    PyTorch,
    /// [`kaiming_normal`] weights, zero biases (layers followed by a ReLU).
    KaimingNormal,
    /// [`lecun_normal`] weights, zero biases.
    LeCunNormal,
    /// [`xavier_uniform`] weights, zero biases.
    XavierUniform,
}

impl WeightInit {
    /// A weight of `shape` and, if wanted, its bias.
    pub fn weight_and_bias<T: Element>(
        self,
        shape: &[usize],
        bias: bool,
        rng: &mut StdRng,
    ) -> Result<(ArrayD<T>, Option<ArrayD<T>>)> {
        let weight = match self {
            WeightInit::PyTorch => pytorch_weight(shape, rng)?,
            WeightInit::KaimingNormal => kaiming_normal(shape, rng)?,
            WeightInit::LeCunNormal => lecun_normal(shape, rng)?,
            WeightInit::XavierUniform => xavier_uniform(shape, rng)?,
        };
        let bias = match (bias, self) {
            (false, _) => None,
            (true, WeightInit::PyTorch) => Some(pytorch_bias(shape, rng)?),
            (true, _) => Some(zeros(&shape[..1])),
        };
        Ok((weight, bias))
    }
}

/// Zeros of `shape`.
pub fn zeros<T: Element>(shape: &[usize]) -> ArrayD<T> {
    ArrayD::zeros(IxDyn(shape))
}

/// Ones of `shape`.
pub fn ones<T: Element>(shape: &[usize]) -> ArrayD<T> {
    ArrayD::ones(IxDyn(shape))
}
