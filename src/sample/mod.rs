//! Synthetic Segment traffic with realistic shapes, for the demo, tests and benchmarks:
//! anonymous visitors who browse, sign up, log in on several devices, share an email with a
//! family member, get aliased, join an account, and buy things. Deterministic for a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const PRODUCTS: [(&str, &str, f64); 6] = [
    ("sku-001", "Trail Shoes", 129.0),
    ("sku-002", "Rain Jacket", 189.5),
    ("sku-003", "Wool Socks", 14.99),
    ("sku-004", "Headlamp", 39.0),
    ("sku-005", "Water Bottle", 19.0),
    ("sku-006", "Day Pack", 89.0),
];
const PAGES: [(&str, &str); 5] = [
    ("/", "Home"),
    ("/pricing", "Pricing"),
    ("/docs", "Docs"),
    ("/shop", "Shop"),
    ("/blog/spring", "Spring Sale"),
];
const PLANS: [&str; 3] = ["free", "pro", "team"];

/// The messageId stream of round `round` of seed `seed`.
fn id_stream(seed: u64, round: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ round.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A random version-4 UUID, the messageId Segment's SDKs send: random ids land all over a store's
/// dedupe index, where sequential ones would only ever append to it.
pub fn uuid_v4(rng: &mut impl Rng) -> String {
    let b: u128 = rng.random::<u128>() & !(0xf << 76) & !(0x3 << 62) | (0x4 << 76) | (0x2 << 62);
    let h = format!("{b:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Generates the message stream of `people` people, in time order per person.
pub struct SampleGenerator {
    rng: StdRng,
    /// The messageIds' own stream (so that they leave the traffic's shape as it was).
    ids: StdRng,
    seed: u64,
    people: u64,
    next_person: u64,
    /// Epoch seconds of the first event.
    start: i64,
    round: u64,
}

impl SampleGenerator {
    /// A generator for `people` people starting at `start` (Unix seconds), reproducible by `seed`.
    pub fn new(seed: u64, people: u64, start: i64) -> SampleGenerator {
        SampleGenerator {
            rng: StdRng::seed_from_u64(seed),
            ids: id_stream(seed, 0),
            seed,
            people,
            next_person: 0,
            start,
            round: 0,
        }
    }

    /// The same people coming back: round `r` repeats the population with new message ids and
    /// later timestamps (so the number of events grows while the number of profiles does not).
    pub fn round(mut self, r: u64) -> SampleGenerator {
        self.round = r;
        self.ids = id_stream(self.seed, r);
        self.start += i64::try_from(r).unwrap_or(0) * 86_400;
        self
    }

    fn base(&mut self, kind: &str, at: i64) -> serde_json::Map<String, Value> {
        let ts = jiff::Timestamp::from_second(at)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let mut m = serde_json::Map::new();
        m.insert("type".into(), kind.into());
        m.insert("messageId".into(), uuid_v4(&mut self.ids).into());
        m.insert("timestamp".into(), ts.clone().into());
        m.insert("receivedAt".into(), ts.into());
        m
    }

    fn device(&mut self, mobile: bool, anon: &str) -> Value {
        if mobile {
            let ios = self.rng.random_bool(0.5);
            json!({
                "device": {"id": format!("dev-{anon}"), "type": if ios { "ios" } else { "android" },
                           "advertisingId": format!("ad-{anon}"), "adTrackingEnabled": self.rng.random_bool(0.3)},
                "os": {"name": if ios { "iOS" } else { "Android" }},
                "app": {"name": "Outdoors", "version": "4.2.0"},
                "library": {"name": if ios { "analytics-ios" } else { "analytics-android" }, "version": "4.1.0"}
            })
        } else {
            json!({
                "ip": format!("203.0.113.{}", self.rng.random_range(1..255)),
                "userAgent": "Mozilla/5.0 (X11; Linux x86_64)",
                "library": {"name": "analytics.js", "version": "5.2.0"},
                "page": {"path": "/", "url": "https://example.com/"}
            })
        }
    }

    /// The messages of the next person (empty once every person has been generated).
    pub fn next_person(&mut self) -> Vec<Value> {
        if self.next_person >= self.people {
            return vec![];
        }
        let p = self.next_person;
        self.next_person += 1;
        let mut out = vec![];
        let mut at = self.start + (p as i64) * 7;
        let anon_web = format!("anon-{p}-web");
        let user = format!("user-{p}");
        // A family shares an email every ~10 people; the second member's user_id keeps them apart.
        let email = if p % 10 == 1 {
            format!("family-{}@example.com", p - 1)
        } else {
            format!("person{p}@example.com")
        };
        let ctx = self.device(false, &anon_web);
        // Anonymous browsing.
        for _ in 0..self.rng.random_range(1..4) {
            at += self.rng.random_range(5..120);
            let (path, name) = PAGES[self.rng.random_range(0..PAGES.len())];
            let mut m = self.base("page", at);
            m.insert("anonymousId".into(), anon_web.clone().into());
            m.insert("name".into(), name.into());
            m.insert("properties".into(), json!({"path": path, "url": format!("https://example.com{path}"), "referrer": "https://search.example/"}));
            m.insert("context".into(), ctx.clone());
            out.push(Value::Object(m));
        }
        let (sku, product, price) = PRODUCTS[self.rng.random_range(0..PRODUCTS.len())];
        at += 30;
        let mut m = self.base("track", at);
        m.insert("anonymousId".into(), anon_web.clone().into());
        m.insert("event".into(), "Product Viewed".into());
        m.insert(
            "properties".into(),
            json!({"product_id": sku, "name": product, "price": price}),
        );
        m.insert("context".into(), ctx.clone());
        out.push(Value::Object(m));
        // Two in three sign up.
        if self.rng.random_bool(0.66) {
            at += 60;
            let mut m = self.base("identify", at);
            m.insert("anonymousId".into(), anon_web.clone().into());
            m.insert("userId".into(), user.clone().into());
            m.insert(
                "traits".into(),
                json!({"email": email, "name": format!("Person {p}"), "plan": PLANS[(p % 3) as usize], "created_at": jiff::Timestamp::from_second(at).map(|t| t.to_string()).unwrap_or_default()}),
            );
            m.insert("context".into(), ctx.clone());
            out.push(Value::Object(m));
            let mut m = self.base("track", at + 1);
            m.insert("userId".into(), user.clone().into());
            m.insert("event".into(), "Signed Up".into());
            m.insert(
                "properties".into(),
                json!({"plan": PLANS[(p % 3) as usize]}),
            );
            m.insert("context".into(), ctx.clone());
            out.push(Value::Object(m));
            // Half buy something.
            if self.rng.random_bool(0.5) {
                at += self.rng.random_range(60..600);
                let qty = self.rng.random_range(1..3);
                let mut m = self.base("track", at);
                m.insert("userId".into(), user.clone().into());
                m.insert("event".into(), "Order Completed".into());
                m.insert(
                    "properties".into(),
                    json!({"order_id": format!("ord-{p}"), "total": price * f64::from(qty), "currency": "EUR",
                           "products": [{"product_id": sku, "quantity": qty}], "coupon": if p.is_multiple_of(4) { json!("SPRING") } else { Value::Null }}),
                );
                m.insert("context".into(), ctx.clone());
                out.push(Value::Object(m));
            }
            // A third log in on a phone too, first anonymously, then identified.
            if self.rng.random_bool(0.33) {
                let anon_app = format!("anon-{p}-app");
                let app = self.device(true, &anon_app);
                at += 3600;
                let mut m = self.base("screen", at);
                m.insert("anonymousId".into(), anon_app.clone().into());
                m.insert("name".into(), "Home".into());
                m.insert("context".into(), app.clone());
                out.push(Value::Object(m));
                let mut m = self.base("identify", at + 20);
                m.insert("anonymousId".into(), anon_app.into());
                m.insert("userId".into(), user.clone().into());
                m.insert(
                    "traits".into(),
                    json!({"plan": PLANS[((p + 1) % 3) as usize], "mobile_user": true}),
                );
                m.insert("context".into(), app);
                out.push(Value::Object(m));
            }
            // Some join their company's account.
            if p.is_multiple_of(5) {
                let mut m = self.base("group", at + 30);
                m.insert("userId".into(), user.clone().into());
                m.insert("groupId".into(), format!("acct-{}", p / 5).into());
                m.insert(
                    "traits".into(),
                    json!({"name": format!("Company {}", p / 5), "employees": 10 + p}),
                );
                out.push(Value::Object(m));
            }
            // A support tool aliases an old anonymous id to the user now and then.
            if p.is_multiple_of(7) {
                let mut m = self.base("alias", at + 40);
                m.insert("userId".into(), user.into());
                m.insert("previousId".into(), format!("legacy-{p}").into());
                out.push(Value::Object(m));
            }
        }
        out
    }
}

impl Iterator for SampleGenerator {
    type Item = Vec<Value>;

    fn next(&mut self) -> Option<Vec<Value>> {
        let v = self.next_person();
        (!v.is_empty()).then_some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_realistic() {
        let a: Vec<Value> = SampleGenerator::new(7, 50, 1_767_225_600)
            .flatten()
            .collect();
        let b: Vec<Value> = SampleGenerator::new(7, 50, 1_767_225_600)
            .flatten()
            .collect();
        assert_eq!(a, b);
        let kinds: std::collections::HashSet<&str> =
            a.iter().filter_map(|m| m["type"].as_str()).collect();
        for k in ["page", "track", "identify", "screen", "group", "alias"] {
            assert!(kinds.contains(k), "{k} missing");
        }
        let opts = crate::event::ParseOptions {
            now: jiff::Timestamp::now(),
            source_id: "s".into(),
            trust_received_at: true,
        };
        for m in &a {
            crate::event::Event::from_json(m, None, &opts).unwrap_or_else(|e| panic!("{m}: {e}"));
        }
    }

    #[test]
    fn message_ids_are_distinct_version_4_uuids_across_rounds() {
        let ids: Vec<String> = (0..3)
            .flat_map(|r| {
                SampleGenerator::new(7, 50, 1_767_225_600)
                    .round(r)
                    .flatten()
            })
            .map(|m| m["messageId"].as_str().unwrap().to_string())
            .collect();
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            let parts: Vec<&str> = id.split('-').collect();
            let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            assert_eq!(lens, [8, 4, 4, 4, 12], "{id}");
            assert!(
                id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
                "{id}"
            );
            assert!(parts[2].starts_with('4'), "version 4: {id}");
            assert!(
                parts[3].starts_with(['8', '9', 'a', 'b']),
                "variant 1: {id}"
            );
        }
    }
}
