//! The log collector (docs/api.md "Logs"): a bundle, as a task, of this
//! site manager's log and its connected VDSAs' logs for a time range and
//! a level, written as a tar.gz under `DIR/bundles/`. Each VDSA is asked
//! over its management session and answers with its filtered records; one
//! that does not answer in time is named in the bundle's manifest.

use crate::model::{now_ms, CompletionCode, Task, TaskDriver};
use crate::state::SiteManager;
use crate::store::StoreError;
use protection_groups::logs::{filter, LogLevel};
use protection_groups::mgmt::ManagerMessage;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long a VDSA has to answer.
const ANSWER_WAIT: Duration = Duration::from_secs(15);

/// Opens a daemon's log file for appending, moving an old one past
/// 32 MiB to `.1` first.
pub fn open_log_file(p: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::metadata(p).is_ok_and(|m| m.len() > 32 << 20) {
        std::fs::rename(p, p.with_extension("log.1"))?;
    }
    std::fs::OpenOptions::new().create(true).append(true).open(p)
}

/// What a bundle holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogBundleRequest {
    /// From (ms since the epoch); default: an hour ago.
    pub since_ms: Option<u64>,
    /// To (ms since the epoch); default: now.
    pub until_ms: Option<u64>,
    /// This level or more severe; default: info.
    pub level: Option<LogLevel>,
}

/// One VDSA in a bundle's manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ManifestHost {
    host: String,
    name: String,
    answered: bool,
    truncated: bool,
    error: Option<String>,
}

/// Where the bundle of task `id` is kept.
pub fn bundle_path(sm: &SiteManager, id: uuid::Uuid) -> PathBuf {
    sm.config.data.join("bundles").join(format!("{id}.tar.gz"))
}

/// Why a bundle was not started.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The request's range is empty the wrong way round.
    #[error("since_ms: {since} is after until_ms {until}")]
    Range { since: u64, until: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks the request and starts the task that makes the bundle.
pub fn start_bundle(sm: &Arc<SiteManager>, req: LogBundleRequest) -> Result<Task, BundleError> {
    let until = req.until_ms.unwrap_or_else(now_ms);
    let since = req.since_ms.unwrap_or_else(|| until.saturating_sub(3_600_000));
    if since > until {
        return Err(BundleError::Range { since, until });
    }
    let level = req.level.unwrap_or(LogLevel::Info);
    let task = sm.start_task(
        "collect_logs",
        format!("collect logs at {level:?} and above from {since} to {until} ms"),
        None,
        None,
        TaskDriver::SiteManager,
    )?;
    let (sm, id) = (sm.clone(), task.id);
    tokio::spawn(async move {
        let outcome = make_bundle(&sm, id, since, until, level).await;
        let sm2 = sm.clone();
        let _ = tokio::task::spawn_blocking(move || match outcome {
            Ok(result) => sm2.finish_task(id, CompletionCode::Success, result, None),
            Err(e) => sm2.finish_task(id, CompletionCode::Failed, serde_json::Value::Null, Some(e)),
        })
        .await;
    });
    Ok(task)
}

async fn make_bundle(
    sm: &Arc<SiteManager>,
    id: uuid::Uuid,
    since: u64,
    until: u64,
    level: LogLevel,
) -> Result<serde_json::Value, String> {
    let generation = sm.generation();
    let hosts = sm.with_store(|s| s.hosts.list()).map_err(|e| e.to_string())?;
    let mut asked = Vec::new();
    for h in &hosts {
        let Some(tx) = sm.links.sender(h.id) else {
            asked.push((h.clone(), None));
            continue;
        };
        let (request, answer_rx) = sm.logs.ask();
        let m = ManagerMessage::CollectLogs { generation, request, since_ms: since, until_ms: until, level };
        if tx.send(m).await.is_err() {
            asked.push((h.clone(), None));
            continue;
        }
        asked.push((h.clone(), Some((request, answer_rx))));
    }
    let mut answers = Vec::new();
    for (h, waiting) in asked {
        let (answer, error) = match waiting {
            None => (None, Some("its VDSA is not connected".to_string())),
            Some((request, rx)) => match tokio::time::timeout(ANSWER_WAIT, rx).await {
                Ok(Ok(a)) => (Some(a), None),
                _ => {
                    sm.logs.forget(request);
                    (None, Some(format!("its VDSA did not answer in {} s", ANSWER_WAIT.as_secs())))
                }
            },
        };
        answers.push((h, answer, error));
    }
    let own_log = sm.config.data.join("logs/site-manager.log");
    let path = bundle_path(sm, id);
    let sm2 = sm.clone();
    tokio::task::spawn_blocking(move || {
        let own = std::fs::read(&own_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("(the site manager cannot read its log {}: {e})\n", own_log.display()));
        let mut own_text = filter(&own, since, until, level).join("\n");
        own_text.push('\n');
        let mut files: Vec<(String, Vec<u8>)> = vec![("site-manager.log".into(), own_text.into_bytes())];
        let mut manifest = Vec::new();
        for (h, answer, error) in answers {
            let truncated = answer.as_ref().is_some_and(|a| a.1);
            if let Some((text, _)) = answer {
                files.push((format!("vdsa-{}.log", safe_name(&h.name)), text.into_bytes()));
            }
            manifest.push(ManifestHost {
                host: h.id.to_string(),
                name: h.name.clone(),
                answered: error.is_none(),
                truncated,
                error,
            });
        }
        let site = sm2.site().map(|s| s.name).unwrap_or_default();
        let summary = serde_json::json!({
            "site": site, "since_ms": since, "until_ms": until, "level": level, "made_ms": now_ms(), "hosts": manifest,
        });
        let pretty = serde_json::to_vec_pretty(&summary).map_err(|e| e.to_string())?;
        files.push(("manifest.json".into(), pretty));
        let bytes = write_bundle(&path, &files).map_err(|e| format!("writing {}: {e}", path.display()))?;
        let missing: Vec<&str> = manifest.iter().filter(|m| !m.answered).map(|m| m.name.as_str()).collect();
        Ok(serde_json::json!({"bundle": id, "bytes": bytes, "files": files.len(), "vdsas_missing": missing}))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// A host name as a file name.
fn safe_name(n: &str) -> String {
    n.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect()
}

/// Writes the tar.gz durably; returns its size.
fn write_bundle(path: &Path, files: &[(String, Vec<u8>)]) -> std::io::Result<u64> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("partial");
    let f = std::fs::File::create(&tmp)?;
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mtime = now_ms() / 1000;
    for (name, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(mtime);
        h.set_cksum();
        tar.append_data(&mut h, name, bytes.as_slice())?;
    }
    let f = tar.into_inner()?.finish()?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(std::fs::metadata(path)?.len())
}
