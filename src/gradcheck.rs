//! Gradient checking: the judge of every backward pass.
//!
//! A hand-derived backward pass is only as good as its agreement with the definition of a
//! derivative. [`check`] compares the tape's analytic gradients with central finite differences
//!
//! ```text
//! ∂f/∂θᵢ ≈ (f(θ + ε·eᵢ) − f(θ − ε·eᵢ)) / 2ε        error O(ε²) from truncation
//! ```
//!
//! of the scalar f(θ) = Σⱼ Rⱼ·yⱼ(θ), where y is the checked node's output and R a fixed random
//! weighting in [−1, 1). A random R (rather than a plain sum) makes the upstream gradient
//! non-uniform, so a backward pass that mixes up positions cannot pass by symmetry.
//!
//! Why f64: the finite difference subtracts two nearly equal numbers, losing about
//! |f|·ε_mach/ε of absolute accuracy. With f64 (ε_mach ≈ 1.1e-16) and ε = 1e-6 that is about
//! 1e-10·|f|, and truncation adds about ε² = 1e-12; in f32 (ε_mach ≈ 6e-8) the same
//! subtraction loses about 0.06·|f|, leaving at most one significant digit.
//!
//! The report gives, per checked tensor, the largest absolute error max|a − n| and the
//! **relative error** max|a − n| / max(max|a|, max|n|): the worst disagreement measured against
//! the tensor's largest gradient. (An element-wise ratio is meaningless for the many gradient
//! elements that are near 0, where the finite difference has an absolute noise floor.)
//!
//! Non-smooth ops (ReLU at 0, max-pool ties) have no derivative at their kinks; keep the checked
//! point at least ε away from them.

use crate::element::Element;
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use ndarray::{ArrayD, IxDyn};
use ndarray_rand::rand::{rngs::StdRng, SeedableRng};
use ndarray_rand::rand_distr::Uniform;
use ndarray_rand::RandomExt;

/// The agreement of one tensor's analytic gradient with its finite-difference estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorReport {
    /// The checked node's name.
    pub name: String,
    /// Number of elements (one pair of forward passes each).
    pub elements: usize,
    /// max over elements of |analytic − numeric|.
    pub max_abs_error: f64,
    /// max|analytic − numeric| / max(max|analytic|, max|numeric|); 0 when both are all zero.
    pub max_rel_error: f64,
    /// max|analytic|, to see the scale the errors are measured against.
    pub max_gradient: f64,
}

impl std::fmt::Display for TensorReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<24} {:>6} elements  max |grad| {:.3e}  abs err {:.3e}  rel err {:.3e}",
            self.name, self.elements, self.max_gradient, self.max_abs_error, self.max_rel_error
        )
    }
}

/// Compares the analytic gradients of f = Σ R⊙y(output) with respect to each node of `wrt`
/// (parameters, or inputs created with [`Graph::input_with_grad`]) with central differences of
/// step `eps`. `seed` fixes R. Before the checked backward pass, one forward and backward pass
/// on other values leaves every buffer stale (see `poison`); leaf gradients are then zeroed,
/// and every value is restored after.
pub fn check(
    graph: &mut Graph<f64>,
    output: NodeId,
    wrt: &[NodeId],
    eps: f64,
    seed: u64,
) -> Result<Vec<TensorReport>> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::invalid_config(
            "gradcheck",
            format!("eps must be a positive finite number, found {eps}"),
        ));
    }
    graph.forward(output)?;
    let shape = graph.value(output)?.shape().to_vec();
    let distribution =
        Uniform::new(-1.0, 1.0).map_err(|e| Error::invalid_config("gradcheck", e.to_string()))?;
    let weighting = ArrayD::random_using(
        IxDyn(&shape),
        distribution,
        &mut StdRng::seed_from_u64(seed),
    );
    let objective = |graph: &mut Graph<f64>| -> Result<f64> {
        graph.forward(output)?;
        Ok(graph
            .value(output)?
            .iter()
            .zip(&weighting)
            .map(|(y, r)| y * r)
            .sum())
    };

    poison(graph, output, wrt, seed)?;
    graph.zero_grad();
    graph.backward_from(output, weighting.view())?;
    let mut reports = Vec::with_capacity(wrt.len());
    for &id in wrt {
        let analytic = graph.grad(id)?.to_owned();
        let mut numeric = Vec::with_capacity(analytic.len());
        for element in 0..analytic.len() {
            let original = read(graph, id, element)?;
            write(graph, id, element, original + eps)?;
            let plus = objective(graph)?;
            write(graph, id, element, original - eps)?;
            let minus = objective(graph)?;
            write(graph, id, element, original)?;
            numeric.push((plus - minus) / (2.0 * eps));
        }
        reports.push(compare(graph.name(id)?, analytic.iter().copied(), &numeric));
    }
    graph.forward(output)?;
    Ok(reports)
}

/// Runs a forward and a backward pass on other values (every checked leaf scaled, another
/// upstream weighting), then restores the leaves and runs forward again. The checked pass then
/// finds every buffer holding a previous step's numbers, as in training: a backward that adds
/// into a stale gradient, or reads stale saved state, fails the check instead of passing it
/// on freshly zeroed buffers.
fn poison(graph: &mut Graph<f64>, output: NodeId, wrt: &[NodeId], seed: u64) -> Result<()> {
    let originals = wrt
        .iter()
        .map(|&id| Ok(graph.leaf_value_mut(id)?.to_owned()))
        .collect::<Result<Vec<_>>>()?;
    for &id in wrt {
        graph.leaf_value_mut(id)?.mapv_inplace(|v| 0.5 - 1.5 * v);
    }
    graph.forward(output)?;
    let shape = graph.value(output)?.raw_dim();
    let distribution =
        Uniform::new(2.0, 3.0).map_err(|e| Error::invalid_config("gradcheck", e.to_string()))?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let other_weighting = ArrayD::random_using(shape, distribution, &mut rng);
    graph.backward_from(output, other_weighting.view())?;
    for (&id, original) in wrt.iter().zip(originals) {
        graph.leaf_value_mut(id)?.assign(&original);
    }
    graph.forward(output)?;
    Ok(())
}

/// Builds the report of one tensor from its analytic and numeric gradients.
pub fn compare(
    name: &str,
    analytic: impl IntoIterator<Item = f64>,
    numeric: &[f64],
) -> TensorReport {
    let (mut max_abs_error, mut max_analytic, mut max_numeric) = (0.0f64, 0.0f64, 0.0f64);
    let mut elements = 0;
    for (a, &n) in analytic.into_iter().zip(numeric) {
        elements += 1;
        // NaN must fail the check, so it is carried by `max` explicitly.
        let error = (a - n).abs();
        max_abs_error = if error.is_nan() {
            f64::NAN
        } else {
            max_abs_error.max(error)
        };
        max_analytic = max_analytic.max(a.abs());
        max_numeric = max_numeric.max(n.abs());
    }
    let scale = max_analytic.max(max_numeric);
    let max_rel_error = if max_abs_error.is_nan() {
        f64::NAN
    } else if scale > 0.0 {
        max_abs_error / scale
    } else {
        0.0
    };
    TensorReport {
        name: name.to_string(),
        elements,
        max_abs_error,
        max_rel_error,
        max_gradient: max_analytic,
    }
}

fn read<T: Element>(graph: &mut Graph<T>, id: NodeId, element: usize) -> Result<T> {
    let value = graph.leaf_value_mut(id)?;
    value
        .iter()
        .nth(element)
        .copied()
        .ok_or_else(|| Error::graph("gradcheck: element out of range"))
}

fn write<T: Element>(graph: &mut Graph<T>, id: NodeId, element: usize, new: T) -> Result<()> {
    let mut value = graph.leaf_value_mut(id)?;
    let slot = value
        .iter_mut()
        .nth(element)
        .ok_or_else(|| Error::graph("gradcheck: element out of range"))?;
    *slot = new;
    Ok(())
}
