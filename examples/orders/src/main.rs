//! `orders`: reads `CHASSIS_*` and `ORDERS_*` (exit 78 listing every
//! problem), starts logging, opens its database, binds `CHASSIS_BIND` (the
//! demo uses `127.0.0.1:8083`) and serves until SIGTERM or SIGINT.
//! Settings: see the crate docs and README.

use std::process::ExitCode;

use chassis::ServiceBuilder;

#[tokio::main]
async fn main() -> ExitCode {
    ServiceBuilder::new(orders::NAME, orders::API_VERSION)
        .run_with(
            |r, _config| orders::Settings::read(r),
            |builder, settings, _address| orders::app_on(builder, settings),
        )
        .await
}
