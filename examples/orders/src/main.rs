//! `orders`: binds `CHASSIS_BIND` (the demo uses `127.0.0.1:8083`) and serves
//! until SIGTERM or SIGINT. Settings: see the crate docs and README.

use std::process::ExitCode;

use chassis::config::{Config, EXIT_CONFIG, Env, Reader};

#[tokio::main]
async fn main() -> ExitCode {
    let env = Env::process();
    let mut r = Reader::new(&env);
    let config = Config::read(&mut r);
    let settings = orders::Settings::read(&mut r);
    let settings = match (r.finish(), settings) {
        (Ok(()), Some(s)) => s,
        (Err(e), _) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        (Ok(()), None) => return ExitCode::from(EXIT_CONFIG),
    };
    match orders::app(settings).await {
        Ok(service) => service.config(config).run().await,
        Err(e) => {
            eprintln!("orders cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}
