//! Property tests over coatcheck's public parsing surfaces (bounded case counts, so the suite stays
//! fast): the session ticket and the `Cookie` header, `returnUrl` validation and configuration
//! parsing. (Path normalization and route choice, the forwarding-header rewrite and JWT header
//! rules have their properties beside the code, in `src/`.)

use std::path::Path;

use coatcheck::auth::login::safe_return_url;
use coatcheck::config::Config;
use coatcheck::proxy::headers;
use coatcheck::secret::Secret;
use coatcheck::session::ticket::{Keys, Ticket};
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;

fn keys(seed: u8) -> Keys {
    Keys::new(&[Secret::new(vec![seed; 32])])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A ticket survives encoding; any other text is refused, never a panic.
    #[test]
    fn only_a_ticket_coatcheck_encoded_verifies(
        flip_at in 0usize..64,
        flip_to in prop::sample::select(b"ABCDEFabcdef0123456789-_".to_vec()),
        junk in "[ -~]{0,80}",
    ) {
        let k = keys(7);
        let t = Ticket::generate();
        let value = t.encode(&k);
        let value = value.expose();
        let back = Ticket::verify(value, &k).expect("own ticket verifies");
        prop_assert_eq!(back.handle(), t.handle());
        // Another key never verifies it.
        prop_assert!(Ticket::verify(value, &keys(8)).is_none());
        // One character changed: refused, or (a no-op change) the very same ticket.
        let i = flip_at % value.len();
        let mut altered = value.clone().into_bytes();
        altered[i] = flip_to;
        let altered = String::from_utf8(altered).unwrap();
        match Ticket::verify(&altered, &k) {
            None => {}
            Some(t2) => prop_assert!(altered == *value && t2.handle() == t.handle()),
        }
        prop_assert!(Ticket::verify(&junk, &k).is_none());
    }

    /// Rotation: a ticket made under the old key still verifies once a new key is first.
    #[test]
    fn tickets_survive_key_rotation(old in 1u8..=255) {
        let before = Keys::new(&[Secret::new(vec![old; 32])]);
        let after = Keys::new(&[Secret::new(vec![old.wrapping_add(1); 32]), Secret::new(vec![old; 32])]);
        let t = Ticket::generate();
        let v = t.encode(&before);
        prop_assert!(Ticket::verify(v.expose(), &after).is_some());
    }

    /// The `Cookie` header: a name present twice is never trusted, once is found exactly.
    #[test]
    fn a_cookie_is_read_only_when_it_is_unambiguous(
        pairs in prop::collection::vec(
            (prop::sample::select(vec!["s", "t", "s ", " s", "x-s", "S"]), "[a-z0-9=]{0,6}"),
            0..6,
        ),
        split in any::<bool>(),
    ) {
        let mut h = HeaderMap::new();
        let texts: Vec<String> = pairs.iter().map(|(n, v)| format!("{n}={v}")).collect();
        if split {
            for t in &texts {
                h.append("cookie", HeaderValue::from_str(t).unwrap());
            }
        } else if !texts.is_empty() {
            h.insert("cookie", HeaderValue::from_str(&texts.join("; ")).unwrap());
        }
        let named_s = pairs.iter().filter(|(n, _)| n.trim() == "s").count();
        let found = headers::cookie(&h, "s");
        if named_s == 1 {
            let want = pairs.iter().find(|(n, _)| n.trim() == "s").map(|(_, v)| v.trim());
            prop_assert_eq!(found, want);
        } else {
            prop_assert_eq!(found, None);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// No `returnUrl` leaves the origin: whatever is accepted resolves, as a browser's URL parser
    /// reads it (WHATWG, which the `url` crate implements: `\` is `/`, tabs and newlines are
    /// dropped), to a URL on coatcheck's own origin — also after one more round of decoding.
    #[test]
    fn no_return_url_leaves_the_origin(
        parts in prop::collection::vec(
            prop::sample::select(vec![
                "/", "//", "\\", "/\\", ".", "..", ":", "%2F", "%2f", "%5C", "%5c", "%09", "%0a",
                "%25", "%", "@", "?", "#", " ", "\t", "\n", "evil.example", "https:", "http:",
                "javascript:", "app", "x", "=", "&", "+", "%2B", "%252F",
            ]),
            0..8,
        ),
    ) {
        let raw: String = parts.concat();
        let origin = url::Url::parse("https://app.example:8443/").unwrap();
        if let Some(ok) = safe_return_url(&raw) {
            let once: String = percent_decode(ok);
            for candidate in [ok.to_owned(), once] {
                if let Ok(resolved) = origin.join(&candidate) {
                    prop_assert_eq!(
                        resolved.origin(),
                        origin.origin(),
                        "{:?} resolves to {}",
                        candidate,
                        resolved
                    );
                }
            }
        }
    }
}

/// One round of percent-decoding (`%XX` only; anything else as it is).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

const VALID: &str = r#"
[server]
listen = "127.0.0.1:0"
public_origin = "https://localhost:8443"
trusted_proxies = ["10.0.0.0/8"]

[server.tls]
cert = "certs/localhost.crt"
key = "certs/localhost.key"

[server.limits]
max_header_bytes = 8192
idle_timeout = "30s"
body_idle_timeout = "20s"

[session]
keys = ["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]
idle_timeout = "20s"

[oidc]
issuer = "http://127.0.0.1:9"
client_id = "c"
client_secret = "s"

[[route]]
path = "/api/"
upstream = "http://127.0.0.1:9000"
methods = ["GET", "POST"]

[[route]]
path = "/"
upstream = "http://127.0.0.1:9000"
auth = "none"
"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// No configuration text panics the parser: edits of a valid file, and arbitrary TOML-ish text.
    #[test]
    fn no_configuration_text_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0usize..4, "[ -~\n]{0,6}"), 0..6),
        noise in "[\\[\\]a-z_.=\"0-9 \n{},-]{0,120}",
    ) {
        let mut text = VALID.to_owned();
        for (at, delete, insert) in edits {
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            let mut end = (i + delete).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.replace_range(i..end, &insert);
        }
        let _ = Config::from_toml(&text, Path::new("prop.toml"));
        let _ = Config::from_toml(&noise, Path::new("prop.toml"));
    }
}
