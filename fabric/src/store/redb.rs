//! The embedded backend: one redb file (`state.redb`) in the controller's state directory.
//! redb is ACID with copy-on-write pages and fsyncs on commit (`Durability::Immediate`, the
//! default), so a committed transaction survives SIGKILL and power loss, and a crash in the
//! middle of a commit leaves the previous state.

use std::ops::Bound;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::{ReadTxn, Store, StoreError, WriteTxn};

pub struct RedbStore {
    db: Database,
}

fn be(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn def(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

impl RedbStore {
    /// Opens (or creates) the store in directory `dir`.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let db = Database::create(dir.join("state.redb")).map_err(be)?;
        Ok(RedbStore { db })
    }
}

fn scan_table<T: ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    range: (Bound<&str>, Bound<&str>),
    limit: usize,
    reverse: bool,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    let range = t.range::<&str>(range).map_err(be)?;
    let mut push = |item: Result<
        (
            redb::AccessGuard<'_, &'static str>,
            redb::AccessGuard<'_, &'static [u8]>,
        ),
        redb::StorageError,
    >|
     -> Result<bool, StoreError> {
        let (k, v) = item.map_err(be)?;
        out.push((k.value().to_string(), v.value().to_vec()));
        Ok(out.len() < limit)
    };
    if reverse {
        for item in range.rev() {
            if !push(item)? {
                break;
            }
        }
    } else {
        for item in range {
            if !push(item)? {
                break;
            }
        }
    }
    Ok(out)
}

/// The greatest key of `t`: redb hands out the value as a guard into its page, which is
/// neither copied nor decoded here.
fn last_key_of<T: ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
) -> Result<Option<String>, StoreError> {
    Ok(t.last().map_err(be)?.map(|(k, _)| k.value().to_string()))
}

struct RTxn(redb::ReadTransaction);

impl ReadTxn for RTxn {
    fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let t = match self.0.open_table(def(table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(be(e)),
        };
        Ok(t.get(key).map_err(be)?.map(|v| v.value().to_vec()))
    }
    fn scan(
        &self,
        table: &'static str,
        range: (Bound<&str>, Bound<&str>),
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let t = match self.0.open_table(def(table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(be(e)),
        };
        scan_table(&t, range, limit, reverse)
    }
    fn last_key(&self, table: &'static str) -> Result<Option<String>, StoreError> {
        let t = match self.0.open_table(def(table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(be(e)),
        };
        last_key_of(&t)
    }
}

struct WTxn(redb::WriteTransaction);

impl ReadTxn for WTxn {
    fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.0.open_table(def(table)).map_err(be)?;
        Ok(t.get(key).map_err(be)?.map(|v| v.value().to_vec()))
    }
    fn scan(
        &self,
        table: &'static str,
        range: (Bound<&str>, Bound<&str>),
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let t = self.0.open_table(def(table)).map_err(be)?;
        scan_table(&t, range, limit, reverse)
    }
    fn last_key(&self, table: &'static str) -> Result<Option<String>, StoreError> {
        let t = self.0.open_table(def(table)).map_err(be)?;
        last_key_of(&t)
    }
}

impl WriteTxn for WTxn {
    fn put(&mut self, table: &'static str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut t = self.0.open_table(def(table)).map_err(be)?;
        t.insert(key, value).map_err(be)?;
        Ok(())
    }
    fn delete(&mut self, table: &'static str, key: &str) -> Result<bool, StoreError> {
        let mut t = self.0.open_table(def(table)).map_err(be)?;
        Ok(t.remove(key).map_err(be)?.is_some())
    }
}

impl Store for RedbStore {
    fn read(
        &self,
        f: &mut dyn FnMut(&dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let tx = RTxn(self.db.begin_read().map_err(be)?);
        f(&tx)
    }

    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn WriteTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut tx = WTxn(self.db.begin_write().map_err(be)?);
        match f(&mut tx) {
            // Durability::Immediate (redb's default): commit returns after fsync.
            Ok(()) => tx.0.commit().map_err(be),
            Err(e) => {
                tx.0.abort().map_err(be)?;
                Err(e)
            }
        }
    }
}
