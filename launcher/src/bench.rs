//! `rsdeep bench-rendezvous [--workers 8] [--clients 1024]`: the two rendezvous figures of
//! issue 2. (1) Time from `rsdeep` start until all local selftest workers have joined
//! (the launcher's own "rendezvous complete ... ms after launcher start" line, plus the
//! wall time seen from outside). (2) Time for N in-process gRPC clients to join one
//! rendezvous (goal: 1024 in under 1 s). A benchmark, not a timed test.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use rsdeep::rendezvous::{RendezvousState, WorldSpec, start_server};
use rsdeep_proto::v1::JoinRequest;
use rsdeep_proto::v1::rendezvous_client::RendezvousClient;
use rsdeep_proto::{RSDEEP_VERSION, TOKEN_METADATA_KEY};
use tonic::transport::Endpoint;

#[derive(Debug, Parser)]
#[command(name = "rsdeep bench-rendezvous")]
struct BenchArgs {
    /// Local selftest workers for figure 1.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// In-process clients for figure 2.
    #[arg(long, default_value_t = 1024)]
    clients: usize,
    /// HTTP/2 connections the in-process clients share.
    #[arg(long, default_value_t = 16)]
    connections: usize,
}

/// Runs both measurements and prints them.
pub fn run(args: &[String]) -> Result<i32> {
    let argv = std::iter::once("rsdeep bench-rendezvous".to_string()).chain(args.iter().cloned());
    let args = BenchArgs::parse_from(argv);
    let (launcher_ms, outside_ms) = local_workers_join(args.workers)?;
    println!(
        "figure 1: {} local CPU workers joined {launcher_ms:.1} ms after rsdeep start \
         (launcher clock; {outside_ms:.1} ms from spawning rsdeep)",
        args.workers
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let elapsed = runtime.block_on(in_process_join(args.clients, args.connections))?;
    println!(
        "figure 2: {} in-process clients joined one rendezvous in {:.1} ms over {} connection(s)",
        args.clients,
        elapsed.as_secs_f64() * 1e3,
        args.connections
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

/// Joins `clients` tasks to one rendezvous over `connections` channels; returns the time
/// from the first connect to the last Join answer, after checking every answer.
async fn in_process_join(clients: usize, connections: usize) -> Result<Duration> {
    let spec = WorldSpec {
        job_id: "bench".into(),
        nodes: vec![("localhost".into(), clients)],
        join_timeout: Duration::from_secs(60),
    };
    let state = Arc::new(RendezvousState::new(spec));
    let token = "bench-token".to_string();
    let server = start_server(state.clone(), token.clone(), ([127, 0, 0, 1], 0).into()).await?;
    let endpoint = Endpoint::from_shared(format!("http://{}", server.addr))?
        .initial_connection_window_size(Some(32 << 20))
        .initial_stream_window_size(Some(4 << 20));
    let started = Instant::now();
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(endpoint.connect().await?);
    }
    let mut tasks = Vec::with_capacity(clients);
    for local_rank in 0..clients {
        let channel = channels[local_rank % channels.len()].clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
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
            request.metadata_mut().insert(
                TOKEN_METADATA_KEY,
                token.parse().map_err(anyhow::Error::from)?,
            );
            let answer = client.join(request).await?.into_inner();
            anyhow::ensure!(answer.rank as usize == local_rank && answer.peers.len() == clients);
            Ok::<_, anyhow::Error>(())
        }));
    }
    let watcher =
        tokio::spawn(async move { state.wait_for_world().await.map(|_| started.elapsed()) });
    for task in tasks {
        task.await??;
    }
    let server_side = watcher.await??;
    println!(
        "  (server saw the last Join after {:.1} ms; answers done after {:.1} ms)",
        server_side.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(started.elapsed())
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
