//! The training-curves PNG: four panels (loss per stage; KTO/DPO rewards; KTO's KL reference
//! point; the judge's desirable rate on held-out prompts over training), drawn with plotters'
//! bitmap backend. Labels use the built-in [`bitmap_font`] so no system font is needed.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::bitmap_font;
use super::metrics_log::MetricsLog;
use halo_kernels::error::{HaloError, Result};

/// One line of a panel.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Line colour.
    pub color: RGBColor,
    /// `(x, y)` points in drawing order (x = global step).
    pub points: Vec<(f64, f64)>,
}

/// One chart: a title and its lines (x = global step).
#[derive(Debug, Clone)]
pub struct Panel {
    /// Caption drawn above the chart.
    pub title: String,
    /// The lines, drawn in order.
    pub series: Vec<Series>,
}

/// Colour of each stage's lines.
pub fn stage_color(stage: &str) -> RGBColor {
    match stage {
        "pretrain" => RGBColor(110, 110, 110),
        "sft" => RGBColor(31, 119, 180),
        "kto" => RGBColor(214, 39, 40),
        "dpo" => RGBColor(44, 160, 44),
        _ => RGBColor(148, 103, 189),
    }
}

const STAGES: [&str; 4] = ["pretrain", "sft", "kto", "dpo"];

/// Training-step metrics are noisy per batch: the plot shows their trailing mean over this many steps.
const SMOOTHING_WINDOW: usize = 10;

/// Trailing mean of the last `window` values (fewer at the start).
pub fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

/// The four standard panels from a run's metrics.
pub fn training_panels(log: &MetricsLog) -> Vec<Panel> {
    let per_stage = |metric: &str| -> Vec<Series> {
        let window = if metric.starts_with("eval/") {
            1
        } else {
            SMOOTHING_WINDOW
        };
        STAGES
            .iter()
            .map(|stage| Series {
                label: stage.to_string(),
                color: stage_color(stage),
                points: smooth(&log.series(Some(stage), metric), window),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let mut rewards = Vec::new();
    for stage in ["kto", "dpo"] {
        let base = stage_color(stage);
        let light = RGBColor(base.0 / 2 + 110, base.1 / 2 + 110, base.2 / 2 + 110);
        for (metric, color, name) in [
            ("rewards/chosen", base, "chosen"),
            ("rewards/rejected", light, "rejected"),
        ] {
            let points = smooth(&log.series(Some(stage), metric), SMOOTHING_WINDOW);
            if !points.is_empty() {
                rewards.push(Series {
                    label: format!("{stage} {name}"),
                    color,
                    points,
                });
            }
        }
    }
    vec![
        Panel {
            title: "train loss (mean of 10 steps)".into(),
            series: per_stage("loss"),
        },
        Panel {
            title: "rewards (beta x logratio)".into(),
            series: rewards,
        },
        Panel {
            title: "kto kl (reference point z0)".into(),
            series: per_stage("kl"),
        },
        Panel {
            title: "desirable rate, held-out greedy".into(),
            series: per_stage("eval/desirable_rate"),
        },
    ]
}

/// Draws `panels` in a 2-column grid into a PNG at `path`.
pub fn render_png(path: &Path, panels: &[Panel], width: u32, height: u32) -> Result<()> {
    let fail = |e: String| HaloError::Io {
        path: path.display().to_string(),
        reason: format!("plot: {e}"),
    };
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let rows = panels.len().div_ceil(2).max(1);
    let areas = root.split_evenly((rows, 2));
    for (panel, area) in panels.iter().zip(&areas) {
        draw_panel(&root, area, panel).map_err(fail)?;
    }
    root.present().map_err(|e| fail(e.to_string()))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn draw_text(root: &Area, text: &str, x: i32, y: i32, color: &RGBColor) {
    bitmap_font::rasterize(text, x, y, 2, |px, py| {
        // Pixels outside the image are dropped by the backend; ignore them.
        let _ = root.draw_pixel((px, py), color);
    });
}

fn draw_panel(root: &Area, area: &Area, panel: &Panel) -> std::result::Result<(), String> {
    let (offset_x, offset_y) = area.get_base_pixel();
    let (w, _) = area.dim_in_pixel();
    let title_x = offset_x + (w as i32 - bitmap_font::text_width(&panel.title, 2) as i32) / 2;
    draw_text(root, &panel.title, title_x, offset_y + 8, &BLACK);

    let points = panel.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        draw_text(root, "no data", offset_x + 40, offset_y + 60, &BLACK);
        return Ok(());
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let (y0, y1) = (y0 - pad, y1 + pad);

    // No label areas: plotters' own text needs a font backend (it panics without one), so the
    // grid and tick labels are drawn by hand below.
    let mut chart = ChartBuilder::on(area)
        .margin_top(30)
        .margin_right(16)
        .margin_left(70)
        .margin_bottom(30)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    let grid = RGBColor(225, 225, 225);
    for i in 0..=4 {
        let x = x0 + (x1 - x0) * i as f64 / 4.0;
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        chart
            .draw_series([
                PathElement::new(vec![(x, y0), (x, y1)], grid),
                PathElement::new(vec![(x0, y), (x1, y)], grid),
            ])
            .map_err(|e| e.to_string())?;
    }
    chart
        .draw_series([PathElement::new(
            vec![(x0, y1), (x0, y0), (x1, y0)],
            BLACK.stroke_width(1),
        )])
        .map_err(|e| e.to_string())?;
    for series in &panel.series {
        chart
            .draw_series(LineSeries::new(
                series.points.iter().copied(),
                series.color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?;
    }

    // Tick labels (plotters' own labels need a font backend).
    for i in 0..=4 {
        let x = x0 + (x1 - x0) * i as f64 / 4.0;
        let (px, py) = chart.backend_coord(&(x, y0));
        let label = format_tick(x);
        let tw = bitmap_font::text_width(&label, 2) as i32;
        draw_text(root, &label, px - tw / 2, py + 8, &BLACK);
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        let (px, py) = chart.backend_coord(&(x0, y));
        let label = format_tick(y);
        let tw = bitmap_font::text_width(&label, 2) as i32;
        draw_text(root, &label, px - tw - 8, py - 5, &BLACK);
    }
    // Legend, top-left inside the plot.
    let (left, top) = chart.backend_coord(&(x0, y1));
    for (i, series) in panel.series.iter().enumerate() {
        let y = top + 8 + i as i32 * 16;
        root.draw(&PathElement::new(
            vec![(left + 8, y + 5), (left + 28, y + 5)],
            series.color.stroke_width(3),
        ))
        .map_err(|e| e.to_string())?;
        draw_text(root, &series.label, left + 34, y, &BLACK);
    }
    let (right, bottom) = chart.backend_coord(&(x1, y0));
    let x_title = "step";
    let tw = bitmap_font::text_width(x_title, 2) as i32;
    draw_text(
        root,
        x_title,
        right - tw,
        bottom - 16,
        &RGBColor(90, 90, 90),
    );
    Ok(())
}

fn format_tick(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 || a == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Renders the standard training plot of `log` to `path`.
pub fn plot_training(path: &Path, log: &MetricsLog) -> Result<()> {
    render_png(path, &training_panels(log), 1400, 900)
}
