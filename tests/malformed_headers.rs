//! Malformed stream headers, sent on a real QUIC connection with a valid certificate, reset the
//! stream with a code, to a transit and to a site alike; each router counts them by code and
//! keeps serving: a good stream opened before them still carries bytes after them, on the same
//! connection, and a new one works too. A site asked to relay refuses too.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use quinn::{ReadError, VarInt};
use router::codes::Code;
use router::header::{Header, MAX_HEADER_LEN, PREFIX_LEN, REPLY_OK, VERSION};

/// Every code a malformed header may be reset with (`HeaderError::code`): a bad version, a
/// header announcing more than `MAX_HEADER_LEN`, and the rest (bad kind, truncated, bad flags or
/// fields, trailing bytes, too many hops).
const BAD_HEADER: [Code; 3] = [
    Code::UnsupportedVersion,
    Code::HeaderTooLarge,
    Code::MalformedHeader,
];
/// Behind a valid version byte (and kind): never a version refusal.
const BAD_BEHIND_VERSION: [Code; 2] = [Code::HeaderTooLarge, Code::MalformedHeader];

/// Opens a stream with `bytes`, finishes it if `finish`, and waits for the router to reset it:
/// the code, which must be one of `allowed`.
async fn expect_reset(
    conn: &quinn::Connection,
    bytes: &[u8],
    finish: bool,
    allowed: &[Code],
) -> Code {
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
                "reset with {code}, expected one of {allowed:?}, for {bytes:02x?}"
            );
            code
        }
        other => panic!("expected a reset for {bytes:02x?}, got {other:?}"),
    }
}

/// The code a router must reset a stream opening with `bytes` (then FIN) with: the header
/// decoder's verdict. Panics if `bytes` hold a valid header (a seed that makes one is a test bug).
fn verdict(bytes: &[u8]) -> Code {
    let mut b = bytes;
    match Header::decode(&mut b) {
        Err(e) => e.code(),
        Ok(h) => panic!("random bytes made a valid header {h:?}: pick another seed"),
    }
}

/// Random headers, deterministic per `seed`, in three families, each with the codes it may be
/// refused with: random bytes behind a valid version byte; behind a valid version and kind (the
/// body length random too: over the limit, past the bytes sent, or short of them); and a random
/// body behind a valid prefix that frames it exactly (flags valid in half of them, and a valid
/// service name in a quarter), which only the body decoder can refuse.
fn random_headers(seed: u64) -> Vec<(Vec<u8>, &'static [Code])> {
    let mut seed = seed;
    let mut out = Vec::new();
    for i in 0..20usize {
        let mut junk = vec![0u8; 10 + i * 37];
        fill(&mut junk, &mut seed);
        junk[0] = VERSION;
        out.push((junk, &BAD_BEHIND_VERSION[..]));
    }
    for i in 0..20usize {
        let mut junk = vec![0u8; 10 + i * 37];
        fill(&mut junk, &mut seed);
        junk[..2].copy_from_slice(&[VERSION, 1]);
        if i % 2 == 0 {
            // Up to twice what follows: truncated, or a body cut short of the bytes sent.
            let n = u16::from_be_bytes([junk[2], junk[3]]) % (2 * junk.len() as u16);
            junk[2..4].copy_from_slice(&n.to_be_bytes());
        }
        out.push((junk, &BAD_BEHIND_VERSION[..]));
    }
    for i in 0..20usize {
        let mut junk = vec![0u8; (5 + i * 61).min(MAX_HEADER_LEN)];
        fill(&mut junk, &mut seed);
        let body = (junk.len() - PREFIX_LEN) as u16;
        junk[..2].copy_from_slice(&[VERSION, 1]);
        junk[2..4].copy_from_slice(&body.to_be_bytes());
        if i % 2 == 1 {
            junk[4] &= 3;
        }
        if i % 4 == 3 && junk.len() > 9 {
            // A valid service name too: the hops, client or circuit are what is wrong.
            junk[5..10].copy_from_slice(b"\x04echo");
        }
        out.push((junk, &[Code::MalformedHeader][..]));
    }
    out
}

/// A stream carried to the `echo` backend (through `hops`), open: the site's reply and one
/// echoed message read.
struct Good {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Good {
    async fn open(conn: &quinn::Connection, hops: &[&str], first: &[u8]) -> Good {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut b = BytesMut::new();
        Header::data(
            "echo".into(),
            hops.iter().map(|h| (*h).into()).collect(),
            None,
        )
        .encode(&mut b)
        .unwrap();
        send.write_all(&b).await.unwrap();
        let mut reply = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut reply))
            .await
            .expect("no reply to a good stream")
            .expect("a good stream refused");
        assert_eq!(reply, REPLY_OK);
        let mut good = Good { send, recv };
        good.echo(first).await;
        good
    }

    /// Sends `msg` and reads it back from the echo backend.
    async fn echo(&mut self, msg: &[u8]) {
        self.send.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), self.recv.read_exact(&mut back))
            .await
            .expect("the good stream went quiet")
            .expect("the good stream failed");
        assert_eq!(back, msg);
    }

    /// Sends `last`, half-closes, and reads the echo to the backend's FIN.
    async fn finish(mut self, last: &[u8]) {
        self.send.write_all(last).await.unwrap();
        self.send.finish().unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), self.recv.read_to_end(1 << 20))
            .await
            .expect("the good stream did not end")
            .expect("the good stream failed at its end");
        assert_eq!(got, last);
    }
}

/// `node`'s `tasman_stream_errors_total`, by code.
fn errors(f: &Fabric, node: &str) -> BTreeMap<String, u64> {
    let text = f.get(node, "/metrics").expect("metrics");
    Code::ALL
        .iter()
        .map(|c| {
            let filter = format!("code=\"{}\"", c.name());
            (
                c.name().to_string(),
                metric_sum(&text, "tasman_stream_errors_total", &filter),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn count(tally: &mut BTreeMap<String, u64>, code: Code) {
    *tally.entry(code.name().to_string()).or_default() += 1;
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
        // The edge's own link to the site: only a neighbour may connect to a router.
        .link("edge", "site", "1ms")
        .service("echo", free_tcp_port(LOCAL), &[]);
    let mut f = Fabric::new(&y);
    // The test plays the edge, a neighbour of both: it holds the edge's certificate.
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
    // What each router must have counted by the end: what it had, and each refusal below.
    let mut want_transit = errors(&f, "transit");
    let mut want_site = errors(&f, "site");
    let headers = random_headers(99);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let id = router::tls::TlsIdentity::load(&f.pki, "edge").unwrap();
        let peers = router::tls::PeerNames::new(["transit".to_string(), "site".to_string()]);
        let cfg =
            router::tls::client_config(&id, &peers, router::transport::shared_transport()).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(cfg);
        let transit = ep.connect(transit_addr, "transit").unwrap().await.unwrap();
        let site = ep.connect(site_addr, "site").unwrap().await.unwrap();

        // Good streams, open before any bad one: to the backend through the transit, and
        // straight to the site, each on the connection the bad ones will take.
        let mut via_transit = Good::open(&transit, &["site"], b"before, via the transit").await;
        let mut at_site = Good::open(&site, &[], b"before, at the site").await;

        // Random bytes behind a valid version (and kind), to both routers: each refused with
        // the decoder's code, from the family's set.
        for (node, conn, tally) in [
            ("transit", &transit, &mut want_transit),
            ("site", &site, &mut want_site),
        ] {
            for (bytes, allowed) in &headers {
                let code = verdict(bytes);
                assert!(
                    allowed.contains(&code),
                    "{bytes:02x?}: the decoder says {code}"
                );
                let got = expect_reset(conn, bytes, true, allowed).await;
                assert_eq!(got, code, "{node}: reset code for {bytes:02x?}");
                assert!(BAD_HEADER.contains(&got));
                count(tally, got);
            }
        }
        // The families reached past the prefix: body and length refusals both came.
        let codes: Vec<Code> = headers.iter().map(|(b, _)| verdict(b)).collect();
        for c in BAD_BEHIND_VERSION {
            assert!(codes.contains(&c), "no random header was refused with {c}");
        }

        let transit_cases: Vec<(Vec<u8>, bool, Code)> = {
            let mut v = Vec::new();
            // Never a valid version.
            v.push((
                vec![0xee, 1, 0, 4, 0, 0, 0, 0],
                true,
                Code::UnsupportedVersion,
            ));
            // Valid version, unknown kind.
            v.push((vec![1, 9, 0, 4, 0, 0, 0, 0], true, Code::MalformedHeader));
            // Oversize: announces 65535 body bytes (no FIN: refused on the prefix alone).
            let mut big = vec![1u8, 1, 0xff, 0xff];
            big.extend(std::iter::repeat_n(b'a', 2000));
            v.push((big, false, Code::HeaderTooLarge));
            // Truncated: announces 50 bytes, sends 10, then FIN.
            let mut short = vec![1u8, 1, 0, 50];
            short.extend([0u8; 10]);
            v.push((short, true, Code::MalformedHeader));
            // Well-framed body with nonsense inside (unknown flags, zero-length service).
            v.push((vec![1, 1, 0, 3, 0x80, 0, 0], true, Code::MalformedHeader));
            v.push((vec![1, 1, 0, 3, 0, 0, 0], true, Code::MalformedHeader));
            // A hop that is not a neighbour of the transit.
            let mut b = BytesMut::new();
            Header::data("echo".into(), vec!["nowhere".into()], None)
                .encode(&mut b)
                .unwrap();
            v.push((b.to_vec(), true, Code::NotANeighbour));
            v
        };
        for (bytes, finish, code) in &transit_cases {
            let got = expect_reset(&transit, bytes, *finish, &[*code]).await;
            count(&mut want_transit, got);
        }
        // Only transits relay: a site asked to forward to a next hop refuses.
        let mut b = BytesMut::new();
        Header::data("echo".into(), vec!["transit".into()], None)
            .encode(&mut b)
            .unwrap();
        let got = expect_reset(&site, &b, true, &[Code::WrongRole]).await;
        count(&mut want_site, got);

        // The streams opened before the bad ones still carry bytes both ways, and end cleanly.
        via_transit.echo(b"after, via the transit").await;
        at_site.echo(b"after, at the site").await;
        via_transit.finish(b"bye, via the transit").await;
        at_site.finish(b"bye, at the site").await;
        // New streams on the same connections work too.
        Good::open(&transit, &["site"], b"new, via the transit")
            .await
            .finish(b"end")
            .await;
        Good::open(&site, &[], b"new, at the site")
            .await
            .finish(b"end")
            .await;
        assert!(transit.close_reason().is_none() && site.close_reason().is_none());

        // Counted before the connections close: nothing else may have been counted.
        tokio::task::block_in_place(|| {
            assert_eq!(
                errors(&f, "transit"),
                want_transit,
                "transit's errors by code"
            );
            assert_eq!(errors(&f, "site"), want_site, "site's errors by code");
        });
        transit.close(VarInt::from_u32(0), b"done");
        site.close(VarInt::from_u32(0), b"done");
    });
    // Only the two good streams through the transit were relayed; the site relayed nothing.
    assert_eq!(f.metric("transit", "tasman_relayed_streams_total", ""), 2);
    assert_eq!(f.metric("site", "tasman_relayed_streams_total", ""), 0);
}
