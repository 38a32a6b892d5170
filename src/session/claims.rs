//! An ID token's claims as a session keeps them.
//!
//! A cached session held its claims as a `serde_json::Map` — a tree of small allocations, the
//! largest part of a cached session beyond its tokens. They are kept encoded instead (the object
//! encoding of `super::store::binary`, the very bytes of the sealed record), with the `roles` a
//! route policy reads on every request picked out once, as positions in those bytes: the claims
//! and their roles are one allocation, and opening a session walks the encoded object instead of
//! decoding it. `/bff/user` and a refresh's audience check decode them when they need them.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::store::binary::{Reader, Writer};
use crate::auth::policy::RoleSet;

/// The format byte in front of the encoded object (the object encoding's own, not a record's).
const CLAIMS_V1: u8 = 1;
/// One role in the table after the object: its offset and its length in the claims' bytes
/// (each a little-endian u32).
const ROLE_ENTRY: usize = 8;
/// The table ends with the number of roles (a little-endian u32).
const ROLE_COUNT: usize = 4;

/// Claims, encoded, with their roles.
#[derive(Clone, PartialEq, Eq)]
pub struct Claims {
    /// [`CLAIMS_V1`], the object as [`Writer::object`] writes it, then the roles' table
    /// ([`ROLE_ENTRY`] each, then [`ROLE_COUNT`]). Only the object goes into a record
    /// ([`Claims::write`]); the table is rebuilt when a record is read.
    bytes: Box<[u8]>,
}

impl Claims {
    pub fn new(map: &Map<String, Value>) -> Claims {
        let mut w = Writer::new(CLAIMS_V1, 64 * map.len());
        w.object(map);
        let encoded = w.finish();
        // The walk reads back what `Writer::object` wrote; it refuses only a map nested deeper
        // than a record may hold (a parsed ID token never is), which then grants no roles.
        let roles = Reader::new(CLAIMS_V1, &encoded).and_then(|mut r| r.object_roles());
        Claims::build(&encoded[1..], roles.flatten())
    }

    /// The claims read from a record at `r`: the object's bytes as they are, and its roles picked
    /// out of them (no map is built; every value is checked as a full decode would check it).
    pub(crate) fn read(r: &mut Reader<'_>) -> Option<Claims> {
        let start = r.rest();
        let roles = r.object_roles()?;
        Some(Claims::build(&start[..start.len() - r.rest().len()], roles))
    }

    /// The claims of the encoded `object` (without [`CLAIMS_V1`]) whose `roles` value, read from
    /// within `object` by [`Reader::object_roles`], is `roles`. Claims past 4 GiB grant no roles.
    fn build(object: &[u8], mut roles: Option<Reader<'_>>) -> Claims {
        let mut n = 0usize;
        if u32::try_from(1 + object.len()).is_err()
            || roles.is_some_and(|value| value.roles(|_| n += 1).is_none())
        {
            (roles, n) = (None, 0);
        }
        let len = 1 + object.len() + ROLE_ENTRY * n + ROLE_COUNT;
        let mut bytes = Vec::with_capacity(len);
        bytes.push(CLAIMS_V1);
        bytes.extend_from_slice(object);
        if let Some(value) = roles {
            let base = object.as_ptr() as usize;
            // Read once already: cannot fail now.
            let _ = value.roles(|role| {
                // `role` lies within `object`, which is at offset 1; both fit in u32 (above).
                let at = (role.as_ptr() as usize - base + 1) as u32;
                bytes.extend_from_slice(&at.to_le_bytes());
                bytes.extend_from_slice(&(role.len() as u32).to_le_bytes());
            });
        }
        bytes.extend_from_slice(&(n as u32).to_le_bytes());
        debug_assert_eq!(bytes.len(), len);
        Claims {
            bytes: bytes.into_boxed_slice(),
        }
    }

    /// The roles' table (after the object), and the object's end.
    fn table(&self) -> (&[u8], usize) {
        let b = &self.bytes;
        let count = b
            .last_chunk::<ROLE_COUNT>()
            .map_or(0, |c| u32::from_le_bytes(*c) as usize);
        let end = b.len().saturating_sub(ROLE_COUNT);
        let start = end.saturating_sub(ROLE_ENTRY * count);
        (&b[start..end], start)
    }

    /// [`CLAIMS_V1`] and the encoded object.
    fn object(&self) -> &[u8] {
        &self.bytes[..self.table().1]
    }

    /// Writes the object into a record at `w`.
    pub(crate) fn write(&self, w: &mut Writer) {
        w.raw(&self.object()[1..]);
    }

    /// The encoded size, for a writer's first allocation.
    pub(crate) fn encoded_len(&self) -> usize {
        self.object().len()
    }

    /// The roles they grant (`roles`: an array of strings, or space-separated names).
    pub(crate) fn roles(&self) -> Roles<'_> {
        Roles {
            bytes: &self.bytes,
            table: self.table().0,
        }
    }

    /// The claims as a JSON object.
    pub(crate) fn to_map(&self) -> Map<String, Value> {
        Reader::new(CLAIMS_V1, self.object())
            .and_then(|mut r| r.object())
            .unwrap_or_default()
    }

    /// One claim.
    pub(crate) fn get(&self, name: &str) -> Option<Value> {
        self.to_map().remove(name)
    }
}

/// The roles of [`Claims`], each the UTF-8 bytes of one role name.
#[derive(Clone, Copy)]
pub(crate) struct Roles<'a> {
    bytes: &'a [u8],
    /// What is left of the table.
    table: &'a [u8],
}

impl<'a> Iterator for Roles<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (entry, rest) = self.table.split_first_chunk::<ROLE_ENTRY>()?;
        self.table = rest;
        let [a0, a1, a2, a3, l0, l1, l2, l3] = *entry;
        let at = u32::from_le_bytes([a0, a1, a2, a3]) as usize;
        let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
        self.bytes.get(at..at + len)
    }
}

impl RoleSet for Roles<'_> {
    fn has(&self, role: &str) -> bool {
        { *self }.any(|r| r == role.as_bytes())
    }
}

impl Default for Claims {
    fn default() -> Claims {
        Claims::new(&Map::new())
    }
}

impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claims")
            .field("bytes", &self.encoded_len())
            .field(
                "roles",
                &self
                    .roles()
                    .map(String::from_utf8_lossy)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// As a JSON object (records of older versions held them as JSON; `/bff/user` shows them so).
impl Serialize for Claims {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_map().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Claims {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Claims, D::Error> {
        Map::deserialize(d).map(|m| Claims::new(&m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn claims_keep_every_value_and_pick_out_the_roles() {
        let m = map(
            r#"{"sub":"alice","roles":["user","admin"],"exp":1700000000,"neg":-3,"f":1.5,
                "nested":{"a":[null,true,"x"]},"email":"a@example.com"}"#,
        );
        let c = Claims::new(&m);
        assert_eq!(c.to_map(), m);
        assert_eq!(c.roles().nth(1), Some(&b"admin"[..]));
        assert_eq!(c.get("sub"), Some(Value::from("alice")));
        assert_eq!(c.get("missing"), None);
        let spaced = Claims::new(&map(r#"{"roles":"user  auditor"}"#));
        assert_eq!(spaced.roles().count(), 2);
        assert_eq!(Claims::default().roles().count(), 0);
        // Through serde (old JSON records, /bff/user) the same object.
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json, Value::Object(m.clone()));
        let back: Claims = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn claims_read_from_a_record_are_its_bytes() {
        let m = map(r#"{"sub":"bob","roles":["ops"]}"#);
        let mut w = Writer::new(7, 0);
        w.u8(9);
        Claims::new(&m).write(&mut w);
        w.u8(9);
        let bytes = w.finish();
        let mut r = Reader::new(7, &bytes).unwrap();
        assert_eq!(r.u8(), Some(9));
        let c = Claims::read(&mut r).unwrap();
        assert_eq!(r.u8(), Some(9));
        assert_eq!(c, Claims::new(&m));
        assert_eq!(c.roles().collect::<Vec<_>>(), [b"ops"]);
    }

    /// The roles as the decoded map grants them (`policy::roles`, which tokens use).
    fn roles_of(m: &Map<String, Value>) -> Vec<Vec<u8>> {
        crate::auth::policy::roles(m)
            .iter()
            .map(|r| r.as_bytes().to_vec())
            .collect()
    }

    fn picked(c: &Claims) -> Vec<Vec<u8>> {
        c.roles().map(<[u8]>::to_vec).collect()
    }

    /// Claims as a record holds them: read back from the object's encoding.
    fn read(c: &Claims) -> Option<Claims> {
        let mut w = Writer::new(CLAIMS_V1, 0);
        c.write(&mut w);
        let bytes = w.finish();
        let mut r = Reader::new(CLAIMS_V1, &bytes)?;
        let read = Claims::read(&mut r)?;
        r.end()?;
        Some(read)
    }

    #[test]
    fn roles_picked_from_the_encoded_claims_are_the_roles_of_the_decoded_ones() {
        for json in [
            r#"{}"#,
            r#"{"roles":["user","admin"]}"#,
            r#"{"roles":"user  auditor\tops\u00a0x\u3000y "}"#,
            r#"{"roles":""}"#,
            r#"{"roles":[]}"#,
            r#"{"roles":[1,"a",null,{"roles":["no"]},["b"],"c d",true,-2,2.5,"é"]}"#,
            r#"{"roles":{"roles":["no"]}}"#,
            r#"{"roles":7}"#,
            r#"{"roles":null}"#,
            r#"{"a":{"roles":["no"]},"z":["roles"],"roles":["yes"]}"#,
            r#"{"nested":[[[{"k":[1,{"roles":"no"}]}]]],"roles":["x","x"]}"#,
        ] {
            let m = map(json);
            let c = Claims::new(&m);
            assert_eq!(picked(&c), roles_of(&m), "{json}");
            let r = read(&c).expect(json);
            assert_eq!(r, c, "{json}");
            assert_eq!(r.to_map(), m, "{json}");
        }
    }

    #[test]
    fn of_several_roles_members_the_last_counts_as_in_the_decoded_map() {
        // A map never writes a key twice; a record could hold it, and decoding keeps the last.
        let mut w = Writer::new(CLAIMS_V1, 0);
        w.uint(3);
        w.bytes(b"roles").value(&Value::from("first"));
        w.bytes(b"x").value(&Value::Null);
        w.bytes(b"roles").value(&serde_json::json!(["second", 1]));
        let bytes = w.finish();
        let decoded = Reader::new(CLAIMS_V1, &bytes).unwrap().object().unwrap();
        let c = Claims::read(&mut Reader::new(CLAIMS_V1, &bytes).unwrap()).unwrap();
        assert_eq!(picked(&c), roles_of(&decoded));
        assert_eq!(picked(&c), [b"second"]);
    }

    #[test]
    fn a_session_s_roles_answer_a_route_policy() {
        use crate::auth::policy::RoleSet;
        let c = Claims::new(&map(r#"{"roles":["user","admin"]}"#));
        assert!(c.roles().has("admin") && c.roles().has("user"));
        assert!(!c.roles().has("adm") && !c.roles().has("") && !c.roles().has("admins"));
        assert!(!Claims::default().roles().has("user"));
    }

    fn value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e300f64..1e300).prop_map(Value::from),
            ".{0,6}".prop_map(Value::from),
            "( |\t|\n|\u{a0}|\u{3000}|a|é|r){0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                proptest::collection::btree_map("roles|[a-z]{0,3}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn roles_from_the_encoding_equal_roles_from_the_full_decode(
            members in proptest::collection::btree_map("roles|[a-z]{0,4}", value(), 0..8),
            roles in proptest::option::of(value()),
        ) {
            let mut m: Map<String, Value> = members.into_iter().collect();
            if let Some(r) = roles {
                m.insert("roles".into(), r);
            }
            let c = Claims::new(&m);
            proptest::prop_assert_eq!(picked(&c), roles_of(&m));
            let r = read(&c).expect("reads back");
            proptest::prop_assert_eq!(picked(&r), roles_of(&m));
            proptest::prop_assert_eq!(r.to_map(), m);
        }

        #[test]
        fn the_walk_refuses_exactly_what_the_full_decode_refuses(
            members in proptest::collection::btree_map("roles|[a-z]{0,4}", value(), 0..6),
            at: proptest::sample::Index, byte: u8, cut: proptest::sample::Index, how in 0..3u8,
        ) {
            let m: Map<String, Value> = members.into_iter().collect();
            let mut w = Writer::new(CLAIMS_V1, 0);
            w.object(&m);
            let mut bytes = w.finish();
            let len = bytes.len();
            match how {
                0 => bytes[1 + at.index(len - 1)] = byte,
                1 => bytes.truncate(1 + cut.index(len)),
                _ => bytes.insert(1 + at.index(len), byte),
            }
            let mut full = Reader::new(CLAIMS_V1, &bytes).unwrap();
            let decoded = full.object();
            let mut walk = Reader::new(CLAIMS_V1, &bytes).unwrap();
            let claims = Claims::read(&mut walk);
            proptest::prop_assert_eq!(decoded.is_some(), claims.is_some());
            if let (Some(d), Some(c)) = (decoded, claims) {
                proptest::prop_assert_eq!(picked(&c), roles_of(&d));
                proptest::prop_assert_eq!(c.to_map(), d);
                proptest::prop_assert_eq!(walk.rest(), full.rest());
            }
        }
    }
}
