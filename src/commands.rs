//! The client subcommands: each asks the daemon over the control socket and
//! prints for people (tables, colour on a terminal) or for scripts
//! (`--json`). Exit codes: 0 fine; 1 the answer is bad news (a shop
//! unhealthy, a test failed, a request refused); 3 daemon unreachable;
//! 4 permission or protocol trouble.

use crate::cli::{ExportFormat, ProductsArgs, ShopAddArgs, ShopCommand, StatusArgs, SyncArgs};
use crate::control_client::{Answer, Client, ClientError};
use crate::shop::{AuthMode, Credentials, Platform};
use hyper::Method;
use serde_json::{Value, json};
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::time::Duration;

/// Most bytes read from a credentials file or standard input.
const MAX_CREDENTIALS: u64 = 16 * 1024;

/// Prints an error line and returns its exit code.
fn fail(e: &ClientError) -> u8 {
    eprintln!("cobbyd: {e}");
    e.exit_code()
}

/// Prints a refused request and returns 1.
fn refused(a: &Answer) -> u8 {
    eprintln!("cobbyd: {}", esc(&a.error_message()));
    if let Ok(v) = a.json()
        && let Some(hint) = v["error"]["details"]["hint"].as_str()
    {
        eprintln!("hint: {}", esc(hint));
    }
    1
}

/// Text that may come from a shop, made safe to print (control and bidi
/// characters escaped: [`crate::logging::escape`]). JSON output does not
/// go through it.
fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    crate::logging::escape(s)
}

/// A string field of an answer, escaped for printing.
fn text<'a>(v: &'a Value, default: &'a str) -> std::borrow::Cow<'a, str> {
    esc(v.as_str().unwrap_or(default))
}

/// Colours for people; none for pipes or with `NO_COLOR`.
pub struct Style {
    on: bool,
}

impl Style {
    pub fn detect() -> Style {
        Style {
            on: std::io::stdout().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    pub fn state(&self, state: &str) -> String {
        let code = match state {
            "healthy" => "32",
            "degraded" | "unknown" => "33",
            _ => "31;1",
        };
        self.paint(code, state)
    }

    pub fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }

    pub fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
}

/// "3 min ago" / "in 48 s" for an RFC 3339 time.
pub fn relative(ts: Option<&str>) -> String {
    let Some(t) = ts.and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()) else {
        return "-".into();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds();
    let (n, future) = if secs < 0 {
        (-secs, true)
    } else {
        (secs, false)
    };
    let span = match n {
        0..=1 => {
            return if future {
                "now".into()
            } else {
                "just now".into()
            };
        }
        2..=89 => format!("{n} s"),
        90..=5399 => format!("{} min", (n + 30) / 60),
        5400..=129_599 => format!("{} h", (n + 1800) / 3600),
        _ => format!("{} d", (n + 43_200) / 86_400),
    };
    if future {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// 12345 → "12,345".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn uptime(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m {}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// The one-cell summary of a shop's sync.
pub fn sync_cell(sync: &Value) -> String {
    if let Some(p) = sync.get("progress").filter(|p| !p.is_null()) {
        let done = p["done"].as_u64().unwrap_or(0);
        let rate = p["rate_per_s"].as_f64().unwrap_or(0.0);
        let mut s = format!(
            "{} {}",
            p["kind"].as_str().unwrap_or("sync"),
            p["phase"].as_str().unwrap_or("")
        );
        match (p["percent"].as_f64(), p["total"].as_u64()) {
            (Some(pc), Some(total)) => s.push_str(&format!(
                " {pc:.0}% ({}/{})",
                thousands(done),
                thousands(total)
            )),
            _ => s.push_str(&format!(" {}", thousands(done))),
        }
        s.push_str(&format!(", {}/s", thousands(rate as u64)));
        if let Some(eta) = p["eta_s"].as_u64() {
            s.push_str(&format!(", ETA {}", uptime(eta)));
        }
        return s;
    }
    let state = sync["state"].as_str().unwrap_or("idle");
    match sync.get("last_run").filter(|r| !r.is_null()) {
        Some(r) => format!(
            "{state}, last {} {}",
            r["outcome"].as_str().unwrap_or("?"),
            relative(r["ended_at"].as_str())
        ),
        None => format!("{state}, never synced"),
    }
}

/// Renders `/v1/status` as a table for people.
pub fn render_status(v: &Value, style: &Style) -> String {
    let d = &v["daemon"];
    let shops = v["shops"].as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "{} {} · pid {} · up {} · {} shop{} · state {}\n",
        style.bold("cobbyd"),
        d["version"].as_str().unwrap_or("?"),
        d["pid"],
        uptime(d["uptime_s"].as_u64().unwrap_or(0)),
        shops.len(),
        if shops.len() == 1 { "" } else { "s" },
        d["state_dir"].as_str().unwrap_or("?"),
    );
    if let Some(p) = v.get("storage").filter(|p| !p.is_null()) {
        out.push_str(&format!(
            "\n{} {}: {} (since {})\n  hint: {}\n",
            style.state("storage"),
            p["kind"].as_str().unwrap_or("?"),
            text(&p["message"], ""),
            relative(p["since"].as_str()),
            text(&p["hint"], ""),
        ));
    }
    if shops.is_empty() {
        out.push_str("\nNo shops yet. Add one with `cobbyd shop add NAME --platform magento2 --url URL --credentials-file FILE`.\n");
        return out;
    }
    let header = [
        "SHOP",
        "PLATFORM",
        "STATE",
        "SINCE",
        "LAST PROBE",
        "NEXT PROBE",
        "PRODUCTS",
        "SYNC",
    ];
    let rows: Vec<[String; 8]> = shops
        .iter()
        .map(|s| {
            [
                s["name"].as_str().unwrap_or("?").to_string(),
                s["platform"].as_str().unwrap_or("?").to_string(),
                s["state"].as_str().unwrap_or("?").to_string(),
                relative(s["state_since"].as_str()),
                relative(s["last_probe"].as_str()),
                relative(s["next_probe"].as_str()),
                thousands(s["sync"]["products"].as_u64().unwrap_or(0)),
                sync_cell(&s["sync"]),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    out.push('\n');
    let line = |cells: Vec<String>, raw: &[String]| -> String {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(raw[i].chars().count());
            l.push_str(c);
            if i + 1 < cells.len() {
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        l.push('\n');
        l
    };
    let h: Vec<String> = header.iter().map(|s| s.to_string()).collect();
    out.push_str(&line(h.iter().map(|s| style.dim(s)).collect(), &h));
    for (r, s) in rows.iter().zip(&shops) {
        let mut cells: Vec<String> = r.to_vec();
        cells[2] = style.state(&r[2]);
        out.push_str(&line(cells, r));
        if let Some(p) = s.get("problem").filter(|p| !p.is_null()) {
            out.push_str(&format!(
                "  ↳ {}: {} ({} attempt{}, since {})\n    hint: {}\n",
                text(&p["kind"], "?"),
                text(&p["message"], ""),
                p["attempts"],
                if p["attempts"].as_u64() == Some(1) {
                    ""
                } else {
                    "s"
                },
                relative(p["since"].as_str()),
                text(&p["hint"], ""),
            ));
        }
        if let Some(e) = s["sync"].get("last_error").filter(|e| !e.is_null()) {
            out.push_str(&format!(
                "  ↳ last sync failed: {}: {}\n",
                text(&e["kind"], "?"),
                text(&e["message"], "")
            ));
        }
    }
    // One line for all plain-http shops, not one under each.
    let plain: Vec<&str> = shops
        .iter()
        .filter(|s| s["insecure_http"] == true)
        .filter_map(|s| s["name"].as_str())
        .collect();
    if !plain.is_empty() {
        out.push_str(&format!(
            "\n{} {}: {}\n",
            if plain.len() == 1 { "shop" } else { "shops" },
            plain.join(", "),
            crate::shop::INSECURE_HTTP_NOTE
        ));
    }
    out
}

/// `cobbyd status`.
pub async fn status(client: &Client, args: &StatusArgs) -> u8 {
    let path = match &args.shop {
        Some(s) => format!("/v1/status?shop={}", crate::magento::oauth::encode(s)),
        None => "/v1/status".into(),
    };
    let a = match client.get(&path).await {
        Ok(a) => a,
        Err(e) => return fail(&e),
    };
    if !a.status.is_success() {
        eprintln!("cobbyd: {}", esc(&a.error_message()));
        return if a.status == hyper::StatusCode::NOT_FOUND {
            1
        } else {
            4
        };
    }
    let v = match a.json() {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", render_status(&v, &Style::detect()));
    }
    // Healthy: the probe passed and the last sync did not fail (`healthy`;
    // an older daemon without the field is judged by its state).
    let unhealthy: Vec<String> = v["shops"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter(|s| match s["healthy"].as_bool() {
                    Some(h) => !h,
                    None => s["state"] != "healthy",
                })
                .filter_map(|s| {
                    let name = s["name"].as_str()?;
                    Some(if s["state"] == "healthy" {
                        format!("{name} (last sync failed)")
                    } else {
                        name.to_string()
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let storage = v.get("storage").filter(|p| !p.is_null());
    if let Some(p) = storage {
        eprintln!(
            "cobbyd: not healthy: the state directory cannot be written ({})",
            p["kind"].as_str().unwrap_or("?")
        );
    }
    if unhealthy.is_empty() && storage.is_none() {
        0
    } else if unhealthy.is_empty() {
        1
    } else {
        eprintln!("cobbyd: not healthy: {}", unhealthy.join(", "));
        1
    }
}

/// Reads credentials from a file or `-` (stdin), bounded.
pub fn read_credentials(path: &Path) -> Result<String, String> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .take(MAX_CREDENTIALS + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("reading credentials from standard input: {e}"))?;
    } else {
        let f = std::fs::File::open(path)
            .map_err(|e| format!("credentials file {}: {e}", path.display()))?;
        if let Ok(meta) = f.metadata() {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                eprintln!(
                    "cobbyd: warning: {} is readable by other users; `chmod 600` it",
                    path.display()
                );
            }
        }
        f.take(MAX_CREDENTIALS + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("credentials file {}: {e}", path.display()))?;
    }
    if text.len() as u64 > MAX_CREDENTIALS {
        return Err(format!(
            "credentials: more than {MAX_CREDENTIALS} bytes; is this the right file?"
        ));
    }
    Ok(text)
}

/// Validates credentials locally (clear errors before any network) and
/// returns them as the JSON object the daemon takes. An error names the
/// file and, where it can, the line.
fn credentials_json(path: &Path, platform: Platform, auth: AuthMode) -> Result<Value, String> {
    let text = read_credentials(path)?;
    let source = if path == Path::new("-") {
        "credentials from standard input".to_string()
    } else {
        format!("credentials file {}", path.display())
    };
    Credentials::parse_toml(&text, platform, auth).map_err(
        |e| match crate::shop::credential_line(&text, &e.field) {
            Some(line) => format!("{source}, line {line}: {e}"),
            None => format!("{source}: {e}"),
        },
    )?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    serde_json::to_value(table).map_err(|e| e.to_string())
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A JSON value for people: strings bare, lists comma-separated, objects
/// as `key=value` pairs.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => esc(s).into_owned(),
        Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(", "),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", plain(v)))
            .collect::<Vec<_>>()
            .join(", "),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Rows padded to their columns' widths, two spaces apart; the last
/// column is not padded.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; n];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut l = String::new();
        for (i, c) in r.iter().enumerate() {
            l.push_str(c);
            if i + 1 < r.len() {
                l.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    }
    out
}

/// A shop's authentication as people read it: Magento 1 has no modes (it
/// logs in with the API user and key).
fn auth_cell(s: &Value) -> String {
    if s["platform"] == "magento1" {
        "-".into()
    } else {
        s["auth"].as_str().unwrap_or("?").to_string()
    }
}

/// `shop list`: a header and aligned columns, however long the URLs.
pub fn render_shop_list(v: &Value) -> String {
    let shops = v["shops"].as_array().cloned().unwrap_or_default();
    if shops.is_empty() {
        return "No shops registered.\n".into();
    }
    let mut rows = vec![
        ["NAME", "PLATFORM", "AUTH", "STORES", "URL"]
            .map(String::from)
            .to_vec(),
    ];
    for s in &shops {
        rows.push(vec![
            s["name"].as_str().unwrap_or("?").to_string(),
            s["platform"].as_str().unwrap_or("?").to_string(),
            auth_cell(s),
            s["store_codes"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default(),
            format!(
                "{}{}",
                s["url"].as_str().unwrap_or("?"),
                if s["insecure_http"] == true {
                    " (plain http)"
                } else {
                    ""
                }
            ),
        ]);
    }
    columns(&rows)
}

/// `shop list --retained`: the mirrors removed shops left.
pub fn render_retained(v: &Value) -> String {
    let kept = v["retained"].as_array().cloned().unwrap_or_default();
    if kept.is_empty() {
        return "No kept mirrors: every mirror belongs to a registered shop.\n".into();
    }
    let mut rows = vec![["NAME", "STORE", "PRODUCTS"].map(String::from).to_vec()];
    for m in &kept {
        for st in m["stores"].as_array().into_iter().flatten() {
            rows.push(vec![
                m["name"].as_str().unwrap_or("?").to_string(),
                st["store_code"].as_str().unwrap_or("?").to_string(),
                thousands(st["products"].as_u64().unwrap_or(0)),
            ]);
        }
    }
    let mut out = columns(&rows);
    out.push_str(
        "\nKept by `shop remove` without --purge: `cobbyd products NAME` exports one, `cobbyd shop purge NAME` drops it.\n",
    );
    out
}

/// `shop show`: one `key value` line per field, the keys aligned; the
/// plain-http facts in one line; no auth mode for Magento 1.
pub fn render_shop_show(v: &Value) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (k, val) in v.as_object().into_iter().flatten() {
        match k.as_str() {
            "status" | "allow_insecure_http" => continue,
            "auth" => rows.push(vec![k.clone(), auth_cell(v)]),
            "insecure_http" => {
                if *val == true {
                    let why = if v["allow_insecure_http"] == true {
                        "allowed with --allow-insecure-http"
                    } else {
                        "registered before --allow-insecure-http existed"
                    };
                    rows.push(vec![k.clone(), format!("true ({why})")]);
                } else {
                    rows.push(vec![k.clone(), "false".into()]);
                }
            }
            _ => rows.push(vec![k.clone(), plain(val)]),
        }
    }
    columns(&rows)
}

/// GETs a JSON answer, or the exit code to return (the error already
/// printed).
async fn get_json(client: &Client, path: &str) -> Result<Value, u8> {
    let a = client.get(path).await.map_err(|e| fail(&e))?;
    if !a.status.is_success() {
        return Err(refused(&a));
    }
    a.json().map_err(|e| fail(&e))
}

/// `cobbyd shop ...`.
pub async fn shop(client: &Client, cmd: &ShopCommand) -> u8 {
    match cmd {
        ShopCommand::Add(a) => shop_add(client, a).await,
        ShopCommand::List { json, retained } => {
            let path = if *retained {
                "/v1/shops?retained=true"
            } else {
                "/v1/shops"
            };
            let v = match get_json(client, path).await {
                Ok(v) => v,
                Err(code) => return code,
            };
            if *json {
                print_json(&v);
            } else if *retained {
                print!("{}", render_retained(&v));
            } else {
                print!("{}", render_shop_list(&v));
            }
            0
        }
        ShopCommand::Purge { name } => {
            match client
                .request(
                    Method::DELETE,
                    &format!("/v1/shops/{}/products", crate::magento::oauth::encode(name)),
                    None,
                )
                .await
            {
                Ok(a) if a.status.is_success() => {
                    println!("{name}: kept mirror purged, its products dropped");
                    0
                }
                Ok(a) => refused(&a),
                Err(e) => fail(&e),
            }
        }
        ShopCommand::Show { name, json } => {
            let path = format!("/v1/shops/{}", crate::magento::oauth::encode(name));
            let v = match get_json(client, &path).await {
                Ok(v) => v,
                Err(code) => return code,
            };
            if *json {
                print_json(&v);
            } else {
                print!("{}", render_shop_show(&v));
                let status = json!({"daemon": {}, "shops": [v["status"].clone()]});
                let table = render_status(&status, &Style::detect());
                println!("{}", table.split_once('\n').map(|x| x.1).unwrap_or(""));
            }
            0
        }
        ShopCommand::Test { name, json } => {
            let a = match client
                .request(
                    Method::POST,
                    &format!("/v1/shops/{}/test", crate::magento::oauth::encode(name)),
                    Some(&json!({})),
                )
                .await
            {
                Ok(a) => a,
                Err(e) => return fail(&e),
            };
            if !a.status.is_success() {
                return refused(&a);
            }
            let v = match a.json() {
                Ok(v) => v,
                Err(e) => return fail(&e),
            };
            let ok = v["ok"].as_bool() == Some(true);
            if *json {
                print_json(&v);
            } else if ok {
                println!(
                    "{name}: OK — the shop answers and accepts the credentials ({} ms{}{})",
                    v["latency_ms"],
                    v["version"]
                        .as_str()
                        .map(|s| format!(", Magento {}", esc(s)))
                        .unwrap_or_default(),
                    v["product_count"]
                        .as_u64()
                        .map(|n| format!(", {} products visible", thousands(n)))
                        .unwrap_or_default(),
                );
            } else {
                let p = &v["problem"];
                println!(
                    "{name}: {} — {}: {}",
                    text(&v["state"], "?"),
                    text(&p["kind"], "?"),
                    text(&p["message"], "")
                );
                println!("hint: {}", text(&p["hint"], ""));
            }
            if ok { 0 } else { 1 }
        }
        ShopCommand::Rotate {
            name,
            credentials_file,
        } => {
            let shown = match client
                .get(&format!(
                    "/v1/shops/{}",
                    crate::magento::oauth::encode(name)
                ))
                .await
            {
                Ok(a) if a.status.is_success() => a,
                Ok(a) => return refused(&a),
                Err(e) => return fail(&e),
            };
            let v = shown.json().unwrap_or_default();
            let platform = if v["platform"] == "magento1" {
                Platform::Magento1
            } else {
                Platform::Magento2
            };
            let auth = if v["auth"] == "bearer" {
                AuthMode::Bearer
            } else {
                AuthMode::Oauth
            };
            let creds = match credentials_json(credentials_file, platform, auth) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("cobbyd: {e}");
                    return 1;
                }
            };
            match client
                .request(
                    Method::PUT,
                    &format!(
                        "/v1/shops/{}/credentials",
                        crate::magento::oauth::encode(name)
                    ),
                    Some(&json!({"credentials": creds})),
                )
                .await
            {
                Ok(a) if a.status.is_success() => {
                    println!("{name}: new credentials tested and in use; the old ones are gone.");
                    0
                }
                Ok(a) => refused(&a),
                Err(e) => fail(&e),
            }
        }
        ShopCommand::Remove { name, purge } => {
            match client
                .request(
                    Method::DELETE,
                    &format!(
                        "/v1/shops/{}?purge={purge}",
                        crate::magento::oauth::encode(name)
                    ),
                    None,
                )
                .await
            {
                Ok(a) if a.status.is_success() => {
                    let v = a.json().unwrap_or_default();
                    if v["was_retained"] == true {
                        println!("{name}: was removed already; its kept products are now dropped");
                    } else if *purge {
                        println!("{name}: removed, mirrored products dropped");
                    } else {
                        println!(
                            "{name}: removed; its mirrored products are kept (`cobbyd products {name}` exports them, `cobbyd shop purge {name}` drops them)"
                        );
                    }
                    0
                }
                Ok(a) => refused(&a),
                Err(e) => fail(&e),
            }
        }
    }
}

async fn shop_add(client: &Client, a: &ShopAddArgs) -> u8 {
    if let Err(e) = crate::shop::validate_name(&a.name) {
        eprintln!("cobbyd: {e}");
        return 1;
    }
    let url = match crate::shop::validate_url(&a.url) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("cobbyd: {e}");
            return 1;
        }
    };
    if let Err(e) =
        crate::shop::check_transport(&url, a.allow_insecure_http, a.tls_ca_file.as_deref())
    {
        eprintln!("cobbyd: {e}");
        return 1;
    }
    // The daemon reads the file from its own working directory: send an
    // absolute path.
    let tls_ca_file = match a
        .tls_ca_file
        .as_deref()
        .map(std::path::absolute)
        .transpose()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cobbyd: tls_ca_file: {e}");
            return 1;
        }
    };
    let creds = match credentials_json(&a.credentials_file, a.platform, a.auth) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cobbyd: {e}");
            return 1;
        }
    };
    let body = json!({
        "name": a.name, "platform": a.platform, "url": a.url, "store_codes": a.store_codes,
        "auth": a.auth, "credentials": creds, "no_verify": a.no_verify,
        "allow_insecure_http": a.allow_insecure_http, "tls_ca_file": tls_ca_file,
    });
    match client.request(Method::POST, "/v1/shops", Some(&body)).await {
        Ok(ans) if ans.status.is_success() => {
            let v = ans.json().unwrap_or_default();
            println!(
                "{}: added ({}), state {}{}",
                a.name,
                a.platform,
                text(&v["state"], "unknown"),
                if a.no_verify {
                    " (not verified)"
                } else {
                    "; first sync starts now"
                }
            );
            if v["insecure_http"] == true {
                eprintln!("warning: {}: {}", a.name, crate::shop::INSECURE_HTTP_NOTE);
            }
            0
        }
        Ok(ans) => refused(&ans),
        Err(e) => fail(&e),
    }
}

/// `cobbyd sync NAME [--full] [--wait]`: asks for a run, and with `--wait`
/// follows the run that answers this request (the daemon says which: a
/// newer run of another kind never stands in for it) and exits with its
/// outcome.
pub async fn sync(client: &Client, args: &SyncArgs) -> u8 {
    let name = crate::magento::oauth::encode(&args.name);
    let kind = if args.full { "full" } else { "incremental" };
    let answer = match client
        .request(
            Method::POST,
            &format!("/v1/shops/{name}/sync"),
            Some(&json!({"full": args.full, "allow_mass_delete": args.allow_mass_delete})),
        )
        .await
    {
        Ok(a) if a.status.is_success() => a.json().unwrap_or_default(),
        Ok(a) => return refused(&a),
        Err(e) => return fail(&e),
    };
    let Some(id) = answer["request_id"].as_u64() else {
        eprintln!(
            "cobbyd: the daemon accepted the sync but gave no request id to follow (is it older than this client? restart it)"
        );
        return 4;
    };
    if !args.wait {
        println!(
            "{}: {kind} sync requested (request {id}; `cobbyd sync {} --wait` or GET /v1/shops/{name}/requests/{id} follows it)",
            args.name, args.name
        );
        return 0;
    }
    let path = format!("/v1/shops/{name}/requests/{id}");
    let mut view = WaitView::new(&args.name, std::io::stderr().is_terminal());
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let v = tokio::select! {
            a = client.get(&path) => match a {
                Ok(a) if a.status.is_success() => a.json().unwrap_or_default(),
                Ok(a) => { view.clear(); return refused(&a); }
                Err(e) => { view.clear(); return fail(&e); }
            },
            _ = &mut ctrl_c => return view.interrupted(id),
        };
        match v["state"].as_str().unwrap_or("") {
            "done" => {
                view.clear();
                return print_run_end(&args.name, &v["run"]);
            }
            "running" => view.running(&v),
            _ => {
                let shop_state = v["shop_state"].as_str().unwrap_or("unknown");
                if matches!(shop_state, "down" | "auth_failed" | "misconfigured") {
                    view.clear();
                    eprintln!(
                        "cobbyd: {}: the shop is {shop_state}; the sync (request {id}) will run once it is reachable (`cobbyd status {}`)",
                        args.name, args.name
                    );
                    return 1;
                }
                view.queued(id, kind);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = &mut ctrl_c => return view.interrupted(id),
        }
    }
}

/// Prints a finished run's summary; 0 when it ended `ok`.
fn print_run_end(shop: &str, run: &Value) -> u8 {
    println!(
        "{shop}: {} {} (run {}) — {} fetched, {} created, {} updated, {} unchanged, {} deleted, {} requests in {:.1}s",
        run["kind"].as_str().unwrap_or("sync"),
        run["outcome"].as_str().unwrap_or("?"),
        run["run_id"],
        run["fetched"],
        run["created"],
        run["updated"],
        run["unchanged"],
        run["deleted"],
        run["requests"],
        run["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0
    );
    if run["outcome"] == "ok" {
        return 0;
    }
    if let Some(e) = run.get("error").filter(|e| !e.is_null()) {
        eprintln!(
            "cobbyd: {}: {}",
            text(&e["kind"], "?"),
            text(&e["message"], "")
        );
        if let Some(h) = e["hint"].as_str() {
            eprintln!("hint: {}", esc(h));
        }
    }
    1
}

/// How `sync --wait` shows a run going: a progress bar on a terminal,
/// otherwise a plain line when something changed (at most one a second
/// while products are counted).
struct WaitView {
    shop: String,
    bar: Option<indicatif::ProgressBar>,
    last_line: String,
    last_print: Option<std::time::Instant>,
}

impl WaitView {
    fn new(shop: &str, tty: bool) -> WaitView {
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} {wide_bar:.cyan/blue} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("█▉▊▋▌▍▎▏ "),
            );
            b.set_prefix(shop.to_string());
            b
        });
        WaitView {
            shop: shop.to_string(),
            bar,
            last_line: String::new(),
            last_print: None,
        }
    }

    fn line(&mut self, line: String, counting: bool) {
        if line == self.last_line {
            return;
        }
        // Product counts change all the time: one line a second of them.
        if counting
            && self
                .last_print
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        eprintln!("{}: {line}", self.shop);
        self.last_line = line;
        self.last_print = Some(std::time::Instant::now());
    }

    fn queued(&mut self, id: u64, kind: &str) {
        let msg = format!("request {id} queued: the {kind} sync starts when the shop is free");
        match &self.bar {
            Some(b) => b.set_message(msg),
            None => self.line(msg, false),
        }
    }

    fn running(&mut self, v: &Value) {
        let p = &v["progress"];
        let done = p["done"].as_u64().unwrap_or(0);
        let total = p["total"].as_u64().map(|t| t.max(done));
        let rate = p["rate_per_s"].as_f64().unwrap_or(0.0);
        let eta = p["eta_s"].as_u64().map(uptime);
        let what = format!(
            "run {} {} {}",
            v["run_id"],
            p["kind"].as_str().unwrap_or("sync"),
            p["phase"].as_str().unwrap_or("")
        );
        if let Some(b) = &self.bar {
            b.set_length(total.unwrap_or(done));
            b.set_position(done);
            b.set_message(format!(
                "{}/s · ETA {} · {what}",
                thousands(rate as u64),
                eta.as_deref().unwrap_or("?")
            ));
            return;
        }
        let mut line = format!("{what}: {} products", thousands(done));
        if let Some(t) = total {
            line = format!("{what}: {}/{} products", thousands(done), thousands(t));
            if let Some(pc) = p["percent"].as_f64() {
                line.push_str(&format!(" ({pc:.0}%)"));
            }
        }
        line.push_str(&format!(", {}/s", thousands(rate as u64)));
        if let Some(eta) = eta {
            line.push_str(&format!(", ETA {eta}"));
        }
        self.line(line, true);
    }

    fn clear(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }

    /// Ctrl-C: the client stops following; the daemon keeps the run.
    fn interrupted(&mut self, id: u64) -> u8 {
        self.clear();
        eprintln!(
            "\ncobbyd: stopped waiting; the sync goes on in the daemon (request {id}): `cobbyd status {}` shows it",
            self.shop
        );
        130
    }
}

/// `cobbyd products NAME`.
pub async fn products(client: &Client, args: &ProductsArgs) -> u8 {
    let mut path = format!(
        "/v1/shops/{}/products?format={}",
        crate::magento::oauth::encode(&args.name),
        match args.format {
            ExportFormat::Jsonl => "jsonl",
            ExportFormat::Csv => "csv",
        }
    );
    if let Some(c) = &args.store_code {
        path.push_str(&format!("&store_code={}", crate::magento::oauth::encode(c)));
    }
    let mut out = tokio::io::stdout();
    let warn = |h: &hyper::HeaderMap| {
        let n = h
            .get(crate::routes::EXPORT_PROBLEMS)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0");
        if n == "0" {
            return;
        }
        let skus: Vec<String> = h
            .get(crate::routes::EXPORT_PROBLEM_SKUS)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| crate::logging::escape(&percent_decode(s)).into_owned())
            .collect();
        eprintln!(
            "cobbyd: warning: {n} product(s) could not be exported as stored; each is exported with its problem in the `{}` column (SKU {}{})",
            crate::export::PROBLEM_COLUMN,
            skus.join(", "),
            if n.parse::<usize>().is_ok_and(|n| n > skus.len()) {
                ", ..."
            } else {
                ""
            }
        );
    };
    match client.stream_to(&path, &mut out, warn).await {
        Ok(Ok(())) => 0,
        Ok(Err(a)) => refused(&a),
        Err(e) => fail(&e),
    }
}

/// Undoes the percent-encoding of a header value (lossy for bytes that do
/// not form UTF-8).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(n) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(n);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
