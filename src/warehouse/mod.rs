//! Warehouses: one folder per destination, each with a [`Dialect`] (DDL, quoting, types, merge
//! SQL) and a [`Warehouse`] connection whose bulk path loads rows into a staging table. The sync
//! (`crate::sync`) holds the shared machinery — cursors, batching, schema diff, report — and talks
//! to every warehouse through these two traits.

pub mod credentials;
pub mod error;
pub mod postgres;
pub mod sqlite;
pub mod types;

use std::collections::BTreeMap;

pub use credentials::{Credentials, CredentialsError};
pub use error::WarehouseError;
pub use types::{Cell, Column, ColumnLimit, ColumnType};

use crate::crd::{ErrorClass, WarehouseSpec, WarehouseType};

/// How a staged row meets an existing row with the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnConflict {
    /// Keep the existing row (append-only tables: a retried load changes nothing).
    Ignore,
    /// Overwrite the existing row (current-state tables).
    Update,
}

/// The SQL a warehouse speaks. Implementations are pure: every method returns text.
pub trait Dialect: Send + Sync {
    /// Longest identifier the warehouse accepts, in bytes.
    fn max_identifier_len(&self) -> usize;
    /// Most columns a table may have.
    fn max_columns(&self) -> usize;
    /// Most bytes a row's values may take once stored, when the warehouse limits a row's size
    /// whatever its columns' types (PostgreSQL: one 8 KB page); `None` without such a limit.
    fn max_row_bytes(&self) -> Option<usize> {
        None
    }
    /// Quotes an identifier (always, so reserved words and odd characters are safe).
    fn quote(&self, ident: &str) -> String {
        format!("\"{}\"", ident.replace('"', "\"\""))
    }
    /// `schema.table`, quoted.
    fn qualified(&self, schema: &str, table: &str) -> String {
        format!("{}.{}", self.quote(schema), self.quote(table))
    }
    /// The SQL type of a column type.
    fn type_sql(&self, ty: ColumnType) -> &'static str;
    /// The column type of an SQL type read back from the warehouse's catalog.
    fn parse_type(&self, sql_type: &str) -> ColumnType;
    /// What a column of `sql_type` refuses beyond its [`ColumnType`] (a length, a range, a
    /// precision); `None` when it holds every value of its type family.
    fn column_limit(&self, _sql_type: &str) -> Option<ColumnLimit> {
        None
    }
    /// Creates the schema when missing.
    fn create_schema(&self, schema: &str) -> String {
        format!("CREATE SCHEMA IF NOT EXISTS {}", self.quote(schema))
    }
    /// Column definitions (`"name" TYPE, ...`) for CREATE TABLE statements.
    fn column_defs(&self, columns: &[Column]) -> String {
        let defs: Vec<String> = columns
            .iter()
            .map(|c| format!("{} {}", self.quote(&c.name), self.type_sql(c.ty)))
            .collect();
        defs.join(", ")
    }
    /// How an UPDATE's WHERE clause names its target table (PostgreSQL: qualified; SQLite: bare).
    fn update_target(&self, schema: &str, table: &str) -> String {
        self.qualified(schema, table)
    }
    /// Creates a table with a primary key.
    fn create_table(&self, schema: &str, table: &str, columns: &[Column], key: &[&str]) -> String {
        let key: Vec<String> = key.iter().map(|k| self.quote(k)).collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))",
            self.qualified(schema, table),
            self.column_defs(columns),
            key.join(", ")
        )
    }
    /// Adds a column.
    fn add_column(&self, schema: &str, table: &str, column: &Column) -> String {
        format!(
            "ALTER TABLE {} ADD COLUMN {} {}",
            self.qualified(schema, table),
            self.quote(&column.name),
            self.type_sql(column.ty)
        )
    }
    /// Moves staged rows into `table`, keyed by `key`.
    fn merge_from_stage(
        &self,
        schema: &str,
        table: &str,
        stage: &str,
        columns: &[&str],
        key: &[&str],
        on_conflict: OnConflict,
    ) -> String {
        let select: Vec<String> = columns.iter().map(|c| self.quote(c)).collect();
        self.merge_from_stage_as(schema, table, stage, columns, &select, key, on_conflict)
    }
    /// [`Dialect::merge_from_stage`] with the stage's value of each of `columns` written as
    /// `select` has it (an explicit cast, where the target column needs one).
    #[allow(clippy::too_many_arguments)]
    fn merge_from_stage_as(
        &self,
        schema: &str,
        table: &str,
        stage: &str,
        columns: &[&str],
        select: &[String],
        key: &[&str],
        on_conflict: OnConflict,
    ) -> String {
        let cols: Vec<String> = columns.iter().map(|c| self.quote(c)).collect();
        let keys: Vec<String> = key.iter().map(|c| self.quote(c)).collect();
        let action = match on_conflict {
            OnConflict::Ignore => "DO NOTHING".to_string(),
            OnConflict::Update => {
                let sets: Vec<String> = columns
                    .iter()
                    .filter(|c| !key.contains(c))
                    .map(|c| format!("{0} = excluded.{0}", self.quote(c)))
                    .collect();
                if sets.is_empty() {
                    "DO NOTHING".to_string()
                } else {
                    format!("DO UPDATE SET {}", sets.join(", "))
                }
            }
        };
        // `WHERE true` lets SQLite parse ON CONFLICT after INSERT ... SELECT.
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM {} WHERE true ON CONFLICT ({}) {action}",
            self.qualified(schema, table),
            cols.join(", "),
            select.join(", "),
            self.quote(stage),
            keys.join(", ")
        )
    }
    /// Sets `column` of `table` to the stage's `to` where it equals the stage's `from`, and
    /// each other column of `also` to the stage's column of the same name.
    #[allow(clippy::too_many_arguments)]
    fn update_from_stage(
        &self,
        schema: &str,
        table: &str,
        column: &str,
        stage: &str,
        (from, to): (&str, &str),
        also: &[&str],
    ) -> String {
        let also: String = also
            .iter()
            .map(|c| format!(", {c} = s.{c}", c = self.quote(c)))
            .collect();
        format!(
            "UPDATE {t} SET {c} = s.{to}{also} FROM {s} s WHERE {target}.{c} = s.{from}",
            t = self.qualified(schema, table),
            target = self.update_target(schema, table),
            c = self.quote(column),
            s = self.quote(stage),
            from = self.quote(from),
            to = self.quote(to),
        )
    }
    /// Deletes the rows of `table` whose `column` is one of the stage's `stage_column` values.
    fn delete_in_stage(
        &self,
        schema: &str,
        table: &str,
        column: &str,
        stage: &str,
        stage_column: &str,
    ) -> String {
        format!(
            "DELETE FROM {} WHERE {} IN (SELECT {} FROM {})",
            self.qualified(schema, table),
            self.quote(column),
            self.quote(stage_column),
            self.quote(stage)
        )
    }
}

/// What a warehouse table looks like now: column name → type.
pub type TableColumns = BTreeMap<String, ColumnType>;

/// The narrowed columns of a table: column name → what it refuses beyond its type.
pub type ColumnLimits = BTreeMap<String, ColumnLimit>;

/// Runs `work` in one transaction of `wh`: committed when it succeeds, rolled back when it or
/// the commit fails — SQLite keeps a transaction whose `COMMIT` failed (`SQLITE_BUSY`) open,
/// and the session could begin no other.
pub fn in_transaction<T>(
    wh: &mut dyn Warehouse,
    work: impl FnOnce(&mut dyn Warehouse) -> Result<T, WarehouseError>,
) -> Result<T, WarehouseError> {
    wh.begin()?;
    match work(wh).and_then(|out| wh.commit().map(|()| out)) {
        Ok(out) => Ok(out),
        Err(e) => {
            let _ = wh.rollback();
            Err(e)
        }
    }
}

/// A connection to one schema of one warehouse.
pub trait Warehouse: Send {
    /// The warehouse's SQL dialect.
    fn dialect(&self) -> &dyn Dialect;
    /// The schema this connection writes to.
    fn schema(&self) -> &str;
    /// Why the database cannot take the sync's rows whatever its rights (PostgreSQL: an encoding
    /// other than UTF8), if it cannot. [`Warehouse::test_connection`] fails with it too.
    fn unsupported_database(&mut self) -> Result<Option<String>, WarehouseError> {
        Ok(None)
    }
    /// Creates the schema when missing and checks the create, alter, insert and delete rights
    /// the sync needs (on a probe table it drops again).
    fn test_connection(&mut self) -> Result<(), WarehouseError>;
    /// Every table of the schema with its columns.
    fn describe(&mut self) -> Result<BTreeMap<String, TableColumns>, WarehouseError>;
    /// Table → its narrowed columns (see [`Dialect::column_limit`]), as of the last
    /// [`Warehouse::describe`]. A wrapper around a warehouse must forward this method, or values
    /// a narrowed column refuses fail their table's loads instead of going to `discards`.
    fn column_limits(&self) -> BTreeMap<String, ColumnLimits>;
    /// Table → columns dropped from it that still count toward
    /// [`Dialect::max_columns`] (PostgreSQL keeps their slots until the table is recreated),
    /// as of the last [`Warehouse::describe`]; tables without any are absent.
    fn dropped_columns(&self) -> BTreeMap<String, usize> {
        BTreeMap::new()
    }
    /// Frees `table`'s name for the CREATE TABLE that follows (in the caller's transaction)
    /// when something other than a table holds it: PostgreSQL renames a primary-key index of
    /// the sync's own tables that took it (earlier releases let PostgreSQL name them
    /// `<table>_pkey`) and refuses, naming what holds it, anything else of the same name.
    fn make_room(&mut self, _table: &str) -> Result<(), WarehouseError> {
        Ok(())
    }
    /// Starts a transaction.
    fn begin(&mut self) -> Result<(), WarehouseError>;
    /// Commits it.
    fn commit(&mut self) -> Result<(), WarehouseError>;
    /// Rolls it back.
    fn rollback(&mut self) -> Result<(), WarehouseError>;
    /// Runs one statement; returns the rows it changed.
    fn execute(&mut self, sql: &str) -> Result<u64, WarehouseError>;
    /// The statement that moves the rows of `stage` into `table` of this connection's schema
    /// ([`Dialect::merge_from_stage`]), with the explicit casts the table's columns need, as of
    /// the last [`Warehouse::describe`] (PostgreSQL: a DBA's `json`/`jsonb` column, which
    /// text reaches by no implicit cast). A wrapper around a warehouse must forward it.
    fn merge_stage(
        &self,
        table: &str,
        stage: &str,
        columns: &[&str],
        key: &[&str],
        on_conflict: OnConflict,
    ) -> String {
        self.dialect()
            .merge_from_stage(self.schema(), table, stage, columns, key, on_conflict)
    }
    /// Runs a query; every value comes back as text (or NULL).
    fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, WarehouseError>;
    /// The bulk path: creates a transaction-scoped staging table `stage` with `columns` and
    /// fills it with `rows` (PostgreSQL: binary COPY; SQLite: prepared inserts).
    fn stage(
        &mut self,
        stage: &str,
        columns: &[Column],
        rows: &[Vec<Cell>],
    ) -> Result<(), WarehouseError>;
    /// The fast path for append-only tables: writes `rows` straight into `table` (inside the
    /// caller's transaction) and returns `Ok(true)`, or returns `Ok(false)` without writing when
    /// the warehouse has no such path, a column needs a conversion only the staging path does,
    /// or a row already exists — the caller then stages and merges. A wrapper around a warehouse
    /// must forward this method, or every load takes the staging path.
    fn append(
        &mut self,
        _table: &str,
        _columns: &[Column],
        _rows: &[Vec<Cell>],
    ) -> Result<bool, WarehouseError> {
        Ok(false)
    }
}

/// The type's display name for errors.
fn unsupported(t: WarehouseType) -> WarehouseError {
    WarehouseError::new(
        ErrorClass::Internal,
        format!(
            "warehouse type {t} is not supported by this version's sync yet (postgres and sqlite are)"
        ),
    )
}

/// Connects to the warehouse `spec` describes, writing into `schema`.
pub fn connect(
    spec: &WarehouseSpec,
    schema: &str,
    credentials: &Credentials,
) -> Result<Box<dyn Warehouse>, WarehouseError> {
    match spec.r#type {
        WarehouseType::Postgres => {
            let settings = spec
                .postgres
                .as_ref()
                .ok_or_else(|| WarehouseError::internal("warehouse.postgres is missing"))?;
            Ok(Box::new(postgres::PostgresWarehouse::connect(
                settings,
                schema,
                credentials,
            )?))
        }
        WarehouseType::Sqlite => {
            let settings = spec
                .sqlite
                .as_ref()
                .ok_or_else(|| WarehouseError::internal("warehouse.sqlite is missing"))?;
            Ok(Box::new(sqlite::SqliteWarehouse::open(
                std::path::Path::new(&settings.path),
                schema,
            )?))
        }
        other => Err(unsupported(other)),
    }
}

/// Whether this version's sync can load into a warehouse of type `t` ([`connect`] refuses
/// the others).
pub fn supported(t: WarehouseType) -> bool {
    matches!(t, WarehouseType::Postgres | WarehouseType::Sqlite)
}
