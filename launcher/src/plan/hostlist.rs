//! SLURM hostlist expansion (`node[01-04,07]`, `rack[1-2]-n[1-3]`, `a,b`): the same
//! host names, in the same order, as `scontrol show hostnames` (checked against Slurm
//! 22.05 in `tests/e2e_slurm.rs`). A pure function so the SLURM launcher
//! (`slurm.rs`) and fuzz targets can call it; every malformed list is an error naming
//! the bad part, never a panic.
//!
//! Rules (Slurm's `hostlist.c`): entries are separated by commas or whitespace outside
//! brackets; an entry is `prefix[ranges]` repeated, where the last bracket ends the entry
//! (`n[1-2]x` is invalid, as in Slurm); `ranges` is a comma list of `N` or `LO-HI`
//! (decimal, LO <= HI, at most 65,536 numbers per range) and numbers are zero-padded to
//! the width of LO as written (`[01-10]` gives `01`..`10`, `[1-010]` gives `1`..`10`);
//! several brackets multiply, the rightmost varying fastest; duplicates are kept.

/// Most numbers one `LO-HI` range may hold (Slurm's `MAX_RANGE`).
pub const MAX_RANGE: u64 = 65_536;
/// Most host names one list may expand to (a guard against memory blow-ups).
pub const MAX_HOSTS: usize = 1 << 20;

/// Why a hostlist could not be expanded; every variant names the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostlistError {
    #[error("the hostlist is empty (no host name in {list:?})")]
    Empty { list: String },
    #[error("unclosed `[` in hostlist entry {entry:?}")]
    UnclosedBracket { entry: String },
    #[error("`]` without a matching `[` in hostlist entry {entry:?}")]
    UnmatchedClose { entry: String },
    #[error("nested `[` in hostlist entry {entry:?}")]
    NestedBracket { entry: String },
    #[error("text {suffix:?} after the last `]` in hostlist entry {entry:?} (Slurm rejects it)")]
    TextAfterBracket { entry: String, suffix: String },
    #[error("invalid range {range:?} in hostlist entry {entry:?}: {reason}")]
    BadRange {
        entry: String,
        range: String,
        reason: &'static str,
    },
    #[error("hostlist entry {entry:?} expands to more than {MAX_HOSTS} hosts")]
    TooManyHosts { entry: String },
}

/// Expands a SLURM hostlist into host names, in `scontrol show hostnames` order.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, HostlistError> {
    let mut hosts = Vec::new();
    for entry in split_entries(list)? {
        let segments = parse_entry(entry)?;
        let count = segments
            .iter()
            .try_fold(1usize, |acc, s| acc.checked_mul(s.len()))
            .filter(|&n| n <= MAX_HOSTS - hosts.len())
            .ok_or_else(|| HostlistError::TooManyHosts {
                entry: entry.to_string(),
            })?;
        hosts.reserve(count);
        push_product(&segments, &mut hosts);
    }
    if hosts.is_empty() {
        return Err(HostlistError::Empty {
            list: list.to_string(),
        });
    }
    Ok(hosts)
}

/// Splits at commas and whitespace outside brackets; checks bracket balance.
fn split_entries(list: &str) -> Result<Vec<&str>, HostlistError> {
    let mut entries = Vec::new();
    let mut start = 0;
    let mut inside = false;
    for (i, c) in list.char_indices() {
        match c {
            '[' if inside => {
                return Err(HostlistError::NestedBracket {
                    entry: entry_around(list, start, i),
                });
            }
            '[' => inside = true,
            ']' if !inside => {
                return Err(HostlistError::UnmatchedClose {
                    entry: entry_around(list, start, i),
                });
            }
            ']' => inside = false,
            c if !inside && is_separator(c) => {
                if i > start {
                    entries.push(&list[start..i]);
                }
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if inside {
        return Err(HostlistError::UnclosedBracket {
            entry: list[start..].to_string(),
        });
    }
    if start < list.len() {
        entries.push(&list[start..]);
    }
    Ok(entries)
}

/// Slurm's separators between entries (outside brackets).
fn is_separator(c: char) -> bool {
    matches!(c, ',' | ' ' | '\t' | '\n')
}

/// The entry that starts at `start` and contains byte `at`, for error messages.
fn entry_around(list: &str, start: usize, at: usize) -> String {
    let end = list[at..].find(is_separator).map_or(list.len(), |n| at + n);
    list[start..end].to_string()
}

/// One balanced entry as a list of segments, each a list of alternatives: a literal
/// prefix is a one-element segment, a bracket is the list of its formatted numbers.
fn parse_entry(entry: &str) -> Result<Vec<Vec<String>>, HostlistError> {
    let mut segments = Vec::new();
    let mut rest = entry;
    while let Some(open) = rest.find('[') {
        let close = open + rest[open..].find(']').unwrap_or(rest.len() - open);
        if open > 0 {
            segments.push(vec![rest[..open].to_string()]);
        }
        let inner = rest.get(open + 1..close).unwrap_or_default();
        segments.push(expand_ranges(entry, inner)?);
        rest = rest.get(close + 1..).unwrap_or_default();
    }
    if !rest.is_empty() {
        if !segments.is_empty() {
            return Err(HostlistError::TextAfterBracket {
                entry: entry.to_string(),
                suffix: rest.to_string(),
            });
        }
        segments.push(vec![rest.to_string()]);
    }
    Ok(segments)
}

/// `01-03,7` -> ["01", "02", "03", "7"].
fn expand_ranges(entry: &str, inner: &str) -> Result<Vec<String>, HostlistError> {
    let mut numbers = Vec::new();
    for range in inner.split(',') {
        let bad = |reason| HostlistError::BadRange {
            entry: entry.to_string(),
            range: range.to_string(),
            reason,
        };
        let (lo_text, hi_text) = range.split_once('-').unwrap_or((range, range));
        let lo = parse_number(lo_text).map_err(bad)?;
        let hi = parse_number(hi_text).map_err(bad)?;
        if lo > hi {
            return Err(bad("the start is greater than the end"));
        }
        if hi - lo >= MAX_RANGE {
            return Err(bad("more than 65536 hosts in one range"));
        }
        if numbers.len() as u64 + (hi - lo + 1) > MAX_HOSTS as u64 {
            return Err(HostlistError::TooManyHosts {
                entry: entry.to_string(),
            });
        }
        let width = lo_text.len();
        numbers.extend((lo..=hi).map(|n| format!("{n:0width$}")));
    }
    Ok(numbers)
}

fn parse_number(text: &str) -> Result<u64, &'static str> {
    if text.is_empty() {
        return Err("a number is missing");
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("only decimal digits, `-` and `,` may appear inside brackets");
    }
    text.parse().map_err(|_| "the number is too large")
}

/// Appends every combination of one alternative per segment, the last varying fastest.
fn push_product(segments: &[Vec<String>], hosts: &mut Vec<String>) {
    let mut names = vec![String::new()];
    for alternatives in segments {
        names = names
            .iter()
            .flat_map(|prefix| alternatives.iter().map(move |alt| format!("{prefix}{alt}")))
            .collect();
    }
    hosts.extend(names);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn expand(list: &str) -> Vec<String> {
        expand_hostlist(list).unwrap_or_else(|e| panic!("{list}: {e}"))
    }

    #[test]
    fn plain_names_and_separators() {
        assert_eq!(expand("node1"), ["node1"]);
        assert_eq!(expand("a,b"), ["a", "b"]);
        assert_eq!(expand("a,,b c\td"), ["a", "b", "c", "d"]);
        assert_eq!(expand("a-1.example.com"), ["a-1.example.com"]);
    }

    #[test]
    fn ranges_keep_the_padding_of_the_start() {
        assert_eq!(expand("n[01-03]"), ["n01", "n02", "n03"]);
        assert_eq!(expand("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(expand("n[09-11]"), ["n09", "n10", "n11"]);
        assert_eq!(expand("n[1-010]").len(), 10);
        assert_eq!(expand("n[1-010]")[9], "n10");
        assert_eq!(expand("n[001-2]"), ["n001", "n002"]);
        assert_eq!(expand("n1[0-2]"), ["n10", "n11", "n12"]);
    }

    #[test]
    fn comma_lists_inside_and_outside_brackets() {
        assert_eq!(
            expand("node[01-04,07]"),
            ["node01", "node02", "node03", "node04", "node07"]
        );
        assert_eq!(
            expand("a,b node[1-3,7],gpu[2,1,2]"),
            [
                "a", "b", "node1", "node2", "node3", "node7", "gpu2", "gpu1", "gpu2"
            ]
        );
        assert_eq!(expand("[1-2]"), ["1", "2"]);
    }

    #[test]
    fn several_brackets_multiply_rightmost_fastest() {
        assert_eq!(
            expand("rack[1-2]-n[1-3]"),
            [
                "rack1-n1", "rack1-n2", "rack1-n3", "rack2-n1", "rack2-n2", "rack2-n3"
            ]
        );
        assert_eq!(expand("n[1-2][3-4]"), ["n13", "n14", "n23", "n24"]);
    }

    #[test]
    fn errors_name_the_bad_part() {
        let err = |list: &str| expand_hostlist(list).unwrap_err();
        assert!(matches!(err(""), HostlistError::Empty { .. }));
        assert!(matches!(err(" , "), HostlistError::Empty { .. }));
        assert_eq!(
            err("a,n[1-3"),
            HostlistError::UnclosedBracket {
                entry: "n[1-3".into()
            }
        );
        assert_eq!(
            err("n1-3],b"),
            HostlistError::UnmatchedClose {
                entry: "n1-3]".into()
            }
        );
        assert!(matches!(err("n[[1]]"), HostlistError::NestedBracket { .. }));
        let text = err("ok,n[5-3]").to_string();
        assert!(
            text.contains("\"5-3\"") && text.contains("\"n[5-3]\""),
            "{text}"
        );
        for bad in [
            "n[]", "n[1,,2]", "n[a-b]", "n[-1]", "n[1--2]", "n[1-]", "n[ 1]",
        ] {
            assert!(
                matches!(err(bad), HostlistError::BadRange { .. }),
                "{bad}: {:?}",
                err(bad)
            );
        }
        assert!(matches!(
            err("x[1-2]y"),
            HostlistError::TextAfterBracket { .. }
        ));
        assert!(err("n[0-65536]").to_string().contains("65536"));
        assert_eq!(expand("n[0-65535]").len(), 65_536);
        assert!(matches!(
            err("n[0-99999999999999999999999]"),
            HostlistError::BadRange { .. }
        ));
        assert!(matches!(
            err("n[0-65535][0-65535]"),
            HostlistError::TooManyHosts { .. }
        ));
    }

    /// A generated range: (start, count, zero-padded width).
    type Range = (u64, u64, usize);

    /// One entry of a generated list: prefix, then (text before the bracket, its ranges).
    #[derive(Debug, Clone)]
    struct Entry {
        prefix: String,
        brackets: Vec<(String, Vec<Range>)>,
    }

    impl Entry {
        fn text(&self) -> String {
            let mut out = self.prefix.clone();
            for (lead, ranges) in &self.brackets {
                let items: Vec<String> = ranges
                    .iter()
                    .map(|&(lo, n, w)| match n {
                        1 => format!("{lo:0w$}"),
                        _ => format!("{lo:0w$}-{}", lo + n - 1),
                    })
                    .collect();
                out.push_str(&format!("{lead}[{}]", items.join(",")));
            }
            out
        }

        fn names(&self) -> Vec<String> {
            let mut names = vec![self.prefix.clone()];
            for (lead, ranges) in &self.brackets {
                let numbers: Vec<String> = ranges
                    .iter()
                    .flat_map(|&(lo, n, w)| (lo..lo + n).map(move |x| format!("{x:0w$}")))
                    .collect();
                names = names
                    .iter()
                    .flat_map(|p| numbers.iter().map(move |x| format!("{p}{lead}{x}")))
                    .collect();
            }
            names
        }
    }

    fn entry() -> impl Strategy<Value = Entry> {
        let range = (0u64..200, 1u64..5, 1usize..4);
        let bracket = ("[a-z-]{0,3}", prop::collection::vec(range, 1..3));
        ("[a-z][a-z0-9.-]{0,6}", prop::collection::vec(bracket, 0..3))
            .prop_map(|(prefix, brackets)| Entry { prefix, brackets })
    }

    proptest! {
        #[test]
        fn generated_lists_expand_to_their_names(
            entries in prop::collection::vec(entry(), 1..5),
            separator in prop::sample::select(vec![",", " ", ",\n"]),
        ) {
            let text: Vec<String> = entries.iter().map(Entry::text).collect();
            let expected: Vec<String> = entries.iter().flat_map(Entry::names).collect();
            prop_assert_eq!(expand_hostlist(&text.join(separator)).unwrap(), expected);
        }

        #[test]
        fn random_text_never_panics(text in "[a-z0-9\\[\\],\\- ]{0,40}|\\PC{0,40}") {
            if let Ok(hosts) = expand_hostlist(&text) {
                prop_assert!(!hosts.is_empty());
                prop_assert!(hosts.iter().all(|h| !h.is_empty()));
            }
        }
    }
}
