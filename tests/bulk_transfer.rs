//! 1 GiB through the fabric arrives byte-exact (SHA-256 checked), both directions at once.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

use common::*;
use sha2::{Digest, Sha256};

const TOTAL: u64 = 1 << 30;

fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind((LOCAL, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
fn one_gib_arrives_byte_exact_in_both_directions() {
    let backend = echo_backend();
    let port = free_tcp_port(LOCAL);
    let mut y = TopoYaml::default();
    y.edge("edge", free_udp(LOCAL), LOCAL, None)
        .site("site", free_udp(LOCAL), &[("bulk", backend, 10)])
        .link("edge", "site", "1ms")
        .service("bulk", port, &[]);
    let mut f = Fabric::new(&y);
    f.start_all();
    f.wait_preferred("edge", "bulk", "site");

    let s = TcpStream::connect((LOCAL, port)).unwrap();
    let mut w = s.try_clone().unwrap();
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < TOTAL {
            let n = buf.len().min((TOTAL - sent) as usize);
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
        "1 GiB each way in {secs:.1}s ({:.0} MB/s per direction, debug build)",
        TOTAL as f64 / secs / 1e6
    );
    assert_eq!(got, TOTAL, "byte count differs");
    assert_eq!(h.finalize(), sent_hash, "SHA-256 differs");
    assert!(f.metric("edge", "tasman_bytes_up_total", "") >= TOTAL);
    assert!(f.metric("edge", "tasman_bytes_down_total", "") >= TOTAL);
}
