"""Times the rollout worker loop: batched episodes vs one episode at a time, embedded sampler.

Runs ``VimRAGAgent`` with the tiny random Qwen3 policy of ``configs/ggpo.py`` over the synthetic
world (the worker's setup, built in a temporary workdir) and reports episodes/s, generated
tokens/s and the share of wall time spent outside ``generate`` (prompt building, tokenization,
parsing, graph updates, retrieval, image sizing). Compilation is excluded: each mode runs once
to warm up, then is timed.

    python benchmarks/rollout.py [--questions 2] [--group_size 4] [--max_model_calls 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time

import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--group_size", type=int, default=4)
    parser.add_argument("--max_model_calls", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--max_segment_tokens", type=int, default=2048)
    args = parser.parse_args()

    import importlib.util

    from vimrag_jax.experiment import Experiment
    from vimrag_jax.rollout.trajectory import run_records
    from vimrag_jax.rollout.worker import experiment_agent

    spec = importlib.util.spec_from_file_location("ggpo", "configs/ggpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.data.max_segment_tokens = args.max_segment_tokens
    with tempfile.TemporaryDirectory() as workdir:
        experiment = Experiment.from_config(cfg, workdir)
        base = experiment.rollout_config()
        rc = dataclasses.replace(
            base,
            group_size=args.group_size,
            questions_per_batch=args.questions,
            max_model_calls=args.max_model_calls,
            max_new_tokens=args.max_new_tokens,
        )
        model = experiment.initial_model()
        rows = args.questions * args.group_size
        from vimrag_jax.sampling.sampler import Sampler

        def agent_for(batch: int):
            sampler = Sampler(
                model,
                max_prompt_len=rc.max_prompt_tokens,
                max_new_tokens=rc.max_new_tokens,
                eos_token_ids=experiment.stop_token_ids(),
                pad_token_id=experiment.tokenizer.pad_token_id,
                batch_buckets=(batch,),
                length_buckets=(rc.max_prompt_tokens,),
            )
            return experiment_agent(experiment, sampler, rc)

        questions = experiment.train_questions[: args.questions]
        results = {}
        batched = agent_for(rows)
        run_records(batched, questions, seed=99)  # warm-up: compiles
        began = time.perf_counter()
        _, out = run_records(batched, questions, seed=0)  # records built too, as a worker does
        results["batched"] = (time.perf_counter() - began, out.stats)

        single = agent_for(1)
        run_records(single, questions[:1], group_size=1, seed=99)
        began = time.perf_counter()
        stats = []
        for q in questions:
            for i in range(args.group_size):
                stats.append(run_records(single, [q], group_size=1, seed=i)[1].stats)
        elapsed = time.perf_counter() - began
        merged = dataclasses.replace(
            stats[0],
            episodes=sum(s.episodes for s in stats),
            generated_tokens=sum(s.generated_tokens for s in stats),
            generate_s=sum(s.generate_s for s in stats),
            total_s=sum(s.total_s for s in stats),
        )
        results["one at a time"] = (elapsed, merged)

    device = jax.devices()[0]
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {device.platform}, jax {jax.__version__}")
    print(
        f"{args.questions} questions x G={args.group_size}, <= {args.max_model_calls} calls, "
        f"<= {args.max_new_tokens} new tokens per call"
    )
    print("| mode | episodes/s | generated tokens/s | outside the model |")
    print("| --- | --- | --- | --- |")
    for name, (elapsed, s) in results.items():
        print(
            f"| {name} | {s.episodes / elapsed:.2f} | {s.generated_tokens / elapsed:.0f} | "
            f"{100 * s.outside_model_share:.1f} % |"
        )


if __name__ == "__main__":
    main()
