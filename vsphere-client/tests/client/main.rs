//! The client against a scripted vim25 server, for what vcsim cannot show:
//! a continuation token (vcsim returns everything at once) and a disk
//! upload the server refuses (vcsim accepts any). The server answers from
//! captured vcsim bodies where it can, and records every call.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use vsphere_client::{Client, Error, ImportTarget, MoRef, Ova, ServerTrust};

type Handler = dyn Fn(&str, &str) -> (u16, String) + Send + Sync;

/// A plain-HTTP server that hands each request (SOAP method or upload
/// path) to `handler` and records it.
struct Scripted {
    url: String,
    calls: Arc<Mutex<Vec<String>>>,
}

fn soap_method(body: &str) -> String {
    // The element after <soapenv:Body>.
    body.split("<soapenv:Body><").nth(1).and_then(|r| r.split([' ', '>']).next()).unwrap_or("?").to_string()
}

fn serve(handler: Arc<Handler>) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/sdk", listener.local_addr().expect("addr"));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let rec = calls.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let handler = handler.clone();
            let rec = rec.clone();
            std::thread::spawn(move || {
                let _ = connection(stream, &*handler, &rec);
            });
        }
    });
    Scripted { url, calls }
}

fn connection(stream: TcpStream, handler: &Handler, rec: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            if h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        let what = if path == "/sdk" { soap_method(&body) } else { format!("UPLOAD {path} {len}") };
        rec.lock().unwrap_or_else(|p| p.into_inner()).push(what.clone());
        let (status, reply) = handler(&what, &body);
        write!(out, "HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{reply}", reply.len())?;
    }
}

fn envelope(inner: &str) -> String {
    format!(
        r#"<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema"><soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"#
    )
}

const SERVICE_CONTENT: &str = include_str!("../fixtures/01-RetrieveServiceContent.response.xml");

fn vm_object(i: usize) -> String {
    format!(
        r#"<objects><obj type="VirtualMachine">vm-{i}</obj><propSet><name>name</name><val xsi:type="xsd:string">vm{i}</val></propSet></objects>"#
    )
}

#[test]
fn retrieval_follows_continuation_tokens_to_the_end() {
    let handler: Arc<Handler> = Arc::new(|what: &str, body: &str| {
        let ok = |s: String| (200, envelope(&s));
        match what {
            "RetrieveServiceContent" => (200, SERVICE_CONTENT.to_string()),
            "CreateContainerView" => ok(r#"<CreateContainerViewResponse xmlns="urn:vim25"><returnval type="ContainerView">view-1</returnval></CreateContainerViewResponse>"#.into()),
            "RetrievePropertiesEx" => ok(format!(
                r#"<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><token>page-2</token>{}{}</returnval></RetrievePropertiesExResponse>"#,
                vm_object(1),
                vm_object(2)
            )),
            "ContinueRetrievePropertiesEx" if body.contains("<token>page-2</token>") => ok(format!(
                r#"<ContinueRetrievePropertiesExResponse xmlns="urn:vim25"><returnval><token>page-3</token>{}</returnval></ContinueRetrievePropertiesExResponse>"#,
                vm_object(3)
            )),
            "ContinueRetrievePropertiesEx" if body.contains("<token>page-3</token>") => ok(format!(
                r#"<ContinueRetrievePropertiesExResponse xmlns="urn:vim25"><returnval>{}</returnval></ContinueRetrievePropertiesExResponse>"#,
                vm_object(4)
            )),
            "DestroyView" => ok(r#"<DestroyViewResponse xmlns="urn:vim25"></DestroyViewResponse>"#.into()),
            _ => (500, envelope(r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>unexpected</faultstring><detail><InvalidRequestFault xsi:type="InvalidRequest"/></detail></soapenv:Fault>"#)),
        }
    });
    let server = serve(handler);
    let client = Client::connect(&server.url, ServerTrust::Insecure).expect("connect");
    let vms = client.vms().expect("all pages");
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["vm1", "vm2", "vm3", "vm4"]);
    let calls = server.calls.lock().expect("calls").clone();
    assert_eq!(
        calls,
        [
            "RetrieveServiceContent",
            "CreateContainerView",
            "RetrievePropertiesEx",
            "ContinueRetrievePropertiesEx",
            "ContinueRetrievePropertiesEx",
            "DestroyView"
        ]
    );
}

/// A minimal OVA with a manifest, written here so the test needs no tools.
fn tiny_ova(dir: &std::path::Path) -> std::path::PathBuf {
    let disk = vec![0x5Au8; 10_000];
    let ovf = r#"<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References><File ovf:href="d.vmdk" ovf:id="f1"/></References><NetworkSection><Network ovf:name="n"/></NetworkSection><VirtualSystem ovf:id="vs"><ProductSection><Property ovf:key="ip"/></ProductSection></VirtualSystem></Envelope>"#;
    let sha = |b: &[u8]| -> String {
        ring::digest::digest(&ring::digest::SHA256, b).as_ref().iter().map(|x| format!("{x:02x}")).collect()
    };
    let mf = format!("SHA256(t.ovf)= {}\nSHA256(d.vmdk)= {}\n", sha(ovf.as_bytes()), sha(&disk));
    let path = dir.join("t.ova");
    let mut tar = tar::Builder::new(std::fs::File::create(&path).expect("create"));
    for (name, bytes) in [("t.ovf", ovf.as_bytes()), ("t.mf", mf.as_bytes()), ("d.vmdk", &disk[..])] {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, bytes).expect("append");
    }
    tar.finish().expect("finish");
    path
}

#[test]
fn a_refused_upload_aborts_the_lease_and_removes_the_half_made_vm() {
    let handler: Arc<Handler> = Arc::new(|what: &str, _body: &str| {
        let ok = |s: &str| (200, envelope(s));
        match what {
            "RetrieveServiceContent" => (200, SERVICE_CONTENT.to_string()),
            "CreateImportSpec" => ok(
                r#"<CreateImportSpecResponse xmlns="urn:vim25"><returnval><importSpec xsi:type="VirtualMachineImportSpec"><configSpec><name>t</name><deviceChange><operation>add</operation></deviceChange></configSpec><resPoolEntity type="ResourcePool">rp-1</resPoolEntity></importSpec><fileItem><deviceId>/t/disk:0</deviceId><path>d.vmdk</path><size>10000</size><create>false</create></fileItem></returnval></CreateImportSpecResponse>"#,
            ),
            "ImportVApp" => ok(
                r#"<ImportVAppResponse xmlns="urn:vim25"><returnval type="HttpNfcLease">lease-1</returnval></ImportVAppResponse>"#,
            ),
            "RetrievePropertiesEx" => ok(
                r#"<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="HttpNfcLease">lease-1</obj><propSet><name>state</name><val xsi:type="HttpNfcLeaseState">ready</val></propSet><propSet><name>info</name><val xsi:type="HttpNfcLeaseInfo"><entity type="VirtualMachine">vm-9</entity><deviceUrl><key>/vm-9/disk:0</key><importKey>/t/disk:0</importKey><url>https://*/nfc/lease-1/disk-0.vmdk</url><sslThumbprint></sslThumbprint><disk>true</disk></deviceUrl></val></propSet></objects></returnval></RetrievePropertiesExResponse>"#,
            ),
            "HttpNfcLeaseProgress" => ok(r#"<HttpNfcLeaseProgressResponse xmlns="urn:vim25"/>"#),
            "HttpNfcLeaseAbort" => ok(r#"<HttpNfcLeaseAbortResponse xmlns="urn:vim25"/>"#),
            w if w.starts_with("UPLOAD ") => (507, "datastore full".into()),
            // vCenter removes the VM on abort: Destroy finds it gone.
            "Destroy_Task" => (
                500,
                envelope(
                    r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>gone</faultstring><detail><ManagedObjectNotFoundFault xsi:type="ManagedObjectNotFound"><obj type="VirtualMachine">vm-9</obj></ManagedObjectNotFoundFault></detail></soapenv:Fault>"#,
                ),
            ),
            _ => (
                500,
                envelope(
                    r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>unexpected</faultstring><detail><InvalidRequestFault xsi:type="InvalidRequest"/></detail></soapenv:Fault>"#,
                ),
            ),
        }
    });
    let server = serve(handler);
    let dir = tempfile::tempdir().expect("dir");
    let ova = Ova::open(&tiny_ova(dir.path())).expect("a good OVA");
    let client = Client::connect(&server.url, ServerTrust::Insecure).expect("connect");
    let target = ImportTarget {
        name: "t".into(),
        host: MoRef::new("HostSystem", "host-1"),
        resource_pool: MoRef::new("ResourcePool", "rp-1"),
        folder: MoRef::new("Folder", "f-1"),
        datastore: MoRef::new("Datastore", "ds-1"),
        network_mapping: vec![("n".into(), MoRef::new("Network", "net-1"))],
        properties: vec![("ip".into(), "192.0.2.1".into())],
        extra_config: vec![("vdsa.role".into(), "vdsa".into())],
    };
    let e = client.import_ova(&ova, &target, &|_| {}).expect_err("the upload is refused");
    assert!(matches!(&e, Error::Fault { fault, .. } if fault == "HTTP 507"), "{e:?}");
    let calls = server.calls.lock().expect("calls").clone();
    let upload = calls
        .iter()
        .position(|c| c.starts_with("UPLOAD /nfc/lease-1/disk-0.vmdk 10000"))
        .expect("uploaded to the lease URL");
    let abort = calls.iter().position(|c| c == "HttpNfcLeaseAbort").expect("aborted");
    let destroy = calls.iter().position(|c| c == "Destroy_Task").expect("removed the VM");
    assert!(upload < abort && abort < destroy, "{calls:?}");
    assert!(!calls.iter().any(|c| c == "HttpNfcLeaseComplete"), "{calls:?}");

    // A property the OVA does not have is refused before any call.
    let before = server.calls.lock().expect("calls").len();
    let mut bad = target.clone();
    bad.properties = vec![("hostname".into(), "x".into())];
    let e = client.import_ova(&ova, &bad, &|_| {}).expect_err("unknown property");
    assert!(matches!(&e, Error::InvalidArgument { property: Some(p), .. } if p == "hostname"), "{e:?}");
    assert_eq!(server.calls.lock().expect("calls").len(), before);
}
