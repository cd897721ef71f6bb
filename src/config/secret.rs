//! Connection URLs whose secrets never reach a log line or `check-config`'s output.
//!
//! [`redact_url`] is the one place that decides what of a URL is secret; [`SecretUrl`]'s
//! `Debug`, `Display` and `Serialize` all go through it, and the only way to the real string is
//! [`SecretUrl::expose`], used where a client is built.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A connection URL; shown only through [`redact_url`].
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The real URL, password included: only for building a client.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its secrets replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// Replaces the URL with the environment variable `name` when it is set and not empty;
    /// returns `" (from NAME)"` for messages about the value then, or `""`.
    pub(crate) fn override_from(
        &mut self,
        name: &str,
        env: &impl Fn(&str) -> Option<String>,
    ) -> String {
        match env(name).filter(|v| !v.is_empty()) {
            Some(value) => {
                self.0 = value;
                format!(" (from {name})")
            }
            None => String::new(),
        }
    }
}

/// `url` as it may be shown: its password (if any) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // `set_password` only fails for URLs that cannot have one, which we just saw
                // has one.
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        // Unparseable: we cannot tell where a password would be, so show nothing of it.
        Err(_) => "<unparseable url>".to_owned(),
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Serialized redacted: what `check-config` prints.
impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// Checks a URL (after its environment override) against the schemes the client takes.
pub(crate) fn check_url(
    url: &SecretUrl,
    key: &str,
    origin: &str,
    schemes: &[&str],
    problems: &mut super::read::Problems,
) {
    match url::Url::parse(url.expose()) {
        // The url crate's messages never echo the input, so no password leaks here.
        Err(e) => problems.push(key, format!("not a valid URL{origin}: {e}")),
        Ok(parsed) if !schemes.contains(&parsed.scheme()) => problems.push(
            key,
            format!(
                "unsupported scheme `{}`{origin}; expected one of: {}",
                parsed.scheme(),
                schemes.join(", ")
            ),
        ),
        Ok(_) => {}
    }
}
