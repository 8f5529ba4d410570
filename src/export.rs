//! Streams a mirror out in constant memory: JSONL (the stored JSON, one
//! product per line, untouched) or CSV (RFC 4180, UTF-8) with the header
//! `sku,id,type,name,status,visibility,price,updated_at` followed by the
//! custom attributes sorted by code.
//!
//! A blocking thread walks the mirror's data tree and hands 64 KiB chunks to the
//! response through a bounded channel, so a slow reader slows the walk
//! instead of growing a buffer.

use bytes::Bytes;
use futures_util::Stream;
use serde_json::Value;
use std::collections::BTreeSet;

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

/// The export as a stream of chunks.
pub fn stream(
    mirror: crate::mirror::Mirror,
    format: Format,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let result = match format {
            Format::Jsonl => write_jsonl(&mirror, &tx),
            Format::Csv => write_csv(&mirror, &tx),
        };
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
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
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), String> {
    // First pass: the set of custom attribute codes (bounded), for the header.
    let mut codes = BTreeSet::new();
    for json in mirror.json_values() {
        let json = json.map_err(|e| e.to_string())?;
        let Ok(json) = serde_json::from_slice::<Value>(&json) else {
            continue;
        };
        for (code, _) in flatten(&json).1 {
            if codes.len() < MAX_COLUMNS && !CSV_FIXED.contains(&code.as_str()) {
                codes.insert(code);
            }
        }
    }
    let codes: Vec<String> = codes.into_iter().collect();
    let mut w = csv_writer(Vec::with_capacity(CHUNK + 4096));
    let header: Vec<&str> = CSV_FIXED
        .iter()
        .copied()
        .chain(codes.iter().map(String::as_str))
        .collect();
    w.write_record(&header).map_err(|e| e.to_string())?;
    let mut row: Vec<String> = Vec::with_capacity(header.len());
    for json in mirror.json_values() {
        let json = json.map_err(|e| e.to_string())?;
        let json = serde_json::from_slice::<Value>(&json).map_err(|e| e.to_string())?;
        let (fixed, custom) = flatten(&json);
        row.clear();
        row.extend(fixed);
        for code in &codes {
            row.push(
                custom
                    .iter()
                    .find(|(c, _)| c == code)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
            );
        }
        w.write_record(&row).map_err(|e| e.to_string())?;
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
}
