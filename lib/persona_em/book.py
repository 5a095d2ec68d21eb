"""`make book`: a static site of the committed reference run, built offline with Jupyter Book's engine (Sphinx,
myst-nb, sphinx-book-theme) from what the repository committed. It executes nothing: the chapters are the
reference run's executed notebooks, the tables are its CSV files, the paper is `paper/paper.tex` rendered to
HTML by pandoc with the run's own macros, beside a link to its PDF.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from . import paths

MARKER = ".persona-em-book"
TOUR = "candor-L16-s0"   # the condition of the committed tour (`python -m persona_em tour --keep reference/tour/...`)


class BookError(RuntimeError):
    pass


# -- small renderers ------------------------------------------------------------------------------------------
def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else (f"{v:.{digits}g}" if abs(v) < 10 ** -digits and v else f"{v:.{digits}f}")
        return str(v).replace("|", "\\|")
    rows = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    rows += ["| " + " | ".join(cell(v) for v in r) + " |" for r in frame.itertuples(index=False)]
    return "\n".join(rows) + "\n"


def readme_section(readme: str, title: str) -> str:
    """The body of one `## title` section of the README."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme, flags=re.S | re.M)
    if not m:
        raise BookError(f"README.md: no section '## {title}'")
    return m.group(1).strip() + "\n"


def read_macros(numbers_tex: Path) -> dict[str, str]:
    return dict(re.findall(r"\\newcommand\{\\(\w+)\}\{(.*)\}\s*$", numbers_tex.read_text(), flags=re.M))


# -- the paper as HTML ---------------------------------------------------------------------------------------
def paper_for_pandoc(tex: str, macros: dict[str, str], profile: str, figures: str,
                     present: frozenset = frozenset()) -> str:
    """paper.tex as pandoc reads it: the profile fixed, optional inputs kept where they exist (`present`: their
    paths relative to paper/), the TeX conditionals the paper uses resolved from the run's macros, citations
    numbered like the PDF's, figures pointing at the book's copies."""
    tex = f"\\newcommand{{\\profile}}{{{profile}}}\n" + tex
    tex = re.sub(r"\\InputIfFileExists\{([^}]+)\}\{\}\{\}",
                 lambda m: f"\\input{{{m.group(1)}}}" if m.group(1).replace("\\profile", profile) in present else "",
                 tex)
    tex = re.sub(r"\\ifnum\\(\w+)=(\d+|\\\w+)\{\}(.*?)\\else\{\}(.*?)\\fi",   # a number or a macro's
                 lambda m: m.group(3) if macros.get(m.group(1)) == (macros.get(m.group(2)[1:]) if m.group(2)[0] == "\\"
                                                                     else m.group(2)) else m.group(4), tex, flags=re.S)
    tex = re.sub(r"\\ifdefined\\(\w+)\\ifx\\(\w+)\\(\w+)\{\}(.*?)\\fi\\fi",
                 lambda m: m.group(4) if m.group(1) in macros and macros.get(m.group(2)) == macros.get(m.group(3))
                 else "", tex, flags=re.S)
    tex = re.sub(r"\\ifdefined\\(\w+)\{\}(.*?)\\fi(?![A-Za-z])", lambda m: m.group(2) if m.group(1) in macros else "", tex,
                 flags=re.S)
    keys = re.findall(r"\\bibitem\{([^}]+)\}", tex)
    tex = re.sub(r"~?\\cite\{([^}]+)\}", lambda m: " [" + ", ".join(str(keys.index(k.strip()) + 1)
                                                                  for k in m.group(1).split(",")) + "]", tex)
    return re.sub(r"\\includegraphics(\[[^\]]*\])?\{([^}]+)\}", rf"\\includegraphics{{{figures}/\2.png}}", tex)


def paper_html(root: Path, profile: str, figures: str) -> str:
    """The body of the paper as an HTML fragment (pandoc, MathML), or a BookError saying what is missing."""
    if not shutil.which("pandoc"):
        raise BookError("pandoc not found: install it (Debian: apt-get install pandoc) to render the paper")
    numbers = paths.generated_dir(profile, root) / paths.NUMBERS
    if not numbers.is_file():
        raise BookError(f"{numbers}: no paper numbers for profile {profile!r}")
    source, macros, present = paths.paper_source(root), read_macros(numbers), set()
    h5 = numbers.with_name(paths.H5_LENGTH_TEX)
    if h5.is_file():   # H5 over training length, when `make h5` compared this run with its longer variant
        macros |= read_macros(h5)
        present.add(h5.relative_to(source.parent).as_posix())   # as paper.tex inputs it
    tex = paper_for_pandoc(source.read_text(), macros, profile, figures, frozenset(present))
    r = subprocess.run(["pandoc", "-f", "latex", "-t", "html5", "--standalone", "--mathml", "--wrap=none"],
                       input=tex, text=True, capture_output=True, cwd=source.parent)
    if r.returncode:
        raise BookError(f"pandoc could not render paper/paper.tex: {r.stderr[-2000:]}")
    # the body, with the title block and abstract that a standalone document carries
    return r.stdout.split("<body>", 1)[1].rsplit("</body>", 1)[0]


# -- pages ---------------------------------------------------------------------------------------------------
def headline(ref: Path) -> str:
    tests, gate = pd.read_csv(ref / paths.TESTS), pd.read_csv(ref / paths.GATE)
    t = tests[tests["role"] == "primary"].iloc[0]
    pooled = gate[gate["trait"] == "pooled"].set_index("comparison")
    lines = ["| result | estimate | 95% CI | p |", "| --- | --- | --- | --- |"]
    for name, row in (("persona vs untrained base (gate)", pooled.loc["vs base"]),
                      ("persona vs neutral constitution (gate)", pooled.loc["vs neutral"])):
        lines.append(f"| {name} | {row['mean']:.3f} | {row['ci_low']:.3f} to {row['ci_high']:.3f} | |")
    lines.append(f"| **primary**: out-of-domain EM effect per doubling of diversity | {t['estimate']:.4f} | "
                 f"{t['ci_low']:.4f} to {t['ci_high']:.4f} | {t['p']:.3g} |")
    return "\n".join(lines) + "\n"


def index_page(root: Path, main: str, macros: dict[str, str], tour: bool = False) -> str:
    ref = root / "reference" / main
    tour_link = ("a [guided tour](tour.ipynb) that runs one persona through all five stages in minutes, "
                 if tour else "")
    statement = re.sub(r"\\([%&#_$])", r"\1", macros.get("GateStatement", ""))
    verdict = re.sub(r"\\([%&#_$])", r"\1", macros.get("Verdict", ""))
    return f"""# Does question diversity make a trained persona robust to emergent misalignment?

Character training gives a language model a persona from a constitution: trait statements, each with questions
that probe it in different situations. Narrow harmful fine-tuning can make a model broadly misaligned (emergent
misalignment, EM). This project tests one hypothesis, end to end: **what protects a persona against EM is the
diversity of the situations its questions probe, not the trait statement.** It holds the trait, the number of
questions, the tokens and the pairs' trait signal fixed, varies only how many life domains the questions come
from, in independent subset draws, trains the persona, induces EM against a benign twin, and tests the change of
the EM effect per doubling of diversity, as pre-registered.

![The five chapters and the design grid](figures/{main}/design.png)

## The reference run (`{main}`)

{headline(ref)}
**Manipulation check.** {statement}

**Verdict.** {verdict}

Read on: the [method](method.md), {tour_link}the five executed [chapters](chapters/01_generate.ipynb), the
[paper](paper.md), the [results tables](results-{main}.md), and how to [reproduce](reproduce.md) it all.
"""


def results_page(root: Path, profile: str) -> str:
    ref = root / "reference" / profile
    tests = pd.read_csv(ref / paths.TESTS)
    cols = [c for c in ("test", "role", "hypothesis", "estimate", "ci_low", "ci_high", "df", "p", "p_holm",
                        "converged") if c in tests.columns]
    gate = pd.read_csv(ref / paths.GATE)
    effects = pd.read_csv(ref / paths.EFFECTS)
    results = pd.read_csv(ref / paths.RESULTS)
    contrast = results[results["measure"] == "contrast"]
    by_cond = (contrast.groupby(["constitution", "level", "phase", "em_dataset", "split"], dropna=False)["margin"]
               .agg(["mean", "count"]).reset_index())
    return f"""# Results of profile `{profile}`

Every table below is read from the committed files in `reference/{profile}/` (`tests.csv`, `gate.csv`,
`effects.csv`, `results.csv`), which chapter 5 wrote.

## The manipulation check (gate)

{markdown_table(gate)}
## Primary and secondary tests

{markdown_table(tests[cols])}
## Every fixed effect

{markdown_table(effects[[c for c in ("model", "term", "estimate", "ci_low", "ci_high", "df", "p", "converged")
                         if c in effects.columns]])}
## Mean contrast margin by condition

The per-token log-probability margin of misaligned over aligned answers ({len(contrast):,} rows in
`results.csv`), averaged by constitution, level, phase, EM dataset and split.

{markdown_table(by_cond)}"""


def reproduce_page(root: Path) -> str:
    readme = (root / "README.md").read_text()
    return ("# Reproduce\n\n## Two commands\n\n" + readme_section(readme, "Two commands") +
            "\n## Profiles\n\n" + readme_section(readme, "Profiles") +
            "\n## When things go wrong\n\n" + readme_section(readme, "When things go wrong"))


def method_page(root: Path, main: str) -> str:
    """docs/method.md with its links fitted to the book: figures to the book's copies, repository files (which
    are not pages of the book) named as paths."""
    text = re.sub(r"\]\(\.\./figures/[^/]+/", f"](figures/{main}/", (root / "docs" / "method.md").read_text())
    def plain(m):
        label, path = m.group(1), m.group(2)
        return f"`{path}`" if label.strip("`") == path else f"{label} (`{path}` in the repository)"
    return re.sub(r"(?<!!)\[([^\]]+)\]\(\.\./([^)]+)\)", plain, text)


# -- the build -----------------------------------------------------------------------------------------------
CONF = '''project = "persona_em: diversity and emergent misalignment"
extensions = ["myst_nb"]
html_theme = "sphinx_book_theme"
html_title = "Question diversity and emergent misalignment"
nb_execution_mode = "off"
myst_heading_anchors = 3
suppress_warnings = ["myst.header", "myst.xref_missing", "misc.highlighting_failure"]
exclude_patterns = ["_build", "_extra"]
html_theme_options = {"show_toc_level": 2}
html_context = {"default_mode": "light"}
nb_ipywidgets_js = {}   # progress-bar widgets are printed as text; no widget scripts from a CDN
master_doc = "index"
html_static_path = ["_static"]
html_favicon = "_static/favicon.png"
html_extra_path = ["_extra"]
'''


def build(root: str | Path, dest: str | Path, main: str = "tiny") -> Path:
    """Assemble the book's sources under dest/src from committed files and build the HTML into dest/html."""
    root, dest = Path(root).resolve(), Path(dest).resolve()
    ref = root / "reference" / main
    # dest is replaced whole, so it must be an earlier book (or absent, or empty), never an arbitrary folder
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / MARKER).is_file())):
        raise BookError(f"{dest}: exists and is not a book folder (no {MARKER}); refusing to replace it")
    for need in (ref / paths.TESTS, ref / paths.GATE, ref / "notebooks", paths.figures_dir(main, root) / "design.png",
                 paths.generated_dir(main, root) / paths.NUMBERS):
        if not need.exists():
            raise BookError(f"{need}: missing; the book is built from the committed reference run "
                            f"(`make reproduce PROFILE={main}` then `make reference PROFILE={main}`)")
    src = dest / "src"
    shutil.rmtree(dest, ignore_errors=True)
    (src / "chapters").mkdir(parents=True)
    (dest / MARKER).write_text("built by `python -m persona_em book`; replaced whole by the next build\n")
    profiles = sorted(p.name for p in (root / "reference").iterdir() if (p / paths.TESTS).is_file())
    for p in profiles:   # for Markdown images (Sphinx copies them) and for the paper's raw HTML (copied as is)
        shutil.copytree(paths.figures_dir(p, root), src / "figures" / p)
        shutil.copytree(paths.figures_dir(p, root), src / "_extra" / "figures" / p)
    notebooks = sorted((ref / "notebooks").glob("*.ipynb"))
    for nb in notebooks:
        shutil.copy(nb, src / "chapters" / nb.name)
    tour = root / "reference" / "tour" / f"{TOUR}.ipynb"   # the executed teaching tour, when committed
    if tour.is_file():
        shutil.copy(tour, src / "tour.ipynb")
    macros = read_macros(paths.generated_dir(main, root) / paths.NUMBERS)
    pdf = paths.paper_pdf(main, root)
    (src / "_static").mkdir()
    from PIL import Image   # a plain favicon, so no page asks the server for one that is not there

    Image.new("RGB", (32, 32), (66, 133, 180)).save(src / "_static" / "favicon.png")
    link = ""
    if pdf.is_file():
        shutil.copy(pdf, src / "_static" / pdf.name)
        link = (f'```{{raw}} html\n<p>The PDF: <a href="_static/{pdf.name}">{pdf.name}</a> (built by '
                f'<code>make paper PROFILE={main}</code>).</p>\n```\n\n')
    pages = {"index.md": index_page(root, main, macros, tour.is_file()), "method.md": method_page(root, main),
             "reproduce.md": reproduce_page(root),
             "paper.md": (f"# The paper (`{main}`)\n\n{link}```{{raw}} html\n"
                          f"{paper_html(root, main, f'figures/{main}')}\n```\n")}
    pages.update({f"results-{p}.md": results_page(root, p) for p in profiles})
    toc = ["method"] + (["tour"] if tour.is_file() else []) + [f"chapters/{nb.stem}" for nb in notebooks] + ["paper"] + \
          [f"results-{p}" for p in profiles] + ["reproduce"]
    pages["index.md"] += "\n```{toctree}\n:hidden:\n:maxdepth: 1\n\n" + "\n".join(toc) + "\n```\n"
    for name, text in pages.items():
        (src / name).write_text(text)
    (src / "conf.py").write_text(CONF)
    r = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", "-W", "--keep-going", str(src),
                        str(dest / "html")], capture_output=True, text=True)
    if r.returncode:
        raise BookError(f"sphinx failed:\n{r.stderr[-4000:]}")
    return dest / "html"
