//! Shared test support: real servers started for the tests, and fixtures.
// Each integration-test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod engine;
pub mod kube;
pub mod pg;
pub mod warehouse;
