//! What a shop connection is: its name, platform, URL, store views, auth mode
//! and credentials, and the validation every one of them passes before it is
//! stored. Persisted in the `shops` tree by the registry.

use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use thiserror::Error;

/// Magento 1.x (XML-RPC) or 2.x (REST).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Magento 1.x, over its XML-RPC API (an API user and key).
    Magento1,
    /// Magento 2.x, over its REST API (an integration's OAuth keys or token).
    Magento2,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Platform::Magento1 => "magento1",
            Platform::Magento2 => "magento2",
        })
    }
}

/// How Magento 2 requests are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// OAuth 1.0a, HMAC-SHA256 (the default since Magento 2.4.4).
    #[default]
    Oauth,
    /// `Authorization: Bearer <access token>` (needs the shop's
    /// `enable_integration_as_bearer`).
    Bearer,
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMode::Oauth => "oauth",
            AuthMode::Bearer => "bearer",
        })
    }
}

/// Credentials as stored. Serialized with the plain values (the state
/// directory is 0700); everything else sees [`Credentials::redacted`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Credentials {
    /// Magento 2 integration, OAuth 1.0a.
    M2Oauth {
        #[serde(with = "crate::secret::plain")]
        consumer_key: Secret,
        #[serde(with = "crate::secret::plain")]
        consumer_secret: Secret,
        #[serde(with = "crate::secret::plain")]
        access_token: Secret,
        #[serde(with = "crate::secret::plain")]
        access_token_secret: Secret,
    },
    /// Magento 2 integration token used as a bearer token.
    M2Bearer {
        #[serde(with = "crate::secret::plain")]
        access_token: Secret,
    },
    /// Magento 1 SOAP/XML-RPC API user.
    M1 {
        api_user: String,
        #[serde(with = "crate::secret::plain")]
        api_key: Secret,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

impl Credentials {
    /// A JSON view safe to show: secrets as `****abcd`.
    pub fn redacted(&self) -> serde_json::Value {
        match self {
            Credentials::M2Oauth {
                consumer_key,
                consumer_secret,
                access_token,
                access_token_secret,
            } => serde_json::json!({
                "consumer_key": consumer_key.redacted(),
                "consumer_secret": consumer_secret.redacted(),
                "access_token": access_token.redacted(),
                "access_token_secret": access_token_secret.redacted(),
            }),
            Credentials::M2Bearer { access_token } => {
                serde_json::json!({ "access_token": access_token.redacted() })
            }
            Credentials::M1 { api_user, api_key } => {
                serde_json::json!({ "api_user": api_user, "api_key": api_key.redacted() })
            }
        }
    }

    /// Every secret value, so tests and log scrubbing can look for them.
    pub fn secrets(&self) -> Vec<&Secret> {
        match self {
            Credentials::M2Oauth {
                consumer_key,
                consumer_secret,
                access_token,
                access_token_secret,
            } => vec![
                consumer_key,
                consumer_secret,
                access_token,
                access_token_secret,
            ],
            Credentials::M2Bearer { access_token } => vec![access_token],
            Credentials::M1 { api_key, .. } => vec![api_key],
        }
    }

    /// Parses a credentials file (TOML) for the given platform and auth mode.
    /// Refuses unknown keys, missing or empty values, and values with leading
    /// or trailing white space (the classic copy-paste error).
    pub fn parse_toml(
        text: &str,
        platform: Platform,
        auth: AuthMode,
    ) -> Result<Credentials, ValidationError> {
        const MAX: usize = 16 * 1024;
        if text.len() > MAX {
            return Err(ValidationError::new(
                "size",
                format!("{} bytes; at most {MAX} are read", text.len()),
            ));
        }
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            // The place, as `line L, column C`, stands where a key would.
            let at = e.span().map_or_else(
                || "toml".to_string(),
                |span| {
                    let before = &text.as_bytes()[..span.start.min(text.len())];
                    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
                    let column = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
                    format!("line {line}, column {column}")
                },
            );
            ValidationError::new(
                at,
                format!(
                    "not valid TOML: {} (each line is key = \"value\")",
                    e.message().trim()
                ),
            )
        })?;
        Self::from_table(&table, platform, auth)
    }

    /// Builds credentials from key/value pairs (a parsed TOML file, or the
    /// JSON object the control socket receives), with the same checks.
    pub fn from_table(
        table: &toml::Table,
        platform: Platform,
        auth: AuthMode,
    ) -> Result<Credentials, ValidationError> {
        let expected: &[&str] = match (platform, auth) {
            (Platform::Magento1, _) => &["api_user", "api_key"],
            (Platform::Magento2, AuthMode::Oauth) => &[
                "consumer_key",
                "consumer_secret",
                "access_token",
                "access_token_secret",
            ],
            (Platform::Magento2, AuthMode::Bearer) => &["access_token"],
        };
        for key in table.keys() {
            if !expected.contains(&key.as_str()) {
                return Err(ValidationError::new(
                    key,
                    format!(
                        "unknown key for {platform} with --auth {auth}; expected {}",
                        expected.join(", ")
                    ),
                ));
            }
        }
        let get = |key: &str| -> Result<String, ValidationError> {
            let v = table.get(key).ok_or_else(|| {
                ValidationError::new(key, "missing: add it to the credentials file")
            })?;
            let s = v.as_str().ok_or_else(|| {
                ValidationError::new(key, "must be a string: put the value in quotes")
            })?;
            check_value(key, s)?;
            Ok(s.to_string())
        };
        Ok(match (platform, auth) {
            (Platform::Magento1, _) => Credentials::M1 {
                api_user: get("api_user")?,
                api_key: Secret::new(get("api_key")?),
            },
            (Platform::Magento2, AuthMode::Oauth) => Credentials::M2Oauth {
                consumer_key: Secret::new(get("consumer_key")?),
                consumer_secret: Secret::new(get("consumer_secret")?),
                access_token: Secret::new(get("access_token")?),
                access_token_secret: Secret::new(get("access_token_secret")?),
            },
            (Platform::Magento2, AuthMode::Bearer) => Credentials::M2Bearer {
                access_token: Secret::new(get("access_token")?),
            },
        })
    }
}

/// The line of a key in a credentials file (`key = "..."` at the top
/// level), to point at it in an error.
pub fn credential_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.split_once('=')
                .is_some_and(|(k, _)| k.trim().trim_matches('"') == key)
        })
        .map(|i| i + 1)
}

/// Refuses empty values and values with leading/trailing white space.
/// The message names the key, never the value.
pub fn check_value(key: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(key, "is empty"));
    }
    if value.trim() != value {
        return Err(ValidationError::new(
            key,
            "has leading or trailing white space (a classic copy-paste error): remove the extra spaces",
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError::new(key, "contains control characters"));
    }
    Ok(())
}

/// A refused input: which field, and why.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct ValidationError {
    pub field: String,
    pub problem: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Checks a shop name: `[a-z0-9_-]`, 1 to 64 characters.
pub fn validate_name(name: &str) -> Result<(), ValidationError> {
    if name.is_empty() || name.len() > 64 {
        return Err(ValidationError::new(
            "name",
            "must be 1 to 64 characters of a-z, 0-9, '_' and '-'",
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
    {
        return Err(ValidationError::new(
            "name",
            format!("character {c:?} is not allowed: use only a-z, 0-9, '_' and '-'"),
        ));
    }
    Ok(())
}

/// Checks a shop URL: http or https, with a host, no query or fragment, no
/// user info (credentials belong in the credentials file). Returns it
/// without a trailing slash.
pub fn validate_url(raw: &str) -> Result<String, ValidationError> {
    check_value("url", raw)?;
    if !raw.contains("://") {
        return Err(ValidationError::new(
            "url",
            format!(
                "has no scheme: write the whole base URL, e.g. https://{}",
                raw.trim_start_matches('/')
            ),
        ));
    }
    let url = url::Url::parse(raw)
        .map_err(|e| ValidationError::new("url", format!("not a valid URL ({e})")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(ValidationError::new(
            "url",
            format!(
                "scheme {:?} is not supported: use https:// (or http://)",
                url.scheme()
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ValidationError::new("url", "has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ValidationError::new(
            "url",
            "must not contain a user or password: put credentials in the credentials file",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ValidationError::new(
            "url",
            "must not have a query or fragment",
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// For a URL that points into the admin panel (`…/admin`, Magento 1's
/// `…/index.php/admin/…`, Magento 2's `…/admin_xyz`): the base URL to
/// register instead. `None` for an ordinary URL.
pub fn admin_base(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let segments: Vec<&str> = parsed.path_segments()?.collect();
    let at = segments.iter().position(|s| {
        let s = s.to_ascii_lowercase();
        s == "admin" || s == "adminhtml" || s.starts_with("admin_")
    })?;
    let mut keep: Vec<&str> = segments[..at].to_vec();
    if keep
        .last()
        .is_some_and(|s| s.eq_ignore_ascii_case("index.php"))
    {
        keep.pop();
    }
    let mut base = parsed.clone();
    base.set_path(&keep.join("/"));
    Some(base.as_str().trim_end_matches('/').to_string())
}

/// Checks a store code: Magento's codes are `[a-z0-9_]`, starting with a letter.
pub fn validate_store_code(code: &str) -> Result<(), ValidationError> {
    let ok = !code.is_empty()
        && code.len() <= 32
        && code.starts_with(|c: char| c.is_ascii_lowercase())
        && code
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok && code != "all" {
        Ok(())
    } else if code == "all" {
        Err(ValidationError::new(
            "store_code",
            "'all' is the admin scope and Magento refuses GET there: use a store view code such as 'default'",
        ))
    } else {
        Err(ValidationError::new(
            "store_code",
            format!("{code:?} is not a store code (a-z, 0-9, '_', starting with a letter)"),
        ))
    }
}

/// A registered shop, as kept in the `shops` tree.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShopRecord {
    pub name: String,
    pub platform: Platform,
    /// Base URL without trailing slash, e.g. `https://shop.example.com`.
    pub url: String,
    /// Store views to mirror (Magento 2 codes; Magento 1 store codes). Never
    /// empty: `["default"]` unless the operator says otherwise.
    pub store_codes: Vec<String>,
    pub auth: AuthMode,
    pub credentials: Credentials,
    /// The operator allowed a plain `http://` URL (`--allow-insecure-http`).
    /// Records written before the flag existed load as `false`; their http
    /// URL is still used (grandfathered), flagged in status and logged at
    /// start.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// A PEM bundle of extra trusted roots (`--tls-ca-file`): the path, read
    /// by the daemon whenever it builds the shop's client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

impl fmt::Debug for ShopRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShopRecord")
            .field("name", &self.name)
            .field("platform", &self.platform)
            .field("url", &self.url)
            .field("store_codes", &self.store_codes)
            .field("auth", &self.auth)
            .field("credentials", &self.credentials)
            .field("allow_insecure_http", &self.allow_insecure_http)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

impl ShopRecord {
    /// The registry view: everything, secrets redacted.
    pub fn public_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "platform": self.platform,
            "url": self.url,
            "store_codes": self.store_codes,
            "auth": self.auth,
            "credentials": self.credentials.redacted(),
            "insecure_http": self.insecure_http(),
            "allow_insecure_http": self.allow_insecure_http,
            "tls_ca_file": self.tls_ca_file,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        })
    }

    /// True when requests (and so credentials) travel unencrypted.
    pub fn insecure_http(&self) -> bool {
        is_plain_http(&self.url)
    }

    /// True for a plain-http record written before `--allow-insecure-http`
    /// existed: still used, but flagged.
    pub fn grandfathered_http(&self) -> bool {
        self.insecure_http() && !self.allow_insecure_http
    }
}

/// True when a (validated) URL is plain `http://`.
pub fn is_plain_http(url: &str) -> bool {
    url.get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
}

/// What status and `shop show` say about a plain-http shop.
pub const INSECURE_HTTP_NOTE: &str = "plain http, credentials cross the network unencrypted: register the shop's https:// URL when it has one";

/// The transport rules of `shop add`: an `http://` URL needs
/// `--allow-insecure-http` (the credentials would cross the network in
/// clear), and `--tls-ca-file` makes sense only with `https://`.
pub fn check_transport(
    url: &str,
    allow_insecure_http: bool,
    tls_ca_file: Option<&std::path::Path>,
) -> Result<(), ValidationError> {
    let http = is_plain_http(url);
    if http && !allow_insecure_http {
        return Err(ValidationError::new(
            "url",
            "plain http:// would send the shop's credentials unencrypted: use the shop's https:// URL, or pass --allow-insecure-http if the shop really has no TLS (e.g. a local test shop)",
        ));
    }
    if http && tls_ca_file.is_some() {
        return Err(ValidationError::new(
            "tls_ca_file",
            "applies to https:// URLs only: use the shop's https:// URL, or drop --tls-ca-file",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("acme-shop_2").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("Acme").is_err());
        assert!(validate_name(&"a".repeat(65)).is_err());
        assert!(validate_name("a/b").is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(
            validate_url("https://x.example/").unwrap(),
            "https://x.example"
        );
        assert_eq!(
            validate_url("http://127.0.0.1:8080/shop/").unwrap(),
            "http://127.0.0.1:8080/shop"
        );
        assert!(validate_url("ftp://x").is_err());
        assert!(validate_url("https://u:p@x").is_err());
        assert!(validate_url(" https://x").is_err());
        let e = validate_url("shop.example.com").unwrap_err();
        assert!(e.problem.contains("e.g. https://shop.example.com"), "{e}");
        let e = validate_url("localhost:8080/shop").unwrap_err();
        assert!(e.problem.contains("https://localhost:8080/shop"), "{e}");
    }

    #[test]
    fn admin_urls_are_recognised() {
        assert_eq!(
            admin_base("https://shop.example/admin").as_deref(),
            Some("https://shop.example")
        );
        assert_eq!(
            admin_base("https://old.example/shop/index.php/admin/dashboard").as_deref(),
            Some("https://old.example/shop")
        );
        assert_eq!(
            admin_base("https://shop.example/admin_1x2y").as_deref(),
            Some("https://shop.example")
        );
        assert_eq!(admin_base("https://shop.example"), None);
        assert_eq!(admin_base("https://shop.example/administration-shop"), None);
    }

    #[test]
    fn plain_http_needs_the_flag() {
        let e = check_transport("http://x.example", false, None).unwrap_err();
        assert_eq!(e.field, "url");
        assert!(e.problem.contains("--allow-insecure-http"), "{e}");
        assert!(e.problem.contains("https://"), "{e}");
        assert!(check_transport("http://x.example", true, None).is_ok());
        assert!(check_transport("https://x.example", false, None).is_ok());
        let ca = std::path::Path::new("/etc/cobbyd/ca.pem");
        assert!(check_transport("https://x.example", false, Some(ca)).is_ok());
        let e = check_transport("http://x.example", true, Some(ca)).unwrap_err();
        assert_eq!(e.field, "tls_ca_file");
        assert!(is_plain_http("HTTP://X"));
        assert!(!is_plain_http("https://x"));
    }

    #[test]
    fn records_written_before_the_tls_fields_still_load() {
        let old = r#"{"name":"acme","platform":"magento1","url":"http://shop.example","store_codes":["default"],"auth":"oauth","credentials":{"type":"m1","api_user":"u","api_key":"k3y0123456789"},"created_at":"2024-01-01T00:00:00Z","updated_at":"2024-01-01T00:00:00Z"}"#;
        let rec: ShopRecord = serde_json::from_str(old).unwrap();
        assert!(!rec.allow_insecure_http);
        assert_eq!(rec.tls_ca_file, None);
        assert!(rec.insecure_http() && rec.grandfathered_http());
        assert_eq!(rec.public_json()["insecure_http"], true);
        // Written again, it says nothing of a CA file it does not have.
        let again = serde_json::to_string(&rec).unwrap();
        assert!(!again.contains("tls_ca_file"), "{again}");
    }

    #[test]
    fn credentials_refuse_spaces_and_never_echo_values() {
        let text = "api_user = \"cobby\"\napi_key = \"s3cr3tvalue123 \"\n";
        let err = Credentials::parse_toml(text, Platform::Magento1, AuthMode::Oauth).unwrap_err();
        assert_eq!(err.field, "api_key");
        assert!(err.to_string().contains("white space"));
        assert!(!err.to_string().contains("s3cr3t"));
        let ok = Credentials::parse_toml(
            "access_token = \"abcdefghijklmnop\"",
            Platform::Magento2,
            AuthMode::Bearer,
        )
        .unwrap();
        assert_eq!(format!("{ok:?}"), r#"{"access_token":"****mnop"}"#);
        assert_eq!(credential_line(text, "api_key"), Some(2));
        assert_eq!(credential_line(text, "consumer_key"), None);
        // A syntax error says where, once.
        let err = Credentials::parse_toml(
            "api_user = \"a\"\napi_key: \"b\"\n",
            Platform::Magento1,
            AuthMode::Oauth,
        )
        .unwrap_err();
        assert_eq!(err.field, "line 2, column 8", "{err}");
        assert!(err.problem.starts_with("not valid TOML: "), "{err}");
        assert!(!err.to_string().contains("credentials"), "{err}");
        assert!(
            Credentials::parse_toml(
                "access_token = \"a\"\nx = \"y\"",
                Platform::Magento2,
                AuthMode::Bearer
            )
            .is_err()
        );
    }
}
