//! Identifiers that travel through URLs, Redis keys and frames: user, room and node ids.
//!
//! All share one alphabet (`[A-Za-z0-9_.-]`, 1–64 bytes, not `.` or `..`), so they can be
//! embedded in key names and paths without escaping, and in JSON without escaping either.

use std::sync::Arc;

/// Longest accepted id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Whether `id` is an acceptable user or node id.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Defines a validated id type, cheap to clone (shared between the hub, sessions and the bus).
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `id`; `None` when it is not an acceptable id.
            pub fn parse(id: &str) -> Option<Self> {
                is_valid_id(id).then(|| Self(Arc::from(id)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }
    };
}

id_type!(
    /// A validated user id.
    UserId
);

id_type!(
    /// A validated room id (the same alphabet as user ids).
    RoomId
);

/// A fresh random node id (`n-` and 12 hex digits), used when `--node-id` is not given.
pub fn random_node_id() -> String {
    format!("n-{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for id in ["a", "A_b-c.d", "0", "...", "a..b", &"x".repeat(64)] {
            assert!(is_valid_id(id), "{id:?} should be valid");
        }
    }

    #[test]
    fn refuses_everything_else() {
        for id in [
            "",
            ".",
            "..",
            "a b",
            "a/b",
            "é",
            "a:b",
            "{a}",
            &"x".repeat(65),
        ] {
            assert!(!is_valid_id(id), "{id:?} should be invalid");
        }
    }

    #[test]
    fn random_node_ids_are_valid_and_differ() {
        let (a, b) = (random_node_id(), random_node_id());
        assert!(is_valid_id(&a) && is_valid_id(&b));
        assert_ne!(a, b);
    }
}
