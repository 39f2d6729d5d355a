//! The `ticketing` binary as operators run it: real process, real socket,
//! real signals, settings from the environment.

mod support;

use std::{process::Command, time::Duration};

use chassis::{
    client::{CallContext, Downstream},
    testing::ServiceProcess,
};
use support::{TempDir, eventually, refusal};

/// Token verification with a fixed HMAC secret, so that the process needs
/// no identity provider to become ready.
const AUTH: [(&str, &str); 4] = [
    ("CHASSIS_AUTH_ISSUER", "https://issuer.test"),
    ("CHASSIS_AUTH_AUDIENCE", "ticketing"),
    ("CHASSIS_AUTH_ALGORITHMS", "HS256"),
    (
        "CHASSIS_AUTH_HS256_SECRET",
        "a test secret of at least thirty-two bytes",
    ),
];

#[tokio::test]
async fn the_binary_becomes_ready_serves_and_stops_on_sigterm() {
    let dir = TempDir::new("process");
    let data = dir.path().to_str().unwrap().to_owned();
    let mut env = vec![
        ("CHASSIS_SHUTDOWN_GRACE_SECS", "5"),
        ("TICKETING_DATA_DIR", data.as_str()),
    ];
    env.extend(AUTH);
    let ticketing = ServiceProcess::spawn(env!("CARGO_BIN_EXE_ticketing"), &env);
    let addr = ticketing.addr().to_owned();

    let downstream = Downstream::builder("ticketing", &format!("http://{addr}"))
        .attempt_timeout(Duration::from_secs(30))
        .max_attempts(1)
        .build()
        .unwrap();
    let cx = CallContext::background();
    let calls = downstream.anonymous(&cx);
    eventually("readiness", || async move {
        calls.get("/health/ready").send().await.is_ok()
    })
    .await;
    assert!(dir.path().join("ticketing.db").exists());

    let info: serde_json::Value = calls.get("/info").send().await.unwrap().json().unwrap();
    assert_eq!(info["service"], "ticketing");
    assert_eq!(info["build"]["package"], "ticketing");
    let (status, problem) = refusal(calls.get("/ticketing/v1/acme/tickets").send().await);
    assert_eq!(
        (status, problem["reason"].as_str()),
        (401, Some("missing_token"))
    );

    let lines = tokio::task::spawn_blocking(move || ticketing.stop(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(
        lines.iter().any(|l| l.contains("\"stopped\"")),
        "{lines:#?}"
    );

    // The refused call is audited in the JSON log, with the correlation id
    // of its access line.
    let json: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let refused = |target: &str| {
        json.iter()
            .find(|l| l["target"] == target && l["route"] == "/ticketing/v1/{account}/tickets")
            .unwrap_or_else(|| panic!("no {target} line for the refused call: {lines:#?}"))
    };
    let (access, audit) = (refused("chassis::access"), refused("audit"));
    assert_eq!(audit["level"], "INFO");
    assert_eq!(audit["service"], "ticketing");
    assert_eq!(audit["message"], "audit");
    assert_eq!(audit["decision"], "unauthenticated");
    assert_eq!(audit["reason"], "missing_token");
    assert_eq!(audit["method"], "GET");
    assert_eq!(audit["status"], 401);
    assert_eq!(audit["mutation"], false);
    assert!(audit["latency_ms"].as_f64().is_some(), "{audit}");
    assert!(
        audit["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{audit}"
    );
    assert!(
        audit.get("account").is_none(),
        "not reached authorization: {audit}"
    );
    assert_eq!(audit["correlation_id"], access["correlation_id"]);
}

#[test]
fn bad_settings_exit_78_listing_every_problem() {
    let dir = TempDir::new("bad-settings");
    let out = Command::new(env!("CARGO_BIN_EXE_ticketing"))
        .env("CHASSIS_BIND", "not-an-address")
        .env("TICKETING_HOLD_SECS", "0")
        .env("TICKETING_DB_POOL_SIZE", "many")
        .env("TICKETING_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("invalid configuration (4 problems):"),
        "{stderr}"
    );
    for name in [
        "CHASSIS_BIND",
        "CHASSIS_AUTH_ISSUER",
        "TICKETING_HOLD_SECS",
        "TICKETING_DB_POOL_SIZE",
    ] {
        assert!(stderr.contains(name), "{name} missing: {stderr}");
    }
    // It stopped before touching its data.
    assert!(!dir.path().join("ticketing.db").exists());
}
