//! The PNGs the project writes, each with a title, labelled axes and a legend: the loss curve of a
//! run, and evaluation bits per byte by neighbour overlap. Text is drawn with DejaVu Sans, embedded.

use crate::error::{PipelineError, Result};
use crate::eval::{ConditionReport, EvalReport, OverlapBucket, Scores};
use crate::metrics::StepMetrics;
use plotters::prelude::*;
use std::path::Path;

const FONT: &str = "sans-serif";

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(PipelineError::invalid(
            "font",
            "DejaVu Sans",
            "the embedded font did not load",
        ))
    }
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Draws into `out` through a temporary file and rename, so a reader never sees half a PNG.
fn write_png(out: &Path, what: &str, draw: impl FnOnce(&Path) -> DrawResult) -> Result<()> {
    register_font()?;
    let tmp = out.with_extension("tmp.png");
    draw(&tmp).map_err(|e| PipelineError::file(out, format!("cannot draw the {what}: {e}")))?;
    std::fs::rename(&tmp, out).map_err(|e| PipelineError::io(out, e))
}

/// Every chart's legend, at `position` (plotters' default is `MiddleRight`): labels in `font_size`
/// on translucent white, so the lines behind stay visible, inside a black border.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
    font_size: i32,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, font_size))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Training loss (every step) and validation loss (every `eval_every` steps) against the step.
pub fn loss_curve(rows: &[StepMetrics], title: &str, out: &Path) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let train: Vec<(f64, f64)> = rows.iter().map(|m| (m.step as f64, m.loss)).collect();
    let valid: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|m| m.valid_loss.map(|v| (m.step as f64, v)))
        .collect();
    let max_step = train.iter().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = train
        .iter()
        .chain(&valid)
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    write_png(out, "loss curve", |tmp| {
        let root = BitMapBackend::new(tmp, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_step, lo * 0.95..hi * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("training step")
            .y_desc("cross-entropy (nats per token)")
            .label_style((FONT, 14))
            .draw()?;
        chart
            .draw_series(LineSeries::new(train.clone(), &BLUE))?
            .label("training loss (one batch)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(valid.clone(), RED.stroke_width(2)))?
            .label("validation loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        draw_legend(&mut chart, SeriesLabelPosition::MiddleRight, 14)?;
        root.present()?;
        Ok(())
    })
}

/// Bits per byte ON (each condition), OFF and baseline for each overlap bucket, as grouped bars.
pub fn overlap_plot(r: &EvalReport, out: &Path) -> Result<()> {
    let Some(first) = r.conditions.first() else {
        return Ok(());
    };
    let labels: Vec<String> = first
        .overlap
        .iter()
        .map(|b| match b.hi {
            Some(_) => b.label(),
            None => "first chunk".into(),
        })
        .collect();
    // (series name, colour, bpb per bucket)
    let mut series: Vec<(String, RGBColor, Vec<Option<f64>>)> = vec![];
    // One bar per bucket: the bits per byte of one score of each bucket.
    let bars = |c: &ConditionReport, score: fn(&OverlapBucket) -> Option<Scores>| {
        c.overlap
            .iter()
            .map(|b| score(b).map(|s| s.bits_per_byte))
            .collect::<Vec<_>>()
    };
    // (every neighbour read, gated) per condition: a dark and a light shade of one hue.
    let palette = [
        (RGBColor(31, 119, 180), RGBColor(158, 202, 225)),
        (RGBColor(44, 160, 44), RGBColor(161, 217, 155)),
    ];
    for (c, (dark, light)) in r.conditions.iter().zip(palette) {
        let name = c.condition.name();
        series.push((
            format!("RETRO on, {name} database"),
            dark,
            bars(c, |b| b.on),
        ));
        if c.gated.is_some() {
            let v = bars(c, |b| b.on_gated);
            series.push((format!("RETRO on, gated, {name} database"), light, v));
        }
    }
    series.push((
        "RETRO[OFF]".into(),
        RGBColor(214, 39, 40),
        bars(first, |b| b.off),
    ));
    if r.baseline.is_some() {
        let v = bars(first, |b| b.baseline);
        series.push(("baseline (no CCA)".into(), RGBColor(127, 127, 127), v));
    }
    // In-context retrieval with the first condition's neighbours: what RETRO is measured against.
    if first.in_context.is_some() {
        let v = bars(first, |b| b.in_context);
        let name = format!("in-context retrieval, {} database", first.condition.name());
        series.push((name, RGBColor(148, 103, 189), v));
    }
    let hi = series
        .iter()
        .flat_map(|s| s.2.iter().flatten())
        .fold(0.1f64, |a, &b| a.max(b));
    let nb = labels.len();
    let ns = series.len();
    write_png(out, "overlap plot", |tmp| {
        let root = BitMapBackend::new(tmp, (900, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Held-out bits per byte by chunk/neighbour overlap (K = {})",
                    r.k.unwrap_or(0)
                ),
                (FONT, 20),
            )
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..nb as f64, 0.0..hi * 1.25)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(nb * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 && i < nb {
                    labels[i].clone()
                } else {
                    String::new()
                }
            })
            .x_desc("longest common token run between chunk and neighbours, % of chunk_len")
            .y_desc("bits per byte")
            .label_style((FONT, 13))
            .draw()?;
        let w = 0.8 / ns as f64;
        for (si, (name, colour, v)) in series.iter().enumerate() {
            let colour = *colour;
            let bars = v.iter().enumerate().filter_map(|(b, y)| {
                let y = (*y)?;
                let x0 = b as f64 + 0.1 + si as f64 * w;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + w * 0.9, y)],
                    colour.filled(),
                ))
            });
            chart
                .draw_series(bars)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 15, y + 5)], colour.filled())
                });
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight, 14)?;
        root.present()?;
        Ok(())
    })
}

/// One line of a [`Panel`]: its legend, its points, and whether it is a reference (dashed grey).
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub reference: bool,
}

/// One chart of a [`panels`] figure, log-log: measurements scale by decades.
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub lines: Vec<Line>,
}

/// Charts side by side in a grid of `columns`, each with log axes, its own legend and title.
/// Lines with fewer than one point with positive coordinates are left out.
pub fn panels(title: &str, charts: &[Panel], columns: usize, out: &Path) -> Result<()> {
    let columns = columns.max(1);
    let rows = charts.len().div_ceil(columns).max(1);
    let colours = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
    ];
    write_png(out, "figure", |tmp| {
        let root = BitMapBackend::new(tmp, (520 * columns as u32, 400 * rows as u32 + 40))
            .into_drawing_area();
        root.fill(&WHITE)?;
        let (top, body) = root.split_vertically(40);
        top.titled(title, (FONT, 22))?;
        for (panel, area) in charts.iter().zip(body.split_evenly((rows, columns))) {
            let points = || {
                panel
                    .lines
                    .iter()
                    .flat_map(|l| &l.points)
                    .filter(|p| p.0 > 0.0 && p.1 > 0.0)
            };
            let (x0, x1) =
                points().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
            let (y0, y1) =
                points().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            if x0 > x1 || y0 > y1 {
                continue;
            }
            let mut chart = ChartBuilder::on(&area)
                .caption(&panel.title, (FONT, 17))
                .margin(12)
                .x_label_area_size(42)
                .y_label_area_size(62)
                .build_cartesian_2d(
                    (x0 / 1.5..x1 * 1.5).log_scale(),
                    (y0 / 1.5..y1 * 1.5).log_scale(),
                )?;
            chart
                .configure_mesh()
                .x_label_formatter(&|x| format!("{x:.0}"))
                .x_desc(panel.x_desc.as_str())
                .y_desc(panel.y_desc.as_str())
                .label_style((FONT, 13))
                .draw()?;
            let mut measured = 0;
            for line in &panel.lines {
                let pts: Vec<(f64, f64)> = line
                    .points
                    .iter()
                    .copied()
                    .filter(|p| p.0 > 0.0 && p.1 > 0.0)
                    .collect();
                if pts.is_empty() {
                    continue;
                }
                let style = if line.reference {
                    RGBColor(128, 128, 128).stroke_width(1)
                } else {
                    measured += 1;
                    colours[(measured - 1) % colours.len()].stroke_width(2)
                };
                let series = if line.reference {
                    chart.draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style))?
                } else {
                    chart.draw_series(LineSeries::new(pts.clone(), style))?;
                    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, style.filled())))?
                };
                series
                    .label(line.label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
            draw_legend(&mut chart, SeriesLabelPosition::UpperLeft, 13)?;
        }
        root.present()?;
        Ok(())
    })
}
