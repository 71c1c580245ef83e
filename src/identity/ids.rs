//! Generated and derived ids: segment ids, row ids and external id hashes.

use rand::Rng;
use sha1::{Digest, Sha1};

/// Seconds from the Unix epoch to the KSUID epoch (2014-05-13T16:53:20Z).
const KSUID_EPOCH: i64 = 1_400_000_000;
/// KSUID's base62 alphabet: ASCII order, so encoded ids sort like the bytes they encode.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The `external_id_hash` column: lowercase hex SHA-1 of the type's bytes followed by the
/// value's bytes (`sha1(type || value)`), as Segment computes it.
pub fn external_id_hash(id_type: &str, value: &str) -> String {
    sha1_hex(&[id_type.as_bytes(), value.as_bytes()])
}

/// Lowercase hex SHA-1 of `parts`, one after the other.
pub(crate) fn sha1_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p);
    }
    to_hex(&h.finalize())
}

/// A new profile id: `use_` followed by a 27-character KSUID (4 bytes of seconds since the
/// KSUID epoch, then 16 random bytes, in base62), so ids created later sort later.
pub fn new_segment_id() -> String {
    let mut s = String::with_capacity(31);
    s.push_str("use_");
    push_ksuid(&mut s);
    s
}

/// A new unique row id (a bare 27-character KSUID), for `external_id_mapping_updates.id`.
pub fn new_row_id() -> String {
    let mut s = String::with_capacity(27);
    push_ksuid(&mut s);
    s
}

fn push_ksuid(out: &mut String) {
    let secs = jiff::Timestamp::now().as_second() - KSUID_EPOCH;
    let secs = u32::try_from(secs.max(0)).unwrap_or(u32::MAX);
    let mut bytes = [0u8; 20];
    bytes[..4].copy_from_slice(&secs.to_be_bytes());
    rand::rng().fill(&mut bytes[4..]);
    out.push_str(&base62_20(bytes));
}

/// Base62 of a 160-bit big-endian number, left-padded with `0` to 27 characters.
fn base62_20(n: [u8; 20]) -> String {
    // Long division by 62 over five 32-bit limbs, most significant first.
    let mut limbs = [0u32; 5];
    for (limb, chunk) in limbs.iter_mut().zip(n.chunks_exact(4)) {
        *limb = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    let mut digits = [b'0'; 27];
    for slot in digits.iter_mut().rev() {
        let mut rem: u64 = 0;
        for limb in limbs.iter_mut() {
            let acc = (rem << 32) | u64::from(*limb);
            // acc < 62 * 2^32, so the quotient fits in 32 bits.
            *limb = (acc / 62) as u32;
            rem = acc % 62;
        }
        *slot = BASE62[rem as usize];
    }
    digits.iter().map(|&b| char::from(b)).collect()
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_id_hash_is_sha1_of_type_then_value() {
        // sha1("user_id" || "abc123") and sha1("") computed independently.
        assert_eq!(
            external_id_hash("", ""),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
        assert_eq!(
            external_id_hash("email", "jane@example.com"),
            external_id_hash("emailjane@", "example.com")
        );
        assert_eq!(
            external_id_hash("abc", ""),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(external_id_hash("a", "bc"), external_id_hash("abc", ""));
    }

    #[test]
    fn segment_ids_are_ksuid_shaped_and_unique() {
        let re = regex::Regex::new("^use_[0-9A-Za-z]{27}$").expect("regex");
        let a = new_segment_id();
        let b = new_segment_id();
        assert!(re.is_match(&a), "{a}");
        assert_ne!(a, b);
        assert_eq!(new_row_id().len(), 27);
    }

    #[test]
    fn base62_encodes_the_extremes() {
        assert_eq!(base62_20([0; 20]), "0".repeat(27));
        // KSUID's documented maximum value.
        assert_eq!(base62_20([0xff; 20]), "aWgEPTl1tmebfsQzFP4bxwgy80V");
        let mut one = [0; 20];
        one[19] = 61;
        assert_eq!(base62_20(one), format!("{}z", "0".repeat(26)));
    }
}
