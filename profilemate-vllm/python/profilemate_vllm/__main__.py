"""``python -m profilemate_vllm``: merge a run's parts, list runs, check the installed vLLM.

    python -m profilemate_vllm merge DIR [--run RUN]   build DIR's contract files from its parts
    python -m profilemate_vllm runs DIR                list the runs recorded under DIR
    python -m profilemate_vllm check                   which vLLM methods the plugin can wrap
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profilemate_vllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="build DIR's contract files from the parts each process wrote")
    m.add_argument("dir")
    m.add_argument("--run", default=None, help="the run to merge (default: the latest)")
    m.add_argument("--json", action="store_true", help="print the merge report as JSON")
    r = sub.add_parser("runs", help="list the runs recorded under DIR")
    r.add_argument("dir")
    sub.add_parser("check", help="check every vLLM method the plugin wraps against the installed vLLM")
    args = parser.parse_args(argv)

    if args.command == "merge":
        from . import merge

        try:
            report = merge(args.dir, args.run)
        except RuntimeError as e:
            print(f"profilemate-vllm: {e}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"merged run {report['run']} into {report['dir']}")
            for p in report["parts"]:
                state = "finished" if p["finished"] else "NOT shut down cleanly (killed?)"
                rank = "" if p["rank"] is None else f" rank {p['rank']}"
                skipped = f", {p['skipped_lines']} torn line(s) skipped" if p["skipped_lines"] else ""
                got = "recovered" if not p["finished"] else "read"
                rows = f", {sum(p['rows'].values())} rows {got}"
                print(f"  {p['dir']}: {p['role']}{rank} pid {p['pid']}, {state}{rows}{skipped}")
            for name, n in report["rows"].items():
                print(f"  {name}: {n} rows")
        return 0
    if args.command == "runs":
        from . import runs

        for run in runs(args.dir):
            print(run)
        return 0
    from ._hooks import SPECS, check

    bad = 0
    for spec in SPECS:
        _, status = check(spec)
        bad += status != "ok"
        where = ".".join(n for n in (spec.module, spec.cls, spec.method) if n)
        print(f"{'ok  ' if status == 'ok' else 'FAIL'} {where}: {status}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
