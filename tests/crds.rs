//! The committed CRDs and example manifests agree with the Rust types.

mod manifests;

use std::process::Command;

use manifests::{repo, strict};
use profiles_sync::crd::{SelectiveSync, WarehouseConnection, WarehouseType, all_crds, crd_yaml};
use serde_json::Value;

#[test]
fn committed_crds_are_not_stale() {
    for (file, crd) in all_crds() {
        let path = repo().join("crds").join(file);
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `make crds`", path.display()));
        assert!(
            committed == crd_yaml(&crd).unwrap(),
            "crds/{file} is stale: run `make crds` and commit the result"
        );
    }
}

#[test]
fn crdgen_prints_exactly_the_committed_crds() {
    let out = Command::new(env!("CARGO_BIN_EXE_profiles-sync"))
        .arg("crdgen")
        .output()
        .expect("run profiles-sync crdgen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut expected = String::new();
    for (file, _) in all_crds() {
        expected.push_str("---\n");
        expected.push_str(&std::fs::read_to_string(repo().join("crds").join(file)).unwrap());
    }
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
}

#[test]
fn every_warehouse_type_has_a_strictly_valid_example() {
    let dir = repo().join("deploy/examples");
    let mut types = vec![];
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut secret_names = vec![];
        let mut connection = None;
        for doc in yaml_serde::Deserializer::from_str(&text) {
            let doc: Value =
                serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
            match doc["kind"].as_str() {
                Some("Secret") => {
                    let s: k8s_openapi::api::core::v1::Secret = strict(&doc, &file);
                    secret_names.push((
                        s.metadata.name.clone().unwrap(),
                        s.string_data.unwrap_or_default(),
                    ));
                }
                Some("WarehouseConnection") => {
                    let c: WarehouseConnection = strict(&doc, &file);
                    c.validate_cel().unwrap_or_else(|e| panic!("{file}: {e}"));
                    connection = Some(c);
                }
                Some("SelectiveSync") => {
                    let s: SelectiveSync = strict(&doc, &file);
                    s.validate_cel().unwrap_or_else(|e| panic!("{file}: {e}"));
                    s.spec.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
                }
                other => panic!("{file}: unexpected kind {other:?}"),
            }
        }
        let c = connection.unwrap_or_else(|| panic!("{file} has no WarehouseConnection"));
        if let Some(secret_ref) = &c.spec.warehouse.credentials_secret_ref {
            let (_, data) = secret_names
                .iter()
                .find(|(n, _)| *n == secret_ref.name)
                .unwrap_or_else(|| {
                    panic!(
                        "{file}: the Secret {} is not in the example",
                        secret_ref.name
                    )
                });
            assert!(!data.is_empty(), "{file}: the Secret has no keys");
        }
        types.push(c.spec.warehouse.r#type);
    }
    for t in WarehouseType::ALL {
        assert!(
            types.contains(&t),
            "no example under deploy/examples for {t}"
        );
    }
}
