"""CI: the README's claims about the quickstart must hold on this fresh run. The figures move between machines (thread
counts, CPU instruction sets, seeds: docs/benchmarks.md measures by how much), so CI checks the verdict, not the digits.

    python .ci/quickstart_verdict.py QUICKSTART_FOLDER/results.md README.md

The README quotes one run's tables and, below them, its claims: rows `| column | better | worse | margin |`, each
saying that in the results column whose header starts with `column`, the row `better` leads the row `worse` by more
than `margin` points. Prints the fresh tables beside the README's and every claim with its fresh lead; exit 1 when a
claim fails (or names a column or row the fresh tables lack: its lead shows as '-').
"""

import sys
from pathlib import Path

TABLES = "<!-- quickstart results: written by maecli quickstart (results.md) -->", "<!-- end of quickstart results -->"
CLAIMS = "<!-- quickstart claims: checked by .ci/run on a fresh run's results.md -->", "<!-- end of quickstart claims -->"


def between(text: str, markers: tuple[str, str]) -> str:
    start, end = markers
    assert start in text and end in text, f"README.md lacks the markers {start} ... {end}"
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def scores(tables: str) -> dict[tuple[str, str], float]:
    """{(column header, row name): percent} over every Markdown table of results.md; '-' cells are left out."""
    out = {}
    for table in tables.strip().split("\n\n"):
        header, _, *rows = table.strip().splitlines()
        columns = cells(header)
        for row in rows:
            name, *values = cells(row)
            for column, value in zip(columns[1:], values, strict=True):
                if value.endswith("%"):
                    out[column, name] = float(value[:-1])
    return out


def claims(readme: str) -> list[tuple[str, str, str, float]]:
    """(column prefix, better row, worse row, margin in points) for each row of the README's claims table."""
    _, _, *rows = between(readme, CLAIMS).splitlines()
    return [(column, better, worse, float(margin)) for column, better, worse, margin in map(cells, rows)]


def lead(table: dict[tuple[str, str], float], column: str, better: str, worse: str) -> float | None:
    """Points by which `better` leads `worse` in the one column whose header starts with `column` (None: not there)."""
    matches = sorted({c for c, _ in table if c.startswith(column)})
    if len(matches) != 1 or (matches[0], better) not in table or (matches[0], worse) not in table:
        return None
    return table[matches[0], better] - table[matches[0], worse]


def check(fresh: str, readme: str) -> list[str]:
    """One line per claim, 'ok' or 'FAILS', with the README's lead and the fresh one."""
    quoted, fresh_table = scores(between(readme, TABLES)), scores(fresh)
    lines = []
    for column, better, worse, margin in claims(readme):
        was, now = lead(quoted, column, better, worse), lead(fresh_table, column, better, worse)
        verdict = "ok" if now is not None and now > margin else "FAILS"
        was, now = ("-" if x is None else f"{x:+.1f}" for x in (was, now))
        lines.append(f"{verdict:5s} {column}: {better} ahead of {worse} by more than {margin:g} points: README {was}, this run {now}")
    return lines


if __name__ == "__main__":
    fresh, readme = Path(sys.argv[1]).read_text(), Path(sys.argv[2]).read_text()
    print("the README's tables:\n" + between(readme, TABLES) + "\n\nthis fresh run's:\n" + fresh.strip() + "\n")
    verdicts = check(fresh, readme)
    print("\n".join(verdicts))
    if any(v.startswith("FAILS") for v in verdicts):
        print("a claim of README.md does not hold on this fresh run of the quickstart", file=sys.stderr)
        sys.exit(1)
    print(f"all {len(verdicts)} claims of README.md hold on this fresh run")
