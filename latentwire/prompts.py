"""How a QA example becomes a prompt: an untransformed prefix, the source span, an untransformed anchor.

Only the source span (context + question) is what a transform sees; the instruction, the chat
markup and the answer anchor stay real token embeddings, as a trained system would keep them.
"""

from dataclasses import dataclass

INSTRUCTION = "Answer the question with a short phrase copied from the context."
_SLOT = "\u2063SOURCE\u2063"  # a marker that no template produces by itself


@dataclass(frozen=True)
class PromptFormat:
    name: str  # "chat" or "plain"
    prefix_text: str
    anchor_text: str
    add_bos: bool

    def context_text(self, context: str) -> str:
        return f"Context: {context}\n"

    def question_text(self, question: str) -> str:
        return f"Question: {question}\n" if self.name == "plain" else f"Question: {question}"

    def source_text(self, context: str, question: str) -> str:
        return self.context_text(context) + self.question_text(question)

    def describe(self) -> dict:
        """What the outputs record: enough to rebuild the exact prompt."""
        return {"name": self.name, "prefix": self.prefix_text,
                "source": self.source_text("{context}", "{question}"),
                "anchor": self.anchor_text, "bos": self.add_bos}


FORMATS = ("auto", "chat", "plain")


def make_format(tokenizer, name: str = "auto") -> PromptFormat:
    """`chat` for models with a chat template (instruction-tuned), else the seed's plain format."""
    if name == "auto":
        name = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    probe = tokenizer("x", add_special_tokens=True).input_ids
    adds_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    if name == "plain":
        return PromptFormat("plain", "", "Answer:", adds_bos)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{INSTRUCTION}\n\n{_SLOT}"}],
        tokenize=False, add_generation_prompt=True)
    prefix, anchor = rendered.split(_SLOT)
    # A template that writes the BOS token itself must not get a second one.
    bos = tokenizer.bos_token or ""
    return PromptFormat("chat", prefix, anchor, adds_bos and not (bos and prefix.startswith(bos)))


def encode(tokenizer, fmt: PromptFormat, context: str, question: str):
    """(prefix_ids, source_ids, anchor_ids), each tokenised on its own so the span is exact."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    prefix = ([tokenizer.bos_token_id] if fmt.add_bos else []) + ids(fmt.prefix_text)
    return prefix, ids(fmt.source_text(context, question)), ids(fmt.anchor_text)


def encode_span(tokenizer, fmt: PromptFormat, context: str, question: str,
                keep_question: bool = False) -> tuple[list[int], list[int]]:
    """(what an encoder reads, what follows it as text). By default the whole source span, as
    the sweep tokenises it, and nothing after; with keep_question the context alone, then the
    question as text (an encoder that never sees the question: query-agnostic compression)."""
    if not keep_question:
        return encode(tokenizer, fmt, context, question)[1], []

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    return ids(fmt.context_text(context)), ids(fmt.question_text(question))
