//! The fault matrix: every simulator fault mode and every fault outside the
//! modes (wrong credentials, a revoked ACL resource, bearer switched off,
//! an expired M1 session, a wrong URL path), on both platforms, met by a
//! probe and by a sync. Each row names what status must show (state, kind,
//! and the exact hint `health.rs` gives for that kind and platform) and, for
//! a sync, how the run ends and the evidence of retries.
//!
//! The same rows generate the troubleshooting section of README.md (between
//! the `troubleshooting` markers), together with the hints of every kind no
//! row produces: [`readme_troubleshooting_is_generated`] fails when the file
//! differs, and `COBBYD_BLESS=1 cargo test --release --test it faults::`
//! rewrites it.
//!
//! Speed: two daemons (one probing every 300 ms, one that never probes by
//! itself and syncs on request), one shop per row, each row its own
//! simulator on one shared runtime, every row in its own thread.

use crate::harness::*;
use cobbyd::magento::FailureKind;
use cobbyd::shop::{AuthMode, Platform};
use cobbyd::sim::{Fault, SimConfig, SimHandle};
use serde_json::Value;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum P {
    M1,
    M2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Probe,
    Sync,
}

/// How the fault is brought about.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Inject {
    /// A simulator fault mode, switched on once the shop is healthy.
    Mode(Fault),
    /// Registered with a wrong key (M1 `api_key`, M2 `consumer_key`).
    WrongKey,
    /// Registered with a wrong M2 `consumer_secret`.
    WrongSecret,
    /// The catalog resource is revoked (M1 `catalog/product`, M2
    /// `Magento_Catalog::products`).
    RevokeCatalog,
    /// The resource only the probe needs is revoked (M1 `core/magento`, M2
    /// `Magento_Backend::store`).
    RevokeProbeOnly,
    /// A bearer-token shop turns `enable_integration_as_bearer` off.
    BearerOff,
    /// The shop ends every M1 API session.
    ExpireSessions,
    /// Registered with a path that is not the shop's base URL.
    WrongPath,
    /// The API answers 307 to another host (`Fault::Redirect`, built at run
    /// time: its target is a `String`).
    RedirectAway,
}

/// Where `RedirectAway` points: another loopback address, where nothing
/// listens (cobbyd must not go there; `tls::` checks that nothing arrives).
const REDIRECT_TO: &str = "http://127.0.0.2:9";

/// Extra evidence a row that recovers must show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Evidence {
    /// Failed requests (probe: one failed probe) were retried.
    Retried,
    /// The retry waited at least the `Retry-After` the shop sent.
    RetryAfter,
    /// A second M1 login (sim counter) and no failure.
    Relogin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Probe: the shop settles in this state with this problem kind, and
    /// heals by itself once the fault ends (unless the operator must act).
    Problem(&'static str, FailureKind),
    /// The fault is met (a failure of this kind, if any), retried, and the
    /// probe or the run succeeds.
    Recovers(Option<FailureKind>, Evidence),
    /// Sync: the run fails with this kind after this many attempts at its
    /// first request; the health state stays as the last probe left it.
    RunFails(FailureKind, u64),
    /// Sync: the run succeeds (the fault does not concern it).
    RunOk,
    /// Sync: refused with 409 `shop_unhealthy`, since the probe left the
    /// shop in this state with this kind; no run starts.
    Refused(&'static str, FailureKind),
    /// Sync: the run succeeds; a product with a byte that is not UTF-8 is
    /// kept with U+FFFD in its place, and the log names it.
    RunOkRepaired,
    /// Probe: the fault does not concern the probe; the shop stays healthy.
    Healthy,
    /// Sync: the run ends `partial` with a problem of this kind; nothing
    /// is deleted and the mirror keeps every product.
    Partial(FailureKind),
    /// Sync: a full reconcile fails with this kind (no retry helps: the
    /// answers arrived, they cannot be trusted); nothing is deleted.
    FullFails(FailureKind),
}

/// A fault as the README names it.
struct Situation {
    id: &'static str,
    /// What happens at the shop (README, first column).
    what: &'static str,
    inject: Inject,
}

struct Row {
    sit: &'static Situation,
    p: P,
    phase: Phase,
    expect: Expect,
}

/// Answers slower than the timeouts below (`probe.timeout`, and the sync's
/// `request_timeout` + 1 s).
const SLOW: Duration = Duration::from_secs(3);
const RETRY_AFTER_S: u64 = 1;
/// Sync attempts per request (`REQUEST_ATTEMPTS` in src/sync/mod.rs); an
/// M1 run whose login succeeds makes one request more.
const ATTEMPTS: u64 = 5;

const DOWN: Situation = Situation {
    id: "down",
    what: "nothing listens at the shop URL (web server stopped, firewall)",
    inject: Inject::Mode(Fault::Down),
};
const MAINT: Situation = Situation {
    id: "maint",
    what: "maintenance mode: every route answers a 503 HTML page",
    inject: Inject::Mode(Fault::Maintenance),
};
const HTML: Situation = Situation {
    id: "html",
    what: "the API routes answer the storefront, 200 HTML (a rewrite swallows `/rest/` or `/api/`)",
    inject: Inject::Mode(Fault::Html200),
};
const SLOWS: Situation = Situation {
    id: "slow",
    what: "answers take longer than `probe.timeout` / `sync.request_timeout`",
    inject: Inject::Mode(Fault::Slow(SLOW)),
};
const FLAKY: Situation = Situation {
    id: "flaky",
    what: "every 3rd request fails with 500",
    inject: Inject::Mode(Fault::Flaky { every: 3 }),
};
const TRUNC: Situation = Situation {
    id: "trunc",
    what: "answers are cut off before their announced length",
    inject: Inject::Mode(Fault::Truncated),
};
const GARBAGE: Situation = Situation {
    id: "garbage",
    what: "200 with a body that does not parse (a PHP error inside the JSON or XML)",
    inject: Inject::Mode(Fault::Garbage),
};
const RATE: Situation = Situation {
    id: "rate",
    what: "429 Too Many Requests with `Retry-After`",
    inject: Inject::Mode(Fault::RateLimited {
        retry_after_s: RETRY_AFTER_S,
    }),
};
const KEY: Situation = Situation {
    id: "key",
    what: "wrong key: M1 `api_key`, M2 `consumer_key` (or `access_token`)",
    inject: Inject::WrongKey,
};
const SECRET: Situation = Situation {
    id: "secret",
    what: "wrong M2 `consumer_secret` (or `access_token_secret`)",
    inject: Inject::WrongSecret,
};
const ACL: Situation = Situation {
    id: "acl",
    what: "the API role / integration lacks catalog access (M1 `catalog/product`, M2 `Magento_Catalog::products`)",
    inject: Inject::RevokeCatalog,
};
const ACL_PROBE: Situation = Situation {
    id: "aclp",
    what: "the API role / integration lacks what the probe reads (M1 `core/magento`, M2 `Magento_Backend::store`)",
    inject: Inject::RevokeProbeOnly,
};
const BEARER: Situation = Situation {
    id: "bearer",
    what: "a shop added with `--auth bearer` turns `oauth/consumer/enable_integration_as_bearer` off",
    inject: Inject::BearerOff,
};
const SESSION: Situation = Situation {
    id: "session",
    what: "the M1 API session expires (`api/config/session_timeout`)",
    inject: Inject::ExpireSessions,
};
const PATH: Situation = Situation {
    id: "path",
    what: "the shop URL has a wrong path (not the shop's base URL): 404",
    inject: Inject::WrongPath,
};

const REDIRECT: Situation = Situation {
    id: "redirect",
    what: "the API answers 307 to another host (the shop moved, or a proxy sends the API elsewhere)",
    inject: Inject::RedirectAway,
};

/// Bytes the `oversized` mode appends: over the daemons'
/// `sync.max_response_mb = 1`.
const OVERSIZE: u64 = 2 * 1024 * 1024;
/// Products a `huge_page` answer carries: more than any page asked for,
/// well under the size limit.
const HUGE_PAGE: u64 = 1000;

const OVERSIZED: Situation = Situation {
    id: "oversized",
    what: "answers are larger than `sync.max_response_mb` (big products, a page size the shop ignores)",
    inject: Inject::Mode(Fault::Oversized { bytes: OVERSIZE }),
};
const BOM: Situation = Situation {
    id: "bom",
    what: "a UTF-8 byte order mark before every API answer (a PHP file saved with BOM)",
    inject: Inject::Mode(Fault::Bom),
};
const PHP: Situation = Situation {
    id: "php",
    what: "a PHP warning before every API answer (`display_errors` on)",
    inject: Inject::Mode(Fault::PhpNotice),
};
const HANGUP: Situation = Situation {
    id: "hangup",
    what: "the connection is closed without an answer (a crashing PHP worker, a proxy dropping requests)",
    inject: Inject::Mode(Fault::Hangup),
};
const HEADERS: Situation = Situation {
    id: "headers",
    what: "answers carry 2,000 headers of 1,000 bytes",
    inject: Inject::Mode(Fault::HugeHeaders { count: 2000 }),
};
const LATIN1: Situation = Situation {
    id: "latin1",
    what: "a product name holds a Latin-1 byte (not UTF-8; an old import)",
    inject: Inject::Mode(Fault::Latin1),
};
const HUGEPAGE: Situation = Situation {
    id: "hugepage",
    what: "Magento 2 product listings ignore the page size (1,000 tiny products per answer)",
    inject: Inject::Mode(Fault::HugePage { items: HUGE_PAGE }),
};
/// A shop error whose text tries to rewrite the terminal and forge lines.
const MESSAGE_TEXT: &str = "Internal Error.\u{1b}[2J\r\nacme  magento2  healthy\u{202e}";
const MESSAGE: Situation = Situation {
    id: "message",
    what: "the shop's error text carries control characters (ESC, CR/LF, bidi overrides): shown escaped",
    inject: Inject::Mode(Fault::Message {
        message: std::borrow::Cow::Borrowed(MESSAGE_TEXT),
    }),
};
const M1_INFO_1: Situation = Situation {
    id: "m1info1",
    what: "Magento 1 `catalog_product.info` faults 1 (internal error) for some of the products the listing names",
    inject: Inject::Mode(Fault::M1InfoFault { code: 1, every: 3 }),
};
const M1_INFO_101: Situation = Situation {
    id: "m1info101",
    what: "Magento 1 `catalog_product.info` answers 101 \"Product not exists.\" for every product the listing names",
    inject: Inject::Mode(Fault::M1InfoFault {
        code: 101,
        every: 1,
    }),
};
const M1_WRONG_ID: Situation = Situation {
    id: "m1wrongid",
    what: "Magento 1 `catalog_product.info` answers for another `product_id` than asked",
    inject: Inject::Mode(Fault::M1InfoWrongId { every: 2 }),
};
const M1_RANGE: Situation = Situation {
    id: "m1range",
    what: "Magento 1 `catalog_product.list` ignores the `product_id` range (the same products for every range)",
    inject: Inject::Mode(Fault::M1ListIgnoresRange),
};
/// A session id over the 256 bytes accepted (50 MB were seen).
const HUGE_SESSION: u64 = 4096;
const M1_SESSION_ID: Situation = Situation {
    id: "m1sid",
    what: "Magento 1 `login` answers a huge session id (Magento's are 32 hex characters)",
    inject: Inject::Mode(Fault::M1HugeSession {
        bytes: HUGE_SESSION,
    }),
};

const SHORT_TOTAL: Situation = Situation {
    id: "short_total",
    what: "Magento 2 listings answer a `total_count` smaller than the products they send",
    inject: Inject::Mode(Fault::ShortTotal { total: 3 }),
};
const PARTIAL: Situation = Situation {
    id: "partial",
    what: "Magento 2 listings hold only some products (10 of 40) while `total_count` counts all (a proxy or half-updated module)",
    inject: Inject::Mode(Fault::PartialListing { items: 10 }),
};
const ENDLESS: Situation = Situation {
    id: "endless",
    what: "a Magento 2 listing never ends: full pages of new ids, `total_count` 10^12",
    inject: Inject::Mode(Fault::Endless {
        total: 1_000_000_000_000,
    }),
};

const fn row(sit: &'static Situation, p: P, phase: Phase, expect: Expect) -> Row {
    Row {
        sit,
        p,
        phase,
        expect,
    }
}

use Evidence::*;
use Expect::*;
use FailureKind as K;
use P::*;
use Phase::*;

/// The matrix. README order: situations in order of first appearance.
const ROWS: &[Row] = &[
    row(&DOWN, M1, Probe, Problem("down", K::Connect)),
    row(&DOWN, M2, Probe, Problem("down", K::Connect)),
    row(&DOWN, M1, Sync, RunFails(K::Connect, ATTEMPTS)),
    row(&DOWN, M2, Sync, RunFails(K::Connect, ATTEMPTS)),
    row(&MAINT, M1, Probe, Problem("degraded", K::Maintenance)),
    row(&MAINT, M2, Probe, Problem("degraded", K::Maintenance)),
    row(&MAINT, M1, Sync, RunFails(K::Maintenance, ATTEMPTS)),
    row(&MAINT, M2, Sync, RunFails(K::Maintenance, ATTEMPTS)),
    row(&HTML, M1, Probe, Problem("misconfigured", K::NotApi)),
    row(&HTML, M2, Probe, Problem("misconfigured", K::NotApi)),
    row(&HTML, M1, Sync, RunFails(K::NotApi, 1)),
    row(&HTML, M2, Sync, RunFails(K::NotApi, 1)),
    row(
        &REDIRECT,
        M1,
        Probe,
        Problem("misconfigured", K::HttpStatus),
    ),
    row(
        &REDIRECT,
        M2,
        Probe,
        Problem("misconfigured", K::HttpStatus),
    ),
    row(&REDIRECT, M1, Sync, RunFails(K::HttpStatus, 1)),
    row(&REDIRECT, M2, Sync, RunFails(K::HttpStatus, 1)),
    row(&SLOWS, M1, Probe, Problem("down", K::Timeout)),
    row(&SLOWS, M2, Probe, Problem("down", K::Timeout)),
    row(&SLOWS, M1, Sync, RunFails(K::Timeout, ATTEMPTS)),
    row(&SLOWS, M2, Sync, RunFails(K::Timeout, ATTEMPTS)),
    row(&FLAKY, M1, Probe, Recovers(Some(K::ServerError), Retried)),
    row(&FLAKY, M2, Probe, Recovers(Some(K::ServerError), Retried)),
    row(&FLAKY, M1, Sync, Recovers(Some(K::ServerError), Retried)),
    row(&FLAKY, M2, Sync, Recovers(Some(K::ServerError), Retried)),
    row(&MESSAGE, M1, Probe, Problem("degraded", K::ServerError)),
    row(&MESSAGE, M2, Probe, Problem("degraded", K::ServerError)),
    row(&MESSAGE, M1, Sync, RunFails(K::ServerError, ATTEMPTS)),
    row(&MESSAGE, M2, Sync, RunFails(K::ServerError, ATTEMPTS)),
    row(&TRUNC, M1, Probe, Problem("degraded", K::Protocol)),
    row(&TRUNC, M2, Probe, Problem("degraded", K::Protocol)),
    row(&TRUNC, M1, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&TRUNC, M2, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&GARBAGE, M1, Probe, Problem("degraded", K::Protocol)),
    row(&GARBAGE, M2, Probe, Problem("degraded", K::Protocol)),
    row(&GARBAGE, M1, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&GARBAGE, M2, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&RATE, M1, Probe, Problem("degraded", K::RateLimited)),
    row(&RATE, M2, Probe, Problem("degraded", K::RateLimited)),
    row(&RATE, M1, Sync, Recovers(Some(K::RateLimited), RetryAfter)),
    row(&RATE, M2, Sync, Recovers(Some(K::RateLimited), RetryAfter)),
    row(&KEY, M1, Probe, Problem("auth_failed", K::Unauthorized)),
    row(&KEY, M2, Probe, Problem("auth_failed", K::Unauthorized)),
    row(&KEY, M1, Sync, Refused("auth_failed", K::Unauthorized)),
    row(&KEY, M2, Sync, Refused("auth_failed", K::Unauthorized)),
    row(&SECRET, M2, Probe, Problem("auth_failed", K::BadSignature)),
    row(&SECRET, M2, Sync, Refused("auth_failed", K::BadSignature)),
    row(
        &ACL,
        M1,
        Probe,
        Problem("auth_failed", K::ForbiddenResource),
    ),
    row(
        &ACL,
        M2,
        Probe,
        Problem("auth_failed", K::ForbiddenResource),
    ),
    row(&ACL, M1, Sync, RunFails(K::ForbiddenResource, 1)),
    row(&ACL, M2, Sync, RunFails(K::ForbiddenResource, 1)),
    row(
        &ACL_PROBE,
        M1,
        Probe,
        Problem("auth_failed", K::ForbiddenResource),
    ),
    row(
        &ACL_PROBE,
        M2,
        Probe,
        Problem("auth_failed", K::ForbiddenResource),
    ),
    row(&ACL_PROBE, M1, Sync, RunOk),
    row(&ACL_PROBE, M2, Sync, RunOk),
    row(
        &BEARER,
        M2,
        Probe,
        Problem("auth_failed", K::ForbiddenResource),
    ),
    row(&BEARER, M2, Sync, RunFails(K::ForbiddenResource, 1)),
    row(&SESSION, M1, Probe, Recovers(None, Relogin)),
    row(&SESSION, M1, Sync, Recovers(None, Relogin)),
    row(&PATH, M1, Probe, Problem("misconfigured", K::HttpStatus)),
    row(&PATH, M2, Probe, Problem("misconfigured", K::HttpStatus)),
    row(&PATH, M1, Sync, Refused("misconfigured", K::HttpStatus)),
    row(&PATH, M2, Sync, Refused("misconfigured", K::HttpStatus)),
    row(&OVERSIZED, M1, Probe, Problem("degraded", K::TooLarge)),
    row(&OVERSIZED, M2, Probe, Problem("degraded", K::TooLarge)),
    row(&OVERSIZED, M1, Sync, RunFails(K::TooLarge, 1)),
    row(&OVERSIZED, M2, Sync, RunFails(K::TooLarge, 1)),
    row(&BOM, M1, Probe, Healthy),
    row(&BOM, M2, Probe, Problem("degraded", K::Protocol)),
    row(&BOM, M1, Sync, RunOk),
    row(&BOM, M2, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&PHP, M1, Probe, Problem("degraded", K::Protocol)),
    row(&PHP, M2, Probe, Problem("degraded", K::Protocol)),
    row(&PHP, M1, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&PHP, M2, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&HANGUP, M1, Probe, Problem("degraded", K::Protocol)),
    row(&HANGUP, M2, Probe, Problem("degraded", K::Protocol)),
    row(&HANGUP, M1, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&HANGUP, M2, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&HEADERS, M1, Probe, Problem("degraded", K::Protocol)),
    row(&HEADERS, M2, Probe, Problem("degraded", K::Protocol)),
    row(&HEADERS, M1, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&HEADERS, M2, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&LATIN1, M1, Probe, Healthy),
    row(&LATIN1, M2, Probe, Healthy),
    row(&LATIN1, M1, Sync, RunOkRepaired),
    row(&LATIN1, M2, Sync, RunOkRepaired),
    row(&HUGEPAGE, M2, Probe, Problem("degraded", K::Protocol)),
    row(&HUGEPAGE, M2, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&M1_INFO_1, M1, Probe, Healthy),
    row(&M1_INFO_1, M1, Sync, Partial(K::ServerError)),
    row(&M1_INFO_101, M1, Probe, Healthy),
    row(&M1_INFO_101, M1, Sync, Partial(K::Protocol)),
    row(&M1_WRONG_ID, M1, Probe, Healthy),
    row(&M1_WRONG_ID, M1, Sync, Partial(K::Protocol)),
    row(&M1_RANGE, M1, Probe, Healthy),
    row(&M1_RANGE, M1, Sync, FullFails(K::Protocol)),
    row(&M1_SESSION_ID, M1, Probe, Problem("degraded", K::Protocol)),
    row(&M1_SESSION_ID, M1, Sync, RunFails(K::Protocol, ATTEMPTS)),
    row(&SHORT_TOTAL, M2, Probe, Healthy),
    row(&SHORT_TOTAL, M2, Sync, Partial(K::Protocol)),
    row(&PARTIAL, M2, Probe, Healthy),
    row(&PARTIAL, M2, Sync, Partial(K::Protocol)),
    row(&ENDLESS, M2, Probe, Healthy),
    row(&ENDLESS, M2, Sync, RunFails(K::Protocol, 1)),
];

impl P {
    fn platform(self) -> Platform {
        match self {
            M1 => Platform::Magento1,
            M2 => Platform::Magento2,
        }
    }

    fn short(self) -> &'static str {
        match self {
            M1 => "m1",
            M2 => "m2",
        }
    }
}

impl Row {
    /// `maint-m2-probe`: the row's name in failures, and its shop's name.
    fn id(&self) -> String {
        let phase = match self.phase {
            Probe => "probe",
            Sync => "sync",
        };
        format!("{}-{}-{phase}", self.sit.id, self.p.short())
    }

    fn auth(&self) -> AuthMode {
        if self.sit.inject == Inject::BearerOff {
            AuthMode::Bearer
        } else {
            AuthMode::Oauth
        }
    }

    /// The hint status must show for `kind` on this row's shop.
    fn hint(&self, kind: FailureKind) -> String {
        cobbyd::health::hint_for_auth(kind, self.p.platform(), self.auth())
    }

    /// The resource a revoke row takes away.
    fn resource(&self) -> Option<&'static str> {
        match (&self.sit.inject, self.p) {
            (Inject::RevokeCatalog, M1) => Some("catalog/product"),
            (Inject::RevokeCatalog, M2) => Some("Magento_Catalog::products"),
            (Inject::RevokeProbeOnly, M1) => Some("core/magento"),
            (Inject::RevokeProbeOnly, M2) => Some("Magento_Backend::store"),
            _ => None,
        }
    }

    /// Registered broken from the start: the operator must act.
    fn broken_at_add(&self) -> bool {
        matches!(
            self.sit.inject,
            Inject::WrongKey | Inject::WrongSecret | Inject::WrongPath
        )
    }
}

// ---------------------------------------------------------------------------
// Running a row
// ---------------------------------------------------------------------------

/// Bounds each row's waits (rows run at once; this never asserts speed).
const ROW_WAIT: Duration = Duration::from_secs(75);

/// Probes every 300 ms, failures retried from 200 ms up to 2 s, down after
/// 1 s; syncs only the first one after `shop add`.
const PROBE_DAEMON: &str = "[probe]\ninterval = \"300ms\"\ntimeout = \"2s\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"2s\"\ndown_after = \"1s\"\n\
[sync]\ninterval = \"1h\"\nfull_interval = \"24h\"\nrequest_timeout = \"1s\"\nmax_concurrent_syncs = 64\nmax_response_mb = 1\n";

/// Probes only when asked (`shop add`, `shop test`): the first probe of a
/// shop comes after a per-name jitter of up to a tenth of the interval,
/// hours away for these names. Syncs on request, in small pages so that a
/// run makes several requests.
const SYNC_DAEMON: &str = "[probe]\ninterval = \"1000h\"\ntimeout = \"2s\"\nbackoff_initial = \"1h\"\nbackoff_max = \"1h\"\ndown_after = \"1s\"\n\
[sync]\ninterval = \"1h\"\nfull_interval = \"24h\"\nrequest_timeout = \"1s\"\npage_size = 5\nm1_batch_size = 5\nmax_concurrent_syncs = 64\nmax_response_mb = 1\n";

/// Products per simulated shop; a sync row changes `TOUCHED` of them.
const PRODUCTS: usize = 40;
const TOUCHED: usize = 20;

struct Ctx<'a> {
    rt: &'a tokio::runtime::Runtime,
    probe_d: &'a Daemon,
    sync_d: &'a Daemon,
}

/// One row's run: what it saw, for the failure message.
struct Seen {
    id: String,
    log: Vec<String>,
}

impl Seen {
    fn note(&mut self, s: impl Into<String>) {
        self.log.push(s.into());
    }

    fn fail(&self, what: impl std::fmt::Display) -> String {
        format!(
            "row {}: {what}\n  seen:\n    {}",
            self.id,
            self.log.join("\n    ")
        )
    }
}

fn state(s: &Value) -> &str {
    s["state"].as_str().unwrap_or("?")
}

fn kind(s: &Value) -> &str {
    s["problem"]["kind"].as_str().unwrap_or("-")
}

/// `state/kind`, for traces.
fn brief(s: &Value) -> String {
    format!("{}/{}", state(s), kind(s))
}

/// Polls the shop's status until `f` holds; keeps the distinct
/// state/kind pairs seen.
fn wait_for(
    d: &Daemon,
    name: &str,
    seen: &mut Seen,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Result<Value, String> {
    let t = Instant::now();
    let mut trace: Vec<String> = Vec::new();
    loop {
        let s = d.shop(name);
        let b = brief(&s);
        if trace.last() != Some(&b) {
            trace.push(b);
        }
        if f(&s) {
            seen.note(format!("{what}: {}", trace.join(" → ")));
            return Ok(s);
        }
        if t.elapsed() > ROW_WAIT {
            seen.note(format!("{what}: {}", trace.join(" → ")));
            return Err(seen.fail(format!("timed out waiting for {what}; last status: {s:#}")));
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// `cobbyd_shop_requests_total{shop,outcome}` from /metrics.
fn requests_metric(d: &Daemon, shop: &str, outcome: &str) -> u64 {
    let (_, text) = d.http("GET", "/metrics", None);
    let key = format!("cobbyd_shop_requests_total{{shop=\"{shop}\",outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Daemon log lines about one shop (`shop=NAME` or `shop="NAME"`).
fn shop_log(d: &Daemon, shop: &str) -> Vec<String> {
    let a = format!("shop={shop} ");
    let b = format!("shop=\"{shop}\"");
    d.log()
        .lines()
        .filter(|l| l.contains(&a) || l.contains(&b) || l.ends_with(&format!("shop={shop}")))
        .map(str::to_string)
        .collect()
}

/// `key=value` or `key="value"` in a log line.
fn has_field(line: &str, key: &str, value: &str) -> bool {
    line.contains(&format!("{key}={value} "))
        || line.contains(&format!("{key}=\"{value}\""))
        || line.ends_with(&format!("{key}={value}"))
}

/// `key=123` in a log line.
fn log_number(line: &str, key: &str) -> Option<u64> {
    let rest = line.split(&format!("{key}=")).nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Probes the shop has answered: `core_magento.info` calls (M1),
/// `storeConfigs` requests (M2).
fn probe_calls(p: P, sim: &SimHandle) -> u64 {
    match p {
        M1 => m1_probe_calls(sim),
        M2 => sim.counters().m2_store_configs,
    }
}

fn m1_probe_calls(sim: &SimHandle) -> u64 {
    sim.counters()
        .by_route
        .get("xmlrpc call core_magento.info")
        .copied()
        .unwrap_or(0)
}

fn creds(row: &Row, sim: &SimHandle) -> String {
    let mut c = sim.credentials().clone();
    match (&row.sit.inject, row.p) {
        (Inject::WrongKey, M1) => c.api_key = "ffffffffwrongapikey0000000000000".into(),
        (Inject::WrongKey, M2) => c.consumer_key = "ffffffffwrongconsumerkey00000000".into(),
        (Inject::WrongSecret, _) => c.consumer_secret = "ffffffffwrongconsumersecret00000".into(),
        (Inject::BearerOff, _) => return c.m2_bearer_toml(),
        _ => {}
    }
    match row.p {
        M1 => c.m1_toml(),
        M2 => c.m2_oauth_toml(),
    }
}

/// Switches the row's fault on.
fn inject(row: &Row, sim: &SimHandle) {
    match &row.sit.inject {
        Inject::Mode(f) => sim.set_fault(f.clone()),
        Inject::RedirectAway => sim.set_fault(Fault::Redirect {
            status: 307,
            to: REDIRECT_TO.to_string(),
        }),
        Inject::RevokeCatalog | Inject::RevokeProbeOnly => {
            sim.revoke(row.resource().unwrap_or_default())
        }
        Inject::BearerOff => sim.set_bearer_enabled(false),
        Inject::ExpireSessions => sim.expire_sessions(),
        Inject::WrongKey | Inject::WrongSecret | Inject::WrongPath => {}
    }
}

/// Switches it off; false when only the operator can (new credentials or
/// URL).
fn clear(row: &Row, sim: &SimHandle) -> bool {
    match &row.sit.inject {
        Inject::Mode(_) | Inject::RedirectAway => sim.set_fault(Fault::None),
        Inject::RevokeCatalog | Inject::RevokeProbeOnly => {
            sim.grant(row.resource().unwrap_or_default())
        }
        Inject::BearerOff => sim.set_bearer_enabled(true),
        Inject::ExpireSessions => {}
        Inject::WrongKey | Inject::WrongSecret | Inject::WrongPath => return false,
    }
    true
}

fn run_row(ctx: &Ctx, row: &Row) -> Result<String, String> {
    let name = row.id();
    let mut seen = Seen {
        id: name.clone(),
        log: Vec::new(),
    };
    let sim = ctx
        .rt
        .block_on(SimHandle::start(SimConfig {
            products: PRODUCTS,
            bearer_enabled: row.sit.inject == Inject::BearerOff,
            store_codes: vec!["default".into()],
            ..Default::default()
        }))
        .map_err(|e| seen.fail(format!("simulator: {e}")))?;
    let result = run_row_on(ctx, row, &name, &sim, &mut seen);
    ctx.rt.block_on(sim.shutdown());
    result.map(|()| format!("{name}: {}", seen.log.join("; ")))
}

fn run_row_on(
    ctx: &Ctx,
    row: &Row,
    name: &str,
    sim: &SimHandle,
    seen: &mut Seen,
) -> Result<(), String> {
    let d = match row.phase {
        Probe => ctx.probe_d,
        Sync => ctx.sync_d,
    };
    let url = if row.sit.inject == Inject::WrongPath {
        format!("{}/shop", sim.url())
    } else {
        sim.url()
    };
    let mut extra: Vec<&str> = Vec::new();
    if row.auth() == AuthMode::Bearer {
        extra.extend(["--auth", "bearer"]);
    }
    if row.broken_at_add() {
        extra.push("--no-verify");
    }
    let platform = row.p.platform().to_string();
    let out = d.add_shop(name, &platform, &url, &creds(row, sim), &extra);
    if out.status.code() != Some(0) {
        return Err(seen.fail(format!(
            "shop add exited {:?}: {}{}",
            out.status.code(),
            stdout(&out),
            stderr(&out)
        )));
    }
    if !row.broken_at_add() {
        // The first sync runs right after add: let it end before the fault.
        let s = wait_for(d, name, seen, "first sync", |s| {
            !s["sync"]["last_run"].is_null()
        })?;
        if s["sync"]["last_run"]["outcome"] != "ok" {
            return Err(seen.fail(format!("first sync failed: {s:#}")));
        }
    }
    match row.phase {
        Probe => probe_row(d, row, name, sim, seen),
        Sync => sync_row(d, row, name, sim, seen),
    }
}

fn probe_row(
    d: &Daemon,
    row: &Row,
    name: &str,
    sim: &SimHandle,
    seen: &mut Seen,
) -> Result<(), String> {
    let logins = sim.counters().m1_logins;
    let probes = probe_calls(row.p, sim);
    inject(row, sim);
    match row.expect {
        Problem(want_state, want_kind) => {
            let s = wait_for(d, name, seen, "problem", |s| {
                state(s) == want_state && kind(s) == want_kind.as_str()
            })?;
            check_problem(row, &s, want_kind, seen)?;
            let trace = seen.log.last().cloned().unwrap_or_default();
            // Transient states only on the way: never another verdict.
            for st in ["auth_failed", "misconfigured", "down"] {
                if st != want_state && trace.contains(&format!("{st}/")) {
                    return Err(seen.fail(format!("passed through {st}")));
                }
            }
            // The verdict holds while the fault lasts (past `down_after`
            // too): three more failed probes, the same state and kind.
            let from = s["problem"]["attempts"].as_u64().unwrap_or(0);
            let s = wait_for(d, name, seen, "three more probes", |s| {
                s["problem"]["attempts"].as_u64().unwrap_or(0) >= from + 3
                    || state(s) != want_state
                    || kind(s) != want_kind.as_str()
            })?;
            if state(&s) != want_state || kind(&s) != want_kind.as_str() {
                return Err(seen.fail(format!("the verdict changed: {}", brief(&s))));
            }
            if want_kind == K::RateLimited {
                let delays = &s["retry_delays_ms"];
                let ok = delays.as_array().is_some_and(|a| {
                    !a.is_empty()
                        && a.iter()
                            .all(|v| v.as_u64().unwrap_or(0) >= RETRY_AFTER_S * 1000)
                });
                if !ok {
                    return Err(seen.fail(format!(
                        "Retry-After ({RETRY_AFTER_S}s) not honoured by the probe backoff: {delays}"
                    )));
                }
                seen.note(format!("retry delays {delays}"));
            }
            // `cobbyd status NAME` shows the hint and exits 1.
            let out = d.cli(&["status", name]);
            let hint = row.hint(want_kind);
            if out.status.code() != Some(1) || !stdout(&out).contains(&hint) {
                return Err(seen.fail(format!(
                    "`cobbyd status {name}` exited {:?} without the hint:\n{}",
                    out.status.code(),
                    stdout(&out)
                )));
            }
            if clear(row, sim) {
                wait_for(d, name, seen, "healthy again", |s| {
                    state(s) == "healthy" && s["problem"].is_null()
                })?;
            }
            Ok(())
        }
        Recovers(want_kind, evidence) => {
            match evidence {
                Retried => {
                    let kind = want_kind.map_or("-", FailureKind::as_str);
                    // A failed probe of this kind, then a healthy one: the
                    // transitions are logged once each.
                    let t = Instant::now();
                    loop {
                        let lines = shop_log(d, name);
                        let failed = lines.iter().position(|l| has_field(l, "kind", kind));
                        let healed = failed.and_then(|i| {
                            lines[i..]
                                .iter()
                                .position(|l| l.contains("shop is healthy"))
                        });
                        if healed.is_some() {
                            let i = failed.unwrap_or(0);
                            let transitions: Vec<&String> = lines[i..]
                                .iter()
                                .filter(|l| l.contains("shop is"))
                                .take(2)
                                .collect();
                            seen.note(format!("log: {transitions:?}"));
                            break;
                        }
                        if t.elapsed() > ROW_WAIT {
                            let relevant: Vec<&String> =
                                lines.iter().filter(|l| l.contains("shop is")).collect();
                            return Err(seen.fail(format!(
                                "no failed probe ({kind}) followed by a healthy one in the log: {relevant:#?}"
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(150));
                    }
                    let errors = requests_metric(d, name, "error");
                    if errors == 0 {
                        return Err(seen.fail("no failed probe counted in /metrics"));
                    }
                    seen.note(format!("failed probes counted: {errors}"));
                    clear(row, sim);
                    wait_for(d, name, seen, "healthy", |s| {
                        state(s) == "healthy" && s["problem"].is_null()
                    })?;
                }
                Relogin => {
                    let t = Instant::now();
                    while probe_calls(row.p, sim) < probes + 3 {
                        if t.elapsed() > ROW_WAIT {
                            return Err(seen.fail(format!(
                                "no probes after the expiry: {:?}",
                                sim.counters()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    let s = d.shop(name);
                    seen.note(format!(
                        "after expiry: {} failures={} logins {}→{}",
                        brief(&s),
                        s["consecutive_failures"],
                        logins,
                        sim.counters().m1_logins
                    ));
                    if state(&s) != "healthy" || s["consecutive_failures"] != 0 {
                        return Err(seen.fail(format!("not healthy throughout: {s:#}")));
                    }
                    let now = sim.counters().m1_logins;
                    // One login per expiry, not one per probe.
                    if now != logins + 1 {
                        return Err(seen.fail(format!(
                            "expected exactly one new login, saw {logins} → {now}"
                        )));
                    }
                }
                RetryAfter => return Err(seen.fail("RetryAfter is checked on syncs only")),
            }
            Ok(())
        }
        Healthy => {
            let t = Instant::now();
            while probe_calls(row.p, sim) < probes + 3 {
                if t.elapsed() > ROW_WAIT {
                    return Err(seen.fail(format!("no probes: {:?}", sim.counters())));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let s = d.shop(name);
            seen.note(format!("after the fault: {}", brief(&s)));
            if state(&s) != "healthy" || s["consecutive_failures"] != 0 || !s["problem"].is_null() {
                return Err(seen.fail(format!("not healthy throughout: {s:#}")));
            }
            clear(row, sim);
            Ok(())
        }
        RunFails(..) | RunOk | Refused(..) | RunOkRepaired | Partial(_) | FullFails(_) => {
            Err(seen.fail("a sync expectation on a probe row"))
        }
    }
}

/// Problem kind, exact hint, a message, attempts and the next try.
fn check_problem(row: &Row, s: &Value, want: FailureKind, seen: &Seen) -> Result<(), String> {
    let p = &s["problem"];
    let hint = row.hint(want);
    if p["hint"] != hint.as_str() {
        return Err(seen.fail(format!(
            "hint differs\n  want: {hint}\n  got:  {}",
            p["hint"]
        )));
    }
    if p["message"].as_str().is_none_or(str::is_empty)
        || p["attempts"].as_u64().unwrap_or(0) < 1
        || !p["next_try"].is_string()
    {
        return Err(seen.fail(format!("incomplete problem: {p:#}")));
    }
    Ok(())
}

fn sync_row(
    d: &Daemon,
    row: &Row,
    name: &str,
    sim: &SimHandle,
    seen: &mut Seen,
) -> Result<(), String> {
    if let Refused(want_state, want_kind) = row.expect {
        let (code, body) = d.http("POST", &format!("/v1/shops/{name}/test"), Some("{}"));
        seen.note(format!("shop test: {code}"));
        let s = wait_for(d, name, seen, "probed", |s| state(s) == want_state)?;
        if kind(&s) != want_kind.as_str() {
            return Err(seen.fail(format!("problem kind: want {want_kind}, got {}", kind(&s))));
        }
        check_problem(row, &s, want_kind, seen)?;
        let (code, body2) = d.http("POST", &format!("/v1/shops/{name}/sync"), Some("{}"));
        let v: Value = serde_json::from_str(&body2).unwrap_or_default();
        seen.note(format!("sync request: {code} {}", v["error"]["kind"]));
        if code != 409 || v["error"]["kind"] != "shop_unhealthy" {
            return Err(seen.fail(format!(
                "sync not refused with 409 shop_unhealthy: {code} {body2} (test said {body})"
            )));
        }
        let s = d.shop(name);
        if !s["sync"]["last_run"].is_null() {
            return Err(seen.fail(format!("a run happened: {:#}", s["sync"]["last_run"])));
        }
        return Ok(());
    }

    let before = d.shop(name);
    let prev_run = before["sync"]["last_run"]["run_id"].as_u64().unwrap_or(0);
    sim.touch(TOUCHED);
    let logins = sim.counters().m1_logins;
    let injected = sim.counters().faults_injected;
    inject(row, sim);
    let request = if matches!(row.expect, FullFails(_)) {
        r#"{"full":true}"#
    } else {
        "{}"
    };
    let (code, body) = d.http("POST", &format!("/v1/shops/{name}/sync"), Some(request));
    if code != 202 {
        return Err(seen.fail(format!("sync request answered {code}: {body}")));
    }
    if let Recovers(_, RetryAfter) = row.expect {
        // The shop asks to wait once; by the time the sync asks again it
        // answers (if this thread is late, the sync waits again: still ok).
        let t = Instant::now();
        while sim.counters().faults_injected == injected {
            if t.elapsed() > ROW_WAIT {
                return Err(seen.fail("the sync never met the 429"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        clear(row, sim);
    }
    let s = wait_for(d, name, seen, "run ended", |s| {
        s["sync"]["last_run"]["run_id"].as_u64().unwrap_or(0) > prev_run
    })?;
    let run = &s["sync"]["last_run"];
    seen.note(format!(
        "run: {} requests={} fetched={} error={}",
        run["outcome"], run["requests"], run["fetched"], run["error"]
    ));
    // A sync never changes the health state: the probe decides.
    if state(&s) != "healthy" {
        return Err(seen.fail(format!("health changed by a sync: {}", brief(&s))));
    }
    match row.expect {
        RunFails(want_kind, attempts) => {
            if run["outcome"] != "failed" || run["error"]["kind"] != want_kind.as_str() {
                return Err(seen.fail(format!("want a failed run of kind {want_kind}: {run:#}")));
            }
            let hint = row.hint(want_kind);
            if run["error"]["hint"] != hint.as_str() {
                return Err(seen.fail(format!(
                    "run hint differs\n  want: {hint}\n  got:  {}",
                    run["error"]["hint"]
                )));
            }
            if run["requests"] != attempts {
                return Err(seen.fail(format!(
                    "want {attempts} attempts, the run made {}",
                    run["requests"]
                )));
            }
        }
        Partial(want_kind) | FullFails(want_kind) => {
            let want_outcome = if matches!(row.expect, Partial(_)) {
                "partial"
            } else {
                "failed"
            };
            if run["outcome"] != want_outcome || run["error"]["kind"] != want_kind.as_str() {
                return Err(seen.fail(format!(
                    "want a {want_outcome} run of kind {want_kind}: {run:#}"
                )));
            }
            let hint = row.hint(want_kind);
            if run["error"]["hint"] != hint.as_str() {
                return Err(seen.fail(format!(
                    "run hint differs\n  want: {hint}\n  got:  {}",
                    run["error"]["hint"]
                )));
            }
            if run["deleted"] != 0 || s["sync"]["products"] != PRODUCTS as u64 {
                return Err(seen.fail(format!(
                    "the mirror lost products: {run:#} products={}",
                    s["sync"]["products"]
                )));
            }
        }
        RunOk => {
            if run["outcome"] != "ok" || run["fetched"].as_u64().unwrap_or(0) < TOUCHED as u64 {
                return Err(seen.fail(format!("want an ok run with the changes: {run:#}")));
            }
        }
        RunOkRepaired => {
            if run["outcome"] != "ok" || run["fetched"].as_u64().unwrap_or(0) < TOUCHED as u64 {
                return Err(seen.fail(format!("want an ok run with the changes: {run:#}")));
            }
            let named = shop_log(d, name)
                .into_iter()
                .find(|l| l.contains("that are not UTF-8") && l.contains("sku="));
            match named {
                Some(l) => seen.note(format!("log: {l}")),
                None => return Err(seen.fail("no warning naming the product in the log")),
            }
        }
        Recovers(want_kind, evidence) => {
            if run["outcome"] != "ok"
                || !run["error"].is_null()
                || run["fetched"].as_u64().unwrap_or(0) < TOUCHED as u64
            {
                return Err(seen.fail(format!("want an ok run with the changes: {run:#}")));
            }
            if let Some(k) = want_kind {
                let n = requests_metric(d, name, k.as_str());
                if n == 0 || sim.counters().faults_injected == injected {
                    return Err(seen.fail(format!("no failed request of kind {k} counted")));
                }
                seen.note(format!("{k} requests retried: {n}"));
            }
            match evidence {
                Retried => {}
                RetryAfter => {
                    let lines = shop_log(d, name);
                    let waits: Vec<u64> = lines
                        .iter()
                        .filter(|l| l.contains("retrying") && has_field(l, "kind", "rate_limited"))
                        .filter_map(|l| log_number(l, "delay_ms"))
                        .collect();
                    seen.note(format!("waits before retrying (ms): {waits:?}"));
                    if waits.is_empty() || waits.iter().any(|&w| w < RETRY_AFTER_S * 1000) {
                        let relevant: Vec<&String> =
                            lines.iter().filter(|l| l.contains("retrying")).collect();
                        return Err(seen.fail(format!(
                            "Retry-After ({RETRY_AFTER_S}s) not honoured as a wait: {relevant:#?}"
                        )));
                    }
                }
                Relogin => {
                    let now = sim.counters().m1_logins;
                    if now != logins + 1 {
                        return Err(seen.fail(format!(
                            "expected exactly one new login, saw {logins} → {now}"
                        )));
                    }
                }
            }
        }
        Problem(..) | Refused(..) | Healthy => {
            return Err(seen.fail("a probe expectation on a sync row"));
        }
    }
    clear(row, sim);
    Ok(())
}

#[test]
fn matrix() {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (probe_d, sync_d) = std::thread::scope(|s| {
        let p = s.spawn(|| Daemon::start(PROBE_DAEMON));
        let q = s.spawn(|| Daemon::start(SYNC_DAEMON));
        (p.join().unwrap(), q.join().unwrap())
    });
    let ctx = Ctx {
        rt: &rt,
        probe_d: &probe_d,
        sync_d: &sync_d,
    };
    let results: Vec<Result<String, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = ROWS
            .iter()
            .map(|row| {
                let ctx = &ctx;
                s.spawn(move || run_row(ctx, row))
            })
            .collect();
        handles
            .into_iter()
            .zip(ROWS)
            .map(|(h, row)| {
                h.join()
                    .unwrap_or_else(|_| Err(format!("row {}: panicked", row.id())))
            })
            .collect()
    });
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    for r in results.iter().flatten() {
        eprintln!("ok {r}");
    }
    eprintln!(
        "fault matrix: {} rows, {} failed, {:.1}s",
        ROWS.len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n\n{}\n\nprobe daemon log tail:\n{}\nsync daemon log tail:\n{}",
        failures.len(),
        ROWS.len(),
        failures
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n\n"),
        tail(&probe_d.log(), 40),
        tail(&sync_d.log(), 40),
    );
}

/// The last `n` lines at INFO or above.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s
        .lines()
        .filter(|l| {
            [" INFO ", " WARN ", " ERROR "]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Every fault mode of the simulator is in the matrix, on both platforms
/// and in both phases.
#[test]
fn matrix_covers_every_fault_mode() {
    // Does not compile when the simulator gains a mode: add rows for it.
    fn listed(f: &Fault) -> bool {
        match f {
            Fault::None => false,
            Fault::Down
            | Fault::Maintenance
            | Fault::Html200
            | Fault::Slow(_)
            | Fault::Flaky { .. }
            | Fault::Truncated
            | Fault::Garbage
            | Fault::RateLimited { .. }
            | Fault::Redirect { .. }
            | Fault::Oversized { .. }
            | Fault::Bom
            | Fault::PhpNotice
            | Fault::Hangup
            | Fault::HugeHeaders { .. }
            | Fault::Latin1
            | Fault::HugePage { .. }
            | Fault::Message { .. }
            | Fault::M1InfoFault { .. }
            | Fault::M1InfoWrongId { .. }
            | Fault::M1ListIgnoresRange
            | Fault::M1HugeSession { .. }
            | Fault::ShortTotal { .. }
            | Fault::PartialListing { .. }
            | Fault::Endless { .. } => true,
        }
    }
    // The platforms a mode concerns (each needs a probe and a sync row).
    fn platforms(f: &Fault) -> &'static [P] {
        match f {
            Fault::M1InfoFault { .. }
            | Fault::M1InfoWrongId { .. }
            | Fault::M1ListIgnoresRange
            | Fault::M1HugeSession { .. } => &[M1],
            Fault::HugePage { .. } => &[M2],
            Fault::ShortTotal { .. } | Fault::PartialListing { .. } | Fault::Endless { .. } => {
                &[M2]
            }
            _ => &[M1, M2],
        }
    }
    let modes = [
        Fault::Down,
        Fault::Maintenance,
        Fault::Html200,
        Fault::Slow(SLOW),
        Fault::Flaky { every: 3 },
        Fault::Truncated,
        Fault::Garbage,
        Fault::RateLimited {
            retry_after_s: RETRY_AFTER_S,
        },
        Fault::Redirect {
            status: 307,
            to: REDIRECT_TO.to_string(),
        },
        Fault::Oversized { bytes: OVERSIZE },
        Fault::Bom,
        Fault::PhpNotice,
        Fault::Hangup,
        Fault::HugeHeaders { count: 2000 },
        Fault::Latin1,
        Fault::HugePage { items: HUGE_PAGE },
        Fault::Message {
            message: MESSAGE_TEXT.into(),
        },
        Fault::M1InfoFault { code: 1, every: 3 },
        Fault::M1InfoWrongId { every: 2 },
        Fault::M1ListIgnoresRange,
        Fault::M1HugeSession {
            bytes: HUGE_SESSION,
        },
        Fault::ShortTotal { total: 3 },
        Fault::PartialListing { items: 10 },
        Fault::Endless { total: 1 },
    ];
    for m in modes.iter().filter(|m| listed(m)) {
        for &p in platforms(m) {
            for phase in [Probe, Sync] {
                let n = ROWS
                    .iter()
                    .filter(|r| {
                        let mode = match &r.sit.inject {
                            Inject::Mode(f) => Some(f.name()),
                            Inject::RedirectAway => Some("redirect"),
                            _ => None,
                        };
                        mode == Some(m.name()) && r.p == p && r.phase == phase
                    })
                    .count();
                // More than one when a mode is met with several settings
                // (fault 1 and fault 101 of `m1_info_fault`).
                assert!(n >= 1, "{} × {p:?} × {phase:?}: no row", m.name());
            }
        }
    }
    let mut ids: Vec<String> = ROWS.iter().map(Row::id).collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate rows");
}

// ---------------------------------------------------------------------------
// README
// ---------------------------------------------------------------------------

const BEGIN: &str = "<!-- troubleshooting:begin (generated by tests/it/faults.rs from its fault matrix and the hints in src/health.rs; edit those, then run COBBYD_BLESS=1 cargo test --release --test it faults::) -->";
const END: &str = "<!-- troubleshooting:end -->";

fn code(s: &str) -> String {
    format!("`{s}`")
}

/// The status cell of a probe row.
fn status_cell(e: Expect) -> String {
    match e {
        Problem(st, k) => format!("{} · {}", code(st), code(k.as_str())),
        Recovers(Some(k), _) => format!(
            "{} · {} for one probe, then {}",
            code("degraded"),
            code(k.as_str()),
            code("healthy")
        ),
        Recovers(None, Relogin) => format!("{} (logs in again)", code("healthy")),
        Healthy => format!("{} (the probe does not meet it)", code("healthy")),
        _ => String::new(),
    }
}

/// The sync cell of a sync row.
fn sync_cell(e: Expect) -> String {
    match e {
        RunFails(k, 1) => format!("fails at once: {}", code(k.as_str())),
        RunFails(k, n) => format!("fails after {n} attempts: {}", code(k.as_str())),
        RunOk => "ok: the sync is not affected".to_string(),
        Recovers(_, Retried) => "ok: failed requests are retried".to_string(),
        Recovers(_, RetryAfter) => "ok: waits as `Retry-After` asks, then retries".to_string(),
        Recovers(_, Relogin) => "ok: logs in again and repeats the call".to_string(),
        Refused(..) => "not started (409 `shop_unhealthy`)".to_string(),
        RunOkRepaired => "ok: the product is kept with U+FFFD for each bad byte; a warning names it (SKU, id, byte offset)".to_string(),
        Partial(k) => format!(
            "ends {} ({}): nothing deleted, those products keep their mirrored copy, the checkpoint stays",
            code("partial"),
            code(k.as_str())
        ),
        FullFails(k) => format!(
            "a full sync stops at once: {}, nothing deleted",
            code(k.as_str())
        ),
        Problem(..) | Healthy => String::new(),
    }
}

fn expect_kind(e: Expect) -> Option<FailureKind> {
    match e {
        Problem(_, k) | RunFails(k, _) | Refused(_, k) | Partial(k) | FullFails(k) => Some(k),
        Recovers(k, _) => k,
        RunOk | Healthy | RunOkRepaired => None,
    }
}

fn platform_label(p: Option<P>) -> &'static str {
    match p {
        Some(M1) => "Magento 1",
        Some(M2) => "Magento 2",
        None => "both",
    }
}

/// The generated section, markers included.
fn troubleshooting_md() -> String {
    let mut out = String::new();
    out.push_str(BEGIN);
    out.push_str(
        "\n\nWhat `cobbyd status` shows when a shop misbehaves, what a sync does about it, and the hint status prints. Every line is a row of the fault matrix (`tests/it/faults.rs`), checked against the simulator on every test run.\n\n",
    );
    out.push_str("| the shop | platform | `cobbyd status` | a sync | hint |\n| --- | --- | --- | --- | --- |\n");
    // One line per situation and platform; both platforms in one line when
    // everything but the platform is the same.
    let mut situations: Vec<&Situation> = Vec::new();
    for r in ROWS {
        if !situations.iter().any(|s| s.id == r.sit.id) {
            situations.push(r.sit);
        }
    }
    let mut covered: Vec<FailureKind> = Vec::new();
    for sit in situations {
        let mut lines: Vec<(P, [String; 3])> = Vec::new();
        for p in [M1, M2] {
            let rows: Vec<&Row> = ROWS
                .iter()
                .filter(|r| r.sit.id == sit.id && r.p == p)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let find = |ph: Phase| rows.iter().find(|r| r.phase == ph);
            let status = find(Probe).map_or("—".to_string(), |r| status_cell(r.expect));
            let sync = find(Sync).map_or("—".to_string(), |r| sync_cell(r.expect));
            let mut kinds: Vec<FailureKind> = Vec::new();
            for r in &rows {
                if let Some(k) = expect_kind(r.expect)
                    && !kinds.contains(&k)
                {
                    kinds.push(k);
                }
            }
            covered.extend(kinds.iter().copied());
            let hint = if kinds.is_empty() {
                "—".to_string()
            } else {
                kinds
                    .iter()
                    .map(|&k| rows[0].hint(k))
                    .collect::<Vec<_>>()
                    .join("<br>")
            };
            lines.push((p, [status, sync, hint]));
        }
        let merged = lines.len() == 2 && lines[0].1 == lines[1].1;
        for (i, (p, cells)) in lines.iter().enumerate() {
            if merged && i == 1 {
                continue;
            }
            let label = platform_label(if merged { None } else { Some(*p) });
            let what = if i == 0 { sit.what } else { "〃" };
            let _ = writeln!(
                out,
                "| {what} | {label} | {} | {} | {} |",
                cells[0], cells[1], cells[2]
            );
        }
    }
    out.push_str(
        "\nThe other kinds status can show (no simulated fault produces them; `a` → `b`: `a` at first, `b` once the shop has failed for `probe.down_after`):\n\n| kind | platform | state | hint |\n| --- | --- | --- | --- |\n",
    );
    let down_after = Duration::from_secs(300);
    for k in FailureKind::ALL {
        if covered.contains(&k) {
            continue;
        }
        let err = cobbyd::magento::ShopError::new(k, "");
        let first = cobbyd::health::state_for(&err, Duration::ZERO, down_after);
        let later = cobbyd::health::state_for(&err, down_after * 2, down_after);
        let st = if first == later {
            code(first.as_str())
        } else {
            format!("{} → {}", code(first.as_str()), code(later.as_str()))
        };
        let hints: Vec<(Platform, &str)> = cobbyd::health::all_hints()
            .into_iter()
            .filter(|(kk, _, _)| *kk == k)
            .map(|(_, p, h)| (p, h))
            .collect();
        let same = hints.windows(2).all(|w| w[0].1 == w[1].1);
        for (i, (p, h)) in hints.iter().enumerate() {
            if same && i > 0 {
                continue;
            }
            let label = if same {
                "both"
            } else if *p == Platform::Magento1 {
                "Magento 1"
            } else {
                "Magento 2"
            };
            let _ = writeln!(out, "| {} | {label} | {st} | {h} |", code(k.as_str()));
        }
    }
    out.push('\n');
    out.push_str(END);
    out
}

fn readme_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")
}

/// README.md's troubleshooting section is exactly what the matrix and
/// health.rs generate.
#[test]
fn readme_troubleshooting_is_generated() {
    let path = readme_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let want = troubleshooting_md();
    let (Some(b), Some(e)) = (text.find("<!-- troubleshooting:begin"), text.find(END)) else {
        panic!(
            "{}: no `<!-- troubleshooting:begin ... -->` … `{END}` markers",
            path.display()
        );
    };
    let have = &text[b..e + END.len()];
    if have == want {
        return;
    }
    if std::env::var_os("COBBYD_BLESS").is_some_and(|v| v == "1") {
        let new = format!("{}{want}{}", &text[..b], &text[e + END.len()..]);
        std::fs::write(&path, new).unwrap();
        eprintln!("rewrote the troubleshooting section of {}", path.display());
        return;
    }
    // Line numbers in README.md.
    let first = text[..b].lines().count() + 1;
    let old: Vec<&str> = have.lines().collect();
    let new: Vec<&str> = want.lines().collect();
    let mut diff = String::new();
    for i in 0..old.len().max(new.len()) {
        match (old.get(i), new.get(i)) {
            (Some(a), Some(b)) if a == b => {}
            (a, b) => {
                if let Some(a) = a {
                    let _ = writeln!(diff, "README.md:{}: - {a}", first + i);
                }
                if let Some(b) = b {
                    let _ = writeln!(diff, "README.md:{}: + {b}", first + i);
                }
            }
        }
    }
    panic!(
        "README.md's troubleshooting section is out of date (- README, + generated):\n{diff}\nregenerate it with: COBBYD_BLESS=1 cargo test --release --test it faults::"
    );
}
