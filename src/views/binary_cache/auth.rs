//! Who may use the cache: a bearer token, or HTTP Basic with the token as the password (what Nix sends from a netrc file).

#[allow(unused_imports)]
use super::*;

/// Whether the headers carry the token: `Bearer TOKEN`, or Basic with TOKEN as the password
/// (what Nix sends from a netrc file).
pub(super) fn carries_token(headers: &HeaderMap, token: &str) -> bool {
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let given = if let Some(t) = v.strip_prefix("Bearer ") {
        t.trim().as_bytes().to_vec()
    } else if let Some(b) = v.strip_prefix("Basic ") {
        let Ok(dec) = data_encoding::BASE64.decode(b.trim().as_bytes()) else {
            return false;
        };
        match dec.iter().position(|&c| c == b':') {
            Some(i) => dec[i + 1..].to_vec(),
            None => return false,
        }
    } else {
        return false;
    };
    crate::views::token_matches(&given, token.as_bytes())
}

pub(super) async fn auth(State(c): State<Arc<BinaryCache>>, req: Request, next: Next) -> Response {
    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
    if write && c.opts.read_only {
        return HttpError(StatusCode::FORBIDDEN, "this cache is read-only".into()).into_response();
    }
    if let Some(token) = &c.opts.token {
        let anonymous_ok = c.opts.anonymous_read && !write;
        if !anonymous_ok && !carries_token(req.headers(), token) {
            let mut r = HttpError(
                StatusCode::UNAUTHORIZED,
                "this cache needs a token (Authorization: Bearer, or a netrc password)".into(),
            )
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"granary\""),
            );
            return r;
        }
    }
    next.run(req).await
}
