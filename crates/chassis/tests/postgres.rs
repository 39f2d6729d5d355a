//! The storage module on a real Postgres server: each test makes a
//! database of its own on it (`CHASSIS_TEST_POSTGRES_URL`, by default the
//! server on 127.0.0.1:5432) and drops it after. Without a server the tests
//! say they did not run, unless `CHASSIS_REQUIRE_SERVERS` is set.

use std::time::Duration;

use chassis::{
    db::{Backend, Database, DbConfig, DbError, Failure, Migrations, StoreError, retry},
    health::Check as _,
    testing::{TempDir, TestPostgres},
};
use sqlx::migrate::Migrator;

/// A test database, or `None` when the server cannot be reached.
macro_rules! postgres_or_skip {
    () => {
        match TestPostgres::or_skip(module_path!()) {
            Some(pg) => pg,
            None => return,
        }
    };
}

fn config(pg: &TestPostgres, dir: &TempDir) -> DbConfig {
    DbConfig::new(dir.path(), "unused.db").postgres(pg.url())
}

async fn open(pg: &TestPostgres, dir: &TempDir) -> Database {
    let db = Database::open(&config(pg, dir)).await.unwrap();
    assert_eq!(db.backend(), Backend::Postgres);
    db
}

/// Migrations written as a service keeps them: one directory per engine.
async fn migrations(dir: &TempDir) -> (Migrator, Migrator) {
    let sqlite = dir.path().join("migrations/sqlite");
    let postgres = dir.path().join("migrations/postgres");
    std::fs::create_dir_all(&sqlite).unwrap();
    std::fs::create_dir_all(&postgres).unwrap();
    std::fs::write(
        sqlite.join("1_seats.sql"),
        "CREATE TABLE seats (id TEXT PRIMARY KEY, capacity INTEGER NOT NULL, taken INTEGER NOT NULL DEFAULT 0);",
    )
    .unwrap();
    std::fs::write(
        postgres.join("1_seats.sql"),
        "CREATE TABLE seats (id TEXT PRIMARY KEY, capacity BIGINT NOT NULL, taken BIGINT NOT NULL DEFAULT 0);
         CREATE TABLE holds (id BIGSERIAL PRIMARY KEY, seat TEXT NOT NULL REFERENCES seats (id));",
    )
    .unwrap();
    (
        Migrator::new(sqlite.as_path()).await.unwrap(),
        Migrator::new(postgres.as_path()).await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once_and_both_serve() {
    let pg = postgres_or_skip!();
    let dir = TempDir::new("pg-migrate");
    let (sqlite, postgres) = migrations(&dir).await;
    let config = config(&pg, &dir);
    let both = Migrations::new(&sqlite).postgres(&postgres);
    let (a, b) = tokio::join!(
        Database::open_migrated(&config, both),
        Database::open_migrated(&config, both)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(a.pool())
        .await
        .unwrap();
    assert_eq!(applied, 1);
    sqlx::query("INSERT INTO seats (id, capacity) VALUES ($1, $2)")
        .bind("s1")
        .bind(3_i64)
        .execute(&mut *a.writer().await.unwrap())
        .await
        .unwrap();
    let capacity: i64 = sqlx::query_scalar("SELECT capacity FROM seats WHERE id = $1")
        .bind("s1")
        .fetch_one(b.pool())
        .await
        .unwrap();
    assert_eq!(capacity, 3);
    assert!(a.check().await.is_ok());
    assert!(b.write_check().check().await.is_ok());

    // A service with no Postgres migrations refuses to start on Postgres.
    let refused = Database::open_migrated(&config, Migrations::new(&sqlite))
        .await
        .unwrap_err();
    assert!(matches!(refused, DbError::NoMigrations { .. }), "{refused}");
    a.close().await;
    b.close().await;
    assert!(a.check().await.is_err(), "a closed pool is not ready");
}

/// Takes a place of `seat` if one is left: the transaction locks the seat's
/// row by writing it before it counts, so at read committed no other
/// transaction can count between this one's count and its insert.
async fn hold(db: &Database, seat: &str) -> Result<bool, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    sqlx::query("UPDATE seats SET id = id WHERE id = $1")
        .bind(seat)
        .execute(&mut *tx)
        .await?;
    let (capacity, held): (i64, i64) = sqlx::query_as(
        "SELECT capacity, (SELECT COUNT(*) FROM holds WHERE seat = $1) FROM seats WHERE id = $1",
    )
    .bind(seat)
    .fetch_one(&mut *tx)
    .await?;
    tokio::task::yield_now().await;
    if held >= capacity {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query("INSERT INTO holds (seat) VALUES ($1)")
        .bind(seat)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_hold_more_places_than_there_are() {
    let pg = postgres_or_skip!();
    let dir = TempDir::new("pg-holds");
    let (sqlite, postgres) = migrations(&dir).await;
    let config = config(&pg, &dir);
    let both = Migrations::new(&sqlite).postgres(&postgres);
    let a = Database::open_migrated(&config, both).await.unwrap();
    let b = Database::open_migrated(&config, both).await.unwrap();
    sqlx::query("INSERT INTO seats (id, capacity) VALUES ('s', 10)")
        .execute(&mut *a.writer().await.unwrap())
        .await
        .unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let db = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { hold(&db, "s").await })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        if task.await.unwrap().unwrap() {
            granted += 1;
        }
    }
    assert_eq!(granted, 10);
    let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM holds")
        .fetch_one(b.pool())
        .await
        .unwrap();
    assert_eq!(held, 10);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serialization_failure_is_503_and_the_transaction_runs_again() {
    let pg = postgres_or_skip!();
    let dir = TempDir::new("pg-serial");
    let db = open(&pg, &dir).await;
    sqlx::raw_sql(
        "CREATE TABLE counter (id BIGINT PRIMARY KEY, n BIGINT NOT NULL);
         INSERT INTO counter VALUES (1, 0);
         CREATE TABLE names (name TEXT PRIMARY KEY);",
    )
    .execute(&mut *db.writer().await.unwrap())
    .await
    .unwrap();

    // Two serializable transactions that read and then write the same row:
    // the second to commit is undone with SQLSTATE 40001.
    async fn increment(
        db: &Database,
        pause: Option<&tokio::sync::Barrier>,
    ) -> Result<(), sqlx::Error> {
        let mut tx = db.begin_write().await?;
        sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            .execute(&mut *tx)
            .await?;
        let n: i64 = sqlx::query_scalar("SELECT n FROM counter WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        if let Some(barrier) = pause {
            barrier.wait().await;
        }
        sqlx::query("UPDATE counter SET n = $1 WHERE id = 1")
            .bind(n + 1)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }
    let barrier = tokio::sync::Barrier::new(2);
    let (x, y) = tokio::join!(
        increment(&db, Some(&barrier)),
        increment(&db, Some(&barrier))
    );
    let failed = x.err().or(y.err()).expect("one of the two is undone");
    assert!(Failure::is_retryable(&failed), "{failed}");
    assert_eq!(Failure::of(&failed), Failure::Unavailable);
    let problem = chassis::Problem::from(StoreError::from(failed));
    assert_eq!(problem.status(), 503);
    assert!(!problem.detail().contains("serial"), "{}", problem.detail());

    // Under `retry`, every one of many colliding increments lands.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { retry(|| increment(&db, None)).await })
        })
        .collect();
    let mut landed = 0;
    for task in tasks {
        if task.await.unwrap().is_ok() {
            landed += 1;
        }
    }
    let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(
        n,
        1 + landed,
        "every increment that returned Ok landed, once"
    );
    assert!(
        landed >= 6,
        "retry ran undone transactions again: {landed} of 8 landed"
    );

    // A unique key taken is a conflict, as on SQLite.
    let insert = "INSERT INTO names VALUES ('a')";
    sqlx::query(insert)
        .execute(&mut *db.writer().await.unwrap())
        .await
        .unwrap();
    let taken = sqlx::query(insert)
        .execute(&mut *db.writer().await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(Failure::of(&taken), Failure::Conflict);
    assert!(!Failure::is_retryable(&taken));
    db.close().await;
}

#[tokio::test]
async fn a_pool_with_no_connection_to_spare_answers_503_in_time() {
    let pg = postgres_or_skip!();
    let dir = TempDir::new("pg-acquire");
    let db = Database::open(&DbConfig {
        pool_size: 1,
        acquire_timeout: Duration::from_millis(200),
        ..config(&pg, &dir)
    })
    .await
    .unwrap();
    // The pool holds pool_size + 1 = 2 connections.
    let first = db.begin_write().await.unwrap();
    let second = db.writer().await.unwrap();
    let late = db.begin_write().await.unwrap_err();
    assert!(matches!(late, sqlx::Error::PoolTimedOut), "{late}");
    assert_eq!(chassis::Problem::from(StoreError::from(late)).status(), 503);
    assert!(
        db.check().await.is_err(),
        "no connection to check with: not ready"
    );
    drop(second);
    first.rollback().await.unwrap();
    assert!(db.check().await.is_ok());
    db.close().await;
}

#[tokio::test]
async fn a_dropped_write_transaction_leaves_nothing() {
    let pg = postgres_or_skip!();
    let dir = TempDir::new("pg-dropped");
    let db = Database::open(&DbConfig {
        pool_size: 1,
        ..config(&pg, &dir)
    })
    .await
    .unwrap();
    sqlx::raw_sql("CREATE TABLE t (n BIGINT NOT NULL)")
        .execute(&mut *db.writer().await.unwrap())
        .await
        .unwrap();
    for _ in 0..4 {
        let mut tx = db.begin_write().await.unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        drop(tx);
    }
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
    db.close().await;
}

#[tokio::test]
async fn a_server_that_cannot_be_reached_fails_start_up_without_showing_the_password() {
    let dir = TempDir::new("pg-unreachable");
    // Nothing listens on the discard port of loopback.
    let config = DbConfig {
        acquire_timeout: Duration::from_secs(2),
        ..DbConfig::new(dir.path(), "unused.db").postgres("postgres://app:hunter2@127.0.0.1:9/app")
    };
    let err = Database::open(&config).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DbError::Open { .. }), "{text}");
    assert!(text.contains("postgres://app@127.0.0.1:9/app"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}
