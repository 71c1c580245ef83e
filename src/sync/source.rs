//! Where the sync reads the change feeds from: the engine's feed API (in a cluster) or a store
//! opened directly (local runs, tests).

use serde_json::Value;

use crate::event::{FlatEvent, Timestamp};
use crate::store::{Consumer, EventFilter, Feed, FeedRow, FlatEventRow, Pruned, SourceInfo, Store};

/// A change feed could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading the change feed: {0}")]
pub struct SourceError(pub String);

/// The read side of a profile store (`Send`: the sync reads the event feed one page ahead on a
/// second thread).
pub trait FeedSource: Send {
    /// Up to `limit` rows of `feed` with `seq > after`, in order. A page may be cut short (the
    /// engine bounds pages by size): only an empty page is the end of the feed.
    fn read(&mut self, feed: &Feed, after: i64, limit: usize) -> Result<Vec<FeedRow>, SourceError>;
    /// [`FeedSource::read`], and whether rows may follow the page: `false` only when the page
    /// reached the end of the feed as of the read. By default, a page of `limit` rows may have
    /// more after it and a shorter one ends the feed (a store never cuts a page short).
    fn read_page(
        &mut self,
        feed: &Feed,
        after: i64,
        limit: usize,
    ) -> Result<(Vec<FeedRow>, bool), SourceError> {
        let rows = self.read(feed, after, limit)?;
        let more = rows.len() >= limit;
        Ok((rows, more))
    }
    /// Up to `limit` events with `seq > after`, in order, flattened ([`FlatEventRow`]): the
    /// event tables' feed. By default [`FeedSource::read`] of every event, then flattened; a
    /// store flattens them straight from their stored text.
    fn read_events(&mut self, after: i64, limit: usize) -> Result<Vec<FlatEventRow>, SourceError> {
        let rows = self.read(&Feed::Events(EventFilter::All), after, limit)?;
        Ok(rows
            .into_iter()
            .filter_map(|r| match r {
                FeedRow::Event(e) => Some(FlatEventRow::from(e)),
                _ => None,
            })
            .collect())
    }
    /// The highest committed `seq`.
    fn head(&mut self) -> Result<i64, SourceError>;
    /// The store's id ([`crate::store::Store::store_id`]); `None` when the source cannot tell
    /// (an engine older than the id). (No default: a wrapper that did not forward it would
    /// turn the sync's check off.)
    fn store_id(&mut self) -> Result<Option<String>, SourceError>;
    /// Every Track event name seen.
    fn track_event_names(&mut self) -> Result<Vec<String>, SourceError>;
    /// Every source (for the `triggering_event_source_name`/`_slug` columns).
    fn sources(&mut self) -> Result<Vec<SourceInfo>, SourceError>;
    /// The lowest `seq` of an event received at or after `at`.
    fn event_seq_since(&mut self, at: Timestamp) -> Result<Option<i64>, SourceError>;
    /// How far the store's retention has deleted events (nothing from an engine older than
    /// retention).
    fn pruned(&mut self) -> Result<Pruned, SourceError>;
    /// Records that `consumer` (`namespace/name`) still needs the events after `after_seq`,
    /// and its backfill window, so that retention keeps them.
    fn record_progress(
        &mut self,
        consumer: &str,
        after_seq: i64,
        window_seconds: i64,
    ) -> Result<(), SourceError>;
}

/// Reads straight from a store.
pub struct StoreSource(pub Box<dyn Store>);

impl FeedSource for StoreSource {
    fn read(&mut self, feed: &Feed, after: i64, limit: usize) -> Result<Vec<FeedRow>, SourceError> {
        self.0
            .read_feed(feed, after, limit)
            .map_err(|e| SourceError(e.to_string()))
    }
    fn read_events(&mut self, after: i64, limit: usize) -> Result<Vec<FlatEventRow>, SourceError> {
        self.0
            .read_flat_events(&EventFilter::All, after, limit)
            .map_err(|e| SourceError(e.to_string()))
    }
    fn head(&mut self) -> Result<i64, SourceError> {
        self.0.head_seq().map_err(|e| SourceError(e.to_string()))
    }
    fn store_id(&mut self) -> Result<Option<String>, SourceError> {
        self.0
            .store_id()
            .map(Some)
            .map_err(|e| SourceError(e.to_string()))
    }
    fn track_event_names(&mut self) -> Result<Vec<String>, SourceError> {
        self.0
            .track_event_names()
            .map_err(|e| SourceError(e.to_string()))
    }
    fn sources(&mut self) -> Result<Vec<SourceInfo>, SourceError> {
        self.0.sources().map_err(|e| SourceError(e.to_string()))
    }
    fn event_seq_since(&mut self, at: Timestamp) -> Result<Option<i64>, SourceError> {
        self.0
            .event_seq_since(at)
            .map_err(|e| SourceError(e.to_string()))
    }

    fn pruned(&mut self) -> Result<Pruned, SourceError> {
        self.0.pruned().map_err(|e| SourceError(e.to_string()))
    }

    fn record_progress(
        &mut self,
        consumer: &str,
        after_seq: i64,
        window_seconds: i64,
    ) -> Result<(), SourceError> {
        self.0
            .set_consumer(&Consumer {
                name: consumer.to_string(),
                after_seq,
                window_seconds,
                updated_at: Timestamp::now(),
            })
            .map_err(|e| SourceError(e.to_string()))
    }
}

/// Reads through the engine's feed API with a bearer token.
pub struct EngineSource {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

/// Checks that `url` is an `http://` or `https://` URL without a user name or password: the feed
/// API authenticates with the token file, and the URL shows in reports, the status and logs.
/// The errors never repeat the URL.
pub fn check_engine_url(url: &str) -> Result<(), SourceError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        SourceError(format!(
            "the engine URL is not a URL ({e}): expected http://host:port"
        ))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(SourceError(format!(
            "the engine URL's scheme is {:?}: expected http:// or https://",
            parsed.scheme()
        )));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(SourceError(
            "the engine URL carries a user name or password: leave them out (the feed API \
             authenticates with the token file, and the URL shows in reports and logs)"
                .into(),
        ));
    }
    Ok(())
}

impl EngineSource {
    /// A client of the engine at `base` (`http://engine:8080`).
    pub fn new(base: &str, token: String) -> Result<EngineSource, SourceError> {
        check_engine_url(base)?;
        let http = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|e| SourceError(e.to_string()))?;
        Ok(EngineSource {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    fn get(&self, path: &str) -> Result<String, SourceError> {
        let url = format!("{}{path}", self.base);
        let r = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .map_err(|e| SourceError(format!("GET {url}: {e}")))?;
        let status = r.status();
        let body = r
            .text()
            .map_err(|e| SourceError(format!("GET {url}: {e}")))?;
        if !status.is_success() {
            return Err(SourceError(format!("GET {url}: {status}: {body}")));
        }
        Ok(body)
    }

    /// A page of the feed `table` (a header line, then one row per line), each row read by
    /// `row`; and whether rows may follow it.
    fn page<T>(
        &self,
        table: &str,
        after: i64,
        limit: usize,
        row: impl Fn(&str) -> Result<T, String>,
    ) -> Result<(Vec<T>, bool), SourceError> {
        let body = self.get(&format!("/v1/feeds/{table}?after={after}&limit={limit}"))?;
        let mut lines = body.lines();
        let header: Value = lines
            .next()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| SourceError(format!("feed {table}: {e}")))?
            .ok_or_else(|| SourceError(format!("feed {table}: empty response")))?;
        let rows = lines
            .map(|line| row(line).map_err(|e| SourceError(format!("feed {table}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        // An engine without `more` in its header never cut a page short.
        let more = header["more"].as_bool().unwrap_or(rows.len() >= limit);
        Ok((rows, more))
    }

    fn catalog(&self, query: &str) -> Result<Value, SourceError> {
        serde_json::from_str(&self.get(&format!("/v1/feeds{query}"))?)
            .map_err(|e| SourceError(format!("feed catalog: {e}")))
    }
}

fn feed_table(feed: &Feed) -> Result<String, SourceError> {
    use crate::store::EventFilter;
    Ok(match feed {
        Feed::IdGraphUpdates => "id_graph_updates".into(),
        Feed::ExternalIdMappingUpdates => "external_id_mapping_updates".into(),
        Feed::ProfileTraitsUpdates => "profile_traits_updates".into(),
        Feed::Events(EventFilter::All) => "events".into(),
        Feed::Events(EventFilter::Type(t)) => t.table().into(),
        Feed::Events(EventFilter::TrackNames(_)) => {
            return Err(SourceError(
                "per-event feeds are read through the events feed".into(),
            ));
        }
    })
}

impl FeedSource for EngineSource {
    fn read(&mut self, feed: &Feed, after: i64, limit: usize) -> Result<Vec<FeedRow>, SourceError> {
        Ok(self.read_page(feed, after, limit)?.0)
    }

    fn read_page(
        &mut self,
        feed: &Feed,
        after: i64,
        limit: usize,
    ) -> Result<(Vec<FeedRow>, bool), SourceError> {
        let table = feed_table(feed)?;
        self.page(&table, after, limit, |line| {
            let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
            let Value::Object(m) = v else {
                return Err("a row is not an object".to_string());
            };
            FeedRow::from_json(feed, m)
        })
    }

    fn read_events(&mut self, after: i64, limit: usize) -> Result<Vec<FlatEventRow>, SourceError> {
        // Each row read straight into its flattened event, as from a store.
        let (rows, _) = self.page("events", after, limit, |line| {
            let (seq, segment_id, event) =
                FlatEvent::from_feed_row_text(line).map_err(|e| e.to_string())?;
            Ok(FlatEventRow {
                seq,
                segment_id,
                event,
            })
        })?;
        Ok(rows)
    }

    fn head(&mut self) -> Result<i64, SourceError> {
        self.catalog("")?["head"]
            .as_i64()
            .ok_or_else(|| SourceError("feed catalog: no head".into()))
    }

    fn store_id(&mut self) -> Result<Option<String>, SourceError> {
        match &self.catalog("")?["storeId"] {
            Value::Null => Ok(None),
            Value::String(id)
                if (1..=64).contains(&id.len())
                    && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') =>
            {
                Ok(Some(id.clone()))
            }
            _ => Err(SourceError(
                "feed catalog: storeId is not a store id (a UUID)".into(),
            )),
        }
    }

    fn track_event_names(&mut self) -> Result<Vec<String>, SourceError> {
        Ok(self.catalog("")?["trackEvents"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["event"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn sources(&mut self) -> Result<Vec<SourceInfo>, SourceError> {
        serde_json::from_value(self.catalog("")?["sources"].clone())
            .map_err(|e| SourceError(format!("feed catalog: {e}")))
    }

    fn event_seq_since(&mut self, at: Timestamp) -> Result<Option<i64>, SourceError> {
        Ok(self.catalog(&format!("?since={at}"))?["seqSince"].as_i64())
    }

    fn pruned(&mut self) -> Result<Pruned, SourceError> {
        Ok(crate::engine::retention::pruned_from_json(
            &self.catalog("")?["pruned"],
        ))
    }

    fn record_progress(
        &mut self,
        consumer: &str,
        after_seq: i64,
        window_seconds: i64,
    ) -> Result<(), SourceError> {
        let (namespace, name) = consumer.split_once('/').unwrap_or(("", consumer));
        let url = crate::engine::retention::consumer_url(&self.base, namespace, name)
            .ok_or_else(|| SourceError(format!("engine URL {}: takes no path", self.base)))?;
        let r = self
            .http
            .put(url.clone())
            .bearer_auth(&self.token)
            .json(&serde_json::json!({
                "afterSeq": after_seq,
                "backfillWindowSeconds": window_seconds,
            }))
            .send()
            .map_err(|e| SourceError(format!("PUT {url}: {e}")))?;
        let status = r.status();
        // 404: an engine older than retention (a newer one always has the route); it
        // deletes nothing, so there is nothing to hold.
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        let body = r.text().unwrap_or_default();
        Err(SourceError(format!("PUT {url}: {status}: {body}")))
    }
}

#[cfg(test)]
mod tests {
    /// The engine URL is an http(s) URL without credentials (a password in it reached the
    /// report, the status and the logs); its errors never repeat it.
    #[test]
    fn engine_urls_with_credentials_or_without_http_are_refused() {
        for (url, why) in [
            ("http://u:p4ssw0rd@engine:8080", "user name or password"),
            ("http://u@engine:8080", "user name or password"),
            ("ftp://engine", "scheme"),
            ("not a url", "not a URL"),
        ] {
            let e = super::check_engine_url(url).unwrap_err().0;
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("p4ssw0rd"), "{e}");
        }
        super::check_engine_url("http://profiles-sync-engine.profiles-sync:8080").unwrap();
        super::check_engine_url("https://engine.example.com").unwrap();
    }
}
