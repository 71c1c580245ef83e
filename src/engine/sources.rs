//! Event sources and their write keys, from a YAML file (in a cluster, a mounted Secret).
//!
//! ```yaml
//! sources:
//!   - id: src_web
//!     name: Website
//!     slug: website
//!     writeKey: wk_live_abc123
//!     fillContextIp: true
//! ```

use std::collections::HashMap;

use serde::Deserialize;

use crate::store::SourceInfo;

/// One source as configured (its `Debug` leaves the write key out).
#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceConfig {
    /// Stable id, recorded as each event's `event_source_id`.
    #[serde(deserialize_with = "text_or_null")]
    pub id: String,
    /// Display name.
    pub name: String,
    /// URL-safe slug.
    pub slug: String,
    /// The write key clients authenticate with.
    #[serde(deserialize_with = "text_or_null")]
    pub write_key: String,
    /// Fill in `context.ip`, on messages that have none, with the address of the client that
    /// sent them (`X-Forwarded-For`'s leftmost entry, else the connection's; nothing when that
    /// entry is no address, and never on `/v1/import`), as Segment does for its client-side
    /// sources (analytics.js, the mobile SDKs). Off by default: a server-side SDK's address is
    /// its server's, not the user's.
    #[serde(default)]
    pub fill_context_ip: bool,
}

/// A string, YAML's null (`null`, `~`) read as empty (and refused as such): read as a
/// `String`, it was the text `null` or `~` — for a write key, one anyone could guess.
fn text_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("slug", &self.slug)
            .field("write_key", &"(hidden)")
            .field("fill_context_ip", &self.fill_context_ip)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcesFile {
    sources: Vec<SourceConfig>,
}

/// Why a sources file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    /// Not valid YAML of the expected shape.
    #[error("sources file: {0}")]
    Parse(String),
    /// Two sources share a write key or an id.
    #[error("sources file: {what} {value:?} is used by more than one source")]
    Duplicate {
        /// `id` or `writeKey`.
        what: &'static str,
        /// The repeated value (ids only; keys are not printed).
        value: String,
    },
    /// An empty (or null) id or write key.
    #[error("sources file: source #{0} has an empty or null id or writeKey")]
    Empty(usize),
    /// No source at all: every request would be refused 401.
    #[error("sources file: no source is configured: every request would be refused (401)")]
    NoSources,
    /// A write key still the placeholder of `deploy/`, which anyone can read.
    #[error(
        "sources file: the writeKey of source {0:?} is still a {PLACEHOLDER} placeholder: \
         replace it with a secret value (deploy/base/secrets/sources.yaml)"
    )]
    Placeholder(String),
}

/// How the example secrets of `deploy/` start: published values, refused by the engine (a
/// write key or feed token anyone could read is no secret).
pub const PLACEHOLDER: &str = "CHANGE-ME";

/// `message` (a YAML/serde error about the sources file) with every quoted or backquoted text
/// that is not one of the file's field names replaced by `…`: serde echoes the offending value
/// or key (`invalid type: string "…"`, `unknown field `…``), and in this file that may be a write
/// key (`{writeKey:wk_…}` without the space reads as a key), or a whole other secret when
/// `--sources` names the wrong file (the feed token, the store URL, a private key).
fn redact(message: &str) -> String {
    const KNOWN: [&str; 6] = ["sources", "id", "name", "slug", "writeKey", "fillContextIp"];
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(['"', '`']) {
        let quote = rest[start..].chars().next().unwrap_or('"');
        out.push_str(&rest[..=start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find(quote) else {
            out.push('…');
            return out;
        };
        let inner = &after[..end];
        out.push_str(if KNOWN.contains(&inner) { inner } else { "…" });
        out.push(quote);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The configured sources, looked up by write key (its `Debug` lists the sources, no key).
#[derive(Clone, Default)]
pub struct Sources {
    by_key: HashMap<String, SourceConfig>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_key.values()).finish()
    }
}

impl Sources {
    /// Parses a sources file.
    pub fn from_yaml(text: &str) -> Result<Sources, SourcesError> {
        let file: SourcesFile =
            yaml_serde::from_str(text).map_err(|e| SourcesError::Parse(redact(&e.to_string())))?;
        let mut by_key = HashMap::new();
        let mut ids = std::collections::HashSet::new();
        for (i, s) in file.sources.into_iter().enumerate() {
            if s.id.is_empty() || s.write_key.is_empty() {
                return Err(SourcesError::Empty(i));
            }
            if s.write_key.starts_with(PLACEHOLDER) {
                return Err(SourcesError::Placeholder(s.id));
            }
            if !ids.insert(s.id.clone()) {
                return Err(SourcesError::Duplicate {
                    what: "id",
                    value: s.id,
                });
            }
            if by_key.contains_key(&s.write_key) {
                return Err(SourcesError::Duplicate {
                    what: "writeKey",
                    value: format!("of source {}", s.id),
                });
            }
            by_key.insert(s.write_key.clone(), s);
        }
        if by_key.is_empty() {
            return Err(SourcesError::NoSources);
        }
        Ok(Sources { by_key })
    }

    /// How many sources there are.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when there is no source (a file is refused before that).
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The source a write key belongs to.
    pub fn by_write_key(&self, key: &str) -> Option<&SourceConfig> {
        self.by_key.get(key)
    }

    /// Every source, for the store's `sources` table.
    pub fn infos(&self) -> Vec<SourceInfo> {
        let mut v: Vec<SourceInfo> = self
            .by_key
            .values()
            .map(|s| SourceInfo {
                id: s.id.clone(),
                name: s.name.clone(),
                slug: s.slug.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filling_in_context_ip_is_off_unless_asked() {
        let s = Sources::from_yaml(
            "sources:\n  - {id: s1, name: Web, slug: web, writeKey: k1, fillContextIp: true}\n  \
             - {id: s2, name: Server, slug: server, writeKey: k2}\n",
        )
        .unwrap();
        assert_eq!(s.by_write_key("k1").map(|s| s.fill_context_ip), Some(true));
        assert_eq!(s.by_write_key("k2").map(|s| s.fill_context_ip), Some(false));
        let e = Sources::from_yaml(
            "sources:\n  - {id: s1, name: W, slug: w, writeKey: k1, fillContextIp: sure}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("fillContextIp") || e.contains("bool"), "{e}");
    }

    #[test]
    fn parses_and_looks_up_by_key() {
        let s = Sources::from_yaml("sources:\n  - {id: s1, name: Web, slug: web, writeKey: k1}\n")
            .unwrap();
        assert_eq!(s.by_write_key("k1").map(|s| s.id.as_str()), Some("s1"));
        assert!(s.by_write_key("nope").is_none());
    }

    #[test]
    fn duplicate_keys_are_refused_without_printing_the_key() {
        let err = Sources::from_yaml(
            "sources:\n  - {id: s1, name: a, slug: a, writeKey: secret}\n  - {id: s2, name: b, slug: b, writeKey: secret}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("writeKey"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    /// A serde error never echoes a value or an unknown key of the file: a write key typed
    /// without the space after `writeKey:` is read as a key, and `--sources` pointed at another
    /// Secret's file (the feed token, the store URL, a private key) is one string.
    #[test]
    fn parse_errors_never_echo_the_files_text() {
        for yaml in [
            "sources:\n  - {id: s1, name: a, slug: a, writeKey:wk_SEKRIT}\n",
            "sources:\n  - {id: s1, name: a, slug: a, writeKey: wk_x}\n  - {id: s2, wk_SEKRIT}\n",
            "tok_SEKRIT\n",
            "postgres://u:SEKRIT@db/profiles\n",
            "-----BEGIN PRIVATE KEY-----\nSEKRIT\n-----END PRIVATE KEY-----\n",
            "sources:\n  - wk_SEKRIT\n",
            "wk_SEKRIT: 1\n",
            "sources: [{id: \"s1\", name: a, slug: a, writeKey: \"wk_SEKRIT}]\n",
        ] {
            let e = Sources::from_yaml(yaml).unwrap_err().to_string();
            assert!(!e.contains("SEKRIT"), "{yaml:?} -> {e}");
        }
        let e = Sources::from_yaml("sources:\n  - {id: s1, name: a, slug: a, writekey: k}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expected one of `id`, `name`, `slug`, `writeKey`"),
            "{e}"
        );
    }

    /// The engine's configuration, printed with `{:?}` (a log line, a panic), shows no write
    /// key, no feed token and no store password.
    #[test]
    fn debug_output_holds_no_secret() {
        let sources = Sources::from_yaml(
            "sources:\n  - {id: s1, name: Web, slug: web, writeKey: wk_SEKRIT}\n",
        )
        .unwrap();
        let mut config = crate::engine::EngineConfig::new(
            "postgres://app:PASSWORD_SEKRIT@db/profiles".into(),
            "127.0.0.1:0".parse().unwrap(),
            sources,
        );
        config.feed_token = Some("TOKEN_SEKRIT".into());
        let printed = format!("{config:?} {:?}", config.sources);
        assert!(!printed.contains("SEKRIT"), "{printed}");
        assert!(
            printed.contains("s1") && printed.contains("postgres://"),
            "{printed}"
        );
    }

    /// Every write key the engine accepts authenticates the way the SDKs send it, HTTP basic
    /// auth with the key as the user name and an empty password (`base64(writeKey + ":")`),
    /// a key holding `:` too (its requests were refused 401: the user name ended at the first
    /// `:`).
    #[test]
    fn every_accepted_write_key_authenticates_as_the_sdks_send_it() {
        use base64::Engine as _;
        for key in ["wk_live_abc123", "wk:SEKRIT", "SEKRIT:", ":SEKRIT"] {
            let yaml = format!("sources:\n  - {{id: s1, name: a, slug: a, writeKey: {key:?}}}\n");
            let sources = Sources::from_yaml(&yaml).unwrap();
            let header = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
            );
            let user = crate::engine::request::basic_auth_user(Some(&header));
            assert!(
                user.as_deref()
                    .and_then(|u| sources.by_write_key(u))
                    .is_some(),
                "{key:?} is accepted but never authenticates"
            );
        }
    }

    /// YAML's null (`null`, `~`, `Null`, `NULL`) is no id or write key: read as a string it
    /// became the text `null` or `~`, a write key anyone could guess (and one a client whose
    /// key is unset may well send); a file generated from JSON writes `"writeKey": null`. The
    /// quoted text is a value like any other.
    #[test]
    fn a_null_id_or_write_key_is_refused_as_empty() {
        for (id, key) in [
            ("s1", "null"),
            ("s1", "~"),
            ("s1", "Null"),
            ("s1", "NULL"),
            ("null", "k1"),
            ("~", "k1"),
        ] {
            let yaml = format!("sources:\n  - {{id: {id}, name: a, slug: a, writeKey: {key}}}\n");
            let got = Sources::from_yaml(&yaml).map(|s| format!("{s:?}"));
            assert!(
                matches!(got, Err(SourcesError::Empty(0))),
                "{yaml:?}: {got:?}"
            );
        }
        let quoted =
            Sources::from_yaml("sources:\n  - {id: s1, name: a, slug: a, writeKey: \"null\"}\n")
                .unwrap();
        assert!(quoted.by_write_key("null").is_some());
        let digits =
            Sources::from_yaml("sources:\n  - {id: 7, name: a, slug: a, writeKey: 0123}\n")
                .unwrap();
        assert_eq!(
            digits.by_write_key("0123").map(|s| s.id.as_str()),
            Some("7")
        );
    }

    #[test]
    fn the_published_placeholder_write_key_is_refused() {
        let err = Sources::from_yaml(
            "sources:\n  - {id: web, name: a, slug: a, writeKey: CHANGE-ME-write-key}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("\"web\"") && err.contains("placeholder"),
            "{err}"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(
            Sources::from_yaml("sources:\n  - {id: s1, name: a, slug: a, writeKey: k, extra: 1}\n")
                .is_err()
        );
    }

    /// A sources file without a source is refused: the engine would refuse every request.
    #[test]
    fn a_file_without_sources_is_refused() {
        let e = Sources::from_yaml("sources: []").err().unwrap().to_string();
        assert!(e.contains("no source is configured"), "{e}");
    }
}
