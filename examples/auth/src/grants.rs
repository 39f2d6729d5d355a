//! Permissions as data: the users and service clients declared in the
//! grants file (`AUTH_GRANTS_FILE`, TOML), applied at start-up and again
//! whenever the file changes.
//!
//! ```toml
//! [clients.keycards]
//! secret_env = "KEYCARDS_CLIENT_SECRET"   # or secret_hash = "$argon2id$v=19$..."
//! grants = ["ticketing:*:view:ticket", "!ticketing:vip:view:ticket"]
//!
//! [users.carol]
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! grants = ["ticketing:acme:*:*"]
//! ```
//!
//! Each client or user has exactly one secret: `secret_env` (the name of an
//! environment variable holding it), `secret_hash` (an argon2id PHC string),
//! or a literal `secret`, allowed only in a file that says `demo = true`
//! (its secrets are public). For users, `password`, `password_env` and
//! `password_hash` are the same fields. Grants are permission grants as in
//! the `perms` claim (`*` segments, `!` for a deny).
//!
//! Applying a file upserts: the subjects it names get its secret and
//! grants, whether they exist already or not, and subjects it named before
//! but no longer names are removed. The file is authoritative for what it
//! names; subjects it does not name (registered through the admin API) are
//! left alone, and the admin API refuses to change the ones it names. A
//! grant changed in the file is in the subject's next token; tokens issued
//! before keep theirs until they expire.
//!
//! Without a grants file (and without the demo's grants) nothing is
//! applied, and the stored subjects stay as they are.
//!
//! A file with problems is refused whole, with every problem listed: at
//! start-up as a configuration error, later by keeping the grants last
//! applied (logged, counted in `auth_grants_file_rejected_total`, and shown
//! by the `grants-file` readiness check, which readiness does not depend
//! on).

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use chassis::{
    config::{Env, Secret},
    db::{Database, retry},
    health::CheckError,
    permission::{Grant, MAX_GRANTS},
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{error::AppError, keys::to_i64, password::Hasher, store::Kind};

/// The demo system's users and clients, with their public secrets: what
/// `AUTH_SEED_DEMO=true` applies, and the grants file the demo writes.
pub const DEMO_GRANTS: &str = include_str!("../grants.demo.toml");

/// Counts grants files (or changes of one) refused for their problems.
pub(crate) const REJECTED: &str = "auth_grants_file_rejected_total";

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    demo: bool,
    #[serde(default)]
    clients: BTreeMap<String, EntryDoc>,
    #[serde(default)]
    users: BTreeMap<String, EntryDoc>,
}

/// One client or user as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryDoc {
    #[serde(default, alias = "password")]
    secret: Option<String>,
    #[serde(default, alias = "password_env")]
    secret_env: Option<String>,
    #[serde(default, alias = "password_hash")]
    secret_hash: Option<String>,
    #[serde(default)]
    grants: Vec<String>,
}

/// How a declared subject proves who it is.
#[derive(Debug, Clone)]
pub(crate) enum Credential {
    /// The secret itself (from the environment, or a demo's literal).
    Plain(Secret<String>),
    /// Its argon2id hash, stored as it is.
    Hash(String),
}

/// A user or client as declared.
#[derive(Debug, Clone)]
pub(crate) struct Declared {
    pub(crate) kind: Kind,
    pub(crate) name: String,
    pub(crate) credential: Credential,
    pub(crate) grants: Vec<String>,
}

/// Whether `name` may name a user or client: 1 to 128 of
/// `[A-Za-z0-9._@-]` (it is a token's `sub` and a path segment of the
/// admin API, and a client id never holds the `:` of HTTP Basic).
pub(crate) fn is_subject_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

/// What a subject name may look like, for problem messages.
pub(crate) const NAME_GRAMMAR: &str = "names are 1 to 128 characters of [A-Za-z0-9._@-]";

/// The problems of `grants`, one message each, prefixed by the position
/// of the grant: empty when every grant is valid.
pub(crate) fn grant_problems(grants: &[String]) -> Vec<(usize, String)> {
    let mut problems = Vec::new();
    if grants.len() > MAX_GRANTS {
        problems.push((MAX_GRANTS, format!("more than {MAX_GRANTS} grants")));
    }
    for (i, g) in grants.iter().enumerate() {
        if let Err(e) = g.parse::<Grant>() {
            problems.push((i, format!("grant {g:?} is not valid: {e}")));
        }
    }
    problems
}

/// Parses and checks a grants file, resolving `secret_env` with `lookup`;
/// every problem is listed.
pub(crate) fn parse(
    text: &str,
    lookup: &mut dyn FnMut(&str) -> Option<Secret<String>>,
) -> Result<Vec<Declared>, Vec<String>> {
    let doc: FileDoc = toml::from_str(text).map_err(|e| vec![toml_problem(text, &e)])?;
    let mut problems = Vec::new();
    let mut declared = Vec::new();
    let kinds = [(Kind::Client, doc.clients), (Kind::User, doc.users)];
    for (kind, entries) in kinds {
        for (name, entry) in entries {
            let what = format!("{} {name:?}", kind.as_str());
            let before = problems.len();
            if !is_subject_name(&name) {
                problems.push(format!("{what}: {NAME_GRAMMAR}"));
            }
            for (_, p) in grant_problems(&entry.grants) {
                problems.push(format!("{what}: {p}"));
            }
            let credential = match (entry.secret, entry.secret_env, entry.secret_hash) {
                (Some(secret), None, None) => {
                    if !doc.demo {
                        problems.push(format!(
                            "{what}: a literal secret is allowed only in a file that says \
                             `demo = true`; use secret_env or secret_hash"
                        ));
                    }
                    if secret.is_empty() {
                        problems.push(format!("{what}: the secret is empty"));
                    }
                    Some(Credential::Plain(Secret::new(secret)))
                }
                (None, Some(var), None) => match lookup(&var) {
                    Some(s) if !s.expose().is_empty() => Some(Credential::Plain(s)),
                    Some(_) => {
                        problems.push(format!("{what}: the variable {var} of secret_env is empty"));
                        None
                    }
                    None => {
                        problems.push(format!(
                            "{what}: the variable {var} of secret_env is not set"
                        ));
                        None
                    }
                },
                (None, None, Some(hash)) => match crate::password::check_phc(&hash) {
                    Ok(()) => Some(Credential::Hash(hash)),
                    Err(e) => {
                        problems.push(format!("{what}: secret_hash: {e}"));
                        None
                    }
                },
                _ => {
                    problems.push(format!(
                        "{what}: give exactly one of secret_env, secret_hash or (demo only) secret"
                    ));
                    None
                }
            };
            if let (Some(credential), true) = (credential, problems.len() == before) {
                declared.push(Declared {
                    kind,
                    name,
                    credential,
                    grants: entry.grants,
                });
            }
        }
    }
    if problems.is_empty() {
        Ok(declared)
    } else {
        Err(problems)
    }
}

/// A TOML error as one line: where it is and what is wrong, without the
/// text of the line (which may hold a secret).
fn toml_problem(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => format!("not valid: {message}"),
    }
}

/// Where the declared subjects come from: the demo's (with
/// `AUTH_SEED_DEMO`) and the grants file, whose entries win.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sources {
    pub(crate) demo: bool,
    pub(crate) file: Option<PathBuf>,
}

/// What a look at the sources found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// The file's contents (or none without a file).
    Contents(Option<Vec<u8>>),
    /// The file could not be read.
    Unreadable(String),
}

impl Sources {
    /// Reads the file, if any, as it is now.
    async fn look(&self) -> Seen {
        match &self.file {
            None => Seen::Contents(None),
            Some(path) => match tokio::fs::read(path).await {
                Ok(bytes) => Seen::Contents(Some(bytes)),
                Err(e) => Seen::Unreadable(format!("{}: cannot be read: {e}", path.display())),
            },
        }
    }

    /// Every subject declared by what `seen` found, or every problem.
    fn declared(
        &self,
        seen: &Seen,
        lookup: &mut dyn FnMut(&str) -> Option<Secret<String>>,
    ) -> Result<Vec<Declared>, Vec<String>> {
        let mut all = Vec::new();
        let mut problems = Vec::new();
        if self.demo {
            match parse(DEMO_GRANTS, lookup) {
                Ok(d) => all = d,
                Err(p) => problems.extend(p.into_iter().map(|p| format!("demo grants: {p}"))),
            }
        }
        match seen {
            Seen::Unreadable(e) => problems.push(e.clone()),
            Seen::Contents(None) => {}
            Seen::Contents(Some(bytes)) => {
                let path = self.file.as_deref().unwrap_or(Path::new("grants file"));
                match std::str::from_utf8(bytes) {
                    Err(_) => problems.push(format!("{}: not UTF-8 text", path.display())),
                    Ok(text) => match parse(text, lookup) {
                        Ok(file) => {
                            let named: HashSet<(Kind, &str)> =
                                file.iter().map(|d| (d.kind, d.name.as_str())).collect();
                            all.retain(|d| !named.contains(&(d.kind, d.name.as_str())));
                            all.extend(file);
                        }
                        Err(p) => problems
                            .extend(p.into_iter().map(|p| format!("{}: {p}", path.display()))),
                    },
                }
            }
        }
        if problems.is_empty() {
            Ok(all)
        } else {
            Err(problems)
        }
    }

    /// Checks the sources as they are now, resolving `secret_env` with
    /// `lookup`: the problems, for the start-up configuration check.
    pub(crate) fn check_now(
        &self,
        lookup: &mut dyn FnMut(&str) -> Option<Secret<String>>,
    ) -> Vec<String> {
        let seen = match &self.file {
            None => Seen::Contents(None),
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => Seen::Contents(Some(bytes)),
                Err(e) => Seen::Unreadable(format!("{}: cannot be read: {e}", path.display())),
            },
        };
        self.declared(&seen, lookup).err().unwrap_or_default()
    }
}

/// Resolves `secret_env` from the process environment.
fn process_lookup() -> impl FnMut(&str) -> Option<Secret<String>> {
    let env = Env::process();
    move |name| {
        env.get(name)
            .map(|v| Secret::new(v.to_string_lossy().into_owned()))
    }
}

/// What applying the declared subjects changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    pub(crate) created: usize,
    pub(crate) updated: usize,
    pub(crate) removed: usize,
}

/// The stored hash, grants and manager of a subject.
type Row = (String, String, String);

async fn row(db: &Database, kind: Kind, name: &str) -> Result<Option<Row>, AppError> {
    let sql = match kind {
        Kind::User => "SELECT password_hash, grants, managed_by FROM users WHERE username = $1",
        Kind::Client => "SELECT secret_hash, grants, managed_by FROM clients WHERE client_id = $1",
    };
    Ok(sqlx::query_as(sql)
        .bind(name)
        .fetch_optional(db.pool())
        .await?)
}

/// Upserts the declared subjects (managed by the file from now on) and
/// removes the file-managed ones no longer declared. A secret that still
/// matches its stored hash keeps it, so an unchanged file hashes nothing.
pub(crate) async fn apply(
    db: &Database,
    hasher: &Hasher,
    declared: &[Declared],
    now: u64,
) -> Result<Applied, AppError> {
    // Hashing first, outside the write transaction.
    let mut rows = Vec::with_capacity(declared.len());
    let mut applied = Applied::default();
    for d in declared {
        let existing = row(db, d.kind, &d.name).await?;
        let hash = match (&d.credential, &existing) {
            (Credential::Hash(h), _) => h.clone(),
            (Credential::Plain(s), Some((stored, _, _))) => {
                // A stored hash that cannot be read, or no slot in time:
                // hashed again.
                if hasher.verify(Some(stored), s.expose()).await == Ok(true) {
                    stored.clone()
                } else {
                    hasher.hash(s.expose()).await?
                }
            }
            (Credential::Plain(s), None) => hasher.hash(s.expose()).await?,
        };
        let grants = serde_json::to_string(&d.grants)
            .map_err(|e| AppError::Data(format!("grants of {}: {e}", d.name)))?;
        match &existing {
            None => applied.created += 1,
            Some(old) if *old != (hash.clone(), grants.clone(), "file".to_owned()) => {
                applied.updated += 1;
            }
            Some(_) => {}
        }
        rows.push((d.kind, d.name.as_str(), hash, grants));
    }
    // Instances starting together with the same file may apply it at the
    // same moment: every statement is an upsert or a delete that leaves the
    // same rows whichever runs first, and a transaction undone by a
    // deadlock runs again.
    applied.removed = retry(|| store(db, &rows, now)).await?;
    Ok(applied)
}

/// The one transaction of [`apply`]: upserts `rows` and deletes the
/// file-managed subjects not among them; returns how many it deleted.
async fn store(
    db: &Database,
    rows: &[(Kind, &str, String, String)],
    now: u64,
) -> Result<usize, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    let mut removed = 0;
    for (kind, name, hash, grants) in rows {
        let sql = match kind {
            Kind::User => {
                "INSERT INTO users (username, password_hash, grants, created_at, managed_by) \
                 VALUES ($1, $2, $3, $4, 'file') ON CONFLICT (username) DO UPDATE SET \
                 password_hash = excluded.password_hash, grants = excluded.grants, managed_by = 'file'"
            }
            Kind::Client => {
                "INSERT INTO clients (client_id, secret_hash, grants, created_at, managed_by) \
                 VALUES ($1, $2, $3, $4, 'file') ON CONFLICT (client_id) DO UPDATE SET \
                 secret_hash = excluded.secret_hash, grants = excluded.grants, managed_by = 'file'"
            }
        };
        sqlx::query(sql)
            .bind(name)
            .bind(hash)
            .bind(grants)
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await?;
    }
    for kind in [Kind::User, Kind::Client] {
        let (select, delete) = match kind {
            Kind::User => (
                "SELECT username FROM users WHERE managed_by = 'file'",
                "DELETE FROM users WHERE username = $1",
            ),
            Kind::Client => (
                "SELECT client_id FROM clients WHERE managed_by = 'file'",
                "DELETE FROM clients WHERE client_id = $1",
            ),
        };
        let managed: Vec<(String,)> = sqlx::query_as(select).fetch_all(&mut *tx).await?;
        for (name,) in managed {
            if !rows.iter().any(|(k, n, _, _)| *k == kind && *n == name) {
                if kind == Kind::User {
                    // Their logins end with them.
                    sqlx::query("DELETE FROM refresh_tokens WHERE username = $1")
                        .bind(&name)
                        .execute(&mut *tx)
                        .await?;
                }
                let deleted = sqlx::query(delete)
                    .bind(&name)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if deleted == 0 {
                    // Another instance applying the same file removed it.
                    continue;
                }
                removed += 1;
                tracing::info!(subject = %name, kind = kind.as_str(), "removed: no longer in the grants file");
            }
        }
    }
    tx.commit().await?;
    Ok(removed)
}

/// Applies the sources at start-up. Without any (no file, no demo grants)
/// nothing is applied: the stored subjects stay as they are.
///
/// # Errors
///
/// [`AppError::Grants`] listing every problem of the file; a database or
/// hashing failure.
pub(crate) async fn apply_at_start(
    sources: &Sources,
    db: &Database,
    hasher: &Hasher,
    now: u64,
) -> Result<Option<Vec<u8>>, AppError> {
    if !sources.demo && sources.file.is_none() {
        return Ok(None);
    }
    let seen = sources.look().await;
    let declared = sources
        .declared(&seen, &mut process_lookup())
        .map_err(AppError::Grants)?;
    let applied = apply(db, hasher, &declared, now).await?;
    log_applied(&declared, applied);
    Ok(match seen {
        Seen::Contents(bytes) => bytes,
        Seen::Unreadable(_) => None,
    })
}

fn log_applied(declared: &[Declared], applied: Applied) {
    tracing::info!(
        subjects = declared.len(),
        created = applied.created,
        updated = applied.updated,
        removed = applied.removed,
        "grants applied"
    );
}

/// The outcome of the last change of the grants file: its problems while
/// it is refused.
#[derive(Debug, Clone, Default)]
pub(crate) struct Status(Arc<Mutex<Option<Vec<String>>>>);

impl Status {
    fn set(&self, problems: Option<Vec<String>>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = problems;
    }

    /// The readiness check: down while the file's last change is refused.
    pub(crate) fn check(&self) -> Result<(), CheckError> {
        let problems = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match problems.as_deref() {
            None => Ok(()),
            Some(p) => Err(CheckError::new(format!(
                "the grants file is not valid ({} problems, in the log); the grants last applied stay in force",
                p.len()
            ))),
        }
    }
}

/// Looks at the grants file every `poll` and applies it when its contents
/// changed; a file with problems is refused whole and the grants last
/// applied stay. `start` is what start-up applied.
pub(crate) async fn watch(
    sources: Sources,
    db: Database,
    hasher: Hasher,
    status: Status,
    start: Option<Vec<u8>>,
    poll: Duration,
    stop: CancellationToken,
) {
    let mut last = Seen::Contents(start);
    let mut ticks = tokio::time::interval(poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let seen = sources.look().await;
        if seen == last {
            continue;
        }
        match sources.declared(&seen, &mut process_lookup()) {
            Err(problems) => {
                for problem in &problems {
                    tracing::warn!(%problem, "grants file refused");
                }
                tracing::error!(
                    problems = problems.len(),
                    "the grants file changed and is not valid; the grants last applied stay in force"
                );
                metrics::counter!(REJECTED).increment(1);
                status.set(Some(problems));
                last = seen;
            }
            Ok(declared) => match apply(&db, &hasher, &declared, crate::token::now()).await {
                Ok(applied) => {
                    log_applied(&declared, applied);
                    status.set(None);
                    last = seen;
                }
                // Tried again at the next look.
                Err(e) => tracing::error!(error = %e, "grants file not applied"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<Secret<String>> {
        None
    }

    #[test]
    fn the_demo_grants_are_valid() {
        let d = parse(DEMO_GRANTS, &mut no_env).unwrap();
        let names: Vec<_> = d.iter().map(|d| (d.kind, d.name.as_str())).collect();
        assert_eq!(
            names,
            [
                (Kind::Client, "mail"),
                (Kind::Client, "orders"),
                (Kind::Client, "ticketing"),
                (Kind::User, "admin"),
                (Kind::User, "alice"),
                (Kind::User, "bob"),
            ]
        );
    }

    #[test]
    fn every_problem_is_listed_and_no_secret_is_shown() {
        let text = r#"
[clients."bad id"]
secret_env = "UNSET"
grants = ["ticketing:*:view"]

[clients.keycards]
secret = "hunter2"
grants = ["!ticketing:acme:view", "ticketing:*:view:ticket"]

[users.carol]
password_hash = "$argon2id$nope"
password_env = "SET"
"#;
        let mut lookup = |name: &str| (name == "SET").then(|| Secret::new("x".to_owned()));
        let problems = parse(text, &mut lookup).unwrap_err();
        assert_eq!(problems.len(), 6, "{problems:#?}");
        let all = problems.join("\n");
        for part in [
            "client \"bad id\": names are",
            "client \"bad id\": grant \"ticketing:*:view\" is not valid",
            "client \"bad id\": the variable UNSET of secret_env is not set",
            "client \"keycards\": grant \"!ticketing:acme:view\" is not valid",
            "client \"keycards\": a literal secret is allowed only",
            "user \"carol\": give exactly one of",
        ] {
            assert!(all.contains(part), "{part} missing: {all}");
        }
        assert!(!all.contains("hunter2"));

        // A syntax error names its line, not its text.
        let problems = parse("[clients.x]\nsecret = \"hunter2\n", &mut no_env).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("line 2:"), "{problems:?}");
        assert!(!problems[0].contains("hunter2"));
        let problems = parse("[clients.x]\nsecrets = \"a\"\n", &mut no_env).unwrap_err();
        assert!(problems[0].contains("secrets"), "{problems:?}");
    }

    #[test]
    fn the_file_wins_over_the_demo_grants_for_what_it_names() {
        let dir = std::env::temp_dir().join(format!("auth-grants-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("grants.toml");
        std::fs::write(
            &path,
            "[clients.orders]\nsecret_env = \"ORDERS\"\ngrants = [\"mail::send:message\"]\n",
        )
        .unwrap();
        let sources = Sources {
            demo: true,
            file: Some(path.clone()),
        };
        let seen = Seen::Contents(Some(std::fs::read(&path).unwrap()));
        let mut lookup = |_: &str| Some(Secret::new("s".to_owned()));
        let all = sources.declared(&seen, &mut lookup).unwrap();
        assert_eq!(all.len(), 6);
        let orders: Vec<_> = all.iter().filter(|d| d.name == "orders").collect();
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0].grants, ["mail::send:message"]);
        assert!(matches!(&orders[0].credential, Credential::Plain(s) if s.expose() == "s"));

        std::fs::remove_file(&path).unwrap();
        let problems = sources.check_now(&mut lookup);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("cannot be read"), "{problems:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
