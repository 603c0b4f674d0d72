"""Causal Wan2.1 video VAE: encode, full decode, and a streaming decode whose cache lives across calls.

Math ported from Wan2.1 `wan/modules/vae.py` (github.com/Wan-Video/Wan2.1 @ 9737cba, Apache-2.0); written anew,
checked in fp32 against diffusers' `AutoencoderKLWan` (tests/test_vae.py). Parameter names are the keys of the
original `Wan2.1_VAE.pth`, which ComfyUI's `wan_2.1_vae.safetensors` shares, so those files load with strict=True.

Time is causal everywhere. A 3D conv pads only the past side, with zeros; in streaming, the last input frames of
every conv (2 for kernel 3, Wan's CACHE_T) stand in for that padding on the next call, so decoding chunk by chunk
equals decoding the whole sequence. The first video frame is coded alone: the encoder maps frames 1, 4, 4, ... to
one latent frame each, and the decoder maps the first latent frame to 1 video frame and every later one to 4.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from iamflow_core.config import VAEConfig
from iamflow_core.models import fused

logger = logging.getLogger(__name__)

# One entry per cached module (see `_assign_cache_slots`); None until the module has seen a frame.
TimeCache = list[torch.Tensor | None]


@dataclass
class VAEDecodeState:
    """Everything a streaming decode carries from one chunk to the next. One per video stream.

    `caches[i]` holds the last input frames of the i-th cached module, `[B, C_i, <=2, H_i, W_i]`.
    `latent_frames` counts the latent frames decoded so far; 0 means the next chunk starts the video.
    `latent_shape` is (B, H, W) of the latents, fixed by the first chunk.
    """

    caches: TimeCache
    latent_frames: int = 0
    latent_shape: tuple[int, int, int] | None = None


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d when x [B, C, T, H, W] is laid out so (the decoder on a GPU), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _channels_last_on_gpu(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, T, H, W] channels-last on a GPU (where the decoder's convs are tuned for that layout; a no-op when it
    already is), unchanged on the CPU."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.is_cuda else x


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B * T, C, H, W]: a view when x is channels-last (B = 1) or contiguous."""
    return x.transpose(1, 2).flatten(0, 1)


def _video(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """`_frames` undone: [B * T, C, H, W] -> [B, C, T, H, W]."""
    return frames.unflatten(0, (batch, -1)).transpose(1, 2)


def _per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame. x: [B, C, T, H, W] -> [B, C', T, H', W']."""
    return _video(module(_frames(x)), x.shape[0])


class RMSNorm(nn.Module):
    """RMS norm over the channel axis (dim 1): F.normalize(x) * sqrt(C) * gamma. No bias in the Wan2.1 VAE.

    Half-precision inputs are normalized in fp32, as diffusers does, because the sum of squares loses digits.
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        # gamma broadcasts over (T, H, W) for videos and (H, W) for images: shape [C, 1, 1, 1] or [C, 1, 1].
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.channel_rms(x, self.gamma, self.scale)


# cuDNN picks a slow kernel for some 3x3x3 conv shapes in bf16 (on an H100 the 96-channel convs at full
# resolution ran at about a third of the speed of the 192-channel ones). The same conv can run as 2D convs over
# views of the channels-last input: one per time tap ("taps"), or one over all frames with the taps stacked along
# the output channels ("stacked", which pays off where few output channels leave cuDNN's tiles half empty, as in
# the 3-channel head). `_conv_plan` times them once per shape on the GPU and keeps the fastest; the choice and its
# timings are in CONV_PLANS, and in `vae_conv_plans.json` of the kernel cache folder (`fused.cache_dir()`), keyed by
# GPU, torch and cuDNN, so a later process decodes its first chunk without timing anything. (One 2D conv over the
# three taps stacked along the input channels was also tried: it never won, on an H200, at any shape.)
CONV_PLANS: dict[tuple, dict[str, float | str]] = {}
PLANS_FILE = "vae_conv_plans.json"
_saved_plans: dict[str, dict[str, float | str]] | None = None  # the file's plans, read at the first lookup


def _derived_weight(module: nn.Module, name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`make(module.weight)`, kept on the module until the weight changes: a cast, a move or a load with `assign`
    (its storage), or a write in place outside inference mode (its version counter; inference tensors, as ComfyUI
    loads them, have none)."""
    weight = module.weight
    version = None if weight.is_inference() else weight._version
    key = (weight.data_ptr(), version, weight.dtype, weight.device)
    kept = module.__dict__.get(name)
    if kept is None or kept[0] != key:
        kept = (key, make(weight.detach()))
        module.__dict__[name] = kept  # not a buffer: never saved, never moved by .to()
    return kept[1]


def _sum_taps(conv: nn.Conv3d, taps: list[torch.Tensor], residual: torch.Tensor | None) -> torch.Tensor:
    """The kt 2D conv outputs [N, O, H, W] of one conv, plus its bias and a residual [B, O, T, H, W]."""
    if residual is not None:
        residual = _frames(residual)
    if len(taps) == 3 and conv.bias is not None and fused.compiles(taps[0]):
        return fused.tap_sum(*taps, conv.bias, residual)  # one pass instead of a bias add and three sums
    # a fresh output (a stacked plan's taps are views of one buffer), the rest added in place: plain PyTorch would
    # make float32 copies of outputs of up to a GB each
    out = taps[0].clone() if conv.bias is None else taps[0] + conv.bias.view(1, -1, 1, 1)
    for y in (*taps[1:], *(() if residual is None else (residual,))):
        out.add_(y)
    return out


def _conv_by_taps(conv: nn.Conv3d, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv3d (kernel kt x kh x kw, stride 1, no time padding) as kt 2D convs summed. x: [B, C, T, H, W]."""
    kt = conv.weight.shape[2]
    frames = x.shape[2] - kt + 1
    taps = [F.conv2d(_frames(x[:, :, k : k + frames]), conv.weight[:, :, k], None, 1, conv.padding[1:])
            for k in range(kt)]  # fmt: skip
    return _video(_sum_taps(conv, taps, residual), x.shape[0])


def _conv_by_stacked_taps(conv: nn.Conv3d, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The same conv as one 2D conv over every input frame with kt * O outputs (tap k in channel block k); output
    frame t sums block k of input frame t + k."""
    out_ch, kt = conv.weight.shape[0], conv.weight.shape[2]
    frames = x.shape[2] - kt + 1

    def stack(w: torch.Tensor) -> torch.Tensor:  # [O, C, kt, kh, kw] -> [kt * O, C, kh, kw]
        memory_format = torch.channels_last if w.is_cuda else torch.contiguous_format
        return w.permute(2, 0, 1, 3, 4).flatten(0, 1).contiguous(memory_format=memory_format)

    y = F.conv2d(_frames(x), _derived_weight(conv, "_stacked_taps", stack), None, 1, conv.padding[1:])
    y = y.unflatten(0, (x.shape[0], -1))  # [B, T, kt * O, H, W]
    taps = [y[:, k : k + frames, k * out_ch : (k + 1) * out_ch].flatten(0, 1) for k in range(kt)]
    return _video(_sum_taps(conv, taps, residual), x.shape[0])


def _conv3d(conv: nn.Conv3d, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    if conv.bias is not None and fused.compiles(x):  # the bias and the residual in one pass (`fused.bias_add`)
        return fused.bias_add(F.conv3d(x, conv.weight, None, conv.stride, conv.padding), conv.bias, residual)
    out = F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    return out if residual is None else out.add_(residual)


_PLANS = {"conv3d": _conv3d, "taps": _conv_by_taps, "stacked": _conv_by_stacked_taps}


def _plan_file_key(key: tuple, device: torch.device) -> str:
    """A plan's key in the file: the shape key with what decides the timings (the GPU, torch, cuDNN)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    # "bias 4": three plans, the tap sums and conv3d's bias fused (timings of earlier plan sets are not reused)
    return f"{gpu} | torch {torch.__version__} | cudnn {torch.backends.cudnn.version()} | bias 4 | {key[:2]} {key[3:]}"


def _plans_path():
    return fused.cache_dir() / PLANS_FILE


def _load_plans() -> dict[str, dict[str, float | str]]:
    global _saved_plans
    if _saved_plans is None:
        try:
            read = json.loads(_plans_path().read_text(encoding="utf-8"))
            _saved_plans = read if isinstance(read, dict) else {}
        except (OSError, ValueError):  # none yet, or unreadable: time the convs again
            _saved_plans = {}
    return _saved_plans


def _save_plan(name: str, plan: dict[str, float | str]) -> None:
    plans = _load_plans()
    plans[name] = plan
    path = _plans_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(plans, indent=0), encoding="utf-8")
        partial.replace(path)  # atomic: another process never reads half a file
    except OSError as e:
        logger.debug("VAE conv plans not saved to %s: %s", path, e)


def _conv_plan(conv: nn.Conv3d, x: torch.Tensor) -> str:
    key = (tuple(x.shape), x.dtype, str(x.device), x.is_contiguous(memory_format=torch.channels_last_3d),
           tuple(conv.weight.shape))  # fmt: skip
    plan = CONV_PLANS.get(key)
    if plan is None:
        name = _plan_file_key(key, x.device)
        plan = _load_plans().get(name)
        if not isinstance(plan, dict) or plan.get("choice") not in _PLANS:
            plan = _time_plans(conv, x)
            _save_plan(name, plan)
        CONV_PLANS[key] = plan
        logger.debug("VAE conv %s: %s", key, plan)
    return plan["choice"]


def _time_plans(conv: nn.Conv3d, x: torch.Tensor) -> dict[str, float | str]:
    times = {}
    for name, run in _PLANS.items():
        run(conv, x)  # warm-up (cuDNN plans, workspaces)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            run(conv, x)
        end.record()
        end.synchronize()
        times[name] = start.elapsed_time(end) / 3
    return {**times, "choice": min(times, key=times.get)}


class CausalConv3d(nn.Conv3d):
    """Conv3d padded on the past side of time only; spatial padding is symmetric.

    The temporal padding is 2 * padding_t zero frames. Given a `TimeCache`, the frames from earlier calls replace
    those zeros and the cache is updated with the last frames of this call's input.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad_h, pad_w))
        self.time_pad = 2 * pad_t
        self.keeps_past_frames = self.time_pad > 0
        self.cache_slot: int | None = None

    def forward(
        self,
        x: torch.Tensor,
        cache: TimeCache | None = None,
        norm: RMSNorm | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C_out, T', H', W'].

        norm: the RMS norm that comes (with a SiLU) before this conv, applied here so that the past frames are
        written beside it in the same pass. residual: [B, C_out, T', H', W'], added to the output.
        """
        if self.time_pad == 0:
            x = x if norm is None else fused.channel_rms_silu(x, norm.gamma, norm.scale)
            return _conv3d(self, x, residual)
        past = None if cache is None else cache[self.cache_slot]
        if norm is not None:
            x = fused.channel_rms_silu(x, norm.gamma, norm.scale, past)
        elif past is not None:
            x = torch.cat([past, x], dim=2)
        # A one-frame tensor is both layouts at once, and PyTorch may hand it on as the plain one; a cache made from
        # it would keep every later chunk of this conv on cuDNN's slow plain-layout kernels (seen on an H200 when a
        # stream starts with one latent frame: 96-channel convs at full size).
        x = _channels_last_on_gpu(x)
        if cache is not None:
            # A copy, so that the cache does not pin this call's whole input buffer, with strides of its own: the
            # fused norm of the next call reads it, and a stride carried over from this call's length would make
            # that kernel compile once more.
            cache[self.cache_slot] = x[:, :, -self.time_pad :].clone(memory_format=_layout_of(x))
        missing = self.time_pad - (0 if past is None else past.shape[2])
        if missing > 0:
            x = _channels_last_on_gpu(F.pad(x, (0, 0, 0, 0, missing, 0)))  # the pad may give the plain layout back
        if self._tunable(x):
            return _PLANS[_conv_plan(self, x)](self, x, residual)
        return _conv3d(self, x, residual)

    def _tunable(self, x: torch.Tensor) -> bool:
        return (
            x.is_cuda
            and x.shape[0] == 1
            and self.kernel_size[0] > 1
            and self.stride == (1, 1, 1)
            and self.dilation == (1, 1, 1)
            and self.groups == 1
            and not torch.is_grad_enabled()
            and not torch.cuda.is_current_stream_capturing()
        )


class ResidualBlock(nn.Module):
    """norm-SiLU-conv-norm-SiLU-conv plus a (1x1x1 conv where channels change) shortcut.

    `residual` keeps Wan's Sequential indices (0 norm, 2 conv, 3 norm, 6 conv) so checkpoint keys match; index 5 was
    dropout and is an identity here (inference only).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        """x: [B, in_dim, T, H, W] -> [B, out_dim, T, H, W]."""
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(x, cache, norm=norm1)  # the norms and SiLUs run fused, each with its conv's past frames
        return conv2(h, cache, norm=norm2, residual=self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time), with a residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W] -> [N, C, H, W]."""
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w).transpose(2, 3)  # [N, 1, HW, 3C]
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, 1, HW, C]
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, T, H, W] -> same shape."""
        return x + _per_frame(self._attend, x)


def _phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """[O, I, 3, 3] kernel of a conv after a nearest 2x upsampling -> [4 * O, I, 2, 2], phase (a, b) in block 2a + b.
    Nearest neighbours repeat, so along each axis output phase 0 sees two input pixels with taps (w0, w1 + w2) and
    phase 1 sees two with (w0 + w1, w2); a 2x2 conv with padding 1 puts phase a's pixel i at position i + a."""

    def fold(w: torch.Tensor, dim: int) -> list[torch.Tensor]:
        w0, w1, w2 = w.unbind(dim)
        return [torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)]

    kernels = torch.cat([kw for kh in fold(weight.float(), 2) for kw in fold(kh, 3)]).to(weight.dtype)
    return kernels.contiguous(memory_format=torch.channels_last) if weight.is_cuda else kernels


class Resample(nn.Module):
    """2x spatial down/upsampling per frame, plus 2x in time for the '3d' modes.

    downsample3d: frames f0, f1, f2, ... become f0, conv(f0, f1, f2), conv(f2, f3, f4), ... (kernel 3, stride 2);
      the encoder feeds 1 frame first, then even counts, and the module keeps the last frame it saw.
    upsample3d: `time_conv` doubles the channels and the halves become two consecutive frames; the first frame of
      the video is passed through alone (Wan's 'Rep'), so L frames become 1 + 2(L - 1).
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            # nearest-exact as Wan2.1 and diffusers (the Self-Forcing copies use 'nearest'; same result for 2x).
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        else:
            # Pad right/bottom only, then a stride-2 conv: H -> H/2 with the sampling grid anchored at the top-left.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        # downsample3d keeps its own one-frame cache; upsample3d's time_conv keeps a normal one.
        self.keeps_past_frames = mode == "downsample3d"
        self.cache_slot: int | None = None

    def _upsample_time(self, x: torch.Tensor, cache: TimeCache | None, first_chunk: bool) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C, 2T (or 2T - 1 in the first chunk), H, W]."""
        if first_chunk:
            # The first frame skips time_conv, and time_conv's stream (and cache) starts at the second frame.
            head, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2] > 0:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, cache).view(b, 2, c, t, h, w)
            # Interleave, frame k -> (2k, 2k + 1), written once in the input's memory layout: a reshape would copy
            # a channels-last tensor into a plain one, and every conv after it would convert it back.
            out = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=_layout_of(x))
            out.unflatten(2, (t, 2)).copy_(y.permute(0, 2, 3, 1, 4, 5))
            x = out
        return torch.cat([head, x], dim=2) if first_chunk else x

    def _upsample_space(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest 2x upsampling then the 3x3 conv, run as the conv's four phase kernels on the small frames.
        x: [B, C, T, H, W] -> [B, C // 2, T, 2H, 2W]. Same result up to rounding of the summed weights; 16 instead
        of 36 multiply-adds per pixel and channel pair, and no upsampled copy of the input (on an H200 these took
        16 ms of a 118-ms decode chunk)."""
        conv = self.resample[1]
        y = F.conv2d(_frames(x), _derived_weight(conv, "_phases", _phase_kernels), None, 1, 1)
        return _video(fused.phase_interleave(y, conv.bias), x.shape[0])

    def _downsample_time(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C, T // 2, H, W] (the very first frame passes through alone)."""
        past = cache[self.cache_slot]
        cache[self.cache_slot] = x[:, :, -1:].clone()
        if past is None:
            return x
        return self.time_conv(torch.cat([past, x], dim=2))

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None, first_chunk: bool = False) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C', T', H', W'] (see the class docstring for T')."""
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache, first_chunk)
        x = self._upsample_space(x) if self.mode.startswith("upsample") else _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            if cache is None:
                raise ValueError("downsample3d needs a TimeCache; encode through WanVAE.encode")
            x = self._downsample_time(x, cache)
        return x


def _apply(layer: nn.Module, x: torch.Tensor, cache: TimeCache | None, first_chunk: bool = False) -> torch.Tensor:
    """Call a layer of an encoder/decoder Sequential, giving the cache to the layers that keep time state."""
    if isinstance(layer, Resample):
        return layer(x, cache, first_chunk)
    if isinstance(layer, (CausalConv3d, ResidualBlock)):
        return layer(x, cache)
    return layer(x)


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1))


class Encoder(nn.Module):
    """Video [B, 3, T, H, W] -> mean and log-variance [B, 2z, T', H/8, W/8] (before `WanVAE.conv1`)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for i in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim if i == 0 else out_dim, out_dim))
            if level < len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[level] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle, *self.head):
            x = _apply(layer, x, cache)
        return x


class Decoder(nn.Module):
    """Latents [B, z, T, h, w] (after `WanVAE.conv2`) -> video [B, 3, T', 8h, 8w], not clamped."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            # Each Resample halves the channels (Wan2.1), so every level after the first starts at in_dim / 2.
            in_dim = in_dim // 2 if level > 0 else in_dim
            for i in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim if i == 0 else out_dim, out_dim))
            if level < len(mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[level] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)

    def forward(
        self, x: torch.Tensor, cache: TimeCache, first_chunk: bool,
        step: Callable[[], AbstractContextManager] = nullcontext,
    ) -> torch.Tensor:  # fmt: skip
        """step: a context each layer's work is launched in (a lock held layer by layer, not for the whole decode)."""
        with step():
            x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            with step():
                x = _apply(layer, x, cache, first_chunk)
        norm, _, conv = self.head
        with step():
            return conv(x, cache, norm=norm)


def _assign_cache_slots(root: nn.Module) -> int:
    """Give every module that keeps past frames its index in a TimeCache; returns the cache length."""
    slots = 0
    for module in root.modules():
        if getattr(module, "keeps_past_frames", False):
            module.cache_slot = slots
            slots += 1
    return slots


class WanVAE(nn.Module):
    """The Wan2.1 causal video VAE (encoder, `conv1`, `conv2`, decoder) working on normalized latents.

    Latents in and out are normalized with the config's per-channel mean and std, `(mu - mean) / std`, as the DiT
    sees them. Video is in [-1, 1]. Run under `torch.inference_mode()`: the streaming caches would otherwise keep
    autograd graphs alive across chunks.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)
        self._encoder_slots = _assign_cache_slots(self.encoder)
        self._decoder_slots = _assign_cache_slots(self.decoder)
        # Not in the checkpoint (persistent=False) but they follow .to(device).
        shape = (1, cfg.z_dim, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean).view(shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std).view(shape), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _apply(self, fn, recurse: bool = True):
        # On a GPU the convs keep channels-last weights, so cuDNN runs its NDHWC kernels (the fastest in bf16;
        # 200 -> 160 ms per 3-latent-frame chunk at 480x832 on an H100) and the activations follow that layout.
        super()._apply(fn, recurse)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)) and module.weight.is_cuda:
                layout = torch.channels_last_3d if module.weight.ndim == 5 else torch.channels_last
                module.weight.data = module.weight.data.contiguous(memory_format=layout)
        return self

    # --- encode ---------------------------------------------------------------------------------------------------

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encode a video to normalized latents (the posterior mean).

        video: [B, 3, T, H, W] in [-1, 1], H and W multiples of 8 -> [B, z, 1 + (T - 1) // 4, H / 8, W / 8].
        Frames after the last full group of 4 are dropped, as in Wan2.1.
        """
        step, spatial = self.cfg.temporal_factor, self.cfg.spatial_factor
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}")
        b, _, t, h, w = video.shape
        if t < 1 or h % spatial or w % spatial:
            raise ValueError(
                f"video {tuple(video.shape)}: need T >= 1 and H, W multiples of {spatial}; crop or resize"
            )
        usable = 1 + (t - 1) // step * step
        if usable < t:
            logger.warning(
                "encode: dropping the last %d of %d frames (the VAE codes 1 + %dk frames)", t - usable, t, step
            )
        # The encoder's temporal downsampling is aligned to chunks of 1, step, step, ...: the first frame alone.
        cache: TimeCache = [None] * self._encoder_slots
        bounds = [0, *range(1, usable + 1, step)]
        chunks = [self.encoder(video[:, :, s:e], cache) for s, e in zip(bounds[:-1], bounds[1:])]
        mu, _log_var = self.conv1(torch.cat(chunks, dim=2)).chunk(2, dim=1)
        return (mu - self.latents_mean.to(mu.dtype)) / self.latents_std.to(mu.dtype)

    # --- decode ---------------------------------------------------------------------------------------------------

    def new_decode_state(self) -> VAEDecodeState:
        """A fresh state for one streaming decode (one video)."""
        return VAEDecodeState(caches=[None] * self._decoder_slots)

    def decode_stream(
        self, latents: torch.Tensor, state: VAEDecodeState, step: Callable[[], AbstractContextManager] = nullcontext
    ) -> torch.Tensor:  # fmt: skip
        """Decode the next chunk of a latent stream, continuing from `state` (updated in place).

        latents: [B, z, n, h, w] normalized, any n >= 1 -> video [B, 3, n', 8h, 8w] in [-1, 1], where
        n' = 1 + 4(n - 1) for the first chunk of the stream and 4n afterwards. Concatenating the chunks gives
        the same frames as `decode` of the whole sequence. step: a context each layer's work is launched in.
        """
        self._check_latents(latents)
        b, _, n, h, w = latents.shape
        if len(state.caches) != self._decoder_slots:
            raise ValueError(
                f"state has {len(state.caches)} cache slots, this VAE needs {self._decoder_slots}; "
                "create it with this model's new_decode_state()"
            )
        if state.latent_shape is None:
            state.latent_shape = (b, h, w)
        elif state.latent_shape != (b, h, w):
            raise ValueError(
                f"latent chunk has (B, h, w) = {(b, h, w)} but this stream started with {state.latent_shape}; "
                "use a new_decode_state() for a different video"
            )
        # the constants follow the latents' dtype: a loaded model may keep its buffers in float32
        with step():
            x = self.conv2(latents * self.latents_std.to(latents.dtype) + self.latents_mean.to(latents.dtype))
        video = self.decoder(x, state.caches, state.latent_frames == 0, step)
        state.latent_frames += n
        with step():
            return video.clamp(-1.0, 1.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a whole latent sequence, one latent frame at a time to bound memory (as Wan2.1 does).

        latents: [B, z, L, h, w] normalized -> video [B, 3, 1 + 4(L - 1), 8h, 8w] in [-1, 1].
        """
        self._check_latents(latents)
        state = self.new_decode_state()
        frames = [self.decode_stream(latents[:, :, i : i + 1], state) for i in range(latents.shape[2])]
        return torch.cat(frames, dim=2)

    def _check_latents(self, latents: torch.Tensor) -> None:
        z = self.cfg.z_dim
        if latents.ndim != 5 or latents.shape[1] != z or latents.shape[2] < 1:
            raise ValueError(f"latents must be [B, {z}, T >= 1, h, w], got {tuple(latents.shape)}")
