//! Reading settings from an environment, every problem at once: [`Reader`],
//! [`Env`], [`Secret`] and the errors.
//!
//! The standard and an example are in [`config`](crate::config), which
//! re-exports everything here; this module is apart so that the parts whose
//! settings the aggregate [`Config`](crate::config::Config) reads (auth,
//! audit, fault) can read them without depending on it.

use std::{collections::HashMap, ffi::OsString, fmt, str::FromStr};

/// Exit code for a configuration error (`EX_CONFIG` from `sysexits.h`).
pub const EXIT_CONFIG: u8 = 78;

/// Where settings come from: the process environment or a fixed map.
#[derive(Debug, Clone)]
pub struct Env {
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Process,
    Map(HashMap<String, OsString>),
}

impl Env {
    /// The process environment.
    pub fn process() -> Self {
        Self {
            source: Source::Process,
        }
    }

    /// A fixed set of variables, e.g. for tests.
    pub fn from_pairs<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<OsString>,
    {
        Self {
            source: Source::Map(
                pairs
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
        }
    }

    /// The raw value of `name`.
    pub fn get(&self, name: &str) -> Option<OsString> {
        match &self.source {
            Source::Process => std::env::var_os(name),
            Source::Map(map) => map.get(name).cloned(),
        }
    }

    /// The names of the variables set that start with `prefix`.
    #[cfg(not(feature = "jwt"))]
    fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        match &self.source {
            Source::Process => std::env::vars_os()
                .filter_map(|(name, _)| name.into_string().ok())
                .filter(|name| name.starts_with(prefix))
                .collect(),
            Source::Map(map) => map
                .keys()
                .filter(|name| name.starts_with(prefix))
                .cloned()
                .collect(),
        }
    }
}

/// A value that never prints: `Debug`, `Display` and `Serialize` all show
/// `[redacted]`. Read it with [`Secret::expose`], only where it is used.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub const fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret value itself.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> serde::Serialize for Secret<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

impl<T: FromStr> FromStr for Secret<T> {
    type Err = T::Err;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The variable.
    pub name: String,
    /// What is wrong, without the value of a secret.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.message)
    }
}

/// Every problem found while reading the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    problems: Vec<ConfigProblem>,
}

impl ConfigError {
    /// An error with the given problems.
    pub fn new(problems: Vec<ConfigProblem>) -> Self {
        Self { problems }
    }

    /// The problems, in the order they were found.
    pub fn problems(&self) -> &[ConfigProblem] {
        &self.problems
    }

    /// Prints the error to stderr and exits the process with code 78.
    pub fn exit(&self) -> ! {
        eprintln!("{self}");
        std::process::exit(i32::from(EXIT_CONFIG))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads settings from an [`Env`], collecting every problem; see the
/// [module docs](crate::config).
#[derive(Debug)]
pub struct Reader<'a> {
    env: &'a Env,
    problems: Vec<ConfigProblem>,
}

impl<'a> Reader<'a> {
    /// A reader over `env`.
    pub fn new(env: &'a Env) -> Self {
        Self {
            env,
            problems: Vec::new(),
        }
    }

    /// `name` parsed as `T`, or `default` when unset. An invalid value is
    /// recorded as a problem (and `default` returned so reading can go on).
    pub fn optional<T>(&mut self, name: &str, default: T, description: &str) -> T
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.read(name, description, false).unwrap_or(default)
    }

    /// `name` parsed as `T`, or `None` when unset or invalid (recorded).
    pub fn maybe<T>(&mut self, name: &str, description: &str) -> Option<T>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.read(name, description, false)
    }

    /// `name` parsed as `T`; a problem when unset or invalid.
    pub fn required<T>(&mut self, name: &str, description: &str) -> Option<T>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let value = self.read(name, description, false);
        if value.is_none() && self.env.get(name).is_none() {
            self.problem(name, format!("required but not set ({description})"));
        }
        value
    }

    /// A required secret; its value never appears in a problem.
    pub fn required_secret(&mut self, name: &str, description: &str) -> Option<Secret<String>> {
        let value = self.read::<String>(name, description, true);
        match value {
            Some(v) if v.is_empty() => {
                self.problem(name, format!("required but empty ({description})"));
                None
            }
            Some(v) => Some(Secret(v)),
            None => {
                if self.env.get(name).is_none() {
                    self.problem(name, format!("required but not set ({description})"));
                }
                None
            }
        }
    }

    /// An optional secret.
    pub fn maybe_secret(&mut self, name: &str, description: &str) -> Option<Secret<String>> {
        self.read::<String>(name, description, true).map(Secret)
    }

    /// Records a problem found by the service itself, e.g. two settings that
    /// contradict each other.
    ///
    /// The same problem recorded twice (for example a shared variable such
    /// as `CHASSIS_TLS_CA_FILE` read by the chassis and by the service) is
    /// listed once.
    pub fn problem(&mut self, name: &str, message: impl Into<String>) {
        let problem = ConfigProblem {
            name: name.to_owned(),
            message: message.into(),
        };
        if !self.problems.contains(&problem) {
            self.problems.push(problem);
        }
    }

    /// `Err` with every problem found, if any.
    pub fn finish(self) -> Result<(), ConfigError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                problems: self.problems,
            })
        }
    }

    /// [`finish`](Self::finish), then build the settings. Inside `build`, the
    /// `Option`s of required settings are all `Some`, so `?` unwraps them.
    pub fn finish_with<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, ConfigError> {
        self.finish()?;
        build().ok_or_else(|| ConfigError {
            problems: vec![ConfigProblem {
                name: "configuration".to_owned(),
                message: "a required setting was not read through this reader".to_owned(),
            }],
        })
    }

    pub(crate) fn read<T>(&mut self, name: &str, description: &str, secret: bool) -> Option<T>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let raw = self.env.get(name)?;
        let Some(text) = raw.to_str() else {
            self.problem(name, format!("not valid UTF-8 ({description})"));
            return None;
        };
        match text.parse::<T>() {
            Ok(v) => Some(v),
            Err(e) if secret => {
                self.problem(name, format!("invalid value ({description}): {e}"));
                None
            }
            Err(e) => {
                let shown: String = text
                    .chars()
                    .take(64)
                    .flat_map(char::escape_default)
                    .collect();
                self.problem(
                    name,
                    format!("invalid value `{shown}` ({description}): {e}"),
                );
                None
            }
        }
    }
}

impl Reader<'_> {
    /// Records a problem for each variable named `prefix…` that is set, when
    /// the part that reads them, `feature`, was not built: a setting is never
    /// silently ignored.
    #[cfg(not(feature = "jwt"))]
    pub(crate) fn refuse_without_feature(&mut self, prefix: &str, feature: &str, part: &str) {
        let mut names = self.env.names_with_prefix(prefix);
        names.sort_unstable();
        for name in names {
            self.problem(
                &name,
                format!(
                    "set, but this build of the chassis has no {part}: enable the `{feature}` feature of service-chassis, or unset it"
                ),
            );
        }
    }
}
