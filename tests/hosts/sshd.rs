//! A real OpenSSH server on loopback for the ssh-runner tests, following a recipe tested
//! on Debian 12: installs openssh if missing (as root, through apt-get), makes a host key
//! and a client key in its own temp folder, listens on 127.0.0.1 and 127.0.0.2 (two
//! "hosts" of this machine) on a free port, can stop and start answering on one of them
//! (a host lost, a host back), and is stopped by its pid when dropped.
//! `OtherHost` is a network namespace with its own address joined to this one by a veth
//! pair, for an sshd that is "another machine".

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

/// A running sshd and the client options that log into it without a password.
pub struct Sshd {
    pub port: u16,
    listen: Vec<String>,
    dir: tempfile::TempDir,
    child: Child,
}

impl Sshd {
    /// Starts sshd on `127.0.0.1` and `127.0.0.2`; panics saying why it cannot.
    pub fn start() -> Sshd {
        let listen = ["127.0.0.1", "127.0.0.2"].map(String::from).to_vec();
        Sshd::start_on(listen, free_port_on_both(), None)
    }

    /// Starts sshd inside `host`'s namespace, listening on its address only.
    pub fn start_in(host: &OtherHost) -> Sshd {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind a free port")
            .port();
        Sshd::start_on(vec![host.address.clone()], port, Some(&host.namespace))
    }

    fn start_on(listen: Vec<String>, port: u16, namespace: Option<&str>) -> Sshd {
        ensure_openssh();
        std::fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd (privilege separation)");
        let dir = tempfile::tempdir().expect("sshd temp dir");
        let run = dir.path();
        keygen(&run.join("host_key"));
        keygen(&run.join("client_key"));
        let config = run.join("sshd_config");
        std::fs::write(&config, sshd_config(run, port, &listen)).expect("write sshd_config");
        let check = Command::new(SSHD)
            .args(["-t", "-f"])
            .arg(&config)
            .output()
            .expect("run sshd -t");
        assert!(
            check.status.success(),
            "sshd rejects its config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = std::fs::File::create(run.join("sshd.out")).expect("sshd output file");
        let mut command = match namespace {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, SSHD]);
                c
            }
            None => Command::new(SSHD),
        };
        let child = command
            .args(["-D", "-f"])
            .arg(&config)
            .arg("-E")
            .arg(run.join("sshd.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start sshd");
        let sshd = Sshd {
            port,
            listen,
            dir,
            child,
        };
        sshd.wait_listening();
        sshd
    }

    /// `RSDEEP_SSH_ARGS` for this server: its client key, no user config, a throwaway
    /// known_hosts file.
    pub fn client_args(&self) -> String {
        let run = self.dir.path();
        format!(
            "-F none -i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=no -o LogLevel=ERROR",
            run.join("client_key").display(),
            run.join("known_hosts").display()
        )
    }

    /// Stops answering on `addr` (the "host" is gone): rewrites the config without it and
    /// sends SIGHUP, on which sshd re-executes itself with the new config; sessions
    /// already open keep running. Returns once a connection there is refused.
    pub fn stop_listening_on(&mut self, addr: &str) {
        self.listen.retain(|a| a != addr);
        self.reload();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((addr, self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "sshd still listens on {addr} 10 s after SIGHUP: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_listening();
    }

    /// Answers on `addr` again (the "host" came back); returns once it listens there.
    pub fn listen_again_on(&mut self, addr: &str) {
        self.listen.push(addr.to_string());
        self.reload();
        self.wait_listening();
    }

    /// Writes the config for the current addresses and makes sshd re-read it (SIGHUP).
    fn reload(&self) {
        let run = self.dir.path();
        std::fs::write(
            run.join("sshd_config"),
            sshd_config(run, self.port, &self.listen),
        )
        .expect("rewrite sshd_config");
        // SAFETY: kill(2) on the sshd this helper started.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        assert_eq!(rc, 0, "cannot send SIGHUP to sshd");
    }

    /// sshd's own log (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for addr in &self.listen {
            while TcpStream::connect((addr.as_str(), self.port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "sshd did not listen on {addr}:{} within 10 s: {}",
                    self.port,
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on the sshd this helper started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sshd_config(run: &Path, port: u16, listen: &[String]) -> String {
    let listen: String = listen
        .iter()
        .map(|a| format!("ListenAddress {a}\n"))
        .collect();
    format!(
        "Port {port}\n{listen}HostKey {}\n\
         AuthorizedKeysFile {}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\nUsePAM no\nPidFile {}\nStrictModes no\n",
        run.join("host_key").display(),
        run.join("client_key.pub").display(),
        run.join("sshd.pid").display()
    )
}

/// A port free on both loopback addresses right now.
fn free_port_on_both() -> u16 {
    for _ in 0..50 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind a free port")
            .port();
        if TcpListener::bind(("127.0.0.2", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

fn keygen(path: &PathBuf) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have_openssh() -> bool {
    let on_path = |name: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    Path::new(SSHD).exists() && on_path("ssh") && on_path("ssh-keygen")
}

/// Installs openssh-server and openssh-client when missing (idempotent); panics with the
/// reason when that is impossible (not root, no package source).
fn ensure_openssh() {
    if !have_openssh() {
        install_packages(&["openssh-server", "openssh-client"]);
        assert!(have_openssh(), "openssh is still missing after apt-get");
    }
}

/// Makes `program` available, installing the Debian `packages` that provide it when it is
/// not on PATH (the pdsh and Open MPI runner tests need the real programs); panics with
/// the reason when that is impossible (not root, no package source).
pub fn ensure_program(program: &str, packages: &[&str]) {
    let on_path = || {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {program}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !on_path() {
        install_packages(packages);
        assert!(
            on_path(),
            "{program} is still missing after installing {packages:?}"
        );
    }
}

/// `apt-get install` of `packages` (after an `apt-get update` when the first try fails).
fn install_packages(packages: &[&str]) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "{packages:?} missing and this test is not root: install them (the multi-node \
         runner tests need the real programs)"
    );
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let mut out = install().expect("run apt-get (is this Debian?)");
    if !out.status.success() {
        let _ = Command::new("apt-get").arg("update").output();
        out = install().expect("run apt-get");
    }
    assert!(
        out.status.success(),
        "cannot install {packages:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with its own address (`10.214.N.2`) reached from this namespace
/// (`10.214.N.1`) through a veth pair: a second "machine" on one kernel. A blackhole
/// route keeps the subnet on this machine; everything is removed on drop.
pub struct OtherHost {
    pub namespace: String,
    /// The address of this namespace's end (node 0's side).
    pub local_address: String,
    /// The namespace's address.
    pub address: String,
    veth: String,
    subnet: String,
}

impl OtherHost {
    /// Creates the namespace and the link; panics saying why it cannot (root needed).
    pub fn create() -> OtherHost {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the network-namespace ssh test needs root to create a namespace"
        );
        let id = 20 + std::process::id() % 200;
        let host = OtherHost {
            namespace: format!("rssshns{id}"),
            local_address: format!("10.214.{id}.1"),
            address: format!("10.214.{id}.2"),
            veth: format!("rssh{id}"),
            subnet: format!("10.214.{id}.0/24"),
        };
        host.remove(); // leftovers of a killed run with the same number
        let inner = format!("{}p", host.veth);
        ip(&["route", "add", "blackhole", &host.subnet, "metric", "4000"]);
        ip(&["netns", "add", &host.namespace]);
        ip(&[
            "link", "add", &host.veth, "type", "veth", "peer", "name", &inner,
        ]);
        ip(&["link", "set", &inner, "netns", &host.namespace]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", host.local_address),
            "dev",
            &host.veth,
        ]);
        ip(&["link", "set", &host.veth, "up"]);
        let ns = host.namespace.as_str();
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", host.address),
            "dev",
            &inner,
        ]);
        ip(&["-n", ns, "link", "set", &inner, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        host
    }

    /// Best-effort removal (parts may not exist).
    fn remove(&self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        };
        quiet(&["link", "del", &self.veth]);
        quiet(&["netns", "del", &self.namespace]);
        quiet(&["route", "del", "blackhole", &self.subnet, "metric", "4000"]);
    }
}

impl Drop for OtherHost {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Runs `ip args`; panics with its message on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (package iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
