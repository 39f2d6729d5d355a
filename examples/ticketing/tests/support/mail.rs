//! mail, the real downstream of the call this service makes as itself
//! (`src/alerts.rs`), run in the tests' process on loopback. Nothing here
//! knows the ticket domain: a test of another trigger of the call starts
//! [`Mail`], gives the service [`Mail::notices`] and reads what mail got.

use std::time::Duration;

use chassis::{
    client::{ClientError, Downstream},
    config::Config,
    testing::{TempDir, TestDatabase, TestIssuer, TestServer},
};
use mail::client::{MailClient, Message};
use ticketing::SoldOutNotices;

/// mail on a loopback port, writing what it sends to files in its own
/// temporary directory (its default when no SMTP server is set), its
/// database on the test run's engine.
#[derive(Debug)]
pub struct Mail {
    server: TestServer,
    dir: TempDir,
    _db: TestDatabase,
}

impl Mail {
    /// Starts mail, trusting [`TestIssuer`]'s tokens.
    pub async fn start() -> Self {
        let dir = TempDir::new("mail");
        let db = TestDatabase::new();
        let mut settings = mail::Settings::new(dir.path());
        settings.db = db.configure(settings.db);
        let builder = mail::app(settings)
            .await
            .expect("mail starts")
            .verifier(TestIssuer::new().verifier())
            .config(Config::default());
        Self {
            server: TestServer::start(builder).await,
            dir,
            _db: db,
        }
    }

    /// Its base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.server.url("")
    }

    /// Notices to `ops@acme.example` through this mail, made with this
    /// service's own token holding `grants`: what
    /// `TICKETING_SOLD_OUT_MAIL_TO` and `CHASSIS_CLIENT_*` give it when
    /// deployed. The token comes from [`TestIssuer::token_source`]'s
    /// endpoint (client credentials), so the call goes through the real
    /// client, the real token and mail's real permission check.
    pub async fn notices(&self, grants: &[&str]) -> SoldOutNotices {
        let tokens = TestIssuer::new().token_source("ticketing", grants).await;
        SoldOutNotices {
            to: "ops@acme.example".to_owned(),
            mail: Downstream::builder("mail", &self.server.url(""))
                .token_source(tokens)
                .attempt_timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    /// The message `message_id` as mail holds it, read by an operator
    /// with `mail::view:message`; a refusal (404 before it was asked for)
    /// is an `Err` to give to `refusal`.
    pub async fn message(&self, message_id: &str) -> Result<Message, ClientError> {
        let ops = super::user("ops", &["mail::view:message"]).await;
        let reader = MailClient::new(
            Downstream::builder("mail", &self.server.url(""))
                .build()
                .unwrap(),
        );
        reader.on_behalf_of(&ops).get(message_id).await
    }

    /// The mails written so far (`.eml` files), as text.
    pub fn sent(&self) -> Vec<String> {
        sent_in(&self.dir)
    }

    /// Stops mail as on SIGTERM; returns every mail it wrote, its worker's
    /// last included.
    pub async fn stop(self) -> Vec<String> {
        self.server.stop().await;
        sent_in(&self.dir)
    }
}

/// The `.eml` files mail has written under `dir`, as text.
fn sent_in(dir: &TempDir) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir.join(mail::OUTBOX_DIR)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".eml"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect()
}
