//! DeepSpeed's flops profiler for rsdeep's training loop: the `flops_profiler` block of
//! the DeepSpeed config (`rsdeep_contract::config::FlopsProfilerConfig`, DeepSpeed's keys
//! and defaults). At training step `profile_step` (counted from 1) rank 0 times the
//! step's first micro-step (each module's forward through `model::forward_clock`, the
//! micro-step's wall time) and its optimizer step, counts the forward with
//! `model::flops` (the Hugging Face module tree of the model it runs, adapters included)
//! and prints the result once, to stdout or into `output_file`, in the text layout of
//! DeepSpeed 0.19.8's `FlopsProfiler.print_model_profile`: the summary lines, the
//! aggregated profile per depth and the per-module tree. Where rsdeep's figures come from
//! differs from DeepSpeed's (documented in `docs/zero-engine.md`): the fwd latency is the
//! sum of the module forwards, the bwd latency the rest of the micro-step (loss,
//! backward, gradient reduction), and modules rsdeep does not time on their own (the
//! linears, the activation, the rotary embedding, adapters) show `-` for latency.

use crate::model::flops::{Adapters, ForwardShape, ModuleNode, model_tree, python_float_repr};
use crate::model::{ModelConfig, forward_clock};
use crate::{Error, Result};
use rsdeep_contract::config::FlopsProfilerConfig;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Tensor};

/// Rank 0's profiler for a run whose DeepSpeed config enables `flops_profiler`.
pub struct FlopsProfiler {
    config: FlopsProfilerConfig,
    /// LoRA's dropout (PEFT's layer counts DoRA's extra product when it is on).
    lora_dropout: f64,
}

/// The profiled micro-step: its batch shape, wall seconds and module forward seconds.
pub struct MicroStepTimes {
    pub shape: ForwardShape,
    pub wall_s: f64,
    pub modules: BTreeMap<String, f64>,
}

/// What the report needs from the run besides the timings.
pub struct ProfiledRun<'a> {
    /// The profiled optimizer step, counted from 1.
    pub step: u64,
    pub model: &'a ModelConfig,
    /// Names and shapes of the trainable parameters (where the adapters are found).
    pub trainable: &'a [(String, Vec<i64>)],
    pub world_size: usize,
    pub micro_batch: u64,
}

impl FlopsProfiler {
    /// The profiler of rank `rank` (only rank 0 profiles, as in DeepSpeed), when `block`
    /// is enabled.
    pub fn new(block: &FlopsProfilerConfig, rank: usize, lora_dropout: f64) -> Option<Self> {
        (block.enabled && rank == 0).then(|| FlopsProfiler {
            config: block.clone(),
            lora_dropout,
        })
    }

    /// Whether optimizer step `step` (counted from 1) is the one to profile.
    pub fn is_due(&self, step: u64) -> bool {
        step == self.config.profile_step
    }

    /// Builds the report of `run` from the micro-step's and the optimizer step's times
    /// and prints it to stdout or writes `output_file` (its folder created).
    pub fn report(&self, run: &ProfiledRun<'_>, micro: &MicroStepTimes, step_s: f64) -> Result<()> {
        let adapters = Adapters::from_params(run.trainable, self.lora_dropout);
        let tree = model_tree(run.model, &adapters, micro.shape, true);
        let profile = Profile {
            tree: &tree,
            times: &micro.modules,
        };
        let fwd_s = profile.duration(&tree).unwrap_or(0.0);
        let summary = Summary {
            step: run.step,
            world_size: run.world_size,
            micro_batch: run.micro_batch,
            fwd_s,
            bwd_s: (micro.wall_s - fwd_s).max(0.0),
            step_s,
            recompute_fwd_factor: self.config.recompute_fwd_factor,
        };
        let text = render(&profile, &summary, &self.config);
        match self.config.output_file.as_deref().filter(|f| !f.is_empty()) {
            Some(file) => write_report(Path::new(file), &text),
            None => print_report(&text),
        }
    }
}

/// Runs one micro-step with this thread's module forwards recorded and the device
/// synchronised around it; returns its result and times. `ids` (B, T) gives the shape.
pub fn measure_micro_step<T>(
    device: Device,
    ids: &Tensor,
    micro_step: impl FnOnce() -> Result<T>,
) -> Result<(T, MicroStepTimes)> {
    let size = ids.size();
    let shape = ForwardShape {
        batch: size.first().copied().unwrap_or(1),
        seq: size.get(1).copied().unwrap_or(1),
    };
    forward_clock::start_recording();
    let timed = measure(device, micro_step);
    let modules = forward_clock::finish_recording();
    let (out, wall_s) = timed?;
    Ok((
        out,
        MicroStepTimes {
            shape,
            wall_s,
            modules,
        },
    ))
}

/// Runs `work` with the device synchronised around it; returns its result and seconds.
pub fn measure<T>(device: Device, work: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    forward_clock::synchronize(device);
    let started = Instant::now();
    let out = work()?;
    forward_clock::synchronize(device);
    Ok((out, started.elapsed().as_secs_f64()))
}

fn print_report(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("printing the flops profile", e))
}

fn write_report(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// The summary figures of the profiled step (latencies in seconds).
struct Summary {
    step: u64,
    world_size: usize,
    micro_batch: u64,
    fwd_s: f64,
    bwd_s: f64,
    step_s: f64,
    recompute_fwd_factor: f64,
}

/// A counted tree with the module forward times recorded for it.
struct Profile<'a> {
    tree: &'a ModuleNode,
    times: &'a BTreeMap<String, f64>,
}

impl Profile<'_> {
    /// DeepSpeed's `get_module_duration`: the module's own time, else its children's
    /// summed; None when neither it nor any descendant was timed.
    fn duration(&self, node: &ModuleNode) -> Option<f64> {
        if let Some(seconds) = node.timed_as.as_ref().and_then(|p| self.times.get(p)) {
            return Some(*seconds);
        }
        let children: Vec<f64> = node
            .children
            .iter()
            .filter_map(|c| self.duration(c))
            .collect();
        (!children.is_empty()).then(|| children.iter().sum())
    }
}

/// The whole report, as `print_model_profile` prints it.
fn render(profile: &Profile<'_>, summary: &Summary, config: &FlopsProfilerConfig) -> String {
    let mut out = String::new();
    out.push_str(&summary_text(profile, summary));
    out.push_str(
        "\n----------------------------- Aggregated Profile per GPU -----------------------------\n",
    );
    out.push_str(&aggregated_text(
        profile,
        config.module_depth,
        config.top_modules,
    ));
    if config.detailed {
        out.push_str(DETAILED_HEADER);
        out.push_str(&module_repr(profile, profile.tree));
        out.push('\n');
    }
    out.push_str(
        "------------------------------------------------------------------------------\n",
    );
    out
}

const NOTATIONS: &str = "Notations:
data parallel size (dp_size), model parallel size(mp_size),
number of parameters (params), number of multiply-accumulate operations(MACs),
number of floating-point operations (flops), floating-point operations per second (FLOPS),
fwd latency (forward propagation latency), bwd latency (backward propagation latency),
step (weights update latency), iter latency (sum of fwd, bwd and step latency)

";

const DETAILED_HEADER: &str = "
------------------------------ Detailed Profile per GPU ------------------------------
Each module profile is listed after its name in the following order: 
params, percentage of total params, MACs, percentage of total MACs, fwd latency, percentage of total fwd latency, fwd FLOPS

Note: 1. A module can have torch.nn.module or torch.nn.functional to compute logits (e.g. CrossEntropyLoss). They are not counted as submodules, thus not to be printed out. However they make up the difference between a parent's MACs (or latency) and the sum of its submodules'.
2. Number of floating-point operations is a theoretical estimation, thus FLOPS computed using that could be larger than the maximum system throughput.
3. The fwd latency listed in the top module's profile is directly captured at the module forward function in PyTorch, thus it's less than the fwd latency shown above which is captured in DeepSpeed.

";

/// The banner, notations and summary lines (rsdeep has no model parallelism: mp 1).
fn summary_text(profile: &Profile<'_>, s: &Summary) -> String {
    let tree = profile.tree;
    let (params, macs, flops) = (tree.params, tree.total_macs(), tree.total_flops() as f64);
    let bwd_factor = 2.0 + s.recompute_fwd_factor;
    let iter_s = s.fwd_s + s.bwd_s + s.step_s;
    let per = |work: f64, seconds: f64| flops_to_string(rate(work, seconds));
    let samples = rate((s.micro_batch * s.world_size as u64) as f64, iter_s);
    let rows: Vec<(String, String)> = vec![
        ("world size: ".into(), s.world_size.to_string()),
        ("data parallel size: ".into(), s.world_size.to_string()),
        ("model parallel size: ".into(), "1".into()),
        ("batch size per GPU: ".into(), s.micro_batch.to_string()),
        ("params per GPU: ".into(), params_to_string(params as f64)),
        (
            "params of model = params per GPU * mp_size: ".into(),
            params_to_string(params as f64),
        ),
        ("fwd MACs per GPU: ".into(), macs_to_string(macs as f64)),
        ("fwd flops per GPU: ".into(), number_to_string(flops)),
        (
            "fwd flops of model = fwd flops per GPU * mp_size: ".into(),
            number_to_string(flops),
        ),
        ("fwd latency: ".into(), duration_to_string(s.fwd_s)),
        (
            "fwd FLOPS per GPU = fwd flops per GPU / fwd latency: ".into(),
            per(flops, s.fwd_s),
        ),
        ("bwd latency: ".into(), duration_to_string(s.bwd_s)),
        (
            format!(
                "bwd FLOPS per GPU = {} * fwd flops per GPU / bwd latency: ",
                format_g(bwd_factor)
            ),
            per(bwd_factor * flops, s.bwd_s),
        ),
        (
            format!(
                "fwd+bwd FLOPS per GPU = {} * fwd flops per GPU / (fwd+bwd latency): ",
                format_g(bwd_factor + 1.0)
            ),
            per((bwd_factor + 1.0) * flops, s.fwd_s + s.bwd_s),
        ),
        ("step latency: ".into(), duration_to_string(s.step_s)),
        ("iter latency: ".into(), duration_to_string(iter_s)),
        (
            format!(
                "FLOPS per GPU = {} * fwd flops per GPU / iter latency: ",
                format_g(bwd_factor + 1.0)
            ),
            per((bwd_factor + 1.0) * flops, iter_s),
        ),
        (
            "samples/second: ".into(),
            python_float_repr(round2(samples)),
        ),
    ];
    let mut out = String::from(
        "\n-------------------------- DeepSpeed Flops Profiler --------------------------\n",
    );
    let _ = writeln!(out, "Profile Summary at step {}:", s.step);
    out.push_str(NOTATIONS);
    for (label, value) in rows {
        let _ = writeln!(out, "{label:<70}  {value:<8}");
    }
    out
}

/// `work / seconds`, 0 for a zero time (DeepSpeed would divide by zero).
fn rate(work: f64, seconds: f64) -> f64 {
    match seconds > 0.0 {
        true => work / seconds,
        false => 0.0,
    }
}

/// Per depth, a module class's MACs, parameters and time summed over its modules.
#[derive(Default)]
struct ClassTotals {
    macs: i64,
    params: i64,
    seconds: Option<f64>,
}

/// DeepSpeed's aggregated profile: the top `top` classes by params, MACs and fwd
/// latency at each depth below `module_depth` (-1: all but the deepest).
fn aggregated_text(profile: &Profile<'_>, module_depth: i64, top: u64) -> String {
    let mut depths: Vec<Vec<(String, ClassTotals)>> = Vec::new();
    collect_depths(profile, profile.tree, 0, &mut depths);
    let depth = match module_depth {
        -1 => depths.len().saturating_sub(1),
        d => usize::try_from(d).unwrap_or(0).min(depths.len()),
    };
    let mut out = format!(
        "Top {top} modules in terms of params, MACs or fwd latency at different model depths:\n"
    );
    for (d, classes) in depths.iter().take(depth).enumerate() {
        let n = (top as usize).min(classes.len());
        let params = top_classes(
            classes,
            n,
            |c| c.params as f64,
            |c| params_to_string(c.params as f64),
        );
        let macs = top_classes(
            classes,
            n,
            |c| c.macs as f64,
            |c| macs_to_string(c.macs as f64),
        );
        let time = top_classes(
            classes,
            n,
            |c| c.seconds.unwrap_or(0.0),
            |c| c.seconds.map_or_else(|| "-".into(), duration_to_string),
        );
        let _ = writeln!(out, "depth {d}:");
        let _ = writeln!(out, "    params      - {params}");
        let _ = writeln!(out, "    MACs        - {macs}");
        let _ = writeln!(out, "    fwd latency - {time}");
    }
    out
}

/// Adds `node` (at `depth`) and its descendants to the per-depth class totals, classes
/// in the order first met.
fn collect_depths(
    profile: &Profile<'_>,
    node: &ModuleNode,
    depth: usize,
    depths: &mut Vec<Vec<(String, ClassTotals)>>,
) {
    if depths.len() <= depth {
        depths.push(Vec::new());
    }
    let classes = &mut depths[depth];
    let index = match classes.iter().position(|(c, _)| *c == node.class) {
        Some(i) => i,
        None => {
            classes.push((node.class.clone(), ClassTotals::default()));
            classes.len() - 1
        }
    };
    let totals = &mut classes[index].1;
    totals.macs += node.total_macs();
    totals.params += node.params;
    if let Some(seconds) = profile.duration(node) {
        totals.seconds = Some(totals.seconds.unwrap_or(0.0) + seconds);
    }
    for child in &node.children {
        collect_depths(profile, child, depth + 1, depths);
    }
}

/// Python's repr of the dict of the `n` classes largest by `key` (ties in first-met
/// order, as Python's stable sort), each shown by `show`.
fn top_classes(
    classes: &[(String, ClassTotals)],
    n: usize,
    key: impl Fn(&ClassTotals) -> f64,
    show: impl Fn(&ClassTotals) -> String,
) -> String {
    let mut sorted: Vec<&(String, ClassTotals)> = classes.iter().collect();
    sorted.sort_by(|a, b| key(&b.1).total_cmp(&key(&a.1)));
    let items: Vec<String> = sorted
        .iter()
        .take(n)
        .map(|(class, totals)| format!("'{class}': '{}'", show(totals)))
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// torch's repr of `node` with DeepSpeed's profile line as each module's extra repr.
fn module_repr(profile: &Profile<'_>, node: &ModuleNode) -> String {
    if node.is_list {
        return list_repr(profile, node);
    }
    let line = profile_line(profile, node);
    let children: Vec<String> = node
        .children
        .iter()
        .map(|c| format!("({}): {}", c.key, add_indent(&module_repr(profile, c))))
        .collect();
    if children.is_empty() {
        return format!("{}({line})", node.printed);
    }
    format!(
        "{}(\n  {line}\n  {}\n)",
        node.printed,
        children.join("\n  ")
    )
}

/// torch's `ModuleList` repr: no profile line, runs of equal children folded into
/// `(0-1): 2 x ...`.
fn list_repr(profile: &Profile<'_>, node: &ModuleNode) -> String {
    if node.children.is_empty() {
        return format!("{}()", node.printed);
    }
    let reprs: Vec<String> = node
        .children
        .iter()
        .map(|c| module_repr(profile, c))
        .collect();
    let mut runs: Vec<(usize, usize)> = Vec::new(); // (first, last) index of equal reprs
    for (i, repr) in reprs.iter().enumerate() {
        match runs.last_mut() {
            Some((first, last)) if reprs[*first] == *repr => *last = i,
            _ => runs.push((i, i)),
        }
    }
    let lines: Vec<String> = runs
        .iter()
        .map(|&(first, last)| {
            let line = match first == last {
                true => format!("({first}): {}", reprs[first]),
                false => format!("({first}-{last}): {} x {}", last - first + 1, reprs[first]),
            };
            add_indent(&line)
        })
        .collect();
    format!("{}(\n  {}\n)", node.printed, lines.join("\n  "))
}

/// torch's `_addindent(s, 2)`: every line but the first indented, blank ones left empty.
fn add_indent(text: &str) -> String {
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or_default();
    let rest: Vec<String> = lines
        .map(|l| match l.trim().is_empty() {
            true => String::new(),
            false => format!("  {l}"),
        })
        .collect();
    match rest.is_empty() {
        true => first.to_string(),
        false => format!("{first}\n{}", rest.join("\n")),
    }
}

/// DeepSpeed's `flops_repr` of a module: params, MACs, latency (each with its share of
/// the model's) and FLOPS, then the module's own extra repr; `-` for latency and FLOPS
/// of a module rsdeep does not time.
fn profile_line(profile: &Profile<'_>, node: &ModuleNode) -> String {
    let tree = profile.tree;
    let share = |part: f64, whole: f64| match whole != 0.0 {
        true => format_g(round2(100.0 * part / whole)),
        false => "0".into(),
    };
    let macs = node.total_macs() as f64;
    let mut items = vec![
        format!(
            "{} = {}% Params",
            params_to_string(node.params as f64),
            share(node.params as f64, tree.params as f64)
        ),
        format!(
            "{} = {}% MACs",
            macs_to_string(macs),
            share(macs, tree.total_macs() as f64)
        ),
    ];
    let total_s = profile.duration(tree).unwrap_or(0.0);
    match profile.duration(node) {
        Some(seconds) => {
            items.push(format!(
                "{} = {}% latency",
                duration_to_string(seconds),
                share(seconds, total_s)
            ));
            let flops = node.total_flops() as f64;
            items.push(flops_to_string(round2(rate(flops, seconds))));
        }
        None => items.extend(["- latency".to_string(), "- FLOPS".to_string()]),
    }
    if !node.extra.is_empty() {
        items.push(node.extra.clone());
    }
    items.join(", ")
}

/// Python's `round(x, 2)` (both round the exact binary value, ties to even).
fn round2(x: f64) -> f64 {
    format!("{x:.2}").parse().unwrap_or(x)
}

/// Python's `format(x, "g")`: 6 significant digits, trailing zeros dropped, scientific
/// below 1e-4 and from 1e6.
fn format_g(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return match x {
            v if v.is_nan() => "nan".into(),
            v if v.is_infinite() && v > 0.0 => "inf".into(),
            v if v.is_infinite() => "-inf".into(),
            _ => "0".into(),
        };
    }
    let scientific = format!("{x:.5e}"); // d.ddddde[-]X, rounded to 6 digits
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if !(-4..6).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{}e{sign}{:02}", strip_zeros(mantissa), exponent.abs());
    }
    strip_zeros(&format!("{x:.*}", (5 - exponent) as usize))
}

/// `1.500` -> `1.5`, `2.000` -> `2`.
fn strip_zeros(number: &str) -> String {
    match number.contains('.') {
        true => number
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string(),
        false => number.to_string(),
    }
}

/// DeepSpeed's `number_to_string`: the value in T/G/M/K/(none)/m/u units rounded to 2
/// decimals, then a space and the unit.
fn number_to_string(num: f64) -> String {
    let (magnitude, unit) = match num {
        n if n >= 1e12 => (1e12, "T"),
        n if n >= 1e9 => (1e9, "G"),
        n if n >= 1e6 => (1e6, "M"),
        n if n >= 1e3 => (1e3, "K"),
        n if n >= 1.0 || n == 0.0 => (1.0, ""),
        n if n >= 1e-3 => (1e-3, "m"),
        _ => (1e-6, "u"),
    };
    format!("{} {unit}", format_g(round2(num / magnitude)))
}

fn macs_to_string(macs: f64) -> String {
    format!("{}MACs", number_to_string(macs))
}

fn flops_to_string(flops: f64) -> String {
    format!("{}FLOPS", number_to_string(flops))
}

/// Parameters: `G` shown as `B`, no trailing space.
fn params_to_string(params: f64) -> String {
    number_to_string(params)
        .replace('G', "B")
        .trim()
        .to_string()
}

fn duration_to_string(seconds: f64) -> String {
    format!("{}s", number_to_string(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelType;

    #[test]
    fn numbers_print_as_deepspeeds_helpers_print_them() {
        assert_eq!(params_to_string(86_592.0), "86.59 K");
        assert_eq!(params_to_string(64.0), "64");
        assert_eq!(params_to_string(0.0), "0");
        assert_eq!(params_to_string(1.5e9), "1.5 B");
        assert_eq!(macs_to_string(2_686_976.0), "2.69 MMACs");
        assert_eq!(macs_to_string(0.0), "0 MACs");
        assert_eq!(macs_to_string(458_752.0), "458.75 KMACs");
        assert_eq!(number_to_string(5_382_144.0), "5.38 M");
        assert_eq!(duration_to_string(0.00293), "2.93 ms");
        assert_eq!(duration_to_string(8.655e-5), "86.55 us");
        assert_eq!(flops_to_string(1.83e9), "1.83 GFLOPS");
        assert_eq!(flops_to_string(0.0), "0 FLOPS");
        assert_eq!(format_g(100.0), "100");
        assert_eq!(format_g(42.87), "42.87");
        assert_eq!(format_g(2.0), "2");
        assert_eq!(format_g(2.5), "2.5");
        assert_eq!(format_g(1234567.0), "1.23457e+06");
        assert_eq!(format_g(0.00001234), "1.234e-05");
        assert_eq!(round2(0.125), 0.12, "ties to even, as Python");
    }

    fn tiny_tree() -> ModuleNode {
        let config = ModelConfig::new(ModelType::Qwen2, 96, 64, 128, 2, 4, 2);
        let shape = ForwardShape { batch: 2, seq: 16 };
        model_tree(&config, &Adapters::default(), shape, true)
    }

    fn module_times(layer_s: [f64; 2]) -> BTreeMap<String, f64> {
        let mut times = BTreeMap::from([
            ("model.embed_tokens".to_string(), 0.001),
            ("model.norm".to_string(), 0.001),
            ("lm_head".to_string(), 0.002),
        ]);
        for (i, seconds) in layer_s.into_iter().enumerate() {
            times.insert(format!("model.layers.{i}"), seconds);
            times.insert(format!("model.layers.{i}.self_attn"), seconds / 2.0);
        }
        times
    }

    fn summary() -> Summary {
        Summary {
            step: 2,
            world_size: 2,
            micro_batch: 2,
            fwd_s: 0.01,
            bwd_s: 0.02,
            step_s: 0.01,
            recompute_fwd_factor: 0.0,
        }
    }

    #[test]
    fn the_summary_follows_print_model_profile_line_for_line() {
        let tree = tiny_tree();
        let times = module_times([0.003, 0.003]);
        let profile = Profile {
            tree: &tree,
            times: &times,
        };
        assert_eq!(
            profile.duration(&tree),
            Some(0.01),
            "embed + layers + norm + head"
        );
        let text = summary_text(&profile, &summary());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "-------------------------- DeepSpeed Flops Profiler --------------------------"
        );
        assert_eq!(lines[2], "Profile Summary at step 2:");
        let row = |label: &str, value: &str| format!("{label:<70}  {value:<8}");
        for expected in [
            row("world size: ", "2"),
            row("params per GPU: ", "86.59 K"),
            row("fwd MACs per GPU: ", "2.69 MMACs"),
            row("fwd flops per GPU: ", "5.38 M"),
            row("fwd latency: ", "10 ms"),
            row(
                "bwd FLOPS per GPU = 2 * fwd flops per GPU / bwd latency: ",
                "538.21 MFLOPS",
            ),
            row("iter latency: ", "40 ms"),
            row("samples/second: ", "100.0"),
        ] {
            assert!(
                lines.contains(&expected.as_str()),
                "{expected:?} in\n{text}"
            );
        }
    }

    #[test]
    fn the_aggregated_profile_and_the_tree_use_deepspeeds_layout() {
        let tree = tiny_tree();
        let times = module_times([0.003, 0.002]);
        let profile = Profile {
            tree: &tree,
            times: &times,
        };
        let aggregated = aggregated_text(&profile, -1, 3);
        let lines: Vec<&str> = aggregated.lines().collect();
        assert_eq!(
            lines[0],
            "Top 3 modules in terms of params, MACs or fwd latency at different model depths:"
        );
        assert_eq!(lines.len(), 1 + 4 * 5, "depths 0-4, not the deepest (5)");
        assert_eq!(
            lines[6],
            "    params      - {'Qwen2Model': '80.45 K', 'Linear': '6.14 K'}"
        );
        assert_eq!(
            lines[20],
            "    fwd latency - {'Qwen2Attention': '2.5 ms', 'Qwen2MLP': '-', 'Qwen2RMSNorm': '-'}"
        );
        let repr = module_repr(&profile, &tree);
        let repr: Vec<&str> = repr.lines().collect();
        assert_eq!(repr[0], "Qwen2ForCausalLM(");
        assert_eq!(
            repr[1],
            "  86.59 K = 100% Params, 2.69 MMACs = 100% MACs, 9 ms = 100% latency, 598.02 MFLOPS"
        );
        assert_eq!(
            repr[4],
            "    (embed_tokens): Embedding(6.14 K = 7.1% Params, 0 MACs = 0% MACs, 1 ms = 11.11% latency, 0 FLOPS, 96, 64)"
        );
        assert_eq!(repr[5], "    (layers): ModuleList(");
        assert_eq!(repr[6], "      (0): Qwen2DecoderLayer(");
        assert!(repr.contains(&"          (q_proj): Linear(4.16 K = 4.8% Params, 131.07 KMACs = 4.88% MACs, - latency, - FLOPS, in_features=64, out_features=64, bias=True)"), "{repr:#?}");
        assert_eq!(repr.last(), Some(&")"), "the root closes the repr");
        let folded = module_times([0.003, 0.003]);
        let same = Profile {
            tree: &tree,
            times: &folded,
        };
        let repr = module_repr(&same, &tree);
        assert!(
            repr.contains("      (0-1): 2 x Qwen2DecoderLayer(\n"),
            "{repr}"
        );
    }

    #[test]
    fn a_report_goes_into_output_file_with_its_folder() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let file = dir.path().join("nested/profile.log");
        let config = FlopsProfilerConfig {
            enabled: true,
            profile_step: 2,
            output_file: Some(file.display().to_string()),
            detailed: false,
            ..FlopsProfilerConfig::default()
        };
        let profiler = FlopsProfiler::new(&config, 0, 0.0).ok_or(Error::Config("off".into()))?;
        assert!(FlopsProfiler::new(&config, 1, 0.0).is_none(), "rank 0 only");
        assert!(profiler.is_due(2) && !profiler.is_due(1));
        let model = ModelConfig::new(ModelType::Qwen2, 96, 64, 128, 2, 4, 2);
        let run = ProfiledRun {
            step: 2,
            model: &model,
            trainable: &[],
            world_size: 1,
            micro_batch: 2,
        };
        let micro = MicroStepTimes {
            shape: ForwardShape { batch: 2, seq: 16 },
            wall_s: 0.03,
            modules: module_times([0.003, 0.003]),
        };
        profiler.report(&run, &micro, 0.01)?;
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io("reading", e))?;
        assert!(text.contains("Profile Summary at step 2:\n"), "{text}");
        assert!(text.contains("Aggregated Profile per GPU"), "{text}");
        assert!(!text.contains("Detailed Profile per GPU"), "detailed false");
        assert!(text.ends_with(
            "------------------------------------------------------------------------------\n"
        ));
        Ok(())
    }
}
