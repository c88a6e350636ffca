//! The VDSA appliance's settings: what the operator gives when deploying the
//! OVA (its vApp properties) and what the appliance reads from its OVF
//! environment at first boot. One rule for both sides: the deploy refuses,
//! before any call to vCenter, exactly what the appliance would refuse at
//! boot (docs/appliance.md).

use std::net::Ipv4Addr;

/// The OVA's properties, in the order the OVF declares them.
pub const APPLIANCE_PROPERTIES: [&str; 6] = ["ip", "netmask", "gateway", "dns", "site_manager", "registration_token"];

/// The port the appliance's VDSA accepts replication links on.
pub const APPLIANCE_REPLICATION_PORT: u16 = 4007;
/// The port it serves recovery exports on (NBD's registered port).
pub const APPLIANCE_EXPORT_PORT: u16 = 10809;
/// The port taps connect to with the native tap protocol.
pub const APPLIANCE_TAP_PORT: u16 = 4010;

/// At most this many DNS servers (what resolv.conf takes).
const DNS_MAX: usize = 3;

/// A property that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the property {property}: {problem}")]
pub struct BadProperty {
    pub property: &'static str,
    pub problem: String,
}

fn bad(property: &'static str, problem: impl Into<String>) -> BadProperty {
    BadProperty { property, problem: problem.into() }
}

/// The appliance's settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplianceSettings {
    pub ip: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// HOST:PORT of the site manager's management listener.
    pub site_manager: String,
    /// `SECRET.CA_SHA256`, one-time.
    pub registration_token: String,
}

impl ApplianceSettings {
    /// Parses the properties as the OVF environment carries them (text;
    /// a missing one reads as empty) and checks them.
    pub fn from_properties(get: impl Fn(&str) -> Option<String>) -> Result<ApplianceSettings, BadProperty> {
        let text = |k: &str| get(k).unwrap_or_default().trim().to_string();
        let ipv4 = |k: &'static str, v: &str| {
            v.parse::<Ipv4Addr>().map_err(|_| bad(k, format!("{v:?} is not an IPv4 address (like 192.0.2.10)")))
        };
        let ip = text("ip");
        if ip.is_empty() {
            return Err(bad("ip", "is empty; the appliance needs a static address"));
        }
        let netmask = text("netmask");
        if netmask.is_empty() {
            return Err(bad("netmask", "is empty"));
        }
        let gateway = text("gateway");
        let dns = text("dns");
        let settings = ApplianceSettings {
            ip: ipv4("ip", &ip)?,
            netmask: ipv4("netmask", &netmask)?,
            gateway: if gateway.is_empty() { None } else { Some(ipv4("gateway", &gateway)?) },
            dns: dns
                .split([',', ' '])
                .filter(|s| !s.is_empty())
                .map(|d| ipv4("dns", d))
                .collect::<Result<Vec<_>, _>>()?,
            site_manager: text("site_manager"),
            registration_token: text("registration_token"),
        };
        settings.check()?;
        Ok(settings)
    }

    /// Every rule the appliance applies at boot; the deploy calls it too.
    pub fn check(&self) -> Result<(), BadProperty> {
        let prefix = prefix_len(self.netmask).map_err(|p| bad("netmask", p))?;
        check_host_address(self.ip, self.netmask).map_err(|p| bad("ip", p))?;
        if let Some(gw) = self.gateway {
            if gw == self.ip {
                return Err(bad("gateway", format!("{gw} is the appliance's own address")));
            }
            if !same_subnet(gw, self.ip, self.netmask) {
                return Err(bad("gateway", format!("{gw} is outside the subnet {}/{prefix}", self.subnet())));
            }
            check_host_address(gw, self.netmask).map_err(|p| bad("gateway", p))?;
        }
        if self.dns.len() > DNS_MAX {
            return Err(bad("dns", format!("{} servers; at most {DNS_MAX}", self.dns.len())));
        }
        check_site_manager(&self.site_manager).map_err(|p| bad("site_manager", p))?;
        check_registration_token(&self.registration_token).map_err(|p| bad("registration_token", p))?;
        Ok(())
    }

    /// The netmask's prefix length (the settings are checked: contiguous).
    pub fn prefix(&self) -> u8 {
        prefix_len(self.netmask).unwrap_or(32)
    }

    /// The subnet's network address.
    pub fn subnet(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.ip) & u32::from(self.netmask))
    }

    /// The properties as the OVA takes them.
    pub fn properties(&self) -> Vec<(String, String)> {
        let dns = self.dns.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>().join(",");
        vec![
            ("ip".into(), self.ip.to_string()),
            ("netmask".into(), self.netmask.to_string()),
            ("gateway".into(), self.gateway.map(|g| g.to_string()).unwrap_or_default()),
            ("dns".into(), dns),
            ("site_manager".into(), self.site_manager.clone()),
            ("registration_token".into(), self.registration_token.clone()),
        ]
    }
}

/// The prefix length of a netmask whose ones are contiguous.
pub fn prefix_len(netmask: Ipv4Addr) -> Result<u8, String> {
    let m = u32::from(netmask);
    let ones = m.leading_ones();
    if m.checked_shl(ones).unwrap_or(0) != 0 {
        return Err(format!("{netmask} is not a netmask: its ones are not contiguous"));
    }
    if ones == 0 {
        return Err(format!("{netmask} is not a netmask: it has no network part"));
    }
    // At most 32, so the cast holds.
    Ok(ones as u8)
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, netmask: Ipv4Addr) -> bool {
    u32::from(a) & u32::from(netmask) == u32::from(b) & u32::from(netmask)
}

/// An address a host may hold in the subnet: neither the network nor the
/// broadcast address (where the subnet has them: /31 and /32 do not), nor
/// an address no host holds (0.0.0.0, loopback, multicast, 255.255.255.255).
pub fn check_host_address(ip: Ipv4Addr, netmask: Ipv4Addr) -> Result<(), String> {
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        return Err(format!("{ip} is not an address a host can hold"));
    }
    let mask = u32::from(netmask);
    if mask.leading_ones() <= 30 {
        let v = u32::from(ip);
        if v & !mask == 0 {
            return Err(format!("{ip} is the network address of its subnet"));
        }
        if v & !mask == !mask {
            return Err(format!("{ip} is the broadcast address of its subnet"));
        }
    }
    Ok(())
}

/// `HOST:PORT`, a host name or IPv4 address and a port in 1..=65535.
pub fn check_site_manager(address: &str) -> Result<(), String> {
    if address.is_empty() {
        return Err("is empty; give the site manager's HOST:PORT".into());
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("{address:?} has no port; give HOST:PORT"));
    };
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !host.starts_with(['.', '-']);
    if !valid_host {
        return Err(format!("{host:?} is not a host name or IPv4 address"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{port:?} is not a port (1 to 65535)")),
    }
}

/// `SECRET.CA_SHA256`: what the site manager's hosts API mints.
pub fn check_registration_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("is empty; mint one with the site manager's hosts API".into());
    }
    let Some((secret, pin)) = token.rsplit_once('.') else {
        return Err("is malformed: expected SECRET.CA_SHA256".into());
    };
    if secret.is_empty() || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("is malformed: its secret is empty or holds spaces".into());
    }
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("is malformed: its CA hash is not 64 hex digits".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn token() -> String {
        format!("s3cret.{}", "ab".repeat(32))
    }

    fn props(over: &[(&str, &str)]) -> Result<ApplianceSettings, BadProperty> {
        let t = token();
        let mut m: HashMap<&str, &str> = [
            ("ip", "192.0.2.10"),
            ("netmask", "255.255.255.0"),
            ("gateway", "192.0.2.1"),
            ("dns", "192.0.2.53, 192.0.2.54"),
            ("site_manager", "sm.example:9443"),
            ("registration_token", t.as_str()),
        ]
        .into_iter()
        .collect();
        for (k, v) in over {
            m.insert(k, v);
        }
        ApplianceSettings::from_properties(|k| m.get(k).map(|v| v.to_string()))
    }

    fn refused(over: &[(&str, &str)]) -> &'static str {
        match props(over) {
            Err(e) => e.property,
            Ok(s) => panic!("{over:?} was accepted: {s:?}"),
        }
    }

    #[test]
    fn good_settings_parse_and_round_trip() {
        let s = props(&[]).expect("valid");
        assert_eq!(s.prefix(), 24);
        assert_eq!(s.dns.len(), 2);
        assert_eq!(s.subnet(), Ipv4Addr::new(192, 0, 2, 0));
        let back: HashMap<String, String> = s.properties().into_iter().collect();
        assert_eq!(ApplianceSettings::from_properties(|k| back.get(k).cloned()), Ok(s));
        assert!(props(&[("gateway", ""), ("dns", "")]).is_ok());
        assert!(props(&[("ip", "10.0.0.1"), ("netmask", "255.255.255.255"), ("gateway", "")]).is_ok());
    }

    #[test]
    fn what_the_appliance_would_refuse_is_named() {
        assert_eq!(refused(&[("netmask", "255.0.255.0")]), "netmask");
        assert_eq!(refused(&[("netmask", "0.0.0.0")]), "netmask");
        assert_eq!(refused(&[("netmask", "")]), "netmask");
        assert_eq!(refused(&[("ip", "")]), "ip");
        assert_eq!(refused(&[("ip", "192.0.2.300")]), "ip");
        assert_eq!(refused(&[("ip", "192.0.2.255")]), "ip");
        assert_eq!(refused(&[("ip", "192.0.2.0")]), "ip");
        assert_eq!(refused(&[("gateway", "192.0.3.1")]), "gateway");
        assert_eq!(refused(&[("gateway", "192.0.2.10")]), "gateway");
        assert_eq!(refused(&[("gateway", "192.0.2.255")]), "gateway");
        assert_eq!(refused(&[("dns", "1.1.1.1,2.2.2.2,3.3.3.3,4.4.4.4")]), "dns");
        assert_eq!(refused(&[("dns", "resolver")]), "dns");
        assert_eq!(refused(&[("site_manager", "")]), "site_manager");
        assert_eq!(refused(&[("site_manager", "sm.example")]), "site_manager");
        assert_eq!(refused(&[("site_manager", "sm.example:0")]), "site_manager");
        assert_eq!(refused(&[("site_manager", ":9443")]), "site_manager");
        assert_eq!(refused(&[("site_manager", "a b:9443")]), "site_manager");
        assert_eq!(refused(&[("registration_token", "")]), "registration_token");
        assert_eq!(refused(&[("registration_token", "abc")]), "registration_token");
        assert_eq!(refused(&[("registration_token", "abc.1234")]), "registration_token");
        let e = props(&[("netmask", "255.0.255.0")]).expect_err("refused");
        assert_eq!(e.to_string(), "the property netmask: 255.0.255.0 is not a netmask: its ones are not contiguous");
    }
}
