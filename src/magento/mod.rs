//! Talking to Magento shops: the REST client for 2.x ([`m2`]), the XML-RPC
//! client for 1.x ([`m1`]), the protocol pieces they stand on ([`oauth`],
//! [`xmlrpc`]), and the one error type every shop call returns, classified
//! so that health and status can say what went wrong and what to do.

mod http;
pub mod m1;
pub mod m2;
pub mod oauth;
pub mod xmlrpc;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// What kind of failure a shop call met. The names are part of the status
/// JSON contract (`problem.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The host name does not resolve.
    Dns,
    /// TCP connection refused or reset.
    Connect,
    /// TLS handshake or certificate failure.
    Tls,
    /// No answer within the timeout.
    Timeout,
    /// An HTTP status the other kinds do not explain (404 on the API path,
    /// 5xx other than maintenance).
    HttpStatus,
    /// The answer is not the API (HTML storefront, wrong content type).
    NotApi,
    /// 503 HTML: the shop is in maintenance mode.
    Maintenance,
    /// Credentials refused (M2 401 token/consumer unknown, M1 fault 2 at login).
    Unauthorized,
    /// Credentials accepted but the role/integration lacks a resource
    /// (M2 401 "isn't authorized to access X", M1 fault 2 on a call).
    ForbiddenResource,
    /// M2 OAuth signature refused (secret wrong, clock skew, SHA1).
    BadSignature,
    /// M1 session expired and could not be renewed.
    Session,
    /// Malformed answer: bad JSON/XML, truncated body, unexpected shape,
    /// text before the API's own answer (a PHP notice, a byte order mark),
    /// more items than asked for, or no HTTP answer at all (closed without
    /// one, headers HTTP does not allow or too many of them).
    Protocol,
    /// The answer is larger than `sync.max_response_mb`: asking again
    /// gets the same answer, so it is not retried; smaller pages (or a
    /// higher limit) are the fix.
    TooLarge,
    /// 429 or an explicit Retry-After.
    RateLimited,
    /// Shop-side error (M2 500, M1 fault 1 / 0).
    ServerError,
}

impl FailureKind {
    /// Every kind, in declaration order (for documentation and tests that
    /// enumerate kinds).
    pub const ALL: [FailureKind; 15] = [
        FailureKind::Dns,
        FailureKind::Connect,
        FailureKind::Tls,
        FailureKind::Timeout,
        FailureKind::HttpStatus,
        FailureKind::NotApi,
        FailureKind::Maintenance,
        FailureKind::Unauthorized,
        FailureKind::ForbiddenResource,
        FailureKind::BadSignature,
        FailureKind::Session,
        FailureKind::Protocol,
        FailureKind::TooLarge,
        FailureKind::RateLimited,
        FailureKind::ServerError,
    ];

    /// Does not compile when a variant is missing here: add it to [`ALL`]
    /// too (and its hint in `health::hint`).
    ///
    /// [`ALL`]: FailureKind::ALL
    #[allow(dead_code)]
    const fn listed_in_all(self) -> bool {
        use FailureKind::*;
        match self {
            Dns | Connect | Tls | Timeout | HttpStatus | NotApi | Maintenance | Unauthorized
            | ForbiddenResource | BadSignature | Session | Protocol | TooLarge | RateLimited
            | ServerError => true,
        }
    }

    /// The snake_case name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Dns => "dns",
            FailureKind::Connect => "connect",
            FailureKind::Tls => "tls",
            FailureKind::Timeout => "timeout",
            FailureKind::HttpStatus => "http_status",
            FailureKind::NotApi => "not_api",
            FailureKind::Maintenance => "maintenance",
            FailureKind::Unauthorized => "unauthorized",
            FailureKind::ForbiddenResource => "forbidden_resource",
            FailureKind::BadSignature => "bad_signature",
            FailureKind::Session => "session",
            FailureKind::Protocol => "protocol",
            FailureKind::TooLarge => "too_large",
            FailureKind::RateLimited => "rate_limited",
            FailureKind::ServerError => "server_error",
        }
    }

    /// Credential and permission failures: retrying soon will not help.
    pub fn is_auth(self) -> bool {
        matches!(
            self,
            FailureKind::Unauthorized | FailureKind::ForbiddenResource | FailureKind::BadSignature
        )
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed shop call. `message` is for people (Magento placeholders filled
/// in) and never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ShopError {
    pub kind: FailureKind,
    pub message: String,
    /// HTTP status when there was one.
    pub status: Option<u16>,
    /// From a `Retry-After` header.
    pub retry_after: Option<Duration>,
}

impl ShopError {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        ShopError {
            kind,
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    pub fn with_retry_after(mut self, d: Option<Duration>) -> Self {
        self.retry_after = d;
        self
    }
}

/// Limits every client applies.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Per-request timeout (connect + answer).
    pub timeout: Duration,
    /// Largest answer body read, in bytes (`sync.max_response_mb`); bigger
    /// is a `TooLarge` error.
    pub max_body: usize,
    /// A PEM bundle of extra trusted roots for this shop (`--tls-ca-file`);
    /// the client then gets its own root store instead of the shared one.
    pub tls_ca_file: Option<std::path::PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(60),
            max_body: 64 * 1024 * 1024,
            tls_ca_file: None,
        }
    }
}

/// What a successful probe learned.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeInfo {
    /// Magento edition/version when the shop tells it (M1 `core_magento.info`).
    pub version: Option<String>,
    /// Products visible to the credentials (M2 `total_count`), when known.
    pub product_count: Option<u64>,
    /// The API base that answered (e.g. with the `index.php/` fallback).
    pub api_base: String,
}
