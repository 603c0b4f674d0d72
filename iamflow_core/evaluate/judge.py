"""The MLLM-judged dimension `vlm_score`, through an OpenAI-compatible chat endpoint (a local vLLM, say).

As the benchmark does (metrics/instruction/vlm_score.py, models/vlm_client.py, utils/vlm_score_utils.py of
Eddie0521/NarraStream-Bench, commit 3443e52, Apache-2.0): one request per story with the benchmark's own
instructions (`JUDGE_PROMPT`, quoted unchanged so scores stay comparable; it asks in Chinese for a 1-100 score of
how well each prompt was carried out, and one for the whole sequence), then, per prompt, a caption and 5 JPEG
frames spread over it; temperature 0, at most 256 tokens, a JSON reply. Score = 0.8 x mean(prompt scores) + 0.2 x
overall, each / 100.
Deviations: a failed request or an unreadable reply marks the dimension not scored for that story (the benchmark
retries up to 12 times, then counts 0.5); prompts are weighted equally (the benchmark's fallback without its LLM
planner). Plain `urllib`: no client library. The key in $OPENAI_API_KEY, if set, is sent as a bearer token.
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .settings import BenchSettings

# Quoted from utils/vlm_score_utils.py `PROMPT_TEMPLATE` (score version v7_prompt_state_continuity_identity_strict).
JUDGE_PROMPT = """你是一个视频评估专家。下面是一个流式生成的视频和对应的提示词序列。
系统会按时间顺序提供每一段视频的关键帧。请判断每一段视频是否执行了对应的 prompt，并给出整条序列的整体评分。

提示词序列：
{prompts}

要求：
1. `segment_scores` 必须是长度为 {num_segments} 的数组，第 i 个元素对应第 i 段 prompt 的执行分。
2. 所有分数都使用 1-100 的整数。1 表示完全不符合，100 表示完全符合。
3. 默认根据“该段关键帧”和“该段 prompt”评分，不要根据开头/中间/结尾位置、叙事结构或段落重要性加分。
4. 如果该段 prompt 主要描述的是延续、保持、确认、观察、仍然处于某状态，可以结合前一段已经建立的状态判断该状态是否持续成立。不要因为该段动作幅度较小，就机械给低分。
5. 必须依据可直接观察到的证据评分：
   - 明确动作是否发生
   - 人物交互是否发生
   - 物体变化、物体 handoff 或状态转移是否发生
   - 是否在正确时间点执行了该段 prompt
   - 如果该段是延续/保持类 prompt，是否清楚地维持了前序已建立的人物关系、物体状态和空间布局，且没有明显冲突
6. 如果只匹配了人物、场景或大致氛围，但关键动作、交互、物体归属、handoff 接收关系或状态变化并不明确，`segment_score` 不应高于 50。
   对于多人场景，只要人物身份、交互对象或物体归属存在明显不确定性，即使画面整体相似，也不应给高分。
7. 如果几乎没有直接证据支持该段 prompt，`segment_score` 应在 1-20。
   如果只存在弱相关、泛化、可替代的证据，`segment_score` 通常应在 20-50，而不是高分。
8. 允许相邻段同分，也允许大幅跳变；不要为了看起来平滑而输出递增或递减的分数序列。
   但也不要因为后续段动作更弱，就自动把“延续成立”的段落打成极低分。
9. `overall_score` 表示整条视频是否按正确时间顺序完成了关键事件并维持了后续状态一致性。
   如果关键动作、主要交互、物体 handoff 或状态转折已经清楚发生，且后续没有明显违背 prompt，即使后续段落动作较弱，也可以给中高分。
   反过来，如果只是整体流畅、场景一致、人物大致相似，但关键事件、人物关系或物体归属无法确认，`overall_score` 应明显降低。
10. 只有当人物身份、关键动作、物体关系和时间点都非常明确且几乎无歧义时，才给 100 分。

输出格式：
{{"segment_scores":[int,int,...],"overall_score":int}}"""  # noqa: E501 (quoted unchanged)
# Quoted from models/vlm_client.py: "Here are the key frames of video segment {i} (sampled in time order)."
SEGMENT_CAPTION = "以下是第 {index} 段视频的关键帧（按时间顺序采样）。"


class JudgeError(RuntimeError):
    """The judge could not score a story (no answer, an HTTP error, an unreadable reply)."""


@dataclass(frozen=True)
class JudgeResult:
    score: float
    prompt_scores: tuple[float, ...]
    overall: float
    reply: str


def _jpeg(frame: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=95)  # OpenCV's default quality, as the benchmark's
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def build_request(model: str, prompts: Sequence[str], frames: Sequence[Sequence[np.ndarray]], s: BenchSettings):
    """The chat-completions body: instructions, then per prompt its caption and frames (uint8 [H, W, 3])."""
    listed = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))
    content = [{"type": "text", "text": JUDGE_PROMPT.format(prompts=listed, num_segments=len(prompts))}]
    for index, images in enumerate(frames, start=1):
        content.append({"type": "text", "text": SEGMENT_CAPTION.format(index=index)})
        content += [{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{_jpeg(f)}"}} for f in images]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": s.judge_max_tokens,
        "temperature": 0.0,
        "response_format": {"type": "json_object"},
    }


def endpoint(url: str) -> str:
    """The chat-completions URL of a base URL (`http://host:8000/v1`) or of the full endpoint."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def post(url: str, body: dict, timeout: float) -> str:
    """POST `body` to the endpoint; the reply's message text. Every failure is a JudgeError saying what happened."""
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    request = urllib.request.Request(endpoint(url), json.dumps(body).encode("utf-8"), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (the user's own URL)
            data = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:200]
        raise JudgeError(f"{endpoint(url)} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise JudgeError(f"no answer from {endpoint(url)} ({reason}); is the server running at that URL?") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise JudgeError(f"{endpoint(url)} did not answer with JSON; is it an OpenAI-compatible endpoint?") from None
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"{endpoint(url)} answered without choices[0].message.content: {str(data)[:200]}") from None
    if isinstance(content, list):  # a list of parts
        content = "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content or "").strip()


def _json_object(text: str) -> dict:
    """The JSON object in a reply, also inside a ``` fence or after some words."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise JudgeError(f"the judge's reply holds no JSON object: {text[:200]!r}")
    try:
        value = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        raise JudgeError(f"the judge's reply is not valid JSON: {text[:200]!r}") from None
    if not isinstance(value, dict):
        raise JudgeError(f"the judge's reply is not a JSON object: {text[:200]!r}")
    return value


def parse_reply(text: str, num_prompts: int, s: BenchSettings) -> JudgeResult:
    """The score of a reply {"segment_scores": [1-100 per prompt], "overall_score": 1-100}."""
    value = _json_object(text)
    scores, overall = value.get("segment_scores"), value.get("overall_score")
    if not isinstance(scores, list) or len(scores) != num_prompts:
        raise JudgeError(f"the judge gave segment_scores {scores!r}, not a list of {num_prompts} scores")
    try:
        unit = [min(1.0, max(0.0, float(v) / 100.0)) for v in [*scores, overall]]
    except (TypeError, ValueError):
        raise JudgeError(f"the judge's scores are not numbers: {text[:200]!r}") from None
    prompt_scores, overall_unit = tuple(unit[:-1]), unit[-1]
    total = s.judge_segment_weight + s.judge_overall_weight
    mean = sum(prompt_scores) / len(prompt_scores)
    score = (s.judge_segment_weight * mean + s.judge_overall_weight * overall_unit) / total
    return JudgeResult(score, prompt_scores, overall_unit, text)


def judge_story(
    url: str, model: str, prompts: Sequence[str], frames: Sequence[Sequence[np.ndarray]], s: BenchSettings
) -> JudgeResult:
    """Ask the judge at `url` (model `model`) to score one story; raises JudgeError when it cannot."""
    reply = post(url, build_request(model, prompts, frames, s), s.judge_timeout_s)
    return parse_reply(reply, len(prompts), s)
