//! Conversions between stored columns and feed rows, shared by both stores.

use serde_json::{Map, Value};

use crate::event::{Event, EventType, FlatEvent, ParseOptions, Timestamp};
use crate::identity::{IdentifierState, ProfileState};

use super::schema::TRIGGER_COLUMNS;
use super::{
    EventRow, Feed, FeedRow, FlatEventRow, IdGraphRow, MappingRow, StoreError, TraitsRow, Trigger,
};

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
struct RawTrigger {
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

/// A row of the `events` table as read: the payload borrowed from the statement's row.
pub(crate) struct StoredEvent<'a> {
    pub seq: i64,
    pub segment_id: String,
    pub source_id: String,
    pub received_at_us: i64,
    pub payload: &'a str,
}

impl StoredEvent<'_> {
    fn options(&mut self) -> Result<ParseOptions, StoreError> {
        Ok(ParseOptions {
            now: timestamp("events", self.received_at_us)?,
            source_id: std::mem::take(&mut self.source_id),
            trust_received_at: true,
        })
    }

    /// The event, re-parsed from its payload exactly as it was accepted.
    pub(crate) fn feed_row(mut self) -> Result<FeedRow, StoreError> {
        let opts = self.options()?;
        let event = Event::from_json_text(self.payload, None, &opts).map_err(corrupt_event)?;
        Ok(FeedRow::Event(EventRow {
            seq: self.seq,
            segment_id: self.segment_id,
            event,
        }))
    }

    /// The event with its objects flattened, parsed straight from its payload.
    pub(crate) fn flat_row(mut self) -> Result<FlatEventRow, StoreError> {
        let opts = self.options()?;
        let event = FlatEvent::from_json_text(self.payload, &opts).map_err(corrupt_event)?;
        Ok(FlatEventRow {
            seq: self.seq,
            segment_id: self.segment_id,
            event,
        })
    }
}

fn corrupt_event(e: crate::event::EventError) -> StoreError {
    StoreError::Corrupt {
        table: "events",
        reason: e.to_string(),
    }
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

/// Typed column access over a result row of either driver, so the change-log rows are decoded
/// once for both stores.
pub(crate) trait Columns {
    /// An integer column.
    fn int(&self, i: usize) -> Result<i64, StoreError>;
    /// A non-null text column.
    fn text(&self, i: usize) -> Result<String, StoreError>;
    /// A nullable text column.
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError>;
}

impl Columns for rusqlite::Row<'_> {
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        Ok(self.get(i)?)
    }
    fn text(&self, i: usize) -> Result<String, StoreError> {
        Ok(self.get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.get(i)?)
    }
}

impl Columns for postgres::Row {
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn text(&self, i: usize) -> Result<String, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(i)?)
    }
}

/// A change log's table, the columns before the trigger columns, and how many there are.
fn change_log(feed: &Feed) -> Option<(&'static str, &'static str, usize)> {
    match feed {
        Feed::IdGraphUpdates => Some((
            "id_graph_updates",
            "seq, segment_id, canonical_segment_id",
            3,
        )),
        Feed::ExternalIdMappingUpdates => Some((
            "external_id_mapping_updates",
            "seq, id, external_id_hash, external_id_type, external_id_value, segment_id",
            6,
        )),
        Feed::ProfileTraitsUpdates => {
            Some(("profile_traits_updates", "seq, segment_id, traits", 3))
        }
        Feed::Events(_) => None,
    }
}

/// The query reading a change log after `$1`, at most `$2` rows (both drivers bind `$n` by
/// position); `None` for the events feed, which each store filters its own way.
pub(crate) fn change_log_sql(feed: &Feed) -> Option<String> {
    let (table, lead, _) = change_log(feed)?;
    Some(format!(
        "SELECT {lead}, {TRIGGER_COLUMNS} FROM {table} WHERE seq > $1 ORDER BY seq LIMIT $2"
    ))
}

/// Decodes a row read by [`change_log_sql`].
pub(crate) fn change_log_row(feed: &Feed, r: &impl Columns) -> Result<FeedRow, StoreError> {
    let Some((table, _, lead)) = change_log(feed) else {
        return Err(StoreError::UnknownTable("events".into()));
    };
    let trigger = RawTrigger {
        event_type: r.text(lead)?,
        event_id: r.text(lead + 1)?,
        event_name: r.opt_text(lead + 2)?,
        source_id: r.text(lead + 3)?,
        timestamp_us: r.int(lead + 4)?,
        received_at_us: r.int(lead + 5)?,
    }
    .decode(table)?;
    let seq = r.int(0)?;
    Ok(match feed {
        Feed::IdGraphUpdates => FeedRow::IdGraph(IdGraphRow {
            seq,
            segment_id: r.text(1)?,
            canonical_segment_id: r.text(2)?,
            trigger,
        }),
        Feed::ExternalIdMappingUpdates => FeedRow::Mapping(MappingRow {
            seq,
            id: r.text(1)?,
            external_id_hash: r.text(2)?,
            external_id_type: r.text(3)?,
            external_id_value: r.text(4)?,
            segment_id: r.text(5)?,
            trigger,
        }),
        _ => FeedRow::Traits(TraitsRow {
            seq,
            segment_id: r.text(1)?,
            traits: object(table, &r.text(2)?)?,
            trigger,
        }),
    })
}

/// The columns of a stored profile, in [`RawProfile`]'s order.
pub(crate) const PROFILE_COLUMNS: &str =
    "segment_id, canonical_segment_id, created_rank, merges, traits, trait_times";
/// The columns of a stored identifier, in [`identifier`]'s order.
pub(crate) const IDENTIFIER_COLUMNS: &str =
    "id_type, value, segment_id, first_seen_us, last_seen_us";

/// A current-state read by key.
#[derive(Clone, Copy)]
pub(crate) enum StateRead {
    /// `profiles`, by `segment_id`.
    Profiles,
    /// `identifiers`, by `(id_type, value)`.
    Identifiers,
}

/// The query of a [`StateRead`] with placeholders written `{mark}1`, `{mark}2`, …: the key after
/// which to start (when `after`), then the limit. Two statements rather than one with
/// `? IS NULL OR …`, which would keep both stores from seeking the primary key.
pub(crate) fn state_read_sql(read: StateRead, after: bool, mark: &str) -> String {
    let (columns, table, key, width) = match read {
        StateRead::Profiles => (PROFILE_COLUMNS, "profiles", "segment_id", 1),
        StateRead::Identifiers => (IDENTIFIER_COLUMNS, "identifiers", "id_type, value", 2),
    };
    let (filter, limit) = if after {
        let marks: Vec<String> = (1..=width).map(|i| format!("{mark}{i}")).collect();
        (
            format!(" WHERE ({key}) > ({})", marks.join(", ")),
            width + 1,
        )
    } else {
        (String::new(), 1)
    };
    format!("SELECT {columns} FROM {table}{filter} ORDER BY {key} LIMIT {mark}{limit}")
}
