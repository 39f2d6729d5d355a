//! Authentication, authorization and audit through a real service stack,
//! with keys served by a real JWKS server on loopback that counts its hits:
//! the bad-token table T1-T32, the key-set table J1-J10, the account
//! injection cases of P14 and one audit event per call.

mod support;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    response::{IntoResponse, Response},
    routing::get,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chassis::{
    Config, ServiceBuilder,
    api::{self, Api, Authz},
    audit::{AuditEvent, AuditSink},
    auth::{JwksOptions, Key, ManualClock, Verifier},
    permission::{AccountId, Permission},
};
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::{Value, json};
use tower::ServiceExt;

const NOW: u64 = 1_800_000_000;
const AUD: &str = "ticketing";
const LEEWAY: u64 = 30;

struct Keys {
    rsa1: EncodingKey,
    rsa2: EncodingKey,
    ec: EncodingKey,
    ed: EncodingKey,
}

fn keys() -> Keys {
    Keys {
        rsa1: EncodingKey::from_rsa_pem(include_bytes!("fixtures/rsa1.pem")).unwrap(),
        rsa2: EncodingKey::from_rsa_pem(include_bytes!("fixtures/rsa2.pem")).unwrap(),
        ec: EncodingKey::from_ec_pem(include_bytes!("fixtures/ec.pk8.pem")).unwrap(),
        ed: EncodingKey::from_ed_pem(include_bytes!("fixtures/ed.pem")).unwrap(),
    }
}

fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
    let mut j = serde_json::to_value(Jwk::from_encoding_key(key, alg).unwrap()).unwrap();
    j["kid"] = json!(kid);
    j
}

fn jwks(entries: &[Value]) -> Value {
    json!({ "keys": entries })
}

/// A JWKS server on loopback whose answer the test controls.
#[derive(Clone)]
struct JwksServer {
    url: String,
    hits: Arc<AtomicUsize>,
    served: Arc<Mutex<Served>>,
}

#[derive(Clone)]
struct Served {
    status: StatusCode,
    content_type: &'static str,
    body: String,
    hang: bool,
}

impl JwksServer {
    async fn start(body: &Value) -> Self {
        let served = Arc::new(Mutex::new(Served {
            status: StatusCode::OK,
            content_type: "application/json",
            body: body.to_string(),
            hang: false,
        }));
        let hits = Arc::new(AtomicUsize::new(0));
        async fn serve(
            State((served, hits)): State<(Arc<Mutex<Served>>, Arc<AtomicUsize>)>,
        ) -> Response {
            hits.fetch_add(1, Ordering::SeqCst);
            let s = served.lock().unwrap().clone();
            if s.hang {
                std::future::pending::<()>().await;
            }
            (s.status, [(header::CONTENT_TYPE, s.content_type)], s.body).into_response()
        }
        let app = Router::new()
            .route("/jwks", get(serve))
            .with_state((served.clone(), hits.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url: format!("http://{addr}/jwks"),
            hits,
            served,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set(&self, f: impl FnOnce(&mut Served)) {
        f(&mut self.served.lock().unwrap());
    }

    fn issuer(&self) -> String {
        // One issuer per server keeps metrics of tests apart.
        self.url.replace("/jwks", "")
    }
}

fn verifier(server: &JwksServer, options: JwksOptions) -> Verifier {
    Verifier::builder()
        .jwks(&server.issuer(), AUD, &server.url)
        .clock(ManualClock::new(NOW))
        .leeway(Duration::from_secs(LEEWAY))
        .jwks_options(options)
        .build()
        .unwrap()
}

#[derive(Clone, Default)]
struct Memory(Arc<Mutex<Vec<AuditEvent>>>);

impl AuditSink for Memory {
    fn write(&self, events: &[AuditEvent]) -> std::io::Result<()> {
        self.0.lock().unwrap().extend_from_slice(events);
        Ok(())
    }
}

async fn list(account: AccountId) -> Json<Value> {
    Json(json!({ "account": account.as_str() }))
}

async fn cancel(account: AccountId, authz: Authz) -> Result<&'static str, api::Forbidden> {
    // Only holders of the owner permission may cancel: a resource-level check.
    let owner = Permission::new("ticketing", Some(&account), "cancel", "own-ticket").unwrap();
    authz.check(&owner)?;
    Ok("cancelled")
}

fn service(verifier: Verifier, audit: &Memory) -> chassis::Service {
    ServiceBuilder::new("ticketing", 1)
        .api(
            Api::new()
                .route(
                    api::get("/{account}/tickets", list)
                        .requires("ticketing:{account}:view:ticket")
                        .undocumented("a test route"),
                )
                .route(
                    api::delete("/{account}/tickets/{id}", cancel)
                        .requires("ticketing:{account}:delete:ticket")
                        .undocumented("a test route"),
                )
                .route(
                    api::get("/status", || async { "open" })
                        .public()
                        .undocumented("a test route"),
                ),
        )
        .verifier(verifier)
        .audit_sink(audit.clone())
        .config(Config::default())
        .build()
        .unwrap()
}

fn claims() -> Value {
    json!({
        "iss": "ISSUER",
        "aud": AUD,
        "sub": "ann",
        "iat": NOW,
        "exp": NOW + 300,
        "perms": ["ticketing:67000001:*:*"],
    })
}

/// Signs `claims` (with `iss` set to the server's issuer unless given).
fn mint(
    server: &JwksServer,
    alg: Algorithm,
    key: &EncodingKey,
    kid: Option<&str>,
    mut claims: Value,
) -> String {
    if claims["iss"] == "ISSUER" {
        claims["iss"] = json!(server.issuer());
    }
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

/// A token from raw JSON parts, signed with `key` when given.
fn raw(header: &str, payload: &str, key: Option<(&EncodingKey, Algorithm)>) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let sig = key.map_or_else(String::new, |(k, alg)| {
        jsonwebtoken::crypto::sign(message.as_bytes(), k, alg).unwrap()
    });
    format!("{message}.{sig}")
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Value,
}

async fn call_with(app: &Router, uri: &str, authorization: &[&[u8]]) -> Answer {
    let mut req = Request::get(uri);
    for a in authorization {
        req = req.header(
            header::AUTHORIZATION,
            http::HeaderValue::from_bytes(a).unwrap(),
        );
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

async fn call(app: &Router, token: &str) -> Answer {
    call_with(
        app,
        "/ticketing/v1/67000001/tickets",
        &[format!("Bearer {token}").as_bytes()],
    )
    .await
}

/// Asserts a 401 with `reason`, the RFC 6750 challenge and no token in the body.
fn assert_refused(a: &Answer, reason: &str, token: &str) {
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    assert_eq!(a.body["reason"], reason, "{}", a.body);
    assert_eq!(a.headers[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(
        a.headers[header::WWW_AUTHENTICATE],
        "Bearer error=\"invalid_token\""
    );
    if token.len() > 20 {
        assert!(
            !a.body.to_string().contains(token),
            "the token leaked into the body"
        );
    }
}

struct Setup {
    keys: Keys,
    server: JwksServer,
    app: Router,
    audit: Memory,
    svc: chassis::Service,
}

async fn setup() -> Setup {
    let keys = keys();
    let server = JwksServer::start(&jwks(&[
        jwk(&keys.rsa1, Algorithm::RS256, "k1"),
        jwk(&keys.ec, Algorithm::ES256, "ec1"),
        jwk(&keys.ed, Algorithm::EdDSA, "ed1"),
    ]))
    .await;
    let audit = Memory::default();
    let svc = service(verifier(&server, JwksOptions::default()), &audit);
    let app = svc.router();
    Setup {
        keys,
        server,
        app,
        audit,
        svc,
    }
}

#[tokio::test]
async fn good_tokens_for_each_algorithm() {
    let s = setup().await;
    for (alg, key, kid) in [
        (Algorithm::RS256, &s.keys.rsa1, "k1"),
        (Algorithm::ES256, &s.keys.ec, "ec1"),
        (Algorithm::EdDSA, &s.keys.ed, "ed1"),
    ] {
        let token = mint(&s.server, alg, key, Some(kid), claims());
        let a = call(&s.app, &token).await;
        assert_eq!(a.status, StatusCode::OK, "{alg:?}: {}", a.body);
        assert_eq!(a.body["account"], "67000001");
    }
    assert_eq!(s.server.hits(), 1, "one fetch serves every key");
}

// T1, T2, T29
#[tokio::test]
async fn authorization_header_shape() {
    let s = setup().await;
    let good = mint(
        &s.server,
        Algorithm::RS256,
        &s.keys.rsa1,
        Some("k1"),
        claims(),
    );

    let a = call_with(&s.app, "/ticketing/v1/67000001/tickets", &[]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.body["reason"], "missing_token");
    assert_eq!(
        a.headers[header::WWW_AUTHENTICATE],
        "Bearer",
        "no error attribute without a token"
    );

    for bad in [
        format!("Basic {good}"),
        "Bearer ".to_owned(),
        format!("Bearer  {good}"),
        format!("Bearer {good} "),
        good.clone(),
    ] {
        let a = call_with(&s.app, "/ticketing/v1/67000001/tickets", &[bad.as_bytes()]).await;
        assert_refused(&a, "malformed", &good);
    }
    let two = format!("Bearer {good}");
    let a = call_with(
        &s.app,
        "/ticketing/v1/67000001/tickets",
        &[two.as_bytes(), two.as_bytes()],
    )
    .await;
    assert_refused(&a, "malformed", &good);

    // The scheme is case-insensitive.
    let lower = format!("bEaReR {good}");
    assert_eq!(
        call_with(
            &s.app,
            "/ticketing/v1/67000001/tickets",
            &[lower.as_bytes()]
        )
        .await
        .status,
        200
    );

    let long = format!("Bearer {}", "a".repeat(8193 - 7));
    assert_refused(
        &call_with(&s.app, "/ticketing/v1/67000001/tickets", &[long.as_bytes()]).await,
        "token_too_large",
        "",
    );
    let huge = format!(
        "Bearer {}.{}.{}",
        "a".repeat(400_000),
        "b".repeat(400_000),
        "c".repeat(200_000)
    );
    assert_refused(
        &call_with(&s.app, "/ticketing/v1/67000001/tickets", &[huge.as_bytes()]).await,
        "token_too_large",
        "",
    );
}

// T3, T4, T5, T6, T30
#[tokio::test]
async fn malformed_tokens() {
    let s = setup().await;
    let good = mint(
        &s.server,
        Algorithm::RS256,
        &s.keys.rsa1,
        Some("k1"),
        claims(),
    );
    let parts: Vec<&str> = good.split('.').collect();
    let rs = Some((&s.keys.rsa1, Algorithm::RS256));
    let header = r#"{"alg":"RS256","kid":"k1"}"#;
    let payload = claims().to_string().replace("ISSUER", &s.server.issuer());
    // Nested past serde_json's depth limit (128) yet under the 8 KiB cap; a
    // 10,000-deep payload is refused as too large before any parsing.
    let deep = format!("{{\"sub\":{}{}}}", "[".repeat(2_500), "]".repeat(2_500));
    let cases: Vec<String> = vec![
        parts[0].to_owned(),
        format!("{}.{}", parts[0], parts[1]),
        format!("{good}.{}", parts[2]),
        "..".to_owned(),
        "thisisnotreallyajwt".to_owned(),
        format!("{}.{}+.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}/", parts[0], parts[1], parts[2]),
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        raw("not json", &payload, rs),
        raw(header, "not json", rs),
        raw(header, "[1,2]", rs),
        raw(header, "\"a string\"", rs),
        raw("[]", &payload, rs),
        raw(r#"["RS256","k1"]"#, &payload, rs),
        raw(header, &deep, rs),
        format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode([0xff, 0xfe, b'{']),
            parts[2]
        ),
    ];
    for token in &cases {
        assert_refused(&call(&s.app, token).await, "malformed", token);
    }
    // A space or newline cannot even be sent in a header; `http` refuses it.
    assert!(http::HeaderValue::from_str(&format!("Bearer {}\n.x.y", parts[0])).is_err());

    // T5: a tweaked last character of the signature.
    let mut tweaked = good.clone();
    let last = tweaked.pop().unwrap();
    tweaked.push(if last == 'A' { 'B' } else { 'A' });
    let a = call(&s.app, &tweaked).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(["malformed", "bad_signature"].contains(&a.body["reason"].as_str().unwrap()));
}

// T7, T8, T9
#[tokio::test]
async fn algorithm_attacks() {
    let s = setup().await;
    let payload = claims().to_string().replace("ISSUER", &s.server.issuer());
    for alg in ["none", "None", "NONE", "nOnE"] {
        let token = raw(&format!(r#"{{"alg":"{alg}","kid":"k1"}}"#), &payload, None);
        assert_refused(&call(&s.app, &token).await, "alg_not_allowed", &token);
    }
    // HS256 with the RSA public key (PEM and DER bytes) as the HMAC secret.
    let pem = include_bytes!("fixtures/rsa1.pub.pem");
    let der = URL_SAFE_NO_PAD
        .decode(
            std::str::from_utf8(pem)
                .unwrap()
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>()
                .replace('+', "-")
                .replace('/', "_")
                .trim_end_matches('='),
        )
        .unwrap();
    for secret in [&pem[..], &der[..]] {
        let token = raw(
            r#"{"alg":"HS256","kid":"k1"}"#,
            &payload,
            Some((&EncodingKey::from_secret(secret).unwrap(), Algorithm::HS256)),
        );
        assert_refused(&call(&s.app, &token).await, "alg_not_allowed", &token);
    }
    // ES256 / PS256 claimed for the RSA-only key.
    for (alg, key) in [
        (Algorithm::ES256, &s.keys.ec),
        (Algorithm::PS256, &s.keys.rsa1),
    ] {
        let token = mint(&s.server, alg, key, Some("k1"), claims());
        assert_refused(&call(&s.app, &token).await, "alg_not_allowed", &token);
    }
}

// T10, T11, T12, T13
#[tokio::test]
async fn signatures() {
    let s = setup().await;
    let other = mint(
        &s.server,
        Algorithm::RS256,
        &s.keys.rsa2,
        Some("k1"),
        claims(),
    );
    assert_refused(&call(&s.app, &other).await, "bad_signature", &other);

    let good = mint(
        &s.server,
        Algorithm::RS256,
        &s.keys.rsa1,
        Some("k1"),
        claims(),
    );
    let stripped = format!("{}.", good.rsplit_once('.').unwrap().0);
    assert_refused(&call(&s.app, &stripped).await, "bad_signature", &stripped);

    for change in [
        ("\"sub\":\"ann\"", "\"sub\":\"bob\""),
        ("\"aud\":\"ticketing\"", "\"aud\":\"orders\""),
    ] {
        let parts: Vec<&str> = good.split('.').collect();
        let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert!(payload.contains(change.0), "{payload}");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(payload.replace(change.0, change.1)),
            parts[2]
        );
        assert_refused(&call(&s.app, &forged).await, "bad_signature", &forged);
    }

    let mut expired = claims();
    expired["exp"] = json!(NOW - 3600);
    expired["iat"] = json!(NOW - 4000);
    let forged_expired = mint(
        &s.server,
        Algorithm::RS256,
        &s.keys.rsa2,
        Some("k1"),
        expired,
    );
    assert_refused(
        &call(&s.app, &forged_expired).await,
        "bad_signature",
        &forged_expired,
    );
}

// T14, T15, T16
#[tokio::test]
async fn key_ids() {
    let s = setup().await;
    let warm = mint(
        &s.server,
        Algorithm::RS256,
        &s.keys.rsa1,
        Some("k1"),
        claims(),
    );
    assert_eq!(call(&s.app, &warm).await.status, 200);
    let before = s.server.hits();

    let unknown = mint(
        &s.server,
        Algorithm::RS256,
        &s.keys.rsa1,
        Some("nope"),
        claims(),
    );
    assert_refused(&call(&s.app, &unknown).await, "unknown_kid", &unknown);
    // Within the cooldown no refetch happens.
    assert_eq!(s.server.hits(), before);

    let payload = claims().to_string().replace("ISSUER", &s.server.issuer());
    for kid in [
        "../../etc/passwd".to_owned(),
        "' OR 1=1--".to_owned(),
        "k".repeat(5_000),
        "k1\u{0}".to_owned(),
        "k1\n".to_owned(),
    ] {
        let header = json!({ "alg": "RS256", "kid": kid }).to_string();
        let token = raw(&header, &payload, Some((&s.keys.rsa1, Algorithm::RS256)));
        let a = call(&s.app, &token).await;
        assert_refused(&a, "unknown_kid", &token);
    }

    // A 10 KB kid makes the token too large to look at.
    let header = json!({ "alg": "RS256", "kid": "k".repeat(10_000) }).to_string();
    let token = raw(&header, &payload, Some((&s.keys.rsa1, Algorithm::RS256)));
    assert_refused(&call(&s.app, &token).await, "token_too_large", &token);

    // Embedded or remote keys in the header are never used, never fetched.
    let attacker = JwksServer::start(&jwks(&[jwk(&s.keys.rsa2, Algorithm::RS256, "evil")])).await;
    let attacker_jwk = jwk(&s.keys.rsa2, Algorithm::RS256, "evil");
    for header in [
        json!({ "alg": "RS256", "kid": "evil", "jku": attacker.url }),
        json!({ "alg": "RS256", "kid": "evil", "x5u": attacker.url }),
        json!({ "alg": "RS256", "kid": "evil", "jwk": attacker_jwk }),
        json!({ "alg": "RS256", "kid": "k1", "jwk": attacker_jwk }),
    ] {
        let token = raw(
            &header.to_string(),
            &payload,
            Some((&s.keys.rsa2, Algorithm::RS256)),
        );
        let a = call(&s.app, &token).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert!(["unknown_kid", "bad_signature"].contains(&a.body["reason"].as_str().unwrap()));
    }
    assert_eq!(
        attacker.hits(),
        0,
        "no outbound fetch to a token-supplied URL"
    );
}

// T17, T18
#[tokio::test]
async fn header_policies() {
    let s = setup().await;
    let payload = claims().to_string().replace("ISSUER", &s.server.issuer());
    let rs = Some((&s.keys.rsa1, Algorithm::RS256));
    for crit in [
        json!({"alg":"RS256","kid":"k1","crit":["foo"],"foo":1}),
        json!({"alg":"RS256","kid":"k1","crit":["exp"]}),
        json!({"alg":"RS256","kid":"k1","crit":[]}),
    ] {
        let token = raw(&crit.to_string(), &payload, rs);
        assert_refused(&call(&s.app, &token).await, "unsupported_crit", &token);
    }
    for typ in ["id_token", "JOSE+JSON", "secevent+jwt"] {
        let token = raw(
            &json!({"alg":"RS256","kid":"k1","typ":typ}).to_string(),
            &payload,
            rs,
        );
        assert_refused(&call(&s.app, &token).await, "bad_typ", &token);
    }
    for typ in ["JWT", "jwt", "at+jwt", "application/at+jwt"] {
        let token = raw(
            &json!({"alg":"RS256","kid":"k1","typ":typ}).to_string(),
            &payload,
            rs,
        );
        assert_eq!(call(&s.app, &token).await.status, 200, "{typ}");
    }
}

/// A change to the baseline claims, and the reason expected (`None`: 200).
type ClaimCase = (Box<dyn FnOnce(&mut Value)>, Option<&'static str>);

/// Claims tests share this: a token with one claim changed.
async fn with_claims(s: &Setup, f: impl FnOnce(&mut Value)) -> Answer {
    let mut c = claims();
    c["iss"] = json!(s.server.issuer());
    f(&mut c);
    let token = raw(
        r#"{"alg":"RS256","kid":"k1"}"#,
        &c.to_string(),
        Some((&s.keys.rsa1, Algorithm::RS256)),
    );
    call(&s.app, &token).await
}

// T19-T25
#[tokio::test]
async fn time_claims() {
    let s = setup().await;
    let cases: Vec<ClaimCase> = vec![
        (
            Box::new(|c| c["exp"] = json!(NOW - LEEWAY - 1)),
            Some("expired"),
        ),
        (
            Box::new(|c| c["exp"] = json!(NOW - LEEWAY)),
            Some("expired"),
        ),
        (Box::new(|c| c["exp"] = json!(NOW - LEEWAY + 1)), None),
        (
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            Some("missing_claim"),
        ),
        (Box::new(|c| c["exp"] = Value::Null), Some("missing_claim")),
        (
            Box::new(|c| c["exp"] = json!("9999999999")),
            Some("bad_claim_type"),
        ),
        (
            Box::new(|c| c["nbf"] = json!("99999999999")),
            Some("bad_claim_type"),
        ),
        (Box::new(|c| c["exp"] = json!(-1)), Some("bad_claim_type")),
        (
            Box::new(|c| c["exp"] = json!(1e300)),
            Some("bad_claim_type"),
        ),
        (Box::new(|c| c["exp"] = json!(true)), Some("bad_claim_type")),
        (Box::new(|c| c["exp"] = json!([1])), Some("bad_claim_type")),
        (Box::new(|c| c["exp"] = json!({})), Some("bad_claim_type")),
        (
            Box::new(|c| c["exp"] = json!(u64::MAX)),
            Some("lifetime_too_long"),
        ),
        (
            Box::new(|c| c["exp"] = json!(NOW + 10 * 365 * 86_400)),
            Some("lifetime_too_long"),
        ),
        (
            Box::new(|c| c["exp"] = json!((NOW + 300) as f64 + 0.5)),
            None,
        ),
        (
            Box::new(|c| c["nbf"] = json!(NOW + LEEWAY + 1)),
            Some("not_yet_valid"),
        ),
        (Box::new(|c| c["nbf"] = json!(NOW + LEEWAY)), None),
        (
            Box::new(|c| c["iat"] = json!(NOW + LEEWAY + 1)),
            Some("iat_in_future"),
        ),
        (Box::new(|c| c["iat"] = json!(NOW + LEEWAY)), None),
    ];
    for (i, (change, want)) in cases.into_iter().enumerate() {
        let a = with_claims(&s, change).await;
        match want {
            Some(reason) => {
                assert_eq!(a.status, StatusCode::UNAUTHORIZED, "case {i}: {}", a.body);
                assert_eq!(a.body["reason"], reason, "case {i}");
            }
            None => assert_eq!(a.status, StatusCode::OK, "case {i}: {}", a.body),
        }
    }
}

/// A grant that holds a `!` but is not a valid grant refuses the token at
/// the verifier, whatever else the token grants.
#[tokio::test]
async fn verify_at_judges_time_claims_as_of_the_given_time() {
    let s = setup().await;
    let verifier = verifier(&s.server, JwksOptions::default());
    // Expired by the verifier's clock (NOW), valid at NOW - 600.
    let mut c = claims();
    c["iat"] = json!(NOW - 900);
    c["exp"] = json!(NOW - 300);
    let token = mint(&s.server, Algorithm::EdDSA, &s.keys.ed, Some("ed1"), c);
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    let expired = |r: Result<_, chassis::auth::AuthError>| r.unwrap_err().reason().code();
    assert_eq!(expired(verifier.verify(&headers).await), "expired");
    let then = verifier.verify_at(&headers, NOW - 600).await.unwrap();
    assert_eq!(then.subject(), "ann");
    // The leeway applies to the given time as to now.
    assert!(
        verifier
            .verify_at(&headers, NOW - 300 + LEEWAY - 1)
            .await
            .is_ok()
    );
    assert_eq!(
        expired(verifier.verify_at(&headers, NOW - 300 + LEEWAY).await),
        "expired"
    );
    // Not yet issued at the given time.
    assert_eq!(
        expired(verifier.verify_at(&headers, NOW - 900 - LEEWAY - 1).await),
        "iat_in_future"
    );
    // Verifying at a past time fills no cache: now it is still refused.
    assert_eq!(expired(verifier.verify(&headers).await), "expired");
    // Everything else is checked as for `verify`.
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {forged}").parse().unwrap(),
    );
    assert_eq!(
        expired(verifier.verify_at(&headers, NOW - 600).await),
        "bad_signature"
    );
    assert_eq!(
        expired(verifier.verify_at(&http::HeaderMap::new(), NOW).await),
        "missing_token"
    );
}

#[tokio::test]
async fn malformed_deny_grants_refuse_the_token_at_the_verifier() {
    let keys = keys();
    let server = JwksServer::start(&jwks(&[jwk(&keys.rsa1, Algorithm::RS256, "k1")])).await;
    let v = verifier(&server, JwksOptions::default());
    let with_perms = |perms: Value| {
        let mut c = claims();
        c["perms"] = perms;
        mint(&server, Algorithm::RS256, &keys.rsa1, Some("k1"), c)
    };
    for bad in [
        " !ticketing:1:delete:*",
        "!ticketing:1:delete",
        "!!x:y:z:w",
        "ticketing:1:delete:*!",
        "\t!ticketing:1:delete:*",
    ] {
        let token = with_perms(json!(["ticketing:*:*:*", bad]));
        assert_eq!(
            v.verify_token(&token).await.unwrap_err(),
            chassis::auth::Reason::BadClaimType,
            "{bad:?} was not refused"
        );
    }
    // A valid deny and a malformed allow are both fine.
    let token = with_perms(json!([
        "ticketing:*:*:*",
        "!ticketing:1:delete:*",
        " ticketing:2:view:*"
    ]));
    let principal = v.verify_token(&token).await.unwrap();
    assert_eq!(principal.grants().len(), 2);
}

// T26, T27, T28, T31, and sub/perms types
#[tokio::test]
async fn identity_claims() {
    let s = setup().await;
    let iss = s.server.issuer();
    let cases: Vec<ClaimCase> = vec![
        (
            Box::new(|c| c["iss"] = json!("http://evil.test")),
            Some("bad_issuer"),
        ),
        (
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("iss");
            }),
            Some("missing_claim"),
        ),
        (
            Box::new({
                let iss = iss.clone();
                move |c| c["iss"] = json!(iss.to_uppercase())
            }),
            Some("bad_issuer"),
        ),
        (
            Box::new({
                let iss = iss.clone();
                move |c| c["iss"] = json!(format!("{iss}/"))
            }),
            Some("bad_issuer"),
        ),
        (
            Box::new({
                let iss = iss.clone();
                move |c| c["iss"] = json!([iss])
            }),
            Some("bad_issuer"),
        ),
        (
            Box::new(|c| c["aud"] = json!("orders")),
            Some("bad_audience"),
        ),
        (
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
            Some("missing_claim"),
        ),
        (Box::new(|c| c["aud"] = json!([])), Some("bad_audience")),
        (Box::new(|c| c["aud"] = json!(123)), Some("bad_audience")),
        (
            Box::new(|c| c["aud"] = json!(["other"])),
            Some("bad_audience"),
        ),
        (Box::new(|c| c["aud"] = json!(["other", "ticketing"])), None),
        (
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("sub");
            }),
            Some("missing_claim"),
        ),
        (Box::new(|c| c["sub"] = json!("")), Some("bad_claim_type")),
        (Box::new(|c| c["sub"] = json!(42)), Some("bad_claim_type")),
        (
            Box::new(|c| c["perms"] = json!("ticketing:67000001:*:*")),
            Some("bad_claim_type"),
        ),
        (
            Box::new(|c| c["perms"] = json!([1])),
            Some("bad_claim_type"),
        ),
        (
            Box::new(|c| c["perms"] = json!(["ticketing:67000001:*:*", "!Bad:deny"])),
            Some("bad_claim_type"),
        ),
        // A malformed deny grant refuses the token wherever its `!` sits:
        // ignoring it would allow what it meant to deny.
        (
            Box::new(|c| {
                c["perms"] = json!(["ticketing:67000001:*:*", " !ticketing:67000001:view:*"])
            }),
            Some("bad_claim_type"),
        ),
        (
            Box::new(|c| {
                c["perms"] = json!(["ticketing:67000001:*:*", "!ticketing:67000001:view"])
            }),
            Some("bad_claim_type"),
        ),
        (
            Box::new(|c| {
                c["perms"] = json!(["ticketing:67000001:*:*", "!!ticketing:67000001:view:*"])
            }),
            Some("bad_claim_type"),
        ),
        (
            Box::new(|c| {
                c["perms"] = json!(["ticketing:67000001:*:*", "ticketing:67000001:view:!ticket"])
            }),
            Some("bad_claim_type"),
        ),
        // A malformed allow grant (no `!`) is ignored: it only narrows.
        (
            Box::new(|c| {
                c["perms"] = json!(["ticketing:67000001:*:*", " ticketing:67000001:view:*"])
            }),
            None,
        ),
        (
            Box::new(|c| c["kind"] = json!("robot")),
            Some("bad_claim_type"),
        ),
    ];
    for (i, (change, want)) in cases.into_iter().enumerate() {
        let a = with_claims(&s, change).await;
        match want {
            Some(reason) => {
                assert_eq!(a.status, StatusCode::UNAUTHORIZED, "case {i}: {}", a.body);
                assert_eq!(a.body["reason"], reason, "case {i}");
            }
            None => assert_eq!(a.status, StatusCode::OK, "case {i}: {}", a.body),
        }
    }
    // T28: duplicate members, in the claims and in the header.
    let dup_claims = format!(
        r#"{{"iss":"{iss}","aud":"ticketing","sub":"ann","iat":{NOW},"exp":1,"exp":{}}}"#,
        NOW + 300
    );
    let token = raw(
        r#"{"alg":"RS256","kid":"k1"}"#,
        &dup_claims,
        Some((&s.keys.rsa1, Algorithm::RS256)),
    );
    assert_refused(&call(&s.app, &token).await, "malformed", &token);
    let payload = claims().to_string().replace("ISSUER", &iss);
    let token = raw(
        r#"{"alg":"RS256","alg":"none","kid":"k1"}"#,
        &payload,
        Some((&s.keys.rsa1, Algorithm::RS256)),
    );
    assert_refused(&call(&s.app, &token).await, "malformed", &token);
}

// T32
#[test]
fn short_hmac_secrets_refuse_to_start() {
    use chassis::config::{Env, Reader};
    let env = Env::from_pairs([
        ("CHASSIS_AUTH_ISSUER", "http://auth.test"),
        ("CHASSIS_AUTH_AUDIENCE", "ticketing"),
        ("CHASSIS_AUTH_HS256_SECRET", "too-short-secret"),
    ]);
    let mut r = Reader::new(&env);
    let _ = chassis::auth::AuthConfig::read(&mut r);
    let text = r.finish().unwrap_err().to_string();
    assert!(
        text.contains("CHASSIS_AUTH_HS256_SECRET: must be at least 32 bytes"),
        "{text}"
    );
    assert!(
        !text.contains("too-short-secret"),
        "the secret never prints"
    );
    assert!(Key::hmac(None, Algorithm::HS256, b"short").is_err());
}

// J1
#[tokio::test]
async fn cold_cache_fetches_once_for_many_callers() {
    let k = keys();
    let server = JwksServer::start(&jwks(&[jwk(&k.rsa1, Algorithm::RS256, "k1")])).await;
    let v = verifier(&server, JwksOptions::default());
    let token = mint(&server, Algorithm::RS256, &k.rsa1, Some("k1"), claims());
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (v, t) = (v.clone(), token.clone());
            tokio::spawn(async move { v.verify_token(&t).await })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().is_ok());
    }
    assert_eq!(server.hits(), 1);
}

// J2
#[tokio::test]
async fn unknown_kids_cannot_force_refetches() {
    let k = keys();
    let server = JwksServer::start(&jwks(&[jwk(&k.rsa1, Algorithm::RS256, "k1")])).await;
    let v = verifier(&server, JwksOptions::default());
    let good = mint(&server, Algorithm::RS256, &k.rsa1, Some("k1"), claims());
    v.verify_token(&good).await.unwrap();
    for i in 0..1000 {
        let t = mint(
            &server,
            Algorithm::RS256,
            &k.rsa1,
            Some(&format!("random-{i}")),
            claims(),
        );
        assert_eq!(v.verify_token(&t).await.unwrap_err().code(), "unknown_kid");
    }
    assert_eq!(server.hits(), 1, "no fetch within the cooldown");
}

fn eager() -> JwksOptions {
    JwksOptions {
        timeout: Duration::from_millis(300),
        cooldown: Duration::ZERO,
        default_max_age: Duration::from_secs(600),
        max_age_bounds: (Duration::ZERO, Duration::from_secs(86_400)),
        stale_limit: Duration::from_secs(86_400),
        max_bytes: 64 * 1024,
        cold_retry: Duration::ZERO,
    }
}

// J3, J4
#[tokio::test]
async fn rotation_and_removal() {
    let k = keys();
    let server = JwksServer::start(&jwks(&[jwk(&k.rsa1, Algorithm::RS256, "k1")])).await;
    let audit = Memory::default();
    let svc = service(verifier(&server, eager()), &audit);
    let app = svc.router();
    let t1 = mint(&server, Algorithm::RS256, &k.rsa1, Some("k1"), claims());
    let t2 = mint(&server, Algorithm::RS256, &k.rsa2, Some("k2"), claims());
    assert_eq!(call(&app, &t1).await.status, 200);
    assert_eq!(server.hits(), 1);

    // The issuer publishes K2 next to K1.
    server.set(|s| {
        s.body = jwks(&[
            jwk(&k.rsa1, Algorithm::RS256, "k1"),
            jwk(&k.rsa2, Algorithm::RS256, "k2"),
        ])
        .to_string();
    });
    assert_eq!(
        call(&app, &t2).await.status,
        200,
        "the first K2 token refetches"
    );
    assert_eq!(server.hits(), 2);
    assert_eq!(
        call(&app, &t1).await.status,
        200,
        "K1 tokens keep passing (cached)"
    );

    // K1 leaves the set; once the set is refreshed, K1 tokens are refused,
    // including the one whose verification was cached.
    server.set(|s| s.body = jwks(&[jwk(&k.rsa2, Algorithm::RS256, "k2")]).to_string());
    svc_refresh(&app, &t2).await;
    let a = call(&app, &t1).await;
    assert_refused(&a, "unknown_kid", &t1);
}

// A kid whose key material changes, and a kid that becomes ambiguous: tokens
// whose verification was cached under the old key stop passing.
#[tokio::test]
async fn a_cached_token_does_not_outlive_a_replaced_key() {
    let k = keys();
    for replaced in [
        // The issuer reuses kid k1 for another key.
        jwks(&[
            jwk(&k.rsa2, Algorithm::RS256, "k1"),
            jwk(&k.ed, Algorithm::EdDSA, "ed1"),
        ]),
        // k1 now names two keys: ambiguous.
        jwks(&[
            jwk(&k.rsa1, Algorithm::RS256, "k1"),
            jwk(&k.rsa2, Algorithm::RS256, "k1"),
            jwk(&k.ed, Algorithm::EdDSA, "ed1"),
        ]),
    ] {
        let server = JwksServer::start(&jwks(&[jwk(&k.rsa1, Algorithm::RS256, "k1")])).await;
        let audit = Memory::default();
        let app = service(verifier(&server, eager()), &audit).router();
        let t1 = mint(&server, Algorithm::RS256, &k.rsa1, Some("k1"), claims());
        assert_eq!(call(&app, &t1).await.status, 200);
        assert_eq!(call(&app, &t1).await.status, 200, "cached");
        server.set(|s| s.body = replaced.to_string());
        svc_refresh(&app, &t1).await;
        let a = call(&app, &t1).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{replaced}: {}", a.body);
        assert!(
            ["bad_signature", "unknown_kid"].contains(&a.body["reason"].as_str().unwrap()),
            "{}",
            a.body
        );
    }
}

// While the issuer is down at a cold start, concurrent callers share one
// attempt and its failure, and are answered at once.
#[tokio::test]
async fn a_cold_start_with_the_issuer_down_costs_one_fetch() {
    let k = keys();
    let server = JwksServer::start(&jwks(&[jwk(&k.rsa1, Algorithm::RS256, "k1")])).await;
    server.set(|s| s.status = StatusCode::SERVICE_UNAVAILABLE);
    let v = verifier(&server, JwksOptions::default());
    let token = mint(&server, Algorithm::RS256, &k.rsa1, Some("k1"), claims());
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (v, t) = (v.clone(), token.clone());
            tokio::spawn(async move { v.verify_token(&t).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap_err().code(), "jwks_unavailable");
    }
    assert_eq!(server.hits(), 1, "one attempt, shared by every caller");
    // Within the cold-retry interval, more callers cost nothing.
    for _ in 0..20 {
        assert_eq!(
            v.verify_token(&token).await.unwrap_err().code(),
            "jwks_unavailable"
        );
    }
    assert_eq!(server.hits(), 1);
}

/// Forces a refresh through a request with an unknown kid (cooldown is 0).
async fn svc_refresh(app: &Router, any: &str) {
    let _ = any;
    let k = keys();
    let probe = jsonwebtoken::encode(
        &Header {
            kid: Some("probe".to_owned()),
            ..Header::new(Algorithm::RS256)
        },
        &json!({}),
        &k.rsa1,
    )
    .unwrap();
    let _ = call(app, &probe).await;
}

// J5
#[tokio::test]
async fn hanging_key_server() {
    let k = keys();
    // Cold: the fetch is cut at its timeout and the answer is 503.
    let server = JwksServer::start(&jwks(&[jwk(&k.rsa1, Algorithm::RS256, "k1")])).await;
    server.set(|s| s.hang = true);
    let audit = Memory::default();
    let app = service(verifier(&server, eager()), &audit).router();
    let token = mint(&server, Algorithm::RS256, &k.rsa1, Some("k1"), claims());
    let a = call(&app, &token).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert_eq!(a.body["reason"], "jwks_unavailable");
    assert_eq!(a.headers[header::RETRY_AFTER], "5");

    // Warm: known kids keep passing while refreshes hang.
    let server = JwksServer::start(&jwks(&[jwk(&k.rsa1, Algorithm::RS256, "k1")])).await;
    let v = verifier(&server, eager());
    let t1 = mint(&server, Algorithm::RS256, &k.rsa1, Some("k1"), claims());
    v.verify_token(&t1).await.unwrap();
    server.set(|s| s.hang = true);
    let t_unknown = mint(&server, Algorithm::RS256, &k.rsa1, Some("other"), claims());
    assert_eq!(
        v.verify_token(&t_unknown).await.unwrap_err().code(),
        "unknown_kid"
    );
    assert!(server.hits() >= 2, "a refresh was attempted");
    v.verify_token(&t1).await.unwrap();
}

// J6
#[tokio::test]
async fn failed_refreshes_keep_the_last_good_set() {
    let handle = chassis::metrics::install_recorder();
    let k = keys();
    let server = JwksServer::start(&jwks(&[jwk(&k.rsa1, Algorithm::RS256, "k1")])).await;
    let v = verifier(&server, eager());
    let t1 = mint(&server, Algorithm::RS256, &k.rsa1, Some("k1"), claims());
    v.verify_token(&t1).await.unwrap();
    for broken in [
        Served {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            content_type: "application/json",
            body: "{}".into(),
            hang: false,
        },
        Served {
            status: StatusCode::OK,
            content_type: "application/json",
            body: "{not json".into(),
            hang: false,
        },
        Served {
            status: StatusCode::OK,
            content_type: "text/html",
            body: jwks(&[]).to_string(),
            hang: false,
        },
        Served {
            status: StatusCode::OK,
            content_type: "application/json",
            body: format!("{{\"keys\":[],\"pad\":\"{}\"}}", "x".repeat(70_000)),
            hang: false,
        },
        Served {
            status: StatusCode::OK,
            content_type: "application/json",
            body: jwks(&[]).to_string(),
            hang: false,
        },
    ] {
        server.set(|s| *s = broken);
        let unknown = mint(
            &server,
            Algorithm::RS256,
            &k.rsa1,
            Some("missing"),
            claims(),
        );
        assert_eq!(
            v.verify_token(&unknown).await.unwrap_err().code(),
            "unknown_kid"
        );
        v.verify_token(&t1)
            .await
            .expect("the last good set is kept");
    }
    assert_eq!(server.hits(), 6);
    let issuer = server.issuer();
    let text = handle.render();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("jwks_fetches_total")
                && l.contains(&issuer)
                && l.contains("outcome=\"error\"")
        })
        .unwrap_or_else(|| panic!("no error counter for {issuer}:\n{text}"));
    assert!(line.ends_with(" 5"), "{line}");
}

// J7, J8, J9
#[tokio::test]
async fn odd_key_sets() {
    let k = keys();
    let akp = json!({ "kty": "AKP", "alg": "ML-DSA-44", "kid": "pq", "pub": "AAAA" });
    let oct = json!({ "kty": "oct", "kid": "sym", "k": URL_SAFE_NO_PAD.encode(b"0123456789abcdef0123456789abcdef") });
    let enc = {
        let mut j = jwk(&k.rsa2, Algorithm::RS256, "enc");
        j["use"] = json!("enc");
        j
    };
    let server = JwksServer::start(&jwks(&[
        akp,
        oct,
        enc,
        jwk(&k.rsa1, Algorithm::RS256, "k1"),
        jwk(&k.rsa1, Algorithm::RS256, "dup"),
        jwk(&k.rsa2, Algorithm::RS256, "dup"),
    ]))
    .await;
    let v = verifier(&server, JwksOptions::default());
    let t1 = mint(&server, Algorithm::RS256, &k.rsa1, Some("k1"), claims());
    v.verify_token(&t1)
        .await
        .expect("the RSA key is usable next to an unknown kty");
    let dup = mint(&server, Algorithm::RS256, &k.rsa1, Some("dup"), claims());
    assert_eq!(
        v.verify_token(&dup).await.unwrap_err().code(),
        "unknown_kid",
        "a duplicated kid fails closed"
    );
    let enc_token = mint(&server, Algorithm::RS256, &k.rsa2, Some("enc"), claims());
    assert_eq!(
        v.verify_token(&enc_token).await.unwrap_err().code(),
        "unknown_kid"
    );
    let hs = mint(
        &server,
        Algorithm::HS256,
        &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef").unwrap(),
        Some("sym"),
        claims(),
    );
    assert_eq!(
        v.verify_token(&hs).await.unwrap_err().code(),
        "alg_not_allowed"
    );
}

// P14 through real requests on a socket: values outside the grammar never
// reach authorization.
#[tokio::test]
async fn account_injection_is_refused_before_authorization() {
    let Setup {
        keys,
        server,
        audit,
        svc,
        ..
    } = setup().await;
    let auditor = svc.auditor().clone();
    let running = support::start(svc).await;
    let mut c = claims();
    c["perms"] = json!(["*:*:*:*"]);
    let root = mint(&server, Algorithm::RS256, &keys.rsa1, Some("k1"), c);
    let bearer = format!("Bearer {root}");
    let long = "1".repeat(65);
    let accounts = [
        "*",
        "%2A",
        "1%3Acreate",
        "1:create",
        "1,2",
        "%D9%A6%D9%A7",
        "1%00",
        "1%0a",
        "a%20b",
        "",
        long.as_str(),
    ];
    for account in accounts {
        let url = running.url(&format!("/ticketing/v1/{account}/tickets"));
        let a = support::send(http::Method::GET, &url, &[("authorization", &bearer)], "")
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{account}: {}", a.text());
        assert_eq!(a.headers[header::CONTENT_TYPE], "application/problem+json");
    }
    // A valid account with the same token passes, escaped or not: an escape
    // is decoded as axum's extractors decode it, before the grammar check.
    for account in ["67000001", "%36%37000001"] {
        let url = running.url(&format!("/ticketing/v1/{account}/tickets"));
        let a = support::send(http::Method::GET, &url, &[("authorization", &bearer)], "")
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::OK, "{account}: {}", a.text());
        assert_eq!(a.json()["account"], "67000001");
    }
    auditor.flush();
    let events = audit.0.lock().unwrap();
    let rejected: Vec<_> = events
        .iter()
        .filter(|e| e.reason == Some("invalid_path"))
        .collect();
    assert_eq!(rejected.len(), accounts.len(), "each refusal is audited");
    assert!(
        rejected
            .iter()
            .all(|e| e.permission.is_none() && e.subject.as_ref() == "ann")
    );
    running.task.abort();
}

#[tokio::test]
async fn permissions_and_one_audit_event_per_call() {
    let s = setup().await;
    let viewer = {
        let mut c = claims();
        c["perms"] = json!(["ticketing:67000001:view:ticket"]);
        mint(&s.server, Algorithm::RS256, &s.keys.rsa1, Some("k1"), c)
    };
    let owner = {
        let mut c = claims();
        c["sub"] = json!("svc-orders");
        c["kind"] = json!("service");
        c["perms"] = json!(["ticketing:*:*:*", "!ticketing:67000002:*:*"]);
        mint(&s.server, Algorithm::RS256, &s.keys.rsa1, Some("k1"), c)
    };
    let b = |t: &str| format!("Bearer {t}");
    let req = |method: &str, uri: &str, token: Option<&str>| {
        let mut r = Request::builder()
            .method(method)
            .uri(uri)
            .header("x-correlation-id", "audit-1");
        if let Some(t) = token {
            r = r.header(header::AUTHORIZATION, b(t));
        }
        r.body(Body::empty()).unwrap()
    };
    let send = |r| async { s.app.clone().oneshot(r).await.unwrap() };
    // allowed
    assert_eq!(
        send(req("GET", "/ticketing/v1/67000001/tickets", Some(&viewer)))
            .await
            .status(),
        200
    );
    // another account's data: 403 naming the permission
    let res = send(req("GET", "/ticketing/v1/67000002/tickets", Some(&viewer))).await;
    assert_eq!(res.status(), 403);
    let body: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["permission"], "ticketing:67000002:view:ticket");
    assert_eq!(body["reason"], "forbidden");
    // deny wins for the service with a wildcard grant
    assert_eq!(
        send(req("GET", "/ticketing/v1/67000002/tickets", Some(&owner)))
            .await
            .status(),
        403
    );
    // the route allows, the resource-level check denies
    assert_eq!(
        send(req(
            "DELETE",
            "/ticketing/v1/67000001/tickets/9",
            Some(&owner)
        ))
        .await
        .status(),
        200
    );
    let mut c = claims();
    c["perms"] = json!(["ticketing:67000001:delete:ticket"]);
    let deleter = mint(&s.server, Algorithm::RS256, &s.keys.rsa1, Some("k1"), c);
    let res = send(req(
        "DELETE",
        "/ticketing/v1/67000001/tickets/9",
        Some(&deleter),
    ))
    .await;
    assert_eq!(res.status(), 403);
    // unauthenticated
    assert_eq!(
        send(req("GET", "/ticketing/v1/67000001/tickets", None))
            .await
            .status(),
        401
    );
    // public
    assert_eq!(
        send(req("GET", "/ticketing/v1/status", None))
            .await
            .status(),
        200
    );
    // rejected before authorization: no such method
    assert_eq!(
        send(req("PUT", "/ticketing/v1/status", None))
            .await
            .status(),
        405
    );
    // not an API call: not audited
    assert_eq!(send(req("GET", "/health/live", None)).await.status(), 200);

    s.svc.auditor().flush();
    let events = s.audit.0.lock().unwrap();
    let summary: Vec<(String, String, Option<&str>, u16, String)> = events
        .iter()
        .map(|e| {
            (
                e.subject.to_string(),
                e.decision.as_str().to_owned(),
                e.reason,
                e.status,
                e.permission
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "ann".into(),
                "allow".into(),
                None,
                200,
                "ticketing:67000001:view:ticket".into()
            ),
            (
                "ann".into(),
                "deny".into(),
                Some("forbidden"),
                403,
                "ticketing:67000002:view:ticket".into()
            ),
            (
                "svc-orders".into(),
                "deny".into(),
                Some("forbidden"),
                403,
                "ticketing:67000002:view:ticket".into()
            ),
            (
                "svc-orders".into(),
                "allow".into(),
                None,
                200,
                "ticketing:67000001:delete:ticket".into()
            ),
            (
                "ann".into(),
                "deny".into(),
                Some("forbidden"),
                403,
                "ticketing:67000001:cancel:own-ticket".into()
            ),
            (
                "anonymous".into(),
                "unauthenticated".into(),
                Some("missing_token"),
                401,
                String::new()
            ),
            (
                "anonymous".into(),
                "allow".into(),
                Some("public"),
                200,
                String::new()
            ),
            (
                "anonymous".into(),
                "rejected".into(),
                Some("method_not_allowed"),
                405,
                String::new()
            ),
        ]
    );
    let e = &events[3];
    assert_eq!(e.subject_kind, "service");
    assert!(e.mutation, "a successful DELETE is a mutation");
    assert!(!events[0].mutation);
    assert_eq!(e.route.as_str(), "/ticketing/v1/{account}/tickets/{id}");
    assert_eq!(e.account.as_ref().unwrap().as_str(), "67000001");
    assert!(
        events
            .iter()
            .all(|e| e.correlation_id.as_ref().map(|c| c.as_str()) == Some("audit-1"))
    );
}

#[tokio::test]
async fn shutdown_flushes_the_audit_queue() {
    #[derive(Clone, Default)]
    struct Slow(Memory);
    impl AuditSink for Slow {
        fn write(&self, events: &[AuditEvent]) -> std::io::Result<()> {
            std::thread::sleep(Duration::from_millis(20));
            self.0.write(events)
        }
    }
    let slow = Slow::default();
    let svc = ServiceBuilder::new("flush", 1)
        .api(
            Api::new().route(
                api::get("/ping", || async { "pong" })
                    .public()
                    .undocumented("a test route"),
            ),
        )
        .audit_sink(slow.clone())
        .config(Config::default())
        .build()
        .unwrap();
    let mut running = support::start(svc).await;
    for _ in 0..50 {
        assert_eq!(
            support::get(&running.url("/flush/v1/ping")).await.status,
            200
        );
    }
    running.shutdown();
    (&mut running.task).await.unwrap().unwrap();
    assert_eq!(
        slow.0.0.lock().unwrap().len(),
        50,
        "every event written before exit"
    );
}

#[tokio::test]
async fn verified_tokens_are_cached_until_exp() {
    let k = keys();
    let pem = include_bytes!("fixtures/ed.pub.pem");
    let clock = ManualClock::new(NOW);
    let v = Verifier::builder()
        .keys(
            "http://static.test",
            AUD,
            vec![Key::from_pem(Some("ed1"), Algorithm::EdDSA, pem).unwrap()],
        )
        .clock(clock.clone())
        .build()
        .unwrap();
    let mut c = claims();
    c["iss"] = json!("http://static.test");
    let token = jsonwebtoken::encode(
        &Header {
            kid: Some("ed1".to_owned()),
            ..Header::new(Algorithm::EdDSA)
        },
        &c,
        &k.ed,
    )
    .unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    assert!(v.verify_cached(&headers).is_none(), "not cached yet");
    v.verify(&headers).await.unwrap();
    assert_eq!(v.verify_cached(&headers).unwrap().unwrap().subject(), "ann");
    // A token differing in one byte is not a hit.
    let mut other = token.clone();
    other.push('A');
    let mut h2 = http::HeaderMap::new();
    h2.insert(
        header::AUTHORIZATION,
        format!("Bearer {other}").parse().unwrap(),
    );
    assert!(v.verify_cached(&h2).is_none());
    // A token carrying the cached one's signature over other claims is
    // neither a hit nor valid.
    let signature = token.rsplit('.').next().unwrap();
    let mut forged_claims = c.clone();
    forged_claims["sub"] = json!("mallory");
    let forged = jsonwebtoken::encode(
        &Header {
            kid: Some("ed1".to_owned()),
            ..Header::new(Algorithm::EdDSA)
        },
        &forged_claims,
        &k.ed,
    )
    .unwrap();
    let forged = format!("{}.{signature}", forged.rsplit_once('.').unwrap().0);
    let mut h3 = http::HeaderMap::new();
    h3.insert(
        header::AUTHORIZATION,
        format!("Bearer {forged}").parse().unwrap(),
    );
    assert!(v.verify_cached(&h3).is_none(), "same signature, not a hit");
    assert_eq!(v.verify(&h3).await.unwrap_err().code(), "bad_signature");
    assert_eq!(v.verify_cached(&headers).unwrap().unwrap().subject(), "ann");
    // At `exp` the cache stops answering; with leeway the full check still passes,
    // and past the leeway it fails.
    clock.set(NOW + 300);
    assert!(v.verify_cached(&headers).is_none());
    v.verify(&headers).await.unwrap();
    clock.set(NOW + 300 + LEEWAY);
    assert_eq!(v.verify(&headers).await.unwrap_err().code(), "expired");
}

#[tokio::test]
async fn readiness_waits_for_the_first_key_set() {
    let k = keys();
    let server = JwksServer::start(&jwks(&[jwk(&k.rsa1, Algorithm::RS256, "k1")])).await;
    server.set(|s| s.status = StatusCode::INTERNAL_SERVER_ERROR);
    let svc = service(
        verifier(&server, JwksOptions::default()),
        &Memory::default(),
    );
    let health = svc.health().clone();
    let running = support::start(svc).await;
    let check = format!("jwks:{}", server.issuer());
    let url = running.url("/health/ready");
    support::eventually("a failed warm-up", || {
        let health = health.clone();
        let check = check.clone();
        async move { health.report().checks[&check].duration_ms.is_some() }
    })
    .await;
    // Anyone sees the check and its state; its error stays in the process.
    let r = support::get(&url).await;
    assert_eq!(r.json()["checks"][&check], json!({"status": "down"}));
    let r = support::get(&url).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    // Requests meanwhile answer 503 jwks_unavailable, not 401.
    let token = mint(&server, Algorithm::RS256, &k.rsa1, Some("k1"), claims());
    let a = support::send(
        http::Method::GET,
        &running.url("/ticketing/v1/67000001/tickets"),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.json()["reason"], "jwks_unavailable");

    server.set(|s| s.status = StatusCode::OK);
    support::eventually("readiness once keys load", || {
        let url = url.clone();
        async move { support::get(&url).await.status == StatusCode::OK }
    })
    .await;
    running.task.abort();
}

// A path answers only the methods it declares, whatever its handlers
// serve; HEAD takes GET's access; the service's own layers run for
// authorized calls and see the caller.
#[tokio::test]
async fn undeclared_methods_are_refused_and_api_layers_see_the_caller() {
    use axum::middleware::{Next, from_fn};
    use chassis::auth::Principal;

    async fn caller(principal: Principal, req: axum::extract::Request, next: Next) -> Response {
        let mut res = next.run(req).await;
        res.headers_mut()
            .insert("x-caller", principal.subject().parse().unwrap());
        res
    }
    let keys = keys();
    let server = JwksServer::start(&jwks(&[jwk(&keys.rsa1, Algorithm::RS256, "k1")])).await;
    let audit = Memory::default();
    // A hand-built method router that also serves POST, declared as GET only.
    let notes = get(list).post(|| async { "written" });
    let svc = ServiceBuilder::new("ticketing", 1)
        .api(
            Api::new().route(
                api::Endpoint::new(http::Method::GET, "/{account}/notes", notes)
                    .requires("ticketing:{account}:view:note")
                    .undocumented("a test route"),
            ),
        )
        .api_layer(from_fn(caller))
        .verifier(verifier(&server, JwksOptions::default()))
        .audit_sink(audit.clone())
        .config(Config::default())
        .build()
        .unwrap();
    let auditor = svc.auditor().clone();
    let app = svc.router();
    let token = mint(&server, Algorithm::RS256, &keys.rsa1, Some("k1"), claims());
    let send = |method: http::Method, token: Option<&str>| {
        let mut r = Request::builder()
            .method(method)
            .uri("/ticketing/v1/67000001/notes");
        if let Some(t) = token {
            r = r.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        app.clone().oneshot(r.body(Body::empty()).unwrap())
    };

    let res = send(http::Method::GET, Some(&token)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-caller"], "ann");
    let res = send(http::Method::POST, Some(&token)).await.unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()[header::ALLOW], "GET,HEAD");
    assert_eq!(
        res.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    assert!(
        res.headers().get("x-caller").is_none(),
        "refused before the layers inside"
    );
    let res = send(http::Method::HEAD, None).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::UNAUTHORIZED,
        "HEAD is guarded as GET"
    );
    let res = send(http::Method::HEAD, Some(&token)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    auditor.flush();
    let events = audit.0.lock().unwrap();
    let outcomes: Vec<_> = events
        .iter()
        .map(|e| (e.method.as_str(), e.decision.as_str(), e.reason))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("GET", "allow", None),
            ("POST", "rejected", Some("method_not_allowed")),
            ("HEAD", "unauthenticated", Some("missing_token")),
            ("HEAD", "allow", None),
        ]
    );
}

/// The guard remembers the permissions it filled per thread, by route and
/// account: the same account on another route, or another account on the
/// same route, must each be decided for what they are.
#[tokio::test]
async fn filled_permissions_are_told_apart_by_route_and_account() {
    let s = setup().await;
    let viewer = {
        let mut c = claims();
        c["perms"] = json!(["ticketing:67000001:view:ticket"]);
        mint(&s.server, Algorithm::RS256, &s.keys.rsa1, Some("k1"), c)
    };
    let send = |method: &str, uri: &str| {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {viewer}"))
            .body(Body::empty())
            .unwrap();
        let app = s.app.clone();
        async move {
            let res = app.oneshot(req).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
            )
        }
    };
    for _ in 0..3 {
        let (status, body) = send("GET", "/ticketing/v1/67000001/tickets").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["account"], "67000001");
        let (status, body) = send("DELETE", "/ticketing/v1/67000001/tickets/9").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["permission"], "ticketing:67000001:delete:ticket");
        let (status, body) = send("GET", "/ticketing/v1/67000002/tickets").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["permission"], "ticketing:67000002:view:ticket");
        // A value outside the grammar is refused even right after a valid
        // one on the same route.
        let (status, _) = send("GET", "/ticketing/v1/6700000%2A/tickets").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    s.svc.auditor().flush();
    let events = s.audit.0.lock().unwrap();
    let permissions: Vec<Option<String>> = events
        .iter()
        .take(4)
        .map(|e| e.permission.as_ref().map(ToString::to_string))
        .collect();
    assert_eq!(
        permissions,
        [
            Some("ticketing:67000001:view:ticket".to_owned()),
            Some("ticketing:67000001:delete:ticket".to_owned()),
            Some("ticketing:67000002:view:ticket".to_owned()),
            None,
        ]
    );
}
