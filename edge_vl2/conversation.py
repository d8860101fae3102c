"""Multi-turn chat about images over one `VL2Pipeline`: history, attached images, trimming to the context.

    conv = Conversation(vl2)
    conv.attach("photo.jpg")                          # goes with the next question
    for piece in conv.ask("What is on the table?"):   # streamed; the answer is kept when the stream ends
        print(piece, end="")
    conv.ask_all("And what colour is it?")           # the whole answer; the photo's tiles come from the vision cache
    conv.save("chat.json"); conv.reset()

Every question re-sends the whole conversation through the official template (the model has no state between
calls), so each turn's images are tiled again; with the pipeline's vision cache on (it is, unless the pipeline
already has one or `vision_cache_mb=0`) their tiles are not encoded again. When the conversation no longer fits the
context with room for the answer, the oldest turns are dropped (with their images) and `last.dropped_turns` says
how many. Message text is tokenised under `special_tokens` (default "parse", the official behaviour: the user of a
Conversation writes their own prompts; see inputs/template.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .generate import SamplingParams
from .inputs.images import load_image
from .inputs.processor import ProcessorOutput
from .inputs.template import IMAGE_PART, check_policy

DEFAULT_RESERVE_TOKENS = 512  # room kept for the answer when trimming history (capped by max_new_tokens)


@dataclass
class Turn:
    question: str
    images: list = field(default_factory=list)  # (name, PIL image) pairs, in order
    answer: str = ""
    complete: bool = False  # False while streaming, or when the answer was stopped early


@dataclass
class TurnResult:
    """What the latest `ask` produced: text, grounding boxes in pixels, token counts, timings, trimmed turns."""

    text: str = ""
    boxes: list = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict = field(default_factory=dict)
    dropped_turns: int = 0
    inputs: ProcessorOutput | None = None


class Conversation:
    def __init__(self, vl2, system: str | None = None, special_tokens: str = "parse",
                 reserve_tokens: int = DEFAULT_RESERVE_TOKENS, vision_cache_mb: float | None = None,
                 max_context: int | None = None):
        """`reserve_tokens`: room kept for the answer (at most max_new_tokens). `max_context`: keep prompt + answer
        under this many tokens instead of the model's context. `vision_cache_mb`: size of the vision cache the
        pipeline gets if it has none (None = the default size, 0 = no cache)."""
        self.vl2, self.system = vl2, system
        self.max_context = max_context
        self.policy = check_policy(special_tokens)
        self.reserve_tokens = reserve_tokens
        self.turns: list[Turn] = []
        self.pending: list = []
        self.dropped_turns = 0
        self.last = TurnResult()
        if vl2.vision_cache is None and vision_cache_mb != 0:
            vl2.enable_vision_cache(*(() if vision_cache_mb is None else (vision_cache_mb,)))

    @property
    def context(self) -> int:
        model = self.vl2.model.cfg.language.max_position_embeddings
        return min(model, self.max_context) if self.max_context else model

    def attach(self, image, name: str | None = None) -> None:
        """Load an image (path or PIL) now, so a bad file fails here; it goes with the next question."""
        pil = load_image(image)
        self.pending.append((name or (str(Path(image).resolve()) if isinstance(image, (str, Path)) else "image"),
                             pil))

    def reset(self) -> None:
        """Forget every turn and attached image (the vision cache keeps its tiles)."""
        self.turns, self.pending, self.dropped_turns, self.last = [], [], 0, TurnResult()

    def ask(self, question: str, sampling: SamplingParams = SamplingParams()) -> Iterator[str]:
        """Stream the answer to `question` about the attached images (and everything said before). The prompt is
        built (and history trimmed: `last.dropped_turns`) now; a prompt that cannot fit raises UserError here and
        leaves the conversation as it was. The answer joins the history when the stream ends, also when it is
        closed early (then its `complete` is False)."""
        if not isinstance(question, str):
            raise UserError("the question must be a string")
        turn = Turn(question, self.pending)
        inputs, dropped = self._fit(turn, sampling.max_new_tokens)
        self.pending = []
        self.turns.append(turn)
        self.last = TurnResult(prompt_tokens=inputs.seq_len, dropped_turns=dropped, inputs=inputs)
        return self._answer(turn, self.last, sampling)

    def _answer(self, turn: Turn, result: TurnResult, sampling: SamplingParams) -> Iterator[str]:
        pieces: list[str] = []
        try:
            for piece in self.vl2.stream(result.inputs, sampling, result.timings):
                pieces.append(piece)
                yield piece
            turn.complete = True
        finally:
            turn.answer = result.text = "".join(pieces)
            result.completion_tokens = result.timings.get("decode_tokens", 0)
            result.boxes = self.vl2.boxes(turn.answer, result.inputs)

    def ask_all(self, question: str, sampling: SamplingParams = SamplingParams()) -> TurnResult:
        """`ask`, collected: the whole answer as a TurnResult."""
        for _ in self.ask(question, sampling):
            pass
        return self.last

    def _fit(self, turn: Turn, max_new_tokens: int) -> tuple[ProcessorOutput, int]:
        """The prompt with `turn` last, dropping the oldest turns until it leaves room for the answer."""
        budget = self.context - min(max_new_tokens, self.reserve_tokens)
        dropped = 0
        while True:
            inputs = self.vl2.processor.process(self._messages(self.turns[dropped:] + [turn]),
                                                special_tokens=self.policy)
            if inputs.seq_len <= budget:
                break
            if dropped == len(self.turns):
                raise UserError(f"this question and its images are {inputs.seq_len} tokens; the context is "
                                f"{self.context} with {self.context - budget} kept for the answer; use fewer or "
                                "smaller images or a shorter question")
            dropped += 1
        self.turns = self.turns[dropped:]
        self.dropped_turns += dropped
        return inputs, dropped

    def _messages(self, turns: list[Turn]) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        tag = self.vl2.processor.config.image_token
        for t in turns:
            msgs.append({"role": "user", "content": self._content(t), "images": [im for _, im in t.images]})
            # A generated "<image>" would claim an image slot when the history is read back under "parse".
            msgs.append({"role": "assistant", "content": t.answer.replace(tag, "") if self.policy == "parse"
                         else t.answer})
        return msgs

    def _content(self, t: Turn):
        """Images first on lines of their own when the question has no tag for them (the official demo's
        convention, as `run` does); under the literal policies, image parts then the text, which the template lays
        out the same way."""
        n = len(t.images)
        if self.policy != "parse":
            return [IMAGE_PART] * n + [t.question]
        tag = self.vl2.processor.config.image_token
        missing = n - t.question.count(tag)
        return f"{tag}\n" * max(missing, 0) + t.question

    def to_dict(self) -> dict:
        """The conversation as JSON-ready data: messages in the OpenAI shape plus each user message's image names."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for t in self.turns:
            msgs.append({"role": "user", "content": t.question, "images": [name for name, _ in t.images]})
            msgs.append({"role": "assistant", "content": t.answer, **({} if t.complete else {"stopped": True})})
        return {"format": "edge-vl2 conversation", "version": 1, "messages": msgs,
                "dropped_turns": self.dropped_turns}

    def save(self, path: str | Path) -> Path:
        """Write `to_dict()` as JSON (through a temporary file: never half written)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            tmp.replace(path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
        return path
