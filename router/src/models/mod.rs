//! Model slots and the registry: which loaded model serves each step
//! ([`slots`], in memory, atomically swappable), the versions on disk and
//! what each slot serves there ([`store`]), and the task a fine-tuned model
//! carries in its metadata ([`task`]).

pub mod slots;
pub mod store;
pub mod task;
