//! Whether a process named in a leftover record still runs: the rule both binaries apply to
//! files named by a pid (the output folder lock's record in the launcher, data-cache build
//! folders in the worker).

/// Whether process `pid` exists on this machine.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // ESRCH: no such process; EPERM: it exists but belongs to someone else.
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}
