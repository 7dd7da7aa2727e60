//! The original destination of a connection that iptables `REDIRECT` (or `DNAT`) sent to us:
//! `SO_ORIGINAL_DST` for IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6 (Linux conntrack).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// The address the client originally connected to, before NAT rewrote it. An error when
/// conntrack has no entry for the connection (no NAT rule took it) or is not loaded: the caller
/// then takes the connection's local address, where the client did connect.
#[cfg(target_os = "linux")]
pub fn original_dst(sock: &impl AsRawFd, local_is_v6: bool) -> io::Result<SocketAddr> {
    let fd = sock.as_raw_fd();
    // SAFETY: getsockopt writes at most `len` bytes into a zeroed, properly sized sockaddr.
    unsafe {
        if local_is_v6 {
            let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                libc::IP6T_SO_ORIGINAL_DST,
                (&raw mut addr).cast(),
                &mut len,
            ) == 0
            {
                let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
                return Ok(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(addr.sin6_port),
                    0,
                    addr.sin6_scope_id,
                )));
            }
            // A v4 connection on a dual-stack socket (its IPv4 conntrack entry), or a v6 one
            // with no entry (the IPv4 option then finds none either): the IPv4 option.
        }
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &mut len,
        ) == 0
        {
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            return Ok(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(addr.sin_port),
            )));
        }
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub fn original_dst(_sock: &impl AsRawFd, _local_is_v6: bool) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SO_ORIGINAL_DST needs Linux",
    ))
}
