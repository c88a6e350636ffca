//! A vim25 SOAP client for vCenter and ESXi, built on quick-xml and reqwest.
//!
//! It owns sessions (login/logout with the session cookie, server
//! certificates checked against a CA or a pinned thumbprint), inventory
//! retrieval through the PropertyCollector (with continuation), tasks, OVF
//! import from an OVA with NFC lease upload, VM create/reconfigure/power/
//! destroy, guest customisation, and standard port groups; SOAP faults
//! become typed [`Error`]s. Nothing the server sends is unwrapped.
//!
//! It must not know about protection groups, VDSAs or replication: it is a
//! client of one API, used by the site manager and the operator command.
//!
//! The client is blocking (one call, one HTTP exchange) and `Sync`: a
//! logged-in [`Client`] serves concurrent calls from several threads.

mod client;
mod customize;
mod error;
mod inventory;
mod moref;
mod network;
mod ova;
mod ovf;
pub mod soap;
mod vm;
pub mod xml;

pub use client::{
    Client, ObjectContent, PropertySpec, ServiceContent, TaskInfo, TaskState, CALL_TIMEOUT, TASK_TIMEOUT,
};
pub use customize::{Customization, NicIp};
pub use error::{Error, Result};
pub use inventory::{
    ComputeResource, Datacenter, Datastore, Host, Inventory, Network, NicInfo, ResourcePool, VirtualDiskInfo, Vm,
};
pub use moref::MoRef;
pub use network::HostNetworkInfo;
pub use ova::{Ova, OvaEntry};
pub use ovf::{ImportDeadlines, ImportProgress, ImportTarget};
pub use soap::ServerTrust;
pub use vm::{datastore_name, DiskSpec, NicSpec, VmChange, VmSpec};

/// Parser tests on bodies captured from vcsim byte for byte
/// (`tests/fixtures/`).
#[cfg(test)]
mod fixtures {
    use crate::client::{ObjectContent, ServiceContent, TaskInfo, TaskState};
    use crate::moref::MoRef;
    use crate::soap::parse_response;

    fn body(method: &str, bytes: &[u8]) -> crate::xml::Node {
        parse_response(method, 200, bytes).expect("a response element")
    }

    fn objects(n: &crate::xml::Node) -> Vec<ObjectContent> {
        n.child("returnval")
            .expect("returnval")
            .children_named("objects")
            .map(|o| ObjectContent::from_node(o).expect("object"))
            .collect()
    }

    #[test]
    fn service_content() {
        let n =
            body("RetrieveServiceContent", include_bytes!("../tests/fixtures/01-RetrieveServiceContent.response.xml"));
        let sc = ServiceContent::from_node(&n).expect("service content");
        assert_eq!(sc.root_folder, MoRef::new("Folder", "group-d1"));
        assert_eq!(sc.property_collector, MoRef::new("PropertyCollector", "propertyCollector"));
        assert_eq!(sc.ovf_manager, Some(MoRef::new("OvfManager", "OvfManager")));
        assert_eq!(sc.api_type, "VirtualCenter");
        assert_eq!(sc.api_version, "6.5");
    }

    #[test]
    fn login_answer_is_a_response_not_a_fault() {
        let n = body("Login", include_bytes!("../tests/fixtures/02-Login.response.xml"));
        assert_eq!(n.name, "LoginResponse");
        assert_eq!(n.child("returnval").and_then(|r| r.text_of("userName")), Some("user"));
    }

    #[test]
    fn host_properties_with_the_vcsim_xsi_prefix() {
        let n = body(
            "RetrievePropertiesEx",
            include_bytes!("../tests/fixtures/03-RetrievePropertiesEx-hosts-name-datastore.response.xml"),
        );
        let objs = objects(&n);
        assert_eq!(objs.len(), 4);
        assert_eq!(objs[0].obj, MoRef::new("HostSystem", "host-21"));
        assert_eq!(objs[0].text("name"), Some("DC0_H0"));
        assert_eq!(objs[0].get("name").and_then(|v| v.xsi_type.as_deref()), Some("string"));
        let ds = objs[1].morefs("datastore").expect("morefs");
        assert_eq!(ds.len(), 1);
        assert_eq!(ds[0].kind, "Datastore");
        assert!(ds[0].value.starts_with("govcsim-DC0-LocalDS_0"));
    }

    #[test]
    fn import_spec_keeps_its_types_when_written_back() {
        let n = body("CreateImportSpec", include_bytes!("../tests/fixtures/04-CreateImportSpec.response.xml"));
        let spec = n.child("returnval").and_then(|r| r.child("importSpec")).expect("importSpec");
        assert_eq!(spec.xsi_type.as_deref(), Some("VirtualMachineImportSpec"));
        let mut w = crate::xml::Writer::new();
        w.node(spec);
        let out = w.finish();
        assert!(out.contains(r#"<importSpec xsi:type="VirtualMachineImportSpec">"#), "{out}");
        assert!(out.contains(r#"<value xsi:type="xsd:string">192.0.2.10</value>"#), "{out}");
        assert!(out.contains(r#"<device xsi:type="VirtualDisk">"#), "{out}");
        let item = n.child("returnval").and_then(|r| r.child("fileItem")).expect("fileItem");
        assert_eq!(item.text_of("deviceId"), Some("/soap-sample-vm/disk:0"));
    }

    #[test]
    fn lease_and_its_device_urls() {
        let n = body("ImportVApp", include_bytes!("../tests/fixtures/05-ImportVApp.response.xml"));
        let lease = n.child("returnval").expect("returnval").moref().expect("lease");
        assert_eq!(lease.kind, "HttpNfcLease");
        let n = body(
            "RetrievePropertiesEx",
            include_bytes!("../tests/fixtures/06-RetrievePropertiesEx-HttpNfcLease-state-info.response.xml"),
        );
        let o = &objects(&n)[0];
        assert_eq!(o.text("state"), Some("ready"));
        let info = o.get("info").expect("info");
        let du = info.child("deviceUrl").expect("deviceUrl");
        assert_eq!(du.text_of("importKey"), Some("/soap-sample-vm/disk:0"));
        assert!(du.text_of("url").unwrap_or("").starts_with("https://*/nfc/"));
        assert_eq!(info.child("entity").map(|e| e.moref().expect("vm")), Some(MoRef::new("VirtualMachine", "vm-86")));
    }

    #[test]
    fn task_info_success_and_error() {
        let n = body(
            "RetrievePropertiesEx",
            include_bytes!("../tests/fixtures/10-RetrievePropertiesEx-Task-info-success.response.xml"),
        );
        let o = &objects(&n)[0];
        let t = TaskInfo::from_node(&o.obj, o.get("info").expect("info")).expect("task info");
        assert_eq!(t.state, TaskState::Success);
        assert_eq!(t.name, "VirtualMachine.powerOn");
        assert!(t.complete_time.is_some());
        let n = body(
            "RetrievePropertiesEx",
            include_bytes!("../tests/fixtures/11-RetrievePropertiesEx-Task-info-error.response.xml"),
        );
        let o = &objects(&n)[0];
        let t = TaskInfo::from_node(&o.obj, o.get("info").expect("info")).expect("task info");
        assert_eq!(t.state, TaskState::Error);
        assert_eq!(t.error.as_ref().map(|e| e.0.as_str()), Some("InvalidPowerState"));
    }

    #[test]
    fn every_fixture_survives_truncation_without_panicking() {
        let all: [&[u8]; 8] = [
            include_bytes!("../tests/fixtures/01-RetrieveServiceContent.response.xml"),
            include_bytes!("../tests/fixtures/02-Login.response.xml"),
            include_bytes!("../tests/fixtures/03-RetrievePropertiesEx-hosts-name-datastore.response.xml"),
            include_bytes!("../tests/fixtures/04-CreateImportSpec.response.xml"),
            include_bytes!("../tests/fixtures/05-ImportVApp.response.xml"),
            include_bytes!("../tests/fixtures/06-RetrievePropertiesEx-HttpNfcLease-state-info.response.xml"),
            include_bytes!("../tests/fixtures/10-RetrievePropertiesEx-Task-info-success.response.xml"),
            include_bytes!("../tests/fixtures/11-RetrievePropertiesEx-Task-info-error.response.xml"),
        ];
        for doc in all {
            for cut in (0..doc.len()).step_by(7) {
                let _ = parse_response("X", 200, &doc[..cut]);
            }
        }
    }
}
