//! The report as one self-contained HTML page (`--report-file`): inline SVG charts, no script,
//! no stylesheet or font from anywhere else, so it opens offline and can be mailed or archived.
//!
//! Every plotted point is an SVG element with class `pt` (lines) or `bar` (bars) inside a
//! `<figure>` whose id names the chart, so a test can count what was drawn.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::Report;

const W: f64 = 900.0;
const H: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 40.0;

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:960px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:16px 0}figcaption{font-weight:600;margin-bottom:4px}
.ok{color:#176f2c}.failed{color:#b00020}
svg text{font:11px system-ui,sans-serif;fill:#444}
.axis{stroke:#888}.grid{stroke:#eee}.measuring{fill:#f3f7ff}
.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:12px;height:3px;margin-right:4px;vertical-align:middle}
p.note{color:#555}";

/// Renders `r` as a complete HTML document.
pub fn render(r: &Report) -> String {
    let mut o = String::with_capacity(64 * 1024);
    let title = format!("wsbus-loadtest: {} ({})", r.scenario, r.mode);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    );
    if r.ok {
        o.push_str("<p class=\"ok\" id=\"result\">Result: OK</p>\n");
    } else {
        let _ = writeln!(
            o,
            "<p class=\"failed\" id=\"result\">Result: FAILED: {}</p>",
            esc(&r.problems.join("; "))
        );
    }
    summary(&mut o, r);
    charts(&mut o, r);
    parameters(&mut o, r);
    if !r.notes.is_empty() {
        o.push_str("<h2>Notes</h2><ul>");
        for n in &r.notes {
            let _ = write!(o, "<li>{}</li>", esc(n));
        }
        o.push_str("</ul>\n");
    }
    o.push_str("</body></html>\n");
    o
}

fn summary(o: &mut String, r: &Report) {
    o.push_str("<h2>Summary</h2><table id=\"summary\">");
    let row = |o: &mut String, k: &str, v: String| {
        let _ = write!(
            o,
            "<tr><th>{}</th><td class=\"n\">{}</td></tr>",
            esc(k),
            esc(&v)
        );
    };
    let c = &r.connect;
    if c.attempted > 0 {
        row(
            o,
            "connections",
            format!(
                "{} of {} ({} failed), {:.0}/s",
                c.connected, c.attempted, c.failed, c.per_sec
            ),
        );
    }
    if let Some(m) = &r.messages {
        row(
            o,
            "messages",
            format!(
                "sent {}, delivered {}, errored {}, lost {}, duplicated {}, out of order {}",
                m.sent, m.delivered, m.errored, m.lost, m.duplicated, m.out_of_order
            ),
        );
        row(
            o,
            "delivered per second",
            format!("{:.0} over {:.1} s", m.delivered_per_sec, m.send_secs),
        );
        let l = &m.latency_us;
        row(
            o,
            "send → receive",
            format!(
                "p50 {}, p90 {}, p99 {}, p99.9 {}, max {}",
                us(l.p50 as f64),
                us(l.p90 as f64),
                us(l.p99 as f64),
                us(l.p999 as f64),
                us(l.max as f64)
            ),
        );
    }
    if let Some(ch) = &r.churn {
        row(
            o,
            "churn cycles",
            format!(
                "{} started, {} completed, {:.0}/s, cycle p99 {}",
                ch.started,
                ch.completed,
                ch.sessions_per_sec,
                us(ch.cycle_latency_us.p99 as f64)
            ),
        );
    }
    if let Some(f) = &r.memory_fit {
        row(
            o,
            "server memory",
            format!(
                "{:.0} KiB + {:.2} KiB × connections (r² {:.4}); at 100,000: {:.1} MiB",
                f.base_kib, f.kib_per_conn, f.r2, f.at_100k_mib
            ),
        );
    }
    for sv in &r.servers {
        row(
            o,
            &format!("server pid {}", sv.pid),
            format!(
                "CPU {:.0} ms over sending and drain ({:.2} cores), {} µs per delivery; RSS {} → {} → {} KiB (before connecting, sending, end)",
                sv.cpu_ms,
                sv.cpu_cores,
                sv.cpu_us_per_delivery
                    .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
                sv.rss_before_kib,
                sv.rss_sending_kib,
                sv.rss_end_kib
            ),
        );
    }
    if let Some(n) = &r.noise {
        row(
            o,
            "wake-up lateness",
            format!(
                "p99 {}, p99.9 {}, max {}; {:.2}/s over 1 ms",
                us(n.late_us.p99 as f64),
                us(n.late_us.p999 as f64),
                us(n.late_us.max as f64),
                n.over_1ms_per_sec
            ),
        );
    }
    o.push_str("</table>\n");
}

fn charts(o: &mut String, r: &Report) {
    if r.timeline.is_empty() {
        o.push_str("<p class=\"note\">This scenario has no timeline.</p>\n");
        return;
    }
    let lat = if r.timeline_latency.is_empty() {
        "latency"
    } else {
        r.timeline_latency.as_str()
    };
    let pct = |f: fn(&crate::Second) -> Option<u64>| -> Vec<(f64, f64)> {
        r.timeline
            .iter()
            .filter_map(|s| Some((f64::from(s.t) + 0.5, f(s)? as f64)))
            .collect()
    };
    let count = |f: fn(&crate::Second) -> u64| -> Vec<(f64, f64)> {
        r.timeline
            .iter()
            .map(|s| (f64::from(s.t) + 0.5, f(s) as f64))
            .collect()
    };
    let span = r.timeline.len() as f64;
    line_chart(
        o,
        &Chart {
            id: "latency-over-time",
            title: &format!("{lat} latency per second: p50, p99, p99.9"),
            y: Axis::Micros,
            span,
            measuring: r.measuring,
            dashed: &[],
        },
        &[
            ("p50", "#1f77b4", pct(|s| s.p50_us)),
            ("p99", "#ff7f0e", pct(|s| s.p99_us)),
            ("p99.9", "#d62728", pct(|s| s.p999_us)),
        ],
    );
    histogram(o, r, lat);
    let per_sec_title = if r.timeline_latency == "connect" {
        "connections made per second"
    } else if r.timeline.iter().all(|s| s.sent == s.delivered) {
        "messages per second: sent (dashed) and delivered, equal in every second"
    } else {
        "messages per second: sent (dashed) and delivered"
    };
    // Sent is drawn last, dashed and with hollow points: where both are equal (a server
    // that keeps up) delivered still shows under it.
    let mut rate = vec![("delivered", "#2ca02c", count(|s| s.delivered))];
    if r.timeline.iter().any(|s| s.sent > 0) {
        rate.push(("sent", "#9467bd", count(|s| s.sent)));
    }
    line_chart(
        o,
        &Chart {
            id: "rate-over-time",
            title: per_sec_title,
            y: Axis::Count,
            span,
            measuring: r.measuring,
            dashed: &["sent"],
        },
        &rate,
    );
    line_chart(
        o,
        &Chart {
            id: "connections-over-time",
            title: "open connections (most at once in each second)",
            y: Axis::Count,
            span,
            measuring: r.measuring,
            dashed: &[],
        },
        &[("connections", "#17becf", count(|s| s.connections))],
    );
    line_chart(
        o,
        &Chart {
            id: "errors-over-time",
            title: "errors per second (error frames, failed connects or cycles, dropped connections)",
            y: Axis::Count,
            span,
            measuring: r.measuring,
            dashed: &[],
        },
        &[("errors", "#b00020", count(|s| s.errors))],
    );
    errors_by_kind(o, r);
    o.push_str(
        "<p class=\"note\">x: seconds since the run started (connect phase included); \
         the shaded band is the measuring phase.</p>\n",
    );
}

/// The y axis of a line chart.
#[derive(Clone, Copy, PartialEq)]
enum Axis {
    /// Latencies: log scale, labelled µs/ms/s.
    Micros,
    /// Counts: linear from 0.
    Count,
}

/// One line of a chart: name, colour, (seconds, value) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

struct Chart<'a> {
    id: &'a str,
    title: &'a str,
    y: Axis,
    /// Seconds on the x axis.
    span: f64,
    measuring: Option<(f64, f64)>,
    /// Series drawn dashed with hollow points, so that a line under them stays visible.
    dashed: &'a [&'a str],
}

fn line_chart(o: &mut String, c: &Chart<'_>, series: &[Series<'_>]) {
    let points: usize = series.iter().map(|s| s.2.len()).sum();
    let _ = write!(
        o,
        "<figure id=\"{}\"><figcaption>{}</figcaption><div class=\"legend\">",
        c.id,
        esc(c.title)
    );
    for (name, color, _) in series {
        let marker = if c.dashed.contains(name) {
            format!("background:repeating-linear-gradient(90deg,{color} 0 4px,transparent 4px 6px)")
        } else {
            format!("background:{color}")
        };
        let _ = write!(o, "<span><i style=\"{marker}\"></i>{}</span>", esc(name));
    }
    let _ = write!(
        o,
        "</div><svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" data-points=\"{points}\">"
    );
    let ys = series.iter().flat_map(|s| s.2.iter().map(|p| p.1));
    let y_max = ys.clone().fold(0.0_f64, f64::max);
    let (lo, hi, ticks): (f64, f64, Vec<f64>) = match c.y {
        Axis::Micros => {
            let y_min = ys.fold(f64::INFINITY, f64::min).max(1.0);
            let lo = 10f64.powf(y_min.log10().floor());
            let hi = 10f64.powf(y_max.max(y_min * 10.0).log10().ceil());
            let mut t = Vec::new();
            let mut v = lo;
            while v <= hi * 1.0001 {
                t.push(v);
                v *= 10.0;
            }
            (lo, hi, t)
        }
        Axis::Count => {
            let step = nice_step(y_max.max(1.0) / 4.0);
            let hi = (y_max.max(1.0) / step).ceil() * step;
            let t = (0..=(hi / step) as usize)
                .map(|i| i as f64 * step)
                .collect();
            (0.0, hi, t)
        }
    };
    let x = |t: f64| LEFT + t / c.span.max(1.0) * (W - LEFT - RIGHT);
    let y = |v: f64| {
        let f = match c.y {
            Axis::Micros => (v.max(lo).ln() - lo.ln()) / (hi.ln() - lo.ln()),
            Axis::Count => v / hi,
        };
        H - BOTTOM - f * (H - TOP - BOTTOM)
    };
    if let Some((a, b)) = c.measuring {
        let _ = write!(
            o,
            "<rect class=\"measuring\" x=\"{:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{:.1}\"/>",
            x(a),
            (x(b) - x(a)).max(0.0),
            H - TOP - BOTTOM
        );
    }
    for &t in &ticks {
        let label = match c.y {
            Axis::Micros => us(t),
            Axis::Count => count(t),
        };
        let yy = y(t);
        let _ = write!(
            o,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            esc(&label),
        );
    }
    x_axis(o, c.span, &x);
    for (name, color, pts) in series {
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts
            .iter()
            .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
            .collect();
        let dashed = c.dashed.contains(name);
        let (dash, fill, r) = if dashed {
            (
                " stroke-dasharray=\"6 4\"",
                format!("none\" stroke=\"{color}"),
                3.5,
            )
        } else {
            ("", (*color).to_owned(), 2.5)
        };
        let _ = write!(
            o,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"{dash} points=\"{}\"/>",
            path.join(" ")
        );
        for &(t, v) in pts {
            let label = match c.y {
                Axis::Micros => us(v),
                Axis::Count => count(v),
            };
            let _ = write!(
                o,
                "<circle class=\"pt\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"{r}\" fill=\"{fill}\"><title>{} at {:.0} s: {}</title></circle>",
                x(t),
                y(v),
                esc(name),
                t - 0.5,
                esc(&label)
            );
        }
    }
    o.push_str("</svg></figure>\n");
}

fn x_axis(o: &mut String, span: f64, x: &dyn Fn(f64) -> f64) {
    let _ = write!(
        o,
        "<line class=\"axis\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{b:.1}\" y2=\"{b:.1}\"/>",
        W - RIGHT,
        b = H - BOTTOM
    );
    let step = nice_step(span.max(1.0) / 10.0).max(1.0);
    let mut t = 0.0;
    while t <= span + 1e-9 {
        let _ = write!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t:.0} s</text>",
            x(t),
            H - BOTTOM + 16.0
        );
        t += step;
    }
}

/// The latency histogram: one bar per bucket on a log axis, height by count.
fn histogram(o: &mut String, r: &Report, lat: &str) {
    let b = &r.latency_histogram;
    let total: u64 = b.iter().map(|b| b.count).sum();
    let _ = write!(
        o,
        "<figure id=\"latency-histogram\"><figcaption>{} latency histogram ({} samples, buckets 25% wide)</figcaption>",
        esc(lat),
        total
    );
    let bars: Vec<(f64, f64, u64)> = b
        .iter()
        .scan(None::<u64>, |prev, b| {
            let lo = prev.unwrap_or((b.le_us as f64 / 1.25) as u64).max(1);
            *prev = Some(b.le_us);
            Some((lo as f64, b.le_us.max(lo + 1) as f64, b.count))
        })
        .filter(|b| b.2 > 0)
        .collect();
    let _ = write!(
        o,
        "<svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" data-points=\"{}\">",
        bars.len()
    );
    if bars.is_empty() {
        o.push_str("<text x=\"80\" y=\"40\">no samples</text></svg></figure>\n");
        return;
    }
    let lo = 10f64.powf(bars[0].0.log10().floor());
    let hi = 10f64
        .powf(bars[bars.len() - 1].1.log10().ceil())
        .max(lo * 10.0);
    let max = bars.iter().map(|b| b.2).max().unwrap_or(1) as f64;
    let x = |v: f64| LEFT + (v.ln() - lo.ln()) / (hi.ln() - lo.ln()) * (W - LEFT - RIGHT);
    let step = nice_step(max / 4.0);
    let top = (max / step).ceil() * step;
    let y = |v: f64| H - BOTTOM - v / top * (H - TOP - BOTTOM);
    let mut t = 0.0;
    while t <= top + 1e-9 {
        let yy = y(t);
        let _ = write!(
            o,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            count(t),
        );
        t += step;
    }
    let _ = write!(
        o,
        "<line class=\"axis\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{b:.1}\" y2=\"{b:.1}\"/>",
        W - RIGHT,
        b = H - BOTTOM
    );
    let mut v = lo;
    while v <= hi * 1.0001 {
        let _ = write!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x(v),
            H - BOTTOM + 16.0,
            esc(&us(v))
        );
        v *= 10.0;
    }
    for (a, b, n) in bars {
        let _ = write!(
            o,
            "<rect class=\"bar\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#1f77b4\"><title>{}–{}: {n}</title></rect>",
            x(a),
            y(n as f64),
            (x(b) - x(a) - 0.5).max(0.5),
            H - BOTTOM - y(n as f64),
            esc(&us(a)),
            esc(&us(b))
        );
    }
    o.push_str("</svg></figure>\n");
}

/// Every error of the run by kind, as horizontal bars.
fn errors_by_kind(o: &mut String, r: &Report) {
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut add = |prefix: &str, m: &BTreeMap<String, u64>| {
        for (k, v) in m {
            *kinds.entry(format!("{prefix}{k}")).or_default() += v;
        }
    };
    add("error frame: ", &r.error_frames);
    add("connect: ", &r.connect.failures);
    add("dropped: ", &r.disconnects);
    if let Some(c) = &r.churn {
        add("cycle: ", &c.failures);
    }
    let _ = write!(
        o,
        "<figure id=\"errors-by-kind\"><figcaption>errors by kind</figcaption>"
    );
    if kinds.is_empty() {
        o.push_str("<p class=\"ok\">No errors.</p></figure>\n");
        return;
    }
    let row = 22.0;
    let h = TOP + row * kinds.len() as f64 + 8.0;
    let max = kinds.values().copied().max().unwrap_or(1) as f64;
    let label_w = 360.0;
    let _ = write!(
        o,
        "<svg width=\"{W}\" height=\"{h}\" viewBox=\"0 0 {W} {h}\" data-points=\"{}\">",
        kinds.len()
    );
    for (i, (k, v)) in kinds.iter().enumerate() {
        let yy = TOP + row * i as f64;
        let w = (*v as f64 / max * (W - label_w - 80.0)).max(1.0);
        let _ = write!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><rect class=\"bar\" x=\"{label_w}\" y=\"{yy:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"#b00020\"/><text x=\"{:.1}\" y=\"{:.1}\">{v}</text>",
            label_w - 8.0,
            yy + 14.0,
            esc(k),
            row - 6.0,
            label_w + w + 6.0,
            yy + 14.0
        );
    }
    o.push_str("</svg></figure>\n");
}

fn parameters(o: &mut String, r: &Report) {
    o.push_str("<h2>Parameters</h2><table id=\"parameters\">");
    let mut row = |k: &str, v: String| {
        let _ = write!(o, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
    };
    if !r.command.is_empty() {
        row("command", r.command.join(" "));
    }
    row("scenario", format!("{} ({})", r.scenario, r.mode));
    row("started", r.started_at.clone());
    row("nodes", r.nodes.join(" "));
    row("users", r.users.to_string());
    row("hatch rate", format!("{}/s", r.hatch_rate));
    row("run time", format!("{} s", r.run_time_secs));
    if let Some(rate) = r.target_rate {
        row("target rate (open loop)", format!("{rate}/s"));
    }
    if let Some(w) = r.in_flight {
        row("in flight per user (closed loop)", w.to_string());
    }
    if let Some(f) = r.frames_per_write {
        row("frames per write (at most)", f.to_string());
    }
    row("grace", format!("{} s", r.grace_secs));
    row("elapsed", format!("{:.1} s", r.elapsed_secs));
    row("run prefix", r.run_prefix.clone());
    let m = &r.machine;
    row("host", m.host.clone());
    row("CPU", format!("{} × {}", m.cpus, m.cpu));
    row("memory", format!("{} MiB", m.memory_mib));
    row("kernel", m.kernel.clone());
    row(
        "open-file limit (soft/hard)",
        format!("{}/{}", m.nofile.0, m.nofile.1),
    );
    o.push_str("</table>\n");
}

/// 1, 2 or 5 × a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.max(1e-9).log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * p)
}

/// A duration given in µs, in the unit that reads best.
fn us(v: f64) -> String {
    if v >= 1e6 {
        format!("{} s", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{} ms", trim(v / 1e3))
    } else {
        format!("{} µs", trim(v))
    }
}

fn count(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Escapes text for HTML element content and double-quoted attributes.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_steps_and_escaping() {
        assert_eq!(us(250.0), "250 µs");
        assert_eq!(us(2500.0), "2.5 ms");
        assert_eq!(us(1e6), "1 s");
        assert_eq!(count(120_000.0), "120k");
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(40.0), 50.0);
        assert_eq!(esc("<a href=\"x\">&"), "&lt;a href=&quot;x&quot;&gt;&amp;");
    }

    #[test]
    fn a_page_without_a_timeline_says_so() {
        let html = render(&Report {
            scenario: "sched-noise".into(),
            ok: true,
            ..Report::default()
        });
        assert!(html.contains("This scenario has no timeline."));
        assert!(!html.contains("class=\"pt\""));
    }
}
