//! XML-RPC decoder: round trips, hostile documents, depth and error bounds.

use cobbyd::fuzzing;
use cobbyd::magento::xmlrpc::{self, Value, XmlRpcError};
use proptest::prelude::*;

/// Text XML can carry (no C0 controls but tab/LF/CR; those are
/// not allowed in XML 1.0 documents at all).
fn xml_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::char::range('a', 'z'),
            1 => prop::sample::select(vec![
                ' ', '\t', '\n', '\r', '&', '<', '>', '"', '\'', ']', '%', '+', 'é', '日', '🦀',
                '\u{a0}', '\u{7f}', '\u{fffd}',
            ]),
            1 => any::<char>().prop_filter("XML char", |c| !c.is_control()),
        ],
        0..24,
    )
    .prop_map(|v| v.into_iter().collect())
}

/// Any value the encoder sends: everything but nil.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::Int),
        any::<bool>().prop_map(Value::Bool),
        xml_text().prop_map(Value::String),
        any::<f64>().prop_map(Value::Double),
        // Decoding trims a dateTime (shops pad it); the encoder's own never are.
        "[0-9]{8}T[0-9]{2}:[0-9]{2}:[0-9]{2}".prop_map(Value::DateTime),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Value::Base64),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec((xml_text(), inner.clone()), 0..6).prop_map(Value::Struct),
            prop::collection::vec(inner, 0..6).prop_map(Value::Array),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_is_identity(v in value()) {
        fuzzing::check_xmlrpc_round_trip(&v);
    }

    #[test]
    fn calls_round_trip(method in "[a-z_]{1,12}\\.[a-z]{1,8}", params in prop::collection::vec(value(), 0..4)) {
        let doc = xmlrpc::encode_call(&method, &params).unwrap();
        let (m, p) = xmlrpc::decode_call(doc.as_bytes()).unwrap();
        prop_assert_eq!(m, method);
        if !doc.contains("NaN") {
            prop_assert_eq!(p, params);
        }
    }

    /// A valid document cut or damaged anywhere decodes or fails cleanly.
    #[test]
    fn damaged_documents_fail_cleanly(v in value(), cut in any::<prop::sample::Index>(),
                                      flip in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut doc = xmlrpc::encode_response(&v).into_bytes();
        let i = flip.index(doc.len());
        doc[i] = byte;
        fuzzing::check_xmlrpc(&doc);
        doc.truncate(cut.index(doc.len()));
        fuzzing::check_xmlrpc(&doc);
    }

    #[test]
    fn arbitrary_bytes_fail_cleanly(data in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::check_xmlrpc(&data);
    }

    /// Element names and texts from the document are quoted in errors only
    /// as excerpts, however long they are.
    #[test]
    fn errors_stay_short(name in "[a-zA-Z][a-zA-Z0-9]{0,20}", n in 1usize..5000) {
        let long = name.repeat(n);
        for doc in [
            format!("<methodResponse><params><param><value><{long}>1</{long}></value></param></params></methodResponse>"),
            format!("<{long}/>"),
            format!("<methodResponse><params></{long}></methodResponse>"),
            format!("<methodResponse><params><param><value><int>{long}</int></value></param></params></methodResponse>"),
        ] {
            fuzzing::check_xmlrpc(doc.as_bytes());
        }
    }
}

/// Nesting far deeper than the limit is refused by depth, not by a stack
/// overflow, for arrays and structs alike.
#[test]
fn deep_nesting_is_refused_by_depth() {
    let n = 200_000;
    let arrays = format!(
        "<methodResponse><params><param>{}",
        "<value><array><data>".repeat(n)
    );
    let structs = format!(
        "<methodResponse><params><param>{}",
        "<value><struct><member><name>a</name>".repeat(n)
    );
    for doc in [arrays, structs] {
        match xmlrpc::decode_response(doc.as_bytes()) {
            Err(XmlRpcError::TooDeep) => {}
            other => panic!("expected TooDeep, got {other:?}"),
        }
    }
    // Exactly at the limit still decodes.
    let depth = xmlrpc::MAX_DEPTH - 1;
    let doc = format!(
        "<methodResponse><params><param>{}<value><int>1</int></value>{}</param></params></methodResponse>",
        "<value><array><data>".repeat(depth),
        "</data></array></value>".repeat(depth)
    );
    assert!(matches!(xmlrpc::decode_response(doc.as_bytes()), Ok(Ok(_))));
}

/// A multi-megabyte string value and a 200,000-item array decode in one
/// pass (no quadratic behaviour). The size cap itself is tested in
/// `src/magento/xmlrpc.rs` (`too_large_is_refused_before_parsing`).
#[test]
fn big_documents() {
    let big = "x".repeat(8 * 1024 * 1024);
    let doc = xmlrpc::encode_response(&Value::String(big.clone()));
    match xmlrpc::decode_response(doc.as_bytes()) {
        Ok(Ok(Value::String(s))) => assert_eq!(s.len(), big.len()),
        other => panic!("{other:?}"),
    }
    let many = format!(
        "<methodResponse><params><param><value><array><data>{}</data></array></value></param></params></methodResponse>",
        "<value><i4>7</i4></value>".repeat(200_000)
    );
    match xmlrpc::decode_response(many.as_bytes()) {
        Ok(Ok(Value::Array(a))) => assert_eq!(a.len(), 200_000),
        other => panic!("{other:?}"),
    }
}
