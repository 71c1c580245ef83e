//! `profiles-sync import`: ingest Segment JSON lines into a store.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

use serde_json::Value;

use crate::engine::request::{batch_messages, storable};
use crate::event::{Event, ParseOptions, Timestamp};
use crate::identity::Rules;
use crate::store::{IngestSummary, PreparedEvent, Store};

/// How many parsed events go into one store transaction.
const BATCH: usize = 5_000;

/// The events' `event_source_id` unless `--source-id` names one (or `export` wrote the line).
const DEFAULT_SOURCE: &str = "import";

/// The longest line `import` reads: a message, or a `{"batch": […]}` of them (Segment's own
/// limit on a batch is 500 KB). A longer line is skipped without being held in memory — a
/// whole export written as one JSON array would otherwise be parsed whole (~15× its size).
const MAX_LINE_BYTES: usize = 16 << 20;

/// Reads the next line (without its `\n`) into `buf`: `Ok(Some(Ok(len)))`, or
/// `Ok(Some(Err(len)))` for a line longer than `max`, read to its end but not kept; `Ok(None)`
/// at the end of the input.
fn read_line(
    reader: &mut dyn BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<Result<u64, u64>>> {
    buf.clear();
    let (mut len, mut any, mut too_long) = (0u64, false, false);
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            break;
        }
        any = true;
        let end = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..end.unwrap_or(available.len())];
        len += chunk.len() as u64;
        if !too_long && buf.len() + chunk.len() > max {
            too_long = true;
            buf.clear();
        }
        if !too_long {
            buf.extend_from_slice(chunk);
        }
        let used = chunk.len() + usize::from(end.is_some());
        reader.consume(used);
        if end.is_some() {
            break;
        }
    }
    Ok(any.then_some(if too_long { Err(len) } else { Ok(len) }))
}

/// What an import did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ImportSummary {
    /// Lines read.
    pub lines: usize,
    /// Events stored and resolved.
    pub accepted: usize,
    /// Events skipped because their messageId was already stored.
    pub duplicates: usize,
    /// Refused events (or lines) by reason.
    pub rejected: BTreeMap<String, usize>,
    /// Profiles created.
    pub profiles_created: usize,
    /// Profiles merged away.
    pub merges: usize,
    /// New traits that profiles at `caps.max_traits_per_profile` had no room for (their events
    /// are stored with them).
    pub traits_dropped: usize,
}

impl ImportSummary {
    /// How many messages were refused.
    pub fn rejected_total(&self) -> usize {
        self.rejected.values().sum()
    }
}

/// One refused message, for the error report.
#[derive(Debug, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// Index inside a `{"batch": [...]}` line.
    pub index: Option<usize>,
    /// Why.
    pub reason: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index {
            Some(i) => write!(f, "line {} (batch[{i}]): {}", self.line, self.reason),
            None => write!(f, "line {}: {}", self.line, self.reason),
        }
    }
}

/// The messages of one input line: a message object, or `{"batch": [...]}` (expanded as the
/// Tracking API's batch endpoint does).
fn messages(line: &str) -> Result<Vec<Value>, String> {
    let mended = crate::event::mend_lone_surrogates(line.as_bytes());
    let mut v: Value = serde_json::from_slice(mended.as_deref().unwrap_or(line.as_bytes()))
        .map_err(|e| format!("malformed JSON: {e}"))?;
    let Some(obj) = v.as_object_mut() else {
        return Err("malformed JSON: expected an object".into());
    };
    if obj.contains_key("batch") {
        // No per-message limit: a line holding one large message alone is imported too.
        return batch_messages(obj, None).map_err(|e| e.message);
    }
    Ok(vec![v])
}

/// Where a message was read: its line, and its index in a `{"batch": [...]}` line.
type Origin = (usize, Option<usize>);

/// Reads `input` (a file, or stdin for `-`) and ingests it into `store`; every refused line or
/// message is passed to `on_error` and counted, and never stops the good ones: a message the
/// engine would refuse (`engine::request::storable` under `rules`) is skipped, one that
/// identity resolution refuses is reported with its line, and a group the store refuses is
/// stored again one event at a time, so that only the events it refuses are left out.
pub fn import(
    store: &mut dyn Store,
    rules: &Rules,
    input: &PathBuf,
    source_id: Option<&str>,
    mut on_error: impl FnMut(&LineError),
    mut on_progress: impl FnMut(u64),
) -> anyhow::Result<ImportSummary> {
    let mut reader: Box<dyn BufRead> = if input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(input).map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?,
        ))
    };
    let mut summary = ImportSummary::default();
    // The events waiting for their group's transaction, and where each was read.
    let mut pending: Vec<(Origin, PreparedEvent)> = Vec::with_capacity(BATCH);
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    for line_no in 1.. {
        let read = read_line(&mut *reader, &mut buf, MAX_LINE_BYTES)
            .map_err(|e| anyhow::anyhow!("reading line {line_no}: {e}"))?;
        let Some(read) = read else {
            break;
        };
        summary.lines += 1;
        let len = match read {
            Ok(len) => len,
            Err(len) => {
                bytes += len + 1;
                let reason = format!(
                    "line too long: {len} bytes, over {} MB (import reads one JSON message, or one {{\"batch\": […]}}, per line)",
                    MAX_LINE_BYTES >> 20
                );
                refuse_line(&mut summary, &mut on_error, line_no, reason);
                continue;
            }
        };
        bytes += len + 1;
        let mut raw = std::mem::take(&mut buf);
        if raw.last() == Some(&b'\r') {
            raw.pop();
        }
        // A line that is not UTF-8 is a bad line like any other, not the end of the import.
        let line = match String::from_utf8(raw) {
            // A byte-order mark that Windows tools write before the first line.
            Ok(line) if line_no == 1 && line.starts_with('\u{feff}') => {
                line.trim_start_matches('\u{feff}').to_string()
            }
            Ok(line) => line,
            Err(e) => {
                let at = e.utf8_error().valid_up_to() + 1;
                let reason = format!("malformed JSON: not UTF-8 (byte {at})");
                refuse_line(&mut summary, &mut on_error, line_no, reason);
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        if line.trim_start().starts_with('[') {
            let reason = "malformed JSON: a JSON array (import reads one message, or one {\"batch\": […]}, per line: JSON lines)".to_string();
            refuse_line(&mut summary, &mut on_error, line_no, reason);
            continue;
        }
        let msgs = match messages(&line) {
            Ok(m) => m,
            Err(reason) => {
                refuse_line(&mut summary, &mut on_error, line_no, reason);
                continue;
            }
        };
        let batched = msgs.len() > 1 || line.trim_start().starts_with("{\"batch\"");
        let mut opts = ParseOptions {
            now: Timestamp::now(),
            source_id: source_id.unwrap_or(DEFAULT_SOURCE).to_string(),
            trust_received_at: true,
        };
        for (i, mut m) in msgs.into_iter().enumerate() {
            let index = batched.then_some(i);
            // A line `export` wrote carries its row's own fields: the event keeps the source
            // it came from (unless `--source-id` names one); `seq` and `segment_id` were the
            // old store's.
            let exported = m.as_object_mut().and_then(|o| {
                let row = o.contains_key("seq") && o.contains_key("segment_id");
                match o.get("event_source_id") {
                    Some(Value::String(_)) if row => {
                        o.remove("seq");
                        o.remove("segment_id");
                        o.remove("event_source_id")
                    }
                    _ => None,
                }
            });
            give_message_id(&mut m, &line, line_no, index);
            opts.source_id = match (source_id, exported) {
                (Some(s), _) => s.to_string(),
                (None, Some(Value::String(s))) => s,
                _ => DEFAULT_SOURCE.to_string(),
            };
            let refusal = match Event::from_value(m, None, &opts) {
                // A receipt in the future (a typo in the year) would hold every later event
                // back from retention until then; a day covers clocks that disagree. (Only
                // here: stored events are read back with whatever receipt they have.)
                Ok(e)
                    if e.received_at.as_second()
                        > opts.now.as_second().saturating_add(MAX_RECEIVED_AHEAD_SECS) =>
                {
                    (
                        "receivedAt".to_string(),
                        "is more than a day after now: an event cannot have been received in the future"
                            .to_string(),
                    )
                }
                Ok(e) => match storable(&e, rules) {
                    Ok(identifiers) => {
                        let event = PreparedEvent::with_identifiers(e, identifiers);
                        pending.push(((line_no, index), event));
                        continue;
                    }
                    Err(refusal) => (refusal.field, refusal.reason),
                },
                Err(e) => (e.field.to_string(), e.reason.to_string()),
            };
            refuse(&mut summary, &mut on_error, (line_no, index), refusal);
        }
        if pending.len() >= BATCH {
            let first = pending.first().map_or(line_no, |((l, _), _)| *l);
            flush(store, &mut pending, &mut summary, &mut on_error)
                .map_err(|e| stopped_at(e, first))?;
            on_progress(bytes);
        }
    }
    let first = pending.first().map_or(summary.lines, |((l, _), _)| *l);
    flush(store, &mut pending, &mut summary, &mut on_error).map_err(|e| stopped_at(e, first))?;
    on_progress(bytes);
    Ok(summary)
}

/// A store failure that ended the import, saying how far it got: the lines before `first` were
/// stored (or reported); running the same file again stores the rest, and nothing twice.
fn stopped_at(e: anyhow::Error, first: usize) -> anyhow::Error {
    e.context(format!(
        "the import stopped at line {first}: the lines before it were stored; run it again on \
         the same input to store the rest (what is stored already is skipped: every message \
         without a messageId gets one derived from its line)"
    ))
}

/// Gives a message without a `messageId` (absent, null or empty) one derived from its line:
/// `import-` and the SHA-1 of the line's text, its number and the message's index in it. The
/// engine makes a random one, as Segment does; here a re-run of the same file — after an
/// interrupted import, or to store the lines fixed since — would store every such message
/// again. The same line at the same place gets the same id, so a re-run stores it once; an
/// identical line elsewhere (two equal calls) stays two events.
fn give_message_id(message: &mut Value, line: &str, line_no: usize, index: Option<usize>) {
    let Some(obj) = message.as_object_mut() else {
        return;
    };
    let has_id = match obj.get("messageId") {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Null) | None => false,
        Some(_) => true,
    };
    if has_id {
        return;
    }
    let place = format!("\n{line_no}:{}", index.map_or(-1, |i| i as i64));
    let hash = crate::identity::sha1_hex(&[line.as_bytes(), place.as_bytes()]);
    obj.insert("messageId".into(), Value::String(format!("import-{hash}")));
}

/// How far after the importer's clock an event's `receivedAt` may be.
const MAX_RECEIVED_AHEAD_SECS: i64 = 86_400;

/// Reports one refused line or message and counts it under `key`.
fn report(
    summary: &mut ImportSummary,
    on_error: &mut impl FnMut(&LineError),
    (line, index): Origin,
    reason: String,
    key: String,
) {
    on_error(&LineError {
        line,
        index,
        reason,
    });
    *summary.rejected.entry(key).or_default() += 1;
}

/// Reports a line that is no message at all, counted by the kind of its fault (the reason's
/// first words: `malformed JSON`, `batch`).
fn refuse_line(
    summary: &mut ImportSummary,
    on_error: &mut impl FnMut(&LineError),
    line: usize,
    reason: String,
) {
    let key = reason
        .split(':')
        .next()
        .unwrap_or("malformed JSON")
        .to_string();
    report(summary, on_error, (line, None), reason, key);
}

/// Reports a refused message: the field that keeps it out, and why.
fn refuse(
    summary: &mut ImportSummary,
    on_error: &mut impl FnMut(&LineError),
    origin: Origin,
    (field, reason): (String, String),
) {
    let reason = format!("{field}: {reason}");
    report(summary, on_error, origin, reason.clone(), reason);
}

/// Stores the pending events in one transaction; when the store refuses the group, forgets
/// what its graph resolved for it and stores the events one at a time, leaving out (and
/// reporting) only those it refuses.
fn flush(
    store: &mut dyn Store,
    pending: &mut Vec<(Origin, PreparedEvent)>,
    summary: &mut ImportSummary,
    on_error: &mut impl FnMut(&LineError),
) -> anyhow::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let (origins, events): (Vec<Origin>, Vec<PreparedEvent>) =
        std::mem::take(pending).into_iter().unzip();
    match store.ingest_prepared(&events) {
        Ok(s) => add(summary, on_error, s, &origins),
        Err(e) if e.is_data_refusal() => {
            store.warm_up()?;
            for (event, origin) in events.iter().zip(&origins) {
                match store.ingest_prepared(std::slice::from_ref(event)) {
                    Ok(s) => add(summary, on_error, s, std::slice::from_ref(origin)),
                    Err(e) if e.is_data_refusal() => {
                        store.warm_up()?;
                        let refusal = ("store".to_string(), format!("refused the event: {e}"));
                        refuse(summary, on_error, *origin, refusal);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Adds what one transaction did, reporting each event identity resolution refused by its line.
fn add(
    summary: &mut ImportSummary,
    on_error: &mut impl FnMut(&LineError),
    s: IngestSummary,
    origins: &[Origin],
) {
    summary.accepted += s.accepted;
    summary.duplicates += s.duplicates;
    summary.profiles_created += s.profiles_created;
    summary.merges += s.merges;
    summary.traits_dropped += s.traits_dropped;
    for (i, reason) in s.rejected {
        let origin = origins.get(i).copied().unwrap_or((0, None));
        report(summary, on_error, origin, reason.clone(), reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_lines_pass_context_and_sent_at_down() {
        let msgs = messages(r#"{"batch":[{"type":"track","event":"A"},{"type":"page","sentAt":"x"}],"sentAt":"2024-01-01T00:00:00Z","context":{"ip":"1.2.3.4"}}"#).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0]["sentAt"], "2024-01-01T00:00:00Z");
        assert_eq!(msgs[0]["context"]["ip"], "1.2.3.4");
        assert_eq!(msgs[1]["sentAt"], "x", "a message's own sentAt wins");
    }

    /// A lone surrogate escape (half of an emoji) reads as U+FFFD, as the Tracking API reads it.
    #[test]
    fn a_lone_surrogate_escape_is_imported_as_the_replacement_character() {
        let msgs = messages(r#"{"type":"track","event":"caf\u00e9 \ud83d"}"#).unwrap();
        assert_eq!(msgs[0]["event"], "café \u{fffd}");
    }

    #[test]
    fn malformed_lines_say_why() {
        assert!(messages("{nope").unwrap_err().starts_with("malformed JSON"));
        assert_eq!(
            messages("[1]").unwrap_err(),
            "malformed JSON: expected an object"
        );
        assert_eq!(
            messages(r#"{"batch": 3}"#).unwrap_err(),
            "batch: must be an array"
        );
    }

    /// Lines are read whole up to the cap; a longer one is read to its end, not kept, and
    /// reported by its length; the lines after it read as usual.
    #[test]
    fn a_line_past_the_cap_is_skipped_without_being_kept() {
        let input = b"short\r\n0123456789abc\n\nlast";
        let mut reader = std::io::BufReader::with_capacity(4, &input[..]);
        let mut buf = Vec::new();
        let mut lines = vec![];
        while let Some(read) = read_line(&mut reader, &mut buf, 10).unwrap() {
            lines.push((read, String::from_utf8(buf.clone()).unwrap()));
        }
        assert_eq!(
            lines,
            [
                (Ok(6), "short\r".to_string()),
                (Err(13), String::new()),
                (Ok(0), String::new()),
                (Ok(4), "last".to_string()),
            ]
        );
    }
}
