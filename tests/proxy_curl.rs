//! curl (the real binary) through edge -> transit -> site -> nginx.

mod common;

use std::process::Command;

use common::*;

#[test]
fn curl_fetches_through_edge_transit_site_to_nginx_body_intact() {
    let curl = which("curl").expect("curl is not installed: run scripts/deps");
    let www = tempfile::tempdir().unwrap();
    let mut body = vec![0u8; 3 * 1024 * 1024 + 17];
    fill(&mut body, &mut 0x5eed);
    std::fs::write(www.path().join("model.bin"), &body).unwrap();
    let backend = std::net::SocketAddr::new(LOCAL, free_tcp_port(LOCAL));
    let ngx_dir = tempfile::tempdir().unwrap();
    let _nginx = Nginx::start(ngx_dir.path(), www.path(), backend, &[]);
    eventually(DEADLINE, "nginx listening", || {
        std::net::TcpStream::connect(backend).is_ok()
    });

    let port = free_tcp_port(LOCAL);
    let mut y = TopoYaml::default();
    y.edge("syd-edge-1", free_udp(LOCAL), LOCAL, None)
        .transit("syd-transit-1", free_udp(LOCAL))
        .site("syd-site-1", free_udp(LOCAL), &[("llm-chat", backend, 100)])
        .link("syd-edge-1", "syd-transit-1", "500us")
        .link("syd-transit-1", "syd-site-1", "300us")
        .service("llm-chat", port, &[]);
    let mut f = Fabric::new(&y);
    f.start_all();
    f.wait_preferred("syd-edge-1", "llm-chat", "syd-site-1");

    let out = Command::new(curl)
        .args(["-sS", "--fail", "--max-time", "20"])
        .arg(format!("http://127.0.0.1:{port}/model.bin"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}\nedge log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        f.log("syd-edge-1")
    );
    assert_eq!(out.stdout.len(), body.len());
    assert!(out.stdout == body, "body differs");
    // The stream really went through the transit.
    assert!(f.metric("syd-transit-1", "tasman_relayed_streams_total", "") >= 1);
    assert!(f.metric("syd-edge-1", "tasman_bytes_down_total", "") >= body.len() as u64);
    // The transit counts the bytes it forwarded (request and response, not the stream header).
    assert!(f.metric("syd-transit-1", "tasman_relayed_bytes_total", "") >= body.len() as u64);
}
