//! The sync's own state, kept in the warehouse schema beside the data so that it commits in the
//! same transaction as the rows it describes: per-table cursors and selection history, and the
//! source-name → column-name assignments.

use std::collections::{BTreeMap, HashMap};

use super::tables::{COLUMN_NAMES, STATE, STORE};
use crate::warehouse::{Cell, Column, ColumnType, OnConflict, Warehouse, WarehouseError};

/// What the warehouse remembers about one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableState {
    /// The last `seq` loaded (rows up to it are in the table).
    pub cursor: i64,
    /// Whether the selection had the table on at the last sync.
    pub enabled: bool,
    /// When the table was (last) turned on, in microseconds since the epoch.
    pub enabled_since_us: i64,
    /// Events received before this (microseconds) never load into the table (the backfill window).
    pub min_received_at_us: Option<i64>,
    /// Whether the table has caught up with the store's head at least once.
    pub backfilled: bool,
}

fn state_columns() -> Vec<Column> {
    vec![
        Column::new("table_name", ColumnType::Varchar),
        Column::new("cursor_seq", ColumnType::Integer),
        Column::new("enabled", ColumnType::Integer),
        Column::new("enabled_since_us", ColumnType::Integer),
        Column::new("min_received_at_us", ColumnType::Integer),
        Column::new("backfilled", ColumnType::Integer),
    ]
}

fn name_columns() -> Vec<Column> {
    vec![
        Column::new("table_name", ColumnType::Varchar),
        Column::new("source_name", ColumnType::Varchar),
        Column::new("column_name", ColumnType::Varchar),
    ]
}

/// One row (`id` 1): the id of the store the schema is synced from.
fn store_columns() -> Vec<Column> {
    let mut columns = vec![
        Column::new("id", ColumnType::Integer),
        Column::new("store_id", ColumnType::Varchar),
    ];
    columns.extend(anchor_columns());
    columns
}

/// The store table's columns added after its first release: [`migrate_store`] adds them to a
/// table made without them.
fn anchor_columns() -> Vec<Column> {
    vec![
        Column::new("anchor_seq", ColumnType::Integer),
        Column::new("anchor_digest", ColumnType::Integer),
    ]
}

/// The change of the store's history the schema has loaded up to: its `seq`, and a digest of
/// the row (its feed, the messageId of its event — of the event that caused it, for a
/// change-log row — and its profile). A store restored from an older backup keeps its id, and
/// numbers its new changes with `seq`s the schema has loaded; the change it now holds at the
/// anchor's `seq` tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Anchor {
    /// The change's `seq`.
    pub seq: i64,
    /// [`Anchor::of`]'s digest of the row.
    pub digest: i64,
}

impl Anchor {
    /// The anchor of the row at `seq` of `feed` (`events`, `id_graph_updates`, …) caused by the
    /// event `message_id`, on profile `segment_id`. The digest (SipHash-1-3, keys 0) stays the
    /// same across releases, so that an anchor one release recorded is checked by the next.
    fn of(seq: i64, feed: &str, message_id: &str, segment_id: &str) -> Anchor {
        use std::hash::Hasher;
        let mut h = siphasher::sip::SipHasher13::new_with_keys(0, 0);
        for part in [feed, message_id, segment_id] {
            h.write(part.as_bytes());
            h.write_u8(0xff);
        }
        Anchor {
            seq,
            digest: h.finish() as i64,
        }
    }

    /// The anchor of the event at `seq` (its messageId, its profile): the same as
    /// [`Anchor::of_row`] of that event read as a feed row.
    pub fn of_event(seq: i64, message_id: &str, segment_id: &str) -> Anchor {
        Anchor::of(seq, "events", message_id, segment_id)
    }

    /// The anchor of a feed row.
    pub fn of_row(row: &crate::store::FeedRow) -> Anchor {
        use crate::store::FeedRow;
        let (feed, segment_id) = match row {
            FeedRow::IdGraph(r) => ("id_graph_updates", &r.segment_id),
            FeedRow::Mapping(r) => ("external_id_mapping_updates", &r.segment_id),
            FeedRow::Traits(r) => ("profile_traits_updates", &r.segment_id),
            FeedRow::Event(r) => {
                return Anchor::of_event(r.seq, &r.event.message_id, &r.segment_id);
            }
        };
        Anchor::of(row.seq(), feed, row.message_id(), segment_id)
    }
}

/// What the schema records about the store it is synced from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreRecord {
    /// The store's id.
    pub store_id: Option<String>,
    /// The change the schema has loaded up to, when recorded.
    pub anchor: Option<Anchor>,
}

/// Creates the state tables when missing.
pub fn ensure(wh: &mut dyn Warehouse) -> Result<(), WarehouseError> {
    let schema = wh.schema().to_string();
    let a = wh
        .dialect()
        .create_table(&schema, STATE, &state_columns(), &["table_name"]);
    let b = wh.dialect().create_table(
        &schema,
        COLUMN_NAMES,
        &name_columns(),
        &["table_name", "source_name"],
    );
    let c = wh
        .dialect()
        .create_table(&schema, STORE, &store_columns(), &["id"]);
    crate::warehouse::in_transaction(wh, |wh| {
        wh.execute(&a)?;
        wh.execute(&b)?;
        wh.execute(&c).map(|_| ())
    })
}

/// The id of the store the schema is synced from (`None` before its first sync, and in a
/// schema an older release synced).
pub fn read_store(wh: &mut dyn Warehouse) -> Result<StoreRecord, WarehouseError> {
    let table = wh.dialect().qualified(wh.schema(), STORE);
    let rows = wh.query(&format!(
        "SELECT store_id, anchor_seq, anchor_digest FROM {table} WHERE id = 1"
    ))?;
    let Some(row) = rows.into_iter().next() else {
        return Ok(StoreRecord::default());
    };
    let anchor = match (row.get(1).cloned().flatten(), row.get(2).cloned().flatten()) {
        (seq @ Some(_), digest @ Some(_)) => Some(Anchor {
            seq: int(&seq, "anchor_seq")?,
            digest: int(&digest, "anchor_digest")?,
        }),
        _ => None,
    };
    Ok(StoreRecord {
        store_id: row.into_iter().next().flatten(),
        anchor,
    })
}

/// Adds the columns a store table made by an earlier release lacks (`tables` as described).
pub fn migrate_store(
    wh: &mut dyn Warehouse,
    tables: &BTreeMap<String, crate::warehouse::TableColumns>,
) -> Result<(), WarehouseError> {
    let Some(existing) = tables.get(STORE) else {
        return Ok(());
    };
    let schema = wh.schema().to_string();
    let missing: Vec<String> = anchor_columns()
        .iter()
        .filter(|c| !existing.contains_key(&c.name))
        .map(|c| wh.dialect().add_column(&schema, STORE, c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let added = crate::warehouse::in_transaction(wh, |wh| {
        missing
            .iter()
            .try_for_each(|sql| wh.execute(sql).map(|_| ()))
    });
    // Another sync into the schema may have added them since `tables` was read.
    match added {
        Err(e) if !has_anchor_columns(&wh.describe()?) => Err(e),
        _ => Ok(()),
    }
}

fn has_anchor_columns(tables: &BTreeMap<String, crate::warehouse::TableColumns>) -> bool {
    tables
        .get(STORE)
        .is_some_and(|t| anchor_columns().iter().all(|c| t.contains_key(&c.name)))
}

/// Records `anchor` unless the one recorded is newer: with a chunk's cursor, in its
/// transaction. (The store's row must exist: [`write_store`] first.)
pub fn advance_anchor(wh: &mut dyn Warehouse, anchor: Anchor) -> Result<(), WarehouseError> {
    let table = wh.dialect().qualified(wh.schema(), STORE);
    wh.execute(&format!(
        "UPDATE {table} SET anchor_seq = {seq}, anchor_digest = {} \
         WHERE id = 1 AND (anchor_seq IS NULL OR anchor_seq <= {seq})",
        anchor.digest,
        seq = anchor.seq
    ))?;
    Ok(())
}

/// Forgets the recorded anchor.
pub fn clear_anchor(wh: &mut dyn Warehouse) -> Result<(), WarehouseError> {
    let table = wh.dialect().qualified(wh.schema(), STORE);
    wh.execute(&format!(
        "UPDATE {table} SET anchor_seq = NULL, anchor_digest = NULL WHERE id = 1"
    ))?;
    Ok(())
}

/// Records `id` as the store the schema is synced from, in place of any other (whose anchor
/// goes with it).
pub fn write_store(wh: &mut dyn Warehouse, id: &str) -> Result<(), WarehouseError> {
    let table = wh.dialect().qualified(wh.schema(), STORE);
    let id = id.replace('\'', "''");
    crate::warehouse::in_transaction(wh, |wh| {
        wh.execute(&format!("DELETE FROM {table}"))?;
        wh.execute(&format!(
            "INSERT INTO {table} (id, store_id) VALUES (1, '{id}')"
        ))
        .map(|_| ())
    })
}

fn int(v: &Option<String>, what: &str) -> Result<i64, WarehouseError> {
    v.as_deref().and_then(|s| s.parse().ok()).ok_or_else(|| {
        WarehouseError::internal(format!("state table: {what} is not an integer: {v:?}"))
    })
}

/// Every table's state.
pub fn read(wh: &mut dyn Warehouse) -> Result<BTreeMap<String, TableState>, WarehouseError> {
    let table = wh.dialect().qualified(wh.schema(), STATE);
    let rows = wh.query(&format!(
        "SELECT table_name, cursor_seq, enabled, enabled_since_us, min_received_at_us, backfilled FROM {table}"
    ))?;
    let mut out = BTreeMap::new();
    for r in rows {
        let name = r
            .first()
            .cloned()
            .flatten()
            .ok_or_else(|| WarehouseError::internal("state table: a row has no name"))?;
        let backfilled = int(&r[5], "backfilled")? != 0;
        // The backfill window bounds only the history a table's first sync found: an older
        // release kept the cutoff after the table caught up, and this release's first sync
        // would still skip the events imported (with their own, older receivedAt) since.
        let min = match r.get(4).cloned().flatten() {
            None => None,
            _ if backfilled => None,
            some => Some(int(&some, "min_received_at_us")?),
        };
        out.insert(
            name,
            TableState {
                cursor: int(&r[1], "cursor_seq")?,
                enabled: int(&r[2], "enabled")? != 0,
                enabled_since_us: int(&r[3], "enabled_since_us")?,
                min_received_at_us: min,
                backfilled,
            },
        );
    }
    Ok(out)
}

/// Every table's source → column assignments.
pub fn read_names(
    wh: &mut dyn Warehouse,
) -> Result<HashMap<String, Vec<(String, String)>>, WarehouseError> {
    let table = wh.dialect().qualified(wh.schema(), COLUMN_NAMES);
    let mut out: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for r in wh.query(&format!(
        "SELECT table_name, source_name, column_name FROM {table}"
    ))? {
        if let [Some(t), Some(s), Some(c)] = &r[..] {
            out.entry(t.clone())
                .or_default()
                .push((s.clone(), c.clone()));
        }
    }
    Ok(out)
}

/// Writes table states inside the caller's transaction.
pub fn write(wh: &mut dyn Warehouse, states: &[(&str, &TableState)]) -> Result<(), WarehouseError> {
    if states.is_empty() {
        return Ok(());
    }
    let rows: Vec<Vec<Cell>> = states
        .iter()
        .map(|(name, s)| {
            vec![
                Cell::Text(name.to_string()),
                Cell::Int(s.cursor),
                Cell::Int(i64::from(s.enabled)),
                Cell::Int(s.enabled_since_us),
                s.min_received_at_us.map(Cell::Int).unwrap_or(Cell::Null),
                Cell::Int(i64::from(s.backfilled)),
            ]
        })
        .collect();
    let cols = state_columns();
    wh.stage("_ps_state_stage", &cols, &rows)?;
    let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
    let sql = wh.dialect().merge_from_stage(
        wh.schema(),
        STATE,
        "_ps_state_stage",
        &names,
        &["table_name"],
        OnConflict::Update,
    );
    wh.execute(&sql)?;
    Ok(())
}

/// Deletes the state row of `name` inside the caller's transaction.
pub fn remove(wh: &mut dyn Warehouse, name: &str) -> Result<(), WarehouseError> {
    let table = wh.dialect().qualified(wh.schema(), STATE);
    let name = name.replace('\'', "''");
    wh.execute(&format!("DELETE FROM {table} WHERE table_name = '{name}'"))?;
    Ok(())
}

/// Moves `old`'s source → column assignments to `new` (a renamed table), inside the caller's
/// transaction.
pub fn rename_names(wh: &mut dyn Warehouse, old: &str, new: &str) -> Result<(), WarehouseError> {
    let table = wh.dialect().qualified(wh.schema(), COLUMN_NAMES);
    let (old, new) = (old.replace('\'', "''"), new.replace('\'', "''"));
    wh.execute(&format!(
        "UPDATE {table} SET table_name = '{new}' WHERE table_name = '{old}'"
    ))?;
    Ok(())
}

/// Records new source → column assignments of `table` inside the caller's transaction.
pub fn write_names(
    wh: &mut dyn Warehouse,
    table: &str,
    names: &[(String, String)],
) -> Result<(), WarehouseError> {
    if names.is_empty() {
        return Ok(());
    }
    let rows: Vec<Vec<Cell>> = names
        .iter()
        .map(|(s, c)| {
            vec![
                Cell::Text(table.to_string()),
                Cell::Text(s.clone()),
                Cell::Text(c.clone()),
            ]
        })
        .collect();
    let cols = name_columns();
    wh.stage("_ps_names_stage", &cols, &rows)?;
    let sql = wh.dialect().merge_from_stage(
        wh.schema(),
        COLUMN_NAMES,
        "_ps_names_stage",
        &["table_name", "source_name", "column_name"],
        &["table_name", "source_name"],
        OnConflict::Ignore,
    );
    wh.execute(&sql)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite() -> (tempfile::TempDir, Box<dyn Warehouse>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let wh = crate::warehouse::sqlite::SqliteWarehouse::open(&dir.path().join("wh.db"), "s")
            .expect("warehouse");
        (dir, Box::new(wh))
    }

    /// Two syncs that both found an earlier release's store table: the second one's columns
    /// are already there when it adds them, and it goes on.
    #[test]
    fn columns_another_sync_added_meanwhile_are_taken() {
        let (_dir, mut wh) = sqlite();
        let table = wh.dialect().qualified(wh.schema(), STORE);
        wh.execute(&format!(
            "CREATE TABLE {table} (id INTEGER, store_id VARCHAR, PRIMARY KEY (id))"
        ))
        .expect("create");
        let before = wh.describe().expect("describe");
        migrate_store(&mut *wh, &before).expect("the first adds them");
        assert!(has_anchor_columns(&wh.describe().expect("describe")));
        migrate_store(&mut *wh, &before).expect("the second, with what it read before, too");
    }

    /// A failure that leaves the columns missing is reported.
    #[test]
    fn columns_that_cannot_be_added_are_an_error() {
        let (_dir, mut wh) = sqlite();
        let mut tables = BTreeMap::new();
        tables.insert(STORE.to_string(), Default::default());
        assert!(migrate_store(&mut *wh, &tables).is_err(), "no such table");
    }
}
