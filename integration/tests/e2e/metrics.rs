//! Prometheus metrics from a running site: `/metrics` parses under the
//! text exposition format's rules (checked by a strict parser here, which
//! is shown to refuse malformed text), a viewer token may scrape and no
//! token may not, and the RPO it gives equals the API's within one
//! checkpoint interval.

use integration::site_lab::{ProtectedSite, SiteSpec};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// One sample: metric name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

fn is_name(s: &str, colon: bool) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || (colon && f == ':'))
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || (colon && x == ':'))
}

/// Parses the text format 0.0.4 strictly: HELP and TYPE before a family's
/// samples, valid names, quoted and escaped label values, float values,
/// histograms with cumulative buckets ending in +Inf equal to _count.
fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), _) if is_name(name, true) => {}
                (Some("TYPE"), Some(name), Some(kind)) if is_name(name, true) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at("unknown type"));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(at("a second TYPE"));
                    }
                }
                _ => return Err(at("a malformed comment")),
            }
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| at("a value that is not a float"))?,
        };
        let (name, labels) = match name_labels.split_once('{') {
            None => (name_labels, Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').ok_or_else(|| at("labels not closed"))?;
                let mut labels = Vec::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    if !is_name(&key, false) || chars.next() != Some('"') {
                        return Err(at("a malformed label"));
                    }
                    let mut val = String::new();
                    loop {
                        match chars.next() {
                            Some('\\') => match chars.next() {
                                Some('n') => val.push('\n'),
                                Some(c @ ('\\' | '"')) => val.push(c),
                                _ => return Err(at("a bad escape")),
                            },
                            Some('"') => break,
                            Some(c) => val.push(c),
                            None => return Err(at("an unterminated label value")),
                        }
                    }
                    labels.push((key, val));
                    match chars.next() {
                        Some(',') | None => {}
                        _ => return Err(at("labels not separated by commas")),
                    }
                }
                (name, labels)
            }
        };
        if !is_name(name, true) {
            return Err(at("a bad metric name"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
            .unwrap_or(name);
        if !types.contains_key(family) {
            return Err(at("a sample before its TYPE"));
        }
        samples.push((name.to_string(), labels, value));
    }
    // Histograms: cumulative buckets, +Inf last and equal to _count.
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let buckets: Vec<&Sample> = samples.iter().filter(|s| s.0 == format!("{family}_bucket")).collect();
        if !buckets.windows(2).all(|w| w[0].2 <= w[1].2) {
            return Err(format!("{family}: buckets are not cumulative"));
        }
        let inf = buckets.last().filter(|b| b.1.iter().any(|(k, v)| k == "le" && v == "+Inf")).map(|b| b.2);
        let count = samples.iter().find(|s| s.0 == format!("{family}_count")).map(|s| s.2);
        if inf.is_none() || inf != count {
            return Err(format!("{family}: the +Inf bucket is not last or differs from _count"));
        }
    }
    Ok(samples)
}

#[test]
fn the_parser_refuses_malformed_exposition_text() {
    let good = "# HELP a_b x\n# TYPE a_b gauge\na_b{k=\"v\\\"q\"} 1.5\n";
    assert_eq!(parse(good).map(|s| s.len()), Ok(1));
    for bad in [
        "a_b 1\n",                                                                        // no TYPE
        "# TYPE a_b gauge\na_b{k=v} 1\n",                                                 // unquoted label
        "# TYPE a_b gauge\na_b one\n",                                                    // not a float
        "# TYPE a_b gauge\n9ab 1\n",                                                      // bad name
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n", // not cumulative
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 3\nh_count 2\n",                       // +Inf differs
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn metrics_parse_and_their_rpo_equals_the_apis() {
    let _turn = crate::take_turns();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
    let site = ProtectedSite::start(lab, dir.path(), &SiteSpec::one_vm(), |m| println!("{m}")).expect("a site");
    let sm = site.sm().expect("its site manager");
    let vpg = site.vpg.clone();
    let mut guest = site.vms[0].guest().expect("the guest");
    for k in 0..64u64 {
        guest.write(k * 65536, &[k as u8; 4096]).expect("a guest write");
    }
    // Automatic checkpoints every second: wait until one is durable.
    sm.wait_until(
        &format!("/api/v1/vpgs/{vpg}/stats"),
        std::time::Duration::from_secs(60),
        "a durable checkpoint",
        |s| s["rpo_ms"].is_u64() && s["written_bytes"].as_u64().is_some_and(|b| b > 0),
    )
    .expect("stats");
    let viewer = sm.post("/api/v1/tokens", json!({"name": "prometheus", "role": "viewer"})).expect("a viewer token");
    let viewer = viewer["secret"].as_str().unwrap_or_default().to_string();
    let (status, _) = sm.get_as("/metrics", None).expect("a scrape");
    assert_eq!(status, 401, "a scrape without a token");
    let before = sm.get(&format!("/api/v1/vpgs/{vpg}/stats")).expect("stats");
    let (status, body) = sm.get_as("/metrics", Some(&viewer)).expect("a scrape");
    let after = sm.get(&format!("/api/v1/vpgs/{vpg}/stats")).expect("stats");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("UTF-8");
    let samples = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let of = |name: &str| -> Vec<&Sample> {
        samples.iter().filter(|s| s.0 == name && s.1.iter().any(|(k, v)| k == "vpg" && *v == vpg)).collect()
    };
    let rpo = of("vdsa_vpg_rpo_seconds").first().map(|s| s.2).unwrap_or_else(|| panic!("no RPO\n{text}"));
    let (lo, hi) = (before["rpo_ms"].as_f64().unwrap_or(0.0), after["rpo_ms"].as_f64().unwrap_or(0.0));
    // Each figure is taken at its own moment; a new durable checkpoint
    // between them resets the RPO: one checkpoint interval (1 s) apart at
    // most.
    let interval = 1000.0;
    let close = |a: f64, b: f64| (a - b).abs() <= interval + 250.0;
    assert!(close(rpo * 1000.0, lo) || close(rpo * 1000.0, hi), "metrics RPO {rpo} s, API {lo}..{hi} ms");
    let status_line =
        samples.iter().find(|s| s.0 == "vdsa_vpg_status" && s.1.iter().any(|(k, v)| k == "vpg" && *v == vpg));
    assert!(status_line.is_some_and(|s| s.1.iter().any(|(k, v)| k == "status" && v == "Protecting")), "{text}");
    assert!(of("vdsa_vpg_written_bytes_total").first().is_some_and(|s| s.2 >= 64.0 * 4096.0), "{text}");
    assert!(samples.iter().any(|s| s.0 == "vdsa_barrier_hold_seconds_count" && s.2 >= 1.0), "{text}");
    let up: Vec<&Sample> = samples.iter().filter(|s| s.0 == "vdsa_host_up").collect();
    assert!(up.len() == 2 && up.iter().all(|s| s.2 == 1.0), "{text}");
    // The tap's write count (64 guest writes at least), the dedup and
    // compression ratios, and each VDSA's queue and memory.
    assert!(of("vdsa_vpg_writes_total").first().is_some_and(|s| s.2 >= 64.0), "{text}");
    assert!(of("vdsa_vpg_dedup_ratio").first().is_some_and(|s| (0.0..=1.0).contains(&s.2)), "{text}");
    assert!(of("vdsa_vpg_compression_ratio").first().is_some_and(|s| s.2 > 0.0), "{text}");
    for family in ["vdsa_host_memory_bytes", "vdsa_host_queue_bytes", "vdsa_host_spill_bytes"] {
        let per_host: Vec<&Sample> = samples.iter().filter(|s| s.0 == family).collect();
        assert_eq!(per_host.len(), 2, "{family} for both VDSAs: {text}");
    }
    assert!(samples.iter().filter(|s| s.0 == "vdsa_host_memory_bytes").all(|s| s.2 > 1e6), "{text}");
    // History available comes from what the recovery VDSA's journal still
    // holds: since the first recoverable point (after the initial sync),
    // never more than the VPG's age.
    let metric = of("vdsa_vpg_history_available_seconds").first().map(|s| s.2).unwrap_or(-1.0);
    let history = after["history_available_secs"].as_f64().unwrap_or(-10.0);
    assert!((metric - history).abs() <= 2.0, "metrics history {metric} s, API {history} s");
    let v = sm.get(&format!("/api/v1/vpgs/{vpg}")).expect("the VPG");
    let stats = sm
        .wait_until(&format!("/api/v1/vpgs/{vpg}/stats"), std::time::Duration::from_secs(30), "history", |s| {
            s["history_available_secs"].as_u64().is_some_and(|h| h >= 3)
        })
        .expect("some history");
    let age = stats["at_ms"].as_u64().unwrap_or(0).saturating_sub(v["created_ms"].as_u64().unwrap_or(0)) / 1000;
    let history = stats["history_available_secs"].as_u64().unwrap_or(0);
    assert!(history <= age && history + 30 >= age, "history {history} s for a VPG {age} s old: {stats}");
    println!("metrics RPO {rpo} s; API {lo}..{hi} ms; {} samples", samples.len());
    // The Grafana dashboard asks only for what the site manager serves
    // (the site link once paired).
    let dashboard: serde_json::Value = serde_json::from_str(packaging::GRAFANA_DASHBOARD).expect("the dashboard");
    let served: Vec<&str> = samples.iter().map(|s| s.0.as_str()).collect();
    for p in dashboard["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().unwrap_or_default();
            for name in
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("vdsa_"))
            {
                assert!(
                    served.contains(&name) || name == "vdsa_site_link_up",
                    "panel {:?} asks for {name}, which /metrics does not serve",
                    p["title"]
                );
            }
        }
    }

    // The health report and the sizing analyzer from the recorded
    // workload, once the 10 s sampler has two samples with writes between.
    sm.wait_until(&format!("/api/v1/vpgs/{vpg}/health"), std::time::Duration::from_secs(60), "a first sample", |h| {
        h[0]["sampled_secs"].as_u64().is_some_and(|s| s >= 10)
    })
    .expect("a first sample");
    for k in 0..64u64 {
        guest.write(k * 65536 + 8192, &[k as u8 ^ 0x55; 4096]).expect("a guest write");
    }
    let health = sm
        .wait_until(&format!("/api/v1/vpgs/{vpg}/health"), std::time::Duration::from_secs(60), "a health row", |h| {
            h[0]["written_bytes"].as_u64().is_some_and(|b| b >= 64 * 4096)
        })
        .expect("a health report");
    let day = &health[0];
    assert!(day["sampled_secs"].as_u64().is_some_and(|s| s >= 10), "{health}");
    assert!(day["consistent_points"].as_u64().is_some_and(|n| n >= 1), "{health}");
    assert!(day["max_rpo_ms"].as_u64().is_some_and(|r| r > 0), "{health}");
    let (status, csv) = sm.get_as(&format!("/api/v1/vpgs/{vpg}/health?format=csv"), Some(&viewer)).expect("CSV");
    let csv = String::from_utf8_lossy(&csv).into_owned();
    assert_eq!(status, 200);
    assert!(csv.starts_with("vpg,day,written_bytes,") && csv.lines().count() == 2, "{csv}");
    let sized =
        sm.post("/api/v1/sizing", json!({"vpg": vpg, "rpo_secs": 10, "history_secs": 3600})).expect("a sizing answer");
    // By hand, from the rates it observed: the link carries the peak, the
    // journal holds an hour at the average plus 5 %.
    let avg = sized["average_bytes_per_sec"].as_f64().unwrap_or(0.0);
    let peak = sized["peak_bytes_per_sec"].as_f64().unwrap_or(0.0);
    let ratio = sized["compression_ratio"].as_f64().unwrap_or(0.0);
    assert!(avg > 0.0 && peak >= avg && ratio > 0.0 && ratio <= 1.0, "{sized}");
    assert_eq!(sized["sources"], json!(["observed", "observed", "observed"]), "{sized}");
    assert_eq!(sized["bandwidth_bytes_per_sec"].as_f64(), Some(peak));
    let journal = avg * 3600.0 * 1.05;
    assert!((sized["journal_bytes"].as_f64().unwrap_or(0.0) - journal).abs() < 1.0, "{sized}");
    assert!((sized["journal_with_compression_bytes"].as_f64().unwrap_or(0.0) - journal * ratio).abs() < 1.0);
}
