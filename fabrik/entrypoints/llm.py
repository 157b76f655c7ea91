"""The offline Python API, shaped like vLLM's ``LLM`` on purpose: users know it."""

from __future__ import annotations

import itertools
from typing import Any, Sequence, Union

from fabrik.config import EngineConfig
from fabrik.engine.llm_engine import LLMEngine
from fabrik.kernels.openmp import release_openmp_threads
from fabrik.outputs import CompletionOutput, RequestOutput
from fabrik.sampling.params import SamplingParams

PromptType = Union[str, dict[str, Any], Sequence[int]]


class LLM:
    """Generate text for batches of prompts with one continuous-batching engine.

    Example:
        >>> llm = LLM(model="path/to/checkpoint", dtype="auto")
        >>> outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
        >>> outs[0].outputs[0].text
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        """Load a model.

        Args:
            model: Hugging Face model folder or hub id.
            **kwargs: any field of ``EngineConfig`` (dtype, max_model_len, max_num_seqs,
                max_num_batched_tokens, block_size, kv_cache_memory_bytes, enable_prefix_caching, seed, ...).
        """
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for each prompt; returns one ``RequestOutput`` per prompt, in order.

        A prompt is a string, ``{"prompt": str}``, ``{"prompt_token_ids": [...]}`` or a list of ids.
        """
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = self._params_for(len(prompts), sampling_params)
        outputs: dict[str, RequestOutput] = {}
        order: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list):
                text, ids = self._split_prompt(prompt)
                if ids is None:
                    ids = self.engine.encode_prompt(text)
                rid = str(next(self._ids))
                self.engine.add_request(rid, ids, params)
                outputs[rid] = RequestOutput(
                    request_id=rid, prompt=text, prompt_token_ids=ids,
                    outputs=[CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None)
                             for i in range(params.n)])
                order.append(rid)
            while self.engine.has_unfinished():
                for update in self.engine.step():
                    outputs[update.request_id].apply(update)
        except BaseException:
            for rid in order:
                self.engine.abort(rid)
            raise
        finally:
            # Calls may come from different threads (a web server's workers): each would keep an idle OpenMP pool,
            # which throttles the workers of whichever thread generates next. Starting a pool costs ~0.1 ms.
            release_openmp_threads()
        return [outputs[rid] for rid in order]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Render conversations with the model's chat template, then generate."""
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            text = self.engine.tokenizer.apply_chat_template(
                conversation, tools=tools, add_generation_prompt=add_generation_prompt,
                chat_template_kwargs=chat_template_kwargs)
            # The template already wrote any special tokens (bos) the model needs.
            prompts.append({"prompt_token_ids": self.engine.tokenizer.encode(text, add_special_tokens=False),
                            "prompt": text})
        return self.generate(prompts, sampling_params)

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's recommended values from generation_config.json."""
        return SamplingParams(**self.engine.sampling_defaults)

    def _params_for(self, n: int, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.default_sampling_params()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if len(sampling_params) != n:
            raise ValueError(f"got {len(sampling_params)} sampling params for {n} prompts")
        return list(sampling_params)

    @staticmethod
    def _split_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
        if isinstance(prompt, str):
            return prompt, None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], None
            raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        return None, list(prompt)
