"""``report.html``: one self-contained page (inline CSS and JS, PNGs as data: URIs).

It works offline and makes no request at all: its Content-Security-Policy allows nothing but
inline code and data: images. The metrics table is static HTML; the feature cards are drawn by
a small script from the JSON embedded in the page, with search (a feature number, or text in
its top contexts) and pagination. ``report.html#q=the`` opens with a search already applied.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

from lenslab_workspace.analysis.evaluate import METRIC_LABELS

PAGE_SIZE = 20
# Nothing but the page's own inline code and data: images; no request can leave the page.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:16px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table.metrics{border-collapse:collapse}table.metrics td,table.metrics th{border:1px solid #ccc;padding:3px 10px}
table.metrics td.v{text-align:right;font-variant-numeric:tabular-nums}
.plots img{max-width:100%;border:1px solid #eee;margin:4px 0}
.bar{display:flex;gap:10px;align-items:center;margin:10px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:10px 0}
.card h3{margin:0 0 4px 0;font-size:15px}.stats{color:#555;font-size:12px}
.ctx{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;margin:3px 0}
.ctx span{border-radius:2px}.ctx span.focus{outline:1px solid #a00;font-weight:bold}
.meta{color:#666;font-size:12px}
"""

SCRIPT = """
(function(){
var DATA=JSON.parse(document.getElementById('feature-data').textContent);
var PAGE=%(page)d, page=0, shown=[];
var q=document.getElementById('search'), list=document.getElementById('cards'),
    count=document.getElementById('count'), label=document.getElementById('page');
function text(f){return f.contexts.map(function(c){return c.tokens.join('');}).join('\\n').toLowerCase();}
DATA.forEach(function(f){f._text=text(f);});
function matches(f,s){
  if(!s) return true;
  if(/^#?\\d+$/.test(s)) return f.feature===parseInt(s.replace('#',''),10);
  return f._text.indexOf(s.toLowerCase())>=0;
}
function esc(s){return s.replace(/[&<>"]/g,function(c){return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c];});}
function ctx(c,max){
  return '<div class="ctx">'+c.tokens.map(function(t,i){
    var a=c.activations[i], alpha=max>0?Math.max(0,a)/max:0;
    return '<span'+(i===c.focus?' class="focus"':'')+' title="'+a.toFixed(3)+'" style="background:rgba(220,40,40,'+
      alpha.toFixed(3)+')">'+esc(t)+'</span>';}).join('')+'</div>';
}
function card(f){
  var max=f.contexts.length?f.contexts[0].value:0;
  return '<div class="card" data-feature="'+f.feature+'"><h3>Feature '+f.feature+'</h3><div class="stats">density '+
    f.density.toExponential(2)+' &middot; mean activation '+f.mean_activation.toFixed(3)+' &middot; max '+
    f.max_activation.toFixed(3)+'</div>'+f.contexts.map(function(c){return ctx(c,max);}).join('')+'</div>';
}
function render(){
  var pages=Math.max(1,Math.ceil(shown.length/PAGE)); page=Math.min(page,pages-1);
  list.innerHTML=shown.slice(page*PAGE,(page+1)*PAGE).map(card).join('');
  count.textContent=shown.length+' features'; count.setAttribute('data-count',shown.length);
  label.textContent='page '+(page+1)+' of '+pages;
}
function search(){
  var s=q.value.trim(); shown=DATA.filter(function(f){return matches(f,s);}); page=0; render();
  document.body.setAttribute('data-query',s);
}
q.addEventListener('input',search);
document.getElementById('prev').onclick=function(){if(page>0){page--;render();}};
document.getElementById('next').onclick=function(){page++;render();};
var m=/[#&]q=([^&]*)/.exec(location.hash); if(m) q.value=decodeURIComponent(m[1]);
search();
})();
"""


def _metric_value(name: str, value: Any) -> str:
    if isinstance(value, float) and name in ("dead_fraction", "dense_fraction"):
        return f"{100 * value:.1f} %"
    if name == "tokens_evaluated":
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def metrics_table(metrics: dict[str, Any]) -> str:
    rows = [
        f'<tr data-metric="{name}"><th>{html.escape(label)}</th>'
        f'<td class="v">{_metric_value(name, metrics[name])}</td></tr>'
        for name, label in METRIC_LABELS.items()
        if name in metrics
    ]
    return '<table class="metrics" id="metrics">' + "".join(rows) + "</table>"


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render(summary: dict[str, Any], records: list[dict[str, Any]], plots: list[Path]) -> str:
    """The page; ``records`` with contexts become cards, ``plots`` are inlined."""
    cards = [r for r in records if r["contexts"]]
    data = json.dumps(cards, separators=(",", ":")).replace("</", "<\\/")
    title = f"lenslab-eval: {summary['run']}"
    source = summary.get("tokens_source", "")
    meta = " &middot; ".join(
        html.escape(text)
        for text in (
            f"SAE {summary.get('sae', '')}",
            f"hook {summary.get('hook_name', '')}",
            str(source),
            json.dumps(summary.get("versions", {})),
        )
    )
    images = "".join(f'<img alt="{html.escape(p.stem)}" src="{_png(p)}">' for p in plots)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{meta}</p>
<h2>Metrics</h2>
{metrics_table(summary["metrics"])}
<h2>Plots</h2>
<div class="plots">{images}</div>
<h2>Features</h2>
<div class="bar"><input id="search" type="search" placeholder="feature number or text in its contexts" size="40">
<span id="count" data-count="0"></span>
<button id="prev">&larr;</button><span id="page"></span><button id="next">&rarr;</button></div>
<div id="cards"></div>
<script type="application/json" id="feature-data">{data}</script>
<script>{SCRIPT % {"page": PAGE_SIZE}}</script>
</body></html>
"""


def write_report(directory: Path, summary: dict[str, Any], records: list[dict[str, Any]], plots: list[Path]) -> Path:
    target = directory / "report.html"
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(render(summary, records, plots), encoding="utf-8")
    os.replace(tmp, target)
    return target
