//! `Event::from_json`: validation of one Segment spec message.

use jiff::{Timestamp, civil::DateTime, tz::TimeZone};
use rand::Rng;
use serde_json::{Map, Value};

use super::{Event, EventError, EventType, ParseOptions};

/// The most traits the identity rules' `caps.max_traits` may allow an identify call (Segment's
/// limit of 300): the engine leaves out of a batch, or refuses alone, an identify carrying as
/// many ([`crate::engine::request::storable`]); the model itself takes any number.
pub const MAX_IDENTIFY_TRAITS: usize = 300;

/// A credential sometimes sent in the body (`writeKey`): read by the collector, never stored.
const WRITE_KEY: &str = "writeKey";

/// What analytics.js and the mobile SDKs add to each message for Segment's own delivery
/// (`{"bundled": […], "unbundled": […], "bundledIds": […]}`: which destinations the device
/// sent to itself): none of the customer's data, and no column of Segment's warehouse tables.
/// Not stored, as Segment does not land it: kept, it became `metadata_bundled`… columns on
/// every event table.
const SDK_METADATA: &str = "_metadata";

/// The top-level values the model reads, moved out of a message in one pass over its keys;
/// every other key (but `writeKey` and `_metadata`) goes to `Event::extra`, in the message's
/// order.
#[derive(Default)]
pub(super) struct Fields {
    pub(super) event_type: Option<Value>,
    pub(super) message_id: Option<Value>,
    pub(super) user_id: Option<Value>,
    pub(super) anonymous_id: Option<Value>,
    pub(super) timestamp: Option<Value>,
    pub(super) received_at: Option<Value>,
    pub(super) sent_at: Option<Value>,
    pub(super) original_timestamp: Option<Value>,
    pub(super) event: Option<Value>,
    pub(super) name: Option<Value>,
    pub(super) category: Option<Value>,
    pub(super) group_id: Option<Value>,
    pub(super) previous_id: Option<Value>,
    pub(super) context: Option<Value>,
    pub(super) integrations: Option<Value>,
    pub(super) traits: Option<Value>,
    pub(super) properties: Option<Value>,
    pub(super) extra: Map<String, Value>,
}

/// Where a top-level key's value goes.
pub(super) enum Slot<'a> {
    Known(&'a mut Option<Value>),
    Dropped,
    Extra,
}

impl Fields {
    pub(super) fn slot(&mut self, key: &str) -> Slot<'_> {
        Slot::Known(match key {
            "type" => &mut self.event_type,
            "messageId" => &mut self.message_id,
            "userId" => &mut self.user_id,
            "anonymousId" => &mut self.anonymous_id,
            "timestamp" => &mut self.timestamp,
            "receivedAt" => &mut self.received_at,
            "sentAt" => &mut self.sent_at,
            "originalTimestamp" => &mut self.original_timestamp,
            "event" => &mut self.event,
            "name" => &mut self.name,
            "category" => &mut self.category,
            "groupId" => &mut self.group_id,
            "previousId" => &mut self.previous_id,
            "context" => &mut self.context,
            "integrations" => &mut self.integrations,
            "traits" => &mut self.traits,
            "properties" => &mut self.properties,
            WRITE_KEY | SDK_METADATA => return Slot::Dropped,
            _ => return Slot::Extra,
        })
    }

    fn split(message: Map<String, Value>) -> Fields {
        let mut f = Fields::default();
        for (key, value) in message {
            match f.slot(&key) {
                Slot::Known(slot) => *slot = Some(value),
                Slot::Dropped => {}
                Slot::Extra => {
                    f.extra.insert(key, value);
                }
            }
        }
        f
    }
}

/// A message's key, borrowed from the text when it has no escapes.
pub(super) struct Key<'de>(pub(super) std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct KeyVisitor;
        impl<'de> serde::de::Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(s)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Reads a message object from JSON text straight into its [`Fields`], without building the
/// top-level map first (the store re-reads every event it serves this way).
impl<'de> serde::Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Fields, D::Error> {
        struct FieldsVisitor;
        impl<'de> serde::de::Visitor<'de> for FieldsVisitor {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Fields, A::Error> {
                let mut f = Fields::default();
                while let Some(Key(key)) = a.next_key()? {
                    match f.slot(&key) {
                        Slot::Known(slot) => *slot = Some(a.next_value()?),
                        Slot::Dropped => {
                            a.next_value::<serde::de::IgnoredAny>()?;
                        }
                        Slot::Extra => {
                            let v = a.next_value()?;
                            f.extra.insert(key.into_owned(), v);
                        }
                    }
                }
                Ok(f)
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

/// Parses a message from its JSON text; the same result as parsing the text to a value and
/// calling [`parse`], with less work.
pub(super) fn parse_text(
    text: &str,
    default_type: Option<EventType>,
    opts: &ParseOptions,
) -> Result<Event, EventError> {
    let f: Fields = serde_json::from_str(text)
        .map_err(|e| EventError::new("message", format!("must be a JSON object: {e}")))?;
    parse_fields(f, default_type, opts)
}

pub(super) fn parse(
    v: Value,
    default_type: Option<EventType>,
    opts: &ParseOptions,
) -> Result<Event, EventError> {
    let Value::Object(obj) = v else {
        return Err(EventError::new("message", "must be a JSON object"));
    };
    parse_fields(Fields::split(obj), default_type, opts)
}

/// The event of a message's fields.
pub(super) fn parse_fields(
    f: Fields,
    default_type: Option<EventType>,
    opts: &ParseOptions,
) -> Result<Event, EventError> {
    let event_type = event_type(f.event_type.as_ref(), default_type)?;

    // A number is taken as its decimal text, as for the ids (a hand-written client's counter).
    let message_id = match optional_id(f.message_id, "messageId")? {
        Some(id) => id,
        None => random_uuid(),
    };
    let user_id = optional_id(f.user_id, "userId")?;
    let anonymous_id = optional_id(f.anonymous_id, "anonymousId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(EventError::new(
            "userId",
            "userId or anonymousId is required (a non-empty string)",
        ));
    }

    let context = take_object(f.context, "context")?;
    let integrations = take_object(f.integrations, "integrations")?;
    let traits = take_object(f.traits, "traits")?;
    let properties = take_object(f.properties, "properties")?;

    let event = optional_string(f.event, "event")?;
    // A page named by a number (`404`) is named by its text.
    let name = optional_id(f.name, "name")?;
    let category = optional_id(f.category, "category")?;
    let group_id = optional_id(f.group_id, "groupId")?;
    let previous_id = optional_id(f.previous_id, "previousId")?;
    match event_type {
        EventType::Track if event.is_none() => {
            return Err(EventError::new(
                "event",
                "a track call requires the event name (a non-empty string)",
            ));
        }
        EventType::Group if group_id.is_none() => {
            return Err(EventError::new("groupId", "a group call requires groupId"));
        }
        EventType::Alias if previous_id.is_none() => {
            return Err(EventError::new(
                "previousId",
                "an alias call requires previousId",
            ));
        }
        EventType::Alias if user_id.is_none() => {
            return Err(EventError::new("userId", "an alias call requires userId"));
        }
        _ => {}
    }

    let client_timestamp = optional_time(f.timestamp.as_ref(), "timestamp")?;
    let own_original = optional_time(f.original_timestamp.as_ref(), "originalTimestamp")?;
    let original_timestamp = own_original.or(client_timestamp);
    let sent_at = optional_time(f.sent_at.as_ref(), "sentAt")?;
    let trusted_receipt = if opts.trust_received_at {
        optional_time(f.received_at.as_ref(), "receivedAt")?
    } else {
        None
    };
    let received_at = trusted_receipt.unwrap_or(opts.now);
    let timestamp = match (trusted_receipt, own_original, client_timestamp) {
        // A receiver's record (a Segment export, this store's own rows): its `timestamp` beside
        // `originalTimestamp` is the time that receiver already corrected; kept as given.
        (Some(_), Some(_), Some(corrected)) => corrected,
        (Some(receipt), ..) => corrected_timestamp(receipt, sent_at, original_timestamp),
        // Imported without its receipt (an SDK's payload, sent long ago): its `sentAt` stands
        // for the receipt (no skew known), which leaves the client's time. Counted from the
        // import's time, the correction re-dated every such event to the import. It is
        // received at the import's time, and without a time of its own dated by it (as the
        // store's row, which keeps no `timestamp` then, reads back).
        (None, ..) if opts.trust_received_at => original_timestamp.unwrap_or(opts.now),
        (None, ..) => corrected_timestamp(opts.now, sent_at, original_timestamp),
    };

    Ok(Event {
        message_id,
        event_type,
        user_id,
        anonymous_id,
        timestamp,
        received_at,
        sent_at,
        original_timestamp,
        event,
        name,
        category,
        group_id,
        previous_id,
        context,
        integrations,
        traits,
        properties,
        extra: f.extra,
        source_id: opts.source_id.clone(),
    })
}

/// Segment's clock-skew correction: the client's clock is off by `sentAt − originalTimestamp`
/// relative to the moment the server received the message. Without both client times the
/// client's timestamp (or, lacking that, `receivedAt`) is used as is; a correction that would
/// leave the representable range falls back to the client's timestamp.
fn corrected_timestamp(
    received_at: Timestamp,
    sent_at: Option<Timestamp>,
    original: Option<Timestamp>,
) -> Timestamp {
    match (sent_at, original) {
        (Some(sent), Some(orig)) => received_at
            .checked_sub(sent.duration_since(orig))
            .unwrap_or(orig),
        (_, Some(orig)) => orig,
        (_, None) => received_at,
    }
}

fn event_type(
    declared: Option<&Value>,
    default_type: Option<EventType>,
) -> Result<EventType, EventError> {
    let declared = match declared {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(EventType::parse(s).ok_or_else(|| {
            EventError::new(
                "type",
                "must be one of identify, track, page, screen, group, alias",
            )
        })?),
        Some(_) => return Err(EventError::new("type", "must be a string")),
    };
    match (declared, default_type) {
        (Some(d), Some(expected)) if d != expected => Err(EventError::new(
            "type",
            format!("is \"{d}\" but this endpoint takes \"{expected}\" calls"),
        )),
        (Some(t), _) | (None, Some(t)) => Ok(t),
        (None, None) => Err(EventError::new(
            "type",
            "is required (one of identify, track, page, screen, group, alias)",
        )),
    }
}

/// A string field; null and the empty string count as absent.
fn optional_string(v: Option<Value>, key: &str) -> Result<Option<String>, EventError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(EventError::new(key, "must be a string")),
    }
}

/// An id field: a string, or a number converted to its decimal string (as Segment does). A
/// number that is neither a 64-bit integer nor exact as a float (past 2^53) would be rounded
/// (`123456789012345678901234567890` read as `1.2345678901234568e29`), and two such ids
/// could become one profile: refused.
fn optional_id(v: Option<Value>, key: &str) -> Result<Option<String>, EventError> {
    match v {
        Some(Value::Number(n)) => number_id(&n).map(Some).ok_or_else(|| {
            EventError::new(
                key,
                "is a number too large to keep exactly: send it as a string",
            )
        }),
        Some(Value::Bool(_) | Value::Array(_) | Value::Object(_)) => {
            Err(EventError::new(key, "must be a string or a number"))
        }
        v => optional_string(v, key),
    }
}

/// A number used as an id, as its decimal string; `None` when it is not exact (a float past
/// 2^53, which JSON parsing rounded).
pub(crate) fn number_id(n: &serde_json::Number) -> Option<String> {
    let inexact = n.is_f64()
        && n.as_f64()
            .is_some_and(|f| f.abs() >= 9_007_199_254_740_992.0);
    (!inexact).then(|| n.to_string())
}

/// The object of a field; absent and null are the empty object.
fn take_object(v: Option<Value>, key: &str) -> Result<Map<String, Value>, EventError> {
    match v {
        // `[]` too: PHP's `json_encode` writes an empty array so (analytics-php sends a user's
        // `'integrations' => []` as it is).
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Array(a)) if a.is_empty() => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(EventError::new(key, "must be an object")),
    }
}

/// A time field; null and the empty string count as absent, as for the ids (a client that
/// fills every field it has, empty when it has nothing, must not lose the message to a 400).
fn optional_time(v: Option<&Value>, key: &str) -> Result<Option<Timestamp>, EventError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => parse_timestamp(s).map(Some).ok_or_else(|| {
            EventError::new(
                key,
                "must be an ISO-8601 date-time string (e.g. 2024-05-01T12:00:00.000Z)",
            )
        }),
        Some(_) => Err(EventError::new(key, "must be an ISO-8601 date-time string")),
    }
}

/// Reads a Segment timestamp: ISO-8601 / RFC 3339 with an offset (`Z`, `+02:00`); a date-time
/// without an offset is read as UTC. `None` when `s` is not one.
pub fn parse_timestamp(s: &str) -> Option<Timestamp> {
    if let Ok(ts) = s.parse::<Timestamp>() {
        return Some(ts);
    }
    let civil = s.parse::<DateTime>().ok()?;
    civil.to_zoned(TimeZone::UTC).ok().map(|z| z.timestamp())
}

/// A random UUID (version 4, lowercase, hyphenated): what Segment's server-side libraries put
/// in `messageId` themselves (and the store's id).
pub(crate) fn random_uuid() -> String {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}
