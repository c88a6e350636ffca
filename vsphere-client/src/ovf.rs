//! OVF import: CreateImportSpec, ImportVApp, the HTTP NFC lease, disk upload
//! with lease progress, then complete, or abort and clean up.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::client::{localized_fault, Client};
use crate::error::{Error, Result};
use crate::moref::MoRef;
use crate::ova::Ova;
use crate::soap::{self, ServerTrust};
use crate::xml::Node;

/// Where and how an OVA is imported.
#[derive(Debug, Clone)]
pub struct ImportTarget {
    /// The new VM's name.
    pub name: String,
    pub host: MoRef,
    pub resource_pool: MoRef,
    pub folder: MoRef,
    pub datastore: MoRef,
    /// OVF network name → network.
    pub network_mapping: Vec<(String, MoRef)>,
    /// vApp (ProductSection) property values.
    pub properties: Vec<(String, String)>,
    /// Extra configuration set on the VM as it is created, so that it is
    /// never seen without it (deploy markers).
    pub extra_config: Vec<(String, String)>,
}

/// Where an import is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportProgress {
    /// The server is making the import spec and the VM.
    Preparing,
    /// Disk bytes sent of the total.
    Uploading { done: u64, total: u64 },
    /// The lease is being completed.
    Completing,
}

/// How long each phase of an import may take: a server that stops
/// answering with the connection open fails the import, naming the phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportDeadlines {
    /// The lease becoming ready (the server making the VM).
    pub lease_ready: Duration,
    /// The disk upload: this plus the time the slowest accepted rate takes.
    pub upload_base: Duration,
    /// The slowest upload rate accepted, bytes per second.
    pub upload_min_rate: u64,
}

impl Default for ImportDeadlines {
    fn default() -> Self {
        ImportDeadlines {
            lease_ready: Duration::from_secs(600),
            upload_base: Duration::from_secs(120),
            upload_min_rate: 1 << 20,
        }
    }
}

impl ImportDeadlines {
    /// The deadline of uploading `bytes`.
    pub fn upload(&self, bytes: u64) -> Duration {
        self.upload_base + Duration::from_secs(bytes / self.upload_min_rate.max(1))
    }
}
/// How often lease progress is reported; vCenter's lease times out after
/// five minutes without it.
const LEASE_KEEPALIVE: Duration = Duration::from_secs(2);
/// How often the caller hears how far the upload is.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// Elements of VirtualMachineConfigSpec that come before `extraConfig` in
/// schema order, nearest last.
const BEFORE_EXTRA_CONFIG: &[&str] = &[
    "name",
    "version",
    "guestId",
    "annotation",
    "files",
    "tools",
    "flags",
    "powerOpInfo",
    "numCPUs",
    "numCoresPerSocket",
    "memoryMB",
    "memoryHotAddEnabled",
    "cpuHotAddEnabled",
    "cpuHotRemoveEnabled",
    "deviceChange",
    "cpuAllocation",
    "memoryAllocation",
    "latencySensitivity",
    "cpuAffinity",
    "memoryAffinity",
    "networkShaper",
    "cpuFeatureMask",
    "extraConfig",
];

impl Client {
    /// Imports `ova` as a new VM and returns it. On any failure after the
    /// lease was taken the lease is aborted and the half-made VM removed.
    pub fn import_ova(
        &self,
        ova: &Ova,
        target: &ImportTarget,
        progress: &(dyn Fn(ImportProgress) + Sync),
    ) -> Result<MoRef> {
        self.import_ova_within(ova, target, &ImportDeadlines::default(), progress)
    }

    /// [`Client::import_ova`] with the phases' deadlines.
    pub fn import_ova_within(
        &self,
        ova: &Ova,
        target: &ImportTarget,
        deadlines: &ImportDeadlines,
        progress: &(dyn Fn(ImportProgress) + Sync),
    ) -> Result<MoRef> {
        for (k, _) in &target.properties {
            if !ova.properties.contains(k) {
                return Err(Error::InvalidArgument {
                    property: Some(k.clone()),
                    message: format!("the OVA has no property {k:?} (it has: {})", ova.properties.join(", ")),
                });
            }
        }
        progress(ImportProgress::Preparing);
        let ovf_manager = self
            .content()
            .ovf_manager
            .clone()
            .ok_or_else(|| Error::Protocol("this endpoint has no OvfManager".into()))?;
        let resp = self.invoke("CreateImportSpec", &ovf_manager, |w| {
            w.text("ovfDescriptor", &ova.descriptor)
                .moref("resourcePool", &target.resource_pool)
                .moref("datastore", &target.datastore);
            w.open("cisp").text("locale", "").text("deploymentOption", "");
            w.text("entityName", &target.name).moref("hostSystem", &target.host);
            for (name, net) in &target.network_mapping {
                w.open("networkMapping").text("name", name).moref("network", net).close("networkMapping");
            }
            for (k, v) in &target.properties {
                w.open("propertyMapping").text("key", k).text("value", v).close("propertyMapping");
            }
            w.text("diskProvisioning", "thin").close("cisp");
        })?;
        let rv = resp.req("returnval")?;
        let errors: Vec<String> = rv
            .children_named("error")
            .map(|e| {
                let (kind, message) = localized_fault(e);
                format!("{kind}: {message}")
            })
            .collect();
        if !errors.is_empty() {
            return Err(Error::InvalidArgument { property: Some("ovfDescriptor".into()), message: errors.join("; ") });
        }
        let mut spec = rv.req("importSpec")?.clone();
        spec.name = "spec".into();
        if !target.extra_config.is_empty() {
            let config = spec
                .children
                .iter_mut()
                .find(|c| c.name == "configSpec")
                .ok_or_else(|| Error::Protocol("the import spec has no configSpec".into()))?;
            for (k, v) in target.extra_config.iter().rev() {
                let mut ov = Node::new("extraConfig");
                ov.xsi_type = Some("OptionValue".into());
                ov.children.push(Node::leaf("key", k));
                let mut value = Node::leaf("value", v);
                value.xsi_type = Some("string".into());
                ov.children.push(value);
                config.insert_after_last_of(BEFORE_EXTRA_CONFIG, ov);
            }
        }
        // (device id, file in the OVA, whether the server creates it). The
        // upload's size comes from the OVA itself; the server's is only
        // checked to be a number.
        let file_items: Vec<(String, String, bool)> = rv
            .children_named("fileItem")
            .map(|f| {
                f.parse_of::<u64>("size")?;
                Ok((
                    f.req_text("deviceId")?.to_string(),
                    f.req_text("path")?.to_string(),
                    f.text_of("create") == Some("true"),
                ))
            })
            .collect::<Result<_>>()?;

        let lease = self
            .invoke("ImportVApp", &target.resource_pool, |w| {
                w.node(&spec).moref("folder", &target.folder).moref("host", &target.host);
            })?
            .req("returnval")?
            .moref()?;

        let entity = std::cell::RefCell::new(None);
        match self.upload_through_lease(ova, &lease, &file_items, &entity, deadlines, progress) {
            Ok(vm) => Ok(vm),
            Err(e) => {
                let abort = self.invoke("HttpNfcLeaseAbort", &lease, |_| {});
                if let Err(a) = abort {
                    tracing::warn!(lease = %lease, error = %a, "aborting the import lease failed");
                }
                // vCenter removes the VM on abort; some servers leave it.
                if let Some(vm) = entity.into_inner() {
                    match self.destroy(&vm) {
                        Ok(()) | Err(Error::ObjectNotFound { .. }) => {}
                        Err(d) => tracing::warn!(vm = %vm, error = %d, "removing the half-imported VM failed"),
                    }
                }
                Err(e)
            }
        }
    }

    fn upload_through_lease(
        &self,
        ova: &Ova,
        lease: &MoRef,
        file_items: &[(String, String, bool)],
        entity: &std::cell::RefCell<Option<MoRef>>,
        deadlines: &ImportDeadlines,
        progress: &(dyn Fn(ImportProgress) + Sync),
    ) -> Result<MoRef> {
        let start = Instant::now();
        loop {
            let o = self.retrieve_one(lease, &["state", "error"])?;
            match o.text("state") {
                Some("ready") => break,
                Some("error") => {
                    let (fault, message) = o.get("error").map(localized_fault).unwrap_or_default();
                    return Err(Error::TaskFailed { task: lease.clone(), name: "import".into(), fault, message });
                }
                Some("initializing") | None => {}
                Some(other) => return Err(Error::Protocol(format!("import lease {lease} is in state {other:?}"))),
            }
            if start.elapsed() > deadlines.lease_ready {
                return Err(Error::Timeout {
                    what: format!("import lease {lease} becoming ready"),
                    secs: deadlines.lease_ready.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let info = self.retrieve_one(lease, &["info"])?;
        let info = info.get("info").ok_or_else(|| Error::Protocol(format!("lease {lease} has no info")))?;
        let vm = info.req("entity")?.moref()?;
        *entity.borrow_mut() = Some(vm.clone());

        // Match each file to upload with its device URL.
        let mut uploads = Vec::new();
        for (device_id, path, create) in file_items {
            let du = info
                .children_named("deviceUrl")
                .find(|d| d.text_of("importKey") == Some(device_id.as_str()))
                .ok_or_else(|| Error::Protocol(format!("lease {lease} has no device URL for {device_id}")))?;
            let url = self.device_url(du.req_text("url")?)?;
            let thumb = du.text_of("sslThumbprint").filter(|t| !t.is_empty()).map(str::to_string);
            let (_, size) = ova.open_entry(path)?;
            uploads.push((path.clone(), url, thumb, *create, size));
        }
        let total: u64 = uploads.iter().map(|u| u.4).sum();
        let done = Arc::new(AtomicU64::new(0));

        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let result = std::thread::scope(|s| {
            // Progress to the caller often, and to the lease (its keep-alive)
            // every LEASE_KEEPALIVE.
            let done_seen = &done;
            let watcher = s.spawn(move || {
                let mut lease_told: Option<Instant> = None;
                loop {
                    let sent = done_seen.load(Ordering::Relaxed);
                    progress(ImportProgress::Uploading { done: sent, total });
                    if lease_told.is_none_or(|t| t.elapsed() >= LEASE_KEEPALIVE) {
                        let percent = (sent * 100).checked_div(total).unwrap_or(0).min(99);
                        if let Err(e) = self.invoke("HttpNfcLeaseProgress", lease, |w| {
                            w.text("percent", &percent.to_string());
                        }) {
                            tracing::warn!(lease = %lease, error = %e, "lease progress failed");
                        }
                        lease_told = Some(Instant::now());
                    }
                    match stop_rx.recv_timeout(PROGRESS_TICK) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            });
            let r = (|| -> Result<()> {
                for (path, url, thumb, create, size) in &uploads {
                    let (reader, _) = ova.open_entry(path)?;
                    let counting = Counting { inner: reader, done: done.clone() };
                    self.upload(url, thumb.as_deref(), *create, *size, deadlines.upload(*size), counting)?;
                }
                Ok(())
            })();
            drop(stop_tx);
            let _ = watcher.join();
            r
        });
        progress(ImportProgress::Uploading { done: done.load(Ordering::Relaxed), total });
        result?;
        progress(ImportProgress::Completing);
        self.invoke("HttpNfcLeaseProgress", lease, |w| {
            w.text("percent", "100");
        })?;
        self.invoke("HttpNfcLeaseComplete", lease, |_| {})?;
        Ok(vm)
    }

    /// The lease's URL with `*` replaced by the host we talk to (vCenter
    /// writes `*` when the client should use the address it connected to).
    fn device_url(&self, raw: &str) -> Result<reqwest::Url> {
        let sdk = self.soap().url();
        if let Some(rest) = raw.strip_prefix("https://*/").or_else(|| raw.strip_prefix("http://*/")) {
            let mut base = sdk.clone();
            base.set_path("/");
            base.set_query(None);
            return base.join(rest).map_err(|e| Error::Protocol(format!("lease device URL {raw:?}: {e}")));
        }
        reqwest::Url::parse(raw).map_err(|e| Error::Protocol(format!("lease device URL {raw:?}: {e}")))
    }

    fn upload(
        &self,
        url: &reqwest::Url,
        thumbprint: Option<&str>,
        create: bool,
        size: u64,
        deadline: Duration,
        body: impl Read + Send + 'static,
    ) -> Result<()> {
        // A host named by the lease with its own thumbprint gets a client
        // pinned to it; otherwise the session's trust applies.
        let pinned;
        let http = match thumbprint {
            Some(t) if url.host_str() != self.soap().url().host_str() => {
                pinned = soap::http_client(&ServerTrust::thumbprint(t)?, None)?;
                &pinned
            }
            _ => self.soap().http(),
        };
        let method = if create { reqwest::Method::PUT } else { reqwest::Method::POST };
        let mut req = http
            .request(method, url.clone())
            .header("Content-Type", "application/x-vnd.vmware-streamVmdk")
            .header("Content-Length", size.to_string())
            .timeout(deadline)
            .body(reqwest::blocking::Body::sized(body, size));
        if let Some(c) = self.soap().cookie() {
            req = req.header("Cookie", c);
        }
        let resp = req.send().map_err(|e| {
            if e.is_timeout() {
                Error::Timeout { what: format!("the disk upload to {url} ({size} bytes)"), secs: deadline.as_secs() }
            } else {
                soap::transport_error(url.as_str(), &e)
            }
        })?;
        if !resp.status().is_success() {
            return Err(Error::Fault {
                method: "disk upload".into(),
                fault: format!("HTTP {}", resp.status().as_u16()),
                message: format!("uploading to {url} failed"),
            });
        }
        Ok(())
    }
}

/// Counts bytes read for progress.
struct Counting<R> {
    inner: R,
    done: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}
