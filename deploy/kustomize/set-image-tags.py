"""Point an overlay's `images:` at the immutable tags of the last `make images` (build/images/report.json).

    .venv/bin/python deploy/kustomize/set-image-tags.py deploy/kustomize/overlays/local

Rewrites only the `newTag:` lines of the overlay's `images:` entries named
localhost/voicemesh/<kind> (keeping their comments and any newName), so the overlay names
the exact images that were built and loaded (`kind load image-archive`).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "build" / "images" / "report.json"


def immutable_tags(report: dict) -> dict[str, str]:
    """kind -> the VERSION-INPUTS tag of its image."""
    tags = {}
    for image in report["images"]:
        for tag in image["tags"]:
            value = tag.rsplit(":", 1)[1]
            if value != image["version"]:
                tags[image["kind"]] = value
    return tags


def rewrite(text: str, tags: dict[str, str]) -> tuple[str, list[str]]:
    changed: list[str] = []
    lines = text.splitlines(keepends=True)
    current = None
    for index, line in enumerate(lines):
        name = re.match(r"^- name: \S*/voicemesh/([a-z]+)\s*$", line)
        if name:
            current = name.group(1)
            continue
        tag = re.match(r"^(\s+newTag: )(\S+)(.*)$", line, re.S)
        if tag and current in tags:
            if tag.group(2) != tags[current]:
                changed.append(f"{current}: {tag.group(2)} -> {tags[current]}")
            lines[index] = f"{tag.group(1)}{tags[current]}{tag.group(3)}"
            current = None
        elif not line.startswith(" "):
            current = None
    return "".join(lines), changed


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    kustomization = Path(argv[0]) / "kustomization.yaml"
    if not REPORT.exists():
        print(f"no {REPORT.relative_to(ROOT)}: run `make images` first", file=sys.stderr)
        return 1
    text, changed = rewrite(kustomization.read_text(), immutable_tags(json.loads(REPORT.read_text())))
    kustomization.write_text(text)
    print("\n".join(changed) if changed else f"{kustomization}: already at the built tags")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
