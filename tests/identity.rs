//! A node with a certificate from another CA, or with a name not in the topology, is refused;
//! a node of the topology with the fabric CA's certificate is accepted.

mod common;

use std::time::Duration;

use common::*;
use router::probe::Probe;
use router::tls::{PeerNames, TlsIdentity};

/// Whether a peer with `id` gets a probe answered by `site` (i.e. is accepted).
async fn accepted(id: &TlsIdentity, addr: std::net::SocketAddr) -> bool {
    let peers = PeerNames::new(["site".to_string()]);
    let cfg =
        router::tls::client_config(id, &peers, router::transport::shared_transport()).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let Ok(connecting) = ep.connect(addr, "site") else {
        return false;
    };
    let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(10), connecting).await else {
        return false;
    };
    if conn.send_datagram(Probe::encode_ping(1)).is_err() {
        return false;
    }
    let r = tokio::time::timeout(Duration::from_secs(5), conn.read_datagram()).await;
    matches!(r, Ok(Ok(b)) if matches!(Probe::decode(b.clone()), Ok(Probe::Pong { seq: 1, .. })))
}

#[test]
fn foreign_ca_and_names_outside_the_topology_are_refused() {
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .site(
            "site",
            free_udp(LOCAL),
            &[("chat", "127.0.0.1:9".parse().unwrap(), 10)],
        )
        .link("edge", "site", "1ms")
        .service("chat", free_tcp_port(LOCAL), &[]);
    let mut f = Fabric::new(&y);
    f.start("site");
    let site_addr = topology::load(&std::fs::read_to_string(&f.yaml).unwrap())
        .unwrap()
        .topology
        .node("site")
        .unwrap()
        .address;

    // Same fabric CA, but a name that is not a node of the topology.
    make_pki_issue(&f.pki, "mallory");
    // A different CA issuing a certificate for a real node name.
    let other = tempfile::tempdir().unwrap();
    make_pki(other.path(), &["edge"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let good = TlsIdentity::load(&f.pki, "edge").unwrap();
        assert!(
            accepted(&good, site_addr).await,
            "a node of the topology with the fabric CA's certificate must be accepted"
        );

        let mallory = TlsIdentity::load(&f.pki, "mallory").unwrap();
        assert!(
            !accepted(&mallory, site_addr).await,
            "a name outside the topology was accepted"
        );

        // Trusts the fabric CA (so the client side is happy) but presents the other CA's chain.
        let mut foreign = TlsIdentity::load(other.path(), "edge").unwrap();
        foreign.cas = good.cas.clone();
        assert!(
            !accepted(&foreign, site_addr).await,
            "a certificate from another CA was accepted"
        );
    });
    eventually(DEADLINE, "refusals counted", || {
        f.metric("site", "tasman_refused_peers_total", "") >= 2
    });
}

fn make_pki_issue(dir: &std::path::Path, name: &str) {
    let ok = std::process::Command::new(tasman())
        .args(["pki", "issue", name, "--dir"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .status();
    assert!(ok.is_ok_and(|s| s.success()));
}
