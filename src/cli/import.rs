//! `profiles-sync import`: ingest Segment JSON lines into a store.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

use serde_json::Value;

use crate::engine::request::batch_messages;
use crate::event::{Event, ParseOptions, Timestamp};
use crate::store::Store;

/// How many parsed events go into one store transaction.
const BATCH: usize = 5_000;

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
    let mut v: Value = serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let Some(obj) = v.as_object_mut() else {
        return Err("malformed JSON: expected an object".into());
    };
    if obj.contains_key("batch") {
        // No per-message limit: a line holding one large message alone is imported too.
        return batch_messages(obj, None).map_err(|e| e.message);
    }
    Ok(vec![v])
}

/// Reads `input` (a file, or stdin for `-`) and ingests it into `store`; every refused line or
/// message is passed to `on_error` and counted, and never stops the good ones.
pub fn import(
    store: &mut dyn Store,
    input: &PathBuf,
    source_id: &str,
    mut on_error: impl FnMut(&LineError),
    mut on_progress: impl FnMut(u64),
) -> anyhow::Result<ImportSummary> {
    let reader: Box<dyn BufRead> = if input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(input).map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?,
        ))
    };
    let mut summary = ImportSummary::default();
    let mut pending: Vec<Event> = Vec::with_capacity(BATCH);
    let mut flush = |pending: &mut Vec<Event>, summary: &mut ImportSummary| -> anyhow::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let s = store.ingest(std::mem::take(pending))?;
        summary.accepted += s.accepted;
        summary.duplicates += s.duplicates;
        summary.profiles_created += s.profiles_created;
        summary.merges += s.merges;
        for (_, reason) in s.rejected {
            *summary.rejected.entry(reason).or_default() += 1;
        }
        Ok(())
    };
    let mut bytes = 0u64;
    for (n, line) in reader.lines().enumerate() {
        let line_no = n + 1;
        let line = line.map_err(|e| anyhow::anyhow!("reading line {line_no}: {e}"))?;
        bytes += line.len() as u64 + 1;
        summary.lines += 1;
        if line.trim().is_empty() {
            continue;
        }
        let msgs = match messages(&line) {
            Ok(m) => m,
            Err(reason) => {
                on_error(&LineError {
                    line: line_no,
                    index: None,
                    reason: reason.clone(),
                });
                let key = reason
                    .split(':')
                    .next()
                    .unwrap_or("malformed JSON")
                    .to_string();
                *summary.rejected.entry(key).or_default() += 1;
                continue;
            }
        };
        let batched = msgs.len() > 1 || line.trim_start().starts_with("{\"batch\"");
        let opts = ParseOptions {
            now: Timestamp::now(),
            source_id: source_id.to_string(),
            trust_received_at: true,
        };
        for (i, m) in msgs.into_iter().enumerate() {
            match Event::from_value(m, None, &opts) {
                Ok(e) => pending.push(e),
                Err(e) => {
                    on_error(&LineError {
                        line: line_no,
                        index: batched.then_some(i),
                        reason: e.to_string(),
                    });
                    *summary
                        .rejected
                        .entry(format!("{}: {}", e.field, e.reason))
                        .or_default() += 1;
                }
            }
        }
        if pending.len() >= BATCH {
            flush(&mut pending, &mut summary)?;
            on_progress(bytes);
        }
    }
    flush(&mut pending, &mut summary)?;
    on_progress(bytes);
    Ok(summary)
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
}
