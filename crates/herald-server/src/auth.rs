//! Bearer-token authentication: the middleware in front of every handler.
//!
//! # Contract
//!
//! - With no token configured, every request MUST pass untouched.
//! - Otherwise a request to a route that is not [`Access::Open`] MUST carry
//!   `Authorization: Bearer <token>` with a configured token: without one it is `401`
//!   (`unauthorized`), with an unknown one `401` (`invalid-token`), both with
//!   `WWW-Authenticate: Bearer`; a [`Scope::Read`] token on an [`Access::Write`] route is
//!   `403` (`insufficient-scope`).
//! - The decision MUST be made before the handler runs, so a refused request has read no
//!   body and stored nothing.
//! - A request that matches no entry of [`ROUTES`](crate::ROUTES) (an unknown path, a method
//!   a path does not allow) needs a read token, so that the API's shape is not disclosed to
//!   anonymous clients.
//! - A request to a route added with [`Server::with_routes`](crate::Server::with_routes)
//!   needs a read token for `GET` and `HEAD` and a write token for any other method.
//! - The token MUST be compared with every configured token in constant time (for tokens of
//!   the same length): how long the check takes tells nothing about how much of a token was
//!   right.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::{Choice, ConstantTimeEq as _};

use crate::problem::Problem;
use crate::{Access, AppState, Scope, Token};

/// The `WWW-Authenticate` challenge of a request without credentials.
const CHALLENGE: &str = "Bearer realm=\"herald\"";
/// The challenge of a request with a token the server does not know.
const CHALLENGE_INVALID: &str = "Bearer realm=\"herald\", error=\"invalid_token\"";
/// The challenge of a request whose token may not write.
const CHALLENGE_SCOPE: &str = "Bearer realm=\"herald\", error=\"insufficient_scope\"";

/// Lets a request through when its token allows the route, answers `401` or `403` otherwise.
pub(crate) async fn authorize(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if state.tokens.is_empty() {
        return next.run(request).await;
    }
    let access = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(Access::Read, |matched| {
            crate::access_of(request.method(), matched.as_str())
        });
    if access == Access::Open {
        return next.run(request).await;
    }
    let scope = match bearer(request.headers()) {
        Bearer::Missing(why) => {
            return refuse(
                Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "Authentication required",
                    format!("{why}: send `Authorization: Bearer <token>`"),
                ),
                CHALLENGE,
            );
        }
        Bearer::Token(token) => match scope_of(&state.tokens, token.as_bytes()) {
            Some(scope) => scope,
            None => {
                return refuse(
                    Problem::new(
                        StatusCode::UNAUTHORIZED,
                        "invalid-token",
                        "Invalid token",
                        "the bearer token is not one this server accepts".to_owned(),
                    ),
                    CHALLENGE_INVALID,
                );
            }
        },
    };
    if access == Access::Write && scope != Scope::Write {
        return refuse(
            Problem::new(
                StatusCode::FORBIDDEN,
                "insufficient-scope",
                "Insufficient scope",
                format!(
                    "{} {} writes: it needs a write token, and this one may only read",
                    request.method(),
                    request.uri().path()
                ),
            ),
            CHALLENGE_SCOPE,
        );
    }
    next.run(request).await
}

/// What the `Authorization` header holds.
enum Bearer<'a> {
    /// No usable bearer credentials, and why.
    Missing(&'static str),
    /// The token, as sent.
    Token(&'a str),
}

fn bearer(headers: &HeaderMap) -> Bearer<'_> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Bearer::Missing("the request has no `Authorization` header");
    };
    if values.next().is_some() {
        return Bearer::Missing("the `Authorization` header is given more than once");
    }
    let Ok(text) = value.to_str() else {
        return Bearer::Missing("the `Authorization` header is not visible ASCII");
    };
    let Some((scheme, token)) = text.trim().split_once(' ') else {
        return Bearer::Missing("the `Authorization` header is not `Bearer <token>`");
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Bearer::Missing("the `Authorization` scheme is not `Bearer`");
    }
    match token.trim_start_matches(' ') {
        "" => Bearer::Missing("the `Authorization` header has an empty token"),
        token => Bearer::Token(token),
    }
}

/// The scope of the configured token equal to `given`, comparing with every one of them in
/// constant time; with two equal tokens, the wider scope.
fn scope_of(tokens: &[Token], given: &[u8]) -> Option<Scope> {
    let mut known = Choice::from(0);
    let mut writes = Choice::from(0);
    for token in tokens {
        let equal = token.token.as_bytes().ct_eq(given);
        known |= equal;
        writes |= equal & Choice::from(u8::from(token.scope == Scope::Write));
    }
    if bool::from(writes) {
        Some(Scope::Write)
    } else if bool::from(known) {
        Some(Scope::Read)
    } else {
        None
    }
}

fn refuse(problem: Problem, challenge: &'static str) -> Response {
    let mut response = problem.into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(token: &str, scope: Scope) -> Token {
        Token {
            token: token.to_owned(),
            scope,
        }
    }

    #[test]
    fn a_token_has_the_scope_it_was_configured_with() {
        let tokens = [token("r", Scope::Read), token("w", Scope::Write)];
        assert_eq!(scope_of(&tokens, b"r"), Some(Scope::Read));
        assert_eq!(scope_of(&tokens, b"w"), Some(Scope::Write));
        assert_eq!(scope_of(&tokens, b"x"), None);
        assert_eq!(scope_of(&tokens, b"ww"), None);
        assert_eq!(scope_of(&tokens, b""), None);
        let twice = [token("t", Scope::Read), token("t", Scope::Write)];
        assert_eq!(scope_of(&twice, b"t"), Some(Scope::Write));
    }

    #[test]
    fn only_bearer_credentials_are_read() {
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            headers
        };
        assert!(matches!(
            bearer(&headers("Bearer abc")),
            Bearer::Token("abc")
        ));
        assert!(matches!(
            bearer(&headers("bearer  abc")),
            Bearer::Token("abc")
        ));
        assert!(matches!(bearer(&headers("Basic abc")), Bearer::Missing(_)));
        assert!(matches!(bearer(&headers("Bearer ")), Bearer::Missing(_)));
        assert!(matches!(bearer(&headers("Bearer")), Bearer::Missing(_)));
        assert!(matches!(bearer(&HeaderMap::new()), Bearer::Missing(_)));
    }
}
