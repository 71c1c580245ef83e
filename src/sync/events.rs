//! Routing events to their warehouse tables (`identifies`, `tracks`, ..., one table per Track
//! event) and flattening each into that table's columns.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use super::columns::{ColumnMap, Field, remember, same_name_reason};
use super::load::{ColumnName, PendingRow};
use super::naming::{fit, identifier, table_name};
use super::tables::{DISCARDS, event_base_columns, event_reserved_columns, known_tables};
use crate::crd::{ColumnFilter, SelectiveSyncSpec, TableSelection};
use crate::event::{Event, EventType, Section};
use crate::store::FlatEventRow;
use crate::warehouse::{Cell, Column, ColumnType};

/// The per-event table of a Track event name, safe for a warehouse with `max_len`-byte names;
/// names that would shadow a profiles-sync table, a feed of the engine's API (`events`) or
/// SQLite's own (`sqlite_…`) get a `_` prefix.
pub fn track_table(event: &str, max_len: usize) -> String {
    let name = identifier(event, max_len);
    let shadows = known_tables().contains(&name.as_str())
        || crate::store::Feed::TABLES.contains(&name.as_str())
        || name == DISCARDS
        || name.starts_with("_profiles_sync")
        // SQLite keeps `sqlite_` names for itself; every warehouse prefixes them, so names
        // stay the same across warehouses.
        || name.starts_with("sqlite_");
    if shadows {
        fit(&format!("_{name}"), event, max_len)
    } else {
        name
    }
}

/// `sel` with an entry for each Track event table it names by its whole name
/// (`naming::table_name`, as `SelectiveSync.status.availableTables` lists it) under the name
/// the warehouse gives the table, when its identifier limit shortens the name; `None` when
/// nothing needs renaming. An entry naming the shortened table already wins. Two events whose
/// whole names are one (`Checkout Step …` and `checkout step …`, past the limit) have two
/// shortened tables (the hash is of the event's own name): the entry applies to both. The
/// whole-name entry stays (no table has that name), so that a table of an event `events` did
/// not hold is recognised as one the run could not rename ([`unrenamed`]).
pub fn with_warehouse_names(
    sel: &SelectiveSyncSpec,
    events: &[String],
    max_len: usize,
) -> Option<SelectiveSyncSpec> {
    let mut out: Option<SelectiveSyncSpec> = None;
    for event in events {
        let (whole, short) = (table_name(event), track_table(event, max_len));
        let current = out.as_ref().unwrap_or(sel);
        if whole == short || current.tables.iter().any(|t| t.name == short) {
            continue;
        }
        let Some(entry) = sel.tables.iter().find(|t| t.name == whole) else {
            continue;
        };
        let renamed = TableSelection {
            name: short,
            ..entry.clone()
        };
        out.get_or_insert_with(|| sel.clone()).tables.push(renamed);
    }
    out
}

/// Whether `table`, the warehouse's (shortened) table of the Track event `event`, is one the
/// selection `sel` names only by the whole name: [`with_warehouse_names`] did not know the
/// event (it first came after the run read the names), so the run cannot tell whether, or
/// with which columns, the table is on.
pub fn unrenamed(sel: Option<&SelectiveSyncSpec>, event: &str, table: &str) -> bool {
    sel.is_some_and(|s| {
        if s.tables.iter().any(|t| t.name == table) {
            return false;
        }
        let whole = table_name(event);
        whole != table && s.tables.iter().any(|t| t.name == whole)
    })
}

/// The fixed columns of an event table of `event_type` (`per_event`: a Track event's own table).
pub fn fixed_columns(event_type: EventType) -> Vec<Column> {
    let mut cols = event_base_columns();
    let v = |n: &str| Column::new(n, ColumnType::Varchar);
    match event_type {
        EventType::Track => cols.extend([v("event"), v("event_text")]),
        EventType::Page | EventType::Screen => cols.extend([v("name"), v("category")]),
        EventType::Group => cols.push(v("group_id")),
        EventType::Alias => cols.push(v("previous_id")),
        EventType::Identify => {}
    }
    cols
}

/// Builds rows for event tables, remembering each table's column names.
pub struct Router<'a> {
    selection: Option<&'a SelectiveSyncSpec>,
    max_len: usize,
    maps: HashMap<String, TableColumns<'a>>,
    saved: HashMap<String, Vec<(String, String)>>,
    /// Track event name → its table ([`track_table`] is too slow to run per row).
    track_tables: HashMap<String, Arc<str>>,
    /// The last Track event name looked up, and its table: an event's targets and then its
    /// row ask for the same name, and a run of one event is common.
    last_track: Option<(String, Arc<str>)>,
    /// Each event type's table.
    type_tables: Vec<(EventType, Arc<str>)>,
}

/// One event table's columns: the name map, and what each position of the previous row decided.
struct TableColumns<'a> {
    map: ColumnMap,
    /// The selection's column choice for the table.
    filter: Option<ColumnFilter<'a>>,
    /// Position → (property path, its column, or `None` when dropped or deselected). Rows of one
    /// table mostly carry the same properties in the same order, so a repeat costs a string
    /// comparison instead of a name lookup and a selection check (a linear scan of the
    /// selection's tables).
    at: Vec<Option<(String, Option<ColumnName>)>>,
}

/// `v` moved out (leaving the default) when `take`, else copied.
fn grab<T: Clone + Default>(v: &mut T, take: bool) -> T {
    if take { std::mem::take(v) } else { v.clone() }
}

impl<'a> Router<'a> {
    /// A router applying `selection`'s column choices.
    pub fn new(
        selection: Option<&'a SelectiveSyncSpec>,
        max_len: usize,
        names: HashMap<String, Vec<(String, String)>>,
    ) -> Router<'a> {
        Router {
            selection,
            max_len,
            maps: HashMap::new(),
            saved: names,
            track_tables: HashMap::new(),
            last_track: None,
            type_tables: EventType::ALL
                .iter()
                .map(|t| (*t, Arc::from(t.table())))
                .collect(),
        }
    }

    /// The column map of `table` (an event table of `event_type`): its reserved names pre-taken,
    /// then the warehouse's saved names.
    fn map(&mut self, table: &str, event_type: EventType) -> &mut TableColumns<'a> {
        if !self.maps.contains_key(table) {
            let mut map = ColumnMap::with_reserved(event_reserved_columns(event_type));
            for (s, c) in self.saved.remove(table).unwrap_or_default() {
                map.restore(s, c);
            }
            let filter = self.selection.map(|s| s.column_filter(table));
            self.maps.insert(
                table.to_string(),
                TableColumns {
                    map,
                    filter,
                    at: vec![],
                },
            );
        }
        self.maps.get_mut(table).expect("inserted above")
    }

    /// Adds to `out` the tables an event lands in: its type's table, and for a Track event its
    /// own table (names shared, so routing an event allocates none).
    pub fn targets(&mut self, event: &Event, out: &mut Vec<Arc<str>>) {
        if let Some((_, t)) = self
            .type_tables
            .iter()
            .find(|(t, _)| *t == event.event_type)
        {
            out.push(t.clone());
        }
        if let (EventType::Track, Some(name)) = (event.event_type, &event.event) {
            out.push(self.track_table(name));
        }
    }

    /// [`track_table`] of `name`, computed once per name.
    fn track_table(&mut self, name: &str) -> Arc<str> {
        if let Some((last, table)) = &self.last_track
            && last == name
        {
            return table.clone();
        }
        let table = match self.track_tables.get(name) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = track_table(name, self.max_len).into();
                self.track_tables.insert(name.to_string(), t.clone());
                t
            }
        };
        self.last_track = Some((name.to_string(), table.clone()));
        table
    }

    /// The row of `event` for `table`. With `take` (the event's last table) the event's strings
    /// and values move into the row instead of being copied, leaving them empty.
    pub fn row(
        &mut self,
        table: &str,
        row: &mut FlatEventRow,
        take: bool,
    ) -> (PendingRow, Vec<(String, String)>) {
        let e = &mut row.event.event;
        let leaves = &mut row.event.leaves;
        let row_id = e.message_id.clone();
        let text = |s: &mut String| Field::Json(Value::String(grab(s, take)));
        let opt = |s: &mut Option<String>| {
            Field::Json(grab(s, take).map(Value::String).unwrap_or(Value::Null))
        };
        // The fixed columns (at most 12) and the leaves.
        let mut values: Vec<(ColumnName, Field)> = Vec::with_capacity(12 + leaves.len());
        let mut fixed = |name: &'static str, v: Field| values.push((ColumnName::Fixed(name), v));
        fixed("id", text(&mut e.message_id));
        fixed("anonymous_id", opt(&mut e.anonymous_id));
        fixed("user_id", opt(&mut e.user_id));
        fixed("received_at", Field::Time(e.received_at));
        fixed("sent_at", e.sent_at.into());
        fixed("original_timestamp", e.original_timestamp.into());
        fixed("timestamp", Field::Time(e.timestamp));
        fixed("segment_id", text(&mut row.segment_id));
        fixed("event_source_id", text(&mut e.source_id));
        fixed("seq", Field::Json(Value::from(row.seq)));
        let per_event_table = table != e.event_type.table();
        match e.event_type {
            EventType::Track => {
                let name = e.event.as_deref().unwrap_or_default();
                let table = self.track_table(name).to_string();
                fixed("event", Field::Json(Value::String(table)));
                fixed("event_text", opt(&mut e.event));
            }
            EventType::Page | EventType::Screen => {
                fixed("name", opt(&mut e.name));
                fixed("category", opt(&mut e.category));
            }
            EventType::Group => fixed("group_id", opt(&mut e.group_id)),
            EventType::Alias => fixed("previous_id", opt(&mut e.previous_id)),
            EventType::Identify => {}
        }
        let body = match e.event_type {
            EventType::Identify | EventType::Group => Some(Section::Traits),
            EventType::Track if !per_event_table => None,
            _ => Some(Section::Properties),
        };
        let sections: &[Section] = match body {
            Some(body) => &[Section::Context, body, Section::Extra],
            None => &[Section::Context, Section::Extra],
        };
        let max_len = self.max_len;
        let cols = self.map(table, e.event_type);
        let mut p = 0;
        leaves.visit(sections, |path, value| {
            let column = match cols.at.get(p) {
                Some(Some((seen, column))) if seen == path => column.clone(),
                _ => {
                    // The map never gives a property a reserved (fixed) column, nor two
                    // property paths one column; only two properties with the same path
                    // (a literal dotted key and a nested one) meet in a column, handled below.
                    let column = cols
                        .map
                        .column(path, max_len)
                        .filter(|c| {
                            cols.filter
                                .as_ref()
                                .is_none_or(|f| property_enabled(f, c, path, max_len))
                        })
                        .map(ColumnName::from);
                    remember(&mut cols.at, p, Some((path.to_string(), column.clone())));
                    column
                }
            };
            p += 1;
            if let Some(column) = column {
                values.push((column, Field::Json(grab(value, take))));
            }
        });
        let new = cols.map.take_new();
        // Leaves can share a path (a literal dotted key and a nested one; a property and an
        // unknown top-level key of the same name; a property object named `context` and the
        // context): the first keeps the column, the others go to discards (checked only when
        // the message makes it possible).
        let mut refused = vec![];
        if leaves.may_share_paths(sections) {
            let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
            let mut kept = Vec::with_capacity(values.len());
            for (column, v) in values {
                if matches!(column, ColumnName::Property(_)) && !seen.insert(column.to_string()) {
                    refused.push((column.to_string(), v, same_name_reason(&column)));
                } else {
                    kept.push((column, v));
                }
            }
            values = kept;
        }
        let pending = PendingRow {
            row_id,
            received_at: Cell::Timestamp(e.received_at),
            values,
            refused,
        };
        (pending, new)
    }
}

/// Whether the selection's `filter` syncs `column`, the column of the property `path`: by its
/// own name, and, for an `exclude` list, by none of the property's other spellings
/// ([`ColumnMap::spellings`]).
pub(super) fn property_enabled(
    filter: &crate::crd::ColumnFilter<'_>,
    column: &str,
    path: &str,
    max_len: usize,
) -> bool {
    filter.enabled(column)
        && !(filter.has_exclusions()
            && filter.excludes_any(&super::columns::ColumnMap::spellings(path, max_len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ParseOptions;
    use serde_json::json;

    fn row(seq: i64, properties: Value) -> FlatEventRow {
        let msg = json!({"type": "track", "event": "Order Completed", "userId": "u1",
                         "messageId": format!("m{seq}"), "properties": properties});
        let opts = ParseOptions::new(jiff::Timestamp::UNIX_EPOCH, "src");
        crate::store::EventRow {
            seq,
            segment_id: "use_1".into(),
            event: Event::from_json(&msg, None, &opts).expect("valid event"),
        }
        .into()
    }

    /// The properties part of a row: (column, value) after the fixed columns.
    fn properties(router: &mut Router<'_>, r: &FlatEventRow) -> Vec<(String, Value)> {
        let (pending, _) = router.row("order_completed", &mut r.clone(), false);
        pending
            .values
            .into_iter()
            .filter(|(c, _)| matches!(c, ColumnName::Property(_)))
            .map(|(c, v)| match v {
                Field::Json(v) => (c.to_string(), v),
                Field::Time(t) => (c.to_string(), json!(t.to_string())),
            })
            .collect()
    }

    /// SQLite refuses to create `sqlite_…` tables ("reserved for internal use"): such events
    /// get a `_` prefix, in every warehouse alike.
    #[test]
    fn events_named_like_sqlites_own_tables_get_a_prefix() {
        assert_eq!(track_table("sqlite stat1", 63), "_sqlite_stat1");
        assert_eq!(track_table("sqlite master", 63), "_sqlite_master");
        assert_eq!(track_table("sqlitely", 63), "sqlitely");
    }

    /// A row built by taking the event's values equals one built by copying them, and taking
    /// leaves the event's values empty.
    #[test]
    fn taking_the_values_builds_the_same_row_as_copying_them() {
        let mut router = Router::new(None, 63, HashMap::new());
        let r = row(
            7,
            json!({"total": 5, "coupon": "A", "items": [1, 2], "nested": {"x": "y"}}),
        );
        let (copied, _) = router.row("order_completed", &mut r.clone(), false);
        let mut taken_from = r.clone();
        let (taken, _) = router.row("order_completed", &mut taken_from, true);
        assert_eq!(copied.values, taken.values);
        assert_eq!(copied.row_id, taken.row_id);
        assert!(taken_from.event.event.message_id.is_empty());
        assert!(
            taken_from
                .event
                .leaves
                .of(Section::Properties)
                .iter()
                .all(|(_, v)| v.is_null())
        );
    }

    /// Leaves of different parts of a message with the same path (an unknown top-level key and a
    /// property of that name; a property object named `context` and the real context) never
    /// share a column silently: the first keeps it, the others go to discards.
    #[test]
    fn leaves_sharing_a_path_across_sections_keep_one_column() {
        let opts = ParseOptions::new(jiff::Timestamp::UNIX_EPOCH, "src");
        let msg = json!({"type": "track", "event": "Order Completed", "userId": "u1",
                         "messageId": "m1", "channel": "web",
                         "context": {"ip": "1.2.3.4"},
                         "properties": {"channel": "email", "context": {"ip": "5.6.7.8"}}});
        let mut r: FlatEventRow = crate::store::EventRow {
            seq: 1,
            segment_id: "use_1".into(),
            event: Event::from_json(&msg, None, &opts).expect("valid event"),
        }
        .into();
        let mut router = Router::new(None, 63, HashMap::new());
        let (pending, _) = router.row("order_completed", &mut r, false);
        let mut names: Vec<String> = pending.values.iter().map(|(c, _)| c.to_string()).collect();
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all, "a column listed twice: {names:?}");
        let value = |col: &str| {
            pending
                .values
                .iter()
                .find(|(c, _)| c.to_string() == col)
                .map(|(_, v)| v.clone().into_text())
        };
        assert_eq!(value("context_ip").as_deref(), Some("1.2.3.4"));
        assert_eq!(value("channel").as_deref(), Some("email"));
        let mut refused: Vec<(String, String)> = pending
            .refused
            .into_iter()
            .map(|(c, v, _)| (c, v.into_text()))
            .collect();
        refused.sort();
        assert_eq!(
            refused,
            [
                ("channel".to_string(), "web".to_string()),
                ("context_ip".to_string(), "5.6.7.8".to_string())
            ]
        );
    }

    /// Properties that move, disappear, turn null, are deselected or have an empty name land in
    /// the same columns as they would in a row of their own.
    #[test]
    fn properties_keep_their_columns_whatever_the_previous_row_carried() {
        let selection: SelectiveSyncSpec = serde_json::from_value(json!({
            "connectionRef": {"name": "c"},
            "tables": [{"name": "order_completed", "columns": {"exclude": ["coupon"]}}]
        }))
        .expect("selection");
        let mut router = Router::new(Some(&selection), 63, HashMap::new());
        let rows = [
            row(1, json!({"total": 5, "coupon": "A", "Currency": "EUR"})),
            row(2, json!({"coupon": "B", "total": 6, "": "blank"})),
            row(3, json!({"Currency": null, "total": 7, "items": [1]})),
            row(4, json!({"total": 8, "coupon": "C", "Currency": "USD"})),
        ];
        let got: Vec<Vec<(String, Value)>> =
            rows.iter().map(|r| properties(&mut router, r)).collect();
        // Each row alone, through a router that has seen nothing else.
        let alone: Vec<Vec<(String, Value)>> = rows
            .iter()
            .map(|r| properties(&mut Router::new(Some(&selection), 63, HashMap::new()), r))
            .collect();
        assert_eq!(got, alone);
        assert_eq!(
            got[0],
            [
                ("total".into(), json!(5)),
                ("currency".into(), json!("EUR"))
            ]
        );
        assert_eq!(
            got[2],
            [("total".into(), json!(7)), ("items".into(), json!([1]))]
        );
        assert_eq!(
            got[1].len(),
            2,
            "the empty name gets a column of its own: {:?}",
            got[1]
        );
        assert!(
            got.iter().flatten().all(|(c, _)| c != "coupon"),
            "deselected"
        );
    }
}
