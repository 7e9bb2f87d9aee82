#!/usr/bin/env python3
"""Record or compare fitquant's JSON contracts (`inspect`, `estimate`, `hw`, `quants`, `plan`) on the test corpus.

A refactoring must leave every JSON output byte-identical. Record the outputs of one tree, then compare
another tree's outputs with the record:

    .venv/bin/python scripts/check_contracts.py --write /tmp/before.json --launcher-root /path/to/old/tree
    .venv/bin/python scripts/check_contracts.py --compare /tmp/before.json

It runs each command in-process (click's runner) on the tiny-model corpus (one folder per family), the
real-dimension sparse corpus and the embedded default model, with described machines (--vram, --ram,
--unified), so the outputs do not depend on this machine's free memory. Each command starts with an
empty FITQUANT_HOME. Prints one line per difference and exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _commands(corpus_root: Path) -> list[list[str]]:
    import corpus as corpus_mod
    import corpus_real

    tiny = corpus_mod.build_corpus(corpus_root)
    real = corpus_real.build_real_corpus(corpus_root)
    folders: dict[str, Path] = {}
    for m in tiny:
        folder = corpus_root / "contracts" / m.family_name
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / m.path.name
        if not link.exists():
            link.symlink_to(m.path)
        folders[m.family_name] = folder
    commands: list[list[str]] = [
        ["hw", "--json", "--vram", "24GiB,12GiB", "--ram", "64GiB"],
        ["hw", "--json", "--unified", "32GiB"],
        ["inspect", "--json"],
        ["estimate", "--json", "--ctx", "32k"],
        ["quants", "--json"],
        ["plan", "--json", "--ctx", "8k", "--vram", "2GiB", "--no-engine"],
    ]
    for m in [m for m in tiny if m.quant in ("Q4_K_M", "F16")] + real:
        path = str(m.path)
        commands += [
            ["inspect", "--json", path],
            ["estimate", "--json", "--ctx", "4096", path],
            ["estimate", "--json", "--ctx", "32k", "--vram", "24GiB", path],
            [
                "estimate",
                "--json",
                "--ctx",
                "32k",
                "--kv",
                "f16",
                "--flash-attn",
                "off",
                "--ngl",
                "3",
                "--vram",
                "8GiB",
                "--parallel",
                "4",
                path,
            ],
            ["estimate", "--json", "--ctx", "8k", "--unified", "32GiB", "--swa-full", "--ubatch", "256", path],
        ]
    for _, folder in sorted(folders.items()):
        commands += [
            ["quants", "--json", str(folder)],
            ["plan", "--json", "--ctx", "16k", "--vram", "318MiB", "--reserve", "0", "--no-engine", str(folder)],
            ["plan", "--json", "--ctx", "128k", "--vram", "400MiB", "--reserve", "8MiB", "--no-engine", str(folder)],
            [
                "plan",
                "--json",
                "--ctx",
                "32k",
                "--vram",
                "500MiB,300MiB",
                "--reserve",
                "1MiB",
                "--no-engine",
                str(folder),
            ],
            ["plan", "--json", "--ctx", "8k", "--vram", "275MiB", "--reserve", "0", "--no-engine", str(folder)],
            ["plan", "--json", "--ctx", "4k", "--ram", "1040MiB", "--min-quant", "Q2_K", str(folder)],
            [
                "plan",
                "--json",
                "--ctx",
                "64k",
                "--vram",
                "300MiB",
                "--strict",
                "--kv",
                "f16",
                "--no-engine",
                str(folder),
            ],
        ]
    for m in real:
        commands.append(["plan", "--json", "--ctx", "32k", "--vram", "12GiB", "--no-engine", str(m.path)])
    return commands


def run_all(corpus_root: Path) -> dict[str, dict[str, Any]]:
    from click.testing import CliRunner

    from launcher.cli import main

    results: dict[str, dict[str, Any]] = {}
    # one fixed (emptied) home, so paths under it, such as the embedded model's, are the same in every run
    home = Path(tempfile.gettempdir()) / "fitquant-contracts-home"
    for argv in _commands(corpus_root):
        shutil.rmtree(home, ignore_errors=True)
        env = {"FITQUANT_HOME": str(home), "OLLAMA_HOST": "127.0.0.1:9", "CUDA_VISIBLE_DEVICES": None}
        result = CliRunner().invoke(main, argv, env=env, catch_exceptions=False)
        results[" ".join(argv)] = {"exit_code": result.exit_code, "stdout": result.output}
    shutil.rmtree(home, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", type=Path, help="record the outputs into this file")
    action.add_argument("--compare", type=Path, help="compare the outputs with this record")
    parser.add_argument("--launcher-root", type=Path, default=ROOT, help="the tree whose launcher/ to run")
    args = parser.parse_args()
    sys.path.insert(0, str(args.launcher_root.resolve()))
    import launcher

    print(f"launcher from {Path(launcher.__file__).parent}", file=sys.stderr)
    os.environ.pop("OLLAMA_HOST", None)
    corpus_root = Path(os.environ.get("FITQUANT_TEST_CORPUS") or Path.home() / ".cache" / "fitquant-test-corpus")
    results = run_all(corpus_root)
    if args.write:
        args.write.write_text(json.dumps(results, indent=1, sort_keys=True))
        print(f"{len(results)} outputs recorded in {args.write}")
        return 0
    record = json.loads(args.compare.read_text())
    differ = [key for key in sorted(set(record) | set(results)) if record.get(key) != results.get(key)]
    for key in differ:
        print(f"differs: fitquant {key}")
    same = len(results) - len(differ)
    print(f"{same} of {len(record)} JSON outputs byte-identical, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
