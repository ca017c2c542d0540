//! The pdsh runner, DeepSpeed's default for multi-node jobs: one `pdsh -S -f 1024 -w
//! host0,host1,...` runs `rsdeep --no_ssh --node_rank %n --stop_on_stdin_eof ...` on
//! every node, the first host included (pdsh replaces `%n` with the host's index in the
//! `-w` list, which keeps the hostfile's order). Each node's launcher supervises its own
//! ranks. pdsh keeps every remote stdin open while it runs, so a remote launcher stops
//! its ranks as soon as pdsh is gone, however it ended. pdsh reports a remote command that
//! exited non-zero with a `pdsh@<here>: <host>: ssh exited with exit code N` line, which
//! `node_failure` reads. The driving loop is `launch/fanout.rs`; the user guide is
//! `docs/launchers.md`.

use std::process::Command;

/// pdsh's fan-out (DeepSpeed's `PDSH_MAX_FAN_OUT`): every node at once.
const FAN_OUT: &str = "1024";

/// Stands for the node rank in the remote command until pdsh's `%n` replaces it (a
/// word without `%`, so escaping the user's `%` characters leaves it alone).
pub const NODE_RANK_PLACEHOLDER: &str = "__RSDEEP_PDSH_NODE_RANK__";

/// The pdsh command starting `remote_command` (a shell command line holding
/// `NODE_RANK_PLACEHOLDER`) on `hosts`: `launcher_args` go to pdsh, `ssh_args` to every
/// ssh it runs (after the user's own `PDSH_SSH_ARGS_APPEND`); pdsh uses ssh unless
/// `PDSH_RCMD_TYPE` says otherwise.
pub fn command(
    hosts: &[String],
    remote_command: &str,
    launcher_args: &[String],
    ssh_args: &[String],
) -> Command {
    let mut command = Command::new("pdsh");
    command
        .args(["-S", "-f", FAN_OUT, "-w", &hosts.join(",")])
        .args(launcher_args)
        .arg(pdsh_escape(remote_command));
    if std::env::var_os("PDSH_RCMD_TYPE").is_none() {
        command.env("PDSH_RCMD_TYPE", "ssh");
    }
    if !ssh_args.is_empty() {
        let mut append = std::env::var("PDSH_SSH_ARGS_APPEND").unwrap_or_default();
        for arg in ssh_args {
            if !append.is_empty() {
                append.push(' ');
            }
            append.push_str(arg);
        }
        command.env("PDSH_SSH_ARGS_APPEND", append);
    }
    command
}

/// pdsh expands `%h`, `%u`, `%n` and `%%` in the command: the user's `%` are doubled,
/// then the placeholder becomes `%n`.
fn pdsh_escape(remote_command: &str) -> String {
    remote_command
        .replace('%', "%%")
        .replace(NODE_RANK_PLACEHOLDER, "%n")
}

/// A remote node's failure as pdsh reports it on stderr: `(host, exit code)` of
/// `pdsh@<here>: <host>: ssh exited with exit code N`.
pub fn node_failure(line: &str) -> Option<(String, i32)> {
    let rest = line.strip_prefix("pdsh@")?;
    let (_, rest) = rest.split_once(": ")?;
    let (host, rest) = rest.split_once(": ")?;
    let code = rest.strip_prefix("ssh exited with exit code ")?;
    Some((host.to_string(), code.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_rank_becomes_pdshs_and_user_percent_signs_survive() {
        let remote = format!("cd /w && exec rsdeep --node_rank {NODE_RANK_PLACEHOLDER} x.py 50%");
        let hosts = ["a".to_string(), "b".to_string()];
        let command = command(&hosts, &remote, &["-t".into(), "5".into()], &[]);
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            args,
            [
                "-S",
                "-f",
                "1024",
                "-w",
                "a,b",
                "-t",
                "5",
                "cd /w && exec rsdeep --node_rank %n x.py 50%%"
            ]
        );
        assert_eq!(command.get_program(), "pdsh");
    }

    #[test]
    fn rsdeeps_ssh_options_are_appended_to_pdshs() {
        let command = command(&["a".into()], "true", &[], &["-p".into(), "2222".into()]);
        let append = command
            .get_envs()
            .find(|(k, _)| *k == "PDSH_SSH_ARGS_APPEND")
            .and_then(|(_, v)| v)
            .map(|v| v.to_string_lossy().into_owned());
        assert!(append.is_some_and(|a| a.ends_with("-p 2222")));
    }

    #[test]
    fn a_failed_node_is_read_from_pdshs_report() {
        assert_eq!(
            node_failure("pdsh@vm: 127.0.0.2: ssh exited with exit code 3"),
            Some(("127.0.0.2".to_string(), 3))
        );
        assert_eq!(node_failure("127.0.0.2: [rank 1] loss 2.0"), None);
        assert_eq!(node_failure("pdsh@vm: 127.0.0.2: connect: refused"), None);
    }
}
