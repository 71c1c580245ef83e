//! The warehouse tables of Profiles Sync with their fixed columns, and the state tables the sync
//! keeps in the schema.

use crate::event::EventType;
use crate::warehouse::{Column, ColumnType};

/// Which group of the sync report a table's rows count in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TableGroup {
    /// The `*_updates` ledgers and the materialized profile tables.
    IdentityGraph,
    /// `identifies`, `tracks`, `pages`, `screens`, `groups`, `aliases`.
    EventTypes,
    /// One table per Track event.
    Events,
    /// Bookkeeping (`discards`).
    Other,
}

/// `id_graph_updates`.
pub const ID_GRAPH_UPDATES: &str = "id_graph_updates";
/// `external_id_mapping_updates`.
pub const EXTERNAL_ID_MAPPING_UPDATES: &str = "external_id_mapping_updates";
/// `profile_traits_updates`.
pub const PROFILE_TRAITS_UPDATES: &str = "profile_traits_updates";
/// `user_identifiers`.
pub const USER_IDENTIFIERS: &str = "user_identifiers";
/// `user_traits`.
pub const USER_TRAITS: &str = "user_traits";
/// `profile_merges`.
pub const PROFILE_MERGES: &str = "profile_merges";
/// `discards`: values that could not be cast.
pub const DISCARDS: &str = "discards";
/// Per-table cursors and selection history.
pub const STATE: &str = "_profiles_sync_state";
/// Source name → column name assignments.
pub const COLUMN_NAMES: &str = "_profiles_sync_columns";
/// The id of the store the schema is synced from.
pub const STORE: &str = "_profiles_sync_store";
/// The cursor the three materialized tables shared before each got its own (their own states
/// carried the same value, so they continue from it); an older warehouse's state row of that
/// name is removed by the first sync of a later release, which marks the tables that are off
/// then as not loaded (that release moved their cursors along with the shared one).
pub const MATERIALIZED_CURSOR: &str = "_materialized";
/// The sync-wide events watermark (every event up to it has been routed). No Track event's
/// table can take this name ([`super::events::track_table`] prefixes none with `_profiles_sync`).
pub const EVENTS_WATERMARK: &str = "_profiles_sync_events";
/// The watermark's name before: the table of a Track event named `Events` took the same state
/// row, so that a failed load of that table lost its rows (its cursor moved with the
/// watermark). A warehouse's row of that name is moved to [`EVENTS_WATERMARK`] by the first
/// sync that finds no [`EVENTS_WATERMARK`] row (and left to that table if it exists).
pub const LEGACY_EVENTS_WATERMARK: &str = "_events";

/// The materialized tables.
pub const MATERIALIZED: [&str; 3] = [USER_IDENTIFIERS, USER_TRAITS, PROFILE_MERGES];

fn v(name: &str) -> Column {
    Column::new(name, ColumnType::Varchar)
}
fn ts(name: &str) -> Column {
    Column::new(name, ColumnType::Timestamp)
}
fn int(name: &str) -> Column {
    Column::new(name, ColumnType::Integer)
}

/// The `triggering_event_*` columns of the change logs, then `timestamp, received_at, seq, uuid_ts`.
fn trigger_and_tail() -> Vec<Column> {
    vec![
        v("triggering_event_type"),
        v("triggering_event_id"),
        v("triggering_event_name"),
        v("triggering_event_source_id"),
        v("triggering_event_source_name"),
        v("triggering_event_source_slug"),
        ts("timestamp"),
        ts("received_at"),
        int("seq"),
        ts("uuid_ts"),
    ]
}

/// A table whose columns are fixed (trait columns of `profile_traits_updates` come on top).
pub struct FixedTable {
    /// Table name.
    pub name: &'static str,
    /// Columns, in order.
    pub columns: Vec<Column>,
    /// Primary key.
    pub key: &'static [&'static str],
}

/// The fixed definition of a profile table, or `discards`.
pub fn fixed(name: &str) -> Option<FixedTable> {
    let (name, mut columns, key): (&'static str, Vec<Column>, &'static [&'static str]) = match name
    {
        ID_GRAPH_UPDATES => (
            ID_GRAPH_UPDATES,
            vec![v("segment_id"), v("canonical_segment_id")],
            &["seq"],
        ),
        EXTERNAL_ID_MAPPING_UPDATES => (
            EXTERNAL_ID_MAPPING_UPDATES,
            vec![
                v("id"),
                v("external_id_hash"),
                v("external_id_type"),
                v("external_id_value"),
                v("segment_id"),
            ],
            &["seq"],
        ),
        PROFILE_TRAITS_UPDATES => (PROFILE_TRAITS_UPDATES, vec![v("segment_id")], &["seq"]),
        USER_IDENTIFIERS => (
            USER_IDENTIFIERS,
            vec![
                v("canonical_segment_id"),
                v("type"),
                v("value"),
                int("seq"),
                ts("received_at"),
                ts("uuid_ts"),
                ts("timestamp"),
            ],
            &["type", "value"],
        ),
        USER_TRAITS => (
            USER_TRAITS,
            vec![
                v("canonical_segment_id"),
                v("name"),
                v("value"),
                int("seq"),
                ts("received_at"),
                ts("uuid_ts"),
                ts("timestamp"),
            ],
            &["canonical_segment_id", "name"],
        ),
        PROFILE_MERGES => (
            PROFILE_MERGES,
            vec![
                v("canonical_segment_id"),
                v("segment_id"),
                int("seq"),
                ts("received_at"),
                ts("uuid_ts"),
                ts("timestamp"),
            ],
            &["segment_id"],
        ),
        DISCARDS => (
            DISCARDS,
            vec![
                v("table_name"),
                v("column_name"),
                v("row_id"),
                v("value"),
                v("reason"),
                ts("received_at"),
                ts("uuid_ts"),
            ],
            &["table_name", "column_name", "row_id"],
        ),
        _ => return None,
    };
    if matches!(
        name,
        ID_GRAPH_UPDATES | EXTERNAL_ID_MAPPING_UPDATES | PROFILE_TRAITS_UPDATES
    ) {
        columns.extend(trigger_and_tail());
    }
    Some(FixedTable { name, columns, key })
}

/// The identity-graph raw tables, in load order.
pub const RAW: [&str; 3] = [
    ID_GRAPH_UPDATES,
    EXTERNAL_ID_MAPPING_UPDATES,
    PROFILE_TRAITS_UPDATES,
];

/// Every table name a SelectiveSync can name besides the Track event tables.
pub fn known_tables() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = RAW.into_iter().chain(MATERIALIZED).collect();
    v.extend(EventType::ALL.iter().map(|t| t.table()));
    v
}

/// The report group of a table.
pub fn group(table: &str) -> TableGroup {
    if RAW.contains(&table) || MATERIALIZED.contains(&table) {
        TableGroup::IdentityGraph
    } else if EventType::ALL.iter().any(|t| t.table() == table) {
        TableGroup::EventTypes
    } else if table == DISCARDS {
        TableGroup::Other
    } else {
        TableGroup::Events
    }
}

/// Columns every event table has, in order (type-specific ones are added by the flattener).
pub fn event_base_columns() -> Vec<Column> {
    vec![
        v("id"),
        v("anonymous_id"),
        v("user_id"),
        ts("received_at"),
        ts("sent_at"),
        ts("original_timestamp"),
        ts("timestamp"),
        ts("uuid_ts"),
        v("segment_id"),
        v("event_source_id"),
        int("seq"),
    ]
}

/// Column names no property may take in an event table of `event_type`.
pub fn event_reserved_columns(event_type: EventType) -> Vec<&'static str> {
    let mut v = vec![
        "id",
        "anonymous_id",
        "user_id",
        "received_at",
        "sent_at",
        "original_timestamp",
        "timestamp",
        "uuid_ts",
        "segment_id",
        "event_source_id",
        "seq",
        "context",
        "type",
        "message_id",
    ];
    v.extend(match event_type {
        EventType::Track => &["event", "event_text"][..],
        EventType::Page | EventType::Screen => &["name", "category"][..],
        EventType::Group => &["group_id"][..],
        EventType::Alias => &["previous_id"][..],
        EventType::Identify => &[][..],
    });
    v
}

/// Column names no trait may take in `profile_traits_updates` (its fixed columns).
pub const TRAITS_RESERVED: [&str; 11] = [
    "segment_id",
    "triggering_event_type",
    "triggering_event_id",
    "triggering_event_name",
    "triggering_event_source_id",
    "triggering_event_source_name",
    "triggering_event_source_slug",
    "timestamp",
    "received_at",
    "seq",
    "uuid_ts",
];
