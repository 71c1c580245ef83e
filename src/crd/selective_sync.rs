//! The `SelectiveSync` resource: which tables ("collections") and columns ("properties") sync
//! to one connection.

use std::collections::HashSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Most tables one SelectiveSync may list (Segment's limit on collections).
pub const MAX_TABLES: usize = 5000;
/// Most columns one table's include/exclude list may name (Segment's limit on properties).
pub const MAX_COLUMNS_PER_TABLE: usize = 5000;
/// Columns that key every table and can never be excluded.
pub const REQUIRED_COLUMNS: [&str; 2] = ["id", "received_at"];
/// The identity graph change logs, keyed (and read back) by `seq` besides [`REQUIRED_COLUMNS`].
pub const SEQ_KEYED_TABLES: [&str; 3] = [
    "id_graph_updates",
    "external_id_mapping_updates",
    "profile_traits_updates",
];
/// The materialized tables: merges rewrite their rows by every column, so their columns can't
/// be selected (the table as a whole can).
pub const MATERIALIZED_TABLES: [&str; 3] = ["user_identifiers", "user_traits", "profile_merges"];

/// The columns of `table` that can never be excluded: [`REQUIRED_COLUMNS`], and `seq` for the
/// change logs.
pub fn key_columns(table: &str) -> &'static [&'static str] {
    if SEQ_KEYED_TABLES.contains(&table) {
        &["id", "received_at", "seq"]
    } else {
        &REQUIRED_COLUMNS
    }
}

/// The pattern of a table name in a selection: what the sync's naming can produce (uppercase
/// ASCII never; other characters it lowercases when they have a lowercase form).
pub const TABLE_NAME_PATTERN: &str = r"^[a-z_\x{80}-\x{10FFFF}][a-z0-9_\x{80}-\x{10FFFF}]*$";

/// Which tables and columns of one connection are synced.
// Several printer columns share a type, which clippy mistakes for repeated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "profilesync.dev",
    version = "v1alpha1",
    kind = "SelectiveSync",
    namespaced,
    shortname = "ssync",
    category = "profilesync",
    status = "SelectiveSyncStatus",
    derive = "PartialEq",
    cel,
    doc = "Selects which tables and columns of a WarehouseConnection are synced. Turning a table or column off stops new data and deletes nothing; turning it back on syncs new data only, except that a materialized table (user_identifiers, user_traits, profile_merges) catches up from where it stopped, so that it shows the current state again.",
    printcolumn(
        name = "Connection",
        type_ = "string",
        json_path = ".spec.connectionRef.name",
        description = "The WarehouseConnection this selection applies to"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Valid and applied by the last sync"
    ),
    printcolumn(
        name = "Tables",
        type_ = "integer",
        json_path = ".status.enabledTables",
        description = "Tables enabled by this selection"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp",
        description = "Age of the selection"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SelectiveSyncSpec {
    /// The WarehouseConnection (same namespace) this selection applies to. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("connectionRef is immutable; create a new SelectiveSync for the other connection"))]
    pub connection_ref: ConnectionRef,
    /// Whether tables not listed in `tables` are synced (all) or not (none).
    #[serde(default)]
    pub default: TableDefault,
    /// Per-table choices; a name is a warehouse table (id_graph_updates, identifies, tracks, ...) or a Track event table (order_completed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5000))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub tables: Vec<TableSelection>,
}

/// A reference to a WarehouseConnection in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRef {
    /// Name of the WarehouseConnection.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What happens to tables a SelectiveSync does not list.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum TableDefault {
    /// Unlisted tables are synced (new Track event tables included).
    #[default]
    All,
    /// Only the tables listed with enabled: true are synced.
    None,
}

fn default_true() -> bool {
    true
}

/// The choice for one table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(self.name in ['user_identifiers', 'user_traits', 'profile_merges'] && has(self.columns))").message("the materialized tables (user_identifiers, user_traits, profile_merges) keep every column; select or deselect the table as a whole"))]
pub struct TableSelection {
    /// Table name in the warehouse (snake_case, as the sync names it: lowercase ASCII letters,
    /// digits and `_`, and any non-ASCII letter or digit an event name carries, as in
    /// `größe_geändert`).
    #[schemars(
        regex(pattern = r"^[a-z_\x{80}-\x{10FFFF}][a-z0-9_\x{80}-\x{10FFFF}]*$"),
        length(min = 1, max = 255)
    )]
    pub name: String,
    /// Whether the table is synced. Off stops new rows and deletes nothing; back on syncs new
    /// rows only, except that a materialized table (user_identifiers, user_traits,
    /// profile_merges) catches up from where it stopped, to show the current state again.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Which columns of the table are synced; every column when unset. Not settable on the
    /// materialized tables (user_identifiers, user_traits, profile_merges), which keep every column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<ColumnSelection>,
}

/// Columns of one table to sync: either an include list or an exclude list, not both.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.include) && has(self.exclude))").message("set either columns.include or columns.exclude, not both"))]
pub struct ColumnSelection {
    /// Only these columns are synced (id and received_at always are, and seq in the identity
    /// graph change logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 5000), inner(length(min = 1, max = 255)))]
    pub include: Option<Vec<String>>,
    /// These columns are not synced (an excluded column is not created, or stays NULL in new
    /// rows); id and received_at key every table, and seq the identity graph change logs, so
    /// they can't be excluded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "excluded_columns_schema")]
    pub exclude: Option<Vec<String>>,
}

fn excluded_columns_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": MAX_COLUMNS_PER_TABLE,
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": 255,
            "not": {"enum": REQUIRED_COLUMNS}
        }
    })
}

/// The observed state of a selection; written only by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelectiveSyncStatus {
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready and Valid, in the metav1.Condition shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// How many tables this selection enables right now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled_tables: Option<i64>,
    /// Track event tables the profile store has seen, so they can be selected after the first
    /// sync: at most 5,000 (and 384 KiB of names), in name order (the object must fit the API
    /// server's size limit); `availableTablesOmitted` counts the rest, and the engine's
    /// `/v1/feeds` lists them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub available_tables: Vec<String>,
    /// How many Track event tables the store has seen beyond those `availableTables` lists;
    /// absent when it lists them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_tables_omitted: Option<i64>,
    /// Rows synced per table in the last sync: every table it touched, or, for a sync of more
    /// tables than its pod's 4 KiB report holds, the failed ones and those with the most rows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<TableSyncStatus>,
    /// How many tables the last sync touched that `tables` does not list (its report was too
    /// large for the pod's 4 KiB termination message); absent when it lists them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables_omitted: Option<i64>,
}

/// Rows synced into one table by the last sync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TableSyncStatus {
    /// Table name in the warehouse.
    pub name: String,
    /// Rows loaded into it by the last sync.
    pub rows: i64,
}

/// Why a selection is invalid (the `Valid` condition's message).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectionError {
    /// More tables than [`MAX_TABLES`].
    #[error("spec.tables lists {0} tables; at most 5000 are allowed (Segment's collection limit)")]
    TooManyTables(usize),
    /// More columns than [`MAX_COLUMNS_PER_TABLE`] for one table.
    #[error("table {table:?} names {count} columns; at most 5000 are allowed per table")]
    TooManyColumns {
        /// The table.
        table: String,
        /// How many columns it names.
        count: usize,
    },
    /// A key column excluded.
    #[error("table {table:?} excludes {column:?}, which keys the table and can't be excluded")]
    RequiredColumnExcluded {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// Columns selected on a materialized table.
    #[error(
        "table {0:?} is materialized (merges rewrite its rows by every column), so its columns can't be selected; enable or disable the table as a whole"
    )]
    MaterializedColumns(String),
    /// Both include and exclude given.
    #[error("table {0:?} sets both columns.include and columns.exclude; set one")]
    IncludeAndExclude(String),
    /// The same table listed twice.
    #[error("table {0:?} is listed more than once")]
    DuplicateTable(String),
    /// A name the sync never gives a table (the CRD's pattern refuses it): it would match none.
    #[error(
        "table {0:?} is no table name: 1 to 255 characters, lowercase snake_case as the sync \
         names tables (the event \"Order Completed\" is table order_completed)"
    )]
    TableName(String),
}

/// Whether `name` matches [`TABLE_NAME_PATTERN`] within the schema's 255 characters.
fn table_name_ok(name: &str) -> bool {
    static PATTERN: std::sync::LazyLock<Option<regex::Regex>> =
        std::sync::LazyLock::new(|| regex::Regex::new(TABLE_NAME_PATTERN).ok());
    (1..=255).contains(&name.chars().count()) && PATTERN.as_ref().is_some_and(|p| p.is_match(name))
}

impl SelectiveSyncSpec {
    /// Checks the limits and rules the API server also enforces, for objects that reached the
    /// controller or the sync another way (an older CRD, a file on disk).
    pub fn validate(&self) -> Result<(), SelectionError> {
        if self.tables.len() > MAX_TABLES {
            return Err(SelectionError::TooManyTables(self.tables.len()));
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.tables {
            if !table_name_ok(&t.name) {
                return Err(SelectionError::TableName(t.name.clone()));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(SelectionError::DuplicateTable(t.name.clone()));
            }
            let Some(cols) = &t.columns else { continue };
            if MATERIALIZED_TABLES.contains(&t.name.as_str()) {
                return Err(SelectionError::MaterializedColumns(t.name.clone()));
            }
            if cols.include.is_some() && cols.exclude.is_some() {
                return Err(SelectionError::IncludeAndExclude(t.name.clone()));
            }
            let list = cols.include.as_ref().or(cols.exclude.as_ref());
            if let Some(list) = list
                && list.len() > MAX_COLUMNS_PER_TABLE
            {
                return Err(SelectionError::TooManyColumns {
                    table: t.name.clone(),
                    count: list.len(),
                });
            }
            if let Some(excluded) = &cols.exclude
                && let Some(c) = excluded
                    .iter()
                    .find(|c| key_columns(&t.name).contains(&c.as_str()))
            {
                return Err(SelectionError::RequiredColumnExcluded {
                    table: t.name.clone(),
                    column: c.clone(),
                });
            }
        }
        Ok(())
    }

    /// Whether `table` is synced under this selection.
    pub fn table_enabled(&self, table: &str) -> bool {
        match self.tables.iter().find(|t| t.name == table) {
            Some(t) => t.enabled,
            None => self.default == TableDefault::All,
        }
    }

    /// Whether `column` of `table` is synced under this selection (key columns always are).
    pub fn column_enabled(&self, table: &str, column: &str) -> bool {
        self.column_filter(table).enabled(column)
    }

    /// The column choice of `table`, for checking many columns: finding the table is done once,
    /// and each check is a set lookup (a selection may list 5,000 tables and 5,000 columns).
    pub fn column_filter(&self, table: &str) -> ColumnFilter<'_> {
        let cols = self
            .tables
            .iter()
            .find(|t| t.name == table)
            .and_then(|t| t.columns.as_ref());
        fn set(list: &Option<Vec<String>>) -> Option<HashSet<&str>> {
            list.as_ref()
                .map(|l| l.iter().map(String::as_str).collect())
        }
        let choice = match cols {
            None => ColumnChoice::All,
            Some(c) => match (set(&c.include), set(&c.exclude)) {
                (Some(inc), _) => ColumnChoice::Only(inc),
                (None, Some(exc)) => ColumnChoice::Except(exc),
                (None, None) => ColumnChoice::All,
            },
        };
        ColumnFilter {
            keys: key_columns(table),
            choice,
        }
    }
}

/// Which columns of one table a selection syncs (see [`SelectiveSyncSpec::column_filter`]).
#[derive(Clone, Debug)]
pub struct ColumnFilter<'a> {
    /// The table's key columns, synced whatever the choice (see [`key_columns`]).
    keys: &'static [&'static str],
    choice: ColumnChoice<'a>,
}

/// A table's column list as the selection gives it.
#[derive(Clone, Debug)]
enum ColumnChoice<'a> {
    /// Every column.
    All,
    /// These columns (and the key columns).
    Only(HashSet<&'a str>),
    /// Every column but these (the key columns always).
    Except(HashSet<&'a str>),
}

impl ColumnFilter<'_> {
    /// Whether the choice excludes columns (so that a property's other spellings are worth
    /// checking against it: [`ColumnFilter::excludes_any`]).
    pub fn has_exclusions(&self) -> bool {
        matches!(self.choice, ColumnChoice::Except(_))
    }

    /// Whether an `exclude` list names any of `names` (the other spellings of a property's
    /// column); an `include` list matches columns by their own names only.
    pub fn excludes_any<S: AsRef<str>>(&self, names: &[S]) -> bool {
        match &self.choice {
            ColumnChoice::Except(exc) => names.iter().any(|n| exc.contains(n.as_ref())),
            ColumnChoice::All | ColumnChoice::Only(_) => false,
        }
    }

    /// Whether `column` is synced.
    pub fn enabled(&self, column: &str) -> bool {
        if self.keys.contains(&column) {
            return true;
        }
        match &self.choice {
            ColumnChoice::All => true,
            ColumnChoice::Only(inc) => inc.contains(column),
            ColumnChoice::Except(exc) => !exc.contains(column),
        }
    }
}
