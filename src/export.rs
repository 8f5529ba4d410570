//! Streams a mirror out in constant memory: JSONL (the stored JSON, one
//! product per line, untouched) or CSV (RFC 4180, UTF-8) with the header
//! `sku,id,type,name,status,visibility,price,updated_at` followed by the
//! custom attributes sorted by code.
//!
//! A blocking thread walks the mirror's data tree and hands 64 KiB chunks to the
//! response through a bounded channel, so a slow reader slows the walk
//! instead of growing a buffer.
//!
//! CSV is for spreadsheets, so two things differ from the stored JSON:
//! - A cell that a spreadsheet would run as a formula (it begins with `=`,
//!   `+`, `-`, `@`, a tab or a carriage return, and is not simply a
//!   number such as `-12.5`) gets a leading `'` (OWASP's advice against CSV
//!   injection), header cells included. JSONL stays exact.
//! - A product that does not read as JSON a spreadsheet row can be made of
//!   (nested deeper than serde_json's 128 levels, a lone surrogate such as
//!   `\ud800` in a string) is still exported: what reads is kept, a bad
//!   string is decoded with U+FFFD in place of what does not decode, what is
//!   nested too deep is left out, and the last column, `_export_problem`
//!   (present only when some product has one), says what was done. The
//!   daemon logs a warning naming the SKUs; the CLI prints one on stderr.

use bytes::Bytes;
use futures_util::Stream;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::{BTreeMap, BTreeSet};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

const CHUNK: usize = 64 * 1024;
/// Chunks in flight between the walker and the socket.
const IN_FLIGHT: usize = 8;
/// More distinct custom attributes than this are not columns (a guard
/// against a header that no spreadsheet opens).
const MAX_COLUMNS: usize = 2000;

/// The fixed leading CSV columns.
pub const CSV_FIXED: [&str; 8] = [
    "sku",
    "id",
    "type",
    "name",
    "status",
    "visibility",
    "price",
    "updated_at",
];

/// Where each of [`CSV_FIXED`] comes from in a Magento 2 item.
const M2_KEYS: [&str; 8] = [
    "sku",
    "id",
    "type_id",
    "name",
    "status",
    "visibility",
    "price",
    "updated_at",
];
/// Where each of [`CSV_FIXED`] comes from in a Magento 1 `catalog_product.info` answer.
const M1_KEYS: [&str; 8] = [
    "sku",
    "product_id",
    "type",
    "name",
    "status",
    "visibility",
    "price",
    "updated_at",
];

/// The header column of the products that could not be exported as they
/// are.
pub const PROBLEM_COLUMN: &str = "_export_problem";
/// SKUs of such products named in the log and in the answer's header.
const NAMED_PROBLEMS: usize = 10;

/// What the first pass over a mirror found, before a CSV export is sent:
/// the custom attribute columns, and the products that have a problem.
#[derive(Debug, Default)]
pub struct CsvPlan {
    codes: Vec<String>,
    /// Products exported with a problem marked.
    pub problems: u64,
    /// The first [`NAMED_PROBLEMS`] of their SKUs.
    pub problem_skus: Vec<String>,
}

/// The first pass of a CSV export (blocking: run it off the async
/// workers): the header's custom attribute codes (bounded) and the
/// products that do not read as they are.
pub fn plan_csv(mirror: &crate::mirror::Mirror) -> Result<CsvPlan, String> {
    let mut codes = BTreeSet::new();
    let mut plan = CsvPlan::default();
    for json in mirror.json_values() {
        let json = json.map_err(|e| e.to_string())?;
        let p = read_product(&json);
        if let Some(problem) = &p.problem {
            plan.problems += 1;
            if plan.problem_skus.len() < NAMED_PROBLEMS {
                plan.problem_skus.push(p.fixed[0].clone());
            }
            tracing::debug!(sku = %crate::logging::escape(&p.fixed[0]), "CSV export: {problem}");
        }
        for (code, _) in p.custom {
            if codes.len() < MAX_COLUMNS && !CSV_FIXED.contains(&code.as_str()) {
                codes.insert(code);
            }
        }
    }
    if plan.problems > 0 {
        let skus: Vec<String> = plan
            .problem_skus
            .iter()
            .map(|s| crate::logging::escape(s).into_owned())
            .collect();
        tracing::warn!(
            products = plan.problems,
            "CSV export: {} product(s) could not be exported as stored; exported with the problem in the {PROBLEM_COLUMN} column: {}{}",
            plan.problems,
            skus.join(", "),
            if plan.problems > skus.len() as u64 {
                ", ..."
            } else {
                ""
            }
        );
    }
    plan.codes = codes.into_iter().collect();
    Ok(plan)
}

/// A product as a CSV row reads it.
struct Product {
    fixed: Vec<String>,
    custom: Vec<(String, String)>,
    problem: Option<String>,
}

fn read_product(json: &[u8]) -> Product {
    match serde_json::from_slice::<Value>(json) {
        Ok(v) => {
            let (fixed, custom) = flatten(&v);
            Product {
                fixed,
                custom,
                problem: None,
            }
        }
        Err(e) => {
            let mut problems = Vec::new();
            let v = match serde_json::from_slice::<&RawValue>(json) {
                Ok(raw) => lenient(raw, "", 0, &mut problems),
                Err(_) => {
                    problems.push(format!("not JSON ({e}); nothing of it exported"));
                    Value::Null
                }
            };
            if problems.is_empty() {
                problems.push(format!("does not read as JSON: {e}"));
            }
            let (fixed, custom) = flatten(&v);
            Product {
                fixed,
                custom,
                problem: Some(problems.join("; ")),
            }
        }
    }
}

/// Levels [`lenient`] descends looking for the part that does not read.
const LENIENT_DEPTH: usize = 6;
/// Problems noted per product.
const MAX_PROBLEMS: usize = 8;

/// Reads what can be read of a JSON value that serde_json refuses as a
/// whole: objects and arrays member by member, strings with U+FFFD for
/// what does not decode; a part still refused `LENIENT_DEPTH` levels down
/// is left out (null). Each loss is noted in `problems`, under its path.
fn lenient(raw: &RawValue, path: &str, depth: usize, problems: &mut Vec<String>) -> Value {
    let text = raw.get();
    let err = match serde_json::from_str::<Value>(text) {
        Ok(v) => return v,
        Err(e) => e,
    };
    let mut note = |what: String| {
        if problems.len() < MAX_PROBLEMS {
            let at = if path.is_empty() { "the product" } else { path };
            problems.push(format!("{at}: {what}"));
        }
    };
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match text.trim_start().as_bytes().first() {
        Some(b'"') => {
            let (s, lossy) = decode_string_lossy(text.trim());
            if lossy {
                note("a string with an invalid escape (a lone surrogate such as \\ud800); exported with U+FFFD in its place".into());
            }
            Value::String(s)
        }
        _ if depth >= LENIENT_DEPTH => {
            note(format!("left out: {}", reason(&err)));
            Value::Null
        }
        Some(b'{') => match serde_json::from_str::<BTreeMap<String, &RawValue>>(text) {
            Ok(members) => {
                let mut out = serde_json::Map::new();
                for (k, v) in members {
                    let p = join(&k);
                    out.insert(k, lenient(v, &p, depth + 1, problems));
                }
                Value::Object(out)
            }
            Err(_) => {
                note(format!("left out: {}", reason(&err)));
                Value::Null
            }
        },
        Some(b'[') => match serde_json::from_str::<Vec<&RawValue>>(text) {
            Ok(items) => Value::Array(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| lenient(v, &join(&i.to_string()), depth + 1, problems))
                    .collect(),
            ),
            Err(_) => {
                note(format!("left out: {}", reason(&err)));
                Value::Null
            }
        },
        _ => {
            note(format!("left out: {}", reason(&err)));
            Value::Null
        }
    }
}

/// The export as a stream of chunks. A CSV export takes the plan of its
/// first pass ([`plan_csv`]).
pub fn stream(
    mirror: crate::mirror::Mirror,
    format: Format,
    plan: Option<CsvPlan>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let result = match format {
            Format::Jsonl => write_jsonl(&mirror, &tx),
            Format::Csv => match plan {
                Some(plan) => write_csv(&mirror, &plan, &tx),
                None => plan_csv(&mirror).and_then(|plan| write_csv(&mirror, &plan, &tx)),
            },
        };
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}

/// Why serde_json refused a value, for the problem column.
fn reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if text.contains("recursion limit") {
        "nested more than 128 levels deep".into()
    } else {
        // "... at line 1 column 5": the position means nothing to a reader.
        text.split(" at line ").next().unwrap_or(&text).to_string()
    }
}

/// Decodes a JSON string literal (quotes included), putting U+FFFD for an
/// escape that does not decode (a lone surrogate). True when it did so.
fn decode_string_lossy(lit: &str) -> (String, bool) {
    let inner = lit
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(lit);
    let mut out = String::with_capacity(inner.len());
    let mut lossy = false;
    let mut chars = inner.chars().peekable();
    let hex4 = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| -> Option<u32> {
        let mut n = 0;
        for _ in 0..4 {
            n = n * 16 + chars.next()?.to_digit(16)?;
        }
        Some(n)
    };
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('u') => match hex4(&mut chars) {
                Some(hi @ 0xD800..=0xDBFF) => {
                    let mut ahead = chars.clone();
                    let lo = (ahead.next() == Some('\\') && ahead.next() == Some('u'))
                        .then(|| hex4(&mut ahead))
                        .flatten()
                        .filter(|lo| (0xDC00..=0xDFFF).contains(lo));
                    match lo {
                        Some(lo) => {
                            chars = ahead;
                            let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                            out.push(char::from_u32(c).unwrap_or('\u{fffd}'));
                        }
                        None => {
                            out.push('\u{fffd}');
                            lossy = true;
                        }
                    }
                }
                Some(n) => match char::from_u32(n) {
                    Some(c) => out.push(c),
                    None => {
                        out.push('\u{fffd}');
                        lossy = true;
                    }
                },
                None => {
                    out.push('\u{fffd}');
                    lossy = true;
                }
            },
            Some(other) => out.push(other),
            None => {}
        }
    }
    (out, lossy)
}

/// True when a spreadsheet would take the cell for a formula: it begins
/// with `=`, `+`, `-`, `@`, a tab or a carriage return (OWASP, "CSV
/// Injection") and is not simply a number.
fn is_formula_like(cell: &str) -> bool {
    let Some(first) = cell.chars().next() else {
        return false;
    };
    if !matches!(first, '=' | '+' | '-' | '@' | '\t' | '\r') {
        return false;
    }
    let number = cell
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
        && cell.chars().any(|c| c.is_ascii_digit())
        && cell.parse::<f64>().is_ok();
    !number
}

/// A cell as the CSV carries it: formula-like text neutralised with a
/// leading `'`.
fn cell(s: &str) -> std::borrow::Cow<'_, str> {
    if is_formula_like(s) {
        std::borrow::Cow::Owned(format!("'{s}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Sends a chunk; false when the reader went away.
fn send(tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>, buf: &mut Vec<u8>) -> bool {
    let chunk = Bytes::from(std::mem::take(buf));
    buf.reserve(CHUNK);
    tx.blocking_send(Ok(chunk)).is_ok()
}

fn write_jsonl(
    mirror: &crate::mirror::Mirror,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), String> {
    let mut buf = Vec::with_capacity(CHUNK + 4096);
    for json in mirror.json_values() {
        let json = json.map_err(|e| e.to_string())?;
        buf.extend_from_slice(&json);
        buf.push(b'\n');
        if buf.len() >= CHUNK && !send(tx, &mut buf) {
            return Ok(());
        }
    }
    if !buf.is_empty() {
        send(tx, &mut buf);
    }
    Ok(())
}

/// The flattened fields of a product: fixed columns plus custom attributes.
/// Magento 2 items carry `custom_attributes`; Magento 1 items carry their
/// attributes at the top level.
pub fn flatten(p: &Value) -> (Vec<String>, Vec<(String, String)>) {
    let text = |v: Option<&Value>| -> String {
        match v {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            // Lists of plain values (category ids, website ids) read best
            // as "3,4" in a spreadsheet.
            Some(Value::Array(items)) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
                items
                    .iter()
                    .map(|i| match i {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            }
            Some(other) => other.to_string(),
        }
    };
    let m1 = p.get("product_id").is_some();
    let keys = if m1 { &M1_KEYS } else { &M2_KEYS };
    let fixed = keys.iter().map(|k| text(p.get(*k))).collect();
    let mut custom = Vec::new();
    if m1 {
        // Magento 1 answers carry `type_id` besides `type`; it is not custom.
        let known = |k: &str| M1_KEYS.contains(&k) || k == "type_id";
        if let Some(obj) = p.as_object() {
            for (k, v) in obj {
                if !known(k) {
                    custom.push((k.clone(), text(Some(v))));
                }
            }
        }
    } else if let Some(attrs) = p.get("custom_attributes").and_then(Value::as_array) {
        for a in attrs {
            if let Some(code) = a.get("attribute_code").and_then(Value::as_str) {
                custom.push((code.to_string(), text(a.get("value"))));
            }
        }
    }
    (fixed, custom)
}

/// RFC 4180: CRLF line ends, quotes doubled, fields quoted when needed.
fn csv_writer(buf: Vec<u8>) -> csv::Writer<Vec<u8>> {
    csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(buf)
}

fn write_csv(
    mirror: &crate::mirror::Mirror,
    plan: &CsvPlan,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), String> {
    let codes = &plan.codes;
    let marked = plan.problems > 0;
    let mut w = csv_writer(Vec::with_capacity(CHUNK + 4096));
    let header: Vec<std::borrow::Cow<'_, str>> = CSV_FIXED
        .iter()
        .copied()
        .chain(codes.iter().map(String::as_str))
        .chain(marked.then_some(PROBLEM_COLUMN))
        .map(cell)
        .collect();
    w.write_record(header.iter().map(|c| c.as_bytes()))
        .map_err(|e| e.to_string())?;
    let mut row: Vec<String> = Vec::with_capacity(header.len());
    for json in mirror.json_values() {
        let json = json.map_err(|e| e.to_string())?;
        let p = read_product(&json);
        row.clear();
        row.extend(p.fixed);
        for code in codes {
            row.push(
                p.custom
                    .iter()
                    .find(|(c, _)| c == code)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
            );
        }
        if marked {
            row.push(p.problem.unwrap_or_default());
        }
        w.write_record(row.iter().map(|c| cell(c).into_owned()))
            .map_err(|e| e.to_string())?;
        if w.get_ref().len() >= CHUNK {
            let mut buf = w.into_inner().map_err(|e| e.to_string())?;
            if !send(tx, &mut buf) {
                return Ok(());
            }
            w = csv_writer(buf);
        }
    }
    let mut buf = w.into_inner().map_err(|e| e.to_string())?;
    if !buf.is_empty() {
        send(tx, &mut buf);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_m2_and_m1() {
        let m2: Value = serde_json::json!({"id": 5, "sku": "a,\"b\"", "type_id": "simple", "name": "Größe <b>", "price": 9.5, "status": 1,
            "visibility": 4, "updated_at": "2024-01-01 00:00:00",
            "custom_attributes": [{"attribute_code": "color", "value": "red"}, {"attribute_code": "category_ids", "value": ["3", "4"]}]});
        let (fixed, custom) = flatten(&m2);
        assert_eq!(
            fixed,
            vec![
                "a,\"b\"",
                "5",
                "simple",
                "Größe <b>",
                "1",
                "4",
                "9.5",
                "2024-01-01 00:00:00"
            ]
        );
        assert_eq!(
            custom,
            vec![
                ("color".into(), "red".into()),
                ("category_ids".into(), "3,4".into())
            ]
        );
        let m1: Value =
            serde_json::json!({"product_id": "7", "sku": "x", "type": "simple", "url_key": "x-1"});
        let (fixed, custom) = flatten(&m1);
        assert_eq!(fixed[1], "7");
        assert_eq!(custom, vec![("url_key".into(), "x-1".into())]);
    }

    #[test]
    fn formula_like_cells_are_neutralised_numbers_are_not() {
        for bad in [
            "=HYPERLINK(\"http://x\")",
            "+cmd",
            "-2+3",
            "@SUM(A1)",
            "\tx",
            "\rx",
            "-",
            "-inf",
            "=1",
        ] {
            assert_eq!(cell(bad), format!("'{bad}"), "{bad:?}");
        }
        for fine in ["-12.5", "+3", "-1e5", "a=b", "", "12", "'=x"] {
            assert_eq!(cell(fine), fine, "{fine:?}");
        }
    }

    #[test]
    fn a_product_serde_refuses_is_read_leniently() {
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let doc = format!(
            r#"{{"id": 5, "sku": "deep-1", "name": "Caf\u00e9 \ud800 x", "custom_attributes": [{{"attribute_code": "color", "value": "red"}}, {{"attribute_code": "junk", "value": {deep}}}]}}"#
        );
        let p = read_product(doc.as_bytes());
        assert_eq!(p.fixed[0], "deep-1");
        assert_eq!(p.fixed[1], "5");
        assert_eq!(p.fixed[3], "Café \u{fffd} x");
        assert!(
            p.custom.contains(&("color".into(), "red".into())),
            "{:?}",
            p.custom
        );
        let problem = p.problem.unwrap();
        assert!(
            problem.contains("name: a string with an invalid escape"),
            "{problem}"
        );
        assert!(
            problem.contains("nested more than 128 levels deep"),
            "{problem}"
        );
        // Surrogate pairs decode.
        assert_eq!(
            decode_string_lossy(r#""\ud83d\ude00\n""#),
            ("😀\n".into(), false)
        );
        // Not JSON at all: still a row, with the problem.
        let p = read_product(b"{nope");
        assert!(p.problem.unwrap().contains("not JSON"));
        assert!(read_product(br#"{"sku": "ok"}"#).problem.is_none());
    }
}
