//! Warehouses for sync tests: a database on the shared PostgreSQL test server, or an SQLite
//! file, with helpers to run syncs and read tables back.

use profiles_sync::crd::{SelectiveSyncSpec, SqliteSettings, WarehouseConnectionSpec};
use profiles_sync::event::{Event, ParseOptions};
use profiles_sync::identity::Rules;
use profiles_sync::store::{self, Store};
use profiles_sync::sync::{self, StoreSource, SyncOptions, SyncReport};
use profiles_sync::warehouse::{self, Credentials, Warehouse};
use serde_json::{Value, json};

/// A warehouse under test.
pub struct TestWarehouse {
    /// The connection spec pointing at it.
    pub spec: WarehouseConnectionSpec,
    /// Credentials for it.
    pub credentials: Credentials,
    /// The PostgreSQL database, when it is one.
    pub database: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

/// A connection spec from JSON (defaults applied as the API server would).
pub fn spec(warehouse: Value) -> WarehouseConnectionSpec {
    serde_json::from_value(json!({"warehouse": warehouse})).expect("valid spec")
}

impl TestWarehouse {
    /// A fresh PostgreSQL database on the shared test server.
    pub fn postgres() -> TestWarehouse {
        let pg = super::pg::shared();
        let db = pg.create_database("wh");
        let spec = spec(json!({
            "type": "postgres",
            "postgres": {"host": "127.0.0.1", "port": pg.port(), "database": db, "sslMode": "disable"},
            "credentialsSecretRef": {"name": "test"}
        }));
        TestWarehouse {
            spec,
            credentials: Credentials {
                username: Some("postgres".into()),
                ..Default::default()
            },
            database: Some(db),
            _dir: None,
        }
    }

    /// A fresh SQLite warehouse file.
    pub fn sqlite() -> TestWarehouse {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("warehouse.db").display().to_string();
        let mut s = spec(json!({"type": "sqlite", "sqlite": {"path": path}}));
        s.warehouse.sqlite = Some(SqliteSettings { path });
        TestWarehouse {
            spec: s,
            credentials: Credentials::default(),
            database: None,
            _dir: Some(dir),
        }
    }

    /// One of each kind, by name.
    pub fn of(kind: &str) -> TestWarehouse {
        if kind == "postgres" {
            Self::postgres()
        } else {
            Self::sqlite()
        }
    }

    /// A connection to it.
    pub fn connect(&self) -> Box<dyn Warehouse> {
        warehouse::connect(&self.spec.warehouse, &self.spec.schema, &self.credentials)
            .expect("connect to the warehouse")
    }

    /// Runs one sync from `store_url` with `selection`.
    pub fn sync(&self, store_url: &str, selection: Option<&SelectiveSyncSpec>) -> SyncReport {
        self.sync_with(store_url, selection, &self.spec, 500)
    }

    /// Runs one sync with another spec (limits, backfill) and page size.
    pub fn sync_with(
        &self,
        store_url: &str,
        selection: Option<&SelectiveSyncSpec>,
        spec: &WarehouseConnectionSpec,
        page: usize,
    ) -> SyncReport {
        let mut source = StoreSource(store::open(store_url, Rules::default()).expect("open store"));
        self.sync_source(&mut source, selection, spec, page)
    }

    /// Runs one sync reading the feeds from `source` (a wrapped store, to script its trouble).
    pub fn sync_source(
        &self,
        source: &mut dyn sync::FeedSource,
        selection: Option<&SelectiveSyncSpec>,
        spec: &WarehouseConnectionSpec,
        page: usize,
    ) -> SyncReport {
        self.sync_source_at(source, selection, spec, page, jiff::Timestamp::now())
    }

    /// [`TestWarehouse::sync_source`] with the sync's clock at `now`.
    pub fn sync_source_at(
        &self,
        source: &mut dyn sync::FeedSource,
        selection: Option<&SelectiveSyncSpec>,
        spec: &WarehouseConnectionSpec,
        page: usize,
        now: jiff::Timestamp,
    ) -> SyncReport {
        self.sync_as(source, selection, spec, page, now, None)
    }

    /// [`TestWarehouse::sync_source_at`] recording its progress as the feed consumer `consumer`.
    pub fn sync_as(
        &self,
        source: &mut dyn sync::FeedSource,
        selection: Option<&SelectiveSyncSpec>,
        spec: &WarehouseConnectionSpec,
        page: usize,
        now: jiff::Timestamp,
        consumer: Option<&str>,
    ) -> SyncReport {
        let mut wh = self.connect();
        let opts = SyncOptions {
            id: "test".into(),
            connection: spec,
            selection,
            page_size: page,
            consumer,
            now,
        };
        sync::run(source, &mut *wh, &opts)
    }

    /// The qualified name of a table.
    pub fn table(&self, table: &str) -> String {
        let wh = self.connect();
        wh.dialect().qualified(&self.spec.schema, table)
    }

    /// Runs a query.
    pub fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        self.connect()
            .query(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// How many rows a table has (0 when it does not exist).
    pub fn count(&self, table: &str) -> i64 {
        let mut wh = self.connect();
        let exists = wh.describe().expect("describe").contains_key(table);
        if !exists {
            return 0;
        }
        let t = wh.dialect().qualified(&self.spec.schema, table);
        wh.query(&format!("SELECT count(*) FROM {t}"))
            .expect("count")[0][0]
            .as_deref()
            .unwrap_or("0")
            .parse()
            .expect("a number")
    }

    /// Every table's rows (without `uuid_ts`, which is the load time), sorted, for comparisons.
    pub fn dump(&self) -> std::collections::BTreeMap<String, Vec<Vec<Option<String>>>> {
        let mut wh = self.connect();
        let schema = wh.describe().expect("describe");
        let mut out = std::collections::BTreeMap::new();
        for (table, columns) in schema {
            if table.starts_with("_profiles_sync") {
                continue;
            }
            let cols: Vec<String> = columns
                .keys()
                .filter(|c| *c != "uuid_ts")
                .map(|c| wh.dialect().quote(c))
                .collect();
            let t = wh.dialect().qualified(&self.spec.schema, &table);
            let mut rows = wh
                .query(&format!("SELECT {} FROM {t}", cols.join(", ")))
                .expect("dump");
            rows.sort();
            out.insert(table, rows);
        }
        out
    }

    /// Column names of a table.
    pub fn columns(&self, table: &str) -> Vec<String> {
        self.connect()
            .describe()
            .expect("describe")
            .get(table)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// A fresh SQLite store and its URL.
pub fn store() -> (Box<dyn Store>, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    (
        store::open(&url, Rules::default()).expect("store"),
        url,
        dir,
    )
}

/// Parses messages with the given receive time trusted (as `import` does).
pub fn events(messages: &[Value]) -> Vec<Event> {
    let opts = ParseOptions {
        now: jiff::Timestamp::now(),
        source_id: "src_web".into(),
        trust_received_at: true,
    };
    messages
        .iter()
        .map(|m| Event::from_json(m, None, &opts).unwrap_or_else(|e| panic!("{m}: {e}")))
        .collect()
}

/// Stores `messages`.
pub fn ingest(store: &mut dyn Store, messages: &[Value]) {
    store.ingest(events(messages)).expect("ingest");
}
