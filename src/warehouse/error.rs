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

/// Classifies a PostgreSQL-protocol SQLSTATE (PostgreSQL, Redshift).
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    match code {
        // insufficient_privilege, invalid_authorization_specification, invalid_password
        "42501" | "28000" | "28P01" => ErrorClass::Permission,
        // undefined_table/column, duplicate_table/column, invalid schema name, wrong object type
        "42P01" | "42703" | "42P07" | "42701" | "3F000" | "42809" => ErrorClass::Schema,
        c if c.starts_with("22") => ErrorClass::TypeConflict,
        "42804" => ErrorClass::TypeConflict,
        c if c.starts_with("53") || c.starts_with("54") => ErrorClass::Quota,
        c if c.starts_with("08") || c.starts_with("57") => ErrorClass::Connection,
        _ => ErrorClass::Internal,
    }
}
