"""The library's import graph: core modules pull in no optional extra, no benchmark, CLI or test code, and a missing
extra fails with a typed error that names it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kvpack"
CORE = ("kvpack", "kvpack.store", "kvpack.codecs", "kvpack.context")
#: Top-level packages only an optional extra, a benchmark, the CLI or the tests bring in.
FORBIDDEN_ROOTS = ("typer", "rich", "matplotlib", "redis", "vllm", "tests", "conftest", "servers")
FORBIDDEN_KVPACK = ("kvpack.cli", "kvpack.bench")


def python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (nothing imported yet), from a directory outside the repository."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")


def block(*modules: str) -> str:
    """Code that makes importing each of ``modules`` fail, as if its package were not installed."""
    return "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)


def test_core_imports_no_extra_benchmark_cli_or_tests() -> None:
    code = f"import sys\nfor name in {CORE!r}:\n    __import__(name)\nprint('\\n'.join(sorted(sys.modules)))\n"
    result = python(code)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    bad = [m for m in loaded if m.split(".")[0] in FORBIDDEN_ROOTS
           or any(m == p or m.startswith(p + ".") for p in FORBIDDEN_KVPACK)]
    assert bad == []


def _kvpack_imports(path: Path) -> set[str]:
    """The kvpack modules ``path`` imports (at any depth in the file, lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("kvpack")}


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_library_never_imports_bench_or_cli(path: Path) -> None:
    relative = path.relative_to(SRC)
    if relative.parts[0] == "bench" or relative == Path("demo.py"):  # the demo is an application, like a benchmark
        forbidden: tuple[str, ...] = ("kvpack.cli",)
    elif relative == Path("cli.py"):
        return
    else:
        forbidden = FORBIDDEN_KVPACK
    bad = {m for m in _kvpack_imports(path) if any(m == p or m.startswith(p + ".") for p in forbidden)}
    assert bad == set()


def test_redis_store_without_redis_py_names_the_extra() -> None:
    code = block("redis") + (
        "import kvpack.store\n"
        "from kvpack.errors import StoreError\n"
        "assert isinstance(kvpack.store.open('memory://'), kvpack.store.MemoryStore)\n"
        "for attempt in (lambda: kvpack.store.open('redis://127.0.0.1:1/0'), lambda: kvpack.store.RedisStore):\n"
        "    try:\n"
        "        attempt()\n"
        "    except StoreError as exc:\n"
        "        print(exc)\n"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("kvpack[redis]" in line for line in lines)


def test_gguf_model_without_gguf_names_the_extra(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    code = block("gguf") + (
        "from kvpack import models\n"
        "from kvpack.errors import ModelLoadError\n"
        "try:\n"
        f"    models.load({str(fake)!r})\n"
        "except ModelLoadError as exc:\n"
        "    print(exc)\n"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert "kvpack[models]" in result.stdout and "gguf" in result.stdout


def test_cli_without_typer_prints_one_line_naming_the_extra() -> None:
    result = python(block("typer") + "from kvpack.cli import app\n")
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "kvpack[cli]" in result.stderr


def test_vllm_connector_without_vllm_names_the_extra() -> None:
    result = python(block("vllm") + (
        "try:\n"
        "    import kvpack.integrations.vllm\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    ))
    assert result.returncode == 0, result.stderr
    assert "kvpack[vllm]" in result.stdout and "make vllm-venv" in result.stdout
