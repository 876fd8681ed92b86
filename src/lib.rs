//! # pointwise
//!
//! Train networks built from 1×1 (pointwise) convolutions, and see how they are trained.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod checkpoint;
pub mod data;
pub mod element;
pub mod error;
pub mod export;
pub mod gradcheck;
pub mod graph;
pub mod model;
pub mod ops;
pub mod optim;
pub mod train;

pub use element::Element;
pub use error::{Error, Result};
pub use graph::{Graph, NodeId};
pub use model::{Architecture, Model};
