//! Magento 2 sync of one store view.
//!
//! Two walks:
//! - **The id walk** (the first sync and every full reconcile) reads the
//!   whole catalog, full products, by `entity_id` ranges: each request is
//!   "`entity_id` from A to B, sorted by `entity_id`", a primary-key range
//!   scan on the shop's MySQL. Up to `sync.shop_concurrency` ranges are read
//!   at once; a worker that runs out of ranges splits the largest one still
//!   being read (work stealing), so a skewed id space keeps every worker
//!   busy. Each page is written in one transaction with the new position of
//!   its range (all ranges live in the store view's run cursor), so a crash
//!   resumes every range where it stopped. Products are upserted by content
//!   hash (unchanged writes nothing), so a change that left `updated_at`
//!   alone is found too. A full reconcile then deletes what the walk did not
//!   see, but only after a complete and consistent listing.
//! - **The catch-up** (every run, after the walk if there was one) uses
//!   keyset paging: always page 1 of "`updated_at` ≥ T and (`updated_at` >
//!   T or `entity_id` > I)", sorted by (`updated_at`, `entity_id`), where
//!   (T, I) is the checkpoint. This cannot skip products that change while
//!   the run pages and re-reads nothing but the boundary second.
//!
//! A shop's answer is untrusted: every page is checked against what it
//! claims (`total_count`, ids inside the asked range, ascending); a lie
//! makes the run `partial` (or `failed`) and the listing counts as
//! incomplete, so nothing is deleted. The checkpoint never moves past the
//! shop's clock (its `Date` header plus [`CLOCK_SKEW`]) nor to an
//! `updated_at` that does not read as a time. A run stops as `protocol` once
//! the shop has sent more products than it announced (or the mirror holds)
//! plus a margin: an endless listing cannot fill the disk.

use super::{RunCtx, SyncError, begin, delete_unseen};
use crate::magento::m2::{M2Client, ProductPage, ProductQuery, RawProduct};
use crate::magento::{FailureKind, ShopError};
use crate::mirror::{Cursor, IdRange, Item, Mirror};
use crate::store::StoreError;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// How far past the shop's clock (its `Date` header) an `updated_at` may be
/// before it is reported as bogus: the clocks of the shop's web and
/// database hosts may differ a little. The checkpoint itself never passes
/// the clock; a product ahead of it is stored and re-read by the next run.
pub const CLOCK_SKEW: chrono::Duration = chrono::Duration::seconds(60);

/// Magento's `entity_id` is an unsigned 32-bit column: a `total_count`
/// above this cannot be true.
const MAX_PLAUSIBLE_TOTAL: u64 = u32::MAX as u64;

/// `YYYY-MM-DD HH:MM:SS`, Magento's `updated_at` form.
const TS: &str = "%Y-%m-%d %H:%M:%S";

/// Shop text as it may appear in a message: control and bidi characters
/// escaped, at most 80 characters.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_debug).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

fn to_item(p: &RawProduct) -> Item {
    Item {
        sku: p.sku.clone(),
        id: p.id,
        updated_at: p.updated_at.clone(),
        json: p.raw.get().as_bytes().to_vec(),
    }
}

/// The time of an `updated_at`, if it reads as one.
fn parse_ts(s: &str) -> Option<chrono::NaiveDateTime> {
    chrono::NaiveDateTime::parse_from_str(s, TS).ok()
}

/// The shop's clock now: its newest `Date` header, or this host's clock
/// when its answers carry none.
fn shop_now(client: &M2Client) -> chrono::DateTime<chrono::Utc> {
    client.shop_clock().unwrap_or_else(chrono::Utc::now)
}

/// The most products a run may receive before it stops: what the shop
/// announced or the mirror holds, whichever is more, plus a margin for
/// products created while the run goes on.
fn growth_limit(announced: u64, mirrored: u64) -> u64 {
    let base = announced.max(mirrored);
    base.saturating_add((base / 10).max(1_000))
}

fn endless(received: u64, limit: u64, announced: u64, mirrored: u64) -> SyncError {
    SyncError::Shop(ShopError::new(
        FailureKind::Protocol,
        format!(
            "the shop has sent {received} products in this run, more than the {limit} it may (it announced {announced}, the mirror holds {mirrored}): its listing does not end; stopped, what was stored is kept"
        ),
    ))
}

fn implausible(total: u64) -> SyncError {
    SyncError::Shop(ShopError::new(
        FailureKind::Protocol,
        format!(
            "the shop announced {total} products, more than Magento's entity ids can number: its listing is broken (a module or proxy rewriting the answer?)"
        ),
    ))
}

pub async fn sync_store(
    ctx: &mut RunCtx<'_>,
    client: &M2Client,
    code: &str,
) -> Result<(), SyncError> {
    let mirror = Mirror::open(&ctx.d.store, &ctx.rec.name, code)?;
    let mut cursor = mirror.cursor()?;
    let walk = ctx.full || cursor.updated_at.is_none();
    let seen_name = ctx.scratch(code, "seen");
    if !begin(ctx, &mut cursor, if walk { "walk" } else { "catch_up" }) {
        ctx.d.store.drop_scratch(&seen_name)?;
        if walk {
            plan_walk(ctx, client, code, &mut cursor).await?;
        } else {
            // A new run re-reads the checkpoint's whole second: products
            // saved in that second after the last run may have smaller ids
            // than `last_id`. A resumed run keeps its exact position.
            cursor.last_id = 0;
        }
        mirror.save_cursor(&cursor)?;
    }
    let phase = |c: &Cursor| c.run.as_ref().map(|r| r.phase.clone()).unwrap_or_default();
    // The re-read boundary of the catch-up: a product at or before it whose
    // content did not change was read before and is not counted again.
    let mut reread_until = cursor.updated_at.clone();

    if phase(&cursor) == "walk" {
        let seen = ctx.d.store.scratch(&seen_name)?;
        walk_ranges(ctx, client, code, &mirror, &mut cursor, &seen).await?;
        let run = cursor.run.clone().unwrap_or_default();
        if let Some(why) = &run.inconsistent {
            ctx.inconsistent(format!(
                "{why}; the listing is incomplete, so nothing was deleted"
            ));
        } else if run.announced > 0
            && run.listed < run.announced.saturating_sub(slack(run.announced))
        {
            let why = format!(
                "the shop listed {} of the {} products it announced",
                run.listed, run.announced
            );
            ctx.inconsistent(format!(
                "{why}; the listing is incomplete, so nothing was deleted"
            ));
            set_run(&mut cursor, |r| r.inconsistent = Some(why));
        }
        let consistent = cursor
            .run
            .as_ref()
            .is_some_and(|r| r.inconsistent.is_none());
        // Everything updated before the walk started is stored now (when the
        // listing was complete): the checkpoint goes back to that time, a
        // little earlier for the clocks of the shop's hosts. This also
        // repairs a checkpoint a bad `updated_at` once froze in the future.
        let clock = run.shop_clock.clone();
        if consistent {
            cursor.updated_at = clock.clone();
            cursor.last_id = 0;
        } else if let (Some(old), Some(c)) = (&cursor.updated_at, &clock) {
            if c < old {
                cursor.updated_at = clock.clone();
                cursor.last_id = 0;
            }
        }
        reread_until = clock;
        let next = if ctx.full && consistent {
            "delete"
        } else if cursor.updated_at.is_some() {
            "catch_up"
        } else {
            "done"
        };
        set_run(&mut cursor, |r| {
            r.phase = next.into();
            r.ranges.clear();
        });
        mirror.save_cursor(&cursor)?;
        ctx.flush().await?;
    }
    if phase(&cursor) == "delete" {
        let seen = ctx.d.store.scratch(&seen_name)?;
        delete_unseen(ctx, &mirror, &mut cursor, &seen).await?;
        set_run(&mut cursor, |r| r.phase = "catch_up".into());
        mirror.save_cursor(&cursor)?;
    }
    if phase(&cursor) == "catch_up" {
        if reread_until.is_none() {
            reread_until = cursor.run.as_ref().and_then(|r| r.shop_clock.clone());
        }
        catch_up(ctx, client, code, &mirror, &mut cursor, reread_until).await?;
    }
    ctx.d.store.drop_scratch(&seen_name)?;
    cursor.run = None;
    mirror.save_cursor(&cursor)?;
    ctx.flush().await
}

/// Listed products the walk may fall short of what the shop announced
/// (products deleted while it walks) before the listing counts as
/// incomplete.
fn slack(announced: u64) -> u64 {
    (announced / 100).max(10)
}

fn set_run(c: &mut Cursor, f: impl FnOnce(&mut crate::mirror::RunCursor)) {
    if let Some(r) = c.run.as_mut() {
        f(r);
    }
}

/// Starts an id walk: asks for the largest id (and the catalog's size),
/// notes the shop's clock, and splits `[0, largest id]` into one range per
/// worker. Id 0 is included: a broken shop may have it, and a product
/// missing from every walk would be deleted by every full reconcile.
async fn plan_walk(
    ctx: &RunCtx<'_>,
    client: &M2Client,
    code: &str,
    cursor: &mut Cursor,
) -> Result<(), SyncError> {
    ctx.update(|p| p.phase = "walk".into());
    let q = ProductQuery {
        id_desc: true,
        page_size: 1,
        fields: Some("items[id,sku,updated_at],total_count".into()),
        ..ProductQuery::default()
    };
    let page = ctx
        .request("largest product id", || client.list_products(code, &q))
        .await?;
    if page.total_count > MAX_PLAUSIBLE_TOTAL {
        return Err(implausible(page.total_count));
    }
    let clock = (shop_now(client) - CLOCK_SKEW).format(TS).to_string();
    let max_id = page.items.iter().map(|p| p.id).max();
    let workers = ctx.cfg.sync.shop_concurrency.max(1) as i64;
    let mut ranges = Vec::new();
    match max_id {
        Some(max) if max >= 0 => {
            let span = max / workers + 1;
            let mut next = 0i64;
            while next <= max {
                let end = next.saturating_add(span - 1).min(max);
                ranges.push(IdRange { next, end });
                next = end.saturating_add(1);
            }
        }
        Some(_) => {}
        None if page.total_count > 0 => {
            return Err(SyncError::Shop(ShopError::new(
                FailureKind::Protocol,
                format!(
                    "the shop announced {} products but listed none when asked for the largest id",
                    page.total_count
                ),
            )));
        }
        None => {}
    }
    set_run(cursor, |r| {
        r.shop_clock = Some(clock);
        r.ranges = ranges;
        r.announced = page.total_count;
        r.listed = 0;
        r.inconsistent = None;
    });
    Ok(())
}

/// One range of the walk, as the workers share it.
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u64,
    next: i64,
    end: i64,
    busy: bool,
}

/// State shared by the walk's workers.
struct Walk<'a, 'r> {
    ctx: &'a RunCtx<'r>,
    client: &'a M2Client,
    code: &'a str,
    mirror: &'a Mirror,
    seen: &'a sled::Tree,
    page_size: u32,
    /// The ranges; never held across an await.
    plan: Mutex<Plan>,
    /// The store view's cursor, written with every page. Held across the
    /// page's write: pages are written one at a time, each with the
    /// positions of every range as stored so far.
    cursor: tokio::sync::Mutex<Cursor>,
    received: AtomicU64,
    limit: u64,
    mirrored: u64,
    /// SKUs met on a second id in this walk (bounded report).
    duplicates: Mutex<Duplicates>,
    /// Set when a worker failed: the others stop at their next page.
    failed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Plan {
    slots: Vec<Slot>,
    next_id: u64,
}

#[derive(Default)]
struct Duplicates {
    count: u64,
    first: Vec<String>,
}

impl Plan {
    /// A range to read: one nobody reads, else half of the largest one
    /// being read (if it is worth splitting).
    fn take(&mut self, page_size: u32) -> Option<(u64, i64, i64)> {
        if let Some(s) = self.slots.iter_mut().find(|s| !s.busy && s.next <= s.end) {
            s.busy = true;
            return Some((s.id, s.next, s.end));
        }
        let min_span = i64::from(page_size).saturating_mul(2);
        let victim = self
            .slots
            .iter_mut()
            .filter(|s| s.busy && s.end.saturating_sub(s.next) > min_span)
            .max_by_key(|s| s.end.saturating_sub(s.next))?;
        let mid = victim.next + (victim.end - victim.next) / 2;
        let stolen = Slot {
            id: self.next_id,
            next: mid + 1,
            end: victim.end,
            busy: true,
        };
        victim.end = mid;
        self.next_id += 1;
        self.slots.push(stolen);
        Some((stolen.id, stolen.next, stolen.end))
    }

    fn get(&self, id: u64) -> Option<&Slot> {
        self.slots.iter().find(|s| s.id == id)
    }

    fn ranges(&self) -> Vec<IdRange> {
        let mut v: Vec<IdRange> = self
            .slots
            .iter()
            .filter(|s| s.next <= s.end)
            .map(|s| IdRange {
                next: s.next,
                end: s.end,
            })
            .collect();
        v.sort_by_key(|r| r.next);
        v
    }
}

async fn walk_ranges(
    ctx: &RunCtx<'_>,
    client: &M2Client,
    code: &str,
    mirror: &Mirror,
    cursor: &mut Cursor,
    seen: &sled::Tree,
) -> Result<(), SyncError> {
    ctx.update(|p| p.phase = "walk".into());
    let run = cursor.run.clone().unwrap_or_default();
    ctx.update(|p| p.total = Some(p.total.unwrap_or(0) + run.announced.saturating_sub(run.listed)));
    let mut plan = Plan::default();
    for r in &run.ranges {
        plan.slots.push(Slot {
            id: plan.next_id,
            next: r.next,
            end: r.end,
            busy: false,
        });
        plan.next_id += 1;
    }
    let mirrored = cursor.products;
    let w = Walk {
        ctx,
        client,
        code,
        mirror,
        seen,
        page_size: ctx.cfg.sync.page_size.max(1),
        plan: Mutex::new(plan),
        cursor: tokio::sync::Mutex::new(cursor.clone()),
        received: AtomicU64::new(0),
        limit: growth_limit(run.announced, mirrored),
        mirrored,
        duplicates: Mutex::new(Duplicates::default()),
        failed: std::sync::atomic::AtomicBool::new(false),
    };
    let workers = ctx.cfg.sync.shop_concurrency.max(1);
    let results = futures_util::future::join_all((0..workers).map(|_| w.worker())).await;
    *cursor = w.cursor.lock().await.clone();
    {
        let d = w.duplicates.lock().unwrap_or_else(|e| e.into_inner());
        if d.count > 0 {
            let tail = super::and_more(d.count.saturating_sub(d.first.len() as u64));
            ctx.inconsistent(format!(
                "the same SKU on more than one product id: {}{tail} (the mirror keeps one product per SKU, the last read)",
                d.first.join("; ")
            ));
        }
    }
    // The first error wins; an interruption is reported as such only when
    // nothing worse happened.
    let mut first: Option<SyncError> = None;
    for r in results {
        if let Err(e) = r {
            let worse = matches!(
                first,
                None | Some(SyncError::Interrupted | SyncError::Cancelled)
            );
            if worse {
                first = Some(e);
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Walk<'_, '_> {
    /// Reads ranges until none is left to read or split.
    async fn worker(&self) -> Result<(), SyncError> {
        let r = self.work().await;
        if r.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        r
    }

    async fn work(&self) -> Result<(), SyncError> {
        loop {
            self.ctx.check()?;
            if self.failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let taken = self
                .plan
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(self.page_size);
            let Some((slot, mut next, mut end)) = taken else {
                return Ok(());
            };
            let result = async {
                loop {
                    self.ctx.check()?;
                    if self.failed.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    match self.page(slot, next, end).await? {
                        Some((n, e)) => (next, end) = (n, e),
                        None => return Ok::<(), SyncError>(()),
                    }
                }
            }
            .await;
            if let Some(s) = self
                .plan
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .slots
                .iter_mut()
                .find(|s| s.id == slot)
            {
                s.busy = false;
            }
            result?;
        }
    }

    /// Reads and stores one page of a range; the range's next position, or
    /// `None` when it is done.
    async fn page(&self, slot: u64, next: i64, end: i64) -> Result<Option<(i64, i64)>, SyncError> {
        let ctx = self.ctx;
        let q = ProductQuery {
            id_range: Some((next, end)),
            page_size: self.page_size,
            ..ProductQuery::default()
        };
        let page = ctx
            .request("product page", || self.client.list_products(self.code, &q))
            .await?;
        let n = page.items.len() as u64;
        let received = self.received.fetch_add(n, Ordering::Relaxed) + n;
        if received > self.limit {
            let announced = self
                .cursor
                .lock()
                .await
                .run
                .as_ref()
                .map_or(0, |r| r.announced);
            return Err(endless(received, self.limit, announced, self.mirrored));
        }
        check_range(&page, next, end)?;
        let mut inconsistent = None;
        let full = n >= u64::from(self.page_size);
        if page.total_count < n {
            inconsistent = Some(format!(
                "the shop answered {n} products for ids {next}..{end} with a total_count of {}",
                page.total_count
            ));
        } else if !full && page.total_count != n {
            inconsistent = Some(format!(
                "the listing of ids {next}..{end} ended after {n} products but the shop announced {}",
                page.total_count
            ));
        }
        // The range may have been split meanwhile: what lies past its end
        // now belongs to the worker that took the rest.
        let end_now = self
            .plan
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(slot)
            .map_or(end, |s| s.end);
        let past_end = page.items.iter().any(|p| p.id > end_now);
        let mine: Vec<&RawProduct> = page.items.iter().filter(|p| p.id <= end_now).collect();
        let done = past_end || !full || page.total_count == n || n == 0;
        let new_next = if done {
            end_now.saturating_add(1)
        } else {
            mine.last().map_or(end_now, |p| p.id).saturating_add(1)
        };
        self.mark_seen(&mine)?;
        let items: Vec<Item> = mine.iter().map(|p| to_item(p)).collect();
        let stored = items.len() as u64;
        let a = {
            let mut cursor = self.cursor.lock().await;
            let ranges = {
                let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(s) = plan.slots.iter_mut().find(|s| s.id == slot) {
                    s.next = new_next;
                }
                plan.ranges()
            };
            set_run(&mut cursor, |r| {
                r.ranges = ranges;
                r.listed += stored;
                if r.inconsistent.is_none() {
                    r.inconsistent.clone_from(&inconsistent);
                }
            });
            self.mirror
                .apply_blocking(items, Vec::new(), &mut cursor)
                .await?
        };
        ctx.flush().await?;
        ctx.applied(stored, a);
        if let Some(why) = inconsistent {
            ctx.inconsistent(why);
        }
        if done {
            self.plan
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .slots
                .retain(|s| s.id != slot);
            return Ok(None);
        }
        Ok(Some((new_next, end_now)))
    }

    /// Notes the SKUs as listed (for the deletion of unseen products) and
    /// reports a SKU that comes with a second id.
    fn mark_seen(&self, items: &[&RawProduct]) -> Result<(), SyncError> {
        for p in items {
            let old = self
                .seen
                .insert(p.sku.as_bytes(), &p.id.to_be_bytes())
                .map_err(StoreError::from)?;
            let other = old
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map(i64::from_be_bytes)
                .filter(|o| *o != p.id);
            if let Some(o) = other {
                let mut d = self.duplicates.lock().unwrap_or_else(|e| e.into_inner());
                d.count += 1;
                if d.first.len() < 5 {
                    d.first
                        .push(format!("{} (ids {o} and {})", shown(&p.sku), p.id));
                }
            }
        }
        Ok(())
    }
}

/// A page of an id range must hold ids of that range in ascending order:
/// otherwise the shop ignores the filter or the sort, and paging by id would
/// loop or skip.
fn check_range(page: &ProductPage, from: i64, to: i64) -> Result<(), SyncError> {
    let mut prev: Option<i64> = None;
    for p in &page.items {
        if p.id < from || p.id > to {
            return Err(SyncError::Shop(ShopError::new(
                FailureKind::Protocol,
                format!(
                    "the shop answered product id {} (SKU {}) when asked for ids {from}..{to}: it ignores the entity_id filter",
                    p.id,
                    shown(&p.sku)
                ),
            )));
        }
        if prev.is_some_and(|q| p.id <= q) {
            return Err(SyncError::Shop(ShopError::new(
                FailureKind::Protocol,
                format!(
                    "the shop answered ids out of order ({} after {}) when asked to sort by entity_id",
                    p.id,
                    prev.unwrap_or_default()
                ),
            )));
        }
        prev = Some(p.id);
    }
    Ok(())
}

/// The keyset position of a product: (`updated_at`, `entity_id`).
fn key(p: &RawProduct) -> (&str, i64) {
    (p.updated_at.as_str(), p.id)
}

async fn catch_up(
    ctx: &RunCtx<'_>,
    client: &M2Client,
    code: &str,
    mirror: &Mirror,
    cursor: &mut Cursor,
    reread_until: Option<String>,
) -> Result<(), SyncError> {
    ctx.update(|p| p.phase = "catch_up".into());
    let page_size = ctx.cfg.sync.page_size.max(1);
    let query = |pos: &Option<(String, i64)>| ProductQuery {
        after: pos.clone(),
        page_size,
        ..ProductQuery::default()
    };
    // Where paging goes on (the last readable key answered); the checkpoint
    // follows it only up to the shop's clock.
    let mut pos: Option<(String, i64)> = cursor.updated_at.clone().map(|t| (t, cursor.last_id));
    let mirrored = cursor.products;
    ctx.check()?;
    let q = query(&pos);
    let mut page = ctx
        .request("product page", || client.list_products(code, &q))
        .await?;
    if page.total_count > MAX_PLAUSIBLE_TOTAL {
        return Err(implausible(page.total_count));
    }
    let announced = page.total_count;
    let limit = growth_limit(announced, mirrored);
    let mut received = 0u64;
    let mut distrust = false;
    ctx.update(|p| p.total = Some(p.total.unwrap_or(0) + page.total_count));
    loop {
        let n = page.items.len() as u64;
        received += n;
        if received > limit {
            return Err(endless(received, limit, announced, mirrored));
        }
        let fresh: Vec<&RawProduct> = page
            .items
            .iter()
            .filter(|p| match &pos {
                None => true,
                Some((t, i)) => key(p) > (t.as_str(), *i) || parse_ts(&p.updated_at).is_none(),
            })
            .collect();
        if fresh.is_empty() {
            if page.items.is_empty() {
                if page.total_count > 0 {
                    ctx.inconsistent(format!(
                        "the shop announced {} more changed products but listed none",
                        page.total_count
                    ));
                }
                return Ok(());
            }
            // Items, but none past the checkpoint: the shop ignores the
            // filter. Stop instead of looping.
            return Err(SyncError::Shop(ShopError::new(
                FailureKind::Protocol,
                "the shop answered products before the sync checkpoint: it ignores the updated_at/entity_id filter",
            )));
        }
        let full = n >= u64::from(page_size);
        if page.total_count < n {
            distrust = true;
            ctx.inconsistent(format!(
                "the shop answered {n} changed products with a total_count of {}",
                page.total_count
            ));
        } else if !full && page.total_count != n {
            distrust = true;
            ctx.inconsistent(format!(
                "the listing of changed products ended after {n} products but the shop announced {}",
                page.total_count
            ));
        }
        let last_page = n == 0 || !full || page.total_count == n;
        // Paging goes on after the largest readable key; a full page
        // without one cannot be paged past.
        let readable = fresh
            .iter()
            .filter(|p| parse_ts(&p.updated_at).is_some())
            .max_by(|a, b| key(a).cmp(&key(b)));
        if readable.is_none() && !last_page {
            return Err(SyncError::Shop(ShopError::new(
                FailureKind::Protocol,
                format!(
                    "no product of a full page has an updated_at that reads as a time (e.g. \"{}\" on SKU {}): the listing cannot be paged",
                    shown(&fresh[0].updated_at),
                    shown(&fresh[0].sku)
                ),
            )));
        }
        // The checkpoint: that key, but never past the shop's clock. A key
        // past it is re-read by the next run (a host whose clock is a
        // little ahead) or is bogus (reported below); either way the
        // products saved from now on are after the checkpoint.
        let now = shop_now(client);
        let clock = now.format(TS).to_string();
        let cap = (now + CLOCK_SKEW).format(TS).to_string();
        let mut next = cursor.clone();
        if let Some(last) = readable {
            pos = Some((last.updated_at.clone(), last.id));
            if distrust {
                // The listing contradicted itself: what it left out may lie
                // anywhere before this key, so the checkpoint stays where
                // this run found it and the next run reads it all again.
            } else if last.updated_at.as_str() >= clock.as_str() {
                if next
                    .updated_at
                    .as_deref()
                    .is_none_or(|t| t < clock.as_str())
                {
                    next.updated_at = Some(clock.clone());
                    next.last_id = 0;
                }
            } else {
                next.updated_at = Some(last.updated_at.clone());
                next.last_id = last.id;
            }
        }
        for p in &fresh {
            let why = match parse_ts(&p.updated_at) {
                None => "does not read as a time",
                Some(_) if p.updated_at.as_str() > cap.as_str() => "is past the shop's clock",
                Some(_) => continue,
            };
            ctx.inconsistent(format!(
                "product {} has updated_at \"{}\", which {why}: stored, but the checkpoint stays at the shop's clock (fix the product in the shop)",
                shown(&p.sku),
                shown(&p.updated_at)
            ));
        }
        let items = fresh_items(mirror, &fresh, reread_until.as_deref())?;
        let fetched = items.len() as u64;
        let stop = ctx.check();
        let q = query(&pos);
        // The page and its checkpoint are stored and flushed together; the
        // next page is fetched meanwhile (it depends only on the position)
        // and is stored only after this flush.
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

/// The products of a catch-up page worth storing and counting: a product
/// at or before the re-read boundary whose content is what the mirror holds
/// was read before (the boundary second, or the id walk of this run) and is
/// neither stored again nor counted.
fn fresh_items(
    mirror: &Mirror,
    fresh: &[&RawProduct],
    reread_until: Option<&str>,
) -> Result<Vec<Item>, SyncError> {
    let mut out = Vec::with_capacity(fresh.len());
    for p in fresh {
        let item = to_item(p);
        if let Some(b) = reread_until
            && p.updated_at.as_str() <= b
            && parse_ts(&p.updated_at).is_some()
        {
            let stored = mirror
                .index()
                .get(p.sku.as_bytes())
                .map_err(StoreError::from)?;
            let same = stored
                .as_deref()
                .and_then(crate::mirror::decode)
                .is_some_and(|e| e.hash == crate::mirror::content_hash(&item.json));
            if same {
                continue;
            }
        }
        out.push(item);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_stealing_splits_the_largest_busy_range() {
        let mut plan = Plan::default();
        for (next, end) in [(0, 99), (100, 100_000)] {
            plan.slots.push(Slot {
                id: plan.next_id,
                next,
                end,
                busy: false,
            });
            plan.next_id += 1;
        }
        let a = plan.take(10).unwrap();
        let b = plan.take(10).unwrap();
        assert_eq!((a.1, b.1), (0, 100));
        // Nothing free: the big range is halved, the small one is not.
        let c = plan.take(10).unwrap();
        assert_eq!((c.1, c.2), (50_051, 100_000));
        assert_eq!(plan.get(b.0).unwrap().end, 50_050);
        let ranges = plan.ranges();
        assert_eq!(ranges.len(), 3);
        assert!(ranges.windows(2).all(|w| w[0].end < w[1].next));
        // A range too small to split is left alone.
        let mut small = Plan::default();
        small.slots.push(Slot {
            id: 0,
            next: 0,
            end: 15,
            busy: true,
        });
        assert!(small.take(10).is_none());
    }

    #[test]
    fn growth_is_bounded_by_the_announced_count_and_the_mirror() {
        assert_eq!(growth_limit(0, 0), 1_000);
        assert_eq!(growth_limit(3_000, 100), 4_000);
        assert_eq!(growth_limit(100, 50_000), 55_000);
    }

    #[test]
    fn timestamps() {
        assert!(parse_ts("2024-01-02 03:04:05").is_some());
        assert!(parse_ts("9999-12-31 23:59:59").is_some());
        assert!(parse_ts("zzzz-not-a-date").is_none());
        assert!(parse_ts("").is_none());
    }
}
