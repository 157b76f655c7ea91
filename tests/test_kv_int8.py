"""The 8-bit KV cache (fabrik/models/kv_int8.py) on the torch path: the format, attention over it, the memory it
plans for, and a model's accuracy with it. The native kernels over it are tested in test_native_forward.py."""

from __future__ import annotations

import pytest
import torch

from fabrik import LLM, SamplingParams
from fabrik.config import EngineConfig
from fabrik.loader import load_model
from fabrik.model_config import load_model_config
from fabrik.models import kv_int8
from fabrik.models.attention import AttentionMetadata, kv_bytes_per_token, make_kv_caches, paged_attention
from test_models import dense_attention


def test_quantize_rows_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 72, generator=g) * torch.logspace(-3, 2, 50)[:, None]  # rows of very different sizes
    x[7] = 0
    values, scales = kv_int8.quantize_rows(x)
    assert values.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (50,)
    assert scales[7] == 0 and values[7].abs().sum() == 0  # a zero row reads back as zeros
    err = (values.float() * scales[:, None] - x).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()  # within half a step of its own row
    assert (values.abs().amax(dim=1)[torch.arange(50) != 7] == 127).all()  # each row's largest value is +-127


def _fill_cache(cache: torch.Tensor, keys, values, tables, block_size):
    """Writes every position of each sequence through kv_int8.write (as earlier steps would have)."""
    for table, k, v in zip(tables, keys, values):
        positions = range(k.shape[0])
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in positions], dtype=torch.int64)
        kv_int8.write(k, v, cache, slots, block_size)


@pytest.mark.parametrize("new", [[3, 6, 1], [1, 1, 1]], ids=["mixed", "decode"])
def test_paged_attention_over_int8_equals_dense_attention_over_the_rounded_rows(new):
    """Attention reads exactly the quantized rows (and is close to attention over the exact ones); unwritten bytes,
    even scales that read as NaN, never leak into it."""
    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim, block_size, scale = 6, 2, 8, 4, 0.3
    cached = [5, 0, 9]
    tables = [[7, 2], [11, 0], [3, 14, 5]]
    cache = torch.randint(-128, 128, kv_int8.int8_kv_shape(16, num_kv_heads, block_size, head_dim), dtype=torch.int8)
    cache.view(-1)[3::7] = -1  # 0xff bytes: scales of NaN in places
    keys = [torch.randn(c + n, num_kv_heads, head_dim) for c, n in zip(cached, new)]
    values = [torch.randn(c + n, num_kv_heads, head_dim) for c, n in zip(cached, new)]
    queries = [torch.randn(n, num_heads, head_dim) for n in new]
    _fill_cache(cache, [k[:c] for k, c in zip(keys, cached)], [v[:c] for v, c in zip(values, cached)], tables,
                block_size)
    slots, starts = [], [0]
    for table, c, n in zip(tables, cached, new):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(c, c + n)]
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(torch.tensor(slots), tuple(starts), tuple(c + n for c, n in zip(cached, new)),
                             torch.tensor([t + [0] * (3 - len(t)) for t in tables]), block_size)
    out = paged_attention(torch.cat(queries), torch.cat([k[c:] for k, c in zip(keys, cached)]),
                          torch.cat([v[c:] for v, c in zip(values, cached)]), cache, meta, scale)

    def rounded(x):
        q, s = kv_int8.quantize_rows(x.reshape(-1, head_dim))
        return (q.float() * s[:, None]).reshape(x.shape)

    expected = torch.cat([dense_attention(q, rounded(k), rounded(v), scale) for q, k, v in zip(queries, keys, values)])
    exact = torch.cat([dense_attention(q, k, v, scale) for q, k, v in zip(queries, keys, values)])
    assert torch.isfinite(out).all()
    assert (out - expected).abs().max() <= 1e-5
    assert (out - exact).abs().max() <= 0.05


def test_int8_cache_holds_twice_the_tokens(qwen3_ckpt):
    """The memory planner sizes the cache by its bytes per token: D + 4 bytes per row instead of 2 D (bf16)."""
    config = load_model_config(qwen3_ckpt)
    d = config.head_dim
    assert kv_bytes_per_token(config, torch.bfloat16, "int8") == \
        2 * config.num_hidden_layers * config.num_key_value_heads * (d + 4)
    budget = 4 * 2**20
    engines = {kv: LLM(str(qwen3_ckpt), dtype="bfloat16", kv_cache_memory_bytes=budget, kv_cache_dtype=kv).engine
               for kv in ("auto", "int8")}
    blocks = {kv: e.num_blocks for kv, e in engines.items()}
    bs = engines["int8"].block_manager.block_size
    assert blocks["int8"] == budget // (bs * kv_bytes_per_token(config, torch.bfloat16, "int8"))
    assert blocks["int8"] > 1.5 * blocks["auto"]
    cache = engines["int8"].runner.kv_caches[0]
    assert cache.dtype == torch.int8 and cache.numel() == blocks["int8"] * bs * kv_bytes_per_token(
        config, torch.bfloat16, "int8") // config.num_hidden_layers


def _prefill_logits(model, config, ids, kv_cache_dtype):
    n, block_size = len(ids), 16
    blocks = -(-n // block_size)
    caches = make_kv_caches(config, blocks, block_size, torch.float32, kv_cache_dtype)
    meta = AttentionMetadata(torch.arange(n), (0, n), (n,), torch.arange(blocks)[None], block_size)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), caches, meta))


def test_model_with_int8_cache_is_close_to_float32(qwen3_ckpt, capsys):
    """Teacher-forced over 96 positions (every position attends to quantized keys and values): the logit error and
    top-1 agreement against the same float32 model with a float32 cache (measured: ~1.5% and ~98%)."""
    config = load_model_config(qwen3_ckpt)
    model = load_model(qwen3_ckpt, config, torch.float32)
    ids = torch.randint(0, 500, (96,), generator=torch.Generator().manual_seed(4)).tolist()
    reference = _prefill_logits(model, config, ids, "auto")
    logits = _prefill_logits(model, config, ids, "int8")
    err = ((logits - reference).abs().max() / reference.abs().max()).item()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    with capsys.disabled():
        print(f"\nint8 KV cache: logit error {err:.2e} of the largest, top-1 agreement {top1:.0%}")
    assert err <= 0.05 and top1 >= 0.9, (err, top1)


def test_engine_properties_hold_on_the_torch_path(qwen3_ckpt):
    """float32 model, torch kernels, int8 cache: batch == single, and preempted == uninterrupted."""
    rng = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(0, 500, (n,), generator=rng).tolist()} for n in (30, 5, 47, 12)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    def tokens(llm, batch):
        return [o.outputs[0].token_ids for o in llm.generate(batch, params)]

    llm = LLM(str(qwen3_ckpt), kv_cache_dtype="int8", kv_cache_memory_bytes=4 * 2**20)
    assert llm.engine.runner.kernel_backend == "torch"
    together = tokens(llm, prompts)
    assert [tokens(llm, [p])[0] for p in prompts] == together
    per_block = 16 * kv_bytes_per_token(llm.engine.model_config, torch.float32, "int8")
    tight = LLM(str(qwen3_ckpt), kv_cache_dtype="int8", kv_cache_memory_bytes=8 * per_block)
    assert tokens(tight, prompts) == together
    assert tight.engine.scheduler.num_preemptions > 0


def test_bad_kv_cache_dtypes_are_refused(qwen3_ckpt, tmp_path):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(model="m", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        make_kv_caches(load_model_config(qwen3_ckpt), 4, 16, torch.bfloat16, "int4")
    from checkpoints import make_scripted_checkpoint

    scripted = make_scripted_checkpoint(tmp_path / "scripted", [5, 6], 1)
    with pytest.raises(ValueError, match="not supported by ScriptedForCausalLM"):
        LLM(str(scripted), kv_cache_dtype="int8")


def test_cli_passes_the_kv_cache_dtype():
    import argparse

    from fabrik.entrypoints.cli import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args("m", parser.parse_args(["--kv-cache-dtype", "int8"])).kv_cache_dtype == "int8"
    assert engine_config_from_args("m", parser.parse_args([])).kv_cache_dtype == "auto"
