//! Magento 1 sync of one store view.
//!
//! `catalog_product.list` has no paging, so the catalog is walked in
//! `product_id` ranges (widening past empty ranges, so the walk ends a few
//! requests after the last id); details come from `multiCall` batches of
//! `catalog_product.info`, `sync.shop_concurrency` batches in flight. An
//! incremental run lists only products with `updated_at` ≥ the checkpoint
//! second (re-read, upserts are idempotent). A fault on one product is
//! recorded and does not sink the run; the client re-logs in on fault 5.

use super::{RunCtx, SyncError, begin, delete_unseen};
use crate::magento::m1::M1Client;
use crate::magento::xmlrpc::Value;
use crate::mirror::{Cursor, Item, Mirror};
use crate::store::StoreError;
use futures_util::StreamExt;

/// Empty id ranges in a row after which the walk ends. The range doubles
/// each time, so 24 cover more than 2^24 × `m1_id_range` ids.
const MAX_EMPTY_RANGES: u32 = 24;

fn set(c: &mut Cursor, f: impl FnOnce(&mut crate::mirror::RunCursor)) {
    if let Some(r) = c.run.as_mut() {
        f(r);
    }
}

fn run_field<T>(c: &Cursor, f: impl FnOnce(&crate::mirror::RunCursor) -> T) -> Option<T> {
    c.run.as_ref().map(f)
}

pub async fn sync_store(
    ctx: &mut RunCtx<'_>,
    client: &M1Client,
    code: &str,
) -> Result<(), SyncError> {
    let mirror = Mirror::open(&ctx.d.store, &ctx.rec.name, code)?;
    let mut cursor = mirror.cursor()?;
    let walk = ctx.full || cursor.updated_at.is_none();
    if !begin(ctx, &mut cursor, if walk { "walk" } else { "changed" }) {
        if !walk {
            let since = cursor.updated_at.clone();
            set(&mut cursor, |r| r.since = since);
        }
        let clock = shop_clock(ctx, client, code).await?;
        set(&mut cursor, |r| r.shop_clock = clock);
        mirror.save_cursor(&cursor)?;
    }
    let seen_name = ctx.scratch(code, "seen");
    let phase = run_field(&cursor, |r| r.phase.clone()).unwrap_or_default();
    if phase == "walk" {
        let seen = if ctx.full {
            Some(ctx.d.store.scratch(&seen_name)?)
        } else {
            None
        };
        walk_ranges(ctx, client, code, &mirror, &mut cursor, seen.as_ref()).await?;
        if let Some(seen) = &seen {
            set(&mut cursor, |r| r.phase = "delete".into());
            mirror.save_cursor(&cursor)?;
            delete_unseen(ctx, &mirror, &mut cursor, seen).await?;
        }
    } else if phase == "changed" {
        changed_since(ctx, client, code, &mirror, &mut cursor).await?;
    } else if phase == "delete" {
        let seen = ctx.d.store.scratch(&seen_name)?;
        delete_unseen(ctx, &mirror, &mut cursor, &seen).await?;
    }
    ctx.d.store.drop_scratch(&seen_name)?;
    // The newest `updated_at` stored, but never past the shop's clock at
    // the start: the next run re-reads what was saved while this one read.
    let max_seen = run_field(&cursor, |r| r.max_seen.clone()).flatten();
    let reached = match (
        max_seen,
        run_field(&cursor, |r| r.shop_clock.clone()).flatten(),
    ) {
        (Some(seen), Some(clock)) => Some(seen.min(clock)),
        (seen, _) => seen,
    };
    if reached > cursor.updated_at {
        cursor.updated_at = reached;
    }
    cursor.run = None;
    mirror.save_cursor(&cursor)?;
    ctx.flush().await
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

/// Product ids of a `catalog_product.list` answer, ascending.
fn ids_of(list: &[Value]) -> Vec<i64> {
    let mut ids: Vec<i64> = list
        .iter()
        .filter_map(|p| p.get("product_id").and_then(Value::as_i64))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// One product's `catalog_product.info` answer, by id.
type Answer = (i64, Result<Value, crate::magento::xmlrpc::Fault>);

/// Fetches details of `ids` in `multiCall` batches; per-item faults are
/// counted, and "Product not exists" (101) is reported as gone.
async fn fetch(
    ctx: &mut RunCtx<'_>,
    client: &M1Client,
    code: &str,
    ids: &[i64],
) -> Result<(Vec<Item>, Vec<i64>), SyncError> {
    let batch = ctx.cfg.sync.m1_batch_size as usize;
    let concurrency = ctx.cfg.sync.shop_concurrency;
    let ctx_ref: &RunCtx<'_> = ctx;
    let results: Vec<Result<Vec<Answer>, SyncError>> =
        futures_util::stream::iter(ids.chunks(batch).map(<[i64]>::to_vec).collect::<Vec<_>>())
            .map(|chunk: Vec<i64>| {
                let calls: Vec<(String, Vec<Value>)> = chunk
                    .iter()
                    .map(|id| {
                        (
                            "catalog_product.info".to_string(),
                            vec![
                                Value::String(id.to_string()),
                                Value::String(code.to_string()),
                            ],
                        )
                    })
                    .collect();
                async move {
                    let answers = ctx_ref
                        .request("product details", || client.multi_call(calls.clone()))
                        .await?;
                    Ok(chunk.into_iter().zip(answers).collect())
                }
            })
            .buffered(concurrency)
            .collect()
            .await;
    let mut items = Vec::with_capacity(ids.len());
    let mut gone = Vec::new();
    let mut last_error = None;
    let mut errors = 0;
    for r in results {
        for (id, answer) in r? {
            match answer {
                Ok(v) => match to_item(&v) {
                    Some(item) => items.push(item),
                    None => {
                        errors += 1;
                        last_error = Some(format!("product {id}: answer without sku/product_id"));
                    }
                },
                Err(f) if f.code == 101 => gone.push(id),
                Err(f) => {
                    errors += 1;
                    last_error = Some(format!("product {id}: fault {}: {}", f.code, f.message));
                }
            }
        }
    }
    if errors > 0 {
        ctx.update(|p| p.item_errors += errors);
        if let Some(e) = &last_error {
            tracing::warn!(shop = %ctx.rec.name, errors, "some products could not be read: {e}");
        }
        ctx.last_item_error = last_error;
    }
    Ok((items, gone))
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

/// SKUs of mirrored products with these ids (for deletions by id).
fn skus_of(mirror: &Mirror, ids: &[i64]) -> Result<Vec<String>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for kv in mirror.index().iter() {
        let (k, v) = kv?;
        if crate::mirror::decode(&v).is_some_and(|s| ids.contains(&s.id)) {
            out.push(String::from_utf8_lossy(&k).into_owned());
        }
    }
    Ok(out)
}

fn newest<'a>(items: &'a [Item], prev: Option<&'a str>) -> Option<String> {
    items
        .iter()
        .map(|i| i.updated_at.as_str())
        .chain(prev)
        .max()
        .map(str::to_string)
}

async fn walk_ranges(
    ctx: &mut RunCtx<'_>,
    client: &M1Client,
    code: &str,
    mirror: &Mirror,
    cursor: &mut Cursor,
    seen: Option<&sled::Tree>,
) -> Result<(), SyncError> {
    ctx.update(|p| p.phase = "walk".into());
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
        let filters = Value::Struct(vec![(
            "product_id".into(),
            Value::Struct(vec![
                ("from".into(), Value::Int(start)),
                ("to".into(), Value::Int(end)),
            ]),
        )]);
        let list = ctx
            .request("product list", || {
                client.list_products(filters.clone(), Some(code))
            })
            .await?;
        let ids = ids_of(&list);
        let (items, gone) = fetch(ctx, client, code, &ids).await?;
        if let Some(seen) = seen {
            for i in &items {
                seen.insert(i.sku.as_bytes(), &[])
                    .map_err(StoreError::from)?;
            }
        }
        let deletes = skus_of(mirror, &gone)?;
        let max_seen = newest(
            &items,
            run_field(cursor, |r| r.max_seen.clone())
                .flatten()
                .as_deref(),
        );
        set(cursor, |r| {
            r.position = end + 1;
            r.empty_ranges = if ids.is_empty() { empty + 1 } else { 0 };
            r.max_seen = max_seen;
        });
        let a = mirror.apply(&items, &deletes, cursor)?;
        ctx.flush().await?;
        if !ids.is_empty() {
            ctx.applied(items.len() as u64, a);
        } else {
            ctx.update(|p| p.pages += 1);
        }
    }
}

async fn changed_since(
    ctx: &mut RunCtx<'_>,
    client: &M1Client,
    code: &str,
    mirror: &Mirror,
    cursor: &mut Cursor,
) -> Result<(), SyncError> {
    ctx.update(|p| p.phase = "changed".into());
    let Some(since) = run_field(cursor, |r| r.since.clone()).flatten() else {
        return Ok(());
    };
    let filters = Value::Struct(vec![(
        "updated_at".into(),
        Value::Struct(vec![("gteq".into(), Value::String(since))]),
    )]);
    let list = ctx
        .request("changed products", || {
            client.list_products(filters.clone(), Some(code))
        })
        .await?;
    let done_up_to = run_field(cursor, |r| r.position).unwrap_or(0);
    let ids: Vec<i64> = ids_of(&list)
        .into_iter()
        .filter(|id| *id > done_up_to)
        .collect();
    ctx.update(|p| p.total = Some(ids.len() as u64));
    let step = (ctx.cfg.sync.m1_batch_size as usize)
        .saturating_mul(ctx.cfg.sync.shop_concurrency)
        .max(1);
    for chunk in ids.chunks(step) {
        ctx.check()?;
        let (items, gone) = fetch(ctx, client, code, chunk).await?;
        let deletes = skus_of(mirror, &gone)?;
        let max_seen = newest(
            &items,
            run_field(cursor, |r| r.max_seen.clone())
                .flatten()
                .as_deref(),
        );
        let last = chunk.last().copied().unwrap_or(done_up_to);
        set(cursor, |r| {
            r.position = last;
            r.max_seen = max_seen;
        });
        let a = mirror.apply(&items, &deletes, cursor)?;
        ctx.flush().await?;
        ctx.applied(items.len() as u64, a);
    }
    Ok(())
}
