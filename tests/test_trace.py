"""Denoising traces: trace.json rebuilds the answer, the page works in a real browser, the PNG is drawn."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import PROMPTS
from typer.testing import CliRunner

import dllm_cache
from dllm_cache.cache import make_policy
from dllm_cache.cli import app
from dllm_cache.engine import generate as engine_generate
from dllm_cache.errors import DllmCacheError
from dllm_cache.trace import (
    figure_size,
    generate,
    load_trace,
    render_page,
    replay,
    traced_generate,
    write_trace,
)
from dllm_cache.trace.browser import BrowserUnavailable, find_browser, headless_chromium
from dllm_cache.trace.live import MASK_GLYPH, render_canvas

runner = CliRunner()
BAR_PROMPT = (
    "Mia splits 7 shells into two piles with at least one in each. How many shells can be in each pile?"
)


def recomputed_count(step: dict, row: int) -> int:
    return sum(e - s for layer in step["active_rows"][row] for s, e in layer)


def check_consistent(trace: dict, result) -> None:
    """Everything a reader of trace.json relies on, against the generation it came from."""
    P, mask = result.prompt_length, trace["mask_token_id"]
    assert len(trace["steps"]) == result.stats.steps
    assert json.loads(json.dumps(trace, allow_nan=False)) == trace  # valid JSON, nothing lost
    for b, row in enumerate(trace["rows"]):
        answer = result.sequences[b, P:].tolist()
        assert replay(trace, b) == answer == row["answer_tokens"]  # the commits rebuild the answer
        assert mask not in answer
        assert row["tokens"] == result.tokens[b] and row["text"] == result.texts[b]
        assert row["prompt_start"] + len(row["prompt_tokens"]) == P
        assert result.sequences[b, row["prompt_start"] : P].tolist() == row["prompt_tokens"]
    for i, step in enumerate(trace["steps"]):
        assert step["step"] == i
        for b in range(len(trace["rows"])):
            n = len(step["positions"][b])
            assert len(step["tokens"][b]) == n == len(step["confidence"][b])
            # what the decoder chose inside the block carries its score (early-stop fills do not)
            bs = step["block"] * trace["block_length"]
            for pos, t, conf in zip(
                step["positions"][b], step["tokens"][b], step["confidence"][b], strict=True
            ):
                if not bs <= pos < bs + trace["block_length"]:
                    assert conf is None
                if conf is None:
                    assert t in trace["end_token_ids"]
            layers = step["active_rows"][b]
            assert len(layers) == trace["n_layers"]
            for runs in layers:
                flat = [c for s, e in runs for c in range(s, e)]
                assert flat == sorted(set(flat)) and all(0 <= c < trace["seq_len"] for c in flat)


@pytest.mark.parametrize(
    "cache,kw",
    [
        ("none", {}),
        ("dllm-cache", {}),  # per-layer selection
        ("dual", {"block_length": 8}),  # one set of rows for the whole network
        ("prefix", {"block_length": 8, "decoder": "threshold", "threshold": 0.5}),  # dynamic steps
    ],
)
def test_trace_replays_to_the_answer(llada, cache, kw):
    gen = dict(gen_length=16, steps=8, **kw)
    result, trace = traced_generate(llada, PROMPTS, cache=cache, **gen)
    check_consistent(trace, result)
    plain = engine_generate(llada, PROMPTS, cache=cache, **gen)
    assert result.tokens == plain.tokens  # tracing changes nothing
    assert trace["method"] == cache + ("+threshold" if "decoder" in kw else "")


@pytest.mark.parametrize("cache", ["none", "dllm-cache", "dual", "dkv"])
def test_recomputed_rows_match_the_engines_count(llada, cache):
    """One prompt: the rows the trace says were recomputed are exactly what the engine counted."""
    result, trace = traced_generate(llada, PROMPTS[0], cache=cache, gen_length=16, steps=8, block_length=8)
    counted = sum(recomputed_count(step, 0) for step in trace["steps"])
    if (
        cache == "dkv"
    ):  # its step is padded to a host-known row budget by repeating a row: counted, not listed
        assert 0 < counted <= result.stats.position_layers
    else:
        assert counted == result.stats.position_layers
    if cache == "none":
        assert counted == result.stats.position_layers_total


def test_trace_dream_and_cfg(dream, llada):
    result, trace = traced_generate(dream, PROMPTS, cache="dllm-cache", gen_length=12, steps=6)
    check_consistent(trace, result)
    result, trace = traced_generate(llada, PROMPTS, cache="dual", gen_length=8, steps=4, cfg_scale=1.0)
    check_consistent(trace, result)  # the unconditional rows are left out of active_rows
    assert all(len(step["active_rows"]) == len(PROMPTS) for step in trace["steps"])


def test_python_generate_writes_the_trace(llada, tmp_path):
    policy = make_policy("dllm-cache", response_interval=2)
    result = dllm_cache.generate(llada, PROMPTS, cache=policy, gen_length=8, steps=4, trace=tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["trace.html", "trace.json", "trace.png"]
    trace = load_trace(tmp_path / "t")
    check_consistent(trace, result)
    assert trace["cache"] == policy.describe()
    assert (
        generate(llada, PROMPTS, cache="none", gen_length=8, steps=4).tokens
        == engine_generate(llada, PROMPTS, gen_length=8, steps=4).tokens
    )


def test_png_has_the_expected_size_and_is_drawn(llada, tmp_path):
    from PIL import Image

    for prompts, height in ((PROMPTS[0], 600), (PROMPTS, 1200)):
        _, trace = traced_generate(llada, prompts, cache="dllm-cache", gen_length=16, steps=8)
        write_trace(trace, tmp_path)
        img = Image.open(tmp_path / "trace.png").convert("RGB")
        assert img.size == figure_size(trace) == (1200, height)
        colours = img.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # not blank: the colour maps are there
        white = max(count for count, c in colours if c == (255, 255, 255))
        assert white < 0.9 * img.size[0] * img.size[1]


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = runner.invoke(app, ["generate", "hi", "--gen-length", "8", "--trace", str(tmp_path / "t")])
    assert r.exit_code == 2
    assert "matplotlib" in r.output and "pip install 'dllm-cache[trace]'" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "t").exists()


def test_load_and_compare_errors(llada, tmp_path):
    with pytest.raises(DllmCacheError, match="no trace at"):
        load_trace(tmp_path / "nothing")
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(DllmCacheError, match="is not a dllm-cache trace"):
        load_trace(tmp_path / "x.json")
    _, a = traced_generate(llada, PROMPTS[0], gen_length=8, steps=4)
    _, b = traced_generate(llada, PROMPTS[1], gen_length=8, steps=4)
    with pytest.raises(DllmCacheError, match="cannot compare traces of different prompts"):
        render_page([a, b])
    write_trace(a, tmp_path / "a")
    write_trace(b, tmp_path / "b")
    r = runner.invoke(app, ["trace", "compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert r.exit_code == 2 and "cannot compare traces of different prompts" in r.output


def test_page_is_self_contained(llada):
    _, trace = traced_generate(llada, PROMPTS, cache="dual", gen_length=8, steps=4, block_length=4)
    trace["rows"][0]["prompt"] = "</script><script>alert(1)</script>"  # stays data, cannot end the script
    page = render_page([trace])
    assert "http://" not in page and "https://" not in page and "<link" not in page and " src=" not in page
    assert page.count("</script>") == 2


def test_live_canvas_render():
    pieces = {5: " five", 6: " six", 0: "<eos>"}
    text = render_canvas([5, 2, 6, 2], [5, 2, 2, 2], mask_id=2, end_ids={0}, piece=pieces.__getitem__, step=3)
    assert text.plain == f"step 3\n five{MASK_GLYPH} six{MASK_GLYPH}"
    styles = {text.plain[s.start : s.end]: str(s.style) for s in text.spans}
    assert styles[" six"] == "bold green" and styles[MASK_GLYPH] == "dim"  # new this step; masks dim
    # a complete answer stops at its end token; an end token amid masks is shown
    assert render_canvas([5, 0, 0], None, 2, {0}, pieces.__getitem__).plain == " five"
    assert render_canvas([2, 0, 0], None, 2, {0}, pieces.__getitem__).plain == MASK_GLYPH + "\u23ce\u23ce"


def test_cli_live_and_trace(tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(
        app, ["generate", "What is 2 + 3?", "--gen-length", "16", "--live", "--trace", str(out)]
    )
    assert r.exit_code == 0, r.output
    trace = load_trace(out)
    assert trace["rows"][0]["text"] in r.output  # the answer, after the live view's last frame
    assert "trace.html" in r.output and trace["model"] == "tiny-llada"


# --- the page in a real browser ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    try:
        find_browser()
    except BrowserUnavailable as e:
        pytest.skip(f"no headless browser to load the trace page: {e}")
    with headless_chromium() as driver:
        yield driver


def open_page(driver, path):
    driver.get_log("browser")  # drop what an earlier page logged
    driver.get(path.resolve().as_uri())
    return driver


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def set_step(driver, k: int) -> None:
    driver.execute_script(
        "const s = document.getElementById('slider'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input'));",
        k,
    )


def cell_states(driver, panel: int = 0) -> list[str]:
    return driver.execute_script(
        f"return [...document.querySelectorAll('#canvas-{panel} .tok')].map(c => c.dataset.state)"
    )


def test_page_slider_shows_step_k(browser, llada, tmp_path):
    _, trace = traced_generate(llada, PROMPTS, cache="dllm-cache", gen_length=16, steps=8)
    write_trace(trace, tmp_path)
    driver = open_page(browser, tmp_path / "trace.html")
    assert console_errors(driver) == []
    n = len(trace["steps"])
    assert driver.execute_script("return document.getElementById('slider').max") == str(n)
    for row in (0, 2):
        driver.execute_script(
            "const r = document.getElementById('row'); r.value = arguments[0]; r.dispatchEvent(new Event('change'))",
            row,
        )
        for k in (1, 3, n):
            set_step(driver, k)
            canvas, mask = replay(trace, row, upto=k), trace["mask_token_id"]
            now = set(trace["steps"][k - 1]["positions"][row])
            expected = [
                "masked" if t == mask else "now" if p in now else "earlier" for p, t in enumerate(canvas)
            ]
            assert cell_states(driver) == expected
            heat = driver.find_element("id", "heat-0")
            assert heat.get_attribute("data-step") == str(k)
            assert heat.get_attribute("data-recomputed") == str(recomputed_count(trace["steps"][k - 1], row))
            assert driver.find_element("id", "step-label").text == f"step {k} / {n}"
    # play runs the slider forward from the start
    set_step(driver, n)
    driver.find_element("id", "play").click()
    driver.implicitly_wait(0)
    import time

    deadline = time.monotonic() + 10
    while driver.execute_script("return document.getElementById('slider').value") != str(n):
        assert time.monotonic() < deadline, "play did not reach the last step"
        time.sleep(0.1)
    assert console_errors(driver) == []


def test_compare_page_marks_where_tokens_part(browser, llada, tmp_path):
    kw = dict(gen_length=16, steps=8, block_length=8)
    _, a = traced_generate(llada, PROMPTS, cache="none", **kw)
    _, b = traced_generate(llada, PROMPTS, cache="dual", decoder="threshold", threshold=0.3, **kw)
    write_trace(a, tmp_path / "a")
    write_trace(b, tmp_path / "b")
    r = runner.invoke(
        app, ["trace", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "c.html")]
    )
    assert r.exit_code == 0, r.output
    driver = open_page(browser, tmp_path / "c.html")
    assert console_errors(driver) == []
    k = 3
    set_step(driver, k)
    ka, kb = min(k, len(a["steps"])), min(k, len(b["steps"]))
    ca, cb, mask = replay(a, 0, ka), replay(b, 0, kb), a["mask_token_id"]
    differs = [p for p in range(16) if mask not in (ca[p], cb[p]) and ca[p] != cb[p]]
    for panel in (0, 1):
        marked = driver.execute_script(
            f"return [...document.querySelectorAll('#canvas-{panel} .tok.differs')].map(c => Number(c.dataset.pos))"
        )
        assert marked == differs
    assert (
        "part" in driver.find_element("id", "parting").text
        or "agree" in driver.find_element("id", "parting").text
    )


def test_bar_command_page_shows_canvas_and_heatmap(browser, tmp_path):
    """The issue's bar: the demo model under dllm-cache writes three files and the page draws."""
    out = tmp_path / "out"
    r = runner.invoke(app, ["generate", BAR_PROMPT, "--cache", "dllm-cache", "--trace", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["trace.html", "trace.json", "trace.png"]
    driver = open_page(browser, out / "trace.html")
    assert console_errors(driver) == []
    trace = load_trace(out)
    assert len(cell_states(driver)) == trace["gen_length"] == 128
    painted = driver.execute_script(
        "const c = document.getElementById('heat-0'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 1] < 100) n++; return [c.width, c.height, n];"
    )
    width, height, recomputed_pixels = painted
    assert width >= trace["seq_len"] and height >= trace["n_layers"] and recomputed_pixels > 0
