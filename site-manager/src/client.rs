//! A typed, blocking client of the site manager's API: the CLI's. It
//! speaks the same model types the server serves (`crate::model`), so the
//! two cannot drift apart; a refusal carries the server's status, word,
//! field and message.

use crate::model::{ErrorBody, Task};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

/// Errors of a call, grouped by what the caller does.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The site manager refused: its message says why.
    #[error("{method} {path}: {status} {}", .body.message)]
    Refused { method: Method, path: String, status: u16, body: ErrorBody },
    /// The site manager could not be reached.
    #[error("{0}")]
    Transport(String),
    /// The answer is not what this client expects (another version?).
    #[error("{path}: unexpected answer: {why}")]
    Decode { path: String, why: String },
    /// Local setup: the CA file, the token.
    #[error("{0}")]
    Setup(String),
    #[error("task {0} did not end in time")]
    Timeout(uuid::Uuid),
}

/// An error with its causes, joined by ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A client of one site manager with one token.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl ApiClient {
    /// `base`: `https://HOST:PORT`; `ca_pem`: the site CA the API's
    /// certificate must chain to.
    pub fn new(base: &str, token: &str, ca_pem: &[u8]) -> Result<ApiClient, ClientError> {
        let ca = reqwest::Certificate::from_pem(ca_pem)
            .map_err(|e| ClientError::Setup(format!("the site CA is not a PEM certificate: {e}")))?;
        let http = reqwest::blocking::Client::builder()
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ClientError::Setup(chain(&e)))?;
        Ok(ApiClient { base: base.trim_end_matches('/').to_string(), token: token.trim().to_string(), http })
    }

    /// One call; `body` is sent as JSON when given.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let mut r = self.http.request(method.clone(), format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            let bytes = serde_json::to_vec(b).map_err(|e| ClientError::Setup(e.to_string()))?;
            r = r.header(reqwest::header::CONTENT_TYPE, "application/json").body(bytes);
        }
        let resp = r.send().map_err(|e| ClientError::Transport(format!("{method} {path}: {}", chain(&e))))?;
        let status = resp.status();
        let text = resp.text().map_err(|e| ClientError::Transport(format!("{method} {path}: {}", chain(&e))))?;
        if !status.is_success() {
            let body = serde_json::from_str::<ErrorBody>(&text).unwrap_or(ErrorBody {
                error: status.canonical_reason().unwrap_or("error").to_string(),
                field: None,
                message: text,
            });
            return Err(ClientError::Refused { method, path: path.to_string(), status: status.as_u16(), body });
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Decode { path: path.to_string(), why: e.to_string() })
    }

    /// GET of a file (a log bundle): its bytes as they came.
    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .map_err(|e| ClientError::Transport(format!("GET {path}: {}", chain(&e))))?;
        let status = resp.status();
        let bytes = resp.bytes().map_err(|e| ClientError::Transport(format!("GET {path}: {}", chain(&e))))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let body = serde_json::from_str::<ErrorBody>(&text).unwrap_or(ErrorBody {
                error: status.canonical_reason().unwrap_or("error").to_string(),
                field: None,
                message: text,
            });
            return Err(ClientError::Refused {
                method: Method::GET,
                path: path.to_string(),
                status: status.as_u16(),
                body,
            });
        }
        Ok(bytes.to_vec())
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>)
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body))
    }

    /// Polls a task until it ends, telling `progress` each time it moved.
    pub fn wait_task(
        &self,
        id: uuid::Uuid,
        timeout: Duration,
        mut progress: impl FnMut(&Task),
    ) -> Result<Task, ClientError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut last: Option<u8> = None;
        loop {
            let t: Task = self.get(&format!("/api/v1/tasks/{id}"))?;
            if last != Some(t.progress) || t.is_finished() {
                progress(&t);
                last = Some(t.progress);
            }
            if t.is_finished() {
                return Ok(t);
            }
            if std::time::Instant::now() > deadline {
                return Err(ClientError::Timeout(id));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}
