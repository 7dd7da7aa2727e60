//! Test-only: a store that counts its write transactions and fails them on demand, and counts
//! the rows its transactions read from each table.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use super::redb::RedbStore;
use super::{ReadTxn, Store, StoreError, WriteTxn};

/// [`RedbStore`] whose write transactions are counted (`writes`, the ones that ran) and fail
/// while `fail` is set, and the next `fail_next` ones; a failing write first runs
/// `during_failure`, once (what happens while a transaction is in flight). Every row a read or
/// write transaction reads (`get` that finds one, `scan`) is counted per table ([`Self::rows_read`]):
/// what a test asserts an operation does not read.
pub struct FaultyStore {
    pub inner: RedbStore,
    pub writes: AtomicUsize,
    pub fail: AtomicBool,
    pub fail_next: AtomicUsize,
    pub during_failure: Mutex<Option<Box<dyn Fn() + Send>>>,
    /// Run (taken: once) at the start of the next write transaction, on its thread.
    pub before_write: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    rows: Mutex<BTreeMap<&'static str, usize>>,
    /// The names of the threads transactions ran on ([`Self::threads`]).
    threads: Mutex<std::collections::BTreeSet<String>>,
}

impl FaultyStore {
    pub fn open(dir: &std::path::Path) -> std::sync::Arc<FaultyStore> {
        std::sync::Arc::new(FaultyStore {
            inner: RedbStore::open(dir).unwrap(),
            writes: 0.into(),
            fail: false.into(),
            fail_next: 0.into(),
            during_failure: Mutex::new(None),
            before_write: Mutex::new(None),
            rows: Mutex::new(BTreeMap::new()),
            threads: Mutex::new(Default::default()),
        })
    }

    /// The names of the threads read and write transactions ran on since the store was opened
    /// (or [`Self::reset_threads`]); `?` for a thread without a name.
    pub fn threads(&self) -> std::collections::BTreeSet<String> {
        self.threads.lock().unwrap().clone()
    }

    pub fn reset_threads(&self) {
        self.threads.lock().unwrap().clear();
    }

    fn on_this_thread(&self) {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        self.threads.lock().unwrap().insert(name);
    }

    /// Rows read from `table` since the store was opened (or [`Self::reset_rows_read`]).
    pub fn rows_read(&self, table: &str) -> usize {
        self.rows.lock().unwrap().get(table).copied().unwrap_or(0)
    }

    pub fn reset_rows_read(&self) {
        self.rows.lock().unwrap().clear();
    }
}

/// Adds `n` rows read from `table` to `rows`.
fn count(rows: &Mutex<BTreeMap<&'static str, usize>>, table: &'static str, n: usize) {
    *rows.lock().unwrap().entry(table).or_default() += n;
}

/// A transaction of a [`FaultyStore`]: reads are counted, everything is passed on.
struct Counted<'a, T: ?Sized> {
    tx: &'a mut T,
    rows: &'a Mutex<BTreeMap<&'static str, usize>>,
}

impl<T: ReadTxn + ?Sized> ReadTxn for Counted<'_, T> {
    fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.tx.get(table, key)?;
        count(self.rows, table, usize::from(v.is_some()));
        Ok(v)
    }
    fn scan(
        &self,
        table: &'static str,
        range: (Bound<&str>, Bound<&str>),
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let rows = self.tx.scan(table, range, limit, reverse)?;
        count(self.rows, table, rows.len());
        Ok(rows)
    }
    fn last_key(&self, table: &'static str) -> Result<Option<String>, StoreError> {
        self.tx.last_key(table)
    }
}

impl<T: WriteTxn + ?Sized> WriteTxn for Counted<'_, T> {
    fn put(&mut self, table: &'static str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tx.put(table, key, value)
    }
    fn delete(&mut self, table: &'static str, key: &str) -> Result<bool, StoreError> {
        self.tx.delete(table, key)
    }
}

/// A read view only reads: [`Counted`] over it needs `&mut` for its writes only.
struct ReadOnly<'a>(&'a dyn ReadTxn);

impl ReadTxn for ReadOnly<'_> {
    fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(table, key)
    }
    fn scan(
        &self,
        table: &'static str,
        range: (Bound<&str>, Bound<&str>),
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.0.scan(table, range, limit, reverse)
    }
    fn last_key(&self, table: &'static str) -> Result<Option<String>, StoreError> {
        self.0.last_key(table)
    }
}

impl Store for FaultyStore {
    fn read(
        &self,
        f: &mut dyn FnMut(&dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.on_this_thread();
        let rows = &self.rows;
        self.inner.read(&mut |tx| {
            let mut view = ReadOnly(tx);
            f(&Counted {
                tx: &mut view,
                rows,
            })
        })
    }
    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn WriteTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.on_this_thread();
        let hook = self.before_write.lock().ok().and_then(|mut h| h.take());
        if let Some(hook) = hook {
            hook();
        }
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
        let rows = &self.rows;
        self.inner.write(&mut |tx| f(&mut Counted { tx, rows }))
    }
}
