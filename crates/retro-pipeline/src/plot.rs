//! The loss curve (train loss in blue, validation loss in red, over steps) as a PNG beside the run.

use crate::error::{PipelineError, Result};
use crate::trainer::StepMetrics;
use plotters::prelude::*;
use std::path::Path;

pub fn loss_curve(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .map_err(|e| PipelineError::file(metrics, e.to_string()))?;
    let rows: Vec<StepMetrics> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
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
    let tmp = out.with_extension("tmp.png");
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(&tmp, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(20)
            .build_cartesian_2d(0.0..max_step, lo * 0.95..hi * 1.05)?;
        chart.draw_series(LineSeries::new(train.clone(), &BLUE))?;
        chart.draw_series(LineSeries::new(valid.clone(), RED.stroke_width(2)))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| PipelineError::file(out, format!("cannot draw the loss curve: {e}")))?;
    std::fs::rename(&tmp, out).map_err(|e| PipelineError::file(out, e.to_string()))
}
