//! DeepSpeed's hostfile format (`host slots=N` per line, `#` comments, blank lines),
//! with DeepSpeed's own error messages, prefixed with the file and line when read from a
//! file (`path:line: ...`). Hosts keep file order: ranks follow it.

use std::path::{Path, PathBuf};

/// One host of the hostfile and how many slots (devices or CPU ranks) it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    pub host: String,
    pub slots: usize,
}

/// Why a hostfile was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostfileError {
    #[error("cannot read hostfile {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("Hostfile contains multiple entries for {0}, unable to proceed with launching")]
    DuplicateHost(String),
    #[error("Hostfile contains a bad entry: {0}, unable to proceed with launching")]
    BadEntry(String),
    #[error("Hostfile is empty or not formatted correctly, unable to proceed with launching")]
    Empty,
    /// A parse error located in its file (`line` is 1-based; 0 for the whole file).
    #[error("{}:{line}: {source}", path.display())]
    InFile {
        path: PathBuf,
        line: usize,
        source: Box<HostfileError>,
    },
}

/// Reads and parses a hostfile; `Ok(None)` when the file does not exist (DeepSpeed then
/// warns and runs on the local machine only).
pub fn read_hostfile(path: &Path) -> Result<Option<Vec<HostEntry>>, HostfileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_numbered(&text)
            .map(Some)
            .map_err(|(line, e)| HostfileError::InFile {
                path: path.to_path_buf(),
                line,
                source: Box::new(e),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(HostfileError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Parses hostfile text: every non-comment, non-blank line must match
/// `^(\S+)\s+slots=(\d+)` (trailing text allowed, as in DeepSpeed's `re.search`).
pub fn parse_hostfile(text: &str) -> Result<Vec<HostEntry>, HostfileError> {
    parse_numbered(text).map_err(|(_, e)| e)
}

/// `parse_hostfile` with the 1-based line of the error (0 for the whole file).
fn parse_numbered(text: &str) -> Result<Vec<HostEntry>, (usize, HostfileError)> {
    let mut hosts: Vec<HostEntry> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |e| (index + 1, e);
        let entry = parse_line(line).ok_or_else(|| at(HostfileError::BadEntry(line.into())))?;
        if hosts.iter().any(|h| h.host == entry.host) {
            return Err(at(HostfileError::DuplicateHost(entry.host)));
        }
        hosts.push(entry);
    }
    if hosts.is_empty() {
        return Err((0, HostfileError::Empty));
    }
    Ok(hosts)
}

/// `host<whitespace>slots=<digits>[anything]`, or `None`.
fn parse_line(line: &str) -> Option<HostEntry> {
    let split = line.find(char::is_whitespace)?;
    let (host, rest) = line.split_at(split);
    let digits: String = rest
        .trim_start()
        .strip_prefix("slots=")?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let slots = digits.parse().ok()?;
    Some(HostEntry {
        host: host.to_string(),
        slots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(host: &str, slots: usize) -> HostEntry {
        HostEntry {
            host: host.into(),
            slots,
        }
    }

    #[test]
    fn parses_hosts_in_file_order_skipping_comments_and_blanks() {
        let text = "# cluster\n\nworker-1 slots=4\n  worker-0   slots=8  # fast\n\n";
        let hosts = parse_hostfile(text).unwrap();
        assert_eq!(hosts, vec![entry("worker-1", 4), entry("worker-0", 8)]);
    }

    #[test]
    fn trailing_text_after_slots_is_allowed_like_re_search() {
        assert_eq!(
            parse_hostfile("h slots=2extra").unwrap(),
            vec![entry("h", 2)]
        );
    }

    #[test]
    fn duplicate_host_is_refused_with_deepspeed_message() {
        let err = parse_hostfile("a slots=1\nb slots=1\na slots=2\n").unwrap_err();
        assert_eq!(err, HostfileError::DuplicateHost("a".into()));
        assert_eq!(
            err.to_string(),
            "Hostfile contains multiple entries for a, unable to proceed with launching"
        );
    }

    #[test]
    fn bad_lines_are_refused_naming_the_line() {
        for bad in [
            "worker-0",
            "worker-0 slots=",
            "worker-0 slot=4",
            "worker-0 slots=x",
            "slots=4",
        ] {
            let err = parse_hostfile(&format!("ok slots=1\n{bad}\n")).unwrap_err();
            assert_eq!(err, HostfileError::BadEntry(bad.into()), "line {bad:?}");
        }
        let msg = parse_hostfile("worker-0 4").unwrap_err().to_string();
        assert_eq!(
            msg,
            "Hostfile contains a bad entry: worker-0 4, unable to proceed with launching"
        );
    }

    #[test]
    fn errors_read_from_a_file_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hostfile");
        std::fs::write(&path, "# nodes\na slots=1\n\nb slots=x\n").unwrap();
        let message = read_hostfile(&path).unwrap_err().to_string();
        assert_eq!(
            message,
            format!(
                "{}:4: Hostfile contains a bad entry: b slots=x, unable to proceed with launching",
                path.display()
            )
        );
        std::fs::write(&path, "a slots=1\nb slots=1\na slots=2\n").unwrap();
        let message = read_hostfile(&path).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("{}:3: ", path.display())),
            "{message}"
        );
    }

    #[test]
    fn empty_or_comment_only_file_is_refused() {
        for text in ["", "\n\n", "# only a comment\n   \n"] {
            assert_eq!(parse_hostfile(text).unwrap_err(), HostfileError::Empty);
        }
        assert!(
            HostfileError::Empty
                .to_string()
                .starts_with("Hostfile is empty")
        );
    }

    #[test]
    fn missing_hostfile_means_local_run() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_hostfile(&dir.path().join("nope")).unwrap(), None);
        let path = dir.path().join("hosts");
        std::fs::write(&path, "n1 slots=2\n").unwrap();
        assert_eq!(read_hostfile(&path).unwrap(), Some(vec![entry("n1", 2)]));
    }
}
