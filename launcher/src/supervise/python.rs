//! The Python exception that ended a user's program, read from the last lines it printed:
//! the exception type and message and the innermost traceback frame, for the launcher's
//! failure report. torch.distributed prefixes each traceback line with `[rankN]: `; that
//! prefix is ignored.

/// An uncaught Python exception.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonException {
    /// `ValueError`, `torch.OutOfMemoryError`, ...
    pub kind: String,
    pub message: String,
    /// The innermost frame: `train.py:42 in step`.
    pub frame: Option<String>,
}

impl PythonException {
    /// Whether it is an out-of-memory error of torch or Python.
    pub fn is_out_of_memory(&self) -> bool {
        self.kind.ends_with("OutOfMemoryError")
            || self.kind == "MemoryError"
            || self.message.contains("out of memory")
    }
}

impl std::fmt::Display for PythonException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(frame) = &self.frame {
            write!(f, " (at {frame})")?;
        }
        Ok(())
    }
}

/// The last uncaught exception in `lines` (oldest first), if they end with a traceback.
pub fn last_python_exception(lines: &[String]) -> Option<PythonException> {
    let lines: Vec<&str> = lines.iter().map(|l| strip_rank_prefix(l)).collect();
    let last_frame = lines
        .iter()
        .rposition(|l| l.trim_start().starts_with("File \""))?;
    let (kind, message) = lines[last_frame + 1..]
        .iter()
        .find_map(|line| exception_line(line))?;
    Some(PythonException {
        kind,
        message,
        frame: frame_of(lines[last_frame]),
    })
}

/// `[rank3]: text` → `text`.
fn strip_rank_prefix(line: &str) -> &str {
    line.strip_prefix("[rank")
        .and_then(|rest| rest.split_once("]: "))
        .filter(|(digits, _)| digits.bytes().all(|b| b.is_ascii_digit()))
        .map_or(line, |(_, text)| text)
}

/// `ValueError: message` or a bare `KeyboardInterrupt` (not indented: frames and source
/// lines are).
fn exception_line(line: &str) -> Option<(String, String)> {
    if line.starts_with(char::is_whitespace) || line.is_empty() {
        return None;
    }
    let (kind, message) = line.split_once(": ").unwrap_or((line, ""));
    let is_name = |part: &str| {
        part.chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
            && part.chars().all(|c| c.is_alphanumeric() || c == '_')
    };
    kind.split('.')
        .all(is_name)
        .then(|| (kind.to_string(), message.trim().to_string()))
}

/// `  File "/a/train.py", line 42, in step` → `/a/train.py:42 in step`.
fn frame_of(line: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix("File \"")?;
    let (file, rest) = rest.split_once("\", line ")?;
    let (number, function) = rest.split_once(", in ").unwrap_or((rest, ""));
    let mut frame = format!("{file}:{}", number.trim());
    if !function.is_empty() {
        frame.push_str(&format!(" in {}", function.trim()));
    }
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn the_innermost_frame_and_the_exception_are_found() {
        let tail = lines(
            "step 2 loss 3.1\n\
             Traceback (most recent call last):\n  \
             File \"/w/raises.py\", line 30, in <module>\n    \
             main()\n  \
             File \"/w/raises.py\", line 24, in main\n    \
             raise ValueError(\"bad batch shape at step 3\")\n\
             ValueError: bad batch shape at step 3",
        );
        let e = last_python_exception(&tail).unwrap();
        assert_eq!(e.kind, "ValueError");
        assert_eq!(e.message, "bad batch shape at step 3");
        assert_eq!(e.frame.as_deref(), Some("/w/raises.py:24 in main"));
        assert_eq!(
            e.to_string(),
            "ValueError: bad batch shape at step 3 (at /w/raises.py:24 in main)"
        );
        assert!(!e.is_out_of_memory());
    }

    #[test]
    fn torch_rank_prefixes_dotted_types_and_a_cut_off_header_are_handled() {
        let tail = lines(
            "[rank1]:   File \"/t/train.py\", line 9, in step\n\
             [rank1]:     loss.backward()\n\
             [rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n\
             [W rank1 some warning after the traceback]",
        );
        let e = last_python_exception(&tail).unwrap();
        assert_eq!(e.kind, "torch.OutOfMemoryError");
        assert!(e.is_out_of_memory());
        assert_eq!(e.frame.as_deref(), Some("/t/train.py:9 in step"));
    }

    #[test]
    fn output_without_a_traceback_names_no_exception() {
        assert_eq!(
            last_python_exception(&lines("epoch 1\nError: disk full")),
            None
        );
        assert_eq!(last_python_exception(&[]), None);
    }
}
