"""Identity from pictures: entity reference pictures as pinned archive frames, and a start image (image-to-video),
on tiny random models (CPU)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from iamflow_core import images
from iamflow_core.config import CacheConfig, SamplerConfig
from iamflow_core.memory import NoMemory
from iamflow_core.memory.identity import IdentityMemory
from iamflow_core.pipeline import StreamingPipeline
from iamflow_core.presets import tiny_models
from iamflow_core.render import render_story, story_map
from iamflow_core.schedule import sigma, warp_timesteps
from iamflow_core.settings import MemorySettings, build_memory, sampler_config
from iamflow_core.story import Segment, Story
from iamflow_core.story.entities import EntityRegistry, RegistryError, load_registries

HEIGHT, WIDTH = 32, 48
STORY = Story(
    (
        Segment("a woman in a red coat reads at a library table", 1.5),
        Segment("a fisherman mends a net on the pier", 1.5),
        Segment("gulls circle above the fishing boats", 1.5),
        Segment("the woman in the red coat walks onto the pier", 1.5),
    ),
    seed=4,
)
REGISTRY = {
    "entities": [
        {"id": 1, "name": "Rosa", "aliases": ["the woman"], "attributes": ["red coat"]},
        {"id": 2, "name": "fisherman"},
    ],
    "prompts": [[1], [2], [], [1]],
}


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=0)


def picture(seed: int, height: int = 40, width: int = 60) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def rosa_registry(*pictures: np.ndarray) -> EntityRegistry:
    registry = EntityRegistry.from_json(REGISTRY, num_segments=4)
    for n, pixels in enumerate(pictures):
        registry = registry.with_reference("Rosa", pixels, f"rosa_{n}.png")
    return registry


class _Probe(NoMemory):
    """Reads, at the start of a run, the cache's frame 0 (the start image) and a picture's frame through
    `encode_image`."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb, self.seen = rgb, {}

    def start(self, ctx) -> None:
        super().start(ctx)
        self.seen["cache"] = ctx.cache.frame_kv(0)
        self.seen["picture"] = ctx.encode_image(self.rgb, 0)


# --- pictures ----------------------------------------------------------------------------------------------------


def test_fit_scales_to_cover_and_crops_the_centre():
    tall = np.zeros((200, 100, 3), np.uint8)
    tall[90:110] = 255  # a white band across the middle
    fitted = images.fit(tall, 32, 48)
    assert fitted.shape == (32, 48, 3)
    assert fitted[16].min() > 200 and fitted[0].max() < 50 and fitted[-1].max() < 50  # the centre is kept


def test_bad_pictures_get_one_clear_error_each(tmp_path):
    with pytest.raises(images.ImageError, match=r"start image is 40x60x2 \(2 channels\); give one RGB picture"):
        images.as_rgb(np.zeros((40, 60, 2), np.uint8), "start image")
    with pytest.raises(images.ImageError, match="is 1x1 pixels; give a picture at least 32 pixels"):
        images.as_rgb(np.zeros((1, 1, 3), np.float32), "reference image")
    with pytest.raises(images.ImageError, match="nope.png does not exist; give the path of a .png"):
        images.load_image(tmp_path / "nope.png", "start image")
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(images.ImageError, match="is not an image PIL can read"):
        images.load_image(tmp_path / "notes.png", "start image")
    with pytest.raises(RegistryError, match=r"no entity 'Mia' in the registry \(entities: 1 Rosa, 2 fisherman\)"):
        rosa_registry().with_reference("Mia", picture(0), "mia.png")


def test_registry_images_are_read_relative_to_the_registry_file(tmp_path):
    (tmp_path / "pics").mkdir()
    Image.fromarray(picture(1)).save(tmp_path / "pics" / "rosa.png")
    data = json.loads(json.dumps(REGISTRY))
    data["entities"][0]["images"] = ["pics/rosa.png"]
    (tmp_path / "story.registry.json").write_text(json.dumps(data))
    (registry,) = load_registries(tmp_path / "story.registry.json", 1, [4])
    (ref,) = registry.references
    assert (ref.entity, ref.name) == (1, "pics/rosa.png") and np.array_equal(ref.pixels, picture(1))
    assert registry.to_dict()["entities"][0]["images"] == ["pics/rosa.png"]
    data["entities"][0]["images"] = ["pics/gone.png"]
    (tmp_path / "story.registry.json").write_text(json.dumps(data))
    with pytest.raises(RegistryError, match=r"story.registry.json: reference image of entity 1 \(Rosa\) .*gone.png"):
        load_registries(tmp_path / "story.registry.json", 1, [4])


# --- reference frames --------------------------------------------------------------------------------------------


def test_a_reference_frame_is_the_frame_a_start_image_becomes(models):
    """A picture's K/V (`encode_image`, a separate empty cache) equal those the run's own cache holds for the same
    picture committed as the video's first frame."""
    rgb = picture(2)
    probe = _Probe(rgb)
    pipe = StreamingPipeline(*models)
    config = SamplerConfig(height=HEIGHT, width=WIDTH, cache=CacheConfig(memory_frames=2))
    next(pipe.run(STORY, config, probe, start_image=rgb))
    (k0, v0, p0), (k1, v1, p1) = probe.seen["cache"], probe.seen["picture"]
    assert p0 == p1 == 0 and k0.shape == k1.shape
    torch.testing.assert_close(k1, k0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-5)


def _render(models, registry, **settings):
    settings = MemorySettings(**settings)
    memory = build_memory(settings, registry)
    result = render_story(StreamingPipeline(*models), STORY, sampler_config(settings, HEIGHT, WIDTH), memory,
                          keep_frames=False)  # fmt: skip
    return story_map(STORY, registry, result)


def _retrieved_pictures(chunk: dict) -> list[str]:
    return [f["image"] for f in (chunk.get("retrieved") or {}).get("frames", []) if f.get("reference")]


def test_a_picture_comes_back_where_its_entity_is_and_nowhere_else(models):
    data = _render(models, rosa_registry(picture(3)), reference_weight=1.0)
    chunks = data["chunks"]  # 1.5 s = 2 chunks per prompt: prompts start at chunks 0, 2, 4, 6
    assert _retrieved_pictures(chunks[0]) == ["rosa_0.png"]  # Rosa from the first frame on
    assert _retrieved_pictures(chunks[2]) == [] and chunks[2]["retrieved"]["wanted"] == [2]
    assert "retrieved" in chunks[4] and _retrieved_pictures(chunks[4]) == []  # nobody: nothing comes back
    assert _retrieved_pictures(chunks[6]) == ["rosa_0.png"]  # she returns, with her picture
    (pinned,) = [f for f in data["memory"]["archive"] if f.get("reference")]
    assert pinned["entities"] == [1] and pinned["image"] == "rosa_0.png" and pinned["frame"] < 0


def test_at_weight_zero_a_picture_stands_in_only_until_a_generated_frame_shows_its_entity(models):
    chunks = _render(models, rosa_registry(picture(3)), reference_weight=0.0)["chunks"]
    assert _retrieved_pictures(chunks[0]) == ["rosa_0.png"]  # nothing generated of her yet
    frames = chunks[6]["retrieved"]["frames"]
    assert frames and not any(f.get("reference") for f in frames) and all(1 in f["entities"] for f in frames)


def _frame_bytes(models) -> int:
    dit = models[0]
    tokens = (HEIGHT // 8 // dit.cfg.patch_size[1]) * (WIDTH // 8 // dit.cfg.patch_size[2])
    return 2 * dit.cfg.num_layers * tokens * dit.cfg.num_heads * dit.cfg.head_dim * 4  # K and V, float32


def _identity(registry, limit_bytes: int) -> IdentityMemory:
    return IdentityMemory(registry, max_frames=2, min_frames_multi_entity=2, visual_weight=0.0,
                          archive_limit_bytes=limit_bytes, reference_weight=0.0)  # fmt: skip


def test_pictures_survive_eviction_and_too_many_are_refused(models):
    pipe, config = StreamingPipeline(*models), sampler_config(MemorySettings(max_frames=2), HEIGHT, WIDTH)
    memory = _identity(rosa_registry(picture(4), picture(5)), 5 * _frame_bytes(models))
    list(pipe.run(STORY, config, memory))
    evicted = [e["evicted"] for e in memory.timeline]
    assert evicted and not any(f.get("reference") for f in evicted)  # generated frames went, the pictures stayed
    assert sorted(f.reference for f in memory.archive if f.pinned) == ["rosa_0.png", "rosa_1.png"]
    assert memory.archive.nbytes <= 5 * _frame_bytes(models)
    crowded = _identity(rosa_registry(picture(4), picture(5), picture(6)), 2 * _frame_bytes(models))
    with pytest.raises(ValueError, match=r"3 reference pictures take 1 MB of the identity archive, more than its"):
        next(pipe.run(STORY, config, crowded))


# --- start image -------------------------------------------------------------------------------------------------


def _first_chunk_by_full_forward(models, rgb: np.ndarray, config: SamplerConfig) -> torch.Tensor:
    """Chunk 0 after a start image, made without the cache: the full forward over [picture latent at t = 0, the
    chunk], where the chunk sees the picture and itself; the same seeded noise as the pipeline's."""
    dit, te, vae = models
    latent = images.encode(vae, rgb, config.height, config.width)
    text = te.encode([STORY.prompts[0]])
    n, tokens = config.cache.chunk_frames, (config.height // 16) * (config.width // 16)
    vis = torch.ones(n + 1, n + 1, dtype=torch.bool)
    vis[0, 1:] = False  # the picture sees only itself, as its own clean pass did
    mask = vis.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
    generator = torch.Generator().manual_seed(STORY.noise_seed)
    shape = (1, dit.cfg.in_channels, n, config.height // 8, config.width // 8)
    x, steps = torch.randn(shape, generator=generator), warp_timesteps(config.steps, config.shift)
    for j, t in enumerate(steps):
        timesteps = torch.tensor([[0.0] + [t] * n])
        velocity = dit(torch.cat([latent, x], dim=2), timesteps, text, mask=mask)[:, :, 1:]
        x0 = x - sigma(t) * velocity
        if j + 1 < len(steps):
            x = (1 - sigma(steps[j + 1])) * x0 + sigma(steps[j + 1]) * torch.randn(shape, generator=generator)
    return x0


def test_the_first_chunk_continues_the_start_image(models):
    rgb = picture(7, 90, 120)
    config = SamplerConfig(height=HEIGHT, width=WIDTH, cache=CacheConfig(memory_frames=0))
    events = list(StreamingPipeline(*models).run(STORY, config, NoMemory(), start_image=rgb))
    latent = images.encode(models[2], rgb, HEIGHT, WIDTH)
    first = events[0]
    assert first.start_frame == 0 and first.latents.shape[2] == 4  # the picture's latent, then the chunk
    torch.testing.assert_close(first.latents[:, :, :1], latent)
    with torch.no_grad():
        expected = _first_chunk_by_full_forward(models, rgb, config)
    torch.testing.assert_close(first.latents[:, :, 1:], expected, rtol=1e-4, atol=1e-4)
    assert [e.start_frame for e in events[1:3]] == [4, 7]
    assert [e.frames.shape[0] for e in events[:2]] == [13, 12]  # the picture's frame leads chunk 0's 12
    with torch.no_grad():
        alone = images.encode(models[2], rgb, HEIGHT, WIDTH)
        picture_frame = models[2].decode_stream(alone, models[2].new_decode_state())
    from iamflow_core.video import to_uint8_frames

    assert np.array_equal(first.frames[:1], to_uint8_frames(picture_frame))


def test_a_start_image_needs_the_vae(models):
    dit, te, _ = models
    with pytest.raises(ValueError, match="a start image needs the VAE"):
        next(StreamingPipeline(dit, te).run(STORY, SamplerConfig(height=HEIGHT, width=WIDTH), start_image=picture(8)))


# --- the command line --------------------------------------------------------------------------------------------
TINY_REGISTRY = {
    "entities": [
        {"id": 1, "name": "Rosa", "aliases": ["the woman"], "images": ["rosa.png"]},
        {"id": 2, "name": "Tom", "aliases": ["the young man"]},
    ],
    "prompts": [[1], [2, 1], [1]],
}


def test_two_characters_from_two_pictures_and_a_first_shot_from_a_third(tmp_path, capsys):
    from iamflow_core import cli
    from iamflow_core.video import read_video_frame_count

    for name, seed in (("rosa.png", 10), ("tom.png", 11), ("first.png", 12)):
        Image.fromarray(picture(seed, 80, 120)).save(tmp_path / name)
    (tmp_path / "story.registry.json").write_text(json.dumps(TINY_REGISTRY))
    out = tmp_path / "pictures.mp4"
    argv = ["generate", "--preset", "tiny", "--out", str(out), "--device", "cpu", "--vae-device", "cpu",
            "--registry", str(tmp_path / "story.registry.json")]  # fmt: skip
    assert cli.main([*argv, "--reference", f"Tom={tmp_path / 'tom.png'}", "--image", str(tmp_path / "first.png")]) == 0
    data = json.loads(out.with_suffix(".story.json").read_text())
    pinned = {f["image"]: f["entities"] for f in data["memory"]["archive"] if f.get("reference")}
    assert pinned == {"rosa.png": [1], "tom.png": [2]}
    assert data["registry"]["entities"][1]["images"] == ["tom.png"]
    assert _retrieved_pictures(data["chunks"][0]) == ["rosa.png"]  # Rosa from her picture; Tom is not there yet
    assert "tom.png" in _retrieved_pictures(data["chunks"][4])  # Tom's first prompt: only his picture shows him
    assert read_video_frame_count(out) == 3 * 4 * 12 + 1  # the start image's frame leads 12 chunks of 12 frames


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reference", "Mia=x.png"], "no entity 'Mia' in the registry (entities: 1 Rosa, 2 Tom)"),
        (["--reference", "Tom"], "--reference 'Tom' is not ENTITY=IMAGE; write e.g. --reference Rosa=rosa.png"),
        (["--reference", "Tom=nope.png"], "--reference picture of Tom nope.png does not exist"),
        (["--image", "gone.jpg"], "--image start image gone.jpg does not exist"),
        (["--memory", "memflow", "--reference", "Tom=tom.png"], "--reference needs identity memory"),
    ],
)
def test_bad_pictures_on_the_command_line(tmp_path, capsys, monkeypatch, extra, message):
    from iamflow_core import cli

    monkeypatch.chdir(tmp_path)
    Image.fromarray(picture(10)).save(tmp_path / "rosa.png")
    Image.fromarray(picture(11)).save(tmp_path / "tom.png")
    (tmp_path / "r.json").write_text(json.dumps(TINY_REGISTRY))
    argv = ["generate", "--preset", "tiny", "--out", "x.mp4", "--device", "cpu", "--registry", "r.json", *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err, err
