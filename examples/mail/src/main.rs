//! `mail`: reads `CHASSIS_*` and `MAIL_*` (exit 78 listing every problem;
//! token verification is required), opens its database, binds
//! `CHASSIS_BIND` and serves until SIGTERM or SIGINT.

use std::process::ExitCode;

use chassis::config::{Config, Env, Reader};

#[tokio::main]
async fn main() -> ExitCode {
    let env = Env::process();
    let mut r = Reader::new(&env);
    let config = Config::read(&mut r);
    if config.auth.is_none() {
        r.problem(
            "CHASSIS_AUTH_ISSUER",
            "required: every mail route requires a permission",
        );
    }
    let settings = mail::Settings::read(&mut r);
    if let Err(e) = r.finish() {
        e.exit();
    }
    match mail::app(settings).await {
        Ok(service) => service.config(config).run().await,
        Err(e) => {
            eprintln!("mail cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}
