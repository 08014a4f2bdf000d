//! The report as a PNG: for each workload, how many times faster than native local disk each
//! system is, in three panels (cold, hot with the page cache kept, hot from the system's own
//! cache), on a log scale where native is the line at 1.
//!
//! Drawn with plotters' bitmap backend and its pure-Rust font rasterizer (ab_glyph): no
//! fontconfig or freetype, only a TrueType file read at run time ([`FONT`], Debian's
//! `fonts-dejavu-core`).

use super::{Figure, Report};
use crate::workloads::Workload;
use anyhow::{Context, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// The font every label is drawn in.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const WIDTH: u32 = 1800;
const ROW_PX: u32 = 84;
/// Room left of the first panel for the workload names.
const LABELS_PX: u32 = 190;

/// The systems drawn, in their slot order within a row, and their colours.
const SYSTEMS: [(&str, RGBColor); 4] = [
    ("backend", RGBColor(140, 140, 140)),
    ("granary", RGBColor(230, 120, 20)),
    ("s3fs", RGBColor(40, 120, 200)),
    ("rclone", RGBColor(120, 60, 170)),
];

/// One panel: its title and the figure conditions it shows.
struct Panel {
    title: &'static str,
    shows: fn(&str) -> bool,
}

const PANELS: [Panel; 3] = [
    Panel {
        title: "cold (vs native, page cache dropped)",
        shows: |c| matches!(c, "cold" | "direct" | "epoch-1"),
    },
    Panel {
        title: "hot, page cache kept (vs native hot)",
        shows: |c| c == "hot-pagecache",
    },
    Panel {
        title: "hot, from the system's own cache (vs native hot)",
        shows: |c| c.ends_with("-cache") && c != "hot-pagecache" || c == "epoch-2",
    },
];

/// One bar: a system's speed relative to native, with its label.
struct Bar {
    slot: usize,
    ratio: f64,
    label: String,
}

/// Draws the chart of `report` into `path` (PNG).
pub fn draw(report: &Report, path: &Path) -> anyhow::Result<()> {
    load_font()?;
    let rows: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|w| report.figures.iter().any(|f| f.workload == *w))
        .collect();
    let bars = |panel: &Panel, workload: Workload| -> Vec<Bar> {
        report
            .figures
            .iter()
            .filter(|f| f.workload == workload && (panel.shows)(&f.condition))
            .filter_map(bar)
            .collect()
    };
    let ratios: Vec<f64> = PANELS
        .iter()
        .flat_map(|p| rows.iter().flat_map(move |&w| bars(p, w)))
        .map(|b| b.ratio)
        .collect();
    let decade = |x: f64, round: fn(f64) -> f64| 10f64.powf(round(x.log10()));
    let low = decade(ratios.iter().copied().fold(1.0, f64::min), f64::floor);
    // Room right of the longest bar for its label.
    let high = decade(ratios.iter().copied().fold(1.0, f64::max) * 4.0, f64::ceil);

    let height = 150 + ROW_PX * rows.len().max(1) as u32;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let (top, body) = root.split_vertically(110);
    let p = &report.profile;
    top.draw(&Text::new(
        format!(
            "granary-bench --{} ({}): speed relative to native local disk, log scale (1 = native, \
             right of it = faster)",
            p.label(),
            report.s3.name()
        ),
        (20, 14),
        ("sans-serif", 24).into_font(),
    ))
    .map_err(drawing)?;
    top.draw(&Text::new(
        format!(
            "{} MiB file, {} files of {} KiB; median of {} runs; granary {}; {} vCPU, {} GiB; \
             first-byte compares p50 latency, the others throughput; epochs: epoch 1 in the cold \
             panel, epoch 2 in the last",
            p.shape.large_bytes >> 20,
            p.shape.small_count,
            p.shape.small_bytes >> 10,
            p.runs,
            report.granary.git,
            report.machine.nproc,
            report.machine.memory_bytes >> 30
        ),
        (20, 48),
        ("sans-serif", 16).into_font().color(&RGBColor(80, 80, 80)),
    ))
    .map_err(drawing)?;
    draw_legend(&top)?;

    let body = body.margin(0, 10, LABELS_PX, 20);
    for (i, (area, panel)) in body
        .split_evenly((1, PANELS.len()))
        .iter()
        .zip(&PANELS)
        .enumerate()
    {
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(44)
            .build_cartesian_2d((low..high).log_scale(), 0f64..rows.len() as f64)
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_label_formatter(&|x| format!("{x}"))
            .x_desc("times native")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(drawing)?;
        for (r, &workload) in rows.iter().enumerate() {
            // Row r from the top: y from rows - r - 1 to rows - r.
            let top_y = (rows.len() - r) as f64;
            let slot_h = 0.86 / SYSTEMS.len() as f64;
            for b in bars(panel, workload) {
                let y1 = top_y - 0.07 - b.slot as f64 * slot_h;
                let y0 = y1 - slot_h * 0.85;
                let colour = SYSTEMS[b.slot].1;
                chart
                    .draw_series([Rectangle::new([(low, y0), (b.ratio, y1)], colour.filled())])
                    .map_err(drawing)?;
                chart
                    .draw_series([Text::new(
                        b.label,
                        (b.ratio * 1.08, (y0 + y1) / 2.0),
                        left_centred(13),
                    )])
                    .map_err(drawing)?;
            }
            if r > 0 {
                chart
                    .draw_series(LineSeries::new(
                        [(low, top_y), (high, top_y)],
                        RGBColor(220, 220, 220),
                    ))
                    .map_err(drawing)?;
            }
            if i == 0 {
                let (_, y) = chart.backend_coord(&(low, top_y - 0.5));
                root.draw(&Text::new(row_label(workload), (12, y), left_centred(15)))
                    .map_err(drawing)?;
            }
        }
        chart
            .draw_series(LineSeries::new(
                [(1.0, 0.0), (1.0, rows.len() as f64)],
                BLACK.stroke_width(2),
            ))
            .map_err(drawing)?;
    }
    root.present()
        .map_err(drawing)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A font of `size` pixels, anchored at the middle of the text's left side.
fn left_centred(size: u32) -> TextStyle<'static> {
    TextStyle::from(("sans-serif", size).into_font()).pos(Pos::new(HPos::Left, VPos::Center))
}

/// The bar of a measured figure of a drawn system.
fn bar(f: &Figure) -> Option<Bar> {
    let slot = SYSTEMS.iter().position(|(s, _)| *s == f.system)?;
    let s = f.summary.as_ref()?;
    let ratio = s.vs_native.filter(|r| *r > 0.0)?;
    let hits = s
        .hit_ratio
        .filter(|_| f.workload == Workload::Epochs)
        .map_or(String::new(), |h| format!(", hit {:.2}", h.median));
    Some(Bar {
        slot,
        ratio,
        label: format!("{}{hits}", super::number(ratio)),
    })
}

fn row_label(workload: Workload) -> String {
    let what = match workload {
        Workload::Random1 | Workload::Random4 => "256 KiB IOPS",
        Workload::FirstByte => "p50 latency",
        Workload::Epochs => "2x cache, files/s",
        w => w.unit(),
    };
    format!("{} ({what})", workload.name())
}

fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> anyhow::Result<()> {
    let mut x = 20;
    for (name, colour) in SYSTEMS {
        area.draw(&Rectangle::new([(x, 80), (x + 18, 96)], colour.filled()))
            .map_err(drawing)?;
        area.draw(&Text::new(
            name,
            (x + 24, 80),
            ("sans-serif", 16).into_font(),
        ))
        .map_err(drawing)?;
        x += 130;
    }
    area.draw(&Rectangle::new([(x, 87), (x + 18, 89)], BLACK.filled()))
        .map_err(drawing)?;
    area.draw(&Text::new(
        "native = 1",
        (x + 24, 80),
        ("sans-serif", 16).into_font(),
    ))
    .map_err(drawing)?;
    Ok(())
}

/// Registers [`FONT`] as plotters' sans-serif font.
fn load_font() -> anyhow::Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| {
        format!("cannot read the chart's font {FONT} (apt-get install fonts-dejavu-core)")
    })?;
    // plotters keeps registered fonts for the life of the process.
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes.leak())
        .map_err(|_| anyhow!("{FONT} is not a usable TrueType font"))
}

/// plotters' errors are generic over the backend; keep their text.
fn drawing(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}
