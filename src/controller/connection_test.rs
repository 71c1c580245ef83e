//! The connection test, run in the controller's process with the same warehouse code as the sync
//! (`warehouse::connect` + `Warehouse::test_connection`), on a blocking thread with a timeout.
//!
//! Why in-process and not in a short Job: the answer is needed in seconds (`kubectl apply` then
//! `kubectl get whc` should show `ConnectionVerified`), a Job per test would need an image pull, a
//! scheduled pod and a second status path for every connection every 30 minutes, and the
//! controller already reads the Secret to detect credential changes. The cost is that the
//! controller's pod needs network egress to the warehouses, as the sync Jobs do.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::crd::{ErrorClass, WarehouseConnectionSpec, WarehouseType};
use crate::warehouse::{self, Credentials, WarehouseError};

/// How often a verified connection is tested again.
pub const RETEST_VERIFIED: Duration = Duration::from_secs(30 * 60);
/// How often a failing connection is tested again.
pub const RETEST_FAILED: Duration = Duration::from_secs(5 * 60);
/// How long one test may take before it counts as `Unreachable`.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The `ConnectionVerified` reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Connected, and the schema is writable.
    Connected,
    /// The credentials Secret does not exist.
    SecretNotFound,
    /// The Secret lacks a key the warehouse type needs.
    SecretKeyMissing,
    /// The warehouse refused the credentials.
    AuthenticationFailed,
    /// The warehouse could not be reached (network, TLS, timeout, unknown database).
    Unreachable,
    /// Connected, but the user lacks a privilege the sync needs.
    PermissionDenied,
    /// Connected, but the schema could not be created or written.
    SchemaNotWritable,
    /// Connected, but the database cannot take the sync's rows (PostgreSQL: an encoding other
    /// than UTF8).
    UnsupportedDatabase,
    /// The warehouse type has no loader in this version (the CRD accepts every type the
    /// project plans).
    NotSupported,
}

impl Reason {
    /// The reason as the condition shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Connected => "Connected",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretKeyMissing => "SecretKeyMissing",
            Reason::AuthenticationFailed => "AuthenticationFailed",
            Reason::Unreachable => "Unreachable",
            Reason::PermissionDenied => "PermissionDenied",
            Reason::SchemaNotWritable => "SchemaNotWritable",
            Reason::UnsupportedDatabase => "UnsupportedDatabase",
            Reason::NotSupported => "NotSupported",
        }
    }
}

/// The result of one connection test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestOutcome {
    /// The condition's reason.
    pub reason: Reason,
    /// The condition's message (never with credentials).
    pub message: String,
}

impl TestOutcome {
    /// Whether the connection works.
    pub fn ok(&self) -> bool {
        self.reason == Reason::Connected
    }
}

/// What the controller remembers about the last test of a connection (in memory: a restarted
/// controller tests every connection once more).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestMemory {
    /// When it ran.
    pub at: Timestamp,
    /// The connection's generation then.
    pub generation: i64,
    /// The credentials Secret's resourceVersion then (None: no Secret).
    pub secret_version: Option<String>,
    /// Its result, which the status may not hold yet (its write failed): a reconcile that
    /// does not test writes it again.
    pub outcome: TestOutcome,
    /// The newest failed sync seen when it ran (a newer failure triggers a test).
    pub failed_sync: Option<String>,
}

/// Why a connection is tested now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestTrigger {
    /// Never tested by this controller (new connection, or the controller restarted).
    FirstLook,
    /// The spec changed (a new generation).
    SpecChanged,
    /// The credentials Secret changed, appeared or disappeared.
    SecretChanged,
    /// The `profilesync.dev/test-connection` annotation.
    Requested,
    /// The periodic re-test.
    Periodic,
    /// A sync failed since the last test.
    SyncFailed,
}

/// Observed facts that decide whether to test.
#[derive(Clone, Debug)]
pub struct TestInput<'a> {
    /// Now.
    pub now: Timestamp,
    /// metadata.generation.
    pub generation: i64,
    /// The current `ConnectionVerified` condition.
    pub condition: Option<&'a Condition>,
    /// The in-memory record of the last test.
    pub memory: Option<&'a TestMemory>,
    /// The Secret's resourceVersion now (None: absent or not needed).
    pub secret_version: Option<&'a str>,
    /// Whether the test-connection annotation is set.
    pub requested: bool,
    /// The newest Failed sync in the status (its id).
    pub failed_sync: Option<&'a str>,
}

/// Decides whether to test the connection now.
pub fn test_due(input: &TestInput<'_>) -> Option<TestTrigger> {
    if input.requested {
        return Some(TestTrigger::Requested);
    }
    let Some(mem) = input.memory else {
        return Some(TestTrigger::FirstLook);
    };
    if mem.generation != input.generation
        || input.condition.and_then(|c| c.observed_generation) != Some(input.generation)
    {
        return Some(TestTrigger::SpecChanged);
    }
    if mem.secret_version.as_deref() != input.secret_version {
        return Some(TestTrigger::SecretChanged);
    }
    if input.failed_sync.is_some() && input.failed_sync != mem.failed_sync.as_deref() {
        return Some(TestTrigger::SyncFailed);
    }
    (input.now >= next_test(mem)).then_some(TestTrigger::Periodic)
}

/// When the periodic re-test after `mem` is due.
pub fn next_test(mem: &TestMemory) -> Timestamp {
    let period = if mem.outcome.ok() {
        RETEST_VERIFIED
    } else {
        RETEST_FAILED
    };
    mem.at + jiff::SignedDuration::from_secs(period.as_secs() as i64)
}

/// The Secret keys a warehouse type cannot work without (one of each inner list).
fn required_keys(spec: &WarehouseConnectionSpec) -> Vec<Vec<String>> {
    let Some(r) = &spec.warehouse.credentials_secret_ref else {
        return vec![];
    };
    match spec.warehouse.r#type {
        WarehouseType::Postgres | WarehouseType::Redshift | WarehouseType::AzureSynapse => {
            vec![vec![r.username_key.clone()]]
        }
        WarehouseType::Snowflake => vec![
            vec![r.username_key.clone()],
            vec![r.password_key.clone(), r.private_key_key.clone()],
        ],
        WarehouseType::Bigquery => vec![vec![r.service_account_key.clone()]],
        WarehouseType::Databricks => vec![vec![r.token_key.clone()]],
        WarehouseType::Sqlite => vec![],
    }
}

/// Builds the credentials from a Secret's data, or the outcome that stops the test.
pub fn credentials(
    spec: &WarehouseConnectionSpec,
    secret: Option<&Secret>,
) -> Result<Credentials, TestOutcome> {
    let Some(secret_ref) = &spec.warehouse.credentials_secret_ref else {
        return Ok(Credentials::default());
    };
    let Some(secret) = secret else {
        return Err(TestOutcome {
            reason: Reason::SecretNotFound,
            message: format!(
                "Secret {:?} (warehouse.credentialsSecretRef) was not found in the connection's namespace",
                secret_ref.name
            ),
        });
    };
    let empty = BTreeMap::new();
    let data: &BTreeMap<String, ByteString> = secret.data.as_ref().unwrap_or(&empty);
    let value = |key: &str| {
        data.get(key)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .filter(|s| !s.trim().is_empty())
    };
    for alternatives in required_keys(spec) {
        if !alternatives.iter().any(|k| value(k).is_some()) {
            return Err(TestOutcome {
                reason: Reason::SecretKeyMissing,
                message: format!(
                    "Secret {:?} has no {} key, which a {} warehouse needs",
                    secret_ref.name,
                    alternatives.join(" or "),
                    spec.warehouse.r#type
                ),
            });
        }
    }
    Ok(Credentials::from_lookup(secret_ref, value))
}

/// Maps a failure of `warehouse::connect` to a reason. An SQLite file has no credentials: a
/// refusal there is the file system's (`PermissionDenied`), and the message says why such a
/// file does not work in a cluster.
pub fn connect_failure(e: &WarehouseError, ty: WarehouseType) -> TestOutcome {
    let sqlite = ty == WarehouseType::Sqlite;
    let reason = match e.class {
        ErrorClass::Permission if sqlite => Reason::PermissionDenied,
        ErrorClass::Permission => Reason::AuthenticationFailed,
        _ => Reason::Unreachable,
    };
    let message = if sqlite {
        format!(
            "cannot open the SQLite warehouse file: {} (an SQLite warehouse is a file of the \
             process that syncs: in a cluster the sync Job mounts no volume for it, so use it \
             with a local `profiles-sync sync`, and another type here)",
            e.message
        )
    } else {
        format!("cannot connect to the warehouse: {}", e.message)
    };
    TestOutcome { reason, message }
}

/// Maps a failure of `Warehouse::test_connection` (connected, then probing the schema) to a reason.
pub fn probe_failure(e: &WarehouseError, schema: &str) -> TestOutcome {
    let reason = match e.class {
        ErrorClass::Connection => Reason::Unreachable,
        ErrorClass::Permission => Reason::PermissionDenied,
        _ => Reason::SchemaNotWritable,
    };
    TestOutcome {
        reason,
        message: format!(
            "connected, but creating, altering, writing or deleting in schema {schema:?} failed: {}",
            e.message
        ),
    }
}

/// Probes a connected warehouse: the database first (whether it can hold the sync's rows at
/// all), then the schema (create, alter, insert, delete on a probe table).
pub fn probe(wh: &mut dyn warehouse::Warehouse, schema: &str) -> TestOutcome {
    match wh.unsupported_database() {
        Ok(Some(why)) => {
            return TestOutcome {
                reason: Reason::UnsupportedDatabase,
                message: format!("connected, but {why}"),
            };
        }
        Ok(None) => {}
        Err(e) => return probe_failure(&e, schema),
    }
    match wh.test_connection() {
        Ok(()) => TestOutcome {
            reason: Reason::Connected,
            message: format!("connected; schema {schema:?} is writable"),
        },
        Err(e) => probe_failure(&e, schema),
    }
}

/// `NotSupported` for a warehouse type without a loader: said before anything else about the
/// connection (its Secret's problems told to fix what would not make it sync).
pub fn unsupported(spec: &WarehouseConnectionSpec) -> Option<TestOutcome> {
    (!warehouse::supported(spec.warehouse.r#type)).then(|| TestOutcome {
        reason: Reason::NotSupported,
        message: format!(
            "warehouse type {} has no loader in this version of profiles-sync yet \
             (postgres and sqlite do): no sync runs for this connection",
            spec.warehouse.r#type
        ),
    })
}

/// Runs the test: connect, then probe the schema, on a blocking thread, within `timeout`.
pub async fn run(
    spec: &WarehouseConnectionSpec,
    credentials: Credentials,
    timeout: Duration,
) -> TestOutcome {
    if let Some(outcome) = unsupported(spec) {
        return outcome;
    }
    let warehouse = spec.warehouse.clone();
    let schema = spec.schema.clone();
    let task = tokio::task::spawn_blocking(move || {
        match warehouse::connect(&warehouse, &schema, &credentials) {
            Ok(mut wh) => probe(&mut *wh, &schema),
            Err(e) => connect_failure(&e, warehouse.r#type),
        }
    });
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(join)) => TestOutcome {
            reason: Reason::Unreachable,
            message: format!("the connection test stopped unexpectedly: {join}"),
        },
        Err(_) => TestOutcome {
            reason: Reason::Unreachable,
            message: format!("the warehouse did not answer within {}s", timeout.as_secs()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(warehouse: serde_json::Value) -> WarehouseConnectionSpec {
        serde_json::from_value(json!({ "warehouse": warehouse })).unwrap()
    }

    fn pg() -> WarehouseConnectionSpec {
        spec(
            json!({"type": "postgres", "postgres": {"host": "h", "database": "d"},
                    "credentialsSecretRef": {"name": "creds"}}),
        )
    }

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn a_missing_secret_or_key_is_named_in_the_outcome() {
        let err = credentials(&pg(), None).unwrap_err();
        assert_eq!(err.reason, Reason::SecretNotFound);
        assert!(err.message.contains("\"creds\""), "{}", err.message);
        let err = credentials(&pg(), Some(&secret(&[("password", "x")]))).unwrap_err();
        assert_eq!(err.reason, Reason::SecretKeyMissing);
        assert!(err.message.contains("username"), "{}", err.message);
        let c = credentials(
            &pg(),
            Some(&secret(&[("username", "u\n"), ("password", "p")])),
        )
        .unwrap();
        assert_eq!(c.username.as_deref(), Some("u"));
        assert_eq!(c.password.as_deref(), Some("p"));
    }

    #[test]
    fn snowflake_needs_a_password_or_a_private_key() {
        let sf = spec(json!({"type": "snowflake",
            "snowflake": {"account": "a", "warehouse": "w", "database": "d"},
            "credentialsSecretRef": {"name": "creds"}}));
        let err = credentials(&sf, Some(&secret(&[("username", "u")]))).unwrap_err();
        assert!(
            err.message.contains("password or privateKey"),
            "{}",
            err.message
        );
        assert!(
            credentials(
                &sf,
                Some(&secret(&[("username", "u"), ("privateKey", "k")]))
            )
            .is_ok()
        );
    }

    #[test]
    fn warehouse_errors_map_to_specific_reasons() {
        let e = |class| WarehouseError::new(class, "boom");
        let pg = WarehouseType::Postgres;
        assert_eq!(
            connect_failure(&e(ErrorClass::Permission), pg).reason,
            Reason::AuthenticationFailed
        );
        assert_eq!(
            connect_failure(&e(ErrorClass::Connection), pg).reason,
            Reason::Unreachable
        );
        assert_eq!(
            probe_failure(&e(ErrorClass::Permission), "s").reason,
            Reason::PermissionDenied
        );
        assert_eq!(
            probe_failure(&e(ErrorClass::Schema), "s").reason,
            Reason::SchemaNotWritable
        );
        assert_eq!(
            probe_failure(&e(ErrorClass::Connection), "s").reason,
            Reason::Unreachable
        );
    }

    fn memory(at: Timestamp, ok: bool) -> TestMemory {
        TestMemory {
            at,
            generation: 1,
            secret_version: Some("7".into()),
            outcome: TestOutcome {
                reason: if ok {
                    Reason::Connected
                } else {
                    Reason::Unreachable
                },
                message: String::new(),
            },
            failed_sync: None,
        }
    }

    #[test]
    fn tests_are_due_on_each_trigger_and_not_otherwise() {
        let t0: Timestamp = "2025-01-01T10:00:00Z".parse().unwrap();
        let cond = Condition {
            type_: "ConnectionVerified".into(),
            status: "True".into(),
            reason: "Connected".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t0),
        };
        let mem = memory(t0, true);
        let base = TestInput {
            now: t0 + jiff::SignedDuration::from_mins(10),
            generation: 1,
            condition: Some(&cond),
            memory: Some(&mem),
            secret_version: Some("7"),
            requested: false,
            failed_sync: None,
        };
        assert_eq!(test_due(&base), None);
        assert_eq!(
            test_due(&TestInput {
                memory: None,
                ..base.clone()
            }),
            Some(TestTrigger::FirstLook)
        );
        assert_eq!(
            test_due(&TestInput {
                generation: 2,
                ..base.clone()
            }),
            Some(TestTrigger::SpecChanged)
        );
        assert_eq!(
            test_due(&TestInput {
                secret_version: Some("8"),
                ..base.clone()
            }),
            Some(TestTrigger::SecretChanged)
        );
        assert_eq!(
            test_due(&TestInput {
                secret_version: None,
                ..base.clone()
            }),
            Some(TestTrigger::SecretChanged)
        );
        assert_eq!(
            test_due(&TestInput {
                requested: true,
                ..base.clone()
            }),
            Some(TestTrigger::Requested)
        );
        assert_eq!(
            test_due(&TestInput {
                failed_sync: Some("c-1"),
                ..base.clone()
            }),
            Some(TestTrigger::SyncFailed)
        );
        let later = t0 + jiff::SignedDuration::from_mins(30);
        assert_eq!(
            test_due(&TestInput {
                now: later,
                ..base.clone()
            }),
            Some(TestTrigger::Periodic)
        );
        let failing = memory(t0, false);
        let soon = t0 + jiff::SignedDuration::from_mins(5);
        assert_eq!(
            test_due(&TestInput {
                now: soon,
                memory: Some(&failing),
                ..base.clone()
            }),
            Some(TestTrigger::Periodic),
            "a failing connection is re-tested sooner"
        );
    }

    #[tokio::test]
    async fn an_sqlite_warehouse_verifies_and_an_unreachable_postgres_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wh.db").display().to_string();
        let s = spec(json!({"type": "sqlite", "sqlite": {"path": path}}));
        let out = run(&s, Credentials::default(), Duration::from_secs(30)).await;
        assert_eq!(out.reason, Reason::Connected, "{}", out.message);
        // Port 1 on loopback: refused at once.
        let p = spec(json!({"type": "postgres",
            "postgres": {"host": "127.0.0.1", "port": 1, "database": "d", "sslMode": "disable"},
            "credentialsSecretRef": {"name": "creds"}}));
        let creds = Credentials {
            username: Some("u".into()),
            ..Credentials::default()
        };
        let out = run(&p, creds, Duration::from_secs(30)).await;
        assert_eq!(out.reason, Reason::Unreachable, "{}", out.message);
    }

    /// An SQLite file whose directory cannot be made (here: under a regular file; in a
    /// cluster: on the controller's read-only root file system) is a failure of the file
    /// system, not a refused credential, and the message says how such a warehouse is used.
    #[tokio::test]
    async fn an_sqlite_file_that_cannot_be_made_is_a_permission_not_a_credential() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "not a directory").unwrap();
        let path = file.join("wh.db").display().to_string();
        let s = spec(json!({"type": "sqlite", "sqlite": {"path": path}}));
        let out = run(&s, Credentials::default(), Duration::from_secs(30)).await;
        assert_eq!(out.reason, Reason::PermissionDenied, "{}", out.message);
        assert!(
            out.message.contains("local `profiles-sync sync`"),
            "{}",
            out.message
        );
    }

    /// A type the CRD accepts but this version cannot load into says so, rather than
    /// "Unreachable".
    #[tokio::test]
    async fn a_warehouse_type_without_a_loader_is_not_supported() {
        let sf = spec(json!({"type": "snowflake",
            "snowflake": {"account": "a", "warehouse": "w", "database": "d"},
            "credentialsSecretRef": {"name": "creds"}}));
        let out = run(&sf, Credentials::default(), Duration::from_secs(30)).await;
        assert_eq!(out.reason, Reason::NotSupported, "{}", out.message);
        assert_eq!(out.reason.as_str(), "NotSupported");
        assert!(out.message.contains("snowflake"), "{}", out.message);
        assert!(!out.ok());
    }
}
