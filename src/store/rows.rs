//! The rows of the store's change feeds: what the sync reads, in `seq` order.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::event::{Event, EventType, FlatEvent, ParseOptions, Timestamp};
use crate::identity::{Identifier, Subject, extract_all};

use super::Feed;

/// The event that caused a change-log row (the `triggering_event_*` columns).
#[derive(Clone, Debug, PartialEq)]
pub struct Trigger {
    /// Type of the event.
    pub event_type: EventType,
    /// The event's messageId.
    pub event_id: String,
    /// The Track event name, or the page/screen name.
    pub event_name: Option<String>,
    /// The source that sent the event.
    pub source_id: String,
    /// The event's (clock-skew corrected) timestamp.
    pub timestamp: Timestamp,
    /// When the engine received the event.
    pub received_at: Timestamp,
}

impl Trigger {
    /// The trigger of rows caused by `event`.
    pub fn of(event: &Event) -> Trigger {
        Trigger {
            event_type: event.event_type,
            event_id: event.message_id.clone(),
            event_name: event.event.clone().or_else(|| event.name.clone()),
            source_id: event.source_id.clone(),
            timestamp: event.timestamp,
            received_at: event.received_at,
        }
    }

    fn write(&self, m: &mut Map<String, Value>) {
        let values = [
            self.event_type.as_str().into(),
            self.event_id.clone().into(),
            opt(&self.event_name),
            self.source_id.clone().into(),
            self.timestamp.to_string().into(),
            self.received_at.to_string().into(),
        ];
        for (key, value) in TRIGGER_KEYS.into_iter().zip(values) {
            m.insert(key.into(), value);
        }
    }
}

/// The keys a change-log row's trigger adds to it, in order.
pub(crate) const TRIGGER_KEYS: [&str; 6] = [
    "triggering_event_type",
    "triggering_event_id",
    "triggering_event_name",
    "triggering_event_source_id",
    "timestamp",
    "received_at",
];

fn opt(v: &Option<String>) -> Value {
    v.clone().map(Value::String).unwrap_or(Value::Null)
}

/// A row of `id_graph_updates`: `segment_id` now resolves to `canonical_segment_id`.
#[derive(Clone, Debug, PartialEq)]
pub struct IdGraphRow {
    /// Position in the store-wide change order.
    pub seq: i64,
    /// The profile the row is about.
    pub segment_id: String,
    /// The profile it resolves to (itself on creation).
    pub canonical_segment_id: String,
    /// The event that caused it.
    pub trigger: Trigger,
}

/// A row of `external_id_mapping_updates`: an identifier seen for the first time.
#[derive(Clone, Debug, PartialEq)]
pub struct MappingRow {
    /// Position in the store-wide change order.
    pub seq: i64,
    /// Unique id of the row.
    pub id: String,
    /// Lowercase hex SHA-1 of type‖value.
    pub external_id_hash: String,
    /// Identifier type (`user_id`, `email`, ...).
    pub external_id_type: String,
    /// Identifier value.
    pub external_id_value: String,
    /// The profile the identifier was first attached to.
    pub segment_id: String,
    /// The event that caused it.
    pub trigger: Trigger,
}

/// A row of `profile_traits_updates`: a profile's full trait snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct TraitsRow {
    /// Position in the store-wide change order.
    pub seq: i64,
    /// The profile.
    pub segment_id: String,
    /// Every trait of the profile after the change.
    pub traits: Map<String, Value>,
    /// The event that caused it.
    pub trigger: Trigger,
}

/// A stored event with the profile it resolved to.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    /// Position in the store-wide change order.
    pub seq: i64,
    /// The canonical profile the event resolved to when it was ingested.
    pub segment_id: String,
    /// The event.
    pub event: Event,
}

/// A stored event, flattened ([`FlatEvent`]), with the profile it resolved to: what a sync
/// loads into the event tables.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatEventRow {
    /// Position in the store-wide change order.
    pub seq: i64,
    /// The canonical profile the event resolved to when it was ingested.
    pub segment_id: String,
    /// The event.
    pub event: FlatEvent,
}

impl From<EventRow> for FlatEventRow {
    fn from(r: EventRow) -> FlatEventRow {
        FlatEventRow {
            seq: r.seq,
            segment_id: r.segment_id,
            event: FlatEvent::from_event(r.event),
        }
    }
}

/// An event on its way into the store: the JSON text stored as its payload, and only what the
/// store's columns and identity resolution read of the rest. The engine prepares it on its HTTP
/// threads, so the single writer neither serializes payloads nor holds (and frees) whole events
/// while it holds the write lock.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedEvent {
    /// Type, messageId, name, source and times: the events table's columns and the trigger of
    /// the change-log rows the event causes.
    pub(crate) trigger: Trigger,
    /// The `event` key (the Track event name), as stored in the events table's `event` column.
    pub(crate) event: Option<String>,
    /// Every identifier of the event ([`extract_all`]).
    pub(crate) identifiers: Vec<Identifier>,
    /// `previousId`.
    pub(crate) previous_id: Option<String>,
    /// `anonymousId`.
    pub(crate) anonymous_id: Option<String>,
    /// An identify call's traits (`None` for other calls).
    pub(crate) identify_traits: Option<Map<String, Value>>,
    /// `event.to_json_string()`.
    pub(crate) payload: String,
}

impl PreparedEvent {
    /// The event with its payload text.
    pub fn new(event: Event) -> PreparedEvent {
        let identifiers = extract_all(&event);
        PreparedEvent::with_identifiers(event, identifiers)
    }

    /// [`PreparedEvent::new`] when `identifiers` ([`extract_all`] of `event`) are already known.
    pub(crate) fn with_identifiers(event: Event, identifiers: Vec<Identifier>) -> PreparedEvent {
        let payload = event.to_json_string();
        let trigger = Trigger::of(&event);
        let identify = event.event_type == EventType::Identify;
        PreparedEvent {
            trigger,
            event: event.event,
            identifiers,
            previous_id: event.previous_id,
            anonymous_id: event.anonymous_id,
            identify_traits: identify.then_some(event.traits),
            payload,
        }
    }

    /// The messageId.
    pub fn message_id(&self) -> &str {
        &self.trigger.event_id
    }

    /// What identity resolution reads of the event.
    pub(crate) fn subject(&self) -> Subject<'_> {
        Subject {
            event_type: self.trigger.event_type,
            timestamp: Subject::time_of(self.trigger.timestamp, self.trigger.received_at),
            identifiers: Cow::Borrowed(&self.identifiers),
            previous_id: self.previous_id.as_deref(),
            anonymous_id: self.anonymous_id.as_deref(),
            identify_traits: self.identify_traits.as_ref(),
        }
    }
}

impl From<Event> for PreparedEvent {
    fn from(event: Event) -> PreparedEvent {
        PreparedEvent::new(event)
    }
}

/// A newly resolved event as the store writes it.
#[derive(Debug)]
pub(crate) struct NewEventRow<'e> {
    /// Position in the store-wide change order.
    pub seq: i64,
    /// The canonical profile the event resolved to.
    pub segment_id: String,
    /// The event: its columns and payload.
    pub event: &'e PreparedEvent,
}

/// Any row of a change feed.
// Most rows of a feed page are events, so boxing them would only add an allocation per row.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum FeedRow {
    /// A row of `id_graph_updates`.
    IdGraph(IdGraphRow),
    /// A row of `external_id_mapping_updates`.
    Mapping(MappingRow),
    /// A row of `profile_traits_updates`.
    Traits(TraitsRow),
    /// An event.
    Event(EventRow),
}

impl FeedRow {
    /// The row's position in the store-wide change order.
    pub fn seq(&self) -> i64 {
        match self {
            FeedRow::IdGraph(r) => r.seq,
            FeedRow::Mapping(r) => r.seq,
            FeedRow::Traits(r) => r.seq,
            FeedRow::Event(r) => r.seq,
        }
    }

    /// The messageId of the row's event, or of the event that caused the change.
    pub fn message_id(&self) -> &str {
        match self {
            FeedRow::IdGraph(r) => &r.trigger.event_id,
            FeedRow::Mapping(r) => &r.trigger.event_id,
            FeedRow::Traits(r) => &r.trigger.event_id,
            FeedRow::Event(r) => &r.event.message_id,
        }
    }

    /// The row as a flat JSON object with the warehouse's column names (events: the Segment JSON
    /// of the event plus `seq`, `segment_id` and `event_source_id`).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        match self {
            FeedRow::IdGraph(r) => {
                m.insert("seq".into(), r.seq.into());
                m.insert("segment_id".into(), r.segment_id.clone().into());
                m.insert(
                    "canonical_segment_id".into(),
                    r.canonical_segment_id.clone().into(),
                );
                r.trigger.write(&mut m);
            }
            FeedRow::Mapping(r) => {
                m.insert("seq".into(), r.seq.into());
                m.insert("id".into(), r.id.clone().into());
                m.insert("external_id_hash".into(), r.external_id_hash.clone().into());
                m.insert("external_id_type".into(), r.external_id_type.clone().into());
                m.insert(
                    "external_id_value".into(),
                    r.external_id_value.clone().into(),
                );
                m.insert("segment_id".into(), r.segment_id.clone().into());
                r.trigger.write(&mut m);
            }
            FeedRow::Traits(r) => {
                m.insert("seq".into(), r.seq.into());
                m.insert("segment_id".into(), r.segment_id.clone().into());
                r.trigger.write(&mut m);
                m.insert("traits".into(), Value::Object(r.traits.clone()));
            }
            FeedRow::Event(r) => {
                m.insert("seq".into(), r.seq.into());
                m.insert("segment_id".into(), r.segment_id.clone().into());
                m.insert("event_source_id".into(), r.event.source_id.clone().into());
                if let Value::Object(e) = r.event.to_json() {
                    // The row's own keys win: a client may send top-level keys of any name (kept
                    // as the event's `extra`), and one named `seq` must not move a reader's
                    // cursor, nor `segment_id` or `event_source_id` re-attribute the event.
                    // (The warehouse drops such properties anyway: they are reserved columns.)
                    for (k, v) in e {
                        m.entry(k).or_insert(v);
                    }
                }
            }
        }
        m
    }
}

fn get_str(m: &Map<String, Value>, key: &str) -> Result<String, String> {
    m.get(key)
        .and_then(Value::as_str)
        .map(String::from)
        .ok_or_else(|| format!("{key}: missing or not a string"))
}

fn get_seq(m: &Map<String, Value>) -> Result<i64, String> {
    m.get("seq")
        .and_then(Value::as_i64)
        .ok_or_else(|| "seq: missing or not an integer".to_string())
}

fn get_ts(m: &Map<String, Value>, key: &str) -> Result<Timestamp, String> {
    get_str(m, key)?.parse().map_err(|e| format!("{key}: {e}"))
}

impl Trigger {
    fn read(m: &Map<String, Value>) -> Result<Trigger, String> {
        let t = get_str(m, "triggering_event_type")?;
        Ok(Trigger {
            event_type: EventType::parse(&t)
                .ok_or_else(|| format!("triggering_event_type: unknown type {t:?}"))?,
            event_id: get_str(m, "triggering_event_id")?,
            event_name: m
                .get("triggering_event_name")
                .and_then(Value::as_str)
                .map(String::from),
            source_id: get_str(m, "triggering_event_source_id")?,
            timestamp: get_ts(m, "timestamp")?,
            received_at: get_ts(m, "received_at")?,
        })
    }
}

impl FeedRow {
    /// Reads back a row written by [`FeedRow::to_json`] (the feed API's wire format), taking
    /// its values (an event's properties, traits and context move into the row).
    pub fn from_json(feed: &Feed, mut m: Map<String, Value>) -> Result<FeedRow, String> {
        let m = &mut m;
        let seq = get_seq(m)?;
        Ok(match feed {
            Feed::IdGraphUpdates => FeedRow::IdGraph(IdGraphRow {
                seq,
                segment_id: get_str(m, "segment_id")?,
                canonical_segment_id: get_str(m, "canonical_segment_id")?,
                trigger: Trigger::read(m)?,
            }),
            Feed::ExternalIdMappingUpdates => FeedRow::Mapping(MappingRow {
                seq,
                id: get_str(m, "id")?,
                external_id_hash: get_str(m, "external_id_hash")?,
                external_id_type: get_str(m, "external_id_type")?,
                external_id_value: get_str(m, "external_id_value")?,
                segment_id: get_str(m, "segment_id")?,
                trigger: Trigger::read(m)?,
            }),
            Feed::ProfileTraitsUpdates => FeedRow::Traits(TraitsRow {
                seq,
                segment_id: get_str(m, "segment_id")?,
                traits: match m.remove("traits") {
                    Some(Value::Object(traits)) => traits,
                    _ => return Err("traits: missing or not an object".into()),
                },
                trigger: Trigger::read(m)?,
            }),
            Feed::Events(_) => {
                let segment_id = get_str(m, "segment_id")?;
                let source_id = get_str(m, "event_source_id")?;
                let received_at = get_ts(m, "receivedAt")?;
                for k in ["seq", "segment_id", "event_source_id"] {
                    m.shift_remove(k);
                }
                let opts = ParseOptions {
                    now: received_at,
                    source_id,
                    trust_received_at: true,
                };
                let event = Event::from_value(Value::Object(std::mem::take(m)), None, &opts)
                    .map_err(|e| e.to_string())?;
                FeedRow::Event(EventRow {
                    seq,
                    segment_id,
                    event,
                })
            }
        })
    }
}
