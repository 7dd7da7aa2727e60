//! The controller's durable state, behind a small transactional key-value interface.
//!
//! [`Store`] is what the controller (and any module that keeps state in it, such as circuits)
//! talks to: named tables of string keys and byte values, read and written inside atomic
//! transactions. A write transaction's changes are durable (fsync) before [`transaction`]
//! returns, so anything the controller answers as done survives a crash. The embedded backend
//! is [`redb::RedbStore`]; the interface maps one-to-one onto etcd (a table is a key prefix,
//! a transaction is an etcd `Txn` guarded on the read revisions), so several controllers can
//! share one store later.
//!
//! Modules add their own tables by declaring a [`Table`] constant with their record type; they
//! join the same transactions as everything else, so a change that touches topology, circuits
//! and the audit log commits or aborts as one.

pub mod redb;
#[cfg(test)]
pub(crate) mod testing;

use std::marker::PhantomData;
use std::ops::Bound;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why the store refused or failed. Backend errors keep their message only: the caller cannot
/// act on the backend's internals, the operator can read them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store backend: {0}")]
    Backend(String),
    #[error("store record {table}/{key} is corrupt: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error("transaction aborted")]
    Aborted,
    #[error("store directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The store's file could not be opened: `problem` says why and what the operator can do.
    #[error("store {path}: {problem}")]
    Open { path: String, problem: String },
    /// The store's records are of a schema this build does not know ([`check_schema`]).
    #[error(
        "the store holds records of schema {found}, written by a newer Tasman; this build \
         reads schema {supported} and older: run the newer build (a downgrade would rewrite \
         records without the fields it does not know), or restore a backup taken before the \
         upgrade"
    )]
    Schema { found: u64, supported: u64 },
}

/// The schema of the records this build writes. It goes up whenever a record gains, loses or
/// changes a field (a JSON record decodes without fields it does not know, and a rewrite would
/// drop them): a build refuses a store of a newer schema rather than lose what it cannot read.
/// A store with no stamp was written before the stamp existed, which is schema 1.
/// Schema 2: a circuit's `created_with` (the request its idempotency key was first used with).
pub const SCHEMA: u64 = 2;

/// Where the schema stamp lives.
const STORE_META: Table<u64> = Table::new("store_meta");
const SCHEMA_KEY: &str = "schema";

/// Checks the store's schema stamp before anything reads a record: a store of a newer schema
/// is refused ([`StoreError::Schema`]); a store without a stamp (new, or written before stamps
/// existed) or of an older schema is stamped [`SCHEMA`], in a transaction of its own, so that
/// an older build refuses it from then on (this build reads every older record; an older build
/// would rewrite this build's without their new fields). A store of this schema is not written.
/// Every backend's `open` calls it.
pub fn check_schema(store: &dyn Store) -> Result<(), StoreError> {
    let stamp = |tx: &dyn ReadTxn| STORE_META.get(tx, SCHEMA_KEY);
    let refuse = |found: u64| {
        Err(StoreError::Schema {
            found,
            supported: SCHEMA,
        })
    };
    match read(store, stamp)? {
        Some(found) if found > SCHEMA => refuse(found),
        Some(SCHEMA) => Ok(()),
        _ => transaction(store, |tx| match stamp(tx)? {
            // Stamped in between by another writer: check that one.
            Some(found) if found > SCHEMA => refuse(found),
            Some(SCHEMA) => Ok(()),
            _ => STORE_META.put(tx, SCHEMA_KEY, &SCHEMA),
        }),
    }
}

/// Reads inside a transaction (a consistent view).
pub trait ReadTxn {
    fn get(&self, table: &'static str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` entries of `table` whose keys are in `range` (lower and upper bound), in
    /// key order from the lower end (or in reverse key order from the upper end when
    /// `reverse`). Only those entries are read: bound both ends to read a key prefix.
    fn scan(
        &self,
        table: &'static str,
        range: (Bound<&str>, Bound<&str>),
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// The greatest key of `table` (`None` when it is empty), without its value: a table keyed
    /// by [`seq_key`] gives its next number so without reading, let alone decoding, its newest
    /// record (a topology version's is megabytes of YAML).
    fn last_key(&self, table: &'static str) -> Result<Option<String>, StoreError>;
}

/// Reads and writes inside an atomic write transaction.
pub trait WriteTxn: ReadTxn {
    fn put(&mut self, table: &'static str, key: &str, value: &[u8]) -> Result<(), StoreError>;
    fn delete(&mut self, table: &'static str, key: &str) -> Result<bool, StoreError>;
}

/// A transactional store. Implementations: embedded [`redb::RedbStore`]; an etcd backend
/// would implement the same two methods.
pub trait Store: Send + Sync + 'static {
    /// Runs `f` on a consistent read view.
    fn read(
        &self,
        f: &mut dyn FnMut(&dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    /// Runs `f` in a write transaction: when `f` returns `Ok` the changes are committed and
    /// durable before `write` returns; when it returns `Err` nothing is changed.
    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn WriteTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
}

/// Runs `f` in one atomic, durable write transaction and returns its value. An `Err` from `f`
/// aborts the transaction (nothing is written) and is returned as is.
pub fn transaction<S, R, E>(
    store: &S,
    f: impl FnOnce(&mut dyn WriteTxn) -> Result<R, E>,
) -> Result<R, E>
where
    S: Store + ?Sized,
    E: From<StoreError>,
{
    let mut f = Some(f);
    let mut out: Option<Result<R, E>> = None;
    let res = store.write(&mut |tx| {
        let f = f.take().ok_or(StoreError::Aborted)?;
        match f(tx) {
            Ok(v) => {
                out = Some(Ok(v));
                Ok(())
            }
            Err(e) => {
                out = Some(Err(e));
                Err(StoreError::Aborted)
            }
        }
    });
    match (res, out) {
        (_, Some(Err(e))) => Err(e),
        (Ok(()), Some(Ok(v))) => Ok(v),
        (Err(e), _) => Err(e.into()),
        (Ok(()), None) => Err(StoreError::Aborted.into()),
    }
}

/// Runs `f` on a consistent read view and returns its value.
pub fn read<S, R, E>(store: &S, f: impl FnOnce(&dyn ReadTxn) -> Result<R, E>) -> Result<R, E>
where
    S: Store + ?Sized,
    E: From<StoreError>,
{
    let mut f = Some(f);
    let mut out: Option<Result<R, E>> = None;
    let res = store.read(&mut |tx| {
        let f = f.take().ok_or(StoreError::Aborted)?;
        out = Some(f(tx));
        Ok(())
    });
    match (res, out) {
        (_, Some(r)) => r,
        (Err(e), None) => Err(e.into()),
        (Ok(()), None) => Err(StoreError::Aborted.into()),
    }
}

/// A table of typed records (JSON-encoded values). Declare one as a constant next to the
/// record type: `pub const CIRCUITS: Table<Circuit> = Table::new("circuits");`.
pub struct Table<V> {
    pub name: &'static str,
    _v: PhantomData<fn() -> V>,
}

impl<V> Clone for Table<V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for Table<V> {}

impl<V: Serialize + DeserializeOwned> Table<V> {
    pub const fn new(name: &'static str) -> Self {
        Table {
            name,
            _v: PhantomData,
        }
    }

    fn decode(&self, key: &str, bytes: &[u8]) -> Result<V, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            table: self.name,
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    pub fn get(&self, tx: &dyn ReadTxn, key: &str) -> Result<Option<V>, StoreError> {
        tx.get(self.name, key)?
            .map(|b| self.decode(key, &b))
            .transpose()
    }

    pub fn put(&self, tx: &mut dyn WriteTxn, key: &str, value: &V) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| StoreError::Backend(format!("encode {}: {e}", self.name)))?;
        tx.put(self.name, key, &bytes)
    }

    pub fn delete(&self, tx: &mut dyn WriteTxn, key: &str) -> Result<bool, StoreError> {
        tx.delete(self.name, key)
    }

    /// All records in key order.
    pub fn all(&self, tx: &dyn ReadTxn) -> Result<Vec<(String, V)>, StoreError> {
        self.scan(tx, (Bound::Unbounded, Bound::Unbounded), usize::MAX, false)
    }

    /// [`ReadTxn::scan`], decoded.
    pub fn scan(
        &self,
        tx: &dyn ReadTxn,
        range: (Bound<&str>, Bound<&str>),
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(String, V)>, StoreError> {
        tx.scan(self.name, range, limit, reverse)?
            .into_iter()
            .map(|(k, b)| {
                let v = self.decode(&k, &b)?;
                Ok((k, v))
            })
            .collect()
    }

    /// The record with the greatest key.
    pub fn last(&self, tx: &dyn ReadTxn) -> Result<Option<(String, V)>, StoreError> {
        Ok(self
            .scan(tx, (Bound::Unbounded, Bound::Unbounded), 1, true)?
            .into_iter()
            .next())
    }

    /// The number of the greatest key of a table keyed by [`seq_key`] (`None`: empty), from
    /// the key alone: the record is neither read nor decoded.
    pub fn last_seq(&self, tx: &dyn ReadTxn) -> Result<Option<u64>, StoreError> {
        let Some(key) = tx.last_key(self.name)? else {
            return Ok(None);
        };
        match key.parse() {
            Ok(n) => Ok(Some(n)),
            Err(_) => Err(StoreError::Corrupt {
                table: self.name,
                key,
                reason: "not a sequence number".into(),
            }),
        }
    }
}

/// A key for a sequence number that sorts numerically (`00000000000000000042`).
pub fn seq_key(n: u64) -> String {
    format!("{n:020}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Table<String> = Table::new("t");

    #[test]
    fn aborted_transaction_writes_nothing_and_committed_one_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = redb::RedbStore::open(dir.path()).unwrap();
            transaction(&s, |tx| -> Result<(), StoreError> {
                T.put(tx, &seq_key(1), &"one".to_string())
            })
            .unwrap();
            let r: Result<(), StoreError> = transaction(&s, |tx| {
                T.put(tx, &seq_key(2), &"two".to_string())?;
                Err(StoreError::Backend("refused".into()))
            });
            assert!(r.is_err());
        }
        let s = redb::RedbStore::open(dir.path()).unwrap();
        let all = read(&s, |tx| T.all(tx)).unwrap();
        assert_eq!(all, vec![(seq_key(1), "one".to_string())]);
        let last = read(&s, |tx| T.last(tx)).unwrap();
        assert_eq!(last.map(|(_, v)| v), Some("one".to_string()));
        assert_eq!(read(&s, |tx| T.last_seq(tx)).unwrap(), Some(1));
        let missing: Table<u64> = Table::new("never-written");
        assert!(read(&s, |tx| missing.all(tx)).unwrap().is_empty());
        assert_eq!(read(&s, |tx| missing.last_seq(tx)).unwrap(), None);
    }

    #[test]
    fn scan_in_reverse_returns_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = redb::RedbStore::open(dir.path()).unwrap();
        transaction(&s, |tx| -> Result<(), StoreError> {
            for i in 1..=10u64 {
                T.put(tx, &seq_key(i), &i.to_string())?;
            }
            Ok(())
        })
        .unwrap();
        let k5 = seq_key(5);
        let newest = read(&s, |tx| {
            T.scan(tx, (Bound::Unbounded, Bound::Included(&k5)), 3, true)
        })
        .unwrap();
        let vals: Vec<_> = newest.into_iter().map(|(_, v)| v).collect();
        assert_eq!(vals, vec!["5", "4", "3"]);
        // Bounded at both ends: only the entries in the range, from either end.
        let (k3, k7) = (seq_key(3), seq_key(7));
        let range = (Bound::Excluded(k3.as_str()), Bound::Excluded(k7.as_str()));
        let keys = |reverse| {
            read(&s, |tx| tx.scan(T.name, range, usize::MAX, reverse))
                .unwrap()
                .into_iter()
                .map(|(k, _)| k.parse::<u64>().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(false), vec![4, 5, 6]);
        assert_eq!(keys(true), vec![6, 5, 4]);
        // In a write transaction too, the key of what it just wrote.
        let next = transaction(&s, |tx| -> Result<_, StoreError> {
            T.put(tx, &seq_key(11), &"11".to_string())?;
            T.last_seq(tx)
        })
        .unwrap();
        assert_eq!(next, Some(11));
    }
}
