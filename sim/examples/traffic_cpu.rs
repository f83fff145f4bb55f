//! What the live-traffic check costs under a high connection rate: in a throw-away namespace
//! with kube-proxy-format rules (a Service with two endpoints), a generator process opens new
//! connections to the Service at RATE per second; the agent's conntrack listener (the same
//! code the agent runs) is off (nothing removed recently: no socket), then on, watching one of
//! the two endpoints as a pending removal would. Prints this process's CPU (user + system) per
//! second of each phase, and the connections counted.
//!
//!   sudo cargo run --release -p kube-converge-sim --example traffic_cpu -- [RATE] [SECONDS]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kc_sim::emulate::{render_nat, EmulatedServicePort};
use kc_sim::node::NetnsGuard;
use kube_converge::dataplane::conntrack::{self, ConntrackEvent};
use kube_converge::model::{Protocol, ServicePortName};
use kube_converge::netns::NetNs;

const VIP: &str = "172.30.0.41:80";
const WATCHED: &str = "10.244.1.10:8080";

/// The generator (run inside the namespace): non-blocking connects, closed at once: each sends
/// one SYN, which the rules translate and conntrack records.
fn generate(rate: u32, seconds: u64) {
    let target: SocketAddr = VIP.parse().unwrap();
    let SocketAddr::V4(v4) = target else { unreachable!() };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let start = Instant::now();
    let mut sent: u64 = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while sent < due {
            // SAFETY: a socket created, connected without blocking and closed here; `addr` is
            // a valid sockaddr_in for the length given.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
                if fd >= 0 {
                    libc::connect(
                        fd,
                        std::ptr::addr_of!(addr).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    );
                    libc::close(fd);
                }
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!("generator: {sent} connections in {seconds} s");
}

fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn ip(ns: &str, args: &[&str]) {
    let st = Command::new("ip").args(["-n", ns]).args(args).status().unwrap();
    assert!(st.success(), "ip -n {ns} {args:?}");
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("generate") {
        generate(args[2].parse()?, args[3].parse()?);
        return Ok(());
    }
    let rate: u32 = args.get(1).map_or(Ok(10_000), |a| a.parse())?;
    let seconds: u64 = args.get(2).map_or(Ok(10), |a| a.parse())?;
    let guard = NetnsGuard::create(&NetnsGuard::unique_name("traffic-cpu"))?;
    let ns = guard.path().rsplit('/').next().unwrap().to_string();
    ip(&ns, &["link", "set", "lo", "up"]);
    ip(&ns, &["route", "add", "172.30.0.0/16", "dev", "lo"]);
    ip(&ns, &["route", "add", "10.244.0.0/16", "dev", "lo"]);
    let port = EmulatedServicePort {
        name: ServicePortName::new("demo", "web", "http"),
        protocol: Protocol::Tcp,
        cluster_ip: "172.30.0.41".parse()?,
        port: 80,
        node_port: None,
        endpoints: vec![WATCHED.parse()?, "10.244.2.11:8080".parse()?],
    };
    let mut restore = Command::new("ip")
        .args(["netns", "exec", &ns, "iptables-nft-restore", "--noflush"])
        .stdin(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        &mut restore.stdin.take().unwrap(),
        render_nat(&[port], true, &[]).as_bytes(),
    )?;
    anyhow::ensure!(restore.wait()?.success(), "loading the rules");
    // Unanswered SYNs stay tracked for 2 minutes by default: at this rate the table would fill, and
    // a new SYN whose ports an entry still holds is no new connection to conntrack (ports cycle
    // every ~3 s here).
    let sysctl = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.netfilter.nf_conntrack_tcp_timeout_syn_sent=1",
        ])
        .status()?;
    anyhow::ensure!(sysctl.success(), "setting the SYN_SENT timeout");
    let netns = NetNs::open(std::path::Path::new(&guard.path()))?;
    let exe = std::env::current_exe()?;
    println!(
        "# traffic_cpu: {rate} new connections/s for {seconds} s per phase, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{:<30} {:>8} {:>10} {:>9}", "phase", "cpu/s", "counted", "overruns");
    for watching in [false, true] {
        let mut generator = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&exe)
            .args(["generate", &rate.to_string(), &seconds.to_string()])
            .spawn()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watched: SocketAddr = WATCHED.parse()?;
        let listener = watching
            .then(|| conntrack::spawn_listener(&netns, move |c| c.target == watched, stop.clone(), tx))
            .transpose()?;
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        let (mut counted, mut overruns) = (0usize, 0usize);
        while t0.elapsed() < Duration::from_secs(seconds) {
            std::thread::sleep(Duration::from_millis(100));
            while let Ok(e) = rx.try_recv() {
                match e {
                    ConntrackEvent::Connections(c) => counted += c.len(),
                    ConntrackEvent::Overrun => overruns += 1,
                    ConntrackEvent::Failed(f) => anyhow::bail!("listener failed: {f}"),
                }
            }
        }
        let cpu = (cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(l) = listener {
            let _ = l.join();
        }
        generator.wait()?;
        let phase = if watching {
            "a removal pending (listening)"
        } else {
            "nothing removed (no socket)"
        };
        println!("{phase:<30} {:>7.1}% {counted:>10} {overruns:>9}", cpu * 100.0);
    }
    Ok(())
}
