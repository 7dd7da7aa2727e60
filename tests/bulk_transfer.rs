//! 1 GiB through the fabric arrives byte-exact (SHA-256 checked), both directions at once; and
//! 256 MiB each way through a transit too, although the transit declares its next hop down
//! mid-transfer.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use router::netem::{LinkEmulator, LinkProfile};
use sha2::{Digest, Sha256};

const TOTAL: u64 = 1 << 30;

/// The transit's `--probe-interval` in the test with a transit: a fifth of the default, so that
/// the down verdict comes well before [`CUT`] ends (see there). The site and the edge keep
/// the default.
const TRANSIT_PROBE_INTERVAL: &str = "20ms";

/// How long the transit's link to the site is cut. It must bring a down verdict, and the
/// transit must hear from the site again before `neighbours::DEAD_AFTER` (1 s without any packet
/// from a neighbour declared down closes its connection, and the stream with it).
///
/// The verdict: 3 probes (20 ms apart, re-sent at once when missed, each missed after at least
/// 30 ms) unanswered, or `3 x 20 ms` plus `max(10 ms, 4 x RTT variation)` without a sign of life;
/// with the congestion window full a probe leaves only with quinn's loss probes, and is not
/// missed before it has (`neighbours::Liveness`). The transit hears from the site again only
/// at the first loss probe of either end after the cut ends (quinn's PTO, doubling while nothing
/// is acknowledged: about b, 3b, 7b, 15b after the cut, b = smoothed RTT + 4 x its variation +
/// 25 ms, about 30 ms here), so a verdict after 300 ms but before that still counts, and a cut
/// ending past 15b (450 ms) would bring the site back only at 31b, too close to 1 s. Seen on 2
/// cores beside the 1 GiB test, and beside another test suite too (load average 16): verdicts 85
/// to 283 ms after the cut (once 391, the transit starved), the first packet back 300 to 555 ms
/// after it. With the default 100 ms probes the verdict came 500 ms after the cut, about when
/// the first packet crossed (2 runs), and 88298d1 saw one about 700 ms after the last packet.
const CUT: Duration = Duration::from_millis(300);

#[test]
fn one_gib_arrives_byte_exact_in_both_directions() {
    let backend = echo_backend("");
    let port = free_tcp_port(LOCAL);
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .site("site", free_udp(LOCAL), &[("bulk", backend, 10)])
        .link("edge", "site", "1ms")
        .service("bulk", port, &[]);
    let mut f = Fabric::new(&y);
    f.start_all();
    f.wait_preferred("edge", "bulk", "site");
    echo_through(port, TOTAL);
    assert!(f.metric("edge", "tasman_bytes_up_total", "") >= TOTAL);
    assert!(f.metric("edge", "tasman_bytes_down_total", "") >= TOTAL);
    // Path MTU discovery took the connection past what a 1500-byte IPv4 path carries (1,472
    // bytes of UDP payload; loopback carries the router's 6,500-byte bound), and the metric
    // reports it.
    eventually(DEADLINE, "edge's path MTU to site above 1472", || {
        f.metric(
            "edge",
            "tasman_neighbour_path_mtu_bytes",
            "neighbour=\"site\"",
        ) > 1472
    });
}

/// 256 MiB each way through a transit arrive intact although the transit declares its next hop
/// down mid-transfer: a down verdict only stops new streams, it must not reset an answered one
/// (it did, before `neighbours::DEAD_AFTER`; CPU starvation on 2 cores caused such verdicts).
///
/// The transit dials the site through a link emulator (`--dial`), cut once the transfer is
/// under way for [`CUT`], after which the emulator restores the link on its own
/// (`LinkHandle::cut_for`): how long the outage lasts does not depend on when this test gets
/// the CPU next. The verdict is asserted, not assumed: the transit's neighbour-down counter, and
/// its log about the site, rose after the cut.
#[test]
fn bulk_through_a_transit_arrives_intact_although_its_next_hop_is_declared_down() {
    const BULK: u64 = 256 << 20;
    // The emulator's tasks run on this runtime, alive as long as it is.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = echo_backend("");
    let port = free_tcp_port(LOCAL);
    let site_addr = free_udp(LOCAL);
    let link = rt
        .block_on(LinkEmulator::spawn(
            (LOCAL, 0).into(),
            site_addr,
            LinkProfile::default(),
        ))
        .unwrap();
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .transit("transit", free_udp(LOCAL))
        .site("site", site_addr, &[("bulk", backend, 10)])
        .link("edge", "transit", "1ms")
        .link("transit", "site", "1ms")
        .service("bulk", port, &[]);
    let mut f = Fabric::new(&y);
    f.start("site");
    let dial = format!("site={}", link.local_addr());
    f.start_with(
        "transit",
        &["--dial", &dial, "--probe-interval", TRANSIT_PROBE_INTERVAL],
    );
    f.start("edge");
    f.wait_preferred("edge", "bulk", "site");
    let site_downs = |f: &Fabric| {
        without_colours(&f.log("transit"))
            .lines()
            .filter(|l| l.contains("neighbour down") && l.contains("neighbour=site"))
            .count()
    };

    let transfer = std::thread::spawn(move || echo_through(port, BULK));
    let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // The stream is answered (bytes came back), and the transit holds the site up: not in
        // the hold-down of a verdict of its own (starved of CPU), in which the cut would bring
        // none.
        eventually(DEADLINE, "the transfer under way, the site up", || {
            f.metric("edge", "tasman_bytes_down_total", "") >= 32 << 20
                && f.metric("transit", "tasman_neighbour_up", "neighbour=\"site\"") == 1
        });
        let before = (
            f.metric("transit", "tasman_neighbour_down_total", ""),
            site_downs(&f),
        );
        let forwarded = link.stats().forwarded;
        link.cut_for(CUT);
        let cut = (Instant::now(), SystemTime::now());
        // The link comes back on its own. Only for the report: when the first packet went
        // through it again (polled).
        let mut last = forwarded;
        let back = loop {
            let now = link.stats().forwarded;
            if (now != last && cut.0.elapsed() >= CUT) || cut.0.elapsed() >= DEADLINE {
                break cut.0.elapsed();
            }
            last = now;
            std::thread::sleep(Duration::from_millis(1));
        };
        (before, cut.1, back)
    }));
    let run = transfer.join();
    if cut.is_err() || run.is_err() {
        for node in ["edge", "transit", "site"] {
            eprintln!("--- {node} log:\n{}", f.log(node));
        }
        eprintln!("--- link: {link:?} {:?}", link.stats());
        std::panic::resume_unwind(cut.err().or(run.err()).unwrap());
    }
    let ((downs, logged), cut_at, back) = cut.unwrap();
    // The margins: each verdict about the site, from the cut on (the emulator restored the link
    // at CUT; the transit closes a connection silent for `DEAD_AFTER`, 1 s, after its verdict).
    let transit_log = without_colours(&f.log("transit"));
    let verdicts: Vec<String> = transit_log
        .lines()
        .filter(|l| l.contains("neighbour down") && l.contains("neighbour=site"))
        .map(|l| match since(cut_at, l) {
            Some(d) => format!("{:+.0} ms: {l}", d * 1e3),
            None => l.to_string(),
        })
        .collect();
    println!(
        "link cut for {CUT:?}, the first packet through it again {back:?} after the cut; {:?}; \
         the transit's verdicts about the site:\n{}",
        link.stats(),
        verdicts.join("\n")
    );
    // The cut (or the machine's load, just before it) brought a verdict about the site while
    // the answered stream ran.
    assert!(
        f.metric("transit", "tasman_neighbour_down_total", "") > downs,
        "no down verdict after the cut"
    );
    assert!(
        site_downs(&f) > logged,
        "the transit's verdict after the cut was not about the site:\n{transit_log}"
    );
    assert!(link.stats().dropped_cut > 0, "{:?}", link.stats());
    assert!(f.metric("transit", "tasman_relayed_streams_total", "") >= 1);
    for node in ["edge", "transit"] {
        for code in ["upstream_lost", "next_hop_unreachable"] {
            let filter = format!("code=\"{code}\"");
            assert_eq!(
                f.metric(node, "tasman_stream_errors_total", &filter),
                0,
                "{node} counted {code}"
            );
        }
    }
    drop(rt);
}

/// How long [`echo_through`] waits for one read or write to make progress before failing.
const STALL: Duration = Duration::from_secs(60);

/// Sends `total` pseudo-random bytes to an echo service on `port` while reading the echo; checks
/// the count and the SHA-256 of what came back.
fn echo_through(port: u16, total: u64) {
    let s = TcpStream::connect((LOCAL, port)).unwrap();
    // A stall fails the test instead of hanging it: no byte either way for a minute.
    s.set_read_timeout(Some(STALL)).unwrap();
    s.set_write_timeout(Some(STALL)).unwrap();
    let mut w = s.try_clone().unwrap();
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < total {
            let n = buf.len().min((total - sent) as usize);
            fill(&mut buf[..n], &mut seed);
            h.update(&buf[..n]);
            w.write_all(&buf[..n]).unwrap();
            sent += n as u64;
        }
        w.shutdown(Shutdown::Write).unwrap();
        h.finalize()
    });
    let mut r = s;
    let mut h = Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf).expect("read from the fabric");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n as u64;
    }
    let sent_hash = writer.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} MiB each way in {secs:.1}s ({:.0} MB/s per direction, debug build)",
        total >> 20,
        total as f64 / secs / 1e6
    );
    assert_eq!(got, total, "byte count differs");
    assert_eq!(h.finalize(), sent_hash, "SHA-256 differs");
}

/// `log` without its ANSI colour sequences (ESC `[` ... a letter), which tracing puts between a
/// field's name and its value.
fn without_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Up to and including the sequence's final byte.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Seconds from `t` to the timestamp that starts a router's log line (tracing's UTC
/// `2026-12-01T05:53:31.216939Z`), within a day either way; `None` for a line without one.
fn since(t: SystemTime, line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let time = stamp.split_once('T')?.1.strip_suffix('Z')?;
    let mut hms = time.split(':');
    let h: f64 = hms.next()?.parse().ok()?;
    let m: f64 = hms.next()?.parse().ok()?;
    let s: f64 = hms.next()?.parse().ok()?;
    let of_day = |secs: f64| secs.rem_euclid(86_400.0);
    let at = of_day(h * 3600.0 + m * 60.0 + s);
    let t = of_day(t.duration_since(UNIX_EPOCH).ok()?.as_secs_f64());
    // Across midnight, the nearer way round.
    Some((at - t + 43_200.0).rem_euclid(86_400.0) - 43_200.0)
}
