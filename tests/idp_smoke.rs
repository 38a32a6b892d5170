//! End-to-end checks of the test identity provider (tests/support/idp) and its Rust driver,
//! with this file playing a hand-written relying party: authorization code + PKCE by hand.

#[path = "support/idp.rs"]
mod idp;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use idp::{DEFAULT_AUDIENCE, Idp, IdpClient, IdpOptions, login_via_forms, logout_via_forms};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use url::Url;

const CLIENT_ID: &str = "coatcheck";
const CLIENT_SECRET: &str = "coatcheck-secret";
const REDIRECT_URI: &str = "https://localhost:8443/bff/callback";
const POST_LOGOUT_URI: &str = "https://localhost:8443/";

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn backend() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn random_b64(n: usize) -> String {
    let mut buf = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut buf).unwrap();
    URL_SAFE_NO_PAD.encode(buf)
}

fn s256(verifier: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
    URL_SAFE_NO_PAD.encode(d.as_ref())
}

fn jwt_payload(jwt: &str) -> Value {
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWS compact JWT: {jwt}");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
}

/// A hand-rolled confidential relying party.
struct Rp {
    http: reqwest::Client,
    disco: Value,
}

#[derive(Debug)]
struct Tokens {
    access_token: String,
    id_token: String,
    refresh_token: String,
}

impl Rp {
    async fn new(idp: &Idp) -> Rp {
        let http = backend();
        let disco: Value = http
            .get(idp.discovery_url())
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(disco["issuer"], idp.issuer.as_str());
        Rp { http, disco }
    }

    fn endpoint(&self, name: &str) -> String {
        self.disco[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in discovery"))
            .to_string()
    }

    /// Runs the whole browser part of the code flow and the code exchange.
    async fn login(&self, user: &str, password: &str) -> Tokens {
        let verifier = random_b64(32);
        let state = random_b64(16);
        let nonce = random_b64(16);
        let mut auth = Url::parse(&self.endpoint("authorization_endpoint")).unwrap();
        auth.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", CLIENT_ID)
            .append_pair("redirect_uri", REDIRECT_URI)
            .append_pair("scope", "openid profile email")
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &s256(&verifier))
            .append_pair("code_challenge_method", "S256");

        let callback = login_via_forms(&browser(), auth.as_str(), user, password)
            .await
            .expect("login via forms");
        assert!(callback.starts_with(REDIRECT_URI), "{callback}");
        let cb = Url::parse(&callback).unwrap();
        let param = |k: &str| {
            cb.query_pairs()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.into_owned())
        };
        assert_eq!(param("state").as_deref(), Some(state.as_str()));
        assert_eq!(param("iss").as_deref(), self.disco["issuer"].as_str());
        let code = param("code").unwrap_or_else(|| panic!("no code in {callback}"));

        let resp = self
            .http
            .post(self.endpoint("token_endpoint"))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT_URI),
                ("code_verifier", &verifier),
            ])
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        let id_token = body["id_token"].as_str().expect("id_token").to_string();
        assert_eq!(jwt_payload(&id_token)["nonce"], nonce.as_str());
        Tokens {
            access_token: body["access_token"]
                .as_str()
                .expect("access_token")
                .to_string(),
            id_token,
            refresh_token: body["refresh_token"]
                .as_str()
                .expect("refresh_token")
                .to_string(),
        }
    }

    /// Returns (HTTP status, JSON body).
    async fn refresh(&self, refresh_token: &str) -> (u16, Value) {
        let resp = self
            .http
            .post(self.endpoint("token_endpoint"))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ])
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }
}

#[tokio::test]
async fn a_user_logs_in_through_the_html_forms_and_gets_an_id_token_a_jwt_access_token_and_a_refresh_token()
 {
    let idp = Idp::start(IdpOptions::default()).await;
    let rp = Rp::new(&idp).await;
    assert_eq!(
        rp.disco["code_challenge_methods_supported"],
        serde_json::json!(["S256"])
    );

    let tokens = rp.login("alice", "alice-pw").await;

    let id = jwt_payload(&tokens.id_token);
    assert_eq!(id["sub"], "alice");
    assert_eq!(id["aud"], CLIENT_ID);
    assert_eq!(id["iss"], idp.issuer.as_str());
    assert_eq!(id["roles"], serde_json::json!(["user"]));
    assert_eq!(id["email"], "alice@example.test");
    assert_eq!(id["email_verified"], true);
    assert!(id["name"].is_string());

    let at = jwt_payload(&tokens.access_token);
    let aud_ok = match &at["aud"] {
        Value::String(s) => s == DEFAULT_AUDIENCE,
        Value::Array(a) => a.iter().any(|v| v == DEFAULT_AUDIENCE),
        _ => false,
    };
    assert!(aud_ok, "access token aud: {at}");
    assert_eq!(at["sub"], "alice");
    assert_eq!(at["client_id"], CLIENT_ID);
    assert_eq!(at["roles"], serde_json::json!(["user"]));
    let ttl = at["exp"].as_i64().unwrap() - at["iat"].as_i64().unwrap();
    assert_eq!(ttl, 60);
    assert!(!tokens.refresh_token.is_empty());

    let stats = idp.stats().await;
    assert_eq!(stats["token_requests"]["authorization_code"], 1, "{stats}");
    assert_eq!(stats["token_requests"]["refresh_token"], 0, "{stats}");
}

#[tokio::test]
async fn the_admin_account_carries_both_roles() {
    let idp = Idp::start(IdpOptions::default()).await;
    let rp = Rp::new(&idp).await;
    let tokens = rp.login("admin", "admin-pw").await;
    assert_eq!(
        jwt_payload(&tokens.id_token)["roles"],
        serde_json::json!(["admin", "user"])
    );
}

#[tokio::test]
async fn a_wrong_password_shows_the_login_form_again() {
    let idp = Idp::start(IdpOptions::default()).await;
    let rp = Rp::new(&idp).await;
    let mut auth = Url::parse(&rp.endpoint("authorization_endpoint")).unwrap();
    auth.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", CLIENT_ID)
        .append_pair("redirect_uri", REDIRECT_URI)
        .append_pair("scope", "openid")
        .append_pair("state", "s")
        .append_pair("code_challenge", &s256(&random_b64(32)))
        .append_pair("code_challenge_method", "S256");

    let err = login_via_forms(&browser(), auth.as_str(), "alice", "not-alices-password")
        .await
        .unwrap_err();
    assert!(err.contains("Invalid username or password"), "{err}");

    // The same by hand: the POST answers 200 with the login form again.
    let b = browser();
    let resp = b.get(auth.as_str()).send().await.unwrap();
    assert_eq!(resp.status(), 303);
    let interaction = Url::parse(&idp.issuer)
        .unwrap()
        .join(resp.headers()["location"].to_str().unwrap())
        .unwrap();
    let page = b
        .get(interaction.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let form = idp::parse_forms(&page)
        .into_iter()
        .next()
        .expect("login form");
    let resp = b
        .post(interaction.join(&form.action).unwrap())
        .form(&[("login", "nobody"), ("password", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let page = resp.text().await.unwrap();
    assert!(page.contains("name=\"password\""), "{page}");
    assert!(page.contains("Invalid username or password"), "{page}");
    assert_eq!(idp.stats().await["login_failures"], 2);
}

#[tokio::test]
async fn refreshing_rotates_the_refresh_token_and_replaying_a_spent_one_revokes_the_grant() {
    let idp = Idp::start(IdpOptions::default()).await;
    let rp = Rp::new(&idp).await;
    let tokens = rp.login("alice", "alice-pw").await;
    idp.reset_stats().await;

    let (status, body) = rp.refresh(&tokens.refresh_token).await;
    assert_eq!(status, 200, "{body}");
    let rotated = body["refresh_token"]
        .as_str()
        .expect("rotated refresh token")
        .to_string();
    assert_ne!(rotated, tokens.refresh_token);
    assert_eq!(body["access_token"].as_str().unwrap().split('.').count(), 3);
    assert_eq!(
        jwt_payload(body["access_token"].as_str().unwrap())["aud"],
        DEFAULT_AUDIENCE
    );
    assert!(body["id_token"].is_string(), "{body}");

    let stats = idp.stats().await;
    assert_eq!(stats["token_requests"]["refresh_token"], 1, "{stats}");
    assert_eq!(stats["token_requests"]["authorization_code"], 0, "{stats}");
    assert_eq!(stats["refresh_token_failures"], 0, "{stats}");

    // Replay of the spent token: invalid_grant, and the whole grant goes with it.
    let (status, body) = rp.refresh(&tokens.refresh_token).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    let (status, body) = rp.refresh(&rotated).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");

    let stats = idp.stats().await;
    assert_eq!(stats["token_requests"]["refresh_token"], 3, "{stats}");
    assert_eq!(stats["refresh_token_failures"], 2, "{stats}");
    assert_eq!(stats["grants_revoked"], 1, "{stats}");
}

#[tokio::test]
async fn revoking_a_users_grants_makes_the_next_refresh_fail() {
    let idp = Idp::start(IdpOptions::default()).await;
    let rp = Rp::new(&idp).await;
    let alice = rp.login("alice", "alice-pw").await;
    let bob = rp.login("bob", "bob-pw").await;

    assert_eq!(idp.revoke_grants("alice").await, 1);
    assert_eq!(idp.revoke_grants("alice").await, 0);

    let (status, body) = rp.refresh(&alice.refresh_token).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    let (status, body) = rp.refresh(&bob.refresh_token).await;
    assert_eq!(status, 200, "{body}");

    let stats = idp.stats().await;
    assert_eq!(stats["grants_revoked"], 1, "{stats}");
    assert_eq!(stats["refresh_token_failures"], 1, "{stats}");
}

#[tokio::test]
async fn a_revoked_refresh_token_no_longer_refreshes_and_client_secret_post_is_accepted() {
    let idp = Idp::start(IdpOptions::default()).await;
    let rp = Rp::new(&idp).await;
    let tokens = rp.login("bob", "bob-pw").await;

    let resp = rp
        .http
        .post(rp.endpoint("revocation_endpoint"))
        .form(&[
            ("token", tokens.refresh_token.as_str()),
            ("token_type_hint", "refresh_token"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let (status, body) = rp.refresh(&tokens.refresh_token).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    let stats = idp.stats().await;
    assert_eq!(stats["revocations"], 1, "{stats}");
    assert_eq!(stats["grants_revoked"], 1, "{stats}");
}

#[tokio::test]
async fn an_outage_answers_503_until_it_is_switched_off() {
    let idp = Idp::start(IdpOptions::default()).await;
    let http = backend();

    idp.set_outage("error").await;
    let resp = http.get(idp.discovery_url()).send().await.unwrap();
    assert_eq!(resp.status(), 503);

    idp.set_outage("down").await;
    assert!(http.get(idp.discovery_url()).send().await.is_err());

    idp.set_outage("slow").await;
    let quick = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let err = quick.get(idp.discovery_url()).send().await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    // The control endpoints keep working during an outage.
    assert!(idp.stats().await.is_object());

    idp.set_outage("off").await;
    let resp = http.get(idp.discovery_url()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn with_a_state_file_a_refresh_token_survives_a_restart_on_the_same_port() {
    let dir = std::env::temp_dir().join(format!("coatcheck-idp-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("idp-state.json");
    let _ = std::fs::remove_file(&state);

    let mut idp = Idp::start(IdpOptions {
        state_file: Some(state.clone()),
        ..IdpOptions::default()
    })
    .await;
    let rp = Rp::new(&idp).await;
    let tokens = rp.login("alice", "alice-pw").await;
    let jwks_before: Value = rp
        .http
        .get(rp.endpoint("jwks_uri"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (issuer, port) = (idp.issuer.clone(), idp.port);

    idp.stop().await;
    assert!(
        rp.http.get(idp.discovery_url()).send().await.is_err(),
        "IdP still answering after stop"
    );
    idp.restart().await;
    assert_eq!((idp.issuer.as_str(), idp.port), (issuer.as_str(), port));

    let jwks_after: Value = rp
        .http
        .get(rp.endpoint("jwks_uri"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        jwks_before, jwks_after,
        "signing keys must survive the restart"
    );
    let kinds: Vec<&str> = jwks_after["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kty"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["RSA", "EC"]);
    assert!(
        jwks_after["keys"][0].get("d").is_none(),
        "no private key material in the JWKS"
    );

    let (status, body) = rp.refresh(&tokens.refresh_token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        jwt_payload(body["access_token"].as_str().unwrap())["sub"],
        "alice"
    );

    idp.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Accepts one HTTP request on 127.0.0.1, answers 200 and hands back its body.
async fn one_shot_http_server() -> (String, tokio::task::JoinHandle<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!(
        "http://{}/bff/backchannel-logout",
        listener.local_addr().unwrap()
    );
    let task = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed early");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(head_end) = text.find("\r\n\r\n") {
                let len = text[..head_end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= head_end + 4 + len {
                    sock.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await
                    .unwrap();
                    return text[head_end + 4..].to_string();
                }
            }
        }
    });
    (uri, task)
}

/// Logs alice in with browser `b` (scope `openid` only, no nonce) and exchanges the code by hand;
/// returns `(id_token, refresh_token)`.
async fn login_for_logout(rp: &Rp, b: &reqwest::Client) -> (String, String) {
    let verifier = random_b64(32);
    let mut auth = Url::parse(&rp.endpoint("authorization_endpoint")).unwrap();
    auth.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", CLIENT_ID)
        .append_pair("redirect_uri", REDIRECT_URI)
        .append_pair("scope", "openid")
        .append_pair("state", "s1")
        .append_pair("code_challenge", &s256(&verifier))
        .append_pair("code_challenge_method", "S256");
    let cb = Url::parse(
        &login_via_forms(b, auth.as_str(), "alice", "alice-pw")
            .await
            .unwrap(),
    )
    .unwrap();
    let code = cb
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let body: Value = rp
        .http
        .post(rp.endpoint("token_endpoint"))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT_URI),
            ("code_verifier", &verifier),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id_token = body["id_token"].as_str().unwrap().to_string();
    let refresh_token = body["refresh_token"].as_str().unwrap().to_string();
    (id_token, refresh_token)
}

/// Ends the provider session of browser `b` by RP-initiated logout, confirming the form, and
/// checks it came back to the post-logout URI with its state.
async fn end_session(rp: &Rp, b: &reqwest::Client, id_token: &str) {
    let mut end = Url::parse(&rp.endpoint("end_session_endpoint")).unwrap();
    end.query_pairs_mut()
        .append_pair("id_token_hint", id_token)
        .append_pair("post_logout_redirect_uri", POST_LOGOUT_URI)
        .append_pair("state", "bye");
    let after = logout_via_forms(b, end.as_str()).await.unwrap();
    assert_eq!(after, format!("{POST_LOGOUT_URI}?state=bye"));
}

/// The claims of the `logout_token` in the form body the back-channel endpoint received.
async fn received_logout_claims(received: tokio::task::JoinHandle<String>) -> Value {
    let form = tokio::time::timeout(Duration::from_secs(5), received)
        .await
        .unwrap()
        .unwrap();
    let logout_token = url::form_urlencoded::parse(form.as_bytes())
        .find(|(k, _)| k == "logout_token")
        .expect("logout_token form field")
        .1
        .into_owned();
    jwt_payload(&logout_token)
}

#[tokio::test]
async fn rp_initiated_logout_confirms_by_form_post_and_sends_a_back_channel_logout_token() {
    let (bcl_uri, received) = one_shot_http_server().await;
    let idp = Idp::start(IdpOptions {
        clients: vec![IdpClient {
            backchannel_logout_uri: Some(bcl_uri),
            ..IdpClient::default()
        }],
        ..IdpOptions::default()
    })
    .await;
    let rp = Rp::new(&idp).await;
    assert_eq!(rp.disco["backchannel_logout_supported"], true);

    // Log in with a browser whose IdP session we then end.
    let b = browser();
    let (id_token, refresh_token) = login_for_logout(&rp, &b).await;
    let sid = jwt_payload(&id_token)["sid"]
        .as_str()
        .expect("sid in id_token")
        .to_string();

    end_session(&rp, &b, &id_token).await;

    let claims = received_logout_claims(received).await;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["sid"], sid.as_str());
    assert_eq!(claims["aud"], CLIENT_ID);
    assert!(
        claims["events"]["http://schemas.openid.net/event/backchannel-logout"].is_object(),
        "{claims}"
    );

    let stats = idp.stats().await;
    assert_eq!(stats["backchannel_logouts_sent"], 1, "{stats}");
    assert_eq!(stats["end_sessions"], 1, "{stats}");

    // Logging out at the IdP also revoked the grant behind the refresh token.
    let (status, _) = rp.refresh(&refresh_token).await;
    assert_eq!(status, 400);
}
