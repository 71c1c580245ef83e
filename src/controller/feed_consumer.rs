//! The engine's record of a connection as a feed consumer (`/v1/feed-consumers/{ns}/{name}`).
//! Sync Jobs record how far their connection has loaded; with event retention on, the engine
//! keeps every event a recorded consumer has not loaded. A deleted connection would hold them
//! back for ever, so its cleanup removes the record — best effort: the engine may be gone (an
//! uninstall), and a deletion never waits on it. A record that outlives its connection all the
//! same is removed later by `stale_consumers.rs`, which lists them here.

use jiff::Timestamp;
use reqwest::{Method, Url};

use super::Context;
use crate::warehouse::error::error_chain;

/// The longest engine answer quoted in an error (it becomes part of an Event's note).
const MAX_QUOTED_BODY: usize = 200;

/// Why a call to the engine's feed-consumer API failed. No variant carries the token.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerApiError {
    /// The controller's engine token could not be read.
    #[error("{0}")]
    Token(String),
    /// The engine URL does not take a path.
    #[error("the engine URL {0:?} cannot hold a path")]
    Url(String),
    /// The request did not get an answer.
    #[error("the engine is unreachable: {0}")]
    Unreachable(String),
    /// The engine answered with an error status.
    #[error("the engine answered {status}{}", body.as_deref().map(|b| format!(": {b}")).unwrap_or_default())]
    Refused {
        /// The HTTP status.
        status: reqwest::StatusCode,
        /// The start of the answer's body, when it had one.
        body: Option<String>,
    },
    /// The engine's answer could not be read as a list of consumers.
    #[error("the engine's list of feed consumers could not be read: {0}")]
    Malformed(String),
}

/// A feed consumer as the engine lists it (`GET /v1/feed-consumers`), with what the
/// controller reads of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedConsumer {
    /// `namespace/name` of the connection it was recorded for.
    pub name: String,
    /// When it last recorded its progress; `None` when the engine's `updatedAt` is not a
    /// timestamp.
    pub updated_at: Option<Timestamp>,
}

/// The part of `GET /v1/feed-consumers` the controller reads.
#[derive(serde::Deserialize)]
struct ConsumerList {
    consumers: Vec<ListedConsumer>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListedConsumer {
    name: String,
    #[serde(default)]
    updated_at: Option<String>,
}

/// The URL of the feed consumer of connection `namespace`/`name` on the engine at
/// `engine_url` (a base path in `engine_url` is kept; the names are percent-encoded as path
/// segments).
pub fn consumer_url(
    engine_url: &str,
    namespace: &str,
    name: &str,
) -> Result<Url, ConsumerApiError> {
    api_url(engine_url, &["v1", "feed-consumers", namespace, name])
}

/// `engine_url` with `segments` appended to its path.
fn api_url(engine_url: &str, segments: &[&str]) -> Result<Url, ConsumerApiError> {
    crate::engine::retention::api_url(engine_url, segments)
        .ok_or_else(|| ConsumerApiError::Url(engine_url.to_string()))
}

/// Removes the feed consumer of connection `namespace`/`name` from the engine
/// (`DELETE /v1/feed-consumers/{namespace}/{name}` with the feed API token; the engine answers
/// 204 whether or not it held one).
pub async fn release(ctx: &Context, namespace: &str, name: &str) -> Result<(), ConsumerApiError> {
    let url = consumer_url(&ctx.settings.job.engine_url, namespace, name)?;
    match call(ctx, Method::DELETE, url).await {
        Err(e) if predates_retention(&e) => {
            tracing::debug!("the engine predates event retention: no feed consumer to release");
            Ok(())
        }
        other => other.map(drop),
    }
}

/// Whether the engine answered 404 on the consumers' routes: a release older than retention
/// (a newer one answers them, 204 for a consumer it never recorded), which holds no record.
fn predates_retention(e: &ConsumerApiError) -> bool {
    matches!(e, ConsumerApiError::Refused { status, .. } if *status == reqwest::StatusCode::NOT_FOUND)
}

/// Every feed consumer the engine records (`GET /v1/feed-consumers` with the feed API token).
pub async fn list(ctx: &Context) -> Result<Vec<RecordedConsumer>, ConsumerApiError> {
    let url = api_url(&ctx.settings.job.engine_url, &["v1", "feed-consumers"])?;
    let response = match call(ctx, Method::GET, url).await {
        Err(e) if predates_retention(&e) => return Ok(vec![]),
        other => other?,
    };
    let body = response
        .bytes()
        .await
        .map_err(|e| ConsumerApiError::Unreachable(error_chain(&e)))?;
    decode_list(&body)
}

/// The consumers of a `GET /v1/feed-consumers` answer (a malformed `updatedAt` makes that one
/// consumer's time unknown, not the whole list unreadable).
fn decode_list(body: &[u8]) -> Result<Vec<RecordedConsumer>, ConsumerApiError> {
    let list: ConsumerList =
        serde_json::from_slice(body).map_err(|e| ConsumerApiError::Malformed(e.to_string()))?;
    Ok(list
        .consumers
        .into_iter()
        .map(|c| RecordedConsumer {
            updated_at: c.updated_at.and_then(|t| t.parse().ok()),
            name: c.name,
        })
        .collect())
}

/// Sends `method` to `url` with the feed API token (read anew each time, so that a rotated
/// token is picked up); the answer when its status is a success.
async fn call(
    ctx: &Context,
    method: Method,
    url: Url,
) -> Result<reqwest::Response, ConsumerApiError> {
    let token = super::read_token(&ctx.settings.engine_token_file)
        .map_err(|e| ConsumerApiError::Token(e.to_string()))?;
    let response = ctx
        .http
        .request(method, url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| ConsumerApiError::Unreachable(error_chain(&e)))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response
        .text()
        .await
        .ok()
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
        .map(|mut b| {
            crate::sync::naming::truncate_at_char(&mut b, MAX_QUOTED_BODY);
            b
        });
    Err(ConsumerApiError::Refused { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consumer_url_keeps_a_base_path_and_encodes_the_names() {
        let url = |base: &str| {
            consumer_url(base, "team-a", "analytics")
                .map(|u| u.to_string())
                .map_err(|e| e.to_string())
        };
        let want = "http://engine.ps.svc:8080/v1/feed-consumers/team-a/analytics";
        assert_eq!(url("http://engine.ps.svc:8080").as_deref(), Ok(want));
        assert_eq!(url("http://engine.ps.svc:8080/").as_deref(), Ok(want));
        assert_eq!(
            url("https://gw.example/engine/").as_deref(),
            Ok("https://gw.example/engine/v1/feed-consumers/team-a/analytics")
        );
        assert_eq!(
            consumer_url("http://e", "ns", "a/b")
                .map(|u| u.path().to_string())
                .ok(),
            Some("/v1/feed-consumers/ns/a%2Fb".to_string()),
            "a name can't step into another path"
        );
        for bad in ["not a url", "mailto:ops@example.com"] {
            assert!(
                matches!(
                    consumer_url(bad, "ns", "n"),
                    Err(ConsumerApiError::Url(u)) if u == bad
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_consumers_list_is_read_from_the_engines_answer() {
        let body = br#"{"consumers":[
            {"name":"team-a/analytics","afterSeq":7,"backfillWindowSeconds":60,"updatedAt":"2025-03-01T10:00:00Z"},
            {"name":"team-a/odd","afterSeq":0,"backfillWindowSeconds":0,"updatedAt":"yesterday"},
            {"name":"team-b/old","afterSeq":0,"backfillWindowSeconds":0}
        ],"retention":{"enabled":false}}"#;
        let listed = decode_list(body).map_err(|e| e.to_string());
        let want = |name: &str, at: Option<&str>| RecordedConsumer {
            name: name.into(),
            updated_at: at.map(|t| t.parse().unwrap()),
        };
        assert_eq!(
            listed,
            Ok(vec![
                want("team-a/analytics", Some("2025-03-01T10:00:00Z")),
                want("team-a/odd", None),
                want("team-b/old", None),
            ])
        );
        for bad in [&b"<html>gateway timeout</html>"[..], br#"{"retention":{}}"#] {
            assert!(
                matches!(decode_list(bad), Err(ConsumerApiError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_refusal_quotes_the_engine_answer_when_there_is_one() {
        let refused = |body: Option<&str>| {
            ConsumerApiError::Refused {
                status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
                body: body.map(String::from),
            }
            .to_string()
        };
        assert_eq!(
            refused(Some(r#"{"error":"store unavailable"}"#)),
            r#"the engine answered 503 Service Unavailable: {"error":"store unavailable"}"#
        );
        assert_eq!(refused(None), "the engine answered 503 Service Unavailable");
    }
}
