//! `ticketing`: reads `CHASSIS_*` and `TICKETING_*` (exit 78 listing every
//! problem; token verification is required), opens its database, binds
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
            "required: every ticketing route requires a permission",
        );
    }
    let settings = ticketing::Settings::read(&mut r);
    if let Err(e) = r.finish() {
        e.exit();
    }
    match ticketing::app(settings).await {
        Ok(service) => service.config(config).run().await,
        Err(e) => {
            eprintln!("ticketing cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}
