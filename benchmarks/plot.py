"""Re-render results.md and speedup.png from a saved run's results.json, e.g. a GPU run made
on a machine without matplotlib.

    python benchmarks/plot.py DIR        # reads DIR/results.json, writes DIR/results.md, DIR/speedup.png
"""

import argparse
import json
import sys
from pathlib import Path

from dynnet_ext import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="benchmarks/plot.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="folder holding results.json (written by bench --out)")
    args = parser.parse_args()
    results = json.loads((args.dir / "results.json").read_text())
    if results.get("schema") not in range(1, bench.SCHEMA + 1):  # later schemas only added fields
        sys.exit(f"{args.dir / 'results.json'}: schema {results.get('schema')}, this code reads 1-{bench.SCHEMA}")
    bench.render(results, args.dir)
