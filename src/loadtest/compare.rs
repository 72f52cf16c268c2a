//! `surge loadtest --compare BEFORE/report.json AFTER/report.json`: two runs side by side
//! (headline figures with their ratio) and overlaid on one time axis, as vegeta's plot
//! does, so a change's effect is read off one page.

use serde_json::Value;

use super::chart::{Chart, Series};

/// Why two reports could not be compared.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{0}: not a surge load-test report.json ({1})")]
    NotAReport(String, &'static str),
}

/// One run read back from its `report.json`.
pub struct Run {
    pub label: String,
    p50: Vec<f64>,
    p99: Vec<f64>,
    requests: Vec<f64>,
    errors: Vec<f64>,
    in_service: Vec<f64>,
    headline: Vec<(&'static str, f64)>,
}

impl Run {
    /// Reads a report's JSON (`label` names it on the page, e.g. its folder).
    pub fn from_json(label: &str, v: &Value) -> Result<Run, CompareError> {
        let timeline = v["timeline"]
            .as_array()
            .ok_or_else(|| CompareError::NotAReport(label.to_owned(), "no timeline"))?;
        let total = v
            .get("total")
            .filter(|t| t.is_object())
            .ok_or_else(|| CompareError::NotAReport(label.to_owned(), "no total"))?;
        let field = |k: &str| -> Vec<f64> {
            timeline
                .iter()
                .map(|t| t[k].as_f64().unwrap_or(0.0))
                .collect()
        };
        let requests = timeline
            .iter()
            .map(|t| t["ok"].as_f64().unwrap_or(0.0) + t["errors"].as_f64().unwrap_or(0.0))
            .collect();
        let num = |x: &Value| x.as_f64().unwrap_or(0.0);
        Ok(Run {
            label: label.to_owned(),
            p50: field("p50_ms"),
            p99: field("p99_ms"),
            requests,
            errors: field("errors"),
            in_service: field("in_service"),
            headline: vec![
                ("requests/s", num(&v["request_rate"])),
                ("p50 ms", num(&total["p50_ms"])),
                ("p90 ms", num(&total["p90_ms"])),
                ("p99 ms", num(&total["p99_ms"])),
                ("p99.9 ms", num(&total["p999_ms"])),
                ("max ms", num(&total["max_ms"])),
                ("error rate %", num(&total["error_rate"]) * 100.0),
                ("waiting-room sessions", num(&v["waiting_room"]["queued"])),
            ],
        })
    }
}

/// The headline figures side by side, with after / before.
pub fn table(before: &Run, after: &Run) -> String {
    let mut out = format!(
        "{:<22} {:>14} {:>14} {:>9}\n",
        "", before.label, after.label, "ratio"
    );
    for ((name, a), (_, b)) in before.headline.iter().zip(&after.headline) {
        let ratio = if *a > 0.0 {
            format!("{:.3}×", b / a)
        } else {
            "–".to_owned()
        };
        out.push_str(&format!("{name:<22} {a:>14.3} {b:>14.3} {ratio:>9}\n"));
    }
    out
}

/// One page: the table, then each measure of both runs on one chart.
pub fn html(before: &Run, after: &Run) -> String {
    let (b, a) = (before.label.as_str(), after.label.as_str());
    let pair = |id: &str, unit: &str, x: &[f64], y: &[f64], counts: bool| {
        Chart {
            id,
            unit,
            series: &[
                Series {
                    name: b,
                    color: "#1f77b4",
                    values: x,
                },
                Series {
                    name: a,
                    color: "#d62728",
                    values: y,
                },
            ],
            markers: &[],
            counts,
        }
        .svg()
    };
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    format!(
        "<!doctype html><meta charset=utf-8><title>surge load test: {} vs {}</title>\
         <style>body{{font:14px sans-serif;margin:2em}}pre{{background:#f4f4f4;padding:1em}}svg{{border:1px solid #ccc;margin:.5em 0;display:block}}</style>\
         <h1>surge load test: {} (blue) vs {} (red)</h1><pre>{}</pre>\
         <h2>p99 latency</h2>{}<h2>p50 latency</h2>{}<h2>Requests per second</h2>{}\
         <h2>Errors per second</h2>{}<h2>Nodes in service</h2>{}",
        escape(b),
        escape(a),
        escape(b),
        escape(a),
        escape(&table(before, after)),
        pair("p99", "ms", &before.p99, &after.p99, false),
        pair("p50", "ms", &before.p50, &after.p50, false),
        pair("requests", "/s", &before.requests, &after.requests, true),
        pair("errors", "/s", &before.errors, &after.errors, true),
        pair("in service", "nodes", &before.in_service, &after.in_service, true),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(p99: f64, rate: f64) -> Value {
        json!({
            "request_rate": rate,
            "total": {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": p99, "p999_ms": p99, "max_ms": p99, "error_rate": 0.0},
            "waiting_room": {"queued": 0},
            "timeline": [
                {"second": 0, "ok": 10, "errors": 0, "p50_ms": 1.0, "p99_ms": p99, "in_service": 1},
                {"second": 1, "ok": 12, "errors": 1, "p50_ms": 1.5, "p99_ms": p99, "in_service": 2},
            ],
        })
    }

    #[test]
    fn two_runs_give_their_ratios_and_overlaid_series() {
        let before = Run::from_json("before", &report(10.0, 100.0)).unwrap();
        let after = Run::from_json("after", &report(5.0, 120.0)).unwrap();
        let t = table(&before, &after);
        assert!(t.contains("requests/s"), "{t}");
        assert!(t.contains("1.200×"), "{t}");
        assert!(t.contains("0.500×"), "{t}");
        let page = html(&before, &after);
        assert_eq!(page.matches("data-series='before'").count(), 5);
        assert_eq!(page.matches("data-series='after'").count(), 5);
    }

    #[test]
    fn something_else_is_refused_with_its_name() {
        let e = Run::from_json("x/report.json", &json!({"hello": 1}))
            .err()
            .unwrap();
        assert!(
            e.to_string().starts_with("x/report.json: not a surge"),
            "{e}"
        );
    }
}
