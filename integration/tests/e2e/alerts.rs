//! Alerts at a webhook: with the link to the recovery VDSA cut and
//! stalled, the VPG's RPO passes its threshold and an alert is posted to
//! a receiver in the test; once the link is back it is cleared. The
//! receiver first hangs past the client's timeout and then refuses: the
//! event is retried until it lands, and meanwhile the API answers at once.

use integration::site_lab::{ProtectedSite, SiteSpec};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A webhook receiver: records each request's JSON body; the first
/// request is held 7 s and never answered, the second gets 500, the
/// rest 200.
/// What the receiver got: each request's JSON body.
type Received = Arc<Mutex<Vec<Value>>>;

fn receiver() -> (String, Received) {
    let l = TcpListener::bind("127.0.0.1:0").expect("a port");
    let url = format!("http://{}/hook", l.local_addr().expect("its address"));
    let got = Arc::new(Mutex::new(Vec::new()));
    let got2 = got.clone();
    std::thread::spawn(move || {
        for (n, c) in l.incoming().flatten().enumerate() {
            let got = got2.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(match c.try_clone() {
                    Ok(c) => c,
                    Err(_) => return,
                });
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                got.lock().unwrap_or_else(|p| p.into_inner()).push(v);
                let mut c = c;
                match n {
                    0 => std::thread::sleep(Duration::from_secs(7)),
                    1 => {
                        let _ = c.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n");
                    }
                    _ => {
                        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                    }
                }
            });
        }
    });
    (url, got)
}

#[test]
fn an_rpo_alert_reaches_the_webhook_when_the_link_is_cut_and_clears_when_it_is_back() {
    let _turn = crate::take_turns();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let spec = SiteSpec { recovery_link_proxy: true, ..SiteSpec::one_vm() };
    let site = ProtectedSite::start(lab, dir.path(), &spec, |m| println!("{m}")).expect("a site");
    let sm = site.sm().expect("its site manager");
    let vpg = site.vpg.clone();
    let link = site.recovery_link.as_ref().expect("the proxy");
    let (url, got) = receiver();
    sm.call("PUT", "/api/v1/site/alerts", Some(json!({"webhook_url": url}))).expect("alert settings");
    let refused = sm.call("PUT", "/api/v1/site/alerts", Some(json!({"webhook_url": "ftp://x"}))).err();
    assert!(refused.is_some_and(|e| format!("{e:#}").contains("webhook_url")), "a bad URL was taken");
    // RPO threshold 3 s, checkpoints every second.
    let mut v = sm.get(&format!("/api/v1/vpgs/{vpg}")).expect("the VPG");
    v["settings"]["rpo_alert_secs"] = json!(3);
    sm.call("PUT", &format!("/api/v1/vpgs/{vpg}"), Some(v["settings"].clone())).expect("the threshold");
    sm.wait_until(&format!("/api/v1/vpgs/{vpg}/stats"), Duration::from_secs(60), "a durable checkpoint", |s| {
        s["rpo_ms"].as_u64().is_some_and(|r| r < 3000)
    })
    .expect("protecting");
    let mut guest = site.vms[0].guest().expect("the guest");
    guest.write(0, &[1u8; 4096]).expect("a write");

    // The link is cut and stalls: checkpoints stop becoming durable.
    let cut = Instant::now();
    link.cut();
    link.stall(true);
    let raised = sm
        .wait_until("/api/v1/alerts", Duration::from_secs(60), "the RPO alert", |a| {
            a.as_array()
                .is_some_and(|a| a.iter().any(|x| x["kind"] == "rpo_over_threshold" && x["cleared_ms"].is_null()))
        })
        .expect("an alert");
    println!("alert raised {:.1} s after the cut: {raised}", cut.elapsed().as_secs_f64());
    // While the webhook hangs and then refuses, the API answers at once.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        sm.get("/api/v1/vpgs").expect("the VPG list");
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(slowest < Duration::from_millis(500), "the API was slowed to {slowest:?} by the webhook");
    let delivered = |event: &str| {
        got.lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|v| v["event"] == event && v["alert"]["kind"] == "rpo_over_threshold")
            .count()
    };
    let start = Instant::now();
    while delivered("raised") < 3 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(delivered("raised") >= 3, "the raised event was not retried past a hang and a 500");

    // The link comes back: the alert clears, and the webhook hears it.
    link.stall(false);
    sm.wait_until("/api/v1/alerts", Duration::from_secs(60), "the alert to clear", |a| {
        a.as_array().is_some_and(|a| a.iter().all(|x| x["kind"] != "rpo_over_threshold" || x["cleared_ms"].is_u64()))
    })
    .expect("cleared");
    let start = Instant::now();
    while delivered("cleared") < 1 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(delivered("cleared") >= 1, "the cleared event reached the webhook");

    // The journal volume's alert level: above what the recovery host has
    // free, its VDSA (and only it: the protected host holds no journal) is
    // named; back under it, the alert clears.
    let volume_alerts = |a: &serde_json::Value| -> Vec<serde_json::Value> {
        a.as_array()
            .map(|a| {
                a.iter().filter(|x| x["kind"] == "journal_volume_low" && x["cleared_ms"].is_null()).cloned().collect()
            })
            .unwrap_or_default()
    };
    sm.call(
        "PUT",
        "/api/v1/site/alerts",
        Some(json!({"webhook_url": url, "journal_volume_free_min_bytes": 1u64 << 62})),
    )
    .expect("alert settings");
    let raised = sm
        .wait_until("/api/v1/alerts", Duration::from_secs(30), "the journal volume alert", |a| {
            !volume_alerts(a).is_empty()
        })
        .expect("the journal volume alert");
    let named: Vec<String> =
        volume_alerts(&raised).iter().map(|x| x["subject_name"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(named, vec!["recovery-0".to_string()], "{raised}");
    sm.call("PUT", "/api/v1/site/alerts", Some(json!({"webhook_url": url, "journal_volume_free_min_bytes": 0})))
        .expect("alert settings");
    sm.wait_until("/api/v1/alerts", Duration::from_secs(30), "the journal volume alert to clear", |a| {
        volume_alerts(a).is_empty()
    })
    .expect("cleared");
}
