//! The ssh keys nvmm hands a guest, kept in the VM's persistent directory (state.rs): the
//! client key `nvmm ssh` logs in with (`id_ed25519`, authorized for root in the guest) and the
//! guest's host key (`ssh_host_ed25519_key`), so a VM keeps its host identity across boots even
//! though its disk is fresh each time, and `nvmm ssh` can pin it. Keys are made with the host's
//! `ssh-keygen`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Errors making a key.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// `ssh-keygen` is not installed.
    #[error("ssh-keygen is not installed (Debian: apt-get install openssh-client)")]
    NoKeygen,
    /// The key's directory could not be made.
    #[error("cannot create {}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// ssh-keygen failed.
    #[error("ssh-keygen could not make {}: {message}", .path.display())]
    Keygen {
        /// The key.
        path: PathBuf,
        /// What it said.
        message: String,
    },
    /// A key could not be read back.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A key pair's file contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// OpenSSH private key.
    pub private: Vec<u8>,
    /// `ssh-ed25519 AAAA… comment`.
    pub public: String,
}

/// The private key `nvmm ssh` uses for the VM whose persistent directory is `vm_dir`.
pub fn client_key_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join("id_ed25519")
}

/// The VM's client key pair, made on first use.
pub fn client_key(vm_dir: &Path) -> Result<KeyPair, SshError> {
    ensure_key(&client_key_path(vm_dir), "nvmm")
}

/// VM `vm_name`'s host key pair, made on first use.
pub fn host_key(vm_dir: &Path, vm_name: &str) -> Result<KeyPair, SshError> {
    ensure_key(
        &vm_dir.join("ssh_host_ed25519_key"),
        &format!("root@{vm_name}"),
    )
}

fn ensure_key(path: &Path, comment: &str) -> Result<KeyPair, SshError> {
    let public_path = path.with_extension("pub");
    if !path.is_file() || !public_path.is_file() {
        generate(path, comment)?;
    }
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| SshError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    Ok(KeyPair {
        private: read(path)?,
        public: String::from_utf8_lossy(&read(&public_path)?)
            .trim()
            .to_owned(),
    })
}

fn generate(path: &Path, comment: &str) -> Result<(), SshError> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .map_err(|source| SshError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    // A half-made pair (one file of two) is replaced whole; ssh-keygen asks before
    // overwriting, and its stdin is /dev/null, so remove them first.
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => SshError::NoKeygen,
            _ => SshError::Keygen {
                path: path.to_path_buf(),
                message: source.to_string(),
            },
        })?;
    if !output.status.success() {
        return Err(SshError::Keygen {
            path: path.to_path_buf(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    log::info!("made ssh key {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disks::test_util::TempDir;

    #[test]
    fn keys_are_made_once_and_kept() {
        if Command::new("ssh-keygen").arg("-?").output().is_err() {
            eprintln!("SKIPPED keys_are_made_once_and_kept: no ssh-keygen");
            return;
        }
        let state = TempDir::new("ssh");
        let server = state.path().join("server");
        let first = host_key(&server, "server").unwrap();
        assert!(first.public.starts_with("ssh-ed25519 "), "{}", first.public);
        assert!(first.public.ends_with("root@server"), "{}", first.public);
        assert!(String::from_utf8_lossy(&first.private).contains("OPENSSH PRIVATE KEY"));
        assert_eq!(host_key(&server, "server").unwrap(), first);
        assert_ne!(
            host_key(&state.path().join("client"), "client").unwrap(),
            first
        );
        let client = client_key(&server).unwrap();
        assert!(client_key_path(&server).is_file());
        assert_ne!(client.public, first.public);
    }
}
