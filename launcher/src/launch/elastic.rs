//! Which hosts of an elastic ssh-runner job answer before a restart: the probing half of
//! elastic continuation (the policy and the re-planned flags are `plan::elastic`; the
//! launch sequence in this folder's `mod.rs` restarts the job on the result). Hosts of the
//! current world get up to the return timeout to answer `ssh host true` again; hosts the
//! job went on without are probed once, and those that answer rejoin.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::nodes::ssh::SshLaunch;

/// Pause between rounds of probes of hosts that did not answer yet.
const PROBE_PERIOD: Duration = Duration::from_secs(1);

/// The hosts among `selected[1..]` (node 0 is this machine) that answer ssh: those in
/// `current` are waited for up to `timeout`, the others get one probe.
pub fn answering_hosts(
    launch: &SshLaunch,
    selected: &[String],
    current: &[String],
    timeout: Duration,
) -> BTreeSet<String> {
    let deadline = Instant::now() + timeout;
    let others = selected.get(1..).unwrap_or_default();
    let mut answered = BTreeSet::new();
    let mut round = 0;
    loop {
        let pending: Vec<&String> = others
            .iter()
            .filter(|h| !answered.contains(*h) && (round == 0 || current.contains(h)))
            .collect();
        answered.extend(probe_all(launch, &pending));
        let missing: Vec<&str> = others
            .iter()
            .filter(|h| current.contains(h) && !answered.contains(*h))
            .map(String::as_str)
            .collect();
        if missing.is_empty() || Instant::now() >= deadline {
            return answered;
        }
        if round == 0 {
            eprintln!(
                "rsdeep: elastic: waiting up to {:.0} s for {} to answer ssh again",
                timeout.as_secs_f64(),
                missing.join(", ")
            );
        }
        round += 1;
        std::thread::sleep(PROBE_PERIOD.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// Probes `hosts` in parallel; returns those that answered.
fn probe_all(launch: &SshLaunch, hosts: &[&String]) -> Vec<String> {
    std::thread::scope(|scope| {
        let probes: Vec<_> = hosts
            .iter()
            .map(|host| scope.spawn(move || launch.probe(host).is_ok().then(|| host.to_string())))
            .collect();
        probes
            .into_iter()
            .filter_map(|p| p.join().ok().flatten())
            .collect()
    })
}
