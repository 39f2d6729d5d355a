//! mail honours the contracts its consumers committed
//! (`contracts/orders-mail.json`, `contracts/ticketing-mail.json`; see
//! `chassis::testing::contract`): its served document is checked against
//! every interaction orders and ticketing recorded against it.

mod support;

use std::path::PathBuf;

use chassis::testing::contract::verify_provider;
use support::{Server, TempDir};

#[tokio::test]
async fn mail_honours_every_contract_naming_it() {
    let dir = TempDir::new("mail-contracts");
    let server = Server::start(&dir, &[]).await;
    let contracts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../contracts");
    let checked = verify_provider(&server.url(""), "mail", &contracts).await;
    server.stop().await;
    assert!(checked >= 2, "orders' and ticketing's contracts");
}
