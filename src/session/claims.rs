//! An ID token's claims as a session keeps them.
//!
//! A cached session held its claims as a `serde_json::Map` — a tree of small allocations, the
//! largest part of a cached session beyond its tokens. They are kept encoded instead (the object
//! encoding of [`super::store::binary`], the very bytes of the sealed record), with the `roles` a
//! route policy reads on every request picked out once. `/bff/user` and a refresh's audience check
//! decode them when they need them.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::store::binary::{Reader, Writer};
use crate::auth::policy;

/// The format byte in front of [`Claims::encoded`] (the object encoding's own, not a record's).
const CLAIMS_V1: u8 = 1;

/// Claims, encoded, with their roles.
#[derive(Clone, PartialEq, Eq)]
pub struct Claims {
    /// [`CLAIMS_V1`], then the object as [`Writer::object`] writes it.
    encoded: Box<[u8]>,
    roles: Box<[Box<str>]>,
}

impl Claims {
    pub fn new(map: &Map<String, Value>) -> Claims {
        let mut w = Writer::new(CLAIMS_V1, 64 * map.len());
        w.object(map);
        Claims {
            encoded: w.finish().into_boxed_slice(),
            roles: policy::roles(map).into_boxed_slice(),
        }
    }

    /// The claims read from a record at `r` (the object's bytes are kept as they are).
    pub(crate) fn read(r: &mut Reader<'_>) -> Option<Claims> {
        let (map, bytes) = r.object_and_bytes()?;
        let mut encoded = Vec::with_capacity(1 + bytes.len());
        encoded.push(CLAIMS_V1);
        encoded.extend_from_slice(bytes);
        Some(Claims {
            encoded: encoded.into_boxed_slice(),
            roles: policy::roles(&map).into_boxed_slice(),
        })
    }

    /// Writes the object into a record at `w`.
    pub(crate) fn write(&self, w: &mut Writer) {
        w.raw(&self.encoded[1..]);
    }

    /// The encoded size, for a writer's first allocation.
    pub(crate) fn encoded_len(&self) -> usize {
        self.encoded.len()
    }

    /// The roles they grant (`roles`: an array of strings, or space-separated names).
    pub fn roles(&self) -> &[Box<str>] {
        &self.roles
    }

    /// The claims as a JSON object.
    pub fn to_map(&self) -> Map<String, Value> {
        Reader::new(CLAIMS_V1, &self.encoded)
            .and_then(|mut r| r.object())
            .unwrap_or_default()
    }

    /// One claim.
    pub fn get(&self, name: &str) -> Option<Value> {
        self.to_map().remove(name)
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
            .field("bytes", &self.encoded.len())
            .field("roles", &self.roles)
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
        assert_eq!(&*c.roles()[1], "admin");
        assert_eq!(c.get("sub"), Some(Value::from("alice")));
        assert_eq!(c.get("missing"), None);
        let spaced = Claims::new(&map(r#"{"roles":"user  auditor"}"#));
        assert_eq!(spaced.roles().len(), 2);
        assert!(Claims::default().roles().is_empty());
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
        assert_eq!(&*c.roles()[0], "ops");
    }
}
