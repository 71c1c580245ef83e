//! Events with their objects flattened: what the warehouse's event tables are made of.
//!
//! A warehouse row holds an event's model fields and one column per leaf of its `context`, its
//! traits or properties, and its unknown top-level keys, nested objects joined with `.` into a
//! path (`context.library.name`; Segment's flattening, named into columns by the sync). Reading a
//! stored event's text straight into those leaves ([`FlatEvent::from_json_text`]) skips building
//! the JSON maps of an [`Event`] only to walk and free them: a sync reads every event it loads.

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::parse::{self, Fields, Key, Slot};
use super::{Event, EventError, ParseOptions};

/// Which part of a message a leaf comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    /// `context`; paths start with `context.`.
    Context,
    /// `traits`.
    Traits,
    /// `properties`.
    Properties,
    /// The top-level keys the model does not know ([`Event::extra`]).
    Extra,
}

impl Section {
    /// Every section, in order.
    pub const ALL: [Section; 4] = [
        Section::Context,
        Section::Traits,
        Section::Properties,
        Section::Extra,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn prefix(self) -> &'static str {
        match self {
            Section::Context => "context",
            _ => "",
        }
    }
}

/// The parent of a key at the top of its section.
const TOP: u32 = u32::MAX;

/// A byte range of [`Leaves::keys`].
type KeyRange = (u32, u32);

/// A non-null value that is not an object (arrays stay whole): its key, in the object `parent`.
#[derive(Clone, Debug)]
struct Leaf {
    section: Section,
    parent: u32,
    key: KeyRange,
    value: Value,
}

/// An object holding leaves: its key, in the object `parent`.
#[derive(Clone, Debug)]
struct Branch {
    parent: u32,
    key: KeyRange,
}

/// The leaves of a message's objects, section by section in [`Section`] order, each section in
/// message order; null values and empty objects have none. Each key is kept once (a tree of
/// objects), so the memory follows the message's size; a leaf's dotted path is built when it
/// is visited.
#[derive(Clone, Debug, Default)]
pub struct Leaves {
    /// Every key, one after the other (one allocation per event instead of one per key).
    keys: String,
    objects: Vec<Branch>,
    items: Vec<Leaf>,
    /// Per section: whether some key (at any depth) contains a `.`, the only way two leaves of
    /// a section can share a path (`{"a": {"b": 1}}` and `{"a.b": 2}` are both `a.b`).
    dotted: [bool; 4],
    /// Per section: whether it holds an object named `context` at its top, whose leaves' paths
    /// (`context.ip`) are those of the message's own context.
    context_key: [bool; 4],
}

/// Equal when every section has the same `(path, value)` leaves in the same order (however
/// the keys are laid out).
impl PartialEq for Leaves {
    fn eq(&self, other: &Leaves) -> bool {
        self.dotted == other.dotted
            && self.context_key == other.context_key
            && Section::ALL.iter().all(|s| self.of(*s) == other.of(*s))
    }
}

fn key_at(keys: &str, k: KeyRange) -> &str {
    keys.get(k.0 as usize..k.1 as usize).unwrap_or_default()
}

/// Builds leaves' dotted paths in one buffer, reusing the parent's part from one leaf to the
/// next of the same object.
struct Paths<'a> {
    keys: &'a str,
    objects: &'a [Branch],
    buf: String,
    /// The object whose path `buf[..at]` holds, if any.
    last: Option<(Section, u32, usize)>,
    chain: Vec<KeyRange>,
}

impl<'a> Paths<'a> {
    fn new(keys: &'a str, objects: &'a [Branch]) -> Paths<'a> {
        Paths {
            keys,
            objects,
            buf: String::with_capacity(64),
            last: None,
            chain: Vec::new(),
        }
    }

    /// The path of `leaf`.
    fn of(&mut self, leaf: &Leaf) -> &str {
        let at = match self.last {
            Some((s, p, at)) if s == leaf.section && p == leaf.parent => at,
            _ => {
                self.chain.clear();
                let mut p = leaf.parent;
                while let Some(o) = self.objects.get(p as usize) {
                    self.chain.push(o.key);
                    p = o.parent;
                }
                self.buf.clear();
                self.buf.push_str(leaf.section.prefix());
                for k in self.chain.iter().rev() {
                    enter(&mut self.buf, key_at(self.keys, *k));
                }
                let at = self.buf.len();
                self.last = Some((leaf.section, leaf.parent, at));
                at
            }
        };
        self.buf.truncate(at);
        enter(&mut self.buf, key_at(self.keys, leaf.key));
        &self.buf
    }
}

impl Leaves {
    /// The `(path, value)` leaves of `section`, in message order (copied).
    pub fn of(&self, section: Section) -> Vec<(String, Value)> {
        let mut paths = Paths::new(&self.keys, &self.objects);
        self.items
            .iter()
            .filter(|l| l.section == section)
            .map(|l| (paths.of(l).to_string(), l.value.clone()))
            .collect()
    }

    /// Calls `f` with the dotted path and the value of each leaf of `sections`, in section order
    /// (context, traits, properties, extra), each section in message order; values mutable (a
    /// reader may take them).
    pub fn visit(&mut self, sections: &[Section], mut f: impl FnMut(&str, &mut Value)) {
        let mut paths = Paths::new(&self.keys, &self.objects);
        for leaf in self.items.iter_mut() {
            if sections.contains(&leaf.section) {
                f(paths.of(leaf), &mut leaf.value);
            }
        }
    }

    /// The bytes its keys take (each kept once).
    pub fn key_bytes(&self) -> usize {
        self.keys.len()
    }

    /// How many leaves there are, in all sections.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether a key of `section` contains a `.` (see [`Leaves`]).
    pub fn has_dotted_key(&self, section: Section) -> bool {
        self.dotted[section.index()]
    }

    /// Whether two leaves of `sections` may share a dotted path: a dotted key in one of them;
    /// an unknown top-level key beside traits or properties (`{"channel": …, "properties":
    /// {"channel": …}}`); an object named `context` in traits or properties beside the context.
    /// When not, every leaf of `sections` has a path of its own.
    pub fn may_share_paths(&self, sections: &[Section]) -> bool {
        let has = |s: Section| sections.contains(&s);
        let leaves_in = |s: Section| self.items.iter().any(|l| l.section == s);
        sections.iter().any(|s| self.has_dotted_key(*s))
            || (has(Section::Context) && sections.iter().any(|s| self.context_key[s.index()]))
            || (has(Section::Extra)
                && leaves_in(Section::Extra)
                && sections
                    .iter()
                    .any(|s| matches!(s, Section::Traits | Section::Properties) && leaves_in(*s)))
    }

    /// Keeps `key` (a range of [`Leaves::keys`] from then on), noting a dot.
    fn key(&mut self, section: Section, key: &str) -> KeyRange {
        self.dotted[section.index()] |= key.contains('.');
        let start = self.keys.len();
        self.keys.push_str(key);
        // A message is at most 32 KB: its keys stay far below 4 GiB.
        let end = u32::try_from(self.keys.len()).unwrap_or(u32::MAX);
        (u32::try_from(start).unwrap_or(u32::MAX), end)
    }

    /// Opens the object at `key` in `parent`; returns its index, the parent of its entries.
    fn object(&mut self, section: Section, parent: u32, key: &str) -> u32 {
        if parent == TOP && key == "context" && section != Section::Context {
            self.context_key[section.index()] = true;
        }
        let key = self.key(section, key);
        self.objects.push(Branch { parent, key });
        u32::try_from(self.objects.len() - 1).unwrap_or(TOP)
    }

    fn push(&mut self, section: Section, parent: u32, key: &str, value: Value) {
        if value.is_null() {
            // The key still counts for the dot check.
            self.dotted[section.index()] |= key.contains('.');
            return;
        }
        let key = self.key(section, key);
        self.items.push(Leaf {
            section,
            parent,
            key,
            value,
        });
    }

    /// Adds the leaves of `map` (taken) at the top of `section`.
    fn add_map(&mut self, section: Section, map: Map<String, Value>) {
        self.walk(section, TOP, map);
    }

    fn walk(&mut self, section: Section, parent: u32, map: Map<String, Value>) {
        for (k, v) in map {
            match v {
                Value::Object(inner) => {
                    let o = self.object(section, parent, &k);
                    self.walk(section, o, inner);
                }
                other => self.push(section, parent, &k, other),
            }
        }
    }
}

/// Appends `key` to a dotted path (no `.` before the first key); returns the length to go back to.
fn enter(path: &mut String, key: &str) -> usize {
    let len = path.len();
    if len > 0 {
        path.push('.');
    }
    path.push_str(key);
    len
}

/// Calls `f` with the dotted path and value of each leaf of `map` under `prefix` (null values
/// included; empty objects have none).
pub fn flatten_each(prefix: &str, map: &Map<String, Value>, f: &mut impl FnMut(&str, &Value)) {
    fn walk(path: &mut String, map: &Map<String, Value>, f: &mut impl FnMut(&str, &Value)) {
        for (k, v) in map {
            let len = enter(path, k);
            match v {
                Value::Object(inner) => walk(path, inner, f),
                other => f(path, other),
            }
            path.truncate(len);
        }
    }
    let mut path = String::with_capacity(64);
    path.push_str(prefix);
    walk(&mut path, map, f);
}

/// An event whose objects are kept as [`Leaves`]: its `context`, `integrations`, `traits`,
/// `properties` and `extra` maps are empty.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatEvent {
    /// The model fields.
    pub event: Event,
    /// The objects' leaves.
    pub leaves: Leaves,
}

impl FlatEvent {
    /// Flattens a parsed event (its objects move into the leaves; `integrations` is dropped).
    pub fn from_event(mut event: Event) -> FlatEvent {
        let mut leaves = Leaves::default();
        leaves.add_map(Section::Context, std::mem::take(&mut event.context));
        leaves.add_map(Section::Traits, std::mem::take(&mut event.traits));
        leaves.add_map(Section::Properties, std::mem::take(&mut event.properties));
        leaves.add_map(Section::Extra, std::mem::take(&mut event.extra));
        event.integrations = Map::new();
        FlatEvent { event, leaves }
    }

    /// Parses a message's JSON text straight into its model fields and leaves: the same as
    /// `FlatEvent::from_event(Event::from_json_text(text, None, opts)?)` for any text without
    /// repeated keys (a stored event's), without building a map.
    pub fn from_json_text(text: &str, opts: &ParseOptions) -> Result<FlatEvent, EventError> {
        let (fields, leaves) = read_message(text, None)?;
        Self::build(fields, leaves, opts)
    }

    /// Parses a row of the engine's events feed (the text of `FeedRow::to_json`: the event's
    /// Segment JSON plus `seq`, `segment_id` and `event_source_id`) straight into its `seq`,
    /// profile and flattened event: the same as reading the row into a `FeedRow` and flattening
    /// its event, without building a map. The row's own keys are never the event's.
    pub fn from_feed_row_text(text: &str) -> Result<(i64, String, FlatEvent), EventError> {
        let mut row = RowKeys::default();
        let (fields, leaves) = read_message(text, Some(&mut row))?;
        let missing =
            |key: &str, what: &str| EventError::new(key, format!("missing or not {what}"));
        let seq = row.seq.ok_or_else(|| missing("seq", "an integer"))?;
        let segment_id = row
            .segment_id
            .ok_or_else(|| missing("segment_id", "a string"))?;
        let source_id = row
            .event_source_id
            .ok_or_else(|| missing("event_source_id", "a string"))?;
        let received_at = match &fields.received_at {
            Some(Value::String(s)) => s
                .parse()
                .map_err(|e| EventError::new("receivedAt", format!("{e}")))?,
            _ => return Err(missing("receivedAt", "a string")),
        };
        let opts = ParseOptions {
            now: received_at,
            source_id,
            trust_received_at: true,
        };
        Ok((seq, segment_id, Self::build(fields, leaves, &opts)?))
    }

    fn build(
        fields: Fields,
        mut leaves: Leaves,
        opts: &ParseOptions,
    ) -> Result<FlatEvent, EventError> {
        // A message may list its objects in any order: keep the leaves section by section (a
        // stable sort keeps each section's message order).
        if !leaves.items.is_sorted_by_key(|l| l.section) {
            leaves.items.sort_by_key(|l| l.section);
        }
        let event = parse::parse_fields(fields, None, opts)?;
        Ok(FlatEvent { event, leaves })
    }
}

/// The keys a feed row adds to its event.
#[derive(Default)]
struct RowKeys {
    seq: Option<i64>,
    segment_id: Option<String>,
    event_source_id: Option<String>,
}

/// Reads a message's text into its fields and its leaves; with
/// `row`, the keys of a feed row go there instead of the event.
fn read_message(text: &str, row: Option<&mut RowKeys>) -> Result<(Fields, Leaves), EventError> {
    // Sized from the text so that a typical event's buffers never grow, and capped so that a
    // large one's do not reserve more than they hold (pages keep thousands of events).
    let mut leaves = Leaves {
        keys: String::with_capacity((text.len() / 3).min(256)),
        objects: Vec::new(),
        items: Vec::with_capacity((text.len() / 24).min(32)),
        dotted: [false; 4],
        context_key: [false; 4],
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = serde::Deserializer::deserialize_map(
        &mut de,
        Message {
            leaves: &mut leaves,
            row,
        },
    )
    // Like `serde_json::from_str`: nothing but whitespace may follow the object.
    .and_then(|f| de.end().map(|()| f))
    .map_err(|e| EventError::new("message", format!("must be a JSON object: {e}")))?;
    Ok((fields, leaves))
}

/// The top-level object: model fields into [`Fields`] (objects as markers for their type
/// checks), leaves into [`Leaves`].
struct Message<'a> {
    leaves: &'a mut Leaves,
    /// A feed row's own keys, when reading one.
    row: Option<&'a mut RowKeys>,
}

impl<'de> Visitor<'de> for Message<'_> {
    type Value = Fields;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut a: A) -> Result<Fields, A::Error> {
        let mut f = Fields::default();
        while let Some(Key(key)) = a.next_key()? {
            if let Some(row) = self.row.as_deref_mut() {
                // The row's keys come first and are never repeated by the event (the engine
                // drops event keys of those names); a wrong type is left for the caller's
                // "missing" error.
                match key.as_ref() {
                    "seq" => {
                        row.seq = a.next_value::<Value>()?.as_i64();
                        continue;
                    }
                    "segment_id" => {
                        row.segment_id = a.next_value::<Value>()?.as_str().map(String::from);
                        continue;
                    }
                    "event_source_id" => {
                        row.event_source_id = a.next_value::<Value>()?.as_str().map(String::from);
                        continue;
                    }
                    _ => {}
                }
            }
            let section = match key.as_ref() {
                "context" => Section::Context,
                "traits" => Section::Traits,
                "properties" => Section::Properties,
                "integrations" => {
                    f.integrations = Some(a.next_value_seed(Object { into: None })?);
                    continue;
                }
                _ => {
                    match f.slot(&key) {
                        Slot::Known(slot) => *slot = Some(a.next_value()?),
                        Slot::Dropped => {
                            a.next_value::<IgnoredAny>()?;
                        }
                        Slot::Extra => {
                            a.next_value_seed(Node {
                                leaves: &mut *self.leaves,
                                section: Section::Extra,
                                parent: TOP,
                                key: &key,
                            })?;
                        }
                    }
                    continue;
                }
            };
            let marker = a.next_value_seed(Object {
                into: Some((&mut *self.leaves, section)),
            })?;
            match section {
                Section::Context => f.context = Some(marker),
                Section::Traits => f.traits = Some(marker),
                _ => f.properties = Some(marker),
            }
        }
        Ok(f)
    }
}

/// One of a message's objects: flattened into the leaves (or skipped, for `integrations`).
/// Returns what the model's type check needs: an empty object, `null`, or (for any other
/// type) `false`.
struct Object<'a> {
    into: Option<(&'a mut Leaves, Section)>,
}

impl<'de> DeserializeSeed<'de> for Object<'_> {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Object<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Value, E> {
        Ok(Value::Bool(false))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Value, E> {
        Ok(Value::Bool(false))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Value, E> {
        Ok(Value::Bool(false))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Value, E> {
        Ok(Value::Bool(false))
    }
    fn visit_str<E>(self, _: &str) -> Result<Value, E> {
        Ok(Value::Bool(false))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        // `[]` is an empty object, as the model reads it; any other array is refused.
        let mut empty = true;
        while a.next_element::<IgnoredAny>()?.is_some() {
            empty = false;
        }
        Ok(if empty {
            Value::Object(Map::new())
        } else {
            Value::Bool(false)
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        match self.into {
            None => while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {},
            Some((leaves, section)) => {
                walk_entries(&mut a, leaves, section, TOP)?;
            }
        }
        Ok(Value::Object(Map::new()))
    }
}

/// Flattens the entries of the object `parent`.
fn walk_entries<'de, A: MapAccess<'de>>(
    a: &mut A,
    leaves: &mut Leaves,
    section: Section,
    parent: u32,
) -> Result<(), A::Error> {
    while let Some(Key(key)) = a.next_key()? {
        a.next_value_seed(Node {
            leaves: &mut *leaves,
            section,
            parent,
            key: &key,
        })?;
    }
    Ok(())
}

/// The value at `key` of the object `parent`: a leaf, or an object whose entries are walked.
struct Node<'a, 'k> {
    leaves: &'a mut Leaves,
    section: Section,
    parent: u32,
    key: &'k str,
}

impl Node<'_, '_> {
    fn leaf(self, value: Value) {
        self.leaves.push(self.section, self.parent, self.key, value);
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        // No leaf, but the key counts for the dot check.
        self.leaf(Value::Null);
        Ok(())
    }
    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        self.leaf(Value::Bool(b));
        Ok(())
    }
    fn visit_i64<E>(self, n: i64) -> Result<(), E> {
        self.leaf(Value::from(n));
        Ok(())
    }
    fn visit_u64<E>(self, n: u64) -> Result<(), E> {
        self.leaf(Value::from(n));
        Ok(())
    }
    fn visit_f64<E>(self, n: f64) -> Result<(), E> {
        // As `serde_json::Value` reads it: a non-finite float (never in JSON text) is null.
        self.leaf(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number));
        Ok(())
    }
    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        self.leaf(Value::String(s.to_string()));
        Ok(())
    }
    fn visit_string<E>(self, s: String) -> Result<(), E> {
        self.leaf(Value::String(s));
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        let mut items = Vec::with_capacity(a.size_hint().unwrap_or(0));
        while let Some(v) = a.next_element::<Value>()? {
            items.push(v);
        }
        self.leaf(Value::Array(items));
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        let o = self.leaves.object(self.section, self.parent, self.key);
        walk_entries(&mut a, self.leaves, self.section, o)
    }
}
