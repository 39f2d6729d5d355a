//! The `orders` binary as operators run it: real process, real socket,
//! real signals, settings from the environment.

use chassis::{
    db::Backend,
    testing::{ProcessCheck, ServiceProcess, TestDatabase},
};

#[tokio::test]
async fn the_binary_becomes_ready_serves_and_stops_on_sigterm() {
    let db = TestDatabase::new();
    let db_env = db.env("ORDERS");
    let db_env: Vec<(&str, &str)> = db_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let orders = ServiceProcess::builder(env!("CARGO_BIN_EXE_orders"))
        .envs(&db_env)
        .envs(&[
            ("CHASSIS_SHUTDOWN_GRACE_SECS", "5"),
            // Tokens verified with a fixed HMAC secret: no identity
            // provider is needed to become ready.
            ("CHASSIS_AUTH_ISSUER", "https://issuer.test"),
            ("CHASSIS_AUTH_AUDIENCE", "orders"),
            ("CHASSIS_AUTH_ALGORITHMS", "HS256"),
            (
                "CHASSIS_AUTH_HS256_SECRET",
                "a test secret of at least thirty-two bytes",
            ),
            // Nothing is placed, so neither the token endpoint nor the
            // downstreams are called.
            ("CHASSIS_CLIENT_TOKEN_URL", "http://127.0.0.1:9/token"),
            ("CHASSIS_CLIENT_ID", "orders"),
            ("CHASSIS_CLIENT_SECRET", "orders-secret"),
        ])
        .data_dir("ORDERS_DATA_DIR")
        .spawn();
    let check = ProcessCheck::new("orders")
        .protected("/orders/v1/acme/orders", "/orders/v1/{account}/orders");
    check.serving(&orders).await;
    if db.backend() == Backend::Sqlite {
        assert!(orders.data_dir().unwrap().join("orders.db").exists());
    }
    check.stopped(orders).await;
}
