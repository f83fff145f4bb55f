//! The control plane: certificates and keys it generates, etcd, kube-apiserver and
//! kube-controller-manager, each a child process logging into the work directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{run, Proc};

/// Host-side addresses of the nodes' veth links are 10.200.<i>.1; the serving certificate
/// names this many of them.
pub const MAX_NODES: usize = 8;

const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
# Every request of the agents' ServiceAccount and of the operator's (the CLI), to prove both
# roles against the real authorizer; nothing else (the log stays small).
- level: Metadata
  users: [\"system:serviceaccount:kube-converge:kube-converge\", \"system:serviceaccount:demo:operator\"]
- level: None
";

pub struct Cluster {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub port: u16,
    etcd_ports: (u16, u16),
    pub etcd: Option<Proc>,
    pub apiserver: Option<Proc>,
    pub kcm: Option<Proc>,
    pub admin: kube::Client,
    /// Keep the work directory (logs, audit log) when dropped.
    pub keep: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kcm = None;
        self.apiserver = None;
        self.etcd = None;
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("openssl").current_dir(dir).args(args)).map(|_| ())
}

/// A CA, a serving certificate for every address a client uses, and the service-account key
/// pair; static tokens for the admin and kube-proxy identities.
fn write_credentials(dir: &Path) -> anyhow::Result<()> {
    openssl(dir, &["genrsa", "-out", "ca.key", "2048"])?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-days",
            "2",
            "-subj",
            "/CN=kc-real-ca",
            "-out",
            "ca.crt",
        ],
    )?;
    openssl(dir, &["genrsa", "-out", "apiserver.key", "2048"])?;
    let mut san =
        "subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.96.0.1".to_string();
    for i in 0..MAX_NODES {
        san.push_str(&format!(",IP:10.200.{i}.1"));
    }
    std::fs::write(dir.join("san.ext"), format!("{san}\n"))?;
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            "apiserver.key",
            "-subj",
            "/CN=kube-apiserver",
            "-out",
            "apiserver.csr",
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "apiserver.crt",
        ],
    )?;
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"])?;
    openssl(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    std::fs::write(
        dir.join("tokens.csv"),
        "admin-token,admin,admin,system:masters\nproxy-token,system:kube-proxy,kube-proxy\n",
    )?;
    std::fs::write(dir.join("audit-policy.yaml"), AUDIT_POLICY)?;
    Ok(())
}

/// A kubeconfig for `server` authenticating with `token`.
pub fn kubeconfig(dir: &Path, server: &str, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: real
  cluster:
    server: {server}
    certificate-authority: {}
users:
- name: user
  user:
    token: {token}
contexts:
- name: real
  context: {{cluster: real, user: user}}
current-context: real
",
        dir.join("ca.crt").display()
    )
}

pub async fn client_for(path: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(path)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

impl Cluster {
    /// Starts etcd, kube-apiserver and kube-controller-manager in a new work directory and waits
    /// until the API server is ready.
    pub async fn start(bin: &Path) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("kc-real-{pid}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        write_credentials(&dir)?;
        let base = 20000 + (pid % 1000) as u16 * 20;
        let port = base;
        let etcd_ports = (base + 1, base + 2);
        let admin_kc = dir.join("admin.kubeconfig");
        std::fs::write(
            &admin_kc,
            kubeconfig(&dir, &format!("https://127.0.0.1:{port}"), "admin-token"),
        )?;
        let admin = client_for(&admin_kc).await?;
        // Until setup succeeds, keep the logs (a failed setup drops the cluster).
        let mut cluster = Self {
            dir,
            bin: bin.to_path_buf(),
            port,
            etcd_ports,
            etcd: None,
            apiserver: None,
            kcm: None,
            admin,
            keep: true,
        };
        cluster.start_etcd()?;
        cluster.start_apiserver().await?;
        cluster.start_controller_manager()?;
        Ok(cluster)
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    fn start_etcd(&mut self) -> anyhow::Result<()> {
        let (client, peer) = self.etcd_ports;
        let mut cmd = Command::new(self.bin.join("etcd"));
        cmd.args([
            "--name=default",
            &format!("--data-dir={}", self.dir.join("etcd").display()),
            &format!("--listen-client-urls=http://127.0.0.1:{client}"),
            &format!("--advertise-client-urls=http://127.0.0.1:{client}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            &format!("--initial-cluster=default=http://127.0.0.1:{peer}"),
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]);
        self.etcd = Some(Proc::spawn("etcd", cmd, self.dir.join("etcd.log"))?);
        Ok(())
    }

    /// Starts (or restarts) kube-apiserver and waits until it answers as ready.
    pub async fn start_apiserver(&mut self) -> anyhow::Result<()> {
        let d = |f: &str| self.dir.join(f).display().to_string();
        let mut cmd = Command::new(self.bin.join("kube-apiserver"));
        cmd.args([
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_ports.0),
            "--bind-address=0.0.0.0".into(),
            format!("--secure-port={}", self.port),
            format!("--tls-cert-file={}", d("apiserver.crt")),
            format!("--tls-private-key-file={}", d("apiserver.key")),
            format!("--client-ca-file={}", d("ca.crt")),
            format!("--token-auth-file={}", d("tokens.csv")),
            "--authorization-mode=Node,RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            "--api-audiences=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            // The host's own address is not a valid endpoint here: no kubernetes endpoints.
            "--endpoint-reconciler-type=none".into(),
            format!("--audit-log-path={}", d("audit.log")),
            format!("--audit-policy-file={}", d("audit-policy.yaml")),
            "--audit-log-format=json".into(),
            "--audit-log-mode=blocking".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ]);
        let n = self.apiserver.as_ref().map(|_| 2).unwrap_or(1);
        self.apiserver = Some(Proc::spawn(
            "kube-apiserver",
            cmd,
            self.dir.join(format!("apiserver-{n}.log")),
        )?);
        self.wait_ready(Duration::from_secs(120)).await
    }

    pub fn stop_apiserver(&mut self) {
        if let Some(mut p) = self.apiserver.take() {
            p.stop(Duration::from_secs(10));
            // Keep the log name distinct for the restart.
            let _ = std::fs::rename(&p.log, self.dir.join("apiserver-1.log"));
        }
    }

    async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(p) = self.etcd.as_mut() {
                p.check_alive()?;
            }
            if let Some(p) = self.apiserver.as_mut() {
                p.check_alive()?;
            }
            let req = http::Request::get("/readyz").body(Vec::new())?;
            if let Ok(text) = self.admin.request_text(req).await {
                if text.trim() == "ok" {
                    // RBAC's bootstrap roles arrive just after /readyz; wait for the one kube-proxy needs.
                    let roles: kube::Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> =
                        kube::Api::all(self.admin.clone());
                    if roles.get_opt("system:node-proxier").await.ok().flatten().is_some() {
                        return Ok(());
                    }
                }
            }
            if start.elapsed() > limit {
                let tail = self.apiserver.as_ref().map(|p| p.tail(30)).unwrap_or_default();
                anyhow::bail!("kube-apiserver not ready after {limit:?}:\n{tail}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn start_controller_manager(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(self.bin.join("kube-controller-manager"));
        cmd.args([
            format!("--kubeconfig={}", self.admin_kubeconfig().display()),
            "--controllers=endpointslice-controller,endpointslice-mirroring-controller,namespace-controller,garbage-collector-controller".into(),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
            "--use-service-account-credentials=false".into(),
            "--v=1".into(),
        ]);
        self.kcm = Some(Proc::spawn("kube-controller-manager", cmd, self.dir.join("kcm.log"))?);
        Ok(())
    }

    /// Fails with a log tail if a control-plane process died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in [&mut self.etcd, &mut self.apiserver, &mut self.kcm]
            .into_iter()
            .flatten()
        {
            p.check_alive()?;
        }
        Ok(())
    }

    /// `kubectl` of the pinned release against this cluster as admin.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new(self.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.admin_kubeconfig().display()))
            .args(args))
    }

    /// The audit log's events (one JSON object per line).
    pub fn audit_events(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(self.dir.join("audit.log"))?;
        Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }
}
