//! Files the engine reads again when they change: the sources file and the feed token. In a
//! cluster both are mounted Secrets, which the kubelet updates in place (a new directory
//! behind a symlink); a new write key or a rotated token then works without a restart.
//!
//! A file is checked (one `stat`) every [`RELOAD_INTERVAL`], and at once whenever a request
//! presents a write key or a token the engine does not know: a client of a new source is
//! never refused because the engine had not looked yet. A file that changed but does not
//! parse is refused (logged and counted) and the engine keeps what it had.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use super::feed;
use super::http::AppState;
use super::sources::{PLACEHOLDER, Sources};

/// How often the watched files are checked for a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// What tells one content of a file from another without reading it: the file behind the
/// path's symlinks (a Secret volume's update replaces it), its size and its modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    /// The stamp of the file at `path`, following symlinks; `None` when it cannot be read
    /// (mid-update, or removed).
    pub fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// What a check of a watched file found.
pub enum Check<T> {
    /// Unchanged since it was last read (or last refused), or not watched.
    Same,
    /// Changed, and read: install it with [`Watched::install`] once it may be used.
    Changed(Stamp, T),
    /// Changed, and refused (why); the current value stays.
    Refused(String),
}

struct Current<T> {
    value: Arc<T>,
    /// The stamp of the file `value` was read from.
    read: Option<Stamp>,
    /// The stamp of the last content refused, so that it is refused (and logged) once.
    refused: Option<Stamp>,
}

/// A value read from a file, read again when the file changes.
pub struct Watched<T> {
    path: Option<PathBuf>,
    load: fn(&Path) -> Result<T, String>,
    current: RwLock<Current<T>>,
    /// Until when a request may not start a reload (set after one failed to put its content
    /// in use): a flood of unknown keys must not become a flood of store writes.
    held_back: std::sync::Mutex<Option<Instant>>,
}

impl<T> Watched<T> {
    /// `value`, read from `path` when it is `Some` (and then read again when it changes with
    /// `load`); a value of no file stays as it is. The file is read once more here, after its
    /// stamp is taken: a change since `value` was read is not missed.
    pub fn new(value: T, path: Option<PathBuf>, load: fn(&Path) -> Result<T, String>) -> Self {
        let mut read = path.as_deref().and_then(Stamp::of);
        let value = match path.as_deref().map(load) {
            Some(Ok(now)) => now,
            // Changed into something refused since: the first check refuses it and says so.
            Some(Err(_)) => {
                read = None;
                value
            }
            None => value,
        };
        Watched {
            path,
            load,
            current: RwLock::new(Current {
                value: Arc::new(value),
                read,
                refused: None,
            }),
            held_back: std::sync::Mutex::new(None),
        }
    }

    /// Whether the file differs from what was last read or refused (one `stat`; false when it
    /// is not watched or cannot be read).
    pub fn changed(&self) -> bool {
        let Some(stamp) = self.path.as_deref().and_then(Stamp::of) else {
            return false;
        };
        let c = self.current.read().unwrap_or_else(PoisonError::into_inner);
        c.read != Some(stamp) && c.refused != Some(stamp)
    }

    /// Keeps requests from starting a reload for `pause`.
    fn hold_back(&self, pause: Duration) {
        *self
            .held_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + pause);
    }

    /// Whether requests may not start a reload now.
    fn held_back(&self) -> bool {
        self.held_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| Instant::now() < until)
    }

    /// The value in use.
    pub fn get(&self) -> Arc<T> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .value,
        )
    }

    /// The file it is read from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reads the file again if it changed since it was last read or refused.
    pub fn check(&self) -> Check<T> {
        let Some(path) = &self.path else {
            return Check::Same;
        };
        let Some(stamp) = Stamp::of(path) else {
            // Gone or unreadable for now (a Secret volume swaps a symlink): keep the value and
            // look again next time.
            return Check::Same;
        };
        {
            let c = self.current.read().unwrap_or_else(PoisonError::into_inner);
            if c.read == Some(stamp) || c.refused == Some(stamp) {
                return Check::Same;
            }
        }
        match (self.load)(path) {
            // Read after the stamp: if the file changed meanwhile, the next check reads it again.
            Ok(value) => Check::Changed(stamp, value),
            Err(why) => {
                self.current
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .refused = Some(stamp);
                Check::Refused(why)
            }
        }
    }

    /// Puts a value [`Watched::check`] read in use.
    pub fn install(&self, stamp: Stamp, value: T) {
        let mut c = self.current.write().unwrap_or_else(PoisonError::into_inner);
        c.value = Arc::new(value);
        c.read = Some(stamp);
        c.refused = None;
    }
}

/// Reads a sources file ([`Sources::from_yaml`]).
pub fn load_sources(path: &Path) -> Result<Sources, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Sources::from_yaml(&text).map_err(|e| e.to_string())
}

/// Reads a feed token file: neither empty nor still the placeholder of `deploy/`.
pub fn load_feed_token(path: &Path) -> Result<String, String> {
    let token = feed::read_token_file(path).map_err(|why| format!("{}: {why}", path.display()))?;
    if token.starts_with(PLACEHOLDER) {
        return Err(format!(
            "{}: the feed token is still the {PLACEHOLDER} placeholder of deploy/: write a \
             secret value (deploy/base/secrets/feed-token)",
            path.display()
        ));
    }
    Ok(token)
}

/// How long requests may not start another reload of the sources after one could not record
/// them in the store (the periodic check still tries).
const HELD_BACK: Duration = Duration::from_secs(1);

/// Checks the sources file, and when it changed records its sources in the store before the
/// engine takes their write keys (an event is never stored for a source the store does not
/// list). True when new sources are in use. One reload runs at a time.
///
/// `by_request`: a request with an unknown key asks. It then costs one `stat` unless the file
/// changed, and starts no reload within a second of a failed one.
pub async fn reload_sources(state: &AppState, by_request: bool) -> bool {
    if by_request && (!state.sources.changed() || state.sources.held_back()) {
        return false;
    }
    let _one = state.reloading_sources.lock().await;
    match state.sources.check() {
        Check::Same => false,
        Check::Refused(why) => {
            refused(state, "sources", &why);
            false
        }
        Check::Changed(stamp, sources) => {
            let infos = sources.infos();
            let recorded = state
                .readers
                .read(move |store| {
                    for s in &infos {
                        store.upsert_source(s)?;
                    }
                    Ok(())
                })
                .await;
            match recorded {
                Ok(Ok(())) => {
                    tracing::info!(
                        sources = sources.len(),
                        "the sources file changed: its write keys are in use"
                    );
                    state.sources.install(stamp, sources);
                    applied(state, "sources");
                    true
                }
                Ok(Err(e)) => {
                    // Tried again on the next check: the stamp is not recorded.
                    state.sources.hold_back(HELD_BACK);
                    tracing::error!(error = %e, "the sources file changed, but its sources could not be recorded in the store; the previous write keys stay in use");
                    false
                }
                Err(e) => {
                    state.sources.hold_back(HELD_BACK);
                    tracing::error!(error = %e, "the sources file changed, but recording its sources failed; the previous write keys stay in use");
                    false
                }
            }
        }
    }
}

/// Checks the feed token file, and puts a changed token in use at once. True when it did.
pub fn reload_feed_token(state: &AppState) -> bool {
    let _one = state
        .reloading_token
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    match state.feed_token.check() {
        Check::Same => false,
        Check::Refused(why) => {
            refused(state, "feed_token", &why);
            false
        }
        Check::Changed(stamp, token) => {
            state.feed_token.install(stamp, token);
            tracing::info!("the feed token file changed: the new token is in use");
            applied(state, "feed_token");
            true
        }
    }
}

fn applied(state: &AppState, file: &str) {
    state
        .metrics
        .reloads
        .with_label_values(&[file, "applied"])
        .inc();
}

fn refused(state: &AppState, file: &str, why: &str) {
    tracing::error!(file, error = %why, "a watched file changed but was refused; the engine keeps what it had");
    state
        .metrics
        .reloads
        .with_label_values(&[file, "refused"])
        .inc();
}

/// Checks the watched files every [`RELOAD_INTERVAL`] until `stop` turns true.
pub fn spawn(state: Arc<AppState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    if state.sources.path().is_none() && state.feed_token.path().is_none() {
        return;
    }
    tokio::spawn(async move {
        let mut every = tokio::time::interval(RELOAD_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            reload_sources(&state, false).await;
            reload_feed_token(&state);
        }
    });
}
