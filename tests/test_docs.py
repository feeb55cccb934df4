"""What the README and docs/ state about the repository, checked against it: the README's size,
every link and every repository path they name, one subject (one title) per page, the config keys
and their defaults, the README's YAML delta, the quick start, the Tasks list, and the README's
range of demo results against the benchmark tables it quotes."""

import glob
import os
import re

import pytest
from common import REPO
from detectron2.config import get_cfg

from disalign_det import add_disalign_config

README = os.path.join(REPO, "README.md")
DOCS = os.path.join(REPO, "docs")
PAGES = [README, os.path.join(REPO, "datasets", "README.md")] + sorted(
    glob.glob(os.path.join(DOCS, "*.md"))
)
README_MAX_BYTES = 12_000
# Folders of the repository whose files the documentation names (datasets/ also holds generated
# data, so only its tracked kinds of file count; output/ is never in the tree).
TREE_PREFIXES = ("disalign_det/", "lab/", "tools/", "configs/", "docs/", "scripts/", "tests/")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _strip_code_blocks(text):
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text):
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", _strip_code_blocks(text), re.M)}


def _section(text, title):
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _table(text, header):
    """Rows (lists of cells) of the markdown table whose header line starts with ``header``."""
    lines = text.split("\n" + header, 1)[1].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_readme_is_a_map_under_12_kb():
    size = os.path.getsize(README)
    assert size < README_MAX_BYTES, f"README.md is {size} bytes (limit {README_MAX_BYTES})"


def test_slug_follows_github():
    assert _slug("Reference numbers (official DisAlign release, NOT measured by us)") == (
        "reference-numbers-official-disalign-release-not-measured-by-us"
    )
    assert _slug("The shipped configs (`configs/LVIS/`)") == "the-shipped-configs-configslvis"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_link_resolves(page):
    text = _read(page)
    broken = []
    for m in LINK.finditer(_strip_code_blocks(text)):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(full):
            broken.append(target)
        elif anchor and anchor not in _anchors(_read(full)):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{os.path.relpath(page, REPO)}: broken links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_repository_path_named_exists(page):
    text = _read(page)
    if page == README:  # a task in progress names the page its lead will write
        text = "\n".join(ln for ln in text.splitlines() if "in progress" not in ln)
    missing = []
    for span in CODE_SPAN.findall(text):
        # A path, not a pattern or a placeholder (`tools/<tool>.py`, `*_rfs.yaml`, `{a,b}`).
        if not span.startswith(TREE_PREFIXES) or re.search(r"[<>*{}\s]|\.\.\.", span):
            continue
        if not os.path.exists(os.path.join(REPO, span.split("#")[0].split("::")[0])):
            missing.append(span)
    assert not missing, f"{os.path.relpath(page, REPO)} names paths that do not exist: {missing}"


def test_docs_pages_have_one_subject_and_are_all_listed():
    listed = {
        os.path.normpath(os.path.join(REPO, m))
        for m in LINK.findall(_section(_read(README), "Documentation"))
        for m in m
        if m
    }
    for page in glob.glob(os.path.join(DOCS, "*.md")):
        titles = re.findall(r"^# .+$", _strip_code_blocks(_read(page)), re.M)
        assert len(titles) == 1, f"{page}: one page, one subject (one '# ' title), got {titles}"
        assert page in listed, f"README's Documentation table does not list {page}"


def _added_keys():
    """{key: default} of every key add_disalign_config adds to detectron2's config."""
    stock, cfg = get_cfg(), get_cfg()
    add_disalign_config(cfg)

    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    stock_keys = flat(stock)
    try:  # detectron2's own DeepLab keys (added for the DeepLab heads) are detectron2's to document
        from detectron2.projects.deeplab import add_deeplab_config

        deeplab = get_cfg()
        add_deeplab_config(deeplab)
        stock_keys.update(flat(deeplab))
    except ImportError:
        pass
    return {k: v for k, v in flat(cfg).items() if k not in stock_keys}


def test_configuration_page_lists_every_key_with_its_default():
    import ast

    rows = _table(_read(os.path.join(DOCS, "configuration.md")), "| key | default | what |")
    documented = {}
    for key, default, _ in rows:
        documented[key.strip("`")] = ast.literal_eval(default.strip("`"))
    added = _added_keys()
    assert len(added) >= 17 and "MODEL.DISALIGN.RHO" in added  # the scan itself works
    assert sorted(documented) == sorted(added), (
        "docs/configuration.md's key table must list exactly the keys add_disalign_config adds: "
        f"undocumented {sorted(set(added) - set(documented))}, "
        f"stale {sorted(set(documented) - set(added))}"
    )
    for key, value in added.items():
        assert (
            documented[key] == value
        ), f"{key}: documented default {documented[key]!r} != {value!r}"


def test_readme_yaml_delta_is_the_shipped_stage_two(tmp_path):
    text = _read(README)
    yaml = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    configs = os.path.join(REPO, "configs", "LVIS")
    delta = tmp_path / "delta.yaml"
    delta.write_text(
        yaml.replace('"mask_rcnn_R_50_FPN_2x.yaml"', f'"{configs}/mask_rcnn_R_50_FPN_2x.yaml"')
    )
    ours, shipped = get_cfg(), get_cfg()
    add_disalign_config(ours)
    add_disalign_config(shipped)
    ours.merge_from_file(str(delta))
    shipped.merge_from_file(os.path.join(configs, "disalign_mask_rcnn.yaml"))
    ours.MODEL.WEIGHTS = shipped.MODEL.WEIGHTS  # the README names a placeholder checkpoint
    for key in ("MODEL", "DATALOADER", "SOLVER.STEPS", "SOLVER.MAX_ITER"):
        a, b = ours, shipped
        for part in key.split("."):
            a, b = a[part], b[part]
        assert (
            a == b
        ), f"README's YAML delta differs from configs/LVIS/disalign_mask_rcnn.yaml in {key}"


def test_configuration_python_snippet_is_the_shipped_stage_two(monkeypatch):
    text = _read(os.path.join(DOCS, "configuration.md"))
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.split("\ntrainer = Trainer(cfg)")[0]  # the config part; training is not run here
    monkeypatch.chdir(REPO)
    scope = {}
    exec(compile(code, "docs/configuration.md", "exec"), scope)
    ours, shipped = scope["cfg"], get_cfg()
    add_disalign_config(shipped)
    shipped.merge_from_file(os.path.join(REPO, "configs", "LVIS", "disalign_mask_rcnn.yaml"))
    ours.MODEL.WEIGHTS = shipped.MODEL.WEIGHTS
    for key in ("MODEL", "DATALOADER"):
        assert ours[key] == shipped[key], f"docs/configuration.md's Python differs in {key}"
    assert (ours.SOLVER.STEPS, ours.SOLVER.MAX_ITER) == (
        shipped.SOLVER.STEPS,
        shipped.SOLVER.MAX_ITER,
    )


def test_quick_start_is_the_two_commands():
    block = re.search(r"## Quick start[^\n]*\n\n```bash\n(.*?)```", _read(README), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    for script in ("demo.sh", "test.sh"):
        assert os.path.isfile(os.path.join(REPO, "scripts", script))


def test_tasks_list_names_a_page_per_task():
    lines = [ln for ln in _section(_read(README), "Tasks").splitlines() if ln.startswith("- ")]
    assert len(lines) == 5
    for line in lines:
        pages = re.findall(r"docs/[\w.]+\.md", line)
        assert pages, f"Tasks line names no docs page: {line}"
        if "in progress" not in line:  # done: its page exists (and the link check follows it)
            assert all(os.path.isfile(os.path.join(REPO, p)) for p in pages), line


def _seed_range(cell):
    """``'+1.0 ± 0.8 (+0.1–+1.7)'`` -> ``('+0.1', '+1.7')``."""
    return re.search(r"\(([-+]?[\d.]+)–([-+]?[\d.]+)\)", cell).groups()


def test_readme_demo_range_is_the_benchmark_spread():
    bench = _read(os.path.join(DOCS, "benchmark.md"))

    def cell(section, row, col):
        body = bench.split(f"\n{section}\n", 1)[1]
        header = [c.strip() for c in body.strip().splitlines()[0].strip("|").split("|")]
        table = _table(body, "| " + header[0])
        return _seed_range(next(r for r in table if r[0] == row)[header.index(col)])

    s1, dis = "softmax (stage one)", "softmax + DisAlign box+mask"

    def span(lo_hi, signed):
        lo, hi = lo_hi
        return f"{lo} to {hi}" if signed else f"{lo}–{hi}"

    box = span(cell("## Box AP over seeds", s1, "box AP"), False)
    mask = span(cell("## Mask AP over seeds", s1, "mask AP"), False)
    gain = "## Gains over the same seed's stage one (box)"
    gain_mask = "## Gains over the same seed's stage one (mask)"
    budget = "### Gains at 15 detections per image (box)"
    expected = {
        "stage one box AP / mask AP, 100 detections": f"{box} / {mask}",
        "DisAlign gain in box AP, 100 detections": span(cell(gain, dis, "Δ box AP"), True),
        "DisAlign gain in box APr / mask APr, 100 detections": (
            f"{span(cell(gain, dis, 'Δ box APr'), True)} / "
            f"{span(cell(gain_mask, dis, 'Δ mask APr'), True)}"
        ),
        "DisAlign gain in box AP / box APc, 15 detections": (
            f"{span(cell(budget, dis, 'Δ box AP'), True)} / "
            f"{span(cell(budget, dis, 'Δ box APc'), True)}"
        ),
    }
    rows = dict(_table(_read(README), "| printed | range over seeds 0, 1, 2 |"))
    assert rows == expected
