//! The `WarehouseConnection` resource: one warehouse, one schema, a schedule, and the sync history.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{WarehouseSpec, WarehouseType};

/// The default warehouse schema (dataset) name.
pub const DEFAULT_SCHEMA: &str = "profiles_sync";
/// The default event backfill on the first sync: 60 days ("2 months" in Segment's words).
pub const DEFAULT_EVENT_BACKFILL: &str = "60d";
/// How many Track event tables the first sync backfills at most; the rest start at the head.
pub const DEFAULT_MAX_BACKFILLED_EVENT_TABLES: u32 = 2000;
/// How many syncs `status.syncs` keeps, newest first.
pub const SYNC_HISTORY_LEN: usize = 10;

fn default_schema() -> String {
    DEFAULT_SCHEMA.into()
}
fn default_schedule() -> String {
    super::Schedule::DEFAULT.into()
}

/// A connection from the profile store to one schema in one warehouse, synced on a schedule.
// Several printer columns share a type, which clippy mistakes for repeated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "profilesync.dev",
    version = "v1alpha1",
    kind = "WarehouseConnection",
    namespaced,
    shortname = "whc",
    category = "profilesync",
    status = "WarehouseConnectionStatus",
    derive = "PartialEq",
    cel,
    doc = "A warehouse (and one schema in it) that receives the identity graph, the materialized profiles and the events, synced on a schedule.",
    printcolumn(
        name = "Type",
        type_ = "string",
        json_path = ".spec.warehouse.type",
        description = "Warehouse type"
    ),
    printcolumn(
        name = "Schema",
        type_ = "string",
        json_path = ".spec.schema",
        description = "Schema (dataset) the data lands in"
    ),
    printcolumn(
        name = "Suspended",
        type_ = "boolean",
        json_path = ".spec.suspend",
        description = "Whether new syncs are stopped"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Connection verified and the last sync did not fail"
    ),
    printcolumn(
        name = "Last Sync",
        type_ = "date",
        json_path = ".status.lastSyncTime",
        description = "When the last sync started"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.syncs[0].status",
        description = "Result of the last sync"
    ),
    printcolumn(
        name = "Rows",
        type_ = "integer",
        json_path = ".status.syncs[0].rows.total",
        description = "Rows loaded by the last sync"
    ),
    printcolumn(
        name = "Next Sync",
        type_ = "string",
        json_path = ".status.nextSyncTime",
        description = "When the next sync is due (UTC; kubectl shows future dates of date columns as <invalid>)"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp",
        description = "Age of the connection"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WarehouseConnectionSpec {
    /// The warehouse to land data in: its type, connection settings and credentials Secret.
    pub warehouse: WarehouseSpec,
    /// Schema (BigQuery: dataset) the tables are created in: lowercase letters, digits and _, not starting with a digit, at most 63 characters. Immutable.
    #[serde(default = "default_schema")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]*$"), length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("schema is immutable; create a new WarehouseConnection to sync into another schema"))]
    pub schema: String,
    /// Stops new syncs while true (a running sync finishes); credentials and history are kept.
    #[serde(default)]
    pub suspend: bool,
    /// How often to sync: an interval of at least 15m (`1h`, `30m`, `1h30m`) aligned to the clock, or a five-field cron expression / macro (`0 */2 * * *`, `@daily`) in UTC whose fires are at least 15m apart (checked by the controller: `Ready=False` `InvalidSchedule` otherwise).
    #[serde(default = "default_schedule")]
    #[schemars(length(min = 1, max = 100))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+h)?([0-9]+m)?$') ? (self != '' && duration(self) >= duration('15m')) : self.matches('^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|[^ ]+( +[^ ]+){4})$')").message("schedule must be an interval of at least 15m (e.g. 1h, 30m, 1h30m) or a five-field cron expression (e.g. '0 * * * *')"))]
    pub schedule: String,
    /// How far back the first sync loads events; profile tables are always loaded completely.
    #[serde(default)]
    pub backfill: Backfill,
    /// Caps on how much one sync loads; a larger backlog continues in the next sync and is never dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<SyncLimits>,
    /// CPU and memory for sync Jobs; the controller's defaults when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl WarehouseConnectionSpec {
    /// Where the syncs land: [`WarehouseSpec::destination`] and the schema (SQLite has none).
    pub fn destination(&self) -> String {
        match self.warehouse.r#type {
            WarehouseType::Sqlite => self.warehouse.destination(),
            _ => format!("{}, schema {}", self.warehouse.destination(), self.schema),
        }
    }

    /// The field rules of the CRD's schema that change what a sync does when broken — the
    /// API server enforces them in a cluster; `profiles-sync sync -f` reads files no API server
    /// checked: the schema name, the port (0 is no server's), the backfill window (one that does
    /// not parse loaded no events, for good), the limits (0 loaded nothing, every run) and
    /// `backfill.maxEventTables`.
    pub fn validate_fields(&self) -> Result<(), String> {
        let schema_ok = self.schema.len() <= 63
            && self
                .schema
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && self
                .schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !schema_ok {
            return Err(format!(
                "spec.schema {:?}: lowercase letters, digits and _, not starting with a digit, at most 63 characters",
                self.schema
            ));
        }
        let w = &self.warehouse;
        for (block, port) in [
            ("postgres", w.postgres.as_ref().map(|s| s.port)),
            ("redshift", w.redshift.as_ref().map(|s| s.port)),
            ("azureSynapse", w.azure_synapse.as_ref().map(|s| s.port)),
        ] {
            if port == Some(0) {
                return Err(format!(
                    "spec.warehouse.{block}.port 0: a TCP port from 1 to 65535"
                ));
            }
        }
        let events = &self.backfill.events;
        let digits = events.len().saturating_sub(1);
        if !(1..=5).contains(&digits) || self.backfill.events_window().is_none() {
            return Err(format!(
                "spec.backfill.events {events:?}: days (60d) or hours (36h), at most 5 digits"
            ));
        }
        if self.backfill.max_event_tables > 5000 {
            return Err(format!(
                "spec.backfill.maxEventTables {}: at most 5000",
                self.backfill.max_event_tables
            ));
        }
        if let Some(l) = &self.limits {
            for (name, v) in [("maxRows", l.max_rows), ("maxBytes", l.max_bytes)] {
                if v.is_some_and(|v| v < 1) {
                    return Err(format!("spec.limits.{name} {}: at least 1", v.unwrap_or(0)));
                }
            }
        }
        Ok(())
    }
}

fn default_event_backfill() -> String {
    DEFAULT_EVENT_BACKFILL.into()
}
fn default_max_backfilled_event_tables() -> u32 {
    DEFAULT_MAX_BACKFILLED_EVENT_TABLES
}

/// What the first sync loads from history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backfill {
    /// How far back events go on the first sync, in days (`60d`) or hours (`36h`); `0d` starts at the current head.
    #[serde(default = "default_event_backfill")]
    #[schemars(regex(pattern = r"^[0-9]{1,5}[dh]$"))]
    pub events: String,
    /// How many Track event tables the first sync backfills at most; tables beyond it start at the current head and the sync report says so.
    #[serde(default = "default_max_backfilled_event_tables")]
    #[schemars(range(min = 0, max = 5000))]
    pub max_event_tables: u32,
}

impl Default for Backfill {
    fn default() -> Self {
        Backfill {
            events: default_event_backfill(),
            max_event_tables: default_max_backfilled_event_tables(),
        }
    }
}

impl Backfill {
    /// The event backfill window as a duration (`60d` is 60 × 24 hours).
    pub fn events_window(&self) -> Option<std::time::Duration> {
        parse_window(&self.events)
    }
}

/// A window written as days (`60d`) or hours (`36h`); `None` for anything else.
pub fn parse_window(text: &str) -> Option<std::time::Duration> {
    // By suffix, not by byte position: a last character of several bytes (`5日`) is no unit.
    let (n, per) = match (text.strip_suffix('d'), text.strip_suffix('h')) {
        (Some(n), _) => (n, 24),
        (_, Some(n)) => (n, 1),
        _ => return None,
    };
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let hours = n.parse::<u64>().ok()?.checked_mul(per)?;
    Some(std::time::Duration::from_secs(hours.checked_mul(3600)?))
}

/// Caps on how much one sync loads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncLimits {
    /// Rows after which a sync starts no new page, across all tables (checked between pages:
    /// the last page can pass it, by at most its own rows — a Track event loads two); the rest
    /// waits for the next run, nothing is dropped. Each identity log, the profile tables and
    /// the events first get an equal share, so that none starves the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_rows: Option<i64>,
    /// Bytes of row data (as sent to the warehouse) after which a sync starts no new page of
    /// the change logs and event tables (checked between pages, like maxRows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes: Option<i64>,
}

/// The observed state of a connection; written only by the controller, through the status subresource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarehouseConnectionStatus {
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, ConnectionVerified, Syncing, BackfillComplete and Suspended, in the metav1.Condition shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// When the last sync started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// When the last sync that loaded every table (Success) started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_sync_time: Option<Time>,
    /// When the next scheduled sync is due (unset while suspended, while the connection is not
    /// verified, or while its SelectiveSync is invalid: no sync runs then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sync_time: Option<Time>,
    /// The effective schedule in words (`every 1h`, `cron 0 * * * * (UTC)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency: Option<String>,
    /// The last syncs, newest first (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub syncs: Vec<SyncRecord>,
    /// Source IP addresses of sync traffic, to allowlist in the warehouse's firewall.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_ips: Vec<String>,
    /// Where the syncs land, in words (`postgres db.example.com:5432/analytics, schema
    /// profiles_sync`): BackfillComplete is about it, and turns Unknown (WarehouseChanged) when
    /// the spec names another server, database, schema or file, until the next sync's report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

/// The outcome of one sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum SyncStatus {
    /// Every enabled table loaded (including "nothing new").
    Success,
    /// Some tables loaded and some failed; the failed ones are retried by the next sync.
    PartialSuccess,
    /// No table loaded.
    Failed,
    /// The sync Job completed (it exits non-zero only for `Failed`), but its report could not be
    /// read: its pod was removed before the controller read it, or it left no or a malformed
    /// termination message; or the Job was deleted before the controller saw it end. Whether
    /// every table loaded is not known; nothing is lost, as the next sync continues from the
    /// cursors in the warehouse. Never in a sync's own report.
    Unknown,
}

/// The class of a sync error, for alerting and troubleshooting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ErrorClass {
    /// The warehouse user lacks a privilege.
    Permission,
    /// The warehouse or the engine could not be reached or dropped the connection.
    Connection,
    /// A table or column could not be created or altered.
    Schema,
    /// The warehouse refused a value for a column's type.
    TypeConflict,
    /// A warehouse quota or limit was hit.
    Quota,
    /// A bug or an unexpected state in profiles-sync.
    Internal,
    /// The engine's event retention deleted events before this connection loaded them (they
    /// are missing from its event tables; the run goes on with the events after them).
    Retention,
}

/// One sync in the connection's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncRecord {
    /// Unique id of the sync (the Job's slot id).
    pub id: String,
    /// Success, PartialSuccess, Failed, or Unknown (the Job completed but its report was lost).
    pub status: SyncStatus,
    /// When the sync started.
    pub start_time: Time,
    /// How long the sync ran, in seconds.
    pub duration_seconds: f64,
    /// Rows loaded, in total and per table group: zeros when no report was read (status
    /// Unknown, or a Job that ended without one), though such a sync may have loaded rows.
    /// Absent reads as zeros.
    #[serde(default)]
    pub rows: SyncRows,
    /// Tables that failed in this sync, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<FailedTable>,
    /// Errors of this sync, classified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<SyncError>,
    /// Name of the Job that ran the sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
}

/// Rows loaded by one sync (a count left out reads as 0).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncRows {
    /// All rows loaded.
    #[serde(default)]
    pub total: i64,
    /// Rows of the identity graph and profile tables (the *_updates tables and their materialized views).
    #[serde(default)]
    pub identity_graph: i64,
    /// Rows of the event-type tables (identifies, pages, screens, groups, aliases, tracks).
    #[serde(default)]
    pub event_types: i64,
    /// Rows of the per-Track-event tables.
    #[serde(default)]
    pub events: i64,
}

/// A table that failed to load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailedTable {
    /// Table name in the warehouse.
    pub name: String,
    /// Class of the error.
    pub class: ErrorClass,
    /// The warehouse's message.
    pub message: String,
}

/// A classified sync error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncError {
    /// Class of the error.
    pub class: ErrorClass,
    /// What went wrong, with the warehouse's message.
    pub message: String,
    /// The table concerned, when the error is about one table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
}
