//! PostgreSQL as a warehouse: binary `COPY` into a transaction-scoped staging table, then one
//! set-based merge, all inside the transaction that also moves the table's cursor.

pub(crate) mod copy;
mod dialect;
mod tls;

pub use tls::{connector as tls_connector, connector_from as tls_connector_from};

pub use dialect::PostgresDialect;

use std::collections::{BTreeMap, HashMap};

use postgres::{Client, Config, NoTls};

use super::{
    Cell, Column, ColumnLimits, Credentials, Dialect, OnConflict, TableColumns, Warehouse,
    WarehouseError,
};
use crate::crd::{ErrorClass, PostgresSettings, SslMode};
use crate::warehouse::error::classify_sqlstate;

/// A connection to one schema of a PostgreSQL database.
pub struct PostgresWarehouse {
    client: Client,
    /// How `client` was opened, to open it again (see `broken`).
    session: Session,
    /// The driver's connection is unusable: a COPY the server refused before it began (a lock
    /// timeout, a permission denied) leaves the driver out of step with the server (it sends
    /// two Syncs; rust-postgres issue 789). [`Warehouse::rollback`] opens a new session, so
    /// that the failed table is that table's error and the next one loads.
    broken: bool,
    schema: String,
    dialect: PostgresDialect,
    /// Table → its columns binary COPY cannot fill directly (see
    /// [`PostgresDialect::copies_directly`]), each with the staging merge's explicit cast to it
    /// ([`PostgresDialect::stage_cast`]) when it needs one, as of the last
    /// [`Warehouse::describe`].
    converted: BTreeMap<String, HashMap<String, Option<String>>>,
    /// Table → its narrowed columns, as of the last [`Warehouse::describe`].
    limits: BTreeMap<String, ColumnLimits>,
    /// Table → columns a DBA dropped, as of the last `describe` (they still count toward
    /// PostgreSQL's 1,600).
    dropped: BTreeMap<String, usize>,
}

/// Converts a driver error into a classified warehouse error.
pub fn pg_error(e: postgres::Error) -> WarehouseError {
    match e.as_db_error() {
        Some(db) => WarehouseError::new(
            classify_sqlstate(db.code().code()),
            db.message().to_string(),
        ),
        None if e.is_closed() => WarehouseError::connection(format!("connection closed: {e}")),
        None => WarehouseError::connection(e.to_string()),
    }
}

/// libpq's (and the driver's) default idle time before TCP keepalives start: 2 hours.
const DRIVER_KEEPALIVES_IDLE: std::time::Duration = std::time::Duration::from_secs(7200);

/// The TCP keepalives asked of both ends ([`with_timeouts`], [`server_keepalives`]): seconds
/// idle before the first, seconds between them, how many unanswered end the connection.
const KEEPALIVE_IDLE_SECS: u64 = 30;
const KEEPALIVE_INTERVAL_SECS: u64 = 10;
const KEEPALIVE_COUNT: u32 = 3;

/// Sets the timeouts the URL leaves unset (`connect_timeout`, `keepalives_idle` other than the
/// driver's default of 2 hours, `keepalives_interval`, `keepalives_retries`), so that a server
/// that vanishes without closing the connection (a failed-over host, a network partition) fails
/// a connection waiting on it in about a minute rather than hours: 10 s to connect; keepalives
/// after 30 s idle, every 10 s, 3 unanswered ending the connection. Both the store's connections
/// and the sync's warehouse connections get them.
///
/// Not `tcp_user_timeout` (sent data unacknowledged for so long ends the connection): Linux
/// applies it to a receive window that stays closed too, so a live warehouse server that stops
/// reading a COPY for a while (a lock wait, a trigger, a slow disk) would have the sync's
/// connection cut. The store sets one itself, as long as the engine tolerates a stalled write.
pub fn with_timeouts(config: &mut postgres::Config) {
    use std::time::Duration;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_keepalives_idle() == DRIVER_KEEPALIVES_IDLE {
        config.keepalives_idle(Duration::from_secs(KEEPALIVE_IDLE_SECS));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(KEEPALIVE_INTERVAL_SECS));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVE_COUNT);
    }
}

/// The server's side of [`with_timeouts`], set on a new session unless configured elsewhere
/// (the URL's `options`, the role, the database, the server's configuration): TCP keepalives
/// after 30 s idle, every 10 s, 3 unanswered. A client that vanishes (its node lost, a network
/// partition) is otherwise noticed by the server only after the operating system's keepalive
/// time, 2 hours by default, and its open transaction keeps its locks all that time: the store's
/// head, which every engine replica writes under, or the warehouse tables the next sync loads.
/// A session over a Unix socket ignores them. A server that refuses them (a PostgreSQL-compatible
/// one without these settings) only gets a warning logged: they are a safety net, not a
/// requirement.
pub fn server_keepalives(client: &mut Client) {
    if let Err(e) = try_server_keepalives(client) {
        tracing::warn!(error = %e, "the server's TCP keepalives could not be set; a client that vanishes may keep its transaction open until the server's own keepalives end it");
    }
}

fn try_server_keepalives(client: &mut Client) -> Result<(), postgres::Error> {
    set_unless_configured(
        client,
        &[
            ("tcp_keepalives_idle", KEEPALIVE_IDLE_SECS.to_string()),
            (
                "tcp_keepalives_interval",
                KEEPALIVE_INTERVAL_SECS.to_string(),
            ),
            ("tcp_keepalives_count", KEEPALIVE_COUNT.to_string()),
        ],
    )
}

/// Sets each `(name, value)` server setting on the session where nothing has configured it
/// (its source is still the server's built-in default): a DBA's value on the role, the
/// database or the server wins.
fn set_unless_configured(
    client: &mut Client,
    wanted: &[(&str, String)],
) -> Result<(), postgres::Error> {
    let names: Vec<&str> = wanted.iter().map(|(name, _)| *name).collect();
    let defaults: Vec<String> = client
        .query(
            "SELECT name FROM pg_settings WHERE source = 'default' AND name = ANY($1)",
            &[&names],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let set: String = wanted
        .iter()
        .filter(|(name, _)| defaults.iter().any(|d| d == name))
        .map(|(name, value)| format!("SET {name} = {value};"))
        .collect();
    if !set.is_empty() {
        client.batch_execute(&set)?;
    }
    Ok(())
}

/// How long a sync's statement waits for a lock a warehouse user holds (an `ALTER TABLE` of
/// the sync's waits behind every running query on that table, and queues the queries after
/// it): past it the statement fails with `lock_not_available`, that table's load is `Quota`
/// in the report and the next run retries it, while the other tables load. Without it a lock
/// held for hours (an open transaction in someone's SQL client) held the whole run until the
/// Job's deadline killed it, report and all. A `lock_timeout` the DBA set on the role or the
/// database wins.
pub const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Sets [`LOCK_TIMEOUT`] on a warehouse session unless the role, the database or the server
/// configures `lock_timeout`. A server without the setting (a PostgreSQL-compatible one) only
/// gets a warning logged, as for [`server_keepalives`].
fn warehouse_lock_timeout(client: &mut Client) {
    let wanted = [("lock_timeout", format!("'{}s'", LOCK_TIMEOUT.as_secs()))];
    if let Err(e) = set_unless_configured(client, &wanted) {
        tracing::warn!(error = %e, "the warehouse session's lock_timeout could not be set; a lock a warehouse user holds may hold the sync until its deadline");
    }
}

/// The driver's configuration for a WarehouseConnection's settings and credentials: 30 s to
/// connect, and the keepalives of [`with_timeouts`], so that a warehouse host that vanishes
/// mid-sync fails the run in about a minute (the next run retries) instead of hanging it.
fn driver_config(
    settings: &PostgresSettings,
    credentials: &Credentials,
) -> Result<Config, WarehouseError> {
    // The CRD refuses them empty; a file given to `sync -f` may not. PostgreSQL takes an empty
    // database name as the user's: the sync would load into another database.
    for (field, value) in [("host", &settings.host), ("database", &settings.database)] {
        if value.trim().is_empty() {
            return Err(WarehouseError::internal(format!(
                "warehouse.postgres.{field} is empty: give the server's {field}"
            )));
        }
    }
    let mut config = Config::new();
    config
        .host(&settings.host)
        .port(settings.port)
        .dbname(&settings.database)
        .application_name("profiles-sync")
        .connect_timeout(std::time::Duration::from_secs(30));
    with_timeouts(&mut config);
    let user = credentials.username.as_deref().ok_or_else(|| {
        WarehouseError::new(
            ErrorClass::Permission,
            "the credentials Secret has no username key",
        )
    })?;
    config.user(user);
    if let Some(p) = &credentials.password {
        config.password(p);
    }
    Ok(config)
}

impl PostgresWarehouse {
    /// Connects with the settings and credentials of a WarehouseConnection.
    pub fn connect(
        settings: &PostgresSettings,
        schema: &str,
        credentials: &Credentials,
    ) -> Result<PostgresWarehouse, WarehouseError> {
        Self::with_config(
            driver_config(settings, credentials)?,
            settings.ssl_mode,
            credentials.ca_cert.as_deref(),
            schema,
        )
    }

    /// Connects with a ready driver configuration (tests use this with a throwaway server),
    /// trusting for `verify-*` the PEM certificates `ca_cert` when given, else the system's.
    pub fn with_config(
        mut config: Config,
        ssl_mode: SslMode,
        ca_cert: Option<&str>,
        schema: &str,
    ) -> Result<PostgresWarehouse, WarehouseError> {
        // The sync's `DROP TABLE IF EXISTS` of its staging tables would otherwise log a NOTICE
        // for every chunk; warnings and errors still come through. UTC: a column a DBA made
        // `timestamp` (without time zone) or `date` takes the UTC time, whatever the
        // database's or the role's `TimeZone`.
        config.options("-c client_min_messages=warning -c TimeZone=UTC");
        let session = Session {
            config,
            ssl_mode,
            ca_cert: ca_cert.map(str::to_string),
        };
        Ok(PostgresWarehouse {
            client: session.open()?,
            session,
            broken: false,
            schema: schema.to_string(),
            dialect: PostgresDialect::postgres(),
            converted: BTreeMap::new(),
            limits: BTreeMap::new(),
            dropped: BTreeMap::new(),
        })
    }

    /// Uses a different dialect (Redshift speaks the PostgreSQL protocol with its own SQL).
    pub fn with_dialect(mut self, dialect: PostgresDialect) -> PostgresWarehouse {
        self.dialect = dialect;
        self
    }
}

/// What opens a warehouse session.
struct Session {
    config: Config,
    ssl_mode: SslMode,
    /// PEM certificates trusted (instead of the system's) for `verify-*`.
    ca_cert: Option<String>,
}

impl Session {
    /// A new session, with the server-side settings of [`server_keepalives`] and
    /// [`warehouse_lock_timeout`].
    fn open(&self) -> Result<Client, WarehouseError> {
        let mut client = match self.ssl_mode {
            SslMode::Disable => self.config.connect(NoTls),
            mode => {
                let mut config = self.config.clone();
                config.ssl_mode(if mode == SslMode::Prefer {
                    postgres::config::SslMode::Prefer
                } else {
                    postgres::config::SslMode::Require
                });
                config.connect(tls::connector(mode, self.ca_cert.as_deref())?)
            }
        }
        .map_err(|e| match e.as_db_error() {
            Some(_) => pg_error(e),
            // The server asked for a password (scram, md5, password) and there is none: the
            // driver fails before sending anything. The credentials' fault, not the network's.
            None if self.config.get_password().is_none() && asked_for_a_password(&e) => {
                WarehouseError::new(
                    ErrorClass::Permission,
                    "the server asks for a password, and the credentials Secret holds none \
                     (its passwordKey key is missing or empty)",
                )
            }
            None => WarehouseError::connection(format!(
                "cannot connect: {}",
                super::error::error_chain(&e)
            )),
        })?;
        server_keepalives(&mut client);
        warehouse_lock_timeout(&mut client);
        Ok(client)
    }
}

/// Whether the driver gave up because the server asked for a password and it had none.
fn asked_for_a_password(e: &postgres::Error) -> bool {
    std::error::Error::source(e).is_some_and(|cause| cause.to_string() == "password missing")
}

/// A COPY that failed.
struct CopyError {
    unique_violation: bool,
    error: WarehouseError,
}

impl PostgresWarehouse {
    /// Binary COPY of `rows` into `target` (already quoted or qualified).
    fn copy_rows(
        &mut self,
        target: &str,
        columns: &[Column],
        rows: &[Vec<Cell>],
    ) -> Result<(), CopyError> {
        let wrap = |e: postgres::Error| CopyError {
            unique_violation: e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION),
            error: pg_error(e),
        };
        let names: Vec<String> = columns
            .iter()
            .map(|c| self.dialect.quote(&c.name))
            .collect();
        let sink = self
            .client
            .copy_in(&format!(
                "COPY {target} ({}) FROM STDIN (FORMAT binary)",
                names.join(", ")
            ))
            .map_err(|e| {
                self.broken = true;
                wrap(e)
            })?;
        let sink_wrap = |e: copy::SinkError| match e {
            copy::SinkError::Driver(e) => wrap(e),
            copy::SinkError::Stream(other) => CopyError {
                unique_violation: false,
                error: WarehouseError::connection(format!("the COPY stream failed: {other}")),
            },
        };
        let mut sink = copy::CopySink::new(sink);
        for row in rows {
            copy::encode_row(&mut sink.buf, row, columns).map_err(|e| CopyError {
                unique_violation: false,
                error: WarehouseError::new(ErrorClass::Internal, e),
            })?;
            sink.row_done().map_err(sink_wrap)?;
        }
        sink.finish().map_err(sink_wrap)?;
        Ok(())
    }
}

impl Warehouse for PostgresWarehouse {
    fn dialect(&self) -> &dyn Dialect {
        &self.dialect
    }

    fn schema(&self) -> &str {
        &self.schema
    }

    fn unsupported_database(&mut self) -> Result<Option<String>, WarehouseError> {
        // Events carry any Unicode character; a database in another encoding (LATIN1, WIN1252)
        // refuses those it cannot represent, and would fail a table at every run on one emoji.
        // SQL_ASCII takes any bytes but measures `varchar(n)` in bytes, which the sync's checks
        // of a DBA's narrowed columns count in characters. (Redshift stores UTF-8 only.)
        if self.dialect.is_redshift() {
            return Ok(None);
        }
        let encoding: String = self
            .client
            .query_one("SELECT current_setting('server_encoding')", &[])
            .map_err(pg_error)?
            .get(0);
        Ok((encoding != "UTF8").then(|| {
            format!(
                "the database's encoding is {encoding}, which cannot hold every character events \
                 carry as the sync writes them: sync into a database created with ENCODING 'UTF8'"
            )
        }))
    }

    fn test_connection(&mut self) -> Result<(), WarehouseError> {
        if let Some(why) = self.unsupported_database()? {
            return Err(WarehouseError::new(ErrorClass::Schema, why));
        }
        // CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists;
        // a schema a DBA created beforehand must not need that right.
        let exists = !self
            .client
            .query(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1",
                &[&self.schema],
            )
            .map_err(pg_error)?
            .is_empty();
        let d = &self.dialect;
        let schema_sql = if exists {
            "SELECT 1".to_string()
        } else {
            d.create_schema(&self.schema)
        };
        // Every load stages its cursors (and some columns) in temporary tables: a role without
        // `TEMPORARY` on the database would pass the rest and then fail every table.
        let probe = d.qualified(&self.schema, "_profiles_sync_probe");
        let sql = format!(
            "BEGIN;
             {schema_sql};
             CREATE TABLE IF NOT EXISTS {probe} (id BIGINT PRIMARY KEY);
             ALTER TABLE {probe} ADD COLUMN IF NOT EXISTS probe_column TEXT;
             INSERT INTO {probe} (id) VALUES (1) ON CONFLICT DO NOTHING;
             DELETE FROM {probe};
             DROP TABLE {probe};
             CREATE TEMP TABLE _profiles_sync_probe_temp (id BIGINT) ON COMMIT DROP;
             COMMIT;"
        );
        self.client.batch_execute(&sql).map_err(|e| {
            let _ = self.client.batch_execute("ROLLBACK");
            pg_error(e)
        })
    }

    fn describe(&mut self) -> Result<BTreeMap<String, TableColumns>, WarehouseError> {
        let rows = self
            .client
            .query(
                // pg_catalog, not information_schema: tables the user may not write must still show,
                // or the sync would try to create them instead of reporting the missing privilege.
                // The last column: whether the type has no modifier (a length, a precision) and
                // is no domain, so that an explicit cast to it cuts nothing (`stage_cast`).
                "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod),
                        a.atttypmod = -1 AND t.typtype <> 'd'
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_attribute a ON a.attrelid = c.oid
                        JOIN pg_type t ON t.oid = a.atttypid
                  WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY c.relname, a.attnum",
                &[&self.schema],
            )
            .map_err(pg_error)?;
        let mut out: BTreeMap<String, TableColumns> = BTreeMap::new();
        self.converted.clear();
        self.limits.clear();
        self.dropped = self
            .client
            .query(
                "SELECT c.relname::text, count(*)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_attribute a ON a.attrelid = c.oid
                  WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND a.attisdropped
                  GROUP BY c.relname",
                &[&self.schema],
            )
            .map_err(pg_error)?
            .iter()
            .map(|r| {
                let (table, n): (String, i64) = (r.get(0), r.get(1));
                (table, usize::try_from(n).unwrap_or(0))
            })
            .collect();
        for r in rows {
            let (table, column, ty, plain): (String, String, String, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if let Some(limit) = self.dialect.column_limit(&ty) {
                self.limits
                    .entry(table.clone())
                    .or_default()
                    .insert(column.clone(), limit);
            }
            let parsed = self.dialect.parse_type(&ty);
            if !self.dialect.copies_directly(&ty) {
                let cast = self.dialect.stage_cast(&ty, plain);
                self.converted
                    .entry(table.clone())
                    .or_default()
                    .insert(column.clone(), cast);
            }
            out.entry(table).or_default().insert(column, parsed);
        }
        Ok(out)
    }

    fn column_limits(&self) -> BTreeMap<String, ColumnLimits> {
        self.limits.clone()
    }

    fn dropped_columns(&self) -> BTreeMap<String, usize> {
        self.dropped.clone()
    }

    fn make_room(&mut self, table: &str) -> Result<(), WarehouseError> {
        // Relations and types share the schema's names with tables (a table's row type takes
        // its name in `pg_type`; the array type of table `t`, `_t`, PostgreSQL moves out of
        // the way of a table named `_t`).
        let row = self
            .client
            .query_opt(
                "SELECT c.relkind::text, o.relname::text
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   LEFT JOIN pg_constraint k ON k.conindid = c.oid AND k.contype = 'p'
                   LEFT JOIN pg_class o ON o.oid = k.conrelid
                  WHERE n.nspname = $1 AND c.relname = $2
                 UNION ALL
                 SELECT 'type', NULL
                   FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                  WHERE n.nspname = $1 AND t.typname = $2 AND t.typrelid = 0 AND t.typcategory <> 'A'
                  LIMIT 1",
                &[&self.schema, &table],
            )
            .map_err(pg_error)?;
        let Some(row) = row else { return Ok(()) };
        let (kind, key_of): (String, Option<String>) = (row.get(0), row.get(1));
        let what = match (kind.as_str(), key_of) {
            // A table (one with no columns, which `describe` does not list): CREATE TABLE IF
            // NOT EXISTS leaves it as it is.
            ("r" | "p", _) => return Ok(()),
            // A key's index; a partitioned table's (a DBA partitioned a table of the sync's)
            // is a partitioned index.
            ("i" | "I", Some(owner)) => {
                let d = &self.dialect;
                let sql = format!(
                    "ALTER TABLE {} RENAME CONSTRAINT {} TO {}",
                    d.qualified(&self.schema, &owner),
                    d.quote(table),
                    d.quote(&d.key_constraint(&owner)),
                );
                return self.client.batch_execute(&sql).map_err(pg_error);
            }
            ("i" | "I", None) => "an index",
            ("S", _) => "a sequence",
            ("v", _) => "a view",
            ("m", _) => "a materialized view",
            ("f", _) => "a foreign table",
            ("c" | "type", _) => "a type",
            _ => "another object",
        };
        Err(WarehouseError::new(
            ErrorClass::Schema,
            format!(
                "the name {table:?} is taken in schema {:?} by {what}, so the sync cannot create \
                 the table of that name: rename or drop that object, or turn the table off in \
                 the SelectiveSync",
                self.schema
            ),
        ))
    }

    fn begin(&mut self) -> Result<(), WarehouseError> {
        self.client.batch_execute("BEGIN").map_err(pg_error)
    }

    fn commit(&mut self) -> Result<(), WarehouseError> {
        self.client.batch_execute("COMMIT").map_err(pg_error)
    }

    fn rollback(&mut self) -> Result<(), WarehouseError> {
        if self.broken {
            // The server ends the old session's transaction when its connection closes.
            self.client = self.session.open()?;
            self.broken = false;
            return Ok(());
        }
        self.client.batch_execute("ROLLBACK").map_err(pg_error)
    }

    fn execute(&mut self, sql: &str) -> Result<u64, WarehouseError> {
        self.client.execute(sql, &[]).map_err(pg_error)
    }

    fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, WarehouseError> {
        // The simple-query protocol returns every value as text.
        let messages = self.client.simple_query(sql).map_err(pg_error)?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(String::from)).collect())
                }
                _ => None,
            })
            .collect())
    }

    fn merge_stage(
        &self,
        table: &str,
        stage: &str,
        columns: &[&str],
        key: &[&str],
        on_conflict: OnConflict,
    ) -> String {
        let d = &self.dialect;
        let converted = self.converted.get(table);
        let select: Vec<String> = columns
            .iter()
            .map(
                |c| match converted.and_then(|m| m.get(*c)).and_then(Option::as_ref) {
                    Some(cast) => format!("{}::{cast}", d.quote(c)),
                    None => d.quote(c),
                },
            )
            .collect();
        d.merge_from_stage_as(
            &self.schema,
            table,
            stage,
            columns,
            &select,
            key,
            on_conflict,
        )
    }

    fn stage(
        &mut self,
        stage: &str,
        columns: &[Column],
        rows: &[Vec<Cell>],
    ) -> Result<(), WarehouseError> {
        let d = &self.dialect;
        self.client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS pg_temp.{q}; CREATE TEMP TABLE {q} ({}) ON COMMIT DROP",
                d.column_defs(columns),
                q = d.quote(stage)
            ))
            .map_err(pg_error)?;
        let target = d.quote(stage);
        self.copy_rows(&target, columns, rows).map_err(|e| e.error)
    }

    fn append(
        &mut self,
        table: &str,
        columns: &[Column],
        rows: &[Vec<Cell>],
    ) -> Result<bool, WarehouseError> {
        // Columns of other types than the sync's own (a DBA's `integer`, `numeric`, `date`, …)
        // need the staging path's casts.
        if let Some(converted) = self.converted.get(table)
            && columns.iter().any(|c| converted.contains_key(&c.name))
        {
            return Ok(false);
        }
        // The cursor makes a duplicate impossible in practice, so COPY straight into the table;
        // should a row exist after all (unique violation), undo just that and let the caller merge.
        self.client
            .batch_execute("SAVEPOINT profiles_sync_append")
            .map_err(pg_error)?;
        let target = self.dialect.qualified(&self.schema, table);
        match self.copy_rows(&target, columns, rows) {
            Ok(()) => {
                self.client
                    .batch_execute("RELEASE SAVEPOINT profiles_sync_append")
                    .map_err(pg_error)?;
                Ok(true)
            }
            Err(e) if e.unique_violation => {
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT profiles_sync_append")
                    .map_err(pg_error)?;
                Ok(false)
            }
            Err(e) => Err(e.error),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::with_timeouts;

    /// A URL that sets no timeouts gets the store's; one that sets them keeps its own.
    #[test]
    fn timeouts_apply_unless_the_url_sets_them() {
        let mut plain: postgres::Config = "postgresql://u@localhost/db".parse().unwrap();
        with_timeouts(&mut plain);
        assert_eq!(plain.get_connect_timeout(), Some(&Duration::from_secs(10)));
        assert_eq!(plain.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(
            plain.get_keepalives_interval(),
            Some(Duration::from_secs(10))
        );
        assert_eq!(plain.get_keepalives_retries(), Some(3));
        assert_eq!(plain.get_tcp_user_timeout(), None);
        let mut own: postgres::Config = "postgresql://u@localhost/db?connect_timeout=3\
            &keepalives_idle=5&keepalives_interval=2&keepalives_retries=9"
            .parse()
            .unwrap();
        with_timeouts(&mut own);
        assert_eq!(own.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(own.get_keepalives_idle(), Duration::from_secs(5));
        assert_eq!(own.get_keepalives_interval(), Some(Duration::from_secs(2)));
        assert_eq!(own.get_keepalives_retries(), Some(9));
    }

    /// A warehouse connection gets 30 s to connect and the keepalive timeouts, not a send
    /// timeout; without a
    /// username it is refused before any connection is tried.
    #[test]
    fn warehouse_connections_get_the_keepalive_timeouts() {
        let settings = crate::crd::PostgresSettings {
            host: "db.example".into(),
            port: 5432,
            database: "analytics".into(),
            ssl_mode: crate::crd::SslMode::Require,
        };
        let credentials = crate::warehouse::Credentials {
            username: Some("loader".into()),
            ..Default::default()
        };
        let config = super::driver_config(&settings, &credentials).unwrap();
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(30)));
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(10))
        );
        assert_eq!(config.get_keepalives_retries(), Some(3));
        // A COPY the server stops reading for a while must not be cut.
        assert_eq!(config.get_tcp_user_timeout(), None);
        assert_eq!(config.get_user(), Some("loader"));
        let nobody = crate::warehouse::Credentials::default();
        let e = super::driver_config(&settings, &nobody).unwrap_err();
        assert!(e.to_string().contains("no username"), "{e}");
    }

    /// A warehouse session asks the server for TCP keepalives, so that a sync Job that vanishes
    /// mid-load does not keep its transaction's locks on the warehouse tables for hours.
    #[test]
    fn warehouse_sessions_get_server_keepalives() {
        let server = crate::test_pg::shared();
        let url = server.url(&server.create_database("warehouse_keepalives"));
        let mut w = super::PostgresWarehouse::with_config(
            url.parse().unwrap(),
            crate::crd::SslMode::Disable,
            None,
            "analytics",
        )
        .unwrap();
        let count: String = w
            .client
            .query_one(
                "SELECT setting FROM pg_settings WHERE name = 'tcp_keepalives_count'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(count, "3");
    }

    /// A warehouse session waits at most [`super::LOCK_TIMEOUT`] for a lock unless the
    /// database (or the role, or the server) sets its own `lock_timeout`, which wins.
    #[test]
    fn warehouse_sessions_get_a_lock_timeout_unless_the_dba_set_one() {
        let server = crate::test_pg::shared();
        let lock_timeout = |db: &str| -> String {
            let mut w = super::PostgresWarehouse::with_config(
                server.url(db).parse().unwrap(),
                crate::crd::SslMode::Disable,
                None,
                "analytics",
            )
            .unwrap();
            w.client.query_one("SHOW lock_timeout", &[]).unwrap().get(0)
        };
        let plain = server.create_database("warehouse_lock_timeout");
        assert_eq!(lock_timeout(&plain), "1min");
        let dba = server.create_database("warehouse_dba_lock_timeout");
        server
            .connect(&dba)
            .batch_execute(&format!("ALTER DATABASE {dba} SET lock_timeout = '5s'"))
            .unwrap();
        assert_eq!(lock_timeout(&dba), "5s");
    }
}
