//! Ways a store is shown to the world: the FUSE mount, the daemon's gRPC service, the Nix
//! binary cache over HTTP, and NAR archives; and the guards the servers share.

pub mod binary_cache;
pub mod fs;
pub mod nar;
pub mod net_guard;
pub mod rpc;

/// Whether a credential a client presented is `token`: compared without an early exit, so
/// response times do not reveal how much of a guess was right. The one token check of every
/// server (the daemon's bearer tokens, the binary cache's bearer or Basic password).
pub(crate) fn token_matches(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len()
        && given
            .iter()
            .zip(token)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}
