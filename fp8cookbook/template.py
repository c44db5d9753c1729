"""The cookbook notebooks are generated from one template: `python -m fp8cookbook.template` writes them.

`notebooks/template.py` is a jupytext percent script holding the narrative and the cells of every notebook. Two
things make one notebook out of it:

- `{{name}}` is replaced by the notebook's value (`title`, `family`, `hub_id`, `min_cosine`, ...: see `variables`),
  taken from the family registry and from `compare`'s defaults, so a notebook's defaults are the CLI's;
- a line `#@ flux2 wan22` starts text that only those notebooks get, `#@ end` ends it (no nesting).

Edit the template, never a generated .ipynb: `python -m fp8cookbook.template --check` (run by the tests) fails
when a notebook differs from what the template makes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATE_NAME = "template.py"
_BLOCK = re.compile(r"^#@ ?(.*)$")
_VAR = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True)
class NotebookSpec:
    """One generated notebook: its name, the families it covers (the first is its default) and its output folder."""

    name: str
    families: tuple[str, ...]
    output_dir: str


NOTEBOOKS: dict[str, NotebookSpec] = {
    "flux1": NotebookSpec("flux1", ("flux1",), "outputs/flux1"),
    "flux2": NotebookSpec("flux2", ("flux2",), "outputs/flux2"),
    "wan22": NotebookSpec("wan22", ("wan22-a14b", "wan22-ti2v-5b"), "outputs/wan22"),
}
# `fp8cookbook run NAME`: a family that is not a notebook of its own runs the notebook that covers it, in its own
# output folder (one per family variant).
NOTEBOOK_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    family: (spec.name, {"family": family, "output_dir": f"outputs/{family}"})
    for spec in NOTEBOOKS.values() if len(spec.families) > 1 for family in spec.families
}


def notebooks_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "notebooks"


def variables(spec: NotebookSpec) -> dict[str, str]:
    """The `{{name}}` values of one notebook."""
    from .compare import default_prompt, default_thresholds
    from .families import get_family

    fam = get_family(spec.families[0])
    t = default_thresholds(fam)
    return {"notebook": spec.name, "family": fam.name, "title": fam.title, "short_title": fam.title.split("-")[0],
            "hub_id": fam.hub_id, "class_name": fam.class_name, "output_dir": spec.output_dir,
            "prompt": json.dumps(default_prompt(fam)), "min_cosine": f"{t.min_cosine:g}",
            "min_step_cosine": f"{t.min_step_cosine:g}", "max_rel_l2": f"{t.max_rel_l2:g}",
            "min_psnr": f"{t.min_psnr:.1f}", "min_ssim": f"{t.min_ssim:g}"}


def render(template: str, spec: NotebookSpec, values: dict[str, str] | None = None) -> str:
    """The template's text for one notebook: its `#@` blocks kept, the others' dropped, `{{name}}` filled in (line
    numbers in errors count from the first cell)."""
    values = variables(spec) if values is None else values
    keep, lines = True, []
    start = template.find("# %%")  # the comment above the first cell is about the template, not a notebook
    template = template[start:] if start >= 0 else template
    for number, line in enumerate(template.splitlines(), 1):
        m = _BLOCK.match(line)
        if m:
            names = m.group(1).split()
            unknown = set(names) - set(NOTEBOOKS) - {"end"}
            if unknown or not names:
                raise ValueError(f"{TEMPLATE_NAME}:{number}: `#@` takes notebook names ({', '.join(NOTEBOOKS)}) "
                                 f"or `end`, got {line!r}")
            keep = names == ["end"] or spec.name in names
            continue
        if keep:
            lines.append(line)

    def fill(m: re.Match) -> str:
        if m.group(1) not in values:
            raise ValueError(f"{TEMPLATE_NAME}: unknown variable {{{{{m.group(1)}}}}}; known: {', '.join(values)}")
        return values[m.group(1)]

    return _VAR.sub(fill, "\n".join(lines) + "\n")


def build(spec: NotebookSpec, template: str) -> str:
    """The .ipynb text of one notebook: no outputs, stable cell ids, the python3 kernel."""
    import jupytext
    import nbformat

    notebook = jupytext.reads(render(template, spec), fmt="py:percent")
    notebook.metadata = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                        "name": "python3"},
                         "fp8cookbook": {"generated_from": f"notebooks/{TEMPLATE_NAME}",
                                         "regenerate": "python -m fp8cookbook.template"}}
    for i, cell in enumerate(notebook.cells):
        cell.id = f"{spec.name}-{i:02d}"
        cell.metadata.pop("lines_to_next_cell", None)
    nbformat.validate(notebook)
    return nbformat.writes(notebook) + "\n"


def generate(folder: Path | None = None, *, check: bool = False) -> list[Path]:
    """Write every notebook from the template; with `check`, write nothing and return the ones that differ."""
    folder = notebooks_dir() if folder is None else Path(folder)
    template = (folder / TEMPLATE_NAME).read_text()
    differ = []
    for spec in NOTEBOOKS.values():
        path = folder / f"{spec.name}.ipynb"
        text = build(spec, template)
        if path.is_file() and path.read_text() == text:
            continue
        differ.append(path)
        if not check:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            tmp.replace(path)  # a reader never sees half a notebook
    return differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8cookbook.template",
                                     description="Generate notebooks/*.ipynb from notebooks/template.py.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a notebook is out of date")
    parser.add_argument("--folder", type=Path, help="the notebooks folder (default: the repository's)")
    args = parser.parse_args(argv)
    differ = generate(args.folder, check=args.check)
    for path in differ:
        print(f"{path}: {'out of date (run python -m fp8cookbook.template)' if args.check else 'written'}")
    return 1 if args.check and differ else 0


if __name__ == "__main__":
    sys.exit(main())
