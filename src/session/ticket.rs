//! The session ticket: what the browser's cookie holds.
//!
//! `base64url(id ‖ secret ‖ mac)`: a random 128-bit id, a random 128-bit per-session secret, and
//! HMAC-SHA256 over both under the current key (older keys in `session.keys` still verify). A forged
//! or altered ticket fails the MAC before any store lookup. A cached session remembers the exact
//! characters of the cookie it was verified for, so the same cookie again needs no second MAC and
//! no decoding beyond the id's characters. The store never sees the id or the secret: it is keyed
//! by a hash of the id ([`Ticket::handle`]) and holds the session encrypted under a key derived
//! from the secret ([`Ticket::seal_record`]).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderValue;

use crate::config::{RecordKey, SameSite};
use crate::secret::{self, Secret};

const ID_LEN: usize = 16;
const SECRET_LEN: usize = 16;
const MAC_LEN: usize = 32;
pub(crate) const TICKET_LEN: usize = ID_LEN + SECRET_LEN + MAC_LEN;
/// Encoded length of a ticket (base64url of 64 bytes, no padding).
pub(crate) const ENCODED_LEN: usize = 86;

/// Keys derived from each configured `session.keys` entry; the first is current.
pub struct Keys {
    keys: Vec<DerivedKeys>,
}

struct DerivedKeys {
    /// Prepared once: a per-request HMAC then costs no key schedule.
    ticket_mac: aws_lc_rs::hmac::Key,
    login_aead: [u8; 32],
}

fn mac(key: &aws_lc_rs::hmac::Key, body: &[u8]) -> aws_lc_rs::hmac::Tag {
    let mut ctx = aws_lc_rs::hmac::Context::with_key(key);
    ctx.update(b"v1");
    ctx.update(body);
    ctx.sign()
}

impl Keys {
    /// Derives the purpose keys from the configured keys (at least one).
    pub fn new(configured: &[Secret<Vec<u8>>]) -> Keys {
        let keys = configured
            .iter()
            .map(|k| DerivedKeys {
                ticket_mac: aws_lc_rs::hmac::Key::new(
                    aws_lc_rs::hmac::HMAC_SHA256,
                    &secret::derive_key(k.expose(), b"coatcheck", b"session ticket mac v1"),
                ),
                login_aead: secret::derive_key(k.expose(), b"coatcheck", b"login cookie aead v1"),
            })
            .collect();
        Keys { keys }
    }

    /// The key that encrypts login cookies now.
    pub fn login_key(&self) -> &[u8; 32] {
        &self.keys[0].login_aead
    }

    /// Every key that may still decrypt a login cookie.
    pub(crate) fn login_keys(&self) -> impl Iterator<Item = &[u8; 32]> {
        self.keys.iter().map(|k| &k.login_aead)
    }
}

/// A cookie value's 86 characters, as presented or as encoded from a signed ticket.
pub(crate) type Encoded = [u8; ENCODED_LEN];

/// The cookie's characters of a signed ticket's bytes ([`Ticket::signed`]).
pub(crate) fn encode(signed: &[u8; TICKET_LEN]) -> Encoded {
    let mut out = [0u8; ENCODED_LEN];
    let written = URL_SAFE_NO_PAD
        .encode_slice(signed, &mut out)
        .expect("64 bytes are 86 characters");
    debug_assert_eq!(written, ENCODED_LEN);
    out
}

/// The cookie value of a signed ticket's characters ([`encode`]).
pub(crate) fn cookie_value(encoded: &Encoded) -> Secret {
    Secret::new(
        std::str::from_utf8(encoded)
            .expect("base64url is ASCII")
            .to_owned(),
    )
}

/// SHA-256 of the concatenation of `parts`, gathered in a stack buffer of `N` bytes (their total
/// length) for the one-shot [`secret::sha256`]: a streaming `digest::Context` allocates, and frees
/// three times, on every call, and the handle is hashed on every request with a cookie.
fn sha256_of<const N: usize>(parts: &[&[u8]]) -> [u8; 32] {
    let mut input = [0u8; N];
    let mut at = 0;
    for part in parts {
        input[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    debug_assert_eq!(at, N, "the parts fill the buffer");
    secret::sha256(&input)
}

const HANDLE_LABEL: &[u8; 27] = b"coatcheck session handle v1";

fn handle_of(id: &[u8; ID_LEN]) -> [u8; 16] {
    let digest = sha256_of::<{ HANDLE_LABEL.len() + ID_LEN }>(&[HANDLE_LABEL, id]);
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The ticket of a cookie value already verified (a cached session keeps its characters, not the
/// record key as well: that is derived when a write or a reload needs it).
pub(crate) fn of_verified(verified: &Encoded) -> Ticket {
    let raw = decode_ticket(verified).expect("a verified cookie value decodes");
    ticket_of(&raw)
}

/// The id and secret of a ticket's bytes (its MAC not looked at).
fn ticket_of(raw: &[u8; TICKET_LEN]) -> Ticket {
    let mut id = [0u8; ID_LEN];
    let mut s = [0u8; SECRET_LEN];
    id.copy_from_slice(&raw[..ID_LEN]);
    s.copy_from_slice(&raw[ID_LEN..ID_LEN + SECRET_LEN]);
    Ticket {
        id,
        secret: Secret::new(s),
    }
}

/// The label of [`Ticket::record_key`]'s derivation.
const RECORD_KEY_LABEL: &[u8; 19] = b"coatcheck record v2";

/// What starts a record's payload sealed under [`Ticket::record_key`]. Payloads sealed before it
/// (under [`Ticket::hkdf_record_key`]) start with their random nonce, which may by chance start
/// with these bytes too: [`Ticket::open_record`] then falls back to the older key.
pub(crate) const SEALED_V2: &[u8; 4] = b"cck\x02";

/// The base64url alphabet's value of each byte, [`INVALID`] for a byte outside it.
const BASE64URL: [u8; 256] = {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < alphabet.len() {
        table[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    table
};
const INVALID: u8 = 0xff;

/// The 6-bit values of `chars` as one number, each character's table value ORed into `seen` (its
/// top bit set by any character outside the alphabet).
fn digits(chars: &[u8], seen: &mut u8) -> u64 {
    chars.iter().fold(0u64, |n, &c| {
        let d = BASE64URL[usize::from(c)];
        *seen |= d;
        n << 6 | u64::from(d)
    })
}

/// Decodes the first `groups` groups of eight characters of `value` (48 bits, six bytes each)
/// into `out`.
fn decode_groups(value: &Encoded, groups: usize, out: &mut [u8], seen: &mut u8) {
    let (chars, _) = value.as_chunks::<8>();
    let (bytes, _) = out.as_chunks_mut::<6>();
    for (group, to) in chars.iter().zip(bytes).take(groups) {
        let n = digits(group, seen);
        to.copy_from_slice(&n.to_be_bytes()[2..]);
    }
}

/// A cookie value's 86 base64url characters (no padding) as the ticket's 64 bytes: exactly what
/// `URL_SAFE_NO_PAD` accepts (its alphabet, and zero in the last character's 4 unused bits), and
/// `None` for anything else. A fixed-size table walk costs about 70% of the base64 crate's
/// general decoder (574 instead of 814 instructions, callgrind); a request whose session is
/// cached needs only the id's characters ([`id_of`]).
fn decode_ticket(value: &Encoded) -> Option<[u8; TICKET_LEN]> {
    let mut out = [0u8; TICKET_LEN];
    // A valid digit is below 64 and `INVALID` has the top bit set: one OR over all digits tells.
    let mut seen = 0u8;
    // Eight characters (48 bits) at a time: ten groups make the first 60 bytes.
    decode_groups(value, 10, &mut out, &mut seen);
    // The last six characters: 36 bits, the last 4 bytes and 4 bits that must be zero.
    let n = digits(&value[80..], &mut seen);
    out[60..].copy_from_slice(&((n >> 4) as u32).to_be_bytes());
    (seen & 0x80 == 0 && n & 0x0f == 0).then_some(out)
}

/// The ticket id a cookie value names, from its first 24 characters only (three groups: 18
/// bytes, the id's 16 first); `None` if one of them is outside the alphabet.
fn id_of(value: &Encoded) -> Option<[u8; ID_LEN]> {
    let mut out = [0u8; 18];
    let mut seen = 0u8;
    decode_groups(value, 3, &mut out, &mut seen);
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&out[..ID_LEN]);
    (seen & 0x80 == 0).then_some(id)
}

/// The characters of a cookie value [`id_of`] decodes: the id's 16 bytes and two of the secret's.
const ID_CHARS: usize = 24;

/// The handle of the ticket id a client connection presented last. A browser sends the same
/// cookie on every request of a keep-alive connection, so the handle's SHA-256 is computed once per
/// connection instead of once per request. It memoizes a function (equal characters are the same
/// id, whose handle never changes), so no entry can be wrong or stale; a value that matches it is
/// still compared in full with a cached session's or verified by its MAC before it names a session.
/// Compared in constant time: a connection from a trusted proxy may carry several users' cookies.
///
/// Beside the handle it holds what the caller keeps for it (`T`: the session the cache answered
/// for that handle, with the cache's epoch; see [`super::cache`]), dropped when other characters
/// replace the entry.
pub(crate) struct HandleMemo<T = ()>(std::sync::Mutex<Option<Memo<T>>>);

struct Memo<T> {
    chars: [u8; ID_CHARS],
    handle: [u8; 16],
    kept: Option<T>,
}

impl<T> Default for HandleMemo<T> {
    fn default() -> Self {
        HandleMemo(std::sync::Mutex::new(None))
    }
}

/// A memo: a copy (a tunnel's connection slot, which never looks at cookies) starts empty.
impl<T> Clone for HandleMemo<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T: Clone> HandleMemo<T> {
    /// The handle remembered for these characters, and what is kept with it. Never waits: a memo
    /// another of the connection's HTTP/2 streams holds at this instant is passed over.
    fn get(&self, chars: &[u8; ID_CHARS]) -> Option<([u8; 16], Option<T>)> {
        let memo = self.0.try_lock().ok()?;
        let m = memo.as_ref()?;
        secret::constant_time_eq(&m.chars, chars).then(|| (m.handle, m.kept.clone()))
    }

    fn put(&self, chars: &[u8; ID_CHARS], handle: [u8; 16]) {
        if let Ok(mut memo) = self.0.try_lock() {
            *memo = Some(Memo {
                chars: *chars,
                handle,
                kept: None,
            });
        }
    }

    /// What is kept with the entry.
    #[cfg(test)]
    pub(crate) fn kept(&self) -> Option<T> {
        self.0.lock().ok()?.as_ref()?.kept.clone()
    }

    /// Keeps `value` with the entry, if the entry is still `handle`'s.
    pub(crate) fn keep(&self, handle: &[u8; 16], value: T) {
        if let Ok(mut memo) = self.0.try_lock()
            && let Some(m) = memo.as_mut()
            && m.handle == *handle
        {
            m.kept = Some(value);
        }
    }
}

/// A cookie value as presented, of the right length but neither decoded nor verified.
///
/// A session in the cache remembers the characters of the cookie it was verified for: the same
/// characters again are that session's with no decoding and no MAC (only the id's characters are
/// decoded, for the cache key). Each 64-byte ticket has exactly one encoding the decoder accepts,
/// so comparing characters is comparing tickets.
pub(crate) struct Presented<'a>(&'a Encoded);

impl<'a> Presented<'a> {
    /// A cookie value of the ticket's length; `None` for any other.
    pub(crate) fn of(value: &'a [u8]) -> Option<Presented<'a>> {
        value.try_into().ok().map(Presented)
    }

    /// The handle its id names (the cache key), whether or not the ticket is genuine; `None` if
    /// the id's characters are not base64url. With the client connection's `memo`, the same id's
    /// characters again are answered from it (no decoding, no SHA-256), with what it keeps for them.
    pub(crate) fn lookup<T: Clone>(
        &self,
        memo: Option<&HandleMemo<T>>,
    ) -> Option<([u8; 16], Option<T>)> {
        let chars: &[u8; ID_CHARS] = self.0.first_chunk().expect("86 characters hold 24");
        if let Some(found) = memo.and_then(|m| m.get(chars)) {
            return Some(found);
        }
        let handle = handle_of(&id_of(self.0)?);
        if let Some(m) = memo {
            m.put(chars, handle);
        }
        Some((handle, None))
    }

    /// [`Self::lookup`]'s handle alone.
    #[cfg(test)]
    pub(crate) fn handle_bytes(&self, memo: Option<&HandleMemo>) -> Option<[u8; 16]> {
        self.lookup(memo).map(|(handle, _)| handle)
    }

    /// The ticket, if the value decodes and its MAC verifies under one of `keys`.
    pub(crate) fn verify(&self, keys: &Keys) -> Option<Ticket> {
        let raw = Secret::new(decode_ticket(self.0)?);
        let (body, mac) = raw.expose().split_at(ID_LEN + SECRET_LEN);
        let ok = keys
            .keys
            .iter()
            .any(|k| secret::constant_time_eq(self::mac(&k.ticket_mac, body).as_ref(), mac));
        ok.then(|| ticket_of(raw.expose()))
    }

    /// Whether these are exactly the characters of `verified` (constant time): a value equal to
    /// one that verified needs no second MAC.
    pub(crate) fn is(&self, verified: &Encoded) -> bool {
        secret::constant_time_eq(self.0, verified)
    }

    /// The characters, to remember once verified.
    pub(crate) fn encoded(&self) -> Encoded {
        *self.0
    }
}

/// A verified (or freshly minted) session ticket.
pub struct Ticket {
    id: [u8; ID_LEN],
    secret: Secret<[u8; SECRET_LEN]>,
}

impl Ticket {
    /// A new random ticket (fixation defence: every login gets one).
    pub fn generate() -> Ticket {
        let mut id = [0u8; ID_LEN];
        let mut s = [0u8; SECRET_LEN];
        secret::random_bytes(&mut id);
        secret::random_bytes(&mut s);
        Ticket {
            id,
            secret: Secret::new(s),
        }
    }

    /// Verifies a cookie value; `None` for anything malformed, forged or altered.
    pub fn verify(value: &str, keys: &Keys) -> Option<Ticket> {
        Presented::of(value.as_bytes())?.verify(keys)
    }

    /// The cookie value, authenticated with the current key.
    pub fn encode(&self, keys: &Keys) -> Secret {
        cookie_value(&encode(&self.signed(keys)))
    }

    /// The cookie's bytes (`id ‖ secret ‖ mac`) under the current key.
    pub(crate) fn signed(&self, keys: &Keys) -> [u8; TICKET_LEN] {
        let mut raw = [0u8; TICKET_LEN];
        raw[..ID_LEN].copy_from_slice(&self.id);
        raw[ID_LEN..ID_LEN + SECRET_LEN].copy_from_slice(self.secret.expose());
        let tag = mac(&keys.keys[0].ticket_mac, &raw[..ID_LEN + SECRET_LEN]);
        raw[ID_LEN + SECRET_LEN..].copy_from_slice(&tag.as_ref()[..MAC_LEN]);
        raw
    }

    /// The session's public handle and store key: a hash of the id (never the id itself).
    pub fn handle(&self) -> String {
        secret::hex(&self.handle_bytes())
    }

    /// [`Ticket::handle`] as bytes: the cache key, computed without allocating.
    pub(crate) fn handle_bytes(&self) -> [u8; 16] {
        handle_of(&self.id)
    }

    /// The key that encrypts this session's store record; only the cookie holder can derive it.
    /// NIST SP 800-56C rev. 2's one-step key derivation with SHA-256: SHA-256(counter 1 ‖ secret
    /// ‖ label ‖ id), 55 bytes, so one SHA-256 block. The secret is 128 uniformly random bits, so
    /// HKDF's extract step (the earlier `Ticket::hkdf_record_key`) adds nothing; its two HMACs
    /// cost 0.56 µs on every cache miss against 0.09 µs for this.
    pub fn record_key(&self) -> [u8; 32] {
        sha256_of::<{ 4 + SECRET_LEN + RECORD_KEY_LABEL.len() + ID_LEN }>(&[
            &1u32.to_be_bytes(),
            self.secret.expose(),
            RECORD_KEY_LABEL,
            &self.id,
        ])
    }

    /// The record key of payloads sealed before [`SEALED_V2`] (HKDF-SHA256 with the id as salt):
    /// they are still opened, never sealed again.
    fn hkdf_record_key(&self) -> [u8; 32] {
        secret::derive_key(
            self.secret.expose(),
            &self.id,
            b"coatcheck session record v1",
        )
    }

    /// Encrypts a session's payload for its store record, bound to the record's `handle`:
    /// `SEALED_V2` ‖ AES-256-GCM under [`Ticket::record_key`], or with `session.record_key =
    /// "hkdf"` as versions before it sealed (AES-256-GCM under `Ticket::hkdf_record_key`), which
    /// they can still read during a rolling upgrade.
    pub fn seal_record(&self, kind: RecordKey, handle: &str, plain: &[u8]) -> Vec<u8> {
        match kind {
            RecordKey::OneStep => {
                secret::seal_after(SEALED_V2, &self.record_key(), handle.as_bytes(), plain)
            }
            RecordKey::Hkdf => secret::seal(&self.hkdf_record_key(), handle.as_bytes(), plain),
        }
    }

    /// Decrypts a record's payload sealed by [`Ticket::seal_record`], or by a version before it
    /// (under [`Ticket::hkdf_record_key`]); `None` if it was altered or is not this ticket's.
    pub(crate) fn open_record(&self, handle: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if let Some(v2) = sealed.strip_prefix(SEALED_V2)
            && let Some(plain) = secret::open(&self.record_key(), handle.as_bytes(), v2)
        {
            return Some(plain);
        }
        secret::open(&self.hkdf_record_key(), handle.as_bytes(), sealed)
    }
}

/// Cookie attributes shared by the session cookie's `Set-Cookie` headers.
#[derive(Clone)]
pub(crate) struct CookieSpec {
    pub(crate) name: String,
    pub(crate) same_site: SameSite,
    /// `Max-Age` in seconds, when the cookie is configured persistent.
    pub(crate) max_age: Option<u64>,
}

impl CookieSpec {
    /// `Set-Cookie` for a new session ticket (DESIGN §4).
    pub(crate) fn set(&self, value: &Secret) -> HeaderValue {
        let same_site = match self.same_site {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
        };
        let mut s = format!(
            "{}={}; Path=/; Secure; HttpOnly; SameSite={same_site}",
            self.name,
            value.expose()
        );
        if let Some(age) = self.max_age {
            s.push_str(&format!("; Max-Age={age}"));
        }
        let mut v = HeaderValue::from_str(&s).expect("cookie name validated, value base64url");
        v.set_sensitive(true);
        v
    }

    /// `Set-Cookie` that removes the session cookie.
    pub(crate) fn clear(&self) -> HeaderValue {
        let same_site = match self.same_site {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
        };
        HeaderValue::from_str(&format!(
            "{}=; Path=/; Secure; HttpOnly; SameSite={same_site}; Max-Age=0",
            self.name
        ))
        .expect("cookie name validated")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(seed: u8) -> Keys {
        Keys::new(&[Secret::new(vec![seed; 32])])
    }

    #[test]
    fn the_cookie_decoder_accepts_exactly_what_the_base64_crate_does() {
        let mut raw = [0u8; TICKET_LEN];
        for seed in 0..200u8 {
            secret::random_bytes(&mut raw);
            raw[0] = seed;
            let text = URL_SAFE_NO_PAD.encode(raw);
            let value: &[u8; ENCODED_LEN] = text.as_bytes().try_into().unwrap();
            assert_eq!(decode_ticket(value), Some(raw));
        }
        let text = URL_SAFE_NO_PAD.encode([0xffu8; TICKET_LEN]);
        let valid: [u8; ENCODED_LEN] = text.as_bytes().try_into().unwrap();
        // Every byte at every position: accepted exactly when the base64 crate accepts it.
        for pos in 0..ENCODED_LEN {
            for byte in 0..=255u8 {
                let mut v = valid;
                v[pos] = byte;
                let mut expected = [0u8; TICKET_LEN];
                let crate_ok = URL_SAFE_NO_PAD.decode_slice(v, &mut expected) == Ok(TICKET_LEN);
                let ours = decode_ticket(&v);
                assert_eq!(ours.is_some(), crate_ok, "byte {byte:#04x} at {pos}");
                if crate_ok {
                    assert_eq!(ours, Some(expected));
                }
            }
        }
        assert!(Presented::of(&text.as_bytes()[1..]).is_none(), "too short");
        assert!(
            Presented::of(format!("{text}A").as_bytes()).is_none(),
            "too long"
        );
        let not_ascii = format!("é{}", &text[2..]);
        let presented = Presented::of(not_ascii.as_bytes()).expect("86 bytes");
        assert!(presented.handle_bytes(None).is_none(), "not ASCII");
        assert!(presented.verify(&keys(1)).is_none(), "not ASCII");
    }

    #[test]
    fn the_id_is_read_from_its_own_characters_only() {
        let k = keys(2);
        let t = Ticket::generate();
        let value: Encoded = t.encode(&k).expose().as_bytes().try_into().unwrap();
        assert_eq!(id_of(&value), Some(t.id));
        // A character outside the alphabet among the id's 24 makes no id; one after them still
        // names the id (the cache lookup), and the value never verifies.
        for pos in [0, 10, 23, 24, 60, 85] {
            let mut bad = value;
            bad[pos] = b'.';
            assert_eq!(id_of(&bad).is_some(), pos >= 24, "position {pos}");
            assert!(decode_ticket(&bad).is_none(), "position {pos}");
            let text = std::str::from_utf8(&bad).unwrap();
            assert!(Presented::of(text.as_bytes()).unwrap().verify(&k).is_none());
        }
    }

    #[test]
    fn a_presented_value_is_a_verified_one_only_character_for_character() {
        let k = keys(4);
        let t = Ticket::generate();
        let value = t.encode(&k);
        let verified = encode(&t.signed(&k));
        assert_eq!(value.expose().as_bytes(), verified);
        let presented = Presented::of(value.expose().as_bytes()).unwrap();
        assert!(presented.is(&verified));
        assert_eq!(presented.encoded(), verified);
        let mut other = verified;
        other[85] = if other[85] == b'A' { b'Q' } else { b'A' };
        assert!(!presented.is(&other));
    }

    #[test]
    fn the_handle_is_the_first_half_of_sha256_of_the_label_and_the_id() {
        // Computed independently, with the streaming hash: a stored session is found by its
        // handle, so the derivation must never change.
        let t = Ticket::generate();
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(b"coatcheck session handle v1");
        ctx.update(&t.id);
        let expected = ctx.finish();
        assert_eq!(t.handle_bytes(), expected.as_ref()[..16]);
        let k = keys(3);
        let value = t.encode(&k);
        let presented = Presented::of(value.expose().as_bytes()).unwrap();
        assert_eq!(
            presented.handle_bytes(None).unwrap(),
            expected.as_ref()[..16]
        );
    }

    #[test]
    fn a_connections_memo_answers_for_the_id_characters_it_last_saw() {
        let k = keys(1);
        let (t, u) = (Ticket::generate(), Ticket::generate());
        let (tv, uv) = (t.encode(&k), u.encode(&k));
        let (pt, pu) = (
            Presented::of(tv.expose().as_bytes()).unwrap(),
            Presented::of(uv.expose().as_bytes()).unwrap(),
        );
        let memo = HandleMemo::default();
        assert_eq!(pt.handle_bytes(Some(&memo)), Some(t.handle_bytes()));
        // What the memo answers is what it holds: the same characters again are not hashed.
        let chars: &[u8; ID_CHARS] = tv.expose().as_bytes().first_chunk().unwrap();
        assert_eq!(memo.get(chars).map(|(h, _)| h), Some(t.handle_bytes()));
        memo.put(chars, [9; 16]);
        assert_eq!(pt.handle_bytes(Some(&memo)), Some([9; 16]));
        // Other characters are hashed, and replace the entry.
        assert_eq!(pu.handle_bytes(Some(&memo)), Some(u.handle_bytes()));
        assert_eq!(pt.handle_bytes(Some(&memo)), Some(t.handle_bytes()));
        // A value whose id characters are not base64url has no handle and leaves no entry.
        let mut bad = tv.expose().as_bytes().to_vec();
        bad[3] = b'.';
        let bad = String::from_utf8(bad).unwrap();
        assert_eq!(
            Presented::of(bad.as_bytes())
                .unwrap()
                .handle_bytes(Some(&memo)),
            None
        );
        assert_eq!(memo.get(chars).map(|(h, _)| h), Some(t.handle_bytes()));
        assert!(memo.clone().get(chars).is_none(), "a copy starts empty");
    }

    #[test]
    fn a_ticket_round_trips_and_has_the_documented_size() {
        let k = keys(1);
        let t = Ticket::generate();
        let v = t.encode(&k);
        assert_eq!(v.expose().len(), ENCODED_LEN);
        let back = Ticket::verify(v.expose(), &k).unwrap();
        assert_eq!(back.handle(), t.handle());
        assert_eq!(back.record_key(), t.record_key());
    }

    #[test]
    fn the_record_key_of_a_ticket_s_verified_bytes_is_the_ticket_s() {
        let k = keys(1);
        let t = Ticket::generate();
        let signed = encode(&t.signed(&k));
        assert_eq!(of_verified(&signed).record_key(), t.record_key());
        let value = t.encode(&k);
        let verified = Presented::of(value.expose().as_bytes())
            .unwrap()
            .verify(&k)
            .unwrap();
        assert_eq!(of_verified(&signed).record_key(), verified.record_key());
        assert_ne!(
            of_verified(&signed).record_key(),
            Ticket::generate().record_key()
        );
    }

    #[test]
    fn the_record_key_is_the_sp_800_56c_one_step_derivation_and_not_the_hkdf_one() {
        let t = Ticket {
            id: [0x11; ID_LEN],
            secret: Secret::new([0x22; SECRET_LEN]),
        };
        let mut input = vec![0, 0, 0, 1];
        input.extend_from_slice(&[0x22; SECRET_LEN]);
        input.extend_from_slice(b"coatcheck record v2");
        input.extend_from_slice(&[0x11; ID_LEN]);
        assert_eq!(input.len(), 55, "one SHA-256 block");
        assert_eq!(t.record_key(), secret::sha256(&input));
        assert_ne!(t.record_key(), t.hkdf_record_key());
    }

    /// AES-256-GCM with a chosen nonce (the older format: nonce ‖ ciphertext ‖ tag).
    fn seal_with_nonce(key: &[u8; 32], nonce: [u8; 12], aad: &[u8], plain: &[u8]) -> Vec<u8> {
        use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
        let mut out = [&nonce[..], plain].concat();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[12..],
            )
            .unwrap();
        out.extend_from_slice(tag.as_ref());
        out
    }

    #[test]
    fn records_sealed_under_either_key_open_and_nothing_else_does() {
        let t = Ticket::generate();
        let h = t.handle();
        let new = t.seal_record(RecordKey::OneStep, &h, b"payload");
        assert!(new.starts_with(SEALED_V2));
        assert_eq!(t.open_record(&h, &new).unwrap(), b"payload");
        // Sealed as by a version before the one-step key: random nonce first, HKDF key.
        let old = t.seal_record(RecordKey::Hkdf, &h, b"old payload");
        assert!(
            secret::open(&t.hkdf_record_key(), h.as_bytes(), &old).is_some(),
            "what an older version opens"
        );
        assert_eq!(t.open_record(&h, &old).unwrap(), b"old payload");
        // An older payload whose random nonce happens to start with SEALED_V2's bytes.
        let mut nonce = [7u8; 12];
        nonce[..4].copy_from_slice(SEALED_V2);
        let lookalike = seal_with_nonce(&t.hkdf_record_key(), nonce, h.as_bytes(), b"rare");
        assert!(lookalike.starts_with(SEALED_V2));
        assert_eq!(t.open_record(&h, &lookalike).unwrap(), b"rare");
        // Another ticket, another handle, or an altered byte: nothing opens.
        let other = Ticket::generate();
        assert!(other.open_record(&h, &new).is_none());
        assert!(other.open_record(&h, &old).is_none());
        assert!(t.open_record(&other.handle(), &new).is_none());
        for i in 0..new.len() {
            let mut bad = new.clone();
            bad[i] ^= 1;
            assert!(t.open_record(&h, &bad).is_none(), "byte {i} altered");
        }
        assert!(t.open_record(&h, &new[..new.len() - 1]).is_none());
        assert!(t.open_record(&h, SEALED_V2).is_none());
    }

    #[test]
    fn forged_or_altered_tickets_are_rejected() {
        let k = keys(1);
        let v = Ticket::generate().encode(&k).expose().clone();
        assert!(Ticket::verify(&v, &keys(2)).is_none());
        let mut altered = v.clone().into_bytes();
        altered[3] = if altered[3] == b'A' { b'B' } else { b'A' };
        assert!(Ticket::verify(std::str::from_utf8(&altered).unwrap(), &k).is_none());
        assert!(Ticket::verify("short", &k).is_none());
        assert!(Ticket::verify(&"!".repeat(ENCODED_LEN), &k).is_none());
    }

    #[test]
    fn older_keys_still_verify_after_rotation() {
        let old = Secret::new(vec![1u8; 32]);
        let new = Secret::new(vec![2u8; 32]);
        let before = Keys::new(std::slice::from_ref(&old));
        let v = Ticket::generate().encode(&before);
        let rotated = Keys::new(&[new, old]);
        assert!(Ticket::verify(v.expose(), &rotated).is_some());
    }

    #[test]
    fn the_cookie_carries_the_design_attributes() {
        let spec = CookieSpec {
            name: "__Host-coatcheck".into(),
            same_site: SameSite::Strict,
            max_age: None,
        };
        let set = spec.set(&Secret::new("v".into()));
        assert_eq!(
            set,
            "__Host-coatcheck=v; Path=/; Secure; HttpOnly; SameSite=Strict"
        );
        assert!(set.is_sensitive());
        assert!(spec.clear().to_str().unwrap().ends_with("Max-Age=0"));
    }
}
