//! `metav1.Condition` bookkeeping: one condition per type, `lastTransitionTime` kept unless the
//! status flips, and a stable order so identical states serialize identically (no status churn).

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Connection verified and the last sync did not fail (WarehouseConnection); valid and applied (SelectiveSync).
pub const READY: &str = "Ready";
/// The connection test's result.
pub const CONNECTION_VERIFIED: &str = "ConnectionVerified";
/// A sync Job is running.
pub const SYNCING: &str = "Syncing";
/// The first sync's backfill has caught up.
pub const BACKFILL_COMPLETE: &str = "BackfillComplete";
/// `spec.suspend` is true.
pub const SUSPENDED: &str = "Suspended";
/// The SelectiveSync passes validation.
pub const VALID: &str = "Valid";

/// The condition of `type_`, if present.
pub fn find<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// Sets the condition of `type_`; its transition time changes only when its status does.
pub fn set(
    conds: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: i64,
    now: Timestamp,
) {
    let mut message = message.to_string();
    crate::sync::naming::truncate_at_char(&mut message, 32_000);
    let new = Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: Some(generation),
        last_transition_time: Time(now),
    };
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let since = if c.status == new.status {
                c.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *c = Condition {
                last_transition_time: since,
                ..new
            };
        }
        None => conds.push(new),
    }
}

/// Puts conditions in a fixed order (Ready first, then by type).
pub fn sort(conds: &mut [Condition]) {
    conds.sort_by(|a, b| (a.type_ != READY, &a.type_).cmp(&(b.type_ != READY, &b.type_)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transition_time_moves_only_when_the_status_flips() {
        let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let t1 = t0 + jiff::SignedDuration::from_hours(1);
        let mut c = vec![];
        set(&mut c, READY, "True", "Synced", "a", 1, t0);
        set(&mut c, READY, "True", "Synced", "b", 2, t1);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].last_transition_time.0, t0);
        assert_eq!(c[0].message, "b");
        assert_eq!(c[0].observed_generation, Some(2));
        set(&mut c, READY, "False", "SyncFailed", "c", 2, t1);
        assert_eq!(c[0].last_transition_time.0, t1);
        set(&mut c, SYNCING, "False", "Idle", "", 2, t1);
        set(&mut c, BACKFILL_COMPLETE, "False", "Backfilling", "", 2, t1);
        sort(&mut c);
        let order: Vec<&str> = c.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(order, [READY, BACKFILL_COMPLETE, SYNCING]);
    }
}
