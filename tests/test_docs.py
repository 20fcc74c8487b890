"""The documentation a person reads: README.md stays short, its code compiles, every relative
link in it and in ``secondorder/docs/`` leads somewhere, and each method page names every
keyword its optimizer takes. The keywords are read at run time from the constructors and from
the method's config dataclass (``KFACConfig``, ...) where the package exports one, so a
keyword or field added to either fails here until its page documents it."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import secondorder
from secondorder import EKFAC, KFAC, MFAC, AdaFisher, AdaFisherW, AdaHessian, TwoLevelKFAC

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "secondorder" / "docs"
PAGES = sorted(DOCS.glob("*.md"))
MAX_README_LINES = 250

METHOD_PAGES = {
    KFAC: "kfac.md",
    EKFAC: "ekfac.md",
    TwoLevelKFAC: "twolevel.md",
    MFAC: "mfac.md",
    AdaFisher: "adafisher.md",
    AdaFisherW: "adafisher.md",
    AdaHessian: "adahessian.md",
}

# [text](target) and ![alt](target); a target ends at whitespace or ')'
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a link-like string in code is not a link)."""
    return _FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _prose(page.read_text(encoding="utf-8")), re.M)
    return {_slug(h) for h in headings}


def _relative_links(page: Path) -> list[str]:
    links = _LINK.findall(_prose(page.read_text(encoding="utf-8")))
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move detail to "
        "secondorder/docs/ and measured numbers to benchmarks/RESULTS.md"
    )


def test_the_docs_pages_exist() -> None:
    names = {page.name for page in PAGES}
    expected = {"index.md", "layers.md", "optimizer.md", "bench.md", "analysis.md"}
    assert expected | set(METHOD_PAGES.values()) <= names


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_existing_files_and_headings(page: Path) -> None:
    broken = []
    for link in _relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no file {target.relative_to(ROOT)})")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_the_index_lists_every_page() -> None:
    linked = {Path(link.partition("#")[0]).name for link in _relative_links(DOCS / "index.md")}
    missing = {page.name for page in PAGES} - linked - {"index.md"}
    assert not missing, f"index.md does not link {sorted(missing)}"


def _config_class(cls: type) -> type | None:
    """The method's config dataclass (``AdaFisherW`` shares ``AdaFisher``'s), if exported."""
    name = "AdaFisher" if cls is AdaFisherW else cls.__name__
    config = getattr(secondorder, f"{name}Config", None)
    return config if dataclasses.is_dataclass(config) else None


def _keywords(cls: type) -> list[str]:
    """The keyword arguments of ``cls.__init__`` (not ``self``, the model, or ``**kwargs``)
    and the fields its config dataclass takes on construction (``init=False`` ones are
    derived, not set by a user)."""
    params = inspect.signature(cls.__init__).parameters.values()
    names = [
        p.name
        for p in params
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in ("self", "model", "model_or_params")
    ]
    config = _config_class(cls)
    if config is not None:
        names += [f.name for f in dataclasses.fields(config) if f.init and f.name not in names]
    return names


@pytest.mark.parametrize("cls", list(METHOD_PAGES), ids=lambda c: c.__name__)
def test_each_method_page_names_every_keyword_of_its_optimizer(cls: type) -> None:
    page = DOCS / METHOD_PAGES[cls]
    text = page.read_text(encoding="utf-8")
    keywords = _keywords(cls)
    assert keywords, f"{cls.__name__}.__init__ has no keywords: the signature was not read"
    missing = [name for name in keywords if f"`{name}`" not in text]
    assert not missing, f"{page.name} does not mention {cls.__name__}'s keywords {missing}"


def test_readme_python_blocks_compile() -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert blocks, "README.md has no python code block"
    for number, code in enumerate(blocks):
        compile(code, f"README.md python block {number}", "exec")
