//! Turning a Tracking API request into events: size limits, gzip, authentication, batch
//! expansion and validation. Nothing here touches the store, so a refused request stores nothing.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::event::{Event, EventType, ParseOptions, Timestamp};
use crate::identity::{Identifier, Rules, extract_all};

use super::sources::{SourceConfig, Sources};

/// Segment's limit on one message.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Segment's limit on one batch request.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// How much memory the copies of a batch's top-level `sentAt`, `context` and `integrations`
/// merged into each message may take (`value_memory`). It bounds the memory one request
/// takes: without it, a 500 KB batch of empty messages sharing a large `context` would expand
/// a hundred-thousand-fold.
pub const MAX_EXPANDED_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// What a parsed JSON value holds in memory beyond its text, about: a `Value` and, in an
/// object, the entry's key and index slot.
const VALUE_OVERHEAD: usize = 32;
const ENTRY_OVERHEAD: usize = 48;
/// The longest message id, user or anonymous id, group or previous id, identifier value and
/// Track event name, in bytes: the stores index these, and PostgreSQL refuses an index entry
/// larger than about a third of a page (2,704 bytes), which would fail the commit of every
/// request grouped with the message.
pub const MAX_ID_BYTES: usize = 1024;

/// A refused request: the HTTP status and a JSON body that names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// What was wrong.
    pub message: String,
    /// The offending field, when one is to blame.
    pub field: Option<String>,
    /// The index of the offending message in a batch.
    pub index: Option<usize>,
    /// How many events the refused request carried, as far as it could be read (1 when its
    /// body is not a readable message or batch): what the refusal adds to
    /// `events_rejected_total`.
    pub events: usize,
    /// Refused by the identity rules alone ([`Unstorable::by_rules`]): counted in
    /// `events_rejected_total` as `identity_rules`, as the messages a batch leaves out are.
    pub by_rules: bool,
}

impl ApiError {
    /// An error of `status` with `message`, naming no field, counting one event.
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            field: None,
            index: None,
            events: 1,
            by_rules: false,
        }
    }

    /// The JSON body sent to the client ([`error_body`], with the field and the index).
    pub fn body(&self) -> Value {
        let Value::Object(mut m) = error_body(self.reason(), &self.message) else {
            unreachable!("error_body makes an object")
        };
        if let Some(f) = &self.field {
            m.insert("field".into(), f.clone().into());
        }
        if let Some(i) = self.index {
            m.insert("index".into(), i.into());
        }
        Value::Object(m)
    }

    /// A short label for metrics (`too_large`, `unauthorized`, `invalid`, ...).
    pub fn reason(&self) -> &'static str {
        match self.status {
            401 => "unauthorized",
            413 => "too_large",
            415 => "unsupported_encoding",
            _ if self.field.is_some() => "invalid_field",
            _ => "invalid",
        }
    }

    /// The label of `events_rejected_total`: [`ApiError::reason`], or `identity_rules` for a
    /// refusal by the identity rules.
    pub fn metric_reason(&self) -> &'static str {
        if self.by_rules {
            "identity_rules"
        } else {
            self.reason()
        }
    }
}

/// The body of a refused Tracking API request: `{"success": false, "code", "message",
/// "error"}`. `code` and `message` are what Segment's API answers and its SDKs read: the Python
/// SDK up to 2.3 builds its error from them, and without them takes a 400 for a network error
/// and sends the batch again, up to ten times. `error` (the message again) is kept for clients
/// of earlier releases.
pub fn error_body(code: &str, message: &str) -> Value {
    serde_json::json!({"success": false, "code": code, "message": message, "error": message})
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// One message of this type (`/v1/track`, `/v1/t`, ...).
    Single(EventType),
    /// A batch (`/v1/batch`, `/v1/b`, `/v1/import`).
    Batch,
}

impl Endpoint {
    /// Its label in the requests metric: the event type's name, or `batch`.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Single(t) => t.as_str(),
            Endpoint::Batch => "batch",
        }
    }
}

/// A request that passed every check.
#[derive(Debug)]
pub struct Accepted {
    /// The source that sent it.
    pub source: SourceConfig,
    /// Its events, in order.
    pub events: Vec<Event>,
    /// Every identifier of each of `events` ([`extract_all`]), in the same order: read here to
    /// check them, kept so the store does not read them again.
    pub identifiers: Vec<Vec<Identifier>>,
    /// Messages of a batch that the identity rules refuse ([`Unstorable::by_rules`]), left out
    /// of `events` in the batch's order: the batch's other messages are stored. (Refusing the
    /// whole batch would lose them: the SDKs do not send a batch again after a 400.)
    pub skipped: Vec<Skipped>,
}

/// A message of a batch left out because the identity rules refuse it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// Its index in the batch.
    pub index: usize,
    /// The field at fault.
    pub field: String,
    /// `"<field>: <reason>"`, as a refused request's message reads.
    pub message: String,
}

/// Decompresses a gzip body, refusing to inflate past `limit` bytes (a zip bomb stays small).
pub fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::with_capacity(body.len() * 4);
    // Every member: a body may be several gzip streams one after another (RFC 1952).
    let mut decoder = flate2::read::MultiGzDecoder::new(body).take(limit as u64 + 1);
    decoder
        .read_to_end(&mut out)
        .map_err(|e| ApiError::new(400, format!("body is not valid gzip: {e}")))?;
    if out.len() > limit {
        return Err(ApiError::new(
            413,
            format!("request body exceeds the {} KB batch limit", limit / 1024),
        ));
    }
    Ok(out)
}

/// The credentials of an `Authorization` header of `scheme`, which compares without case
/// (RFC 9110: `Basic`, `basic`, `BASIC` are one scheme).
pub fn auth_credentials<'h>(header: Option<&'h str>, scheme: &str) -> Option<&'h str> {
    let (presented, credentials) = header?.trim_start().split_once(' ')?;
    presented
        .eq_ignore_ascii_case(scheme)
        .then_some(credentials.trim())
}

/// The write key of HTTP basic auth (`Authorization: Basic base64(writeKey:)`). The SDKs send
/// the key with an empty password, so all before the final `:` is the key (a key may hold `:`
/// itself); with a password (`key:secret`) the user name ends at the first `:`.
pub fn basic_auth_user(header: Option<&str>) -> Option<String> {
    let encoded = auth_credentials(header, "Basic")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = match text.strip_suffix(':') {
        Some(user) => user,
        None => text.split_once(':').map(|(u, _)| u).unwrap_or(&text),
    };
    (!user.is_empty()).then(|| user.to_string())
}

/// The address of the client that sent a request: the leftmost entry of `X-Forwarded-For`
/// (`forwarded_for`, the header's first line: the original client, as the proxies in front
/// of the engine report it), else the connection's peer. An entry with a port (`1.2.3.4:5678`,
/// `[::1]:80`) gives its address; an IPv4 address a dual-stack socket reports as IPv6
/// (`::ffff:1.2.3.4`) is given as IPv4. `None` when the header is there but its leftmost entry
/// is no address (`unknown`, a proxy's obfuscated name, bytes that are not text): a proxy hid
/// the client, and the entries after it, like the peer, are proxies.
///
/// The header is taken on trust: a client can name any address there, as it can in the
/// `context.ip` it sends.
pub fn client_ip(forwarded_for: Option<&[u8]>, peer: IpAddr) -> Option<IpAddr> {
    let ip = match forwarded_for {
        // An empty header is none.
        None => Some(peer),
        Some(h) if h.trim_ascii().is_empty() => Some(peer),
        Some(h) => {
            let leftmost = h.split(|&b| b == b',').next().unwrap_or_default();
            std::str::from_utf8(leftmost)
                .ok()
                .and_then(|entry| address(entry.trim()))
        }
    };
    ip.map(|ip| ip.to_canonical())
}

/// An `X-Forwarded-For` entry's address: `1.2.3.4`, `2001:db8::1`, with a port
/// (`1.2.3.4:80`, `[2001:db8::1]:80`) or in brackets (`[2001:db8::1]`).
fn address(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<IpAddr>()
                .ok()
        })
}

/// Sets `context.ip` to `ip` on each of `events` whose context has none (absent or `null`),
/// for a source with [`SourceConfig::fill_context_ip`]: a message's own address, or its
/// batch's, is kept.
pub fn fill_context_ip(events: &mut [Event], ip: IpAddr) {
    let ip = Value::String(ip.to_string());
    for event in events {
        if event.context.get("ip").is_none_or(Value::is_null) {
            event.context.insert("ip".to_string(), ip.clone());
        }
    }
}

/// The messages of a batch object, as Segment's batch API reads it: the batch's `sentAt`
/// applies to each message that has none, and its `context` and `integrations` are merged into
/// each message's own (the message's values win; objects in both are merged key by key). Each
/// message is held to `max_message` bytes as it was sent, before the merge (the Tracking API's
/// 32 KB; `None`, as `import` reads a batch line, for no limit); the batch is refused (413)
/// before the merged copies would grow it past [`MAX_EXPANDED_BATCH_BYTES`]. Takes the
/// messages out of `obj` (no copy).
pub fn batch_messages(
    obj: &mut Map<String, Value>,
    max_message: Option<usize>,
) -> Result<Vec<Value>, ApiError> {
    let mut items = match obj.remove("batch") {
        Some(Value::Array(items)) => items,
        Some(_) => return Err(field_error(400, "batch", "must be an array", None)),
        None => return Err(field_error(400, "batch", "is required", None)),
    };
    // The batch's own fields are checked here, so that an error names them, not a message.
    let sent_at = match obj.get("sentAt") {
        None | Some(Value::Null) => None,
        Some(v @ Value::String(s)) if crate::event::parse_timestamp(s).is_some() => Some(v),
        Some(_) => {
            return Err(field_error(
                400,
                "sentAt",
                "must be an ISO-8601 date-time string (e.g. 2024-05-01T12:00:00.000Z)",
                None,
            ));
        }
    };
    let mut shared = vec![];
    for key in ["context", "integrations"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            // An empty array is an empty object, as in a message ([`Event::from_value`]).
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(Value::Object(m)) => shared.push((key, m)),
            Some(_) => return Err(field_error(400, key, "must be an object", None)),
        }
    }
    let mut added = 0usize;
    for (i, item) in items.iter_mut().enumerate() {
        if let Some(max) = max_message
            && json_len(item) > max
        {
            return Err(ApiError {
                status: 400,
                message: format!("message exceeds the {} KB limit", max / 1024),
                field: None,
                index: Some(i),
                events: 1,
                by_rules: false,
            });
        }
        let Some(m) = item.as_object_mut() else {
            continue;
        };
        // Absent or null (null is absent everywhere else too), the message takes the batch's.
        if let Some(v) = sent_at
            && m.get("sentAt").is_none_or(Value::is_null)
        {
            added = added.saturating_add(entry_len("sentAt", v));
            m.insert("sentAt".into(), v.clone());
        }
        for (key, batch) in &shared {
            // Absent, null or `[]`, the message's own is an empty object the batch's merges into.
            let own = m.entry(*key).or_insert(Value::Null);
            if own.is_null() || own.as_array().is_some_and(Vec::is_empty) {
                added = added.saturating_add(entry_len(key, own));
                *own = Value::Object(Map::new());
            }
            // A message's own value of the wrong type gets its 400 when it is read.
            if let Value::Object(own) = own {
                added = added.saturating_add(merge_into(own, batch));
            }
        }
        if added > MAX_EXPANDED_BATCH_BYTES {
            return Err(ApiError::new(
                413,
                format!(
                    "batch exceeds the {} KB limit once its context, integrations and sentAt are \
                     merged into each message: send smaller batches, or these fields in each message",
                    MAX_EXPANDED_BATCH_BYTES / 1024
                ),
            ));
        }
    }
    Ok(items)
}

/// Copies into `own` each key of `batch` it lacks, merging the objects both hold key by key
/// (`own`'s values win); returns about how much memory that took ([`entry_len`]).
fn merge_into(own: &mut Map<String, Value>, batch: &Map<String, Value>) -> usize {
    let mut added = 0usize;
    for (key, value) in batch {
        match (own.get_mut(key), value) {
            (None, _) => {
                added = added.saturating_add(entry_len(key, value));
                own.insert(key.clone(), value.clone());
            }
            (Some(Value::Object(mine)), Value::Object(theirs)) => {
                added = added.saturating_add(merge_into(mine, theirs));
            }
            (Some(_), _) => {}
        }
    }
    added
}

/// The memory an object entry `key: value` takes once parsed, about: its text and, for each
/// value and key in it, [`VALUE_OVERHEAD`] and [`ENTRY_OVERHEAD`]. Counting the text alone
/// would let a context of many tiny keys take ten times the limit.
fn entry_len(key: &str, value: &Value) -> usize {
    ENTRY_OVERHEAD
        .saturating_add(key.len())
        .saturating_add(value_memory(value))
}

/// The memory a parsed JSON value takes, about (see [`entry_len`]).
fn value_memory(value: &Value) -> usize {
    match value {
        Value::Object(m) => m.iter().fold(VALUE_OVERHEAD, |n, (k, v)| {
            n.saturating_add(entry_len(k, v))
        }),
        Value::Array(a) => a
            .iter()
            .fold(VALUE_OVERHEAD, |n, v| n.saturating_add(value_memory(v))),
        Value::String(text) => VALUE_OVERHEAD.saturating_add(text.len()),
        _ => VALUE_OVERHEAD,
    }
}

/// The length of `v` as compact JSON, counted without building the text.
fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, v).map_or(usize::MAX, |()| count.0)
}

fn field_error(status: u16, field: &str, reason: &str, index: Option<usize>) -> ApiError {
    ApiError {
        status,
        message: format!("{field}: {reason}"),
        field: Some(field.into()),
        index,
        events: 1,
        by_rules: false,
    }
}

/// The 400 of a message [`storable`] refuses.
fn unstorable_error(refusal: &Unstorable, index: Option<usize>) -> ApiError {
    ApiError {
        by_rules: refusal.by_rules,
        ..field_error(400, &refusal.field, &refusal.reason, index)
    }
}

/// The first field whose value a store could not keep, and why: a value that lands in a
/// store's text column (the message's ids and names, and every identifier resolution would
/// record) with a NUL character, which PostgreSQL's text type refuses, or an indexed one (ids,
/// identifiers, a Track event's name) longer than [`MAX_ID_BYTES`]. Such a message is refused
/// here instead of failing the whole group commit it would join.
fn unstorable_field(event: &Event, identifiers: &[&Identifier]) -> Option<(String, String)> {
    const NUL: &str =
        "contains a NUL character (U+0000), which the stores' text columns cannot hold";
    let too_long = || {
        format!(
            "is longer than {MAX_ID_BYTES} bytes, the limit for ids, identifiers and event names"
        )
    };
    let fields = [
        ("messageId", Some(&event.message_id), true),
        ("userId", event.user_id.as_ref(), true),
        ("anonymousId", event.anonymous_id.as_ref(), true),
        ("event", event.event.as_ref(), true),
        ("name", event.name.as_ref(), false),
        ("category", event.category.as_ref(), false),
        ("groupId", event.group_id.as_ref(), true),
        ("previousId", event.previous_id.as_ref(), true),
    ];
    let has_nul = |s: &str| s.contains('\0');
    for (field, value, indexed) in fields {
        let Some(value) = value else { continue };
        if has_nul(value) {
            return Some((field.to_string(), NUL.to_string()));
        }
        if indexed && value.len() > MAX_ID_BYTES {
            return Some((field.to_string(), too_long()));
        }
    }
    identifiers.iter().find_map(|id| {
        let field = || format!("identifier {}", id.id_type.replace('\0', "U+0000"));
        if has_nul(&id.value) || has_nul(&id.id_type) {
            Some((field(), NUL.to_string()))
        } else if id.value.len() > MAX_ID_BYTES || id.id_type.len() > MAX_ID_BYTES {
            Some((field(), too_long()))
        } else {
            None
        }
    })
}

/// Why [`storable`] keeps a message out: the field at fault and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unstorable {
    /// The field that keeps the message out (`traits`, `userId`, `identifier email`, …).
    pub field: String,
    /// Why, for the client.
    pub reason: String,
    /// Refused by the identity rules (every identifier blocked, too many traits for
    /// `caps.max_traits`) rather than for a value no store can hold: the message is well
    /// formed, so a batch leaves it out and stores the rest ([`Accepted::skipped`]).
    pub by_rules: bool,
}

impl Unstorable {
    fn new(field: impl Into<String>, reason: impl Into<String>, by_rules: bool) -> Unstorable {
        Unstorable {
            field: field.into(),
            reason: reason.into(),
            by_rules,
        }
    }
}

/// The identifiers of a parsed event the store can take, or the field that keeps it out and
/// why: more traits than the identity rules' `caps.max_traits` (at most Segment's 300), a
/// value the stores cannot hold (a NUL in a text column, an id past 1,024 bytes), or every
/// identifier blocked by the rules. Checked before a group commit (the engine refuses the
/// request, or leaves a message the rules refuse out of its batch; `import` skips the line): in
/// the writer the event would be dropped after the other events of its request were
/// committed, or fail the whole group.
pub fn storable(event: &Event, rules: &Rules) -> Result<Vec<Identifier>, Unstorable> {
    let identifiers = extract_all(event);
    let usable: Vec<&Identifier> = identifiers
        .iter()
        .filter(|id| !rules.is_blocked(&id.value))
        .collect();
    // Bad input first: it refuses a whole batch, whatever the rules would say of the message.
    if let Some((field, reason)) = unstorable_field(event, &usable) {
        return Err(Unstorable::new(field, reason, false));
    }
    let traits = event.identity_traits().len();
    if event.event_type == EventType::Identify && traits >= rules.max_traits {
        return Err(Unstorable::new(
            "traits",
            format!(
                "an identify call must carry fewer than {} traits (the identity rules' caps.max_traits), got {traits}",
                rules.max_traits
            ),
            true,
        ));
    }
    if usable.is_empty() {
        let field = if event.user_id.is_some() {
            "userId"
        } else {
            "anonymousId"
        };
        return Err(Unstorable::new(
            field,
            "every identifier of this message is blocked by the identity rules",
            true,
        ));
    }
    Ok(identifiers)
}

/// The 401's message for a write key no source has.
pub const UNKNOWN_WRITE_KEY: &str = "unknown write key";

/// Checks and parses one request body (already decompressed).
pub fn parse(
    endpoint: Endpoint,
    body: &[u8],
    auth_header: Option<&str>,
    sources: &Sources,
    rules: &Rules,
    now: Timestamp,
) -> Result<Accepted, ApiError> {
    let limit = match endpoint {
        Endpoint::Single(_) => MAX_MESSAGE_BYTES,
        Endpoint::Batch => MAX_BATCH_BYTES,
    };
    if body.len() > limit {
        return Err(ApiError::new(
            413,
            match endpoint {
                Endpoint::Single(_) => {
                    format!("message exceeds the {} KB limit", MAX_MESSAGE_BYTES / 1024)
                }
                Endpoint::Batch => format!(
                    "request body exceeds the {} KB batch limit",
                    MAX_BATCH_BYTES / 1024
                ),
            },
        ));
    }
    let mended = crate::event::mend_lone_surrogates(body);
    let value: Value = serde_json::from_slice(mended.as_deref().unwrap_or(body))
        .map_err(|e| ApiError::new(400, format!("malformed JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::new(
            400,
            "malformed JSON: the body must be an object",
        ));
    };
    let events = match endpoint {
        Endpoint::Single(_) => 1,
        Endpoint::Batch => obj
            .get("batch")
            .and_then(Value::as_array)
            .map_or(1, Vec::len),
    };
    accept(endpoint, obj, auth_header, sources, rules, now).map_err(|e| ApiError { events, ..e })
}

/// [`parse`] of a body that is a JSON object.
fn accept(
    endpoint: Endpoint,
    mut obj: Map<String, Value>,
    auth_header: Option<&str>,
    sources: &Sources,
    rules: &Rules,
    now: Timestamp,
) -> Result<Accepted, ApiError> {
    let key = basic_auth_user(auth_header).or_else(|| {
        obj.get("writeKey")
            .and_then(Value::as_str)
            .map(String::from)
    });
    let Some(key) = key else {
        return Err(ApiError::new(
            401,
            "missing write key: send it as the basic-auth username or as writeKey",
        ));
    };
    let Some(source) = sources.by_write_key(&key) else {
        return Err(ApiError::new(401, UNKNOWN_WRITE_KEY));
    };
    let (messages, default_type, batched) = match endpoint {
        Endpoint::Single(t) => (vec![Value::Object(obj)], Some(t), false),
        Endpoint::Batch => (
            batch_messages(&mut obj, Some(MAX_MESSAGE_BYTES))?,
            None,
            true,
        ),
    };
    if batched && messages.is_empty() {
        return Err(field_error(400, "batch", "is empty", None));
    }
    let opts = ParseOptions {
        now,
        source_id: source.id.clone(),
        trust_received_at: false,
    };
    let mut events = Vec::with_capacity(messages.len());
    let mut all_identifiers = Vec::with_capacity(messages.len());
    let mut skipped = Vec::new();
    // The first message the rules refused: the request's error when no message is left.
    let mut first_refusal = None;
    for (i, m) in messages.into_iter().enumerate() {
        let index = batched.then_some(i);
        let event = Event::from_value(m, default_type, &opts)
            .map_err(|e| field_error(400, &e.field, &e.reason, index))?;
        match storable(&event, rules) {
            Ok(identifiers) => {
                events.push(event);
                all_identifiers.push(identifiers);
            }
            Err(refusal) if refusal.by_rules && batched => {
                let error = unstorable_error(&refusal, index);
                skipped.push(Skipped {
                    index: i,
                    field: refusal.field,
                    message: error.message.clone(),
                });
                first_refusal.get_or_insert(error);
            }
            Err(refusal) => return Err(unstorable_error(&refusal, index)),
        }
    }
    if events.is_empty()
        && let Some(error) = first_refusal
    {
        // Nothing of the batch would be stored: refused, as a single message would be.
        return Err(error);
    }
    Ok(Accepted {
        source: source.clone(),
        events,
        identifiers: all_identifiers,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn sources() -> Sources {
        Sources::from_yaml("sources:\n  - {id: s, name: S, slug: s, writeKey: k}\n").unwrap()
    }

    fn auth() -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("k:")
        )
    }

    #[test]
    fn json_len_is_the_length_of_the_compact_text() {
        for v in [
            json!({}),
            json!({"a": "é\u{0}\"\\\n", "b": [1, 2.5, -3e300, null, true], "c": {"d": "日本"}}),
            json!("x".repeat(40_000)),
        ] {
            assert_eq!(json_len(&v), serde_json::to_vec(&v).unwrap().len());
        }
    }

    #[test]
    fn basic_auth_takes_the_user_name() {
        assert_eq!(basic_auth_user(Some(&auth())), Some("k".into()));
        assert_eq!(basic_auth_user(Some("Basic !!!")), None);
        // The scheme compares without case.
        let encoded = base64::engine::general_purpose::STANDARD.encode("k:");
        for scheme in ["basic", "BASIC", "bAsIc"] {
            let header = format!("{scheme} {encoded}");
            assert_eq!(basic_auth_user(Some(&header)), Some("k".into()), "{scheme}");
        }
        assert_eq!(basic_auth_user(Some("Bearer k")), None);
        assert_eq!(basic_auth_user(None), None);
    }

    #[test]
    fn the_client_s_address_is_the_first_forwarded_one_else_the_peer_s() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let peer = ip("10.1.2.3");
        for (header, expected) in [
            (None, Some("10.1.2.3")),
            (Some("203.0.113.9"), Some("203.0.113.9")),
            (Some(" 203.0.113.9 , 10.0.0.1"), Some("203.0.113.9")),
            (Some("203.0.113.9:5678"), Some("203.0.113.9")),
            (Some("[2001:db8::1]:443, 10.0.0.1"), Some("2001:db8::1")),
            (Some("[2001:db8::2]"), Some("2001:db8::2")),
            (Some("::ffff:192.0.2.1"), Some("192.0.2.1")),
            (Some(""), Some("10.1.2.3")),
            (Some("  "), Some("10.1.2.3")),
            // A proxy hid the client: what follows it, and the peer, are proxies.
            (Some("unknown, 198.51.100.4"), None),
            (Some("_hidden"), None),
            (Some(", 198.51.100.4"), None),
        ] {
            let got = client_ip(header.map(str::as_bytes), peer);
            assert_eq!(got, expected.map(ip), "{header:?}");
        }
        assert_eq!(client_ip(Some(b"\xff1.2.3.4"), peer), None, "not text");
        // Bytes that are not text after the leftmost entry are not its.
        assert_eq!(
            client_ip(Some(b"192.0.2.9, \xff"), peer),
            Some(ip("192.0.2.9"))
        );
        // A dual-stack socket reports an IPv4 peer as IPv6.
        assert_eq!(
            client_ip(None, ip("::ffff:127.0.0.1")),
            Some(ip("127.0.0.1"))
        );
    }

    #[test]
    fn the_filled_in_address_never_replaces_one_sent() {
        let body = json!({"batch": [
            {"type": "track", "userId": "u", "event": "A"},
            {"type": "track", "userId": "u", "event": "A", "context": {"ip": null}},
            {"type": "track", "userId": "u", "event": "A", "context": {"ip": "192.0.2.2"}},
            {"type": "track", "userId": "u", "event": "A", "context": {"ip": ""}},
        ]});
        let mut accepted = parse_json(&body).unwrap();
        fill_context_ip(&mut accepted.events, "2001:db8::1".parse().unwrap());
        let ips: Vec<&Value> = accepted.events.iter().map(|e| &e.context["ip"]).collect();
        assert_eq!(
            ips,
            [
                &json!("2001:db8::1"),
                &json!("2001:db8::1"),
                &json!("192.0.2.2"),
                &json!("")
            ]
        );
    }

    /// A write key holding ':' (a sources file of the previous release could hold one, and
    /// analytics.js, which sends the key in the body, authenticated with it) keeps working: the
    /// engine refused to start with it (a crash loop on upgrade, every source down), and the
    /// SDKs' basic auth, `base64(writeKey + ":")`, finds it too. A password after the user
    /// name (`curl -u key:secret`) still ends the key at the first ':'.
    #[test]
    fn a_write_key_holding_a_colon_authenticates_in_the_body_and_the_header() {
        let sources =
            Sources::from_yaml("sources:\n  - {id: s, name: S, slug: s, writeKey: \"wk:web\"}\n")
                .expect("a key holding ':' is taken");
        let header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("wk:web:")
        );
        for (auth, body) in [
            (
                None,
                json!({"writeKey": "wk:web", "userId": "u", "event": "E"}),
            ),
            (Some(header.as_str()), json!({"userId": "u", "event": "E"})),
        ] {
            let got = parse(
                Endpoint::Single(EventType::Track),
                &serde_json::to_vec(&body).unwrap(),
                auth,
                &sources,
                &Rules::default(),
                Timestamp::now(),
            );
            assert!(got.is_ok(), "{auth:?}: {:?}", got.err());
        }
        let password = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("k:secret")
        );
        assert_eq!(basic_auth_user(Some(&password)), Some("k".into()));
    }

    /// A batch request's body, parsed with the default rules.
    fn parse_bytes(body: &[u8]) -> Result<Accepted, ApiError> {
        parse(
            Endpoint::Batch,
            body,
            Some(&auth()),
            &sources(),
            &Rules::default(),
            Timestamp::now(),
        )
    }

    /// [`parse_bytes`] of a JSON body.
    fn parse_json(body: &Value) -> Result<Accepted, ApiError> {
        parse_bytes(&serde_json::to_vec(body).unwrap())
    }

    fn parse_batch(batch: Value, rules: &Rules) -> Result<Accepted, ApiError> {
        let body = serde_json::to_vec(&json!({ "batch": batch })).unwrap();
        parse(
            Endpoint::Batch,
            &body,
            Some(&auth()),
            &sources(),
            rules,
            Timestamp::now(),
        )
    }

    /// A message the identity rules refuse (an identify over `caps.max_traits`, every
    /// identifier blocked) is left out of its batch and the batch's other messages are kept:
    /// the SDKs do not send a batch again after a 400, so refusing it whole lost them. Sent
    /// alone, or with nothing else storable in its batch, it is refused with a 400 naming the
    /// field (and the index).
    #[test]
    fn messages_the_identity_rules_refuse_are_left_out_of_their_batch() {
        let rules = Rules::from_yaml("caps: {max_traits: 5}").unwrap();
        let traits: Map<String, Value> = (0..6).map(|i| (format!("t{i}"), json!(i))).collect();
        let over = json!({"type": "identify", "userId": "u1", "traits": traits});
        let blocked = json!({"type": "track", "userId": "null", "event": "B"});
        let batch = json!([
            {"type": "track", "userId": "u1", "event": "A"},
            over.clone(),
            blocked.clone(),
            {"type": "page", "anonymousId": "a1"},
        ]);
        let accepted = parse_batch(batch.clone(), &rules).expect("the batch is accepted");
        let kept: Vec<EventType> = accepted.events.iter().map(|e| e.event_type).collect();
        assert_eq!(kept, [EventType::Track, EventType::Page]);
        assert_eq!(accepted.identifiers.len(), 2);
        let skipped: Vec<(usize, &str)> = accepted
            .skipped
            .iter()
            .map(|s| (s.index, s.field.as_str()))
            .collect();
        assert_eq!(skipped, [(1, "traits"), (2, "userId")]);
        assert!(
            accepted.skipped[0].message.contains("caps.max_traits"),
            "{:?}",
            accepted.skipped
        );
        assert!(
            accepted.skipped[1].message.contains("blocked"),
            "{:?}",
            accepted.skipped
        );
        // Under the default limit (300) only the blocked message is left out…
        let accepted = parse_batch(batch, &Rules::default()).unwrap();
        assert_eq!((accepted.events.len(), accepted.skipped.len()), (3, 1));
        // …and an identify of 300 traits (Segment's limit) is left out like any other.
        let many: Map<String, Value> = (0..300).map(|i| (format!("t{i}"), json!(i))).collect();
        let accepted = parse_batch(
            json!([{"type": "identify", "userId": "u1", "traits": many}, {"type": "page", "userId": "u1"}]),
            &Rules::default(),
        )
        .expect("the batch is accepted");
        assert_eq!(accepted.events.len(), 1);
        assert_eq!(
            accepted
                .skipped
                .iter()
                .map(|s| (s.index, s.field.as_str()))
                .collect::<Vec<_>>(),
            [(0, "traits")]
        );

        // Nothing left to store: the batch is refused, naming the first message refused.
        let e = parse_batch(json!([blocked, over]), &rules)
            .err()
            .unwrap_or_else(|| panic!("a batch of refused messages accepted"));
        assert_eq!(
            (e.status, e.field.as_deref(), e.index, e.events),
            (400, Some("userId"), Some(0), 2)
        );
        // Counted as the rules' refusals, its body's code as any invalid field's.
        assert_eq!(
            (e.metric_reason(), e.body()["code"].clone()),
            ("identity_rules", json!("invalid_field"))
        );
        // Alone, at its endpoint: refused.
        let body = serde_json::to_vec(&json!({"userId": "u1", "traits": traits})).unwrap();
        let e = parse(
            Endpoint::Single(EventType::Identify),
            &body,
            Some(&auth()),
            &sources(),
            &rules,
            Timestamp::now(),
        )
        .err()
        .unwrap_or_else(|| panic!("accepted over the limit"));
        assert_eq!(
            (e.status, e.field.as_deref(), e.index, e.metric_reason()),
            (400, Some("traits"), None, "identity_rules")
        );
        // A value no store can hold still refuses the whole batch (it is bad input).
        let e = parse_batch(
            json!([{"type": "page", "userId": "ok"}, {"type": "page", "userId": "u\0"}]),
            &rules,
        )
        .err()
        .unwrap_or_else(|| panic!("a NUL accepted"));
        assert_eq!(
            (e.status, e.index, e.metric_reason()),
            (400, Some(1), "invalid_field")
        );
        // Even in a message the rules would leave out (too many traits): bad input comes first.
        let e = parse_batch(
            json!([{"type": "page", "userId": "ok"}, {"type": "identify", "userId": "u\0", "traits": traits}]),
            &rules,
        )
        .err()
        .unwrap_or_else(|| panic!("a NUL accepted"));
        assert_eq!(
            (e.status, e.field.as_deref(), e.index),
            (400, Some("userId"), Some(1))
        );
    }

    /// A batch's `context` or `integrations` given as `[]` (PHP's empty array) is none; a
    /// message's own `[]` takes the batch's.
    #[test]
    fn empty_arrays_in_a_batch_read_as_empty_objects() {
        let body = serde_json::to_vec(&json!({
            "batch": [
                {"type": "track", "userId": "u1", "event": "A", "context": [], "integrations": []},
                {"type": "track", "userId": "u1", "event": "B"},
            ],
            "context": {"app": {"name": "shop"}},
            "integrations": [],
        }))
        .unwrap();
        let accepted = parse(
            Endpoint::Batch,
            &body,
            Some(&auth()),
            &sources(),
            &Rules::default(),
            Timestamp::now(),
        )
        .expect("accepted");
        for e in &accepted.events {
            assert_eq!(e.context.get("app"), Some(&json!({"name": "shop"})));
            assert!(e.integrations.is_empty());
        }
    }

    /// Sends `message` second in a batch after a valid one, asserts the batch is refused with a
    /// 400 naming `field` at index 1, and returns the error.
    fn refused_as_second_of_a_batch(message: Value, field: &str, rules: &Rules) -> ApiError {
        let e = parse_batch(json!([{"type": "page", "userId": "ok"}, message]), rules)
            .err()
            .unwrap_or_else(|| panic!("{field}: accepted"));
        assert_eq!(
            (e.status, e.field.as_deref(), e.index),
            (400, Some(field), Some(1)),
            "{e:?}"
        );
        e
    }

    /// A NUL character in an id, a name or an identifier is refused with a 400 naming the field.
    #[test]
    fn nul_characters_in_stored_text_are_refused() {
        let rules = Rules::default();
        let cases = [
            (
                json!({"type": "track", "userId": "u\0x", "event": "A"}),
                "userId",
            ),
            (
                json!({"type": "track", "userId": "u1", "event": "A\0"}),
                "event",
            ),
            (
                json!({"type": "track", "userId": "u1", "event": "A", "messageId": "m\0"}),
                "messageId",
            ),
            (
                json!({"type": "identify", "userId": "u1", "traits": {"email": "a\0@example.com"}}),
                "identifier email",
            ),
        ];
        for (message, field) in cases {
            refused_as_second_of_a_batch(message, field, &rules);
        }
        // Elsewhere (a property) a NUL is kept: it is stored inside escaped JSON.
        let ok =
            json!([{"type": "track", "userId": "u1", "event": "A", "properties": {"p": "a\0b"}}]);
        assert!(parse_batch(ok, &rules).is_ok());
    }

    /// Ids, identifiers and Track event names the stores index are refused past their limit
    /// (PostgreSQL would fail the commit of every request grouped with the message); other
    /// names are not limited.
    #[test]
    fn indexed_values_longer_than_the_limit_are_refused() {
        let rules = Rules::default();
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let cases = [
            (
                json!({"type": "track", "userId": long, "event": "A"}),
                "userId",
            ),
            (
                json!({"type": "track", "anonymousId": long, "event": "A"}),
                "anonymousId",
            ),
            (
                json!({"type": "track", "userId": "u1", "event": long}),
                "event",
            ),
            (
                json!({"type": "track", "userId": "u1", "event": "A", "messageId": long}),
                "messageId",
            ),
            (
                json!({"type": "group", "userId": "u1", "groupId": long}),
                "groupId",
            ),
            (
                json!({"type": "alias", "userId": "u1", "previousId": long}),
                "previousId",
            ),
            (
                json!({"type": "identify", "userId": "u1", "traits": {"email": format!("{long}@example.com")}}),
                "identifier email",
            ),
        ];
        for (message, field) in cases {
            let e = refused_as_second_of_a_batch(message, field, &rules);
            assert!(
                e.message.contains(&MAX_ID_BYTES.to_string()),
                "{}",
                e.message
            );
        }
        // At the limit, and a long page name (not indexed), are accepted.
        let at = "x".repeat(MAX_ID_BYTES);
        let ok = json!([{"type": "track", "userId": at, "event": at, "messageId": at},
                        {"type": "page", "userId": "u1", "name": long}]);
        assert_eq!(parse_batch(ok, &rules).unwrap().events.len(), 2);
    }

    /// A batch's shared `context` is copied into each message up to a total, so one request
    /// cannot expand into far more memory than its body.
    #[test]
    fn a_batch_expanding_past_its_limit_is_refused() {
        let context = json!({"note": "c".repeat(30 * 1024)});
        let item = json!({"type": "track", "userId": "u1", "event": "A"});
        let body = |n: usize| {
            serde_json::to_vec(&json!({"context": context, "batch": vec![item.clone(); n]}))
                .unwrap()
        };
        let parse_body = parse_bytes;
        // 120 copies (~3.6 MB) fit; every message carries the context.
        let ok = parse_body(&body(120)).unwrap();
        assert_eq!(ok.events.len(), 120);
        assert!(
            ok.events
                .iter()
                .all(|e| e.context.get("note") == context.get("note"))
        );
        // 150 (~4.5 MB) do not, though the body itself is small.
        let big = body(150);
        assert!(big.len() < MAX_BATCH_BYTES);
        let e = parse_body(&big).unwrap_err();
        assert_eq!(e.status, 413);
        assert!(
            e.message
                .contains(&(MAX_EXPANDED_BATCH_BYTES / 1024).to_string()),
            "{}",
            e.message
        );
        // A message whose context has the batch's keys already takes nothing from it.
        let own = json!({"type": "track", "userId": "u1", "event": "A", "context": {"note": "n"}});
        let b = serde_json::to_vec(&json!({"context": context, "batch": vec![own; 150]})).unwrap();
        let ok = parse_body(&b).unwrap();
        assert!(ok.events.iter().all(|e| e.context["note"] == "n"));
    }

    /// The limit counts the memory the merged copies take, not their text: a context of 40,000
    /// tiny keys (~440 KB sent, ~3.4 MB parsed per copy) may go into one message, not two.
    #[test]
    fn the_expansion_limit_counts_memory_not_text() {
        let context: Map<String, Value> =
            (0..40_000).map(|i| (format!("k{i}"), json!(1))).collect();
        let item = json!({"type": "track", "userId": "u1", "event": "A"});
        let body = |n: usize| json!({"context": context, "batch": vec![item.clone(); n]});
        assert!(serde_json::to_vec(&body(2)).unwrap().len() < MAX_BATCH_BYTES);
        assert_eq!(parse_json(&body(1)).unwrap().events.len(), 1);
        let e = parse_json(&body(2)).unwrap_err();
        assert_eq!(e.status, 413, "{e:?}");
    }

    /// The batch's `context` and `integrations` are merged into each message's own, key by key
    /// and into nested objects, the message's values winning; its `sentAt` applies to the
    /// messages without one. A batch of realistic size with a shared context is accepted.
    #[test]
    fn batch_context_and_integrations_merge_into_each_message() {
        let body = json!({
            "context": {"ip": "1.2.3.4", "device": {"id": "d1", "type": "ios"},
                        "traits": {"email": "jane@example.com"}},
            "integrations": {"All": false, "Google Analytics": {"clientId": "ga-1"}},
            "sentAt": "2024-05-01T12:00:05Z",
            "batch": [
                {"type": "track", "userId": "u1", "event": "A",
                 "context": {"ip": "5.6.7.8", "device": {"type": "android"}},
                 "integrations": {"All": true},
                 "sentAt": "2024-05-01T12:00:07Z"},
                {"type": "track", "userId": "u1", "event": "B", "context": null},
                {"type": "page", "anonymousId": "a1"},
            ]
        });
        let parsed = parse_json(&body).unwrap();
        let [own, null, none] = &parsed.events[..] else {
            panic!("{} events", parsed.events.len())
        };
        assert_eq!(
            Value::Object(own.context.clone()),
            json!({"ip": "5.6.7.8", "device": {"id": "d1", "type": "android"},
                   "traits": {"email": "jane@example.com"}})
        );
        assert_eq!(
            Value::Object(own.integrations.clone()),
            json!({"All": true, "Google Analytics": {"clientId": "ga-1"}})
        );
        assert_eq!(
            own.sent_at.map(|t| t.to_string()).as_deref(),
            Some("2024-05-01T12:00:07Z")
        );
        for e in [null, none] {
            assert_eq!(Value::Object(e.context.clone()), body["context"]);
            assert_eq!(Value::Object(e.integrations.clone()), body["integrations"]);
            assert_eq!(
                e.sent_at.map(|t| t.to_string()).as_deref(),
                Some("2024-05-01T12:00:05Z")
            );
        }
        // The identifiers the batch's context carries reach identity resolution.
        let ids = |i: usize| -> Vec<String> {
            parsed.identifiers[i]
                .iter()
                .map(|id| format!("{}={}", id.id_type, id.value))
                .collect()
        };
        assert!(
            ids(2).contains(&"email=jane@example.com".to_string()),
            "{:?}",
            ids(2)
        );
        assert!(
            ids(2).contains(&"ga_client_id=ga-1".to_string()),
            "{:?}",
            ids(2)
        );

        // 1,500 small events sharing a 1.5 KB context: 150 KB sent, ~2.4 MB merged.
        let context = json!({"library": {"name": "x", "version": "1"}, "note": "c".repeat(1500)});
        let item = json!({"type": "track", "userId": "u1", "event": "A"});
        let body =
            serde_json::to_vec(&json!({"context": context, "batch": vec![item; 1500]})).unwrap();
        assert!(body.len() < MAX_BATCH_BYTES / 3);
        assert_eq!(parse_bytes(&body).unwrap().events.len(), 1500);
    }

    /// The batch's own `sentAt`, `context` and `integrations` are checked as the batch's: a bad
    /// one is named, without a message index.
    #[test]
    fn bad_batch_level_fields_are_named_without_an_index() {
        for (field, value) in [
            ("sentAt", json!("yesterday")),
            ("sentAt", json!(12)),
            ("context", json!("x")),
            ("integrations", json!("x")),
            ("integrations", json!([1])),
        ] {
            let mut body = json!({"batch": [{"type": "track", "userId": "u1", "event": "A"}]});
            body[field] = value.clone();
            let e = parse_json(&body).unwrap_err();
            assert_eq!(
                (e.status, e.field.as_deref(), e.index),
                (400, Some(field), None),
                "{field}: {value}: {e:?}"
            );
        }
    }

    /// The 32 KB limit holds each message of a batch as it was sent: a 20 KB message in a batch
    /// with a 15 KB context is accepted; a message of 33 KB is refused, with its index.
    #[test]
    fn the_message_limit_counts_each_message_as_sent() {
        let context = json!({"note": "c".repeat(15 * 1024)});
        let item = |kb: usize| {
            json!({"type": "track", "userId": "u1", "event": "A",
                   "properties": {"p": "p".repeat(kb * 1024)}})
        };
        let body = |batch: Value| {
            serde_json::to_vec(&json!({"context": context, "batch": batch})).unwrap()
        };
        let ok = parse_bytes(&body(json!([item(20)]))).unwrap();
        assert_eq!(ok.events[0].context["note"], context["note"]);
        let e = parse_bytes(&body(json!([item(1), item(33)]))).unwrap_err();
        assert_eq!((e.status, e.index), (400, Some(1)), "{e:?}");
        assert!(e.message.contains("32 KB"), "{}", e.message);
    }

    /// A body of several gzip members one after another reads as their concatenation; a member
    /// followed by bytes that are not one is refused.
    #[test]
    fn every_gzip_member_is_read() {
        use std::io::Write as _;
        let gz = |text: &str| {
            let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::default());
            e.write_all(text.as_bytes()).unwrap();
            e.finish().unwrap()
        };
        let mut two = gz(r#"{"batch": [{"type": "track", "#);
        two.extend(gz(r#""userId": "u1", "event": "A"}]}"#));
        let text = gunzip(&two, MAX_BATCH_BYTES).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&text).unwrap()["batch"][0]["event"],
            "A"
        );
        let mut junk = gz(r#"{"userId": "u1", "event": "A"}"#);
        junk.extend(b"trailing junk");
        assert_eq!(gunzip(&junk, MAX_BATCH_BYTES).unwrap_err().status, 400);
    }

    /// JSON-shaped inputs built from the pieces a Tracking API body is made of.
    fn json_like() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-zA-Z0-9:.\\- ]{0,30}".prop_map(Value::String),
            prop_oneof![Just("2026-01-01T00:00:00Z"), Just("not a date"), Just("")]
                .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let keys = prop_oneof![
                Just("type".to_string()),
                Just("userId".to_string()),
                Just("anonymousId".to_string()),
                Just("event".to_string()),
                Just("batch".to_string()),
                Just("traits".to_string()),
                Just("properties".to_string()),
                Just("context".to_string()),
                Just("timestamp".to_string()),
                Just("sentAt".to_string()),
                Just("groupId".to_string()),
                Just("previousId".to_string()),
                Just("messageId".to_string()),
                "[a-z]{1,8}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(keys, inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn the_parser_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..2048)) {
            let rules = Rules::default();
            for endpoint in [Endpoint::Batch, Endpoint::Single(EventType::Track)] {
                let _ = parse(endpoint, &body, Some(&auth()), &sources(), &rules, Timestamp::now());
            }
            let _ = gunzip(&body, MAX_BATCH_BYTES);
        }

        #[test]
        fn the_parser_never_panics_on_arbitrary_json(v in json_like()) {
            let rules = Rules::default();
            let body = serde_json::to_vec(&v).unwrap();
            for endpoint in [Endpoint::Batch, Endpoint::Single(EventType::Identify), Endpoint::Single(EventType::Alias)] {
                match parse(endpoint, &body, Some(&auth()), &sources(), &rules, Timestamp::now()) {
                    Ok(a) => prop_assert!(!a.events.is_empty()),
                    Err(e) => prop_assert!(e.status == 400 || e.status == 413 || e.status == 401, "{e:?}"),
                }
            }
        }
    }
}
