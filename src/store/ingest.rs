//! The ingest path shared by both stores: dedupe, resolve, assign `seq`, hand rows to the
//! dialect's writer.

use std::collections::HashSet;

use crate::identity::{IdentifierState, IdentityGraph, ProfileState, Rules, StateDelta};

use super::{IdGraphRow, MappingRow, NewEventRow, PreparedEvent, StoreError, Trigger, WriteTx};

/// The identity graph of one store, and the head `seq` it reflects.
///
/// The graph is rebuilt from the store's state tables whenever another writer has moved the head
/// since this resolver last wrote (several engine replicas on one PostgreSQL), or after a failed
/// commit left it ahead of the store.
pub struct Resolver {
    graph: IdentityGraph,
    /// The head the graph reflects; `None` when it must be (re)loaded.
    known_head: Option<i64>,
    track_names: HashSet<String>,
}

impl Resolver {
    /// A resolver that loads its graph on first use.
    pub fn new(rules: Rules) -> Resolver {
        Resolver {
            graph: IdentityGraph::new(rules),
            known_head: None,
            track_names: HashSet::new(),
        }
    }

    /// The identity graph (as of the last successful ingest).
    pub fn graph(&self) -> &IdentityGraph {
        &self.graph
    }

    pub(crate) fn restore(
        &mut self,
        profiles: Vec<ProfileState>,
        identifiers: Vec<IdentifierState>,
        track_names: Vec<String>,
        head: i64,
    ) {
        #[cfg(test)]
        RESTORES.with(|n| n.set(n.get() + 1));
        let rules = self.graph.rules().clone();
        self.graph = IdentityGraph::new(rules);
        self.graph.restore(profiles, identifiers);
        self.track_names = track_names.into_iter().collect();
        self.known_head = Some(head);
    }

    /// Whether the graph reflects `head`.
    pub(crate) fn is_current(&self, head: i64) -> bool {
        self.known_head == Some(head)
    }

    /// The head the graph reflects, when it is behind `head` (another writer wrote since).
    pub(crate) fn behind(&self, head: i64) -> Option<i64> {
        self.known_head.filter(|&known| known < head)
    }

    /// Applies what another writer changed since the head the graph reflects, which moves it
    /// to `head`; false (the graph then to be restored) when the changes cannot be applied.
    pub(crate) fn apply(
        &mut self,
        profiles: Vec<ProfileState>,
        identifiers: Vec<IdentifierState>,
        track_names: Vec<String>,
        head: i64,
    ) -> bool {
        #[cfg(test)]
        CATCH_UPS.with(|n| n.set(n.get() + 1));
        if !self.graph.apply(profiles, identifiers) {
            self.known_head = None;
            return false;
        }
        self.track_names.extend(track_names);
        self.known_head = Some(head);
        true
    }

    /// Marks the graph as ahead of the store (call before writing; [`Resolver::committed`] after).
    pub(crate) fn begin(&mut self) {
        self.known_head = None;
    }

    /// Records a successful commit that moved the head to `head`.
    pub(crate) fn committed(&mut self, head: i64) {
        self.known_head = Some(head);
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: how many times this thread's resolvers restored their whole graph.
    pub(crate) static RESTORES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: how many times this thread's resolvers caught up with another writer's changes.
    pub(crate) static CATCH_UPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Everything a resolver is rebuilt from: profiles, identifiers, Track event names.
pub(crate) type LoadedState = (Vec<ProfileState>, Vec<IdentifierState>, Vec<String>);

/// What one ingest call did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IngestSummary {
    /// Events stored and resolved.
    pub accepted: usize,
    /// Events skipped because their messageId was already stored.
    pub duplicates: usize,
    /// New traits that full profiles had no room for (`caps.max_traits_per_profile`).
    pub traits_dropped: usize,
    /// Events refused by identity resolution: (index in the batch, reason).
    pub rejected: Vec<(usize, String)>,
    /// Profiles created.
    pub profiles_created: usize,
    /// Profiles merged away.
    pub merges: usize,
    /// The head `seq` after the batch.
    pub head: i64,
    /// Time spent resolving the batch's identities (the rest of an ingest is the store's writes
    /// and commit); for the engine's latency metrics.
    #[serde(skip)]
    pub resolve_time: std::time::Duration,
}

/// A `profile_traits_updates` row to write, its snapshot already JSON text: a batch of
/// identifies on one large profile holds a snapshot per identify until the commit, and the
/// text is several times smaller than the parsed map.
#[derive(Debug)]
pub(crate) struct NewTraitsRow {
    pub seq: i64,
    pub segment_id: String,
    pub traits: String,
    pub trigger: Trigger,
}

/// The rows a batch produced, with their `seq`s assigned.
#[derive(Debug, Default)]
pub(crate) struct ResolvedBatch<'e> {
    pub events: Vec<NewEventRow<'e>>,
    pub id_graph: Vec<IdGraphRow>,
    pub mappings: Vec<MappingRow>,
    pub traits: Vec<NewTraitsRow>,
    pub state: StateDelta,
    pub new_track_names: Vec<String>,
}

/// Resolves `events` inside an open write transaction and writes their rows; returns what it
/// did. The caller commits and then calls `resolver.committed(head)`; `load` rebuilds the graph
/// when it is stale.
pub(crate) fn ingest_in_tx<T: WriteTx>(
    tx: &mut T,
    resolver: &mut Resolver,
    events: &[PreparedEvent],
    mut load: impl FnMut(&mut T, Option<i64>) -> Result<LoadedState, StoreError>,
) -> Result<IngestSummary, StoreError> {
    let head = tx.lock_head()?;
    if !resolver.is_current(head) {
        // Behind another writer: what it changed since is read and applied; anything else (a
        // first write, a failed one, changes that cannot be applied) reloads everything.
        let caught_up = match resolver.behind(head) {
            Some(since) => {
                let (profiles, identifiers, names) = load(tx, Some(since))?;
                resolver.apply(profiles, identifiers, names, head)
            }
            None => false,
        };
        if !caught_up {
            let (profiles, identifiers, names) = load(tx, None)?;
            resolver.restore(profiles, identifiers, names, head);
        }
    }
    resolver.begin();

    let ids: Vec<&str> = events.iter().map(PreparedEvent::message_id).collect();
    let found = {
        let (recent, index) = tx.dedupe(head)?;
        recent.existing(index, &ids)?
    };
    let mut seen: HashSet<&str> = found.iter().map(String::as_str).collect();
    let mut summary = IngestSummary::default();
    let mut batch = ResolvedBatch::default();
    let mut seq = head;
    let resolving = std::time::Instant::now();
    for (index, event) in events.iter().enumerate() {
        if !seen.insert(event.message_id()) {
            summary.duplicates += 1;
            continue;
        }
        let resolution = match resolver.graph.resolve_subject(event.subject()) {
            Ok(r) => r,
            Err(e) => {
                // Not stored: a later event of the batch with its messageId (a corrected copy)
                // is not a duplicate of it.
                seen.remove(event.message_id());
                summary.rejected.push((index, e.to_string()));
                continue;
            }
        };
        summary.traits_dropped += resolution.traits_dropped;
        let trigger = &event.trigger;
        summary.accepted += 1;
        summary.profiles_created += usize::from(resolution.created);
        summary.merges += resolution.merged.len();
        for u in resolution.id_graph_updates {
            seq += 1;
            batch.id_graph.push(IdGraphRow {
                seq,
                segment_id: u.segment_id,
                canonical_segment_id: u.canonical_segment_id,
                trigger: trigger.clone(),
            });
        }
        for u in resolution.external_id_mapping_updates {
            seq += 1;
            batch.mappings.push(MappingRow {
                seq,
                id: u.id,
                external_id_hash: u.external_id_hash,
                external_id_type: u.external_id_type,
                external_id_value: u.external_id_value,
                segment_id: u.segment_id,
                trigger: trigger.clone(),
            });
        }
        for u in resolution.profile_traits_updates {
            seq += 1;
            batch.traits.push(NewTraitsRow {
                seq,
                segment_id: u.segment_id,
                traits: super::codec::json_text(&u.traits),
                trigger: trigger.clone(),
            });
        }
        if let (crate::event::EventType::Track, Some(name)) = (trigger.event_type, &event.event)
            && resolver.track_names.insert(name.clone())
        {
            batch.new_track_names.push(name.clone());
        }
        seq += 1;
        batch.events.push(NewEventRow {
            seq,
            segment_id: resolution.segment_id,
            event,
        });
    }
    batch.state = resolver.graph.take_dirty();
    summary.resolve_time = resolving.elapsed();
    tx.write(&batch, seq)?;
    let (recent, index) = tx.dedupe(head)?;
    recent.written(
        index,
        batch.events.iter().map(|r| (r.event.message_id(), r.seq)),
        seq,
    )?;
    // Freeing the change-log rows and state costs the writer as much as serializing them: hand
    // them to a thread (the events are the caller's).
    super::drop_later((batch.id_graph, batch.mappings, batch.traits, batch.state));
    summary.head = seq;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{CATCH_UPS, RESTORES};
    use crate::event::{Event, ParseOptions};
    use crate::store::dedupe::tests::{Place, both, count};
    use crate::store::{EventFilter, Feed, FeedRow};

    fn ev(v: Value) -> Event {
        let opts = ParseOptions::new(jiff::Timestamp::UNIX_EPOCH, "src");
        Event::from_json(&v, None, &opts).expect("valid test event")
    }

    fn page(id: &str, anon: &str) -> Event {
        ev(json!({"type": "page", "messageId": id, "anonymousId": anon, "name": "Home"}))
    }

    fn identify(id: &str, anon: &str, email: &str) -> Event {
        ev(
            json!({"type": "identify", "messageId": id, "anonymousId": anon, "traits": {"email": email}}),
        )
    }

    /// The first 100 stored events, in order: (messageId, segment_id).
    fn stored_events(store: &mut dyn crate::store::Store) -> Vec<(String, String)> {
        store
            .read_feed(&Feed::Events(EventFilter::All), 0, 100)
            .unwrap()
            .into_iter()
            .filter_map(|r| match r {
                FeedRow::Event(e) => Some((e.event.message_id, e.segment_id)),
                _ => None,
            })
            .collect()
    }

    both!(
        a_warmed_up_store_only_catches_up_at_its_first_write,
        another_writer_s_changes_are_applied_not_reloaded,
        a_warm_up_after_a_failed_write_reloads_the_graph_but_keeps_the_ids,
    );

    /// PostgreSQL COPYs the profiles and identifiers its graph holds no row of, without looking
    /// for one. A row of one written behind the writer's back (not by a write it catches up
    /// with) fails the write as a refusal of the data, which stores nothing; the engine answers
    /// a refusal by reloading its graph (`warm_up`), and the write then lands once, resolved
    /// against that row rather than overwriting it.
    #[test]
    fn postgres_a_new_row_stored_behind_the_writer_s_back_is_refused_then_resolved_against() {
        let place = Place::new("postgres");
        let mut a = place.open_with(false);
        a.ingest(vec![page("1", "a1")]);
        place.raw(
            "INSERT INTO profiles (segment_id, canonical_segment_id, created_rank, merges, traits, trait_times, updated_seq)
               VALUES ('use_other', 'use_other', 1000, 0, '{}', '{}', 1);
             INSERT INTO identifiers (id_type, value, segment_id, first_seen_us, last_seen_us, updated_seq)
               VALUES ('anonymous_id', 'a9', 'use_other', 0, 0, 1);",
        );
        let err = a.store().ingest(vec![page("2", "a9")]).unwrap_err();
        assert!(err.is_data_refusal(), "{err}");
        assert_eq!(
            stored_events(a.store()).len(),
            1,
            "the refused write stored nothing"
        );
        a.store().warm_up().unwrap();
        assert_eq!(a.ingest(vec![page("2", "a9")]), (1, 0));
        let stored = stored_events(a.store());
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[1], ("2".to_string(), "use_other".to_string()));
        let (profiles, identifiers) = a.store().load_state().unwrap();
        assert_eq!(profiles.len(), 2, "no profile was made for a9");
        let a9: Vec<_> = identifiers.iter().filter(|i| i.value == "a9").collect();
        assert_eq!(a9.len(), 1);
        assert_eq!(a9[0].segment_id, "use_other");
    }

    /// Review: an identifier whose profile row is missing gets a profile from `restore`'s
    /// repair in every replica that loads the store. One replica stores it in a write that
    /// accepts no event (all duplicates): the head does not move, so the other replica, current
    /// at that head, catches up with nothing, and its own repair of the same profile must not
    /// fail its next write as a refusal (which reloads its whole graph).
    #[test]
    fn postgres_a_profile_repaired_by_two_replicas_does_not_refuse_the_second() {
        let place = Place::new("postgres");
        let mut a = place.open_with(false);
        a.ingest(vec![page("1", "a1")]);
        place.raw(
            "INSERT INTO identifiers (id_type, value, segment_id, first_seen_us, last_seen_us, updated_seq)
               VALUES ('anonymous_id', 'orphan', 'use_gone', 0, 0, 1);",
        );
        let mut b = place.open_with(false);
        a.store().warm_up().unwrap();
        b.store().warm_up().unwrap();
        // a stores its repair in a write of duplicates only.
        assert_eq!(a.ingest(vec![page("1", "a1")]), (0, 1));
        let restores = count(&RESTORES);
        let r = b.store().ingest(vec![page("2", "b2")]);
        assert!(r.is_ok(), "b's write refused: {:?}", r.err());
        assert_eq!(count(&RESTORES), restores, "b reloaded its graph");
        let (profiles, _) = b.store().load_state().unwrap();
        assert_eq!(
            profiles
                .iter()
                .filter(|p| p.segment_id == "use_gone")
                .count(),
            1
        );
    }

    /// After a write the store refused, `warm_up` (the engine's reload, outside the write lock)
    /// loads the graph again — the failed write's changes forgotten — but catches the recent
    /// messageIds up instead of reading the whole index; the next write then neither loads the
    /// graph nor reads the index, stores the event that failed once it is fixed, and finds
    /// every stored id.
    fn a_warm_up_after_a_failed_write_reloads_the_graph_but_keeps_the_ids(kind: &str) {
        use crate::store::dedupe::FILTER_BUILDS;
        use crate::store::dedupe::tests::poison;
        let place = Place::new(kind);
        let mut a = place.open_with(false);
        let pages: Vec<Event> = (0..50).map(|i| page(&format!("old-{i}"), "a1")).collect();
        a.ingest(pages);
        place.refuse_poison();
        assert!(
            a.store()
                .ingest(vec![identify("new", "a9", "x@example.com"), poison()])
                .is_err()
        );
        let (restores, builds) = (count(&RESTORES), count(&FILTER_BUILDS));
        a.store().warm_up().unwrap();
        assert_eq!(count(&RESTORES), restores + 1, "the graph was not reloaded");
        assert_eq!(
            count(&FILTER_BUILDS),
            builds,
            "the whole index was read again"
        );
        // The refused write's profile is forgotten: one profile (a1's), not two.
        assert_eq!(a.store().live_profiles(), 1);
        let again = vec![page("old-3", "a1"), page("old-49", "a1"), page("new", "a9")];
        assert_eq!(a.ingest(again), (1, 2));
        assert_eq!(
            count(&RESTORES),
            restores + 1,
            "the next write loaded the graph"
        );
        assert_eq!(count(&FILTER_BUILDS), builds);
        assert_eq!(a.store().live_profiles(), 2);
    }

    /// `warm_up` loads the graph and the messageIds without the write lock; another writer
    /// commits after it; the warmed-up store's first write then reads only that commit's
    /// changes — no whole graph, no whole index — and resolves and dedupes against all of it.
    fn a_warmed_up_store_only_catches_up_at_its_first_write(kind: &str) {
        let place = Place::new(kind);
        let mut a = place.open_with(false);
        // Enough events to merge the dedupe index (every 40 in these stores).
        let pages: Vec<Event> = (0..50).map(|i| page(&format!("old-{i}"), "a1")).collect();
        a.ingest(pages);
        let mut b = place.open_with(false);
        b.store().warm_up().unwrap();
        assert_eq!(b.store().live_profiles(), 1);
        a.ingest(vec![identify("new", "a2", "jo@example.com")]);
        let (restores, builds, catch_ups) = (
            count(&RESTORES),
            count(&crate::store::dedupe::FILTER_BUILDS),
            count(&CATCH_UPS),
        );
        // Stored ids (indexed, recent, and a's last) are duplicates; a2 is a's profile.
        let again = vec![page("old-3", "a1"), page("old-49", "a1"), page("new", "a2")];
        assert_eq!(b.ingest(again), (0, 3));
        b.ingest(vec![page("b-1", "a2")]);
        assert_eq!(
            count(&RESTORES),
            restores,
            "the first write loaded the whole graph"
        );
        assert_eq!(count(&crate::store::dedupe::FILTER_BUILDS), builds);
        assert_eq!(count(&CATCH_UPS), catch_ups + 1);
        assert_eq!(b.store().live_profiles(), 2);
        assert_eq!(a.store().live_profiles(), 2);
    }

    /// Two writers on one store (engine replicas) take turns: each catches up with the
    /// profiles, identifiers and merges the other stored by reading what changed since its
    /// own last write, not by reloading the whole graph, and resolves as if it had made them.
    fn another_writer_s_changes_are_applied_not_reloaded(kind: &str) {
        let place = Place::new(kind);
        let (mut a, mut b) = (place.open_with(false), place.open_with(false));
        // Each writer's first write loads the whole graph.
        b.ingest(vec![page("3", "b1")]);
        a.ingest(vec![page("1", "a3"), page("2", "a4")]);
        let (restores, catch_ups) = (count(&RESTORES), count(&CATCH_UPS));
        // b gives a's a3 profile an email; a then merges its a4 profile into it by that email;
        // b then sees a4 on the merged profile.
        b.ingest(vec![identify("4", "a3", "jo@example.com")]);
        a.ingest(vec![identify("5", "a4", "jo@example.com")]);
        b.ingest(vec![page("6", "a4")]);
        assert_eq!(
            count(&RESTORES),
            restores,
            "a writer reloaded its whole graph"
        );
        assert_eq!(count(&CATCH_UPS), catch_ups + 3);
        let segment: std::collections::HashMap<String, String> =
            stored_events(b.store()).into_iter().collect();
        let segment = |id: &str| segment[id].clone();
        assert_eq!(segment("4"), segment("1"), "b found a's profile of a3");
        assert_eq!(segment("5"), segment("1"), "a found b's email on it");
        assert_eq!(segment("6"), segment("1"), "b followed a's merge");
        // Both graphs hold what a full load of the store gives: a3/a4's profile and b1's.
        let mut fresh = place.open_with(false);
        let (profiles, _) = fresh.store().load_state().unwrap();
        let live = profiles
            .iter()
            .filter(|p| p.segment_id == p.canonical_segment_id)
            .count();
        assert_eq!(live, 2);
        assert_eq!(a.store().live_profiles(), live);
        assert_eq!(b.store().live_profiles(), live);
    }
}
