//! The `ticketing` binary as operators run it: real process, real socket,
//! real signals, settings from the environment.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use chassis::client::{CallContext, Downstream};
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_ticketing"))
        .env("CHASSIS_BIND", "127.0.0.1:0")
        .env("CHASSIS_LOG", "info")
        .env("CHASSIS_SHUTDOWN_GRACE_SECS", "5")
        .env("TICKETING_DATA_DIR", dir.path())
        .envs(AUTH)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ticketing starts");

    // Its address, from its "listening" log line.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"] == "listening"
            {
                let _ = tx.send(v["address"].as_str().unwrap_or_default().to_owned());
            }
            lines.push(line);
        }
        lines
    });
    let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("ticketing logs where it listens");

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

    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "exit 0 after SIGTERM");
    let lines = reader.join().unwrap();
    assert!(
        lines.iter().any(|l| l.contains("\"stopped\"")),
        "{lines:#?}"
    );
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
