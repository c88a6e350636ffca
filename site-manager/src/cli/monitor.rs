//! `site-manager monitor …`: alerts and where they go, a VPG's stats and
//! health report, and the sizing analyzer, over the API.

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;

use super::output::{fields, show};
use crate::client::ApiClient;
use crate::model::{Alert, AlertSettings, HealthDay, VpgStats};
use crate::sizing::{SizingAnswer, SizingRequest};

#[derive(Subcommand, Debug)]
pub enum MonitorOp {
    /// Active alerts, then the recently cleared ones.
    Alerts,
    /// Where alerts are posted, and the failover test time limit.
    AlertSettings {
        /// An http or https URL; empty: nowhere. Without it: show.
        #[arg(long)]
        webhook_url: Option<String>,
        #[arg(long)]
        test_running_limit_secs: Option<u64>,
        /// Alert when a recovery VDSA's journal volume has less free.
        #[arg(long)]
        journal_volume_free_min_bytes: Option<u64>,
    },
    /// A VPG's RPO, bytes written, sent and journalled, tests.
    Stats { vpg: String },
    /// A VPG's health report, per day.
    Health {
        vpg: String,
        /// As CSV (for a spreadsheet) rather than a table.
        #[arg(long)]
        csv: bool,
    },
    /// The bandwidth a target RPO needs and the journal a target history
    /// needs, from a typed rate or a VPG's observed one.
    Sizing {
        #[arg(long)]
        vpg: Option<String>,
        #[arg(long)]
        average_bytes_per_sec: Option<f64>,
        #[arg(long)]
        peak_bytes_per_sec: Option<f64>,
        #[arg(long)]
        compression_ratio: Option<f64>,
        #[arg(long)]
        rpo_secs: u64,
        #[arg(long)]
        history_secs: u64,
    },
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / 1048576.0)
}

pub fn run(api: &ApiClient, json: bool, op: MonitorOp) -> Result<()> {
    match op {
        MonitorOp::Alerts => show(json, &api.get::<Vec<Alert>>("/api/v1/alerts")?, |alerts| {
            let mut rows =
                vec![vec!["kind".into(), "subject".into(), "raised".into(), "cleared".into(), "message".into()]];
            for a in alerts {
                rows.push(vec![
                    format!("{:?}", a.kind),
                    a.subject_name.clone(),
                    a.raised_ms.to_string(),
                    a.cleared_ms.map_or("active".into(), |t| t.to_string()),
                    a.message.clone(),
                ]);
            }
            rows
        }),
        MonitorOp::AlertSettings { webhook_url, test_running_limit_secs, journal_volume_free_min_bytes } => {
            let mut s: AlertSettings = api.get("/api/v1/site/alerts")?;
            if webhook_url.is_some() || test_running_limit_secs.is_some() || journal_volume_free_min_bytes.is_some() {
                if let Some(u) = webhook_url {
                    s.webhook_url = u;
                }
                if let Some(l) = test_running_limit_secs {
                    s.test_running_limit_secs = l;
                }
                if let Some(b) = journal_volume_free_min_bytes {
                    s.journal_volume_free_min_bytes = b;
                }
                s = api.call(Method::PUT, "/api/v1/site/alerts", Some(&s))?;
            }
            show(json, &s, |s| {
                fields(&[
                    ("webhook", s.webhook_url.clone()),
                    ("test running limit", format!("{} s", s.test_running_limit_secs)),
                    ("journal volume alert under", format!("{} MiB free", s.journal_volume_free_min_bytes >> 20)),
                ])
            })
        }
        MonitorOp::Stats { vpg } => show(json, &api.get::<VpgStats>(&format!("/api/v1/vpgs/{vpg}/stats"))?, |s| {
            fields(&[
                ("RPO", s.rpo_ms.map_or("none durable yet".into(), |r| format!("{:.1} s", r as f64 / 1000.0))),
                ("threshold", format!("{} s", s.rpo_threshold_ms / 1000)),
                ("written", mib(s.written_bytes as f64)),
                ("on the link", mib(s.link_bytes as f64)),
                ("journal", mib(s.journal_bytes as f64)),
                ("tests running", s.tests_running.to_string()),
            ])
        }),
        MonitorOp::Health { vpg, csv } => {
            if csv {
                let bytes = api.get_bytes(&format!("/api/v1/vpgs/{vpg}/health?format=csv"))?;
                print!("{}", String::from_utf8_lossy(&bytes));
                return Ok(());
            }
            show(json, &api.get::<Vec<HealthDay>>(&format!("/api/v1/vpgs/{vpg}/health"))?, |days| {
                let mut rows =
                    vec![["day", "written", "on the link", "max RPO", "over threshold", "points", "history"]
                        .map(String::from)
                        .to_vec()];
                for d in days {
                    rows.push(vec![
                        d.day.clone(),
                        mib(d.written_bytes as f64),
                        mib(d.link_bytes as f64),
                        format!("{:.1} s", d.max_rpo_ms as f64 / 1000.0),
                        format!("{} s", d.over_threshold_secs),
                        d.consistent_points.to_string(),
                        format!("{} / {} s", d.history_available_secs, d.history_policy_secs),
                    ]);
                }
                rows
            })
        }
        MonitorOp::Sizing {
            vpg,
            average_bytes_per_sec,
            peak_bytes_per_sec,
            compression_ratio,
            rpo_secs,
            history_secs,
        } => {
            let vpg = match vpg {
                Some(v) => Some(protection_groups::VpgId(v.parse()?)),
                None => None,
            };
            let req = SizingRequest {
                vpg,
                average_bytes_per_sec,
                peak_bytes_per_sec,
                compression_ratio,
                rpo_secs,
                history_secs,
            };
            show(json, &api.post::<SizingAnswer>("/api/v1/sizing", &req)?, |a| {
                fields(&[
                    (
                        "change rate",
                        format!("{}/s average, {}/s peak", mib(a.average_bytes_per_sec), mib(a.peak_bytes_per_sec)),
                    ),
                    ("compression", format!("{:.2} link bytes per written byte", a.compression_ratio)),
                    ("from", a.sources.join(", ")),
                    ("bandwidth", format!("{:.1} Mbit/s", a.bandwidth_bytes_per_sec * 8.0 / 1e6)),
                    (
                        "with compression",
                        format!("{:.1} Mbit/s", a.bandwidth_with_compression_bytes_per_sec * 8.0 / 1e6),
                    ),
                    ("journal", format!("{:.1} GB", a.journal_bytes / 1e9)),
                    ("journal compressed", format!("{:.1} GB", a.journal_with_compression_bytes / 1e9)),
                ])
            })
        }
    }
}
