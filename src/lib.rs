//! profiles-sync: identity-resolved customer profiles, landed in your own warehouse.
//!
//! One crate, several roles (`profiles-sync <role>`); each role's code lives in its own module:
//! [`crd`] (the Kubernetes API types), [`cli`] (the command line).

pub mod cli;
pub mod crd;
