//! XML-RPC, the wire format of the Magento 1 API: values, calls, responses
//! and faults, encoded and decoded. Shared by the M1 client and the
//! simulator so both speak exactly the same dialect.
//!
//! Decoding is strict about structure (every error names the element where
//! it happened) and bounded: documents over [`MAX_DOCUMENT`] bytes and values
//! nested deeper than [`MAX_DEPTH`] are refused before they can exhaust
//! memory or the stack. Encoding never emits `<nil/>` in a call, because
//! Magento answers it with fault 636.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use quick_xml::events::Event;
use quick_xml::reader::Reader;
use std::fmt::Write as _;
use std::ops::Range;

/// Largest document decoded.
pub const MAX_DOCUMENT: usize = 256 * 1024 * 1024;

/// Deepest nesting of structs and arrays decoded.
pub const MAX_DEPTH: usize = 64;

/// One XML-RPC value. Structs keep their member order so that what a shop
/// sent can be mirrored as sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Bool(bool),
    String(String),
    Double(f64),
    /// `dateTime.iso8601` text exactly as sent (Magento's formats vary).
    DateTime(String),
    Base64(Vec<u8>),
    Struct(Vec<(String, Value)>),
    Array(Vec<Value>),
    /// `<nil/>`: decoded from answers, never sent in a call.
    Nil,
}

impl Value {
    /// Shorthand for a string value.
    pub fn str(s: impl Into<String>) -> Value {
        Value::String(s.into())
    }

    /// The first member named `key` of a struct.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Struct(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The text of a string (or of a `dateTime.iso8601`, which is text too).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) | Value::DateTime(s) => Some(s),
            _ => None,
        }
    }

    /// An integer, or a string holding one: Magento 1 sends ids as strings.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// True for `<boolean>1</boolean>` and for the integer/string `1` that
    /// PHP code often sends in its place.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::Int(i) => Some(*i != 0),
            Value::String(s) => match s.as_str() {
                "1" | "true" => Some(true),
                "0" | "" | "false" => Some(false),
                _ => None,
            },
            _ => None,
        }
    }

    /// JSON view, for mirroring Magento 1 products like Magento 2 ones:
    /// numbers stay numbers (a non-finite double becomes `null`), base64
    /// becomes its base64 text, struct member order is kept only as far as
    /// `serde_json::Map` keeps it.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Int(i) => J::from(*i),
            Value::Bool(b) => J::Bool(*b),
            Value::String(s) | Value::DateTime(s) => J::String(s.clone()),
            Value::Double(d) => serde_json::Number::from_f64(*d).map_or(J::Null, J::Number),
            Value::Base64(b) => J::String(B64.encode(b)),
            Value::Struct(m) => {
                J::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
            Value::Array(a) => J::Array(a.iter().map(Value::to_json).collect()),
            Value::Nil => J::Null,
        }
    }

    /// From JSON (the simulator's catalog, tests): integers that fit `i64`
    /// become `Int`, other numbers `Double`, `null` becomes `Nil`.
    pub fn from_json(v: &serde_json::Value) -> Value {
        use serde_json::Value as J;
        match v {
            J::Null => Value::Nil,
            J::Bool(b) => Value::Bool(*b),
            J::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Double(n.as_f64().unwrap_or(0.0)),
            },
            J::String(s) => Value::String(s.clone()),
            J::Array(a) => Value::Array(a.iter().map(Value::from_json).collect()),
            J::Object(o) => Value::Struct(
                o.iter()
                    .map(|(k, v)| (k.clone(), Value::from_json(v)))
                    .collect(),
            ),
        }
    }
}

/// An XML-RPC fault: the call reached the shop and was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fault {code}: {message}")]
pub struct Fault {
    pub code: i64,
    pub message: String,
}

impl Fault {
    /// The fault struct as it travels: `{faultCode, faultString}`.
    pub fn to_value(&self) -> Value {
        Value::Struct(vec![
            ("faultCode".into(), Value::Int(self.code)),
            ("faultString".into(), Value::String(self.message.clone())),
        ])
    }

    /// Reads a fault struct: the `<fault>` form (`faultCode`, `faultString`)
    /// and Magento's `multiCall` item form (`isFault`, `faultCode`,
    /// `faultMessage`). `None` when `v` is not a fault.
    pub fn from_value(v: &Value) -> Option<Fault> {
        let code = v.get("faultCode")?.as_i64()?;
        if let Some(flag) = v.get("isFault") {
            if flag.as_bool() != Some(true) {
                return None;
            }
        }
        let message = v
            .get("faultString")
            .or_else(|| v.get("faultMessage"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        Some(Fault { code, message })
    }
}

/// Why a document could not be encoded or decoded. Says what and where;
/// quotes at most a short excerpt of the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlRpcError {
    #[error("XML-RPC document of {0} bytes is larger than the {MAX_DOCUMENT} bytes read")]
    TooLarge(usize),
    #[error("XML-RPC values nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("malformed XML at byte {position}: {message}")]
    Xml { position: u64, message: String },
    #[error("unexpected {found} in <{context}>")]
    Unexpected { found: String, context: String },
    #[error("not an XML-RPC {expected} (found {found})")]
    NotXmlRpc {
        expected: &'static str,
        found: String,
    },
    #[error("document ends inside <{0}>")]
    UnexpectedEnd(String),
    #[error("{what} {text:?} in <{element}>")]
    BadValue {
        what: &'static str,
        element: String,
        text: String,
    },
    #[error("<{element}> lacks {missing}")]
    Missing {
        element: String,
        missing: &'static str,
    },
    #[error("cannot send {what} at {path}: Magento refuses it")]
    Unsendable { what: &'static str, path: String },
    /// The caller of [`decode_response_each`] refused an item (too many, or
    /// not what it asked for).
    #[error("{0}")]
    Refused(String),
}

// ---------------------------------------------------------------- encoding

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // A raw CR would be turned into LF by any conforming parser.
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

fn encode_value(out: &mut String, v: &Value) {
    out.push_str("<value>");
    match v {
        Value::Int(i) => {
            let tag = if i32::try_from(*i).is_ok() {
                "int"
            } else {
                "i8"
            };
            let _ = write!(out, "<{tag}>{i}</{tag}>");
        }
        Value::Bool(b) => {
            let _ = write!(out, "<boolean>{}</boolean>", u8::from(*b));
        }
        Value::String(s) => {
            out.push_str("<string>");
            escape_into(out, s);
            out.push_str("</string>");
        }
        Value::Double(d) => {
            // Display for f64 never uses an exponent (XML-RPC has none) and
            // prints the shortest text that parses back to the same value.
            let _ = write!(out, "<double>{d}</double>");
        }
        Value::DateTime(s) => {
            out.push_str("<dateTime.iso8601>");
            escape_into(out, s);
            out.push_str("</dateTime.iso8601>");
        }
        Value::Base64(b) => {
            out.push_str("<base64>");
            out.push_str(&B64.encode(b));
            out.push_str("</base64>");
        }
        Value::Struct(members) => {
            out.push_str("<struct>");
            for (k, v) in members {
                out.push_str("<member><name>");
                escape_into(out, k);
                out.push_str("</name>");
                encode_value(out, v);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
        Value::Array(items) => {
            out.push_str("<array><data>");
            for v in items {
                encode_value(out, v);
            }
            out.push_str("</data></array>");
        }
        Value::Nil => out.push_str("<nil/>"),
    }
    out.push_str("</value>");
}

/// Finds what a call must not carry: nil anywhere (fault 636 at Magento) and
/// non-finite doubles (XML-RPC cannot write them). `path` says where.
fn check_sendable(v: &Value, path: &mut String) -> Result<(), XmlRpcError> {
    let bad = |what, path: &String| XmlRpcError::Unsendable {
        what,
        path: path.clone(),
    };
    match v {
        Value::Nil => Err(bad("nil", path)),
        Value::Double(d) if !d.is_finite() => Err(bad("a non-finite double", path)),
        Value::Struct(members) => {
            for (k, v) in members {
                let len = path.len();
                let _ = write!(path, ".{k}");
                check_sendable(v, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let len = path.len();
                let _ = write!(path, "[{i}]");
                check_sendable(v, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A `<methodCall>` document. Refuses nil (and non-finite doubles) anywhere
/// in the parameters.
pub fn encode_call(method: &str, params: &[Value]) -> Result<String, XmlRpcError> {
    for (i, p) in params.iter().enumerate() {
        check_sendable(p, &mut format!("params[{i}]"))?;
    }
    let mut out =
        String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<methodCall><methodName>");
    escape_into(&mut out, method);
    out.push_str("</methodName><params>");
    for p in params {
        out.push_str("<param>");
        encode_value(&mut out, p);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>\n");
    Ok(out)
}

/// A successful `<methodResponse>` carrying one value.
pub fn encode_response(v: &Value) -> String {
    let mut out =
        String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<methodResponse><params><param>");
    encode_value(&mut out, v);
    out.push_str("</param></params></methodResponse>\n");
    out
}

/// A `<methodResponse>` carrying a `<fault>`.
pub fn encode_fault(code: i64, message: &str) -> String {
    let mut out =
        String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<methodResponse><fault>");
    encode_value(
        &mut out,
        &Fault {
            code,
            message: message.to_string(),
        }
        .to_value(),
    );
    out.push_str("</fault></methodResponse>\n");
    out
}

// ---------------------------------------------------------------- decoding

/// Where [`utf8_lossy`] replaced bytes that are not UTF-8 by U+FFFD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replaced {
    /// Byte offset of the replacement in the repaired text.
    pub at: usize,
    /// Byte offset of the bad bytes in the answer as received.
    pub offset: usize,
    /// Bad bytes replaced there.
    pub bytes: usize,
}

/// The answer as UTF-8: itself when it is (no copy), else a copy with each
/// invalid sequence replaced by U+FFFD, and where. A shop that stored
/// Latin-1 text (an old import) sends such bytes inside a product's
/// strings; XML cannot carry them, and refusing the whole answer would
/// fail every sync of the shop for one product.
pub fn utf8_lossy(body: &[u8]) -> (std::borrow::Cow<'_, [u8]>, Vec<Replaced>) {
    if std::str::from_utf8(body).is_ok() {
        return (std::borrow::Cow::Borrowed(body), Vec::new());
    }
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut fixes = Vec::new();
    let mut offset = 0usize;
    for chunk in body.utf8_chunks() {
        out.extend_from_slice(chunk.valid().as_bytes());
        offset += chunk.valid().len();
        let bytes = chunk.invalid().len();
        if bytes > 0 {
            fixes.push(Replaced {
                at: out.len(),
                offset,
                bytes,
            });
            let mut buf = [0u8; 4];
            out.extend_from_slice(char::REPLACEMENT_CHARACTER.encode_utf8(&mut buf).as_bytes());
            offset += bytes;
        }
    }
    (std::borrow::Cow::Owned(out), fixes)
}

/// The replacements of `fixes` (sorted, from [`utf8_lossy`]) inside
/// `span` of the repaired text: the first one and the bytes replaced in
/// all, `None` when there are none.
pub fn replaced_in(fixes: &[Replaced], span: Range<usize>) -> Option<(Replaced, usize)> {
    let lo = fixes.partition_point(|f| f.at < span.start);
    let hi = fixes.partition_point(|f| f.at < span.end);
    let inside = fixes.get(lo..hi)?;
    let first = *inside.first()?;
    Some((first, inside.iter().map(|f| f.bytes).sum()))
}

#[derive(Debug)]
enum Tok {
    Start(String),
    End(String),
    Text(String),
    Eof,
}

fn excerpt(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(MAX).collect();
        t.push('…');
        t
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Start(n) => format!("<{}>", excerpt(n)),
        Tok::End(n) => format!("</{}>", excerpt(n)),
        Tok::Text(s) => format!("text {:?}", excerpt(s.trim())),
        Tok::Eof => "end of document".to_string(),
    }
}

struct Parser<'a> {
    r: Reader<&'a [u8]>,
    peeked: Option<Tok>,
}

impl<'a> Parser<'a> {
    fn new(xml: &'a [u8]) -> Result<Self, XmlRpcError> {
        check_len(xml.len())?;
        let mut r = Reader::from_reader(xml);
        let c = r.config_mut();
        c.expand_empty_elements = true;
        c.check_end_names = true;
        c.trim_text(false);
        Ok(Parser { r, peeked: None })
    }

    /// Bytes of the document read so far.
    fn position(&self) -> usize {
        usize::try_from(self.r.buffer_position()).unwrap_or(usize::MAX)
    }

    /// quick-xml's message quotes element names whole: cut it.
    fn xml_err(&self, e: impl std::fmt::Display) -> XmlRpcError {
        const MAX: usize = 200;
        let mut message = e.to_string();
        if message.chars().count() > MAX {
            message = message.chars().take(MAX).collect();
            message.push('…');
        }
        XmlRpcError::Xml {
            position: self.r.error_position(),
            message,
        }
    }

    fn next(&mut self) -> Result<Tok, XmlRpcError> {
        if let Some(t) = self.peeked.take() {
            return Ok(t);
        }
        loop {
            let ev = self.r.read_event().map_err(|e| self.xml_err(e))?;
            return Ok(match ev {
                Event::Start(e) => Tok::Start(local(e.local_name().as_ref())),
                Event::End(e) => Tok::End(local(e.local_name().as_ref())),
                // Not produced with expand_empty_elements; kept total anyway.
                Event::Empty(e) => {
                    let n = local(e.local_name().as_ref());
                    self.peeked = Some(Tok::End(n.clone()));
                    Tok::Start(n)
                }
                Event::Text(t) => {
                    Tok::Text(t.unescape().map_err(|e| self.xml_err(e))?.into_owned())
                }
                Event::CData(c) => Tok::Text(c.decode().map_err(|e| self.xml_err(e))?.into_owned()),
                Event::Eof => Tok::Eof,
                Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => continue,
            });
        }
    }

    /// The next tag, skipping white space; other text is an error.
    fn next_tag(&mut self, context: &str) -> Result<Tok, XmlRpcError> {
        loop {
            match self.next()? {
                Tok::Text(s) if s.trim().is_empty() => continue,
                Tok::Eof => return Err(XmlRpcError::UnexpectedEnd(context.to_string())),
                t @ Tok::Text(_) => return Err(unexpected(&t, context)),
                t => return Ok(t),
            }
        }
    }

    fn expect_start(&mut self, name: &str, context: &str) -> Result<(), XmlRpcError> {
        match self.next_tag(context)? {
            Tok::Start(n) if n == name => Ok(()),
            t => Err(unexpected(&t, context)),
        }
    }

    fn expect_end(&mut self, name: &str) -> Result<(), XmlRpcError> {
        match self.next_tag(name)? {
            Tok::End(n) if n == name => Ok(()),
            t => Err(unexpected(&t, name)),
        }
    }

    /// All text up to `</name>`; an element inside is an error.
    fn text_until_end(&mut self, name: &str) -> Result<String, XmlRpcError> {
        let mut out = String::new();
        loop {
            match self.next()? {
                Tok::Text(s) => out.push_str(&s),
                Tok::End(n) if n == name => return Ok(out),
                Tok::Eof => return Err(XmlRpcError::UnexpectedEnd(name.to_string())),
                t => return Err(unexpected(&t, name)),
            }
        }
    }

    /// After `<value>` has been read: the value and its `</value>`.
    fn value(&mut self, depth: usize) -> Result<Value, XmlRpcError> {
        if depth > MAX_DEPTH {
            return Err(XmlRpcError::TooDeep);
        }
        let mut text = String::new();
        let ty = loop {
            match self.next()? {
                Tok::Text(s) => text.push_str(&s),
                // Bare text (or nothing) inside <value> is a string.
                Tok::End(n) if n == "value" => return Ok(Value::String(text)),
                Tok::Start(n) => {
                    if !text.trim().is_empty() {
                        return Err(XmlRpcError::Unexpected {
                            found: format!(
                                "text {:?} before <{}>",
                                excerpt(text.trim()),
                                excerpt(&n)
                            ),
                            context: "value".into(),
                        });
                    }
                    break n;
                }
                Tok::Eof => return Err(XmlRpcError::UnexpectedEnd("value".into())),
                t @ Tok::End(_) => return Err(unexpected(&t, "value")),
            }
        };
        let v = match ty.as_str() {
            "int" | "i4" | "i8" => {
                let t = self.text_until_end(&ty)?;
                Value::Int(t.trim().parse().map_err(|_| bad("bad integer", &ty, &t))?)
            }
            "boolean" => {
                let t = self.text_until_end(&ty)?;
                Value::Bool(match t.trim() {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    _ => return Err(bad("bad boolean", &ty, &t)),
                })
            }
            "string" => Value::String(self.text_until_end(&ty)?),
            "double" => {
                let t = self.text_until_end(&ty)?;
                Value::Double(t.trim().parse().map_err(|_| bad("bad double", &ty, &t))?)
            }
            "dateTime.iso8601" => Value::DateTime(self.text_until_end(&ty)?.trim().to_string()),
            "base64" => {
                let t = self.text_until_end(&ty)?;
                let compact: String = t.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                Value::Base64(
                    B64.decode(compact.as_bytes())
                        .map_err(|_| bad("bad base64", &ty, &t))?,
                )
            }
            "nil" => {
                self.expect_end("nil")?;
                Value::Nil
            }
            "struct" => self.struct_body(depth)?,
            "array" => {
                let mut items = Vec::new();
                self.expect_start("data", "array")?;
                loop {
                    match self.next_tag("data")? {
                        Tok::Start(n) if n == "value" => items.push(self.value(depth + 1)?),
                        Tok::End(n) if n == "data" => break,
                        t => return Err(unexpected(&t, "data")),
                    }
                }
                self.expect_end("array")?;
                Value::Array(items)
            }
            _ => {
                return Err(XmlRpcError::Unexpected {
                    found: format!("unknown type <{}>", excerpt(&ty)),
                    context: "value".into(),
                });
            }
        };
        self.expect_end("value")?;
        Ok(v)
    }

    /// After `<struct>`: members up to `</struct>`.
    fn struct_body(&mut self, depth: usize) -> Result<Value, XmlRpcError> {
        let mut members = Vec::new();
        loop {
            match self.next_tag("struct")? {
                Tok::Start(n) if n == "member" => {
                    let mut name = None;
                    let mut value = None;
                    loop {
                        match self.next_tag("member")? {
                            Tok::Start(n) if n == "name" && name.is_none() => {
                                name = Some(self.text_until_end("name")?);
                            }
                            Tok::Start(n) if n == "value" && value.is_none() => {
                                value = Some(self.value(depth + 1)?);
                            }
                            Tok::End(n) if n == "member" => break,
                            t => return Err(unexpected(&t, "member")),
                        }
                    }
                    let name = name.ok_or(XmlRpcError::Missing {
                        element: "member".into(),
                        missing: "<name>",
                    })?;
                    let value = value.ok_or(XmlRpcError::Missing {
                        element: "member".into(),
                        missing: "<value>",
                    })?;
                    members.push((name, value));
                }
                Tok::End(n) if n == "struct" => return Ok(Value::Struct(members)),
                t => return Err(unexpected(&t, "struct")),
            }
        }
    }

    /// After `<value>`: an array's elements handed to `f` one at a time (so
    /// that only one element's tree is alive at once), each with the byte
    /// range of the document it was read from; `None`. Any other value is
    /// returned whole.
    fn value_or_each(
        &mut self,
        f: &mut dyn FnMut(Value, Range<usize>) -> Result<(), XmlRpcError>,
    ) -> Result<Option<Value>, XmlRpcError> {
        let mut text = String::new();
        loop {
            match self.next()? {
                Tok::Text(s) if s.trim().is_empty() => text.push_str(&s),
                Tok::Start(n) if n == "array" => break,
                Tok::End(n) if n == "value" => return Ok(Some(Value::String(text))),
                t => {
                    self.peeked = Some(t);
                    return self.value(1).map(Some);
                }
            }
        }
        self.expect_start("data", "array")?;
        loop {
            match self.next_tag("data")? {
                Tok::Start(n) if n == "value" => {
                    let start = self.position();
                    let v = self.value(2)?;
                    f(v, start..self.position())?;
                }
                Tok::End(n) if n == "data" => break,
                t => return Err(unexpected(&t, "data")),
            }
        }
        self.expect_end("array")?;
        self.expect_end("value")?;
        Ok(None)
    }

    /// `<params>` body: `<param><value>..</value></param>*` up to `</params>`.
    fn params(&mut self) -> Result<Vec<Value>, XmlRpcError> {
        let mut out = Vec::new();
        loop {
            match self.next_tag("params")? {
                Tok::Start(n) if n == "param" => {
                    self.expect_start("value", "param")?;
                    out.push(self.value(1)?);
                    self.expect_end("param")?;
                }
                Tok::End(n) if n == "params" => return Ok(out),
                t => return Err(unexpected(&t, "params")),
            }
        }
    }

    /// Nothing but white space (and comments) may follow the root element.
    fn end_of_document(&mut self, root: &str) -> Result<(), XmlRpcError> {
        loop {
            match self.next()? {
                Tok::Eof => return Ok(()),
                Tok::Text(s) if s.trim().is_empty() => continue,
                t => return Err(unexpected(&t, &format!("document after </{root}>"))),
            }
        }
    }
}

fn check_len(len: usize) -> Result<(), XmlRpcError> {
    if len > MAX_DOCUMENT {
        Err(XmlRpcError::TooLarge(len))
    } else {
        Ok(())
    }
}

/// The root element, which must be `expected`.
fn root(p: &mut Parser<'_>, expected: &'static str) -> Result<(), XmlRpcError> {
    loop {
        match p.next()? {
            Tok::Text(s) if s.trim().is_empty() => continue,
            Tok::Start(n) if n == expected => return Ok(()),
            t => {
                return Err(XmlRpcError::NotXmlRpc {
                    expected,
                    found: describe(&t),
                });
            }
        }
    }
}

fn local(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

fn unexpected(t: &Tok, context: &str) -> XmlRpcError {
    match t {
        Tok::Eof => XmlRpcError::UnexpectedEnd(context.to_string()),
        t => XmlRpcError::Unexpected {
            found: describe(t),
            context: context.to_string(),
        },
    }
}

fn bad(what: &'static str, element: &str, text: &str) -> XmlRpcError {
    XmlRpcError::BadValue {
        what,
        element: element.to_string(),
        text: excerpt(text.trim()),
    }
}

/// Reads a `<methodCall>`: the method name and its parameters.
pub fn decode_call(xml: &[u8]) -> Result<(String, Vec<Value>), XmlRpcError> {
    let mut p = Parser::new(xml)?;
    root(&mut p, "methodCall")?;
    p.expect_start("methodName", "methodCall")?;
    let name = p.text_until_end("methodName")?.trim().to_string();
    if name.is_empty() {
        return Err(XmlRpcError::Missing {
            element: "methodName".into(),
            missing: "a method name",
        });
    }
    let params = match p.next_tag("methodCall")? {
        Tok::Start(n) if n == "params" => {
            let v = p.params()?;
            p.expect_end("methodCall")?;
            v
        }
        Tok::End(n) if n == "methodCall" => Vec::new(),
        t => return Err(unexpected(&t, "methodCall")),
    };
    p.end_of_document("methodCall")?;
    Ok((name, params))
}

/// Reads a `<methodResponse>`: `Ok(Ok(value))`, or `Ok(Err(fault))` when the
/// server answered with a `<fault>`; `Err` when the document is not a valid
/// response.
pub fn decode_response(xml: &[u8]) -> Result<Result<Value, Fault>, XmlRpcError> {
    let mut p = Parser::new(xml)?;
    root(&mut p, "methodResponse")?;
    let out = match p.next_tag("methodResponse")? {
        Tok::Start(n) if n == "params" => {
            let mut params = p.params()?;
            if params.len() != 1 {
                return Err(XmlRpcError::BadValue {
                    what: "expected exactly one parameter, found",
                    element: "params".into(),
                    text: params.len().to_string(),
                });
            }
            Ok(params.remove(0))
        }
        Tok::Start(n) if n == "fault" => Err(fault_body(&mut p)?),
        t => return Err(unexpected(&t, "methodResponse")),
    };
    p.expect_end("methodResponse")?;
    p.end_of_document("methodResponse")?;
    Ok(out)
}

/// The `<fault>` of a `methodResponse`, its start tag already read.
fn fault_body(p: &mut Parser) -> Result<Fault, XmlRpcError> {
    p.expect_start("value", "fault")?;
    let v = p.value(1)?;
    p.expect_end("fault")?;
    Fault::from_value(&v).ok_or(XmlRpcError::Missing {
        element: "fault".into(),
        missing: "an integer faultCode",
    })
}

/// Like [`decode_response`], but when the answer is an array its elements
/// go to `f` one by one as they are decoded, and `Ok(Ok(None))` is
/// returned: memory holds the document and one element's tree, not the
/// whole tree (a 60 MB answer of many small structs takes about twice its
/// size as a tree). `f` may stop the decoding with an error. Any other
/// answer comes back whole as `Ok(Ok(Some(value)))`.
pub fn decode_response_each(
    xml: &[u8],
    f: &mut dyn FnMut(Value) -> Result<(), XmlRpcError>,
) -> Result<Result<Option<Value>, Fault>, XmlRpcError> {
    decode_response_spans(xml, &mut |v, _| f(v))
}

/// [`decode_response_each`], each element handed over with the byte range
/// of `xml` it was read from (to tell which elements held bytes that
/// [`utf8_lossy`] replaced).
pub fn decode_response_spans(
    xml: &[u8],
    f: &mut dyn FnMut(Value, Range<usize>) -> Result<(), XmlRpcError>,
) -> Result<Result<Option<Value>, Fault>, XmlRpcError> {
    let mut p = Parser::new(xml)?;
    root(&mut p, "methodResponse")?;
    let out = match p.next_tag("methodResponse")? {
        Tok::Start(n) if n == "params" => {
            p.expect_start("param", "params")?;
            p.expect_start("value", "param")?;
            let v = p.value_or_each(f)?;
            p.expect_end("param")?;
            match p.next_tag("params")? {
                Tok::End(n) if n == "params" => {}
                Tok::Start(n) if n == "param" => {
                    return Err(XmlRpcError::BadValue {
                        what: "expected exactly one parameter, found",
                        element: "params".into(),
                        text: "more".into(),
                    });
                }
                t => return Err(unexpected(&t, "params")),
            }
            Ok(v)
        }
        Tok::Start(n) if n == "fault" => Err(fault_body(&mut p)?),
        t => return Err(unexpected(&t, "methodResponse")),
    };
    p.expect_end("methodResponse")?;
    p.end_of_document("methodResponse")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift) for property-style tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn string(&mut self) -> String {
            const ALPHABET: &[&str] = &[
                "a",
                "Z",
                "0",
                " ",
                "  ",
                "\t",
                "\n",
                "\r",
                "&",
                "<",
                ">",
                "\"",
                "'",
                "]]>",
                "é",
                "日本",
                "🦀",
                "&amp;",
                "<![CDATA[",
                "%",
                "+",
                "\u{7f}",
                "\u{a0}",
            ];
            let n = self.below(12);
            (0..n)
                .map(|_| ALPHABET[self.below(ALPHABET.len() as u64) as usize])
                .collect()
        }
        fn value(&mut self, depth: u32) -> Value {
            let k = if depth > 3 {
                self.below(7)
            } else {
                self.below(9)
            };
            match k {
                0 => Value::Int(match self.below(4) {
                    0 => i64::MIN,
                    1 => i64::MAX,
                    2 => self.next() as i64,
                    _ => self.below(200) as i64 - 100,
                }),
                1 => Value::Bool(self.below(2) == 1),
                2 => Value::String(self.string()),
                3 => Value::Double(match self.below(3) {
                    0 => {
                        f64::from_bits(self.next() >> 2)
                            * if self.below(2) == 0 { 1.0 } else { -1.0 }
                    }
                    1 => 0.1 + self.below(1000) as f64,
                    _ => 1e-300,
                }),
                4 => Value::DateTime(format!("20{:02}0101T10:00:00", self.below(99))),
                5 => Value::Base64((0..self.below(20)).map(|_| self.next() as u8).collect()),
                6 => Value::String(String::new()),
                7 => Value::Struct(
                    (0..self.below(4))
                        .map(|_| (self.string(), self.value(depth + 1)))
                        .collect(),
                ),
                _ => Value::Array((0..self.below(4)).map(|_| self.value(depth + 1)).collect()),
            }
        }
    }

    #[test]
    fn round_trips() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for i in 0..2000 {
            let v = rng.value(0);
            let w = rng.value(0);
            let call = encode_call("catalog_product.list", &[v.clone(), w.clone()]).unwrap();
            let (m, params) =
                decode_call(call.as_bytes()).unwrap_or_else(|e| panic!("{i}: {e}\n{call}"));
            assert_eq!(m, "catalog_product.list");
            assert_eq!(params, vec![v.clone(), w], "case {i}: {call}");
            let resp = encode_response(&v);
            let mut items = Vec::new();
            let each = decode_response_each(resp.as_bytes(), &mut |x| {
                items.push(x);
                Ok(())
            })
            .unwrap()
            .unwrap();
            match each {
                None => assert_eq!(Value::Array(items), v, "case {i}"),
                Some(w) => assert!(items.is_empty() && w == v, "case {i}"),
            }
            assert_eq!(decode_response(resp.as_bytes()).unwrap(), Ok(v), "case {i}");
        }
    }

    #[test]
    fn every_type_as_other_encoders_write_it() {
        let xml = r#"<?xml version="1.0"?>
<!-- a comment -->
<methodResponse>
  <params>
    <param>
      <value>
        <struct>
          <member><name>i4</name><value><i4> 42 </i4></value></member>
          <member><name>i8</name><value><ex:i8 xmlns:ex="http://ws.apache.org/xmlrpc/namespaces/extensions">-9000000000</ex:i8></value></member>
          <member><name>int</name><value><int>-7</int></value></member>
          <member><name>bool</name><value><boolean>1</boolean></value></member>
          <member><name>bare</name><value>  bare text  </value></member>
          <member><name>empty</name><value></value></member>
          <member><name>selfclosed</name><value/></member>
          <member><name>emptystring</name><value><string/></value></member>
          <member><name>ws</name><value><string>  keep
 me  </string></value></member>
          <member><name>ent</name><value><string>a &amp; b &lt;c&gt; &quot;d&quot; &apos;e&apos; &#233;&#x263A;</string></value></member>
          <member><name>cdata</name><value><string>x<![CDATA[<raw & stuff>]]>y</string></value></member>
          <member><name>dbl</name><value><double>-1.5</double></value></member>
          <member><name>dt</name><value><dateTime.iso8601>20240102T03:04:05</dateTime.iso8601></value></member>
          <member><name>b64</name><value><base64>aGVs
bG8=</base64></value></member>
          <member><name>nil</name><value><nil/></value></member>
          <member><name>arr</name><value><array><data/></array></value></member>
          <member><name>arr2</name><value><array>
             <data>
               <value><int>1</int></value>
               <value>two</value>
             </data></array></value></member>
          <member><name>st</name><value><struct/></value></member>
          <member><name>nested</name><value><struct><member><name>in</name><value><struct><member><name>deep</name><value><boolean>0</boolean></value></member></struct></value></member></struct></value></member>
        </struct>
      </value>
    </param>
  </params>
</methodResponse>
"#;
        let v = decode_response(xml.as_bytes()).unwrap().unwrap();
        let g = |k| v.get(k).unwrap().clone();
        assert_eq!(g("i4"), Value::Int(42));
        assert_eq!(g("i8"), Value::Int(-9_000_000_000));
        assert_eq!(g("int"), Value::Int(-7));
        assert_eq!(g("bool"), Value::Bool(true));
        assert_eq!(g("bare"), Value::str("  bare text  "));
        assert_eq!(g("empty"), Value::str(""));
        assert_eq!(g("selfclosed"), Value::str(""));
        assert_eq!(g("emptystring"), Value::str(""));
        assert_eq!(g("ws"), Value::str("  keep\n me  "));
        assert_eq!(g("ent"), Value::str("a & b <c> \"d\" 'e' é☺"));
        assert_eq!(g("cdata"), Value::str("x<raw & stuff>y"));
        assert_eq!(g("dbl"), Value::Double(-1.5));
        assert_eq!(g("dt"), Value::DateTime("20240102T03:04:05".into()));
        assert_eq!(g("b64"), Value::Base64(b"hello".to_vec()));
        assert_eq!(g("nil"), Value::Nil);
        assert_eq!(g("arr"), Value::Array(vec![]));
        assert_eq!(
            g("arr2"),
            Value::Array(vec![Value::Int(1), Value::str("two")])
        );
        assert_eq!(g("st"), Value::Struct(vec![]));
        assert_eq!(
            g("nested").get("in").unwrap().get("deep"),
            Some(&Value::Bool(false))
        );
        // Member order is kept.
        let Value::Struct(m) = &v else { panic!() };
        assert_eq!(m[0].0, "i4");
        assert_eq!(m.last().unwrap().0, "nested");
    }

    #[test]
    fn faults_and_multicall_items() {
        let xml = encode_fault(5, "Session expired. Try to relogin.");
        assert_eq!(
            decode_response(xml.as_bytes()).unwrap(),
            Err(Fault {
                code: 5,
                message: "Session expired. Try to relogin.".into()
            })
        );
        // A fault code sent as a string still reads.
        let xml = "<methodResponse><fault><value><struct><member><name>faultCode</name><value><string>2</string></value></member><member><name>faultString</name><value>Access denied.</value></member></struct></value></fault></methodResponse>";
        assert_eq!(
            decode_response(xml.as_bytes()).unwrap().unwrap_err().code,
            2
        );
        let bad_fault =
            "<methodResponse><fault><value><struct></struct></value></fault></methodResponse>";
        assert!(decode_response(bad_fault.as_bytes()).is_err());

        // Magento's multiCall answer: results and fault structs side by side.
        let answer = Value::Array(vec![
            Value::Struct(vec![("sku".into(), Value::str("A"))]),
            Value::Struct(vec![
                ("isFault".into(), Value::Bool(true)),
                ("faultCode".into(), Value::str("101")),
                ("faultMessage".into(), Value::str("Product not exists.")),
            ]),
        ]);
        let decoded = decode_response(encode_response(&answer).as_bytes())
            .unwrap()
            .unwrap();
        let Value::Array(items) = decoded else {
            panic!()
        };
        assert_eq!(Fault::from_value(&items[0]), None);
        assert_eq!(
            Fault::from_value(&items[1]),
            Some(Fault {
                code: 101,
                message: "Product not exists.".into()
            })
        );
    }

    #[test]
    fn never_sends_nil() {
        let v = Value::Struct(vec![(
            "a".into(),
            Value::Array(vec![Value::Int(1), Value::Nil]),
        )]);
        let e = encode_call("x", &[Value::Int(1), v]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot send nil at params[1].a[1]: Magento refuses it"
        );
        assert!(encode_call("x", &[Value::Double(f64::NAN)]).is_err());
        // A response may carry nil (Zend's servers write it).
        let r = encode_response(&Value::Nil);
        assert_eq!(decode_response(r.as_bytes()).unwrap(), Ok(Value::Nil));
    }

    #[test]
    fn calls_without_params_and_with_whitespace() {
        let (m, p) =
            decode_call(b"<methodCall><methodName> login </methodName></methodCall>").unwrap();
        assert_eq!((m.as_str(), p.len()), ("login", 0));
        let (m, p) = decode_call(
            b"<?xml version=\"1.0\"?>\n<methodCall>\n <methodName>call</methodName>\n <params>\n  <param><value>abc</value></param>\n </params>\n</methodCall>\n",
        )
        .unwrap();
        assert_eq!(m, "call");
        assert_eq!(p, vec![Value::str("abc")]);
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        let cases: &[(&str, &str)] = &[
            ("", "end of document"),
            ("<methodResponse>", "methodResponse"),
            (
                "<methodResponse><params><param><value><int>12</int></value>",
                "param",
            ),
            (
                "<methodResponse><params><param><value><int>abc</int></value></param></params></methodResponse>",
                "<int>",
            ),
            (
                "<methodResponse><params><param><value><i4>1.5</i4></value></param></params></methodResponse>",
                "<i4>",
            ),
            (
                "<methodResponse><params><param><value><boolean>2</boolean></value></param></params></methodResponse>",
                "boolean",
            ),
            (
                "<methodResponse><params><param><value><double>x</double></value></param></params></methodResponse>",
                "double",
            ),
            (
                "<methodResponse><params><param><value><base64>!!</base64></value></param></params></methodResponse>",
                "base64",
            ),
            (
                "<methodResponse><params><param><value><int>1</string></value></param></params></methodResponse>",
                "malformed",
            ),
            (
                "<methodResponse><params><param><value><foo>1</foo></value></param></params></methodResponse>",
                "<foo>",
            ),
            (
                "<methodResponse><params><param><value>x<int>1</int></value></param></params></methodResponse>",
                "value",
            ),
            (
                "<methodResponse><params><param><value><struct><member><value>1</value></member></struct></value></param></params></methodResponse>",
                "<name>",
            ),
            (
                "<methodResponse><params><param><value><struct>junk</struct></value></param></params></methodResponse>",
                "struct",
            ),
            (
                "<methodResponse><params><param><value><array><value>1</value></array></value></param></params></methodResponse>",
                "array",
            ),
            (
                "<methodResponse><params><param><value><string>&bogus;</string></value></param></params></methodResponse>",
                "malformed",
            ),
            (
                "<methodResponse><params></params></methodResponse>",
                "params",
            ),
            (
                "<methodResponse><params><param><value>1</value></param></params></methodResponse><x/>",
                "after",
            ),
            (
                "<!DOCTYPE html><html><body>Maintenance&nbsp;<br></body></html>",
                "not an XML-RPC methodResponse (found <html>)",
            ),
        ];
        for (xml, needle) in cases {
            let e = decode_response(xml.as_bytes()).expect_err(xml);
            let msg = e.to_string();
            assert!(msg.contains(needle), "{xml}: {msg}");
        }
        for (xml, needle) in [
            (
                "<methodCall><methodName></methodName></methodCall>",
                "<methodName> lacks a method name",
            ),
            (
                "<methodCall><methodName>x</methodName><params><param></param></params></methodCall>",
                "unexpected </param> in <param>",
            ),
            ("<methodResponse/>", "not an XML-RPC methodCall"),
        ] {
            let msg = decode_call(xml.as_bytes()).expect_err(xml).to_string();
            assert!(msg.contains(needle), "{xml}: {msg}");
        }
        // Arbitrary truncations and byte garbage never panic.
        let good = encode_response(&Value::Struct(vec![
            (
                "a".into(),
                Value::Array(vec![Value::Int(1), Value::str("x & y")]),
            ),
            ("b".into(), Value::Base64(vec![1, 2, 3])),
        ]));
        for cut in 0..good.len() {
            let _ = decode_response(&good.as_bytes()[..cut]);
        }
        let mut rng = Rng(42);
        for _ in 0..500 {
            let mut bytes = good.as_bytes().to_vec();
            for _ in 0..3 {
                let i = rng.below(bytes.len() as u64) as usize;
                bytes[i] = rng.next() as u8;
            }
            let _ = decode_response(&bytes);
            let _ = decode_call(&bytes);
        }
    }

    #[test]
    fn depth_is_bounded() {
        let mut v = Value::Int(1);
        for _ in 0..MAX_DEPTH - 1 {
            v = Value::Array(vec![v]);
        }
        assert!(decode_response(encode_response(&v).as_bytes()).is_ok());
        let deeper = Value::Array(vec![Value::Array(vec![v])]);
        assert_eq!(
            decode_response(encode_response(&deeper).as_bytes()),
            Err(XmlRpcError::TooDeep)
        );
        // Far deeper than the limit: refused, no stack overflow.
        let xml = format!(
            "<methodResponse><params><param><value>{}",
            "<array><data><value>".repeat(100_000)
        );
        assert_eq!(decode_response(xml.as_bytes()), Err(XmlRpcError::TooDeep));
    }

    #[test]
    fn accessors_and_json() {
        let v = Value::Struct(vec![
            ("product_id".into(), Value::str("42")),
            ("n".into(), Value::Int(7)),
            ("price".into(), Value::Double(9.5)),
            (
                "flags".into(),
                Value::Array(vec![Value::Bool(true), Value::Nil]),
            ),
            ("raw".into(), Value::Base64(b"hi".to_vec())),
            ("when".into(), Value::DateTime("20240101T00:00:00".into())),
        ]);
        assert_eq!(v.get("product_id").and_then(Value::as_i64), Some(42));
        assert_eq!(v.get("n").and_then(Value::as_i64), Some(7));
        assert_eq!(v.get("price").and_then(Value::as_i64), None);
        assert_eq!(v.get("missing"), None);
        assert_eq!(Value::Int(1).get("x"), None);
        let j = v.to_json();
        assert_eq!(
            j,
            serde_json::json!({"product_id": "42", "n": 7, "price": 9.5, "flags": [true, null], "raw": "aGk=", "when": "20240101T00:00:00"})
        );
        let back = Value::from_json(&serde_json::json!({"a": [1, 2.5, "x", null, false], "b": {}}));
        assert_eq!(
            back,
            Value::Struct(vec![
                (
                    "a".into(),
                    Value::Array(vec![
                        Value::Int(1),
                        Value::Double(2.5),
                        Value::str("x"),
                        Value::Nil,
                        Value::Bool(false)
                    ])
                ),
                ("b".into(), Value::Struct(vec![])),
            ])
        );
        assert_eq!(
            Value::Double(f64::INFINITY).to_json(),
            serde_json::Value::Null
        );
    }

    #[test]
    fn lossy_text_and_spans_name_the_elements_repaired() {
        let good = b"<methodResponse><params><param><value><array><data><value><string>a</string></value><value><string>b\xE9\xE9</string></value><value><string>c\xFF</string></value></data></array></value></param></params></methodResponse>";
        let (text, fixes) = utf8_lossy(good);
        // Each lone E9 is a sequence of its own.
        assert_eq!(fixes.len(), 3);
        assert_eq!(fixes[0].bytes, 1);
        assert_eq!(good[fixes[0].offset], 0xE9);
        assert_eq!(good[fixes[2].offset], 0xFF);
        let mut seen = Vec::new();
        let r = decode_response_spans(&text, &mut |v, span| {
            seen.push((v, replaced_in(&fixes, span).map(|(f, n)| (f.offset, n))));
            Ok(())
        });
        assert_eq!(r, Ok(Ok(None)));
        assert_eq!(
            seen,
            [
                (Value::str("a"), None),
                (Value::str("b\u{FFFD}\u{FFFD}"), Some((fixes[0].offset, 2))),
                (Value::str("c\u{FFFD}"), Some((fixes[2].offset, 1))),
            ]
        );
        // UTF-8 input is not copied.
        let (t, f) = utf8_lossy(b"<x>\xC3\xA9</x>");
        assert!(matches!(t, std::borrow::Cow::Borrowed(_)) && f.is_empty());
    }

    #[test]
    fn too_large_is_refused_before_parsing() {
        // Checked on the length alone, before any parsing; tested on the
        // length so the test does not allocate 256 MiB.
        assert_eq!(check_len(MAX_DOCUMENT), Ok(()));
        assert_eq!(
            check_len(MAX_DOCUMENT + 1),
            Err(XmlRpcError::TooLarge(MAX_DOCUMENT + 1))
        );
    }
}

#[cfg(test)]
mod memory {
    //! Peak memory of decoding large answers. Not part of the normal run
    //! (it allocates hundreds of MiB and reads the process's VmHWM):
    //! `cargo test --release --lib xmlrpc::memory -- --ignored --nocapture --test-threads 1`.
    use super::*;

    fn hwm_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    }

    fn reset_hwm() {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    /// A `catalog_product.list` answer of `n` entries, about 300 bytes each.
    fn list_answer(n: usize) -> String {
        let mut s = String::with_capacity(n * 330 + 200);
        s.push_str("<?xml version=\"1.0\"?><methodResponse><params><param><value><array><data>");
        for i in 0..n {
            let _ = write!(
                s,
                "<value><struct><member><name>product_id</name><value><string>{i}</string></value></member><member><name>sku</name><value><string>SKU-{i:08}</string></value></member><member><name>name</name><value><string>Product number {i} with a name</string></value></member><member><name>set</name><value><string>4</string></value></member><member><name>type</name><value><string>simple</string></value></member></struct></value>"
            );
        }
        s.push_str("</data></array></value></param></params></methodResponse>");
        s
    }

    /// `n` tiny values in one array.
    fn tiny_answer(n: usize) -> String {
        let mut s = String::with_capacity(n * 30 + 200);
        s.push_str("<methodResponse><params><param><value><array><data>");
        for _ in 0..n {
            s.push_str("<value><i4>1</i4></value>");
        }
        s.push_str("</data></array></value></param></params></methodResponse>");
        s
    }

    #[test]
    #[ignore]
    fn peak_of_a_60_mb_answer() {
        for (what, doc) in [
            ("list of 200k products", list_answer(200_000)),
            ("2.4M tiny values", tiny_answer(2_400_000)),
        ] {
            let mb = doc.len() as f64 / 1e6;
            reset_hwm();
            let base = hwm_kib();
            let v = decode_response(doc.as_bytes());
            let peak = hwm_kib();
            let n = match &v {
                Ok(Ok(Value::Array(a))) => a.len(),
                _ => 0,
            };
            drop(v);
            reset_hwm();
            let base2 = hwm_kib();
            let mut m = 0usize;
            let r = decode_response_each(doc.as_bytes(), &mut |v| {
                m += usize::from(!matches!(v, Value::Nil));
                Ok(())
            });
            assert!(matches!(r, Ok(Ok(None))));
            let peak2 = hwm_kib();
            eprintln!(
                "{what}: streamed ({m} items): {:.1} MiB above the document",
                (peak2.saturating_sub(base2)) as f64 / 1024.0
            );
            eprintln!(
                "{what}: {mb:.1} MB document, {n} items: decoding peaked {:.1} MiB above the document ({:.1}x)",
                (peak.saturating_sub(base)) as f64 / 1024.0,
                (peak.saturating_sub(base)) as f64 * 1024.0 / doc.len() as f64
            );
        }
    }
}
