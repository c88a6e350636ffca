//! The appliance's first step at every boot: its OVF environment (the
//! `ovf-env.xml` vSphere puts on a CD-ROM, the ISO transport) becomes the
//! agent's configuration and the network settings the appliance's init
//! applies. A missing or bad property stops the boot with its name and the
//! problem; nothing is written then, so no appliance runs half-configured
//! (docs/appliance.md).

use super::AgentConfig;
use anyhow::{bail, Context, Result};
use protection_groups::appliance::{
    ApplianceSettings, APPLIANCE_EXPORT_PORT, APPLIANCE_REPLICATION_PORT, APPLIANCE_TAP_PORT,
};
use quick_xml::events::Event;
use std::collections::HashMap;
use std::path::Path;

/// The largest OVF environment read (vSphere's are a few KiB).
const OVF_ENV_MAX: usize = 1 << 20;

/// The properties of an OVF environment document (`Environment` /
/// `PropertySection` / `Property oe:key oe:value`), by key.
pub fn ovf_properties(xml: &str) -> Result<HashMap<String, String>> {
    if xml.len() > OVF_ENV_MAX {
        bail!("the OVF environment is {} bytes; at most {OVF_ENV_MAX}", xml.len());
    }
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut props = HashMap::new();
    let mut root = None;
    loop {
        let e = match reader.read_event().context("the OVF environment is not well-formed XML")? {
            Event::Start(e) | Event::Empty(e) => e,
            Event::Eof => break,
            _ => continue,
        };
        let name = e.local_name();
        if root.is_none() {
            root = Some(String::from_utf8_lossy(name.as_ref()).into_owned());
        }
        if name.as_ref() != b"Property" {
            continue;
        }
        let (mut key, mut value) = (None, None);
        for a in e.attributes() {
            let a = a.context("a Property's attributes are malformed")?;
            let v = a.unescape_value().context("a Property's attribute holds a bad escape")?.into_owned();
            match a.key.local_name().as_ref() {
                b"key" => key = Some(v),
                b"value" => value = Some(v),
                _ => {}
            }
        }
        let Some(key) = key else { bail!("a Property of the OVF environment has no key") };
        props.insert(key, value.unwrap_or_default());
    }
    if root.as_deref() != Some("Environment") {
        bail!("not an OVF environment: the document's root is {:?}, not Environment", root.unwrap_or_default());
    }
    Ok(props)
}

/// The settings an OVF environment gives, checked by the rules the deploy
/// applies too.
pub fn settings_from_ovf_env(xml: &str) -> Result<ApplianceSettings> {
    let props = ovf_properties(xml)?;
    Ok(ApplianceSettings::from_properties(|k| props.get(k).cloned())?)
}

/// The agent's configuration on the appliance: named after its address,
/// its data on the appliance's data volume, listening on its address.
pub fn agent_config(s: &ApplianceSettings, data: &Path) -> Result<AgentConfig> {
    let cfg: AgentConfig = serde_json::from_value(serde_json::json!({
        "name": format!("vdsa-{}", s.ip),
        "data": data,
        "site_manager": s.site_manager,
        "registration_token": s.registration_token,
        "replication_listen": format!("{}:{APPLIANCE_REPLICATION_PORT}", s.ip),
        "tap_listen": [format!("native-tcp:{}:{APPLIANCE_TAP_PORT}", s.ip)],
        "export_listen": format!("{}:{APPLIANCE_EXPORT_PORT}", s.ip),
    }))?;
    cfg.check()?;
    Ok(cfg)
}

/// The network settings as shell assignments for the appliance's init
/// (every value is a checked IPv4 address or number: nothing to quote).
pub fn network_shell(s: &ApplianceSettings) -> String {
    let dns: Vec<String> = s.dns.iter().map(ToString::to_string).collect();
    format!(
        "VDSA_IP={}\nVDSA_PREFIX={}\nVDSA_GATEWAY={}\nVDSA_DNS='{}'\n",
        s.ip,
        s.prefix(),
        s.gateway.map(|g| g.to_string()).unwrap_or_default(),
        dns.join(" ")
    )
}

/// `vdsa appliance-config`: reads the OVF environment, writes the agent's
/// configuration to `config` (whole or not at all) and returns the network
/// settings for the init.
pub fn configure(ovf_env: &Path, data: &Path, config: &Path) -> Result<String> {
    let xml = std::fs::read_to_string(ovf_env).with_context(|| format!("reading {}", ovf_env.display()))?;
    let settings = settings_from_ovf_env(&xml).context("the OVF environment cannot configure this appliance")?;
    let cfg = agent_config(&settings, data)?;
    let json = serde_json::to_vec_pretty(&cfg)?;
    let tmp = config.with_extension("partial");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, config).with_context(|| format!("renaming to {}", config.display()))?;
    Ok(network_shell(&settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(props: &[(&str, &str)]) -> String {
        let p: String =
            props.iter().map(|(k, v)| format!("      <Property oe:key=\"{k}\" oe:value=\"{v}\"/>\n")).collect();
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Environment xmlns=\"http://schemas.dmtf.org/ovf/environment/1\" \
             xmlns:oe=\"http://schemas.dmtf.org/ovf/environment/1\" oe:id=\"\">\n  <PlatformSection><Kind>VMware ESXi</Kind></PlatformSection>\n  \
             <PropertySection>\n{p}  </PropertySection>\n</Environment>\n"
        )
    }

    #[test]
    fn an_ovf_environment_becomes_the_agent_configuration_and_the_network() {
        let token = format!("a&amp;b.{}", "0f".repeat(32));
        let xml = env(&[
            ("ip", "10.0.2.15"),
            ("netmask", "255.255.255.0"),
            ("gateway", "10.0.2.2"),
            ("dns", "10.0.2.3"),
            ("site_manager", "10.0.2.2:9443"),
            ("registration_token", &token),
        ]);
        let s = settings_from_ovf_env(&xml).expect("valid");
        assert_eq!(s.registration_token, format!("a&b.{}", "0f".repeat(32)), "attribute escapes are undone");
        let cfg = agent_config(&s, Path::new("/data/vdsa")).expect("config");
        assert_eq!(cfg.replication_listen, "10.0.2.15:4007");
        assert_eq!(cfg.site_manager, "10.0.2.2:9443");
        assert_eq!(
            network_shell(&s),
            "VDSA_IP=10.0.2.15\nVDSA_PREFIX=24\nVDSA_GATEWAY=10.0.2.2\nVDSA_DNS='10.0.2.3'\n"
        );
    }

    #[test]
    fn a_missing_or_bad_property_and_a_foreign_document_are_named() {
        let e = settings_from_ovf_env(&env(&[("ip", "10.0.2.15"), ("netmask", "255.255.255.0")])).expect_err("no sm");
        assert!(format!("{e:#}").contains("site_manager"), "{e:#}");
        let e = settings_from_ovf_env("<Envelope><Property oe:key=\"ip\" oe:value=\"x\"/></Envelope>").expect_err("x");
        assert!(format!("{e:#}").contains("not an OVF environment"), "{e:#}");
        let e = settings_from_ovf_env("<Environment><Property oe:value=\"x\"/>").expect_err("x");
        assert!(format!("{e:#}").contains("no key"), "{e:#}");
        assert!(settings_from_ovf_env("<Environment><Property oe:key=\"ip\" oe:value=\"x/></Environment>").is_err());
    }
}
