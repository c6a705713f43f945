"""Regenerate the bundled public-domain texts from Debian's bible-kjv (`apt-get install bible-kjv`).

    python scripts/make_texts.py

Writes headsmith/data/kjv_calibration.txt (Genesis and Exodus: calibration and healing) and
headsmith/data/kjv_eval.txt (the Gospel of John: held-out evaluation), one chapter per paragraph.
"""

import re
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "headsmith" / "data"


def prose(spec: str) -> str:
    raw = subprocess.run(["bible", "-f", spec], capture_output=True, text=True, check=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in raw.splitlines():
        m = re.match(r"^(\w+?)(\d+):(\d+) (.*)$", line.strip())
        if m is None:
            continue
        chapters.setdefault(m.group(1) + m.group(2), []).append(m.group(4).strip())
    return "\n\n".join(" ".join(verses) for verses in chapters.values()) + "\n"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "kjv_calibration.txt").write_text(prose("Gen1:1-Exo40:38"))
    (OUT / "kjv_eval.txt").write_text(prose("John1:1-John21:25"))


if __name__ == "__main__":
    main()
