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

/// A marker: a ring of that radius, or a filled shape (pixel offsets).
type Mark = (u32, &'static [(i32, i32)]);

const SQUARE: Mark = (0, &[(-3, -3), (3, -3), (3, 3), (-3, 3)]);
const TRIANGLE: Mark = (0, &[(0, -6), (5, 3), (-5, 3)]);
const TRIANGLE_DOWN: Mark = (0, &[(0, 6), (5, -3), (-5, -3)]);
const DIAMOND: Mark = (0, &[(0, -6), (6, 0), (0, 6), (-6, 0)]);
const HEXAGON: Mark = (0, &[(-3, -5), (3, -5), (6, 0), (3, 5), (-3, 5), (-6, 0)]);

/// Each backend's colour and marker, all distinct so that series of equal
/// values stay apart (thinlayer's ring around thinlayer-warm's around the
/// floor's square).
const STYLES: [(&str, RGBColor, Mark); 7] = [
    ("thinlayer", rgb(0xd62728), (9, &[])),
    ("thinlayer-warm", rgb(0x8c564b), (6, &[])),
    ("floor", rgb(0x555555), SQUARE),
    ("overlay-ext4", rgb(0x1f77b4), TRIANGLE),
    ("overlay-xfs", rgb(0x2ca02c), TRIANGLE_DOWN),
    ("btrfs", rgb(0xff7f0e), DIAMOND),
    ("vfs-copy", rgb(0x9467bd), HEXAGON),
];

const fn rgb(hex: u32) -> RGBColor {
    let [_, r, g, b] = hex.to_be_bytes();
    RGBColor(r, g, b)
}

/// The colour and marker of backend `b`, the `i`th of the run (which picks
/// one for a name not listed).
fn style(b: &str, i: usize) -> (RGBColor, Mark) {
    let s = STYLES.iter().find(|s| s.0 == b);
    let s = s.unwrap_or(&STYLES[i % STYLES.len()]);
    (s.1, s.2)
}

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
    crate::docker::plots(report, out)
}

type Draw = std::result::Result<(), String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// A marker drawn at a point: its ring, then its shape.
type Marker<C, DB> = ComposedElement<C, DB, Circle<(i32, i32), u32>, Polygon<(i32, i32)>>;

/// A marker (`ring`, `shape`) in colour `c` at `p`.
fn marker<C, DB: DrawingBackend>((ring, shape): Mark, p: C, c: RGBColor) -> Marker<C, DB> {
    let style = if ring > 0 {
        c.stroke_width(2)
    } else {
        TRANSPARENT.filled()
    };
    EmptyElement::at(p)
        + Circle::new((0, 0), ring, style)
        + Polygon::new(shape.to_vec(), c.filled())
}

/// A line with markers per backend (points from `pts`), thinlayer's drawn
/// last and dashed, so that it stays on top and a series of equal values
/// (the floor's) shows through it.
/// The series' legend at `at`, over the (emptied) part of the chart there.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    at: SeriesLabelPosition,
) -> Draw {
    chart
        .configure_series_labels()
        .position(at)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(s)
}

fn series<'a, DB: DrawingBackend + 'a, CT: CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<'a, DB, CT>,
    r: &Report,
    pts: impl Fn(&str) -> Vec<(f64, f64)>,
) -> Draw {
    let mut order: Vec<usize> = (0..r.backends.len()).collect();
    order.sort_by_key(|&i| r.backends[i] == "thinlayer");
    for i in order {
        let b = r.backends[i].as_str();
        let ((c, m), pts) = (style(b, i), pts(b));
        let line = c.stroke_width(2);
        let anno = if b == "thinlayer" {
            chart.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, line))
        } else {
            chart.draw_series(LineSeries::new(pts.clone(), line))
        };
        anno.map_err(s)?.label(b).legend(move |(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new(vec![(0, 0), (20, 0)], line)
                + marker(m, (10, 0), c)
        });
        chart
            .draw_series(pts.iter().map(|&p| marker(m, p, c)))
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
        // The top 40% is left to the legend.
        .build_cartesian_2d((5f64..xmax).log_scale(), 0f64..ymax * 1.7)
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
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
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
        // The top third (log scale) is left to the legend.
        .build_cartesian_2d(
            (xmin..xmax).log_scale(),
            (0.001f64..0.001 * (ymax / 0.001).powf(1.5)).log_scale(),
        )
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
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
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
        let c = style(b, i).0;
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
