//! `new-service` on the real template exemplar, written to a temporary
//! directory. `.ci/run` also builds and tests a service made this way.

use std::{fs, path::PathBuf};

use xtask::{NewService, Workspace};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn temp(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    TempDir(dir)
}

#[test]
fn the_template_is_renamed_everywhere() {
    let out = temp("keycards");
    let into = out.0.join("key-cards");
    let written = NewService::plan(
        &Workspace::locate(),
        "key-cards",
        "ticketing",
        Some(into.clone()),
        Some(8099),
    )
    .unwrap()
    .write()
    .unwrap();
    assert!(written.files >= 10, "{written}");
    assert!(written.formatted, "{written}");
    // Formatted, and so also parsed: a name with `-` where Rust needs an
    // identifier would not be.
    let sources: Vec<PathBuf> = walk(&into)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    let check = std::process::Command::new("rustfmt")
        .args(["--edition", "2024", "--check"])
        .args(&sources)
        .status()
        .unwrap();
    assert!(check.success(), "the renamed files parse and are formatted");
    let manifest = fs::read_to_string(into.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("name = \"key-cards\""), "{manifest}");
    assert!(
        manifest.contains("[lib]\nname = \"key_cards\""),
        "{manifest}"
    );
    // What described the template's domain in a line describes the new
    // service, for it to rewrite.
    assert!(
        manifest.contains(
            "description = \"key-cards: a service made from the template exemplar; describe what it does here.\"\n"
        ),
        "{manifest}"
    );
    let main = fs::read_to_string(into.join("src/main.rs")).unwrap();
    assert!(main.contains("key_cards::"), "{main}");
    let lib = fs::read_to_string(into.join("src/lib.rs")).unwrap();
    assert!(lib.contains("\"key-cards\""), "the service name: {lib}");
    assert!(
        lib.starts_with(
            "//! `key-cards`: a service made from the template exemplar; say here, in a\n//! line, what it does.\n//!\n"
        ),
        "{lib}"
    );
    assert!(
        !lib.contains("never\n//! oversold"),
        "the template's thesis is gone: {lib}"
    );
    let readme = fs::read_to_string(into.join("README.md")).unwrap();
    assert!(readme.starts_with("# key-cards\n"), "{readme}");
    assert!(readme.contains("CHASSIS_BIND=127.0.0.1:8099"), "{readme}");
    assert!(readme.contains("KEY_CARDS_DATABASE_URL"), "{readme}");
    // The schema for each engine.
    for engine in ["sqlite", "postgres"] {
        let dir = into.join("migrations").join(engine);
        assert!(
            fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()),
            "{} holds migrations",
            dir.display()
        );
    }
    let client = fs::read_to_string(into.join("src/client.rs")).unwrap();
    assert!(
        client.contains("127.0.0.1:8099"),
        "the port in the docs: {client}"
    );
    // Nothing names the template any more, in any case.
    for entry in walk(&into) {
        let text = fs::read_to_string(&entry)
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(
            !text.contains("ticketing"),
            "{} still names it",
            entry.display()
        );
        assert!(
            !entry.to_string_lossy().contains("ticketing"),
            "{}",
            entry.display()
        );
    }
}

#[test]
fn every_problem_is_listed_and_nothing_is_written() {
    let out = temp("refused");
    fs::create_dir_all(&out.0).unwrap();
    let problems = NewService::plan(
        &Workspace::locate(),
        "Key_Cards",
        "no-such-exemplar",
        Some(out.0.clone()),
        None,
    )
    .unwrap_err();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems[0].contains("`Key_Cards` cannot name a service"),
        "{problems:#?}"
    );
    assert!(
        problems[1].contains("no exemplar `no-such-exemplar`"),
        "{problems:#?}"
    );
    assert!(problems[2].contains("exists already"), "{problems:#?}");
    // A name that contains the template's cannot be renamed back out.
    let problems = NewService::plan(
        &Workspace::locate(),
        "ticketing-v2",
        "ticketing",
        Some(out.0.join("x")),
        None,
    )
    .unwrap_err();
    assert!(problems[0].contains("contain one another"), "{problems:#?}");
    assert_eq!(fs::read_dir(&out.0).unwrap().count(), 0);
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
