//! Build side of the format: bundle creation ([`writer`]) and signing keys ([`keys`]).

pub mod delta;
pub mod keys;
pub mod writer;
