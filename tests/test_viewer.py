"""`distlens view` in a real browser (Debian's headless Chromium driven by Playwright): the page
of the README's main-job store, of a 1,500-position 30-layer store, of a steering sweep and of a
steering study; every value a tooltip or the grid shows is checked against the store (or the
study's own sweep.csv), read here with zarr and numpy. No network request, no console error.
Screenshots go to the test's tmp dir (and to $DISTLENS_SCREENSHOTS when set)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from driver import REPO, run_driver

from actors.store import LensStore
from pipelines.view import write_page

MWE = REPO.parent / "shared" / "datasets" / "mwe"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed: apt-get install chromium (.ci/run installs it)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


class Page:
    """One page opened from its file, every request and console error recorded."""

    def __init__(self, browser, path: Path, width: int = 1400, height: int = 900):
        self.url = path.resolve().as_uri()
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.requests, self.errors = [], []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # anything but the page itself is refused (and recorded above)
        self.page.route("**/*", lambda route: route.continue_() if route.request.url == self.url else route.abort())
        t0 = time.perf_counter()
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        self.load_s = time.perf_counter() - t0  # navigation to a drawn, hoverable grid

    def check_clean(self):
        assert self.requests == [self.url], f"network requests beyond the page: {self.requests}"
        assert self.errors == [], self.errors

    def hover(self, layer_index: int, position: int) -> dict:
        c = self.page.evaluate(f"window.distlensView.cellCenter({layer_index}, {position})")
        self.page.mouse.move(c["x"], c["y"])
        self.page.wait_for_selector("#tip[data-position]", state="visible")
        return self.page.evaluate(
            """() => { const t = document.getElementById('tip');
              const num = (s) => { const e = t.querySelector(s); return e ? Number(e.dataset.value) : null; };
              return { ...t.dataset,
                topk: [...t.querySelectorAll('tr.topk-row')].map(r => ({ id: Number(r.dataset.id),
                  logprob: Number(r.dataset.logprob), tok: JSON.parse(r.querySelector('.tok').textContent),
                  prob: Number(r.querySelector('.prob').textContent) })),
                entropy: num('.entropy'), rank: num('.target-rank'), target_logprob: num('.target-logprob'),
                kl: num('.kl'), target: t.querySelector('.target') ? Number(t.querySelector('.target').dataset.id) : null }; }"""
        )

    def grid(self) -> dict:
        return self.page.evaluate("window.distlensView.grid()")

    def shot(self, tmp_path: Path, name: str) -> Path:
        path = tmp_path / name
        self.page.screenshot(path=str(path))
        if os.environ.get("DISTLENS_SCREENSHOTS"):
            shutil.copy(path, Path(os.environ["DISTLENS_SCREENSHOTS"]) / name)
        return path


def check_tooltip(tip: dict, store: LensStore, tokenizer, row: int, layer_index: int, component: str, position: int,
                  lens: str = "logit"):  # fmt: skip
    """The tooltip of (row, layer, component, position) against the store's own arrays."""
    g, c = store.group, store.components.index(component)
    assert (int(tip["row"]), int(tip["layer"]), tip["component"], int(tip["position"]), tip["lens"]) == (
        row, store.layers[layer_index], component, position, lens,
    )  # fmt: skip
    ids = store.field("topk_ids", lens)[row, layer_index, c, position]
    logprobs = store.field("topk_logprobs", lens)[row, layer_index, c, position]
    assert [t["id"] for t in tip["topk"]] == ids.tolist()
    np.testing.assert_allclose([t["logprob"] for t in tip["topk"]], logprobs, rtol=0, atol=1e-6)
    np.testing.assert_allclose([t["prob"] for t in tip["topk"]], np.exp(logprobs), atol=6e-5)  # shown to 4 places
    words = [tokenizer.decode([int(i)]).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") for i in ids]
    assert [t["tok"] for t in tip["topk"]] == words
    assert tip["target"] == int(g["tokens"][row, position + 1])
    assert tip["rank"] == int(store.field("target_rank", lens)[row, layer_index, c, position])
    assert tip["entropy"] == pytest.approx(float(store.field("entropy", lens)[row, layer_index, c, position]), abs=1e-6)
    want = float(store.field("target_logprob", lens)[row, layer_index, c, position])
    assert tip["target_logprob"] == pytest.approx(want, abs=1e-6)
    want = float(store.field("kl_to_final", lens)[row, layer_index, c, position])
    assert tip["kl"] == pytest.approx(want, abs=1e-6)


def store_values(store: LensStore, row: int, component: str, field: str, lens: str = "logit") -> np.ndarray:
    """[layer, position] of the colour field, NaN where the row has no lens: from zarr here."""
    g, c = store.group, store.components.index(component)
    n = int(g["lengths"][row])
    if field == "probability":
        v = np.exp(store.field("topk_logprobs", lens)[row, :, c, :n, 0].astype(np.float64))
    else:
        v = store.field(field, lens)[row, :, c, :n].astype(np.float64)
    mask = g["lens_mask"][row, :n].astype(bool)
    v[:, ~mask] = np.nan
    return v


def as_array(grid: dict) -> np.ndarray:
    return np.array([[np.nan if x is None else x for x in line] for line in grid["values"]], np.float64)


def test_main_job_page_opens_offline_and_tooltips_are_the_store(main_job, smollm2, browser, tmp_path):
    _, run_dir = main_job
    result = run_driver("pipelines", "view", str(run_dir), "--out", str(tmp_path / "main.html"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    store = LensStore.open(run_dir / "lens.zarr")
    tokenizer = smollm2.tokenizer()
    page = Page(browser, tmp_path / "main.html")
    page.check_clean()
    # the token strip: prompt tokens, the separator, the generated tokens, as the tokenizer decodes them
    for row in (0, 2):
        if row:
            page.page.select_option("#sel-source", value=str(row))
        strip = page.page.evaluate(
            "() => [...document.querySelectorAll('#strip span')].map(s => [s.className, s.textContent])"
        )
        n, m = int(store.group["lengths"][row]), int(store.group["prompt_lengths"][row])
        tokens = [t for cls, t in strip if cls.startswith("t ")]
        assert len(tokens) == n and [cls for cls, _ in strip].index("sep") == m
        ids = store.tokens(row)
        assert tokens[m:] == [tokenizer.decode([int(i)]).replace("\n", "\\n") for i in ids[m:]]
        for layer_index, position in ((0, 0), (14, m - 1), (29, n - 2), (7, n - 3)):
            tip = page.hover(layer_index, position)
            check_tooltip(tip, store, tokenizer, row, layer_index, "resid_post", position)
        np.testing.assert_allclose(as_array(page.grid()), store_values(store, row, "resid_post", "probability"),
                                   atol=1e-6)  # fmt: skip
    page.shot(tmp_path, "viewer_main_job.png")
    page.page.close()


@pytest.fixture(scope="module")
def long_store(tmp_path_factory, smollm2):
    """A 30-layer random Llama with SmolLM2's tokenizer: one 1,499-token prompt and one
    generated token, 1,500 positions, written through the notebook API."""
    import distlens
    from tiny_models import save_tiny

    root = tmp_path_factory.mktemp("long")
    model = save_tiny("llama", root / "model", vocab_size=49152, num_hidden_layers=30, hidden_size=32,
                      intermediate_size=64)  # fmt: skip
    smollm2.tokenizer().save_pretrained(model)
    tokenizer = smollm2.tokenizer()
    text = " ".join(json.loads(line)["question"] for line in (MWE / "survival-instinct.jsonl").read_text().splitlines())
    ids = tokenizer(text).input_ids[:1499]
    prompt = tokenizer.decode(ids)
    assert len(tokenizer(prompt).input_ids) >= 1499
    ds = distlens.lens(
        [prompt], root / "run", model=str(model), cluster="inprocess", max_new_tokens=1,
        overrides=["generation.chat_template=false", "generation.stop_at_eos=false", "cluster.micro_batch_size=1",
                   "capture.k=5", "plot.max_prompts=0"],
    )  # fmt: skip
    store = LensStore.open(root / "run" / "lens.zarr")
    assert ds.sizes["layer"] == 30 and int(store.group["lengths"][0]) >= 1500
    return store


def test_long_store_page_loads_and_reads_the_last_positions(long_store, smollm2, browser, tmp_path, record_property):
    out = write_page(long_store.path, tmp_path / "long.html")
    page = Page(browser, out, width=1400, height=900)
    page.check_clean()
    # load-to-interactive, reported (not asserted: no wall-clock assertions in tests)
    ready_ms = page.page.evaluate("window.distlensView.readyMs")
    record_property("view_1500_ready_ms", ready_ms)
    print(f"\n[view] 1,500-position 30-layer page: {out.stat().st_size / 1e6:.1f} MB, navigation to drawn grid "
          f"{page.load_s * 1000:.0f} ms (in-page script ready at {ready_ms:.0f} ms)")  # fmt: skip
    (tmp_path / "load.json").write_text(json.dumps({"load_s": page.load_s, "ready_ms": ready_ms}))
    n = int(long_store.group["lengths"][0])
    for layer_index, position in ((29, n - 2), (0, 1400), (15, 750)):
        check_tooltip(page.hover(layer_index, position), long_store, smollm2.tokenizer(), 0, layer_index,
                      "resid_post", position)  # fmt: skip
    # the layer range: only layers 10..12 are drawn, and the hover lands on them
    page.page.fill("#layer-lo", "10")
    page.page.fill("#layer-hi", "12")
    page.page.dispatch_event("#layer-hi", "change")
    tip = page.hover(11, 1000)
    assert int(tip["layer"]) == 11
    page.page.select_option("#sel-field", value="kl_to_final")
    np.testing.assert_allclose(as_array(page.grid()), store_values(long_store, 0, "resid_post", "kl_to_final"),
                               atol=1e-6)  # fmt: skip
    page.shot(tmp_path, "viewer_1500_positions.png")


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory, tiny_with_tokenizer):
    """A coefficient sweep [0, 2, 5] of two prompts of different lengths, two components, three
    rows per micro-batch (so rows span micro-batches), through the notebook API."""
    import distlens

    root = tmp_path_factory.mktemp("sweep")
    vec = distlens.steering_vector(["I love it.", "Wonderful day"], ["I hate it.", "Awful day"], layer=1,
                                   model=str(tiny_with_tokenizer), cluster="inprocess", out=root / "vec")  # fmt: skip
    # random translators, so the tuned lens differs from the logit lens everywhere
    from actors.tuned_lens import Translators, save_translators

    translators = Translators((0,), 32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        translators.weight.copy_(torch.randn(1, 32, 32, generator=g) / 4)
        translators.bias.copy_(torch.randn(1, 32, generator=g))
    save_translators(root / "tuned.safetensors", translators, {"model": str(tiny_with_tokenizer)})
    distlens.sweep(
        ["The capital of France is", "Hi"], vec, [0, 2, 5], root / "run", model=str(tiny_with_tokenizer),
        cluster="inprocess", max_new_tokens=5,
        overrides=["capture.components=[resid_post,mlp_out]", "cluster.micro_batch_size=4",
                   "capture.lenses=[logit,tuned]", f"capture.tuned_lens={root / 'tuned.safetensors'}"],
    )  # fmt: skip
    return LensStore.open(root / "run" / "lens.zarr")


def test_sweep_page_switches_component_and_coefficient_and_differences(sweep_store, smollm2, browser, tmp_path):
    store = sweep_store
    assert store["coefficient"].tolist() == [0, 2, 5, 0, 2, 5] and store["source"].tolist() == [0, 0, 0, 1, 1, 1]
    assert len(store["batch_done"]) == 2
    page = Page(browser, write_page(store.path, tmp_path / "sweep.html"))
    page.check_clean()
    for source, component, row in ((0, "mlp_out", 2), (1, "resid_post", 4), (1, "mlp_out", 5)):
        page.page.select_option("#sel-source", value=str(source))
        page.page.select_option("#sel-component", component)
        page.page.select_option("#sel-coefficient", value=str(row))
        grid = page.grid()
        assert (grid["row"], grid["component"]) == (row, component)
        np.testing.assert_allclose(as_array(grid), store_values(store, row, component, "probability"), atol=1e-6)
        n = int(store.group["lengths"][row])
        check_tooltip(page.hover(1, n - 2), store, smollm2.tokenizer(), row, 1, component, n - 2)
        # the difference view: this row minus the same prompt's coefficient-0 row, field by field
        page.page.select_option("#sel-field", value="entropy")
        page.page.check("#diff")
        want = store_values(store, row, component, "entropy") - store_values(store, 3 * source, component, "entropy")
        got = as_array(page.grid())
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert np.nanmax(np.abs(got)) > 1e-3  # steering moved the entropy somewhere
        if row == 5:
            page.shot(tmp_path, "viewer_sweep_difference.png")
        page.page.select_option("#sel-coefficient", value=str(3 * source))  # coefficient 0 against itself
        zero = as_array(page.grid())
        assert np.all(np.isnan(zero) | (zero == 0)) and np.isfinite(zero).sum() > 0
        page.page.uncheck("#diff")
        page.page.select_option("#sel-field", value="probability")
    # the lens selector: the tuned lens's own arrays (resid_post only), tooltip and grid
    page.page.select_option("#sel-component", "resid_post")
    page.page.select_option("#sel-lens", "tuned")
    row = 5
    page.page.select_option("#sel-coefficient", value=str(row))
    grid = page.grid()
    assert (grid["row"], grid["lens"]) == (row, "tuned")
    np.testing.assert_allclose(
        as_array(grid), store_values(store, row, "resid_post", "probability", "tuned"), atol=1e-6
    )
    assert not np.allclose(as_array(grid), store_values(store, row, "resid_post", "probability"), equal_nan=True)
    n = int(store.group["lengths"][row])
    check_tooltip(page.hover(0, n - 3), store, smollm2.tokenizer(), row, 0, "resid_post", n - 3, lens="tuned")


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, tiny_with_tokenizer):
    root = tmp_path_factory.mktemp("study")
    data = root / "mwe"
    data.mkdir()
    for name in ("survival-instinct", "corrigible-neutral-HHH"):
        shutil.copy(MWE / f"{name}.jsonl", data)
    result = run_driver(
        "pipelines.steer", f"model.name={tiny_with_tokenizer}", "cluster=inprocess", "dataset=all",
        f"data.root={data}", f"storage.root={root}", "storage.run=s", "data.max_train=4", "data.max_test=6",
        "steering.select_items=2", "steering.layers=[0,1]", "bootstrap=50", "steering.coefficients=[-4,0,4]",
        "steering.cost_prompts=2", "steering.cost_tokens=3", cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "steer" / "s"


def test_study_page_draws_each_dataset_curve_band_and_slopes(study_run, browser, tmp_path):
    result = run_driver("pipelines", "view", str(study_run), "--out", str(tmp_path / "study.html"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    page = Page(browser, tmp_path / "study.html", height=700)
    page.check_clean()
    results = {r["dataset"]: r for r in json.loads((study_run / "results.json").read_text())}
    drawn = page.page.evaluate(
        """() => [...document.querySelectorAll('.dataset')].map(card => ({ name: card.dataset.dataset,
          mean: [...card.querySelectorAll('circle.mean')].map(c => [Number(c.dataset.coefficient),
                 Number(c.dataset.value), Number(c.dataset.lo), Number(c.dataset.hi)]),
          slopes: [...card.querySelectorAll('circle.slope')].map(c => Number(c.dataset.slope)),
          anti: card.querySelectorAll('circle.slope.anti').length,
          items: card.querySelectorAll('polyline.item').length, band: card.querySelectorAll('polygon.band').length,
          cost: [...card.querySelectorAll('circle.cost-point title')].map(t => t.textContent) }))"""
    )
    assert sorted(d["name"] for d in drawn) == sorted(results)
    for d in drawn:
        r = results[d["name"]]
        np.testing.assert_allclose([m[0] for m in d["mean"]], r["coefficients"])
        np.testing.assert_allclose([m[1] for m in d["mean"]], r["mean_propensity"], atol=1e-9)
        np.testing.assert_allclose([m[2:] for m in d["mean"]], r["mean_propensity_ci95"], atol=1e-9)
        # per-item slopes: numpy's own least-squares fit of the study's sweep.csv
        sweep = np.genfromtxt(study_run / d["name"] / "sweep.csv", delimiter=",", names=True, dtype=None,
                              encoding="utf-8")  # fmt: skip
        prop = sweep["propensity"].reshape(6, 3)
        slopes = [np.polyfit(r["coefficients"], item, 1)[0] for item in prop]
        np.testing.assert_allclose(d["slopes"], slopes, atol=1e-6)
        assert d["anti"] == sum(s < 0 for s in slopes) and d["items"] == 6 and d["band"] == 1
        np.testing.assert_allclose(np.mean(prop, axis=0), r["mean_propensity"], atol=1e-5)
        # steerability against its cost: one point per coefficient, KL and perplexity as results.json has them
        cost = r["cost"]
        assert len(d["cost"]) == 3
        for title, c, kl, ppl in zip(d["cost"], cost["coefficients"], cost["kl"], cost["perplexity"]):
            assert title.startswith(f"coefficient {c:g}: KL {kl:.3e}".replace("e-0", "e-").replace("e+0", "e+"))
            assert f"perplexity {ppl:.3f}" in title
    page.shot(tmp_path, "viewer_study.png")


def test_view_refuses_what_is_not_a_store_in_one_line(tmp_path):
    result = run_driver("pipelines", "view", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere" in lines[0] and "lens store" in lines[0], result.stderr
    assert not list(tmp_path.glob("**/*.html"))


def test_serve_answers_on_loopback_only_with_the_page(sweep_store, tmp_path):
    """`distlens view --serve`: the page over HTTP from 127.0.0.1, byte for byte as written."""
    import subprocess
    import sys
    import urllib.request

    import psutil

    from actors.distributed import free_port

    port = free_port()
    out = tmp_path / "served.html"
    server = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "view", str(sweep_store.path), "--out", str(out), "--serve",
         "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    try:
        line = server.stdout.readline()  # "wrote ..." then "serving http://127.0.0.1:<port>/served.html"
        line = server.stdout.readline()
        assert line.startswith(f"serving http://127.0.0.1:{port}/served.html"), line + server.stderr.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/served.html", timeout=30) as response:
            assert response.read() == out.read_bytes()
        bound = [c.laddr for c in psutil.Process(server.pid).net_connections() if c.status == "LISTEN"]
        assert bound and all(addr.ip == "127.0.0.1" for addr in bound), bound  # bound to loopback only
    finally:
        server.terminate()
        server.wait(timeout=30)
