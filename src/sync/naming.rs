//! Segment's warehouse naming: event and property names become snake_case identifiers.

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

/// The warehouse table of a Track event name (`Order Completed` → `order_completed`); names with
/// no letter or digit map to `_` so no event is ever dropped for its name.
pub fn table_name(event: &str) -> String {
    let s = snake_case(event);
    match s.chars().next() {
        None => "_".into(),
        Some(c) if c.is_numeric() => format!("_{s}"),
        Some(_) => s,
    }
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
    fn tables_never_start_with_a_digit_or_come_out_empty() {
        assert_eq!(table_name("3D Viewed"), "_3_d_viewed");
        assert_eq!(table_name("!!!"), "_");
        assert_eq!(table_name("Order Completed"), "order_completed");
    }
}
