//! From JSON values to typed warehouse cells: flattening, type inference (by the first non-null
//! value), casting into an existing column's type, and the per-table map from source names to
//! column names that keeps two different properties from ever landing in one column.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use jiff::Timestamp;
use serde_json::{Map, Value};

use super::naming::{fit, floor_char_boundary, identifier, sha1_hex, short_hash};
use crate::event::flatten_each;
use crate::warehouse::{Cell, ColumnType};

/// Names of PostgreSQL's system columns, which no table may have a column of: a property of
/// such a name gets a column with a leading underscore (`xmin` → `_xmin`), in every warehouse
/// alike.
const SYSTEM_COLUMNS: [&str; 6] = ["tableoid", "xmin", "cmin", "xmax", "cmax", "ctid"];

/// Flattens nested objects into `(path, value)` pairs joined with `_` (Segment's warehouse
/// flattening: `{"product": {"name": "x"}}` → `product_name`); arrays stay whole.
pub fn flatten(prefix: &str, map: &Map<String, Value>, out: &mut Vec<(String, Value)>) {
    flatten_each(prefix, map, &mut |path, v| {
        out.push((path.to_string(), v.clone()))
    });
}

/// The reason a property is kept out of a row whose earlier property took its column.
pub fn same_name_reason(column: &str) -> String {
    format!("another property of the row flattens to the same column ({column})")
}

/// Records `value` for position `p` of a per-position cache, padding the positions before it
/// with `T::default()`.
pub fn remember<T: Clone + Default>(at: &mut Vec<T>, p: usize, value: T) {
    if p >= at.len() {
        at.resize(p + 1, T::default());
    }
    at[p] = value;
}

/// Parses an ISO-8601 / RFC 3339 timestamp string.
pub fn parse_timestamp(s: &str) -> Option<Timestamp> {
    // Only strings that look like a date-time (Segment infers timestamps from ISO strings).
    if s.len() < 20 || s.as_bytes().get(4).is_none_or(|b| *b != b'-') {
        return None;
    }
    s.parse::<Timestamp>().ok()
}

/// Whether every warehouse can hold `t`: years 1 to 9999 (BigQuery's and Snowflake's range;
/// PostgreSQL refuses years before 4713 BC, which skew correction can produce from a wild
/// `sentAt`).
pub fn storable_time(t: Timestamp) -> bool {
    // From 0001-01-01T00:00:00Z; jiff itself ends within 9999 (comparisons: this runs for every
    // cell).
    const FIRST: Timestamp = Timestamp::constant(-62_135_596_800, 0);
    t >= FIRST
}

/// Why a string can't be stored as text, if it can't: PostgreSQL's text refuses NUL.
fn text_refusal(s: &str) -> Option<String> {
    s.contains('\0')
        .then(|| "a string with a NUL character (U+0000) can't be stored as text".to_string())
}

/// `s` with each NUL character written as its JSON escape `\u0000`, for text columns that have
/// no discards path (materialized traits and identifiers). No two strings become one: in a
/// string with a NUL, or one that spells `\u0000` itself, every backslash is doubled first;
/// any other string is kept as it is.
pub fn escape_nul(s: &str) -> Cow<'_, str> {
    if s.contains('\0') || s.contains("\\u0000") {
        Cow::Owned(s.replace('\\', "\\\\").replace('\0', "\\u0000"))
    } else {
        Cow::Borrowed(s)
    }
}

/// The longest text a key column of a materialized table holds: longer (a trait name has no
/// limit, and NUL escapes lengthen ids) would pass PostgreSQL's B-tree entry limit (~2.7 KB).
pub const MAX_KEY_TEXT: usize = 1024;

/// What marks a key cut by [`key_text`]: `<start>…#sha1:<hex>`.
const CUT_MARK: &str = "…#sha1:";

/// [`escape_nul`], then, past [`MAX_KEY_TEXT`] bytes, cut with a hash of the whole string
/// (`<start>…#sha1:<hex>`), for the key columns of the materialized tables. A string that holds
/// the cut's mark itself is cut too, however short (a trait can be *named* like another's cut
/// key): so a key with the mark always ends with the hash of the string it stands for, and no
/// two strings share a key.
pub fn key_text(s: &str) -> Cow<'_, str> {
    let escaped = escape_nul(s);
    if escaped.len() <= MAX_KEY_TEXT && !escaped.contains(CUT_MARK) {
        return escaped;
    }
    let tail = format!("{CUT_MARK}{}", sha1_hex(s));
    let cut = floor_char_boundary(&escaped, MAX_KEY_TEXT - tail.len());
    Cow::Owned(format!("{}{tail}", &escaped[..cut]))
}

/// What marks a source name recorded as its hash ([`source_key`]).
const SOURCE_DIGEST: &str = "#sha1:";

/// The key a property's source name is recorded under in the warehouse's column assignments
/// (`_profiles_sync_columns`): the name itself, or `#sha1:<hex of its SHA-1>` for one that
/// PostgreSQL could not hold in that table's key — with a NUL character, or longer than
/// [`MAX_KEY_TEXT`] bytes — and for one that starts with `#sha1:`, so that the two kinds never
/// meet.
pub fn source_key(source: &str) -> Cow<'_, str> {
    if source.contains('\0') || source.len() > MAX_KEY_TEXT || source.starts_with(SOURCE_DIGEST) {
        Cow::Owned(format!("{SOURCE_DIGEST}{}", sha1_hex(source)))
    } else {
        Cow::Borrowed(source)
    }
}

/// Whether a recorded source name is already a key of [`source_key`]'s hashed kind.
fn is_source_digest(recorded: &str) -> bool {
    recorded
        .strip_prefix(SOURCE_DIGEST)
        .is_some_and(|hex| hex.len() == 40 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn time_cell(t: Timestamp) -> Result<Cell, String> {
    if storable_time(t) {
        Ok(Cell::Timestamp(t))
    } else {
        Err(format!("timestamp {t} is outside the years 1 to 9999"))
    }
}

/// The column type a value implies; `None` for null. An integer past a signed 64-bit integer
/// (an unsigned id, a hash) implies text, which holds it exactly: a float column would refuse
/// it (it cannot hold it exactly) and every integer id after it would land as a float.
pub fn infer(v: &Value) -> Option<ColumnType> {
    match v {
        Value::Null => None,
        Value::Bool(_) => Some(ColumnType::Boolean),
        Value::Number(n) if n.is_i64() => Some(ColumnType::Integer),
        Value::Number(n) if n.is_u64() => Some(ColumnType::Varchar),
        Value::Number(_) => Some(ColumnType::Float),
        Value::String(s) if parse_timestamp(s).is_some() => Some(ColumnType::Timestamp),
        _ => Some(ColumnType::Varchar),
    }
}

/// Casts a value into a column of type `ty`; `Err` carries the reason for the discards table.
pub fn cast(v: &Value, ty: ColumnType) -> Result<Cell, String> {
    let fail = || Err(format!("{} can't be cast to {}", kind(v), ty.as_str()));
    match (ty, v) {
        (_, Value::Null) => Ok(Cell::Null),
        (ColumnType::Varchar, Value::String(s)) => match text_refusal(s) {
            Some(reason) => Err(reason),
            None => Ok(Cell::Text(s.clone())),
        },
        // JSON text escapes control characters, NUL included.
        (ColumnType::Varchar, other) => Ok(Cell::Text(other.to_string())),
        (ColumnType::Integer, Value::Number(n)) => match n.as_i64() {
            Some(i) => Ok(Cell::Int(i)),
            None => match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Cell::Int(f as i64)),
                _ => fail(),
            },
        },
        (ColumnType::Integer, Value::String(s)) => {
            s.trim().parse().map(Cell::Int).or_else(|_| fail())
        }
        // An integer a double cannot hold exactly (past 2^53) is refused, never rounded: the
        // column would hold a number nobody sent (an id-like value off by one).
        (ColumnType::Float, Value::Number(n)) => {
            let exact = |f: f64| match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => f as i128 == i128::from(i),
                (None, Some(u)) => f as i128 == i128::from(u),
                (None, None) => true,
            };
            match n.as_f64() {
                Some(f) if exact(f) => Ok(Cell::Float(f)),
                _ => fail(),
            }
        }
        (ColumnType::Float, Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Cell::Float(f)),
            _ => fail(),
        },
        (ColumnType::Boolean, Value::Bool(b)) => Ok(Cell::Bool(*b)),
        (ColumnType::Boolean, Value::String(s)) if s == "true" || s == "false" => {
            Ok(Cell::Bool(s == "true"))
        }
        (ColumnType::Timestamp, Value::String(s)) => match parse_timestamp(s) {
            Some(t) => time_cell(t),
            None => fail(),
        },
        _ => fail(),
    }
}

/// [`cast`] taking the value by value, so a string moves into its cell; on failure the value
/// comes back with the reason.
pub fn cast_owned(v: Value, ty: ColumnType) -> Result<Cell, (String, Value)> {
    match (ty, v) {
        (ColumnType::Varchar, Value::String(s)) if !s.contains('\0') => Ok(Cell::Text(s)),
        (_, v) => cast(&v, ty).map_err(|reason| (reason, v)),
    }
}

/// A value of a row being built: JSON as the event carried it, or a timestamp the sync already
/// holds typed (which types, casts and discards exactly as its RFC 3339 string would, without
/// being written out and parsed back for every row).
#[derive(Clone, Debug, PartialEq)]
pub enum Field {
    /// A JSON value.
    Json(Value),
    /// A timestamp.
    Time(Timestamp),
}

impl From<Value> for Field {
    fn from(v: Value) -> Field {
        Field::Json(v)
    }
}

impl From<Option<Timestamp>> for Field {
    fn from(t: Option<Timestamp>) -> Field {
        t.map(Field::Time).unwrap_or(Field::Json(Value::Null))
    }
}

impl Field {
    /// The column type the field implies; `None` for null.
    pub fn infer(&self) -> Option<ColumnType> {
        match self {
            Field::Json(v) => infer(v),
            Field::Time(_) => Some(ColumnType::Timestamp),
        }
    }

    /// [`cast_owned`] of the field.
    pub fn cast(self, ty: ColumnType) -> Result<Cell, (String, Field)> {
        match (self, ty) {
            // The common cases first, without the general path's moves: a string into text, a
            // null, a timestamp into a timestamp.
            (Field::Json(Value::String(s)), ColumnType::Varchar) if !s.contains('\0') => {
                Ok(Cell::Text(s))
            }
            (Field::Json(Value::Null), _) => Ok(Cell::Null),
            (Field::Time(t), ColumnType::Timestamp) => {
                time_cell(t).map_err(|reason| (reason, Field::Time(t)))
            }
            (Field::Time(t), _) => {
                cast_owned(Value::String(t.to_string()), ty).map_err(|(r, v)| (r, Field::Json(v)))
            }
            (Field::Json(v), _) => cast_owned(v, ty).map_err(|(r, v)| (r, Field::Json(v))),
        }
    }

    /// The length of the field written as JSON.
    pub fn json_len(&self) -> usize {
        match self {
            Field::Json(v) => v.to_string().len(),
            // A timestamp's JSON is its RFC 3339 string in quotes.
            Field::Time(t) => t.to_string().len() + 2,
        }
    }

    /// The field as text (a string as is, anything else as JSON), for discards.
    pub fn into_text(self) -> String {
        match self {
            Field::Json(Value::String(s)) => s,
            Field::Json(v) => v.to_string(),
            Field::Time(t) => t.to_string(),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a float",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The columns of one warehouse table and the source names they were assigned to.
#[derive(Clone, Debug, Default)]
pub struct ColumnMap {
    by_source: HashMap<String, String>,
    used: HashSet<String>,
    /// Source key ([`source_key`]) → column pairs assigned since the last
    /// [`ColumnMap::take_new`].
    new: Vec<(String, String)>,
}

/// The column a property path takes when no other property has it: snake_case, dots joined
/// with `_`, cut to `max_len`, `_` before a system column's name (PostgreSQL and Redshift refuse
/// a column named like one).
fn base_column(source: &str, max_len: usize) -> String {
    let base = identifier(&source.replace('.', "_"), max_len);
    if SYSTEM_COLUMNS.contains(&base.as_str()) {
        format!("_{base}")
    } else {
        base
    }
}

impl ColumnMap {
    /// A map with `reserved` column names already taken (they are never given to a property).
    pub fn with_reserved<'a>(reserved: impl IntoIterator<Item = &'a str>) -> ColumnMap {
        ColumnMap {
            used: reserved.into_iter().map(String::from).collect(),
            ..Default::default()
        }
    }

    /// Restores an assignment read from the warehouse's state: recorded under its
    /// [`source_key`], or (an SQLite warehouse of an earlier release) under a name that key
    /// now hashes.
    pub fn restore(&mut self, recorded: String, column: String) {
        self.used.insert(column.clone());
        let key = if is_source_digest(&recorded) {
            recorded
        } else {
            source_key(&recorded).into_owned()
        };
        self.by_source.insert(key, column);
    }

    /// The column of `source` (a dotted property path), assigning one if new. `None` when the
    /// name is a reserved column (Segment drops such properties).
    pub fn column(&mut self, source: &str, max_len: usize) -> Option<String> {
        let key = source_key(source);
        if let Some(c) = self.by_source.get(key.as_ref()) {
            return Some(c.clone());
        }
        let base = base_column(source, max_len);
        if self.used.contains(&base) && self.is_reserved_collision(&base) {
            return None;
        }
        let column = if self.used.contains(&base) {
            // Another source already has this name (`Total` vs `total`): never merge the two —
            // nor with a source literally named like the suffixed name (`total_<hash>`).
            let suffixed = format!("{base}_{}", short_hash(source));
            let mut column = fit(&suffixed, source, max_len);
            let mut n = 2;
            while self.used.contains(&column) {
                // Each attempt hashes differently: a name cut to the limit keeps only the hash
                // of its end, and the same hash would give the same (taken) name for ever.
                column = fit(
                    &format!("{suffixed}_{n}"),
                    &format!("{source}\0{n}"),
                    max_len,
                );
                n += 1;
            }
            column
        } else {
            base
        };
        self.used.insert(column.clone());
        self.by_source.insert(key.to_string(), column.clone());
        self.new.push((key.into_owned(), column.clone()));
        Some(column)
    }

    /// The names a selection's `columns.exclude` may give the property `source` by, besides
    /// its own column's: its column name before a suffix told it from another spelling
    /// (`email` for `Email`, whose column is `email_<hash>` beside `email`'s), and before the
    /// warehouse's length limit cut it. An exclusion meant for a property covers all its
    /// spellings: the values it keeps out are often personal data.
    pub fn spellings(source: &str, max_len: usize) -> [String; 2] {
        [
            base_column(source, max_len),
            base_column(source, usize::MAX),
        ]
    }

    fn is_reserved_collision(&self, base: &str) -> bool {
        // A name taken by a reserved column, not by another property.
        !self.by_source.values().any(|c| c == base)
    }

    /// The assignments made since the last call, to persist with the rows that use them.
    pub fn take_new(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.new)
    }
}

/// A row being built: column → value, plus the type of each new column.
pub type RawRow = BTreeMap<String, Value>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Names that collide get a hashed suffix, and one already taken (a property literally
    /// named like it) a further one: three sources, three columns, whatever their order.
    #[test]
    fn a_suffixed_name_already_taken_is_never_shared() {
        let crafted = format!("total_{}", short_hash("Total"));
        let orders = [
            [crafted.as_str(), "total", "Total"],
            ["total", crafted.as_str(), "Total"],
            ["Total", "total", crafted.as_str()],
        ];
        for sources in orders {
            let mut map = ColumnMap::default();
            let columns: HashSet<String> = sources
                .iter()
                .map(|s| map.column(s, 63).unwrap_or_default())
                .collect();
            assert_eq!(columns.len(), 3, "{sources:?} → {columns:?}");
        }
    }

    #[test]
    fn flattening_joins_nested_keys() {
        let mut out = vec![];
        let m = json!({"product": {"name": "x", "tags": [1, 2]}, "total": 3, "empty": {}});
        flatten("", m.as_object().unwrap(), &mut out);
        assert_eq!(
            out,
            vec![
                ("product.name".into(), json!("x")),
                ("product.tags".into(), json!([1, 2])),
                ("total".into(), json!(3))
            ]
        );
    }

    #[test]
    fn storable_times_are_the_years_1_to_9999() {
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        assert!(storable_time(t("0001-01-01T00:00:00Z")));
        assert!(storable_time(t("9999-12-30T00:00:00Z")));
        assert!(!storable_time(t("0000-12-31T23:59:59.999999Z")));
        assert!(!storable_time(t("-007972-03-01T00:00:00Z")));
    }

    #[test]
    fn inference_by_value() {
        assert_eq!(infer(&json!(1)), Some(ColumnType::Integer));
        assert_eq!(infer(&json!(1.5)), Some(ColumnType::Float));
        let past_i64 = json!(u64::MAX - 1);
        assert_eq!(infer(&past_i64), Some(ColumnType::Varchar));
        assert_eq!(
            cast(&past_i64, ColumnType::Varchar),
            Ok(Cell::Text("18446744073709551614".into())),
            "held exactly"
        );
        assert_eq!(infer(&json!(true)), Some(ColumnType::Boolean));
        assert_eq!(
            infer(&json!("2026-01-01T00:00:00Z")),
            Some(ColumnType::Timestamp)
        );
        assert_eq!(infer(&json!("2026")), Some(ColumnType::Varchar));
        assert_eq!(infer(&json!([1])), Some(ColumnType::Varchar));
        assert_eq!(infer(&json!(null)), None);
    }

    #[test]
    fn casting_never_narrows_silently() {
        assert_eq!(cast(&json!(3), ColumnType::Float), Ok(Cell::Float(3.0)));
        assert_eq!(cast(&json!(3.0), ColumnType::Integer), Ok(Cell::Int(3)));
        assert!(
            cast(&json!(3.5), ColumnType::Integer)
                .unwrap_err()
                .contains("a float can't be cast to integer")
        );
        assert!(cast(&json!("abc"), ColumnType::Integer).is_err());
        assert!(cast(&json!("abc"), ColumnType::Timestamp).is_err());
        assert_eq!(
            cast(&json!({"a": 1}), ColumnType::Varchar),
            Ok(Cell::Text("{\"a\":1}".into()))
        );
        assert_eq!(
            cast(&json!(5), ColumnType::Varchar),
            Ok(Cell::Text("5".into()))
        );
        assert!(cast(&json!("yes"), ColumnType::Boolean).is_err());
    }

    /// A typed timestamp behaves exactly as its RFC 3339 string: same type, same cast (or the
    /// same refusal) into every column type, same size.
    #[test]
    fn a_typed_timestamp_types_and_casts_as_its_string() {
        let t: Timestamp = "2026-03-01T12:34:56.789123Z".parse().unwrap();
        let as_string = Value::String(t.to_string());
        assert_eq!(Field::Time(t).infer(), infer(&as_string));
        assert_eq!(Field::Time(t).json_len(), as_string.to_string().len());
        for ty in [
            ColumnType::Timestamp,
            ColumnType::Varchar,
            ColumnType::Integer,
            ColumnType::Float,
            ColumnType::Boolean,
        ] {
            let typed = Field::Time(t)
                .cast(ty)
                .map_err(|(reason, f)| (reason, f.into_text()));
            let text = cast(&as_string, ty).map_err(|reason| (reason, t.to_string()));
            assert_eq!(typed, text, "{ty:?}");
        }
        assert_eq!(Field::from(None::<Timestamp>), Field::Json(Value::Null));
    }

    #[test]
    fn names_differing_in_case_get_distinct_columns() {
        let mut m = ColumnMap::with_reserved(["id", "received_at"]);
        let a = m.column("Total", 63).unwrap();
        let b = m.column("total", 63).unwrap();
        assert_eq!(a, "total");
        assert_ne!(a, b);
        assert!(b.starts_with("total_"));
        assert_eq!(m.column("Total", 63).unwrap(), a, "stable");
        assert_eq!(
            m.column("id", 63),
            None,
            "a property named like a reserved column is dropped"
        );
        assert_eq!(m.take_new().len(), 2);
    }

    /// Reads [`escape_nul`]'s output back: it is the string itself unless it spells `\u0000`.
    fn unescape_nul(escaped: &str) -> String {
        if !escaped.contains("\\u0000") {
            return escaped.to_string();
        }
        let (mut out, mut rest) = (String::new(), escaped);
        while let Some(at) = rest.find('\\') {
            out.push_str(&rest[..at]);
            if rest[at..].starts_with("\\\\") {
                out.push('\\');
                rest = &rest[at + 2..];
            } else {
                assert!(rest[at..].starts_with("\\u0000"), "{escaped}");
                out.push('\0');
                rest = &rest[at + 6..];
            }
        }
        out + rest
    }

    proptest::proptest! {
        /// No two strings escape alike (two trait names or ids would become one key): each is
        /// read back from its escape. Without a NUL or a spelled `\u0000`, a string is kept.
        #[test]
        fn escape_nul_reads_back(
            parts in proptest::collection::vec(
                proptest::sample::select(vec!["a", "\\", "\\u0000", "\0", "u0000", "é"]),
                0..8,
            )
        ) {
            let s: String = parts.concat();
            let escaped = escape_nul(&s);
            proptest::prop_assert!(!escaped.contains('\0'));
            proptest::prop_assert_eq!(unescape_nul(&escaped), s.clone());
            if !s.contains('\0') && !s.contains("\\u0000") {
                proptest::prop_assert_eq!(escaped.as_ref(), s.as_str());
            }
        }
    }

    #[test]
    fn key_text_fits_a_key_and_tells_long_strings_apart() {
        let long = "é".repeat(2000);
        let cut = key_text(&long);
        assert!(cut.len() <= MAX_KEY_TEXT, "{}", cut.len());
        assert!(cut.starts_with("éé") && cut.contains("…#sha1:"));
        assert_ne!(cut, key_text(&format!("{long}x")));
        assert_eq!(key_text("plan"), "plan");
        assert_ne!(key_text("a\0"), key_text("a\\u0000"));
        // NUL escapes lengthen a string: 1,024 NULs are cut too.
        assert!(key_text(&"\0".repeat(1024)).len() <= MAX_KEY_TEXT);
        // A short string spelling a cut key is another key (cut with its own hash).
        let spelled = key_text(&cut);
        assert_ne!(spelled, cut);
        assert!(spelled.len() <= MAX_KEY_TEXT && spelled.ends_with(&sha1_hex(&cut)));
        assert_eq!(key_text(&spelled), key_text(&spelled), "deterministic");
    }

    /// Source names PostgreSQL's key refuses are recorded by hash; one recorded raw by an
    /// earlier release (SQLite) is found again under that hash, and keeps its column.
    #[test]
    fn unkeyable_source_names_are_recorded_by_hash_and_found_again() {
        let long = "p".repeat(MAX_KEY_TEXT + 1);
        for name in ["a\0b", long.as_str(), "#sha1:crafted"] {
            let mut map = ColumnMap::default();
            let column = map.column(name, 63).unwrap();
            let new = map.take_new();
            assert_eq!(new.len(), 1);
            assert!(
                new[0].0.starts_with("#sha1:") && new[0].0.len() == 46,
                "{new:?}"
            );
            // Restored from the key, or from the raw name an earlier release wrote.
            for recorded in [new[0].0.clone(), name.to_string()] {
                let mut again = ColumnMap::default();
                again.restore(recorded, column.clone());
                assert_eq!(again.column(name, 63), Some(column.clone()));
                assert!(again.take_new().is_empty(), "no new assignment");
            }
        }
        let mut map = ColumnMap::default();
        map.column("total", 63);
        assert_eq!(map.take_new(), [("total".to_string(), "total".to_string())]);
    }

    /// Runs `f` on a thread and waits at most a minute for it: a regression here is an
    /// endless loop, which must fail the test rather than hang the suite.
    fn returns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("ColumnMap::column never returned")
    }

    /// A nested property (`a.<long>`) and a top-level one spelled with `_` (`a_<long>`) join
    /// to the same long name, and a crafted short name can take the column a suffixing would
    /// give: each still gets a column of its own (the retries hashed the same and looped).
    #[test]
    fn long_names_that_collide_after_cutting_each_get_a_column() {
        let long = "x".repeat(100);
        let (nested, flat) = (format!("a.{long}"), format!("a_{long}"));
        let (a, b) = returns(move || {
            let mut map = ColumnMap::default();
            (map.column(&nested, 63), map.column(&flat, 63))
        });
        assert!(a.is_some() && b.is_some() && a != b, "{a:?} {b:?}");
        assert!(b.unwrap().len() <= 63);

        let (lower, upper) = ("x".repeat(60), "X".repeat(60));
        let crafted = format!("{}_{}", "x".repeat(54), short_hash(&upper));
        let columns = returns(move || {
            let mut map = ColumnMap::default();
            [crafted, lower, upper]
                .iter()
                .map(|s| map.column(s, 63))
                .collect::<Vec<_>>()
        });
        let distinct: HashSet<_> = columns.iter().flatten().collect();
        assert_eq!(distinct.len(), 3, "{columns:?}");
    }

    /// An integer a float column cannot hold exactly (past 2^53) goes to discards; one it can
    /// hold is cast.
    #[test]
    fn an_integer_is_never_rounded_into_a_float_column() {
        for sent in [
            json!(9_007_199_254_740_993_i64),
            json!(i64::MAX),
            json!(u64::MAX),
        ] {
            assert!(cast(&sent, ColumnType::Float).is_err(), "{sent}");
        }
        for (sent, held) in [
            (json!(9_007_199_254_740_992_i64), 9_007_199_254_740_992.0),
            (json!(-3), -3.0),
            (json!(1.5e300), 1.5e300),
        ] {
            assert_eq!(cast(&sent, ColumnType::Float), Ok(Cell::Float(held)));
        }
    }
}
