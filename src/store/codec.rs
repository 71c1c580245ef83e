//! Conversions between stored columns and feed rows, shared by both stores.

use serde_json::{Map, Value};

use crate::event::{Event, EventType, ParseOptions, Timestamp};
use crate::identity::{IdentifierState, ProfileState};

use super::{StoreError, Trigger};

/// Microseconds since the epoch, as stored.
pub(crate) fn micros(t: Timestamp) -> i64 {
    t.as_microsecond()
}

/// A stored microsecond timestamp.
pub(crate) fn timestamp(table: &'static str, us: i64) -> Result<Timestamp, StoreError> {
    Timestamp::from_microsecond(us).map_err(|e| StoreError::Corrupt {
        table,
        reason: format!("timestamp {us}: {e}"),
    })
}

/// The trigger columns as read from a change-log table.
pub(crate) struct RawTrigger {
    pub event_type: String,
    pub event_id: String,
    pub event_name: Option<String>,
    pub source_id: String,
    pub timestamp_us: i64,
    pub received_at_us: i64,
}

impl RawTrigger {
    pub(crate) fn decode(self, table: &'static str) -> Result<Trigger, StoreError> {
        Ok(Trigger {
            event_type: EventType::parse(&self.event_type).ok_or_else(|| StoreError::Corrupt {
                table,
                reason: format!("unknown event type {:?}", self.event_type),
            })?,
            event_id: self.event_id,
            event_name: self.event_name,
            source_id: self.source_id,
            timestamp: timestamp(table, self.timestamp_us)?,
            received_at: timestamp(table, self.received_at_us)?,
        })
    }
}

/// A JSON object column.
pub(crate) fn object(table: &'static str, text: &str) -> Result<Map<String, Value>, StoreError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(StoreError::Corrupt {
            table,
            reason: "expected a JSON object".into(),
        }),
        Err(e) => Err(StoreError::Corrupt {
            table,
            reason: e.to_string(),
        }),
    }
}

/// A stored event, re-parsed from its payload exactly as it was accepted.
pub(crate) fn event(
    payload: &str,
    source_id: String,
    received_at_us: i64,
) -> Result<Event, StoreError> {
    let value: Value = serde_json::from_str(payload).map_err(|e| StoreError::Corrupt {
        table: "events",
        reason: e.to_string(),
    })?;
    let opts = ParseOptions {
        now: timestamp("events", received_at_us)?,
        source_id,
        trust_received_at: true,
    };
    Event::from_json(&value, None, &opts).map_err(|e| StoreError::Corrupt {
        table: "events",
        reason: e.to_string(),
    })
}

/// The stored form of a profile.
pub(crate) struct RawProfile {
    pub segment_id: String,
    pub canonical_segment_id: String,
    pub created_rank: i64,
    pub merges: i64,
    pub traits: String,
    pub trait_times: String,
}

impl RawProfile {
    pub(crate) fn decode(self) -> Result<ProfileState, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            table: "profiles",
            reason,
        };
        Ok(ProfileState {
            created_rank: u64::try_from(self.created_rank).map_err(|e| corrupt(e.to_string()))?,
            merges: u32::try_from(self.merges).map_err(|e| corrupt(e.to_string()))?,
            traits: object("profiles", &self.traits)?,
            trait_times: object("profiles", &self.trait_times)?,
            segment_id: self.segment_id,
            canonical_segment_id: self.canonical_segment_id,
        })
    }
}

/// The stored form of an identifier.
pub(crate) fn identifier(
    id_type: String,
    value: String,
    segment_id: String,
    first_seen_us: i64,
    last_seen_us: i64,
) -> Result<IdentifierState, StoreError> {
    Ok(IdentifierState {
        id_type,
        value,
        segment_id,
        first_seen: timestamp("identifiers", first_seen_us)?,
        last_seen: timestamp("identifiers", last_seen_us)?,
    })
}

/// JSON text of a map (infallible for maps of JSON values).
pub(crate) fn json_text(m: &Map<String, Value>) -> String {
    serde_json::to_string(m).unwrap_or_else(|_| "{}".into())
}
