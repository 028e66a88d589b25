//! The agents: the router that picks an expert, and the experts that answer.
//!
//! Both take their model from a [`crate::registry::Slot`] per call and only
//! build prompts and interpret results; the engine runs the model.

pub mod expert;
pub mod router;

pub use expert::ExpertAgent;
pub use router::{ExpertScore, RouteDecision, RouterAgent};
