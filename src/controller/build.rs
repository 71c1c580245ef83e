//! Pure builders of the objects the controller creates: the sync Job, the ConfigMap with the
//! connection and selection it syncs (no secrets), and the engine token Secret.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, KeyToPath,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, Secret,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use super::plan::{NewSync, connection_label};
use crate::crd::{SelectiveSync, WarehouseConnection};

/// Label on every Job, ConfigMap and pod of a connection: the connection's name
/// ([`super::plan::connection_label`]: shortened with a hash past 63 characters).
pub const LABEL_CONNECTION: &str = "profilesync.dev/connection";
/// The label that names what manages an object.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The [`LABEL_MANAGED_BY`] value of what the controller creates.
pub const MANAGED_BY: &str = "profiles-sync-controller";
/// Annotation on a Job: the slot it syncs (RFC 3339).
pub const ANNOTATION_SLOT: &str = "profilesync.dev/slot";
/// Annotation on a Job: why it was started (First, Scheduled, CatchUp, Manual).
pub const ANNOTATION_TRIGGER: &str = "profilesync.dev/trigger";
/// Annotation on a Job: the SelectiveSync generation in its ConfigMap.
pub const ANNOTATION_SELECTION_GENERATION: &str = "profilesync.dev/selection-generation";
/// Annotation on a Job: the uid of the SelectiveSync in its ConfigMap (with the generation, it
/// names the selection a sync applied).
pub const ANNOTATION_SELECTION_UID: &str = "profilesync.dev/selection-uid";
/// Annotation on a Job: where its sync lands (`WarehouseConnectionSpec::destination` when it
/// was created), so that a report of the warehouse the connection named before is not taken for
/// the one it names now.
pub const ANNOTATION_DESTINATION: &str = "profilesync.dev/destination";
/// Annotation on a connection (set by users): run a sync now; on a Job: the value it answered.
pub const ANNOTATION_SYNC_NOW: &str = "profilesync.dev/sync-now";
/// Annotation on a connection (set by users): test the connection now.
pub const ANNOTATION_TEST_CONNECTION: &str = "profilesync.dev/test-connection";
/// The Secret, in each namespace with connections, that holds the engine's feed API token.
pub const ENGINE_TOKEN_SECRET: &str = "profiles-sync-engine-token";
/// The key of [`ENGINE_TOKEN_SECRET`] with the token.
pub const ENGINE_TOKEN_KEY: &str = "token";
/// Where the Job's ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/profiles-sync";
/// Where the warehouse credentials Secret is mounted.
pub const CREDENTIALS_DIR: &str = "/var/run/secrets/profiles-sync/warehouse";
/// Where the engine token Secret is mounted.
pub const ENGINE_TOKEN_DIR: &str = "/var/run/secrets/profiles-sync/engine";
/// The container's termination message file (the sync report).
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// The non-root user and group sync pods run as (distroless `nonroot`).
pub const SYNC_UID: i64 = 65532;
/// A failed sync is not retried by the Job: the next slot retries it. The sync is exactly-once
/// per table and a failure is nearly always the warehouse's (credentials, permissions, quota),
/// so an immediate retry would only hit the warehouse again; partial failures exit 0 anyway.
pub const BACKOFF_LIMIT: i32 = 0;
/// Longest a sync may run (`activeDeadlineSeconds` never exceeds it).
pub const MAX_DEADLINE: Duration = Duration::from_secs(6 * 3600);

/// What the controller was started with that goes into every Job.
#[derive(Clone, Debug)]
pub struct JobSettings {
    /// The image with the `profiles-sync` binary.
    pub image: String,
    /// The engine's URL (feed API).
    pub engine_url: String,
    /// CPU request when the connection sets no resources.
    pub default_cpu: Option<String>,
    /// Memory request and limit when the connection sets no resources.
    pub default_memory: Option<String>,
}

/// The labels of everything that belongs to a connection's syncs.
pub fn labels(connection: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_CONNECTION.to_string(), connection_label(connection)),
        ("app.kubernetes.io/name".into(), "profiles-sync".into()),
        ("app.kubernetes.io/component".into(), "sync".into()),
        (LABEL_MANAGED_BY.into(), MANAGED_BY.into()),
    ])
}

/// The label selector of a connection's Jobs and ConfigMaps.
pub fn selector(connection: &str) -> String {
    format!("{LABEL_CONNECTION}={}", connection_label(connection))
}

/// The owner reference that makes the connection the controller of an object.
pub fn owner(conn: &WarehouseConnection) -> Option<OwnerReference> {
    conn.controller_owner_ref(&()).map(|o| OwnerReference {
        // Foreground deletion of the connection waits for its Jobs.
        block_owner_deletion: Some(true),
        ..o
    })
}

/// The sync command: the paths are those of the mounts below.
pub fn command(
    job_name: &str,
    engine_url: &str,
    with_selection: bool,
    with_credentials: bool,
) -> Vec<String> {
    let mut cmd: Vec<String> = vec![
        "profiles-sync".into(),
        "sync".into(),
        "-f".into(),
        format!("{CONFIG_DIR}/connection.yaml"),
    ];
    if with_selection {
        cmd.extend(["-f".into(), format!("{CONFIG_DIR}/selection.yaml")]);
    }
    cmd.extend([
        "--engine".into(),
        engine_url.into(),
        "--engine-token-file".into(),
        format!("{ENGINE_TOKEN_DIR}/{ENGINE_TOKEN_KEY}"),
    ]);
    if with_credentials {
        cmd.extend(["--credentials-dir".into(), CREDENTIALS_DIR.into()]);
    }
    cmd.extend([
        "--id".into(),
        job_name.into(),
        "--termination-log".into(),
        TERMINATION_LOG.into(),
        // The connection's progress keeps the events it has not loaded from retention.
        "--record-progress".into(),
    ]);
    cmd
}

fn resources(conn: &WarehouseConnection, settings: &JobSettings) -> Option<ResourceRequirements> {
    if let Some(r) = &conn.spec.resources {
        return Some(r.clone());
    }
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpu) = &settings.default_cpu {
        requests.insert("cpu".to_string(), Quantity(cpu.clone()));
    }
    if let Some(mem) = &settings.default_memory {
        requests.insert("memory".to_string(), Quantity(mem.clone()));
        limits.insert("memory".to_string(), Quantity(mem.clone()));
    }
    (!requests.is_empty()).then(|| ResourceRequirements {
        requests: Some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    })
}

/// The sync Job for `new`. `deadline` bounds its run (`activeDeadlineSeconds`).
pub fn sync_job(
    conn: &WarehouseConnection,
    selection: Option<&SelectiveSync>,
    new: &NewSync,
    sync_now: Option<&str>,
    settings: &JobSettings,
    deadline: Duration,
) -> Job {
    let name = conn.metadata.name.clone().unwrap_or_default();
    let mut annotations = BTreeMap::from([
        (ANNOTATION_SLOT.to_string(), new.slot.to_string()),
        (
            ANNOTATION_TRIGGER.to_string(),
            new.trigger.as_str().to_string(),
        ),
        (ANNOTATION_DESTINATION.to_string(), conn.spec.destination()),
    ]);
    if let Some(v) = sync_now {
        annotations.insert(ANNOTATION_SYNC_NOW.into(), v.into());
    }
    if let Some(g) = selection.and_then(|s| s.metadata.generation) {
        annotations.insert(ANNOTATION_SELECTION_GENERATION.into(), g.to_string());
    }
    if let Some(uid) = selection.and_then(|s| s.metadata.uid.clone()) {
        annotations.insert(ANNOTATION_SELECTION_UID.into(), uid);
    }
    let secret_ref = conn.spec.warehouse.credentials_secret_ref.as_ref();
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: new.name.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "engine-token".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(ENGINE_TOKEN_SECRET.into()),
                items: Some(vec![KeyToPath {
                    key: ENGINE_TOKEN_KEY.into(),
                    path: ENGINE_TOKEN_KEY.into(),
                    mode: None,
                }]),
                default_mode: Some(0o440),
                optional: None,
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let mut mounts = vec![
        mount("config", CONFIG_DIR),
        mount("engine-token", ENGINE_TOKEN_DIR),
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ];
    if let Some(r) = secret_ref {
        volumes.push(Volume {
            name: "warehouse-credentials".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(r.name.clone()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount("warehouse-credentials", CREDENTIALS_DIR));
    }
    let container = Container {
        name: "sync".into(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(command(
            &new.name,
            &settings.engine_url,
            selection.is_some(),
            secret_ref.is_some(),
        )),
        resources: resources(conn, settings),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        termination_message_path: Some(TERMINATION_LOG.into()),
        termination_message_policy: Some("File".into()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let labels = labels(&name);
    Job {
        metadata: ObjectMeta {
            name: Some(new.name.clone()),
            namespace: conn.metadata.namespace.clone(),
            labels: Some(labels.clone()),
            annotations: Some(annotations),
            owner_references: owner(conn).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(BACKOFF_LIMIT),
            active_deadline_seconds: Some(deadline.min(MAX_DEADLINE).as_secs() as i64),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    // The sync never talks to the Kubernetes API.
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(SYNC_UID),
                        run_as_group: Some(SYNC_UID),
                        fs_group: Some(SYNC_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// Why a manifest could not be rendered.
#[derive(Debug, thiserror::Error)]
#[error("cannot render {what} as YAML: {source}")]
pub struct RenderError {
    /// Which manifest.
    pub what: &'static str,
    /// The serializer's error.
    #[source]
    pub source: yaml_serde::Error,
}

/// The connection and selection as the sync reads them (`-f`): kind, name and spec only.
pub fn manifests(
    conn: &WarehouseConnection,
    selection: Option<&SelectiveSync>,
) -> Result<BTreeMap<String, String>, RenderError> {
    let mut c = WarehouseConnection::new(
        conn.metadata.name.as_deref().unwrap_or_default(),
        conn.spec.clone(),
    );
    c.metadata.namespace = conn.metadata.namespace.clone();
    let mut data = BTreeMap::from([(
        "connection.yaml".to_string(),
        yaml_serde::to_string(&c).map_err(|source| RenderError {
            what: "the WarehouseConnection",
            source,
        })?,
    )]);
    if let Some(s) = selection {
        let mut sel = SelectiveSync::new(
            s.metadata.name.as_deref().unwrap_or_default(),
            s.spec.clone(),
        );
        sel.metadata.namespace = s.metadata.namespace.clone();
        data.insert(
            "selection.yaml".into(),
            yaml_serde::to_string(&sel).map_err(|source| RenderError {
                what: "the SelectiveSync",
                source,
            })?,
        );
    }
    Ok(data)
}

/// The ConfigMap a Job mounts, owned by that Job (deleted with it).
pub fn sync_config_map(job: &Job, connection: &str, data: BTreeMap<String, String>) -> ConfigMap {
    let owner = job.controller_owner_ref(&()).map(|mut o| {
        // The Job owns it, but it needn't block the Job's deletion.
        o.block_owner_deletion = None;
        vec![o]
    });
    ConfigMap {
        metadata: ObjectMeta {
            name: job.metadata.name.clone(),
            namespace: job.metadata.namespace.clone(),
            labels: Some(labels(connection)),
            owner_references: owner,
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// Whether an object carries the controller's [`LABEL_MANAGED_BY`] label.
pub fn made_by_controller(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(LABEL_MANAGED_BY))
        .is_some_and(|v| v == MANAGED_BY)
}

/// The engine token Secret of a namespace (see [`ENGINE_TOKEN_SECRET`]).
pub fn engine_token_secret(namespace: &str, token: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(ENGINE_TOKEN_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".into(), "profiles-sync".into()),
                (LABEL_MANAGED_BY.into(), MANAGED_BY.into()),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            ENGINE_TOKEN_KEY.to_string(),
            k8s_openapi::ByteString(token.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

#[cfg(test)]
#[path = "build_tests.rs"]
mod tests;
