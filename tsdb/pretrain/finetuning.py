"""Fine-tuning from pretrained weights: each block starts from the pretrained model and trains
on its own band of the user's data, through the ordinary training loop (one ``Trainer.fit``
per block; only the block being trained has gradients and optimizer state, and only it is on
the accelerator).

``init="blocks"`` starts each block from the same block of a pretrained depth model;
``init="e2e"`` converts a pretrained end-to-end model (`tsdb.pretrain.convert`): block i gets
its slice of the layers and copies of the stem and head. ``anchor_weight > 0`` adds to every
block's loss the same loss at a fixed noise level (``anchor_sigma``: ``"min"``, the near-clean
input, or ``"max"``, a pure regression of the clean target on the context): the clean-target
anchor a third-party LLM port needed to keep a pretrained model from degrading.
"""

from __future__ import annotations

from pathlib import Path

from tsdb.config import ExperimentConfig
from tsdb.core import EDMLoss
from tsdb.data.series import SeriesDataset
from tsdb.errors import TsdbError
from tsdb.pretrain.checkpoint import load_pretrained
from tsdb.pretrain.convert import convert_e2e_to_blocks
from tsdb.strategies import Strategy, TrainUnit, get_strategy


def anchor_loss(strategy: Strategy, model, unit_index: int, sigma: float):
    """The unit's own loss at one fixed sigma (the strategy's block loss with a one-point band)."""
    block_loss = getattr(strategy, "_block_loss", None)
    if block_loss is None:
        raise TsdbError(f"the anchor loss needs a strategy with per-block EDM losses (depth, e2e); "
                        f"{strategy.name!r} has none")
    return block_loss(model, model.blocks[unit_index], EDMLoss(strategy.noise, strategy.precond, (sigma, sigma)))


def initialised(strategy: Strategy, state: dict, anchor_weight: float = 0.0, anchor_sigma: str = "min") -> Strategy:
    """``strategy`` whose ``build()`` returns a model loaded with ``state`` and whose units' losses
    carry the anchor term when ``anchor_weight > 0``."""
    base = type(strategy)
    sigma = {"min": strategy.noise.sigma_min, "max": strategy.noise.sigma_max}.get(anchor_sigma)
    if sigma is None:
        raise TsdbError(f"anchor_sigma must be 'min' or 'max', got {anchor_sigma!r}")

    class Initialised(base):
        def build(self):
            model = super().build()
            model.load_state_dict(state)
            return model

        def units(self, model) -> list[TrainUnit]:
            units = super().units(model)
            if not anchor_weight:
                return units

            def anchored(loss, anchor):
                return lambda batch: loss(batch) + anchor_weight * anchor(batch)

            return [TrainUnit(u.name, u.module, anchored(u.loss, anchor_loss(self, model, i, sigma)))
                    for i, u in enumerate(units)]

    Initialised.__name__ = Initialised.__qualname__ = f"Initialised{base.__name__}"
    return Initialised(strategy.cfg)


def finetune_config(cfg: ExperimentConfig, dataset: SeriesDataset, steps: int, lr: float, seed: int,
                    progress: bool = True, strategy: str | None = None) -> ExperimentConfig:
    """The pretrained model's config with the fine-tuning budget and the user's data."""
    return cfg.with_overrides(
        model={"strategy": strategy or cfg.model.strategy},
        train={"steps_per_block": steps, "lr": lr, "warmup_steps": max(1, min(cfg.train.warmup_steps, steps // 10)),
               "seed": seed, "progress": progress, "num_workers": 0},
        data={"dataset": dataset.name, "root": None, "max_series": None})


def finetune(pretrained: str | Path, dataset: SeriesDataset, out: str | Path, steps: int = 200, lr: float = 3e-4,
             seed: int = 0, anchor_weight: float = 0.0, anchor_sigma: str = "min", init: str = "auto",
             num_blocks: int | None = None, progress: bool = True, blocks: list[int] | None = None) -> dict:
    """Fine-tune ``pretrained`` (checkpoint folder or run directory) on ``dataset`` into ``out``
    (a `tsdb train` run directory); returns the training summary.

    ``init``: ``"blocks"`` (the pretrained model's own units), ``"e2e"`` (convert a pretrained
    e2e model into ``num_blocks`` depth blocks, default the config's ``n_blocks``) or ``"auto"``
    (``"e2e"`` when ``num_blocks`` is given and the pretrained model is e2e, else ``"blocks"``).
    """
    from tsdb.training.loop import train_model

    cfg, pre_strategy, model = load_pretrained(pretrained)
    if init == "auto":
        init = "e2e" if num_blocks and pre_strategy.convertible_to_blocks else "blocks"
    if init == "e2e":
        if not pre_strategy.convertible_to_blocks:
            raise TsdbError(f"conversion needs a pretrained e2e model; {pretrained} is {cfg.model.strategy!r}")
        blocks_cfg = cfg.model.model_copy(update={"strategy": "depth", "n_blocks": num_blocks or cfg.model.n_blocks})
        ft_cfg = finetune_config(cfg.with_overrides(model=blocks_cfg.model_dump()), dataset, steps, lr, seed, progress)
        strategy = get_strategy(ft_cfg.model)
        state = convert_e2e_to_blocks(model.state_dict(), strategy.build().state_dict(), ft_cfg.model.n_blocks)
    elif init == "blocks":
        ft_cfg = finetune_config(cfg, dataset, steps, lr, seed, progress)
        strategy, state = get_strategy(ft_cfg.model), model.state_dict()
    else:
        raise TsdbError(f"init must be 'blocks', 'e2e' or 'auto', got {init!r}")
    strategy = initialised(strategy, state, anchor_weight, anchor_sigma)
    _, summary = train_model(ft_cfg, dataset, out, strategy=strategy, blocks=blocks)
    return summary
