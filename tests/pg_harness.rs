//! The test PostgreSQL harness starts a real server that the other suites can use.

mod support;

#[test]
fn a_throwaway_server_accepts_ddl_and_queries() {
    let pg = support::pg::shared();
    let db = pg.create_database("smoke");
    let mut client = pg.connect(&db);
    client
        .batch_execute("CREATE TABLE smoke (id bigint PRIMARY KEY, v text); INSERT INTO smoke VALUES (1, 'one'), (2, 'two');")
        .unwrap();
    let rows = client
        .query("SELECT v FROM smoke ORDER BY id", &[])
        .unwrap();
    let values: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(values, ["one", "two"]);
    assert_ne!(pg.port(), 5432, "the harness must not use the default port");
}

#[test]
fn a_dropped_server_is_stopped_and_removed() {
    let pg = support::pg::PgServer::start();
    let dir = pg.dir().to_path_buf();
    let url = pg.url("postgres");
    pg.connect("postgres").batch_execute("SELECT 1").unwrap();
    drop(pg);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(
        postgres::Client::connect(&url, postgres::NoTls).is_err(),
        "server still answers"
    );
}
