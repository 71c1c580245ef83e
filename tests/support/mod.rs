//! Shared test support: real servers started for the tests, and fixtures.
// Each integration-test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod engine;
pub mod pg;
pub mod warehouse;

use std::time::{Duration, Instant};

/// Polls `f` until it returns `Ok`, at most `timeout`; panics with `what` and the last
/// observation otherwise. The pause between polls only spaces the polls out.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
