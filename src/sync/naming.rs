//! Segment's warehouse naming: event and property names become snake_case identifiers, made
//! safe for the warehouse (reserved words, leading digits, length limits) deterministically.

use sha1::{Digest, Sha1};

/// Words no table or column may be named (the union of the warehouses' reserved keywords that
/// matter for plain identifiers); such names get a `_` prefix.
const RESERVED: &[&str] = &[
    "all",
    "alter",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "between",
    "binary",
    "both",
    "by",
    "case",
    "cast",
    "check",
    "collate",
    "column",
    "constraint",
    "create",
    "cross",
    "current_date",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "delete",
    "desc",
    "distinct",
    "do",
    "drop",
    "else",
    "end",
    "except",
    "exists",
    "false",
    "fetch",
    "for",
    "foreign",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "insert",
    "intersect",
    "interval",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "qualify",
    "references",
    "returning",
    "right",
    "rows",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "update",
    "user",
    "using",
    "values",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// Converts a name to snake_case the way Segment names warehouse tables and columns:
/// `Order Completed` → `order_completed`, `productId` → `product_id`, `$browser` → `browser`,
/// `HTTPStatus` → `http_status`. Letters and digits are kept (Unicode letters lowercased),
/// everything else separates words.
pub fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    let mut pending_sep = false;
    for (i, &c) in chars.iter().enumerate() {
        if !c.is_alphanumeric() {
            pending_sep = !out.is_empty();
            continue;
        }
        if c.is_uppercase() && i > 0 && !out.is_empty() {
            let prev = chars[i - 1];
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            // a lower→Upper boundary (productId) or the last capital of an acronym (HTTPStatus)
            if prev.is_lowercase() || prev.is_numeric() || (prev.is_uppercase() && next_lower) {
                pending_sep = true;
            }
        }
        if pending_sep {
            out.push('_');
            pending_sep = false;
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// Eight hex digits of the SHA-1 of `s`: the deterministic disambiguator of long or colliding names.
pub fn short_hash(s: &str) -> String {
    let mut hex = sha1_hex(s);
    hex.truncate(8);
    hex
}

/// The SHA-1 of `s`, in 40 hex digits.
pub fn sha1_hex(s: &str) -> String {
    Sha1::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The largest index of `s` at most `i` (and at most its length) that starts a character: where
/// a text cut to `i` bytes ends.
pub fn floor_char_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
pub fn truncate_at_char(s: &mut String, max: usize) {
    let at = floor_char_boundary(s, max);
    s.truncate(at);
}

/// Truncates `name` to `max` bytes (on a character boundary), replacing the tail with `_` and a
/// hash of `source` so two long names never truncate to the same identifier.
pub fn fit(name: &str, source: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    let end = floor_char_boundary(name, max.saturating_sub(9));
    format!(
        "{}_{}",
        name[..end].trim_end_matches('_'),
        short_hash(source)
    )
}

/// A safe identifier for `source` (an event name, or a property path joined with `_`):
/// snake_case, `_` prefix for reserved words and leading digits, `_` for names with no letter or
/// digit, at most `max` bytes.
pub fn identifier(source: &str, max: usize) -> String {
    let s = snake_case(source);
    let s = match s.chars().next() {
        None => "_".to_string(),
        Some(c) if c.is_numeric() => format!("_{s}"),
        Some(_) if RESERVED.contains(&s.as_str()) => format!("_{s}"),
        Some(_) => s,
    };
    fit(&s, source, max)
}

/// The warehouse table of a Track event name (`Order Completed` → `order_completed`; `Pages`
/// → `_pages`, not to shadow the `pages` table), before the warehouse's length limit is applied:
/// the name the engine's feed API and `export` use for it.
pub fn table_name(event: &str) -> String {
    super::events::track_table(event, usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_examples() {
        assert_eq!(snake_case("Order Completed"), "order_completed");
        assert_eq!(snake_case("productId"), "product_id");
        assert_eq!(snake_case("HTTPStatus"), "http_status");
        assert_eq!(snake_case("$browser"), "browser");
        assert_eq!(snake_case("already_snake"), "already_snake");
        assert_eq!(snake_case("  Signed   Up!! "), "signed_up");
        assert_eq!(snake_case("Größe Geändert"), "größe_geändert");
    }

    #[test]
    fn identifiers_are_safe() {
        assert_eq!(table_name("3D Viewed"), "_3_d_viewed");
        assert_eq!(table_name("!!!"), "_");
        assert_eq!(table_name("Select"), "_select");
        assert_eq!(table_name("user"), "_user");
        assert_eq!(
            identifier("'; DROP TABLE users; --", 63),
            "drop_table_users"
        );
        assert_eq!(identifier("back\\slash\"quote", 63), "back_slash_quote");
    }

    #[test]
    fn long_names_are_truncated_deterministically_and_distinctly() {
        let a = "a".repeat(10_000);
        let b = format!("{}b", "a".repeat(9_999));
        let (ia, ib) = (identifier(&a, 63), identifier(&b, 63));
        assert!(ia.len() <= 63 && ib.len() <= 63);
        assert_ne!(ia, ib);
        assert_eq!(ia, identifier(&a, 63), "deterministic");
        let unicode = "é".repeat(100);
        let iu = identifier(&unicode, 63);
        assert!(iu.len() <= 63, "{iu}");
    }
}
