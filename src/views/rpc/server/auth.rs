//! Who may call: bearer tokens (full or read-only) on TCP, the socket's permissions on Unix sockets.

#[allow(unused_imports)]
use super::*;

/// Checks `authorization: Bearer <token>` on every call when the daemon has a token.
#[derive(Clone)]
pub struct Auth {
    /// The token that may do everything.
    pub token: Option<Arc<String>>,
    /// A token that may only read.
    pub read_only: Option<Arc<String>>,
    /// Whether a call without a token is refused (TCP) or let through (a Unix socket, whose
    /// file permissions already chose who may connect).
    pub required: bool,
}

/// What a call may do, as the auth check found it (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Full,
    ReadOnly,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let matches = |t: &Option<Arc<String>>, g: &str| {
            t.as_ref()
                .is_some_and(|t| crate::views::token_matches(g.as_bytes(), t.as_bytes()))
        };
        let access =
            match given {
                Some(g) if matches(&self.token, &g) => Access::Full,
                Some(g) if matches(&self.read_only, &g) => Access::ReadOnly,
                Some(_) if self.token.is_some() || self.read_only.is_some() => {
                    return Err(Status::unauthenticated("wrong bearer token"))
                }
                _ if self.required => return Err(Status::unauthenticated(
                    "this daemon needs `authorization: Bearer <token>` (set GRANARY_TOKEN_FILE)",
                )),
                _ => Access::Full,
            };
        req.extensions_mut().insert(access);
        Ok(req)
    }
}

/// Refuses a call that writes or deletes to a read-only token.
pub(super) fn writable<T>(req: &Request<T>, what: &str) -> Result<(), Status> {
    match req.extensions().get::<Access>() {
        Some(Access::ReadOnly) => Err(Status::permission_denied(format!(
            "{what}: refused to a read-only token"
        ))),
        _ => Ok(()),
    }
}
