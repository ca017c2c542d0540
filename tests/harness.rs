//! Test harness for the end-to-end tests in this folder: finds the built `rsdeep` and
//! `rsdeep-worker` binaries (next to the test executable's target directory) and runs them
//! in temporary folders. The tests themselves are the `[[test]]` targets of this crate.

use std::path::PathBuf;

/// Path of a binary built by this workspace (`cargo build --workspace` must have run).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|p| p.parent()).expect("target profile dir");
    dir.join(name)
}
