//! The helper's journal: what it has created, written to disk *before* each
//! change, so a helper killed at any point (even `kill -9`) knows on its next
//! start what to remove.
//!
//! The journal is one JSON file (`state.json` beside the socket, normally
//! `/run/warren/state.json`, on tmpfs: a reboot clears both the kernel
//! objects and the journal). Every update rewrites it whole: a temporary file
//! opened with `O_NOFOLLOW`, mode 0600, written, `fsync`ed, then renamed over
//! the old one, so a reader sees either the old or the new state, never half.
//! The helper only ever removes what its own journal names, so two helpers
//! (or parallel tests, each with its own socket directory) never touch each
//! other's resources.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;

/// Journal failures.
#[derive(Debug, Error)]
pub enum JournalError {
    /// Reading or writing the file failed.
    #[error("journal {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a journal of this helper.
    #[error("journal {path} is unreadable: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A journal of entries of type `T`, keyed by a numeric id.
#[derive(Debug)]
pub struct Journal<T> {
    path: PathBuf,
    entries: Vec<(u64, T)>,
    next_id: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct OnDisk<T> {
    version: u32,
    next_id: u64,
    entries: Vec<(u64, T)>,
}

const VERSION: u32 = 1;

impl<T: Serialize + DeserializeOwned + Clone> Journal<T> {
    /// Opens the journal at `path`, reading what a previous helper left.
    /// A missing file is an empty journal. A corrupt one is renamed aside
    /// (`.corrupt`) and reported, so start-up can go on and log it.
    pub fn open(path: &Path) -> Result<(Journal<T>, Option<JournalError>), JournalError> {
        let io = |source| JournalError::Io {
            path: path.into(),
            source,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((
                    Journal {
                        path: path.into(),
                        entries: Vec::new(),
                        next_id: 1,
                    },
                    None,
                ));
            }
            Err(e) => return Err(io(e)),
        };
        match serde_json::from_str::<OnDisk<T>>(&text) {
            Ok(d) if d.version == VERSION => Ok((
                Journal {
                    path: path.into(),
                    next_id: d.next_id.max(1),
                    entries: d.entries,
                },
                None,
            )),
            other => {
                let message = match other {
                    Ok(d) => format!("unknown journal version {}", d.version),
                    Err(e) => e.to_string(),
                };
                let aside = path.with_extension("json.corrupt");
                std::fs::rename(path, &aside).map_err(io)?;
                Ok((
                    Journal {
                        path: path.into(),
                        entries: Vec::new(),
                        next_id: 1,
                    },
                    Some(JournalError::Corrupt {
                        path: path.into(),
                        message,
                    }),
                ))
            }
        }
    }

    /// Entries in creation order.
    pub fn entries(&self) -> &[(u64, T)] {
        &self.entries
    }

    /// Records a new entry (durably) and returns its id.
    pub fn add(&mut self, entry: T) -> Result<u64, JournalError> {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push((id, entry));
        if let Err(e) = self.save(true) {
            self.entries.pop();
            return Err(e);
        }
        Ok(id)
    }

    /// Replaces entry `id` (durably).
    pub fn update(&mut self, id: u64, entry: T) -> Result<(), JournalError> {
        let Some(slot) = self.entries.iter_mut().find(|(i, _)| *i == id) else {
            return Ok(());
        };
        let old = std::mem::replace(&mut slot.1, entry);
        if let Err(e) = self.save(true) {
            if let Some(slot) = self.entries.iter_mut().find(|(i, _)| *i == id) {
                slot.1 = old;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Forgets entry `id` (durably).
    pub fn remove(&mut self, id: u64) -> Result<(), JournalError> {
        let before = self.entries.len();
        self.entries.retain(|(i, _)| *i != id);
        if self.entries.len() == before {
            return Ok(());
        }
        // Not synced: an entry that outlives its resources after a crash
        // only makes the next start redo an idempotent removal.
        self.save(false)
    }

    fn save(&self, durable: bool) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let disk = OnDisk {
            version: VERSION,
            next_id: self.next_id,
            entries: self.entries.clone(),
        };
        let text = serde_json::to_vec_pretty(&disk).map_err(|e| JournalError::Corrupt {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        let tmp = self.path.with_extension("json.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&text).map_err(io)?;
        if durable {
            f.sync_all().map_err(io)?;
        }
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_keeps_ids_unique() {
        let dir = std::env::temp_dir().join(format!("warren-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        let _ = std::fs::remove_file(&path);
        let (mut j, err) = Journal::<String>::open(&path).expect("open");
        assert!(err.is_none());
        let a = j.add("netns warren-a".into()).expect("add");
        let b = j.add("netns warren-b".into()).expect("add");
        j.remove(a).expect("remove");
        j.update(b, "netns warren-b (done)".into()).expect("update");
        let (mut j2, _) = Journal::<String>::open(&path).expect("reopen");
        assert_eq!(j2.entries(), &[(b, "netns warren-b (done)".to_string())]);
        let c = j2.add("c".into()).expect("add");
        assert!(c > b, "ids never reused");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn corrupt_journal_is_set_aside() {
        let dir = std::env::temp_dir().join(format!("warren-journal-c-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        std::fs::write(&path, b"{ not json").expect("write");
        let (j, err) = Journal::<String>::open(&path).expect("open");
        assert!(j.entries().is_empty());
        assert!(matches!(err, Some(JournalError::Corrupt { .. })));
        assert!(dir.join("state.json.corrupt").exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
