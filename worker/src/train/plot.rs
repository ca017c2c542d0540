//! The loss-curve PNG written at the end of training (`output_dir/loss.png`), drawn with
//! `plotters`: the raw training loss (light), its smoothed curve (an exponential moving
//! average whose weight grows with the number of points, as LLaMA-Factory's loss plot
//! smooths), eval points, and axes with tick labels. Text uses the Ubuntu Light font
//! that `epaint_default_fonts` ships, so no system font is needed. Called by
//! `train/outputs.rs`.

use crate::{Error, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 480;
/// The font family name the plot registers and asks for.
const FONT: &str = "sans-serif";
const RAW: RGBColor = RGBColor(174, 199, 232);
const SMOOTHED: RGBColor = RGBColor(31, 119, 180);
const EVAL: RGBColor = RGBColor(255, 127, 14);

/// Writes a PNG of `train` (step, loss) raw and smoothed, and `eval` points.
pub fn write_loss_curve(path: &Path, train: &[(u64, f64)], eval: &[(u64, f64)]) -> Result<()> {
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(&mut rgb, train, eval)
        .map_err(|e| Error::Engine(format!("drawing {}: {e}", path.display())))?;
    encode_png(path, &rgb)
}

/// Draws the chart into an RGB buffer of WIDTH x HEIGHT.
fn draw(
    rgb: &mut [u8],
    train: &[(u64, f64)],
    eval: &[(u64, f64)],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    register_font();
    let train: Vec<(f64, f64)> = finite_points(train);
    let eval: Vec<(f64, f64)> = finite_points(eval);
    let all = || train.iter().chain(&eval);
    let (min_step, max_step) = bounds(all().map(|(s, _)| *s));
    let (min_loss, max_loss) = bounds(all().map(|(_, l)| *l));
    let root = BitMapBackend::with_buffer(rgb, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("training loss", (FONT, 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(min_step..max_step, min_loss..max_loss)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(245, 245, 245))
        .x_desc("step")
        .y_desc("loss")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .x_label_formatter(&|step| format!("{step:.0}"))
        .y_label_formatter(&|loss| format!("{loss:.3}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(train.iter().copied(), RAW.stroke_width(2)))?
        .label("loss")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RAW.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(smoothed(&train), SMOOTHED.stroke_width(2)))?
        .label("smoothed")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], SMOOTHED.stroke_width(2)));
    if !eval.is_empty() {
        chart
            .draw_series(eval.iter().map(|p| Circle::new(*p, 4, EVAL.filled())))?
            .label("eval loss")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, EVAL.filled()));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Registers the bundled font once per process under `FONT`.
fn register_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The bytes are a valid TrueType font compiled into the crate; `register_font`
        // fails only on a malformed one.
        let _ = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        );
    });
}

fn finite_points(points: &[(u64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .filter(|(_, loss)| loss.is_finite())
        .map(|(step, loss)| (*step as f64, *loss))
        .collect()
}

/// An exponential moving average of the losses, weight 1.8 (sigmoid(0.05 n) - 0.5) for
/// n points: no smoothing for a handful of points, about 0.9 for hundreds.
fn smoothed(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let n = points.len() as f64;
    let weight = 1.8 * (1.0 / (1.0 + (-0.05 * n).exp()) - 0.5);
    let mut last = points.first().map_or(0.0, |(_, loss)| *loss);
    points
        .iter()
        .map(|(step, loss)| {
            last = last * weight + (1.0 - weight) * loss;
            (*step, last)
        })
        .collect()
}

/// (min, max) of the values, widened so the range is never empty.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        return (lo - 0.5, hi + 0.5);
    }
    (lo, hi)
}

fn encode_png(path: &Path, rgb: &[u8]) -> Result<()> {
    let file = std::fs::File::create(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let png_error =
        |e: png::EncodingError| Error::Engine(format!("writing {}: {e}", path.display()));
    let mut writer = encoder.write_header().map_err(png_error)?;
    writer.write_image_data(rgb).map_err(png_error)?;
    writer.finish().map_err(png_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decoded RGB pixels of a PNG.
    fn pixels(path: &Path) -> (u32, u32, Vec<u8>) {
        let file = std::fs::File::open(path).expect("open");
        let mut reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .expect("png header");
        let mut buffer = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buffer).expect("frame");
        buffer.truncate(info.buffer_size());
        (info.width, info.height, buffer)
    }

    fn count_of(rgb: &[u8], color: RGBColor) -> usize {
        rgb.chunks(3)
            .filter(|p| p == &[color.0, color.1, color.2])
            .count()
    }

    #[test]
    fn writes_a_png_with_both_curves_eval_points_and_text() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("loss.png");
        let train: Vec<(u64, f64)> = (1..=50)
            .map(|s| (s, 5.0 / (s as f64).sqrt() + 0.2 * ((s % 3) as f64)))
            .collect();
        write_loss_curve(&path, &train, &[(25, 1.2), (50, 0.9)])?;
        let (width, height, rgb) = pixels(&path);
        assert_eq!((width, height), (WIDTH, HEIGHT));
        assert!(count_of(&rgb, RAW) > 200, "raw curve missing");
        assert!(count_of(&rgb, SMOOTHED) > 200, "smoothed curve missing");
        assert!(count_of(&rgb, EVAL) > 20, "eval points missing");
        let dark = rgb.chunks(3).filter(|p| p.iter().all(|&c| c < 80)).count();
        assert!(
            dark > 500,
            "axes, ticks and labels drawn in black: {dark} pixels"
        );
        Ok(())
    }

    #[test]
    fn smoothing_starts_at_the_first_loss_and_flattens_noise() {
        let noisy: Vec<(f64, f64)> = (0..200)
            .map(|s| (s as f64, if s % 2 == 0 { 1.0 } else { 3.0 }))
            .collect();
        let smooth = smoothed(&noisy);
        assert_eq!(smooth[0], (0.0, 1.0));
        let tail: Vec<f64> = smooth[100..].iter().map(|(_, l)| *l).collect();
        let spread = tail.iter().cloned().fold(f64::MIN, f64::max)
            - tail.iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread < 0.3, "spread {spread} of a 2.0 zigzag");
        let few = smoothed(&noisy[..2]);
        assert!(
            (few[1].1 - 3.0).abs() < 0.2,
            "little smoothing over 2 points"
        );
    }

    #[test]
    fn bounds_never_collapse() {
        assert_eq!(bounds([2.0, 2.0].into_iter()), (1.5, 2.5));
        assert_eq!(bounds(std::iter::empty()), (0.0, 1.0));
    }
}
