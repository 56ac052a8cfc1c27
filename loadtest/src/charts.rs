//! The run in pictures (`--charts DIR`): SVG charts drawn with `plotters`, and the raw
//! latency histogram of every step as HdrHistogram's percentile text (`.hgrm`).
//!
//! The coordinator adds one [`Point`] per progress second to a [`Timeline`]; at the end
//! [`write`] draws, over run time, with one coloured series per measured step (ramp, warm-up
//! and drain in grey):
//! - `latency.svg`: p99 (solid) and p50 (light) publish → decoded latency of that second;
//! - `deliveries.svg`: messages delivered per second;
//! - `cpu.svg`: server CPU seconds per million deliveries (needs `--pids`/`--procs`);
//! - `connections.svg`: open viewer connections;
//! - `step-N.hgrm`: step N's whole latency histogram, for HdrHistogram's plotter and friends.
//!
//! Invariant: charts only read what the report already measured; drawing never changes a figure.

use crate::stats::Latency;
use anyhow::Context;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Chart size in pixels.
pub const CHART_WIDTH_PX: u32 = 900;
pub const CHART_HEIGHT_PX: u32 = 420;
/// Percentile ticks per halving of the distance to 100 % in `.hgrm` files (HdrHistogram's
/// own tools print 5).
pub const HGRM_TICKS_PER_HALF: u32 = 5;

/// One second of the run.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// Seconds since the run started.
    pub t_s: f64,
    /// The measured step (0: ramp, warm-up or drain).
    pub step: u32,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub deliveries_per_s: f64,
    pub connections: u64,
    /// Server CPU seconds per million deliveries in this second (`None`: no server pids, or
    /// nothing delivered).
    pub server_cpu_s_per_million: Option<f64>,
}

/// The run, second by second.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub points: Vec<Point>,
}

impl Timeline {
    pub fn push(&mut self, p: Point) {
        self.points.push(p);
    }

    /// Points grouped by step, in step order.
    fn by_step(&self) -> BTreeMap<u32, Vec<&Point>> {
        let mut m: BTreeMap<u32, Vec<&Point>> = BTreeMap::new();
        for p in &self.points {
            m.entry(p.step).or_default().push(p);
        }
        m
    }
}

/// Writes every chart and every step's `.hgrm` into `dir` (created if missing); returns the
/// files written.
pub fn write(
    dir: &Path,
    timeline: &Timeline,
    steps: &BTreeMap<u32, Latency>,
    rates: &BTreeMap<u32, u32>,
) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let label = |step: u32| match (step, rates.get(&step)) {
        (0, _) => "ramp / warm-up / drain".to_string(),
        (s, Some(r)) if *r > 0 => format!("step {s}: {r} msg/s"),
        (s, _) => format!("step {s}"),
    };
    let charts: [(&str, &str, &str, &[Metric]); 4] = [
        (
            "latency.svg",
            "latency, publish to decoded: p99 (solid) and p50 (light)",
            "ms",
            &[Metric::P99, Metric::P50],
        ),
        (
            "deliveries.svg",
            "deliveries per second",
            "deliveries/s",
            &[Metric::Deliveries],
        ),
        (
            "cpu.svg",
            "server CPU seconds per million deliveries",
            "CPU s / M",
            &[Metric::Cpu],
        ),
        (
            "connections.svg",
            "open connections",
            "connections",
            &[Metric::Connections],
        ),
    ];
    for (file, title, unit, metrics) in charts {
        let path = dir.join(file);
        draw(&path, title, unit, timeline, metrics, &label)
            .with_context(|| format!("drawing {}", path.display()))?;
        written.push(file.to_string());
    }
    for (step, h) in steps {
        // Only the report's steps: a run that stops early has already tagged a few windows
        // with the step it did not run.
        if *step == 0 || h.count() == 0 || !rates.contains_key(step) {
            continue;
        }
        let file = format!("step-{step}.hgrm");
        std::fs::write(dir.join(&file), hgrm(h))
            .with_context(|| format!("writing {}", dir.join(&file).display()))?;
        written.push(file);
    }
    Ok(written)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Metric {
    P50,
    P99,
    Deliveries,
    Cpu,
    Connections,
}

impl Metric {
    fn of(self, p: &Point) -> Option<f64> {
        match self {
            Metric::P50 => (p.step > 0).then_some(p.p50_ms),
            Metric::P99 => (p.step > 0).then_some(p.p99_ms),
            Metric::Deliveries => Some(p.deliveries_per_s),
            Metric::Cpu => p.server_cpu_s_per_million,
            Metric::Connections => Some(p.connections as f64),
        }
    }
}

/// Step 0 grey, then a palette that reads on white.
fn color(step: u32) -> RGBColor {
    const PALETTE: [RGBColor; 6] = [
        RGBColor(0xe0, 0x4a, 0x7a),
        RGBColor(0x1f, 0x8f, 0xc7),
        RGBColor(0xe0, 0x8e, 0x0b),
        RGBColor(0x2a, 0xa8, 0x6f),
        RGBColor(0x7c, 0x5c, 0xd6),
        RGBColor(0xc7, 0x3e, 0x3a),
    ];
    if step == 0 {
        RGBColor(0xa0, 0xa4, 0xb0)
    } else {
        PALETTE[(step as usize - 1) % PALETTE.len()]
    }
}

fn draw(
    path: &Path,
    title: &str,
    unit: &str,
    timeline: &Timeline,
    metrics: &[Metric],
    label: &dyn Fn(u32) -> String,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (CHART_WIDTH_PX, CHART_HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let t_max = timeline
        .points
        .iter()
        .map(|p| p.t_s)
        .fold(1.0_f64, f64::max);
    let y_max = timeline
        .points
        .iter()
        .flat_map(|p| metrics.iter().filter_map(|m| m.of(p)))
        .fold(0.0_f64, f64::max);
    // Headroom above the highest line keeps the legend (upper left) off the data.
    let y_max = if y_max > 0.0 { y_max * 1.3 } else { 1.0 };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("run time (s)")
        .y_desc(unit)
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| human(*v))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .draw()
        .map_err(plot_err)?;
    let mut any = false;
    for (i, &metric) in metrics.iter().enumerate() {
        // The first metric is the headline (solid, in the legend); later ones are lighter.
        let (alpha, width) = if i == 0 { (1.0, 2) } else { (0.45, 1) };
        for (step, points) in timeline.by_step() {
            let c = color(step);
            let style = c.mix(alpha).stroke_width(width);
            let mut first = i == 0;
            for run in runs(&points, metric) {
                any = true;
                let series = chart
                    .draw_series(LineSeries::new(run, style))
                    .map_err(plot_err)?;
                if first {
                    series.label(label(step)).legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 18, y)], c.stroke_width(3))
                    });
                    first = false;
                }
            }
        }
    }
    if any {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(0xcc, 0xcc, 0xcc))
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// An axis number: 350k, 1.2M, 12, 0.5.
fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The points of one step as line runs: a step's seconds are contiguous except step 0 (before
/// and after the steps), so the line breaks where time jumps and grey never bridges a step.
fn runs(points: &[&Point], metric: Metric) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    let mut last_t: Option<f64> = None;
    for p in points {
        let Some(v) = metric.of(p) else { continue };
        if last_t.is_some_and(|t| p.t_s - t > 1.5) {
            runs.push(Vec::new());
        }
        last_t = Some(p.t_s);
        if let Some(run) = runs.last_mut() {
            run.push((p.t_s, v));
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotters: {e:?}")
}

/// HdrHistogram's percentile distribution text, values in milliseconds.
pub fn hgrm(h: &Latency) -> String {
    let h = &h.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(HGRM_TICKS_PER_HALF) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            format!("{:>14.2}", 1.0 / (1.0 - q))
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "{:>12.3} {:>14.12} {:>10} {}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            total,
            inv
        );
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        s,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    // HdrHistogram's sub-bucket count: the power of two that holds 2 * 10^sigfig.
    let sub_buckets = (2.0 * 10f64.powi(i32::from(h.sigfig())))
        .log2()
        .ceil()
        .exp2();
    let _ = writeln!(
        s,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        sub_buckets
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline() -> Timeline {
        let mut t = Timeline::default();
        for i in 0..12 {
            let step = match i {
                0..=2 => 0,
                3..=6 => 1,
                7..=10 => 2,
                _ => 0,
            };
            t.push(Point {
                t_s: f64::from(i),
                step,
                p50_ms: 2.0 + f64::from(step),
                p99_ms: 8.0 + f64::from(step) * 3.0,
                deliveries_per_s: 1000.0 * f64::from(step),
                connections: 100,
                server_cpu_s_per_million: (step > 0).then_some(1.5),
            });
        }
        t
    }

    #[test]
    fn writes_every_chart_and_step_histogram() {
        let dir = std::env::temp_dir().join(format!("barrage-charts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut steps = BTreeMap::new();
        let mut h = Latency::default();
        for us in [500, 1_000, 2_000, 40_000] {
            h.record_us(us);
        }
        steps.insert(1, h.clone());
        steps.insert(2, Latency::default()); // empty: no file
        steps.insert(3, h.clone()); // not a reported step: no file
        let rates = BTreeMap::from([(1, 100), (2, 200)]);
        let files = write(&dir, &timeline(), &steps, &rates).unwrap();
        assert_eq!(
            files,
            [
                "latency.svg",
                "deliveries.svg",
                "cpu.svg",
                "connections.svg",
                "step-1.hgrm"
            ]
        );
        let svg = std::fs::read_to_string(dir.join("deliveries.svg")).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("step 1: 100 msg/s"), "legend names the step");
        assert!(svg.contains("step 2: 200 msg/s"));
        let hgrm = std::fs::read_to_string(dir.join("step-1.hgrm")).unwrap();
        assert!(hgrm.contains("Percentile"));
        assert!(hgrm.contains("Total count    =            4"), "{hgrm}");
        assert!(hgrm.contains("SubBuckets     =         2048"), "{hgrm}");
        let last = hgrm
            .lines()
            .rfind(|l| !l.starts_with('#') && !l.trim().is_empty())
            .unwrap();
        assert!(last.trim_start().starts_with("40.0"), "max 40 ms: {last}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn axis_numbers_are_short() {
        let got: Vec<String> = [0.0, 0.5, 12.0, 1500.0, 350_000.0, 2_400_000.0]
            .into_iter()
            .map(human)
            .collect();
        assert_eq!(got, ["0", "0.5", "12", "1.5k", "350k", "2.4M"]);
    }

    #[test]
    fn empty_run_still_draws() {
        let dir = std::env::temp_dir().join(format!("barrage-charts-empty-{}", std::process::id()));
        let files = write(
            &dir,
            &Timeline::default(),
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(files.len(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
