//! What authentication, authorization and audit cost per request.
//!
//! Groups:
//! - `verify`: a cached-token verification; uncached EdDSA, ES256 and RS256
//!   verifications (cache disabled, fixed keys, so only the crypto and the
//!   claim checks are measured);
//! - `decide`: a permission decision against 10 and 1,000 grants;
//! - `stack`: one request through the core stack with a public route, and
//!   through core + authentication (cached token) + authorization + audit
//!   (default log sink, formatted by the JSON layer into a sink).
//!
//! Run with `cargo bench -p service-chassis --bench aaa`; results are recorded in
//! `docs/benchmarks.md`.

use std::{hint::black_box, time::Duration};

use axum::{Json, Router, body::Body, extract::Path};
use chassis::{
    Config, ServiceBuilder,
    api::{self, Api},
    auth::{Key, Verifier},
    permission::{Grants, Permission},
    telemetry::JsonLayer,
};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request, header};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tower::ServiceExt;
use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

const ISS: &str = "http://auth.bench";
const AUD: &str = "hello";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

fn claims() -> Value {
    json!({
        "iss": ISS, "aud": AUD, "sub": "bench", "iat": now(), "exp": now() + 3600,
        "perms": ["hello:67000001:view:item", "hello:67000001:create:item"],
    })
}

struct Signer {
    alg: Algorithm,
    kid: &'static str,
    private: EncodingKey,
    public: Key,
}

fn signers() -> Vec<Signer> {
    let pem = |p: &str| {
        std::fs::read(format!("{}/tests/fixtures/{p}", env!("CARGO_MANIFEST_DIR")))
            .expect("fixture")
    };
    vec![
        Signer {
            alg: Algorithm::EdDSA,
            kid: "ed",
            private: EncodingKey::from_ed_pem(&pem("ed.pem")).expect("key"),
            public: Key::from_pem(Some("ed"), Algorithm::EdDSA, &pem("ed.pub.pem")).expect("key"),
        },
        Signer {
            alg: Algorithm::ES256,
            kid: "ec",
            private: EncodingKey::from_ec_pem(&pem("ec.pk8.pem")).expect("key"),
            public: Key::from_pem(Some("ec"), Algorithm::ES256, &pem("ec.pub.pem")).expect("key"),
        },
        Signer {
            alg: Algorithm::RS256,
            kid: "rsa",
            private: EncodingKey::from_rsa_pem(&pem("rsa1.pem")).expect("key"),
            public: Key::from_pem(Some("rsa"), Algorithm::RS256, &pem("rsa1.pub.pem"))
                .expect("key"),
        },
    ]
}

fn token(s: &Signer) -> String {
    let h = Header {
        kid: Some(s.kid.to_owned()),
        ..Header::new(s.alg)
    };
    jsonwebtoken::encode(&h, &claims(), &s.private).expect("signs")
}

fn verifier(signers: &[Signer], cache: usize) -> Verifier {
    Verifier::builder()
        .keys(ISS, AUD, signers.iter().map(|s| s.public.clone()).collect())
        .cache_capacity(cache)
        .build()
        .expect("verifier")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn verify(c: &mut Criterion) {
    let rt = runtime();
    let signers = signers();
    let mut g = c.benchmark_group("verify");
    g.measurement_time(Duration::from_secs(4)).sample_size(50);

    let cached = verifier(&signers, 1024);
    let t = token(&signers[0]);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {t}")).expect("header"),
    );
    rt.block_on(cached.verify(&headers)).expect("valid");
    g.bench_function("cached", |b| {
        b.iter(|| {
            black_box(
                cached
                    .verify_cached(black_box(&headers))
                    .expect("hit")
                    .expect("valid"),
            )
        });
    });

    let uncached = verifier(&signers, 0);
    for s in &signers {
        let t = token(s);
        g.bench_function(format!("uncached_{:?}", s.alg), |b| {
            b.iter(|| {
                black_box(
                    rt.block_on(uncached.verify_token(black_box(&t)))
                        .expect("valid"),
                )
            });
        });
    }
    g.finish();
}

fn decide(c: &mut Criterion) {
    let mut g = c.benchmark_group("decide");
    g.measurement_time(Duration::from_secs(3)).sample_size(50);
    let required: Permission = "ticketing:67000001:view:ticket"
        .parse()
        .expect("permission");
    for n in [10usize, 1000] {
        // Realistic spread: most grants are for other services or accounts,
        // one allow matches, one deny for another account exists.
        let mut grants: Vec<String> = (0..n - 2)
            .map(|i| format!("svc{}:{}:view:thing", i % 50, i))
            .collect();
        grants.push("ticketing:67000001:*:ticket".to_owned());
        grants.push("!ticketing:67000002:*:*".to_owned());
        let set = Grants::parse(grants.iter().map(String::as_str)).expect("grants");
        g.bench_function(format!("grants_{n}"), |b| {
            b.iter(|| black_box(set.decide(black_box(&required))));
        });
    }
    g.finish();
}

async fn item(Path((_account, id)): Path<(String, u32)>) -> Json<Value> {
    Json(json!({ "id": id }))
}

fn stack(c: &mut Criterion) {
    let _ = tracing_subscriber::registry()
        .with("info".parse::<Targets>().expect("a filter"))
        .with(JsonLayer::new("hello", std::io::sink))
        .try_init();
    let rt = runtime();
    let signers = signers();
    let t = token(&signers[0]);
    let (core, aaa) = rt.block_on(async {
        let core = ServiceBuilder::new("hello", 1)
            .api(
                Api::new().route(
                    api::get("/{account}/items/{id}", item)
                        .public()
                        .undocumented("a test route"),
                ),
            )
            .config(Config::default())
            .build()
            .expect("builds")
            .router();
        let aaa = ServiceBuilder::new("hello", 1)
            .api(
                Api::new().route(
                    api::get("/{account}/items/{id}", item)
                        .requires("hello:{account}:view:item")
                        .undocumented("a test route"),
                ),
            )
            .verifier(verifier(&signers, 1024))
            .config(Config::default())
            .build()
            .expect("builds")
            .router();
        (core, aaa)
    });
    let request = |with_token: bool| {
        let mut r =
            Request::get("/hello/v1/67000001/items/42").header("x-correlation-id", "bench-1");
        if with_token {
            r = r.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        r.body(Body::empty()).expect("request")
    };
    let serve = |app: &Router, with_token: bool| {
        let req = request(with_token);
        let app = app.clone();
        async move {
            let res = app.oneshot(req).await.expect("infallible");
            assert_eq!(res.status(), 200);
            res.into_body().collect().await.expect("body").to_bytes()
        }
    };
    rt.block_on(serve(&aaa, true));
    let mut g = c.benchmark_group("stack");
    g.measurement_time(Duration::from_secs(5)).sample_size(50);
    g.bench_function("core_public_route", |b| {
        b.to_async(&rt).iter(|| serve(&core, false))
    });
    g.bench_function("core_plus_aaa", |b| {
        b.to_async(&rt).iter(|| serve(&aaa, true))
    });
    g.finish();
}

criterion_group!(benches, verify, decide, stack);
criterion_main!(benches);
