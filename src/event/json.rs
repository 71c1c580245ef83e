//! `Event::to_json`: the canonical Segment JSON of an event.

use serde_json::{Map, Value};

use super::Event;

pub(super) fn to_json(e: &Event) -> Value {
    let mut m = Map::new();
    m.insert("type".into(), e.event_type.as_str().into());
    m.insert("messageId".into(), e.message_id.clone().into());
    put_str(&mut m, "userId", &e.user_id);
    put_str(&mut m, "anonymousId", &e.anonymous_id);
    // Without a client timestamp the event's time is its receive time; writing it as
    // `timestamp` would turn it into a client timestamp when the JSON is read back.
    if e.original_timestamp.is_some() {
        m.insert("timestamp".into(), e.timestamp.to_string().into());
    }
    m.insert("receivedAt".into(), e.received_at.to_string().into());
    if let Some(t) = e.sent_at {
        m.insert("sentAt".into(), t.to_string().into());
    }
    if let Some(t) = e.original_timestamp {
        m.insert("originalTimestamp".into(), t.to_string().into());
    }
    put_str(&mut m, "event", &e.event);
    put_str(&mut m, "name", &e.name);
    put_str(&mut m, "category", &e.category);
    put_str(&mut m, "groupId", &e.group_id);
    put_str(&mut m, "previousId", &e.previous_id);
    put_map(&mut m, "context", &e.context);
    put_map(&mut m, "integrations", &e.integrations);
    put_map(&mut m, "traits", &e.traits);
    put_map(&mut m, "properties", &e.properties);
    for (k, v) in &e.extra {
        // `extra` never holds a spec key when it came from the parser; a hand-built event that
        // has one must not overwrite the typed field.
        if !m.contains_key(k) {
            m.insert(k.clone(), v.clone());
        }
    }
    Value::Object(m)
}

fn put_str(m: &mut Map<String, Value>, key: &str, v: &Option<String>) {
    if let Some(s) = v {
        m.insert(key.into(), s.clone().into());
    }
}

fn put_map(m: &mut Map<String, Value>, key: &str, v: &Map<String, Value>) {
    if !v.is_empty() {
        m.insert(key.into(), Value::Object(v.clone()));
    }
}

/// The same document as [`to_json`], written straight to text without building a `Value`
/// (the store writes one per event, so this is on the ingest path).
pub(super) fn to_json_string(e: &Event) -> String {
    serde_json::to_string(&Canonical(e)).unwrap_or_else(|_| to_json(e).to_string())
}

struct Canonical<'a>(&'a Event);

impl serde::Serialize for Canonical<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let e = self.0;
        // The keys written, so an `extra` key never repeats one (as in `to_json`).
        let mut written: Vec<&str> = Vec::with_capacity(16);
        let mut m = s.serialize_map(None)?;
        let mut text = |m: &mut S::SerializeMap, key: &'static str, value: &str| {
            written.push(key);
            m.serialize_entry(key, value)
        };
        text(&mut m, "type", e.event_type.as_str())?;
        text(&mut m, "messageId", &e.message_id)?;
        if let Some(v) = &e.user_id {
            text(&mut m, "userId", v)?;
        }
        if let Some(v) = &e.anonymous_id {
            text(&mut m, "anonymousId", v)?;
        }
        if e.original_timestamp.is_some() {
            text(&mut m, "timestamp", &e.timestamp.to_string())?;
        }
        text(&mut m, "receivedAt", &e.received_at.to_string())?;
        if let Some(t) = e.sent_at {
            text(&mut m, "sentAt", &t.to_string())?;
        }
        if let Some(t) = e.original_timestamp {
            text(&mut m, "originalTimestamp", &t.to_string())?;
        }
        for (key, v) in [
            ("event", &e.event),
            ("name", &e.name),
            ("category", &e.category),
            ("groupId", &e.group_id),
            ("previousId", &e.previous_id),
        ] {
            if let Some(v) = v {
                text(&mut m, key, v)?;
            }
        }
        for (key, v) in [
            ("context", &e.context),
            ("integrations", &e.integrations),
            ("traits", &e.traits),
            ("properties", &e.properties),
        ] {
            if !v.is_empty() {
                written.push(key);
                m.serialize_entry(key, v)?;
            }
        }
        for (k, v) in &e.extra {
            if !written.contains(&k.as_str()) {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}
