//! Magento 1 sync of one store view.
//!
//! `catalog_product.list` has no paging, so the catalog is first listed in
//! `product_id` ranges (widening past empty ranges, so the listing ends a
//! few requests after the last id) into a scratch tree (id → SKU); then the
//! details come from `multiCall` batches of `catalog_product.info`,
//! `sync.shop_concurrency` batches in flight, in id order. Listing first
//! gives the run its exact total and, for a full reconcile, a complete
//! listing before anything is judged gone. An incremental run lists only
//! products with `updated_at` ≥ the checkpoint second (re-read, upserts are
//! idempotent).
//!
//! Untrusted answers: a listing with a product outside the asked range or
//! an id twice stops the run (`protocol`: the shop ignores the filter, and
//! walking on would read the same products for ever). A product whose
//! details fail (a fault, or an answer for another `product_id`) is asked
//! again on its own; if it still fails it keeps its mirrored copy and the
//! run ends `partial`. "Product not exists" (101) for a listed product is
//! believed only when the product, asked again on its own, still does not
//! exist and a new listing of it no longer lists it; otherwise the answers
//! contradict each other, the product is kept and the run is `partial`. The
//! checkpoint does not move after a run with such problems. A SKU listed
//! on more than one product id makes the run `partial`, naming the ids, and
//! the listing is not trusted to delete anything (the mirror keeps one
//! product per SKU, the last read).

use super::{RunCtx, SyncError, begin, delete_unseen};
use crate::magento::m1::M1Client;
use crate::magento::xmlrpc::{Fault, Value, XmlRpcError};
use crate::magento::{FailureKind, ShopError};
use crate::mirror::{Cursor, Item, Mirror};
use crate::store::StoreError;
use futures_util::StreamExt;

/// Empty id ranges in a row after which the listing ends. The range doubles
/// each time, so 24 cover more than 2^24 × `m1_id_range` ids.
const MAX_EMPTY_RANGES: u32 = 24;

/// Magento's "Product not exists." fault.
const FAULT_NOT_EXISTS: i64 = 101;

fn set(c: &mut Cursor, f: impl FnOnce(&mut crate::mirror::RunCursor)) {
    if let Some(r) = c.run.as_mut() {
        f(r);
    }
}

fn run_field<T>(c: &Cursor, f: impl FnOnce(&crate::mirror::RunCursor) -> T) -> Option<T> {
    c.run.as_ref().map(f)
}

fn phase(c: &Cursor) -> String {
    run_field(c, |r| r.phase.clone()).unwrap_or_default()
}

fn protocol(message: String) -> SyncError {
    SyncError::Shop(ShopError::new(FailureKind::Protocol, message))
}

/// What a store view's run could not trust or read (it then ends
/// `partial`).
#[derive(Default)]
struct Tally {
    /// Products whose details failed, also when asked alone.
    unreadable: u64,
    unreadable_kind: Option<FailureKind>,
    unreadable_example: Option<String>,
    /// Products listed but "not exists" when asked, also alone and after a
    /// new listing.
    inconsistent: u64,
    inconsistent_example: Option<String>,
}

impl Tally {
    fn any(&self) -> bool {
        self.unreadable > 0 || self.inconsistent > 0
    }
}

pub async fn sync_store(
    ctx: &mut RunCtx<'_>,
    client: &M1Client,
    code: &str,
) -> Result<(), SyncError> {
    let mirror = Mirror::open(&ctx.d.store, &ctx.rec.name, code)?;
    let mut cursor = mirror.cursor()?;
    let walk = ctx.full || cursor.updated_at.is_none();
    let seen_name = ctx.scratch(code, "seen");
    // Listed ids → SKU, the products still to fetch (the scratch tree M2
    // uses for refetches; one shop is only ever one platform).
    let todo_name = ctx.scratch(code, "refetch");
    if !begin(ctx, &mut cursor, if walk { "list" } else { "changed" }) {
        // A fresh run: whatever an abandoned one left is not this listing.
        ctx.d.store.drop_scratch(&seen_name)?;
        ctx.d.store.drop_scratch(&todo_name)?;
        if !walk {
            let since = cursor.updated_at.clone();
            set(&mut cursor, |r| r.since = since);
        }
        let clock = shop_clock(ctx, client, code).await?;
        set(&mut cursor, |r| r.shop_clock = clock);
        mirror.save_cursor(&cursor)?;
    }
    if phase(&cursor) == "walk" {
        // A run cursor of the walk before the listing phase existed: its
        // products are stored; list again from the start.
        set(&mut cursor, |r| {
            r.phase = "list".into();
            r.position = 1;
            r.empty_ranges = 0;
        });
        mirror.save_cursor(&cursor)?;
    }
    let mut tally = Tally::default();
    if phase(&cursor) == "changed" {
        changed_since(ctx, client, code, &mirror, &mut cursor, &mut tally).await?;
    } else {
        let todo = ctx.d.store.scratch(&todo_name)?;
        // Every walk notes SKU → id, to find a SKU on two ids; only a
        // full reconcile deletes by it.
        let seen = Some(ctx.d.store.scratch(&seen_name)?);
        if phase(&cursor) == "list" {
            list_ranges(
                ctx,
                client,
                code,
                &mirror,
                &mut cursor,
                &todo,
                seen.as_ref(),
            )
            .await?;
            set(&mut cursor, |r| {
                r.phase = "fetch".into();
                r.position = 0;
            });
            mirror.save_cursor(&cursor)?;
        }
        if phase(&cursor) == "fetch" {
            let seen = seen.as_ref();
            fetch_listed(
                ctx,
                client,
                code,
                &mirror,
                &mut cursor,
                &todo,
                seen,
                &mut tally,
            )
            .await?;
            if ctx.full {
                set(&mut cursor, |r| r.phase = "delete".into());
                mirror.save_cursor(&cursor)?;
            }
        }
        let duplicated = match &seen {
            Some(seen) => report_duplicates(ctx, code, seen)?,
            None => false,
        };
        if phase(&cursor) == "delete"
            && !duplicated
            && let Some(seen) = &seen
        {
            delete_unseen(ctx, &mirror, &mut cursor, seen).await?;
        }
    }
    ctx.d.store.drop_scratch(&seen_name)?;
    ctx.d.store.drop_scratch(&todo_name)?;
    // The newest `updated_at` stored, but never past the shop's clock at
    // the start: the next run re-reads what was saved while this one read.
    // After products that could not be read, the checkpoint stays: the
    // next run asks for them again.
    let max_seen = run_field(&cursor, |r| r.max_seen.clone()).flatten();
    let reached = match (
        max_seen,
        run_field(&cursor, |r| r.shop_clock.clone()).flatten(),
    ) {
        (Some(seen), Some(clock)) => Some(seen.min(clock)),
        (seen, _) => seen,
    };
    if reached > cursor.updated_at && !tally.any() {
        cursor.updated_at = reached;
    }
    cursor.run = None;
    mirror.save_cursor(&cursor)?;
    ctx.flush().await?;
    report(ctx, code, &tally);
    Ok(())
}

/// Makes the run `partial` with what this store view could not trust.
fn report(ctx: &mut RunCtx<'_>, code: &str, t: &Tally) {
    if t.inconsistent > 0 {
        ctx.partial(ShopError::new(
            FailureKind::Protocol,
            format!(
                "store view {code}: catalog_product.list lists {} product(s) that catalog_product.info says do not exist (fault 101{}), also when asked again one by one: the shop's answers contradict each other (a stale catalog index or a half-updated module?); they keep their mirrored copy, nothing was deleted because of it, and the checkpoint did not move",
                t.inconsistent,
                t.inconsistent_example
                    .as_deref()
                    .map(|e| format!("; e.g. {e}"))
                    .unwrap_or_default()
            ),
        ));
    }
    if t.unreadable > 0 {
        ctx.partial(ShopError::new(
            t.unreadable_kind.unwrap_or(FailureKind::ServerError),
            format!(
                "store view {code}: {} product(s) could not be read, also when asked again one by one ({}); they keep their mirrored copy and the next run asks for them again",
                t.unreadable,
                t.unreadable_example.as_deref().unwrap_or("")
            ),
        ));
    }
}

/// The shop's time before the run reads anything: a cheap listing that
/// matches no product, then the newest `Date` the shop answered with
/// (`None` when its answers carry no `Date`).
async fn shop_clock(
    ctx: &RunCtx<'_>,
    client: &M1Client,
    code: &str,
) -> Result<Option<String>, SyncError> {
    let nothing = Value::Struct(vec![(
        "product_id".into(),
        Value::Struct(vec![("eq".into(), Value::Int(0))]),
    )]);
    ctx.request("shop clock", || {
        client.list_products(nothing.clone(), Some(code))
    })
    .await?;
    Ok(client
        .shop_clock()
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()))
}

/// A listing entry as decoded: its `product_id` and `sku`, if any.
type Entry = (Option<i64>, Option<String>);

/// Lists with `filters`, keeping only each product's id and SKU as the
/// answer is decoded (a listing's other fields are never held). An entry
/// outside `from..=to`, or more than `cap` entries, stops the decoding at
/// once and the run as `protocol` (not retried: the shop would answer the
/// same).
#[allow(clippy::too_many_arguments)]
async fn list_entries(
    ctx: &RunCtx<'_>,
    client: &M1Client,
    code: &str,
    what: &str,
    filters: &Value,
    from: i64,
    to: i64,
    cap: usize,
) -> Result<Vec<Entry>, SyncError> {
    let (out, bad) = ctx
        .request(what, || async move {
            let mut out: Vec<Entry> = Vec::new();
            let mut bad: Option<String> = None;
            let r = client
                .list_products_each(filters.clone(), Some(code), &mut |v| {
                    let id = v.get("product_id").and_then(Value::as_i64);
                    let outside = id.is_some_and(|id| id < from || id > to);
                    if outside || out.len() >= cap {
                        bad = Some(match id {
                            Some(id) if outside => format!(
                                "catalog_product.list for {} answered product {id}, outside that range: the shop ignores the product_id filter, so walking on would read the same products again and again; fix the shop's catalog_product.list (a module rewriting the product collection or its filters?), then sync again",
                                asked(from, to)
                            ),
                            _ => format!(
                                "catalog_product.list for {} answered more than {cap} products: the shop ignores the product_id filter; fix the shop's catalog_product.list, then sync again",
                                asked(from, to)
                            ),
                        });
                        return Err(XmlRpcError::Refused("listing refused".into()));
                    }
                    out.push((
                        id,
                        v.get("sku").and_then(Value::as_str).map(str::to_string),
                    ));
                    Ok(())
                })
                .await;
            match (r, bad) {
                (_, Some(b)) => Ok((Vec::new(), Some(b))),
                (Ok(()), None) => Ok((out, None)),
                (Err(e), None) => Err(e),
            }
        })
        .await?;
    match bad {
        Some(b) => Err(protocol(b)),
        None => Ok(out),
    }
}

fn asked(from: i64, to: i64) -> String {
    if to == i64::MAX {
        "the changed products".to_string()
    } else {
        format!("product_id {from}..{to}")
    }
}

/// A `catalog_product.list` answer as (id, SKU), ascending, checked: every
/// entry has both, every id is within `from..=to`, none twice.
fn listed(list: Vec<Entry>, from: i64, to: i64) -> Result<Vec<(i64, String)>, SyncError> {
    let asked = asked(from, to);
    let mut out = Vec::with_capacity(list.len());
    for (id, sku) in list {
        let (Some(id), Some(sku)) = (id, sku) else {
            return Err(protocol(format!(
                "catalog_product.list for {asked} answered an entry without a numeric product_id or a sku: the listing cannot be trusted; check the shop's API module"
            )));
        };
        if id < from || id > to {
            return Err(protocol(format!(
                "catalog_product.list for {asked} answered product {id}, outside that range: the shop ignores the product_id filter, so walking on would read the same products again and again; fix the shop's catalog_product.list (a module rewriting the product collection or its filters?), then sync again"
            )));
        }
        out.push((id, sku));
    }
    out.sort_unstable_by_key(|e| e.0);
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(protocol(format!(
            "catalog_product.list for {asked} answered product {} more than once: the listing cannot be trusted (a broken join in the shop's product collection?); fix the shop's catalog_product.list, then sync again",
            w[0].0
        )));
    }
    Ok(out)
}

fn id_filter(f: Vec<(String, Value)>) -> Value {
    Value::Struct(vec![("product_id".into(), Value::Struct(f))])
}

/// The listing phase: every id range, into `todo` (and `seen`, for a full
/// reconcile). Resumes at the run cursor's range.
async fn list_ranges(
    ctx: &RunCtx<'_>,
    client: &M1Client,
    code: &str,
    mirror: &Mirror,
    cursor: &mut Cursor,
    todo: &sled::Tree,
    seen: Option<&sled::Tree>,
) -> Result<(), SyncError> {
    ctx.update(|p| p.phase = "list".into());
    let width = i64::from(ctx.cfg.sync.m1_id_range);
    loop {
        ctx.check()?;
        let (start, empty) =
            run_field(cursor, |r| (r.position.max(1), r.empty_ranges)).unwrap_or((1, 0));
        if empty >= MAX_EMPTY_RANGES || start >= i64::from(i32::MAX) {
            return Ok(());
        }
        let w = width.saturating_mul(1i64 << empty.min(40));
        let end = start.saturating_add(w - 1);
        let filters = id_filter(vec![
            ("from".into(), Value::Int(start)),
            ("to".into(), Value::Int(end)),
        ]);
        let cap = usize::try_from(w).unwrap_or(usize::MAX);
        let list =
            list_entries(ctx, client, code, "product list", &filters, start, end, cap).await?;
        let entries = listed(list, start, end)?;
        for (id, sku) in &entries {
            todo.insert(id.to_be_bytes(), sku.as_bytes())
                .map_err(StoreError::from)?;
            if let Some(seen) = seen {
                note_seen(seen, sku, *id)?;
            }
        }
        set(cursor, |r| {
            r.position = end + 1;
            r.empty_ranges = if entries.is_empty() { empty + 1 } else { 0 };
        });
        mirror.save_cursor(cursor)?;
        ctx.flush().await?;
        ctx.update(|p| p.pages += 1);
    }
}

/// A `seen` value that marks a SKU listed on more than one id: this byte,
/// then the first two ids (big-endian). A plain value is the one id.
const ON_MANY_IDS: u8 = 0xFF;

/// Notes that the listing answered `sku` on `id`; a second id marks the
/// SKU (see [`ON_MANY_IDS`]).
fn note_seen(seen: &sled::Tree, sku: &str, id: i64) -> Result<(), SyncError> {
    let old = seen.get(sku.as_bytes()).map_err(StoreError::from)?;
    let value = match old.as_deref().map(<[u8; 8]>::try_from) {
        None => id.to_be_bytes().to_vec(),
        Some(Ok(o)) if i64::from_be_bytes(o) == id => return Ok(()),
        Some(Ok(o)) => [&[ON_MANY_IDS][..], &o, &id.to_be_bytes()].concat(),
        // Already marked.
        Some(Err(_)) => return Ok(()),
    };
    seen.insert(sku.as_bytes(), value)
        .map_err(StoreError::from)?;
    Ok(())
}

/// Reports the SKUs the walk's listing answered on more than one id (the
/// run is then `partial`); true when there were any: such a listing is not
/// trusted to delete. Reads the scratch tree, so a resumed run knows too.
fn report_duplicates(ctx: &RunCtx<'_>, code: &str, seen: &sled::Tree) -> Result<bool, SyncError> {
    const SHOWN: usize = 5;
    let mut count = 0u64;
    let mut first = Vec::new();
    for kv in seen.iter() {
        let (k, v) = kv.map_err(StoreError::from)?;
        if v.len() != 17 || v[0] != ON_MANY_IDS {
            continue;
        }
        count += 1;
        if first.len() < SHOWN {
            let id = |at: usize| <[u8; 8]>::try_from(&v[at..at + 8]).map_or(0, i64::from_be_bytes);
            first.push(format!(
                "{} (ids {} and {})",
                short(&String::from_utf8_lossy(&k)),
                id(1),
                id(9)
            ));
        }
    }
    if count == 0 {
        return Ok(false);
    }
    let tail = super::and_more(count.saturating_sub(first.len() as u64));
    ctx.inconsistent(format!(
        "store view {code}: catalog_product.list answered the same SKU on more than one product id: {}{tail} (the mirror keeps one product per SKU, the last read, and nothing was deleted by this listing); fix the SKUs in the shop (a broken import or a module writing SKUs?)",
        first.join("; ")
    ));
    Ok(true)
}

/// The fetch phase: the listed products after the run cursor's id, in id
/// order, a page and its checkpoint at a time.
#[allow(clippy::too_many_arguments)]
async fn fetch_listed(
    ctx: &mut RunCtx<'_>,
    client: &M1Client,
    code: &str,
    mirror: &Mirror,
    cursor: &mut Cursor,
    todo: &sled::Tree,
    seen: Option<&sled::Tree>,
    tally: &mut Tally,
) -> Result<(), SyncError> {
    ctx.update(|p| p.phase = "fetch".into());
    let from = |after: i64| after.saturating_add(1).max(0).to_be_bytes();
    let done = run_field(cursor, |r| r.position).unwrap_or(0);
    let remaining = todo.range(from(done)..).count() as u64;
    ctx.update(|p| p.total = Some(p.total.unwrap_or(0) + remaining));
    let step = (ctx.cfg.sync.m1_batch_size as usize)
        .saturating_mul(ctx.cfg.sync.shop_concurrency)
        .max(1);
    loop {
        ctx.check()?;
        let after = run_field(cursor, |r| r.position).unwrap_or(0);
        let mut chunk = Vec::with_capacity(step);
        for kv in todo.range(from(after)..).take(step) {
            let (k, v) = kv.map_err(StoreError::from)?;
            let id = <[u8; 8]>::try_from(k.as_ref())
                .map(i64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("a listed id is not 8 bytes".into()))?;
            chunk.push((id, String::from_utf8_lossy(&v).into_owned()));
        }
        let Some(last) = chunk.last().map(|c| c.0) else {
            return Ok(());
        };
        let (items, gone) = fetch(ctx, client, code, &chunk, tally).await?;
        if let Some(seen) = seen {
            // Confirmed gone: a complete listing without them (a SKU also
            // listed on another id stays).
            for (id, sku) in &gone {
                let _ = seen
                    .compare_and_swap(sku.as_bytes(), Some(&id.to_be_bytes()[..]), None::<&[u8]>)
                    .map_err(StoreError::from)?;
            }
        }
        let max_seen = newest(
            &items,
            run_field(cursor, |r| r.max_seen.clone())
                .flatten()
                .as_deref(),
        );
        set(cursor, |r| {
            r.position = last;
            r.max_seen = max_seen;
        });
        let fetched = items.len() as u64;
        let a = mirror.apply_blocking(items, Vec::new(), cursor).await?;
        ctx.flush().await?;
        ctx.applied(fetched, a);
    }
}

/// One product's answer: the item, or why it is not one.
enum Got {
    Item(Item),
    Fault(Fault),
    Wrong(String),
}

/// A product asked for: its id, its listed SKU and the answer.
type Answer = (i64, String, Got);

/// Reads a `catalog_product.info` answer for product `id`.
fn judge(id: i64, answer: Result<Value, Fault>) -> Got {
    let v = match answer {
        Ok(v) => v,
        Err(f) => return Got::Fault(f),
    };
    match v.get("product_id").and_then(Value::as_i64) {
        Some(got) if got == id => {}
        Some(got) => {
            return Got::Wrong(format!(
                "catalog_product.info for product {id} answered product {got}"
            ));
        }
        None => {
            return Got::Wrong(format!(
                "catalog_product.info for product {id} answered no numeric product_id"
            ));
        }
    }
    match to_item(&v) {
        Some(item) => Got::Item(item),
        None => Got::Wrong(format!(
            "catalog_product.info for product {id} answered no sku"
        )),
    }
}

/// One `multiCall` of `calls` (the details of `ids`), each result judged
/// as soon as it is decoded: the answer's tree is never held whole.
async fn details(
    client: &M1Client,
    calls: &[(String, Vec<Value>)],
    ids: &[i64],
) -> Result<Vec<Got>, ShopError> {
    let mut got = Vec::with_capacity(ids.len());
    client
        .multi_call_each(calls.to_vec(), &mut |a| {
            let id = ids.get(got.len()).copied().unwrap_or_default();
            got.push(judge(id, a));
        })
        .await?;
    Ok(got)
}

fn info_call(id: i64, code: &str) -> (String, Vec<Value>) {
    (
        "catalog_product.info".to_string(),
        vec![
            Value::String(id.to_string()),
            Value::String(code.to_string()),
        ],
    )
}

/// Fetches details of `chunk` (id, listed SKU) in `multiCall` batches.
/// Returns the items and the (id, SKU)s confirmed gone (see the module docs);
/// what could not be read or trusted is counted in `tally`.
async fn fetch(
    ctx: &mut RunCtx<'_>,
    client: &M1Client,
    code: &str,
    chunk: &[(i64, String)],
    tally: &mut Tally,
) -> Result<(Vec<Item>, Vec<(i64, String)>), SyncError> {
    let batch = ctx.cfg.sync.m1_batch_size as usize;
    let concurrency = ctx.cfg.sync.shop_concurrency;
    let ctx_ref: &RunCtx<'_> = ctx;
    let batches: Vec<Vec<(i64, String)>> = chunk.chunks(batch.max(1)).map(<[_]>::to_vec).collect();
    let results: Vec<Result<Vec<Answer>, SyncError>> = futures_util::stream::iter(batches)
        .map(|b: Vec<(i64, String)>| async move {
            let calls: Vec<(String, Vec<Value>)> =
                b.iter().map(|(id, _)| info_call(*id, code)).collect();
            let ids: Vec<i64> = b.iter().map(|(id, _)| *id).collect();
            let got = ctx_ref
                .request("product details", || details(client, &calls, &ids))
                .await?;
            Ok(b.into_iter()
                .zip(got)
                .map(|((id, sku), g)| (id, sku, g))
                .collect())
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    let mut items = Vec::with_capacity(chunk.len());
    let mut again = Vec::new();
    for r in results {
        for (id, sku, got) in r? {
            match got {
                Got::Item(i) => items.push(i),
                _ => again.push((id, sku)),
            }
        }
    }
    // Asked again, each on its own: a batch's transient fault or a
    // shuffled answer should not cost the product.
    let retried: Vec<Result<Answer, SyncError>> = futures_util::stream::iter(again)
        .map(|(id, sku)| async move {
            let call = vec![info_call(id, code)];
            let one = std::slice::from_ref(&id);
            let mut got = ctx_ref
                .request("product details", || details(client, &call, one))
                .await?;
            let got = got.pop().unwrap_or_else(|| {
                Got::Wrong(format!(
                    "catalog_product.info for product {id} answered nothing"
                ))
            });
            Ok((id, sku, got))
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    let mut not_exists = Vec::new();
    let mut unreadable = Vec::new();
    for r in retried {
        let (id, sku, got) = r?;
        match got {
            Got::Item(i) => items.push(i),
            Got::Fault(f) if f.code == FAULT_NOT_EXISTS => not_exists.push((id, sku)),
            Got::Fault(f) => {
                let kind = if matches!(f.code, 0 | 1) {
                    FailureKind::ServerError
                } else {
                    FailureKind::Protocol
                };
                unreadable.push((
                    kind,
                    format!("product {id}: fault {}: {}", f.code, short(&f.message)),
                ));
            }
            Got::Wrong(why) => unreadable.push((FailureKind::Protocol, why)),
        }
    }
    let mut gone: Vec<(i64, String)> = Vec::new();
    if !not_exists.is_empty() {
        // Believed only if a new listing of these ids leaves them out.
        let ids: Vec<Value> = not_exists
            .iter()
            .map(|(id, _)| Value::String(id.to_string()))
            .collect();
        let filters = id_filter(vec![("in".into(), Value::Array(ids))]);
        let list = ctx_ref
            .request("product list", || {
                client.list_products(filters.clone(), Some(code))
            })
            .await?;
        let still: std::collections::HashSet<i64> = list
            .iter()
            .filter_map(|p| p.get("product_id").and_then(Value::as_i64))
            .collect();
        for (id, sku) in not_exists {
            if still.contains(&id) {
                tally.inconsistent += 1;
                tally
                    .inconsistent_example
                    .get_or_insert_with(|| format!("product {id}, SKU {}", short(&sku)));
            } else {
                gone.push((id, sku));
            }
        }
    }
    if !unreadable.is_empty() {
        let n = unreadable.len() as u64;
        tally.unreadable += n;
        if tally.unreadable_example.is_none() {
            tally.unreadable_kind = Some(unreadable[0].0);
            tally.unreadable_example = Some(unreadable[0].1.clone());
        }
        let last = unreadable.last().map(|u| u.1.clone());
        ctx.update(|p| p.item_errors += n);
        if let Some(e) = &last {
            tracing::warn!(shop = %ctx.rec.name, errors = n, "some products could not be read: {e}");
        }
        ctx.last_item_error = last;
    }
    Ok((items, gone))
}

/// A shop's text, cut for messages.
fn short(s: &str) -> String {
    const MAX: usize = 120;
    if s.chars().count() <= MAX {
        return s.to_string();
    }
    let mut t: String = s.chars().take(MAX).collect();
    t.push('…');
    t
}

fn to_item(v: &Value) -> Option<Item> {
    let sku = v.get("sku")?.as_str()?.to_string();
    let id = v.get("product_id")?.as_i64()?;
    let updated_at = v
        .get("updated_at")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let json = serde_json::to_vec(&v.to_json()).ok()?;
    Some(Item {
        sku,
        id,
        updated_at,
        json,
    })
}

fn newest<'a>(items: &'a [Item], prev: Option<&'a str>) -> Option<String> {
    items
        .iter()
        .map(|i| i.updated_at.as_str())
        .chain(prev)
        .max()
        .map(str::to_string)
}

async fn changed_since(
    ctx: &mut RunCtx<'_>,
    client: &M1Client,
    code: &str,
    mirror: &Mirror,
    cursor: &mut Cursor,
    tally: &mut Tally,
) -> Result<(), SyncError> {
    ctx.update(|p| p.phase = "changed".into());
    let Some(since) = run_field(cursor, |r| r.since.clone()).flatten() else {
        return Ok(());
    };
    let filters = Value::Struct(vec![(
        "updated_at".into(),
        Value::Struct(vec![("gteq".into(), Value::String(since))]),
    )]);
    let list = list_entries(
        ctx,
        client,
        code,
        "changed products",
        &filters,
        1,
        i64::MAX,
        usize::MAX,
    )
    .await?;
    let done_up_to = run_field(cursor, |r| r.position).unwrap_or(0);
    let entries: Vec<(i64, String)> = listed(list, 1, i64::MAX)?
        .into_iter()
        .filter(|(id, _)| *id > done_up_to)
        .collect();
    ctx.update(|p| p.total = Some(p.total.unwrap_or(0) + entries.len() as u64));
    let step = (ctx.cfg.sync.m1_batch_size as usize)
        .saturating_mul(ctx.cfg.sync.shop_concurrency)
        .max(1);
    for chunk in entries.chunks(step) {
        ctx.check()?;
        // Products gone since the listing stay: only a full reconcile's
        // complete listing removes products.
        let (items, _gone) = fetch(ctx, client, code, chunk, tally).await?;
        let max_seen = newest(
            &items,
            run_field(cursor, |r| r.max_seen.clone())
                .flatten()
                .as_deref(),
        );
        let last = chunk.last().map_or(done_up_to, |c| c.0);
        set(cursor, |r| {
            r.position = last;
            r.max_seen = max_seen;
        });
        let fetched = items.len() as u64;
        let a = mirror.apply_blocking(items, Vec::new(), cursor).await?;
        ctx.flush().await?;
        ctx.applied(fetched, a);
    }
    Ok(())
}
