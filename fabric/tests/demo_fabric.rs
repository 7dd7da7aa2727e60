//! The demo fabric on a small topology: a real controller, emulated links, real routers taking
//! their snapshots from the controller, real backends.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fabric::demo::client;
use fabric::demo::{DemoFabric, DemoOptions};
use router::netem::LinkProfile;
use topology::builder::{TopologyBuilder, ms};
use topology::{Latency, NodeId, NodeKind, Topology};

/// edge -- near (5 ms) and edge -- far (20 ms), both serving `chat`, on 127.91.x addresses.
fn two_sites() -> Topology {
    let mut b = TopologyBuilder::new();
    b.node("edge", NodeKind::Edge)
        .node("near", NodeKind::Site)
        .node("far", NodeKind::Site)
        .link("edge", "near", ms(5.0))
        .link("edge", "far", ms(20.0))
        .service("chat")
        .serve("near", "chat", 100)
        .serve("far", "chat", 100);
    let mut t = b.build();
    for (i, n) in t.nodes.iter_mut().enumerate() {
        let i = i as u8 + 1;
        n.address = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 91, 0, i)), 7000);
        n.client_address =
            (n.kind == NodeKind::Edge).then_some(IpAddr::V4(Ipv4Addr::new(127, 91, 1, i)));
        for s in &mut n.serves {
            s.backend = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 91, 2, i)), 9001);
        }
    }
    t.services[0].port = Some(8443);
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_take_the_emulated_latency_follow_a_live_edit_and_fail_over() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let opts = DemoOptions {
        ephemeral_ports: true,
        ..DemoOptions::default()
    };
    let mut f = DemoFabric::start(&topology::to_yaml(&two_sites()), opts)
        .await
        .expect("fabric starts");
    let edge = NodeId::new("edge");
    let addr = f.service_addr(&edge, "chat").expect("service address");

    let r = client::complete(addr, 4, Duration::from_secs(10))
        .await
        .expect("request through the fabric");
    assert_eq!(r.site, "near");
    assert_eq!(r.tokens, 4);
    // 5 ms each way on the emulated link; loopback adds next to nothing.
    assert!(
        r.ttfb >= Duration::from_millis(10),
        "TTFB {:?} below the link's round trip",
        r.ttfb
    );
    // Not a speed test (a debug build on 2 busy cores): the site's name shows the path; this
    // only catches a first byte held back for seconds.
    assert!(r.ttfb < Duration::from_secs(5), "TTFB {:?}", r.ttfb);

    // Raising the emulated latency live shows up in the next request.
    let near = NodeId::new("near");
    assert!(f.set_link_profile(
        &edge,
        &near,
        LinkProfile::delay(Latency::from_micros(40_000))
    ));
    let r = client::complete(addr, 1, Duration::from_secs(10))
        .await
        .expect("request after raising latency");
    assert!(
        r.ttfb >= Duration::from_millis(80),
        "TTFB {:?} after raising the link to 40 ms",
        r.ttfb
    );
    assert!(f.set_link_profile(&edge, &near, LinkProfile::delay(ms(5.0))));

    // A live edit through the controller's admin API: edge--near declared 40 ms one way. Every
    // router acknowledges version 2 and the edge moves to the far site (20 ms), although the
    // emulated link still runs at 5 ms: the declared latency is a floor.
    let link = topology::LinkId::new(&edge, &near);
    let (edited, _) =
        fabric::demo::edit::set_link_latency(&f.topology_text(), f.topology(), &link, ms(40.0))
            .expect("the link exists");
    let out = f.apply(&edited, "raise edge--near").await.expect("apply");
    assert_eq!(out.version, Some(2), "{out:?}");
    assert!(
        out.plan.text.contains("edge chat: site changes: near"),
        "plan: {}",
        out.plan.text
    );
    f.wait_acknowledged(2, Duration::from_secs(10))
        .await
        .expect("every router acknowledges version 2");
    let deadline = Instant::now() + Duration::from_secs(30);
    while f
        .router(&edge)
        .and_then(|r| r.routes().preferred("chat").map(|c| c.site.to_string()))
        .as_deref()
        != Some("far")
    {
        assert!(Instant::now() < deadline, "the edge did not move to far");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = client::complete(addr, 1, Duration::from_secs(10))
        .await
        .expect("request after the edit");
    assert_eq!(r.site, "far");

    // The far site goes dark: new connections end up at the near site, none hangs.
    let far = NodeId::new("far");
    let t0 = Instant::now();
    f.isolate_node(&far);
    let deadline = t0 + Duration::from_secs(10);
    loop {
        let r = client::complete(addr, 1, Duration::from_secs(10)).await;
        if let Ok(r) = r
            && r.site == "near"
        {
            break;
        }
        assert!(Instant::now() < deadline, "no failover within 10 s");
    }
    f.stop_node(&far).await.expect("stop far");
    f.shutdown().await;
}
