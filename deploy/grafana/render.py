"""Draws line-gateway.json's panels from a Prometheus, as a PNG, without Grafana.

Each panel's PromQL is evaluated by the Prometheus given (`query_range`), with Grafana's
`$__rate_interval` replaced by --rate-interval and `$job`/`$instance` by `.*`; the series are
drawn with uPlot (from the npm registry, installed under --build-dir at run time, never
committed) in an HTML page laid out by the panels' gridPos, and headless Chromium screenshots
it. Not part of CI:

    python deploy/grafana/render.py --prometheus http://127.0.0.1:9090 --minutes 10 \\
        --out docs/dashboard.png

Needs node/npm (uPlot), Debian's `chromium`, and a Prometheus that scraped the gateway.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
UPLOT_VERSION = "1.6.32"
GRID_COLS, ROW_PX, WIDTH = 24, 30, 1600
PALETTE = ["#73BF69", "#F2CC0C", "#5794F2", "#FF780A", "#B877D9", "#F2495C", "#8AB8FF", "#FF9830", "#1F9E89"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
]


def uplot_assets(build_dir: Path) -> tuple[str, str]:
    """uPlot's JS and CSS, installed from npm into build_dir on first use."""
    dist = build_dir / "node_modules" / "uplot" / "dist"
    if not (dist / "uPlot.iife.min.js").exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        npm = shutil.which("npm") or "npm"
        cmd = [npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(build_dir)]
        subprocess.run([*cmd, f"uplot@{UPLOT_VERSION}"], check=True, timeout=300)
    return (dist / "uPlot.iife.min.js").read_text(), (dist / "uPlot.min.css").read_text()


def promql(expr: str, rate_interval: str) -> str:
    expr = expr.replace("$__rate_interval", rate_interval)
    return re.sub(r"\$\{?(job|instance)\}?", ".*", expr)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or "value"


def panel_data(
    panel: dict[str, Any], prometheus: str, start: float, end: float, step: float, rate_interval: str
) -> dict[str, Any]:
    """The panel's series aligned on one time axis (uPlot's data layout), NaN as null."""
    xs = [start + i * step for i in range(int((end - start) // step) + 1)]
    index = {round(x, 3): i for i, x in enumerate(xs)}
    names, columns = [], []
    for target in panel.get("targets", []):
        for series in query_range(prometheus, promql(target["expr"], rate_interval), start, end, step):
            column: list[float | None] = [None] * len(xs)
            for t, v in series["values"]:
                i = index.get(round(float(t), 3))
                if i is not None and v not in ("NaN", "+Inf", "-Inf"):
                    column[i] = float(v)
            names.append(legend(target.get("legendFormat", ""), series["metric"]))
            columns.append(column)
    return {"names": names, "data": [xs, *columns]}


PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>{css}
body {{ margin: 0; background: #111217; color: #ccccdc; font: 13px 'DejaVu Sans', sans-serif; }}
header {{ padding: 10px 16px; height: 40px; box-sizing: border-box; display: flex; gap: 16px;
  align-items: baseline; }}
header b {{ font-size: 17px; color: #fff; }} header span {{ color: #8e8e9e; }}
#grid {{ position: relative; margin: 0 8px; }}
.panel {{ position: absolute; background: #181b1f; border: 1px solid #2c3235; border-radius: 3px;
  box-sizing: border-box; overflow: hidden; }}
.panel h3 {{ margin: 0; padding: 6px 8px; font-size: 13px; font-weight: 500; color: #ccccdc; }}
.row {{ position: absolute; font-size: 15px; color: #fff; padding-top: 8px; }}
.empty {{ color: #6e6e7e; padding: 60px 8px; text-align: center; }}
.uplot {{ font-family: 'DejaVu Sans', sans-serif; }}
.keys {{ display: flex; flex-wrap: wrap; justify-content: center; gap: 3px 14px; padding: 4px 8px;
  font-size: 11px; }} .keys i {{ display: inline-block; width: 10px; height: 3px; margin: 0 5px 3px 0; }}
footer {{ position: absolute; left: 16px; color: #8e8e9e; font-size: 12px; }}
</style><script>{js}</script></head><body>
<header><b>{title}</b><span>{subtitle}</span></header><div id="grid"></div>
<footer id="foot">{caption}</footer>
<script>
const PANELS = {panels}, PALETTE = {palette}, COLW = {colw}, ROWPX = {rowpx}, SECONDS = {seconds};
function fmt(unit, v) {{
  if (v == null) return "";
  if (unit === "s") return v >= 1 ? v.toFixed(2) + " s" : +(v * 1000).toFixed(v < 0.01 ? 1 : 0) + " ms";
  if (unit === "bytes") return (v / 1048576).toFixed(0) + " MiB";
  if (unit === "percentunit") return (v * 100).toFixed(0) + "%";
  if (unit === "reqps") return (Math.abs(v) < 10 ? +v.toFixed(2) : v.toFixed(0)) + "/s";
  return Math.abs(v) < 10 ? +v.toFixed(2) : v.toFixed(0);
}}
const clock = t => new Date(t * 1000).toISOString().substring(11, SECONDS ? 19 : 16);
const grid = document.getElementById("grid");
let bottom = 0;
for (const p of PANELS) {{
  const g = p.gridPos, el = document.createElement("div");
  el.style.left = (g.x * COLW) + "px"; el.style.top = (g.y * ROWPX) + "px";
  el.style.width = (g.w * COLW - 6) + "px"; el.style.height = (g.h * ROWPX - 6) + "px";
  bottom = Math.max(bottom, (g.y + g.h) * ROWPX);
  if (p.type === "row") {{ el.className = "row"; el.textContent = p.title; grid.appendChild(el); continue; }}
  el.className = "panel"; el.innerHTML = "<h3></h3>"; el.querySelector("h3").textContent = p.title;
  grid.appendChild(el);
  if (!p.names.length) {{
    el.insertAdjacentHTML("beforeend", "<div class=empty>No data</div>"); continue;
  }}
  // The legend is ours (a wrapping row of keys), laid out first: the plot gets the room left.
  const plot = el.appendChild(document.createElement("div"));
  const keys = el.appendChild(document.createElement("div"));
  keys.className = "keys";
  p.names.forEach((n, i) => {{
    const key = keys.appendChild(document.createElement("span"));
    key.appendChild(document.createElement("i")).style.background = PALETTE[i % PALETTE.length];
    key.appendChild(document.createTextNode(n));
  }});
  const unit = p.unit, line = {{ stroke: "#2c3235", width: 1 }};
  const axis = {{ stroke: "#8e8e9e", grid: line, ticks: line }};
  new uPlot({{
    width: g.w * COLW - 16, height: g.h * ROWPX - 6 - 34 - keys.offsetHeight,
    legend: {{ show: false }}, cursor: {{ show: false }},
    series: [{{}}].concat(p.names.map((n, i) => ({{
      label: n, stroke: PALETTE[i % PALETTE.length], width: 1.5, fill: PALETTE[i % PALETTE.length] + "18",
      spanGaps: false, points: {{ show: false }},
    }}))),
    scales: {{ y: {{ range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] }} }},
    axes: [
      {{ ...axis, values: (u, vs) => vs.map(clock) }},
      {{ ...axis, size: 70, values: (u, vs) => vs.map(v => fmt(unit, v)) }},
    ],
  }}, p.data, plot);
}}
grid.style.height = bottom + "px";
document.getElementById("foot").style.top = (40 + bottom + 6) + "px";
</script></body></html>"""


def render_html(
    dashboard: dict[str, Any],
    prometheus: str,
    start: float,
    end: float,
    step: float,
    args: argparse.Namespace,
) -> tuple[str, int]:
    js, css = uplot_assets(Path(args.build_dir))
    panels = []
    for panel in dashboard["panels"]:
        entry = {"type": panel["type"], "title": panel["title"], "gridPos": panel["gridPos"]}
        if panel["type"] != "row":
            entry["unit"] = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
            entry.update(panel_data(panel, prometheus, start, end, step, args.rate_interval))
        panels.append(entry)
    bottom = max((p["gridPos"]["y"] + p["gridPos"]["h"]) * ROW_PX for p in panels)
    span = f"{time.strftime('%H:%M', time.gmtime(start))}-{time.strftime('%H:%M', time.gmtime(end))} UTC"
    page = PAGE.format(
        css=css,
        js=js,
        title=html.escape(dashboard["title"]),
        subtitle=html.escape(f"{span} · step {step:g} s · rate window {args.rate_interval} · {prometheus}"),
        caption=html.escape(args.caption),
        panels=json.dumps(panels),
        palette=json.dumps(PALETTE),
        colw=(WIDTH - 16) / GRID_COLS,
        rowpx=ROW_PX,
        seconds=json.dumps(end - start < 600),  # short ranges: ticks to the second
    )
    return page, 40 + bottom + 56


def screenshot(page: Path, out: Path, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [chromium, *CHROMIUM_FLAGS, f"--window-size={WIDTH},{height}", f"--screenshot={out.resolve()}"]
    subprocess.run([*cmd, page.resolve().as_uri()], check=True, timeout=120, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--dashboard", default=str(HERE / "line-gateway.json"))
    parser.add_argument("--minutes", type=float, default=10.0, help="the range, ending at --end")
    parser.add_argument("--end", type=float, default=0.0, help="unix time (default: now)")
    parser.add_argument("--step", type=float, default=5.0)
    parser.add_argument("--rate-interval", default="30s", help="what $__rate_interval becomes")
    parser.add_argument("--build-dir", default="/tmp/line-gateway-dashboard")
    parser.add_argument("--caption", default="Rendered by deploy/grafana/render.py, not Grafana.")
    parser.add_argument("--out", default="dashboard.png")
    args = parser.parse_args()
    end = args.end or time.time()
    start = end - args.minutes * 60
    end, start = end - end % args.step, start - start % args.step
    dashboard = json.loads(Path(args.dashboard).read_text())
    page, height = render_html(dashboard, args.prometheus.rstrip("/"), start, end, args.step, args)
    html_path = Path(args.build_dir) / "dashboard.html"
    html_path.write_text(page)
    screenshot(html_path, Path(args.out), height)
    print(f"{args.out} ({WIDTH}x{height}) from {html_path}")


if __name__ == "__main__":
    main()
