"""The HTML page of an evaluation report: self-contained, escaped, and showing the JSON's figures.

Every figure sits in an element with a ``data-metric`` attribute; the expected text of each one is
computed here from the JSON file on its own (percentages with 2 decimals for accuracies and other
fractions, ``format(v, ".4g")`` for other floats, a dash for ``None``), and compared with the
page, both as rendered and as headless Chromium's DOM after loading it.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from advtrain.evaluation.html import render_html
from advtrain.evaluation.report import (
    VERDICT,
    WARNING,
    Check,
    ClassMetrics,
    Escalation,
    Report,
    robustness_score,
)

DASH = "\u2014"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SCREENSHOT_COPY = Path("/tmp/advtrain-report.png")


# --------------------------------------------------------------------------- reports


def _classification(n_classes: int, seed: int, support: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    blocks = {}
    for side, base in (("clean", 0.9), ("adversarial", 0.45)):
        scores = (base + 0.1 * torch.rand(n_classes, 3, generator=generator)).clamp(max=1).tolist()
        per_class = {c: ClassMetrics(p, r, f, support) for c, (p, r, f) in enumerate(scores)}
        macro = ClassMetrics(
            *(sum(s[i] for s in scores) / n_classes for i in range(3)), support * n_classes
        )
        blocks[side] = {"per_class": per_class, "macro": macro}
    return blocks


def _per_sample(n: int, n_classes: int) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    attacks = ["clean", "apgd-ce", "apgd-ce", "apgd-t", "square", None, None]
    samples = []
    for i in range(n):
        label = i % n_classes
        broken_by = attacks[i % len(attacks)]
        clean_pred = (label + 1) % n_classes if broken_by == "clean" else label
        adv_pred = label if broken_by is None else (label + 3) % n_classes
        min_norm = (
            0.0
            if broken_by == "clean"
            else (
                math.inf
                if broken_by is None and i % 2
                else float(torch.rand(1, generator=generator)) * 0.08
            )
        )
        samples.append(
            {
                "index": i,
                "label": label,
                "clean_pred": clean_pred,
                "adv_pred": adv_pred,
                "broken_by": broken_by,
                "perturbation_norm": None if broken_by in (None, "clean") else 8 / 255,
                "min_norm": min_norm,
            }
        )
    return samples


def _curve(clean: float) -> list[tuple[float, float]]:
    eps = [i * 2 / 255 for i in range(11)]
    return [(e, round(clean * math.exp(-e * 25), 4)) for e in eps]


def _radius(curve: list[tuple[float, float]], clean: float, threshold: float) -> float | None:
    """The largest eps before the curve first drops below ``threshold * clean``."""
    radius = None
    for eps, accuracy in curve:
        if accuracy < threshold * clean:
            break
        radius = eps
    return radius


@pytest.fixture
def image_report() -> Report:
    """A made-up evaluation of a 10-class model on 20 images of 1x8x8, one verdict fired."""
    torch.manual_seed(0)
    clean, robust = 0.975, 0.4725
    n = 6
    x = torch.rand(n, 1, 8, 8)
    x_adv = (x + 8 / 255 * torch.randn_like(x).sign()).clamp(0, 1)
    y = torch.randint(0, 10, (n,))
    edges = [0.004 * i for i in range(21)]
    counts = [0, 1, 1, 2, 3, 5, 6, 8, 7, 9, 6, 5, 4, 3, 2, 2, 1, 1, 0, 1]
    return Report(
        clean_accuracy=clean,
        robust_accuracy=robust,
        per_attack={"apgd-ce": 0.52, "apgd-t": 0.4912, "fab-t": 0.49, "square": 0.4875},
        robustness_score=robustness_score(clean, robust),
        diagnostics=[
            Check(
                "gradient-norm",
                False,
                "gradients are neither vanishing nor exploding",
                WARNING,
                {"median_grad_norm": 0.0123, "zero_fraction": 0.0},
            ),
            Check(
                "black-box-beats-white-box",
                True,
                "Square broke 3 points APGD left standing <script>alert('x')</script> & more",
                VERDICT,
                {"points": 3, "fraction": 0.0375, "indices": [4, 11, 17]},
            ),
            Check(
                "unbounded-eps",
                False,
                "accuracy reaches 0 at eps=1",
                VERDICT,
                {"accuracy_at_large_eps": 0.0},
            ),
        ],
        escalations=[
            Escalation(
                "black-box-beats-white-box",
                "APGD-T with 5 restarts and EOT over 20 samples",
                0.4875,
                robust,
            )
        ],
        robust_margin={
            "median": 0.0391,
            "mean": 0.04127,
            "found": 0.8718,
            "n": 78,
            "histogram": {"edges": edges, "counts": counts},
        },
        accuracy_vs_eps=_curve(clean),
        adversarial_radius=_radius(_curve(clean), clean, 0.5),
        radius_threshold=0.5,
        entropy={"clean": 0.2134, "adversarial": 1.387},
        defensive_margin={
            "clean_true_probability": 0.9412,
            "adversarial_true_probability": 0.3318,
            "clean_logit_margin": 6.834,
            "adversarial_logit_margin": -0.5521,
        },
        classification=_classification(10, 1, 8),
        positive_class=None,
        per_sample=_per_sample(20, 10),
        settings={
            "norm": "Linf",
            "eps": 8 / 255,
            "suite": "standard",
            "n": 80,
            "n_classes": 10,
            "seed": 0,
            "device": "cpu",
            "seconds": 41.27381,
            "model_flags": {"randomized": False, "preprocessing": "none"},
        },
        examples={
            "x": x,
            "x_adv": x_adv,
            "y": y,
            "clean_pred": y.clone(),
            "adv_pred": (y + 1) % 10,
        },
    )


@pytest.fixture
def tabular_report() -> Report:
    """A made-up binary evaluation on 6 tabular features, positive class 1, nothing fired."""
    torch.manual_seed(1)
    clean, robust = 0.8833, 0.6
    x = torch.randn(5, 6)
    y = torch.tensor([0, 1, 1, 0, 1])
    return Report(
        clean_accuracy=clean,
        robust_accuracy=robust,
        per_attack={"apgd-ce": 0.62, "apgd-t": 0.6},
        robustness_score=robustness_score(clean, robust),
        diagnostics=[
            Check("gradient-norm", False, "fine", WARNING, {}),
            Check("unbounded-eps", False, "fine", VERDICT, {}),
        ],
        escalations=[],
        robust_margin={
            "median": math.inf,
            "mean": None,
            "found": 0.0,
            "n": 12,
            "histogram": {"edges": [], "counts": []},
        },
        accuracy_vs_eps=[(0.0, clean), (0.1, 0.7), (0.2, 0.6), (0.4, 0.3)],
        adversarial_radius=None,
        radius_threshold=0.5,
        entropy={"clean": 0.31, "adversarial": 0.52},
        defensive_margin={
            "clean_true_probability": 0.81,
            "adversarial_true_probability": 0.6,
            "clean_logit_margin": 2.1,
            "adversarial_logit_margin": 0.4,
        },
        classification=_classification(2, 2, 30),
        positive_class=1,
        per_sample=[
            {
                "index": i,
                "label": i % 2,
                "clean_pred": i % 2,
                "adv_pred": i % 2,
                "broken_by": None,
                "perturbation_norm": None,
                "min_norm": math.inf,
            }
            for i in range(12)
        ],
        settings={"norm": "L2", "eps": 0.25, "suite": "quick", "n": 60, "seconds": 3.0},
        examples={
            "x": x,
            "x_adv": x + 0.05 * torch.randn(5, 6),
            "y": y,
            "clean_pred": y,
            "adv_pred": 1 - y,
        },
        losses={
            "per_step": {"apgd-ce": "ce", "apgd-t": "cw"},
            "used": ["ce", "cw"],
            "skipped": {"dlr": "DLR skipped: 2 classes"},
        },
        attack_classes=[1],
        positive_metrics={
            "positive_class": 1,
            "score": "z_p - max_{c != p} z_c",
            "clean": {"recall": 0.8, "precision": 0.75, "pr_auc": 0.81, "roc_auc": 0.9},
            "attacked": {"recall": 0.2, "precision": 0.5, "pr_auc": 0.4, "roc_auc": None},
            "at_fpr": {
                "fpr": 0.01,
                "threshold": 2.345,
                "clean_fpr": 0.008,
                "recall_clean": 0.6,
                "recall_attacked": 0.1,
                "method": "thresholded classifier <attacked>",
            },
        },
        feasibility={
            "adversarial_points": 7,
            "feasible": 7,
            "feasible_share": 1.0,
            "refused": 3,
            "refused_by_step": {"apgd-ce": 3},
            "constraints": {"rules": ["a <= 2 * b"], "integer": ["n"]},
        },
    )


# --------------------------------------------------------------------------- expected figures


def pct(value) -> str:
    return DASH if value is None else f"{value:.2%}"


def num(value) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, ".4g")
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def expected_metrics(d: dict) -> dict[str, str]:
    """The text each ``data-metric`` element should hold, from the report's JSON."""
    m = {
        "clean_accuracy": pct(d["clean_accuracy"]),
        "robust_accuracy": pct(d["robust_accuracy"]),
        "robustness_score": pct(d["robustness_score"]),
        "adversarial_radius": num(d["adversarial_radius"]),
        "radius_threshold": num(d["radius_threshold"]),
        "robust_margin_median": num(d["robust_margin"].get("median")),
    }
    for key, value in d["robust_margin"].items():
        if key not in ("median", "histogram"):
            m[f"robust_margin_{key}"] = pct(value) if key == "found" else num(value)
    for key in ("norm", "eps", "suite", "n", "seconds"):
        m[f"settings:{key}"] = num(d["settings"].get(key))
    m.update({f"settings:{k}": num(v) for k, v in d["settings"].items()})
    if d["positive_class"] is not None:
        m["positive_class"] = num(d["positive_class"])
    m.update({f"per_attack:{k}": pct(v) for k, v in d["per_attack"].items()})
    for sample in d["per_sample"]:
        key = f"broken_by:{sample['broken_by'] or 'standing'}"
        m[key] = str(int(m.get(key, 0)) + 1)
    for i, e in enumerate(d["escalations"]):
        m[f"escalation:{i}:robust_before"] = pct(e["robust_before"])
        m[f"escalation:{i}:robust_after"] = pct(e["robust_after"])
    for c in d["diagnostics"]:
        m[f"diagnostic:{c['name']}"] = "triggered" if c["triggered"] else "ok"
        m.update({f"evidence:{c['name']}:{k}": num(v) for k, v in c["evidence"].items()})
    for i, (eps, accuracy) in enumerate(d["accuracy_vs_eps"]):
        m[f"accuracy_vs_eps:{i}:eps"] = num(eps)
        m[f"accuracy_vs_eps:{i}:accuracy"] = pct(accuracy)
    for group in ("entropy", "defensive_margin"):
        m.update({f"{group}:{k}": num(v) for k, v in d[group].items()})
    for side, block in d["classification"].items():
        rows = {**block["per_class"], "macro": block["macro"]}
        for c, metrics in rows.items():
            m.update({f"classification:{side}:{c}:{k}": num(v) for k, v in metrics.items()})
    m.update(_binary_metrics(d))
    return m


def _binary_metrics(d: dict) -> dict[str, str]:
    """The figures of losses, attacked classes, the positive class and feasibility."""
    m: dict[str, str] = {}
    losses = d.get("losses") or {}
    per_step = losses.get("per_step") or {}
    m.update({f"loss:{k}": per_step[k] for k in d["per_attack"] if k in per_step})
    if losses.get("used") or losses.get("skipped"):
        m["losses:used"] = ", ".join(losses.get("used") or [])
        m.update({f"losses:skipped:{k}": v for k, v in (losses.get("skipped") or {}).items()})
    if d.get("attack_classes") is not None:
        m["attack_classes"] = ", ".join(str(c) for c in d["attack_classes"])
    positive = d.get("positive_metrics")
    if positive:
        for side in ("clean", "attacked"):
            for key in ("recall", "precision", "pr_auc", "roc_auc"):
                m[f"positive:{side}:{key}"] = pct(positive[side].get(key))
        at = positive.get("at_fpr") or {}
        if at.get("threshold") is not None:
            m["positive:at_fpr:recall_clean"] = pct(at["recall_clean"])
            m["positive:at_fpr:recall_attacked"] = pct(at["recall_attacked"])
            m["positive:at_fpr:threshold"] = num(at["threshold"])
            m["positive:at_fpr:clean_fpr"] = pct(at["clean_fpr"])
    feasibility = d.get("feasibility")
    if feasibility:
        m["feasibility:feasible_share"] = pct(feasibility["feasible_share"])
        m["feasibility:adversarial_points"] = num(feasibility["adversarial_points"])
        m["feasibility:refused"] = num(feasibility["refused"])
        if feasibility.get("constraints") is not None:
            text = json.dumps(feasibility["constraints"], indent=1, sort_keys=True)
            m["feasibility:constraints"] = text
    return m


class MetricParser(HTMLParser):
    """Collects the text of every element with a ``data-metric`` attribute (and every src)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.metrics: dict[str, str] = {}
        self.duplicates: list[str] = []
        self.sources: list[str] = []
        self._open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if attrs.get(name) is not None:
                self.sources.append(attrs[name])
        if tag in ("img", "meta", "br", "link", "input", "hr"):
            return
        key = attrs.get("data-metric")
        if key is not None:
            if key in self.metrics:
                self.duplicates.append(key)
            self.metrics[key] = ""
        self._open.append((tag, key))

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data):
        for _, key in reversed(self._open):
            if key is not None:
                self.metrics[key] += data
                break


def parse(page: str) -> MetricParser:
    parser = MetricParser()
    parser.feed(page)
    parser.close()
    return parser


def assert_matches_json(page: str, json_path: Path) -> None:
    parser = parse(page)
    expected = expected_metrics(json.loads(json_path.read_text()))
    shown = {k: v.strip() for k, v in parser.metrics.items()}
    assert not parser.duplicates
    assert sorted(set(expected) - set(shown)) == []  # every figure is on the page
    assert sorted(set(shown) - set(expected)) == []  # and nothing else claims to be one
    wrong = {k: (shown[k], v) for k, v in expected.items() if shown[k] != v}
    assert wrong == {}


# --------------------------------------------------------------------------- unit tests


@pytest.mark.parametrize("which", ["image_report", "tabular_report"])
def test_page_shows_every_figure_of_the_json(which, request, tmp_path):
    report = request.getfixturevalue(which)
    json_path = report.to_json(tmp_path / "report.json")
    page = report.to_html(tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert_matches_json(page, json_path)


def test_formatting_of_headline_figures(image_report, tabular_report):
    shown = parse(render_html(image_report)).metrics
    assert shown["clean_accuracy"] == "97.50%"
    assert shown["robust_accuracy"] == "47.25%"
    assert shown["per_attack:apgd-t"] == "49.12%"
    assert shown["adversarial_radius"] == format(6 / 255, ".4g")
    assert shown["diagnostic:black-box-beats-white-box"] == "triggered"
    assert shown["diagnostic:gradient-norm"] == "ok"
    assert shown["broken_by:apgd-ce"] == "6"
    tabular = parse(render_html(tabular_report)).metrics
    assert tabular["adversarial_radius"] == DASH  # None
    assert tabular["robust_margin_median"] == DASH  # inf, written as null in the JSON


def test_page_is_self_contained(image_report, tabular_report):
    for report in (image_report, tabular_report):
        page = render_html(report)
        assert "http://" not in page and "https://" not in page
        assert 'src="/' not in page and "url(" not in page and "<script" not in page
        assert "<link" not in page and "@import" not in page
        sources = parse(page).sources
        assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_images_are_valid_png(image_report, tabular_report):
    for report, expected in ((image_report, 3), (tabular_report, 2)):
        sources = parse(render_html(report)).sources
        assert len(sources) == expected  # curve, histogram (image report only), examples
        for source in sources:
            data = base64.b64decode(source.split(",", 1)[1], validate=True)
            assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_text_is_escaped(image_report):
    image_report.diagnostics.append(Check('x"><b>', True, "</td></tr><script>bad()</script>"))
    image_report.settings["suite"] = "<i>suite</i>"
    page = render_html(image_report)
    assert "<script>alert" not in page and "<script>bad" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "&lt;/td&gt;&lt;/tr&gt;&lt;script&gt;bad()&lt;/script&gt;" in page
    assert "<b>" not in page.split("<main>", 1)[1].replace("<b>verdict</b>", "").replace(
        "<b>warning</b>", ""
    )
    shown = parse(page).metrics
    assert shown['diagnostic:x"><b>'] == "triggered"
    assert shown["settings:suite"] == "<i>suite</i>" and "<i>suite" not in page


def test_positive_class_is_highlighted(tabular_report, image_report):
    page = render_html(tabular_report)
    rows = re.findall(r'<tr class="positive"><td>([^<]*)</td>', page)
    assert rows == ["1 (positive)", "1 (positive)"]  # clean and adversarial tables
    assert 'class="positive"' not in render_html(image_report)


def test_missing_pieces_are_handled(image_report):
    image_report.examples = {}
    image_report.robust_margin = {"median": 0.04, "found": 0.9}  # no histogram: from per_sample
    page = render_html(image_report)
    assert "Adversarial examples" not in page
    assert len(parse(page).sources) == 2
    for sample in image_report.per_sample:
        sample["min_norm"] = None
    image_report.accuracy_vs_eps = []
    page = render_html(image_report)
    assert "No minimum-norm results" in page and "No accuracy-versus-eps curve" in page
    assert parse(page).sources == []


# --------------------------------------------------------------------------- headless Chromium


def find_browser() -> str:
    """The path of a Chromium-like browser; skip without one, but fail under CI."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"none of {', '.join(BROWSERS)} is on the PATH under CI")
    pytest.skip(f"none of {', '.join(BROWSERS)} is on the PATH")


def test_missing_browser_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        find_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        find_browser()


def _chromium(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done


def test_chromium_renders_the_report(image_report, tmp_path):
    browser = find_browser()
    html_path = image_report.to_html(tmp_path / "report.html")
    json_path = image_report.to_json(tmp_path / "report.json")
    url = html_path.resolve().as_uri()

    dom = _chromium(browser, tmp_path, "--dump-dom", url).stdout.decode("utf-8")
    assert "data-metric" in dom
    assert_matches_json(dom, json_path)

    screenshot = tmp_path / "report.png"
    _chromium(browser, tmp_path, f"--screenshot={screenshot}", "--window-size=1280,2400", url)
    assert screenshot.exists()
    data = screenshot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
