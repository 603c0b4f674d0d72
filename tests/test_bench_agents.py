"""What `bench agents` reports besides timing (the GPU runs themselves are benchmarks): each part's peak memory is
its own, not that of writing the random model folders or of the part before."""

import json

import torch

from iamflow_core.bench import agents


def test_each_part_reports_its_own_peak_memory(monkeypatch, tmp_path):
    peak = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peak.update(bytes=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["bytes"])

    class Extractor:
        def __init__(self, folder, device):
            peak["bytes"] += 3 * 2**30  # the LLM's own peak

        def extract(self, prompts):
            return type("Registry", (), {"entities": []})()

        def unload(self):
            pass

    monkeypatch.setattr("iamflow_core.story.llm.EntityExtractor", Extractor)
    peak["bytes"] = 16 * 2**30  # as after writing the random folders on the GPU
    rows = [json.loads(line) for line in agents._time_llm(tmp_path, "cuda:0")]
    assert [r["peak_gib"] for r in rows] == [3.0, 3.0]
