//! The load harness: the full chassis (C) against bare axum (A) and the
//! stack a Rust team assembles by hand (B), side by side in one run.
//!
//! ```text
//! cargo bench -p service-chassis --bench load                      # cached, distinct, routes: about 6 minutes
//! cargo bench -p service-chassis --bench load -- --write           # and write the table into docs/benchmarks.md
//! cargo bench -p service-chassis --bench load -- --scenarios cached --rounds 1 --secs 5
//! cargo bench -p service-chassis --bench load -- --scenarios tracing   # what span export costs
//! ```
//!
//! Options: `--secs N` per measured run (10), `--warmup N` seconds before it
//! (2), `--rounds N` (3), `--connections N` (32), `--scenarios
//! cached,distinct,routes` (`tracing` when asked for), `--server-cpu` (0)
//! and `--load-cpu` (1).
//!
//! `--instructions` instead counts the user-space instructions per request
//! of the variants of the first scenario listed (`cached`: A, B and C,
//! unless told) under callgrind (valgrind, installed when missing): a
//! figure that hardly moves on a busy machine, to compare changes to the
//! request path.
//!
//! The `tracing` scenario compares A, C, and C exporting its spans over
//! OTLP with the root sampling ratio at 0 (`C-otel-off`) and at 1
//! (`C-otel-all`). Those send to a collector on loopback inside the harness
//! process ([`collector`]), which counts what arrives and discards it; its
//! thread is pinned to the load generator's core.
//!
//! Each round starts every variant in turn (A B C A B C ...) in its own
//! process, pinned with `taskset` to one core with one tokio worker, and
//! drives it with `wrk` (installed from the distribution's packages when
//! missing) pinned to the other core, over loopback only; `wrk` runs for a
//! fixed time, so every load loop ends by itself. See [`variants`] for what
//! each server does and `docs/benchmarks.md` for the results.
//!
//! To profile one variant by hand, start it and print a token with the
//! harness binary (`target/release/deps/load-*`): `CHASSIS_BIND=127.0.0.1:9000
//! taskset -c 0 load serve chassis 10 rs256 default` and `load token rs256`.
//!
//! Under `cargo test` (no `--bench` argument) the harness does not load
//! anything: it starts each variant once and checks that they answer the
//! same request alike (200 with the same body, 401 without a valid token, 403
//! for another account, metrics exported), so the comparison stays fair and
//! the harness cannot rot; C exporting its spans answers alike too, and its
//! spans reach the collector.

// A load run is measured in wall-clock time, not the tokio clock tests pause.
#![allow(clippy::disallowed_types)]

mod collector;
mod harness;
mod tokens;
mod variants;

use std::process::ExitCode;

use jsonwebtoken::Algorithm;

use crate::{
    collector::Collector,
    harness::{Server, get, otel_counts, ticket_path},
    tokens::{ACCOUNT, Signer},
    variants::{Kind, ServerSpec, Ticket},
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let exe = std::env::current_exe().expect("the harness knows its own path");
    if args.first().map(String::as_str) == Some("serve") {
        return match ServerSpec::parse(&args[1..]) {
            Ok(spec) => variants::serve(spec),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(64)
            }
        };
    }
    if args.first().map(String::as_str) == Some("token") {
        // A token for driving a server by hand, e.g. under a profiler.
        let alg = match args.get(1).map(String::as_str) {
            Some("eddsa") => Algorithm::EdDSA,
            _ => Algorithm::RS256,
        };
        println!("{}", Signer::new(alg).token("manual"));
        return ExitCode::SUCCESS;
    }
    if !args.iter().any(|a| a == "--bench") {
        check(&exe);
        println!("load harness: the variants answer alike");
        return ExitCode::SUCCESS;
    }
    let result = harness::Options::parse(&args).and_then(|o| {
        if o.instructions {
            harness::instructions(&exe, &o)
        } else {
            harness::run(&exe, &o)
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `cargo test` runs: every variant answers the same requests alike.
fn check(exe: &std::path::Path) {
    let expected = Ticket {
        account: ACCOUNT.to_owned(),
        id: "42".to_owned(),
        title: "Ticket 42".to_owned(),
        status: "open".to_owned(),
    };
    for (kind, alg) in [
        (Kind::Bare, Algorithm::RS256),
        (Kind::Hand, Algorithm::RS256),
        (Kind::Hand, Algorithm::EdDSA),
        (Kind::Chassis, Algorithm::RS256),
        (Kind::Chassis, Algorithm::EdDSA),
    ] {
        let spec = ServerSpec {
            kind,
            routes: 10,
            alg,
            cache: Some(1),
        };
        let name = format!("{} ({alg:?})", kind.arg());
        let server = Server::start(exe, spec, None, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let signer = Signer::new(alg);
        let token = signer.token("check");

        // Two distinct tokens in a row: C's one-entry cache misses and
        // evicts, and still answers right.
        for t in [&token, &signer.token("check-2"), &token] {
            answers_the_ticket(server.addr, t, &expected, &name);
        }
        if kind == Kind::Bare {
            continue;
        }
        let status = |path: &str, token: Option<&str>| {
            get(server.addr, path, token)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .0
        };
        assert_eq!(status(&ticket_path(), None), 401, "{name}: no token");
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(
            status(&ticket_path(), Some(&tampered)),
            401,
            "{name}: bad signature"
        );
        let other = Signer::new(if alg == Algorithm::EdDSA {
            Algorithm::RS256
        } else {
            Algorithm::EdDSA
        })
        .token("check");
        if kind == Kind::Hand {
            assert_eq!(
                status(&ticket_path(), Some(&other)),
                401,
                "{name}: other algorithm"
            );
        }
        assert_eq!(
            status("/ticketing/v1/other/tickets/42", Some(&token)),
            403,
            "{name}: another account"
        );
        let (status, metrics) =
            get(server.addr, "/metrics", None).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(status, 200, "{name}: /metrics");
        assert!(
            metrics.contains("tickets/{id}"),
            "{name}: the ticket route is measured: {metrics}"
        );
    }
    if cfg!(feature = "otel") {
        check_tracing(exe, &expected);
    }
}

/// `GET` the ticket with `token`: 200 and `expected`.
fn answers_the_ticket(addr: std::net::SocketAddr, token: &str, expected: &Ticket, name: &str) {
    let (status, body) =
        get(addr, &ticket_path(), Some(token)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(status, 200, "{name}: {body}");
    let ticket: Ticket =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{name}: {e}: {body}"));
    assert_eq!(&ticket, expected, "{name}");
}

/// The `tracing` scenario's servers: C exporting with sampling off and on
/// answers alike, and with every request sampled its spans reach the
/// harness's collector, which the exporter accepts.
fn check_tracing(exe: &std::path::Path, expected: &Ticket) {
    let collector = Collector::start(None).unwrap_or_else(|e| panic!("collector: {e}"));
    let spec = ServerSpec {
        kind: Kind::Chassis,
        routes: 10,
        alg: Algorithm::RS256,
        cache: None,
    };
    let token = Signer::new(Algorithm::RS256).token("check");
    for ratio in ["0", "1"] {
        let name = format!("chassis exporting, sampling ratio {ratio}");
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
            ("OTEL_TRACES_SAMPLER_ARG", ratio.to_owned()),
        ];
        let server = Server::start(exe, spec, None, &env).unwrap_or_else(|e| panic!("{name}: {e}"));
        for _ in 0..3 {
            answers_the_ticket(server.addr, &token, expected, &name);
        }
        if ratio == "0" {
            continue;
        }
        // Exported on the schedule (1 s by default): wait until the
        // server counts its three spans as accepted, within a generous bound.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let exported = loop {
            let (exported, dropped) = otel_counts(server.addr);
            assert!(dropped == 0.0, "{name}: {dropped} spans dropped");
            if exported >= 3.0 || std::time::Instant::now() > deadline {
                break exported;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert!(exported >= 3.0, "{name}: {exported} spans exported");
        let received = collector.received();
        assert!(
            received.requests >= 1 && received.bytes > 0,
            "{name}: the collector received {received:?}"
        );
    }
}
