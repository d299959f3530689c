"""index.html beside generated samples: every roll's picture, its audio player and its MIDI file
on one page that any browser opens from disk (no server, no scripts from elsewhere).

Each sample is a <figure id="sample_NNN">; a few lines of inline script fill in, once the
browser has really loaded them, each picture's size and each clip's duration, so the page
shows at a glance that everything plays (and a headless browser can check it).
"""

import html
import json
from pathlib import Path

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; background: #111; color: #ddd; margin: 1.5em; }}
figure {{ display: inline-block; margin: 0 1.5em 1.5em 0; vertical-align: top; }}
figcaption {{ font-size: 0.9em; margin-top: 0.3em; }}
img {{ display: block; image-rendering: pixelated; }}
a {{ color: #8cf; }}
code {{ color: #fc8; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{summary}</p>
{figures}
<script>
for (const img of document.querySelectorAll("img")) {{
  const mark = () => {{ if (img.naturalWidth) img.closest("figure").dataset.picture = img.naturalWidth + "x" + img.naturalHeight; }};
  img.complete ? mark() : img.addEventListener("load", mark);
}}
for (const audio of document.querySelectorAll("audio")) {{
  const mark = () => {{
    const figure = audio.closest("figure");
    figure.dataset.seconds = audio.duration.toFixed(2);
    figure.querySelector(".duration").textContent = audio.duration.toFixed(1) + " s";
  }};
  audio.readyState >= 1 ? mark() : audio.addEventListener("loadedmetadata", mark);
}}
</script>
</body>
</html>
"""


def write_index(out: Path, report: dict) -> Path:
    """Writes out/index.html for a generation report (generation.json's contents)."""
    figures = []
    for sample in report["samples"]:
        files = sample["files"]
        stem = Path(files[0]).stem
        parts = [f'<figure id="{stem}">']
        picture = next((f for f in files if f.endswith(".png")), None)
        if picture:
            parts.append(f'<img src="{html.escape(picture)}" alt="piano roll of {stem}">')
        wav = next((f for f in files if f.endswith(".wav")), None)
        if wav:
            parts.append(f'<audio controls preload="metadata" src="{html.escape(wav)}"></audio>')
        links = " ".join(f'<a href="{html.escape(f)}">{html.escape(Path(f).suffix[1:])}</a>' for f in files)
        parts.append(
            f'<figcaption>{stem}: {sample["notes"]} notes <span class="duration"></span> {links}</figcaption>'
        )
        figures.append("".join(parts) + "</figure>")
    settings = {
        k: report[k]
        for k in ("mode", "seed", "temperature", "min_p", "num_iter_list", "target_width")
        if k in report
    }
    summary = html.escape(
        f"{len(report['samples'])} samples from {report.get('checkpoint', '?')}; " + json.dumps(settings)
    )
    if report.get("audio"):
        summary += f"<br>audio: {html.escape(report['audio'])}"
    path = Path(out) / "index.html"
    path.write_text(_PAGE.format(title="FractalMIDI samples", summary=summary, figures="\n".join(figures)))
    return path
