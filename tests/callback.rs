//! Every callback coatcheck must refuse, against the real identity provider: no session, the 400
//! sign-in page, and — before the code exchange — no call to the token endpoint. Also concurrent
//! logins, session fixation, tampered tickets, `client_secret_post`, and a log-leak check on the
//! real binary.
//!
//! A refused callback is then usually followed by the genuine one, which logs in: the refusal came
//! from the rule under test, not from a broken code.

#[path = "support/bff.rs"]
mod bff;
mod support;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bff::{Browser, Env, EnvOptions, SESSION_KEY, urlencode};
use coatcheck::secret::{self, Secret};
use coatcheck::session::ticket::{Keys, Ticket};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use support::idp::{IdpClient, IdpOptions, login_via_forms};
use support::{
    ProxyProcess, RawConn, TempDir, WAIT, expect_json_error, http1_client, proxy_config,
};
use url::Url;

const LOGIN_COOKIE_PREFIX: &str = "__Host-coatcheck-login-";
const CLIENT_SECRET: &str = "coatcheck-secret";

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// A browser for coatcheck at `addr` whose provider-side client is bounded too.
fn browser(addr: std::net::SocketAddr) -> Browser {
    let mut b = Browser::new(addr);
    b.idp_client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(true)
        .timeout(WAIT)
        .build()
        .unwrap();
    b
}

/// How many `authorization_code` token requests the provider has seen.
async fn code_exchanges(env: &Env) -> u64 {
    env.idp().stats().await["token_requests"]["authorization_code"]
        .as_u64()
        .unwrap()
}

fn set_cookies(h: &HeaderMap) -> Vec<String> {
    h.get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// A refused callback: 400, the HTML sign-in page, no session cookie. Returns the page.
async fn assert_refused(r: reqwest::Response) -> String {
    let status = r.status();
    let cookies = set_cookies(r.headers());
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let cache = r.headers().get("cache-control").cloned();
    let page = r.text().await.unwrap();
    assert_eq!(status, 400, "{page}");
    assert!(ct.starts_with("text/html"), "{ct}");
    assert_eq!(
        cache.as_ref().map(|v| v.to_str().unwrap()),
        Some("no-store")
    );
    assert!(page.contains("Sign-in failed"), "{page}");
    assert!(
        !cookies.iter().any(|c| c.starts_with("__Host-coatcheck=")),
        "no session cookie: {cookies:?}"
    );
    page
}

/// The callback is refused and the token endpoint was not called for it.
async fn assert_refused_before_exchange(env: &Env, r: reqwest::Response) -> String {
    let before = code_exchanges(env).await;
    let page = assert_refused(r).await;
    assert_eq!(
        code_exchanges(env).await,
        before,
        "the token endpoint was not called"
    );
    page
}

/// Delivers `callback` (a provider redirect) to coatcheck without absorbing cookies.
async fn deliver(b: &Browser, callback: &str) -> reqwest::Response {
    let path = b.local(callback).replacen(&b.url(""), "", 1);
    b.request(Method::GET, &path).send().await.unwrap()
}

/// Starts a login in `b` and signs in at the provider; returns the provider's redirect to
/// `/bff/callback` (not delivered yet).
async fn provider_redirect(b: &mut Browser, user: &str) -> String {
    let authorize = b.start_login("/app/home").await;
    login_via_forms(&b.idp_client, &authorize, user, &format!("{user}-pw"))
        .await
        .expect("provider login")
}

fn query(url: &str, name: &str) -> Option<String> {
    Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `url` with query parameter `name` replaced (`None`: removed).
fn with_param(url: &str, name: &str, value: Option<&str>) -> String {
    let mut u = Url::parse(url).unwrap();
    let pairs: Vec<(String, String)> = u
        .query_pairs()
        .into_owned()
        .filter(|(k, _)| k != name)
        .collect();
    {
        let mut q = u.query_pairs_mut();
        q.clear();
        for (k, v) in &pairs {
            q.append_pair(k, v);
        }
        if let Some(v) = value {
            q.append_pair(name, v);
        }
    }
    u.to_string()
}

/// The browser's login cookie(s): (name, value).
fn login_cookies(b: &Browser) -> Vec<(String, String)> {
    b.cookies
        .iter()
        .filter(|(k, _)| k.starts_with(LOGIN_COOKIE_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn only_login_cookie(b: &Browser) -> (String, String) {
    let mut c = login_cookies(b);
    assert_eq!(c.len(), 1, "{:?}", b.cookies);
    c.pop().unwrap()
}

fn keys_for(session_key_b64: &str) -> Keys {
    Keys::new(&[Secret::new(STANDARD.decode(session_key_b64).unwrap())])
}

/// Decrypts a login cookie with the test session key (what coatcheck itself does).
fn open_login_cookie(name: &str, value: &str) -> Value {
    let keys = keys_for(SESSION_KEY);
    let plain = secret::open(
        keys.login_key(),
        name.as_bytes(),
        &URL_SAFE_NO_PAD.decode(value).unwrap(),
    )
    .expect("the login cookie opens with the configured key");
    serde_json::from_slice(&plain).unwrap()
}

fn seal_login_cookie(keys: &Keys, name: &str, tx: &Value) -> String {
    URL_SAFE_NO_PAD.encode(secret::seal(
        keys.login_key(),
        name.as_bytes(),
        tx.to_string().as_bytes(),
    ))
}

/// `s` with the character at `i` changed.
fn flip(s: &str, i: usize) -> String {
    let mut t = s.to_owned().into_bytes();
    t[i] = if t[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(t).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Delivers the genuine callback with the genuine cookies: it logs in.
async fn assert_logs_in(b: &mut Browser, callback: &str) {
    let r = b.finish_login(callback).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert!(b.session_cookie().is_some());
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(r.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// refused callbacks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_callback_without_the_login_cookie_is_refused_before_the_token_endpoint() {
    let env = Env::start(EnvOptions::default()).await;
    let mut b = browser(env.proxy.addr);
    let callback = provider_redirect(&mut b, "alice").await;
    let jar = b.cookies.clone();
    b.cookies.clear();
    let page = assert_refused_before_exchange(&env, deliver(&b, &callback).await).await;
    assert!(page.contains("not started in this browser"), "{page}");
    b.cookies = jar;
    assert_logs_in(&mut b, &callback).await;
}

#[tokio::test]
async fn a_login_cookie_from_another_login_is_refused_before_the_token_endpoint() {
    let env = Env::start(EnvOptions::default()).await;
    let mut alice = browser(env.proxy.addr);
    let mut mallory = browser(env.proxy.addr);
    let callback = provider_redirect(&mut alice, "alice").await;
    mallory.start_login("/").await;
    let (alice_name, _) = only_login_cookie(&alice);
    let (mallory_name, mallory_value) = only_login_cookie(&mallory);
    assert_ne!(
        alice_name, mallory_name,
        "login cookies are named per login"
    );

    // Alice's callback in a browser that started another login: no cookie for this state.
    assert_refused_before_exchange(&env, deliver(&mallory, &callback).await).await;

    // The other login's cookie renamed to this state's cookie: sealed for another name.
    let mut forged = mallory.cookies.clone();
    forged.remove(&mallory_name);
    forged.insert(alice_name.clone(), mallory_value.clone());
    mallory.cookies = forged;
    let page = assert_refused_before_exchange(&env, deliver(&mallory, &callback).await).await;
    assert!(page.contains("not valid"), "{page}");

    // Alice's own browser with its cookie value swapped for the other login's.
    let jar = alice.cookies.clone();
    alice.cookies.insert(alice_name, mallory_value);
    assert_refused_before_exchange(&env, deliver(&alice, &callback).await).await;

    alice.cookies = jar;
    assert_logs_in(&mut alice, &callback).await;
}

#[tokio::test]
async fn a_code_from_another_login_fails_pkce_at_the_provider_and_creates_no_session() {
    // Swapped states: mallory's callback carries alice's code with mallory's own state and
    // cookie. Only PKCE can tell (the verifier is mallory's), so the token endpoint refuses.
    let env = Env::start(EnvOptions::default()).await;
    let mut alice = browser(env.proxy.addr);
    let mut mallory = browser(env.proxy.addr);
    let alice_callback = provider_redirect(&mut alice, "alice").await;
    let mallory_callback = provider_redirect(&mut mallory, "bob").await;
    let injected = with_param(
        &mallory_callback,
        "code",
        Some(&query(&alice_callback, "code").unwrap()),
    );
    let before = env.idp().stats().await;
    assert_refused(deliver(&mallory, &injected).await).await;
    let after = env.idp().stats().await;
    assert_eq!(
        after["authorization_code_failures"].as_u64().unwrap(),
        before["authorization_code_failures"].as_u64().unwrap() + 1,
        "the provider refused the exchange (PKCE)"
    );
    let r = mallory.api(Method::GET, "/bff/user").send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_callback_with_a_wrong_state_is_refused_before_the_token_endpoint() {
    let env = Env::start(EnvOptions::default()).await;
    let mut b = browser(env.proxy.addr);
    let callback = provider_redirect(&mut b, "alice").await;
    let state = query(&callback, "state").unwrap();
    let same_prefix = format!("{}{}", &state[..16], "x".repeat(state.len() - 16));
    let random = "A".repeat(state.len());
    let with_odd_chars = format!("{}%00<", &state);
    for wrong in [
        same_prefix.as_str(),
        random.as_str(),
        &state[..16],
        "short",
        with_odd_chars.as_str(),
    ] {
        let r = deliver(&b, &with_param(&callback, "state", Some(wrong))).await;
        assert_refused_before_exchange(&env, r).await;
    }
    assert_logs_in(&mut b, &callback).await;
}

#[tokio::test]
async fn a_callback_without_state_is_refused_before_the_token_endpoint() {
    let env = Env::start(EnvOptions::default()).await;
    let mut b = browser(env.proxy.addr);
    let callback = provider_redirect(&mut b, "alice").await;
    for missing in [None, Some("")] {
        let r = deliver(&b, &with_param(&callback, "state", missing)).await;
        let page = assert_refused_before_exchange(&env, r).await;
        assert!(page.contains("no valid state"), "{page}");
    }
    assert_logs_in(&mut b, &callback).await;
}

#[tokio::test]
async fn a_replayed_callback_is_refused_the_second_time_without_a_second_exchange() {
    let env = Env::start(EnvOptions::default()).await;
    let mut b = browser(env.proxy.addr);
    let callback = provider_redirect(&mut b, "alice").await;
    let jar = b.cookies.clone();
    assert_logs_in(&mut b, &callback).await;
    assert_eq!(code_exchanges(&env).await, 1);

    // The same redirect with the same login cookie (an attacker who captured both, or a
    // browser that replays history), with and without the new session.
    let with_session = {
        let mut j = jar.clone();
        j.insert(
            "__Host-coatcheck".into(),
            b.session_cookie().unwrap().clone(),
        );
        j
    };
    for cookies in [jar.clone(), with_session] {
        let mut replayer = browser(env.proxy.addr);
        replayer.cookies = cookies;
        let page = assert_refused_before_exchange(&env, deliver(&replayer, &callback).await).await;
        assert!(page.contains("already used"), "{page}");
    }
    assert_eq!(code_exchanges(&env).await, 1);
    // The first login's session is untouched by the replay.
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(r.status(), 200);
}

// Several workers, as in the real binary: on a single-threaded runtime the race cannot happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_of_one_callback_exchange_the_code_once() {
    // A replay racing the genuine callback: connections are opened first, then every request is
    // written at once, so they reach the state check together.
    let env = Env::start(EnvOptions::default()).await;
    let mut b = browser(env.proxy.addr);
    let callback = provider_redirect(&mut b, "alice").await;
    let path = b.local(&callback).replacen(&b.url(""), "", 1);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost:{}\r\nCookie: {}\r\nConnection: close\r\n\r\n",
        b.addr.port(),
        b.cookie_header().unwrap().to_str().unwrap()
    );
    let mut conns = Vec::new();
    for _ in 0..12 {
        conns.push(RawConn::connect(b.addr).await);
    }
    let answers = futures_util::future::join_all(conns.into_iter().map(|mut c| {
        let request = request.clone();
        async move {
            c.send(request.as_bytes()).await;
            c.read_response().await
        }
    }))
    .await;
    let ok: Vec<_> = answers.iter().filter(|r| r.status == 200).collect();
    assert_eq!(ok.len(), 1, "exactly one delivery logs in");
    for r in answers.iter().filter(|r| r.status != 200) {
        assert_eq!(r.status, 400);
        assert!(
            !r.headers
                .iter()
                .any(|(k, v)| k == "set-cookie" && v.starts_with("__Host-coatcheck=")),
            "{r:?}"
        );
    }
    assert_eq!(
        code_exchanges(&env).await,
        1,
        "the racing replays never reached the token endpoint"
    );
    // The winner's session is alive (a second exchange of the code would have revoked its grant).
    let mut winner = browser(env.proxy.addr);
    winner.absorb(&{
        let mut h = HeaderMap::new();
        for (k, v) in &ok[0].headers {
            if k == "set-cookie" {
                h.append("set-cookie", v.parse().unwrap());
            }
        }
        h
    });
    let r = winner.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_login_cookie_sealed_under_another_session_key_is_refused() {
    let env = Env::start(EnvOptions::default()).await;
    let mut b = browser(env.proxy.addr);
    let callback = provider_redirect(&mut b, "alice").await;
    let (name, value) = only_login_cookie(&b);
    let tx = open_login_cookie(&name, &value);
    // The very same transaction, encrypted under a key coatcheck is not configured with.
    let other = keys_for("b3RoZXIta2V5LW90aGVyLWtleS1vdGhlci1rZXktMDA=");
    let mut forged = browser(env.proxy.addr);
    forged.cookies = b.cookies.clone();
    forged
        .cookies
        .insert(name.clone(), seal_login_cookie(&other, &name, &tx));
    let page = assert_refused_before_exchange(&env, deliver(&forged, &callback).await).await;
    assert!(page.contains("not valid"), "{page}");
    // Tampered ciphertext, and garbage, are refused the same way.
    for bad in [
        flip(&value, value.len() / 2),
        flip(&value, 3),
        "not-base64!".to_owned(),
        String::new(),
    ] {
        forged.cookies.insert(name.clone(), bad);
        assert_refused_before_exchange(&env, deliver(&forged, &callback).await).await;
    }
    assert_logs_in(&mut b, &callback).await;
}

#[tokio::test]
async fn an_expired_login_transaction_is_refused_before_the_token_endpoint() {
    // Ten minutes cannot be waited for: the transaction is re-sealed (with the configured key,
    // exactly as coatcheck seals it) with an older creation time.
    let env = Env::start(EnvOptions::default()).await;
    let mut b = browser(env.proxy.addr);
    let callback = provider_redirect(&mut b, "alice").await;
    let (name, value) = only_login_cookie(&b);
    let mut tx = open_login_cookie(&name, &value);
    assert!(
        tx["created_at"].as_u64().unwrap().abs_diff(now()) < 60,
        "{tx}"
    );
    let keys = keys_for(SESSION_KEY);
    let ttl = coatcheck::auth::login::LOGIN_TTL.as_secs();
    tx["created_at"] = json!(now() - ttl - 5);
    let mut late = browser(env.proxy.addr);
    late.cookies = b.cookies.clone();
    late.cookies
        .insert(name.clone(), seal_login_cookie(&keys, &name, &tx));
    let page = assert_refused_before_exchange(&env, deliver(&late, &callback).await).await;
    assert!(page.contains("took too long"), "{page}");

    // A transaction a little younger than the limit still goes through (the re-sealing is sound).
    tx["created_at"] = json!(now() - ttl + 30);
    b.cookies
        .insert(name.clone(), seal_login_cookie(&keys, &name, &tx));
    assert_logs_in(&mut b, &callback).await;
}

#[tokio::test]
async fn an_error_answer_is_refused_and_its_description_is_escaped() {
    let env = Env::start(EnvOptions::default()).await;
    let mut b = browser(env.proxy.addr);
    let authorize = b.start_login("/").await;
    let state = query(&authorize, "state").unwrap();
    let script = "<script>alert(1)</script>";
    for with_state in [true, false] {
        let mut q = format!(
            "error=access_denied&error_description={}",
            urlencode(script)
        );
        if with_state {
            q.push_str(&format!("&state={state}"));
        }
        let r = b
            .request(Method::GET, &format!("/bff/callback?{q}"))
            .send()
            .await
            .unwrap();
        let page = assert_refused_before_exchange(&env, r).await;
        assert!(!page.contains(script), "{page}");
        assert!(!page.to_ascii_lowercase().contains("<script"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
        assert!(page.contains("access_denied"), "{page}");
    }
    // A hostile error code is escaped too.
    let r = b
        .request(
            Method::GET,
            &format!(
                "/bff/callback?error={}",
                urlencode("<img src=x onerror=alert(1)>")
            ),
        )
        .send()
        .await
        .unwrap();
    let page = assert_refused_before_exchange(&env, r).await;
    assert!(!page.contains("<img"), "{page}");
}

#[tokio::test]
async fn the_providers_own_access_denied_answer_is_refused() {
    // The user presses "Cancel" at the provider.
    let env = Env::start(EnvOptions::default()).await;
    let mut b = browser(env.proxy.addr);
    let authorize = b.start_login("/").await;
    let idp = Url::parse(&authorize).unwrap();
    let mut url = idp.clone();
    let mut callback = None;
    for _ in 0..10 {
        let r = b.idp_client.get(url.clone()).send().await.unwrap();
        assert!(r.status().is_redirection(), "{url}: {}", r.status());
        let next = url.join(r.headers()["location"].to_str().unwrap()).unwrap();
        if next.origin() != idp.origin() {
            callback = Some(next.to_string());
            break;
        }
        url = if next.path().starts_with("/interaction/") && !next.path().ends_with("/abort") {
            next.join(&format!("{}/abort", next.path())).unwrap()
        } else {
            next
        };
    }
    let callback = callback.expect("the provider redirected back");
    assert_eq!(
        query(&callback, "error").as_deref(),
        Some("access_denied"),
        "{callback}"
    );
    let page = assert_refused_before_exchange(&env, b.finish_login(&callback).await).await;
    assert!(page.contains("access_denied"), "{page}");
    assert!(
        login_cookies(&b).is_empty(),
        "the login cookie is cleared: {:?}",
        b.cookies
    );
}

#[tokio::test]
async fn return_urls_that_leave_the_origin_are_refused_at_login() {
    let env = Env::start(EnvOptions::default()).await;
    let b = browser(env.proxy.addr);
    for hostile in [
        "//evil.test",
        "/\\evil.test",
        "https:evil.test",
        "%2F%2Fevil.test",
        "/%09/evil",
        "https://evil.test/",
        "/%2F/evil.test",
        "/%5Cevil.test",
        " //evil.test",
        "\t//evil.test",
    ] {
        for sent in [urlencode(hostile), hostile.replace('\\', "%5C")] {
            let r = b
                .request(Method::GET, &format!("/bff/login?returnUrl={sent}"))
                .send()
                .await
                .unwrap();
            assert!(
                !r.headers().contains_key("location"),
                "{hostile:?} ({sent}) redirected"
            );
            assert!(
                set_cookies(r.headers()).is_empty(),
                "{hostile:?} ({sent}) set a cookie"
            );
            expect_json_error(r, 400, "bad_request").await;
        }
    }
    // A local path is fine.
    let r = b
        .request(Method::GET, "/bff/login?returnUrl=%2Fapp%2Fhome%3Fx%3D1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
}

// ---------------------------------------------------------------------------------------------
// accepted logins, tickets
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn two_tabs_logging_in_at_once_both_succeed() {
    let env = Env::start(EnvOptions::default()).await;
    let mut b = browser(env.proxy.addr);
    let first = b.start_login("/one").await;
    let second = b.start_login("/two").await;
    assert_eq!(login_cookies(&b).len(), 2, "{:?}", b.cookies);
    let first = login_via_forms(&b.idp_client, &first, "alice", "alice-pw")
        .await
        .unwrap();
    let second = login_via_forms(&b.idp_client, &second, "alice", "alice-pw")
        .await
        .unwrap();
    // The second tab comes back first.
    for (callback, target) in [(second, "url=/two"), (first, "url=/one")] {
        let r = b.finish_login(&callback).await;
        assert_eq!(r.status(), 200);
        assert!(
            set_cookies(r.headers())
                .iter()
                .any(|c| c.starts_with("__Host-coatcheck=")),
            "a session per completed login"
        );
        let page = r.text().await.unwrap();
        assert!(page.contains(target), "{page}");
    }
    assert!(login_cookies(&b).is_empty(), "{:?}", b.cookies);
    let r = b.api(Method::GET, "/bff/user").send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_second_login_in_the_same_browser_issues_a_new_ticket_and_retires_the_old_one() {
    let env = Env::start(EnvOptions::default()).await;
    let mut b = browser(env.proxy.addr);
    assert_eq!(b.login("alice", "alice-pw").await.status(), 200);
    let old = b.session_cookie().unwrap().clone();
    assert_eq!(b.login("alice", "alice-pw").await.status(), 200);
    let new = b.session_cookie().unwrap().clone();
    assert_ne!(old, new, "every login issues a new ticket");
    assert_eq!(
        b.api(Method::GET, "/api/x").send().await.unwrap().status(),
        200
    );
    b.cookies.insert("__Host-coatcheck".into(), old);
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "session_expired");
}

#[tokio::test]
async fn a_tampered_ticket_is_refused_before_the_store() {
    let env = Env::start(EnvOptions::default()).await;
    let mut b = browser(env.proxy.addr);
    assert_eq!(b.login("alice", "alice-pw").await.status(), 200);
    let good = b.session_cookie().unwrap().clone();
    let seen = env.api.seen().len();
    for i in [0, 10, 40, 80] {
        b.cookies.insert("__Host-coatcheck".into(), flip(&good, i));
        let r = b.api(Method::GET, "/api/x").send().await.unwrap();
        // `unauthenticated`, not `session_expired`: the MAC failed, so no store lookup said
        // "gone" (contrast below).
        let v = expect_json_error(r, 401, "unauthenticated").await;
        assert!(v["login_url"].is_string());
    }
    // A ticket with a valid MAC for a session that does not exist is looked up and found gone.
    let keys = keys_for(SESSION_KEY);
    let authentic = Ticket::generate().encode(&keys);
    b.cookies
        .insert("__Host-coatcheck".into(), authentic.expose().clone());
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    expect_json_error(r, 401, "session_expired").await;
    assert_eq!(env.api.seen().len(), seen, "the upstream was not contacted");
    b.cookies.insert("__Host-coatcheck".into(), good);
    assert_eq!(
        b.api(Method::GET, "/api/x").send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn client_secret_post_logs_in_against_the_real_provider() {
    let env = Env::start(EnvOptions {
        oidc: "token_endpoint_auth_method = \"client_secret_post\"".into(),
        idp: IdpOptions {
            clients: vec![IdpClient {
                token_endpoint_auth_method: "client_secret_post".into(),
                ..IdpClient::default()
            }],
            ..IdpOptions::default()
        },
        ..EnvOptions::default()
    })
    .await;
    let mut b = browser(env.proxy.addr);
    let r = b.login("bob", "bob-pw").await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(code_exchanges(&env).await, 1);
    assert_eq!(
        env.idp().stats().await["authorization_code_failures"],
        0,
        "the provider accepted the client authentication"
    );
    let r = b.api(Method::GET, "/api/x").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        env.api
            .last()
            .unwrap()
            .header("authorization")
            .unwrap()
            .starts_with("Bearer ey")
    );
}

// ---------------------------------------------------------------------------------------------
// nothing secret in the logs or in what the browser sees
// ---------------------------------------------------------------------------------------------

/// Everything the browser saw from coatcheck, as text.
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    async fn record(&mut self, b: &mut Browser, r: reqwest::Response) -> (u16, HeaderMap, String) {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.text().await.unwrap();
        let mut text = format!("{status}\n");
        for (k, v) in &headers {
            text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("<binary>")));
        }
        text.push_str(&body);
        self.0.push(text);
        b.absorb(&headers);
        (status, headers, body)
    }
}

/// The refresh tokens the provider has stored (opaque tokens are their own ids).
fn provider_refresh_tokens(state_file: &std::path::Path) -> Vec<String> {
    let state: Value = serde_json::from_slice(&std::fs::read(state_file).unwrap()).unwrap();
    state["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["model"] == "RefreshToken")
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The parts of a secret worth searching for: the whole, and for a JWT its payload and
/// signature (a truncated or re-encoded token still leaks those).
fn needles(secret: &str) -> Vec<String> {
    let mut v = vec![secret.to_owned()];
    let parts: Vec<&str> = secret.split('.').collect();
    if parts.len() == 3 {
        v.push(parts[1].to_owned());
        v.push(parts[2].to_owned());
    }
    v
}

/// The real binary, at debug level, against `env`'s provider and upstream; returns once it is
/// ready.
async fn start_debug_binary(env: &Env) -> ProxyProcess {
    let proc = ProxyProcess::start(&proxy_config(
        "",
        &format!("[log]\nlevel = \"debug\"\n\n{}", env.config),
    ))
    .await;
    let ready = http1_client(proc.addr);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !matches!(ready.get(format!("https://localhost:{}/readyz", proc.addr.port())).send().await, Ok(r) if r.status() == 200)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready:\n{}",
            proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proc
}

/// The secrets a login through coatcheck produces, as the test learnt them.
struct Login {
    /// The PKCE verifier, read from the login cookie.
    verifier: String,
    code: String,
    /// The session cookie.
    session: String,
    /// What the provider holds once the login is complete.
    refresh_tokens: Vec<String>,
}

/// Every secret of one login, logout included.
struct LoginSecrets {
    login: Login,
    access_token: String,
    id_token: String,
}

impl LoginSecrets {
    /// What must appear nowhere in the logs.
    fn for_the_logs(&self) -> Vec<(&'static str, String)> {
        let mut secrets: Vec<(&str, String)> = vec![
            ("access token", self.access_token.clone()),
            ("ID token", self.id_token.clone()),
            ("authorization code", self.login.code.clone()),
            ("PKCE verifier", self.login.verifier.clone()),
            ("client secret", CLIENT_SECRET.to_owned()),
            ("client credentials (Basic)", basic_credentials()),
            ("session cookie", self.login.session.clone()),
        ];
        for rt in &self.login.refresh_tokens {
            secrets.push(("refresh token", rt.clone()));
        }
        secrets
    }

    /// What must appear in no response the browser saw (the ID token is checked apart: the
    /// end-session redirect carries it).
    fn for_the_browser(&self) -> Vec<(&'static str, String)> {
        let mut secrets: Vec<(&str, String)> = vec![
            ("access token", self.access_token.clone()),
            ("PKCE verifier", self.login.verifier.clone()),
            ("client secret", CLIENT_SECRET.to_owned()),
            ("client credentials (Basic)", basic_credentials()),
        ];
        for rt in &self.login.refresh_tokens {
            secrets.push(("refresh token", rt.clone()));
        }
        secrets
    }
}

/// The client's `Authorization: Basic` credentials at the token endpoint.
fn basic_credentials() -> String {
    STANDARD.encode(format!("coatcheck:{CLIENT_SECRET}"))
}

/// Logs alice in through coatcheck, recording what the browser sees.
async fn log_in_recorded(b: &mut Browser, seen: &mut Seen, state_file: &std::path::Path) -> Login {
    let r = b
        .request(Method::GET, "/bff/login?returnUrl=%2Fapp%2Fhome")
        .send()
        .await
        .unwrap();
    let (status, headers, _) = seen.record(b, r).await;
    assert_eq!(status, 302);
    let authorize = headers["location"].to_str().unwrap().to_owned();
    let (name, value) = only_login_cookie(b);
    let tx = open_login_cookie(&name, &value);
    let verifier = tx["verifier"].as_str().unwrap().to_owned();
    assert!(verifier.len() >= 43, "{tx}");

    let callback = login_via_forms(&b.idp_client, &authorize, "alice", "alice-pw")
        .await
        .unwrap();
    let code = query(&callback, "code").unwrap();
    let path = b.local(&callback).replacen(&b.url(""), "", 1);
    let r = b.request(Method::GET, &path).send().await.unwrap();
    let (status, _, page) = seen.record(b, r).await;
    assert_eq!(status, 200, "{page}");
    let session = b.session_cookie().unwrap().clone();
    let refresh_tokens = provider_refresh_tokens(state_file);
    assert!(
        !refresh_tokens.is_empty(),
        "the provider issued a refresh token"
    );
    Login {
        verifier,
        code,
        session,
        refresh_tokens,
    }
}

/// Calls the API and `/bff/user`, recording what the browser sees; returns the access token the
/// upstream got and the user document.
async fn call_api_recorded(env: &Env, b: &mut Browser, seen: &mut Seen) -> (String, Value) {
    let r = b.api(Method::GET, "/api/status/200").send().await.unwrap();
    let (status, _, _) = seen.record(b, r).await;
    assert_eq!(status, 200);
    let access_token = env
        .api
        .last()
        .unwrap()
        .header("authorization")
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_owned();
    assert_eq!(access_token.split('.').count(), 3, "a JWT access token");

    let r = b.api(Method::GET, "/bff/user").send().await.unwrap();
    let (status, _, user) = seen.record(b, r).await;
    assert_eq!(status, 200);
    (access_token, serde_json::from_str(&user).unwrap())
}

/// Follows the user document's `logout_url`, recording what the browser sees; returns the ID
/// token handed to the provider.
async fn log_out_recorded(env: &Env, b: &mut Browser, seen: &mut Seen, user: &Value) -> String {
    let r = b
        .request(Method::GET, user["logout_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let (status, headers, _) = seen.record(b, r).await;
    assert_eq!(status, 302);
    // RP-initiated logout hands the ID token to the provider through the browser (by design:
    // `id_token_hint`); that is the one place it may appear.
    let end_session = headers["location"].to_str().unwrap().to_owned();
    let id_token = query(&end_session, "id_token_hint").unwrap();
    assert_eq!(id_token.split('.').count(), 3);
    assert_eq!(
        env.idp().stats().await["revocations"],
        1,
        "the refresh token was spent at logout"
    );
    id_token
}

/// The binary's logs once (bounded wait) the logout's access line is in; debug logging was on
/// and the login was logged.
async fn logs_after_logout(proc: &ProxyProcess) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !proc.logs().contains("/bff/logout") {
        assert!(tokio::time::Instant::now() < deadline, "no access log line");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = proc.logs();
    assert!(logs.contains("\"level\":\"DEBUG\""), "debug logging is on");
    assert!(logs.contains("login complete"), "the login was logged");
    logs
}

fn assert_logs_hold_none_of(logs: &str, secrets: &[(&str, String)]) {
    for (what, s) in secrets {
        for n in needles(s) {
            assert!(!logs.contains(&n), "the logs contain the {what}:\n{logs}");
        }
    }
}

/// No response the browser saw holds one of `secrets`, and only the last (the end-session
/// redirect) holds the ID token.
fn assert_browser_saw_none_of(seen: &Seen, secrets: &[(&str, String)], id_token: &str) {
    for response in &seen.0 {
        for (what, s) in secrets {
            for n in needles(s) {
                assert!(
                    !response.contains(&n),
                    "the browser saw the {what}:\n{response}"
                );
            }
        }
    }
    // The ID token only in the end-session redirect.
    for response in &seen.0[..seen.0.len() - 1] {
        for n in needles(id_token) {
            assert!(
                !response.contains(&n),
                "the browser saw the ID token:\n{response}"
            );
        }
    }
}

#[tokio::test]
async fn no_token_code_verifier_or_secret_reaches_the_logs_or_the_browser() {
    let dir = TempDir::new("leak");
    let state_file = dir.join("idp-state.json");
    let env = Env::start(EnvOptions {
        idp: IdpOptions {
            state_file: Some(state_file.clone()),
            ..IdpOptions::default()
        },
        ..EnvOptions::default()
    })
    .await;
    let proc = start_debug_binary(&env).await;

    let mut b = browser(proc.addr);
    let mut seen = Seen::default();
    let login = log_in_recorded(&mut b, &mut seen, &state_file).await;
    let (access_token, user) = call_api_recorded(&env, &mut b, &mut seen).await;
    let id_token = log_out_recorded(&env, &mut b, &mut seen, &user).await;
    let secrets = LoginSecrets {
        login,
        access_token,
        id_token,
    };

    let logs = logs_after_logout(&proc).await;
    assert_logs_hold_none_of(&logs, &secrets.for_the_logs());
    assert_browser_saw_none_of(&seen, &secrets.for_the_browser(), &secrets.id_token);
}
