//! The loss-curve PNG written at the end of training (`output_dir/loss.png`): training
//! loss against step, optional eval points, axes with min/max labels. A tiny rasteriser
//! over an RGB buffer and a 3x5 pixel font keep this free of plotting/font dependencies.

use crate::{Error, Result};
use std::path::Path;

const WIDTH: usize = 800;
const HEIGHT: usize = 480;
const MARGIN_LEFT: usize = 90;
const MARGIN_RIGHT: usize = 20;
const MARGIN_TOP: usize = 40;
const MARGIN_BOTTOM: usize = 50;
const BLUE: [u8; 3] = [31, 119, 180];
const ORANGE: [u8; 3] = [255, 127, 14];
const GREY: [u8; 3] = [220, 220, 220];
const BLACK: [u8; 3] = [0, 0, 0];

/// An RGB image being drawn.
struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            pixels: vec![255; WIDTH * HEIGHT * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if x < 0 || y < 0 || x >= WIDTH as i64 || y >= HEIGHT as i64 {
            return;
        }
        let i = (y as usize * WIDTH + x as usize) * 3;
        self.pixels[i..i + 3].copy_from_slice(&color);
    }

    /// Bresenham line, `thick` pixels wide.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: [u8; 3], thick: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for t in 0..thick {
                self.set(x, y + t, color);
                self.set(x + t, y, color);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Draws `text` with the 3x5 font scaled by `scale`, top-left at (x, y).
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, color: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            let glyph = glyph(ch);
            let ox = x + i as i64 * 4 * scale;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.set(ox + col * scale + dx, y + row as i64 * scale + dy, color);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// 3x5 glyphs, one row per entry, bit 2 = left column.
fn glyph(ch: char) -> [u8; 5] {
    match ch {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        'l' => [6, 2, 2, 2, 7],
        'o' => [0, 7, 5, 5, 7],
        's' => [0, 7, 6, 3, 7],
        't' => [2, 7, 2, 2, 3],
        'p' => [0, 7, 5, 7, 4],
        'v' => [0, 5, 5, 5, 2],
        'a' => [0, 7, 3, 5, 7],
        'r' => [0, 7, 4, 4, 4],
        'i' => [2, 0, 2, 2, 2],
        'n' => [0, 7, 5, 5, 5],
        '/' => [1, 1, 2, 4, 4],
        ':' => [0, 2, 0, 2, 0],
        _ => [0, 0, 0, 0, 0],
    }
}

/// Writes a PNG of `train` (step, loss) as a blue line and `eval` points in orange.
pub fn write_loss_curve(path: &Path, train: &[(u64, f64)], eval: &[(u64, f64)]) -> Result<()> {
    let mut canvas = Canvas::new();
    let all = train.iter().chain(eval.iter());
    let finite: Vec<(u64, f64)> = all.filter(|(_, l)| l.is_finite()).copied().collect();
    let (min_step, max_step) = bounds(finite.iter().map(|(s, _)| *s as f64));
    let (min_loss, max_loss) = bounds(finite.iter().map(|(_, l)| *l));
    let plot_w = (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) as f64;
    let plot_h = (HEIGHT - MARGIN_TOP - MARGIN_BOTTOM) as f64;
    let to_px = |step: f64, loss: f64| -> (i64, i64) {
        let x = MARGIN_LEFT as f64 + (step - min_step) / (max_step - min_step) * plot_w;
        let y = MARGIN_TOP as f64 + (max_loss - loss) / (max_loss - min_loss) * plot_h;
        (x.round() as i64, y.round() as i64)
    };
    for k in 0..=4 {
        let loss = min_loss + (max_loss - min_loss) * k as f64 / 4.0;
        let (_, y) = to_px(min_step, loss);
        canvas.line(
            (MARGIN_LEFT as i64, y),
            ((WIDTH - MARGIN_RIGHT) as i64, y),
            GREY,
            1,
        );
        canvas.text(8, y - 5, &format!("{loss:.3}"), 2, BLACK);
    }
    let (x0, y0) = to_px(min_step, min_loss);
    let (x1, y1) = to_px(max_step, max_loss);
    canvas.line((x0, y0), (x1, y0), BLACK, 2);
    canvas.line((x0, y0), (x0, y1), BLACK, 2);
    canvas.text(x0, y0 + 10, &format!("{}", min_step as u64), 2, BLACK);
    canvas.text(x1 - 40, y0 + 10, &format!("{}", max_step as u64), 2, BLACK);
    canvas.text((WIDTH / 2) as i64 - 20, y0 + 24, "step", 2, BLACK);
    canvas.text(MARGIN_LEFT as i64, 10, "loss", 3, BLUE);
    canvas.text(MARGIN_LEFT as i64 + 80, 10, "eval loss", 3, ORANGE);
    let points: Vec<(i64, i64)> = train
        .iter()
        .filter(|(_, l)| l.is_finite())
        .map(|(s, l)| to_px(*s as f64, *l))
        .collect();
    for pair in points.windows(2) {
        canvas.line(pair[0], pair[1], BLUE, 2);
    }
    for (s, l) in eval.iter().filter(|(_, l)| l.is_finite()) {
        let (x, y) = to_px(*s as f64, *l);
        for d in -3..=3 {
            canvas.line((x - 3, y + d), (x + 3, y + d), ORANGE, 1);
        }
    }
    encode_png(path, &canvas.pixels)
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
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH as u32, HEIGHT as u32);
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

    #[test]
    fn writes_a_decodable_png_of_the_right_size() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("loss.png");
        let train: Vec<(u64, f64)> = (1..=50).map(|s| (s, 5.0 / (s as f64).sqrt())).collect();
        write_loss_curve(&path, &train, &[(25, 1.2), (50, 0.9)])?;
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(&path).map_err(|e| Error::io("open", e))?,
        ));
        let reader = decoder.read_info().expect("png header");
        assert_eq!(reader.info().width, WIDTH as u32);
        assert_eq!(reader.info().height, HEIGHT as u32);
        Ok(())
    }

    #[test]
    fn bounds_never_collapse() {
        assert_eq!(bounds([2.0, 2.0].into_iter()), (1.5, 2.5));
        assert_eq!(bounds(std::iter::empty()), (0.0, 1.0));
    }
}
