//! `mail`: reads `CHASSIS_*` and `MAIL_*` (exit 78 listing every problem),
//! opens its database, and serves on `CHASSIS_BIND` until SIGTERM or
//! SIGINT.

use std::process::ExitCode;

use chassis::config::{Config, EXIT_CONFIG, Env, Reader};

#[tokio::main]
async fn main() -> ExitCode {
    let env = Env::process();
    let mut r = Reader::new(&env);
    let config = Config::read(&mut r);
    let settings = mail::Settings::read(&mut r);
    if let Err(e) = r.finish() {
        eprintln!("{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match mail::app(settings).await {
        Ok(service) => service.config(config).run().await,
        Err(e) => {
            eprintln!("cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}
