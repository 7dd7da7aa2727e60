//! Transparent mode: in a network namespace made by the test, an iptables REDIRECT rule sends a
//! connection for a VIP to the edge's transparent port; the edge reads the original destination
//! (SO_ORIGINAL_DST), maps VIP:port to the service, and carries it to the backend. The edge
//! listens dual-stack (`client_address: "::"`), and an ip6tables rule does the same for an IPv6
//! VIP (IP6T_SO_ORIGINAL_DST).
//!
//! It needs root, network namespaces with IPv6, and `ip`, `iptables`, `ip6tables`, `curl` and
//! `nginx` (`scripts/deps` installs them; CI runs as root). Where any of that is missing the
//! test FAILS, saying what is missing, so that a passing run always means transparent mode was
//! tested. On a machine that cannot make network namespaces (not root, a container without
//! CAP_NET_ADMIN), set `TASMAN_SKIP_NETNS=1` to skip it (or, without IPv6 there, its IPv6
//! half) explicitly; the skip is printed.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::{Command, Stdio};

use common::*;

/// A network namespace deleted on drop.
struct NetNs(String);

impl NetNs {
    fn create(name: &str) -> Option<NetNs> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .ok()?
            .success();
        ok.then(|| NetNs(name.to_string()))
    }
    fn exec(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.0.clone()]
    }
    fn run(&self, args: &[&str]) -> bool {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output();
        match out {
            Ok(o) if o.status.success() => true,
            Ok(o) => {
                eprintln!("{args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
                false
            }
            Err(e) => {
                eprintln!("{args:?} failed: {e}");
                false
            }
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The environment variable that lets this test skip what the machine cannot do (set to `1`).
const OPT_OUT: &str = "TASMAN_SKIP_NETNS";

/// The machine cannot run (part of) this test because of `why`: a failure, unless [`OPT_OUT`]
/// is set to 1, in which case the skip is printed and the caller leaves that part out.
fn unavailable(why: &str) {
    if std::env::var(OPT_OUT).is_ok_and(|v| v == "1") {
        // Printed to stdout as well: a passing test's stderr is not shown by default.
        println!("SKIPPED ({OPT_OUT}=1): {why}");
        eprintln!("SKIPPED ({OPT_OUT}=1): {why}");
        return;
    }
    panic!(
        "{why}. This test needs root, network namespaces with IPv6, and ip, iptables, \
         ip6tables, curl and nginx (run scripts/deps as root); set {OPT_OUT}=1 to skip it on a \
         machine that cannot make network namespaces"
    );
}

#[test]
fn iptables_redirect_to_a_vip_reaches_the_backend_through_the_edge() {
    if !is_root() {
        unavailable("not root (a network namespace and iptables rules need it)");
        return;
    }
    for tool in ["ip", "iptables", "ip6tables", "curl", "nginx"] {
        if which(tool).is_none() {
            unavailable(&format!(
                "{tool} is not installed (scripts/deps installs it)"
            ));
            return;
        }
    }
    let ns_name = format!("tasman-tp-{}", std::process::id());
    let Some(ns) = NetNs::create(&ns_name) else {
        unavailable("`ip netns add` failed: no network namespace can be made here");
        return;
    };
    assert!(ns.run(&["ip", "link", "set", "lo", "up"]));
    // The VIP is not an address of the namespace: a route makes it reachable, and the NAT rule
    // redirects it before it leaves.
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

    // IPv6 in the namespace: loopback has ::1 once it is up, unless IPv6 is disabled here.
    let v6 = ns.run(&["ip", "-6", "route", "add", "2001:db8::/64", "dev", "lo"]);
    if !v6 {
        unavailable("no IPv6 route can be added in the network namespace (IPv6 disabled?)");
    }

    let vip = "198.18.0.10";
    let vip6 = "2001:db8::10";
    let vip_port = 80u16;
    // Ports are picked in the host namespace; the fresh namespace has all of them free.
    let tport = free_tcp_port(LOCAL);
    let backend = SocketAddr::new(LOCAL, free_tcp_port(LOCAL));
    // Locally made connections to a VIP:80 are redirected to the edge's transparent port.
    let redirect = |tables: &str, vip: &str| {
        let (port, to) = (vip_port.to_string(), tport.to_string());
        ns.run(&[
            tables,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            vip,
            "--dport",
            &port,
            "-j",
            "REDIRECT",
            "--to-ports",
            &to,
        ])
    };
    assert!(redirect("iptables", vip));
    if v6 {
        assert!(redirect("ip6tables", vip6));
    }

    let www = tempfile::tempdir().unwrap();
    std::fs::write(
        www.path().join("hello.txt"),
        "hello from the site backend\n",
    )
    .unwrap();
    let ngx_dir = tempfile::tempdir().unwrap();
    let _nginx = Nginx::start(ngx_dir.path(), www.path(), backend, &ns.exec());

    let mut y = TopoYaml::default();
    // Dual-stack client side: IPv4 clients arrive as v4-mapped addresses on the same socket.
    let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    y.edge("edge", free_udp(LOCAL), any6, Some(tport))
        .site("site", free_udp(LOCAL), &[("chat", backend, 100)])
        .link("edge", "site", "1ms")
        .service(
            "chat",
            free_tcp_port(LOCAL),
            &[
                &format!("{vip}/32:{vip_port}"),
                &format!("[{vip6}/128]:{vip_port}"),
            ],
        );
    let mut f = Fabric::new(&y);
    f.wrapper = ns.exec();
    f.start_all();
    f.wait_preferred("edge", "chat", "site");

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
    eventually(DEADLINE, "nginx answering in the namespace", || {
        curl(format!("http://{backend}/hello.txt")).status.success()
    });
    let out = curl(format!("http://{vip}:{vip_port}/hello.txt"));
    assert!(
        out.status.success(),
        "curl to the VIP failed: {}\nedge log:\n{}\nsite log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        f.log("edge"),
        f.log("site")
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the site backend\n"
    );
    assert!(f.metric("edge", "tasman_streams_total", "") >= 1);
    if v6 {
        let out = curl(format!("http://[{vip6}]:{vip_port}/hello.txt"));
        assert!(
            out.status.success(),
            "curl to the IPv6 VIP failed: {}\nedge log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            f.log("edge")
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello from the site backend\n"
        );
        assert!(f.metric("edge", "tasman_streams_total", "") >= 2);
    }
    drop(f);
}
