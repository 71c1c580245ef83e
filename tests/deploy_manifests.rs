//! deploy/: the kustomize install (`kubectl apply -k deploy/`) renders offline with
//! `kubectl kustomize`, every object reads strictly with its type, and it applies to the
//! emulated API server of tests/kmock, after which the examples in deploy/examples apply too.
//! It installs what the Helm chart's defaults install (rendered by Helm's engine,
//! tests/manifests/helm.rs): the same objects, RBAC rules and images.

mod manifests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use manifests::helm;
use manifests::kmock::ApiServer;
use manifests::{
    IMAGE, Object, assert_pod_is_restricted, expected_controller_rules, kind_name, kinds,
    kustomize, parse_strictly, repo, yaml_docs,
};
use profiles_sync::engine::sources::Sources;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

fn rendered() -> Vec<Value> {
    yaml_docs(&kustomize(&deploy_dir()), "kubectl kustomize deploy/")
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn kustomizations() -> Vec<PathBuf> {
    files_under(&deploy_dir())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .collect()
}

#[test]
fn deploy_renders_offline_and_every_object_reads_strictly() {
    let docs = rendered();
    let mut seen = BTreeSet::new();
    for doc in &docs {
        assert!(seen.insert(kind_name(doc)), "{:?} twice", kind_name(doc));
        let object = parse_strictly(doc, "deploy/");
        let namespace = doc["metadata"]["namespace"].as_str();
        match object {
            Object::Crd(_)
            | Object::ClusterRole(_)
            | Object::ClusterRoleBinding(_)
            | Object::Namespace(_) => {
                assert_eq!(namespace, None, "{:?} is cluster-scoped", kind_name(doc))
            }
            Object::WarehouseConnection(_) | Object::SelectiveSync(_) => {
                panic!(
                    "deploy/examples is not part of the install: {:?}",
                    kind_name(doc)
                )
            }
            _ => assert_eq!(namespace, Some("profiles-sync"), "{:?}", kind_name(doc)),
        }
        if let Some(template) = object.pod_template() {
            assert_pod_is_restricted(template, &format!("deploy/ {:?}", kind_name(doc)));
        }
    }
    let kinds_installed: BTreeSet<&str> =
        docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceAccount",
        "Secret",
        "Service",
        "Deployment",
        "StatefulSet",
    ] {
        assert!(
            kinds_installed.contains(kind),
            "deploy/ installs no {kind}: {:?}",
            kinds(&docs)
        );
    }
}

#[test]
fn every_kustomization_under_deploy_renders() {
    let found = kustomizations();
    assert!(found.len() >= 2, "{found:?}");
    for file in found {
        let dir = file.parent().unwrap();
        for doc in yaml_docs(&kustomize(dir), &dir.display().to_string()) {
            parse_strictly(&doc, &dir.display().to_string());
        }
    }
}

/// Paths (relative to their kustomization) that kustomization.yaml files use as resources or
/// generator inputs.
fn referenced_files() -> BTreeSet<PathBuf> {
    let mut used = BTreeSet::new();
    for file in kustomizations() {
        let dir = file.parent().unwrap();
        let k: Value =
            yaml_docs(&std::fs::read_to_string(&file).unwrap(), "kustomization").remove(0);
        for r in k["resources"].as_array().into_iter().flatten() {
            used.insert(dir.join(r.as_str().unwrap()));
        }
        for generator in k["secretGenerator"].as_array().into_iter().flatten() {
            for f in generator["files"].as_array().into_iter().flatten() {
                let f = f.as_str().unwrap();
                used.insert(dir.join(f.split_once('=').map_or(f, |(_, path)| path)));
            }
        }
    }
    used
}

#[test]
fn every_file_under_deploy_is_part_of_the_install_or_an_example() {
    let used = referenced_files();
    let examples = deploy_dir().join("examples");
    for file in files_under(&deploy_dir()) {
        if file.starts_with(&examples)
            || file.file_name().is_some_and(|n| n == "kustomization.yaml")
        {
            continue;
        }
        assert!(
            used.contains(&file),
            "{} is not used by any kustomization under deploy/",
            file.display()
        );
    }
    // The examples are what users apply afterwards, each read strictly with the CRD types.
    let mut connections = 0;
    for file in files_under(&examples) {
        for doc in yaml_docs(
            &std::fs::read_to_string(&file).unwrap(),
            &file.display().to_string(),
        ) {
            if let Object::WarehouseConnection(_) =
                parse_strictly(&doc, &file.display().to_string())
            {
                connections += 1;
            }
        }
    }
    assert!(
        connections >= 7,
        "one WarehouseConnection per warehouse type"
    );
}

#[test]
fn the_generated_secrets_are_marked_placeholders_that_the_pods_mount() {
    let docs = rendered();
    let secrets: Vec<_> = docs
        .iter()
        .filter_map(|d| match parse_strictly(d, "deploy/") {
            Object::Secret(s) => Some(s),
            _ => None,
        })
        .collect();
    let names: BTreeSet<String> = secrets
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    let value = |prefix: &str, key: &str| -> String {
        let s = secrets
            .iter()
            .find(|s| {
                s.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .unwrap_or_else(|| panic!("no Secret {prefix}-*: {names:?}"));
        String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap()
    };
    // The engine refuses the published placeholders until they are replaced, and takes the
    // file once they are.
    let sources_text = value("profiles-sync-sources", "sources.yaml");
    let refused = Sources::from_yaml(&sources_text)
        .expect_err("the engine refuses the placeholder write key")
        .to_string();
    assert!(
        refused.contains("CHANGE-ME") && refused.contains("\"default\""),
        "{refused}"
    );
    let replaced = sources_text.replace("CHANGE-ME-write-key", "k-3f9a7c");
    let sources = Sources::from_yaml(&replaced).expect("the engine accepts the sources file");
    assert_eq!(
        sources.by_write_key("k-3f9a7c").map(|s| s.id.as_str()),
        Some("default")
    );
    assert!(value("profiles-sync-feed-token", "token").starts_with("CHANGE-ME"));

    // Every Secret a pod mounts is one that the install creates (kustomize rewrote the names).
    let mut mounted = BTreeSet::new();
    for doc in &docs {
        let object = parse_strictly(doc, "deploy/");
        let Some(template) = object.pod_template() else {
            continue;
        };
        for volume in template.spec.as_ref().unwrap().volumes.iter().flatten() {
            if let Some(secret) = &volume.secret {
                let name = secret.secret_name.clone().unwrap();
                assert!(
                    names.contains(&name),
                    "{:?} mounts the Secret {name}, which is not installed",
                    kind_name(doc)
                );
                mounted.insert(name);
            }
        }
    }
    assert_eq!(mounted, names, "every generated Secret is used");
}

#[test]
fn deploy_and_the_examples_apply_to_an_emulated_api_server() {
    let no_crds = tempfile::tempdir().unwrap();
    let server = ApiServer::start(&[no_crds.path()]);
    let deploy = deploy_dir();
    let deploy = deploy.to_str().unwrap();
    let objects = rendered().len();

    // A fresh cluster: the namespace does not exist yet, so only the client-side dry run can
    // see the whole install before it is applied.
    let out = server.kubectl_ok(&["apply", "-k", deploy, "--dry-run=client"]);
    assert_eq!(out.lines().count(), objects, "{out}");
    let out = server.kubectl_ok(&["apply", "-k", deploy]);
    assert_eq!(
        out.lines().filter(|l| l.ends_with(" created")).count(),
        objects,
        "{out}"
    );
    let out = server.kubectl_ok(&["apply", "-k", deploy, "--dry-run=server"]);
    assert_eq!(out.lines().count(), objects, "{out}");
    let listed = server.kubectl_ok(&[
        "get",
        "statefulsets,deployments",
        "-n",
        "profiles-sync",
        "-o",
        "name",
    ]);
    assert_eq!(
        listed.lines().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "statefulset.apps/profiles-sync-engine",
            "deployment.apps/profiles-sync-controller"
        ])
    );

    // The CRDs it installed serve the examples (the server rejects unknown fields).
    let examples = files_under(&repo().join("deploy/examples"));
    for file in &examples {
        let file = file.to_str().unwrap();
        server.kubectl_ok(&["apply", "-n", "default", "-f", file, "--dry-run=server"]);
        server.kubectl_ok(&["apply", "-n", "default", "-f", file]);
    }
    let connections = server.kubectl_ok(&["get", "whc", "-n", "default", "-o", "name"]);
    assert_eq!(connections.lines().count(), examples.len(), "{connections}");
}

/// The README's uninstall that keeps the store: `kubectl delete -k deploy/` with the instance's
/// label deletes the workloads, RBAC and Secrets but not the Namespace (whose deletion would take
/// the store's claim with it) nor the CRDs, as `helm uninstall` does.
#[test]
fn uninstalling_by_the_instance_label_keeps_the_namespace_and_the_crds() {
    let no_crds = tempfile::tempdir().unwrap();
    let server = ApiServer::start(&[no_crds.path()]);
    let deploy = deploy_dir();
    let deploy = deploy.to_str().unwrap();
    server.kubectl_ok(&["apply", "-k", deploy]);
    let out = server.kubectl_ok(&[
        "delete",
        "-k",
        deploy,
        "-l",
        "app.kubernetes.io/instance=profiles-sync",
    ]);
    let deleted: BTreeSet<&str> = out.lines().filter(|l| l.ends_with(" deleted")).collect();
    let labelled = rendered()
        .iter()
        .filter(|d| d["metadata"]["labels"]["app.kubernetes.io/instance"] == "profiles-sync")
        .count();
    assert_eq!(deleted.len(), labelled, "{out}");
    assert!(
        deleted.iter().any(|l| l.starts_with("statefulset.apps ")),
        "{out}"
    );
    let kept = server.kubectl_ok(&["get", "namespace,crd", "-o", "name"]);
    for name in [
        "namespace/profiles-sync",
        "customresourcedefinition.apiextensions.k8s.io/warehouseconnections.profilesync.dev",
        "customresourcedefinition.apiextensions.k8s.io/selectivesyncs.profilesync.dev",
    ] {
        assert!(kept.lines().any(|l| l == name), "{name} not kept: {kept}");
    }
    let left = server.kubectl_ok(&[
        "get",
        "statefulsets,deployments,secrets",
        "-n",
        "profiles-sync",
        "-o",
        "name",
    ]);
    assert_eq!(left.trim(), "", "{left}");
}

/// Drops what only one install method writes: Helm's labels and annotations, the checksums that
/// roll pods on a values change, Secret values (generated vs placeholders), kustomize's name
/// hashes on generated Secrets and its number formatting.
fn comparable(mut doc: Value, renames: &BTreeMap<String, String>) -> Value {
    fn strip(meta: &mut Value, labels: &[&str], annotation_prefixes: &[&str]) {
        let Some(meta) = meta.as_object_mut() else {
            return;
        };
        for (field, drop) in [("labels", labels.to_vec()), ("annotations", vec![])] {
            if let Some(map) = meta.get_mut(field).and_then(Value::as_object_mut) {
                map.retain(|k, _| !drop.contains(&k.as_str()));
                if field == "annotations" {
                    map.retain(|k, _| !annotation_prefixes.iter().any(|p| k.starts_with(p)));
                }
                if map.is_empty() {
                    meta.remove(field);
                }
            }
        }
    }
    fn rename(v: &mut Value, renames: &BTreeMap<String, String>) {
        match v {
            Value::String(s) => {
                if let Some(new) = renames.get(s.as_str()) {
                    *s = new.clone();
                }
            }
            // kustomize rewrites 5000.0 as 5000: compare numbers by value.
            Value::Number(n) => *v = Value::from(n.as_f64()),
            Value::Array(a) => a.iter_mut().for_each(|v| rename(v, renames)),
            Value::Object(o) => o.values_mut().for_each(|v| rename(v, renames)),
            _ => {}
        }
    }
    const HELM_LABELS: &[&str] = &[
        "helm.sh/chart",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/version",
    ];
    strip(&mut doc["metadata"], HELM_LABELS, &["helm.sh/"]);
    if doc["spec"]["template"].is_object() {
        strip(
            &mut doc["spec"]["template"]["metadata"],
            &[],
            &["checksum/"],
        );
    }
    if doc["kind"] == "Secret"
        && let Some(data) = doc["data"].as_object_mut()
    {
        data.values_mut().for_each(|v| *v = Value::Null);
    }
    rename(&mut doc, renames);
    doc
}

#[test]
fn the_chart_defaults_and_deploy_install_the_same_objects() {
    let chart = helm::rendered("defaults").docs();
    let deploy = yaml_docs(&kustomize(&repo().join("deploy")), "deploy/");
    // kustomize's secretGenerator names: <name>-<hash>.
    let chart_secrets: Vec<String> = chart
        .iter()
        .filter(|d| d["kind"] == "Secret")
        .map(|d| kind_name(d).1)
        .collect();
    let mut renames = BTreeMap::new();
    for d in deploy.iter().filter(|d| d["kind"] == "Secret") {
        let hashed = kind_name(d).1;
        let base = chart_secrets
            .iter()
            .find(|base| {
                hashed
                    .strip_prefix(&format!("{base}-"))
                    .is_some_and(|h| h.len() == 10)
            })
            .unwrap_or_else(|| {
                panic!("deploy/ Secret {hashed} is not one of the chart's {chart_secrets:?}")
            });
        renames.insert(hashed, base.clone());
    }
    let index = |docs: &[Value]| -> BTreeMap<(String, String), Value> {
        docs.iter()
            .map(|d| {
                let d = comparable(d.clone(), &renames);
                (kind_name(&d), d)
            })
            .collect()
    };
    let (chart, mut deploy) = (index(&chart), index(&deploy));
    // Helm installs into a namespace it is given; deploy/ creates its own.
    let namespace = deploy
        .remove(&("Namespace".to_string(), "profiles-sync".to_string()))
        .expect("deploy/ creates the namespace profiles-sync");
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        deploy.keys().collect::<Vec<_>>(),
        "the chart's defaults and deploy/ install different objects"
    );
    for (key, chart_doc) in &chart {
        let deploy_doc = &deploy[key];
        assert!(
            chart_doc == deploy_doc,
            "{key:?} differs between the chart's defaults and deploy/:\n--- chart\n{}\n--- deploy/\n{}",
            yaml_serde::to_string(chart_doc).unwrap(),
            yaml_serde::to_string(deploy_doc).unwrap()
        );
    }

    // Spelled out, because these are what the two must never disagree on.
    for (name, docs) in [("chart", &chart), ("deploy/", &deploy)] {
        let role = &docs[&(
            "ClusterRole".to_string(),
            "profiles-sync-controller".to_string(),
        )];
        assert_eq!(
            role["rules"],
            expected_controller_rules(),
            "{name}: the controller's rules"
        );
        let mut images = BTreeSet::new();
        for doc in docs.values() {
            for c in doc["spec"]["template"]["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
            {
                images.insert(c["image"].as_str().unwrap().to_string());
                for arg in c["args"].as_array().into_iter().flatten() {
                    if let Some(image) = arg.as_str().unwrap().strip_prefix("--sync-image=") {
                        images.insert(image.to_string());
                    }
                }
            }
        }
        assert_eq!(
            images,
            BTreeSet::from([IMAGE.to_string()]),
            "{name}: images"
        );
        let viewer = &docs[&("ClusterRole".to_string(), "profilesync-viewer".to_string())];
        assert_eq!(
            viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
            "true"
        );
        let editor = &docs[&("ClusterRole".to_string(), "profilesync-editor".to_string())];
        assert_eq!(
            editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"],
            "true"
        );
    }
}

/// Every file the crate compiles in (`include_str!`, `include_bytes!`) reaches the image's build
/// stage: a `COPY` of the Dockerfile brings it and `.dockerignore` lets it through (the demo's
/// example did not: `docker build .` failed).
#[test]
fn every_file_the_crate_includes_is_in_the_docker_build() {
    fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rs_files(&path, out);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    let root = std::fs::canonicalize(repo()).unwrap();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    // The sources of the build stage's COPY lines (not `COPY --from=`).
    let copied: Vec<String> = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COPY "))
        .filter(|rest| !rest.starts_with("--"))
        .flat_map(|rest| {
            let words: Vec<&str> = rest.split_whitespace().collect();
            words[..words.len() - 1]
                .iter()
                .map(|w| w.trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let allowed: Vec<String> = std::fs::read_to_string(root.join(".dockerignore"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|p| p.trim_end_matches('/').to_string())
        .collect();
    let covers = |list: &[String], path: &str| {
        list.iter()
            .any(|p| path == p || path.starts_with(&format!("{p}/")))
    };
    let mut files = vec![];
    rs_files(&root.join("src"), &mut files);
    let mut includes = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for mac in ["include_str!(\"", "include_bytes!(\""] {
            for (at, _) in text.match_indices(mac) {
                let rest = &text[at + mac.len()..];
                let rel = &rest[..rest.find('"').unwrap()];
                let target = std::fs::canonicalize(file.parent().unwrap().join(rel)).unwrap();
                let path = target.strip_prefix(&root).unwrap().display().to_string();
                assert!(
                    covers(&copied, &path),
                    "{}: {path} is not copied by the Dockerfile ({copied:?})",
                    file.display()
                );
                assert!(
                    covers(&allowed, &path),
                    "{}: {path} is kept out of the build by .dockerignore ({allowed:?})",
                    file.display()
                );
                includes += 1;
            }
        }
    }
    assert!(includes > 0, "the demo's example is compiled in");
}

/// The overlay the README gives for installing `deploy/` into another namespace: every object
/// moves, and the patch it documents points the controller (and so every sync Job) at the
/// engine there; without the patch the address still names `profiles-sync`, which is why the
/// README gives it.
#[test]
fn a_namespace_overlay_with_the_readme_patch_reaches_the_engine() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("patches:\n  - target: {kind: Deployment, name: profiles-sync-controller}")
        .expect("the README's namespace patch");
    let patch = &readme[start..start + readme[start..].find("```").unwrap()];
    let engine_url = |with_patch: bool| {
        let dir = tempfile::tempdir().unwrap();
        let up = "../".repeat(dir.path().components().count() - 1);
        let deploy = format!(
            "{up}{}",
            deploy_dir().display().to_string().trim_start_matches('/')
        );
        let mut k = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: data-platform\nresources:\n  - {deploy}\n"
        );
        if with_patch {
            k.push_str(patch);
        }
        std::fs::write(dir.path().join("kustomization.yaml"), k).unwrap();
        let docs = yaml_docs(&kustomize(dir.path()), "the overlay");
        let controller = docs
            .iter()
            .find(|d| {
                d["kind"] == "Deployment" && d["metadata"]["name"] == "profiles-sync-controller"
            })
            .unwrap();
        assert_eq!(controller["metadata"]["namespace"], "data-platform");
        controller["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .find(|a| a.starts_with("--engine-url="))
            .unwrap()
            .to_string()
    };
    assert_eq!(
        engine_url(true),
        "--engine-url=http://profiles-sync-engine.data-platform.svc:8080"
    );
    assert_eq!(
        engine_url(false),
        "--engine-url=http://profiles-sync-engine.profiles-sync.svc:8080"
    );
}
