//! PNG figures of the trainer's reports (the confusion matrix of `eval`).
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
}
