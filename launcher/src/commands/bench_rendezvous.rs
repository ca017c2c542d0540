//! `rsdeep bench-rendezvous [--workers 8] [--clients 1024]`: the two rendezvous figures
//! (recorded in `docs/status.md`). (1) Time from `rsdeep` start until all local selftest
//! workers have joined (the launcher's own "rendezvous complete ... ms after launcher
//! start" line, plus the wall time seen from outside). (2) Time for N in-process gRPC
//! clients to join one rendezvous (goal: 1024 in under 1 s). A benchmark, not a timed test.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::rendezvous::{RendezvousState, WorldSpec, start_server};
use anyhow::{Context, Result};
use clap::Parser;
use rsdeep_proto::v1::rendezvous_client::RendezvousClient;
use rsdeep_proto::v1::{JoinRequest, JoinResponse};
use rsdeep_proto::{PeerTableReader, RSDEEP_VERSION, TOKEN_METADATA_KEY};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
#[command(name = "rsdeep bench-rendezvous")]
struct BenchArgs {
    /// Local selftest workers for figure 1 (0 skips figure 1).
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// In-process clients for figure 2.
    #[arg(long, default_value_t = 1024)]
    clients: usize,
    /// HTTP/2 connections the in-process clients share; 0 (the default, the honest
    /// setting) gives every client its own connection, as real workers have.
    #[arg(long, default_value_t = 0)]
    connections: usize,
}

/// Runs both measurements and prints them.
pub fn run(args: &[String]) -> Result<i32> {
    let argv = std::iter::once("rsdeep bench-rendezvous".to_string()).chain(args.iter().cloned());
    let args = BenchArgs::parse_from(argv);
    if args.workers > 0 {
        let (launcher_ms, outside_ms) = local_workers_join(args.workers)?;
        println!(
            "figure 1: {} local CPU workers joined {launcher_ms:.1} ms after rsdeep start \
             (launcher clock; {outside_ms:.1} ms from spawning rsdeep)",
            args.workers
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let elapsed = runtime.block_on(in_process_join(args.clients, args.connections))?;
    let connections = match args.connections {
        0 => format!("{} connections, one per client", args.clients),
        shared => format!("{shared} shared connection(s)"),
    };
    println!(
        "figure 2: {} in-process clients joined one rendezvous in {:.1} ms over {connections}",
        args.clients,
        elapsed.as_secs_f64() * 1e3,
    );
    Ok(0)
}

/// Starts `rsdeep --selftest` with `workers` CPU ranks and reads its join-time line.
fn local_workers_join(workers: usize) -> Result<(f64, f64)> {
    let exe = std::env::current_exe()?;
    let spawned = Instant::now();
    let mut child = Command::new(exe)
        .args([
            "--device",
            "cpu",
            "--num_procs",
            &workers.to_string(),
            "--selftest",
            "--master_port",
            "0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start rsdeep")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut launcher_ms = None;
    let mut outside_ms = 0.0;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        if let Some(ms) = parse_join_ms(&line) {
            outside_ms = spawned.elapsed().as_secs_f64() * 1e3;
            launcher_ms = Some(ms);
        }
    }
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "rsdeep --selftest failed: {status}");
    let launcher_ms = launcher_ms.context("rsdeep never printed the rendezvous-complete line")?;
    Ok((launcher_ms, outside_ms))
}

/// `... in 123.4 ms after launcher start` -> 123.4
fn parse_join_ms(line: &str) -> Option<f64> {
    let head = line.strip_suffix(" ms after launcher start")?;
    head.rsplit(' ').next()?.parse().ok()
}

/// Joins `clients` tasks to one rendezvous and returns the time from the first connect to
/// the last checked Join answer. `connections == 0` gives every client its own HTTP/2
/// connection, opened by the client itself (what real workers do: the honest setting);
/// otherwise the clients share that many connections, opened up front.
async fn in_process_join(clients: usize, connections: usize) -> Result<Duration> {
    let spec = WorldSpec {
        job_id: "bench".into(),
        nodes: vec![("localhost".into(), clients)],
        join_timeout: Duration::from_secs(60),
    };
    let state = Arc::new(RendezvousState::new(spec));
    let token: AsciiMetadataValue = "bench-token".parse()?;
    let server = start_server(
        state.clone(),
        "bench-token".into(),
        ([127, 0, 0, 1], 0).into(),
    )
    .await?;
    let endpoint = Endpoint::from_shared(format!("http://{}", server.addr))?;
    let started = Instant::now();
    let mut shared = Vec::new();
    for _ in 0..connections {
        shared.push(endpoint.connect().await?);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for local_rank in 0..clients {
        let channel = (!shared.is_empty()).then(|| shared[local_rank % shared.len()].clone());
        let (endpoint, token) = (endpoint.clone(), token.clone());
        tasks.spawn(async move {
            let channel = match channel {
                Some(channel) => channel,
                None => endpoint
                    .connect()
                    .await
                    .with_context(|| format!("client {local_rank} cannot connect"))?,
            };
            let answer = join_one(channel, token, local_rank)
                .await
                .with_context(|| format!("client {local_rank}'s Join failed"))?;
            check_answer(&answer, local_rank, clients)
        });
    }
    let watcher =
        tokio::spawn(async move { state.wait_for_world().await.map(|_| started.elapsed()) });
    // In completion order: the first failing client ends the benchmark.
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let elapsed = started.elapsed();
    let server_side = watcher.await??;
    println!(
        "  (server saw the last Join after {:.1} ms; answers done after {:.1} ms)",
        server_side.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e3
    );
    Ok(elapsed)
}

/// One worker's Join call for local rank `local_rank` of node 0.
async fn join_one(
    channel: Channel,
    token: AsciiMetadataValue,
    local_rank: usize,
) -> Result<JoinResponse> {
    let mut client = RendezvousClient::new(channel);
    let mut request = tonic::Request::new(JoinRequest {
        job_id: "bench".into(),
        version: RSDEEP_VERSION.into(),
        node_rank: 0,
        local_rank: local_rank as u32,
        host: "localhost".into(),
        comm_addr: format!("127.0.0.1:{}", 20_000 + local_rank),
        pid: 0,
    });
    request.metadata_mut().insert(TOKEN_METADATA_KEY, token);
    Ok(client.join(request).await?.into_inner())
}

/// Checks an answer: its rank and world size, then walks the whole peer table with the
/// lazy reader (every entry in rank order, this client's own comm address in its slot)
/// without building owned peers: 1024 clients sharing 2 cores would otherwise spend most
/// of the figure allocating a million strings that real workers build on their own
/// machines (`rsdeep_worker::rendezvous` decodes the full table).
fn check_answer(answer: &JoinResponse, local_rank: usize, clients: usize) -> Result<()> {
    anyhow::ensure!(
        answer.rank as usize == local_rank && answer.world_size as usize == clients,
        "client {local_rank} got rank {} of {}",
        answer.rank,
        answer.world_size
    );
    let mut entries = 0;
    for (rank, peer) in PeerTableReader::new(&answer.peer_table).enumerate() {
        let peer = peer?;
        anyhow::ensure!(
            peer.rank as usize == rank,
            "entry {rank} holds rank {}",
            peer.rank
        );
        if rank == local_rank {
            let mine = format!("127.0.0.1:{}", 20_000 + local_rank);
            anyhow::ensure!(peer.comm_addr == mine, "client {local_rank} found {peer:?}");
        }
        entries += 1;
    }
    anyhow::ensure!(entries == clients, "peer table of {entries} ranks");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_launcher_join_line() {
        let line = "rsdeep: rendezvous complete: 8 rank(s) joined generation 1 in 412.5 ms after launcher start";
        assert_eq!(super::parse_join_ms(line), Some(412.5));
        assert_eq!(super::parse_join_ms("rsdeep: other"), None);
    }
}
