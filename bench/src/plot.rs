//! PNG figures of a load run, drawn with `plotters` into an RGB buffer and
//! encoded with `image`: the latency CDF (one curve per metric or per
//! server) and a timeline of throughput and latency per second.
//!
//! Text is rasterized with `ab_glyph` from a system TrueType font:
//! `FLYWHEEL_FONT`, else DejaVu Sans or Liberation Sans where distributions
//! install them. Without a font the figures are drawn without text (a
//! warning says so); the numbers are always in the JSON report.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// Fonts tried in order when `FLYWHEEL_FONT` is not set.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];
const SIZE: (u32, u32) = (960, 600);
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Register a font with plotters once; whether text can be drawn.
fn has_font() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let candidates = std::env::var("FLYWHEEL_FONT")
            .ok()
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(|p| (*p).to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // Fonts live as long as the process; plotters wants 'static.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!("no TrueType font found (set FLYWHEEL_FONT); figures are drawn without text");
        false
    })
}

/// One named set of samples.
pub struct Series<'a> {
    /// Legend text.
    pub name: String,
    /// Samples (milliseconds).
    pub values: &'a [f64],
}

/// Empirical CDFs of `series` (log-scaled milliseconds) to a PNG at `path`.
///
/// # Errors
/// Drawing or writing failures.
pub fn latency_cdf(path: &Path, title: &str, series: &[Series<'_>]) -> anyhow::Result<()> {
    let all = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| *v > 0.0);
    let (lo, hi) = all.fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    anyhow::ensure!(hi > 0.0, "no latency samples to plot");
    let (lo, hi) = (lo * 0.9, hi * 1.1);
    let text = has_font();
    render(path, |root| {
        let mut chart = ChartBuilder::on(&root)
            .margin(16)
            .caption(if text { title } else { "" }, ("sans-serif", 22))
            .x_label_area_size(if text { 44 } else { 8 })
            .y_label_area_size(if text { 56 } else { 8 })
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("latency (ms, log scale)").y_desc("share of requests <= x");
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw()?;
        for (i, s) in series.iter().enumerate() {
            let mut v: Vec<f64> = s.values.iter().copied().filter(|v| *v > 0.0).collect();
            v.sort_by(f64::total_cmp);
            let n = v.len() as f64;
            let color = PALETTE[i % PALETTE.len()];
            let line = chart.draw_series(LineSeries::new(
                v.iter().enumerate().map(|(k, &x)| (x, (k + 1) as f64 / n)),
                color.stroke_width(2),
            ))?;
            if text {
                line.label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
            }
        }
        if text && !series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 16))
                .draw()?;
        }
        Ok(())
    })
}

/// Per-second completions and latency quantiles, for [`timeline`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Second {
    /// Start of the second, from the start of the measurement.
    pub t_s: u32,
    /// Requests that started in this second and succeeded.
    pub requests: usize,
    /// Median latency of those requests (ms).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency of those requests (ms).
    pub p99_ms: Option<f64>,
}

/// Bucket `(start second, latency ms)` of successful requests by second.
pub fn per_second(samples: &[(f64, f64)], duration_s: f64) -> Vec<Second> {
    let seconds = duration_s.ceil().max(1.0) as usize;
    let mut buckets: Vec<Vec<f64>> = vec![Vec::new(); seconds];
    for &(at, ms) in samples {
        let i = (at.max(0.0) as usize).min(seconds - 1);
        buckets[i].push(ms);
    }
    buckets
        .into_iter()
        .enumerate()
        .map(|(t, mut v)| {
            v.sort_by(f64::total_cmp);
            let q = |q: f64| (!v.is_empty()).then(|| crate::stats::percentile(&v, q));
            Second {
                t_s: t as u32,
                requests: v.len(),
                p50_ms: q(0.5),
                p99_ms: q(0.99),
            }
        })
        .collect()
}

/// Throughput (requests/s, top) and p50/p99 latency (bottom) per second,
/// to a PNG at `path`.
///
/// # Errors
/// Drawing or writing failures.
pub fn timeline(path: &Path, title: &str, seconds: &[Second]) -> anyhow::Result<()> {
    anyhow::ensure!(!seconds.is_empty(), "no seconds to plot");
    let text = has_font();
    let end = seconds.len() as f64;
    let max_rps = seconds.iter().map(|s| s.requests).max().unwrap_or(0).max(1) as f64 * 1.1;
    let max_ms = seconds
        .iter()
        .filter_map(|s| s.p99_ms)
        .fold(0.0_f64, f64::max)
        .max(1e-3)
        * 1.1;
    render(path, |root| {
        let root = if text {
            root.titled(title, ("sans-serif", 22))?
        } else {
            root
        };
        let (top, bottom) = root.split_vertically(SIZE.1 / 2 - 20);
        let labels = |desc: &'static str| if text { desc } else { "" };
        let mut rps = ChartBuilder::on(&top)
            .margin(12)
            .x_label_area_size(if text { 30 } else { 8 })
            .y_label_area_size(if text { 64 } else { 8 })
            .build_cartesian_2d(0.0..end, 0.0..max_rps)?;
        let mut mesh = rps.configure_mesh();
        mesh.y_desc(labels("requests/s"));
        if !text {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw()?;
        rps.draw_series(LineSeries::new(
            seconds.iter().map(|s| (f64::from(s.t_s) + 0.5, s.requests as f64)),
            PALETTE[0].stroke_width(2),
        ))?;
        let mut lat = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(if text { 40 } else { 8 })
            .y_label_area_size(if text { 64 } else { 8 })
            .build_cartesian_2d(0.0..end, 0.0..max_ms)?;
        let mut mesh = lat.configure_mesh();
        mesh.x_desc(labels("time (s)")).y_desc(labels("latency (ms)"));
        if !text {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw()?;
        for (i, (name, pick)) in [
            ("p50", (|s: &Second| s.p50_ms) as fn(&Second) -> Option<f64>),
            ("p99", |s: &Second| s.p99_ms),
        ]
        .into_iter()
        .enumerate()
        {
            let color = PALETTE[i + 1];
            let line = lat.draw_series(LineSeries::new(
                seconds
                    .iter()
                    .filter_map(|s| pick(s).map(|v| (f64::from(s.t_s) + 0.5, v))),
                color.stroke_width(2),
            ))?;
            if text {
                line.label(name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
            }
        }
        if text {
            lat.configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 16))
                .draw()?;
        }
        Ok(())
    })
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Draw into an RGB buffer with `draw`, then write it as PNG.
fn render(
    path: &Path,
    draw: impl FnOnce(Area<'_>) -> Result<(), Box<dyn std::error::Error + '_>>,
) -> anyhow::Result<()> {
    let mut buf = vec![255_u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        draw(root.clone()).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let image = image::RgbImage::from_raw(SIZE.0, SIZE.1, buf).context("figure buffer size")?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    image
        .save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_bucket_by_start_time_with_their_own_percentiles() {
        let mut samples = vec![(0.1, 1.0), (0.5, 3.0), (0.9, 2.0), (1.2, 10.0)];
        samples.push((2.99, 5.0));
        let s = per_second(&samples, 3.0);
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].requests, s[0].p50_ms, s[0].p99_ms), (3, Some(2.0), Some(3.0)));
        assert_eq!((s[1].requests, s[1].p50_ms), (1, Some(10.0)));
        assert_eq!(s[2].requests, 1);
        // A request starting at the very end lands in the last second.
        assert_eq!(per_second(&[(3.0, 1.0)], 3.0)[2].requests, 1);
        assert_eq!(per_second(&[], 2.5).len(), 3);
    }

    #[test]
    fn figures_are_written_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let cdf = dir.path().join("out/cdf.png");
        let values: Vec<f64> = (1..=200).map(f64::from).collect();
        latency_cdf(
            &cdf,
            "route latency",
            &[Series {
                name: "latency".into(),
                values: &values,
            }],
        )
        .unwrap();
        let png = image::open(&cdf).unwrap();
        assert_eq!((png.width(), png.height()), SIZE);
        let samples: Vec<(f64, f64)> = values.iter().map(|v| (v / 50.0, *v)).collect();
        let line = dir.path().join("timeline.png");
        timeline(&line, "timeline", &per_second(&samples, 4.0)).unwrap();
        assert!(image::open(&line).is_ok());
        assert!(latency_cdf(&cdf, "empty", &[]).is_err());
    }
}
