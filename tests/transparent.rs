//! Transparent mode: in a network namespace made by the test, iptables REDIRECT rules send
//! connections for the VIPs of two services to the edge's transparent port; the edge reads the
//! original destination (SO_ORIGINAL_DST), maps VIP:port to its service, and carries it to that
//! service's backend (each answers differently). A redirected connection to an address and port
//! of no service's VIP is reset and counted as `unknown_service`. The edge listens dual-stack
//! (`client_address: "::"`, in a namespace where `net.ipv6.bindv6only` is 1, so that the edge
//! has to ask for dual stack itself), and ip6tables rules do the same for IPv6 VIPs
//! (IP6T_SO_ORIGINAL_DST). An edge with a specific client address is reached by DNAT to it.
//!
//! It needs root, network namespaces with IPv6, and `ip`, `iptables`, `ip6tables`, `curl` and
//! `nginx` (`scripts/deps` installs them; CI runs as root). Where any of that is missing the
//! test FAILS, saying what is missing, so that a passing run always means transparent mode was
//! tested. On a machine that cannot make network namespaces (not root, a container without
//! CAP_NET_ADMIN), set `TASMAN_SKIP_NETNS=1` to skip it (or, without IPv6 there, its IPv6
//! half) explicitly; the skip is printed.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use common::netns::NetNs;
use common::*;

/// Runs `f` on a thread of its own that has entered network namespace `ns` (setns moves only
/// the calling thread), and returns what it returns.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on an open namespace file; it changes this thread's namespace only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in the namespace")
}

/// The machine cannot run (part of) this test because of `why` ([`netns::unavailable`]).
fn unavailable(why: &str) {
    netns::unavailable(
        why,
        "root, network namespaces with IPv6, and ip, iptables, ip6tables, curl and nginx",
    );
}

/// A network namespace of its own (`tasman-NAME-PID`), its loopback up, for a test that needs
/// `tools` too; `None` when this machine cannot run it (said by [`unavailable`]).
fn namespace(name: &str, tools: &[&str]) -> Option<NetNs> {
    if !is_root() {
        unavailable("not root (a network namespace and iptables rules need it)");
        return None;
    }
    for tool in tools {
        if which(tool).is_none() {
            unavailable(&format!(
                "{tool} is not installed (scripts/deps installs it)"
            ));
            return None;
        }
    }
    let Some(ns) = NetNs::create(&format!("tasman-{name}-{}", std::process::id())) else {
        unavailable("`ip netns add` failed: no network namespace can be made here");
        return None;
    };
    assert!(ns.run(&["ip", "link", "set", "lo", "up"]));
    Some(ns)
}

/// An edge (client address `client`, transparent port `tport`) and a site serving `echo` (VIP
/// `vip`) from an echo backend, all in `ns`, running and the edge's route in place.
fn echo_fabric(ns: &NetNs, client: IpAddr, tport: u16, vip: &str) -> Fabric {
    // The backend in the namespace (the site connects to it from there).
    let backend = SocketAddr::new(LOCAL, free_tcp_port(LOCAL));
    echo_on(
        in_netns(&ns.0, move || std::net::TcpListener::bind(backend).unwrap()),
        "",
    );
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), client, Some(tport))
        .site("site", free_udp(LOCAL), &[("echo", backend, 100)])
        .link("edge", "site", "1ms")
        .service("echo", free_tcp_port(LOCAL), &[vip]);
    let mut f = Fabric::new(&y);
    f.wrapper = ns.exec();
    f.start_all();
    f.wait_preferred("edge", "echo", "site");
    f
}

/// Sends `msg` to `dst` from a client in `ns` and reads as many bytes back (an echo's answer).
fn echo_in(ns: &NetNs, dst: SocketAddr, msg: &'static [u8]) -> std::io::Result<Vec<u8>> {
    in_netns(&ns.0, move || {
        let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(msg)?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).map(|()| buf)
    })
}

/// Makes the test VIPs' 198.18.0.0/24 reachable in `ns` (on `lo`; not addresses of it): the NAT
/// rules take connections to them before they leave.
fn route_test_vips(ns: &NetNs) {
    assert!(ns.run(&[
        "ip",
        "route",
        "add",
        "198.18.0.0/24",
        "dev",
        "lo",
        "src",
        "127.0.0.1"
    ]));
}

#[test]
fn iptables_redirect_to_a_vip_reaches_the_backend_through_the_edge() {
    let Some(ns) = namespace("tp", &["ip", "iptables", "ip6tables", "curl", "nginx"]) else {
        return;
    };
    route_test_vips(&ns);

    // IPv6 in the namespace: loopback has ::1 once it is up, unless IPv6 is disabled here.
    let v6 = std::path::Path::new("/proc/sys/net/ipv6").exists()
        && ns.run(&["ip", "-6", "route", "add", "2001:db8::/64", "dev", "lo"]);
    if v6 {
        // IPv6 sockets are IPv6-only by default here (as on hosts that set it): the edge's `::`
        // listeners must ask for dual stack themselves to take IPv4 clients.
        assert!(ns.run(&["sh", "-c", "echo 1 > /proc/sys/net/ipv6/bindv6only"]));
    } else {
        unavailable("no IPv6 route can be added in the network namespace (IPv6 disabled?)");
    }

    // Two services, each with a VIP of each family on port 80, and a backend of its own that
    // answers differently: the edge must tell them apart by the original destination.
    let vip_port = 80u16;
    let services = [
        ("chat", "198.18.0.10", "2001:db8::10"),
        ("embed", "198.18.0.20", "2001:db8::20"),
    ];
    // Redirected too, but no service's: an address of no VIP, and a VIP's address on a port
    // that is not the VIP's.
    let unmapped_v4 = [("198.18.0.30", vip_port), ("198.18.0.10", 8080)];
    let unmapped_v6 = [("2001:db8::30", vip_port), ("2001:db8::10", 8080)];
    // Ports are picked in the host namespace; the fresh namespace has all of them free.
    let tport = free_tcp_port(LOCAL);
    // Locally made connections to each VIP:port (and each unmapped one) are redirected to the
    // edge's transparent port.
    let redirect = |tables: &str, dst: &str, port: u16| {
        let (port, to) = (port.to_string(), tport.to_string());
        ns.run(&[
            tables,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            dst,
            "--dport",
            &port,
            "-j",
            "REDIRECT",
            "--to-ports",
            &to,
        ])
    };
    for (_, vip, vip6) in services {
        assert!(redirect("iptables", vip, vip_port));
        if v6 {
            assert!(redirect("ip6tables", vip6, vip_port));
        }
    }
    for (dst, port) in unmapped_v4 {
        assert!(redirect("iptables", dst, port));
    }
    if v6 {
        for (dst, port) in unmapped_v6 {
            assert!(redirect("ip6tables", dst, port));
        }
    }

    let body = |service: &str| format!("hello from the {service} backend\n");
    let mut backends = Vec::new();
    let mut nginxes = Vec::new();
    let mut dirs = Vec::new();
    for (service, _, _) in services {
        let backend = SocketAddr::new(LOCAL, free_tcp_port(LOCAL));
        let www = tempfile::tempdir().unwrap();
        std::fs::write(www.path().join("hello.txt"), body(service)).unwrap();
        let ngx_dir = tempfile::tempdir().unwrap();
        nginxes.push(Nginx::start(
            ngx_dir.path(),
            www.path(),
            backend,
            &ns.exec(),
        ));
        dirs.push((www, ngx_dir));
        backends.push(backend);
    }

    let mut y = TopoYaml::default();
    // Dual-stack client side: IPv4 clients arrive as v4-mapped addresses on the same socket
    // (an IPv4 socket on a host without IPv6, the IPv6 half skipped).
    let any6 = if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    };
    y.edge("edge", free_udp(LOCAL), any6, Some(tport))
        .site(
            "site",
            free_udp(LOCAL),
            &[("chat", backends[0], 100), ("embed", backends[1], 100)],
        )
        .link("edge", "site", "1ms");
    for (service, vip, vip6) in services {
        y.service(
            service,
            free_tcp_port(LOCAL),
            &[
                &format!("{vip}/32:{vip_port}"),
                &format!("[{vip6}/128]:{vip_port}"),
            ],
        );
    }
    let mut f = Fabric::new(&y);
    f.wrapper = ns.exec();
    f.start_all();
    for (service, _, _) in services {
        f.wait_preferred("edge", service, "site");
    }

    let curl = |url: String| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.0,
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "10",
            ])
            .arg(url)
            .output()
            .unwrap()
    };
    // nginx answers in the namespace (it was started before the routers).
    for (backend, (service, _, _)) in backends.iter().zip(services) {
        eventually(
            DEADLINE,
            &format!("{service}'s nginx answering in the namespace"),
            || {
                let out = curl(format!("http://{backend}/hello.txt"));
                out.status.success() && out.stdout == body(service).as_bytes()
            },
        );
    }
    let unknown = |f: &Fabric| {
        f.metric(
            "edge",
            "tasman_stream_errors_total",
            "code=\"unknown_service\"",
        )
    };
    let mut proxied = 0;
    let mut refused = 0;
    let mut hosts = vec![services.map(|(s, vip, _)| (s, vip.to_string())).to_vec()];
    let mut unmapped = vec![unmapped_v4.map(|(a, p)| format!("{a}:{p}")).to_vec()];
    if v6 {
        hosts.push(
            services
                .map(|(s, _, vip6)| (s, format!("[{vip6}]")))
                .to_vec(),
        );
        unmapped.push(unmapped_v6.map(|(a, p)| format!("[{a}]:{p}")).to_vec());
    }
    for (hosts, unmapped) in hosts.iter().zip(&unmapped) {
        // Each VIP reaches its own service's backend.
        for (service, host) in hosts {
            let out = curl(format!("http://{host}:{vip_port}/hello.txt"));
            assert!(
                out.status.success(),
                "curl to {service}'s VIP {host} failed: {}\nedge log:\n{}\nsite log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                f.log("edge"),
                f.log("site")
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                body(service),
                "{service}'s VIP {host} reached another backend"
            );
            proxied += 1;
            assert_eq!(f.metric("edge", "tasman_streams_total", ""), proxied);
        }
        // A redirected connection to no service's VIP:port is reset at the edge, counted as
        // `unknown_service`, and carried nowhere.
        for dst in unmapped {
            let before = unknown(&f);
            let dst: SocketAddr = dst.parse().unwrap();
            let got = in_netns(&ns.0, move || {
                let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                // A request, so that a connection carried to a backend gets an answer to show.
                s.write_all(b"GET /hello.txt HTTP/1.0\r\n\r\n")?;
                let mut buf = [0u8; 64];
                s.read(&mut buf).map(|n| buf[..n].to_vec())
            });
            match got {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Ok(answer) => panic!(
                    "{dst} (no service's): expected a reset, got {:?}",
                    String::from_utf8_lossy(&answer)
                ),
                Err(e) => panic!("{dst} (no service's): expected a reset, got {e}"),
            }
            refused += 1;
            assert_eq!(
                unknown(&f),
                before + 1,
                "{dst}: not refused as unknown_service"
            );
            assert_eq!(
                f.metric("edge", "tasman_streams_total", ""),
                proxied,
                "{dst} was proxied"
            );
        }
    }
    assert_eq!(unknown(&f), refused);
    drop(f);
    drop(nginxes);
}

/// A service VIP that is an address of the edge's host itself (an anycast-style VIP, no NAT
/// rule) is served on the transparent port: a client connecting straight to VIP:port arrives on
/// the edge's wildcard transparent listener, and with no original destination to read (no NAT,
/// so no conntrack entry) the edge takes the address the client connected to. In a namespace
/// with no iptables rule at all, so that conntrack tracks nothing. (Such a client was reset as
/// `unknown_service`: only a connection conntrack happened to track had a destination.)
#[test]
fn a_vip_on_the_edge_host_is_served_on_the_transparent_port_without_nat() {
    let Some(ns) = namespace("tpl", &["ip", "curl"]) else {
        return;
    };
    // What the test is about: here conntrack has no entry for a connection no NAT rule took.
    let tracked = in_netns(&ns.0, || {
        let l = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        router::orig_dst::original_dst(&s, false)
    });
    assert!(
        tracked.is_err(),
        "conntrack tracks connections in a fresh namespace on this machine ({tracked:?}): \
         the edge's fallback to the local address cannot be shown here"
    );
    let tport = free_tcp_port(LOCAL);
    // 127.0.0.2 is an address of the namespace (all of 127/8 is, on `lo`).
    let vip = format!("127.0.0.2/32:{tport}");
    let f = echo_fabric(
        &ns,
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        tport,
        &vip,
    );
    let dst: SocketAddr = format!("127.0.0.2:{tport}").parse().unwrap();
    let got = echo_in(&ns, dst, b"straight to the VIP");
    match got {
        Ok(echoed) => assert_eq!(echoed, b"straight to the VIP"),
        Err(e) => panic!(
            "a client straight to the VIP {dst} was not served ({e}); unknown_service: {}\nedge log:\n{}",
            f.metric(
                "edge",
                "tasman_stream_errors_total",
                "code=\"unknown_service\""
            ),
            f.log("edge")
        ),
    }
    assert_eq!(f.metric("edge", "tasman_streams_total", ""), 1);
    drop(f);
}

/// An edge with a specific client address (`127.0.0.2` here, as each edge of a shared host has
/// its own) is reached by iptables DNAT to CLIENT_ADDRESS:TRANSPARENT_PORT, as the topology
/// reference says (REDIRECT sends a connection made on the host to 127.0.0.1, where such an edge
/// does not listen): the edge reads the VIP back as the original destination and serves it.
#[test]
fn iptables_dnat_to_a_specific_client_address_reaches_the_service() {
    let Some(ns) = namespace("tpd", &["ip", "iptables", "curl"]) else {
        return;
    };
    route_test_vips(&ns);
    let tport = free_tcp_port(LOCAL);
    let to = format!("127.0.0.2:{tport}");
    assert!(ns.run(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "198.18.0.10",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        &to,
    ]));
    let f = echo_fabric(
        &ns,
        IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)),
        tport,
        "198.18.0.10/32:80",
    );
    let dst: SocketAddr = "198.18.0.10:80".parse().unwrap();
    let got = echo_in(&ns, dst, b"through DNAT");
    match got {
        Ok(echoed) => assert_eq!(echoed, b"through DNAT"),
        Err(e) => panic!(
            "a client of the VIP {dst}, DNATed to {to}, was not served ({e})\nedge log:\n{}",
            f.log("edge")
        ),
    }
    assert_eq!(f.metric("edge", "tasman_streams_total", ""), 1);
    drop(f);
}
