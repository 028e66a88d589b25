//! Candidates tried on live traffic: [`shadow`] mirrors a sample of requests
//! to a candidate without answering from it; [`split`] answers a share of
//! traffic from each version of an A/B split.

pub mod shadow;
pub mod split;
