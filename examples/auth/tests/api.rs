//! `auth` over real sockets, with a real SQLite file in a fresh directory
//! per test: the token endpoint, the key set, rotation, restarts, and the
//! binary as operators run it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use auth::{HashCost, Settings};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use bytes::Bytes;
use chassis::{
    auth::{PrincipalKind, Verifier},
    config::Config,
    testing::ServiceProcess,
};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use jsonwebtoken::Algorithm;
use serde_json::Value;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

const FORM: &str = "application/x-www-form-urlencoded";
const ALICE_GRANTS: [&str; 2] = ["ticketing:acme:*:*", "orders:acme:*:*"];
const ORDERS_GRANTS: [&str; 3] = [
    "ticketing:*:reserve:ticket",
    "ticketing:*:view:ticket",
    "mail::send:message",
];

// === helpers ===

/// A data directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("auth-test-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A response read to the end.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client
        .request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .expect("request failed");
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn basic(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

/// Decodes a JWT's header and claims (no verification).
fn decode(token: &str) -> (Value, Value) {
    let mut parts = token.split('.');
    let mut part =
        || serde_json::from_slice(&B64URL.decode(parts.next().unwrap()).unwrap()).unwrap();
    (part(), part())
}

/// `auth` serving on 127.0.0.1 at an ephemeral port.
struct Auth {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), chassis::service::ServeError>>>,
}

/// Settings for a test: the demo seed, a cheap hash (the tests check
/// behaviour, not cost) and the service's own URL.
fn settings(dir: &Path) -> Settings {
    let mut s = Settings::with_data_dir(dir);
    s.hash_cost = HashCost {
        memory_kib: 256,
        iterations: 1,
    };
    s
}

async fn start(dir: &Path) -> Auth {
    start_with(dir, |_| {}).await
}

async fn start_with(dir: &Path, tweak: impl FnOnce(&mut Settings)) -> Auth {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut s = settings(dir);
    s.public_url = Some(url.clone());
    tweak(&mut s);
    let service = auth::app(s)
        .await
        .expect("auth starts")
        .config(Config::default())
        .build()
        .expect("auth builds");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(service.serve_with(listener, async move {
        let _ = rx.await;
    }));
    Auth {
        url,
        stop: Some(tx),
        task: Some(task),
    }
}

impl Auth {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    async fn post_form(&self, form: &str, headers: &[(&str, &str)]) -> Answer {
        let mut all = vec![("content-type", FORM)];
        all.extend_from_slice(headers);
        send(Method::POST, &self.url("/auth/v1/token"), &all, form).await
    }

    async fn login(&self, user: &str, password: &str) -> Answer {
        self.post_form(
            &format!("grant_type=password&username={user}&password={password}"),
            &[],
        )
        .await
    }

    /// An access token for `user`, who must exist.
    async fn access_token(&self, user: &str) -> String {
        let res = self.login(user, &format!("{user}-password")).await;
        assert_eq!(res.status, 200, "{res:?}");
        res.json()["access_token"].as_str().unwrap().to_owned()
    }

    async fn refresh(&self, token: &str) -> Answer {
        self.post_form(
            &format!("grant_type=refresh_token&refresh_token={token}"),
            &[],
        )
        .await
    }

    async fn jwks(&self) -> Value {
        let res = send(Method::GET, &self.url("/auth/v1/jwks"), &[], "").await;
        assert_eq!(res.status, 200, "{res:?}");
        res.json()
    }

    async fn kids(&self) -> Vec<String> {
        self.jwks().await["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn rotate(&self, token: Option<&str>) -> Answer {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| vec![("authorization", b)])
            .unwrap_or_default();
        send(
            Method::POST,
            &self.url("/auth/v1/keys/rotate"),
            &headers,
            "",
        )
        .await
    }

    /// A chassis verifier configured as the other services are.
    fn verifier(&self) -> Verifier {
        Verifier::builder()
            .jwks(
                "http://127.0.0.1:8081",
                "chassis-demo",
                &self.url("/auth/v1/jwks"),
            )
            .algorithms(&[Algorithm::EdDSA])
            .build()
            .unwrap()
    }

    async fn failed_logins(&self, kind: &str) -> u64 {
        let res = send(Method::GET, &self.url("/metrics"), &[], "").await;
        let text = String::from_utf8_lossy(&res.body).into_owned();
        text.lines()
            .find(|l| {
                l.starts_with("auth_failed_logins_total{")
                    && l.contains(&format!("kind=\"{kind}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
    }

    /// Shuts down as a signal would and waits until it has stopped (the
    /// database closed).
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("auth stops")
                .unwrap()
                .unwrap();
        }
    }
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// === the token endpoint ===

#[tokio::test]
async fn password_grant_issues_an_access_and_a_refresh_token() {
    let dir = TempDir::new("password");
    let auth = start(dir.path()).await;
    let res = auth.login("alice", "alice-password").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.header("cache-control"), "no-store");
    assert!(res.header("content-type").starts_with("application/json"));
    let body = res.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    let refresh = body["refresh_token"].as_str().unwrap();
    assert_eq!(B64URL.decode(refresh).unwrap().len(), 32);

    let (header, claims) = decode(body["access_token"].as_str().unwrap());
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["kid"].as_str(), Some(auth.kids().await[0].as_str()));
    assert_eq!(claims["iss"], "http://127.0.0.1:8081");
    assert_eq!(claims["aud"], "chassis-demo");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["kind"], "user");
    assert_eq!(claims["perms"], serde_json::json!(ALICE_GRANTS));
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(claims["nbf"].as_u64(), Some(iat));
    assert_eq!(claims["exp"].as_u64(), Some(iat + 900));
    assert!(!claims["jti"].as_str().unwrap().is_empty());

    // Two logins, two token ids.
    let (_, again) = decode(&auth.access_token("alice").await);
    assert_ne!(again["jti"], claims["jti"]);
    auth.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_user_answer_alike_and_are_counted() {
    let dir = TempDir::new("refused");
    let auth = start(dir.path()).await;
    let before = auth.failed_logins("user").await;
    let wrong = auth.login("alice", "not-her-password").await;
    let unknown = auth.login("mallory", "alice-password").await;
    for res in [&wrong, &unknown] {
        assert_eq!(res.status, 400, "{res:?}");
        assert_eq!(res.header("cache-control"), "no-store");
        assert!(res.header("content-type").starts_with("application/json"));
    }
    assert_eq!(wrong.body, unknown.body, "the same answer for both");
    assert_eq!(
        wrong.json(),
        serde_json::json!({"error": "invalid_grant", "error_description": "invalid username or password"})
    );
    // Other tests in this process may count too: at least these two.
    let after = auth.failed_logins("user").await;
    assert!(after >= before + 2, "{before} -> {after}");
    auth.stop().await;
}

#[tokio::test]
async fn client_credentials_via_basic_and_via_form() {
    let dir = TempDir::new("clients");
    let auth = start(dir.path()).await;
    let orders = basic("orders", "orders-secret");
    let via_basic = auth
        .post_form(
            "grant_type=client_credentials",
            &[("authorization", &orders)],
        )
        .await;
    let via_form = auth
        .post_form(
            "grant_type=client_credentials&client_id=orders&client_secret=orders-secret",
            &[],
        )
        .await;
    for res in [via_basic, via_form] {
        assert_eq!(res.status, 200, "{res:?}");
        assert_eq!(res.header("cache-control"), "no-store");
        let body = res.json();
        assert!(body.get("refresh_token").is_none(), "{body}");
        assert_eq!(body["expires_in"], 900);
        let (_, claims) = decode(body["access_token"].as_str().unwrap());
        assert_eq!(claims["sub"], "orders");
        assert_eq!(claims["kind"], "service");
        assert_eq!(claims["perms"], serde_json::json!(ORDERS_GRANTS));
    }

    // A client without grants gets a token without grants.
    let res = auth
        .post_form(
            "grant_type=client_credentials",
            &[("authorization", &basic("mail", "mail-secret"))],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    let (_, claims) = decode(res.json()["access_token"].as_str().unwrap());
    assert_eq!(claims["perms"], serde_json::json!([]));

    // A scope narrows the token; one beyond the grants is refused.
    let res = auth
        .post_form(
            "grant_type=client_credentials&scope=mail%3A%3Asend%3Amessage",
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    let (_, claims) = decode(res.json()["access_token"].as_str().unwrap());
    assert_eq!(claims["perms"], serde_json::json!(["mail::send:message"]));
    let res = auth
        .post_form(
            "grant_type=client_credentials&scope=orders%3A%2A%3A%2A%3A%2A",
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_scope");
    auth.stop().await;
}

#[tokio::test]
async fn a_client_that_fails_authentication_is_401_invalid_client() {
    let dir = TempDir::new("badclient");
    let auth = start(dir.path()).await;
    let before = auth.failed_logins("service").await;
    let wrong_secret = basic("orders", "guess");
    let wrong_scheme = "Bearer a.b.c".to_owned();
    let cases: [(&str, Vec<(&str, &str)>); 4] = [
        (
            "grant_type=client_credentials",
            vec![("authorization", wrong_secret.as_str())],
        ),
        (
            "grant_type=client_credentials&client_id=nobody&client_secret=orders-secret",
            vec![],
        ),
        ("grant_type=client_credentials", vec![]),
        (
            "grant_type=client_credentials",
            vec![("authorization", wrong_scheme.as_str())],
        ),
    ];
    for (form, headers) in cases {
        let res = auth.post_form(form, &headers).await;
        assert_eq!(res.status, 401, "{form}: {res:?}");
        assert_eq!(res.header("www-authenticate"), "Basic realm=\"auth\"");
        assert_eq!(res.header("cache-control"), "no-store");
        assert_eq!(res.json(), serde_json::json!({"error": "invalid_client"}));
    }
    let after = auth.failed_logins("service").await;
    assert!(after >= before + 2, "{before} -> {after}");
    auth.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_oauth_errors() {
    let dir = TempDir::new("malformed");
    let auth = start(dir.path()).await;
    let cases = [
        (
            "grant_type=authorization_code&code=x",
            "unsupported_grant_type",
        ),
        ("grant_type=implicit", "unsupported_grant_type"),
        ("username=alice&password=alice-password", "invalid_request"),
        ("grant_type=password&username=alice", "invalid_request"),
        ("grant_type=refresh_token", "invalid_request"),
        (
            "grant_type=password&grant_type=password&username=alice&password=alice-password",
            "invalid_request",
        ),
        (
            "grant_type=refresh_token&refresh_token=made-up",
            "invalid_grant",
        ),
    ];
    for (form, error) in cases {
        let res = auth.post_form(form, &[]).await;
        assert_eq!(res.status, 400, "{form}: {res:?}");
        assert_eq!(res.header("cache-control"), "no-store", "{form}");
        let body = res.json();
        assert_eq!(body["error"], error, "{form}: {body}");
        assert!(body["error_description"].is_string(), "{form}: {body}");
    }
    // Not a form.
    let res = send(
        Method::POST,
        &auth.url("/auth/v1/token"),
        &[("content-type", "application/json")],
        r#"{"grant_type":"password"}"#,
    )
    .await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_request");
    assert_eq!(res.header("cache-control"), "no-store");
    // Bytes that are not UTF-8 are refused, not a panic.
    let res = auth
        .post_form("grant_type=password&username=%FF%FE&password=%C3", &[])
        .await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_grant");
    auth.stop().await;
}

#[tokio::test]
async fn refresh_tokens_rotate() {
    let dir = TempDir::new("rotation");
    let auth = start(dir.path()).await;
    let first = auth.login("alice", "alice-password").await.json();
    let r1 = first["refresh_token"].as_str().unwrap().to_owned();

    let res = auth.refresh(&r1).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.header("cache-control"), "no-store");
    let second = res.json();
    let r2 = second["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r1, r2);
    let (_, claims) = decode(second["access_token"].as_str().unwrap());
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["perms"], serde_json::json!(ALICE_GRANTS));
    let principal = auth
        .verifier()
        .verify_token(second["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(principal.subject(), "alice");

    // The newest token goes on working, once each.
    let third = auth.refresh(&r2).await;
    assert_eq!(third.status, 200, "{third:?}");
    let r3 = third.json()["refresh_token"].as_str().unwrap().to_owned();
    let fourth = auth.refresh(&r3).await;
    assert_eq!(fourth.status, 200, "{fourth:?}");

    // A refresh may narrow the login's grants, never widen them.
    let narrowed = auth
        .post_form(
            &format!(
                "grant_type=refresh_token&refresh_token={}&scope=orders%3Aacme%3A%2A%3A%2A",
                fourth.json()["refresh_token"].as_str().unwrap()
            ),
            &[],
        )
        .await;
    assert_eq!(narrowed.status, 200, "{narrowed:?}");
    let (_, claims) = decode(narrowed.json()["access_token"].as_str().unwrap());
    assert_eq!(claims["perms"], serde_json::json!(["orders:acme:*:*"]));
    let widened = auth
        .post_form(
            &format!(
                "grant_type=refresh_token&refresh_token={}&scope=auth%3A%3Arotate%3Akey",
                narrowed.json()["refresh_token"].as_str().unwrap()
            ),
            &[],
        )
        .await;
    assert_eq!(widened.status, 400);
    assert_eq!(widened.json()["error"], "invalid_scope");
    // A refused scope does not use the token up.
    let still = auth
        .refresh(narrowed.json()["refresh_token"].as_str().unwrap())
        .await;
    assert_eq!(still.status, 200, "{still:?}");
    auth.stop().await;
}

#[tokio::test]
async fn reusing_a_refresh_token_revokes_its_family() {
    let dir = TempDir::new("reuse");
    let auth = start(dir.path()).await;
    let r1 = auth.login("alice", "alice-password").await.json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    // Another login: another family, untouched by the reuse below.
    let other = auth.login("alice", "alice-password").await.json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r2 = auth.refresh(&r1).await.json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();

    let reused = auth.refresh(&r1).await;
    assert_eq!(reused.status, 400);
    assert_eq!(reused.header("cache-control"), "no-store");
    assert_eq!(reused.json()["error"], "invalid_grant");

    // The newer token of the family stops working too.
    let newer = auth.refresh(&r2).await;
    assert_eq!(newer.status, 400, "{newer:?}");
    assert_eq!(newer.json()["error"], "invalid_grant");

    let unrelated = auth.refresh(&other).await;
    assert_eq!(unrelated.status, 200, "{unrelated:?}");
    auth.stop().await;
}

#[tokio::test]
async fn concurrent_uses_of_one_refresh_token_let_one_through() {
    let dir = TempDir::new("race");
    let auth = start(dir.path()).await;
    let token = auth.login("bob", "bob-password").await.json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let answers = futures_join(
        (0..4)
            .map(|_| {
                let url = auth.url("/auth/v1/token");
                let form = format!("grant_type=refresh_token&refresh_token={token}");
                tokio::spawn(async move {
                    send(Method::POST, &url, &[("content-type", FORM)], &form)
                        .await
                        .status
                })
            })
            .collect(),
    )
    .await;
    let ok = answers.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(ok, 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::BAD_REQUEST),
        "{answers:?}"
    );
    auth.stop().await;
}

async fn futures_join<T: std::fmt::Debug>(handles: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

// === keys ===

#[tokio::test]
async fn the_key_set_serves_the_current_key_and_tokens_verify_with_the_chassis_verifier() {
    let dir = TempDir::new("jwks");
    let auth = start(dir.path()).await;
    let res = send(Method::GET, &auth.url("/auth/v1/jwks"), &[], "").await;
    assert_eq!(res.status, 200);
    assert!(res.header("cache-control").contains("max-age="));
    let jwks = res.json();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{jwks}");
    let key = &keys[0];
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    assert_eq!(key["alg"], "EdDSA");
    assert_eq!(key["use"], "sig");
    assert_eq!(B64URL.decode(key["x"].as_str().unwrap()).unwrap().len(), 32);
    assert!(key.get("d").is_none(), "no private part: {key}");

    let verifier = auth.verifier();
    let token = auth.access_token("alice").await;
    let principal = verifier.verify_token(&token).await.unwrap();
    assert_eq!(principal.subject(), "alice");
    assert_eq!(principal.kind(), PrincipalKind::User);
    assert_eq!(principal.grants().len(), 2);

    let service = auth
        .post_form(
            "grant_type=client_credentials",
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await
        .json();
    let principal = verifier
        .verify_token(service["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(principal.kind(), PrincipalKind::Service);
    assert_eq!(principal.subject(), "orders");

    // A verifier for another audience refuses them.
    let other = Verifier::builder()
        .jwks(
            "http://127.0.0.1:8081",
            "someone-else",
            &auth.url("/auth/v1/jwks"),
        )
        .algorithms(&[Algorithm::EdDSA])
        .build()
        .unwrap();
    assert_eq!(
        other.verify_token(&token).await.unwrap_err().code(),
        "bad_audience"
    );
    auth.stop().await;
}

#[tokio::test]
async fn rotation_needs_the_permission() {
    let dir = TempDir::new("rotate-authz");
    let auth = start(dir.path()).await;
    let res = auth.rotate(None).await;
    assert_eq!(res.status, 401, "{res:?}");
    assert_eq!(res.header("content-type"), "application/problem+json");

    let alice = auth.access_token("alice").await;
    let res = auth.rotate(Some(&alice)).await;
    assert_eq!(res.status, 403, "{res:?}");
    assert_eq!(res.header("content-type"), "application/problem+json");

    let admin = auth.access_token("admin").await;
    let res = auth.rotate(Some(&admin)).await;
    assert_eq!(res.status, 200, "{res:?}");
    auth.stop().await;
}

#[tokio::test]
async fn rotation_keeps_the_previous_key_published() {
    let dir = TempDir::new("rotate");
    let auth = start(dir.path()).await;
    let first_kid = auth.kids().await[0].clone();
    let before = auth.access_token("alice").await;
    assert_eq!(decode(&before).0["kid"].as_str(), Some(first_kid.as_str()));

    let admin = auth.access_token("admin").await;
    let res = auth.rotate(Some(&admin)).await;
    assert_eq!(res.status, 200, "{res:?}");
    let rotated = res.json();
    let new_kid = rotated["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, first_kid);
    assert_eq!(rotated["previous_kid"].as_str(), Some(first_kid.as_str()));
    assert_eq!(auth.kids().await, [new_kid.clone(), first_kid.clone()]);

    let after = auth.access_token("alice").await;
    assert_eq!(decode(&after).0["kid"].as_str(), Some(new_kid.as_str()));
    let verifier = auth.verifier();
    for token in [&before, &after] {
        assert_eq!(
            verifier.verify_token(token).await.unwrap().subject(),
            "alice"
        );
    }
    // The service accepts tokens signed with the new key on its own route.
    let admin_after = auth.access_token("admin").await;
    let mut answer = auth.rotate(Some(&admin_after)).await;
    // Its own verifier fetches the key set again after an unknown kid
    // within a second; allow for that.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while answer.status == 401 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        answer = auth.rotate(Some(&admin_after)).await;
    }
    assert_eq!(answer.status, 200, "{answer:?}");
    auth.stop().await;
}

#[tokio::test]
async fn keys_rotate_when_due_and_retired_keys_leave_after_the_token_lifetime() {
    let dir = TempDir::new("due");
    let auth = start_with(dir.path(), |s| {
        s.key_rotate = Duration::from_secs(1);
        s.key_check = Duration::from_secs(1);
        s.token_ttl = Duration::from_secs(3600);
    })
    .await;
    let first = auth.kids().await[0].clone();
    eventually("a rotation", || async {
        let kids = auth.kids().await;
        kids[0] != first && kids.contains(&first)
    })
    .await;
    auth.stop().await;

    let dir = TempDir::new("expiry");
    let auth = start_with(dir.path(), |s| s.token_ttl = Duration::from_secs(1)).await;
    let admin = auth.access_token("admin").await;
    assert_eq!(auth.rotate(Some(&admin)).await.status, 200);
    eventually("the retired key to leave the key set", || async {
        auth.kids().await.len() == 1
    })
    .await;
    auth.stop().await;
}

// === restarts ===

#[tokio::test]
async fn keys_and_users_survive_a_restart_and_the_seed_runs_once() {
    let dir = TempDir::new("restart");
    let auth = start(dir.path()).await;
    let kids = auth.kids().await;
    let before = auth.access_token("alice").await;
    auth.stop().await;

    let db = dir.path().join("auth.db");
    let hashes = |db: PathBuf| async move {
        let pool =
            sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(db))
                .await
                .unwrap();
        let users: Vec<(String, String)> =
            sqlx::query_as("SELECT username, password_hash FROM users ORDER BY username")
                .fetch_all(&pool)
                .await
                .unwrap();
        let clients: Vec<(String, String)> =
            sqlx::query_as("SELECT client_id, secret_hash FROM clients ORDER BY client_id")
                .fetch_all(&pool)
                .await
                .unwrap();
        pool.close().await;
        (users, clients)
    };
    let seeded = hashes(db.clone()).await;
    let names = |rows: &[(String, String)]| rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&seeded.0), ["admin", "alice", "bob"]);
    assert_eq!(names(&seeded.1), ["mail", "orders", "ticketing"]);

    // Same data directory, another secret for orders: nothing is reset.
    let auth = start_with(dir.path(), |s| {
        s.demo_secrets.orders = chassis::config::Secret::new("changed".to_owned());
    })
    .await;
    assert_eq!(auth.kids().await, kids, "the same key after a restart");
    let after = auth.access_token("alice").await;
    assert_eq!(decode(&after).0["kid"], decode(&before).0["kid"]);
    assert_eq!(
        auth.verifier()
            .verify_token(&before)
            .await
            .unwrap()
            .subject(),
        "alice"
    );
    let res = auth
        .post_form(
            "grant_type=client_credentials",
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await;
    assert_eq!(res.status, 200, "the first secret still holds: {res:?}");
    auth.stop().await;
    assert_eq!(hashes(db).await, seeded, "no row added or changed");
}

#[tokio::test]
async fn without_the_seed_nobody_can_log_in() {
    let dir = TempDir::new("noseed");
    let auth = start_with(dir.path(), |s| s.seed_demo = false).await;
    let res = auth.login("alice", "alice-password").await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_grant");
    assert_eq!(auth.kids().await.len(), 1, "a key all the same");
    auth.stop().await;
}

// === the driver client ===

#[tokio::test]
async fn the_driver_client_speaks_the_api() {
    use auth::client::{AuthClient, token_source};
    use chassis::client::{CallContext, Downstream};

    let dir = TempDir::new("client");
    let auth = start(dir.path()).await;
    let client = AuthClient::new(Downstream::builder("auth", &auth.url).build().unwrap());
    let cx = CallContext::background();

    let tokens = client
        .password_login(&cx, "alice", "alice-password")
        .await
        .unwrap();
    assert_eq!(tokens.token_type, "Bearer");
    let refresh = tokens.refresh_token.clone().unwrap();
    let renewed = client.refresh(&cx, &refresh).await.unwrap();
    assert_ne!(renewed.refresh_token.as_deref(), Some(refresh.as_str()));
    let err = client.refresh(&cx, &refresh).await.unwrap_err();
    assert_eq!(err.oauth_error(), Some("invalid_grant"));
    let err = client
        .password_login(&cx, "alice", "wrong")
        .await
        .unwrap_err();
    assert_eq!(err.oauth_error(), Some("invalid_grant"));

    let jwks = client.jwks(&cx).await.unwrap();
    assert_eq!(jwks.keys.len(), 1);
    assert_eq!(jwks.keys[0].key_use, "sig");

    // Rotation on behalf of a caller, who must hold the grant.
    let verifier = auth.verifier();
    let admin = client
        .password_login(&cx, "admin", "admin-password")
        .await
        .unwrap();
    let principal = verifier.verify_token(&admin.access_token).await.unwrap();
    let rotated = client
        .rotate_key(&cx.clone().with_principal(principal))
        .await
        .unwrap();
    assert_eq!(
        rotated.previous_kid.as_deref(),
        Some(jwks.keys[0].kid.as_str())
    );

    // A service's own tokens, signed with the new key: a fresh verifier
    // (one that fetched the set within its 30 s cooldown would answer
    // unknown_kid until it may fetch again).
    let verifier = auth.verifier();
    let tokens = token_source(
        &auth.url,
        "orders",
        chassis::config::Secret::new("orders-secret".to_owned()),
    )
    .unwrap();
    let header = tokens.authorization().await.unwrap();
    let bearer = header.to_str().unwrap().strip_prefix("Bearer ").unwrap();
    let principal = verifier.verify_token(bearer).await.unwrap();
    assert_eq!(principal.subject(), "orders");
    let refused = token_source(
        &auth.url,
        "orders",
        chassis::config::Secret::new("nope".to_owned()),
    )
    .unwrap()
    .authorization()
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("invalid_client"), "{refused}");
    assert!(!refused.to_string().contains("nope"));
    auth.stop().await;
}

// === the binary ===

/// Starts the `auth` binary on the data in `data_dir`.
fn spawn(data_dir: &Path, env: &[(&str, &str)]) -> ServiceProcess {
    let data = data_dir.to_str().expect("a UTF-8 path").to_owned();
    let mut all = vec![
        ("CHASSIS_SHUTDOWN_GRACE_SECS", "5"),
        ("AUTH_DATA_DIR", data.as_str()),
    ];
    all.extend_from_slice(env);
    ServiceProcess::spawn(env!("CARGO_BIN_EXE_auth"), &all)
}

#[tokio::test]
async fn the_binary_becomes_ready_serves_and_stops_on_sigterm() {
    let dir = TempDir::new("binary");
    // The real hash cost: the binary as it runs in production.
    let process = spawn(dir.path(), &[]);
    let base = process.url("");
    eventually("readiness", || async {
        send(Method::GET, &format!("{base}/health/ready"), &[], "")
            .await
            .status
            == 200
    })
    .await;
    let ready = send(Method::GET, &format!("{base}/health/ready"), &[], "").await;
    let checks = &ready.json()["checks"];
    assert_eq!(checks["database"]["status"], "up", "{checks}");

    let res = send(
        Method::POST,
        &format!("{base}/auth/v1/token"),
        &[
            ("content-type", FORM),
            ("x-correlation-id", "auth-binary-1"),
        ],
        "grant_type=password&username=admin&password=admin-password",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let access = res.json()["access_token"].as_str().unwrap().to_owned();
    let refresh = res.json()["refresh_token"].as_str().unwrap().to_owned();
    // Its own protected route accepts its tokens (verified over its own key set).
    let bearer = format!("Bearer {access}");
    let res = send(
        Method::POST,
        &format!("{base}/auth/v1/keys/rotate"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");

    let lines = tokio::task::spawn_blocking(move || process.stop(Duration::from_secs(60)))
        .await
        .unwrap();
    let all = lines.concat();
    for secret in ["admin-password", access.as_str(), refresh.as_str()] {
        assert!(!all.contains(secret), "a secret in the log");
    }
    let json: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        json.iter()
            .any(|l| l["message"] == "demo users and clients in place"),
        "start-up is logged: {lines:#?}"
    );
    assert!(
        json.iter()
            .any(|l| l["target"] == "chassis::access" && l["correlation_id"] == "auth-binary-1"),
        "{lines:#?}"
    );
    assert!(json.iter().any(|l| l["message"] == "stopped"), "{lines:#?}");
}

#[test]
fn a_bad_setting_exits_78_listing_every_problem() {
    let dir = TempDir::new("badconfig");
    let out = Command::new(env!("CARGO_BIN_EXE_auth"))
        .env("CHASSIS_BIND", "127.0.0.1:0")
        .env("AUTH_DATA_DIR", dir.path())
        .env("AUTH_TOKEN_TTL_SECS", "0")
        .env("AUTH_PUBLIC_URL", "ftp://auth.example")
        .env("AUTH_CLIENT_SECRET_ORDERS", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("invalid configuration (3 problems):"),
        "{stderr}"
    );
    for name in [
        "AUTH_TOKEN_TTL_SECS",
        "AUTH_PUBLIC_URL",
        "AUTH_CLIENT_SECRET_ORDERS",
    ] {
        assert!(stderr.contains(name), "{name} missing: {stderr}");
    }
    assert!(
        !dir.path().join("auth.db").exists(),
        "nothing is created before the configuration is valid"
    );
}
