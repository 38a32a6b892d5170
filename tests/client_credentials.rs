//! Machine tokens (`auth = "client"`, issue 10) against the real provider: coatcheck's own
//! client-credentials token, cached per scope/audience set, fetched single-flight, renewed near
//! expiry, kept through a provider outage while valid, and never mixed with a browser's credentials.

#[path = "support/bff.rs"]
mod bff;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use bff::{Env, EnvOptions, ORIGIN};
use serde_json::{Value, json};
use support::idp::{DEFAULT_AUDIENCE, IdpOptions, USERS};

/// Access tokens live this long in the tests that wait for expiry; the 2 s margin of
/// `refresh_before_expiry` is then also half the lifetime.
const SHORT_TTL: u64 = 4;
const REPORTS_AUDIENCE: &str = "urn:coatcheck:reports";

/// `/machine/` and `/machine-too/` ask for the same set, `/writer/` and `/reports/` each for another;
/// `/open/` shares `/machine/`'s set with `csrf = "off"`.
fn routes() -> String {
    let route = |path: &str, extra: &str| {
        format!(
            "[[route]]\npath = \"{path}\"\nupstream = \"{{api}}\"\nauth = \"client\"\n{extra}\n\n"
        )
    };
    [
        route("/machine/", "scopes = [\"read\"]"),
        route("/machine-too/", "scopes = [\"read\", \"read\"]"),
        route("/writer/", "scopes = [\"write\"]"),
        route(
            "/reports/",
            &format!("audience = \"{REPORTS_AUDIENCE}\"\nscopes = [\"read\"]"),
        ),
        route("/open/", "scopes = [\"read\"]\ncsrf = \"off\""),
    ]
    .concat()
}

async fn env(ttl: u64) -> Env {
    let mut idp = IdpOptions::default();
    idp.extra_config
        .insert("api_scopes".into(), json!("api read write"));
    idp.extra_config
        .insert("extra_audiences".into(), json!([REPORTS_AUDIENCE]));
    Env::start(EnvOptions {
        access_token_ttl: ttl,
        routes: routes(),
        idp,
        ..Default::default()
    })
    .await
}

/// A same-origin `fetch` without any session, as a page's script would send it.
fn fetch(env: &Env, client: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
    client
        .get(env.proxy.url(path))
        .header("x-csrf", "1")
        .header("origin", ORIGIN)
}

async fn get(env: &Env, path: &str) -> reqwest::Response {
    fetch(env, &env.proxy.http1(), path).send().await.unwrap()
}

async fn grants(env: &Env) -> u64 {
    env.idp().stats().await["token_requests"]["client_credentials"]
        .as_u64()
        .expect("the provider counts client_credentials grants")
}

/// The `Authorization` the upstream saw on the last request to `path`.
fn authorization_at(env: &Env, path: &str) -> String {
    env.api
        .seen()
        .iter()
        .rev()
        .find(|s| s.path().starts_with(path))
        .unwrap_or_else(|| panic!("the upstream saw no request to {path}"))
        .header("authorization")
        .unwrap_or_else(|| panic!("no Authorization on {path}"))
        .to_owned()
}

/// The claims of a `Bearer <JWT>` value (read only; the provider signed it).
fn claims(authorization: &str) -> Value {
    let jwt = authorization
        .strip_prefix("Bearer ")
        .unwrap_or_else(|| panic!("not a bearer: {authorization}"));
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWS compact token: {jwt}");
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[1])
        .unwrap();
    serde_json::from_slice(&payload).unwrap()
}

#[tokio::test]
async fn the_upstream_receives_coatchecks_own_client_credentials_jwt_without_any_session() {
    let env = env(60).await;
    env.idp().reset_stats().await;
    let r = get(&env, "/machine/report?x=1").await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let c = claims(&authorization_at(&env, "/machine/"));
    assert_eq!(c["client_id"], "coatcheck", "{c}");
    // A client-credentials token names the client itself, never a user.
    assert_eq!(c["sub"], "coatcheck", "{c}");
    assert!(USERS.iter().all(|(u, _, _)| c["sub"] != *u), "{c}");
    assert!(c.get("roles").is_none(), "{c}");
    assert_eq!(c["aud"], DEFAULT_AUDIENCE, "{c}");
    assert_eq!(c["scope"], "read", "{c}");
    assert_eq!(c["iss"], env.idp().issuer, "{c}");
    let stats = env.idp().stats().await;
    assert_eq!(stats["token_requests"]["client_credentials"], 1, "{stats}");
    assert_eq!(stats["token_requests"]["authorization_code"], 0, "{stats}");
    assert_eq!(stats["client_credentials_failures"], 0, "{stats}");
    // No session was made: the answer sets no cookie.
    let r = get(&env, "/machine/again").await;
    assert!(r.headers().get("set-cookie").is_none());
    assert_eq!(grants(&env).await, 1, "the token is cached");
}

#[tokio::test]
async fn a_hundred_concurrent_requests_cause_exactly_one_grant() {
    let env = env(60).await;
    env.idp().reset_stats().await;
    let clients = [env.proxy.http1(), env.proxy.http2()];
    let mut tasks = Vec::new();
    for i in 0..100 {
        let req = fetch(&env, &clients[i % 2], &format!("/machine/burst/{i}"));
        tasks.push(tokio::spawn(async move {
            req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(grants(&env).await, 1, "one grant for 100 requests");
    let tokens: HashSet<String> = env
        .api
        .seen()
        .iter()
        .filter_map(|s| s.header("authorization").map(str::to_owned))
        .collect();
    assert_eq!(tokens.len(), 1, "every request carried the one token");
}

#[tokio::test]
async fn the_token_is_renewed_once_it_is_within_the_margin_of_its_expiry() {
    let env = env(SHORT_TTL).await;
    env.idp().reset_stats().await;
    assert_eq!(get(&env, "/machine/1").await.status(), 200);
    let first = authorization_at(&env, "/machine/");
    let c = claims(&first);
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        SHORT_TTL
    );
    // Well before the margin (2 s before expiry): the cached token.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(get(&env, "/machine/2").await.status(), 200);
    assert_eq!(authorization_at(&env, "/machine/"), first);
    assert_eq!(grants(&env).await, 1);
    // Inside the margin: a second grant, and the upstream gets the new token.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(get(&env, "/machine/3").await.status(), 200);
    let second = authorization_at(&env, "/machine/");
    assert_ne!(second, first);
    assert_eq!(grants(&env).await, 2);
    assert_eq!(claims(&second)["client_id"], "coatcheck");
}

#[tokio::test]
async fn routes_with_different_scopes_or_audiences_get_separate_grants_and_tokens() {
    let env = env(60).await;
    env.idp().reset_stats().await;
    for path in ["/machine/a", "/machine-too/b", "/writer/c", "/reports/d"] {
        let r = get(&env, path).await;
        assert_eq!(r.status(), 200, "{path}: {:?}", r.text().await);
    }
    assert_eq!(grants(&env).await, 3, "one grant per scope/audience set");
    let read = authorization_at(&env, "/machine/");
    assert_eq!(
        authorization_at(&env, "/machine-too/"),
        read,
        "the same set shares one token"
    );
    let write = authorization_at(&env, "/writer/");
    let reports = authorization_at(&env, "/reports/");
    assert_ne!(write, read);
    assert_ne!(reports, read);
    assert_eq!(claims(&read)["scope"], "read");
    assert_eq!(claims(&write)["scope"], "write");
    assert_eq!(claims(&write)["aud"], DEFAULT_AUDIENCE);
    assert_eq!(claims(&reports)["aud"], REPORTS_AUDIENCE);
    assert_eq!(claims(&reports)["scope"], "read");
    // Each keeps its own token afterwards.
    get(&env, "/writer/again").await;
    get(&env, "/machine/again").await;
    assert_eq!(authorization_at(&env, "/writer/"), write);
    assert_eq!(authorization_at(&env, "/machine/"), read);
    assert_eq!(grants(&env).await, 3);
}

#[tokio::test]
async fn during_a_provider_outage_a_valid_token_is_kept_and_without_one_the_answer_is_503() {
    let env = env(SHORT_TTL).await;
    assert_eq!(get(&env, "/machine/before").await.status(), 200);
    let cached = authorization_at(&env, "/machine/");
    env.idp().reset_stats().await;
    env.idp().set_outage("down").await;
    // Due for renewal, the provider is down, the token still valid: it keeps serving.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let r = get(&env, "/machine/during").await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(authorization_at(&env, "/machine/"), cached);
    // A set that never had a token: 503 idp_unavailable with Retry-After, nothing forwarded.
    let forwarded = env.api.seen().len();
    let r = get(&env, "/writer/during").await;
    let retry_after = r.headers().get("retry-after").cloned();
    support::expect_json_error(r, 503, "idp_unavailable").await;
    assert_eq!(retry_after.unwrap().to_str().unwrap(), "5");
    // Once the cached token has expired: 503 as well.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let r = get(&env, "/machine/expired").await;
    assert!(r.headers().contains_key("retry-after"));
    support::expect_json_error(r, 503, "idp_unavailable").await;
    assert_eq!(
        env.api.seen().len(),
        forwarded,
        "nothing reached the upstream"
    );
    // The provider is back: after Retry-After a new token is fetched.
    env.idp().set_outage("off").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let r = get(&env, "/machine/after").await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_ne!(authorization_at(&env, "/machine/"), cached);
    assert!(grants(&env).await >= 1);
}

#[tokio::test]
async fn the_browsers_authorization_and_session_cookie_never_reach_the_upstream() {
    let env = env(60).await;
    let browser = env.logged_in("alice").await;
    let session = browser.session_cookie().expect("logged in").clone();
    let r = browser
        .api(reqwest::Method::POST, "/machine/submit")
        .header("authorization", "Bearer the-browsers-own-token")
        .header(
            "cookie",
            format!(
                "{}; theme=dark",
                browser.cookie_header().unwrap().to_str().unwrap()
            ),
        )
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let seen = env.api.last().unwrap();
    let auth = seen.header("authorization").unwrap();
    assert!(!auth.contains("the-browsers-own-token"));
    let c = claims(auth);
    assert_eq!(c["sub"], "coatcheck", "not alice's token: {c}");
    assert_eq!(c["client_id"], "coatcheck");
    let cookies = seen.header("cookie").unwrap_or_default();
    assert!(!cookies.contains("__Host-coatcheck"), "{cookies}");
    assert!(!cookies.contains(&session), "{cookies}");
    assert!(
        cookies.contains("theme=dark"),
        "other cookies pass: {cookies}"
    );
}

#[tokio::test]
async fn machine_token_routes_need_the_csrf_header_unless_the_route_relaxes_it() {
    let env = env(60).await;
    env.idp().reset_stats().await;
    let client = env.proxy.http1();
    let r = client
        .get(env.proxy.url("/machine/no-header"))
        .send()
        .await
        .unwrap();
    support::expect_json_error(r, 403, "csrf").await;
    let r = client
        .get(env.proxy.url("/machine/cross"))
        .header("x-csrf", "1")
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    support::expect_json_error(r, 403, "csrf").await;
    assert_eq!(grants(&env).await, 0, "a refused request costs no grant");
    assert!(env.api.seen().is_empty());
    // csrf = "off": a server-side caller without the header is served.
    let r = client
        .get(env.proxy.url("/open/server-to-server"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(claims(&authorization_at(&env, "/open/"))["scope"], "read");
}
