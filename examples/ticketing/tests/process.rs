//! The `ticketing` binary as operators run it: real process, real socket,
//! real signals, settings from the environment.

use std::process::Command;

use chassis::{
    db::Backend,
    testing::{ProcessCheck, ServiceProcess, TempDir, TestDatabase, refused_settings},
};

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
    let db = TestDatabase::new();
    let url = db.env("TICKETING");
    let url: Vec<(&str, &str)> = url.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let process = ServiceProcess::builder(env!("CARGO_BIN_EXE_ticketing"))
        .env("CHASSIS_SHUTDOWN_GRACE_SECS", "5")
        .envs(&AUTH)
        .envs(&url)
        .data_dir("TICKETING_DATA_DIR")
        .spawn();
    let check = ProcessCheck::new("ticketing").protected(
        "/ticketing/v1/acme/tickets",
        "/ticketing/v1/{account}/tickets",
    );
    check.serving(&process).await;
    let file = process.data_dir().unwrap().join("ticketing.db");
    // On Postgres the data is in the database named by the URL.
    assert_eq!(file.exists(), db.backend() == Backend::Sqlite);
    check.stopped(process).await;
}

#[test]
fn bad_settings_exit_78_listing_every_problem() {
    let dir = TempDir::new("bad-settings");
    refused_settings(
        Command::new(env!("CARGO_BIN_EXE_ticketing"))
            .env("CHASSIS_BIND", "not-an-address")
            .env("TICKETING_HOLD_SECS", "0")
            .env("TICKETING_DB_POOL_SIZE", "many")
            .env("TICKETING_DATA_DIR", dir.path()),
        &[
            "CHASSIS_BIND",
            "CHASSIS_AUTH_ISSUER",
            "TICKETING_HOLD_SECS",
            "TICKETING_DB_POOL_SIZE",
        ],
    );
    // It stopped before touching its data.
    assert!(!dir.path().join("ticketing.db").exists());
}
