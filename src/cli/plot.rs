//! `stats --plot FILE`: a branch's history as a picture (PNG, or SVG when
//! FILE ends in `.svg`): bytes stored per commit, compression ratio, and the
//! relative error of the stored weights and moments, each against the step.

use std::path::Path;

use anyhow::{Context, bail};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::repo::LogEntry;

const KEYFRAME: RGBColor = RGBColor(214, 39, 40);
const RESIDUAL: RGBColor = RGBColor(31, 119, 180);
const ROLE_COLOURS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

/// Draws `entries` (any order) into `path`.
pub fn plot_history(entries: &[LogEntry], branch: &str, path: &Path) -> anyhow::Result<()> {
    if entries.is_empty() {
        bail!("branch `{branch}` has no commits to plot");
    }
    let mut entries: Vec<&LogEntry> = entries.iter().collect();
    entries.sort_by_key(|e| e.step);
    let size = (1200, 1050);
    let drawn = if path.extension().is_some_and(|e| e == "svg") {
        draw(
            SVGBackend::new(path, size).into_drawing_area(),
            &entries,
            branch,
        )
    } else {
        draw(
            BitMapBackend::new(path, size).into_drawing_area(),
            &entries,
            branch,
        )
    };
    drawn.with_context(|| format!("{}: cannot draw the plot", path.display()))
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    entries: &[&LogEntry],
    branch: &str,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let plot_err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e}");
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root
        .titled(&format!("ckptvc: branch `{branch}`"), ("sans-serif", 26))
        .map_err(plot_err)?;
    let panels = root.split_evenly((3, 1));
    let first = entries[0].step;
    let last = entries[entries.len() - 1].step.max(first + 1);
    let steps = first as f64..last as f64 + (last - first) as f64 * 0.02;
    stored_panel(&panels[0], entries, steps.clone()).map_err(plot_err)?;
    ratio_panel(&panels[1], entries, steps.clone()).map_err(plot_err)?;
    error_panel(&panels[2], entries, steps).map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Reads one role's error from a log entry.
type ErrorOf = fn(&LogEntry) -> f32;

type Drawn<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn step_label(step: &f64) -> String {
    format!("{step:.0}")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn stored_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[&LogEntry],
    steps: std::ops::Range<f64>,
) -> Drawn<DB> {
    let top = entries
        .iter()
        .map(|e| mib(e.stored_bytes.max(e.input_bytes)))
        .fold(0.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("stored bytes per commit (MiB)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(70)
        .build_cartesian_2d(steps, 0.0..top.max(1e-6))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&step_label)
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            entries.iter().map(|e| (e.step as f64, mib(e.input_bytes))),
            BLACK.mix(0.4),
        ))?
        .label("input")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    chart
        .draw_series(LineSeries::new(
            entries.iter().map(|e| (e.step as f64, mib(e.stored_bytes))),
            RESIDUAL,
        ))?
        .label("stored (residual)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RESIDUAL));
    chart
        .draw_series(
            entries
                .iter()
                .filter(|e| e.keyframe)
                .map(|e| Circle::new((e.step as f64, mib(e.stored_bytes)), 5, KEYFRAME.filled())),
        )?
        .label("keyframe")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, KEYFRAME.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
}

fn ratio_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[&LogEntry],
    steps: std::ops::Range<f64>,
) -> Drawn<DB> {
    // A commit whose blobs were all stored already has an infinite ratio:
    // it is left out rather than flattening the axis.
    let points: Vec<(f64, f64)> = entries
        .iter()
        .filter(|e| e.ratio.is_finite())
        .map(|e| (e.step as f64, e.ratio))
        .collect();
    let top = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("compression ratio (input / stored)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(70)
        .build_cartesian_2d(steps, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&step_label)
        .draw()?;
    chart.draw_series(LineSeries::new(points.iter().copied(), RESIDUAL))?;
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, RESIDUAL.filled())))?;
    Ok(())
}

fn error_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[&LogEntry],
    steps: std::ops::Range<f64>,
) -> Drawn<DB> {
    let roles: [(&str, ErrorOf); 3] = [
        ("weights W", |e| e.error_w),
        ("exp_avg m", |e| e.error_m),
        ("exp_avg_sq v", |e| e.error_v),
    ];
    // Lossless commits have error 0, which a log axis cannot show: they are
    // left out, and an all-lossless history gets an explanatory caption.
    let positive = |v: f32| (v > 0.0 && v.is_finite()).then_some(f64::from(v));
    let values: Vec<f64> = entries
        .iter()
        .flat_map(|e| roles.iter().filter_map(move |(_, f)| positive(f(e))))
        .collect();
    let caption = if values.is_empty() {
        "relative L2 error: every commit is lossless (error 0)"
    } else {
        "relative L2 error of the stored tensors (lossless commits: 0, not shown)"
    };
    let lo = values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .min(1e-3)
        / 2.0;
    let hi = values.iter().copied().fold(0.0, f64::max).max(lo * 10.0) * 2.0;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(70)
        .build_cartesian_2d(steps, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&step_label)
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .draw()?;
    for ((label, role), colour) in roles.iter().zip(ROLE_COLOURS) {
        let points: Vec<(f64, f64)> = entries
            .iter()
            .filter_map(|e| Some((e.step as f64, positive(role(e))?)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), colour))?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
}
