//! Which identifiers an event carries (Segment's default external ids plus `context.externalIds`).

use serde_json::{Map, Value};

use super::{Identifier, Rules};
use crate::event::{Event, EventType};

/// The identifiers of `event` that identity resolution uses, in this order, without duplicates
/// and without values `rules` blocks:
///
/// | type | taken from |
/// |---|---|
/// | `user_id` | `userId` |
/// | `anonymous_id` | `anonymousId`; on alias calls also `previousId` (see below) |
/// | `email` | identify `traits.email`, else `context.traits.email`, else `properties.email` |
/// | `android.id` / `ios.id` | `context.device.id` |
/// | `android.idfa` / `ios.idfa` | `context.device.advertisingId`, only when `context.device.adTrackingEnabled` is `true` |
/// | `android.push_token` / `ios.push_token` | `context.device.token` |
/// | `ga_client_id` | `context.integrations["Google Analytics"].clientId`, else `integrations["Google Analytics"].clientId` |
/// | `group_id` | `groupId` (group calls) |
/// | any (lowercased) | `context.externalIds[]` entries having all of `id`, `type`, `collection`, `encoding`, of the `users` collection |
///
/// The platform of the device ids is `context.device.type`, else `context.os.name`
/// (`android` or `ios`, any case); other platforms give no device ids. Values are strings;
/// numbers are converted to strings; empty strings and other JSON types are ignored.
///
/// An alias call's `previousId` is returned here as an `anonymous_id`;
/// [`IdentityGraph::resolve`](super::IdentityGraph::resolve) first looks it up as a `user_id`,
/// which it may also be.
pub fn extract_identifiers(event: &Event, rules: &Rules) -> Vec<Identifier> {
    let mut ids = extract_all(event);
    ids.retain(|id| !rules.is_blocked(&id.value));
    ids
}

/// Every identifier of the event, blocked values included, without duplicates, in the order of
/// [`extract_identifiers`].
pub fn extract_all(event: &Event) -> Vec<Identifier> {
    let mut out = Extracted(Vec::with_capacity(4));
    if let Some(v) = &event.user_id {
        out.push_str("user_id", v);
    }
    if let Some(v) = &event.anonymous_id {
        out.push_str("anonymous_id", v);
    }
    if event.event_type == EventType::Alias
        && let Some(v) = &event.previous_id
    {
        out.push_str("anonymous_id", v);
    }

    let email = [
        event.identity_traits(),
        event.context_traits(),
        &event.properties,
    ]
    .into_iter()
    .find_map(|m| m.get("email").and_then(id_value));
    if let Some(v) = email {
        out.push("email", v);
    }

    device_ids(&event.context, &mut out);

    let ga_client_id = [
        event
            .context
            .get("integrations")
            .and_then(|i| i.get("Google Analytics")),
        event.integrations.get("Google Analytics"),
    ]
    .into_iter()
    .flatten()
    .find_map(|ga| ga.get("clientId").and_then(id_value));
    if let Some(v) = ga_client_id {
        out.push("ga_client_id", v);
    }

    if event.event_type == EventType::Group
        && let Some(v) = &event.group_id
    {
        out.push_str("group_id", v);
    }

    if let Some(Value::Array(entries)) = event.context.get("externalIds") {
        for entry in entries {
            if let Some((id_type, value)) = external_id(entry) {
                out.push(&id_type, value);
            }
        }
    }
    out.0
}

struct Extracted(Vec<Identifier>);

impl Extracted {
    fn push_str(&mut self, id_type: &str, value: &str) {
        if !value.is_empty() && !self.contains(id_type, value) {
            self.0.push(Identifier::new(id_type, value));
        }
    }

    fn push(&mut self, id_type: &str, value: String) {
        if !value.is_empty() && !self.contains(id_type, &value) {
            self.0.push(Identifier {
                id_type: id_type.to_string(),
                value,
            });
        }
    }

    fn contains(&self, id_type: &str, value: &str) -> bool {
        self.0
            .iter()
            .any(|i| i.id_type == id_type && i.value == value)
    }
}

/// A usable identifier value: a non-empty string, or a number as its decimal string.
fn id_value(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => crate::event::number_id(n),
        _ => None,
    }
}

fn device_ids(context: &Map<String, Value>, out: &mut Extracted) {
    let Some(Value::Object(device)) = context.get("device") else {
        return;
    };
    let platform_of = |v: Option<&Value>| match v {
        Some(Value::String(s)) if s.eq_ignore_ascii_case("android") => Some("android"),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("ios") => Some("ios"),
        _ => None,
    };
    let os_name = match context.get("os") {
        Some(Value::Object(os)) => os.get("name"),
        _ => None,
    };
    let Some(platform) = platform_of(device.get("type")).or_else(|| platform_of(os_name)) else {
        return;
    };
    if let Some(v) = device.get("id").and_then(id_value) {
        out.push(&format!("{platform}.id"), v);
    }
    if device.get("adTrackingEnabled") == Some(&Value::Bool(true))
        && let Some(v) = device.get("advertisingId").and_then(id_value)
    {
        out.push(&format!("{platform}.idfa"), v);
    }
    if let Some(v) = device.get("token").and_then(id_value) {
        out.push(&format!("{platform}.push_token"), v);
    }
}

/// One `context.externalIds[]` entry: `{id, type, collection, encoding}`, all four required,
/// of the `users` collection (any case): an id of another collection (`accounts`: a company's,
/// a group's) is shared by many people, and as a person's identifier it merged them all.
fn external_id(entry: &Value) -> Option<(String, String)> {
    let Value::Object(e) = entry else {
        return None;
    };
    let value = e.get("id").and_then(id_value)?;
    let id_type = match e.get("type") {
        Some(Value::String(t)) if !t.trim().is_empty() => t.trim().to_lowercase(),
        _ => return None,
    };
    let users = matches!(e.get("collection"), Some(Value::String(c)) if c.trim().eq_ignore_ascii_case("users"));
    let encoded = e.get("encoding").is_some_and(|v| !v.is_null());
    (users && encoded).then_some((id_type, value))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::event::{ParseOptions, Timestamp};

    fn event(v: Value) -> Event {
        let opts = ParseOptions::new(Timestamp::UNIX_EPOCH, "s");
        Event::from_json(&v, None, &opts).expect("valid test event")
    }

    fn pairs(ids: &[Identifier]) -> Vec<(&str, &str)> {
        ids.iter()
            .map(|i| (i.id_type.as_str(), i.value.as_str()))
            .collect()
    }

    #[test]
    fn user_anonymous_and_email() {
        let e = event(
            json!({"type": "identify", "userId": "u1", "anonymousId": "a1",
            "traits": {"email": "jane@example.com"}, "context": {"traits": {"email": "other@x"}}}),
        );
        assert_eq!(
            pairs(&extract_identifiers(&e, &Rules::default())),
            [
                ("user_id", "u1"),
                ("anonymous_id", "a1"),
                ("email", "jane@example.com")
            ]
        );
        let e = event(json!({"type": "track", "event": "E", "anonymousId": "a1",
            "context": {"traits": {"email": "ctx@x"}}, "properties": {"email": "prop@x"}}));
        assert_eq!(
            pairs(&extract_identifiers(&e, &Rules::default())),
            [("anonymous_id", "a1"), ("email", "ctx@x")]
        );
        let e = event(json!({"type": "track", "event": "E", "anonymousId": "a1",
            "properties": {"email": "prop@x"}}));
        assert_eq!(
            pairs(&extract_identifiers(&e, &Rules::default())),
            [("anonymous_id", "a1"), ("email", "prop@x")]
        );
    }

    #[test]
    fn device_ids_by_platform() {
        let e = event(json!({"type": "screen", "anonymousId": "a1", "context": {
            "device": {"id": "d1", "type": "android", "advertisingId": "ad1",
                       "adTrackingEnabled": true, "token": "tok"}}}));
        assert_eq!(
            pairs(&extract_identifiers(&e, &Rules::default())),
            [
                ("anonymous_id", "a1"),
                ("android.id", "d1"),
                ("android.idfa", "ad1"),
                ("android.push_token", "tok")
            ]
        );
        // iOS by os.name; the advertising id needs adTrackingEnabled == true.
        let e = event(json!({"type": "screen", "anonymousId": "a1", "context": {
            "os": {"name": "iOS"},
            "device": {"id": "d2", "advertisingId": "ad2", "adTrackingEnabled": "true"}}}));
        assert_eq!(
            pairs(&extract_identifiers(&e, &Rules::default())),
            [("anonymous_id", "a1"), ("ios.id", "d2")]
        );
        let e = event(json!({"type": "screen", "anonymousId": "a1",
            "context": {"device": {"id": "d3", "type": "windows"}}}));
        assert_eq!(
            pairs(&extract_identifiers(&e, &Rules::default())),
            [("anonymous_id", "a1")]
        );
    }

    #[test]
    fn ga_client_id_and_group_id() {
        let e = event(json!({"type": "group", "userId": "u1", "groupId": 42,
            "context": {"integrations": {"Google Analytics": {"clientId": "GA1.2.3"}}}}));
        assert_eq!(
            pairs(&extract_identifiers(&e, &Rules::default())),
            [
                ("user_id", "u1"),
                ("ga_client_id", "GA1.2.3"),
                ("group_id", "42")
            ]
        );
        let e = event(json!({"type": "page", "userId": "u1", "groupId": "g",
            "integrations": {"Google Analytics": {"clientId": 77}}}));
        assert_eq!(
            pairs(&extract_identifiers(&e, &Rules::default())),
            [("user_id", "u1"), ("ga_client_id", "77")]
        );
    }

    #[test]
    fn external_ids_need_all_four_keys_and_the_users_collection() {
        let e = event(
            json!({"type": "track", "event": "E", "userId": "u1", "context": {"externalIds": [
                {"id": "p1", "type": "Phone", "collection": "users", "encoding": "none"},
                {"id": 99, "type": "crm_id", "collection": "users", "encoding": "none"},
                {"id": "x", "type": "crm_id", "collection": "users"},
                {"id": "acme", "type": "account_id", "collection": "accounts", "encoding": "none"},
                {"id": "y", "type": "crm_id", "collection": null, "encoding": "none"},
                {"id": "p2", "type": "phone", "collection": "Users", "encoding": "none"},
                {"id": "", "type": "crm_id", "collection": "users", "encoding": "none"},
                {"id": "u1", "type": "user_id", "collection": "users", "encoding": "none"},
                "not an object"
            ]}}),
        );
        assert_eq!(
            pairs(&extract_identifiers(&e, &Rules::default())),
            [
                ("user_id", "u1"),
                ("phone", "p1"),
                ("crm_id", "99"),
                ("phone", "p2")
            ]
        );
    }

    #[test]
    fn blocked_values_are_removed() {
        let e = event(
            json!({"type": "identify", "userId": "0", "anonymousId": "a1",
            "traits": {"email": "anonymous"}}),
        );
        assert_eq!(
            pairs(&extract_identifiers(&e, &Rules::default())),
            [("anonymous_id", "a1")]
        );
        let rules = Rules::from_yaml("blocked: {regex: ['^a', '^[0-]*$']}").expect("rules");
        assert_eq!(
            pairs(&extract_identifiers(&e, &rules)),
            Vec::<(&str, &str)>::new()
        );
        assert_eq!(extract_all(&e).len(), 3);
    }

    #[test]
    fn alias_previous_id_is_an_anonymous_id() {
        let e = event(json!({"type": "alias", "userId": "u1", "previousId": "a0"}));
        assert_eq!(
            pairs(&extract_identifiers(&e, &Rules::default())),
            [("user_id", "u1"), ("anonymous_id", "a0")]
        );
    }
}
