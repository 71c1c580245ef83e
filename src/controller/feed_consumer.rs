//! The engine's record of a connection as a feed consumer (`/v1/feed-consumers/{ns}/{name}`).
//! Sync Jobs record how far their connection has loaded; with event retention on, the engine
//! keeps every event a recorded consumer has not loaded. A deleted connection would hold them
//! back for ever, so its cleanup removes the record — best effort: the engine may be gone (an
//! uninstall), and a deletion never waits on it.

use reqwest::Url;

use super::Context;

/// The longest engine answer quoted in an error (it becomes part of an Event's note).
const MAX_QUOTED_BODY: usize = 200;

/// Why a connection's feed-consumer record could not be removed. No variant carries the token.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
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
}

/// The URL of the feed consumer of connection `namespace`/`name` on the engine at
/// `engine_url` (a base path in `engine_url` is kept; the names are percent-encoded as path
/// segments).
pub fn consumer_url(engine_url: &str, namespace: &str, name: &str) -> Result<Url, ReleaseError> {
    let invalid = || ReleaseError::Url(engine_url.to_string());
    let mut url = Url::parse(engine_url).map_err(|_| invalid())?;
    url.path_segments_mut()
        .map_err(|()| invalid())?
        .pop_if_empty()
        .extend(["v1", "feed-consumers", namespace, name]);
    Ok(url)
}

/// Removes the feed consumer of connection `namespace`/`name` from the engine
/// (`DELETE /v1/feed-consumers/{namespace}/{name}` with the feed API token; the engine answers
/// 204 whether or not it held one).
pub async fn release(ctx: &Context, namespace: &str, name: &str) -> Result<(), ReleaseError> {
    let token = super::read_token(&ctx.settings.engine_token_file)
        .map_err(|e| ReleaseError::Token(e.to_string()))?;
    let url = consumer_url(&ctx.settings.job.engine_url, namespace, name)?;
    let response = ctx
        .http
        .delete(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| ReleaseError::Unreachable(causes(&e)))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
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
    Err(ReleaseError::Refused { status, body })
}

/// An error and its causes on one line (reqwest's own message leaves out why a connection
/// failed: refused, DNS, timeout).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
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
                    Err(ReleaseError::Url(u)) if u == bad
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_refusal_quotes_the_engine_answer_when_there_is_one() {
        let refused = |body: Option<&str>| {
            ReleaseError::Refused {
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
