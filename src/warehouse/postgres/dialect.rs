//! PostgreSQL's SQL, and Redshift's differences from it.

use crate::warehouse::{Column, ColumnLimit, ColumnType, Dialect};

/// The dialect of PostgreSQL (and, with `redshift`, of Amazon Redshift).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostgresDialect {
    redshift: bool,
}

impl PostgresDialect {
    /// PostgreSQL.
    pub fn postgres() -> PostgresDialect {
        PostgresDialect { redshift: false }
    }

    /// Amazon Redshift: 127-byte identifiers, VARCHAR(65535) instead of TEXT.
    pub fn redshift() -> PostgresDialect {
        PostgresDialect { redshift: true }
    }

    /// Whether this is Redshift's dialect.
    pub fn is_redshift(&self) -> bool {
        self.redshift
    }
}

impl PostgresDialect {
    /// Whether binary COPY can write a value of the type [`Dialect::parse_type`] reads from
    /// `sql_type` (as `format_type` spells it) straight into such a column. Binary COPY does not
    /// convert: an 8-byte integer into `integer`, a float into `numeric`, a timestamp into
    /// `date` or text into `jsonb` are refused (or misread), so such columns are loaded through a
    /// staging table, whose `INSERT … SELECT` applies PostgreSQL's assignment casts, and the
    /// explicit ones of [`PostgresDialect::stage_cast`].
    pub fn copies_directly(&self, sql_type: &str) -> bool {
        let t = sql_type.to_ascii_lowercase();
        // An array of any of these (`text[]`, `character varying(20)[]`) is another type.
        (t.starts_with("character varying") && !t.ends_with("[]"))
            || [
                "text",
                "bigint",
                "double precision",
                "boolean",
                "timestamp with time zone",
            ]
            .contains(&t.as_str())
    }
}

impl PostgresDialect {
    /// The explicit cast the stage's value needs into a column of `sql_type`, where no implicit
    /// one reaches it from the stage's text: `json` and `jsonb` (whose values the sync checks
    /// are JSON, [`ColumnLimit::Json`]), and every other type the sync stages as text but text
    /// has no assignment cast to — a DBA's `uuid`, `inet`, enum, `text[]`, `citext` — cast to
    /// the type as the catalog spells it (`format_type`, which quotes and qualifies names as
    /// needed), by the type's input function. Without it every load of such a column failed,
    /// whatever its values; now one fails only on a value the type refuses, with PostgreSQL's
    /// message naming it. Only for a `plain` type (no modifier, no domain): an explicit cast
    /// to `varchar(3)[]` or `bit(8)` cuts a longer value where the load must refuse it, so
    /// those keep failing their table on such a column, as before.
    pub fn stage_cast(&self, sql_type: &str, plain: bool) -> Option<String> {
        let t = sql_type.to_ascii_lowercase();
        if t == "json" || t == "jsonb" {
            return Some(t);
        }
        let text = (t.starts_with("character") || t.starts_with("varchar") || t == "text")
            && !t.ends_with("[]");
        if !plain || text || self.parse_type(sql_type) != ColumnType::Varchar {
            return None;
        }
        Some(sql_type.to_string())
    }
}

impl PostgresDialect {
    /// The name of `table`'s primary-key constraint (and index). Left to PostgreSQL it would be
    /// `<table>_pkey`, a name a Track event's table can take (`Tracks Pkey` → `tracks_pkey`,
    /// then refused or, under `IF NOT EXISTS`, silently not created); the sync's identifiers
    /// hold only letters, digits and `_`, so a `$` keeps this one apart. A name too long for
    /// the suffix is cut and disambiguated by its hash.
    pub fn key_constraint(&self, table: &str) -> String {
        let max = self.max_identifier_len();
        if table.len() + 3 <= max {
            return format!("{table}$pk");
        }
        let hash = crate::sync::naming::short_hash(table);
        let end = crate::sync::naming::floor_char_boundary(table, max - 4 - hash.len());
        format!("{}$pk${hash}", &table[..end])
    }
}

impl Dialect for PostgresDialect {
    fn create_table(&self, schema: &str, table: &str, columns: &[Column], key: &[&str]) -> String {
        let key: Vec<String> = key.iter().map(|k| self.quote(k)).collect();
        // Redshift names no constraints (and builds no index for a key).
        let name = match self.redshift {
            true => String::new(),
            false => format!("CONSTRAINT {} ", self.quote(&self.key_constraint(table))),
        };
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({}, {name}PRIMARY KEY ({}))",
            self.qualified(schema, table),
            self.column_defs(columns),
            key.join(", ")
        )
    }

    fn max_identifier_len(&self) -> usize {
        if self.redshift { 127 } else { 63 }
    }

    fn max_columns(&self) -> usize {
        // PostgreSQL's limit counts the columns a DBA dropped too: `describe` reports those
        // apart (`Warehouse::dropped_columns`), and the sync counts them against it.
        1600
    }

    fn max_row_bytes(&self) -> Option<usize> {
        // A heap tuple must fit one page (MaxHeapTupleSize, 8,160 bytes with 8 KB pages):
        // less its 24-byte header and a null bitmap of up to 1,600 columns (200 bytes). Long
        // values are moved out of line first (TOAST), so text counts its pointer, not its
        // length. Redshift stores columns apart and has no such limit.
        (!self.redshift).then_some(8160 - 24 - 200)
    }

    fn type_sql(&self, ty: ColumnType) -> &'static str {
        match ty {
            ColumnType::Timestamp => "TIMESTAMPTZ",
            ColumnType::Integer => "BIGINT",
            ColumnType::Float => "DOUBLE PRECISION",
            ColumnType::Boolean => "BOOLEAN",
            ColumnType::Varchar if self.redshift => "VARCHAR(65535)",
            ColumnType::Varchar => "TEXT",
        }
    }

    fn parse_type(&self, sql_type: &str) -> ColumnType {
        let t = sql_type.to_ascii_lowercase();
        if t.starts_with("timestamp") || t == "date" {
            ColumnType::Timestamp
        } else if ["bigint", "integer", "smallint", "int8", "int4", "int2"].contains(&t.as_str()) {
            ColumnType::Integer
        } else if ["double precision", "real", "numeric", "float8", "float4"].contains(&t.as_str())
            || t.starts_with("numeric")
        {
            ColumnType::Float
        } else if t == "boolean" || t == "bool" {
            ColumnType::Boolean
        } else {
            ColumnType::Varchar
        }
    }

    fn column_limit(&self, sql_type: &str) -> Option<ColumnLimit> {
        let t = sql_type.to_ascii_lowercase();
        // `format_type` spells a modifier as `(n)` or `(p,s)`.
        let args = |prefix: &str| -> Option<Vec<i64>> {
            let inner = t
                .strip_prefix(prefix)?
                .strip_prefix('(')?
                .strip_suffix(')')?;
            inner.split(',').map(|a| a.trim().parse().ok()).collect()
        };
        match t.as_str() {
            "json" => Some(ColumnLimit::Json),
            "jsonb" => Some(ColumnLimit::Jsonb),
            "integer" | "int4" => Some(ColumnLimit::Range {
                min: i32::MIN.into(),
                max: i32::MAX.into(),
            }),
            "smallint" | "int2" => Some(ColumnLimit::Range {
                min: i16::MIN.into(),
                max: i16::MAX.into(),
            }),
            "real" | "float4" => Some(ColumnLimit::Real),
            _ => {
                if let Some(n) = args("character varying").or_else(|| args("character")) {
                    let max = usize::try_from(*n.first()?).ok()?;
                    return Some(ColumnLimit::Text {
                        max,
                        bytes: self.redshift,
                    });
                }
                match args("numeric")?.as_slice() {
                    [p] => Some(ColumnLimit::Numeric {
                        precision: i32::try_from(*p).ok()?,
                        scale: 0,
                    }),
                    [p, s] => Some(ColumnLimit::Numeric {
                        precision: i32::try_from(*p).ok()?,
                        scale: i32::try_from(*s).ok()?,
                    }),
                    _ => None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warehouse::{Column, OnConflict};

    #[test]
    fn quoting_escapes_embedded_quotes() {
        let d = PostgresDialect::postgres();
        assert_eq!(d.quote("a\"b"), "\"a\"\"b\"");
        assert_eq!(d.qualified("s", "select"), "\"s\".\"select\"");
    }

    #[test]
    fn types_round_trip_through_the_catalog_names() {
        let d = PostgresDialect::postgres();
        for (ty, catalog) in [
            (ColumnType::Timestamp, "timestamp with time zone"),
            (ColumnType::Integer, "bigint"),
            (ColumnType::Float, "double precision"),
            (ColumnType::Boolean, "boolean"),
            (ColumnType::Varchar, "text"),
        ] {
            assert_eq!(d.parse_type(catalog), ty);
        }
    }

    #[test]
    fn narrowed_catalog_types_have_limits_and_the_sync_s_own_have_none() {
        let d = PostgresDialect::postgres();
        let text = |max| Some(ColumnLimit::Text { max, bytes: false });
        for (catalog, limit) in [
            ("character varying(20)", text(20)),
            ("character(3)", text(3)),
            (
                "integer",
                Some(ColumnLimit::Range {
                    min: -2_147_483_648,
                    max: 2_147_483_647,
                }),
            ),
            (
                "smallint",
                Some(ColumnLimit::Range {
                    min: -32_768,
                    max: 32_767,
                }),
            ),
            (
                "numeric(10,2)",
                Some(ColumnLimit::Numeric {
                    precision: 10,
                    scale: 2,
                }),
            ),
            (
                "numeric(5,0)",
                Some(ColumnLimit::Numeric {
                    precision: 5,
                    scale: 0,
                }),
            ),
            ("numeric(10,2)[]", None),
            ("character varying(20)[]", None),
            ("real", Some(ColumnLimit::Real)),
            ("numeric", None),
            ("character varying", None),
            ("text", None),
            ("bigint", None),
            ("double precision", None),
            ("timestamp with time zone", None),
            ("date", None),
            ("integer[]", None),
        ] {
            assert_eq!(d.column_limit(catalog), limit, "{catalog}");
        }
        // Arrays are other types than their elements: never written by binary COPY directly.
        assert!(d.copies_directly("character varying(20)"));
        assert!(!d.copies_directly("character varying(20)[]"));
        assert!(!d.copies_directly("text[]"));
        assert_eq!(
            PostgresDialect::redshift().column_limit("character varying(256)"),
            Some(ColumnLimit::Text {
                max: 256,
                bytes: true
            })
        );
    }

    /// The staging merge casts explicitly to json, jsonb and the plain types text has no
    /// assignment cast to; never to a type with a modifier or a domain, whose explicit cast
    /// would cut a value the load must refuse; never to the types it reaches by itself.
    #[test]
    fn stage_casts_go_only_to_types_that_need_one_and_cut_nothing() {
        let d = PostgresDialect::postgres();
        for (catalog, plain, cast) in [
            ("json", true, Some("json")),
            ("jsonb", true, Some("jsonb")),
            ("uuid", true, Some("uuid")),
            ("inet", true, Some("inet")),
            ("text[]", true, Some("text[]")),
            (
                "profiles_sync.order_state",
                true,
                Some("profiles_sync.order_state"),
            ),
            ("character varying(3)[]", false, None),
            ("bit(8)", false, None),
            ("my_domain", false, None),
            ("text", true, None),
            ("character varying(20)", false, None),
            ("integer", true, None),
            ("numeric(6,2)", false, None),
            ("date", true, None),
        ] {
            assert_eq!(d.stage_cast(catalog, plain).as_deref(), cast, "{catalog}");
        }
    }

    #[test]
    fn redshift_differs_in_identifier_length_and_varchar() {
        let r = PostgresDialect::redshift();
        assert_eq!(r.max_identifier_len(), 127);
        assert_eq!(r.type_sql(ColumnType::Varchar), "VARCHAR(65535)");
        assert_eq!(r.parse_type("character varying"), ColumnType::Varchar);
        let sql = r.create_table("s", "t", &[Column::new("id", ColumnType::Varchar)], &["id"]);
        assert_eq!(
            sql,
            "CREATE TABLE IF NOT EXISTS \"s\".\"t\" (\"id\" VARCHAR(65535), PRIMARY KEY (\"id\"))"
        );
    }

    #[test]
    fn key_constraints_are_names_no_table_takes_and_fit_the_limit() {
        let d = PostgresDialect::postgres();
        assert_eq!(d.key_constraint("tracks"), "tracks$pk");
        let long = "é".repeat(31); // 62 bytes
        let other = format!("{}e", "é".repeat(30)); // 61 bytes, the same first 60
        let (a, b) = (d.key_constraint(&long), d.key_constraint(&other));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert!(a.contains('$') && b.contains('$'));
        let at_limit = "t".repeat(63);
        let c = d.key_constraint(&at_limit);
        assert!(c.len() <= 63 && c != at_limit, "{c}");
    }

    #[test]
    fn merge_sql_ignores_or_updates_on_the_key() {
        let d = PostgresDialect::postgres();
        let ignore =
            d.merge_from_stage("s", "t", "stage", &["id", "v"], &["id"], OnConflict::Ignore);
        assert!(
            ignore.ends_with("ON CONFLICT (\"id\") DO NOTHING"),
            "{ignore}"
        );
        let update =
            d.merge_from_stage("s", "t", "stage", &["id", "v"], &["id"], OnConflict::Update);
        assert!(
            update.ends_with("ON CONFLICT (\"id\") DO UPDATE SET \"v\" = excluded.\"v\""),
            "{update}"
        );
    }
}
