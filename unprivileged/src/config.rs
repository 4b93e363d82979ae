//! warren's configuration file (TOML), one top-level section per part of
//! warren (`[proxy]`, `[rules]` today; `[helper]`, `[instances.NAME]` later).
//!
//! Looked up at `$XDG_CONFIG_HOME/warren/config.toml` (or
//! `~/.config/warren/config.toml`), then `/etc/warren/config.toml`.
//! Precedence: command line > environment > file > defaults. Unknown keys
//! and bad values are errors naming the key, line and column. The
//! environment is read through [`Env`] so tests can fake it.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::rules::{Action, RuleSet};

pub use warren_proxy::env::{Env, ProcessEnv};

/// A configuration error with where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Bad syntax, unknown key or bad value.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong (names the key).
        message: String,
    },
}

/// `[proxy]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// SOCKS5 listener, or "off".
    pub socks: Option<String>,
    /// HTTP listener, or "off".
    pub http: Option<String>,
    /// Client CIDRs allowed without credentials.
    pub allow: Option<Vec<String>>,
    /// SOCKS5 username required outside `allow`.
    pub user: Option<String>,
    /// Most simultaneous connections.
    pub max_connections: Option<usize>,
    /// Connect timeout, seconds.
    pub connect_timeout: Option<u64>,
    /// Idle timeout, seconds.
    pub idle_timeout: Option<u64>,
    /// One log line per connection.
    pub access_log: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesSection {
    default: Option<Spanned<String>>,
    #[serde(default)]
    block: Vec<Spanned<String>>,
    #[serde(default)]
    direct: Vec<Spanned<String>>,
    #[serde(default)]
    proxy: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    proxy: ProxySection,
    #[serde(default)]
    rules: RulesSection,
    /// How this user's client reaches the root helper (read by
    /// `client_config`); validated here too so `warren config check`
    /// covers the whole file.
    #[serde(default, rename = "helper")]
    _helper: crate::client_config::HelperSection,
}

/// A parsed and validated configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// `[proxy]`.
    pub proxy: ProxySection,
    /// `[rules]`, compiled.
    pub rules: RuleSet,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = offset
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
        + 1;
    (line, col)
}

impl Config {
    /// Parses `text` (from `path`, used in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |offset: usize, message: String| {
            let (line, column) = line_col(text, offset);
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        };
        let file: File = toml::from_str(text).map_err(|e| {
            let start = e.span().map_or(0, |s| s.start);
            invalid(start, e.message().trim_end().to_owned())
        })?;
        let mut rules = RuleSet::default();
        if let Some(d) = &file.rules.default {
            let a = match d.get_ref().to_ascii_lowercase().as_str() {
                "proxy" => Action::Proxy,
                "direct" => Action::Direct,
                "block" => Action::Block,
                other => {
                    return Err(invalid(
                        d.span().start,
                        format!("rules.default: {other:?} is not proxy, direct or block"),
                    ));
                }
            };
            rules.set_default(a);
        }
        for (key, action, list) in [
            ("block", Action::Block, &file.rules.block),
            ("direct", Action::Direct, &file.rules.direct),
            ("proxy", Action::Proxy, &file.rules.proxy),
        ] {
            for item in list {
                let (line, _) = line_col(text, item.span().start);
                rules
                    .add(action, item.get_ref(), line)
                    .map_err(|m| invalid(item.span().start, format!("rules.{key}: {m}")))?;
            }
        }
        Ok(Config {
            proxy: file.proxy,
            rules,
        })
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Overrides file values with `WARREN_PROXY_SOCKS` and
    /// `WARREN_PROXY_HTTP` from `env`.
    pub fn apply_env(&mut self, env: &dyn Env) {
        if let Some(v) = env.var("WARREN_PROXY_SOCKS") {
            self.proxy.socks = Some(v);
        }
        if let Some(v) = env.var("WARREN_PROXY_HTTP") {
            self.proxy.http = Some(v);
        }
    }
}

/// The first existing default config file, if any.
pub fn default_path(env: &dyn Env) -> Option<PathBuf> {
    let user = env
        .var("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env.var("HOME").map(|h| Path::new(&h).join(".config")))
        .map(|d| d.join("warren/config.toml"));
    user.into_iter()
        .chain(std::iter::once(PathBuf::from("/etc/warren/config.toml")))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Host;
    use std::collections::HashMap;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("c.toml"))
    }

    fn where_(e: ConfigError) -> (usize, usize, String) {
        match e {
            ConfigError::Invalid {
                line,
                column,
                message,
                ..
            } => (line, column, message),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn full_file() {
        let c = parse(
            "[proxy]\nsocks = \"127.0.0.1:0\"\nhttp = \"off\"\nallow = [\"10.0.0.0/8\"]\n\
             max_connections = 5\n\n[rules]\ndefault = \"direct\"\nblock = [\"*.ads.example\"]\n\
             proxy = [\"10.0.0.0/8\", \"example.org\"]\n",
        )
        .expect("valid");
        assert_eq!(c.proxy.socks.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(c.proxy.max_connections, Some(5));
        let d = c.rules.decide(Host::Name("x.ads.example"));
        assert_eq!((d.action, d.rule), (Action::Block, Some(9)));
        assert_eq!(c.rules.decide(Host::Name("a.net")).action, Action::Direct);
        assert_eq!(
            c.rules.decide(Host::Name("example.org")).action,
            Action::Proxy
        );
    }

    #[test]
    fn unknown_key_names_key_line_and_column() {
        let (l, c, m) =
            where_(parse("[proxy]\nsocks = \"off\"\n  sock = 1\n").expect_err("unknown"));
        assert_eq!((l, c), (3, 3));
        assert!(m.contains("sock"), "{m}");
        let (l, _, m) = where_(parse("[proxi]\n").expect_err("unknown section"));
        assert_eq!(l, 1);
        assert!(m.contains("proxi"), "{m}");
    }

    #[test]
    fn bad_values_are_errors() {
        let (l, _, m) = where_(parse("[proxy]\nmax_connections = \"x\"\n").expect_err("type"));
        assert_eq!(l, 2, "{m}");
        let (l, c, m) =
            where_(parse("[rules]\nblock = [\"a\",\n  \"10.0.0.0/40\"]\n").expect_err("cidr"));
        assert_eq!((l, c), (3, 3));
        assert!(m.starts_with("rules.block"), "{m}");
        let (l, c, _) = where_(parse("[rules]\ndefault = \"maybe\"\n").expect_err("default"));
        assert_eq!((l, c), (2, 11));
        assert!(parse("[proxy\n").is_err());
    }

    #[test]
    fn env_overrides_file_and_lookup_uses_fake_env() {
        let mut c =
            parse("[proxy]\nsocks = \"127.0.0.1:1\"\nhttp = \"127.0.0.1:2\"\n").expect("valid");
        let env: HashMap<String, String> =
            [("WARREN_PROXY_SOCKS".to_owned(), "off".to_owned())].into();
        c.apply_env(&env);
        assert_eq!(c.proxy.socks.as_deref(), Some("off"));
        assert_eq!(c.proxy.http.as_deref(), Some("127.0.0.1:2"));
        let dir = std::env::temp_dir().join(format!("warren-cfg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("warren")).expect("mkdir");
        std::fs::write(dir.join("warren/config.toml"), "").expect("write");
        let env: HashMap<String, String> =
            [("XDG_CONFIG_HOME".to_owned(), dir.display().to_string())].into();
        assert_eq!(default_path(&env), Some(dir.join("warren/config.toml")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
