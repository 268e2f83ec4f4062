"""The pretraining subcommands of ``tsdb``: pretrain, pretrain-eval, finetune (registered by
`tsdb.cli.main` through :func:`add_subcommands`)."""

from __future__ import annotations

import sys
from pathlib import Path


def cmd_pretrain(args) -> None:
    from tsdb.pretrain.config import PretrainConfig
    from tsdb.pretrain.train import pretrain

    cfg = PretrainConfig.from_yaml(args.config)
    if args.steps:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps_per_block": args.steps})})
    cfg.train.progress = not args.no_progress
    summary = pretrain(cfg, args.out, arms=args.arm, blocks=args.block, workers=args.workers)
    for arm, s in summary.items():
        print(f"{arm}: {len(s['units'])} unit(s), {s['train_seconds']:.0f}s, largest unit training state "
              f"{s['train_state_bytes'] / 2**20:.2f} MiB -> {Path(args.out) / arm}")


def cmd_pretrain_eval(args) -> None:
    from tsdb.pretrain.zeroshot import evaluate_pretrained_run

    results = evaluate_pretrained_run(args.run, arms=args.arm, report_dir=args.report, protocols=args.protocols,
                                      num_samples=args.num_samples, etth1_stride=args.etth1_stride,
                                      root=args.data_root, command=" ".join(["tsdb", *sys.argv[1:]]),
                                      against=args.against)
    for arm, r in results["arms"].items():
        print(f"{arm}: geometric mean CRPS / seasonal naive {r['summary']['crps_ratio_geomean']:.3f} over "
              f"{', '.join(r['summary']['datasets'])}")
    print(f"results in {results['path']}")


def cmd_finetune(args) -> None:
    from tsdb.cli.main import _load_user_data
    from tsdb.pretrain.finetuning import finetune

    data = _load_user_data(args)
    summary = finetune(args.pretrained, data, args.out, steps=args.steps, lr=args.lr,
                       anchor_weight=args.anchor_weight, seed=args.seed, progress=not args.no_progress,
                       blocks=args.block)
    print(f"fine-tuned {len(summary['units'])} unit(s) in {summary['train_seconds']:.0f}s; run in {args.out}")


def cmd_finetune_bench(args) -> None:
    from tsdb.pretrain.finetune_bench import FinetuneBenchConfig, run_finetune_bench

    cfg = FinetuneBenchConfig.from_yaml(args.config)
    if args.arms:
        cfg = cfg.model_copy(update={"arms": args.arms})
    if args.workers:
        cfg = cfg.model_copy(update={"workers": args.workers})
    run_finetune_bench(cfg, args.out, args.report, command=" ".join(["tsdb", *sys.argv[1:]]))
    where = Path(args.report or args.out)
    print(f"results in {where / 'results.json'}, report in {where / 'report.md'}")


def add_subcommands(sub, data_flags) -> None:
    """Add ``pretrain``, ``pretrain-eval``, ``finetune`` and ``finetune-bench`` to the ``tsdb`` parser."""
    s = sub.add_parser("pretrain", help="pretrain on the corpus (KernelSynth, TSMixup, real series), block by block")
    s.add_argument("--config", required=True, help="YAML PretrainConfig, e.g. configs/pretrain/quick.yaml")
    s.add_argument("--out", required=True, help="run directory (resumable)")
    s.add_argument("--arm", nargs="+", help="train only these arms of the config (default: all)")
    s.add_argument("--block", type=int, nargs="+", help="train only these unit indices (one job of a parallel run)")
    s.add_argument("--workers", type=int, default=1, help="block jobs run at once (processes, one thread each)")
    s.add_argument("--steps", type=int, help="override train.steps_per_block")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("pretrain-eval", help="zero-shot evaluation of a pretraining run on every protocol")
    s.add_argument("run", help="pretraining run directory")
    s.add_argument("--arm", nargs="+", help="arms to evaluate (default: all)")
    s.add_argument("--report", default=None, help="also write report.md, results.json and the checkpoint here")
    s.add_argument("--protocols", nargs="+", default=None, help="default: the config's zero_shot.protocols")
    s.add_argument("--num-samples", type=int, default=None)
    s.add_argument("--etth1-stride", type=int, default=None)
    s.add_argument("--data-root", default=None)
    s.add_argument("--against", default=None,
                   help="with --report: another report of the same config (e.g. the depth arm's) to set this "
                        "run's memory and zero-shot beside")
    s.set_defaults(func=cmd_pretrain_eval)

    s = sub.add_parser("finetune", help="fine-tune a pretrained model on a dataset, one block at a time")
    s.add_argument("pretrained", help="pretraining arm run directory or checkpoint folder (model.safetensors)")
    s.add_argument("--out", required=True, help="run directory of the fine-tuned model (resumable)")
    s.add_argument("--steps", type=int, default=200, help="steps per block")
    s.add_argument("--lr", type=float, default=3e-4)
    s.add_argument("--anchor-weight", type=float, default=0.0,
                   help="weight of a clean-target anchor loss (the block's loss at sigma_min) added to each block's")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--block", type=int, nargs="+", help="fine-tune only these blocks")
    s.add_argument("--no-progress", action="store_true")
    data_flags(s)
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("finetune-bench", help="fine-tuned vs from-scratch vs converted blocks, anchor loss, >= 3 seeds")
    s.add_argument("--config", required=True, help="YAML FinetuneBenchConfig, e.g. configs/pretrain/finetune-quick.yaml")
    s.add_argument("--out", required=True, help="work folder (jobs and their runs cached under OUT/jobs)")
    s.add_argument("--report", default=None, help="also write results.json, report.md and config.yaml here")
    s.add_argument("--arms", nargs="+", help="only these arms")
    s.add_argument("--workers", type=int, default=None, help="job processes (one thread each)")
    s.set_defaults(func=cmd_finetune_bench)
