//! `cobbyd check-state`: checks a state directory offline (the daemon
//! stopped; the store's lock refuses otherwise) against the invariants the
//! daemon keeps, and reports every violation. Operators run it after a
//! crash or a disk incident; the crash soak runs it after every kill.
//!
//! What it checks (see ARCHITECTURE.md, "Checking the state"):
//! - the schema version is the one this build writes;
//! - every shop record parses and is stored under its name;
//! - the queue: every key has a known shape and matches its job, no seq
//!   twice, no job of an unknown shop, at most one pending job per (shop,
//!   kind), and every registered shop has a probe, a sync and a full sync
//!   job, pending or leased (a lease is what a crash leaves of a running
//!   job: the next start requeues it, so it counts);
//! - no health record, run, checkpoint, mirror or scratch tree of a shop
//!   that does not exist, except what the daemon keeps on purpose: the
//!   mirror and checkpoint of a shop removed without `--purge`, and the
//!   trees of a removal a crash interrupted (the next start drops them);
//! - each mirror is consistent ([`crate::mirror::verify`]).

use crate::layout::{self, Slot};
use crate::mirror;
use crate::queue::{self, JobKind};
use crate::shop::ShopRecord;
use crate::store::{Store, StoreError};
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Trees every state directory has.
const FIXED_TREES: [&str; 7] = [
    "__sled__default",
    layout::SHOPS,
    layout::QUEUE,
    layout::HEALTH,
    "cursor",
    layout::RUNS,
    layout::META,
];

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What kind of thing is wrong (`schema`, `shop`, `queue`,
    /// `missing_job`, `duplicate_job`, `orphan`, `mirror`, ...).
    pub kind: &'static str,
    /// What it concerns: a shop, `shop/store`, a tree.
    pub subject: String,
    pub message: String,
}

/// A store view's mirror as found.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorSummary {
    pub shop: String,
    pub store_code: String,
    /// `registered`, `retained` (shop removed without `--purge`) or
    /// `removing` (a removal a crash interrupted).
    pub owner: &'static str,
    pub products: u64,
    pub cursor_updated_at: Option<String>,
    pub cursor_last_id: Option<i64>,
    pub resumable: bool,
    /// The unfinished run's phase, if any (`walk`, `catch_up`, ...).
    pub run_phase: Option<String>,
    /// The `entity_id` ranges a Magento 2 id walk still has to read.
    pub id_ranges: Vec<crate::mirror::IdRange>,
}

/// Everything `check-state` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub state_dir: String,
    pub schema: Option<u32>,
    pub shops: Vec<String>,
    /// Shops with a health record.
    pub health: Vec<String>,
    pub jobs: usize,
    pub leased: usize,
    pub mirrors: Vec<MirrorSummary>,
    /// Broken invariants: any makes `check-state` exit 1.
    pub problems: Vec<Finding>,
    /// Facts worth telling that break nothing (leases the next start
    /// requeues, retained mirrors, ...).
    pub notes: Vec<Finding>,
}

impl Report {
    fn problem(&mut self, kind: &'static str, subject: impl Into<String>, msg: impl Into<String>) {
        self.problems.push(Finding {
            kind,
            subject: subject.into(),
            message: msg.into(),
        });
    }

    fn note(&mut self, kind: &'static str, subject: impl Into<String>, msg: impl Into<String>) {
        self.notes.push(Finding {
            kind,
            subject: subject.into(),
            message: msg.into(),
        });
    }

    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks an open store. Reads only.
pub fn check(store: &Store) -> Result<Report, StoreError> {
    let mut r = Report {
        state_dir: store.dir().display().to_string(),
        ..Report::default()
    };

    // Schema.
    r.schema = store.schema_version()?;
    let current = match r.schema {
        Some(v) if v == crate::store::SCHEMA_VERSION => true,
        Some(v) => {
            r.problem(
                "schema",
                "meta",
                format!(
                    "schema {v}, this build writes {}: the next `cobbyd run` migrates it; mirrors not checked",
                    crate::store::SCHEMA_VERSION
                ),
            );
            false
        }
        None => {
            r.problem("schema", "meta", "no schema version recorded");
            false
        }
    };

    // Shops.
    let mut shops: BTreeMap<String, ShopRecord> = BTreeMap::new();
    for kv in store.shops().iter() {
        let (k, v) = kv?;
        let key = String::from_utf8_lossy(&k).into_owned();
        match serde_json::from_slice::<ShopRecord>(&v) {
            Ok(rec) if rec.name == key => {
                shops.insert(key, rec);
            }
            Ok(rec) => r.problem(
                "shop",
                key.clone(),
                format!("the record under {key:?} is named {:?}", rec.name),
            ),
            Err(e) => r.problem("shop", key, format!("the record does not parse: {e}")),
        }
    }
    r.shops = shops.keys().cloned().collect();
    let known = |s: &str| shops.contains_key(s);
    let removing: HashMap<String, bool> = store.pending_removals()?.into_iter().collect();
    for (shop, purge) in &removing {
        if known(shop) {
            r.problem(
                "removal",
                shop.clone(),
                "a removal marker for a registered shop (the next start would drop its scratch trees)",
            );
        } else {
            r.note(
                "removal",
                shop.clone(),
                format!(
                    "removal{} interrupted by a crash: the next start drops what is left",
                    if *purge { " --purge" } else { "" }
                ),
            );
        }
    }

    // Queue.
    let mut seqs: HashMap<u64, usize> = HashMap::new();
    let mut pending: HashMap<(String, JobKind), usize> = HashMap::new();
    let mut leased: HashMap<(String, JobKind), usize> = HashMap::new();
    let mut orphan_jobs: BTreeMap<String, usize> = BTreeMap::new();
    for e in queue::raw_entries(store)? {
        r.jobs += 1;
        let subject = format!("queue {:02x?}", &e.key[..e.key.len().min(17)]);
        let job = match e.job {
            Ok(j) => j,
            Err(err) => {
                r.problem("queue", subject, format!("the job does not parse: {err}"));
                continue;
            }
        };
        let key_ok = match e.slot {
            None => {
                r.problem(
                    "queue",
                    subject.clone(),
                    format!("a key of no known shape holds job {}", job.seq),
                );
                continue;
            }
            Some(Slot::Pending { due_ms, seq }) => due_ms == job.due_ms && seq == job.seq,
            Some(Slot::Leased { seq }) => seq == job.seq,
        };
        if !key_ok {
            r.problem(
                "queue",
                subject,
                format!(
                    "the key does not match its job (seq {}, due {})",
                    job.seq, job.due_ms
                ),
            );
        }
        *seqs.entry(job.seq).or_default() += 1;
        if !known(&job.shop) {
            *orphan_jobs.entry(job.shop.clone()).or_default() += 1;
            continue;
        }
        match e.slot {
            Some(Slot::Leased { .. }) => {
                r.leased += 1;
                *leased.entry((job.shop, job.kind)).or_default() += 1;
            }
            _ => *pending.entry((job.shop, job.kind)).or_default() += 1,
        }
    }
    for (seq, n) in seqs {
        if n > 1 {
            r.problem(
                "queue",
                format!("seq {seq}"),
                format!("{n} jobs share seq {seq}"),
            );
        }
    }
    for (shop, n) in orphan_jobs {
        r.problem(
            "orphan",
            shop.clone(),
            format!("{n} job(s) of {shop:?}, which is not registered"),
        );
    }
    for name in shops.keys() {
        for kind in [JobKind::Probe, JobKind::Sync, JobKind::FullSync] {
            let key = (name.clone(), kind);
            let p = pending.get(&key).copied().unwrap_or(0);
            let l = leased.get(&key).copied().unwrap_or(0);
            if p > 1 {
                r.problem(
                    "duplicate_job",
                    name.clone(),
                    format!("{p} pending {} jobs (at most one may be)", kind.as_str()),
                );
            }
            if p + l == 0 {
                r.problem(
                    "missing_job",
                    name.clone(),
                    format!("no {} job, pending or leased", kind.as_str()),
                );
            }
        }
    }
    if r.leased > 0 {
        r.note(
            "leased",
            "queue",
            format!(
                "{} leased job(s): left running by a crash; the next start requeues them",
                r.leased
            ),
        );
    }

    // Health and runs of unknown shops.
    for k in store.health().iter().keys() {
        let k = k?;
        let shop = String::from_utf8_lossy(&k).into_owned();
        if !known(&shop) {
            r.problem(
                "orphan",
                shop.clone(),
                format!("a health record of {shop:?}, which is not registered"),
            );
        }
        r.health.push(shop);
    }
    let mut orphan_runs: BTreeMap<String, usize> = BTreeMap::new();
    for k in store.runs().iter().keys() {
        let k = k?;
        let shop = match layout::run_key_shop(&k) {
            Some(shop) => shop,
            None => {
                r.problem(
                    "runs",
                    format!("{:?}", String::from_utf8_lossy(&k)),
                    "a run key of no known shape",
                );
                continue;
            }
        };
        if !known(&shop) {
            *orphan_runs.entry(shop).or_default() += 1;
        }
    }
    for (shop, n) in orphan_runs {
        r.problem(
            "orphan",
            shop.clone(),
            format!("{n} run record(s) of {shop:?}, which is not registered"),
        );
    }

    // Mirrors: every (shop, store) with a checkpoint or a tree.
    let mut views: BTreeSet<(String, String)> = BTreeSet::new();
    for k in store.cursor().iter().keys() {
        let k = k?;
        let key = String::from_utf8_lossy(&k).into_owned();
        match key.split_once('/') {
            Some((s, c)) => {
                views.insert((s.to_string(), c.to_string()));
            }
            None => r.problem("cursor", key, "a checkpoint key of no known shape"),
        }
    }
    for name in store.tree_names() {
        if FIXED_TREES.contains(&name.as_str()) {
            continue;
        }
        let parts: Vec<&str> = name.split(':').collect();
        match parts.as_slice() {
            ["products" | "docs", shop, code] => {
                views.insert((shop.to_string(), code.to_string()));
            }
            ["scratch", "seen" | "refetch", shop, _] => {
                if !known(shop) && !removing.contains_key(*shop) {
                    r.problem(
                        "orphan",
                        name.clone(),
                        format!("a scratch tree of {shop:?}, which is not registered"),
                    );
                }
            }
            _ => r.note("tree", name.clone(), "a tree this build does not use"),
        }
    }
    for (shop, code) in views {
        let subject = format!("{shop}/{code}");
        let owner = if known(&shop) {
            "registered"
        } else if removing.contains_key(&shop) {
            "removing"
        } else {
            "retained"
        };
        if !current {
            continue;
        }
        let v = mirror::verify(store, &shop, &code)?;
        match owner {
            "removing" => {
                if removing.get(&shop) == Some(&true) && v.cursor.is_some() {
                    r.problem(
                        "orphan",
                        subject.clone(),
                        "the checkpoint of a shop removed with --purge (it goes in the removal's transaction)",
                    );
                }
            }
            "retained" if v.cursor.is_none() => {
                if v.entries + v.docs > 0 {
                    r.problem(
                        "orphan",
                        subject.clone(),
                        format!(
                            "a mirror of {shop:?}, which is not registered, without a checkpoint ({} products)",
                            v.entries
                        ),
                    );
                } else {
                    r.note(
                        "empty_tree",
                        subject.clone(),
                        "empty mirror trees of a shop that is not registered (harmless)",
                    );
                }
                continue;
            }
            "retained" => r.note(
                "retained",
                subject.clone(),
                format!(
                    "mirror of {shop:?} kept by `shop remove` without --purge ({} products): adding the shop again resumes it",
                    v.entries
                ),
            ),
            _ => {
                if let Some(rec) = shops.get(&shop)
                    && !rec.store_codes.contains(&code)
                {
                    r.note(
                        "retained",
                        subject.clone(),
                        format!(
                            "store view {code:?} is not mirrored by {shop:?} (kept from an earlier registration)"
                        ),
                    );
                }
            }
        }
        if owner != "removing" {
            for p in &v.problems {
                r.problem("mirror", subject.clone(), p.clone());
            }
            for n in &v.notes {
                r.note("mirror", subject.clone(), n.clone());
            }
        }
        r.mirrors.push(MirrorSummary {
            shop: shop.clone(),
            store_code: code.clone(),
            owner,
            products: v.entries,
            cursor_updated_at: v.cursor.as_ref().and_then(|c| c.updated_at.clone()),
            cursor_last_id: v.cursor.as_ref().map(|c| c.last_id),
            resumable: v.cursor.as_ref().is_some_and(|c| c.run.is_some()),
            run_phase: v
                .cursor
                .as_ref()
                .and_then(|c| c.run.as_ref())
                .map(|r| r.phase.clone()),
            id_ranges: v
                .cursor
                .as_ref()
                .and_then(|c| c.run.as_ref())
                .map(|r| r.ranges.clone())
                .unwrap_or_default(),
        });
    }
    Ok(r)
}

/// `cobbyd check-state [--json]`: 0 consistent, 1 problems found, 2 the
/// state cannot be checked (in use by a running daemon, missing, newer).
pub fn run(config_path: Option<&std::path::Path>, as_json: bool) -> u8 {
    let cfg = match crate::config::load(config_path) {
        Ok(l) => l.config,
        Err(e) => {
            eprintln!("{e}");
            return crate::daemon::EX_CONFIG;
        }
    };
    let dir = &cfg.daemon.state_dir;
    let store = match Store::open_existing(dir, cfg.daemon.cache_mb) {
        Ok(s) => s,
        Err(StoreError::Locked { pid, .. }) => {
            eprintln!(
                "cobbyd check-state: {} is in use by a running cobbyd (pid {pid}); check-state reads the state offline: stop the daemon first (systemctl stop cobbyd)",
                dir.display()
            );
            return 2;
        }
        Err(e) => {
            eprintln!("cobbyd check-state: {e}");
            return 2;
        }
    };
    let report = match check(&store) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cobbyd check-state: {}: reading failed: {e}", dir.display());
            return 2;
        }
    };
    if as_json {
        let mut v =
            serde_json::to_value(&report).unwrap_or_else(|e| json!({"error": e.to_string()}));
        v["ok"] = json!(report.ok());
        println!("{v:#}");
    } else {
        print!("{}", render(&report));
    }
    u8::from(!report.ok())
}

/// The report for people.
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "{}: schema {}, {} shop(s), {} job(s) ({} leased), {} mirror(s)\n",
        r.state_dir,
        r.schema.map_or("none".to_string(), |v| v.to_string()),
        r.shops.len(),
        r.jobs,
        r.leased,
        r.mirrors.len()
    );
    for m in &r.mirrors {
        out += &format!(
            "  mirror {}/{} ({}): {} products, checkpoint {}{}\n",
            m.shop,
            m.store_code,
            m.owner,
            m.products,
            m.cursor_updated_at.as_deref().unwrap_or("none"),
            if m.resumable { ", run to resume" } else { "" }
        );
    }
    for n in &r.notes {
        out += &format!("note: {} ({}): {}\n", n.subject, n.kind, n.message);
    }
    for p in &r.problems {
        out += &format!("PROBLEM: {} ({}): {}\n", p.subject, p.kind, p.message);
    }
    if r.ok() {
        out += "OK: every invariant holds\n";
    } else {
        out += &format!("{} problem(s) found\n", r.problems.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::{Cursor, Item, Mirror, RunCursor};
    use crate::queue::Queue;
    use crate::shop::{AuthMode, Credentials, Platform};

    fn record(name: &str) -> Vec<u8> {
        crate::registry::Registry::encode(&ShopRecord {
            name: name.into(),
            platform: Platform::Magento2,
            url: "http://x".into(),
            store_codes: vec!["default".into()],
            auth: AuthMode::Bearer,
            credentials: Credentials::M2Bearer {
                access_token: crate::secret::Secret::new("t"),
            },
            created_at: String::new(),
            updated_at: String::new(),
            allow_insecure_http: true,
            tls_ca_file: None,
        })
        .unwrap()
    }

    fn item(n: i64, ts: &str) -> Item {
        Item {
            sku: format!("sku-{n}"),
            id: n,
            updated_at: ts.into(),
            json: format!(r#"{{"sku":"sku-{n}","id":{n}}}"#).into_bytes(),
        }
    }

    const JOBS: [(JobKind, u64); 3] = [
        (JobKind::Probe, 10),
        (JobKind::Sync, 20),
        (JobKind::FullSync, 30),
    ];

    /// A consistent state: shop `a` with its jobs, a mirror of 10 products
    /// in the middle of a catch-up.
    fn state() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 4).unwrap();
        let (q, _) = Queue::open(s.clone()).unwrap();
        q.register("a", &record("a"), &JOBS).unwrap();
        let m = Mirror::open(&s, "a", "default").unwrap();
        let items: Vec<Item> = (1..=10).map(|n| item(n, "2024-01-01 00:00:00")).collect();
        let mut c = Cursor {
            updated_at: Some("2024-01-01 00:00:00".into()),
            last_id: 10,
            run: Some(RunCursor {
                run_id: 1,
                phase: "catch_up".into(),
                ..RunCursor::default()
            }),
            ..Cursor::default()
        };
        m.apply(&items, &[], &mut c).unwrap();
        s.health().insert("a", "{}").unwrap();
        (dir, s)
    }

    fn kinds(r: &Report) -> Vec<(&'static str, String)> {
        r.problems
            .iter()
            .map(|p| (p.kind, p.subject.clone()))
            .collect()
    }

    #[test]
    fn a_consistent_state_passes() {
        let (_d, s) = state();
        let r = check(&s).unwrap();
        assert!(r.ok(), "{}", render(&r));
        assert_eq!(r.shops, ["a"]);
        assert_eq!(r.jobs, 3);
        assert_eq!(r.mirrors.len(), 1);
        assert_eq!(r.mirrors[0].products, 10);
        assert_eq!(
            r.mirrors[0].cursor_updated_at.as_deref(),
            Some("2024-01-01 00:00:00")
        );
    }

    #[test]
    fn mirror_corruption_is_reported() {
        let (_d, s) = state();
        let m = Mirror::open(&s, "a", "default").unwrap();
        // An index entry lost: its data is orphaned, the count is off, and
        // the checkpoint's product (id 10) is gone.
        m.index().remove("sku-10").unwrap();
        let r = check(&s).unwrap();
        let text = render(&r);
        assert!(!r.ok(), "{text}");
        assert!(
            text.contains("data keys no index entry points at"),
            "{text}"
        );
        assert!(
            text.contains("the checkpoint counts 10 products, the index holds 9"),
            "{text}"
        );
        assert!(text.contains("no product with id 10 is stored"), "{text}");
        assert!(
            r.problems.iter().all(|p| p.subject == "a/default"),
            "{text}"
        );
    }

    #[test]
    fn dangling_entry_and_wrong_data_are_reported() {
        let (_d, s) = state();
        let (_, docs) = s.mirror_trees("a", "default").unwrap();
        docs.remove(1u64.to_be_bytes()).unwrap();
        docs.insert(2u64.to_be_bytes(), "{}").unwrap();
        let text = render(&check(&s).unwrap());
        assert!(
            text.contains("1 index entries without their data: sku-1"),
            "{text}"
        );
        assert!(
            text.contains("does not match their content hash: sku-2"),
            "{text}"
        );
    }

    #[test]
    fn queue_problems_are_reported() {
        let (_d, s) = state();
        // A second pending probe (a key the queue would never write).
        let dup = crate::queue::Job {
            seq: 99,
            shop: "a".into(),
            kind: JobKind::Probe,
            due_ms: 5,
        };
        let mut k = vec![b'p'];
        k.extend_from_slice(&5u64.to_be_bytes());
        k.extend_from_slice(&99u64.to_be_bytes());
        s.queue()
            .insert(k, serde_json::to_vec(&dup).unwrap())
            .unwrap();
        // The full sync job lost.
        let full = queue::raw_entries(&s)
            .unwrap()
            .into_iter()
            .find(|e| e.job.as_ref().unwrap().kind == JobKind::FullSync)
            .unwrap();
        s.queue().remove(full.key).unwrap();
        let r = check(&s).unwrap();
        assert_eq!(
            kinds(&r),
            [
                ("duplicate_job", "a".to_string()),
                ("missing_job", "a".to_string())
            ],
            "{}",
            render(&r)
        );
        assert!(r.problems[0].message.contains("2 pending probe jobs"));
        assert!(r.problems[1].message.contains("no full_sync job"));
    }

    #[test]
    fn a_leased_job_counts_and_is_noted() {
        let (_d, s) = state();
        let (q, _) = Queue::open(s.clone()).unwrap();
        let j = q.lease_due(u64::MAX).unwrap().unwrap();
        assert_eq!(j.kind, JobKind::Probe);
        let r = check(&s).unwrap();
        assert!(r.ok(), "{}", render(&r));
        assert_eq!(r.leased, 1);
        assert!(r.notes.iter().any(|n| n.kind == "leased"));
    }

    #[test]
    fn leftovers_of_unknown_shops_are_orphans() {
        let (_d, s) = state();
        let (q, _) = Queue::open(s.clone()).unwrap();
        q.schedule("ghost", JobKind::Probe, 1).unwrap();
        s.health().insert("ghost", "{}").unwrap();
        let mut run = b"ghost/".to_vec();
        run.extend_from_slice(&7u64.to_be_bytes());
        s.runs().insert(run, "{}").unwrap();
        s.scratch("seen:ghost:default")
            .unwrap()
            .insert("x", "")
            .unwrap();
        // Mirror data without a checkpoint.
        let (ix, _) = s.mirror_trees("ghost", "default").unwrap();
        ix.insert("x", "y").unwrap();
        let r = check(&s).unwrap();
        let got = kinds(&r);
        assert_eq!(
            got.iter().filter(|(k, _)| *k == "orphan").count(),
            5,
            "{}",
            render(&r)
        );
        assert_eq!(got.len(), 5, "{}", render(&r));
    }

    #[test]
    fn removal_leaves_nothing_or_a_retained_mirror() {
        for purge in [false, true] {
            let (_d, s) = state();
            let (q, _) = Queue::open(s.clone()).unwrap();
            s.scratch("seen:a:default")
                .unwrap()
                .insert("x", "")
                .unwrap();
            assert_eq!(q.unregister("a", purge).unwrap(), 3);
            // Interrupted before the trees were dropped: noted, not wrong.
            let r = check(&s).unwrap();
            assert!(r.ok(), "purge {purge}: {}", render(&r));
            assert!(r.notes.iter().any(|n| n.kind == "removal"));
            s.finish_removal_blocking("a", purge).unwrap();
            let r = check(&s).unwrap();
            assert!(r.ok(), "purge {purge}: {}", render(&r));
            assert!(s.pending_removals().unwrap().is_empty());
            assert!(!s.tree_names().iter().any(|n| n.starts_with("scratch:")));
            if purge {
                assert!(r.mirrors.is_empty(), "{}", render(&r));
                assert!(!s.tree_names().iter().any(|n| n.contains(":a:")));
            } else {
                assert_eq!(r.mirrors[0].owner, "retained");
                assert_eq!(r.mirrors[0].products, 10);
            }
        }
    }

    #[test]
    fn an_older_schema_and_a_running_daemon_are_told() {
        let (d, s) = state();
        s.meta()
            .insert(b"schema_version", &1u32.to_be_bytes())
            .unwrap();
        let r = check(&s).unwrap();
        assert_eq!(kinds(&r), [("schema", "meta".to_string())]);
        let err = Store::open_existing(d.path(), 4).err().unwrap();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        drop(s);
        let missing = tempfile::tempdir().unwrap();
        let err = Store::open_existing(&missing.path().join("state"), 4)
            .err()
            .unwrap();
        assert!(err.to_string().contains("no cobbyd database"), "{err}");
        assert!(!missing.path().join("state").exists());
    }

    /// Regressions of the removal races: a probe ending after its shop was
    /// removed wrote a health record for nobody; a job of a shop being
    /// removed lost its lease before the record went (a crash in between
    /// left a registered shop without that job).
    #[test]
    fn writes_racing_a_removal_leave_nothing_behind() {
        let (_d, s) = state();
        let (q, _) = Queue::open(s.clone()).unwrap();
        let j = q.lease_due(u64::MAX).unwrap().unwrap();
        // The shop is forgotten in memory: the job ends with no next run,
        // but the record is still stored, so the lease stays.
        q.complete(&j, None).unwrap();
        let r = check(&s).unwrap();
        assert!(r.ok(), "{}", render(&r));
        assert_eq!(r.leased, 1);
        q.unregister("a", true).unwrap();
        s.finish_removal_blocking("a", true).unwrap();
        let book = crate::probe::HealthBook::open(s.clone()).unwrap();
        book.put("a", &crate::health::HealthRecord::default())
            .unwrap();
        let r = check(&s).unwrap();
        assert!(r.ok(), "{}", render(&r));
        assert!(r.health.is_empty() && r.jobs == 0 && r.mirrors.is_empty());
    }
}
