//! Every endpoint against bad input, missing or weak tokens, and the
//! OpenAPI document against the routes actually served.

use crate::daemon::Daemon;
use reqwest::Method;
use serde_json::{json, Value};

fn snapshot(d: &Daemon) -> Value {
    json!({
        "site": d.ok(Method::GET, "/api/v1/site", None),
        "tokens": d.ok(Method::GET, "/api/v1/tokens", None),
        "hosts": d.ok(Method::GET, "/api/v1/hosts", None),
        "vpgs": d.ok(Method::GET, "/api/v1/vpgs", None),
    })
}

fn vpg_body(site: &str, host: &str, name: &str) -> String {
    json!({
        "name": name,
        "recovery_site": site,
        "vms": [{
            "id": uuid::Uuid::new_v4(),
            "name": format!("{name}-vm"),
            "host": host,
            "recovery_host": host,
            "disks": [{"id": uuid::Uuid::new_v4(), "name": format!("{name}-disk"), "size_bytes": 1048576}]
        }]
    })
    .to_string()
}

#[test]
fn bad_requests_get_the_right_4xx_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = Daemon::start(dir.path(), None);
    let site = d.ok(Method::GET, "/api/v1/site", None)["id"].as_str().unwrap_or_default().to_string();
    let host = d.ok(Method::POST, "/api/v1/hosts", Some(r#"{"name":"esx-1","hypervisor":"kvm"}"#));
    let host = host["id"].as_str().unwrap_or_default().to_string();
    let created = d.ok(Method::POST, "/api/v1/vpgs", Some(&vpg_body(&site, &host, "web")));
    let vpg = created["vpg"]["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(created["vpg"]["status"], "Initializing");
    assert_eq!(created["task"]["status"], "Running");
    let viewer = d.ok(Method::POST, "/api/v1/tokens", Some(r#"{"name":"ro","role":"viewer"}"#));
    let viewer = viewer["secret"].as_str().unwrap_or_default().to_string();
    let operator = d.ok(Method::POST, "/api/v1/tokens", Some(r#"{"name":"op","role":"operator"}"#));
    let operator_secret = operator["secret"].as_str().unwrap_or_default().to_string();
    let revoked = d.ok(Method::POST, "/api/v1/tokens", Some(r#"{"name":"old","role":"admin"}"#));
    let revoked_id = revoked["token"]["id"].as_str().unwrap_or_default().to_string();
    let revoked = revoked["secret"].as_str().unwrap_or_default().to_string();
    d.ok(Method::DELETE, &format!("/api/v1/tokens/{revoked_id}"), None);
    let before = snapshot(&d);
    let admin = d.admin.clone();
    let unknown = uuid::Uuid::new_v4();
    let good_vpg = vpg_body(&site, &host, "db");
    // A protected disk can grow but not shrink.
    let mut shrunk = created["vpg"]["settings"].clone();
    shrunk["vms"][0]["disks"][0]["size_bytes"] = json!(524288);
    let shrunk = shrunk.to_string();

    // (method, path, token, body, status, field)
    type Case<'a> = (Method, String, Option<&'a str>, Option<String>, u16, Option<&'a str>);
    let cases: Vec<Case> = vec![
        // tokens: none, wrong, revoked
        (Method::GET, "/api/v1/vpgs".into(), None, None, 401, None),
        (Method::GET, "/api/v1/vpgs".into(), Some("smt_wrong"), None, 401, None),
        (Method::GET, "/api/v1/vpgs".into(), Some(&revoked), None, 401, None),
        (Method::POST, "/api/v1/vpgs".into(), Some(&revoked), Some(good_vpg.clone()), 401, None),
        // the viewer reads only; the operator cannot do admin work
        (Method::POST, "/api/v1/vpgs".into(), Some(&viewer), Some(good_vpg.clone()), 403, None),
        (Method::DELETE, format!("/api/v1/vpgs/{vpg}"), Some(&viewer), None, 403, None),
        (
            Method::POST,
            "/api/v1/tokens".into(),
            Some(&operator_secret),
            Some(r#"{"name":"x","role":"admin"}"#.into()),
            403,
            None,
        ),
        (Method::PATCH, "/api/v1/site".into(), Some(&operator_secret), Some(r#"{"name":"x"}"#.into()), 403, None),
        (
            Method::POST,
            "/api/v1/hosts".into(),
            Some(&viewer),
            Some(r#"{"name":"h","hypervisor":"kvm"}"#.into()),
            403,
            None,
        ),
        (Method::GET, "/api/v1/audit".into(), Some(&viewer), None, 403, None),
        (Method::POST, "/api/v1/site/reclaim".into(), Some(&operator_secret), None, 403, None),
        (Method::POST, "/api/v1/site/pairing-tokens".into(), Some(&operator_secret), None, 403, None),
        (
            Method::POST,
            "/api/v1/site/peer".into(),
            Some(&viewer),
            Some(r#"{"address":"127.0.0.1:1","token":"a.b"}"#.into()),
            403,
            None,
        ),
        // pairing: bad input, not paired, a made-up pairing secret
        (
            Method::POST,
            "/api/v1/site/peer".into(),
            Some(&admin),
            Some(r#"{"address":5,"token":"a.b"}"#.into()),
            400,
            Some("address"),
        ),
        (
            Method::POST,
            "/api/v1/site/peer".into(),
            Some(&admin),
            Some(r#"{"address":"127.0.0.1:1","token":"nodot"}"#.into()),
            400,
            Some("token"),
        ),
        (Method::GET, "/api/v1/site/peer".into(), Some(&admin), None, 404, None),
        (Method::DELETE, "/api/v1/site/peer".into(), Some(&admin), None, 404, None),
        (
            Method::POST,
            "/api/v1/pairing".into(),
            None,
            Some(format!(r#"{{"secret":"00","site":"{unknown}","name":"x","address":"127.0.0.1:1","ca_pem":"x"}}"#)),
            403,
            None,
        ),
        (
            Method::POST,
            "/api/v1/pairing".into(),
            None,
            Some(r#"{"secret":"00","site":"not-a-uuid"}"#.into()),
            400,
            Some("site"),
        ),
        // wrong types, missing and unknown fields, bad values
        (Method::POST, "/api/v1/vpgs".into(), Some(&admin), Some(r#"{"name":5}"#.into()), 400, Some("name")),
        (Method::POST, "/api/v1/vpgs".into(), Some(&admin), Some(r#"{"name":"x"}"#.into()), 400, Some("recovery_site")),
        (
            Method::POST,
            "/api/v1/vpgs".into(),
            Some(&admin),
            Some(good_vpg.replace("1048576", "\"big\"")),
            400,
            Some("vms[0].disks[0].size_bytes"),
        ),
        (
            Method::POST,
            "/api/v1/vpgs".into(),
            Some(&admin),
            Some(good_vpg.replace("1048576", "1000")),
            400,
            Some("vms[0].disks[0].size_bytes"),
        ),
        (
            Method::POST,
            "/api/v1/vpgs".into(),
            Some(&admin),
            Some(good_vpg.replace(&host, &unknown.to_string())),
            400,
            Some("vms[0].host"),
        ),
        (
            Method::POST,
            "/api/v1/vpgs".into(),
            Some(&admin),
            Some(good_vpg.replace(&site, &unknown.to_string())),
            400,
            Some("recovery_site"),
        ),
        (
            Method::POST,
            "/api/v1/vpgs".into(),
            Some(&admin),
            Some(good_vpg.replace("\"name\":\"db\"", "\"name\":\"db\",\"colour\":1")),
            400,
            Some("colour"),
        ),
        (
            Method::POST,
            "/api/v1/vpgs".into(),
            Some(&admin),
            Some(good_vpg.replace("\"vms\"", "\"checkpoint_interval_ms\":5,\"vms\"")),
            400,
            Some("checkpoint_interval_ms"),
        ),
        (Method::POST, "/api/v1/vpgs".into(), Some(&admin), Some("{not json".into()), 400, None),
        (
            Method::POST,
            "/api/v1/tokens".into(),
            Some(&admin),
            Some(r#"{"name":"x","role":"root"}"#.into()),
            400,
            Some("role"),
        ),
        (
            Method::POST,
            "/api/v1/tokens".into(),
            Some(&admin),
            Some(r#"{"name":"","role":"viewer"}"#.into()),
            400,
            Some("name"),
        ),
        (Method::POST, "/api/v1/hosts".into(), Some(&admin), Some(r#"{"name":"h"}"#.into()), 400, Some("hypervisor")),
        (
            Method::PATCH,
            "/api/v1/site".into(),
            Some(&admin),
            Some(r#"{"replication_port":70000}"#.into()),
            400,
            Some("replication_port"),
        ),
        (Method::PATCH, "/api/v1/site".into(), Some(&admin), Some(r#"{"name":""}"#.into()), 400, Some("name")),
        (Method::GET, "/api/v1/tasks/not-a-uuid".into(), Some(&admin), None, 400, Some("path")),
        (Method::DELETE, format!("/api/v1/vpgs/{vpg}?force=maybe"), Some(&admin), None, 400, None),
        (
            Method::PUT,
            format!("/api/v1/vpgs/{vpg}"),
            Some(&admin),
            Some(shrunk),
            400,
            Some("vms[0].disks[0].size_bytes"),
        ),
        // unknown ids
        (Method::GET, format!("/api/v1/vpgs/{unknown}"), Some(&admin), None, 404, None),
        (Method::PUT, format!("/api/v1/vpgs/{unknown}"), Some(&admin), Some(good_vpg.clone()), 404, None),
        (Method::DELETE, format!("/api/v1/vpgs/{unknown}"), Some(&admin), None, 404, None),
        (Method::DELETE, format!("/api/v1/vpgs/{vpg}/vms/{unknown}"), Some(&admin), None, 404, None),
        (Method::GET, format!("/api/v1/hosts/{unknown}"), Some(&admin), None, 404, None),
        (Method::DELETE, format!("/api/v1/hosts/{unknown}"), Some(&admin), None, 404, None),
        (Method::POST, format!("/api/v1/hosts/{unknown}/registration-token"), Some(&admin), None, 404, None),
        (Method::GET, format!("/api/v1/tasks/{unknown}"), Some(&admin), None, 404, None),
        (Method::DELETE, format!("/api/v1/tokens/{unknown}"), Some(&admin), None, 404, None),
        // conflicts
        (Method::POST, "/api/v1/vpgs".into(), Some(&admin), Some(vpg_body(&site, &host, "web")), 409, None),
        (Method::DELETE, format!("/api/v1/tokens/{revoked_id}"), Some(&admin), None, 409, None),
        (Method::DELETE, format!("/api/v1/hosts/{host}"), Some(&admin), None, 409, None),
        (
            Method::POST,
            "/api/v1/hosts".into(),
            Some(&admin),
            Some(r#"{"name":"esx-1","hypervisor":"kvm"}"#.into()),
            409,
            None,
        ),
    ];
    for (method, path, token, body, status, field) in cases {
        let (got, v) = d.send(method.clone(), &path, token, body.as_deref());
        assert_eq!(got, status, "{method} {path} {body:?}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {path}: no message in {v}");
        if let Some(f) = field {
            assert_eq!(v["field"], f, "{method} {path} {body:?}: {v}");
        }
    }
    assert_eq!(snapshot(&d), before, "a refused request changed the store");
    // Refusals are audited with who sent them.
    let audit = d.ok(Method::GET, "/api/v1/audit", None);
    let entries = audit.as_array().cloned().unwrap_or_default();
    assert!(entries.iter().any(|e| e["status"] == 401 && e["who"] == "(no valid token)"));
    assert!(entries.iter().any(|e| e["status"] == 403 && e["who"] == "ro"));
    assert!(entries.iter().any(|e| e["status"] == 202 && e["method"] == "POST" && e["path"] == "/api/v1/vpgs"));
}

/// Every documented (path, method) is served, every other method on those
/// paths is 405, and the API's paths are all documented.
#[test]
fn the_openapi_document_and_the_routes_match_both_ways() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = Daemon::start(dir.path(), None);
    let (status, doc) = d.send(Method::GET, "/openapi.json", None, None);
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().cloned().unwrap_or_default();
    assert!(paths.len() >= 10, "{} paths", paths.len());
    let id = uuid::Uuid::new_v4().to_string();
    let methods = [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE];
    for (path, ops) in &paths {
        let concrete: String = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { id.as_str() } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for m in &methods {
            let op = ops.get(m.as_str().to_lowercase());
            let (status, v) = d.send(m.clone(), &concrete, None, None);
            // Operations documented without the bearer scheme (the paired
            // site's calls, a pairing offer) check something else first.
            let open = op.is_some_and(|o| o["security"] == serde_json::json!([{}]));
            if open {
                assert!(matches!(status, 400 | 401), "{m} {path} is documented (open) but answered {status}: {v}");
            } else if op.is_some() {
                assert_eq!(status, 401, "{m} {path} is documented but answered {status}: {v}");
            } else {
                assert_eq!(status, 405, "{m} {path} is not documented but answered {status}: {v}");
            }
        }
    }
    // The other way: the paths the API serves (as the CLI and console use
    // them) are documented; an unknown path is 404.
    for served in ["/api/v1/site", "/api/v1/vpgs", "/api/v1/hosts", "/api/v1/tasks", "/api/v1/tokens", "/api/v1/audit"]
    {
        assert!(paths.contains_key(served), "{served} is served but not documented");
    }
    let (status, _) = d.send(Method::GET, "/api/v1/nothing", None, None);
    assert_eq!(status, 404);
    // Every documented operation says what it answers and has a schema for
    // each body it takes.
    for (path, ops) in &paths {
        for (m, op) in ops.as_object().cloned().unwrap_or_default() {
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{m} {path} documents no response");
        }
    }
}

#[test]
fn the_console_is_served_beside_the_api_and_the_session_names_the_role() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = Daemon::start(dir.path(), None);
    // The page and its files need no token (every call they make does).
    let (status, headers, body) = d.get_raw("/");
    assert_eq!(status, 200, "/ leads to the console");
    assert!(body.contains("<title>Site manager</title>"), "{body}");
    let csp = headers.get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    let (status, headers, _) = d.get_raw("/console/js/vpg.js");
    assert_eq!(status, 200);
    assert_eq!(headers.get("content-type").and_then(|v| v.to_str().ok()), Some("text/javascript; charset=utf-8"));
    assert_eq!(d.get_raw("/console/js/nothing.js").0, 404);
    assert_eq!(d.get_raw("/console/../Cargo.toml").0, 404);
    // The session: the caller's own token and role, for any role; none
    // without a token.
    assert_eq!(d.send(Method::GET, "/api/v1/session", None, None).0, 401);
    assert_eq!(d.ok(Method::GET, "/api/v1/session", None)["role"], "admin");
    let viewer = d.ok(Method::POST, "/api/v1/tokens", Some(r#"{"name":"ro","role":"viewer"}"#));
    let secret = viewer["secret"].as_str().unwrap_or_default().to_string();
    let (status, session) = d.send(Method::GET, "/api/v1/session", Some(&secret), None);
    assert_eq!(status, 200);
    assert_eq!(session["role"], "viewer");
    assert_eq!(session["name"], "ro");
    assert_eq!(session["id"], viewer["token"]["id"]);
    // The checkpoint list's window is checked like any query.
    let site = d.ok(Method::GET, "/api/v1/site", None)["id"].as_str().unwrap_or_default().to_string();
    let host = d.ok(Method::POST, "/api/v1/hosts", Some(r#"{"name":"kvm-1","hypervisor":"kvm"}"#));
    let host = host["id"].as_str().unwrap_or_default().to_string();
    let created = d.ok(Method::POST, "/api/v1/vpgs", Some(&vpg_body(&site, &host, "web")));
    let vpg = created["vpg"]["id"].as_str().unwrap_or_default().to_string();
    let empty = d.ok(Method::GET, &format!("/api/v1/vpgs/{vpg}/checkpoints?since_ms=0&limit=10"), None);
    assert_eq!(empty, json!([]));
    let (status, e) = d.send(Method::GET, &format!("/api/v1/vpgs/{vpg}/checkpoints?limit=many"), Some(&d.admin), None);
    assert_eq!(status, 400, "{e}");
}
