//! The compact binary encoding of what the session stores keep: a leading format-version byte,
//! then fields in a fixed order, every number an unsigned LEB128 varint and every string or byte
//! string its varint length followed by its bytes. No field names, no base64, no escaping.
//!
//! Older versions wrote JSON, which always starts with `{` (0x7B); a version byte is never that,
//! so a reader decides by the first byte and both kinds keep loading ([`super::Record::decode`],
//! `crate::session::SessionData::decode_parts`).
//!
//! Reading never panics: every length is checked against what is left, a varint longer than ten
//! bytes or overflowing 64 bits is refused, and a record must end exactly where its last field
//! does. A malformed or truncated record decodes to `None`.

/// Builds one encoded value.
pub(crate) struct Writer(Vec<u8>);

impl Writer {
    /// A writer whose first byte is the format `version`, with room for `capacity` bytes.
    pub(crate) fn new(version: u8, capacity: usize) -> Writer {
        let mut buf = Vec::with_capacity(capacity);
        buf.push(version);
        Writer(buf)
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    /// Unsigned LEB128: seven bits a byte, low bits first, the high bit says "more follows".
    pub(crate) fn uint(&mut self, mut v: u64) -> &mut Self {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
        self
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.uint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }

    /// `0` for none, `1` and the bytes for some.
    pub(crate) fn opt_bytes(&mut self, b: Option<&[u8]>) -> &mut Self {
        match b {
            None => self.u8(0),
            Some(b) => self.u8(1).bytes(b),
        }
    }

    /// Bytes already in this encoding (e.g. an object written earlier), appended as they are.
    pub(crate) fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// JSON values (the ID token's claims) without JSON text: a tag byte, then the value —
/// `0` null, `1` false, `2` true, `3` a non-negative integer (varint), `4` a negative integer
/// (varint of its bitwise complement), `5` a float (8 bytes, little-endian IEEE 754), `6` a string,
/// `7` an array (varint count, values), `8` an object (varint count, key string and value pairs).
/// Decoding builds the same `serde_json` values without tokenizing, unescaping or parsing numbers.
mod tag {
    pub(crate) const NULL: u8 = 0;
    pub(crate) const FALSE: u8 = 1;
    pub(crate) const TRUE: u8 = 2;
    pub(crate) const UINT: u8 = 3;
    pub(crate) const NEG: u8 = 4;
    pub(crate) const FLOAT: u8 = 5;
    pub(crate) const STRING: u8 = 6;
    pub(crate) const ARRAY: u8 = 7;
    pub(crate) const OBJECT: u8 = 8;
}

/// Nesting deeper than this is refused when reading (serde_json's own recursion limit).
const MAX_DEPTH: usize = 128;

impl Writer {
    /// An object's members (varint count, then key and value pairs).
    pub(crate) fn object(&mut self, m: &serde_json::Map<String, serde_json::Value>) -> &mut Self {
        self.uint(m.len() as u64);
        for (k, v) in m {
            self.bytes(k.as_bytes()).value(v);
        }
        self
    }

    pub(crate) fn value(&mut self, v: &serde_json::Value) -> &mut Self {
        use serde_json::Value;
        match v {
            Value::Null => self.u8(tag::NULL),
            Value::Bool(false) => self.u8(tag::FALSE),
            Value::Bool(true) => self.u8(tag::TRUE),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => self.u8(tag::UINT).uint(u),
                (None, Some(i), _) => self.u8(tag::NEG).uint(!i as u64),
                (None, None, f) => {
                    self.u8(tag::FLOAT);
                    self.0.extend_from_slice(&f.unwrap_or(0.0).to_le_bytes());
                    self
                }
            },
            Value::String(s) => self.u8(tag::STRING).bytes(s.as_bytes()),
            Value::Array(a) => {
                self.u8(tag::ARRAY).uint(a.len() as u64);
                for v in a {
                    self.value(v);
                }
                self
            }
            Value::Object(m) => self.u8(tag::OBJECT).object(m),
        }
    }
}

/// The room a varint length and `n` bytes take at most (for [`Writer::new`]'s capacity).
pub(crate) const fn sized(n: usize) -> usize {
    n + 10
}

/// Reads one encoded value; every method is `None` on malformed or truncated input.
#[derive(Clone, Copy)]
pub(crate) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A reader over `bytes` if they start with the format `version`.
    pub(crate) fn new(version: u8, bytes: &'a [u8]) -> Option<Reader<'a>> {
        match bytes.split_first() {
            Some((&v, rest)) if v == version => Some(Reader(rest)),
            _ => None,
        }
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        let (&v, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(v)
    }

    pub(crate) fn uint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            // The tenth byte may only carry the 64th bit.
            if shift == 63 && bits > 1 {
                return None;
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    pub(crate) fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.uint()?).ok()?;
        if n > self.0.len() {
            return None;
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(b)
    }

    pub(crate) fn string(&mut self) -> Option<String> {
        self.str().map(str::to_owned)
    }

    /// A string, borrowed from the input (checked to be UTF-8, not copied).
    pub(crate) fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    /// A string's bytes, checked to be UTF-8 without making a `&str` of them (claim names and
    /// values are mostly short ASCII, checked inline before any call to the full validation).
    fn utf8(&mut self) -> Option<&'a [u8]> {
        let b = self.bytes()?;
        (b.is_ascii() || std::str::from_utf8(b).is_ok()).then_some(b)
    }

    /// What is left to read.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.0
    }

    pub(crate) fn opt_bytes(&mut self) -> Option<Option<&'a [u8]>> {
        match self.u8()? {
            0 => Some(None),
            1 => self.bytes().map(Some),
            _ => None,
        }
    }

    pub(crate) fn opt_string(&mut self) -> Option<Option<String>> {
        match self.opt_bytes()? {
            None => Some(None),
            Some(b) => std::str::from_utf8(b).ok().map(|s| Some(s.to_owned())),
        }
    }

    /// An object written by [`Writer::object`].
    pub(crate) fn object(&mut self) -> Option<serde_json::Map<String, serde_json::Value>> {
        self.object_at(0)
    }

    fn object_at(&mut self, depth: usize) -> Option<serde_json::Map<String, serde_json::Value>> {
        let n = self.count()?;
        let mut m = serde_json::Map::new();
        for _ in 0..n {
            let k = self.string()?;
            let v = self.value_at(depth + 1)?;
            m.insert(k, v);
        }
        Some(m)
    }

    fn value_at(&mut self, depth: usize) -> Option<serde_json::Value> {
        use serde_json::Value;
        if depth > MAX_DEPTH {
            return None;
        }
        Some(match self.u8()? {
            tag::NULL => Value::Null,
            tag::FALSE => Value::Bool(false),
            tag::TRUE => Value::Bool(true),
            tag::UINT => Value::from(self.uint()?),
            tag::NEG => Value::from(!i64::try_from(self.uint()?).ok()?),
            tag::FLOAT => {
                let (b, rest) = self.0.split_first_chunk::<8>()?;
                self.0 = rest;
                Value::Number(serde_json::Number::from_f64(f64::from_le_bytes(*b))?)
            }
            tag::STRING => Value::String(self.string()?),
            tag::ARRAY => {
                let n = self.count()?;
                let mut a = Vec::with_capacity(n);
                for _ in 0..n {
                    a.push(self.value_at(depth + 1)?);
                }
                Value::Array(a)
            }
            tag::OBJECT => Value::Object(self.object_at(depth + 1)?),
            _ => return None,
        })
    }

    /// Reads past an object written by [`Writer::object`] without building it, checking every
    /// value as [`Reader::object`] does (so exactly the objects it refuses are refused), and
    /// returns a reader at the value of its `roles` member: the last one, as the decoded map keeps
    /// it. Opening a session needs the roles only; the rest of the claims stays encoded.
    pub(crate) fn object_roles(&mut self) -> Option<Option<Reader<'a>>> {
        let n = self.count()?;
        let mut roles = None;
        for _ in 0..n {
            if self.utf8()? == b"roles" {
                roles = Some(Reader(self.0));
            }
            self.skip_value(1)?;
        }
        Some(roles)
    }

    /// Reads past one value as [`Reader::value_at`] would read it, refusing what it refuses: an
    /// unknown tag, nesting past [`MAX_DEPTH`], a negative integer beyond `i64`, a float that is
    /// not finite (JSON has none), a string that is not UTF-8.
    fn skip_value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.u8()? {
            tag::NULL | tag::FALSE | tag::TRUE => {}
            tag::UINT => {
                self.uint()?;
            }
            tag::NEG => {
                i64::try_from(self.uint()?).ok()?;
            }
            tag::FLOAT => {
                let (b, rest) = self.0.split_first_chunk::<8>()?;
                self.0 = rest;
                f64::from_le_bytes(*b).is_finite().then_some(())?;
            }
            tag::STRING => {
                self.utf8()?;
            }
            tag::ARRAY => {
                let n = self.count()?;
                for _ in 0..n {
                    self.skip_value(depth + 1)?;
                }
            }
            tag::OBJECT => {
                let n = self.count()?;
                for _ in 0..n {
                    self.utf8()?;
                    self.skip_value(depth + 2)?;
                }
            }
            _ => return None,
        }
        Some(())
    }

    /// The roles a value read by [`Reader::object_roles`] grants, as byte ranges of the input
    /// (each a whole UTF-8 string): an array's string elements (other elements are passed over),
    /// or the space-separated names of a string (as `str::split_whitespace` splits them).
    /// Anything else grants none.
    pub(crate) fn roles(mut self, mut each: impl FnMut(&'a [u8])) -> Option<()> {
        match self.u8()? {
            tag::STRING => self
                .str()?
                .split_whitespace()
                .for_each(|r| each(r.as_bytes())),
            tag::ARRAY => {
                let n = self.count()?;
                for _ in 0..n {
                    if self.0.first() == Some(&tag::STRING) {
                        self.u8()?;
                        // Checked to be UTF-8 by `object_roles`.
                        each(self.bytes()?);
                    } else {
                        self.skip_value(2)?;
                    }
                }
            }
            _ => {}
        }
        Some(())
    }

    /// A varint element count, refused if more elements than bytes are left (each takes one at
    /// least), so a garbled count cannot make a reader reserve memory for nothing.
    fn count(&mut self) -> Option<usize> {
        let n = usize::try_from(self.uint()?).ok()?;
        (n <= self.0.len()).then_some(n)
    }

    /// `Some(())` if every byte was read (trailing bytes mean a malformed value).
    pub(crate) fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_their_edges() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut w = Writer::new(9, 0);
            w.uint(v);
            let bytes = w.finish();
            let mut r = Reader::new(9, &bytes).unwrap();
            assert_eq!(r.uint(), Some(v));
            assert!(r.end().is_some());
        }
    }

    #[test]
    fn overlong_or_overflowing_varints_are_refused() {
        // Eleven continuation bytes, and a tenth byte with more than the 64th bit.
        assert_eq!(Reader(&[0xff; 11]).uint(), None);
        let mut over = vec![0xff; 9];
        over.push(0x02);
        assert_eq!(Reader(&over).uint(), None);
        assert_eq!(Reader(&[0x80]).uint(), None, "truncated");
    }

    #[test]
    fn json_values_round_trip_and_deep_nesting_is_refused() {
        let serde_json::Value::Object(m) = serde_json::json!({
            "null": null, "t": true, "f": false, "zero": 0, "big": u64::MAX, "neg": -1,
            "min": i64::MIN, "float": -2.5e-300, "s": "Ünï \"q\" \u{0}",
            "a": [1, [2, [3, {}]], "x"], "o": {"k": {"k": []}}
        }) else {
            unreachable!()
        };
        let mut w = Writer::new(1, 0);
        w.object(&m);
        let bytes = w.finish();
        let mut r = Reader::new(1, &bytes).unwrap();
        assert_eq!(r.object(), Some(m));
        assert!(r.end().is_some());
        for n in 1..bytes.len() {
            assert_eq!(Reader::new(1, &bytes[..n]).unwrap().object(), None);
        }
        // {"k": [[[[…]]]]} nested past the limit.
        let mut deep = vec![1, 1, 1, b'k'];
        deep.extend(std::iter::repeat_n([tag::ARRAY, 1], 200).flatten());
        deep.push(tag::NULL);
        assert_eq!(Reader::new(1, &deep).unwrap().object(), None);
    }

    #[test]
    fn a_string_s_bytes_are_checked_as_utf8_with_or_without_making_a_str() {
        for (bytes, ok) in [
            (&b""[..], true),
            (b"roles", true),
            ("Ünï €".as_bytes(), true),
            (b"\xff", false),
            (b"ab\xc3", false),
            (b"\xed\xa0\x80", false),
        ] {
            let mut w = Writer::new(1, 0);
            w.bytes(bytes);
            let enc = w.finish();
            let utf8 = Reader::new(1, &enc).unwrap().utf8();
            let str = Reader::new(1, &enc).unwrap().str();
            assert_eq!(utf8.is_some(), ok, "{bytes:?}");
            assert_eq!(str.is_some(), ok, "{bytes:?}");
            assert_eq!(utf8, str.map(str::as_bytes));
        }
    }

    #[test]
    fn a_length_beyond_the_input_is_refused() {
        let mut w = Writer::new(1, 0);
        w.bytes(b"hello");
        let mut bytes = w.finish();
        bytes.truncate(4);
        assert_eq!(Reader::new(1, &bytes).unwrap().bytes(), None);
        assert!(Reader::new(2, &bytes).is_none(), "another version");
        assert!(Reader::new(1, &[]).is_none(), "empty");
    }
}
