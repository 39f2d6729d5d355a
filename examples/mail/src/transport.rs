//! Where mail goes: an SMTP relay, or files in the outbox directory.

use std::{
    fmt,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    str::FromStr,
    sync::Mutex,
    task::{Context, Poll},
    time::Duration,
};

use chassis::config::Secret;
use lettre::{
    address::Envelope,
    transport::smtp::{
        authentication::{Credentials, DEFAULT_MECHANISMS},
        client::{
            AsyncSmtpConnection, AsyncTokioStream, Certificate, CertificateStore, TlsParameters,
        },
        commands::{Data, Mail, Rcpt},
        extension::{ClientId, Extension, MailBodyParameter, MailParameter},
    },
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};

use chassis::tls::ClientTls;

use crate::format::Email;

/// How the connection to the relay is protected; chosen by the URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Security {
    /// `smtp://`: plain SMTP, for a relay on the same host or a sidecar
    /// (loopback) that forwards with TLS. Default port 25.
    Plain,
    /// `smtp://…?tls=required`: plain connect, then STARTTLS, which the
    /// relay must offer (the send fails otherwise; never a fallback to
    /// plain text). Default port 587 (submission).
    StartTls,
    /// `smtps://`: TLS from the first byte ("implicit TLS", RFC 8314).
    /// Default port 465.
    Tls,
}

impl Security {
    /// `plain`, `starttls` or `tls`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::StartTls => "starttls",
            Self::Tls => "tls",
        }
    }
}

/// An SMTP relay, from `MAIL_SMTP_URL`:
///
/// * `smtps://[user:password@]host[:port][/helo-name]`: implicit TLS, port
///   465 by default; the right choice for a relay across a network.
/// * `smtp://[user:password@]host[:port][/helo-name]?tls=required`:
///   STARTTLS, required, port 587 by default; for relays that offer only
///   submission with STARTTLS.
/// * `smtp://[user:password@]host[:port][/helo-name]`: plain SMTP, port 25
///   by default; only for a relay on loopback or a trusted link (a local
///   MTA, a sidecar) that forwards with TLS.
///
/// User and password are percent-encoded. With TLS, the relay's
/// certificate must chain to a trusted root (the platform's, or one in
/// `CHASSIS_TLS_CA_FILE`) and name `host`; neither check can be turned off.
/// The password is a [`Secret`]: neither `Debug` nor an error message
/// shows it.
#[derive(Clone)]
pub struct SmtpRelay {
    host: String,
    port: u16,
    security: Security,
    user: Option<String>,
    password: Option<Secret<String>>,
    helo_name: Option<String>,
}

impl fmt::Debug for SmtpRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpRelay")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
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

    /// How the connection is protected.
    pub fn security(&self) -> Security {
        self.security
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
        let mut security = match url.scheme() {
            "smtp" => Security::Plain,
            "smtps" => Security::Tls,
            _ => return Err("the scheme must be smtp:// or smtps://".to_owned()),
        };
        if url.fragment().is_some() {
            return Err("a fragment is not supported".to_owned());
        }
        for (key, value) in url.query_pairs() {
            match (&*key, &*value, security) {
                ("tls", "required", Security::Plain) => security = Security::StartTls,
                ("tls", "required", Security::StartTls) => {}
                ("tls", _, Security::Tls) => {
                    return Err("smtps:// is always TLS; it takes no tls= parameter".to_owned());
                }
                ("tls", "opportunistic", _) => {
                    return Err("tls=opportunistic is not supported: an attacker can strip \
                                STARTTLS; use tls=required, or smtps://"
                        .to_owned());
                }
                ("tls", _, _) => {
                    return Err("tls= takes only `required` (STARTTLS required)".to_owned());
                }
                _ => return Err("the only query parameter is tls=required".to_owned()),
            }
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return Err("the host is missing".to_owned()),
        };
        if security != Security::Plain && ServerName::try_from(host.as_str()).is_err() {
            return Err("the host is not a name a TLS certificate can carry".to_owned());
        }
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
        let default_port = match security {
            Security::Plain => 25,
            Security::StartTls => 587,
            Security::Tls => 465,
        };
        Ok(Self {
            host,
            port: url.port().unwrap_or(default_port),
            security,
            user,
            password,
            helo_name,
        })
    }
}

/// Sends formatted mail.
#[derive(Debug)]
pub(crate) enum Transport {
    /// Writes `<dir>/<message_id>.eml`.
    Files { dir: PathBuf },
    /// Hands mail to an SMTP relay.
    Smtp(Box<Smtp>),
}

impl Transport {
    /// Files in `dir`, which must exist.
    pub(crate) fn files(dir: PathBuf) -> Self {
        Self::Files { dir }
    }

    /// A short name for logs: `file` or `smtp`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Files { .. } => "file",
            Self::Smtp(_) => "smtp",
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
            Self::Smtp(smtp) => smtp.send(email).await,
        }
    }
}

/// How long a connection may sit unused in the pool before it is closed
/// instead of reused. Relays drop idle clients after a few minutes (RFC
/// 5321 §4.5.3.2 asks for at least five); this stays well inside that.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a polite `QUIT` may take before the socket is just closed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(1);

/// An SMTP client for one relay, built once at start-up and shared by the
/// workers, with a pool of open connections.
///
/// Each send takes an idle connection (or opens one), runs one mail
/// transaction on it (`MAIL`, `RCPT`, `DATA`) and, when that succeeded,
/// parks it for the next send; a connection that saw any error is closed,
/// never reused. A parked connection the relay closed meanwhile fails at
/// `MAIL FROM`, before any part of the mail left: the send then opens a
/// fresh connection and starts over, once.
///
/// Sockets are opened here with `TCP_NODELAY`: the end of a message
/// (`<CRLF>.<CRLF>`) is written right after its text, and with Nagle's
/// algorithm on it waited for the acknowledgement of the text, which the
/// relay delays by up to 40 ms (that was one mail per 40 ms per worker).
pub(crate) struct Smtp {
    relay: SmtpRelay,
    hello: ClientId,
    /// The bound of connect, TLS handshake, greeting and authentication.
    connect_timeout: Duration,
    /// Trust for implicit TLS (rustls directly, on our socket).
    tls: Option<ClientTls>,
    /// The same trust for STARTTLS (through lettre).
    starttls: Option<TlsParameters>,
    /// Idle connections kept at most; 0: one connection per mail.
    pool_size: usize,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
}

impl fmt::Debug for Smtp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Smtp")
            .field("relay", &self.relay)
            .field("pool_size", &self.pool_size)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Where a mail transaction failed: at `MAIL FROM` nothing of the mail has
/// left yet, so a stale pooled connection may be replaced and the mail
/// sent on a new one.
enum Failed {
    AtMail(BoxError),
    Later(BoxError),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Smtp {
    /// The client for `relay`: `timeout` bounds opening a connection
    /// (connect, TLS, greeting, login); `pool_size` idle connections are
    /// kept for reuse. For TLS relays, `trust` is required.
    pub(crate) fn new(
        relay: &SmtpRelay,
        trust: Option<ClientTls>,
        timeout: Duration,
        pool_size: usize,
    ) -> Result<Self, String> {
        let hello = relay
            .helo_name
            .clone()
            .map_or_else(ClientId::default, ClientId::Domain);
        let trust = match relay.security {
            Security::Plain => None,
            Security::StartTls | Security::Tls => {
                Some(trust.ok_or("TLS to the relay needs trusted roots")?)
            }
        };
        let starttls = match (&trust, relay.security) {
            (Some(trust), Security::StartTls) => {
                let mut params = TlsParameters::builder(relay.host.clone())
                    .certificate_store(CertificateStore::None);
                for root in trust.root_certificates() {
                    let cert = Certificate::from_der(root.to_vec())
                        .map_err(|e| format!("TLS root: {e}"))?;
                    params = params.add_root_certificate(cert);
                }
                Some(
                    params
                        .build_rustls()
                        .map_err(|e| format!("TLS configuration: {e}"))?,
                )
            }
            _ => None,
        };
        Ok(Self {
            relay: relay.clone(),
            hello,
            connect_timeout: timeout,
            tls: trust,
            starttls,
            pool_size,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn prefix(&self) -> String {
        format!("smtp {}:{}", self.relay.host, self.relay.port)
    }

    /// `err` for the log and `last_error`, with advice for TLS failures.
    fn describe(&self, err: &(dyn std::error::Error + 'static)) -> String {
        match crate::tls::hint(err) {
            Some(hint) => format!("{}: {hint}", self.prefix()),
            None => format!("{}: {err}", self.prefix()),
        }
    }

    async fn send(&self, email: &Email) -> Result<(), String> {
        let envelope = Envelope::new(Some(email.from.clone()), vec![email.to.clone()])
            .map_err(|e| format!("invalid envelope: {e}"))?;
        let (mut conn, reused) = match self.take_idle() {
            Some(conn) => (conn, true),
            None => (self.connect().await?, false),
        };
        let mut result = transaction(&mut conn, &envelope, &email.bytes).await;
        if reused && matches!(result, Err(Failed::AtMail(_))) {
            tracing::debug!(relay = %self.prefix(), "pooled SMTP connection no longer usable; opening a new one");
            close(conn, false);
            conn = self.connect().await?;
            result = transaction(&mut conn, &envelope, &email.bytes).await;
        }
        match result {
            Ok(()) => {
                self.park(conn);
                Ok(())
            }
            Err(Failed::AtMail(e) | Failed::Later(e)) => {
                close(conn, true);
                Err(self.describe(&*e))
            }
        }
    }

    /// The most recently parked connection still young enough; older ones
    /// are closed.
    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < IDLE_TIMEOUT {
                return Some(conn);
            }
            close(conn, true);
        }
        None
    }

    fn park(&self, conn: AsyncSmtpConnection) {
        if conn.has_broken() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.pool_size {
            idle.push((conn, Instant::now()));
        } else {
            drop(idle);
            close(conn, true);
        }
    }

    /// A new connection, ready for a mail transaction: greeted, secured as
    /// the URL says, logged in.
    async fn connect(&self) -> Result<AsyncSmtpConnection, String> {
        let open = async {
            let tcp = TcpStream::connect((self.relay.host.as_str(), self.relay.port))
                .await
                .map_err(|e| format!("{}: cannot connect: {e}", self.prefix()))?;
            tcp.set_nodelay(true)
                .map_err(|e| format!("{}: {e}", self.prefix()))?;
            let stream: Box<dyn AsyncTokioStream> = match (&self.tls, self.relay.security) {
                (Some(trust), Security::Tls) => {
                    let name = ServerName::try_from(self.relay.host.clone())
                        .map_err(|e| format!("{}: {e}", self.prefix()))?;
                    let tls = tokio_rustls::TlsConnector::from(trust.rustls_config())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| self.describe(&e))?;
                    Box::new(TlsStream(tls))
                }
                _ => Box::new(tcp),
            };
            let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &self.hello)
                .await
                .map_err(|e| self.describe(&e))?;
            if let Some(params) = &self.starttls {
                if !conn.can_starttls() {
                    close(conn, true);
                    return Err(format!(
                        "{}: the relay does not offer STARTTLS, which MAIL_SMTP_URL requires \
                         (tls=required); nothing was sent",
                        self.prefix()
                    ));
                }
                conn.starttls(params.clone(), &self.hello)
                    .await
                    .map_err(|e| self.describe(&e))?;
            }
            if let (Some(user), Some(password)) = (&self.relay.user, &self.relay.password) {
                let credentials = Credentials::new(user.clone(), password.expose().clone());
                conn.auth(DEFAULT_MECHANISMS, &credentials)
                    .await
                    .map_err(|e| format!("{}: login refused: {e}", self.prefix()))?;
            }
            Ok(conn)
        };
        tokio::time::timeout(self.connect_timeout, open)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{}: no connection within {} ms",
                    self.prefix(),
                    self.connect_timeout.as_millis()
                ))
            })
    }
}

/// One mail transaction on `conn`, as lettre's own `send` runs it, but
/// telling a failure at `MAIL FROM` (nothing sent yet) from later ones.
async fn transaction(
    conn: &mut AsyncSmtpConnection,
    envelope: &Envelope,
    bytes: &[u8],
) -> Result<(), Failed> {
    let mut options = Vec::new();
    if !bytes.is_ascii() {
        if !conn.server_info().supports_feature(Extension::EightBitMime) {
            return Err(Failed::AtMail(
                "the message is not ASCII and the relay lacks 8BITMIME".into(),
            ));
        }
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    conn.command(Mail::new(envelope.from().cloned(), options))
        .await
        .map_err(|e| Failed::AtMail(e.into()))?;
    for to in envelope.to() {
        conn.command(Rcpt::new(to.clone(), Vec::new()))
            .await
            .map_err(|e| Failed::Later(e.into()))?;
    }
    conn.command(Data)
        .await
        .map_err(|e| Failed::Later(e.into()))?;
    conn.message(bytes)
        .await
        .map_err(|e| Failed::Later(e.into()))?;
    Ok(())
}

/// Closes `conn` in the background: with a `QUIT` when `polite`, bounded
/// by [`QUIT_TIMEOUT`], so that a dead relay never holds a worker.
fn close(mut conn: AsyncSmtpConnection, polite: bool) {
    tokio::spawn(async move {
        if polite {
            let _ = tokio::time::timeout(QUIT_TIMEOUT, conn.quit()).await;
        }
        let _ = tokio::time::timeout(QUIT_TIMEOUT, conn.abort()).await;
    });
}

/// A TLS stream lettre can drive (it needs its `AsyncTokioStream`).
#[derive(Debug)]
struct TlsStream(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncTokioStream for TlsStream {
    fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
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
        assert_eq!(r.security(), Security::Plain);

        let r: SmtpRelay = "smtps://u:pw@mail.example".parse().unwrap();
        assert_eq!((r.port(), r.security()), (465, Security::Tls));
        let r: SmtpRelay = "smtps://mail.example:2465".parse().unwrap();
        assert_eq!((r.port(), r.security()), (2465, Security::Tls));
        let r: SmtpRelay = "smtp://mail.example?tls=required".parse().unwrap();
        assert_eq!((r.port(), r.security()), (587, Security::StartTls));
        let r: SmtpRelay = "smtp://u:pw@127.0.0.1:2587/helo.example?tls=required"
            .parse()
            .unwrap();
        assert_eq!((r.port(), r.security()), (2587, Security::StartTls));
        assert_eq!(r.helo_name.as_deref(), Some("helo.example"));

        for bad in [
            "http://u:hunter2@host",
            "smtp://u:hunter2@host?tls=opportunistic",
            "smtp://u:hunter2@host?tls=hunter2",
            "smtp://u:hunter2@host?hunter2=1",
            "smtps://u:hunter2@host?tls=required",
            "smtp://u:hunter2@host#hunter2",
            "smtp://u@host",
            "smtp://:hunter2@host",
            "smtp://",
            "not a url hunter2",
        ] {
            let err = bad.parse::<SmtpRelay>().unwrap_err();
            assert!(!err.contains("hunter2"), "{bad}: {err}");
        }
        let err = "smtp://h?tls=opportunistic"
            .parse::<SmtpRelay>()
            .unwrap_err();
        assert!(err.contains("tls=required"), "{err}");
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
