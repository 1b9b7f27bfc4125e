"""House rules that a code review would otherwise have to catch: boundaries, lint, CI = README."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_gpt_library_never_imports_prefect_or_mlflow():
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_modules(p) & {"prefect", "mlflow", "flows"})
        for p in (ROOT / "gpt").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    test_cmds = [
        line for b in blocks for line in b.splitlines() if "pytest" in line and "pip install" in line
    ]
    assert test_cmds, "README.md must show one command that installs and runs the tests"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_cmds[0].strip() in ci, ".ci/run must call exactly the README's test command"


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.prefix) / "bin" / "ruff").exists(),
    reason="ruff not installed",
)
def test_ruff_lint_and_format_are_clean():
    ruff = shutil.which("ruff") or str(Path(sys.prefix) / "bin" / "ruff")
    lint = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_generate_and_serve_commands_parse_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from gptflow.cli import build_parser\n"
        "for argv in (['generate', '--bundle', 'b', 'hi'], ['generate', 'hi'], ['serve', '--bundle', 'b'], ['serve']):\n"
        "    assert build_parser(argv).parse_args(argv).command == argv[0]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_reports_failed_and_errored_cuda_tests_as_failed(tmp_path):
    # gpu_check.sh's verdict comes from pytest's JUnit XML; a failure element has no children, so
    # a truthiness test would read it as a pass and a broken GPU run would print all_passed.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase name="ok"/>'
        '<testcase name="bad"><failure message="assert">boom</failure></testcase>'
        '<testcase name="broken"><error message="fixture"/></testcase>'
        '<testcase name="gpu"><skipped message="needs a CUDA GPU"/></testcase></testsuite></testsuites>'
    )
    assert gpu_check.test_outcomes(junit) == {
        "ok": "passed",
        "bad": "failed",
        "broken": "failed",
        "gpu": "skipped: needs a CUDA GPU",
    }
