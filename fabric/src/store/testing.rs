//! Test-only: a store that counts its write transactions and fails them on demand.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use super::redb::RedbStore;
use super::{ReadTxn, Store, StoreError, WriteTxn};

/// [`RedbStore`] whose write transactions are counted (`writes`, the ones that ran) and fail
/// while `fail` is set, and the next `fail_next` ones; a failing write first runs
/// `during_failure`, once (what happens while a transaction is in flight).
pub struct FaultyStore {
    pub inner: RedbStore,
    pub writes: AtomicUsize,
    pub fail: AtomicBool,
    pub fail_next: AtomicUsize,
    pub during_failure: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl FaultyStore {
    pub fn open(dir: &std::path::Path) -> std::sync::Arc<FaultyStore> {
        std::sync::Arc::new(FaultyStore {
            inner: RedbStore::open(dir).unwrap(),
            writes: 0.into(),
            fail: false.into(),
            fail_next: 0.into(),
            during_failure: Mutex::new(None),
        })
    }
}

impl Store for FaultyStore {
    fn read(
        &self,
        f: &mut dyn FnMut(&dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.inner.read(f)
    }
    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn WriteTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let next = self
            .fail_next
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if next || self.fail.load(SeqCst) {
            let hook = self.during_failure.lock().ok().and_then(|mut h| h.take());
            if let Some(hook) = hook {
                hook();
            }
            return Err(StoreError::Backend("injected failure".into()));
        }
        self.writes.fetch_add(1, SeqCst);
        self.inner.write(f)
    }
}
