//! The local mirror of a store view and its checkpoint (`cursor`). Owns the
//! layout of the two mirror trees and the one operation that changes them
//! and the checkpoint together: [`Mirror::apply`], which writes a page of
//! products and the checkpoint that covers it in one sled transaction.
//!
//! Layout 2 (schema 2):
//! - `products:{shop}:{store}`, the index: SKU →
//!   `[2u8 layout][8 bytes content hash][8 bytes id BE][8 bytes seq BE][1 byte n][n bytes updated_at]`.
//!   No JSON: the index stays small (about 20 times denser than layout 1),
//!   so the per-product lookup of a sync mostly hits the cache.
//! - `docs:{shop}:{store}`, the data: seq (u64 BE) → the product JSON exactly
//!   as the shop sent it (export streams it untouched).
//!
//! A new product gets the next seq (one past the largest data key), so new
//! data is appended to the rightmost leaf. A changed product keeps its seq
//! and its data is overwritten in place: a data key is never reused while
//! an index entry points at it, and an export that walks the data tree while
//! a sync runs still sees every product once. Every index entry points at
//! exactly one data key and every data key is pointed at by exactly one
//! index entry; `apply` keeps both trees and the cursor in one transaction.
//!
//! Layout 1 (schema 1) kept everything in `products:{shop}:{store}`:
//! `[1u8][hash 8][id 8][n 1][updated_at][JSON]`. [`migrate_layout1`]
//! rewrites such trees when the store is opened.

use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::collections::HashMap;

const LAYOUT: u8 = 2;
const LAYOUT1: u8 = 1;
/// Bytes of an index entry before `updated_at`.
const HEADER: usize = 26;

/// A product ready to be stored.
#[derive(Debug, Clone)]
pub struct Item {
    pub sku: String,
    pub id: i64,
    pub updated_at: String,
    /// The product JSON as the shop returned it (M2), or the XML-RPC answer
    /// converted to JSON (M1).
    pub json: Vec<u8>,
}

/// An index entry, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub hash: u64,
    pub id: i64,
    /// The product's key in the data tree.
    pub seq: u64,
    pub updated_at: &'a str,
}

/// Content hash of a product's JSON (first 8 bytes of SHA-256).
pub fn content_hash(json: &[u8]) -> u64 {
    let d = Sha256::digest(json);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// Encodes an index entry.
fn encode(hash: u64, id: i64, seq: u64, updated_at: &str) -> Vec<u8> {
    let ua = updated_at.as_bytes();
    let ua = &ua[..ua.len().min(255)];
    let mut v = Vec::with_capacity(HEADER + ua.len());
    v.push(LAYOUT);
    v.extend_from_slice(&hash.to_be_bytes());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.push(ua.len() as u8);
    v.extend_from_slice(ua);
    v
}

/// Decodes an index entry; `None` for a value this build cannot read.
pub fn decode(v: &[u8]) -> Option<Entry<'_>> {
    if v.len() < HEADER || v[0] != LAYOUT {
        return None;
    }
    let n = v[25] as usize;
    Some(Entry {
        hash: u64::from_be_bytes(v[1..9].try_into().ok()?),
        id: i64::from_be_bytes(v[9..17].try_into().ok()?),
        seq: u64::from_be_bytes(v[17..25].try_into().ok()?),
        updated_at: std::str::from_utf8(v.get(HEADER..HEADER + n)?).ok()?,
    })
}

/// A layout-1 value: (hash, id, updated_at, JSON).
fn decode_layout1(v: &[u8]) -> Option<(u64, i64, &str, &[u8])> {
    if v.len() < 18 || v[0] != LAYOUT1 {
        return None;
    }
    let hash = u64::from_be_bytes(v[1..9].try_into().ok()?);
    let id = i64::from_be_bytes(v[9..17].try_into().ok()?);
    let n = v[17] as usize;
    let ua = std::str::from_utf8(v.get(18..18 + n)?).ok()?;
    Some((hash, id, ua, v.get(18 + n..)?))
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// One past the largest data key: the seq of the next new product.
fn next_seq(docs: &sled::Tree) -> Result<u64, StoreError> {
    Ok(match docs.last()? {
        None => 1,
        Some((k, _)) => <[u8; 8]>::try_from(k.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("a data key is not 8 bytes".into()))?
            .saturating_add(1),
    })
}
/// Where a store view's sync stands. Written atomically with the products
/// it covers, so it never claims data that was not stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Every product updated before this second, and those of this second
    /// with id ≤ `last_id`, is stored (Magento 2 keyset; Magento 1 uses the
    /// second only and re-reads it).
    pub updated_at: Option<String>,
    pub last_id: i64,
    /// Products in the mirror.
    pub products: u64,
    /// The run in progress, if one was interrupted: resumed next time.
    pub run: Option<RunCursor>,
}

/// The resumable state of an unfinished run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCursor {
    pub run_id: u64,
    pub full: bool,
    /// `catch_up`, `list`, `refetch`, `delete` (full reconcile phases).
    pub phase: String,
    /// Phase-specific position: last listed id (M2 `list`), next id-range
    /// start (M1), and so on.
    pub position: i64,
    /// Magento 1 incremental: the `updated_at` filter of this run.
    pub since: Option<String>,
    /// Magento 1 id walk: empty ranges in a row (the range widens with
    /// each, so the walk ends quickly past the last id).
    pub empty_ranges: u32,
    /// Magento 1: the newest `updated_at` stored by this run; becomes the
    /// cursor when the run completes.
    pub max_seen: Option<String>,
    /// The shop's clock when this run started (Magento 1; Magento 2 id
    /// walk). The checkpoint never moves past it: a product read early and
    /// saved again while the run goes on has an `updated_at` between the two.
    pub shop_clock: Option<String>,
    /// This run was allowed to delete more than `sync.max_delete_share`
    /// (`--allow-mass-delete`); kept so that a resumed run keeps it.
    #[serde(default)]
    pub allow_mass_delete: bool,
    /// Magento 2 id walk: the `entity_id` ranges still to read, each
    /// `[next, end]` (every id below `next` in its range is stored). A range
    /// leaves the list once read to its end; concurrent workers each page
    /// one, and a page is written with the new position of its range.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<IdRange>,
    /// Magento 2 id walk: `total_count` the shop announced when it started.
    #[serde(default)]
    pub announced: u64,
    /// Magento 2 id walk: products listed so far.
    #[serde(default)]
    pub listed: u64,
    /// Magento 2 id walk: what made the listing inconsistent, if anything.
    /// An inconsistent listing deletes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inconsistent: Option<String>,
}

/// An `entity_id` range of a Magento 2 id walk still to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    /// The next id to read (every id in the range below it is stored).
    pub next: i64,
    /// The last id of the range.
    pub end: i64,
}

/// Counts of what a page did to the mirror.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
}

impl Applied {
    pub fn add(&mut self, o: Applied) {
        self.created += o.created;
        self.updated += o.updated;
        self.unchanged += o.unchanged;
        self.deleted += o.deleted;
    }
}

/// One store view's mirror and checkpoint. Cheap to clone.
#[derive(Clone)]
pub struct Mirror {
    store: Store,
    index: sled::Tree,
    docs: sled::Tree,
    key: String,
}

/// A product `apply` writes: its index entry and data.
struct Write<'a> {
    sku: &'a str,
    entry: Vec<u8>,
    seq: u64,
    json: &'a [u8],
}

impl Mirror {
    pub fn open(store: &Store, shop: &str, store_code: &str) -> Result<Mirror, StoreError> {
        let (index, docs) = store.mirror_trees(shop, store_code)?;
        Ok(Mirror {
            store: store.clone(),
            index,
            docs,
            key: cursor_key(shop, store_code),
        })
    }

    /// The index, SKU → entry (read-only uses: reconcile; see [`decode`]).
    pub fn index(&self) -> &sled::Tree {
        &self.index
    }

    /// Every stored product's JSON, in the order the products were first
    /// stored. Not a snapshot: a product created or deleted meanwhile may
    /// or may not appear; a changed one appears once, old or new.
    pub fn json_values(&self) -> impl Iterator<Item = Result<sled::IVec, StoreError>> + use<> {
        self.docs
            .iter()
            .values()
            .map(|r| r.map_err(StoreError::from))
    }

    pub fn cursor(&self) -> Result<Cursor, StoreError> {
        read_cursor_key(&self.store, &self.key)
    }

    /// Stores `upserts`, removes `deletes` (SKUs) and writes `cursor`, all or
    /// nothing. `cursor.products` is adjusted by what happened. Unchanged
    /// products (same content hash) are not rewritten; a changed product's
    /// data is overwritten under its seq; a new one is appended.
    ///
    /// The index entries are read before the transaction: a sled transaction
    /// holds a database-wide write lock, and reads that miss the cache go to
    /// disk, so reading inside it would stall every other reader (status).
    /// Only the run that owns this store view writes its trees, so what was
    /// read is still what the transaction replaces. Blocking: call it from a
    /// blocking thread in async code (see [`Mirror::apply_blocking`]).
    pub fn apply(
        &self,
        upserts: &[Item],
        deletes: &[String],
        cursor: &mut Cursor,
    ) -> Result<Applied, StoreError> {
        let mut applied = Applied::default();
        let mut writes: Vec<Write<'_>> = Vec::with_capacity(upserts.len());
        // A SKU met twice in one call compares with its pending write.
        let mut pending: HashMap<&str, (usize, u64)> = HashMap::with_capacity(upserts.len());
        let mut fresh: Option<u64> = None;
        for i in upserts {
            let hash = content_hash(&i.json);
            if let Some((at, h)) = pending.get_mut(i.sku.as_str()) {
                if *h == hash {
                    applied.unchanged += 1;
                } else {
                    *h = hash;
                    let w = &mut writes[*at];
                    w.entry = encode(hash, i.id, w.seq, &i.updated_at);
                    w.json = &i.json;
                    applied.updated += 1;
                }
                continue;
            }
            let old = self.index.get(i.sku.as_bytes())?;
            let seq = match old.as_deref().map(decode) {
                Some(Some(e)) if e.hash == hash => {
                    applied.unchanged += 1;
                    continue;
                }
                Some(Some(e)) => {
                    applied.updated += 1;
                    e.seq
                }
                found => {
                    // New, or an entry this build cannot read (its data, if
                    // any, is lost to it either way).
                    if found.is_some() {
                        applied.updated += 1;
                    } else {
                        applied.created += 1;
                    }
                    let next = match fresh {
                        Some(n) => n,
                        None => next_seq(&self.docs)?,
                    };
                    fresh = Some(next + 1);
                    next
                }
            };
            pending.insert(i.sku.as_str(), (writes.len(), hash));
            writes.push(Write {
                sku: i.sku.as_str(),
                entry: encode(hash, i.id, seq, &i.updated_at),
                seq,
                json: &i.json,
            });
        }
        // Warm the cache for the deletes' reads inside the transaction.
        for sku in deletes {
            self.index.get(sku.as_bytes())?;
        }
        let base = cursor.clone();
        let result = (&self.index, &self.docs, self.store.cursor()).transaction(|(ix, dx, c)| {
            for w in &writes {
                dx.insert(&seq_key(w.seq), w.json)?;
                ix.insert(w.sku.as_bytes(), w.entry.as_slice())?;
            }
            let mut deleted = 0;
            for sku in deletes {
                if let Some(old) = ix.remove(sku.as_bytes())? {
                    deleted += 1;
                    if let Some(e) = decode(&old) {
                        dx.remove(&seq_key(e.seq))?;
                    }
                }
            }
            let mut next = base.clone();
            next.products = (next.products + applied.created).saturating_sub(deleted);
            let v = serde_json::to_vec(&next)
                .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
            c.insert(self.key.as_bytes(), v)?;
            Ok((deleted, next))
        });
        match result {
            Ok((deleted, next)) => {
                *cursor = next;
                applied.deleted = deleted;
                Ok(applied)
            }
            Err(TransactionError::Abort(e)) => Err(StoreError::Corrupt(e)),
            Err(TransactionError::Storage(e)) => Err(StoreError::Sled(e)),
        }
    }

    /// [`Mirror::apply`] on a blocking thread, so that a page's disk work
    /// does not hold up the async workers (the control socket among them).
    pub async fn apply_blocking(
        &self,
        upserts: Vec<Item>,
        deletes: Vec<String>,
        cursor: &mut Cursor,
    ) -> Result<Applied, StoreError> {
        let m = self.clone();
        let mut c = cursor.clone();
        let (a, c) = tokio::task::spawn_blocking(move || {
            m.apply(&upserts, &deletes, &mut c).map(|a| (a, c))
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("mirror write: {e}")))??;
        *cursor = c;
        Ok(a)
    }

    /// Writes the cursor alone (phase changes).
    pub fn save_cursor(&self, cursor: &Cursor) -> Result<(), StoreError> {
        let mut c = cursor.clone();
        self.apply(&[], &[], &mut c).map(|_| ())
    }

    /// Recounts the products (after an upgrade, or to repair the count).
    pub fn recount(&self) -> u64 {
        self.index.len() as u64
    }

    /// Rewrites the layout-1 entries of this store view into index + data,
    /// a batch per transaction: a crash leaves a mix that the next attempt
    /// finishes (it skips layout-2 entries), never an orphan. Returns the
    /// number of products rewritten.
    fn migrate_layout1(&self) -> Result<u64, StoreError> {
        const BATCH: usize = 1000;
        let mut done = 0;
        let mut dropped = false;
        let mut from: Option<sled::IVec> = None;
        loop {
            let iter = match &from {
                None => self.index.iter(),
                Some(k) => self.index.range::<&[u8], _>((
                    std::ops::Bound::Excluded(k.as_ref()),
                    std::ops::Bound::Unbounded,
                )),
            };
            let mut batch = Vec::with_capacity(BATCH);
            let mut last = None;
            for kv in iter {
                let (k, v) = kv?;
                last = Some(k.clone());
                if v.first() == Some(&LAYOUT1) {
                    batch.push((k, v));
                    if batch.len() >= BATCH {
                        break;
                    }
                }
            }
            let mut seq = next_seq(&self.docs)?;
            let mut ops = Vec::with_capacity(batch.len());
            for (k, v) in &batch {
                match decode_layout1(v) {
                    Some((hash, id, ua, json)) => {
                        ops.push((k, Some((encode(hash, id, seq, ua), seq_key(seq), json))));
                        seq += 1;
                    }
                    // Unreadable: dropped, the next full sync fetches it.
                    None => {
                        ops.push((k, None));
                        dropped = true;
                    }
                }
            }
            if !ops.is_empty() {
                let r: Result<(), TransactionError<()>> =
                    (&self.index, &self.docs).transaction(|(ix, dx)| {
                        for (k, op) in &ops {
                            match op {
                                Some((entry, key, json)) => {
                                    dx.insert(key, *json)?;
                                    ix.insert(k.as_ref(), entry.as_slice())?;
                                }
                                None => {
                                    ix.remove(k.as_ref())?;
                                }
                            }
                        }
                        Ok(())
                    });
                r.map_err(|e| match e {
                    TransactionError::Storage(e) => StoreError::Sled(e),
                    TransactionError::Abort(()) => StoreError::Corrupt("migration aborted".into()),
                })?;
                done += ops.len() as u64;
            }
            match last {
                Some(k) => from = Some(k),
                None => break,
            }
        }
        if dropped {
            let mut c = self.cursor()?;
            c.products = self.recount();
            self.save_cursor(&c)?;
        }
        Ok(done)
    }
}

/// What [`verify`] found in one store view's mirror.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    /// The checkpoint (`None`: none stored).
    pub cursor: Option<Cursor>,
    /// Index entries.
    pub entries: u64,
    /// Data keys.
    pub docs: u64,
    /// The newest `updated_at` stored.
    pub newest: Option<String>,
    /// Broken invariants, one line each.
    pub problems: Vec<String>,
    /// Facts worth telling that break nothing.
    pub notes: Vec<String>,
}

/// Checks one store view's mirror offline (`cobbyd check-state`): every
/// index entry decodes and points at a data key holding JSON of its hash,
/// no two entries share a data key, no data key is unreferenced, the
/// checkpoint parses and counts the entries, and the checkpoint is not
/// ahead of the stored data as far as the layout tells (a Magento 2
/// catch-up checkpoint names its last product: it must be stored, at that
/// `updated_at` or later; a checkpoint over an empty mirror claims data
/// that is not there). Reads only, never creates a tree.
pub fn verify(store: &Store, shop: &str, store_code: &str) -> Result<Verified, StoreError> {
    const SHOWN: usize = 5;
    let mut v = Verified::default();
    let index = store.existing_tree(&crate::store::products_tree_name(shop, store_code))?;
    let docs = store.existing_tree(&crate::store::docs_tree_name(shop, store_code))?;
    let key = cursor_key(shop, store_code);
    v.cursor = match store.cursor().get(key.as_bytes())? {
        None => None,
        Some(c) => match serde_json::from_slice::<Cursor>(&c) {
            Ok(c) => Some(c),
            Err(e) => {
                v.problems
                    .push(format!("checkpoint {key} does not parse: {e}"));
                None
            }
        },
    };
    let mut seqs: HashMap<u64, String> = HashMap::new();
    let mut unreadable = Vec::new();
    let mut dangling = Vec::new();
    let mut wrong_hash = Vec::new();
    let mut shared = Vec::new();
    let mut at_cursor: Option<String> = None;
    let want = v.cursor.as_ref().and_then(|c| {
        let catch_up = c.run.as_ref().is_some_and(|r| r.phase == "catch_up");
        (catch_up && c.last_id > 0)
            .then(|| c.updated_at.clone().map(|u| (u, c.last_id)))
            .flatten()
    });
    if let Some(index) = &index {
        for kv in index.iter() {
            let (k, val) = kv?;
            v.entries += 1;
            let sku = String::from_utf8_lossy(&k).into_owned();
            let Some(e) = decode(&val) else {
                unreadable.push(sku);
                continue;
            };
            if v.newest.as_deref().is_none_or(|n| e.updated_at > n) {
                v.newest = Some(e.updated_at.to_string());
            }
            if let Some((_, id)) = &want
                && e.id == *id
            {
                at_cursor = Some(e.updated_at.to_string());
            }
            if let Some(other) = seqs.insert(e.seq, sku.clone()) {
                shared.push(format!("{other} and {sku} (data key {})", e.seq));
            }
            match docs.as_ref().map(|d| d.get(seq_key(e.seq))).transpose()? {
                Some(Some(json)) if content_hash(&json) == e.hash => {}
                Some(Some(_)) => wrong_hash.push(sku),
                _ => dangling.push(sku),
            }
        }
    }
    let mut orphans = Vec::new();
    if let Some(docs) = &docs {
        for k in docs.iter().keys() {
            let k = k?;
            v.docs += 1;
            match <[u8; 8]>::try_from(k.as_ref()).map(u64::from_be_bytes) {
                Ok(seq) if seqs.contains_key(&seq) => {}
                Ok(seq) => orphans.push(seq.to_string()),
                Err(_) => orphans.push(format!("{:?} (not 8 bytes)", k.as_ref())),
            }
        }
    }
    let list = |what: &str, items: &[String]| {
        let mut shown: Vec<&str> = items.iter().take(SHOWN).map(String::as_str).collect();
        let more = items.len().saturating_sub(SHOWN);
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        shown.sort_unstable();
        format!("{} {what}: {}{tail}", items.len(), shown.join(", "))
    };
    if !unreadable.is_empty() {
        v.problems
            .push(list("index entries this build cannot read", &unreadable));
    }
    if !dangling.is_empty() {
        v.problems
            .push(list("index entries without their data", &dangling));
    }
    if !wrong_hash.is_empty() {
        v.problems.push(list(
            "index entries whose data does not match their content hash",
            &wrong_hash,
        ));
    }
    if !shared.is_empty() {
        v.problems
            .push(list("data keys shared by two index entries", &shared));
    }
    if !orphans.is_empty() {
        v.problems
            .push(list("data keys no index entry points at", &orphans));
    }
    if let Some(r) = v.cursor.as_ref().and_then(|c| c.run.as_ref()) {
        // The id walk's ranges: each well formed, sorted, none overlapping
        // (two workers never own one id), and only while walking.
        let mut prev: Option<&IdRange> = None;
        for x in &r.ranges {
            if x.next > x.end {
                v.problems.push(format!(
                    "the unfinished run's id range {}..{} is empty (a finished range must leave the checkpoint)",
                    x.next, x.end
                ));
            }
            if let Some(p) = prev
                && p.end >= x.next
            {
                v.problems.push(format!(
                    "the unfinished run's id ranges {}..{} and {}..{} overlap or are out of order",
                    p.next, p.end, x.next, x.end
                ));
            }
            prev = Some(x);
        }
        if !r.ranges.is_empty() && r.phase != "walk" {
            v.problems.push(format!(
                "the unfinished run is in phase {:?} but still holds {} id ranges",
                r.phase,
                r.ranges.len()
            ));
        }
        if !r.ranges.is_empty() {
            v.notes.push(format!(
                "an id walk is under way: {} ranges left, {} of {} products listed",
                r.ranges.len(),
                r.listed,
                r.announced
            ));
        }
    }
    if let Some(c) = &v.cursor {
        if c.products != v.entries {
            v.problems.push(format!(
                "the checkpoint counts {} products, the index holds {}",
                c.products, v.entries
            ));
        }
        if let Some(u) = &c.updated_at
            && v.entries == 0
        {
            v.problems.push(format!(
                "the checkpoint is at {u} but no product is stored (checkpoint ahead of the data)"
            ));
        }
        if let Some((u, id)) = &want {
            match &at_cursor {
                Some(got) if got.as_str() >= u.as_str() => {}
                Some(got) => v.problems.push(format!(
                    "the checkpoint is at ({u}, id {id}) but that product is stored at {got} (checkpoint ahead of the data)"
                )),
                None => v.problems.push(format!(
                    "the checkpoint is at ({u}, id {id}) but no product with id {id} is stored (checkpoint ahead of the data)"
                )),
            }
        }
        if let (Some(u), Some(n)) = (&c.updated_at, &v.newest)
            && n < u
        {
            v.notes.push(format!(
                "the checkpoint ({u}) is past the newest stored product ({n}): only right if the newest products were deleted"
            ));
        }
    } else if v.entries > 0 {
        v.problems.push(format!(
            "{} products stored but no checkpoint (every page is stored with its checkpoint)",
            v.entries
        ));
    }
    Ok(v)
}

/// Rewrites every layout-1 mirror (schema 1) into layout 2. Idempotent:
/// run again after a crash, it finishes the job. The caller records the
/// new schema version once this returned.
pub fn migrate_layout1(store: &Store) -> Result<u64, StoreError> {
    let mut total = 0;
    for (shop, code) in store.mirror_views() {
        let m = Mirror::open(store, &shop, &code)?;
        let n = m.migrate_layout1()?;
        if n > 0 {
            tracing::info!(shop = %shop, store = %code, products = n, "mirror migrated to layout 2");
        }
        total += n;
    }
    Ok(total)
}

/// `shop/store`.
pub fn cursor_key(shop: &str, store_code: &str) -> String {
    format!("{shop}/{store_code}")
}

/// A store view's checkpoint, without opening its mirror's trees (status
/// reads it for every shop).
pub fn read_cursor(store: &Store, shop: &str, store_code: &str) -> Result<Cursor, StoreError> {
    read_cursor_key(store, &cursor_key(shop, store_code))
}

fn read_cursor_key(store: &Store, key: &str) -> Result<Cursor, StoreError> {
    match store.cursor().get(key.as_bytes())? {
        None => Ok(Cursor::default()),
        Some(v) => serde_json::from_slice(&v)
            .map_err(|e| StoreError::Corrupt(format!("cursor {key}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn item(sku: &str, id: i64, json: &str) -> Item {
        Item {
            sku: sku.into(),
            id,
            updated_at: "2024-01-01 00:00:00".into(),
            json: json.as_bytes().to_vec(),
        }
    }

    /// Index and data agree: every entry points at a data key holding JSON
    /// with that hash, no two entries share one, no data key is orphaned,
    /// and the cursor counts the entries. Returns SKU → JSON.
    fn consistent(m: &Mirror, c: &Cursor) -> std::collections::BTreeMap<String, String> {
        let mut seqs = BTreeSet::new();
        let mut out = std::collections::BTreeMap::new();
        for kv in m.index().iter() {
            let (k, v) = kv.unwrap();
            let e = decode(&v).unwrap();
            assert!(seqs.insert(e.seq), "seq {} twice", e.seq);
            let json = m.docs.get(seq_key(e.seq)).unwrap().expect("dangling entry");
            assert_eq!(content_hash(&json), e.hash);
            out.insert(
                String::from_utf8(k.to_vec()).unwrap(),
                String::from_utf8(json.to_vec()).unwrap(),
            );
        }
        let data: BTreeSet<u64> = m
            .docs
            .iter()
            .keys()
            .map(|k| u64::from_be_bytes(k.unwrap().as_ref().try_into().unwrap()))
            .collect();
        assert_eq!(data, seqs, "orphan data keys");
        assert_eq!(c.products, out.len() as u64);
        assert_eq!(m.recount(), out.len() as u64);
        assert_eq!(m.json_values().count(), out.len());
        out
    }

    #[test]
    fn entry_round_trip() {
        let v = encode(42, 7, 9, "2024-01-01 00:00:00");
        let e = decode(&v).unwrap();
        assert_eq!(
            e,
            Entry {
                hash: 42,
                id: 7,
                seq: 9,
                updated_at: "2024-01-01 00:00:00"
            }
        );
        assert!(decode(&v[..10]).is_none());
        let mut v1 = v.clone();
        v1[0] = LAYOUT1;
        assert!(decode(&v1).is_none());
    }

    #[test]
    fn apply_counts_and_moves_cursor_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 4).unwrap();
        let m = Mirror::open(&store, "s", "default").unwrap();
        let mut c = m.cursor().unwrap();
        c.updated_at = Some("2024".into());
        let a = m
            .apply(&[item("a", 1, "{}"), item("b", 2, "{}")], &[], &mut c)
            .unwrap();
        assert_eq!((a.created, c.products), (2, 2));
        consistent(&m, &c);
        let a = m
            .apply(
                &[item("a", 1, "{}"), item("b", 2, r#"{"x":1}"#)],
                &["zz".into()],
                &mut c,
            )
            .unwrap();
        assert_eq!((a.unchanged, a.updated, a.deleted), (1, 1, 0));
        assert_eq!(consistent(&m, &c)["b"], r#"{"x":1}"#);
        let a = m.apply(&[], &["a".into()], &mut c).unwrap();
        assert_eq!((a.deleted, c.products), (1, 1));
        assert_eq!(m.cursor().unwrap(), c);
        consistent(&m, &c);
        // The same SKU twice in one call: the second compares with the first.
        let a = m
            .apply(
                &[
                    item("d", 4, "{}"),
                    item("d", 4, "{}"),
                    item("d", 4, r#"{"y":2}"#),
                ],
                &[],
                &mut c,
            )
            .unwrap();
        assert_eq!(
            (a.created, a.unchanged, a.updated, c.products),
            (1, 1, 1, 2)
        );
        assert_eq!(consistent(&m, &c)["d"], r#"{"y":2}"#);
        let a = m
            .apply(
                &[item("b", 2, r#"{"x":1}"#), item("b", 2, "{}")],
                &[],
                &mut c,
            )
            .unwrap();
        assert_eq!((a.unchanged, a.updated, c.products), (1, 1, 2));
        assert_eq!(consistent(&m, &c)["b"], "{}");
        // Upserted and deleted in one call: the delete wins, with its data.
        let a = m
            .apply(&[item("e", 5, "{}")], &["e".into(), "d".into()], &mut c)
            .unwrap();
        assert_eq!((a.created, a.deleted, c.products), (1, 2, 1));
        assert_eq!(consistent(&m, &c).keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn changes_keep_their_seq_and_new_products_append() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 4).unwrap();
        let m = Mirror::open(&store, "s", "default").unwrap();
        let mut c = Cursor::default();
        let seq = |sku: &str| decode(&m.index().get(sku).unwrap().unwrap()).unwrap().seq;
        m.apply(&[item("b", 2, "{}"), item("a", 1, "{}")], &[], &mut c)
            .unwrap();
        assert_eq!((seq("b"), seq("a")), (1, 2));
        m.apply(&[item("a", 1, r#"{"n":1}"#)], &[], &mut c).unwrap();
        assert_eq!(seq("a"), 2);
        // The largest data key deleted: the next product may take its seq,
        // nothing points at it any more.
        m.apply(&[], &["a".into()], &mut c).unwrap();
        m.apply(&[item("c", 3, "{}"), item("d", 4, "{}")], &[], &mut c)
            .unwrap();
        assert_eq!((seq("c"), seq("d")), (2, 3));
        let all = consistent(&m, &c);
        assert_eq!(all.len(), 3);
        // Export order is first-stored order.
        let order: Vec<sled::IVec> = m.json_values().map(Result::unwrap).collect();
        assert_eq!(order.len(), 3);
        // A stale cursor copy cannot make a new product reuse a live seq:
        // the next seq comes from the data tree, not the cursor.
        let mut stale = Cursor::default();
        m.apply(&[item("e", 5, r#"{"e":1}"#)], &[], &mut stale)
            .unwrap();
        assert_eq!(seq("e"), 4);
        assert_eq!(m.docs.get(seq_key(1)).unwrap().unwrap().as_ref(), b"{}");
    }

    fn encode_layout1(i: &Item) -> Vec<u8> {
        let mut v = vec![LAYOUT1];
        v.extend_from_slice(&content_hash(&i.json).to_be_bytes());
        v.extend_from_slice(&i.id.to_be_bytes());
        v.push(i.updated_at.len() as u8);
        v.extend_from_slice(i.updated_at.as_bytes());
        v.extend_from_slice(&i.json);
        v
    }

    #[test]
    fn migrates_layout1_on_open_and_resumes_a_partial_migration() {
        let dir = tempfile::tempdir().unwrap();
        let items: Vec<Item> = (0..2500)
            .map(|n| {
                item(
                    &format!("sku-{n:05}"),
                    n,
                    &format!(r#"{{"sku":"sku-{n:05}"}}"#),
                )
            })
            .collect();
        {
            let store = Store::open(dir.path(), 4).unwrap();
            // A schema-1 store: products in layout 1, one half-migrated
            // batch (as a crash would leave it), a malformed value.
            let m = Mirror::open(&store, "s", "default").unwrap();
            for i in &items {
                m.index()
                    .insert(i.sku.as_bytes(), encode_layout1(i))
                    .unwrap();
            }
            m.index().insert("broken", &[LAYOUT1, 0, 1][..]).unwrap();
            let other = Mirror::open(&store, "t", "fr").unwrap();
            other
                .index()
                .insert("x", encode_layout1(&item("x", 9, r#"{"x":1}"#)))
                .unwrap();
            let c = Cursor {
                updated_at: Some("2024-01-01 00:00:00".into()),
                products: 2501,
                ..Cursor::default()
            };
            m.save_cursor(&c).unwrap();
            other
                .save_cursor(&Cursor {
                    products: 1,
                    ..Cursor::default()
                })
                .unwrap();
            for (n, i) in items[..300].iter().enumerate() {
                let seq = n as u64 + 1;
                let e = encode(content_hash(&i.json), i.id, seq, &i.updated_at);
                m.docs.insert(seq_key(seq), i.json.as_slice()).unwrap();
                m.index().insert(i.sku.as_bytes(), e).unwrap();
            }
            store
                .meta()
                .insert(b"schema_version", &1u32.to_be_bytes())
                .unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path(), 4).unwrap();
        assert_eq!(
            store
                .meta()
                .get(b"schema_version")
                .unwrap()
                .unwrap()
                .as_ref(),
            crate::store::SCHEMA_VERSION.to_be_bytes()
        );
        let m = Mirror::open(&store, "s", "default").unwrap();
        let c = m.cursor().unwrap();
        assert_eq!(c.updated_at.as_deref(), Some("2024-01-01 00:00:00"));
        let all = consistent(&m, &c);
        assert_eq!(all.len(), items.len());
        for i in &items {
            assert_eq!(all[&i.sku].as_bytes(), i.json.as_slice());
            let v = m.index().get(&i.sku).unwrap().unwrap();
            let e = decode(&v).unwrap();
            assert_eq!((e.id, e.updated_at), (i.id, "2024-01-01 00:00:00"));
        }
        let t = Mirror::open(&store, "t", "fr").unwrap();
        assert_eq!(consistent(&t, &t.cursor().unwrap())["x"], r#"{"x":1}"#);
        // A migrated mirror syncs as usual: unchanged stays unchanged.
        let mut c = c;
        let a = m.apply(&items[..10], &[], &mut c).unwrap();
        assert_eq!(a.unchanged, 10);
    }
}
