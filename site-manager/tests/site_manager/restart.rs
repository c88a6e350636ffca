//! Restarts: a clean stop and SIGKILLs at random points never lose what
//! the API acknowledged; each start takes a new manager generation.

use crate::daemon::Daemon;
use reqwest::Method;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn a_restart_keeps_everything_and_takes_a_new_generation() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut d = Daemon::start(dir.path(), None);
    let admin = d.admin.clone();
    let g1 = d.ok(Method::GET, "/api/v1/site", None)["generation"].as_u64().unwrap_or(0);
    d.ok(Method::POST, "/api/v1/hosts", Some(r#"{"name":"kvm-1","hypervisor":"kvm"}"#));
    let tok = d.ok(Method::POST, "/api/v1/tokens", Some(r#"{"name":"ops","role":"operator"}"#));
    let before_hosts = d.ok(Method::GET, "/api/v1/hosts", None);
    let before_tokens = d.ok(Method::GET, "/api/v1/tokens", None);
    d.stop();
    let d = Daemon::start(dir.path(), Some(d.port));
    assert_eq!(d.admin, admin, "the admin token is written on the first start only");
    let g2 = d.ok(Method::GET, "/api/v1/site", None)["generation"].as_u64().unwrap_or(0);
    assert_eq!(g2, g1 + 1);
    assert_eq!(d.ok(Method::GET, "/api/v1/hosts", None), before_hosts);
    assert_eq!(d.ok(Method::GET, "/api/v1/tokens", None), before_tokens);
    let secret = tok["secret"].as_str().unwrap_or_default();
    assert_eq!(d.send(Method::GET, "/api/v1/vpgs", Some(secret), None).0, 200, "the operator token survives");
}

/// Clients create hosts and tokens while the site manager is SIGKILLed at
/// random moments; every creation that was answered 201 is there after
/// the restart.
#[test]
fn sigkill_at_random_points_loses_nothing_acknowledged() {
    let seed: u64 = std::env::var("SM_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let kills: usize = std::env::var("SM_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    println!("site manager SIGKILL run: seed {seed}, {kills} kills (SM_KILL_SEED, SM_KILLS)");
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut port = None;
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    for round in 0..kills {
        let mut d = Daemon::start(dir.path(), port);
        port = Some(d.port);
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, acked2) = (stop.clone(), acked.clone());
        let (url, admin) = (d.url(""), d.admin.clone());
        let ca = std::fs::read(dir.path().join("pki/ca.pem")).unwrap_or_default();
        let writer = std::thread::spawn(move || {
            let client = reqwest::blocking::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap_or_else(|e| panic!("{e}")))
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            let mut i = 0;
            while !stop2.load(Ordering::Relaxed) {
                i += 1;
                let (kind, path, body) = if i % 2 == 0 {
                    ("host", "/api/v1/hosts", format!(r#"{{"name":"h-{round}-{i}","hypervisor":"kvm"}}"#))
                } else {
                    ("token", "/api/v1/tokens", format!(r#"{{"name":"t-{round}-{i}","role":"viewer"}}"#))
                };
                let r = client
                    .post(format!("{url}{path}"))
                    .bearer_auth(&admin)
                    .header("content-type", "application/json")
                    .body(body)
                    .send();
                match r {
                    Ok(r) if r.status().as_u16() == 201 => {
                        let v: serde_json::Value =
                            serde_json::from_str(&r.text().unwrap_or_default()).unwrap_or_default();
                        let id = if kind == "host" { v["id"].clone() } else { v["token"]["id"].clone() };
                        if let Ok(mut a) = acked2.lock() {
                            a.push((kind.to_string(), id.as_str().unwrap_or_default().to_string()));
                        }
                    }
                    Ok(_) | Err(_) => {}
                }
            }
        });
        std::thread::sleep(Duration::from_millis(100 + next() % 700));
        d.sigkill();
        stop.store(true, Ordering::Relaxed);
        let _ = writer.join();
    }
    let d = Daemon::start(dir.path(), port);
    let hosts = d.ok(Method::GET, "/api/v1/hosts", None).to_string();
    let tokens = d.ok(Method::GET, "/api/v1/tokens", None).to_string();
    let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
    assert!(acked.len() > kills, "the clients got too few answers ({}) to test anything", acked.len());
    for (kind, id) in &acked {
        let listing = if kind == "host" { &hosts } else { &tokens };
        assert!(listing.contains(id.as_str()), "seed {seed}: acknowledged {kind} {id} is lost");
    }
    println!("{} acknowledged creations survived {kills} SIGKILLs", acked.len());
}
