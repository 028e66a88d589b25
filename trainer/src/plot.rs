//! PNG figures of the trainer's reports (the confusion matrix of `eval`,
//! the latency CDFs of `demo`, accuracy against latency of `compare`).
//!
//! Drawn with `image` (already in the dependency tree through mistral.rs)
//! and text rasterized with `ab_glyph` from a system TrueType font:
//! `FLYWHEEL_FONT`, else DejaVu Sans or Liberation Sans where distributions
//! install them. Without any font the figure is drawn without its text and
//! a warning says so; the numbers are always in the JSON report.

use std::path::{Path, PathBuf};

use ab_glyph::{Font, FontVec, PxScale, ScaleFont, point};
use image::{Rgb, RgbImage};

/// Fonts tried in order when `FLYWHEEL_FONT` is not set.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Side of a matrix cell in pixels.
const CELL: u32 = 34;
/// Width of the row-label column.
const LEFT: u32 = 150;
/// Height of the title and column-label band.
const TOP: u32 = 64;
const MARGIN: u32 = 16;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);

/// Errors writing a figure.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The PNG could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: image::ImageError,
    },
}

fn load_font() -> Option<FontVec> {
    let from_env = std::env::var_os("FLYWHEEL_FONT").map(PathBuf::from);
    let candidates = from_env.into_iter().chain(FONT_CANDIDATES.iter().map(PathBuf::from));
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path)
            && let Ok(font) = FontVec::try_from_vec(bytes)
        {
            return Some(font);
        }
    }
    None
}

/// Draw `text` with its top-left corner at `(x, y)`.
fn text(img: &mut RgbImage, font: Option<&FontVec>, x: f32, y: f32, size: f32, color: Rgb<u8>, s: &str) {
    let Some(font) = font else { return };
    let scaled = font.as_scaled(PxScale::from(size));
    let mut cursor = x;
    for c in s.chars() {
        let id = font.glyph_id(c);
        let glyph = id.with_scale_and_position(size, point(cursor, y + scaled.ascent()));
        cursor += scaled.h_advance(id);
        let Some(outlined) = font.outline_glyph(glyph) else {
            continue;
        };
        let b = outlined.px_bounds();
        outlined.draw(|gx, gy, coverage| {
            let (px, py) = (b.min.x as i64 + i64::from(gx), b.min.y as i64 + i64::from(gy));
            if px < 0 || py < 0 || px >= i64::from(img.width()) || py >= i64::from(img.height()) {
                return;
            }
            let p = img.get_pixel_mut(px as u32, py as u32);
            for k in 0..3 {
                let bg = f32::from(p.0[k]);
                p.0[k] = (bg + (f32::from(color.0[k]) - bg) * coverage).round() as u8;
            }
        });
    }
}

fn text_width(font: Option<&FontVec>, size: f32, s: &str) -> f32 {
    font.map_or(0.0, |f| {
        let scaled = f.as_scaled(PxScale::from(size));
        s.chars().map(|c| scaled.h_advance(f.glyph_id(c))).sum()
    })
}

/// Write the confusion matrix (`matrix[true][predicted]`) as a PNG heat map,
/// each row shaded by its share of the row's examples.
///
/// # Errors
/// The file cannot be written.
pub fn confusion_png(labels: &[String], matrix: &[Vec<usize>], title: &str, path: &Path) -> Result<(), PlotError> {
    let font = load_font();
    if font.is_none() {
        tracing::warn!("no TrueType font found (set FLYWHEEL_FONT): the confusion matrix is drawn without text");
    }
    let font = font.as_ref();
    let n = labels.len() as u32;
    let (w, h) = (LEFT + n * CELL + MARGIN, TOP + n * CELL + MARGIN + 20);
    let mut img = RgbImage::from_pixel(w, h, WHITE);
    text(&mut img, font, MARGIN as f32, 8.0, 16.0, INK, title);
    text(
        &mut img,
        font,
        LEFT as f32,
        30.0,
        11.0,
        INK,
        "predicted (columns: label number) ->",
    );
    for (i, label) in labels.iter().enumerate() {
        let y = TOP + i as u32 * CELL;
        let name = format!("{i:>2} {label}");
        text(&mut img, font, MARGIN as f32, y as f32 + 10.0, 12.0, INK, &name);
        let col = i.to_string();
        let cx = LEFT + i as u32 * CELL + CELL / 2;
        let tw = text_width(font, 11.0, &col);
        text(&mut img, font, cx as f32 - tw / 2.0, TOP as f32 - 16.0, 11.0, INK, &col);
        let total: usize = matrix.get(i).map_or(0, |r| r.iter().sum());
        for j in 0..labels.len() {
            let count = matrix.get(i).and_then(|r| r.get(j)).copied().unwrap_or(0);
            let share = if total == 0 { 0.0 } else { count as f32 / total as f32 };
            let shade = |base: f32| (255.0 - (255.0 - base) * share).round() as u8;
            let fill = if i == j {
                Rgb([shade(33.0), shade(102.0), shade(172.0)])
            } else {
                Rgb([shade(202.0), shade(0.0), shade(32.0)])
            };
            let x0 = LEFT + j as u32 * CELL;
            for dy in 1..CELL {
                for dx in 1..CELL {
                    img.put_pixel(x0 + dx, y + dy, fill);
                }
            }
            if count > 0 {
                let s = count.to_string();
                let color = if share > 0.5 { WHITE } else { INK };
                let tw = text_width(font, 11.0, &s);
                text(
                    &mut img,
                    font,
                    (x0 + CELL / 2) as f32 - tw / 2.0,
                    y as f32 + 11.0,
                    11.0,
                    color,
                    &s,
                );
            }
        }
    }
    text(
        &mut img,
        font,
        MARGIN as f32,
        (TOP + n * CELL + 4) as f32,
        11.0,
        INK,
        "rows: true label; shade: share of the row (blue: right, red: wrong)",
    );
    img.save(path).map_err(|source| PlotError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Left edge of a figure's plot area.
const PLOT_L: u32 = 70;
/// Top edge of a figure's plot area (below the title).
const PLOT_T: u32 = 48;

/// A white `w` x `h` figure with `title` drawn, and the font (if any).
fn canvas(w: u32, h: u32, title: &str) -> (RgbImage, Option<FontVec>) {
    let font = load_font();
    let mut img = RgbImage::from_pixel(w, h, WHITE);
    text(&mut img, font.as_ref(), MARGIN as f32, 10.0, 16.0, INK, title);
    (img, font)
}

/// A vertical grid line at `x` through a plot area `plot_h` high, labelled
/// below the area.
fn x_tick(img: &mut RgbImage, font: Option<&FontVec>, x: u32, plot_h: u32, color: Rgb<u8>, label: &str) {
    for y in PLOT_T..=PLOT_T + plot_h {
        img.put_pixel(x, y, color);
    }
    let tw = text_width(font, 11.0, label);
    text(
        img,
        font,
        x as f32 - tw / 2.0,
        (PLOT_T + plot_h + 6) as f32,
        11.0,
        INK,
        label,
    );
}

/// Colours of the CDF series, in order.
const SERIES: [Rgb<u8>; 4] = [
    Rgb([202, 0, 32]),
    Rgb([33, 102, 172]),
    Rgb([77, 175, 74]),
    Rgb([152, 78, 163]),
];

/// Empirical CDFs of `series` (name, samples) on one linear axis from 0 to
/// the largest sample, with p50 and p99 in the legend.
///
/// # Errors
/// The file cannot be written.
pub fn cdf_png(series: &[(String, Vec<f64>)], title: &str, unit: &str, path: &Path) -> Result<(), PlotError> {
    const PLOT_W: u32 = 640;
    const PLOT_H: u32 = 300;
    let (mut img, font) = canvas(760, 440, title);
    let font = font.as_ref();
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let grey = Rgb([200, 200, 200]);
    for i in 0..=4u32 {
        let y = PLOT_T + PLOT_H - i * PLOT_H / 4;
        for x in PLOT_L..=PLOT_L + PLOT_W {
            img.put_pixel(x, y, if i == 0 { INK } else { grey });
        }
        text(
            &mut img,
            font,
            20.0,
            y as f32 - 7.0,
            11.0,
            INK,
            &format!("{:.2}", f64::from(i) / 4.0),
        );
        let x = PLOT_L + i * PLOT_W / 4;
        let label = format!("{:.0}", max * f64::from(i) / 4.0);
        x_tick(&mut img, font, x, PLOT_H, if i == 0 { INK } else { grey }, &label);
    }
    text(
        &mut img,
        font,
        (PLOT_L + PLOT_W / 2 - 30) as f32,
        (PLOT_T + PLOT_H + 22) as f32,
        12.0,
        INK,
        unit,
    );
    for (k, (name, values)) in series.iter().enumerate() {
        let color = SERIES[k % SERIES.len()];
        let mut v = values.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        let px = |x: f64| PLOT_L + ((x / max).clamp(0.0, 1.0) * f64::from(PLOT_W)).round() as u32;
        let py = |q: f64| PLOT_T + PLOT_H - (q.clamp(0.0, 1.0) * f64::from(PLOT_H)).round() as u32;
        let mut prev = (px(0.0), py(0.0));
        for (i, x) in v.iter().enumerate() {
            let (x1, y_low, y_high) = (px(*x), py(i as f64 / n), py((i + 1) as f64 / n));
            // Horizontal run to this sample, then the step up.
            for xx in prev.0.min(x1)..=prev.0.max(x1) {
                thick(&mut img, xx, y_low, color);
            }
            for yy in y_high..=y_low {
                thick(&mut img, x1, yy, color);
            }
            prev = (x1, y_high);
        }
        let p50 = crate::rails::eval::percentile(&v, 0.5);
        let p99 = crate::rails::eval::percentile(&v, 0.99);
        let ly = (PLOT_T + PLOT_H + 40 + k as u32 * 16) as f32;
        for dx in 0..18 {
            thick(&mut img, PLOT_L + dx, ly as u32 + 7, color);
        }
        let legend = format!("{name}: p50 {p50:.0}, p99 {p99:.0} {unit} (n = {})", v.len());
        text(&mut img, font, (PLOT_L + 24) as f32, ly, 12.0, INK, &legend);
    }
    img.save(path).map_err(|source| PlotError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// One model of an accuracy-versus-latency plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Name shown beside the dot.
    pub name: String,
    /// Decision latency (x, log scale).
    pub latency_ms: f64,
    /// Accuracy in [0, 1] (y).
    pub accuracy: f64,
    /// On the Pareto front (drawn in colour and joined by a line).
    pub on_front: bool,
}

/// Accuracy against decision latency (log scale) of several models, the
/// Pareto front joined and coloured, the others grey.
///
/// # Errors
/// The file cannot be written.
pub fn pareto_png(points: &[Point], title: &str, path: &Path) -> Result<(), PlotError> {
    const W: u32 = 760;
    const H: u32 = 460;
    const PLOT_W: u32 = 600;
    const PLOT_H: u32 = 340;
    let (mut img, font) = canvas(W, H, title);
    let font = font.as_ref();
    // x: whole decades around the latencies; y: whole 5-point steps around the accuracies.
    let lat = |f: fn(f64, f64) -> f64, init: f64| points.iter().map(|p| p.latency_ms.max(1e-3)).fold(init, f);
    let (lo, hi) = (
        lat(f64::min, f64::MAX).log10().floor(),
        lat(f64::max, 0.0).log10().ceil(),
    );
    let hi = if hi <= lo { lo + 1.0 } else { hi };
    let acc = |f: fn(f64, f64) -> f64, init: f64| points.iter().map(|p| p.accuracy).fold(init, f);
    let bottom = ((acc(f64::min, 1.0) * 20.0).floor() / 20.0).min(0.95);
    let top = ((acc(f64::max, 0.0) * 20.0).ceil() / 20.0).max(bottom + 0.05);
    let px = |ms: f64| PLOT_L + (((ms.max(1e-3).log10() - lo) / (hi - lo)).clamp(0.0, 1.0) * f64::from(PLOT_W)) as u32;
    let py = |a: f64| PLOT_T + PLOT_H - (((a - bottom) / (top - bottom)).clamp(0.0, 1.0) * f64::from(PLOT_H)) as u32;
    let grey = Rgb([200, 200, 200]);
    let decades = (hi - lo) as u32;
    for d in 0..=decades {
        let x = PLOT_L + d * PLOT_W / decades;
        let label = format!("{}", 10f64.powf(lo + f64::from(d)));
        x_tick(&mut img, font, x, PLOT_H, if d == 0 { INK } else { grey }, &label);
    }
    let steps = ((top - bottom) * 20.0).round() as u32;
    for k in 0..=steps {
        let a = bottom + f64::from(k) * 0.05;
        let y = py(a);
        for x in PLOT_L..=PLOT_L + PLOT_W {
            img.put_pixel(x, y, if k == 0 { INK } else { grey });
        }
        text(
            &mut img,
            font,
            24.0,
            y as f32 - 7.0,
            11.0,
            INK,
            &format!("{:.0}%", a * 100.0),
        );
    }
    text(
        &mut img,
        font,
        (PLOT_L + PLOT_W / 2 - 90) as f32,
        (PLOT_T + PLOT_H + 22) as f32,
        12.0,
        INK,
        "decision latency p50, ms (log scale)",
    );
    let front_color = SERIES[0];
    let mut front: Vec<&Point> = points.iter().filter(|p| p.on_front).collect();
    front.sort_by(|a, b| a.latency_ms.total_cmp(&b.latency_ms));
    for pair in front.windows(2) {
        let (x0, y0, x1, y1) = (
            f64::from(px(pair[0].latency_ms)),
            f64::from(py(pair[0].accuracy)),
            f64::from(px(pair[1].latency_ms)),
            f64::from(py(pair[1].accuracy)),
        );
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1.0) as u32;
        for i in 0..=n {
            let t = f64::from(i) / f64::from(n);
            thick(
                &mut img,
                (x0 + t * (x1 - x0)) as u32,
                (y0 + t * (y1 - y0)) as u32,
                front_color,
            );
        }
    }
    for p in points {
        let color = if p.on_front { front_color } else { Rgb([120, 120, 120]) };
        let (x, y) = (px(p.latency_ms), py(p.accuracy));
        for dx in 0..9u32 {
            for dy in 0..9u32 {
                let (ox, oy) = (i64::from(dx) - 4, i64::from(dy) - 4);
                if ox * ox + oy * oy <= 16 && x + dx >= 4 && y + dy >= 4 && x + dx - 4 < W && y + dy - 4 < H {
                    img.put_pixel(x + dx - 4, y + dy - 4, color);
                }
            }
        }
        let label = format!("{} ({:.1}%)", p.name, p.accuracy * 100.0);
        text(&mut img, font, x as f32 + 8.0, y as f32 - 16.0, 11.0, INK, &label);
    }
    img.save(path).map_err(|source| PlotError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn thick(img: &mut RgbImage, x: u32, y: u32, color: Rgb<u8>) {
    for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
        if x + dx < img.width() && y + dy < img.height() {
            img.put_pixel(x + dx, y + dy, color);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_png_shades_cells_by_row_share() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let labels: Vec<String> = ["a", "b"].map(String::from).to_vec();
        confusion_png(&labels, &[vec![9, 1], vec![0, 0]], "t", &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.width(), LEFT + 2 * CELL + MARGIN);
        let center = |i: u32, j: u32| *img.get_pixel(LEFT + j * CELL + 3, TOP + i * CELL + 3);
        // 90% right: a dark blue; 10% wrong: a light red; an empty row stays white.
        assert!(center(0, 0).0[2] > center(0, 0).0[0] && center(0, 0).0[0] < 80);
        assert!(center(0, 1).0[0] > 240 && center(0, 1).0[1] < 240);
        assert_eq!(center(1, 1), WHITE);
    }

    #[test]
    fn cdf_png_draws_each_series_in_its_colour_left_of_the_slower_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cdf.png");
        let fast: Vec<f64> = (1..=50).map(f64::from).collect();
        let slow: Vec<f64> = (51..=100).map(f64::from).collect();
        cdf_png(&[("fast".into(), fast), ("slow".into(), slow)], "t", "ms", &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        let first_x = |c: Rgb<u8>| (0..img.width()).find(|&x| (48..348).any(|y| *img.get_pixel(x, y) == c));
        let (fast_x, slow_x) = (first_x(SERIES[0]).unwrap(), first_x(SERIES[1]).unwrap());
        assert!(fast_x < slow_x, "fast starts at {fast_x}, slow at {slow_x}");
    }

    #[test]
    fn pareto_png_puts_faster_models_left_and_colours_the_front() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let pt = |name: &str, latency_ms: f64, accuracy: f64, on_front: bool| Point {
            name: name.into(),
            latency_ms,
            accuracy,
            on_front,
        };
        let points = [
            pt("fast", 3.0, 0.90, true),
            pt("slow", 300.0, 0.92, true),
            pt("dominated", 100.0, 0.85, false),
        ];
        pareto_png(&points, "t", &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        let xs = |c: Rgb<u8>| -> Vec<u32> {
            (0..img.width())
                .filter(|&x| (0..img.height()).any(|y| *img.get_pixel(x, y) == c))
                .collect()
        };
        let red = xs(SERIES[0]);
        let grey = xs(Rgb([120, 120, 120]));
        assert!(!red.is_empty() && !grey.is_empty());
        // The front runs from the fast model to the slow one; the dominated dot lies between.
        assert!(red[0] < grey[0] && grey[0] < *red.last().unwrap(), "{red:?} {grey:?}");
    }
}
