//! Client API keys: who may call Chat, Router and Feedback, on both
//! transports.
//!
//! The configuration holds each key's SHA-256 digest and an id, never the
//! key. A presented key (`authorization: Bearer <key>`) is hashed and its
//! digest compared with every configured digest in constant time; the
//! matching id travels with the request (a [`ClientKeyId`] extension) into
//! the request log. With no keys configured every request passes, as before
//! keys existed. Keys are random and long (`hash-key --new` makes 256-bit
//! ones), so a fast digest is enough: there is nothing to brute-force.

use std::sync::Arc;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ApiKeySpec;

/// The id of the key a request came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKeyId(pub String);

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer <key>` was sent.
    #[error("this server needs a client API key: send `authorization: Bearer <key>`")]
    Missing,
    /// The key matches no configured key.
    #[error("the client API key is not valid")]
    Wrong,
}

/// The configured keys.
#[derive(Debug, Default)]
pub struct ApiKeys {
    keys: Vec<(String, [u8; 32])>,
}

impl ApiKeys {
    /// The keys of the configuration (already checked by `Config::load`;
    /// an entry whose digest is not hex matches nothing).
    pub fn new(specs: &[ApiKeySpec]) -> Arc<Self> {
        let keys = specs
            .iter()
            .filter_map(|s| Some((s.id.clone(), parse_hex(&s.sha256)?)))
            .collect();
        Arc::new(Self { keys })
    }

    /// Whether any key is configured (otherwise everything passes).
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Check an `authorization` header value: `Ok(None)` when keys are off,
    /// the key's id when it matches.
    ///
    /// # Errors
    /// [`AuthError::Missing`] without a bearer key, [`AuthError::Wrong`] for
    /// a key that matches none.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Option<ClientKeyId>, AuthError> {
        if !self.enabled() {
            return Ok(None);
        }
        let key = authorization.and_then(bearer).ok_or(AuthError::Missing)?;
        let digest: [u8; 32] = Sha256::digest(key).into();
        // Compare with every key, whatever matched, so the time taken does
        // not tell which key (or how much of a digest) matched.
        let mut found = None;
        for (id, expected) in &self.keys {
            if bool::from(expected.ct_eq(&digest)) {
                found = Some(id);
            }
        }
        found.map(|id| Some(ClientKeyId(id.clone()))).ok_or(AuthError::Wrong)
    }
}

/// The key of `Bearer <key>` (scheme in any case).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty()).then_some(key)
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// The hex SHA-256 digest of `key`, as the configuration stores it.
pub fn digest_hex(key: &str) -> String {
    Sha256::digest(key.trim().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random key: `fw-` and 256 random bits in hex.
pub fn new_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("fw-{hex}")
}

/// The gRPC side: an interceptor on Chat, Router and Feedback that refuses
/// unauthenticated calls with `UNAUTHENTICATED` and passes the key's id on.
#[derive(Clone)]
pub struct GrpcAuth(pub Arc<ApiKeys>);

impl tonic::service::Interceptor for GrpcAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let header = request.metadata().get("authorization").map(|v| v.as_bytes());
        match self.0.authenticate(header) {
            Ok(Some(id)) => {
                request.extensions_mut().insert(id);
                Ok(request)
            }
            Ok(None) => Ok(request),
            Err(e) => {
                crate::telemetry::record_status(tonic::Code::Unauthenticated);
                Err(tonic::Status::unauthenticated(e.to_string()))
            }
        }
    }
}

/// The key id a gRPC request was authenticated with, if any.
pub fn grpc_key_id<T>(request: &tonic::Request<T>) -> Option<String> {
    request.extensions().get::<ClientKeyId>().map(|k| k.0.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Arc<ApiKeys> {
        ApiKeys::new(&[
            ApiKeySpec {
                id: "webui".into(),
                sha256: digest_hex("fw-one"),
            },
            ApiKeySpec {
                id: "batch".into(),
                sha256: digest_hex("fw-two"),
            },
        ])
    }

    #[test]
    fn a_configured_key_authenticates_as_its_id_and_others_are_refused() {
        let k = keys();
        assert_eq!(
            k.authenticate(Some(b"Bearer fw-two")),
            Ok(Some(ClientKeyId("batch".into())))
        );
        assert_eq!(
            k.authenticate(Some(b"bearer  fw-one ")),
            Ok(Some(ClientKeyId("webui".into())))
        );
        assert_eq!(k.authenticate(Some(b"Bearer fw-three")), Err(AuthError::Wrong));
        assert_eq!(k.authenticate(None), Err(AuthError::Missing));
        assert_eq!(k.authenticate(Some(b"Basic fw-one")), Err(AuthError::Missing));
        assert_eq!(k.authenticate(Some(b"Bearer ")), Err(AuthError::Missing));
        // The digest, presented as a key, is not the key.
        let digest = digest_hex("fw-one");
        assert_eq!(
            k.authenticate(Some(format!("Bearer {digest}").as_bytes())),
            Err(AuthError::Wrong)
        );
    }

    #[test]
    fn without_keys_everything_passes_and_new_keys_differ() {
        assert_eq!(ApiKeys::new(&[]).authenticate(None), Ok(None));
        let (a, b) = (new_key(), new_key());
        assert!(a.starts_with("fw-") && a.len() == 67 && a != b);
        assert_eq!(digest_hex("abc").len(), 64);
        // SHA-256("abc"), the FIPS 180-2 test vector.
        assert_eq!(
            digest_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
