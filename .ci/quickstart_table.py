"""CI: the README quotes the quickstart's results table; it must be the table this fresh install just produced.

    python .ci/quickstart_table.py QUICKSTART_FOLDER/results.md README.md
"""

import difflib
import sys
from pathlib import Path

START, END = "<!-- quickstart results: written by maecli quickstart (results.md), checked by .ci/run -->", "<!-- end of quickstart results -->"


def quoted(readme: str) -> str:
    assert START in readme and END in readme, f"README.md lacks the quickstart results markers ({START} ... {END})"
    return readme.split(START, 1)[1].split(END, 1)[0].strip()


if __name__ == "__main__":
    fresh, readme = Path(sys.argv[1]).read_text().strip(), quoted(Path(sys.argv[2]).read_text())
    if fresh != readme:
        print("README.md's quickstart table is stale; this fresh run gave (diff README -> fresh):", file=sys.stderr)
        print("\n".join(difflib.unified_diff(readme.splitlines(), fresh.splitlines(), "README.md", "results.md", lineterm="")), file=sys.stderr)
        sys.exit(1)
    print("README.md's quickstart table matches this fresh run")
