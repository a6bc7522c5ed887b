//! `--jwt-secret`: an HS256 token per simulated user, minted as a backend would, so every
//! scenario runs against nodes that check tokens (started with `--jwt-secret`, not
//! `--insecure`). Claims: `sub` (the user id), `iat`, `exp` one hour ahead, and `rooms`: what
//! the scenario joins (its room ids' pattern, `["<run prefix>-r*"]`, or `[]` when it joins
//! none), for nodes that check a `rooms` claim (issue 21). A token is minted at each connect,
//! so a reconnect late in a long run still carries a fresh one.

use std::sync::Arc;

use anyhow::{Result, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// The shortest secret wsbus accepts for HS256 (RFC 7518 §3.2: the hash output's size).
const MIN_SECRET_BYTES: usize = 32;

/// How long a minted token is valid.
const TTL_SECS: u64 = 3600;

/// Mints the tokens of one run.
pub(crate) struct Minter {
    key: EncodingKey,
    /// The `rooms` claim of every token of the run.
    rooms: Vec<String>,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    rooms: &'a [String],
}

impl Minter {
    /// The minter of a run that joins `rooms` (ids or prefix patterns ending in `*`), when
    /// `secret` is given.
    pub(crate) fn for_run(secret: Option<&str>, rooms: Vec<String>) -> Option<Arc<Self>> {
        secret.map(|s| {
            Arc::new(Self {
                key: EncodingKey::from_secret(s.as_bytes()),
                rooms,
            })
        })
    }

    /// A token for `user`, valid for an hour from now.
    pub(crate) fn token(&self, user: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = Claims {
            sub: user,
            iat: now,
            exp: now + TTL_SECS,
            rooms: &self.rooms,
        };
        // HS256 over serialisable claims with an HMAC key cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .expect("HS256 encoding of plain claims")
    }
}

/// Refuses a secret the nodes would refuse too, before anything connects.
pub(crate) fn check_secret(secret: &str) -> Result<()> {
    if secret.len() < MIN_SECRET_BYTES {
        bail!(
            "--jwt-secret is {} bytes; wsbus needs at least {MIN_SECRET_BYTES} (RFC 7518 §3.2)",
            secret.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn tokens_carry_user_expiry_and_rooms() {
        let secret = "0123456789abcdef0123456789abcdef";
        let m = Minter::for_run(Some(secret), vec!["ltabc-r*".to_owned()]).unwrap();
        let t = m.token("ltabc-7");
        let mut v = Validation::new(Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &DecodingKey::from_secret(secret.as_bytes()),
            &v,
        )
        .unwrap();
        let c = data.claims;
        assert_eq!(c["sub"], "ltabc-7");
        assert_eq!(c["rooms"], serde_json::json!(["ltabc-r*"]));
        let ttl = c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap();
        assert_eq!(ttl, TTL_SECS);
        assert!(Minter::for_run(None, Vec::new()).is_none());
        assert!(check_secret("short").is_err());
        assert!(check_secret(secret).is_ok());
    }
}
