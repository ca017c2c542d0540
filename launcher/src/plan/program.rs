//! What every rank runs: the built-in trainer (`rsdeep-worker` with a train.json) or the
//! user's own program, decided by the first positional argument as DeepSpeed's launcher
//! would run it: a `.json` file is a train.json; anything else is a training script run
//! as `<python> -u script.py --local_rank=N args...` (`--module`: `<python> -u -m module`,
//! `--no_python`: the program itself, `--no_local_rank`: without `--local_rank`).

use std::path::PathBuf;

use super::cli::LaunchArgs;

/// The program of every rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// `train.json [--key value ...]`: rsdeep's own worker (or `--selftest` without one).
    BuiltIn {
        config: Option<PathBuf>,
        overrides: Vec<String>,
    },
    /// The user's program.
    User(UserProgram),
}

/// A user's training program and how each rank starts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserProgram {
    /// The executable: the Python interpreter, or the program itself with `--no_python`.
    pub executable: String,
    /// Arguments before the per-rank `--local_rank=N`: `-u script.py` or `-u -m module`.
    pub leading: Vec<String>,
    /// Whether `--local_rank=N` follows `leading` (DeepSpeed's default).
    pub local_rank_arg: bool,
    /// The script's own arguments, passed unchanged.
    pub args: Vec<String>,
}

/// Why the positional arguments name no program.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProgramError {
    #[error(
        "no program to run: give a train.json (`rsdeep --num_gpus 8 train.json`) or your training script (`rsdeep --num_gpus 8 train.py --deepspeed ds_config.json ...`)"
    )]
    Missing,
    #[error("--module and --no_python cannot be combined (DeepSpeed refuses it too)")]
    ModuleWithoutPython,
    #[error(
        "{flag} applies to a user program; {config} is a train.json run by rsdeep's own trainer"
    )]
    UserFlagWithTrainJson { flag: &'static str, config: String },
}

impl Program {
    /// The program the command line names.
    pub fn from_args(args: &LaunchArgs) -> Result<Program, ProgramError> {
        let Some((first, rest)) = args.config_and_overrides.split_first() else {
            if args.selftest {
                return Ok(Program::BuiltIn {
                    config: None,
                    overrides: Vec::new(),
                });
            }
            return Err(ProgramError::Missing);
        };
        if is_train_json(first) && !args.no_python && !args.module {
            if let Some(flag) = user_only_flag(args) {
                return Err(ProgramError::UserFlagWithTrainJson {
                    flag,
                    config: first.clone(),
                });
            }
            return Ok(Program::BuiltIn {
                config: Some(PathBuf::from(first)),
                overrides: rest.to_vec(),
            });
        }
        if args.module && args.no_python {
            return Err(ProgramError::ModuleWithoutPython);
        }
        let python = args.python.clone().unwrap_or_else(|| "python3".to_string());
        let (executable, leading) = match (args.no_python, args.module) {
            (true, _) => (first.clone(), Vec::new()),
            (false, true) => (python, vec!["-u".into(), "-m".into(), first.clone()]),
            (false, false) => (python, vec!["-u".into(), first.clone()]),
        };
        Ok(Program::User(UserProgram {
            executable,
            leading,
            local_rank_arg: !args.no_local_rank,
            args: rest.to_vec(),
        }))
    }

    /// The user's program, if this is one.
    pub fn user(&self) -> Option<&UserProgram> {
        match self {
            Program::User(user) => Some(user),
            Program::BuiltIn { .. } => None,
        }
    }
}

impl UserProgram {
    /// The arguments of local rank `local_rank` (after the executable).
    pub fn args_for(&self, local_rank: usize) -> Vec<String> {
        let mut args = self.leading.clone();
        if self.local_rank_arg {
            args.push(format!("--local_rank={local_rank}"));
        }
        args.extend(self.args.iter().cloned());
        args
    }

    /// The whole command line of local rank `local_rank`, shell-quoted, for messages.
    pub fn render(&self, local_rank: usize) -> String {
        std::iter::once(self.executable.clone())
            .chain(self.args_for(local_rank))
            .map(|a| shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A train.json is named `*.json` (DeepSpeed's launcher would hand such a file to Python,
/// which cannot run it).
fn is_train_json(first: &str) -> bool {
    first.to_ascii_lowercase().ends_with(".json")
}

/// A flag that only makes sense for a user program, if given.
fn user_only_flag(args: &LaunchArgs) -> Option<&'static str> {
    [
        (args.no_local_rank, "--no_local_rank"),
        (args.python.is_some(), "--python"),
    ]
    .into_iter()
    .find_map(|(given, flag)| given.then_some(flag))
}

/// `'...'` around arguments holding anything but safe characters.
pub fn shell_quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn program(argv: &[&str]) -> Result<Program, ProgramError> {
        let args =
            LaunchArgs::try_parse_from(std::iter::once("rsdeep").chain(argv.iter().copied()))
                .unwrap();
        Program::from_args(&args)
    }

    #[test]
    fn a_json_file_is_the_built_in_trainer() {
        assert_eq!(
            program(&["--num_gpus", "2", "train.json", "--learning_rate", "1e-4"]).unwrap(),
            Program::BuiltIn {
                config: Some("train.json".into()),
                overrides: vec!["--learning_rate".into(), "1e-4".into()],
            }
        );
    }

    #[test]
    fn a_script_runs_as_deepspeed_runs_it() {
        let p = program(&[
            "pretrain.py",
            "--deepspeed",
            "ds.json",
            "--report_to",
            "none",
        ])
        .unwrap();
        let user = p.user().unwrap();
        assert_eq!(user.executable, "python3");
        assert_eq!(
            user.args_for(1),
            [
                "-u",
                "pretrain.py",
                "--local_rank=1",
                "--deepspeed",
                "ds.json",
                "--report_to",
                "none"
            ]
        );
        let m = program(&["--python", "/venv/bin/python", "-m", "pkg.train", "--x"]).unwrap();
        let m = m.user().unwrap();
        assert_eq!(m.executable, "/venv/bin/python");
        assert_eq!(
            m.args_for(0),
            ["-u", "-m", "pkg.train", "--local_rank=0", "--x"]
        );
        let bare = program(&["--no_python", "--no_local_rank", "./train.sh", "a b"]).unwrap();
        let bare = bare.user().unwrap();
        assert_eq!(
            (bare.executable.as_str(), bare.args_for(3)),
            ("./train.sh", vec!["a b".to_string()])
        );
        assert_eq!(bare.render(3), "./train.sh 'a b'");
    }

    #[test]
    fn contradictions_are_refused_with_the_flag_named() {
        assert_eq!(program(&[]).unwrap_err(), ProgramError::Missing);
        assert_eq!(
            program(&["--no_python", "-m", "pkg"]).unwrap_err(),
            ProgramError::ModuleWithoutPython
        );
        let err = program(&["--no_local_rank", "train.json"]).unwrap_err();
        assert!(err.to_string().contains("--no_local_rank"), "{err}");
        assert!(matches!(
            program(&["--selftest"]).unwrap(),
            Program::BuiltIn { config: None, .. }
        ));
    }
}
