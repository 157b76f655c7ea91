"""POST /tokenize and /detokenize (vLLM's shapes): run on a preparation thread, like the rest of a request's text work.

Texts longer than the context are counted (a client may want to know by how much to cut), up to
``TOKENIZE_LIMIT_FACTOR`` times the context; past that the answer is a 400 context_length_exceeded, given as soon as
it is certain: counting an 8 MB text to the end would only cost the server time and memory.
"""

from __future__ import annotations

from fabrik.server import chat
from fabrik.server.common import ServerContext, encode
from fabrik.server.errors import bad_request
from fabrik.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

TOKENIZE_LIMIT_FACTOR = 4
"""/tokenize counts up to this many times the context length."""


def token_limit(ctx: ServerContext) -> int:
    """Most tokens /tokenize counts (and most messages or prompt entries it validates)."""
    return TOKENIZE_LIMIT_FACTOR * ctx.model.max_model_len


def tokenize(ctx: ServerContext, body: TokenizeRequest) -> TokenizeResponse:
    ctx.check_model(body.model)
    tokenizer = ctx.need_tokenizer("tokenize")
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")
    limit = token_limit(ctx)
    if body.messages is not None:
        ids = chat.encode_messages(ctx, body.messages, body.tools, body.chat_template_kwargs,
                                   add_generation_prompt=body.add_generation_prompt, limit=limit).token_ids
        if body.add_special_tokens:  # the tokenizer's own BOS/EOS around the rendered conversation
            ids = tokenizer.encode("", add_special_tokens=True) + ids
    else:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = encode(ctx, body.prompt or "", "prompt", add_special, limit=limit)
    strs = [tokenizer.token_to_text(t) for t in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=ctx.model.max_model_len, tokens=ids, token_strs=strs)


def detokenize(ctx: ServerContext, body: DetokenizeRequest) -> DetokenizeResponse:
    ctx.check_model(body.model)
    tokenizer = ctx.need_tokenizer("detokenize")
    bad = next((t for t in body.tokens if not 0 <= t < ctx.model.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of range [0, {ctx.model.vocab_size})", "tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))
