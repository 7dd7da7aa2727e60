//! Process limits a router or controller raises for itself at start.

/// Raises the soft limit on open files to the hard limit and returns the soft limit now.
///
/// Every client connection of an edge and every backend connection of a site is a descriptor,
/// and so are a controller's admin and metrics clients. The soft limit is 1,024 by default
/// (systemd's too, whose hard limit is 524,288): an edge would stop accepting at about a
/// thousand connections. The hard limit is the operator's ceiling (`LimitNOFILE=`, `ulimit
/// -Hn`); going up to it needs no privilege.
pub fn raise_nofile() -> std::io::Result<u64> {
    let lim = nofile()?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    raise_with(lim.rlim_cur, lim.rlim_max, nr_open, |soft, hard| {
        let raised = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit on a local struct; no other effect.
        match unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    })
}

/// [`raise_nofile`] from the limits `soft` and `hard`, `set` setting both: the soft limit to
/// the hard limit, or, where that is refused, both to the kernel's most descriptors a process
/// may have (`nr_open`): the kernel refuses any limits whose hard one is above it (`nr_open`
/// lowered after the limit was inherited, or unlimited), and the soft limit stayed at 1,024.
/// Lowering the hard limit needs no privilege.
fn raise_with(
    soft: u64,
    hard: u64,
    nr_open: Option<u64>,
    mut set: impl FnMut(u64, u64) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    if soft >= hard {
        return Ok(soft);
    }
    match set(hard, hard) {
        Ok(()) => Ok(hard),
        Err(e) => match nr_open.filter(|&n| n > soft && n < hard) {
            Some(n) => set(n, n).map(|()| n),
            None => Err(e),
        },
    }
}

/// The open-file limits (soft and hard) now.
pub fn nofile() -> std::io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit on a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim)
}

/// Whether a socket call failed for want of a file descriptor, in the process (`EMFILE`) or
/// the system (`ENFILE`): the router's own fault (a site's backend connect, an edge's accept).
/// (Not `EADDRNOTAVAIL`: it means no local port left under heavy churn, but also, at every try,
/// an address this host can never connect from, `[::1]` without IPv6 on its loopback, which must
/// count as the backend's.)
pub(crate) fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hard limit above `nr_open` (or unlimited), which the kernel refuses in any call that
    /// passes it (`do_prlimit`), raises both limits to `nr_open`; the soft limit stayed at 1,024.
    #[test]
    fn a_refused_hard_limit_raises_the_soft_limit_to_nr_open() {
        let eperm = || std::io::Error::from_raw_os_error(libc::EPERM);
        let nr_open = 1 << 20;
        let mut asked = Vec::new();
        // As the kernel: a hard limit above nr_open is refused, whatever the soft one.
        let got = raise_with(1024, u64::MAX, Some(nr_open), |soft, hard| {
            asked.push((soft, hard));
            if hard > nr_open || soft > hard {
                Err(eperm())
            } else {
                Ok(())
            }
        });
        assert_eq!(got.unwrap(), nr_open);
        assert_eq!(asked, [(u64::MAX, u64::MAX), (nr_open, nr_open)]);
        // Taken: the hard limit, once.
        assert_eq!(
            raise_with(1024, 4096, Some(nr_open), |_, _| Ok(())).unwrap(),
            4096
        );
        // Refused with no lower ceiling to try: the error.
        assert!(raise_with(1024, 4096, None, |_, _| Err(eperm())).is_err());
        // Already at the hard limit: nothing set.
        assert_eq!(
            raise_with(4096, 4096, None, |_, _| panic!("set")).unwrap(),
            4096
        );
    }
}
