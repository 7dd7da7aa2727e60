//! Process limits a router or controller raises for itself at start.

/// Raises the soft limit on open files to the hard limit and returns the soft limit now.
///
/// Every client connection of an edge and every backend connection of a site is a descriptor,
/// and so are a controller's admin and metrics clients. The soft limit is 1,024 by default
/// (systemd's too, whose hard limit is 524,288): an edge would stop accepting at about a
/// thousand connections. The hard limit is the operator's ceiling (`LimitNOFILE=`, `ulimit
/// -Hn`); going up to it needs no privilege.
pub fn raise_nofile() -> std::io::Result<u64> {
    let mut lim = nofile()?;
    // SAFETY: setrlimit on a local struct; no other effect.
    unsafe {
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(lim.rlim_cur)
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
