//! The local mirror of a store view (`products:{shop}:{store}`) and its
//! checkpoint (`cursor`). Owns the value layout and the one operation that
//! changes both: [`Mirror::apply`], which writes a page of products and the
//! checkpoint that covers it in one sled transaction.
//!
//! Value layout (binary, so export can stream the stored JSON untouched):
//! `[1u8 version][8 bytes content hash][8 bytes id BE][1 byte n][n bytes updated_at][the product JSON exactly as the shop sent it]`.

use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::collections::HashMap;

const LAYOUT: u8 = 1;

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

/// A stored product, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<'a> {
    pub hash: u64,
    pub id: i64,
    pub updated_at: &'a str,
    pub json: &'a [u8],
}

/// Content hash of a product's JSON (first 8 bytes of SHA-256).
pub fn content_hash(json: &[u8]) -> u64 {
    let d = Sha256::digest(json);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// Encodes a value for the products tree.
pub fn encode(item: &Item) -> Vec<u8> {
    encode_hashed(item, content_hash(&item.json))
}

fn encode_hashed(item: &Item, hash: u64) -> Vec<u8> {
    let ua = item.updated_at.as_bytes();
    let ua = &ua[..ua.len().min(255)];
    let mut v = Vec::with_capacity(18 + ua.len() + item.json.len());
    v.push(LAYOUT);
    v.extend_from_slice(&hash.to_be_bytes());
    v.extend_from_slice(&item.id.to_be_bytes());
    v.push(ua.len() as u8);
    v.extend_from_slice(ua);
    v.extend_from_slice(&item.json);
    v
}

/// Decodes a stored value; `None` for a value this build cannot read.
pub fn decode(v: &[u8]) -> Option<Stored<'_>> {
    if v.len() < 18 || v[0] != LAYOUT {
        return None;
    }
    let hash = u64::from_be_bytes(v[1..9].try_into().ok()?);
    let id = i64::from_be_bytes(v[9..17].try_into().ok()?);
    let n = v[17] as usize;
    let ua = v.get(18..18 + n)?;
    Some(Stored {
        hash,
        id,
        updated_at: std::str::from_utf8(ua).ok()?,
        json: v.get(18 + n..)?,
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
    /// Magento 1: the shop's clock when this run started. The checkpoint
    /// never moves past it: a product read early and saved again while the
    /// run goes on has an `updated_at` between the two.
    pub shop_clock: Option<String>,
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
    products: sled::Tree,
    key: String,
}

impl Mirror {
    pub fn open(store: &Store, shop: &str, store_code: &str) -> Result<Mirror, StoreError> {
        Ok(Mirror {
            store: store.clone(),
            products: store.products(shop, store_code)?,
            key: cursor_key(shop, store_code),
        })
    }

    /// The products tree (read-only uses: export, reconcile).
    pub fn tree(&self) -> &sled::Tree {
        &self.products
    }

    pub fn cursor(&self) -> Result<Cursor, StoreError> {
        match self.store.cursor().get(self.key.as_bytes())? {
            None => Ok(Cursor::default()),
            Some(v) => serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("cursor {}: {e}", self.key))),
        }
    }

    /// Stores `upserts`, removes `deletes` (SKUs) and writes `cursor`, all or
    /// nothing. `cursor.products` is adjusted by what happened. Unchanged
    /// products (same content hash) are not rewritten.
    ///
    /// The old values are read before the transaction: a sled transaction
    /// holds a database-wide write lock, and reads that miss the cache go to
    /// disk, so reading inside it would stall every other reader (status).
    /// Only the run that owns this store view writes its tree, so what was
    /// read is still what the transaction replaces. Blocking: call it from a
    /// blocking thread in async code (see [`Mirror::apply_blocking`]).
    pub fn apply(
        &self,
        upserts: &[Item],
        deletes: &[String],
        cursor: &mut Cursor,
    ) -> Result<Applied, StoreError> {
        let mut applied = Applied::default();
        let mut writes: Vec<(&str, Vec<u8>)> = Vec::with_capacity(upserts.len());
        // A SKU met twice in one call compares with its pending write.
        let mut pending: HashMap<&str, (usize, u64)> = HashMap::with_capacity(upserts.len());
        for i in upserts {
            let hash = content_hash(&i.json);
            if let Some((at, h)) = pending.get_mut(i.sku.as_str()) {
                if *h == hash {
                    applied.unchanged += 1;
                } else {
                    *h = hash;
                    writes[*at].1 = encode_hashed(i, hash);
                    applied.updated += 1;
                }
                continue;
            }
            match self.products.get(i.sku.as_bytes())? {
                Some(old) if decode(&old).map(|s| s.hash) == Some(hash) => {
                    applied.unchanged += 1;
                }
                old => {
                    if old.is_some() {
                        applied.updated += 1;
                    } else {
                        applied.created += 1;
                    }
                    pending.insert(i.sku.as_str(), (writes.len(), hash));
                    writes.push((i.sku.as_str(), encode_hashed(i, hash)));
                }
            }
        }
        let base = cursor.clone();
        let result = (&self.products, self.store.cursor()).transaction(|(p, c)| {
            let mut deleted = 0;
            for (sku, value) in &writes {
                p.insert(sku.as_bytes(), value.as_slice())?;
            }
            for sku in deletes {
                if p.remove(sku.as_bytes())?.is_some() {
                    deleted += 1;
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
        self.products.len() as u64
    }
}

/// `shop/store`.
pub fn cursor_key(shop: &str, store_code: &str) -> String {
    format!("{shop}/{store_code}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, id: i64, json: &str) -> Item {
        Item {
            sku: sku.into(),
            id,
            updated_at: "2024-01-01 00:00:00".into(),
            json: json.as_bytes().to_vec(),
        }
    }

    #[test]
    fn layout_round_trip() {
        let i = item("a b/ü", 7, r#"{"sku":"a b/ü"}"#);
        let v = encode(&i);
        let s = decode(&v).unwrap();
        assert_eq!(s.id, 7);
        assert_eq!(s.updated_at, "2024-01-01 00:00:00");
        assert_eq!(s.json, i.json.as_slice());
        assert!(decode(&v[..10]).is_none());
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
        let a = m
            .apply(
                &[item("a", 1, "{}"), item("b", 2, r#"{"x":1}"#)],
                &["zz".into()],
                &mut c,
            )
            .unwrap();
        assert_eq!((a.unchanged, a.updated, a.deleted), (1, 1, 0));
        let a = m.apply(&[], &["a".into()], &mut c).unwrap();
        assert_eq!((a.deleted, c.products), (1, 1));
        assert_eq!(m.cursor().unwrap(), c);
        assert_eq!(m.recount(), 1);
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
        assert_eq!(
            decode(&m.tree().get("d").unwrap().unwrap()).unwrap().json,
            br#"{"y":2}"#
        );
        let a = m
            .apply(
                &[item("b", 2, r#"{"x":1}"#), item("b", 2, "{}")],
                &[],
                &mut c,
            )
            .unwrap();
        assert_eq!((a.unchanged, a.updated, c.products), (1, 1, 2));
    }
}
