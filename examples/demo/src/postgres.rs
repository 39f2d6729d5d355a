//! The demo's databases on a PostgreSQL server: one per service
//! (`chassis_demo_<service>`), made when missing through a connection to
//! the database the given URL names; the connections open on them.
//!
//! ```no_run
//! # async fn f() -> Result<(), String> {
//! let server = "postgres://postgres@127.0.0.1:5432/postgres";
//! let urls = demo::postgres::ensure(server, "chassis_demo").await?;
//! // [("auth", "postgres://postgres@127.0.0.1:5432/chassis_demo_auth"), ...]
//! assert_eq!(urls.len(), 4);
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use sqlx::Connection as _;

use crate::system::SERVICES;

/// The prefix of the demo's databases: `chassis_demo_<service>`.
pub const PREFIX: &str = "chassis_demo";

/// How long a statement on the server may take before the demo gives up.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// `server` (a `postgres://` URL naming any database on the server) with
/// its database replaced by `name`.
///
/// # Errors
///
/// `server` is not a `postgres://` or `postgresql://` URL.
pub fn database_url(server: &str, name: &str) -> Result<String, String> {
    let not_postgres = || {
        format!(
            "--postgres must be a postgres://user@host:port/database URL, not {:?}",
            redact(server)
        )
    };
    let (scheme, rest) = server.split_once("://").ok_or_else(not_postgres)?;
    if scheme != "postgres" && scheme != "postgresql" {
        return Err(not_postgres());
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = before_query.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(not_postgres());
    }
    let mut url = format!("{scheme}://{authority}/{name}");
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    Ok(url)
}

/// `url` without its password, for printing.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The database of each service, named `<prefix>_<service>`, on the
/// server of `server`, made when missing; their URLs, by service.
///
/// # Errors
///
/// `server` is not a PostgreSQL URL, the server cannot be reached, or a
/// database cannot be made.
pub async fn ensure(server: &str, prefix: &str) -> Result<Vec<(&'static str, String)>, String> {
    let names = names(prefix);
    let mut conn = connect(server).await?;
    for (_, name) in &names {
        let exists: Option<i32> = timed(
            sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(name)
                .fetch_optional(&mut conn),
        )
        .await?;
        if exists.is_none() {
            match timed(
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn),
            )
            .await
            {
                Ok(_) => {}
                // Made meanwhile by another demo: what was wanted.
                Err(e) if e.contains("already exists") => {}
                Err(e) => return Err(format!("cannot create the database {name}: {e}")),
            }
        }
    }
    let _ = conn.close().await;
    names
        .into_iter()
        .map(|(s, name)| Ok((s, database_url(server, &name)?)))
        .collect()
}

/// Drops the database of each service named `<prefix>_<service>`, and
/// its connections.
///
/// # Errors
///
/// The server cannot be reached or a database cannot be dropped.
pub async fn drop_all(server: &str, prefix: &str) -> Result<(), String> {
    let mut conn = connect(server).await?;
    for (_, name) in names(prefix) {
        timed(
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn),
        )
        .await
        .map_err(|e| format!("cannot drop the database {name}: {e}"))?;
    }
    let _ = conn.close().await;
    Ok(())
}

/// The connections open now on the demo's databases
/// (`datname LIKE 'chassis_demo_%'`), this one not counted.
///
/// # Errors
///
/// The server cannot be reached.
pub async fn connections(server: &str) -> Result<i64, String> {
    let mut conn = connect(server).await?;
    let count: i64 = timed(
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname LIKE 'chassis_demo_%' AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut conn),
    )
    .await?;
    let _ = conn.close().await;
    Ok(count)
}

fn names(prefix: &str) -> Vec<(&'static str, String)> {
    SERVICES
        .iter()
        .map(|s| (*s, format!("{prefix}_{s}")))
        .collect()
}

async fn connect(server: &str) -> Result<sqlx::postgres::PgConnection, String> {
    // Checked first: a URL that is not PostgreSQL's gets its own message.
    database_url(server, "postgres")?;
    timed(sqlx::postgres::PgConnection::connect(server))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", redact(server)))
}

async fn timed<T>(work: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, String> {
    match tokio::time::timeout(ANSWER_WITHIN, work).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no answer from the server within {} s",
            ANSWER_WITHIN.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_url_names_the_service_database() {
        assert_eq!(
            database_url(
                "postgres://postgres@127.0.0.1:5432/test",
                "chassis_demo_auth"
            )
            .unwrap(),
            "postgres://postgres@127.0.0.1:5432/chassis_demo_auth"
        );
        assert_eq!(
            database_url("postgresql://u:p@h/db?sslmode=disable", "x").unwrap(),
            "postgresql://u:p@h/x?sslmode=disable"
        );
        assert_eq!(database_url("postgres://h", "z").unwrap(), "postgres://h/z");
        for bad in ["mysql://h/db", "127.0.0.1:5432", "postgres:///db"] {
            let e = database_url(bad, "z").unwrap_err();
            assert!(e.contains("postgres://"), "{e}");
        }
    }

    #[test]
    fn a_password_is_never_printed() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert!(
            !database_url("mysql://u:secret@h/db", "x")
                .unwrap_err()
                .contains("secret")
        );
    }
}
