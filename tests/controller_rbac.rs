//! The controller's ClusterRole allows every API call the controller makes
//! (`profiles_sync::controller::API_CALLS`), and nothing it lists is missing from the one place
//! the rules are written (the chart's `files/rbac/controller-clusterrole.yaml`, which
//! `deploy/base` includes).

use std::path::Path;

use profiles_sync::controller::API_CALLS;
use serde_json::Value;

const RULES: &str = "charts/profiles-sync/files/rbac/controller-clusterrole.yaml";

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_cluster_role_allows_every_call_the_controller_makes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(RULES);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let role: Value = yaml_serde::from_str(&text).expect("ClusterRole YAML");
    assert_eq!(role["kind"], "ClusterRole");
    assert_eq!(role["metadata"]["name"], "profiles-sync-controller");
    let rules = role["rules"].as_array().expect("rules");
    let allowed = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            let any = |list: Vec<String>, want: &str| list.iter().any(|x| x == want || x == "*");
            any(strings(&r["apiGroups"]), group)
                && any(strings(&r["resources"]), resource)
                && any(strings(&r["verbs"]), verb)
        })
    };
    let missing: Vec<String> = API_CALLS
        .iter()
        .filter(|(g, r, v)| !allowed(g, r, v))
        .map(|(g, r, v)| format!("{v} {r}.{g}"))
        .collect();
    assert!(missing.is_empty(), "{RULES} does not allow: {missing:?}");
}

#[test]
fn deploy_binds_that_role_to_the_controllers_service_account() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/controller-rbac.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs: Vec<Value> = yaml_serde::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
        .collect();
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .expect("a ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], "profiles-sync-controller");
}

/// The reverse: the ClusterRole grants nothing the controller does not call (a verb granted
/// for nothing is a privilege whoever takes the controller's token gets cluster-wide), and
/// it may replace and delete one Secret only, the engine token's.
#[test]
fn the_cluster_role_grants_nothing_the_controller_does_not_call() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(RULES);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let role: Value = yaml_serde::from_str(&text).expect("ClusterRole YAML");
    let mut extra = vec![];
    for rule in role["rules"].as_array().expect("rules") {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    if !API_CALLS
                        .iter()
                        .any(|(g, r, v)| *g == group && *r == resource && *v == verb)
                    {
                        extra.push(format!("{verb} {resource}.{group}"));
                    }
                    if resource == "secrets" && (verb == "update" || verb == "delete") {
                        assert_eq!(
                            strings(&rule["resourceNames"]),
                            [profiles_sync::controller::build::ENGINE_TOKEN_SECRET],
                            "Secrets are replaced and deleted by name only"
                        );
                    }
                }
            }
        }
    }
    assert!(
        extra.is_empty(),
        "{RULES} grants what the controller never calls: {extra:?}"
    );
}
