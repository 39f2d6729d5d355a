//! What a route says about itself for its OpenAPI operation, declared next
//! to its permission: [`Endpoint::summary`], [`Endpoint::body`],
//! [`Endpoint::response`], [`Endpoint::page`], ... The chassis adds what it
//! answers itself (see [`openapi`](super::openapi)) when the document is
//! built.

use http::StatusCode;
use utoipa::{
    ToSchema,
    openapi::{
        Content, Header, HttpMethod, Ref, RefOr, Required, Response, ResponseBuilder, Schema,
        path::{Parameter, ParameterBuilder, ParameterIn},
        schema::{ObjectBuilder, Type},
    },
};

use super::Endpoint;
use crate::page::{DEFAULT_LIMIT, MAX_LIMIT};

/// The media type of JSON bodies.
pub(super) const JSON: &str = "application/json";

/// A route's documentation, as its [`Endpoint`] declares it.
#[derive(Debug, Clone, Default)]
pub(super) struct Doc {
    pub(super) operation_id: Option<String>,
    /// The handler's function name, the operation id when none is given.
    pub(super) handler: Option<String>,
    pub(super) summary: Option<String>,
    pub(super) description: Option<String>,
    pub(super) tags: Vec<String>,
    /// Descriptions of path parameters, by name.
    pub(super) params: Vec<(String, String)>,
    /// Query parameters and request headers.
    pub(super) parameters: Vec<Parameter>,
    /// The request body: its media type and schema.
    pub(super) body: Option<(String, RefOr<Schema>)>,
    /// The service's own answers, by status.
    pub(super) responses: Vec<(u16, Response)>,
    /// Why the route is not documented, when it says so.
    pub(super) undocumented: Option<String>,
    /// Whether it takes query parameters the chassis' validation checks.
    pub(super) query: bool,
    /// The named schemas the operation refers to.
    pub(super) schemas: Vec<(String, RefOr<Schema>)>,
    /// Mistakes in the declaration, reported when the service is built.
    pub(super) problems: Vec<String>,
}

impl Doc {
    /// The documentation of a route served by `handler` (a type name, e.g.
    /// `orders::routes::place`): its function name becomes the operation
    /// id unless the route names one.
    pub(super) fn for_handler(type_name: &str) -> Self {
        let path = type_name.split('<').next().unwrap_or_default();
        let name = path.rsplit("::").next().unwrap_or_default();
        let is_ident = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        Self {
            handler: is_ident.then(|| name.to_owned()),
            ..Self::default()
        }
    }

    /// Whether it documents a success (2xx or 3xx) answer.
    pub(super) fn has_success(&self) -> bool {
        self.responses.iter().any(|(s, _)| (200..400).contains(s))
    }

    fn add_response(&mut self, status: u16, response: Response) {
        if StatusCode::from_u16(status).is_err() || status < 200 {
            self.problems.push(format!(
                "response status {status} is not a final HTTP status"
            ));
            return;
        }
        if self.responses.iter().any(|(s, _)| *s == status) {
            self.problems
                .push(format!("response {status} is documented twice"));
            return;
        }
        self.responses.push((status, response));
    }
}

/// The schema of `T` as an operation refers to it, and the named schemas it
/// needs in the document's components. A type with members (a struct, an
/// enum of names) is referred to by name; a primitive, a list or an
/// `Option` is written in place.
pub(super) fn schema_of<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) -> RefOr<Schema> {
    T::schemas(schemas);
    let schema = T::schema();
    let named = match &schema {
        RefOr::T(Schema::Object(o)) => !o.properties.is_empty() || o.enum_values.is_some(),
        RefOr::T(Schema::OneOf(_) | Schema::AllOf(_) | Schema::AnyOf(_)) => true,
        _ => false,
    };
    if !named {
        return schema;
    }
    let name = T::name().into_owned();
    schemas.push((name.clone(), schema));
    Ref::from_schema_name(name).into()
}

/// A response with `description` and, when given, a body of `content_type`.
pub(super) fn response(
    description: &str,
    body: Option<(&str, RefOr<Schema>)>,
    headers: &[(&str, &str)],
) -> Response {
    let mut r = ResponseBuilder::new().description(description);
    if let Some((content_type, schema)) = body {
        r = r.content(content_type, Content::new(Some(schema)));
    }
    for (name, description) in headers {
        r = r.header(
            *name,
            Header::builder()
                .schema(ObjectBuilder::new().schema_type(Type::String))
                .description(Some(*description))
                .build(),
        );
    }
    r.build()
}

/// The description of a status: its reason phrase.
pub(super) fn reason(status: u16) -> &'static str {
    StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Answer")
}

/// The method of an operation.
pub(super) fn http_method(method: &http::Method) -> Option<HttpMethod> {
    Some(match *method {
        http::Method::GET => HttpMethod::Get,
        http::Method::POST => HttpMethod::Post,
        http::Method::PUT => HttpMethod::Put,
        http::Method::PATCH => HttpMethod::Patch,
        http::Method::DELETE => HttpMethod::Delete,
        http::Method::HEAD => HttpMethod::Head,
        http::Method::OPTIONS => HttpMethod::Options,
        http::Method::TRACE => HttpMethod::Trace,
        _ => return None,
    })
}

// === impl Endpoint: documentation ===

impl<S> Endpoint<S> {
    /// A one-line summary of what the operation does.
    pub fn summary(mut self, summary: &str) -> Self {
        self.doc.summary = Some(summary.to_owned());
        self
    }

    /// A longer description (CommonMark). The chassis puts the permission
    /// the route requires before it.
    pub fn description(mut self, description: &str) -> Self {
        self.doc.description = Some(description.to_owned());
        self
    }

    /// The operation id, unique in the service; by default the handler's
    /// function name (`place` for `api::post("/orders", place)`).
    pub fn operation_id(mut self, id: &str) -> Self {
        self.doc.operation_id = Some(id.to_owned());
        self
    }

    /// Groups the operation under `tag`.
    pub fn tag(mut self, tag: &str) -> Self {
        self.doc.tags.push(tag.to_owned());
        self
    }

    /// Describes the path parameter `{name}` (every parameter of the path is
    /// listed anyway; `{account}` is described by the chassis).
    pub fn param(mut self, name: &str, description: &str) -> Self {
        self.doc
            .params
            .push((name.to_owned(), description.to_owned()));
        self
    }

    /// An optional query parameter `name` of type `T`.
    pub fn query<T: ToSchema>(mut self, name: &str, description: &str) -> Self {
        let schema = schema_of::<T>(&mut self.doc.schemas);
        self.doc.parameters.push(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(schema))
                .build(),
        );
        self.doc.query = true;
        self
    }

    /// A request header the operation reads (e.g. `Idempotency-Key`).
    pub fn header(self, name: &str, required: bool, description: &str) -> Self {
        self.header_with(name, required, None, description)
    }

    /// A request header whose value must match `pattern` (an ECMA-262
    /// regular expression, anchored with `^…$` for a whole value), e.g.
    /// `^[A-Za-z0-9._~:-]{1,255}$` for an `Idempotency-Key`: a client, or a
    /// test generator, then knows which values the service refuses.
    pub fn header_matching(
        self,
        name: &str,
        required: bool,
        pattern: &str,
        description: &str,
    ) -> Self {
        self.header_with(name, required, Some(pattern), description)
    }

    fn header_with(
        mut self,
        name: &str,
        required: bool,
        pattern: Option<&str>,
        description: &str,
    ) -> Self {
        self.doc.parameters.push(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Header)
                .required(if required {
                    Required::True
                } else {
                    Required::False
                })
                .description(Some(description))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(pattern),
                ))
                .build(),
        );
        self
    }

    /// The JSON request body, of type `T` (its schema derived with
    /// `#[derive(utoipa::ToSchema)]`).
    pub fn body<T: ToSchema>(self) -> Self {
        self.body_as::<T>(JSON)
    }

    /// A request body of type `T` in `content_type` (e.g.
    /// `application/x-www-form-urlencoded`).
    pub fn body_as<T: ToSchema>(mut self, content_type: &str) -> Self {
        let schema = schema_of::<T>(&mut self.doc.schemas);
        if self.doc.body.is_some() {
            self.doc
                .problems
                .push("the body is documented twice".to_owned());
        }
        self.doc.body = Some((content_type.to_owned(), schema));
        self
    }

    /// A JSON answer of type `T` with `status` (e.g. `.response::<Order>(201)`).
    pub fn response<T: ToSchema>(self, status: u16) -> Self {
        self.response_as::<T>(status, JSON)
    }

    /// An answer of type `T` in `content_type` with `status` (e.g.
    /// `.response_as::<String>(200, "text/plain")`).
    pub fn response_as<T: ToSchema>(mut self, status: u16, content_type: &str) -> Self {
        let schema = schema_of::<T>(&mut self.doc.schemas);
        let r = response(reason(status), Some((content_type, schema)), &[]);
        self.doc.add_response(status, r);
        self
    }

    /// An answer with no body (e.g. `204`), described by `description`.
    pub fn response_empty(mut self, status: u16, description: &str) -> Self {
        self.doc
            .add_response(status, response(description, None, &[]));
        self
    }

    /// A problem+json answer of the service's own (e.g. `409` when sold
    /// out), described by `description` (its `reason` codes, say).
    pub fn problem(mut self, status: u16, description: &str) -> Self {
        let r = super::openapi::problem_response(description, false);
        self.doc.add_response(status, r);
        self
    }

    /// A list that pages as the [`page`](crate::page) standard says: the
    /// `limit` and `cursor` query parameters, and a 200 answer
    /// [`Page<T>`](crate::page::Page) with the `Link` header.
    pub fn page<T: ToSchema>(mut self) -> Self {
        let item = schema_of::<T>(&mut self.doc.schemas);
        let name = format!("Page_{}", T::name());
        self.doc
            .schemas
            .push((name.clone(), super::openapi::page_schema(item)));
        self.doc.parameters.extend([
            ParameterBuilder::new()
                .name("limit")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(format!(
                    "Items per page, 1 to {MAX_LIMIT}; {DEFAULT_LIMIT} when absent."
                )))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1))
                        .maximum(Some(MAX_LIMIT))
                        .default(Some(DEFAULT_LIMIT.into())),
                ))
                .build(),
            ParameterBuilder::new()
                .name("cursor")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(
                    "Where the page starts: the opaque cursor of the previous page's `next` link, passed back unchanged.",
                ))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .build(),
        ]);
        self.doc.query = true;
        let r = response(
            "One page of the list, and the link to the next.",
            Some((JSON, Ref::from_schema_name(name).into())),
            &[(
                "Link",
                "The next page, as `<…>; rel=\"next\"` (RFC 8288); absent on the last page.",
            )],
        );
        self.doc.add_response(200, r);
        self
    }

    /// Leaves the route out of the documentation standard, saying `why`:
    /// its operation is listed with its permission and the chassis' own
    /// answers, and a `default` answer saying why nothing more is known.
    pub fn undocumented(mut self, why: &str) -> Self {
        self.doc.undocumented = Some(why.to_owned());
        self
    }
}
