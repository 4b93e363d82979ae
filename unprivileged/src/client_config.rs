//! The `[helper]` section of the user's configuration: how this client
//! reaches the root helper.
//!
//! ```toml
//! [helper]
//! socket = "/run/warren/helper.sock"   # where the helper listens
//! autostart = true                     # start it through sudo when absent
//! autostart_timeout_secs = 10          # how long to wait for it
//! ```
//!
//! Looked up at `$XDG_CONFIG_HOME/warren/config.toml` (else
//! `~/.config/warren/config.toml`), then `/etc/warren/config.toml`. Command
//! line flags and `WARREN_HELPER_SOCKET` win over the file. Other sections
//! belong to other parts of warren and are left to them.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// The `[helper]` section.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelperSection {
    /// Helper socket.
    pub socket: Option<PathBuf>,
    /// Autostart through sudo.
    pub autostart: Option<bool>,
    /// Seconds to wait for an autostarted helper.
    pub autostart_timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct File {
    #[serde(default)]
    helper: HelperSection,
    #[serde(flatten)]
    _rest: toml::Table,
}

/// A config file that could not be used.
#[derive(Debug, Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, with line and column.
    pub message: String,
}

/// Parses the `[helper]` section of `text`; errors name line and column.
pub fn parse(text: &str) -> Result<HelperSection, String> {
    toml::from_str::<File>(text)
        .map(|f| f.helper)
        .map_err(|e| match e.span() {
            Some(s) => {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {col}: {}", e.message())
            }
            None => e.message().to_string(),
        })
}

/// Candidate files, most specific first, from an environment lookup (so
/// tests never touch the process environment).
pub fn candidates(env: impl Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(x) = env("XDG_CONFIG_HOME").filter(|s| !s.is_empty()) {
        v.push(Path::new(&x).join("warren/config.toml"));
    } else if let Some(h) = env("HOME").filter(|s| !s.is_empty()) {
        v.push(Path::new(&h).join(".config/warren/config.toml"));
    }
    v.push(PathBuf::from("/etc/warren/config.toml"));
    v
}

/// Loads the first existing candidate's `[helper]` section.
pub fn load(env: impl Fn(&str) -> Option<String>) -> Result<HelperSection, ConfigError> {
    for p in candidates(env) {
        // A file we cannot even see (missing, or behind a directory we may
        // not search, like another user's home) is not ours to read.
        if !p.try_exists().unwrap_or(false) {
            continue;
        }
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                return parse(&text).map_err(|message| ConfigError { path: p, message });
            }
            Err(e) => {
                return Err(ConfigError {
                    path: p,
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(HelperSection::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_section_and_others_coexist() {
        let h = parse("[helper]\nautostart = false\n\n[proxy]\nsocks = \"127.0.0.1:1080\"\n")
            .expect("valid");
        assert_eq!(h.autostart, Some(false));
        assert_eq!(parse("").expect("empty"), HelperSection::default());
    }

    #[test]
    fn unknown_helper_key_names_line_and_column() {
        let e = parse("[helper]\nauto_start = false\n").expect_err("unknown key");
        assert!(e.contains("line 2, column 1"), "{e}");
        assert!(e.contains("auto_start"), "{e}");
        let e = parse("[helper]\nautostart = \"no\"\n").expect_err("bad value");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn lookup_order() {
        let env = |k: &str| match k {
            "XDG_CONFIG_HOME" => Some("/x".to_string()),
            "HOME" => Some("/home/u".to_string()),
            _ => None,
        };
        assert_eq!(
            candidates(env),
            vec![
                PathBuf::from("/x/warren/config.toml"),
                PathBuf::from("/etc/warren/config.toml")
            ]
        );
        let env = |k: &str| (k == "HOME").then(|| "/home/u".to_string());
        assert_eq!(
            candidates(env)[0],
            PathBuf::from("/home/u/.config/warren/config.toml")
        );
    }
}
