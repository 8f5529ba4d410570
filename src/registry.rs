//! The shop registry: records in the `shops` tree, cached in memory for
//! status, and one API client per shop (so a Magento 1 session is reused
//! across probes and syncs).

use crate::config::Config;
use crate::magento::m1::M1Client;
use crate::magento::m2::M2Client;
use crate::magento::{ClientOptions, ProbeInfo, ShopError};
use crate::shop::{Platform, ShopRecord};
use crate::store::{Store, StoreError};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

/// A client for one shop, whichever its platform.
#[derive(Clone)]
pub enum ShopClient {
    M1(M1Client),
    M2(M2Client),
}

impl ShopClient {
    /// Builds the client a record describes.
    pub fn new(rec: &ShopRecord, opts: &ClientOptions) -> Result<ShopClient, ShopError> {
        Ok(match rec.platform {
            Platform::Magento1 => ShopClient::M1(M1Client::from_record(rec, opts)?),
            Platform::Magento2 => ShopClient::M2(M2Client::from_record(rec, opts)?),
        })
    }

    /// One cheap authenticated call that also proves catalog access.
    pub async fn probe(&self, rec: &ShopRecord, timeout: Duration) -> Result<ProbeInfo, ShopError> {
        let fut = async {
            match self {
                ShopClient::M1(c) => c.probe().await,
                ShopClient::M2(c) => {
                    let store = rec.store_codes.first().map_or("default", String::as_str);
                    c.probe(store).await
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ShopError::new(
                crate::magento::FailureKind::Timeout,
                format!("no answer within {}", humantime::format_duration(timeout)),
            )),
        }
    }
}

/// Client options from the configuration.
pub fn client_options(config: &Config) -> ClientOptions {
    ClientOptions {
        timeout: config.sync.request_timeout.max(config.probe.timeout),
        max_body: usize::try_from(config.sync.max_response_mb.saturating_mul(1024 * 1024))
            .unwrap_or(usize::MAX),
        tls_ca_file: None,
    }
}

/// Registered shops.
pub struct Registry {
    store: Store,
    shops: Mutex<BTreeMap<String, ShopRecord>>,
    clients: Mutex<HashMap<String, ShopClient>>,
}

impl Registry {
    /// Loads every record from the `shops` tree.
    pub fn open(store: Store) -> Result<Registry, StoreError> {
        let mut shops = BTreeMap::new();
        for item in store.shops().iter() {
            let (k, v) = item?;
            let rec: ShopRecord = serde_json::from_slice(&v).map_err(|e| {
                StoreError::Corrupt(format!(
                    "shops entry {:?}: {e}",
                    String::from_utf8_lossy(&k)
                ))
            })?;
            shops.insert(rec.name.clone(), rec);
        }
        Ok(Registry {
            store,
            shops: Mutex::new(shops),
            clients: Mutex::new(HashMap::new()),
        })
    }

    fn shops(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ShopRecord>> {
        self.shops.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<String, ShopClient>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every record, by name.
    pub fn list(&self) -> Vec<ShopRecord> {
        self.shops().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<ShopRecord> {
        self.shops().get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.shops().keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.shops().len()
    }

    pub fn is_empty(&self) -> bool {
        self.shops().is_empty()
    }

    /// Stores a record (new or replacing), and forgets the cached client so
    /// the next call uses the new URL/credentials. Call [`Store::flush`]
    /// after.
    pub fn put(&self, rec: ShopRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(&rec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut shops = self.shops();
        self.store.shops().insert(rec.name.as_bytes(), value)?;
        self.clients().remove(&rec.name);
        shops.insert(rec.name.clone(), rec);
        Ok(())
    }

    /// A record as the `shops` tree stores it.
    pub fn encode(rec: &ShopRecord) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(rec).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Takes a record into memory that was stored elsewhere (with its jobs:
    /// [`crate::queue::Queue::register`]).
    pub fn remember(&self, rec: ShopRecord) {
        let mut shops = self.shops();
        self.clients().remove(&rec.name);
        shops.insert(rec.name.clone(), rec);
    }

    /// Forgets a record in memory only (a removal in progress: nothing new
    /// starts for the shop; the stored record goes with its jobs in
    /// [`crate::queue::Queue::unregister`]).
    pub fn forget(&self, name: &str) -> Option<ShopRecord> {
        let mut shops = self.shops();
        self.clients().remove(name);
        shops.remove(name)
    }

    /// The shared client of a shop, built on first use.
    pub fn client(&self, rec: &ShopRecord, opts: &ClientOptions) -> Result<ShopClient, ShopError> {
        if let Some(c) = self.clients().get(&rec.name) {
            return Ok(c.clone());
        }
        let c = ShopClient::new(rec, opts)?;
        self.clients().insert(rec.name.clone(), c.clone());
        Ok(c)
    }

    /// Drops every cached client (after a reload changed timeouts).
    pub fn forget_clients(&self) {
        self.clients().clear();
    }
}
