//! `auth`: reads `CHASSIS_*` and `AUTH_*` (exit 78 listing every problem),
//! then serves on `CHASSIS_BIND` until SIGTERM or SIGINT.

use std::process::ExitCode;

use chassis::config::{Config, EXIT_CONFIG, Env, Reader};

#[tokio::main]
async fn main() -> ExitCode {
    let env = Env::process();
    let mut r = Reader::new(&env);
    let config = Config::read(&mut r);
    let settings = auth::Settings::read(&mut r);
    if let Err(e) = r.finish() {
        eprintln!("{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    auth::run(config, settings).await
}
