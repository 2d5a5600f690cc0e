//! PNG plots with plotters' bitmap backend. Text is drawn with DejaVu Sans
//! compiled into the binary (Debian's fonts-dejavu-core at build time,
//! ab_glyph at run time), so the guest needs no fontconfig.

use std::path::Path;

use plotters::{element::ComposedElement, prelude::*};

use crate::{
    error::{Error, Result},
    report::Report,
};

static FONT: &[u8] = include_bytes!("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");

const COLORS: [RGBColor; 6] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x55, 0x55, 0x55),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
];

fn plot_err(file: &Path) -> impl Fn(String) -> Error + '_ {
    move |detail| Error::Plot {
        file: file.display().to_string(),
        detail,
    }
}

/// Draws every plot into `out`.
///
/// # Errors
/// [`Error::Plot`].
pub(crate) fn all(report: &Report, out: &Path) -> Result<()> {
    // Registering twice (a second run in one process) is harmless.
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).map_err(|_| {
        Error::Plot {
            file: "DejaVuSans.ttf".into(),
            detail: "the compiled-in font does not parse".into(),
        }
    })?;
    let f = out.join("start-vs-population.png");
    population(report, &f).map_err(plot_err(&f))?;
    let f = out.join("first-write-bytes.png");
    first_write(report, &f).map_err(plot_err(&f))?;
    let f = out.join("start-distribution.png");
    distribution(report, &f).map_err(plot_err(&f))?;
    Ok(())
}

type Draw = std::result::Result<(), String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Backend `i`'s marker at `p`, a shape of its own so that series of
/// equal values stay apart: thinlayer's (0) is a ring around the others'.
fn marker<C, DB: DrawingBackend>(
    i: usize,
    p: C,
    c: RGBColor,
) -> ComposedElement<C, DB, Circle<(i32, i32), i32>, Polygon<(i32, i32)>> {
    let shape: &[(i32, i32)] = match i % COLORS.len() {
        0 => &[],
        1 => &[(-4, -4), (4, -4), (4, 4), (-4, 4)],
        2 => &[(0, -6), (5, 3), (-5, 3)],
        3 => &[(0, 6), (5, -3), (-5, -3)],
        4 => &[(0, -6), (6, 0), (0, 6), (-6, 0)],
        _ => &[
            (-2, -5),
            (2, -5),
            (5, -2),
            (5, 2),
            (2, 5),
            (-2, 5),
            (-5, 2),
            (-5, -2),
        ],
    };
    let ring = if shape.is_empty() {
        c.stroke_width(2)
    } else {
        TRANSPARENT.filled()
    };
    EmptyElement::at(p) + Circle::new((0, 0), 7, ring) + Polygon::new(shape.to_vec(), c.filled())
}

/// A line with markers per backend (points from `pts`), thinlayer's drawn
/// last and dashed, so that it stays on top and a series of equal values
/// (the floor's) shows through it.
fn series<'a, DB: DrawingBackend + 'a, CT: CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<'a, DB, CT>,
    r: &Report,
    pts: impl Fn(&str) -> Vec<(f64, f64)>,
) -> Draw {
    let mut order: Vec<usize> = (0..r.backends.len()).collect();
    order.sort_by_key(|&i| r.backends[i] == "thinlayer");
    for i in order {
        let b = r.backends[i].as_str();
        let (pts, c) = (pts(b), COLORS[i % COLORS.len()]);
        let line = c.stroke_width(2);
        let anno = if b == "thinlayer" {
            chart.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, line))
        } else {
            chart.draw_series(LineSeries::new(pts.clone(), line))
        };
        anno.map_err(s)?.label(b).legend(move |(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new(vec![(0, 0), (20, 0)], line)
                + marker(i, (10, 0), c)
        });
        chart
            .draw_series(pts.iter().map(|&p| marker(i, p, c)))
            .map_err(s)?;
    }
    Ok(())
}

fn population(r: &Report, file: &Path) -> Draw {
    let pops: Vec<u64> = r.params.populations.iter().map(|&p| p as u64).collect();
    let mut ymax: f64 = 1.0;
    for st in r
        .stats
        .iter()
        .filter(|s| s.workload == "population" && s.metric == "start-ms")
    {
        ymax = ymax.max(st.median);
    }
    let root = BitMapBackend::new(file, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(s)?;
    let xmax = *pops.last().unwrap_or(&10) as f64 * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "start path (snapshot + activate + mount) vs population",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((5f64..xmax).log_scale(), 0f64..ymax * 1.15)
        .map_err(s)?;
    chart
        .configure_mesh()
        .x_desc("snapshots in the pool")
        .y_desc("median ms")
        .draw()
        .map_err(s)?;
    series(&mut chart, r, |b| {
        pops.iter()
            .filter_map(|&p| {
                r.stat(b, "population", p, "start-ms")
                    .map(|st| (p as f64, st.median))
            })
            .collect()
    })?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(s)?;
    root.present().map_err(s)
}

fn first_write(r: &Report, file: &Path) -> Draw {
    let sizes = &r.params.file_sizes;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let xmin = mib(*sizes.first().unwrap_or(&(1 << 20))) / 1.5;
    let xmax = mib(*sizes.last().unwrap_or(&(1 << 20))) * 1.5;
    let mut ymax: f64 = 1.0;
    for st in r
        .stats
        .iter()
        .filter(|s| s.workload == "first-write" && s.metric == "alloc-bytes")
    {
        ymax = ymax.max(st.median / (1u64 << 20) as f64);
    }
    let root = BitMapBackend::new(file, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(s)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "bytes newly allocated by the first 4 KiB write",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), (0.001f64..ymax * 3.0).log_scale())
        .map_err(s)?;
    chart
        .configure_mesh()
        .x_desc("size of the lower-layer file (MiB)")
        .y_desc("MiB allocated (median; floor 1 KiB)")
        .draw()
        .map_err(s)?;
    series(&mut chart, r, |b| {
        sizes
            .iter()
            .filter_map(|&z| {
                r.stat(b, "first-write", z, "alloc-bytes")
                    .map(|st| (mib(z), (st.median / (1u64 << 20) as f64).max(0.001)))
            })
            .collect()
    })?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(s)?;
    root.present().map_err(s)
}

fn distribution(r: &Report, file: &Path) -> Draw {
    let mut ymax: f64 = 1.0;
    for sm in r
        .samples
        .iter()
        .filter(|x| x.workload == "start" && x.metric == "start-ms")
    {
        ymax = ymax.max(sm.value);
    }
    let n = r.backends.len();
    let root = BitMapBackend::new(file, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(s)?;
    let names = r.backends.clone();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "start path latency, every sample (bar: median)",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..ymax * 1.1)
        .map_err(s)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            // Ticks fall on whole numbers: the backends' indexes.
            names
                .iter()
                .enumerate()
                .find(|(i, _)| (x - *i as f64).abs() < 0.01)
                .map(|(_, n)| n.clone())
                .unwrap_or_default()
        })
        .y_desc("ms")
        .draw()
        .map_err(s)?;
    for (i, b) in r.backends.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let vals: Vec<f64> = r
            .samples
            .iter()
            .filter(|x| &x.backend == b && x.workload == "start" && x.metric == "start-ms")
            .map(|x| x.value)
            .collect();
        let k = vals.len().max(1) as f64;
        chart
            .draw_series(vals.iter().enumerate().map(|(j, &v)| {
                let dx = (j as f64 / k - 0.5) * 0.5;
                Circle::new((i as f64 + dx, v), 3, c.filled())
            }))
            .map_err(s)?;
        if let Some(st) = r.stat(b, "start", 0, "start-ms") {
            let x = i as f64;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x - 0.35, st.median), (x + 0.35, st.median)],
                    BLACK.stroke_width(2),
                )))
                .map_err(s)?;
        }
    }
    root.present().map_err(s)
}
