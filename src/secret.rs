//! Secret values: newtypes that never print themselves, and the `env:`/`file:` indirection used by
//! the configuration.
//!
//! Tokens, the client secret, session keys, session ids and authorization codes are all held in
//! [`Secret`] so that no `Debug`/`Display` (and therefore no log line) can leak one by accident.

use std::fmt;

/// A value that must never be logged. Read it through [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T = String>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The wrapped value. Every call site is a place where a secret leaves its box: keep them few.
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// The wrapped value, moved out (a secret that changes hands, not a copy).
    pub(crate) fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T: serde::Serialize> serde::Serialize for Secret<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Secret<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Secret)
    }
}

/// Compares two byte strings in constant time (with respect to their contents; a difference in
/// length answers at once, as aws-lc's comparison does).
///
/// Eight bytes at a time, every difference OR-ed into one word that is looked at only at the end;
/// `black_box` keeps the optimizer from turning the fold into an early exit. A cached session's
/// cookie is compared this way on every authenticated request: a byte-at-a-time comparison (aws-lc's
/// `CRYPTO_memcmp`) cost about four times as many instructions.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a_words, a_rest) = a.as_chunks::<8>();
    let (b_words, b_rest) = b.as_chunks::<8>();
    let mut diff = 0u64;
    for (x, y) in a_words.iter().zip(b_words) {
        diff = std::hint::black_box(diff | (u64::from_ne_bytes(*x) ^ u64::from_ne_bytes(*y)));
    }
    for (x, y) in a_rest.iter().zip(b_rest) {
        diff = std::hint::black_box(diff | u64::from(x ^ y));
    }
    diff == 0
}

/// Resolves a configured secret: `env:NAME` reads the environment, `file:PATH` reads a file (trimmed),
/// anything else is the value itself. The error says what is missing without echoing any value.
pub(crate) fn resolve(raw: &str) -> Result<Secret, String> {
    if let Some(name) = raw.strip_prefix("env:") {
        match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => Ok(Secret(v.trim().to_owned())),
            Ok(_) => Err(format!("environment variable {name} is empty")),
            Err(_) => Err(format!("environment variable {name} is not set")),
        }
    } else if let Some(path) = raw.strip_prefix("file:") {
        match std::fs::read_to_string(path) {
            Ok(v) if !v.trim().is_empty() => Ok(Secret(v.trim().to_owned())),
            Ok(_) => Err(format!("file {path} is empty")),
            Err(e) => Err(format!("cannot read file {path}: {e}")),
        }
    } else if raw.is_empty() {
        Err("is empty".to_owned())
    } else {
        Ok(Secret(raw.to_owned()))
    }
}

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn random_bytes(buf: &mut [u8]) {
    // aws-lc's RNG only fails if the OS entropy source is gone, after which nothing secure can be
    // done: failing closed (abort the request) is the right answer, and it cannot happen on Linux.
    aws_lc_rs::rand::fill(buf).expect("operating system random source failed");
}

/// Derives a 32-byte key from `ikm` for one purpose (HKDF-SHA256, RFC 5869). Each purpose gets
/// its own `info`, so a key never serves two roles.
pub(crate) fn derive_key(ikm: &[u8], salt: &[u8], info: &[u8]) -> [u8; 32] {
    use aws_lc_rs::hkdf;
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let mut out = [0u8; 32];
    // Expanding 32 bytes from SHA-256 cannot fail (the limit is 255 × 32).
    prk.expand(&[info], Len32)
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 expand of 32 bytes");
    out
}

/// SHA-256 of `data`.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref());
    out
}

const NONCE_LEN: usize = 12;

/// Encrypts and authenticates `plaintext` with AES-256-GCM under `key`, binding `aad`.
/// Output: random 96-bit nonce ‖ ciphertext ‖ tag.
pub fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    seal_after(&[], key, aad, plaintext)
}

/// [`seal`], written after `prefix` in one buffer: `prefix` ‖ nonce ‖ ciphertext ‖ tag (the
/// prefix is not authenticated: it only tells a reader how to open what follows).
pub(crate) fn seal_after(prefix: &[u8], key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256 key"));
    let mut nonce = [0u8; NONCE_LEN];
    random_bytes(&mut nonce);
    let mut out = Vec::with_capacity(prefix.len() + NONCE_LEN + plaintext.len() + 16);
    out.extend_from_slice(prefix);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[prefix.len() + NONCE_LEN..],
        )
        .expect("AES-GCM seal of an in-memory buffer");
    out.extend_from_slice(tag.as_ref());
    out
}

/// Reverses [`seal`]; `None` if the data was altered, the key is wrong or `aad` differs.
pub fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    if sealed.len() < NONCE_LEN + 16 {
        return None;
    }
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).ok()?);
    let nonce = Nonce::try_assume_unique_for_key(&sealed[..NONCE_LEN]).ok()?;
    let mut buf = sealed[NONCE_LEN..].to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .ok()?
        .len();
    buf.truncate(plain);
    Some(buf)
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    // Hex digits only: always UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// Writes the lower-case hex of `bytes` into `out` (twice as long; the rest is left alone). Every
/// request formats an id or two with it: one table load per byte.
pub(crate) fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const PAIRS: [[u8; 2]; 256] = {
        let digits = b"0123456789abcdef";
        let mut table = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            table[i] = [digits[i >> 4], digits[i & 15]];
            i += 1;
        }
        table
    };
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&PAIRS[usize::from(b)]);
    }
}

/// A random value of `n` bytes, base64url without padding (state, nonce, PKCE verifier…).
pub(crate) fn random_token(n: usize) -> String {
    use base64::Engine as _;
    let mut buf = vec![0u8; n];
    random_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(super::hex(&[0x00, 0x0a, 0xab, 0xff]), "000aabff");
        assert_eq!(super::hex(&[]), "");
        let mut out = [b'x'; 5];
        super::hex_into(&[0x1f, 0xe0], &mut out);
        assert_eq!(&out, b"1fe0x");
    }

    #[test]
    fn sealed_data_opens_only_with_the_same_key_and_aad() {
        let k = derive_key(b"ikm", b"salt", b"test");
        let sealed = seal(&k, b"aad", b"hello");
        assert_eq!(open(&k, b"aad", &sealed).unwrap(), b"hello");
        assert!(open(&k, b"other", &sealed).is_none());
        let k2 = derive_key(b"ikm", b"salt", b"other purpose");
        assert!(open(&k2, b"aad", &sealed).is_none());
        let mut tampered = sealed.clone();
        tampered[14] ^= 1;
        assert!(open(&k, b"aad", &tampered).is_none());
    }

    use super::*;

    #[test]
    fn secrets_print_redacted() {
        let s = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn env_and_file_indirection_resolve() {
        // SAFETY of the test: the variable name is unique to this test.
        let dir = std::env::temp_dir().join(format!("coatcheck-secret-{}", std::process::id()));
        std::fs::write(&dir, "  from-file\n").unwrap();
        assert_eq!(
            resolve(&format!("file:{}", dir.display()))
                .unwrap()
                .expose(),
            "from-file"
        );
        assert!(
            resolve("env:COATCHECK_TEST_SURELY_UNSET_VAR")
                .unwrap_err()
                .contains("not set")
        );
        assert_eq!(resolve("inline").unwrap().expose(), "inline");
        std::fs::remove_file(dir).ok();
    }

    #[test]
    fn constant_time_eq_compares_contents() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
        // Each byte of a string longer than a word, in the words and in the rest.
        let a: Vec<u8> = (0..86u8).collect();
        assert!(constant_time_eq(&a, &a.clone()));
        for at in 0..a.len() {
            for bit in [0x01, 0x80] {
                let mut b = a.clone();
                b[at] ^= bit;
                assert!(!constant_time_eq(&a, &b), "byte {at} bit {bit:#x}");
            }
        }
    }
}
