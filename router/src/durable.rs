//! Making changes of names in a directory survive a power cut: a new file's contents are synced
//! by their writer, but the name that points at it (a rename, a removal, a new directory) lives
//! in its directory, which has to be synced too. Shared by the router's state directory, the PKI
//! directories and the controller's store.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Syncs `dir`, making the names changed in it durable. A file system that cannot sync a
/// directory at all ([`cannot_sync_dirs`]), or a directory this process cannot open, is passed
/// over (the files themselves are synced by their writers). Any other error is returned: an
/// `EIO` says the directory's write-back failed, so the change it was to make durable may be
/// lost to a power cut, and the caller must not report it done.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    record::synced(dir);
    let d = match fs::File::open(dir) {
        Ok(d) => d,
        Err(e) if open_failure_passed_over(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    match d.sync_all() {
        Err(e) if cannot_sync_dirs(&e) => Ok(()),
        r => r,
    }
}

/// Whether `e`, from opening a directory to sync it, says that this process may not open it (or
/// it is gone), a lasting state passed over; not a passing want of descriptors or memory
/// (`EMFILE`, `ENFILE`, `ENOMEM`), which leaves the names unsynced and is returned. (Every
/// failure was passed over: a process at its descriptor limit reported renames durable that
/// were never synced.)
fn open_failure_passed_over(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound
    )
}

/// Whether `e`, from syncing a directory, says that its file system does not sync directories
/// (Linux: `EINVAL` when it has no fsync, `ENOTSUP`/`EOPNOTSUPP`; elsewhere every error, as
/// directories may not be synced there), rather than that a sync failed.
fn cannot_sync_dirs(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        [libc::EINVAL, libc::ENOTSUP, libc::EOPNOTSUPP, libc::EBADF]
            .iter()
            .any(|&c| e.raw_os_error() == Some(c))
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        true
    }
}

/// An I/O error of [`write`], with the file it is about (the temporary or the final one).
#[derive(Debug)]
pub struct WriteError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// Writes `path` whole through the temporary file `tmp` beside it: readers see the old file or
/// the new one, never part of one. The file is synced before it is renamed over `path`, and the
/// directory after ([`rename`]). `secret`: readable by its owner only (unix).
pub fn write(path: &Path, tmp: &Path, contents: &[u8], secret: bool) -> Result<(), WriteError> {
    let at = |p: &Path| {
        let path = p.to_path_buf();
        move |source| WriteError { path, source }
    };
    // Never through a symbolic link at the temporary's path (it would send the contents to its
    // target): the open refuses one (O_NOFOLLOW), which is removed and the open made again. A
    // temporary left by a crash is reused (truncated), and a secret's mode is set on the open
    // file whatever the leftover's was.
    let open = || {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.custom_flags(libc::O_NOFOLLOW);
            if secret {
                opts.mode(0o600);
            }
        }
        opts.open(tmp)
    };
    let f = match open() {
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            fs::remove_file(tmp).map_err(at(tmp))?;
            open()
        }
        r => r,
    };
    let mut f = f.map_err(at(tmp))?;
    let written = (|| {
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(at(tmp))?;
        }
        let _ = secret;
        f.write_all(contents).map_err(at(tmp))?;
        f.sync_all().map_err(at(tmp))?;
        drop(f);
        rename(tmp, path).map_err(at(path))
    })();
    // A failed write leaves no temporary behind: part of a large file written before the disk
    // filled would hold its free space for as long as the writer retries (best effort).
    if written.is_err() {
        let _ = fs::remove_file(tmp);
    }
    written
}

/// Renames `from` to `to`, then syncs `to`'s directory.
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    changed(to);
    sync_dir(parent_dir(to))
}

/// Removes the file `path`, then syncs its directory.
pub fn remove_file(path: &Path) -> io::Result<()> {
    fs::remove_file(path)?;
    changed(path);
    sync_dir(parent_dir(path))
}

/// [`fs::create_dir_all`], syncing the directory each new directory was made in, top down: a
/// file synced into a new directory is otherwise lost to a power cut with the directory's own
/// entry (the first start of a controller or router on a new `--state-dir`).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.is_dir())
        .collect();
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {
                changed(d);
                sync_dir(parent_dir(d))?;
            }
            // Made meanwhile by another process, which syncs its own.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The directory `path` is in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Records that a name in `path`'s directory changed by other means than this module's (tests
/// check that a sync of the directory follows).
pub(crate) fn changed(path: &Path) {
    #[cfg(test)]
    record::changed(path);
    let _ = path;
}

/// What this thread changed and synced, in order (tests of durability: a change of a name that
/// no sync of its directory follows is lost to a power cut).
#[cfg(test)]
pub(crate) mod record {
    use std::cell::RefCell;
    use std::path::{Path, PathBuf};

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Event {
        /// A name in this directory was renamed to, removed or made.
        Changed(PathBuf),
        /// This directory was synced.
        Synced(PathBuf),
    }

    thread_local! {
        static EVENTS: RefCell<Vec<Event>> = const { RefCell::new(Vec::new()) };
    }

    pub(crate) fn changed(path: &Path) {
        let dir = super::parent_dir(path).to_path_buf();
        EVENTS.with(|e| e.borrow_mut().push(Event::Changed(dir)));
    }

    pub(crate) fn synced(dir: &Path) {
        EVENTS.with(|e| e.borrow_mut().push(Event::Synced(dir.to_path_buf())));
    }

    /// The events since the last call.
    pub(crate) fn take() -> Vec<Event> {
        EVENTS.with(|e| std::mem::take(&mut *e.borrow_mut()))
    }

    /// Asserts that at least one name changed since the last [`take`], and that a sync of its
    /// directory follows every change. Returns the events.
    pub(crate) fn assert_every_change_synced(what: &str) -> Vec<Event> {
        let events = take();
        assert!(
            events.iter().any(|e| matches!(e, Event::Changed(_))),
            "{what}: changed no name through the helpers"
        );
        for (i, e) in events.iter().enumerate() {
            if let Event::Changed(at) = e {
                assert!(
                    events[i + 1..].contains(&Event::Synced(at.clone())),
                    "{what}: a change in {} is not followed by a sync of it: {events:?}",
                    at.display()
                );
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::record::{Event, take};
    use super::*;

    /// A directory whose file system has no sync (procfs answers `EINVAL`) is passed over; a
    /// failed sync (`EIO`, `ENOSPC`) is an error the caller sees. (Every error was dropped: a
    /// rename whose directory never reached the disk was reported done.)
    #[cfg(target_os = "linux")]
    #[test]
    fn only_a_file_system_without_directory_sync_is_passed_over() {
        sync_dir(Path::new("/proc")).expect("procfs has no fsync: passed over");
        let t = tempfile::tempdir().unwrap();
        sync_dir(t.path()).unwrap();
        for unsupported in [libc::EINVAL, libc::ENOTSUP, libc::EOPNOTSUPP] {
            assert!(cannot_sync_dirs(&io::Error::from_raw_os_error(unsupported)));
        }
        for failed in [libc::EIO, libc::ENOSPC, libc::EDQUOT] {
            assert!(
                !cannot_sync_dirs(&io::Error::from_raw_os_error(failed)),
                "errno {failed} passed over"
            );
        }
        // Opening the directory: a lasting refusal is passed over, a passing want of
        // descriptors or memory is not.
        for lasting in [libc::EACCES, libc::EPERM, libc::ENOENT] {
            assert!(open_failure_passed_over(&io::Error::from_raw_os_error(
                lasting
            )));
        }
        for passing in [libc::EMFILE, libc::ENFILE, libc::ENOMEM] {
            assert!(
                !open_failure_passed_over(&io::Error::from_raw_os_error(passing)),
                "errno {passing} passed over"
            );
        }
    }

    #[test]
    fn each_new_directory_is_synced_into_its_parent_top_down() {
        let t = tempfile::tempdir().unwrap();
        let deep = t.path().join("a/b/c");
        take();
        create_dir_all(&deep).unwrap();
        assert!(deep.is_dir());
        let want: Vec<Event> = [t.path(), &t.path().join("a"), &t.path().join("a/b")]
            .into_iter()
            .flat_map(|p| [Event::Changed(p.into()), Event::Synced(p.into())])
            .collect();
        assert_eq!(take(), want);
        // Nothing new, nothing synced.
        create_dir_all(&deep).unwrap();
        assert_eq!(take(), []);
        // A file where a directory should be is an error, not a loop.
        fs::write(t.path().join("f"), b"").unwrap();
        assert!(create_dir_all(&t.path().join("f/g")).is_err());
    }

    /// A write that fails removes its temporary (here the rename: the final path is a
    /// directory that is not empty), and the file in place is untouched. (The temporary, with
    /// all it held, stayed: on a full disk, its blocks.)
    #[test]
    fn a_failed_write_leaves_no_temporary() {
        let t = tempfile::tempdir().unwrap();
        let (path, tmp) = (
            t.path().join("snapshot.json"),
            t.path().join("snapshot.json.tmp"),
        );
        fs::create_dir(&path).unwrap();
        fs::write(path.join("kept"), b"x").unwrap();
        let e = write(&path, &tmp, &[7u8; 4096], false).expect_err("renamed over a directory");
        assert_eq!(e.path, path);
        assert!(!tmp.exists(), "the temporary stayed");
        assert_eq!(fs::read(path.join("kept")).unwrap(), b"x");
        // And a write that can be made still is.
        let other = t.path().join("other");
        write(&other, &tmp, b"ok", true).unwrap();
        assert_eq!(fs::read(&other).unwrap(), b"ok");
        assert!(!tmp.exists());
    }

    /// A secret is written with mode 0600 whatever the temporary's path held: a file left by a
    /// crash with a wider mode (its mode set on the open file), or a symbolic link (removed, its
    /// target left alone). (The old temporary was opened as it was: its mode kept, a link
    /// followed.)
    #[cfg(unix)]
    #[test]
    fn a_secret_is_written_private_and_never_through_a_link_at_the_temporary_path() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let (path, tmp) = (t.path().join("node.key"), t.path().join("node.key.tmp"));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        fs::write(&tmp, b"left by a crash").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, &tmp, b"secret 1", true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"secret 1");
        assert_eq!(mode(&path), 0o600);
        let elsewhere = t.path().join("elsewhere");
        fs::write(&elsewhere, b"not yours").unwrap();
        std::os::unix::fs::symlink(&elsewhere, &tmp).unwrap();
        write(&path, &tmp, b"secret 2", true).unwrap();
        assert_eq!(fs::read(&elsewhere).unwrap(), b"not yours");
        assert_eq!(fs::read(&path).unwrap(), b"secret 2");
        assert_eq!(mode(&path), 0o600);
        assert!(
            !fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn the_directory_of_a_bare_file_name_is_the_working_directory() {
        assert_eq!(parent_dir(Path::new("x")), Path::new("."));
        assert_eq!(parent_dir(Path::new("x/y")), Path::new("x"));
    }
}
