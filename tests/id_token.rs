//! Every ID token coatcheck must refuse at login, and the near misses it must accept, against a
//! small scripted provider (`tests/support/stub_idp.rs`): the real one never issues these tokens.
//!
//! Each case starts a real login (`/bff/login` → state and nonce from the `Location`), scripts the
//! ID token of the token response and delivers `/bff/callback?code=x&state=…` with the login
//! cookie. A refused token gets the 400 sign-in page and no session; the stub's token endpoint was
//! called exactly once, so it is the token itself that was judged.

#[path = "support/bff.rs"]
mod bff;
#[path = "support/stub_idp.rs"]
mod stub_idp;
mod support;

use base64::Engine as _;
use bff::{Browser, SESSION_KEY};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;
use stub_idp::{KID_ES256, KID_ES384, KID_RS256, StubIdp, b64, hs256};

use support::{TestProxy, start_proxy};

const CLIENT_ID: &str = "coatcheck";
const CLIENT_SECRET: &str = "coatcheck-secret";
/// `oidc.clock_skew` of every test proxy, in seconds.
const SKEW: u64 = 30;
const ES256_AND_RS256: &str = "allowed_algs = [\"ES256\", \"RS256\"]";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The stub provider, coatcheck in front of it, and a browser in the middle of a login.
struct Rp {
    stub: StubIdp,
    proxy: TestProxy,
    browser: Browser,
    state: String,
    nonce: String,
}

impl Rp {
    /// Starts the stub and coatcheck (`oidc` = extra `[oidc]` keys), then a login.
    async fn start(oidc: &str) -> Rp {
        Rp::start_with(StubIdp::start().await, oidc).await
    }

    /// Like [`Rp::start`] with a stub the test prepared.
    async fn start_with(stub: StubIdp, oidc: &str) -> Rp {
        let config = format!(
            "[session]\nkeys = [\"{SESSION_KEY}\"]\n[session.store]\nkind = \"memory\"\n\n\
             [oidc]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n\
             clock_skew = \"{SKEW}s\"\n{oidc}\n\n\
             [[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:9\"\nauth = \"none\"\n",
            stub.issuer
        );
        let proxy = start_proxy(&config).await;
        let browser = Browser::new(proxy.addr);
        let mut rp = Rp {
            stub,
            proxy,
            browser,
            state: String::new(),
            nonce: String::new(),
        };
        rp.wait_ready().await;
        rp.new_login().await;
        rp
    }

    async fn wait_ready(&self) {
        support::wait_ready(self.proxy.addr).await;
    }

    /// `/bff/login`: remembers the login cookie, the state and the nonce.
    async fn new_login(&mut self) {
        let location = self.browser.start_login("/home").await;
        let url = url::Url::parse(&location).unwrap();
        assert!(
            location.starts_with(&format!("{}/authorize?", self.stub.issuer)),
            "{location}"
        );
        let param = |n: &str| {
            url.query_pairs()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.into_owned())
                .unwrap_or_else(|| panic!("{n} in {location}"))
        };
        self.state = param("state");
        self.nonce = param("nonce");
    }

    /// A claim set that would be accepted.
    fn claims(&self) -> Value {
        let now = now();
        json!({
            "iss": self.stub.issuer,
            "sub": "alice",
            "aud": CLIENT_ID,
            "iat": now,
            "exp": now + 300,
            "nonce": self.nonce,
            "name": "Alice",
        })
    }

    /// The valid claim set with `edit` applied (`Value::Null` removes a claim).
    fn claims_with(&self, edit: Value) -> Value {
        let mut c = self.claims();
        for (k, v) in edit.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    /// Signed with the published P-256 key, `kid` included.
    fn es256(&self, claims: &Value) -> String {
        self.stub.keys.sign(
            &json!({"alg": "ES256", "typ": "JWT", "kid": KID_ES256}),
            claims,
        )
    }

    /// Delivers the provider's redirect with the login cookie; the stub answers the code exchange
    /// with `id_token`.
    async fn callback(&mut self, id_token: Option<String>) -> reqwest::Response {
        self.stub.set_id_token(id_token);
        let before = self.stub.token_requests().len();
        let r = self
            .browser
            .request(
                Method::GET,
                &format!("/bff/callback?code=x&state={}", self.state),
            )
            .send()
            .await
            .unwrap();
        self.browser.absorb(r.headers());
        assert_eq!(
            self.stub.token_requests().len(),
            before + 1,
            "the code was exchanged once, so the ID token itself was judged"
        );
        r
    }

    /// The token is refused: 400 sign-in page, no session cookie, `/bff/user` still 401.
    async fn refuses(&mut self, id_token: String) {
        let r = self.callback(Some(id_token)).await;
        assert_refused_page(r).await;
        assert!(self.browser.session_cookie().is_none());
        let user = self
            .browser
            .api(Method::GET, "/bff/user")
            .send()
            .await
            .unwrap();
        assert_eq!(user.status(), 401, "no session was created");
    }

    /// The token is accepted: 200 bounce page, a session cookie, `/bff/user` shows the claims.
    async fn accepts(&mut self, id_token: String) {
        let r = self.callback(Some(id_token)).await;
        let status = r.status();
        let has_session = set_cookies(&r)
            .iter()
            .any(|c| c.starts_with("__Host-coatcheck="));
        let body = r.text().await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(has_session, "a session cookie is set");
        let user = self
            .browser
            .api(Method::GET, "/bff/user")
            .send()
            .await
            .unwrap();
        assert_eq!(user.status(), 200);
        let v: Value = user.json().await.unwrap();
        assert_eq!(v["sub"], "alice");
        assert_eq!(v["claims"]["name"], "Alice");
    }
}

fn set_cookies(r: &reqwest::Response) -> Vec<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

async fn assert_refused_page(r: reqwest::Response) {
    let status = r.status();
    let cookies = set_cookies(&r);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    let body = r.text().await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(body.contains("Sign-in failed"), "{body}");
    assert!(
        !cookies.iter().any(|c| c.starts_with("__Host-coatcheck=")),
        "no session cookie: {cookies:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The positive controls: without them every refusal below could pass vacuously.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_valid_es256_id_token_logs_in_after_a_basic_authenticated_pkce_exchange() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.es256(&rp.claims());
    rp.accepts(token).await;
    let req = rp.stub.token_requests().pop().unwrap();
    assert_eq!(req.field("grant_type"), Some("authorization_code"));
    assert_eq!(req.field("code"), Some("x"));
    assert_eq!(
        req.field("redirect_uri"),
        Some("https://localhost:8443/bff/callback")
    );
    assert!(
        req.field("code_verifier").is_some_and(|v| v.len() >= 43),
        "{req:?}"
    );
    assert_eq!(
        req.field("client_secret"),
        None,
        "basic: no secret in the form"
    );
    let basic = base64::engine::general_purpose::STANDARD.encode("coatcheck:coatcheck-secret");
    assert_eq!(req.authorization, Some(format!("Basic {basic}")));
}

#[tokio::test]
async fn a_valid_rs256_id_token_logs_in_when_rs256_is_allowed() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.stub.keys.sign(
        &json!({"alg": "RS256", "typ": "JWT", "kid": KID_RS256}),
        &rp.claims(),
    );
    rp.accepts(token).await;
}

#[tokio::test]
async fn client_secret_post_sends_the_secret_in_the_form_and_no_basic_header() {
    let mut rp = Rp::start(&format!(
        "{ES256_AND_RS256}\ntoken_endpoint_auth_method = \"client_secret_post\""
    ))
    .await;
    let token = rp.es256(&rp.claims());
    rp.accepts(token).await;
    let req = rp.stub.token_requests().pop().unwrap();
    assert_eq!(req.authorization, None);
    assert_eq!(req.field("client_id"), Some(CLIENT_ID));
    assert_eq!(req.field("client_secret"), Some(CLIENT_SECRET));
    assert!(req.field("code_verifier").is_some());
}

#[tokio::test]
async fn an_exp_just_within_the_clock_skew_is_accepted() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.es256(&rp.claims_with(json!({"exp": now() - (SKEW - 10)})));
    rp.accepts(token).await;
}

#[tokio::test]
async fn nbf_and_iat_slightly_ahead_within_the_clock_skew_are_accepted() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let ahead = now() + SKEW - 10;
    let token = rp.es256(&rp.claims_with(json!({"nbf": ahead, "iat": ahead})));
    rp.accepts(token).await;
}

#[tokio::test]
async fn several_audiences_with_azp_naming_the_client_are_accepted() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token =
        rp.es256(&rp.claims_with(json!({"aud": [CLIENT_ID, "other-client"], "azp": CLIENT_ID})));
    rp.accepts(token).await;
}

// ---------------------------------------------------------------------------------------------
// The algorithm comes from oidc.allowed_algs and the key from the JWKS, never from the token.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_id_token_with_alg_none_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    for header in [
        json!({"alg": "none", "typ": "JWT"}),
        json!({"alg": "none", "typ": "JWT", "kid": KID_ES256}),
        json!({"alg": "None"}),
    ] {
        let token = format!(
            "{}.{}.",
            b64(header.to_string().as_bytes()),
            b64(rp.claims().to_string().as_bytes())
        );
        rp.refuses(token).await;
        rp.new_login().await;
    }
}

#[tokio::test]
async fn an_hs256_token_keyed_with_the_providers_public_key_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let ec_pem = rp.stub.keys.es256_public_pem();
    let rsa_pem = rp.stub.keys.rs256_public_pem();
    let jwks = rp.stub.keys.jwks().to_string();
    let point = rp.stub.keys.es256_jwk();
    for (kid, secret) in [
        (KID_ES256, ec_pem.as_bytes().to_vec()),
        (KID_RS256, rsa_pem.as_bytes().to_vec()),
        (KID_ES256, jwks.into_bytes()),
        (KID_ES256, point.to_string().into_bytes()),
    ] {
        let token = hs256(
            &json!({"alg": "HS256", "typ": "JWT", "kid": kid}),
            &rp.claims(),
            &secret,
        );
        rp.refuses(token).await;
        rp.new_login().await;
    }
}

#[tokio::test]
async fn an_algorithm_outside_allowed_algs_is_refused_even_with_a_published_key() {
    // ES384 with a correct signature by a key the provider publishes.
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.stub.keys.sign(
        &json!({"alg": "ES384", "typ": "JWT", "kid": KID_ES384}),
        &rp.claims(),
    );
    rp.refuses(token).await;
}

#[tokio::test]
async fn rs256_is_refused_when_only_es256_is_allowed() {
    let mut rp = Rp::start("allowed_algs = [\"ES256\"]").await;
    let token = rp.stub.keys.sign(
        &json!({"alg": "RS256", "typ": "JWT", "kid": KID_RS256}),
        &rp.claims(),
    );
    rp.refuses(token).await;
    // The same login with an allowed algorithm goes through.
    rp.new_login().await;
    let token = rp.es256(&rp.claims());
    rp.accepts(token).await;
}

#[tokio::test]
async fn an_unknown_kid_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.stub.keys.sign(
        &json!({"alg": "ES256", "typ": "JWT", "kid": "no-such-key"}),
        &rp.claims(),
    );
    rp.refuses(token).await;
}

#[tokio::test]
async fn a_key_embedded_in_the_jwk_header_is_never_used() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let attacker_jwk = rp.stub.attacker.es256_jwk();
    for kid in [Some(KID_ES256), None, Some("attacker")] {
        let mut header = json!({"alg": "ES256", "typ": "JWT", "jwk": attacker_jwk});
        if let Some(kid) = kid {
            header["kid"] = json!(kid);
        }
        let token = rp.stub.attacker.sign(&header, &rp.claims());
        rp.refuses(token).await;
        rp.new_login().await;
    }
}

#[tokio::test]
async fn jku_and_x5u_headers_are_never_followed() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let jku = format!("{}/attacker/jwks", rp.stub.issuer);
    let x5u = format!("{}/attacker/cert.pem", rp.stub.issuer);
    for extra in [
        json!({"jku": jku}),
        json!({"x5u": x5u}),
        json!({"jku": jku, "kid": "attacker"}),
    ] {
        let mut header = json!({"alg": "ES256", "typ": "JWT", "kid": KID_ES256});
        for (k, v) in extra.as_object().unwrap() {
            header[k] = v.clone();
        }
        let token = rp.stub.attacker.sign(&header, &rp.claims());
        rp.refuses(token).await;
        rp.new_login().await;
    }
    assert_eq!(
        rp.stub.attacker_fetches(),
        0,
        "coatcheck fetched a URL named by a token header"
    );
}

#[tokio::test]
async fn an_x5c_header_is_never_used() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    // A self-signed certificate for the attacker's key.
    let key = rcgen::KeyPair::try_from(rp.stub.attacker.es256_pkcs8.as_slice()).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["attacker.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let x5c = base64::engine::general_purpose::STANDARD.encode(cert.der());
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": KID_ES256, "x5c": [x5c]});
    let token = rp.stub.attacker.sign(&header, &rp.claims());
    rp.refuses(token).await;
}

#[tokio::test]
async fn a_signature_with_one_flipped_byte_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.es256(&rp.claims());
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .unwrap();
    sig[20] ^= 0x01;
    rp.refuses(format!("{input}.{}", b64(&sig))).await;
}

#[tokio::test]
async fn a_token_signed_by_an_unpublished_key_under_a_published_kid_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.stub.attacker.sign(
        &json!({"alg": "ES256", "typ": "JWT", "kid": KID_ES256}),
        &rp.claims(),
    );
    rp.refuses(token).await;
}

// ---------------------------------------------------------------------------------------------
// Claims (OpenID Connect Core §3.1.3.7).
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_wrong_or_missing_issuer_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let other = format!("{}/other", rp.stub.issuer);
    for iss in [json!("https://evil.test"), json!(other), Value::Null] {
        let token = rp.es256(&rp.claims_with(json!({ "iss": iss })));
        rp.refuses(token).await;
        rp.new_login().await;
    }
}

#[tokio::test]
async fn a_wrong_or_missing_audience_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    for aud in [
        json!("other-client"),
        json!(["other-client"]),
        json!("coatcheck2"),
        Value::Null,
    ] {
        let token = rp.es256(&rp.claims_with(json!({ "aud": aud })));
        rp.refuses(token).await;
        rp.new_login().await;
    }
}

#[tokio::test]
async fn several_audiences_without_azp_are_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.es256(&rp.claims_with(json!({"aud": [CLIENT_ID, "other-client"]})));
    rp.refuses(token).await;
}

#[tokio::test]
async fn an_azp_that_is_not_the_client_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    for aud in [json!([CLIENT_ID, "other-client"]), json!(CLIENT_ID)] {
        let token = rp.es256(&rp.claims_with(json!({"aud": aud, "azp": "other-client"})));
        rp.refuses(token).await;
        rp.new_login().await;
    }
}

#[tokio::test]
async fn an_exp_beyond_the_clock_skew_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.es256(&rp.claims_with(json!({"exp": now() - SKEW - 10})));
    rp.refuses(token).await;
}

#[tokio::test]
async fn a_missing_exp_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.es256(&rp.claims_with(json!({"exp": null})));
    rp.refuses(token).await;
}

#[tokio::test]
async fn an_nbf_beyond_the_clock_skew_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.es256(&rp.claims_with(json!({"nbf": now() + SKEW + 60})));
    rp.refuses(token).await;
}

#[tokio::test]
async fn an_iat_in_the_future_beyond_the_clock_skew_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.es256(&rp.claims_with(json!({"iat": now() + SKEW + 60})));
    rp.refuses(token).await;
}

#[tokio::test]
async fn a_missing_or_non_numeric_iat_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    for iat in [Value::Null, json!("yesterday")] {
        let token = rp.es256(&rp.claims_with(json!({ "iat": iat })));
        rp.refuses(token).await;
        rp.new_login().await;
    }
}

#[tokio::test]
async fn a_missing_nonce_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.es256(&rp.claims_with(json!({"nonce": null})));
    rp.refuses(token).await;
}

#[tokio::test]
async fn a_wrong_nonce_is_refused_even_when_it_belongs_to_another_login() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let token = rp.es256(&rp.claims_with(json!({"nonce": "not-the-nonce"})));
    rp.refuses(token).await;
    // The nonce of an earlier login in the same browser is not this login's nonce.
    rp.new_login().await;
    let stale = rp.nonce.clone();
    rp.new_login().await;
    let token = rp.es256(&rp.claims_with(json!({ "nonce": stale })));
    rp.refuses(token).await;
}

#[tokio::test]
async fn a_missing_or_empty_sub_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    for sub in [Value::Null, json!("")] {
        let token = rp.es256(&rp.claims_with(json!({ "sub": sub })));
        rp.refuses(token).await;
        rp.new_login().await;
    }
}

#[tokio::test]
async fn a_token_response_without_an_id_token_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    let r = rp.callback(None).await;
    assert_refused_page(r).await;
}

// ---------------------------------------------------------------------------------------------
// Exact comparisons and header rules (issue 9)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_token_with_a_crit_header_is_refused() {
    let mut rp = Rp::start("").await;
    let token = rp.stub.keys.sign(
        &json!({"alg": "ES256", "typ": "JWT", "kid": KID_ES256, "crit": ["exp"]}),
        &rp.claims(),
    );
    rp.refuses(token).await;
}

#[tokio::test]
async fn an_access_token_cannot_pass_for_an_id_token() {
    let mut rp = Rp::start("").await;
    for typ in ["at+jwt", "application/at+JWT"] {
        let token = rp.stub.keys.sign(
            &json!({"alg": "ES256", "typ": typ, "kid": KID_ES256}),
            &rp.claims(),
        );
        rp.refuses(token).await;
        rp.new_login().await;
    }
}

/// Delivers a callback with the given `iss` parameter (or none).
async fn callback_with_iss(rp: &mut Rp, iss: Option<&str>) -> reqwest::Response {
    rp.stub.set_id_token(Some(rp.es256(&rp.claims())));
    let mut url = format!("/bff/callback?code=x&state={}", rp.state);
    if let Some(iss) = iss {
        url.push_str(&format!("&iss={}", bff::urlencode(iss)));
    }
    let r = rp.browser.request(Method::GET, &url).send().await.unwrap();
    rp.browser.absorb(r.headers());
    r
}

#[tokio::test]
async fn the_iss_parameter_must_match_the_issuer_byte_for_byte() {
    let mut rp = Rp::start("").await;
    let issuer = rp.stub.issuer.clone();
    for near_miss in [
        format!("{issuer}/"),
        issuer.to_uppercase(),
        issuer.replace("127.0.0.1", "localhost"),
    ] {
        let before = rp.stub.token_requests().len();
        let r = callback_with_iss(&mut rp, Some(&near_miss)).await;
        assert_refused_page(r).await;
        assert_eq!(rp.stub.token_requests().len(), before, "{near_miss}");
        rp.new_login().await;
    }
    let r = callback_with_iss(&mut rp, Some(&issuer)).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn iss_is_required_when_the_provider_advertises_it() {
    let stub_first = StubIdp::start().await;
    stub_first
        .script
        .iss_parameter_supported
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut rp = Rp::start_with(stub_first, "").await;
    let before = rp.stub.token_requests().len();
    let r = callback_with_iss(&mut rp, None).await;
    assert_refused_page(r).await;
    assert_eq!(rp.stub.token_requests().len(), before);
    rp.new_login().await;
    let issuer = rp.stub.issuer.clone();
    let r = callback_with_iss(&mut rp, Some(&issuer)).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_discovery_issuer_that_differs_by_a_trailing_slash_is_refused() {
    let stub = StubIdp::start().await;
    let config = format!(
        "[session]\nkeys = [\"{SESSION_KEY}\"]\n[session.store]\nkind = \"memory\"\n\n\
         [oidc]\nissuer = \"{}/\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n\n\
         [[route]]\npath = \"/\"\nupstream = \"http://127.0.0.1:9\"\nauth = \"none\"\n",
        stub.issuer
    );
    let proxy = start_proxy(&config).await;
    let client = proxy.http1();
    for _ in 0..20 {
        if stub
            .script
            .discovery_fetches
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client.get(proxy.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503, "a near-miss issuer was accepted");
    proxy.stop().await;
}

#[tokio::test]
async fn discovery_and_the_jwks_are_refreshed_periodically() {
    let stub = StubIdp::start().await;
    let mut rp = Rp::start_with(stub, "metadata_refresh = \"1s\"\n").await;
    let discovery = rp
        .stub
        .script
        .discovery_fetches
        .load(std::sync::atomic::Ordering::SeqCst);
    let jwks = rp.stub.jwks_fetches();
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert!(
        rp.stub
            .script
            .discovery_fetches
            .load(std::sync::atomic::Ordering::SeqCst)
            >= discovery + 2
    );
    assert!(rp.stub.jwks_fetches() >= jwks + 2);
    // Still logs in with the refreshed keys.
    let token = rp.es256(&rp.claims());
    rp.accepts(token).await;
}

// ---------------------------------------------------------------------------------------------
// Back-channel logout tokens (Back-Channel Logout 1.0 §2.4, §2.6)
// ---------------------------------------------------------------------------------------------

impl Rp {
    /// Logs in with an ID token that carries the provider session `sid`.
    async fn logged_in_with_sid(&mut self, sid: &str) {
        let token = self.es256(&self.claims_with(json!({ "sid": sid })));
        self.accepts(token).await;
    }

    /// A logout token's claims for provider session `sid` (and `sub` when given).
    fn logout_claims(&self, sub: Option<&str>, sid: Option<&str>, jti: &str) -> Value {
        let now = now();
        let mut c = json!({
            "iss": self.stub.issuer,
            "aud": CLIENT_ID,
            "iat": now,
            "exp": now + 120,
            "jti": jti,
            "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
        });
        if let Some(s) = sub {
            c["sub"] = json!(s);
        }
        if let Some(s) = sid {
            c["sid"] = json!(s);
        }
        c
    }

    async fn post_logout_token(&self, claims: &Value) -> reqwest::Response {
        let token = self.stub.keys.sign(
            &json!({"alg": "ES256", "typ": "logout+jwt", "kid": KID_ES256}),
            claims,
        );
        self.browser
            .client
            .post(self.browser.url("/bff/backchannel-logout"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("logout_token={token}"))
            .send()
            .await
            .unwrap()
    }

    async fn session_status(&self) -> u16 {
        self.browser
            .api(Method::GET, "/bff/user")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

#[tokio::test]
async fn a_logout_token_naming_only_a_sid_ends_that_provider_sessions_sessions() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    rp.logged_in_with_sid("sid-1").await;
    assert_eq!(rp.session_status().await, 200);
    let other = rp
        .post_logout_token(&rp.logout_claims(None, Some("sid-2"), "j1"))
        .await;
    assert_eq!(other.status(), 200);
    assert_eq!(
        rp.session_status().await,
        200,
        "another provider session: untouched"
    );
    let r = rp
        .post_logout_token(&rp.logout_claims(None, Some("sid-1"), "j2"))
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["ended"], 1);
    assert_eq!(rp.session_status().await, 401);
}

#[tokio::test]
async fn a_replayed_logout_token_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    rp.logged_in_with_sid("sid-1").await;
    let claims = rp.logout_claims(Some("bob"), None, "once-only");
    assert_eq!(rp.post_logout_token(&claims).await.status(), 200);
    let again = rp.post_logout_token(&claims).await;
    assert_eq!(again.status(), 400, "the same jti a second time");
}

#[tokio::test]
async fn a_logout_token_without_exp_or_with_an_old_iat_is_refused() {
    let mut rp = Rp::start(ES256_AND_RS256).await;
    rp.logged_in_with_sid("sid-1").await;
    let mut no_exp = rp.logout_claims(None, Some("sid-1"), "j-exp");
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(rp.post_logout_token(&no_exp).await.status(), 400);
    let mut old = rp.logout_claims(None, Some("sid-1"), "j-old");
    old["iat"] = json!(now() - 3600);
    old["exp"] = json!(now() + 3600);
    assert_eq!(rp.post_logout_token(&old).await.status(), 400);
    assert_eq!(rp.session_status().await, 200, "neither ended the session");
}
