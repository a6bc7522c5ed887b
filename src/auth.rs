//! Authentication: signed tokens (JWT) checked before the WebSocket upgrade.
//!
//! A token comes as `?token=` (browsers cannot set headers on a WebSocket) or as
//! `Authorization: Bearer` (the scheme in any case, RFC 7235). Its `sub` must equal the user id
//! in the path, `exp` must be in the future and `nbf`, if given, in the past. HS256 uses a shared secret; RS256 and ES256 use a public key file (PEM).
//! Tokens are never logged.
//!
//! Two optional claims decide rooms (see `--room-access`): `rooms`, the rooms a client may
//! join itself (ids and prefix patterns ending in `*`), and `join`, the rooms the session
//! is put in at connect. A checked token yields a [`Grant`]: what the session may do, and
//! until when (`exp`). This module sits below both the edge (connect) and the session
//! (`refresh`).

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The claims wsbus reads and `wsbus token` writes.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    #[serde(default)]
    pub iat: u64,
    /// Not before, seconds since the epoch: a token is refused until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Rooms the client may join (`--room-access token`): ids, and prefixes ending in `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    /// Rooms the session joins at connect, before the client's first frame (any mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub join: Vec<String>,
}

/// What a checked token grants a session: until when, which rooms the client may join,
/// which it is put in at connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// The token's `exp` (seconds since the epoch); `None` without a token (`--insecure`).
    pub exp: Option<u64>,
    /// The `rooms` claim.
    pub rooms: RoomPatterns,
    /// The `join` claim.
    pub join: Vec<String>,
}

/// A `rooms` claim: room ids, and prefixes (a pattern ending in `*`). No claim allows none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomPatterns(Vec<String>);

impl RoomPatterns {
    /// The patterns of a claim.
    pub fn new(patterns: Vec<String>) -> Self {
        Self(patterns)
    }

    /// Whether `room` is one of the ids or starts with one of the prefixes.
    pub fn allows(&self, room: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => room.starts_with(prefix),
            None => p == room,
        })
    }
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
    /// `nbf` is still ahead.
    #[error("token not yet valid")]
    NotYetValid,
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
    /// An HS256 secret shorter than the hash output, which RFC 7518 §3.2 forbids (an empty
    /// one would let anyone who guesses it mint tokens).
    #[error(
        "the HS256 secret (WSBUS_JWT_SECRET / --jwt-secret) is {0} bytes; it must be at least \
         {MIN_HS256_SECRET_BYTES} (RFC 7518 §3.2), e.g. `openssl rand -hex 32`"
    )]
    ShortSecret(usize),
    /// Both a secret and a public key, or `--insecure` with either.
    #[error("{0}")]
    Conflict(&'static str),
    /// No JWT setting and no `--insecure`.
    #[error(
        "refusing to start without authentication: set WSBUS_JWT_SECRET or \
         --jwt-public-key, or pass --insecure to accept anyone"
    )]
    Missing,
}

/// The shortest HS256 secret accepted: the size of the SHA-256 output (RFC 7518 §3.2).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Refuses an HS256 secret shorter than [`MIN_HS256_SECRET_BYTES`].
pub fn check_hs256_secret(secret: &[u8]) -> Result<(), AuthConfigError> {
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(AuthConfigError::ShortSecret(secret.len()));
    }
    Ok(())
}

/// The token checks a node's settings ask for: `None` when it runs `--insecure`.
///
/// Exactly one of a secret, a public key or `--insecure` must be given: `--insecure` beside
/// a JWT setting is refused rather than silently ignored, so an operator never believes a
/// node checks tokens when it does not (or the reverse).
pub fn from_config(
    config: &crate::config::NodeConfig,
) -> Result<Option<Verifier>, AuthConfigError> {
    match (&config.jwt_secret, &config.jwt_public_key, config.insecure) {
        (Some(_), Some(_), _) => Err(AuthConfigError::Conflict(
            "give either --jwt-secret or --jwt-public-key, not both",
        )),
        (Some(_), None, true) => Err(AuthConfigError::Conflict(
            "--insecure contradicts WSBUS_JWT_SECRET (--jwt-secret): drop --insecure \
             (WSBUS_INSECURE) to require tokens, or drop the secret to accept anyone",
        )),
        (None, Some(_), true) => Err(AuthConfigError::Conflict(
            "--insecure contradicts --jwt-public-key (WSBUS_JWT_PUBLIC_KEY): drop --insecure \
             (WSBUS_INSECURE) to require tokens, or drop the key to accept anyone",
        )),
        (Some(secret), None, false) => Verifier::hs256(secret.as_bytes()).map(Some),
        (None, Some(path), false) => Verifier::from_public_key_file(path).map(Some),
        (None, None, true) => Ok(None),
        (None, None, false) => Err(AuthConfigError::Missing),
    }
}

/// Checks tokens for one node.
pub struct Verifier {
    key: DecodingKey,
    algorithm: Algorithm,
}

impl Verifier {
    /// HS256 with a shared secret of at least [`MIN_HS256_SECRET_BYTES`].
    pub fn hs256(secret: &[u8]) -> Result<Self, AuthConfigError> {
        check_hs256_secret(secret)?;
        Ok(Self {
            key: DecodingKey::from_secret(secret),
            algorithm: Algorithm::HS256,
        })
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

    /// Checks that `token` is valid, unexpired and for `user`; returns what it grants.
    pub fn verify(&self, token: &str, user: &str) -> Result<Grant, AuthError> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = 5;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &validation).map_err(|e| {
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid,
            }
        })?;
        if data.claims.sub != user {
            return Err(AuthError::WrongUser);
        }
        let claims = data.claims;
        Ok(Grant {
            exp: Some(claims.exp),
            rooms: RoomPatterns::new(claims.rooms.unwrap_or_default()),
            join: claims.join,
        })
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
        let (scheme, token) = authorization?.trim_start().split_once([' ', '\t'])?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    })
}

/// Mints a token for `user` valid for `ttl_secs`: HS256 with `secret` (at least
/// [`MIN_HS256_SECRET_BYTES`]), or RS256/ES256 with a private key PEM (`wsbus token`).
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
        ..Claims::default()
    };
    mint_claims(&claims, secret, private_key_pem)
}

/// Signs `claims` like [`mint`] (for tokens with `rooms` and `join`).
pub fn mint_claims(
    claims: &Claims,
    secret: Option<&[u8]>,
    private_key_pem: Option<&[u8]>,
) -> Result<String, String> {
    let (algorithm, key) = match (secret, private_key_pem) {
        (Some(secret), None) => {
            check_hs256_secret(secret).map_err(|e| e.to_string())?;
            (Algorithm::HS256, EncodingKey::from_secret(secret))
        }
        (None, Some(pem)) => match EncodingKey::from_rsa_pem(pem) {
            Ok(key) => (Algorithm::RS256, key),
            Err(_) => (
                Algorithm::ES256,
                EncodingKey::from_ec_pem(pem).map_err(|e| format!("private key: {e}"))?,
            ),
        },
        _ => return Err("give exactly one of a secret or a private key".to_owned()),
    };
    jsonwebtoken::encode(&Header::new(algorithm), claims, &key).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn hs256_round_trip_and_refusals() {
        let v = Verifier::hs256(SECRET).unwrap();
        let token = mint("alice", 60, Some(SECRET), None).unwrap();
        assert!(v.verify(&token, "alice").is_ok());
        assert_eq!(v.verify(&token, "bob"), Err(AuthError::WrongUser));
        let forged = mint(
            "alice",
            60,
            Some(b"another secret of at least 32 bytes"),
            None,
        )
        .unwrap();
        assert_eq!(v.verify(&forged, "alice"), Err(AuthError::Invalid));
        assert_eq!(v.verify("not.a.token", "alice"), Err(AuthError::Invalid));
        let claims = Claims {
            sub: "alice".into(),
            exp: jsonwebtoken::get_current_timestamp() - 120,
            ..Claims::default()
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(v.verify(&expired, "alice"), Err(AuthError::Expired));
        let now = jsonwebtoken::get_current_timestamp();
        let with_nbf = |nbf| {
            let claims = Claims {
                sub: "alice".into(),
                exp: now + 7200,
                iat: now,
                nbf: Some(nbf),
                ..Claims::default()
            };
            let key = EncodingKey::from_secret(SECRET);
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
        };
        assert_eq!(
            v.verify(&with_nbf(now + 3600), "alice"),
            Err(AuthError::NotYetValid),
            "valid from an hour ahead"
        );
        assert!(v.verify(&with_nbf(now - 1), "alice").is_ok());
    }

    #[test]
    fn room_claims_are_ids_and_prefixes() {
        let v = Verifier::hs256(SECRET).unwrap();
        let claims = Claims {
            sub: "alice".into(),
            exp: jsonwebtoken::get_current_timestamp() + 60,
            rooms: Some(vec!["lobby".into(), "team-42-*".into()]),
            join: vec!["news".into()],
            ..Claims::default()
        };
        let token = mint_claims(&claims, Some(SECRET), None).unwrap();
        let grant = v.verify(&token, "alice").unwrap();
        assert_eq!(grant.exp, Some(claims.exp));
        assert_eq!(grant.join, ["news"]);
        for (room, allowed) in [
            ("lobby", true),
            ("lobby2", false),
            ("team-42-", true),
            ("team-42-ops", true),
            ("team-4", false),
            ("team-43-ops", false),
        ] {
            assert_eq!(grant.rooms.allows(room), allowed, "{room}");
        }
        let bare = mint("alice", 60, Some(SECRET), None).unwrap();
        assert!(!v.verify(&bare, "alice").unwrap().rooms.allows("lobby"));
        assert!(RoomPatterns::new(vec!["*".into()]).allows("anything"));
    }

    #[test]
    fn short_hs256_secrets_are_refused() {
        for short in [&b""[..], b"s3cret", &SECRET[..31]] {
            assert!(matches!(
                Verifier::hs256(short),
                Err(AuthConfigError::ShortSecret(n)) if n == short.len()
            ));
            assert!(mint("alice", 60, Some(short), None).is_err());
        }
        assert!(Verifier::hs256(SECRET).is_ok());
    }

    #[test]
    fn insecure_beside_a_jwt_setting_is_refused() {
        let mut c = crate::config::NodeConfig::new("n", "redis://127.0.0.1:1");
        c.jwt_secret = Some(String::from_utf8(SECRET.to_vec()).unwrap());
        let e = from_config(&c).err().unwrap().to_string();
        assert!(e.contains("drop --insecure"), "{e}");
        c.jwt_secret = None;
        c.jwt_public_key = Some("key.pub".into());
        let e = from_config(&c).err().unwrap().to_string();
        assert!(e.contains("drop --insecure"), "{e}");
        c.insecure = false;
        c.jwt_public_key = None;
        assert!(matches!(from_config(&c), Err(AuthConfigError::Missing)));
        c.insecure = true;
        assert!(matches!(from_config(&c), Ok(None)));
    }

    #[test]
    fn finds_the_token_in_query_or_header() {
        assert_eq!(token_from(Some("a=1&token=abc"), None), Some("abc"));
        assert_eq!(token_from(Some("token="), Some("Bearer xyz")), Some("xyz"));
        assert_eq!(token_from(None, Some("Basic xyz")), None);
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let header = format!("{scheme} xyz");
            assert_eq!(token_from(None, Some(&header)), Some("xyz"), "{scheme}");
        }
        assert_eq!(token_from(None, Some("Bearer  xyz ")), Some("xyz"));
        assert_eq!(token_from(None, Some("Bearerxyz")), None);
        assert_eq!(token_from(None, Some("Bearer ")), None);
        assert_eq!(token_from(None, None), None);
    }
}
