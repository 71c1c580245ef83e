//! `spec.warehouse`: which warehouse a connection lands data in and how to reach it.
//!
//! One settings block per warehouse type holds only non-secret connection settings; credentials
//! live in the Secret named by `credentialsSecretRef` and never appear in a spec or status.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The kinds of warehouse profiles-sync can land data in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WarehouseType {
    /// PostgreSQL 12 or newer.
    Postgres,
    /// Snowflake.
    Snowflake,
    /// Google BigQuery.
    Bigquery,
    /// Amazon Redshift.
    Redshift,
    /// Databricks SQL (Unity Catalog).
    Databricks,
    /// Azure Synapse Analytics (dedicated SQL pool).
    AzureSynapse,
    /// An embedded SQLite file (local runs and the demo).
    Sqlite,
}

impl WarehouseType {
    /// The name used in the spec (`postgres`, `azureSynapse`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            WarehouseType::Postgres => "postgres",
            WarehouseType::Snowflake => "snowflake",
            WarehouseType::Bigquery => "bigquery",
            WarehouseType::Redshift => "redshift",
            WarehouseType::Databricks => "databricks",
            WarehouseType::AzureSynapse => "azureSynapse",
            WarehouseType::Sqlite => "sqlite",
        }
    }

    /// Every type, in the order of the spec's documentation.
    pub const ALL: [WarehouseType; 7] = [
        WarehouseType::Postgres,
        WarehouseType::Snowflake,
        WarehouseType::Bigquery,
        WarehouseType::Redshift,
        WarehouseType::Databricks,
        WarehouseType::AzureSynapse,
        WarehouseType::Sqlite,
    ];
}

impl WarehouseSpec {
    /// Where the syncs land, in words: the type and the settings that name the database
    /// (server, database or catalog, file), not those of how to reach it (TLS, compute,
    /// credentials). `postgres db.example.com:5432/analytics`.
    ///
    /// Compared with the destination a status or a Job recorded: a change of these words from
    /// one release to the next turns every connection's BackfillComplete Unknown at the upgrade
    /// (tests pin them).
    pub fn destination(&self) -> String {
        let server = |host: &str, port: u16, database: &str| format!("{host}:{port}/{database}");
        let place = match self.r#type {
            WarehouseType::Postgres => self
                .postgres
                .as_ref()
                .map(|s| server(&s.host, s.port, &s.database)),
            WarehouseType::Snowflake => self.snowflake.as_ref().map(|s| {
                let host = s
                    .host
                    .as_deref()
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                format!("{}{host}/{}", s.account, s.database)
            }),
            WarehouseType::Bigquery => self.bigquery.as_ref().map(|s| {
                let at = s
                    .endpoint
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                format!("{}{at} in {}", s.project, s.location)
            }),
            WarehouseType::Redshift => self
                .redshift
                .as_ref()
                .map(|s| server(&s.host, s.port, &s.database)),
            WarehouseType::Databricks => self
                .databricks
                .as_ref()
                .map(|s| format!("{}/{}", s.host, s.catalog)),
            WarehouseType::AzureSynapse => self
                .azure_synapse
                .as_ref()
                .map(|s| server(&s.host, s.port, &s.database)),
            WarehouseType::Sqlite => self.sqlite.as_ref().map(|s| s.path.clone()),
        };
        match place {
            Some(p) => format!("{} {p}", self.r#type),
            None => format!("{} (no settings)", self.r#type),
        }
    }
}

impl std::fmt::Display for WarehouseType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the data lands: the warehouse type, its settings block and the Secret with credentials.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(self.type == 'postgres') == has(self.postgres)").message("warehouse.postgres must be set when, and only when, warehouse.type is postgres"),
    validation = Rule::new("(self.type == 'snowflake') == has(self.snowflake)").message("warehouse.snowflake must be set when, and only when, warehouse.type is snowflake"),
    validation = Rule::new("(self.type == 'bigquery') == has(self.bigquery)").message("warehouse.bigquery must be set when, and only when, warehouse.type is bigquery"),
    validation = Rule::new("(self.type == 'redshift') == has(self.redshift)").message("warehouse.redshift must be set when, and only when, warehouse.type is redshift"),
    validation = Rule::new("(self.type == 'databricks') == has(self.databricks)").message("warehouse.databricks must be set when, and only when, warehouse.type is databricks"),
    validation = Rule::new("(self.type == 'azureSynapse') == has(self.azureSynapse)").message("warehouse.azureSynapse must be set when, and only when, warehouse.type is azureSynapse"),
    validation = Rule::new("(self.type == 'sqlite') == has(self.sqlite)").message("warehouse.sqlite must be set when, and only when, warehouse.type is sqlite"),
    validation = Rule::new("self.type == 'sqlite' || has(self.credentialsSecretRef)").message("warehouse.credentialsSecretRef is required for every warehouse type except sqlite")
)]
pub struct WarehouseSpec {
    /// The warehouse type. Immutable: to sync into a different warehouse, create a new WarehouseConnection.
    #[x_kube(validation = Rule::new("self == oldSelf").message("warehouse.type is immutable; create a new WarehouseConnection to sync into a different warehouse"))]
    #[serde(rename = "type")]
    pub r#type: WarehouseType,
    /// Connection settings when type is postgres.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSettings>,
    /// Connection settings when type is snowflake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snowflake: Option<SnowflakeSettings>,
    /// Connection settings when type is bigquery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bigquery: Option<BigQuerySettings>,
    /// Connection settings when type is redshift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redshift: Option<RedshiftSettings>,
    /// Connection settings when type is databricks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub databricks: Option<DatabricksSettings>,
    /// Connection settings when type is azureSynapse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_synapse: Option<AzureSynapseSettings>,
    /// Settings when type is sqlite (an embedded warehouse file; no credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlite: Option<SqliteSettings>,
    /// The Secret (in the connection's namespace) that holds the warehouse credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<CredentialsSecretRef>,
}

/// TLS mode for PostgreSQL-protocol warehouses, with libpq's meaning.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, without certificate verification.
    Prefer,
    /// TLS required, without certificate verification.
    #[default]
    Require,
    /// TLS required; the server certificate must chain to a trusted CA (the system's, or the
    /// credentials Secret's caCertKey).
    VerifyCa,
    /// TLS required; the certificate must chain to a trusted CA (as for verify-ca) and match the
    /// host name.
    VerifyFull,
}

fn default_postgres_port() -> u16 {
    5432
}
fn default_redshift_port() -> u16 {
    5439
}
fn default_synapse_port() -> u16 {
    1433
}

/// How to reach a PostgreSQL server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSettings {
    /// Host name or IP address of the server.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// TCP port of the server.
    #[serde(default = "default_postgres_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Database to connect to; the schema is created inside it.
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
    /// TLS mode (disable, prefer, require, verify-ca, verify-full).
    #[serde(default)]
    pub ssl_mode: SslMode,
}

/// How to reach a Snowflake account.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnowflakeSettings {
    /// Account identifier (`orgname-accountname` or the account locator with region).
    #[schemars(length(min = 1, max = 255))]
    pub account: String,
    /// Virtual warehouse that runs the loads.
    #[schemars(length(min = 1, max = 255))]
    pub warehouse: String,
    /// Database that holds the schema.
    #[schemars(length(min = 1, max = 255))]
    pub database: String,
    /// Role to assume; the user's default role when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Override of the account URL host (for private link or an emulator); derived from the account when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// How to reach a BigQuery project.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BigQuerySettings {
    /// Google Cloud project id that holds the dataset.
    #[schemars(length(min = 1, max = 63))]
    pub project: String,
    /// Dataset location (`US`, `EU`, or a region such as `europe-west1`).
    #[serde(default = "default_bigquery_location")]
    pub location: String,
    /// Override of the API endpoint (for private service connect or an emulator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

fn default_bigquery_location() -> String {
    "US".into()
}

/// How to reach an Amazon Redshift cluster or workgroup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedshiftSettings {
    /// Endpoint host name of the cluster or serverless workgroup.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// TCP port of the endpoint.
    #[serde(default = "default_redshift_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Database that holds the schema.
    #[schemars(length(min = 1, max = 127))]
    pub database: String,
    /// TLS mode (disable, prefer, require, verify-ca, verify-full).
    #[serde(default)]
    pub ssl_mode: SslMode,
}

/// How to reach a Databricks SQL warehouse.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabricksSettings {
    /// Workspace host name (`dbc-1234.cloud.databricks.com`).
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// HTTP path of the SQL warehouse (`/sql/1.0/warehouses/abc123`).
    #[schemars(length(min = 1, max = 1024))]
    pub http_path: String,
    /// Unity Catalog catalog that holds the schema.
    #[schemars(length(min = 1, max = 255))]
    pub catalog: String,
}

/// How to reach an Azure Synapse dedicated SQL pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureSynapseSettings {
    /// Server host name (`myworkspace.sql.azuresynapse.net`).
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// TCP port of the server.
    #[serde(default = "default_synapse_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Dedicated SQL pool (database) that holds the schema.
    #[schemars(length(min = 1, max = 128))]
    pub database: String,
}

/// Where an embedded SQLite warehouse file lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SqliteSettings {
    /// Path of the SQLite file, created when missing. The tables live in the file itself (SQLite
    /// has no schemas: `spec.schema` is not used), so two connections must not share a file —
    /// they would share its tables and their cursors.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}
fn default_private_key_key() -> String {
    "privateKey".into()
}
fn default_service_account_key() -> String {
    "serviceAccount.json".into()
}
fn default_token_key() -> String {
    "token".into()
}

fn default_ca_cert_key() -> String {
    "ca.crt".into()
}

/// What a Secret's key may be (Kubernetes' own rule for Secret and ConfigMap keys, with the
/// fields' `length(max = 253)`): letters, digits, `-`, `_` and `.`, but not `.` or `..` and not
/// starting with `..` — names the Secret's mounted directory gives its own entries (`..data`),
/// which no Secret can hold. Each key field of [`CredentialsSecretRef`] carries it.
pub const SECRET_KEY_PATTERN: &str = r"^\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*$";

/// A Secret holding warehouse credentials, and which of its keys hold what. Only the keys the
/// warehouse type uses are read: username+password (postgres, redshift, azureSynapse, snowflake),
/// privateKey (snowflake key-pair auth, instead of password), serviceAccount.json (bigquery), token (databricks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret, in the same namespace as the WarehouseConnection.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the Secret that holds the user name.
    #[serde(default = "default_username_key")]
    #[schemars(regex(pattern = SECRET_KEY_PATTERN), length(max = 253))]
    pub username_key: String,
    /// Key of the Secret that holds the password.
    #[serde(default = "default_password_key")]
    #[schemars(regex(pattern = SECRET_KEY_PATTERN), length(max = 253))]
    pub password_key: String,
    /// Key of the Secret that holds a PEM private key (Snowflake key-pair authentication).
    #[serde(default = "default_private_key_key")]
    #[schemars(regex(pattern = SECRET_KEY_PATTERN), length(max = 253))]
    pub private_key_key: String,
    /// Key of the Secret that holds a Google service-account JSON key (BigQuery).
    #[serde(default = "default_service_account_key")]
    #[schemars(regex(pattern = SECRET_KEY_PATTERN), length(max = 253))]
    pub service_account_key: String,
    /// Key of the Secret that holds an access token (Databricks).
    #[serde(default = "default_token_key")]
    #[schemars(regex(pattern = SECRET_KEY_PATTERN), length(max = 253))]
    pub token_key: String,
    /// Key of the Secret that holds PEM CA certificates to trust, for sslMode verify-ca and
    /// verify-full (a private CA, a cloud provider's bundle): when the Secret has it, those
    /// alone are trusted, else the system's CAs. Optional.
    #[serde(default = "default_ca_cert_key")]
    #[schemars(regex(pattern = SECRET_KEY_PATTERN), length(max = 253))]
    pub ca_cert_key: String,
}

impl CredentialsSecretRef {
    /// A reference to `name` with every key at its default name.
    pub fn named(name: impl Into<String>) -> Self {
        CredentialsSecretRef {
            name: name.into(),
            username_key: default_username_key(),
            password_key: default_password_key(),
            private_key_key: default_private_key_key(),
            service_account_key: default_service_account_key(),
            token_key: default_token_key(),
            ca_cert_key: default_ca_cert_key(),
        }
    }
}
