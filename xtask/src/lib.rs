//! The project's tasks. `new-service` copies an exemplar into a new service
//! with every name renamed; the binary (`src/main.rs`) reads the command
//! line.
//!
//! A name has four forms, and each appears in a service in its own places:
//!
//! | form | `ticketing` | `key-cards` | where |
//! |---|---|---|---|
//! | service | `ticketing` | `key-cards` | the service and package name, routes, permissions, audiences, metric labels, file names |
//! | crate | `ticketing` | `key_cards` | `use …::`, `[lib] name` |
//! | type | `Ticketing` | `KeyCards` | `TicketingClient`, and the name at the start of a sentence |
//! | env | `TICKETING` | `KEY_CARDS` | `TICKETING_*` variables, `CHASSIS_DOWNSTREAM_TICKETING_*` |
//!
//! ```
//! use xtask::Names;
//!
//! let names = Names::new("key-cards").unwrap();
//! assert_eq!(names.type_name, "KeyCards");
//! let from = Names::new("ticketing").unwrap();
//! assert_eq!(
//!     xtask::rename("use ticketing::TicketingClient; // TICKETING_DATA_DIR, /ticketing/v1", "rs", &from, &names),
//!     "use key_cards::KeyCardsClient; // KEY_CARDS_DATA_DIR, /key-cards/v1",
//! );
//! ```

use std::{
    collections::BTreeSet,
    fmt, fs,
    path::{Path, PathBuf},
};

/// The forms of a service's name; see the [crate docs](crate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// As the service calls itself: `key-cards`.
    pub service: String,
    /// As a Rust crate: `key_cards`.
    pub crate_name: String,
    /// As a Rust type prefix: `KeyCards`.
    pub type_name: String,
    /// As an environment variable prefix: `KEY_CARDS`.
    pub env: String,
}

impl Names {
    /// The forms of `service`, or why it cannot name a service: the
    /// chassis' rule (lowercase letters, digits and `-`, starting with a
    /// letter, at most 63 bytes), no `--` and no trailing `-`.
    pub fn new(service: &str) -> Result<Self, String> {
        let valid = service.len() <= 63
            && service.starts_with(|c: char| c.is_ascii_lowercase())
            && service
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !service.ends_with('-')
            && !service.contains("--");
        if !valid {
            return Err(format!(
                "`{service}` cannot name a service: use lowercase letters, digits and single `-`, starting with a letter (at most 63)"
            ));
        }
        let type_name = service
            .split('-')
            .map(|part| {
                let mut chars = part.chars();
                chars
                    .next()
                    .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            })
            .collect();
        Ok(Self {
            service: service.to_owned(),
            crate_name: service.replace('-', "_"),
            type_name,
            env: service.replace('-', "_").to_ascii_uppercase(),
        })
    }
}

/// `text`, from a file with extension `ext`, with every form of `from`'s
/// name replaced by the same form of `to`'s.
///
/// In Rust files the service form followed by `::` is the crate form; in a
/// Cargo manifest, so is the `name` of `[lib]`.
pub fn rename(text: &str, ext: &str, from: &Names, to: &Names) -> String {
    let text = text
        .replace(&from.env, &to.env)
        .replace(&from.type_name, &to.type_name)
        .replace(
            &format!("{}::", from.crate_name),
            &format!("{}::", to.crate_name),
        )
        .replace(
            &format!("{}_", from.crate_name),
            &format!("{}_", to.crate_name),
        );
    let text = match ext {
        "toml" => lib_name(&text, from, to),
        _ => text,
    };
    text.replace(&from.service, &to.service)
        .replace(&from.crate_name, &to.crate_name)
}

/// A manifest's `[lib] name = "…"` in the crate form.
fn lib_name(manifest: &str, from: &Names, to: &Names) -> String {
    let old = format!("name = \"{}\"", from.service);
    edit_section(manifest, "[lib]", |line| {
        (line.trim() == old).then(|| {
            line.replace(
                &format!("\"{}\"", from.service),
                &format!("\"{}\"", to.crate_name),
            )
        })
    })
}

/// `manifest` with the `description` of its `[package]` set to
/// `description`.
fn replace_description(manifest: &str, description: &str) -> String {
    edit_section(manifest, "[package]", |line| {
        line.trim()
            .starts_with("description =")
            .then(|| format!("description = {description:?}\n"))
    })
}

/// `manifest` with every line of its `section` (`[lib]`) for which `edit`
/// gives a replacement replaced by it.
fn edit_section(manifest: &str, section: &str, edit: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(manifest.len());
    let mut inside = false;
    for line in manifest.split_inclusive('\n') {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            inside = trimmed == section;
        }
        match inside.then(|| edit(line)).flatten() {
            Some(new) => out.push_str(&new),
            None => out.push_str(line),
        }
    }
    out
}

/// `source` with the first paragraph of its crate docs (the `//!` lines up
/// to the first empty `//!`) replaced by `thesis`; a file that does not
/// open with crate docs is returned as it is.
fn replace_thesis(source: &str, thesis: &str) -> String {
    if !source.starts_with("//!") {
        return source.to_owned();
    }
    let mut rest = source;
    while let Some(line) = rest.split_inclusive('\n').next() {
        if !line.starts_with("//!") || line.trim_end() == "//!" {
            break;
        }
        rest = &rest[line.len()..];
    }
    format!("{thesis}{rest}")
}

/// The workspace: its root and its exemplars.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// The workspace this task belongs to: the directory above `xtask/`,
    /// named without `..`, so the paths it prints are clean.
    pub fn locate() -> Self {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        Self::at(manifest_dir.parent().unwrap_or(manifest_dir))
    }

    /// The workspace at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn exemplar(&self, name: &str) -> PathBuf {
        self.root.join("examples").join(name)
    }

    /// Every `127.0.0.1:<port>` an exemplar's docs or code use.
    fn ports_in_use(&self) -> BTreeSet<u16> {
        let mut ports = BTreeSet::new();
        let Ok(entries) = fs::read_dir(self.root.join("examples")) else {
            return ports;
        };
        for entry in entries.flatten() {
            for file in files(&entry.path()) {
                if let Ok(text) = fs::read_to_string(&file) {
                    ports.extend(loopback_ports(&text));
                }
            }
        }
        ports
    }
}

/// The ports of `127.0.0.1:<port>` in `text`.
fn loopback_ports(text: &str) -> impl Iterator<Item = u16> + '_ {
    text.match_indices("127.0.0.1:").filter_map(|(i, m)| {
        let digits: String = text[i + m.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok().filter(|&p| p > 0)
    })
}

/// The port `exemplar`'s docs say it binds (`CHASSIS_BIND=127.0.0.1:<port>`).
fn bound_port(exemplar: &Path) -> Option<u16> {
    files(exemplar).into_iter().find_map(|file| {
        let text = fs::read_to_string(file).ok()?;
        let at = text.find("CHASSIS_BIND=127.0.0.1:")?;
        loopback_ports(&text[at..]).next()
    })
}

/// The files under `dir`, in order, without build output, data, hidden
/// files and databases.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let skipped = name.starts_with('.')
                || ["target", "data"].contains(&name.as_str())
                || [".db", ".db-wal", ".db-shm"]
                    .iter()
                    .any(|s| name.ends_with(s));
            if skipped {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A new service to write: planned and checked before anything is written.
#[derive(Debug)]
pub struct NewService {
    template: PathBuf,
    into: PathBuf,
    from: Names,
    to: Names,
    ports: Option<(u16, u16)>,
}

impl NewService {
    /// Plans `name` from the exemplar `from` of `workspace`, written to
    /// `into` (default: `examples/<name>`) with `port` (default: one above
    /// the highest an exemplar uses), or every reason it cannot be made.
    pub fn plan(
        workspace: &Workspace,
        name: &str,
        from: &str,
        into: Option<PathBuf>,
        port: Option<u16>,
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let to = Names::new(name).map_err(|e| problems.push(e)).ok();
        let template = workspace.exemplar(from);
        if !template.join("Cargo.toml").is_file() {
            problems.push(format!(
                "no exemplar `{from}`: {} has no Cargo.toml",
                template.display()
            ));
        }
        let from_names = Names::new(from).map_err(|e| problems.push(e)).ok();
        let into = into.unwrap_or_else(|| workspace.exemplar(name));
        if into.exists() {
            problems.push(format!("{} exists already", into.display()));
        }
        if let (Some(to), Some(from)) = (&to, &from_names) {
            if to.service == from.service {
                problems.push(format!(
                    "the new service must not be named `{from}` too",
                    from = from.service
                ));
            } else if to.service.contains(&from.service) || from.service.contains(&to.service) {
                problems.push(format!(
                    "`{}` and `{}` contain one another, so renaming one into the other is ambiguous; choose another name",
                    to.service, from.service
                ));
            }
        }
        let in_use = workspace.ports_in_use();
        let new_port = port.unwrap_or_else(|| {
            in_use
                .iter()
                .copied()
                .filter(|p| (8080..9000).contains(p))
                .max()
                .map_or(8085, |p| p + 1)
        });
        if port.is_some() && in_use.contains(&new_port) {
            problems.push(format!("port {new_port} is used by an exemplar already"));
        }
        match (to, from_names) {
            (Some(to), Some(from)) if problems.is_empty() => Ok(Self {
                ports: bound_port(&template).map(|old| (old, new_port)),
                template,
                into,
                from,
                to,
            }),
            _ => Err(problems),
        }
    }

    /// Writes the service, renamed; returns what was written and what to do
    /// next, or the reasons it was not written (nothing is left behind).
    pub fn write(&self) -> Result<Written, Vec<String>> {
        let mut written = Vec::new();
        let mut left = Vec::new();
        for source in files(&self.template) {
            let relative = source
                .strip_prefix(&self.template)
                .expect("listed under the template");
            // The template's README describes the template; the new
            // service gets its own, written below.
            if relative == Path::new("README.md") {
                continue;
            }
            // Its contract tests name the template's own consumers and
            // providers and their committed contracts (`contracts/`); a new
            // service records its own when it first calls another.
            if relative == Path::new("tests/contracts.rs") {
                continue;
            }
            let target = self.into.join(rename(
                &relative.to_string_lossy(),
                "",
                &self.from,
                &self.to,
            ));
            let result = fs::create_dir_all(target.parent().expect("a file has a parent"))
                .and_then(|()| match fs::read_to_string(&source) {
                    Ok(text) => {
                        let ext = source.extension().and_then(|e| e.to_str()).unwrap_or("");
                        let mut text = rename(&text, ext, &self.from, &self.to);
                        text = self.own_words(relative, &text);
                        if let Some((old, new)) = self.ports {
                            text = text
                                .replace(&format!("127.0.0.1:{old}"), &format!("127.0.0.1:{new}"));
                        }
                        for (n, line) in text.lines().enumerate() {
                            if line.to_ascii_lowercase().contains(&self.from.service) {
                                left.push(format!(
                                    "{}:{}: {}",
                                    relative.display(),
                                    n + 1,
                                    line.trim()
                                ));
                            }
                        }
                        fs::write(&target, text)
                    }
                    // Not text: copied as it is.
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        fs::copy(&source, &target).map(drop)
                    }
                    Err(e) => Err(e),
                });
            if let Err(e) = result {
                let _ = fs::remove_dir_all(&self.into);
                return Err(vec![format!("{}: {e}", target.display())]);
            }
            written.push(target);
        }
        let readme = self.into.join("README.md");
        if let Err(e) = fs::write(&readme, self.readme()) {
            left.push(format!("{}: {e}", readme.display()));
        } else {
            written.push(readme);
        }
        if !left.is_empty() {
            let _ = fs::remove_dir_all(&self.into);
            left.insert(
                0,
                format!(
                    "these lines still name `{}` in a form this task does not know; rename them in the exemplar's own forms",
                    self.from.service
                ),
            );
            return Err(left);
        }
        // Renaming changes line lengths and the order of `use` lines: the
        // result is formatted as the workspace formats its code.
        let sources: Vec<&PathBuf> = written
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .collect();
        let formatted = std::process::Command::new("rustfmt")
            .args(["--edition", "2024"])
            .args(&sources)
            .status()
            .is_ok_and(|s| s.success());
        Ok(Written {
            formatted,
            names: self.to.clone(),
            from: self.from.service.clone(),
            into: self.into.clone(),
            files: written.len(),
            port: self.ports.map(|(_, new)| new),
        })
    }
}

impl NewService {
    /// `text` of the file at `relative` with what describes the template's
    /// domain in one line replaced by a neutral one for the new service to
    /// rewrite: the manifest's `description` and the opening paragraph of
    /// the crate docs. Other files are returned as they are.
    fn own_words(&self, relative: &Path, text: &str) -> String {
        let service = &self.to.service;
        if relative == Path::new("Cargo.toml") {
            replace_description(
                text,
                &format!(
                    "{service}: a service made from the template exemplar; describe what it does here."
                ),
            )
        } else if relative == Path::new("src/lib.rs") {
            replace_thesis(
                text,
                &format!(
                    "//! `{service}`: a service made from the template exemplar; say here, in a\n\
                     //! line, what it does.\n\
                     //!\n\
                     //! The sections below still describe the template's example domain:\n\
                     //! rewrite them with yours (`docs/new-service.md`, step 3).\n"
                ),
            )
        } else {
            text.to_owned()
        }
    }

    /// The new service's README: what it is made from, and how to run and
    /// test it.
    fn readme(&self) -> String {
        let Names { service, env, .. } = &self.to;
        let bind = self
            .ports
            .map(|(_, p)| format!("CHASSIS_BIND=127.0.0.1:{p} "))
            .unwrap_or_default();
        format!(
            "# {service}\n\n\
             Say here, in a few lines, what it owns and does.\n\n\
             Made from the template exemplar with `cargo run -p xtask -- new-service {service}`: its\n\
             routes are under `/{service}/v1`, its permissions are `{service}:{{account}}:<verb>:<noun>`,\n\
             its settings are `{env}_*` and the chassis' `CHASSIS_*`. The crate docs\n\
             (`cargo doc -p {service} --open`) list its API, settings and metrics.\n\n\
             Every route in `src/routes.rs` documents itself next to its permission\n\
             (`.summary(..)`, `.body::<T>()`, `.response::<T>(..)`; a route without a\n\
             documented answer stops the build), and the service serves the OpenAPI 3.1\n\
             document at `/{service}/v1/openapi.json`; `tests/openapi.rs` lists the\n\
             routes it must show: keep it in step with the table. `tests/schemathesis.rs`\n\
             holds the running service to that document, property-based, when\n\
             `CHASSIS_SCHEMATHESIS` names schemathesis (`cargo xtask test` installs it;\n\
             `docs/contracts.md`). When it calls another service through that service's\n\
             driver client, record what it relies on as a consumer-driven contract\n\
             (`chassis::testing::contract`; docs/system.md, \"Contracts between the\n\
             services\"): the template's `tests/contracts.rs` is not copied, since it\n\
             names the template's own contracts.\n\n\
             Its data is a SQLite file in `{env}_DATA_DIR` (one instance), or the\n\
             Postgres database `{env}_DATABASE_URL=postgres://...` names (any number\n\
             of instances): the same handlers on both, with the schema in\n\
             `migrations/sqlite/` and `migrations/postgres/`. Its tests run on either\n\
             (`CHASSIS_TEST_BACKEND=postgres cargo test -p {service}`).\n\n\
             ```sh\n\
             cargo test -p {service}\n\
             {bind}CHASSIS_AUTH_ISSUER=<issuer> CHASSIS_AUTH_AUDIENCE={service} cargo run -p {service}\n\
             ```\n\n\
             See `docs/new-service.md` for what to replace and how to register its\n\
             client and grants with auth.\n"
        )
    }
}

/// What [`NewService::write`] wrote.
#[derive(Debug)]
pub struct Written {
    /// The new service's names.
    pub names: Names,
    /// The exemplar it was made from.
    pub from: String,
    /// Its directory.
    pub into: PathBuf,
    /// How many files.
    pub files: usize,
    /// Its port in docs and examples.
    pub port: Option<u16>,
    /// Whether rustfmt formatted its Rust files.
    pub formatted: bool,
}

impl fmt::Display for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Names {
            service,
            env,
            type_name,
            ..
        } = &self.names;
        writeln!(
            f,
            "{service}: {} files in {}, made from {}",
            self.files,
            self.into.display(),
            self.from
        )?;
        writeln!(f, "  routes        /{service}/v1/...")?;
        writeln!(f, "  permissions   {service}:{{account}}:<verb>:<noun>")?;
        writeln!(f, "  audience      {service}")?;
        writeln!(
            f,
            "  settings      {env}_*   downstream CHASSIS_DOWNSTREAM_{env}_*"
        )?;
        writeln!(f, "  driver client {type_name}Client")?;
        if let Some(port) = self.port {
            writeln!(f, "  port          127.0.0.1:{port} (docs and examples)")?;
        }
        if !self.formatted {
            writeln!(
                f,
                "  (rustfmt was not found or failed: run `cargo fmt -p {service}`)"
            )?;
        }
        writeln!(f)?;
        writeln!(f, "next:")?;
        writeln!(f, "  cargo test -p {service}")?;
        writeln!(
            f,
            "  replace the example domain (migrations/sqlite/ and migrations/postgres/, src/client.rs, the routes): docs/new-service.md"
        )?;
        writeln!(
            f,
            "  commit the root Cargo.lock with the service: it now lists it, and CI builds with --locked"
        )?;
        write!(
            f,
            "  register its client and grants with auth: docs/new-service.md, \"Register it\""
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_a_name() {
        let n = Names::new("key-cards").unwrap();
        assert_eq!(
            (
                n.service.as_str(),
                n.crate_name.as_str(),
                n.type_name.as_str(),
                n.env.as_str()
            ),
            ("key-cards", "key_cards", "KeyCards", "KEY_CARDS")
        );
        let n = Names::new("keycards2").unwrap();
        assert_eq!(
            (n.type_name.as_str(), n.env.as_str()),
            ("Keycards2", "KEYCARDS2")
        );
        for bad in [
            "",
            "Keycards",
            "2cards",
            "key_cards",
            "key--cards",
            "cards-",
            "k".repeat(64).as_str(),
        ] {
            assert!(Names::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn renames_each_form_in_its_place() {
        let from = Names::new("ticketing").unwrap();
        let to = Names::new("key-cards").unwrap();
        let manifest = "[package]\nname = \"ticketing\"\n\n[lib]\nname = \"ticketing\"\n\n[[bin]]\nname = \"ticketing\"\n";
        assert_eq!(
            rename(manifest, "toml", &from, &to),
            "[package]\nname = \"key-cards\"\n\n[lib]\nname = \"key_cards\"\n\n[[bin]]\nname = \"key-cards\"\n"
        );
        assert_eq!(
            rename(
                r#"ServiceBuilder::new("ticketing", 1); r.prefix("TICKETING"); ".requires(\"ticketing:{account}:view:ticket\")"; ticketing::app(s)"#,
                "rs",
                &from,
                &to
            ),
            r#"ServiceBuilder::new("key-cards", 1); r.prefix("KEY_CARDS"); ".requires(\"key-cards:{account}:view:ticket\")"; key_cards::app(s)"#
        );
        // The domain's own nouns are the template's example: kept.
        assert_eq!(rename("NewTicket", "rs", &from, &to), "NewTicket");
    }

    #[test]
    fn the_one_line_descriptions_are_replaced() {
        let lib =
            "//! `ticketing`: tickets,\n//! never oversold.\n//!\n//! # What it owns\nuse x;\n";
        assert_eq!(
            replace_thesis(lib, "//! `k`: new.\n"),
            "//! `k`: new.\n//!\n//! # What it owns\nuse x;\n"
        );
        assert_eq!(replace_thesis("use x;\n", "//! new\n"), "use x;\n");
        let manifest = "[package]\nname = \"k\"\ndescription = \"Tickets.\"\n\n[dependencies]\ndescription = \"x\"\n";
        assert_eq!(
            replace_description(manifest, "k: new \"one\"."),
            "[package]\nname = \"k\"\ndescription = \"k: new \\\"one\\\".\"\n\n[dependencies]\ndescription = \"x\"\n"
        );
    }

    #[test]
    fn finds_loopback_ports() {
        let ports: Vec<u16> =
            loopback_ports("CHASSIS_BIND=127.0.0.1:8082 curl http://127.0.0.1:8083/x 127.0.0.1:")
                .collect();
        assert_eq!(ports, [8082, 8083]);
    }
}
