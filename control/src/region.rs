//! The CIDR table: which region a client address belongs to.
//!
//! Invariants: every stored network is masked to its prefix (host bits zero), so a lookup is
//! a mask-and-compare per rule; the longest matching prefix wins, and among equal prefixes the
//! rule written first wins. IPv4 and IPv6 rules never match each other's addresses, except that
//! an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is looked up as its IPv4 address.

use std::net::IpAddr;

/// Whether `b` may appear in a region name (`?region=`, headers, config): letters, digits,
/// `-`, `_`, `.`. Anything else makes the name unknown.
pub fn name_byte_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// A parsed `ADDR/PREFIX` network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network bits, host bits zero; IPv4 in the low 32 bits.
    net: u128,
    prefix_len: u8,
    v6: bool,
}

/// Why a CIDR string did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The part before `/` is not an IP address.
    #[error("not an IP address: {0:?}")]
    BadAddress(String),
    /// The prefix is not a number within 0..=32 (IPv4) or 0..=128 (IPv6).
    #[error("bad prefix length: {0:?}")]
    BadPrefix(String),
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a /32 or /128).
    pub fn parse(s: &str) -> Result<Cidr, CidrError> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::BadAddress(addr.to_string()))?;
        let (bits, width, v6) = match ip {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u8, false),
            IpAddr::V6(v6) => (u128::from(v6), 128u8, true),
        };
        let prefix_len = match prefix {
            None => width,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(n) if n <= width => n,
                _ => return Err(CidrError::BadPrefix(p.to_string())),
            },
        };
        Ok(Cidr {
            net: bits & mask(prefix_len, width),
            prefix_len,
            v6,
        })
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (bits, width, v6) = ip_bits(ip);
        v6 == self.v6 && bits & mask(self.prefix_len, width) == self.net
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
}

/// The address as bits, its width, and whether it is IPv6 (mapped IPv4 counts as IPv4).
fn ip_bits(ip: IpAddr) -> (u128, u8, bool) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32, false),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (u128::from(u32::from(v4)), 32, false),
            None => (u128::from(v6), 128, true),
        },
    }
}

/// The mask of the top `prefix_len` bits of a `width`-bit address.
fn mask(prefix_len: u8, width: u8) -> u128 {
    if prefix_len == 0 {
        return 0;
    }
    let all: u128 = if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    };
    let host_bits = u32::from(width - prefix_len);
    all & !(((1u128 << host_bits) - 1) & all)
}

/// Ordered CIDR -> region rules.
#[derive(Clone, Debug, Default)]
pub struct RegionTable {
    rules: Vec<(Cidr, String)>,
}

impl RegionTable {
    /// Builds the table from `(cidr, region)` pairs as written in the config.
    pub fn new<'a>(
        rules: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<RegionTable, CidrError> {
        let mut out = Vec::new();
        for (cidr, region) in rules {
            out.push((Cidr::parse(cidr)?, region.to_string()));
        }
        Ok(RegionTable { rules: out })
    }

    /// The region of the longest matching prefix (first rule on ties), if any rule matches.
    pub fn lookup(&self, ip: IpAddr) -> Option<&str> {
        let mut best: Option<(&Cidr, &str)> = None;
        for (cidr, region) in &self.rules {
            let longer = match best {
                None => true,
                Some((b, _)) => cidr.prefix_len > b.prefix_len,
            };
            if cidr.contains(ip) && longer {
                best = Some((cidr, region));
            }
        }
        best.map(|(_, r)| r)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_masks() {
        let c = Cidr::parse("10.1.2.3/8").unwrap();
        assert!(c.contains(ip("10.200.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert_eq!(c, Cidr::parse("10.0.0.0/8").unwrap());
        let host = Cidr::parse("192.168.1.7").unwrap();
        assert_eq!(host.prefix_len(), 32);
        assert!(host.contains(ip("192.168.1.7")));
        assert!(!host.contains(ip("192.168.1.8")));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("1.2.3.4")));
        assert!(!all.contains(ip("::1")), "an IPv4 rule never matches IPv6");
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("fe80::1")));
        assert!(Cidr::parse("::1/128").unwrap().contains(ip("::1")));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            Cidr::parse("10.0.0.0/33"),
            Err(CidrError::BadPrefix(_))
        ));
        assert!(matches!(
            Cidr::parse("::/129"),
            Err(CidrError::BadPrefix(_))
        ));
        assert!(matches!(
            Cidr::parse("10.0.0.0/x"),
            Err(CidrError::BadPrefix(_))
        ));
        assert!(matches!(
            Cidr::parse("10.0.0/8"),
            Err(CidrError::BadAddress(_))
        ));
        assert!(matches!(Cidr::parse(""), Err(CidrError::BadAddress(_))));
    }

    #[test]
    fn longest_prefix_wins_then_first_rule() {
        let t = RegionTable::new([
            ("10.0.0.0/8", "wide"),
            ("10.1.0.0/16", "narrow"),
            ("10.1.0.0/16", "shadowed"),
            ("2001:db8::/32", "v6"),
        ])
        .unwrap();
        assert_eq!(t.lookup(ip("10.1.9.9")), Some("narrow"));
        assert_eq!(t.lookup(ip("10.2.0.1")), Some("wide"));
        assert_eq!(t.lookup(ip("172.16.0.1")), None);
        assert_eq!(t.lookup(ip("2001:db8::5")), Some("v6"));
        // An IPv4-mapped IPv6 peer (dual-stack listener) is looked up as IPv4.
        assert_eq!(t.lookup(ip("::ffff:10.1.0.1")), Some("narrow"));
        assert_eq!(t.len(), 4);
    }
}
