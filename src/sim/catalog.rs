//! The simulated product catalog: deterministic from a seed, compact enough
//! for a million products, indexed for the queries a mirroring client makes.
//!
//! A product is a small [`Row`] of numbers; every string (SKU, names,
//! descriptions, URL keys) is derived from the seed and the id when a product
//! is rendered, so nothing but the numbers lives in memory. Two sorted
//! indexes serve the common queries without scanning: `(updated_at, id)` for
//! incremental cursors and the alive ids for listings by entity id.
//!
//! The query engine ([`Catalog::query`]) evaluates the Magento filter model
//! (groups AND-ed, filters inside a group OR-ed), sorts, and pages. Rows tied
//! on every sort key come back shuffled per request, as MySQL may return them:
//! a client that does not end its sort on a unique key sees it.

use std::collections::HashSet;

/// First `created_at` of the generated catalog: 2019-01-01 00:00:00 UTC.
const EPOCH_BASE: u32 = 1_546_300_800;
/// Span of generated timestamps: about two years.
const SPAN: u32 = 2 * 365 * 86_400;

/// One product, as numbers. Strings are derived on rendering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Entity id (>= 1).
    pub id: u32,
    /// Unix seconds.
    pub created_at: u32,
    /// Unix seconds.
    pub updated_at: u32,
    /// Price in cents (every simulated update adds one unit).
    pub price_cents: u32,
    /// Weight in grams.
    pub weight_g: u32,
    /// Incremented by every simulated update (changes the price).
    pub rev: u16,
    /// Attribute set id.
    pub set_id: u8,
    /// Index into [`TYPE_IDS`].
    pub type_idx: u8,
    /// 1 enabled, 2 disabled.
    pub status: u8,
    /// 1 not visible individually .. 4 catalog and search.
    pub visibility: u8,
    /// False for gaps in the id sequence and deleted products.
    pub alive: bool,
}

/// Magento product type ids, indexed by [`Row::type_idx`].
pub const TYPE_IDS: [&str; 3] = ["simple", "configurable", "virtual"];

impl Row {
    /// The Magento `type_id`.
    pub fn type_id(&self) -> &'static str {
        TYPE_IDS[usize::from(self.type_idx) % TYPE_IDS.len()]
    }

    /// Price in cents.
    pub fn price_cents_now(&self) -> u64 {
        u64::from(self.price_cents)
    }

    /// Weight, absent for virtual products (as Magento answers them).
    pub fn weight_kg(&self) -> Option<f64> {
        if self.type_id() == "virtual" {
            None
        } else {
            Some(f64::from(self.weight_g) / 1000.0)
        }
    }
}

/// The language a store view renders names and descriptions in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// English (the default store view and any code other than `fr`).
    En,
    /// French (store code `fr`).
    Fr,
}

impl Lang {
    /// The language of a store code.
    pub fn for_store(code: &str) -> Lang {
        if code.eq_ignore_ascii_case("fr") {
            Lang::Fr
        } else {
            Lang::En
        }
    }
}

/// splitmix64: a fast, well-mixed deterministic hash.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn h(seed: u64, id: u32, salt: u64) -> u64 {
    mix(seed ^ mix(u64::from(id) ^ (salt << 40)))
}

// ---------------------------------------------------------------------------
// Derived strings
// ---------------------------------------------------------------------------

const SKU_PREFIXES: [&str; 8] = ["24-MB", "WJ", "MH", "WS", "MS", "24-UG", "WB", "MP"];

/// The SKU of a product. Every SKU ends with its id in decimal (after a
/// non-digit), except the digits-only ones, which are the id followed by four
/// digits; [`Catalog::find_sku`] inverts this without a lookup table. The
/// awkward ones are deliberate: spaces, `/`, `+`, `&`, `%`, quotes, unicode,
/// mixed case, digits only, exactly 64 characters.
pub fn sku_for(seed: u64, id: u32) -> String {
    let x = h(seed, id, 1);
    match x % 100 {
        0..=1 => format!("Größe-Ü-{id}"),
        2 => format!("A/B-{id}"),
        3 => format!("A+B {id}"),
        4 => format!("Tom & Jerry {id}"),
        5 => format!("100% Cotton #{id}"),
        6 => format!("Say \"Cheese\" {id}"),
        7 => format!("O'Reilly-{id}"),
        8..=9 => format!("MiXeD-CaSe-{id}"),
        10..=11 => format!("{id}{}", 1000 + (x >> 20) % 9000),
        12 => {
            let tail = format!("-{id}");
            let pad = 64usize.saturating_sub(9 + tail.len());
            format!("LONG-SKU-{}{tail}", "x".repeat(pad))
        }
        13 => format!("sku with spaces {id}"),
        _ => format!(
            "{}-{id:05}",
            SKU_PREFIXES[((x >> 8) % SKU_PREFIXES.len() as u64) as usize]
        ),
    }
}

const EN_ADJ: [&str; 10] = [
    "Classic",
    "Crème",
    "Größe-Ü",
    "Café",
    "Smart",
    "Eco",
    "Vintage",
    "Ultra",
    "Señor",
    "Nordic",
];
const EN_NOUN: [&str; 10] = [
    "Duffle Bag",
    "T-Shirt",
    "Mug",
    "Backpack",
    "Hoodie",
    "Watch",
    "Yoga Mat",
    "Water Bottle",
    "Jacket",
    "Sneaker",
];
const FR_ADJ: [&str; 10] = [
    "Classique",
    "Crème",
    "Élégant",
    "Écologique",
    "Très grand",
    "Rétro",
    "Léger",
    "Doré",
    "Fraîche",
    "Nordique",
];
const FR_NOUN: [&str; 10] = [
    "Sac de sport",
    "T-shirt",
    "Tasse",
    "Sac à dos",
    "Sweat à capuche",
    "Montre",
    "Tapis de yoga",
    "Gourde",
    "Veste",
    "Basket",
];

fn pick<'a>(list: &[&'a str], x: u64) -> &'a str {
    list[(x % list.len() as u64) as usize]
}

/// The product name in a store view's language, with the traps real catalogs
/// hold: HTML, entities, quotes, commas, newlines, non-Latin scripts.
pub fn name_for(seed: u64, id: u32, lang: Lang) -> String {
    let x = h(seed, id, 2);
    let (adj, noun) = match lang {
        Lang::En => (pick(&EN_ADJ, x >> 8), pick(&EN_NOUN, x >> 16)),
        Lang::Fr => (pick(&FR_ADJ, x >> 8), pick(&FR_NOUN, x >> 16)),
    };
    match (x % 40, lang) {
        (0, Lang::En) => format!("<b>Bold</b> {noun}"),
        (0, Lang::Fr) => format!("<b>Gras</b> {noun}"),
        (1, Lang::En) => format!("Fish &amp; Chips {noun}"),
        (1, Lang::Fr) => format!("Poisson &amp; frites {noun}"),
        (2, Lang::En) => format!("The \"Best\" {noun}"),
        (2, Lang::Fr) => format!("Le « meilleur » {noun}"),
        (3, Lang::En) => format!("O'Neil's {noun}"),
        (3, Lang::Fr) => format!("{noun} de l'été"),
        (4, Lang::En) => format!("{noun}, red, large"),
        (4, Lang::Fr) => format!("{noun}, rouge, grand"),
        (5, Lang::En) => format!("{adj} {noun}\nsecond line"),
        (5, Lang::Fr) => format!("{adj} {noun}\ndeuxième ligne"),
        (6, _) => format!("日本の{noun} ☕"),
        (7, _) => format!("{adj} {noun} 100%"),
        _ => format!("{adj} {noun}"),
    }
}

/// The HTML description in a store view's language.
pub fn description_for(seed: u64, id: u32, lang: Lang) -> String {
    let x = h(seed, id, 3);
    let name = name_for(seed, id, lang);
    match lang {
        Lang::En => match x % 4 {
            0 => format!(
                "<p>{name}: made to last.</p>\n<ul><li>Cotton &amp; linen</li><li>Size: 42\"</li></ul>"
            ),
            1 => {
                format!("<p>The <b>{name}</b>, now with 20% more “comfort”, commas, and more.</p>")
            }
            2 => format!("{name}. Plain text, no markup; it's fine."),
            _ => String::new(),
        },
        Lang::Fr => match x % 4 {
            0 => format!(
                "<p>{name} : fait pour durer.</p>\n<ul><li>Coton &amp; lin</li><li>Taille : 42\"</li></ul>"
            ),
            1 => format!(
                "<p>Le <b>{name}</b>, avec 20 % de « confort » en plus, des virgules, etc.</p>"
            ),
            2 => format!("{name}. Texte brut, sans balises ; c'est très bien."),
            _ => String::new(),
        },
    }
}

/// The URL key (same in every store view).
pub fn url_key_for(seed: u64, id: u32) -> String {
    let x = h(seed, id, 2);
    let adj = pick(&EN_ADJ, x >> 8);
    let noun = pick(&EN_NOUN, x >> 16);
    let mut out = String::new();
    for c in format!("{adj} {noun}").chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    format!("{out}-{id}")
}

/// Category ids (1 to 3 of them).
pub fn categories_for(seed: u64, id: u32) -> Vec<u32> {
    let x = h(seed, id, 4);
    let n = 1 + (x % 3) as usize;
    let mut v: Vec<u32> = (0..n)
        .map(|i| 3 + ((x >> (8 + 8 * i)) % 38) as u32)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Website ids.
pub fn websites_for(seed: u64, id: u32) -> Vec<u32> {
    if h(seed, id, 5) % 10 == 0 {
        vec![1, 2]
    } else {
        vec![1]
    }
}

/// The `color` option id, for about a third of the products.
pub fn color_for(seed: u64, id: u32) -> Option<u32> {
    let x = h(seed, id, 6);
    (x % 3 == 0).then(|| 49 + ((x >> 8) % 12) as u32)
}

// ---------------------------------------------------------------------------
// Timestamps
// ---------------------------------------------------------------------------

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds to Magento's `"YYYY-MM-DD HH:MM:SS"` (UTC).
pub fn fmt_ts(secs: u32) -> String {
    let secs = i64::from(secs);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

/// Parses `YYYY-MM-DD`, `YYYY-MM-DD HH:MM[:SS]` or the same with `T` and an
/// optional trailing `Z`, as UTC. `None` for anything else.
pub fn parse_ts(s: &str) -> Option<i64> {
    let s = s.trim();
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = match s.find([' ', 'T']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut dp = date.split('-');
    let y: i64 = dp.next()?.parse().ok()?;
    let m: u32 = dp.next()?.parse().ok()?;
    let d: u32 = dp.next()?.parse().ok()?;
    if dp.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    if let Some(t) = time {
        let mut tp = t.split(':');
        let hh: i64 = tp.next()?.parse().ok()?;
        let mm: i64 = tp.next()?.parse().ok()?;
        let ss: i64 = match tp.next() {
            Some(v) => v.split('.').next()?.parse().ok()?,
            None => 0,
        };
        if tp.next().is_some() || hh > 23 || mm > 59 || ss > 60 {
            return None;
        }
        secs += hh * 3600 + mm * 60 + ss;
    }
    Some(secs)
}

/// Now, in Unix seconds.
pub fn now_secs() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------
// Query model
// ---------------------------------------------------------------------------

/// A field a filter or a sort can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `entity_id` (M2 also `id`, M1 `product_id`).
    EntityId,
    /// `sku` (compared case-insensitively).
    Sku,
    /// `name` (store view language, case-insensitive).
    Name,
    /// `updated_at`.
    UpdatedAt,
    /// `created_at`.
    CreatedAt,
    /// `price`.
    Price,
    /// `status`.
    Status,
    /// `visibility`.
    Visibility,
    /// `type_id` (M1 `type`).
    TypeId,
    /// `attribute_set_id` (M1 `set`).
    AttributeSetId,
}

impl Field {
    /// The field of a Magento 2 attribute code.
    pub fn from_m2(name: &str) -> Option<Field> {
        Some(match name {
            "entity_id" | "id" => Field::EntityId,
            "sku" => Field::Sku,
            "name" => Field::Name,
            "updated_at" => Field::UpdatedAt,
            "created_at" => Field::CreatedAt,
            "price" => Field::Price,
            "status" => Field::Status,
            "visibility" => Field::Visibility,
            "type_id" => Field::TypeId,
            "attribute_set_id" => Field::AttributeSetId,
            _ => return None,
        })
    }

    /// The field of a Magento 1 `catalog_product.list` filter key.
    pub fn from_m1(name: &str) -> Option<Field> {
        Some(match name {
            "product_id" | "entity_id" => Field::EntityId,
            "set" | "attribute_set_id" => Field::AttributeSetId,
            "type" | "type_id" => Field::TypeId,
            other => return Field::from_m2(other).filter(|f| *f != Field::EntityId),
        })
    }

    fn kind(self) -> Kind {
        match self {
            Field::Sku | Field::Name | Field::TypeId => Kind::Text,
            Field::UpdatedAt | Field::CreatedAt => Kind::Date,
            _ => Kind::Number,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Date,
    Number,
}

/// A comparison operand, typed by the field it compares with.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A number (ids, prices, status; dates as Unix seconds).
    Num(f64),
    /// Lower-cased text (or a date string that did not parse: compared with
    /// the formatted timestamp, as MySQL would compare strings).
    Text(String),
}

/// A filter condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    /// `eq`.
    Eq(Operand),
    /// `neq`.
    Neq(Operand),
    /// `gt`.
    Gt(Operand),
    /// `gteq` / `from` / `moreq`.
    Gteq(Operand),
    /// `lt`.
    Lt(Operand),
    /// `lteq` / `to`.
    Lteq(Operand),
    /// `in`.
    In(Vec<Operand>),
    /// `nin`.
    Nin(Vec<Operand>),
    /// `like` with `%` and `_` wildcards, case-insensitive (lower-cased pattern).
    Like(String),
    /// `null`: never true for the simulated fields.
    Null,
    /// `notnull`.
    NotNull,
}

/// The operator names both APIs understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `eq`
    Eq,
    /// `neq`
    Neq,
    /// `gt`
    Gt,
    /// `gteq`, `from`, `moreq`
    Gteq,
    /// `lt`
    Lt,
    /// `lteq`, `to`
    Lteq,
    /// `in`
    In,
    /// `nin`
    Nin,
    /// `like`
    Like,
    /// `null`
    Null,
    /// `notnull`
    NotNull,
}

impl Op {
    /// Parses an operator name; `None` for an unknown one.
    pub fn parse(name: &str) -> Option<Op> {
        Some(match name {
            "eq" => Op::Eq,
            "neq" => Op::Neq,
            "gt" => Op::Gt,
            "gteq" | "from" | "moreq" => Op::Gteq,
            "lt" => Op::Lt,
            "lteq" | "to" => Op::Lteq,
            "in" => Op::In,
            "nin" => Op::Nin,
            "like" => Op::Like,
            "null" => Op::Null,
            "notnull" => Op::NotNull,
            _ => return None,
        })
    }
}

/// One filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// The field compared.
    pub field: Field,
    /// The condition.
    pub cond: Cond,
}

impl Filter {
    /// Builds a filter from an operator and its raw values (one value, or the
    /// list for `in`/`nin`).
    pub fn new(field: Field, op: Op, values: &[String]) -> Filter {
        let one = || operand(field, values.first().map(String::as_str).unwrap_or(""));
        let many = || values.iter().map(|v| operand(field, v)).collect();
        let cond = match op {
            Op::Eq => Cond::Eq(one()),
            Op::Neq => Cond::Neq(one()),
            Op::Gt => Cond::Gt(one()),
            Op::Gteq => Cond::Gteq(one()),
            Op::Lt => Cond::Lt(one()),
            Op::Lteq => Cond::Lteq(one()),
            Op::In => Cond::In(many()),
            Op::Nin => Cond::Nin(many()),
            Op::Like => Cond::Like(values.first().map(|s| s.to_lowercase()).unwrap_or_default()),
            Op::Null => Cond::Null,
            Op::NotNull => Cond::NotNull,
        };
        Filter { field, cond }
    }
}

fn operand(field: Field, raw: &str) -> Operand {
    match field.kind() {
        Kind::Text => Operand::Text(raw.to_lowercase()),
        Kind::Date => match parse_ts(raw) {
            Some(s) => Operand::Num(s as f64),
            None => Operand::Text(raw.trim().to_lowercase()),
        },
        // MySQL casts a non-numeric string to 0 when comparing with a number.
        Kind::Number => Operand::Num(raw.trim().parse::<f64>().unwrap_or(0.0)),
    }
}

/// Sort direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Ascending.
    Asc,
    /// Descending.
    Desc,
}

/// A query: groups of filters (AND of ORs), sort keys, paging.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// Every group must match; inside a group, any filter.
    pub groups: Vec<Vec<Filter>>,
    /// Sort keys in order. Empty: entity id ascending.
    pub sort: Vec<(Field, Dir)>,
    /// Page size; `None` = everything.
    pub page_size: Option<u32>,
    /// 1-based page; values below 1 mean 1.
    pub current_page: u32,
    /// Past the last page, answer the last page again (Magento 2.3).
    pub legacy_last_page: bool,
    /// Language for `name` comparisons.
    pub lang: Lang,
}

impl Default for Query {
    fn default() -> Self {
        Query {
            groups: Vec::new(),
            sort: Vec::new(),
            page_size: None,
            current_page: 1,
            legacy_last_page: false,
            lang: Lang::En,
        }
    }
}

/// A query's answer: the unpaged count and the rows of the page.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Matches before paging.
    pub total: usize,
    /// The page.
    pub rows: Vec<Row>,
}

fn like_match(pattern: &[char], text: &[char]) -> bool {
    // Iterative wildcard match with backtracking on the last '%'.
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '_' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '%' {
            star = Some(p);
            p += 1;
            mark = t;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == '%' {
        p += 1;
    }
    p == pattern.len()
}

/// A field's value for one row, ready for comparison.
enum Value {
    Num(f64),
    Text(String),
    Date(u32),
}

impl Value {
    fn cmp_operand(&self, o: &Operand) -> Option<std::cmp::Ordering> {
        match (self, o) {
            (Value::Num(a), Operand::Num(b)) => a.partial_cmp(b),
            (Value::Date(a), Operand::Num(b)) => f64::from(*a).partial_cmp(b),
            (Value::Date(a), Operand::Text(b)) => Some(fmt_ts(*a).as_str().cmp(b.as_str())),
            (Value::Text(a), Operand::Text(b)) => Some(a.as_str().cmp(b.as_str())),
            (Value::Text(a), Operand::Num(b)) => Some(a.as_str().cmp(b.to_string().as_str())),
            (Value::Num(a), Operand::Text(b)) => a.partial_cmp(&b.parse::<f64>().unwrap_or(0.0)),
        }
    }

    fn as_text(&self) -> String {
        match self {
            Value::Num(n) => n.to_string(),
            Value::Text(t) => t.clone(),
            Value::Date(d) => fmt_ts(*d),
        }
    }
}

// ---------------------------------------------------------------------------
// The catalog
// ---------------------------------------------------------------------------

/// The products and their indexes.
#[derive(Debug, Clone)]
pub struct Catalog {
    seed: u64,
    /// Indexed by `id - 1`; dead rows are gaps or deletions.
    rows: Vec<Row>,
    /// `(updated_at, id)` of every alive product, sorted.
    by_time: Vec<(u32, u32)>,
    /// Every alive id, sorted.
    by_id: Vec<u32>,
}

impl Catalog {
    /// Generates `products` products from `seed`. Ids start at 1 with about
    /// 2% gaps; about 70% of the products were written by "imports", runs of
    /// up to several hundred products sharing one `updated_at` second.
    pub fn generate(seed: u64, products: usize) -> Catalog {
        let mut rows = Vec::with_capacity(products + products / 40 + 1);
        let groups = (products / 250).max(1) as u64;
        let mut alive = 0usize;
        let mut id: u32 = 0;
        while alive < products {
            id += 1;
            let x = h(seed, id, 7);
            let is_gap = id > 1 && x % 50 == 0;
            let updated_at = if (x >> 8) % 10 < 7 {
                let g = (x >> 16) % groups;
                EPOCH_BASE + 86_400 + (mix(seed ^ g) % u64::from(SPAN)) as u32
            } else {
                EPOCH_BASE + 86_400 + ((x >> 20) % u64::from(SPAN)) as u32
            };
            let created_at = updated_at - ((x >> 24) % 86_400) as u32;
            let t = (x >> 32) % 100;
            let type_idx = if t < 85 {
                0
            } else if t < 93 {
                1
            } else {
                2
            };
            rows.push(Row {
                id,
                created_at,
                updated_at,
                price_cents: 100 + ((x >> 36) % 99_900) as u32,
                weight_g: 50 + ((x >> 44) % 5000) as u32,
                rev: 0,
                set_id: [4u8, 9, 10, 15, 16][((x >> 50) % 5) as usize],
                type_idx,
                status: if (x >> 54) % 10 == 0 { 2 } else { 1 },
                visibility: if (x >> 58) % 8 == 0 { 1 } else { 4 },
                alive: !is_gap,
            });
            if !is_gap {
                alive += 1;
            }
        }
        let mut c = Catalog {
            seed,
            rows,
            by_time: Vec::new(),
            by_id: Vec::new(),
        };
        c.rebuild_indexes();
        c
    }

    fn rebuild_indexes(&mut self) {
        self.by_id = self.rows.iter().filter(|r| r.alive).map(|r| r.id).collect();
        self.by_time = self
            .rows
            .iter()
            .filter(|r| r.alive)
            .map(|r| (r.updated_at, r.id))
            .collect();
        self.by_time.sort_unstable();
    }

    /// The seed the strings derive from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of alive products.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True when no product is alive.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The alive row of an id.
    pub fn get(&self, id: u32) -> Option<Row> {
        let idx = usize::try_from(id).ok()?.checked_sub(1)?;
        self.rows.get(idx).copied().filter(|r| r.alive)
    }

    /// The SKU of a row.
    pub fn sku(&self, id: u32) -> String {
        sku_for(self.seed, id)
    }

    /// Finds an alive product by SKU, case-insensitively, by inverting
    /// [`sku_for`].
    pub fn find_sku(&self, sku: &str) -> Option<Row> {
        let digits: String = sku
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if digits.is_empty() {
            return None;
        }
        let mut candidates = Vec::with_capacity(2);
        if let Ok(id) = digits.parse::<u32>() {
            candidates.push(id);
        }
        if digits.len() == sku.len() && digits.len() > 4 {
            if let Ok(id) = digits[..digits.len() - 4].parse::<u32>() {
                candidates.push(id);
            }
        }
        let wanted = sku.to_lowercase();
        candidates.into_iter().find_map(|id| {
            self.get(id)
                .filter(|_| sku_for(self.seed, id).to_lowercase() == wanted)
        })
    }

    /// Every alive id, ascending.
    pub fn ids(&self) -> &[u32] {
        &self.by_id
    }

    /// `count` alive ids spread evenly over the catalog (by id).
    pub fn spread(&self, count: usize) -> Vec<u32> {
        let n = self.by_id.len();
        let count = count.min(n);
        if count == 0 {
            return Vec::new();
        }
        (0..count).map(|i| self.by_id[i * n / count]).collect()
    }

    /// Changes the price of some products without touching `updated_at`
    /// (as stock, image and mass-attribute updates do in Magento).
    pub fn change_silently(&mut self, ids: &[u32]) {
        for id in ids {
            if self.get(*id).is_some() {
                let r = &mut self.rows[(*id - 1) as usize];
                r.rev = r.rev.wrapping_add(1);
                r.price_cents = r.price_cents.saturating_add(1);
            }
        }
    }

    /// Moves a product's `updated_at` to the end of time as far as sorting
    /// and filtering go (`u32::MAX`), as a row stored with "9999-12-31
    /// 23:59:59" sorts after every real one.
    pub fn set_updated_last(&mut self, id: u32) {
        if self.get(id).is_some() {
            self.by_time.retain(|(_, i)| *i != id);
            self.rows[(id - 1) as usize].updated_at = u32::MAX;
            self.merge_time(vec![(u32::MAX, id)]);
        }
    }

    /// A product that exists only in one answer (the `endless` fault): a
    /// row for `id`, created and updated at `ts`.
    pub fn phantom(&self, id: u32, ts: u32) -> Row {
        let x = h(self.seed, id, 7);
        Row {
            id,
            created_at: ts,
            updated_at: ts,
            price_cents: 100 + ((x >> 36) % 99_900) as u32,
            weight_g: 50 + ((x >> 44) % 5000) as u32,
            rev: 0,
            set_id: 4,
            type_idx: 0,
            status: 1,
            visibility: 4,
            alive: true,
        }
    }

    /// The largest id a listing may hold when it holds only the `n` lowest
    /// ids (the `partial_listing` fault); 0 when `n` is 0.
    pub fn nth_id(&self, n: u64) -> u32 {
        match usize::try_from(n).ok().and_then(|n| n.checked_sub(1)) {
            None => 0,
            Some(i) => self
                .by_id
                .get(i)
                .or(self.by_id.last())
                .copied()
                .unwrap_or(0),
        }
    }

    /// Sets `updated_at` on some products (and bumps their revision, so the
    /// content changes too).
    pub fn set_updated(&mut self, ids: &[u32], ts: u32) {
        let set: HashSet<u32> = ids
            .iter()
            .copied()
            .filter(|id| self.get(*id).is_some())
            .collect();
        if set.is_empty() {
            return;
        }
        self.by_time.retain(|(_, id)| !set.contains(id));
        let mut added: Vec<(u32, u32)> = Vec::with_capacity(set.len());
        for id in &set {
            let r = &mut self.rows[(*id - 1) as usize];
            r.updated_at = ts;
            r.rev = r.rev.wrapping_add(1);
            r.price_cents = if r.price_cents > 10_000_000 {
                100
            } else {
                r.price_cents + 100
            };
            added.push((ts, *id));
        }
        self.merge_time(added);
    }

    /// Updates a product as a save through the API would: optional new
    /// price (cents), status and visibility; `updated_at` and the revision
    /// move.
    pub fn update(
        &mut self,
        id: u32,
        price_cents: Option<u32>,
        status: Option<u8>,
        visibility: Option<u8>,
        ts: u32,
    ) {
        if self.get(id).is_none() {
            return;
        }
        self.set_updated(&[id], ts);
        let r = &mut self.rows[(id - 1) as usize];
        if let Some(p) = price_cents {
            r.price_cents = p;
        }
        if let Some(s) = status.filter(|s| matches!(s, 1 | 2)) {
            r.status = s;
        }
        if let Some(v) = visibility.filter(|v| (1..=4).contains(v)) {
            r.visibility = v;
        }
    }

    fn merge_time(&mut self, mut added: Vec<(u32, u32)>) {
        added.sort_unstable();
        let append = match (self.by_time.last(), added.first()) {
            (Some(last), Some(first)) => last < first,
            _ => true,
        };
        self.by_time.extend(added);
        if !append {
            self.by_time.sort_unstable();
        }
    }

    /// Deletes products; returns the ids that were alive.
    pub fn delete(&mut self, ids: &[u32]) -> Vec<u32> {
        let mut gone = Vec::new();
        for id in ids {
            if self.get(*id).is_some() {
                self.rows[(*id - 1) as usize].alive = false;
                gone.push(*id);
            }
        }
        let set: HashSet<u32> = gone.iter().copied().collect();
        self.by_time.retain(|(_, id)| !set.contains(id));
        self.by_id.retain(|id| !set.contains(id));
        gone
    }

    /// Creates `count` products with new ids, created and updated at `ts`.
    pub fn create(&mut self, count: usize, ts: u32) -> Vec<u32> {
        let mut ids = Vec::with_capacity(count);
        let mut id = u32::try_from(self.rows.len()).unwrap_or(u32::MAX);
        for _ in 0..count {
            id = id.saturating_add(1);
            let x = h(self.seed, id, 7);
            self.rows.push(Row {
                id,
                created_at: ts,
                updated_at: ts,
                price_cents: 100 + ((x >> 36) % 99_900) as u32,
                weight_g: 50 + ((x >> 44) % 5000) as u32,
                rev: 0,
                set_id: 4,
                type_idx: 0,
                status: 1,
                visibility: 4,
                alive: true,
            });
            ids.push(id);
        }
        self.by_id.extend(&ids);
        self.merge_time(ids.iter().map(|id| (ts, *id)).collect());
        ids
    }

    fn value(&self, row: &Row, field: Field, lang: Lang) -> Value {
        match field {
            Field::EntityId => Value::Num(f64::from(row.id)),
            Field::Sku => Value::Text(sku_for(self.seed, row.id).to_lowercase()),
            Field::Name => Value::Text(name_for(self.seed, row.id, lang).to_lowercase()),
            Field::UpdatedAt => Value::Date(row.updated_at),
            Field::CreatedAt => Value::Date(row.created_at),
            Field::Price => Value::Num(row.price_cents_now() as f64 / 100.0),
            Field::Status => Value::Num(f64::from(row.status)),
            Field::Visibility => Value::Num(f64::from(row.visibility)),
            Field::TypeId => Value::Text(row.type_id().to_string()),
            Field::AttributeSetId => Value::Num(f64::from(row.set_id)),
        }
    }

    fn matches(&self, row: &Row, f: &Filter, lang: Lang) -> bool {
        use std::cmp::Ordering::*;
        let v = self.value(row, f.field, lang);
        match &f.cond {
            Cond::Eq(o) => v.cmp_operand(o) == Some(Equal),
            Cond::Neq(o) => v.cmp_operand(o) != Some(Equal),
            Cond::Gt(o) => v.cmp_operand(o) == Some(Greater),
            Cond::Gteq(o) => matches!(v.cmp_operand(o), Some(Greater | Equal)),
            Cond::Lt(o) => v.cmp_operand(o) == Some(Less),
            Cond::Lteq(o) => matches!(v.cmp_operand(o), Some(Less | Equal)),
            Cond::In(list) => list.iter().any(|o| v.cmp_operand(o) == Some(Equal)),
            Cond::Nin(list) => !list.iter().any(|o| v.cmp_operand(o) == Some(Equal)),
            Cond::Like(p) => {
                let pat: Vec<char> = p.chars().collect();
                let text: Vec<char> = v.as_text().to_lowercase().chars().collect();
                like_match(&pat, &text)
            }
            Cond::Null => false,
            Cond::NotNull => true,
        }
    }

    /// Runs a query. `salt` varies the order of rows tied on every sort key
    /// (pass a per-request value).
    pub fn query(&self, q: &Query, salt: u64) -> Page {
        // 1. Ranges on the indexed fields from single-filter groups.
        let mut time_lo: i64 = i64::MIN;
        let mut time_hi: i64 = i64::MAX;
        let mut id_lo: i64 = i64::MIN;
        let mut id_hi: i64 = i64::MAX;
        let mut residual: Vec<&Vec<Filter>> = Vec::new();
        let mut used_time = false;
        let mut used_id = false;
        for g in &q.groups {
            let consumed = match g.as_slice() {
                [f] if matches!(f.field, Field::UpdatedAt | Field::EntityId) => {
                    let (lo, hi, used) = if f.field == Field::UpdatedAt {
                        (&mut time_lo, &mut time_hi, &mut used_time)
                    } else {
                        (&mut id_lo, &mut id_hi, &mut used_id)
                    };
                    range_of(&f.cond, lo, hi, used)
                }
                _ => false,
            };
            if !consumed {
                residual.push(g);
            }
        }

        // 2. The candidate slice and its natural order.
        let by_time_slice = |lo: i64, hi: i64| -> &[(u32, u32)] {
            let a = self.by_time.partition_point(|(t, _)| i64::from(*t) < lo);
            let b = self.by_time.partition_point(|(t, _)| i64::from(*t) <= hi);
            &self.by_time[a..b.max(a)]
        };
        let by_id_slice = |lo: i64, hi: i64| -> &[u32] {
            let a = self.by_id.partition_point(|id| i64::from(*id) < lo);
            let b = self.by_id.partition_point(|id| i64::from(*id) <= hi);
            &self.by_id[a..b.max(a)]
        };
        let sort: Vec<(Field, Dir)> = if q.sort.is_empty() {
            vec![(Field::EntityId, Dir::Asc)]
        } else {
            q.sort.clone()
        };
        let time_driver =
            used_time || (!used_id && matches!(sort.first(), Some((Field::UpdatedAt, _))));

        // 3. Fast path: no residual filter and the sort is the index order.
        if residual.is_empty() {
            if time_driver && !used_id {
                if let [(Field::UpdatedAt, d1), (Field::EntityId, d2)] = sort.as_slice() {
                    if d1 == d2 {
                        let s = by_time_slice(time_lo, time_hi);
                        return self.page_of(s.len(), q, |i| {
                            let i = if *d1 == Dir::Asc { i } else { s.len() - 1 - i };
                            s[i].1
                        });
                    }
                }
            } else if !time_driver && !used_time {
                if let [(Field::EntityId, d)] = sort.as_slice() {
                    let s = by_id_slice(id_lo, id_hi);
                    return self.page_of(s.len(), q, |i| {
                        if *d == Dir::Asc {
                            s[i]
                        } else {
                            s[s.len() - 1 - i]
                        }
                    });
                }
            }
        }

        // 3b. Keyset path: the one residual group is "updated_at > T OR
        // entity_id > I", the time range starts at or after T, and the sort is
        // the index order: the rows after (T, I) are a contiguous slice.
        if let ([g], false, [(Field::UpdatedAt, d1), (Field::EntityId, d2)]) =
            (residual.as_slice(), used_id, sort.as_slice())
        {
            if let Some(key) = keyset_after(g).filter(|(t, _)| d1 == d2 && time_lo >= *t) {
                let s = by_time_slice(time_lo, time_hi);
                let from = s.partition_point(|(t, id)| (i64::from(*t), i64::from(*id)) <= key);
                let s = &s[from..];
                return self.page_of(s.len(), q, |i| {
                    let i = if *d1 == Dir::Asc { i } else { s.len() - 1 - i };
                    s[i].1
                });
            }
        }

        // 4. General path: collect, filter, sort.
        let keep = |id: u32| -> bool {
            let Some(row) = self.get(id) else {
                return false;
            };
            let in_time =
                i64::from(row.updated_at) >= time_lo && i64::from(row.updated_at) <= time_hi;
            let in_id = i64::from(id) >= id_lo && i64::from(id) <= id_hi;
            in_time
                && in_id
                && residual
                    .iter()
                    .all(|g| g.iter().any(|f| self.matches(&row, f, q.lang)))
        };
        let mut ids: Vec<u32> = if time_driver {
            by_time_slice(time_lo, time_hi)
                .iter()
                .map(|(_, id)| *id)
                .filter(|id| keep(*id))
                .collect()
        } else {
            by_id_slice(id_lo, id_hi)
                .iter()
                .copied()
                .filter(|id| keep(*id))
                .collect()
        };
        self.sort_ids(&mut ids, &sort, q.lang, salt);
        self.page_of(ids.len(), q, |i| ids[i])
    }

    fn sort_ids(&self, ids: &mut [u32], sort: &[(Field, Dir)], lang: Lang, salt: u64) {
        let unique_last = matches!(sort.last(), Some((Field::EntityId | Field::Sku, _)));
        let needs_text = sort
            .iter()
            .any(|(f, _)| matches!(f, Field::Sku | Field::Name | Field::TypeId));
        // Precompute the text keys once (sorting by SKU or name).
        let texts: Vec<Vec<String>> = if needs_text {
            ids.iter()
                .map(|id| {
                    sort.iter()
                        .filter(|(f, _)| matches!(f, Field::Sku | Field::Name | Field::TypeId))
                        .map(|(f, _)| match self.get(*id) {
                            Some(r) => self.value(&r, *f, lang).as_text(),
                            None => String::new(),
                        })
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut order: Vec<usize> = (0..ids.len()).collect();
        let num = |id: u32, f: Field| -> f64 {
            match self.get(id) {
                Some(r) => match self.value(&r, f, lang) {
                    Value::Num(n) => n,
                    Value::Date(d) => f64::from(d),
                    Value::Text(_) => 0.0,
                },
                None => 0.0,
            }
        };
        order.sort_unstable_by(|&a, &b| {
            let mut ti = 0;
            for (f, d) in sort {
                let o = if matches!(f, Field::Sku | Field::Name | Field::TypeId) {
                    let o = texts[a][ti].cmp(&texts[b][ti]);
                    ti += 1;
                    o
                } else {
                    num(ids[a], *f)
                        .partial_cmp(&num(ids[b], *f))
                        .unwrap_or(std::cmp::Ordering::Equal)
                };
                let o = if *d == Dir::Desc { o.reverse() } else { o };
                if o != std::cmp::Ordering::Equal {
                    return o;
                }
            }
            if unique_last {
                std::cmp::Ordering::Equal
            } else {
                // MySQL gives ties in no stable order: shuffle them.
                mix(u64::from(ids[a]) ^ salt).cmp(&mix(u64::from(ids[b]) ^ salt))
            }
        });
        let sorted: Vec<u32> = order.into_iter().map(|i| ids[i]).collect();
        ids.copy_from_slice(&sorted);
    }

    fn page_of(&self, total: usize, q: &Query, at: impl Fn(usize) -> u32) -> Page {
        let (start, end) = match q.page_size {
            None | Some(0) => (0, total),
            Some(size) => {
                let size = size as usize;
                let page = q.current_page.max(1) as usize;
                let mut start = (page - 1).saturating_mul(size);
                if start >= total && q.legacy_last_page && total > 0 {
                    start = ((total - 1) / size) * size;
                }
                (start.min(total), start.saturating_add(size).min(total))
            }
        };
        let rows = (start..end).filter_map(|i| self.get(at(i))).collect();
        Page { total, rows }
    }
}

/// The lowest `entity_id` a query admits, as far as its id range and keyset
/// groups tell (`None`: unbounded below).
pub fn id_floor(q: &Query) -> Option<i64> {
    let mut floor: Option<i64> = None;
    let mut raise = |v: i64| floor = Some(floor.map_or(v, |f| f.max(v)));
    for g in &q.groups {
        match g.as_slice() {
            [f] if f.field == Field::EntityId => match &f.cond {
                Cond::Gt(Operand::Num(n)) if n.is_finite() => raise(n.floor() as i64 + 1),
                Cond::Gteq(Operand::Num(n)) if n.is_finite() => raise(n.ceil() as i64),
                _ => {}
            },
            g => {
                if let Some((_, i)) = keyset_after(g) {
                    raise(i.saturating_add(1));
                }
            }
        }
    }
    floor
}

/// `Some((T, I))` when a group reads "`updated_at` > T OR `entity_id` > I"
/// (in either order, numeric operands): for integer keys the rows it keeps
/// among those with `updated_at` ≥ T are exactly `(updated_at, id) > (T, I)`.
fn keyset_after(group: &[Filter]) -> Option<(i64, i64)> {
    let gt = |f: &Filter, field: Field| match (&f.cond, f.field == field) {
        (Cond::Gt(Operand::Num(n)), true) if n.is_finite() => Some(n.floor() as i64),
        _ => None,
    };
    match group {
        [a, b] => match (gt(a, Field::UpdatedAt), gt(b, Field::EntityId)) {
            (Some(t), Some(i)) => Some((t, i)),
            _ => Some((gt(b, Field::UpdatedAt)?, gt(a, Field::EntityId)?)),
        },
        _ => None,
    }
}

/// Narrows `[lo, hi]` by a range condition; false when the condition is not
/// a numeric range (then the group stays a residual filter).
fn range_of(cond: &Cond, lo: &mut i64, hi: &mut i64, used: &mut bool) -> bool {
    let num = |o: &Operand| match o {
        Operand::Num(n) if n.is_finite() => Some(*n),
        _ => None,
    };
    let (l, u) = match cond {
        Cond::Eq(o) => match num(o) {
            Some(n) if n.fract() == 0.0 => (n as i64, n as i64),
            Some(_) => (1, 0),
            None => return false,
        },
        Cond::Gt(o) => match num(o) {
            Some(n) => (n.floor() as i64 + 1, i64::MAX),
            None => return false,
        },
        Cond::Gteq(o) => match num(o) {
            Some(n) => (n.ceil() as i64, i64::MAX),
            None => return false,
        },
        Cond::Lt(o) => match num(o) {
            Some(n) => (i64::MIN, n.ceil() as i64 - 1),
            None => return false,
        },
        Cond::Lteq(o) => match num(o) {
            Some(n) => (i64::MIN, n.floor() as i64),
            None => return false,
        },
        _ => return false,
    };
    *lo = (*lo).max(l);
    *hi = (*hi).min(u);
    *used = true;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> Query {
        Query::default()
    }

    #[test]
    fn deterministic_and_sized() {
        let a = Catalog::generate(7, 5000);
        let b = Catalog::generate(7, 5000);
        assert_eq!(a.len(), 5000);
        assert_eq!(a.rows, b.rows);
        let c = Catalog::generate(8, 5000);
        assert_ne!(a.rows, c.rows);
        // Gaps exist.
        assert!(a.rows.len() > 5000);
        assert!(a.get(1).is_some());
    }

    #[test]
    fn awkward_skus_round_trip() {
        let c = Catalog::generate(1, 3000);
        let mut kinds = HashSet::new();
        let mut seen = HashSet::new();
        for &id in c.ids() {
            let sku = c.sku(id);
            assert!(seen.insert(sku.to_lowercase()), "duplicate {sku}");
            assert_eq!(c.find_sku(&sku).map(|r| r.id), Some(id), "{sku}");
            assert_eq!(
                c.find_sku(&sku.to_ascii_uppercase()).map(|r| r.id),
                Some(id)
            );
            assert_eq!(c.find_sku(&sku.to_lowercase()).map(|r| r.id), Some(id));
            if sku.chars().all(|c| c.is_ascii_digit()) {
                kinds.insert("digits");
            }
            if sku.chars().count() == 64 {
                kinds.insert("long");
            }
            for k in [" ", "/", "+", "&", "%", "\"", "'", "ö"] {
                if sku.contains(k) {
                    kinds.insert(k);
                }
            }
        }
        assert_eq!(kinds.len(), 10, "{kinds:?}");
        assert!(c.find_sku("nope").is_none());
        assert!(c.find_sku("WJ-99999999").is_none());
    }

    #[test]
    fn many_share_a_second() {
        let c = Catalog::generate(3, 20_000);
        let mut runs = std::collections::HashMap::new();
        for (t, _) in &c.by_time {
            *runs.entry(*t).or_insert(0usize) += 1;
        }
        assert!(runs.values().any(|n| *n >= 100));
    }

    #[test]
    fn timestamps_round_trip() {
        assert_eq!(fmt_ts(0), "1970-01-01 00:00:00");
        assert_eq!(fmt_ts(1_511_988_007), "2017-11-29 20:40:07");
        assert_eq!(parse_ts("2017-11-29 20:40:07"), Some(1_511_988_007));
        assert_eq!(parse_ts("2017-11-29T20:40:07Z"), Some(1_511_988_007));
        assert_eq!(parse_ts("2017-11-29"), Some(1_511_913_600));
        assert_eq!(parse_ts("yesterday"), None);
        for s in [EPOCH_BASE, EPOCH_BASE + SPAN, 951_782_400] {
            assert_eq!(parse_ts(&fmt_ts(s)), Some(i64::from(s)));
        }
    }

    #[test]
    fn like_wildcards() {
        let m = |p: &str, t: &str| {
            like_match(
                &p.chars().collect::<Vec<_>>(),
                &t.chars().collect::<Vec<_>>(),
            )
        };
        assert!(m("wj-%", "wj-00012"));
        assert!(m("%ö%", "größe"));
        assert!(m("a_c", "abc"));
        assert!(!m("a_c", "abbc"));
        assert!(m("%", ""));
        assert!(!m("x%", "yx"));
    }

    #[test]
    fn cursor_fast_path_equals_general_path() {
        let c = Catalog::generate(5, 4000);
        let mid = c.by_time[2000].0;
        let gte = Filter::new(Field::UpdatedAt, Op::Gteq, &[fmt_ts(mid)]);
        let mut fast = q();
        fast.groups = vec![vec![gte.clone()]];
        fast.sort = vec![(Field::UpdatedAt, Dir::Asc), (Field::EntityId, Dir::Asc)];
        fast.page_size = Some(100);
        // Same query with a residual always-true group forces the general path.
        let mut slow = fast.clone();
        slow.groups
            .push(vec![Filter::new(Field::Status, Op::NotNull, &[])]);
        let mut all_fast = Vec::new();
        for page in 1..=30 {
            fast.current_page = page;
            slow.current_page = page;
            let a = c.query(&fast, page.into());
            let b = c.query(&slow, 99);
            assert_eq!(a, b);
            all_fast.extend(a.rows.iter().map(|r| r.id));
            if a.rows.is_empty() {
                break;
            }
        }
        let expected: Vec<u32> = c
            .by_time
            .iter()
            .filter(|(t, _)| *t >= mid)
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(all_fast, expected);
        // Descending is the reverse.
        fast.sort = vec![(Field::UpdatedAt, Dir::Desc), (Field::EntityId, Dir::Desc)];
        fast.page_size = None;
        let d = c.query(&fast, 0);
        let mut rev = expected.clone();
        rev.reverse();
        assert_eq!(d.rows.iter().map(|r| r.id).collect::<Vec<_>>(), rev);
    }

    #[test]
    fn keyset_fast_path_equals_general_path() {
        let c = Catalog::generate(5, 4000);
        // A key inside a second shared by many rows, and one at its end.
        let (t, i) = c.by_time[1500];
        for (t, i, swap) in [
            (t, i, false),
            (t, i, true),
            (t, 0, false),
            (t, u32::MAX, false),
        ] {
            let ts = fmt_ts(t);
            let mut or = vec![
                Filter::new(Field::UpdatedAt, Op::Gt, std::slice::from_ref(&ts)),
                Filter::new(Field::EntityId, Op::Gt, &[i.to_string()]),
            ];
            if swap {
                or.reverse();
            }
            let mut fast = q();
            fast.groups = vec![vec![Filter::new(Field::UpdatedAt, Op::Gteq, &[ts])], or];
            fast.sort = vec![(Field::UpdatedAt, Dir::Asc), (Field::EntityId, Dir::Asc)];
            fast.page_size = Some(100);
            let mut slow = fast.clone();
            slow.groups
                .push(vec![Filter::new(Field::Status, Op::NotNull, &[])]);
            let expected: Vec<u32> = c
                .by_time
                .iter()
                .filter(|k| **k > (t, i))
                .map(|(_, id)| *id)
                .collect();
            for page in [1, 2, 40] {
                fast.current_page = page;
                slow.current_page = page;
                let a = c.query(&fast, 1);
                assert_eq!(a, c.query(&slow, 2));
                assert_eq!(a.total, expected.len());
                let start = ((page - 1) * 100) as usize;
                let want: Vec<u32> = expected.iter().skip(start).take(100).copied().collect();
                assert_eq!(a.rows.iter().map(|r| r.id).collect::<Vec<_>>(), want);
            }
            fast.sort = vec![(Field::UpdatedAt, Dir::Desc), (Field::EntityId, Dir::Desc)];
            slow.sort = fast.sort.clone();
            fast.current_page = 1;
            slow.current_page = 1;
            assert_eq!(c.query(&fast, 1), c.query(&slow, 2));
        }
    }

    #[test]
    fn ties_shuffle_without_unique_key() {
        let c = Catalog::generate(3, 20_000);
        let mut qq = q();
        qq.sort = vec![(Field::UpdatedAt, Dir::Asc)];
        let a: Vec<u32> = c.query(&qq, 1).rows.iter().map(|r| r.id).collect();
        let b: Vec<u32> = c.query(&qq, 2).rows.iter().map(|r| r.id).collect();
        assert_ne!(a, b);
        let mut sa = a.clone();
        sa.sort_unstable();
        let mut sb = b.clone();
        sb.sort_unstable();
        assert_eq!(sa, sb);
    }

    #[test]
    fn filters_semantics() {
        let c = Catalog::generate(11, 2000);
        let id = c.ids()[10];
        let sku = c.sku(id);
        let run = |groups: Vec<Vec<Filter>>| -> Vec<u32> {
            let mut qq = q();
            qq.groups = groups;
            c.query(&qq, 0).rows.iter().map(|r| r.id).collect()
        };
        // Case-insensitive SKU eq.
        assert_eq!(
            run(vec![vec![Filter::new(
                Field::Sku,
                Op::Eq,
                &[sku.to_uppercase()]
            )]]),
            vec![id]
        );
        // OR inside a group, AND across groups.
        let id2 = c.ids()[20];
        let or = vec![
            Filter::new(Field::EntityId, Op::Eq, &[id.to_string()]),
            Filter::new(Field::EntityId, Op::Eq, &[id2.to_string()]),
        ];
        assert_eq!(run(vec![or.clone()]), vec![id, id2]);
        let and = vec![Filter::new(Field::EntityId, Op::Gt, &[id.to_string()])];
        assert_eq!(run(vec![or, and]), vec![id2]);
        // in / nin.
        let list = [id.to_string(), id2.to_string()];
        assert_eq!(
            run(vec![vec![Filter::new(Field::EntityId, Op::In, &list)]]),
            vec![id, id2]
        );
        assert_eq!(
            run(vec![vec![Filter::new(Field::EntityId, Op::Nin, &list)]]).len(),
            1998
        );
        // like.
        let like = run(vec![vec![Filter::new(
            Field::Sku,
            Op::Like,
            &["größe%".into()],
        )]]);
        assert!(!like.is_empty());
        for i in like {
            assert!(c.sku(i).starts_with("Größe"));
        }
        // Date lteq and gt partition the catalog.
        let t = fmt_ts(c.by_time[700].0);
        let a = run(vec![vec![Filter::new(
            Field::UpdatedAt,
            Op::Lteq,
            std::slice::from_ref(&t),
        )]]);
        let b = run(vec![vec![Filter::new(Field::UpdatedAt, Op::Gt, &[t])]]);
        assert_eq!(a.len() + b.len(), 2000);
        // neq on a date through the general path.
        let n = run(vec![vec![Filter::new(
            Field::CreatedAt,
            Op::Neq,
            &["2000-01-01".into()],
        )]]);
        assert_eq!(n.len(), 2000);
    }

    #[test]
    fn paging_past_the_end() {
        let c = Catalog::generate(2, 250);
        let mut qq = q();
        qq.page_size = Some(100);
        qq.current_page = 3;
        let p = c.query(&qq, 0);
        assert_eq!((p.total, p.rows.len()), (250, 50));
        qq.current_page = 4;
        assert!(c.query(&qq, 0).rows.is_empty());
        qq.legacy_last_page = true;
        let legacy = c.query(&qq, 0);
        assert_eq!(legacy.rows, p.rows);
        qq.current_page = 0;
        assert_eq!(c.query(&qq, 0).rows.len(), 100);
    }

    #[test]
    fn mutations_keep_indexes() {
        let mut c = Catalog::generate(4, 1000);
        let touched = c.spread(10);
        c.set_updated(&touched, 2_000_000_000);
        let mut qq = q();
        qq.groups = vec![vec![Filter::new(
            Field::UpdatedAt,
            Op::Gteq,
            &["2033-05-18 03:33:20".into()],
        )]];
        qq.sort = vec![(Field::UpdatedAt, Dir::Asc), (Field::EntityId, Dir::Asc)];
        let p = c.query(&qq, 0);
        assert_eq!(p.rows.iter().map(|r| r.id).collect::<Vec<_>>(), touched);
        assert!(p.rows.iter().all(|r| r.rev == 1));
        let gone = c.delete(&touched[..3]);
        assert_eq!(gone.len(), 3);
        assert_eq!(c.len(), 997);
        assert_eq!(c.query(&qq, 0).total, 7);
        let new = c.create(5, 2_000_000_001);
        assert_eq!(c.len(), 1002);
        assert_eq!(c.query(&qq, 0).total, 12);
        assert!(new.iter().all(|id| c.find_sku(&c.sku(*id)).is_some()));
        // Setting an old timestamp moves rows back in the index.
        c.set_updated(&new, 1_600_000_000);
        assert_eq!(c.query(&qq, 0).total, 7);
        assert!(c.by_time.windows(2).all(|w| w[0] < w[1]));
    }
}
