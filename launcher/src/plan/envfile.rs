//! Env files: `KEY=VALUE` lines exported to every rank on every node. DeepSpeed users'
//! `.deepspeed_env` is read as well as rsdeep's `.rsdeep_env`, each from the home
//! directory and then the working directory; later files win (`.rsdeep_env` over
//! `.deepspeed_env`, the working directory over home). `#` comments and blank lines are
//! allowed.

use std::path::{Path, PathBuf};

/// rsdeep's file name, looked up in `$HOME` and in the current directory.
pub const ENV_FILE_NAME: &str = ".rsdeep_env";
/// DeepSpeed's file name, read first (so `.rsdeep_env` wins where both set a key).
pub const DEEPSPEED_ENV_FILE_NAME: &str = ".deepspeed_env";

/// Why an env file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvFileError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}:{line}: expected KEY=VALUE, found {text:?}")]
    BadLine {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

/// Parses `KEY=VALUE` lines (split at the first `=`); `#` comments and blank lines skip.
pub fn parse_env_file(path: &Path, text: &str) -> Result<Vec<(String, String)>, EnvFileError> {
    let mut vars = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || EnvFileError::BadLine {
            path: path.to_path_buf(),
            line: index + 1,
            text: line.to_string(),
        };
        let (key, value) = line.split_once('=').ok_or_else(bad)?;
        let key = key
            .trim()
            .strip_prefix("export ")
            .unwrap_or(key.trim())
            .trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(bad());
        }
        vars.push((key.to_string(), value.trim().to_string()));
    }
    Ok(vars)
}

/// Variables from `.deepspeed_env` then `.rsdeep_env`, each from `<home>` then `<cwd>`
/// (missing files are fine; a file is read once when home is the working directory).
pub fn load_env_files(
    home: Option<&Path>,
    cwd: &Path,
) -> Result<Vec<(String, String)>, EnvFileError> {
    let mut paths: Vec<PathBuf> = Vec::new();
    for name in [DEEPSPEED_ENV_FILE_NAME, ENV_FILE_NAME] {
        for dir in home.into_iter().chain([cwd]) {
            let path = dir.join(name);
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
    }
    let mut vars = Vec::new();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => vars.extend(parse_env_file(&path, &text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(EnvFileError::Read {
                    path,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_skipping_comments_and_blanks() {
        let text = "# nccl\n\nNCCL_DEBUG=INFO\n  export HF_HOME = /data/hf \nA=b=c\n";
        let vars = parse_env_file(Path::new("f"), text).unwrap();
        assert_eq!(
            vars,
            vec![
                ("NCCL_DEBUG".to_string(), "INFO".to_string()),
                ("HF_HOME".to_string(), "/data/hf".to_string()),
                ("A".to_string(), "b=c".to_string()),
            ]
        );
    }

    #[test]
    fn line_without_equals_is_refused_with_its_number() {
        let err = parse_env_file(Path::new("/h/.rsdeep_env"), "A=1\nBROKEN\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "/h/.rsdeep_env:2: expected KEY=VALUE, found \"BROKEN\""
        );
        assert!(parse_env_file(Path::new("f"), "=x").is_err());
    }

    #[test]
    fn deepspeed_env_is_read_and_rsdeep_env_wins() {
        let home = tempfile::tempdir().unwrap();
        let cwd = tempfile::tempdir().unwrap();
        std::fs::write(
            cwd.path().join(DEEPSPEED_ENV_FILE_NAME),
            "NCCL_IB_DISABLE=1\nA=ds\n",
        )
        .unwrap();
        std::fs::write(home.path().join(ENV_FILE_NAME), "A=rsdeep\n").unwrap();
        let vars = load_env_files(Some(home.path()), cwd.path()).unwrap();
        let last = |key: &str| {
            vars.iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(last("NCCL_IB_DISABLE"), Some("1"));
        assert_eq!(last("A"), Some("rsdeep"));
    }

    #[test]
    fn home_then_cwd_and_missing_files_are_fine() {
        let home = tempfile::tempdir().unwrap();
        let cwd = tempfile::tempdir().unwrap();
        assert!(
            load_env_files(Some(home.path()), cwd.path())
                .unwrap()
                .is_empty()
        );
        std::fs::write(home.path().join(ENV_FILE_NAME), "A=home\nB=home\n").unwrap();
        std::fs::write(cwd.path().join(ENV_FILE_NAME), "A=cwd\n").unwrap();
        let vars = load_env_files(Some(home.path()), cwd.path()).unwrap();
        assert_eq!(
            vars.first().unwrap(),
            &("A".to_string(), "home".to_string())
        );
        assert_eq!(vars.last().unwrap(), &("A".to_string(), "cwd".to_string()));
        let once = load_env_files(Some(cwd.path()), cwd.path()).unwrap();
        assert_eq!(once.len(), 1);
    }
}
