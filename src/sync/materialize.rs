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
use super::load::{Schema, discard_row, ensure_table, write_discards};
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
    /// The change at `end`, when the window holds it ([`state::Anchor`]).
    anchor: Option<state::Anchor>,
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
    // (Each page is in `seq` order.)
    let anchor = [&graph, &mappings, &traits]
        .into_iter()
        .find_map(|p| {
            p.binary_search_by_key(&end, FeedRow::seq)
                .ok()
                .map(|i| &p[i])
        })
        .map(state::Anchor::of_row);
    Ok(Some(Window {
        graph,
        mappings,
        traits,
        end,
        anchor,
        read,
    }))
}

/// What applying a window to one table wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Rows written (inserted, updated or moved).
    pub rows: u64,
    /// Values sent to `discards`.
    pub discards: u64,
    /// Approximate bytes of the rows staged, for `limits.maxBytes`.
    pub bytes: u64,
}

/// Rows of `table` that its columns admit: a value a column a DBA narrowed refuses (a
/// `varchar(20)` for a long trait) becomes NULL and a row of `discards`; a refused key value
/// leaves its whole row out, recorded in `discards` likewise. (The value failed the table's
/// load on every run.)
fn fit(
    table: &str,
    schema: &Schema,
    rows: Vec<Vec<Cell>>,
    uuid: jiff::Timestamp,
    discards: &mut Vec<Vec<Cell>>,
) -> Vec<Vec<Cell>> {
    let Some(limits) = schema.limits.get(table).filter(|l| !l.is_empty()) else {
        return rows;
    };
    let cols = columns(table);
    let key = fixed(table).map(|t| t.key).unwrap_or(&[]);
    let checks: Vec<(usize, crate::warehouse::ColumnLimit, bool)> = cols
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            limits
                .get(&c.name)
                .map(|l| (i, *l, key.contains(&c.name.as_str())))
        })
        .collect();
    if checks.is_empty() {
        return rows;
    }
    let key_at: Vec<usize> = key
        .iter()
        .filter_map(|k| cols.iter().position(|c| c.name == *k))
        .collect();
    let received_at = cols.iter().position(|c| c.name == "received_at");
    rows.into_iter()
        .filter_map(|mut row| {
            let mut keep = true;
            for &(i, limit, is_key) in &checks {
                let Err(reason) = limit.admits(&row[i]) else {
                    continue;
                };
                let row_id = serde_json::to_string(
                    &key_at.iter().map(|&k| row[k].to_text()).collect::<Vec<_>>(),
                )
                .unwrap_or_default();
                let received = received_at.map_or(Cell::Null, |r| row[r].clone());
                discards.push(discard_row(
                    table,
                    &cols[i].name,
                    &row_id,
                    &row[i].to_text().unwrap_or_default(),
                    reason,
                    &received,
                    uuid,
                ));
                if is_key {
                    keep = false;
                } else {
                    row[i] = Cell::Null;
                }
            }
            keep.then_some(row)
        })
        .collect()
}

/// Applies `window` to `table` (one of [`USER_IDENTIFIERS`], [`USER_TRAITS`],
/// [`PROFILE_MERGES`]) in a transaction of its own that also moves the table's cursor to the
/// window's end. The table's cursor must be the window's start.
pub fn apply_window(
    wh: &mut dyn Warehouse,
    schema: &mut Schema,
    table: &str,
    cursor_state: &mut TableState,
    window: &Window,
    uuid: jiff::Timestamp,
) -> Result<Applied, WarehouseError> {
    let end = window.end;
    // Each table reads only its part of the window (the window is applied once per table).
    // The rows the window adds to the table: identifiers (user_identifiers), or created
    // profiles' own rows (profile_merges, below).
    let mut new_rows = vec![];
    for r in window.mappings.iter().filter(|_| table == USER_IDENTIFIERS) {
        if let FeedRow::Mapping(m) = r
            && m.seq <= end
        {
            new_rows.push((
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
    // Profiles created in the window: each has a row of its own in `profile_merges`
    // (`canonical_segment_id = segment_id`, as Segment's table has) until a merge moves it.
    let mut created: Vec<(&str, i64, &Trigger)> = vec![];
    for r in &window.graph {
        if let FeedRow::IdGraph(g) = r
            && g.seq <= end
        {
            if g.segment_id != g.canonical_segment_id {
                final_canonical.insert(&g.segment_id, (&g.canonical_segment_id, g.seq, &g.trigger));
            } else if table == PROFILE_MERGES {
                created.push((&g.segment_id, g.seq, &g.trigger));
            }
        }
    }
    // A window may end between a merge's own row and its recursive rows (a page boundary):
    // a profile's latest row then names a survivor that is itself merged away later in the
    // window. Follow each chain to its end, so the single-pass updates below never leave rows
    // on a merged-away profile.
    let targets: Vec<&str> = final_canonical.keys().copied().collect();
    for from in targets {
        let mut to = final_canonical[from].0;
        let mut hops = 0;
        while let Some(&(next, _, _)) = final_canonical.get(to) {
            if next == to || hops > final_canonical.len() {
                break;
            }
            to = next;
            hops += 1;
        }
        if let Some(entry) = final_canonical.get_mut(from) {
            entry.0 = to;
        }
    }

    // One row per profile: one merged away in the window has its merge's row instead.
    if table == PROFILE_MERGES {
        new_rows = created
            .into_iter()
            .filter(|(id, _, _)| !final_canonical.contains_key(id))
            .map(|(id, seq, t)| {
                (
                    vec![Cell::Text(id.to_string()), Cell::Text(id.to_string())],
                    tail(seq, t),
                )
            })
            .collect();
    }

    let mut next = cursor_state.clone();
    next.cursor = end;
    let mut applied = Applied::default();
    crate::warehouse::in_transaction(wh, |wh| {
        apply(
            wh,
            schema,
            table,
            uuid,
            new_rows,
            &snapshots,
            &final_canonical,
            &next,
            &mut applied,
        )?;
        window
            .anchor
            .map_or(Ok(()), |a| state::advance_anchor(wh, a))
    })?;
    schema.record(table, &columns(table));
    if applied.discards > 0 {
        schema.record_discards();
    }
    *cursor_state = next;
    Ok(applied)
}

#[allow(clippy::too_many_arguments)]
fn apply(
    wh: &mut dyn Warehouse,
    schema: &Schema,
    table: &str,
    uuid: jiff::Timestamp,
    mut new_rows: Vec<(Vec<Cell>, [Cell; 3])>,
    snapshots: &BTreeMap<&str, &crate::store::TraitsRow>,
    merges: &BTreeMap<&str, (&str, i64, &Trigger)>,
    next: &TableState,
    applied: &mut Applied,
) -> Result<(), WarehouseError> {
    let s = wh.schema().to_string();
    let t = fixed(table)
        .ok_or_else(|| WarehouseError::internal(format!("no definition of {table}")))?;
    ensure_table(wh, schema, table, &t.columns, t.key)?;
    let mut discards = vec![];
    let mut written = 0;
    let mut merge_into = |wh: &mut dyn Warehouse,
                          table: &str,
                          stage: &str,
                          rows: Vec<Vec<Cell>>|
     -> Result<u64, WarehouseError> {
        let rows = fit(table, schema, rows, uuid, &mut discards);
        applied.bytes += rows.iter().flatten().map(|c| c.size() as u64).sum::<u64>();
        let cols = columns(table);
        let key = fixed(table).map(|t| t.key).unwrap_or(&[]);
        wh.stage(stage, &cols, &rows)?;
        let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
        // Through the warehouse's merge: a column a DBA gave another type gets its cast.
        let sql = wh.merge_stage(table, stage, &names, key, OnConflict::Update);
        wh.execute(&sql)
    };
    if table == USER_IDENTIFIERS && !new_rows.is_empty() {
        written += merge_into(
            wh,
            USER_IDENTIFIERS,
            "_ps_idents",
            with_uuid(std::mem::take(&mut new_rows), uuid),
        )?;
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
            written += merge_into(wh, USER_TRAITS, "_ps_traits", with_uuid(rows, uuid))?;
        }
    }
    if !merges.is_empty() {
        // A row a merge moves is loaded again: it gets this load's `uuid_ts`.
        let map_cols = [
            Column::new("segment_id", ColumnType::Varchar),
            Column::new("canonical_segment_id", ColumnType::Varchar),
            Column::new("uuid_ts", ColumnType::Timestamp),
        ];
        let map_rows: Vec<Vec<Cell>> = merges
            .iter()
            .map(|(from, (to, _, _))| {
                vec![
                    Cell::Text(from.to_string()),
                    Cell::Text(to.to_string()),
                    Cell::Timestamp(uuid),
                ]
            })
            .collect();
        wh.stage("_ps_merge_map", &map_cols, &map_rows)?;
        if table == USER_IDENTIFIERS {
            let sql = wh.dialect().update_from_stage(
                &s,
                USER_IDENTIFIERS,
                "canonical_segment_id",
                "_ps_merge_map",
                ("segment_id", "canonical_segment_id"),
                &["uuid_ts"],
            );
            written += wh.execute(&sql)?;
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
                ("segment_id", "canonical_segment_id"),
                &["uuid_ts"],
            );
            wh.execute(&sql)?;
        }
    }
    if table == PROFILE_MERGES {
        // The created profiles' own rows (in `new_rows`), and each merged profile's row.
        let mut rows = new_rows;
        rows.extend(merges.iter().map(|(from, (to, seq, t))| {
            (
                vec![Cell::Text(to.to_string()), Cell::Text(from.to_string())],
                tail(*seq, t),
            )
        }));
        if !rows.is_empty() {
            written += merge_into(wh, PROFILE_MERGES, "_ps_merges", with_uuid(rows, uuid))?;
        }
    }
    applied.rows = written;
    applied.discards = write_discards(wh, schema, &discards, OnConflict::Update)?;
    state::write(wh, &[(table, next)])
}
