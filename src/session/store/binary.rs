//! The compact binary encoding of what the session stores keep: a leading format-version byte,
//! then fields in a fixed order, every number an unsigned LEB128 varint and every string or byte
//! string its varint length followed by its bytes. No field names, no base64, no escaping.
//!
//! Older versions wrote JSON, which always starts with `{` (0x7B); a version byte is never that,
//! so a reader decides by the first byte and both kinds keep loading ([`super::Record::decode`],
//! [`crate::session::SessionData::decode`]).
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

    pub(crate) fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// The room a varint length and `n` bytes take at most (for [`Writer::new`]'s capacity).
pub(crate) const fn sized(n: usize) -> usize {
    n + 10
}

/// Reads one encoded value; every method is `None` on malformed or truncated input.
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
        std::str::from_utf8(self.bytes()?).ok().map(str::to_owned)
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
