//! The health model of a shop: states, the problem record status shows,
//! operator hints per failure kind, and the retry policy (exponential
//! backoff with jitter from the `backoff` crate; credential failures wait at
//! the slow end).

use crate::magento::{FailureKind, ShopError};
use crate::shop::{AuthMode, Platform};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;

/// Health states; the names are the status JSON contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ShopState {
    /// Not probed yet.
    #[default]
    Unknown,
    Healthy,
    /// Transient failures; retrying.
    Degraded,
    /// Unreachable for longer than `probe.down_after`.
    Down,
    /// Credentials or permissions refused.
    AuthFailed,
    /// The URL is not a Magento API.
    Misconfigured,
}

impl ShopState {
    pub fn as_str(self) -> &'static str {
        match self {
            ShopState::Unknown => "unknown",
            ShopState::Healthy => "healthy",
            ShopState::Degraded => "degraded",
            ShopState::Down => "down",
            ShopState::AuthFailed => "auth_failed",
            ShopState::Misconfigured => "misconfigured",
        }
    }

    /// Whether a sync may run in this state.
    pub fn may_sync(self) -> bool {
        matches!(
            self,
            ShopState::Healthy | ShopState::Degraded | ShopState::Unknown
        )
    }
}

/// Why a shop is not healthy: the `problem` object of the status contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub kind: FailureKind,
    pub message: String,
    pub hint: String,
    /// RFC 3339: first failure of this streak.
    pub since: String,
    /// Failed probes in a row.
    pub attempts: u32,
    /// RFC 3339: the next probe.
    pub next_try: Option<String>,
    /// HTTP status, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
}

/// What the `health` tree keeps per shop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct HealthRecord {
    pub state: ShopState,
    /// RFC 3339: when `state` began.
    pub state_since: Option<String>,
    pub last_probe: Option<String>,
    pub last_ok: Option<String>,
    pub last_latency_ms: Option<u64>,
    pub consecutive_failures: u32,
    pub problem: Option<Problem>,
    pub next_probe: Option<String>,
    /// Magento version when the shop tells it.
    pub version: Option<String>,
    /// Products the credentials can see, from the last probe.
    pub product_count: Option<u64>,
    /// The last retry delays in ms, newest last (at most 16): shows the
    /// backoff at work.
    #[serde(default)]
    pub retry_delays_ms: VecDeque<u64>,
}

/// Maps a failure to a state. `failing_for` is how long the current streak
/// of failures has lasted.
pub fn state_for(err: &ShopError, failing_for: Duration, down_after: Duration) -> ShopState {
    match err.kind {
        k if k.is_auth() => ShopState::AuthFailed,
        FailureKind::NotApi => ShopState::Misconfigured,
        // A redirect that is not followed stays so until the URL is fixed.
        FailureKind::HttpStatus if matches!(err.status, Some(404 | 405 | 400 | 300..=399)) => {
            ShopState::Misconfigured
        }
        FailureKind::Dns | FailureKind::Connect | FailureKind::Timeout | FailureKind::Tls
            if failing_for >= down_after =>
        {
            ShopState::Down
        }
        _ => ShopState::Degraded,
    }
}

/// What to tell the operator: the probable cause of what the daemon saw, and the fix.
pub fn hint(kind: FailureKind, platform: Platform) -> &'static str {
    use FailureKind::*;
    let m2 = platform == Platform::Magento2;
    match kind {
        Dns => {
            "The shop's host name does not resolve: check the URL's spelling and the daemon's DNS."
        }
        Connect => {
            "Nothing answers at the shop URL: check the URL and port, that the shop is up, and that no firewall or .htaccess rule blocks this server's IP."
        }
        Tls => {
            "The TLS handshake failed: check the shop's certificate (expired, wrong host name, unknown issuer) or a proxy intercepting TLS. A shop with a self-signed certificate or a private CA needs that certificate trusted: add the shop with --tls-ca-file PATH (a PEM file readable by the daemon); verification is never switched off."
        }
        Timeout => {
            "The shop did not answer in time: it may be overloaded or a firewall drops the traffic; raise probe.timeout or sync.request_timeout if it is just slow."
        }
        HttpStatus if m2 => {
            "The API path answered with an error or a redirect cobbyd does not follow: check the shop URL (for a redirect, register the URL it leads to); if /rest/ is not routed, URL rewrites may be off (cobbyd already tried index.php/rest)."
        }
        HttpStatus => {
            "The API path answered with an error or a redirect cobbyd does not follow: check the shop URL (for a redirect, register the URL it leads to); if /api/xmlrpc/ is not routed, URL rewrites may be off (cobbyd already tried index.php/api/xmlrpc/)."
        }
        NotApi if m2 => {
            "The URL answered with a web page, not the REST API: use the shop's base URL (without /rest or /admin) and check that /rest/ (or index.php/rest/) is routed."
        }
        NotApi => {
            "The URL answered with a web page, or the API resource is missing: use the shop's base URL and check that /api/xmlrpc/ is routed and the Mage_Api module is enabled."
        }
        Maintenance => "The shop is in maintenance mode (503): wait; cobbyd retries with backoff.",
        Unauthorized if m2 => {
            "The shop refused the token: check the access token and consumer key (extra spaces are a classic), that the integration is activated in System > Integrations, or re-activate it and run `cobbyd shop rotate`."
        }
        Unauthorized => {
            "Access denied at login: the API user name or key is wrong (extra spaces are a classic) or the user was deleted; fix it in System > Web Services > SOAP/XML-RPC Users and run `cobbyd shop rotate`."
        }
        ForbiddenResource if m2 => {
            "The integration lacks the API resource named in the message (or the token is not valid for it): grant it in System > Integrations > API, re-activate, then `cobbyd shop rotate` if the tokens changed."
        }
        ForbiddenResource => {
            "The API user's role lacks the resource of the call named in the message: allow it in System > Web Services > SOAP/XML-RPC Roles > Role Resources (cobbyd calls core_magento.info, catalog_product.list and catalog_product.info)."
        }
        BadSignature => {
            "The shop refused the OAuth signature: the consumer secret or access token secret is wrong (fix it with `cobbyd shop rotate`), or this server's clock is more than 10 minutes off (check NTP)."
        }
        Session => {
            "The Magento 1 API session expired and logging in again failed: check api/config/session_timeout and the API user."
        }
        Protocol => {
            "The shop's answer was not a usable API answer (the message says how: malformed, cut off, more items than asked for, text before it, or no HTTP answer at all). Text before the answer is a PHP notice shown to API clients (turn display_errors off, fix the code it names) or a byte order mark or blank line outside <?php in a PHP file; otherwise look at the shop's web server and PHP logs and at any proxy in front of it."
        }
        TooLarge if m2 => {
            "An answer was larger than sync.max_response_mb: lower sync.page_size (products per request) so that each page fits, or raise sync.max_response_mb if the shop's products are that large; a shop that ignores the page size needs fixing."
        }
        TooLarge => {
            "An answer was larger than sync.max_response_mb: lower sync.m1_batch_size (products per request) so that each answer fits, or raise sync.max_response_mb if the shop's products are that large."
        }
        RateLimited => {
            "The shop asks to slow down (429/Retry-After): cobbyd waits as asked; lower sync.shop_concurrency if it persists."
        }
        ServerError if m2 => {
            "The shop failed internally (500): look at the shop's logs (var/log, var/report; the report id is in the message)."
        }
        ServerError => {
            "The shop failed internally (HTTP 500, or API fault 0 or 1): look at the shop's logs (var/log/system.log, var/log/exception.log, var/report)."
        }
    }
}

/// The hint for a shop: bearer-token shops that are refused get the bearer
/// setting named, since that is the usual cause (off by default since 2.4.4).
/// A URL into the admin panel gets the base URL to use instead.
pub fn hint_for(kind: FailureKind, shop: &crate::shop::ShopRecord) -> String {
    let base = hint_for_auth(kind, shop.platform, shop.auth);
    match crate::shop::admin_base(&shop.url) {
        Some(to) if matches!(kind, FailureKind::HttpStatus | FailureKind::NotApi) => format!(
            "The shop URL {} points into the admin panel: use the shop's base URL, without /admin ({to}). {base}",
            shop.url
        ),
        _ => base,
    }
}

/// What the person was doing when a connection test failed: the hint then
/// tells them what to do next, not to run the command they just ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doing {
    /// `shop add`: nothing was saved.
    Adding,
    /// `shop rotate`: the old credentials stay in use.
    Rotating,
}

/// [`hint_for`] for a failed `shop add` or `shop rotate`: the advice to
/// run `cobbyd shop rotate` gives way to what fits.
pub fn hint_while(kind: FailureKind, shop: &crate::shop::ShopRecord, doing: Doing) -> String {
    let hint = hint_for(kind, shop);
    let mut out = hint
        .replace(
            ", or re-activate it and run `cobbyd shop rotate`.",
            ", or re-activate it.",
        )
        .replace(" and run `cobbyd shop rotate`.", ".")
        .replace(" (fix it with `cobbyd shop rotate`)", "")
        .replace(", then `cobbyd shop rotate` if the tokens changed.", ".");
    if out != hint {
        out.push_str(match doing {
            Doing::Adding => {
                " Nothing was saved: correct the credentials file (or the shop), then run the same `cobbyd shop add` again."
            }
            Doing::Rotating => {
                " The old credentials stay in use: the shop refused the new ones, so check the values in the new credentials file against the shop (or fix the shop) and try the rotation again."
            }
        });
    }
    out
}

/// [`hint_for`] without a shop record: the hint for a platform and auth mode.
pub fn hint_for_auth(kind: FailureKind, platform: Platform, auth: AuthMode) -> String {
    let base = hint(kind, platform);
    if platform == Platform::Magento2
        && auth == AuthMode::Bearer
        && matches!(
            kind,
            FailureKind::Unauthorized | FailureKind::ForbiddenResource
        )
    {
        format!(
            "This shop uses --auth bearer, which Magento accepts only when Stores > Configuration > Services > OAuth > Consumer Settings > \"Allow OAuth Access Tokens to be used as standalone Bearer tokens\" (oauth/consumer/enable_integration_as_bearer) is Yes; otherwise register it with OAuth (the default). {base}"
        )
    } else {
        base.to_string()
    }
}

/// Every (kind, platform, hint): what the README's troubleshooting section
/// is generated from (tests/it/faults.rs), so that the docs cannot drift
/// from what status shows.
#[doc(hidden)]
pub fn all_hints() -> Vec<(FailureKind, Platform, &'static str)> {
    FailureKind::ALL
        .iter()
        .flat_map(|&k| {
            [Platform::Magento1, Platform::Magento2]
                .into_iter()
                .map(move |p| (k, p, hint(k, p)))
        })
        .collect()
}

/// Delay before the next probe of a failing shop.
///
/// Exponential from `initial` (doubling per attempt, ±25% jitter) and never
/// above `max`; credential and permission failures wait `max` at once, since
/// retrying sooner cannot help (a `shop rotate` re-checks immediately).
pub fn retry_delay(err: &ShopError, attempts: u32, initial: Duration, max: Duration) -> Duration {
    use backoff::backoff::Backoff;
    if err.kind.is_auth() {
        return max;
    }
    let exp = attempts.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1u32 << exp.min(31)).min(max);
    let mut policy = backoff::ExponentialBackoff {
        current_interval: base,
        initial_interval: initial,
        randomization_factor: 0.25,
        multiplier: 2.0,
        max_interval: max,
        max_elapsed_time: None,
        ..Default::default()
    };
    let mut delay = policy.next_backoff().unwrap_or(max).min(max);
    if let Some(ra) = err.retry_after {
        delay = delay.max(ra.min(max));
    }
    delay
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(platform: Platform, auth: AuthMode, url: &str) -> crate::shop::ShopRecord {
        crate::shop::ShopRecord {
            name: "acme".into(),
            platform,
            url: url.into(),
            store_codes: vec!["default".into()],
            auth,
            credentials: crate::shop::Credentials::M2Bearer {
                access_token: crate::secret::Secret::new("abcdefghijklmnop"),
            },
            allow_insecure_http: false,
            tls_ca_file: None,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    /// A failed `shop add` or `shop rotate` is never told to run `shop
    /// rotate` as if nothing had been tried; what to do instead is said.
    #[test]
    fn hints_fit_what_is_being_done() {
        for kind in FailureKind::ALL {
            for platform in [Platform::Magento1, Platform::Magento2] {
                for auth in [AuthMode::Oauth, AuthMode::Bearer] {
                    let rec = record(platform, auth, "https://shop.example");
                    let plain = hint_for(kind, &rec);
                    let adding = hint_while(kind, &rec, Doing::Adding);
                    let rotating = hint_while(kind, &rec, Doing::Rotating);
                    assert!(!adding.contains("shop rotate"), "{kind:?}: {adding}");
                    assert!(!rotating.contains("shop rotate"), "{kind:?}: {rotating}");
                    if plain.contains("shop rotate") {
                        assert!(adding.contains("Nothing was saved"), "{adding}");
                        assert!(rotating.contains("old credentials stay"), "{rotating}");
                    } else {
                        assert_eq!(adding, plain);
                    }
                }
            }
        }
    }

    #[test]
    fn an_admin_url_is_told_to_drop_admin() {
        let rec = record(
            Platform::Magento2,
            AuthMode::Oauth,
            "https://shop.example/admin",
        );
        let h = hint_for(FailureKind::HttpStatus, &rec);
        assert!(h.contains("without /admin (https://shop.example)"), "{h}");
        let rec = record(
            Platform::Magento1,
            AuthMode::Oauth,
            "https://old.example/index.php/admin",
        );
        assert!(hint_for(FailureKind::NotApi, &rec).contains("without /admin"));
        assert!(!hint_for(FailureKind::Timeout, &rec).contains("/admin"));
    }

    #[test]
    fn states() {
        let e = |k| ShopError::new(k, "x");
        let long = Duration::from_secs(600);
        let short = Duration::from_secs(1);
        let da = Duration::from_secs(300);
        assert_eq!(
            state_for(&e(FailureKind::Unauthorized), short, da),
            ShopState::AuthFailed
        );
        assert_eq!(
            state_for(&e(FailureKind::BadSignature), short, da),
            ShopState::AuthFailed
        );
        assert_eq!(
            state_for(&e(FailureKind::NotApi), short, da),
            ShopState::Misconfigured
        );
        assert_eq!(
            state_for(&e(FailureKind::Maintenance), long, da),
            ShopState::Degraded
        );
        assert_eq!(
            state_for(&e(FailureKind::Connect), short, da),
            ShopState::Degraded
        );
        assert_eq!(
            state_for(&e(FailureKind::Connect), long, da),
            ShopState::Down
        );
        assert_eq!(
            state_for(&e(FailureKind::HttpStatus).with_status(404), short, da),
            ShopState::Misconfigured
        );
    }

    #[test]
    fn backoff_grows_and_stays_under_max() {
        let e = ShopError::new(FailureKind::Connect, "refused");
        let init = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        let d: Vec<Duration> = (1..=12).map(|a| retry_delay(&e, a, init, max)).collect();
        assert!(
            d[0] >= Duration::from_millis(1500) && d[0] <= Duration::from_millis(2500),
            "{d:?}"
        );
        assert!(d[3] > d[0] * 4, "{d:?}");
        assert!(d.iter().all(|x| *x <= max), "{d:?}");
        assert!(d[11] >= Duration::from_secs(45), "{d:?}");
        let auth = ShopError::new(FailureKind::Unauthorized, "no");
        assert_eq!(retry_delay(&auth, 1, init, max), max);
    }
}
