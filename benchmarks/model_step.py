"""Times the GSPO training step and greedy KV-cache decoding of Qwen3: ours (JAX) vs PyTorch.

Training step (both sides the same workload): forward over `[batch, seq]` tokens, per-token
log-probs, GSPO sequence ratios over a response mask, the clipped objective, backward, AdamW.
Ours uses `vimrag_jax.sampling.sequence_logprobs` and `vimrag_jax.rl.ggpo.policy_objective`
(preset "gspo") under one `jax.jit` with the train state donated; the baseline is transformers'
`Qwen3ForCausalLM` (PyTorch CPU, SDPA attention) with the same objective written in torch.

Decode: `Sampler.generate` (greedy, batch 8, prompt 128, 128 new tokens, EOS off) against
transformers' `generate` with the same settings. Prefill is included on both sides.

Both sides run with the same glibc malloc setting: by default the transparent huge pages our
entry points re-execute themselves with (`vimrag_jax.host_memory`), `--huge-pages=off` for
glibc's default 4 KiB pages on both.

Each measurement runs in its own subprocess pinned to the same `--cpus` (CPU ids), so the peak
resident memory (`ru_maxrss` of that process, imports included) belongs to one side only. The
sides alternate (ours, theirs, ours, theirs, ...) so a machine whose load drifts hurts both.

    python benchmarks/model_step.py [--rounds 3] [--steps 3] [--cpus 0,1] [--what step,decode]
        [--huge-pages on|off]

`--threads` (torch's intra-op thread count) defaults to the number of `--cpus`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

CONFIG = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    max_position_embeddings=4096,
    rope_theta=10_000.0,
    tie_word_embeddings=False,
)
PROMPT_LEN = 256  # training rows: the first 256 tokens are prompt, the rest response
CLIP_LOW, CLIP_HIGH, LEARNING_RATE = 3e-4, 4e-4, 1e-6


def _training_data(batch: int, seq: int):
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG["vocab_size"], size=(batch, seq)).astype(np.int32)
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, PROMPT_LEN:] = True
    advantage = rng.standard_normal(batch).astype(np.float32)
    return tokens, loss_mask, advantage


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- ours ---------------------------------------------------------------------------


def jax_step(batch: int, seq: int, steps: int, remat: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from vimrag_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
    from vimrag_jax.rl.ggpo import policy_objective
    from vimrag_jax.rl.losses import LossConfig
    from vimrag_jax.sampling import sequence_logprobs

    config = Qwen3Config(
        **{k: v for k, v in CONFIG.items() if k != "max_position_embeddings"}, remat=remat
    )
    model = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=0.01)
    loss_config = LossConfig.for_algorithm("gspo", clip_low=CLIP_LOW, clip_high=CLIP_HIGH)
    tokens, loss_mask, advantage = _training_data(batch, seq)

    @jax.jit
    def behavior(params, tokens):
        return sequence_logprobs(nnx.merge(graphdef, params), tokens)

    data = {
        "tokens": jnp.asarray(tokens),
        "loss_mask": jnp.asarray(loss_mask),
        "behavior_logprobs": behavior(params, tokens),
        "segment_valid": jnp.ones((batch,), bool),
        "segment_node": jnp.zeros((batch,), jnp.int32),
        "advantage": jnp.asarray(advantage),
        "reward": jnp.asarray(advantage > 0, jnp.float32),
    }

    def loss_fn(params, data):
        logp = sequence_logprobs(nnx.merge(graphdef, params), data["tokens"])
        return policy_objective(logp, data, loss_config)[0]

    def train_step(params, opt_state, data):
        loss, grads = jax.value_and_grad(loss_fn)(params, data)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    opt_state = optimizer.init(params)
    start = time.perf_counter()
    params, opt_state, loss = train_step(params, opt_state, data)
    loss.block_until_ready()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        params, opt_state, loss = train_step(params, opt_state, data)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    return {"seconds": times, "first_call_s": compile_s, "loss": float(loss)}


def jax_decode(batch: int, prompt: int, new: int, steps: int) -> dict:
    import numpy as np
    from flax import nnx

    from vimrag_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
    from vimrag_jax.sampling import Sampler

    config = Qwen3Config(**{k: v for k, v in CONFIG.items() if k != "max_position_embeddings"})
    model = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0))
    sampler = Sampler(
        model,
        max_prompt_len=prompt,
        max_new_tokens=new,
        eos_token_ids=(),
        pad_token_id=0,
        batch_buckets=(batch,),
        length_buckets=(prompt,),
    )
    prompts = np.random.default_rng(0).integers(1, CONFIG["vocab_size"], size=(batch, prompt))
    prompts = prompts.tolist()
    start = time.perf_counter()
    sampler.generate(prompts, greedy=True)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = sampler.generate(prompts, greedy=True)
        times.append(time.perf_counter() - start)
    assert all(len(c.tokens) == new for c in out)
    return {"seconds": times, "first_call_s": compile_s}


# --- theirs -------------------------------------------------------------------------


def _torch_model():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3Config(**CONFIG, attn_implementation="sdpa")
    return transformers.Qwen3ForCausalLM(config)


def torch_step(batch: int, seq: int, steps: int) -> dict:
    import torch

    model = _torch_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    tokens, loss_mask, advantage = _training_data(batch, seq)
    tokens = torch.from_numpy(tokens).long()
    mask = torch.from_numpy(loss_mask[:, 1:]).float()
    advantage = torch.from_numpy(advantage)

    def logprobs():
        logits = model(input_ids=tokens).logits[:, :-1].float()
        picked = torch.gather(logits, -1, tokens[:, 1:, None])[..., 0]
        return picked - torch.logsumexp(logits, dim=-1)

    with torch.no_grad():
        old = logprobs()

    def step():
        optimizer.zero_grad(set_to_none=True)
        log_ratio = ((logprobs() - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH)
        loss = -torch.minimum(ratio * advantage, clipped * advantage).mean()
        loss.backward()
        optimizer.step()
        return float(loss)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return {"seconds": times, "first_call_s": first, "loss": loss}


def torch_decode(batch: int, prompt: int, new: int, steps: int) -> dict:
    import numpy as np
    import torch

    model = _torch_model().eval()
    prompts = np.random.default_rng(0).integers(1, CONFIG["vocab_size"], size=(batch, prompt))
    input_ids = torch.from_numpy(prompts).long()
    kwargs = dict(
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(input_ids, **kwargs)
        first = time.perf_counter() - start
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model.generate(input_ids, **kwargs)
            times.append(time.perf_counter() - start)
    assert out.shape == (batch, prompt + new)
    return {"seconds": times, "first_call_s": first}


# --- driver -------------------------------------------------------------------------


def _child(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, _cpu_ids(args.cpus))
    if args.side == "torch":
        import torch

        torch.set_num_threads(args.threads)
    if args.measure == "step" and args.side == "jax":
        result = jax_step(args.batch, args.seq, args.steps, args.remat)
    elif args.measure == "step":
        result = torch_step(args.batch, args.seq, args.steps)
    elif args.side == "jax":
        result = jax_decode(args.decode_batch, args.prompt, args.new, args.steps)
    else:
        result = torch_decode(args.decode_batch, args.prompt, args.new, args.steps)
    result["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(result))


def _cpu_ids(cpus: str) -> set[int]:
    """The CPU ids of a comma list such as "0,1"."""
    return {int(cpu) for cpu in cpus.split(",") if cpu.strip()}


def _host_environment(huge_pages: str) -> dict[str, str]:
    """Both sides' environment: CPU only, no XLA flags, and the same glibc malloc setting."""
    from vimrag_jax import host_memory

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.pop("GLIBC_TUNABLES", None)
    if huge_pages == "off":
        return env
    thp, glibc = host_memory.thp_mode(), host_memory.glibc_version()
    with_huge_pages = host_memory.huge_page_environment(env, thp=thp, glibc=glibc)
    if with_huge_pages is None:
        print(f"  (huge pages unavailable here: THP mode {thp}, glibc {glibc}; both sides without)")
    return with_huge_pages or env


def _run_child(args: argparse.Namespace, side: str, measure: str) -> dict:
    command = [sys.executable, __file__, "--child", "--side", side, "--measure", measure]
    for name in ("cpus", "threads", "steps", "batch", "seq", "decode_batch", "prompt", "new"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.remat:
        command.append("--remat")
    env = dict(args.environment)
    if args.xla_flags:
        env["XLA_FLAGS"] = args.xla_flags
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{side} {measure} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating repetitions per side")
    parser.add_argument("--steps", type=int, default=3, help="timed calls per repetition")
    parser.add_argument("--cpus", default="0,1", help="comma list of CPU ids both sides run on")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: number of --cpus)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--remat", action="store_true", help="remat each layer on our side")
    parser.add_argument("--what", default="step,decode", help="comma list: step, decode")
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS for our side")
    parser.add_argument(
        "--huge-pages",
        choices=("on", "off"),
        default="on",
        help="both sides with glibc's huge-page malloc, as our entry points run (on), or neither",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("step", "decode"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.threads:
        args.threads = len(_cpu_ids(args.cpus))
    if args.child:
        _child(args)
        return

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, ")
    print(
        f"each side pinned to CPU(s) {args.cpus}, torch threads {args.threads}; "
        f"python {platform.python_version()}"
    )
    args.environment = _host_environment(args.huge_pages)
    tunables = args.environment.get("GLIBC_TUNABLES", "none")
    print(f"both sides' GLIBC_TUNABLES: {tunables} (vimrag_jax.host_memory)")
    for measure in args.what.split(","):
        if measure == "step":
            tokens = args.batch * args.seq
            label = f"GSPO train step, batch {args.batch} x seq {args.seq}"
        else:
            tokens = args.decode_batch * args.new
            label = f"greedy decode, batch {args.decode_batch}, prompt {args.prompt}, +{args.new}"
        runs: dict[str, list[dict]] = {"jax": [], "torch": []}
        for _ in range(args.rounds):
            for side in ("jax", "torch"):
                runs[side].append(_run_child(args, side, measure))
        rates = {
            side: [tokens / statistics.median(r["seconds"]) for r in results]
            for side, results in runs.items()
        }
        peaks = {side: max(r["peak_rss_mb"] for r in results) for side, results in runs.items()}
        ratios = [ours / theirs for ours, theirs in zip(rates["jax"], rates["torch"], strict=True)]
        print(f"\n{label} ({args.rounds} alternating rounds x {args.steps} timed calls)")
        for side, name in (("jax", "ours (JAX)"), ("torch", "PyTorch")):
            spread = ", ".join(f"{rate:,.0f}" for rate in rates[side])
            first = statistics.median(r["first_call_s"] for r in runs[side])
            print(
                f"  {name:11s} tokens/s per round: {spread}; peak RSS {peaks[side]:,.0f} MB; "
                f"first call {first:.1f} s"
            )
        spread = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        print(
            f"  speed ratio ours/PyTorch per round: {spread} "
            f"(median {statistics.median(ratios):.2f}); "
            f"memory ratio {peaks['jax'] / peaks['torch']:.2f}"
        )


if __name__ == "__main__":
    main()
