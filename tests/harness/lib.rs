//! The real-cluster harness: etcd, kube-apiserver (RBAC and Node authorization, audit log) and
//! kube-controller-manager (EndpointSlice, EndpointSlice-mirroring, namespace and garbage
//! collector controllers only), built by `scripts/k8s-build.sh`; nodes as network namespaces,
//! each with a Node object, a real kube-proxy and a kube-converge agent under the
//! `kube-converge` ServiceAccount's own token; a kubelet stand-in (as kwok does) that sets pod
//! status and finishes graceful deletions; and, per node, the kernel's nf_tables commits
//! (NEWGEN) as ground truth.

pub mod agreement;
pub mod cluster;
pub mod kubelet;
pub mod node;
pub mod world;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub use cluster::Cluster;
pub use node::{Node, ProxyMode};

/// The repository's root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where `scripts/k8s-build.sh` keeps (or would keep) the binaries of the pinned release.
pub fn k8s_bin_dir() -> anyhow::Result<PathBuf> {
    let out = Command::new(repo_root().join("scripts/k8s-build.sh"))
        .arg("--print-dir")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "scripts/k8s-build.sh --print-dir: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// The `kube-converge` binary of this build (cargo builds every workspace binary before it runs
/// the tests).
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // A test runs from target/<profile>/deps/, the demo from target/<profile>/.
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("kube-converge"))
        .collect();
    candidates.iter().find(|b| b.is_file()).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "the kube-converge binary is not beside {} (looked for {candidates:?}): build it with the same profile",
            exe.display()
        )
    })
}

/// What the tier needs that may be missing: root, the built components, the kernel tools.
/// Returns the reasons, empty when everything is there.
pub fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { geteuid() } != 0 {
        missing.push("root (network namespaces and kube-proxy need it)".to_string());
    }
    match k8s_bin_dir() {
        Ok(dir) if dir.join(".complete").is_file() => {}
        Ok(dir) => missing.push(format!(
            "the Kubernetes components in {} (build them: scripts/k8s-build.sh)",
            dir.display()
        )),
        Err(e) => missing.push(format!("the Kubernetes components ({e})")),
    }
    for tool in [
        "ip",
        "openssl",
        "nft",
        "iptables-nft",
        "iptables-legacy",
        "iptables-legacy-restore",
        "iptables-legacy-save",
        "ip6tables-legacy",
    ] {
        if !on_path(tool) {
            missing.push(format!("{tool} (apt-get install iproute2 openssl nftables iptables)"));
        }
    }
    missing
}

extern "C" {
    fn geteuid() -> u32;
}

pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// A child process killed (and reaped) on drop, its output in a log file.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        // A harness killed mid-run (a timeout, ^C) takes its cluster with it.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                prctl(PR_SET_PDEATHSIG, 9);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Self {
            name: name.to_string(),
            log,
            child: Some(child),
        })
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                anyhow::bail!(
                    "{} exited ({st}); last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.tail(30)
                );
            }
        }
        Ok(())
    }

    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps the child.
    pub fn stop(&mut self, grace: std::time::Duration) {
        let Some(mut c) = self.child.take() else { return };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { kill(c.id() as i32, 15) };
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

const PR_SET_PDEATHSIG: i32 = 1;

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn prctl(option: i32, ...) -> i32;
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(std::time::Duration::from_secs(3));
    }
}

/// Runs a command to completion; fails with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("{:?}: {e}", cmd.get_program()))?;
    anyhow::ensure!(
        out.status.success(),
        "{:?} {:?}: {}{}",
        cmd.get_program(),
        cmd.get_args().collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
