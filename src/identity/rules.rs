//! Identity resolution rules: blocked values, per-type limits, priority and system caps.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

/// How many identifiers of one type a profile may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// The most identifiers of the type on one profile (at least 1).
    pub max: u32,
    /// When set, only identifiers seen within this long before the event count toward `max`.
    pub window: Option<Duration>,
}

impl Limit {
    /// A limit of `max` identifiers with no time window.
    pub const fn new(max: u32) -> Limit {
        Limit { max, window: None }
    }
}

/// Identity resolution rules; [`Rules::default`] is Segment's default rule set.
///
/// Rules are read from YAML with [`Rules::from_yaml`]. Every key is optional; a key that is
/// left out keeps its default. `blocked.exact`, `blocked.regex` and `priority`, when given,
/// replace the default lists (so a default can be removed); `limits` entries are laid over the
/// default limits type by type; `caps` fields replace the matching default. The full shape,
/// with the default values:
///
/// ```yaml
/// blocked:                 # values never used as identifiers, whatever their type
///   exact: ["-1", "null", "anonymous"]
///   regex: ["^[0-]*$"]     # Rust regex syntax, matched against the whole value as written
/// limits:                  # per identifier type; `window` is <n>s|m|h|d|w
///   user_id: {max: 1}
///   email: {max: 5, window: 30d}
/// default_limit: {max: 5}  # every type not named under `limits`
/// priority: [user_id, email]   # highest first; unlisted types follow, alphabetically
/// caps:
///   max_merges_per_profile: 100
///   max_identifiers_per_profile: 1000
///   max_traits: 300
///   max_traits_per_profile: 1000
/// ```
///
/// (The `email` window above is an example; by default no limit has a window.)
#[derive(Clone, Debug)]
pub struct Rules {
    /// Values blocked exactly (case-sensitive).
    pub blocked_exact: HashSet<String>,
    /// Values blocked when a regex matches (use `^…$` to match the whole value).
    pub blocked_regex: Vec<Regex>,
    /// Per-type limits; types not listed use `default_limit`.
    pub limits: HashMap<String, Limit>,
    /// The limit of every type not in `limits`.
    pub default_limit: Limit,
    /// Identifier types from highest to lowest priority; unlisted types rank after, alphabetically.
    pub priority: Vec<String>,
    /// A profile that already absorbed this many profiles takes no more merges.
    pub max_merges_per_profile: u32,
    /// A profile holding this many identifiers takes no new ones.
    pub max_identifiers_per_profile: u32,
    /// An identify call with this many traits or more is rejected.
    pub max_traits: usize,
    /// A profile holding this many traits takes no new ones (its own still change): each
    /// identify that changes a trait writes the profile's whole snapshot, so this bounds that
    /// row and the memory a batch of identifies takes.
    pub max_traits_per_profile: usize,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            blocked_exact: ["-1", "null", "anonymous"]
                .into_iter()
                .map(String::from)
                .collect(),
            blocked_regex: vec![Regex::new("^[0-]*$").expect("the default regex is valid")],
            limits: HashMap::from([("user_id".to_string(), Limit::new(1))]),
            default_limit: Limit::new(5),
            priority: vec!["user_id".into(), "email".into()],
            max_merges_per_profile: 100,
            max_identifiers_per_profile: 1000,
            max_traits: 300,
            max_traits_per_profile: 1000,
        }
    }
}

/// A rules document that can't be used; the message names the key at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    /// Not YAML, or not the rules shape (unknown key, wrong type); the message names the key.
    #[error("identity rules: {0}")]
    Syntax(String),
    /// A key whose value is well-formed YAML but not a valid setting.
    #[error("identity rules: {key}: {reason}")]
    Invalid {
        /// The dotted path of the key, e.g. `blocked.regex[1]` or `limits.email.window`.
        key: String,
        /// Why the value is rejected.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    blocked: Option<RawBlocked>,
    #[serde(default, deserialize_with = "unique_limits")]
    limits: Option<Vec<(String, RawLimit)>>,
    default_limit: Option<RawLimit>,
    priority: Option<Vec<String>>,
    caps: Option<RawCaps>,
}

/// The `limits` map, each type once: a type given twice is an error (a map would keep the
/// last silently).
fn unique_limits<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<(String, RawLimit)>>, D::Error> {
    struct Limits;
    impl<'de> serde::de::Visitor<'de> for Limits {
        type Value = Vec<(String, RawLimit)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of identifier types to limits")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out: Vec<(String, RawLimit)> = vec![];
            while let Some((id_type, limit)) = map.next_entry::<String, RawLimit>()? {
                if out.iter().any(|(t, _)| *t == id_type) {
                    return Err(serde::de::Error::custom(format!(
                        "limits: {id_type:?} is given more than once"
                    )));
                }
                out.push((id_type, limit));
            }
            Ok(out)
        }
    }
    d.deserialize_map(Limits).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlocked {
    exact: Option<Vec<String>>,
    regex: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    max: u32,
    window: Option<String>,
}

/// The largest `caps.max_traits_per_profile`: a warehouse table holds 1,600 (PostgreSQL) to
/// 2,000 (SQLite) columns, and every snapshot of a larger profile is that much larger.
pub const MAX_TRAITS_PER_PROFILE: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaps {
    max_merges_per_profile: Option<u32>,
    max_identifiers_per_profile: Option<u32>,
    max_traits: Option<usize>,
    max_traits_per_profile: Option<usize>,
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> RulesError {
    RulesError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Rules {
    /// Reads rules from YAML (shape in the type's docs); an empty document gives the defaults.
    pub fn from_yaml(text: &str) -> Result<Rules, RulesError> {
        let raw: Option<RawRules> =
            yaml_serde::from_str(text).map_err(|e| RulesError::Syntax(e.to_string()))?;
        let mut rules = Rules::default();
        let Some(raw) = raw else {
            return Ok(rules);
        };
        if let Some(blocked) = raw.blocked {
            if let Some(exact) = blocked.exact {
                rules.blocked_exact = exact.into_iter().collect();
            }
            if let Some(patterns) = blocked.regex {
                rules.blocked_regex = patterns
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        Regex::new(p)
                            .map_err(|e| invalid(format!("blocked.regex[{i}]"), e.to_string()))
                    })
                    .collect::<Result<_, _>>()?;
            }
        }
        if let Some(limits) = raw.limits {
            for (id_type, raw_limit) in limits {
                let key = format!("limits.{id_type}");
                check_type_name(&key, &id_type)?;
                let limit = raw_limit.into_limit(&key)?;
                rules.limits.insert(id_type, limit);
            }
        }
        if let Some(raw_limit) = raw.default_limit {
            rules.default_limit = raw_limit.into_limit("default_limit")?;
        }
        if let Some(priority) = raw.priority {
            let mut seen = HashSet::new();
            for (i, id_type) in priority.iter().enumerate() {
                let key = format!("priority[{i}]");
                check_type_name(&key, id_type)?;
                if !seen.insert(id_type.as_str()) {
                    return Err(invalid(key, format!("{id_type} is listed twice")));
                }
            }
            rules.priority = priority;
        }
        if let Some(caps) = raw.caps {
            if let Some(n) = caps.max_merges_per_profile {
                rules.max_merges_per_profile = n;
            }
            if let Some(n) = caps.max_identifiers_per_profile {
                if n == 0 {
                    return Err(invalid(
                        "caps.max_identifiers_per_profile",
                        "must be at least 1",
                    ));
                }
                rules.max_identifiers_per_profile = n;
            }
            if let Some(n) = caps.max_traits {
                // Segment's limit: an identify of 300 traits or more is always left out.
                let most = crate::event::MAX_IDENTIFY_TRAITS;
                if n == 0 || n > most {
                    return Err(invalid(
                        "caps.max_traits",
                        format!(
                            "must be from 1 to {most} (identify calls of {most} traits or more are refused)"
                        ),
                    ));
                }
                rules.max_traits = n;
            }
            if let Some(n) = caps.max_traits_per_profile {
                if !(1..=MAX_TRAITS_PER_PROFILE).contains(&n) {
                    return Err(invalid(
                        "caps.max_traits_per_profile",
                        format!("must be from 1 to {MAX_TRAITS_PER_PROFILE}"),
                    ));
                }
                rules.max_traits_per_profile = n;
            }
        }
        Ok(rules)
    }

    /// Whether `value` is blocked (exact match or any regex) for every identifier type.
    pub fn is_blocked(&self, value: &str) -> bool {
        self.blocked_exact.contains(value) || self.blocked_regex.iter().any(|r| r.is_match(value))
    }

    /// The limit that applies to identifiers of `id_type`.
    pub fn limit(&self, id_type: &str) -> Limit {
        self.limits
            .get(id_type)
            .copied()
            .unwrap_or(self.default_limit)
    }

    /// Orders two identifier types by priority: `Less` means `a` ranks higher than `b`.
    pub fn priority_cmp(&self, a: &str, b: &str) -> Ordering {
        let pos = |t: &str| self.priority.iter().position(|p| p == t);
        match (pos(a), pos(b)) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => a.cmp(b),
        }
    }
}

impl RawLimit {
    fn into_limit(self, key: &str) -> Result<Limit, RulesError> {
        if self.max == 0 {
            return Err(invalid(format!("{key}.max"), "must be at least 1"));
        }
        let window = match self.window {
            None => None,
            Some(w) => Some(parse_window(&w).ok_or_else(|| {
                invalid(
                    format!("{key}.window"),
                    format!("{w:?} is not <n>s|m|h|d|w, e.g. 30d"),
                )
            })?),
        };
        Ok(Limit {
            max: self.max,
            window,
        })
    }
}

fn check_type_name(key: &str, id_type: &str) -> Result<(), RulesError> {
    if id_type.is_empty()
        || id_type
            .chars()
            .any(|c| c.is_uppercase() || c.is_whitespace())
    {
        return Err(invalid(
            key,
            format!("{id_type:?} is not an identifier type (lowercase, no spaces)"),
        ));
    }
    Ok(())
}

/// `<n>s`, `<n>m`, `<n>h`, `<n>d` or `<n>w` (a positive whole number of the unit).
fn parse_window(s: &str) -> Option<Duration> {
    let s = s.trim();
    let unit_at = s.len().checked_sub(1)?;
    let (n, unit) = s.split_at_checked(unit_at)?;
    let n: u64 = n.parse().ok().filter(|n| *n > 0)?;
    let secs_per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return None,
    };
    n.checked_mul(secs_per_unit).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in `Rules`' docs, verbatim.
    const DOC_EXAMPLE: &str = r#"
blocked:                 # values never used as identifiers, whatever their type
  exact: ["-1", "null", "anonymous"]
  regex: ["^[0-]*$"]     # Rust regex syntax, matched against the whole value as written
limits:                  # per identifier type; `window` is <n>s|m|h|d|w
  user_id: {max: 1}
  email: {max: 5, window: 30d}
default_limit: {max: 5}  # every type not named under `limits`
priority: [user_id, email]   # highest first; unlisted types follow, alphabetically
caps:
  max_merges_per_profile: 100
  max_identifiers_per_profile: 1000
  max_traits: 300
"#;

    #[test]
    fn defaults_are_segments() {
        let r = Rules::default();
        for v in ["-1", "null", "anonymous", "0", "000", "0-0-0", "-"] {
            assert!(r.is_blocked(v), "{v} must be blocked");
        }
        for v in ["1", "jane@example.com", "Null", "a0"] {
            assert!(!r.is_blocked(v), "{v} must not be blocked");
        }
        assert_eq!(r.limit("user_id"), Limit::new(1));
        assert_eq!(r.limit("email"), Limit::new(5));
        assert_eq!(r.limit("ios.idfa"), Limit::new(5));
        assert_eq!(r.max_merges_per_profile, 100);
        assert_eq!(r.max_identifiers_per_profile, 1000);
        assert_eq!(r.max_traits, 300);
    }

    #[test]
    fn priority_is_user_id_email_then_alphabetical() {
        let r = Rules::default();
        let mut types = vec!["phone", "email", "anonymous_id", "user_id", "android.id"];
        types.sort_by(|a, b| r.priority_cmp(a, b));
        assert_eq!(
            types,
            ["user_id", "email", "android.id", "anonymous_id", "phone"]
        );
    }

    #[test]
    fn parses_the_documented_example() {
        let r = Rules::from_yaml(DOC_EXAMPLE).expect("the doc example parses");
        assert_eq!(
            r.limit("email"),
            Limit {
                max: 5,
                window: Some(Duration::from_secs(30 * 86_400))
            }
        );
        assert_eq!(r.limit("user_id"), Limit::new(1));
        assert!(r.is_blocked("anonymous"));
        assert_eq!(r.priority, ["user_id", "email"]);
    }

    #[test]
    fn empty_document_is_the_defaults() {
        let r = Rules::from_yaml("").expect("empty");
        assert_eq!(r.limit("user_id"), Limit::new(1));
        assert!(r.is_blocked("null"));
        let r = Rules::from_yaml("# nothing\n").expect("comment only");
        assert_eq!(r.priority, ["user_id", "email"]);
    }

    #[test]
    fn given_keys_replace_defaults() {
        let r = Rules::from_yaml(
            "blocked: {regex: ['^test-']}\nlimits: {phone: {max: 2, window: 12h}}\npriority: [email, user_id]\ncaps: {max_traits: 50}",
        )
        .expect("valid");
        assert!(r.is_blocked("test-user"));
        assert!(
            r.is_blocked("null"),
            "exact defaults kept when only regex is given"
        );
        assert!(!r.is_blocked("000"), "default regex replaced");
        assert_eq!(r.limit("user_id"), Limit::new(1));
        assert_eq!(
            r.limit("phone").window,
            Some(Duration::from_secs(12 * 3600))
        );
        assert_eq!(r.priority_cmp("email", "user_id"), Ordering::Less);
        assert_eq!(r.max_traits, 50);
        assert_eq!(r.max_merges_per_profile, 100);
    }

    #[test]
    fn bad_regex_names_the_key() {
        let err = Rules::from_yaml("blocked: {regex: ['ok', '(unclosed']}").expect_err("bad regex");
        match err {
            RulesError::Invalid { key, .. } => assert_eq!(key, "blocked.regex[1]"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let key_of = |yaml: &str| match Rules::from_yaml(yaml).expect_err(yaml) {
            RulesError::Invalid { key, .. } => key,
            RulesError::Syntax(msg) => msg,
        };
        assert_eq!(key_of("limits: {email: {max: 0}}"), "limits.email.max");
        assert_eq!(
            key_of("limits: {email: {max: 2, window: soon}}"),
            "limits.email.window"
        );
        assert_eq!(
            key_of("default_limit: {max: 1, window: 0d}"),
            "default_limit.window"
        );
        assert_eq!(key_of("priority: [email, email]"), "priority[1]");
        assert_eq!(key_of("limits: {Email: {max: 2}}"), "limits.Email");
        assert!(key_of("limts: {}").contains("limts"));
        assert!(key_of("caps: {max_merges: 3}").contains("max_merges"));
        assert!(key_of("limits: {email: {max: many}}").contains("limits.email.max"));
    }

    #[test]
    fn window_units() {
        assert_eq!(parse_window("45s"), Some(Duration::from_secs(45)));
        assert_eq!(parse_window("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_window("2w"), Some(Duration::from_secs(1_209_600)));
        assert_eq!(parse_window("d"), None);
        assert_eq!(parse_window("3y"), None);
        assert_eq!(parse_window(""), None);
        assert_eq!(parse_window("1é"), None);
    }

    /// `caps.max_traits` beyond what the parser lets through (300) or 0 is refused (0 refused
    /// every identify; 500 was accepted and still refused an identify of 350 traits), and a
    /// type given twice under `limits` is refused (the last one won silently).
    #[test]
    fn impossible_caps_and_repeated_limits_are_refused() {
        for yaml in ["caps: {max_traits: 0}", "caps: {max_traits: 301}"] {
            let e = Rules::from_yaml(yaml).unwrap_err().to_string();
            assert!(
                e.contains("caps.max_traits") && e.contains("1 to 300"),
                "{e}"
            );
        }
        assert_eq!(
            Rules::from_yaml("caps: {max_traits: 300}")
                .unwrap()
                .max_traits,
            300
        );
        let e = Rules::from_yaml("limits: {email: {max: 1}, email: {max: 9}}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"email\" is given more than once"), "{e}");
        let ok = Rules::from_yaml("limits: {email: {max: 2}, phone: {max: 3}}").unwrap();
        assert_eq!((ok.limit("email").max, ok.limit("phone").max), (2, 3));
    }
}
