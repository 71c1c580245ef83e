//! The sync: lands the store's change feeds in a warehouse (`profiles-sync sync`).

pub mod naming;
