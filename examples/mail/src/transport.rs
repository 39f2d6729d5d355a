//! Where mail goes: an SMTP relay, or files in the outbox directory.

use std::{
    fmt,
    io::Write as _,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use chassis::config::Secret;
use lettre::{
    AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor,
    address::Envelope,
    transport::smtp::{authentication::Credentials, extension::ClientId},
};

use crate::format::Email;

/// An SMTP relay, from `MAIL_SMTP_URL`:
/// `smtp://[user:password@]host[:port][/helo-name]` (port 25 by default;
/// user and password percent-encoded).
///
/// The connection is not encrypted (the service is built without a TLS
/// stack, see the README): point it at a relay on the same host or a
/// trusted network, which forwards with TLS. The password is a [`Secret`]:
/// neither `Debug` nor an error message shows it.
#[derive(Clone)]
pub struct SmtpRelay {
    host: String,
    port: u16,
    user: Option<String>,
    password: Option<Secret<String>>,
    helo_name: Option<String>,
}

impl fmt::Debug for SmtpRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpRelay")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("helo_name", &self.helo_name)
            .finish()
    }
}

impl SmtpRelay {
    /// The relay's host name or address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The relay's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user name, when the relay needs authentication.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
}

impl FromStr for SmtpRelay {
    type Err = String;

    /// Parses the URL. Error messages never repeat the URL, which may hold
    /// a password.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let url = url::Url::parse(s).map_err(|e| format!("not a URL ({e})"))?;
        match url.scheme() {
            "smtp" => {}
            "smtps" => {
                return Err(
                    "smtps:// is not supported: this build has no TLS; use smtp:// to a local relay"
                        .to_owned(),
                );
            }
            _ => return Err("the scheme must be smtp://".to_owned()),
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(
                "no query or fragment is supported (TLS options need a TLS build)".to_owned(),
            );
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return Err("the host is missing".to_owned()),
        };
        let decode = |part: &str, what: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| format!("the {what} is not valid percent-encoded UTF-8"))
        };
        let (user, password) = match (url.username(), url.password()) {
            ("", None) => (None, None),
            (_, None) => return Err("a user needs a password".to_owned()),
            ("", Some(_)) => return Err("a password needs a user".to_owned()),
            (u, Some(p)) => (
                Some(decode(u, "user")?),
                Some(Secret::new(decode(p, "password")?)),
            ),
        };
        let path = url.path().trim_matches('/');
        let helo_name = (!path.is_empty()).then(|| path.to_owned());
        Ok(Self {
            host,
            port: url.port().unwrap_or(25),
            user,
            password,
            helo_name,
        })
    }
}

/// Sends formatted mail.
pub(crate) enum Transport {
    /// Writes `<dir>/<message_id>.eml`.
    Files { dir: PathBuf },
    /// Hands mail to an SMTP relay.
    Smtp {
        relay: SmtpRelay,
        mailer: AsyncSmtpTransport<Tokio1Executor>,
    },
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Files { dir } => f.debug_struct("Files").field("dir", dir).finish(),
            Self::Smtp { relay, .. } => f.debug_struct("Smtp").field("relay", relay).finish(),
        }
    }
}

impl Transport {
    /// Files in `dir`, which must exist.
    pub(crate) fn files(dir: PathBuf) -> Self {
        Self::Files { dir }
    }

    /// The relay, with `timeout` for each SMTP command.
    pub(crate) fn smtp(relay: &SmtpRelay, timeout: Duration) -> Self {
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&relay.host)
            .port(relay.port)
            .timeout(Some(timeout));
        if let (Some(user), Some(password)) = (&relay.user, &relay.password) {
            builder =
                builder.credentials(Credentials::new(user.clone(), password.expose().clone()));
        }
        if let Some(name) = &relay.helo_name {
            builder = builder.hello_name(ClientId::Domain(name.clone()));
        }
        Self::Smtp {
            relay: relay.clone(),
            mailer: builder.build(),
        }
    }

    /// A short name for logs: `file` or `smtp`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Files { .. } => "file",
            Self::Smtp { .. } => "smtp",
        }
    }

    /// Sends `email`.
    ///
    /// # Errors
    ///
    /// Why it could not be sent, for `last_error` and the log (never a
    /// credential).
    pub(crate) async fn send(&self, email: &Email) -> Result<(), String> {
        match self {
            Self::Files { dir } => {
                let dir = dir.clone();
                let name = email.message_id.clone();
                let bytes = email.bytes.clone();
                tokio::task::spawn_blocking(move || write_atomically(&dir, &name, &bytes))
                    .await
                    .map_err(|e| format!("file transport task failed: {e}"))?
            }
            Self::Smtp { relay, mailer } => {
                let envelope = Envelope::new(Some(email.from.clone()), vec![email.to.clone()])
                    .map_err(|e| format!("invalid envelope: {e}"))?;
                mailer
                    .send_raw(&envelope, &email.bytes)
                    .await
                    .map(drop)
                    .map_err(|e| format!("smtp {}:{}: {e}", relay.host, relay.port))
            }
        }
    }
}

/// Writes `<dir>/<name>.eml`: to a temporary file first, flushed to disk,
/// then renamed over the final name, so a reader sees the whole message or
/// none, and a second write of the same message replaces the first.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let path = dir.join(format!("{name}.eml"));
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", fastrand::u64(..)));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        // The rename is durable once the directory is.
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls_are_parsed_and_never_repeated() {
        let r: SmtpRelay = "smtp://mailer:p%40ss@127.0.0.1:2525/mail.example"
            .parse()
            .unwrap();
        assert_eq!(
            (r.host(), r.port(), r.user()),
            ("127.0.0.1", 2525, Some("mailer"))
        );
        assert_eq!(r.password.as_ref().unwrap().expose(), "p@ss");
        assert_eq!(r.helo_name.as_deref(), Some("mail.example"));
        let debug = format!("{r:?}");
        assert!(
            !debug.contains("p@ss") && !debug.contains("p%40ss"),
            "{debug}"
        );

        let r: SmtpRelay = "smtp://localhost".parse().unwrap();
        assert_eq!((r.host(), r.port(), r.user()), ("localhost", 25, None));

        for bad in [
            "smtps://u:hunter2@host",
            "http://u:hunter2@host",
            "smtp://u:hunter2@host?tls=required",
            "smtp://u@host",
            "smtp://:hunter2@host",
            "smtp://",
            "not a url hunter2",
        ] {
            let err = bad.parse::<SmtpRelay>().unwrap_err();
            assert!(!err.contains("hunter2"), "{bad}: {err}");
        }
    }

    #[test]
    fn files_are_written_whole_and_replaced() {
        let dir = std::env::temp_dir().join(format!("mail-write-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        write_atomically(&dir, "m-1", b"first").unwrap();
        write_atomically(&dir, "m-1", b"second").unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["m-1.eml"]);
        assert_eq!(std::fs::read(dir.join("m-1.eml")).unwrap(), b"second");
        let err = write_atomically(&dir.join("missing"), "m-2", b"x").unwrap_err();
        assert!(err.starts_with("cannot write"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
