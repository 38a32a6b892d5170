//! A small scriptable OpenID Provider for the ID-token failures the real one never issues
//! (`alg: none`, key confusion, foreign keys in headers, wrong claims).
//!
//! Plain hyper on `127.0.0.1:0`: discovery (issuer = its own `http://127.0.0.1:PORT`), `/jwks`
//! with the published keys, `/token` answering with whatever ID token the test scripted (and
//! counting calls), and `/attacker/*`, where an attacker's keys sit for a `jku`/`x5u` header to point
//! at (a correct relying party never fetches them). `/authorize` is never visited: tests read
//! `state` and `nonce` from the `Location` that `/bff/login` answers.
//!
//! Use it with `#[path = "support/stub_idp.rs"] mod stub_idp;`.
#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// `kid`s of the keys in a [`SigningKeys`] set.
pub const KID_ES256: &str = "ec-p256";
pub const KID_ES384: &str = "ec-p384";
pub const KID_RS256: &str = "rsa-2048";

/// One key of each kind the tests sign with.
pub struct SigningKeys {
    /// P-256 key pair (PKCS#8) for ES256.
    pub es256: EcdsaKeyPair,
    pub es256_pkcs8: Vec<u8>,
    /// P-384 key pair for ES384.
    pub es384: EcdsaKeyPair,
    /// RSA-2048 key pair for RS256.
    pub rs256: RsaKeyPair,
}

impl SigningKeys {
    pub fn generate() -> SigningKeys {
        let rng = SystemRandom::new();
        let p256 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let p384 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).unwrap();
        SigningKeys {
            es256: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, p256.as_ref())
                .unwrap(),
            es256_pkcs8: p256.as_ref().to_vec(),
            es384: EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, p384.as_ref())
                .unwrap(),
            rs256: RsaKeyPair::generate(KeySize::Rsa2048).unwrap(),
        }
    }

    /// The public P-256 key as a JWK.
    pub fn es256_jwk(&self) -> Value {
        ec_jwk(&self.es256, "P-256", KID_ES256, "ES256")
    }

    /// The public key set, each with `kid`, `alg` and `use`.
    pub fn jwks(&self) -> Value {
        let rsa = self.rs256.public_key();
        json!({"keys": [
            self.es256_jwk(),
            ec_jwk(&self.es384, "P-384", KID_ES384, "ES384"),
            {
                "kty": "RSA",
                "kid": KID_RS256,
                "alg": "RS256",
                "use": "sig",
                "n": b64(rsa.modulus().big_endian_without_leading_zero()),
                "e": b64(rsa.exponent().big_endian_without_leading_zero()),
            },
        ]})
    }

    /// The P-256 public key as a PEM `PUBLIC KEY` (what a key-confusion attacker uses as an HMAC
    /// secret).
    pub fn es256_public_pem(&self) -> String {
        // SubjectPublicKeyInfo for id-ecPublicKey / prime256v1, then the uncompressed point.
        let mut der = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        der.extend_from_slice(self.es256.public_key().as_ref());
        pem("PUBLIC KEY", &der)
    }

    /// The RSA public key as a PEM `RSA PUBLIC KEY` (PKCS#1).
    pub fn rs256_public_pem(&self) -> String {
        pem("RSA PUBLIC KEY", self.rs256.public_key().as_ref())
    }

    /// A compact JWS over `header` and `claims`, signed as `header.alg` says with this set's key of
    /// that kind (`none`: empty signature).
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let rng = SystemRandom::new();
        let sig = match header["alg"].as_str().unwrap() {
            "ES256" => self
                .es256
                .sign(&rng, input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            "ES384" => self
                .es384
                .sign(&rng, input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            "RS256" => {
                let mut sig = vec![0; self.rs256.public_modulus_len()];
                self.rs256
                    .sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut sig)
                    .unwrap();
                sig
            }
            "none" => Vec::new(),
            other => panic!("SigningKeys::sign does not do {other}; use hs256"),
        };
        format!("{input}.{}", b64(&sig))
    }
}

/// A compact JWS with `alg: HS256`-style MAC under `secret` (whatever `header` claims).
pub fn hs256(header: &Value, claims: &Value, secret: &[u8]) -> String {
    use aws_lc_rs::hmac;
    let input = signing_input(header, claims);
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

fn ec_jwk(key: &EcdsaKeyPair, crv: &str, kid: &str, alg: &str) -> Value {
    // Uncompressed point: 0x04 ‖ x ‖ y.
    let point = key.public_key().as_ref();
    let n = (point.len() - 1) / 2;
    json!({
        "kty": "EC",
        "crv": crv,
        "kid": kid,
        "alg": alg,
        "use": "sig",
        "x": b64(&point[1..1 + n]),
        "y": b64(&point[1 + n..]),
    })
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// base64url without padding.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// One token request as it arrived.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub authorization: Option<String>,
    /// The form fields.
    pub form: Vec<(String, String)>,
}

impl TokenRequest {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the tests script and observe.
#[derive(Default)]
pub struct Script {
    /// The `id_token` of the next token responses (`None`: the answer has none).
    pub id_token: Mutex<Option<String>>,
    pub token_requests: Mutex<Vec<TokenRequest>>,
    pub jwks_fetches: AtomicUsize,
    /// Requests to `/attacker/*` (must stay 0).
    pub attacker_fetches: AtomicUsize,
    /// `expires_in` of the token responses (0: 60 s).
    pub expires_in: AtomicU64,
    /// Discovery advertises `authorization_response_iss_parameter_supported` (RFC 9207).
    pub iss_parameter_supported: std::sync::atomic::AtomicBool,
    /// Discovery requests served.
    pub discovery_fetches: AtomicUsize,
}

/// The running stub.
pub struct StubIdp {
    /// `http://127.0.0.1:PORT`
    pub issuer: String,
    pub port: u16,
    /// Published at `/jwks`.
    pub keys: Arc<SigningKeys>,
    /// Published only at `/attacker/jwks` (never referenced by discovery).
    pub attacker: Arc<SigningKeys>,
    pub script: Arc<Script>,
    accept: JoinHandle<()>,
}

impl Drop for StubIdp {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl StubIdp {
    pub async fn start() -> StubIdp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let issuer = format!("http://127.0.0.1:{port}");
        let (keys, attacker) =
            tokio::task::spawn_blocking(|| (SigningKeys::generate(), SigningKeys::generate()))
                .await
                .unwrap();
        let keys = Arc::new(keys);
        let attacker = Arc::new(attacker);
        let script = Arc::new(Script::default());
        let shared = Arc::new(Shared {
            issuer: issuer.clone(),
            jwks: keys.jwks(),
            attacker_jwks: attacker.jwks(),
            script: script.clone(),
        });
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(req, &shared).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        StubIdp {
            issuer,
            port,
            keys,
            attacker,
            script,
            accept,
        }
    }

    /// Scripts the `id_token` of the next token responses.
    pub fn set_id_token(&self, token: Option<String>) {
        *self.script.id_token.lock().unwrap() = token;
    }

    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.script.token_requests.lock().unwrap().clone()
    }

    pub fn attacker_fetches(&self) -> usize {
        self.script.attacker_fetches.load(Ordering::SeqCst)
    }

    pub fn jwks_fetches(&self) -> usize {
        self.script.jwks_fetches.load(Ordering::SeqCst)
    }
}

struct Shared {
    issuer: String,
    jwks: Value,
    attacker_jwks: Value,
    script: Arc<Script>,
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}

async fn handle(req: Request<Incoming>, s: &Shared) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/.well-known/openid-configuration") => {
            s.script.discovery_fetches.fetch_add(1, Ordering::SeqCst);
            json_response(
                StatusCode::OK,
                &json!({
                    "issuer": s.issuer,
                    "authorization_endpoint": format!("{}/authorize", s.issuer),
                    "token_endpoint": format!("{}/token", s.issuer),
                    "jwks_uri": format!("{}/jwks", s.issuer),
                    "response_types_supported": ["code"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["ES256", "ES384", "RS256"],
                    "code_challenge_methods_supported": ["S256"],
                    "authorization_response_iss_parameter_supported":
                        s.script.iss_parameter_supported.load(Ordering::SeqCst),
                }),
            )
        }
        ("GET", "/jwks") => {
            s.script.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            json_response(StatusCode::OK, &s.jwks)
        }
        ("POST", "/token") => {
            let authorization = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let form = url::form_urlencoded::parse(&body).into_owned().collect();
            s.script.token_requests.lock().unwrap().push(TokenRequest {
                authorization,
                form,
            });
            // Every answer carries new tokens, like a provider with refresh-token rotation.
            let n = s.script.token_requests.lock().unwrap().len() - 1;
            let expires_in = match s.script.expires_in.load(Ordering::SeqCst) {
                0 => 60,
                e => e,
            };
            let mut answer = json!({
                "access_token": format!("at-{n}"),
                "token_type": "Bearer",
                "expires_in": expires_in,
                "refresh_token": format!("rt-{n}"),
            });
            if let Some(t) = s.script.id_token.lock().unwrap().clone() {
                answer["id_token"] = json!(t);
            }
            json_response(StatusCode::OK, &answer)
        }
        (_, p) if p.starts_with("/attacker/") => {
            s.script.attacker_fetches.fetch_add(1, Ordering::SeqCst);
            json_response(StatusCode::OK, &s.attacker_jwks)
        }
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
    }
}
