//! Starting an engine for tests: in-process on a random port, over a fresh SQLite store.

use std::path::PathBuf;

use profiles_sync::engine::{self, EngineConfig, RunningEngine, sources::Sources};

/// The write key of the test source.
pub const WRITE_KEY: &str = "wk_test_123";
/// The id of the test source.
pub const SOURCE_ID: &str = "src_test";
/// The feed API token.
pub const FEED_TOKEN: &str = "feed-token-test";

/// The write key of the test's client-side source, which fills in `context.ip`.
pub const BROWSER_WRITE_KEY: &str = "wk_test_browser";

/// The sources file the tests use: the test source, and a client-side one.
pub fn sources() -> Sources {
    Sources::from_yaml(&format!(
        "sources:\n  - {{id: {SOURCE_ID}, name: Test Site, slug: test-site, writeKey: {WRITE_KEY}}}\n  \
         - {{id: src_browser, name: Browser, slug: browser, writeKey: {BROWSER_WRITE_KEY}, \
         fillContextIp: true}}\n"
    ))
    .expect("test sources")
}

/// A running in-process engine and where its store lives.
pub struct TestEngine {
    /// The engine.
    pub engine: RunningEngine,
    /// Its base URL.
    pub base: String,
    /// The store URL.
    pub store_url: String,
    /// The store file.
    pub store_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Starts an engine with a queue of `capacity` requests.
pub async fn start(capacity: usize) -> TestEngine {
    start_with(capacity, 64).await
}

/// Starts an engine with a queue of `capacity` requests that reads and parses at most
/// `reading` requests at once.
pub async fn start_with(capacity: usize, reading: usize) -> TestEngine {
    start_configured(capacity, reading, std::time::Duration::from_secs(30)).await
}

/// [`start_with`], a request's body given at most `body_timeout` to arrive.
pub async fn start_configured(
    capacity: usize,
    reading: usize,
    body_timeout: std::time::Duration,
) -> TestEngine {
    start_options(Options {
        capacity,
        reading,
        body_timeout,
        ..Options::default()
    })
    .await
}

/// How [`start_options`] starts an engine.
pub struct Options {
    /// Requests the writer's queue holds.
    pub capacity: usize,
    /// Events the writer's queue holds.
    pub queue_events: usize,
    /// Requests read and parsed at once.
    pub reading: usize,
    /// How long a body may take to arrive.
    pub body_timeout: std::time::Duration,
    /// How long a request's headers may take to arrive.
    pub header_timeout: std::time::Duration,
    /// Store handles the feed API holds open at once.
    pub feed_readers: usize,
    /// Client connections open at once.
    pub max_connections: usize,
    /// How long one write may run before the engine says it is stalled.
    pub stall_timeout: std::time::Duration,
    /// The feed API's token (`None`: the feed API is closed).
    pub feed_token: Option<&'static str>,
    /// The store; a fresh SQLite file when unset.
    pub store_url: Option<String>,
    /// Event retention (off when unset).
    pub retention: Option<profiles_sync::engine::retention::Retention>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            capacity: 8,
            queue_events: profiles_sync::engine::DEFAULT_QUEUE_EVENTS,
            reading: 64,
            body_timeout: std::time::Duration::from_secs(30),
            header_timeout: std::time::Duration::from_secs(30),
            feed_readers: profiles_sync::engine::DEFAULT_FEED_READERS,
            max_connections: profiles_sync::engine::DEFAULT_MAX_CONNECTIONS,
            stall_timeout: std::time::Duration::from_secs(
                profiles_sync::engine::DEFAULT_STALL_TIMEOUT_SECS,
            ),
            feed_token: Some(FEED_TOKEN),
            store_url: None,
            retention: None,
        }
    }
}

impl Options {
    /// The engine's configuration on the store at `store`, on a free local port.
    pub fn config(&self, store: String) -> EngineConfig {
        EngineConfig {
            feed_token: self.feed_token.map(str::to_string),
            queue_capacity: self.capacity,
            queue_events: self.queue_events,
            reading_capacity: self.reading,
            body_timeout: self.body_timeout,
            header_timeout: self.header_timeout,
            feed_readers: self.feed_readers,
            max_connections: self.max_connections,
            stall_timeout: self.stall_timeout,
            retention: self.retention,
            ..EngineConfig::new(store, "127.0.0.1:0".parse().expect("addr"), sources())
        }
    }
}

/// Starts an engine as `o` says.
pub async fn start_options(o: Options) -> TestEngine {
    let dir = tempfile::tempdir().expect("temp dir");
    let store_path = dir.path().join("store.db");
    let store_url = o
        .store_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", store_path.display()));
    let engine = engine::start(o.config(store_url.clone()))
        .await
        .expect("start engine");
    engine.loaded().await;
    let base = format!("http://{}", engine.addr);
    TestEngine {
        engine,
        base,
        store_url,
        store_path,
        _dir: dir,
    }
}

/// The `/metrics` text of the engine at `base`.
pub async fn metrics(base: &str) -> reqwest::Result<String> {
    reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await
}

/// The answer the engine sends on `conn` by itself, its request's body left unsent: what
/// arrives up to the end of its JSON body (or the connection's end). Fails after 10 s, which
/// only bounds how long a broken engine makes a test wait.
pub async fn answer_without_the_body(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains('}') {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("no answer while the body was left unsent")
}
