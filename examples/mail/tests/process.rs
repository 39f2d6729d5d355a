//! The `mail` binary as operators run it: real process, real socket, real
//! signals, configuration from the environment.

mod support;

use std::process::Command;

use chassis::testing::{ProcessCheck, ServiceProcess};
use support::{TempDir, TestAuth, eventually, header, job, orders};

/// Starts `mail` over `dir`'s database with `env` added to the test
/// defaults.
fn spawn(dir: &TempDir, env: &[(&str, &str)]) -> ServiceProcess {
    let db = dir.db_env();
    let mut all = vec![("CHASSIS_SHUTDOWN_GRACE_SECS", "10")];
    all.extend(db.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    all.extend_from_slice(env);
    ServiceProcess::spawn(env!("CARGO_BIN_EXE_mail"), &all)
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_delivers_logs_with_the_correlation_id_and_stops_on_sigterm() {
    let dir = TempDir::new("process");
    let auth = TestAuth::start().await;
    let jwks = auth.url("/jwks");
    let data = dir.path().to_str().unwrap().to_owned();
    let process = spawn(
        &dir,
        &[
            ("CHASSIS_AUTH_ISSUER", "https://issuer.test"),
            ("CHASSIS_AUTH_AUDIENCE", "chassis-test"),
            ("CHASSIS_AUTH_JWKS_URL", &jwks),
            ("CHASSIS_AUTH_ALGORITHMS", "EdDSA"),
            ("MAIL_DATA_DIR", &data),
            ("MAIL_POLL_MS", "50"),
            ("MAIL_WORKERS", "2"),
        ],
    );
    let check =
        ProcessCheck::new("mail").protected("/mail/v1/messages/evt-1", "/mail/v1/messages/{id}");
    check.serving(&process).await;
    let base = process.url("");

    let mail = mail::client::MailClient::new(
        chassis::client::Downstream::builder("mail", &base)
            .build()
            .unwrap(),
    );
    let cx = orders("proc-corr-1").await;
    let accepted = mail
        .on_behalf_of(&cx)
        .send(&job("evt-proc-1", "alice@example.com"))
        .await
        .unwrap();
    assert!(!accepted.duplicate);
    eventually("the mail file", || async {
        dir.eml("evt-proc-1").is_some()
    })
    .await;
    assert_eq!(
        header(&dir.eml("evt-proc-1").unwrap(), "X-Correlation-ID").as_deref(),
        Some("proc-corr-1")
    );

    let json = check.stopped(process).await;
    let lines: Vec<String> = json.iter().map(ToString::to_string).collect();
    // The worker's lines carry the correlation id of the request that
    // queued the mail (O16).
    let sent: Vec<_> = json
        .iter()
        .filter(|l| l["message"] == "message sent")
        .collect();
    assert_eq!(sent.len(), 1, "{lines:#?}");
    assert_eq!(sent[0]["correlation_id"], "proc-corr-1");
    assert_eq!(sent[0]["message_id"], "evt-proc-1");
    assert_eq!(sent[0]["service"], "mail");
    assert!(sent[0]["trace_id"].as_str().is_some_and(|t| t.len() == 32));
    let queued: Vec<_> = json
        .iter()
        .filter(|l| l["message"] == "mail job queued")
        .collect();
    assert_eq!(queued[0]["correlation_id"], "proc-corr-1");
    // Both workers stopped by themselves; nothing was cut.
    let stopped = json
        .iter()
        .filter(|l| l["message"] == "mail worker stopped")
        .count();
    assert_eq!(stopped, 2, "{lines:#?}");
    assert!(!lines.concat().contains("cut"), "{lines:#?}");
    // What the app logged while it was set up, before it served, is kept.
    let setup = json
        .iter()
        .position(|l| l["message"] == "no SMTP relay configured: mail is written to files")
        .expect("the set-up line");
    let listening = json
        .iter()
        .position(|l| l["message"] == "listening")
        .unwrap();
    assert!(setup < listening, "{lines:#?}");
    assert_eq!(json[setup]["service"], "mail");
}

#[test]
fn bad_settings_exit_78_listing_every_problem_without_the_password() {
    let stderr = chassis::testing::refused_settings(
        Command::new(env!("CARGO_BIN_EXE_mail"))
            .env("CHASSIS_BIND", "not-an-address")
            .env(
                "MAIL_SMTP_URL",
                "smtp://mailer:hunter2@mail.example?tls=opportunistic",
            )
            .env("CHASSIS_TLS_CA_FILE", "/nonexistent/chassis-ca.pem")
            .env("MAIL_WORKERS", "lots")
            .env("MAIL_FROM", "nobody"),
        &[
            "CHASSIS_BIND",
            "CHASSIS_AUTH_ISSUER",
            "MAIL_SMTP_URL",
            "CHASSIS_TLS_CA_FILE",
            "MAIL_WORKERS",
            "MAIL_FROM",
        ],
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn an_unusable_data_directory_stops_start_up() {
    let dir = TempDir::new("notadir");
    let file = dir.path().join("file");
    std::fs::write(&file, "not a directory").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mail"))
        .envs(dir.db_env())
        .env("CHASSIS_BIND", "127.0.0.1:0")
        .env("CHASSIS_AUTH_ISSUER", "https://issuer.test")
        .env("CHASSIS_AUTH_AUDIENCE", "chassis-test")
        .env("CHASSIS_AUTH_JWKS_URL", "http://127.0.0.1:9/jwks")
        .env("MAIL_DATA_DIR", &file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("mail cannot start:"), "{stderr}");
}
