//! Warehouse credentials, read from files named after the Secret's keys — the layout Kubernetes
//! gives a Secret mounted as a volume. They never come from arguments, the spec or the environment.

use std::path::Path;

use crate::crd::CredentialsSecretRef;

/// The credentials a warehouse type may use; only those present in the directory are set.
#[derive(Clone, Default)]
pub struct Credentials {
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// PEM private key (Snowflake key-pair authentication).
    pub private_key: Option<String>,
    /// Service-account JSON key (BigQuery).
    pub service_account: Option<String>,
    /// Access token (Databricks).
    pub token: Option<String>,
    /// PEM CA certificates to trust instead of the system's (verify-ca / verify-full).
    pub ca_cert: Option<String>,
}

// Credentials must never reach a log line through `{:?}`.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |v: &Option<String>| if v.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("Credentials")
            .field("username", &set(&self.username))
            .field("password", &set(&self.password))
            .field("private_key", &set(&self.private_key))
            .field("service_account", &set(&self.service_account))
            .field("token", &set(&self.token))
            .field("ca_cert", &set(&self.ca_cert))
            .finish()
    }
}

/// A credential file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("credential file {path}: {reason}")]
pub struct CredentialsError {
    /// The file.
    pub path: String,
    /// Why.
    pub reason: String,
}

impl Credentials {
    /// Reads the keys of `secret` through `value` (the controller passes a Secret's decoded
    /// `data`); a key `value` doesn't know leaves the field unset. Trailing newlines are dropped,
    /// as [`Credentials::from_dir`] does.
    pub fn from_lookup(
        secret: &CredentialsSecretRef,
        value: impl Fn(&str) -> Option<String>,
    ) -> Credentials {
        let read = |key: &str| value(key).map(|s| s.trim_end_matches(['\n', '\r']).to_string());
        Credentials {
            username: read(&secret.username_key),
            password: read(&secret.password_key),
            private_key: read(&secret.private_key_key),
            service_account: read(&secret.service_account_key),
            token: read(&secret.token_key),
            ca_cert: read(&secret.ca_cert_key).filter(|s| !s.trim().is_empty()),
        }
    }

    /// Reads the keys of `secret` that exist as files in `dir`. A missing file leaves the field
    /// unset (the warehouse decides what it needs); an unreadable one is an error.
    pub fn from_dir(
        dir: &Path,
        secret: &CredentialsSecretRef,
    ) -> Result<Credentials, CredentialsError> {
        // A directory that is not there is no Secret at all (a mount missing, a mistyped
        // path): said as such, not as "the Secret has no username key".
        if !dir.is_dir() {
            return Err(CredentialsError {
                path: dir.display().to_string(),
                reason: "the credentials directory does not exist (the Secret's mount, or --credentials-dir)".into(),
            });
        }
        let read = |key: &str| -> Result<Option<String>, CredentialsError> {
            let path = dir.join(key);
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok(Some(s.trim_end_matches(['\n', '\r']).to_string())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(CredentialsError {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }),
            }
        };
        Ok(Credentials {
            username: read(&secret.username_key)?,
            password: read(&secret.password_key)?,
            private_key: read(&secret.private_key_key)?,
            service_account: read(&secret.service_account_key)?,
            token: read(&secret.token_key)?,
            // Optional and only used by verify-ca / verify-full: read as the controller's
            // connection test reads it (a value that is not text, or blank, counts as absent),
            // so it can never fail a sync that does not use it.
            ca_cert: std::fs::read(dir.join(&secret.ca_cert_key))
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|s| !s.trim().is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_present_keys_and_never_prints_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("username"), "loader\n").unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret").unwrap();
        let mut r = CredentialsSecretRef::named("creds");
        r.password_key = "pw".into();
        let c = Credentials::from_dir(dir.path(), &r).unwrap();
        assert_eq!(c.username.as_deref(), Some("loader"));
        assert_eq!(c.password.as_deref(), Some("s3cret"));
        assert!(c.token.is_none());
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    /// A credentials directory that does not exist is said as such (it read as a Secret
    /// without keys: "no username key").
    #[test]
    fn a_missing_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = Credentials::from_dir(&missing, &CredentialsSecretRef::named("creds"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist") && e.contains("nope"), "{e}");
    }
}
