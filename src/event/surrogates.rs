//! Lone UTF-16 surrogate escapes in JSON text (`"\ud83d"`, half of an emoji).
//!
//! JSON allows any `\uXXXX` escape (RFC 8259 §7), and `JSON.stringify` writes a lone surrogate so
//! when a JavaScript string was cut between the two halves of a character (`title.slice(0, 20)`):
//! analytics.js and analytics-node send such text. A Rust string cannot hold a lone surrogate, so
//! `serde_json` refuses the whole document; the Tracking API answered 400 "malformed JSON" for the
//! whole batch, which analytics.js does not retry. Each lone surrogate is read as U+FFFD instead,
//! as Go's `encoding/json` and `String.prototype.toWellFormed` do.

/// `text` with each `\uXXXX` escape of a lone surrogate replaced by `\ufffd` (the same six
/// bytes), or `None` when it holds none (nothing copied). Escapes of a high surrogate followed
/// by one of a low surrogate (a character outside the BMP) are kept; a `\\` escape is stepped
/// over, so that the text `\\ud83d` (a backslash, then `ud83d`) is no escape.
pub fn mend_lone_surrogates(text: &[u8]) -> Option<Vec<u8>> {
    let mut mended: Option<Vec<u8>> = None;
    let mut from = 0;
    while let Some(found) = text
        .get(from..)
        .and_then(|rest| memchr::memchr(b'\\', rest))
    {
        let at = from + found;
        from = at + 2;
        if text.get(at + 1) != Some(&b'u') {
            continue;
        }
        let lone = match hex4(text, at + 2) {
            Some(0xD800..=0xDBFF) => {
                let low = (text.get(at + 6..at + 8) == Some(b"\\u"))
                    .then(|| hex4(text, at + 8))
                    .flatten();
                if matches!(low, Some(0xDC00..=0xDFFF)) {
                    from = at + 12;
                    false
                } else {
                    true
                }
            }
            Some(0xDC00..=0xDFFF) => true,
            _ => false,
        };
        if lone {
            mended.get_or_insert_with(|| text.to_vec())[at..at + 6].copy_from_slice(b"\\ufffd");
            from = at + 6;
        }
    }
    mended
}

/// The value of the four hex digits at `at`, if there are four.
fn hex4(text: &[u8], at: usize) -> Option<u16> {
    let digits = std::str::from_utf8(text.get(at..at + 4)?).ok()?;
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mended(text: &str) -> Option<String> {
        mend_lone_surrogates(text.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn lone_surrogates_become_the_replacement_character_and_pairs_stay() {
        assert_eq!(mended(r#"{"q":"café"}"#), None);
        assert_eq!(mended(r#"{"q":"a \" \\ \/ \n \u00e9"}"#), None);
        assert_eq!(mended(r#"{"q":"\ud83d\ude00"}"#), None, "a pair");
        assert_eq!(
            mended(r#"{"q":"\uD83D\uDE00"}"#),
            None,
            "a pair, upper case"
        );
        assert_eq!(
            mended(r#"{"q":"café \ud83d"}"#).as_deref(),
            Some(r#"{"q":"café \ufffd"}"#)
        );
        assert_eq!(
            mended(r#"{"q":"\ude00 x \uD83D\u0041"}"#).as_deref(),
            Some(r#"{"q":"\ufffd x \ufffd\u0041"}"#),
            "a low one alone; a high one before no low one"
        );
        assert_eq!(
            mended(r#"{"q":"\ud83d\ud83d\ude00"}"#).as_deref(),
            Some(r#"{"q":"\ufffd\ud83d\ude00"}"#),
            "a lone high one, then a pair"
        );
        assert_eq!(mended(r#"{"q":"\\ud83d"}"#), None, "an escaped backslash");
        assert_eq!(
            mended(r#"{"q":"\\\ud83d"}"#).as_deref(),
            Some(r#"{"q":"\\\ufffd"}"#)
        );
        assert_eq!(mended("\\ud83"), None, "cut short: serde_json says so");
        assert_eq!(mended("\\"), None);
        assert_eq!(mended("\\ud83d").as_deref(), Some("\\ufffd"), "at the end");
    }

    proptest::proptest! {
        /// Any bytes (mostly escapes and hex digits): no panic, the same length, and only the
        /// hex digits of `\u` escapes changed.
        #[test]
        fn any_text_is_mended_in_place(
            text in proptest::collection::vec(
                proptest::sample::select(b"\\udDfF8309aAcCeE\"x ".to_vec()),
                0..64,
            ),
        ) {
            if let Some(out) = mend_lone_surrogates(&text) {
                proptest::prop_assert_eq!(out.len(), text.len());
                for (i, (a, b)) in text.iter().zip(&out).enumerate() {
                    if a != b {
                        proptest::prop_assert!(i >= 2 && text[..i].contains(&b'u'), "{:?}", text);
                        proptest::prop_assert!(b"fd".contains(b), "{:?}", out);
                    }
                }
            }
        }
    }

    /// Mended text always parses when the text is otherwise JSON, and reads as the lossy
    /// decoding of its UTF-16 string would.
    #[test]
    fn mended_text_parses_as_the_lossy_utf16_decoding() {
        for units in [
            vec![0xD83Du16],
            vec![0x61, 0xDE00, 0x62],
            vec![0xD83D, 0xDE00],
            vec![0xDBFF, 0xDBFF, 0xDFFF],
        ] {
            let escaped: String = units.iter().map(|u| format!("\\u{u:04x}")).collect();
            let text = format!("[\"{escaped}\"]");
            let bytes = mend_lone_surrogates(text.as_bytes()).unwrap_or(text.clone().into_bytes());
            let v: Vec<String> = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v[0], String::from_utf16_lossy(&units), "{text}");
        }
    }
}
