//! The `profilesync.dev/v1alpha1` custom resources: [`WarehouseConnection`] and [`SelectiveSync`].
//!
//! The Rust types are the source of truth; `profiles-sync crdgen` prints the CRDs generated from
//! them and the committed copies under `crds/` are checked against that output in tests.

mod connection;
mod schedule;
mod selective_sync;
mod warehouse;

pub use connection::*;
pub use schedule::{MIN_INTERVAL, Schedule, ScheduleError};
pub use selective_sync::*;
pub use warehouse::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every profiles-sync resource.
pub const GROUP: &str = "profilesync.dev";
/// The API version served and stored.
pub const VERSION: &str = "v1alpha1";
/// The `kubectl get` category that lists every profiles-sync resource (`kubectl get profilesync`).
pub const CATEGORY: &str = "profilesync";

/// Every CRD this operator owns, paired with the file name it is committed under in `crds/`.
pub fn all_crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("warehouseconnections.yaml", WarehouseConnection::crd()),
        ("selectivesyncs.yaml", SelectiveSync::crd()),
    ]
}

/// Renders a CRD as the YAML document committed under `crds/`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, yaml_serde::Error> {
    yaml_serde::to_string(crd)
}

#[cfg(test)]
mod tests;
