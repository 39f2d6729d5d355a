//! `auth` over real sockets, with a real SQLite file in a fresh directory
//! per test: the token endpoint, the key set, rotation, restarts, and the
//! binary as operators run it.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use auth::{HashCost, Settings};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use bytes::Bytes;
use chassis::{
    auth::{Clock, ManualClock, PrincipalKind, SystemClock, Verifier},
    config::Config,
    testing::ServiceProcess,
};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use jsonwebtoken::Algorithm;
use serde_json::Value;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tower::ServiceExt as _;

const FORM: &str = "application/x-www-form-urlencoded";
const ALICE_GRANTS: [&str; 2] = ["ticketing:acme:*:*", "orders:acme:*:*"];
const ORDERS_GRANTS: [&str; 5] = [
    "ticketing:*:reserve:ticket",
    "ticketing:*:view:ticket",
    "mail::send:message",
    "auth:ticketing:exchange:token",
    "auth:mail:exchange:token",
];
/// A stored argon2id hash of `password` (the reference implementation's
/// known answer), for subjects the tests add to the database themselves.
const PASSWORD_HASH: &str =
    "$argon2id$v=19$m=256,t=2,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4";
const TOKEN_EXCHANGE: &str = "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token";

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
    send_from(None, method, url, headers, body).await
}

/// [`send`] from the local address `from` (any of 127.0.0.0/8 reaches a
/// service on 127.0.0.1), or the system's choice.
async fn send_from(
    from: Option<IpAddr>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut connector = HttpConnector::new();
    connector.set_local_address(from);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
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
    /// The same service in-process: requests through it have no peer
    /// address.
    router: axum::Router,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), chassis::service::ServeError>>>,
}

/// Settings for a test: the demo seed (off by default, asked for here), a
/// cheap hash (the tests check behaviour, not cost) and the service's own
/// URL.
fn settings(dir: &Path) -> Settings {
    let mut s = Settings::with_data_dir(dir);
    s.seed_demo = true;
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
    start_clocked(dir, SystemClock, tweak).await
}

/// A clock at the system's time, that the test moves by hand.
fn manual_clock() -> ManualClock {
    ManualClock::new(SystemClock.now())
}

async fn start_clocked(dir: &Path, clock: impl Clock, tweak: impl FnOnce(&mut Settings)) -> Auth {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut s = settings(dir);
    s.public_url = Some(url.clone());
    tweak(&mut s);
    let service = auth::app_with_clock(s, clock)
        .await
        .expect("auth starts")
        .config(Config::default())
        .build()
        .expect("auth builds");
    let router = service.router();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(service.serve_with(listener, async move {
        let _ = rx.await;
    }));
    Auth {
        url,
        router,
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

    /// [`Auth::login`] over a connection from the local address `from`.
    async fn login_from(&self, from: &str, user: &str, password: &str) -> Answer {
        send_from(
            Some(from.parse().unwrap()),
            Method::POST,
            &self.url("/auth/v1/token"),
            &[("content-type", FORM)],
            &format!("grant_type=password&username={user}&password={password}"),
        )
        .await
    }

    /// [`Auth::login`] through the router in-process, without a socket.
    async fn login_in_process(&self, user: &str, password: &str) -> Answer {
        let req = Request::post("/auth/v1/token")
            .header("content-type", FORM)
            .body(axum::body::Body::from(format!(
                "grant_type=password&username={user}&password={password}"
            )))
            .unwrap();
        let res = self.router.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// An access token for `user`, who must exist.
    async fn access_token(&self, user: &str) -> String {
        self.access_token_of(user, &format!("{user}-password"))
            .await
    }

    /// An access token for `user` with `password`.
    async fn access_token_of(&self, user: &str, password: &str) -> String {
        let res = self.login(user, password).await;
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
        self.verifier_for("chassis-demo")
    }

    /// A chassis verifier of a service whose audience is `audience`.
    fn verifier_for(&self, audience: &str) -> Verifier {
        Verifier::builder()
            .jwks(
                "http://127.0.0.1:8081",
                audience,
                &self.url("/auth/v1/jwks"),
            )
            .algorithms(&[Algorithm::EdDSA])
            .build()
            .unwrap()
    }

    async fn failed_logins(&self, kind: &str) -> u64 {
        self.counter("auth_failed_logins_total", &format!("kind=\"{kind}\""))
            .await
    }

    /// The value of the counter `name` with the label `label` (`k="v"`).
    async fn counter(&self, name: &str, label: &str) -> u64 {
        let res = send(Method::GET, &self.url("/metrics"), &[], "").await;
        let text = String::from_utf8_lossy(&res.body).into_owned();
        text.lines()
            .find(|l| {
                (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                    && l.contains(label)
            })
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
    }

    /// Logs in with the password grant and the extra form fields `extra`
    /// (already encoded, each starting with `&`).
    async fn login_with(&self, user: &str, password: &str, extra: &str) -> Answer {
        self.post_form(
            &format!("grant_type=password&username={user}&password={password}{extra}"),
            &[],
        )
        .await
    }

    /// Exchanges `subject` as the client `client` (HTTP Basic) with the
    /// extra form fields `extra`.
    async fn exchange(&self, client: (&str, &str), subject: &str, extra: &str) -> Answer {
        self.post_form(
            &format!(
                "grant_type={TOKEN_EXCHANGE}&subject_token={subject}\
                 &subject_token_type={ACCESS_TOKEN_TYPE}{extra}"
            ),
            &[("authorization", &basic(client.0, client.1))],
        )
        .await
    }

    /// Adds a user (or, with `client`, a service client) whose password is
    /// `password`, with `grants`, to the service's database file.
    async fn add_subject(&self, dir: &Path, client: bool, name: &str, grants: &[&str]) {
        let pool = sqlx::SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::new().filename(dir.join("auth.db")),
        )
        .await
        .unwrap();
        let sql = if client {
            "INSERT INTO clients (client_id, secret_hash, grants, created_at) VALUES (?, ?, ?, 0)"
        } else {
            "INSERT INTO users (username, password_hash, grants, created_at) VALUES (?, ?, ?, 0)"
        };
        sqlx::query(sql)
            .bind(name)
            .bind(PASSWORD_HASH)
            .bind(serde_json::to_string(grants).unwrap())
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
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

// === deny grants survive narrowing ===

const DORA_GRANTS: [&str; 3] = [
    "ticketing:acme:*:*",
    "orders:acme:*:*",
    "!ticketing:acme:delete:*",
];

fn perms_of(res: &Answer) -> Value {
    decode(res.json()["access_token"].as_str().unwrap()).1["perms"].clone()
}

#[tokio::test]
async fn a_narrower_scope_keeps_every_deny_grant() {
    let dir = TempDir::new("denies");
    let auth = start(dir.path()).await;
    auth.add_subject(dir.path(), false, "dora", &DORA_GRANTS)
        .await;
    auth.add_subject(
        dir.path(),
        true,
        "gate",
        &["mail::send:message", "!mail::send:newsletter"],
    )
    .await;

    // Without a scope: every grant, the deny included.
    let res = auth.login("dora", "password").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(perms_of(&res), serde_json::json!(DORA_GRANTS));

    // Password grant with a narrower scope.
    let res = auth
        .login_with("dora", "password", "&scope=ticketing%3Aacme%3A%2A%3A%2A")
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    let expected = serde_json::json!(["ticketing:acme:*:*", "!ticketing:acme:delete:*"]);
    assert_eq!(perms_of(&res), expected);
    // The answer says which grants the token has, since they differ.
    assert_eq!(
        res.json()["scope"],
        "ticketing:acme:*:* !ticketing:acme:delete:*"
    );

    // Refresh: the login's scope, and a narrower one still.
    let refresh = res.json()["refresh_token"].as_str().unwrap().to_owned();
    let res = auth.refresh(&refresh).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(perms_of(&res), expected);
    let login = auth.login("dora", "password").await;
    let res = auth
        .post_form(
            &format!(
                "grant_type=refresh_token&refresh_token={}&scope=orders%3Aacme%3A%2A%3A%2A",
                login.json()["refresh_token"].as_str().unwrap()
            ),
            &[],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        perms_of(&res),
        serde_json::json!(["orders:acme:*:*", "!ticketing:acme:delete:*"])
    );
    // Asking for the deny itself is no widening.
    let res = auth
        .post_form(
            &format!(
                "grant_type=refresh_token&refresh_token={}\
                 &scope=orders%3Aacme%3A%2A%3A%2A+%21ticketing%3Aacme%3Adelete%3A%2A",
                res.json()["refresh_token"].as_str().unwrap()
            ),
            &[],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");

    // Client credentials.
    let res = auth
        .post_form(
            "grant_type=client_credentials&scope=mail%3A%3Asend%3Amessage",
            &[("authorization", &basic("gate", "password"))],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        perms_of(&res),
        serde_json::json!(["mail::send:message", "!mail::send:newsletter"])
    );

    // And the chassis enforces it: the narrowed token still denies.
    let token = auth
        .login_with("dora", "password", "&scope=ticketing%3Aacme%3A%2A%3A%2A")
        .await
        .json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let principal = auth.verifier().verify_token(&token).await.unwrap();
    let delete: chassis::permission::Permission = "ticketing:acme:delete:ticket".parse().unwrap();
    assert!(!principal.grants().decide(&delete).is_allowed());
    auth.stop().await;
}

// === audiences ===

#[tokio::test]
async fn a_token_asked_for_one_service_is_for_that_service_only() {
    let dir = TempDir::new("audience");
    let auth = start(dir.path()).await;
    let res = auth
        .login_with("alice", "alice-password", "&audience=ticketing")
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    let token = res.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(decode(&token).1["aud"], "ticketing");
    let principal = auth.verifier_for("ticketing").verify_token(&token).await;
    assert_eq!(principal.unwrap().subject(), "alice");
    for other in ["orders", "chassis-demo"] {
        assert_eq!(
            auth.verifier_for(other)
                .verify_token(&token)
                .await
                .unwrap_err()
                .code(),
            "bad_audience",
            "{other}"
        );
    }

    // Without one: the default audience.
    let (_, claims) = decode(&auth.access_token("alice").await);
    assert_eq!(claims["aud"], "chassis-demo");

    // The refresh and client-credentials grants take one too.
    let refresh = res.json()["refresh_token"].as_str().unwrap().to_owned();
    let res = auth
        .post_form(
            &format!("grant_type=refresh_token&refresh_token={refresh}&audience=orders"),
            &[],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        decode(res.json()["access_token"].as_str().unwrap()).1["aud"],
        "orders"
    );
    let res = auth
        .post_form(
            "grant_type=client_credentials&audience=mail",
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        decode(res.json()["access_token"].as_str().unwrap()).1["aud"],
        "mail"
    );

    // An audience that is not a known service, or a resource indicator.
    for extra in [
        "&audience=billing",
        "&audience=ticketing%2Corders",
        "&resource=http%3A%2F%2F127.0.0.1%3A8082%2Fticketing%2Fv1",
    ] {
        let res = auth.login_with("alice", "alice-password", extra).await;
        assert_eq!(res.status, 400, "{extra}: {res:?}");
        assert_eq!(res.header("cache-control"), "no-store");
        assert_eq!(res.json()["error"], "invalid_target", "{extra}");
    }
    auth.stop().await;
}

// === token exchange ===

#[tokio::test]
async fn an_authorised_client_exchanges_a_users_token_for_another_audience() {
    let dir = TempDir::new("exchange");
    let clock = manual_clock();
    let auth = start_clocked(dir.path(), clock.clone(), |_| {}).await;
    let login = auth
        .login_with("alice", "alice-password", "&audience=orders")
        .await;
    let subject = login.json()["access_token"].as_str().unwrap().to_owned();
    let (_, subject_claims) = decode(&subject);

    let res = auth
        .exchange(("orders", "orders-secret"), &subject, "&audience=ticketing")
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.header("cache-control"), "no-store");
    let body = res.json();
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(body["token_type"], "Bearer");
    assert!(body.get("refresh_token").is_none(), "{body}");
    let exchanged = body["access_token"].as_str().unwrap();
    let (header, claims) = decode(exchanged);
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(claims["aud"], "ticketing");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["kind"], "user");
    assert_eq!(claims["iss"], subject_claims["iss"]);
    assert_eq!(claims["perms"], serde_json::json!(ALICE_GRANTS));
    assert_eq!(claims["act"], serde_json::json!({"sub": "orders"}));
    assert_ne!(claims["jti"], subject_claims["jti"]);
    let principal = auth
        .verifier_for("ticketing")
        .verify_token(exchanged)
        .await
        .unwrap();
    assert_eq!(principal.subject(), "alice");
    assert_eq!(principal.kind(), PrincipalKind::User);

    // Never outliving the subject token: 600 s later, 300 s are left.
    clock.advance(600);
    let res = auth
        .exchange(("orders", "orders-secret"), &subject, "&audience=mail")
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.json()["expires_in"], 300);
    let (_, claims) = decode(res.json()["access_token"].as_str().unwrap());
    assert_eq!(claims["exp"], subject_claims["exp"]);

    // An exchanged token exchanged again names both actors.
    let again = auth
        .exchange(("orders", "orders-secret"), exchanged, "&audience=mail")
        .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(
        perms_of(&again),
        serde_json::json!(ALICE_GRANTS),
        "never more than the subject token"
    );
    let (_, claims) = decode(again.json()["access_token"].as_str().unwrap());
    assert_eq!(
        claims["act"],
        serde_json::json!({"sub": "orders", "act": {"sub": "orders"}})
    );

    // Past the subject token's expiry: refused.
    clock.advance(300);
    let res = auth
        .exchange(("orders", "orders-secret"), &subject, "&audience=ticketing")
        .await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(
        res.json(),
        serde_json::json!({"error": "invalid_request", "error_description": "the subject token is not valid"})
    );
    auth.stop().await;
}

#[tokio::test]
async fn exchanged_tokens_never_have_more_than_the_subject_token_and_keep_its_denies() {
    let dir = TempDir::new("exchange-perms");
    let auth = start(dir.path()).await;
    auth.add_subject(dir.path(), false, "dora", &DORA_GRANTS)
        .await;
    let exchange = |subject: String, extra: &'static str| {
        let auth = &auth;
        async move {
            auth.exchange(("orders", "orders-secret"), &subject, extra)
                .await
        }
    };

    // A subject token narrowed at login: the exchange cannot widen it, and
    // the deny goes with it.
    let narrowed = auth
        .login_with("dora", "password", "&scope=ticketing%3Aacme%3A%2A%3A%2A")
        .await;
    let subject = narrowed.json()["access_token"].as_str().unwrap().to_owned();
    let res = exchange(subject.clone(), "&audience=ticketing").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        perms_of(&res),
        serde_json::json!(["ticketing:acme:*:*", "!ticketing:acme:delete:*"])
    );
    let res = exchange(
        subject.clone(),
        "&audience=ticketing&scope=orders%3Aacme%3A%2A%3A%2A",
    )
    .await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(res.json()["error"], "invalid_scope");

    // A narrower scope on the exchange keeps the deny too.
    let full = auth.access_token_of("dora", "password").await;
    let res = exchange(full, "&audience=mail&scope=orders%3Aacme%3A%2A%3A%2A").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        perms_of(&res),
        serde_json::json!(["orders:acme:*:*", "!ticketing:acme:delete:*"])
    );
    auth.stop().await;
}

#[tokio::test]
async fn token_exchange_refuses_bad_clients_audiences_and_subject_tokens() {
    let dir = TempDir::new("exchange-refused");
    let auth = start(dir.path()).await;
    let subject = auth.access_token("alice").await;

    // A client without the grant, or without it for that audience.
    for (client, audience) in [
        (("mail", "mail-secret"), "ticketing"),
        (("orders", "orders-secret"), "orders"),
        (("orders", "orders-secret"), "auth"),
    ] {
        let res = auth
            .exchange(client, &subject, &format!("&audience={audience}"))
            .await;
        assert_eq!(res.status, 400, "{client:?} {audience}: {res:?}");
        assert_eq!(res.json()["error"], "unauthorized_client");
    }
    // A client that fails authentication.
    let res = auth
        .exchange(("orders", "guess"), &subject, "&audience=ticketing")
        .await;
    assert_eq!(res.status, 401, "{res:?}");
    assert_eq!(res.json()["error"], "invalid_client");
    // An unknown audience; none at all.
    let res = auth
        .exchange(("orders", "orders-secret"), &subject, "&audience=billing")
        .await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_target");
    let res = auth
        .exchange(("orders", "orders-secret"), &subject, "")
        .await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_request");

    // Forged subject tokens: changed claims, another key, no signature,
    // not a token at all.
    let (h, rest) = subject.split_once('.').unwrap();
    let (_, sig) = rest.split_once('.').unwrap();
    let (_, mut claims) = decode(&subject);
    claims["perms"] = serde_json::json!(["*:*:*:*"]);
    let widened = format!(
        "{h}.{}.{sig}",
        B64URL.encode(serde_json::to_vec(&claims).unwrap())
    );
    let other_key = {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.typ = Some("at+jwt".to_owned());
        header.kid = decode(&subject).0["kid"].as_str().map(str::to_owned);
        let (_, claims) = decode(&subject);
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref()),
        )
        .unwrap()
    };
    let unsigned = format!("{h}.{}.", rest.split_once('.').unwrap().0);
    for (what, forged) in [
        ("changed claims", widened.as_str()),
        ("another key", other_key.as_str()),
        ("no signature", unsigned.as_str()),
        ("not a token", "not-a-token"),
    ] {
        let res = auth
            .exchange(("orders", "orders-secret"), forged, "&audience=ticketing")
            .await;
        assert_eq!(res.status, 400, "{what}: {res:?}");
        assert_eq!(
            res.json(),
            serde_json::json!({"error": "invalid_request", "error_description": "the subject token is not valid"}),
            "{what}"
        );
    }
    // A subject token type this service does not take; an actor token.
    let res = auth
        .post_form(
            &format!(
                "grant_type={TOKEN_EXCHANGE}&subject_token={subject}&audience=ticketing\
                 &subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aid_token"
            ),
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await;
    assert_eq!(res.json()["error"], "invalid_request", "{res:?}");
    let res = auth
        .exchange(
            ("orders", "orders-secret"),
            &subject,
            &format!(
                "&audience=ticketing&actor_token={subject}&actor_token_type={ACCESS_TOKEN_TYPE}"
            ),
        )
        .await;
    assert_eq!(res.json()["error"], "invalid_request", "{res:?}");
    auth.stop().await;
}

// === brute-force protection ===

#[tokio::test]
async fn failed_logins_lock_the_user_name_with_429_and_retry_after() {
    let dir = TempDir::new("throttle");
    let clock = manual_clock();
    let auth = start_clocked(dir.path(), clock.clone(), |_| {}).await;
    let before = auth
        .counter("auth_login_throttled_total", "limit=\"name\"")
        .await;
    // Five wrong passwords are checked; then not even the right one is.
    for _ in 0..5 {
        let res = auth.login("alice", "guess").await;
        assert_eq!(res.status, 400, "{res:?}");
    }
    let mut answers = Vec::new();
    for password in ["guess"; 24].into_iter().chain(["alice-password"]) {
        answers.push(auth.login("alice", password).await);
    }
    for res in &answers {
        assert_eq!(res.status, 429, "{res:?}");
        assert_eq!(res.header("retry-after"), "60");
        assert_eq!(res.header("cache-control"), "no-store");
        assert_eq!(
            res.json(),
            serde_json::json!({"error": "slow_down", "error_description": "too many failed attempts; retry later"})
        );
    }
    let after = auth
        .counter("auth_login_throttled_total", "limit=\"name\"")
        .await;
    assert!(after >= before + 25, "{before} -> {after}");
    // Another user is not affected.
    assert_eq!(auth.login("bob", "bob-password").await.status, 200);

    // When the lock is over, the right password works at once.
    clock.advance(30);
    assert_eq!(
        auth.login("alice", "alice-password")
            .await
            .header("retry-after"),
        "30"
    );
    clock.advance(30);
    assert_eq!(auth.login("alice", "alice-password").await.status, 200);

    // A success forgets the failures; five more lock again, and one more
    // failure after that lock doubles it.
    for _ in 0..5 {
        assert_eq!(auth.login("alice", "guess").await.status, 400);
    }
    clock.advance(60);
    assert_eq!(auth.login("alice", "guess").await.status, 400);
    let res = auth.login("alice", "alice-password").await;
    assert_eq!(res.status, 429);
    assert_eq!(res.header("retry-after"), "120");
    auth.stop().await;
}

#[tokio::test]
async fn concurrent_guesses_for_one_name_get_only_the_allowed_checks() {
    let dir = TempDir::new("throttle-burst");
    let auth = start_clocked(dir.path(), manual_clock(), |_| {}).await;
    let answers = futures_join(
        (0..20)
            .map(|_| {
                let url = auth.url("/auth/v1/token");
                tokio::spawn(async move {
                    send(
                        Method::POST,
                        &url,
                        &[("content-type", FORM)],
                        "grant_type=password&username=alice&password=guess",
                    )
                    .await
                    .status
                })
            })
            .collect(),
    )
    .await;
    let checked = answers
        .iter()
        .filter(|s| **s == StatusCode::BAD_REQUEST)
        .count();
    let throttled = answers
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(checked <= 5, "{answers:?}");
    assert_eq!(checked + throttled, 20, "{answers:?}");
    auth.stop().await;
}

#[tokio::test]
async fn clients_are_throttled_too_and_so_are_failures_over_many_names() {
    let dir = TempDir::new("throttle-global");
    let clock = manual_clock();
    let auth = start_clocked(dir.path(), clock.clone(), |s| {
        s.login.global_max_failures = 8;
        s.login.global_window = Duration::from_secs(60);
    })
    .await;
    let orders_wrong = basic("orders", "guess");
    for _ in 0..5 {
        let res = auth
            .post_form(
                "grant_type=client_credentials",
                &[("authorization", &orders_wrong)],
            )
            .await;
        assert_eq!(res.status, 401, "{res:?}");
    }
    let res = auth
        .post_form(
            "grant_type=client_credentials",
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await;
    assert_eq!(res.status, 429, "{res:?}");
    assert_eq!(res.header("retry-after"), "60");

    // Three more failures, each for another name, use up the budget of 8:
    // then every name waits, whatever its own record.
    for name in ["u1", "u2", "u3"] {
        assert_eq!(auth.login(name, "guess").await.status, 400);
    }
    clock.advance(10);
    let before = auth
        .counter("auth_login_throttled_total", "limit=\"global\"")
        .await;
    let res = auth.login("bob", "bob-password").await;
    assert_eq!(res.status, 429, "{res:?}");
    assert_eq!(res.header("retry-after"), "50");
    let after = auth
        .counter("auth_login_throttled_total", "limit=\"global\"")
        .await;
    assert!(after > before, "{before} -> {after}");
    clock.advance(50);
    assert_eq!(auth.login("bob", "bob-password").await.status, 200);
    auth.stop().await;
}

#[tokio::test]
async fn failures_over_many_names_from_one_address_lock_the_address() {
    const HERE: &str = "127.0.0.1";
    const ELSEWHERE: &str = "127.0.0.2";
    let dir = TempDir::new("throttle-address");
    let clock = manual_clock();
    let auth = start_clocked(dir.path(), clock.clone(), |s| {
        s.login.address_max_failures = 4;
    })
    .await;
    let throttled = || auth.counter("auth_login_throttled_total", "limit=\"address\"");
    let before = throttled().await;

    // Without a peer address (in-process, no socket), failures count per
    // name and in total only: more than the address limit, and none locks.
    for i in 0..6 {
        let res = auth.login_in_process(&format!("nobody-{i}"), "guess").await;
        assert_eq!(res.status, 400, "{res:?}");
    }
    // Over a socket: four failures from one address, each for another name,
    // are checked; then that address waits, whatever the name or password.
    for i in 0..4 {
        let res = auth.login_from(HERE, &format!("user-{i}"), "guess").await;
        assert_eq!(res.status, 400, "{res:?}");
    }
    for (user, password) in [
        ("alice", "alice-password"),
        ("bob", "guess"),
        ("user-9", "guess"),
    ] {
        let res = auth.login_from(HERE, user, password).await;
        assert_eq!(res.status, 429, "{res:?}");
        assert_eq!(res.header("retry-after"), "60");
        assert_eq!(res.json()["error"], "slow_down");
    }
    // Client authentication from there too.
    let res = auth
        .post_form(
            "grant_type=client_credentials",
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await;
    assert_eq!(res.status, 429, "{res:?}");
    let after = throttled().await;
    assert!(after >= before + 4, "{before} -> {after}");

    // Neither in-process requests nor another address are locked, and a
    // success from another address does not unlock this one.
    let res = auth.login_in_process("alice", "alice-password").await;
    assert_eq!(res.status, 200, "{res:?}");
    for i in 0..3 {
        let res = auth
            .login_from(ELSEWHERE, &format!("other-{i}"), "guess")
            .await;
        assert_eq!(res.status, 400, "{res:?}");
    }
    let res = auth.login_from(ELSEWHERE, "bob", "bob-password").await;
    assert_eq!(res.status, 200, "{res:?}");
    let res = auth.login_from(HERE, "alice", "alice-password").await;
    assert_eq!(res.status, 429, "{res:?}");
    assert_eq!(res.header("retry-after"), "60");

    // The lock ends on the injected clock; a success does not forget the
    // address's failures, so the next failure locks it for twice as long.
    clock.advance(30);
    let res = auth.login_from(HERE, "alice", "alice-password").await;
    assert_eq!(res.header("retry-after"), "30", "{res:?}");
    clock.advance(30);
    let res = auth.login_from(HERE, "alice", "alice-password").await;
    assert_eq!(res.status, 200, "{res:?}");
    let res = auth.login_from(HERE, "user-5", "guess").await;
    assert_eq!(res.status, 400, "{res:?}");
    let res = auth.login_from(HERE, "alice", "alice-password").await;
    assert_eq!(res.status, 429, "{res:?}");
    assert_eq!(res.header("retry-after"), "120");
    auth.stop().await;
}

#[tokio::test]
async fn a_flood_beyond_the_hashing_slots_is_answered_503_with_retry_after() {
    let dir = TempDir::new("hash-busy");
    let auth = start_with(dir.path(), |s| {
        // One slot, a short wait, and hashes slow enough to queue behind.
        s.hash_limits.concurrency = 1;
        s.hash_limits.queue_timeout = Duration::from_millis(1);
        s.hash_cost = HashCost {
            memory_kib: 32 * 1024,
            iterations: 3,
        };
    })
    .await;
    let answers = futures_join(
        (0..8)
            .map(|i| {
                let url = auth.url("/auth/v1/token");
                tokio::spawn(async move {
                    send(
                        Method::POST,
                        &url,
                        &[("content-type", FORM)],
                        &format!("grant_type=password&username=user-{i}&password=guess"),
                    )
                    .await
                })
            })
            .collect(),
    )
    .await;
    let busy: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
    assert!(!busy.is_empty(), "{answers:?}");
    for res in &busy {
        assert_eq!(res.header("retry-after"), "1");
        // No 5xx body of a handler reaches the client: the chassis' generic
        // problem, with the handler's Retry-After.
        assert_eq!(res.header("content-type"), "application/problem+json");
        assert_eq!(res.json()["status"], 503);
    }
    assert!(
        answers.iter().all(|a| a.status == 503 || a.status == 400),
        "{answers:?}"
    );
    // Once the flood is over, logins are checked again.
    assert_eq!(auth.login("alice", "alice-password").await.status, 200);
    assert!(auth.counter("auth_hash_busy_total", "").await >= 1);
    auth.stop().await;
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

// === discovery ===

#[tokio::test]
async fn the_discovery_document_lives_under_the_issuer_and_names_the_key_set() {
    let dir = TempDir::new("discovery");
    let auth = start_with(dir.path(), |s| {
        s.issuer = format!("{}/auth/v1", s.public_url.as_deref().unwrap());
    })
    .await;
    let issuer = format!("{}/auth/v1", auth.url);
    let res = send(
        Method::GET,
        &format!("{issuer}/.well-known/openid-configuration"),
        &[],
        "",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.header("content-type").starts_with("application/json"));
    let doc = res.json();
    assert_eq!(doc["issuer"].as_str(), Some(issuer.as_str()));
    assert_eq!(
        doc["token_endpoint"].as_str(),
        Some(format!("{issuer}/token").as_str())
    );
    for field in [
        "grant_types_supported",
        "token_endpoint_auth_methods_supported",
        "response_types_supported",
        "subject_types_supported",
        "id_token_signing_alg_values_supported",
    ] {
        assert!(doc[field].is_array(), "{field}: {doc}");
    }
    assert!(
        doc["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(
                "urn:ietf:params:oauth:grant-type:token-exchange"
            )),
        "{doc}"
    );
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        serde_json::json!(["EdDSA"])
    );

    // The key set it names verifies the tokens of that issuer.
    let jwks = send(Method::GET, doc["jwks_uri"].as_str().unwrap(), &[], "").await;
    assert_eq!(jwks.status, 200, "{jwks:?}");
    assert_eq!(jwks.json(), auth.jwks().await);
    let token = auth.access_token("alice").await;
    assert_eq!(decode(&token).1["iss"].as_str(), Some(issuer.as_str()));
    let verifier = Verifier::builder()
        .jwks(&issuer, "chassis-demo", doc["jwks_uri"].as_str().unwrap())
        .algorithms(&[Algorithm::EdDSA])
        .build()
        .unwrap();
    assert_eq!(
        verifier.verify_token(&token).await.unwrap().subject(),
        "alice"
    );

    // The driver client reads it, and the service's own protected route
    // still takes its tokens.
    use auth::client::AuthClient;
    use chassis::client::{CallContext, Downstream};
    let client = AuthClient::new(Downstream::builder("auth", &auth.url).build().unwrap());
    let read = client.discovery(&CallContext::background()).await.unwrap();
    assert_eq!(read.issuer, issuer);
    let admin = auth.access_token("admin").await;
    assert_eq!(auth.rotate(Some(&admin)).await.status, 200);
    auth.stop().await;
}

// === restarts ===

#[tokio::test]
async fn keys_and_users_survive_a_restart_and_the_demo_grants_change_nothing() {
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

    // Same data directory: the demo grants, applied again, change nothing.
    let auth = start(dir.path()).await;
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
    assert_eq!(res.status, 200, "{res:?}");
    auth.stop().await;
    assert_eq!(
        hashes(db).await,
        seeded,
        "no row added, no secret hashed again"
    );
}

#[tokio::test]
async fn without_the_seed_nobody_can_log_in() {
    let dir = TempDir::new("noseed");
    // The default: no demo users with their well-known passwords.
    let auth = start_with(dir.path(), |s| {
        s.seed_demo = Settings::with_data_dir("/unused").seed_demo;
    })
    .await;
    let res = auth.login("alice", "alice-password").await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_grant");
    assert_eq!(auth.kids().await.len(), 1, "a key all the same");
    auth.stop().await;
}

// === permissions as data ===

/// Writes the grants file as editors and deployments do: whole, by a
/// rename, so that it is never read half-written.
fn write_grants(file: &Path, text: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// Settings with `file` as the grants file, without the demo grants, looked
/// at every 50 ms.
fn from_file(file: &Path) -> impl FnOnce(&mut Settings) {
    let file = file.to_owned();
    move |s| {
        s.seed_demo = false;
        s.grants_file = Some(file);
        s.grants_poll = Duration::from_millis(50);
    }
}

/// A client's or user's grants in the file, with the secret `password`.
fn entry(table: &str, name: &str, grants: &[&str]) -> String {
    let field = if table == "users" {
        "password_hash"
    } else {
        "secret_hash"
    };
    format!(
        "[{table}.{name}]\n{field} = \"{PASSWORD_HASH}\"\ngrants = {}\n\n",
        serde_json::to_string(grants).unwrap()
    )
}

impl Auth {
    /// The claims of a token for the client `id`.
    async fn client_claims(&self, id: &str, secret: &str) -> Value {
        let res = self
            .post_form(
                "grant_type=client_credentials",
                &[("authorization", &basic(id, secret))],
            )
            .await;
        assert_eq!(res.status, 200, "{res:?}");
        decode(res.json()["access_token"].as_str().unwrap()).1
    }

    /// A call to the admin API with `token`.
    async fn admin(&self, method: Method, path: &str, token: Option<&str>, body: &str) -> Answer {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(b) = &bearer {
            headers.push(("authorization", b));
        }
        send(method, &self.url(path), &headers, body).await
    }
}

#[tokio::test]
async fn subjects_in_the_grants_file_get_tokens_and_its_changes_reach_their_next_token() {
    let dir = TempDir::new("grantsfile");
    let file = dir.path().join("grants.toml");
    let keycards_v1 = ["ticketing:*:view:ticket", "auth:ticketing:exchange:token"];
    write_grants(
        &file,
        &(entry("clients", "keycards", &keycards_v1)
            + &entry("users", "carol", &["ticketing:acme:*:*"])),
    );
    let auth = start_with(dir.path(), from_file(&file)).await;

    // A new service, registered by data alone.
    let claims = auth.client_claims("keycards", "password").await;
    assert_eq!(claims["sub"], "keycards");
    assert_eq!(claims["kind"], "service");
    assert_eq!(claims["perms"], serde_json::json!(keycards_v1));
    let res = auth.login("carol", "password").await;
    assert_eq!(res.status, 200, "{res:?}");
    let refresh = res.json()["refresh_token"].as_str().unwrap().to_owned();
    let (_, carol) = decode(res.json()["access_token"].as_str().unwrap());
    assert_eq!(carol["perms"], serde_json::json!(["ticketing:acme:*:*"]));
    // Only what the file declares: no demo users.
    assert_eq!(auth.login("alice", "alice-password").await.status, 400);

    // A grant removed, two added (one a deny): in the next tokens of the
    // same subjects, without a restart.
    let keycards_v2 = [
        "ticketing:*:view:ticket",
        "!ticketing:vip:view:ticket",
        "mail::send:message",
    ];
    let carol_v2 = ["ticketing:acme:*:*", "orders:acme:*:*"];
    write_grants(
        &file,
        &(entry("clients", "keycards", &keycards_v2) + &entry("users", "carol", &carol_v2)),
    );
    eventually("keycards' new grants", || async {
        auth.client_claims("keycards", "password").await["perms"] == serde_json::json!(keycards_v2)
    })
    .await;
    // Carol's login survives the change, and its next token has her new
    // grants.
    let res = auth.refresh(&refresh).await;
    assert_eq!(res.status, 200, "{res:?}");
    let refresh = res.json()["refresh_token"].as_str().unwrap().to_owned();
    let (_, carol) = decode(res.json()["access_token"].as_str().unwrap());
    assert_eq!(carol["perms"], serde_json::json!(carol_v2));

    // A subject no longer in the file is removed, with its logins.
    let keycards_v3 = ["ticketing:*:view:ticket"];
    write_grants(&file, &entry("clients", "keycards", &keycards_v3));
    eventually("keycards' third grants", || async {
        auth.client_claims("keycards", "password").await["perms"] == serde_json::json!(keycards_v3)
    })
    .await;
    assert_eq!(auth.login("carol", "password").await.status, 400);
    let res = auth.refresh(&refresh).await;
    assert_eq!(res.json()["error"], "invalid_grant", "{res:?}");
    auth.stop().await;

    // Without a grants file nothing is applied: the subjects stay.
    let auth = start_with(dir.path(), |s| s.seed_demo = false).await;
    assert_eq!(
        auth.client_claims("keycards", "password").await["perms"],
        serde_json::json!(keycards_v3)
    );
    auth.stop().await;
}

#[tokio::test]
async fn a_bad_change_of_the_grants_file_keeps_the_last_good_grants() {
    let dir = TempDir::new("badchange");
    let file = dir.path().join("grants.toml");
    write_grants(
        &file,
        &entry("clients", "keycards", &["ticketing:*:view:ticket"]),
    );
    let auth = start_with(dir.path(), from_file(&file)).await;
    let rejected = || auth.counter("auth_grants_file_rejected_total", "");
    let before = rejected().await;
    let grants_check = || async {
        let res = send(Method::GET, &auth.url("/health/ready"), &[], "").await;
        (
            res.status,
            res.json()["checks"]["grants-file"]["status"].clone(),
        )
    };
    // The checks' first runs.
    eventually("readiness", || async {
        grants_check().await == (StatusCode::OK, "up".into())
    })
    .await;

    // Three problems: the whole change is refused.
    write_grants(
        &file,
        "[clients.keycards]\nsecret = \"literal\"\ngrants = [\"ticketing:*:view\"]\n\n\
         [users.dave]\ngrants = []\n",
    );
    eventually("the refusal counted", || async {
        rejected().await > before
    })
    .await;
    // Readiness does not depend on the file.
    eventually("the readiness check down", || async {
        grants_check().await == (StatusCode::OK, "down".into())
    })
    .await;
    let claims = auth.client_claims("keycards", "password").await;
    assert_eq!(
        claims["perms"],
        serde_json::json!(["ticketing:*:view:ticket"]),
        "the last good grants stay"
    );
    assert_eq!(auth.login("dave", "password").await.status, 400);

    // Fixed: applied.
    write_grants(
        &file,
        &entry("clients", "keycards", &["mail::send:message"]),
    );
    eventually("the fixed file applied", || async {
        auth.client_claims("keycards", "password").await["perms"]
            == serde_json::json!(["mail::send:message"])
    })
    .await;
    eventually("the readiness check up", || async {
        grants_check().await == (StatusCode::OK, "up".into())
    })
    .await;
    auth.stop().await;
}

#[tokio::test]
async fn the_admin_api_needs_its_permissions_and_changes_the_next_token() {
    let dir = TempDir::new("admin");
    // The demo grants: admin holds auth::view:grant, auth::manage:grant and
    // auth::register:client; alice none of them.
    let auth = start(dir.path()).await;
    let alice = auth.access_token("alice").await;
    let admin = auth.access_token("admin").await;
    let calls = [
        (Method::GET, "/auth/v1/clients/orders/grants", ""),
        (Method::GET, "/auth/v1/users/alice/grants", ""),
        (
            Method::PUT,
            "/auth/v1/clients/orders/grants",
            r#"{"grants": []}"#,
        ),
        (
            Method::PUT,
            "/auth/v1/users/alice/grants",
            r#"{"grants": []}"#,
        ),
        (
            Method::POST,
            "/auth/v1/clients",
            r#"{"client_id": "keycards", "grants": []}"#,
        ),
    ];
    for (method, path, body) in &calls {
        let res = auth.admin(method.clone(), path, None, body).await;
        assert_eq!(res.status, 401, "{method} {path}: {res:?}");
        let res = auth.admin(method.clone(), path, Some(&alice), body).await;
        assert_eq!(res.status, 403, "{method} {path}: {res:?}");
        assert_eq!(res.header("content-type"), "application/problem+json");
        assert!(res.json()["correlation_id"].is_string());
    }
    assert_eq!(
        auth.login("alice", "alice-password").await.json()["access_token"]
            .as_str()
            .map(|t| decode(t).1["perms"].clone()),
        Some(serde_json::json!(ALICE_GRANTS)),
        "nothing changed"
    );

    // A new service registered through the API: its secret is in the answer.
    let res = auth
        .admin(
            Method::POST,
            "/auth/v1/clients",
            Some(&admin),
            r#"{"client_id": "keycards", "grants": ["ticketing:*:view:ticket"]}"#,
        )
        .await;
    assert_eq!(res.status, 201, "{res:?}");
    assert_eq!(res.header("cache-control"), "no-store");
    let secret = res.json()["client_secret"].as_str().unwrap().to_owned();
    let claims = auth.client_claims("keycards", &secret).await;
    assert_eq!(
        claims["perms"],
        serde_json::json!(["ticketing:*:view:ticket"])
    );
    let res = auth
        .admin(
            Method::POST,
            "/auth/v1/clients",
            Some(&admin),
            r#"{"client_id": "keycards", "grants": []}"#,
        )
        .await;
    assert_eq!(res.status, 409, "{res:?}");
    assert_eq!(res.json()["reason"], "exists");

    // Its grants replaced: in its next token.
    let new = ["ticketing:*:view:ticket", "!ticketing:vip:view:ticket"];
    let res = auth
        .admin(
            Method::PUT,
            "/auth/v1/clients/keycards/grants",
            Some(&admin),
            &serde_json::json!({ "grants": new }).to_string(),
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.json()["managed_by"], "api");
    assert_eq!(
        auth.client_claims("keycards", &secret).await["perms"],
        serde_json::json!(new)
    );
    let res = auth
        .admin(
            Method::GET,
            "/auth/v1/clients/keycards/grants",
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(
        res.json(),
        serde_json::json!({"kind": "client", "name": "keycards", "grants": new, "managed_by": "api"})
    );

    // The file (here the demo grants) is authoritative for what it names.
    let res = auth
        .admin(
            Method::PUT,
            "/auth/v1/clients/orders/grants",
            Some(&admin),
            r#"{"grants": []}"#,
        )
        .await;
    assert_eq!(res.status, 409, "{res:?}");
    assert_eq!(res.json()["reason"], "managed_by_file");
    let res = auth
        .admin(Method::GET, "/auth/v1/users/alice/grants", Some(&admin), "")
        .await;
    assert_eq!(res.json()["managed_by"], "file");
    assert_eq!(res.json()["grants"], serde_json::json!(ALICE_GRANTS));

    // A user the file does not name.
    auth.add_subject(dir.path(), false, "dave", &[]).await;
    let res = auth
        .admin(
            Method::PUT,
            "/auth/v1/users/dave/grants",
            Some(&admin),
            r#"{"grants": ["orders:acme:view:order"]}"#,
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    let (_, dave) = decode(&auth.access_token_of("dave", "password").await);
    assert_eq!(dave["perms"], serde_json::json!(["orders:acme:view:order"]));

    // Bad input: every invalid field named; unknown subjects are 404.
    let res = auth
        .admin(
            Method::POST,
            "/auth/v1/clients",
            Some(&admin),
            r#"{"client_id": "bad id", "grants": ["nope", "!ticketing:acme:view"]}"#,
        )
        .await;
    assert_eq!(res.status, 422, "{res:?}");
    assert_eq!(res.json()["reason"], "invalid_fields");
    assert_eq!(res.json()["errors"].as_array().unwrap().len(), 3, "{res:?}");
    let res = auth
        .admin(
            Method::PUT,
            "/auth/v1/users/dave/grants",
            Some(&admin),
            r#"{"grants": "orders:acme:view:order"}"#,
        )
        .await;
    assert_eq!(res.status, 422, "{res:?}");
    for path in [
        "/auth/v1/clients/nobody/grants",
        "/auth/v1/users/nobody/grants",
    ] {
        let res = auth.admin(Method::GET, path, Some(&admin), "").await;
        assert_eq!(res.status, 404, "{res:?}");
    }
    auth.stop().await;
}

#[test]
fn a_bad_grants_file_at_start_up_exits_78_listing_every_problem() {
    let dir = TempDir::new("badgrants");
    let file = dir.path().join("grants.toml");
    std::fs::write(
        &file,
        "[clients.keycards]\nsecret_env = \"KEYCARDS_SECRET\"\ngrants = [\"ticketing:*:view\"]\n\n\
         [clients.lessons]\nsecret = \"hunter2\"\n\n\
         [users.carol]\npassword_hash = \"not-a-hash\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_auth"))
        .env("CHASSIS_BIND", "127.0.0.1:0")
        .env("AUTH_DATA_DIR", dir.path())
        .env("AUTH_GRANTS_FILE", &file)
        .env_remove("KEYCARDS_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("invalid configuration (4 problems):"),
        "{stderr}"
    );
    for problem in [
        "client \"keycards\": grant \"ticketing:*:view\" is not valid",
        "client \"keycards\": the variable KEYCARDS_SECRET of secret_env is not set",
        "client \"lessons\": a literal secret is allowed only in a file that says `demo = true`",
        "user \"carol\": secret_hash:",
    ] {
        assert!(stderr.contains(problem), "{problem} missing: {stderr}");
    }
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(!dir.path().join("auth.db").exists());
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

    // The admin API, on behalf of admin (who holds its permissions).
    let admin_cx = cx
        .clone()
        .with_principal(verifier.verify_token(&admin.access_token).await.unwrap());
    let registered = client
        .register_client(&admin_cx, "lessons", &["ticketing:*:view:ticket"])
        .await
        .unwrap();
    assert_eq!(registered.grants, ["ticketing:*:view:ticket"]);
    assert!(!format!("{registered:?}").contains(&registered.client_secret));
    let replaced = client
        .replace_client_grants(&admin_cx, "lessons", &["mail::send:message"])
        .await
        .unwrap();
    assert_eq!(replaced.managed_by, "api");
    let read = client.client_grants(&admin_cx, "lessons").await.unwrap();
    assert_eq!(read.grants, ["mail::send:message"]);
    let header = token_source(
        &auth.url,
        "lessons",
        chassis::config::Secret::new(registered.client_secret.clone()),
    )
    .unwrap()
    .authorization()
    .await
    .unwrap();
    let bearer = header.to_str().unwrap().strip_prefix("Bearer ").unwrap();
    let principal = verifier.verify_token(bearer).await.unwrap();
    assert_eq!(principal.subject(), "lessons");
    assert_eq!(
        decode(bearer).1["perms"],
        serde_json::json!(["mail::send:message"])
    );
    let err = client
        .replace_client_grants(&admin_cx, "orders", &[])
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            auth::client::AuthClientError::Call(chassis::client::ClientError::Status { status, .. })
                if *status == 409
        ),
        "{err:?}"
    );
    auth.stop().await;
}

// === the binary ===

/// Starts the `auth` binary on the data in `data_dir`.
fn spawn(data_dir: &Path, env: &[(&str, &str)]) -> ServiceProcess {
    let data = data_dir.to_str().expect("a UTF-8 path").to_owned();
    let mut all = vec![
        ("CHASSIS_SHUTDOWN_GRACE_SECS", "5"),
        ("AUTH_DATA_DIR", data.as_str()),
        ("AUTH_SEED_DEMO", "true"),
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
            .any(|l| l["message"] == "grants applied" && l["subjects"] == 6),
        "start-up is logged: {lines:#?}"
    );
    assert!(
        json.iter()
            .any(|l| l["target"] == "chassis::access" && l["correlation_id"] == "auth-binary-1"),
        "{lines:#?}"
    );
    assert!(json.iter().any(|l| l["message"] == "stopped"), "{lines:#?}");
}

#[tokio::test]
async fn the_binary_reads_secrets_from_its_environment_and_logs_a_refused_change() {
    let dir = TempDir::new("binarygrants");
    let file = dir.path().join("grants.toml");
    write_grants(
        &file,
        "[clients.keycards]\nsecret_env = \"KEYCARDS_SECRET\"\ngrants = [\"ticketing:*:view:ticket\"]\n",
    );
    let path = file.to_str().unwrap().to_owned();
    let process = spawn(
        dir.path(),
        &[
            ("AUTH_GRANTS_FILE", path.as_str()),
            ("AUTH_GRANTS_POLL_SECS", "1"),
            ("KEYCARDS_SECRET", "keycards-env-secret"),
            ("AUTH_HASH_MEMORY_KIB", "256"),
            ("AUTH_HASH_ITERATIONS", "1"),
        ],
    );
    let base = process.url("");
    let ready = || async { send(Method::GET, &format!("{base}/health/ready"), &[], "").await };
    eventually("readiness", || async { ready().await.status == 200 }).await;
    let token = || async {
        let res = send(
            Method::POST,
            &format!("{base}/auth/v1/token"),
            &[
                ("content-type", FORM),
                ("authorization", &basic("keycards", "keycards-env-secret")),
            ],
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!(res.status, 200, "{res:?}");
        decode(res.json()["access_token"].as_str().unwrap()).1["perms"].clone()
    };
    assert_eq!(
        token().await,
        serde_json::json!(["ticketing:*:view:ticket"])
    );

    // A change with two problems: refused, logged, shown; the grants stay.
    write_grants(
        &file,
        "[clients.keycards]\nsecret_env = \"NOT_SET_ANYWHERE\"\ngrants = [\"mail::send\"]\n",
    );
    eventually("the refusal shown", || async {
        ready().await.json()["checks"]["grants-file"]["status"] == "down"
    })
    .await;
    assert_eq!(
        token().await,
        serde_json::json!(["ticketing:*:view:ticket"])
    );

    let lines = tokio::task::spawn_blocking(move || process.stop(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(!lines.concat().contains("keycards-env-secret"));
    let json: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let refused: Vec<&str> = json
        .iter()
        .filter(|l| l["message"] == "grants file refused")
        .filter_map(|l| l["problem"].as_str())
        .collect();
    assert_eq!(refused.len(), 2, "{lines:#?}");
    assert!(
        refused
            .iter()
            .any(|p| p.contains("grant \"mail::send\" is not valid"))
    );
    assert!(
        refused
            .iter()
            .any(|p| p.contains("NOT_SET_ANYWHERE of secret_env is not set"))
    );
}

#[test]
fn a_bad_setting_exits_78_listing_every_problem() {
    let dir = TempDir::new("badconfig");
    let out = Command::new(env!("CARGO_BIN_EXE_auth"))
        .env("CHASSIS_BIND", "127.0.0.1:0")
        .env("AUTH_DATA_DIR", dir.path())
        .env("AUTH_TOKEN_TTL_SECS", "0")
        .env("AUTH_PUBLIC_URL", "ftp://auth.example")
        .env("AUTH_GRANTS_POLL_SECS", "0")
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
        "AUTH_GRANTS_POLL_SECS",
    ] {
        assert!(stderr.contains(name), "{name} missing: {stderr}");
    }
    assert!(
        !dir.path().join("auth.db").exists(),
        "nothing is created before the configuration is valid"
    );
}
