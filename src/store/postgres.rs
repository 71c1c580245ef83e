//! The PostgreSQL store, for production and several engine replicas.

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

use super::codec::StateRead;
use super::codec::{
    self, IDENTIFIER_COLUMNS, PROFILE_COLUMNS, RawProfile, json_text, micros, state_read_sql,
};
use super::copy::copy_rows;
use super::dedupe::{self, Dedupe, IndexTx, RecentIds, Tuning};
use super::ingest::{LoadedState, ResolvedBatch, ingest_in_tx};
use super::retention::{
    self, Consumer, IdPruneStep, Keep, OldEvent, PruneStep, Pruned, PrunedName,
};
use super::schema::{
    Dialect, IDENTITY_TABLE, RETENTION_TABLE, SCHEMA_VERSION, STORE_ID_SQL, TRIGGER_COLUMNS, ddl,
    identity_ddl, retention_ddl, state_seq_ddl,
};
use super::{
    EventFilter, Feed, FeedRow, FlatEventRow, IngestSummary, PreparedEvent, Resolver, SourceInfo,
    Store, StoreError, WriteTx,
};
use crate::engine::DEFAULT_STALL_TIMEOUT_SECS;
use crate::identity::{IdentifierState, ProfileState, Rules};
use crate::warehouse::postgres::{server_keepalives, with_timeouts};

/// Connects with the URL's TLS settings, read as libpq reads them ([`StoreTls`]): `disable` in
/// clear; `prefer` and `require` encrypted through rustls without verifying the certificate —
/// except that `require` verifies it as `verify-ca` does when a CA file is named; `verify-ca`
/// (the certificate chains to the CA file's certificates) and `verify-full` (and names the
/// host; the system's CAs when no file is named). And the connection's timeouts
/// ([`with_timeouts`]): a database host that vanishes then fails the store's statements in
/// about a minute, and the engine answers 503 and reconnects; and the server's
/// ([`server_keepalives`]): an engine that vanishes in the middle of a write has its
/// transaction, and the head lock, ended by the server in about a minute.
fn connect(url: &str) -> Result<Client, StoreError> {
    let (url, tls) = StoreTls::split(url, std::env::var("PGSSLROOTCERT").ok())?;
    let mut config: postgres::Config = url.parse()?;
    with_timeouts(&mut config);
    with_send_timeout(&mut config);
    let mut client = match tls.verification()? {
        None => config.connect(NoTls)?,
        Some((mode, ca_cert)) => {
            let origin = match &tls.root {
                RootCert::File { path, named_by } => format!("{path} (named by {named_by})"),
                RootCert::System { .. } => "the system's CA certificates".to_string(),
            };
            let tls =
                crate::warehouse::postgres::tls_connector_from(mode, ca_cert.as_deref(), &origin)
                    .map_err(|e| StoreError::Tls(e.message))?;
            config.connect(tls)?
        }
    };
    server_keepalives(&mut client);
    Ok(client)
}

/// The CA certificates a store connection trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RootCert {
    /// The system's: `sslrootcert=system` (`explicit`), or no CA file named.
    System {
        /// Asked for by `sslrootcert=system` (libpq then insists on `verify-full`).
        explicit: bool,
    },
    /// The PEM file at `path` alone, named by the URL's `sslrootcert` or by `PGSSLROOTCERT`.
    File {
        /// The file.
        path: String,
        /// `sslrootcert` or `PGSSLROOTCERT`, for errors.
        named_by: &'static str,
    },
}

/// A store URL's TLS settings: `sslmode` — `disable`, `prefer` (the default), `require`, and
/// `verify-ca` and `verify-full`, which the driver does not read — and `sslrootcert`, a PEM file
/// of the CA certificates to trust (those alone, as libpq trusts them) or `system` for the
/// system's; without it in the URL, the file `PGSSLROOTCERT` names (libpq's variable; the chart
/// sets it to the Secret `store.postgres.caCertSecret`, which it mounts).
#[derive(Debug, PartialEq, Eq)]
struct StoreTls {
    /// `sslmode`'s last value.
    mode: crate::crd::SslMode,
    /// What to verify against.
    root: RootCert,
}

impl StoreTls {
    /// `url` with its `sslmode` the driver's (`disable`, `prefer`, or `require` for every mode
    /// that insists on TLS) and without `sslrootcert`, which the driver does not take, and the
    /// settings; `env_root_cert` is `PGSSLROOTCERT`'s value, used when the URL has no
    /// `sslrootcert`. The query starts at the first `?` after the user's password (which may
    /// hold one; the driver ends the password at the first `@`); empty parameters (`…&&…`, a
    /// `&` at the end) are dropped.
    fn split(url: &str, env_root_cert: Option<String>) -> Result<(String, StoreTls), StoreError> {
        use crate::crd::SslMode;
        let mut tls = StoreTls {
            mode: SslMode::Prefer,
            root: match env_root_cert.filter(|v| !v.is_empty()) {
                Some(v) if v == "system" => RootCert::System { explicit: true },
                Some(path) => RootCert::File {
                    path,
                    named_by: "PGSSLROOTCERT",
                },
                None => RootCert::System { explicit: false },
            },
        };
        // Where the driver ends the user and password: the first `@` after the scheme.
        let after_scheme = url.find("://").map_or(0, |i| i + 3);
        let after_password = url[after_scheme..]
            .find('@')
            .map_or(after_scheme, |at| after_scheme + at + 1);
        let (base, query) = match url[after_password..].find('?') {
            Some(q) => url.split_at(after_password + q),
            None => (url, ""),
        };
        let query = query.strip_prefix('?').unwrap_or(query);
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded = || {
                percent_encoding::percent_decode_str(value)
                    .decode_utf8()
                    .map(|v| v.into_owned())
                    .map_err(|_| {
                        StoreError::Tls(format!("the store URL's {key} is not UTF-8 text"))
                    })
            };
            match key {
                "sslmode" => {
                    let v = decoded()?;
                    tls.mode = serde_json::from_value(serde_json::Value::String(v.clone()))
                        .map_err(|_| {
                            StoreError::Tls(format!(
                                "the store URL's sslmode {v:?} is none of disable, prefer, \
                                 require, verify-ca, verify-full"
                            ))
                        })?;
                }
                "sslrootcert" => {
                    let v = decoded()?;
                    tls.root = match v.as_str() {
                        "" => RootCert::System { explicit: false },
                        "system" => RootCert::System { explicit: true },
                        _ => RootCert::File {
                            path: v,
                            named_by: "sslrootcert",
                        },
                    };
                }
                _ => kept.push(pair),
            }
        }
        kept.push(match tls.mode {
            SslMode::Disable => "sslmode=disable",
            SslMode::Prefer => "sslmode=prefer",
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "sslmode=require",
        });
        Ok((format!("{base}?{}", kept.join("&")), tls))
    }

    /// How to verify the server: `None` in clear; else the connector's mode and the PEM text
    /// of the CA file (`None` for the system's CAs). Refused as libpq refuses them:
    /// `sslrootcert=system` with a mode weaker than `verify-full`, and `verify-ca` against the
    /// system's CAs, which would take any publicly trusted certificate for any name.
    fn verification(&self) -> Result<Option<(crate::crd::SslMode, Option<String>)>, StoreError> {
        use crate::crd::SslMode;
        if self.root == (RootCert::System { explicit: true }) && self.mode != SslMode::VerifyFull {
            return Err(StoreError::Tls(format!(
                "sslrootcert=system needs sslmode=verify-full, not {}: the system's CAs \
                 vouch for names, so only a check of the host name makes them mean anything",
                serde_json::to_value(self.mode)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            )));
        }
        let mode = match (self.mode, &self.root) {
            (SslMode::Disable, _) => return Ok(None),
            // libpq: `require` with a CA file verifies the chain, as `verify-ca`.
            (SslMode::Require, RootCert::File { .. }) => SslMode::VerifyCa,
            (SslMode::VerifyCa, RootCert::System { .. }) => {
                return Err(StoreError::Tls(
                    "sslmode=verify-ca checks no host name, so against the system's CAs it \
                     would accept any publicly trusted certificate: name the CA file with \
                     sslrootcert (or PGSSLROOTCERT), or use verify-full"
                        .into(),
                ));
            }
            (mode, _) => mode,
        };
        let ca_cert = match (&self.root, mode) {
            (RootCert::File { path, named_by }, SslMode::VerifyCa | SslMode::VerifyFull) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| StoreError::Tls(format!("{path} (named by {named_by}): {e}")))?,
            ),
            _ => None,
        };
        Ok(Some((mode, ca_cert)))
    }
}

/// A `READ COMMITTED` transaction whatever the database's default: each statement sees what
/// committed before it, so that what waited for a lock reads what its holder wrote.
fn read_committed(client: &mut Client) -> Result<postgres::Transaction<'_>, StoreError> {
    Ok(client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::ReadCommitted)
        .start()?)
}

/// A read-only transaction that reads one snapshot (`REPEATABLE READ`), and takes no lock.
fn snapshot(client: &mut Client) -> Result<postgres::Transaction<'_>, StoreError> {
    Ok(client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?)
}

/// Sets `tcp_user_timeout` unless the URL does: sent data unacknowledged for as long as the
/// engine tolerates a stalled write ([`DEFAULT_STALL_TIMEOUT_SECS`], 120 s) ends the
/// connection, so that a server that vanishes while a write is being sent fails it then and the
/// engine reconnects, rather than waiting for the kernel's retransmissions (~15 min;
/// keepalives cover only an idle connection). Linux applies it to a server that stops reading
/// too: a server that pauses a write in the middle of its `COPY` of events (an I/O stall, a
/// trigger of its own) for that long has it fail and rolled back, when at the default stall
/// timeout the write would have been reported stalled (and the engine restarted) anyway. Lock
/// waits do not trip it: a COPY takes its table lock before any data is sent, and its keys
/// (`seq`s, under the head lock) conflict with no other writer's. A warehouse COPY gets none
/// ([`with_timeouts`]).
fn with_send_timeout(config: &mut postgres::Config) {
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(std::time::Duration::from_secs(DEFAULT_STALL_TIMEOUT_SECS));
    }
}

/// A store in a PostgreSQL database (its own tables in the connection's default schema).
pub struct PostgresStore {
    client: Client,
    resolver: Resolver,
    /// Where to reconnect to when the connection breaks during a commit.
    url: String,
    /// The server session of `client` (its process and when that started: after a failover
    /// or a restart the PID alone may be another session's), to end after its connection broke.
    backend: Backend,
    dedupe: Dedupe,
}

impl PostgresStore {
    /// Connects to `url` and creates the store's tables when missing.
    pub fn connect(url: &str, rules: Rules) -> Result<PostgresStore, StoreError> {
        let mut client = connect(url)?;
        let ready: bool = client
            .query_one("SELECT to_regclass('store_schema') IS NOT NULL", &[])?
            .get(0);
        let version: i64 = if ready {
            client
                .query_one("SELECT coalesce(max(version), 0) FROM store_schema", &[])?
                .get(0)
        } else {
            0
        };
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerFormat {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < SCHEMA_VERSION {
            create_or_migrate(&mut client)?;
        } else {
            let present: bool = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&RETENTION_TABLE])?
                .get(0);
            if !present {
                // Under the migrations' lock: replicas starting at once would race to create it.
                let mut tx = client.transaction()?;
                tx.execute("SELECT pg_advisory_xact_lock(7346501)", &[])?;
                tx.batch_execute(&retention_ddl(Dialect::Postgres))?;
                tx.commit()?;
            }
        }
        // (Its row is checked, not the table: a table left without it would fail every read
        // of the id.)
        let has_table: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&IDENTITY_TABLE])?
            .get(0);
        let identified = has_table
            && client
                .query_one(&format!("SELECT EXISTS ({STORE_ID_SQL})"), &[])?
                .get::<_, bool>(0);
        if !identified {
            // Under the migrations' lock, as above: one id for every replica (read committed,
            // so that a replica that waited for it sees the row the first one inserted).
            let mut tx = read_committed(&mut client)?;
            tx.execute("SELECT pg_advisory_xact_lock(7346501)", &[])?;
            tx.batch_execute(&identity_ddl(&crate::event::random_uuid()))?;
            tx.commit()?;
        }
        let backend = Backend::of(&mut client)?;
        Ok(PostgresStore {
            client,
            resolver: Resolver::new(rules),
            url: url.to_string(),
            backend,
            dedupe: Dedupe {
                committed: None,
                tuning: Tuning {
                    merge_chunk: dedupe::PG_MERGE_CHUNK,
                    ..Tuning::default()
                },
                oldest_run_top: None,
            },
        })
    }

    /// Test settings of the messageId dedupe.
    #[cfg(test)]
    pub(crate) fn set_dedupe(&mut self, tuning: Tuning) {
        self.dedupe.set_tuning(tuning);
    }

    /// Tests: the messageId dedupe's state between writes.
    #[cfg(test)]
    pub(crate) fn dedupe(&self) -> &Dedupe {
        &self.dedupe
    }

    /// Starts a write transaction: ingest into it, then commit. The first ingest takes the
    /// store's write lock, held until the transaction ends. `READ COMMITTED` whatever the
    /// database's default: a writer that waited for the lock must then read what the writer
    /// before it committed (under `REPEATABLE READ` or `SERIALIZABLE` its lock would fail with
    /// a serialization error instead, every time two replicas meet).
    pub fn begin_write(&mut self) -> Result<PostgresWrite<'_>, StoreError> {
        self.client
            .batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED")?;
        Ok(PostgresWrite {
            store: self,
            open: true,
            head: None,
            xid: None,
            accepted: false,
            recent: None,
            failed: false,
        })
    }
}

/// An open write transaction on a PostgreSQL store; dropped without [`PostgresWrite::commit`],
/// it rolls back.
pub struct PostgresWrite<'a> {
    store: &'a mut PostgresStore,
    /// Whether the transaction is still open (to roll back on drop).
    open: bool,
    head: Option<i64>,
    /// The transaction's id (`txid_current()`, read with the head's lock), to ask the server
    /// after a broken connection whether its commit landed. Not the `seq`s it wrote: once it
    /// rolled back, another replica writes from the same head and may put the same messageIds
    /// (a client's retry) at the same `seq`s.
    xid: Option<TxId>,
    /// Whether an ingest accepted an event (so that a broken COMMIT must be looked into).
    accepted: bool,
    /// The recent messageIds as of this transaction's writes (the store's, taken by the first
    /// ingest; given back by the commit, or as they were before it when it is dropped).
    recent: Option<RecentIds>,
    /// Whether an ingest failed: the transaction can then only be rolled back.
    failed: bool,
}

/// A write transaction as the server knows it: its id, and when the server that gave it started
/// (an id is only meaningful to that server process: one restarted after a crash, or a standby
/// promoted in its place, may hand the same id to another transaction).
#[derive(Debug)]
struct TxId {
    xid: i64,
    server_started: String,
}

/// The store's connection inside its open write transaction.
struct PgTx<'a> {
    /// The connection, as the dedupe index is reached through it.
    client: Pg<'a, Client>,
    /// The transaction's id, once the head is locked.
    xid: &'a mut Option<TxId>,
    /// The store's recent messageIds as of its last commit.
    committed: &'a mut Option<RecentIds>,
    /// The recent messageIds as of this transaction's writes.
    recent: &'a mut Option<RecentIds>,
    tuning: Tuning,
}

impl PostgresWrite<'_> {
    /// Resolves and writes `events` (see [`Store::ingest`]) without committing.
    pub fn ingest<E: Into<PreparedEvent>>(
        &mut self,
        events: Vec<E>,
    ) -> Result<IngestSummary, StoreError> {
        super::with_prepared(events, |events| self.ingest_prepared(events))
    }

    /// [`PostgresWrite::ingest`] of prepared events.
    pub fn ingest_prepared(
        &mut self,
        events: &[PreparedEvent],
    ) -> Result<IngestSummary, StoreError> {
        let store = &mut *self.store;
        let mut tx = PgTx {
            client: Pg(&mut store.client),
            xid: &mut self.xid,
            committed: &mut store.dedupe.committed,
            recent: &mut self.recent,
            tuning: store.dedupe.tuning,
        };
        let result = ingest_in_tx(&mut tx, &mut store.resolver, events, |t, since| {
            load_state(&mut *t.client.0, since)
        });
        let summary = result.inspect_err(|_| self.failed = true)?;
        self.head = Some(summary.head);
        self.accepted |= summary.accepted > 0;
        Ok(summary)
    }

    /// Commits what was ingested. When the connection breaks during COMMIT — which the server
    /// may or may not have applied — this asks on a new connection (which then replaces the
    /// broken one) whether the transaction committed: `Ok` when it did, the error when it did
    /// not (or that could not be told).
    ///
    /// After a failed ingest it rolls back instead and says so ([`StoreError::FailedWrite`]):
    /// PostgreSQL would turn that `COMMIT` into a silent rollback.
    pub fn commit(mut self) -> Result<(), StoreError> {
        if self.failed {
            // Dropping the write rolls it back.
            return Err(StoreError::FailedWrite);
        }
        self.open = false;
        let Err(e) = self.store.client.batch_execute("COMMIT") else {
            self.committed();
            return Ok(());
        };
        if !self.store.client.is_closed() {
            return Err(e.into());
        }
        // Answering "nothing stored" when it was would make a client's retry store the events
        // twice (those whose messageId the engine generated).
        if !self.accepted {
            // Nothing was accepted: whichever way it went, nothing new is stored. The broken
            // connection is replaced all the same (else the next write fails on it).
            if let Err(reconnect) = self.store.reconnect() {
                tracing::warn!(error = %reconnect, "could not reconnect after a broken COMMIT");
            }
            return Ok(());
        }
        let Some(tx) = self.xid.take() else {
            return Err(e.into());
        };
        match self.store.landed(&tx) {
            Ok(Some(true)) => {
                self.committed();
                Ok(())
            }
            Ok(Some(false)) => Err(e.into()),
            Ok(None) => {
                tracing::warn!(
                    "the server process of a connection broken during COMMIT is still running; \
                     answering as if the commit failed"
                );
                Err(e.into())
            }
            Err(check) => {
                tracing::warn!(error = %check, "could not check whether an interrupted commit landed");
                Err(e.into())
            }
        }
    }

    fn committed(&mut self) {
        if let Some(head) = self.head {
            self.store.resolver.committed(head);
        }
        if let Some(recent) = self.recent.take() {
            self.store.dedupe.committed = Some(recent);
        }
    }
}

impl Drop for PostgresWrite<'_> {
    fn drop(&mut self) {
        if self.open && !self.store.client.is_closed() {
            // An error here leaves the connection broken, which the next use reports.
            let _ = self.store.client.batch_execute("ROLLBACK");
        }
        // Not committed (or not known to be): the messageIds as they were before it.
        if let Some(recent) = self.recent.take() {
            self.store.dedupe.committed = Some(recent.rolled_back());
        }
    }
}

/// The resolver's state: profiles, identifiers and the Track event names seen.
/// Profiles from rows of [`PROFILE_COLUMNS`].
fn decode_profiles(rows: Vec<postgres::Row>) -> Result<Vec<ProfileState>, StoreError> {
    rows.into_iter()
        .map(|r| {
            RawProfile {
                segment_id: r.get(0),
                canonical_segment_id: r.get(1),
                created_rank: r.get(2),
                merges: r.get(3),
                traits: r.get(4),
                trait_times: r.get(5),
            }
            .decode()
        })
        .collect()
}

/// Identifiers from rows of [`IDENTIFIER_COLUMNS`].
fn decode_identifiers(rows: Vec<postgres::Row>) -> Result<Vec<IdentifierState>, StoreError> {
    rows.into_iter()
        .map(|r| codec::identifier(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// The state a resolver is built from: every profile and identifier, or (`since`) those a
/// write after that head changed; every Track event name.
fn load_state(
    tx: &mut impl postgres::GenericClient,
    since: Option<i64>,
) -> Result<LoadedState, StoreError> {
    // A full load scans the tables rather than going through the `updated_seq` index.
    let (changed, after) = match since {
        Some(since) => ("WHERE updated_seq > $1", since),
        None => ("WHERE $1::bigint IS NOT NULL", 0),
    };
    let profiles = decode_profiles(tx.query(
        &format!("SELECT {PROFILE_COLUMNS} FROM profiles {changed}"),
        &[&after],
    )?)?;
    let identifiers = decode_identifiers(tx.query(
        &format!("SELECT {IDENTIFIER_COLUMNS} FROM identifiers {changed}"),
        &[&after],
    )?)?;
    let names = tx
        .query("SELECT name FROM track_events ORDER BY name", &[])?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    Ok((profiles, identifiers, names))
}

impl WriteTx for PgTx<'_> {
    fn lock_head(&mut self) -> Result<i64, StoreError> {
        // The row lock is held until commit: the next writer waits here, so seqs are committed
        // in order and a feed reader never skips one that commits late.
        let row = self.client.0.query_one(
            "SELECT head, txid_current(), pg_postmaster_start_time()::text \
             FROM seq_counter WHERE id = 1 FOR UPDATE",
            &[],
        )?;
        *self.xid = Some(TxId {
            xid: row.get(1),
            server_started: row.get(2),
        });
        Ok(row.get(0))
    }

    fn dedupe(&mut self, head: i64) -> Result<(&mut RecentIds, &mut dyn IndexTx), StoreError> {
        let recent = dedupe::in_tx(
            self.recent,
            self.committed,
            &mut self.client,
            head,
            self.tuning,
        )?;
        Ok((recent, &mut self.client))
    }

    fn write(&mut self, b: &ResolvedBatch, head: i64) -> Result<(), StoreError> {
        write_rows(self.client.0, b, head)
    }
}

/// Writes the rows of a resolved batch and moves the head to `head`: the change logs and the
/// events by binary `COPY`, the profiles and identifiers the store holds no row of too, the
/// other state by upserts.
fn write_rows(tx: &mut Client, b: &ResolvedBatch, head: i64) -> Result<(), StoreError> {
    copy_rows(
        tx,
        "id_graph_updates",
        &format!("seq, segment_id, canonical_segment_id, {TRIGGER_COLUMNS}"),
        &b.id_graph,
        |row, r| {
            row.int(r.seq);
            row.text(&r.segment_id);
            row.text(&r.canonical_segment_id);
            row.trigger(&r.trigger);
        },
    )?;
    copy_rows(
        tx,
        "external_id_mapping_updates",
        &format!(
            "seq, id, external_id_hash, external_id_type, external_id_value, segment_id, {TRIGGER_COLUMNS}"
        ),
        &b.mappings,
        |row, r| {
            row.int(r.seq);
            row.text(&r.id);
            row.text(&r.external_id_hash);
            row.text(&r.external_id_type);
            row.text(&r.external_id_value);
            row.text(&r.segment_id);
            row.trigger(&r.trigger);
        },
    )?;
    copy_rows(
        tx,
        "profile_traits_updates",
        &format!("seq, segment_id, traits, {TRIGGER_COLUMNS}"),
        &b.traits,
        |row, r| {
            row.int(r.seq);
            row.text(&r.segment_id);
            row.text(&r.traits);
            row.trigger(&r.trigger);
        },
    )?;
    copy_rows(
        tx,
        "events",
        "seq, message_id, type, event, segment_id, source_id, timestamp_us, received_at_us, payload",
        &b.events,
        |row, r| {
            let t = &r.event.trigger;
            row.int(r.seq);
            row.text(&t.event_id);
            row.text(t.event_type.as_str());
            row.opt_text(r.event.event.as_deref());
            row.text(&r.segment_id);
            row.text(&t.source_id);
            row.int(micros(t.timestamp));
            row.int(micros(t.received_at));
            row.text(r.event.payload.as_str());
        },
    )?;
    // Profiles and identifiers the store holds no row of are COPYed (each stamped with the
    // write's head, `updated_seq`, for other writers); the others upserted. A new one that is
    // there after all (written behind the graph's back) fails the write with a unique
    // violation, a refusal of the data: the writer reloads its graph and writes them again.
    let (new, known) = b
        .state
        .profiles
        .split_at(b.state.new_profiles.min(b.state.profiles.len()));
    copy_rows(
        tx,
        "profiles",
        "segment_id, canonical_segment_id, created_rank, merges, traits, trait_times, updated_seq",
        new,
        |row, p| {
            row.text(&p.segment_id);
            row.text(&p.canonical_segment_id);
            row.int(i64::try_from(p.created_rank).unwrap_or(i64::MAX));
            row.int(i64::from(p.merges));
            row.text(&json_text(&p.traits));
            row.text(&json_text(&p.trait_times));
            row.int(head);
        },
    )?;
    if !known.is_empty() {
        let (mut ids, mut canon, mut ranks, mut merges, mut traits, mut times) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for p in known {
            ids.push(p.segment_id.as_str());
            canon.push(p.canonical_segment_id.as_str());
            ranks.push(i64::try_from(p.created_rank).unwrap_or(i64::MAX));
            merges.push(i64::from(p.merges));
            traits.push(json_text(&p.traits));
            times.push(json_text(&p.trait_times));
        }
        tx.execute(
            "INSERT INTO profiles (segment_id, canonical_segment_id, created_rank, merges, traits, trait_times, updated_seq)
             SELECT *, $7::bigint FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[])
             ON CONFLICT (segment_id) DO UPDATE SET canonical_segment_id = excluded.canonical_segment_id,
               created_rank = excluded.created_rank, merges = excluded.merges, traits = excluded.traits, trait_times = excluded.trait_times,
               updated_seq = excluded.updated_seq",
            &[&ids, &canon, &ranks, &merges, &traits, &times, &head],
        )?;
    }
    let (new, known) = b
        .state
        .identifiers
        .split_at(b.state.new_identifiers.min(b.state.identifiers.len()));
    copy_rows(
        tx,
        "identifiers",
        "id_type, value, segment_id, first_seen_us, last_seen_us, updated_seq",
        new,
        |row, i| {
            row.text(&i.id_type);
            row.text(&i.value);
            row.text(&i.segment_id);
            row.int(micros(i.first_seen));
            row.int(micros(i.last_seen));
            row.int(head);
        },
    )?;
    if !known.is_empty() {
        let (mut types, mut values, mut segs, mut first, mut last) =
            (vec![], vec![], vec![], vec![], vec![]);
        for i in known {
            types.push(i.id_type.as_str());
            values.push(i.value.as_str());
            segs.push(i.segment_id.as_str());
            first.push(micros(i.first_seen));
            last.push(micros(i.last_seen));
        }
        tx.execute(
            "INSERT INTO identifiers (id_type, value, segment_id, first_seen_us, last_seen_us, updated_seq)
             SELECT *, $6::bigint FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])
             ON CONFLICT (id_type, value) DO UPDATE SET segment_id = excluded.segment_id, first_seen_us = excluded.first_seen_us,
               last_seen_us = excluded.last_seen_us, updated_seq = excluded.updated_seq",
            &[&types, &values, &segs, &first, &last, &head],
        )?;
    }
    if !b.new_track_names.is_empty() {
        tx.execute(
            "INSERT INTO track_events (name) SELECT * FROM unnest($1::text[]) ON CONFLICT (name) DO NOTHING",
            &[&b.new_track_names],
        )?;
    }
    tx.execute("UPDATE seq_counter SET head = $1 WHERE id = 1", &[&head])?;
    Ok(())
}

/// The dedupe index's statements on a connection inside a transaction (`store::dedupe`).
struct Pg<'a, C>(&'a mut C);

impl<C: postgres::GenericClient> IndexTx for Pg<'_, C> {
    fn index_row(&mut self) -> Result<Option<[i64; 3]>, StoreError> {
        Ok(self
            .0
            .query_opt(dedupe::INDEX_ROW_SQL, &[])?
            .map(|r| [r.get(0), r.get(1), r.get(2)]))
    }

    fn create_index_row(&mut self, key0: i64, key1: i64) -> Result<(), StoreError> {
        self.0
            .execute(dedupe::CREATE_INDEX_ROW_SQL, &[&key0, &key1])?;
        Ok(())
    }

    fn events_after(
        &mut self,
        after: i64,
        limit: i64,
        f: &mut dyn FnMut(i64, &str),
    ) -> Result<(), StoreError> {
        // Streamed, as the index below: up to a million rows are never held whole.
        let mut rows = self.0.query_raw(dedupe::EVENTS_AFTER_SQL, [after, limit])?;
        while let Some(r) = rows.next()? {
            f(r.get(0), r.get(1));
        }
        Ok(())
    }

    fn index_hashes(&mut self, f: &mut dyn FnMut(i64)) -> Result<(), StoreError> {
        // Streamed: a large index is never held whole.
        let mut rows = self
            .0
            .query_raw(dedupe::INDEX_HASHES_SQL, std::iter::empty::<i64>())?;
        while let Some(r) = rows.next()? {
            f(r.get(0));
        }
        Ok(())
    }

    fn entries_after(
        &mut self,
        after: [i64; 3],
        limit: i64,
        f: &mut dyn FnMut([i64; 3]),
    ) -> Result<(), StoreError> {
        let [run, hash, seq] = after;
        let mut rows = self
            .0
            .query_raw(dedupe::ENTRIES_AFTER_SQL, [run, hash, seq, limit])?;
        while let Some(r) = rows.next()? {
            f([r.get(0), r.get(1), r.get(2)]);
        }
        Ok(())
    }

    fn runs(&mut self) -> Result<Vec<(i64, i64)>, StoreError> {
        let rows = self.0.query(dedupe::RUNS_SQL, &[])?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn probe(
        &mut self,
        hashes: &[i64],
        runs: &[i64],
        seqs: &mut Vec<i64>,
    ) -> Result<(), StoreError> {
        // Both lists: the runs lead the index's key.
        let rows = self.0.query(
            "SELECT seq FROM message_id_entries WHERE run = ANY($1) AND hash = ANY($2)",
            &[&runs, &hashes],
        )?;
        seqs.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
        Ok(())
    }

    fn ids_at(&mut self, seqs: &[i64], f: &mut dyn FnMut(String)) -> Result<(), StoreError> {
        for r in self.0.query(
            "SELECT message_id FROM events WHERE seq = ANY($1)",
            &[&seqs],
        )? {
            f(r.get(0));
        }
        Ok(())
    }

    fn add_entries(&mut self, run: i64, sorted: &[(i64, i64)]) -> Result<(), StoreError> {
        copy_rows(
            self.0,
            "message_id_entries",
            "run, hash, seq",
            sorted,
            |row, &(hash, seq)| {
                row.int(run);
                row.int(hash);
                row.int(seq);
            },
        )
    }

    fn exec(&mut self, sql: &str, params: &[i64]) -> Result<u64, StoreError> {
        let params: Vec<&(dyn postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn postgres::types::ToSql + Sync))
            .collect();
        Ok(self.0.execute(sql, &params)?)
    }

    fn pairs(&mut self, sql: &str, params: &[i64]) -> Result<Vec<(i64, i64)>, StoreError> {
        let params: Vec<&(dyn postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn postgres::types::ToSql + Sync))
            .collect();
        Ok(self
            .0
            .query(sql, &params)?
            .into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, postgres::Error>>()?)
    }
}

impl<C: postgres::GenericClient> retention::PruneTx for Pg<'_, C> {
    fn oldest(
        &mut self,
        after: i64,
        through: i64,
        limit: i64,
    ) -> Result<Vec<OldEvent>, StoreError> {
        Ok(self
            .0
            .query(retention::OLDEST_EVENTS_SQL, &[&after, &through, &limit])?
            .into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
            .collect::<Result<_, postgres::Error>>()?)
    }

    fn note_pruned(
        &mut self,
        event_type: &str,
        event: &str,
        received_us: i64,
    ) -> Result<(), StoreError> {
        self.0.execute(
            retention::NOTE_PRUNED_NAME_SQL,
            &[&event_type, &event, &received_us],
        )?;
        Ok(())
    }
}

/// Creates the store's tables, or brings an older store's up to [`SCHEMA_VERSION`], in one
/// transaction under an advisory lock (several replicas may start at once).
///
/// Version 1 kept messageIds unique with a constraint on `events`; version 2 drops it and
/// indexes the stored events in `message_ids` instead (`store::dedupe`), which version 4 moves
/// into the first run of `message_id_entries` (an engine of version 3 or older still running
/// then fails the writes that need the index, and its clients retry); version 5 collates the
/// text keys byte by byte ([`collate_keys_bytewise`]).
fn create_or_migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(7346501)", &[])?;
    let versioned: bool = tx
        .query_one("SELECT to_regclass('store_schema') IS NOT NULL", &[])?
        .get(0);
    let version: i64 = if versioned {
        tx.query_one("SELECT coalesce(max(version), 0) FROM store_schema", &[])?
            .get(0)
    } else {
        0
    };
    if version >= SCHEMA_VERSION {
        return Ok(tx.commit()?);
    }
    // An older engine may be writing (a rolling upgrade): wait for its write to end and keep
    // the next out by taking the head first, as every writer does. Altering the tables one by
    // one instead could take one the writer needs while waiting for one it holds: a deadlock
    // that PostgreSQL breaks by failing one side.
    let existing: bool = tx
        .query_one("SELECT to_regclass('seq_counter') IS NOT NULL", &[])?
        .get(0);
    if existing {
        tx.batch_execute("LOCK TABLE seq_counter IN EXCLUSIVE MODE")?;
    }
    // The unique constraint version 1 put on events.message_id, if any.
    let unique: Option<String> = tx
        .query_opt(
            "SELECT c.conname::text FROM pg_constraint c
               JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
              WHERE c.conrelid = to_regclass('events') AND c.contype = 'u'
                AND a.attname = 'message_id' AND cardinality(c.conkey) = 1",
            &[],
        )?
        .map(|r| r.get(0));
    if let Some(name) = &unique {
        tx.batch_execute(&format!(
            "ALTER TABLE events DROP CONSTRAINT \"{}\"",
            name.replace('"', "\"\"")
        ))?;
    }
    tx.batch_execute(&ddl(Dialect::Postgres))?;
    tx.batch_execute(&state_seq_ddl(Dialect::Postgres, |_| Ok(true))?)?;
    collate_keys_bytewise(&mut tx)?;
    let legacy_index: bool = tx
        .query_one("SELECT to_regclass('message_ids') IS NOT NULL", &[])?
        .get(0);
    if legacy_index {
        tx.batch_execute(dedupe::MOVE_LEGACY_INDEX_SQL)?;
    }
    let head: i64 = tx
        .query_one("SELECT head FROM seq_counter WHERE id = 1", &[])?
        .get(0);
    if !dedupe::exists(&mut Pg(&mut tx))? {
        dedupe::create(&mut Pg(&mut tx), head)?;
    }
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS store_schema (version BIGINT PRIMARY KEY);
         INSERT INTO store_schema VALUES ({SCHEMA_VERSION}) ON CONFLICT DO NOTHING;"
    ))?;
    Ok(tx.commit()?)
}

/// The text key columns that version 5 collates byte by byte (`schema::key_text`), by table.
const BYTEWISE_KEYS: &[(&str, &[&str])] = &[
    ("profiles", &["segment_id"]),
    ("identifiers", &["id_type", "value"]),
    ("track_events", &["name"]),
];

/// Whether column `$2` of table `$1` compares byte by byte: its collation is `"C"`, or it is the
/// database's default and that is `C` or `POSIX` from the C library (`datlocprovider`, from
/// PostgreSQL 15 on, reads as libc before).
const BYTEWISE_COLUMN_SQL: &str = "
    SELECT a.attcollation = (SELECT oid FROM pg_collation
                              WHERE collname = 'C' AND collnamespace = 'pg_catalog'::regnamespace)
        OR (a.attcollation = (SELECT oid FROM pg_collation WHERE collname = 'default')
            AND (SELECT d.datcollate IN ('C', 'POSIX')
                        AND coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') = 'c'
                   FROM pg_database d WHERE d.datname = current_database()))
      FROM pg_attribute a
     WHERE a.attrelid = to_regclass($1) AND a.attname = $2";

/// Version 5: gives the key columns of a store created before it the `"C"` collation, where
/// they do not compare byte by byte already ([`BYTEWISE_COLUMN_SQL`]: in a `C` database they
/// do, and are left alone). Each table's primary key is rebuilt, once, under the head lock the
/// migration holds; the rows are not rewritten.
fn collate_keys_bytewise(tx: &mut postgres::Transaction<'_>) -> Result<(), StoreError> {
    for (table, columns) in BYTEWISE_KEYS {
        let mut alter = vec![];
        for column in *columns {
            let bytewise: bool = tx.query_one(BYTEWISE_COLUMN_SQL, &[table, column])?.get(0);
            if !bytewise {
                alter.push(format!("ALTER COLUMN {column} TYPE text COLLATE \"C\""));
            }
        }
        if !alter.is_empty() {
            tx.batch_execute(&format!("ALTER TABLE {table} {}", alter.join(", ")))?;
        }
    }
    Ok(())
}

impl PostgresStore {
    /// Whether transaction `tx` committed (`txid_status`), asked on a new connection that then
    /// replaces the broken one. The server process of the broken connection may still be
    /// committing: it is ended first (waiting up to 10 s; a commit in progress completes, an open
    /// transaction rolls back), so the answer is final; `None` when that could not be ensured,
    /// when the server no longer knows the transaction, or when the server is not the one that
    /// ran it (restarted after a crash, or a standby promoted): transaction ids are not durable
    /// there, and the id may already be another transaction's, committed.
    fn landed(&mut self, tx: &TxId) -> Result<Option<bool>, StoreError> {
        let mut client = connect(&self.url)?;
        let started: String = client
            .query_one("SELECT pg_postmaster_start_time()::text", &[])?
            .get(0);
        if started != tx.server_started {
            tracing::warn!(
                "the store's server restarted (or another took over) since the broken COMMIT began: \
                 whether it landed cannot be told"
            );
            self.use_client(client)?;
            return Ok(None);
        }
        if !self.end_old_session(&mut client)? {
            return Ok(None);
        }
        let status: Option<String> = client
            .query_one("SELECT txid_status($1)", &[&tx.xid])?
            .get(0);
        self.use_client(client)?;
        Ok(match status.as_deref() {
            Some("committed") => Some(true),
            Some("aborted") => Some(false),
            _ => None,
        })
    }

    /// Replaces the broken connection with a new one, ending its server session first where it
    /// can: a COMMIT that never reached the server leaves it idle in its transaction, holding the
    /// head lock (every replica's writes would wait for the server to notice, a minute or more).
    fn reconnect(&mut self) -> Result<(), StoreError> {
        let mut client = connect(&self.url)?;
        // Best effort (PostgreSQL 13 has no wait argument; the role may not end sessions): the
        // new connection is taken either way.
        if let Err(e) = self.end_old_session(&mut client) {
            tracing::warn!(error = %e, "could not end the session of a connection broken during COMMIT");
        }
        self.use_client(client)
    }

    /// Ends the server session of the broken connection, through `client` (waiting up to 10 s:
    /// a commit in progress completes, an open transaction rolls back); whether it is gone.
    fn end_old_session(&self, client: &mut Client) -> Result<bool, StoreError> {
        let Backend { pid, started } = &self.backend;
        client.execute(
            &format!("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE pid = $1 AND {BACKEND_START} = $2"),
            &[pid, started],
        )?;
        Ok(client
            .query_opt(
                &format!("SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND {BACKEND_START} = $2"),
                &[pid, started],
            )?
            .is_none())
    }

    /// Makes `client` the store's connection.
    fn use_client(&mut self, mut client: Client) -> Result<(), StoreError> {
        self.backend = Backend::of(&mut client)?;
        self.client = client;
        Ok(())
    }
}

/// `pg_stat_activity.backend_start` as text in UTC (the same whatever a session's time zone).
const BACKEND_START: &str = "to_char(backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')";

/// A server session: its process ID and when that process started.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Backend {
    pid: i32,
    started: String,
}

impl Backend {
    /// The session of `client`.
    fn of(client: &mut Client) -> Result<Backend, StoreError> {
        let row = client.query_one(
            &format!(
                "SELECT pid, {BACKEND_START} FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ),
            &[],
        )?;
        Ok(Backend {
            pid: row.get(0),
            started: row.get(1),
        })
    }
}

impl PostgresStore {
    /// The events of `filter` after `after`, each decoded by `decode`.
    fn read_events<T>(
        &mut self,
        filter: &EventFilter,
        after: i64,
        limit: usize,
        decode: impl Fn(codec::StoredEvent<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let base =
            "SELECT seq, segment_id, source_id, received_at_us, payload FROM events WHERE seq > $1";
        let rows = match filter {
            EventFilter::All => self
                .client
                .query(&format!("{base} ORDER BY seq LIMIT $2"), &[&after, &limit])?,
            EventFilter::Type(t) => self.client.query(
                &format!("{base} AND type = $3 ORDER BY seq LIMIT $2"),
                &[&after, &limit, &t.as_str()],
            )?,
            EventFilter::TrackNames(names) => self.client.query(
                &format!("{base} AND type = 'track' AND event = ANY($3) ORDER BY seq LIMIT $2"),
                &[&after, &limit, names],
            )?,
        };
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(decode(codec::StoredEvent {
                seq: r.get(0),
                segment_id: r.get(1),
                source_id: r.get(2),
                received_at_us: r.get(3),
                payload: r.get(4),
            })?);
        }
        Ok(out)
    }
}

impl Store for PostgresStore {
    fn ingest_prepared(&mut self, events: &[PreparedEvent]) -> Result<IngestSummary, StoreError> {
        let mut write = self.begin_write()?;
        let summary = write.ingest_prepared(events)?;
        write.commit()?;
        Ok(summary)
    }

    fn read_feed(
        &mut self,
        feed: &Feed,
        after: i64,
        limit: usize,
    ) -> Result<Vec<FeedRow>, StoreError> {
        let Feed::Events(filter) = feed else {
            let sql = codec::change_log_sql(feed)
                .ok_or_else(|| StoreError::UnknownTable(format!("{feed:?}")))?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            return self
                .client
                .query(sql.as_str(), &[&after, &limit])?
                .iter()
                .map(|r| codec::change_log_row(feed, r))
                .collect();
        };
        self.read_events(filter, after, limit, |e| e.feed_row())
    }

    fn read_flat_events(
        &mut self,
        filter: &EventFilter,
        after: i64,
        limit: usize,
    ) -> Result<Vec<FlatEventRow>, StoreError> {
        self.read_events(filter, after, limit, |e| e.flat_row())
    }

    fn store_id(&mut self) -> Result<String, StoreError> {
        Ok(self.client.query_one(STORE_ID_SQL, &[])?.get(0))
    }

    fn head_seq(&mut self) -> Result<i64, StoreError> {
        Ok(self
            .client
            .query_one("SELECT head FROM seq_counter WHERE id = 1", &[])?
            .get(0))
    }

    fn track_event_names(&mut self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .client
            .query("SELECT name FROM track_events ORDER BY name", &[])?
            .into_iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn load_state(&mut self) -> Result<(Vec<ProfileState>, Vec<IdentifierState>), StoreError> {
        // One snapshot for both tables: under `READ COMMITTED` each read would take its own,
        // and a write committed between them would give profiles and identifiers that disagree.
        let mut tx = snapshot(&mut self.client)?;
        let (p, i, _) = load_state(&mut tx, None)?;
        tx.commit()?;
        Ok((p, i))
    }

    fn read_profiles(
        &mut self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ProfileState>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = state_read_sql(StateRead::Profiles, after.is_some(), "$");
        let rows = match after {
            Some(after) => self.client.query(&sql, &[&after, &limit])?,
            None => self.client.query(&sql, &[&limit])?,
        };
        decode_profiles(rows)
    }

    fn profiles_by_id(&mut self, ids: &[&str]) -> Result<Vec<ProfileState>, StoreError> {
        decode_profiles(self.client.query(
            &format!("SELECT {PROFILE_COLUMNS} FROM profiles WHERE segment_id = ANY($1)"),
            &[&ids],
        )?)
    }

    fn read_identifiers(
        &mut self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<IdentifierState>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = state_read_sql(StateRead::Identifiers, after.is_some(), "$");
        let rows = match after {
            Some((t, v)) => self.client.query(&sql, &[&t, &v, &limit])?,
            None => self.client.query(&sql, &[&limit])?,
        };
        decode_identifiers(rows)
    }

    fn upsert_source(&mut self, s: &SourceInfo) -> Result<(), StoreError> {
        self.client.execute(
            "INSERT INTO sources (id, name, slug) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET name = excluded.name, slug = excluded.slug",
            &[&s.id, &s.name, &s.slug],
        )?;
        Ok(())
    }

    fn sources(&mut self) -> Result<Vec<SourceInfo>, StoreError> {
        Ok(self
            .client
            .query("SELECT id, name, slug FROM sources ORDER BY id", &[])?
            .into_iter()
            .map(|r| SourceInfo {
                id: r.get(0),
                name: r.get(1),
                slug: r.get(2),
            })
            .collect())
    }

    fn warm_up(&mut self) -> Result<(), StoreError> {
        let tuning = self.dedupe.tuning;
        // One snapshot for every read, and no lock: other replicas keep writing meanwhile.
        let mut tx = snapshot(&mut self.client)?;
        let head: i64 = tx
            .query_one("SELECT head FROM seq_counter WHERE id = 1", &[])?
            .get(0);
        let (profiles, identifiers, names) = load_state(&mut tx, None)?;
        // After a failed write the ids are as before it: caught up, not read again.
        let mut recent =
            RecentIds::at_head(self.dedupe.committed.take(), &mut Pg(&mut tx), head, tuning)?;
        recent.follow_extent(&mut Pg(&mut tx))?;
        tx.commit()?;
        self.resolver.restore(profiles, identifiers, names, head);
        self.dedupe.committed = Some(recent);
        Ok(())
    }

    fn live_profiles(&self) -> usize {
        self.resolver.graph().profile_count()
    }

    fn event_count(&mut self) -> Result<i64, StoreError> {
        Ok(self
            .client
            .query_one("SELECT count(*) FROM events", &[])?
            .get(0))
    }

    fn event_seq_since(
        &mut self,
        received_at: crate::event::Timestamp,
    ) -> Result<Option<i64>, StoreError> {
        Ok(self
            .client
            .query_one(
                "SELECT min(seq) FROM events WHERE received_at_us >= $1",
                &[&micros(received_at)],
            )?
            .get(0))
    }

    fn set_consumer(&mut self, c: &Consumer) -> Result<(), StoreError> {
        // Under the horizon's lock: a deletion step in progress (another replica's, with the
        // consumers it read before this record) commits first, so that the horizon read
        // after this returns shows what it deleted.
        let mut tx = read_committed(&mut self.client)?;
        tx.execute(retention::TOUCH_HORIZON_SQL, &[])?;
        tx.execute(
            retention::SET_CONSUMER_SQL,
            &[
                &c.name,
                &c.after_seq,
                &c.window_seconds,
                &micros(c.updated_at),
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn remove_consumer(&mut self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .client
            .execute(retention::REMOVE_CONSUMER_SQL, &[&name])?
            > 0)
    }

    fn consumers(&mut self) -> Result<Vec<Consumer>, StoreError> {
        self.client
            .query(retention::CONSUMERS_SQL, &[])?
            .into_iter()
            .map(|r| {
                Ok(Consumer {
                    name: r.get(0),
                    after_seq: r.get(1),
                    window_seconds: r.get(2),
                    updated_at: codec::timestamp("feed_consumers", r.get(3))?,
                })
            })
            .collect()
    }

    fn pruned(&mut self) -> Result<Pruned, StoreError> {
        let r = self.client.query_one(retention::PRUNED_SQL, &[])?;
        let mut pruned = Pruned::from_row(r.get(0), r.get(1));
        pruned.by_name = self
            .client
            .query(retention::PRUNED_NAMES_SQL, &[])?
            .into_iter()
            .map(|r| PrunedName {
                event_type: r.get(0),
                event: r.get(1),
                max_received_at_us: r.get(2),
            })
            .collect();
        Ok(pruned)
    }

    fn prune_events(&mut self, keep: &Keep, max: usize) -> Result<PruneStep, StoreError> {
        // READ COMMITTED whatever the database's default: a step that waited for the horizon
        // must read the consumers recorded meanwhile (a snapshot from before the wait would
        // delete what a lowered record holds).
        let mut tx = read_committed(&mut self.client)?;
        let step = retention::prune_in(&mut Pg(&mut tx), " FOR UPDATE", keep, max)?;
        tx.commit()?;
        Ok(step)
    }

    fn prune_message_ids(&mut self, max: usize) -> Result<IdPruneStep, StoreError> {
        // READ COMMITTED: the index's count is moved by writers meanwhile (each adds to it).
        let mut tx = read_committed(&mut self.client)?;
        let (step, known) =
            retention::prune_ids_in(&mut Pg(&mut tx), self.dedupe.oldest_run_top, max)?;
        tx.commit()?;
        self.dedupe.oldest_run_top = known;
        Ok(step)
    }
}

#[cfg(test)]
mod tests {
    use crate::test_pg as pg;

    /// A store URL's TLS settings are read as libpq reads them: the driver gets `sslmode`
    /// `disable`, `prefer` or `require` (for every mode insisting on TLS) and no `sslrootcert`;
    /// `sslrootcert` (percent-decoded) or else `PGSSLROOTCERT` names the CA file, `system` the
    /// system's CAs; the last `sslmode` wins; the query starts after the password, whatever it
    /// holds; empty parameters are dropped; other parameters stay, in order.
    #[test]
    fn store_urls_give_up_the_tls_parameters_the_driver_does_not_read() {
        use super::{RootCert, StoreTls};
        use crate::crd::SslMode;
        let split = |url: &str, env: Option<&str>| {
            StoreTls::split(url, env.map(String::from)).map_err(|e| e.to_string())
        };
        let file = |path: &str, named_by| RootCert::File {
            path: path.into(),
            named_by,
        };
        let none = RootCert::System { explicit: false };
        let tls = |mode, root| StoreTls { mode, root };
        let base = "postgres://u:p%40ss@db:5432/profiles";
        assert_eq!(
            split(base, None),
            Ok((
                format!("{base}?sslmode=prefer"),
                tls(SslMode::Prefer, none.clone())
            ))
        );
        assert_eq!(
            split(
                &format!(
                    "{base}?connect_timeout=5&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20x.crt&application_name=e&"
                ),
                None
            ),
            Ok((
                format!("{base}?connect_timeout=5&application_name=e&sslmode=require"),
                tls(SslMode::VerifyFull, file("/etc/ca x.crt", "sslrootcert"))
            ))
        );
        // PGSSLROOTCERT when the URL names no file; `system` in either means the system's CAs.
        assert_eq!(
            split(&format!("{base}?sslmode=verify-ca"), Some("/etc/ca.crt")),
            Ok((
                format!("{base}?sslmode=require"),
                tls(SslMode::VerifyCa, file("/etc/ca.crt", "PGSSLROOTCERT"))
            ))
        );
        assert_eq!(
            split(
                &format!("{base}?sslmode=verify-full&&sslrootcert=system"),
                Some("/etc/ca.crt")
            ),
            Ok((
                format!("{base}?sslmode=require"),
                tls(SslMode::VerifyFull, RootCert::System { explicit: true })
            ))
        );
        assert_eq!(
            split(&format!("{base}?sslmode=verify-full&sslmode=disable"), None),
            Ok((
                format!("{base}?sslmode=disable"),
                tls(SslMode::Disable, none.clone())
            ))
        );
        // A password holding `?` (and `&`, `=`) is not a query.
        let odd = "postgres://u:p?a&sslmode=x@db/profiles";
        assert_eq!(
            split(&format!("{odd}?sslmode=verify-full"), None),
            Ok((
                format!("{odd}?sslmode=require"),
                tls(SslMode::VerifyFull, none.clone())
            ))
        );
        let e = split(&format!("{base}?sslmode=verify"), None).unwrap_err();
        assert!(e.contains("\"verify\"") && e.contains("verify-full"), "{e}");
        assert!(!e.contains("p%40ss"), "{e}");
    }

    /// What a store's TLS settings verify, as libpq: `require` with a CA file verifies the
    /// chain; `verify-ca` needs a CA file; `sslrootcert=system` needs `verify-full`; the CA
    /// file is read for a verifying mode only, and an unreadable one is named, with what named
    /// it.
    #[test]
    fn store_tls_verifies_as_libpq_does() {
        use super::{RootCert, StoreTls};
        use crate::crd::SslMode::{self, *};
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "PEM").unwrap();
        let path = ca.display().to_string();
        let file = RootCert::File {
            path: path.clone(),
            named_by: "PGSSLROOTCERT",
        };
        let system = RootCert::System { explicit: true };
        let none = RootCert::System { explicit: false };
        let verify = |mode: SslMode, root: &RootCert| {
            StoreTls {
                mode,
                root: root.clone(),
            }
            .verification()
            .map_err(|e| e.to_string())
        };
        let pem = Some("PEM".to_string());
        assert_eq!(verify(Disable, &file), Ok(None));
        assert_eq!(verify(Prefer, &file), Ok(Some((Prefer, None))));
        assert_eq!(verify(Require, &none), Ok(Some((Require, None))));
        assert_eq!(verify(Require, &file), Ok(Some((VerifyCa, pem.clone()))));
        assert_eq!(verify(VerifyCa, &file), Ok(Some((VerifyCa, pem.clone()))));
        assert_eq!(verify(VerifyFull, &file), Ok(Some((VerifyFull, pem))));
        assert_eq!(verify(VerifyFull, &none), Ok(Some((VerifyFull, None))));
        assert_eq!(verify(VerifyFull, &system), Ok(Some((VerifyFull, None))));
        for root in [&none, &system] {
            let e = verify(VerifyCa, root).unwrap_err();
            assert!(e.contains("verify-ca") && e.contains("sslrootcert"), "{e}");
        }
        for mode in [Disable, Prefer, Require] {
            let e = verify(mode, &system).unwrap_err();
            assert!(
                e.contains("sslrootcert=system needs sslmode=verify-full"),
                "{e}"
            );
        }
        let missing = RootCert::File {
            path: dir.path().join("gone.crt").display().to_string(),
            named_by: "sslrootcert",
        };
        let e = verify(VerifyFull, &missing).unwrap_err();
        assert!(e.contains("gone.crt (named by sslrootcert)"), "{e}");
        // Not read where nothing is verified.
        assert_eq!(verify(Prefer, &missing), Ok(Some((Prefer, None))));
    }

    /// A store connection gets a 120 s send timeout unless its URL sets one.
    #[test]
    fn store_connections_get_a_send_timeout_unless_the_url_sets_one() {
        use std::time::Duration;
        let mut plain: postgres::Config = "postgresql://u@localhost/db".parse().unwrap();
        super::with_send_timeout(&mut plain);
        assert_eq!(
            plain.get_tcp_user_timeout(),
            Some(&Duration::from_secs(120))
        );
        let mut own: postgres::Config = "postgresql://u@localhost/db?tcp_user_timeout=7"
            .parse()
            .unwrap();
        super::with_send_timeout(&mut own);
        assert_eq!(own.get_tcp_user_timeout(), Some(&Duration::from_secs(7)));
    }

    /// The session a broken connection is ended by is that connection's: another session
    /// that has since taken its process ID (after a failover or a restart) is left alone.
    #[test]
    fn reconnecting_ends_the_broken_session_not_another_with_its_pid() {
        let server = pg::shared();
        let url = server.url(&server.create_database("end_old_session"));
        let mut store =
            super::PostgresStore::connect(&url, crate::identity::Rules::default()).unwrap();
        let mut bystander = super::connect(&url).unwrap();
        let other = super::Backend::of(&mut bystander).unwrap();
        // The broken connection's process ID, now another session's.
        store.backend = super::Backend {
            pid: other.pid,
            started: "2000-01-01 00:00:00.000000".into(),
        };
        store.reconnect().unwrap();
        bystander
            .query_one("SELECT 1", &[])
            .expect("the other session is untouched");
        // Its own broken session is ended.
        let mut old = super::connect(&url).unwrap();
        store.backend = super::Backend::of(&mut old).unwrap();
        store.reconnect().unwrap();
        assert!(
            old.query_one("SELECT 1", &[]).is_err(),
            "the old session is ended"
        );
        assert_ne!(store.backend, super::Backend::of(&mut bystander).unwrap());
    }

    /// A store session asks the server for TCP keepalives (after 30 s, every 10 s, 3 unanswered)
    /// unless they are set elsewhere: here the URL's options set one, which is kept.
    #[test]
    fn store_sessions_get_server_keepalives_unless_set_elsewhere() {
        let server = pg::shared();
        let url = server.url(&server.create_database("keepalives"));
        let settings = |c: &mut postgres::Client| -> Vec<(String, String, String)> {
            c.query(
                "SELECT name, setting, source FROM pg_settings
                  WHERE name LIKE 'tcp_keepalives_%' ORDER BY name",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
        };
        let row = |name: &str, value: &str, source: &str| {
            (name.to_string(), value.to_string(), source.to_string())
        };
        let mut plain = super::connect(&url).unwrap();
        assert_eq!(
            settings(&mut plain),
            [
                row("tcp_keepalives_count", "3", "session"),
                row("tcp_keepalives_idle", "30", "session"),
                row("tcp_keepalives_interval", "10", "session"),
            ]
        );
        let mut own =
            super::connect(&format!("{url}?options=-c%20tcp_keepalives_count%3D7")).unwrap();
        assert_eq!(
            settings(&mut own),
            [
                row("tcp_keepalives_count", "7", "client"),
                row("tcp_keepalives_idle", "30", "session"),
                row("tcp_keepalives_interval", "10", "session"),
            ]
        );
    }
}
