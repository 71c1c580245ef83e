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

/// What a DBA-narrowed column holds beyond its [`ColumnType`]: a value of the right type family
/// that the column still refuses (`varchar(20)`, `integer`, `numeric(10,2)`, `real`). The sync
/// sends such values to `discards` rather than let the warehouse fail the whole load on them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ColumnLimit {
    /// Text of at most `max` characters (or bytes, with `bytes`); like PostgreSQL, excess
    /// characters that are all spaces are accepted (the warehouse trims them).
    Text {
        /// The longest text the column holds.
        max: usize,
        /// Whether `max` counts bytes (Redshift) rather than characters.
        bytes: bool,
    },
    /// Integers from `min` to `max` (`integer`, `smallint`).
    Range {
        /// The smallest value.
        min: i64,
        /// The largest value.
        max: i64,
    },
    /// Numbers with at most `precision - scale` digits before the point once rounded to
    /// `scale` decimals (`numeric(p,s)`).
    Numeric {
        /// Total significant digits.
        precision: i32,
        /// Digits after the point.
        scale: i32,
    },
    /// Single-precision floats (`real`): neither overflow nor underflow to zero.
    Real,
    /// JSON text (PostgreSQL's `json`): an object, an array, a number or a boolean of the
    /// event loads as it is; a string property (not JSON text) is refused.
    Json,
    /// JSON text for PostgreSQL's `jsonb`, which also refuses a NUL character (`\u0000`) and a
    /// lone surrogate escape (`\ud800`) in any string or key (`json` keeps the text as it is).
    Jsonb,
}

impl ColumnLimit {
    /// `Err` with the reason when the column refuses `cell` (a cell of the column's type).
    pub fn admits(&self, cell: &Cell) -> Result<(), String> {
        match (*self, cell) {
            (ColumnLimit::Text { max, bytes }, Cell::Text(s)) => {
                let (len, unit) = if bytes {
                    (s.len(), "bytes")
                } else {
                    (s.chars().count(), "characters")
                };
                if len <= max {
                    return Ok(());
                }
                let excess = if bytes {
                    s.get(max..)
                } else {
                    s.char_indices().nth(max).map(|(at, _)| &s[at..])
                };
                match excess {
                    Some(rest) if rest.bytes().all(|b| b == b' ') => Ok(()),
                    _ => Err(format!(
                        "text of {len} {unit} is longer than the column's limit of {max}"
                    )),
                }
            }
            (ColumnLimit::Range { min, max }, Cell::Int(i)) if *i < min || *i > max => Err(
                format!("integer {i} is outside the column's range {min} to {max}"),
            ),
            (ColumnLimit::Numeric { precision, scale }, Cell::Float(f)) => {
                // PostgreSQL rounds half away from zero to `scale` decimals, then refuses a
                // value of `precision - scale` or more integer digits. The bound is lowered by a
                // few ulps so a value the float arithmetic puts on either side of it is refused
                // rather than risk a load the warehouse fails.
                let whole = 10f64.powi(precision - scale);
                let bound = whole - 0.5 * 10f64.powi(-scale);
                // Zero always fits; a bound past f64's range holds every float (and an
                // infinite half-unit means every float rounds to zero).
                if *f == 0.0 || whole.is_infinite() || f.abs() < bound * (1.0 - 8.0 * f64::EPSILON)
                {
                    Ok(())
                } else {
                    Err(format!(
                        "{f} does not fit the column's numeric({precision},{scale})"
                    ))
                }
            }
            (ColumnLimit::Real, Cell::Float(f)) => {
                let narrowed = *f as f32;
                if narrowed.is_infinite() || (narrowed == 0.0 && *f != 0.0) {
                    Err(format!("{f} is out of the range of the column's real"))
                } else {
                    Ok(())
                }
            }
            (ColumnLimit::Json, Cell::Text(s)) => serde_json::from_str::<serde::de::IgnoredAny>(s)
                .map(|_| ())
                .map_err(|_| "text that is not JSON, in a json column".to_string()),
            (ColumnLimit::Jsonb, Cell::Text(s)) => {
                serde_json::from_str::<serde::de::IgnoredAny>(s)
                    .map_err(|_| "text that is not JSON, in a jsonb column".to_string())?;
                if escapes_nul(s) {
                    Err("a NUL character (U+0000), which a jsonb column refuses".to_string())
                } else if crate::event::mend_lone_surrogates(s.as_bytes()).is_some() {
                    Err("half of a UTF-16 surrogate pair, which a jsonb column refuses".to_string())
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}

/// Whether JSON text `s` holds a `\u0000` escape (the only way a NUL gets into valid JSON):
/// escapes are read pairwise, so that an escaped backslash before `u0000` is no escape. Valid
/// JSON is not parsed into values, whose numbers could not hold what `jsonb` takes (`1e400`).
fn escapes_nul(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(at) = b
        .get(i..)
        .and_then(|rest| rest.iter().position(|&c| c == b'\\'))
    {
        let at = i + at;
        if b.get(at + 1..at + 6) == Some(b"u0000".as_slice()) {
            return true;
        }
        i = at + 2;
    }
    false
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_admit_values_up_to_their_bound_and_refuse_the_next() {
        let text = |max, bytes| ColumnLimit::Text { max, bytes };
        let t = |s: &str| Cell::Text(s.to_string());
        let cases: Vec<(ColumnLimit, Cell, bool)> = vec![
            (text(3, false), t("abc"), true),
            (text(3, false), t("abcd"), false),
            (text(3, false), t("ééé"), true),
            (text(3, true), t("ééé"), false),
            (text(3, false), t("ab    "), true),
            (text(3, false), t("abc  d"), false),
            (text(3, true), t("aé"), true),
            (text(2, true), t("aé"), false),
            (ColumnLimit::Range { min: -5, max: 5 }, Cell::Int(5), true),
            (ColumnLimit::Range { min: -5, max: 5 }, Cell::Int(-6), false),
            (
                ColumnLimit::Numeric {
                    precision: 4,
                    scale: 2,
                },
                Cell::Float(99.99),
                true,
            ),
            (
                ColumnLimit::Numeric {
                    precision: 4,
                    scale: 2,
                },
                Cell::Float(-99.994),
                true,
            ),
            (
                ColumnLimit::Numeric {
                    precision: 4,
                    scale: 2,
                },
                Cell::Float(99.995),
                false,
            ),
            (
                ColumnLimit::Numeric {
                    precision: 4,
                    scale: 2,
                },
                Cell::Float(100.0),
                false,
            ),
            (
                ColumnLimit::Numeric {
                    precision: 3,
                    scale: 0,
                },
                Cell::Float(999.4),
                true,
            ),
            (
                ColumnLimit::Numeric {
                    precision: 3,
                    scale: 0,
                },
                Cell::Float(999.5),
                false,
            ),
            // Scales past f64's range: numeric(2,-400) rounds every float to 0;
            // numeric(10,400) holds only values below 1e-390, so of floats only 0.
            (
                ColumnLimit::Numeric {
                    precision: 2,
                    scale: -400,
                },
                Cell::Float(1e300),
                true,
            ),
            (
                ColumnLimit::Numeric {
                    precision: 10,
                    scale: 400,
                },
                Cell::Float(0.0),
                true,
            ),
            (
                ColumnLimit::Numeric {
                    precision: 10,
                    scale: 400,
                },
                Cell::Float(1e-300),
                false,
            ),
            (
                ColumnLimit::Numeric {
                    precision: 4,
                    scale: 2,
                },
                Cell::Float(0.0),
                true,
            ),
            (ColumnLimit::Real, Cell::Float(3.4e38), true),
            (ColumnLimit::Real, Cell::Float(3.5e38), false),
            (ColumnLimit::Real, Cell::Float(1e-44), true),
            (ColumnLimit::Real, Cell::Float(1e-50), false),
            (ColumnLimit::Real, Cell::Float(0.0), true),
            (
                ColumnLimit::Json,
                Cell::Text("[1,{\"a\":null}]".into()),
                true,
            ),
            (ColumnLimit::Json, Cell::Text("-1.5e3".into()), true),
            (ColumnLimit::Json, Cell::Text("true".into()), true),
            (ColumnLimit::Json, Cell::Text("plain words".into()), false),
            (ColumnLimit::Json, Cell::Text("[1,".into()), false),
            (ColumnLimit::Json, Cell::Null, true),
            (
                ColumnLimit::Json,
                Cell::Text(r#"["a\u0000b"]"#.into()),
                true,
            ),
            (
                ColumnLimit::Jsonb,
                Cell::Text(r#"["a\u0000b"]"#.into()),
                false,
            ),
            (
                ColumnLimit::Jsonb,
                Cell::Text(r#"{"k\u0000":1}"#.into()),
                false,
            ),
            (
                ColumnLimit::Jsonb,
                Cell::Text(r#"["a\\u0000b"]"#.into()),
                true,
            ),
            (
                ColumnLimit::Jsonb,
                Cell::Text("[1,{\"a\":null}]".into()),
                true,
            ),
            (ColumnLimit::Jsonb, Cell::Text("plain words".into()), false),
            (
                ColumnLimit::Jsonb,
                Cell::Text(r#"["\ud800"]"#.into()),
                false,
            ),
            (
                ColumnLimit::Jsonb,
                Cell::Text(r#"{"k\udc00":1}"#.into()),
                false,
            ),
            (
                ColumnLimit::Jsonb,
                Cell::Text(r#"["\ud83d\ude00"]"#.into()),
                true,
            ),
            (
                ColumnLimit::Jsonb,
                Cell::Text(r#"["\\ud800"]"#.into()),
                true,
            ),
            (ColumnLimit::Jsonb, Cell::Text("[1e400]".into()), true),
            (text(1, false), Cell::Null, true),
        ];
        for (limit, cell, admitted) in cases {
            assert_eq!(limit.admits(&cell).is_ok(), admitted, "{limit:?} {cell:?}");
        }
    }
}
