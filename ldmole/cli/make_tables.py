"""Results tables in the paper's layout from every metrics.json under a folder.

    ldmole-tables runs/                      # -> runs/tables/{results.md,<model>.csv}
    ldmole-tables runs/ --out docs/tables --digits 2

One table per model: rows = methods (with docs/method.md §5's published numbers and ours − published
where the paper has them), columns = MMLU-Pro ... RTE, Avg, active experts. Then one table per
(model, task) with the majority-class rate and standard errors (tasks.md). The Markdown is also
printed. Layout, averaging and footnotes: ldmole/report/tables.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ldmole.report.tables import (build_tables, collect_runs, format_markdown, format_task_markdown, task_tables,
                                  write_tables)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder searched recursively for metrics.json (e.g. a sweep root)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: ROOT/tables)")
    parser.add_argument("--digits", type=int, default=1, choices=(1, 2), help="decimals of the accuracy cells")
    args = parser.parse_args(argv)
    try:
        runs = collect_runs(args.root)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no metrics.json under {args.root}; finished runs write one (see ldmole-sweep)",
              file=sys.stderr)
        return 1
    tables = build_tables(runs)
    per_task = format_task_markdown(task_tables(runs), args.digits)
    print(format_markdown(tables, args.digits))
    print("## Per task\n\n" + per_task)
    out = args.out or args.root / "tables"
    written = write_tables(tables, out, args.digits)
    (out / "tasks.md").write_text(per_task)
    written.append(out / "tasks.md")
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
