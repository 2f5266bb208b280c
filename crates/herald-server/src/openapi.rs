//! `GET /openapi.json`: the OpenAPI 3.1 description of the API, generated from the handlers'
//! `#[utoipa::path]` attributes and the response types.
//!
//! Who may call an operation is not written on each handler: it is read from
//! [`ROUTES`](crate::ROUTES), the list the authentication layer enforces, and turned into the
//! operation's `security` requirement (the `bearer` scheme, with the role `read` or `write`)
//! and its `401` / `403` responses. A route served without a token gets neither.

use std::borrow::Cow;
use std::sync::LazyLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, KnownFormat, ObjectBuilder, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, Schema};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::problem::{PROBLEM_JSON, Problem};
use crate::{Access, ROUTES, append, live, read, telemetry};

/// The name of the security scheme of bearer tokens.
const BEARER: &str = "bearer";

/// The OpenAPI document of the event API, as served on `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald event API",
        description = "Append, read and follow CloudEvents in Herald's event store. Errors are \
                       `application/problem+json` documents (RFC 9457) whose `type` is \
                       `urn:herald:problem:<kind>`."
    ),
    paths(
        append::append,
        read::read_stream,
        read::delete_stream,
        live::live_stream,
        read::read_all,
        live::live_all,
        telemetry::metrics,
        openapi_json,
        crate::healthz,
        crate::readyz,
    ),
    components(schemas(CloudEvent, Problem)),
    modifiers(&Security),
    tags(
        (name = "events", description = "Append, read and delete"),
        (name = "live", description = "Follow the log or a stream as Server-Sent Events"),
        (name = "operations", description = "Health, metrics and this description"),
    )
)]
struct ApiDoc;

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    summary = "This OpenAPI 3.1 document",
    responses((status = 200, description = "The OpenAPI document", body = Object)),
)]
pub(crate) async fn openapi_json() -> Response {
    static DOCUMENT: LazyLock<String> =
        LazyLock::new(|| openapi().to_json().unwrap_or_else(|_| "{}".to_owned()));
    let mut response = DOCUMENT.clone().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Adds the bearer scheme, and to every operation of a protected route its security
/// requirement and its `401` (and `403` for writes) responses.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                BEARER,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "Required on every route but `/healthz` and `/readyz` when the \
                             server is configured with tokens. The role is the token's scope: \
                             a `write` token may also read.",
                        ))
                        .build(),
                ),
            );
        for route in ROUTES {
            let Some(operation) = openapi
                .paths
                .paths
                .get_mut(route.path)
                .and_then(|item| operation_mut(item, route.method))
            else {
                // Not documented: the completeness test names it.
                continue;
            };
            let role = match route.access {
                Access::Open => continue,
                Access::Read => "read",
                Access::Write => "write",
            };
            operation.security = Some(vec![SecurityRequirement::new(BEARER, [role])]);
            let responses = &mut operation.responses.responses;
            responses.insert(
                "401".to_owned(),
                problem_response(
                    "No `Authorization: Bearer` token, or an unknown one \
                     (`urn:herald:problem:unauthorized`, `urn:herald:problem:invalid-token`); \
                     the response carries `WWW-Authenticate: Bearer`",
                ),
            );
            if route.access == Access::Write {
                responses.insert(
                    "403".to_owned(),
                    problem_response(
                        "A `read` token on an endpoint that writes \
                         (`urn:herald:problem:insufficient-scope`)",
                    ),
                );
            }
        }
    }
}

fn operation_mut<'a>(
    item: &'a mut utoipa::openapi::PathItem,
    method: &str,
) -> Option<&'a mut Operation> {
    match method {
        "GET" => item.get.as_mut(),
        "POST" => item.post.as_mut(),
        "PUT" => item.put.as_mut(),
        "DELETE" => item.delete.as_mut(),
        "PATCH" => item.patch.as_mut(),
        "HEAD" => item.head.as_mut(),
        "OPTIONS" => item.options.as_mut(),
        "TRACE" => item.trace.as_mut(),
        _ => None,
    }
}

fn problem_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(Problem::name())))
                .build(),
        )
        .build()
        .into()
}

/// The schema of a structured CloudEvent (JSON event format of CloudEvents 1.0), for the
/// documentation only: the envelope itself is `herald_core::Event`.
pub(crate) struct CloudEvent;

impl PartialSchema for CloudEvent {
    fn schema() -> RefOr<Schema> {
        let string = |description: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some(description))
        };
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A CloudEvents 1.0 event in the JSON event format. Any other member is an \
                 extension attribute (a string, an integer or a boolean), e.g. \
                 `correlationid`, `causationid`, `partitionkey`, `traceparent`.",
            ))
            .property("specversion", string("Always `1.0`"))
            .required("specversion")
            .property(
                "id",
                string("The event's id; stores use it as the idempotency key"),
            )
            .required("id")
            .property(
                "source",
                string("The context of the event, a URI-reference"),
            )
            .required("source")
            .property("type", string("The kind of event"))
            .required("type")
            .property("subject", string("The subject within the source"))
            .property(
                "time",
                string("When the occurrence happened (RFC 3339)")
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
            )
            .property("datacontenttype", string("The media type of `data`"))
            .property(
                "dataschema",
                string("The schema of `data`, an absolute URI")
                    .format(Some(SchemaFormat::Custom("uri".to_owned()))),
            )
            .property(
                "data",
                ObjectBuilder::new()
                    // Any JSON value, spelled out: utoipa's own model cannot read back a
                    // schema without a `type`.
                    .schema_type(SchemaType::Array(vec![
                        Type::Object,
                        Type::Array,
                        Type::String,
                        Type::Number,
                        Type::Boolean,
                        Type::Null,
                    ]))
                    .description(Some("The payload, when it is JSON: any JSON value")),
            )
            .property(
                "data_base64",
                string("The payload, when it is bytes, in base64"),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .into()
    }
}

impl ToSchema for CloudEvent {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("CloudEvent")
    }
}

/// A batch of structured CloudEvents, appended atomically.
pub(crate) struct CloudEventBatch;

impl PartialSchema for CloudEventBatch {
    fn schema() -> RefOr<Schema> {
        ArrayBuilder::new()
            .items(Ref::from_schema_name(CloudEvent::name()))
            .min_items(Some(1))
            .description(Some("CloudEvents appended atomically, in this order"))
            .into()
    }
}

impl ToSchema for CloudEventBatch {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("CloudEventBatch")
    }
}

impl PartialSchema for Problem {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "An error (RFC 9457). Extension members say more, e.g. `attribute`, `index`, \
                 `expected`, `actual`, `limit`.",
            ))
            .property(
                "type",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("`urn:herald:problem:<kind>`"))
                    .format(Some(SchemaFormat::Custom("uri".to_owned()))),
            )
            .required("type")
            .property(
                "title",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("A short summary of the kind")),
            )
            .required("title")
            .property(
                "status",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .description(Some("The HTTP status")),
            )
            .required("status")
            .property(
                "detail",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("What is wrong with this request")),
            )
            .required("detail")
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .into()
    }
}

impl ToSchema for Problem {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Problem")
    }
}
