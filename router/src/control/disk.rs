//! The last good snapshot on disk, so that a router restarted while the controller is
//! unreachable still forwards (ANCHORS §d 8; Envoy declined this, #16987).
//!
//! Written atomically: temp file, fsync, rename over `snapshot.json`, fsync the directory. A
//! crash at any point leaves either the old or the new file, never a torn one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use topology::Topology;
use topology::circuit::ProvisionedCircuit;
use topology::route::LiveState;

pub const FILE_NAME: &str = "snapshot.json";
/// When the router last heard from the controller (unix ms, as text): heartbeats refresh it in
/// memory every 2 s and here now and then ([`save_contact`]), so that a restart while the
/// controller is away counts staleness from that, not from when the stored version came.
pub const CONTACT_FILE: &str = "contact";
/// Held locked (`flock`, exclusive) by the one router that uses the directory ([`lock`]); it
/// holds that router's process id, for the message a second one gets.
pub const LOCK_FILE: &str = "lock";
/// A stored snapshot larger than this is neither written nor read. Twice the wire's bound: what
/// is stored is a snapshot that came over the wire, re-encoded with a few fields more, or one
/// built from it by deltas; [`save`] refuses what [`load`] would refuse, so a snapshot is never
/// stored only to be refused at the next start.
const MAX_FILE: u64 = 2 * super::proto::MAX_TO_ROUTER as u64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub version: u64,
    pub topology_version: u64,
    /// When this router last heard from the controller about this version (unix ms).
    pub received_unix_ms: u64,
    pub topology: Arc<Topology>,
    pub live: LiveState,
    #[serde(default)]
    pub circuits: Arc<Vec<ProvisionedCircuit>>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a stored snapshot: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// [`save`] refused a snapshot whose stored form passes the limit (the stored one stays).
    /// Trying it again cannot succeed: the caller gives it up.
    #[error(
        "{path}: not stored: the snapshot takes more than the limit of {max} bytes (the stored \
         snapshot is kept)"
    )]
    TooLarge { path: PathBuf, max: u64 },
    #[error(
        "{dir} is in use by another router ({}): each router needs its own state directory",
        holder.map_or("its lock file names no process".to_string(), |p| format!("process {p}"))
    )]
    InUse { dir: PathBuf, holder: Option<u32> },
}

/// The hold [`lock`] takes on a state directory; dropping it lets the directory go.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

/// Takes `dir` (made if missing) for this process alone, so that two routers never write one
/// stored snapshot (each would start from the other's): an exclusive `flock` on its
/// [`LOCK_FILE`], held until the returned value is dropped, released by the kernel if the
/// process dies. [`DiskError::InUse`] names the holder when another has it. The lock is
/// advisory: it keeps out routers, not other programs.
pub fn lock(dir: &Path) -> Result<StateLock, DiskError> {
    use std::io::{Read, Write};
    crate::durable::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = (&file).take(32).read_to_string(&mut text);
            return Err(DiskError::InUse {
                dir: dir.to_path_buf(),
                holder: text.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
    }
    // Who holds it, for a second router's message only: not worth failing the start for.
    let _ = file
        .set_len(0)
        .and_then(|()| write!(file, "{}", std::process::id()));
    Ok(StateLock { _file: file })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn save(dir: &Path, snap: &StoredSnapshot) -> Result<(), DiskError> {
    save_at_most(dir, snap, MAX_FILE)
}

fn save_at_most(dir: &Path, snap: &StoredSnapshot, max: u64) -> Result<(), DiskError> {
    crate::durable::create_dir_all(dir).map_err(io(dir))?;
    let final_path = dir.join(FILE_NAME);
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    // Encoded up to the limit and no further: memory and time bounded by it.
    let mut bytes = Vec::new();
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    if super::proto::write_json_at_most(snap, &mut bytes, limit).is_none() {
        return Err(DiskError::TooLarge {
            path: final_path,
            max,
        });
    }
    crate::durable::write(&final_path, &tmp, &bytes, false).map_err(|e| io(&e.path)(e.source))
}

/// Records `unix_ms` as the last word from the controller, atomically like [`save`] (a torn
/// file would read as none, which only makes a restart's staleness count from the snapshot).
pub fn save_contact(dir: &Path, unix_ms: u64) -> Result<(), DiskError> {
    crate::durable::create_dir_all(dir).map_err(io(dir))?;
    let final_path = dir.join(CONTACT_FILE);
    let tmp = dir.join(format!("{CONTACT_FILE}.tmp"));
    let text = unix_ms.to_string();
    crate::durable::write(&final_path, &tmp, text.as_bytes(), false)
        .map_err(|e| io(&e.path)(e.source))
}

/// The last word from the controller [`save_contact`] recorded; None when there is none or it
/// does not read as a number (at most 32 bytes are read).
pub fn load_contact(dir: &Path) -> Option<u64> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(dir.join(CONTACT_FILE))
        .ok()?
        .take(32)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

/// The stored snapshot, `Ok(None)` when there is none.
pub fn load(dir: &Path) -> Result<Option<StoredSnapshot>, DiskError> {
    load_at_most(dir, MAX_FILE)
}

fn load_at_most(dir: &Path, max: u64) -> Result<Option<StoredSnapshot>, DiskError> {
    use std::io::Read;
    let path = dir.join(FILE_NAME);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DiskError::Io { path, source: e }),
    };
    // Read through the limit, not the size the file had when looked at: it may grow, and a
    // device (`/dev/zero` by a symlink) has no size and no end. (A file that never answers, a
    // FIFO or a hung mount, holds this blocking thread: the start gives it up after
    // `STORED_READ_LIMIT`.)
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io(&path))?;
    if bytes.len() as u64 > max {
        return Err(DiskError::Corrupt {
            path,
            reason: format!("over the limit of {max} bytes"),
        });
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| DiskError::Corrupt {
            path,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty topology's snapshot, version `version`.
    fn stored(version: u64) -> StoredSnapshot {
        StoredSnapshot {
            version,
            topology_version: 3,
            received_unix_ms: 1,
            topology: Arc::new(Topology::default()),
            live: LiveState::default(),
            circuits: Arc::default(),
        }
    }

    #[test]
    fn the_contact_time_reads_back_and_garbage_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_contact(dir.path()), None);
        save_contact(dir.path(), 1_764_750_000_123).unwrap();
        assert_eq!(load_contact(dir.path()), Some(1_764_750_000_123));
        std::fs::write(dir.path().join(CONTACT_FILE), "12x").unwrap();
        assert_eq!(load_contact(dir.path()), None);
        std::fs::write(dir.path().join(CONTACT_FILE), "9".repeat(1 << 20)).unwrap();
        assert_eq!(load_contact(dir.path()), None);
    }

    #[test]
    fn saved_snapshot_loads_back_and_a_torn_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let snap = stored(9);
        save(dir.path(), &snap).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(snap));
        std::fs::write(dir.path().join(FILE_NAME), b"{\"version\": 9, ").unwrap();
        assert!(matches!(load(dir.path()), Err(DiskError::Corrupt { .. })));
    }

    /// The first save into a new `--state-dir` makes its directories durable with the file: a
    /// power cut after the router acknowledged a stored version must not take the directory
    /// entry (and so the file) with it.
    #[test]
    fn the_first_save_syncs_the_new_state_directory_into_its_parent() {
        use crate::durable::record::{Event, assert_every_change_synced, take};
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("var/tasman");
        let snap = stored(9);
        take();
        save(&dir, &snap).unwrap();
        let events = assert_every_change_synced("the first save");
        for made_in in [t.path().to_path_buf(), t.path().join("var")] {
            assert!(
                events.contains(&Event::Changed(made_in.clone())),
                "a directory made in {}: {events:?}",
                made_in.display()
            );
        }
        assert!(events.contains(&Event::Changed(dir.clone())), "{events:?}");
    }

    /// What `save` writes, `load` reads back: a snapshot over the bound is not written (the
    /// one stored stays), rather than written and then refused at the next start (the two
    /// bounds were the wire's, which the stored form, a few fields larger, could pass).
    #[test]
    fn a_snapshot_over_the_bound_is_not_stored_and_the_stored_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let max = serde_json::to_vec(&stored(9)).unwrap().len() as u64;
        save_at_most(dir.path(), &stored(9), max).unwrap();
        assert_eq!(load_at_most(dir.path(), max).unwrap(), Some(stored(9)));
        // Version 10 takes one more byte.
        let e = save_at_most(dir.path(), &stored(10), max).unwrap_err();
        assert!(matches!(e, DiskError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("not stored"), "{e}");
        assert_eq!(load_at_most(dir.path(), max).unwrap(), Some(stored(9)));
        assert!(MAX_FILE > super::super::proto::MAX_TO_ROUTER as u64);
    }

    /// A stored snapshot is read up to the bound and no further, whatever it is: `/dev/zero`
    /// (by a symlink) is refused as over the bound, and so is a file that grew past it after it
    /// was looked at. (Its size was taken from the metadata, 0 for a device, and then it was
    /// read to its end: `/dev/zero` filled memory.)
    #[test]
    fn a_stored_snapshot_is_read_no_further_than_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join(FILE_NAME)).unwrap();
        let e = load_at_most(dir.path(), 1 << 20).unwrap_err();
        assert!(
            matches!(&e, DiskError::Corrupt { reason, .. } if reason.contains("over the limit")),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), vec![b' '; 100]).unwrap();
        let e = load_at_most(dir.path(), 10).unwrap_err();
        assert!(matches!(e, DiskError::Corrupt { .. }), "{e}");
    }
}
