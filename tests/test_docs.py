"""The documentation a person reads: README.md stays short, its code compiles, every relative
link in it and in ``secondorder/docs/`` leads somewhere, and each method page names every
keyword its config declares (the shared ones: optimizer.md). The keywords are read at run time
from the config dataclasses (``KFACConfig``, ...; ``OptimizerConfig``), so a field added to
one fails here until its page documents it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from secondorder import (
    EKFAC,
    KFAC,
    MFAC,
    SOAP,
    AdaFisher,
    AdaFisherW,
    AdaHessian,
    Shampoo,
    TwoLevelKFAC,
)
from secondorder.config import OptimizerConfig, config_fields

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
    Shampoo: "shampoo.md",
    SOAP: "shampoo.md",
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


def _own_keywords(cls: type) -> list[str]:
    """The keywords ``cls``'s config declares itself: its own fields and the shared fields
    whose default it changes (the shared ones are documented once, in optimizer.md)."""
    shared = {f.name: f.default for f in config_fields(OptimizerConfig)}
    return ["lr"] + [
        f.name
        for f in config_fields(cls.config_class)
        if f.name != "lr" and (f.name not in shared or f.default != shared[f.name])
    ]


def _names(text: str, name: str) -> bool:
    """Whether ``text`` names keyword ``name`` in code: `` `name` `` or `` `name=...` ``."""
    return re.search(rf"`{re.escape(name)}[`=]", text) is not None


@pytest.mark.parametrize("cls", list(METHOD_PAGES), ids=lambda c: c.__name__)
def test_each_method_page_names_every_keyword_its_config_declares(cls: type) -> None:
    page = DOCS / METHOD_PAGES[cls]
    text = page.read_text(encoding="utf-8")
    keywords = _own_keywords(cls)
    missing = [name for name in keywords if not _names(text, name)]
    assert not missing, f"{page.name} does not mention {cls.__name__}'s keywords {missing}"


def test_the_optimizer_page_names_every_shared_keyword() -> None:
    text = (DOCS / "optimizer.md").read_text(encoding="utf-8")
    keywords = [f.name for f in config_fields(OptimizerConfig)] + ["params", "config"]
    missing = [name for name in keywords if not _names(text, name)]
    assert not missing, f"optimizer.md does not mention the shared keywords {missing}"


def test_readme_python_blocks_compile() -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert blocks, "README.md has no python code block"
    for number, code in enumerate(blocks):
        compile(code, f"README.md python block {number}", "exec")


def test_readme_examples_run_and_train_their_model() -> None:
    """The README's blocks, run in order in one namespace (the first defines the model
    and the data): none raises, and every block's optimizer moves its model by finite
    steps (a default that raised or diverged would fail here)."""
    import torch

    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    namespace: dict = {}
    initial: dict[int, list[torch.Tensor]] = {}  # each built model's initial weights

    def recorded(make):
        def make_model():
            model = make()
            initial[id(model)] = [p.detach().clone() for p in model.parameters()]
            return model

        return make_model

    torch.manual_seed(0)
    checked = 0
    for number, code in enumerate(blocks, start=1):
        namespace.pop("opt", None)
        exec(compile(code, f"README.md python block {number}", "exec"), namespace)
        if "make_model" in namespace and not hasattr(namespace["make_model"], "__wrapped__"):
            namespace["make_model"] = recorded(namespace["make_model"])
            namespace["make_model"].__wrapped__ = True
        model, opt = namespace.get("model"), namespace.get("opt")
        if opt is None or id(model) not in initial:
            continue
        assert isinstance(opt, torch.optim.Optimizer), number
        params = list(model.parameters())
        assert all(torch.isfinite(p).all() for p in params), f"block {number}: non-finite"
        moved = [not torch.equal(a, b) for a, b in zip(params, initial[id(model)], strict=True)]
        assert all(moved), f"block {number}: {type(opt).__name__} left a parameter unchanged"
        checked += 1
    assert checked >= 7, checked  # every method's block after the first
