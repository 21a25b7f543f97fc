//! The Markdown summary of a run of many seeds, with two plots (SVG): the share of flows
//! misattributed per minute, legacy against tenure, and the share tenure left
//! unattributed.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::check::Minute;
use crate::runner::Summary;
use crate::world::{ratio, RunOutcome};

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("writing {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("plotting {path}: {why}")]
    Plot { path: String, why: String },
}

/// Sums the per-minute timelines of all seeds.
fn timeline(outcomes: &[RunOutcome]) -> Vec<Minute> {
    let mut total: Vec<Minute> = Vec::new();
    for o in outcomes {
        for (m, minute) in o.timeline.iter().enumerate() {
            while total.len() <= m {
                total.push(Minute {
                    legacy_wrong: vec![0; minute.legacy_wrong.len()],
                    ..Minute::default()
                });
            }
            let t = &mut total[m];
            t.flows += minute.flows;
            t.tenure_wrong += minute.tenure_wrong;
            t.tenure_unattributed += minute.tenure_unattributed;
            for (a, b) in t.legacy_wrong.iter_mut().zip(&minute.legacy_wrong) {
                *a += b;
            }
        }
    }
    total
}

fn plot(path: &Path, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<(), ReportError> {
    let err = |why: String| ReportError::Plot {
        path: path.display().to_string(),
        why,
    };
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let x_max = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(0.01, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("minute of the run")
        .y_desc("share of flows")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color))
            .map_err(|e| err(e.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Writes `summary.md`, `misattribution.svg` and `unattributed.svg` into `dir`.
pub fn write(
    dir: &Path,
    scenario_path: &Path,
    outcomes: &[RunOutcome],
    summary: &Summary,
    wall_s: f64,
) -> Result<(), ReportError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ReportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let minutes = timeline(outcomes);
    let mut misattribution = vec![(
        "tenure".to_owned(),
        minutes
            .iter()
            .enumerate()
            .map(|(m, t)| (m as f64, ratio(t.tenure_wrong, t.flows)))
            .collect::<Vec<_>>(),
    )];
    for (v, (hold, _, _)) in summary.legacy.iter().enumerate() {
        misattribution.push((
            format!("legacy, hold-back {} s", hold / 1_000),
            minutes
                .iter()
                .enumerate()
                .map(|(m, t)| {
                    (
                        m as f64,
                        ratio(t.legacy_wrong.get(v).copied().unwrap_or(0), t.flows),
                    )
                })
                .collect(),
        ));
    }
    plot(
        &dir.join("misattribution.svg"),
        "Misattributed flows per minute",
        &misattribution,
    )?;
    let unattributed = vec![(
        "tenure unattributed".to_owned(),
        minutes
            .iter()
            .enumerate()
            .map(|(m, t)| (m as f64, ratio(t.tenure_unattributed, t.flows)))
            .collect::<Vec<_>>(),
    )];
    plot(
        &dir.join("unattributed.svg"),
        "Flows tenure left unattributed per minute (faults first, then healed)",
        &unattributed,
    )?;
    let mut md = String::new();
    let _ = writeln!(md, "# tenure-sim report\n");
    let _ = writeln!(
        md,
        "Scenario `{}`, {} seeds, {:.1} s wall time.\n",
        scenario_path.display(),
        summary.seeds,
        wall_s
    );
    let _ = writeln!(md, "```\n{}\n```\n", summary.result_line());
    let _ = writeln!(
        md,
        "| | flows | wrong | wrong share | dependencies reported | wrong dependencies | share |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    let deps = |i: usize| summary.dependencies.get(i).copied().unwrap_or((0, 0));
    let (tr, tw) = deps(0);
    let _ = writeln!(
        md,
        "| tenure | {} | {} | {:.4} | {tr} | {tw} | {:.4} |",
        summary.emitted,
        summary.misattributed,
        ratio(summary.misattributed, summary.emitted),
        ratio(tw, tr)
    );
    for (v, (hold, flows, wrong)) in summary.legacy.iter().enumerate() {
        let (r, w) = deps(v + 1);
        let _ = writeln!(
            md,
            "| legacy, hold-back {} s | {flows} | {wrong} | {:.4} | {r} | {w} | {:.4} |",
            hold / 1_000,
            ratio(*wrong, *flows),
            ratio(w, r)
        );
    }
    let _ = writeln!(
        md,
        "\nUnattributed (tenure): {} of {} emitted flows; {} of {} flows well inside heartbeat-covered ranges after healing ({:.4}).\n",
        summary.unattributed, summary.emitted, summary.bounded_unattributed, summary.bounded_flows, summary.unattributed_share()
    );
    let _ = writeln!(
        md,
        "![misattribution](misattribution.svg)\n\n![unattributed](unattributed.svg)\n"
    );
    let _ = writeln!(
        md,
        "## Seeds\n\n| seed | flows | unattributed | faults | outcome |\n|---|---|---|---|---|"
    );
    for o in outcomes {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            o.seed,
            o.stats.flows,
            o.stats.unattributed,
            o.stats.faults.join(", "),
            o.violation
                .as_ref()
                .map_or_else(|| "ok".to_owned(), ToString::to_string)
        );
    }
    let path = dir.join("summary.md");
    std::fs::write(&path, md).map_err(io(&path))?;
    Ok(())
}
