"""The seam of a resumed stream: how often greedy text resumed mid-stream
equals the uninterrupted text, over the CPU backend (llama.cpp + SmolLM2).

    .venv/bin/python -m tests.bench.resume_bench [--prompts 50]
        [--max-new-tokens 48] [--url URL] [--json FILE]

For each prompt (a user turn rendered with the model's chat template, as
the adapter renders it), one greedy stream runs uninterrupted; then, at a
token position drawn at random (seeded), the stream is taken as broken and
resumed the way the router and the adapter resume it: the prompt followed
by the text relayed so far, verbatim, with the rest of the token budget.
The figure is the share of prompts whose relayed text plus continuation
equals the uninterrupted text, and the token counts' agreement.
Without --url it starts `python -m services.cpu_backend` on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from pathlib import Path
from typing import Any

import aiohttp

from services.adapter.chat_template import ChatTemplate
from services.common.types import Message
from services.cpu_backend.settings import default_model_path
from tests.bench.cpu_backend_bench import sse_events
from tests.harness.procs import free_port, python_module, start, stop, wait_http

TOPICS = (
    "rainbows", "volcanoes", "bread", "tides", "bees", "glaciers", "compasses", "clouds",
    "bicycles", "coffee", "eclipses", "maps", "honey", "lighthouses", "salt", "thunder",
    "penguins", "paper", "magnets", "deserts", "owls", "trains", "cheese", "kites",
    "fireflies", "bridges", "tea", "coral", "snow", "windmills", "wolves", "clocks",
    "rivers", "violins", "mushrooms", "satellites", "sails", "forests", "candles", "whales",
    "batteries", "origami", "comets", "gardens", "printing", "caves", "elephants", "rice",
    "telescopes", "autumn",
)


async def stream(
    session: aiohttp.ClientSession, url: str, prompt: str, max_new: int
) -> tuple[list[str], str]:
    """The text of each token as the adapter relays it, and the finish reason."""
    payload = {"inputs": prompt, "parameters": {"max_new_tokens": max_new, "do_sample": False}}
    texts: list[str] = []
    finish = ""
    async with session.post(url + "/generate_stream", json=payload) as resp:
        async for event in sse_events(resp):
            token = event["token"]
            texts.append("" if token.get("special") else token["text"])
            if event.get("details"):
                finish = event["details"]["finish_reason"]
    return texts, finish


async def measure(url: str, count: int, max_new: int, seed: int) -> dict[str, Any]:
    template = ChatTemplate.load(_gguf())
    rng = random.Random(seed)
    same = same_tokens = 0
    misses: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for i in range(count):
            topic = TOPICS[i % len(TOPICS)]
            question = f"Tell me about {topic} in a few sentences."
            prompt = template.render([Message("user", question)])
            whole, _ = await stream(session, url, prompt, max_new)
            if len(whole) < 2:
                continue
            cut = rng.randrange(1, len(whole))
            relayed = "".join(whole[:cut])
            rest, _ = await stream(session, url, prompt + relayed, max_new - cut)
            expected = "".join(whole)
            resumed = relayed + "".join(rest)
            if resumed == expected:
                same += 1
            else:
                at = next((j for j, (a, b) in enumerate(zip(resumed, expected, strict=False))
                           if a != b), min(len(resumed), len(expected)))
                misses.append({"topic": topic, "cut": cut, "seam": len(relayed), "differs_at": at})
            same_tokens += cut + len(rest) == len(whole)
    return {"prompts": count, "same_text": same, "same_token_count": same_tokens,
            "max_new_tokens": max_new, "misses": misses}


def _gguf() -> Path:
    model = default_model_path()
    if model is None or not model.is_file():
        raise SystemExit("SmolLM2 GGUF not found: run scripts/install_llama_cpp.sh")
    return model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--url", default=None, help="an already running backend")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args, _ = parser.parse_known_args(argv)
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start(python_module("services.cpu_backend", "--port", str(port),
                                   "--threads", "1", "--log-level", "WARNING"))
        wait_http(url + "/health", timeout=120, proc=proc)
    try:
        figures = asyncio.run(measure(url, args.prompts, args.max_new_tokens, args.seed))
    finally:
        if proc is not None:
            stop(proc)
    print("Resumed greedy streams over the CPU backend (SmolLM2), cut at a random token:")
    print(f"  text equal to the uninterrupted text: {figures['same_text']}/{figures['prompts']}")
    print(f"  token count equal:                    "
          f"{figures['same_token_count']}/{figures['prompts']}")
    for miss in figures["misses"]:
        print(f"  differs: {miss}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
