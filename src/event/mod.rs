//! The Segment spec message model: one [`Event`] per `identify`, `track`, `page`, `screen`,
//! `group` or `alias` call, parsed from the JSON the Tracking API receives ([`Event::from_json`])
//! and written back as canonical Segment JSON ([`Event::to_json`]).
//!
//! Parsing follows the Segment spec: keys are camelCase only; every key this model does not know
//! is kept, untouched, in [`Event::extra`] (except `writeKey`, a credential, and `_metadata`,
//! the SDKs' notes for Segment's delivery, which are never kept).
//! Time fields are clock-skew corrected the way Segment does it:
//! `timestamp = receivedAt − (sentAt − originalTimestamp)`.

mod flat;
mod json;
mod parse;
mod surrogates;
#[cfg(test)]
mod tests;

use std::sync::LazyLock;

pub use jiff::Timestamp;
use serde_json::{Map, Value};

pub use flat::{FlatEvent, Leaves, Section, flatten_each};
pub(crate) use parse::number_id;
pub(crate) use parse::random_uuid;
pub use parse::{MAX_IDENTIFY_TRAITS, parse_timestamp};
pub use surrogates::mend_lone_surrogates;

/// The six Segment spec call types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// Who the user is, with their traits.
    Identify,
    /// Something the user did (`event` names it).
    Track,
    /// A web page view.
    Page,
    /// A mobile screen view.
    Screen,
    /// The user's membership of a group (account, company).
    Group,
    /// Links a previous identity (`previousId`) to `userId`.
    Alias,
}

impl EventType {
    /// Every call type, in the Segment spec's order.
    pub const ALL: [EventType; 6] = [
        EventType::Identify,
        EventType::Track,
        EventType::Page,
        EventType::Screen,
        EventType::Group,
        EventType::Alias,
    ];

    /// The value of the message's `type` field (`"identify"`, `"track"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Identify => "identify",
            EventType::Track => "track",
            EventType::Page => "page",
            EventType::Screen => "screen",
            EventType::Group => "group",
            EventType::Alias => "alias",
        }
    }

    /// The warehouse event table this type lands in (`identifies`, `tracks`, …).
    pub fn table(self) -> &'static str {
        match self {
            EventType::Identify => "identifies",
            EventType::Track => "tracks",
            EventType::Page => "pages",
            EventType::Screen => "screens",
            EventType::Group => "groups",
            EventType::Alias => "aliases",
        }
    }

    /// The type named by a message's `type` field value; `None` for anything else.
    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One parsed Segment spec message.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// `messageId`: the client's id for the message (generated when absent), used for dedupe.
    pub message_id: String,
    /// `type`: which call this is.
    pub event_type: EventType,
    /// `userId`: the known user's id (numbers are converted to strings).
    pub user_id: Option<String>,
    /// `anonymousId`: the device/browser's pseudo-identifier (numbers converted to strings).
    pub anonymous_id: Option<String>,
    /// When the event happened, corrected for client clock skew.
    pub timestamp: Timestamp,
    /// When the server received the event.
    pub received_at: Timestamp,
    /// `sentAt`: when the client sent the message, by its own clock.
    pub sent_at: Option<Timestamp>,
    /// The client's own timestamp for the event (`originalTimestamp`, else its `timestamp`).
    pub original_timestamp: Option<Timestamp>,
    /// `event`: the Track event name (track calls).
    pub event: Option<String>,
    /// `name`: the page or screen name.
    pub name: Option<String>,
    /// `category`: the page category.
    pub category: Option<String>,
    /// `groupId`: the group (group calls).
    pub group_id: Option<String>,
    /// `previousId`: the identity being aliased (alias calls).
    pub previous_id: Option<String>,
    /// `context`: device, library, page, traits, externalIds, … as sent.
    pub context: Map<String, Value>,
    /// `integrations`: per-destination options as sent.
    pub integrations: Map<String, Value>,
    /// `traits`: the user's traits on identify, the group's traits on group.
    pub traits: Map<String, Value>,
    /// `properties`: the track/page/screen properties.
    pub properties: Map<String, Value>,
    /// Every top-level key the spec model does not know, kept as sent.
    pub extra: Map<String, Value>,
    /// The id of the source that ingested the event (`event_source_id`).
    pub source_id: String,
}

/// A message that is not a valid Segment spec call; `field` names the offending key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct EventError {
    /// The message key at fault, in the message's own spelling (`userId`, `event`, `timestamp`).
    pub field: String,
    /// What is wrong with it, for the client to read.
    pub reason: String,
}

impl EventError {
    pub(crate) fn new(field: &str, reason: impl Into<String>) -> EventError {
        EventError {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// What the server knows about a message that the message itself does not carry.
#[derive(Clone, Debug)]
pub struct ParseOptions {
    /// The server's receive time; becomes `receivedAt`.
    pub now: Timestamp,
    /// The id of the ingesting source; becomes [`Event::source_id`].
    pub source_id: String,
    /// Historical import: keep a message's own `receivedAt` when it has one.
    pub trust_received_at: bool,
}

impl ParseOptions {
    /// Options for live ingest: receive time `now`, source `source_id`, `receivedAt` not trusted.
    pub fn new(now: Timestamp, source_id: impl Into<String>) -> ParseOptions {
        ParseOptions {
            now,
            source_id: source_id.into(),
            trust_received_at: false,
        }
    }
}

static EMPTY_MAP: LazyLock<Map<String, Value>> = LazyLock::new(Map::new);

impl Event {
    /// Parses one Segment spec message. `default_type` is used when the object has no `type`
    /// (e.g. `POST /v1/track`); a present `type` must agree with `default_type` when both are
    /// given. Never panics, whatever the input.
    pub fn from_json(
        v: &Value,
        default_type: Option<EventType>,
        opts: &ParseOptions,
    ) -> Result<Event, EventError> {
        parse::parse(v.clone(), default_type, opts)
    }

    /// [`Event::from_json`] taking the message by value, so its objects move into the event
    /// instead of being copied.
    pub fn from_value(
        v: Value,
        default_type: Option<EventType>,
        opts: &ParseOptions,
    ) -> Result<Event, EventError> {
        parse::parse(v, default_type, opts)
    }

    /// [`Event::from_value`] of a message's JSON text, parsed straight into the event (the
    /// top-level object is never built); a text that is not a JSON object is refused as the
    /// field `message`.
    pub fn from_json_text(
        text: &str,
        default_type: Option<EventType>,
        opts: &ParseOptions,
    ) -> Result<Event, EventError> {
        parse::parse_text(text, default_type, opts)
    }

    /// The canonical Segment JSON of the event: camelCase keys `type`, `messageId`, `userId`,
    /// `anonymousId`, `timestamp`, `receivedAt`, `sentAt`, `originalTimestamp`, `event`, `name`,
    /// `category`, `groupId`, `previousId`, `context`, `integrations`, `traits`, `properties`,
    /// then every [`Event::extra`] key. Absent options and empty objects are left out, and so is
    /// `timestamp` when the client gave no timestamp of its own (it then equals `receivedAt`).
    /// `from_json(&e.to_json(), None, opts)` with `trust_received_at` gives `e` back.
    pub fn to_json(&self) -> Value {
        json::to_json(self)
    }

    /// [`Event::to_json`] as JSON text, written without building the `Value` (what the store keeps).
    pub fn to_json_string(&self) -> String {
        json::to_json_string(self)
    }

    /// The traits that describe the user, for identity resolution: an identify call's `traits`;
    /// for every other type `context.traits` (empty when absent or not an object).
    pub fn identity_traits(&self) -> &Map<String, Value> {
        if self.event_type == EventType::Identify {
            return &self.traits;
        }
        self.context_traits()
    }

    /// `context.traits` when it is an object, else an empty map.
    pub fn context_traits(&self) -> &Map<String, Value> {
        match self.context.get("traits") {
            Some(Value::Object(m)) => m,
            _ => &EMPTY_MAP,
        }
    }
}
