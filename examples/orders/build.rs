//! Rebuilds when a migration is added or changed: `sqlx::migrate!` embeds
//! `migrations/sqlite` and `migrations/postgres` at compile time.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
