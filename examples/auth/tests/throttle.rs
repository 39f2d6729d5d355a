//! Brute-force protection over real sockets: failed logins lock a name, an
//! address or every name for a while, on an injected clock; hashing has a
//! bounded number of slots.

mod support;

use std::time::Duration;

use auth::HashCost;
use http::{Method, StatusCode};
use support::{
    Answer, Data, FORM, basic, futures_join, manual_clock, send, start_clocked, start_with,
};

#[tokio::test]
async fn failed_logins_lock_the_user_name_with_429_and_retry_after() {
    let dir = Data::new("throttle");
    let clock = manual_clock();
    let auth = start_clocked(&dir, clock.clone(), |_| {}).await;
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
    let dir = Data::new("throttle-burst");
    let auth = start_clocked(&dir, manual_clock(), |_| {}).await;
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
    let dir = Data::new("throttle-global");
    let clock = manual_clock();
    let auth = start_clocked(&dir, clock.clone(), |s| {
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
    let dir = Data::new("throttle-address");
    let clock = manual_clock();
    let auth = start_clocked(&dir, clock.clone(), |s| {
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
    let dir = Data::new("hash-busy");
    let auth = start_with(&dir, |s| {
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
