//! The `auth` binary as operators run it: real process, real socket, real
//! signals, settings and secrets from the environment.

mod support;

use std::{process::Command, time::Duration};

use chassis::testing::{ProcessCheck, ServiceProcess, refused_settings};
use http::Method;
use serde_json::Value;
use support::{Data, FORM, TempDir, basic, decode, eventually, send, write_grants};

/// Starts the `auth` binary on `data` (its directory, and its database on
/// the run's engine).
fn spawn(data: &Data, env: &[(&str, &str)]) -> ServiceProcess {
    let dir = data.path().to_str().expect("a UTF-8 path").to_owned();
    let url = data.env();
    let mut all = vec![
        ("CHASSIS_SHUTDOWN_GRACE_SECS", "5"),
        ("AUTH_DATA_DIR", dir.as_str()),
        ("AUTH_SEED_DEMO", "true"),
    ];
    all.extend(url.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    all.extend_from_slice(env);
    ServiceProcess::spawn(env!("CARGO_BIN_EXE_auth"), &all)
}

#[tokio::test]
async fn the_binary_becomes_ready_serves_and_stops_on_sigterm() {
    let dir = Data::new("binary");
    // The real hash cost: the binary as it runs in production.
    let process = spawn(&dir, &[]);
    let check = ProcessCheck::new("auth").protected(
        "/auth/v1/clients/orders/grants",
        "/auth/v1/clients/{name}/grants",
    );
    check.serving(&process).await;
    let base = process.url("");
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

    let json = check.stopped(process).await;
    let lines: Vec<String> = json.iter().map(Value::to_string).collect();
    let all = lines.concat();
    for secret in ["admin-password", access.as_str(), refresh.as_str()] {
        assert!(!all.contains(secret), "a secret in the log");
    }
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
    let dir = Data::new("binarygrants");
    let file = dir.path().join("grants.toml");
    write_grants(
        &file,
        "[clients.keycards]\nsecret_env = \"KEYCARDS_SECRET\"\ngrants = [\"ticketing:*:view:ticket\"]\n",
    );
    let path = file.to_str().unwrap().to_owned();
    let process = spawn(
        &dir,
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
    refused_settings(
        Command::new(env!("CARGO_BIN_EXE_auth"))
            .env("CHASSIS_BIND", "127.0.0.1:0")
            .env("AUTH_DATA_DIR", dir.path())
            .env("AUTH_TOKEN_TTL_SECS", "0")
            .env("AUTH_PUBLIC_URL", "ftp://auth.example")
            .env("AUTH_GRANTS_POLL_SECS", "0"),
        &[
            "AUTH_TOKEN_TTL_SECS",
            "AUTH_PUBLIC_URL",
            "AUTH_GRANTS_POLL_SECS",
        ],
    );
    assert!(
        !dir.path().join("auth.db").exists(),
        "nothing is created before the configuration is valid"
    );
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
    let stderr = refused_settings(
        Command::new(env!("CARGO_BIN_EXE_auth"))
            .env("CHASSIS_BIND", "127.0.0.1:0")
            .env("AUTH_DATA_DIR", dir.path())
            .env("AUTH_GRANTS_FILE", &file)
            .env_remove("KEYCARDS_SECRET"),
        &[
            "client \"keycards\": grant \"ticketing:*:view\" is not valid",
            "client \"keycards\": the variable KEYCARDS_SECRET of secret_env is not set",
            "client \"lessons\": a literal secret is allowed only in a file that says `demo = true`",
            "user \"carol\": secret_hash:",
        ],
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(!dir.path().join("auth.db").exists());
}
