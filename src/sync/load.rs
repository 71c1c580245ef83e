//! Writing one chunk of rows into one table, exactly once: the rows, their discards, any new
//! column names and the table's cursor commit in one transaction, or nothing does.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use super::columns::{Field, cast, escape_nul, remember};
use super::state::{self, TableState};
use super::tables::DISCARDS;
use crate::crd::ColumnFilter;
use crate::warehouse::{
    Cell, Column, ColumnLimit, ColumnLimits, ColumnType, OnConflict, TableColumns, Warehouse,
    WarehouseError,
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
    /// The selection's columns of the table, when it has one: a column it turns off (a
    /// property, or a fixed column that is not a key) is neither created nor filled.
    pub filter: Option<&'a ColumnFilter<'a>>,
    /// The rows.
    pub rows: Vec<PendingRow>,
    /// Source → column assignments made for these rows.
    pub new_names: Vec<(String, String)>,
    /// The table's state after the chunk.
    pub state: TableState,
    /// The change at the chunk's cursor, recorded with it as the schema's anchor when newer
    /// ([`state::advance_anchor`]); `None` when the chunk does not hold it.
    pub anchor: Option<state::Anchor>,
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
#[derive(Clone)]
pub struct Schema {
    /// Table → columns.
    pub tables: BTreeMap<String, TableColumns>,
    /// Table → its narrowed columns (the sync never creates one; a DBA may alter one).
    pub limits: BTreeMap<String, ColumnLimits>,
    /// Table → columns a DBA dropped that still count toward `max_columns`.
    pub dropped: BTreeMap<String, usize>,
    /// Most columns a table may have ([`crate::warehouse::Dialect::max_columns`]).
    pub max_columns: usize,
    /// Most bytes a row may take ([`crate::warehouse::Dialect::max_row_bytes`]).
    pub max_row_bytes: Option<usize>,
}

impl Default for Schema {
    /// No tables, and no limit on their columns.
    fn default() -> Schema {
        Schema {
            tables: BTreeMap::new(),
            limits: BTreeMap::new(),
            dropped: BTreeMap::new(),
            max_columns: usize::MAX,
            max_row_bytes: None,
        }
    }
}

impl Schema {
    /// Records that `table` has `columns` (once the DDL creating them committed); a column
    /// already known keeps its type.
    pub fn record<'c>(&mut self, table: &str, columns: impl IntoIterator<Item = &'c Column>) {
        let t = self.tables.entry(table.to_string()).or_default();
        for c in columns {
            t.entry(c.name.clone()).or_insert(c.ty);
        }
    }

    /// Records the `discards` table (once rows of it committed).
    pub fn record_discards(&mut self) {
        self.record(DISCARDS, &discard_columns());
    }

    /// The schema `wh` describes.
    pub fn of(wh: &mut dyn Warehouse) -> Result<Schema, WarehouseError> {
        let tables = wh.describe()?;
        Ok(Schema {
            tables,
            limits: wh.column_limits(),
            dropped: wh.dropped_columns(),
            max_columns: wh.dialect().max_columns(),
            max_row_bytes: wh.dialect().max_row_bytes(),
        })
    }
}

fn discard_columns() -> Vec<Column> {
    super::tables::fixed(DISCARDS)
        .map(|t| t.columns)
        .unwrap_or_default()
}

/// Types a chunk's rows in one pass. Each column's type is decided the first time the column
/// is seen with a value that implies one: the warehouse's type when the column exists, the
/// design's for fixed columns, otherwise the first non-null value's; every value is cast to its
/// column's type as it arrives. Columns that are null in every row are left out. Values that
/// can't be cast, or that a narrowed column refuses, become NULL and a row of `discards`.
struct Typer<'c> {
    table: &'c str,
    existing: Option<&'c TableColumns>,
    limits: Option<&'c ColumnLimits>,
    filter: Option<&'c ColumnFilter<'c>>,
    /// The table's key columns: never checked against a limit (a value discarded there would
    /// leave the row without its key; the warehouse's own error names the problem instead).
    key: &'static [&'static str],
    /// The limit of each of `columns`, when narrowed.
    column_limits: Vec<Option<ColumnLimit>>,
    uuid_ts: jiff::Timestamp,
    /// Fixed columns first, in their order; then the others in the order they were found.
    columns: Vec<Column>,
    fixed: usize,
    /// Column name → index in `columns`.
    index: HashMap<String, usize>,
    /// Position in a row's values → (the name it held in the previous row, its column): rows
    /// of one table mostly list the same columns in the same order, so a repeat costs a name
    /// comparison (mostly a pointer's) instead of a map lookup.
    at: Vec<Option<(ColumnName, usize)>>,
    /// The `uuid_ts` column, once known: its values are replaced by the load time.
    uuid: Option<usize>,
    rows: Vec<Vec<Cell>>,
    discards: Vec<Vec<Cell>>,
    /// Most columns the table may have, and how many it will have: the warehouse's, and the
    /// ones this chunk adds.
    max_columns: usize,
    width: usize,
    /// Most bytes a row may take, when the warehouse limits it.
    max_row_bytes: Option<usize>,
}

/// A cast value as the discards table keeps it; a float as JSON writes it (`1e39`), as the
/// event carried it.
fn discarded_text(cell: Cell) -> String {
    match cell {
        Cell::Float(f) => Value::from(f).to_string(),
        other => other.to_text().unwrap_or_default(),
    }
}

/// A row's stored size, estimated from above for a warehouse that limits it
/// ([`crate::warehouse::Dialect::max_row_bytes`]): an 8-byte value (integer, float, timestamp)
/// counts 8, a boolean 1, a text its length and header up to 24 bytes (a longer one can be
/// moved out of line, leaving an 18-byte pointer); plus the padding 8-byte values may need, at
/// most 7 bytes before each run of them — and there are no more runs than other values plus one.
#[derive(Clone, Copy, Default)]
struct RowWidth {
    bytes: usize,
    wide: usize,
    narrow: usize,
}

impl RowWidth {
    fn with(self, cell: &Cell) -> RowWidth {
        let (bytes, wide) = match cell {
            Cell::Null => return self,
            Cell::Int(_) | Cell::Float(_) | Cell::Timestamp(_) => (8, true),
            Cell::Bool(_) => (1, false),
            Cell::Text(s) => ((s.len() + 1).min(24), false),
        };
        RowWidth {
            bytes: self.bytes + bytes,
            wide: self.wide + usize::from(wide),
            narrow: self.narrow + usize::from(!wide),
        }
    }

    /// A value not cast yet, at its widest: whatever column it goes to, it takes no more.
    fn with_uncast(self, v: &Field) -> RowWidth {
        match v {
            Field::Json(Value::Null) => self,
            _ => RowWidth {
                bytes: self.bytes + 24,
                narrow: self.narrow + 1,
                ..self
            },
        }
    }

    fn total(&self) -> usize {
        self.bytes + 7 * self.wide.min(self.narrow + 1)
    }
}

/// Why a value has no column in a chunk.
enum NoColumn {
    /// The selection turns it off, or it is null in a column not known yet: nothing to load.
    Skipped,
    /// The table has as many columns as the warehouse allows: the value goes to `discards`.
    TableFull,
}

/// Whether two column names are the same (the same shared name compares without reading it).
fn same_name(a: &ColumnName, b: &ColumnName) -> bool {
    match (a, b) {
        (ColumnName::Property(x), ColumnName::Property(y)) if std::sync::Arc::ptr_eq(x, y) => true,
        _ => **a == **b,
    }
}

impl<'c> Typer<'c> {
    fn new(
        chunk: &Chunk<'c>,
        existing: Option<&'c TableColumns>,
        limits: Option<&'c ColumnLimits>,
        (max_columns, max_row_bytes): (usize, Option<usize>),
    ) -> Typer<'c> {
        let mut t = Typer {
            table: chunk.table,
            existing,
            limits,
            filter: chunk.filter,
            key: chunk.key,
            column_limits: Vec::with_capacity(chunk.fixed.len() + 16),
            uuid_ts: chunk.uuid_ts,
            columns: Vec::with_capacity(chunk.fixed.len() + 16),
            fixed: 0,
            index: HashMap::new(),
            at: vec![],
            uuid: None,
            rows: Vec::with_capacity(chunk.rows.len()),
            discards: vec![],
            max_columns,
            width: existing.map_or(0, |e| e.len()),
            max_row_bytes,
        };
        for c in chunk
            .fixed
            .iter()
            .filter(|c| chunk.filter.is_none_or(|f| f.enabled(&c.name)))
        {
            let ty = existing
                .and_then(|e| e.get(&c.name).copied())
                .unwrap_or(c.ty);
            t.add(&c.name, ty);
        }
        t.fixed = t.columns.len();
        t
    }

    fn add(&mut self, name: &str, ty: ColumnType) -> usize {
        if !self.existing.is_some_and(|e| e.contains_key(name)) {
            self.width += 1;
        }
        let i = self.columns.len();
        self.columns.push(Column::new(name, ty));
        let limit = self.limits.and_then(|l| l.get(name).copied());
        self.column_limits
            .push(limit.filter(|_| !self.key.contains(&name)));
        self.index.insert(name.to_string(), i);
        if name == "uuid_ts" {
            self.uuid = Some(i);
        }
        i
    }

    /// The column of `name` (a value's column), found or added; `None` while the column is
    /// unknown and the value null.
    fn column(&mut self, p: usize, name: &ColumnName, v: &Field) -> Result<usize, NoColumn> {
        if let Some(Some((seen, i))) = self.at.get(p)
            && same_name(seen, name)
        {
            return Ok(*i);
        }
        let i = match self.index.get(&**name) {
            Some(&i) => i,
            // A column the selection turns off.
            None if self.filter.is_some_and(|f| !f.enabled(name)) => return Err(NoColumn::Skipped),
            None => {
                let known = self.existing.and_then(|e| e.get(&**name).copied());
                let ty = known.or_else(|| v.infer()).ok_or(NoColumn::Skipped)?;
                if known.is_none() && self.width >= self.max_columns {
                    return Err(NoColumn::TableFull);
                }
                self.add(name, ty)
            }
        };
        remember(&mut self.at, p, Some((name.clone(), i)));
        Ok(i)
    }

    fn push(&mut self, row: PendingRow) {
        let first_discard = self.discards.len();
        self.push_cells(row);
        merge_row_discards(&mut self.discards, first_discard);
    }

    fn push_cells(&mut self, row: PendingRow) {
        let PendingRow {
            row_id,
            received_at,
            values,
            refused,
        } = row;
        for (column, v, reason) in refused {
            self.refuse(&column, &row_id, v.into_text(), reason, &received_at);
        }
        let mut cells = vec![Cell::Null; self.columns.len()];
        // With a row size limit, the fixed columns' values are counted first (at their widest):
        // they always load, and the properties share what is left.
        let mut width = self.max_row_bytes.map(|_| {
            values
                .iter()
                .filter(|(name, _)| matches!(name, ColumnName::Fixed(_)))
                .fold(RowWidth::default(), |w, (_, v)| w.with_uncast(v))
        });
        for (p, (name, v)) in values.into_iter().enumerate() {
            let i = match self.column(p, &name, &v) {
                Ok(i) => i,
                Err(NoColumn::Skipped) => continue,
                Err(NoColumn::TableFull) => {
                    let reason = format!(
                        "the table has {} columns (counting those a DBA dropped, which the \
                         warehouse still counts), as many as the warehouse allows: a new \
                         property gets no column",
                        self.max_columns
                    );
                    self.refuse(&name, &row_id, v.into_text(), reason, &received_at);
                    continue;
                }
            };
            if Some(i) == self.uuid {
                continue;
            }
            if i >= cells.len() {
                cells.resize(self.columns.len(), Cell::Null);
            }
            let cell = match v.cast(self.columns[i].ty) {
                Ok(cell) => cell,
                Err((reason, v)) => {
                    self.refuse(&name, &row_id, v.into_text(), reason, &received_at);
                    continue;
                }
            };
            if let Some(Err(reason)) = self.column_limits[i].map(|l| l.admits(&cell)) {
                self.refuse(&name, &row_id, discarded_text(cell), reason, &received_at);
                continue;
            }
            if let (Some(w), ColumnName::Property(_), Some(max)) =
                (&mut width, &name, self.max_row_bytes)
            {
                let wider = w.with(&cell);
                if wider.total() > max {
                    let reason = format!(
                        "the row is wider than the warehouse stores in one row \
                         (~{max} bytes): this value gets no column in it"
                    );
                    self.refuse(&name, &row_id, discarded_text(cell), reason, &received_at);
                    continue;
                }
                *w = wider;
            }
            cells[i] = cell;
        }
        self.rows.push(cells);
    }

    /// Adds a row of `discards`: the value as text (a NUL, one reason to refuse it, written
    /// escaped).
    fn refuse(
        &mut self,
        column: &str,
        row_id: &str,
        value: String,
        reason: String,
        received_at: &Cell,
    ) {
        let d = discard_row(
            self.table,
            column,
            row_id,
            &value,
            reason,
            received_at,
            self.uuid_ts,
        );
        self.discards.push(d);
    }

    /// The columns (fixed first, in their order; then the rest by name), the rows' cells in
    /// that order, and the discards.
    fn finish(mut self) -> (Vec<Column>, Vec<Vec<Cell>>, Vec<Vec<Cell>>) {
        let width = self.columns.len();
        // `order[j]`: the column found at `order[j]` goes to place `j`.
        let mut order: Vec<usize> = (0..width).collect();
        order[self.fixed..].sort_by(|&a, &b| self.columns[a].name.cmp(&self.columns[b].name));
        let cycles = cycles(&order);
        // `uuid_ts` is the load time, whatever a row carries under that name.
        let uuid = self.uuid.map(|i| {
            let v = Value::String(self.uuid_ts.to_string());
            (i, cast(&v, self.columns[i].ty).unwrap_or(Cell::Null))
        });
        for row in &mut self.rows {
            // Rows typed before a column was found lack its cell.
            row.resize(width, Cell::Null);
            if let Some((i, cell)) = &uuid {
                row[*i] = cell.clone();
            }
            permute(row, &order, &cycles);
        }
        let mut columns = std::mem::take(&mut self.columns);
        permute(&mut columns, &order, &cycles);
        (columns, self.rows, self.discards)
    }
}

/// One index of each cycle of the permutation `order` (fixed points left out).
fn cycles(order: &[usize]) -> Vec<usize> {
    let mut seen = vec![false; order.len()];
    let mut starts = vec![];
    for start in 0..order.len() {
        if seen[start] || order[start] == start {
            continue;
        }
        starts.push(start);
        let mut j = start;
        while !seen[j] {
            seen[j] = true;
            j = order[j];
        }
    }
    starts
}

/// Reorders `items` in place so that `items[j]` becomes the item that was at `order[j]`.
fn permute<T>(items: &mut [T], order: &[usize], cycles: &[usize]) {
    for &start in cycles {
        // Walk the cycle, pulling each place's item from where `order` says.
        let mut j = start;
        loop {
            let from = order[j];
            if from == start {
                break;
            }
            items.swap(j, from);
            j = from;
        }
    }
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
    /// The change at the chunk's cursor ([`Chunk::anchor`]).
    pub anchor: Option<state::Anchor>,
}

/// Types `chunk` against the table's columns as `schema` knows them (see `Typer`).
pub fn prepare(schema: &Schema, mut chunk: Chunk<'_>) -> Prepared {
    let mut typer = Typer::new(
        &chunk,
        schema.tables.get(chunk.table),
        schema.limits.get(chunk.table),
        (schema.max_columns, schema.max_row_bytes),
    );
    // Columns a DBA dropped keep their slots (PostgreSQL counts them toward its limit).
    typer.width += schema.dropped.get(chunk.table).copied().unwrap_or(0);
    for row in std::mem::take(&mut chunk.rows) {
        typer.push(row);
    }
    let (columns, rows, discards) = typer.finish();
    Prepared {
        table: chunk.table.to_string(),
        key: chunk.key,
        columns,
        rows,
        discards,
        new_names: chunk.new_names,
        state: chunk.state,
        anchor: chunk.anchor,
    }
}

/// Records in `schema` the columns `p` creates when it commits (the discards table's too).
pub fn plan(schema: &mut Schema, p: &Prepared) {
    schema.record(&p.table, &p.columns);
    if !p.discards.is_empty() {
        schema.record_discards();
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
    let n = crate::warehouse::in_transaction(wh, |wh| write(wh, schema, p))?;
    // The schema changed only once the DDL committed.
    plan(schema, p);
    Ok(ChunkResult {
        rows: n,
        discards: p.discards.len() as u64,
    })
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
            wh.make_room(table)?;
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

/// Folds the discards of one row (from `from` on) that share a column into one: `discards` is
/// keyed by table, column and row, so a second refused value of a column (two properties
/// flattened to one column, the one kept failing its cast too) was dropped by the merge — the
/// value lost, the report counting it. The folded row holds the values as a JSON array and the
/// reasons joined.
fn merge_row_discards(discards: &mut Vec<Vec<Cell>>, from: usize) {
    // Columns of a discard row: table_name, column_name, row_id, value, reason, …
    let (column, value, reason) = (1, 3, 4);
    let mut i = from;
    while i < discards.len() {
        let same: Vec<usize> = (i + 1..discards.len())
            .filter(|&j| discards[j][column] == discards[i][column])
            .collect();
        if !same.is_empty() {
            let text = |c: &Cell| c.to_text().unwrap_or_default();
            let mut values = vec![text(&discards[i][value])];
            let mut reasons = vec![text(&discards[i][reason])];
            for &j in &same {
                values.push(text(&discards[j][value]));
                reasons.push(text(&discards[j][reason]));
            }
            discards[i][value] = Cell::Text(Value::from(values).to_string());
            discards[i][reason] = Cell::Text(reasons.join("; "));
            for &j in same.iter().rev() {
                discards.remove(j);
            }
        }
        i += 1;
    }
}

/// Writes rows of `discards` (creating the table when missing) inside the caller's
/// transaction. A row already there (same table, column and row) is kept with
/// [`OnConflict::Ignore`] — an event's row is refused the same on a retried load — and replaced
/// with [`OnConflict::Update`]: a profile table's row changes, and the newest value refused is
/// the one to know (of several for one key here, the last). Returns how many rows it wrote.
pub fn write_discards(
    wh: &mut dyn Warehouse,
    schema: &Schema,
    discards: &[Vec<Cell>],
    on_conflict: OnConflict,
) -> Result<u64, WarehouseError> {
    if discards.is_empty() {
        return Ok(0);
    }
    let cols = discard_columns();
    let key = ["table_name", "column_name", "row_id"];
    ensure_table(wh, schema, DISCARDS, &cols, &key)?;
    // One row per key, the last, where the merge updates (it may not meet a key twice). An
    // event's rows are one per key already ([`merge_row_discards`]), and are staged as they are.
    let newest: Vec<Vec<Cell>>;
    let discards = match on_conflict {
        OnConflict::Ignore => discards,
        OnConflict::Update => {
            let mut seen = HashSet::new();
            let mut kept: Vec<Vec<Cell>> = discards
                .iter()
                .rev()
                .filter(|row| seen.insert([0, 1, 2].map(|k| row[k].to_text())))
                .cloned()
                .collect();
            kept.reverse();
            newest = kept;
            &newest
        }
    };
    wh.stage("_ps_discards", &cols, discards)?;
    let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
    let sql = wh.dialect().merge_from_stage(
        wh.schema(),
        DISCARDS,
        "_ps_discards",
        &names,
        &key,
        on_conflict,
    );
    wh.execute(&sql)?;
    Ok(discards.len() as u64)
}

/// A row of `discards` for `value` of `table.column` in the row `row_id`, refused for `reason`
/// (the row id and the value written with NULs escaped).
pub fn discard_row(
    table: &str,
    column: &str,
    row_id: &str,
    value: &str,
    reason: String,
    received_at: &Cell,
    uuid_ts: jiff::Timestamp,
) -> Vec<Cell> {
    vec![
        Cell::Text(table.to_string()),
        Cell::Text(column.to_string()),
        Cell::Text(escape_nul(row_id).into_owned()),
        Cell::Text(escape_nul(value).into_owned()),
        Cell::Text(reason),
        received_at.clone(),
        Cell::Timestamp(uuid_ts),
    ]
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
        let sql = wh.merge_stage(&p.table, "_ps_stage", &names, p.key, OnConflict::Ignore);
        loaded = wh.execute(&sql)?;
    }
    write_discards(wh, schema, discards, OnConflict::Ignore)?;
    state::write_names(wh, &p.table, &p.new_names)?;
    state::write(wh, &[(&p.table, &p.state)])?;
    if let Some(anchor) = p.anchor {
        state::advance_anchor(wh, anchor)?;
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
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
            filter: None,
            rows,
            new_names: vec![],
            state: TableState {
                cursor: 0,
                enabled: true,
                enabled_since_us: 0,
                min_received_at_us: None,
                backfilled: false,
            },
            anchor: None,
            uuid_ts: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    /// Rows whose columns change place, go missing, are null, or fail to cast: every value
    /// lands in its own column whatever the previous row looked like.
    #[test]
    fn values_land_in_their_columns_whatever_the_order_of_the_rows() {
        let fixed = [Column::new("id", ColumnType::Varchar)];
        let c = chunk(
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
        let p = prepare(&Schema::default(), c);
        let names: Vec<(&str, ColumnType)> =
            p.columns.iter().map(|c| (c.name.as_str(), c.ty)).collect();
        assert_eq!(
            names,
            [
                ("id", ColumnType::Varchar),
                ("a", ColumnType::Varchar),
                ("b", ColumnType::Integer),
                ("c", ColumnType::Boolean)
            ]
        );
        let text = |s: &str| Cell::Text(s.into());
        assert_eq!(
            p.rows,
            [
                vec![text("1"), Cell::Null, Cell::Int(2), Cell::Null],
                vec![text("2"), text("x"), Cell::Int(3), Cell::Null],
                vec![text("3"), text("y"), Cell::Null, Cell::Bool(true)],
                vec![text("4"), Cell::Null, Cell::Null, Cell::Null],
            ]
        );
        assert_eq!(p.discards.len(), 1);
        assert_eq!(
            p.discards[0][..4],
            [text("t"), text("b"), text("4"), text("not a number")]
        );
    }

    /// The warehouse's type wins over inference, and `uuid_ts` is always the load time.
    #[test]
    fn existing_types_win_and_uuid_ts_is_the_load_time() {
        let fixed = [
            Column::new("id", ColumnType::Varchar),
            Column::new("uuid_ts", ColumnType::Timestamp),
        ];
        let c = chunk(
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
        let schema = Schema {
            tables: [("t".to_string(), existing)].into_iter().collect(),
            ..Schema::default()
        };
        let p = prepare(&schema, c);
        assert_eq!(
            p.columns[2].ty,
            ColumnType::Varchar,
            "the warehouse's varchar wins"
        );
        assert_eq!(
            p.rows[0],
            [
                Cell::Text("1".into()),
                Cell::Timestamp(jiff::Timestamp::UNIX_EPOCH),
                Cell::Text("5".into())
            ]
        );
        assert!(p.discards.is_empty());
    }

    /// A narrowed column's limit sends a value past it to discards, but never on a key column:
    /// a key discarded would leave the row without it (the warehouse's own error says why).
    #[test]
    fn limits_discard_values_but_never_a_key() {
        let fixed = [Column::new("id", ColumnType::Varchar)];
        let c = chunk(
            vec![row(
                "long-id",
                vec![("id", json!("long-id")), ("note", json!("abcdef"))],
            )],
            &fixed,
        );
        let narrow = ColumnLimit::Text {
            max: 3,
            bytes: false,
        };
        let limits: ColumnLimits = [("id".to_string(), narrow), ("note".to_string(), narrow)]
            .into_iter()
            .collect();
        let schema = Schema {
            limits: [("t".to_string(), limits)].into_iter().collect(),
            ..Schema::default()
        };
        let p = prepare(&schema, c);
        assert_eq!(p.rows[0], [Cell::Text("long-id".into()), Cell::Null]);
        assert_eq!(p.discards.len(), 1);
        assert_eq!(p.discards[0][1], Cell::Text("note".into()));
        assert_eq!(p.discards[0][3], Cell::Text("abcdef".into()));
    }

    /// What typing a chunk means, written plainly (two passes, no caches): the model
    /// `prepare` is checked against.
    fn model(
        chunk: &Chunk<'_>,
        existing: Option<&TableColumns>,
    ) -> (Vec<Column>, Vec<Vec<Cell>>, Vec<Vec<Cell>>) {
        let mut types: BTreeMap<String, ColumnType> = BTreeMap::new();
        for c in chunk
            .fixed
            .iter()
            .filter(|c| chunk.filter.is_none_or(|f| f.enabled(&c.name)))
        {
            let ty = existing.and_then(|e| e.get(&c.name).copied());
            types.insert(c.name.clone(), ty.unwrap_or(c.ty));
        }
        for row in &chunk.rows {
            for (name, v) in &row.values {
                if !types.contains_key(&**name)
                    && let Some(t) = existing.and_then(|e| e.get(&**name).copied()).or(v.infer())
                {
                    types.insert(name.to_string(), t);
                }
            }
        }
        let is_fixed = |n: &str| chunk.fixed.iter().any(|c| c.name == n);
        let mut columns: Vec<Column> = chunk
            .fixed
            .iter()
            .map(|c| Column::new(c.name.clone(), types[&c.name]))
            .collect();
        columns.extend(
            types
                .iter()
                .filter(|(n, _)| !is_fixed(n))
                .map(|(n, t)| Column::new(n.clone(), *t)),
        );
        let place = |n: &str| columns.iter().position(|c| c.name == n);
        let text = |s: &str| Cell::Text(s.to_string());
        // A row's refusals of one column are one discard: its values as a JSON array, its
        // reasons joined.
        let discard = |column: &str, row: &PendingRow, refusals: &[(String, String)]| {
            let (value, reason) = match refusals {
                [(v, r)] => (v.clone(), r.clone()),
                many => (
                    Value::from(many.iter().map(|(v, _)| v.clone()).collect::<Vec<_>>())
                        .to_string(),
                    many.iter()
                        .map(|(_, r)| r.as_str())
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            };
            vec![
                text(chunk.table),
                text(column),
                text(&escape_nul(&row.row_id)),
                text(&value),
                text(&reason),
                row.received_at.clone(),
                Cell::Timestamp(chunk.uuid_ts),
            ]
        };
        let (mut rows, mut discards) = (vec![], vec![]);
        for row in &chunk.rows {
            let mut refusals: Vec<(String, Vec<(String, String)>)> = vec![];
            let mut refuse = |column: &str, v: &Field, reason: &str| {
                let entry = (
                    escape_nul(&v.clone().into_text()).into_owned(),
                    reason.to_string(),
                );
                match refusals.iter_mut().find(|(c, _)| c == column) {
                    Some((_, list)) => list.push(entry),
                    None => refusals.push((column.to_string(), vec![entry])),
                }
            };
            for (column, v, reason) in &row.refused {
                refuse(column, v, reason);
            }
            let mut cells = vec![Cell::Null; columns.len()];
            for (name, v) in &row.values {
                // `uuid_ts` is the load time, whatever the row carries under that name.
                let Some(i) = place(name).filter(|_| &**name != "uuid_ts") else {
                    continue;
                };
                match v.clone().cast(columns[i].ty) {
                    Ok(cell) => cells[i] = cell,
                    Err((reason, v)) => refuse(name, &v, &reason),
                }
            }
            for (column, list) in &refusals {
                discards.push(discard(column, row, list));
            }
            if let Some(i) = place("uuid_ts") {
                let v = Value::String(chunk.uuid_ts.to_string());
                cells[i] = cast(&v, columns[i].ty).unwrap_or(Cell::Null);
            }
            rows.push(cells);
        }
        (columns, rows, discards)
    }

    /// A column name: fixed, or a property's, shared with other values of that name or not.
    fn name_strategy() -> impl Strategy<Value = ColumnName> {
        const NAMES: [&str; 7] = ["id", "a", "b", "c", "uuid_ts", "a_b", "B"];
        (0..NAMES.len(), 0..3u8).prop_map(|(i, how)| match how {
            0 => ColumnName::Fixed(NAMES[i]),
            // The same shared name for every value of it, as the router hands out.
            1 => SHARED.with(|s| ColumnName::Property(s[i].clone())),
            _ => ColumnName::Property(NAMES[i].into()),
        })
    }

    thread_local! {
        static SHARED: Vec<std::sync::Arc<str>> =
            ["id", "a", "b", "c", "uuid_ts", "a_b", "B"].iter().map(|n| (*n).into()).collect();
    }

    fn field_strategy() -> impl Strategy<Value = Field> {
        prop_oneof![
            Just(Field::Json(Value::Null)),
            any::<i64>().prop_map(|n| Field::Json(json!(n))),
            (-1.0e6..1.0e6f64).prop_map(|f| Field::Json(json!(f))),
            any::<bool>().prop_map(|b| Field::Json(json!(b))),
            "[a-z0-9 .]{0,8}".prop_map(|s| Field::Json(json!(s))),
            Just(Field::Json(json!("2024-05-01T10:00:00Z"))),
            Just(Field::Json(json!("12"))),
            Just(Field::Json(json!("a\u{0}b"))),
            Just(Field::Json(json!([1, "x"]))),
            (0..2_000_000_000i64)
                .prop_map(|s| Field::Time(jiff::Timestamp::from_second(s).expect("in range"))),
        ]
    }

    fn row_strategy() -> impl Strategy<Value = PendingRow> {
        (
            "[a-z0-9]{1,4}",
            proptest::collection::vec((name_strategy(), field_strategy()), 0..8),
            proptest::collection::vec(field_strategy(), 0..2),
        )
            .prop_map(|(id, values, refused)| {
                // A row lists each column at most once.
                let mut seen = std::collections::HashSet::new();
                let values = values
                    .into_iter()
                    .filter(|(n, _)| seen.insert(n.to_string()))
                    .collect();
                PendingRow {
                    row_id: id,
                    received_at: Cell::Timestamp(jiff::Timestamp::UNIX_EPOCH),
                    values,
                    refused: refused
                        .into_iter()
                        .map(|v| {
                            (
                                "a_b".to_string(),
                                v,
                                super::super::columns::same_name_reason("a_b"),
                            )
                        })
                        .collect(),
                }
            })
    }

    proptest! {
        /// One pass with its caches types every chunk as the plain two-pass model does:
        /// columns, their types and order, every cell, every discard — whatever the rows'
        /// column order, nulls, bad values, fixed and existing columns.
        #[test]
        fn prepare_types_a_chunk_as_the_model_does(
            rows in proptest::collection::vec(row_strategy(), 0..12),
            fixed_uuid in any::<bool>(),
            existing in proptest::collection::vec(
                (prop_oneof![Just("a"), Just("c"), Just("uuid_ts"), Just("z")],
                 prop_oneof![Just(ColumnType::Varchar), Just(ColumnType::Integer),
                             Just(ColumnType::Timestamp), Just(ColumnType::Boolean)]),
                0..3),
            has_table in any::<bool>(),
        ) {
            let mut fixed = vec![Column::new("id", ColumnType::Varchar)];
            if fixed_uuid {
                fixed.push(Column::new("uuid_ts", ColumnType::Timestamp));
            }
            let existing: TableColumns =
                existing.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
            let schema = Schema {
                tables: if has_table {
                    [("t".to_string(), existing.clone())].into_iter().collect()
                } else {
                    BTreeMap::new()
                },
                ..Schema::default()
            };
            let c = chunk(rows, &fixed);
            let want = model(&c, schema.tables.get("t"));
            let got = prepare(&schema, c);
            prop_assert_eq!(got.columns, want.0);
            prop_assert_eq!(got.rows, want.1);
            prop_assert_eq!(got.discards, want.2);
        }
    }
}
