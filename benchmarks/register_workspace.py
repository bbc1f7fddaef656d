"""Make the workspace's packages importable, entry points included, without installing them.

For machines that cannot build wheels (no network, no build backend), e.g. the GPU machine:
writes a ``.pth``-free site folder holding one ``*.dist-info`` per package (METADATA and
``entry_points.txt`` read from its pyproject) and prints the PYTHONPATH to export.

    export PYTHONPATH=$(python3 benchmarks/register_workspace.py /tmp/kvbm-site)
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(site: Path) -> None:
    site.mkdir(parents=True, exist_ok=True)
    paths = [str(site)]
    for pyproject in sorted(ROOT.glob("*/*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        name, version = project["name"], project["version"]
        dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir(exist_ok=True)
        (dist_info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        lines = []
        for group, entries in project.get("entry-points", {}).items():
            lines.append(f"[{group}]")
            lines.extend(f"{key} = {value}" for key, value in entries.items())
        (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        paths.append(str(pyproject.parent / "src"))
    print(":".join(paths))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
