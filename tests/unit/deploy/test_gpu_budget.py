"""The GPU profiles on paper: the memory each model's weights, KV cache and
CUDA context take, against one 12 GB card, for TGI alone and with vLLM."""

from __future__ import annotations

from dataclasses import dataclass

from tests.harness.deploy import (
    env_of,
    flags,
    services,
)

# ---------------------------------------------------------------------------
# The GPU memory arithmetic of docs/deployment.md, on the compose flags
# ---------------------------------------------------------------------------

MiB = 1024 * 1024
CARD_MIB = 12_282  # a 12 GB card (RTX 4070 SUPER, 3060 12 GB) as nvidia-smi reports it
CUDA_CONTEXT_MIB = 350  # per process: CUDA, PyTorch and kernels (estimate; 300-500 seen)
FLASHINFER_WORKSPACE_MIB = 128  # TGI 3.3.5, layers/attention/flashinfer.py
CUDA_GRAPHS_MIB = 10  # graphs for batch sizes 1 and 2 (estimate)
GPTQ_BITS = 4 + 16 / 128 + 4 / 128  # int4 weight + fp16 scale and int4 zero per group of 128


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def weight_bytes(self) -> float:
        """GPTQ-int4 linear layers plus fp16 embeddings and lm_head."""
        per_layer = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        per_layer += 3 * self.hidden * self.intermediate
        return self.layers * per_layer * GPTQ_BITS / 8 + 2 * self.vocab * self.hidden * 2

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, fp16, every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    @property
    def prefill_bytes_per_token(self) -> int:
        """Peak fp16 activations of one prefill token (MLP in/out, residual)."""
        return 2 * (3 * self.intermediate + 3 * self.hidden)


QWEN2_7B = Shape(
    layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, vocab=152064
)
LLAMA31_8B = Shape(
    layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256
)


def test_model_shapes_give_the_documented_figures() -> None:
    assert QWEN2_7B.kv_bytes_per_token == 57_344  # 56 KiB
    assert LLAMA31_8B.kv_bytes_per_token == 131_072  # 128 KiB
    assert round(QWEN2_7B.weight_bytes / 1e9, 1) == 5.6  # the Hub's ~5.5-5.6 GB
    assert round(LLAMA31_8B.weight_bytes / 1e9, 1) == 5.7
    # The original guide's "< 7.5 GB for both" cannot hold: weights alone.
    assert (QWEN2_7B.weight_bytes + LLAMA31_8B.weight_bytes) / 1e9 > 11


def gpu_plan() -> dict[str, float]:
    """TGI's warm-up, replayed: each server sizes its KV cache as
    free_on_card - (1 - cuda_memory_fraction * TGI_WIGGLE_ROOM) * card,
    tgi-qwen2 first, then tgi-llama3 with what is left."""
    plan: dict[str, float] = {}
    used = 0.0
    for name, shape in (("tgi-qwen2", QWEN2_7B), ("tgi-llama3", LLAMA31_8B)):
        svc = services()[name]
        f = flags(svc["command"])
        fraction = float(f["cuda-memory-fraction"])
        wiggle = float(env_of(svc).get("TGI_WIGGLE_ROOM", "0.9"))
        prefill = int(f["max-batch-prefill-tokens"])
        fixed = (
            CUDA_CONTEXT_MIB
            + FLASHINFER_WORKSPACE_MIB
            + shape.weight_bytes / MiB
            + prefill * shape.prefill_bytes_per_token / MiB
        )
        ceiling = fraction * wiggle * CARD_MIB
        kv = ceiling - used - fixed
        plan[f"{name}.kv_tokens"] = kv * MiB / shape.kv_bytes_per_token
        plan[f"{name}.needs_tokens"] = max(int(f["max-total-tokens"]), prefill)
        # PyTorch's own cap, set_per_process_memory_fraction: all but the context.
        plan[f"{name}.torch_cap_left"] = fraction * CARD_MIB - (fixed - CUDA_CONTEXT_MIB + kv)
        used = ceiling + CUDA_GRAPHS_MIB
    plan["headroom_mib"] = CARD_MIB - used
    return plan


def test_gpu_profile_fits_one_12gb_card_on_paper() -> None:
    plan = gpu_plan()
    for name in ("tgi-qwen2", "tgi-llama3"):
        # TGI refuses to start when its KV cache holds less than max-total-tokens.
        assert plan[f"{name}.kv_tokens"] >= plan[f"{name}.needs_tokens"], plan
        assert plan[f"{name}.torch_cap_left"] > 0, plan
    assert plan["headroom_mib"] > 0, plan


def test_tgis_default_headroom_would_leave_llama3_no_kv_cache() -> None:
    """Why tgi-llama3 sets TGI_WIGGLE_ROOM: with TGI's 0.90 the last server
    holds back 10 % of the card (1.2 GB) and gets no KV cache at all."""
    svc = services()["tgi-llama3"]
    saved = dict(svc["environment"])
    try:
        svc["environment"].pop("TGI_WIGGLE_ROOM")
        assert gpu_plan()["tgi-llama3.kv_tokens"] < 0
    finally:
        svc["environment"].clear()
        svc["environment"].update(saved)


def vllm_plan() -> dict[str, float]:
    """vLLM takes gpu_memory_utilization x card for itself (weights,
    activations, CUDA context and the KV cache, which gets the rest); then
    tgi-llama3 warms up as in gpu_plan(), on what vLLM left."""
    f = flags(services()["vllm-qwen2"]["command"][1:])
    budget = float(f["gpu-memory-utilization"]) * CARD_MIB
    batched = int(f["max-num-batched-tokens"])
    fixed = (CUDA_CONTEXT_MIB + QWEN2_7B.weight_bytes / MiB
             + batched * QWEN2_7B.prefill_bytes_per_token / MiB)
    plan = {
        "vllm-qwen2.kv_tokens": (budget - fixed) * MiB / QWEN2_7B.kv_bytes_per_token,
        "vllm-qwen2.needs_tokens": int(f["max-model-len"]),
    }
    svc = services()["tgi-llama3"]
    t = flags(svc["command"])
    ceiling = float(t["cuda-memory-fraction"]) * float(env_of(svc)["TGI_WIGGLE_ROOM"]) * CARD_MIB
    prefill = int(t["max-batch-prefill-tokens"])
    fixed_llama = (CUDA_CONTEXT_MIB + FLASHINFER_WORKSPACE_MIB + LLAMA31_8B.weight_bytes / MiB
                   + prefill * LLAMA31_8B.prefill_bytes_per_token / MiB)
    kv = ceiling - budget - fixed_llama
    plan["tgi-llama3.kv_tokens"] = kv * MiB / LLAMA31_8B.kv_bytes_per_token
    plan["tgi-llama3.needs_tokens"] = max(int(t["max-total-tokens"]), prefill)
    plan["headroom_mib"] = CARD_MIB - ceiling - CUDA_GRAPHS_MIB
    return plan


def test_vllm_profile_fits_one_12gb_card_on_paper() -> None:
    plan = vllm_plan()
    for name in ("vllm-qwen2", "tgi-llama3"):
        # vLLM refuses to start when its KV cache cannot hold max-model-len.
        assert plan[f"{name}.kv_tokens"] >= plan[f"{name}.needs_tokens"], plan
    assert plan["headroom_mib"] > 0, plan
    # The figures docs/engines.md gives.
    assert round(plan["vllm-qwen2.kv_tokens"], -2) == 2_500
    assert round(plan["tgi-llama3.kv_tokens"], -2) == 1_900
