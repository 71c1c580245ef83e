//! Warehouse errors, classified the way the sync report and the status show them.

use crate::crd::ErrorClass;

/// An error from a warehouse, with its class and the warehouse's own message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct WarehouseError {
    /// Permission, Connection, Schema, TypeConflict, Quota or Internal.
    pub class: ErrorClass,
    /// What went wrong, in the warehouse's words (never with credentials).
    pub message: String,
}

impl WarehouseError {
    /// An error of `class`.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> WarehouseError {
        WarehouseError {
            class,
            message: message.into(),
        }
    }

    /// A connection-level failure (network, TLS, authentication).
    pub fn connection(message: impl Into<String>) -> WarehouseError {
        WarehouseError::new(ErrorClass::Connection, message)
    }

    /// A bug or unexpected state on our side.
    pub fn internal(message: impl Into<String>) -> WarehouseError {
        WarehouseError::new(ErrorClass::Internal, message)
    }
}

/// An error and its causes on one line, each cause not already in the text (the network or TLS
/// reason of a failed connection is in the causes; a driver's message often repeats its
/// cause's).
pub fn error_chain(e: &dyn std::error::Error) -> String {
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

/// Classifies a PostgreSQL-protocol SQLSTATE (PostgreSQL, Redshift).
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    match code {
        // insufficient_privilege, invalid_authorization_specification, invalid_password
        "42501" | "28000" | "28P01" => ErrorClass::Permission,
        // undefined_table/column, duplicate_table/column, invalid schema name, wrong object type
        "42P01" | "42703" | "42P07" | "42701" | "3F000" | "42809" => ErrorClass::Schema,
        c if c.starts_with("22") => ErrorClass::TypeConflict,
        "42804" => ErrorClass::TypeConflict,
        // A statement cancelled (a `statement_timeout`), a lock not granted in time
        // (`lock_timeout`), a deadlock or a serialization failure: that table's load, retried
        // by the next run, not the connection.
        c if c.starts_with("53")
            || c.starts_with("54")
            || c.starts_with("40")
            || c == "57014"
            || c == "55P03" =>
        {
            ErrorClass::Quota
        }
        c if c.starts_with("08") || c.starts_with("57") => ErrorClass::Connection,
        _ => ErrorClass::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each class from the codes PostgreSQL answers in the situations the report names.
    #[test]
    fn sqlstates_map_to_the_reports_classes() {
        for (code, class) in [
            ("42501", ErrorClass::Permission),   // permission denied for table
            ("28P01", ErrorClass::Permission),   // password authentication failed
            ("28000", ErrorClass::Permission),   // no pg_hba.conf entry
            ("42P01", ErrorClass::Schema),       // relation does not exist
            ("42703", ErrorClass::Schema),       // column does not exist
            ("3F000", ErrorClass::Schema),       // schema does not exist
            ("22001", ErrorClass::TypeConflict), // value too long for type
            ("22P02", ErrorClass::TypeConflict), // invalid input syntax
            ("42804", ErrorClass::TypeConflict), // column is of type … but expression is of type …
            ("53100", ErrorClass::Quota),        // disk full
            ("54000", ErrorClass::Quota),        // program limit exceeded
            ("08006", ErrorClass::Connection),   // connection failure
            ("57P01", ErrorClass::Connection),   // admin shutdown
            ("57014", ErrorClass::Quota),        // canceling statement due to statement timeout
            ("55P03", ErrorClass::Quota),        // canceling statement due to lock timeout
            ("40P01", ErrorClass::Quota),        // deadlock detected
            ("40001", ErrorClass::Quota),        // could not serialize access
            ("23505", ErrorClass::Internal),     // unique violation: the sync's own bug
            ("XX000", ErrorClass::Internal),
        ] {
            assert_eq!(classify_sqlstate(code), class, "{code}");
        }
    }
}
