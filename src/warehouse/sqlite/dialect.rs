//! SQLite's SQL: no schemas (the tables live in the file), declared types mapped back by name.

use crate::warehouse::{ColumnType, Dialect};

/// The dialect of an SQLite warehouse file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SqliteDialect;

impl Dialect for SqliteDialect {
    fn max_identifier_len(&self) -> usize {
        // SQLite has no limit; keep names portable to the other warehouses' shortest (PostgreSQL).
        63
    }

    fn max_columns(&self) -> usize {
        // SQLITE_MAX_COLUMN as the bundled library is built.
        2000
    }

    fn qualified(&self, _schema: &str, table: &str) -> String {
        format!("main.{}", self.quote(table))
    }

    fn create_schema(&self, _schema: &str) -> String {
        "SELECT 1".into()
    }

    fn type_sql(&self, ty: ColumnType) -> &'static str {
        match ty {
            ColumnType::Timestamp => "TIMESTAMP",
            ColumnType::Integer => "BIGINT",
            ColumnType::Float => "DOUBLE",
            ColumnType::Boolean => "BOOLEAN",
            ColumnType::Varchar => "TEXT",
        }
    }

    fn parse_type(&self, sql_type: &str) -> ColumnType {
        match sql_type.to_ascii_uppercase().as_str() {
            "TIMESTAMP" => ColumnType::Timestamp,
            "BIGINT" | "INTEGER" | "INT" => ColumnType::Integer,
            "DOUBLE" | "REAL" | "FLOAT" => ColumnType::Float,
            "BOOLEAN" => ColumnType::Boolean,
            _ => ColumnType::Varchar,
        }
    }

    fn update_target(&self, _schema: &str, table: &str) -> String {
        // SQLite names an UPDATE's target by its bare table name in the WHERE clause.
        self.quote(table)
    }
}
