//! Writing one chunk of rows into one table, exactly once: the rows, their discards, any new
//! column names and the table's cursor commit in one transaction, or nothing does.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use super::columns::{Field, cast, escape_nul, remember};
use super::state::{self, TableState};
use super::tables::DISCARDS;
use crate::warehouse::{
    Cell, Column, ColumnType, OnConflict, TableColumns, Warehouse, WarehouseError,
};

/// A column of a pending row: one of the design's fixed names, or a property's column, shared by
/// every row that carries the property (a reference count instead of a string per value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnName {
    /// A fixed column (`id`, `received_at`, …).
    Fixed(&'static str),
    /// A property's column.
    Property(std::sync::Arc<str>),
}

impl std::ops::Deref for ColumnName {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            ColumnName::Fixed(s) => s,
            ColumnName::Property(s) => s,
        }
    }
}

impl From<String> for ColumnName {
    fn from(s: String) -> ColumnName {
        ColumnName::Property(s.into())
    }
}

/// One row before typing: its key for the discards table, its receive time, and its values.
#[derive(Clone, Debug)]
pub struct PendingRow {
    /// What identifies the row in `discards.row_id` (the message id, or the seq).
    pub row_id: String,
    /// The row's `received_at` (a timestamp cell, or NULL), copied into discards.
    pub received_at: Cell,
    /// (column, value), each column at most once.
    pub values: Vec<(ColumnName, Field)>,
    /// Values kept out of the row, with the reason, for `discards` (a property whose flattened
    /// name another property of the row already took).
    pub refused: Vec<(String, Field, String)>,
}

/// A chunk of rows for one table, with the state to commit alongside.
pub struct Chunk<'a> {
    /// Target table.
    pub table: &'a str,
    /// Its primary key.
    pub key: &'static [&'static str],
    /// Columns whose type is fixed by the design (others are inferred).
    pub fixed: &'a [Column],
    /// The rows.
    pub rows: Vec<PendingRow>,
    /// Source → column assignments made for these rows.
    pub new_names: Vec<(String, String)>,
    /// The table's state after the chunk.
    pub state: TableState,
    /// Load time, for `uuid_ts`.
    pub uuid_ts: jiff::Timestamp,
}

/// What a committed chunk did.
#[derive(Debug, Default)]
pub struct ChunkResult {
    /// Rows that reached the table.
    pub rows: u64,
    /// Values sent to `discards`.
    pub discards: u64,
}

/// The schema as this sync knows it (read once, kept current as tables and columns are added).
pub struct Schema {
    /// Table → columns.
    pub tables: BTreeMap<String, TableColumns>,
}

fn discard_columns() -> Vec<Column> {
    super::tables::fixed(DISCARDS)
        .map(|t| t.columns)
        .unwrap_or_default()
}

/// Decides each column's type: the warehouse's when the column exists, the design's for fixed
/// columns, otherwise the first non-null value's. Columns that are null in every row are left out.
fn column_types(chunk: &Chunk<'_>, existing: Option<&TableColumns>) -> Vec<Column> {
    let mut types: BTreeMap<&str, ColumnType> = BTreeMap::new();
    for c in chunk.fixed {
        types.insert(
            &c.name,
            existing
                .and_then(|e| e.get(&c.name).copied())
                .unwrap_or(c.ty),
        );
    }
    // Rows of one table mostly list the same columns in the same order: remember which column
    // each position had, so a known column costs a string comparison instead of a map lookup.
    let mut typed_at: Vec<Option<&str>> = vec![];
    for row in &chunk.rows {
        for (p, (col, v)) in row.values.iter().enumerate() {
            let col: &str = col;
            if typed_at.get(p) == Some(&Some(col)) {
                continue;
            }
            let known = types.contains_key(col)
                || match existing
                    .and_then(|e| e.get(col).copied())
                    .or_else(|| v.infer())
                {
                    Some(t) => {
                        types.insert(col, t);
                        true
                    }
                    None => false,
                };
            if known {
                remember(&mut typed_at, p, Some(col));
            }
        }
    }
    // Fixed columns first, in their order; then the rest by name.
    let mut out: Vec<Column> = chunk
        .fixed
        .iter()
        .map(|c| Column::new(c.name.clone(), types[c.name.as_str()]))
        .collect();
    out.extend(
        types
            .iter()
            .filter(|(n, _)| !chunk.fixed.iter().any(|c| c.name == **n))
            .map(|(n, t)| Column::new(*n, *t)),
    );
    out
}

/// A row of `discards`: the value as text (a NUL, one reason to refuse it, written escaped).
fn discard(
    chunk: &Chunk<'_>,
    column: String,
    row_id: &str,
    v: Field,
    reason: String,
    received_at: &Cell,
) -> Vec<Cell> {
    vec![
        Cell::Text(chunk.table.to_string()),
        Cell::Text(column),
        Cell::Text(escape_nul(row_id).into_owned()),
        Cell::Text(escape_nul(&v.into_text()).into_owned()),
        Cell::Text(reason),
        received_at.clone(),
        Cell::Timestamp(chunk.uuid_ts),
    ]
}

/// Casts the chunk's rows (taken out of it) into cells in `columns` order; values that can't be
/// cast become NULL there and a row of `discards`.
fn typed_rows(chunk: &mut Chunk<'_>, columns: &[Column]) -> (Vec<Vec<Cell>>, Vec<Vec<Cell>>) {
    let index: HashMap<&str, usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();
    // `uuid_ts` is the load time, whatever a row carries under that name.
    let uuid = index.get("uuid_ts").map(|&i| {
        let v = Value::String(chunk.uuid_ts.to_string());
        (i, cast(&v, columns[i].ty).unwrap_or(Cell::Null))
    });
    let mut rows = Vec::with_capacity(chunk.rows.len());
    let mut discards = vec![];
    // The column index of each position in the previous row (see `column_types`).
    let mut column_at: Vec<Option<usize>> = vec![];
    for row in std::mem::take(&mut chunk.rows) {
        for (column, v, reason) in row.refused {
            discards.push(discard(
                chunk,
                column,
                &row.row_id,
                v,
                reason,
                &row.received_at,
            ));
        }
        let mut cells = vec![Cell::Null; columns.len()];
        if let Some((i, cell)) = &uuid {
            cells[*i] = cell.clone();
        }
        for (p, (name, v)) in row.values.into_iter().enumerate() {
            let i = match column_at.get(p) {
                Some(&Some(i)) if columns[i].name == *name => i,
                _ => {
                    let Some(&i) = index.get(&*name) else {
                        continue; // null in every row of the chunk
                    };
                    remember(&mut column_at, p, Some(i));
                    i
                }
            };
            if uuid.as_ref().is_some_and(|(u, _)| *u == i) {
                continue;
            }
            match v.cast(columns[i].ty) {
                Ok(cell) => cells[i] = cell,
                Err((reason, v)) => discards.push(discard(
                    chunk,
                    name.to_string(),
                    &row.row_id,
                    v,
                    reason,
                    &row.received_at,
                )),
            }
        }
        rows.push(cells);
    }
    (rows, discards)
}

/// A chunk typed and ready to write: everything the warehouse side needs, owned, so it can be
/// written on another thread while the next chunk is prepared.
#[derive(Debug)]
pub struct Prepared {
    /// Target table.
    pub table: String,
    /// Its primary key.
    pub key: &'static [&'static str],
    /// The columns, in cell order, with their decided types.
    pub columns: Vec<Column>,
    /// The rows' cells.
    pub rows: Vec<Vec<Cell>>,
    /// Rows of `discards` for values that could not be cast.
    pub discards: Vec<Vec<Cell>>,
    /// Source → column assignments made for these rows.
    pub new_names: Vec<(String, String)>,
    /// The table's state after the chunk.
    pub state: TableState,
}

/// Types `chunk` against the table's columns as `schema` knows them (see [`column_types`]).
pub fn prepare(schema: &Schema, mut chunk: Chunk<'_>) -> Prepared {
    let columns = column_types(&chunk, schema.tables.get(chunk.table));
    let (rows, discards) = typed_rows(&mut chunk, &columns);
    Prepared {
        table: chunk.table.to_string(),
        key: chunk.key,
        columns,
        rows,
        discards,
        new_names: chunk.new_names,
        state: chunk.state,
    }
}

/// Records in `schema` the columns `p` creates when it commits (the discards table's too).
pub fn plan(schema: &mut Schema, p: &Prepared) {
    let t = schema.tables.entry(p.table.clone()).or_default();
    for c in &p.columns {
        t.entry(c.name.clone()).or_insert(c.ty);
    }
    if !p.discards.is_empty() {
        let d = schema.tables.entry(DISCARDS.to_string()).or_default();
        for c in discard_columns() {
            d.entry(c.name).or_insert(c.ty);
        }
    }
}

/// Commits `chunk`: creates the table or adds columns as needed, stages and merges the rows,
/// records discards, new names and the cursor. Rolls back and returns the error on failure.
pub fn commit(
    wh: &mut dyn Warehouse,
    schema: &mut Schema,
    chunk: Chunk<'_>,
) -> Result<ChunkResult, WarehouseError> {
    let p = prepare(schema, chunk);
    write_prepared(wh, schema, &p)
}

/// Writes a prepared chunk in one transaction (see [`commit`]); `schema` is the warehouse's
/// committed schema, updated once the transaction commits.
pub fn write_prepared(
    wh: &mut dyn Warehouse,
    schema: &mut Schema,
    p: &Prepared,
) -> Result<ChunkResult, WarehouseError> {
    wh.begin()?;
    match write(wh, schema, p) {
        Ok(n) => {
            wh.commit()?;
            // The schema changed only once the DDL committed.
            plan(schema, p);
            Ok(ChunkResult {
                rows: n,
                discards: p.discards.len() as u64,
            })
        }
        Err(e) => {
            let _ = wh.rollback();
            Err(e)
        }
    }
}

/// Creates `table` or adds the columns it lacks (inside the caller's transaction).
pub fn ensure_table(
    wh: &mut dyn Warehouse,
    schema: &Schema,
    table: &str,
    columns: &[Column],
    key: &[&str],
) -> Result<(), WarehouseError> {
    let s = wh.schema().to_string();
    match schema.tables.get(table) {
        None => {
            let sql = wh.dialect().create_table(&s, table, columns, key);
            wh.execute(&sql)?;
        }
        Some(existing) => {
            for c in columns.iter().filter(|c| !existing.contains_key(&c.name)) {
                let sql = wh.dialect().add_column(&s, table, c);
                wh.execute(&sql)?;
            }
        }
    }
    Ok(())
}

fn write(wh: &mut dyn Warehouse, schema: &Schema, p: &Prepared) -> Result<u64, WarehouseError> {
    let (columns, rows, discards) = (&p.columns, &p.rows, &p.discards);
    ensure_table(wh, schema, &p.table, columns, p.key)?;
    let mut loaded = 0;
    if !rows.is_empty() && wh.append(&p.table, columns, rows)? {
        loaded = rows.len() as u64;
    } else if !rows.is_empty() {
        wh.stage("_ps_stage", columns, rows)?;
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        let sql = wh.dialect().merge_from_stage(
            wh.schema(),
            &p.table,
            "_ps_stage",
            &names,
            p.key,
            OnConflict::Ignore,
        );
        loaded = wh.execute(&sql)?;
    }
    if !discards.is_empty() {
        let cols = discard_columns();
        ensure_table(
            wh,
            schema,
            DISCARDS,
            &cols,
            &["table_name", "column_name", "row_id"],
        )?;
        wh.stage("_ps_discards", &cols, discards)?;
        let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
        let sql = wh.dialect().merge_from_stage(
            wh.schema(),
            DISCARDS,
            "_ps_discards",
            &names,
            &["table_name", "column_name", "row_id"],
            OnConflict::Ignore,
        );
        wh.execute(&sql)?;
    }
    state::write_names(wh, &p.table, &p.new_names)?;
    state::write(wh, &[(&p.table, &p.state)])?;
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(id: &str, values: Vec<(&'static str, Value)>) -> PendingRow {
        PendingRow {
            row_id: id.into(),
            received_at: Cell::Null,
            refused: vec![],
            values: values
                .into_iter()
                .map(|(k, v)| (ColumnName::from(k.to_string()), Field::Json(v)))
                .collect(),
        }
    }

    fn chunk(rows: Vec<PendingRow>, fixed: &[Column]) -> Chunk<'_> {
        Chunk {
            table: "t",
            key: &["id"],
            fixed,
            rows,
            new_names: vec![],
            state: TableState {
                cursor: 0,
                enabled: true,
                enabled_since_us: 0,
                min_received_at_us: None,
                backfilled: false,
            },
            uuid_ts: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    /// Rows whose columns change place, go missing, are null, or fail to cast: every value
    /// lands in its own column whatever the previous row looked like.
    #[test]
    fn values_land_in_their_columns_whatever_the_order_of_the_rows() {
        let fixed = [Column::new("id", ColumnType::Varchar)];
        let mut c = chunk(
            vec![
                row(
                    "1",
                    vec![("id", json!("1")), ("a", json!(null)), ("b", json!(2))],
                ),
                row(
                    "2",
                    vec![("id", json!("2")), ("b", json!(3)), ("a", json!("x"))],
                ),
                row(
                    "3",
                    vec![("id", json!("3")), ("c", json!(true)), ("a", json!("y"))],
                ),
                row("4", vec![("b", json!("not a number")), ("id", json!("4"))]),
            ],
            &fixed,
        );
        let columns = column_types(&c, None);
        let names: Vec<(&str, ColumnType)> =
            columns.iter().map(|c| (c.name.as_str(), c.ty)).collect();
        assert_eq!(
            names,
            [
                ("id", ColumnType::Varchar),
                ("a", ColumnType::Varchar),
                ("b", ColumnType::Integer),
                ("c", ColumnType::Boolean)
            ]
        );
        let (rows, discards) = typed_rows(&mut c, &columns);
        let text = |s: &str| Cell::Text(s.into());
        assert_eq!(
            rows,
            [
                vec![text("1"), Cell::Null, Cell::Int(2), Cell::Null],
                vec![text("2"), text("x"), Cell::Int(3), Cell::Null],
                vec![text("3"), text("y"), Cell::Null, Cell::Bool(true)],
                vec![text("4"), Cell::Null, Cell::Null, Cell::Null],
            ]
        );
        assert_eq!(discards.len(), 1);
        assert_eq!(
            discards[0][..4],
            [text("t"), text("b"), text("4"), text("not a number")]
        );
        assert!(c.rows.is_empty(), "the rows were taken out of the chunk");
    }

    /// The warehouse's type wins over inference, and `uuid_ts` is always the load time.
    #[test]
    fn existing_types_win_and_uuid_ts_is_the_load_time() {
        let fixed = [
            Column::new("id", ColumnType::Varchar),
            Column::new("uuid_ts", ColumnType::Timestamp),
        ];
        let mut c = chunk(
            vec![row(
                "1",
                vec![
                    ("id", json!("1")),
                    ("uuid_ts", json!("forged")),
                    ("n", json!(5)),
                ],
            )],
            &fixed,
        );
        let existing: TableColumns = [("n".to_string(), ColumnType::Varchar)]
            .into_iter()
            .collect();
        let columns = column_types(&c, Some(&existing));
        assert_eq!(
            columns[2].ty,
            ColumnType::Varchar,
            "the warehouse's varchar wins"
        );
        let (rows, discards) = typed_rows(&mut c, &columns);
        assert_eq!(
            rows[0],
            [
                Cell::Text("1".into()),
                Cell::Timestamp(jiff::Timestamp::UNIX_EPOCH),
                Cell::Text("5".into())
            ]
        );
        assert!(discards.is_empty());
    }
}
