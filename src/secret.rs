//! Secret values: newtypes that never print themselves, and the `env:`/`file:` indirection used by
//! the configuration.
//!
//! Tokens, the client secret, session keys, session ids and authorization codes are all held in
//! [`Secret`] so that no `Debug`/`Display` (and therefore no log line) can leak one by accident.

use std::fmt;

/// A value that must never be logged. Read it through [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T = String>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The wrapped value. Every call site is a place where a secret leaves its box: keep them few.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T: serde::Serialize> serde::Serialize for Secret<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Secret<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Secret)
    }
}

/// Compares two byte strings in constant time (with respect to their contents).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// Resolves a configured secret: `env:NAME` reads the environment, `file:PATH` reads a file (trimmed),
/// anything else is the value itself. The error says what is missing without echoing any value.
pub fn resolve(raw: &str) -> Result<Secret, String> {
    if let Some(name) = raw.strip_prefix("env:") {
        match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => Ok(Secret(v.trim().to_owned())),
            Ok(_) => Err(format!("environment variable {name} is empty")),
            Err(_) => Err(format!("environment variable {name} is not set")),
        }
    } else if let Some(path) = raw.strip_prefix("file:") {
        match std::fs::read_to_string(path) {
            Ok(v) if !v.trim().is_empty() => Ok(Secret(v.trim().to_owned())),
            Ok(_) => Err(format!("file {path} is empty")),
            Err(e) => Err(format!("cannot read file {path}: {e}")),
        }
    } else if raw.is_empty() {
        Err("is empty".to_owned())
    } else {
        Ok(Secret(raw.to_owned()))
    }
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) {
    // aws-lc's RNG only fails if the OS entropy source is gone, after which nothing secure can be
    // done: failing closed (abort the request) is the right answer, and it cannot happen on Linux.
    aws_lc_rs::rand::fill(buf).expect("operating system random source failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_print_redacted() {
        let s = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn env_and_file_indirection_resolve() {
        // SAFETY of the test: the variable name is unique to this test.
        let dir = std::env::temp_dir().join(format!("coatcheck-secret-{}", std::process::id()));
        std::fs::write(&dir, "  from-file\n").unwrap();
        assert_eq!(
            resolve(&format!("file:{}", dir.display()))
                .unwrap()
                .expose(),
            "from-file"
        );
        assert!(
            resolve("env:COATCHECK_TEST_SURELY_UNSET_VAR")
                .unwrap_err()
                .contains("not set")
        );
        assert_eq!(resolve("inline").unwrap().expose(), "inline");
        std::fs::remove_file(dir).ok();
    }

    #[test]
    fn constant_time_eq_compares_contents() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
