//! Magento 2 sync of one store view.
//!
//! Catch-up uses keyset paging: always page 1 of "`updated_at` ≥ T and
//! (`updated_at` > T or `entity_id` > I)", sorted by (`updated_at`,
//! `entity_id`) ascending, where (T, I) is the checkpoint. Unlike
//! `currentPage` offsets this cannot skip products that change while the
//! run pages, re-reads nothing but the boundary second, and ignores the 2.3
//! "last page again" quirk by construction. A full reconcile then lists
//! every SKU cheaply (by `entity_id`), refetches the ones that differ from
//! the mirror, and deletes the ones the shop no longer has.

use super::{RunCtx, SyncError, begin, delete_unseen};
use crate::magento::m2::{M2Client, ProductQuery, RawProduct};
use crate::magento::{FailureKind, ShopError};
use crate::mirror::{Cursor, Item, Mirror};
use crate::store::StoreError;

fn to_item(p: &RawProduct) -> Item {
    Item {
        sku: p.sku.clone(),
        id: p.id,
        updated_at: p.updated_at.clone(),
        json: p.raw.get().as_bytes().to_vec(),
    }
}

/// (updated_at, id) strictly after the checkpoint.
fn after(p: &RawProduct, c: &Cursor) -> bool {
    match &c.updated_at {
        None => true,
        Some(t) => (p.updated_at.as_str(), p.id) > (t.as_str(), c.last_id),
    }
}

pub async fn sync_store(
    ctx: &mut RunCtx<'_>,
    client: &M2Client,
    code: &str,
) -> Result<(), SyncError> {
    let mirror = Mirror::open(&ctx.d.store, &ctx.rec.name, code)?;
    let mut cursor = mirror.cursor()?;
    if !begin(ctx, &mut cursor, "catch_up") {
        // A new run re-reads the checkpoint's whole second: products saved
        // in that second after the last run may have smaller ids than
        // `last_id` (MAGENTO.md: re-read the boundary second). A resumed
        // run keeps its exact position.
        cursor.last_id = 0;
        mirror.save_cursor(&cursor)?;
    }
    let seen_name = ctx.scratch(code, "seen");
    let refetch_name = ctx.scratch(code, "refetch");
    let phase = |c: &Cursor| c.run.as_ref().map(|r| r.phase.clone()).unwrap_or_default();

    if phase(&cursor) == "catch_up" {
        catch_up(ctx, client, code, &mirror, &mut cursor).await?;
        if ctx.full {
            ctx.d.store.drop_scratch(&seen_name)?;
            ctx.d.store.drop_scratch(&refetch_name)?;
            set_phase(&mut cursor, "list", 0);
            mirror.save_cursor(&cursor)?;
        }
    }
    if ctx.full {
        let seen = ctx.d.store.scratch(&seen_name)?;
        let refetch = ctx.d.store.scratch(&refetch_name)?;
        if phase(&cursor) == "list" {
            list_all(ctx, client, code, &mirror, &mut cursor, &seen, &refetch).await?;
            set_phase(&mut cursor, "refetch", 0);
            mirror.save_cursor(&cursor)?;
        }
        if phase(&cursor) == "refetch" {
            refetch_changed(ctx, client, code, &mirror, &mut cursor, &refetch).await?;
            set_phase(&mut cursor, "delete", 0);
            mirror.save_cursor(&cursor)?;
        }
        if phase(&cursor) == "delete" {
            delete_unseen(ctx, &mirror, &mut cursor, &seen).await?;
        }
        ctx.d.store.drop_scratch(&seen_name)?;
        ctx.d.store.drop_scratch(&refetch_name)?;
    }
    cursor.run = None;
    mirror.save_cursor(&cursor)?;
    ctx.flush().await
}

fn set_phase(c: &mut Cursor, phase: &str, position: i64) {
    if let Some(r) = c.run.as_mut() {
        r.phase = phase.into();
        r.position = position;
    }
}

async fn catch_up(
    ctx: &RunCtx<'_>,
    client: &M2Client,
    code: &str,
    mirror: &Mirror,
    cursor: &mut Cursor,
) -> Result<(), SyncError> {
    ctx.update(|p| p.phase = "catch_up".into());
    let page_size = ctx.cfg.sync.page_size;
    let query = |c: &Cursor| ProductQuery {
        after: c.updated_at.clone().map(|t| (t, c.last_id)),
        page_size,
        ..ProductQuery::default()
    };
    ctx.check()?;
    let q = query(cursor);
    let mut page = ctx
        .request("product page", || client.list_products(code, &q))
        .await?;
    ctx.update(|p| p.total = Some(p.total.unwrap_or(0) + page.total_count));
    loop {
        let fresh: Vec<&RawProduct> = page.items.iter().filter(|p| after(p, cursor)).collect();
        if fresh.is_empty() {
            if page.items.is_empty() {
                return Ok(());
            }
            // Items, but none past the checkpoint: the shop ignores the
            // filter. Stop instead of looping.
            return Err(SyncError::Shop(ShopError::new(
                FailureKind::Protocol,
                "the shop answered products before the sync checkpoint: it ignores the updated_at/entity_id filter",
            )));
        }
        let items: Vec<Item> = fresh.iter().map(|p| to_item(p)).collect();
        // The checkpoint moves to the largest key stored, never backwards.
        let mut next = cursor.clone();
        if let Some(last) = fresh
            .iter()
            .max_by(|a, b| (a.updated_at.as_str(), a.id).cmp(&(b.updated_at.as_str(), b.id)))
        {
            next.updated_at = Some(last.updated_at.clone());
            next.last_id = last.id;
        }
        let n = page.items.len() as u64;
        let last_page = n >= page.total_count || n < u64::from(page_size);
        let fetched = items.len() as u64;
        let stop = ctx.check();
        let q = query(&next);
        // The page and its checkpoint are stored and flushed together; the
        // next page is fetched meanwhile (it depends only on the new
        // checkpoint) and is stored only after this flush.
        let store = async {
            let a = mirror.apply_blocking(items, Vec::new(), &mut next).await?;
            ctx.flush().await?;
            Ok::<_, SyncError>(a)
        };
        if last_page || stop.is_err() {
            let a = store.await?;
            *cursor = next;
            ctx.applied(fetched, a);
            return stop;
        }
        let fetch = ctx.request("product page", || client.list_products(code, &q));
        let (stored, next_page) = tokio::join!(store, fetch);
        let a = stored?;
        *cursor = next;
        ctx.applied(fetched, a);
        page = next_page?;
    }
}

async fn list_all(
    ctx: &RunCtx<'_>,
    client: &M2Client,
    code: &str,
    mirror: &Mirror,
    cursor: &mut Cursor,
    seen: &sled::Tree,
    refetch: &sled::Tree,
) -> Result<(), SyncError> {
    ctx.update(|p| p.phase = "list".into());
    let mut first = true;
    loop {
        ctx.check()?;
        let position = cursor.run.as_ref().map_or(0, |r| r.position);
        let q = ProductQuery {
            id_after: Some(position),
            fields: Some("items[id,sku,updated_at],total_count".into()),
            page_size: ctx.cfg.sync.page_size,
            ..ProductQuery::default()
        };
        let page = ctx
            .request("SKU listing", || client.list_products(code, &q))
            .await?;
        if first {
            ctx.update(|p| p.total = Some(p.total.unwrap_or(0) + page.total_count));
            first = false;
        }
        let fresh: Vec<&RawProduct> = page.items.iter().filter(|p| p.id > position).collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let mut max_id = position;
        for p in &fresh {
            seen.insert(p.sku.as_bytes(), &p.id.to_be_bytes())
                .map_err(StoreError::from)?;
            let stale = match mirror
                .index()
                .get(p.sku.as_bytes())
                .map_err(StoreError::from)?
            {
                None => true,
                Some(v) => crate::mirror::decode(&v).is_none_or(|s| s.updated_at != p.updated_at),
            };
            if stale {
                refetch
                    .insert(p.id.to_be_bytes(), p.sku.as_bytes())
                    .map_err(StoreError::from)?;
            }
            max_id = max_id.max(p.id);
        }
        set_phase(cursor, "list", max_id);
        mirror.save_cursor(cursor)?;
        ctx.flush().await?;
        ctx.update(|p| {
            p.done += fresh.len() as u64;
            p.pages += 1;
        });
        let n = page.items.len() as u64;
        if n >= page.total_count || n < u64::from(ctx.cfg.sync.page_size) {
            return Ok(());
        }
    }
}

async fn refetch_changed(
    ctx: &RunCtx<'_>,
    client: &M2Client,
    code: &str,
    mirror: &Mirror,
    cursor: &mut Cursor,
    refetch: &sled::Tree,
) -> Result<(), SyncError> {
    ctx.update(|p| p.phase = "refetch".into());
    // `in` lists travel in the URL: keep them short.
    let batch = ctx.cfg.sync.page_size.min(100) as usize;
    loop {
        ctx.check()?;
        let mut ids = Vec::with_capacity(batch);
        for k in refetch.iter().keys().take(batch) {
            let k = k.map_err(StoreError::from)?;
            if let Ok(b) = <[u8; 8]>::try_from(k.as_ref()) {
                ids.push(i64::from_be_bytes(b));
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let q = ProductQuery {
            ids: ids.clone(),
            page_size: batch as u32,
            ..ProductQuery::default()
        };
        let page = ctx
            .request("product refetch", || client.list_products(code, &q))
            .await?;
        let items: Vec<Item> = page
            .items
            .iter()
            .filter(|p| ids.contains(&p.id))
            .map(to_item)
            .collect();
        let fetched = items.len() as u64;
        let a = mirror.apply_blocking(items, Vec::new(), cursor).await?;
        for id in &ids {
            refetch.remove(id.to_be_bytes()).map_err(StoreError::from)?;
        }
        ctx.flush().await?;
        ctx.applied(fetched, a);
    }
}
