"""The native whole-stack forward (fabrik/kernels/forward.py, csrc/forward.c) against the modules' forward.

Both paths use the same packed weights and round to bf16 at the same points, so whole prompts and chunks must give
bit-identical hidden states (the prefill attention sums in the same order here); decode steps differ only by the
attention's summation order and must stay as close to a float32 reference as the module path is.
"""

from __future__ import annotations

from array import array

import pytest
import torch

from fabrik.kernels import apply_kernels, select_backend
from fabrik.loader import load_model
from fabrik.model_config import load_model_config
from fabrik.models.attention import AttentionMetadata, StepBatch, kv_bytes_per_token, make_kv_caches
from checkpoints import make_checkpoint
from native_backends import NATIVE_NAMES

BLOCK = 4
NUM_BLOCKS = 60


@pytest.fixture(scope="module",
                params=NATIVE_NAMES or [pytest.param("none", marks=pytest.mark.skip("no native kernels here"))])
def backend(request):
    return select_backend(request.param)


class _Pair:
    """One checkpoint run three ways over separate caches with the same (shuffled) block tables."""

    def __init__(self, path, backend, quantization=None, block=BLOCK, kv_cache_dtype="auto"):
        self.block = block
        self.config = config = load_model_config(path)
        self.fused = apply_kernels(load_model(path, config, torch.bfloat16), backend, quantization)
        self.modules = apply_kernels(load_model(path, config, torch.bfloat16), backend, quantization,
                                     native_forward=False)
        self.float32 = load_model(path, config, torch.float32)
        assert self.fused.native_forward is not None and self.modules.native_forward is None
        # The float32 model keeps an unquantized cache: the reference every KV format is measured against.
        self.caches = {name: make_kv_caches(config, NUM_BLOCKS, block, dtype, kv)
                       for name, dtype, kv in (("fused", torch.bfloat16, kv_cache_dtype),
                                               ("modules", torch.bfloat16, kv_cache_dtype),
                                               ("float32", torch.float32, "auto"))}
        self.tables = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(0)).view(3, -1)  # 20 each

    def step(self, chunks: list[tuple[int, int, list[int]]]) -> dict[str, torch.Tensor]:
        """Runs (sequence, start position, new tokens) chunks as one batch; returns each path's hidden states."""
        ids, pos, slots, starts, lens = [], [], [], [0], []
        for seq, start, tokens in chunks:
            positions = range(start, start + len(tokens))
            ids += tokens
            pos += positions
            slots += [int(self.tables[seq][p // self.block]) * self.block + p % self.block for p in positions]
            starts.append(len(ids))
            lens.append(start + len(tokens))
        meta = AttentionMetadata(torch.tensor(slots), tuple(starts), tuple(lens),
                                 self.tables[[c[0] for c in chunks]].contiguous(), self.block)
        out = {}
        with torch.inference_mode():
            for name, model in (("fused", self.fused), ("modules", self.modules), ("float32", self.float32)):
                out[name] = model(torch.tensor(ids), torch.tensor(pos), self.caches[name], meta).float()
        return out


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# The fixtures' head_dim 16 / 32 run the portable attention; these shapes run the AVX-512 one (G = query heads per KV
# head, D = head_dim) where the CPU has it.
VECTOR_SHAPES = {"g2_d128": dict(head_dim=128), "g1_d64": dict(head_dim=64, num_key_value_heads=4),
                 "g4_d64": dict(head_dim=64, num_attention_heads=8, num_key_value_heads=2)}


@pytest.fixture(scope="module", params=sorted(VECTOR_SHAPES))
def vector_ckpt(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), "qwen3", **VECTOR_SHAPES[request.param])


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_vector_attention_is_as_close_as_the_modules(backend, vector_ckpt, kv):
    """bf16 softmax weights (as torch's flash attention uses) and fp32 sums: within bf16 steps of the modules, and
    no further from the float32 model than they are. With the int8 cache both read the same quantized rows (the
    native decode kernel in integer arithmetic, the modules dequantized) and stay as close."""
    pair = _Pair(vector_ckpt, backend, kv_cache_dtype=kv)
    a, b = _tokens(45, 5), _tokens(20, 6)  # 45 keys: full and partial 32-key chunks, odd pairs
    for chunks in ([(0, 0, a)], [(1, 0, b[:13])], [(0, 45, [7]), (1, 13, b[13:])]):
        out = pair.step(chunks)
        scale = out["modules"].abs().max()
        assert (out["fused"] - out["modules"]).abs().max() <= 0.05 * scale, chunks
    worst = {"fused": 0.0, "modules": 0.0}
    for i in range(8):
        out = pair.step([(0, 46 + i, [8 + i]), (1, 20 + i, [9 + i])])
        for name in worst:
            worst[name] = max(worst[name], (out[name] - out["float32"]).abs().max().item())
    assert worst["fused"] <= 1.5 * worst["modules"] + 0.02, worst


@pytest.mark.parametrize("kv", ["auto", "int8"])
@pytest.mark.parametrize("block", [4, 16])
def test_prefill_tiles_match_token_by_token(backend, vector_ckpt, block, kv):
    """Chunks of a prompt go through the prefill tile kernel (many tokens per K/V read), single tokens through the
    decode kernel: the same sums in another order, so the hidden states agree to bf16 rounding (int8 cache: the tile
    dequantizes each chunk to bf16, the decode kernel multiplies the int8 rows)."""
    pair = _Pair(vector_ckpt, backend, block=block, kv_cache_dtype=kv)
    a = _tokens(70, 7)
    tiled = torch.cat([pair.step([(0, 0, a[:37])])["fused"], pair.step([(0, 37, a[37:])])["fused"]])
    single = torch.cat([pair.step([(1, i, [t])])["fused"] for i, t in enumerate(a)])
    diff = (tiled - single).abs().max().item()
    assert diff <= 0.02 * single.abs().max().item(), diff


@pytest.mark.parametrize("kind", ["qwen3_ckpt", "qwen3_untied_ckpt", "qwen2_ckpt", "llama_ckpt"])
def test_prefill_and_chunks_are_bit_identical_decode_is_as_close(backend, request, kind):
    pair = _Pair(request.getfixturevalue(kind), backend)
    a, b = _tokens(30, 1), _tokens(9, 2)
    steps = [
        [(0, 0, a)],                                  # a whole prompt
        [(1, 0, b[:5])],                              # first chunk of another
        [(0, 30, [7]), (1, 5, b[5:])],                # a decode token beside the last chunk
    ]
    for chunks in steps:
        out = pair.step(chunks)
        if kind == "qwen3_untied_ckpt":  # head_dim 32: SDPA may block the sums differently, stay within bf16 steps
            assert (out["fused"] - out["modules"]).abs().max() <= 0.125
        else:
            assert torch.equal(out["fused"], out["modules"]), chunks
    worst = {"fused": 0.0, "modules": 0.0}
    for i in range(8):  # decode steps of both sequences
        out = pair.step([(0, 31 + i, [8 + i]), (1, 9 + i, [9 + i])])
        for name in worst:
            worst[name] = max(worst[name], (out[name] - out["float32"]).abs().max().item())
    assert worst["fused"] <= 1.5 * worst["modules"] + 0.02, worst


@pytest.mark.parametrize("quantization", ["int8", "int4", "int4-g64", "int4-g128"])
def test_quantized_layers_match_their_modules(backend, qwen3_ckpt, quantization):
    pair = _Pair(qwen3_ckpt, backend, quantization)
    out = pair.step([(0, 0, _tokens(20, 3)), (1, 0, _tokens(6, 4))])
    assert torch.equal(out["fused"], out["modules"])


def test_not_used_where_it_cannot_run(backend, qwen3_ckpt):
    config = load_model_config(qwen3_ckpt)
    int8_float32 = apply_kernels(load_model(qwen3_ckpt, config, torch.float32), backend, "int8")
    assert int8_float32.native_forward is None  # float32 activations: module by module
    torch_bf16 = apply_kernels(load_model(qwen3_ckpt, config, torch.bfloat16), "torch", "int8")
    assert torch_bf16.native_forward is None


def test_rejects_token_ids_outside_the_vocabulary(backend, qwen3_ckpt):
    pair = _Pair(qwen3_ckpt, backend)
    with pytest.raises(IndexError):
        pair.fused(torch.tensor([pair.config.vocab_size]), torch.tensor([0]), pair.caches["fused"],
                   AttentionMetadata(torch.tensor([0]), (0, 1), (1,), pair.tables[:1].contiguous(), BLOCK))


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_lm_head_in_the_forward_call(backend, qwen3_ckpt, quantization):
    """forward_logits runs the LM head on the chosen rows in the forward's own call: the hidden states, logits and
    argmax are the bits of the forward, then the head on those rows (all rows, some, one; int4 models have an int8
    head); a row outside the batch is refused."""
    pair = _Pair(qwen3_ckpt, backend, quantization)
    native, head = pair.fused.native_forward, pair.fused.lm_head_kernel
    assert native.has_head
    ids = _tokens(11, 3)
    table = pair.tables[0].tolist()
    batch = StepBatch(array("q", ids), array("q", range(11)), array("q", [table[p // BLOCK] * BLOCK + p % BLOCK
                                                                         for p in range(11)]),
                      (0, 11), (11,), array("q", table), len(table), BLOCK)
    input_ids, positions, meta = batch.tensors()
    with torch.inference_mode():
        for rows, argmax, need_hidden in (([*range(11)], True, True), ([3, 10], True, False), ([10], False, True),
                                          ([2, 7], False, False)):
            hidden, logits, index = native.forward_logits(batch, pair.caches["fused"], rows, argmax, need_hidden)
            alone = native(input_ids, positions, pair.caches["fused"], meta)
            assert torch.equal(hidden, alone) if need_hidden else hidden is None
            expected, expected_index = head.forward_with_argmax(alone[rows].contiguous())
            if argmax:
                assert logits is None and index == expected_index
            else:
                assert torch.equal(logits, expected) and index is None
        with pytest.raises(ValueError, match="rows"):
            native.forward_logits(batch, pair.caches["fused"], [11], True, False)


def test_rejects_positions_outside_the_rotary_tables(backend, qwen3_ckpt):
    """The rotary rows are read by position from tables sized by the sequence lengths: a negative position, or one
    past what the tables hold, is refused before any memory is read."""
    pair = _Pair(qwen3_ckpt, backend)
    meta = AttentionMetadata(torch.tensor([0]), (0, 1), (1,), pair.tables[:1].contiguous(), BLOCK)
    for position in (-1, 1 << 20):
        with pytest.raises(ValueError, match="position"):
            pair.fused(torch.tensor([5]), torch.tensor([position]), pair.caches["fused"], meta)


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_engine_properties_hold_with_vector_attention(backend, vector_ckpt, kv):
    """The engine's properties with the AVX-512 decode kernel and the prefill tiles doing the attention (head_dim
    64 / 128), over either KV cache: batch == single, prefix cache on == off, chunked prefill == one shot, preempted
    == uninterrupted."""
    from fabrik import LLM, SamplingParams

    rng = torch.Generator().manual_seed(11)
    lengths = [40, 3, 70, 17, 1, 33]
    prompts = [{"prompt_token_ids": torch.randint(0, 500, (n,), generator=rng).tolist()} for n in lengths]
    prompts.append({"prompt_token_ids": prompts[2]["prompt_token_ids"][:50] + [5, 6, 7]})  # a shared prefix
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)

    def outputs(llm, batch):
        return [o.outputs[0] for o in llm.generate(batch, params)]

    def assert_same(a, b):
        """Equal greedy tokens. With the int8 cache a run may part from the other at a near tie only (top two within
        0.05 in both): a value one quantization step off moves the logits more than bf16 rounding does, and the
        linears' batch-dependent summation order (docs/kernels.md) then decides ties of this random model."""
        for x, y in zip(a, b, strict=True):
            if x.token_ids == y.token_ids:
                continue
            assert kv == "int8", (x.token_ids, y.token_ids)
            j = next(i for i, (u, v) in enumerate(zip(x.token_ids, y.token_ids)) if u != v)
            for lp in (x.logprobs[j], y.logprobs[j]):
                assert lp.top[0][1] - lp.top[1][1] < 0.05, (j, x.logprobs[j], y.logprobs[j])

    def run(**kw):
        llm = LLM(str(vector_ckpt), dtype="bfloat16", kernels=backend.name, kv_cache_dtype=kv, **kw)
        assert llm.engine.runner.model.native_forward is not None
        return llm

    base = run(kv_cache_memory_bytes=16 * 2**20)
    together = outputs(base, prompts)
    assert_same([outputs(base, [p])[0] for p in prompts], together)
    assert_same(outputs(run(kv_cache_memory_bytes=16 * 2**20, enable_prefix_caching=False), prompts), together)
    assert_same(outputs(run(kv_cache_memory_bytes=16 * 2**20, max_num_batched_tokens=16), prompts), together)
    per_block = 16 * kv_bytes_per_token(base.engine.runner.model.config, torch.bfloat16, kv)
    tight = run(kv_cache_memory_bytes=12 * per_block, block_size=16)
    assert tight.engine.num_blocks == 12
    assert_same(outputs(tight, prompts), together)
    assert tight.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("head_dim", [16, 24])
def test_int8_cache_on_the_portable_attention(backend, tmp_path, head_dim):
    # No AVX-512 attention for these shapes; head_dim 24 also takes the scalar quantizer of the KV writes.
    _check_int8_cache(make_checkpoint(tmp_path, "qwen3", head_dim=head_dim), backend)


def test_int8_cache_on_the_vector_attention(backend, vector_ckpt):
    _check_int8_cache(vector_ckpt, backend)


def _check_int8_cache(path, backend):
    """The native forward quantizes K and V into the int8 cache bit for bit as fabrik/models/kv_int8.py does (layer
    0 of a prompt sees identical inputs on both paths); its attention stays as close to the modules and to float32
    as with the bf16 cache."""
    pair = _Pair(path, backend, kv_cache_dtype="int8")
    a, b = _tokens(37, 8), _tokens(11, 9)
    pair.step([(0, 0, a)])
    assert pair.caches["fused"][0].dtype == torch.int8
    assert torch.equal(pair.caches["fused"][0], pair.caches["modules"][0])
    assert pair.caches["fused"][0].abs().sum() > 0  # the rows were written
    worst = {"fused": 0.0, "modules": 0.0}
    for i, chunks in enumerate([[(1, 0, b)], *[[(0, 37 + j, [3 + j]), (1, 11 + j, [4 + j])] for j in range(6)]]):
        out = pair.step(chunks)
        scale = out["modules"].abs().max()
        assert (out["fused"] - out["modules"]).abs().max() <= 0.05 * scale, chunks
        if i:
            for name in worst:
                worst[name] = max(worst[name], (out[name] - out["float32"]).abs().max().item())
    assert worst["fused"] <= 1.5 * worst["modules"] + 0.02, worst
