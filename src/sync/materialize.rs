//! The materialized profile tables — `user_identifiers`, `user_traits`, `profile_merges` —
//! kept current from the three identity change logs, one window of `seq`s per transaction.
//!
//! Within a window the changes are applied set-wise in an order that gives the same result as
//! applying them one by one: new identifiers first (an identifier is always attached to a live
//! profile), then each profile's latest trait snapshot, then the merges with each merged-away
//! profile mapped to its final survivor (the recursive `id_graph_updates` rows make the latest
//! row per profile fully resolved).

use std::collections::BTreeMap;

use serde_json::Value;

use super::RunError;
use super::columns::{escape_nul, key_text, storable_time};
use super::load::{Schema, ensure_table};
use super::source::FeedSource;
use super::state::{self, TableState};
use super::tables::{PROFILE_MERGES, USER_IDENTIFIERS, USER_TRAITS, fixed};
use crate::store::{Feed, FeedRow, Trigger};
use crate::warehouse::{Cell, Column, ColumnType, OnConflict, Warehouse, WarehouseError};

fn tail(seq: i64, t: &Trigger) -> [Cell; 3] {
    // These tables have no discards: an event time no warehouse can hold (a wild `sentAt`
    // skews it past year 1) is left empty rather than failing the tables on every run.
    let time = |t: jiff::Timestamp| {
        if storable_time(t) {
            Cell::Timestamp(t)
        } else {
            Cell::Null
        }
    };
    [Cell::Int(seq), time(t.received_at), time(t.timestamp)]
}

fn columns(table: &str) -> Vec<Column> {
    fixed(table).map(|t| t.columns).unwrap_or_default()
}

/// The rows of `table` in column order, with `uuid_ts` filled in.
fn with_uuid(rows: Vec<(Vec<Cell>, [Cell; 3])>, uuid: jiff::Timestamp) -> Vec<Vec<Cell>> {
    // The fixed columns end with seq, received_at, uuid_ts, timestamp.
    rows.into_iter()
        .map(|(mut head, [seq, received, timestamp])| {
            head.extend([seq, received, Cell::Timestamp(uuid), timestamp]);
            head
        })
        .collect()
}

fn trait_text(v: &Value) -> Cell {
    match v {
        Value::Null => Cell::Null,
        Value::String(s) => Cell::Text(escape_nul(s).into_owned()),
        other => Cell::Text(other.to_string()),
    }
}

/// One window of the three identity logs: their rows after the window's start, up to `end`.
pub struct Window {
    graph: Vec<FeedRow>,
    mappings: Vec<FeedRow>,
    traits: Vec<FeedRow>,
    /// The window's last `seq`.
    pub end: i64,
    /// Rows read from the feeds (for `limits.maxRows`).
    pub read: u64,
}

/// Reads the window of the identity logs after `after`: `None` when they hold nothing new up to
/// `head`. The window ends at the last row of a page that may have more after it (full, or cut
/// short by size), else at the last row read, and never past `head`.
///
/// `head` must have been read before any of the logs: every row up to it is committed (commit
/// order is seq order), so a window never ends past a row one log committed after it was read.
pub fn read_window(
    source: &mut dyn FeedSource,
    after: i64,
    head: i64,
    page: usize,
) -> Result<Option<Window>, RunError> {
    let mut read = |feed: Feed| {
        source
            .read_page(&feed, after, page)
            .map_err(RunError::Source)
    };
    let (graph, graph_more) = read(Feed::IdGraphUpdates)?;
    let (mappings, mappings_more) = read(Feed::ExternalIdMappingUpdates)?;
    let (traits, traits_more) = read(Feed::ProfileTraitsUpdates)?;
    let pages = [
        (&graph, graph_more),
        (&mappings, mappings_more),
        (&traits, traits_more),
    ];
    let open_end = pages
        .iter()
        .filter(|(_, more)| *more)
        .filter_map(|(p, _)| p.last().map(FeedRow::seq))
        .min();
    let end = open_end
        .unwrap_or_else(|| {
            pages
                .iter()
                .filter_map(|(p, _)| p.last().map(FeedRow::seq))
                .max()
                .unwrap_or(after)
        })
        .min(head);
    if end <= after {
        return Ok(None);
    }
    let read = (graph.len() + mappings.len() + traits.len()) as u64;
    Ok(Some(Window {
        graph,
        mappings,
        traits,
        end,
        read,
    }))
}

/// Applies `window` to `table` (one of [`USER_IDENTIFIERS`], [`USER_TRAITS`],
/// [`PROFILE_MERGES`]) in a transaction of its own that also moves the table's cursor to the
/// window's end; returns the rows written. The table's cursor must be the window's start.
pub fn apply_window(
    wh: &mut dyn Warehouse,
    schema: &mut Schema,
    table: &str,
    cursor_state: &mut TableState,
    window: &Window,
    uuid: jiff::Timestamp,
) -> Result<u64, WarehouseError> {
    let end = window.end;
    // Each table reads only its part of the window (the window is applied once per table).
    let mut idents = vec![];
    for r in window.mappings.iter().filter(|_| table == USER_IDENTIFIERS) {
        if let FeedRow::Mapping(m) = r
            && m.seq <= end
        {
            idents.push((
                vec![
                    Cell::Text(m.segment_id.clone()),
                    Cell::Text(key_text(&m.external_id_type).into_owned()),
                    Cell::Text(key_text(&m.external_id_value).into_owned()),
                ],
                tail(m.seq, &m.trigger),
            ));
        }
    }
    let mut snapshots: BTreeMap<&str, &crate::store::TraitsRow> = BTreeMap::new();
    for r in window.traits.iter().filter(|_| table == USER_TRAITS) {
        if let FeedRow::Traits(t) = r
            && t.seq <= end
        {
            snapshots.insert(&t.segment_id, t);
        }
    }
    let mut final_canonical: BTreeMap<&str, (&str, i64, &Trigger)> = BTreeMap::new();
    for r in &window.graph {
        if let FeedRow::IdGraph(g) = r
            && g.seq <= end
            && g.segment_id != g.canonical_segment_id
        {
            final_canonical.insert(&g.segment_id, (&g.canonical_segment_id, g.seq, &g.trigger));
        }
    }

    let mut next = cursor_state.clone();
    next.cursor = end;
    let mut written = 0;
    wh.begin()?;
    let result = apply(
        wh,
        schema,
        table,
        uuid,
        idents,
        &snapshots,
        &final_canonical,
        &next,
        &mut written,
    );
    match result {
        Ok(()) => wh.commit()?,
        Err(e) => {
            let _ = wh.rollback();
            return Err(e);
        }
    }
    let cols = schema.tables.entry(table.to_string()).or_default();
    for c in columns(table) {
        cols.entry(c.name).or_insert(c.ty);
    }
    *cursor_state = next;
    Ok(written)
}

#[allow(clippy::too_many_arguments)]
fn apply(
    wh: &mut dyn Warehouse,
    schema: &Schema,
    table: &str,
    uuid: jiff::Timestamp,
    idents: Vec<(Vec<Cell>, [Cell; 3])>,
    snapshots: &BTreeMap<&str, &crate::store::TraitsRow>,
    merges: &BTreeMap<&str, (&str, i64, &Trigger)>,
    next: &TableState,
    written: &mut u64,
) -> Result<(), WarehouseError> {
    let s = wh.schema().to_string();
    let t = fixed(table)
        .ok_or_else(|| WarehouseError::internal(format!("no definition of {table}")))?;
    ensure_table(wh, schema, table, &t.columns, t.key)?;
    let merge_into = |wh: &mut dyn Warehouse,
                      table: &str,
                      stage: &str,
                      rows: Vec<Vec<Cell>>|
     -> Result<u64, WarehouseError> {
        let cols = columns(table);
        let key = fixed(table).map(|t| t.key).unwrap_or(&[]);
        wh.stage(stage, &cols, &rows)?;
        let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
        let sql = wh.dialect().merge_from_stage(
            wh.schema(),
            table,
            stage,
            &names,
            key,
            OnConflict::Update,
        );
        wh.execute(&sql)
    };
    if table == USER_IDENTIFIERS && !idents.is_empty() {
        *written += merge_into(wh, USER_IDENTIFIERS, "_ps_idents", with_uuid(idents, uuid))?;
    }
    if table == USER_TRAITS && !snapshots.is_empty() {
        let subjects: Vec<Vec<Cell>> = snapshots
            .keys()
            .map(|k| vec![Cell::Text(k.to_string())])
            .collect();
        wh.stage(
            "_ps_trait_subjects",
            &[Column::new("segment_id", ColumnType::Varchar)],
            &subjects,
        )?;
        let sql = wh.dialect().delete_in_stage(
            &s,
            USER_TRAITS,
            "canonical_segment_id",
            "_ps_trait_subjects",
            "segment_id",
        );
        wh.execute(&sql)?;
        let mut rows = vec![];
        for (segment_id, snap) in snapshots {
            for (name, value) in &snap.traits {
                rows.push((
                    vec![
                        Cell::Text(segment_id.to_string()),
                        Cell::Text(key_text(name).into_owned()),
                        trait_text(value),
                    ],
                    tail(snap.seq, &snap.trigger),
                ));
            }
        }
        if !rows.is_empty() {
            *written += merge_into(wh, USER_TRAITS, "_ps_traits", with_uuid(rows, uuid))?;
        }
    }
    if !merges.is_empty() {
        let map_cols = [
            Column::new("segment_id", ColumnType::Varchar),
            Column::new("canonical_segment_id", ColumnType::Varchar),
        ];
        let map_rows: Vec<Vec<Cell>> = merges
            .iter()
            .map(|(from, (to, _, _))| {
                vec![Cell::Text(from.to_string()), Cell::Text(to.to_string())]
            })
            .collect();
        wh.stage("_ps_merge_map", &map_cols, &map_rows)?;
        if table == USER_IDENTIFIERS {
            let sql = wh.dialect().update_from_stage(
                &s,
                USER_IDENTIFIERS,
                "canonical_segment_id",
                "_ps_merge_map",
                "segment_id",
                "canonical_segment_id",
            );
            *written += wh.execute(&sql)?;
        }
        if table == USER_TRAITS {
            let sql = wh.dialect().delete_in_stage(
                &s,
                USER_TRAITS,
                "canonical_segment_id",
                "_ps_merge_map",
                "segment_id",
            );
            wh.execute(&sql)?;
        }
        if table == PROFILE_MERGES {
            let sql = wh.dialect().update_from_stage(
                &s,
                PROFILE_MERGES,
                "canonical_segment_id",
                "_ps_merge_map",
                "segment_id",
                "canonical_segment_id",
            );
            wh.execute(&sql)?;
            let rows: Vec<(Vec<Cell>, [Cell; 3])> = merges
                .iter()
                .map(|(from, (to, seq, t))| {
                    (
                        vec![Cell::Text(to.to_string()), Cell::Text(from.to_string())],
                        tail(*seq, t),
                    )
                })
                .collect();
            *written += merge_into(wh, PROFILE_MERGES, "_ps_merges", with_uuid(rows, uuid))?;
        }
    }
    state::write(wh, &[(table, next)])
}
