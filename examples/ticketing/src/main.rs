//! `ticketing`: reads `CHASSIS_*` and `TICKETING_*` (exit 78 listing every
//! problem; token verification is required), starts logging, opens its
//! database, binds `CHASSIS_BIND` and serves until SIGTERM or SIGINT.

use std::process::ExitCode;

use chassis::ServiceBuilder;

#[tokio::main]
async fn main() -> ExitCode {
    ServiceBuilder::new(ticketing::NAME, 1)
        .run_with(
            |r, config| {
                if config.auth.is_none() {
                    r.problem(
                        "CHASSIS_AUTH_ISSUER",
                        "required: every ticketing route requires a permission",
                    );
                }
                ticketing::Settings::read(r)
            },
            |builder, settings, _address| ticketing::app_on(builder, settings),
        )
        .await
}
