//! The service's OpenAPI document, as a client reads it from a running
//! server: every route of its table, with its permission and its success
//! schema. (`.ci/run` also validates it as OpenAPI 3.1.)

mod support;

use chassis::testing::{Documented, assert_documents, fetch_openapi};
use support::Data;

const fn route(
    method: &'static str,
    path: &'static str,
    permission: &'static str,
    status: u16,
    schema: &'static str,
) -> Documented {
    Documented {
        method,
        path,
        permission,
        status,
        schema,
    }
}

#[tokio::test]
async fn every_route_is_documented_with_its_permission() {
    let data = Data::new("auth-openapi");
    let auth = support::start(&data).await;
    let doc = fetch_openapi(&auth.url(""), "auth", 1).await;
    auth.stop().await;
    assert_documents(
        &doc,
        &[
            route("POST", "/auth/v1/token", "public", 200, "TokenResponse"),
            route("GET", "/auth/v1/jwks", "public", 200, "Jwks"),
            route(
                "GET",
                "/auth/v1/.well-known/openid-configuration",
                "public",
                200,
                "OpenIdConfiguration",
            ),
            route(
                "POST",
                "/auth/v1/keys/rotate",
                "auth::rotate:key",
                200,
                "RotatedKey",
            ),
            route(
                "GET",
                "/auth/v1/clients/{name}/grants",
                "auth::view:grant",
                200,
                "SubjectGrants",
            ),
            route(
                "GET",
                "/auth/v1/users/{name}/grants",
                "auth::view:grant",
                200,
                "SubjectGrants",
            ),
            route(
                "PUT",
                "/auth/v1/clients/{name}/grants",
                "auth::manage:grant",
                200,
                "SubjectGrants",
            ),
            route(
                "PUT",
                "/auth/v1/users/{name}/grants",
                "auth::manage:grant",
                200,
                "SubjectGrants",
            ),
            route(
                "POST",
                "/auth/v1/clients",
                "auth::register:client",
                201,
                "RegisteredClient",
            ),
        ],
    );
    let token = &doc["paths"]["/auth/v1/token"]["post"];
    assert_eq!(
        token["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]["$ref"],
        "#/components/schemas/TokenRequest"
    );
    // The token endpoint's errors are OAuth's JSON, not problems.
    assert_eq!(
        token["responses"]["400"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/TokenErrorResponse"
    );
}
