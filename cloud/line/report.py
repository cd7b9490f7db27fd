"""The line report: one self-contained HTML page (inline CSS and SVG) over the RunSummary
of one or more runs (runner.py).

    write_report([summary], "/srv/line1/report.html")
"""

import datetime
import hashlib
import html
import json
import os

from fleetid.cloud.line.runner import percentile

# -- the report ---------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:72em}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right} th{background:#f3f3f3} td.l,th.l{text-align:left}
.bad{color:#b00;font-weight:bold} .ok{color:#070}
.kpi{display:inline-block;margin:0 2em .5em 0} .kpi b{font-size:1.6em;display:block}
"""


def _svg_histogram(values, width=640, height=220, bins=30, label="cycle time (ms)"):
    if not values:
        return "<p>no committed devices</p>"
    low, high = min(values), max(values)
    if high <= low:
        high = low + 1.0
    step = (high - low) / bins
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / step))] += 1
    top = max(counts)
    pad_l, pad_b, pad_t = 40, 30, 10
    plot_w, plot_h = width - pad_l - 10, height - pad_b - pad_t
    bar_w = plot_w / float(bins)
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" role="img" '
             'aria-label="%s histogram">' % (width, height, html.escape(label))]
    for i, count in enumerate(counts):
        h = plot_h * count / float(top)
        parts.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="#4a7bd0">'
                     '<title>%.1f-%.1f ms: %d</title></rect>'
                     % (pad_l + i * bar_w + 0.5, pad_t + plot_h - h, max(bar_w - 1, 1), h,
                        low + i * step, low + (i + 1) * step, count))
    parts.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>'
                 % (pad_l, pad_t + plot_h, pad_l + plot_w, pad_t + plot_h))
    parts.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>'
                 % (pad_l, pad_t, pad_l, pad_t + plot_h))
    for frac in (0.0, 0.5, 1.0):
        x = pad_l + frac * plot_w
        parts.append('<text x="%.1f" y="%d" font-size="11" text-anchor="middle">%.1f</text>'
                     % (x, height - 12, low + frac * (high - low)))
    parts.append('<text x="%d" y="%d" font-size="11" text-anchor="end">%d</text>'
                 % (pad_l - 4, pad_t + 10, top))
    parts.append('<text x="%.1f" y="%d" font-size="11" text-anchor="middle">%s</text>'
                 % (pad_l + plot_w / 2, height - 1, html.escape(label)))
    for p, colour in ((50, "#080"), (95, "#c80"), (99, "#c00")):
        x = pad_l + (percentile(values, p) - low) / (high - low) * plot_w
        parts.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" '
                     'stroke-dasharray="4 3"><title>p%d</title></line>'
                     % (x, pad_t, x, pad_t + plot_h, colour, p))
    parts.append("</svg>")
    return "".join(parts)


def _svg_scaling(points, width=640, height=240):
    """Stations vs throughput, with the linear projection from the smallest K."""
    if not points:
        return ""
    base_k, base_t = points[0]
    per_station = base_t / base_k if base_k else 0.0
    max_k = max(k for k, _ in points)
    max_t = max(max(t for _, t in points), per_station * max_k) or 1.0
    pad_l, pad_b, pad_t, pad_r = 50, 32, 10, 10
    plot_w, plot_h = width - pad_l - pad_r, height - pad_b - pad_t

    def xy(k, t):
        return (pad_l + plot_w * k / float(max_k), pad_t + plot_h - plot_h * t / max_t)

    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" role="img" '
             'aria-label="stations versus throughput">' % (width, height)]
    parts.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>'
                 % (pad_l, pad_t + plot_h, pad_l + plot_w, pad_t + plot_h))
    parts.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>'
                 % (pad_l, pad_t, pad_l, pad_t + plot_h))
    x0, y0 = xy(0, 0)
    x1, y1 = xy(max_k, per_station * max_k)
    parts.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#999" '
                 'stroke-dasharray="5 4"><title>linear</title></line>' % (x0, y0, x1, y1))
    coords = [xy(k, t) for k, t in points]
    parts.append('<polyline fill="none" stroke="#4a7bd0" stroke-width="2" points="%s"/>'
                 % " ".join("%.1f,%.1f" % c for c in coords))
    for (k, t), (x, y) in zip(points, coords):
        parts.append('<circle cx="%.1f" cy="%.1f" r="4" fill="#4a7bd0"><title>%d stations: '
                     '%.2f devices/s</title></circle>' % (x, y, k, t))
        parts.append('<text x="%.1f" y="%d" font-size="11" text-anchor="middle">%d</text>'
                     % (x, height - 16, k))
    parts.append('<text x="%d" y="%d" font-size="11" text-anchor="end">%.1f/s</text>'
                 % (pad_l - 4, pad_t + 10, max_t))
    parts.append('<text x="%.1f" y="%d" font-size="11" text-anchor="middle">stations '
                 '(dashed: linear from %d)</text>' % (pad_l + plot_w / 2, height - 2, base_k))
    parts.append("</svg>")
    return "".join(parts)


def device_rows(summary):
    """The per-device list of one run, in the order the stations finished the devices.

    Returns: list of dicts: serial (the registry's number, None when nothing was
    written), device_serial (the certificate's serial name), se_uid (hex), cert_sha256
    (SHA-256 of the identity certificate's DER, hex; None without one), station,
    finished_at (ISO 8601 UTC), status ("committed", "held" or "failed"), cause and step
    (failed devices).
    """
    rows = []
    for run in sorted(summary.runs, key=lambda r: (r.finished_at is None, r.finished_at or 0,
                                                   r.result.serial or 0)):
        result = run.result
        if result.ok:
            status = "committed"
        else:
            status = "held" if result.held else "failed"
        rows.append({
            "serial": result.serial, "device_serial": result.device_serial,
            "se_uid": bytes(result.se_uid).hex() if result.se_uid is not None else None,
            "cert_sha256": (hashlib.sha256(bytes(result.cert_der)).hexdigest()
                            if result.cert_der else None),
            "station": result.station,
            "finished_at": (run.finished_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                            if run.finished_at is not None else None),
            "status": status, "cause": result.cause, "step": result.step,
        })
    return rows


def _device_table(summary):
    esc = html.escape
    out = ["<h2>Devices</h2>",
           "<table><tr><th class='l'>serial</th><th class='l'>SE UID</th>"
           "<th class='l'>certificate SHA-256</th><th class='l'>station</th>"
           "<th class='l'>finished (UTC)</th><th class='l'>status</th></tr>"]
    for row in device_rows(summary):
        status = row["status"]
        if row["cause"]:
            status += ": %s at %s" % (row["cause"], row["step"])
        out.append("<tr><td class='l'>%s</td><td class='l'><code>%s</code></td>"
                   "<td class='l'><code>%s</code></td><td class='l'>%s</td>"
                   "<td class='l'>%s</td><td class='l %s'>%s</td></tr>"
                   % (esc(row["device_serial"] or "-"), esc(row["se_uid"] or "-"),
                      esc(row["cert_sha256"] or "-"), esc(row["station"] or "-"),
                      esc(row["finished_at"] or "-"),
                      "ok" if row["status"] == "committed" else "bad", esc(status)))
    out.append("</table>")
    return "\n".join(out)


def _scaling_section(summaries):
    """Stations vs throughput: a table (each run against linear scaling of the smallest)
    and its chart."""
    out = ["<h2>Stations vs throughput</h2>"]
    points = sorted((s.stations, s.throughput) for s in summaries)
    base_k, base_t = points[0]
    out.append("<table><tr><th>stations</th><th>devices</th><th>devices/s</th>"
               "<th>vs linear</th><th>cycle p50 ms</th><th>cycle p99 ms</th>"
               "<th>yield %</th></tr>")
    for s in sorted(summaries, key=lambda s: s.stations):
        linear = base_t / base_k * s.stations if base_k else 0.0
        out.append("<tr><td>%d</td><td>%d</td><td>%.2f</td><td>%.2f</td><td>%.1f</td>"
                   "<td>%.1f</td><td>%.2f</td></tr>"
                   % (s.stations, s.devices, s.throughput,
                      s.throughput / linear if linear else 0.0, s.cycle_ms(50),
                      s.cycle_ms(99), s.yield_pct))
    out.append("</table>")
    out.append(_svg_scaling(points))
    return "\n".join(out)


def _failures_section(summary):
    """Failures by cause: how many devices each cause held, and their share."""
    esc = html.escape
    out = ["<h2>Failures by cause</h2>"]
    failures = summary.failures()
    if failures:
        out.append("<table><tr><th class='l'>cause</th><th>devices</th><th>%</th></tr>")
        for cause, count in failures.items():
            out.append("<tr><td class='l'><code>%s</code></td><td>%d</td><td>%.2f</td></tr>"
                       % (esc(cause), count, 100.0 * count / summary.devices))
        out.append("</table>")
    else:
        out.append("<p class='ok'>none</p>")
    return "\n".join(out)


def report_html(summaries, title="fleetid factory line report"):
    """The line report (one HTML page, inline SVG, no external resources).

    Params: summaries: list of RunSummary (one per station count; the last is detailed).
    Returns: str.
    """
    esc = html.escape
    main = summaries[-1]
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>%s</title><style>%s"
           "</style></head><body>" % (esc(title), _CSS), "<h1>%s</h1>" % esc(title)]
    out.append("<p>%s &middot; batch <code>%s</code> &middot; SE profile <code>%s</code>"
               "</p>" % (esc(datetime.datetime.now(datetime.timezone.utc)
                             .strftime("%Y-%m-%d %H:%M UTC")), esc(main.batch),
                         esc(main.profile)))
    yield_cls = "ok" if main.yield_pct >= 99.5 else "bad"
    kpis = [("devices", "%d" % main.devices), ("stations", "%d" % main.stations),
            ("yield", "<span class='%s'>%.2f %%</span>" % (yield_cls, main.yield_pct)),
            ("throughput", "%.2f /s" % main.throughput),
            ("cycle p50 / p95 / p99", "%.0f / %.0f / %.0f ms"
             % (main.cycle_ms(50), main.cycle_ms(95), main.cycle_ms(99))),
            ("audit / device", "%.0f B" % main.as_dict()["audit_bytes_per_device"])]
    out.append("".join("<span class='kpi'>%s<b>%s</b></span>" % (esc(k), v) for k, v in kpis))
    if main.yield_pct < 99.5:
        out.append("<p class='bad'>Yield loss %.2f %% is above the 0.5 %% of a stable line: "
                   "see the failure causes below (HSM sessions, programmer link, key "
                   "wrapping are the usual suspects).</p>" % (100.0 - main.yield_pct))
    out.append("<h2>Cycle time per committed device</h2>")
    out.append(_svg_histogram([r.cycle_ms for r in main.ok]))
    if main.mean("se_ms") > 0:
        out.append("<p>Mean SE time (what the %s profile charges for the same APDUs, bus "
                   "included): %.1f ms; mean cycle %.1f ms: the line adds %.1f %%.</p>"
                   % (esc(main.profile), main.mean("se_ms"), main.mean("cycle_ms"),
                      100.0 * (main.mean("cycle_ms") / main.mean("se_ms") - 1.0)))
    else:
        out.append("<p>Zero-latency SE profile: the cycle time is host cost plus the "
                   "emulator's own CPU time (mean %.1f ms of %.1f ms).</p>"
                   % (main.mean("emulator_ms"), main.mean("cycle_ms")))
    out.append(_scaling_section(summaries))
    out.append(_failures_section(main))
    out.append("<h2>Mean time per step (committed devices)</h2><table>"
               "<tr><th class='l'>step</th><th>ms</th></tr>")
    for step, ms in main.step_means_ms().items():
        out.append("<tr><td class='l'>%s</td><td>%.2f</td></tr>" % (esc(step), ms))
    out.append("</table><h2>HSM session pool</h2><table>")
    for key, value in sorted((main.pool or {}).items()):
        out.append("<tr><td class='l'>%s</td><td>%s</td></tr>" % (esc(key), esc(str(value))))
    out.append("</table>")
    out.append(_device_table(main))
    out.append("</body></html>")
    return "\n".join(out)


def write_report(summaries, path):
    """Write report_html(summaries) and a JSON summary beside it ("<path>.json"): one
    object per run, RunSummary.as_dict() plus "devices" (device_rows())."""
    with open(path, "w") as f:
        f.write(report_html(summaries))
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump([dict(s.as_dict(), devices=device_rows(s)) for s in summaries], f,
                  indent=1, sort_keys=True)
    return path
