"""`load_pretrained(run_dir)`: the pretrained θ0 of an `idiff pretrain` run, ready to sample or finetune.

    pre = load_pretrained("runs/pretrain-mnist-cpu")       # EMA weights of the checkpoint in pretrained.json
    score = lambda x, t: pre.score(pre.params, x, t)        # s_θ0(x, t), x [B, H, W, C], t [B]
    x0 = pre.sampler().sample(score, key, (16, *pre.image_shape))   # the run's sampler and step count

The run directory's `pretrained.json` names the checkpoint that is θ0 (the last one saved; `final`
once the run has finished), the image shape and the number of classes of the data. `weights="params"` gives the raw (non-EMA) parameters instead.
An `idiff finetune` run directory (`finetuned.json`: its base run and its weights/ checkpoints) loads
as its base model with the finetuned θ of its last (or the given) checkpoint (`weights` left at its default).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from idiff_cli.errors import UserError


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A pretrained denoiser: `model` (Flax U-Net), `params` (its variables), the noise process `sde`,
    and the run's `PretrainConfig` (`cfg`; config.json holds the same). `weights` names the params:
    "ema" or "params" of a pretrain run, "finetuned" for the θ of a finetune run."""

    model: Any
    params: Any
    sde: Any
    cfg: Any
    image_shape: tuple[int, int, int]
    num_classes: int
    step: int
    final: bool
    weights: str

    def apply(self, params, x, level, labels=None):
        """ε_θ(x, level, labels): the network's noise prediction (evaluation mode)."""
        return self.model.apply(params, x, level, labels if self.num_classes else None)

    def score(self, params, x, t, labels=None):
        """s_θ(x, t) = −ε_θ(x, t)/σ(t)."""
        from idiff_cli.diffusion.losses import score_function

        return score_function(self.apply, self.sde, self.cfg.precondition)(params, x, t, labels)

    def sampler(self, n_steps: int | None = None, name: str | None = None):
        """The run's sampler (Tables 1/3: Euler–Maruyama 256 steps for MNIST, DDPM 1024 for CIFAR/LSUN),
        or `name` ("euler-maruyama", "probability-flow", "ddpm") with `n_steps` steps."""
        from idiff_cli.diffusion.pretrain import make_sampler

        return make_sampler(self.cfg, self.sde, n_steps, name)


def load_pretrained(run_dir: str | pathlib.Path, weights: str = "ema", step: int | None = None) -> Pretrained:
    """Loads θ0 from an `idiff pretrain` run directory (see the module docstring). Raises UserError
    when the directory holds no pretrained model."""
    from idiff_cli.checkpoint import Checkpointer
    from idiff_cli.diffusion import pretrain

    run_dir = pathlib.Path(run_dir)
    if (run_dir / "finetuned.json").exists():
        if weights != "ema":
            raise UserError(f"'{run_dir}' is a finetune run: it holds only its finetuned weights, so weights "
                            f"'{weights}' does not apply (leave the default)")
        return _load_finetuned(run_dir, step)
    record_path = run_dir / "pretrained.json"
    if not record_path.exists():
        raise UserError(f"'{run_dir}' holds no pretrained model (no pretrained.json); run `idiff pretrain` "
                        "into it first")
    if weights not in ("ema", "params"):
        raise UserError(f"weights must be 'ema' or 'params', got '{weights}'")
    record = json.loads(record_path.read_text())
    config = pretrain.read_config(run_dir)
    cfg = pretrain.PretrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    model, sde, optimizer = pretrain.make_model(cfg, record["num_classes"]), pretrain.make_sde(cfg), pretrain.make_optimizer(cfg)
    image_shape = tuple(record["image_shape"])
    ckpt = Checkpointer(run_dir / record["checkpoints"], keep=cfg.keep_checkpoints)
    chosen = record["step"] if step is None else step
    if chosen not in ckpt.all_steps():
        raise UserError(f"'{run_dir}' has no checkpoint {chosen}; available: {ckpt.all_steps()}")
    state, _ = ckpt.restore(pretrain.state_template(model, optimizer, image_shape), step=chosen)
    ckpt.close()
    params = state.ema if weights == "ema" else state.params
    return Pretrained(model, params, sde, cfg, image_shape, model.num_classes, int(chosen),
                      bool(record["final"]) and step in (None, record["step"]), weights)


def _load_finetuned(run_dir: pathlib.Path, step: int | None) -> Pretrained:
    """The base model of a finetune run with the finetuned θ of `step` (default: the last saved)."""
    from idiff_cli.checkpoint import Checkpointer

    record = json.loads((run_dir / "finetuned.json").read_text())
    base = load_pretrained(record["from"])
    with Checkpointer(run_dir / record["weights"]) as ckpt:
        chosen = record["step"] if step is None else step
        if chosen not in ckpt.all_steps():
            raise UserError(f"'{run_dir}' has no finetuned weights at step {chosen}; available: {ckpt.all_steps()}")
        params, _ = ckpt.restore(base.params, step=chosen)
    return dataclasses.replace(base, params=params, step=int(chosen), weights="finetuned",
                               final=bool(record["final"]) and step in (None, record["step"]))
