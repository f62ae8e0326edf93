"""lm-evaluation-harness's local-completions (on its defaults, batched, and with text prompts) and
local-chat-completions against a server on the tiny Falcon give the scores, per-sample log-likelihoods (within
1e-3) and greedy texts of lm-eval's own hf backend on the same checkpoint (benchmarks/lm_eval_compare.py).

lm-eval is the ``eval`` extra, not the ``test`` one (it pulls ~40 packages): without it this file is skipped, and
tests/test_openai_prompts.py sends its request bodies instead."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm_eval[api]

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def compare():
    sys.path.insert(0, str(BENCHMARKS))
    import lm_eval_compare

    yield lm_eval_compare
    sys.path.remove(str(BENCHMARKS))
    for name in ("lm_eval_compare", "loadgen"):
        sys.modules.pop(name, None)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lm_eval_scores_on_the_server_equal_its_hf_backends(compare, start_server, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # A server of its own with 32 rows and the prefix cache on: lm-eval sends the same 32 prompts again and again,
    # so every row fills and the least recently used prefix is the one asked for (a case the cache once got wrong).
    server = start_server(tiny_dir, "--max_batch_size", "32")
    report = compare.run_all(server.url, server.model_name, Path(tiny_dir), tmp_path)
    for name, check in report["comparisons"].items():
        assert check["passed"], (name, check)
    assert set(report["comparisons"]) == {"local-completions (defaults)", "local-completions batch_size=8",
                                          "local-completions tokenized_requests=False", "local-chat-completions"}
