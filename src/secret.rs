//! The one type for secret strings (API keys, tokens, consumer secrets).
//!
//! A [`Secret`] never prints its value: `Debug`, `Display` and `Serialize`
//! show `****` followed by at most the last four characters (none when the
//! value is shorter than 12, so short secrets are not half-revealed). The
//! value is zeroed when dropped. The only way to read it is [`Secret::expose`],
//! which makes every use greppable.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use zeroize::Zeroize;

/// A string that must never reach logs, status, errors or argv.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The plain value, for signing and for the wire. Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `****` plus the last four characters when the secret is long enough
    /// that four characters reveal little.
    pub fn redacted(&self) -> String {
        let n = self.0.chars().count();
        if n >= 12 {
            let tail: String = self.0.chars().skip(n - 4).collect();
            format!("****{tail}")
        } else {
            "****".to_string()
        }
    }

    /// True when the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.redacted())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for Secret {
    /// Serializes redacted: a secret never leaves the process through serde.
    /// The store persists secrets through [`Secret::expose`] explicitly.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Serde helpers for the few places (the state directory) that must persist
/// the real value: `#[serde(with = "crate::secret::plain")]`.
pub mod plain {
    use super::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Secret, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.expose())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("abcdefghijklmnopWXYZ");
        assert_eq!(format!("{s}"), "****WXYZ");
        assert_eq!(format!("{s:?}"), "Secret(****WXYZ)");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"****WXYZ\"");
        let short = Secret::new("hunter2");
        assert_eq!(format!("{short}"), "****");
        assert_eq!(short.expose(), "hunter2");
    }
}
