//! `Event::from_json`: validation of one Segment spec message.

use jiff::{Timestamp, civil::DateTime, tz::TimeZone};
use rand::Rng;
use serde_json::{Map, Value};

use super::{Event, EventError, EventType, ParseOptions};

/// An identify call must carry fewer traits than this (Segment's limit).
pub const MAX_IDENTIFY_TRAITS: usize = 300;

/// Top-level keys the model reads; everything else goes to `Event::extra`.
const KNOWN_KEYS: [&str; 17] = [
    "type",
    "messageId",
    "userId",
    "anonymousId",
    "timestamp",
    "receivedAt",
    "sentAt",
    "originalTimestamp",
    "event",
    "name",
    "category",
    "groupId",
    "previousId",
    "context",
    "integrations",
    "traits",
    "properties",
];

/// A credential sometimes sent in the body (`writeKey`): read by the collector, never stored.
const WRITE_KEY: &str = "writeKey";

pub(super) fn parse(
    v: Value,
    default_type: Option<EventType>,
    opts: &ParseOptions,
) -> Result<Event, EventError> {
    let Value::Object(mut obj) = v else {
        return Err(EventError::new("message", "must be a JSON object"));
    };
    let obj = &mut obj;
    let event_type = event_type(obj, default_type)?;

    let message_id = match optional_string(obj, "messageId")? {
        Some(id) => id,
        None => generate_message_id(),
    };
    let user_id = optional_id(obj, "userId")?;
    let anonymous_id = optional_id(obj, "anonymousId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(EventError::new(
            "userId",
            "userId or anonymousId is required (a non-empty string)",
        ));
    }

    let context = take_object(obj, "context")?;
    let integrations = take_object(obj, "integrations")?;
    let traits = take_object(obj, "traits")?;
    let properties = take_object(obj, "properties")?;

    let event = optional_string(obj, "event")?;
    let name = optional_string(obj, "name")?;
    let category = optional_string(obj, "category")?;
    let group_id = optional_id(obj, "groupId")?;
    let previous_id = optional_id(obj, "previousId")?;
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
        EventType::Identify if traits.len() >= MAX_IDENTIFY_TRAITS => {
            return Err(EventError::new(
                "traits",
                format!(
                    "an identify call must carry fewer than {MAX_IDENTIFY_TRAITS} traits (the 300 limit), got {}",
                    traits.len()
                ),
            ));
        }
        _ => {}
    }

    let client_timestamp = optional_time(obj, "timestamp")?;
    let original_timestamp = optional_time(obj, "originalTimestamp")?.or(client_timestamp);
    let sent_at = optional_time(obj, "sentAt")?;
    let received_at = if opts.trust_received_at {
        optional_time(obj, "receivedAt")?.unwrap_or(opts.now)
    } else {
        opts.now
    };
    let timestamp = corrected_timestamp(received_at, sent_at, original_timestamp);

    // The known keys stay in `obj` (the objects taken out as nulls); the rest is `extra`.
    let extra = std::mem::take(obj)
        .into_iter()
        .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()) && k.as_str() != WRITE_KEY)
        .collect();

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
        extra,
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
    obj: &Map<String, Value>,
    default_type: Option<EventType>,
) -> Result<EventType, EventError> {
    let declared = match obj.get("type") {
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
fn optional_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, EventError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(EventError::new(key, "must be a string")),
    }
}

/// An id field: a string, or a number converted to its decimal string (as Segment does).
fn optional_id(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, EventError> {
    match obj.get(key) {
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(_) | Value::Array(_) | Value::Object(_)) => {
            Err(EventError::new(key, "must be a string or a number"))
        }
        _ => optional_string(obj, key),
    }
}

/// Moves the object at `key` out of `obj` (leaving the key in place, so the order of the other
/// keys is kept).
fn take_object(obj: &mut Map<String, Value>, key: &str) -> Result<Map<String, Value>, EventError> {
    match obj.get_mut(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(std::mem::take(m)),
        Some(_) => Err(EventError::new(key, "must be an object")),
    }
}

fn optional_time(obj: &Map<String, Value>, key: &str) -> Result<Option<Timestamp>, EventError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
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
/// in `messageId` themselves.
fn generate_message_id() -> String {
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
