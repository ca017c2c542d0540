//! Coordinated restarts across nodes under `--launcher slurm` with several nodes: node 0
//! is the one decision maker (`lead_nodes`), every other node's launcher follows it
//! (`follow_node0`) through the rendezvous `NodeControl` poll (`crate::nodes::coordinate`,
//! `crate::rendezvous::control`). A failure anywhere stops
//! every node's workers; node 0 decides with `attempt::after_attempt`; a restart opens a
//! new rendezvous generation before any node starts its workers again with
//! `RSDEEP_RESTART_COUNT = k`; giving up (or a signal, which never restarts) ends every
//! node with the report naming the first failure. With `--min_nodes` (elastic) node 0
//! first waits for every node of the world to answer again and restarts the job on those
//! that do (`Regroup`); each node re-plans itself for the world node 0 names. Contract:
//! docs/status.md "Fault handling" and deploy/slurm/README.md.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::nodes::coordinate::{
    Decision, LinkTarget, NodeLink, POLL_PERIOD, RemoteNodes, outcome_of_event,
};
use crate::plan::LaunchPlan;
use crate::plan::elastic::{ElasticError, ElasticPolicy};
use crate::rendezvous::RendezvousState;
use crate::rendezvous::control::RemoteEvent;
use crate::supervise::{self, Outcome, STOP_SIGNAL, SuperviseOptions, Worker};
use anyhow::{Context, Result};
use rsdeep_contract::env as ev;
use rsdeep_proto::tls;

use crate::supervise::attempt::{
    AfterAttempt, after_attempt, announce_regroup, announce_world, rank_program, report_outcome,
    resume_point, spawn_local_workers, supervise_options, world_spec,
};

/// Beyond the grace period: how long node 0 waits for the other nodes to report their
/// workers stopped, and to hear its final word, before going on without them.
const NODE_MARGIN: Duration = Duration::from_secs(5);

/// How the nodes of a SLURM job may change their world at a restart: node 0 decides from
/// the nodes that answer (`policy`, `None` without `--min_nodes`: the world never
/// changes); every node re-plans itself for the world node 0 names (`replan`).
pub struct Regroup<'a> {
    pub policy: Option<ElasticPolicy>,
    /// Every node of the SLURM step by launch node id (`SLURM_NODEID`), node 0 first.
    pub names: Vec<String>,
    /// This node's plan in the world of these launch node ids (node 0 first).
    pub replan: &'a dyn Fn(&[usize]) -> Result<LaunchPlan>,
}

/// How long ago a node's last poll may be for it to count as answering (it polls every
/// `POLL_PERIOD` while it waits for node 0's decision).
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// Node 0: runs its own workers, hears every other node, decides for all of them.
pub fn lead_nodes(
    runtime: &tokio::runtime::Runtime,
    plan: &LaunchPlan,
    state: Arc<RendezvousState>,
    regroup: &Regroup,
    started: Instant,
) -> Result<i32> {
    let program = rank_program(plan)?;
    let control = state.control();
    control.set_lost_after(lost_after(plan));
    let mut current = plan.clone();
    let mut world: Vec<usize> = (0..plan.nodes.len()).collect();
    for attempt in 0..=plan.max_restarts {
        let _span = tracing::info_span!("attempt", attempt, node = 0).entered();
        control.begin_attempt_on(attempt, state.generation(), world.clone());
        announce_world(runtime, state.clone(), started);
        let plan = &current;
        let options = SuperviseOptions {
            stop_source: Some(Arc::new(RemoteNodes(state.clone()))),
            ..supervise_options(plan)
        };
        let local: Vec<_> = plan.local_ranks().collect();
        let mut workers = spawn_local_workers(&program, &local, attempt, plan)?;
        let local_outcome = supervise::watch(&mut workers, Some(state.as_ref()), &options);
        report_outcome(&local_outcome, workers.len(), plan);
        let outcome = match local_outcome {
            Outcome::Success => wait_for_other_nodes(&state),
            other => other,
        };
        control.stop_all();
        stop_local(&mut workers, plan);
        wait_until_nodes_stopped(&state, plan.grace_period + NODE_MARGIN);
        let outcome = first_failure_of_all(&state, outcome);
        match after_attempt(&outcome, attempt, plan.max_restarts) {
            AfterAttempt::Exit(code) => return Ok(end_job(&state, code, &outcome)),
            AfterAttempt::GiveUp(code) => {
                eprintln!(
                    "rsdeep: giving up: all {} restart(s) used; the last failure is reported above",
                    plan.max_restarts
                );
                return Ok(end_job(&state, code, &outcome));
            }
            AfterAttempt::Restart => {}
        }
        let next = match &regroup.policy {
            Some(policy) => match next_world(&state, policy, &regroup.names, &world) {
                Ok(next) => next,
                Err(e) => {
                    eprintln!("rsdeep: giving up: {e}");
                    return Ok(end_job(&state, outcome.exit_code(), &outcome));
                }
            },
            None => None,
        };
        let Some(next) = next else {
            let generation = state.next_generation();
            eprintln!(
                "rsdeep: restarting the job ({}/{}), rendezvous generation {generation}: {}",
                attempt + 1,
                plan.max_restarts,
                resume_point(plan)
            );
            continue;
        };
        let next_plan = (regroup.replan)(&next)?;
        announce_regroup(plan, &next_plan, attempt + 1);
        state.next_generation_on(world_spec(&next_plan));
        (world, current) = (next, next_plan);
    }
    Ok(1)
}

/// Before an elastic restart: waits up to the return timeout for every node of `world`
/// to answer again; the world of the next attempt when it differs from `world`.
fn next_world(
    state: &RendezvousState,
    policy: &ElasticPolicy,
    names: &[String],
    world: &[usize],
) -> Result<Option<Vec<usize>>, ElasticError> {
    let deadline = Instant::now() + policy.return_timeout;
    let mut announced = false;
    let answering = loop {
        let answering = state.control().answering(ANSWER_WITHIN);
        let missing: Vec<&str> = world
            .iter()
            .filter(|&&n| n != 0 && !answering.contains(&n))
            .map(|&n| names[n].as_str())
            .collect();
        if missing.is_empty() || Instant::now() >= deadline {
            break answering;
        }
        if !announced {
            eprintln!(
                "rsdeep: elastic: waiting up to {:.0} s for {} to answer again",
                policy.return_timeout.as_secs_f64(),
                missing.join(", ")
            );
            announced = true;
        }
        std::thread::sleep(POLL_PERIOD);
    };
    let answer: BTreeSet<String> = answering.iter().map(|&n| names[n].clone()).collect();
    let hosts = policy.next_hosts(names, &answer)?;
    let next: Vec<usize> = hosts
        .iter()
        .filter_map(|host| names.iter().position(|n| n == host))
        .collect();
    Ok((next != world).then_some(next))
}

/// Node K >= 1: runs its workers for the attempt node 0 names, reports how they ended
/// and does what node 0 decides (re-planning itself when node 0 names another world).
pub fn follow_node0(
    runtime: &tokio::runtime::Runtime,
    plan: &LaunchPlan,
    regroup: &Regroup,
) -> Result<i32> {
    let program = rank_program(plan)?;
    let link = NodeLink::start(runtime.handle(), link_target(plan)?)
        .context("cannot follow node 0's rendezvous")?;
    let options = SuperviseOptions {
        stop_source: Some(link.stop_source()),
        ..supervise_options(plan)
    };
    let mut plan = plan.clone();
    let mut world: Vec<usize> = (0..plan.nodes.len()).collect();
    let mut attempt = 0;
    loop {
        let _span = tracing::info_span!("attempt", attempt, node = plan.node_rank).entered();
        link.begin_attempt(attempt);
        let local: Vec<_> = plan.local_ranks().collect();
        let mut workers = spawn_local_workers(&program, &local, attempt, &plan)?;
        let outcome = supervise::watch(&mut workers, None, &options);
        report_outcome(&outcome, workers.len(), &plan);
        link.report_outcome(&outcome);
        stop_local(&mut workers, &plan);
        link.mark_stopped();
        match &outcome {
            Outcome::Interrupted { signal } => {
                link.flush(Duration::from_secs(2));
                return Ok(128 + signal);
            }
            Outcome::Stopped { exit_code, .. } if link.is_lost() => return Ok(*exit_code),
            _ => {}
        }
        match link.wait_for_decision(attempt) {
            Decision::Restart {
                attempt: next,
                generation,
                world: next_world,
            } => {
                if !next_world.is_empty() && next_world != world {
                    plan = (regroup.replan)(&next_world)?;
                    eprintln!(
                        "rsdeep: node 0 restarts the job on {} node(s): this node is node {} of world size {}",
                        next_world.len(),
                        plan.node_rank,
                        plan.world_size()
                    );
                    world = next_world;
                }
                eprintln!(
                    "rsdeep: node 0 restarts the job: starting this node's workers again (restart count {next}, rendezvous generation {generation})"
                );
                attempt = next;
            }
            Decision::Exit { code, report } => {
                link.flush(Duration::from_secs(2));
                return Ok(exit_as_told(code, &report, &outcome));
            }
            Decision::Lost(why) => {
                eprintln!("rsdeep: {why}; stopping this node");
                return Ok(1);
            }
            Decision::Signal(signal) => {
                let interrupted = Outcome::Interrupted { signal };
                link.report_outcome(&interrupted);
                link.flush(Duration::from_secs(2));
                eprintln!(
                    "rsdeep: received signal {signal} while waiting for node 0's decision; exiting"
                );
                return Ok(interrupted.exit_code());
            }
        }
    }
}

fn stop_local(workers: &mut [Worker], plan: &LaunchPlan) {
    let killed = supervise::stop_workers(workers, plan.grace_period);
    if killed > 0 {
        eprintln!("rsdeep: {killed} worker(s) ignored SIGTERM and were killed");
    }
}

/// Silence after which a node (or node 0, seen from a node) counts as lost: the
/// heartbeat timeout, 300 s when hang detection is off.
fn lost_after(plan: &LaunchPlan) -> Duration {
    plan.heartbeat_timeout.unwrap_or(Duration::from_secs(300))
}

/// Where node K polls node 0: the rendezvous, over TLS when the workers use it.
fn link_target(plan: &LaunchPlan) -> Result<LinkTarget> {
    let host = match plan.master_addr.contains(':') {
        true => format!("[{}]", plan.master_addr),
        false => plan.master_addr.clone(),
    };
    let ca = plan
        .local_ranks()
        .next()
        .and_then(|r| r.env.get(ev::TLS_CA_ENV).cloned());
    let tls = match &ca {
        Some(ca) => {
            let domain =
                std::env::var(ev::TLS_DOMAIN_ENV).unwrap_or_else(|_| plan.master_addr.clone());
            Some(tls::client_config(std::path::Path::new(ca), &domain)?)
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    Ok(LinkTarget {
        url: format!("{scheme}://{host}:{}", plan.master_port),
        token: plan.token.clone(),
        job_id: plan.job_id.clone(),
        node_rank: plan.node_rank,
        tls,
        first_contact_within: plan.join_timeout,
        lost_after: lost_after(plan),
    })
}

/// After node 0's own workers all exited 0: waits until every other node's workers
/// ended, another node failed or was signalled, or node 0 was signalled.
fn wait_for_other_nodes(state: &RendezvousState) -> Outcome {
    eprintln!("rsdeep: node 0 is done; waiting for the other node(s)");
    loop {
        let signal = STOP_SIGNAL.load(std::sync::atomic::Ordering::SeqCst);
        if signal != 0 {
            return Outcome::Interrupted { signal };
        }
        if let Some(event) = state.control().remote_event() {
            let outcome = outcome_of_event(state, event);
            report_remote(&outcome);
            return outcome;
        }
        if state.control().all_ended() {
            return Outcome::Success;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn report_remote(outcome: &Outcome) {
    match outcome {
        Outcome::WorkerFailed { report, .. } | Outcome::Hung { report, .. } => eprint!("{report}"),
        Outcome::Interrupted { signal } => {
            eprintln!("rsdeep: another node's launcher got signal {signal}: stopping every node")
        }
        Outcome::Stopped { reason, .. } => eprintln!("rsdeep: {reason}"),
        _ => {}
    }
}

/// Waits (up to `limit`) for every other node to report its workers of this attempt
/// stopped (lost nodes and nodes that never polled are not waited for); names the nodes
/// that did not.
fn wait_until_nodes_stopped(state: &RendezvousState, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !state.control().still_stopping().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let late = state.control().not_stopped();
    if !late.is_empty() {
        eprintln!(
            "rsdeep: warning: node(s) {late:?} did not report their workers stopped (lost, or not within {:.1} s); going on without them",
            limit.as_secs_f64()
        );
    }
}

/// The attempt's outcome over every node: a signal anywhere wins (never restarted);
/// otherwise the earliest worker failure by time, here or on another node.
fn first_failure_of_all(state: &RendezvousState, outcome: Outcome) -> Outcome {
    let remote = state.control().remote_event();
    match (&outcome, remote) {
        (Outcome::Interrupted { .. }, _) => outcome,
        (_, Some(event @ RemoteEvent::Interrupted(_))) => {
            let remote = outcome_of_event(state, event);
            report_remote(&remote);
            remote
        }
        (Outcome::WorkerFailed { at_ms, .. }, Some(RemoteEvent::Failed(report)))
            if report.failed_at_ms < *at_ms =>
        {
            let remote = outcome_of_event(state, RemoteEvent::Failed(report));
            eprintln!("rsdeep: the first failure by time was on another node:");
            report_remote(&remote);
            remote
        }
        _ => outcome,
    }
}

/// Tells every node the job is over and waits (briefly) until each has heard it.
fn end_job(state: &RendezvousState, code: i32, outcome: &Outcome) -> i32 {
    let report = match outcome {
        Outcome::Success => String::new(),
        Outcome::WorkerFailed { report, .. } | Outcome::Hung { report, .. } => report.clone(),
        Outcome::JoinTimeout { message } => format!("rsdeep: {message}\n"),
        Outcome::Interrupted { signal } => format!("rsdeep: stopped by signal {signal}\n"),
        Outcome::Stopped { reason, .. } => format!("rsdeep: {reason}\n"),
    };
    state.control().decide_exit(code, report);
    let deadline = Instant::now() + NODE_MARGIN;
    while !state.control().not_told_exit().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if code == 0 {
        eprintln!("rsdeep: every node finished");
    }
    code
}

/// Node K's exit on node 0's final word, printing the job's failure when it is not the
/// one this node already printed.
fn exit_as_told(code: i32, report: &str, own: &Outcome) -> i32 {
    let own_report = match own {
        Outcome::WorkerFailed { report, .. } => report.as_str(),
        _ => "",
    };
    let already_printed = !own_report.is_empty() && report.contains(own_report.trim_end());
    if code == 0 {
        eprintln!("rsdeep: node 0 reports every node finished");
    } else if already_printed || report.is_empty() {
        eprintln!("rsdeep: node 0 ends the job with exit code {code} (the failure above)");
    } else {
        eprint!("rsdeep: node 0 ends the job with exit code {code}; the job's failure:\n{report}");
    }
    code
}
