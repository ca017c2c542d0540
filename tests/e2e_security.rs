//! End-to-end security checks (contract: `docs/security.md`) through the real
//! binaries on loopback: a TLS rendezvous runs a 2-rank selftest and refuses plaintext
//! clients; during a running 2-rank CPU training, gRPC clients with a wrong token and raw
//! TCP connections writing random bytes to the rendezvous port and to a worker's collective
//! port are refused or dropped, and the run ends with exactly the weights of a run without
//! intruders.

use rsdeep_e2e::{Launcher, TrainFixture, alive, binary, worker_script};
use rsdeep_proto::TOKEN_METADATA_KEY;
use rsdeep_proto::v1::{self as pb, rendezvous_client::RendezvousClient};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const RUN_LIMIT: Duration = Duration::from_secs(300);
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// A job id no other run on this machine uses (the launcher keys its temp folder by it).
fn job_id(name: &str) -> String {
    format!("sec-{name}-{}", std::process::id())
}

/// The tests start 2-rank jobs: one at a time on a small host.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The rendezvous port the launcher announced on stderr.
fn rendezvous_port(launcher: &Launcher) -> u16 {
    let marker = "rendezvous 127.0.0.1:";
    launcher.wait_for_stderr(Duration::from_secs(60), |s| s.contains(marker));
    let stderr = launcher.stderr();
    let at = stderr.find(marker).expect("marker") + marker.len();
    let digits: String = stderr[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect("rendezvous port")
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = token.parse().expect("ascii token");
    request.metadata_mut().insert(TOKEN_METADATA_KEY, value);
    request
}

fn random_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

#[test]
fn tls_rendezvous_runs_a_selftest_and_refuses_plaintext_clients() {
    let _serial = serial();
    let job = job_id("tls");
    let certs = tempfile::tempdir().expect("temp dir");
    let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let pair = rcgen::generate_simple_self_signed(names).expect("self-signed certificate");
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert, pair.cert.pem()).expect("cert.pem");
    std::fs::write(&key, pair.signing_key.serialize_pem()).expect("key.pem");
    // The workers wait 4 s before joining so the server is up while the test probes it.
    let script = worker_script(certs.path(), "sleep 4\nexec \"$REAL_WORKER\"");
    let envs = [
        ("RSDEEP_WORKER_BIN", script.to_string_lossy().to_string()),
        (
            "REAL_WORKER",
            binary("rsdeep-worker").to_string_lossy().to_string(),
        ),
        ("PID_DIR", certs.path().to_string_lossy().to_string()),
        ("RSDEEP_JOB_ID", job.clone()),
        ("RSDEEP_TOKEN", TOKEN.to_string()),
    ];
    let (cert_arg, key_arg) = (cert.to_string_lossy(), key.to_string_lossy());
    let args = [
        "--device",
        "cpu",
        "--num_procs",
        "2",
        "--master_port",
        "0",
        "--selftest",
        "--rendezvous_tls_cert",
        &cert_arg,
        "--rendezvous_tls_key",
        &key_arg,
    ];
    let mut launcher = Launcher::start(&args, &envs);
    let port = rendezvous_port(&launcher);
    let rt = runtime();
    rt.block_on(async {
        let set = pb::SetRequest {
            job_id: job.clone(),
            key: "plaintext".into(),
            value: vec![1],
        };
        let plain = async {
            let mut client = RendezvousClient::connect(format!("http://127.0.0.1:{port}")).await?;
            client.set(with_token(set, TOKEN)).await?;
            anyhow::Ok(())
        };
        let answer = tokio::time::timeout(Duration::from_secs(10), plain).await;
        assert!(
            matches!(answer, Ok(Err(_))),
            "a plaintext client was not refused by the TLS rendezvous"
        );
        // Over TLS the server answers, and still wants the token.
        let pem = std::fs::read(&cert).expect("cert");
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name("127.0.0.1");
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls config")
            .connect()
            .await
            .expect("TLS connection to the rendezvous");
        let get = pb::GetRequest {
            job_id: job.clone(),
            key: "plaintext".into(),
            timeout_ms: 100,
        };
        let mut client = RendezvousClient::new(channel);
        let refused = client.get(with_token(get.clone(), "wrong")).await;
        assert_eq!(
            refused.expect_err("wrong token accepted").code(),
            tonic::Code::Unauthenticated
        );
        let absent = client.get(with_token(get, TOKEN)).await;
        assert_eq!(
            absent.expect_err("the plaintext Set got through").code(),
            tonic::Code::DeadlineExceeded
        );
    });
    let status = launcher.wait(RUN_LIMIT);
    assert!(
        status.success(),
        "TLS selftest failed:\n{}",
        launcher.output()
    );
    let stdout = launcher.stdout();
    assert!(
        stdout.contains("rank 0/2") && stdout.contains("rank 1/2"),
        "{}",
        launcher.output()
    );
}

/// The fixture of these tests: a 200-line corpus for a short deterministic 2-rank CPU
/// pretraining (12 steps, ZeRO-2).
fn fixture() -> TrainFixture {
    let corpus: String = (0..200)
        .map(|i| {
            let words = ["fox", "dog", "cat", "river", "fence", "garden", "door"];
            let text = format!(
                "the {} sees the {} near the {}.",
                words[i % 7],
                words[(i / 7) % 7],
                words[(i / 3) % 7]
            );
            serde_json::json!({ "text": text }).to_string() + "\n"
        })
        .collect();
    TrainFixture::new(&corpus, 32, 320, 300)
}

/// Starting the fixture's training under a job id and token.
trait SecuredRuns {
    fn start(&self, output_dir: &str, job: &str, extra: &[(&str, String)]) -> Launcher;
}

impl SecuredRuns for TrainFixture {
    /// Starts the 2-rank run; `extra` env entries are added to the launcher's.
    fn start(&self, output_dir: &str, job: &str, extra: &[(&str, String)]) -> Launcher {
        let settings = serde_json::json!({
            "block_size": 16,
            "max_steps": 12,
            "seed": 11,
            "output_dir": self.path(output_dir),
        });
        let json = self.pretrain_json(&format!("{output_dir}.json"), settings);
        let json = json.to_string_lossy().to_string();
        let args = [
            "--device",
            "cpu",
            "--num_procs",
            "2",
            "--master_port",
            "0",
            &json,
        ];
        let mut envs = vec![
            ("OMP_NUM_THREADS", "1".to_string()),
            ("RSDEEP_JOB_ID", job.to_string()),
            ("RSDEEP_TOKEN", TOKEN.to_string()),
        ];
        envs.extend_from_slice(extra);
        Launcher::start(&args, &envs)
    }
}

/// Pids of `parent`'s children (from /proc/PID/task/*/children).
fn children(parent: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// TCP ports `pid` listens on (its socket inodes matched against /proc/net/tcp{,6}).
fn listening_ports(pid: i32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().to_string();
                    Some(
                        link.strip_prefix("socket:[")?
                            .strip_suffix(']')?
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1 ("ADDR:PORT" in hex), st field 3 ("0A" = LISTEN), inode 9.
            if fields.len() > 9 && fields[3] == "0A" && inodes.iter().any(|i| i == fields[9]) {
                let port = fields[1].rsplit(':').next().unwrap_or("");
                ports.extend(u16::from_str_radix(port, 16).ok());
            }
        }
    }
    ports
}

/// Attacks every collective listener of the workers of launcher `pid` as soon as it
/// appears (the ring closes them once formed), until `workers` were attacked or the
/// launcher is gone: each gets random bytes from its own thread. Returns, per port, what
/// the worker sent back.
///
/// A child caught between fork and exec still holds the launcher's own sockets (the
/// rendezvous listener, which answers garbage with an HTTP/2 GOAWAY), so ports the
/// launcher itself listens on are never counted as a worker's.
fn attack_worker_ports(pid: i32, workers: usize) -> Vec<(u16, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut attacks = Vec::new();
    let mut seen = Vec::new();
    let exe = |pid: i32| std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let launcher_exe = exe(pid);
    while seen.len() < workers && alive(pid) && Instant::now() < deadline {
        let launcher_ports = listening_ports(pid);
        // A child forked but not yet exec'd still holds the launcher's descriptors (its
        // rendezvous listener among them): only children running another program count.
        let workers_now = children(pid)
            .into_iter()
            .filter(|&child| exe(child).is_some_and(|e| Some(e) != launcher_exe));
        for port in workers_now.flat_map(listening_ports) {
            if !seen.contains(&port) && !launcher_ports.contains(&port) {
                seen.push(port);
                attacks.push((port, std::thread::spawn(move || inject(port).0)));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    attacks
        .into_iter()
        .map(|(port, attack)| (port, attack.join().expect("attack thread")))
        .collect()
}

/// Connects to `port` and writes random bytes; returns what came back and whether the
/// peer refused or closed the connection (rather than 3 s of silence).
fn inject(port: u16) -> (Vec<u8>, bool) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return (Vec::new(), true); // refused outright
    };
    let _ = stream.write_all(&random_bytes(64 * 1024));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let mut answer = Vec::new();
    let closed = match stream.read_to_end(&mut answer) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    (answer, closed)
}

/// Wrong-token calls of every kind against the live rendezvous: all UNAUTHENTICATED, and
/// the store (read with the right token) shows none of them.
fn wrong_token_calls(port: u16, job: &str) {
    runtime().block_on(async {
        let url = format!("http://127.0.0.1:{port}");
        let mut client = RendezvousClient::connect(url).await.expect("rendezvous");
        let join = pb::JoinRequest {
            job_id: job.into(),
            version: rsdeep_proto::RSDEEP_VERSION.into(),
            node_rank: 0,
            local_rank: 0,
            host: "intruder".into(),
            comm_addr: "127.0.0.1:9".into(),
            pid: 1,
        };
        let set = pb::SetRequest {
            job_id: job.into(),
            key: "intruder".into(),
            value: vec![0xEE; 16],
        };
        let barrier = pb::BarrierRequest {
            job_id: job.into(),
            name: "intruder".into(),
            rank: 0,
            timeout_ms: 100,
        };
        let report = pb::ErrorReport {
            job_id: job.into(),
            rank: 0,
            message: "intruder".into(),
            time_ms: 0,
            caused_by_another_rank: false,
        };
        let codes = [
            client.join(with_token(join, "wrong")).await.map(|_| ()),
            client.set(with_token(set, "wrong")).await.map(|_| ()),
            client.barrier(with_token(barrier, "")).await.map(|_| ()),
            client
                .report_error(tonic::Request::new(report))
                .await
                .map(|_| ()),
        ];
        for (call, answer) in ["join", "set", "barrier", "report_error"].iter().zip(codes) {
            let status = answer.expect_err(call);
            assert_eq!(
                status.code(),
                tonic::Code::Unauthenticated,
                "{call}: {status:?}"
            );
            assert!(!status.message().is_empty(), "{call}: empty refusal");
        }
        let get = pb::GetRequest {
            job_id: job.into(),
            key: "intruder".into(),
            timeout_ms: 100,
        };
        let absent = client.get(with_token(get, TOKEN)).await;
        assert_eq!(
            absent.expect_err("an intruder's Set was stored").code(),
            tonic::Code::DeadlineExceeded
        );
    });
}

#[test]
fn intruders_are_refused_and_the_run_ends_with_the_same_weights() {
    let _serial = serial();
    let fx = fixture();
    let mut clean = fx.start("clean", &job_id("clean"), &[]);
    assert!(
        clean.wait(RUN_LIMIT).success(),
        "clean run failed:\n{}",
        clean.output()
    );

    // Rank 1 starts 3 s late, so rank 0's collective listener is open (waiting for the
    // world) long enough to be attacked; a ring forms in milliseconds once both are up.
    let script = worker_script(
        fx.root(),
        "[ \"$LOCAL_RANK\" = 1 ] && sleep 3\nexec \"$REAL_WORKER\"",
    );
    let late_rank_one = [
        ("RSDEEP_WORKER_BIN", script.to_string_lossy().to_string()),
        (
            "REAL_WORKER",
            binary("rsdeep-worker").to_string_lossy().to_string(),
        ),
        ("PID_DIR", fx.root().to_string_lossy().to_string()),
    ];
    let job = job_id("attacked");
    let mut attacked = fx.start("attacked", &job, &late_rank_one);
    let pid = attacked.pid();
    let collective = std::thread::spawn(move || attack_worker_ports(pid, 2));
    // The workers need seconds to load libtorch: the rendezvous is attacked meanwhile.
    let port = rendezvous_port(&attacked);
    for _ in 0..3 {
        let (_, closed) = inject(port);
        assert!(
            closed,
            "the rendezvous kept a connection of random bytes open"
        );
    }
    wrong_token_calls(port, &job);
    let attacks = collective.join().expect("collective attack");
    assert!(
        !attacks.is_empty(),
        "no worker collective listener was seen to attack:\n{}",
        attacked.output()
    );
    eprintln!("collective listeners attacked: {}", attacks.len());
    for (port, answer) in attacks {
        assert!(
            answer.is_empty(),
            "collective port {port} answered an intruder with {} bytes",
            answer.len()
        );
    }
    let status = attacked.wait(RUN_LIMIT);
    assert!(
        status.success(),
        "the attacked run failed:\n{}",
        attacked.output()
    );
    let dropped = attacked.stderr().matches("dropped ring connection").count();
    eprintln!("ring connections dropped by the workers: {dropped}");
    assert!(
        dropped >= 1,
        "no worker logged dropping the intruder's ring connection:\n{}",
        attacked.output()
    );
    let weights = |dir: &str| -> Vec<u8> {
        let path: &Path = &fx.path(dir).join("model.safetensors");
        std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    assert!(
        weights("clean") == weights("attacked"),
        "the weights after the attack differ from the clean run"
    );
}
