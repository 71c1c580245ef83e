//! profiles-sync: identity-resolved customer profiles, landed in your own warehouse.
//!
//! One crate, several roles (`profiles-sync <role>`); each concept has its own module:
//! [`crd`] (the Kubernetes API types), [`event`] (Segment messages), [`identity`] (identity
//! resolution), [`store`] (the profile store and its change feeds), [`sync`] (landing the feeds
//! in a warehouse), [`controller`] (the Kubernetes operator), [`cli`] (the command line).

pub mod cli;
pub mod controller;
pub mod crd;
pub mod demo;
pub mod engine;
pub mod event;
pub mod identity;
pub mod sample;
pub mod store;
pub mod sync;
pub mod warehouse;

// The tests' throwaway PostgreSQL server (`tests/support`), for the unit tests of both stores.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../tests/support/pg.rs"]
pub(crate) mod test_pg;
