//! Authentication: signed tokens (JWT) checked before the WebSocket upgrade.
//!
//! A token comes as `?token=` (browsers cannot set headers on a WebSocket) or as
//! `Authorization: Bearer`. Its `sub` must equal the user id in the path and `exp` must be in
//! the future. HS256 uses a shared secret; RS256 and ES256 use a public key file (PEM).
//! Tokens are never logged.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The claims wsbus reads and `wsbus token` writes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    #[serde(default)]
    pub iat: u64,
}

/// Why a connection was refused (HTTP 401); the texts are the response bodies.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No token in the query or the `Authorization` header.
    #[error("missing token")]
    Missing,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `sub` is not the user id in the path.
    #[error("token is for another user")]
    WrongUser,
    /// Bad signature, algorithm, encoding or claims.
    #[error("invalid token")]
    Invalid,
}

/// Why the authentication settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// The key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The key is neither an RSA nor an EC public key in PEM.
    #[error("{0}: not an RSA or EC (P-256) key in PEM format")]
    Key(String),
}

/// Checks tokens for one node.
pub struct Verifier {
    key: DecodingKey,
    algorithm: Algorithm,
}

impl Verifier {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8]) -> Self {
        Self {
            key: DecodingKey::from_secret(secret),
            algorithm: Algorithm::HS256,
        }
    }

    /// RS256 or ES256, by the kind of public key in the PEM file at `path`.
    pub fn from_public_key_file(path: &Path) -> Result<Self, AuthConfigError> {
        let pem = std::fs::read(path).map_err(|source| AuthConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
            return Ok(Self {
                key,
                algorithm: Algorithm::RS256,
            });
        }
        DecodingKey::from_ec_pem(&pem)
            .map(|key| Self {
                key,
                algorithm: Algorithm::ES256,
            })
            .map_err(|_| AuthConfigError::Key(path.display().to_string()))
    }

    /// The algorithm tokens must use.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Checks that `token` is valid, unexpired and for `user`.
    pub fn verify(&self, token: &str, user: &str) -> Result<(), AuthError> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = 5;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &validation).map_err(|e| {
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid,
            }
        })?;
        if data.claims.sub != user {
            return Err(AuthError::WrongUser);
        }
        Ok(())
    }
}

/// The token of a request: `?token=` first, then `Authorization: Bearer`.
pub fn token_from<'a>(query: Option<&'a str>, authorization: Option<&'a str>) -> Option<&'a str> {
    let from_query = query.and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .filter(|t| !t.is_empty())
    });
    from_query.or_else(|| {
        authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
    })
}

/// Mints a token for `user` valid for `ttl_secs`: HS256 with `secret`, or RS256/ES256 with a
/// private key PEM (`wsbus token`).
pub fn mint(
    user: &str,
    ttl_secs: u64,
    secret: Option<&[u8]>,
    private_key_pem: Option<&[u8]>,
) -> Result<String, String> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: user.to_owned(),
        exp: now + ttl_secs,
        iat: now,
    };
    let (algorithm, key) = match (secret, private_key_pem) {
        (Some(secret), None) => (Algorithm::HS256, EncodingKey::from_secret(secret)),
        (None, Some(pem)) => match EncodingKey::from_rsa_pem(pem) {
            Ok(key) => (Algorithm::RS256, key),
            Err(_) => (
                Algorithm::ES256,
                EncodingKey::from_ec_pem(pem).map_err(|e| format!("private key: {e}"))?,
            ),
        },
        _ => return Err("give exactly one of a secret or a private key".to_owned()),
    };
    jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hs256_round_trip_and_refusals() {
        let v = Verifier::hs256(b"s3cret");
        let token = mint("alice", 60, Some(b"s3cret"), None).unwrap();
        assert_eq!(v.verify(&token, "alice"), Ok(()));
        assert_eq!(v.verify(&token, "bob"), Err(AuthError::WrongUser));
        let forged = mint("alice", 60, Some(b"other"), None).unwrap();
        assert_eq!(v.verify(&forged, "alice"), Err(AuthError::Invalid));
        assert_eq!(v.verify("not.a.token", "alice"), Err(AuthError::Invalid));
        let claims = Claims {
            sub: "alice".into(),
            exp: jsonwebtoken::get_current_timestamp() - 120,
            iat: 0,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert_eq!(v.verify(&expired, "alice"), Err(AuthError::Expired));
    }

    #[test]
    fn finds_the_token_in_query_or_header() {
        assert_eq!(token_from(Some("a=1&token=abc"), None), Some("abc"));
        assert_eq!(token_from(Some("token="), Some("Bearer xyz")), Some("xyz"));
        assert_eq!(token_from(None, Some("Basic xyz")), None);
        assert_eq!(token_from(None, None), None);
    }
}
