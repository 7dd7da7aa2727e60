//! What decoding one control frame costs in memory, measured with a counting global allocator
//! (`common/counting.rs`). A frame may be
//! [`MAX_TO_ROUTER`] (64 MiB) from the controller and [`MAX_FROM_ROUTER`] (1 MiB) from each
//! router; the decoder must not turn one into many times its size, whatever the frame holds:
//! fields nobody knows, lists of empty values, long strings.

use router::control::proto::{self, FromRouter, MAX_FROM_ROUTER, MAX_TO_ROUTER, ToRouter};

#[path = "common/counting.rs"]
mod counting;

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

/// The most memory in use above what was in use before `f` ran, while it ran (its result
/// dropped inside, so what it decoded counts).
fn peak_of<T>(f: impl FnOnce() -> T) -> usize {
    let before = counting::live();
    counting::reset_peak();
    drop(f());
    (counting::peak() - before).max(0) as usize
}

/// `head`, then `item` repeated (comma-separated) until the frame is about `size` bytes, then
/// `tail`.
fn filled(head: &str, item: &str, tail: &str, size: usize) -> Vec<u8> {
    let room = size - head.len() - tail.len();
    let n = room / (item.len() + 1);
    let mut f = String::with_capacity(size);
    f.push_str(head);
    for i in 0..n {
        if i > 0 {
            f.push(',');
        }
        f.push_str(item);
    }
    f.push_str(tail);
    f.into_bytes()
}

const NODE: &str = r#"{"id":"a","kind":"edge","region":"r","country":"AU","location":{"lat":0,"lon":0},"address":"127.0.0.1:1"}"#;
const EMPTY_LIVE: &str =
    r#""live":{"down_nodes":[],"down_links":[],"link_latency":{},"site_load":{}}"#;

/// How a frame may be filled, and the most memory it may take to decode, in frame sizes.
struct Case {
    what: &'static str,
    frame: Vec<u8>,
    max_factor: f64,
    to_router: bool,
}

/// Nothing of a value that no field takes is kept: not even one byte per frame byte.
const SKIPPED: f64 = 0.01;
/// Real data: a topology's nodes take under three times their JSON.
const NODES: f64 = 4.0;
/// The worst typed data: each `"",` (3 bytes) becomes a 24-byte empty name in a list whose
/// capacity may be up to twice its length.
const EMPTY_NAMES: f64 = 16.0;

fn cases() -> Vec<Case> {
    // The controller's frames at a quarter of their limit (the cost is linear; a whole 64 MiB
    // frame only takes longer in a debug build), each router's at its limit.
    let (to, from) = (MAX_TO_ROUTER / 4, MAX_FROM_ROUTER);
    let snapshot = |topology_head: &str| {
        format!(
            r#"{{"type":"snapshot","version":1,"topology_version":1,{EMPTY_LIVE},"topology":{topology_head}"#
        )
    };
    let case = |what, frame, max_factor, to_router| Case {
        what,
        frame,
        max_factor,
        to_router,
    };
    vec![
        case(
            "a field nobody knows, of empty lists",
            filled(r#"{"type":"heartbeat","version":1,"pad":["#, "[]", "]}", to),
            SKIPPED,
            true,
        ),
        case(
            "a field nobody knows, of empty objects, before the type",
            filled(
                r#"{"pad":["#,
                "{}",
                r#"],"type":"heartbeat","version":1}"#,
                to,
            ),
            SKIPPED,
            true,
        ),
        case(
            "a snapshot whose nodes have a field nobody knows",
            filled(
                &snapshot(
                    r#"{"links":[],"services":[],"nodes":[{"id":"a","kind":"edge","region":"r","country":"AU","location":{"lat":0,"lon":0},"address":"127.0.0.1:1","pad":["#,
                ),
                "[]",
                "]}]}}",
                to,
            ),
            SKIPPED,
            true,
        ),
        case(
            "a snapshot whose site's service has a field nobody knows",
            filled(
                &snapshot(
                    r#"{"links":[],"services":[],"nodes":[{"id":"a","kind":"site","region":"r","country":"AU","location":{"lat":0,"lon":0},"address":"127.0.0.1:1","serves":[{"service":"s","backend":"127.0.0.1:2","capacity":1,"pad":["#,
                ),
                "[]",
                "]}]}]}}",
                to,
            ),
            SKIPPED,
            true,
        ),
        case(
            "an ack with a field nobody knows",
            filled(r#"{"type":"ack","version":1,"pad":["#, "[]", "]}", from),
            SKIPPED,
            false,
        ),
        case(
            "a telemetry report with a field nobody knows",
            filled(
                r#"{"type":"telemetry","node":"a","snapshot_version":1,"sites":[],"neighbours":[],"pad":["#,
                "[]",
                "]}",
                from,
            ),
            SKIPPED,
            false,
        ),
        case(
            "a topology of many nodes",
            filled(
                &snapshot(r#"{"links":[],"services":[],"nodes":["#),
                NODE,
                "]}}",
                to,
            ),
            NODES,
            true,
        ),
        case(
            "a long string",
            filled(r#"{"type":"crl","pem":""#, "x", r#""}"#, to),
            1.01,
            true,
        ),
        case(
            "a service whose residency lists many empty regions",
            filled(
                &snapshot(
                    r#"{"links":[],"nodes":[],"services":[{"name":"s","residency":{"regions":["#,
                ),
                r#""""#,
                "]}}]}}",
                to,
            ),
            EMPTY_NAMES,
            true,
        ),
        case(
            "a telemetry report of many neighbours",
            filled(
                r#"{"type":"telemetry","node":"a","snapshot_version":1,"sites":[],"neighbours":["#,
                r#"{"id":"","rtt_us":0,"up":true}"#,
                "]}",
                from,
            ),
            EMPTY_NAMES,
            false,
        ),
    ]
}

#[test]
fn decoding_a_control_frame_holds_a_few_times_its_size_at_most() {
    let mut failed = Vec::new();
    for c in cases() {
        let len = c.frame.len();
        let (peak, ok) = if c.to_router {
            let frame = c.frame;
            let mut ok = false;
            let peak = peak_of(|| ok = proto::decode::<ToRouter>(&frame).is_ok());
            (peak, ok)
        } else {
            let frame = c.frame;
            let mut ok = false;
            let peak = peak_of(|| ok = proto::decode::<FromRouter>(&frame).is_ok());
            (peak, ok)
        };
        let factor = peak as f64 / len as f64;
        eprintln!(
            "{}: {len} B frame, decoded: {ok}, peak {peak} B ({factor:.2}x, at most {}x)",
            c.what, c.max_factor
        );
        assert!(ok, "{}: the frame is a valid message", c.what);
        if factor > c.max_factor {
            failed.push(format!("{}: {factor:.2}x > {}x", c.what, c.max_factor));
        }
    }
    assert!(failed.is_empty(), "decoding took too much: {failed:?}");
}
