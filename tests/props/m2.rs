//! Magento 2 JSON bodies: product pages, id listings, error bodies,
//! storeConfigs.

use cobbyd::fuzzing;
use cobbyd::magento::m2;
use proptest::prelude::*;
use serde_json::{Value, json};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "%1",
            "%2",
            "%name",
            "%resources",
            "total_count",
            "items"
        ])
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "items",
                        "total_count",
                        "id",
                        "sku",
                        "updated_at",
                        "message",
                        "parameters",
                        "search_criteria",
                        "x"
                    ]),
                    inner
                ),
                0..5
            )
            .prop_map(|kv| Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

fn item() -> impl Strategy<Value = (i64, String, String, Value)> {
    (
        any::<i64>(),
        ".{0,10}",
        "20[0-9]{2}-[01][0-9]-[0-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-5][0-9]",
        json_value(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_json_is_data_or_a_clean_error(v in json_value()) {
        fuzzing::check_m2(v.to_string().as_bytes());
    }

    #[test]
    fn arbitrary_bytes_are_a_clean_error(data in prop::collection::vec(any::<u8>(), 0..300)) {
        fuzzing::check_m2(&data);
    }

    /// A page as a shop sends it (ids as numbers or strings, extra keys)
    /// parses to the same keys, and each item's raw JSON is the item sent.
    #[test]
    fn pages_keep_their_items(items in prop::collection::vec(item(), 0..8),
                              as_string in any::<bool>(), total in any::<u64>()) {
        let sent: Vec<Value> = items.iter().map(|(id, sku, ts, extra)| {
            let id = if as_string { json!(id.to_string()) } else { json!(id) };
            json!({"id": id, "sku": sku, "updated_at": ts, "extension_attributes": extra})
        }).collect();
        let body = json!({"items": sent, "search_criteria": {}, "total_count": total}).to_string();
        let page = fuzzing::parse_m2_page(body.as_bytes(), None).unwrap();
        prop_assert_eq!(page.total_count, total);
        prop_assert_eq!(page.items.len(), items.len());
        for ((id, sku, ts, _), (got, raw)) in items.iter().zip(page.items.iter().zip(&sent)) {
            prop_assert_eq!(got.id, *id);
            prop_assert_eq!(&got.sku, sku);
            prop_assert_eq!(&got.updated_at, ts);
            prop_assert_eq!(got.raw.get(), raw.to_string());
        }
        fuzzing::check_m2(body.as_bytes());
    }

    /// Id listings (`fields=items[id,sku,updated_at],total_count`): an item
    /// without a key the fields asked for is refused, naming the key.
    #[test]
    fn listings_name_the_missing_key(drop in 0usize..3, n in 1usize..5) {
        let keys = ["id", "sku", "updated_at"];
        let mut items = Vec::new();
        for i in 0..n {
            let mut o = json!({"id": i, "sku": format!("s{i}"), "updated_at": "2024-01-01 00:00:00"});
            if i == n - 1 {
                o.as_object_mut().unwrap().remove(keys[drop]);
            }
            items.push(o);
        }
        let body = json!({"items": items, "total_count": n}).to_string();
        let e = fuzzing::parse_m2_page(body.as_bytes(), Some("items[id,sku,updated_at],total_count")).unwrap_err();
        prop_assert!(e.message.contains(keys[drop]) && e.message.contains(&format!("item {}", n - 1)), "{}", e.message);
    }

    /// Error bodies: the message with its placeholders filled, never longer
    /// than the cap, whatever the parameters.
    #[test]
    fn error_messages_are_filled_and_bounded(msg in "([a-z ]{0,5}%[0-9a-z]{1,3}){0,6}", params in json_value(),
                                             reps in 1usize..2000) {
        let body = json!({"message": msg.repeat(reps), "parameters": params}).to_string();
        fuzzing::check_m2(body.as_bytes());
    }

    #[test]
    fn placeholders_fill_like_strtr(name in "[a-z]{1,6}", value in "[A-Z ]{0,10}") {
        let msg = format!("x %{name} y %{name}");
        let filled = m2::fill_placeholders(&msg, Some(&json!({ name.clone(): value.clone() })));
        prop_assert_eq!(filled, format!("x {value} y {value}"));
    }
}

/// Found by the property above: `"%1%1%1…"` with a long `%1` used to grow
/// quadratically (hundreds of MB for a 2 MB body) and many parameters made
/// every character a scan of all of them.
#[test]
fn hostile_error_bodies_stay_cheap() {
    let long = "A".repeat(1 << 20);
    let body = json!({"message": "%1".repeat(500_000), "parameters": [long]}).to_string();
    fuzzing::check_m2(body.as_bytes());
    let many: Vec<&str> = vec![""; 400_000];
    let body = json!({"message": "%1".repeat(500_000), "parameters": many}).to_string();
    fuzzing::check_m2(body.as_bytes());
    let m = m2::fill_placeholders(&"%1".repeat(500_000), Some(&json!([long])));
    assert!(m.len() < 4096, "{} bytes", m.len());
}

/// Deeply nested JSON (in a page, an item, an error body, storeConfigs)
/// is refused by serde_json's depth limit, never a stack overflow.
#[test]
fn deep_nesting_is_refused() {
    let deep = |open: &str| open.repeat(1_000_000);
    for body in [
        deep("["),
        format!("{{\"items\":{}", deep("[")),
        format!("{{\"items\":[{}", deep("{\"a\":")),
        format!("{{\"message\":\"m\",\"parameters\":{}", deep("[")),
    ] {
        fuzzing::check_m2(body.as_bytes());
        let e = fuzzing::parse_m2_page(body.as_bytes(), None).unwrap_err();
        assert!(
            // A top-level list is refused before it is descended into.
            e.message.contains("recursion limit")
                || e.message.contains("EOF")
                || e.message.contains("invalid type: sequence"),
            "{}",
            e.message
        );
    }
}

/// storeConfigs as the simulator answers it is accepted; anything but a
/// list is refused with a message that says so.
#[test]
fn store_configs() {
    fuzzing::check_m2(br#"[{"id":1,"code":"default","locale":"en_US"}]"#);
    for body in [&br#"{"id":1}"#[..], b"", b"<html>", b"[1,"] {
        fuzzing::check_m2(body);
    }
}
