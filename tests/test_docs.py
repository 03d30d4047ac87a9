"""The README and docs/ say what runs, and it does (issue 23).

- Every fenced ``python`` block of README.md, and every one in docs/*.md whose fence follows the line
  ``<!-- runs-on-cpu -->``, runs in a fresh Python process on the CPU reference path (no TRITON_INTERPRET, no
  LORA_FAST_* switch, Hugging Face offline) in a scratch folder, with this checkout's lora_fast first on the
  path; it must exit 0 without a warning issued by lora_fast. The quick start is the README's first block.
- Every python block, run or not, compiles.
- Every ``python -m MODULE`` names a module that exists, every ``pytest PATH[::TEST]`` a file (and a test in it),
  every ``pip install -e ".[EXTRA]"`` an extra of setup.py, every repository path shown in code a file or folder;
  nothing slow is run.
- Every relative link names a file, and its #anchor a heading of that file.

docs/README.md states these conventions for writers; docs/_pending/ (notes the lead folds in) is not read.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_MARK = "<!-- runs-on-cpu -->"
# pages another command writes; a link to one that this checkout has not generated yet is skipped, not failed
GENERATED = {"docs/compile-report.md": "python -m lora_fast.compile_report --markdown docs/compile-report.md"}
# top-level folders whose paths, when shown in code, must exist (others are relative to a package or a placeholder)
REPO_DIRS = ("bench", "tests", "examples", "lora_fast", "docs", ".ci")
SHELL_LANGS = ("bash", "sh", "shell", "console", "")

FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


class Block(NamedTuple):
    page: Path
    line: int
    lang: str
    code: str
    runs: bool

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks(page: Path) -> List[Block]:
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        indent = len(m.group("indent"))
        code = "".join(line[indent:] if line[:indent].isspace() else line
                       for line in m.group("body").splitlines(keepends=True))
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        lang = m.group("lang").lower()
        runs = lang == "python" and (page.name == "README.md" and page.parent == ROOT or before == RUN_MARK)
        out.append(Block(page, text.count("\n", 0, m.start()) + 1, lang, code, runs))
    return out


def _prose(page: Path) -> str:
    """The page without its fenced blocks (where inline code and links live)."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


BLOCKS = [b for page in PAGES for b in _blocks(page)]
RUNNABLE = [b for b in BLOCKS if b.runs]

# Runs the blocks one after the other in one process (the imports of torch, transformers and peft, most of the
# time, are paid once), each from a file of its own in a folder of its own, with fresh globals. warnings.warn
# fails on a warning issued from lora_fast's own code (its modules call it through the module attribute): a
# block that makes lora-fast warn is a block to fix. argv: a JSON list of [name, file, folder], the result file.
RUNNER = """
import contextlib, io, json, os, runpy, sys, traceback, warnings
_warn = warnings.warn
def warn(message, category=None, stacklevel=1, source=None, **kwargs):
    caller = sys._getframe(1).f_globals.get("__name__", "")
    if caller == "lora_fast" or caller.startswith("lora_fast."):
        raise AssertionError(f"lora-fast warned ({caller}): {message}")
    return _warn(message, category, stacklevel + 1, source, **kwargs)
warnings.warn = warn
results = {}
for name, path, folder in json.load(open(sys.argv[1])):
    os.chdir(folder)
    out = io.StringIO()
    error = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        error = None if stop.code in (0, None) else f"SystemExit({stop.code!r})"
    except BaseException:
        error = traceback.format_exc()
    results[name] = {"error": error, "output": out.getvalue()[-3000:]}
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
"""


def _cpu_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("LORA_FAST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["HF_HUB_OFFLINE"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""   # the CPU path even on a GPU machine: these blocks promise a CPU
    return env


def _missing_module(block: Block):
    for module in re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", block.code, re.M):
        if importlib.util.find_spec(module) is None:
            return module
    return None


@pytest.fixture(scope="module")
def block_results(tmp_path_factory):
    """{block name: {"error": traceback or None, "output": its last output}} for the blocks that can run here,
    and the runner process's own stdout and stderr."""
    root = tmp_path_factory.mktemp("doc-blocks")
    jobs = []
    for i, block in enumerate(RUNNABLE):
        if _missing_module(block) is None:
            folder = root / f"block{i}"
            folder.mkdir()
            (folder / "block.py").write_text(block.code, encoding="utf-8")
            jobs.append([block.name, str(folder / "block.py"), str(folder)])
    (root / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", RUNNER, str(root / "jobs.json"), str(root / "results.json")],
                          cwd=root, env=_cpu_env(), capture_output=True, text=True, timeout=900)
    results = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
    return results, f"runner exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def test_conventions_hold():
    """The quick start is among the blocks that run, and every run mark sits right above a python fence."""
    readme = [b for b in RUNNABLE if b.page == ROOT / "README.md"]
    assert readme, "README.md has no python block"
    quick = readme[0].code
    for step in ("import torch", "replace_linear_with_lora", ".backward()", "opt.step()", "save_lora("):
        assert step in quick, f"the quick start (README.md:{readme[0].line}) lost its step {step!r}"
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() == RUN_MARK:
                following = lines[i + 1].strip() if i + 1 < len(lines) else ""
                assert following.startswith("```python"), \
                    f"{page.relative_to(ROOT)}:{i + 1}: {RUN_MARK} must be right above a ```python fence"


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.name)
def test_block_runs_on_cpu(block, block_results):
    missing = _missing_module(block)
    if missing:
        pytest.skip(f"{block.name} needs {missing}, not installed here (pip install -e '.[test]')")
    results, process = block_results
    assert block.name in results, f"{block.name} did not finish: the runner stopped before it\n{process}"
    error = results[block.name]["error"]
    assert error is None, f"{block.name} failed:\n{results[block.name]['output']}\n{error}"


def test_every_python_block_compiles():
    for block in BLOCKS:
        if block.lang == "python":
            compile(block.code, block.name, "exec")


def _code_texts():
    """(where, text) of every shell block line and every inline code span of every page."""
    for page in PAGES:
        rel = page.relative_to(ROOT)
        for block in _blocks(page):
            if block.lang in SHELL_LANGS:
                for i, line in enumerate(block.code.splitlines()):
                    yield f"{rel}:{block.line + 1 + i}", line.split(" #", 1)[0]
        for span in INLINE_CODE.findall(_prose(page)):
            yield f"{rel}", span


def _extras() -> set:
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    body = setup[setup.index("extras_require"):]
    return set(re.findall(r'^\s*"([\w-]+)":', body, re.M))


def _placeholder(word: str) -> bool:
    """MODULE, PATH[::TEST], EXTRA: the conventions' own placeholders, in capitals."""
    return re.fullmatch(r"[A-Z][A-Z_]*(\[.*)?", word) is not None


def test_commands_name_what_exists():
    extras = _extras()
    checked = 0
    for where, text in _code_texts():
        for module in re.findall(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)", text):
            if _placeholder(module):
                continue
            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module!r} in `{text}`"
            checked += 1
        for arg in re.findall(r"\bpytest\s+'?([^\s'-][^\s']*)", text):
            path, _, test = arg.partition("::")
            if _placeholder(path):
                continue
            assert (ROOT / path).exists(), f"{where}: no {path} in `{text}`"
            if test:
                name = test.split("[", 1)[0]
                assert re.search(rf"^\s*def {re.escape(name)}\(", (ROOT / path).read_text(encoding="utf-8"), re.M), \
                    f"{where}: no test {name} in {path}"
            checked += 1
        for extra in re.findall(r"pip install -e \"?\.\[([\w,-]+)\]", text):
            for name in extra.split(","):
                if _placeholder(name):
                    continue
                assert name in extras, f"{where}: setup.py has no extra {name!r} (it has {sorted(extras)})"
                checked += 1
        for token in text.split():
            token = token.strip("'\"`(),;").split("::", 1)[0].rstrip(".:")
            if token.split("/", 1)[0] in REPO_DIRS and "/" in token and not re.search(r"[<>*{}$]", token):
                assert (ROOT / token).exists(), f"{where}: no {token} in the repository (`{text}`)"
                checked += 1
    assert checked > 20, "the docs show fewer commands than expected: is the extraction broken?"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_links_lead_somewhere():
    for page in PAGES:
        for target in LINK.findall(_prose(page)):
            if re.match(r"[a-z]+:", target):
                continue   # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            if not dest.exists() and rel in GENERATED:
                continue   # checked by test_generated_pages_exist_or_are_named
            assert dest.exists(), f"{page.relative_to(ROOT)}: link to {target}: no such file"
            if anchor and dest.suffix == ".md":
                slugs = {_slug(h) for h in HEADING.findall(_prose(dest))}
                assert anchor in slugs, f"{page.relative_to(ROOT)}: link to {target}: no heading #{anchor}"


@pytest.mark.parametrize("page", sorted(GENERATED))
def test_generated_pages_exist_or_are_named(page):
    if not (ROOT / page).exists():
        pytest.skip(f"{page} is not generated in this checkout ({GENERATED[page]})")
    assert (ROOT / page).read_text(encoding="utf-8").strip(), f"{page} is empty"
