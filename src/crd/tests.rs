//! Unit tests of the CRD types: defaults, serde round-trips, the CEL rules (evaluated client-side
//! with kube's CEL support) and the documentation of every schema property.

use super::*;
use kube::CustomResourceExt;
use serde_json::{Value, json};

fn connection(spec: Value) -> WarehouseConnection {
    serde_json::from_value(json!({
        "apiVersion": "profilesync.dev/v1alpha1",
        "kind": "WarehouseConnection",
        "metadata": {"name": "wh", "namespace": "default"},
        "spec": spec,
    }))
    .expect("valid WarehouseConnection")
}

fn postgres_spec() -> Value {
    json!({
        "warehouse": {
            "type": "postgres",
            "postgres": {"host": "db", "database": "analytics"},
            "credentialsSecretRef": {"name": "creds"}
        }
    })
}

fn selective_sync(spec: Value) -> SelectiveSync {
    serde_json::from_value(json!({
        "apiVersion": "profilesync.dev/v1alpha1",
        "kind": "SelectiveSync",
        "metadata": {"name": "sel", "namespace": "default"},
        "spec": spec,
    }))
    .expect("valid SelectiveSync")
}

fn messages(err: kube::core::cel::ValidationErrors) -> String {
    err.iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn connection_defaults_match_the_design() {
    let c = connection(postgres_spec());
    assert_eq!(c.spec.schema, "profiles_sync");
    assert_eq!(c.spec.schedule, "1h");
    assert!(!c.spec.suspend);
    assert_eq!(c.spec.backfill.events, "60d");
    assert_eq!(
        c.spec.backfill.events_window(),
        Some(std::time::Duration::from_secs(60 * 24 * 3600))
    );
    assert_eq!(c.spec.backfill.max_event_tables, 2000);
    let pg = c.spec.warehouse.postgres.as_ref().expect("postgres block");
    assert_eq!(pg.port, 5432);
    assert_eq!(pg.ssl_mode, SslMode::Require);
    let creds = c
        .spec
        .warehouse
        .credentials_secret_ref
        .as_ref()
        .expect("secret ref");
    assert_eq!(creds, &CredentialsSecretRef::named("creds"));
}

/// A backfill window other than days or hours is refused by `validate` (what a local `sync -f`
/// checks; the API server has the CRD's pattern) — one ending in a multi-byte character too,
/// which panicked the window's parser (it cut the text at a byte position).
#[test]
fn a_backfill_window_that_is_no_days_or_hours_is_refused_without_a_panic() {
    for bad in ["5日", "日", "+5d", "5", "0x5d", ""] {
        let mut c = connection(postgres_spec());
        c.spec.backfill.events = bad.into();
        let err = c.spec.validate_fields().unwrap_err();
        assert!(err.contains("spec.backfill.events"), "{bad}: {err}");
    }
}

/// Port 0 is no server's port: the schema refuses it (it allowed 0 to 65535, and the sync then
/// failed "Connection refused" without naming the port), and so does a local `sync -f`.
#[test]
fn a_port_of_zero_is_refused_by_the_schema_and_the_field_check() {
    let whc = serde_json::to_value(WarehouseConnection::crd()).unwrap();
    let warehouse = &whc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["warehouse"]["properties"];
    for block in ["postgres", "redshift", "azureSynapse"] {
        let port = &warehouse[block]["properties"]["port"];
        assert_eq!(port["minimum"].as_f64(), Some(1.0), "{block}: {port}");
        assert_eq!(port["maximum"].as_f64(), Some(65535.0), "{block}: {port}");
    }
    let mut c = connection(postgres_spec());
    c.spec.validate_fields().unwrap();
    c.spec.warehouse.postgres.as_mut().unwrap().port = 0;
    let err = c.spec.validate_fields().unwrap_err();
    assert!(err.contains("spec.warehouse.postgres.port 0"), "{err}");
}

#[test]
fn schema_defaults_are_published_for_the_api_server() {
    // The API server applies defaults from the schema, so `kubectl get -o yaml` shows them.
    let crd = serde_json::to_value(WarehouseConnection::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["schema"]["default"], "profiles_sync");
    assert_eq!(spec["properties"]["schedule"]["default"], "1h");
    assert_eq!(spec["properties"]["suspend"]["default"], false);
    assert_eq!(
        spec["properties"]["backfill"]["properties"]["events"]["default"],
        "60d"
    );
}

#[test]
fn selective_sync_defaults() {
    let s = selective_sync(json!({"connectionRef": {"name": "wh"}, "tables": [{"name": "pages"}]}));
    assert_eq!(s.spec.default, TableDefault::All);
    assert!(s.spec.tables[0].enabled);
    assert!(s.spec.table_enabled("pages"));
    assert!(s.spec.table_enabled("order_completed"));
}

#[test]
fn serde_round_trips_preserve_every_field() {
    let mut c = connection(json!({
        "warehouse": {
            "type": "snowflake",
            "snowflake": {"account": "org-acct", "warehouse": "W", "database": "D", "role": "R"},
            "credentialsSecretRef": {"name": "creds", "passwordKey": "pw"}
        },
        "schema": "analytics_2",
        "suspend": true,
        "schedule": "0 */2 * * *",
        "backfill": {"events": "7d", "maxEventTables": 10},
        "limits": {"maxRows": 1000000, "maxBytes": 1073741824}
    }));
    c.status = Some(WarehouseConnectionStatus {
        observed_generation: Some(3),
        frequency: Some("cron 0 */2 * * *".into()),
        syncs: vec![SyncRecord {
            id: "wh-29000000".into(),
            status: SyncStatus::PartialSuccess,
            start_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T00:00:00Z".parse().unwrap(),
            ),
            duration_seconds: 12.5,
            rows: SyncRows {
                total: 10,
                identity_graph: 4,
                event_types: 3,
                events: 3,
            },
            tables: vec![FailedTable {
                name: "order_completed".into(),
                class: ErrorClass::TypeConflict,
                message: "column total is integer".into(),
            }],
            errors: vec![],
            job_name: Some("wh-29000000".into()),
        }],
        ..Default::default()
    });
    let json = serde_json::to_value(&c).unwrap();
    let back: WarehouseConnection = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, c);
    assert_eq!(
        json["spec"]["warehouse"]["credentialsSecretRef"]["passwordKey"],
        "pw"
    );
    assert_eq!(json["status"]["syncs"][0]["status"], "PartialSuccess");
    assert_eq!(
        json["status"]["syncs"][0]["tables"][0]["class"],
        "TypeConflict"
    );

    let s = selective_sync(json!({
        "connectionRef": {"name": "wh"},
        "default": "none",
        "tables": [
            {"name": "tracks", "enabled": true, "columns": {"include": ["event", "context_ip"]}},
            {"name": "pages", "enabled": false}
        ]
    }));
    let back: SelectiveSync = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn valid_objects_pass_every_cel_rule() {
    let c = connection(postgres_spec());
    c.validate_cel().map_err(messages).unwrap();
    c.validate_cel_update(&c).map_err(messages).unwrap();
    for schedule in ["1h", "15m", "1h30m", "0 * * * *", "@daily", "*/30 * * * *"] {
        let mut c = c.clone();
        c.spec.schedule = schedule.into();
        c.validate_cel().map_err(messages).unwrap();
    }
    let sqlite =
        connection(json!({"warehouse": {"type": "sqlite", "sqlite": {"path": "/tmp/w.db"}}}));
    sqlite.validate_cel().map_err(messages).unwrap();
    let s = selective_sync(
        json!({"connectionRef": {"name": "wh"}, "tables": [{"name": "tracks", "columns": {"exclude": ["context_ip"]}}]}),
    );
    s.validate_cel().map_err(messages).unwrap();
    s.validate_cel_update(&s).map_err(messages).unwrap();
}

#[test]
fn changing_the_schema_is_rejected_with_what_to_do_instead() {
    let old = connection(postgres_spec());
    let mut new = old.clone();
    new.spec.schema = "other".into();
    let err = messages(new.validate_cel_update(&old).unwrap_err());
    assert!(
        err.contains(
            "schema is immutable; create a new WarehouseConnection to sync into another schema"
        ),
        "{err}"
    );
}

#[test]
fn changing_the_warehouse_type_is_rejected() {
    let old = connection(postgres_spec());
    let mut new = old.clone();
    new.spec.warehouse.r#type = WarehouseType::Redshift;
    new.spec.warehouse.postgres = None;
    new.spec.warehouse.redshift = Some(RedshiftSettings {
        host: "rs".into(),
        port: 5439,
        database: "dev".into(),
        ssl_mode: SslMode::Require,
    });
    new.validate_cel().map_err(messages).unwrap();
    let err = messages(new.validate_cel_update(&old).unwrap_err());
    assert!(
        err.contains("warehouse.type is immutable; create a new WarehouseConnection"),
        "{err}"
    );
}

#[test]
fn other_spec_changes_are_allowed() {
    let old = connection(postgres_spec());
    let mut new = old.clone();
    new.spec.suspend = true;
    new.spec.schedule = "30m".into();
    new.spec.warehouse.postgres.as_mut().unwrap().host = "db2".into();
    new.validate_cel_update(&old).map_err(messages).unwrap();
}

#[test]
fn changing_the_connection_ref_is_rejected() {
    let old = selective_sync(json!({"connectionRef": {"name": "wh"}}));
    let mut new = old.clone();
    new.spec.connection_ref.name = "other".into();
    let err = messages(new.validate_cel_update(&old).unwrap_err());
    assert!(
        err.contains(
            "connectionRef is immutable; create a new SelectiveSync for the other connection"
        ),
        "{err}"
    );
    let mut fine = old.clone();
    fine.spec.default = TableDefault::None;
    fine.validate_cel_update(&old).map_err(messages).unwrap();
}

#[test]
fn schedules_below_fifteen_minutes_or_malformed_are_rejected() {
    for schedule in ["14m", "5m", "0h", "every hour", "1d", "* * *"] {
        let mut c = connection(postgres_spec());
        c.spec.schedule = schedule.into();
        let err = c.validate_cel().expect_err(schedule);
        assert!(
            messages(err).contains("schedule must be an interval of at least 15m"),
            "{schedule}"
        );
        assert!(
            schedule.parse::<Schedule>().is_err(),
            "{schedule} parses in Rust but not in CEL"
        );
    }
}

#[test]
fn the_settings_block_must_match_the_type() {
    let c = connection(json!({
        "warehouse": {
            "type": "postgres",
            "snowflake": {"account": "a", "warehouse": "w", "database": "d"},
            "credentialsSecretRef": {"name": "creds"}
        }
    }));
    let err = messages(c.validate_cel().unwrap_err());
    assert!(
        err.contains(
            "warehouse.postgres must be set when, and only when, warehouse.type is postgres"
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "warehouse.snowflake must be set when, and only when, warehouse.type is snowflake"
        ),
        "{err}"
    );
}

#[test]
fn credentials_are_required_except_for_sqlite() {
    let c = connection(
        json!({"warehouse": {"type": "postgres", "postgres": {"host": "db", "database": "d"}}}),
    );
    let err = messages(c.validate_cel().unwrap_err());
    assert!(err.contains("credentialsSecretRef is required"), "{err}");
}

#[test]
fn include_and_exclude_together_are_rejected() {
    let s = selective_sync(json!({
        "connectionRef": {"name": "wh"},
        "tables": [{"name": "tracks", "columns": {"include": ["a"], "exclude": ["b"]}}]
    }));
    let err = messages(s.validate_cel().unwrap_err());
    assert!(
        err.contains("set either columns.include or columns.exclude, not both"),
        "{err}"
    );
    assert_eq!(
        s.spec.validate(),
        Err(SelectionError::IncludeAndExclude("tracks".into()))
    );
}

#[test]
fn table_specific_keys_and_materialized_columns_are_refused_by_both_checks() {
    // `seq` in a change log's exclude list is checked by the controller and the sync only: a CEL
    // rule searching a 5,000-item list inside the 5,000-item table list would exceed the API
    // server's cost budget.
    for (table, columns, cel, own) in [
        (
            "user_traits",
            json!({"exclude": ["value"]}),
            Some("keep every column"),
            SelectionError::MaterializedColumns("user_traits".into()),
        ),
        (
            "profile_merges",
            json!({"include": ["segment_id"]}),
            Some("keep every column"),
            SelectionError::MaterializedColumns("profile_merges".into()),
        ),
        (
            "external_id_mapping_updates",
            json!({"exclude": ["external_id_value", "seq"]}),
            None,
            SelectionError::RequiredColumnExcluded {
                table: "external_id_mapping_updates".into(),
                column: "seq".into(),
            },
        ),
    ] {
        let s = selective_sync(json!({
            "connectionRef": {"name": "wh"},
            "tables": [{"name": table, "columns": columns}]
        }));
        match cel {
            Some(cel) => {
                let err = messages(s.validate_cel().unwrap_err());
                assert!(err.contains(cel), "{table}: {err}");
            }
            None => s.validate_cel().map_err(messages).unwrap(),
        }
        assert_eq!(s.spec.validate(), Err(own), "{table}");
    }
    // `seq` is only a key of the change logs; elsewhere, and any other fixed column, it can go.
    let s = selective_sync(json!({
        "connectionRef": {"name": "wh"},
        "tables": [
            {"name": "order_completed", "columns": {"exclude": ["seq", "user_id", "context_ip"]}},
            {"name": "id_graph_updates", "columns": {"include": ["segment_id"]}}
        ]
    }));
    s.validate_cel().map_err(messages).unwrap();
    assert_eq!(s.spec.validate(), Ok(()));
    assert!(!s.spec.column_enabled("order_completed", "seq"));
    assert!(!s.spec.column_enabled("order_completed", "user_id"));
    assert!(s.spec.column_enabled("order_completed", "id"));
    assert!(s.spec.column_enabled("id_graph_updates", "seq"));
    assert!(s.spec.column_enabled("id_graph_updates", "received_at"));
    assert!(
        !s.spec
            .column_enabled("id_graph_updates", "canonical_segment_id")
    );
}

#[test]
fn selection_limits_and_key_columns_are_enforced() {
    let mut s = selective_sync(json!({"connectionRef": {"name": "wh"}})).spec;
    s.tables = (0..=MAX_TABLES)
        .map(|i| TableSelection {
            name: format!("t{i}"),
            enabled: true,
            columns: None,
        })
        .collect();
    assert_eq!(s.validate(), Err(SelectionError::TooManyTables(5001)));
    s.tables.truncate(MAX_TABLES);
    assert_eq!(s.validate(), Ok(()));

    s.tables = vec![TableSelection {
        name: "tracks".into(),
        enabled: true,
        columns: Some(ColumnSelection {
            include: None,
            exclude: Some(
                (0..=MAX_COLUMNS_PER_TABLE)
                    .map(|i| format!("c{i}"))
                    .collect(),
            ),
        }),
    }];
    assert_eq!(
        s.validate(),
        Err(SelectionError::TooManyColumns {
            table: "tracks".into(),
            count: 5001
        })
    );
    for key in REQUIRED_COLUMNS {
        s.tables[0].columns = Some(ColumnSelection {
            include: None,
            exclude: Some(vec![key.into()]),
        });
        let err = s.validate().unwrap_err();
        assert!(err.to_string().contains("can't be excluded"), "{err}");
    }
}

#[test]
fn column_selection_semantics() {
    let s = selective_sync(json!({
        "connectionRef": {"name": "wh"},
        "default": "none",
        "tables": [
            {"name": "tracks", "columns": {"include": ["event"]}},
            {"name": "pages", "columns": {"exclude": ["context_ip"]}},
            {"name": "screens", "enabled": false}
        ]
    }))
    .spec;
    assert!(s.table_enabled("tracks") && s.table_enabled("pages"));
    assert!(!s.table_enabled("screens") && !s.table_enabled("identifies"));
    assert!(s.column_enabled("tracks", "event"));
    assert!(s.column_enabled("tracks", "id") && s.column_enabled("tracks", "received_at"));
    assert!(!s.column_enabled("tracks", "context_ip"));
    assert!(!s.column_enabled("pages", "context_ip"));
    assert!(s.column_enabled("pages", "url"));
}

#[test]
fn limits_and_key_columns_are_in_the_published_schema() {
    let crd = serde_json::to_value(SelectiveSync::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["tables"]["maxItems"], 5000);
    assert_eq!(
        spec["properties"]["tables"]["x-kubernetes-list-type"],
        "map"
    );
    let columns = &spec["properties"]["tables"]["items"]["properties"]["columns"]["properties"];
    assert_eq!(columns["include"]["maxItems"], 5000);
    assert_eq!(columns["exclude"]["maxItems"], 5000);
    assert_eq!(
        columns["exclude"]["items"]["not"]["enum"],
        json!(["id", "received_at"])
    );
    assert_eq!(
        spec["properties"]["tables"]["items"]["properties"]["name"]["pattern"],
        TABLE_NAME_PATTERN
    );
    let whc = serde_json::to_value(WarehouseConnection::crd()).unwrap();
    let schema = &whc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["schema"];
    assert_eq!(schema["pattern"], "^[a-z_][a-z0-9_]*$");
    assert_eq!(schema["maxLength"], 63);
}

/// Every Secret key field of `credentialsSecretRef` refuses what Kubernetes refuses as a Secret
/// key — `.`, `..` and names starting with `..` (the Secret's mount names its own entries so:
/// `..data`, where the sync would read a directory) — and takes every key a Secret can hold.
#[test]
fn secret_key_fields_take_the_keys_a_secret_can_hold() {
    let whc = serde_json::to_value(WarehouseConnection::crd()).unwrap();
    let secret_ref = &whc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["warehouse"]["properties"]["credentialsSecretRef"]["properties"];
    let keys: Vec<&String> = secret_ref
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.as_str() != "name")
        .collect();
    assert_eq!(keys.len(), 6, "{keys:?}");
    for key in keys {
        assert_eq!(secret_ref[key]["pattern"], SECRET_KEY_PATTERN, "{key}");
        assert_eq!(secret_ref[key]["maxLength"], 253, "{key}");
    }
    let pattern = regex::Regex::new(SECRET_KEY_PATTERN).unwrap();
    for ok in [
        "password",
        "ca.crt",
        ".hidden",
        "a..b",
        "-k",
        "_k",
        "serviceAccount.json",
        "k.",
    ] {
        assert!(pattern.is_match(ok), "{ok} refused");
    }
    for refused in [".", "..", "..data", "...", "", "a/b", "a b", "ключ"] {
        assert!(!pattern.is_match(refused), "{refused:?} taken");
    }
}

/// Walks a schema and collects the path of every property that has no description.
fn undocumented(schema: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            let p = format!("{path}.{name}");
            let documented = prop
                .get("description")
                .and_then(Value::as_str)
                .is_some_and(|d| !d.trim().is_empty());
            // apiVersion, kind and metadata are described by Kubernetes itself.
            let builtin =
                path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&name.as_str());
            if !documented && !builtin {
                out.push(p.clone());
            }
            undocumented(prop, &p, out);
        }
    }
    if let Some(items) = schema.get("items") {
        undocumented(items, &format!("{path}[]"), out);
    }
    if let Some(extra) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        undocumented(extra, &format!("{path}{{}}"), out);
    }
}

#[test]
fn every_schema_property_has_a_description() {
    for (file, crd) in all_crds() {
        let crd = serde_json::to_value(&crd).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut missing = vec![];
        undocumented(schema, "", &mut missing);
        assert!(
            missing.is_empty(),
            "{file}: properties without a description: {missing:?}"
        );
    }
}

#[test]
fn every_cel_rule_compiles() {
    for (file, crd) in all_crds() {
        let crd = serde_json::to_value(&crd).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let compiled = kube::core::cel::compile_schema(schema);
        let mut errors = vec![];
        collect_compilation_errors(&compiled, &mut errors);
        assert!(errors.is_empty(), "{file}: {errors:?}");
    }
}

fn collect_compilation_errors(s: &kube::core::cel::CompiledSchema, out: &mut Vec<String>) {
    out.extend(s.compilation_errors().iter().map(|e| e.to_string()));
    for child in s.properties.values() {
        collect_compilation_errors(child, out);
    }
    if let Some(items) = &s.items {
        collect_compilation_errors(items, out);
    }
}

#[test]
fn crds_have_names_categories_columns_and_status() {
    let whc = WarehouseConnection::crd();
    assert_eq!(whc.spec.names.short_names, Some(vec!["whc".to_string()]));
    assert_eq!(whc.spec.names.categories, Some(vec![CATEGORY.to_string()]));
    assert_eq!(whc.spec.scope, "Namespaced");
    let v = &whc.spec.versions[0];
    assert_eq!(v.name, VERSION);
    assert!(
        v.subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
    );
    let cols: Vec<_> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        cols,
        [
            "Type",
            "Schema",
            "Suspended",
            "Ready",
            "Last Sync",
            "Status",
            "Rows",
            "Next Sync",
            "Age"
        ]
    );
    let ss = SelectiveSync::crd();
    assert_eq!(ss.spec.names.short_names, Some(vec!["ssync".to_string()]));
    let cols: Vec<_> = ss.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(cols, ["Connection", "Ready", "Tables", "Age"]);
    assert_eq!(whc.spec.group, GROUP);
}

#[test]
fn conditions_are_a_list_map_keyed_by_type() {
    for (file, crd) in all_crds() {
        let crd = serde_json::to_value(&crd).unwrap();
        let conditions = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
            ["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{file}");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            json!(["type"]),
            "{file}"
        );
        for field in ["type", "status", "reason", "message", "lastTransitionTime"] {
            assert!(
                conditions["items"]["properties"].get(field).is_some(),
                "{file}: {field}"
            );
        }
    }
}

#[test]
fn no_credential_field_exists_in_any_spec() {
    for (file, crd) in all_crds() {
        let text = serde_json::to_string(&crd.spec.versions[0].schema)
            .unwrap()
            .to_lowercase();
        for forbidden in [
            "\"password\":",
            "\"token\":",
            "\"privatekey\":",
            "\"secret\":",
        ] {
            assert!(
                !text.contains(forbidden),
                "{file} has a {forbidden} property"
            );
        }
    }
}

/// Every Track event table the sync can name — whatever the event's characters — is a name a
/// selection may list, and a name the sync never produces (uppercase, spaces, quotes) is refused.
#[test]
fn the_table_name_pattern_admits_every_name_the_sync_produces() {
    use crate::sync::naming::table_name;
    let pattern = regex::Regex::new(TABLE_NAME_PATTERN).unwrap();
    for event in [
        "Order Completed",
        "Größe geändert",
        "注文完了",
        "Ωmega Δelta",
        "3D Viewed",
        "select",
        "Pages",
        "ǅungla",
        "٣ items",
        "a\"b;c",
        &"x".repeat(300),
    ] {
        let name = table_name(event);
        assert!(pattern.is_match(&name), "{event:?} → {name:?}");
    }
    for refused in ["Order_Completed", "order completed", "a\"b", "", "a-b"] {
        assert!(!pattern.is_match(refused), "{refused:?}");
    }
}

proptest::proptest! {
    #[test]
    fn any_event_names_table_matches_the_pattern(event in "\\PC{1,40}") {
        let name = crate::sync::naming::table_name(&event);
        let pattern = regex::Regex::new(TABLE_NAME_PATTERN).unwrap();
        proptest::prop_assert!(pattern.is_match(&name), "{:?} → {:?}", event, name);
    }
}

#[test]
fn a_destination_names_the_database_and_schema_not_how_they_are_reached() {
    let mut spec = postgres_spec();
    spec["schema"] = json!("sales");
    let c = connection(spec.clone());
    assert_eq!(
        c.spec.destination(),
        "postgres db:5432/analytics, schema sales"
    );
    // TLS and credentials are how, not where.
    spec["warehouse"]["postgres"]["sslMode"] = json!("verify-full");
    spec["warehouse"]["credentialsSecretRef"]["name"] = json!("other");
    assert_eq!(
        connection(spec.clone()).spec.destination(),
        c.spec.destination()
    );
    spec["warehouse"]["postgres"]["database"] = json!("analytics2");
    assert_ne!(connection(spec).spec.destination(), c.spec.destination());
    let sqlite =
        connection(json!({"warehouse": {"type": "sqlite", "sqlite": {"path": "/data/w.db"}}}));
    assert_eq!(sqlite.spec.destination(), "sqlite /data/w.db");
    let snowflake = connection(json!({"warehouse": {"type": "snowflake",
        "snowflake": {"account": "org-acct", "warehouse": "LOAD_WH", "database": "ANALYTICS"},
        "credentialsSecretRef": {"name": "creds"}}}));
    assert_eq!(
        snowflake.spec.destination(),
        "snowflake org-acct/ANALYTICS, schema profiles_sync"
    );
    let missing = connection(json!({"warehouse": {"type": "redshift"}}));
    assert_eq!(
        missing.spec.destination(),
        "redshift (no settings), schema profiles_sync"
    );
}

/// A sync record without `rows`, or with only some counts, reads as zeros: whatever wrote it,
/// the controller still decodes its connection (an undecodable one is skipped: no syncs, no
/// status, no deletion).
#[test]
fn a_sync_record_without_rows_reads_as_zeros() {
    let record: SyncRecord = serde_json::from_value(json!({
        "id": "c-1", "status": "Unknown", "startTime": "2025-03-01T10:00:00Z",
        "durationSeconds": 0.0
    }))
    .expect("a record without rows");
    assert_eq!(record.rows, SyncRows::default());
    let partial: SyncRows = serde_json::from_value(json!({"total": 3})).unwrap();
    assert_eq!(partial.total, 3);
}
