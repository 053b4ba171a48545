"""Write the CI gate's bounds from a report: each variant may lose a little more than it does now.

    python scripts/update_bounds.py exports/demo/report/report.json > calibration/bounds/tiny.toml

Perplexity ratio bound: the measured ratio plus half its excess over 1 plus 0.002 (run-to-run
noise on the tiny model is far below that; a real regression, e.g. an expert left unquantized or
GPTQ falling back to RTN, moves it more). Size bound: measured bytes + 1 %.
Router agreement bound: the measured minimum over layers minus 0.05.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    with open(sys.argv[1]) as f:
        report = json.load(f)
    print("# The CI gate's bounds for the embedded tiny model (see scripts/update_bounds.py).")
    print(f"# From a report of tool {report['tool_version']} on {report['dataset']['name']}, "
          f"ctx {report['settings']['ctx']}.")
    for v in report["variants"]:
        ratio = v["ppl_ratio"]
        weight = v["memory"]["weight_bytes"]
        print(f"\n[variants.{json.dumps(v['name'])}]")
        print(f"max_ppl_ratio = {ratio + max(ratio - 1, 0) / 2 + 0.002:.4f}  # measured {ratio:.4f}")
        print(f"max_weight_bytes = {int(weight * 1.01)}  # measured {weight}")
        agreement = (v.get("comparison") or {}).get("router_agreement")
        if agreement:
            print(f"min_router_agreement = {min(agreement) - 0.05:.3f}  # measured {min(agreement):.3f}")


if __name__ == "__main__":
    main()
