"""Native linear kernels: each kernel against torch on odd shapes, the int8 and int4 formats against their own
reference, the backend switch and its fallbacks, and a whole model run through the engine on each backend."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import fabrik.kernels as kernels
import fabrik.sampling.sampler as sampler_module
from fabrik import LLM, SamplingParams
from fabrik.kernels import KernelBackend, NativeBackend, TorchBackend, apply_kernels, select_backend
from fabrik.kernels.linear import GROUP, int8_reference, quantize, quantize_int4, quantize_int8
from fabrik.kernels.native import ISA_AVX2, ISA_AVX512, KernelBuildError, build
from native_backends import BEST_ISA, NATIVE_NAMES

SHAPES = [(1, 1), (37, 70), (100, 129), (64, 64), (33, 200), (130, 1000)]  # (N, K): padded rows and K
BATCHES = [1, 2, 7, 9, 17, 64]  # tiles: 8 rows (bf16 AVX-512), 6 (int8 AVX-512), 4 (AVX2)


@pytest.fixture(params=NATIVE_NAMES or [pytest.param("none", marks=pytest.mark.skip("no native kernels here"))])
def native(request) -> NativeBackend:
    backend = select_backend(request.param)
    assert backend.name == request.param
    return backend


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude of ``expected``."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30))


def _case(n: int, k: int, m: int, seed: int, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    return w, b, x


@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_matches_torch(native, n, k):
    for m in BATCHES:
        w, b, x = _case(n, k, m, seed=n * 1000 + k + m, bias=m % 2 == 1)
        layer = native.linear(w, b, None)
        # bf16 in, bf16 out, like the engine: within the rounding of the bf16 output of torch's own F.linear.
        ours = layer(x)
        theirs = F.linear(x, w, None if b is None else b.to(torch.bfloat16))
        assert ours.dtype == torch.bfloat16 and ours.shape == (m, n)
        err = _rel_err(ours, theirs)
        assert err <= 1e-2, f"M={m} N={n} K={k}: bf16 relative error {err:.2e} > 1e-2"
        # float32 out against float64 on the same bf16 operands: only the fp32 accumulation order differs.
        exact = F.linear(x.double(), w.double(), None if b is None else b.double())
        err = _rel_err(native.linear(w, b, None, out_dtype=torch.float32)(x), exact)
        assert err <= 1e-5, f"M={m} N={n} K={k}: fp32-out relative error {err:.2e} > 1e-5"


def test_bf16_float32_input_and_leading_dims(native):
    w, b, _ = _case(48, 96, 1, seed=1)
    x = torch.randn(2, 3, 96)
    ours = native.linear(w, b, None)(x)  # (2, 3, 48) float32
    assert ours.shape == (2, 3, 48) and ours.dtype == torch.float32
    # AVX-512 rounds float32 x to bf16 pairs, AVX2 keeps it float32: both within bf16 rounding of x.
    err = _rel_err(ours, F.linear(x.double(), w.double(), b.double()))
    assert err <= 1e-2, f"relative error {err:.2e} > 1e-2"
    assert native.linear(w, b, None)(torch.empty(0, 96)).shape == (0, 48)


def test_int8_quantization_round_trip():
    w = torch.randn(37, 70) * torch.logspace(-3, 1, 70)  # columns of very different size across groups
    q, scale = quantize_int8(w)
    assert q.shape == (37, 128) and scale.shape == (37, 4) and scale.dtype == torch.float16
    assert int(q.abs().max()) <= 127 and not q[:, 70:].any()
    deq = (q.float().view(37, 4, GROUP) * scale.float()[..., None]).view(37, 128)[:, :70]
    bound = scale.float().repeat_interleave(GROUP, dim=1)[:, :70] * 0.5 * (1 + 1e-3)
    assert bool(((deq - w).abs() <= bound).all()), f"largest error {float((deq - w).abs().max()):.3e}"


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_quantization_round_trip(group):
    k, k_pad = 70 + 2 * group, 2 * group + 128  # two whole groups, then a partial one (padded)
    w = torch.randn(37, k) * torch.logspace(-3, 1, k)
    w[0, :group] = -w[0, :group].abs()  # a group whose largest magnitude is negative: scale > 0
    q, scale = quantize_int4(w, group)
    assert q.shape == (37, k_pad) and scale.shape == (37, k_pad // group) and scale.dtype == torch.float16
    assert int(q.min()) >= -8 and int(q.max()) <= 7 and not q[:, k:].any()
    deq = (q.float().view(37, -1, group) * scale.float()[..., None]).view(37, k_pad)[:, :k]
    # Half a step of rounding, or one whole step where +8 was clipped to 7 (a weight near minus the extreme).
    steps = torch.where(q[:, :k] == 7, 1.0, 0.5)
    bound = scale.float().abs().repeat_interleave(group, dim=1)[:, :k] * steps * (1 + 1e-2)
    assert bool(((deq - w).abs() <= bound).all()), f"largest error {float((deq - w).abs().max()):.3e}"
    # Q4_0's rule: the largest magnitude of each group is q = -8 exactly (up to the fp16 rounding of its scale).
    groups = w[:, :2 * group].reshape(37, 2, group)
    picked = q[:, :2 * group].reshape(37, 2, group).gather(-1, groups.abs().argmax(-1, keepdim=True))
    assert bool((picked == -8).all())
    with pytest.raises(ValueError, match="group size 16"):
        quantize_int4(w, 16)


# int4 rounds each weight by up to half of 1/8 of its group's largest magnitude: the error bound is ~16x int8's.
_QUANT_BOUNDS = {"int8": 3e-2, "int4": 3e-1, "int4-g64": 3e-1, "int4-g128": 3e-1}


@pytest.mark.parametrize("fmt", sorted(_QUANT_BOUNDS))
@pytest.mark.parametrize("n,k", SHAPES)
def test_quantized_matches_reference(native, fmt, n, k):
    bound = _QUANT_BOUNDS[fmt]
    for m in BATCHES:
        w, b, x = _case(n, k, m, seed=7 * n + k + m, bias=m % 2 == 0)
        q, scale = quantize(w, fmt)
        expected = int8_reference(x, q, scale, b)
        ours = native.linear(w, b, fmt, out_dtype=torch.float32)(x)
        err = _rel_err(ours, expected)
        assert err <= 1e-5, f"M={m} N={n} K={k}: {fmt} vs its reference: relative error {err:.2e} > 1e-5"
        unquantized = F.linear(x.double(), w.double(), None if b is None else b.double())
        err = _rel_err(native.linear(w, b, fmt)(x), unquantized)  # bf16 out
        assert err <= bound, f"M={m} N={n} K={k}: {fmt} vs unquantized: relative error {err:.2e} > {bound}"


@pytest.mark.parametrize("fmt", sorted(_QUANT_BOUNDS))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_quantized_extremes_do_not_saturate(native, fmt, sign):
    """The AVX2 kernels add byte products in 16 bits (vpmaddubsw): the largest sums they can meet, every weight at the
    end of its range (int4 stored 15 and 0, int8 +-127) against every x at +-127, still match the reference."""
    n, k = 33, 256
    w = torch.full((n, k), 7.0)
    w[:, ::32] = -8.0  # each group's largest magnitude: q = -8, so the 7s are q = 7 (int4: stored 15), 111 (int8)
    w[1::2] *= -1  # int4: the same q (the scale changes sign); int8: -111 and 127
    w[2] = 1.0  # int4: q = -8 everywhere (stored 0); int8: q = 127 everywhere
    w[3] = -1.0
    x = torch.full((4, k), sign).to(torch.bfloat16)  # x_q = +-127 everywhere
    x[1, 1::2] *= -1
    q, scale = quantize(w.to(torch.bfloat16), fmt)
    ours = native.linear(w.to(torch.bfloat16), None, fmt, out_dtype=torch.float32)(x)
    err = _rel_err(ours, int8_reference(x, q, scale, None))
    assert err <= 1e-5, f"{fmt}: relative error {err:.2e} > 1e-5 (a 16-bit sum saturated or wrapped?)"


@pytest.mark.parametrize("fmt", sorted(_QUANT_BOUNDS))
def test_torch_quantized_matches_reference(fmt):
    w, b, x = _case(70, 100, 5, seed=3)
    q, scale = quantize(w, fmt)
    ours = TorchBackend().linear(w, b, fmt, out_dtype=torch.float32)(x)
    err = _rel_err(ours, int8_reference(x, q, scale, b))
    assert err <= 1e-5, f"relative error {err:.2e} > 1e-5"


def test_select_backend_names(monkeypatch):
    monkeypatch.setenv("FABRIK_KERNELS", "torch")
    assert isinstance(select_backend(), TorchBackend)
    with pytest.raises(ValueError, match="cuda"):
        select_backend("cuda")
    monkeypatch.setenv("FABRIK_KERNELS", "auto")
    expected = {ISA_AVX512: "native-avx512", ISA_AVX2: "native-avx2", None: "torch"}[BEST_ISA]
    assert select_backend().name == expected


def test_build_failure_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("FABRIK_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(KernelBuildError, match="no-such-compiler"):
        build()

    def broken(isa):
        raise KernelBuildError("compiler exploded")

    monkeypatch.setattr(kernels, "_native_backend", broken)
    assert isinstance(select_backend("auto"), TorchBackend)
    with pytest.raises(RuntimeError, match="compiler exploded"):
        select_backend("native")


def test_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("FABRIK_KERNEL_CACHE", str(tmp_path))
    first = build()
    assert first.is_file() and first.parent.parent == tmp_path
    mtime = first.stat().st_mtime_ns
    assert build() == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    assert not list(first.parent.glob("*.tmp"))


BF16_TIE = 0.25
"""bf16 logits carry ~0.1-0.4 of rounding noise (see test_engine.py): a closer top two is a coin toss."""


def _greedy(path, kernels: str, quantization: str | None, prompts):
    """Greedy outputs (32 tokens, top-2 logprobs) of ``fabrik.LLM`` in bf16 on the ``kernels`` backend."""
    llm = LLM(str(path), dtype="bfloat16", kv_cache_memory_bytes=8 * 2**20, kernels=kernels,
              quantization=quantization)
    assert llm.engine.runner.kernel_backend == kernels
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0] for o in outputs]


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(500) for _ in range(length)] for length in (1, 5, 12, 30, 64, 100)]


_TORCH_OUTPUTS: dict[str, list] = {}
"""The torch backend's outputs per checkpoint fixture, shared by the native backends' runs."""


@pytest.fixture
def one_thread():
    """Runs torch on one thread: on a shared 2-core machine a second thread can stall each step by milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["qwen3_ckpt", "qwen3_untied_ckpt"])
def test_model_native_matches_torch(native, one_thread, request, kind):
    path = request.getfixturevalue(kind)
    prompts = _prompts()
    if kind not in _TORCH_OUTPUTS:
        _TORCH_OUTPUTS[kind] = _greedy(path, "torch", None, prompts)
    reference = _TORCH_OUTPUTS[kind]
    ours = _greedy(path, native.name, None, prompts)
    for prompt, a, ref in zip(prompts, ours, reference):
        i = next((i for i, (x, y) in enumerate(zip(a.token_ids, ref.token_ids)) if x != y), len(ref.token_ids))
        if i < len(ref.token_ids):
            # Diverging is only acceptable where torch's own top two logits are within bf16 noise.
            top = dict(ref.logprobs[i].top)
            gap = top[ref.token_ids[i]] - top.get(a.token_ids[i], float("-inf"))
            assert gap < BF16_TIE, (f"prompt of {len(prompt)} tokens diverges at token {i} where torch prefers "
                                    f"its token by {gap:.3f} >= {BF16_TIE}")
    # Past a tie the two continuations differ, so compare them teacher-forced too: fed torch's own tokens, the
    # native path must pick torch's token at every position where torch's choice is not a bf16 coin toss.
    llm = LLM(str(path), dtype="bfloat16", kv_cache_memory_bytes=8 * 2**20, kernels=native.name)
    forced = llm.generate([{"prompt_token_ids": p + r.token_ids} for p, r in zip(prompts, reference)],
                          SamplingParams(max_tokens=1, prompt_logprobs=1))
    checked = 0
    for prompt, ref, out in zip(prompts, reference, forced):
        for i, (token, lp) in enumerate(zip(ref.token_ids, ref.logprobs)):
            top = lp.top
            if top[0][1] - top[1][1] >= BF16_TIE:
                checked += 1
                ours_top = out.prompt_logprobs[len(prompt) + i].top[0][0]
                assert ours_top == token, f"prompt of {len(prompt)} tokens, position {i}: {ours_top} != {token}"
    assert checked >= 100, f"only {checked} positions were clear of bf16 ties"


def _prefill_logits(model, config, ids: list[int]) -> torch.Tensor:
    """(T, vocab) float32 logits of every position of one prompt, run as a single prefill."""
    from fabrik.models.attention import AttentionMetadata, kv_cache_shape

    n, block_size = len(ids), 16
    blocks = (n + block_size - 1) // block_size
    caches = [torch.zeros(kv_cache_shape(config, blocks, block_size))
              for _ in range(config.num_hidden_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(n), query_start_loc=(0, n), seq_lens=(n,),
                             block_tables=torch.arange(blocks)[None], block_size=block_size)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), caches, meta))


# This tiny random model (hidden 64) is hard on quantization: int8 lands at ~3.5% / 96%, int4 at ~42% / 43% (its step
# is 16x coarser); a wrong nibble or scale would give ~100% and chance agreement (0.2%).
@pytest.mark.parametrize("quantization,max_err,min_top1", [("int8", 5e-2, 0.9), ("int4", 6e-1, 0.3),
                                                         ("int4-g128", 6e-1, 0.3)])
@pytest.mark.parametrize("backend", [*NATIVE_NAMES, "torch"])
def test_model_quantized_close_to_float32(backend, qwen3_ckpt, quantization, max_err, min_top1):
    from fabrik.loader import load_model
    from fabrik.model_config import load_model_config

    config = load_model_config(qwen3_ckpt)
    ids = _prompts()[-1]
    reference = _prefill_logits(load_model(qwen3_ckpt, config, torch.float32), config, ids)  # (T, vocab)
    quantized = apply_kernels(load_model(qwen3_ckpt, config, torch.float32), backend, quantization)
    logits = _prefill_logits(quantized, config, ids)
    err = _rel_err(logits, reference)
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"{quantization} on {backend}: logit error {err:.2e} of the largest, top-1 agreement {top1:.0%}")
    assert err <= max_err and top1 >= min_top1, \
        f"{quantization} model: logit error {err:.2e} of the largest, top-1 agreement {top1:.0%}"


def test_torch_backend_leaves_model_alone(qwen3_ckpt):
    from fabrik.loader import load_model
    from fabrik.model_config import load_model_config

    model = load_model(qwen3_ckpt, load_model_config(qwen3_ckpt), torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert apply_kernels(model, "torch", None) is model
    assert [m for m in model.modules() if isinstance(m, torch.nn.Linear)] == linears


@pytest.mark.parametrize("quantization", [None, "int8", "int4", "int4-g128"])
def test_engine_properties_hold_on_the_native_path(native, qwen3_ckpt, quantization):
    """Batch equals single and prefix cache on equals off, with the native kernels doing the matmuls."""
    backend = native
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def run(**kw):
        llm = LLM(str(qwen3_ckpt), dtype="bfloat16", kv_cache_memory_bytes=8 * 2**20, kernels=backend.name,
                  quantization=quantization, **kw)
        assert llm.engine.runner.kernel_backend == backend.name
        assert llm.engine.runner.model.native_forward is not None  # the whole stack runs natively, not module by module
        return llm

    llm = run()
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone
    no_cache = run(enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in no_cache.generate(prompts, params)] == together


def test_release_mapped_pages_keeps_values_and_spares_ordinary_memory(tmp_path):
    from safetensors.torch import safe_open, save_file

    from fabrik.kernels.memory import release_mapped_pages

    save_file({"w": torch.arange(3 * 2**20, dtype=torch.float32)}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        mapped = f.get_tensor("w")
    before = mapped.clone()
    assert release_mapped_pages([mapped]) > 0  # file-backed: its pages are dropped ...
    assert torch.equal(mapped, before)  # ... and fault back in with the same bytes
    ordinary = torch.ones(2**20)
    assert release_mapped_pages([ordinary]) == 0 and bool((ordinary == 1).all())


def test_engine_config_names_a_bad_quantization():
    from fabrik.config import KERNEL_BACKENDS, QUANTIZATIONS, EngineConfig
    from fabrik.kernels import BACKEND_NAMES
    from fabrik.kernels.linear import FORMATS

    assert QUANTIZATIONS == ("int8", "int4", "int4-g64", "int4-g128") and set(QUANTIZATIONS) <= set(FORMATS)
    for name in QUANTIZATIONS:
        assert EngineConfig(model="m", quantization=name).quantization == name
    with pytest.raises(ValueError, match="'int4-g32'"):
        EngineConfig(model="m", quantization="int4-g32")
    assert BACKEND_NAMES == KERNEL_BACKENDS and "torch" in KERNEL_BACKENDS
    with pytest.raises(ValueError, match="'cuda'"):
        EngineConfig(model="m", kernels="cuda")


def _first_max(out: torch.Tensor) -> list[int]:
    """Per row: the first index of its maximum, -1 for a row holding NaN (the argmax contract of greedy sampling)."""
    return [-1 if bool(row.isnan().any()) else int(torch.nonzero(row == row.max())[0]) for row in out]


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int4-g128"])
@pytest.mark.parametrize("n", [1, 37, 130, 1000])
def test_linear_argmax_in_passing(native, fmt, n):
    """The LM head's argmax found while it stores the logits: the logits are the plain call's bits, and the index is
    each row's first maximum of them, -1 for a NaN row, 0 for a row of -inf: on random rows, rows of many ties (x = 0:
    the bias alone), a NaN in the bias, and a bias of -inf."""
    quantization = None if fmt == "bf16" else fmt
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, 64, generator=g).to(torch.bfloat16)
    ties = torch.randint(0, 3, (n,), generator=g).float()
    nan = torch.randn(n, generator=g)
    nan[n // 2] = float("nan")
    for bias in (torch.randn(n, generator=g), ties, nan, torch.full((n,), float("-inf"))):
        layer = native.linear(w, bias, quantization, out_dtype=torch.float32)
        for m in BATCHES:
            x = torch.randn(m, 64, generator=g).to(torch.bfloat16)
            x[::3] = 0  # these rows are the bias alone
            out, index = layer.forward_with_argmax(x)
            assert torch.equal(out.view(torch.int32), layer(x).view(torch.int32)), f"M={m}: not the plain call's bits"
            assert index == _first_max(out), f"M={m}, bias {bias[:4]}"
    with pytest.raises(ValueError, match="float32"):
        native.linear(w, None, quantization).forward_with_argmax(x)


@pytest.mark.parametrize("dtype,quantization", [("bfloat16", None), ("float32", "int8")])
def test_greedy_steps_take_the_lm_heads_argmax(qwen3_ckpt, dtype, quantization, monkeypatch):
    """Greedy rows sample the LM head kernel's argmax (the sampler's own is never called) and get the tokens the
    sampler's full path picks from the same logits (asking for logprobs takes that path): with the head in the native
    forward's call (bf16), and beside the module-by-module forward (a float32 model with int8 linears)."""
    backend = select_backend("auto")
    if backend.name == "torch":
        pytest.skip("no native kernels on this CPU")
    llm = LLM(str(qwen3_ckpt), dtype=dtype, kv_cache_memory_bytes=8 * 2**20, kernels=backend.name,
              quantization=quantization)
    assert (llm.engine.runner.model.native_forward is None) == (dtype == "float32")
    prompts = [{"prompt_token_ids": p} for p in _prompts()]

    def refuse(logits):
        raise AssertionError("the sampler's argmax ran")

    with monkeypatch.context() as patch:
        patch.setattr(sampler_module, "_argmax", refuse)
        fused = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    full = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0))
    assert [o.outputs[0].token_ids for o in fused] == [o.outputs[0].token_ids for o in full]
