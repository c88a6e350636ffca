//! The session: connect, service content, login/logout, and the calls every
//! other module builds on (property retrieval, tasks).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::moref::MoRef;
use crate::soap::{ServerTrust, Soap};
use crate::xml::{Node, Writer};

/// The managers of a vim25 endpoint, from `RetrieveServiceContent`.
#[derive(Debug, Clone)]
pub struct ServiceContent {
    pub root_folder: MoRef,
    pub property_collector: MoRef,
    pub view_manager: MoRef,
    pub session_manager: MoRef,
    pub ovf_manager: Option<MoRef>,
    /// "VirtualCenter" or "HostAgent" (a lone ESXi).
    pub api_type: String,
    pub api_version: String,
    pub full_name: String,
    pub instance_uuid: String,
}

impl ServiceContent {
    pub(crate) fn from_node(n: &Node) -> Result<Self> {
        let rv = n.req("returnval")?;
        let about = rv.req("about")?;
        let req_moref = |name: &str| rv.req(name).and_then(Node::moref);
        Ok(ServiceContent {
            root_folder: req_moref("rootFolder")?,
            property_collector: req_moref("propertyCollector")?,
            view_manager: req_moref("viewManager")?,
            session_manager: req_moref("sessionManager")?,
            ovf_manager: rv.moref_of("ovfManager")?,
            api_type: about.text_of("apiType").unwrap_or_default().to_string(),
            api_version: about.text_of("apiVersion").unwrap_or_default().to_string(),
            full_name: about.text_of("fullName").unwrap_or_default().to_string(),
            instance_uuid: about.text_of("instanceUuid").unwrap_or_default().to_string(),
        })
    }
}

/// A `LocalizedMethodFault` (a task's, a lease's, an import spec's or a
/// missing property's error): its vim25 fault type (`unknown` when the
/// server names none) and its message.
pub(crate) fn localized_fault(e: &Node) -> (String, String) {
    let kind = e.child("fault").and_then(|f| f.xsi_type.clone()).unwrap_or_else(|| "unknown".into());
    let message = e.text_of("localizedMessage").unwrap_or_default().to_string();
    (kind, message)
}

/// A connection to one vCenter (or ESXi host). Shareable between threads:
/// one logged-in session serves concurrent calls.
#[derive(Debug)]
pub struct Client {
    soap: Soap,
    content: ServiceContent,
    /// The credentials of the last login, kept to log in again when the
    /// server has expired the session (vCenter does after idle time);
    /// cleared by logout.
    credentials: Mutex<Option<(String, String)>>,
}

/// How long one SOAP call may take before the connection counts as lost.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);

impl Client {
    /// Connects to `url` (`https://vcenter` or `https://vcenter/sdk`) and
    /// reads the service content; no login yet.
    pub fn connect(url: &str, trust: ServerTrust) -> Result<Client> {
        Self::connect_with_timeout(url, trust, CALL_TIMEOUT)
    }

    pub fn connect_with_timeout(url: &str, trust: ServerTrust, timeout: Duration) -> Result<Client> {
        let mut parsed = reqwest::Url::parse(url).map_err(|e| Error::BadUrl {
            url: url.to_string(),
            message: format!("not a URL ({e}); give https://vcenter or https://vcenter/sdk"),
        })?;
        if parsed.scheme() != "https" && parsed.scheme() != "http" {
            return Err(Error::BadUrl { url: url.to_string(), message: "not an http(s) URL".into() });
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(Error::BadUrl { url: url.to_string(), message: "it names no host".into() });
        }
        if parsed.path() == "/" || parsed.path().is_empty() {
            parsed.set_path("/sdk");
        }
        let soap = Soap::new(parsed, trust, timeout)?;
        let mut w = Writer::new();
        w.moref("_this", &MoRef::new("ServiceInstance", "ServiceInstance"));
        let resp = soap.call("RetrieveServiceContent", &w.finish())?;
        let content = ServiceContent::from_node(&resp)?;
        Ok(Client { soap, content, credentials: Mutex::new(None) })
    }

    pub fn content(&self) -> &ServiceContent {
        &self.content
    }

    pub fn soap(&self) -> &Soap {
        &self.soap
    }

    /// Logs in; the session cookie is kept for every later call.
    pub fn login(&self, user: &str, password: &str) -> Result<()> {
        let mut w = Writer::new();
        w.moref("_this", &self.content.session_manager).text("userName", user).text("password", password);
        match self.soap.call("Login", &w.finish()) {
            Ok(_) => {
                *self.credentials.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((user.to_string(), password.to_string()));
                Ok(())
            }
            Err(Error::InvalidLogin { .. }) => Err(Error::InvalidLogin { user: user.to_string() }),
            Err(e) => Err(e),
        }
    }

    /// Ends the session on the server.
    pub fn logout(&self) -> Result<()> {
        let mut w = Writer::new();
        w.moref("_this", &self.content.session_manager);
        *self.credentials.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let r = self.soap.call("Logout", &w.finish());
        self.soap.forget_session();
        r.map(|_| ())
    }

    /// Calls `method` on `this`, the rest of the arguments written by `args`
    /// in schema order.
    /// A session the server expired is logged in again once, and the call
    /// repeated: NotAuthenticated means the server did not run it.
    pub fn invoke(&self, method: &str, this: &MoRef, args: impl FnOnce(&mut Writer)) -> Result<Node> {
        let mut w = Writer::new();
        w.moref("_this", this);
        args(&mut w);
        let body = w.finish();
        match self.soap.call(method, &body) {
            Err(Error::NotAuthenticated { message }) => {
                let creds = self.credentials.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let Some((user, password)) = creds else { return Err(Error::NotAuthenticated { message }) };
                tracing::info!(method, "the vCenter session expired; logging in again");
                self.login(&user, &password)?;
                self.soap.call(method, &body)
            }
            other => other,
        }
    }

    /// Calls a `*_Task` method and returns its task.
    pub fn invoke_task(&self, method: &str, this: &MoRef, args: impl FnOnce(&mut Writer)) -> Result<MoRef> {
        let resp = self.invoke(method, this, args)?;
        resp.req("returnval")?.moref()
    }

    /// Calls a `*_Task` method and waits for the task to succeed.
    pub fn run_task(&self, method: &str, this: &MoRef, args: impl FnOnce(&mut Writer)) -> Result<TaskInfo> {
        self.run_task_within(method, this, TASK_TIMEOUT, args)
    }

    /// [`Client::run_task`] that fails once the task takes longer than
    /// `timeout`.
    pub fn run_task_within(
        &self,
        method: &str,
        this: &MoRef,
        timeout: Duration,
        args: impl FnOnce(&mut Writer),
    ) -> Result<TaskInfo> {
        let task = self.invoke_task(method, this, args)?;
        self.wait_for_task(&task, timeout)
    }
}

/// One property filter: a type and the property paths wanted of it.
#[derive(Debug, Clone, Copy)]
pub struct PropertySpec<'a> {
    pub kind: &'a str,
    pub paths: &'a [&'a str],
}

/// One object's properties as retrieved.
#[derive(Debug, Clone)]
pub struct ObjectContent {
    pub obj: MoRef,
    pub props: Vec<(String, Node)>,
    /// Properties the server could not give, with the fault type.
    pub missing: Vec<(String, String)>,
}

impl ObjectContent {
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.props.iter().find(|(p, _)| p == path).map(|(_, v)| v)
    }

    pub fn text(&self, path: &str) -> Option<&str> {
        self.get(path).map(|v| v.text.as_str())
    }

    pub fn moref(&self, path: &str) -> Result<Option<MoRef>> {
        self.get(path).map(Node::moref).transpose()
    }

    /// A numeric property (absent: `None`); a value that is not a number
    /// is a protocol error, never a silent zero.
    pub fn number<T: std::str::FromStr>(&self, path: &str) -> Result<Option<T>> {
        match self.get(path) {
            None => Ok(None),
            Some(v) => v
                .text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| Error::Protocol(format!("{} property {path} is not a number: {:?}", self.obj, v.text))),
        }
    }

    /// A property holding an array of references
    /// (`ArrayOfManagedObjectReference`).
    pub fn morefs(&self, path: &str) -> Result<Vec<MoRef>> {
        match self.get(path) {
            None => Ok(Vec::new()),
            Some(v) => v.children.iter().map(Node::moref).collect(),
        }
    }

    pub(crate) fn from_node(n: &Node) -> Result<Self> {
        let obj = n.req("obj")?.moref()?;
        let mut props = Vec::new();
        for p in n.children_named("propSet") {
            let name = p.req_text("name")?.to_string();
            let mut val = p.child("val").cloned().unwrap_or_else(|| Node::new("val"));
            val.name = "val".into();
            props.push((name, val));
        }
        let missing = n
            .children_named("missingSet")
            .map(|m| {
                let path = m.text_of("path").unwrap_or_default().to_string();
                let fault = m.child("fault").map(localized_fault).map_or_else(|| "unknown".into(), |(kind, _)| kind);
                (path, fault)
            })
            .collect();
        Ok(ObjectContent { obj, props, missing })
    }
}

/// How many objects to ask for per round trip; the server may send fewer
/// and a continuation token.
const PAGE: u32 = 1000;

impl Client {
    /// Properties of the objects a container view holds (recursively): one
    /// view, then RetrievePropertiesEx and ContinueRetrievePropertiesEx
    /// until the server has no more.
    pub fn retrieve_from_view(&self, container: &MoRef, specs: &[PropertySpec<'_>]) -> Result<Vec<ObjectContent>> {
        let view = self.create_container_view(container, specs)?;
        let result = self.retrieve(&view, true, specs);
        // A view left behind costs server memory until logout; report the
        // first error only.
        let destroyed = self.invoke("DestroyView", &view, |_| {});
        let result = result?;
        destroyed?;
        Ok(result)
    }

    /// Properties of one object.
    pub fn retrieve_one(&self, obj: &MoRef, paths: &[&str]) -> Result<ObjectContent> {
        let specs = [PropertySpec { kind: &obj.kind, paths }];
        let mut found = self.retrieve(obj, false, &specs)?;
        match found.pop() {
            Some(o) => Ok(o),
            None => Err(Error::ObjectNotFound { obj: obj.clone() }),
        }
    }

    fn create_container_view(&self, container: &MoRef, specs: &[PropertySpec<'_>]) -> Result<MoRef> {
        let resp = self.invoke("CreateContainerView", &self.content.view_manager, |w| {
            w.moref("container", container);
            for s in specs {
                w.text("type", s.kind);
            }
            w.text("recursive", "true");
        })?;
        resp.req("returnval")?.moref()
    }

    fn retrieve(&self, obj: &MoRef, through_view: bool, specs: &[PropertySpec<'_>]) -> Result<Vec<ObjectContent>> {
        let pc = &self.content.property_collector;
        let mut resp = self.invoke("RetrievePropertiesEx", pc, |w| {
            w.open("specSet");
            for s in specs {
                w.open("propSet").text("type", s.kind).text("all", "false");
                for p in s.paths {
                    w.text("pathSet", p);
                }
                w.close("propSet");
            }
            w.open("objectSet").moref("obj", obj).text("skip", if through_view { "true" } else { "false" });
            if through_view {
                w.open_typed("selectSet", "TraversalSpec")
                    .text("name", "view")
                    .text("type", "ContainerView")
                    .text("path", "view")
                    .text("skip", "false")
                    .close("selectSet");
            }
            w.close("objectSet").close("specSet");
            w.open("options").text("maxObjects", &PAGE.to_string()).close("options");
        })?;
        let mut out = Vec::new();
        loop {
            let Some(rv) = resp.child("returnval") else { return Ok(out) };
            for o in rv.children_named("objects") {
                out.push(ObjectContent::from_node(o)?);
            }
            let Some(token) = rv.text_of("token").filter(|t| !t.is_empty()).map(str::to_string) else {
                return Ok(out);
            };
            resp = self.invoke("ContinueRetrievePropertiesEx", pc, |w| {
                w.text("token", &token);
            })?;
        }
    }
}

/// A task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Queued,
    Running,
    Success,
    Error,
}

/// What a task reported.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    pub task: MoRef,
    pub name: String,
    pub state: TaskState,
    pub progress: Option<i32>,
    /// The task's result (`returnval` of the operation), if any.
    pub result: Option<Node>,
    /// The fault type and message when it failed.
    pub error: Option<(String, String)>,
    /// Server times (xsd:dateTime).
    pub queue_time: Option<String>,
    pub start_time: Option<String>,
    pub complete_time: Option<String>,
}

impl TaskInfo {
    pub(crate) fn from_node(task: &MoRef, v: &Node) -> Result<Self> {
        let state = match v.req_text("state")? {
            "queued" => TaskState::Queued,
            "running" => TaskState::Running,
            "success" => TaskState::Success,
            "error" => TaskState::Error,
            other => return Err(Error::Protocol(format!("task {task} has unknown state {other:?}"))),
        };
        let error = v.child("error").map(localized_fault);
        Ok(TaskInfo {
            task: task.clone(),
            name: v.text_of("descriptionId").or(v.text_of("name")).unwrap_or_default().to_string(),
            state,
            progress: v.parse_of("progress")?,
            result: v.child("result").cloned(),
            error,
            queue_time: v.text_of("queueTime").map(str::to_string),
            start_time: v.text_of("startTime").map(str::to_string),
            complete_time: v.text_of("completeTime").map(str::to_string),
        })
    }

    /// The result as a managed object reference (CreateVM_Task's VM).
    pub fn result_moref(&self) -> Result<MoRef> {
        self.result
            .as_ref()
            .ok_or_else(|| Error::Protocol(format!("task {} succeeded without a result", self.task)))?
            .moref()
    }
}

/// How long a task may run before we stop waiting (the task itself goes on
/// in vCenter).
pub const TASK_TIMEOUT: Duration = Duration::from_secs(3600);

impl Client {
    pub fn task_info(&self, task: &MoRef) -> Result<TaskInfo> {
        let o = self.retrieve_one(task, &["info"])?;
        let v = o.get("info").ok_or_else(|| Error::Protocol(format!("task {task} has no info")))?;
        TaskInfo::from_node(task, v)
    }

    /// Waits until the task ends; its error becomes [`Error::TaskFailed`].
    pub fn wait_for_task(&self, task: &MoRef, timeout: Duration) -> Result<TaskInfo> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            let info = self.task_info(task)?;
            match info.state {
                TaskState::Success => return Ok(info),
                TaskState::Error => {
                    let (fault, message) = info.error.clone().unwrap_or_else(|| ("unknown".into(), String::new()));
                    return Err(Error::TaskFailed { task: task.clone(), name: info.name, fault, message });
                }
                TaskState::Queued | TaskState::Running => {}
            }
            if start.elapsed() > timeout {
                return Err(Error::Timeout { what: format!("task {task} ({})", info.name), secs: timeout.as_secs() });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}
