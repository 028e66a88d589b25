//! The flywheel's data: every request's record in the [`log`] (SQLite,
//! batched writer), [`feedback`] joined to it by request id, the training
//! cycles' [`journal`], and the text [`similarity`] that finds rephrasings
//! and near-duplicates.

pub mod feedback;
pub mod journal;
pub mod log;
pub mod similarity;
