//! Event retention (DESIGN §3): the feed consumers' progress, and the deletion of events that
//! are older than the retention window and that every consumer has loaded.
//!
//! A consumer is one warehouse connection (`namespace/name`); after each sync its Job records
//! the `seq` after which it still needs events (the lowest cursor of its event tables) and its
//! backfill window. Events are deleted in `seq` order from the oldest, while each is older than
//! the cut and at or below every consumer's `after`: [`Pruned::through_seq`] is then a horizon
//! below which no event is left, which a sync compares with its own cursor to say when events
//! it needed were gone before it loaded them. Only events are deleted: the change logs and the
//! current state are complete backfills and stay. (An imported event with an old `receivedAt`
//! but a recent `seq` waits until the horizon reaches it.)
//!
//! A deleted event's messageId is new again: a lookup that lands on its index entry finds no
//! event, so an event sent again after its copy was deleted is stored again (Segment's own
//! dedupe holds for a window too). Those entries are dropped a run at a time
//! ([`prune_ids_in`]): the index's runs hold consecutive ranges of `seq`, so once the horizon
//! passes the last `seq` of the oldest run, every entry in it names a deleted event. The index
//! then grows with the events kept, plus at most one run, not with every event ever stored.

use super::StoreError;
use super::dedupe::IndexTx;
use crate::event::Timestamp;

/// The tables, for both dialects; `{key_text}` as in the store's DDL.
pub(crate) const RETENTION_DDL: &str = "
CREATE TABLE IF NOT EXISTS feed_consumers (
    consumer {key_text} PRIMARY KEY,
    after_seq BIGINT NOT NULL,
    window_seconds BIGINT NOT NULL,
    updated_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS event_retention (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through BIGINT NOT NULL,
    pruned_max_received_us BIGINT NOT NULL
);
INSERT INTO event_retention (id, pruned_through, pruned_max_received_us) VALUES (1, 0, 0)
    ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS pruned_events (
    type {key_text} NOT NULL,
    event {key_text} NOT NULL,
    max_received_us BIGINT NOT NULL,
    PRIMARY KEY (type, event)
);
";

/// Records a consumer's progress (`$1` name, `$2` after, `$3` window, `$4` time).
pub(crate) const SET_CONSUMER_SQL: &str = "INSERT INTO feed_consumers (consumer, after_seq, window_seconds, updated_us)
     VALUES ($1, $2, $3, $4) ON CONFLICT (consumer) DO UPDATE
     SET after_seq = excluded.after_seq, window_seconds = excluded.window_seconds, updated_us = excluded.updated_us";
/// Removes a consumer.
pub(crate) const REMOVE_CONSUMER_SQL: &str = "DELETE FROM feed_consumers WHERE consumer = $1";
/// Every consumer, by name.
pub(crate) const CONSUMERS_SQL: &str =
    "SELECT consumer, after_seq, window_seconds, updated_us FROM feed_consumers ORDER BY consumer";
/// The horizon.
pub(crate) const PRUNED_SQL: &str =
    "SELECT pruned_through, pruned_max_received_us FROM event_retention WHERE id = 1";
/// Up to `$3` events after `$1` up to `$2`: their `seq`, `receivedAt`, type and Track name.
pub(crate) const OLDEST_EVENTS_SQL: &str = "SELECT seq, received_at_us, type, event FROM events
     WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3";
/// How many consumers there are and the lowest `seq` one still needs after.
const CONSUMERS_HOLD_SQL: &str = "SELECT count(*), coalesce(min(after_seq), 0) FROM feed_consumers";
/// The longest backfill window a consumer recorded (and a filler column).
const CONSUMERS_WINDOW_SQL: &str =
    "SELECT coalesce(max(window_seconds), 0), CAST(0 AS BIGINT) FROM feed_consumers";
/// Raises the newest deleted `receivedAt` of a type and Track name (`$1`, `$2`) to `$3`.
pub(crate) const NOTE_PRUNED_NAME_SQL: &str =
    "INSERT INTO pruned_events (type, event, max_received_us)
     VALUES ($1, $2, $3) ON CONFLICT (type, event) DO UPDATE SET max_received_us =
     CASE WHEN excluded.max_received_us > pruned_events.max_received_us
          THEN excluded.max_received_us ELSE pruned_events.max_received_us END";
/// Every type and Track name deleted events had, with the newest deleted `receivedAt`.
pub(crate) const PRUNED_NAMES_SQL: &str =
    "SELECT type, event, max_received_us FROM pruned_events ORDER BY type, event";
/// Takes the horizon's row (PostgreSQL) with a write that changes nothing, so that a
/// consumer's record and a deletion step take turns: under `READ COMMITTED` the step that
/// waited reads the record; under snapshot isolation (a database whose default is `REPEATABLE
/// READ`, a distributed PostgreSQL) a step that raced it fails with a serialization error
/// instead of deleting past it.
pub(crate) const TOUCH_HORIZON_SQL: &str =
    "UPDATE event_retention SET pruned_through = pruned_through WHERE id = 1";
/// Deletes the events after `$1` up to `$2`.
pub(crate) const DELETE_EVENTS_SQL: &str = "DELETE FROM events WHERE seq > $1 AND seq <= $2";
/// Moves the horizon to `$1`, the newest `receivedAt` deleted to `$2`.
pub(crate) const SET_PRUNED_SQL: &str =
    "UPDATE event_retention SET pruned_through = $1, pruned_max_received_us = $2 WHERE id = 1";

/// The newest `seq` and the number of entries of run `$1` of the messageId index (a scan of
/// the run: taken once per run and handle, see [`prune_ids_in`]).
const RUN_TOP_SQL: &str =
    "SELECT coalesce(max(seq), 0), count(*) FROM message_id_entries WHERE run = $1";
/// The lowest hash of run `$1` (and a filler column).
const RUN_LOW_SQL: &str = "SELECT coalesce(min(hash), 0), CAST(0 AS BIGINT)
     FROM message_id_entries WHERE run = $1";
/// Deletes the entries of run `$1` from hash `$2` up to hash `$3`.
const DELETE_RUN_PART_SQL: &str =
    "DELETE FROM message_id_entries WHERE run = $1 AND hash >= $2 AND hash <= $3";
/// Deletes the entries of run `$1` from hash `$2` on.
const DELETE_RUN_SQL: &str = "DELETE FROM message_id_entries WHERE run = $1 AND hash >= $2";
/// Takes `$1` entries off the count of run `$2`, which writers sum.
const SHRINK_RUN_SQL: &str = "UPDATE message_id_runs SET entries = entries - $1 WHERE run = $2";
/// Takes `$1` entries off the index's count (kept for engines older than the drops, which read
/// it).
const SHRINK_INDEX_SQL: &str = "UPDATE message_id_index SET entries = entries - $1 WHERE id = 1";
/// Forgets run `$1`.
const DROP_RUN_SQL: &str = "DELETE FROM message_id_runs WHERE run = $1";

/// A reader of the events feed whose progress holds events back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumer {
    /// `namespace/name` of its WarehouseConnection.
    pub name: String,
    /// Events with a higher `seq` are still needed by it.
    pub after_seq: i64,
    /// Its backfill window, in seconds: events younger than the longest window stay.
    pub window_seconds: i64,
    /// When it last recorded its progress.
    pub updated_at: Timestamp,
}

/// How far events have been deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// No event at or below this `seq` is left (0: none was ever deleted).
    pub through_seq: i64,
    /// The newest `receivedAt` (microseconds) of a deleted event; `None` when none was.
    pub max_received_at_us: Option<i64>,
    /// Per event type and Track event name (`""` for the other types), the newest `receivedAt`
    /// of a deleted event: a new connection's backfill tells from it whether events of the
    /// tables it syncs were deleted inside its window.
    pub by_name: Vec<PrunedName>,
}

/// The newest deleted event of one type and Track event name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrunedName {
    /// The event type (`track`, `page`, ...).
    pub event_type: String,
    /// The Track event's name; `""` for the other types.
    pub event: String,
    /// Its newest deleted `receivedAt`, in microseconds.
    pub max_received_at_us: i64,
}

impl Pruned {
    /// From the stored row (`0, 0` when nothing was deleted), without the names.
    pub(crate) fn from_row(through_seq: i64, max_received_us: i64) -> Pruned {
        Pruned {
            through_seq,
            max_received_at_us: (through_seq > 0).then_some(max_received_us),
            by_name: vec![],
        }
    }
}

/// One step of deletion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneStep {
    /// Events deleted by it.
    pub deleted: u64,
    /// The horizon after it (without the names).
    pub pruned: Pruned,
    /// Whether nothing more can be deleted under the same cut (the next event is too young or
    /// past the consumers, or there is none).
    pub done: bool,
    /// The cut it took: events at or below this `seq`, received before this (microseconds).
    pub cut: (i64, i64),
    /// The event that stopped it for its age, when one did: its `seq` and `receivedAt` (an
    /// imported event with a `receivedAt` in the future holds every later one back).
    pub blocked_by: Option<(i64, i64)>,
}

/// One step of dropping the messageId index's entries of deleted events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdPruneStep {
    /// Entries deleted by it.
    pub deleted: u64,
    /// Whether it deleted the last entries of a run, and the run with them.
    pub dropped_run: bool,
    /// Whether no run is left to drop: the oldest one still indexes an event above the
    /// horizon, or it is the newest (merges still land there).
    pub done: bool,
}

/// What a handle knows of the index's oldest run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OldestRun {
    /// The run.
    pub run: i64,
    /// Its newest `seq`: a run other than the newest never gets another entry, so this holds
    /// until the run is dropped.
    pub top: i64,
    /// Its entries when it was scanned.
    pub entries: i64,
    /// The lowest of their hashes then: steps share the hashes from there on between them.
    pub low: i64,
    /// The hash its entries are left from: this handle's steps deleted those below.
    pub from: i64,
}

/// A handle's memory of the index's oldest run, if it looked.
pub(crate) type RunTop = Option<OldestRun>;

/// What a retention pass keeps: events younger than `min_age_seconds` (or than a consumer's
/// longer backfill window) at `now_us`, and the events any consumer still needs; no cut goes
/// past `head` (the head when the pass started).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keep {
    /// The retention's own window, in seconds.
    pub min_age_seconds: i64,
    /// The time the pass judges at, in microseconds.
    pub now_us: i64,
    /// The highest `seq` a pass may delete.
    pub head: i64,
}

/// An event read by a step: `seq`, `receivedAt`, type, Track name.
pub(crate) type OldEvent = (i64, i64, String, Option<String>);

/// Of the oldest events after the horizon, read in `seq` order (`rows`: `seq`, `receivedAt`,
/// at most `limit` of them), the leading run received before `before_us`: its last `seq`,
/// its newest `receivedAt`, its length, and whether the cut may go further (the whole page
/// qualified and it was full).
pub(crate) fn leading_run(
    rows: &[(i64, i64)],
    before_us: i64,
    limit: usize,
) -> Option<(i64, i64, usize, bool)> {
    let n = rows.iter().take_while(|(_, r)| *r < before_us).count();
    let last = rows.get(n.checked_sub(1)?)?.0;
    let newest = rows[..n].iter().map(|(_, r)| *r).max()?;
    Some((last, newest, n, n == rows.len() && rows.len() == limit))
}

/// Where a retention pass may delete up to: events at or below `through_seq` received before
/// `received_before_us`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    /// Every consumer has loaded the events up to here (the store's head without consumers).
    pub through_seq: i64,
    /// Events received before this (microseconds) are older than every window.
    pub received_before_us: i64,
    /// The consumer that holds `through_seq` lowest, if any.
    pub held_by: Option<String>,
    /// The window applied, in seconds: the retention's own or a consumer's longer backfill.
    pub window_seconds: i64,
}

/// The cut for a store whose head is `head`, with these consumers, events kept at least
/// `min_age_seconds`, at `now`: no event a consumer still needs, and none younger than the
/// longest of the retention and the consumers' backfill windows (a connection that has not
/// synced yet needs only its window, which it backfills from).
pub fn cut(consumers: &[Consumer], min_age_seconds: i64, now: Timestamp, head: i64) -> Cut {
    let held = consumers.iter().min_by_key(|c| c.after_seq);
    let longest = consumers
        .iter()
        .map(|c| c.window_seconds)
        .max()
        .unwrap_or(0);
    let keep = Keep {
        min_age_seconds,
        now_us: now.as_microsecond(),
        head,
    };
    let (through_seq, received_before_us, window_seconds) =
        cut_from(held.map(|c| c.after_seq), longest, &keep);
    Cut {
        through_seq,
        received_before_us,
        held_by: held.map(|c| c.name.clone()),
        window_seconds,
    }
}

/// The cut from the lowest `after_seq` of the consumers (none without one) and their longest
/// window: (through `seq`, received before, the window applied).
fn cut_from(lowest: Option<i64>, longest_window: i64, keep: &Keep) -> (i64, i64, i64) {
    let window = longest_window.max(keep.min_age_seconds).max(0);
    (
        lowest.map_or(keep.head, |a| a.min(keep.head)),
        keep.now_us.saturating_sub(window.saturating_mul(1_000_000)),
        window,
    )
}

/// What a prune needs of a store's open transaction beyond the dedupe's statements.
pub(crate) trait PruneTx: IndexTx {
    /// Up to `limit` events after `after` up to `through`, in `seq` order
    /// ([`OLDEST_EVENTS_SQL`]).
    fn oldest(&mut self, after: i64, through: i64, limit: i64)
    -> Result<Vec<OldEvent>, StoreError>;
    /// Raises the newest deleted `receivedAt` of a type and Track name
    /// ([`NOTE_PRUNED_NAME_SQL`]).
    fn note_pruned(
        &mut self,
        event_type: &str,
        event: &str,
        received_us: i64,
    ) -> Result<(), StoreError>;
}

/// [`Store::prune_events`](super::Store::prune_events) in `tx`, which the caller commits.
/// `lock` is appended to the read of the horizon (PostgreSQL's `FOR UPDATE`: replicas pruning
/// at once, and consumers recording, take turns on its row; SQLite's transaction holds the
/// write lock already). The cut is taken from the consumers as recorded inside the
/// transaction, after that lock: a consumer whose record committed before the step is held,
/// and one that records after it commits reads a horizon that shows what it deleted.
pub(crate) fn prune_in(
    tx: &mut dyn PruneTx,
    lock: &str,
    keep: &Keep,
    max: usize,
) -> Result<PruneStep, StoreError> {
    let horizon = tx.pairs(&format!("{PRUNED_SQL}{lock}"), &[])?;
    let (from, newest) = horizon.first().copied().unwrap_or_default();
    let (count, lowest) = tx
        .pairs(CONSUMERS_HOLD_SQL, &[])?
        .first()
        .copied()
        .unwrap_or_default();
    let (longest, _) = tx
        .pairs(CONSUMERS_WINDOW_SQL, &[])?
        .first()
        .copied()
        .unwrap_or_default();
    let (through_seq, received_before_us, _) =
        cut_from((count > 0).then_some(lowest), longest, keep);
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let events = tx.oldest(from, through_seq, limit)?;
    let rows: Vec<(i64, i64)> = events.iter().map(|e| (e.0, e.1)).collect();
    let run = leading_run(&rows, received_before_us, max);
    // The first event after the run, when one stopped it (too young: the run ends there).
    let blocked_by = rows.get(run.map_or(0, |r| r.2)).copied();
    let cut = (through_seq, received_before_us);
    let Some((last, run_newest, n, more)) = run else {
        return Ok(PruneStep {
            deleted: 0,
            pruned: Pruned::from_row(from, newest),
            done: true,
            cut,
            blocked_by,
        });
    };
    // The newest deleted receivedAt of each type and Track name.
    let mut names: std::collections::BTreeMap<(&str, &str), i64> = Default::default();
    for (_, received, event_type, event) in &events[..n] {
        let at = names
            .entry((event_type.as_str(), event.as_deref().unwrap_or("")))
            .or_insert(*received);
        *at = (*at).max(*received);
    }
    for ((event_type, event), received) in names {
        tx.note_pruned(event_type, event, received)?;
    }
    tx.exec(DELETE_EVENTS_SQL, &[from, last])?;
    let newest = if from > 0 {
        newest.max(run_newest)
    } else {
        run_newest
    };
    tx.exec(SET_PRUNED_SQL, &[last, newest])?;
    Ok(PruneStep {
        deleted: n as u64,
        pruned: Pruned::from_row(last, newest),
        done: !more,
        cut,
        blocked_by,
    })
}

/// The index's oldest run as `top` knows it, unless it is the newest run (or there is none);
/// a run `top` does not know yet is scanned for its newest `seq`, and remembered.
/// SQLite takes it in a read before the step's write transaction, so that the scan (a tenth
/// of a second or more for 4M entries) does not hold the write lock.
pub(crate) fn oldest_run_top(
    tx: &mut dyn IndexTx,
    top: &mut RunTop,
) -> Result<Option<OldestRun>, StoreError> {
    let runs = tx.runs()?;
    let (Some(&(run, _)), true) = (runs.first(), runs.len() > 1) else {
        return Ok(None);
    };
    if let Some(known) = *top
        && known.run == run
    {
        return Ok(Some(known));
    }
    let (seq, entries) = tx
        .pairs(RUN_TOP_SQL, &[run])?
        .first()
        .copied()
        .unwrap_or_default();
    // From its lowest hash: a run half dropped by another handle (or before a restart) is
    // taken up in steps of `max` again, not in steps sized for the whole range of hashes.
    let (low, _) = tx
        .pairs(RUN_LOW_SQL, &[run])?
        .first()
        .copied()
        .unwrap_or_default();
    let known = OldestRun {
        run,
        top: seq,
        entries,
        low,
        from: low,
    };
    *top = Some(known);
    Ok(Some(known))
}

/// [`Store::prune_message_ids`](super::Store::prune_message_ids) in `tx`: deletes about `max`
/// entries of the index's oldest run once its newest `seq` is at or below the horizon (a range
/// of hashes: a run of `n` entries goes in `n / max` steps or one more), and the run itself
/// with its last entries; never the newest run. `known` is the handle's memory of the oldest
/// run ([`OldestRun`]: its newest `seq`, so that a run is scanned once, not once a step, and
/// where its steps got to); the memory returned is the caller's to keep once it has committed
/// `tx` (a step rolled back deleted nothing). Writers, on this handle or another, see the
/// count and the runs move at their next write (`dedupe::RecentIds`); until then a lookup that
/// probes a dropped entry finds no event, as it would have anyway.
pub(crate) fn prune_ids_in(
    tx: &mut dyn PruneTx,
    known: RunTop,
    max: usize,
) -> Result<(IdPruneStep, RunTop), StoreError> {
    let mut top = known;
    let done = IdPruneStep {
        done: true,
        ..IdPruneStep::default()
    };
    let (horizon, _) = tx
        .pairs(PRUNED_SQL, &[])?
        .first()
        .copied()
        .unwrap_or_default();
    let Some(oldest) = oldest_run_top(tx, &mut top)? else {
        return Ok((done, top));
    };
    if oldest.top > horizon {
        return Ok((done, top));
    }
    // A range of hashes that holds about `max` of the run's entries (its hashes are SipHash
    // outputs, spread evenly), deleted as a range of the key, which both stores read in the
    // table's order. (A bound found by counting `max` entries in key order cost PostgreSQL a
    // visit of the table per entry, ~1 s a step.)
    let (run, from) = (oldest.run, oldest.from);
    // `max` within 1..=i64::MAX: 0 would make a step one hash wide (2^64 steps a run), and
    // 2^64 times more than i64::MAX overflows.
    let max = i128::from(i64::try_from(max).unwrap_or(i64::MAX).max(1));
    let span = i128::from(i64::MAX) - i128::from(oldest.low) + 1;
    let width = (span * max / i128::from(oldest.entries.max(1))).max(1);
    let to = i128::from(from) + width - 1;
    let last = to >= i128::from(i64::MAX);
    let deleted = if last {
        tx.exec(DELETE_RUN_SQL, &[run, from])?
    } else {
        let to = i64::try_from(to).unwrap_or(i64::MAX);
        top = Some(OldestRun {
            from: to.saturating_add(1),
            ..oldest
        });
        tx.exec(DELETE_RUN_PART_SQL, &[run, from, to])?
    };
    let n = i64::try_from(deleted).unwrap_or(i64::MAX);
    tx.exec(SHRINK_INDEX_SQL, &[n])?;
    if last {
        tx.exec(DROP_RUN_SQL, &[run])?;
        top = None;
    } else {
        tx.exec(SHRINK_RUN_SQL, &[n, run])?;
    }
    let step = IdPruneStep {
        deleted,
        dropped_run: last,
        done: false,
    };
    Ok((step, top))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer(name: &str, after_seq: i64, window_seconds: i64) -> Consumer {
        Consumer {
            name: name.into(),
            after_seq,
            window_seconds,
            updated_at: Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn the_cut_is_the_slowest_consumer_and_the_longest_window() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let c = cut(&[], 3600, now, 500);
        assert_eq!((c.through_seq, c.held_by), (500, None));
        assert_eq!(c.received_before_us, (1_000_000 - 3600) * 1_000_000);
        let consumers = [
            consumer("a/fast", 400, 60),
            consumer("a/slow", 120, 7200),
            consumer("b/ahead", 900, 0),
        ];
        let c = cut(&consumers, 3600, now, 500);
        assert_eq!(c.through_seq, 120);
        assert_eq!(c.held_by.as_deref(), Some("a/slow"));
        assert_eq!(c.window_seconds, 7200);
        assert_eq!(c.received_before_us, (1_000_000 - 7200) * 1_000_000);
        // A consumer past the head (a store restored from a backup) holds no event past it.
        assert_eq!(cut(&consumers[2..], 0, now, 500).through_seq, 500);
    }

    #[test]
    fn the_run_stops_at_the_first_event_too_young() {
        let rows = [(3, 10), (5, 30), (6, 20), (9, 50), (10, 5)];
        // 9 is too young: 10 waits behind it although it is old (an import's receivedAt).
        assert_eq!(leading_run(&rows, 40, 5), Some((6, 30, 3, false)));
        assert_eq!(leading_run(&rows, 5, 5), None);
        // A full page that qualifies whole: more may follow.
        assert_eq!(leading_run(&rows[..3], 100, 3), Some((6, 30, 3, true)));
        // A short page: the feed ended there.
        assert_eq!(leading_run(&rows[..3], 100, 4), Some((6, 30, 3, false)));
        assert_eq!(leading_run(&[], 100, 4), None);
    }
}
