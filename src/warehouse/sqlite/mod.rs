//! An embedded SQLite file as a warehouse (local runs and the demo). SQLite has no schemas:
//! the tables live in the file itself, one file per WarehouseConnection.

mod dialect;

pub use dialect::SqliteDialect;

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};

use super::{Cell, Column, ColumnLimits, Dialect, TableColumns, Warehouse, WarehouseError};
use crate::crd::ErrorClass;

/// A SQLite warehouse file.
pub struct SqliteWarehouse {
    conn: Connection,
    schema: String,
    dialect: SqliteDialect,
}

fn lite_error(e: rusqlite::Error) -> WarehouseError {
    let class = match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            rusqlite::ErrorCode::PermissionDenied
            | rusqlite::ErrorCode::ReadOnly
            | rusqlite::ErrorCode::AuthorizationForStatementDenied => ErrorClass::Permission,
            rusqlite::ErrorCode::CannotOpen
            | rusqlite::ErrorCode::DatabaseBusy
            | rusqlite::ErrorCode::DatabaseLocked => ErrorClass::Connection,
            rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::TooBig => ErrorClass::Quota,
            rusqlite::ErrorCode::TypeMismatch | rusqlite::ErrorCode::ConstraintViolation => {
                ErrorClass::TypeConflict
            }
            _ => ErrorClass::Internal,
        },
        rusqlite::Error::InvalidPath(_) => ErrorClass::Connection,
        _ => ErrorClass::Internal,
    };
    let message = e.to_string();
    let class = if class == ErrorClass::Internal
        && (message.contains("no such table")
            || message.contains("no such column")
            || message.contains("duplicate column"))
    {
        ErrorClass::Schema
    } else {
        class
    };
    WarehouseError::new(class, message)
}

/// Whether SQLite would take `path` for no file at all — a database in memory (`:memory:`,
/// `file:…` URIs) or a private temporary one (empty) — whose data would vanish with the
/// connection. The store and the warehouse both refuse such paths.
pub fn names_no_file(path: &str) -> bool {
    path.trim().is_empty() || path == ":memory:" || path.starts_with("file:")
}

impl SqliteWarehouse {
    /// Opens (creating when missing) the warehouse file at `path`.
    pub fn open(path: &Path, schema: &str) -> Result<SqliteWarehouse, WarehouseError> {
        // SQLite takes these as a database in memory (or a private temporary one): the sync
        // would report rows that vanish with it.
        let text = path.to_string_lossy();
        if names_no_file(&text) {
            return Err(WarehouseError::new(
                ErrorClass::Schema,
                format!("sqlite.path {text:?} names no file: give the path of the warehouse file"),
            ));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                WarehouseError::new(
                    ErrorClass::Permission,
                    format!("cannot create {}: {e}", dir.display()),
                )
            })?;
        }
        let conn = Connection::open(path).map_err(lite_error)?;
        // The engine's own store file: the sync would take the store's change logs for the
        // warehouse's tables, fail on them every run and write its tables among the store's.
        // Told by the store's format version and its head counter's column together (a Track
        // event `Seq Counter` makes a warehouse table `seq_counter`, without a `head`).
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(lite_error)?;
        let is_store = version > 0
            && conn
                .query_row(
                    "SELECT count(*) > 0 FROM pragma_table_info('seq_counter') WHERE name = 'head'",
                    [],
                    |r| r.get::<_, bool>(0),
                )
                .map_err(lite_error)?;
        if is_store {
            return Err(WarehouseError::new(
                ErrorClass::Schema,
                format!(
                    "sqlite.path {text:?} is a profiles-sync store (the engine's own file): give \
                     the warehouse a file of its own"
                ),
            ));
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(lite_error)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(lite_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(lite_error)?;
        Ok(SqliteWarehouse {
            conn,
            schema: schema.to_string(),
            dialect: SqliteDialect,
        })
    }
}

/// A timestamp as the SQLite warehouse writes it: RFC 3339 in UTC with exactly six fractional
/// digits, so that text order is time order (`…:02Z` sorted after `…:02.5Z`), and the
/// microseconds PostgreSQL keeps, so that both warehouses hold the same value.
pub fn timestamp_text(t: jiff::Timestamp) -> String {
    crate::warehouse::postgres::copy::as_postgres_holds_it(t)
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// A cell bound as a statement parameter: text borrowed, not copied.
struct Bind<'a>(&'a Cell);

impl rusqlite::ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Cell::Null => ToSqlOutput::Owned(SqlValue::Null),
            Cell::Int(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
            Cell::Float(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
            Cell::Bool(b) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*b))),
            Cell::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Cell::Timestamp(t) => ToSqlOutput::Owned(SqlValue::Text(timestamp_text(*t))),
        })
    }
}

impl Warehouse for SqliteWarehouse {
    fn dialect(&self) -> &dyn Dialect {
        &self.dialect
    }

    fn schema(&self) -> &str {
        &self.schema
    }

    fn test_connection(&mut self) -> Result<(), WarehouseError> {
        self.conn
            .execute_batch(
                "BEGIN IMMEDIATE;
                 CREATE TABLE IF NOT EXISTS _profiles_sync_probe (id BIGINT PRIMARY KEY);
                 ALTER TABLE _profiles_sync_probe ADD COLUMN probe_column TEXT;
                 INSERT INTO _profiles_sync_probe (id) VALUES (1);
                 DELETE FROM _profiles_sync_probe;
                 DROP TABLE _profiles_sync_probe;
                 COMMIT;",
            )
            .map_err(|e| {
                let _ = self.conn.execute_batch("ROLLBACK");
                lite_error(e)
            })
    }

    fn describe(&mut self) -> Result<BTreeMap<String, TableColumns>, WarehouseError> {
        let mut stmt = self
            .conn
            .prepare("SELECT m.name, p.name, p.type FROM sqlite_master m JOIN pragma_table_info(m.name) p WHERE m.type = 'table' ORDER BY m.name, p.cid")
            .map_err(lite_error)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(lite_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(lite_error)?;
        let mut out: BTreeMap<String, TableColumns> = BTreeMap::new();
        for (table, column, ty) in rows {
            out.entry(table)
                .or_default()
                .insert(column, self.dialect.parse_type(&ty));
        }
        Ok(out)
    }

    /// SQLite stores any value in any column (a declared `VARCHAR(20)` is only an affinity).
    fn column_limits(&self) -> BTreeMap<String, ColumnLimits> {
        BTreeMap::new()
    }

    fn begin(&mut self) -> Result<(), WarehouseError> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(lite_error)
    }

    fn commit(&mut self) -> Result<(), WarehouseError> {
        self.conn.execute_batch("COMMIT").map_err(lite_error)
    }

    fn rollback(&mut self) -> Result<(), WarehouseError> {
        self.conn.execute_batch("ROLLBACK").map_err(lite_error)
    }

    fn execute(&mut self, sql: &str) -> Result<u64, WarehouseError> {
        self.conn
            .execute(sql, [])
            .map(|n| n as u64)
            .map_err(lite_error)
    }

    fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, WarehouseError> {
        let mut stmt = self.conn.prepare(sql).map_err(lite_error)?;
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                (0..n)
                    .map(|i| {
                        Ok(match r.get::<_, SqlValue>(i)? {
                            SqlValue::Null => None,
                            SqlValue::Integer(v) => Some(v.to_string()),
                            SqlValue::Real(v) => Some(v.to_string()),
                            SqlValue::Text(v) => Some(v),
                            SqlValue::Blob(v) => Some(String::from_utf8_lossy(&v).into_owned()),
                        })
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(lite_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(lite_error)?;
        Ok(rows)
    }

    fn stage(
        &mut self,
        stage: &str,
        columns: &[Column],
        rows: &[Vec<Cell>],
    ) -> Result<(), WarehouseError> {
        let d = &self.dialect;
        self.conn
            .execute_batch(&format!(
                "DROP TABLE IF EXISTS temp.{q}; CREATE TEMP TABLE {q} ({});",
                d.column_defs(columns),
                q = d.quote(stage)
            ))
            .map_err(lite_error)?;
        let marks: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
        let mut stmt = self
            .conn
            .prepare(&format!(
                "INSERT INTO temp.{} VALUES ({})",
                d.quote(stage),
                marks.join(", ")
            ))
            .map_err(lite_error)?;
        for row in rows {
            stmt.execute(rusqlite::params_from_iter(row.iter().map(Bind)))
                .map_err(lite_error)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// A path SQLite takes as a database in memory is refused: the sync reported rows that
    /// vanished with it.
    #[test]
    fn a_path_that_is_no_file_is_refused() {
        for path in ["", ":memory:", "file::memory:"] {
            let e = super::SqliteWarehouse::open(std::path::Path::new(path), "s")
                .err()
                .unwrap();
            assert!(e.message.contains("names no file"), "{path:?}: {e}");
        }
    }

    /// The engine's store file is refused as a warehouse: the sync took the store's change
    /// logs for warehouse tables, failed on them every run and wrote among them.
    #[test]
    fn the_store_s_own_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let url = format!("sqlite://{}", path.display());
        drop(crate::store::open(&url, crate::identity::Rules::default()).unwrap());
        let e = super::SqliteWarehouse::open(&path, "s").err().unwrap();
        assert_eq!(e.class, crate::crd::ErrorClass::Schema);
        assert!(e.message.contains("is a profiles-sync store"), "{e}");
        let tables: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name LIKE '\\_profiles\\_sync%' ESCAPE '\\'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0, "nothing written into the store");
        let other = dir.path().join("warehouse.db");
        super::SqliteWarehouse::open(&other, "s").expect("a file of its own");
        // A warehouse with a Track event table named like the store's counter is no store.
        rusqlite::Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE seq_counter (id TEXT PRIMARY KEY, event TEXT)")
            .unwrap();
        super::SqliteWarehouse::open(&other, "s").expect("still a warehouse");
    }
}
