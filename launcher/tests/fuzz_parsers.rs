//! Fuzz targets (proptest at scale) for the launcher's text parsers: the hostfile, the
//! `--include/--exclude` resource filters and train.json loading (random JSON and mutated
//! real configs from `configs/`). Properties: no panic, and every rejection is a readable
//! error that names the part of the input at fault where the error kind allows it.
//! Scale: `PROPTEST_CASES` (default 256 per target in `make test`; `make fuzz` runs
//! 100 000). Contract and command: `docs/security.md` "Fuzzing".

use proptest::prelude::*;
use proptest::test_runner::Config;
use rsdeep::plan::hostfile::{HostfileError, parse_hostfile};
use rsdeep::plan::resources::{ResourceError, ResourcePool, filter_resources};
use std::path::{Path, PathBuf};

/// Cases per target: `PROPTEST_CASES`, else `default`.
fn config(default: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Hostfile-like text: lines of host names, `slots=`, numbers, comments and junk.
fn hostfile_text() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        "[a-z][a-z0-9.-]{0,8}",
        Just("slots=".to_string()),
        "slots=[0-9]{1,3}",
        "slots=-?[0-9a-z]{0,4}",
        Just("#".to_string()),
        "[ \t]{1,3}",
        "\\PC{0,6}",
        "[0-9]{1,25}",
    ];
    let line = prop::collection::vec(token, 0..5).prop_map(|t| t.join(" "));
    prop::collection::vec(line, 0..8).prop_map(|l| l.join("\n"))
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn hostfile_parser_never_panics_and_names_what_it_refuses(
        text in prop_oneof![hostfile_text(), "\\PC{0,200}"]
    ) {
        match parse_hostfile(&text) {
            Ok(hosts) => {
                prop_assert!(!hosts.is_empty());
                for (i, h) in hosts.iter().enumerate() {
                    prop_assert!(!h.host.is_empty() && !h.host.contains(char::is_whitespace));
                    prop_assert!(text.contains(&h.host));
                    prop_assert!(hosts[..i].iter().all(|o| o.host != h.host), "duplicate {}", h.host);
                }
            }
            Err(err) => {
                let message = err.to_string();
                prop_assert!(!message.is_empty());
                match &err {
                    HostfileError::BadEntry(line) => {
                        prop_assert!(text.contains(line.as_str()) && message.contains(line.as_str()));
                    }
                    HostfileError::DuplicateHost(host) => {
                        prop_assert!(text.contains(host.as_str()) && message.contains(host.as_str()));
                    }
                    HostfileError::Empty => prop_assert!(message.contains("empty")),
                    HostfileError::Read { .. } => prop_assert!(false, "parse_hostfile read a file"),
                    HostfileError::InFile { .. } => prop_assert!(false, "parse_hostfile knows no file"),
                }
            }
        }
    }
}

/// A pool of 1-4 hosts with 1-8 slots each.
fn pool() -> impl Strategy<Value = ResourcePool> {
    prop::collection::btree_map("[a-d][0-9]?", 1usize..=8, 1..=4).prop_map(|hosts| {
        hosts
            .into_iter()
            .map(|(host, n)| (host, (0..n).collect()))
            .collect()
    })
}

/// Filter text in DeepSpeed's syntax, with junk mixed in.
fn filter_text() -> impl Strategy<Value = String> {
    let slot = prop_oneof!["[0-9]{1,2}", "-?[0-9a-z ]{0,3}", Just(String::new())];
    let slots = prop::collection::vec(slot, 1..4).prop_map(|s| s.join(","));
    let node = ("[a-e][0-9]?", prop::option::of(slots)).prop_map(|(host, slots)| match slots {
        Some(slots) => format!("{host}:{slots}"),
        None => host,
    });
    prop_oneof![
        prop::collection::vec(node, 1..4).prop_map(|n| n.join("@")),
        "\\PC{0,30}",
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn include_exclude_never_panic_and_stay_inside_the_pool(
        pool in pool(),
        spec in filter_text(),
        mode in 0u8..3,
        other in filter_text(),
    ) {
        let (include, exclude) = match mode {
            0 => (spec.as_str(), ""),
            1 => ("", spec.as_str()),
            _ => (spec.as_str(), other.as_str()),
        };
        match filter_resources(&pool, include, exclude) {
            Ok(chosen) => {
                for (host, slots) in &chosen {
                    let Some((_, available)) = pool.iter().find(|(h, _)| h == host) else {
                        return Err(TestCaseError::fail(format!("{host} is not in the pool")));
                    };
                    prop_assert!(!slots.is_empty());
                    prop_assert!(slots.windows(2).all(|w| w[0] < w[1]), "{slots:?} unsorted");
                    prop_assert!(slots.iter().all(|s| available.contains(s)));
                }
            }
            Err(err) => {
                let message = err.to_string();
                prop_assert!(!message.is_empty());
                let both = format!("{include}@{exclude}");
                match &err {
                    ResourceError::UnknownHost(host) => {
                        prop_assert!(both.contains(host.as_str()) && message.contains(host.as_str()));
                    }
                    ResourceError::UnknownSlot { host, slot } => {
                        prop_assert!(both.contains(host.as_str()));
                        prop_assert!(message.contains(&slot.to_string()));
                    }
                    ResourceError::BadSlot { spec, .. } => {
                        prop_assert!(both.contains(spec.as_str()) && message.contains(spec.as_str()));
                    }
                    ResourceError::IncludeAndExclude => prop_assert!(mode == 2),
                    _ => {}
                }
            }
        }
    }
}

/// The real train.json / DeepSpeed configs of `configs/`, as JSON values.
fn real_configs() -> Vec<serde_json::Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    found.sort();
    assert!(found.len() >= 3, "too few configs in {}", dir.display());
    found
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        })
        .collect()
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop_oneof!["\\PC{0,12}", Just("auto".to_string()), "[0-9.e-]{1,8}"]
            .prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One change to a config: what it did, for checking the error names it.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the value at the n-th key path with a random value.
    Replace(usize, serde_json::Value),
    /// Remove the n-th key.
    Remove(usize),
    /// Insert an unknown key at the top level.
    Unknown(String),
    /// Cut the serialized text at a fraction of its length.
    Truncate(f64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), json_value()).prop_map(|(n, v)| Mutation::Replace(n, v)),
        any::<usize>().prop_map(Mutation::Remove),
        "zq[a-z]{4,8}".prop_map(Mutation::Unknown),
        (0.0f64..1.0).prop_map(Mutation::Truncate),
    ]
}

/// Every object key path of `value` (objects only), depth first.
fn key_paths(value: &serde_json::Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if let serde_json::Value::Object(map) = value {
        for (k, v) in map {
            prefix.push(k.clone());
            out.push(prefix.clone());
            key_paths(v, prefix, out);
            prefix.pop();
        }
    }
}

fn at_path<'a>(
    value: &'a mut serde_json::Value,
    path: &[String],
) -> Option<&'a mut serde_json::Value> {
    path.iter().try_fold(value, |v, k| v.get_mut(k.as_str()))
}

/// Applies `mutations` to `config`; the text to write and the unknown keys inserted.
fn mutate(mut config: serde_json::Value, mutations: &[Mutation]) -> (String, Vec<String>, bool) {
    let mut unknown = Vec::new();
    let mut truncated = None;
    for m in mutations {
        let mut paths = Vec::new();
        key_paths(&config, &mut Vec::new(), &mut paths);
        match m {
            Mutation::Replace(n, v) if !paths.is_empty() => {
                if let Some(slot) = at_path(&mut config, &paths[n % paths.len()]) {
                    *slot = v.clone();
                }
            }
            Mutation::Remove(n) if !paths.is_empty() => {
                let path = &paths[n % paths.len()];
                let (last, parent) = path.split_last().expect("non-empty path");
                if let Some(serde_json::Value::Object(map)) = at_path(&mut config, parent) {
                    map.remove(last);
                }
            }
            Mutation::Unknown(key) => {
                if let serde_json::Value::Object(map) = &mut config {
                    map.insert(key.clone(), serde_json::Value::from(1));
                    unknown.push(key.clone());
                }
            }
            Mutation::Truncate(f) => truncated = Some(*f),
            _ => {}
        }
    }
    let text = serde_json::to_string_pretty(&config).expect("serialize");
    match truncated {
        Some(f) => {
            let mut cut = ((text.len() as f64) * f) as usize;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            (text[..cut].to_string(), unknown, true)
        }
        None => (text, unknown, false),
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn train_json_loading_never_panics_and_names_the_file_or_key(
        pick in any::<usize>(),
        mutations in prop::collection::vec(mutation(), 1..4),
        world_size in 1usize..9,
        random_doc in prop::option::weighted(0.2, json_value()),
    ) {
        let configs = real_configs();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("train.json");
        let (text, _unknown, truncated) = match random_doc {
            Some(doc) => (doc.to_string(), Vec::new(), false),
            None => mutate(configs[pick % configs.len()].clone(), &mutations),
        };
        std::fs::write(&path, &text).expect("write train.json");
        if let Err(err) = rsdeep_contract::config::load(&path, &[], world_size) {
            let message = err.to_string();
            prop_assert!(!message.trim().is_empty());
            let parses = serde_json::from_str::<serde_json::Value>(&text).is_ok();
            if truncated && !parses {
                prop_assert!(message.contains("train.json"), "no file named in: {message}");
            }
            // An unknown key is named, and it is one the file really has.
            if let Some((_, rest)) = message.split_once("unknown key \"") {
                let dotted = rest.split('"').next().unwrap_or_default();
                let key = dotted.rsplit('.').next().unwrap_or_default();
                prop_assert!(!key.is_empty() && text.contains(key), "{message}");
            }
        }
    }
}

/// SLURM-nodelist-like text: prefixes, bracketed ranges, commas, spaces and junk.
fn hostlist_text() -> impl Strategy<Value = String> {
    let range = prop_oneof!["[0-9]{1,2}", "[0-9]{1,2}-[0-9]{1,2}", "[0-9a-z-]{0,3}"];
    let ranges = prop::collection::vec(range, 0..3).prop_map(|r| r.join(","));
    let piece = prop_oneof![
        "[a-z]{1,4}[0-9]{0,2}",
        ranges.prop_map(|r| format!("[{r}]")),
        Just("[".to_string()),
        Just("]".to_string()),
        "[-_.]",
        "[ \t\n\x0b\x0c\r]",
    ];
    let entry = prop::collection::vec(piece, 1..4).prop_map(|p| p.concat());
    prop_oneof![
        prop::collection::vec(entry, 0..4).prop_map(|e| e.join(",")),
        "\\PC{0,30}",
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn slurm_hostlist_never_panics_and_names_the_bad_entry(list in hostlist_text()) {
        use rsdeep::plan::hostlist::{HostlistError, expand_hostlist};
        match expand_hostlist(&list) {
            Ok(hosts) => {
                prop_assert!(!hosts.is_empty());
                // Slurm's separators are ", \t\n" (other control characters stay in names).
                for host in &hosts {
                    prop_assert!(!host.is_empty(), "empty host from {list:?}");
                    prop_assert!(!host.contains(['[', ']', ',']) && !host.contains([' ', '\t', '\n']),
                        "{host:?} from {list:?}");
                }
            }
            Err(err) => {
                let message = err.to_string();
                prop_assert!(!message.trim().is_empty());
                let entry = match &err {
                    HostlistError::UnclosedBracket { entry }
                    | HostlistError::UnmatchedClose { entry }
                    | HostlistError::NestedBracket { entry }
                    | HostlistError::TextAfterBracket { entry, .. }
                    | HostlistError::BadRange { entry, .. }
                    | HostlistError::TooManyHosts { entry } => Some(entry),
                    _ => None,
                };
                if let Some(entry) = entry {
                    prop_assert!(list.contains(entry.as_str()), "{entry:?} not in {list:?}");
                    prop_assert!(message.contains(&format!("{entry:?}")), "{message}");
                }
            }
        }
    }
}
