//! Fuzz target (proptest at scale) for the rendezvous request handlers: random Join, Set,
//! Get, Barrier, Heartbeat, ErrorReport and NodeControl calls, with random or right tokens and job ids,
//! against one live in-process server (`rsdeep::rendezvous::start_server`). Properties: no
//! handler panics (a panic hook counts them), every refusal is a gRPC status with a
//! readable message of the right code, and a refused call changes nothing (the store,
//! error reports, progress and node reports are read back with the state API). Scale:
//! `PROPTEST_CASES` (default 256 in `make test`; `make fuzz` runs 100 000). Contract and
//! command: `docs/security.md` "Fuzzing".

use proptest::prelude::*;
use proptest::test_runner::Config;
use rsdeep::rendezvous::{RendezvousState, ServerHandle, WorldSpec, start_server};
use rsdeep_proto::v1::{self as pb, rendezvous_client::RendezvousClient};
use rsdeep_proto::{RSDEEP_VERSION, TOKEN_METADATA_KEY};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

const JOB: &str = "fuzzjob";
const TOKEN: &str = "fuzz-token-0123456789";

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// One runtime, server and client for every case.
struct Live {
    runtime: tokio::runtime::Runtime,
    state: Arc<RendezvousState>,
    client: RendezvousClient<Channel>,
    _server: ServerHandle,
}

fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let spec = WorldSpec {
            job_id: JOB.into(),
            nodes: vec![("n0".into(), 2), ("n1".into(), 1)],
            join_timeout: Duration::from_millis(30),
        };
        let state = Arc::new(RendezvousState::new(spec));
        let (server, client) = runtime.block_on(async {
            let server = start_server(state.clone(), TOKEN.into(), ([127, 0, 0, 1], 0).into())
                .await
                .expect("server");
            let client = RendezvousClient::connect(format!("http://{}", server.addr))
                .await
                .expect("client");
            (server, client)
        });
        Live {
            runtime,
            state,
            client,
            _server: server,
        }
    })
}

fn config(default: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Who the caller claims to be: (token, job id), each right or random.
fn identity() -> impl Strategy<Value = (Option<String>, String)> {
    let token = prop_oneof![
        3 => Just(Some(TOKEN.to_string())),
        1 => Just(None),
        1 => "[ -~]{0,40}".prop_map(Some),
    ];
    let job = prop_oneof![3 => Just(JOB.to_string()), 1 => "\\PC{0,12}"];
    (token, job)
}

#[derive(Debug, Clone)]
enum Call {
    Join(pb::JoinRequest),
    Set(pb::SetRequest),
    Get(pb::GetRequest),
    Barrier(pb::BarrierRequest),
    Heartbeat(Vec<pb::HeartbeatRequest>),
    Report(pb::ErrorReport),
    Control(pb::NodeStatus),
}

fn small_rank() -> impl Strategy<Value = u32> {
    prop_oneof![3 => 0u32..4, 1 => any::<u32>()]
}

fn call(job: String) -> impl Strategy<Value = Call> {
    let version = prop_oneof![3 => Just(RSDEEP_VERSION.to_string()), 1 => "\\PC{0,10}"];
    let key = "\\PC{0,16}";
    let wait = 1u64..40; // never 0: that means "the default 30 min"
    let j = job.clone();
    let join = (
        version,
        small_rank(),
        small_rank(),
        "\\PC{0,12}",
        "\\PC{0,24}",
        any::<u32>(),
    )
        .prop_map(
            move |(version, node_rank, local_rank, host, comm_addr, pid)| {
                Call::Join(pb::JoinRequest {
                    job_id: j.clone(),
                    version,
                    node_rank,
                    local_rank,
                    host,
                    comm_addr,
                    pid,
                })
            },
        );
    let j = job.clone();
    let set = (key, prop::collection::vec(any::<u8>(), 0..256)).prop_map(move |(key, value)| {
        Call::Set(pb::SetRequest {
            job_id: j.clone(),
            key,
            value,
        })
    });
    let j = job.clone();
    let get = (key, wait.clone()).prop_map(move |(key, timeout_ms)| {
        Call::Get(pb::GetRequest {
            job_id: j.clone(),
            key,
            timeout_ms,
        })
    });
    let j = job.clone();
    let barrier = (key, small_rank(), wait).prop_map(move |(name, rank, timeout_ms)| {
        Call::Barrier(pb::BarrierRequest {
            job_id: j.clone(),
            name,
            rank,
            timeout_ms,
        })
    });
    let j = job.clone();
    let beat = (
        small_rank(),
        any::<u64>(),
        any::<f64>(),
        any::<f64>(),
        any::<u64>(),
    )
        .prop_map(move |(rank, step, loss, tokens_per_second, generation)| {
            pb::HeartbeatRequest {
                job_id: j.clone(),
                rank,
                step,
                loss,
                tokens_per_second,
                generation,
                ..Default::default()
            }
        });
    let heartbeat = prop::collection::vec(beat, 0..4).prop_map(Call::Heartbeat);
    let j = job.clone();
    let control = (
        (small_rank(), 0u32..3, -1i32..6, any::<bool>()),
        (any::<i32>(), any::<u64>(), small_rank(), "\\PC{0,40}"),
        any::<bool>(),
    )
        .prop_map(
            move |(
                (node_rank, attempt, state, workers_stopped),
                (exit_code, at, rank, report),
                heard_exit,
            )| {
                Call::Control(pb::NodeStatus {
                    job_id: j.clone(),
                    node_rank,
                    attempt,
                    state,
                    workers_stopped,
                    exit_code,
                    failed_at_ms: at,
                    failed_rank: rank,
                    report,
                    heard_exit,
                })
            },
        );
    let report =
        (small_rank(), "\\PC{0,40}", any::<u64>()).prop_map(move |(rank, message, time_ms)| {
            Call::Report(pb::ErrorReport {
                job_id: job.clone(),
                rank,
                message,
                time_ms,
                caused_by_another_rank: false,
            })
        });
    prop_oneof![join, set, get, barrier, heartbeat, report, control]
}

fn request<T>(message: T, token: &Option<String>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = token.as_deref().and_then(|t| t.parse().ok()) {
        request.metadata_mut().insert(TOKEN_METADATA_KEY, value);
    }
    request
}

/// Sends `call`; `Ok` or the refusal.
async fn send(
    client: &mut RendezvousClient<Channel>,
    call: Call,
    token: &Option<String>,
) -> Result<(), tonic::Status> {
    match call {
        Call::Join(m) => client.join(request(m, token)).await.map(drop),
        Call::Set(m) => client.set(request(m, token)).await.map(drop),
        Call::Get(m) => client.get(request(m, token)).await.map(drop),
        Call::Barrier(m) => client.barrier(request(m, token)).await.map(drop),
        Call::Report(m) => client.report_error(request(m, token)).await.map(drop),
        Call::Control(m) => client.node_control(request(m, token)).await.map(drop),
        Call::Heartbeat(beats) => {
            let stream = tokio_stream::iter(beats);
            let answer = client.heartbeat(request(stream, token)).await?;
            // The command stream stays open while the launcher holds the sender: do not wait.
            drop(answer);
            Ok(())
        }
    }
}

/// What a refused call must leave untouched, read through the state API.
#[derive(Debug, PartialEq)]
struct Snapshot {
    key: Option<Vec<u8>>,
    errors: usize,
    progress: Vec<(usize, u64)>,
    /// Node reports the coordination state holds (`NodeControl`).
    node_reports: usize,
}

fn snapshot(live: &Live, call: &Call) -> Snapshot {
    let key = match call {
        Call::Set(m) => Some(m.key.clone()),
        _ => None,
    };
    let rank = match call {
        Call::Report(m) => m.rank as usize,
        _ => 0,
    };
    let value = key.and_then(|k| {
        live.runtime
            .block_on(live.state.get(&k, Duration::from_millis(1)))
            .ok()
    });
    let mut progress: Vec<(usize, u64)> = live
        .state
        .progress()
        .iter()
        .map(|(rank, p)| (*rank, p.step))
        .collect();
    progress.sort();
    Snapshot {
        key: value,
        errors: live.state.errors_of(rank).len(),
        progress,
        node_reports: live.state.control().reports().iter().flatten().count(),
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn rendezvous_handlers_never_panic_and_refusals_are_clear_and_change_nothing(
        (token, job) in identity(),
        call in identity().prop_flat_map(|(_, job)| call(job)),
        use_identity_job in any::<bool>(),
    ) {
        let live = live();
        let call = if use_identity_job { retarget(call, &job) } else { call };
        let refused_up_front = token.as_deref() != Some(TOKEN) || job_of(&call) != JOB;
        let heartbeat = matches!(call, Call::Heartbeat(_));
        if heartbeat {
            // Beats of earlier cases are recorded by a server task: let it finish first.
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = snapshot(live, &call);
        let mut client = live.client.clone();
        let answer = live.runtime.block_on(send(&mut client, call.clone(), &token));
        // Heartbeats are handled in a task after the call returns: give it a moment.
        if heartbeat {
            std::thread::sleep(Duration::from_millis(20));
        }
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a handler panicked");
        if let Err(status) = &answer {
            prop_assert!(!status.message().trim().is_empty(), "empty message: {status:?}");
            prop_assert!(status.code() != Code::Unknown && status.code() != Code::Internal,
                "unclear refusal: {status:?}");
        }
        if refused_up_front {
            if !matches!(call, Call::Heartbeat(_)) || token.as_deref() != Some(TOKEN) {
                let status = answer.as_ref().expect_err("a call with a wrong token or job was accepted");
                let expected = if token.as_deref() != Some(TOKEN) { Code::Unauthenticated } else { Code::NotFound };
                prop_assert_eq!(status.code(), expected, "{:?}", status);
                if expected == Code::NotFound {
                    prop_assert!(status.message().contains(job_of(&call)), "{:?}", status);
                }
            }
            prop_assert_eq!(snapshot(live, &call), before, "a refused call changed the state");
        }
    }
}

fn job_of(call: &Call) -> &str {
    match call {
        Call::Join(m) => &m.job_id,
        Call::Set(m) => &m.job_id,
        Call::Get(m) => &m.job_id,
        Call::Barrier(m) => &m.job_id,
        Call::Report(m) => &m.job_id,
        Call::Control(m) => &m.job_id,
        Call::Heartbeat(beats) => beats.first().map_or(JOB, |b| b.job_id.as_str()),
    }
}

/// The same call claiming job `job`.
fn retarget(call: Call, job: &str) -> Call {
    let job = job.to_string();
    match call {
        Call::Join(m) => Call::Join(pb::JoinRequest { job_id: job, ..m }),
        Call::Set(m) => Call::Set(pb::SetRequest { job_id: job, ..m }),
        Call::Get(m) => Call::Get(pb::GetRequest { job_id: job, ..m }),
        Call::Barrier(m) => Call::Barrier(pb::BarrierRequest { job_id: job, ..m }),
        Call::Report(m) => Call::Report(pb::ErrorReport { job_id: job, ..m }),
        Call::Control(m) => Call::Control(pb::NodeStatus { job_id: job, ..m }),
        Call::Heartbeat(beats) => Call::Heartbeat(
            beats
                .into_iter()
                .map(|b| pb::HeartbeatRequest {
                    job_id: job.clone(),
                    ..b
                })
                .collect(),
        ),
    }
}
