//! Kubernetes coordination: an `OSUpdate` custom resource ([`crd`]) tells the agents of the
//! selected nodes what to run.
//!
//! The host agent keeps owning download, staging, apply, boot counting and commit, and works
//! with the API server down; this module only gates the reboot.

pub mod crd;
