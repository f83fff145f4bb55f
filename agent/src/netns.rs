//! Running kernel-facing work inside another network namespace (`--netns PATH`), while the
//! API connection stays in the agent's own namespace. Netlink sockets keep the namespace they
//! were created in, so only socket creation and helper processes need to enter it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use std::os::unix::process::CommandExt;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}: {source} (is the path a netns file such as /run/netns/NAME or /proc/PID/ns/net?)")]
    OpenFailed { path: PathBuf, source: io::Error },
    #[error("{path} is not a network namespace (use /run/netns/NAME or /proc/PID/ns/net)")]
    NotNetns { path: PathBuf },
    #[error("entering network namespace {path}: {source} (this needs CAP_SYS_ADMIN)")]
    EnterFailed { path: PathBuf, source: io::Error },
}

/// The namespace kernel work runs in: the agent's own, or one named by path.
#[derive(Clone, Debug, Default)]
pub struct NetNs {
    target: Option<Arc<(PathBuf, File)>>,
}

impl NetNs {
    pub fn current() -> Self {
        Self::default()
    }

    #[allow(unsafe_code)] // ioctl(2), which std does not wrap
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::OpenFailed {
            path: path.into(),
            source,
        })?;
        // NS_GET_NSTYPE: the kind of namespace a nsfs file is; any other file fails the ioctl.
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: an ioctl without argument on a file descriptor we own.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns { path: path.into() });
        }
        Ok(Self {
            target: Some(Arc::new((path.into(), file))),
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.target.as_ref().map(|t| t.0.as_path())
    }

    /// A command that will run inside the namespace.
    #[allow(unsafe_code)] // pre_exec and setns(2)
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        if let Some(target) = &self.target {
            let fd = target.1.as_raw_fd();
            // SAFETY: setns is async-signal-safe and touches only the child's own namespace
            // membership; the fd stays open in the parent for the lifetime of `target`.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    /// Runs `f` on a short-lived thread that has entered the namespace, e.g. to open a netlink
    /// socket there.
    #[allow(unsafe_code)] // setns(2), which std does not wrap
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        let Some(target) = self.target.clone() else {
            return Ok(f());
        };
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only; the thread exits right after `f`.
            if unsafe { libc::setns(target.1.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::EnterFailed {
                    path: target.0.clone(),
                    source: io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetnsError::EnterFailed {
                path: PathBuf::from("<thread>"),
                source: io::Error::other("worker panicked"),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: `--netns /etc/passwd` says it is not a network namespace.
    #[test]
    fn a_file_that_is_not_a_network_namespace_is_refused() {
        let err = NetNs::open(Path::new("/etc/passwd")).unwrap_err();
        assert!(err.to_string().contains("is not a network namespace"), "{err}");
        assert!(NetNs::open(Path::new("/proc/self/ns/net")).is_ok());
        assert!(
            NetNs::open(Path::new("/proc/self/ns/uts")).is_err(),
            "another kind of namespace"
        );
    }
}
