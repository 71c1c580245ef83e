//! Column types and values as the sync sends them to a warehouse.

use jiff::Timestamp;

/// The five warehouse column types (Segment's), set by the first non-null value of a column.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// A point in time (with time zone, UTC).
    Timestamp,
    /// A 64-bit integer.
    Integer,
    /// A double-precision float.
    Float,
    /// A boolean.
    Boolean,
    /// Text of any length.
    Varchar,
}

impl ColumnType {
    /// The type's name in the sync's state and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnType::Timestamp => "timestamp",
            ColumnType::Integer => "integer",
            ColumnType::Float => "float",
            ColumnType::Boolean => "boolean",
            ColumnType::Varchar => "varchar",
        }
    }
}

/// One value of a row.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// Text.
    Text(String),
    /// A timestamp.
    Timestamp(Timestamp),
}

impl Cell {
    /// Text of an optional string.
    pub fn opt_text(v: Option<&str>) -> Cell {
        v.map(|s| Cell::Text(s.to_string())).unwrap_or(Cell::Null)
    }

    /// The value as text, for comparisons in tests and reports.
    pub fn to_text(&self) -> Option<String> {
        match self {
            Cell::Null => None,
            Cell::Int(i) => Some(i.to_string()),
            Cell::Float(f) => Some(f.to_string()),
            Cell::Bool(b) => Some(b.to_string()),
            Cell::Text(s) => Some(s.clone()),
            Cell::Timestamp(t) => Some(t.to_string()),
        }
    }

    /// Approximate size in bytes, for the bytes-per-sync limit.
    pub fn size(&self) -> usize {
        match self {
            Cell::Null => 1,
            Cell::Int(_) | Cell::Float(_) | Cell::Timestamp(_) => 8,
            Cell::Bool(_) => 1,
            Cell::Text(s) => s.len(),
        }
    }
}

/// A column of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// The column name in the warehouse (already a safe identifier).
    pub name: String,
    /// Its type.
    pub ty: ColumnType,
}

impl Column {
    /// A column.
    pub fn new(name: impl Into<String>, ty: ColumnType) -> Column {
        Column {
            name: name.into(),
            ty,
        }
    }
}
