//! The layout of the control state in sled: every control tree's name and
//! every key encoding, and the transactions that span several trees
//! (registering and unregistering a shop, over [`ControlTrees`]).
//! [`crate::store`] opens the trees by these names (and sits above this
//! module: nothing here knows the store); [`crate::queue`], the run records and `cobbyd
//! check-state` encode and decode keys only through here, so a key format
//! is written down once.
//!
//! | tree | key |
//! | --- | --- |
//! | `shops` | shop name (UTF-8) |
//! | `queue` | `p` + due ms (u64 BE) + seq (u64 BE): pending; `l` + seq (u64 BE): leased |
//! | `health` | shop name |
//! | `runs` | shop name + `/` + run id (u64 BE) |
//! | `meta` | `schema_version`, `run_seq`, `request_seq`, `removing:` + shop name |
//!
//! The mirror's trees (`cursor`, `products:`, `docs:`, `scratch:`) are the
//! mirror's layout ([`crate::mirror`]).

use sled::transaction::{TransactionError, Transactional};

/// name → shop record.
pub const SHOPS: &str = "shops";
/// Pending and leased jobs.
pub const QUEUE: &str = "queue";
/// name → health record.
pub const HEALTH: &str = "health";
/// shop/run id → run record.
pub const RUNS: &str = "runs";
/// The schema version, id sequences, removal markers.
pub const META: &str = "meta";

/// `meta`: the schema version (u32 BE).
pub const SCHEMA_KEY: &[u8] = b"schema_version";
/// `meta`: the last run id (u64 BE).
pub const RUN_SEQ: &[u8] = b"run_seq";
/// `meta`: the last sync request id (u64 BE).
pub const REQUEST_SEQ: &[u8] = b"request_seq";
/// `meta`: prefix of a removal marker.
pub const REMOVING_PREFIX: &[u8] = b"removing:";

/// Where a queue entry sits, as its key says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Pending { due_ms: u64, seq: u64 },
    Leased { seq: u64 },
}

impl Slot {
    /// The key of this slot in the `queue` tree.
    pub fn key(self) -> Vec<u8> {
        match self {
            Slot::Pending { due_ms, seq } => pending_key(due_ms, seq).to_vec(),
            Slot::Leased { seq } => lease_key(seq).to_vec(),
        }
    }

    /// Decodes a `queue` key; `None`: a key of no known shape.
    pub fn decode(k: &[u8]) -> Option<Slot> {
        let u64_at = |at: usize| {
            k.get(at..at + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
        };
        match (k.first(), k.len()) {
            (Some(b'p'), 17) => Some(Slot::Pending {
                due_ms: u64_at(1)?,
                seq: u64_at(9)?,
            }),
            (Some(b'l'), 9) => Some(Slot::Leased { seq: u64_at(1)? }),
            _ => None,
        }
    }
}

/// A pending job's key: in due order, then by seq.
pub fn pending_key(due_ms: u64, seq: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = b'p';
    k[1..9].copy_from_slice(&due_ms.to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// A leased job's key.
pub fn lease_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'l';
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The range of every pending key (in due order).
pub const PENDING_RANGE: std::ops::Range<&[u8]> = b"p".as_slice()..b"q".as_slice();

/// A run record's key: `shop/` + run id (BE), so a shop's runs sort by id.
pub fn run_key(shop: &str, run_id: u64) -> Vec<u8> {
    let mut k = runs_prefix(shop);
    k.extend_from_slice(&run_id.to_be_bytes());
    k
}

/// The prefix of every run key of a shop.
pub fn runs_prefix(shop: &str) -> Vec<u8> {
    format!("{shop}/").into_bytes()
}

/// The shop of a run key; `None`: a key of no known shape.
pub fn run_key_shop(k: &[u8]) -> Option<String> {
    let at = k.len().checked_sub(9)?;
    (k[at] == b'/').then(|| String::from_utf8_lossy(&k[..at]).into_owned())
}

/// `meta` key marking a shop removal whose trees are still to drop; its
/// value is `[1]` with `--purge`, `[0]` without.
pub fn removing_key(shop: &str) -> Vec<u8> {
    let mut k = REMOVING_PREFIX.to_vec();
    k.extend_from_slice(shop.as_bytes());
    k
}

/// (shop, purge) of a removal marker (key and value in `meta`).
pub fn decode_removing(k: &[u8], v: &[u8]) -> Option<(String, bool)> {
    let name = k.strip_prefix(REMOVING_PREFIX)?;
    Some((
        String::from_utf8_lossy(name).into_owned(),
        v.first() == Some(&1),
    ))
}

/// The control trees a multi-tree transaction writes (the store lends
/// them: `Store::control_trees`).
pub struct ControlTrees<'a> {
    pub shops: &'a sled::Tree,
    pub queue: &'a sled::Tree,
    pub health: &'a sled::Tree,
    pub runs: &'a sled::Tree,
    /// The mirror's checkpoints (a purge removes them with the shop).
    pub cursor: &'a sled::Tree,
    pub meta: &'a sled::Tree,
}

fn tx_error(e: TransactionError<()>) -> sled::Error {
    match e {
        TransactionError::Storage(e) => e,
        // The closures below never abort.
        TransactionError::Abort(()) => sled::Error::Unsupported("transaction aborted".into()),
    }
}

/// Registers a shop in one transaction: its record, and its jobs
/// (`remove`: pending keys replaced; `add`: (key, job) to store), so a
/// registered shop always has its jobs and no job outlives its shop.
pub fn register(
    t: &ControlTrees<'_>,
    shop: &str,
    record: &[u8],
    remove: &[Vec<u8>],
    add: &[(Vec<u8>, Vec<u8>)],
) -> Result<(), sled::Error> {
    let r: Result<(), TransactionError<()>> = (t.shops, t.queue).transaction(|(s, q)| {
        s.insert(shop.as_bytes(), record)?;
        for k in remove {
            q.remove(k.as_slice())?;
        }
        for (k, v) in add {
            q.insert(k.as_slice(), v.as_slice())?;
        }
        Ok(())
    });
    r.map_err(tx_error)
}

/// Unregisters a shop in one transaction: its record, the queue keys
/// `jobs`, its health record and runs and, with `purge`, its checkpoints,
/// plus the removal marker for what a transaction cannot do (dropping
/// trees: `Store::finish_removal`). A crash leaves the shop registered
/// with everything, or gone.
pub fn unregister(
    t: &ControlTrees<'_>,
    shop: &str,
    purge: bool,
    jobs: &[sled::IVec],
) -> Result<(), sled::Error> {
    let prefix = runs_prefix(shop);
    let runs: Vec<sled::IVec> = t
        .runs
        .scan_prefix(&prefix)
        .keys()
        .collect::<Result<_, _>>()?;
    let cursors: Vec<sled::IVec> = if purge {
        t.cursor
            .scan_prefix(&prefix)
            .keys()
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let marker = removing_key(shop);
    let r: Result<(), TransactionError<()>> =
        (t.shops, t.queue, t.health, t.runs, t.cursor, t.meta).transaction(|(s, q, h, r, c, m)| {
            s.remove(shop.as_bytes())?;
            h.remove(shop.as_bytes())?;
            for k in jobs {
                q.remove(k)?;
            }
            for k in &runs {
                r.remove(k)?;
            }
            for k in &cursors {
                c.remove(k)?;
            }
            m.insert(marker.as_slice(), &[u8::from(purge)][..])?;
            Ok(())
        });
    r.map_err(tx_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode_to_what_they_encode() {
        for slot in [
            Slot::Pending {
                due_ms: 1_700_000_000_000,
                seq: 7,
            },
            Slot::Leased { seq: u64::MAX },
        ] {
            assert_eq!(Slot::decode(&slot.key()), Some(slot));
        }
        assert_eq!(Slot::decode(b"p123"), None);
        assert_eq!(Slot::decode(b""), None);
        assert!(PENDING_RANGE.contains(&pending_key(u64::MAX, u64::MAX).as_slice()));
        assert!(!PENDING_RANGE.contains(&lease_key(1).as_slice()));
        assert_eq!(run_key_shop(&run_key("a/b", 9)).as_deref(), Some("a/b"));
        assert_eq!(run_key_shop(b"short"), None);
        assert!(run_key("a", 1) < run_key("a", 256));
        let k = removing_key("acme");
        assert_eq!(decode_removing(&k, &[1]), Some(("acme".into(), true)));
        assert_eq!(decode_removing(b"run_seq", &[1]), None);
    }
}
