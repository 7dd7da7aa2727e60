//! The embedded backend: one redb file (`state.redb`) in the controller's state directory.
//! redb is ACID with copy-on-write pages and fsyncs on commit (`Durability::Immediate`, the
//! default), so a committed transaction survives SIGKILL and power loss, and a crash in the
//! middle of a commit leaves the previous state.

use std::cell::Cell;
use std::ops::Bound;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Once, PoisonError, RwLock, RwLockReadGuard};

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, StorageError, TableDefinition,
    TableError,
};

use super::{ReadTxn, Store, StoreError, WriteTxn};

pub struct RedbStore {
    /// The open file; `None` after it could not be opened again ([`RedbStore::reopen`]): the
    /// next transaction tries again.
    db: RwLock<Option<Database>>,
    /// Opens the file again. redb fails every later transaction after one I/O error ("Previous
    /// I/O error occurred. Please close and re-open the database."), so one full disk or one
    /// failed sync would otherwise fail every write until the controller restarted: the
    /// routers' flushes, the settle loop's retries and every apply.
    opener: Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>,
    /// Called when a commit's outcome cannot be known ([`RedbStore::settled`]): logs and exits
    /// the process (tests record it instead).
    fatal: Box<dyn Fn(&str) + Send + Sync>,
    /// Held by a write transaction from its start to its outcome, [`RedbStore::settled`]
    /// included (redb runs one write transaction at a time anyway): no other commit can count
    /// past a failed one before the file is read again.
    writing: std::sync::Mutex<()>,
    /// Times the file was opened again ([`RedbStore::reopen_reading`]): a transaction that met
    /// an I/O error opens it again only if no other did since it began (redb fails every
    /// transaction in flight after one error: each opened it again, a whole integrity check
    /// each, under the lock every transaction waits on).
    reopened: std::sync::atomic::AtomicU64,
}

/// [`RedbStore::fatal`] outside tests: the controller stops (status 1), its next start
/// reading what the disk holds.
fn exit_unknown(why: &str) {
    tracing::error!("{why}: stopping, so that the next start reads what the store holds");
    std::process::exit(1);
}

thread_local! {
    /// redb reported an I/O error on this thread since the transaction began ([`be`]): the
    /// database is to be opened again.
    static IO_FAILED: Cell<bool> = const { Cell::new(false) };
}

fn be(e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
        IO_FAILED.set(true);
    }
    StoreError::Backend(e.to_string())
}

/// The table of the commit counter, which every write transaction counts up: after a commit
/// that failed on an I/O error, the file read again says whether it was made anyway (its last
/// sync failed after the new state reached the disk).
const COMMITS: &str = "redb_commits";
const COMMITS_KEY: &str = "n";

/// The commit counter as `tx` sees it (0 before the first counted commit).
fn commits(tx: &dyn ReadTxn) -> Result<u64, StoreError> {
    Ok(tx
        .get(COMMITS, COMMITS_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_le_bytes))
}

fn def(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

/// The store's file in the state directory.
pub const FILE: &str = "state.redb";

impl RedbStore {
    /// Opens the store in directory `dir`: its [`FILE`], which is created (an empty store) only
    /// when it does not exist.
    ///
    /// The file's checksums are verified first (redb's integrity check on open, which reads the
    /// whole file: well under a second for hundreds of MB in the page cache), so a damaged file
    /// is refused here rather than trusted: redb's plain open reads little of it, and the first
    /// read to meet the damage would panic (a debug build's open already does). Refused with
    /// [`StoreError::Open`], naming the file and what to do: a file another process has open
    /// (another controller on `dir`), a damaged one, and an empty one (never taken for a new
    /// store: that would silently replace whatever it held, and a controller started with
    /// `--topology` would import that file again as version 1).
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        // The new directories' entries made durable: the first commit's fsync covers the
        // file's contents, not the names that lead to it.
        router::durable::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join(FILE);
        let exists = path.try_exists().map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            problem: e.to_string(),
        })?;
        let db = open_file(dir, &path, exists)?;
        if !exists {
            router::durable::sync_dir(dir).map_err(|source| StoreError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let (dir, file) = (dir.to_path_buf(), path.clone());
        let path = file.clone();
        let store = RedbStore::with_opener(db, move || open_file(&dir, &file, true));
        match super::check_schema(&store) {
            Ok(()) => Ok(store),
            Err(e @ StoreError::Schema { .. }) => Err(StoreError::Open {
                path: path.display().to_string(),
                problem: e.to_string(),
            }),
            Err(e) => Err(e),
        }
    }

    /// A store of `db`, opened again by `opener` after an I/O error.
    fn with_opener(
        db: Database,
        opener: impl Fn() -> Result<Database, StoreError> + Send + Sync + 'static,
    ) -> RedbStore {
        RedbStore {
            db: RwLock::new(Some(db)),
            opener: Box::new(opener),
            fatal: Box::new(exit_unknown),
            writing: std::sync::Mutex::new(()),
            reopened: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The open database, opened again first if an earlier failure closed it.
    fn usable(&self) -> Result<RwLockReadGuard<'_, Option<Database>>, StoreError> {
        let g = self.db.read().unwrap_or_else(PoisonError::into_inner);
        if g.is_some() {
            return Ok(g);
        }
        drop(g);
        self.reopen()?;
        let g = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match *g {
            Some(_) => Ok(g),
            None => Err(StoreError::Backend(
                "the store's file is closed after an I/O error".into(),
            )),
        }
    }

    /// Closes the file (which releases its lock) and opens it again, its integrity checked.
    /// Waits for the transactions under way.
    fn reopen(&self) -> Result<(), StoreError> {
        self.reopen_reading(|_| Ok(())).map(|_| ())
    }

    /// [`RedbStore::reopen`], then `read` on the file opened again before any other thread
    /// can use it (so before any other commit).
    fn reopen_reading<R>(
        &self,
        read: impl FnOnce(&Database) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut g = self.db.write().unwrap_or_else(PoisonError::into_inner);
        self.reopen_in(&mut g, read)
    }

    /// [`RedbStore::reopen_reading`] with the file's lock (`g`) held by the caller.
    fn reopen_in<R>(
        &self,
        g: &mut Option<Database>,
        read: impl FnOnce(&Database) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        *g = None;
        let db = (self.opener)().inspect_err(|e| {
            tracing::error!("the store's file could not be opened again after an I/O error: {e}")
        })?;
        let r = read(&db);
        *g = Some(db);
        self.reopened
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tracing::warn!("the store's file was opened again after an I/O error");
        r
    }

    /// [`RedbStore::reopen`], unless another thread opened the file again since `seen` (the
    /// count read when the caller's transaction began).
    fn reopen_since(&self, seen: u64) {
        let mut g = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if self.reopened.load(std::sync::atomic::Ordering::SeqCst) == seen {
            let _ = self.reopen_in(&mut g, |_| Ok(()));
        }
    }

    /// After an operation (its transaction begun when [`RedbStore::reopen_since`]'s count was
    /// `seen`): opens the file again when redb failed an I/O in it (it fails every later
    /// transaction otherwise). The operation's outcome stands either way.
    fn reopen_if_failed(&self, seen: u64) {
        if IO_FAILED.replace(false) {
            self.reopen_since(seen);
        }
    }

    /// `begin` on the open database; after an I/O error, once more on the file opened again
    /// (nothing was done yet).
    fn begin<T>(
        &self,
        begin: impl Fn(&Database) -> Result<T, StoreError>,
    ) -> Result<(RwLockReadGuard<'_, Option<Database>>, T), StoreError> {
        IO_FAILED.set(false);
        let g = self.usable()?;
        // Read with the file's lock held: no reopening in between.
        let seen = self.reopened.load(std::sync::atomic::Ordering::SeqCst);
        match g.as_ref().map(&begin) {
            Some(Ok(tx)) => Ok((g, tx)),
            Some(Err(e)) if IO_FAILED.replace(false) => {
                drop(g);
                // Unless another transaction that met the error opened it again already.
                self.reopen_since(seen);
                let g = self.usable().map_err(|_| e)?;
                let tx = g
                    .as_ref()
                    .map(&begin)
                    .expect("usable() gives an open database")?;
                Ok((g, tx))
            }
            Some(Err(e)) => Err(e),
            None => unreachable!("usable() gives an open database"),
        }
    }

    /// After the commit that counted `n` failed on an I/O error: `Ok` when the file, opened
    /// again, shows it was not made (its header never flipped: nothing of it can reach the disk
    /// later), the failure then standing. Otherwise its outcome is unknown: the file shows it
    /// (through the page cache), but a sync failed, and Linux may drop pages whose write-back
    /// failed, so it may not be on the disk; nor can a file that does not open again tell. The
    /// process then stops ([`RedbStore::fatal`], as PostgreSQL stops on a failed fsync): an
    /// answer either way could be wrong, and memory would part from the store. The counter is
    /// read before any other thread can commit (a later commit would count past `n`).
    fn settled(&self, n: u64, failed: &StoreError) -> Result<(), String> {
        let seen = self.reopen_reading(|db| {
            let tx = RTxn(db.begin_read().map_err(be)?);
            commits(&tx)
        });
        match seen {
            Ok(c) if c < n => Ok(()),
            Ok(_) => Err(format!(
                "a commit's sync failed ({failed}) after the file took it: whether it is on the \
                 disk is unknown"
            )),
            Err(e) => Err(format!(
                "a commit failed ({failed}) and the store's file cannot be read again to learn \
                 whether it was made ({e})"
            )),
        }
    }
}

/// Opens the store's file `path` (in `dir`), its integrity checked; `exists` when it should.
fn open_file(dir: &Path, path: &PathBuf, exists: bool) -> Result<Database, StoreError> {
    let refused = |problem: String| StoreError::Open {
        path: path.display().to_string(),
        problem,
    };
    let mut builder = Database::builder();
    builder.set_check_integrity_on_open(true);
    // `open`, not `create`, for a file that exists: `create` makes a new store in an empty
    // file. `open` refuses one once it holds the file's lock, so a file that another
    // controller is creating at this instant is refused as in use, not as empty.
    let opened = without_panicking(|| {
        if exists {
            builder.open(path)
        } else {
            builder.create(path)
        }
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(refused(open_problem(dir, path, &e))),
        Err(panicked) => Err(refused(format!(
            "{DAMAGED_IS} (redb panicked opening it: {panicked}){DAMAGED_DO}"
        ))),
    }
}

const DAMAGED_IS: &str = "the file is damaged";
const DAMAGED_DO: &str = ": restore it from a backup";
/// An empty file, or one without redb's header, is also what a crash leaves when it interrupts
/// redb's creation of the file, which is the controller's very first start on the directory
/// (nothing else happens before it): the operator knows whether that was the case.
const FIRST_START: &str = "if the controller's first start on this directory was interrupted, \
                           nothing was stored yet: delete the file and start again; otherwise \
                           restore it from a backup";

/// Why redb refused to open `path` (the store's file in `dir`), and what the operator can do.
fn open_problem(dir: &Path, path: &Path, e: &DatabaseError) -> String {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => format!(
            "another controller is using {} ({e}): stop it, or give this one a state directory \
             of its own",
            dir.display()
        ),
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
                format!(
                    "the file is empty (0 bytes): it holds no store, and none is made in its \
                     place; {FIRST_START}"
                )
            } else {
                format!("the file is not a store or is damaged ({e}); {FIRST_START}")
            }
        }
        DatabaseError::Storage(StorageError::Corrupted(_)) => {
            format!("{DAMAGED_IS} ({e}){DAMAGED_DO}")
        }
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            format!("{DAMAGED_IS} (truncated: {e}){DAMAGED_DO}")
        }
        _ => e.to_string(),
    }
}

thread_local! {
    /// This thread runs [`without_panicking`]: a panic is its error, not a report on stderr.
    static QUIET_PANICS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, returning a panic in it as its message. redb's integrity check reports a damaged
/// file as an error, but a plain redb open may panic on one ("Invalid page type byte …"), and
/// nothing promises that no damage slips past the check into a panic: the controller refuses to
/// start with one clear line rather than a panic's report and exit code 101. The workspace builds
/// with `panic = "unwind"` (the default), without which nothing is caught.
fn without_panicking<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let report = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.get() {
                report(info);
            }
        }));
    });
    let was = QUIET_PANICS.replace(true);
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET_PANICS.set(was);
    r.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_string())
    })
}

fn scan_table<T: ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    range: (Bound<&str>, Bound<&str>),
    limit: usize,
    reverse: bool,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    // `push` checks the limit after taking an entry: a limit of 0 would take one.
    if limit == 0 {
        return Ok(out);
    }
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
        let (g, tx) = self.begin(|db| db.begin_read().map(RTxn).map_err(be))?;
        let seen = self.reopened.load(std::sync::atomic::Ordering::SeqCst);
        let r = f(&tx);
        drop((tx, g));
        // Whatever `f` returned: `store::read` hands the caller's own result back through `Ok`,
        // and redb fails every later read of the file after an I/O error in one (its
        // `begin_read` does not say so, so `begin` would never open the file again).
        self.reopen_if_failed(seen);
        r
    }

    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn WriteTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let _one_writer = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let (g, mut tx) = self.begin(|db| db.begin_write().map(WTxn).map_err(be))?;
        let seen = self.reopened.load(std::sync::atomic::Ordering::SeqCst);
        // Two-phase: a commit is made primary only after its pages are synced, so at the next
        // open a damaged primary is refused ("corrupted despite 2-phase commit"). With single-
        // phase commits redb took a primary that does not verify for a commit cut off by the
        // crash and fell back to the one before: an acknowledged commit damaged afterwards was
        // dropped without a word. One more fsync per commit.
        tx.0.set_two_phase_commit(true);
        let counted = f(&mut tx).and_then(|()| {
            let n = commits(&tx)? + 1;
            tx.put(COMMITS, COMMITS_KEY, &n.to_le_bytes())?;
            Ok(n)
        });
        let n = match counted {
            Ok(n) => n,
            Err(e) => {
                let aborted = tx.0.abort().map_err(be);
                drop(g);
                self.reopen_if_failed(seen);
                return Err(aborted.err().unwrap_or(e));
            }
        };
        // Durability::Immediate (redb's default): commit returns after fsync.
        let committed = tx.0.commit().map_err(be);
        drop(g);
        match committed {
            Ok(()) => Ok(()),
            Err(e) if IO_FAILED.replace(false) => match self.settled(n, &e) {
                Ok(()) => Err(e),
                Err(why) => {
                    (self.fatal)(&why);
                    Err(StoreError::Backend(why))
                }
            },
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{self, Table, seq_key};

    const T: Table<String> = Table::new("t");

    /// What opening `dir` did, a panic included (the test fails on it rather than dies of it).
    fn open_caught(dir: &Path) -> Result<RedbStore, StoreError> {
        match panic::catch_unwind(|| RedbStore::open(dir)) {
            Ok(r) => r,
            Err(p) => panic!(
                "RedbStore::open panicked: {:?}",
                p.downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
            ),
        }
    }

    /// The error of opening `dir`, which must be refused.
    #[track_caller]
    fn refusal(dir: &Path) -> String {
        match open_caught(dir) {
            Ok(_) => panic!("{} was opened", dir.join(FILE).display()),
            Err(e) => {
                assert!(matches!(e, StoreError::Open { .. }), "{e:?}");
                e.to_string()
            }
        }
    }

    /// A store in `dir` holding a record, closed.
    fn written(dir: &Path) -> Vec<u8> {
        let s = RedbStore::open(dir).unwrap();
        store::transaction(&s, |tx| -> Result<(), StoreError> {
            T.put(tx, &seq_key(1), &"tasman-canary".repeat(200))
        })
        .unwrap();
        drop(s);
        std::fs::read(dir.join(FILE)).unwrap()
    }

    /// A scan with a limit of 0 reads nothing, forwards or in reverse. (It returned one entry:
    /// the limit was checked after the first was taken, so `history?limit=0` listed a version.)
    #[test]
    fn a_scan_with_a_limit_of_zero_returns_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        store::transaction(&s, |tx| -> Result<(), StoreError> {
            for i in 1..=3 {
                T.put(tx, &seq_key(i), &format!("v{i}"))?;
            }
            Ok(())
        })
        .unwrap();
        for reverse in [false, true] {
            let rows = store::read(&s, |tx| {
                tx.scan("t", (Bound::Unbounded, Bound::Unbounded), 0, reverse)
            })
            .unwrap();
            assert_eq!(rows, [], "reverse: {reverse}");
            let rows = store::read(&s, |tx| {
                tx.scan("t", (Bound::Unbounded, Bound::Unbounded), 2, reverse)
            })
            .unwrap();
            assert_eq!(rows.len(), 2, "reverse: {reverse}");
        }
    }

    /// A second controller on the same state directory is refused, naming the file and the
    /// likely cause (redb says only "Database already open").
    #[test]
    fn a_second_open_of_the_same_directory_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RedbStore::open(dir.path()).unwrap();
        let e = refusal(dir.path());
        let path = dir.path().join(FILE).display().to_string();
        assert!(e.contains(&path), "{e}");
        assert!(
            e.contains(&format!(
                "another controller is using {}",
                dir.path().display()
            )),
            "{e}"
        );
    }

    /// A file that is not a store, a truncated store and one with a page of its bytes flipped are
    /// each refused, naming the file and that it is damaged; none panics (a debug build's redb
    /// panics opening the flipped one, a release build's would on its first read) and none is
    /// opened.
    #[test]
    fn damaged_store_files_are_refused_without_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let good = written(dir.path());
        // Refused as damaged, naming the file and what to do.
        let assert_damaged = |e: &str| {
            assert!(
                e.contains(&path.display().to_string())
                    && e.contains("the file is damaged")
                    && e.contains("restore it from a backup"),
                "{e}"
            );
        };

        std::fs::write(
            &path,
            b"not a store at all, but long enough to have a header",
        )
        .unwrap();
        let e = refusal(dir.path());
        assert!(
            e.contains(&path.display().to_string()) && e.contains("not a store or is damaged"),
            "{e}"
        );

        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        let e = refusal(dir.path());
        assert_damaged(&e);

        // The page that holds the record, every byte flipped.
        let at = good
            .windows(13)
            .position(|w| w == b"tasman-canary")
            .expect("the record is in the file");
        let page = at / 4096 * 4096;
        let mut flipped = good.clone();
        for b in &mut flipped[page..page + 4096] {
            *b = !*b;
        }
        std::fs::write(&path, &flipped).unwrap();
        let e = refusal(dir.path());
        assert_damaged(&e);
        // redb's own check found it: no panic was needed to refuse it.
        assert!(!e.contains("panicked"), "{e}");

        // The good file is still a good store.
        std::fs::write(&path, &good).unwrap();
        let s = open_caught(dir.path()).unwrap();
        let all = store::read(&s, |tx| T.all(tx)).unwrap();
        assert_eq!(all.len(), 1);
    }

    /// The file a crash leaves (copied while the store is open), whose newest commit, acknowledged,
    /// is damaged afterwards (a disk that lost a page it said it had written): refused, not
    /// opened at the commit before it. With single-phase commits redb's repair fell back to the
    /// previous commit without a word, and the controller would have numbered its next version
    /// as the lost one.
    #[test]
    fn a_damaged_last_commit_is_refused_not_rolled_back_silently() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let s = RedbStore::open(dir.path()).unwrap();
        store::transaction(&s, |tx| -> Result<(), StoreError> {
            T.put(tx, &seq_key(1), &"first".to_string())
        })
        .unwrap();
        store::transaction(&s, |tx| -> Result<(), StoreError> {
            T.put(tx, &seq_key(2), &"tasman-second".repeat(200))
        })
        .unwrap();
        let crashed = std::fs::read(&path).unwrap();
        drop(s);
        let at = crashed
            .windows(13)
            .position(|w| w == b"tasman-second")
            .expect("the second record is in the file");
        let page = at / 4096 * 4096;
        let mut damaged = crashed.clone();
        for b in &mut damaged[page..page + 4096] {
            *b = !*b;
        }
        std::fs::write(&path, &damaged).unwrap();
        match open_caught(dir.path()) {
            Ok(s) => {
                let all = store::read(&s, |tx| T.all(tx)).unwrap();
                panic!("opened, holding {} of the 2 records", all.len());
            }
            Err(e) => assert!(e.to_string().contains("the file is damaged"), "{e}"),
        }
        // Undamaged, the crashed file opens with both records.
        std::fs::write(&path, &crashed).unwrap();
        let s = open_caught(dir.path()).unwrap();
        assert_eq!(store::read(&s, |tx| T.all(tx)).unwrap().len(), 2);
    }

    /// An empty `state.redb` (a botched restore, or a crash during the very first start) is
    /// refused, and left empty: it is not made a new store, which the controller would fill by
    /// importing `--topology` again as version 1, history, circuits and audit gone.
    #[test]
    fn an_empty_state_file_is_refused_not_made_a_new_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        std::fs::write(&path, b"").unwrap();
        let e = refusal(dir.path());
        assert!(
            e.contains(&path.display().to_string())
                && e.contains("empty")
                && e.contains("delete the file and start again")
                && e.contains("restore it from a backup"),
            "{e}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // A directory without the file gets a new store.
        std::fs::remove_file(&path).unwrap();
        open_caught(dir.path()).unwrap();
    }

    /// A new store is stamped with this build's schema; a store written before stamps existed,
    /// or stamped by an earlier build, is stamped on open, its records untouched; a store stamped by a newer build is refused,
    /// naming the file and both schemas, and left as it was (not stamped down, not written).
    #[test]
    fn a_store_of_a_newer_schema_is_refused_and_an_unstamped_one_is_stamped() {
        const META: Table<u64> = Table::new("store_meta");
        let stamp = |s: &RedbStore| store::read(s, |tx| META.get(tx, "schema")).unwrap();
        let set = |s: &RedbStore, v: Option<u64>| {
            store::transaction(s, |tx| -> Result<(), StoreError> {
                match v {
                    Some(v) => META.put(tx, "schema", &v),
                    None => META.delete(tx, "schema").map(drop),
                }
            })
            .unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        written(dir.path());
        let s = open_caught(dir.path()).unwrap();
        assert_eq!(stamp(&s), Some(store::SCHEMA));

        // As an earlier build left it: records, no stamp.
        set(&s, None);
        drop(s);
        let s = open_caught(dir.path()).unwrap();
        assert_eq!(stamp(&s), Some(store::SCHEMA));
        assert_eq!(store::read(&s, |tx| T.all(tx)).unwrap().len(), 1);

        // Stamped by an earlier build: raised to this build's schema on open, so that the
        // earlier build, which would rewrite this build's records without the fields it does
        // not know (a circuit's `created_with`, added after schema 1), refuses it from now on.
        // It was left at 1.
        const _: () = assert!(
            store::SCHEMA >= 2,
            "circuits gained created_with after schema 1"
        );
        set(&s, Some(1));
        drop(s);
        let s = open_caught(dir.path()).unwrap();
        assert_eq!(stamp(&s), Some(store::SCHEMA));
        assert_eq!(store::read(&s, |tx| T.all(tx)).unwrap().len(), 1);

        set(&s, Some(store::SCHEMA + 1));
        drop(s);
        let e = refusal(dir.path());
        let path = dir.path().join(FILE).display().to_string();
        assert!(
            e.contains(&path)
                && e.contains(&format!(
                    "schema {}, written by a newer Tasman",
                    store::SCHEMA + 1
                ))
                && e.contains(&format!("reads schema {} and older", store::SCHEMA))
                && e.contains("restore a backup"),
            "{e}"
        );
        // Refused twice alike: the first refusal changed nothing.
        assert_eq!(refusal(dir.path()), e);
    }

    /// A file whose syncs fail on demand: `fail_at` counts the syncs down, and the one at which
    /// it reaches zero fails (after it has synced, when `lost_answer`: the data reached the disk
    /// and only the answer was lost). `syncs` counts them all. `fail_read_at` counts reads
    /// down alike.
    #[derive(Default)]
    struct Faults {
        fail_at: std::sync::atomic::AtomicI64,
        fail_read_at: std::sync::atomic::AtomicI64,
        /// Times the file was opened.
        opens: std::sync::atomic::AtomicI64,
        lost_answer: std::sync::atomic::AtomicBool,
        syncs: std::sync::atomic::AtomicI64,
    }

    #[derive(Debug)]
    struct Flaky {
        inner: redb::backends::FileBackend,
        faults: std::sync::Arc<Faults>,
    }

    impl std::fmt::Debug for Faults {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Faults")
        }
    }

    impl redb::StorageBackend for Flaky {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            use std::sync::atomic::Ordering::SeqCst;
            if self.faults.fail_read_at.fetch_sub(1, SeqCst) == 1 {
                return Err(std::io::Error::other("injected read failure (EIO)"));
            }
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            use std::sync::atomic::Ordering::SeqCst;
            self.faults.syncs.fetch_add(1, SeqCst);
            if self.faults.fail_at.fetch_sub(1, SeqCst) != 1 {
                return self.inner.sync_data();
            }
            if self.faults.lost_answer.load(SeqCst) {
                self.inner.sync_data()?;
            }
            Err(std::io::Error::other("injected sync failure (EIO)"))
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.inner.write(offset, data)
        }
        fn close(&self) -> Result<(), std::io::Error> {
            self.inner.close()
        }
    }

    /// A store in `dir` whose file's syncs fail as `faults` says, opened again the same way.
    fn flaky_store(dir: &Path, faults: &std::sync::Arc<Faults>) -> RedbStore {
        let path = dir.join(FILE);
        let open = {
            let faults = faults.clone();
            move || {
                faults
                    .opens
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                let inner = redb::backends::FileBackend::new(file).map_err(be)?;
                let mut b = Database::builder();
                b.set_check_integrity_on_open(true);
                b.create_with_backend(Flaky {
                    inner,
                    faults: faults.clone(),
                })
                .map_err(be)
            }
        };
        RedbStore::with_opener(open().unwrap(), open)
    }

    fn put(s: &RedbStore, i: u64) -> Result<(), StoreError> {
        store::transaction(s, |tx| -> Result<(), StoreError> {
            T.put(tx, &seq_key(i), &format!("v{i}"))
        })
    }

    fn keys(dir: &Path) -> Vec<String> {
        let s = RedbStore::open(dir).unwrap();
        store::read(&s, |tx| {
            tx.scan("t", (Bound::Unbounded, Bound::Unbounded), 10, false)
        })
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect()
    }

    /// One failed sync fails its commit, and only it: the next commits are made (redb fails
    /// every transaction after an I/O error until the file is opened again, so one full disk
    /// stopped every write of the controller until its restart), and reads go on.
    #[test]
    fn a_failed_sync_fails_its_commit_and_not_the_next() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let faults = std::sync::Arc::new(Faults::default());
        let s = flaky_store(dir.path(), &faults);
        put(&s, 1).unwrap();
        faults.fail_at.store(1, SeqCst);
        let e = put(&s, 2).unwrap_err();
        assert!(e.to_string().contains("injected sync failure"), "{e}");
        put(&s, 3).unwrap();
        let n = store::read(&s, |tx| T.all(tx)).unwrap().len();
        assert_eq!(n, 2);
        drop(s);
        assert_eq!(keys(dir.path()), [seq_key(1), seq_key(3)]);
    }

    /// A flaky store in `dir` holding three records, opened again (nothing of the file in
    /// memory), then a read transaction begun, which brings what a beginning reads into the
    /// cache: a read of the table then goes to the file past the beginning (which opens the file
    /// again after an error already).
    fn three_records_cold(dir: &Path, faults: &std::sync::Arc<Faults>) -> RedbStore {
        let s = flaky_store(dir, faults);
        for i in 1..=3 {
            put(&s, i).unwrap();
        }
        drop(s);
        let s = flaky_store(dir, faults);
        store::read(&s, |_| Ok::<_, StoreError>(())).unwrap();
        s
    }

    /// A failed read fails that read alone: the next reads the file opened again. (redb fails
    /// every later read of the file after an I/O error in one, and `store::read` hid the error
    /// from the store, which opened the file again only after a failed write: history, circuit
    /// reads, and every apply and rollback, which read before they write, failed until some
    /// other write came.)
    #[test]
    fn a_failed_read_fails_that_read_and_not_the_next() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let faults = std::sync::Arc::new(Faults::default());
        let s = three_records_cold(dir.path(), &faults);
        faults.fail_read_at.store(1, SeqCst);
        let e = store::read(&s, |tx| T.all(tx)).unwrap_err();
        assert!(e.to_string().contains("injected read failure"), "{e}");
        let n = store::read(&s, |tx| T.all(tx)).unwrap().len();
        assert_eq!(n, 3);
        put(&s, 4).unwrap();
    }

    /// Two reads in flight that both meet the I/O error (redb fails every transaction after one)
    /// open the file again once, not once each (each a whole integrity check, under the lock
    /// every transaction waits on).
    #[test]
    fn reads_failed_together_open_the_file_again_once() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let faults = std::sync::Arc::new(Faults::default());
        let s = three_records_cold(dir.path(), &faults);
        let opens = faults.opens.load(SeqCst);
        faults.fail_read_at.store(1, SeqCst);
        let both_in = std::sync::Barrier::new(2);
        let failed = std::thread::scope(|sc| {
            let read = || {
                store::read(&s, |tx| {
                    both_in.wait();
                    T.all(tx)
                })
                .is_err()
            };
            let a = sc.spawn(read);
            let b = sc.spawn(read);
            [a.join().unwrap(), b.join().unwrap()]
        });
        // Mostly both fail (the second on redb's latch); a read that went first may have had
        // its pages before the failure. Either way, one opening.
        assert!(failed.contains(&true));
        assert_eq!(faults.opens.load(SeqCst) - opens, 1, "failed: {failed:?}");
        assert_eq!(store::read(&s, |tx| T.all(tx)).unwrap().len(), 3);
    }

    /// A commit whose last sync failed is of unknown outcome: the file shows it (the page
    /// cache does), but Linux may drop pages whose write-back failed, so it may never reach the
    /// disk. The process is stopped ([`RedbStore::fatal`]) rather than answer either way. (It
    /// was reported made: an apply answered 200 that a power cut could take back.) A commit
    /// whose first sync failed is provably not made: refused, and the next goes on.
    #[test]
    fn a_commit_whose_last_sync_failed_stops_the_process() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let faults = std::sync::Arc::new(Faults::default());
        let mut s = flaky_store(dir.path(), &faults);
        let stops = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = stops.clone();
        s.fatal = Box::new(move |why| seen.lock().unwrap().push(why.to_string()));
        put(&s, 1).unwrap();
        let before = faults.syncs.load(SeqCst);
        put(&s, 2).unwrap();
        let per_commit = faults.syncs.load(SeqCst) - before;
        assert!(
            per_commit >= 2,
            "two-phase commits sync twice: {per_commit}"
        );
        // The last sync of the next commit fails, whether or not it wrote.
        for lost_answer in [true, false] {
            faults.lost_answer.store(lost_answer, SeqCst);
            faults.fail_at.store(per_commit, SeqCst);
            let e = put(&s, 3).unwrap_err();
            assert!(e.to_string().contains("unknown"), "{e}");
            let stopped = stops.lock().unwrap().drain(..).collect::<Vec<_>>();
            assert_eq!(stopped.len(), 1, "lost answer {lost_answer}: {stopped:?}");
            assert!(stopped[0].contains("injected sync failure"), "{stopped:?}");
        }
        // A failed first sync: not made, said so, and no stop.
        faults.fail_at.store(1, SeqCst);
        assert!(put(&s, 4).is_err());
        assert!(stops.lock().unwrap().is_empty());
        put(&s, 5).unwrap();
        drop(s);
        let k = keys(dir.path());
        assert!(!k.contains(&seq_key(4)) && k.contains(&seq_key(5)), "{k:?}");
    }
}
