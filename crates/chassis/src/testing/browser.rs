//! Headless Chromium for tests of what a page renders, and of what it
//! fetches.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    task::AbortHandle,
};

use super::{REQUIRE_VAR, TempDir};

/// The variable naming the Chromium binary; without it, the first of
/// `chromium`, `chromium-browser`, `google-chrome` on `PATH`.
pub const CHROMIUM_VAR: &str = "CHASSIS_CHROMIUM";

/// How long one run of the browser may take before it is killed and the
/// test fails: generous, as test machines are busy.
pub const BROWSER_WITHIN: Duration = Duration::from_secs(120);

/// Hosts of the services Chromium itself calls on start, whatever the page
/// (component updates, network time, sign-in), however it is started.
const BROWSER_OWN_HOSTS: [&str; 3] = ["google.com", "googleapis.com", "gstatic.com"];

/// Headless Chromium, started once per page for a test: a fresh profile in
/// a temporary directory, no sandbox (tests run as root in containers), no
/// GPU, and every request that is not to loopback sent to a proxy on
/// loopback that records it and refuses it. Chromium sends requests to
/// `127.0.0.1` and `localhost` directly, so the recorded requests are
/// exactly those that tried to leave the machine. Each run is killed after
/// [`BROWSER_WITHIN`] (or [`within`](Self::within)), so a hang cannot block
/// a test run.
///
/// Debian's package is `chromium` (`apt-get install -y chromium`); CI
/// installs it in `.ci/run`.
///
/// ```no_run
/// use chassis::testing::Browser;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let Some(browser) = Browser::or_skip("docs page") else { return };
/// let page = browser.load("http://127.0.0.1:8080/hello/v1/docs").await;
/// assert!(page.dom.contains("opblock"), "{}", page.dom);
/// assert!(page.left_loopback.is_empty(), "{:?}", page.left_loopback);
/// let png = Browser::screenshot_path("hello");
/// browser.screenshot("http://127.0.0.1:8080/hello/v1/docs", &png).await;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Browser {
    program: PathBuf,
    within: Duration,
    budget: Duration,
}

/// What a page did in [`Browser::load`] or [`Browser::screenshot`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Loaded {
    /// The DOM after the page's scripts ran, serialized (empty for a
    /// screenshot).
    pub dom: String,
    /// The page's console messages and the browser's reports about it
    /// (a script error, a request the Content-Security-Policy refused),
    /// one per line, as Chromium logs them.
    pub console: Vec<String>,
    /// The first line of every request that tried to leave loopback
    /// (`GET http://…`, or `CONNECT host:443` for https), except those of
    /// Chromium's own services.
    pub left_loopback: Vec<String>,
    /// The requests Chromium made to its own services (Google's update,
    /// time and sign-in hosts), kept apart: they come from the browser,
    /// not the page.
    pub browser_own: Vec<String>,
}

/// The proxy every non-loopback request goes to: records its first line,
/// answers 403 and closes.
struct Recorder {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    task: AbortHandle,
}

// === impl Browser ===

impl Browser {
    /// The browser named by [`CHROMIUM_VAR`], or found on `PATH`; an error
    /// saying how to install it when there is none.
    pub fn find() -> Result<Self, String> {
        let program = match std::env::var_os(CHROMIUM_VAR) {
            Some(p) if Path::new(&p).is_file() => PathBuf::from(p),
            Some(p) => {
                return Err(format!(
                    "{CHROMIUM_VAR}={} is not a file",
                    Path::new(&p).display()
                ));
            }
            None => ["chromium", "chromium-browser", "google-chrome"]
                .iter()
                .find_map(|name| on_path(name))
                .ok_or_else(|| {
                    format!(
                        "no Chromium on PATH: install it (Debian: `apt-get install -y chromium`, \
                         as .ci/run does) or set {CHROMIUM_VAR} to its binary"
                    )
                })?,
        };
        Ok(Self {
            program,
            within: BROWSER_WITHIN,
            budget: Duration::from_secs(10),
        })
    }

    /// For a test that needs a browser: it, or `None` with a line on
    /// standard error saying the test did not run and why.
    ///
    /// # Panics
    ///
    /// When there is no browser and [`REQUIRE_VAR`] is set.
    pub fn or_skip(test: &str) -> Option<Self> {
        match Self::find() {
            Ok(browser) => Some(browser),
            Err(e) if std::env::var_os(REQUIRE_VAR).is_some() => {
                panic!("{test}: {e} ({REQUIRE_VAR} is set, so it cannot be skipped)")
            }
            Err(e) => {
                eprintln!("NOT RUN: {test}: {e}");
                None
            }
        }
    }

    /// Where a test saves a screenshot for review:
    /// `<target>/docs-ui/<name>.png`, `<target>` being `CARGO_TARGET_DIR`
    /// or else the folder the test binary was built in
    /// (`<target>/<profile>/deps/`).
    pub fn screenshot_path(name: &str) -> PathBuf {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                let exe = std::env::current_exe().ok()?;
                Some(exe.parent()?.parent()?.parent()?.to_owned())
            })
            .unwrap_or_else(|| PathBuf::from("target"));
        target.join("docs-ui").join(format!("{name}.png"))
    }

    /// The binary it runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// How long one run may take before it is killed (and the test fails).
    #[must_use]
    pub fn within(mut self, limit: Duration) -> Self {
        self.within = limit;
        self
    }

    /// How long the page's scripts may run, in the browser's virtual time
    /// (`--virtual-time-budget`: it advances only while the page is idle,
    /// so waiting on the network does not use it up); 10 s unless set.
    #[must_use]
    pub fn script_budget(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self
    }

    /// Loads `url`, lets its scripts run, and returns the DOM they left
    /// (`--dump-dom`), with the console and the requests that tried to
    /// leave loopback.
    ///
    /// # Panics
    ///
    /// When the browser cannot start, fails, or takes longer than its
    /// limit (it is killed first); the message carries its log.
    pub async fn load(&self, url: &str) -> Loaded {
        self.run(url, &["--dump-dom"]).await
    }

    /// Loads `url` in a 1280×2000 window and saves a PNG of it at `path`
    /// (its folder is made), returning what the page did.
    ///
    /// # Panics
    ///
    /// As [`load`](Self::load); and when no PNG was written.
    pub async fn screenshot(&self, url: &str, path: &Path) -> Loaded {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot make {}: {e}", dir.display()));
        }
        let _ = std::fs::remove_file(path);
        let shot = format!("--screenshot={}", path.display());
        let loaded = self.run(url, &[&shot, "--window-size=1280,2000"]).await;
        let png = std::fs::read(path).unwrap_or_default();
        assert!(
            png.starts_with(b"\x89PNG"),
            "no screenshot of {url} at {}; console: {:#?}",
            path.display(),
            loaded.console
        );
        loaded
    }

    /// The check every docs page must pass, in one call: loads `url`,
    /// asserts that the rendered DOM shows each of `shown` (paths,
    /// summaries, schema names), that the console is empty (no script
    /// error, nothing refused by the Content-Security-Policy) and that no
    /// request tried to leave loopback; then saves a screenshot at
    /// [`screenshot_path(name)`](Self::screenshot_path), prints where, and
    /// returns what the page did.
    ///
    /// # Panics
    ///
    /// When a check fails (the message shows the DOM, the console or the
    /// requests), or as [`screenshot`](Self::screenshot).
    pub async fn check_page(&self, url: &str, shown: &[&str], name: &str) -> Loaded {
        let page = self.load(url).await;
        for s in shown {
            assert!(page.dom.contains(s), "`{s}` not in {url}:\n{}", page.dom);
        }
        assert!(
            page.console.is_empty(),
            "the console of {url}: {:#?}",
            page.console
        );
        assert!(
            page.left_loopback.is_empty(),
            "requests off loopback from {url}: {:#?}",
            page.left_loopback
        );
        let png = Self::screenshot_path(name);
        let shot = self.screenshot(url, &png).await;
        assert!(shot.left_loopback.is_empty(), "{:#?}", shot.left_loopback);
        #[allow(
            clippy::print_stdout,
            reason = "the test's output names the screenshot for review"
        )]
        {
            println!("screenshot of {url}: {}", png.display());
        }
        page
    }

    async fn run(&self, url: &str, action: &[&str]) -> Loaded {
        let recorder = Recorder::start().await;
        let profile = TempDir::new("chromium");
        let mut command = Command::new(&self.program);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--disable-breakpad",
                "--disable-client-side-phishing-detection",
                "--disable-domain-reliability",
                "--no-pings",
                "--password-store=basic",
                "--disable-features=Translate,MediaRouter,OptimizationHints,NetworkTimeServiceQuerying",
                "--hide-scrollbars",
                "--enable-logging=stderr",
                "--v=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().join("profile").display()))
            .arg(format!("--proxy-server=http://127.0.0.1:{}", recorder.port))
            .arg(format!("--virtual-time-budget={}", self.budget.as_millis()))
            .args(action)
            .arg(url);
        let out = profile.path().join("stdout");
        let err = profile.path().join("stderr");
        let files = (std::fs::File::create(&out), std::fs::File::create(&err));
        let (Ok(stdout), Ok(stderr)) = files else {
            panic!("cannot write in {}", profile.path().display());
        };
        command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        let program = self.program.display().to_string();
        let within = self.within;
        let status = tokio::task::spawn_blocking(move || {
            let mut child = command
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
            // Polled rather than waited on, so that a hung browser is
            // killed. Wall-clock time: a test that pauses tokio's clock
            // still gets its browser killed.
            let deadline = std::time::SystemTime::now() + within;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => return Ok(status),
                    Ok(None) if std::time::SystemTime::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!(
                            "{program} took longer than {within:?} and was killed"
                        ));
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                    Err(e) => return Err(format!("cannot wait for {program}: {e}")),
                }
            }
        })
        .await
        .expect("the browser's watcher does not panic");
        let log = std::fs::read_to_string(&err).unwrap_or_default();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("the browser failed on {url} ({s}); its log:\n{log}"),
            Err(e) => panic!("{e} (on {url}); its log:\n{log}"),
        }
        let (browser_own, left_loopback) = recorder
            .stop()
            .into_iter()
            .partition(|line| is_browser_own(line));
        Loaded {
            dom: std::fs::read_to_string(&out).unwrap_or_default(),
            console: log
                .lines()
                .filter(|l| l.contains(":CONSOLE") || l.contains("Content Security Policy"))
                .map(str::to_owned)
                .collect(),
            left_loopback,
            browser_own,
        }
    }
}

/// `name` in one of `PATH`'s folders.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether a recorded request line (`CONNECT host:443 …`, `GET
/// http://host/… …`) is to one of Chromium's own services.
fn is_browser_own(line: &str) -> bool {
    let target = line.split(' ').nth(1).unwrap_or_default();
    let target = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
        .unwrap_or(target);
    let host = target.split(['/', ':']).next().unwrap_or_default();
    BROWSER_OWN_HOSTS
        .iter()
        .any(|own| host == *own || host.ends_with(&format!(".{own}")))
}

// === impl Recorder ===

impl Recorder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the browser's proxy on loopback");
        let port = listener.local_addr().expect("a bound address").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0; 1024];
                    while !head.contains(&b'\n') && head.len() < 8192 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&head);
                    let line = line.lines().next().unwrap_or_default().to_owned();
                    record.lock().expect("not poisoned").push(line);
                    let _ = conn
                        .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                });
            }
        })
        .abort_handle();
        Self { port, seen, task }
    }

    fn stop(self) -> Vec<String> {
        self.task.abort();
        std::mem::take(&mut *self.seen.lock().expect("not poisoned"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chromium_own_services_are_told_apart_by_host() {
        for own in [
            "CONNECT update.googleapis.com:443 HTTP/1.1",
            "CONNECT accounts.google.com:443 HTTP/1.1",
            "GET http://clients2.google.com/time/1/current?x=1 HTTP/1.1",
            "POST http://update.googleapis.com/service/update2/json HTTP/1.1",
        ] {
            assert!(is_browser_own(own), "{own}");
        }
        for page in [
            "CONNECT unpkg.com:443 HTTP/1.1",
            "GET http://example.com/x.png HTTP/1.1",
            "CONNECT notgoogle.com:443 HTTP/1.1",
            "CONNECT google.com.example.net:443 HTTP/1.1",
            "GET http://validator.swagger.io/validator HTTP/1.1",
            "",
        ] {
            assert!(!is_browser_own(page), "{page}");
        }
    }
}
