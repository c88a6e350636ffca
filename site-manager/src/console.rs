//! The web console (docs/console.md): a page and its scripts and styles,
//! built into the binary and served on the API's port. The console's only
//! back end is the API: it holds no state and no routes of its own beyond
//! these files, and it must not carry a second copy of any rule the API
//! enforces (what a role may do is asked of `/api/v1/session`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// One embedded file: its path under `/console/`, media type and bytes.
struct Asset {
    path: &'static str,
    media_type: &'static str,
    body: &'static str,
}

macro_rules! asset {
    ($path:literal, $media:expr) => {
        Asset { path: $path, media_type: $media, body: include_str!(concat!("../console/", $path)) }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("console.css", "text/css; charset=utf-8"),
    asset!("icon.svg", "image/svg+xml"),
    asset!("js/app.js", JS),
    asset!("js/api.js", JS),
    asset!("js/ui.js", JS),
    asset!("js/dashboard.js", JS),
    asset!("js/vpgs.js", JS),
    asset!("js/vpg.js", JS),
    asset!("js/timeline.js", JS),
    asset!("js/new-vpg.js", JS),
    asset!("js/hosts.js", JS),
    asset!("js/tasks.js", JS),
    asset!("js/health.js", JS),
    asset!("js/sizing.js", JS),
];

/// Nothing but the console's own files may load or run: no inline script,
/// no other origin, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `/` and `/console/...`: merged beside the API, readable without a token
/// (the page asks for one; every call it makes carries it).
pub fn router<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(|| async { serve("index.html") }))
        .route(
            "/console/{*path}",
            get(|axum::extract::Path(path): axum::extract::Path<String>| async move { serve(&path) }),
        )
}

fn serve(path: &str) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "no such console file")
            .into_response();
    };
    let mut response = asset.body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.media_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // A new binary brings new files: the browser asks again each time
    // rather than mixing versions.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_names_is_served() {
        let index = ASSETS.iter().find(|a| a.path == "index.html").map(|a| a.body).unwrap_or_default();
        for part in index.split(['"', '\'']).filter(|p| p.starts_with("/console/") && p.len() > "/console/".len()) {
            let path = &part["/console/".len()..];
            assert!(ASSETS.iter().any(|a| a.path == path), "index.html names {part}, which is not embedded");
        }
        // Every module a script imports is embedded too.
        for a in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            for line in a.body.lines().filter(|l| l.starts_with("import ")) {
                let Some(from) = line.split(['"', '\'']).nth(1) else { continue };
                let path = format!("js/{}", from.trim_start_matches("./"));
                assert!(ASSETS.iter().any(|x| x.path == path), "{} imports {from}, which is not embedded", a.path);
            }
        }
    }

    #[test]
    fn an_unknown_file_is_404_and_files_carry_their_type_and_policy() {
        assert_eq!(serve("../Cargo.toml").status(), StatusCode::NOT_FOUND);
        let r = serve("js/app.js");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()), Some(JS));
        assert!(r.headers().contains_key(header::CONTENT_SECURITY_POLICY));
    }
}
