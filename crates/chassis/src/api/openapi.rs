//! The OpenAPI 3.1 document of an [`Api`](super::Api), built with utoipa's
//! `openapi` types: each route's own documentation ([`Doc`]) and what the
//! chassis answers itself on every route: the problem+json errors, the
//! bearer scheme, and the permission the route requires (`x-permission`).

use bytes::Bytes;
use utoipa::openapi::{
    AllOfBuilder, ArrayBuilder, ComponentsBuilder, HttpMethod, InfoBuilder, ObjectBuilder,
    OneOfBuilder, OpenApiBuilder, Paths, Ref, RefOr, Required, Response, Schema,
    SecurityRequirement, Server,
    extensions::Extensions,
    path::{Operation, OperationBuilder, ParameterBuilder, ParameterIn},
    request_body::RequestBodyBuilder,
    schema::{AdditionalProperties, SchemaType, Type},
    security::{Http, HttpAuthScheme, SecurityScheme},
};

use super::{
    doc::{Doc, JSON, response},
    guard::Access,
};
use crate::{problem::CONTENT_TYPE as PROBLEM, validation};

/// The name of the bearer (JWT) security scheme in the document.
pub(crate) const BEARER: &str = "bearer";

/// The `x-permission` of a public route.
pub(crate) const PUBLIC: &str = "public";

/// The extension naming the permission an operation requires.
pub(crate) const PERMISSION_EXTENSION: &str = "x-permission";

/// The path of the document under the API's prefix.
pub(crate) const PATH: &str = "/openapi.json";

/// The schema of every problem+json answer, as
/// [`Problem`](crate::problem::Problem) writes it.
const PROBLEM_SCHEMA: &str = "Problem";
/// The schema of a 422 answer of the [`validation`] standard.
const VALIDATION_SCHEMA: &str = "ValidationProblem";

/// The operations of an API and the schemas they refer to, ready to be
/// given the service's name and versions.
#[derive(Debug, Default)]
pub(crate) struct ApiDoc {
    paths: Paths,
    schemas: Vec<(String, RefOr<Schema>)>,
}

impl ApiDoc {
    /// Adds `method path` (the full path, e.g. `/orders/v1/{account}/orders`).
    pub(super) fn add(&mut self, path: &str, method: HttpMethod, operation: Operation) {
        self.paths.add_path_operation(path, vec![method], operation);
    }

    /// Adds the named schemas of one route; a name already taken by another
    /// schema is a problem.
    pub(super) fn add_schemas(
        &mut self,
        schemas: Vec<(String, RefOr<Schema>)>,
    ) -> Result<(), String> {
        for (name, schema) in schemas {
            match self.schemas.iter().find(|(n, _)| *n == name) {
                Some((_, existing)) if *existing != schema => {
                    return Err(format!(
                        "two different schemas are named `{name}`; give one another name with `#[schema(as = ...)]`"
                    ));
                }
                Some(_) => {}
                None => self.schemas.push((name, schema)),
            }
        }
        Ok(())
    }

    /// The document as JSON: `info` names the service, its package
    /// `version` and `api_version`; the one server is relative (`/`), since
    /// the paths are full paths. A deprecated version's operations are all
    /// `deprecated: true`, and its `info` says since when, its sunset and
    /// its successor (`x-deprecated-at`, `x-sunset`, `x-successor`).
    pub(crate) fn render(
        mut self,
        service: &str,
        api_version: u32,
        version: &str,
        deprecation: Option<&Deprecation>,
    ) -> Bytes {
        let version = if version.is_empty() {
            "unversioned"
        } else {
            version
        };
        let mut info_ext: Extensions = [("x-api-version", serde_json::Value::from(api_version))]
            .into_iter()
            .collect();
        let mut description = format!(
            "Version {api_version} of the `{service}` API, under `/{service}/v{api_version}`. \
             Each operation names the permission it requires in `x-permission` \
             (`public` when it requires none); every error is `application/problem+json`."
        );
        if let Some(d) = deprecation {
            let at = |t| crate::time::rfc3339_millis(crate::time::unix_millis(t));
            description.push_str(&format!(
                "\n\n**Deprecated** since {}: every answer carries `Deprecation`",
                at(d.since)
            ));
            info_ext.insert("x-deprecated-at".to_owned(), at(d.since).into());
            if let Some(sunset) = d.sunset {
                description.push_str(&format!(
                    " and `Sunset`; this version stops answering after {}",
                    at(sunset)
                ));
                info_ext.insert("x-sunset".to_owned(), at(sunset).into());
            }
            description.push('.');
            if let Some(successor) = &d.successor {
                description.push_str(&format!(" Its successor is described at `{successor}`."));
                info_ext.insert("x-successor".to_owned(), successor.clone().into());
            }
            for item in self.paths.paths.values_mut() {
                for op in [
                    &mut item.get,
                    &mut item.put,
                    &mut item.post,
                    &mut item.delete,
                    &mut item.options,
                    &mut item.head,
                    &mut item.patch,
                    &mut item.trace,
                ]
                .into_iter()
                .flatten()
                {
                    op.deprecated = Some(utoipa::openapi::Deprecated::True);
                }
            }
        }
        let info = InfoBuilder::new()
            .title(service)
            .version(version)
            .description(Some(description))
            .extensions(Some(info_ext))
            .build();
        let mut components = ComponentsBuilder::new()
            .schema(PROBLEM_SCHEMA, problem_schema())
            .schema(VALIDATION_SCHEMA, validation_schema())
            .security_scheme(
                BEARER,
                SecurityScheme::Http(
                    Http::builder()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .description(Some(
                            "A JWT from the issuer the service trusts; its `perms` claim holds the caller's grants.",
                        ))
                        .build(),
                ),
            );
        for (name, schema) in self.schemas {
            components = components.schema(name, schema);
        }
        let doc = OpenApiBuilder::new()
            .info(info)
            .servers(Some([Server::new("/")]))
            .paths(self.paths)
            .components(Some(components.build()))
            .build();
        // Serializing types made of strings, maps and numbers does not fail.
        Bytes::from(doc.to_json().expect("an OpenAPI document serializes"))
    }
}

/// What the document of a deprecated version says of it.
#[derive(Debug, Clone)]
pub(crate) struct Deprecation {
    /// Deprecated since.
    pub(crate) since: std::time::SystemTime,
    /// Stops answering after, if said.
    pub(crate) sunset: Option<std::time::SystemTime>,
    /// The path of the successor's document, if there is one.
    pub(crate) successor: Option<String>,
}

/// The operation of one route: what it documents, then what the chassis
/// answers itself. `path` is the route's path under the prefix.
pub(super) fn operation(path: &str, access: &Access, doc: Doc, default_id: String) -> Operation {
    let permission = match access {
        Access::Public => PUBLIC.to_owned(),
        Access::Permission(t) => t.to_string(),
    };
    let requires = match access {
        Access::Public => "**Public**: no token needed.".to_owned(),
        Access::Permission(_) => format!("**Requires** the permission `{permission}`."),
    };
    let description = match &doc.description {
        Some(d) => format!("{requires}\n\n{d}"),
        None => requires,
    };
    let ext: Extensions = [(PERMISSION_EXTENSION, serde_json::Value::from(permission))]
        .into_iter()
        .collect();
    let mut op = OperationBuilder::new()
        .operation_id(Some(
            doc.operation_id
                .clone()
                .or(doc.handler.clone())
                .unwrap_or(default_id),
        ))
        .summary(doc.summary.clone())
        .description(Some(description))
        .tags((!doc.tags.is_empty()).then_some(doc.tags.clone()))
        .extensions(Some(ext));
    let params = path_params(path);
    for name in &params {
        let described = doc.params.iter().find(|(n, _)| n == name);
        let (schema, description) = if *name == "account" {
            (
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some("^[A-Za-z0-9_-]{1,64}$"))
                    .build(),
                "The account (1 to 64 of `A-Z a-z 0-9 _ -`); another value answers 404.",
            )
        } else {
            (
                ObjectBuilder::new().schema_type(Type::String).build(),
                described.map_or("A path segment.", |(_, d)| d.as_str()),
            )
        };
        let description = described.map_or(description, |(_, d)| d.as_str());
        op = op.parameter(
            ParameterBuilder::new()
                .name(*name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some(description))
                .schema(Some(schema)),
        );
    }
    for p in doc.parameters {
        op = op.parameter(p);
    }
    let has_body = doc.body.is_some();
    if let Some((content_type, schema)) = doc.body {
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content(content_type, utoipa::openapi::Content::new(Some(schema)))
                .build(),
        ));
    }
    let mut responses: Vec<(u16, Response)> = doc.responses;
    if let Some(why) = &doc.undocumented {
        op = op.response(
            "default",
            response(&format!("Not documented: {why}"), None, &[]),
        );
    }
    let protected = matches!(access, Access::Permission(_));
    let mut chassis: Vec<(u16, Response)> = Vec::new();
    if has_body {
        chassis.push((
            400,
            problem_response(
                "The body cannot be read (not JSON, or not of its media type).",
                false,
            ),
        ));
    }
    if protected {
        chassis.push((
            401,
            response(
                "No token, or one that is not valid; `reason` says why (`missing_token`, `expired`, `bad_signature`, …).",
                Some((PROBLEM, problem_ref())),
                &[("WWW-Authenticate", "`Bearer error=\"invalid_token\"` (RFC 6750).")],
            ),
        ));
        chassis.push((
            403,
            problem_response(
                "The token does not grant the permission; `reason` is `forbidden` and `permission` names it.",
                false,
            ),
        ));
    }
    if !params.is_empty() {
        chassis.push((
            404,
            problem_response(
                "Nothing at this path (an account or id outside its grammar, or not found).",
                false,
            ),
        ));
    }
    if has_body {
        chassis.push((
            413,
            problem_response("The body is larger than the service accepts.", false),
        ));
    }
    if has_body {
        chassis.push((
            415,
            problem_response(
                "The body's `Content-Type` is missing or not the documented media type.",
                false,
            ),
        ));
    }
    if has_body || doc.query {
        chassis.push((
            422,
            response(
                "Some fields or query parameters are not valid; `errors` names each of them (`reason` is `invalid_fields`).",
                Some((PROBLEM, Ref::from_schema_name(VALIDATION_SCHEMA).into())),
                &[],
            ),
        ));
    }
    chassis.push((
        500,
        problem_response("An unexpected failure; the detail never says which.", false),
    ));
    chassis.push((
        503,
        problem_response(
            "The service is at capacity (load shedding), a dependency is unavailable, or (`jwks_unavailable`) its token keys are not loaded; retry after `Retry-After` seconds.",
            true,
        ),
    ));
    chassis.push((
        504,
        problem_response(
            "The request did not finish within the service's timeout or the caller's `x-timeout-ms`.",
            false,
        ),
    ));
    // The route's own answer for a status wins over the chassis' generic one.
    for (status, r) in chassis {
        if !responses.iter().any(|(s, _)| *s == status) {
            responses.push((status, r));
        }
    }
    responses.sort_by_key(|(s, _)| *s);
    for (status, r) in responses {
        op = op.response(status.to_string(), r);
    }
    if protected {
        op = op.security(SecurityRequirement::new::<_, [&str; 0], &str>(BEARER, []));
    }
    op.build()
}

/// The operation id of a route with neither a name nor a named handler:
/// its method and path, e.g. `get_tickets_id`.
pub(super) fn default_operation_id(method: &http::Method, path: &str) -> String {
    let mut id = method.as_str().to_ascii_lowercase();
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        id.push('_');
        id.extend(
            seg.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_'),
        );
    }
    id
}

/// The names of the `{param}` segments of `path`, in order (`{*rest}` is
/// `rest`).
pub(super) fn path_params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|p| p.trim_start_matches('*'))
        .collect()
}

/// `path` as an OpenAPI path template: `{*rest}` becomes `{rest}`.
pub(super) fn template(path: &str) -> String {
    path.replace("{*", "{")
}

fn problem_ref() -> RefOr<Schema> {
    Ref::from_schema_name(PROBLEM_SCHEMA).into()
}

/// A problem+json answer described by `description`, with `Retry-After`
/// when `retry` is set.
pub(super) fn problem_response(description: &str, retry: bool) -> Response {
    let retry_after: &[(&str, &str)] = if retry {
        &[(
            "Retry-After",
            "Seconds to wait before trying again (RFC 9110).",
        )]
    } else {
        &[]
    };
    response(description, Some((PROBLEM, problem_ref())), retry_after)
}

fn string(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
}

/// `Problem`: RFC 9457's members as the chassis writes them, the
/// correlation id, and the members a service adds (`reason`, ...).
fn problem_schema() -> Schema {
    ObjectBuilder::new()
        .description(Some(
            "An RFC 9457 problem document: the body of every error answer.",
        ))
        .property(
            "type",
            string("A URI naming the kind of problem, `urn:chassis:problem:<slug>` for the chassis' own."),
        )
        .required("type")
        .property("title", string("The status' reason phrase, or the kind's title."))
        .required("title")
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(400))
                .maximum(Some(599))
                .description(Some("The HTTP status.")),
        )
        .required("status")
        .property(
            "detail",
            string("What went wrong, for a person; never internal details."),
        )
        .required("detail")
        .property(
            "correlation_id",
            string("The request's `x-correlation-id`, to find its logs."),
        )
        .property(
            "reason",
            string("A code a client can act on (`forbidden`, `expired`, `invalid_fields`, `sold_out`, …)."),
        )
        .property(
            "permission",
            string("On a 403: the permission the caller lacks."),
        )
        .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(true)))
        .build()
        .into()
}

/// `ValidationProblem`: a [`Problem`](problem_schema) whose `errors` name
/// each invalid field (a JSON pointer into the body) or query parameter.
fn validation_schema() -> Schema {
    let detail = || string("What the member must be.");
    let pointer = ObjectBuilder::new()
        .property(
            "pointer",
            string("An RFC 6901 pointer to the member, as a URI fragment (`#/quantity`)."),
        )
        .required("pointer")
        .property("detail", detail())
        .required("detail");
    let parameter = ObjectBuilder::new()
        .property("parameter", string("The query parameter (`limit`)."))
        .required("parameter")
        .property("detail", detail())
        .required("detail");
    AllOfBuilder::new()
        .item(problem_ref())
        .item(
            ObjectBuilder::new()
                .property(
                    "reason",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some([validation::REASON])),
                )
                .required("reason")
                .property(
                    "errors",
                    ArrayBuilder::new().items(OneOfBuilder::new().item(pointer).item(parameter)),
                )
                .required("errors"),
        )
        .build()
        .into()
}

/// `Page_<T>`: `{"items": [T], "next": string | null}`.
pub(super) fn page_schema(item: RefOr<Schema>) -> RefOr<Schema> {
    ObjectBuilder::new()
        .description(Some(
            "One page of a list, in the list's order, and the path of the next page.",
        ))
        .property("items", ArrayBuilder::new().items(item))
        .required("items")
        .property(
            "next",
            ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
                .description(Some(
                    "The absolute path (with its query) of the next page; `null` on the last page.",
                )),
        )
        .required("next")
        .build()
        .into()
}

/// The media type of a served document.
pub(crate) const DOCUMENT_TYPE: &str = JSON;
