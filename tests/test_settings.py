"""The run-settings layer: one declaration per option (default, bounds, help), the presets, what they build, and
the transition policies they choose."""

import dataclasses

import pytest
import torch

from iamflow_core import cli, runs
from iamflow_core.config import CacheConfig, SamplerConfig, TransitionConfig, check_options, option_spec
from iamflow_core.memory import IdentityMemory, MemFlowMemory, NoMemory
from iamflow_core.models.dit import CrossKV
from iamflow_core.settings import (
    IAMFLOW,
    LONGLIVE,
    MEMFLOW,
    PRESETS,
    MemorySettings,
    build_memory,
    build_verifier,
    sampler_config,
)
from iamflow_core.story import DEFAULT_SEED, Segment, Story
from iamflow_core.transition import Hard, Recache, Soft, Switch, make_transition
from iamflow_core.verify import AsyncVerifier, ImmediateVerifier, Verdict

# --- options --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MemorySettings(max_frames=0), "max_frames must be in [1, 16], got 0"),
        (lambda: MemorySettings(visual_weight=1.5), "visual_weight must be in [0, 1], got 1.5"),
        (lambda: MemorySettings(transition="fade"), "unknown transition strategy 'fade'; choose one of recache, soft"),
        (lambda: MemorySettings(archive_limit_mb=8), "archive_limit_mb must be in [64, 65536], got 8"),
        (lambda: CacheConfig(sparse_topk=-1), "sparse_topk must be in [0, 64], got -1"),
        (lambda: SamplerConfig(height=4096), "height must be in [16, 2048], got 4096"),
    ],
)
def test_an_option_out_of_range_names_itself_its_value_and_its_range(make, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make()


def test_a_shared_option_has_one_declaration():
    """MemorySettings exposes the transition and sparse activation of the engine configs: the same default and the
    same declaration, not a copy."""
    assert option_spec(MemorySettings, "transition") == option_spec(TransitionConfig, "strategy")
    assert option_spec(MemorySettings, "sparse_topk") == option_spec(CacheConfig, "sparse_topk")
    assert MemorySettings().transition == TransitionConfig().strategy == "soft"
    check_options(MemorySettings())  # the defaults are valid


def test_automatic_is_none_in_the_settings_and_a_number_on_a_widget():
    _, spec = option_spec(MemorySettings, "verifier_wait")
    assert MemorySettings().verifier_wait is None
    assert spec.value_of(spec.auto) is None and spec.value_of(0.5) == 0.5


# --- presets and what they build --------------------------------------------------------------------------------


def test_presets_are_the_three_methods():
    assert PRESETS == {"identity": IAMFLOW, "memflow": MEMFLOW, "none": LONGLIVE}
    assert (IAMFLOW.transition, MEMFLOW.transition, LONGLIVE.transition) == ("soft", "recache", "recache")
    assert [sampler_config(s).cache.memory_frames for s in (IAMFLOW, MEMFLOW, LONGLIVE)] == [4, 3, 0]
    assert isinstance(build_memory(IAMFLOW), IdentityMemory) and isinstance(build_memory(MEMFLOW), MemFlowMemory)
    assert isinstance(build_memory(LONGLIVE), NoMemory)


def test_settings_reach_the_policy_and_the_sampler_config():
    settings = MemorySettings(max_frames=6, min_frames_multi_entity=3, archive_limit_mb=128, sparse_topk=2)
    memory = build_memory(settings)
    assert (memory.max_frames, memory.min_frames_multi_entity, memory.archive.limit_bytes) == (6, 3, 128 * 2**20)
    config = sampler_config(settings, 32, 48)
    assert (config.height, config.width, config.cache.memory_frames, config.cache.sparse_topk) == (32, 48, 6, 2)
    bank = build_memory(dataclasses.replace(MEMFLOW, bank_size=2, record_interval=5))
    assert (bank.bank_size, bank.record_interval) == (2, 5)


class _Scorer:
    def score(self, frames, prompt, entities, check_attributes=False):
        return Verdict((1.0,) * len(frames), {})


def test_the_verifier_runs_as_the_settings_say():
    assert build_verifier(IAMFLOW, None) is None and build_verifier(MEMFLOW, _Scorer()) is None
    with build_verifier(IAMFLOW, _Scorer()) as verifier:
        assert isinstance(verifier, AsyncVerifier)
    inline = build_verifier(dataclasses.replace(IAMFLOW, async_verifier=False), _Scorer())
    assert isinstance(inline, ImmediateVerifier) and not inline.started("a")


def test_the_seed_lives_in_the_story():
    story = Story((Segment("a", 1.0),))
    assert story.noise_seed == DEFAULT_SEED and Story(story.segments, seed=9).noise_seed == 9
    assert "seed" not in {f.name for f in dataclasses.fields(SamplerConfig)}


# --- the command line exposes the same options ----------------------------------------------------------------


def _args(*flags: str):
    parser = cli.argparse.ArgumentParser()
    cli._add_generate(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", *flags])


def test_every_memory_option_has_a_flag_and_the_presets_apply():
    names = {f.name for f in dataclasses.fields(MemorySettings)} - {"mode"}
    assert names == set(runs.MEMORY_FLAGS)
    assert runs.memory_settings(_args()) == IAMFLOW
    assert runs.memory_settings(_args("--memory", "memflow")) == MEMFLOW
    given = runs.memory_settings(_args("--memory", "memflow", "--transition", "soft", "--bank-size", "5"))
    assert given == dataclasses.replace(MEMFLOW, transition="soft", bank_size=5)
    flags = (
        "--archive-limit-mb",
        "256",
        "--verifier-wait",
        "-1",
        "--no-async-verifier",
        "--min-frames-multi-entity",
        "1",
    )
    settings = runs.memory_settings(_args(*flags))
    assert (settings.archive_limit_mb, settings.verifier_wait, settings.async_verifier) == (256, None, False)


def test_a_bad_flag_value_is_the_settings_message(capsys):
    assert cli.main(["generate", "--preset", "tiny", "--max-frames", "1"]) == 2  # below the default floor of 2
    assert "min_frames_multi_entity 2 must be in 0..max_frames (1)" in capsys.readouterr().err


# --- transition policies ------------------------------------------------------------------------------------------


def _cross(value: float) -> CrossKV:
    return CrossKV(torch.full((1, 1, 4, 2, 8), value), torch.full((1, 1, 4, 2, 8), value))


class _Cache:
    cfg = CacheConfig()
    query_capacity = CacheConfig().window_frames - CacheConfig().sink_frames


def _switch(start: int, passes: list, old: float = 1.0, new: float = -1.0) -> Switch:
    text = torch.zeros(8, 4)
    return Switch(start, text + old, text + new, _cross(new), lambda z, first, cross: passes.append((z, first)))


def test_make_transition_picks_the_policy():
    kinds = {s: type(make_transition(TransitionConfig(s), _cross(0), _Cache())) for s in ("soft", "recache", "hard")}
    assert kinds == {"soft": Soft, "recache": Recache, "hard": Hard}


def test_soft_blends_from_the_old_prompt_then_hands_over():
    soft = Soft(_cross(1.0), TransitionConfig(), chunk_frames=3)
    soft.switch(_switch(12, []))  # opposite prompts: the longest window
    alphas = [soft.conditioning(start)[1] for start in range(12, 36, 3)]
    assert alphas[0] == 0.0 and all(a < b for a, b in zip(alphas[1:4], alphas[2:5]))
    assert alphas[-1] is None and soft.conditioning(36) == (soft.cross, None) and soft.previous is None


def test_recache_reencodes_the_window_and_keeps_only_what_it_needs():
    recache, passes = Recache(_cross(1.0), _Cache()), []
    for start in range(0, 30, 3):
        recache.remember(start, torch.full((1, 1, 3, 1, 1), float(start)))
    assert len(recache.history) == 4  # the window's chunks and the newest one
    recache.switch(_switch(30, passes))
    ((latents, first),) = passes
    assert first == 21 and latents[0, 0, :, 0, 0].tolist() == [21.0] * 3 + [24.0] * 3 + [27.0] * 3
    assert recache.conditioning(30)[1] is None and torch.equal(recache.cross.k, _cross(-1.0).k)


def test_hard_switches_and_nothing_else():
    hard, passes = Hard(_cross(1.0)), []
    hard.switch(_switch(3, passes))
    assert not passes and hard.conditioning(3) == (hard.cross, None) and hard.cross.k[0, 0, 0, 0, 0] == -1.0
