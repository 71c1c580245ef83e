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
