//! Property-based tests of a running service against its own OpenAPI
//! document, with [schemathesis](https://schemathesis.readthedocs.io)
//! (PyPI), run as a separate process.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use tokio::time::Instant;

use super::TempDir;

/// The variable naming the schemathesis executable (`st`);
/// `.ci/schemathesis` installs the pinned version and sets it. Without it,
/// [`Schemathesis::run`] skips, saying so.
pub const SCHEMATHESIS_VAR: &str = "CHASSIS_SCHEMATHESIS";

/// The seed every run uses unless told otherwise, so that a failure found
/// once is found again (`st` prints it, with each case's replay command).
pub const SCHEMATHESIS_SEED: u64 = 19;

/// The variable that sets another seed for a run (to explore: each seed
/// generates other cases).
pub const SCHEMATHESIS_SEED_VAR: &str = "CHASSIS_SCHEMATHESIS_SEED";

/// The variable that sets another number of cases per operation and phase.
pub const SCHEMATHESIS_MAX_EXAMPLES_VAR: &str = "CHASSIS_SCHEMATHESIS_MAX_EXAMPLES";

/// How many cases schemathesis generates per operation and phase unless
/// told otherwise.
pub const SCHEMATHESIS_MAX_EXAMPLES: u32 = 40;

/// How long a run may take before it is killed and the test fails: a
/// guard against a hang, far above what a run needs.
pub const SCHEMATHESIS_WITHIN: Duration = Duration::from_secs(600);

/// A schemathesis run against `GET <base>/<service>/v<N>/openapi.json`:
/// every check (`--checks all`), with a fixed seed, a bounded number of
/// cases per operation, one worker, no example database (each run starts
/// from the seed alone), in a temporary directory.
///
/// ```no_run
/// use chassis::testing::{Schemathesis, TestIssuer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// # let base = "http://127.0.0.1:8080";
/// let token = TestIssuer::new().user_token("alice", &["ticketing:acme:*:*"]);
/// Schemathesis::new(base, "ticketing", 1)
///     .bearer(&token)
///     .account("acme")
///     .run()
///     .await;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Schemathesis {
    url: String,
    token: Option<String>,
    account: Option<String>,
    config: String,
    seed: u64,
    max_examples: u32,
    within: Duration,
}

impl Schemathesis {
    /// A run against the document of version `version` of `service`
    /// served at `base` (`http://127.0.0.1:PORT`), with
    /// [`SCHEMATHESIS_SEED`] and [`SCHEMATHESIS_MAX_EXAMPLES`] unless
    /// [`SCHEMATHESIS_SEED_VAR`] or [`SCHEMATHESIS_MAX_EXAMPLES_VAR`] say
    /// otherwise.
    ///
    /// # Panics
    ///
    /// When one of those variables is set but not a number.
    pub fn new(base: &str, service: &str, version: u32) -> Self {
        Self {
            url: format!("{base}/{service}/v{version}/openapi.json"),
            token: None,
            account: None,
            config: String::new(),
            seed: number_from(SCHEMATHESIS_SEED_VAR).unwrap_or(SCHEMATHESIS_SEED),
            max_examples: number_from(SCHEMATHESIS_MAX_EXAMPLES_VAR)
                .unwrap_or(SCHEMATHESIS_MAX_EXAMPLES),
            within: SCHEMATHESIS_WITHIN,
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request (the
    /// `ignored_auth` check still tries each protected operation without
    /// it, and with a broken one).
    #[must_use]
    pub fn bearer(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// Fills the `{account}` path parameter with `account` (the one the
    /// token's grants cover) in 9 cases out of 10, so that most calls reach
    /// the handlers; the others are generated, in and out of the account
    /// grammar, and answer 403 or 404.
    #[must_use]
    pub fn account(mut self, account: &str) -> Self {
        self.account = Some(account.to_owned());
        self
    }

    /// Adds `toml` to the run's `schemathesis.toml` (per-operation
    /// settings, dictionaries, ...). Say why next to it.
    #[must_use]
    pub fn config(mut self, toml: &str) -> Self {
        self.config.push_str(toml);
        self.config.push('\n');
        self
    }

    /// Lets a valid request to `operation` (as schemathesis names it:
    /// `POST /orders/v1/{account}/orders`) be answered with `statuses` too,
    /// besides the `positive_data_acceptance` check's own (2xx, 3xx, 401,
    /// 403, 404, 409, 429): for a rule that the schema cannot state, such
    /// as one field compared with another, or an id that must exist
    /// elsewhere. `why` is written beside it in the run's config, and shown
    /// with it on a failure.
    #[must_use]
    pub fn valid_may_answer(mut self, operation: &str, statuses: &[u16], why: &str) -> Self {
        let mut expected: Vec<String> = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
            .iter()
            .map(|s| toml_string(s))
            .collect();
        expected.extend(statuses.iter().map(|s| toml_string(&s.to_string())));
        let _ = write!(
            self.config,
            "# {}\n[[operations]]\ninclude-name = {}\nchecks.positive_data_acceptance.expected-statuses = [{}]\n\n",
            why.replace('\n', " "),
            toml_string(operation),
            expected.join(", ")
        );
        self
    }

    /// The seed (by default [`SCHEMATHESIS_SEED`]).
    #[must_use]
    pub const fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Cases per operation and phase (by default
    /// [`SCHEMATHESIS_MAX_EXAMPLES`]).
    #[must_use]
    pub const fn max_examples(mut self, n: u32) -> Self {
        self.max_examples = n;
        self
    }

    /// How long the run may take before it is killed (by default
    /// [`SCHEMATHESIS_WITHIN`]).
    #[must_use]
    pub const fn within(mut self, within: Duration) -> Self {
        self.within = within;
        self
    }

    /// The `schemathesis.toml` of the run.
    fn config_file(&self) -> String {
        let mut toml = String::new();
        if let Some(account) = &self.account {
            let _ = write!(
                toml,
                "[dictionaries.accounts]\nvalues = [{}]\n\n\
                 [parameters]\n\"path.account\" = {{ dictionary = \"accounts\", probability = 0.9 }}\n\n",
                toml_string(account)
            );
        }
        toml.push_str(&self.config);
        toml
    }

    /// Runs schemathesis and waits for it; returns its report (stdout).
    /// Skips, printing why, when [`SCHEMATHESIS_VAR`] is not set.
    ///
    /// # Panics
    ///
    /// When schemathesis finds a failure (the panic shows its report, with
    /// each case's `curl` and replay command), cannot be started, or runs
    /// longer than [`within`](Self::within).
    pub async fn run(self) -> Option<String> {
        let Some(st) = std::env::var_os(SCHEMATHESIS_VAR).map(PathBuf::from) else {
            eprintln!(
                "SKIPPED: {SCHEMATHESIS_VAR} is not set, so {} is not tested with schemathesis; \
                 `.ci/schemathesis` installs the pinned version and runs these tests",
                self.url
            );
            return None;
        };
        let within = self.within;
        let url = self.url.clone();
        let report = tokio::task::spawn_blocking(move || self.run_blocking(&st))
            .await
            .unwrap_or_else(|e| panic!("schemathesis against {url} (bound {within:?}): {e}"));
        Some(report)
    }

    fn run_blocking(&self, st: &std::path::Path) -> String {
        let dir = TempDir::new("schemathesis");
        let config = dir.join("schemathesis.toml");
        std::fs::write(&config, self.config_file()).expect("the config file written");
        let stdout = dir.join("stdout.txt");
        let out = std::fs::File::create(&stdout).expect("the output file");
        let mut cmd = Command::new(st);
        cmd.current_dir(dir.path())
            .arg("--config-file")
            .arg(&config)
            .arg("run")
            .arg(&self.url)
            .args(["--checks", "all"])
            .args(["--seed", &self.seed.to_string()])
            .args(["--max-examples", &self.max_examples.to_string()])
            .args(["--workers", "1"])
            .args(["--generation-database", "none"])
            .args(["--request-timeout", "30"])
            .arg("--no-color")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("the output file"))
            .stderr(out);
        if let Some(token) = &self.token {
            cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", st.display()));
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for schemathesis") {
                break Some(status);
            }
            if started.elapsed() > self.within {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let report = std::fs::read_to_string(&stdout).unwrap_or_default();
        match status {
            Some(s) if s.success() => {
                let last = report.lines().rev().find(|l| !l.trim().is_empty());
                eprintln!("schemathesis against {}: {}", self.url, last.unwrap_or(""));
                report
            }
            Some(s) => panic!(
                "schemathesis found failures against {} ({s}; seed {}):\n\n{report}\nconfig:\n{}",
                self.url,
                self.seed,
                self.config_file()
            ),
            None => panic!(
                "schemathesis against {} did not finish within {:?}; killed. Its output:\n\n{report}",
                self.url, self.within
            ),
        }
    }
}

/// The number in variable `name`, when it is set.
fn number_from<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_account_is_a_dictionary_bound_to_the_path_parameter() {
        let run = Schemathesis::new("http://127.0.0.1:1", "orders", 1)
            .account("ac\"me")
            .config("[[operations]]\ninclude-name = \"GET /x\"");
        let toml = run.config_file();
        assert!(toml.contains("values = [\"ac\\\"me\"]"), "{toml}");
        assert!(toml.contains("\"path.account\" = { dictionary = \"accounts\""));
        assert!(toml.ends_with("include-name = \"GET /x\"\n"), "{toml}");
        assert_eq!(run.url, "http://127.0.0.1:1/orders/v1/openapi.json");
    }
}
