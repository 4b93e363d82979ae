//! The helper's own configuration: `/etc/warren/helper.toml`.
//!
//! Only root may write it: the helper refuses a file (or a directory on its
//! path) that another user owns or can write, and refuses symlinks. The
//! command line overrides the file; nothing comes from the environment.
//!
//! ```toml
//! group = "warren"               # who may use the helper (besides root)
//! max_connections = 256          # all clients together
//! max_connections_per_uid = 32   # one user
//! idle_timeout_secs = 60         # exit when idle (autostarted / socket-activated)
//! # where server tunnels' addresses may lie (replaces the default pools)
//! server_tunnel_pools = ["100.64.0.0/10", "fd00::/8"]
//! # tasks one user's programs may have (with `serve --user-cgroups`)
//! user_tasks_max = 256
//! ```

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;
use warren_ipc::instance::IpPrefix;

/// Default path of the helper's config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/warren/helper.toml";

/// Settings from the file; `None` means "not set there".
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelperConfig {
    /// Authorized group (name or numeric gid).
    pub group: Option<String>,
    /// Cap on simultaneous connections.
    pub max_connections: Option<u32>,
    /// Cap on simultaneous connections of one uid.
    pub max_connections_per_uid: Option<u32>,
    /// Idle exit delay when autostarted or socket-activated.
    pub idle_timeout_secs: Option<u64>,
    /// Networks that server tunnels' subnets must lie in (replaces
    /// [`DEFAULT_SERVER_TUNNEL_POOLS`]; empty: no server tunnels).
    pub server_tunnel_pools: Option<Vec<String>>,
    /// Tasks one user's programs may have together (`pids.max` of their
    /// cgroup, with `serve --user-cgroups`).
    pub user_tasks_max: Option<u64>,
}

/// Where server tunnels' subnets may lie unless the config says otherwise:
/// the shared address space of RFC 6598 and IPv6 unique local addresses.
pub const DEFAULT_SERVER_TUNNEL_POOLS: [&str; 2] = ["100.64.0.0/10", "fd00::/8"];

/// The pools of the config the serving helper loaded (once, at start).
static SERVER_TUNNEL_POOLS: std::sync::OnceLock<Vec<IpPrefix>> = std::sync::OnceLock::new();

/// The networks server tunnels' subnets must lie in: the loaded config's
/// `server_tunnel_pools`, else [`DEFAULT_SERVER_TUNNEL_POOLS`].
pub fn server_tunnel_pools() -> Vec<IpPrefix> {
    match SERVER_TUNNEL_POOLS.get() {
        Some(p) => p.clone(),
        None => DEFAULT_SERVER_TUNNEL_POOLS
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
    }
}

/// Parses pools: each a network (`198.18.0.0/15`, no host bits set).
fn parse_pools(pools: &[String]) -> Result<Vec<IpPrefix>, String> {
    pools
        .iter()
        .map(|p| {
            let prefix: IpPrefix = p
                .parse()
                .map_err(|e| format!("server_tunnel_pools: {p:?}: {e}"))?;
            if prefix.network() != prefix {
                return Err(format!(
                    "server_tunnel_pools: {p:?} has host bits set (did you mean {}?)",
                    prefix.network()
                ));
            }
            Ok(prefix)
        })
        .collect()
}

/// Why the config could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// Reading failed.
    #[error("cannot read {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file or a directory above it could be changed by someone other
    /// than root.
    #[error("{path} {reason}; only root may control the helper's configuration")]
    Unsafe {
        /// The offending path.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The file is not valid.
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
}

impl HelperConfig {
    /// Loads the file at `path`. A missing file is an empty config.
    pub fn load(path: &Path) -> Result<HelperConfig, ConfigError> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(HelperConfig::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                });
            }
            Ok(_) => {}
        }
        check_root_controlled(path)?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.into(),
            message,
        })?;
        // The helper loads its config once, at start (main.rs); what it
        // loaded decides where server tunnels may be.
        if let Some(pools) = &config.server_tunnel_pools {
            let _ = SERVER_TUNNEL_POOLS.set(parse_pools(pools).unwrap_or_default());
        }
        Ok(config)
    }

    /// Parses config text; errors name the key, line and column.
    pub fn parse(text: &str) -> Result<HelperConfig, String> {
        let config: HelperConfig = toml::from_str(text).map_err(|e| {
            let pos = e.span().map(|s| line_col(text, s.start));
            match pos {
                Some((l, c)) => format!("line {l}, column {c}: {}", e.message()),
                None => e.message().to_string(),
            }
        })?;
        if let Some(pools) = &config.server_tunnel_pools {
            parse_pools(pools)?;
        }
        if config.user_tasks_max == Some(0) {
            return Err("user_tasks_max: at least 1 (a user's programs could not start)".into());
        }
        Ok(config)
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Checks that `path` and every directory above it are owned by root and
/// writable by no one else (a sticky directory such as /tmp is accepted as
/// a parent, since others cannot replace root's entries in it), and that
/// `path` itself is not a symlink.
pub fn check_root_controlled(path: &Path) -> Result<(), ConfigError> {
    let unsafe_path = |p: &Path, reason| ConfigError::Unsafe {
        path: p.into(),
        reason,
    };
    let meta = std::fs::symlink_metadata(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_path(path, "is a symlink"));
    }
    if meta.uid() != 0 {
        return Err(unsafe_path(path, "is not owned by root"));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_path(path, "is writable by group or others"));
    }
    let abs = path.canonicalize().map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    for dir in abs.ancestors().skip(1) {
        let m = std::fs::metadata(dir).map_err(|source| ConfigError::Read {
            path: dir.into(),
            source,
        })?;
        if m.uid() != 0 {
            return Err(unsafe_path(dir, "is not owned by root"));
        }
        let sticky = m.mode() & 0o1000 != 0;
        if m.mode() & 0o022 != 0 && !sticky {
            return Err(unsafe_path(dir, "is writable by group or others"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_keys() {
        let c = HelperConfig::parse(
            "group = \"vpn\"\nmax_connections = 10\nmax_connections_per_uid = 2\nidle_timeout_secs = 5\nuser_tasks_max = 128\n",
        )
        .expect("valid");
        assert_eq!(c.user_tasks_max, Some(128));
        assert!(HelperConfig::parse("user_tasks_max = 0\n").is_err());
        assert_eq!(c.group.as_deref(), Some("vpn"));
        assert_eq!(c.max_connections, Some(10));
        assert_eq!(c.max_connections_per_uid, Some(2));
        assert_eq!(c.idle_timeout_secs, Some(5));
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let err =
            HelperConfig::parse("group = \"vpn\"\n  grup = \"x\"\n").expect_err("unknown key");
        assert!(err.contains("line 2, column 3"), "{err}");
        assert!(err.contains("grup"), "{err}");
    }

    #[test]
    fn bad_value_is_an_error() {
        let err = HelperConfig::parse("max_connections = -1\n").expect_err("negative");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn finding_4_server_tunnel_pools_are_networks() {
        let c =
            HelperConfig::parse("server_tunnel_pools = [\"198.18.0.0/15\", \"fd00:18::/32\"]\n")
                .expect("valid");
        assert_eq!(
            parse_pools(c.server_tunnel_pools.as_deref().unwrap_or_default()).expect("pools"),
            vec![
                "198.18.0.0/15".parse::<IpPrefix>().expect("p"),
                "fd00:18::/32".parse().expect("p")
            ]
        );
        let err = HelperConfig::parse("server_tunnel_pools = [\"198.18.0.1/15\"]\n")
            .expect_err("host bits");
        assert!(err.contains("198.18.0.0/15"), "{err}");
        assert!(HelperConfig::parse("server_tunnel_pools = [\"nonsense\"]\n").is_err());
        assert_eq!(server_tunnel_pools().len(), 2, "defaults without a config");
    }

    #[test]
    fn missing_file_is_empty_config() {
        let c =
            HelperConfig::load(Path::new("/nonexistent/warren/helper.toml")).expect("missing ok");
        assert_eq!(c, HelperConfig::default());
    }
}
