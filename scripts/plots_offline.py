"""`dvc plots show` for a machine without internet (a GPU server, often).

    python scripts/plots_offline.py [dvc plots show arguments, e.g. --out reports/plots]

`dvc plots show` writes an HTML page whose Vega, Vega-Lite and vega-embed
scripts load from a CDN, so offline the page is blank. This writes an
`--html-template` with those libraries inlined (the bundle that
vl-convert-python, from the Vega project, builds from its own copies: no
download) and runs `dvc plots show` with it. The page then has no external
script sources. The default output folder is `dvc_plots/`, as dvc's.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# dvc-render's Vega-Lite templates are written for Vega-Lite 5
VEGA_LITE = "5.21"
TEMPLATE = Path(".dvc/tmp/plots_offline_template.html")


def offline_template() -> str:
    """An HTML page for dvc's plots with Vega, Vega-Lite and vega-embed inlined."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)  # defines window.vegaEmbed
    for text in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        if text in bundle:  # it would end the script early, or dvc would substitute inside it
            raise RuntimeError(f"vl-convert's bundle contains {text!r}: cannot inline it")
    # no {scripts} placeholder: dvc's CDN <script src=...> tags are left out
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>clickdog plots</title>\n"
            f"<script>\n{bundle}\n</script>\n<style>table {{ border-spacing: 15px; }}</style>\n</head>\n"
            "<body>\n{plot_divs}\n</body>\n</html>\n")


def main(argv: list[str]) -> int:
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    TEMPLATE.write_text(offline_template(), encoding="utf-8")
    return subprocess.run(["dvc", "plots", "show", "--html-template", str(TEMPLATE), *argv]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
