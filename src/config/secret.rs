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

/// `url` as it may be shown: the password of its user-info and the value of every query
/// parameter whose name says it is a secret (`password`, `token`, `secret` anywhere in the name,
/// any case: `sentinelPassword`, `auth_token`, `clientSecret`) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // `set_password` only fails for URLs that cannot have one, which we just saw
                // has one.
                let _ = parsed.set_password(Some("***"));
            }
            let pairs: Vec<(String, String)> = parsed
                .query_pairs()
                .map(|(name, value)| {
                    let value = if names_a_secret(&name) {
                        "***".to_owned()
                    } else {
                        value.into_owned()
                    };
                    (name.into_owned(), value)
                })
                .collect();
            if pairs.iter().any(|(_, value)| value == "***") {
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        // Unparseable: we cannot tell where a password would be, so show nothing of it.
        Err(_) => "<unparseable url>".to_owned(),
    }
}

/// Whether a query parameter's name says its value is a secret.
fn names_a_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "passwd", "token", "secret"]
        .iter()
        .any(|word| name.contains(word))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_passwords_and_secret_query_parameters_are_redacted() {
        let url = "redis-sentinel://user:hunter2@s1:26379/0?sentinelServiceName=mymaster&sentinelUsername=admin&sentinelPassword=s3cr3t&node=s2:26379";
        let shown = redact_url(url);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("user:***@"), "{shown}");
        assert!(shown.contains("sentinelPassword=***"), "{shown}");
        // What is not secret stays readable.
        assert!(shown.contains("sentinelServiceName=mymaster"), "{shown}");
        assert!(shown.contains("sentinelUsername=admin"), "{shown}");
        assert!(
            shown.contains("node=s2%3A26379") || shown.contains("node=s2:26379"),
            "{shown}"
        );

        for (url, secret) in [
            (
                "mysql://u@db/x?ssl-mode=REQUIRED&auth_token=abc123",
                "abc123",
            ),
            (
                "rediss://r:6380?clientSecret=zzz999&Password=p4ss",
                "zzz999",
            ),
            ("rediss://r:6380?clientSecret=zzz999&Password=p4ss", "p4ss"),
            ("redis://:only-password@r:6379", "only-password"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert_eq!(redact_url("redis://r:6379/0"), "redis://r:6379/0");
        assert_eq!(redact_url("not a url"), "<unparseable url>");
    }

    #[test]
    fn debug_and_display_of_a_secret_url_go_through_the_redaction() {
        let url = SecretUrl::new("redis-sentinel://s1:26379?sentinelPassword=s3cr3t");
        assert!(!format!("{url:?} {url}").contains("s3cr3t"));
        assert_eq!(
            url.expose(),
            "redis-sentinel://s1:26379?sentinelPassword=s3cr3t"
        );
    }
}
