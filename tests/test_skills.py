"""The agent skills cannot rot: front matter is valid, and every shell command in every SKILL.md runs.

Each SKILL.md's ```bash blocks run in order, as one script, in a fresh working folder, on the tiny built-in
pipelines on the CPU; a failing command fails the test with its output. Blocks fenced ```bash gpu need real
checkpoints and a CUDA GPU: they are skipped with that reason, but every `fp8cookbook` command in them (and in the
CPU blocks) must still parse with the real CLI parser, so a renamed flag breaks the test either way.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fp8cookbook.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SKILLS = [ROOT / "SKILL.md"] + sorted((ROOT / "skills").glob("*/SKILL.md"))
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
MAX_LINES = 110  # "about 100 lines": long skills stop being read


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def front_matter(path: Path) -> dict:
    text = path.read_text()
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, f"{_id(path)}: no YAML front matter (--- name/description ---) at the top"
    return yaml.safe_load(m.group(1))


def blocks(path: Path) -> list[tuple[str, str]]:
    """(info string, dedented body) of every fenced bash block."""
    out = []
    for m in FENCE.finditer(path.read_text()):
        info = m.group("info").strip().split()
        if info and info[0] in ("bash", "sh", "shell"):
            body = "\n".join(line[len(m.group("indent")):] for line in m.group("body").splitlines())
            out.append((" ".join(info[1:]), body))
    return out


def commands(script: str) -> list[list[str]]:
    """argv of every simple command in a block: continuation lines and multi-line quotes joined, comments dropped,
    pipelines and lists (`|`, `||`, `&&`, `;`) split."""
    out: list[list[str]] = []
    pending = ""
    for line in script.splitlines():
        pending += line + "\n"
        if line.endswith("\\"):  # continued on the next line
            continue
        try:
            lexer = shlex.shlex(pending.replace("\\\n", " "), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        pending = ""
        argv: list[str] = []
        for token in tokens + [";"]:
            if token in ("|", "||", "&&", ";", "&"):
                if argv:
                    out.append(argv)
                argv = []
            else:
                argv.append(token)
    assert not pending.strip(), f"unbalanced quotes in: {pending}"
    return out


def test_skill_files_exist():
    names = {p.parent.name for p in SKILLS[1:]}
    assert {"quantize-to-fp8", "add-model-family", "debug-fp8-accuracy", "benchmark-denoising"} <= names, names


@pytest.mark.parametrize("path", SKILLS, ids=_id)
def test_front_matter_and_shape(path):
    meta = front_matter(path)
    assert set(meta) >= {"name", "description"}, f"{_id(path)}: front matter has {sorted(meta)}"
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", meta["name"]), f"{_id(path)}: name {meta['name']!r} is not kebab-case"
    if path.parent != ROOT:
        assert meta["name"] == path.parent.name, f"{_id(path)}: name {meta['name']!r} != folder {path.parent.name!r}"
    assert len(meta["description"]) >= 80, f"{_id(path)}: the description should say what it does and when to use it"
    lines = path.read_text().count("\n")
    assert lines <= MAX_LINES, f"{_id(path)}: {lines} lines, keep skills under {MAX_LINES}"
    assert blocks(path), f"{_id(path)}: no ```bash block: a skill gives the exact commands"
    assert re.search(r"^\s*1\. ", path.read_text(), re.M), f"{_id(path)}: no numbered steps"


@pytest.mark.parametrize("path", SKILLS, ids=_id)
def test_fp8cookbook_commands_parse(path):
    """Every `fp8cookbook ...` command, GPU ones included, is accepted by the CLI parser."""
    parser = build_parser()
    found = 0
    for _, body in blocks(path):
        for argv in commands(body):
            if argv[0] != "fp8cookbook":
                continue
            found += 1
            try:
                parser.parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{_id(path)}: the CLI does not accept: {shlex.join(argv)}")
    assert found, f"{_id(path)}: no fp8cookbook command"


@pytest.mark.parametrize("path", SKILLS, ids=_id)
def test_gpu_commands(path):
    gpu = [body for info, body in blocks(path) if "gpu" in info.split()]
    if not gpu:
        pytest.skip("no GPU-only commands in this skill")
    for body in gpu:
        assert "--dit-cpu-offload false" in body or "sglang generate" not in body, \
            f"{_id(path)}: an sglang generate command without --dit-cpu-offload false"
    pytest.skip(f"{sum(len(commands(b)) for b in gpu)} GPU-only command(s): need real checkpoints and a CUDA GPU with FP8")


def _prose_after(path: Path) -> list[str]:
    """For every CPU block of a skill, the text that follows it up to the next block: where it says what it prints."""
    text = path.read_text()
    fences = [m for m in FENCE.finditer(text)]
    out = []
    for i, m in enumerate(fences):
        info = m.group("info").strip().split()
        if info and info[0] in ("bash", "sh", "shell") and "gpu" not in info[1:]:
            end = fences[i + 1].start() if i + 1 < len(fences) else len(text)
            out.append(text[m.end():end])
    return out


WORK_PATH = re.compile(r"(?<![\w/.-])work/[A-Za-z0-9_./-]*[A-Za-z0-9_]")


@pytest.fixture(scope="module")
def skills_run(tmp_path_factory) -> tuple[Path, dict[tuple[str, int], str]]:
    """Every skill's CPU blocks, the skills one after the other (SKILL.md first), as ONE bash script in ONE work
    folder, the way an agent runs them in one shell; returns the folder and each block's output (stdout+stderr)."""
    folder = tmp_path_factory.mktemp("skills")
    parts = ["set -euo pipefail", "exec 2>&1"]
    for path in SKILLS:
        for i, (info, body) in enumerate(b for b in blocks(path) if "gpu" not in b[0].split()):
            parts += [f"echo '@@block {_id(path)} {i}@@'", body]
    script = "\n".join(parts) + "\necho '@@end@@'\n"
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)  # `fp8cookbook` and `python` of this environment come first
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: a thread pool costs more than the arithmetic (CI time)
    proc = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, (f"a skill command failed (exit {proc.returncode}) when the skills run one after "
                                  f"the other in one folder\n--- script\n{script}\n--- output\n{proc.stdout[-8000:]}")
    outputs: dict[tuple[str, int], str] = {}
    for m in re.finditer(r"^@@block (\S+) (\d+)@@\n(.*?)(?=^@@)", proc.stdout, re.M | re.S):
        outputs[(m.group(1), int(m.group(2)))] = m.group(3)
    return folder, outputs


def test_skills_run_in_sequence_in_one_work_folder(skills_run):
    """Each skill works after the others in the same shell and folder (e.g. no "work/q: already exists")."""
    _, outputs = skills_run
    expected = {(_id(p), i) for p in SKILLS for i, _ in enumerate(b for b in blocks(p) if "gpu" not in b[0].split())}
    assert set(outputs) == expected


@pytest.mark.parametrize("path", SKILLS, ids=_id)
def test_sample_output_matches_what_runs(path, skills_run):
    """Counts a skill shows as sample output (`13/13 FP8 layers ran`) are what its command prints."""
    _, outputs = skills_run
    for i, prose in enumerate(_prose_after(path)):
        for span in re.findall(r"`([^`]+)`", prose):
            for count in re.findall(r"\b\d+/\d+\b", span):
                assert count in outputs[(_id(path), i)], (f"{_id(path)}: block {i + 1} says `{span}` but prints\n"
                                                          f"{outputs[(_id(path), i)][-3000:]}")


@pytest.mark.parametrize("path", SKILLS, ids=_id)
def test_work_paths_are_what_the_commands_write(path, skills_run):
    """Every work/... path a skill names (outside GPU blocks) exists after the skills ran."""
    folder, _ = skills_run
    text = path.read_text()
    for m in FENCE.finditer(text):  # GPU blocks name real-model folders elsewhere
        if "gpu" in m.group("info").split():
            text = text.replace(m.group(0), "")
    missing = sorted({p for p in WORK_PATH.findall(text) if not (folder / p).exists()})
    assert not missing, f"{_id(path)} names paths the commands never write: {missing}"


def test_work_folder_is_git_ignored():
    assert "work/" in (ROOT / ".gitignore").read_text().split()


def test_add_family_skill_and_architecture_doc_agree_with_the_registry():
    """Every file, `Family` field and module the add-model-family skill and docs/architecture.md name exists, both
    name every field a family file must think about, and no library module outside families/ names a family."""
    import dataclasses

    from fp8cookbook.families import FAMILIES, Family

    skill = (ROOT / "skills" / "add-model-family" / "SKILL.md").read_text()
    arch = (ROOT / "docs" / "architecture.md").read_text()
    for text, where in ((skill, "skill"), (arch, "docs/architecture.md")):
        for path in re.findall(r"`((?:fp8cookbook|tests|skills|docs)/[\w/.<>-]+)`", text):
            if "<" not in path:
                assert (ROOT / path).exists(), f"{where} names {path}, which does not exist"
        for module in re.findall(r"^\| `([\w/.]+\.py|[\w]+/)`", text, re.M):
            assert (ROOT / "fp8cookbook" / module).exists(), f"{where} lists fp8cookbook/{module}, which does not exist"
    fields = {f.name for f in dataclasses.fields(Family)}
    named = set(re.findall(r"`(\w+)`", skill))
    must = {"forwards_per_step", "flow_shift", "size_multiple", "sglang_memory_flags", "serve_notes", "tiny_settings",
            "build_tiny_pipeline", "fusion_rules", "sensitive", "bf16_fallback", "make_inputs", "full_config",
            "tiny_config"}
    assert must <= fields, f"Family lacks {sorted(must - fields)}"
    assert must <= named, f"the skill does not name {sorted(must - named)}"
    for f in re.findall(r"`(\w+)`", arch):
        if f in must:
            assert f in fields
    init = (ROOT / "fp8cookbook" / "families" / "__init__.py").read_text()
    for module in {f.make_inputs.__module__ for f in FAMILIES.values()} | \
            {f.build_tiny_pipeline.__module__ for f in FAMILIES.values()}:
        short = module.rsplit(".", 1)[-1]
        assert re.search(rf"^from \. import .*\b{short}\b", init, re.M), f"{short} is not imported by the registry"
    # names, transformer classes and pipeline classes (standin.py once keyed its real configs by pipeline class)
    names = sorted(FAMILIES) + [f.class_name for f in FAMILIES.values()] + [f.pipeline_class for f in FAMILIES.values()]
    for path in (ROOT / "fp8cookbook").rglob("*.py"):
        rel = path.relative_to(ROOT / "fp8cookbook")
        if rel.parts[0] == "families" or rel.name in ("template.py", "cli.py"):
            continue  # template.py maps notebook files to families; cli.py's help texts give examples
        for name in sorted(_code_strings(path.read_text()) & set(names)):  # docstrings (usage examples) aside
            raise AssertionError(f"fp8cookbook/{rel} names the family {name!r} in its code: move that to families/")


def _code_strings(source: str) -> set[str]:
    """The string literals of a module's code, its docstrings left out."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}
