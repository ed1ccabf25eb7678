"""The README and the documentation site: every code block runs, the README stays one screen
with absolute links, the site builds strictly and renders, every public name has a reference
entry, and no shipped text speaks of how the project is developed.

Code blocks (fenced ``python``, ``bash`` and ``console`` blocks of README.md and docs/):

- ``python``: the blocks of a page run in order in one namespace, in a fresh folder, in one
  subprocess for all pages; ``mocolab.build_config`` is wrapped to give tiny runs (generated
  data, a narrow network, two steps) — the code is otherwise run as written.
- ``bash``: each ``mocolab`` command runs through ``mocolab.cli.main`` in the page's folder at
  a tiny size (flags appended; placeholders such as ``RUN_DIR`` or ``~/photos`` replaced by
  small fixtures) and must exit 0; ``torchrun``/``srun`` lines are parsed by the real parser
  (they need several processes or GPUs); ``pip install`` must name extras that exist, ``make``
  targets that exist, ``python SCRIPT`` scripts that exist.
- ``console``: ``$ COMMAND`` lines with the output they print below them: a command with
  output runs as written and must fail with that output (``…`` matches anything); one without
  runs at a tiny size and must succeed.
- A comment line just before a block changes that: ``<!-- test: parse-only (reason) -->``
  parses its ``mocolab`` commands without running them; ``<!-- no-test: reason -->`` skips it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SITE_URL = "https://mocolab.github.io/mocolab/"
RAW_URL = "https://raw.githubusercontent.com/mocolab/mocolab/main/"
REPO_URL = "https://github.com/mocolab/mocolab"
CHROMIUM = "/usr/bin/chromium"

# --- the blocks ----------------------------------------------------------------------------

MARK = re.compile(r"<!--\s*(no-test|test:\s*parse-only)\b[^>]*?(\S[^>]*)?-->")
FENCE = re.compile(r"^```(\w+)\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mode: str  # "run", "parse-only" or "no-test"

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)]


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.search(before)
        mode = "run" if not mark else ("no-test" if mark.group(1) == "no-test" else "parse-only")
        found.append(Block(page, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]), mode))
        i = end + 1
    return found


ALL = [b for p in pages() for b in blocks_of(p) if b.lang in ("python", "bash", "console")]


def test_markers_are_rare_and_give_a_reason():
    marked = [b for b in ALL if b.mode != "run"]
    assert len(marked) <= 6, [b.where for b in marked]
    for b in marked:
        lines = b.page.read_text(encoding="utf-8").splitlines()
        before = next(lines[j] for j in range(b.line - 2, -1, -1) if lines[j].strip())
        assert re.search(r"\(\w[^)]{8,}\)|no-test:\s*\w.{8,}", before), f"{b.where}: no reason"


# --- fixtures: a folder of images, an unlabelled one, a tiny run ----------------------------


def _write_images(root: Path, classes: int, per_class: int, size: int = 40) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / f"class_{k}" if classes > 1 else root
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
            pixels = np.clip(colour + rng.integers(-40, 40, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("docs-fixtures")
    photos = _write_images(base / "photos", classes=3, per_class=12)
    flat = _write_images(base / "unlabelled", classes=1, per_class=24)
    run = base / "runs" / "fixture"  # RUN_DIR: a run on the small folder (cheap evaluations)
    code, out = _main(["pretrain", "--out-dir", str(run.parent), "--run-name", run.name,
                       *TINY_PRETRAIN, "--data", str(photos), "--image-size", "32"], base)  # fmt: skip
    assert code == 0, out
    return {"photos": photos, "unlabelled": flat, "run": run}


# --- running commands -----------------------------------------------------------------------

TINY_PRETRAIN = ["--data", "synthetic", "--width", "8", "--batch-size", "16", "--max-steps", "2",
                 "--threads", "1", "--no-progress", "--diagnostics-every", "0", "--no-compile",
                 "--compile-views", "off", "--num-workers", "1", "--no-final-eval"]  # fmt: skip
TINY_BY_COMMAND = {  # flags appended to other commands (the last occurrence of a flag wins)
    ("eval", "knn"): ["--no-progress", "--k", "5"],
    ("eval", "linear"): ["--no-progress", "--epochs", "2", "--train-fraction", "0.5"],
    ("eval", "finetune"): ["--no-progress"],
    ("eval", "retrieval"): ["--no-progress"],
    ("eval", "diagnostics"): ["--no-progress", "--max-images", "64"],
    ("eval", "segment"): ["--no-progress", "--iters", "2", "--train-batch", "2",
                          "--head-channels", "8"],
    ("eval", "detect"): ["--no-progress", "--epochs", "1", "--batch-size", "2", "--examples", "1",
                         "--rois-per-image", "16", "--proposals", "50", "--min-size", "64"],
    ("report",): ["--no-progress", "--queries", "2", "--k", "3", "--max-points", "60"],
    ("embed",): ["--no-progress", "--num-workers", "0"],
    ("data", "pack"): ["--no-progress"],
    ("data", "scenes"): ["--no-progress", "--train", "6", "--test", "3", "--size", "64"],
}  # fmt: skip
BUILTINS = ("fashion-mnist", "cifar10", "cifar100", "stl10")


def _main(argv: list[str], cwd: Path) -> tuple[int, str]:
    """``mocolab ARGV`` in-process in ``cwd``: its exit code and everything it printed."""
    import torch

    from mocolab.cli import main

    out = io.StringIO()
    here, threads = Path.cwd(), torch.get_num_threads()  # --threads sets torch's for the process
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's errors and --help
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    return code, out.getvalue()


def _parses(argv: list[str]) -> None:
    from mocolab.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser(argv).parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"mocolab {' '.join(argv)}: {err.getvalue().strip()}") from e


def _substitute(argv: list[str], fx: dict[str, Path]) -> list[str]:
    names = {"RUN_DIR": str(fx["run"]), "~/photos": str(fx["photos"]), "FOLDER": str(fx["photos"]),
             "SCENES": "scenes"}  # fmt: skip
    return [names.get(a, a.replace("~/photos", str(fx["photos"]))) for a in argv]


def _value(argv: list[str], flag: str) -> str | None:
    return next((argv[i + 1] for i in range(len(argv) - 1) if argv[i] == flag), None)


def _tiny(argv: list[str], cwd: Path) -> list[str]:
    """``argv`` at a tiny size: flags appended so that it runs in a second or two."""
    if argv[:1] == ["pretrain"]:
        if "--resume" in argv or "--print-config" in argv or "--help" in argv:
            return argv
        extra = list(TINY_PRETRAIN)
        data = _value(argv, "--data")
        if data is not None and data not in BUILTINS and (cwd / data).expanduser().exists():
            extra[0:2] = ["--image-size", "32"]  # their folder or shards, made small
        preset = _value(argv, "--preset") or ""
        if "--width" in argv:  # the page needs this width (exports to torchvision, timm)
            extra[2:4] = ["--stem", "compact"]
        if "vit" in preset or (_value(argv, "--arch") or "").startswith("vit"):
            extra += ["--vit-depth", "1"]
        if preset.endswith("-imagenet") or int(_value(argv, "--image-size") or 0) > 64:
            extra += ["--image-size", "32", "--crop-size", "32"]
        return argv + extra
    if argv[:2] == ["eval", "finetune"] and _value(argv, "--epochs") not in (None, "0"):
        argv = [*argv, "--epochs", "1"]
    for key, extra in TINY_BY_COMMAND.items():
        if tuple(argv[: len(key)]) == key:
            return argv + extra
    return argv


_REPORTS: set[tuple[str, ...]] = set()


def _seen_before(argv: list[str]) -> bool:
    """A ``report`` with the same options as one that already ran (the seconds go to drawing
    the same pictures): parsed only."""
    if argv[:1] != ["report"]:
        return False
    shape = tuple(a for a in argv if a.startswith("--"))
    if shape in _REPORTS:
        return True
    _REPORTS.add(shape)
    return False


def _commands(code: str) -> list[list[str]]:
    """The command lines of a shell block, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def _mocolab_part(words: list[str]) -> list[str] | None:
    """The ``mocolab`` arguments of a command line (``mocolab …`` or ``… -m mocolab …``)."""
    if words[0] == "mocolab":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["mocolab"]:
        return words[words.index("-m") + 2 :]
    return None


def _extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def _without_environment(words: list[str]) -> list[str]:
    """The command behind ``VAR=value`` assignments and ``nice [-n N]`` (how the benchmark
    commands of the docs are given)."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if words[:1] == ["nice"]:
        words = words[3:] if words[1:2] == ["-n"] else words[1:]
    return words


def _run_shell_command(words: list[str], block: Block, cwd: Path, fx: dict[str, Path]) -> None:
    where = f"{block.where}: {' '.join(words)}"
    words = _without_environment(words)
    if words[0] == "pip":
        for spec in re.findall(r"\.\[([\w,-]+)\]", " ".join(words)):
            missing = set(spec.split(",")) - _extras()
            assert not missing, f"{where}: no such extra {sorted(missing)} in pyproject.toml"
        return
    if words[0] == "make":
        assert set(words[1:]) <= _make_targets(), f"{where}: not a Makefile target"
        return
    if words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
        assert (ROOT / words[1]).is_file(), f"{where}: no such script"
        return
    if words[0] == "bash" and len(words) > 1 and words[1].endswith(".sh"):
        assert (ROOT / words[1]).is_file(), f"{where}: no such script"
        syntax = subprocess.run(["bash", "-n", str(ROOT / words[1])], capture_output=True, text=True)
        assert syntax.returncode == 0, f"{where}: {syntax.stderr}"
        return
    argv = _mocolab_part(words)
    assert argv is not None, f"{where}: not a command the tests know (mark the block)"
    argv = _substitute(argv, fx)
    if block.mode == "parse-only" or words[0] != "mocolab" or _seen_before(argv):
        _parses(argv)  # torchrun, srun: several processes
        return
    code, out = _main(_tiny(argv, cwd), cwd)
    assert code == 0, f"{where} exited {code}:\n{out[-3000:]}"


def _page_folder(page: Path, base: Path, fx: dict[str, Path]) -> Path:
    folder = base / str(page.relative_to(ROOT)).replace("/", "_")
    if not folder.exists():
        folder.mkdir(parents=True)
        (folder / "unlabelled-folder").symlink_to(fx["unlabelled"])
        (folder / "empty-folder").mkdir()
    return folder


@pytest.fixture(scope="module")
def page_folders(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs-pages")


SHELL = [b for b in ALL if b.lang in ("bash", "console") and b.mode != "no-test"]


@pytest.mark.parametrize("block", SHELL, ids=[b.where for b in SHELL])
def test_shell_block_runs(block, fixtures, page_folders, one_thread):
    cwd = _page_folder(block.page, page_folders, fixtures)
    if block.lang == "bash":
        for words in _commands(block.code):
            _run_shell_command(words, block, cwd, fixtures)
        return
    steps: list[tuple[str, list[str]]] = []  # console: $ command, then what it prints
    for line in block.code.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif line.strip():
            steps[-1][1].append(line)
    for command, expected in steps:
        words = _substitute(shlex.split(command), fixtures)
        assert words[0] == "mocolab", f"{block.where}: {command}"
        argv = words[1:] if expected else _tiny(words[1:], cwd)
        code, out = _main(argv, cwd)
        if not expected:
            assert code == 0, f"{block.where}: {command} exited {code}:\n{out[-3000:]}"
            continue
        assert code != 0, f"{block.where}: {command} succeeded, the page shows an error"
        printed = [line.strip() for line in out.splitlines()]
        for want in expected:
            pattern = ".*".join(re.escape(part) for part in want.strip().split("…"))
            assert any(re.fullmatch(pattern, line) for line in printed), (
                f"{block.where}: {command} printed\n{out[-3000:]}\nnot\n{want}"
            )


PYTHON = [b for b in ALL if b.lang == "python" and b.mode == "run" and "--8<--" not in b.code]

# Runs each page's python blocks in order, in one namespace and a fresh folder per page, with
# build_config wrapped to give tiny runs; writes one JSON line per block: its error or null.
RUNNER = """
import json, os, sys, traceback
import mocolab.config as config

TINY = dict(width=8, batch_size=16, max_steps=2, threads=1, progress=False, diagnostics_every=0,
            compile=False, compile_views="off")
build = config.build_config

def tiny_build_config(*args, **kwargs):
    data = kwargs.get("data")
    if data is None or not os.path.exists(os.path.expanduser(str(data))):
        kwargs["data"] = "synthetic"
    for key, value in TINY.items():
        if key != "width" or "width" not in kwargs:
            kwargs[key] = value
    return build(*args, **kwargs)

config.build_config = tiny_build_config
base, results = sys.argv[1], open(sys.argv[2], "w")
for n, (page, codes) in enumerate(json.loads(sys.stdin.read())):
    folder = os.path.join(base, str(n))
    os.makedirs(folder)
    os.chdir(folder)
    namespace = {"__name__": "__docs__"}
    for code in codes:
        try:
            exec(compile(code, page, "exec"), namespace)
            print(json.dumps(None), file=results, flush=True)
        except BaseException:
            print(json.dumps(traceback.format_exc()[-3000:]), file=results, flush=True)
"""


@pytest.fixture(scope="module")
def python_results(tmp_path_factory) -> dict[str, str | None]:
    by_page: dict[Path, list[Block]] = {}
    for b in PYTHON:
        by_page.setdefault(b.page, []).append(b)
    order = [b for blocks in by_page.values() for b in blocks]
    payload = json.dumps([[str(p), [b.code for b in bs]] for p, bs in by_page.items()])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = tmp_path_factory.mktemp("py")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(base / "pages"), str(base / "results")],
                          input=payload, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    lines = (base / "results").read_text().splitlines() if (base / "results").exists() else []
    results = [json.loads(line) for line in lines]
    assert len(results) == len(order), proc.stdout[-2000:] + proc.stderr[-3000:]
    return {b.where: r for b, r in zip(order, results)}


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_block_runs(block, python_results):
    assert python_results[block.where] is None, python_results[block.where]


def test_snippet_includes_name_files_that_exist():
    for b in ALL:
        for path in re.findall(r'--8<-- "([^"]+)"', b.code):
            assert (ROOT / path).is_file(), f"{b.where}: {path}"


# --- the README -----------------------------------------------------------------------------

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_one_screen_and_starts_with_the_two_commands():
    lines = README.splitlines()
    assert len(lines) <= 150
    assert lines[2] == "```"
    assert lines[3].startswith("make demo    # ") and lines[4].startswith("make test    # ")
    assert {"demo", "test"} <= _make_targets()


def test_readme_links_and_images_are_absolute_and_point_at_real_pages():
    targets = re.findall(r"\]\(([^)\s]+)", README)
    assert targets
    for url in targets:
        assert url.startswith("https://"), f"a relative link in the README: {url}"
        if url.startswith(SITE_URL):
            page = url[len(SITE_URL) :].split("#")[0].strip("/")
            candidates = (
                [DOCS / f"{page}.md", DOCS / page / "index.md"] if page else [DOCS / "index.md"]
            )
            assert any(c.is_file() for c in candidates), f"no docs page for {url}"
        elif url.startswith(RAW_URL):
            assert (ROOT / url[len(RAW_URL) :]).is_file(), f"no such file: {url}"
        elif url.startswith(REPO_URL + "/tree/main/") or url.startswith(REPO_URL + "/blob/main/"):
            assert (ROOT / url.split("/main/", 1)[1]).exists(), f"no such path: {url}"


def test_readme_methods_table_lists_every_method_with_its_presets():
    from mocolab.config import list_presets
    from mocolab.methods.registry import load_methods

    rows = [r for r in README.splitlines() if r.startswith("| `")]
    named = {m for r in rows for m in re.findall(r"`([\w-]+)`", r.split("|")[1])}
    assert named == set(load_methods()), named ^ set(load_methods())
    presets = set(list_presets())
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        for method in re.findall(r"`([\w-]+)`", cells[0]):
            for suffix in cells[3].split(", "):
                assert f"{method}-{suffix}" in presets, f"{method}-{suffix}"


def test_docs_links_to_the_repository_point_at_real_paths():
    for page in pages():
        for url in re.findall(
            re.escape(REPO_URL) + r"/(?:blob|tree)/main/([^)\s#]+)", page.read_text()
        ):
            assert (ROOT / url).exists(), f"{page.relative_to(ROOT)}: {url}"


# --- prose for users only -------------------------------------------------------------------

DEVELOPMENT_WORDS = re.compile(
    r"(?<![/.])\b(issues?|sessions?|helpers?('s)?|engineers?('s)?|the lead|this task|work period"
    r"|was lent|slow that hour|lent)\b(?!\.py)",  # not a file of an official code base (src/helper.py)
    re.I,
)


def _help_texts() -> list[tuple[str, str]]:
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import mocolab_reference as hook
    finally:
        sys.path.pop(0)
    texts = [(f"mocolab {' '.join(argv)} --help", hook._help(argv)) for argv in hook._commands()]
    texts += [(f"mocolab pretrain --method {m} --help", hook._help(["pretrain", "--method", m]))
              for m in hook._method_names()]  # fmt: skip
    return texts


def test_shipped_text_does_not_speak_of_how_the_project_is_developed():
    shipped = [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *sorted((ROOT / "examples").glob("*.py")),
               *sorted((ROOT / "mocolab" / "configs").glob("*.yaml"))]  # fmt: skip
    found = []
    for path in shipped:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if m := DEVELOPMENT_WORDS.search(line):
                found.append(
                    f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r} in {line.strip()[:100]}"
                )
    for name, text in _help_texts():
        for line in text.splitlines():
            if m := DEVELOPMENT_WORDS.search(line):
                found.append(f"{name}: {m.group(0)!r} in {line.strip()[:100]}")
    assert not found, "\n".join(found)


def test_the_development_word_check_finds_what_it_is_for():
    for line in ("a helper's run of 2,000 images", "The issue's target is met",
                 "shared with five other engineers' test runs", "this session had no GPU"):  # fmt: skip
        assert DEVELOPMENT_WORDS.search(line), line
    for line in ("onnxruntime.InferenceSession(path)", "the tissue sample", "ort_session.run",
                 "I-JEPA's `src/helper.py`"):  # fmt: skip
        assert not DEVELOPMENT_WORDS.search(line), line


# --- the site -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the site needs the docs extra (mkdocs)")
    pytest.importorskip("mkdocstrings", reason="the site needs the docs extra (mkdocstrings)")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_every_public_name_has_a_reference_entry(site):
    import mocolab

    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import mocolab_reference as hook
    finally:
        sys.path.pop(0)
    names = list(mocolab.__all__)
    assert names == hook.public_names()
    html = (site / "reference" / "api" / "index.html").read_text()
    ids = set(re.findall(r'id="([^"]+)"', html))
    missing = [n for n in names if f"mocolab.{n}" not in ids]
    assert not missing, missing
    for module in hook.PART_MODULES:  # the parts a user composes, with their members
        assert f"{module}" in ids or any(i.startswith(module + ".") for i in ids), module
    for part in ("mocolab.dictionaries.Queue", "mocolab.losses.info_nce",
                 "mocolab.momentum.MomentumEncoder", "mocolab.augment.ViewGenerator"):  # fmt: skip
        assert part in ids, part


def test_the_cli_reference_is_the_parsers_help(site):
    html = (site / "reference" / "cli" / "index.html").read_text()
    from mocolab.methods.registry import load_methods

    for command in ("mocolab-pretrain", "mocolab-eval-knn", "mocolab-eval-detect", "mocolab-report",
                    "mocolab-export", "mocolab-embed", "mocolab-data-pack", "mocolab-data-scenes"):  # fmt: skip
        assert f'id="{command}"' in html, command
    for method in load_methods():
        assert f'id="method-{method}"' in html, method
    assert "--queue-size" in html and "--teacher-temperature" in html and "--k K" in html


def test_the_changelog_page_holds_the_changelog_when_there_is_one(site):
    html = (site / "changelog" / "index.html").read_text()
    changelog = ROOT / "CHANGELOG.md"
    if changelog.is_file():
        heading = next(
            line for line in changelog.read_text().splitlines() if line.startswith("## ")
        )
        assert re.sub(r"[\[\]]", "", heading[3:]).split()[0] in html  # "[0.2.0]": a link
    else:
        assert "CHANGELOG.md" in html


@pytest.mark.parametrize(
    "page,title",
    [("index.html", "mocolab"), ("methods/moco/index.html", "MoCo v1, v2 and v3"),
     ("reference/api/index.html", "Python API"), ("reference/cli/index.html", "Command line")],
)  # fmt: skip
def test_site_pages_render_in_headless_chromium(site, page, title, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): the site was not rendered")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium'}"]  # fmt: skip
    url = (site / page).as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=3000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    assert "<h1" in dom and title in dom, dom[:2000]
    assert 'class="md-nav' in dom and "Getting started" in dom  # the navigation rendered
    saved = os.environ.get("MOCOLAB_DOCS_SHOTS")  # keep the screenshots to look at them
    if page != "index.html" and not saved:
        return  # one screenshot is enough to see that the theme's styles load
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1280,1400", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)  # fmt: skip
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1400, 1280)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
    if saved:
        Path(saved).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(saved) / (page.replace("/", "_") + ".png"))
