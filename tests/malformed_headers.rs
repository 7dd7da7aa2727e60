//! Malformed stream headers, sent on a real QUIC connection with a valid certificate, reset the
//! stream with a code; the router keeps serving other streams. A site asked to relay refuses too.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use quinn::{ReadError, VarInt};
use router::codes::Code;
use router::header::{Header, REPLY_OK};

async fn expect_reset(conn: &quinn::Connection, bytes: &[u8], finish: bool, allowed: &[Code]) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
        .await
        .expect("no answer to a bad header");
    match r {
        Err(ReadError::Reset(code)) => {
            let code =
                Code::from_varint(code).unwrap_or_else(|| panic!("unknown reset code {code}"));
            assert!(
                allowed.contains(&code),
                "reset with {code}, expected one of {allowed:?}"
            );
        }
        other => panic!("expected a reset for {bytes:02x?}, got {other:?}"),
    }
}

#[test]
fn malformed_headers_reset_the_stream_with_a_code_and_the_router_keeps_serving() {
    let backend = echo_backend("");
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .transit("transit", free_udp(LOCAL))
        .site("site", free_udp(LOCAL), &[("echo", backend, 100)])
        .link("edge", "transit", "1ms")
        .link("transit", "site", "1ms")
        .service("echo", free_tcp_port(LOCAL), &[]);
    let mut f = Fabric::new(&y);
    // The test plays the edge: it holds the edge's certificate.
    f.start("transit");
    f.start("site");
    eventually(DEADLINE, "transit sees site up", || {
        f.metric("transit", "tasman_neighbour_up", "neighbour=\"site\"") == 1
    });
    let (transit_addr, site_addr): (SocketAddr, SocketAddr) = {
        let text = std::fs::read_to_string(&f.yaml).unwrap();
        let t = topology::load(&text).unwrap().topology;
        (
            t.node("transit").unwrap().address,
            t.node("site").unwrap().address,
        )
    };

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let id = router::tls::TlsIdentity::load(&f.pki, "edge").unwrap();
        let peers = router::tls::PeerNames::new(["transit".to_string(), "site".to_string()]);
        let cfg =
            router::tls::client_config(&id, &peers, router::transport::shared_transport()).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(cfg);
        let conn = ep.connect(transit_addr, "transit").unwrap().await.unwrap();

        let mut seed = 99u64;
        for i in 0..20 {
            let mut junk = vec![0u8; 10 + i * 37];
            fill(&mut junk, &mut seed);
            junk[0] = 0xee; // never a valid version
            expect_reset(&conn, &junk, true, &[Code::UnsupportedVersion]).await;
        }
        // Valid version, unknown kind.
        expect_reset(
            &conn,
            &[1, 9, 0, 4, 0, 0, 0, 0],
            true,
            &[Code::MalformedHeader],
        )
        .await;
        // Oversize: announces 65535 body bytes.
        let mut big = vec![1u8, 1, 0xff, 0xff];
        big.extend(std::iter::repeat_n(b'a', 2000));
        expect_reset(&conn, &big, false, &[Code::HeaderTooLarge]).await;
        // Truncated: announces 50 bytes, sends 10, then FIN.
        let mut short = vec![1u8, 1, 0, 50];
        short.extend([0u8; 10]);
        expect_reset(&conn, &short, true, &[Code::MalformedHeader]).await;
        // Well-framed body with nonsense inside (unknown flags, zero-length service).
        expect_reset(
            &conn,
            &[1, 1, 0, 3, 0x80, 0, 0],
            true,
            &[Code::MalformedHeader],
        )
        .await;
        expect_reset(
            &conn,
            &[1, 1, 0, 3, 0, 0, 0],
            true,
            &[Code::MalformedHeader],
        )
        .await;
        // A hop that is not a neighbour of the transit.
        let mut b = BytesMut::new();
        Header::data("echo".into(), vec!["nowhere".into()], None)
            .encode(&mut b)
            .unwrap();
        expect_reset(&conn, &b, true, &[Code::NotANeighbour]).await;

        // The same connection still carries a good stream end to end.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut b = BytesMut::new();
        Header::data("echo".into(), vec!["site".into()], None)
            .encode(&mut b)
            .unwrap();
        b.extend_from_slice(b"hello through the transit");
        send.write_all(&b).await.unwrap();
        send.finish().unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got[..2], &REPLY_OK);
        assert_eq!(&got[2..], b"hello through the transit");
        conn.close(VarInt::from_u32(0), b"done");

        // Only transits relay: a site asked to forward to a next hop refuses.
        let conn = ep.connect(site_addr, "site").unwrap().await.unwrap();
        let mut b = BytesMut::new();
        Header::data("echo".into(), vec!["transit".into()], None)
            .encode(&mut b)
            .unwrap();
        expect_reset(&conn, &b, true, &[Code::WrongRole]).await;
        conn.close(VarInt::from_u32(0), b"done");
        let _ = Arc::new(ep);
    });
    assert!(
        f.metric(
            "transit",
            "tasman_stream_errors_total",
            "code=\"malformed_header\""
        ) >= 4
    );
    assert!(
        f.metric(
            "transit",
            "tasman_stream_errors_total",
            "code=\"header_too_large\""
        ) >= 1
    );
    // The site refused the relay itself; it did not pass it on.
    assert_eq!(
        f.metric("site", "tasman_stream_errors_total", "code=\"wrong_role\""),
        1
    );
    assert_eq!(f.metric("site", "tasman_relayed_streams_total", ""), 0);
}
