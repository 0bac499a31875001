//! Build side of the format: bundle creation ([`writer`]), signing keys ([`keys`]) and
//! container image archives ([`oci`]).

pub mod delta;
pub mod keys;
pub mod oci;
pub mod writer;
