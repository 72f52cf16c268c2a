//! SVG line charts for the load-test report: a time axis in seconds with ticks, a value
//! axis with ticks and its unit, a legend, and event markers (the autoscaler's orders,
//! promotions and releases) drawn across the plot so cause and effect share one timeline.
//!
//! Hand-written because it is a few dozen lines of SVG and the report must stay one
//! self-contained file with no script; the scaling arithmetic is pure and tested.

use std::fmt::Write as _;

/// One line of a chart: a value per second of the run.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub values: &'a [f64],
}

/// A vertical marker at one second of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub second: usize,
    pub label: String,
    pub color: &'static str,
}

/// A chart to draw.
pub struct Chart<'a> {
    /// What the chart shows; becomes the SVG's `<title>` and `data-chart` attribute.
    pub id: &'a str,
    /// The value axis' unit, printed beside its ticks (`ms`, `/s`, `nodes`).
    pub unit: &'a str,
    pub series: &'a [Series<'a>],
    pub markers: &'a [Marker],
    /// The values are counts: ticks on whole numbers.
    pub counts: bool,
}

const W: f64 = 760.0;
const H: f64 = 250.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 34.0;

/// A step between ticks of 1, 2 or 5 times a power of ten that puts about `ticks` ticks
/// on `0..=max`.
pub fn nice_step(max: f64, ticks: usize) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / ticks.max(1) as f64;
    let power = 10f64.powf(raw.log10().floor());
    let fraction = raw / power;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * power
}

/// The ticks of an axis from 0 to at least `max`, at least `min_step` apart (1 for
/// seconds and counts: half a node is not a reading): `(values, top of the axis)`.
pub fn ticks(max: f64, wanted: usize, min_step: f64) -> (Vec<f64>, f64) {
    let step = nice_step(max, wanted).max(min_step);
    let top = ((max / step).ceil() * step).max(step);
    let n = (top / step).round() as usize;
    ((0..=n).map(|i| i as f64 * step).collect(), top)
}

/// A tick label without trailing zeros (`0.5`, `2`, `1500`).
fn label(v: f64) -> String {
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&#39;")
}

impl Chart<'_> {
    /// The chart as an inline `<svg>` element.
    pub fn svg(&self) -> String {
        let seconds = self
            .series
            .iter()
            .map(|s| s.values.len())
            .max()
            .unwrap_or(0)
            .max(2);
        let max = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let (y_ticks, y_top) = ticks(max, 5, if self.counts { 1.0 } else { 0.0 });
        let (x_ticks, _) = ticks((seconds - 1) as f64, 10, 1.0);
        let plot_w = W - LEFT - RIGHT;
        let plot_h = H - TOP - BOTTOM;
        let x = |s: f64| LEFT + s / (seconds - 1) as f64 * plot_w;
        let y = |v: f64| TOP + plot_h - v / y_top * plot_h;
        let mut out = format!(
            "<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' viewBox='0 0 {W} {H}' \
             data-chart='{id}' font-family='sans-serif' font-size='11'><title>{id}</title>",
            id = escape(self.id)
        );
        // Value axis: grid lines and ticks.
        out.push_str("<g class='y-axis'>");
        for v in &y_ticks {
            let py = y(*v);
            let _ = write!(
                out,
                "<line x1='{LEFT}' x2='{:.1}' y1='{py:.1}' y2='{py:.1}' stroke='#e5e5e5'/>\
                 <text x='{:.1}' y='{:.1}' text-anchor='end'>{} {}</text>",
                W - RIGHT,
                LEFT - 4.0,
                py + 4.0,
                label(*v),
                escape(self.unit)
            );
        }
        out.push_str("</g>");
        // Time axis.
        let base = TOP + plot_h;
        let _ = write!(
            out,
            "<g class='x-axis'><line x1='{LEFT}' x2='{:.1}' y1='{base:.1}' y2='{base:.1}' stroke='#444'/>",
            W - RIGHT
        );
        for s in x_ticks.iter().filter(|s| **s <= (seconds - 1) as f64) {
            let px = x(*s);
            let _ = write!(
                out,
                "<line x1='{px:.1}' x2='{px:.1}' y1='{base:.1}' y2='{:.1}' stroke='#444'/>\
                 <text x='{px:.1}' y='{:.1}' text-anchor='middle'>{} s</text>",
                base + 4.0,
                base + 16.0,
                label(*s)
            );
        }
        let _ = write!(
            out,
            "<text x='{:.1}' y='{:.1}' text-anchor='middle' fill='#666'>time since the start of the run</text></g>",
            LEFT + plot_w / 2.0,
            H - 4.0
        );
        out.push_str(&format!(
            "<line x1='{LEFT}' x2='{LEFT}' y1='{TOP}' y2='{base:.1}' stroke='#444'/>"
        ));
        // Markers under the lines.
        out.push_str("<g class='markers'>");
        for m in self.markers {
            let px = x(m.second.min(seconds - 1) as f64);
            let _ = write!(
                out,
                "<line x1='{px:.1}' x2='{px:.1}' y1='{TOP}' y2='{base:.1}' stroke='{c}' stroke-dasharray='4 3'>\
                 <title>{l}</title></line><text x='{:.1}' y='{:.1}' fill='{c}' font-size='10'>{l}</text>",
                px + 2.0,
                TOP + 10.0,
                c = m.color,
                l = escape(&m.label)
            );
        }
        out.push_str("</g>");
        for s in self.series {
            let points: Vec<String> = s
                .values
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{:.1},{:.1}", x(i as f64), y(v.max(0.0))))
                .collect();
            let _ = write!(
                out,
                "<polyline class='series' data-series='{}' fill='none' stroke='{}' stroke-width='1.8' points='{}'/>",
                escape(s.name),
                s.color,
                points.join(" ")
            );
        }
        // Legend, along the top.
        out.push_str("<g class='legend'>");
        let mut lx = LEFT;
        for s in self.series {
            let _ = write!(
                out,
                "<rect x='{lx:.1}' y='8' width='14' height='4' fill='{}'/><text x='{:.1}' y='14'>{}</text>",
                s.color,
                lx + 18.0,
                escape(s.name)
            );
            lx += 26.0 + 6.5 * s.name.chars().count() as f64;
        }
        out.push_str("</g></svg>");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_maximum() {
        assert_eq!(nice_step(10.0, 5), 2.0);
        assert_eq!(nice_step(7.3, 5), 2.0);
        assert_eq!(nice_step(130.0, 5), 50.0);
        assert_eq!(nice_step(0.04, 4), 0.01);
        let (t, top) = ticks(13.0, 5, 0.0);
        assert_eq!(t, vec![0.0, 5.0, 10.0, 15.0]);
        assert_eq!(top, 15.0);
        // A flat zero series still gets an axis.
        let (t, top) = ticks(0.0, 5, 0.0);
        assert_eq!((t.len(), top), (2, 1.0));
        // Two nodes: 0, 1, 2, not halves.
        assert_eq!(ticks(2.0, 5, 1.0).0, vec![0.0, 1.0, 2.0]);
    }

    #[test]
    fn a_chart_has_its_axes_legend_series_and_markers() {
        let p99 = [1.0, 4.0, 12.5, 3.0];
        let svg = Chart {
            id: "latency",
            unit: "ms",
            series: &[Series {
                name: "p99",
                color: "#d62728",
                values: &p99,
            }],
            markers: &[Marker {
                second: 2,
                label: "ordered 1".into(),
                color: "#9467bd",
            }],
            counts: false,
        }
        .svg();
        assert!(svg.contains("data-series='p99'"), "{svg}");
        assert!(
            svg.contains(">15 ms</text>"),
            "value axis tops at 15: {svg}"
        );
        assert!(svg.contains(">3 s</text>"), "time axis: {svg}");
        assert!(svg.contains(">ordered 1</text>"), "{svg}");
        assert!(svg.contains("class='legend'"));
        assert_eq!(label(0.5), "0.5");
        assert_eq!(label(2.0), "2");
    }
}
