//! Routing rules: which targets go through the proxy egress, which go
//! direct, which are blocked.
//!
//! A pure core: [`RuleSet::parse`] compiles rule text once into hash and
//! prefix-table matchers, and [`RuleSet::decide`] answers for one target
//! without I/O and without scanning the rule list.
//!
//! Syntax, one rule per line (`#` starts a comment):
//!
//! ```text
//! default direct            # action when nothing matches (default: proxy)
//! block   *.ads.example     # the domain and every name under it
//! direct  .corp.example     # same as *.corp.example
//! proxy   example.org       # exactly this name
//! direct  10.0.0.0/8        # a CIDR (IPv4 or IPv6)
//! block   ::1               # an IP literal (a /32 or /128)
//! proxy   api-*.example.com # a glob: `*` matches any run of characters
//! ```
//!
//! Names compare case-insensitively and without a trailing dot. Unicode
//! names must be written in their IDN punycode (`xn--`) form; targets are
//! compared as they arrive (SOCKS5 and HTTP carry punycode).
//!
//! Evaluation: any matching `block` rule blocks; otherwise the most
//! specific matching `direct`/`proxy` rule decides (exact name, then the
//! longest suffix, then globs in file order; the longest CIDR prefix);
//! otherwise the default.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

/// What to do with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Through the configured egress (an upstream or tunnel; direct when
    /// none is configured).
    Proxy,
    /// Straight from this host.
    Direct,
    /// Refused.
    Block,
}

impl Action {
    fn parse(s: &str) -> Option<Action> {
        match s.to_ascii_lowercase().as_str() {
            "proxy" => Some(Action::Proxy),
            "direct" => Some(Action::Direct),
            "block" => Some(Action::Block),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Proxy => "proxy",
            Action::Direct => "direct",
            Action::Block => "block",
        })
    }
}

/// A rule that did not compile, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct RuleError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// The target of a connection, as far as rules care.
#[derive(Debug, Clone, Copy)]
pub enum Host<'a> {
    /// A name (any case, optional trailing dot).
    Name(&'a str),
    /// An address.
    Ip(IpAddr),
}

/// The outcome of [`RuleSet::decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// What to do.
    pub action: Action,
    /// The 1-based line of the rule that matched; `None` for the default.
    pub rule: Option<usize>,
}

/// A glob with `*` wildcards, matched without backtracking blow-up.
#[derive(Debug, Clone)]
struct Glob {
    parts: Vec<String>,
    anchored_start: bool,
    anchored_end: bool,
}

impl Glob {
    fn new(p: &str) -> Glob {
        Glob {
            parts: p
                .split('*')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            anchored_start: !p.starts_with('*'),
            anchored_end: !p.ends_with('*'),
        }
    }

    fn matches(&self, s: &str) -> bool {
        let mut rest = s;
        let n = self.parts.len();
        for (i, part) in self.parts.iter().enumerate() {
            if i == 0 && self.anchored_start {
                let Some(r) = rest.strip_prefix(part.as_str()) else {
                    return false;
                };
                rest = r;
                if n == 1 && self.anchored_end {
                    return rest.is_empty();
                }
                continue;
            }
            if i == n - 1 && self.anchored_end {
                return rest.len() >= part.len() && rest.ends_with(part.as_str());
            }
            match rest.find(part.as_str()) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        // No parts (only stars), or the last part was not end-anchored.
        true
    }
}

/// A matching rule: its action and 1-based line.
type Hit = (Action, usize);

/// Names and CIDRs for one group of actions, compiled.
#[derive(Debug, Default, Clone)]
struct Matcher {
    exact: HashMap<String, (Action, usize)>,
    suffix: HashMap<String, (Action, usize)>,
    globs: Vec<(Glob, Action, usize)>,
    /// Prefix tables keyed by length, longest first when looked up.
    v4: Vec<(u8, HashMap<u32, Hit>)>,
    v6: Vec<(u8, HashMap<u128, Hit>)>,
}

fn mask4(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - len))
    }
}

fn mask6(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - len))
    }
}

impl Matcher {
    fn add_cidr(&mut self, ip: IpAddr, len: u8, v: (Action, usize)) {
        match ip {
            IpAddr::V4(a) => {
                let key = mask4(u32::from(a), len);
                let t = match self.v4.iter().position(|(l, _)| *l == len) {
                    Some(i) => &mut self.v4[i].1,
                    None => {
                        self.v4.push((len, HashMap::new()));
                        self.v4.sort_by_key(|t| std::cmp::Reverse(t.0));
                        let i = self.v4.iter().position(|(l, _)| *l == len).unwrap_or(0);
                        &mut self.v4[i].1
                    }
                };
                t.entry(key).or_insert(v);
            }
            IpAddr::V6(a) => {
                let key = mask6(u128::from(a), len);
                let t = match self.v6.iter().position(|(l, _)| *l == len) {
                    Some(i) => &mut self.v6[i].1,
                    None => {
                        self.v6.push((len, HashMap::new()));
                        self.v6.sort_by_key(|t| std::cmp::Reverse(t.0));
                        let i = self.v6.iter().position(|(l, _)| *l == len).unwrap_or(0);
                        &mut self.v6[i].1
                    }
                };
                t.entry(key).or_insert(v);
            }
        }
    }

    fn ip(&self, ip: IpAddr) -> Option<(Action, usize)> {
        // An IPv4-mapped IPv6 address is treated as the IPv4 address.
        let ip = match ip {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4
                    .iter()
                    .find_map(|(len, t)| t.get(&mask4(a, *len)).copied())
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6
                    .iter()
                    .find_map(|(len, t)| t.get(&mask6(a, *len)).copied())
            }
        }
    }

    /// `name` is already normalized.
    fn name(&self, name: &str) -> Option<(Action, usize)> {
        if let Some(v) = self.exact.get(name) {
            return Some(*v);
        }
        // Longest suffix first: the name itself, then each parent.
        let mut rest = name;
        loop {
            if let Some(v) = self.suffix.get(rest) {
                return Some(*v);
            }
            match rest.find('.') {
                Some(i) => rest = &rest[i + 1..],
                None => break,
            }
        }
        self.globs
            .iter()
            .find(|(g, _, _)| g.matches(name))
            .map(|(_, a, l)| (*a, *l))
    }

    fn host(&self, h: &HostNorm<'_>) -> Option<(Action, usize)> {
        match h {
            HostNorm::Ip(ip) => self.ip(*ip),
            HostNorm::Name(n) => self.name(n),
        }
    }
}

enum HostNorm<'a> {
    Name(std::borrow::Cow<'a, str>),
    Ip(IpAddr),
}

fn normalize(h: Host<'_>) -> HostNorm<'_> {
    match h {
        Host::Ip(ip) => HostNorm::Ip(ip),
        Host::Name(n) => {
            let n = n.strip_suffix('.').unwrap_or(n);
            let bare = n
                .strip_prefix('[')
                .and_then(|x| x.strip_suffix(']'))
                .unwrap_or(n);
            if let Ok(ip) = bare.parse::<IpAddr>() {
                return HostNorm::Ip(ip);
            }
            if n.bytes().any(|b| b.is_ascii_uppercase()) {
                HostNorm::Name(n.to_ascii_lowercase().into())
            } else {
                HostNorm::Name(n.into())
            }
        }
    }
}

/// Rules compiled for lookups.
#[derive(Debug, Clone)]
pub struct RuleSet {
    block: Matcher,
    route: Matcher,
    default: Action,
    len: usize,
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet {
            block: Matcher::default(),
            route: Matcher::default(),
            default: Action::Proxy,
            len: 0,
        }
    }
}

/// Longest accepted rule text, and longest pattern.
const MAX_TEXT: usize = 8 << 20;
const MAX_NAME: usize = 253;

fn parse_pattern(p: &str) -> Result<Pattern, String> {
    if p.contains('/') {
        let (a, l) = p.split_once('/').unwrap_or((p, ""));
        let ip: IpAddr = a.parse().map_err(|_| format!("{a:?} is not an address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = l
            .parse::<u8>()
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| format!("{l:?} is not a prefix length (0..={max})"))?;
        return Ok(Pattern::Cidr(ip, len));
    }
    let bare = p
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(p);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        return Ok(Pattern::Cidr(ip, len));
    }
    if !p.is_ascii() {
        return Err(format!(
            "{p:?}: write internationalized names in punycode (xn--...)"
        ));
    }
    let p = p.strip_suffix('.').unwrap_or(p).to_ascii_lowercase();
    if p.is_empty() || p.len() > MAX_NAME {
        return Err("empty or overlong name".into());
    }
    if let Some(c) = p
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '*')))
    {
        return Err(format!("{c:?} cannot appear in a name"));
    }
    let suffix = p
        .strip_prefix("*.")
        .or_else(|| p.strip_prefix('.'))
        .filter(|s| !s.is_empty() && !s.contains('*'));
    if let Some(s) = suffix {
        if s.split('.').any(str::is_empty) {
            return Err(format!("{p:?} has an empty label"));
        }
        return Ok(Pattern::Suffix(s.to_owned()));
    }
    if p.contains('*') {
        return Ok(Pattern::Glob(p));
    }
    if p.split('.').any(str::is_empty) {
        return Err(format!("{p:?} has an empty label"));
    }
    Ok(Pattern::Exact(p))
}

enum Pattern {
    Exact(String),
    Suffix(String),
    Glob(String),
    Cidr(IpAddr, u8),
}

impl RuleSet {
    /// Compiles rule text (see the module docs for the syntax).
    pub fn parse(text: &str) -> Result<RuleSet, RuleError> {
        if text.len() > MAX_TEXT {
            return Err(RuleError {
                line: 1,
                column: 1,
                message: format!("rules longer than {MAX_TEXT} bytes"),
            });
        }
        let mut set = RuleSet::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("");
            let mut words = content.split_whitespace();
            let Some(verb) = words.next() else { continue };
            let col = |w: &str| w.as_ptr() as usize - raw.as_ptr() as usize + 1;
            let err = |w: &str, message: String| RuleError {
                line,
                column: col(w),
                message,
            };
            let Some(arg) = words.next() else {
                return Err(err(verb, format!("{verb:?} needs a pattern")));
            };
            if let Some(extra) = words.next() {
                return Err(err(extra, "one pattern per line".into()));
            }
            if verb.eq_ignore_ascii_case("default") {
                set.default = Action::parse(arg)
                    .ok_or_else(|| err(arg, format!("{arg:?} is not proxy, direct or block")))?;
                continue;
            }
            let action = Action::parse(verb).ok_or_else(|| {
                err(
                    verb,
                    format!("{verb:?} is not proxy, direct, block or default"),
                )
            })?;
            set.add(action, arg, line).map_err(|m| err(arg, m))?;
        }
        Ok(set)
    }

    /// Adds one rule; `line` is reported back by [`RuleSet::decide`].
    pub fn add(&mut self, action: Action, pattern: &str, line: usize) -> Result<(), String> {
        let m = if action == Action::Block {
            &mut self.block
        } else {
            &mut self.route
        };
        let v = (action, line);
        match parse_pattern(pattern)? {
            Pattern::Exact(n) => {
                m.exact.entry(n).or_insert(v);
            }
            Pattern::Suffix(s) => {
                m.suffix.entry(s).or_insert(v);
            }
            Pattern::Glob(g) => m.globs.push((Glob::new(&g), action, line)),
            Pattern::Cidr(ip, len) => m.add_cidr(ip, len, v),
        }
        self.len += 1;
        Ok(())
    }

    /// Sets the action used when no rule matches.
    pub fn set_default(&mut self, a: Action) {
        self.default = a;
    }

    /// The action used when no rule matches.
    pub fn default_action(&self) -> Action {
        self.default
    }

    /// How many rules were compiled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no rules (only the default).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Decides for one target.
    pub fn decide(&self, host: Host<'_>) -> Decision {
        let h = normalize(host);
        if let Some((action, line)) = self.block.host(&h) {
            return Decision {
                action,
                rule: Some(line),
            };
        }
        if let Some((action, line)) = self.route.host(&h) {
            return Decision {
                action,
                rule: Some(line),
            };
        }
        Decision {
            action: self.default,
            rule: None,
        }
    }
}

/// A rule set that can be replaced while connections use it (reload on
/// SIGHUP or file change). Lookups take a cheap snapshot.
#[derive(Debug, Clone, Default)]
pub struct SharedRules(std::sync::Arc<std::sync::RwLock<std::sync::Arc<RuleSet>>>);

impl SharedRules {
    /// Wraps `r`.
    pub fn new(r: RuleSet) -> SharedRules {
        SharedRules(std::sync::Arc::new(std::sync::RwLock::new(
            std::sync::Arc::new(r),
        )))
    }

    /// The current rules.
    pub fn get(&self) -> std::sync::Arc<RuleSet> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the rules; connections already decided are unaffected.
    pub fn replace(&self, r: RuleSet) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules(t: &str) -> RuleSet {
        RuleSet::parse(t).expect("rules compile")
    }

    fn name(r: &RuleSet, n: &str) -> Action {
        r.decide(Host::Name(n)).action
    }

    fn ip(r: &RuleSet, a: &str) -> Action {
        r.decide(Host::Ip(a.parse().expect("address literal")))
            .action
    }

    #[test]
    fn suffix_matches_apex_and_subdomains_any_case_trailing_dot() {
        let r = rules("default direct\nblock *.Ads.Example\nproxy .corp.example\n");
        assert_eq!(name(&r, "ads.example"), Action::Block);
        assert_eq!(name(&r, "x.y.ADS.example."), Action::Block);
        assert_eq!(name(&r, "badads.example"), Action::Direct);
        assert_eq!(name(&r, "corp.example"), Action::Proxy);
        assert_eq!(name(&r, "Mail.Corp.Example."), Action::Proxy);
        assert_eq!(name(&r, "example"), Action::Direct);
    }

    #[test]
    fn exact_names_only_match_themselves() {
        let r = rules("default proxy\ndirect example.org.\n");
        assert_eq!(name(&r, "EXAMPLE.org"), Action::Direct);
        assert_eq!(name(&r, "www.example.org"), Action::Proxy);
        assert_eq!(r.decide(Host::Name("example.org")).rule, Some(2));
        assert_eq!(r.decide(Host::Name("x.org")).rule, None);
    }

    #[test]
    fn punycode_names_and_unicode_rejected() {
        let r = rules("block xn--bcher-kva.example\n");
        assert_eq!(name(&r, "XN--BCHER-KVA.example"), Action::Block);
        let e = RuleSet::parse("block bücher.example").expect_err("unicode refused");
        assert_eq!((e.line, e.column), (1, 7));
        assert!(e.message.contains("punycode"), "{e}");
    }

    #[test]
    fn globs() {
        let r = rules("default direct\nproxy api-*.example.com\nblock *tracker*\n");
        assert_eq!(name(&r, "api-eu.example.com"), Action::Proxy);
        assert_eq!(name(&r, "api.example.com"), Action::Direct);
        assert_eq!(name(&r, "mytracker.net"), Action::Block);
        assert_eq!(name(&r, "x.api-1.example.com"), Action::Direct);
    }

    #[test]
    fn block_wins_then_most_specific_then_default() {
        let r = rules(
            "default block\nproxy *.example.com\ndirect *.lan.example.com\nblock bad.lan.example.com\n",
        );
        assert_eq!(name(&r, "a.example.com"), Action::Proxy);
        assert_eq!(name(&r, "a.lan.example.com"), Action::Direct);
        assert_eq!(name(&r, "bad.lan.example.com"), Action::Block);
        assert_eq!(name(&r, "x.b.bad.lan.example.com"), Action::Direct);
        assert_eq!(name(&r, "other.net"), Action::Block);
    }

    #[test]
    fn overlapping_cidrs_longest_prefix_and_block_first() {
        let r = rules(
            "default proxy\ndirect 10.0.0.0/8\nproxy 10.1.0.0/16\ndirect 10.1.2.0/24\nblock 10.1.2.3\n\
             direct fd00::/8\nproxy fd00:1::/32\nblock ::1\n",
        );
        assert_eq!(ip(&r, "10.9.9.9"), Action::Direct);
        assert_eq!(ip(&r, "10.1.9.9"), Action::Proxy);
        assert_eq!(ip(&r, "10.1.2.9"), Action::Direct);
        assert_eq!(ip(&r, "10.1.2.3"), Action::Block);
        assert_eq!(ip(&r, "11.0.0.1"), Action::Proxy);
        assert_eq!(ip(&r, "fd12::1"), Action::Direct);
        assert_eq!(ip(&r, "fd00:1:2::1"), Action::Proxy);
        assert_eq!(ip(&r, "::1"), Action::Block);
        assert_eq!(ip(&r, "::ffff:10.1.2.3"), Action::Block);
        // IP literals given as names are matched as addresses.
        assert_eq!(name(&r, "10.1.2.3"), Action::Block);
        assert_eq!(name(&r, "[::1]"), Action::Block);
    }

    #[test]
    fn zero_length_prefix_matches_everything() {
        let r = rules("default proxy\ndirect 0.0.0.0/0\ndirect ::/0\n");
        assert_eq!(ip(&r, "203.0.113.1"), Action::Direct);
        assert_eq!(ip(&r, "2001:db8::1"), Action::Direct);
    }

    #[test]
    fn errors_name_line_and_column() {
        for (text, line, column) in [
            ("proxy", 1, 1),
            ("\n  allow x.com", 2, 3),
            ("direct 10.0.0.0/33", 1, 8),
            ("direct 10.0.0.0/x", 1, 8),
            ("block a..b", 1, 7),
            ("block .", 1, 7),
            ("block a b", 1, 9),
            ("default maybe", 1, 9),
            ("block a/b", 1, 7),
            ("block a$b", 1, 7),
        ] {
            let e = RuleSet::parse(text).expect_err(text);
            assert_eq!((e.line, e.column), (line, column), "{text:?}: {e}");
        }
    }

    #[test]
    fn malformed_corpus_never_panics() {
        for t in [
            "",
            "#",
            "*",
            "block *",
            "block **",
            "block .",
            "block ..",
            "block [",
            "block []",
            "block [::1",
            "direct /",
            "direct 1.2.3.4/",
            "direct ::/129",
            "proxy \u{0}",
            "block *.*.x",
            "proxy a*b*c*d",
            "\u{feff}block x",
        ] {
            if let Ok(r) = RuleSet::parse(t) {
                let _ = r.decide(Host::Name("a.b.c"));
                let _ = r.decide(Host::Name(""));
                let _ = r.decide(Host::Name("."));
            }
        }
    }

    proptest! {
        #[test]
        fn parse_and_decide_never_panic(t in ".{0,200}", n in ".{0,80}") {
            if let Ok(r) = RuleSet::parse(&t) {
                let _ = r.decide(Host::Name(&n));
            }
        }

        #[test]
        fn glob_star_alone_matches_everything(n in "[a-z.]{0,40}") {
            let r = rules("default direct\nproxy *\n");
            prop_assert_eq!(name(&r, &n), Action::Proxy);
        }
    }
}
