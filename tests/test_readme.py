"""The README and docs/*.md say only what is true of this checkout.

- Every ```python block runs as written, from a directory laid out like a checkout after a finished run
  (``runs/redheart/`` beside ``configs/``): the smoke config's stages, run once here under the name the
  default config gives its run.
- Every ``python run.py`` command and flag the text shows exists in the parser; every benchmark flag in
  its script.
- Every file the text names is in the repository; no document outside it is cited.
- The README's "Layout" names every module of the package, and nothing that is not there.
- docs/configuration.md's reference has a row for every config key, and no other.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
PACKAGE = REPO / "redheart_tune"


def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


PYTHON_BLOCKS = [
    pytest.param(code, id=f"{path.relative_to(REPO)}#{i}")
    for path in DOCS
    for i, code in enumerate(code_blocks(text_of(path), "python"), 1)
]


def test_the_docs_have_python_examples_to_run():
    assert len(PYTHON_BLOCKS) >= 5  # the README's three, the configuration's, the outputs' crossover


# --- the examples, run against a finished run ----------------------------------------------------------


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, data_cache, ray_session) -> Path:
    """A directory a reader would run the examples in: the checkout's files, and ``runs/redheart/`` holding
    a finished run (every stage of configs/smoke.yaml, named as the default config names its run)."""
    from redheart_tune.config import load_config, resolve_paths
    from redheart_tune.pipeline.stages import all_stages

    here = tmp_path_factory.mktemp("checkout")
    for entry in REPO.iterdir():
        if entry.name not in {"runs", ".git", ".venv"}:
            (here / entry.name).symlink_to(entry)
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"run.output_root={here / 'runs'}",
            "run.name=redheart",
            f"data.cache_dir={data_cache}",
            "analysis.bootstrap_resamples=200",  # the intervals' resamples: their number is not what is tested
        ],
    )
    all_stages(resolve_paths(cfg))
    return here


@contextlib.contextmanager
def working_directory(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.mark.parametrize("code", PYTHON_BLOCKS)
def test_python_example_runs_as_written(code, checkout, capsys):
    with working_directory(checkout):
        exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})
    assert capsys.readouterr().out.strip(), "an example prints what it shows"


# --- commands and flags ----------------------------------------------------------------------------------


def run_py_commands() -> list[tuple[str, str]]:
    """(document, the text after ``python run.py``) for every occurrence, in code blocks and inline code."""
    found = []
    for path in DOCS:
        for line in text_of(path).splitlines():
            for match in re.finditer(r"python run\.py ([^`#\\\n]*)", line):
                found.append((path.name, match.group(1).strip()))
    return found


def test_every_run_py_command_and_flag_shown_exists():
    from redheart_tune.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    top_flags = {s for a in parser._actions for s in a.option_strings}
    shown = run_py_commands()
    assert len(shown) > 30
    checked = set()
    for doc, rest in shown:
        words = rest.split()
        while words and words[0] in top_flags:
            words = words[1:]
        if not words or not re.fullmatch(r"[a-z|]+", words[0]) or words[0] == "process":
            continue  # `run.py <command> --help`, `run.py ...`; the stall warning's "no python run.py process runs it"
        for name in words[0].split("|"):  # `python run.py sweep|train|all --dashboard`
            assert name in commands, f"{doc}: python run.py {rest}: no command {name!r}"
            flags = {s for a in commands[name]._actions for s in a.option_strings} | top_flags
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
                assert flag in flags, f"{doc}: python run.py {rest}: {name} has no {flag}"
            checked.add(name)
    assert checked == set(commands), f"commands the docs never show: {set(commands) - checked}"


def test_every_benchmark_command_and_flag_shown_exists():
    shown = []
    for path in DOCS:
        for match in re.finditer(
            r"python (?:-m benchmarks\.(\w+)|benchmarks/(\w+)\.py)([^`#\\\n]*)", text_of(path)
        ):
            shown.append((path.name, match.group(1) or match.group(2), match.group(3)))
    assert {name for _, name, _ in shown} >= {"model_step", "memory_gpu", "tune_overhead", "cluster_sweep"}
    for doc, name, rest in shown:
        source = REPO / "benchmarks" / f"{name}.py"
        assert source.is_file(), f"{doc}: benchmarks/{name}.py does not exist"
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
            assert f'"{flag}"' in text_of(source), f"{doc}: benchmarks/{name}.py has no {flag}"


# --- what the text cites ----------------------------------------------------------------------------------

REPO_PATH = re.compile(
    r"(?<![\w/.<-])((?:redheart_tune|tests|benchmarks|configs|docs|\.ci)/[\w./*<>-]*[\w*/])"
)


def test_no_document_outside_the_repository_is_cited():
    for path in DOCS:
        for banned in ("SPEC", "ORIGINAL.md", "../shared", "MEMORY.md", "DESIGN.md"):
            assert banned not in text_of(path), f"{path.name} cites {banned}, which is not in the repository"


def test_every_file_the_docs_name_is_in_the_repository():
    named = 0
    for path in DOCS:
        text = text_of(path)
        for cited in REPO_PATH.findall(text):
            cited = cited.split("::")[0].rstrip("/")
            if "<" in cited:  # a placeholder: the folder before it must exist
                cited = cited.split("<")[0].rstrip("/")
            hits = (
                list(REPO.glob(cited)) if "*" in cited else [REPO / cited] if (REPO / cited).exists() else []
            )
            assert hits, f"{path.name} names {cited}, which is not in the repository"
            named += 1
        for test_file, test_name in re.findall(r"(tests/test_\w+\.py)::(\w+)", text):
            assert re.search(rf"def {test_name}\(", text_of(REPO / test_file)), (
                f"{path.name}: {test_file}::{test_name}"
            )
        for link in re.findall(r"\]\(([^)#:]+)\)", text):  # relative links, not URLs
            assert (path.parent / link).exists(), f"{path.name} links to {link}, which does not exist"
    assert named > 50


def test_every_dotted_name_the_docs_give_resolves():
    """``redheart_tune.pipeline.status.read_progress`` and the like: a module, or an attribute of one."""
    names = {n.rstrip(".") for path in DOCS for n in re.findall(r"`(redheart_tune(?:\.\w+)+)", text_of(path))}
    assert names
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            module = ".".join(parts[:cut])
            try:
                target = importlib.import_module(module)
                break
            except ModuleNotFoundError as missing:
                if missing.name != module:
                    raise  # the module exists and failed to import: not a question of the docs
                continue
        for attr in parts[cut:]:
            assert hasattr(target, attr), f"{name}: {'.'.join(parts[:cut])} has no {attr}"
            target = getattr(target, attr)


# --- the layout ---------------------------------------------------------------------------------------


def layout_entries() -> list[tuple[str, list[str], str]]:
    """(parent folder, names, description) for each entry of the README's Layout tree: an entry names one
    file or folder, or several (``config.py, layout.py``); its parent follows from its indent."""
    section = text_of(README).split("## Layout", 1)[1]
    block = code_blocks(section, "")[0]
    lines: list[tuple[int, str, str]] = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if indent >= 20:  # a description's continuation
            level, head, description = lines[-1]
            lines[-1] = (level, head, description + " " + line.strip())
            continue
        head, _, description = line.strip().partition("  ")
        lines.append((indent // 2, head.strip(), description.strip()))
    entries, stack = [], []
    for level, head, description in lines:
        stack = stack[:level]
        entries.append(("".join(stack), [n.strip() for n in head.split(",")], description))
        if head.endswith("/"):
            stack.append(head)
    return entries


def listed(path: Path) -> set[str]:
    """What a folder holds, as the layout names it: files, and sub-folders with a slash."""
    return {
        p.name + ("/" if p.is_dir() else "")
        for p in path.iterdir()
        if p.name not in {"__init__.py", "__pycache__"} and not p.name.startswith(".")
    }


def tracked_top_level() -> set[str]:
    """The checkout's top level as git tracks it (not a venv, an egg-info or runs/ beside it)."""
    try:
        files = subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return {f.split("/")[0] + ("/" if "/" in f or (REPO / f).is_dir() else "") for f in files.split()}


def test_the_readme_layout_matches_the_tree():
    entries = layout_entries()
    top = {name for parent, names, _ in entries if not parent for name in names}
    expected = {t for t in tracked_top_level() if not t.startswith(".")} - {"README.md", "pyproject.toml"}
    assert top == expected, f"the layout's top level {sorted(top)} against the checkout's {sorted(expected)}"
    for parent, names, description in entries:
        for name in names:
            assert (REPO / parent / name).exists(), f"the layout names {parent}{name}, which does not exist"
        folder = REPO / parent / names[0]
        if len(names) > 1 or not folder.is_dir() or folder.is_symlink():
            continue
        path = parent + names[0]
        named = set(re.findall(r"(?<![\w/`])([\w-]+\.(?:py|sh|yaml))\b", description))
        children = {n for p, ns, _ in entries if p == path for n in ns}
        holds = listed(folder)
        assert named <= holds, f"the layout names {sorted(named - holds)} in {path}, which it does not hold"
        if path in {"tests/", "docs/"}:
            continue  # named by example, not one by one
        missing = holds - named - children
        assert not missing, f"the layout does not name {sorted(missing)} of {path}"


def test_the_layouts_floors_are_the_layer_tests():
    """The README lists redheart_tune/'s floors top down as tests/test_layers.py orders them bottom up."""
    from tests.test_layers import LAYERS

    order = []
    for parent, names, _ in layout_entries():
        if parent != "redheart_tune/":
            continue
        for index, layer in enumerate(LAYERS):
            if any(name.removesuffix(".py").rstrip("/") in layer for name in names):
                order.append(index)
    assert order == sorted(order, reverse=True), order
    assert set(order) == set(range(len(LAYERS))), order


# --- the config reference ---------------------------------------------------------------------------


def test_the_config_reference_has_every_key_and_no_other():
    from redheart_tune.config import config_to_dict, load_config

    keys = {
        f"{section}.{key}"
        for section, fields in config_to_dict(load_config(REPO / "configs" / "default.yaml", [])).items()
        if isinstance(fields, dict)
        for key in fields
    }
    reference = set(
        re.findall(r"^\| `(\w+\.\w+)` \|", text_of(REPO / "docs" / "configuration.md"), flags=re.M)
    )
    assert reference == keys, (
        f"missing: {sorted(keys - reference)}; not config keys: {sorted(reference - keys)}"
    )
