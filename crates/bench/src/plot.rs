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
const STYLES: [(&str, RGBColor, Mark); 10] = [
    ("thinlayer", rgb(0xd62728), (9, &[])),
    ("thinlayer-warm", rgb(0x8c564b), (6, &[])),
    ("floor", rgb(0x555555), SQUARE),
    ("overlay-ext4", rgb(0x1f77b4), TRIANGLE),
    ("overlay-xfs", rgb(0x2ca02c), TRIANGLE_DOWN),
    ("btrfs", rgb(0xff7f0e), DIAMOND),
    ("vfs-copy", rgb(0x9467bd), HEXAGON),
    // containerd's own snapshotters (`--containerd`).
    ("overlayfs", rgb(0x1f77b4), TRIANGLE),
    ("native", rgb(0x9467bd), HEXAGON),
    ("devmapper", rgb(0x555555), SQUARE),
];

const fn rgb(hex: u32) -> RGBColor {
    let [_, r, g, b] = hex.to_be_bytes();
    RGBColor(r, g, b)
}

/// The colour and marker of backend `b`, the `i`th of the run (which picks
/// one for a name not listed).
pub(crate) fn style(b: &str, i: usize) -> (RGBColor, Mark) {
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
    if !report.backends.is_empty() {
        let f = out.join("start-vs-population.png");
        population(report, &f).map_err(plot_err(&f))?;
        let f = out.join("first-write-bytes.png");
        first_write(report, &f).map_err(plot_err(&f))?;
        let f = out.join("start-distribution.png");
        distribution(report, &f).map_err(plot_err(&f))?;
    }
    crate::docker::plots(report, out)?;
    crate::containerd::plots(report, out)
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

/// The plot's size, and the width of the legend panel at its right: the
/// legend never covers data.
const SIZE: (u32, u32) = (900, 500);
const LEGEND_WIDTH: u32 = 170;

/// The legend of series `names` in its own panel, right of the chart, in
/// drawing order.
pub(crate) fn legend_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    names: &[String],
) -> Draw {
    let font = ("sans-serif", 15).into_font();
    for (row, (i, b)) in names.iter().enumerate().enumerate() {
        let (c, m) = style(b, i);
        let y = 70 + 26 * i32::try_from(row).unwrap_or(0);
        let line = c.stroke_width(2);
        area.draw(&PathElement::new(vec![(8, y), (36, y)], line))
            .map_err(s)?;
        area.draw(&marker(m, (22, y), c)).map_err(s)?;
        area.draw(&Text::new(b.clone(), (46, y - 8), font.clone()))
            .map_err(s)?;
    }
    Ok(())
}

/// A line with markers per series of `names` (points from `pts`),
/// thinlayer's drawn last and dashed, so that it stays on top and a series
/// of equal values (the floor's) shows through it.
pub(crate) fn series<'a, DB: DrawingBackend + 'a, CT: CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<'a, DB, CT>,
    names: &[String],
    pts: impl Fn(&str) -> Vec<(f64, f64)>,
) -> Draw {
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by_key(|&i| names[i] == "thinlayer");
    for i in order {
        let b = names[i].as_str();
        let ((c, m), pts) = (style(b, i), pts(b));
        let line = c.stroke_width(2);
        if b == "thinlayer" {
            chart.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, line))
        } else {
            chart.draw_series(LineSeries::new(pts.clone(), line))
        }
        .map_err(s)?;
        chart
            .draw_series(pts.iter().map(|&p| marker(m, p, c)))
            .map_err(s)?;
    }
    Ok(())
}

/// `1,000` for 1000.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `16 MiB`, `1 GiB`, `192 KiB`, `0`: the largest binary unit that keeps
/// the number at least 1.
pub(crate) fn human_bytes(b: f64) -> String {
    if b <= 0.0 {
        return "0".into();
    }
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if (v - v.round()).abs() < 0.05 {
        format!("{} {}", v.round(), units[u])
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// `label` of each of `params`.
pub(crate) fn labels(params: &[u64], label: impl Fn(u64) -> String) -> Vec<String> {
    params.iter().map(|&p| label(p)).collect()
}

/// The x axis's labels of categories `names`, one per whole number.
fn categories(names: Vec<String>) -> impl Fn(&f64) -> String {
    // Ticks fall on whole numbers: the categories' indexes.
    move |x: &f64| {
        names
            .iter()
            .zip(0u32..)
            .find(|(_, i)| (x - f64::from(*i)).abs() < 0.01)
            .map(|(n, _)| n.clone())
            .unwrap_or_default()
    }
}

/// A chart of f64 by f64 on `area`.
pub(crate) type Chart<'a> = ChartContext<
    'a,
    BitMapBackend<'a>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// What a plot's axes say: the x axis's categories (one per whole
/// number), the y range, its ticks and their labels, and both captions.
pub(crate) struct Axes<'f> {
    pub(crate) categories: Vec<String>,
    pub(crate) y: std::ops::Range<f64>,
    pub(crate) y_ticks: usize,
    pub(crate) y_label: &'f dyn Fn(&f64) -> String,
    pub(crate) x_desc: &'f str,
    pub(crate) y_desc: &'f str,
}

/// The chart every plot here draws on, its mesh drawn: the categories
/// spread evenly along x, `pad` of a step beyond the first and the last.
pub(crate) fn category_chart<'a>(
    area: &DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
    caption: &str,
    pad: f64,
    axes: Axes<'_>,
) -> std::result::Result<Chart<'a>, String> {
    let n = axes.categories.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-pad..(n - 1) as f64 + pad, axes.y)
        .map_err(s)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&categories(axes.categories))
        .y_labels(axes.y_ticks)
        .y_label_formatter(axes.y_label)
        .x_desc(axes.x_desc)
        .y_desc(axes.y_desc)
        .draw()
        .map_err(s)?;
    Ok(chart)
}

/// The largest of `values`, at least `floor`.
pub(crate) fn max_or(floor: f64, values: impl Iterator<Item = f64>) -> f64 {
    values.fold(floor, f64::max)
}

/// The chart area and the legend panel of a plot at `file`.
pub(crate) type Areas<'a> = (
    DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
    DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
);

pub(crate) fn areas(file: &Path) -> std::result::Result<Areas<'_>, String> {
    let root = BitMapBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(s)?;
    Ok(root.split_horizontally(SIZE.0 - LEGEND_WIDTH))
}

fn population(r: &Report, file: &Path) -> Draw {
    let pops: Vec<u64> = r.params.populations.iter().map(|&p| p as u64).collect();
    let ymax = max_or(
        1.0,
        r.stats
            .iter()
            .filter(|s| s.workload == "population" && s.metric == "start-ms")
            .map(|st| st.median),
    );
    let (chart_area, legend_area) = areas(file)?;
    let mut chart = category_chart(
        &chart_area,
        "start path (snapshot + activate + mount) vs population",
        0.3,
        Axes {
            categories: labels(&pops, thousands),
            y: 0f64..ymax * 1.1,
            y_ticks: 10,
            y_label: &|y| format!("{y:.0}"),
            x_desc: "snapshots in the pool",
            y_desc: "median ms",
        },
    )?;
    series(&mut chart, &r.backends, |b| {
        pops.iter()
            .enumerate()
            .filter_map(|(i, &p)| {
                r.stat(b, "population", p, "start-ms")
                    .map(|st| (i as f64, st.median))
            })
            .collect()
    })?;
    legend_panel(&legend_area, &r.backends)?;
    chart_area.present().map_err(s)
}

/// The y position of `bytes` on a log2 axis in KiB, with 0 (which a log
/// axis cannot show) on its own row, `ZERO_ROW`, below 1 KiB.
pub(crate) fn log_kib(bytes: f64) -> f64 {
    if bytes < 1.0 {
        ZERO_ROW
    } else {
        (bytes / 1024.0).max(1.0 / 1024.0).log2()
    }
}

/// Where 0 bytes sit: a row of its own, labelled `0`, a step below 1 KiB.
const ZERO_ROW: f64 = ZERO_ROW_STEP as f64;
const ZERO_ROW_STEP: i32 = -4;

fn first_write(r: &Report, file: &Path) -> Draw {
    let sizes = &r.params.file_sizes;
    let ymax = max_or(
        1.0,
        r.stats
            .iter()
            .filter(|s| s.workload == "first-write" && s.metric == "alloc-bytes")
            .map(|st| log_kib(st.median)),
    );
    // The axis ends one step above the first labelled row (every 4 steps
    // of log2: 16x) at or over the largest value.
    let top_step = (0..16)
        .map(|k| 4 * k)
        .find(|&k| f64::from(k) >= ymax)
        .unwrap_or(64)
        + 1;
    let top = f64::from(top_step);
    let (chart_area, legend_area) = areas(file)?;
    // Ticks every 16x (4 steps of log2), and the zero row.
    let rows = usize::try_from((top_step - ZERO_ROW_STEP) / 2 + 1).unwrap_or(1);
    let mut chart = category_chart(
        &chart_area,
        "bytes newly allocated by the first 4 KiB write",
        0.3,
        Axes {
            categories: labels(sizes, |z| human_bytes(z as f64)),
            y: ZERO_ROW - 1.0..top,
            y_ticks: rows,
            y_label: &|y| {
                let k = y.round();
                if (y - k).abs() > 0.01 {
                    String::new()
                } else if k == ZERO_ROW {
                    "0".into()
                } else if k >= 0.0 && k.rem_euclid(4.0) == 0.0 {
                    human_bytes(1024.0 * 2f64.powf(k))
                } else {
                    String::new()
                }
            },
            x_desc: "size of the lower-layer file",
            y_desc: "allocated (median, log scale)",
        },
    )?;
    series(&mut chart, &r.backends, |b| {
        sizes
            .iter()
            .enumerate()
            .filter_map(|(i, &z)| {
                r.stat(b, "first-write", z, "alloc-bytes")
                    .map(|st| (i as f64, log_kib(st.median)))
            })
            .collect()
    })?;
    legend_panel(&legend_area, &r.backends)?;
    chart_area.present().map_err(s)
}

fn distribution(r: &Report, file: &Path) -> Draw {
    let ymax = max_or(
        1.0,
        r.samples
            .iter()
            .filter(|x| x.workload == "start" && x.metric == "start-ms")
            .map(|sm| sm.value),
    );
    // The backends are the x axis's categories: no legend needed.
    let root = BitMapBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(s)?;
    let mut chart = category_chart(
        &root,
        "start path latency, every sample (bar: median)",
        0.5,
        Axes {
            categories: r.backends.clone(),
            y: 0f64..ymax * 1.1,
            y_ticks: 10,
            y_label: &|y| format!("{y:.0}"),
            x_desc: "",
            y_desc: "ms",
        },
    )?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Params, report::Sample};

    #[test]
    fn labels_read_as_people_write_them() {
        assert_eq!(thousands(10), "10");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(human_bytes(16.0 * 1048576.0), "16 MiB");
        assert_eq!(human_bytes(1073741824.0), "1 GiB");
        assert_eq!(human_bytes(196_608.0), "192 KiB");
        assert_eq!(human_bytes(0.0), "0");
        let x = categories(labels(&[16 << 20, 256 << 20, 1 << 30], |z| {
            human_bytes(z as f64)
        }));
        assert_eq!(
            [x(&0.0), x(&1.0), x(&2.0), x(&0.5)],
            ["16 MiB", "256 MiB", "1 GiB", ""]
        );
    }

    #[test]
    fn zero_keeps_a_row_of_its_own_on_the_log_axis() {
        assert_eq!(log_kib(0.0), ZERO_ROW);
        assert_eq!(log_kib(1024.0), 0.0);
        assert_eq!(log_kib(65536.0), 6.0);
        assert!(
            log_kib(512.0) > ZERO_ROW,
            "below 1 KiB but not zero: above the zero row"
        );
    }

    /// The run's plots, drawn from figures of a real run (docs/bench): every
    /// file is written. `THINLAYER_PLOTS_TO=DIR` keeps them for a look.
    #[test]
    fn plots_are_drawn_with_zero_values_and_every_backend() {
        let backends = [
            "thinlayer",
            "thinlayer-warm",
            "floor",
            "overlay-ext4",
            "overlay-xfs",
            "btrfs",
            "vfs-copy",
        ];
        let start = [39.8, 18.9, 37.7, 5.2, 3.6, 9.7, 65.1];
        let alloc = [
            196_608.0, 196_608.0, 196_608.0, 0.0, 131_072.0, 69_632.0, 0.0,
        ];
        let mut samples = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            for (j, p) in [10u64, 100, 1000].into_iter().enumerate() {
                let v = start[i] * (1.0 + 0.1 * j as f64);
                samples.push(Sample {
                    backend: (*b).into(),
                    workload: "population".into(),
                    param: p,
                    metric: "start-ms".into(),
                    value: v,
                });
                samples.push(Sample {
                    backend: (*b).into(),
                    workload: "start".into(),
                    param: 0,
                    metric: "start-ms".into(),
                    value: v,
                });
            }
            for z in [16u64 << 20, 256 << 20, 1 << 30] {
                // overlay on ext4 copies the whole file.
                let v = if *b == "overlay-ext4" {
                    z as f64
                } else {
                    alloc[i]
                };
                samples.push(Sample {
                    backend: (*b).into(),
                    workload: "first-write".into(),
                    param: z,
                    metric: "alloc-bytes".into(),
                    value: v,
                });
            }
        }
        let mut params = Params::new(false);
        params.populations = vec![10, 100, 1000];
        params.file_sizes = vec![16 << 20, 256 << 20, 1 << 30];
        let mut r = Report {
            quick: false,
            params,
            backends: backends.iter().map(|b| (*b).into()).collect(),
            disk: None,
            kernel: String::new(),
            samples,
            stats: Vec::new(),
            notes: Vec::new(),
            phases: Vec::new(),
            wall_seconds: 0.0,
        };
        r.compute_stats();
        let out = std::env::var_os("THINLAYER_PLOTS_TO").map_or_else(
            || std::env::temp_dir().join(format!("tl-plots-{}", std::process::id())),
            std::path::PathBuf::from,
        );
        std::fs::create_dir_all(&out).unwrap();
        all(&r, &out).unwrap();
        for f in [
            "start-vs-population.png",
            "first-write-bytes.png",
            "start-distribution.png",
        ] {
            let len = std::fs::metadata(out.join(f)).map(|m| m.len()).unwrap_or(0);
            assert!(len > 1000, "{f}: {len} bytes");
        }
        if std::env::var_os("THINLAYER_PLOTS_TO").is_none() {
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
}
