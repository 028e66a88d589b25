//! The agents: the router that picks an expert, and the experts that answer.
//!
//! Both take their model from a [`crate::models::slots::Slot`] per call and only
//! build prompts and interpret results; the engine runs the model.

pub mod expert;
pub mod routing;

pub use expert::ExpertAgent;
pub use routing::{ExpertScore, RouteDecision, RouterAgent};
